"""``read_pairs``: any supported preference set → a lazy stream of canonical rows.

Flow per record: container (``containers``) → format converter (``formats``) → image
resolution (``images``) → ``make_pair`` → ``validate_row``. A bad record becomes a
:class:`BadInput` naming file, 0-based row and field; it is recorded in ``stream.skipped``
(``on_error="skip"``) or raised (``on_error="fail"``). Every record read is either yielded
or skipped: ``n_read == kept + len(skipped)``.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.schema import image_part, make_pair, stable_id, validate_row
from pairforge.sources.containers import Container, Records, open_container
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
