"""Quality of the M3PO, CW-DPO and ASPO recipes on the offline shapes world (ground truth).

    python scripts/quality_recipes.py [--n 96] [--policy SPEC] [--clip PATH] [--out quality.json]

- **M3PO**: of the pairs it selects, the share whose chosen is graded correct and rejected
  wrong, against the same share for a random ordered pair of distinct candidates from the
  same pools (exact expectation over all such pairs), plus the shares behind it (chosen
  correct, rejected wrong) and the ceiling (pools holding both a correct and a wrong answer).
- **CW-DPO**: negatives dropped as too easy, the ℓ̄ distribution (quantiles) of the wrong
  on-policy answers before the filter and of the kept negatives, pairs per stage.
- **ASPO**: on the chosen answers of those pairs, the share of one-sentence answers and the
  distribution of the weights of multi-sentence answers.

Policy: ``hf:/tmp/tw/run1/tiny-llava`` when it exists (the trained candidate), else the shipped
``tiny-vlm``. CLIP: ``pairforge.models.clip`` when present, else the world's tiny CLIP (the
trained candidate ``/tmp/tw/run1/tiny-clip`` first) through a minimal scorer. One thread; the
default run takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pairforge.recipes import BuildContext, Example, Reject  # noqa: E402
from pairforge.recipes.aspo import annotate  # noqa: E402
from pairforge.recipes.cwdpo import CWDPO, CWDPOParams  # noqa: E402
from pairforge.recipes.m3po import M3PO, DegeneratePool, M3POParams, Pool, select_pair  # noqa: E402
from pairforge.schema import response_text  # noqa: E402
from pairforge.world import example_at, grade  # noqa: E402

TRAINED_VLM = Path("/tmp/tw/run1/tiny-llava")
TRAINED_CLIP = Path("/tmp/tw/run1/tiny-clip")


class WorldClip:
    """A minimal :class:`~pairforge.models.ImageTextScorer` over the world's tiny CLIP, for
    when ``pairforge.models.clip`` is not there yet."""

    revision = ""

    def __init__(self, path: Path, batch_size: int = 128):
        from pairforge.world.models import load_tiny_clip

        self.model, self.processor = load_tiny_clip(path=path)
        self.name, self.batch_size = f"clip:{path}", batch_size

    def cosine(self, images, texts):
        from pairforge.world.models import clip_similarity

        out = []
        for s in range(0, len(texts), self.batch_size):
            out += clip_similarity(self.model, self.processor, images[s:s + self.batch_size],
                                   texts[s:s + self.batch_size]).tolist()
        return out

    def cosine_matrix(self, images, texts):
        return [self.cosine([im] * len(texts), list(texts)) for im in images]


def load_models(policy_spec: str | None, clip_path: str | None):
    from pairforge.models import load_model
    from pairforge.world.models import TINY_CLIP_PATH

    spec = policy_spec or (f"hf:{TRAINED_VLM}" if (TRAINED_VLM / "config.json").is_file() else "tiny-vlm")
    policy = load_model(spec, role="policy", batch_size=32, progress=False)
    path = Path(clip_path) if clip_path else (TRAINED_CLIP if (TRAINED_CLIP / "config.json").is_file()
                                               else TINY_CLIP_PATH)
    if importlib.util.find_spec("pairforge.models.clip") is not None:
        clip = load_model(f"clip:{path}", role="clip")
    else:
        clip = WorldClip(path)
    return policy, clip


def world_example(row: dict) -> Example:
    meta = {k: row[k] for k in ("target", "scene", "answer_value", "filter_reason")}
    return Example(id=row["id"], messages=row["messages"], images=row["images"], task=row["task"],
                   source_dataset="shapes", source_id=row["id"], meta=meta)


def quantiles(xs, qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    return {f"q{int(q * 100):02d}": round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 4) for q in qs}


def share(a: float, b: int) -> float | None:
    return round(a / b, 4) if b else None


# ----------------------------------------------------------------------------- M3PO


def m3po_quality(pools: list[tuple[Example, Pool | Reject]], p: M3POParams) -> dict:
    n_pairs = cw = chosen_ok = rejected_wrong = 0
    rand_cw = rand_chosen_ok = rand_rejected_wrong = 0.0
    ceiling = 0
    rejects = Counter()
    for ex, pool in pools:
        if isinstance(pool, Reject):
            rejects[pool.stage] += 1
            continue
        try:
            sel = select_pair(pool.texts, pool.mas, pool.logp, p.alpha, p.delta)
        except DegeneratePool:
            rejects["select"] += 1
            continue
        grades = {t.strip(): grade(ex.meta, t) for t in pool.texts if t.strip()}
        g = list(grades.values())
        n_pairs += 1
        gw, gl = grades[pool.texts[sel.chosen].strip()], grades[pool.texts[sel.rejected].strip()]
        cw += gw == "correct" and gl == "wrong"
        chosen_ok += gw == "correct"
        rejected_wrong += gl == "wrong"
        d = len(g)  # random ordered pair of distinct candidates
        n_c, n_w = g.count("correct"), g.count("wrong")
        rand_cw += n_c * n_w / (d * (d - 1))
        rand_chosen_ok += n_c / d
        rand_rejected_wrong += n_w / d
        ceiling += n_c > 0 and n_w > 0
    return {
        "examples": len(pools), "pairs": n_pairs, "rejects": dict(rejects),
        "m3po_chosen_correct_and_rejected_wrong": share(cw, n_pairs),
        "random_pair_chosen_correct_and_rejected_wrong": share(rand_cw, n_pairs),
        "m3po_chosen_correct": share(chosen_ok, n_pairs),
        "random_candidate_correct": share(rand_chosen_ok, n_pairs),
        "m3po_rejected_wrong": share(rejected_wrong, n_pairs),
        "random_candidate_wrong": share(rand_rejected_wrong, n_pairs),
        "pools_with_a_correct_and_a_wrong_answer": share(ceiling, n_pairs),
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96, help="world examples (validation split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--policy", default=None, help="policy model spec (default: trained candidate or tiny-vlm)")
    ap.add_argument("--clip", default=None, help="tiny CLIP folder (default: trained candidate or shipped)")
    ap.add_argument("--samples", type=int, default=8, help="M3PO n and CW-DPO k")
    ap.add_argument("--dataset-negative-share", type=float, default=0.0, help="CW-DPO dataset negatives")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    policy, clip = load_models(args.policy, args.clip)
    ctx = BuildContext(seed=args.seed, models={"policy": policy, "clip": clip})
    examples = [world_example(example_at(args.split, i, args.seed)) for i in range(args.n)]
    print(f"policy {policy.name}, clip {clip.name}, {len(examples)} {args.split} examples", file=sys.stderr)
    chunks = [examples[s:s + args.chunk] for s in range(0, len(examples), args.chunk)]
    timings = {}

    m3po = M3PO(M3POParams(n=args.samples))
    t = time.perf_counter()
    pools = []
    for chunk in tqdm(chunks, desc="m3po pools", unit="chunk"):
        pools += list(zip(chunk, m3po.pools(chunk, ctx)))
    timings["m3po_s"] = round(time.perf_counter() - t, 1)
    m3po_rows = [r for ex, pool in pools if not isinstance(pool, Reject)
                 for r in m3po.select(ex, pool, ctx).rows]

    cw = CWDPO(CWDPOParams(k=args.samples, dataset_negative_share=args.dataset_negative_share))
    t = time.perf_counter()
    before_filter, outcomes = [], []
    for chunk in tqdm(chunks, desc="cwdpo", unit="chunk"):
        for ex, s in zip(chunk, cw.sample(chunk, ctx)):
            if isinstance(s, Reject):
                outcomes.append((ex, None, s))
                continue
            before_filter += [n.mean_logp for n in s.negatives if n.source == "policy"]
            outcomes.append((ex, cw.select(ex, s, ctx), None))
    timings["cwdpo_s"] = round(time.perf_counter() - t, 1)
    cw_rows = [r for _, o, _ in outcomes if o is not None for r in o.rows]
    stats = Counter()
    for _, o, _ in outcomes:
        if o is not None:
            stats.update(o.stats)
    rejects = Counter((o.reject.stage if o is not None and o.reject else r.stage if r else None)
                      for _, o, r in outcomes)
    rejects.pop(None, None)
    threshold = cw.p.l_floor - cw.p.easy_margin
    cw_report = {
        "examples": len(outcomes), "pairs": len(cw_rows),
        "pairs_by_stage": dict(Counter(int(r["cwdpo_stage"]) for r in cw_rows)),
        "examples_by_stage": dict(Counter(int(r["cwdpo_stage"]) for r in {r["source_id"]: r for r in cw_rows}.values())),
        "rejects": dict(rejects),
        "graded": {k[7:]: int(v) for k, v in stats.items() if k.startswith("graded_")},
        "wrong_on_policy_negatives": len(before_filter),
        "dataset_negatives_kept": int(stats["dataset_negatives"]),
        "easy_negatives_dropped": int(stats["easy_negatives"]),
        "easy_threshold": threshold,
        "duplicate_negatives": int(stats["duplicate_negatives"]),
        "mean_logp_wrong_on_policy_quantiles": quantiles(before_filter),
        "mean_logp_kept_negatives_quantiles": quantiles([r["rejected_mean_logp"] for r in cw_rows]),
        "rejected_n_tokens_median": statistics.median([r["rejected_n_tokens"] for r in cw_rows]) if cw_rows else None,
    }

    t = time.perf_counter()
    pair_rows = list({(r["source_id"], response_text(r["chosen"])): r for r in m3po_rows + cw_rows}.values())
    no_image = sum(not r["images"] for r in pair_rows)  # text-only world rows: nothing for CLIP
    pair_rows = [r for r in pair_rows if r["images"]]
    annotated = []
    for s in tqdm(range(0, len(pair_rows), 64), desc="aspo", unit="chunk"):
        annotated += annotate(pair_rows[s:s + 64], policy, clip)
    timings["aspo_s"] = round(time.perf_counter() - t, 1)
    n_sent = [len(r["sentence_spans"]) for r in annotated]
    multi_w = [w for r in annotated if len(r["sentence_spans"]) > 1 for w in r["sentence_weights"]]
    by_task = Counter(r["task"] for r in annotated)
    one_by_task = Counter(r["task"] for r in annotated if len(r["sentence_spans"]) == 1)
    aspo_report = {
        "answers": len(annotated),
        "skipped_text_only": no_image,
        "one_sentence_share": share(n_sent.count(1), len(n_sent)),
        "sentences_per_answer": dict(sorted(Counter(n_sent).items())),
        "weights_multi_sentence_quantiles": quantiles(multi_w),
        "weights_multi_sentence_mean": round(statistics.fmean(multi_w), 4) if multi_w else None,
        "one_sentence_share_by_task": {t: share(one_by_task[t], n) for t, n in sorted(by_task.items())},
    }

    report = {"policy": policy.name, "clip": clip.name, "split": args.split, "n": args.n,
              "samples": args.samples, "seed": args.seed, "m3po": m3po_quality(pools, m3po.p),
              "cwdpo": cw_report, "aspo": aspo_report,
              "timings": {**timings, "total_s": round(time.perf_counter() - t0, 1)}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    m = report["m3po"]
    print(f"\nsummary: M3PO correct>wrong {m['m3po_chosen_correct_and_rejected_wrong']} vs random "
          f"{m['random_pair_chosen_correct_and_rejected_wrong']} ({m['pairs']} pairs); CW-DPO "
          f"{cw_report['easy_negatives_dropped']} of {cw_report['wrong_on_policy_negatives']} wrong "
          f"negatives too easy (ℓ̄ < {threshold:g}), {cw_report['pairs']} pairs; ASPO one-sentence share "
          f"{aspo_report['one_sentence_share']}; {report['timings']['total_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
