"""The canonical pair row: one row per preference pair, in TRL's conversational vision format.

A row loads in any DPO trainer with no conversion (TRL's ``DPOTrainer``, LLaMA-Factory and
ms-swift through the exporters):

- ``prompt``: messages; a user message's ``content`` is a list of parts
  ``{"type": "image", "text": None}`` / ``{"type": "text", "text": ...}``;
- ``chosen`` / ``rejected``: one assistant message each;
- ``images``: ``List(Image())``, the images the prompt's image parts refer to, in order.

Identity and provenance are plain typed columns (``id``, ``recipe``, ``task``, ``source_*``,
``models``, ``prompt_templates``, ``seed``, ``pairforge_version``). Recipe fields and
diagnostics come in named column groups (see :data:`COLUMN_GROUPS`), typed, never JSON
strings; a dataset carries the core columns plus the groups it uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset, Features, Image, List, Value

from pairforge import __version__
from pairforge.errors import BadInput

if TYPE_CHECKING:
    import pyarrow as pa

ROLES = ("system", "user", "assistant")

_PART = {"type": Value("string"), "text": Value("string")}
MESSAGE = {"role": Value("string"), "content": List(_PART)}
MESSAGES = List(MESSAGE)

CORE_FEATURES: dict[str, Any] = {
    "id": Value("string"),
    "prompt": MESSAGES,
    "chosen": MESSAGES,
    "rejected": MESSAGES,
    "images": List(Image()),
    "recipe": Value("string"),
    "task": Value("string"),
    # provenance
    "source_dataset": Value("string"),
    "source_id": Value("string"),
    "source_meta": List({"key": Value("string"), "value": Value("string")}),
    "models": List({"role": Value("string"), "name": Value("string"), "revision": Value("string")}),
    "prompt_templates": List({"name": Value("string"), "sha256": Value("string")}),
    "seed": Value("int64"),
    "pairforge_version": Value("string"),
}

#: Optional typed column groups. Names follow the papers (DESIGN.md, "Data model").
COLUMN_GROUPS: dict[str, dict[str, Any]] = {
    # TRL's names for precomputed reference log-probs (sum over response tokens).
    "ref": {
        "ref_chosen_logps": Value("float64"),
        "ref_rejected_logps": Value("float64"),
    },
    # VaPR: the minimal edit that turned chosen into rejected.
    "vapr": {
        "edit_original": Value("string"),
        "edit_replacement": Value("string"),
        "editor": Value("string"),
    },
    # M3PO: multimodal alignment score (MAS), log-probs, M3P-score of the rejected candidate.
    "m3po": {
        "chosen_mas": Value("float64"),
        "rejected_mas": Value("float64"),
        "chosen_logp": Value("float64"),
        "rejected_logp": Value("float64"),
        "m3p_score": Value("float64"),
    },
    # P2-DPO: focus / robust pairs, the crop box (x0, y0, x1, y1 in pixels), DDW weights, the
    # extra inputs the calibration loss needs (the enhanced input Combine(I, crop) with the
    # enhancement prompt, exactly as y_w was generated from it; the degraded and noisy images),
    # the example both pairs of one (I, P) came from (Eq. 8 sums them per sample) and the
    # log-prob margin the run's margin window judged (App. D).
    "p2dpo": {
        "p2dpo_kind": Value("string"),
        "p2dpo_example": Value("string"),
        "p2dpo_margin": Value("float64"),
        "crop_box": List(Value("float32")),
        "ddw_focus": Value("float32"),
        "ddw_robust": Value("float32"),
        "crop_image": Image(),
        "degraded_image": Image(),
        "noisy_image": Image(),
        "enhanced_prompt": MESSAGES,
        "enhanced_images": List(Image()),
    },
    # CW-DPO: the rejected answer's mean token log-prob (ℓ̄) for the cooling weight, and stage.
    "cwdpo": {
        "rejected_mean_logp": Value("float64"),
        "rejected_n_tokens": Value("int32"),
        "cwdpo_stage": Value("int8"),
    },
    # ASPO: sentence spans (character offsets into the chosen text), weights w_i, similarities S_i.
    "aspo": {
        "sentence_spans": List({"start": Value("int32"), "end": Value("int32")}),
        "sentence_weights": List(Value("float32")),
        "sentence_similarities": List(Value("float32")),  # raw CLIP S_i (Eq. 6), for per-step weights
    },
    # Model diagnostics of a build with --reference (with "ref"): token counts of chosen and
    # rejected under the reference, Δ_ref = ref_chosen_logps − ref_rejected_logps, and, when a
    # policy is given, its summed log-probs and IPS (the same gap under the policy).
    "model_diagnostics": {
        "ref_chosen_n_tokens": Value("int32"),
        "ref_rejected_n_tokens": Value("int32"),
        "delta_ref": Value("float64"),
        "policy_chosen_logps": Value("float64"),
        "policy_rejected_logps": Value("float64"),
        "ips": Value("float64"),
    },
    # Text diagnostics of `pairforge audit`, attached per pair.
    "diagnostics": {
        "lev_words": Value("int32"),
        "lev_norm": Value("float32"),
        "len_chosen": Value("int32"),
        "len_rejected": Value("int32"),
        "len_gap": Value("int32"),
        "len_ratio": Value("float32"),
        "length_unit": Value("string"),
        "is_identical": Value("bool"),
        "is_near_duplicate": Value("bool"),
    },
}


def features(*groups: str) -> Features:
    """``datasets.Features`` for the core columns plus the named optional column groups."""
    out = dict(CORE_FEATURES)
    for g in groups:
        if g not in COLUMN_GROUPS:
            raise ValueError(f"unknown column group '{g}'; choose from {sorted(COLUMN_GROUPS)}")
        out.update(COLUMN_GROUPS[g])
    return Features(out)


def image_columns(feats: Mapping) -> dict[str, bool]:
    """Image columns of a ``Features`` → whether the column is a list of images."""
    from datasets import Sequence as SequenceFeature

    out = {}
    for name, f in feats.items():
        if isinstance(f, Image):
            out[name] = False
        elif isinstance(f, (List, SequenceFeature)) and isinstance(f.feature, Image):
            out[name] = True
    return out


def groups_of(columns: Iterable[str]) -> list[str]:
    """The optional column groups any of whose columns appear in ``columns``."""
    cols = set(columns)
    return [g for g, spec in COLUMN_GROUPS.items() if cols & set(spec)]


# ----------------------------------------------------------------------------- messages


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part() -> dict:
    return {"type": "image", "text": None}


def user_message(text: str, n_images: int = 1, images_first: bool = True) -> dict:
    """A user message with ``n_images`` image parts (before the text by default)."""
    imgs = [image_part() for _ in range(n_images)]
    parts = imgs + [text_part(text)] if images_first else [text_part(text)] + imgs
    return {"role": "user", "content": parts}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [text_part(text)]}


def message_text(message: Mapping) -> str:
    """The text of one message: its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content or () if p.get("type") == "text" and p.get("text"))


def response_text(messages: Sequence[Mapping]) -> str:
    """The text of a ``chosen`` / ``rejected`` column (the assistant message(s))."""
    return "\n".join(message_text(m) for m in messages)


def prompt_text(messages: Sequence[Mapping]) -> str:
    """The text of the last user turn of a ``prompt`` column."""
    users = [m for m in messages if m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


def count_image_parts(messages: Sequence[Mapping]) -> int:
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, Mapping) and p.get("type") == "image")
    return n


# ----------------------------------------------------------------------------- rows


def stable_id(*parts: object) -> str:
    """A stable 16-hex-digit id from the parts (e.g. source name, row id, prompt, responses)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))  # stable for any str
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def stable_ids(joined: pa.Array) -> list[str]:
    """:func:`stable_id` of many rows at once: ``joined[i]`` holds row ``i``'s parts already
    encoded and each followed by ``\x1f`` (an Arrow binary array, e.g. from
    ``pyarrow.compute.binary_join_element_wise``), so only the hashing is per row."""
    _, offsets, data = joined.buffers()
    if data is None:
        data = b""
    ends = np.frombuffer(offsets, dtype=np.int32)[joined.offset:joined.offset + len(joined) + 1]
    view, sha256 = memoryview(data), hashlib.sha256
    return [sha256(view[a:b]).hexdigest()[:16] for a, b in zip(ends[:-1].tolist(),
                                                                 ends[1:].tolist())]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the parts, stable across runs and machines: per-example randomness
    is seeded from (seed, example id) so results never depend on batching or resume."""
    return int(stable_id(*parts), 16) & (2**63 - 1)


def template_hash(template: str) -> str:
    """sha256 of a prompt template's text, recorded in ``prompt_templates``."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def make_pair(
    *,
    prompt: str | Sequence[Mapping],
    chosen: str | Sequence[Mapping],
    rejected: str | Sequence[Mapping],
    images: Sequence[Any] = (),
    id: str | None = None,
    recipe: str = "external",
    task: str = "unknown",
    source_dataset: str = "",
    source_id: str = "",
    source_meta: Mapping[str, Any] | None = None,
    models: Sequence[Mapping[str, str]] = (),
    prompt_templates: Sequence[Mapping[str, str]] = (),
    seed: int | None = None,
    **extra: Any,
) -> dict:
    """Build one canonical row. Strings become messages; a string prompt gets one image part
    per image. ``extra`` holds columns of the optional groups (names checked by
    :func:`validate_row`). The id defaults to a hash of source, row id and texts."""
    images = list(images)
    if isinstance(prompt, str):
        prompt = [user_message(prompt, n_images=len(images))]
    if isinstance(chosen, str):
        chosen = [assistant_message(chosen)]
    if isinstance(rejected, str):
        rejected = [assistant_message(rejected)]
    row = {
        "id": id
        or stable_id(source_dataset, source_id, prompt_text(prompt), response_text(chosen),
                     response_text(rejected)),
        "prompt": [_norm_message(m) for m in prompt],
        "chosen": [_norm_message(m) for m in chosen],
        "rejected": [_norm_message(m) for m in rejected],
        "images": images,
        "recipe": recipe,
        "task": task,
        "source_dataset": source_dataset,
        "source_id": str(source_id),
        "source_meta": [{"key": str(k), "value": "" if v is None else str(v)}
                        for k, v in (source_meta or {}).items()],
        "models": [{"role": m["role"], "name": m["name"], "revision": m.get("revision", "")}
                   for m in models],
        "prompt_templates": [dict(t) for t in prompt_templates],
        "seed": seed,
        "pairforge_version": __version__,
    }
    row.update(extra)
    return row


def _norm_message(m: Mapping) -> dict:
    content = m.get("content")
    if isinstance(content, str):
        content = [text_part(content)]
    elif isinstance(content, list):
        content = [{"type": p.get("type"), "text": p.get("text")} if isinstance(p, Mapping) else p
                   for p in content]
    return {"role": m.get("role"), "content": content}


_KNOWN_COLUMNS = set(CORE_FEATURES).union(*(set(g) for g in COLUMN_GROUPS.values()))


def validate_row(row: Mapping, *, where: str | None = None, row_index: int | str | None = None) -> None:
    """Check one canonical row; raise :class:`BadInput` naming the first bad field."""

    def bad(field: str, reason: str) -> BadInput:
        return BadInput(reason, where=where, row=row_index, field=field)

    for key in ("id", "prompt", "chosen", "rejected", "images"):
        if key not in row:
            raise bad(key, "missing; every canonical pair needs id, prompt, chosen, rejected, images")
    unknown = sorted(set(row) - _KNOWN_COLUMNS)
    if unknown:
        raise bad(unknown[0], f"not a canonical column; add it to a group in pairforge.schema "
                              f"or drop it (known groups: {sorted(COLUMN_GROUPS)})")
    if not isinstance(row["id"], str) or not row["id"]:
        raise bad("id", "must be a non-empty string")
    for key in ("prompt", "chosen", "rejected"):
        _validate_messages(row[key], key, bad)
    for key in ("chosen", "rejected"):
        if row[key][-1]["role"] != "assistant":
            raise bad(key, "last message must have role 'assistant'")
        if not response_text(row[key]).strip():
            raise bad(key, "empty response text")
    if not prompt_text(row["prompt"]).strip() and count_image_parts(row["prompt"]) == 0:
        raise bad("prompt", "has neither text nor an image")
    images = row["images"]
    if images is None or isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise bad("images", f"must be a list of images, got {type(images).__name__}")
    n_parts = count_image_parts(row["prompt"])
    if n_parts != len(images):
        raise bad("images", f"prompt has {n_parts} image placeholder(s) but {len(images)} "
                            f"image(s) were given; they must match one to one")
    for i, img in enumerate(images):
        if img is None:
            raise bad("images", f"image {i} is None")


def _validate_messages(value: Any, key: str, bad) -> None:
    if not isinstance(value, list) or not value:
        raise bad(key, f"must be a non-empty list of messages, got {type(value).__name__}")
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise bad(key, f"message {j} is {type(m).__name__}, expected a dict with role and content")
        if m.get("role") not in ROLES:
            raise bad(key, f"message {j} has role {m.get('role')!r}; expected one of {ROLES}")
        content = m.get("content")
        if not isinstance(content, list):
            raise bad(key, f"message {j} content must be a list of parts, got {type(content).__name__}")
        for p in content:
            if not isinstance(p, Mapping) or p.get("type") not in ("text", "image"):
                raise bad(key, f"message {j} has a part that is not {{'type': 'text'|'image'}}: {p!r:.80}")
            if p["type"] == "text" and not isinstance(p.get("text"), str):
                raise bad(key, f"message {j} has a text part whose text is "
                               f"{type(p.get('text')).__name__}, expected str")


def to_dataset(rows: Iterable[Mapping], *groups: str, validate: bool = True) -> Dataset:
    """Canonical rows → ``datasets.Dataset`` with the canonical features.

    Groups default to those whose columns appear in any row; a row missing an optional column
    gets ``None`` there."""
    rows = list(rows)
    if not groups:
        groups = tuple(groups_of(set().union(*rows))) if rows else ()
    feats = features(*groups)
    if validate:
        for i, r in enumerate(rows):
            validate_row(r, row_index=i)
    columns = {k: [r.get(k) for r in rows] for k in feats}
    return Dataset.from_dict(columns, features=feats)
