"""The data that crosses from sources to recipes to the build engine: :class:`Example` (one
SFT example as a recipe sees it) and what a recipe makes of it (:class:`Outcome`: pair rows
or a :class:`Reject`).

It sits below both ``pairforge.sources`` (which yields examples) and ``pairforge.recipes``
(which consumes them), next to :mod:`pairforge.schema`, so no layer imports upwards;
``pairforge.recipes.base`` re-exports these names, where the rest of the contract (the
``Recipe`` protocol, ``BuildContext``) lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pairforge.schema import message_text


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
        """Text of the last user message (image parts dropped, outer whitespace stripped: the
        layout around image tags stays in ``messages``)."""
        users = [m for m in self.messages if m.get("role") == "user"]
        return message_text(users[-1]).strip() if users else ""

    @property
    def answer(self) -> str:
        """Text of the reference answer (the last assistant message), '' if none."""
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
