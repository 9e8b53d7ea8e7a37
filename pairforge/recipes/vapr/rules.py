"""VaPR's language rules, loaded from ``pairforge/recipes/data/vapr_tasks.yaml``: filters,
yes/no-to-sentence conversion, the keyword task categorizer, and the value classes whose spans
(colours, kinds, sizes, numbers, relations, backgrounds, yes/no) a minimal edit replaces.

Pure logic: the YAML is read once by :meth:`VaprRules.load`; everything else works on strings.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pairforge.errors import PairforgeError
from pairforge.recipes.vapr import polarity
from pairforge.recipes.vapr.polarity import third_person

DEFAULT_RULES = Path(__file__).resolve().parents[1] / "data" / "vapr_tasks.yaml"

#: Answers of at most this many words are "short" (VQAv2/GQA style): their edit is judged by the
#: decisive span, not by a share of the answer's words.
SHORT_WORDS = 3
_ALTERNATIVE = re.compile(r"\b(?:to the )?(\w+)(?: of the \w+)?,? or (?:to the )?(\w+)\b")
_QTYPE = re.compile(r"^(?:what|which)\s+(?:(?:kind|type|sort|color|colour|brand|breed|species|style) of\s+)?([a-z]+)\b")
_NOT_A_TYPE = {"is", "are", "was", "were", "do", "does", "did", "can", "could", "will", "would", "has",
               "have", "the", "a", "an", "this", "that", "these", "those", "it", "they", "he", "she",
               "of", "in", "on", "you", "there", "kind", "type", "sort"}

#: Words with their character offsets: letter runs (with an inner apostrophe) and digit runs.
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+")


@dataclass(frozen=True)
class Word:
    text: str  # lower-cased
    start: int
    end: int


@functools.lru_cache(maxsize=16384)
def tokens(text: str) -> tuple[Word, ...]:
    """The words of ``text`` with their character spans (punctuation is not a word)."""
    return tuple(Word(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text))


@dataclass(frozen=True)
class Span:
    """A value of a class found in a text: characters ``[start, end)``, words
    ``[first, first + n)``, the canonical ``value`` and the surface ``form`` index (-1: a
    synonym)."""

    start: int
    end: int
    first: int
    n: int
    cls: str
    value: str
    form: int


@dataclass(frozen=True)
class ValueClass:
    """One value class of the rules file (its ``classes`` section)."""

    name: str
    forms: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    phrases: dict[tuple[str, ...], tuple[str, int]]  # words of a surface form -> (value, form)
    critical: frozenset[str]
    singular: frozenset[str]
    neutral: frozenset[str]
    leading_only: bool
    polarity: tuple[tuple[str, str], ...]
    agreement_nouns: tuple[str, ...] = ()
    agreement_generic: tuple[tuple[str, str], ...] = ()
    agreement_verbs: tuple[tuple[str, str], ...] = ()
    groups: tuple[tuple[str, str], ...] = ()  # (value, group): a value is replaced within its group

    @classmethod
    def parse(cls, name: str, spec: Mapping[str, Any], where: str) -> ValueClass:
        forms = tuple(spec.get("forms") or ("word",))
        values: dict[str, tuple[str, ...]] = {}
        phrases: dict[tuple[str, ...], tuple[str, int]] = {}
        for value, surf in (spec.get("values") or {}).items():
            surf = tuple(str(s) for s in surf)
            if len(surf) != len(forms):
                raise PairforgeError(f"{where}: classes.{name}.values.{value} has {len(surf)} "
                                     f"form(s) but forms lists {len(forms)}; give one per form")
            values[str(value)] = surf
            for k, s in enumerate(surf):
                phrases[tuple(s.lower().split())] = (str(value), k)
        for value, surf in (spec.get("synonyms") or {}).items():
            if str(value) not in values:
                raise PairforgeError(f"{where}: classes.{name}.synonyms.{value} names no value "
                                     f"of the class; add it to values first")
            for s in surf:
                phrases.setdefault(tuple(str(s).lower().split()), (str(value), -1))
        if not values:
            raise PairforgeError(f"{where}: classes.{name} has no values")
        critical = spec.get("critical") or [w for p in phrases for w in p]
        agree = spec.get("agreement") or {}
        groups = []
        for group, members in (spec.get("groups") or {}).items():
            for v in members or ():
                if str(v) not in values:
                    raise PairforgeError(f"{where}: classes.{name}.groups.{group} names '{v}', which is "
                                         f"not a value of the class; add it to values first")
                groups.append((str(v), str(group)))
        return cls(name, forms, values, phrases, frozenset(w.lower() for w in critical),
                   frozenset(map(str, spec.get("singular") or ())),
                   frozenset(map(str, spec.get("neutral") or ())), bool(spec.get("leading_only")),
                   tuple((str(a), str(b)) for a, b in spec.get("polarity") or ()),
                   tuple(agree.get("nouns") or ()),
                   tuple((str(a), str(b)) for a, b in (agree.get("generic") or {}).items()),
                   tuple((str(a), str(b)) for a, b in (agree.get("verbs") or {}).items()),
                   tuple(groups))

    def grammatical_number(self, value: str) -> str:
        """"singular", "neutral" or "plural" (only meaningful for classes that declare them)."""
        return "singular" if value in self.singular else "neutral" if value in self.neutral else "plural"

    def replacements(self, span: Span) -> list[str]:
        """The other values that may replace ``span``'s. Without ``agreement`` rules a
        singular value is replaced only by singular or neutral ones, a plural one only by
        plural or neutral ones; with them any value goes (the noun and verb follow)."""
        out = [v for v in self.values if v != span.value]
        group = dict(self.groups)
        if span.value in group:  # "dog" -> another animal, "man" -> another person
            out = [v for v in out if group.get(v) == group[span.value]]
        if (self.singular or self.neutral) and not self.agreement_nouns:
            ok = self.singular | self.neutral if span.value in self.singular \
                else set(self.values) - self.singular
            out = [v for v in out if v in ok]
        return out

    def surface(self, value: str, form: int) -> str:
        return self.values[value][max(form, 0)]


@dataclass(frozen=True)
class YesNoRule:
    question: re.Pattern
    yes: str
    no: str


class VaprRules:
    """The parsed rules file. ``sha256`` identifies its content (part of the recipe params)."""

    def __init__(self, spec: Mapping[str, Any], *, where: str = "vapr rules", sha256: str = ""):
        self.where = where
        self.sha256 = sha256

        def rx(p: str, path: str) -> re.Pattern:
            try:
                return re.compile(p, re.IGNORECASE)
            except re.error as e:
                raise PairforgeError(f"{where}: {path}: bad regular expression {p!r} ({e})") from None

        self.filters: dict[str, tuple[str, list[re.Pattern], list[re.Pattern]]] = {}
        for name, f in (spec.get("filters") or {}).items():
            self.filters[name] = (str(f.get("reason", name)),
                                  [rx(p, f"filters.{name}") for p in f.get("question") or ()],
                                  [rx(p, f"filters.{name}") for p in f.get("answer") or ()])
        yn = spec.get("yesno") or {}
        self.yesno_answer = rx(yn.get("answer", r"^(yes|no)\s*[.!]?$"), "yesno.answer")
        self.yesno_rules = [YesNoRule(rx(r["question"], "yesno.rules"), r["yes"], r["no"])
                            for r in yn.get("rules") or ()]
        self.categorizer = [(str(r["task"]), [rx(p, f"categorizer.{r['task']}") for p in r["question"]])
                            for r in spec.get("categorizer") or ()]
        self.classes = {n: ValueClass.parse(n, c, where) for n, c in (spec.get("classes") or {}).items()}
        self.tasks: dict[str, tuple[str, ...]] = {}
        for task, names in (spec.get("tasks") or {}).items():
            for n in names:
                if n not in self.classes:
                    raise PairforgeError(f"{where}: tasks.{task} names class '{n}', which is not "
                                         f"in classes ({', '.join(self.classes)})")
            self.tasks[str(task)] = tuple(names)
        for task, _ in self.categorizer:
            if task not in self.tasks:
                raise PairforgeError(f"{where}: categorizer names task '{task}', which has no "
                                     f"entry in tasks")
        # every surface form of every class: words -> {class: (value, form)}
        self._index: dict[tuple[str, ...], dict[str, tuple[str, int]]] = {}
        for name, vc in self.classes.items():
            for words, hit in vc.phrases.items():
                self._index.setdefault(words, {})[name] = hit
        self._lengths = sorted({len(k) for k in self._index}, reverse=True)

    @classmethod
    def load(cls, path: str | Path | None = None) -> VaprRules:
        """Read a rules file (default: the packaged ``vapr_tasks.yaml``)."""
        path = Path(path) if path else DEFAULT_RULES
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise PairforgeError(f"vapr rules file {path}: cannot read it ({e.strerror}); pass an "
                                 f"existing YAML file as param rules, or leave it empty for the "
                                 f"packaged one") from None
        try:
            spec = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise PairforgeError(f"vapr rules file {path}: not valid YAML ({first})") from None
        if not isinstance(spec, Mapping):
            raise PairforgeError(f"vapr rules file {path}: expected a mapping with filters, yesno, "
                                 f"categorizer, classes and tasks")
        return cls(spec, where=str(path), sha256=hashlib.sha256(raw).hexdigest())

    # ------------------------------------------------------------------------- filters

    def filter_reason(self, question: str, answer: str) -> str | None:
        """``"<filter>: <reason>"`` for the first filter the example matches, else None."""
        q, a = question.strip(), answer.strip()
        for name, (reason, qs, ans) in self.filters.items():
            if any(p.search(q) for p in qs) or any(p.search(a) for p in ans):
                return f"{name}: {reason}"
        return None

    def is_yesno(self, answer: str) -> bool:
        return bool(self.yesno_answer.match(answer.strip()))

    def yesno_sentence(self, question: str, answer: str) -> str | None:
        """The bare yes/no ``answer`` as a full sentence built from ``question`` ("Yes." +
        "Is there a red circle in the image?" -> "Yes, there is a red circle in the image."),
        or None when no rule covers the question."""
        m = self.yesno_answer.match(answer.strip())
        if not m:
            return None
        yes = m.group(1).lower() == "yes"
        sentence = polarity.yesno_sentence(question, yes)
        if sentence is not None:
            return sentence
        q = question.strip().rstrip("?").strip()
        for rule in self.yesno_rules:
            qm = rule.question.match(q)
            if not qm:
                continue
            fields = {k: v for k, v in qm.groupdict().items() if v is not None}
            fields = {k: v.lower() if k in ("aux", "verb") else v for k, v in fields.items()}
            if "verb" in fields:
                fields["verb_s"] = third_person(fields["verb"]) if fields.get("aux") == "does" \
                    else fields["verb"]
            text = (rule.yes if yes else rule.no).format(**fields)
            if polarity.double_negation(text):  # a YAML rule meeting a negated question
                continue
            return text[:1].upper() + text[1:]
        return None

    # ------------------------------------------------------------------------- answer values

    def question_type(self, question: str, task: str) -> str:
        """The type of value a question asks for, for the answer vocabularies collected from
        the data: the noun after "what"/"which" ("What sport ..." -> "sport", "What kind of
        animal ..." -> "animal"), or "<task>" ("How many ..." -> "counting")."""
        m = _QTYPE.match(question.strip().lower())
        if m and m.group(1) not in _NOT_A_TYPE:
            return {"colour": "color", "colors": "color", "colours": "color"}.get(m.group(1), m.group(1))
        return task

    def alternatives(self, question: str) -> list[str]:
        """The options of an alternative question ("Is the fence wooden or metal?" -> [wooden,
        metal]; "Is the cup to the left or to the right of the plate?" -> [left, right]), or []."""
        m = _ALTERNATIVE.search(question.strip().lower())
        if not m:
            return []
        a, b = m.group(1), m.group(2)
        return [a, b] if a != b else []

    def short_sentence(self, question: str, answer: str) -> str | None:
        """A short answer as a sentence from the question, where a pattern fits: "What colour
        is the car?" + "red" -> "The car is red."; "What is the man holding?" + "umbrella" ->
        "The man is holding an umbrella."; "How many dogs are there?" + "2" -> "There are 2
        dogs."; "What is the red shape?" + "triangle" -> "The red shape is a triangle."."""
        v = self.short_value(answer)
        if v is None:
            return None
        q = question.strip().rstrip("?").strip()
        art = "an" if v[:1] in "aeiou" else "a"
        bare = v[:1].isdigit() or (v,) in self.classes["color"].phrases if "color" in self.classes else False
        m = re.match(r"(?i)^what colou?r (is|are) (the [\w ]+)$", q)
        if m:
            return f"{m.group(2)[:1].upper()}{m.group(2)[1:]} {m.group(1).lower()} {v}."
        m = re.match(r"(?i)^how many ([\w ]+?) (?:are there|can you see|are (?:in|on) the [\w ]+)$", q)
        if m and v not in ("1", "one"):
            return f"There are {v} {m.group(1)}."
        m = re.match(r"(?i)^what is (the [\w ]+?) (holding|wearing|eating|riding|carrying|playing)$", q)
        if m:
            return f"{m.group(1)[:1].upper()}{m.group(1)[1:]} is {m.group(2).lower()} {'' if bare else art + ' '}{v}."
        m = re.match(r"(?i)^what is (the [\w ]+)$", q)
        if m and not bare:
            return f"{m.group(1)[:1].upper()}{m.group(1)[1:]} is {art} {v}."
        return None

    def short_value(self, answer: str) -> str | None:
        """The value a short answer (at most ``SHORT_WORDS`` words, no yes/no) names, lower-cased
        without article and final punctuation ("A dog." -> "dog"), or None."""
        ws = [w.text for w in tokens(answer)]
        if not ws or len(ws) > SHORT_WORDS or self.is_yesno(answer) or ws[0] in ("yes", "no"):
            return None
        if ws[0] in ("a", "an", "the", "some") and len(ws) > 1:
            ws = ws[1:]
        return " ".join(ws)

    # ------------------------------------------------------------------------- categorizer

    def categorize(self, question: str) -> str | None:
        """The task of the first categorizer rule matching ``question``; None if none does."""
        q = question.strip()
        for task, patterns in self.categorizer:
            if any(p.search(q) for p in patterns):
                return task
        return None

    # ------------------------------------------------------------------------- spans

    def spans(self, text: str, classes: Sequence[str]) -> list[Span]:
        """Values of ``classes`` in ``text``, left to right, longest phrase first (across
        classes; a tie goes to the class listed first). Phrase words must be separated by
        whitespace only. A ``leading_only`` class counts only as the answer's first word."""
        words = tokens(text)
        texts = [w.text for w in words]
        # a phrase may only span word gaps that are pure whitespace
        joined = [not text[a.end:b.start].strip() for a, b in zip(words, words[1:])]
        out = []
        i = 0
        while i < len(words):
            hit = None
            for n in self._lengths:
                if n > len(words) - i or (n > 1 and not all(joined[i:i + n - 1])):
                    continue
                found = self._index.get(tuple(texts[i:i + n]))
                if not found:
                    continue
                for c in classes:
                    if c in found and not (self.classes[c].leading_only and i > 0):
                        value, form = found[c]
                        hit = Span(words[i].start, words[i + n - 1].end, i, n, c, value, form)
                        break
                if hit:
                    break
            if hit:
                out.append(hit)
                i += hit.n
            else:
                i += 1
        return out

    def editable_spans(self, answer: str, question: str, task: str) -> list[Span]:
        """The task-critical spans of ``answer`` a minimal edit may replace: values of the
        task's classes that are not part of a phrase copied from the question (a referring
        expression such as "the blue square" in "The shape left of the blue square is red")."""
        q_words = [w.text for w in tokens(question)]
        a_words = [w.text for w in tokens(answer)]
        return [s for s in self.spans(answer, self.tasks[task]) if not copied(s, a_words, q_words)]

    def critical_words(self, task: str) -> frozenset[str]:
        return frozenset().union(*(self.classes[c].critical for c in self.tasks[task]))


def copied(span: Span, answer_words: Sequence[str], question_words: Sequence[str]) -> bool:
    """Is ``span`` part of a phrase the answer repeats from the question: do its words together
    with the word before, or with the word after, occur contiguously in the question?"""
    own = list(answer_words[span.first:span.first + span.n])
    before = answer_words[span.first - 1:span.first] if span.first > 0 else []
    after = answer_words[span.first + span.n:span.first + span.n + 1]
    return any(ext and _contains(question_words, seq)
               for ext, seq in ((before, before + own), (after, own + after)))


def _contains(seq: Sequence[str], sub: Sequence[str]) -> bool:
    n = len(sub)
    return any(list(seq[i:i + n]) == list(sub) for i in range(len(seq) - n + 1))


