"""The contract between the build engine and the recipes.

A recipe is pure logic on top of the models protocol: it receives a batch of SFT
:class:`Example` objects (already read, images decoded and checked by the engine) and returns,
for each example, either canonical pair rows (:func:`pairforge.schema.make_pair`) or a
:class:`Reject` with the stage and reason. The engine batches, checkpoints, resumes, shards
and writes; the recipe never touches files.

Rules every recipe follows (the engine's guarantees depend on them):

- **Per-example randomness only.** Anything random for example ``ex`` draws from
  ``ctx.rng(ex)`` (or a seed from ``ctx.seed_for(ex, ...)`` passed to the models'
  ``SamplingParams``), never from a shared generator, so results do not depend on batch size,
  worker count or resume.
- **One outcome per example.** ``process`` returns one :class:`Outcome` per input example, in
  order: ``rows`` non-empty, or ``reject`` set. Several rows per example are fine (CW-DPO
  pairs one chosen with several negatives; P2-DPO emits a focus and a robust pair).
- **Cross-example state** (VaPR's penalty lists) is allowed only if it is a deterministic
  function of the examples processed before, in source order; the engine processes examples
  in source order and gives the recipe ``state_dict`` / ``load_state_dict`` hooks so that a
  resumed build restores it from the last checkpoint.
- **Semantic settings** (everything that changes the output) are in ``params()``; models in
  ``models()``; prompt templates in ``templates()``. The engine hashes exactly these (plus
  the seed and the source) into the run identity. Batch size and device never enter it.
- **Rules fitted on the whole run** (P2-DPO's margin window: the central 95 % of the run's own
  margins; CW-DPO's cooling floor from the quantiles of its negatives' ℓ̄) cannot be applied
  inside ``process``. A recipe that has one defines ``run_pass()`` returning a
  :class:`RunPass`: ``process`` stores the value in a row column and keeps the row; when the
  build finishes, :func:`pairforge.engine.summary.finish` reads that column from every
  committed row, ``fit``s the rule once (recorded in ``summary.json``), and drops the rows the
  rule ``judge``s out (an example left with no row becomes a reject of stage ``filter``).
  Finishing is a pure function of the committed chunks, so pass two is as resumable as the
  rest, and a ``merge`` of shards fits the rule on all their rows.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pairforge.contract import Example, Outcome, Reject  # noqa: F401 - re-exported: the recipe contract
from pairforge.errors import PairforgeError
from pairforge.schema import derive_seed, make_pair, stable_id, template_hash


@dataclass(frozen=True)
class RunPass:
    """Pass two of a build (module docstring): ``columns`` are the row columns the rule reads,
    ``group`` the column naming the example a row came from; ``fit(values)`` gets every
    committed row's values as ``{column: list}`` and returns the fitted rule's numbers (JSON
    scalars, written into ``summary.json``); ``judge(row, fitted)`` gets one row's values and
    returns None (keep) or ``(reason, stats)``: the drop reason and the recipe-stat deltas to
    apply (e.g. ``{"focus_kept": -1, "focus_dropped_margin": 1}``). Without ``judge`` the pass
    only records its fit."""

    columns: tuple[str, ...]
    group: str | None
    fit: Callable[[Mapping[str, list]], dict[str, Any]]
    judge: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[str, dict[str, float]] | None] | None = None


@dataclass
class BuildContext:
    """What the engine hands the recipe: the run seed, the resolved models by role
    (``policy``, ``clip``, ``editor``, ``judge``; each None when not configured) and a
    progress callback for long inner loops."""

    seed: int = 0
    models: Mapping[str, Any] = field(default_factory=dict)

    def seed_for(self, example: Example, *purpose: object) -> int:
        """A seed for ``example`` (and an optional purpose tag), independent of batching."""
        return derive_seed(self.seed, example.id, *purpose)

    def rng(self, example: Example, *purpose: object) -> random.Random:
        return random.Random(self.seed_for(example, *purpose))


@runtime_checkable
class Recipe(Protocol):
    """A pair recipe. ``name`` is the ``recipe`` column; ``groups`` the schema column groups
    its rows fill (:data:`pairforge.schema.COLUMN_GROUPS`); ``roles`` the model roles it uses,
    each ``(role, required, default_spec)``."""

    name: ClassVar[str]
    groups: ClassVar[tuple[str, ...]]
    roles: ClassVar[tuple[tuple[str, bool, str | None], ...]]

    def params(self) -> dict[str, Any]: ...

    def templates(self) -> dict[str, str]: ...

    def check(self, ctx: BuildContext) -> None:
        """Fail before any work when a model lacks a needed capability (models.require)."""

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- helpers for recipes

P = TypeVar("P")


def recipe_params(cls: type[P], params: Mapping[str, Any], recipe: str) -> P:
    """A recipe's frozen params dataclass ``cls`` from a mapping (e.g. ``--param k=v`` strings).

    Unknown keys are an error naming the known ones; strings are converted to the field's
    declared type (``int``, ``float``, ``bool``, ``str``); the dataclass validates ranges."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise PairforgeError(f"recipe '{recipe}': unknown parameter '{unknown[0]}'; "
                             f"known: {', '.join(fields)}")
    values = {}
    for key, value in params.items():
        t = fields[key].type
        kind = (t if isinstance(t, str) else getattr(t, "__name__", str(t))).split("|")[0].strip()
        try:
            if kind == "bool" and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            elif kind in ("int", "float") and isinstance(value, (str, int, float)) \
                    and not isinstance(value, bool):
                value = float(value) if kind == "float" else int(value)
        except ValueError:
            raise PairforgeError(f"recipe '{recipe}': parameter {key}={value!r} is not a "
                                 f"{kind}") from None
        values[key] = value
    return cls(**values)


def pair_row(recipe: Recipe, example: Example, ctx: BuildContext, *, chosen: str, rejected: str,
             **extra: Any) -> dict:
    """A canonical pair row for ``example`` made by ``recipe``: the example's prompt and images,
    provenance (source, the models of the recipe's roles in ``ctx``, template hashes, seed), a
    stable id from (recipe, example id, chosen, rejected), and the recipe's ``extra`` columns.
    Only the scalar fields of ``example.meta`` go to ``source_meta``."""
    # the models in use only: asking the engine's lazy mapping for an optional role the recipe
    # never used (VaPR's LLM editor with editor=rule) would load that model and name it here
    in_use = getattr(ctx.models, "loaded", ctx.models)
    models = [{"role": role, "name": str(m.name), "revision": str(getattr(m, "revision", "") or "")}
              for role, *_ in recipe.roles if (m := in_use.get(role)) is not None]
    templates = [{"name": n, "sha256": template_hash(t)} for n, t in sorted(recipe.templates().items())]
    meta = {k: v for k, v in example.meta.items() if isinstance(v, (str, int, float, bool))}
    return make_pair(prompt=example.prompt_messages, chosen=chosen, rejected=rejected,
                     images=example.images, id=stable_id(recipe.name, example.id, chosen, rejected),
                     recipe=recipe.name, task=example.task or "unknown",
                     source_dataset=example.source_dataset, source_id=example.source_id or example.id,
                     source_meta=meta, models=models, prompt_templates=templates, seed=ctx.seed,
                     **extra)
