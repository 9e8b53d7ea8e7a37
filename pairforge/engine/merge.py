"""``pairforge merge``: join the outputs of ``--shard I/N`` builds into one build folder.

Checked by manifest before anything is written: every input is a finished shard build
(``--shard`` given, source read to its end), all have the same run identity and the same N,
each shard 0..N-1 is there exactly once, and together they cover the source (their
examples add up to the source's, and no row or reject id occurs in two shards). The merged
folder has the layout of a build (chunks renumbered in shard order) and is finished the same
way (``rejects.jsonl``, ``dataset/``, ``summary.json``).

With a recipe that keeps cross-example state (VaPR's penalty lists), each shard has its own
state, so a merged build equals the union of the shards, not an unsharded build.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pairforge.engine.manifest import (
    BuildLock,
    Manifest,
    check_out_folder,
    open_build,
    settings_diff,
)
from pairforge.engine.summary import finish, print_summary
from pairforge.errors import PairforgeError


def merge(folders: Sequence[str | os.PathLike], out: str | os.PathLike, *,
          overwrite: bool = False, command: str = "", console: Any = None) -> dict:
    """Merge shard build folders into ``out``; returns the merged summary. ``command`` is
    recorded as a session of the merged build."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out)
    shards = check_shards([Path(f) for f in folders])
    if any(out.resolve() == m.folder.resolve() for m in shards):
        raise PairforgeError(f"--out {out} is one of the shard folders; pass a new folder")
    first = shards[0]
    check_out_folder(out, overwrite=overwrite)  # before the lock file is created in it
    with BuildLock(out):
        def fresh() -> Manifest:
            data = dict(first.data)
            data.update(shard=None, chunks=[], state=None, exhausted=True, complete=False,
                        sessions=[s for m in shards for s in m["sessions"]]
                        + ([{"command": command, "wall_s": 0.0,
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
                           if command else []),
                        merged_from=[{"folder": str(m.folder), "shard": m["shard"]}
                                     for m in shards])
            return Manifest(out, data)

        old = Manifest.load(out)
        if old is not None and old["merged_from"] is None and not overwrite:
            raise PairforgeError(f"--out {out} holds a build, not a merge; pass another --out "
                                 f"or --overwrite")
        # a merge is cheap: always redone from the shards (a folder without a manifest only on
        # the terms of check_out_folder)
        manifest = open_build(out, identity=first["identity"], settings=first["settings"],
                              shard=None, overwrite=overwrite or old is not None, fresh=fresh)
        for m in shards:
            for c in m.chunks:
                k = len(manifest.chunks)
                record = {**c, "index": k, "data": f"data/chunk-{k:05d}.parquet",
                          "rejects": f"rejects/chunk-{k:05d}.jsonl",
                          "from": {"shard": m["shard"][0], "index": c["index"]}}
                for key in ("data", "rejects"):
                    (out / record[key]).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(m.folder / c[key], out / record[key])
                manifest.chunks.append(record)
        manifest.save()
        summary = finish(out, manifest, console=console)
    print_summary(summary, console)
    console.print(f"merged {len(shards)} shards → {out}")
    return summary


def check_shards(folders: list[Path]) -> list[Manifest]:
    """The shards' manifests in shard order, after every check in the module docstring."""
    if not folders:
        raise PairforgeError("pairforge merge: give the shard build folders to merge")
    manifests = []
    for f in folders:
        m = Manifest.load(f)
        if m is None:
            raise PairforgeError(f"{f}: not a build folder (no manifest.json); pass the --out "
                                 f"folders of the `pairforge build --shard I/N` runs")
        if not m["shard"]:
            raise PairforgeError(f"{f}: built without --shard; only shard builds can be merged")
        if not m["exhausted"]:
            raise PairforgeError(f"{f}: shard {m['shard'][0]}/{m['shard'][1]} is not finished "
                                 f"({m.n_done:,} examples committed); rerun its build command")
        manifests.append(m)
    first = manifests[0]
    for m in manifests[1:]:
        if m["identity"] != first["identity"]:
            diff = settings_diff(first["settings"], m["settings"]) or "settings"
            raise PairforgeError(f"{m.folder}: another run than {first.folder} ({diff}); merge "
                                 f"only shards of one build command")
    n = first["shard"][1]
    by_index: dict[int, Manifest] = {}
    for m in manifests:
        i, count = m["shard"]
        if count != n:
            raise PairforgeError(f"{m.folder}: shard {i}/{count}, but {first.folder} is of "
                                 f"{n} shards; merge shards of one --shard I/N split")
        if i in by_index:
            raise PairforgeError(f"shard {i}/{n} is given twice ({by_index[i].folder} and "
                                 f"{m.folder}); pass each shard once")
        by_index[i] = m
    missing = sorted(set(range(n)) - set(by_index))
    if missing:
        raise PairforgeError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing; pass "
                             f"all {n} shard folders")
    shards = [by_index[i] for i in range(n)]
    source = {m["source_entries"] for m in shards}
    covered = sum(m.n_done for m in shards)
    if len(source) != 1 or covered != source.pop():
        raise PairforgeError(f"the shards hold {covered:,} examples but their source has "
                             f"{first['source_entries']:,}; they do not split one source")
    check_disjoint(shards)
    return shards


def check_disjoint(shards: list[Manifest]) -> None:
    """No row id and no rejected example id in two shards."""
    import pyarrow.parquet as pq

    owner: dict[str, int] = {}
    for m in shards:
        for c in m.chunks:
            ids = [json.loads(line)["id"] for line in open(m.folder / c["rejects"], "rb")]
            if c["n_rows"]:
                ids += pq.read_table(m.folder / c["data"], columns=["id"])["id"].to_pylist()
            for x in ids:
                if owner.setdefault(x, m["shard"][0]) != m["shard"][0]:
                    raise PairforgeError(f"id {x!r} is in shard {owner[x]} and shard "
                                         f"{m['shard'][0]}; the shards overlap, rebuild them")
