"""Recipe benchmark on the offline world: does training on each recipe's pairs help, and does
each paper's mechanism matter? An experiment with paired statistics and the papers' ablations.

    python scripts/bench_recipes.py --threads 2                          # full run (see Budget)
    python scripts/bench_recipes.py --quick --threads 2                  # reduced run, ≤ 20 min
    python scripts/bench_recipes.py --smoke                              # seconds, random tiny LLaVA
    python scripts/bench_recipes.py --readme-from benchmarks/recipes.json   # README table from the json

With one budget for every set (the same optimizer steps, pairs per step, LoRA settings,
learning rate and schedule), the tiny VLM is trained on each *set* and evaluated on the same
held-out questions as the base model:

- the recipes VaPR, M3PO (n = ``--samples`` candidates, stated in the table), P2-DPO (built with
  ``noise_sigma=0.3``: at the default σ = 0.2 most robust pairs have identical answers on this
  world), CW-DPO (k = ``--samples``), all built by the build engine from the same ``shapes``
  train-split examples (``shapes:train?n=N``; the model-based recipes with ``--model`` as policy);
- ASPO on a *caption-heavy* subset: world captions of ``--n-captions`` fresh train-split scenes,
  each extended to several sentences (the caption, the background, one content-free sentence,
  :func:`caption_heavy_answer`), made into minimal-edit pairs by VaPR's rule editor, then
  annotated by the ASPO recipe (ASPO equals DPO on one-sentence answers, and 97% of the world's
  answers are one sentence);
- two controls built here from the train examples: ``random-negative`` (chosen = the reference
  answer, rejected = the reference answer of another example of the same task with a different
  text: it may still be right, "rejected wrong" says how often it is not) and ``length-biased``
  (chosen = the answer + one content-free sentence of :data:`CLAUSES`, rejected = its first ⌈w/2⌉
  words: length alone separates the pairs). Like VaPR they skip the world's filter examples.

**Ablations** (:data:`ABLATIONS`), each on the same pairs and budget as its full method; train-time
switches reuse the full method's build, the build-time ones (VaPR's penalty lists, M3PO's α,
CW-DPO's easy-negative filter) are one more build from the same examples and seed:
CW-DPO vs plain DPO on its Stage-2 pairs, with w_c fixed at 1 (``cooling_floor=-1e9``: σ(≈1e9) = 1
exactly), without the easy-negative filter (``easy_margin=1e9``), without Stage 1
(``cw_stage1_epochs=0``, every step on Stage 2); P2-DPO without the calibration term
(``lambda_calib=0``), with DDW fixed at 0.5/0.5, focus pairs only, robust pairs only; M3PO with
α = 0 (the M3P-score without its log-prob penalty); VaPR without penalty lists
(``penalty_top_k=0``); ASPO's caption pairs trained with plain DPO. DDW-fixed, focus-only,
robust-only (each pair keeping its stored DDW weight) and plain DPO on Stage-2 rows are *views* of the full method's build (the same rows,
a column set or rows left out), written once under ``--work``.

Budget: ``--steps`` optimizer steps of ``--batch-size`` pairs. P2-DPO's trainer counts *samples*
(I, P), each with up to two pairs (a focus and a robust one, Eq. 8), so P2-DPO and its ablations
train on ⌈batch/2⌉ samples per step (about ``--batch-size`` pairs for the full method, half of it
for focus-only and robust-only: same samples, fewer pairs). CW-DPO spends :data:`CW_STAGE1_SHARE`
of the steps on Stage 1 (SFT-C) and the rest on Stage 2. The seeds vary the training only (batch
order, LoRA init); the pairs are built once (build seed 0). Builds are kept under ``--work`` and
reused when nothing changed.

Measured on the held-out test split (the first ``--n-eval`` non-filter questions of
``shapes:test``; the same questions for the base model and every run), greedy decoding:

- **Δ accuracy** (after − before, graded by :func:`pairforge.world.grade`; "unparseable" is not
  correct) with a **paired 95% interval**: a two-level bootstrap that resamples the questions
  (the same resample for the base and the set) and the training seeds
  (:func:`paired_bootstrap_delta`); the per-seed Δs and their sd are reported too;
- **McNemar's exact test** against the base model (:func:`mcnemar_exact`) on the seeds' majority
  vote per question (one paired answer per question; the per-seed p values are in the json);
- ablations: the same statistics against their full method, seed by seed (same training seed);
- accuracy per task category (Δ per category, mean over seeds), **ECE** before and after (10
  equal-width bins of c = exp(mean token log-prob) of the greedy answer; Guo et al. 2017 eq. 3),
  **reward accuracy** from the trainer's log (share of a step's pairs with chosen reward >
  rejected reward; mean over the first and the last 20% of the preference-stage steps, and the
  whole curve, plotted); the audit flags of every set (``pairforge audit`` text metrics).

A set or ablation that cannot be imported, built or trained is reported as "not run: <reason>".
Writes ``--out-dir``/recipes.md, recipes.json, recipes_delta.png and recipes_reward.png (default
``benchmarks/``; ``--quick``/``--smoke`` write under ``--work`` unless ``--out-dir`` is given) after
every run, so a cut-off run keeps what it measured.

Time (an *estimate*, from per-run timings measured at small size with the current shipped models;
rerun it with the retrained models). Measured on the shared 2-core machine at load 3.5-4, one
thread, ``nice -n 19``: building VaPR from 96 examples 4 s, P2-DPO 77 s, ASPO's 32 caption pairs
4 s; evaluating 200 questions 11-12 s; 16 steps × 8 pairs of DPO 15 s (a whole run with model
loading and merging ≈ 30 s), of P2-DPO (4 samples per step) 41 s (≈ 75 s a run), of ASPO 23 s
(≈ 40 s a run). The old benchmark on a quiet machine (load 0.7, one thread) gave 60 DPO steps in
≈ 20 s and 300 questions in ≈ 7 s. From these:

- ``--quick`` (7 sets + 5 train-time ablations, 2 seeds, 12 steps, 200 questions, 96 examples):
  ≈ 17 min at that load on one thread, less with ``--threads 2``: within the 20 minutes;
- the full mode (7 sets + 11 ablations, 3 seeds, 60 steps, 1000 questions, 300 examples): about
  60 min on one quiet thread (≈ 50 s a DPO-type run, 85 s a P2-DPO run, 5 min of builds), about
  twice that on the shared machine; ``--threads 2`` on a quiet machine should bring it under the
  issue's 90 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pairforge.errors import PairforgeError  # noqa: E402
from pairforge.schema import derive_seed, make_pair, stable_id  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTROLS = ("random-negative", "length-biased")
#: Recipes that cannot run without a CLIP model (M3PO's MAS, P2-DPO's DDW, ASPO's similarities).
NEEDS_CLIP = ("m3po", "p2dpo", "aspo")


@dataclass(frozen=True)
class BuildSpec:
    """A pair set to build: a recipe (or control) with parameters, from a source: ``train``
    (``shapes:train?n=N``), ``captions`` (the caption-heavy subset) or ``build:NAME`` (the pairs
    of another build, for ASPO's annotation)."""

    recipe: str
    params: tuple[tuple[str, Any], ...] = ()
    source: str = "train"


@dataclass(frozen=True)
class Variant:
    """One row of a table: a build trained with a loss and train-time switches. ``of``: the
    full method an ablation is compared with; ``view``: rows of the build used (``stage2``,
    ``focus``, ``robust``) or a column fixed (``ddw-fixed``)."""

    name: str
    build: str
    loss: str
    of: str = ""
    what: str = ""
    train: tuple[tuple[str, Any], ...] = ()
    view: str = ""


#: Build-time parameters the recipes get from this benchmark; ``samples`` = ``--samples``.
BUILDS: dict[str, BuildSpec] = {
    "vapr": BuildSpec("vapr"),
    "vapr-no-penalty": BuildSpec("vapr", (("penalty_top_k", 0),)),
    "m3po": BuildSpec("m3po", (("n", "samples"),)),
    "m3po-alpha0": BuildSpec("m3po", (("n", "samples"), ("alpha", 0.0))),
    "p2dpo": BuildSpec("p2dpo", (("noise_sigma", 0.3),)),
    "cwdpo": BuildSpec("cwdpo", (("k", "samples"),)),
    "cwdpo-no-easy-filter": BuildSpec("cwdpo", (("k", "samples"), ("easy_margin", 1e9))),
    "caption-vapr": BuildSpec("vapr", source="captions"),
    "aspo": BuildSpec("aspo", source="build:caption-vapr"),
    "random-negative": BuildSpec("random-negative"),
    "length-biased": BuildSpec("length-biased"),
}
MAIN: tuple[Variant, ...] = (
    Variant("vapr", "vapr", "dpo", what="VaPR pairs, DPO"),
    Variant("m3po", "m3po", "dpo", what="M3PO pairs (α = 0.5), DPO"),
    Variant("p2dpo", "p2dpo", "p2dpo", what="P2-DPO pairs, P2-DPO loss (calibration + DDW)"),
    Variant("cwdpo", "cwdpo", "cwdpo", what="CW-DPO pairs, Stage 1 SFT-C + cooling-weighted DPO"),
    Variant("aspo", "aspo", "aspo", what="caption-heavy pairs, ASPO loss (per-step sentence weights)"),
    Variant("random-negative", "random-negative", "dpo", what="control, DPO"),
    Variant("length-biased", "length-biased", "dpo", what="control, DPO"),
)
ABLATIONS: tuple[Variant, ...] = (
    Variant("cwdpo/plain-dpo", "cwdpo", "dpo", "cwdpo", "plain DPO on CW-DPO's Stage-2 pairs (no Stage 1, w_c = 1)",
            view="stage2"),
    Variant("cwdpo/wc=1", "cwdpo", "cwdpo", "cwdpo", "w/o Cooling Weight (Table 3): w_c fixed at 1.0",
            train=(("cooling_floor", -1e9), ("cooling_tau", 1.0))),
    Variant("cwdpo/no-easy-filter", "cwdpo-no-easy-filter", "cwdpo", "cwdpo",
            "w/o Negative Filtering (Table 3): easy negatives kept (build)"),
    Variant("cwdpo/no-stage1", "cwdpo", "cwdpo", "cwdpo", "w/o Smooth SFT (Table 3): no Stage 1, every step on Stage 2",
            train=(("cw_stage1_epochs", 0.0),)),
    Variant("p2dpo/no-calibration", "p2dpo", "p2dpo", "p2dpo", "w/o L_Calib (Table 4): λ_calib = 0",
            train=(("lambda_calib", 0.0),)),
    Variant("p2dpo/ddw=0.5", "p2dpo", "p2dpo", "p2dpo", "w/o DDW (Table 4): w_focus = w_robust = 0.5",
            view="ddw-fixed"),
    Variant("p2dpo/focus-only", "p2dpo", "p2dpo", "p2dpo", "w/o VRPs (Table 4): focus pairs only", view="focus"),
    Variant("p2dpo/robust-only", "p2dpo", "p2dpo", "p2dpo", "w/o FEPs (Table 4): robust pairs only",
            view="robust"),
    Variant("m3po/alpha=0", "m3po-alpha0", "dpo", "m3po", "w/o Conf. Term (Table 3): α = 0 (build)"),
    Variant("vapr/no-penalty-lists", "vapr-no-penalty", "dpo", "vapr", "without penalty lists (build: penalty_top_k=0)"),
    Variant("aspo/dpo", "aspo", "dpo", "aspo", "standard DPO (Table 5) on the same caption pairs"),
)
VARIANTS = {v.name: v for v in (*MAIN, *ABLATIONS)}
SMOKE_SETS = ("vapr", "length-biased")
#: --quick: every main set and the train-time ablations that fit in 20 minutes (no extra build), 2 seeds.
QUICK_ABLATIONS = ("cwdpo/plain-dpo", "cwdpo/wc=1", "cwdpo/no-stage1", "p2dpo/no-calibration", "aspo/dpo")
#: Share of the optimizer steps CW-DPO spends on Stage 1 (SFT-C).
CW_STAGE1_SHARE = 0.25
#: Content-free sentences (world vocabulary only) that the length-biased control appends.
CLAUSES = (
    "I can see this in the image.",
    "This is what the picture shows.",
    "That is what I see in the scene.",
    "You can see it in the picture.",
)
N_BINS = 10
EARLY_SHARE = 0.2
BOOTSTRAP = 2000
#: README markers of the table that ``--readme-from`` rewrites.
README_START = "<!-- bench_recipes table: start (python scripts/bench_recipes.py --readme-from benchmarks/recipes.json) -->"
README_END = "<!-- bench_recipes table: end -->"

# ============================================================================ pure logic


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               n_bins: int = N_BINS) -> float:
    """ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)| over ``n_bins`` equal-width confidence
    bins (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural Networks",
    eq. 3). Bin b holds confidences in (b/n, (b+1)/n]; bin 0 also holds 0. NaN when empty."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness labels")
    if not confidences:
        return math.nan
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0 or math.isnan(c):
            raise ValueError(f"confidence {c} is outside [0, 1]")
        bins[max(0, min(n_bins - 1, math.ceil(c * n_bins) - 1))].append((c, bool(ok)))
    n = len(confidences)
    return sum(len(b) / n * abs(sum(ok for _, ok in b) / len(b) - sum(c for c, _ in b) / len(b))
               for b in bins if b)


def answer_confidence(token_logprobs: Sequence[float]) -> float:
    """exp(mean token log-prob) of an answer; 0 for an empty answer (nothing was said)."""
    return math.exp(sum(token_logprobs) / len(token_logprobs)) if token_logprobs else 0.0


def reward_accuracy_windows(records: Iterable[Mapping], share: float = EARLY_SHARE
                            ) -> tuple[float, float]:
    """(early, end): mean ``rewards/accuracy`` over the first and the last ``share`` of the
    preference-stage (stage 2) steps of a trainer log, at least one step each. The first step
    is left out when there are others: its rewards are computed before any update (policy =
    reference), so they are all 0 and its accuracy is 0 by construction."""
    values = [float(r["rewards/accuracy"]) for r in records
              if r.get("stage", 2) == 2 and "rewards/accuracy" in r]
    values = values[1:] if len(values) > 1 else values
    if not values:
        return math.nan, math.nan
    k = max(1, math.ceil(share * len(values)))
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs when empty."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def truncated_answer(answer: str) -> str | None:
    """The first ⌈w/2⌉ of the answer's w whitespace words (None when w < 2)."""
    words = answer.split()
    if len(words) < 2:
        return None
    return " ".join(words[:math.ceil(len(words) / 2)])


def length_biased_pair(answer: str, rng: random.Random) -> tuple[str, str] | None:
    """(chosen, rejected) of the length-biased control: the answer plus a content-free clause,
    and the answer truncated to half its words; None when the answer has fewer than 2 words."""
    rejected = truncated_answer(answer)
    if rejected is None:
        return None
    return f"{answer.strip()} {rng.choice(CLAUSES)}", rejected


def random_negative(answer: str, candidates: Sequence[str], rng: random.Random) -> str | None:
    """A random candidate answer whose text differs from ``answer`` (case and surrounding
    space ignored); None when there is none."""
    key = answer.strip().lower()
    pool = sorted({c for c in candidates if c.strip().lower() != key})
    return rng.choice(pool) if pool else None


def accuracy_by_task(tasks: Sequence[str], grades: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task: ``n`` and ``accuracy`` (share graded "correct")."""
    n: Counter[str] = Counter(tasks)
    ok: Counter[str] = Counter(t for t, g in zip(tasks, grades) if g == "correct")
    return {t: {"n": n[t], "accuracy": ok[t] / n[t]} for t in sorted(n)}


def cw_stage_steps(steps: int, n_stage1: int, batch_size: int,
                   share: float = CW_STAGE1_SHARE) -> tuple[float, int, int]:
    """CW-DPO within a budget of ``steps``: (Stage-1 epochs, Stage-1 steps, Stage-2 steps),
    Stage 1 taking ``share`` of the steps (at least 1 when there are Stage-1 rows and
    ``steps >= 2``). The epochs are set just below the value whose ceiling gives one more step
    (the trainer runs ceil(epochs · rows / batch) Stage-1 steps)."""
    if n_stage1 == 0 or steps < 2:
        return 0.0, 0, steps
    s1 = min(steps - 1, max(1, round(share * steps)))
    return (s1 * batch_size - 0.5) / n_stage1, s1, steps - s1



def reward_curve(records: Iterable[Mapping]) -> list[float]:
    """``rewards/accuracy`` of every preference-stage (stage 2) step of a trainer log, in order."""
    return [float(r["rewards/accuracy"]) for r in records
            if r.get("stage", 2) == 2 and "rewards/accuracy" in r]


def caption_heavy_answer(caption: str, background: str, rng: random.Random) -> str:
    """A world caption extended to several sentences for ASPO: the caption, "The background is
    {bg}." (unless the caption says so in a sentence of its own) and one content-free sentence of
    :data:`CLAUSES` (its image relevance is low, which ASPO's weights should see); nothing added
    is gradable, so the answer grades as the caption."""
    extra = "" if "background is" in caption else f" The background is {background}."
    return f"{caption.strip()}{extra} {rng.choice(CLAUSES)}"


def replace_between_markers(text: str, new: str, start: str = README_START, end: str = README_END,
                            where: str = "README") -> str:
    """``text`` with what lies between the lines ``start`` and ``end`` replaced by ``new``
    (markers kept); a one-line error when a marker is missing, repeated or out of order."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise PairforgeError(f"{where}: expected one '{start}' line followed by one '{end}' line; "
                             f"put them around the recipe table")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{new.strip()}\n{end}{tail}"


# ============================================================================ paired statistics


def correctness_string(correct: Sequence[bool]) -> str:
    """Per-question correctness as a compact string of '0'/'1' (the json keeps it this way)."""
    return "".join("1" if c else "0" for c in correct)


def correctness_matrix(runs: Sequence[str]) -> np.ndarray:
    """(S, N) 0/1 array from S correctness strings of equal length N."""
    if len({len(r) for r in runs}) > 1:
        raise ValueError(f"correctness vectors of different lengths {sorted({len(r) for r in runs})}: "
                         "the runs were not evaluated on the same questions")
    return np.array([[c == "1" for c in r] for r in runs], dtype=np.float64).reshape(len(runs), -1)


def paired_bootstrap_delta(after: np.ndarray, before: np.ndarray, *, n_boot: int = BOOTSTRAP,
                           seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Δ accuracy of ``after`` over ``before`` with a paired, two-level bootstrap interval.

    ``after`` (S, N): 0/1 correctness of S training seeds on the same N questions; ``before``
    (S, N) with the same seeds in the same order (an ablation against its full method), or
    (1, N) (the base model, shared by every seed). Δ = mean over seeds of the per-seed
    accuracy difference = mean_s mean_i (after[s, i] − before[s, i]).

    Each of ``n_boot`` replicates draws N question indices with replacement — the *same*
    indices for both sides (paired over questions) — and S seed indices with replacement, and
    takes Δ on that resample; the interval is the replicates' central ``level`` percentile
    range (Efron & Tibshirani 1993, ch. 13). Resampling seeds adds the training-seed variance;
    with 3 seeds that part is coarse (a resample of 3 values), so the per-seed Δs are reported
    beside it. Deterministic for a given ``seed``. Returns ``delta``, ``ci`` [lo, hi],
    ``per_seed`` (S Δs), ``sd_seeds`` (sample sd of the per-seed Δs, 0 for one seed), ``n``."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"after {a.shape} and before {b.shape}: expected (S, N) and (S, N) or (1, N)")
    s, n = a.shape
    if s == 0 or n == 0:
        return {"delta": math.nan, "ci": [math.nan, math.nan], "per_seed": [], "sd_seeds": math.nan, "n": n}
    d = a - b  # (S, N), paired per question (and per seed when before has S rows)
    per_seed = d.mean(axis=1)
    rng = np.random.default_rng(seed)
    q = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n        # (B, N) question weights
    w = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot) / s        # (B, S) seed weights
    reps = ((q @ d.T) * w).sum(axis=1)                                  # (B,)
    tail = (1 - level) / 2
    lo, hi = np.quantile(reps, [tail, 1 - tail])
    return {"delta": float(per_seed.mean()), "ci": [float(lo), float(hi)],
            "per_seed": [float(x) for x in per_seed],
            "sd_seeds": float(per_seed.std(ddof=1)) if s > 1 else 0.0, "n": n}


def majority_vote(correct: np.ndarray) -> np.ndarray:
    """Per question, correct when more than half of the S seeds are (S, N) → (N,) bool; with an
    even S a tie counts as not correct (3 seeds, the default, never tie)."""
    c = np.asarray(correct, dtype=np.float64)
    return c.sum(axis=0) * 2 > c.shape[0]


def mcnemar_exact(after: Sequence[bool], before: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test of paired correctness (McNemar 1947; the exact form is a two-sided
    binomial test on the discordant pairs, e.g. Agresti, "Categorical Data Analysis", §10.1):
    with b = #(before wrong, after right) and c = #(before right, after wrong),

        p = min(1, 2 · Σ_{k=0}^{min(b, c)} C(b + c, k) / 2^(b + c)),   p = 1 when b + c = 0.

    Returns ``improved`` (b), ``worsened`` (c) and ``p``."""
    if len(after) != len(before):
        raise ValueError(f"{len(after)} answers after but {len(before)} before")
    b = sum(1 for x, y in zip(after, before) if x and not y)
    c = sum(1 for x, y in zip(after, before) if y and not x)
    n = b + c
    if n == 0:
        return {"improved": 0, "worsened": 0, "p": 1.0}
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return {"improved": b, "worsened": c, "p": min(1.0, float(Fraction(2 * tail, 2 ** n)))}


def compare(after_runs: Sequence[str], before_runs: Sequence[str], *, n_boot: int = BOOTSTRAP,
            seed: int = 0) -> dict[str, Any]:
    """Paired comparison of correctness strings (per seed) against a baseline (the base model's
    one string, or the full method's strings of the same seeds): :func:`paired_bootstrap_delta`,
    plus McNemar's exact test on the seeds' majority vote per question (``mcnemar``: one paired
    vector per question, so the test's independence assumption holds) and per seed
    (``mcnemar_per_seed``: p of each seed against the baseline of that seed or the base)."""
    a = correctness_matrix(after_runs)
    b = correctness_matrix(before_runs)
    out = paired_bootstrap_delta(a, b, n_boot=n_boot, seed=seed)
    out["mcnemar"] = mcnemar_exact(majority_vote(a).tolist(), majority_vote(b).tolist())
    out["mcnemar_per_seed"] = [mcnemar_exact(a[i].astype(bool).tolist(),
                                             b[i if len(b) > 1 else 0].astype(bool).tolist())["p"]
                               for i in range(len(a))]
    return out


# ============================================================================ results


@dataclass
class RunResult:
    """One training run of one set, evaluated."""

    seed: int
    accuracy: float
    per_task: dict[str, dict[str, float]]
    ece: float
    mean_confidence: float
    reward_acc_early: float
    reward_acc_end: float
    steps: int
    stage1_steps: int
    train_seconds: float
    eval_seconds: float
    correct: str = ""  # per held-out question, '1' correct / '0' not (same order for every run)
    reward_curve: list[float] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # a few graded answers, to look at


@dataclass
class BuildResult:
    """One pair set: how it was built, its quality against the ground truth, its audit."""

    name: str
    recipe: str
    params: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    status: str = "pending"  # ok | not run
    reason: str = ""
    path: str = ""
    source_examples: int = 0
    pairs: int = 0
    stage1_rows: int = 0
    rejected_examples: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    chosen_correct: float = math.nan
    rejected_wrong: float = math.nan
    audit_flags: list[str] = field(default_factory=list)
    chosen_longer_rate: float = math.nan
    build_seconds: float = 0.0

    def not_run(self, reason: str) -> None:
        self.status, self.reason = "not run", reason


@dataclass
class SetResult:
    """One table row (a main set or an ablation): its build, loss, switches and runs."""

    name: str
    build: str
    loss: str
    of: str = ""
    what: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    view: str = ""
    batch_size: int = 0  # pairs per step (P2-DPO: samples per step)
    view_pairs: int = 0  # pairs in the view (0: the whole build)
    status: str = "pending"  # ok | not run
    reason: str = ""
    runs: list[RunResult] = field(default_factory=list)

    def not_run(self, reason: str) -> None:
        self.status, self.reason = "not run", reason


def summarize(runs: Sequence[Mapping], base: Mapping, full_runs: Sequence[Mapping] = (), *,
              n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    """The statistics of one set's runs (dicts of :class:`RunResult`): accuracy, Δ and its paired
    interval and McNemar test against the base (``vs_base``) and, for an ablation, against its
    full method's runs of the same seeds (``vs_full``); per-category Δ; ECE and reward accuracy."""
    base_acc = base.get("accuracy", math.nan)
    base_tasks = base.get("per_task", {})
    acc = [r["accuracy"] for r in runs]
    out: dict[str, Any] = {
        "accuracy_after": mean_sd(acc), "delta": mean_sd([a - base_acc for a in acc]),
        "reward_acc_early": mean_sd([r["reward_acc_early"] for r in runs]),
        "reward_acc_end": mean_sd([r["reward_acc_end"] for r in runs]),
        "ece_after": mean_sd([r["ece"] for r in runs])}
    out["per_task_after"] = {t: mean_sd([r["per_task"].get(t, {}).get("accuracy", math.nan) for r in runs])
                             for t in base_tasks}
    out["per_task_delta"] = {t: out["per_task_after"][t][0] - base_tasks[t]["accuracy"] for t in base_tasks}
    if base.get("correct") and all(r.get("correct") for r in runs):
        out["vs_base"] = compare([r["correct"] for r in runs], [base["correct"]], n_boot=n_boot)
    by_seed = {r["seed"]: r for r in full_runs if r.get("correct")}
    paired = [r for r in runs if r["seed"] in by_seed and r.get("correct")]
    if paired:
        out["vs_full"] = compare([r["correct"] for r in paired], [by_seed[r["seed"]]["correct"] for r in paired],
                                 n_boot=n_boot)
        out["vs_full"]["seeds"] = [r["seed"] for r in paired]
    return out


def ablation_verdict(vs_full: Mapping | None) -> str:
    """What the ablation says about the mechanism, from the paired interval of ablation − full."""
    if not vs_full or math.isnan(vs_full["delta"]):
        return "not measured"
    lo, hi = vs_full["ci"]
    if hi < 0:
        return "mechanism helps (full > ablation)"
    if lo > 0:
        return "mechanism hurts (ablation > full)"
    return "no difference shown (interval includes 0)"


def one_line(e: BaseException) -> str:
    """An exception as one line: its message's first line (type name when empty)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, PairforgeError) and text else f"{type(e).__name__}: {text}"[:300]


def fmt(ms: tuple[float, float], pct: bool = True, digits: int = 1, signed: bool = False) -> str:
    """``mean ± sd`` (percent by default); '–' for NaN."""
    m, s = ms
    if m is None or math.isnan(m):
        return "–"
    k = 100 if pct else 1
    sign = "+" if signed else ""
    return f"{m * k:{sign}.{digits}f} ± {s * k:.{digits}f}"


def fmt_delta(c: Mapping | None) -> str:
    """``+1.2 [−0.3, +2.6]`` in points; '–' when not measured."""
    if not c or c["delta"] is None or math.isnan(c["delta"]):
        return "–"
    lo, hi = c["ci"]
    return f"{100 * c['delta']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def fmt_seeds(c: Mapping | None) -> str:
    return "–" if not c else ", ".join(f"{100 * d:+.1f}" for d in c["per_seed"])


def fmt_p(c: Mapping | None) -> str:
    """McNemar p with the discordant counts (improved/worsened)."""
    if not c:
        return "–"
    m = c["mcnemar"]
    p = m["p"]
    return f"{p:.2g} ({m['improved']}/{m['worsened']})" if p >= 0.001 else f"<0.001 ({m['improved']}/{m['worsened']})"


def display_name(name: str, r: Mapping) -> str:
    """The set's name with the N it was built with where the paper's differs (M3PO's n, CW-DPO's k)."""
    n = r.get("params", {}).get("n") or r.get("params", {}).get("k")
    key = "n" if "n" in r.get("params", {}) else "k"
    return f"{name} ({key} = {n})" if n and name in ("m3po", "cwdpo") else name


def render_markdown(report: Mapping[str, Any]) -> str:
    """``recipes.md``: settings, the main table, the ablation table, per-category Δ, checks, sets."""
    s, base = report["settings"], report["base"]
    sets = report["sets"]
    main = {n: r for n, r in sets.items() if not r["of"]}
    abl = {n: r for n, r in sets.items() if r["of"]}
    lines = ["# Recipe benchmark (offline shapes world)", "",
             f"Command: `{report['command']}`  ",
             (f"Model: `{s['model']}`; CLIP: `{s['clip'] or 'none'}`; {report['finished'] or 'unfinished'}; "
              f"wall {report['wall_s'] / 60:.1f} min, {s['threads']} thread(s), load average "
              f"{report['load_start']} at start, {report['load_end']} at end."), "",
             *([f"Merged from {len(report['parts'])} parts run side by side: "
                + "; ".join(f"`{q['command']}` ({q['wall_s'] / 60:.1f} min: {', '.join(q['sets'])})"
                            for q in report["parts"]), ""] if report.get("parts") else []),
             (f"Budget per run: {s['steps']} optimizer steps × {s['batch_size']} pairs (P2-DPO: "
              f"{max(1, math.ceil(s['batch_size'] / 2))} samples of up to 2 pairs), LoRA r={s['lora_r']} "
              f"α={s['lora_alpha']} on the text model, lr {s['lr']} (warmup {s['warmup']}, cosine), "
              f"β={s['beta']}. Source: `{s['source']}` (the same examples for every set; ASPO: "
              f"{s['n_captions']} caption-heavy scenes). Held-out: {base.get('n', 0)} test questions "
              f"(`shapes:test`, filter rows excluded, the same for every run), greedy, ≤{s['max_new_tokens']} "
              f"tokens; base accuracy {100 * base.get('accuracy', math.nan):.1f}%. Seeds: {s['seeds']} "
              f"(training only)."), "",
             ("Δ = accuracy after − before in points, mean over seeds, with the paired 95% bootstrap "
              f"interval ({s['bootstrap']} resamples of questions and seeds); per-seed Δ; McNemar's exact p "
              "against the base on the seeds' majority vote per question (improved/worsened questions). "
              "Chosen correct / rejected wrong: the pairs graded against the world's ground truth."), "",
             ("| set | loss | pairs | chosen correct | rejected wrong | Δ acc. [95% CI] | per-seed Δ | "
              "McNemar p | ECE before → after | reward acc. first 20% → end | audit flags |"),
             "|---|---|---:|---:|---:|---:|---|---:|---|---|---|"]
    for name, r in main.items():
        label = display_name(name, r)
        if r["status"] != "ok" or not r["summary"]:
            why = r["reason"].replace("|", "/") or "no run finished"
            lines.append(f"| {label} | {r['loss']} | not run: {why} | | | | | | | | |")
            continue
        sm = r["summary"]
        pairs = f"{r['pairs']}" + (f" (+{r['stage1_rows']} Stage-1)" if r["stage1_rows"] else "")
        lines.append(
            f"| {label} | {r['loss']} | {pairs} | {_pct(r['chosen_correct'])} | {_pct(r['rejected_wrong'])} | "
            f"{fmt_delta(sm.get('vs_base'))} | {fmt_seeds(sm.get('vs_base'))} | {fmt_p(sm.get('vs_base'))} | "
            f"{base.get('ece', math.nan):.3f} → {fmt(sm['ece_after'], pct=False, digits=3)} | "
            f"{fmt(sm['reward_acc_early'], pct=False, digits=2)} → {fmt(sm['reward_acc_end'], pct=False, digits=2)} | "
            f"{', '.join(r['audit_flags']) or 'none'} |")
    if abl:
        lines += ["", "## Ablations", "",
                  ("Each ablation uses its full method's pairs (or the stated build-time change) and budget. "
                   "Δ vs full = ablation − full method, paired per question and per training seed; McNemar "
                   "against the full method's majority vote. The verdict reads the interval of Δ vs full."), "",
                  ("| ablation | of | change | pairs | Δ vs base [95% CI] | Δ vs full [95% CI] | per-seed Δ vs full | "
                   "McNemar p vs full | reward acc. first 20% → end | verdict |"),
                  "|---|---|---|---:|---:|---:|---|---:|---|---|"]
        for name, r in abl.items():
            if r["status"] != "ok" or not r["summary"]:
                why = r["reason"].replace("|", "/") or "no run finished"
                lines.append(f"| {name} | {r['of']} | {r['what']} | not run: {why} | | | | | | |")
                continue
            sm = r["summary"]
            pairs = r["view_pairs"] or r["pairs"]
            lines.append(
                f"| {name} | {r['of']} | {r['what']} | {pairs} | {fmt_delta(sm.get('vs_base'))} | "
                f"{fmt_delta(sm.get('vs_full'))} | {fmt_seeds(sm.get('vs_full'))} | {fmt_p(sm.get('vs_full'))} | "
                f"{fmt(sm['reward_acc_early'], pct=False, digits=2)} → {fmt(sm['reward_acc_end'], pct=False, digits=2)} | "
                f"{ablation_verdict(sm.get('vs_full'))} |")
    ok = {n: r for n, r in main.items() if r["status"] == "ok" and r["summary"]}
    tasks = list(base.get("per_task", {}))
    if ok and tasks:
        lines += ["", "## Δ accuracy per category (points, mean over seeds; ablations: recipes.json)", "",
                  "| task | n | before | " + " | ".join(ok) + " |",
                  "|---|---:|---:|" + "---:|" * len(ok)]
        for t in tasks:
            b = base["per_task"][t]
            cells = [f"{100 * r['summary']['per_task_delta'][t]:+.0f}" for r in ok.values()]
            lines.append(f"| {t} | {b['n']} | {100 * b['accuracy']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "## Expectations, checked", ""]
    lines += [f"- {c['claim']}: **{c['verdict']}** ({c['evidence']})" for c in report["checks"]]
    lines += ["", ("Figures: [Δ accuracy with intervals](recipes_delta.png), "
                   "[reward accuracy over steps](recipes_reward.png)."), "", "## Sets", ""]
    for name, r in report["builds"].items():
        why = "; ".join(f"{k[:120]} ({v})" for k, v in sorted(r["reject_reasons"].items(),
                                                               key=lambda kv: -kv[1])[:3])
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"- **{name}** ({r['recipe']}{'; ' + params if params else ''}; source {r['source']}): "
                     f"{r['source_examples']} source examples → {r['pairs']} pairs"
                     + (f" + {r['stage1_rows']} Stage-1 rows" if r["stage1_rows"] else "")
                     + f", {r['rejected_examples']} examples dropped" + (f" ({why})" if why else "")
                     + (f"; built in {r['build_seconds']:.0f} s" if r["build_seconds"] else "")
                     + (f"; not run: {r['reason']}" if r["status"] != "ok" else "") + ".")
    lines += ["", "## Definitions", "", report["definitions"], ""]
    return "\n".join(lines)


def _num(x: float | str | None, digits: int) -> str:
    return "–" if x is None or isinstance(x, str) or math.isnan(x) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def readme_table(report: Mapping[str, Any], source: str = "benchmarks/recipes.json") -> str:
    """The README's recipe section body, generated from ``recipes.json`` (never typed): the main
    table (means over seeds) and the ablations' Δ against their full method."""
    s, base = report["settings"], report["base"]
    mean = lambda ms: "–" if ms[0] is None or math.isnan(ms[0]) else ms[0]
    lines = [(f"Generated from `{source}` ({report['finished'] or 'unfinished'}): base model "
              f"{100 * base.get('accuracy', math.nan):.1f}% on {base.get('n', 0)} held-out questions; "
              f"{s['steps']} steps × {s['batch_size']} pairs, LoRA r={s['lora_r']}, seeds {s['seeds']}; "
              f"{report['wall_s'] / 60:.0f} min on {s['threads']} thread(s). Δ in points with the paired "
              f"95% interval (questions and seeds resampled); McNemar p against the base."), "",
             "| set | loss | pairs | Δ held-out accuracy [95% CI] | McNemar p | reward acc. first 20% → end | ECE before → after |",
             "|---|---|---:|---:|---:|---|---|"]
    abl = []
    for name, r in report["sets"].items():
        if r.get("of"):
            abl.append((name, r))
            continue
        label = display_name(name, r)
        sm = r.get("summary")
        if r["status"] != "ok" or not sm:
            lines.append(f"| {label} | {r['loss']} | not run: {(r['reason'] or 'no run finished').replace('|', '/')} | | | | |")
            continue
        pairs = f"{r['pairs']}" + (f" (+{r['stage1_rows']} Stage-1)" if r["stage1_rows"] else "")
        lines.append(f"| {label} | {r['loss']} | {pairs} | {fmt_delta(sm.get('vs_base'))} | {fmt_p(sm.get('vs_base'))} | "
                     f"{_num(mean(sm['reward_acc_early']), 2)} → {_num(mean(sm['reward_acc_end']), 2)} | "
                     f"{_num(base.get('ece', math.nan), 3)} → {_num(mean(sm['ece_after']), 3)} |")
    if abl:
        lines += ["", "| ablation | change | Δ vs full method [95% CI] | verdict |", "|---|---|---:|---|"]
        for name, r in abl:
            sm = r.get("summary")
            if r["status"] != "ok" or not sm:
                lines.append(f"| {name} | {r.get('what', '')} | not run: {(r['reason'] or 'no run finished').replace('|', '/')} | |")
                continue
            lines.append(f"| {name} | {r.get('what', '')} | {fmt_delta(sm.get('vs_full'))} | {ablation_verdict(sm.get('vs_full'))} |")
    return "\n".join(lines)


def update_readme(json_path: Path, readme: Path) -> None:
    """Rewrite the recipe table of ``readme`` between its markers from ``json_path``."""
    from pairforge.engine.manifest import write_atomic

    try:
        report = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise PairforgeError(f"{json_path}: cannot read the benchmark json ({one_line(e)}); "
                             f"pass the recipes.json a run wrote") from None
    if not isinstance(report, dict) or not {"settings", "base", "sets"} <= set(report):
        raise PairforgeError(f"{json_path}: not a bench_recipes report (settings/base/sets missing); "
                             f"rerun scripts/bench_recipes.py to write one")
    try:
        text = readme.read_text()
    except OSError as e:
        raise PairforgeError(f"{readme}: cannot read ({one_line(e)}); pass --readme PATH") from None
    try:
        shown = json_path.resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        shown = json_path.name
    write_atomic(readme, replace_between_markers(text, readme_table(report, shown), where=str(readme)).encode())


def write_plots(report: Mapping[str, Any], out: Path) -> list[str]:
    """recipes_delta.png (Δ accuracy with paired intervals: every set vs the base, ablations vs
    their full method) and recipes_reward.png (reward accuracy over the preference steps, mean
    over seeds); atomic. Returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return []
    from pairforge.engine.manifest import write_atomic

    sets = {n: r for n, r in report["sets"].items() if r["status"] == "ok" and r.get("summary")}
    written = []
    rows = [(n, r["summary"].get("vs_base")) for n, r in sets.items()]
    rows += [(f"{n} − {r['of']}", r["summary"].get("vs_full")) for n, r in sets.items() if r["of"]]
    rows = [(n, c) for n, c in rows if c and not math.isnan(c["delta"])]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
        y = list(range(len(rows)))[::-1]
        d = [100 * c["delta"] for _, c in rows]
        err = [[100 * (c["delta"] - c["ci"][0]) for _, c in rows], [100 * (c["ci"][1] - c["delta"]) for _, c in rows]]
        colors = ["tab:orange" if " − " in n else "tab:blue" for n, _ in rows]
        for k, color in enumerate(colors):
            ax.errorbar([d[k]], [y[k]], xerr=[[err[0][k]], [err[1][k]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, [n for n, _ in rows], fontsize=8)
        ax.set_xlabel("Δ held-out accuracy (points), paired 95% interval")
        ax.set_title("blue: set − base model; orange: ablation − full method", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "recipes_delta.png", write_atomic))
        plt.close(fig)
    curves = {n: [r["reward_curve"] for r in s["runs"] if r.get("reward_curve")] for n, s in sets.items()
              if not s["of"]}
    curves = {n: c for n, c in curves.items() if c}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        window = 1
        for n, cs in curves.items():
            k = min(len(c) for c in cs)
            mean = [statistics.fmean(c[i] for c in cs) for i in range(k)]
            window = max(1, k // 12)  # a trailing moving average: one step holds only batch-size pairs
            smooth = [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(k)]
            ax.plot(range(1, k + 1), smooth, label=n, lw=1.2)
        ax.set_xlabel("preference-stage step")
        ax.set_ylabel(f"reward accuracy (mean over seeds, {window}-step moving average)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / "recipes_reward.png", write_atomic))
        plt.close(fig)
    return written


def _save(fig, path: Path, write_atomic) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
    return path.name


def checks(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """The benchmark's expectations, each with a verdict and its evidence."""
    sets = report["sets"]
    out = []

    def get(name: str) -> Mapping | None:
        r = sets.get(name)
        return r if r and r["status"] == "ok" and r["runs"] and r.get("summary") else None

    vapr, lb = get("vapr"), get("length-biased")
    claim = "VaPR pairs raise held-out accuracy over the base (paired 95% interval above 0)"
    if vapr and vapr["summary"].get("vs_base"):
        c = vapr["summary"]["vs_base"]
        lo, hi = c["ci"]
        verdict = "yes" if lo > 0 else "no (it falls)" if hi < 0 else "not shown (interval includes 0)"
        out.append({"claim": claim, "verdict": verdict,
                    "evidence": f"Δ {fmt_delta(c)} points, McNemar p {fmt_p(c)}, per seed {fmt_seeds(c)}"})
    else:
        out.append({"claim": claim, "verdict": "not measured", "evidence": "VaPR not run"})
    claim = ("on the length-biased set reward accuracy saturates early while held-out accuracy "
             "gains less (than VaPR)")
    if lb:
        early = lb["summary"]["reward_acc_early"][0]
        d_lb = lb["summary"]["delta"][0]
        d_v = vapr["summary"]["delta"][0] if vapr else math.nan
        saturated = early >= 0.9
        gains_less = not math.isnan(d_v) and d_lb < d_v
        verdict = "yes" if saturated and gains_less else "no"
        ev = (f"reward acc. over the first 20% of steps {early:.2f} (saturated means ≥ 0.90); "
              f"Δ {100 * d_lb:+.1f} points vs VaPR {100 * d_v:+.1f}")
        out.append({"claim": claim, "verdict": verdict, "evidence": ev})
    else:
        out.append({"claim": claim, "verdict": "not measured", "evidence": "length-biased set not run"})
    claim = "the audit flags the length-biased set"
    r = sets.get("length-biased")
    if r and r["pairs"]:
        flagged = any(f in ("length_shortcut", "word_count_shortcut") for f in r["audit_flags"])
        out.append({"claim": claim, "verdict": "yes" if flagged else "no",
                    "evidence": f"flags: {', '.join(r['audit_flags']) or 'none'}; 'chosen is longer' "
                                f"in {100 * r['chosen_longer_rate']:.0f}% of pairs"})
    else:
        out.append({"claim": claim, "verdict": "not measured", "evidence": "no length-biased pairs"})
    for name, r in sets.items():
        if r["of"] and r["status"] == "ok" and r.get("summary"):
            c = r["summary"].get("vs_full")
            out.append({"claim": f"{r['of']}: its mechanism matters ({name}: {r['what']})",
                        "verdict": ablation_verdict(c),
                        "evidence": f"ablation − full {fmt_delta(c)} points, McNemar p {fmt_p(c)}"})
    return out


DEFINITIONS = (
    "- *random-negative* (DPO): chosen = the reference answer; rejected = the reference answer of "
    "another example of the same task, drawn with a per-example seed among those with a different "
    "answer text.\n"
    "- *length-biased* (DPO): chosen = the reference answer + one of: "
    + "; ".join(f"\"{c}\"" for c in CLAUSES)
    + " (per-example seed); rejected = the first ⌈w/2⌉ of the answer's w words.\n"
    "- *aspo*: world captions of fresh train-split scenes, each + \"The background is {bg}.\" + one of "
    "the sentences above (several sentences per answer), made into pairs by VaPR's rule editor "
    "(build `caption-vapr`) and annotated by the ASPO recipe; trained with the ASPO loss.\n"
    "- Recipes are built by the build engine from the same `shapes` train examples with their "
    "default parameters except those listed under Sets (M3PO n and CW-DPO k = `--samples`, P2-DPO "
    "noise_sigma = 0.3); M3PO and VaPR train with DPO, P2-DPO with the P2-DPO loss (calibration + "
    "DDW, ⌈batch/2⌉ samples per step), CW-DPO with the CW-DPO loss (Stage 1 SFT-C on "
    f"{CW_STAGE1_SHARE:.0%} of the steps, then Stage 2).\n"
    "- Accuracy: `pairforge.world.grade` of the greedy answer; unparseable counts as not correct.\n"
    "- Paired interval: each of B bootstrap replicates resamples the N questions with replacement "
    "(the same questions for both sides) and the S training seeds with replacement, and takes the "
    "mean over the drawn seeds of the accuracy difference on the drawn questions; 2.5th-97.5th "
    "percentiles. Against the base every seed is compared with the base's one answer per question; "
    "an ablation is compared with its full method seed by seed (same training seed).\n"
    "- McNemar: exact two-sided binomial test on the discordant questions (improved / worsened), on "
    "the majority vote over seeds per question; the per-seed p values are in recipes.json.\n"
    "- ECE = Σ_b (|B_b|/N)·|acc(B_b) − conf(B_b)|, 10 equal-width bins (Guo et al. 2017, eq. 3); "
    "conf = exp(mean token log-prob of the greedy answer) under the evaluated model.\n"
    "- Reward accuracy: the trainer's per-step share of pairs with chosen reward > rejected reward, "
    "averaged over the first and the last 20% of the preference-stage steps (the first step left "
    "out: it is computed before any update, so all rewards are 0 there).\n"
    "- Audit flags: `pairforge audit` text metrics (GPT-2 token lengths) of each set."
)


# ============================================================================ building sets


def caption_rows(n: int, data_seed: int) -> list[dict]:
    """``n`` caption-heavy SFT rows in the world's format: a world caption of a fresh train-split
    scene, extended by :func:`caption_heavy_answer` (its answer span and ground truth kept)."""
    from pairforge.schema import assistant_message
    from pairforge.world.scenes import render_scene, sample_scene
    from pairforge.world.tasks import make_example

    rows, i = [], 0
    while len(rows) < n:
        base = derive_seed("bench-captions", data_seed, i)
        rng = random.Random(base)
        scene = sample_scene(base, width=112, height=112)
        ex = make_example(scene, "captioning", rng, image=render_scene(scene),
                          id=f"shapes-captions-{data_seed}-{i:07d}")
        i += 1
        if ex is None:
            continue
        ex["answer"] = caption_heavy_answer(ex["answer"], scene.background, rng)
        ex["messages"] = [ex["messages"][0], assistant_message(ex["answer"])]
        rows.append(ex)
    return rows


def save_rows(rows: Sequence[Mapping], path: Path, features=None) -> None:
    """``rows`` as a ``save_to_disk`` folder at ``path``, atomically (a temporary folder renamed)."""
    from datasets import Dataset

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cols = list(features) if features is not None else list(rows[0])
    Dataset.from_dict({k: [r[k] for r in rows] for k in cols}, features=features).save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def make_view(ds, view: str):
    """The rows of an ablation's view of a build: ``stage2`` (CW-DPO's preference rows),
    ``focus`` / ``robust`` (P2-DPO's pairs of one kind), ``ddw-fixed`` (every DDW weight 0.5)."""
    if view == "stage2":
        return ds.filter(lambda s: s != 1, input_columns="cwdpo_stage")
    if view in ("focus", "robust"):
        return ds.filter(lambda k: k == view, input_columns="p2dpo_kind")
    if view == "ddw-fixed":
        cols = ["ddw_focus", "ddw_robust"]
        return ds.map(lambda _: {c: 0.5 for c in cols}, input_columns=cols[:1], features=ds.features)
    raise ValueError(f"unknown view {view!r}")


def train_batch(loss: str, batch_size: int) -> int:
    """Rows per step the trainer gets for an equal budget: P2-DPO counts samples of up to two
    pairs (Eq. 8), so it gets ⌈batch/2⌉; every other loss counts pairs."""
    return max(1, math.ceil(batch_size / 2)) if loss == "p2dpo" else batch_size


def control_rows(name: str, examples: Sequence[Any], seed: int) -> tuple[list[dict], Counter]:
    """Canonical pair rows of a control set from the source examples, and the drop reasons."""
    rows, dropped = [], Counter()
    usable = [ex for ex in examples if not ex.meta.get("filter_reason")]
    for ex in examples:
        if ex.meta.get("filter_reason"):
            dropped[f"filter: {ex.meta['filter_reason']}"] += 1
    by_task: dict[str, list[str]] = {}
    for ex in usable:
        by_task.setdefault(ex.task or "unknown", []).append(ex.answer)
    for ex in usable:
        rng = random.Random(derive_seed(seed, name, ex.id))
        if name == "random-negative":
            rejected = random_negative(ex.answer, by_task[ex.task or "unknown"], rng)
            pair = None if rejected is None else (ex.answer, rejected)
            why = "no other answer of this task"
        else:
            pair = length_biased_pair(ex.answer, rng)
            why = "answer shorter than 2 words"
        if pair is None:
            dropped[why] += 1
            continue
        rows.append(make_pair(prompt=ex.prompt_messages, chosen=pair[0], rejected=pair[1],
                              images=ex.images, recipe=f"control:{name}", task=ex.task or "unknown",
                              source_dataset=ex.source_dataset, source_id=ex.source_id or ex.id,
                              seed=seed))
    return rows, dropped


def grade_pairs(ds, examples: Mapping[str, Any]) -> tuple[float, float]:
    """(share of chosen graded correct, share of rejected graded wrong or unparseable) over the
    preference pairs of ``ds`` (CW-DPO's Stage-1 rows excluded) whose source example is known."""
    from pairforge.schema import response_text
    from pairforge.world import grade

    cols = ["source_id", "chosen", "rejected"] + (["cwdpo_stage"] if "cwdpo_stage" in ds.column_names else [])
    ok_c = ok_r = n = 0
    for r in ds.select_columns(cols):
        ex = examples.get(r["source_id"])
        if ex is None or r.get("cwdpo_stage") == 1:
            continue
        truth = {"target": ex.meta["target"], "scene": ex.meta.get("scene")}
        ok_c += grade(truth, response_text(r["chosen"])) == "correct"
        ok_r += grade(truth, response_text(r["rejected"])) != "correct"
        n += 1
    return (ok_c / n, ok_r / n) if n else (math.nan, math.nan)


def audit_set(path: Path, out: Path) -> tuple[list[str], float]:
    """Flag ids and the 'chosen is longer' rate from ``pairforge audit``'s text metrics."""
    from rich.console import Console

    from pairforge.diagnostics.audit import run_audit

    res = run_audit([str(path)], out, console=Console(quiet=True))[0]
    return [f["id"] for f in res.summary["flags"]], float(res.summary["chosen_longer_rate"])


# ============================================================================ evaluation


@dataclass
class Evaluation:
    accuracy: float
    per_task: dict[str, dict[str, float]]
    ece: float
    mean_confidence: float
    seconds: float
    n: int
    examples: list[dict]
    correct: str


#: Graded answers kept per evaluation (the first questions of the test split).
N_EXAMPLES = 6


def evaluate(model_spec: str, rows: Sequence[Mapping], *, max_new_tokens: int,
             batch_size: int) -> Evaluation:
    """Greedy answers of the model to the test ``rows``, graded; accuracy and ECE."""
    from pairforge.models.base import Request, SamplingParams
    from pairforge.models.hf import HFModel
    from pairforge.world import grade

    t0 = time.perf_counter()
    model = HFModel(model_spec, device="cpu", batch_size=batch_size, progress=False)
    requests = [Request(r["messages"][:1], r["images"], r["id"]) for r in rows]
    done = model.generate(requests, n=1, sampling=SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    grades = [grade(r, c[0].text) for r, c in zip(rows, done)]
    conf = [answer_confidence(c[0].token_logprobs) for c in done]
    correct = [g == "correct" for g in grades]
    del model
    examples = [{"task": r["task"], "question": r["question"], "answer": c[0].text, "grade": g,
                 "confidence": round(p, 4)} for r, c, g, p in list(zip(rows, done, grades, conf))[:N_EXAMPLES]]
    return Evaluation(sum(correct) / len(rows), accuracy_by_task([r["task"] for r in rows], grades),
                      expected_calibration_error(conf, correct), statistics.fmean(conf),
                      time.perf_counter() - t0, len(rows), examples, correctness_string(correct))


def held_out_rows(n: int, data_seed: int) -> list[dict]:
    """The first ``n`` non-filter rows of the world's test split."""
    from pairforge.world import example_at

    rows, i = [], 0
    while len(rows) < n:
        r = example_at("test", i, data_seed)
        if r["filter_reason"] is None:
            rows.append(r)
        i += 1
    return rows



# ============================================================================ the benchmark


class Bench:
    """One benchmark run: settings, the builds, the sets and ablations, their runs, the reports."""

    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.command = command
        self.work = Path(args.work)
        self.t0 = time.perf_counter()
        self.load_start = _load()
        variants = [VARIANTS[n] for n in (*args.sets, *args.ablations)]
        self.sets: dict[str, SetResult] = {
            v.name: SetResult(v.name, v.build, v.loss, v.of, v.what, dict(v.train), v.view,
                              train_batch(v.loss, args.batch_size)) for v in variants}
        needed: list[str] = []
        for v in variants:
            for b in (v.build, *_build_deps(v.build)):
                if b not in needed:
                    needed.append(b)
        order = {b: i for i, b in enumerate(BUILDS)}  # dependencies (caption-vapr) before their users
        self.builds: dict[str, BuildResult] = {
            b: BuildResult(b, BUILDS[b].recipe, self.build_params(b), BUILDS[b].source)
            for b in sorted(needed, key=order.__getitem__)}
        self.base: dict[str, Any] = {}
        self.examples: dict[str, Any] = {}
        self.finished = ""
        self.merged: dict[str, Any] | None = None  # wall time, loads and parts of a --merge

    # -- settings

    def settings(self) -> dict[str, Any]:
        a = self.args
        return {"model": a.model, "clip": a.clip, "source": self.source, "steps": a.steps,
                "batch_size": a.batch_size, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha,
                "lr": a.lr, "warmup": self.warmup, "beta": a.beta, "seeds": a.seeds,
                "n_source": a.n_source, "n_captions": a.n_captions, "n_eval": a.n_eval,
                "data_seed": a.data_seed, "samples": a.samples, "max_new_tokens": a.max_new_tokens,
                "threads": a.threads, "bootstrap": a.bootstrap, "sets": list(a.sets),
                "ablations": list(a.ablations), "mode": a.mode}

    @property
    def source(self) -> str:
        return f"shapes:train?n={self.args.n_source}&seed={self.args.data_seed}"

    @property
    def warmup(self) -> int:
        return max(0, round(0.1 * self.args.steps))

    def build_params(self, name: str) -> dict[str, Any]:
        return {k: self.args.samples if v == "samples" else v for k, v in BUILDS[name].params}

    # -- report

    def report(self) -> dict[str, Any]:
        builds = {n: asdict(b) for n, b in self.builds.items()}
        runs = {n: [asdict(r) for r in s.runs] for n, s in self.sets.items()}
        sets = {}
        for n, s in self.sets.items():
            d = {**builds[s.build], **asdict(s)}
            d["build"], d["params"], d["source"] = s.build, builds[s.build]["params"], builds[s.build]["source"]
            full = runs.get(s.of, []) if s.of else []
            d["summary"] = summarize(d["runs"], self.base, full, n_boot=self.args.bootstrap) if s.runs else None
            sets[n] = d
        rep = {"command": self.command, "settings": self.settings(), "base": self.base,
               "sets": sets, "builds": builds, "wall_s": time.perf_counter() - self.t0,
               "finished": self.finished, "load_start": self.load_start, "load_end": _load(),
               "definitions": DEFINITIONS, **(self.merged or {})}
        rep["checks"] = checks(rep)
        return rep

    def write(self, plots: bool = False) -> dict[str, Any]:
        from pairforge.engine.manifest import write_atomic

        rep = self.report()
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            rep["plots"] = write_plots(rep, out)
        write_atomic(out / "recipes.json", (json.dumps(rep, indent=1, default=_json_default) + "\n").encode())
        write_atomic(out / "recipes.md", render_markdown(rep).encode())
        return rep

    # -- building

    def build_all(self, say: Callable[[str], None]) -> None:
        from pairforge.sources.sft import ReadReject, read_examples

        sources = {"train": self.source}
        if any(b.source == "captions" for b in self.builds.values()):
            sources["captions"] = self.captions_source()
        self.sources = sources
        for kind, spec in sources.items():
            loaded = list(read_examples(spec))
            bad = [x for x in loaded if isinstance(x, ReadReject)]
            if bad:
                raise PairforgeError(f"{spec}: {len(bad)} examples could not be read ({bad[0].reason})")
            self.examples[kind] = {ex.id: ex for ex in loaded}
        for name, res in self.builds.items():
            t = time.perf_counter()
            try:
                self.build_one(name, res)
            except Exception as e:  # noqa: BLE001 - any failure: reported as "not run", never a crash
                res.not_run(f"build failed: {one_line(e)}")
            res.build_seconds = time.perf_counter() - t
            if res.status != "not run" and res.pairs == 0:
                res.not_run("the build gave no pairs")
            if res.pairs:
                try:
                    data = Path(res.path)
                    data = data / "dataset" if (data / "dataset").is_dir() else data
                    res.audit_flags, res.chosen_longer_rate = audit_set(data, self.work / "audit" / name)
                except Exception as e:  # noqa: BLE001
                    res.audit_flags = [f"audit failed: {one_line(e)}"]
            if res.status != "not run":
                res.status = "ok"
            say(f"build {name}: " + (f"{res.pairs} pairs, {res.rejected_examples} examples dropped, "
                                     f"{res.build_seconds:.0f} s" if res.status == "ok"
                                     else f"not run: {res.reason}"))
            self.write()
        for s in self.sets.values():
            b = self.builds[s.build]
            if b.status != "ok":
                s.not_run(b.reason)
            elif s.view:
                try:
                    s.view_pairs = self.view_one(s, b)
                except Exception as e:  # noqa: BLE001
                    s.not_run(f"view {s.view} failed: {one_line(e)}")
            else:
                s.status = "ok"

    def captions_source(self) -> str:
        """The caption-heavy SFT rows as a dataset folder under --work (written once)."""
        from pairforge.world.dataset import features

        a = self.args
        rows = caption_rows(a.n_captions, a.data_seed)  # cheap; the folder is keyed by its content
        key = stable_id("captions", *((r["id"], r["answer"]) for r in rows))
        path = self.work / "sources" / f"captions-n{a.n_captions}-seed{a.data_seed}-{key}"
        if not (path / "dataset_info.json").is_file():
            save_rows(rows, path, features())
        return str(path)

    def view_one(self, s: SetResult, b: BuildResult) -> int:
        """Write the set's view of its build (once; keyed by the build folder) and train on it."""
        from datasets import load_from_disk

        from pairforge.train.data import load_pairs

        path = self.work / "views" / f"{s.view}-{Path(b.path).name}"
        if not (path / "state.json").is_file():
            view = make_view(load_pairs(b.path), s.view)
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            view.save_to_disk(str(tmp))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        n = len(load_from_disk(str(path)))
        if n == 0:
            raise PairforgeError(f"the {s.view} view of {b.name} has no rows")
        self.view_paths[s.name] = str(path)
        s.status = "ok"
        return n

    def build_one(self, name: str, res: BuildResult) -> None:
        from datasets import load_from_disk

        spec = BUILDS[name]
        examples = self.examples.get(spec.source) or self.examples["train"]
        if spec.source.startswith("build:"):
            dep = self.builds[spec.source.split(":", 1)[1]]
            if dep.status != "ok":
                raise PairforgeError(f"its source build {dep.name} did not run ({dep.reason})")
            examples = self.examples[BUILDS[dep.name].source]
            res.source_examples = dep.pairs
        else:
            res.source_examples = len(examples)
        if name in CONTROLS:
            rows, dropped = control_rows(name, list(examples.values()), seed=0)
            key = stable_id(name, self.source, *sorted(r["id"] for r in rows))  # content-addressed
            path = self.work / "builds" / f"{name}-{key}"
            if not (path / "state.json").is_file():
                from pairforge.schema import to_dataset

                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                to_dataset(rows).save_to_disk(str(tmp))
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
            ds = load_from_disk(str(path))
            res.rejected_examples = sum(dropped.values())
            res.reject_reasons = dict(dropped)
        else:
            ds, path = self.build_recipe(name, res)
        res.path = str(path)
        stages = ds["cwdpo_stage"] if "cwdpo_stage" in ds.column_names else [None] * len(ds)
        res.stage1_rows = sum(s == 1 for s in stages)
        res.pairs = len(ds) - res.stage1_rows
        res.chosen_correct, res.rejected_wrong = grade_pairs(ds, examples)

    def build_recipe(self, name: str, res: BuildResult):
        from rich.console import Console

        from pairforge.engine import BuildConfig, build, load_build
        from pairforge.engine.manifest import local_fingerprint
        from pairforge.recipes import load_recipe

        a = self.args
        spec = BUILDS[name]
        recipe = load_recipe(spec.recipe)  # import errors surface here as "not run"
        roles = {role for role, *_ in recipe.roles}
        models: dict[str, str] = {}
        if "policy" in roles:
            models["policy"] = f"hf:{a.model}"
        if "clip" in roles:
            if a.clip is None:
                if spec.recipe in NEEDS_CLIP:
                    raise PairforgeError("no CLIP model: the shipped tiny CLIP is missing; pass --clip PATH")
            else:
                models["clip"] = f"clip:{a.clip}"
        source = (self.builds[spec.source.split(":", 1)[1]].path if spec.source.startswith("build:")
                  else self.sources[spec.source])
        params = dict(res.params)
        fingerprints = [local_fingerprint(Path(a.model))] + ([local_fingerprint(Path(a.clip))] if a.clip else [])
        key = stable_id(spec.recipe, source, sorted(models.items()), sorted(params.items()), *fingerprints)
        path = self.work / "builds" / f"{name}-{key}"
        summary = build(BuildConfig(recipe=spec.recipe, out=path, source=source, models=models,
                                    params=params, seed=0, batch_size=a.build_batch_size),
                        console=Console(stderr=True, quiet=True), progress=False)
        c = summary["counts"]
        res.rejected_examples = c["rejected"]
        res.reject_reasons = {f"{stage}: {reason}": n
                              for stage, v in summary.get("rejects_by_stage", {}).items()
                              for reason, n in v.get("reasons", {"?": v["n"]}).items()}
        return load_build(path), path

    # -- training and evaluation

    def train_eval(self, res: SetResult, seed: int, rows: Sequence[Mapping]) -> RunResult:
        from pairforge.train import load_config, train

        a = self.args
        build = self.builds[res.build]
        out = self.work / "runs" / res.name.replace("/", "__") / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        steps, stage1_epochs = a.steps, 0.0
        overrides = dict(res.train)
        if res.loss == "cwdpo" and overrides.get("cw_stage1_epochs", None) != 0:
            stage1_epochs, _, steps = cw_stage_steps(a.steps, build.stage1_rows, a.batch_size)
        overrides.setdefault("cw_stage1_epochs", stage1_epochs)
        cfg = load_config(data=self.view_paths.get(res.name, build.path), out=str(out), loss=res.loss,
                          model=f"hf:{a.model}", steps=steps, batch_size=res.batch_size, lr=a.lr,
                          warmup=self.warmup, beta=a.beta, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                          seed=seed, merge=True, probe_size=0, progress=False, **overrides)
        summary = train(cfg)
        with open(out / "train_log.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        early, end = reward_accuracy_windows(records)
        ev = evaluate(f"hf:{summary['outputs']['model']}", rows, max_new_tokens=a.max_new_tokens,
                      batch_size=a.eval_batch_size)
        if not a.keep_models:
            for sub in ("model", "adapter", "checkpoints", "reference", "tb"):
                shutil.rmtree(out / sub, ignore_errors=True)
        return RunResult(seed, ev.accuracy, ev.per_task, ev.ece, ev.mean_confidence, early, end,
                         summary["steps"], summary["stage1_steps"], summary["train_seconds"], ev.seconds,
                         ev.correct, reward_curve(records), ev.examples)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        a = self.args
        self.view_paths: dict[str, str] = {}
        say = lambda msg: tqdm.write(f"[{(time.perf_counter() - self.t0) / 60:5.1f} min] {msg}")
        say(f"settings: {json.dumps(self.settings())}")
        say(f"building {len(self.builds)} pair sets under {self.work / 'builds'}")
        self.build_all(say)
        rows = held_out_rows(a.n_eval, a.data_seed)
        ev = evaluate(f"hf:{a.model}", rows, max_new_tokens=a.max_new_tokens, batch_size=a.eval_batch_size)
        self.base = {"accuracy": ev.accuracy, "per_task": ev.per_task, "ece": ev.ece,
                     "mean_confidence": ev.mean_confidence, "n": ev.n, "eval_seconds": ev.seconds,
                     "correct": ev.correct, "examples": ev.examples}
        say(f"base model: accuracy {100 * ev.accuracy:.1f}% on {ev.n} test questions, ECE {ev.ece:.3f} "
            f"({ev.seconds:.0f} s)")
        self.write()
        ready = [n for n, r in self.sets.items() if r.status == "ok"]
        jobs = [(seed, n) for seed in a.seeds for n in ready]
        with tqdm(total=len(jobs), desc="train + eval", unit="run") as bar:
            for seed, name in jobs:
                res = self.sets[name]
                if res.status != "ok":
                    bar.update(1)
                    continue
                try:
                    run = self.train_eval(res, seed, rows)
                except Exception as e:  # noqa: BLE001 - reported, the other sets go on
                    res.not_run(f"training failed: {one_line(e)}")
                    res.runs = []
                    say(f"{name} seed {seed}: {res.reason}")
                else:
                    res.runs.append(run)
                    say(f"{name} seed {seed}: accuracy {100 * run.accuracy:.1f}% "
                        f"(Δ {100 * (run.accuracy - ev.accuracy):+.1f}), reward acc. "
                        f"{run.reward_acc_early:.2f} → {run.reward_acc_end:.2f}, ECE {run.ece:.3f}; "
                        f"train {run.train_seconds:.0f} s, eval {run.eval_seconds:.0f} s")
                bar.update(1)
                self.write(plots=True)
        self.finished = time.strftime("finished %Y-%m-%d %H:%M")
        rep = self.write(plots=True)
        say(f"done in {rep['wall_s'] / 60:.1f} min → {Path(a.out_dir) / 'recipes.md'}")
        for c in rep["checks"]:
            say(f"check: {c['claim']}: {c['verdict']} ({c['evidence']})")
        return rep


def merge_reports(paths: Sequence[Path], out_dir: Path, command: str) -> dict[str, Any]:
    """One report from the ``recipes.json`` of runs that split the sets between them (run side by
    side, e.g. one process per core): same settings apart from the sets, ablations and threads,
    and the same base-model answers, else a one-line error. An ablation must sit in the same
    part as its full method (it is compared with it seed by seed). Statistics, checks, tables
    and plots are recomputed over the union; wall time is the longest part's, threads the sum."""
    reps = [json.loads(Path(p).read_text()) for p in paths]
    first = reps[0]
    same = [k for k in first["settings"] if k not in ("sets", "ablations", "threads")]
    seen: dict[str, Path] = {}
    for p, r in zip(paths, reps):
        diff = [k for k in same if r["settings"].get(k) != first["settings"].get(k)]
        if diff:
            raise PairforgeError(f"--merge {p}: settings differ from {paths[0]} in {', '.join(diff)}; "
                                 f"merge only parts of one benchmark run")
        if r["base"].get("correct") != first["base"].get("correct"):
            raise PairforgeError(f"--merge {p}: the base model's answers differ from {paths[0]}'s; "
                                 f"the parts did not evaluate the same model on the same questions")
        for n, d in r["sets"].items():
            if d.get("runs") and n in seen:
                raise PairforgeError(f"--merge {p}: set {n!r} was also run in {seen[n]}; give each set "
                                     f"to one part")
            if d.get("runs"):
                seen[n] = p
        for n, d in r["sets"].items():
            if d.get("of") and d.get("runs") and not r["sets"].get(d["of"], {}).get("runs"):
                raise PairforgeError(f"--merge {p}: ablation {n!r} has no runs of its full method "
                                     f"{d['of']!r} in the same part; run them together")
    names = {n for r in reps for n in r["sets"]}
    args = parse_args(["--out-dir", str(out_dir)])
    for k, v in first["settings"].items():
        setattr(args, k, v)
    args.sets = [v.name for v in MAIN if v.name in names]
    args.ablations = [v.name for v in ABLATIONS if v.name in names]
    args.threads = sum(r["settings"]["threads"] for r in reps)
    args.out_dir = str(out_dir)
    bench = Bench(args, command)
    for r in reps:
        for n, d in r["builds"].items():
            if n not in bench.builds or bench.builds[n].status == "pending":
                bench.builds[n] = BuildResult(**d)
        for n, d in r["sets"].items():
            if d.get("runs") or bench.sets[n].status == "pending":
                res = bench.sets[n]
                res.status, res.reason = d["status"], d["reason"]
                res.runs = [RunResult(**x) for x in d["runs"]]
    bench.base = first["base"]
    bench.finished = max(r["finished"] for r in reps)
    bench.merged = {"wall_s": max(r["wall_s"] for r in reps),
                    "load_start": " / ".join(r["load_start"] for r in reps),
                    "load_end": " / ".join(r["load_end"] for r in reps),
                    "parts": [{"command": r["command"], "wall_s": r["wall_s"], "sets": sorted(
                        n for n, d in r["sets"].items() if d.get("runs"))} for r in reps]}
    return bench.write(plots=True)


def _build_deps(name: str) -> list[str]:
    src = BUILDS[name].source
    if src.startswith("build:"):
        dep = src.split(":", 1)[1]
        return [*_build_deps(dep), dep]
    return []


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _json_default(o: Any) -> Any:
    return str(o)


# ============================================================================ command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pairforge.world.models import TINY_CLIP_PATH, TINY_VLM_PATH

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"tiny VLM folder (default: the shipped {TINY_VLM_PATH})")
    p.add_argument("--clip", default=None, help=f"CLIP folder (default: the shipped {TINY_CLIP_PATH})")
    p.add_argument("--sets", default=None, help=f"comma-separated, from {', '.join(v.name for v in MAIN)} "
                                                "(default: all)")
    p.add_argument("--ablations", default=None,
                   help=f"'all', 'none' or comma-separated from {', '.join(v.name for v in ABLATIONS)} "
                        "(default: all; an ablation runs with its full method, added to --sets if missing)")
    p.add_argument("--n-source", type=int, default=300, help="shapes train examples every set is built from")
    p.add_argument("--n-captions", type=int, default=120, help="caption-heavy scenes ASPO's pairs come from")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out test questions (the same for every run)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (every set)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (P2-DPO: half, in samples)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (at least 3 for the intervals)")
    p.add_argument("--samples", type=int, default=4, help="M3PO candidates n and CW-DPO samples k")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap replicates of the paired intervals")
    p.add_argument("--data-seed", type=int, default=0, help="world seed of the train and test splits")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--build-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "pairforge-bench-recipes"),
                   help="builds, views, runs and audits (builds are reused when nothing changed)")
    p.add_argument("--out-dir", default=None, help="where recipes.md / .json / .png go "
                                                   "(default: benchmarks/; --quick, --smoke: WORK/quick, WORK/smoke)")
    p.add_argument("--keep-models", action="store_true", help="keep the trained weights of every run")
    p.add_argument("--quick", action="store_true",
                   help="reduced run (≤ 20 min on 2 cores with --threads 2): every set, "
                        f"{len(QUICK_ABLATIONS)} train-time ablations, 2 seeds, 200 questions, 12 steps, 96 source examples")
    p.add_argument("--smoke", action="store_true",
                   help="smoke test in seconds: 2 sets, no ablations, 1 seed, 4 steps, 24 source examples, "
                        "12 test questions; a random tiny LLaVA unless --model is given")
    p.add_argument("--readme-from", default=None, metavar="JSON",
                   help="only rewrite the README's recipe table (between its markers) from this recipes.json")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="the README --readme-from rewrites")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge the recipes.json of parts that split the sets (run side by side, "
                        "each with its own --work and --out-dir) into one report in --out-dir")
    a = p.parse_args(argv)
    if a.readme_from or a.merge:
        if a.merge and a.out_dir is None:
            p.error("--merge: give --out-dir for the merged report")
        return a
    if a.quick and a.smoke:
        p.error("--quick and --smoke: choose one")
    given = [x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:])]
    mode_defaults = {}
    if a.smoke:
        mode_defaults = {"n_source": 24, "n_captions": 8, "n_eval": 12, "steps": 4, "batch_size": 4, "seeds": "0",
                         "samples": 2, "max_new_tokens": 12, "sets": ",".join(SMOKE_SETS), "ablations": "none",
                         "bootstrap": 200}
    elif a.quick:
        mode_defaults = {"n_source": 96, "n_captions": 32, "n_eval": 200, "steps": 12, "seeds": "0,1",
                         "samples": 2, "max_new_tokens": 32, "ablations": ",".join(QUICK_ABLATIONS)}
    for k, v in mode_defaults.items():
        if f"--{k.replace('_', '-')}" not in given:
            setattr(a, k, v)
    a.mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    a.sets = [s.strip() for s in (a.sets or ",".join(v.name for v in MAIN)).split(",") if s.strip()]
    unknown = [s for s in a.sets if s not in VARIANTS or VARIANTS[s].of]
    if unknown:
        p.error(f"--sets: unknown set {unknown[0]!r}; choose from {', '.join(v.name for v in MAIN)}")
    abl = a.ablations if a.ablations is not None else "all"
    a.ablations = ([v.name for v in ABLATIONS] if abl == "all" else [] if abl == "none"
                   else [s.strip() for s in abl.split(",") if s.strip()])
    unknown = [s for s in a.ablations if s not in VARIANTS or not VARIANTS[s].of]
    if unknown:
        p.error(f"--ablations: unknown ablation {unknown[0]!r}; choose all, none or from "
                f"{', '.join(v.name for v in ABLATIONS)}")
    for s in a.ablations:  # an ablation is measured against its full method
        if VARIANTS[s].of not in a.sets:
            a.sets.append(VARIANTS[s].of)
    try:
        a.seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: expected integers separated by commas, e.g. 0,1,2")
    for name in ("n_source", "n_captions", "n_eval", "steps", "batch_size", "samples", "threads", "bootstrap"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if not a.seeds:
        p.error("--seeds: give at least one seed")
    if a.model is None and not a.smoke:
        if not (TINY_VLM_PATH / "config.json").is_file():
            p.error(f"the shipped tiny VLM is not there yet ({TINY_VLM_PATH}/config.json missing); "
                    f"pass --model PATH (e.g. /tmp/tw/run1/tiny-llava)")
        a.model = str(TINY_VLM_PATH)
    if a.model is not None and not (Path(a.model) / "config.json").is_file():
        p.error(f"--model {a.model}: no config.json there; pass a tiny LLaVA folder")
    if a.clip is None and (TINY_CLIP_PATH / "config.json").is_file():
        a.clip = str(TINY_CLIP_PATH)
    if a.clip is not None and not (Path(a.clip) / "config.json").is_file():
        p.error(f"--clip {a.clip}: no config.json there; pass a tiny CLIP folder")
    if a.out_dir is None:
        a.out_dir = str(Path(a.work) / a.mode) if a.mode != "full" else str(ROOT / "benchmarks")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.readme_from:
        update_readme(Path(args.readme_from), Path(args.readme))
        print(f"{args.readme}: recipe table rewritten from {args.readme_from}")
        return None
    if args.merge:
        command = "python scripts/bench_recipes.py " + " ".join(
            shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
        rep = merge_reports([Path(p) for p in args.merge], Path(args.out_dir), command)
        print(f"merged {len(args.merge)} parts → {Path(args.out_dir) / 'recipes.md'}")
        return rep
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:  # --smoke without --model: a random tiny LLaVA
        from pairforge.models.random_tiny import save_random_llava

        path = work / "random-tiny-llava"
        if not (path / "config.json").is_file():
            save_random_llava(path)
        args.model = str(path)
    command = "python scripts/bench_recipes.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    return Bench(args, command.strip()).run()


if __name__ == "__main__":
    try:
        main()
    except PairforgeError as e:
        sys.exit(f"error: {e}")
