"""Errors a user can cause, each rendered as one line naming the input and the fix."""

from __future__ import annotations

import re


class PairforgeError(Exception):
    """Base class: an error whose message is meant for the user, printed without a traceback."""


class BadInput(PairforgeError):
    """A record that cannot become a canonical pair.

    ``where`` names the file (or set), ``row`` the 0-based row index, ``field`` the offending
    field; ``reason`` says what is wrong and, where there is one, the fix.
    """

    def __init__(self, reason: str, *, where: str | None = None, row: int | str | None = None,
                 field: str | None = None):
        self.reason = reason
        self.where = where
        self.row = row
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        loc = []
        if self.where is not None:
            loc.append(str(self.where))
        if self.row is not None:
            loc.append(f"row {self.row}")
        if self.field is not None:
            loc.append(f"field '{self.field}'")
        prefix = ", ".join(loc)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def to_record(self) -> dict:
        """The JSON-able record written to ``skipped.jsonl`` / ``rejects.jsonl``."""
        return {"where": self.where, "row": self.row, "field": self.field, "reason": self.reason}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 200
    characters, with object addresses (``<_io.BytesIO object at 0x7f…>``) cut to
    ``<_io.BytesIO object>``: what a one-line error or a reject reason quotes from a library's
    exception, the same in every run."""
    text = _ADDRESS.sub("", str(e)).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def check_out_path(folder, option: str = "--out") -> None:
    """A one-line :class:`PairforgeError` when ``folder`` cannot be an output folder because
    it is a file or lies under one; nothing is created."""
    from pathlib import Path

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PairforgeError(f"{option} {folder}: is a file, not a folder; pass a folder")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PairforgeError(f"{option} {folder}: {parent} is a file, not a folder; "
                                     f"pass a folder path")
            return
