"""Evaluate the tiny VLM and the tiny CLIP of the offline world on held-out (test split) data.

    python scripts/eval_world_models.py                    # the shipped checkpoints
    python scripts/eval_world_models.py --vlm /tmp/tiny-llava --clip /tmp/tiny-clip --update-cards

VLM: greedy answers to the test split (filter examples excluded), graded by the world's
``grade``, per task category; then sampling at temperature 1.0 (pure sampling) on the first
``--sample-questions`` questions × ``--samples``: mean distinct answers per question, the
share of questions with both a correct and a wrong sample, and mean sample accuracy.

CLIP: on the test split's scenes, how often the true scene description scores higher than a
minimal wrong edit of it (one colour, kind, count or position swapped), per edit type.

``--update-cards`` writes the tables into each checkpoint's README.md (between the
``<!-- eval:start -->`` / ``<!-- eval:end -->`` markers); ``--json`` saves all numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from pairforge.diagnostics.model_based import wilson_ci95
from pairforge.world import TASKS, caption_credit, derive_seed, grade, sft_dataset
from pairforge.world.models import (
    DESCRIPTION_FORMATS,
    EDIT_TYPES,
    TINY_CLIP_PATH,
    TINY_VLM_PATH,
    clip_similarity,
    edited_description,
    generate_answers,
    load_tiny_clip,
    load_tiny_vlm,
    scene_description,
)

START, END = "<!-- eval:start -->", "<!-- eval:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vlm", type=Path, default=TINY_VLM_PATH)
    p.add_argument("--clip", type=Path, default=TINY_CLIP_PATH)
    p.add_argument("--clip-text-format", choices=DESCRIPTION_FORMATS, default="fair",
                   help="format of the CLIP's descriptions and edits (fair: the text alone decides no "
                        "edit; session-4: the shipped CLIP's training format, which lets it decide some)")
    p.add_argument("--skip-vlm", action="store_true")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--n-test", type=int, default=1000,
                   help="held-out questions evaluated: the first N test-split rows that are not "
                        "filter examples")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--sample-questions", type=int, default=100)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--update-cards", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}" if n else "-"


def eval_vlm(args, rows) -> tuple[dict, str]:
    model, processor = load_tiny_vlm(path=args.vlm)
    greedy = []
    for s in tqdm(range(0, len(rows), args.batch_size), desc="vlm greedy", unit="batch"):
        greedy += generate_answers(model, processor, rows[s:s + args.batch_size],
                                   batch_size=args.batch_size)
    grades = [grade(r, a[0]) for r, a in zip(rows, greedy)]
    by_task: dict[str, Counter] = defaultdict(Counter)
    for r, g in zip(rows, grades):
        by_task[r["task"]][g] += 1
    total = Counter(grades)
    credits = [caption_credit(r, a[0]) for r, a in zip(rows, greedy) if r["task"] == "captioning"]
    parsed = [c for c in credits if c is not None]
    caption = {"n": len(credits), "parsed": len(parsed),
               "precision": sum(c["precision"] for c in parsed) / len(parsed) if parsed else None,
               "recall": sum(c["recall"] for c in parsed) / len(parsed) if parsed else None}

    sq = rows[:args.sample_questions]
    samples = []
    for s in tqdm(range(0, len(sq), 10), desc="vlm sampling", unit="batch"):
        samples += generate_answers(model, processor, sq[s:s + 10], batch_size=10, temperature=1.0,
                                    num_samples=args.samples, seed=args.data_seed + s)
    distinct = [len({a.lower() for a in ans}) for ans in samples]
    sgrades = [[grade(r, a) for a in ans] for r, ans in zip(sq, samples)]
    both = sum(("correct" in g) and ("wrong" in g) for g in sgrades)
    s_correct = sum(g.count("correct") for g in sgrades)
    n_s = sum(len(g) for g in sgrades)

    res = {
        "n": len(rows),
        "accuracy": total["correct"] / len(rows),
        "unparseable": total["unparseable"] / len(rows),
        "accuracy_ci95": wilson_ci95(total["correct"], len(rows)),
        "correct": "".join("1" if g == "correct" else "0" for g in grades),  # per question, for paired tests
        "caption_credit": caption,
        "per_task": {t: {"n": sum(by_task[t].values()), "correct": by_task[t]["correct"],
                         "wrong": by_task[t]["wrong"], "unparseable": by_task[t]["unparseable"]}
                     for t in TASKS},
        "sampling": {"questions": len(sq), "samples": args.samples,
                     "mean_distinct_answers": sum(distinct) / len(distinct),
                     "share_with_correct_and_wrong": both / len(sq),
                     "sample_accuracy": s_correct / n_s} if sq else None,
        "examples": [{"task": r["task"], "question": r["question"], "answer": r["answer"],
                      "greedy": a[0], "grade": g} for r, a, g in list(zip(rows, greedy, grades))[:10]],
    }
    lines = ["| task | n | correct % | wrong % | unparseable % |", "|---|---:|---:|---:|---:|"]
    for t in TASKS:
        c = by_task[t]
        n = sum(c.values())
        lines.append(f"| {t} | {n} | {pct(c['correct'], n)} | {pct(c['wrong'], n)} | "
                     f"{pct(c['unparseable'], n)} |")
    n = len(rows)
    lines.append(f"| **all** | {n} | **{pct(total['correct'], n)}** | {pct(total['wrong'], n)} | "
                 f"{pct(total['unparseable'], n)} |")
    lo, hi = res["accuracy_ci95"]
    lines += ["", f"Overall accuracy 95% interval (Wilson): {100 * lo:.1f}–{100 * hi:.1f}%."]
    if parsed:
        lines += [f"Captions, partial credit ({len(parsed)} of {len(credits)} with an object mention, "
                  f"`pairforge.world.caption_credit`): {100 * caption['precision']:.1f}% of their mentions "
                  f"hold in the scene; they name {100 * caption['recall']:.1f}% of the scene's objects."]
    sm = res["sampling"]
    if sm is not None:
        lines += ["", f"Sampling at temperature 1.0 (no top-k/top-p), {sm['questions']} test questions × "
                      f"{sm['samples']} samples: {sm['mean_distinct_answers']:.2f} distinct answers per "
                      f"question on average; {100 * sm['share_with_correct_and_wrong']:.0f}% of questions "
                      f"have both a correct and a wrong sample; samples are correct "
                      f"{100 * sm['sample_accuracy']:.1f}% of the time."]
    return res, "\n".join(lines)


def eval_clip(args, rows) -> tuple[dict, str]:
    model, processor = load_tiny_clip(path=args.clip)
    images, trues, edits, kinds = [], [], [], []
    for r in rows:
        true = scene_description(r["scene"], args.clip_text_format)
        for e in EDIT_TYPES:
            wrong = edited_description(r["scene"], e, random.Random(derive_seed("clip-eval", r["id"], e)),
                                       args.clip_text_format)
            if wrong is None:
                continue
            images.append(r["images"][0])
            trues.append(true)
            edits.append(wrong)
            kinds.append(e)
    wins = []
    for s in tqdm(range(0, len(images), 128), desc="clip", unit="batch"):
        im = images[s:s + 128]
        a = clip_similarity(model, processor, im, trues[s:s + 128])
        b = clip_similarity(model, processor, im, edits[s:s + 128])
        wins += (a > b).tolist()
    per = {e: {"n": sum(k == e for k in kinds), "true_wins": sum(w for w, k in zip(wins, kinds) if k == e)}
           for e in EDIT_TYPES}
    res = {"text_format": args.clip_text_format, "n_pairs": len(wins), "n_scenes": len(rows),
           "true_wins_rate": sum(wins) / len(wins),
           "per_edit": per}
    lines = [(f"Descriptions and edits in the `{args.clip_text_format}` format "
              f"(`pairforge.world.models.DESCRIPTION_FORMATS`)."), "",
             "| edit | pairs | true description scores higher % |", "|---|---:|---:|"]
    for e in EDIT_TYPES:
        lines.append(f"| {e} | {per[e]['n']} | {pct(per[e]['true_wins'], per[e]['n'])} |")
    lines.append(f"| **all** | {len(wins)} | **{pct(sum(wins), len(wins))}** |")
    return res, "\n".join(lines)


def update_card(folder: Path, table: str, command: str) -> None:
    card = folder / "README.md"
    if not card.is_file():
        print(f"warning: {card} missing; the table was not written")
        return
    text = card.read_text()
    if START not in text or END not in text:
        print(f"warning: {card} has no {START} … {END} markers; the table was not written")
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = f"{START}\nMeasured with `{command}`:\n\n{table}\n{END}"
    card.write_text(head + body + tail)
    print(f"wrote the table into {card}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    command = "python scripts/eval_world_models.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--update-cards")
    # about 5% of rows are filter examples: draw enough rows for N questions, keep the first N
    data = sft_dataset(n_train=0, n_validation=0, n_test=int(args.n_test * 1.1) + 20, seed=args.data_seed)["test"]
    keep = [i for i, r in enumerate(data["filter_reason"]) if r is None][:args.n_test]
    data = data.select(range(keep[-1] + 1)) if keep else data
    rows = list(data.select(keep))
    print(f"test split: {len(data)} rows, {len(data) - len(rows)} filter examples excluded, "
          f"{len(rows)} evaluated")
    out = {"n_test_rows": len(data), "n_excluded": len(data) - len(rows)}
    if not args.skip_vlm:
        res, table = eval_vlm(args, rows)
        out["vlm"] = res
        print(f"\ntiny VLM ({args.vlm}), greedy, held-out test split\n{table}")
        if args.update_cards:
            update_card(args.vlm, table, command.strip())
    if not args.skip_clip:
        res, table = eval_clip(args, rows)
        out["clip"] = res
        print(f"\ntiny CLIP ({args.clip}), true description vs a minimal wrong edit\n{table}")
        if args.update_cards:
            update_card(args.clip, table, command.strip())
    out["seconds"] = round(time.time() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"done in {out['seconds']:.0f}s")


if __name__ == "__main__":
    main()
