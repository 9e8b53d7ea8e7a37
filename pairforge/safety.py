"""What may be read from this machine and what may leave it.

- **Images of a pair set** (``publish``, ``export``, ``train``): every image value is either
  embedded bytes or a path; a path is resolved inside one allowed root (the build folder, the
  dataset's folder, or a folder the user passes with ``--image-root``) by the sources' own
  :class:`~pairforge.sources.images.ImageResolver` (``..``, absolute paths elsewhere and
  symlinks that leave the root are refused), its size is bounded by :data:`MAX_IMAGE_BYTES`
  before it is read, and it must decode as an image within the build's pixel limit
  (:func:`~pairforge.sources.sft.decode_image`). Embedded bytes are bounded the same way and
  must open as an image whose header size is within the limit. A row that fails is refused
  with its reason: nothing outside the root is ever read, let alone published.
- **Local paths** in text that is recorded or published (the build command, the source spec,
  model names): :func:`redact_local_paths` keeps the last path component only, as
  ``<local>/name``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.schema import image_columns

#: Anything shaped like a Hugging Face token or an API key (cut from recorded commands, cards
#: and error messages).
SECRET = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")


def redact_secrets(text: str, replacement: str = "[redacted]") -> str:
    """``text`` with every token- or key-shaped string replaced."""
    return SECRET.sub(replacement, text)


#: Largest image file (or embedded image) read from a pair set, in bytes.
MAX_IMAGE_BYTES = 64 * 2**20

#: An absolute POSIX path: the slash starts the text or follows a space, a quote, ``=``, a
#: bracket, a scheme or prefix such as ``hf:`` (but not ``https://``, the ``//`` of a URL),
#: or ``file://``; a URL's own path (after its host) and relative paths are not matched.
_ABS_PATH = re.compile(r"(?:(?<=file://)|(?<![\w.:/~\-%>])|(?<=[A-Za-z]:)(?!//))"
                       r"/(?:[^\s/'\"`|<>()\[\]{},;=]+/)*([^\s/'\"`|<>()\[\]{},;=]+)/?")
#: A single-quoted absolute path (``shlex.join`` quotes paths with spaces).
_QUOTED_PATH = re.compile(r"'((?:file://)?/[^']*)'")
_WIN_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s\\'\"`|<>]+\\)*([^\s\\'\"`|<>]+)\\?")


def redact_local_paths(text: str) -> str:
    """``text`` with every absolute local path cut to ``<local>/<last component>``
    (``--source /home/me/data/train.json`` → ``--source <local>/train.json``,
    ``hf:/models/llava`` → ``hf:<local>/llava``); URLs and relative paths are kept."""
    text = _QUOTED_PATH.sub(lambda m: f"'<local>/{os.path.basename(m.group(1).rstrip('/'))}'",
                            text)
    text = _ABS_PATH.sub(lambda m: f"<local>/{m.group(1)}", text)
    return _WIN_PATH.sub(lambda m: f"<local>/{m.group(1)}", text)


# ----------------------------------------------------------------------------- images


class ImageGuard:
    """Checks one image value of a pair set: returns ``{"bytes", "path"}`` with the bytes read
    (path cut to the file name), or raises :class:`BadInput` (field ``images``) saying why."""

    def __init__(self, root: str | os.PathLike, *, max_pixels: int | None = None,
                 max_bytes: int | None = None):
        from pairforge.sources.images import ImageResolver
        from pairforge.sources.sft import DEFAULT_MAX_PIXELS

        self.root = Path(root).resolve()
        self.resolver = ImageResolver(self.root, load=False)
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.max_bytes = max_bytes or MAX_IMAGE_BYTES

    def __call__(self, value: Any, i: int = 0) -> dict:
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = {"bytes": bytes(value), "path": None}
        if not isinstance(value, Mapping):
            if isinstance(value, str):
                value = {"bytes": None, "path": value}
            else:
                raise BadInput(f"image {i} is {type(value).__name__}; expected an image struct "
                               f"{{'bytes', 'path'}}", field="images")
        data, path = value.get("bytes"), value.get("path")
        name = os.path.basename(str(path)) if path else None
        if data is not None:
            data = bytes(data)
            self._size(len(data), f"image {i}")
            self._header(data, f"image {i}" + (f" ({name!r})" if name else ""))
            return {"bytes": data, "path": name}
        if not path:
            raise BadInput(f"image {i} has neither bytes nor a path", field="images")
        if "\x00" in str(path):
            raise BadInput(f"image {i}: the path contains a NUL byte", field="images")
        rel = self.resolver.one(str(path), i)["path"]  # BadInput when it escapes the root
        data = self._read(self.root / rel, str(path), i)
        from pairforge.sources.sft import decode_image

        try:
            decode_image({"bytes": data, "path": str(path)}, i, self.max_pixels).close()
        except BadInput as e:  # a stable reason: no object address from Pillow
            raise BadInput(e.reason, field="images") from None
        return {"bytes": data, "path": os.path.basename(rel)}

    def _size(self, n: int, what: str) -> None:
        if n > self.max_bytes:
            raise BadInput(f"{what} has {n:,} bytes, above the limit of {self.max_bytes:,} for "
                           f"one image; shrink it or drop the row", field="images")
        if n == 0:
            raise BadInput(f"{what} is empty (0 bytes)", field="images")

    def _read(self, file: Path, text: str, i: int) -> bytes:
        """The bytes of a regular file of at most ``max_bytes`` (a folder, FIFO or device is
        refused without reading it; the size is checked before reading)."""
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) |
                         getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise BadInput(f"image file {text!r} not found under the image root; restore it "
                           f"or pass --image-root with its folder", field="images") from None
        except OSError as e:
            raise BadInput(f"cannot read image file {text!r}: {e.strerror or e}",
                           field="images") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BadInput(f"image {i} path {text!r} is not a regular file (a folder, pipe or "
                           f"device)", field="images")
        with os.fdopen(fd, "rb") as f:
            self._size(st.st_size, f"image file {text!r}")
            try:
                data = f.read(self.max_bytes + 1)
            except OSError as e:
                raise BadInput(f"cannot read image file {text!r}: {e.strerror or e}",
                               field="images") from None
        self._size(len(data), f"image file {text!r}")
        return data

    def _header(self, data: bytes, what: str) -> None:
        """``data`` opens as an image whose header size is within the pixel limit (the pixels
        are not decoded: embedded bytes were checked when they were embedded)."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for non-images
            from pairforge.errors import first_line

            why = first_line(e)  # object addresses already masked
            raise BadInput(f"{what} is not a readable image ({why})", field="images") from None
        if w * h > self.max_pixels:
            raise BadInput(f"{what} is {w}x{h} = {w * h:,} pixels, above the limit of "
                           f"{self.max_pixels:,} (decompression bomb guard); drop the row",
                           field="images")


def checked_images(ds, root: str | os.PathLike, where: str, *, on_bad: str = "fail",
                   max_pixels: int | None = None, batch_size: int = 256,
                   progress: Callable[[int], None] | None = None):
    """``ds`` with every image checked by :class:`ImageGuard` under ``root`` and embedded.

    ``on_bad="fail"``: a :class:`PairforgeError` naming the first bad row, its reason and how
    many rows are bad; nothing is returned. ``on_bad="skip"``: those rows are dropped and
    returned as ``(row index, id, BadInput)`` records. Returns ``(dataset, skipped)``. The
    dataset is rewritten (in memory) only when some image was a path, so a set whose images
    are all embedded is returned as it is."""
    cols = image_columns(ds.features)
    if not cols or not len(ds):
        return ds, []
    guard = ImageGuard(root, max_pixels=max_pixels)

    def check(v: Any, is_list: bool) -> Any:
        if v is None:
            return None
        return [guard(x, k) for k, x in enumerate(v)] if is_list else guard(v, 0)

    def unembedded(v: Any, is_list: bool) -> bool:
        items = (v or []) if is_list else [v]
        return any(not isinstance(x, Mapping) or x.get("bytes") is None
                   for x in items if x is not None)

    bad: list[tuple[int, Any, BadInput]] = []
    rewrite = False
    has_id = "id" in ds.column_names
    view = ds.select_columns(list(cols) + (["id"] if has_id else [])).with_format("arrow")
    row = 0
    for batch in view.iter(batch_size=batch_size):
        values = {c: batch.column(c).to_pylist() for c in cols}
        ids = batch.column("id").to_pylist() if has_id else [None] * batch.num_rows
        for j in range(batch.num_rows):
            for c, is_list in cols.items():
                try:
                    check(values[c][j], is_list)
                except BadInput as e:
                    bad.append((row + j, ids[j], BadInput(e.reason, where=where, row=row + j,
                                                          field=c)))
                    break
                rewrite = rewrite or unembedded(values[c][j], is_list)
        row += batch.num_rows
        if progress:
            progress(batch.num_rows)
    if bad and on_bad == "fail":
        raise PairforgeError(f"{bad[0][2].one_line()}; {len(bad):,} row(s) have such images, "
                             f"so nothing was written: fix or drop them, or pass --image-root "
                             f"with the folder the image paths are relative to")
    keep = ds
    if bad:
        dropped = {b[0] for b in bad}
        keep = ds.select([i for i in range(len(ds)) if i not in dropped], keep_in_memory=True)
    if rewrite:
        keep = _embedded(keep, cols, check, where, batch_size)
    return keep, bad


def _embedded(ds, cols: Mapping[str, bool], check: Callable, where: str, batch_size: int):
    """``ds`` (in memory) with each image column replaced by its checked, embedded values.
    The files are checked again as they are read: what is embedded is what was checked."""
    from datasets import Dataset

    data = {}
    for c, is_list in cols.items():
        vals = []
        for batch in ds.select_columns([c]).with_format("arrow").iter(batch_size=batch_size):
            for v in batch.column(c).to_pylist():
                try:
                    vals.append(check(v, is_list))
                except BadInput as e:  # the file changed since the first pass
                    raise PairforgeError(BadInput(e.reason, where=where, row=len(vals),
                                                  field=c).one_line()) from None
        data[c] = vals
    others = [n for n in ds.column_names if n not in cols]
    if others:
        table = ds.select_columns(others).with_format("arrow")[:]
        data.update({n: table.column(n).to_pylist() for n in others})
    return Dataset.from_dict({n: data[n] for n in ds.column_names}, features=ds.features)


def redacted_model_names(ds):
    """``ds`` with local paths in its ``models[].name`` values cut by
    :func:`redact_local_paths` (``hf:/home/me/llava`` → ``hf:<local>/llava``); the same
    dataset when no name holds one."""
    if "models" not in ds.column_names or not len(ds):
        return ds
    names = {r.get("name") or "" for ms in ds.with_format("arrow")["models"].to_pylist()
             for r in ms or ()}
    if all(redact_local_paths(n) == n for n in names):
        return ds

    def redact(models: list) -> dict:
        return {"models": [[{**r, "name": redact_local_paths(r.get("name") or "")}
                            for r in ms or ()] for ms in models]}

    return ds.map(redact, batched=True, input_columns="models", keep_in_memory=True,
                  features=ds.features)
