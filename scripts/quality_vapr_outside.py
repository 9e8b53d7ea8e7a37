"""Quality of VaPR pairs on outside wording: ``tests/data/vapr_outside.jsonl``, 308 question/answer
cases written by hand from the public question styles of VQAv2 and GQA (short answers), LLaVA
conversation and detail answers, yes/no questions with and without negation, counting with
digits and number words, colour and spatial questions about named objects. Not from
``pairforge.world``. Each case carries its verdict: for yes/no, whether the question's
proposition as written holds; for the others, the true value.

The corpus is written as LLaVA JSON with a tiny rendered image per case (the rule editor does
not look at pixels), read back through ``pairforge.sources`` and built with the VaPR recipe
(rule editor, defaults). Printed:

- share of eligible examples (not filtered as text-only, multiple-choice, bbox or OCR) with a
  pair (target >= 80 %);
- share of pairs whose rejected answer is coherent and wrong by the case's verdict (target
  >= 95 %);
- counts per failure class: double negation, yes/no with a body that contradicts it
  (``yes_negation``), type change, unchanged proposition (lead-only flips, same value), and
  rejected answers that still state the truth;
- the spread of replacement values per task; rejects by reason; the rule editor's speed.

    python scripts/quality_vapr_outside.py [--out outside.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from pairforge.recipes import BuildContext, Example, Outcome
from pairforge.recipes.vapr import VaPR
from pairforge.recipes.vapr import polarity as P
from pairforge.recipes.vapr.rules import VaprRules, tokens
from pairforge.schema import response_text
from pairforge.sources.sft import read_examples

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "vapr_outside.jsonl"
FILTERS = ("text_only", "multiple_choice", "bbox", "ocr")


def load_cases(path: Path = CORPUS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_llava(cases: list[dict], folder: Path) -> Path:
    """The cases as a LLaVA JSON file with one 8x8 PNG per case (a flat colour)."""
    img = folder / "images"
    img.mkdir(parents=True, exist_ok=True)
    records = []
    for k, c in enumerate(cases):
        name = f"{c['id']}.png"
        Image.new("RGB", (8, 8), ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256)).save(img / name)
        records.append({"id": c["id"], "image": f"images/{name}", "conversations": [
            {"from": "human", "value": "<image>\n" + c["question"]},
            {"from": "gpt", "value": c["answer"]}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def build(cases: list[dict], params: dict | None = None, seed: int = 0) -> tuple[list[Example], list[Outcome], VaPR, float]:
    """Examples read back from LLaVA JSON, their outcomes, the recipe and the rule editor's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        stream = read_examples(write_llava(cases, Path(tmp)))
        examples = [ex for ex in stream if isinstance(ex, Example)]
        if len(examples) != len(cases):
            raise SystemExit(f"the LLaVA reader dropped cases: {stream.summary()}")
        recipe = VaPR.from_params(params or {})
        t0 = time.perf_counter()
        outs = recipe.process(examples, BuildContext(seed=seed))
        return examples, outs, recipe, time.perf_counter() - t0


def verdict(case: dict, outcome: Outcome, rules: VaprRules) -> tuple[str, str]:
    """(class, detail) of one case's outcome against its verdict. Classes: ``filtered_right``,
    ``filtered_wrong``, ``pair_ok`` (rejected answer coherent and wrong), a failure class
    (``double_negation``, ``yes_negation``, ``unchanged``, ``type_change``, ``still_true``,
    ``wrong_chosen``), or ``reject`` (an eligible case without a pair; the detail is the reason)."""
    expect = case.get("expect_filter")
    if outcome.reject is not None and outcome.reject.stage == "filter" and outcome.reject.reason.split(":")[0] in FILTERS:
        got = outcome.reject.reason.split(":")[0]
        return ("filtered_right" if got == expect else "filtered_wrong"), got
    if expect:
        return "filtered_wrong", "not filtered"
    if not outcome.rows:
        return "reject", outcome.reject.reason
    row = outcome.rows[0]
    q = case["question"]
    chosen, rejected = response_text(row["chosen"]), response_text(row["rejected"])
    truth = case["truth"]
    if truth["kind"] == "yesno":
        lead_c, body_c = P.split_lead(chosen)
        lead_r, body_r = P.split_lead(rejected)
        want = "yes" if truth["holds"] else "no"
        if lead_c != want:
            return "wrong_chosen", chosen
        if P.double_negation(rejected):
            return "double_negation", rejected
        if lead_r is None or lead_r == lead_c:
            return "unchanged", rejected
        if body_c and (body_r.split() == body_c.split() or P.polarity(body_r, q) == P.polarity(body_c, q)):
            return "unchanged", rejected
        if P.coherent(rejected, q) is False:
            return "yes_negation", rejected
        return "pair_ok", rejected
    value = truth["value"].lower()
    orig, repl = str(row["edit_original"]).lower(), str(row["edit_replacement"]).lower()
    if repl == orig:
        return "unchanged", rejected
    if not _states(chosen, value, rules):
        return "wrong_chosen", chosen
    if value in orig and _states(repl, value, rules):
        return "still_true", rejected
    classes = lambda text: {s.cls for s in rules.spans(text, list(rules.classes))}
    co, cr = classes(orig), classes(repl)
    if co and cr and not co & cr:
        return "type_change", f"{orig} -> {repl}"
    return "pair_ok", rejected


def _states(text: str, value: str, rules: VaprRules) -> bool:
    """Does ``text`` state ``value`` (as words, or as the same canonical value: "two" = "2")?"""
    words = " ".join(w.text for w in tokens(text))
    if f" {value} " in f" {words} ":
        return True
    found = {s.value for s in rules.spans(text, list(rules.classes))}
    want = {s.value for s in rules.spans(value, list(rules.classes))}
    return bool(want) and bool(want & found)


def evaluate(cases: list[dict], outs: list[Outcome], recipe: VaPR) -> dict:
    verdicts = [verdict(c, o, recipe.rules) for c, o in zip(cases, outs)]
    classes = Counter(v for v, _ in verdicts)
    eligible = [v for c, (v, _) in zip(cases, verdicts) if not c.get("expect_filter")]
    pairs = [v for v in eligible if v != "reject"]
    rejects = Counter(d.split(":")[0] if "first:" not in d else "validate/" + d.split("first: ")[1].split(":")[0]
                      for v, d in verdicts if v == "reject")
    by_style: dict[str, Counter] = {}
    for c, (v, _) in zip(cases, verdicts):
        by_style.setdefault(c["style"], Counter())[v] += 1
    failures = {k: classes.get(k, 0) for k in ("double_negation", "yes_negation", "type_change", "unchanged",
                                               "still_true", "wrong_chosen")}
    return {
        "cases": len(cases), "eligible": len(eligible), "pairs": len(pairs),
        "pair_share": len(pairs) / max(len(eligible), 1),
        "coherent_wrong_share": classes.get("pair_ok", 0) / max(len(pairs), 1),
        "failures": failures, "filters_right": classes.get("filtered_right", 0),
        "filters_wrong": classes.get("filtered_wrong", 0), "rejects": dict(rejects.most_common()),
        "by_style": {s: dict(c) for s, c in sorted(by_style.items())},
        "failed_examples": [(c["question"], c["answer"], v, d) for c, (v, d) in zip(cases, verdicts)
                            if v not in ("pair_ok", "filtered_right", "reject")][:12],
        "reject_examples": [(c["question"], c["answer"], d[:110]) for c, (v, d) in zip(cases, verdicts)
                            if v == "reject"][:12],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--repeat", type=int, default=10, help="corpus copies for the speed measurement")
    ap.add_argument("--out", help="write all numbers to this JSON file")
    args = ap.parse_args()
    cases = load_cases(Path(args.corpus))
    _, outs, recipe, _ = build(cases)
    rep = evaluate(cases, outs, recipe)
    rep["distribution"] = recipe.replacement_stats()
    many = [dict(c, id=f"{c['id']}-{k}") for k in range(args.repeat) for c in cases]
    _, _, _, seconds = build(many)
    rep["rule_examples_per_s"] = len(many) / seconds
    expanded = evaluate(cases, build(cases, {"short_answers": "sentence"})[1], recipe)
    rep["short_answers_sentence"] = {k: expanded[k] for k in ("pair_share", "coherent_wrong_share", "failures")}

    print(f"VaPR (rule editor, defaults) on {rep['cases']} outside cases ({CORPUS.name}):")
    print(f"  eligible examples with a pair: {rep['pairs']} / {rep['eligible']} = {rep['pair_share']:.1%}  (target >= 80 %)")
    print(f"  pairs coherent and wrong:      {rep['coherent_wrong_share']:.1%}  (target >= 95 %)")
    print(f"  failure classes:               {rep['failures']}")
    print(f"  filters right / wrong:         {rep['filters_right']} / {rep['filters_wrong']}")
    print(f"  rejects:                       {rep['rejects']}")
    print(f"  rule editor speed:             {rep['rule_examples_per_s']:.0f} examples/s "
          f"({len(many)} examples, target > 300)")
    print(f"  with short_answers=sentence:   {rep['short_answers_sentence']}")
    print("  by style:")
    for s, c in rep["by_style"].items():
        print(f"    {s:8s} {c}")
    print("  replacement values per task (n, entropy bits / max, top value share):")
    for task, d in rep["distribution"].items():
        top = ", ".join(f"{v}:{k}" for v, k in list(d["counts"].items())[:6])
        print(f"    {task:12s} n={d['n']:3d} H={d['entropy_bits']:.2f}/{d['max_entropy_bits']:.2f} "
              f"top {d['top_value']!r} {d['top_share']:.0%}  [{top}]")
    for q, a, v, d in rep["failed_examples"]:
        print(f"  FAIL {v}: {q!r} / {a!r} -> {d!r}")
    for q, a, d in rep["reject_examples"]:
        print(f"  reject: {q!r} / {a!r}: {d}")
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
