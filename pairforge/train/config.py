"""Settings of ``pairforge train``: one dataclass, loadable from YAML, checked in one place.

Precedence: the dataclass defaults, then ``--config FILE.yaml`` (keys are the field names,
e.g. ``lora_r: 16``) or ``--config PRESET`` (a YAML shipped in ``pairforge/train/presets/``:
the training settings of a paper, see :data:`PRESETS`), then command-line options that were
given explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairforge.errors import PairforgeError
from pairforge.train import losses

LOSSES = ("dpo", "cwdpo", "aspo", "p2dpo")
PRECISIONS = ("auto", "bf16", "fp16", "no")


@dataclass
class TrainConfig:
    """Everything that shapes a training run. ``steps`` (optimizer steps) overrides
    ``epochs``; ``batch_size`` is pairs per device per micro-batch (P2-DPO: samples (I, P),
    each with up to two pairs, Eq. 8), ``grad_accum`` micro-batches per optimizer step;
    ``warmup`` is in optimizer steps. CW-DPO's Stage 1 runs ``cw_stage1_epochs`` epochs over
    the Stage-1 rows before ``epochs``/``steps`` of Stage 2."""

    data: str = ""
    model: str = "tiny-vlm"
    loss: str = "dpo"
    out: str = ""
    # optimisation
    beta: float = losses.BETA
    lr: float = 1e-4
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    warmup_ratio: float | None = None  # warmup as a share of the preference stage's steps (instead of warmup)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    max_length: int | None = None
    pack: bool = True  # chosen and rejected after one copy of their prompt (when the model allows)
    # model: LoRA (default) or full fine-tuning
    full_finetune: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # "language" (text model's linear layers), "language-attention" (its attention projections
    # only), "all-linear", or module names
    lora_target: str = "language"
    merge: bool = False
    # reference log-probs
    precompute_ref: bool = True
    ref_batch_size: int = 16
    # CW-DPO: C of SFT-C, ℓ_floor and τ of the cooling weight; None = from the data's ℓ̄ columns
    # (pairforge.recipes.cwdpo.cooling_calibration, the numbers the build's summary.json records)
    sftc_lambda: float = losses.SFTC_LAMBDA
    sftc_margin: float | None = None
    sftc_reduction: str = "sequence"  # Eq. 4.2's −log π(y|x); "token_mean": per-token NLL (option)
    cooling_floor: float | None = None
    cooling_tau: float | None = None
    cw_stage1_epochs: float = 1.0
    # ASPO (arXiv:2505.19100): α of Eq. 10; weights recomputed per step (Alg. 1) or the stored
    # ones; the R_c/R_c* of Eq. 12 as the paper's reward ratio or the token-length option
    aspo_alpha: float = 0.5
    aspo_weights: str = "dynamic"
    aspo_ratio: str = "reward"
    # P2-DPO
    lambda_calib: float = losses.P2DPO_LAMBDA_CALIB
    # logging, probes, checkpoints
    probe_size: int = 16
    probe_every: int = 10
    log_every: int = 1
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True

    def check(self) -> "TrainConfig":
        """Raise :class:`PairforgeError` naming the first bad setting and its fix."""
        def bad(name: str, why: str) -> PairforgeError:
            return PairforgeError(f"train setting {name}={getattr(self, name)!r}: {why}")

        self._check_numbers(bad)
        if not self.data:
            raise bad("data", "give the pair set: a build folder, a save_to_disk folder or parquet")
        if not self.out:
            raise bad("out", "give an output folder with --out")
        if self.loss not in LOSSES:
            raise bad("loss", f"choose one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "ref_batch_size", "log_every", "probe_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("warmup", "probe_size"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1) (a share of the training steps)")
        if self.warmup_ratio is not None and self.warmup > 0:
            raise bad("warmup", "give warmup (steps) or warmup_ratio (share of the steps), not both")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0 (AdamW's decoupled weight decay)")
        if self.steps is not None and self.steps < 1:
            raise bad("steps", "must be >= 1 (or leave it out and set epochs)")
        if self.steps is None and self.epochs <= 0:
            raise bad("epochs", "must be > 0")
        if self.save_every is not None and self.save_every < 1:
            raise bad("save_every", "must be >= 1 (or leave it out: a checkpoint at the end only)")
        for name in ("lr", "beta", "cooling_tau"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.sftc_reduction not in ("sequence", "token_mean"):
            raise bad("sftc_reduction", "choose 'sequence' (Eq. 4.2's −log π(y|x)) or 'token_mean'")
        if not 0 <= self.aspo_alpha <= 1:
            raise bad("aspo_alpha", "must be in [0, 1] (ASPO's paper: 0.5)")
        if self.aspo_weights not in ("dynamic", "stored"):
            raise bad("aspo_weights", "choose dynamic (recomputed each step, the paper's Alg. 1) or stored")
        if self.aspo_ratio not in losses.ASPO_RATIOS:
            raise bad("aspo_ratio", f"choose one of {', '.join(losses.ASPO_RATIOS)} (reward: the paper's Eq. 12)")
        if self.cw_stage1_epochs < 0:
            raise bad("cw_stage1_epochs", "must be >= 0 (0 skips Stage 1)")
        if not self.full_finetune and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise bad("lora_r", "LoRA needs lora_r >= 1 and lora_alpha > 0 (or --full-finetune)")
        if self.merge and self.full_finetune:
            raise bad("merge", "--merge merges a LoRA adapter; a full fine-tune already writes weights")
        if self.max_length is not None and self.max_length < 2:
            raise bad("max_length", "must be >= 2")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.max_grad_norm <= 0:
            raise bad("max_grad_norm", "must be > 0")
        for name in ("weight_decay", "sftc_lambda", "lambda_calib"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        return self

    def _check_numbers(self, bad) -> None:
        """Every numeric setting is a number of its type and finite (NaN or inf would train
        an all-NaN model, or fail deep inside torch)."""
        for f in dataclasses.fields(self):
            kind = str(f.type).replace(" | None", "")
            if kind not in ("int", "float", "bool"):
                continue
            value = getattr(self, f.name)
            if value is None and "None" in str(f.type):
                continue
            if kind == "bool":
                if not isinstance(value, bool):
                    raise bad(f.name, "must be true or false")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (kind == "int" and not isinstance(value, int)):
                raise bad(f.name, f"must be {'an integer' if kind == 'int' else 'a number'}")
            if not math.isfinite(value):
                raise bad(f.name, "must be a finite number (not nan or inf)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def semantic_hash(self) -> str:
        """Hash of the settings that change the trained weights (not logging, progress, paths
        or resume), recorded in checkpoints so a resume with other settings is refused."""
        skip = {"out", "resume", "progress", "log_every", "save_every", "keep_checkpoints",
                "ref_batch_size", "precompute_ref", "merge", "pack"}
        items = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
#: Shipped presets: the papers' training settings (``pairforge train --config vapr``).
PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def config_path(path: str | Path) -> Path:
    """A config file: ``path`` itself when it is a file, else the shipped preset of that name."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{p.name.removesuffix('.yaml')}.yaml"
    if p.parent == Path(".") and preset.is_file():
        return preset
    raise PairforgeError(f"{p}: no such config file or preset; pass a YAML file of train settings "
                         f"or one of the presets {', '.join(PRESETS)}")


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        p = config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PairforgeError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise PairforgeError(f"{p}: expected a mapping of setting: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - FIELDS)
        if unknown:
            raise PairforgeError(f"{p}: unknown setting '{unknown[0]}'; known: {', '.join(sorted(FIELDS))}")
        values.update(loaded)
    unknown = sorted(set(overrides) - FIELDS)
    if unknown:
        raise PairforgeError(f"unknown train setting '{unknown[0]}'")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = TrainConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by the FIELDS check
        raise PairforgeError(f"train settings: {e}") from None
    return config.check()
