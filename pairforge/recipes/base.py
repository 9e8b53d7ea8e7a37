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
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pairforge.schema import derive_seed


@dataclass
class Example:
    """One SFT example as a recipe sees it.

    ``messages``: TRL conversational messages, the user turn(s) then the reference assistant
    answer (last message). ``images``: decoded PIL images, in the order of the image parts.
    ``task``: the source's task label when it has one (the world's categories), else None
    (VaPR's categorizer assigns one). ``meta``: the source's extra fields, e.g. the world's
    ground truth (``scene``, ``target``, ``answer_value``, ``answer_span_start``/``end``,
    ``filter_reason``) that :func:`pairforge.world.grade` needs.
    """

    id: str
    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    task: str | None = None
    source_dataset: str = ""
    source_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """Text of the last user message (image parts dropped)."""
        from pairforge.schema import message_text

        users = [m for m in self.messages if m.get("role") == "user"]
        return message_text(users[-1]) if users else ""

    @property
    def answer(self) -> str:
        """Text of the reference answer (the last assistant message), '' if none."""
        from pairforge.schema import message_text

        last = self.messages[-1] if self.messages else {}
        return message_text(last) if last.get("role") == "assistant" else ""

    @property
    def prompt_messages(self) -> list[dict]:
        """The messages before the reference answer: the pair's ``prompt``."""
        if self.messages and self.messages[-1].get("role") == "assistant":
            return self.messages[:-1]
        return list(self.messages)


@dataclass(frozen=True)
class Reject:
    """Why an example yields no pair: ``stage`` (filter, categorize, edit, validate, generate,
    select, ...) and a one-line ``reason``."""

    stage: str
    reason: str


@dataclass
class Outcome:
    """What a recipe made of one example: pair ``rows`` or a ``reject``; ``stats`` are small
    counters the engine sums into the build summary (e.g. ``{"llm_edit_fallback": 1}``)."""

    rows: list[dict] = field(default_factory=list)
    reject: Reject | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if bool(self.rows) == (self.reject is not None):
            raise ValueError("an Outcome has pair rows or a reject, exactly one of the two")


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
