"""M3PO: preference pairs mined from the policy's own samples by the M3P-score.

Gao et al., 2025, "M3PO: Multimodal-Model-Guided Preference Optimization for Visual Instruction
Following", arXiv:2508.12458, M3P-Score (DESIGN.md, "The four recipes"). For each example:

1. **Pool.** N candidates R_1..R_N sampled from the policy (param ``n``; §3.2 uses N = 32, the
   ``preset=paper`` value; 8 by default so that CPU builds stay small), each with
   log P_j = log π(R_j | x) (§3.4), the sum of its token log-probs as the sampler returned them.
   §3.2 samples with "nucleus sampling or top-p sampling with a moderate temperature" and gives
   no numbers: ``preset=paper`` uses temperature 0.7 and top-p 0.9 (our choice); the CPU default
   is temperature 1.0, top-p 1.0 (plain sampling, for a diverse pool from a tiny model). Seeded
   per example: the backend derives sample j's seed from (run seed, "m3po", example id, j), so
   pools never depend on batching or resume.
2. **MAS(R_j | I, Q)** (§3.3: visual relevance, semantic accuracy and instruction adherence,
   from "CLIP ViT-L/14 or BLIP-2 combined with GPT-4V"). Visual relevance: CLIPScore(I, R_j) =
   2.5·max(cos, 0) (Hessel et al., 2021, eq. 1) from the ``clip`` scorer, averaged over the
   example's images (``clip_text=question+answer`` scores the question and the answer
   together instead, a judge-free question-aware variant). The question-aware part is the LLM
   judge (role ``judge``, prompt ``prompts/m3po/judge.txt``, which sees the question Q, the
   answer and, when it takes images, the image, and is asked whether the answer is correct,
   grounded in the image and does what the question asks): with ``judge_weight`` w > 0,
   MAS = (1 − w)·CLIPScore + w·2.5·P(yes), P(yes) the judge's probability of "Yes" rather than
   "No" (both scored through the models protocol's ``score``), on CLIPScore's scale. The paper
   gives no mixing rule; ``preset=paper`` uses w = 0.5 (our choice). The CPU default (w = 0,
   CLIP on the answer alone) ignores Q: a documented deviation (benchmarks/fidelity.md).
3. **Selection** (:func:`select_pair`): chosen R_w = argmax MAS; rejected = argmax, over the
   distinct candidates whose MAS is below MAS_w, of the M3P-score
   S(R_j) = (MAS_w − MAS_j) − α·max(0, log P_w − log P_j − δ), α = 0.5, δ = 0.1: a clearly
   worse candidate that the policy is about as likely to produce as the chosen one (a
   confident mistake), not one it would rarely produce anyway.

Degenerate pools (fewer than two distinct non-empty candidates, or every distinct candidate
with the same MAS) are rejected with the reason. Each pair stores ``chosen_mas``,
``rejected_mas`` (the selection MAS, judge-mixed when the judge is on), ``chosen_logp``,
``rejected_logp`` and ``m3p_score``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, Request, SamplingParams, clip_score, require
from pairforge.recipes.base import BuildContext, Example, Outcome, Reject, pair_row, recipe_params
from pairforge.resources import read_prompt
from pairforge.schema import derive_seed, user_message

#: The LLM judge's prompt template (``prompts/m3po/judge.txt``; fields ``{question}``, ``{answer}``).
JUDGE_TEMPLATE = "m3po/judge.txt"
#: CLIPScore's w (Hessel et al., 2021): the judge's P(yes) is put on the same scale.
CLIPSCORE_W = 2.5


# ----------------------------------------------------------------------------- pure logic


def m3p_score(mas_w: float, mas_j: float, logp_w: float, logp_j: float, alpha: float = 0.5,
              delta: float = 0.1) -> float:
    """M3P-score of candidate j against the chosen w (Gao et al., 2025, arXiv:2508.12458):
    S(R_j) = (MAS_w − MAS_j) − α·max(0, log P_w − log P_j − δ)."""
    return (mas_w - mas_j) - alpha * max(0.0, logp_w - logp_j - delta)


class DegeneratePool(ValueError):
    """A candidate pool that yields no preference pair; the message is the reject reason."""


@dataclass(frozen=True)
class Selection:
    """Indices into the pool of the chosen and rejected candidates, and S(R_rejected)."""

    chosen: int
    rejected: int
    m3p_score: float


def select_pair(texts: Sequence[str], mas: Sequence[float], logp: Sequence[float], alpha: float = 0.5,
                delta: float = 0.1) -> Selection:
    """M3PO selection over one pool (Gao et al., 2025, arXiv:2508.12458, M3P-Score).

    Empty candidates are left out and duplicates count once (the first copy). chosen =
    argmax MAS; rejected = argmax of :func:`m3p_score` over the distinct candidates whose MAS is
    strictly below the chosen's (a tie is no preference). Ties go to the lower index. Raises
    :class:`DegeneratePool` when no pair exists."""
    if not len(texts) == len(mas) == len(logp):
        raise ValueError(f"select_pair: {len(texts)} texts, {len(mas)} MAS, {len(logp)} log-probs")
    seen: set[str] = set()
    distinct = []
    for j, t in enumerate(texts):
        key = t.strip()
        if key and key not in seen:
            seen.add(key)
            distinct.append(j)
    if len(distinct) < 2:
        n_empty = sum(not t.strip() for t in texts)
        what = f"{n_empty} empty, the rest identical" if n_empty else "all identical"
        raise DegeneratePool(f"degenerate pool: {len(distinct)} distinct non-empty candidate(s) "
                             f"of {len(texts)} ({what})")
    w = max(distinct, key=lambda j: (mas[j], -j))
    rest = [j for j in distinct if mas[j] < mas[w]]
    if not rest:
        raise DegeneratePool(f"degenerate pool: all {len(distinct)} distinct candidates have the "
                             f"same MAS ({mas[w]:.4f})")
    scores = {j: m3p_score(mas[w], mas[j], logp[w], logp[j], alpha, delta) for j in rest}
    r = max(rest, key=lambda j: (scores[j], -j))
    return Selection(w, r, scores[r])


# ----------------------------------------------------------------------------- recipe


#: ``preset=paper``: the paper's N = 32 (§3.2, §4.1) and α, δ (§4.1); temperature, top-p,
#: answer length and the judge's share of MAS are not given in the paper (our choices).
PAPER_PRESET: dict[str, Any] = {"n": 32, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 512,
                                "alpha": 0.5, "delta": 0.1, "judge_weight": 0.5, "clip_text": "answer"}
PRESETS = ("cpu", "paper")
CLIP_TEXTS = ("answer", "question+answer")


@dataclass(frozen=True)
class M3POParams:
    """``n`` candidates sampled at ``temperature`` and nucleus ``top_p`` (at most
    ``max_new_tokens`` each); M3P-score ``alpha`` and ``delta``; ``judge_weight`` of the LLM
    judge in MAS (0: off); ``clip_text``: what CLIP scores against the image (the answer, or
    the question and the answer). ``preset``: ``cpu`` (these defaults) or ``paper``
    (:data:`PAPER_PRESET`; parameters given explicitly override it)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    alpha: float = 0.5
    delta: float = 0.1
    judge_weight: float = 0.0
    clip_text: str = "answer"
    preset: str = "cpu"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise PairforgeError(f"m3po: preset={self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.clip_text not in CLIP_TEXTS:
            raise PairforgeError(f"m3po: clip_text={self.clip_text!r}; choose one of {', '.join(CLIP_TEXTS)}")
        if self.n < 2:
            raise PairforgeError(f"m3po: n={self.n}; a pool needs at least 2 candidates (paper: 32)")
        if self.temperature <= 0:
            raise PairforgeError(f"m3po: temperature={self.temperature}; sampling needs > 0 (paper: a "
                                 f"moderate temperature with nucleus sampling, no value given)")
        if not 0 < self.top_p <= 1:
            raise PairforgeError(f"m3po: top_p={self.top_p}; must be in (0, 1] (1 = no nucleus cut)")
        if self.max_new_tokens < 1:
            raise PairforgeError(f"m3po: max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.alpha < 0 or self.delta < 0:
            raise PairforgeError(f"m3po: alpha={self.alpha}, delta={self.delta}; both must be >= 0 "
                                 f"(paper: 0.5 and 0.1)")
        if not 0 <= self.judge_weight <= 1:
            raise PairforgeError(f"m3po: judge_weight={self.judge_weight}; must be in [0, 1] (0 = off)")


@dataclass
class Pool:
    """One example's candidates: texts, sum log-probs, CLIPScores, judge P(yes) (None when the
    judge is off) and the selection MAS (CLIPScore, judge-mixed when on). Empty candidates have
    NaN scores."""

    texts: list[str]
    logp: list[float]
    clip_mas: list[float]
    judge: list[float] | None
    mas: list[float]


class M3PO:
    """The M3PO recipe (module docstring). Roles: ``policy`` and ``clip`` required, ``judge``
    when ``judge_weight`` > 0."""

    name = "m3po"
    groups = ("m3po",)
    roles = (("policy", True, "tiny-vlm"), ("clip", True, "tiny-clip"), ("judge", False, None))

    def __init__(self, params: M3POParams | None = None):
        self.p = params or M3POParams()
        self._templates: dict[str, str] | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> M3PO:
        """Parameters over the preset's values (``preset=paper``: :data:`PAPER_PRESET`)."""
        base = dict(PAPER_PRESET) if str(params.get("preset", "cpu")) == "paper" else {}
        return cls(recipe_params(M3POParams, {**base, **params}, cls.name))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.p)

    def templates(self) -> dict[str, str]:
        """The judge's template when the judge is on (read once), else none."""
        if self.p.judge_weight <= 0:
            return {}
        if self._templates is None:
            self._templates = {JUDGE_TEMPLATE: read_prompt(*JUDGE_TEMPLATE.split("/"))}
        return self._templates

    def check(self, ctx: BuildContext) -> None:
        policy, clip = ctx.models.get("policy"), ctx.models.get("clip")
        if policy is None or clip is None:
            raise PairforgeError("m3po needs a policy VLM and a CLIP scorer (roles policy, clip)")
        require(policy, Capability.GENERATE, Capability.IMAGES, purpose="m3po candidate sampling")
        if self.p.judge_weight > 0:
            judge = ctx.models.get("judge")
            if judge is None:
                raise PairforgeError(f"m3po: judge_weight={self.p.judge_weight} needs a judge model; "
                                     f"pass one for role judge (e.g. smollm2) or set judge_weight=0")
            require(judge, Capability.SCORE, purpose="m3po LLM judge")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------------- pools

    def pools(self, examples: Sequence[Example], ctx: BuildContext) -> list[Pool | Reject]:
        """Each example's scored candidate pool, or a :class:`Reject` (no image)."""
        out: list[Pool | Reject | None] = [None] * len(examples)
        todo = []
        for i, ex in enumerate(examples):
            if not ex.images:
                out[i] = Reject("filter", "no image: MAS (CLIPScore of image and answer) needs one")
            else:
                todo.append(i)
        if not todo:
            return out  # type: ignore[return-value]
        sampling = SamplingParams(temperature=self.p.temperature, top_p=self.p.top_p,
                                  max_new_tokens=self.p.max_new_tokens, seed=derive_seed(ctx.seed, self.name))
        requests = [Request(examples[i].prompt_messages, examples[i].images, id=examples[i].id) for i in todo]
        samples = ctx.models["policy"].generate(requests, self.p.n, sampling)
        texts = [[c.text for c in cs] for cs in samples]
        clip_texts = texts if self.p.clip_text == "answer" else [
            [question_answer(examples[i].question, t) for t in ts] for i, ts in zip(todo, texts)]
        clip = mas_scores(ctx.models["clip"], [examples[i].images for i in todo], clip_texts)
        judge = (_judge_scores(ctx.models["judge"], self.templates()[JUDGE_TEMPLATE],
                               [examples[i] for i in todo], texts)
                 if self.p.judge_weight > 0 else None)
        w = self.p.judge_weight
        for k, i in enumerate(todo):
            mas = clip[k] if judge is None else [(1 - w) * c + w * CLIPSCORE_W * j
                                                 for c, j in zip(clip[k], judge[k])]
            out[i] = Pool(texts[k], [c.sum_logprob for c in samples[k]], clip[k],
                          judge[k] if judge is not None else None, mas)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------- process

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]:
        return [Outcome(reject=pool) if isinstance(pool, Reject) else self.select(ex, pool, ctx)
                for ex, pool in zip(examples, self.pools(examples, ctx))]

    def select(self, ex: Example, pool: Pool, ctx: BuildContext) -> Outcome:
        """The pair (or the reject) of one scored pool."""
        stats = {"candidates": float(len(pool.texts)),
                 "empty_candidates": float(sum(not t.strip() for t in pool.texts)),
                 "distinct_candidates": float(len({t.strip() for t in pool.texts if t.strip()}))}
        try:
            sel = select_pair(pool.texts, pool.mas, pool.logp, self.p.alpha, self.p.delta)
        except DegeneratePool as e:
            return Outcome(reject=Reject("select", str(e)), stats=stats)
        row = pair_row(self, ex, ctx, chosen=pool.texts[sel.chosen].strip(),
                       rejected=pool.texts[sel.rejected].strip(),
                       chosen_mas=pool.mas[sel.chosen], rejected_mas=pool.mas[sel.rejected],
                       chosen_logp=pool.logp[sel.chosen], rejected_logp=pool.logp[sel.rejected],
                       m3p_score=sel.m3p_score)
        return Outcome(rows=[row], stats=stats)


# ----------------------------------------------------------------------------- model calls


def question_answer(question: str, answer: str) -> str:
    """The text CLIP scores with ``clip_text=question+answer`` ("" for an empty answer, which
    stays unscored)."""
    return f"{question.strip()} {answer.strip()}".strip() if answer.strip() else ""


def mas_scores(clip, images: Sequence[Sequence[Any]], texts: Sequence[Sequence[str]]) -> list[list[float]]:
    """MAS from CLIP: CLIPScore of each text of ``texts[k]`` against the images ``images[k]``
    (mean over the images), in one ``cosine`` call; NaN for an empty text."""
    pairs = [(k, j, im, t) for k, (ims, ts) in enumerate(zip(images, texts))
             for j, t in enumerate(ts) if t.strip() for im in ims]
    cos = clip.cosine([p[2] for p in pairs], [p[3].strip() for p in pairs]) if pairs else []
    sums = [[0.0] * len(ts) for ts in texts]
    for (k, j, _, _), c in zip(pairs, cos):
        sums[k][j] += clip_score(float(c))
    return [[s / len(ims) if t.strip() else math.nan for s, t in zip(row, ts)]
            for row, ims, ts in zip(sums, images, texts)]


def _judge_scores(judge, template: str, examples: Sequence[Example],
                  texts: Sequence[Sequence[str]]) -> list[list[float]]:
    """The judge's P(yes) = 1 / (1 + exp(log p(No) − log p(Yes))) for each candidate, from one
    ``score`` call; the judge sees the image when it takes images. NaN for an empty candidate."""
    sees_images = Capability.IMAGES in judge.capabilities
    requests, responses, where = [], [], []
    for k, (ex, ts) in enumerate(zip(examples, texts)):
        images = list(ex.images) if sees_images else []
        for j, t in enumerate(ts):
            if not t.strip():
                continue
            text = template.format(question=ex.question, answer=t.strip())
            req = Request([user_message(text, n_images=len(images))], images, id=f"{ex.id}/judge/{j}")
            requests += [req, req]
            responses += ["Yes", "No"]
            where.append((k, j))
    scored = judge.score(requests, responses) if requests else []
    out = [[math.nan] * len(ts) for ts in texts]
    for n, (k, j) in enumerate(where):
        yes, no = scored[2 * n].sum_logprob, scored[2 * n + 1].sum_logprob
        out[k][j] = 1.0 / (1.0 + math.exp(min(no - yes, 700.0)))
    return out
