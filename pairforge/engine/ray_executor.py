"""``pairforge build --executor ray``: the same build on a Ray cluster.

What runs where (the flow of :mod:`pairforge.engine.engine` is unchanged):

- **driver** (the ``pairforge build`` process): setup, run identity, manifest, selection of
  the examples and their cut into chunks, exactly as locally; it never loads a model. Chunks
  come back from the cluster in any order and are committed in source order by the same
  writer (:meth:`~pairforge.engine.engine.Chunker.commit`), so the build folder (chunk files,
  ``manifest.json``, ``rejects.jsonl``, ``summary.json``, ``dataset/``) is the local one;
- **model roles** (policy, clip, editor, judge): one pool of :class:`RoleServer` actors per
  configured role, each loading its model once (on first use) with the role's ``num_cpus``,
  ``num_gpus`` and ``pool`` size. A vLLM policy is one engine per actor: give the role
  ``num_gpus`` = the spec's tensor-parallel size;
- **recipe stage**: :class:`ChunkWorker` actors run the unchanged recipe on whole chunks
  (read → ``recipe.process`` in ``batch_size`` batches → rows, images encoded), with
  ``ctx.models`` mapping each role to a :class:`RemoteModel` that forwards the models-protocol
  calls to the role's pool. Stateless recipes (``state_dict()`` empty: M3PO, P2-DPO, ASPO)
  run as a Ray Data ``map_batches`` stage over an actor pool, many chunks at once;
- **cross-example state** (VaPR's penalty lists, CW-DPO's dataset-negative pools): the
  recipe's state after chunk k is an input of chunk k+1, so these recipes run their chunks
  one after the other, in source order, the driver passing each chunk the state the previous
  one left (the state the manifest records). Rows are then those of a local build, exactly;
  the cluster speeds such builds up only inside a chunk (the model pools serve its batches).

Guarantees, as locally: a chunk is committed whole or not at all and in order; a killed
recipe or role actor is restarted by Ray and its call retried with the same inputs (chunks
are pure functions of their examples, the state and the seed), so no row is lost or doubled;
a killed driver leaves its committed chunks and the same command resumes from the manifest.

Settings (``ray:`` in the YAML config; ``--ray-address`` on the command line)::

    executor: ray
    ray:
      address: auto             # default: a local Ray instance
      num_cpus: 2               # CPUs of a local instance (default: all)
      stage: {pool: 4, num_cpus: 0.25}   # recipe-stage actors
      window: 64                # chunks per Ray Data dataset (bounds driver memory)
      roles:
        policy: {pool: 4, tp: 2, num_cpus: 2}  # vllm: policy: 4 engines over 2 GPUs each
        # split: true cuts each generate/score/cosine call over the pool (VaPR, CW-DPO)
        clip: {pool: 2, num_gpus: 0.25}

Defaults fit a 2-core machine (every actor asks for a fraction of a CPU, so the recipe stage
and the model pools can always be placed together).
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairforge.engine.config import BuildConfig
from pairforge.engine.engine import Chunker, Models
from pairforge.engine.manifest import Manifest
from pairforge.errors import PairforgeError
from pairforge.errors import first_line as _first_line

#: The extra that installs Ray (pyproject ``[project.optional-dependencies] ray``).
INSTALL = "pip install 'pairforge[ray]'"


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Pool:
    """Resources of one actor pool: ``size`` actors of ``num_cpus`` / ``num_gpus`` each;
    ``threads``: torch intra-op threads of a model actor (default: Ray's, one per whole CPU
    asked for). Float sums on CPU depend on the thread count: for rows bit-identical to a
    local build, give the local process's count (``torch.get_num_threads()``)."""

    size: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    threads: int | None = None
    #: vLLM roles: ``tensor_parallel_size`` of each actor's engine (its ``num_gpus``)
    tp: int | None = None
    #: cut each per-item call (:data:`SPLIT`) into one part per actor: a pool then speeds up
    #: a recipe that has one call in flight (VaPR, CW-DPO), but the model sees other batches
    #: than locally, so floats (and rarely a sampled token) may differ from a local build
    split: bool = False


@dataclass(frozen=True)
class RayOptions:
    """The ``ray:`` settings (module docstring); :meth:`parse` checks them."""

    address: str | None = None
    num_cpus: int | None = None
    stage: Pool = Pool(size=2, num_cpus=0.25)
    window: int = 64
    roles: dict[str, Pool] = field(default_factory=dict)

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> RayOptions:
        from pairforge.engine.config import MODEL_ROLES

        def bad(key: str, why: str) -> PairforgeError:
            return PairforgeError(f"ray: {key}: {why} (see `ray:` in "
                                  f"pairforge.engine.ray_executor)")

        known = {"address", "num_cpus", "stage", "window", "roles"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise bad(unknown[0], f"unknown setting; use {', '.join(sorted(known))}")

        def pool(where: str, v: Any, default: Pool) -> Pool:
            if v is None:
                return default
            if not isinstance(v, Mapping):
                raise bad(where, f"expected a mapping like {{pool: 2, num_cpus: 0.5, "
                                 f"num_gpus: 1}}, got {v!r}")
            keys = {"pool", "num_cpus", "num_gpus", "threads", "tp", "split"}
            extra = sorted(set(v) - keys)
            if extra:
                raise bad(f"{where}.{extra[0]}", "unknown key; use pool, num_cpus, num_gpus, "
                                                 "threads, tp, split")
            split = v.get("split", False)
            if not isinstance(split, bool):
                raise bad(f"{where}.split", f"{split!r}: must be true or false")
            threads, tp = v.get("threads"), v.get("tp")
            for name, x in (("threads", threads), ("tp", tp)):
                if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 1):
                    raise bad(f"{where}.{name}", f"{x!r}: must be an integer >= 1")
            size = v.get("pool", default.size)
            cpus, gpus = v.get("num_cpus", default.num_cpus), v.get("num_gpus", default.num_gpus)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise bad(f"{where}.pool", f"{size!r}: must be an integer >= 1")
            for name, x in (("num_cpus", cpus), ("num_gpus", gpus)):
                if not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0:
                    raise bad(f"{where}.{name}", f"{x!r}: must be a number >= 0")
            if tp and "num_gpus" not in v:
                gpus = tp  # one vLLM engine over tp GPUs per actor
            return Pool(size, float(cpus), float(gpus), threads, tp, split)

        roles_in = values.get("roles") or {}
        if not isinstance(roles_in, Mapping):
            raise bad("roles", f"expected a mapping of role: pool, got {roles_in!r}")
        for role in roles_in:
            if role not in MODEL_ROLES:
                raise bad(f"roles.{role}", f"not a model role; use {', '.join(MODEL_ROLES)}")
        window = values.get("window", 64)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise bad("window", f"{window!r}: must be an integer >= 1")
        n = values.get("num_cpus")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise bad("num_cpus", f"{n!r}: must be an integer >= 1")
        address = values.get("address")
        return cls(address=str(address) if address else None, num_cpus=n,
                   stage=pool("stage", values.get("stage"), cls.stage), window=window,
                   roles={r: pool(f"roles.{r}", v, Pool()) for r, v in roles_in.items()})


#: Ray's switch for the node address on Linux: "0" keeps a local instance on 127.0.0.1 (by
#: default Ray advertises the machine's network address, which a one-machine build does not need)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(local: bool = False) -> Any:
    """``ray``, or a one-line error naming the extra to install. ``local``: this process will
    start a local instance, bound to the loopback address unless the user set
    :data:`LOOPBACK_ENV` (it only takes effect before Ray is first imported)."""
    if local:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise PairforgeError(f"--executor ray needs Ray, which is not installed; {INSTALL} "
                             f"(or build with --executor local)") from None
    return ray


# ----------------------------------------------------------------------------- model roles


class RoleServer:
    """A Ray actor holding one model of a role, loaded on first use; ``call`` runs a
    models-protocol method (``generate``, ``score``, ``cosine`` ...) on it."""

    def __init__(self, role: str, spec: Any, threads: int | None = None,
                 load_kw: Mapping[str, Any] | None = None):
        self.role, self.spec, self._model = role, spec, None
        self.load_kw = dict(load_kw or {})
        if threads:
            import torch

            torch.set_num_threads(threads)

    @property
    def model(self) -> Any:
        if self._model is None:
            from pairforge.models.factory import load_model

            model = load_model(self.spec, role=self.role, **self.load_kw)
            if hasattr(model, "progress"):
                model.progress = False  # the driver shows the build's progress
            self._model = model
        return self._model

    def info(self) -> dict:
        """The model's public plain attributes (name, revision, capabilities ...), its
        method names, and this actor's process id."""
        attrs: dict[str, Any] = {}
        methods: list[str] = []
        for name in dir(self.model):
            if name.startswith("_"):
                continue
            try:
                value = getattr(self.model, name)
            except Exception:  # noqa: BLE001 - a property that fails is not offered
                continue
            if callable(value):
                methods.append(name)
                continue
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - tensors, tokenizers ... stay on the actor
                continue
            attrs[name] = value
        return {"attrs": attrs, "methods": methods, "pid": os.getpid()}

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.model, method)(*args, **kwargs)


#: Protocol methods whose leading positional arguments are per-item lists and whose result is
#: one entry per item (seeds are per request): with the role's ``split``, a pool of several
#: actors shares each such call, in contiguous parts.
SPLIT = {"generate": 1, "score": 2, "cosine": 2}


class RemoteModel:
    """A model of a role's actor pool, as the recipe sees it: the model's plain attributes,
    and its methods forwarded whole to the pool's actors in turn (the batches a local build
    makes); with ``split``, a :data:`SPLIT` call is cut into one contiguous part per actor,
    run at once, joined in order."""

    def __init__(self, role: str, actors: list, info: Mapping[str, Any], split: bool = False):
        self._role, self._actors, self._split = role, list(actors), split
        self._turn = random.Random(os.getpid()).randrange(len(self._actors))
        self.__dict__.update(info["attrs"])

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        k = SPLIT.get(method, 0) if self._split else 0
        n = len(args[0]) if k and len(args) >= k and isinstance(args[0], (list, tuple)) else 0
        parts = min(len(self._actors), n)
        if parts < 2 or any(len(a) != n for a in args[1:k]):
            actor = self._actors[self._turn % len(self._actors)]
            self._turn += 1
            return ray.get(actor.call.remote(method, args, kwargs))
        bounds = [n * i // parts for i in range(parts + 1)]
        refs = []
        for i in range(parts):
            lo, hi = bounds[i], bounds[i + 1]
            part = tuple(list(a[lo:hi]) for a in args[:k]) + args[k:]
            refs.append(self._actors[(self._turn + i) % len(self._actors)].call.remote(
                method, part, kwargs))
        self._turn += parts
        return [x for got in ray.get(refs) for x in got]

    def __repr__(self) -> str:
        return f"RemoteModel({self._role}: {self.__dict__.get('name', '?')})"


def remote_model(role: str, actors: list, spec: Any, split: bool = False) -> RemoteModel:
    """A :class:`RemoteModel` of the pool ``actors`` with the model's methods as real methods
    (so ``isinstance`` checks against the models protocols hold, on every Python)."""
    import ray

    try:
        info = ray.get(actors[0].info.remote())
    except PairforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - an actor that could not load its model
        raise PairforgeError(f"{role} model {spec}: could not be loaded on Ray "
                             f"({type(e).__name__}: {_first_line(e)})") from None

    def forward(name: str) -> Any:
        def method(self: RemoteModel, *args: Any, **kwargs: Any) -> Any:
            return self._call(name, *args, **kwargs)
        method.__name__ = name
        return method

    cls = type(f"Remote_{role}", (RemoteModel,), {m: forward(m) for m in info["methods"]})
    return cls(role, actors, info, split)


class RemoteModels(Models):
    """``ctx.models`` on Ray: a role maps to a :class:`RemoteModel` of its pool, made on first
    access (like the local lazy loading, so provenance names the roles the recipe used)."""

    def __init__(self, specs: Mapping[str, Any], pools: Mapping[str, list],
                 split: Iterable[str] = ()):
        super().__init__(specs)
        self.pools, self.split = dict(pools), set(split)

    def __getitem__(self, role: str) -> Any:
        spec = self.specs[role]
        if spec is None:
            return None
        if role not in self.loaded:
            self.loaded[role] = remote_model(role, self.pools[role], spec, role in self.split)
        return self.loaded[role]


# ----------------------------------------------------------------------------- recipe stage


class _WorkerChunker(Chunker):
    """The engine's chunk builder inside a Ray actor: a recipe crash comes back as an error
    with its traceback (the driver writes ``error.log``) instead of a file on this node."""

    def recipe_failed(self, index: int, batch: list, error: Exception,
                      trace: str) -> PairforgeError:
        e = PairforgeError(f"recipe {self.recipe.name} failed in chunk {index} on examples "
                           f"{batch[0].id}..{batch[-1].id} ({type(error).__name__}: "
                           f"{_first_line(error)})")
        e.trace = trace  # type: ignore[attr-defined]
        return e


class ChunkWorker:
    """The recipe stage: builds whole chunks with the unchanged recipe (a Ray actor, or the
    callable class of a Ray Data ``map_batches`` stage)."""

    def __init__(self, job: Mapping[str, Any]):
        from pairforge.engine.engine import BuildContext
        from pairforge.recipes import load_recipe

        cfg: BuildConfig = job["cfg"]
        recipe = load_recipe(cfg.recipe, cfg.params)
        models = RemoteModels(job["specs"], job["pools"], job["split"])
        for role, required, _ in recipe.roles:  # as configure_models: required ones at once
            if required:
                models[role]
        ctx = BuildContext(seed=cfg.seed, models=models)
        manifest = Manifest(Path(job["out"]), job["manifest"])
        self.chunker = _WorkerChunker(recipe, ctx, cfg, manifest, Path(job["out"]), 0.0, False,
                                      job["batch_size"])

    def run(self, index: int, entries: list, state: dict | None) -> dict:
        """Chunk ``index`` of ``entries`` (read here, so images keep their source bytes):
        ``{index, record, rows, rejects, state}`` with the rows' images encoded, or
        ``{index, error, trace}``. ``state``: the recipe state before the chunk (stateful
        recipes), returned after it."""
        ch = self.chunker
        try:
            if state is not None:
                ch.recipe.load_state_dict(state)
            record, rows, rejects = ch.build_chunk(index, entries)
            ch.encode_images(rows)  # here, where the images keep their source bytes
            return {"index": index, "record": record, "rows": rows, "rejects": rejects,
                    "state": ch.state() if state is not None else None}
        except PairforgeError as e:
            return {"index": index, "error": str(e), "trace": getattr(e, "trace", None)}
        except Exception as e:  # noqa: BLE001 - a pairforge bug: carried to the driver
            return {"index": index, "error": f"chunk {index} failed on Ray ({type(e).__name__}: "
                                             f"{_first_line(e)}); this is a pairforge bug",
                    "trace": traceback.format_exc()}

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        """Ray Data: ``{index, entries}`` (pickled chunks) → ``{index, result}`` (pickled)."""
        from ray import cloudpickle  # Ray's own copy: no extra dependency
        import numpy as np

        results = [cloudpickle.dumps(self.run(int(k), cloudpickle.loads(p), None))
                   for k, p in zip(batch["index"], batch["entries"])]
        return {"index": np.asarray(batch["index"]), "result": np.asarray(results, dtype=object)}


# ----------------------------------------------------------------------------- driver


class RayExecutor:
    """The Ray side of one ``pairforge build``: joins (or starts) Ray, owns the role pools,
    and gives the engine its models (:meth:`models`) and chunk builder (:attr:`chunker`)."""

    def __init__(self, cfg: BuildConfig, console: Any = None):
        self.cfg, self.console = cfg, console
        self.options = RayOptions.parse(cfg.ray or {})
        self.pools: dict[str, list] = {}
        self.specs: dict[str, Any] = {}
        self._started = False

    def __enter__(self) -> RayExecutor:
        ray = import_ray(local=self.options.address is None)
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": self.options.address, "include_dashboard": False,
                                  "log_to_driver": False}
            if self.options.address is None and self.options.num_cpus:
                kw["num_cpus"] = self.options.num_cpus
            try:
                ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.options.address or "a local instance"
                raise PairforgeError(f"--ray-address {where}: could not start or join Ray "
                                     f"({_first_line(e)}); check the address, or leave it out "
                                     f"for a local instance") from None
            self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the build has its own
        ctx.execution_options.preserve_order = False  # the driver orders the chunks itself
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for actors in self.pools.values():
            for a in actors:
                ray.kill(a)
        self.pools = {}
        if self._started:
            ray.shutdown()

    def models(self, recipe: Any, local: Models) -> RemoteModels:
        """One pool per configured role (models load on first use), the required roles
        reached at once (their models load now, so a bad spec fails before any chunk)."""
        import ray

        self.specs = dict(local.specs)
        self.check_resources(ray.cluster_resources())
        server = ray.remote(RoleServer)
        for role, spec in self.specs.items():
            if spec is None:
                continue
            pool = self.options.roles.get(role, Pool())
            load_kw = {}
            if pool.tp:
                if spec.backend != "vllm":
                    raise PairforgeError(f"ray: roles.{role}.tp: tensor parallelism is for vllm: "
                                         f"models, and {role} is {spec}; drop tp")
                load_kw["tensor_parallel_size"] = pool.tp
            self.pools[role] = [server.options(
                num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=-1,
                max_task_retries=-1, name=f"pairforge-{role}-{i}-{os.getpid()}-{id(self):x}",
            ).remote(role, spec, pool.threads, load_kw) for i in range(pool.size)]
        models = RemoteModels(self.specs, self.pools)
        for role, required, _ in recipe.roles:
            if required:
                models[role]
        if self.console is not None:
            res = ray.cluster_resources()
            pools = ", ".join(f"{r} {len(a)}" for r, a in self.pools.items())
            self.console.print(f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
                               f"model actors: {pools or 'none'}")
        return models

    def check_resources(self, cluster: Mapping[str, float]) -> None:
        """Refuse settings the cluster cannot place all at once (the model pools and the
        recipe stage run together; Ray would wait for the missing CPUs or GPUs forever)."""
        o = self.options
        pools = [o.roles.get(r, Pool()) for r, spec in self.specs.items() if spec is not None]
        pools.append(o.stage)
        for kind, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
            need = sum(p.size * getattr(p, key) for p in pools)
            have = float(cluster.get(kind, 0.0))
            if need > have + 1e-9:
                raise PairforgeError(
                    f"ray: the model pools and the recipe stage ask for {need:g} {kind}s at "
                    f"once, the cluster has {have:g}; lower {key} or pool under ray: roles / "
                    f"stage, or add nodes")

    @property
    def chunker(self) -> Any:
        return functools.partial(RayChunker, executor=self)


class RayChunker(Chunker):
    """:class:`~pairforge.engine.engine.Chunker` whose chunks are built on Ray; selection,
    ordering, commit and manifest stay on the driver."""

    def __init__(self, *args: Any, executor: RayExecutor, **kw: Any):
        super().__init__(*args, **kw)
        self.executor = executor
        self.stateful = bool(self.recipe.state_dict())
        if self.stateful and executor.console is not None:
            executor.console.print(f"ray: {self.recipe.name} keeps cross-example state, so its "
                                   f"chunks are built one after the other, in source order")

    def job(self) -> dict:
        data = {k: v for k, v in self.manifest.data.items() if k not in ("chunks", "state")}
        split = [r for r, p in self.executor.options.roles.items() if p.split]
        return {"cfg": self.cfg, "specs": self.executor.specs, "pools": self.executor.pools,
                "split": split,
                "out": str(self.out), "manifest": {**data, "chunks": [], "state": None},
                "batch_size": self.batch_size}

    def built(self, index: int, chunks: Iterable[list]
              ) -> Iterator[tuple[dict, list[dict], list[dict]]]:
        try:
            if self.stateful:
                yield from self._in_sequence(index, chunks)
            else:
                yield from self._in_parallel(index, chunks)
        except PairforgeError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray's own failures: one line, work kept
            raise PairforgeError(f"the Ray build stopped ({type(e).__name__}: "
                                 f"{_first_line(e)}); {len(self.manifest.chunks)} chunk(s) are "
                                 f"committed; fix the cause and rerun the same command to "
                                 f"resume") from None

    def _in_parallel(self, index: int, chunks: Iterable[list]) -> Iterator[tuple]:
        """Stateless recipes: windows of chunks through a Ray Data actor-pool stage; results
        come back in any order and leave here in source order."""
        import itertools

        from ray import cloudpickle  # Ray's own copy: no extra dependency
        import ray

        o = self.executor.options
        numbered = enumerate(chunks, start=index)
        while window := list(itertools.islice(numbered, o.window)):
            items = [{"index": k, "entries": cloudpickle.dumps(c)} for k, c in window]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ChunkWorker, fn_constructor_kwargs={"job": self.job()}, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(o.stage.size, len(items)),
                                                   max_tasks_in_flight_per_actor=1),
                num_cpus=o.stage.num_cpus, num_gpus=o.stage.num_gpus)
            done: dict[int, dict] = {}
            expected = window[0][0]
            for row in ds.iter_rows():
                done[int(row["index"])] = cloudpickle.loads(row["result"])
                while expected in done:
                    yield self._result(done.pop(expected))
                    expected += 1
            if expected != window[-1][0] + 1:  # pragma: no cover - Ray lost a block
                raise PairforgeError(f"Ray returned chunks up to {expected - 1} of a window "
                                     f"ending at {window[-1][0]}; rerun to resume")

    def _in_sequence(self, index: int, chunks: Iterable[list]) -> Iterator[tuple]:
        """Recipes with cross-example state: one chunk at a time, in source order, on one
        recipe-stage actor, each given the state the previous chunk left."""
        import ray

        o = self.executor.options
        worker = ray.remote(ChunkWorker).options(
            num_cpus=o.stage.num_cpus, num_gpus=o.stage.num_gpus, max_restarts=-1,
            max_task_retries=-1).remote(self.job())
        try:
            state = self.state()
            for k, chunk in enumerate(chunks, start=index):
                res = ray.get(worker.run.remote(k, chunk, state))
                out = self._result(res)
                state = res["state"]
                self.recipe.load_state_dict(state)  # the run loop records it with the chunk
                yield out
        finally:
            ray.kill(worker)

    def _result(self, res: Mapping[str, Any]) -> tuple[dict, list[dict], list[dict]]:
        """A worker's chunk, or its error raised here (traceback into ``error.log``)."""
        if "error" in res:
            msg = res["error"]
            if res.get("trace"):
                log = self.out / "error.log"
                log.write_text(res["trace"], encoding="utf-8", errors="backslashreplace")
                msg += f"; the traceback is in {log}"
            raise PairforgeError(f"{msg}; {res['index']} chunk(s) are committed; fix the cause "
                                 f"and rerun the same command to resume")
        return res["record"], res["rows"], res["rejects"]
