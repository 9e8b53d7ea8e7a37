"""The Hub repo layout, written locally: parquet shards with embedded images, then checked by
loading the folder back with ``datasets.load_dataset``.

::

    STAGING/
      README.md                                   the card (pairforge.publish.card)
      images/*.png                                the audit's plots, shown in the card
      data/train-00000-of-00001.parquet           one ``default`` config, or
      data/<config>/train-00000-of-0000N.parquet  one folder per config (P2-DPO focus / robust)
      .pairforge-staging                          the files pairforge wrote here (not pushed)

The layout is written into a temporary sibling (``.STAGING.partial-*``) and moved into place
once verified (:func:`begin_staging`, :func:`finish_staging`): a killed run leaves no truncated
parquet under the staging name. A staging folder is replaced only when it is empty or holds
exactly what an earlier staging listed in its marker; any other folder is refused, never
cleared.

Shards hold at most :data:`MAX_SHARD_BYTES` of Arrow data each, as ``push_to_hub`` does,
and image paths are cut to file names (``embed_table_storage``). Images arrive embedded: :func:`pairforge.publish.pairset.open_pairset` read every image that
rows only pointed to, inside the set's allowed root and checked
(:func:`pairforge.safety.checked_images`), so nothing here opens a file a row names, the repo
is self-contained and no local path leaks into it (paths are cut to file names).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, Features
from datasets.table import embed_table_storage

from pairforge.errors import PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.publish.pairset import SPLIT
from pairforge.schema import image_columns

#: Arrow bytes per parquet shard (the ``push_to_hub`` default).
MAX_SHARD_BYTES = 500 * 1024 * 1024
#: Rows per batch while embedding image files (bounds memory per step).
EMBED_BATCH = 256
#: The file that marks a folder as a pairforge staging folder and lists what pairforge wrote
#: in it (never pushed).
MARKER = ".pairforge-staging"


@dataclass
class ConfigFiles:
    """One config as staged: its rows, Arrow size, parquet files (repo paths) and their size."""

    name: str
    n_rows: int
    num_bytes: int
    files: list[str] = field(default_factory=list)
    download_size: int = 0

    @property
    def data_dir(self) -> str:
        return self.files[0].rsplit("/", 1)[0]

    @property
    def pattern(self) -> str:
        """The ``data_files`` glob of the card's ``configs`` entry."""
        return f"{self.data_dir}/{SPLIT}-*"


def staging_error(folder: Path, e: OSError) -> PairforgeError:
    """One line for a staging folder that cannot be written (read-only, under a file, full)."""
    what = e.strerror or type(e).__name__
    return PairforgeError(f"--staging {folder}: cannot write there ({what}); pass --staging "
                          f"with a writable folder (for a read-only build dir: a folder "
                          f"elsewhere)")


def check_staging(folder: Path) -> list[str]:
    """What may be replaced in ``folder``: ``[]`` for a folder that does not exist or is empty,
    else the files a previous staging wrote (from its :data:`MARKER`). A folder pairforge did
    not mark, or one that also holds files pairforge did not write, is refused: pairforge
    never deletes a file it did not write."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise PairforgeError(f"--staging {folder}: exists and is not a folder; pass --staging "
                             f"elsewhere")
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if not p.is_dir())
    if not present:
        return []
    marker = folder / MARKER
    try:
        written = json.loads(marker.read_text(encoding="utf-8"))["files"]
        assert isinstance(written, list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise PairforgeError(f"--staging {folder}: not empty and not a pairforge staging folder "
                             f"(no valid {MARKER}; it holds {present[0]!r}); pass --staging with "
                             f"a new or empty folder (pairforge never deletes files it did not "
                             f"write)") from None
    others = [f for f in present if f not in written and f != MARKER]
    if others:
        raise PairforgeError(f"--staging {folder}: holds {others[0]!r}, which pairforge did not "
                             f"stage ({len(others)} such file(s)); move them out or pass "
                             f"--staging with a new folder")
    # what is both listed and there: a listed file the user removed is not moved, and a
    # marker naming a path outside the folder can never reach it (present is inside)
    return [f for f in present if f != MARKER]


def begin_staging(folder: Path) -> Path:
    """A fresh temporary sibling of ``folder`` to stage into (see :func:`finish_staging`);
    left-overs of killed runs (marked, never finished) are removed first."""
    check_staging(folder)
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.glob(f".{folder.name}.partial-*"):
            if (old / MARKER).is_file():
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=parent))
        (tmp / MARKER).write_text(json.dumps({"complete": False, "files": []}),
                                  encoding="utf-8")
    except OSError as e:
        raise staging_error(folder, e) from None
    return tmp


def finish_staging(tmp: Path, folder: Path) -> None:
    """Mark ``tmp`` complete (the list of its files) and move it to ``folder``: a previous
    staging there (only what it listed) is replaced; a killed run leaves no partial file
    under ``folder``."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                   if p.is_file() and p.name != MARKER)
    written = check_staging(folder)  # again: the folder may have changed meanwhile
    try:
        marker = tmp / MARKER
        marker.with_suffix(".tmp").write_text(json.dumps({"complete": True, "files": files}),
                                              encoding="utf-8")
        os.replace(marker.with_suffix(".tmp"), marker)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            for f in written:
                target = old / f
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder / f, target)
            if (folder / MARKER).exists():
                os.replace(folder / MARKER, old / MARKER)
            _remove_empty_dirs(folder)
            os.replace(tmp, folder)  # folder is empty now (check_staging refused anything else)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as e:
        raise staging_error(folder, e) from None


def abandon_staging(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_empty_dirs(folder: Path) -> None:
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            pass


def shard_count(num_bytes: int, n_rows: int, max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    """Shards for ``num_bytes`` of Arrow data: enough that none exceeds the limit, at least
    one, at most one per row."""
    return max(1, min(n_rows, num_bytes // max_shard_bytes + 1))


def write_data(configs: Mapping[str, Dataset], folder: Path, *,
               max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> list[ConfigFiles]:
    """Write every config's rows as parquet shards under ``folder/data``."""
    from tqdm import tqdm

    single = list(configs) == ["default"]
    out = []
    plan = []
    for name, ds in configs.items():
        nbytes = arrow_nbytes(ds)
        n = shard_count(nbytes, len(ds), max_shard_bytes)
        data_dir = "data" if single else f"data/{name}"
        (folder / data_dir).mkdir(parents=True, exist_ok=True)
        cf = ConfigFiles(name, len(ds), nbytes)
        cf.files = [f"{data_dir}/{SPLIT}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
        out.append(cf)
        plan.extend((ds, cf, i, n) for i in range(n))
    with tqdm(total=sum(len(ds) for ds in configs.values()), desc="parquet shards",
              unit=" rows", disable=not progress or None, mininterval=0.5) as bar:
        for ds, cf, i, n in plan:
            shard = ds.shard(num_shards=n, index=i, contiguous=True)
            # every image has its bytes (open_pairset checked and embedded them), so this
            # reads no file: it only cuts the images' paths to file names, as push_to_hub does
            embedded = shard.with_format("arrow").map(
                embed_table_storage, batched=True, batch_size=EMBED_BATCH, keep_in_memory=True)
            path = folder / cf.files[i]
            embedded.with_format(None).to_parquet(str(path))
            cf.download_size += path.stat().st_size
            bar.update(len(shard))
    return out


def arrow_nbytes(ds: Dataset) -> int:
    """Arrow bytes of ``ds``'s rows (for a selection: its share of the underlying table)."""
    return int(ds.data.nbytes * len(ds) / max(1, ds.data.num_rows))


def unembedded_images(path: Path, features: Features) -> int:
    """Image values in a parquet file that have no bytes (only a path): 0 when self-contained."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    columns = list(image_columns(features))
    if not columns:
        return 0
    bad = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=EMBED_BATCH, columns=columns):
        for arr in batch.columns:
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                arr = arr.flatten()
            missing = pc.and_(arr.is_valid(), arr.field("bytes").is_null())
            bad += pc.sum(missing.cast(pa.int64())).as_py() or 0
    return bad


def verify(folder: Path, staged: list[ConfigFiles], features: Features,
           ids: Mapping[str, list[str]]) -> None:
    """Load ``folder`` with ``datasets.load_dataset`` per config, as a Hub user would, and
    check splits, features, row counts and row ids (order included) against what was staged.

    Raises :class:`PairforgeError` naming the config and what differs."""
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="pairforge-verify-") as cache:
        for cf in staged:
            try:
                loaded = load_dataset(str(folder), name=cf.name, cache_dir=cache)
            except Exception as e:  # noqa: BLE001 - the staged folder does not load: say why
                raise PairforgeError(f"{folder}: config {cf.name!r} does not load with "
                                     f"datasets.load_dataset ({_first_line(e)}); this is a "
                                     f"pairforge bug, please report it") from None
            where = f"{folder}: config {cf.name!r}"
            if list(loaded) != [SPLIT]:
                raise PairforgeError(f"{where} loads splits {sorted(loaded)}, expected "
                                     f"['{SPLIT}']; this is a pairforge bug")
            split = loaded[SPLIT]
            if split.features != features:
                diff = sorted(k for k in set(features) | set(split.features)
                              if features.get(k) != split.features.get(k))
                raise PairforgeError(f"{where} loads with other features (columns "
                                     f"{', '.join(diff)}); this is a pairforge bug")
            if len(split) != cf.n_rows:
                raise PairforgeError(f"{where} loads {len(split)} rows, staged {cf.n_rows}; "
                                     f"this is a pairforge bug")
            if list(split["id"]) != list(ids[cf.name]):
                raise PairforgeError(f"{where} loads other row ids (or order) than staged; "
                                     f"this is a pairforge bug")
            for f in cf.files:
                n = unembedded_images(folder / f, features)
                if n:
                    raise PairforgeError(f"{folder / f}: {n} image(s) without bytes; this is "
                                         f"a pairforge bug")
