"""``pairforge export``: canonical pair rows → LLaMA-Factory or ms-swift training files.

::

    OUT/
      NAME.jsonl           one pair per line
      dataset_info.json    LLaMA-Factory only: the NAME entry (merged into an existing file)
      images/<sha256[:16]>.<ext>   every distinct image once, named by a hash of its bytes
      NAME.skipped.jsonl   rows the format cannot hold, with the reason (only when there are)

LLaMA-Factory, ranking ShareGPT: ``conversations`` (``from``/``value`` turns, the system turn
first when there is one), ``chosen`` / ``rejected`` (one ``gpt`` turn each), ``images``.
ms-swift: ``messages`` (role/content, the chosen answer last), ``rejected_response``,
``images``. Both carry ``id``. In prompt texts every image part becomes an ``<image>`` tag in
place, with nothing added around it, so tags and images match one to one and a prompt read
from one of these formats is written back exactly. Image paths: for LLaMA-Factory relative
to ``OUT`` (it resolves them against its ``dataset_dir``, which is ``OUT``); for ms-swift
absolute by default, so the file works from any working directory (ms-swift resolves a
relative path against its working directory, or against ``ROOT_IMAGE_DIR`` when that is set:
with ``--relative``, run it with ``ROOT_IMAGE_DIR=OUT``). Image bytes are written as they
are: pixels and file format stay those of the original.

The row converters (:func:`llamafactory_record`, :func:`swift_record`) are pure; a row a
format cannot hold (a literal ``<image>`` in a text, turns that do not alternate) raises
:class:`BadInput` and is skipped (recorded) or, with ``on_error="fail"``, stops the export.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.publish.pairset import open_pairset
from pairforge.schema import CORE_FEATURES, response_text
from pairforge.sources.formats import IMAGE_TAG

if TYPE_CHECKING:
    from rich.console import Console

FORMATS = ("llamafactory", "swift")
#: Default image path style per format: the one that resolves without extra settings.
DEFAULT_ABSOLUTE = {"llamafactory": False, "swift": True}
ON_ERROR = ("skip", "fail")
#: Rows read per batch (image bytes come along, so this bounds memory).
BATCH_ROWS = 256
#: LLaMA-Factory's ShareGPT speaker names.
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
#: The ``dataset_info.json`` entry's fixed part (LLaMA-Factory data/README: sharegpt, ranking).
LLAMAFACTORY_INFO = {
    "formatting": "sharegpt",
    "ranking": True,
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                "images": "images"},
    "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
             "assistant_tag": "gpt", "system_tag": "system"},
}
#: Columns a format carries; the rest of a set's columns are reported as not exported.
CARRIED = ("id", "prompt", "chosen", "rejected", "images")


# ----------------------------------------------------------------------------- pure converters


def tagged_text(content: Sequence[Mapping], field: str) -> str:
    """Message parts as one text: image parts become ``<image>`` tags in place, with nothing
    added around them (``[image, "Who are they?"]`` → ``"<image>Who are they?"``, the exact
    inverse of :func:`pairforge.sources.formats.tagged_parts`); two text parts in a row are
    joined by a newline."""
    out, prev_text = [], False
    for p in content:
        if p.get("type") == "image":
            out.append(IMAGE_TAG)
            prev_text = False
            continue
        text = p.get("text") or ""
        if IMAGE_TAG in text:
            raise BadInput(f"a text contains the literal tag {IMAGE_TAG!r}, which the "
                           f"format reads as an image placeholder; edit the text",
                           field=field)
        out.append("\n" + text if prev_text else text)
        prev_text = True
    return "".join(out)


def check_turns(prompt: Sequence[Mapping]) -> None:
    """The turns both formats take: an optional system message first, then user and
    assistant alternating, ending with the user's question."""
    roles = [m.get("role") for m in prompt]
    body = roles[1:] if roles and roles[0] == "system" else roles
    ok = bool(body) and len(body) % 2 == 1 and all(
        r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body))
    if not ok:
        raise BadInput(f"turns {roles} do not alternate user/assistant (after an optional "
                       f"system turn) ending with the user; the format cannot hold them",
                       field="prompt")


def _answer(messages: Sequence[Mapping], field: str) -> str:
    text = response_text(messages)
    if IMAGE_TAG in text:
        raise BadInput(f"the answer contains the literal tag {IMAGE_TAG!r}, which the format "
                       f"reads as an image placeholder; edit the text", field=field)
    return text


def llamafactory_record(row: Mapping, image_paths: Sequence[str]) -> dict:
    """One canonical row as a LLaMA-Factory ranking ShareGPT record."""
    check_turns(row["prompt"])
    turns = [{"from": SHAREGPT_FROM[m["role"]], "value": tagged_text(m["content"], "prompt")}
             for m in row["prompt"]]
    return {"id": row["id"], "conversations": turns,
            "chosen": {"from": "gpt", "value": _answer(row["chosen"], "chosen")},
            "rejected": {"from": "gpt", "value": _answer(row["rejected"], "rejected")},
            "images": list(image_paths)}


def swift_record(row: Mapping, image_paths: Sequence[str]) -> dict:
    """One canonical row as an ms-swift DPO record."""
    check_turns(row["prompt"])
    messages = [{"role": m["role"], "content": tagged_text(m["content"], "prompt")}
                for m in row["prompt"]]
    messages.append({"role": "assistant", "content": _answer(row["chosen"], "chosen")})
    return {"id": row["id"], "messages": messages,
            "rejected_response": _answer(row["rejected"], "rejected"),
            "images": list(image_paths)}


RECORDS: dict[str, Callable[[Mapping, Sequence[str]], dict]] = {
    "llamafactory": llamafactory_record,
    "swift": swift_record,
}


# ----------------------------------------------------------------------------- images


class ImageWriter:
    """Writes each distinct image once as ``images/<sha256[:16]>.<ext>`` under ``out``."""

    def __init__(self, out: Path, absolute: bool = False):
        self.out, self.absolute = out, absolute
        (out / "images").mkdir(parents=True, exist_ok=True)
        self.names: dict[str, str] = {}  # sha256 → path as written in the records
        self.n_refs = 0

    def __call__(self, value: Any, i: int) -> str:
        data = _image_bytes(value, i)
        digest = hashlib.sha256(data).hexdigest()
        self.n_refs += 1
        if digest not in self.names:
            rel = f"images/{digest[:16]}.{_extension(data, i)}"
            path = self.out / rel
            if not path.is_file() or path.stat().st_size != len(data):
                tmp = path.with_suffix(path.suffix + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            self.names[digest] = str(path.resolve()) if self.absolute else rel
        return self.names[digest]


def _image_bytes(value: Any, i: int) -> bytes:
    """The embedded bytes (open_pairset embedded every checked image; no path is opened here)."""
    if isinstance(value, Mapping) and value.get("bytes"):
        return bytes(value["bytes"])
    raise BadInput(f"image {i} has no bytes; rebuild the set with embedded images",
                   field="images")


def _extension(data: bytes, i: int) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except (UnidentifiedImageError, OSError):
        raise BadInput(f"image {i} is not a readable image file", field="images") from None
    return {"jpeg": "jpg", "": "bin"}.get(fmt, fmt)


# ----------------------------------------------------------------------------- driver


@dataclass
class ExportResult:
    """What ``export`` wrote: the data file, pairs exported, image references and distinct
    image files, rows skipped (with reasons) and columns the format does not carry."""

    out: Path
    data_file: Path
    n_rows: int
    n_image_refs: int
    n_image_files: int
    skipped: list[BadInput] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    absolute: bool = False  # image paths absolute (else relative to ``out``)


def export(path: str | os.PathLike, to: str, out: str | os.PathLike, *, name: str | None = None,
           on_error: str = "skip", absolute: bool | None = None,
           image_root: str | os.PathLike | None = None,
           console: Console | None = None) -> ExportResult:
    """Export the pair set at ``path`` (a build dir or a dataset of canonical rows) to the
    ``to`` format in folder ``out``. ``absolute``: image paths absolute or relative to
    ``out``; ``None`` picks what resolves by default (absolute for swift, relative for
    llamafactory). Images that rows only point to must lie inside ``image_root`` (default:
    the set's folder; see :func:`open_pairset`); a row whose image does not is skipped with
    the reason (or stops the export with ``on_error="fail"``)."""
    from rich.console import Console

    if to not in FORMATS:
        raise PairforgeError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise PairforgeError(f"on_error={on_error!r}; use one of {', '.join(ON_ERROR)}")
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    pset = open_pairset(path, image_root=image_root, on_bad_image=on_error)
    name = re.sub(r"[^\w.-]+", "_", name or pset.name).strip("._") or "pairs"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PairforgeError(f"--out {out}: exists and is not a folder; pass a folder")
    try:
        n, skipped, images, data_file = _write(
            pset, to, out, name, on_error, absolute)
    except OSError as e:  # read-only, under a file, disk full: one line, not a traceback
        raise PairforgeError(f"--out {out}: cannot write there ({e.strerror or e}); pass "
                             f"--out with a writable folder") from None
    not_carried = [c for c in pset.dataset.column_names if c not in CORE_FEATURES]
    result = ExportResult(out, data_file, n, images.n_refs, len(images.names), skipped,
                          not_carried, images.absolute)
    _print_summary(console, result, to, time.perf_counter() - t0)
    return result


def _write(pset, to: str, out: Path, name: str, on_error: str, absolute: bool | None):
    """Write the data file, the skipped rows and dataset_info.json under ``out``."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    if absolute is None:
        absolute = DEFAULT_ABSOLUTE[to]
    images = ImageWriter(out, absolute)
    record = RECORDS[to]
    data_file = out / f"{name}.jsonl"
    skipped: list[BadInput] = [bad for _, _, bad in pset.image_skips]
    skipped_ids: list[str] = [id_ for _, id_, _ in pset.image_skips]
    dropped = {i for i, _, _ in pset.image_skips}
    original = [i for i in range(len(pset.dataset) + len(dropped)) if i not in dropped]
    n = 0
    cols = pset.dataset.select_columns(list(CARRIED)).with_format("arrow")
    tmp = data_file.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f, \
            tqdm(total=len(pset.dataset), desc=f"export {to}", unit=" pairs", mininterval=0.5,
                 disable=None) as bar:
        index = 0
        for batch in cols.iter(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                try:
                    paths = [images(v, i) for i, v in enumerate(row["images"] or ())]
                    f.write(json.dumps(record(row, paths), ensure_ascii=False) + "\n")
                    n += 1
                except BadInput as e:
                    bad = BadInput(e.reason, where=pset.where, row=original[index],
                                   field=e.field)
                    if on_error == "fail":
                        raise bad from None
                    skipped.append(bad)
                    skipped_ids.append(row["id"])
                index += 1
            bar.update(batch.num_rows)
    os.replace(tmp, data_file)
    skipped_file = out / f"{name}.skipped.jsonl"
    if skipped:
        with open(skipped_file, "w", encoding="utf-8") as f:
            for id_, bad in zip(skipped_ids, skipped):
                f.write(json.dumps({"id": id_, **bad.to_record()}, ensure_ascii=False,
                                   default=str) + "\n")
    elif skipped_file.exists():
        skipped_file.unlink()
    if to == "llamafactory":
        _write_dataset_info(out, name, data_file.name)
    return n, skipped, images, data_file


def _write_dataset_info(out: Path, name: str, file_name: str) -> None:
    """Add (or replace) the ``name`` entry of ``out/dataset_info.json``, keeping the others."""
    path = out / "dataset_info.json"
    info: dict = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise PairforgeError(f"{path}: not valid JSON; fix or remove it (pairforge adds "
                                 f"its entry to an existing dataset_info.json)") from None
        if not isinstance(info, dict):
            raise PairforgeError(f"{path}: expected a JSON object of dataset entries")
    info[name] = {"file_name": file_name, **LLAMAFACTORY_INFO}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _print_summary(console: Console, r: ExportResult, to: str, seconds: float) -> None:
    console.print(f"exported {r.n_rows:,} pairs to {r.data_file} ({to}); {r.n_image_refs:,} "
                  f"image references, {r.n_image_files:,} distinct image files; in "
                  f"{seconds:.1f} s", highlight=False)
    if r.n_image_refs:
        if r.absolute:
            where = "absolute image paths (the file works from any folder while they exist)"
        elif to == "swift":
            where = (f"image paths relative to {r.out}: run ms-swift with "
                     f"ROOT_IMAGE_DIR={r.out.resolve()} (or from that folder)")
        else:
            where = (f"image paths relative to {r.out}: LLaMA-Factory resolves them with "
                     f"dataset_dir: {r.out.resolve()}")
        console.print(where, highlight=False)
    if r.skipped:
        by_field: dict[str, int] = {}
        for b in r.skipped:
            by_field[b.field or "row"] = by_field.get(b.field or "row", 0) + 1
        fields = ", ".join(f"{k}: {v}" for k, v in by_field.items())
        console.print(f"[yellow]skipped {len(r.skipped):,} rows the format cannot hold "
                      f"({fields}); see {r.data_file.with_suffix('')}.skipped.jsonl[/yellow]",
                      highlight=False)
    if r.not_carried:
        console.print(f"columns {to} does not carry (kept in the canonical set): "
                      f"{', '.join(r.not_carried)}", highlight=False)
