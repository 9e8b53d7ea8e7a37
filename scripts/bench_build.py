"""Benchmark of the build engine, measured side by side in one run.

    python scripts/bench_build.py                 # ~2.5 min on 2 busy CPU cores
    python scripts/bench_build.py --quick         # ~1 min
    python scripts/bench_build.py --policy hf:/tmp/tw/run1/tiny-llava

1. **Engine overhead.** A fake recipe whose ``process`` sleeps a fixed time per batch (the
   stand-in for model calls) is run (a) in a bare loop: read the world's examples, call
   ``process`` on batches of the same size, nothing written; (b) through ``pairforge build``
   (select, read, recipe, rows with provenance + diagnostics, chunk parquet + rejects,
   manifest per chunk, then rejects.jsonl, dataset/, summary.json). The model time is the sum
   of the measured ``process`` calls. Overhead = (build wall − model time) / model time, and
   the part of it beyond reading the source = (build wall − bare loop wall) / model time;
   also per example (ms), with the model time per example above which it is < 10 %. The
   sleep defaults to part 2's measured VLM time per batch. The build writes chunk k on a
   thread while chunk k+1 sleeps, as it would overlap a GPU's model calls.
2. **Batched generation.** The same world examples answered by a real tiny VLM (``HFModel``,
   greedy, ``--max-new-tokens``): a per-example loop (one ``generate`` call per example)
   against a build whose recipe generates ``--batch-size`` examples per call (the rejected
   answer is the model's). Reported for the whole job (both sides load the model and read the
   examples; the build also writes everything) and in steady state (reading + generating,
   against the build's chunk phase: read, generate, write; model load and finish excluded),
   next to the ceiling the model sets (its batched against its one-by-one generate time,
   both without the engine). Target: >= 3x. Batched and one-by-one greedy answers are compared first (reported, not
   asserted).

3. **Ray on one node** (``--ray``, instead of 1 and 2). The same M3PO build (tiny-vlm policy,
   tiny-clip, ``--ray-examples`` world examples) locally and with ``--executor ray`` on a local
   Ray instance of all this machine's cores, side by side: Ray's start (``ray.init``) apart,
   then the build with one policy actor, and with one policy actor per core. Rows are
   compared (every model on one torch thread on both sides, so they must be equal). The
   ratio Ray / local is Ray's overhead on one node (actor start, model load per actor,
   remote calls, pickling); on one node Ray only pays off when the local build leaves
   cores idle.

The policy is ``tiny-vlm`` when the shipped checkpoint exists, else the trained candidate at
/tmp/tw/run1/tiny-llava, else a random tiny LLaVA (same architecture and sizes: 112 px images,
14 px patches) written to a temporary folder. Prints a table and one line of JSON; timings
depend on the machine's load (printed); nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pairforge.engine import BuildConfig, build  # noqa: E402
from pairforge.engine.engine import batched  # noqa: E402
from pairforge.recipes import RECIPES  # noqa: E402
from pairforge.recipes.base import BuildContext, Example, Outcome, Reject  # noqa: E402
from pairforge.schema import make_pair  # noqa: E402
from pairforge.sources.sft import read_examples  # noqa: E402

torch.set_num_threads(1)
TRAINED = Path("/tmp/tw/run1/tiny-llava")


class SleepRecipe:
    """A model stand-in: each ``process`` call sleeps ``per_batch`` seconds."""

    name = "bench-sleep"
    groups: tuple = ()
    roles: tuple = ()
    model_s = 0.0  # total time spent in process(), measured

    def __init__(self, params):
        self.per_batch = float(params.get("per_batch", 0.25))

    @classmethod
    def from_params(cls, params):
        return cls(params)

    def params(self):
        return {"per_batch": self.per_batch}

    def templates(self):
        return {}

    def check(self, ctx):
        pass

    def process(self, examples, ctx):
        t = time.perf_counter()
        time.sleep(self.per_batch)
        out = [Outcome(rows=[make_pair(prompt=ex.prompt_messages, chosen=ex.answer,
                                       rejected=f"No, {ctx.rng(ex).randint(0, 9)}.",
                                       images=ex.images)]) for ex in examples]
        SleepRecipe.model_s += time.perf_counter() - t
        return out

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class AnswerRecipe(SleepRecipe):
    """Rejected = the policy's greedy answer to the question (batched through the engine)."""

    name = "bench-answer"
    roles = (("policy", True, "tiny-vlm"),)

    def __init__(self, params):
        self.max_new_tokens = int(params.get("max_new_tokens", 24))

    def params(self):
        return {"max_new_tokens": self.max_new_tokens}

    def process(self, examples, ctx):
        t = time.perf_counter()
        answers = answer(ctx.models["policy"], examples, self.max_new_tokens)
        out = []
        for ex, a in zip(examples, answers):
            if not a.strip():
                out.append(Outcome(reject=Reject("generate", "empty answer")))
            else:
                out.append(Outcome(rows=[make_pair(prompt=ex.prompt_messages, chosen=ex.answer,
                                                   rejected=a, images=ex.images)]))
        SleepRecipe.model_s += time.perf_counter() - t
        return out


def answer(model, examples, max_new_tokens: int) -> list[str]:
    from pairforge.models.base import Request, SamplingParams

    requests = [Request(messages=ex.prompt_messages, images=ex.images, id=ex.id) for ex in examples]
    done = model.generate(requests, 1, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    return [c[0].text for c in done]


def register() -> None:
    RECIPES["bench-sleep"] = f"{__name__}:SleepRecipe"
    RECIPES["bench-answer"] = f"{__name__}:AnswerRecipe"


def quiet_build(**kw) -> dict:
    from rich.console import Console

    return build(BuildConfig(**kw), console=Console(file=io.StringIO()), progress=False)


def examples_of(source: str) -> list[Example]:
    return [x for x in read_examples(source) if isinstance(x, Example)]


# ----------------------------------------------------------------------------- 1. overhead


def bench_overhead(tmp: Path, n: int, batch: int, per_batch: float) -> dict:
    source = f"shapes?n={n}"
    SleepRecipe.model_s = 0.0
    t = time.perf_counter()
    recipe, ctx = SleepRecipe({"per_batch": per_batch}), BuildContext(seed=0)
    for b in batched(examples_of(source), batch):  # read + model calls, nothing written
        recipe.process(b, ctx)
    loop_s, loop_model_s = time.perf_counter() - t, SleepRecipe.model_s

    SleepRecipe.model_s = 0.0
    t = time.perf_counter()
    s = quiet_build(recipe="bench-sleep", source=source, out=tmp / "overhead", batch_size=batch,
                    params={"per_batch": per_batch}, overwrite=True)
    build_s, model_s = time.perf_counter() - t, SleepRecipe.model_s
    assert s["counts"]["pairs"] == n
    return {"n": n, "batch": batch, "per_batch_s": per_batch, "model_s": model_s,
            "loop_s": loop_s, "loop_model_s": loop_model_s, "build_s": build_s,
            "overhead_pct": 100 * (build_s - model_s) / model_s,
            "overhead_beyond_read_pct": 100 * (build_s - loop_s) / model_s,
            "engine_ms_per_example": 1000 * (build_s - model_s) / n,
            "model_ms_per_example_for_10pct": 10_000 * (build_s - model_s) / n}


# ----------------------------------------------------------------------------- 2. batching


def policy_spec(given: str | None, tmp: Path) -> str:
    if given:
        return given
    from pairforge.world.models import TINY_VLM_PATH

    if (TINY_VLM_PATH / "config.json").is_file():
        return "tiny-vlm"
    if (TRAINED / "config.json").is_file():
        return f"hf:{TRAINED}"
    from pairforge.models.random_tiny import save_random_llava

    path = save_random_llava(tmp / "random-llava", image_size=112, patch_size=14)
    return f"hf:{path}"


def bench_batching(tmp: Path, spec: str, n: int, batch: int, max_new_tokens: int) -> dict:
    from pairforge.models.factory import load_model

    source = f"shapes:test?n={n}"
    check = examples_of(f"shapes:test?n={batch}")  # same answers, batched or not (greedy)?
    model = load_model(spec, role="policy")
    model.progress = False
    same = sum(a == answer(model, [ex], max_new_tokens)[0]
               for ex, a in zip(check, answer(model, check, max_new_tokens)))
    del model

    t = time.perf_counter()  # the whole job: load the model, read, answer one by one
    model = load_model(spec, role="policy")
    model.progress = False
    t_read = time.perf_counter()
    examples = examples_of(source)
    t_gen = time.perf_counter()
    for ex in examples:
        answer(model, [ex], max_new_tokens)
    t_end = time.perf_counter()
    loop_s, loop_steady_s, loop_gen_s = t_end - t, t_end - t_read, t_end - t_gen
    del model

    SleepRecipe.model_s = 0.0
    t = time.perf_counter()
    s = quiet_build(recipe="bench-answer", source=source, out=tmp / "answers", batch_size=batch,
                    models={"policy": spec}, params={"max_new_tokens": max_new_tokens},
                    overwrite=True)
    build_s = time.perf_counter() - t
    return {"n": n, "batch": batch, "policy": spec, "max_new_tokens": max_new_tokens,
            "loop_s": loop_s, "loop_read_generate_s": loop_steady_s,
            "loop_generate_s": loop_gen_s, "build_s": build_s,
            "build_timing": s["timing"], "build_model_s": SleepRecipe.model_s,
            "speedup": loop_s / build_s, "speedup_steady": loop_steady_s / s["timing"]["chunks_s"],
            "speedup_model_calls": loop_gen_s / SleepRecipe.model_s,
            "pairs": s["counts"]["pairs"], "same_answers": f"{same}/{len(check)}",
            "per_batch_s": SleepRecipe.model_s / -(-n // batch)}


def bench_ray(tmp: Path, n: int, batch: int, max_new_tokens: int) -> dict:
    """Part 3: the same M3PO build locally and on a local Ray instance (docstring)."""
    from pairforge.engine import load_build
    from pairforge.engine.ray_executor import import_ray

    ray = import_ray(local=True)  # a local instance on 127.0.0.1

    cores = os.cpu_count() or 1
    kw = dict(recipe="m3po", source=f"shapes?n={n}&seed=11", batch_size=batch, chunk_size=16,
              params={"n": 4, "max_new_tokens": max_new_tokens}, overwrite=True)
    t = time.perf_counter()
    quiet_build(out=tmp / "local", **kw)
    local_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    runs = {}
    try:
        share = max(0.1, round(0.5 / cores, 2))  # every actor a fraction: all fit together
        for label, pool in (("ray, 1 policy actor", 1), (f"ray, {cores} policy actors", cores)):
            if label in runs:
                continue
            roles = {"policy": {"pool": pool, "num_cpus": share, "threads": 1},
                     "clip": {"num_cpus": share, "threads": 1},
                     "judge": {"num_cpus": share, "threads": 1}}
            out = tmp / f"ray{pool}"
            t = time.perf_counter()
            quiet_build(out=out, executor="ray", ray={"roles": roles,
                                                     "stage": {"pool": 2 * pool,
                                                               "num_cpus": share}}, **kw)
            wall = time.perf_counter() - t
            same = (load_build(out).with_format("arrow")[:].to_pylist()
                    == load_build(tmp / "local").with_format("arrow")[:].to_pylist())
            runs[label] = {"wall_s": wall, "ratio_to_local": wall / local_s, "same_rows": same}
    finally:
        ray.shutdown()
    return {"n": n, "cores": cores, "local_s": local_s, "ray_init_s": init_s, "runs": runs}


def bench_reference(tmp: Path, n: int, recipe: str = "vapr") -> dict:
    """3. The cost of ``--reference tiny-vlm``: the same world build without and with it, after
    a warm-up build (imports, tokenizers); the extra wall time as a share of the build without
    it (loading the reference model included)."""
    from rich.console import Console

    params = {"editor": "rule"} if recipe == "vapr" else {}
    walls = {}
    build(BuildConfig(recipe=recipe, source="shapes:train?n=2", out=tmp / "warm-up", params=params,
                      reference="tiny-vlm"), console=Console(file=io.StringIO()), progress=False)
    for ref in (None, "tiny-vlm"):
        t0 = time.perf_counter()
        s = build(BuildConfig(recipe=recipe, source=f"shapes:train?n={n}", out=tmp / f"ref-{ref}",
                              params=params, reference=ref),
                  console=Console(file=io.StringIO()), progress=False)
        walls[ref or "none"] = time.perf_counter() - t0
    extra = walls["tiny-vlm"] - walls["none"]
    return {"recipe": recipe, "n": n, "pairs": s["counts"]["pairs"], "wall_s": walls,
            "extra_s": extra, "extra_share": extra / walls["none"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-cost", choices=("vapr", "cwdpo"),
                    help="only measure the cost of --reference tiny-vlm on this recipe's world build")
    ap.add_argument("--quick", action="store_true", help="smaller runs (~1 min)")
    ap.add_argument("--policy", help="policy spec for part 2 (default: see the docstring)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--per-batch", type=float, default=None,
                    help="sleep per batch in part 1 (default: part 2's measured VLM batch time)")
    ap.add_argument("--ray", action="store_true",
                    help="part 3 only: local vs --executor ray on this machine (pairforge[ray])")
    ap.add_argument("--ray-examples", type=int, default=64)
    args = ap.parse_args()
    if args.reference_cost:
        with tempfile.TemporaryDirectory() as d:
            n = (48 if args.quick else 128) if args.reference_cost == "vapr" else (16 if args.quick else 32)
            three = bench_reference(Path(d), n, args.reference_cost)
        print(f"3. --reference tiny-vlm on {three['recipe']} ({three['n']} examples, {three['pairs']} pairs): "
              f"{three['wall_s']['none']:.1f} s without, {three['wall_s']['tiny-vlm']:.1f} s with "
              f"(+{three['extra_share']:.0%} of the build)")
        print(json.dumps({"load_average": os.getloadavg()[0], "reference": three}))
        return
    register()
    if args.ray:
        with tempfile.TemporaryDirectory() as d:
            r = bench_ray(Path(d), args.ray_examples, args.batch_size, args.max_new_tokens)
        load = os.getloadavg()[0]
        print(f"M3PO, {r['n']} world examples, {r['cores']} cores, load average {load:.1f}")
        print(f"  local executor            {r['local_s']:8.2f} s")
        print(f"  ray.init (local instance) {r['ray_init_s']:8.2f} s (not in the builds below)")
        for label, x in r["runs"].items():
            print(f"  {label:25s} {x['wall_s']:8.2f} s  = {x['ratio_to_local']:.2f}x local; "
                  f"same rows: {x['same_rows']}")
        print(json.dumps({"load_average": load, "ray": r}))
        return
    n1, n2 = (192, 48) if args.quick else (384, 128)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        spec = policy_spec(args.policy, tmp)
        two = bench_batching(tmp, spec, n2, args.batch_size, args.max_new_tokens)
        per_batch = args.per_batch if args.per_batch is not None else two["per_batch_s"]
        one = bench_overhead(tmp, n1, args.batch_size, per_batch)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pairforge build benchmark (load average {load:.1f}, "
                    f"{os.cpu_count()} cores, torch threads 1)")
    for col in ("measurement", "examples", "wall s", "examples/s", "result"):
        t.add_column(col, justify="left" if col in ("measurement", "result") else "right")
    t.add_row(f"1. model stand-in alone (sleep {per_batch:.3f} s / batch of {args.batch_size})",
              str(one["n"]), f"{one['model_s']:.2f}", f"{one['n'] / one['model_s']:.1f}", "")
    t.add_row("1. bare loop: read + model calls", str(one["n"]), f"{one['loop_s']:.2f}",
              f"{one['n'] / one['loop_s']:.1f}", "")
    t.add_row("1. pairforge build (everything written)", str(one["n"]), f"{one['build_s']:.2f}",
              f"{one['n'] / one['build_s']:.1f}",
              f"overhead {one['overhead_pct']:.1f}% of model time "
              f"({one['overhead_beyond_read_pct']:.1f}% beyond reading); "
              f"{one['engine_ms_per_example']:.1f} ms/example, so < 10% from "
              f"{one['model_ms_per_example_for_10pct']:.0f} ms of model time per example")
    t.add_row(f"2. per-example loop: load, read, generate ({two['policy']})", str(two["n"]),
              f"{two['loop_s']:.2f}", f"{two['n'] / two['loop_s']:.1f}",
              f"read + generate {two['loop_read_generate_s']:.2f} s, generate alone "
              f"{two['loop_generate_s']:.2f} s")
    bt = two["build_timing"]
    t.add_row(f"2. pairforge build, batch {two['batch']}", str(two["n"]), f"{two['build_s']:.2f}",
              f"{two['n'] / two['build_s']:.1f}",
              f"{two['speedup']:.2f}x faster whole job; {two['speedup_steady']:.2f}x in steady "
              f"state (chunks {bt['chunks_s']:.2f} s; setup {bt['setup_s']:.2f} s, finish "
              f"{bt['finish_s']:.2f} s); the model calls alone {two['speedup_model_calls']:.2f}x "
              f"({two['build_model_s']:.2f} s, the ceiling); same answers {two['same_answers']}")
    Console(width=160).print(t)
    print(json.dumps({"load_average": load, "overhead": one, "batching": two}))


if __name__ == "__main__":
    main()
