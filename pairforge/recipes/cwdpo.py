"""CW-DPO: on-policy negatives with their mean token log-prob, for cooling-weighted DPO.

Zhang, Cai, Yang, Wang & Wang, "Dynamics-Aware Preference Optimization for Vision-Language
Models", CVPR 2026 (the CVPR 2026 version of arXiv:2510.11978), §4, Eqs. 4.1–4.6, Alg. 1.
The trainer scales each negative's DPO term by the cooling weight
w_c = σ((ℓ̄ − ℓ_floor)/τ) (Eq. 4.4), where ℓ̄ is the policy's mean token log-prob of the negative;
this recipe makes the pairs and stores ℓ̄ (``rejected_mean_logp``) and the token count
(``rejected_n_tokens``). For each example:

1. **Sample** k answers from the policy (param ``k``), temperature 1, seeded per example (the
   backend derives sample j's seed from (run seed, "cwdpo", example id, j)).
2. **Grade** them (:func:`grade_answer`). Rule: ground truth when the source has it (a
   ``target`` in ``example.meta``, as the shapes world has: :func:`pairforge.world.grade`);
   otherwise the CLIP scorer against the dataset answer (:func:`grade_by_mas`): wrong when
   its CLIPScore is at least ``mas_margin`` below the dataset answer's, correct when it is not
   below it, undecided in between. Unparseable and undecided answers are never used.
3. **Chosen**: the dataset answer (``chosen="dataset"``), or the correct policy answer with the
   highest ℓ̄ (``chosen="policy"``; the dataset answer when no sample is correct, counted).
4. **Negatives**: the distinct wrong samples, plus — with ``dataset_negative_share`` s > 0 —
   dataset negatives: answers of earlier examples of the same task (source order, a bounded
   pool per task) that grade wrong for this example, about s/(1 − s) per on-policy negative
   (stochastic rounding from the example's own random stream), so that s is the expected share
   of dataset negatives; their ℓ̄ comes from the policy's ``score``.
5. **Easy-negative filter**: a negative with ℓ̄ < ℓ_floor − ``easy_margin`` is dropped and
   counted (``easy_negatives`` in ``Outcome.stats``): its cooling weight would be below
   σ(−easy_margin/τ), an uninformative gradient (the paper's "easy or off-distribution"
   negatives).
6. **Stages** (:func:`cwdpo_stage`): each example goes, by a hash of its id alone, to Stage 1
   (share ``stage1_share``) or Stage 2. A Stage-1 example yields its ``gentle_negatives``
   highest-ℓ̄ negatives for SFT-C (supervised finetuning with low-weight gentle negatives);
   a Stage-2 example yields one DPO pair per kept negative. Column ``cwdpo_stage`` is 1 or 2.

**The cooling weight's ℓ_floor and τ come from the run** (:meth:`CWDPO.run_pass`, fitted when
the build finishes, :func:`cooling_calibration`): the paper gives no numbers (§4.2, and §6 says
they "may require tuning per dataset"), and fixed ones sit outside the data — with ℓ_floor = −3,
τ = 0.5 and the world's negatives at ℓ̄ ∈ [−1.18, −0.35], w_c ∈ [0.974, 0.995], i.e. plain DPO.
Ours: ℓ_floor = the lower quartile of the Stage-2 negatives' ℓ̄ and τ = IQR / ln 9, so
w_c = 0.5 at the lower quartile and 0.9 at the upper one; SFT-C's C (Eq. 4.2, also paper
silent) = the Stage-1 negatives' mean sequence NLL −ℓ̄·n under the build's policy, so the hinge
keeps SFT on the positives from making the gentle negatives likelier than they were. The
build's ``summary.json`` records ``cooling_floor``, ``cooling_tau``, ``sftc_margin`` (and the
w_c quantiles they give its negatives); ``pairforge train --loss cwdpo`` recomputes them from the
same columns by default.

Defaults and where they come from:

- ``k = 8``: CPU-sized pool, the same as M3PO's ``n``;
- ``dataset_negative_share = 0``: the paper emphasises on-policy negatives and mixes a
  "controllable fraction" of dataset negatives; off unless asked for;
- ``l_floor = −3.0`` nats/token (perplexity e³ ≈ 20) and ``easy_margin = 2.0``: the easy-negative
  filter (§5.4 "Negative Filtering": ℓ̄ ≪ ℓ_floor, no number) drops a negative whose per-token
  perplexity exceeds e⁵ ≈ 148, i.e. the policy would essentially never produce it. This is an
  absolute bound applied per example, not the run-fitted cooling floor above (our choice: the
  fitted floor is only known when the run ends);
- ``stage1_share = 0.75``: the paper's split (§5.1: constrained SFT on 75 % of the data,
  preference alignment on the remaining 25 %);
- ``gentle_negatives = 1``, ``mas_margin = 0.1`` (CLIPScore units, of 2.5), ``pool_size = 256``:
  pairforge's choices (paper silent).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, Request, SamplingParams, require
from pairforge.recipes.base import BuildContext, Example, Outcome, Reject, RunPass, pair_row, recipe_params
from pairforge.recipes.m3po import mas_scores
from pairforge.schema import derive_seed

CHOSEN_SOURCES = ("dataset", "policy")


# ----------------------------------------------------------------------------- pure logic


def has_ground_truth(meta: Mapping[str, Any]) -> bool:
    """Whether ``meta`` carries a gradable target (the shapes world's ``target``)."""
    target = meta.get("target")
    return isinstance(target, Mapping) and bool(target.get("attribute"))


def grade_answer(meta: Mapping[str, Any], answer: str) -> str:
    """``"correct"`` | ``"wrong"`` | ``"unparseable"`` against the ground truth in ``meta``."""
    from pairforge.world.grader import grade

    return grade(meta, answer)


def grade_by_mas(mas_answer: float, mas_reference: float, margin: float) -> str:
    """Grading without ground truth: ``"wrong"`` when the answer's CLIPScore is at least
    ``margin`` below the reference answer's, ``"correct"`` when it is not below it,
    ``"undecided"`` in between."""
    if mas_answer <= mas_reference - margin:
        return "wrong"
    return "correct" if mas_answer >= mas_reference else "undecided"


def is_too_easy(mean_logp: float, l_floor: float, margin: float) -> bool:
    """A negative too easy to learn from: ℓ̄ < ℓ_floor − margin (its cooling weight
    σ((ℓ̄ − ℓ_floor)/τ) would be below σ(−margin/τ))."""
    return mean_logp < l_floor - margin


def cwdpo_stage(example_id: str, stage1_share: float) -> int:
    """1 (SFT-C with gentle negatives) or 2 (cooling-weighted DPO), from a hash of the example
    id alone: the same example lands in the same stage in every build, whatever the seed."""
    u = derive_seed("cwdpo-stage", example_id) / 2.0**63
    return 1 if u < stage1_share else 2


def n_dataset_negatives(n_on_policy: int, share: float, u: float) -> int:
    """How many dataset negatives to add to ``n_on_policy`` on-policy ones so that ``share`` is
    their expected share: x = share/(1 − share)·n_on_policy, rounded down or up with
    probability equal to its fraction (``u`` uniform in [0, 1)). With no on-policy negative, one
    dataset negative with probability ``share`` (the example still yields a pair)."""
    if share <= 0:
        return 0
    if n_on_policy == 0:
        return int(u < share)
    x = share / (1.0 - share) * n_on_policy
    return int(math.floor(x)) + int(u < x - math.floor(x))


#: Quantiles of the Stage-2 negatives' ℓ̄ that set ℓ_floor and τ (module docstring; our choice).
COOLING_QUANTILES = (0.25, 0.75)


def cooling_calibration(mean_logps: Sequence[float | None], n_tokens: Sequence[int | None],
                        stages: Sequence[int | None]) -> dict[str, Any]:
    """ℓ_floor and τ of the cooling weight (Eq. 4.4) and C of SFT-C (Eq. 4.2) from the data
    (the paper gives no numbers; module docstring): with q25, q75 the quartiles of the Stage-2
    negatives' ℓ̄ (``stages`` 2 or None), ℓ_floor = q25 and τ = (q75 − q25) / ln 9, so
    σ((q25 − ℓ_floor)/τ) = 0.5 and σ((q75 − ℓ_floor)/τ) = 0.9 (τ from the standard deviation
    when the quartiles tie); C = the mean sequence NLL −ℓ̄·n of the Stage-1 negatives
    (``sftc_margin``) and its per-token form, the mean −ℓ̄ (``sftc_margin_token``). A value
    the data cannot give (no negatives, one value) is None. Pure: the build and the trainer
    call it on the same columns and get the same numbers."""
    neg = np.array([l for l, st in zip(mean_logps, stages) if st in (2, None) and l is not None
                    and math.isfinite(l)], dtype=np.float64)
    s1 = [(l, n) for l, n, st in zip(mean_logps, n_tokens, stages)
          if st == 1 and l is not None and math.isfinite(l) and n]
    floor = tau = None
    if neg.size >= 2:
        q_lo, q_hi = np.quantile(neg, COOLING_QUANTILES)
        spread = (q_hi - q_lo) if q_hi > q_lo else float(neg.std())
        if spread > 0:
            floor, tau = float(q_lo), float(spread / math.log(9.0))
    out = {"cooling_floor": floor, "cooling_tau": tau, "cooling_n": int(neg.size),
           "sftc_margin": float(np.mean([-l * n for l, n in s1])) if s1 else None,
           "sftc_margin_token": float(np.mean([-l for l, _ in s1])) if s1 else None,
           "sftc_n": len(s1)}
    if floor is not None:  # the spread of w_c these give the build's own negatives
        w = 1.0 / (1.0 + np.exp(-(neg - floor) / tau))
        for q in (5, 50, 95):
            out[f"cooling_weight_p{q:02d}"] = float(np.percentile(w, q))
    return out


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class CWDPOParams:
    """Recipe settings (defaults and sources: module docstring)."""

    k: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    chosen: str = "dataset"
    dataset_negative_share: float = 0.0
    l_floor: float = -3.0
    easy_margin: float = 2.0
    stage1_share: float = 0.75
    gentle_negatives: int = 1
    mas_margin: float = 0.1
    pool_size: int = 256

    def __post_init__(self):
        if self.k < 1:
            raise PairforgeError(f"cwdpo: k={self.k}; sample at least one answer per example")
        if self.temperature <= 0:
            raise PairforgeError(f"cwdpo: temperature={self.temperature}; sampling needs > 0")
        if self.max_new_tokens < 1:
            raise PairforgeError(f"cwdpo: max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.chosen not in CHOSEN_SOURCES:
            raise PairforgeError(f"cwdpo: chosen={self.chosen!r}; use one of {', '.join(CHOSEN_SOURCES)}")
        if not 0 <= self.dataset_negative_share < 1:
            raise PairforgeError(f"cwdpo: dataset_negative_share={self.dataset_negative_share}; "
                                 f"must be in [0, 1) (on-policy negatives stay in the mix)")
        if self.easy_margin < 0:
            raise PairforgeError(f"cwdpo: easy_margin={self.easy_margin}; must be >= 0")
        if not 0 <= self.stage1_share <= 1:
            raise PairforgeError(f"cwdpo: stage1_share={self.stage1_share}; must be in [0, 1]")
        if self.gentle_negatives < 1:
            raise PairforgeError(f"cwdpo: gentle_negatives={self.gentle_negatives}; must be >= 1")
        if self.mas_margin < 0 or self.pool_size < 1:
            raise PairforgeError(f"cwdpo: mas_margin={self.mas_margin}, pool_size={self.pool_size}; "
                                 f"need mas_margin >= 0 and pool_size >= 1")


@dataclass
class Negative:
    """A rejected candidate: its text, ℓ̄ and token count under the policy, and its origin."""

    text: str
    mean_logp: float
    n_tokens: int
    source: str  # "policy" | "dataset"


@dataclass
class Sampled:
    """One example after sampling and grading: the chosen answer, the negatives before the
    easy filter, and counters."""

    chosen: str
    negatives: list[Negative]
    stats: dict[str, float]


class CWDPO:
    """The CW-DPO recipe (module docstring). Roles: ``policy`` required; ``clip`` for sources
    without ground truth."""

    name = "cwdpo"
    groups = ("cwdpo",)
    roles = (("policy", True, "tiny-vlm"), ("clip", False, "tiny-clip"))

    def __init__(self, params: CWDPOParams | None = None):
        self.p = params or CWDPOParams()
        self._pools: dict[str, deque[str]] = {}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CWDPO:
        return cls(recipe_params(CWDPOParams, params, cls.name))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.p)

    def templates(self) -> dict[str, str]:
        return {}

    def check(self, ctx: BuildContext) -> None:
        policy = ctx.models.get("policy")
        if policy is None:
            raise PairforgeError("cwdpo needs a policy model (role policy)")
        require(policy, Capability.GENERATE, purpose="cwdpo on-policy negatives")
        if self.p.dataset_negative_share > 0:
            require(policy, Capability.SCORE, purpose="cwdpo: ℓ̄ of dataset negatives")

    def run_pass(self) -> RunPass:
        """Pass two: no row is dropped; :func:`cooling_calibration` is fitted on every row's ℓ̄,
        token count and stage and recorded in ``summary.json`` (``cooling_floor``,
        ``cooling_tau``, ``sftc_margin``, ...)."""
        cols = ("rejected_mean_logp", "rejected_n_tokens", "cwdpo_stage")
        return RunPass(columns=cols, group=None,
                       fit=lambda v: cooling_calibration(*(v[c] for c in cols)))

    def state_dict(self) -> dict[str, Any]:
        """The dataset-negative pools (answers of earlier examples, per task, source order)."""
        return {"pools": {task: list(answers) for task, answers in self._pools.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pools = {task: deque(answers, maxlen=self.p.pool_size)
                       for task, answers in (state.get("pools") or {}).items()}

    # ------------------------------------------------------------------------- sampling

    def sample(self, examples: Sequence[Example], ctx: BuildContext) -> list[Sampled | Reject]:
        """Sample, grade and collect the negatives of each example (before the easy filter);
        updates the dataset-negative pools in source order."""
        out: list[Sampled | Reject | None] = [None] * len(examples)
        todo = []
        for i, ex in enumerate(examples):
            if not ex.answer.strip():
                out[i] = Reject("filter", "no reference answer (last message is not an assistant turn)")
            elif not has_ground_truth(ex.meta) and (ctx.models.get("clip") is None or not ex.images):
                out[i] = Reject("grade", "no ground truth in meta['target'] and no CLIP scorer with an "
                                         "image to grade by; pass --clip or use a source with ground truth")
            else:
                todo.append(i)
        if not todo:
            return out  # type: ignore[return-value]
        policy = ctx.models["policy"]
        sampling = SamplingParams(temperature=self.p.temperature, max_new_tokens=self.p.max_new_tokens,
                                  seed=derive_seed(ctx.seed, self.name))
        requests = [Request(examples[i].prompt_messages, examples[i].images, id=examples[i].id) for i in todo]
        samples = policy.generate(requests, self.p.k, sampling)
        grades = self._grade(ctx, [examples[i] for i in todo], [[c.text for c in cs] for cs in samples])

        wanted: list[tuple[int, str]] = []  # (position in todo, dataset negative) to score
        for k, i in enumerate(todo):  # source order: pools see only earlier examples
            ex, cs, gs = examples[i], samples[k], grades[k]
            stats = {"samples": float(len(cs))}
            for g in ("correct", "wrong", "unparseable", "undecided"):
                stats[f"graded_{g}"] = float(sum(x == g for x in gs))
            chosen = ex.answer.strip()
            if self.p.chosen == "policy":
                right = [c for c, g in zip(cs, gs) if g == "correct" and c.text.strip() and c.n_tokens]
                if right:
                    chosen = max(right, key=lambda c: c.mean_logprob).text.strip()
                else:
                    stats["chosen_fallback_dataset"] = 1.0
            seen = {_norm(chosen)}
            negatives = []
            stats["duplicate_negatives"] = 0.0
            for c, g in zip(cs, gs):  # an empty sample grades unparseable, so wrong ones have tokens
                if g != "wrong":
                    continue
                if _norm(c.text) in seen:
                    stats["duplicate_negatives"] += 1
                    continue
                seen.add(_norm(c.text))
                negatives.append(Negative(c.text.strip(), c.mean_logprob, c.n_tokens, "policy"))
            n_ds = n_dataset_negatives(len(negatives), self.p.dataset_negative_share,
                                       ctx.rng(ex, "cwdpo-dataset-negatives").random())
            if n_ds:
                picked = self._dataset_negatives(ex, ctx, seen, n_ds)
                stats["dataset_negatives_short"] = float(n_ds - len(picked))
                wanted += [(k, t) for t in picked]
            task = ex.task or "unknown"
            self._pools.setdefault(task, deque(maxlen=self.p.pool_size)).append(ex.answer.strip())
            out[i] = Sampled(chosen, negatives, stats)
        if wanted:
            scored = policy.score([requests[k] for k, _ in wanted], [t for _, t in wanted])
            for (k, t), s in zip(wanted, scored):
                if s.n_tokens:
                    out[todo[k]].negatives.append(Negative(t, s.mean_logprob, s.n_tokens, "dataset"))
        return out  # type: ignore[return-value]

    def _grade(self, ctx: BuildContext, examples: Sequence[Example], texts: Sequence[Sequence[str]]) -> list[list[str]]:
        """Grades of each example's samples: ground truth when present, else CLIP vs the
        dataset answer (one ``cosine`` call for all such examples)."""
        grades: list[list[str] | None] = [None] * len(examples)
        by_clip = []
        for k, (ex, ts) in enumerate(zip(examples, texts)):
            if has_ground_truth(ex.meta):
                grades[k] = [grade_answer(ex.meta, t) if t.strip() else "unparseable" for t in ts]
            else:
                by_clip.append(k)
        if by_clip:
            mas = mas_scores(ctx.models["clip"], [examples[k].images for k in by_clip],
                       [[examples[k].answer.strip(), *texts[k]] for k in by_clip])
            for k, m in zip(by_clip, mas):
                grades[k] = [grade_by_mas(x, m[0], self.p.mas_margin) if t.strip() else "unparseable"
                             for x, t in zip(m[1:], texts[k])]
        return grades  # type: ignore[return-value]

    def _dataset_negatives(self, ex: Example, ctx: BuildContext, seen: set[str], n: int) -> list[str]:
        """Up to ``n`` answers of earlier examples of the same task that grade wrong for ``ex``
        (and differ from everything already taken), drawn from ``ex``'s own random stream."""
        pool = [a for a in dict.fromkeys(self._pools.get(ex.task or "unknown", ())) if _norm(a) not in seen]
        if not pool:
            return []
        if has_ground_truth(ex.meta):
            ok = [a for a in pool if grade_answer(ex.meta, a) == "wrong"]
        else:
            mas = mas_scores(ctx.models["clip"], [ex.images], [[ex.answer.strip(), *pool]])[0]
            ok = [a for a, x in zip(pool, mas[1:]) if grade_by_mas(x, mas[0], self.p.mas_margin) == "wrong"]
        picked = ctx.rng(ex, "cwdpo-dataset-pick").sample(ok, min(n, len(ok)))
        seen.update(_norm(a) for a in picked)
        return picked

    # ------------------------------------------------------------------------- process

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]:
        return [Outcome(reject=s) if isinstance(s, Reject) else self.select(ex, s, ctx)
                for ex, s in zip(examples, self.sample(examples, ctx))]

    def select(self, ex: Example, s: Sampled, ctx: BuildContext) -> Outcome:
        """The easy filter, the stage and the pair rows of one sampled example."""
        stats = dict(s.stats)
        kept = [n for n in s.negatives if not is_too_easy(n.mean_logp, self.p.l_floor, self.p.easy_margin)]
        stats["easy_negatives"] = float(len(s.negatives) - len(kept))
        stats["dataset_negatives"] = float(sum(n.source == "dataset" for n in kept))
        stage = cwdpo_stage(ex.id, self.p.stage1_share)
        if stage == 1:  # gentle negatives for SFT-C: the ones the policy finds most plausible
            kept = sorted(kept, key=lambda n: -n.mean_logp)[:self.p.gentle_negatives]
        if not kept:
            return Outcome(reject=Reject("select", _no_negative_reason(stats, self.p)), stats=stats)
        stats[f"stage{stage}_pairs"] = float(len(kept))
        rows = [pair_row(self, ex, ctx, chosen=s.chosen, rejected=n.text, rejected_mean_logp=n.mean_logp,
                         rejected_n_tokens=n.n_tokens, cwdpo_stage=stage) for n in kept]
        return Outcome(rows=rows, stats=stats)


def _no_negative_reason(stats: Mapping[str, float], p: CWDPOParams) -> str:
    g = {k: int(stats.get(f"graded_{k}", 0)) for k in ("correct", "wrong", "unparseable", "undecided")}
    return (f"no usable negative among k={p.k} samples: {g['correct']} correct, {g['wrong']} wrong "
            f"({int(stats.get('duplicate_negatives', 0))} duplicates, {int(stats['easy_negatives'])} too easy: "
            f"ℓ̄ < {p.l_floor - p.easy_margin:g}), {g['unparseable'] + g['undecided']} ungraded")

