"""``pairforge build``: drive a recipe over SFT examples into a checkpointed pair dataset.

The flow, top to bottom (each step counts what it forwarded and dropped):

1. **setup**: the recipe (``load_recipe``), the models of its roles (``load_model``; required
   roles at once, optional ones when the recipe first asks for them), ``recipe.check(ctx)``;
   the source (:func:`pairforge.sources.sft.read_examples`); the run identity; the manifest
   (new, resumed, or a one-line refusal naming the differing setting);
2. **select**: the source's entries in order, cut at ``--limit``, kept when their id hashes to
   this ``--shard``, minus the examples already committed (not decoded again);
3. **chunks** of ``chunk_size`` examples: *read* (decode, check: bad ones are rejects of stage
   ``read``) → *recipe* (``batch_size`` examples per ``recipe.process`` call; an example it
   raises a data error on is a reject of stage ``error``, :meth:`Chunker.process`) → *rows*
   (provenance, validation; an invalid row rejects its example, stage ``row``) → commit
   (diagnostics, images, chunk files, then the manifest with the recipe state; on a writer
   thread, overlapping the next chunk's model calls);
4. **finish** (:mod:`pairforge.engine.summary`): ``rejects.jsonl``, ``dataset/``,
   ``summary.json``, the terminal table.

In every chunk: examples in = examples with pairs + rejected (checked).
"""

from __future__ import annotations

import functools
import itertools
import json
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pairforge import __version__
from pairforge.engine.config import BuildConfig
from pairforge.engine.manifest import (
    JSON_TEXT,
    BuildLock,
    Manifest,
    check_out_folder,
    local_fingerprint,
    open_build,
    run_identity,
    run_settings,
    shard_of,
    write_atomic,
)
from pairforge.errors import BadInput, PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.recipes import load_recipe
from pairforge.recipes.base import BuildContext, Example, Outcome, Recipe, Reject
from pairforge.schema import (features, image_columns, response_text, stable_id, template_hash,
                              validate_row)
from pairforge.sources.sft import Entry, ExampleStream, ReadReject, read_examples, source_bytes

#: Length unit of the per-row diagnostics (as ``pairforge audit``'s default).
DIAGNOSTICS_UNIT = "gpt2"


@functools.lru_cache(maxsize=1)
def diagnostics_unit():
    """The :data:`DIAGNOSTICS_UNIT` length unit, loaded once per process."""
    from pairforge.diagnostics.lengths import length_unit

    return length_unit(DIAGNOSTICS_UNIT)


def build(cfg: BuildConfig, *, command: str = "", console: Any = None,
          progress: bool = True) -> dict:
    """Run (or resume) the build ``cfg`` describes; returns the summary (``summary.json``)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    cfg.check()
    if cfg.executor == "ray":  # same flow; models in Ray actor pools, chunks built on Ray
        from pairforge.engine.ray_executor import RayExecutor

        with RayExecutor(cfg, console=console) as executor:
            return _build(cfg, executor, command=command, console=console, progress=progress)
    return _build(cfg, None, command=command, console=console, progress=progress)


def _build(cfg: BuildConfig, executor: Any, *, command: str, console: Any,
           progress: bool) -> dict:
    """:func:`build` with ``executor`` None (local) or a
    :class:`~pairforge.engine.ray_executor.RayExecutor` (its models and its chunker)."""
    from pairforge.engine.summary import finish, print_summary

    t0 = time.perf_counter()
    out = Path(cfg.out)

    # 1. setup: recipe, models, source, identity, manifest
    recipe = load_recipe(cfg.recipe, cfg.params)
    models, model_rows = configure_models(recipe, cfg.models, load=executor is None)
    if executor is not None:
        models = executor.models(recipe, models)
    reference = ReferenceScorer.configure(cfg.reference, models)
    model_rows += reference.rows if reference else []
    ctx = BuildContext(seed=cfg.seed, models=models)
    recipe.check(ctx)
    stream = read_examples(cfg.source, image_root=cfg.image_root, max_pixels=cfg.max_pixels)
    template_rows = [{"name": k, "sha256": template_hash(v)}
                     for k, v in sorted(recipe.templates().items())]
    settings = run_settings(recipe=recipe.name, params=recipe.params(), models=model_rows,
                            templates=template_rows, seed=cfg.seed, source=stream.spec,
                            limit=cfg.limit, max_pixels=cfg.max_pixels)
    identity = run_identity(settings)
    groups = list(dict.fromkeys((*recipe.groups, "diagnostics",
                                 *(("ref", "model_diagnostics") if reference else ()))))
    diagnostics_unit()  # load the GPT-2 tokenizer now, not inside the first chunk

    check_out_folder(out, overwrite=cfg.overwrite)  # before the lock file is created in it
    with BuildLock(out):
        manifest = open_build(out, identity=identity, settings=settings, shard=cfg.shard,
                              overwrite=cfg.overwrite, fresh=lambda: Manifest.new(
                                  out, identity=identity, settings=settings, shard=cfg.shard,
                                  chunk_size=cfg.chunk_size, recipe=recipe.name, groups=groups,
                                  models=model_rows, prompt_templates=template_rows,
                                  seed=cfg.seed, source=stream.spec,
                                  source_dataset=stream.name))
        if manifest["complete"] and (out / "summary.json").is_file():
            summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
            console.print(f"{out}: this build is already complete (run {identity}); nothing "
                          f"to do")
            print_summary(summary, console)
            return summary
        chunk_size = manifest["chunk_size"]
        if chunk_size != cfg.chunk_size and manifest.chunks:
            console.print(f"note: resuming with the build's chunk size {chunk_size}")
        batch_size = min(cfg.batch_size, chunk_size)  # a batch never spans two chunks
        if batch_size < cfg.batch_size:
            console.print(f"note: batch size {cfg.batch_size} capped at the chunk size "
                          f"{chunk_size} (a new build takes --chunk-size {cfg.batch_size})")
        if manifest["state"] is not None:
            recipe.load_state_dict(manifest["state"])
        manifest.data["sessions"].append({
            "command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": 0.0})
        manifest.save()
        if manifest.chunks:
            console.print(f"resuming run {identity}: {len(manifest.chunks)} chunks "
                          f"({manifest.n_done:,} examples) already committed")

        # 2.-3. select and build chunk by chunk
        t_setup = time.perf_counter()
        if not manifest["exhausted"]:
            chunker = (executor.chunker if executor is not None else Chunker)(
                recipe, ctx, cfg, manifest, out, t0, progress, batch_size)
            chunker.reference = reference
            chunker.run(stream)
        t_chunks = time.perf_counter()
        summary = finish(out, manifest, console=console, wall_s=t_chunks - t0,
                         timing={"setup_s": t_setup - t0, "chunks_s": t_chunks - t_setup})
    print_summary(summary, console)
    return summary


# ----------------------------------------------------------------------------- 1. setup


class Models(Mapping):
    """The build's models by role, for ``BuildContext.models``: required roles are loaded at
    once, optional ones (given, or with a default spec) on first access, so a recipe that
    does not use a role in its configuration (VaPR's LLM editor with ``editor=rule``) never
    loads it. An unconfigured role maps to None."""

    def __init__(self, specs: Mapping[str, Any]):
        self.specs = dict(specs)  # role -> ModelSpec | None
        self.loaded: dict[str, Any] = {}

    def __getitem__(self, role: str) -> Any:
        spec = self.specs[role]
        if spec is None:
            return None
        if role not in self.loaded:
            from pairforge.models.factory import load_model

            model = load_model(spec, role=role)
            if hasattr(model, "progress"):
                model.progress = False  # the build has its own progress bar
            self.loaded[role] = model
        return self.loaded[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def provenance(self) -> list[dict]:
        """``models`` rows of the models loaded so far: the Hub commit a model reports, else
        its spec's revision or local-files fingerprint (:func:`static_revision`)."""
        return [{"role": role, "name": str(self.specs[role]),
                 "revision": str(getattr(m, "revision", "") or "")
                 or static_revision(self.specs[role])}
                for role, m in self.loaded.items()]


def configure_models(recipe: Recipe, given: Mapping[str, str], *,
                     load: bool = True) -> tuple[Models, list[dict]]:
    """The recipe's roles with their specs (given, else the role's default; a required role
    with neither is an error; a given role the recipe lacks too), required ones loaded (unless
    not ``load``: the Ray executor loads them in its actors), and
    the configured models as ``{role, name, revision}`` for the run identity (revisions
    known without loading: :func:`static_revision`)."""
    from pairforge.models.spec import parse_model_spec

    roles = {role: (required, default) for role, required, default in recipe.roles}
    unused = sorted(set(given) - set(roles))
    if unused:
        raise PairforgeError(f"recipe {recipe.name} uses no {unused[0]} model (it uses "
                             f"{', '.join(roles) or 'none'}); drop --{unused[0]}")
    specs: dict[str, Any] = {}
    for role, (required, default) in roles.items():
        spec = given.get(role) or default
        if spec is None and required:
            raise PairforgeError(f"recipe {recipe.name} needs a {role} model; pass "
                                 f"--{role} MODEL (e.g. tiny-vlm, hf:PATH_OR_ID)")
        specs[role] = None if spec is None else parse_model_spec(spec)
    models = Models(specs)
    for role, (required, _) in roles.items():
        if required and load:
            models[role]
    configured = [{"role": r, "name": str(s), "revision": static_revision(s)}
                  for r, s in specs.items() if s is not None]
    return models, configured


def static_revision(spec: Any) -> str:
    """A model's revision known without loading it: the spec's ``@REV``, else a fingerprint
    of its local files (:func:`~pairforge.engine.manifest.local_fingerprint`), else ''."""
    if spec.revision:
        return spec.revision
    path = _local_path(spec)
    if path is not None and path.exists():
        return local_fingerprint(path)
    return ""


def _local_path(spec: Any) -> Path | None:
    """The local file or folder whose contents identify ``spec``'s weights, found without
    loading or converting anything (SmolLM2: its shipped GGUF file, not the converted copy
    in the cache, so a role that is never used never writes to ``~/.cache``)."""
    if spec.backend == "embedded":
        if spec.name == "smollm2":
            from pairforge.models.local import smollm2_gguf

            try:
                return smollm2_gguf()
            except PairforgeError:  # not installed: loading it would fail with this message
                return None
        from pairforge.world.models import TINY_CLIP_PATH, TINY_VLM_PATH

        return {"tiny-vlm": TINY_VLM_PATH, "tiny-clip": TINY_CLIP_PATH}.get(spec.name)
    if spec.backend in ("hf", "clip"):
        return Path(spec.name).expanduser()
    return None


# ----------------------------------------------------------------------------- 2. select


def select(entries: Iterable[Entry], *, limit: int | None, shard: tuple[int, int] | None,
           seen: Counter) -> Iterator[Entry]:
    """The build's entries: the first ``limit`` of the source, those of ``shard``; counts
    ``seen["source"]`` (up to the limit) and ``seen["other_shards"]``."""
    for entry in itertools.islice(entries, limit):
        seen["source"] += 1
        if shard is not None and shard_of(entry.id, shard[1]) != shard[0]:
            seen["other_shards"] += 1
            continue
        yield entry


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


# ----------------------------------------------------------------------------- 3. chunks


class ReferenceScorer:
    """``--reference``: scores each chunk's pairs under the reference model (and under the
    recipe's policy when it is another model, for IPS) with the model audit's scoring code
    (:func:`pairforge.diagnostics.model_based.reference_columns`). Models are loaded with
    batch size 1 (one prompt with its chosen and rejected per forward pass), so a pair's
    numbers do not depend on which chunk or shard it lands in."""

    def __init__(self, reference: Any, policy: Any, rows: list[dict]):
        self.reference_spec, self.policy_spec, self.rows = reference, policy, rows
        self._models: dict[str, Any] = {}

    @classmethod
    def configure(cls, spec: str | None, models: Models) -> ReferenceScorer | None:
        from pairforge.models.spec import parse_model_spec

        if not spec:
            return None
        ref = parse_model_spec(spec)
        if ref.backend in ("clip", "open_clip") or ref.name == "tiny-clip":
            raise PairforgeError(f"--reference {spec}: a CLIP scorer gives no log-probs; use a "
                                 f"language model (tiny-vlm, smollm2, hf:PATH_OR_ID)")
        policy = models.specs.get("policy")
        rows = [{"role": "reference", "name": str(ref), "revision": static_revision(ref)}]
        return cls(ref, policy, rows)

    def model(self, spec: Any) -> Any:
        from pairforge.models import Capability, load_model, require

        key = str(spec)
        if key not in self._models:
            kw: dict[str, Any] = {"progress": False}  # the build has its own progress bar
            if spec.backend in ("hf", "embedded", "vllm"):
                kw["batch_size"] = 1
            model = load_model(spec, role="scorer", **kw)
            require(model, Capability.SCORE, purpose=f"--reference {spec} (log π(y|x) per pair)")
            self._models[key] = model
        return self._models[key]

    def add_columns(self, rows: list[dict]) -> None:
        from pairforge.diagnostics.model_based import reference_columns

        if not rows:
            return
        ref = self.model(self.reference_spec)
        policy = None
        if self.policy_spec is not None:
            policy = ref if str(self.policy_spec) == str(self.reference_spec) else self.model(self.policy_spec)
        for key, values in reference_columns(ref, rows, policy).items():
            for r, v in zip(rows, values):
                r[key] = v


class Chunker:
    """Builds and commits the chunks of one run (see the module docstring, step 3)."""

    reference: ReferenceScorer | None = None

    def __init__(self, recipe: Recipe, ctx: BuildContext, cfg: BuildConfig, manifest: Manifest,
                 out: Path, t0: float, progress: bool, batch_size: int):
        self.recipe, self.ctx, self.cfg, self.manifest, self.out = recipe, ctx, cfg, manifest, out
        self.t0, self.progress, self.batch_size = t0, progress, batch_size
        self.features = features(*manifest["groups"])
        self.schema = self.features.arrow_schema
        self.image_columns = list(image_columns(self.features).items())
        self.unit = diagnostics_unit()
        self.provenance = {"prompt_templates": manifest["prompt_templates"],
                           "seed": manifest["seed"], "pairforge_version": __version__}

    def run(self, stream: ExampleStream) -> None:
        from tqdm.auto import tqdm

        m, chunk_size = self.manifest, self.manifest["chunk_size"]
        seen: Counter = Counter()
        entries = select(stream.entries(), limit=self.cfg.limit, shard=self.cfg.shard, seen=seen)
        todo = itertools.islice(entries, m.n_done, None)  # committed examples: skipped unread
        index, pairs, rejected = len(m.chunks), 0, 0
        # chunk k is written (images encoded, files, manifest) by one writer thread while the
        # recipe works on chunk k+1; commits stay in order, at most one is in flight
        with tqdm(total=self._estimate(stream), initial=m.n_done, unit="ex", dynamic_ncols=True,
                  desc=f"build {self.recipe.name}", disable=not self.progress or None,
                  smoothing=0.1) as bar, ThreadPoolExecutor(1, "pairforge-commit") as writer:
            pending: Future | None = None
            for record, rows, rejects in self.built(index, batched(todo, chunk_size)):
                if self.reference is not None:
                    self.reference.add_columns(rows)
                state = self.state()  # after this chunk, before the next one changes it
                if pending is not None:
                    pending.result()  # raises the writer's error, if any
                pending = writer.submit(self.commit, record, rows, rejects, state)
                index, pairs, rejected = index + 1, pairs + len(rows), rejected + len(rejects)
                bar.update(record["n_in"])
                bar.set_postfix(pairs=pairs, rejected=rejected, refresh=False)
            if pending is not None:
                pending.result()
        if m.n_done != seen["source"] - seen["other_shards"]:
            raise PairforgeError(f"{self.out}: {m.n_done} examples are committed but the source "
                                 f"now has {seen['source'] - seen['other_shards']} for this "
                                 f"build; it changed since the build started, pass --overwrite")
        m.data["exhausted"] = True
        m.data["source_entries"] = seen["source"]
        m.save()

    def _estimate(self, stream: ExampleStream) -> int | None:
        total = stream.estimate
        if total is None:
            return None
        if self.cfg.limit is not None:
            total = min(total, self.cfg.limit)
        if self.cfg.shard is not None:
            total = -(-total // self.cfg.shard[1])  # about this shard's share
        return total

    # -- one chunk: read → recipe → rows

    def built(self, index: int, chunks: Iterable[list[Entry]]
              ) -> Iterator[tuple[dict, list[dict], list[dict]]]:
        """:meth:`build_chunk` of each chunk in order, numbered from ``index`` (the Ray executor
        builds them on a cluster and yields them in the same order)."""
        for k, chunk in enumerate(chunks, start=index):
            yield self.build_chunk(k, chunk)

    def build_chunk(self, index: int,
                    entries: Sequence[Entry]) -> tuple[dict, list[dict], list[dict]]:
        """(manifest record, rows, rejects) of one chunk, in source order."""
        return self.build_items(index, [e.load() for e in entries])          # read

    def build_items(self, index: int, items: Sequence[Example | ReadReject]
                    ) -> tuple[dict, list[dict], list[dict]]:
        """(manifest record, rows, rejects) of one chunk's read ``items``: recipe, rows."""
        examples = [x for x in items if isinstance(x, Example)]
        outcomes = self.process(index, examples)                             # recipe
        by_id = dict(zip((ex.id for ex in examples), outcomes))
        rows: list[dict] = []
        rejects: list[dict] = []
        stats: Counter = Counter()
        counts: Counter = Counter()
        for item in items:
            if isinstance(item, ReadReject):
                counts["read_dropped"] += 1
                rejects.append(item.record())
                continue
            outcome = by_id[item.id]
            stats.update(outcome.stats)
            if outcome.reject is not None:
                counts["recipe_dropped"] += 1
                rejects.append(_reject(item, outcome.reject.stage, outcome.reject.reason))
                continue
            try:                                                             # rows
                made = [self.finish_row(r, item) for r in outcome.rows]
                if len({r["id"] for r in made}) < len(made):
                    raise PairforgeError(f"recipe {self.recipe.name} made rows with the same id "
                                         f"for example {item.id}; give each row its own id")
            except BadInput as e:
                counts["row_dropped"] += 1
                rejects.append(_reject(item, "row", f"recipe {self.recipe.name} made an "
                                                    f"invalid row: {e.one_line()}"))
                continue
            counts["with_pairs"] += 1
            rows.extend(made)
        n_in, with_pairs, n_rejected = len(items), counts["with_pairs"], len(rejects)
        if n_in != with_pairs + n_rejected:
            raise RuntimeError(f"chunk {index}: {n_in} examples in, {with_pairs} with pairs + "
                               f"{n_rejected} rejected; this is a pairforge bug")
        record = {"index": index, "data": f"data/chunk-{index:05d}.parquet",
                  "rejects": f"rejects/chunk-{index:05d}.jsonl", "n_in": n_in,
                  "n_with_pairs": with_pairs, "n_rejected": n_rejected, "n_rows": len(rows),
                  "steps": {"read": {"in": n_in, "dropped": counts["read_dropped"]},
                            "recipe": {"in": len(examples), "dropped": counts["recipe_dropped"]},
                            "row": {"in": len(examples) - counts["recipe_dropped"],
                                    "dropped": counts["row_dropped"]}},
                  "stats": {k: float(v) for k, v in sorted(stats.items())}}
        return record, rows, rejects

    def process(self, index: int, examples: list[Example]) -> list[Outcome]:
        """``recipe.process`` on ``batch_size`` examples at a time. A batch that raises one of
        :data:`EXAMPLE_ERRORS` is redone example by example from the recipe state before it
        (:meth:`_one_by_one`), so an example that fails alone becomes a reject of stage
        ``error`` and the run goes on; any other crash, or one on every example of the chunk,
        stops the build with a one-line error (traceback in ``error.log``), committed chunks
        kept."""
        outcomes: list[Outcome] = []
        for batch in batched(examples, self.batch_size):
            before = self.state()
            try:
                got = self.recipe.process(batch, self.ctx)
            except PairforgeError:
                raise
            except EXAMPLE_ERRORS as e:
                self.recipe.load_state_dict(before)
                got = self._one_by_one(index, batch, e)
            except Exception as e:  # noqa: BLE001 - a recipe bug: report it, keep committed work
                raise self.recipe_failed(index, batch, e, traceback.format_exc()) from e
            self._check_outcomes(got, batch)
            outcomes.extend(got)
        if len(examples) > 1 and all(o.stats.get(_FAILED) for o in outcomes):
            raise PairforgeError(
                f"recipe {self.recipe.name} failed on every example of chunk {index} "
                f"({outcomes[0].reject.reason}); this looks like a bug or a broken setup, not "
                f"bad rows; {index} chunk(s) are committed, fix the cause and rerun the same "
                f"command to resume")
        return outcomes

    def _one_by_one(self, index: int, batch: list[Example], error: Exception) -> list[Outcome]:
        """The outcomes of a failed batch, one example at a time; an example that raises again
        is a reject whose reason names the error's type and first line (no addresses)."""
        if len(batch) == 1:
            return [_error_outcome(self.recipe.name, error)]
        out: list[Outcome] = []
        for ex in batch:
            before = self.state()
            try:
                got = self.recipe.process([ex], self.ctx)
            except PairforgeError:
                raise
            except EXAMPLE_ERRORS as e:
                self.recipe.load_state_dict(before)
                got = [_error_outcome(self.recipe.name, e)]
            except Exception as e:  # noqa: BLE001
                raise self.recipe_failed(index, [ex], e, traceback.format_exc()) from e
            self._check_outcomes(got, [ex])
            out.extend(got)
        return out

    def _check_outcomes(self, got: Any, batch: list[Example]) -> None:
        if len(got) != len(batch) or not all(isinstance(o, Outcome) for o in got):
            raise PairforgeError(f"recipe {self.recipe.name} returned {len(got)} outcomes "
                                 f"for {len(batch)} examples; it must return one Outcome "
                                 f"per example, in order")

    def recipe_failed(self, index: int, batch: Sequence[Example], error: Exception,
                      trace: str) -> PairforgeError:
        """The one-line error of a recipe crash; the traceback goes to ``error.log``."""
        log = self.out / "error.log"
        log.write_text(trace, encoding="utf-8", errors="backslashreplace")
        return PairforgeError(
            f"recipe {self.recipe.name} failed in chunk {index} on examples "
            f"{batch[0].id}..{batch[-1].id} ({type(error).__name__}: {_first_line(error)}); "
            f"{index} chunk(s) are committed, the traceback is in {log}; "
            f"fix the cause and rerun the same command to resume")

    def finish_row(self, row: Mapping[str, Any], ex: Example) -> dict:
        """A recipe row with provenance filled in and checked; BadInput when invalid."""
        out = dict(row)
        undeclared = sorted(set(out) - set(self.features))
        if undeclared:
            raise PairforgeError(f"recipe {self.recipe.name} wrote column {undeclared[0]!r}, "
                                 f"which is in none of its groups {self.manifest['groups']}; "
                                 f"add the group to the recipe's `groups`")
        # unique across the build whatever the recipe chose: example ids are unique
        out["id"] = stable_id(ex.source_dataset, ex.id, out.get("id"))
        out["recipe"] = self.recipe.name
        if not out.get("task") or out["task"] == "unknown":
            out["task"] = ex.task or "unknown"
        out["source_dataset"] = out.get("source_dataset") or ex.source_dataset
        out["source_id"] = out.get("source_id") or ex.source_id
        if not out.get("source_meta"):
            out["source_meta"] = meta_pairs(ex.meta)
        # the engine knows which models ran; extra entries a recipe adds (ASPO's annotators) stay
        used = self.ctx.models.provenance()
        roles = {m["role"] for m in used}
        out.update(self.provenance, models=used + [m for m in out.get("models") or ()
                                                   if m.get("role") not in roles])
        validate_row(out, where=f"example {ex.id}")
        return out

    def add_diagnostics(self, rows: list[dict]) -> None:
        """The ``diagnostics`` columns of each row (the audit's per-pair text metrics)."""
        from pairforge.diagnostics.text import pair_metrics

        if not rows:
            return
        m = pair_metrics([response_text(r["chosen"]) for r in rows],
                         [response_text(r["rejected"]) for r in rows], self.unit, threads=1)
        for key in ("lev_words", "lev_norm", "len_chosen", "len_rejected", "len_gap",
                    "len_ratio", "is_identical", "is_near_duplicate"):
            for r, v in zip(rows, m[key].tolist()):
                r[key] = v
        for r in rows:
            r["length_unit"] = self.unit.name

    # -- commit

    def state(self) -> dict:
        """A JSON copy of the recipe's ``state_dict()``."""
        try:
            return json.loads(json.dumps(self.recipe.state_dict()))
        except (TypeError, ValueError) as e:
            raise PairforgeError(f"recipe {self.recipe.name}: state_dict() is not JSON-"
                                 f"serialisable ({e}); return plain lists, dicts, numbers "
                                 f"and strings") from None

    def encode_images(self, rows: list[dict]) -> bool:
        """PIL images of ``rows`` → ``{"bytes", "path"}`` in place (:class:`_ImageEncoder`);
        True when some image is given by path only. Idempotent (encoded values stay)."""
        encode = _ImageEncoder()
        for r in rows:
            for col, is_list in self.image_columns:
                if r.get(col) is not None:
                    r[col] = [encode(v) for v in r[col]] if is_list else encode(r[col])
        return encode.by_path

    def commit(self, record: dict, rows: list[dict], rejects: list[dict], state: dict) -> None:
        """Chunk files first (atomic each), then the manifest with the recipe state after the
        chunk: a chunk is there or not."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets.table import embed_table_storage

        self.add_diagnostics(rows)
        by_path = self.encode_images(rows)
        columns = self.features.encode_batch({k: [r.get(k) for r in rows] for k in self.features})
        # the schema carries the HF features (metadata), so datasets reads the types back
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if by_path:  # a recipe gave an image by path: embed its bytes
            table = embed_table_storage(table)
        write_atomic(self.out / record["data"], lambda f: pq.write_table(table, f))
        write_atomic(self.out / record["rejects"], "".join(
            json.dumps(x, ensure_ascii=False) + "\n" for x in rejects).encode(*JSON_TEXT))
        self.manifest.commit_chunk(record, state, time.perf_counter() - self.t0)


# ----------------------------------------------------------------------------- helpers


#: Errors of a recipe on one example's data (a degenerate image, a value out of range): they
#: make that example a reject of stage ``error``. Other exceptions stop the build.
EXAMPLE_ERRORS = (ArithmeticError, ValueError, IndexError, KeyError)
_FAILED = "examples_failed"


def _error_outcome(recipe: str, e: BaseException) -> Outcome:
    """The reject of an example the recipe raised on: the error's type and first line
    (:func:`~pairforge.errors.first_line`: no object addresses, the same in every run)."""
    return Outcome(reject=Reject("error", f"recipe {recipe} failed on this example "
                                          f"({type(e).__name__}: {_first_line(e)})"),
                   stats={_FAILED: 1})


def _reject(ex: Example, stage: str, reason: str) -> dict:
    return {"id": ex.id, "source_id": ex.source_id, "stage": stage, "reason": reason}


def meta_pairs(meta: Mapping[str, Any]) -> list[dict]:
    """``Example.meta`` as ``source_meta`` key/value strings (structures as compact JSON)."""
    def text(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)

    return [{"key": str(k), "value": text(v)} for k, v in meta.items()]


class _ImageEncoder:
    """PIL images → ``{"bytes", "path"}``: the source's own bytes when the image came from a
    file (:func:`~pairforge.sources.sft.source_bytes`), else PNG; each image encoded once."""

    def __init__(self):
        self.done: dict[int, tuple[Any, dict]] = {}  # id → (image kept alive, encoding)
        self.by_path = False  # some image is a path (or a struct without bytes)

    def __call__(self, value: Any) -> Any:
        from PIL import Image as PILImage

        from pairforge.world.dataset import png_bytes

        if not isinstance(value, PILImage.Image):
            if isinstance(value, str) or (isinstance(value, Mapping) and not value.get("bytes")):
                self.by_path = True
            return value
        key = id(value)
        if key not in self.done:
            self.done[key] = (value, source_bytes(value) or png_bytes(value))
        return self.done[key][1]
