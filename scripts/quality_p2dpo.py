"""Quality of P2-DPO focus crops on the offline world: do they contain the object the question
is about?

For world examples whose question names one object (``target.object_index`` >= 0: object,
colour, size, referential, spatial and "larger" reasoning questions), the recipe's own crop
(:meth:`pairforge.recipes.p2dpo.P2DPO.focus_crop`: the policy's attention with the
localisation prompt, then the adaptive multi-scale search) is compared with the ground-truth
box. Per crop: ``contains`` (the object's box lies inside the crop), ``centre`` (the object's
centre does) and ``coverage`` (share of the object's box inside the crop). Baselines on the
same images with boxes of the same size: ``random`` — the exact mean over every placement of
the box inside the image (no sampling noise) — and
``centre crop``. The ``oracle`` runs the same crop search on the ground-truth map (each patch's
share covered by the object): the ceiling of the search for a policy whose attention were
perfect, separating the search from the policy's attention. For two-object questions ``any``
counts either object.

``--build N`` also runs the whole recipe (pairs, filter, DDW) on N examples and reports what
it kept and why it dropped the rest, including pass two: the margin window fitted on those
examples' own margins (:meth:`P2DPO.run_pass`, the central 95 % by default; ``--param
margin_window=fixed`` for the paper's −0.174 / 0.208), its bounds and the share kept.

``--param key=value`` sets any recipe parameter (as ``pairforge build --param``).

    OMP_NUM_THREADS=1 python scripts/quality_p2dpo.py --n 300
    OMP_NUM_THREADS=1 python scripts/quality_p2dpo.py --n 300 --build 40
    OMP_NUM_THREADS=1 python scripts/quality_p2dpo.py --n 40 --build 40 --param noise_step=500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

CANDIDATE_VLM = Path("/tmp/tw/run1/tiny-llava")
CANDIDATE_CLIP = Path("/tmp/tw/run1/tiny-clip")


def default_policy() -> str:
    from pairforge.world.models import TINY_VLM_PATH

    if (TINY_VLM_PATH / "config.json").is_file():
        return "tiny-vlm"
    return f"hf:{CANDIDATE_VLM}"


def default_clip() -> str:
    from pairforge.world.models import TINY_CLIP_PATH

    return "tiny-clip" if (TINY_CLIP_PATH / "config.json").is_file() else f"clip:{CANDIDATE_CLIP}"


def box_measures(box, obj) -> tuple[float, float, float]:
    """(contains, centre inside, coverage) of object box ``obj`` by crop ``box``."""
    x0, y0, x1, y1 = box
    a0, b0, a1, b1 = obj
    contains = float(x0 <= a0 and y0 <= b0 and a1 <= x1 and b1 <= y1)
    cx, cy = (a0 + a1) / 2, (b0 + b1) / 2
    centre = float(x0 <= cx < x1 and y0 <= cy < y1)
    inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
    return contains, centre, inter / ((a1 - a0) * (b1 - b0))


def random_measures(size, objs, image_size) -> tuple[float, float, float, float]:
    """Exact means over every placement of a ``size`` box inside the image: (contains, centre
    inside, coverage) of ``objs[0]``, and the share of placements with any object's centre."""
    import numpy as np

    (bw, bh), (w, h) = size, image_size
    x0 = np.arange(w - bw + 1)[None, :]
    y0 = np.arange(h - bh + 1)[:, None]
    centres = []
    for k, (a0, b0, a1, b1) in enumerate(objs):
        cx, cy = (a0 + a1) / 2, (b0 + b1) / 2
        centres.append((x0 <= cx) & (cx < x0 + bw) & (y0 <= cy) & (cy < y0 + bh))
        if k == 0:
            contains = (x0 <= a0) & (y0 <= b0) & (a1 <= x0 + bw) & (b1 <= y0 + bh)
            ov = (np.clip(np.minimum(a1, x0 + bw) - np.maximum(a0, x0), 0, None)
                  * np.clip(np.minimum(b1, y0 + bh) - np.maximum(b0, y0), 0, None))
            first = (float(contains.mean()), float(centres[0].mean()), float(ov.mean() / ((a1 - a0) * (b1 - b0))))
    return (*first, float(np.logical_or.reduce(centres).mean()))


def coverage_map(obj, grid: tuple[int, int], image_size) -> Any:
    """The oracle attention map: the share of each grid cell covered by the object's box."""
    import numpy as np

    (gh, gw), (w, h) = grid, image_size
    xs, ys = np.arange(gw + 1) * w / gw, np.arange(gh + 1) * h / gh
    ox = np.clip(np.minimum(obj[2], xs[1:]) - np.maximum(obj[0], xs[:-1]), 0, None) / (w / gw)
    oy = np.clip(np.minimum(obj[3], ys[1:]) - np.maximum(obj[1], ys[:-1]), 0, None) / (h / gh)
    return oy[:, None] * ox[None, :]


def world_examples(n: int, split: str, seed: int):
    """The first ``n`` rows of ``split`` whose question names an object, as recipe Examples."""
    from pairforge.recipes import Example
    from pairforge.world import example_at

    out, i = [], 0
    while len(out) < n:
        r = example_at(split, i, seed, filter_share=0.0)
        i += 1
        if r["target"]["object_index"] < 0:
            continue
        out.append(Example(r["id"], r["messages"], r["images"], r["task"], "shapes", r["id"],
                           {"scene": r["scene"], "target": r["target"]}))
    return out


def crop_quality(rec, policy, examples, attention_on: str) -> dict:
    """Crop measures and baselines, overall and per task."""
    from tqdm.auto import tqdm

    from pairforge.recipes.p2dpo import adaptive_crop

    responses = [ex.answer for ex in examples]
    if attention_on == "policy":  # the recipe's own predicted answers (on the localisation prompt)
        responses = rec.predicted_answers(policy, [(ex, ex.images[0]) for ex in examples], seed=0)
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ratios: Counter = Counter()
    t0 = time.perf_counter()
    for ex, resp in zip(tqdm(examples, desc="focus crops", unit="ex"), responses):
        image = ex.images[0]
        choice, box = rec.focus_crop(policy, ex, image, resp)
        ratios[choice.ratio] += 1
        objs = ex.meta["scene"]["objects"]
        tgt = ex.meta["target"]
        size = (box[2] - box[0], box[3] - box[1])
        w, h = image.size
        centre_box = ((w - size[0]) // 2, (h - size[1]) // 2, (w - size[0]) // 2 + size[0],
                      (h - size[1]) // 2 + size[1])
        idx = [tgt["object_index"]] + ([tgt["reference_index"]] if tgt["reference_index"] >= 0 else [])
        boxes = [(objs[k]["x0"], objs[k]["y0"], objs[k]["x1"], objs[k]["y1"]) for k in idx]
        rnd = random_measures(size, boxes, (w, h))
        oracle = adaptive_crop(coverage_map(boxes[0], choice.grid, image.size), image.size,
                               rec.p.base_window * min(w, h)).box
        m = {"focus": box_measures(box, boxes[0]), "oracle": box_measures(oracle, boxes[0]),
             "random": rnd[:3], "centre crop": box_measures(centre_box, boxes[0])}
        for group in ("all", ex.task):
            for name, (contains, centre, cov) in m.items():
                sums[group][f"{name}|contains"].append(contains)
                sums[group][f"{name}|centre"].append(centre)
                sums[group][f"{name}|coverage"].append(cov)
            if len(boxes) == 2:
                sums[group]["focus|any centre"].append(max(box_measures(box, b)[1] for b in boxes))
                sums[group]["random|any centre"].append(rnd[3])
        sums["all"]["crop area share"].append(size[0] * size[1] / (w * h))
    seconds = time.perf_counter() - t0
    table = {g: {k: sum(v) / len(v) for k, v in d.items()} | {"n": len(d["focus|contains"])}
             for g, d in sums.items()}
    return {"table": table, "ratios": {str(k): v for k, v in sorted(ratios.items())},
            "seconds": seconds, "per_example_s": seconds / max(1, len(examples))}


def _quantiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"n": 0}
    q = np.percentile(values, [0, 2.5, 50, 97.5, 100])
    return {"n": len(values), **{k: float(v) for k, v in zip(("min", "p2.5", "median", "p97.5", "max"), q)}}


def build_report(rec_params: dict, policy, clip, examples) -> dict:
    """Run the whole recipe on ``examples``, then pass two (the margin window fitted on their
    own margins, :meth:`P2DPO.filter_rows`, as the build does when it finishes)."""
    from pairforge.recipes import BuildContext
    from pairforge.recipes.p2dpo import P2DPO

    ctx = BuildContext(seed=0, models={"policy": policy, "clip": clip})
    out: dict = {}
    rec = P2DPO.from_params(rec_params)
    rec.check(ctx)
    t0 = time.perf_counter()
    outcomes = rec.process(examples, ctx)
    out["build_seconds"] = time.perf_counter() - t0
    stats: Counter = Counter()
    for o in outcomes:
        stats.update(o.stats)
        if o.reject and not o.stats:
            stats["unusable"] += 1
    candidates = [r for o in outcomes for r in o.rows]
    rows, fit = rec.filter_rows(candidates)
    out.update(fit)
    paper = P2DPO.from_params({**rec_params, "margin_window": "fixed", "margin_low": -0.174,
                               "margin_high": 0.208}).filter_rows(candidates)[1]
    out["paper_window_kept_rate"] = paper["margin_kept_rate"]  # the same margins, App. D's numbers
    margins = sorted(r["p2dpo_margin"] for r in candidates)
    out["margins_by_kind"] = {k: _quantiles([r["p2dpo_margin"] for r in candidates if r["p2dpo_kind"] == k])
                              for k in ("focus", "robust")}
    out["margins_all"] = _quantiles(margins)
    gone = {r["id"] for r in candidates} - {r["id"] for r in rows}
    for r in candidates:
        if r["id"] in gone:
            stats[f"{r['p2dpo_kind']}_kept"] -= 1
            stats[f"{r['p2dpo_kind']}_dropped_margin"] += 1
    left = {r["p2dpo_example"] for r in rows}
    out["rejected_after_window"] = len({r["p2dpo_example"] for r in candidates} - left)
    out["stats"] = dict(sorted(stats.items()))
    out["rows"] = len(rows)
    out["rejected_examples"] = sum(o.reject is not None for o in outcomes) + out["rejected_after_window"]
    if rows:
        out["ddw_focus_mean"] = sum(r["ddw_focus"] for r in rows) / len(rows)
    out["examples"] = [{"kind": r["p2dpo_kind"], "question": r["prompt"][-1]["content"][-1]["text"],
                        "chosen": r["chosen"][0]["content"][0]["text"],
                        "rejected": r["rejected"][0]["content"][0]["text"],
                        "box": r["crop_box"], "ddw_focus": round(r["ddw_focus"], 3)} for r in rows[:6]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="policy spec (default: tiny-vlm when shipped, "
                                                  f"else hf:{CANDIDATE_VLM})")
    ap.add_argument("--clip", default=None, help="CLIP scorer spec for --build (default: tiny-clip "
                                                 f"when shipped, else clip:{CANDIDATE_CLIP})")
    ap.add_argument("--n", type=int, default=300, help="examples for the crop measures")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-window", type=float, default=0.4)
    ap.add_argument("--attention-on", choices=("answer", "policy"), default="policy")
    ap.add_argument("--layers", default=None, help="comma-separated attention layers (default all)")
    ap.add_argument("--build", type=int, default=0, help="also run the whole recipe on this many")
    ap.add_argument("--param", action="append", default=[], help="recipe parameter key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    from pairforge.engine import parse_params
    from pairforge.errors import PairforgeError
    from pairforge.models import load_model
    from pairforge.models.hf import HFModel
    from pairforge.recipes.p2dpo import P2DPO

    console = Console(stderr=True, width=140)
    spec = args.model or default_policy()
    try:
        params = {"base_window": args.base_window, "attention_on": args.attention_on,
                  "attention_layers": args.layers, **parse_params(args.param)}
        rec = P2DPO.from_params(params)
        policy = HFModel(spec, progress=False, batch_size=16)
    except PairforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    examples = world_examples(args.n, args.split, args.seed)
    q = crop_quality(rec, policy, examples, args.attention_on)
    report = {"policy": spec, "params": rec.params(), "split": args.split, "n": len(examples), **q}

    t = Table(title=f"P2-DPO focus crops vs same-size crops ({spec}, {args.split}, n={len(examples)})")
    for col in ("group", "n", "crop", "contains", "centre inside", "coverage", "any centre (2 objects)"):
        t.add_column(col, justify="left" if col in ("group", "crop") else "right")
    for g, row in sorted(q["table"].items(), key=lambda kv: (kv[0] != "all", kv[0])):
        for k, who in enumerate(("focus", "oracle", "random", "centre crop")):
            anyc = row.get(f"{who}|any centre")
            t.add_row(g if k == 0 else "", str(row["n"]) if k == 0 else "", who,
                      *[f"{row[f'{who}|{name}']:.3f}" for name in ("contains", "centre", "coverage")],
                      "" if anyc is None else f"{anyc:.3f}", end_section=k == 3)
    console.print(t)
    console.print("focus: the recipe's crop; oracle: the same crop search on the ground-truth coverage map; "
                  "random: same-size box, exact mean over all placements; centre crop: same-size box")
    a = q["table"]["all"]
    console.print(f"scales chosen (ratio: count): {q['ratios']}; crop area share {a['crop area share']:.3f}; "
                  f"{q['per_example_s'] * 1000:.0f} ms per crop")

    if args.build:
        clip = load_model(args.clip or default_clip(), role="clip", progress=False)
        report["build"] = build_report(rec.params(), policy, clip, examples[:args.build])
        b = report["build"]
        lo, hi = b["margin_window_lo"], b["margin_window_hi"]
        window = "none" if lo is None or hi is None else f"[{lo:.4f}, {hi:.4f}]"
        rate = b["margin_kept_rate"]
        console.print(f"build on {args.build} examples: {b['rows']} rows, {b['rejected_examples']} examples "
                      f"rejected, stats {b['stats']}, {b['build_seconds']:.1f} s; margin window "
                      f"({b['margin_window_rule']}) {window}, kept "
                      f"{'n/a' if rate is None else f'{rate:.1%}'} of {b['margin_window_n']} margins "
                      f"(the paper's fixed [-0.174, 0.208] would keep "
                      f"{'n/a' if b['paper_window_kept_rate'] is None else format(b['paper_window_kept_rate'], '.1%')})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"done: focus crops contain the target object {a['focus|contains']:.1%} of the time "
                  f"(random same-size {a['random|contains']:.1%}, centre crop {a['centre crop|contains']:.1%}); "
                  f"object centre inside {a['focus|centre']:.1%} vs {a['random|centre']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
