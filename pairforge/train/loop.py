"""The training loop of ``pairforge train``: plain PyTorch + ``accelerate`` + ``peft`` LoRA.

Read top to bottom, :func:`train` does:

1. load the pair set and split off a held-out *probe* set (Δ log p and entropy monitoring);
2. load the policy through :class:`~pairforge.models.hf.HFModel` (same rendering and
   tokenisation as scoring) and wrap it in a LoRA adapter (or train it fully);
3. get the reference log-probs once (dataset columns, the cache, or one pass over the data
   with the adapter disabled) — or, with ``precompute_ref=False``, run the reference in every
   step;
4. run the optimizer steps: every step takes ``grad_accum`` micro-batches of ``batch_size``
   pairs from a seeded stream of per-epoch permutations, and every micro-batch sends all the
   sequences its loss needs (chosen and rejected; P2-DPO's calibration inputs too) through ONE
   forward pass — by default chosen and rejected packed after one shared copy of their prompt
   (B rows), with ``pack=False`` as 2B separate rows; cosine schedule with linear warmup;
   checkpoints that resume to the same weights;
5. write the LoRA adapter (and merged weights with ``merge``) or the fully trained model,
   loadable by transformers / peft, and a summary.

CW-DPO runs Stage 1 (SFT-C on the ``cwdpo_stage == 1`` rows) first, then resets the reference
to the Stage-1 policy (its log-probs computed once, then cached) and runs Stage 2 (Alg. 1); C,
ℓ_floor and τ default to the values fitted on the data's ℓ̄ columns
(:func:`pairforge.recipes.cwdpo.cooling_calibration`), and the cooling weight's spread is logged.

P2-DPO's unit is the *sample* (I, P) (Eq. 8): its focus and robust rows (same ``p2dpo_example``)
are drawn together — ``batch_size`` counts samples — and their weighted terms are summed per
sample before the mean.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairforge.errors import PairforgeError, first_line
from pairforge.schema import derive_seed
from pairforge.train import losses as L
from pairforge.train.config import TrainConfig
from pairforge.train.data import (
    PairCollator,
    check_columns,
    cwdpo_stage,
    ddw_weight,
    load_pairs,
    pair_sequence,
    rows_at,
)
from pairforge.train.logps import SeqLogps, sequence_logps, takes_logits_to_keep
from pairforge.train.reference import (
    SENTENCES,
    RefTable,
    compute_reference,
    from_columns,
    load_or_compute,
    model_identity,
    reference_key,
    weights_hash,
)

#: Sequences each loss sends through the policy, and those it needs reference log-probs of.
POLICY_ROLES = {
    "dpo": ("chosen", "rejected"),
    "cwdpo": ("chosen", "rejected"),
    "aspo": ("chosen", "rejected"),
    "p2dpo": ("chosen", "rejected", "chosen@enhanced", "chosen@degraded"),
}
REF_ROLES = {
    "dpo": ("chosen", "rejected"),
    "cwdpo": ("chosen", "rejected"),
    "aspo": ("chosen", "rejected"),
    "p2dpo": ("chosen", "rejected", "rejected@enhanced", "rejected@degraded"),
}
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------- small pieces


def step_rows(indices: Sequence[int], step: int, rows_per_step: int, seed: int, salt: str) -> list[int]:
    """Rows of optimizer step ``step`` (0-based): a window of ``rows_per_step`` over the stream
    of per-epoch permutations of ``indices``, each permutation seeded by (seed, salt, epoch).
    A pure function of its arguments, so a resumed run sees exactly the same batches; the
    last step of a run may reach into the next epoch (those rows are counted as repeats)."""
    n = len(indices)
    start, end = step * rows_per_step, (step + 1) * rows_per_step
    out: list[int] = []
    for epoch in range(start // n, (end - 1) // n + 1):
        g = torch.Generator().manual_seed(derive_seed("train-order", seed, salt, epoch))
        perm = torch.randperm(n, generator=g).tolist()
        lo, hi = max(start - epoch * n, 0), min(end - epoch * n, n)
        out += [indices[p] for p in perm[lo:hi]]
    return out


def aspo_step_weights(sentence_sums: torch.Tensor, sentence_counts: torch.Tensor,
                      similarities: Sequence[Sequence[float]], alpha: float) -> torch.Tensor:
    """ASPO's sentence weights at this step (Wang et al. 2025, arXiv:2505.19100, Alg. 1: the
    weights are computed inside the loop from the model's predictions): PPL_i (Eq. 9) from the
    current policy's per-sentence log-prob sums and token counts (B, S), detached; S_i the
    build's stored CLIP similarities (one list per row, its sentences); w_i = α·S'_i +
    (1 − α)·PPL'_i (Eqs. 7, 10, :func:`pairforge.recipes.aspo.aspo_weights`). A sentence with
    no token of its own gets the row's worst perplexity (PPL' = 0), as in the build. (B, S),
    0 on padding."""
    from pairforge.recipes.aspo import aspo_weights

    sums, counts = sentence_sums.detach().double().cpu(), sentence_counts.cpu()
    out = torch.zeros(sentence_sums.shape, dtype=sentence_sums.dtype)
    for j, sims in enumerate(similarities):
        n = len(sims)
        ppl = [math.exp(-sums[j, i].item() / int(counts[j, i])) if counts[j, i] > 0 else math.nan
               for i in range(n)]
        finite = [p for p in ppl if not math.isnan(p)]
        worst = max(finite) if finite else 0.0
        w = aspo_weights(list(sims), [worst if math.isnan(p) else p for p in ppl], alpha)
        out[j, :n] = torch.tensor(w, dtype=out.dtype)
    return out.to(sentence_sums.device)


def lr_multiplier(step: int, stages: Sequence[int], warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay, restarted at each stage boundary (CW-DPO's Stage 2
    starts its own schedule); ``stages`` are the stages' step counts."""
    from pairforge.world.models import warmup_cosine_lr

    for n in stages:
        if step < n:
            return warmup_cosine_lr(step, n, lr=1.0, warmup=min(warmup, max(n - 1, 0)), min_ratio=min_ratio)
        step -= n
    return min_ratio


def language_lora_targets(model: torch.nn.Module, attention_only: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` layers of the model's text decoder (LoRA's default targets:
    attention and MLP projections of the language model, not the vision tower or lm_head);
    ``attention_only``: those inside its attention blocks (P2-DPO App. F.1)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is decoder), None) if decoder is not None else None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and (prefix is None or n.startswith(prefix + "."))
             and (not attention_only or any(k in n.lower() for k in ("attn", "attention")))]
    if not names:
        raise PairforgeError(f"{type(model).__name__}: no linear layers found in the text model for "
                             f"LoRA; set lora_target to 'all-linear' or to module names")
    return names


def _precision(config: TrainConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass(kw_only=True)
class RoleLogps(SeqLogps):
    """Log-probs of one role for the B pairs of a micro-batch (zeros where the role does not
    apply; ``present`` marks where it does)."""

    present: torch.Tensor


@dataclass
class StepStats:
    """Running sums of a step's metrics over its micro-batches."""

    values: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.values[k] = self.values.get(k, 0.0) + float(v)
        self.n += 1

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.values.items()}


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run (see the module docstring); :meth:`run` returns the summary."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config.check()
        self.out = Path(config.out).expanduser()
        self.accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum,
                                       mixed_precision=_precision(config),
                                       step_scheduler_with_optimizer=False)
        set_seed(config.seed)
        self.device = self.accelerator.device
        self.where = str(config.data)
        self.notes: list[str] = []

    # ------------------------------------------------------------------------- setup

    def _setup_data(self) -> None:
        c = self.config
        self.ds = load_pairs(c.data)
        check_columns(self.ds.column_names, c.loss, self.where)
        n = len(self.ds)
        if n == 0:
            raise PairforgeError(f"{self.where}: the pair set is empty")
        stages = ([cwdpo_stage(r, i, self.where) for i, r in enumerate(self.ds.select_columns(["cwdpo_stage"]))]
                  if c.loss == "cwdpo" and "cwdpo_stage" in self.ds.column_names else [2] * n)
        if c.loss == "p2dpo":  # check every pair's kind and DDW weight up front
            meta = self.ds.select_columns(["p2dpo_kind", "ddw_focus", "ddw_robust"])
            for i, r in enumerate(meta):
                ddw_weight(r, i, self.where)
        self.aspo_dynamic = c.loss == "aspo" and c.aspo_weights == "dynamic"
        if self.aspo_dynamic and ("sentence_similarities" not in self.ds.column_names
                                  or self.ds.data.column("sentence_similarities").null_count == n):
            self.aspo_dynamic = False
            self.notes.append("aspo: the set has no sentence_similarities (built before per-step weights); "
                              "the stored sentence_weights are used as fixed weights")
        pref = [i for i in range(n) if stages[i] == 2]
        n_probe = min(c.probe_size, len(pref) // 5)
        g = torch.Generator().manual_seed(derive_seed("probe", c.seed))
        probe = sorted(pref[k] for k in torch.randperm(len(pref), generator=g)[:n_probe].tolist())
        held = set(probe)
        self.probe_rows = probe
        self.stage1_rows = [i for i in range(n) if stages[i] == 1]
        self.stage2_rows = [i for i in pref if i not in held]
        self.stage2_units, self.unit_rows = self.stage2_rows, {}
        if c.loss == "p2dpo" and "p2dpo_example" in self.ds.column_names:  # Eq. 8: one unit per sample
            keys = self.ds.select_columns(["p2dpo_example"])["p2dpo_example"]
            by_key: dict[Any, list[int]] = {}
            for i in self.stage2_rows:
                by_key.setdefault(keys[i] if keys[i] is not None else ("row", i), []).append(i)
            self.unit_rows = {rows[0]: rows for rows in by_key.values()}
            self.stage2_units = sorted(self.unit_rows)
        if c.loss == "cwdpo":
            self.cw = self._cwdpo_settings(stages)
        if not self.stage2_rows:
            raise PairforgeError(f"{self.where}: no preference pairs to train on "
                                 f"({len(self.stage1_rows)} Stage-1 rows, {n_probe} probe rows)")
        if not probe:
            self.notes.append("no probe set (fewer than 5 preference pairs); Δ log p and entropy not logged")

    def _cwdpo_settings(self, stages: list[int]) -> dict[str, float]:
        """C (SFT-C), ℓ_floor and τ (cooling weight): the given settings, else fitted on the set's
        ``rejected_mean_logp`` / ``rejected_n_tokens`` / ``cwdpo_stage`` columns by
        :func:`~pairforge.recipes.cwdpo.cooling_calibration` (the numbers the cwdpo build's
        summary.json records); an error naming the setting when neither is available."""
        from pairforge.recipes.cwdpo import cooling_calibration

        c = self.config
        fitted: dict[str, Any] = {}
        if {"rejected_mean_logp", "rejected_n_tokens"} <= set(self.ds.column_names):
            cols = self.ds.select_columns(["rejected_mean_logp", "rejected_n_tokens"])
            fitted = cooling_calibration(cols["rejected_mean_logp"], cols["rejected_n_tokens"], stages)
        margin_key = "sftc_margin" if c.sftc_reduction == "sequence" else "sftc_margin_token"
        out = {"cooling_floor": c.cooling_floor, "cooling_tau": c.cooling_tau, "sftc_margin": c.sftc_margin}
        origin = {}
        for name, key in (("cooling_floor", "cooling_floor"), ("cooling_tau", "cooling_tau"),
                          ("sftc_margin", margin_key)):
            origin[name] = "given"
            if out[name] is None:
                out[name], origin[name] = fitted.get(key), "from the data"
            needed = name != "sftc_margin" or (self.stage1_rows and c.cw_stage1_epochs > 0)
            if out[name] is None and needed:
                raise PairforgeError(f"{self.where}: cannot set {name} from the data (no usable "
                                     f"rejected_mean_logp / rejected_n_tokens values); build the set with "
                                     f"the cwdpo recipe or give {name} in --config")
        self.notes.append("CW-DPO: " + ", ".join(f"{n} = {v:.4g} ({origin[n]})" for n, v in out.items()
                                                 if v is not None) + f"; SFT-C on {c.sftc_reduction} NLL")
        return out

    def _setup_model(self) -> None:
        from pairforge.models.hf import HFModel

        c = self.config
        self.hf = HFModel(c.model, device=self.device, dtype=torch.float32, progress=False)
        self.collator = PairCollator(self.hf, c.max_length, pack=c.pack)
        model = self.hf.model
        if c.full_finetune:
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            if c.lora_target == "language":
                targets: Any = language_lora_targets(model)
            elif c.lora_target == "language-attention":
                targets = language_lora_targets(model, attention_only=True)
            elif c.lora_target == "all-linear":
                targets = "all-linear"
            else:
                targets = [t.strip() for t in c.lora_target.split(",") if t.strip()]
            lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                              target_modules=targets, bias="none")
            model = get_peft_model(model, lora)
        self.logits_to_keep = takes_logits_to_keep(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self.stage_steps = self._stage_steps()
        total = sum(self.stage_steps)
        self.warmup_steps = (c.warmup if c.warmup_ratio is None
                             else math.ceil(c.warmup_ratio * self.stage_steps[-1]))
        if c.warmup_ratio is not None:
            self.notes.append(f"warmup: {self.warmup_steps} steps ({c.warmup_ratio:g} of {self.stage_steps[-1]})")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, self.stage_steps, self.warmup_steps, c.min_lr_ratio))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.total_steps = total
        if not c.full_finetune:  # checkpoints hold the trainable (adapter) tensors only
            def only_trainable(models, weights, _dir):
                for m, w in zip(models, weights):
                    keep = {n for n, p in m.named_parameters() if p.requires_grad}
                    for k in [k for k in w if k not in keep]:
                        del w[k]
            self.accelerator.register_save_state_pre_hook(only_trainable)

    def _stage_steps(self) -> list[int]:
        """Optimizer steps of Stage 1 (CW-DPO's SFT-C; 0 otherwise) and of the preference stage."""
        c = self.config
        per_step = c.batch_size * c.grad_accum * self.accelerator.num_processes
        s1 = 0
        if c.loss == "cwdpo" and self.stage1_rows and c.cw_stage1_epochs > 0:
            s1 = math.ceil(c.cw_stage1_epochs * len(self.stage1_rows) / per_step)
        s2 = c.steps or math.ceil(c.epochs * len(self.stage2_units) / per_step)
        return [s1, s2]

    # ------------------------------------------------------------------------- forward helpers

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def forward_roles(self, model, rows: list[dict], indices: Sequence[int], roles: Sequence[str], *,
                      entropy: bool = False) -> dict[str, RoleLogps]:
        """One forward pass over every role's sequences of these pairs; per-role log-probs."""
        c = self.config
        specs, owner = [], []
        for role in roles:
            for j, (row, i) in enumerate(zip(rows, indices)):
                s = pair_sequence(row, i, role, c.loss, self.where)
                if s is not None:
                    specs.append(s)
                    owner.append((role, j))
        batch = self.collator(specs).to(self.device)
        self.n_truncated += batch.n_truncated
        lp: SeqLogps = sequence_logps(model, batch, segments=c.loss == "aspo", entropy=entropy,
                                      logits_to_keep=self.logits_to_keep)
        b = len(rows)
        out = {}
        for role in roles:
            pos = [k for k, (r, _) in enumerate(owner) if r == role]
            js = torch.tensor([owner[k][1] for k in pos], dtype=torch.long, device=self.device)
            pos_t = torch.tensor(pos, dtype=torch.long, device=self.device)

            def put(values: torch.Tensor) -> torch.Tensor:
                base = values.new_zeros((b, *values.shape[1:]))
                return base.index_put((js,), values[pos_t]) if len(pos) else base

            present = torch.zeros(b, dtype=torch.bool, device=self.device)
            present[js] = True
            out[role] = RoleLogps(
                put(lp.sums), put(lp.counts),
                put(lp.segment_sums) if lp.segment_sums is not None else None,
                put(lp.segment_counts) if lp.segment_counts is not None else None,
                put(lp.entropy) if lp.entropy is not None else None, present=present)
        return out

    def _reference_batch(self, model):
        """``batch_logps`` for :func:`compute_reference`: reference log-probs of rows."""
        def run(indices: Sequence[int], roles: Sequence[str]) -> dict:
            rows = rows_at(self.ds, indices)
            got = self.forward_roles(model, rows, indices, roles)
            out: dict[str, Any] = {r: torch.where(got[r].present, got[r].sums, torch.nan) for r in roles}
            if self.config.loss == "aspo":
                sent = got["chosen"].segment_sums
                out[SENTENCES] = [sent[j, :len(row["sentence_spans"])] for j, row in enumerate(rows)]
            return out
        return run

    # ------------------------------------------------------------------------- reference

    def _reference_table(self, stage1_hash: str = "", *, may_compute: bool = True) -> RefTable | None:
        """Precomputed reference log-probs for the preference rows (None without precompute).
        ``may_compute=False``: only a stored table will do (a resumed run whose reference policy
        is gone)."""
        c = self.config
        roles = REF_ROLES[c.loss]
        rows = sorted(self.stage2_rows + self.probe_rows)
        base_reference = not stage1_hash
        ref_cols = ["ref_chosen_logps", "ref_rejected_logps"]
        if base_reference and c.loss in ("dpo", "cwdpo") and set(ref_cols) <= set(self.ds.column_names):
            refs = self.ds.select_columns(ref_cols)
            table = from_columns(refs["ref_chosen_logps"], refs["ref_rejected_logps"])
            if table is not None:
                self.notes.append("reference log-probs from the dataset's ref_chosen_logps / "
                                  "ref_rejected_logps columns (assumed computed with the same model)")
                return table
            self.notes.append("ref_* columns have missing values: reference log-probs computed instead")
        if not c.precompute_ref:
            return None
        folder = getattr(self.hf.model.config, "_name_or_path", None)  # where the weights came from
        ident = model_identity(self.hf.name, self.hf.revision, folder)
        key = reference_key(self.ds._fingerprint, ident, c.loss, roles, stage1_hash)
        run_copy = self.out / "reference" / f"{key}.npz"
        model = self.model
        mode = self._unwrapped().disable_adapter if base_reference and not c.full_finetune else nullcontext

        def compute() -> RefTable:
            if not may_compute:
                raise PairforgeError(f"{run_copy}: the reference log-probs of this run are missing and "
                                     f"its reference policy is gone; rerun without --resume")
            model.eval()
            desc = "reference log-probs" + (" (Stage-1 policy)" if stage1_hash else "")
            try:
                return compute_reference(len(self.ds), rows, roles, self._reference_batch(model),
                                         batch_size=c.ref_batch_size, with_sentences=c.loss == "aspo",
                                         reference_mode=mode, progress=c.progress and self._main, desc=desc)
            finally:
                model.train()

        t0 = time.perf_counter()
        table, hit = load_or_compute(key, run_copy, compute)
        self.ref_seconds += time.perf_counter() - t0
        self.ref_hits.append(hit)
        self.notes.append(f"reference log-probs: {table.source if hit else 'computed'} "
                          f"({len(rows)} pairs, key {key})")
        return table

    def _reference_model(self, stage1: bool):
        """(model, context) for the reference forward when it is not precomputed: the policy with
        its adapter disabled (LoRA, base reference), else a frozen copy of the current policy."""
        if not stage1 and not self.config.full_finetune:
            return self.model, self._unwrapped().disable_adapter
        frozen = copy.deepcopy(self._unwrapped()).eval().requires_grad_(False)
        return frozen, nullcontext

    def _ref_values(self, rows, indices) -> dict[str, torch.Tensor]:
        """Reference log-probs of the pairs (per role, (B,); and ``SENTENCES`` (B, S) for ASPO)."""
        c = self.config
        roles = REF_ROLES[c.loss]
        if self.ref_table is not None:
            out = {r: self.ref_table.get(r, indices).to(self.device, torch.float32) for r in roles}
            if c.loss == "aspo":  # as wide as the policy's: the most sentences of these rows
                width = max(len(r["sentence_spans"]) for r in rows)
                out[SENTENCES] = self.ref_table.sentence_matrix(indices, width).to(self.device, torch.float32)
            return {k: torch.nan_to_num(v) for k, v in out.items()}
        model, mode = self.ref_live
        with torch.no_grad(), mode():
            got = self.forward_roles(model, rows, indices, roles)
        out = {r: got[r].sums.detach() for r in roles}
        if c.loss == "aspo":
            out[SENTENCES] = got["chosen"].segment_sums.detach()
        return out

    # ------------------------------------------------------------------------- losses

    def preference_loss(self, rows, indices) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's preference loss (one policy forward) and its statistics."""
        c = self.config
        pol = self.forward_roles(self.model, rows, indices, POLICY_ROLES[c.loss])
        ref = self._ref_values(rows, indices)
        ch, rj = pol["chosen"], pol["rejected"]
        if c.loss == "dpo":
            res = L.dpo_loss(ch.sums, rj.sums, ref["chosen"], ref["rejected"], c.beta)
        elif c.loss == "cwdpo":
            res = L.cwdpo_loss(ch.sums, rj.sums, ref["chosen"], ref["rejected"], rj.means, c.beta,
                               floor=self.cw["cooling_floor"], tau=self.cw["cooling_tau"])
            self.cooling_seen += res.extras["cooling_weight"].tolist()
        elif c.loss == "aspo":
            if self.aspo_dynamic:  # Alg. 1: PPL'_i from this step's policy, S_i from the build
                weights = aspo_step_weights(ch.segment_sums, ch.segment_counts,
                                            [_similarities(r, i, self.where) for r, i in zip(rows, indices)],
                                            c.aspo_alpha)
            else:  # the build's weights (its policy's perplexities), fixed
                weights = torch.zeros_like(ch.segment_sums)
                for j, r in enumerate(rows):
                    weights[j, :len(r["sentence_weights"])] = torch.tensor(r["sentence_weights"])
            res = L.aspo_loss(ch.segment_sums, ref[SENTENCES], weights, ch.segment_counts, rj.sums,
                              ref["rejected"], c.beta, c.aspo_ratio)
            if bool((ch.segment_counts > 0).any()):
                res.extras["aspo_weight"] = weights[ch.segment_counts > 0].detach()
        else:
            is_focus = torch.tensor([r["p2dpo_kind"] == "focus" for r in rows], device=self.device)
            ddw = torch.tensor([ddw_weight(r, i, self.where) for r, i in zip(rows, indices)],
                               device=self.device)
            keys = [r.get("p2dpo_example") or ("row", i) for r, i in zip(rows, indices)]
            first = {k: n for n, k in enumerate(dict.fromkeys(keys))}  # Eq. 8: a sample's rows summed
            sample = torch.tensor([first[k] for k in keys], device=self.device)
            res = L.p2dpo_loss(is_focus, ddw, ch.sums, rj.sums, ref["chosen"], ref["rejected"],
                               pol["chosen@enhanced"].sums, pol["chosen@degraded"].sums,
                               ref["rejected@enhanced"], ref["rejected@degraded"], c.beta, c.lambda_calib,
                               sample=sample)
        stats = {"loss": res.losses.mean().item(),
                 "rewards/chosen": res.chosen_rewards.mean().item(),
                 "rewards/rejected": res.rejected_rewards.mean().item(),
                 "rewards/accuracy": (res.chosen_rewards > res.rejected_rewards).float().mean().item(),
                 "rewards/margin": (res.chosen_rewards - res.rejected_rewards).mean().item()}
        for k, v in res.extras.items():
            stats[f"{k}/mean"] = v.mean().item()
            stats[f"{k}/min"] = v.min().item()
            stats[f"{k}/max"] = v.max().item()
            stats[f"{k}/std"] = v.std(unbiased=False).item()
        if c.loss == "p2dpo":
            stats["focus_share"] = is_focus.float().mean().item()
        return res.losses.mean(), stats

    def sft_c_loss(self, rows, indices) -> tuple[torch.Tensor, dict[str, float]]:
        """CW-DPO Stage 1 (SFT-C) on a micro-batch: one forward over chosen and rejected."""
        c = self.config
        pol = self.forward_roles(self.model, rows, indices, ("chosen", "rejected"))
        field = "sums" if c.sftc_reduction == "sequence" else "means"  # Eq. 4.2: −log π(y|x)
        loss, extra = L.sft_c_loss(getattr(pol["chosen"], field), getattr(pol["rejected"], field),
                                   lam=c.sftc_lambda, margin=self.cw["sftc_margin"])
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in extra.items()}}

    # ------------------------------------------------------------------------- probes

    @torch.no_grad()
    def probe(self) -> dict[str, Any]:
        """Policy log p of chosen and rejected (sums) and per-token entropy on the probe pairs."""
        if not self.probe_rows:
            return {}
        self.model.eval()
        chosen, rejected, ent, toks = [], [], 0.0, 0
        bs = self.config.ref_batch_size
        for s in range(0, len(self.probe_rows), bs):
            idx = self.probe_rows[s:s + bs]
            got = self.forward_roles(self.model, rows_at(self.ds, idx), idx, ("chosen", "rejected"),
                                     entropy=True)
            chosen += got["chosen"].sums.tolist()
            rejected += got["rejected"].sums.tolist()
            ent += float(got["chosen"].entropy.sum())
            toks += int(got["chosen"].counts.sum())
        self.model.train()
        return {"chosen": chosen, "rejected": rejected, "entropy": ent / max(toks, 1)}

    def probe_stats(self) -> dict[str, float]:
        now = self.probe()
        if not now:
            return {}
        base = self.probe_baseline
        return {"probe/entropy": now["entropy"],
                "probe/dlogp_chosen": float(np.mean(np.subtract(now["chosen"], base["chosen"]))),
                "probe/dlogp_rejected": float(np.mean(np.subtract(now["rejected"], base["rejected"])))}

    # ------------------------------------------------------------------------- checkpoints

    @property
    def _main(self) -> bool:
        return self.accelerator.is_main_process

    def _checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first: ``step-N`` folders with a state file (a folder is
        renamed to ``step-N`` only once complete; ``step-N.partial`` is a killed save)."""
        root = self.out / "checkpoints"
        found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name)
                 and (p / STATE_FILE).is_file()] if root.is_dir() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int) -> None:
        """Save into ``step-N.partial``, write the state file atomically, then rename the
        folder to ``step-N``: a kill at any point leaves the previous checkpoints intact."""
        path = self.out / "checkpoints" / f"step-{step:06d}"
        partial = path.with_name(path.name + ".partial")
        if self._main:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial), safe_serialization=not self.config.full_finetune)
        self.accelerator.wait_for_everyone()
        if self._main:
            state = {"step": step, "config_hash": self.config.semantic_hash(),
                     "stage1_hash": self.stage1_hash, "probe_baseline": self.probe_baseline,
                     "n_truncated": self.n_truncated}
            write_atomic(partial / STATE_FILE, json.dumps(state))
            if path.exists():
                shutil.rmtree(path)
            os.replace(partial, path)
            for old in self._checkpoints()[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> int:
        """Load the newest readable checkpoint; a corrupt one (truncated state file or
        weights) is skipped with a note for the one before it. None readable: one line."""
        found = self._checkpoints()
        if not found:
            self.notes.append(f"--resume: no checkpoint under {self.out / 'checkpoints'}; starting at step 0")
            return 0
        problems = []
        for path in reversed(found):
            try:
                state = json.loads((path / STATE_FILE).read_text())
                step = int(state["step"])
                config_hash = state["config_hash"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{path.name}: {STATE_FILE} unreadable ({first_line(e)})")
                continue
            if config_hash != self.config.semantic_hash():
                raise PairforgeError(f"{path}: written with other training settings; resume with the "
                                     f"same settings or use a new --out")
            try:
                self.accelerator.load_state(str(path), strict=False)
            except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for a bad file
                problems.append(f"{path.name}: weights or optimizer state unreadable ({first_line(e)})")
                continue
            self.stage1_hash = state.get("stage1_hash", "")
            self.probe_baseline = state.get("probe_baseline") or {}
            self.n_truncated = state.get("n_truncated", 0)
            for problem in problems:
                self.notes.append(f"--resume: skipped the corrupt checkpoint {problem}")
            self.notes.append(f"resumed from {path} (step {step})")
            return step
        raise PairforgeError(f"{self.out / 'checkpoints'}: no readable checkpoint to resume from "
                             f"({'; '.join(problems)}); rerun without --resume, or with a new --out")

    def _check_out(self) -> None:
        """``--out`` can be created and written (before any data or model is loaded)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-check-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise PairforgeError(f"--out {self.out}: cannot write there ({e.strerror or e}); "
                                 f"pass --out with a writable folder") from None

    def _truncate_log(self, log_path: Path, step: int) -> None:
        """Keep the log records of steps up to ``step`` (the checkpoint resumed from): a run
        killed after its last checkpoint logged steps that the resumed run logs again."""
        if not log_path.is_file():
            return
        kept = []
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                if int(record["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut by the kill
                continue
        write_atomic(log_path, "".join(k + "\n" for k in kept))

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        c = self.config
        t_start = time.perf_counter()
        self.n_truncated, self.ref_seconds, self.ref_hits, self.cooling_seen = 0, 0.0, [], []
        self.stage1_hash, self.probe_baseline = "", {}
        self._check_out()
        self._setup_data()
        self._setup_model()
        start = self._resume() if c.resume else 0
        s1, s2 = self.stage_steps
        if not self.probe_baseline:
            self.probe_baseline = self.probe()
        self.ref_table: RefTable | None = None
        self.ref_live = None
        if s1 == 0:  # the reference is the base policy (gone from memory once a full fine-tune moved)
            base_gone = start > 0 and c.full_finetune
            if base_gone and not c.precompute_ref:
                raise PairforgeError(f"{self.out}: resuming a full fine-tune needs its precomputed "
                                     f"reference log-probs; resume with --precompute-ref (the default)")
            self.ref_table = self._reference_table(may_compute=not base_gone)
            if self.ref_table is None:
                self.ref_live = self._reference_model(stage1=False)
        elif start > s1:  # resumed in Stage 2: the Stage-1 reference of this run
            if not c.precompute_ref:
                raise PairforgeError(f"{self.out}: resuming CW-DPO Stage 2 needs the Stage-1 reference "
                                     f"log-probs; resume with --precompute-ref (the default)")
            self._stage2_reference(resumed=True)
        # else: Stage 1 runs first; the loop resets the reference at its end (step s1)

        log_path = self.out / "train_log.jsonl"
        if self._main:
            self._truncate_log(log_path, start)
        writer = _tensorboard(self.out / "tb") if self._main else None
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=start, desc=f"train {c.loss}", unit="step",
                   disable=not (c.progress and self._main))
        history: list[dict] = []
        t_loop = time.perf_counter()
        self.model.train()
        with (log_path.open("a") if self._main else nullcontext()) as log:
            for step in range(start, self.total_steps):
                record = self.train_step(step)
                last = step + 1 == self.total_steps
                if record["stage"] == 2 and self.probe_rows and ((step + 1) % c.probe_every == 0 or last):
                    record.update(self.probe_stats())
                record["elapsed_s"] = time.perf_counter() - t_loop
                record["steps_per_s"] = (step + 1 - start) / record["elapsed_s"]
                history.append(record)
                if self._main and ((step + 1) % c.log_every == 0 or last):
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if writer is not None:
                        for k, v in record.items():
                            if isinstance(v, (int, float)) and k != "step":
                                writer.add_scalar(k, v, step + 1)
                bar.set_postfix_str(_postfix(record))
                bar.update(1)
                if c.save_every and (step + 1) % c.save_every == 0 and not last:
                    self.save_checkpoint(step + 1)
        bar.close()
        train_seconds = time.perf_counter() - t_loop
        if self.total_steps > start:
            self.save_checkpoint(self.total_steps)
        outputs = self.save_outputs()
        summary = self._summary(history, start, train_seconds, time.perf_counter() - t_start, outputs)
        if self._main:
            write_atomic(self.out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        if writer is not None:
            writer.close()
        return summary

    def train_step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches of this process's rows,
        backward on each, then clip, step and schedule; returns the step's log record."""
        c = self.config
        s1 = self.stage_steps[0]
        stage = 1 if step < s1 else 2
        if stage == 2 and step == s1 and s1 > 0:  # CW-DPO: the reference becomes the Stage-1 policy
            self.stage1_hash = weights_hash(self._unwrapped())
            self._stage2_reference()
        pool = self.stage1_rows if stage == 1 else self.stage2_units
        local = step - (0 if stage == 1 else s1)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_step = c.batch_size * c.grad_accum * world
        rows_idx = step_rows(pool, local, per_step, c.seed, f"stage{stage}")
        loss_fn = self.sft_c_loss if stage == 1 else self.preference_loss
        acc, grad_norm, lr = StepStats(), None, self.scheduler.get_last_lr()[0]
        for m in range(c.grad_accum):
            lo = (m * world + rank) * c.batch_size
            idx = rows_idx[lo:lo + c.batch_size]
            if stage == 2 and self.unit_rows:  # P2-DPO: a sample's rows together (Eq. 8)
                idx = [i for u in idx for i in self.unit_rows[u]]
            with self.accelerator.accumulate(self.model):
                loss, stats = loss_fn(rows_at(self.ds, idx), idx)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            acc.add(stats)
        record: dict[str, Any] = {"step": step + 1, "stage": stage, "lr": lr,
                                  "epoch": (local + 1) * per_step / len(pool)}
        means = acc.mean()
        if grad_norm is not None:
            means["grad_norm"] = float(grad_norm)
        record.update({k: _reduce(self.accelerator, v) for k, v in means.items()})
        return record

    def _stage2_reference(self, resumed: bool = False) -> None:
        """Reset the reference to the Stage-1 policy (CW-DPO): precomputed log-probs (computed
        now, or for a resumed run the stored ones), or a frozen copy of the policy."""
        if self.config.precompute_ref:
            if not self.stage1_hash:
                raise PairforgeError(f"{self.out}: the Stage-1 state of this run is missing; "
                                     f"rerun without --resume")
            table = self._reference_table(self.stage1_hash, may_compute=not resumed)
            self.ref_table, self.ref_live = table, None
        else:
            self.ref_table, self.ref_live = None, self._reference_model(stage1=True)

    def save_outputs(self) -> dict[str, str]:
        """The LoRA adapter (+ merged weights with ``merge``) or the fully trained model, each
        with the processor / tokenizer, loadable by transformers (and peft)."""
        c = self.config
        self.accelerator.wait_for_everyone()
        outputs: dict[str, str] = {}
        if not self._main:
            return outputs
        model = self._unwrapped()
        owner = self.hf.processor if self.hf.processor is not None else self.hf.tokenizer
        if c.full_finetune:
            path = self.out / "model"
            model.save_pretrained(path, state_dict=self.accelerator.get_state_dict(self.model))
            owner.save_pretrained(path)
            outputs["model"] = str(path)
        else:
            path = self.out / "adapter"
            model.save_pretrained(path)
            owner.save_pretrained(path)
            outputs["adapter"] = str(path)
            if c.merge:
                merged_path = self.out / "model"
                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(merged_path)
                owner.save_pretrained(merged_path)
                outputs["model"] = str(merged_path)
        return outputs

    def _summary(self, history, start, train_seconds, total_seconds, outputs) -> dict[str, Any]:
        """The run in numbers: steps and speed, reference source, rows, last losses, outputs."""
        c = self.config
        s1, s2 = self.stage_steps
        done = self.total_steps - start
        seen = s2 * c.batch_size * c.grad_accum * self.accelerator.num_processes
        last = [h for h in history if h["stage"] == 2][-10:]  # the final steps of this run
        probes = [h for h in history if "probe/entropy" in h]
        final = {k: float(np.mean([h[k] for h in last])) for k in ("loss", "rewards/accuracy", "rewards/margin")
                 if last and k in last[0]}
        cooling = _spread(self.cooling_seen, "cooling_weight") if c.loss == "cwdpo" else {}
        if cooling and cooling["cooling_weight_p95"] - cooling["cooling_weight_p05"] < 0.05:
            self.notes.append(f"the cooling weight hardly varied (5th-95th percentile "
                              f"{cooling['cooling_weight_p05']:.3f}-{cooling['cooling_weight_p95']:.3f}): "
                              f"ℓ_floor and τ do not fit this policy's ℓ̄ (built with another model?); "
                              f"set cooling_floor / cooling_tau in --config")
        return {
            "loss": c.loss, "model": self.hf.name, "data": str(c.data), "out": str(self.out),
            "steps": self.total_steps, "stage1_steps": s1, "resumed_at": start, "steps_this_run": done,
            "train_seconds": round(train_seconds, 3),
            "steps_per_s": done / train_seconds if train_seconds > 0 else None,
            "reference_seconds": round(self.ref_seconds, 3), "total_seconds": round(total_seconds, 3),
            "reference_cache_hit": all(self.ref_hits) if self.ref_hits else None,
            "pairs": len(self.stage2_rows), "stage1_rows": len(self.stage1_rows),
            "probe_pairs": len(self.probe_rows), "pairs_seen": seen,
            "pairs_repeated": (max(0, seen - math.floor(c.epochs * len(self.stage2_rows)))
                               if c.steps is None else None),
            "responses_truncated": self.n_truncated, "trainable_parameters": self.n_trainable,
            "final": final, "probe": probes[-1] if probes else None,
            **({"cooling": {**self.cw, **cooling}} if c.loss == "cwdpo" else {}),
            "outputs": outputs, "notes": self.notes,
        }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _spread(values: list[float], name: str) -> dict[str, float]:
    """Percentiles (5, 25, 50, 75, 95), mean and std of ``values`` (e.g. every cooling weight
    of the run's Stage-2 steps), keyed ``{name}_p05`` ...; empty without values."""
    if not values:
        return {}
    v = np.asarray(values, dtype=np.float64)
    out = {f"{name}_p{q:02d}": float(np.percentile(v, q)) for q in (5, 25, 50, 75, 95)}
    return {**out, f"{name}_mean": float(v.mean()), f"{name}_std": float(v.std()), f"{name}_n": int(v.size)}


def _similarities(row: dict, index: int, where: str) -> list[float]:
    """A row's stored ASPO similarities S_i, one per sentence span (checked)."""
    sims, spans = row.get("sentence_similarities"), row["sentence_spans"]
    if sims is None or len(sims) != len(spans) or not all(s is not None and math.isfinite(s) for s in sims):
        from pairforge.errors import BadInput

        raise BadInput(f"{'missing' if sims is None else f'{len(sims)} value(s), some not finite or'} for "
                       f"{len(spans)} sentence span(s); rebuild with `pairforge build aspo`, or train with "
                       f"aspo_weights: stored", where=where, row=index, field="sentence_similarities")
    return list(sims)


def _reduce(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor(value, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean"))


def _postfix(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if "rewards/accuracy" in record:
        parts.append(f"acc {record['rewards/accuracy']:.2f}")
    return ", ".join(parts)


def _tensorboard(path: Path):
    """A TensorBoard writer when tensorboard is installed, else None (the JSONL log remains)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``pairforge train`` with ``config``; returns the summary (also in OUT/train_summary.json)."""
    return Trainer(config).run()
