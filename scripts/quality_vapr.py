"""Quality of VaPR pairs on the offline world, where the ground truth is known.

Calls the recipe directly (no build engine) on ``--n`` world SFT examples and reports:

- how many rejected answers the world's grader finds coherent and wrong (target >= 95 %;
  a yes/no sentence whose leading word and statement disagree is graded ``incoherent`` and
  counted apart), and that every chosen answer is graded correct;
- median normalised word Levenshtein over sentence answers (more than three words; target
  <= 0.15) and median |token length gap| in GPT-2 tokens (target <= 2) between chosen and
  rejected (``pairforge.diagnostics.text``);
- the replacement values per task: counts, entropy, top share (target: no value above 50 %);
- the categorizer's accuracy against the world's task labels, and the filters against the
  world's ``filter_reason``;
- yield and rejects by stage and reason; the same with ``lev_floor_words=1`` for comparison;
- the LLM editor (SmolLM2) on ``--llm-sample`` examples: accepted at first try / after the
  retry, fallbacks to the rule editor, rejects, and how many LLM edits are graded wrong.

    python scripts/quality_vapr.py --n 1000 --llm-sample 40 [--out quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import pairforge.world as W  # noqa: E402
from pairforge.diagnostics.lengths import length_unit  # noqa: E402
from pairforge.diagnostics.text import pair_metrics  # noqa: E402
from pairforge.recipes import BuildContext, Example, Outcome  # noqa: E402
from pairforge.recipes.vapr import VaPR  # noqa: E402
from pairforge.schema import response_text  # noqa: E402
from pairforge.sources.sft import read_examples  # noqa: E402

console = Console(width=130)


def run(recipe: VaPR, examples: list[Example], ctx: BuildContext, desc: str, chunk: int = 50) -> list[Outcome]:
    out: list[Outcome] = []
    with tqdm(total=len(examples), desc=desc, unit="ex") as bar:
        for i in range(0, len(examples), chunk):
            out += recipe.process(examples[i:i + chunk], ctx)
            bar.update(min(chunk, len(examples) - i))
    return out


def evaluate(examples: list[Example], outs: list[Outcome]) -> dict:
    """Grades (against the world's ground truth in ``Example.meta``), text metrics, rejects
    and stats of one run."""
    kept = [(ex.meta, o.rows[0]) for ex, o in zip(examples, outs) if o.rows]
    chosen = [response_text(p["chosen"]) for _, p in kept]
    rejected = [response_text(p["rejected"]) for _, p in kept]
    grades = [W.grade(r, x) for (r, _), x in zip(kept, rejected)]
    chosen_ok = sum(W.grade(r, c) == "correct" for (r, _), c in zip(kept, chosen))
    m = pair_metrics(chosen, rejected, length_unit("gpt2"), threads=1) if kept else None
    per_task: dict[str, Counter] = {}
    for (r, p), g in zip(kept, grades):
        per_task.setdefault(p["task"], Counter())[g] += 1
    stats: Counter = Counter()
    for o in outs:
        stats.update(o.stats)
    rejects = Counter()  # by stage and reason code, e.g. validate/too_different
    for o in outs:
        if o.reject:
            rejects.update(k for k in o.stats if k.split("/")[0] in (o.reject.stage, "llm"))
    sentence = [len(c.split()) > 3 for c in chosen]
    not_wrong = [(p["task"], g, c, x) for (r, p), g, c, x in zip(kept, grades, chosen, rejected) if g != "wrong"]
    return {
        "n": len(examples), "kept": len(kept), "rejects": dict(rejects.most_common()),
        "grades": dict(Counter(grades)), "wrong_share": grades.count("wrong") / max(len(kept), 1),
        "incoherent_share": grades.count("incoherent") / max(len(kept), 1),
        "median_lev_norm_sentences": float(np.median(m["lev_norm"][np.array(sentence)]))
        if m is not None and any(sentence) else None,
        "chosen_correct_share": chosen_ok / max(len(kept), 1),
        "per_task_grades": {t: dict(c) for t, c in sorted(per_task.items())},
        "median_lev_norm": float(np.median(m["lev_norm"])) if m else None,
        "median_abs_token_gap": float(np.median(np.abs(m["len_gap"]))) if m else None,
        "stats": dict(stats), "not_wrong_examples": not_wrong[:8],
    }


def filters_and_categorizer(examples: list[Example], outs: list[Outcome]) -> dict:
    """Filters against ``filter_reason``; the categorizer against the world's task labels."""
    filt = Counter()
    for ex, o in zip(examples, outs):
        want = ex.meta["filter_reason"]
        got = o.reject.reason.split(":")[0] if o.reject and o.reject.stage == "filter" else None
        filt["right" if got == want else "wrong"] += 1
    stats = Counter()
    for o in outs:
        stats.update(o.stats)
    agree, disagree = stats["categorizer/agree"], stats["categorizer/disagree"]
    return {"filter_right": filt["right"], "filter_wrong": filt["wrong"],
            "categorizer_accuracy": agree / max(agree + disagree, 1), "categorized": int(agree + disagree)}


def llm_sample(examples: list[Example], k: int) -> dict:
    import torch

    from pairforge.models.hf import HFModel

    torch.set_num_threads(1)
    picked = [ex for ex in examples if ex.meta["filter_reason"] is None][:k]
    t0 = time.time()
    editor = HFModel("smollm2", batch_size=8, progress=False)
    recipe = VaPR.from_params({"editor": "llm"})
    ctx = BuildContext(seed=0, models={"editor": editor})
    recipe.check(ctx)
    outs = run(recipe, picked, ctx, "vapr llm (smollm2)", chunk=recipe.p.penalty_every)
    res = evaluate(picked, outs)
    s = res["stats"]
    llm_rows = [(ex, o.rows[0]) for ex, o in zip(picked, outs) if o.rows and o.rows[0]["editor"] == "llm"]
    llm_wrong = sum(W.grade(ex.meta, response_text(p["rejected"])) == "wrong" for ex, p in llm_rows)
    per_task = Counter(p["task"] for _, p in llm_rows)
    return {"n": len(picked), "seconds": time.time() - t0,
            "first_try": int(s.get("llm/first_try", 0)), "retry": int(s.get("llm/retry", 0)),
            "fallback_rule": int(s.get("llm/fallback", 0)), "rejected": int(s.get("llm/rejected", 0)),
            "acceptance_rate": len(llm_rows) / max(len(picked), 1),
            "llm_edits_wrong_share": llm_wrong / max(len(llm_rows), 1),
            "llm_accepted_by_task": dict(per_task), "grades_all": res["grades"],
            "examples": [(p["task"], response_text(p["chosen"]), response_text(p["rejected"]))
                         for _, p in llm_rows[:6]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="world examples (split 'train')")
    ap.add_argument("--seed", type=int, default=0, help="world seed and run seed")
    ap.add_argument("--llm-sample", type=int, default=40, help="examples for the SmolLM2 editor (0: skip)")
    ap.add_argument("--out", help="write all numbers to this JSON file")
    args = ap.parse_args()

    t0 = time.time()
    stream = read_examples(f"shapes:train?n={args.n}&seed={args.seed}")
    examples = [ex for ex in tqdm(stream, total=args.n, desc="world", unit="ex")]
    if stream.n_rejected:
        raise SystemExit(f"the world source rejected examples: {stream.summary()}")
    report: dict = {"n": args.n, "seed": args.seed}

    recipe = VaPR()
    t1 = time.time()
    outs = run(recipe, examples, BuildContext(seed=args.seed), "vapr rule editor")
    report["rule_seconds"] = time.time() - t1
    report["rule"] = evaluate(examples, outs)
    report["rule"] |= filters_and_categorizer(examples, outs)
    report["distribution"] = recipe.replacement_stats()
    floor1 = VaPR.from_params({"lev_floor_words": 1})
    report["rule_floor1"] = evaluate(examples, run(floor1, examples, BuildContext(seed=args.seed),
                                               "vapr rule editor, lev_floor_words=1"))
    report["distribution_floor1"] = floor1.replacement_stats()
    if args.llm_sample:
        report["llm"] = llm_sample(examples, args.llm_sample)
    report["seconds"] = time.time() - t0
    show(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        console.print(f"wrote {args.out}")


def show(rep: dict) -> None:
    r = rep["rule"]
    t = Table(title=f"VaPR on {rep['n']} world examples (rule editor, defaults)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("target")
    top = max(d["top_share"] for d in rep["distribution"].values())
    for name, value, target in [
        ("pairs kept", f"{r['kept']} / {r['n']}", ""),
        ("rejected graded coherent and wrong", f"{r['wrong_share']:.1%}", ">= 95 %"),
        ("rejected graded incoherent", f"{r['incoherent_share']:.1%}", "0 %"),
        ("chosen graded correct", f"{r['chosen_correct_share']:.1%}", "100 %"),
        ("median normalised word Levenshtein, sentence answers", f"{r['median_lev_norm_sentences']:.3f}",
         "<= 0.15"),
        ("median normalised word Levenshtein, all", f"{r['median_lev_norm']:.3f}", ""),
        ("median |token gap| (gpt2)", f"{r['median_abs_token_gap']:.1f}", "<= 2"),
        ("largest top-value share of a task", f"{top:.1%}", "<= 50 %"),
        ("categorizer accuracy", f"{r['categorizer_accuracy']:.1%} of {r['categorized']}", ""),
        ("filters right", f"{r['filter_right']} / {r['filter_right'] + r['filter_wrong']}", ""),
        ("rule editor time", f"{rep['rule_seconds']:.1f} s", ""),
    ]:
        t.add_row(name, value, target)
    console.print(t)
    console.print("rejects:", r["rejects"])
    console.print("grades per task:", r["per_task_grades"])
    for task, g, c, x in r["not_wrong_examples"]:
        console.print(f"  not wrong ({task}, {g}): {c!r} -> {x!r}")
    d = Table(title="replacement values per task")
    for c in ("task", "n", "entropy (bits)", "max", "top value", "top share", "counts"):
        d.add_column(c)
    for task, s in rep["distribution"].items():
        counts = ", ".join(f"{v}:{k}" for v, k in list(s["counts"].items())[:6])
        d.add_row(task, str(s["n"]), f"{s['entropy_bits']:.2f}", f"{s['max_entropy_bits']:.2f}",
                  s["top_value"], f"{s['top_share']:.0%}", counts)
    console.print(d)
    f1 = rep["rule_floor1"]
    tops = {k: round(v["top_share"], 2) for k, v in rep["distribution_floor1"].items()}
    console.print(f"with lev_floor_words=1: kept {f1['kept']} / {f1['n']}, wrong {f1['wrong_share']:.1%}, "
                  f"median lev {f1['median_lev_norm']:.3f}, median |gap| {f1['median_abs_token_gap']:.1f}, "
                  f"top shares {tops}")
    if "llm" in rep:
        m = rep["llm"]
        console.print(f"LLM editor (SmolLM2) on {m['n']} examples in {m['seconds']:.0f} s: accepted "
                      f"{m['acceptance_rate']:.0%} (first try {m['first_try']}, after retry {m['retry']}), "
                      f"fallback to rules {m['fallback_rule']}, rejected {m['rejected']}; LLM edits graded "
                      f"wrong {m['llm_edits_wrong_share']:.0%}; accepted by task {m['llm_accepted_by_task']}")
        for task, c, x in m["examples"]:
            console.print(f"  {task}: {c!r} -> {x!r}")
    console.print(f"done in {rep['seconds']:.0f} s")


if __name__ == "__main__":
    main()
