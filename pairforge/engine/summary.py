"""The end of a build (or merge): ``rejects.jsonl``, ``dataset/``, ``summary.json``, the
terminal table; and :func:`load_build` for the code that uses a build (trainer, publisher).

Everything here is derived from the committed chunks the manifest lists, so finishing is
idempotent: a build killed while finishing finishes again on the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairforge import __version__
from pairforge.engine.manifest import Manifest, write_atomic, write_json
from pairforge.errors import PairforgeError
from pairforge.schema import count_image_parts, features, prompt_text, response_text
from pairforge.sources.sft import ReasonTally, reason_kind

#: Reject reasons listed per stage in the summary (by kind, most frequent first).
TOP_REASONS = 10
#: Recipe stats shown in the terminal table (the largest; all are in summary.json).
TABLE_STATS = 8
#: Diagnostics shown in the terminal table.
TABLE_DIAGNOSTICS = ("lev_words_median", "lev_norm_median", "len_gap_median",
                     "chosen_longer_rate", "near_duplicate_rate", "delta_ref_mean",
                     "delta_ref_positive_rate", "ips_mean", "ips_positive_rate")


def finish(out: Path, manifest: Manifest, *, console: Any, wall_s: float | None = None,
           timing: dict[str, float] | None = None) -> dict:
    """Write ``rejects.jsonl``, ``dataset/`` and ``summary.json`` from the committed chunks
    and mark the manifest complete; returns the summary. ``wall_s``: this session's time so
    far; ``timing``: its phases (``setup_s``, ``chunks_s``; ``finish_s`` is added)."""
    import time

    t0 = time.perf_counter()
    out = Path(out)
    chunks = manifest.chunks
    counts = {
        "source_examples": manifest["source_entries"],
        "other_shards": (manifest["source_entries"] or 0) - sum(c["n_in"] for c in chunks),
        "examples_in": sum(c["n_in"] for c in chunks),
        "examples_with_pairs": sum(c["n_with_pairs"] for c in chunks),
        "rejected": sum(c["n_rejected"] for c in chunks),
        "pairs": sum(c["n_rows"] for c in chunks),
    }
    if counts["examples_in"] != counts["examples_with_pairs"] + counts["rejected"]:
        raise RuntimeError(f"{out}: {counts['examples_in']} examples in but "
                           f"{counts['examples_with_pairs']} with pairs + {counts['rejected']} "
                           f"rejected; this is a pairforge bug")
    with console.status("writing rejects.jsonl, dataset/ and summary.json"):
        second = run_pass(out, manifest)  # the recipe's rule fitted on the whole run, if any
        if second is not None:
            counts["examples_with_pairs"] -= second.examples_rejected
            counts["rejected"] += second.examples_rejected
            counts["pairs"] -= len(second.dropped)
        extra = second.rejects if second is not None else {}
        skip = second.dropped if second is not None else frozenset()
        by_stage = write_rejects(out, manifest, extra)
        n_lines = sum(s["n"] for s in by_stage.values())
        if n_lines != counts["rejected"]:
            raise RuntimeError(f"{out}: the rejects files hold {n_lines} records, the manifest "
                               f"counts {counts['rejected']}; this is a pairforge bug")
        diagnostics = audit_rows(out, manifest, skip)
        n_rows = write_dataset(out, manifest, skip)
    if n_rows != counts["pairs"]:
        raise RuntimeError(f"{out}: dataset/ has {n_rows} rows, the manifest counts "
                           f"{counts['pairs']}; this is a pairforge bug")
    if wall_s is not None and manifest["sessions"]:
        manifest.data["sessions"][-1]["wall_s"] = round(wall_s + time.perf_counter() - t0, 3)
    steps: dict[str, Counter] = {}
    stats: Counter = Counter()
    for c in chunks:
        for step, v in c["steps"].items():
            steps.setdefault(step, Counter()).update(v)
        stats.update(c["stats"])
    if second is not None:
        stats.update(second.stats)
        steps["run_pass"] = Counter({"in": second.examples_in, "dropped": second.examples_rejected})
    summary = {
        "run_identity": manifest["identity"],
        "recipe": manifest["recipe"],
        "source_dataset": manifest["source_dataset"],
        "shard": manifest["shard"],
        "merged_from": manifest["merged_from"],
        "counts": counts,
        "steps": {k: {"in": v["in"], "forwarded": v["in"] - v["dropped"], "dropped": v["dropped"]}
                  for k, v in steps.items()},
        "rejects_by_stage": by_stage,
        "recipe_stats": dict(sorted(stats.items())),
        "diagnostics": diagnostics,
        "settings": manifest["settings"],
        "models_configured": manifest["models"],
        "chunk_size": manifest["chunk_size"],
        "n_chunks": len(chunks),
        "commands": [s["command"] for s in manifest["sessions"]],
        "wall_s": round(sum(s["wall_s"] for s in manifest["sessions"]), 3),
        "timing": {k: round(v, 3) for k, v in
                   {**(timing or {}), "finish_s": time.perf_counter() - t0}.items()},
        "pairforge_version": __version__,
    }
    if second is not None:  # the fitted rule's numbers at the top level (margin_window_lo, ...)
        summary.update(second.fitted)
        summary["run_pass"] = {"columns": list(second.columns), "fitted": list(second.fitted),
                               "rows_in": second.rows_in,
                               "rows_dropped": len(second.dropped),
                               "examples_rejected": second.examples_rejected}
    summary.update(recipe_summary_extras(manifest["recipe"], manifest["settings"].get("params") or {}, stats))
    write_json(out / "summary.json", summary)
    manifest.data["complete"] = True
    manifest.save()
    return summary


@dataclass
class SecondPass:
    """What :func:`run_pass` did: the fitted rule, the row ids it dropped, the examples it
    turned into rejects (records by chunk index), the recipe-stat deltas and the counts."""

    columns: tuple[str, ...]
    fitted: dict[str, Any]
    dropped: frozenset[str]
    rejects: dict[int, list[dict]]
    stats: Counter
    rows_in: int
    examples_in: int
    examples_rejected: int


def run_pass(out: Path, manifest: Manifest) -> SecondPass | None:
    """Pass two of the build (:class:`pairforge.recipes.base.RunPass`): fit the recipe's
    whole-run rule on the committed rows' values and judge every row; None when the recipe
    has no such rule. Reads the chunk files only, so it is idempotent."""
    import pyarrow.parquet as pq

    rp = _recipe_run_pass(manifest)
    if rp is None:
        return None
    wanted = list(dict.fromkeys(["id", "source_id", *([rp.group] if rp.group else []), *rp.columns]))
    tables = {c["index"]: pq.read_table(out / c["data"], columns=wanted).to_pylist()
              for c in manifest.chunks if c["n_rows"]}
    rows = [r for t in tables.values() for r in t]
    fitted = rp.fit({col: [r[col] for r in rows] for col in rp.columns})
    dropped: set[str] = set()
    rejects: dict[int, list[dict]] = {}
    stats: Counter = Counter()
    n_examples = n_rejected = 0
    for index, chunk in tables.items():
        by_example: dict[str, list[dict]] = {}
        for r in chunk:
            by_example.setdefault(r[rp.group] if rp.group else r["id"], []).append(r)
        n_examples += len(by_example)
        if rp.judge is None:
            continue
        for example, group in by_example.items():
            reasons = []
            for r in group:
                verdict = rp.judge(r, fitted)
                if verdict is not None:
                    dropped.add(r["id"])
                    reasons.append(verdict[0])
                    stats.update(verdict[1])
            if len(reasons) == len(group):
                n_rejected += 1
                rejects.setdefault(index, []).append(
                    {"id": example, "source_id": group[0]["source_id"], "stage": "filter",
                     "reason": "; ".join(reasons)})
    return SecondPass(tuple(rp.columns), fitted, frozenset(dropped), rejects, stats, len(rows),
                      n_examples, n_rejected)


def _recipe_run_pass(manifest: Manifest):
    """The build's recipe's :class:`~pairforge.recipes.base.RunPass` (None when it has none),
    the recipe configured from the params recorded in the manifest."""
    import importlib

    from pairforge.recipes import RECIPES, load_recipe

    name = manifest["recipe"]
    if name not in RECIPES:
        return None
    module, cls = RECIPES[name].split(":")
    if not hasattr(getattr(importlib.import_module(module), cls), "run_pass"):
        return None
    return load_recipe(name, manifest["settings"]["params"]).run_pass()


def write_rejects(out: Path, manifest: Manifest,
                  extra: dict[int, list[dict]] | None = None) -> dict[str, dict]:
    """``rejects.jsonl`` (the chunks' rejects in order, each chunk followed by the examples
    pass two rejected in it, ``extra``); returns counts and top reason kinds by stage."""
    stages: dict[str, Counter] = {}
    tally = ReasonTally()  # the same kinds with their numbers, for the terminal
    extra = extra or {}

    def write(f) -> None:
        for c in manifest.chunks:
            with open(out / c["rejects"], "rb") as part:
                lines = list(part)
            lines += [(json.dumps(x, ensure_ascii=False) + "\n").encode("utf-8")
                      for x in extra.get(c["index"], ())]
            for line in lines:
                rec = json.loads(line)
                stages.setdefault(rec["stage"], Counter())[reason_kind(rec["reason"])] += 1
                tally.add(rec["stage"], rec["reason"])
                f.write(line)

    write_atomic(out / "rejects.jsonl", write)
    top: dict[str, tuple[str, int]] = {}
    for (stage, reason), n in tally.counts().most_common():
        top.setdefault(stage, (reason, n))
    return {stage: {"n": sum(c.values()), "reasons": dict(c.most_common(TOP_REASONS)),
                    "top_reason": top[stage][0]}
            for stage, c in sorted(stages.items(), key=lambda kv: -sum(kv[1].values()))}


def audit_rows(out: Path, manifest: Manifest, skip: frozenset[str] = frozenset()) -> dict:
    """The audit's set summary (statistics and flags) of the built pairs (without the row ids
    in ``skip``, dropped by pass two); also refuses duplicate row ids."""
    import pyarrow.parquet as pq

    from pairforge.engine.engine import diagnostics_unit
    from pairforge.diagnostics.audit import SetAudit

    audit = SetAudit(manifest["recipe"], diagnostics_unit())
    ids: Counter = Counter()
    for c in manifest.chunks:
        if not c["n_rows"]:
            continue
        rows = pq.read_table(out / c["data"], columns=["id", "prompt", "chosen", "rejected"])
        rows = [r for r in rows.to_pylist() if r["id"] not in skip]
        ids.update(r["id"] for r in rows)
        prompts = [prompt_text(r["prompt"]) for r in rows]
        audit.add([r["id"] for r in rows],
                  [hash((p, count_image_parts(r["prompt"]))) for p, r in zip(prompts, rows)],
                  prompts, [response_text(r["chosen"]) for r in rows],
                  [response_text(r["rejected"]) for r in rows])
    dup = next((i for i, n in ids.items() if n > 1), None)
    if dup is not None:
        raise PairforgeError(f"{out}: row id {dup!r} occurs {ids[dup]} times; recipe "
                             f"{manifest['recipe']} must give each pair a unique id "
                             f"(make_pair derives one from source, row id and texts)")
    # rejected examples are reported by stage, not as the audit's unreadable rows
    summary = audit.finish(0).summary
    for key in ("n_skipped", "n_read"):
        summary.pop(key, None)
    if "model_diagnostics" in manifest["groups"]:
        add_model_diagnostics(summary, out, manifest)
    return summary


def add_model_diagnostics(summary: dict, out: Path, manifest: Manifest) -> None:
    """``--reference`` builds: the model audit's Δ_ref / IPS statistics and flags
    (``near_zero_delta_ref``, …) from the ``delta_ref`` / ``ips`` columns, into ``summary``."""
    import pyarrow.parquet as pq

    from pairforge.diagnostics.model_based import build_model_result

    delta, ips, has_images = [], [], False
    for c in manifest.chunks:
        if c["n_rows"]:
            t = pq.read_table(out / c["data"], columns=["delta_ref", "ips", "prompt"]).to_pydict()
            delta += t["delta_ref"]
            ips += t["ips"]
            has_images = has_images or any(count_image_parts(p) for p in t["prompt"])
    model = build_model_result(delta, ips, has_images=has_images)
    summary.update(model.summary)
    summary["flags"] = list(summary.get("flags") or []) + model.flags


def write_dataset(out: Path, manifest: Manifest, skip: frozenset[str] = frozenset()) -> int:
    """``dataset/`` (``save_to_disk``) from the chunk parquet files (without the row ids in
    ``skip``), streamed through an Arrow cache in ``DIR/.cache``; returns its row count."""
    import datasets
    from datasets import Dataset

    feats = features(*manifest["groups"])
    files = [str(out / c["data"]) for c in manifest.chunks if c["n_rows"]]
    tmp, cache, final = out / ".dataset.tmp", out / ".cache", out / "dataset"
    for p in (tmp, cache):
        if p.exists():
            shutil.rmtree(p)
    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if files:
            ds = Dataset.from_parquet(files, features=feats, cache_dir=str(cache))
            if skip:
                ds = ds.filter(lambda i: i not in skip, input_columns="id")
        else:
            ds = Dataset.from_dict({k: [] for k in feats}, features=feats)
        # an empty dataset needs an explicit shard, or load_from_disk cannot read it back
        ds.save_to_disk(str(tmp), num_shards=None if len(ds) else 1)
        n = len(ds)
        del ds
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    shutil.rmtree(cache, ignore_errors=True)
    return n


def load_build(folder: str | os.PathLike):
    """The pairs of a finished build (or merge) folder as a ``datasets.Dataset``: canonical rows
    with provenance and the ``diagnostics`` columns."""
    from datasets import load_from_disk

    folder = Path(folder)
    manifest = Manifest.load(folder)
    if manifest is None:
        raise PairforgeError(f"{folder}: not a build folder (no manifest.json); pass the --out "
                             f"folder of `pairforge build` or `pairforge merge`")
    if not manifest["complete"] or not (folder / "dataset").is_dir():
        raise PairforgeError(f"{folder}: the build is not finished ({len(manifest.chunks)} "
                             f"chunks, {manifest.n_done:,} examples committed); rerun its "
                             f"`pairforge build` command to resume it")
    return load_from_disk(str(folder / "dataset"))


# ----------------------------------------------------------------------------- terminal


def recipe_summary_extras(recipe: str, params: dict, stats: dict) -> dict:
    """What the recipe class adds to the summary (its ``summary_extras(params, stats)``, e.g.
    VaPR's task shares), or nothing."""
    import importlib

    from pairforge.recipes import RECIPES

    if recipe not in RECIPES:
        return {}
    module, name = RECIPES[recipe].split(":")
    extras = getattr(getattr(importlib.import_module(module), name), "summary_extras", None)
    return dict(extras(params, stats)) if extras else {}


def print_summary(summary: dict, console: Any) -> None:
    """A short rich table: counts, rejects by stage, recipe stats, key diagnostics."""
    from rich.markup import escape
    from rich.table import Table

    c = summary["counts"]
    shard = summary["shard"]
    title = f"pairforge build {summary['recipe']} · run {summary['run_identity']}"
    if shard:
        title += f" · shard {shard[0]}/{shard[1]}"
    table = Table(title=escape(title), show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("examples in", f"{c['examples_in']:,}")
    if c["other_shards"]:
        table.add_row("  (other shards)", f"{c['other_shards']:,}")
    table.add_row("with pairs", f"{c['examples_with_pairs']:,}")
    table.add_row("rejected", f"{c['rejected']:,}")
    for stage, s in summary["rejects_by_stage"].items():
        table.add_row(f"  {escape(stage)}", f"{s['n']:,}")
    table.add_row("pairs", f"{c['pairs']:,}")
    stats = sorted(summary["recipe_stats"].items(), key=lambda kv: -abs(kv[1]))
    for k, v in stats[:TABLE_STATS]:
        table.add_row(f"stat {escape(k)}", f"{v:g}")
    if len(stats) > TABLE_STATS:
        table.add_row(f"  ({len(stats) - TABLE_STATS} more stats)", "summary.json")
    d = summary["diagnostics"]
    for k in TABLE_DIAGNOSTICS:
        if d.get(k) is not None:
            table.add_row(f"{k} ({d['length_unit']})" if k.startswith("len_") else k,
                          f"{d[k]:.3g}")
    second = summary.get("run_pass") or {}
    for k in second.get("fitted", ()):  # pass two's fitted rule (margin window, cooling floor)
        v = summary.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            table.add_row(escape(k), f"{v:.4g}")
    if second.get("rows_dropped"):
        table.add_row("  pairs dropped in pass two", f"{second['rows_dropped']:,}")
    rate = c["examples_in"] / summary["wall_s"] if summary["wall_s"] else 0.0
    table.add_row("wall time", f"{summary['wall_s']:.1f} s ({rate:.1f} ex/s)")
    console.print(table)
    for f in d.get("flags", []):
        console.print(f"[yellow]⚑[/yellow] {f['id']}: {escape(f['message'])}", highlight=False)
    for stage, s in summary["rejects_by_stage"].items():
        top = next(iter(s["reasons"].items()), None)
        if top:  # the most common kind, with its numbers (or their ranges) shown back
            console.print(f"rejected at {escape(stage)}: {s['n']:,}, most often "
                          f"“{escape(s.get('top_reason') or top[0])}” ({top[1]:,})", highlight=False)
