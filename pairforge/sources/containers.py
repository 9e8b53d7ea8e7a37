"""Containers: where records come from, read lazily one at a time.

A spec is a ``.jsonl`` / ``.json`` / ``.parquet`` file, a ``save_to_disk`` folder, a folder
laid out like a Hub dataset repo, or a Hub id ``org/name``. :func:`open_container` checks the
spec up front (a problem there is a one-line :class:`PairforgeError`) and returns a
:class:`Container` whose ``records()`` yields ``(row index, record)`` pairs; a record that
cannot even be parsed (a broken JSON line) comes as a :class:`BadInput` in its place.

Nothing holds the whole set: JSON Lines go line by line, a ``.json`` list is decoded one
element at a time, parquet goes by record batch (``ParquetFile.iter_batches``), datasets are
memory-mapped (``load_from_disk``) or streamed (``load_dataset(..., streaming=True)``) and
read as Arrow batches, so images are never decoded here. With ``load_images=False`` the
``bytes`` of image structs are not read at all where the container allows it (parquet column
projection) and dropped from each batch otherwise.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.errors import BadInput, PairforgeError, first_line

BATCH_ROWS = 64  # rows per Arrow batch: bounds memory when rows carry image bytes
JSON_CHUNK = 1 << 20  # characters read at a time from a .json file
JSONL_BLOCK = 1 << 22  # bytes of a .jsonl file read at a time by jsonl_blocks
SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Records = Iterator[tuple[int, Any]]


@dataclass
class Container:
    """An opened spec: its name, how messages name it, the default image root, the row count
    when known, ``records()``, which starts a fresh pass over the rows each call, and whether
    records come from Arrow (parquet, datasets), whose image bytes are left unread when not
    loading images."""

    name: str
    where: str
    root: Path | None
    total: int | None
    records: Callable[[], Records]
    arrow: bool = False
    file: Path | None = None  # the data file, for a JSON Lines container

    def estimated_total(self) -> int | None:
        """``total``, or for JSON Lines the number of lines (a cheap pass over the bytes;
        blank lines, which are skipped, count too), for progress bars."""
        if self.total is not None or self.file is None:
            return self.total
        n, last = 0, b"\n"
        with open(self.file, "rb") as f:
            while block := f.read(1 << 24):
                n += block.count(b"\n")
                last = block[-1:]
        return n + (last != b"\n")


def open_container(spec: str | os.PathLike, *, split: str | None = None,
                   load_images: bool = True) -> Container:
    """Open ``spec``; file-level problems raise :class:`PairforgeError` naming the fix."""
    where = os.fspath(spec)
    path = Path(where)
    if path.is_file():
        if split is not None:
            raise PairforgeError(f"{where}: --split applies to dataset folders and Hub ids, "
                                 f"not to a single file; drop it")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return Container(path.stem, where, path.parent, None, lambda: _jsonl(path, where),
                             file=path)
        if suffix == ".json":
            return Container(path.stem, where, path.parent, None, lambda: _json(path, where))
        if suffix == ".parquet":
            return _parquet(path, where, load_images)
        raise PairforgeError(f"{where}: unsupported file type {suffix!r}; use one of "
                             f"{', '.join(SUFFIXES)}, a dataset folder or a Hub id")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved(path, where, split, load_images)
        return _streamed(where, path.resolve().name, path, split, load_images)
    if path.suffix.lower() in SUFFIXES or not HUB_ID.match(where):
        raise PairforgeError(f"{where}: no such file or folder; check the path "
                             f"(or give a Hub dataset id as org/name)")
    return _streamed(where, where, None, split, load_images)


# ----------------------------------------------------------------------------- JSON


def open_source(path: Path, where: str, mode: str = "rb", **kw: Any):
    """``open(path)`` for reading; an OS error (permissions, a folder) is a one-line
    :class:`PairforgeError` naming the file."""
    try:
        return open(path, mode, **kw)
    except OSError as e:
        raise PairforgeError(f"{where}: cannot read this file ({e.strerror or first_line(e)}); "
                             f"check its permissions or pass another file") from None


def lone_surrogate(value: Any) -> str | None:
    """Where a decoded JSON value holds a lone surrogate code point (a ``\\ud800`` escape with no
    pair: not Unicode text, so no UTF-8 writer can store it), as ``"field 'x'"``; else None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "text"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if lone_surrogate(k) or lone_surrogate(v):
                return f"field {ascii(k)}"
    elif isinstance(value, list):
        for v in value:
            where = lone_surrogate(v)
            if where:
                return where
    return None


def _surrogate_reject(value: Any, where: str, i: int) -> BadInput | None:
    """A :class:`BadInput` for a record with a lone surrogate (see :func:`lone_surrogate`)."""
    at = lone_surrogate(value)
    if at is None:
        return None
    return BadInput(f"{at} holds a lone surrogate code point (a \\uD800-\\uDFFF escape with no "
                    f"pair), which is not valid Unicode; fix the escape or drop the record",
                    where=where, row=i)


def _jsonl(path: Path, where: str) -> Records:
    """One record per line; the row index is the 0-based line number; blank lines are skipped;
    a line with a lone surrogate escape is a :class:`BadInput`."""
    with open_source(path, where) as f:
        yield from jsonl_records(f, where)


def jsonl_blocks(path: Path, where: str, size: int | None = None) -> Iterator[tuple[int, bytes]]:
    """The file as blocks of whole lines of about ``size`` bytes (default :data:`JSONL_BLOCK`;
    a longer line makes a longer block), each with the 0-based index of its first line.
    :func:`jsonl_records` of the blocks at their indices gives the records :func:`_jsonl`
    gives."""
    size = size or JSONL_BLOCK
    with open_source(path, where) as f:
        index, rest = 0, b""
        while True:
            data = f.read(size)
            if not data:
                if rest:
                    yield index, rest
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if not cut:  # no line ends in it yet: read on
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield index, block
            index += block.count(b"\n")


def jsonl_records(lines: Iterable[bytes], where: str, start: int = 0) -> Records:
    """:func:`_jsonl`'s records of ``lines`` (bytes, each ending in a newline but maybe the
    last), the first being line ``start`` of the file."""
    for i, line in enumerate(lines, start):
        if i == 0:
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield i, BadInput(f"broken JSON line ({first_line(e)}); fix or remove the line",
                              where=where, row=i)
            continue
        # a surrogate can only come from a \\uXXXX escape: look only at lines that have one
        if b"\\u" in line and (bad := _surrogate_reject(value, where, i)) is not None:
            value = bad
        yield i, value


class _JsonScanner:
    """Decodes a JSON text value by value (``json.JSONDecoder.raw_decode`` on a rolling buffer)."""

    def __init__(self, f, where: str):
        self.f, self.where = f, where
        self.buf, self.pos, self.offset, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        if self.eof:
            return False
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos:], 0
        try:
            chunk = self.f.read(max(JSON_CHUNK, len(self.buf)))  # doubles for a large value
        except UnicodeDecodeError as e:
            raise PairforgeError(f"{self.where}: not UTF-8 text near byte {e.start} "
                                 f"({e.reason}); re-encode the file as UTF-8") from None
        self.eof = not chunk
        self.buf += chunk
        return bool(chunk)

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def take(self, expected: str, context: str) -> str:
        """Consume the next non-whitespace character, which must be one of ``expected``."""
        c = self.peek()
        if not c or c not in expected:
            self.fail(f"expected {' or '.join(repr(x) for x in expected)} {context}, "
                      f"found {c or 'the end of the file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # the value may go on in the next chunk; a real error elsewhere fails at once
                cut = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 16
                if cut and self._fill():
                    continue
                self.pos = e.pos
                self.fail(e.msg)
            if end == len(self.buf) and self._fill():  # a number may go on in the next chunk
                continue
            self.pos = end
            return value

    def fail(self, msg: str) -> None:
        raise PairforgeError(f"{self.where}: invalid JSON near character {self.offset + self.pos} "
                             f"({msg}); a .json file must hold a list of records or "
                             f'{{"data": [...]}} (use .jsonl for one record per line)')


def _json(path: Path, where: str) -> Records:
    """A top-level list of records, or an object whose ``data`` key holds that list."""
    with open_source(path, where, "r", encoding="utf-8-sig") as f:
        s = _JsonScanner(f, where)
        if s.peek() == "{":  # walk the keys up to "data", skipping other values
            s.take("{", "at the start")
            key = None
            while s.peek() == '"':
                key = s.value()
                s.take(":", f"after key {key!r}")
                if key == "data":
                    break
                s.value()
                if s.take(",}", f"after the value of {key!r}") == "}":
                    break
            if key != "data":
                s.fail("the top-level object has no 'data' list")
        s.take("[", "at the start of the list of records")
        if s.peek() == "]":
            return
        i = 0
        while True:
            value = s.value()
            yield i, _surrogate_reject(value, where, i) or value
            if s.take(",]", f"after record {i}") == "]":
                return
            i += 1


# ----------------------------------------------------------------------------- Arrow


def _parquet(path: Path, where: str, load_images: bool) -> Container:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PairforgeError(f"{where}: not a readable parquet file ({first_line(e)}); "
                             f"re-create or re-download it") from None
    columns = None if load_images else _columns_without_image_bytes(pf.schema)

    def records() -> Records:
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        yield from _rows(batches, where)

    return Container(path.stem, where, path.parent, pf.metadata.num_rows, records, arrow=True)


def _columns_without_image_bytes(schema: pq.ParquetSchema) -> list[str]:
    """Leaf column paths, less the ``bytes`` leaf of every ``{bytes, path}`` image struct."""
    paths = [schema.column(i).path for i in range(len(schema))]
    have = set(paths)
    return [p for p in paths
            if not (p.endswith(".bytes") and p[: -len("bytes")] + "path" in have)]


def _saved(path: Path, where: str, split: str | None, load_images: bool) -> Container:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure of a third-party loader is a file-level error
        raise PairforgeError(f"{where}: cannot load this save_to_disk folder "
                             f"({first_line(e)}); re-save it with Dataset.save_to_disk") from None
    if isinstance(ds, DatasetDict):
        ds = ds[choose_split(list(ds), split, where)]
    table_ds = ds.with_format("arrow")

    def records() -> Records:
        batches = table_ds.iter(batch_size=BATCH_ROWS)
        yield from _rows(batches if load_images else map(_drop_image_bytes, batches), where)

    return Container(path.resolve().name, where, path, len(ds), records, arrow=True)


def _streamed(where: str, name: str, root: Path | None, split: str | None,
              load_images: bool) -> Container:
    """A Hub-layout folder or a Hub id, through ``datasets.load_dataset(..., streaming=True)``."""
    from datasets import load_dataset

    what = "load this dataset folder" if root is not None else "load this dataset from the Hub"
    fix = ("check it holds data files (data/*.parquet, *.jsonl) or a README.md with configs"
           if root is not None else
           "check the id and your network (HF_HUB_OFFLINE), or pass a local file or folder")
    try:
        splits = load_dataset(where, streaming=True)
        ds = splits[choose_split(list(splits), split, where)]
    except PairforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a third-party loader is a file-level error
        raise PairforgeError(f"{where}: cannot {what} ({first_line(e)}); {fix}") from None
    info = ds.info.splits.get(ds.split) if ds.info and ds.info.splits and ds.split else None
    table_ds = ds.with_format("arrow")

    def records() -> Records:
        batches = table_ds.iter(batch_size=BATCH_ROWS)
        yield from _rows(batches if load_images else map(_drop_image_bytes, batches), where)

    return Container(name, where, root, info.num_examples if info else None, records,
                     arrow=True)


def choose_split(available: list[str], split: str | None, where: str) -> str:
    """``split`` if given and present; else ``train`` if present, else the only split."""
    if split is not None:
        if split in available:
            return split
        raise PairforgeError(f"{where}: no split {split!r}; pass --split, one of "
                             f"{sorted(available)}")
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise PairforgeError(f"{where}: has splits {sorted(available)} and none is 'train'; "
                         f"pass --split")


def _rows(batches: Iterator[pa.RecordBatch | pa.Table], where: str) -> Records:
    """Rows of Arrow batches as dicts, with a global row index; a read error is file-level."""
    i, batches = 0, iter(batches)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            records = batch.to_pylist()
        except Exception as e:  # noqa: BLE001 - a failure inside the reader is a file-level error
            raise PairforgeError(f"{where}: cannot read past row {i} ({first_line(e)}); the data "
                                 f"may be truncated or corrupt, re-create or re-download it"
                                 ) from None
        for rec in records:
            yield i, rec
            i += 1


def _drop_image_bytes(table: pa.Table) -> pa.Table:
    """The table with each ``{bytes, path}`` struct (also inside lists) cut to ``{path}``."""
    schema = pa.schema([f.with_type(_without_bytes(f.type)) for f in table.schema])
    return table if schema.equals(table.schema) else table.cast(schema)


def _without_bytes(t: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        if sorted(names) == ["bytes", "path"]:
            return pa.struct([t.field("path")])
        return pa.struct([f.with_type(_without_bytes(f.type)) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_field.with_type(_without_bytes(t.value_type))
        return pa.list_(inner) if pa.types.is_list(t) else pa.large_list(inner)
    return t
