"""SFT examples for the build engine: any supported source → a lazy stream of
:class:`~pairforge.contract.Example` s, each bad one a :class:`ReadReject` in its place.

Source specs (``--source``)::

    shapes                          the offline world: 300 train examples, world seed 0
    shapes:SPLIT?n=N&seed=S         SPLIT: train | validation | test; more options:
                                    width, height (pixels, 112), filter_share (0.05)
    data.json / data.jsonl          LLaVA-style: ``conversations`` (human/gpt turns) + ``image``
    data.parquet / DIR / data.jsonl rows with ``messages`` (+ ``images``), e.g. the world's
                                    ``sft_dataset`` saved with ``save_to_disk``
    DIR?split=NAME                  a split of a dataset folder (default: train)
    BUILD_DIR                       a finished ``pairforge build`` folder: its ``dataset/``
    pairs.parquet / DIR             canonical pair rows (``prompt``, ``chosen``, ``rejected``)

Pair rows (a record with ``prompt``, ``chosen`` and ``rejected`` and no ``messages`` /
``conversations``: canonical rows, TRL's conversational format) become one example each, for
recipes that work on existing pairs (ASPO): ``messages`` = prompt + chosen, ``images`` the
pair's images, ``meta["pair"]`` = the pair's other columns (``rejected`` as canonical messages,
``id``, provenance, recipe columns), its ``source_meta`` extended with ``pair_id`` (the row's id
in the set read: a recipe's row gets a new id). The example id is the row's ``id``.

The world's ground truth (``scene``, ``target``, ``answer_value``, ...) goes into
``Example.meta`` and its ``task`` into ``Example.task``; file rows put every column other than
id / conversations / messages / image(s) / task into ``meta``.

A conversation with several question-answer turns becomes one example per turn, with the
earlier turns as context; ids are ``{id}#{turn}`` (0-based), a single-turn example keeps the
record's ``id`` (``row-{index}`` when the record has none).

Reading is streamed (:mod:`pairforge.sources.containers`) and two-stage: :meth:`entries`
yields cheap :class:`Entry` s (id known, nothing decoded) so the engine can shard, limit and
skip already-built examples without touching images; ``Entry.load()`` decodes and checks.
A bad example becomes a :class:`ReadReject` (stage ``read``, one line naming file, row and the
fix): a broken record, a missing / empty / escaping image file (:class:`ImageResolver`),
undecodable or truncated image bytes, an image above ``max_pixels`` (decompression bombs;
Pillow's own limit of ``2 * Image.MAX_IMAGE_PIXELS`` still applies above that), an empty
instruction, an empty answer, a duplicate example id.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image as PILImage

from pairforge.contract import Example
from pairforge.errors import BadInput, PairforgeError, first_line
from pairforge.schema import count_image_parts
from pairforge.sources.containers import open_container
from pairforge.sources.formats import SHAREGPT_ROLES, _content, from_trl, place_images
from pairforge.sources.images import ImageResolver

WORLD = "shapes"
WORLD_SPLITS = ("train", "validation", "test")
WORLD_DEFAULTS = {"n": 300, "seed": 0, "width": 112, "height": 112, "filter_share": 0.05}
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Columns that make the example itself; the others go to ``Example.meta``.
OWN_COLUMNS = ("id", "conversations", "messages", "images", "image", "task")
#: Columns that make a record a preference pair (read as one example with ``meta["pair"]``).
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
#: Attribute set on each decoded image: its original ``{"bytes", "path"}``, so the build embeds
#: the source's bytes as they are instead of re-encoding pixels.
SOURCE_BYTES = "_pairforge_source_bytes"


@dataclass(frozen=True)
class ReadReject:
    """An example that could not be read: its id, the source row id and a one-line reason."""

    id: str
    source_id: str
    reason: str
    stage: str = "read"

    def record(self) -> dict:
        return {"id": self.id, "source_id": self.source_id, "stage": self.stage,
                "reason": self.reason}


@dataclass
class Entry:
    """One example of the source before decoding: ``load()`` gives the Example or a reject."""

    id: str
    source_id: str
    _load: Callable[[], Example | ReadReject] = field(repr=False)

    def load(self) -> Example | ReadReject:
        return self._load()


def source_bytes(image: Any) -> dict | None:
    """The ``{"bytes", "path"}`` an image was decoded from by this module, else None."""
    return getattr(image, SOURCE_BYTES, None)


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source``: ``kind`` (``shapes`` | ``file``), the path or world split, and
    the options (world: n, seed, width, height, filter_share; file: split)."""

    kind: str
    target: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options)
        head = f"{WORLD}:{self.target}" if self.kind == WORLD else self.target
        return f"{head}?{query}" if query else head


def parse_source(spec: str | os.PathLike) -> SourceSpec:
    """Parse a source spec (forms in the module docstring); the canonical ``str()`` of the
    result names the same source and enters the run identity."""
    text = os.fspath(spec).strip()
    head, _, query = text.partition("?")
    if Path(text).exists() or not query:
        head, query = text, ""
    try:
        opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise PairforgeError(f"--source {text}: cannot parse the options after '?'; "
                             f"write them as key=value&key=value") from None
    if head == WORLD or head.startswith(WORLD + ":"):
        split = head.partition(":")[2] or "train"
        if split not in WORLD_SPLITS:
            raise PairforgeError(f"--source {text}: no world split {split!r}; use "
                                 f"{', '.join(f'{WORLD}:{s}' for s in WORLD_SPLITS)}")
        unknown = sorted(set(opts) - set(WORLD_DEFAULTS))
        if unknown:
            raise PairforgeError(f"--source {text}: unknown option {unknown[0]!r}; the world "
                                 f"takes {', '.join(WORLD_DEFAULTS)}")
        values = {}
        for key, default in WORLD_DEFAULTS.items():
            raw = opts.get(key, default)
            try:
                values[key] = type(default)(raw)
            except ValueError:
                raise PairforgeError(f"--source {text}: option {key}={raw!r} is not a "
                                     f"{type(default).__name__}") from None
        if values["n"] < 0 or values["width"] < 8 or values["height"] < 8:
            raise PairforgeError(f"--source {text}: n must be >= 0 and width/height >= 8")
        return SourceSpec(WORLD, split, tuple(values.items()))
    unknown = sorted(set(opts) - {"split"})
    if unknown:
        raise PairforgeError(f"--source {text}: unknown option {unknown[0]!r}; a file or "
                             f"folder takes only ?split=NAME")
    return SourceSpec("file", head, tuple(opts.items()))


# ----------------------------------------------------------------------------- stream


class ExampleStream:
    """The examples of one source (see :func:`read_examples`).

    ``name`` is the ``source_dataset`` of its examples, ``spec`` the canonical spec, ``total``
    the number of examples when known before reading (the world), else None; ``estimate``
    that or the number of records when the container knows it (for progress bars). Iterating
    decodes every example; counters ``n_examples`` / ``n_rejected`` (and reasons) grow while
    iterating and restart with each pass."""

    def __init__(self, spec: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if max_pixels < 1:
            raise PairforgeError(f"--max-pixels {max_pixels}: must be >= 1")
        self.source = parse_source(spec)
        self.spec = str(self.source)
        self.max_pixels = max_pixels
        self.n_examples = 0
        self.n_rejected = 0
        self.reasons: Counter[str] = Counter()
        if self.source.kind == WORLD:
            self.name = f"{WORLD}:{self.source.target}"
            self.where = self.spec
            self.total: int | None = self.source.option("n")
            self.estimate: int | None = self.total
            self._entries = self._world_entries
            return
        built = build_dataset(Path(self.source.target))
        self._container = open_container(built or self.source.target,
                                         split=self.source.option("split"))
        if built is not None:  # a build dir: named after its folder, not its dataset/
            self._container.name = Path(self.source.target).resolve().name
        self.name, self.where, self.total = self._container.name, self._container.where, None
        self.estimate = self._container.total
        root = self._container.root if image_root is None else Path(image_root)
        if image_root is not None and not root.is_dir():
            raise PairforgeError(f"--image-root {os.fspath(image_root)}: not a folder; pass the "
                                 f"folder the image paths are relative to")
        self._resolve = ImageResolver(root, load=True)
        self._entries = self._file_entries

    def entries(self) -> Iterator[Entry]:
        """A fresh pass over the source's entries, in source order; duplicate ids after the
        first are rejects."""
        seen: set[str] = set()
        for entry in self._entries():
            if entry.id in seen:
                reason = (f"{self.where}: example id {entry.id!r} occurs more than once; "
                          f"give each record a unique id")
                entry = _rejected(entry.id, entry.source_id, reason)
            seen.add(entry.id)
            yield entry

    def __iter__(self) -> Iterator[Example | ReadReject]:
        self.n_examples = self.n_rejected = 0
        self.reasons = Counter()
        for entry in self.entries():
            item = entry.load()
            self.count(item)
            yield item

    def count(self, item: Example | ReadReject) -> None:
        if isinstance(item, ReadReject):
            self.n_rejected += 1
            self.reasons[reason_kind(item.reason)] += 1
        else:
            self.n_examples += 1

    def summary(self) -> str:
        line = (f"{self.name}: {self.n_examples + self.n_rejected} examples read, "
                f"{self.n_examples} ok, {self.n_rejected} rejected")
        if self.reasons:
            line += " (" + "; ".join(f"{r}: {n}" for r, n in self.reasons.most_common(3)) + ")"
        return line

    # -- the world

    def _world_entries(self) -> Iterator[Entry]:
        from pairforge.world import example_at

        split, o = self.source.target, dict(self.source.options)
        for index in range(o["n"]):
            row_id = f"{WORLD}-{split}-{o['seed']}-{index:07d}"

            def load(index: int = index, row_id: str = row_id) -> Example | ReadReject:
                row = example_at(split, index, o["seed"], filter_share=o["filter_share"],
                                 width=o["width"], height=o["height"])
                if row["id"] != row_id:  # the world's id rule changed: fail loudly, not shift
                    raise RuntimeError(f"world row id {row['id']!r} != expected {row_id!r}")
                meta = {k: v for k, v in row.items() if k not in OWN_COLUMNS}
                ex = Example(id=row_id, messages=row["messages"], images=row["images"],
                             task=row["task"], source_dataset=self.name, source_id=row_id,
                             meta=meta)
                return _checked(ex, self.where, index)

            yield Entry(row_id, row_id, load)

    # -- files

    def _file_entries(self) -> Iterator[Entry]:
        for index, record in self._container.records():
            yield from self._record_entries(index, record)

    def _record_entries(self, index: int, record: Any) -> Iterator[Entry]:
        """The entries of one record: one per question-answer turn, or one for a pair."""
        rid = record.get("id") if isinstance(record, Mapping) else None
        base = f"row-{index}" if rid is None or str(rid) == "" else str(rid)
        if is_pair_record(record):
            yield self._pair_entry(index, base, record)
            return
        try:
            if isinstance(record, BadInput):
                raise record
            messages, raw_images = _conversation(record)
            turns = _turns(messages)
        except BadInput as e:
            yield _rejected(base, base, _one_line(e, self.where, index))
            return
        images = _LazyImages(raw_images, self._resolve, self.max_pixels)
        meta = {k: v for k, v in record.items() if k not in OWN_COLUMNS}
        task = record.get("task") if isinstance(record.get("task"), str) else None
        for turn, end in enumerate(turns):
            ex_id = base if len(turns) == 1 else f"{base}#{turn}"
            if end is None:  # a question with no answer after it
                reason = (f"{self.where}, row {index}: turn {turn} is a question with no answer "
                          f"after it; add the answer or drop the turn")
                yield _rejected(ex_id, base, reason)
                continue

            def load(ex_id: str = ex_id, end: int = end, turn: int = turn) -> Example | ReadReject:
                decoded = images.get()
                if isinstance(decoded, BadInput):
                    return ReadReject(ex_id, base, _one_line(decoded, self.where, index))
                prefix = messages[:end + 1]
                ex = Example(id=ex_id, messages=prefix,
                             images=decoded[:count_image_parts(prefix)], task=task,
                             source_dataset=self.name, source_id=base,
                             meta=meta if len(turns) == 1 else {**meta, "turn": turn})
                return _checked(ex, self.where, index)

            yield Entry(ex_id, base, load)

    def _pair_entry(self, index: int, base: str, record: Mapping) -> Entry:
        """The one entry of a pair record (module docstring: pair rows)."""
        try:
            draft = from_trl(record)
        except BadInput as e:
            return _rejected(base, base, _one_line(e, self.where, index))
        images = _LazyImages(draft.images, self._resolve, self.max_pixels)
        pair = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "images", "image")}
        pair["rejected"] = draft.rejected
        meta = pair.get("source_meta")
        if meta is None or isinstance(meta, list):
            pair["source_meta"] = [*(meta or ()), {"key": "pair_id", "value": base}]
        task = record.get("task") if isinstance(record.get("task"), str) else None

        def load() -> Example | ReadReject:
            decoded = images.get()
            if isinstance(decoded, BadInput):
                return ReadReject(base, base, _one_line(decoded, self.where, index))
            ex = Example(id=base, messages=draft.prompt + draft.chosen, images=decoded, task=task,
                         source_dataset=self.name, source_id=base, meta={"pair": pair})
            return _checked(ex, self.where, index)

        return Entry(base, base, load)


def is_pair_record(record: Any) -> bool:
    """A preference pair (``prompt``, ``chosen``, ``rejected``), not an SFT conversation."""
    return (isinstance(record, Mapping) and all(k in record for k in PAIR_COLUMNS)
            and "messages" not in record and "conversations" not in record)


def build_dataset(path: Path) -> Path | None:
    """``path/dataset`` when ``path`` is a build folder (it has a build manifest), else None;
    an unfinished build is a one-line error (:func:`pairforge.engine.load_build`)."""
    if not (path / "manifest.json").is_file():  # pairforge.engine.manifest.MANIFEST
        return None
    from pairforge.engine.summary import load_build

    load_build(path)  # the manifest's format and the build finished, or a one-line error
    return path / "dataset"


def read_examples(spec: str | os.PathLike = WORLD, *, image_root: str | os.PathLike | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> ExampleStream:
    """The SFT examples of ``spec`` (forms in the module docstring), read lazily: iterate for
    :class:`Example` s and :class:`ReadReject` s in source order (counts on the stream), or
    use ``.entries()`` to select before decoding. ``image_root``: the folder image paths are
    resolved against and must stay inside (default: the data file's folder). ``max_pixels``:
    images with more pixels are rejected. Problems with the source as a whole raise
    :class:`PairforgeError`."""
    return ExampleStream(spec, image_root=image_root, max_pixels=max_pixels)


# ----------------------------------------------------------------------------- records


def _conversation(record: Any) -> tuple[list[dict], list[Any]]:
    """(canonical messages with image parts placed, raw image values) of a record."""
    if not isinstance(record, Mapping):
        raise BadInput(f"record is {type(record).__name__}, expected an object with "
                       f"'conversations' or 'messages'")
    if isinstance(record.get("conversations"), list):
        key, turns = "conversations", record["conversations"]
        messages = [_sharegpt_turn(t, j) for j, t in enumerate(turns)]
    elif isinstance(record.get("messages"), list):
        key, turns = "messages", record["messages"]
        messages = [_message(m, j) for j, m in enumerate(turns)]
    else:
        raise BadInput("needs a 'conversations' list (LLaVA: human/gpt turns) or a 'messages' "
                       "list (role/content); neither is there", field="conversations")
    if not turns:
        raise BadInput(f"'{key}' is an empty list: the record has no question-answer turn; add "
                       f"the turns or drop the record", field=key)
    if record.get("images") is not None and record.get("image") is not None:
        raise BadInput("the record has both 'image' and 'images'; keep one", field="images")
    raw = record.get("images") if record.get("images") is not None else record.get("image")
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    try:
        return place_images(messages, len(raw)), raw
    except BadInput as e:
        raise BadInput(e.reason, field=e.field or key) from None


def _sharegpt_turn(turn: Any, j: int) -> dict:
    if not isinstance(turn, Mapping) or turn.get("from") not in SHAREGPT_ROLES:
        got = turn.get("from") if isinstance(turn, Mapping) else type(turn).__name__
        raise BadInput(f"turn {j} is from {got!r}; expected one of {sorted(SHAREGPT_ROLES)}",
                       field="conversations")
    value = turn.get("value")
    if not isinstance(value, str):
        raise BadInput(f"turn {j} value is {type(value).__name__}, expected a string",
                       field="conversations")
    return {"role": SHAREGPT_ROLES[turn["from"]], "content": _content(value, "conversations",
                                                                       tags=True)}


def _message(m: Any, j: int) -> dict:
    if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant"):
        got = m.get("role") if isinstance(m, Mapping) else type(m).__name__
        raise BadInput(f"message {j} has role {got!r}; expected system, user or assistant",
                       field="messages")
    return {"role": m["role"], "content": _content(m.get("content"), "messages", tags=True)}


def _turns(messages: list[dict]) -> list[int | None]:
    """Per question-answer turn, the index of its answer (None for a last, unanswered
    question). Messages: optional system messages, then user / assistant alternating."""
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    turns: list[int | None] = []
    for j in range(start, len(messages)):
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if messages[j]["role"] != expected:
            raise BadInput(f"turn {j} is from the {messages[j]['role']} but the {expected} "
                           f"was expected; turns must alternate question / answer",
                           field="conversations")
        if expected == "assistant":
            turns.append(j)
    if (len(messages) - start) % 2 == 1:
        turns.append(None)
    if not turns:
        raise BadInput("has no question-answer turn", field="conversations")
    return turns


class _LazyImages:
    """A record's images, resolved and decoded once, on first use (shared by its turns)."""

    def __init__(self, raw: list[Any], resolve: ImageResolver, max_pixels: int):
        self.raw, self.resolve, self.max_pixels = raw, resolve, max_pixels
        self.value: list[Any] | BadInput | None = None

    def get(self) -> list[Any] | BadInput:
        if self.value is None:
            try:
                self.value = [decode_image(self.resolve.one(v, i), i, self.max_pixels)
                              for i, v in enumerate(self.raw)]
            except BadInput as e:
                self.value = e
            self.raw = []
        return self.value


def decode_image(struct: Mapping, i: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode ``{"bytes", "path"}`` into a loaded PIL image that remembers its source bytes;
    :class:`BadInput` (field ``images``) for undecodable or truncated bytes and for more than
    ``max_pixels`` pixels (checked from the header, before the pixels are decoded)."""
    name = struct.get("path") or f"image {i}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(struct["bytes"]))
            w, h = img.size
            if w * h > max_pixels:
                raise BadInput(f"{name} is {w}x{h} = {w * h:,} pixels, above the limit of "
                               f"{max_pixels:,} (decompression bomb guard); raise --max-pixels "
                               f"or drop the record", field="images")
            img.load()
    except PILImage.DecompressionBombError as e:
        raise BadInput(f"{name}: {e}; drop the record", field="images") from None
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadInput(f"{name} cannot be decoded ({first_line(e)}); the file is corrupt or "
                       f"truncated, re-create it or drop the record", field="images") from None
    setattr(img, SOURCE_BYTES, {"bytes": struct["bytes"], "path": struct.get("path")})
    return img


def _checked(ex: Example, where: str, index: int) -> Example | ReadReject:
    """The example, or a reject when its instruction or answer is empty."""
    if not ex.question.strip():
        reason = "empty instruction (the question has no text); fix or drop the turn"
    elif not ex.answer.strip():
        reason = "empty answer; fix or drop the turn"
    else:
        return ex
    return ReadReject(ex.id, ex.source_id, f"{where}, row {index}: {reason}")


def _rejected(ex_id: str, source_id: str, reason: str) -> Entry:
    reject = ReadReject(ex_id, source_id, reason)
    return Entry(ex_id, source_id, lambda: reject)


def _one_line(e: BadInput, where: str, index: int) -> str:
    if e.where is not None:
        return e.one_line()
    return BadInput(e.reason, where=where, row=index, field=e.field).one_line()


def reason_kind(reason: str) -> str:
    """A reason with its particulars masked (the 'file, row n' prefix, quoted names, numbers),
    so that reasons can be counted by kind: ``images: '…' cannot be decoded (…)``."""
    pieces, _ = reason_pieces(reason)
    return "N".join(pieces)[:160]


_NUMBER = re.compile(r"\d[\d,.]*")


def reason_pieces(reason: str) -> tuple[tuple[str, ...], list[str]]:
    """A reason as :func:`reason_kind` masks it, split at its numbers: (the text around the
    numbers, the numbers). ``"N".join(pieces)`` is the kind; :func:`fill_numbers` puts
    numbers (or their ranges over a kind's reasons) back where a reader wants to see them."""
    m = _PREFIX.match(reason)
    if m:
        reason = (f"{m.group(1)}: " if m.group(1) else "") + reason[m.end():]
    # quoted names and parentheses, not apostrophes ("the answer's statement")
    reason = re.sub(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"|\([^)]*\)", "…", reason)
    return tuple(_NUMBER.split(reason)), _NUMBER.findall(reason)


def fill_numbers(pieces: Sequence[str], slots: Sequence[Iterable[str]]) -> str:
    """The reason of a kind with each number slot filled: the number when all its reasons
    agree, else the range ``lo–hi`` (never a bare ``N``), at most 160 characters."""
    out = [pieces[0]]
    for piece, values in zip(pieces[1:], slots):
        vals = sorted(set(values), key=_number_value)
        out.append(vals[0] if len(vals) == 1 else f"{vals[0]}–{vals[-1]}")
        out.append(piece)
    return "".join(out)[:160]


class ReasonTally:
    """Reasons counted by (stage, kind) (:func:`reason_kind`), each kind keeping the numbers
    its reasons had, so that :meth:`counts` shows them back (:func:`fill_numbers`)."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, tuple[str, ...]], list] = {}  # → [count, numbers per slot]

    def add(self, stage: str, reason: str) -> None:
        pieces, numbers = reason_pieces(reason)
        entry = self.kinds.setdefault((stage, pieces), [0, [set() for _ in numbers]])
        entry[0] += 1
        for slot, number in zip(entry[1], numbers):
            slot.add(number)

    def counts(self) -> Counter:
        """``(stage, reason with its numbers or ranges) → count``."""
        out: Counter = Counter()
        for (stage, pieces), (n, slots) in self.kinds.items():
            out[(stage, fill_numbers(pieces, slots))] += n
        return out


def _number_value(text: str) -> float:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return float("inf")


_PREFIX = re.compile(r"^.*?, row [^,:]+(?:, field '([^']*)')?: ")


__all__ = ["DEFAULT_MAX_PIXELS", "Entry", "ExampleStream", "ReadReject", "SourceSpec",
           "build_dataset", "decode_image", "is_pair_record", "parse_source", "read_examples",
           "ReasonTally", "fill_numbers", "reason_kind", "reason_pieces", "source_bytes"]
