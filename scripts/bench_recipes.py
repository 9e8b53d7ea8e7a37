"""Recipe micro-benchmark on the offline world: does training on each recipe's pairs help?

    OMP_NUM_THREADS=1 python scripts/bench_recipes.py                     # the default run
    python scripts/bench_recipes.py --model /tmp/tw/run1/tiny-llava --clip /tmp/tw/run1/tiny-clip
    python scripts/bench_recipes.py --quick                              # smoke test, seconds

With one budget for every set (the same optimizer steps, batch size, LoRA settings, learning
rate and schedule), the tiny VLM is trained on the pairs of VaPR, M3PO, P2-DPO and CW-DPO,
all built by the build engine from the same ``shapes`` train-split examples
(``shapes:train?n=N``; the model-based recipes with ``--model`` as their policy), and on two
controls built here from the same examples:

- ``random-negative`` (plain DPO): chosen = the reference answer, rejected = the reference
  answer of another example of the same task, drawn with a per-example seed among those whose
  answer text differs (it may still happen to be right: the table's "rejected wrong" says how
  often it is not);
- ``length-biased`` (plain DPO): chosen = the reference answer + " " + one content-free
  sentence from :data:`CLAUSES` (per-example seed; no colour, shape, size, number, relation
  or yes/no word, so the grade of the answer is unchanged); rejected = the first ⌈w/2⌉ of the
  answer's w words. Chosen is always longer: length alone separates the pairs.

The controls, like VaPR, skip the world's filter examples (text-only, multiple-choice, bbox,
OCR); every dropped example is counted with its reason.

Measured on the held-out test split (the first ``--n-eval`` non-filter questions,
``shapes:test``), greedy decoding, for the base model once and for every (set, seed):

- **accuracy** per task category and overall, graded by :func:`pairforge.world.grade`
  ("unparseable" counts as not correct); Δ = after − before, per seed;
- **reward accuracy** from the trainer's ``train_log.jsonl`` (share of the step's pairs with
  chosen reward > rejected reward): the mean over the first 20% of the preference-stage steps
  ("early") and over the last 20% ("end"). CW-DPO's Stage-1 (SFT-C) steps log no rewards and
  are not counted;
- **ECE** (expected calibration error; Naeini et al. 2015, Guo et al. 2017 eq. 3) with 10
  equal-width bins of the confidence c = exp(mean token log-prob) of the greedy answer (the
  geometric-mean token probability under the evaluated model at temperature 1; the
  end-of-turn token is not part of the answer), against graded correctness.

The pair sets are audited (``pairforge audit``'s text metrics); the table records the flags
each raises, in particular whether the length-biased set gets the length-shortcut flag.

Budget: ``--steps`` optimizer steps of ``--batch-size`` pairs for every set; CW-DPO spends
:data:`CW_STAGE1_SHARE` of those steps on its Stage 1 (SFT-C on its Stage-1 rows) and the rest
on Stage 2. The seeds vary the training only (batch order, LoRA init); the pairs are built
once (build seed 0). Builds are kept under ``--work`` and reused when nothing changed.

A recipe that cannot be imported, built or trained is reported as "not run: <reason>".
Writes ``--out-dir``/recipes.md and recipes.json (default ``benchmarks/``; ``--quick`` writes
under ``--work`` unless ``--out-dir`` is given), after every run, so a cut-off run keeps what
it measured.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pairforge.errors import PairforgeError  # noqa: E402
from pairforge.schema import derive_seed, make_pair, stable_id  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The recipes compared, with the trainer loss each one's pairs are meant for.
RECIPE_LOSSES = {"vapr": "dpo", "m3po": "dpo", "p2dpo": "p2dpo", "cwdpo": "cwdpo"}
CONTROLS = ("random-negative", "length-biased")
ALL_SETS = (*RECIPE_LOSSES, *CONTROLS)
QUICK_SETS = ("vapr", "length-biased")
#: Model roles each recipe needs: CLIP for M3PO's MAS, P2-DPO's DDW weights (CW-DPO: optional).
NEEDS_CLIP = ("m3po", "p2dpo")
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
    examples: list[dict] = field(default_factory=list)  # a few graded answers, to look at


@dataclass
class SetResult:
    """One pair set: how it was built, its quality against the ground truth, audit, runs."""

    name: str
    loss: str
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
    runs: list[RunResult] = field(default_factory=list)

    def not_run(self, reason: str) -> None:
        self.status, self.reason = "not run", reason

    def summary(self, base_accuracy: float, base_per_task: Mapping[str, Mapping]) -> dict[str, Any]:
        """Mean and sd over seeds of the measured numbers."""
        acc = [r.accuracy for r in self.runs]
        out = {"accuracy_after": mean_sd(acc),
               "delta": mean_sd([a - base_accuracy for a in acc]),
               "reward_acc_early": mean_sd([r.reward_acc_early for r in self.runs]),
               "reward_acc_end": mean_sd([r.reward_acc_end for r in self.runs]),
               "ece_after": mean_sd([r.ece for r in self.runs])}
        out["per_task_after"] = {t: mean_sd([r.per_task.get(t, {}).get("accuracy", math.nan)
                                             for r in self.runs]) for t in base_per_task}
        return out


def one_line(e: BaseException) -> str:
    """An exception as one line: its message's first line (type name when empty)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, PairforgeError) and text else f"{type(e).__name__}: {text}"[:300]


def fmt(ms: tuple[float, float], pct: bool = True, digits: int = 1, signed: bool = False) -> str:
    """``mean ± sd`` (percent by default); '–' for NaN."""
    m, s = ms
    if math.isnan(m):
        return "–"
    k = 100 if pct else 1
    sign = "+" if signed else ""
    return f"{m * k:{sign}.{digits}f} ± {s * k:.{digits}f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """``recipes.md``: settings, the main table, per-category table, checks, notes."""
    s, base = report["settings"], report["base"]
    sets = report["sets"]
    lines = ["# Recipe micro-benchmark (offline shapes world)", "",
             f"Command: `{report['command']}`  ",
             (f"Model: `{s['model']}`; CLIP: `{s['clip'] or 'none'}`; {report['finished'] or 'unfinished'}; "
              f"wall {report['wall_s'] / 60:.1f} min, {s['threads']} thread(s), load average "
              f"{report['load_start']} at start, {report['load_end']} at end."), "",
             (f"Budget per run: {s['steps']} optimizer steps × {s['batch_size']} pairs, LoRA r={s['lora_r']} "
              f"α={s['lora_alpha']} on the text model, lr {s['lr']} (warmup {s['warmup']}, cosine), "
              f"β={s['beta']}. Source: `{s['source']}` (the same examples for every set). "
              f"Held-out: {base.get('n', 0)} test questions (`shapes:test`, filter rows excluded), "
              f"greedy, ≤{s['max_new_tokens']} tokens. Seeds: {s['seeds']} (training only)."), "",
             ("Accuracy in %, mean ± sd over seeds; Δ = after − before. Reward acc. = trainer's "
              "rewards/accuracy, mean over the first / last 20% of preference steps. ECE: 10 bins, "
              "confidence = exp(mean token log-prob) of the greedy answer. Chosen correct / rejected "
              "wrong: the preference pairs graded against the world's ground truth (wrong = graded "
              "wrong or unparseable)."), "",
             ("| set | loss | pairs | chosen correct | rejected wrong | acc. before | acc. after | Δ | "
              "reward acc. first 20% | reward acc. end | ECE before | ECE after | audit flags |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    before = base.get("accuracy", math.nan)
    for name, r in sets.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['loss']} | not run: {r['reason'].replace('|', '/')} "
                         "| | | | | | | | | | |")
            continue
        nan = (math.nan, math.nan)
        sm = r["summary"] or {k: nan for k in ("accuracy_after", "delta", "reward_acc_early",
                                                "reward_acc_end", "ece_after")}
        pairs = f"{r['pairs']}" + (f" (+{r['stage1_rows']} Stage-1)" if r["stage1_rows"] else "")
        flags = ", ".join(r["audit_flags"]) or "none"
        lines.append(
            f"| {name} | {r['loss']} | {pairs} | {100 * r['chosen_correct']:.0f}% | "
            f"{100 * r['rejected_wrong']:.0f}% | {100 * before:.1f} | {fmt(sm['accuracy_after'])} | "
            f"{fmt(sm['delta'], signed=True)} | {fmt(sm['reward_acc_early'], pct=False, digits=2)} | "
            f"{fmt(sm['reward_acc_end'], pct=False, digits=2)} | {base.get('ece', math.nan):.3f} | "
            f"{fmt(sm['ece_after'], pct=False, digits=3)} | {flags} |")
    ok = {n: r for n, r in sets.items() if r["status"] == "ok" and r["summary"]}
    tasks = list(base.get("per_task", {}))
    if ok and tasks:
        lines += ["", "## Accuracy per category (%, after: mean ± sd over seeds)", "",
                  "| task | n | before | " + " | ".join(ok) + " |",
                  "|---|---:|---:|" + "---:|" * len(ok)]
        for t in tasks:
            b = base["per_task"][t]
            cells = [fmt(r["summary"]["per_task_after"][t], digits=0) for r in ok.values()]
            lines.append(f"| {t} | {b['n']} | {100 * b['accuracy']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "## Expectations, checked", ""]
    lines += [f"- {c['claim']}: **{c['verdict']}** ({c['evidence']})" for c in report["checks"]]
    lines += ["", "## Sets", ""]
    for name, r in sets.items():
        why = "; ".join(f"{k[:120]} ({v})" for k, v in sorted(r["reject_reasons"].items(),
                                                               key=lambda kv: -kv[1])[:3])
        lines.append(f"- **{name}**: {r['source_examples']} source examples → {r['pairs']} pairs"
                     + (f" + {r['stage1_rows']} Stage-1 rows" if r["stage1_rows"] else "")
                     + f", {r['rejected_examples']} examples dropped" + (f" ({why})" if why else "")
                     + (f"; built in {r['build_seconds']:.0f} s" if r["build_seconds"] else "")
                     + (f"; not run: {r['reason']}" if r["status"] != "ok" else "") + ".")
    lines += ["", "## Definitions", "", report["definitions"], ""]
    return "\n".join(lines)


def checks(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """The three expectations of the benchmark, each with a verdict and its evidence."""
    sets = report["sets"]
    out = []

    def get(name: str) -> Mapping | None:
        r = sets.get(name)
        return r if r and r["status"] == "ok" and r["runs"] else None

    vapr, lb = get("vapr"), get("length-biased")
    claim = "VaPR pairs raise held-out accuracy over the base by more than the seed-to-seed spread"
    if vapr:
        d, sd = vapr["summary"]["delta"]
        verdict = "yes" if d > 0 and d > sd and len(vapr["runs"]) > 1 else "no"
        if len(vapr["runs"]) < 2:
            verdict = "undecided (one seed: no spread)"
        out.append({"claim": claim, "verdict": verdict,
                    "evidence": f"Δ {100 * d:+.1f} points, sd over seeds {100 * sd:.1f}"})
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
    return out


DEFINITIONS = (
    "- *random-negative* (DPO): chosen = the reference answer; rejected = the reference answer of "
    "another example of the same task, drawn with a per-example seed among those with a different "
    "answer text.\n"
    "- *length-biased* (DPO): chosen = the reference answer + one of: "
    + "; ".join(f"\"{c}\"" for c in CLAUSES)
    + " (per-example seed); rejected = the first ⌈w/2⌉ of the answer's w words.\n"
    "- Recipes are built by the build engine from the same `shapes` train examples with their "
    "default parameters except where the settings say otherwise (M3PO n and CW-DPO k = "
    "`--samples`); M3PO and VaPR train with DPO, P2-DPO with the P2-DPO loss (calibration + DDW), "
    "CW-DPO with the CW-DPO loss (Stage 1 SFT-C on "
    f"{CW_STAGE1_SHARE:.0%} of the steps, then Stage 2).\n"
    "- Accuracy: `pairforge.world.grade` of the greedy answer; unparseable counts as not correct.\n"
    "- ECE = Σ_b (|B_b|/N)·|acc(B_b) − conf(B_b)|, 10 equal-width bins (Guo et al. 2017, eq. 3); "
    "conf = exp(mean token log-prob of the greedy answer) under the evaluated model.\n"
    "- Reward accuracy: the trainer's per-step share of pairs with chosen reward > rejected reward, "
    "averaged over the first and the last 20% of the preference-stage steps (the first step left "
    "out: it is computed before any update, so all rewards are 0 there).\n"
    "- Audit flags: `pairforge audit` text metrics (GPT-2 token lengths) of each set."
)


# ============================================================================ building sets


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
                      time.perf_counter() - t0, len(rows), examples)


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
    """One benchmark run: settings, the sets, the runs, and the report files."""

    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.command = command
        self.work = Path(args.work)
        self.t0 = time.perf_counter()
        self.load_start = _load()
        self.sets: dict[str, SetResult] = {n: SetResult(n, RECIPE_LOSSES.get(n, "dpo")) for n in args.sets}
        self.base: dict[str, Any] = {}
        self.finished = ""

    # -- settings

    def settings(self) -> dict[str, Any]:
        a = self.args
        return {"model": a.model, "clip": a.clip, "source": self.source, "steps": a.steps,
                "batch_size": a.batch_size, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha,
                "lr": a.lr, "warmup": self.warmup, "beta": a.beta, "seeds": a.seeds,
                "n_source": a.n_source, "n_eval": a.n_eval, "data_seed": a.data_seed,
                "samples": a.samples, "max_new_tokens": a.max_new_tokens, "threads": a.threads,
                "sets": list(a.sets), "quick": a.quick}

    @property
    def source(self) -> str:
        return f"shapes:train?n={self.args.n_source}&seed={self.args.data_seed}"

    @property
    def warmup(self) -> int:
        return max(0, round(0.1 * self.args.steps))

    # -- report

    def report(self) -> dict[str, Any]:
        base_acc = self.base.get("accuracy", math.nan)
        base_tasks = self.base.get("per_task", {})
        sets = {}
        for n, r in self.sets.items():
            d = asdict(r)
            d["summary"] = r.summary(base_acc, base_tasks) if r.runs else None
            sets[n] = d
        rep = {"command": self.command, "settings": self.settings(), "base": self.base,
               "sets": sets, "wall_s": time.perf_counter() - self.t0, "finished": self.finished,
               "load_start": self.load_start, "load_end": _load(), "definitions": DEFINITIONS}
        rep["checks"] = checks(rep)
        return rep

    def write(self) -> dict[str, Any]:
        rep = self.report()
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipes.json").write_text(json.dumps(rep, indent=2, default=_json_default) + "\n")
        (out / "recipes.md").write_text(render_markdown(rep))
        return rep

    # -- building

    def build_all(self, say: Callable[[str], None]) -> None:
        from pairforge.sources.sft import ReadReject, read_examples

        loaded = [x for x in read_examples(self.source)]
        bad = [x for x in loaded if isinstance(x, ReadReject)]
        if bad:
            raise PairforgeError(f"{self.source}: {len(bad)} examples could not be read ({bad[0].reason})")
        self.examples = {ex.id: ex for ex in loaded}
        for name, res in self.sets.items():
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
            say(f"{name}: " + (f"{res.pairs} pairs, {res.rejected_examples} examples dropped, "
                               f"{res.build_seconds:.0f} s" if res.status == "ok"
                               else f"not run: {res.reason}"))
            self.write()

    def build_one(self, name: str, res: SetResult) -> None:
        from datasets import load_from_disk

        res.source_examples = len(self.examples)
        if name in CONTROLS:
            rows, dropped = control_rows(name, list(self.examples.values()), seed=0)
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
        res.chosen_correct, res.rejected_wrong = grade_pairs(ds, self.examples)

    def build_recipe(self, name: str, res: SetResult):
        from rich.console import Console

        from pairforge.engine import BuildConfig, build, load_build
        from pairforge.engine.manifest import local_fingerprint
        from pairforge.recipes import load_recipe

        a = self.args
        recipe = load_recipe(name)  # import errors surface here as "not run"
        roles = {role for role, *_ in recipe.roles}
        models: dict[str, str] = {}
        if "policy" in roles:
            models["policy"] = f"hf:{a.model}"
        if "clip" in roles:
            if a.clip is None:
                if name in NEEDS_CLIP:
                    raise PairforgeError("no CLIP model: the shipped tiny CLIP is missing; pass --clip PATH")
            else:
                models["clip"] = f"clip:{a.clip}"
        params: dict[str, Any] = {}
        if name == "m3po":
            params["n"] = a.samples
        if name == "cwdpo":
            params["k"] = a.samples
        fingerprints = [local_fingerprint(Path(a.model))] + ([local_fingerprint(Path(a.clip))] if a.clip else [])
        key = stable_id(name, self.source, sorted(models.items()), sorted(params.items()), *fingerprints)
        path = self.work / "builds" / f"{name}-{key}"
        summary = build(BuildConfig(recipe=name, out=path, source=self.source, models=models,
                                    params=params, seed=0, batch_size=a.build_batch_size),
                        console=Console(stderr=True, quiet=True), progress=False)
        c = summary["counts"]
        res.rejected_examples = c["rejected"]
        res.reject_reasons = {f"{stage}: {reason}": n
                              for stage, v in summary.get("rejects_by_stage", {}).items()
                              for reason, n in v.get("reasons", {"?": v["n"]}).items()}
        return load_build(path), path

    # -- training and evaluation

    def train_eval(self, name: str, res: SetResult, seed: int, rows: Sequence[Mapping]) -> RunResult:
        from pairforge.train import load_config, train

        a = self.args
        out = self.work / "runs" / name / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        steps, stage1_epochs = a.steps, 0.0
        if res.loss == "cwdpo":
            stage1_epochs, _, steps = cw_stage_steps(a.steps, res.stage1_rows, a.batch_size)
        cfg = load_config(data=res.path, out=str(out), loss=res.loss, model=f"hf:{a.model}",
                          steps=steps, batch_size=a.batch_size, lr=a.lr, warmup=self.warmup,
                          beta=a.beta, lora_r=a.lora_r, lora_alpha=a.lora_alpha, seed=seed,
                          merge=True, probe_size=0, progress=False, cw_stage1_epochs=stage1_epochs)
        summary = train(cfg)
        with open(out / "train_log.jsonl") as f:
            early, end = reward_accuracy_windows(json.loads(line) for line in f if line.strip())
        ev = evaluate(f"hf:{summary['outputs']['model']}", rows, max_new_tokens=a.max_new_tokens,
                      batch_size=a.eval_batch_size)
        if not a.keep_models:
            for sub in ("model", "adapter", "checkpoints", "reference", "tb"):
                shutil.rmtree(out / sub, ignore_errors=True)
        return RunResult(seed, ev.accuracy, ev.per_task, ev.ece, ev.mean_confidence, early, end,
                         summary["steps"], summary["stage1_steps"], summary["train_seconds"], ev.seconds,
                         ev.examples)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        a = self.args
        say = lambda msg: tqdm.write(f"[{(time.perf_counter() - self.t0) / 60:5.1f} min] {msg}")
        say(f"settings: {json.dumps(self.settings())}")
        say(f"building {len(self.sets)} sets from {self.source} under {self.work / 'builds'}")
        self.build_all(say)
        rows = held_out_rows(a.n_eval, a.data_seed)
        ev = evaluate(f"hf:{a.model}", rows, max_new_tokens=a.max_new_tokens, batch_size=a.eval_batch_size)
        self.base = {"accuracy": ev.accuracy, "per_task": ev.per_task, "ece": ev.ece,
                     "mean_confidence": ev.mean_confidence, "n": ev.n, "eval_seconds": ev.seconds,
                     "examples": ev.examples}
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
                    run = self.train_eval(name, res, seed, rows)
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
                self.write()
        self.finished = time.strftime("finished %Y-%m-%d %H:%M")
        rep = self.write()
        say(f"done in {rep['wall_s'] / 60:.1f} min → {Path(a.out_dir) / 'recipes.md'}")
        for c in rep["checks"]:
            say(f"check: {c['claim']}: {c['verdict']} ({c['evidence']})")
        return rep


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


# ============================================================================ command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pairforge.world.models import TINY_CLIP_PATH, TINY_VLM_PATH

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"tiny VLM folder (default: the shipped {TINY_VLM_PATH})")
    p.add_argument("--clip", default=None, help=f"CLIP folder (default: the shipped {TINY_CLIP_PATH})")
    p.add_argument("--sets", default=None, help=f"comma-separated, from {', '.join(ALL_SETS)} (default: all)")
    p.add_argument("--n-source", type=int, default=300, help="shapes train examples every set is built from")
    p.add_argument("--n-eval", type=int, default=300, help="held-out test questions")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (every set)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--samples", type=int, default=4, help="M3PO candidates n and CW-DPO samples k")
    p.add_argument("--data-seed", type=int, default=0, help="world seed of the train and test splits")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--build-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "pairforge-bench-recipes"),
                   help="builds, runs and audits (builds are reused when nothing changed)")
    p.add_argument("--out-dir", default=None, help="where recipes.md / recipes.json go "
                                                   "(default: benchmarks/; --quick: WORK/quick)")
    p.add_argument("--keep-models", action="store_true", help="keep the trained weights of every run")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 sets, 1 seed, 4 steps, 24 source examples, 12 test questions; "
                        "a random tiny LLaVA unless --model is given")
    a = p.parse_args(argv)
    if a.quick:
        defaults = {"n_source": 24, "n_eval": 12, "steps": 4, "batch_size": 4, "seeds": "0",
                    "samples": 2, "max_new_tokens": 12, "sets": ",".join(QUICK_SETS)}
        given = [x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:])]
        for k, v in defaults.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(a, k, v)
    a.sets = [s.strip() for s in (a.sets or ",".join(ALL_SETS)).split(",") if s.strip()]
    unknown = [s for s in a.sets if s not in ALL_SETS]
    if unknown:
        p.error(f"--sets: unknown set {unknown[0]!r}; choose from {', '.join(ALL_SETS)}")
    try:
        a.seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: expected integers separated by commas, e.g. 0,1,2")
    for name in ("n_source", "n_eval", "steps", "batch_size", "samples", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if not a.seeds:
        p.error("--seeds: give at least one seed")
    if a.model is None and not a.quick:
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
        a.out_dir = str(Path(a.work) / "quick") if a.quick else str(ROOT / "benchmarks")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:  # --quick without --model: a random tiny LLaVA
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
