"""Build and publish the project's pair datasets, one recipe at a time, from a preset.

    python scripts/publish_pairsets.py RECIPE [--preset world|full] [--n N] [--root DIR]
        [--repo-id ORG/NAME] [--dry-run] [--private]
        [--source SPEC] [--image-root DIR] [--policy SPEC] [--clip SPEC] [--editor SPEC]
        [--judge SPEC] [--param KEY=VALUE ...] [--seed S] [--batch-size B] [--shard I/N]
    python scripts/publish_pairsets.py --list

RECIPE: vapr, m3po, p2dpo, cwdpo, aspo. Every run makes the same two calls, whatever the
preset: :func:`pairforge.engine.build` (the engine of ``pairforge build``: checkpointed chunks,
resumable by rerunning the same command, every dropped example in ``rejects.jsonl``) into
``ROOT/NAME``, then :func:`pairforge.publish.hub.publish` (``pairforge publish``: parquet shards
with embedded images, card, plots, verified with ``datasets.load_dataset``, pushed in one
commit; ``--dry-run`` stops before the push). A preset sets only the source, the models, the
recipe parameters and the size (:data:`PRESETS`); the options above override any of them.

- ``world``: the offline shapes world with the embedded tiny VLM / CLIP (``tiny-vlm``,
  ``tiny-clip``) and VaPR's rule editor; runs on a CPU.
- ``full``: LLaVA-1.5's SFT mix (``llava_v1_5_mix665k.json`` + its image folders, passed as
  ``--source`` / ``--image-root``) with LLaVA-1.5-7B through vLLM (``hf:`` where the recipe
  needs attention maps), a CLIP ViT-L/14-336 and Qwen2.5-7B-Instruct as VaPR's editor (vLLM;
  ``--editor openai:MODEL@URL`` for a ``vllm serve`` elsewhere); GPU hours are in
  :data:`PRESETS` (``--list``) and scripts/README.md, as estimates (not measured).

ASPO annotates existing pairs: its source is the VaPR set of the same preset (``ROOT/vapr-*``).
A build that makes no pair is not published (the rejects' main reason is shown instead). With
``--shard I/N`` (one of N machines) the shard is built into ``ROOT/NAME-shardIofN`` and not
published; the script prints the ``pairforge merge`` and ``pairforge publish`` commands that
follow once every shard is built.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pairforge.engine import BuildConfig, parse_params, parse_shard  # noqa: E402
from pairforge.errors import PairforgeError  # noqa: E402
from pairforge.recipes import RECIPES  # noqa: E402

#: Hub organisation of the published sets (``--repo-id`` overrides).
ORG = "pairforge"
#: The full presets' models (Hub ids; every GPU box needs them downloaded once).
LLAVA = "llava-hf/llava-1.5-7b-hf"
CLIP_L = "clip:openai/clip-vit-large-patch14-336"
EDITOR_LLM = "vllm:Qwen/Qwen2.5-7B-Instruct"
#: LLaVA-1.5's SFT mix (github.com/haotian-liu/LLaVA, "Visual Instruction Tuning" data).
LLAVA_SOURCE = "llava_v1_5_mix665k.json"


@dataclass(frozen=True)
class Preset:
    """What a preset sets: the dataset ``name`` (``ROOT/NAME``, ``ORG/NAME``), the ``source``
    (``{n}`` and ``{root}`` are filled in; None: ``--source`` is required), the size ``n``
    (world examples generated, else ``--limit``), the ``models`` by role, the recipe
    ``params``, the ``batch_size`` (examples per recipe call: what a GPU engine batches), and
    ``hardware``: what the run needs and how long it takes (measured, or an estimate)."""

    name: str
    source: str | None
    n: int
    models: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    hardware: str = ""
    batch_size: int = 8


WORLD_SOURCE = "shapes:train?n={n}"
WORLD_MODELS = {"policy": "tiny-vlm", "clip": "tiny-clip"}

PRESETS: dict[tuple[str, str], Preset] = {
    ("vapr", "world"): Preset(
        "vapr-shapes", WORLD_SOURCE, 5000, {}, {"editor": "rule"},
        "CPU, 1 thread: measured 0.008 s/example (busy 2-core box) -> about 1 min for 5k"),
    ("vapr", "full"): Preset(
        "vapr-llava665k", None, 200_000, {"editor": EDITOR_LLM}, {"editor": "llm"},
        "1x H100 80GB (vLLM Qwen2.5-7B-Instruct editor); estimate 2-4 h for 200k examples",
        batch_size=256),
    ("m3po", "world"): Preset(
        "m3po-shapes", WORLD_SOURCE, 1000, dict(WORLD_MODELS), {},
        "CPU, 1 thread: measured 0.36 s/example with n=8 (busy 2-core box) -> about 6 min"),
    ("m3po", "full"): Preset(
        "m3po-llava665k", None, 20_000, {"policy": f"vllm:{LLAVA}", "clip": CLIP_L},
        {"n": 32, "max_new_tokens": 256},
        "1x H100 80GB (vLLM LLaVA-1.5-7B + CLIP ViT-L/14-336 on one GPU); estimate "
        "3-6 h for 20k examples (32 samples each)", batch_size=64),
    ("p2dpo", "world"): Preset(
        "p2dpo-shapes", WORLD_SOURCE, 2000, dict(WORLD_MODELS), {},
        "CPU, 1 thread: measured 0.40 s/example (busy 2-core box; ~40% of examples yield "
        "pairs) -> about 15 min for 2k"),
    ("p2dpo", "full"): Preset(
        "p2dpo-llava665k", None, 10_000, {"policy": f"hf:{LLAVA}", "clip": CLIP_L},
        {"max_new_tokens": 256},
        "1x H100 80GB, transformers (attention maps and contrastive decoding need hf:, not "
        "vLLM); estimate 6-12 h for 10k examples", batch_size=16),
    ("cwdpo", "world"): Preset(
        "cwdpo-shapes", WORLD_SOURCE, 1000, dict(WORLD_MODELS), {},
        "CPU, 1 thread: measured 0.29 s/example with k=8 (busy 2-core box) -> about 5 min"),
    ("cwdpo", "full"): Preset(
        "cwdpo-llava665k", None, 50_000, {"policy": f"vllm:{LLAVA}", "clip": CLIP_L},
        {"max_new_tokens": 256},
        "1x H100 80GB (vLLM LLaVA-1.5-7B + CLIP); estimate 2-4 h for 50k examples "
        "(8 samples each)", batch_size=64),
    ("aspo", "world"): Preset(
        "aspo-shapes", "{root}/vapr-shapes/dataset", 5000, dict(WORLD_MODELS), {},
        "CPU, 1 thread: estimate 5-10 min over the VaPR world set (one scoring pass; not "
        "measured: the engine cannot read pair sets yet)"),
    ("aspo", "full"): Preset(
        "aspo-llava665k", "{root}/vapr-llava665k/dataset", 200_000,
        {"policy": f"vllm:{LLAVA}", "clip": CLIP_L}, {},
        "1x H100 80GB; estimate about 1 h over the VaPR full set (one scoring pass)",
        batch_size=64),
}


@dataclass
class Plan:
    """One run: the build config, the Hub repo and the publish options."""

    recipe: str
    preset: str
    config: BuildConfig
    repo_id: str
    dry_run: bool
    private: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", choices=sorted(RECIPES))
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    p.add_argument("--preset", choices=("world", "full"), default="world")
    p.add_argument("--n", type=int, help="size: world examples generated, else --limit")
    p.add_argument("--root", type=Path, default=Path("builds"), help="builds go to ROOT/NAME")
    p.add_argument("--repo-id", help=f"Hub dataset repo (default {ORG}/NAME)")
    p.add_argument("--dry-run", action="store_true", help="stage and verify, do not push")
    p.add_argument("--private", action="store_true")
    p.add_argument("--source", help="SFT source (the full presets need it: the LLaVA JSON)")
    p.add_argument("--image-root", type=Path, help="folder the source's image paths are in")
    for role in ("policy", "clip", "editor", "judge"):
        p.add_argument(f"--{role}", help=f"{role} model spec (overrides the preset)")
    p.add_argument("--param", action="append", default=[], help="recipe KEY=VALUE (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="examples per recipe call (default: the preset's)")
    p.add_argument("--shard", help="I/N: this machine's shard (merge with `pairforge merge`)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing build")
    args = p.parse_args(argv)
    if not args.list and args.recipe is None:
        p.error("give a RECIPE (or --list)")
    return args


def plan(argv: Sequence[str] | None = None) -> Plan:
    """The run ``argv`` asks for: the preset, then the options given on top of it."""
    a = parse_args(argv)
    preset = PRESETS[(a.recipe, a.preset)]
    n = a.n if a.n is not None else preset.n
    if n < 1:
        raise PairforgeError(f"--n {n}: must be >= 1")
    source = a.source or (preset.source or "").format(n=n, root=a.root)
    if not source:
        raise PairforgeError(f"{a.recipe} --preset {a.preset}: pass --source PATH/{LLAVA_SOURCE} "
                             f"and --image-root with LLaVA-1.5's image folders (see "
                             f"scripts/README.md)")
    models = {**preset.models, **{r: getattr(a, r) for r in ("policy", "clip", "editor", "judge")
                                  if getattr(a, r)}}
    world_sft = source.startswith("shapes")  # the world's size is in its spec, not a limit
    shard = parse_shard(a.shard)
    out = a.root / (preset.name if shard is None else f"{preset.name}-shard{shard[0]}of{shard[1]}")
    config = BuildConfig(
        recipe=a.recipe, out=out, source=source, models=models,
        limit=None if world_sft else n, shard=shard, seed=a.seed,
        batch_size=a.batch_size or preset.batch_size, image_root=a.image_root,
        params={**preset.params, **parse_params(a.param)}, overwrite=a.overwrite)
    return Plan(a.recipe, a.preset, config.check(), a.repo_id or f"{ORG}/{preset.name}",
                a.dry_run, a.private)


def run(p: Plan, *, command: str = "", console: Any = None, progress: bool = True) -> dict:
    """Build, then publish (or stage only, with ``dry_run``); returns the build summary with
    ``staging`` and ``pushed`` (the commit URL, None for a dry run) added."""
    from rich.console import Console

    from pairforge.engine import build
    from pairforge.publish.hub import publish

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    summary = build(p.config, command=command, console=console, progress=progress)
    counts = summary["counts"]
    if p.config.shard is not None:  # one shard of the set: published once all are merged
        i, n = p.config.shard
        shards = " ".join(str(p.config.out).replace(f"shard{i}of", f"shard{k}of") for k in range(n))
        merged = str(p.config.out).rsplit("-shard", 1)[0]
        console.print(f"shard {i}/{n}: {counts['pairs']:,} pairs in {p.config.out}; once every "
                      f"shard is built: pairforge merge {shards} --out {merged} && pairforge "
                      f"publish {merged} --repo-id {p.repo_id}", highlight=False)
        return {**summary, "staging": None, "pushed": None}
    if counts["pairs"] == 0:
        stage, top = next(((s, next(iter(v["reasons"]), "")) for s, v in
                           summary["rejects_by_stage"].items()), ("", ""))
        raise PairforgeError(f"{p.config.out}: no pairs to publish ({counts['rejected']} of "
                             f"{counts['examples_in']} examples rejected, most at {stage}: "
                             f"{top}); see {p.config.out}/rejects.jsonl")
    result = publish(p.config.out, p.repo_id, private=p.private, dry_run=p.dry_run,
                     console=console)
    where = "dry run, not pushed" if p.dry_run else (result.pr_url or result.commit_url)
    console.print(f"{p.recipe}/{p.preset}: {counts['pairs']:,} pairs from "
                  f"{counts['examples_in']:,} examples ({counts['rejected']:,} rejected) -> "
                  f"{p.repo_id} ({where}); staged in {result.staging}; "
                  f"{time.perf_counter() - t0:.0f} s", highlight=False)
    return {**summary, "staging": str(result.staging),
            "pushed": None if p.dry_run else where}


def print_presets() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("recipe", "preset", "name", "source", "n", "models", "params", "batch",
                  "hardware and time")
    for (recipe, name), pr in PRESETS.items():
        table.add_row(recipe, name, pr.name, pr.source or f"--source {LLAVA_SOURCE}", f"{pr.n:,}",
                      " ".join(f"{k}={v}" for k, v in pr.models.items()),
                      " ".join(f"{k}={v}" for k, v in pr.params.items()), str(pr.batch_size),
                      pr.hardware)
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if parse_args(argv).list:
        print_presets()
        return None
    p = plan(argv)
    return run(p, command=shlex.join(["python", "scripts/publish_pairsets.py", *argv]))


if __name__ == "__main__":
    try:
        main()
    except PairforgeError as e:  # errors a user can cause: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
