"""Canonical pair rows → model batches for training.

- :func:`load_pairs` opens a pair set: a build folder (``DIR/dataset/``), a ``save_to_disk``
  folder (a ``DatasetDict`` gives its ``train`` split) or parquet file(s) of canonical rows;
  :func:`check_columns` fails early when a loss lacks the columns it needs.
- :func:`pair_sequence` turns one row into the *sequence* a loss needs for one role: a prompt
  (messages + images) and a response. Roles are ``chosen`` / ``rejected`` on the pair's main
  input, and for P2-DPO's calibration (Eq. 5) ``chosen@enhanced``, ``chosen@degraded``,
  ``rejected@enhanced``, ``rejected@degraded``: the enhanced input is the row's
  ``enhanced_prompt`` with its ``enhanced_images`` (I_aug = Combine(I, I_crop) with the
  enhancement prompt, the input y_w was generated from), the degraded input the prompt with
  ``degraded_image`` in place of its image. A P2-DPO *robust* pair's main input is the
  prompt with its ``noisy_image`` (Eq. 7).
- :class:`PairCollator` lays a list of sequences out for one forward pass with
  :class:`~pairforge.models.hf.HFModel`'s own scoring layout (chat-template prompt, images
  through the processor, the response tokenised on its own and appended, no end-of-turn
  token; chosen and rejected packed after one copy of their prompt where the model allows
  it), so training log-probs equal ``HFModel.score``'s. Only response tokens are targets;
  each carries its sequence and its sentence (ASPO) or 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pairforge.errors import BadInput, PairforgeError
from pairforge.schema import count_image_parts, response_text

MAIN_ROLES = ("chosen", "rejected")
P2DPO_KINDS = ("focus", "robust")
_VARIANT_IMAGE = {"degraded": "degraded_image", "noisy": "noisy_image"}

#: Columns each loss needs beyond the core ``prompt``, ``chosen``, ``rejected``, ``images``.
LOSS_COLUMNS: dict[str, tuple[str, ...]] = {
    "dpo": (),
    "cwdpo": (),  # cwdpo_stage is optional: without it every row is a Stage-2 pair
    "aspo": ("sentence_spans", "sentence_weights"),
    "p2dpo": ("p2dpo_kind", "ddw_focus", "ddw_robust", "degraded_image", "noisy_image", "enhanced_prompt",
              "enhanced_images"),  # p2dpo_example optional: without it each row is its own sample
}


# ----------------------------------------------------------------------------- loading


def load_pairs(path: str | Path):
    """The pair set at ``path`` as a ``datasets.Dataset``: a build folder (through
    :func:`pairforge.engine.load_build`, which checks the build finished; a bare ``DIR/dataset/``
    works too), a ``save_to_disk`` folder (``Dataset``, or ``DatasetDict`` → ``train``), a
    parquet file or a folder of parquet files. Images that rows only point to must lie inside
    the set's folder (the parquet file's folder), be bounded and decode
    (:func:`pairforge.safety.checked_images`); one that does not stops with a line naming the
    row."""
    from pairforge.safety import checked_images

    p = Path(path).expanduser()
    ds = _load_pairs(p)
    root = p.parent if p.is_file() else p
    return checked_images(ds, root, str(p))[0]


def _load_pairs(p: Path):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if not p.exists():
        raise PairforgeError(f"{p}: no such file or folder; pass a build folder, a save_to_disk "
                             f"folder or parquet of canonical pairs")
    if p.is_dir() and (p / "manifest.json").is_file():  # a build (or merge) folder
        from pairforge.engine import load_build

        return load_build(p)
    if p.is_dir() and (p / "dataset").is_dir():
        p = p / "dataset"
    if p.is_dir() and any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise PairforgeError(f"{p}: a DatasetDict without a 'train' split ({list(ds)}); "
                                     f"save the split to train on with save_to_disk")
            ds = ds["train"]
        return ds
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if not files or any(f.suffix != ".parquet" for f in files):
        raise PairforgeError(f"{p}: not a save_to_disk folder and no parquet files; pass a build "
                             f"folder, a save_to_disk folder, or .parquet of canonical pairs")
    ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    assert isinstance(ds, Dataset)
    return ds


def check_columns(columns: Sequence[str], loss: str, where: str) -> None:
    """Fail before training when the set lacks a column that ``loss`` needs."""
    have = set(columns)
    for col in ("prompt", "chosen", "rejected", "images", *LOSS_COLUMNS[loss]):
        if col not in have:
            hint = {"aspo": "build it with the ASPO annotation (sentence spans and weights)",
                    "p2dpo": "build it with the p2dpo recipe (kinds, DDW weights, extra images)"}
            fix = hint.get(loss, "pass canonical pairs (pairforge.schema)")
            raise PairforgeError(f"{where}: column '{col}' missing, needed by --loss {loss}; {fix}")


def rows_at(ds, indices: Sequence[int]) -> list[dict]:
    """Rows ``indices`` of a ``datasets.Dataset`` as dicts (one batched read, images decoded)."""
    if not len(indices):
        return []
    cols = ds[list(indices)]
    return [{k: v[j] for k, v in cols.items()} for j in range(len(indices))]


def cwdpo_stage(row: Mapping, index: int, where: str) -> int:
    """The CW-DPO stage of a row: ``cwdpo_stage`` (1 or 2), 2 when the column is absent/null."""
    stage = row.get("cwdpo_stage")
    if stage is None:
        return 2
    if stage not in (1, 2):
        raise BadInput(f"cwdpo_stage={stage!r}; must be 1 (SFT-C) or 2 (preference)",
                       where=where, row=index, field="cwdpo_stage")
    return int(stage)


# ----------------------------------------------------------------------------- sequences


@dataclass
class SeqSpec:
    """One sequence to score: ``messages`` + ``images`` (the prompt) and the ``response`` text;
    ``spans`` (character [start, end) per sentence) when its tokens are summed per sentence.
    ``prompt_key`` identifies the rendered prompt (sequences sharing it render once)."""

    messages: list
    images: list
    response: str
    spans: list[tuple[int, int]] | None = None
    prompt_key: Any = None
    where: str = ""


def pair_sequence(row: Mapping, index: int, role: str, loss: str, where: str = "data") -> SeqSpec | None:
    """The sequence of ``role`` for the pair ``row`` (row ``index`` of ``where``) under ``loss``,
    or None when the role does not apply (calibration roles of a P2-DPO robust pair)."""
    answer, _, variant = role.partition("@")
    if answer not in MAIN_ROLES or variant not in ("", "enhanced", "degraded"):
        raise ValueError(f"unknown role {role!r}")
    images = list(row["images"] or [])
    messages = list(row["prompt"])
    image_variant = ""
    if loss == "p2dpo":
        kind = p2dpo_kind(row, index, where)
        if variant and kind != "focus":
            return None
        image_variant = variant or ("noisy" if kind == "robust" else "")
    elif variant:
        raise ValueError(f"role {role!r} is P2-DPO's only")
    if image_variant == "enhanced":
        messages, images = list(row.get("enhanced_prompt") or []), list(row.get("enhanced_images") or [])
        n = count_image_parts(messages)
        if not messages or not images or n != len(images):
            raise BadInput(f"the enhanced input (enhanced_prompt with {n} image part(s), {len(images)} "
                           f"enhanced_images) is missing or inconsistent; P2-DPO focus pairs need "
                           f"Combine(I, crop) with the enhancement prompt (Eq. 5): rebuild the set with "
                           f"the p2dpo recipe", where=where, row=index, field="enhanced_prompt")
    elif image_variant:
        n = count_image_parts(row["prompt"])
        col = _VARIANT_IMAGE[image_variant]
        if n != 1 or len(images) != 1:
            raise BadInput(f"P2-DPO swaps the prompt's image for '{col}', so the prompt must have "
                           f"exactly one image (it has {n})", where=where, row=index, field="images")
        if row.get(col) is None:
            raise BadInput(f"missing; P2-DPO {kind} pairs need it", where=where, row=index, field=col)
        images = [row[col]]
    text = response_text(row[answer])
    if not text:
        raise BadInput("empty response text", where=where, row=index, field=answer)
    spans = sentence_spans(row, index, text, where) if loss == "aspo" and role == "chosen" else None
    return SeqSpec(messages, images, text, spans, (index, image_variant), f"{where}, row {index}")


def p2dpo_kind(row: Mapping, index: int, where: str) -> str:
    kind = row.get("p2dpo_kind")
    if kind not in P2DPO_KINDS:
        raise BadInput(f"p2dpo_kind={kind!r}; must be one of {P2DPO_KINDS}", where=where, row=index,
                       field="p2dpo_kind")
    return kind


def ddw_weight(row: Mapping, index: int, where: str) -> float:
    """The stored DDW weight of a P2-DPO pair's kind (``ddw_focus`` or ``ddw_robust``)."""
    col = f"ddw_{p2dpo_kind(row, index, where)}"
    w = row.get(col)
    if w is None or not math.isfinite(w) or w < 0:
        raise BadInput(f"{w!r}; a {row['p2dpo_kind']} pair needs a finite DDW weight >= 0",
                       where=where, row=index, field=col)
    return float(w)


def sentence_spans(row: Mapping, index: int, text: str, where: str) -> list[tuple[int, int]]:
    """The chosen answer's sentence spans, checked against its weights and text."""
    spans, weights = row.get("sentence_spans"), row.get("sentence_weights")
    if not spans:
        raise BadInput("empty or missing; ASPO needs at least one sentence span", where=where,
                       row=index, field="sentence_spans")
    if weights is None or len(weights) != len(spans):
        raise BadInput(f"{0 if weights is None else len(weights)} weight(s) for {len(spans)} sentence "
                       f"span(s); they must match one to one", where=where, row=index, field="sentence_weights")
    out = []
    for s in spans:
        start, end = int(s["start"]), int(s["end"])
        if not 0 <= start < end <= len(text):
            raise BadInput(f"span [{start}, {end}) is outside the chosen text (length {len(text)})",
                           where=where, row=index, field="sentence_spans")
        out.append((start, end))
    if any(w is None or not math.isfinite(w) or w <= -1 for w in weights):
        raise BadInput("a sentence weight is null, not finite or <= -1 (ASPO weighs tokens by 1 + w)",
                       where=where, row=index, field="sentence_weights")
    return out


def token_sentences(text: str, offsets: Sequence[tuple[int, int]],
                    spans: Sequence[tuple[int, int]]) -> list[int]:
    """The sentence of each response token: the last span that starts at or before the token's
    first non-space character (a token in a gap between spans, or after the last one, joins the
    sentence before it; one before the first span joins sentence 0). Every token gets one."""
    starts = [s for s, _ in spans]
    out = []
    for s, e in offsets:
        core = s
        while core < e and text[core].isspace():
            core += 1
        k = sum(1 for st in starts if st <= core) - 1
        out.append(max(k, 0))
    return out


# ----------------------------------------------------------------------------- collation


@dataclass
class Batch:
    """Sequences laid out for one forward pass, as ``HFModel``'s scoring batches are: model
    ``inputs`` (input_ids, attention mask — 4-D when packed —, pixel_values, …), ``keep``
    (R, T) the positions whose logits are needed, and for each response token (sequences
    concatenated): its ``targets`` id, ``source`` row among the kept logits, ``seq`` (the
    sequence it belongs to) and ``segment`` (its sentence, 0 without sentences).
    ``n_sequences`` / ``n_segments`` / ``n_truncated`` (responses cut to ``max_length``);
    ``packed``: sequences sharing a prompt share one row (the prompt computed once)."""

    inputs: dict[str, torch.Tensor]
    keep: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    segment: torch.Tensor
    n_sequences: int
    n_segments: int = 1
    n_truncated: int = 0
    packed: bool = False

    def __len__(self) -> int:
        return self.n_sequences

    def to(self, device: torch.device | str) -> "Batch":
        return dataclasses.replace(
            self, inputs={k: v.to(device) for k, v in self.inputs.items()}, keep=self.keep.to(device),
            source=self.source.to(device), targets=self.targets.to(device), seq=self.seq.to(device),
            segment=self.segment.to(device))


class PairCollator:
    """Sequences → one :class:`Batch`, with the prompt rendering, tokenisation and batch layout
    of ``hf`` (an :class:`~pairforge.models.hf.HFModel`; its model is not run here).

    ``pack=True`` (when the model allows it) puts the responses that share a prompt — chosen
    and rejected of a pair — in one row after a single copy of the prompt, each attending to
    the prompt and itself only: the same log-probs and gradients as separate rows, with the
    prompt and its images computed once. ``pack=False``: one row per sequence (2B rows for B
    pairs). ``max_length`` cuts responses so prompt + response fit (a prompt that alone does
    not fit is an error)."""

    def __init__(self, hf, max_length: int | None = None, pack: bool = True):
        self.hf = hf
        self.max_length = max_length
        self.pack = pack

    def __call__(self, specs: Sequence[SeqSpec]) -> Batch:
        from pairforge.models.base import Request
        from pairforge.models.hf import MAX_RESPONSES_PER_ROW

        if not specs:
            raise ValueError("no sequences to collate")
        hf = self.hf
        unique: dict[Any, int] = {}
        requests, owner = [], []
        for s in specs:
            key = s.prompt_key if s.prompt_key is not None else id(s)
            if key not in unique:
                unique[key] = len(requests)
                requests.append(Request(s.messages, s.images, s.where))
            owner.append(unique[key])
        prompts = hf.render(requests, drop_images=False)
        resp_ids, offsets = hf.tokenize_responses([s.response for s in specs])
        n_truncated = 0
        if self.max_length is not None:
            plens = hf.encode(prompts, "right")["attention_mask"].sum(1).tolist()
            for k, (s, r) in enumerate(zip(specs, resp_ids)):
                room = self.max_length - plens[owner[k]]
                if room < 1:
                    raise BadInput(f"the prompt alone has {plens[owner[k]]} tokens, max_length is "
                                   f"{self.max_length}; raise --max-length", where=s.where, field="prompt")
                if len(r) > room:
                    resp_ids[k], offsets[k] = r[:room], offsets[k][:room]
                    n_truncated += 1
        for s, r in zip(specs, resp_ids):
            if not r:
                raise BadInput("the response has no tokens", where=s.where, field="response")
        packed = self.pack and hf.can_pack
        if packed:
            groups: dict[int, list[int]] = {}
            for k, u in enumerate(owner):
                groups.setdefault(u, []).append(k)
            rows = [(u, ks[i:i + MAX_RESPONSES_PER_ROW]) for u, ks in groups.items()
                    for i in range(0, len(ks), MAX_RESPONSES_PER_ROW)]
        else:
            rows = [(u, [k]) for k, u in enumerate(owner)]
        laid = hf.scoring_batch([prompts[u] for u, _ in rows], [[resp_ids[k] for k in ks] for _, ks in rows])
        order = [k for _, ks in rows for k in ks]  # the sequence of each response, in batch order
        seq = torch.repeat_interleave(torch.tensor(order), torch.tensor([len(resp_ids[k]) for k in order]))
        segment, n_segments = [], 1
        for k in order:
            s = specs[k]
            if s.spans:
                segment += token_sentences(s.response, offsets[k], s.spans)
                n_segments = max(n_segments, len(s.spans))
            else:
                segment += [0] * len(resp_ids[k])
        return Batch(laid.inputs, laid.keep, laid.source, laid.targets, seq, torch.tensor(segment),
                     len(specs), n_segments, n_truncated, packed and any(len(ks) > 1 for _, ks in rows))
