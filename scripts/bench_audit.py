"""Benchmark of ``pairforge audit``: end to end on a TRL JSONL against a pandas + rapidfuzz
script, and its text metrics against a plain pure-Python implementation.

    python scripts/bench_audit.py --end-to-end 200000 --pairs 0       # end to end only
    python scripts/bench_audit.py                      # metrics: 200k pairs + a 1M-pair memory run
    python scripts/bench_audit.py --pairs 20000 --memory-pairs 0   # quick

End to end (``--end-to-end N``): writes N synthetic pairs as a TRL-standard JSONL
(``prompt``/``chosen``/``rejected`` strings, as written by ``json.dumps``), then runs, each in
its own process, ``python -m pairforge audit FILE --tokenizer words`` and ``--tokenizer gpt2``
and the baseline: a pandas + rapidfuzz script (``pandas.read_json(lines=True)``, whitespace
words, ``rapidfuzz.distance.Levenshtein`` on the word lists, lengths, the same set rates).
Each is reported with its wall time, its CPU time (user + sys: what the work costs when the
machine is shared), its peak resident memory (``ru_maxrss`` of that process alone) and its
speed as a multiple of the pandas script's in the same run (wall and CPU time): on a shared
machine those ratios are the figures to compare.

Measures, in one run on the same synthetic pairs (30–120 words per answer, minimal edits and
style-different pairs mixed):

- fast path, word lengths: word Levenshtein + whitespace lengths (``pair_metrics`` with
  ``--tokenizer words``), on one thread and on two (the default on 2 cores);
- fast path, GPT-2 BPE lengths (the audit's default ``--tokenizer gpt2``; 2 threads; its
  per-word cache starts cold);
- baseline: pure-Python DP word Levenshtein + ``len(text.split())`` (``reference_pair_metrics``)
  on a subsample, extrapolated per pair, and checked equal to the fast path on that subsample;
- naive BPE: the same GPT-2 tokenizer encoding whole texts (``encode_batch_fast``) on a
  subsample, for the BPE speed-up;
- peak memory: a subprocess streams ``--memory-pairs`` pairs through the audit's per-set
  accumulator (``SetAudit``, GPT-2 lengths) and writes pairs.parquet; it reports ru_maxrss.

Prints a table and one line of JSON. Timings depend on the machine and its load (the load
average is printed with them); nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pairforge.diagnostics.lengths import GPT2Lengths, WordLengths, gpt2_files, gpt2_tokenizer
from pairforge.diagnostics.text import pair_metrics, reference_pair_metrics

# ----------------------------------------------------------------------------- synthetic pairs


class Synthetic:
    """Answers made of sentences drawn from a pool of English words (GPT-2's vocabulary).

    Minimal-edit pairs: the rejected answer is the chosen one with one sentence replaced by its
    edited variant (one word swapped). Style-different pairs: two independent answers of
    independent lengths."""

    def __init__(self, seed: int = 0, n_sentences: int = 20_000):
        rng = np.random.default_rng(seed)
        with open(gpt2_files()[0], encoding="utf-8") as f:
            vocab = [t[1:] for t in json.load(f) if t.startswith("Ġ") and t[1:].isalpha()]
        vocab = np.array(vocab, dtype=object)
        self.sentences, self.edited = [], []
        for _ in range(n_sentences):
            words = vocab[rng.integers(0, len(vocab), rng.integers(8, 17))].tolist()
            if rng.random() < 0.3:
                words[rng.integers(1, len(words) - 1)] += ","
            edit = list(words)
            edit[rng.integers(0, len(edit))] = str(vocab[rng.integers(0, len(vocab))])
            self.sentences.append(_sentence(words))
            self.edited.append(_sentence(edit))
        self.rng = rng

    def pairs(self, n: int) -> tuple[list[str], list[str]]:
        """``n`` pairs (chosen, rejected); about half minimal edits, half style-different."""
        rng, pool = self.rng, len(self.sentences)
        k_chosen = rng.integers(3, 10, n)  # 3..9 sentences of 8..16 words: ~30..120 words
        k_rejected = rng.integers(3, 10, n)
        minimal = rng.random(n) < 0.5
        chosen, rejected = [], []
        for i in range(n):
            ids = rng.integers(0, pool, k_chosen[i]).tolist()
            chosen.append(" ".join(self.sentences[j] for j in ids))
            if minimal[i]:
                e = rng.integers(0, len(ids))
                rejected.append(" ".join(self.edited[j] if t == e else self.sentences[j]
                                         for t, j in enumerate(ids)))
            else:
                rejected.append(" ".join(self.sentences[j]
                                         for j in rng.integers(0, pool, k_rejected[i]).tolist()))
        return chosen, rejected


def _sentence(words: list[str]) -> str:
    return " ".join([words[0].capitalize(), *words[1:]]).rstrip(",") + "."


# ----------------------------------------------------------------------------- end to end

#: The baseline: what a user would write with pandas and rapidfuzz (run as its own process).
BASELINE = r"""
import json, sys
import numpy as np, pandas as pd
from rapidfuzz.distance import Levenshtein
df = pd.read_json(sys.argv[1], lines=True)
c = df["chosen"].str.lower().str.split()
r = df["rejected"].str.lower().str.split()
lev = np.array([Levenshtein.distance(a, b) for a, b in zip(c, r)])
lc, lr = c.str.len().to_numpy(), r.str.len().to_numpy()
norm = lev / np.maximum(np.maximum(lc, lr), 1)
print(json.dumps({"n": len(df), "lev_median": float(np.median(lev)),
                  "chosen_longer": float(np.mean((lc > lr) + 0.5 * (lc == lr))),
                  "near_dup": float(np.mean(norm <= 0.05))}))
"""

#: Runs a command as a child and reports the child's own wall time, CPU time and peak RSS.
MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": u.ru_utime + u.ru_stime,
                  "peak_mb": u.ru_maxrss / 1024}))
"""


def write_trl_jsonl(path: Path, n: int, seed: int, chunk: int = 50_000) -> int:
    """``n`` synthetic pairs as TRL-standard JSONL (no images); returns the file size."""
    gen = Synthetic(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, chunk):
            c, r = gen.pairs(min(chunk, n - start))
            f.writelines(json.dumps({"prompt": f"Describe image {start + i}.", "chosen": a,
                                     "rejected": b}) + "\n" for i, (a, b) in enumerate(zip(c, r)))
    return path.stat().st_size


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True,
                         check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(n: int, seed: int) -> dict:
    """Audit of an ``n``-pair TRL JSONL (words, gpt2) against the pandas + rapidfuzz baseline."""
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "trl.jsonl"
        print(f"writing {n:,} pairs as TRL JSONL ...", file=sys.stderr)
        size = write_trl_jsonl(data, n, seed)
        runs = {}
        for name, cmd in (
                ("pairforge audit --tokenizer words",
                 [sys.executable, "-m", "pairforge", "audit", str(data), "--out",
                  str(Path(d) / "words"), "--tokenizer", "words"]),
                ("pairforge audit --tokenizer gpt2",
                 [sys.executable, "-m", "pairforge", "audit", str(data), "--out",
                  str(Path(d) / "gpt2"), "--tokenizer", "gpt2"]),
                ("pandas + rapidfuzz script (words)", [sys.executable, "-c", BASELINE, str(data)])):
            print(f"running {name} ...", file=sys.stderr)
            runs[name] = measure(cmd)
    print(f"\nend to end: {n:,} pairs, {size / 2**20:,.0f} MiB of TRL JSONL, {os.cpu_count()} "
          f"CPU(s), load average {os.getloadavg()[0]:.2f} after")
    base = runs["pandas + rapidfuzz script (words)"]
    print(f"{'':40} {'wall s':>8} {'pairs/s':>9} {'CPU s':>8} {'pairs/CPU-s':>12} "
          f"{'peak MB':>8} {'x pandas (wall, CPU)':>21}")
    for name, m in runs.items():
        print(f"{name:40} {m['wall_s']:>8.1f} {n / m['wall_s']:>9,.0f} {m['cpu_s']:>8.1f} "
              f"{n / m['cpu_s']:>12,.0f} {m['peak_mb']:>8,.0f} "
              f"{base['wall_s'] / m['wall_s']:>10.2f} {base['cpu_s'] / m['cpu_s']:>10.2f}")
    return {"pairs": n, "file_mib": round(size / 2**20, 1),
            **{name: {k: round(v, 2) for k, v in m.items()} for name, m in runs.items()}}


# ----------------------------------------------------------------------------- measurements


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def memory_child(n: int, chunk: int) -> None:
    """Stream ``n`` synthetic pairs through ``SetAudit`` (GPT-2 lengths); print JSON."""
    from pairforge.diagnostics.audit import SetAudit, pairs_schema, pairs_table

    gen = Synthetic(seed=1)
    audit = SetAudit("synthetic", GPT2Lengths())  # pair_metrics' default threads
    t_metrics = 0.0
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        c, r = gen.pairs(min(chunk, n - start))
        ids = [f"p{start + i}" for i in range(len(c))]
        keys = [hash(("Describe the image.", i % 1000)) for i in range(len(c))]
        t = time.perf_counter()
        audit.add(ids, keys, ["Describe the image."] * len(c), c, r)
        t_metrics += time.perf_counter() - t
    result = audit.finish(0)
    with tempfile.TemporaryDirectory() as d:
        import pyarrow.parquet as pq

        schema = pairs_schema()
        pq.write_table(pairs_table(result, schema), Path(d) / "pairs.parquet")
    print(json.dumps({"pairs": n, "seconds_total": round(time.perf_counter() - t0, 2),
                      "seconds_metrics": round(t_metrics, 2),
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024, 1),
                      "n_flags": len(result.summary["flags"])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--baseline-pairs", type=int, default=2_000,
                    help="subsample timed with the pure-Python baseline (then extrapolated)")
    ap.add_argument("--naive-bpe-pairs", type=int, default=20_000)
    ap.add_argument("--memory-pairs", type=int, default=1_000_000, help="0 skips the memory run")
    ap.add_argument("--chunk", type=int, default=32_768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--end-to-end", type=int, default=0, metavar="N",
                    help="also audit an N-pair TRL JSONL end to end against pandas + rapidfuzz")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.pairs, args.chunk)
        return
    e2e = end_to_end(args.end_to_end, args.seed) if args.end_to_end else None
    if not args.pairs:
        print(json.dumps({"end_to_end": e2e}))
        return

    load = os.getloadavg()[0]
    print(f"generating {args.pairs:,} synthetic pairs ...", file=sys.stderr)
    chosen, rejected = Synthetic(args.seed).pairs(args.pairs)
    words = np.mean([len(t.split()) for t in chosen[:10_000] + rejected[:10_000]])

    pair_metrics(chosen[:2000], rejected[:2000], WordLengths())  # warm-up (imports, caches)
    fast_words, t_words = timed(lambda: pair_metrics(chosen, rejected, WordLengths(), threads=1))
    _, t_words2 = timed(lambda: pair_metrics(chosen, rejected, WordLengths(), threads=2))
    _, t_gpt2 = timed(lambda: pair_metrics(chosen, rejected, GPT2Lengths(), threads=2))

    nb = min(args.baseline_pairs, args.pairs)
    ref, t_ref = timed(reference_pair_metrics, chosen[:nb], rejected[:nb])
    same = all(np.array_equal(ref[k], fast_words[k][:nb]) for k in ref)

    nn = min(args.naive_bpe_pairs, args.pairs)
    tok = gpt2_tokenizer()
    _, t_naive = timed(lambda: [len(e) for e in tok.encode_batch_fast(
        chosen[:nn] + rejected[:nn], add_special_tokens=False)])

    rate = {"words": args.pairs / t_words, "words_2_threads": args.pairs / t_words2,
            "gpt2": args.pairs / t_gpt2,
            "baseline": nb / t_ref, "naive_bpe": nn / t_naive}
    rows = [
        ("fast: word Levenshtein + word lengths, 1 thread", rate["words"]),
        ("fast: word Levenshtein + word lengths, 2 threads", rate["words_2_threads"]),
        ("fast: word Levenshtein + GPT-2 BPE lengths, 2 threads", rate["gpt2"]),
        (f"baseline: pure-Python DP + split (on {nb:,}, extrapolated)", rate["baseline"]),
        (f"naive BPE: whole-text encode_batch_fast (on {nn:,}, lengths only)",
         rate["naive_bpe"]),
    ]
    print(f"\n{args.pairs:,} pairs, {words:.0f} words per answer on average, "
          f"{os.cpu_count()} CPU(s), load average {load:.2f} at start")
    print(f"{'':68} {'pairs/s':>10} {'vs baseline':>12}")
    for label, r in rows:
        print(f"{label:68} {r:>10,.0f} {r / rate['baseline']:>11.1f}x")
    print(f"fast path equals the baseline on {nb:,} pairs: {'yes' if same else 'NO'}")

    memory = None
    if args.memory_pairs:
        print(f"memory run: {args.memory_pairs:,} pairs in a subprocess ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--memory-child", "--pairs",
                               str(args.memory_pairs), "--chunk", str(args.chunk)],
                              capture_output=True, text=True, check=True)
        memory = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"memory run: {memory['pairs']:,} pairs, peak RSS {memory['ru_maxrss_mb']:,.0f} MB, "
              f"metrics {memory['pairs'] / memory['seconds_metrics']:,.0f} pairs/s "
              f"({memory['seconds_total']:.0f} s with generation)")

    print(json.dumps({
        "pairs": args.pairs, "cpus": os.cpu_count(), "load_avg_start": round(load, 2),
        "words_pairs_per_s": round(rate["words"]),
        "words_2_threads_pairs_per_s": round(rate["words_2_threads"]),
        "gpt2_pairs_per_s": round(rate["gpt2"]),
        "baseline_pairs_per_s": round(rate["baseline"], 1),
        "naive_bpe_pairs_per_s": round(rate["naive_bpe"]),
        "speedup_words_vs_baseline": round(rate["words"] / rate["baseline"], 1),
        "speedup_gpt2_vs_naive_bpe": round(rate["gpt2"] / rate["naive_bpe"], 1),
        "baseline_equal": same,
        "memory_run": memory,
        "end_to_end": e2e,
    }))


if __name__ == "__main__":
    main()
