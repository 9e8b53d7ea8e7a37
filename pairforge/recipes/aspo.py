"""ASPO annotations: sentence spans and adaptive sentence weights of each pair's chosen answer.

Wang et al., 2025, "ASPO: Adaptive Sentence-Level Preference Optimization for Fine-Grained
Multimodal Reasoning", arXiv:2505.19100, §3.2.1 and Alg. 1. The chosen answer is split into
sentences s_1..s_n (pysbd; the paper is silent on the splitter); each gets

- S_i = cos(CLIP(image), CLIP(s_i)), the image-text similarity (Eq. 6), min-max normalised
  within the answer to S'_i (Eq. 7);
- PPL_i = exp(−(1/N_i) Σ_{t ∈ s_i} log π(w_t | x, w_<t)) (Eq. 9), its perplexity under the policy
  given the image, the prompt and the preceding text: one ``score`` call on the whole chosen
  answer, summed per sentence with ``span_logprobs`` (exact, through the token offsets). The
  paper negates the perplexity, then min-max normalises it like Eq. 7: PPL'_i =
  (max PPL − PPL_i)/(max PPL − min PPL), so the least perplexing sentence gets 1;

and w_i = α·S'_i + (1 − α)·PPL'_i (Eq. 10), α = 0.5 (§4.1).

The build stores the raw similarities S_i (``sentence_similarities``) and the weights w_i of
the build's policy (``sentence_weights``). Alg. 1 computes PPL'_i inside the training loop from
the policy being trained; ``pairforge train --loss aspo`` does that (the stored weights are the
initial ones, used only with ``aspo_weights: stored`` or by sets without similarities).

A one-sentence answer gets weight 0 (min-max of one value; ASPO then reduces to DPO, §3.2.1),
and so does a quantity that is equal across all sentences. The trainer's loss is Eq. 12–13
(:func:`pairforge.train.losses.aspo_loss`).

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

#: Abbreviations (besides pysbd's own list) whose period does not end a sentence when the next
#: piece does not start with a capital letter ("on Mon. and", "approx. 3.14").
ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf approx ca fig figs no nos mr mrs ms dr st jr sr prof vol a.m p.m "
    "mon tue tues wed thu thur thurs fri sat sun jan feb mar apr jun jul aug sep sept oct nov dec".split())
_LINE_BREAK = re.compile(r"\n+")


def _segmenter():
    """pysbd's English segmenter (rule-based Golden Rules; keeps the text as it is)."""
    global _SEGMENTER, _PYSBD_ABBREVIATIONS
    if _SEGMENTER is None:
        import pysbd
        from pysbd.languages import Language

        _SEGMENTER = pysbd.Segmenter(language="en", clean=False)
        _PYSBD_ABBREVIATIONS = frozenset(a.lower().rstrip(".") for a in
                                         Language.get_language_code("en").Abbreviation.ABBREVIATIONS)
    return _SEGMENTER


_SEGMENTER = None
_PYSBD_ABBREVIATIONS: frozenset[str] = frozenset()


def _ends_with_abbreviation(piece: str) -> bool:
    word = re.search(r"([\w.]+)\.$", piece.rstrip())
    token = word.group(1).lower().rstrip(".") if word else ""
    return bool(token) and (token in ABBREVIATIONS or token in _PYSBD_ABBREVIATIONS
                            or bool(re.fullmatch(r"(?:[a-z]\.)+[a-z]", token)))  # "u.s", "a.m"


# ----------------------------------------------------------------------------- pure logic


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentence spans of ``text`` that tile it (module docstring). Boundaries come from pysbd
    (Sadvilkar & Neumann 2020, rule-based sentence boundary disambiguation: decimals such as
    "3.5", "p.m.", "Dr.", "U.S." do not end a sentence), plus every line break; a boundary pysbd
    puts right after an abbreviation ("Mon.", "approx.") is undone when the next piece does not
    start with a capital letter ("on Mon. and", "approx. 3.14"). A span holds its sentence and
    the whitespace before it; pieces without a letter or digit join the sentence before them.
    ``[]`` for blank text."""
    if not text.strip():
        return []
    cuts: set[int] = {m.start() for m in _LINE_BREAK.finditer(text)}
    pos = 0
    pieces = []
    for seg in _segmenter().segment(text):
        core = seg.strip()
        if not core:
            continue
        start = text.find(core, pos)
        if start < 0:  # pysbd changed the text (it should not with clean=False): no cut here
            continue
        pos = start + len(core)
        pieces.append((start, pos))
    for (s0, e0), (s1, _) in zip(pieces, pieces[1:]):
        nxt = text[s1:s1 + 1]
        if _ends_with_abbreviation(text[s0:e0]) and not nxt.isupper():
            continue  # "on Mon. and", "approx. 3.14": the abbreviation's period ends no sentence
        cuts.add(e0)
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(text)) + [len(text)]
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
    """ASPO sentence weights (Wang et al., 2025, arXiv:2505.19100, §3.2.1, Eqs. 7 and 10):
    w_i = α·S'_i + (1 − α)·PPL'_i with S' = min-max(S) and PPL' = min-max(−PPL), so the least
    perplexing sentence gets PPL' = 1. ``[]`` for no sentence; ``[0.0]`` for one."""
    if len(similarities) != len(perplexities):
        raise ValueError(f"aspo_weights: {len(similarities)} similarities, {len(perplexities)} perplexities")
    if not similarities:
        return []
    s, p = min_max(similarities), min_max([-x for x in perplexities])
    return [alpha * a + (1 - alpha) * b for a, b in zip(s, p)]


def span_perplexity(logprobs: Sequence[float]) -> float:
    """exp(−mean log-prob) of a sentence's tokens (ASPO Eq. 9); NaN for none."""
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.nan


# ----------------------------------------------------------------------------- annotate


def annotate(rows: Sequence[Mapping], policy, clip, *, alpha: float = 0.5,
             where: str | None = None) -> list[dict]:
    """ASPO annotations for canonical pair rows: a copy of each row with ``sentence_spans``
    (list of ``{"start", "end"}``), ``sentence_weights`` (w_i, Eq. 10) and
    ``sentence_similarities`` (raw S_i, Eq. 6; 0 for a one-sentence answer) added.

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
    similarities = {i: sims[k] for k, i in enumerate(multi)}
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
        # raw S_i (Eq. 6) for the trainer's per-step weights; a one-sentence answer needs none
        new["sentence_similarities"] = similarities.get(i, [0.0] * len(spans[i]))
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
