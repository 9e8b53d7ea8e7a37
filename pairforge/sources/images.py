"""Image values of a record → ``datasets``-encodable ``{"bytes", "path"}`` dicts.

A record may give an image as a path string, raw bytes, an HF Image struct
(``{"bytes", "path"}``; ms-swift's ``{"path"}``) or a PIL image. Paths are resolved against
the image root and must stay inside it (``..``, absolute paths elsewhere and symlinks that
point outside are refused). With ``load=True`` files are read (not decoded: pixels are the
build engine's business) and empty ones refused; with ``load=False`` the result is a
placeholder ``{"bytes": None, "path": name}`` and no image file is opened; an image struct
read from parquet or a dataset is then counted as is (its bytes were never read, and its path
may be the original file name rather than a file under the root).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from pairforge.errors import BadInput

FIX_ROOT = "pass --image-root with the folder the image paths are relative to"


class ImageResolver:
    """Turns a record's raw image values into encodable dicts; raises ``BadInput`` (field
    ``images``) for a missing, empty, unreadable or escaping image."""

    def __init__(self, root: Path | None, *, load: bool, structs_unread: bool = False):
        self.root = None if root is None else Path(root).resolve()
        self.load = load
        # paths repeat across pairs (several pairs per image): resolve each once
        self._realpath = functools.lru_cache(maxsize=1 << 16)(os.path.realpath)
        # Arrow containers do not read image bytes when not loading, so a struct's path may
        # be a mere name (HF Image structs keep the original file name next to the bytes)
        self.structs_unread = structs_unread and not load

    def __call__(self, values: Sequence[Any]) -> list[dict]:
        return [self.one(v, i) for i, v in enumerate(values)]

    def one(self, value: Any, i: int) -> dict:
        if value is None:
            raise _bad(f"image {i} is None")
        if isinstance(value, str):
            return self._path(value, i)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._bytes(bytes(value), None, i)
        if isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
            if self.structs_unread:
                return {"bytes": None, "path": f"<image {i}>" if path is None else str(path)}
            if data is not None:
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise _bad(f"image {i}: 'bytes' is a {type(data).__name__}, expected raw "
                               f"bytes (JSON cannot hold them); give the file in 'path' instead")
                return self._bytes(bytes(data), path, i)
            if path is not None:
                return self._path(str(path), i)
            raise _bad(f"image {i} has neither bytes nor a path")
        if isinstance(value, PILImage.Image):
            return self._pil(value, i)
        raise _bad(f"image {i} is {type(value).__name__}; expected a path, bytes, "
                   f"a {{'bytes', 'path'}} dict or a PIL image")

    def unresolved(self, placeholder: Mapping) -> bool:
        """For a placeholder made without loading (``{"bytes": None, "path": name}``): True
        when its file is missing or empty under the root. False when it cannot tell (bytes
        given, a struct left unread, no root): only a read would show."""
        path = placeholder.get("path")
        if self.load or self.structs_unread or self.root is None or placeholder.get("bytes") \
                or not path or path.startswith("<"):
            return False
        return not self._nonempty(os.path.join(str(self.root), path))

    @functools.cached_property
    def _nonempty(self):
        def nonempty(path: str) -> bool:
            try:
                return os.stat(path).st_size > 0 and os.path.isfile(path)
            except (OSError, ValueError):
                return False

        return functools.lru_cache(maxsize=1 << 16)(nonempty)

    def _bytes(self, data: bytes, path: Any, i: int) -> dict:
        if not data:
            raise _bad(f"image {i} has 0 bytes")
        name = None if path is None else str(path)
        if not self.load:
            return {"bytes": None, "path": name or f"<bytes {i}>"}
        return {"bytes": data, "path": name}

    def _pil(self, img: Any, i: int) -> dict:
        if not self.load:
            return {"bytes": None, "path": getattr(img, "filename", "") or f"<PIL image {i}>"}
        buf = io.BytesIO()
        img.save(buf, format=img.format or "PNG")
        return {"bytes": buf.getvalue(), "path": getattr(img, "filename", "") or None}

    def _path(self, text: str, i: int) -> dict:
        """Resolve a path inside the root; read it when loading."""
        if not text.strip():
            raise _bad(f"image {i} has an empty path")
        if "\0" in text:
            raise _bad(f"image path {text!r} contains a NUL byte; fix the path")
        if self.root is None:
            if not self.load:
                return {"bytes": None, "path": text}
            raise _bad(f"image path {text!r} has no folder to be resolved against; {FIX_ROOT}")
        # Path.resolve + is_relative_to, on strings (4x faster); an absolute `text` replaces
        # the root, symlinks are followed
        root = str(self.root)
        resolved = self._realpath(os.path.join(root, text))
        inside = root.rstrip(os.sep) + os.sep
        if not resolved.startswith(inside):
            raise _bad(f"image path {text!r} escapes the image root {root!r} "
                       f"(resolves to {resolved!r}); {FIX_ROOT}")
        name = resolved[len(inside):].replace(os.sep, "/")
        if not self.load:
            return {"bytes": None, "path": name}
        try:
            data = Path(resolved).read_bytes()
        except FileNotFoundError:
            raise _bad(f"image file {text!r} not found under {str(self.root)!r}; check the path "
                       f"or {FIX_ROOT}") from None
        except OSError as e:
            raise _bad(f"cannot read image file {text!r}: {e.strerror or e}") from None
        if not data:
            raise _bad(f"image file {text!r} is empty (0 bytes)")
        return {"bytes": data, "path": name}


def _bad(reason: str) -> BadInput:
    return BadInput(reason, field="images")
