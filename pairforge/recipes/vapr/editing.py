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
from pairforge.recipes.vapr import polarity
from pairforge.recipes.vapr.rules import SHORT_WORDS, Span, ValueClass, VaprRules, Word, tokens

#: Validator failure codes, in the order they are checked (a reason is "<code>: <detail>").
#: The yes/no codes apply to answers that open with yes/no, the type codes to the others.
REASONS = ("empty", "unchanged", "too_different", "length_gap", "no_critical_span", "same_value",
           "lead_missing", "lead_only", "attribute_swap", "double_negation", "self_contradiction",
           "not_flippable", "type_change", "repeated_value")


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
                    rng: random.Random | None = None, data_values: Sequence[str] = ()) -> list[str]:
    """Edited answers, best first: each replaces one editable span (:meth:`VaprRules.editable_spans`)
    with another value of its class, in the span's form and case, fixing a/an before it.

    Order (the "sampling" of the rule editor): values not on the ``penalty`` list first, span
    and value order shuffled by ``rng``; then penalised values, least used (``counts``) first.
    A value the answer already states elsewhere is never used (it may well be true: "a red
    circle and a blue square" -> "a blue circle and a blue square"). For a class with
    ``polarity`` phrases (yes/no), the coherent variant ("No, there is not a ...") comes before
    the plain flip ("No, there is a ..."); the validator decides which one is minimal enough.

    An answer that opens with yes/no has one candidate, whatever the task: the opposite
    proposition (:func:`~pairforge.recipes.vapr.polarity.flip_answer`: leading word flipped,
    negation inserted or removed in the body), or none. A short answer with no value of the
    task's classes ("umbrella", "tennis") is replaced as a whole by ``data_values``: the
    answers to questions of the same type seen earlier in the source."""
    rng = rng or random.Random(0)
    counts = counts or {}
    penalised = set(penalty)
    if polarity.split_lead(answer)[0] is not None:
        flipped = polarity.flip_answer(answer, question)
        return [flipped] if flipped else []
    spans = rules.editable_spans(answer, question, task)
    options = rules.alternatives(question)
    own = rules.short_value(answer)
    if own is not None and own in options:  # "wooden or metal?" -> "metal": the other option
        return _data_candidates(answer, rules, [o for o in options if o != own], set(), {}, rng)
    if not spans and data_values:
        return _data_candidates(answer, rules, data_values, penalised, counts, rng)
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


def _data_candidates(answer: str, rules: VaprRules, values: Sequence[str], penalised: set[str],
                     counts: Mapping[str, int], rng: random.Random) -> list[str]:
    """A short answer's value replaced by another value its question type has in the data
    ("umbrella" -> "kite"), in the answer's case, with its article and final punctuation."""
    own = rules.short_value(answer)
    if own is None:
        return []
    ws = tokens(answer)
    first = ws[1] if ws[0].text in ("a", "an", "the", "some") and len(ws) > 1 else ws[0]
    start, end = first.start, ws[-1].end
    pool = [v for v in dict.fromkeys(values) if v != own]
    rng.shuffle(pool)
    pool.sort(key=lambda v: (v in penalised, counts.get(v, 0) if v in penalised else 0))
    out = []
    for v in pool:
        text = answer[:start] + match_case(answer[start:end], v) + answer[end:]
        out.append(fix_article(text, start))
    return out


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
            if vc.grammatical_number(span.value) != vc.grammatical_number(value) \
                    and len(tokens(answer)) > SHORT_WORDS:  # a bare "2" -> "3" needs no agreement
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
    the new value is not a synonym of the old ("big" for "large"), has the old value's type
    (a colour for a colour, a number for a number: ``type_change``) and is not a value the
    answer already states elsewhere (``repeated_value``).

    Short answers (at most :data:`~pairforge.recipes.vapr.rules.SHORT_WORDS` words, VQAv2/GQA
    style) are judged by their decisive span: replacing their one value is the minimal edit
    whatever share of the words it is, so the Levenshtein share does not apply. A short answer
    with no value of the task's classes ("umbrella") may be replaced by a value of
    ``data_values[question_type]`` (the answers collected from the source) and by nothing else.

    An answer that opens with yes/no must be answered by the opposite proposition: the leading
    word flipped (``lead_missing``, ``attribute_swap`` when it is kept and the body changed),
    the body's polarity flipped too (``lead_only``), nothing else in the body changed
    (``attribute_swap``: "No, there is no red shape." -> "No, there is no blue shape." may
    well be true), no double negation (``double_negation``), a leading word that agrees with
    a body restating the question (``self_contradiction``: "Yes, the image does not contain a
    circle." to "Does the image contain a circle?"), and a body that states the question's
    proposition at all (``not_flippable``). Their Levenshtein share is judged on the words the
    flip may change (the leading word, the negation and the verb form do-support needs): at
    most ``max_yesno_words`` words."""

    def __init__(self, rules: VaprRules, unit: LengthUnit, *, max_lev_norm: float = 0.2,
                 lev_floor_words: int = 0, max_token_gap: int = 3, max_yesno_words: int = 4):
        self.rules = rules
        self.unit = unit
        self._spans = functools.lru_cache(maxsize=4096)(rules.editable_spans)
        self.max_lev_norm = max_lev_norm
        self.lev_floor_words = lev_floor_words
        self.max_token_gap = max_token_gap
        self.max_yesno_words = max_yesno_words
        #: question type -> answer values seen in the source (set by the recipe)
        self.data_values: dict[str, set[str]] = {}

    def check(self, items: Sequence[tuple[str, str, str, str]]) -> list[str | None]:
        """For each ``(question, answer, task, edited)``: None when the edit passes, else the
        reason ``"<code>: <detail>"`` (codes: :data:`REASONS`)."""
        if not items:
            return []
        m = pair_metrics([a for _, a, _, _ in items], [e for _, _, _, e in items], self.unit, threads=1)
        out: list[str | None] = []
        for k, (question, answer, task, edited) in enumerate(items):
            lev, norm, gap = int(m["lev_words"][k]), float(m["lev_norm"][k]), int(m["len_gap"][k])
            yesno = polarity.split_lead(answer)[0] is not None
            short = not yesno and len(tokens(answer)) <= SHORT_WORDS
            if not edited.strip():
                out.append("empty: the edit is empty")
            elif edited.split() == answer.split():
                out.append("unchanged: the edit is the answer itself")
            elif yesno:
                out.append(self._yesno(question, answer, edited, lev, gap))
            elif norm > self.max_lev_norm and lev > self.lev_floor_words and not short:
                out.append(f"too_different: {lev} words changed, normalised word Levenshtein "
                           f"{norm:.2f} > {self.max_lev_norm}; change only the decisive word(s)")
            elif short and len(tokens(edited)) > SHORT_WORDS + 1:
                out.append(f"too_different: a short answer of {len(tokens(answer))} word(s) became "
                           f"{len(tokens(edited))}; replace only its value")
            elif abs(gap) > self.max_token_gap:
                out.append(f"length_gap: token lengths differ by {abs(gap)} > {self.max_token_gap}; "
                           f"keep the answer's length")
            else:
                out.append(self._critical(question, answer, task, edited))
        return out

    def _yesno(self, question: str, answer: str, edited: str, lev: int, gap: int) -> str | None:
        lead_a, body_a = polarity.split_lead(answer)
        lead_e, body_e = polarity.split_lead(edited)
        if lead_e is None:
            return ("lead_missing: the answer opens with yes/no, the edit does not; flip the "
                    "yes/no and the statement after it")
        if lead_e == lead_a:
            return ("attribute_swap: the edit keeps the leading yes/no and changes the statement; "
                    "a yes/no answer's negative flips its polarity, not its object or attribute")
        if not body_a:
            return None  # a bare "Yes." -> "No."
        if body_e.split() == body_a.split():
            return ("lead_only: only the leading yes/no changed; the body still states the same "
                    "proposition, so the answer contradicts itself")
        if polarity.double_negation(body_e):
            return "double_negation: the edit negates a negation; remove the negation instead"
        if not polarity.flippable(body_a, question):
            return ("not_flippable: the body states facts other than the question's proposition; "
                    "negating it does not make a coherent opposite answer")
        if polarity.polarity(body_e, question) == polarity.polarity(body_a, question):
            return ("attribute_swap: the body's polarity is unchanged; the edit changed what the "
                    "answer is about instead of negating it")
        moved = polarity.content(body_e) ^ polarity.content(body_a)
        if moved - set(polarity.ANTONYMS):
            return (f"attribute_swap: the edit changes {', '.join(sorted(moved))} besides the "
                    f"polarity; flip only the yes/no and the negation")
        if polarity.coherent(edited, question) is False:
            return (f"self_contradiction: the leading {lead_e!r} disagrees with the statement "
                    f"after it for question {question.strip()[:80]!r}")
        if lev > self.max_yesno_words:
            return (f"too_different: {lev} words changed; a yes/no flip changes the yes/no and "
                    f"the negation (at most {self.max_yesno_words} words)")
        if abs(gap) > self.max_token_gap:
            return (f"length_gap: token lengths differ by {abs(gap)} > {self.max_token_gap}; "
                    f"keep the answer's length")
        return None

    def _critical(self, question: str, answer: str, task: str, edited: str) -> str | None:
        old, new, inserted_only = self._touched(question, answer, task, edited)
        if not old and len(tokens(answer)) <= SHORT_WORDS:
            return self._data_value(question, answer, task, edited)
        if not old and not (inserted_only and new):
            names = "/".join(self.rules.tasks[task])
            return (f"no_critical_span: the change touches no {names} value of the answer that "
                    f"decides a {task} question")
        if {(s.cls, s.value) for s in old} == {(s.cls, s.value) for s in new}:
            pairs = ", ".join(f"{s.value}" for s in old)
            return f"same_value: the new words mean the same as the old ({pairs}); use a different value"
        if old and new and not {s.cls for s in old} & {s.cls for s in new}:
            return (f"type_change: {'/'.join(sorted({s.cls for s in old}))} value replaced by a "
                    f"{'/'.join(sorted({s.cls for s in new}))} value; keep the type")
        if old and not new and not inserted_only:
            d = word_diff(answer, edited)
            other = {sp.cls for sp in self.rules.spans(edited, list(self.rules.classes))
                     if _overlaps(sp, d.b_ranges)} - {sp.cls for sp in old}
            if other:
                return (f"type_change: {'/'.join(sorted({sp.cls for sp in old}))} value replaced by a "
                        f"{'/'.join(sorted(other))} value; keep the type")
        if old and not new and not inserted_only and len(tokens(answer)) <= SHORT_WORDS:
            return (f"type_change: the replacement names no {'/'.join(sorted({s.cls for s in old}))} "
                    f"value; keep the type")
        d = word_diff(answer, edited)
        kept = {(s.cls, s.value) for s in self.rules.spans(answer, self.rules.tasks[task])
                if not _overlaps(s, d.a_ranges)}
        again = sorted({s.value for s in new if (s.cls, s.value) in kept})
        if again:
            return (f"repeated_value: the answer already states {', '.join(again)}; a repeated value "
                    f"may well be true")
        return None

    def _data_value(self, question: str, answer: str, task: str, edited: str) -> str | None:
        """A short answer with no value of the task's classes: the edit must name another value
        of the same question type seen in the data."""
        qtype = self.rules.question_type(question, task)
        new, own = self.rules.short_value(edited), self.rules.short_value(answer)
        options = self.rules.alternatives(question)
        values = set(options) if own in options else self.data_values.get(qtype, set())
        if new is None or new not in values:
            return (f"type_change: {edited.strip()[:40]!r} is not an answer value of "
                    f"{qtype!r} questions in the data; replace the value by one of its type")
        if new == own:
            return "same_value: the new value is the old one"
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
        lead = polarity.split_lead(edited)[0]
        if polarity.split_lead(answer)[0] is not None and lead is not None:
            return Edit(edited, original, replacement, lead, editor)
        _, new, _ = self._touched(question, answer, task, edited)
        value = "+".join(sorted({s.value for s in new})) or (self.rules.short_value(edited) or replacement).lower()
        return Edit(edited, original, replacement, value, editor)
