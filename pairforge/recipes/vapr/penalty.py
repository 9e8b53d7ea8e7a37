"""VaPR's per-task penalty lists: which replacement values the editor has used most, so that
it avoids them and edits stay diverse (VaPR: the editor is told the task's most frequent
replacement values so far; DESIGN.md, "The four recipes").

Cross-example state, updated deterministically in source order: the lists an example sees
are the top-``top_k`` values of the counts committed *before its block*, where blocks are
``every`` consecutive examples by source position (``n_seen``). So every example of a block
sees the same lists whatever the engine's batching, and the LLM edits of a block can be
batched; ``every=1`` updates after each example.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any


class PenaltyLists:
    """Replacement-value counts per task, committed every ``every`` examples."""

    def __init__(self, top_k: int = 3, every: int = 32):
        self.top_k = top_k
        self.every = every
        self.counts: dict[str, Counter] = {}   # committed: what penalty lists are made of
        self.pending: dict[str, Counter] = {}  # the current block's edits, not yet committed
        self.n_seen = 0                         # examples processed, in source order

    def block(self, offset: int = 0) -> int:
        """Block number of the example ``offset`` positions after the last one seen."""
        return (self.n_seen + offset) // self.every

    def penalty(self, task: str) -> list[str]:
        """The task's ``top_k`` most used committed values, most used first (ties by name)."""
        c = self.counts.get(task, {})
        return [v for v, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:self.top_k]]

    def committed(self, task: str) -> dict[str, int]:
        return dict(self.counts.get(task, {}))

    def record(self, task: str, value: str) -> None:
        self.pending.setdefault(task, Counter())[value] += 1

    def advance(self, n: int = 1) -> None:
        """``n`` more examples seen (kept or rejected); commit at each block boundary. Callers
        advance by at most the rest of the current block, after recording its edits."""
        if (self.n_seen % self.every) + n > self.every:
            raise ValueError("advance() crosses a block boundary; advance block by block")
        self.n_seen += n
        if self.n_seen % self.every == 0:
            for task, c in self.pending.items():
                self.counts.setdefault(task, Counter()).update(c)
            self.pending = {}

    def totals(self) -> dict[str, dict[str, int]]:
        """All counts so far (committed and pending), per task."""
        out: dict[str, Counter] = {t: Counter(c) for t, c in self.counts.items()}
        for t, c in self.pending.items():
            out.setdefault(t, Counter()).update(c)
        return {t: dict(c) for t, c in out.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"n_seen": self.n_seen,
                "counts": {t: dict(sorted(c.items())) for t, c in sorted(self.counts.items())},
                "pending": {t: dict(sorted(c.items())) for t, c in sorted(self.pending.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_seen = int(state.get("n_seen", 0))
        self.counts = {t: Counter({str(v): int(n) for v, n in c.items()})
                       for t, c in (state.get("counts") or {}).items()}
        self.pending = {t: Counter({str(v): int(n) for v, n in c.items()})
                        for t, c in (state.get("pending") or {}).items()}


class AnswerValues:
    """The answer values of a source, per question type (:meth:`VaprRules.question_type`), in
    the order first seen: the vocabulary the rule editor draws replacements from for short
    answers whose value no class of the rules lists ("tennis", "kitchen"). Committed per block
    of the penalty lists, so every example of a block sees the same vocabulary whatever the
    batching; kept in the recipe's state for resume."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, None]] = {}   # committed, insertion-ordered
        self.pending: dict[str, dict[str, None]] = {}

    def record(self, qtype: str, value: str) -> None:
        self.pending.setdefault(qtype, {})[value] = None

    def commit(self) -> None:
        for q, vs in self.pending.items():
            self.values.setdefault(q, {}).update(vs)
        self.pending = {}

    def get(self, qtype: str) -> list[str]:
        return list(self.values.get(qtype, {}))

    def as_sets(self) -> dict[str, set[str]]:
        return {q: set(vs) for q, vs in self.values.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"values": {q: list(vs) for q, vs in self.values.items()},
                "pending": {q: list(vs) for q, vs in self.pending.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = {q: dict.fromkeys(map(str, vs)) for q, vs in (state.get("values") or {}).items()}
        self.pending = {q: dict.fromkeys(map(str, vs)) for q, vs in (state.get("pending") or {}).items()}


def replacement_distribution(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """Per task: ``counts`` (most used first), ``n`` edits, Shannon ``entropy_bits``
    H = −Σ p_i log2 p_i, ``max_entropy_bits`` = log2(#values), and the most used value with
    its share (``top_value``, ``top_share``)."""
    out = {}
    for task, c in sorted(counts.items()):
        n = sum(c.values())
        if not n:
            continue
        ranked = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
        h = -sum(k / n * math.log2(k / n) for _, k in ranked if k)
        out[task] = {"n": n, "counts": dict(ranked), "entropy_bits": h,
                     "max_entropy_bits": math.log2(len(ranked)), "top_value": ranked[0][0],
                     "top_share": ranked[0][1] / n}
    return out


def distribution_from_stats(stats: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """:func:`replacement_distribution` from a build's summed ``Outcome.stats``
    (keys ``value/<task>/<value>``)."""
    counts: dict[str, dict[str, int]] = {}
    for key, n in stats.items():
        if key.startswith("value/"):
            _, task, value = key.split("/", 2)
            counts.setdefault(task, {})[value] = int(n)
    return replacement_distribution(counts)
