"""The build folder's ledger: run identity, ``manifest.json``, atomic writes, the lock.

Layout of a build folder ``DIR``::

    manifest.json              what is committed (below); rewritten atomically per chunk
    data/chunk-NNNNN.parquet   canonical rows of chunk N (images embedded)
    rejects/chunk-NNNNN.jsonl  the examples of chunk N that yielded no pair
    rejects.jsonl, dataset/, summary.json    written when the build is finished

A chunk is ``chunk_size`` consecutive examples of the build's share of the source. Its files
are written to a temporary name, fsynced and renamed into place, and only then recorded in the
manifest, together with the recipe's ``state_dict()`` after that chunk. A build killed at any
point resumes from the manifest: a chunk file that the manifest does not list is rewritten,
so no row is lost or written twice.

The run identity hashes the semantic settings only (:func:`run_settings`): recipe name and
params, model specs and revisions, prompt-template hashes, seed and source. Batch size,
chunk size, device and the output folder never enter it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from pairforge import __version__
from pairforge.errors import PairforgeError, check_out_path

MANIFEST = "manifest.json"
FORMAT = 1
#: What a build writes into its folder (removed by --overwrite; nothing else is touched).
OUTPUTS = (MANIFEST, "data", "rejects", "rejects.jsonl", "dataset", "summary.json", "error.log",
           ".cache", ".lock")


# ----------------------------------------------------------------------------- atomic files


def write_atomic(path: Path, write: Callable[[IO[bytes]], None] | bytes) -> None:
    """Write ``path`` all or nothing: a temporary file in the same folder, fsync, rename,
    fsync of the folder. ``write`` is the bytes or a function that writes to the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        if isinstance(write, bytes):
            f.write(write)
        else:
            write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: ``str.encode`` arguments for JSON text: a lone surrogate (not encodable as UTF-8) becomes
#: its JSON escape ``\\udXXX``, so a writer never fails on it and the file reads back the same.
JSON_TEXT = ("utf-8", "backslashreplace")


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode(*JSON_TEXT))


# ----------------------------------------------------------------------------- identity


def run_settings(*, recipe: str, params: Mapping[str, Any], models: list[dict],
                 templates: list[dict], seed: int, source: str, limit: int | None,
                 max_pixels: int) -> dict[str, Any]:
    """The settings that change what a build produces, as a JSON-able dict."""
    return {
        "recipe": recipe,
        "params": json.loads(json.dumps(dict(params), sort_keys=True, default=repr)),
        "models": {m["role"]: {"name": m["name"], "revision": m["revision"]} for m in models},
        "templates": {t["name"]: t["sha256"] for t in templates},
        "seed": seed,
        "source": {"spec": source, "limit": limit, "max_pixels": max_pixels},
    }


def run_identity(settings: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of :func:`run_settings`."""
    text = json.dumps(settings, sort_keys=True, ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def settings_diff(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first setting that differs, as ``"params.alpha: 0.5 → 0.7"``; None when equal."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            d = settings_diff(old.get(key), new.get(key), f"{prefix}{key}.")
            if d:
                return d
        return None
    if old != new:
        return f"{prefix.rstrip('.')}: {_short(old)} → {_short(new)}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def local_fingerprint(path: Path) -> str:
    """``local:<hash>`` of a model file or folder: names, sizes and the first and last MiB of
    each file (a revision for models that have no Hub commit)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(path) if p != path else p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return "local:" + h.hexdigest()[:16]


def shard_of(example_id: str, n_shards: int) -> int:
    """The shard an example belongs to: a stable hash of its id modulo ``n_shards``."""
    digest = hashlib.sha256(example_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


# ----------------------------------------------------------------------------- manifest


class Manifest:
    """``DIR/manifest.json`` as a dict with the operations the engine needs.

    Keys: ``format``, ``identity``, ``settings``, ``shard`` (``[i, n]`` or None),
    ``chunk_size``, ``recipe``, ``groups``, ``models`` (configured), ``prompt_templates``,
    ``seed``, ``source`` (the canonical spec), ``source_dataset``, ``chunks`` (one record per
    committed chunk), ``state`` (the recipe's state after the last chunk), ``exhausted`` (the
    source was read to its end),
    ``source_entries`` (examples of the source up to the limit, all shards), ``complete``
    (finalised), ``sessions`` (command, start, wall time of each run), ``merged_from``."""

    def __init__(self, folder: Path, data: dict[str, Any]):
        self.folder, self.data = Path(folder), data

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise PairforgeError(f"{path}: not valid JSON ({e}); the folder was not written by "
                                 f"pairforge build, pass another --out") from None
        except OSError as e:
            raise PairforgeError(f"{path}: cannot read it ({e.strerror or e}); check its "
                                 f"permissions or pass another --out") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PairforgeError(f"{path}: not a pairforge build manifest (format "
                                 f"{data.get('format') if isinstance(data, dict) else '?'}); "
                                 f"pass another --out")
        return cls(folder, data)

    @classmethod
    def new(cls, folder: Path, *, identity: str, settings: dict, shard: tuple[int, int] | None,
            chunk_size: int, recipe: str, groups: list[str], models: list[dict],
            prompt_templates: list[dict], seed: int, source: str,
            source_dataset: str) -> Manifest:
        return cls(folder, {
            "format": FORMAT, "pairforge_version": __version__, "identity": identity,
            "settings": settings, "shard": list(shard) if shard else None,
            "chunk_size": chunk_size, "recipe": recipe, "groups": groups, "models": models,
            "prompt_templates": prompt_templates, "seed": seed, "source": source,
            "source_dataset": source_dataset, "chunks": [], "state": None, "exhausted": False,
            "source_entries": None, "complete": False, "sessions": [], "merged_from": None,
        })

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def chunks(self) -> list[dict]:
        return self.data["chunks"]

    @property
    def n_done(self) -> int:
        """Examples of this build committed so far."""
        return sum(c["n_in"] for c in self.chunks)

    def save(self) -> None:
        write_json(self.folder / MANIFEST, self.data)

    def commit_chunk(self, record: dict, state: dict | None, wall_s: float) -> None:
        """Record a chunk whose files are already in place, with the recipe state after it."""
        self.chunks.append(record)
        self.data["state"] = state
        self.data["sessions"][-1]["wall_s"] = round(wall_s, 3)
        self.save()

    def path(self, relative: str) -> Path:
        return self.folder / relative


def check_out_folder(folder: Path, *, overwrite: bool) -> None:
    """Refuse ``--out`` when it is not a folder pairforge may write: a file (or under one), or
    a folder with content and no build manifest. With ``overwrite``, such a folder is taken
    only when none of its entries has the name of a build output (they would be replaced);
    its other files are left alone. Nothing is created or removed here."""
    folder = Path(folder)
    check_out_path(folder)
    if not folder.is_dir():
        return
    if (folder / MANIFEST).is_file():
        return  # a build folder (checked by Manifest.load)
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name != ".lock")
    except OSError as e:
        raise PairforgeError(f"--out {folder}: cannot list the folder ({e.strerror or e}); pass "
                             f"a folder you can write") from None
    if not names:
        return
    clash = [n for n in names if n in OUTPUTS]
    if not overwrite:
        raise PairforgeError(f"--out {folder}: the folder holds files pairforge did not write "
                             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) and no "
                             f"build manifest; pass an empty or new folder (--overwrite keeps "
                             f"them but cannot replace them)")
    if clash:
        raise PairforgeError(f"--out {folder}: the folder holds {clash[0]!r}, which pairforge did "
                             f"not write (there is no build manifest) and a build would replace; "
                             f"--overwrite removes only pairforge's own files: pass an empty or "
                             f"new folder")


def open_build(folder: Path, *, identity: str, settings: dict, shard: tuple[int, int] | None,
               overwrite: bool, fresh: Callable[[], Manifest]) -> Manifest:
    """The manifest to go on with: a new one for an empty or absent folder (or with
    ``overwrite``), the existing one when it has the same identity and shard; otherwise a
    one-line error naming the differing setting and the fix. A folder without a manifest
    is taken only on the terms of :func:`check_out_folder`; ``overwrite`` removes only what
    the old build wrote (:func:`clear_outputs`)."""
    folder = Path(folder)
    old = Manifest.load(folder)
    if old is None:
        check_out_folder(folder, overwrite=overwrite)
        return fresh()
    if overwrite:
        clear_outputs(folder, old)
        return fresh()
    if old["identity"] != identity:
        diff = settings_diff(old["settings"], settings) or "settings"
        raise PairforgeError(f"--out {folder} holds a build with other settings ({diff}); "
                             f"pass --out with a new folder, or --overwrite to discard it")
    if (old["shard"] or None) != (list(shard) if shard else None):
        was = "/".join(map(str, old["shard"])) if old["shard"] else "no shard"
        now = "/".join(map(str, shard)) if shard else "no shard"
        raise PairforgeError(f"--out {folder} holds shard {was}, this build is {now}; pass the "
                             f"same --shard, another --out, or --overwrite")
    return old


def clear_outputs(folder: Path, manifest: Manifest) -> None:
    """Remove what the build of ``manifest`` wrote in ``folder``: its chunk files (and their
    temporary names), ``data/`` and ``rejects/`` when that leaves them empty, and the files
    of :data:`OUTPUTS` (not the lock); a file it did not write is left where it is."""
    def remove(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()

    for c in manifest.chunks:
        for key in ("data", "rejects"):
            p = folder / c[key]
            remove(p)
            remove(p.with_name(f".{p.name}.tmp"))
    for sub in ("data", "rejects"):
        d = folder / sub
        if d.is_dir() and not d.is_symlink():
            for p in d.glob(".chunk-*.tmp"):  # a chunk being written when the build died
                remove(p)
            if not any(d.iterdir()):
                d.rmdir()
    for name in OUTPUTS:
        if name in ("data", "rejects", ".lock", MANIFEST):
            continue
        remove(folder / name)
        remove(folder / f".{name}.tmp")
    remove(folder / ".dataset.tmp")
    remove(folder / MANIFEST)


class BuildLock:
    """An exclusive lock on a build folder (``filelock``: released by the OS if the process
    dies); creates the folder. A folder that cannot be created or written is a one-line
    error."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock: Any = None

    def __enter__(self) -> BuildLock:
        from filelock import FileLock, Timeout

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / ".lock"), timeout=0)
            lock.acquire()
        except Timeout:
            raise PairforgeError(f"--out {self.folder}: another pairforge process is writing "
                                 f"this folder; wait for it or pass another --out") from None
        except OSError as e:
            raise PairforgeError(f"--out {self.folder}: cannot write there "
                                 f"({e.strerror or e}); pass a folder you can write") from None
        self._lock = lock
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
