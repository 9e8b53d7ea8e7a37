"""Build settings: one :class:`BuildConfig` from a YAML file and the command line (the command
line wins), checked up front so that a typo fails before any model is loaded.

YAML keys are the long option names (``batch-size`` or ``batch_size``); recipe parameters go
under ``params:``::

    recipe: vapr
    source: shapes:train?n=500
    out: builds/vapr-500
    policy: tiny-vlm
    seed: 0
    batch-size: 16
    params:
      editor: rules

``executor: ray`` builds on a Ray cluster (:mod:`pairforge.engine.ray_executor`); its settings
(address, per-role actor pools) go under ``ray:``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pairforge.errors import PairforgeError
from pairforge.sources.sft import DEFAULT_MAX_PIXELS, WORLD

#: Model roles a build can configure (``--policy`` ... ``--judge``).
MODEL_ROLES = ("policy", "clip", "editor", "judge", "describer")
#: Source examples per committed chunk (a new build; a resumed one keeps its manifest's).
CHUNK_SIZE = 64
#: Where the chunks are built (``--executor``).
EXECUTORS = ("local", "ray")


@dataclass
class BuildConfig:
    """Everything ``pairforge build`` takes. ``models`` maps a role to a model spec;
    ``shard`` is ``(index, count)``; ``params`` are the recipe's."""

    recipe: str | None = None
    out: Path | None = None
    source: str = WORLD
    models: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    shard: tuple[int, int] | None = None
    seed: int = 0
    batch_size: int = 8
    chunk_size: int = CHUNK_SIZE
    image_root: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    params: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    #: ``local`` (this process) or ``ray`` (:mod:`pairforge.engine.ray_executor`; never enters
    #: the run identity, like batch size and device)
    executor: str = "local"
    #: Ray settings: ``address``, ``roles`` (per-role pools), ``stage``, ``read``, ...
    ray: dict[str, Any] = field(default_factory=dict)
    #: Reference model for per-pair log-probs, Δ_ref (and IPS under the recipe's policy).
    reference: str | None = None

    def check(self) -> BuildConfig:
        """Raise a one-line :class:`PairforgeError` for a missing or out-of-range setting."""
        if not self.recipe:
            raise PairforgeError("no recipe; give it as `pairforge build RECIPE` or `recipe:` "
                                 "in the --config file")
        if self.out is None:
            raise PairforgeError("no output folder; pass --out DIR (or `out:` in the config)")
        for name, low in (("batch_size", 1), ("chunk_size", 1), ("max_pixels", 1)):
            if getattr(self, name) < low:
                raise PairforgeError(f"--{name.replace('_', '-')} {getattr(self, name)}: must "
                                     f"be >= {low}")
        if self.limit is not None and self.limit < 0:
            raise PairforgeError(f"--limit {self.limit}: must be >= 0")
        if self.executor not in EXECUTORS:
            raise PairforgeError(f"--executor {self.executor}: choose from "
                                 f"{', '.join(EXECUTORS)}")
        unknown = sorted(set(self.models) - set(MODEL_ROLES))
        if unknown:
            raise PairforgeError(f"model role {unknown[0]!r}: choose from {', '.join(MODEL_ROLES)}")
        return self


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N``; None stays None."""
    if text is None:
        return None
    i, slash, n = str(text).partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index = count = -1
    if not slash or count < 1 or not 0 <= index < count:
        raise PairforgeError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return index, count


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → a dict; values are YAML scalars (``0.5`` a float, ``true`` a bool,
    anything else a string)."""
    import yaml

    out: dict[str, Any] = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise PairforgeError(f"--param {p!r}: expected key=value, e.g. --param alpha=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_config(path: str | os.PathLike | None = None, **cli: Any) -> BuildConfig:
    """The config of ``path`` (YAML) overridden by the command-line values in ``cli`` that are
    not None. ``cli`` keys: the :class:`BuildConfig` field names, the model roles, ``shard``
    as ``"I/N"`` and ``params`` as a dict (merged key by key over the file's)."""
    values: dict[str, Any] = _read_yaml(path) if path is not None else {}
    for key, value in cli.items():
        if value is None:
            continue
        if key == "params":
            values["params"] = {**values.get("params", {}), **value}
        elif key == "ray_address":
            values["ray"] = {**values.get("ray", {}), "address": value}
        elif key == "overwrite":
            values[key] = bool(value) or values.get(key, False)
        else:
            values[key] = value
    models = {r: str(values.pop(r)) for r in MODEL_ROLES if values.get(r) is not None}
    for r in MODEL_ROLES:
        values.pop(r, None)
    shard = values.pop("shard", None)
    cfg = BuildConfig(models=models, shard=parse_shard(shard) if shard is not None else None)
    for key, value in values.items():
        if key in ("out", "image_root") and value is not None:
            value = Path(value)
        setattr(cfg, key, value)
    return cfg.check()


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    where = os.fspath(path)
    try:
        data = yaml.safe_load(Path(where).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PairforgeError(f"--config {where}: no such file") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PairforgeError(f"--config {where}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PairforgeError(f"--config {where}: expected a mapping of option: value, got "
                             f"{type(data).__name__}")
    known = {f.name for f in fields(BuildConfig)} - {"models"} | set(MODEL_ROLES)
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise PairforgeError(f"--config {where}: unknown key {raw_key!r}; use "
                                 f"{', '.join(sorted(known))} (recipe settings go under params:)")
        if key in ("params", "ray") and not isinstance(value, Mapping):
            raise PairforgeError(f"--config {where}: '{key}' must be a mapping of "
                                 f"{'recipe parameters' if key == 'params' else 'Ray settings'}"
                                 f", got {type(value).__name__}")
        if key in ("limit", "seed", "batch_size", "chunk_size", "max_pixels") and \
                value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise PairforgeError(f"--config {where}: {raw_key} must be an integer, got {value!r}")
        out[key] = dict(value) if key in ("params", "ray") else value
    return out
