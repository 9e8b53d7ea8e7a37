"""The Hub repo layout, written locally: parquet shards with embedded images, then checked by
loading the folder back with ``datasets.load_dataset``.

::

    STAGING/
      README.md                                   the card (pairforge.publish.card)
      images/*.png                                the audit's plots, shown in the card
      data/train-00000-of-00001.parquet           one ``default`` config, or
      data/<config>/train-00000-of-0000N.parquet  one folder per config (P2-DPO focus / robust)

Shards hold at most :data:`MAX_SHARD_BYTES` of Arrow data each, as ``push_to_hub`` does;
image files that rows only point to are read into the parquet (``embed_table_storage``), so
the repo is self-contained and no local path leaks into it (paths are cut to file names).
"""

from __future__ import annotations

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

#: Arrow bytes per parquet shard (the ``push_to_hub`` default).
MAX_SHARD_BYTES = 500 * 1024 * 1024
#: Rows per batch while embedding image files (bounds memory per step).
EMBED_BATCH = 256
#: What a staging folder may hold for :func:`prepare_staging` to clear it.
STAGED_NAMES = {"README.md", "data", "images"}


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


def prepare_staging(folder: Path) -> None:
    """Create ``folder``, or empty it when it holds only what staging writes."""
    if folder.exists():
        if not folder.is_dir():
            raise PairforgeError(f"{folder}: exists and is not a folder; pass --staging elsewhere")
        others = sorted(p.name for p in folder.iterdir() if p.name not in STAGED_NAMES)
        if others:
            raise PairforgeError(f"{folder}: not empty and not a pairforge staging folder (has "
                                 f"{others[0]!r}); pass --staging with a new or staged folder")
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    folder.mkdir(parents=True, exist_ok=True)


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
            try:
                embedded = shard.with_format("arrow").map(
                    embed_table_storage, batched=True, batch_size=EMBED_BATCH,
                    keep_in_memory=True)
            except FileNotFoundError as e:
                raise PairforgeError(f"config {cf.name!r}: a row points to the image file "
                                     f"{e.filename!r}, which does not exist; restore it or "
                                     f"rebuild the set with embedded images") from None
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
    from datasets import Image, List

    columns = [k for k, v in features.items()
               if isinstance(v, Image) or (isinstance(v, List) and isinstance(v.feature, Image))]
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
