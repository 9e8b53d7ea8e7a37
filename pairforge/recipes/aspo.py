"""ASPO annotations: sentence spans and adaptive sentence weights of each pair's chosen answer.

Wang et al., 2025, "ASPO: Adaptive Sentence-Level Preference Optimization for Fine-Grained
Multimodal Reasoning", ACL 2025, arXiv:2505.19100, §3 (adaptive sentence reward). The chosen
answer is split into sentences s_1..s_n; each gets

- S_i = cos(CLIP(image), CLIP(s_i)), the image-text similarity;
- PPL_i = exp(−(1/N_i) Σ_{t ∈ s_i} log π(w_t | x, w_<t)), its perplexity under the policy given
  the image, the prompt and the preceding text: one ``score`` call on the whole chosen answer,
  summed per sentence with ``span_logprobs`` (exact, through the token offsets);

both min-max normalised within the answer, and w_i = α·S'_i + (1 − α)·PPL'_i, α = 0.5.

**Direction of PPL.** ASPO negates the perplexity before normalising: a sentence the model
finds *less* perplexing is more likely correct and gets the *higher* weight (low perplexity =
high confidence = high weight; arXiv:2505.19100 §3, "Textual Perplexity", as summarised by
papernotes.org's ACL 2025 note on the paper). So PPL'_i = (max PPL − PPL_i)/(max PPL − min PPL).

A one-sentence answer gets weight 0 (min-max of one value; ASPO then reduces to DPO), and so
does a quantity that is equal across all sentences. The trainer's ASPO loss uses
M* = (R_c/R_c*)·Σ_i β(1 + w_i)·log(π_θ(s_i|x)/π_ref(s_i|x)) − β·log(π_θ(y_r|x)/π_ref(y_r|x)).

**Spans tile the text**: ``sentence_spans[i] = [start, end)`` with start_0 = 0, start_i =
end_{i−1} and the last end = len(chosen); a span holds its sentence and the whitespace before
it (``chosen[start:end].strip()`` is the sentence), so every token of the answer falls in exactly
one span under ``ScoredResponse.span_logprobs`` and the sentence log-probs add up to log π(y|x).

:func:`annotate` works on any canonical rows; the :class:`ASPOAnnotate` recipe wraps it for the
build engine: each :class:`~pairforge.recipes.base.Example` carries its existing pair, as a
canonical row in ``meta["pair"]`` or as its own prompt and answer plus ``meta["rejected"]``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.models.base import Capability, Request, require
from pairforge.recipes.base import BuildContext, Example, Outcome, Reject, pair_row, recipe_params
from pairforge.schema import COLUMN_GROUPS, count_image_parts, response_text, validate_row

#: Words whose trailing period does not end a sentence.
ABBREVIATIONS = frozenset("e.g i.e etc vs cf approx fig mr mrs ms dr".split())
_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|\n+")


# ----------------------------------------------------------------------------- pure logic


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentence spans of ``text`` that tile it (module docstring): a sentence ends at ``.``,
    ``!`` or ``?`` (closing quotes/brackets included) followed by whitespace, or before a line
    break (which, like any whitespace, starts the next span); not after an abbreviation of :data:`ABBREVIATIONS` ("e.g.", "etc."). Pieces without a
    letter or digit join the sentence before them. ``[]`` for blank text."""
    if not text.strip():
        return []
    cuts = []
    for m in _END.finditer(text):
        if m.group()[0] == "\n":  # line breaks go with the next sentence, like any whitespace
            cuts.append(m.start())
            continue
        word = re.search(r"([\w.]+)$", text[:m.start()])
        if (word.group(1).lower().rstrip(".") if word else "") not in ABBREVIATIONS:
            cuts.append(m.end())
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(text)}) + [len(text)]
    spans: list[tuple[int, int]] = []
    for s, e in zip(bounds, bounds[1:]):
        if s >= e:
            continue
        if spans and not any(ch.isalnum() for ch in text[s:e]):
            spans[-1] = (spans[-1][0], e)  # punctuation or blank tail joins the sentence before
        elif spans and not any(ch.isalnum() for ch in text[spans[-1][0]:spans[-1][1]]):
            spans[-1] = (spans[-1][0], e)  # a leading piece without words joins this one
        else:
            spans.append((s, e))
    return spans


def min_max(values: Sequence[float]) -> list[float]:
    """(v − min)/(max − min) for each value; all 0 when the values are all equal (or one)."""
    lo, hi = min(values), max(values)
    return [0.0] * len(values) if hi - lo <= 0 else [(v - lo) / (hi - lo) for v in values]


def aspo_weights(similarities: Sequence[float], perplexities: Sequence[float], alpha: float = 0.5) -> list[float]:
    """ASPO sentence weights (Wang et al., 2025, arXiv:2505.19100, §3):
    w_i = α·S'_i + (1 − α)·PPL'_i with S' = min-max(S) and PPL' = min-max(−PPL), so the least
    perplexing sentence gets PPL' = 1. ``[]`` for no sentence; ``[0.0]`` for one."""
    if len(similarities) != len(perplexities):
        raise ValueError(f"aspo_weights: {len(similarities)} similarities, {len(perplexities)} perplexities")
    if not similarities:
        return []
    s, p = min_max(similarities), min_max([-x for x in perplexities])
    return [alpha * a + (1 - alpha) * b for a, b in zip(s, p)]


def span_perplexity(logprobs: Sequence[float]) -> float:
    """exp(−mean log-prob) of a sentence's tokens; NaN for none."""
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.nan


# ----------------------------------------------------------------------------- annotate


def annotate(rows: Sequence[Mapping], policy, clip, *, alpha: float = 0.5,
             where: str | None = None) -> list[dict]:
    """ASPO annotations for canonical pair rows: a copy of each row with ``sentence_spans``
    (list of ``{"start", "end"}``) and ``sentence_weights`` added.

    ``policy``: a :class:`~pairforge.models.VLM` with ``score`` (one call for all rows);
    ``clip``: an :class:`~pairforge.models.ImageTextScorer` (one ``cosine`` call for all
    sentences; S_i is the mean over the row's images). Raises :class:`BadInput` naming the row
    and field of a row that is not a canonical pair with an image and a non-empty chosen answer.
    A sentence that gets no token of its own (a tokenizer merging across the boundary) gets
    PPL' = 0."""
    if not 0 <= alpha <= 1:
        raise PairforgeError(f"aspo: alpha={alpha}; must be in [0, 1] (paper: 0.5)")
    require(policy, Capability.SCORE, purpose="aspo sentence perplexities")
    for i, row in enumerate(rows):
        check_row(row, where=where, index=i)
    chosen = [response_text(r["chosen"]) for r in rows]
    spans = [sentence_spans(t) for t in chosen]
    multi = [i for i, sp in enumerate(spans) if len(sp) > 1]  # one sentence: weight 0, no model call
    images = [[_image(im) for im in rows[i]["images"]] for i in multi]
    pairs = [(k, s, im) for k, i in enumerate(multi) for s in range(len(spans[i])) for im in images[k]]
    texts = [chosen[multi[k]][slice(*spans[multi[k]][s])].strip() for k, s, _ in pairs]
    cos = clip.cosine([im for _, _, im in pairs], texts) if pairs else []
    sims = [[0.0] * len(spans[i]) for i in multi]
    for (k, s, _), c in zip(pairs, cos):
        sims[k][s] += float(c) / len(images[k])
    requests = [Request(rows[i]["prompt"], images[k], id=str(rows[i]["id"])) for k, i in enumerate(multi)]
    scored = policy.score(requests, [chosen[i] for i in multi]) if multi else []
    weights: dict[int, list[float]] = {}
    for k, i in enumerate(multi):
        ppl = [span_perplexity(scored[k].span_logprobs(s, e)) for s, e in spans[i]]
        finite = [p for p in ppl if not math.isnan(p)]
        worst = max(finite) if finite else 0.0
        weights[i] = aspo_weights(sims[k], [worst if math.isnan(p) else p for p in ppl], alpha)
    out = []
    for i, row in enumerate(rows):
        new = dict(row)
        new["sentence_spans"] = [{"start": s, "end": e} for s, e in spans[i]]
        new["sentence_weights"] = weights.get(i, [0.0] * len(spans[i]))
        out.append(new)
    return out


def check_row(row: Mapping, *, where: str | None = None, index: int | str | None = None) -> None:
    """A row :func:`annotate` can take: a canonical pair with at least one image."""
    if not isinstance(row, Mapping):
        raise BadInput(f"is {type(row).__name__}, expected a canonical pair row (dict)", where=where, row=index)
    validate_row(row, where=where, row_index=index)
    if not row["images"] or count_image_parts(row["prompt"]) == 0:
        raise BadInput("has no image; ASPO's sentence-image similarity needs one", where=where, row=index,
                       field="images")


def _image(value: Any) -> Any:
    """A PIL image from a canonical row's image (PIL, or a ``datasets`` ``{"bytes", "path"}``)."""
    if isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
        from PIL import Image

        img = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        return img.convert("RGB")
    return value


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class ASPOParams:
    """``alpha``: weight of the image-text similarity against the perplexity (paper: 0.5)."""

    alpha: float = 0.5

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise PairforgeError(f"aspo: alpha={self.alpha}; must be in [0, 1] (paper: 0.5)")


class ASPOAnnotate:
    """ASPO annotations as a recipe over existing pairs. An example holds its pair either as a
    canonical row in ``meta["pair"]``; or, as ``pairforge.sources.sft`` reads a pair set (a
    build dir, canonical rows), as itself (prompt + chosen, images) plus the pair's other
    columns in ``meta["pair"]``; or as itself plus ``meta["rejected"]`` (a string or
    assistant messages): the prompt and the reference answer (the chosen) are the example's. The row comes back with ``sentence_spans``
    / ``sentence_weights``, its other columns kept (``groups`` lists every column group for
    that), and the annotating models appended to ``models`` (roles ``aspo_policy``,
    ``aspo_clip``)."""

    name = "aspo"
    groups = tuple(g for g in COLUMN_GROUPS if g != "diagnostics")
    roles = (("policy", True, "tiny-vlm"), ("clip", True, "tiny-clip"))

    def __init__(self, params: ASPOParams | None = None):
        self.p = params or ASPOParams()

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ASPOAnnotate:
        return cls(recipe_params(ASPOParams, params, cls.name))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.p)

    def templates(self) -> dict[str, str]:
        return {}

    def check(self, ctx: BuildContext) -> None:
        policy, clip = ctx.models.get("policy"), ctx.models.get("clip")
        if policy is None or clip is None:
            raise PairforgeError("aspo needs a policy model (perplexities) and a CLIP scorer (roles policy, clip)")
        require(policy, Capability.SCORE, Capability.IMAGES, purpose="aspo sentence perplexities")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]:
        rejects: dict[int, Reject] = {}
        rows = []
        for i, ex in enumerate(examples):
            row = self.pair_of(ex, ctx)
            if isinstance(row, Reject):
                rejects[i] = row
                continue
            try:
                check_row(row, where=ex.source_dataset or None, index=ex.source_id or ex.id)
            except BadInput as e:
                rejects[i] = Reject("filter", e.one_line())
                continue
            rows.append((i, row))
        done = annotate([r for _, r in rows], ctx.models["policy"], ctx.models["clip"], alpha=self.p.alpha)
        models = [{"role": f"aspo_{role}", "name": str(ctx.models[role].name),
                   "revision": str(getattr(ctx.models[role], "revision", "") or "")} for role in ("policy", "clip")]
        annotated = {i: r for (i, _), r in zip(rows, done)}
        outcomes = []
        for i in range(len(examples)):
            if i in rejects:
                outcomes.append(Outcome(reject=rejects[i]))
                continue
            row = annotated[i]
            row["models"] = list(row.get("models") or []) + models
            n = len(row["sentence_spans"])
            outcomes.append(Outcome(rows=[row], stats={"sentences": float(n), "one_sentence": float(n == 1)}))
        return outcomes

    def pair_of(self, ex: Example, ctx: BuildContext) -> dict | Reject:
        """The canonical pair an example carries (class docstring), or why there is none."""
        if ex.meta.get("pair") is not None:
            row = dict(ex.meta["pair"])
            if "chosen" not in row:
                # a pair set read by pairforge.sources.sft: prompt, chosen, images are the example's
                row.update(prompt=ex.prompt_messages, chosen=ex.messages[-1:], images=list(ex.images))
            return row
        rejected = ex.meta.get("rejected")
        if isinstance(rejected, list):
            rejected = response_text(rejected)
        if not isinstance(rejected, str) or not rejected.strip() or not ex.answer.strip():
            return Reject("filter", "no pair: aspo annotates existing pairs; give each example a "
                                    "canonical row in meta['pair'], or a reference answer (the chosen) "
                                    "and a 'rejected' column")
        row = pair_row(self, ex, ctx, chosen=ex.answer, rejected=rejected)
        row["models"] = []  # the models that made this pair are unknown
        return row
