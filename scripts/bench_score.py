"""Scoring throughput of the HF backend, side by side in one run.

For each model, the same (request, response) pairs are scored three ways:

- ``hf.score``: :meth:`pairforge.models.hf.HFModel.score` end to end (template, tokenisation,
  image processing, batching, log-probs);
- ``naive loop``: one unbatched forward per pair over prompt + response, full logits and a
  full log-softmax, as one would write it first;
- ``ceiling``: only the batched forward passes ``hf.score`` makes, over the very same padded
  batches built beforehand (no tokenisation, no image processing, no post-processing).

Throughput is response tokens per second; ratios are measured in this one run (the median of
``--repeat`` interleaved rounds for hf.score and the ceiling). Models: SmolLM2-135M-Instruct
(text only, real weights) and a random LLaVA with images (CLIP 112 px / patch 14 + a Llama).

    python scripts/bench_score.py                       # both models, 256 pairs
    python scripts/bench_score.py --models smollm2 --pairs 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pairforge.models import Request  # noqa: E402
from pairforge.models.hf import HFModel  # noqa: E402
from pairforge.models.render import template_message as _template_message  # noqa: E402
from pairforge.models.random_tiny import WORDS, save_random_llava  # noqa: E402
from pairforge.schema import user_message  # noqa: E402

ENGLISH = ("the of and to in is that it was for on are as with his they at be this from have or "
           "by one had not but what all were when we there can an your which their said if do will "
           "each about how up out them then she many some so these would other into has more her "
           "two like him see time could no make than first been its who now people my made over "
           "did down only way find use may water long little very after words called just where "
           "most know get through back much before go good new write our used me man too any day "
           "same right look think also around another came come work three word must because does "
           "part even place well such here take why things help put years different away again "
           "off went old number great tell men say small every found still between name should "
           "home big give air line set own under read last never us left end along while might "
           "next sound below saw something thought both few those always looked show large often "
           "together asked house don't world going want school important until form food keep "
           "children feet land side without boy once animals life enough took sometimes four head "
           "above kind began almost live page got earth need far hand high year mother light parts "
           "country father let night following picture being study second eyes soon times story "
           "boys since white days ever paper hard near sentence better best across during today "
           "others however sure means knew it's try told young miles sun ways thing whole hear "
           "example heard several change answer room sea against top turned learn point city play "
           "toward five using himself usually red circle square triangle blue green yellow colour").split()


def make_pairs(n: int, words: tuple[str, ...] | list[str], n_images: int, seed: int = 0,
               lo: int = 20, hi: int = 60) -> tuple[list[Request], list[str]]:
    """``n`` pairs, prompts and responses of lo..hi words; every prompt is used by two
    responses (chosen / rejected), as in a preference set."""
    rng = random.Random(seed)
    irng = np.random.default_rng(seed)
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + " ."  # noqa: E731
    reqs, resps = [], []
    for i in range(n):
        if i % 2 == 0:
            images = [Image.fromarray((irng.random((96, 128, 3)) * 255).astype("uint8"))
                      for _ in range(n_images)]
            req = Request([user_message(sentence(), n_images)], images, id=f"p{i // 2}")
        reqs.append(req)
        resps.append(sentence())
    return reqs, resps


def naive_scores(m: HFModel, reqs: list[Request], resps: list[str]) -> tuple[list[list[float]], int]:
    """One unbatched forward per pair, full logits, full log-softmax; also the tokens fed."""
    owner = m.processor or m.tokenizer
    out, fed = [], 0
    with torch.no_grad():
        for r, text in zip(reqs, resps):
            messages = [_template_message(x, True, as_text=not m.is_vlm) for x in r.messages]
            prompt = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if m.is_vlm:
                enc = m.processor(text=[prompt], images=list(r.images) or None, return_tensors="pt")
            else:
                enc = m.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
            resp = m.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.cat([enc["input_ids"], torch.tensor([resp])], dim=1)
            fed += ids.shape[1]
            extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            logits = m.model(input_ids=ids, **extra).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            p = enc["input_ids"].shape[1]
            out.append(lp[p - 1:-1].gather(-1, torch.tensor(resp)[:, None]).squeeze(-1).tolist())
    return out, fed


def ceiling_batches(m: HFModel, reqs: list[Request], resps: list[str]):
    """The exact padded batches ``m.score`` runs, built ahead of time."""
    prompts = m._render(reqs, drop_images=False)
    resp_ids, _ = m._tokenize_responses(resps)
    return [m._scoring_batch([prompts[row[0]] for row in rows], [[resp_ids[i] for i in row] for row in rows])
            for rows in m._scoring_plan(prompts, resp_ids)]


def run_forwards(m: HFModel, batches) -> None:
    with torch.no_grad():
        for b in batches:
            m._response_logits(b)


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def bench(label: str, m: HFModel, reqs: list[Request], resps: list[str], repeat: int) -> dict:
    m.score(reqs[:m.batch_size], resps[:m.batch_size])  # warm-up
    batches = ceiling_batches(m, reqs, resps)
    ours_t, ceil_t = [], []
    for _ in range(repeat):
        t, scored = timed(m.score, reqs, resps)
        ours_t.append(t)
        ceil_t.append(timed(run_forwards, m, batches)[0])
    naive_t, (naive, naive_tokens) = timed(naive_scores, m, reqs, resps)
    tokens = sum(s.n_tokens for s in scored)
    # tokens through the model: real (prompt once per packed row + responses) and padded
    real = sum(sum(b.prompt_lengths) + sum(b.response_lengths) for b in batches)
    padded = sum(b.keep.numel() for b in batches)
    diff = max(abs(a - b) for s, n in zip(scored, naive) for a, b in zip(s.token_logprobs, n))
    ours, ceil = statistics.median(ours_t), statistics.median(ceil_t)
    return {"model": label, "pairs": len(reqs), "batch_size": m.batch_size,
            "threads": torch.get_num_threads(), "response_tokens": tokens,
            "hf_score_s": round(ours, 3), "naive_s": round(naive_t, 3), "ceiling_s": round(ceil, 3),
            "hf_score_tok_s": round(tokens / ours, 1), "naive_tok_s": round(tokens / naive_t, 1),
            "ceiling_tok_s": round(tokens / ceil, 1),
            "speedup_vs_naive": round(naive_t / ours, 2), "fraction_of_ceiling": round(ceil / ours, 3),
            "max_abs_logprob_diff_vs_naive": float(f"{diff:.2e}"),
            "model_tokens_naive": naive_tokens, "model_tokens_hf_score": real,
            "model_tokens_hf_score_padded": padded}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<22}{'method':<14}{'seconds':>9}{'resp tok/s':>12}{'ratio':>26}")
    for r in rows:
        print(f"{r['model']:<22}{'hf.score':<14}{r['hf_score_s']:>9.2f}{r['hf_score_tok_s']:>12.0f}"
              f"{r['speedup_vs_naive']:>10.2f}x naive, {100 * r['fraction_of_ceiling']:>4.0f}% ceil")
        print(f"{'':<22}{'naive loop':<14}{r['naive_s']:>9.2f}{r['naive_tok_s']:>12.0f}")
        print(f"{'':<22}{'ceiling':<14}{r['ceiling_s']:>9.2f}{r['ceiling_tok_s']:>12.0f}")
        print(f"{'':<22}{r['response_tokens']} response tokens, {r['pairs']} pairs, batch "
              f"{r['batch_size']}, {r['threads']} threads, max |Δ log p| vs naive "
              f"{r['max_abs_logprob_diff_vs_naive']:.1e}")
        print(f"{'':<22}tokens through the model: naive {r['model_tokens_naive']}, hf.score "
              f"{r['model_tokens_hf_score']} ({r['model_tokens_hf_score_padded']} with padding)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,llava", help="comma list of smollm2, llava")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of hf.score and ceiling (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        if name == "smollm2":
            m = HFModel("smollm2", batch_size=args.batch_size, progress=False)
            reqs, resps = make_pairs(args.pairs, ENGLISH, n_images=0)
            rows.append(bench("smollm2-135m (text)", m, reqs, resps, args.repeat))
        elif name == "llava":
            with tempfile.TemporaryDirectory() as tmp:
                path = save_random_llava(tmp, hidden=512, layers=6, vision_hidden=256, vision_layers=4,
                                         image_size=112, patch_size=14)
                m = HFModel(path, batch_size=args.batch_size, progress=False)
            reqs, resps = make_pairs(args.pairs, WORDS, n_images=1)
            rows.append(bench("random llava (1 image)", m, reqs, resps, args.repeat))
        else:
            ap.error(f"unknown model {name!r}; choose from smollm2, llava")
        print(f"done {name}", file=sys.stderr)
    print_table(rows)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
