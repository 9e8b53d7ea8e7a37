"""Minimal edits: the rule editor's candidates, the word diff of an edit, and the validator
that every edit passes whatever made it (rule editor or LLM).

Pure logic: strings in, strings out. The validator's Levenshtein and length numbers come from
:func:`pairforge.diagnostics.text.pair_metrics` (the same definitions ``pairforge audit``
reports), batched over all candidates of a call.
"""

from __future__ import annotations

import difflib
import functools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pairforge.diagnostics.lengths import LengthUnit
from pairforge.diagnostics.text import pair_metrics
from pairforge.recipes.vapr.rules import Span, ValueClass, VaprRules, Word, tokens

#: Validator failure codes, in the order they are checked (a reason is "<code>: <detail>").
REASONS = ("empty", "unchanged", "too_different", "length_gap", "no_critical_span", "same_value")


@dataclass(frozen=True)
class Edit:
    """An edited answer: its ``text``; the changed span of the answer (``original``) and what
    replaced it (``replacement``); the canonical replacement ``value`` the penalty lists count;
    and the ``editor`` that made it ("rule" or "llm")."""

    text: str
    original: str
    replacement: str
    value: str
    editor: str


# ----------------------------------------------------------------------------- word diff


@dataclass(frozen=True)
class Diff:
    """The words two texts differ in: character ranges in ``a`` and in ``b`` (an insertion is an
    empty range), and the span from the first to the last change on each side."""

    a_ranges: list[tuple[int, int]]
    b_ranges: list[tuple[int, int]]
    a_hull: tuple[int, int]
    b_hull: tuple[int, int]


def word_diff(a: str, b: str) -> Diff:
    """Word-level diff (difflib over :func:`~pairforge.recipes.vapr.rules.tokens`)."""
    ta, tb = tokens(a), tokens(b)
    ops = [op for op in difflib.SequenceMatcher(None, [w.text for w in ta], [w.text for w in tb],
                                                autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops:
        return Diff([], [], (0, 0), (0, 0))
    a_ranges = [_chars(ta, i1, i2, len(a)) for _, i1, i2, _, _ in ops]
    b_ranges = [_chars(tb, j1, j2, len(b)) for _, _, _, j1, j2 in ops]
    return Diff(a_ranges, b_ranges, _chars(ta, ops[0][1], ops[-1][2], len(a)),
                _chars(tb, ops[0][3], ops[-1][4], len(b)))


def _chars(words: Sequence[Word], i1: int, i2: int, length: int) -> tuple[int, int]:
    if i2 > i1:
        return words[i1].start, words[i2 - 1].end
    pos = words[i1].start if i1 < len(words) else length
    return pos, pos


def _overlaps(span: Span, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(s < span.end and span.start < e for s, e in ranges if e > s)


# ----------------------------------------------------------------------------- rule editor


def rule_candidates(answer: str, question: str, task: str, rules: VaprRules, *,
                    penalty: Sequence[str] = (), counts: Mapping[str, int] | None = None,
                    rng: random.Random | None = None) -> list[str]:
    """Edited answers, best first: each replaces one editable span (:meth:`VaprRules.editable_spans`)
    with another value of its class, in the span's form and case, fixing a/an before it.

    Order (the "sampling" of the rule editor): values not on the ``penalty`` list first, span
    and value order shuffled by ``rng``; then penalised values, least used (``counts``) first.
    A value the answer already states elsewhere is never used (it may well be true: "a red
    circle and a blue square" -> "a blue circle and a blue square"). For a class with
    ``polarity`` phrases (yes/no), the coherent variant ("No, there is not a ...") comes before
    the plain flip ("No, there is a ..."); the validator decides which one is minimal enough."""
    rng = rng or random.Random(0)
    counts = counts or {}
    penalised = set(penalty)
    spans = rules.editable_spans(answer, question, task)
    stated = {(s.cls, s.value) for s in rules.spans(answer, rules.tasks[task])}
    order = list(range(len(spans)))
    rng.shuffle(order)
    keyed: list[tuple[tuple, str]] = []
    for rank, k in enumerate(order):
        span = spans[k]
        vc = rules.classes[span.cls]
        values = [v for v in vc.replacements(span) if (span.cls, v) not in stated]
        rng.shuffle(values)
        for j, value in enumerate(values):
            for m, text in enumerate(substitute(answer, span, rules, value)):
                key = (1, counts.get(value, 0), rank, j, m) if value in penalised else (0, 0, rank, j, m)
                keyed.append((key, text))
    keyed.sort(key=lambda kt: kt[0])
    return list(dict.fromkeys(t for _, t in keyed))


def substitute(answer: str, span: Span, rules: VaprRules, value: str) -> list[str]:
    """``answer`` with ``span`` replaced by ``value``, the article before it agreeing; for a
    class with ``agreement`` rules, the noun after and the verb before agreeing in number (no
    candidate when there is no such noun); for a polarity class, first the coherent variant
    with the statement negated or affirmed."""
    vc = rules.classes[span.cls]
    rep = match_case(answer[span.start:span.end], vc.surface(value, span.form))
    text = fix_article(answer[:span.start] + rep + answer[span.end:], span.start)
    if vc.agreement_nouns and vc.grammatical_number(value) != "neutral":
        agreed = agree_number(text, span.start, span.start + len(rep), rules, vc,
                              plural=vc.grammatical_number(value) == "plural")
        if agreed is None:
            if vc.grammatical_number(span.value) != vc.grammatical_number(value):
                return []
        else:
            text = agreed
    if vc.polarity:
        coherent = flip_polarity(text, span.start + len(rep), vc.polarity,
                                 to_negative=value.lower() in ("no", "false"))
        return [*coherent, text]
    return [text]


def agree_number(text: str, start: int, end: int, rules: VaprRules, vc: ValueClass, *,
                 plural: bool) -> str | None:
    """Make the noun right after a number (within two words) and the verb at most two words
    before it singular or plural ("there is two circle" -> "there are two circles"). None when
    no noun follows."""
    after = tokens(text[end:])[:3]
    noun = None
    for w in after:
        forms = _noun_forms(w.text, rules, vc)
        if forms:
            noun = (w, forms)
            break
    if noun is None:
        return None
    w, (singular, plural_form) = noun
    new = plural_form if plural else singular
    s, e = end + w.start, end + w.end
    text = text[:s] + match_case(text[s:e], new) + text[e:]
    verbs = dict(vc.agreement_verbs) if plural else {p: s_ for s_, p in vc.agreement_verbs}
    for v in reversed(tokens(text[:start])[-2:]):
        if v.text in verbs:
            text = text[:v.start] + match_case(text[v.start:v.end], verbs[v.text]) + text[v.end:]
            break
    return text


def _noun_forms(word: str, rules: VaprRules, vc: ValueClass) -> tuple[str, str] | None:
    """(singular, plural) of ``word`` if it is a noun of the agreement rules, else None."""
    for singular, plural in vc.agreement_generic:
        if word in (singular, plural):
            return singular, plural
    for name in vc.agreement_nouns:
        nc = rules.classes[name]
        hit = nc.phrases.get((word,))
        if hit and hit[1] >= 0 and len(nc.forms) >= 2:
            return nc.values[hit[0]][0], nc.values[hit[0]][1]
    return None


def match_case(original: str, replacement: str) -> str:
    """``replacement`` in the case pattern of ``original`` (UPPER, Capitalised, or as is)."""
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


_ARTICLE = re.compile(r"\b(a|an)(\s+)$", re.IGNORECASE)


def fix_article(text: str, pos: int) -> str:
    """Make an "a"/"an" right before the word at ``pos`` agree with it ("a oval" -> "an oval")."""
    m = _ARTICLE.search(text[:pos])
    if not m:
        return text
    word = text[pos:pos + 1].lower()
    want = "an" if word and (word in "aeiou" or word == "8") else "a"
    if m.group(1).lower() == want:
        return text
    return text[:m.start(1)] + match_case(m.group(1), want) + text[m.end(1):]


def flip_polarity(text: str, after: int, pairs: Sequence[tuple[str, str]], *, to_negative: bool) -> list[str]:
    """The statement after position ``after`` negated (or affirmed): one variant per pair of
    ``pairs`` whose affirmative (or negative) phrase occurs first there, longest phrase first
    ("there is a" -> "there is no", then "there is" -> "there is not"); [] if none occurs."""
    rest = text[after:]
    swaps = [(a, n) if to_negative else (n, a) for a, n in pairs]
    found = []
    for old, new in swaps:
        m = re.search(r"\b" + r"\s+".join(map(re.escape, old.split())) + r"\b", rest, re.IGNORECASE)
        if m:
            found.append((m.start(), -len(old.split()), m, new))
    if not found:
        return []
    first = min(f[0] for f in found)
    out = []
    for _, _, m, new in sorted((f for f in found if f[0] == first), key=lambda f: f[1]):
        start = after + m.start()
        variant = text[:start] + match_case(m.group(), new) + text[after + m.end():]
        end = start + len(new)
        next_word = re.match(r"\s+", variant[end:])
        out.append(fix_article(variant, end + next_word.end()) if next_word else variant)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- validator


class Validator:
    """Checks every edit, whatever made it (the VaPR recipe's "validate" stage).

    An edit passes when: it is not empty and its text differs from the answer; its normalised
    word Levenshtein distance is ``<= max_lev_norm`` (or it changes at most
    ``lev_floor_words`` words: one word of a three-word answer is already 0.33); the token
    lengths of answer and edit differ by ``<= max_token_gap`` (in ``unit``); the words it
    changes include an editable task-critical span of the answer (a value of one of the task's
    classes, not a phrase copied from the question), or, for a pure insertion, insert one; and
    the new value is not a synonym of the old ("big" for "large")."""

    def __init__(self, rules: VaprRules, unit: LengthUnit, *, max_lev_norm: float = 0.2,
                 lev_floor_words: int = 0, max_token_gap: int = 3):
        self.rules = rules
        self.unit = unit
        self._spans = functools.lru_cache(maxsize=4096)(rules.editable_spans)
        self.max_lev_norm = max_lev_norm
        self.lev_floor_words = lev_floor_words
        self.max_token_gap = max_token_gap

    def check(self, items: Sequence[tuple[str, str, str, str]]) -> list[str | None]:
        """For each ``(question, answer, task, edited)``: None when the edit passes, else the
        reason ``"<code>: <detail>"`` (codes: :data:`REASONS`)."""
        if not items:
            return []
        m = pair_metrics([a for _, a, _, _ in items], [e for _, _, _, e in items], self.unit, threads=1)
        out: list[str | None] = []
        for k, (question, answer, task, edited) in enumerate(items):
            lev, norm, gap = int(m["lev_words"][k]), float(m["lev_norm"][k]), int(m["len_gap"][k])
            if not edited.strip():
                out.append("empty: the edit is empty")
            elif edited.split() == answer.split():
                out.append("unchanged: the edit is the answer itself")
            elif norm > self.max_lev_norm and lev > self.lev_floor_words:
                out.append(f"too_different: {lev} words changed, normalised word Levenshtein "
                           f"{norm:.2f} > {self.max_lev_norm}; change only the decisive word(s)")
            elif abs(gap) > self.max_token_gap:
                out.append(f"length_gap: token lengths differ by {abs(gap)} > {self.max_token_gap}; "
                           f"keep the answer's length")
            else:
                out.append(self._critical(question, answer, task, edited))
        return out

    def _critical(self, question: str, answer: str, task: str, edited: str) -> str | None:
        old, new, inserted_only = self._touched(question, answer, task, edited)
        if not old and not (inserted_only and new):
            names = "/".join(self.rules.tasks[task])
            return (f"no_critical_span: the change touches no {names} value of the answer that "
                    f"decides a {task} question")
        if {(s.cls, s.value) for s in old} == {(s.cls, s.value) for s in new}:
            pairs = ", ".join(f"{s.value}" for s in old)
            return f"same_value: the new words mean the same as the old ({pairs}); use a different value"
        return None

    def _touched(self, question: str, answer: str, task: str,
                 edited: str) -> tuple[list[Span], list[Span], bool]:
        d = word_diff(answer, edited)
        old = [s for s in self._spans(answer, question, task) if _overlaps(s, d.a_ranges)]
        new = [s for s in self._spans(edited, question, task) if _overlaps(s, d.b_ranges)]
        return old, new, all(e == s for s, e in d.a_ranges)

    def describe(self, question: str, answer: str, task: str, edited: str, editor: str) -> Edit:
        """The :class:`Edit` record of a (validated) edited answer: the changed spans and the
        canonical replacement value (the new values' names joined by "+", or the replacement
        text when it names no known value)."""
        d = word_diff(answer, edited)
        original, replacement = answer[slice(*d.a_hull)], edited[slice(*d.b_hull)]
        _, new, _ = self._touched(question, answer, task, edited)
        value = "+".join(sorted({s.value for s in new})) or replacement.lower()
        return Edit(edited, original, replacement, value, editor)
