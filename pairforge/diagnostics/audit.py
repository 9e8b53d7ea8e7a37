"""``pairforge audit``: read preference sets, compute text metrics per pair and per set, write
``summary.json``, ``pairs.parquet``, ``skipped.jsonl``, plots and ``report.html``.

With a scoring model (``scorer`` / ``policy``), :class:`~pairforge.diagnostics.model_based.ModelAuditor`
adds log π(y|x), Δ_ref and IPS per pair (on a seeded sample when asked), read in a second pass.

:class:`SetAudit` is the pure, streaming part (texts in chunks → metrics, example pairs,
summary); :func:`run_audit` adds reading (``pairforge.sources``), files and the terminal.
Memory stays flat: texts live one chunk at a time, only numeric metrics and ids are kept.

Outputs are written into a temporary folder inside ``--out`` and moved in at the end
(:func:`staged_outputs`): a failed audit leaves ``--out`` as it was, and an audit replaces
only the files the previous audit wrote (listed in :data:`AUDIT_MARKER`), never a user's.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from pairforge.diagnostics.lengths import CharacterLengths, LengthUnit, length_unit
from pairforge.diagnostics.model_based import (
    ModelAuditor,
    ModelResult,
    model_table_columns,
)
from pairforge.diagnostics.stats import integrity_summary, repeated, set_summary
from pairforge.diagnostics.text import (
    EDIT_UNITS,
    choose_edit_unit,
    pair_metrics,
    text_at,
    unspaced,
)
from pairforge.errors import PairforgeError, check_out_path
from pairforge.schema import COLUMN_GROUPS

if TYPE_CHECKING:
    from rich.console import Console

    from pairforge.sources.reader import TextBatch

#: Texts of a chunk: a list of strings or an Arrow string array.
Texts = Sequence[str] | pa.Array

#: Pairs read before their metrics are computed in one vectorised call.
CHUNK_PAIRS = 32768
#: Most-different and most-similar example pairs kept per set for the report.
N_EXAMPLES = 3


@dataclass
class Example:
    """One pair shown in the report."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    lev_words: int
    lev_norm: float
    len_chosen: int
    len_rejected: int


@dataclass
class SetResult:
    """One audited set: its summary, per-pair metrics (with ``prompt_repeated``), ids and
    example pairs."""

    name: str
    summary: dict
    metrics: dict[str, np.ndarray]
    ids: pa.Array
    most_different: list[Example]
    most_similar: list[Example]
    model: ModelResult | None = None  # model-based metrics, when a scorer was given
    n_with_images: int = 0  # pairs whose prompt has at least one image


class SetAudit:
    """Accumulates one set chunk by chunk: ``add`` texts, then ``finish``.

    ``edit_unit``: ``words``, ``characters``, or ``None`` to choose from the first chunk
    (:func:`~pairforge.diagnostics.text.choose_edit_unit`: characters when enough pairs are
    in scripts written without spaces); the whole set then uses that one unit. With
    characters, whitespace-word lengths become character lengths too."""

    def __init__(self, name: str, unit: LengthUnit, n_examples: int = N_EXAMPLES,
                 edit_unit: str | None = None):
        self.name, self.unit, self.n_examples = name, unit, n_examples
        self.edit_unit = edit_unit
        self.n_unspaced = 0
        self._metrics: list[dict[str, np.ndarray]] = []
        self._ids: list[pa.Array] = []
        self._prompt_keys: list[np.ndarray] = []
        self._different: list[Example] = []
        self._similar: list[Example] = []

    def add(self, ids: Sequence[str], prompt_keys: Sequence[int], prompts: Texts,
            chosen: Texts, rejected: Texts,
            images_unresolved: Sequence[int] | None = None) -> None:
        """One chunk of pairs. ``prompt_keys``: equal for pairs with the same prompt; texts are
        lists of strings or Arrow string arrays; ``images_unresolved``: per pair, its images
        with no readable file (default 0)."""
        is_unspaced = unspaced(chosen) | unspaced(rejected)
        self.n_unspaced += int(is_unspaced.sum())
        if self.edit_unit is None:
            self.edit_unit = choose_edit_unit(is_unspaced)
        if self.edit_unit == "characters" and self.unit.name == "words":
            self.unit = CharacterLengths()
        m = pair_metrics(chosen, rejected, self.unit, edit_unit=self.edit_unit)
        m["images_unresolved"] = (np.zeros(len(ids), dtype=np.int32) if images_unresolved is None
                                  else np.asarray(images_unresolved, dtype=np.int32))
        self._metrics.append(m)
        self._ids.append(pa.array(ids, type=pa.string()))
        self._prompt_keys.append(np.asarray(prompt_keys, dtype=np.int64))
        # most different first: larger lev_norm, then larger lev_words
        order = np.lexsort((m["lev_words"], m["lev_norm"]))
        k = min(self.n_examples, len(order))

        def examples(idx: np.ndarray) -> list[Example]:
            return [Example(ids[i], text_at(prompts, i), text_at(chosen, i), text_at(rejected, i),
                            int(m["lev_words"][i]), float(m["lev_norm"][i]),
                            int(m["len_chosen"][i]), int(m["len_rejected"][i]))
                    for i in idx.tolist()]

        key = lambda e: (e.lev_norm, e.lev_words)  # noqa: E731
        self._different = sorted(self._different + examples(order[::-1][:k]), key=key,
                                 reverse=True)[:self.n_examples]
        self._similar = sorted(self._similar + examples(order[:k]), key=key)[:self.n_examples]

    def finish(self, n_skipped: int) -> SetResult:
        chunks = self._metrics or [pair_metrics([], [], self.unit)]
        metrics = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        metrics.setdefault("images_unresolved", np.zeros(0, dtype=np.int32))
        keys = self._prompt_keys or [np.zeros(0, dtype=np.int64)]
        metrics["prompt_repeated"] = repeated(np.concatenate(keys))
        ids = pa.concat_arrays(self._ids) if self._ids else pa.array([], type=pa.string())
        metrics["id_repeated"] = repeated(ids.dictionary_encode().indices.to_numpy(
            zero_copy_only=False).astype(np.int64))
        summary = set_summary(metrics, n_skipped=n_skipped, length_unit=self.unit.name,
                              edit_unit=self.edit_unit or "words", n_unspaced=self.n_unspaced)
        integrity = integrity_summary(metrics)
        summary["flags"] = summary["flags"] + integrity.pop("flags")
        summary.update(integrity)
        return SetResult(self.name, summary, metrics, ids, self._different, self._similar)


# ----------------------------------------------------------------------------- files


def pairs_schema(model_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    """``pairs.parquet``: set, id, the schema's ``diagnostics`` columns, prompt_repeated,
    id_repeated, images_unresolved, and the model-based columns when a scorer was given."""
    diagnostics = Features(COLUMN_GROUPS["diagnostics"]).arrow_schema
    return pa.schema([pa.field("set", pa.string()), pa.field("id", pa.string()),
                      *diagnostics, pa.field("edit_unit", pa.string()),
                      pa.field("prompt_repeated", pa.bool_()),
                      pa.field("id_repeated", pa.bool_()),
                      pa.field("images_unresolved", pa.int32()), *model_fields])


def pairs_table(result: SetResult, schema: pa.Schema, model_fields: Sequence[pa.Field] = ()) -> pa.Table:
    m, n = result.metrics, len(result.ids)
    columns = {"set": pa.array([result.name] * n, type=pa.string()), "id": result.ids,
               "length_unit": pa.array([result.summary["length_unit"]] * n, type=pa.string()),
               "edit_unit": pa.array([result.summary["edit_unit"]] * n, type=pa.string()),
               **model_table_columns(result.model, model_fields, n)}
    for f in schema:
        if f.name not in columns:
            columns[f.name] = pa.array(m[f.name]).cast(f.type)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def _stage(bar, stage: str) -> None:
    """Show the phase the set's audit is in after its progress bar (reading, metrics)."""
    bar.set_postfix_str(stage, refresh=True)


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name#2``, ``name#3``, ... when already taken."""
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}#{k}"
    return out


def run_audit(specs: Sequence[str], out_dir: str | os.PathLike, *, format: str | None = None,
              image_root: str | os.PathLike | None = None, tokenizer: str = "gpt2",
              edit_unit: str | None = None, on_error: str = "skip", console: Console | None = None,
              scorer: str | None = None, policy: str | None = None, text_only: bool = False,
              sample: int | None = None, seed: int = 0, batch_size: int = 8,
              device: str | None = None, max_pixels: int | None = None) -> list[SetResult]:
    """Audit each set in ``specs`` and write all outputs into ``out_dir``; prints the summary
    table and flags. Returns the per-set results.

    ``scorer`` / ``policy`` (model specs; ``default`` = tiny-vlm for image sets, smollm2 for
    text-only sets) add the model-based metrics (see
    :class:`~pairforge.diagnostics.model_based.ModelAuditor`): ``text_only`` also scores
    without the image, ``sample`` scores a ``seed``-ed random sample of that many pairs per
    set, ``batch_size`` / ``device`` go to the models; pairs with an image above
    ``max_pixels`` (default: the build's limit) are not scored. ``edit_unit``: words or
    characters for every set; ``None`` chooses per set by script (:class:`SetAudit`)."""
    from rich.console import Console

    from pairforge.diagnostics import report

    console = console or Console()
    t0 = time.perf_counter()
    if edit_unit is not None and edit_unit not in EDIT_UNITS:
        raise PairforgeError(f"--edit-unit {edit_unit!r}: use one of {', '.join(EDIT_UNITS)} "
                             f"(or leave it out to choose by script)")
    out = Path(out_dir)
    previous = previous_audit(out)  # refuses a file, or files audit would replace but did not write
    unit = length_unit(tokenizer)
    if text_only and scorer is None and policy is None:
        raise PairforgeError("--text-only scores the pairs without their images; it needs a "
                             "model: add --scorer default (or --scorer MODEL)")
    auditor = None
    if scorer is not None or policy is not None:
        auditor = ModelAuditor(scorer, policy, text_only=text_only, sample=sample, seed=seed,
                               batch_size=batch_size, device=device, console=console,
                               max_pixels=max_pixels)
        auditor.preload()
    model_fields = auditor.fields() if auditor else []
    with staged_outputs(out, previous) as stage:
        results = _audit_sets(specs, stage, format=format, image_root=image_root,
                              on_error=on_error, unit=unit, auditor=auditor,
                              model_fields=model_fields, console=console, edit_unit=edit_unit)
    report.print_summary(results, console)
    n = sum(r.summary["n_pairs"] for r in results)
    skipped = sum(r.summary["n_skipped"] for r in results)
    console.print(f"audited {len(results)} set(s): {n:,} pairs, {skipped:,} skipped, "
                  f"in {time.perf_counter() - t0:.1f} s → {out}/report.html")
    return results


def _audit_sets(specs: Sequence[str], out: Path, *, format: str | None, image_root: Any,
                on_error: str, unit: LengthUnit, auditor: ModelAuditor | None,
                model_fields: list[pa.Field], console: Console,
                edit_unit: str | None = None) -> list[SetResult]:
    """Audit each set and write every output into ``out`` (the staging folder)."""
    from tqdm import tqdm

    from pairforge.diagnostics import report
    from pairforge.sources import read_pairs

    schema = pairs_schema(model_fields)
    results: list[SetResult] = []
    with pq.ParquetWriter(out / "pairs.parquet", schema) as writer, \
            open(out / "skipped.jsonl", "w", encoding="utf-8",
                 errors="backslashreplace") as skipped_file:
        for spec in specs:
            stream = read_pairs(spec, format=format, image_root=image_root, on_error=on_error,
                                load_images=False)
            name = unique_name(stream.name, {r.name for r in results})
            audit = SetAudit(name, unit, edit_unit=edit_unit)
            n_pairs = n_with_images = 0
            with tqdm(total=stream.estimated_total(), desc=f"audit {name}", unit=" rows",
                      mininterval=0.5, disable=None, postfix="reading") as bar:
                def progress(bar=bar, stream=stream) -> None:
                    bar.update(stream.n_read - bar.n)

                batches = prefetched(stream.text_batches())
                for chunk in exact_chunks(batches, CHUNK_PAIRS, progress):
                    _stage(bar, f"text metrics of {len(chunk):,} pairs")
                    keys = [hash(k) for k in zip(chunk.prompts.to_pylist(),
                                                 chunk.n_images.tolist())]
                    audit.add(chunk.ids, keys, chunk.prompts, chunk.chosen, chunk.rejected,
                              chunk.unresolved)
                    n_pairs += len(chunk)
                    n_with_images += int(np.count_nonzero(chunk.n_images))
                    if len(chunk) == CHUNK_PAIRS:  # a shorter chunk is the last
                        _stage(bar, "reading")
                progress()
                _stage(bar, "done")
            if stream.n_read != n_pairs + len(stream.skipped):
                raise RuntimeError(f"{name}: read {stream.n_read} rows but got {n_pairs} pairs "
                                   f"and {len(stream.skipped)} skipped; this is a pairforge bug")
            for bad in stream.skipped:
                skipped_file.write(json.dumps({"set": name, **bad.to_record()},
                                              ensure_ascii=False, default=str) + "\n")
            result = audit.finish(len(stream.skipped))
            result.summary.update(source=os.fspath(spec), format=stream.format)
            result.n_with_images = n_with_images
            if auditor is not None and n_pairs:
                result.model = auditor.audit_set(name, spec, result.ids, has_images=n_with_images > 0,
                                                 format=stream.format, image_root=image_root,
                                                 first_skipped=stream.skipped_at)
                result.summary.update(result.model.summary)
                result.summary["flags"] = result.summary["flags"] + result.model.flags
            writer.write_table(pairs_table(result, schema, model_fields))
            results.append(result)
    summary = {r.name: r.summary for r in results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8", errors="backslashreplace")
    console.print("writing summary.json, plots and report.html ...", style="dim",
                  highlight=False)
    plots = report.write_plots(out, results)
    report.write_html(out, results, plots)
    return results


def exact_chunks(batches: Iterable[TextBatch], size: int,
                 progress: Callable[[], None] = lambda: None) -> Iterator[TextBatch]:
    """The pairs of ``batches`` in chunks of exactly ``size`` (the last one shorter), so that
    chunk boundaries, and with them the chosen edit unit and the example pairs, do not depend
    on how the reader batches; ``progress`` is called after each batch read."""
    from pairforge.sources.reader import TextBatch

    held: list[TextBatch] = []
    n = 0
    for batch in batches:
        progress()
        held.append(batch)
        n += len(batch)
        while n >= size:
            chunk = TextBatch.concat(held)
            yield chunk.slice(0, size)
            rest = chunk.slice(size, len(chunk))
            held, n = ([rest] if len(rest) else []), len(rest)
    if n:
        yield TextBatch.concat(held)


def prefetched(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead (reading the next
    batches while the metrics of one run: pyarrow, hashing and rapidfuzz release the GIL).
    An exception in the producer is raised here; leaving early stops the producer."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            buffer.put((done, e))

    thread = threading.Thread(target=produce, name="audit-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            with contextlib.suppress(queue.Empty):
                buffer.get(timeout=0.1)
        thread.join()


# ----------------------------------------------------------------------------- the out folder

#: The list of files the last audit wrote into its ``--out`` folder (so that a new audit
#: replaces those, and only those).
AUDIT_MARKER = ".pairforge-audit.json"
#: Files every audit writes (plots vary with the sets).
AUDIT_FILES = ("summary.json", "pairs.parquet", "skipped.jsonl", "report.html")


def previous_audit(out: Path) -> set[str]:
    """The files a previous ``pairforge audit`` wrote into ``out`` (its marker); a one-line
    error when ``out`` is a file or under one, or holds a file audit writes that no audit
    wrote (it would be replaced)."""
    check_out_path(out)
    marker = out / AUDIT_MARKER
    previous: set[str] = set()
    if marker.is_file():
        try:
            previous = set(json.loads(marker.read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError):
            previous = set()
        # only plain names of audit's own outputs: a marker can never name a file elsewhere
        previous = {n for n in previous if isinstance(n, str) and n == Path(n).name
                    and not n.startswith(".")}
    for name in AUDIT_FILES:
        if (out / name).exists() and name not in previous:
            raise PairforgeError(f"--out {out}: holds {name}, which pairforge audit did not "
                                 f"write; pass an empty or new folder (audit replaces only its "
                                 f"own files)")
    return previous


@contextlib.contextmanager
def staged_outputs(out: Path, previous: set[str]) -> Iterator[Path]:
    """A temporary folder inside ``out`` for the audit to write into; on success its files
    replace the previous audit's (a file audit did not write is never replaced or removed),
    on failure it is removed and ``out`` is as it was (not there, if the audit created it)."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".audit-", suffix=".tmp", dir=out))
    except OSError as e:
        raise PairforgeError(f"--out {out}: cannot write there ({e.strerror or e}); pass a "
                             f"folder you can write") from None
    done = False
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        clash = [n for n in names if (out / n).exists() and n not in previous]
        if clash:
            raise PairforgeError(f"--out {out}: holds {clash[0]}, which pairforge audit did not "
                                 f"write; pass an empty or new folder")
        def mark(files: Iterable[str]) -> None:
            (out / AUDIT_MARKER).write_text(json.dumps({"files": sorted(files)}) + "\n",
                                            encoding="utf-8")

        mark(previous | set(names))  # a crash while moving leaves only files audit wrote
        for name in names:
            os.replace(stage / name, out / name)
        for name in sorted(previous - set(names)):  # e.g. a plot this audit did not draw
            old = out / name
            if old.is_file():
                old.unlink()
        mark(names)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not done:
            shutil.rmtree(out, ignore_errors=True)  # made by this audit, holds nothing else
