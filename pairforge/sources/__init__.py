"""Loaders for existing preference sets: any supported layout → canonical pair rows.

    from pairforge.sources import read_pairs
    stream = read_pairs("RLAIF-V.parquet", load_images=False)
    for row in stream: ...
    print(stream.summary())

Modules, in the order a record flows through them: ``containers`` (files, folders, Hub ids
→ records), ``formats`` (format detection; record → messages, pure), ``images`` (image
values → ``{"bytes", "path"}``), ``reader`` (the stream that ties them together).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pairforge.sources.formats import FORMATS
from pairforge.sources.formats import detect_format as _detect_keys
from pairforge.sources.reader import PairStream, read_pairs


def detect_format(source: Mapping | str | os.PathLike) -> str:
    """The format of a record (by its keys), or of a set given as a spec (by its first record).

    Raises :class:`~pairforge.errors.PairforgeError` naming the keys when no format matches."""
    if isinstance(source, Mapping):
        return _detect_keys(source)
    return read_pairs(source, load_images=False).format


__all__ = ["FORMATS", "PairStream", "detect_format", "read_pairs"]
