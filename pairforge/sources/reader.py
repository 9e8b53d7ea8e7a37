"""``read_pairs``: any supported preference set → a lazy stream of canonical rows.

Flow per record: container (``containers``) → format converter (``formats``) → image
resolution (``images``) → ``make_pair`` → ``validate_row``. A bad record becomes a
:class:`BadInput` naming file, 0-based row and field; it is recorded in ``stream.skipped``
(``on_error="skip"``) or raised (``on_error="fail"``). Every record read is either yielded
or skipped: ``n_read == kept + len(skipped)``.
"""

from __future__ import annotations

import codecs
import io
import itertools
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pairforge.errors import BadInput, PairforgeError
from pairforge.schema import (
    image_part,
    make_pair,
    prompt_text,
    response_text,
    stable_id,
    stable_ids,
    validate_row,
)
from pairforge.sources.containers import (
    Container,
    Records,
    jsonl_blocks,
    jsonl_records,
    open_container,
)
from pairforge.sources.formats import (
    CONVERTERS,
    IMAGE_TAG,
    check_format,
    detect_format,
    tagged_parts,
)
from pairforge.sources.images import ImageResolver

ON_ERROR = ("skip", "fail")
PEEK_LIMIT = 1000  # records looked at to find one to detect the format from
TEXT_BATCH = 4096  # pairs per TextBatch (PairStream.text_batches)


class PairStream:
    """Canonical rows of one preference set, read lazily (see :func:`read_pairs`).

    ``name``, ``format`` and ``total`` (row count when the container knows it, else
    ``None``) are set on construction; ``skipped`` and ``n_read`` grow while iterating.
    Iterating again starts a fresh pass and resets both."""

    def __init__(self, spec: str | os.PathLike, *, format: str | None = None,
                 image_root: str | os.PathLike | None = None, on_error: str = "skip",
                 split: str | None = None, load_images: bool = True):
        check_format(format)
        if on_error not in ON_ERROR:
            raise PairforgeError(f"on_error={on_error!r}; use one of {ON_ERROR}")
        self._container: Container = open_container(spec, split=split, load_images=load_images)
        self.name: str = self._container.name
        self.where: str = self._container.where
        self.total: int | None = self._container.total
        self.on_error = on_error
        self.load_images = load_images
        self.skipped: list[BadInput] = []
        self.skipped_at: list[int] = []  # the record index of each skipped row
        self.n_read = 0
        self._images = ImageResolver(_image_root(image_root, self._container), load=load_images,
                                     structs_unread=self._container.arrow)
        self._first_pass: Records | None = self._peek()
        #: The constant columns of a row read from this set (make_pair's own defaults).
        self._template = make_pair(prompt="-", chosen="-", rejected="-", source_dataset=self.name)
        if format is None:
            format = self._detect()
        self.format: str = format

    # -- construction helpers

    def _peek(self) -> Records:
        """Start the first pass, buffering records up to the first readable one."""
        records = self._container.records()
        self._head = list(itertools.islice(_until_mapping(records), PEEK_LIMIT))
        if not self._head:
            raise PairforgeError(f"{self.where}: the set is empty (no rows); check the file "
                                 f"(or pick another --split)")
        return itertools.chain(self._head, records)

    def _detect(self) -> str:
        first = self._head[-1][1]
        if not isinstance(first, Mapping):
            raise PairforgeError(f"{self.where}: none of the first {len(self._head)} records "
                                 f"can be read, so the format cannot be detected; fix the file "
                                 f"or pass --format")
        return detect_format(first, where=self.where)

    # -- iteration

    def __iter__(self) -> Iterator[dict]:
        if self._first_pass is not None:
            records, self._first_pass = self._first_pass, None
        else:
            records = self._container.records()
            self.skipped, self.skipped_at, self.n_read = [], [], 0
        return self._rows(records)

    def _rows(self, records: Records) -> Iterator[dict]:
        """The rows of ``records``; counts them into ``n_read`` and bad ones into ``skipped``."""
        for index, record in records:
            self.n_read += 1
            try:
                row = self._row(index, record)
            except BadInput as e:
                bad = e if e.where is not None else BadInput(e.reason, where=self.where,
                                                             row=index, field=e.field)
                if self.on_error == "fail":
                    raise bad from None
                self.skipped.append(bad)
                self.skipped_at.append(index)
                continue
            yield row

    def _row(self, index: int, record: Any) -> dict:
        if isinstance(record, BadInput):
            raise record
        if not isinstance(record, Mapping):
            raise BadInput(f"record is {type(record).__name__}, expected an object with the "
                           f"{self.format} fields")
        if self.format == "trl":
            row = self._plain_trl_row(index, record)
            if row is not None:
                return row
        return self._general_row(index, record)

    def _plain_trl_row(self, index: int, rec: Mapping) -> dict | None:
        """The row of a plain TRL-standard record (``prompt``, ``chosen``, ``rejected``
        strings, answers not blank, ``images`` / ``image`` paths matching the ``<image>``
        tags), built directly: the row :meth:`_general_row` makes of it (same dict, tested),
        at a fraction of the cost, which is most of the read time of large TRL JSONL files.
        Anything else, bad rows included, returns ``None`` for the general path."""
        prompt, chosen, rejected = rec.get("prompt"), rec.get("chosen"), rec.get("rejected")
        if not (type(prompt) is str and type(chosen) is str and type(rejected) is str
                and chosen.strip() and rejected.strip()):
            return None
        images, image = rec.get("images"), rec.get("image")
        if image is not None:
            if images is not None:
                return None
            images = image if isinstance(image, list) else [image]
        elif images is None:
            images = []
        elif not isinstance(images, list):
            return None
        parts = tagged_parts(prompt)
        n_tags = prompt.count(IMAGE_TAG)
        if n_tags != len(images):
            if n_tags:
                return None
            parts = [image_part() for _ in images] + parts
        text = "\n".join(p["text"] for p in parts if p["text"])  # prompt_text of the row
        if not images and not text.strip():
            return None
        rid, idx = rec.get("id"), rec.get("idx")
        source_id = str(rid) if rid is not None else (str(idx) if idx is not None else index)
        row = dict(self._template)
        row.update(
            id=(stable_id(self.name, str(rid)) if rid is not None else
                stable_id(self.name, source_id, text, chosen, rejected)),
            prompt=[{"role": "user", "content": parts}],
            chosen=[{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            rejected=[{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            images=self._images(images), source_id=str(source_id), source_meta=[], models=[],
            prompt_templates=[])
        return row

    def _general_row(self, index: int, record: Mapping) -> dict:
        if self.format == "canonical":
            row = dict(record)
            if isinstance(row.get("images"), list):
                row["images"] = self._images(row["images"])
        else:
            d = CONVERTERS[self.format](record)
            row = make_pair(
                prompt=d.prompt, chosen=d.chosen, rejected=d.rejected,
                images=self._images(d.images),
                id=None if d.record_id is None else stable_id(self.name, d.record_id),
                source_dataset=self.name,
                source_id=index if d.source_id is None else d.source_id,
                source_meta=d.source_meta,
            )
        validate_row(row, where=self.where, row_index=index)
        return row

    def n_unresolved(self, images: list[dict] | None) -> int:
        """How many of a row's image placeholders (``load_images=False``) name no readable,
        non-empty file under the image root (:meth:`ImageResolver.unresolved`)."""
        return sum(self._images.unresolved(im) for im in images or ())

    # -- texts in batches (what the audit reads)

    def text_batches(self, size: int = TEXT_BATCH) -> Iterator[TextBatch]:
        """A fresh pass over the set as :class:`TextBatch` es of up to ``size`` consecutive
        pairs: the same pairs, ids, texts and skipped rows as iterating the rows. Plain TRL
        JSON Lines (:meth:`_plain_trl_row` without images or ids) are parsed block by block by
        pyarrow, with no Python object per row but the id; a block with anything else (or one
        pyarrow rejects) goes through the rows."""
        if self._first_pass is not None:
            self._first_pass = None
        self.skipped, self.skipped_at, self.n_read = [], [], 0
        if self.format != "trl" or self._container.file is None:
            yield from _batches(self._rows(self._container.records()), self, size)
            return
        for start, block in jsonl_blocks(self._container.file, self.where):
            batch = plain_trl_block(block, start, self.name)
            if batch is None:
                records = jsonl_records(io.BytesIO(block), self.where, start)
                yield from _batches(self._rows(records), self, size)
                continue
            self.n_read += len(batch)
            for i in range(0, len(batch), size):
                yield batch.slice(i, i + size)

    # -- reporting

    def estimated_total(self) -> int | None:
        """Rows in the set when the container knows or can cheaply count them (JSON Lines:
        its lines), for progress bars; ``None`` otherwise."""
        return self._container.estimated_total()

    @property
    def n_kept(self) -> int:
        return self.n_read - len(self.skipped)

    def summary(self) -> str:
        """One line: rows read, kept and skipped (by field)."""
        line = (f"{self.name} ({self.format}): read {self.n_read} rows, kept {self.n_kept}, "
                f"skipped {len(self.skipped)}")
        if self.skipped:
            by_field = Counter(b.field or "record" for b in self.skipped)
            line += " (" + ", ".join(f"{f}: {n}" for f, n in by_field.most_common()) + ")"
        return line


def read_pairs(spec: str | os.PathLike, *, format: str | None = None,
               image_root: str | os.PathLike | None = None, on_error: str = "skip",
               split: str | None = None, load_images: bool = True) -> PairStream:
    """Read a preference set into canonical rows, lazily.

    ``spec``: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a ``save_to_disk`` folder, a
    folder laid out like a Hub dataset repo, or a Hub id ``org/name``. ``format``: one of
    :data:`FORMATS`, detected from the first record when ``None``. ``image_root``: the folder
    image paths are resolved against (default: the data file's folder). ``on_error``:
    ``"skip"`` records bad rows in ``stream.skipped``, ``"fail"`` raises the first.
    ``split``: for dataset folders and Hub ids (default ``train``, else the only split).
    ``load_images=False``: images become ``{"bytes": None, "path": name}`` placeholders and no
    image file is opened. File-level problems raise :class:`PairforgeError`."""
    return PairStream(spec, format=format, image_root=image_root, on_error=on_error,
                      split=split, load_images=load_images)


@dataclass
class TextBatch:
    """Consecutive pairs of a set as the audit measures them: ids, the prompt text (the last
    user turn), the chosen and rejected texts (Arrow string arrays), the number of images of
    each prompt and how many of them name no readable file."""

    ids: list[str]
    prompts: pa.Array
    chosen: pa.Array
    rejected: pa.Array
    n_images: np.ndarray  # int32
    unresolved: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int) -> TextBatch:
        n = min(stop, len(self)) - start
        return TextBatch(self.ids[start:stop], self.prompts.slice(start, n),
                         self.chosen.slice(start, n), self.rejected.slice(start, n),
                         self.n_images[start:stop], self.unresolved[start:stop])

    @classmethod
    def concat(cls, batches: Sequence[TextBatch]) -> TextBatch:
        if len(batches) == 1:
            return batches[0]
        return cls([i for b in batches for i in b.ids],
                   *(pa.concat_arrays([getattr(b, k) for b in batches])
                     for k in ("prompts", "chosen", "rejected")),
                   *(np.concatenate([getattr(b, k) for b in batches])
                     for k in ("n_images", "unresolved")))


def _batches(rows: Iterable[dict], stream: PairStream, size: int) -> Iterator[TextBatch]:
    """Rows → :class:`TextBatch` es of up to ``size``."""
    def batch(chunk: list[tuple]) -> TextBatch:
        ids, prompts, chosen, rejected, n_images, unresolved = zip(*chunk)
        return TextBatch(list(ids), *(pa.array(t, type=pa.string())
                                      for t in (prompts, chosen, rejected)),
                         np.array(n_images, dtype=np.int32), np.array(unresolved, dtype=np.int32))

    chunk: list[tuple] = []
    for row in rows:
        images = row["images"] or ()
        chunk.append((row["id"], prompt_text(row["prompt"]), response_text(row["chosen"]),
                      response_text(row["rejected"]), len(images), stream.n_unresolved(images)))
        if len(chunk) == size:
            yield batch(chunk)
            chunk = []
    if chunk:
        yield batch(chunk)


#: The fields of a plain TRL record (:meth:`PairStream._plain_trl_row`).
_TRL_TEXTS = pa.schema([pa.field(k, pa.string()) for k in ("prompt", "chosen", "rejected")])
#: Fields of a TRL record beyond the texts that :meth:`PairStream._plain_trl_row` reads.
_TRL_OTHER = ("id", "idx", "images", "image")
#: A character ``str.strip`` keeps (RE2): anything but Python's whitespace (``str.isspace``).
NOT_PY_SPACE = (r"[^\t\n\x{0b}\x{0c}\r\x{1c}-\x{1f} \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}"
                r"\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]")
#: A blank line (``bytes.strip`` leaves nothing), which the row path skips.
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def plain_trl_block(block: bytes, start: int, name: str) -> TextBatch | None:
    """The :class:`TextBatch` of a block of JSON Lines (``start``: the index of its first line)
    when every line is a plain TRL record, one per line, with no images (and an ``id`` or
    ``idx`` of strings or integers in every row or in none): the texts stay in Arrow, ids are
    :func:`~pairforge.schema.stable_id` of the same parts :meth:`PairStream._plain_trl_row`
    hashes. ``None`` for anything else (a blank, broken or not plain line, a line with two
    records, text that is not UTF-8, a lone surrogate): then the rows decide, exactly as
    before."""
    from pyarrow import json as pa_json

    if start == 0:
        block = block.removeprefix(codecs.BOM_UTF8)
    if not block.isascii():
        try:
            block.decode("utf-8")  # pyarrow does not check; the row path rejects such lines
        except UnicodeDecodeError:
            return None
    closed = block if block.endswith(b"\n") else block + b"\n"
    if _BLANK_LINE.search(b"\n" + closed):
        return None
    try:
        table = pa_json.read_json(io.BytesIO(block), read_options=pa_json.ReadOptions(
            block_size=max(len(block), 1 << 20)), parse_options=pa_json.ParseOptions(
            explicit_schema=_TRL_TEXTS, unexpected_field_behavior="infer"))
    except (pa.ArrowException, ValueError):
        return None
    n = table.num_rows
    if n != closed.count(b"\n"):
        return None
    given = {k: table[k].combine_chunks() for k in _TRL_OTHER
             if k in table.column_names and table[k].null_count < n}
    if "images" in given or "image" in given:
        return None
    key = "id" if "id" in given else "idx" if "idx" in given else None
    if key is not None:  # str(id) / str(idx): an id of strings or integers in every row
        column = given[key]
        if column.null_count or not (pa.types.is_string(column.type)
                                     or pa.types.is_int64(column.type)):
            return None
        given[key] = pc.cast(column, pa.string())
    prompt, chosen, rejected = (table[k].combine_chunks() for k in ("prompt", "chosen", "rejected"))
    if any(a.null_count for a in (prompt, chosen, rejected)):
        return None
    if not all(pc.all(pc.match_substring_regex(a, NOT_PY_SPACE)).as_py()
               for a in (prompt, chosen, rejected)):
        return None  # a blank answer or prompt: the row path says why
    if pc.any(pc.match_substring(prompt, IMAGE_TAG)).as_py():
        return None
    # the parts stable_id hashes, each followed by \x1f: (name, id), or (name, idx or the
    # line index, prompt, chosen, rejected)
    if key == "id":
        parts = [given["id"]]
    else:
        source = given["idx"] if key == "idx" else pc.cast(pa.array(np.arange(start, start + n)),
                                                            pa.string())
        parts = [source, prompt, chosen, rejected]
    joined = pc.binary_join_element_wise(
        pa.scalar(name.encode("utf-8", "surrogatepass"), pa.binary()),
        *(pc.cast(a, pa.binary()) for a in parts),
        pa.scalar(b"", pa.binary()), pa.scalar(b"\x1f", pa.binary()))
    return TextBatch(stable_ids(joined), prompt, chosen, rejected,
                     np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32))


def _until_mapping(records: Records) -> Records:
    """Records up to and including the first that is a dict."""
    for item in records:
        yield item
        if isinstance(item[1], Mapping):
            return


def _image_root(image_root: str | os.PathLike | None, container: Container) -> Path | None:
    if image_root is None:
        return container.root
    root = Path(image_root)
    if not root.is_dir():
        raise PairforgeError(f"--image-root {os.fspath(image_root)}: not a folder; pass the "
                             f"folder the image paths are relative to")
    return root
