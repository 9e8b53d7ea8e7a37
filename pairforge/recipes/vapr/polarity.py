"""Yes/no answers as propositions: a yes/no question turned into a declarative sentence, the
polarity (negated or not) of a sentence's first clause, negation inserted or removed, and the
coherence of a "Yes, ..."/"No, ..." answer with the question it answers.

Pure string logic, no data file: English auxiliaries, contractions and do-support are grammar,
not vocabulary. Used by the VaPR rule editor (the rejected answer of a yes/no answer states the
opposite proposition in its body and flips the leading word), by VaPR's validator (coherence,
double negation, lead-only flips) and by the shapes world's grader (``incoherent``).

Reading of negated questions: an answer is read literally. "Yes" to "Is there not a red
shape?" (or "Isn't there a red shape?") confirms the question's proposition as written (there
is no red shape); "No" denies it. So a coherent answer has ``lead == "yes"`` exactly when its
body's polarity equals the question's.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

#: Words with an inner apostrophe ("isn't") or digits; punctuation is not a word.
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+")

CONTRACTIONS = {"isn't": "is", "aren't": "are", "wasn't": "was", "weren't": "were", "doesn't": "does",
                "don't": "do", "didn't": "did", "can't": "can", "couldn't": "could", "won't": "will",
                "wouldn't": "would", "shouldn't": "should", "hasn't": "has", "haven't": "have",
                "hadn't": "had", "mustn't": "must", "ain't": "is"}
BE = {"is", "are", "was", "were", "am"}
MODAL = {"can", "could", "will", "would", "should", "shall", "may", "might", "must"}
HAVE = {"has", "have", "had"}
DO = {"does", "do", "did"}
AUX = BE | MODAL | HAVE | DO
#: Negation markers ("no" only as a determiner inside the body, never the leading answer word).
NEGATIONS = {"not", "no", "never", "cannot", "none", "nobody", "nothing", "neither", "nor"} | set(CONTRACTIONS)
_STRONG = {"not", "never", "cannot"} | set(CONTRACTIONS)  # a marker after which another is a double negation
#: Pairs of words whose swap flips a comparison ("larger" -> "smaller").
ANTONYMS = {"larger": "smaller", "bigger": "smaller", "smaller": "larger", "more": "fewer",
            "fewer": "more", "less": "more", "same": "different", "different": "same",
            "taller": "shorter", "shorter": "taller", "higher": "lower", "lower": "higher",
            "wider": "narrower", "narrower": "wider", "heavier": "lighter", "older": "younger",
            "younger": "older", "longer": "shorter", "closer": "farther", "farther": "closer",
            "left": "right", "right": "left", "above": "below", "below": "above"}
_PAST = {"have": "had", "see": "saw", "wear": "wore", "hold": "held", "eat": "ate", "make": "made",
         "ride": "rode", "sit": "sat", "stand": "stood", "run": "ran", "go": "went", "take": "took",
         "get": "got", "put": "put", "fly": "flew", "lie": "lay", "drink": "drank", "swim": "swam",
         "throw": "threw", "catch": "caught", "do": "did", "come": "came", "give": "gave"}
#: Lexical verbs the converter recognises after do-support or in a declarative body (base form).
VERBS = {"contain", "have", "show", "include", "depict", "feature", "display", "look", "appear",
         "seem", "wear", "hold", "sit", "stand", "lie", "face", "point", "touch", "cover", "match",
         "need", "belong", "like", "eat", "ride", "play", "use", "carry", "fly", "work", "exist",
         "go", "run", "move", "make", "lean", "rest", "hang", "see", "represent", "overlap",
         "block", "reflect", "support", "sleep", "walk", "drink", "swim", "read", "watch", "cast",
         "throw", "catch", "smile", "grow", "float", "surround", "occupy", "fill", "take", "get",
         "come", "give", "put", "mean", "notice", "spot", "find", "observe", "own", "share"}
_SUBJ_PRONOUNS = {"it", "he", "she", "they", "this", "that", "these", "those", "you", "we", "i",
                  "there", "someone", "anyone", "everyone", "something", "anything"}
_DETERMINERS = {"the", "this", "that", "these", "those", "a", "an", "his", "her", "its", "their",
                "my", "your", "our", "any", "some", "no", "each", "every", "both", "all"}
#: Words that start a predicate after "is/are SUBJ" ("Is the man wearing ...", "Is the cat on ...").
_PRED_START = {"a", "an", "the", "in", "on", "at", "under", "above", "below", "behind", "near", "next",
               "to", "inside", "outside", "over", "beside", "between", "from", "with", "without",
               "made", "able", "present", "visible", "shown", "pictured", "depicted", "there", "here",
               "open", "closed", "empty", "full", "same", "different", "any", "some", "more", "less",
               "fewer", "as", "part", "used", "being", "going", "located", "placed", "positioned",
               "not", "no", "all", "both", "one", "two", "three", "four", "five", "larger", "smaller",
               "bigger", "taller", "shorter", "higher", "lower", "closer", "farther", "further",
               "facing", "covered", "filled", "into", "onto", "out", "off", "up", "down", "by",
               "real", "true", "possible", "likely", "safe", "new", "old", "clean", "dirty", "wet", "dry",
               "round", "square", "turned", "lit", "broken", "parked", "alone", "together", "wooden",
               "metal", "plastic", "hot", "cold", "tall", "short", "long", "big", "small", "large",
               "tiny", "huge", "bright", "dark", "light", "striped", "plain", "happy", "sad", "asleep",
               "awake", "moving", "still", "also", "currently", "really", "of", "for", "about", "like",
               "around", "across", "along", "against", "among", "beneath", "underneath", "within"}
_PARTICIPLES = {"taken", "eaten", "written", "hidden", "given", "frozen", "chosen", "fallen", "seen",
                "done", "worn", "held", "built", "cut", "hung", "drawn", "sold", "made", "left", "lit"}
_STOP = AUX | NEGATIONS | _DETERMINERS | {
    "yes", "there", "image", "picture", "photo", "photograph", "scene", "i", "you", "me", "see", "visible",
    "present", "in", "of", "on", "at", "to", "any", "some", "a", "an", "it", "its", "contain", "show",
    "include", "depict", "and", "or", "what", "which", "shown", "pictured", "depicted", "here", "than", "as"}


@dataclass(frozen=True)
class Word:
    text: str  # lower-cased, apostrophes normalised
    start: int
    end: int


@functools.lru_cache(maxsize=16384)
def words(text: str) -> tuple[Word, ...]:
    """The words of ``text`` (lower-cased, apostrophes normalised) with their character spans."""
    return tuple(Word(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text.replace("’", "'")))


_LEAD = re.compile(r"^\s*(?:(yes|yeah|yep)\b[\s,.!;:]*|(no|nope)\b(?:\s*[,.!;:]+\s*|\s*$))", re.IGNORECASE)


def split_lead(answer: str) -> tuple[str | None, str]:
    """(``"yes"`` | ``"no"`` | None, the body after it). "No" counts only when punctuation or the
    end follows it ("No red circle is there." is a determiner, not an answer)."""
    m = _LEAD.match(answer.replace("’", "'"))
    if not m:
        return None, answer.strip()
    return ("yes" if m.group(1) else "no"), answer[m.end():].strip()


def first_clause(body: str) -> str:
    """The body up to its first sentence or clause boundary (. ; ! ? or ", and/but/while ...")."""
    m = re.search(r"[.;!?](?:\s|$)|,\s*(?:and|but|while|because|although|so|which|who)\b|\s+but\s", body)
    return body[:m.start()] if m else body


def negation_count(text: str) -> int:
    """Negation markers in ``text`` (not, n't, no, never, cannot, none, ...)."""
    return sum(w.text in NEGATIONS or w.text.endswith("n't") for w in words(text))


def double_negation(text: str) -> bool:
    """A negation governing another one within two words ("is not no", "can't see no",
    "does not not contain", "there is not not a ...")."""
    ws = words(text)
    return any((w.text in _STRONG or w.text.endswith("n't"))
               and any(v.text in NEGATIONS or v.text.endswith("n't") for v in ws[i + 1:i + 3])
               for i, w in enumerate(ws))


def _stem(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[-3] in "sxz":
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


@functools.lru_cache(maxsize=16384)
def content(text: str) -> frozenset[str]:
    """Stemmed content words (function words, auxiliaries, negations, yes/no removed)."""
    out = set()
    for w in words(text):
        if w.text in _STOP or w.text.endswith("n't"):
            continue
        lem = _lemma(w.text)
        base = lem[0] if lem else _stem(w.text)
        if base not in _STOP:
            out.add(base)
    return frozenset(out)


def polarity(body: str, question: str = "") -> bool:
    """True when the first clause of ``body`` is negated: an odd number of negation markers,
    or an antonym of one of the question's comparison words standing in for it ("smaller" for
    a question about "larger") - each counts as one negation."""
    clause = first_clause(body)
    n = negation_count(clause)
    qw = {w.text for w in words(question)}
    cw = {w.text for w in words(clause)}
    if any(a in cw and q not in cw for q in qw & set(ANTONYMS) for a in _antonyms(q)):
        n += 1
    return n % 2 == 1


def _antonyms(word: str) -> set[str]:
    return ({ANTONYMS[word]} if word in ANTONYMS else set()) | {w for w, a in ANTONYMS.items() if a == word}


def question_polarity(question: str) -> bool:
    """True when the yes/no question is negated ("Is there not ...", "Isn't ...", "Is no ... present")."""
    return negation_count(question) % 2 == 1


def restates(body: str, question: str) -> bool:
    """The body's first clause states the question's proposition (or its negation): every
    content word of the question is there, or an antonym of it."""
    q = content(question)
    if not q:
        return False
    b = content(first_clause(body))
    return all(w in b or any(_stem(a) in b for a in _antonyms(w)) for w in q)


def flippable(body: str, question: str) -> bool:
    """Whether flipping the body's polarity states the opposite answer: the body restates the
    question's proposition, or is a short echo ("it is", "there are"), or keeps the question's
    comparison word ("the larger of the two"). A body stating other facts ("it has two red
    shapes and three blue ones") is not flippable: negating it does not answer the question."""
    if restates(body, question):
        return True
    clause = first_clause(body)
    if len(words(clause)) <= 3:
        return True
    qw = {w.text for w in words(question)}
    cw = {w.text for w in words(clause)}
    return any(w in ANTONYMS and (w in qw or _antonyms(w) & qw) for w in cw)


def coherent(answer: str, question: str) -> bool | None:
    """Whether a "Yes, ..."/"No, ..." answer's leading word agrees with its body: True/False
    when the body restates the question's proposition, None when it cannot be told from the
    text (no leading yes/no, a bare yes/no, or a body about something else)."""
    lead, body = split_lead(answer)
    if lead is None or not body or not restates(body, question):
        return None
    return (lead == "yes") == (polarity(body, question) == question_polarity(question))


# ----------------------------------------------------------------------------- negation


def third_person(verb: str) -> str:
    """English third person singular: have -> has, contain -> contains, go -> goes."""
    if verb == "have":
        return "has"
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb in _PAST:
        return _PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2:-1] not in ("a", "e", "i", "o", "u"):
        return verb[:-1] + "ied"
    return verb + "ed"


def _lemma(word: str) -> tuple[str, str] | None:
    """(base form, tense "3sg" | "past" | "base") of a lexical verb form the converter knows."""
    return _FORMS.get(word)


_FORMS: dict[str, tuple[str, str]] = {}
for _v in sorted(VERBS):
    _FORMS.setdefault(_past(_v), (_v, "past"))
    _FORMS.setdefault(third_person(_v), (_v, "3sg"))
for _v in sorted(VERBS):
    _FORMS[_v] = (_v, "base")


def _case(orig: str, new: str) -> str:
    return new[:1].upper() + new[1:] if orig[:1].isupper() else new


def _article(next_word: str) -> str:
    return "an" if next_word[:1].lower() in "aeiou" or next_word[:1] == "8" else "a"


def toggle_negation(body: str, question: str = "", *, minimal: bool = True) -> str | None:
    """``body`` with the polarity of its first clause flipped (:func:`_toggle`). ``minimal``
    (the rule editor's rejected answers): the fewest changed words - "does not contain" ->
    "does contain", "contains a" -> "contains no"; else (chosen sentences) the plain forms -
    "does not contain" <-> "contains"."""
    out = _toggle(body, question, minimal)
    if out is None or out == body:
        return None
    # "do not see any cars" <-> "see some cars": the quantifier follows the polarity
    was_neg = polarity(body, question)
    head = len(out) - len(body) + len(first_clause(body))
    clause = out[:head]
    if was_neg:
        clause = re.sub(r"\bany\b", "some", clause, count=1)
    else:
        clause = re.sub(r"\b(not \w+ |not |n't \w+ |cannot \w+ |no )some\b", lambda m: m.group(1) + "any",
                        clause, count=1)
    return clause + out[head:]


def _toggle(body: str, question: str, minimal: bool = True) -> str | None:
    """``body`` with the polarity of its first clause flipped by the smallest edit: an
    existing negation removed ("there is not a" -> "there is a", "does not contain" ->
    "contains", "cannot" -> "can", "no circle" -> "a circle"), else an antonym of a question's
    comparison word swapped back, else a negation inserted after the first auxiliary or through
    do-support ("is" -> "is not", "there is a" -> "there is no", "contains" -> "does not
    contain", "can" -> "cannot"). None when the clause offers no place to do it."""
    clause = first_clause(body)
    ws = [w for w in words(body) if w.end <= len(clause)]
    text = body
    for i, w in enumerate(ws):
        t = w.text
        nxt = ws[i + 1] if i + 1 < len(ws) else None
        prev = ws[i - 1] if i else None
        if t == "cannot":
            return text[:w.start] + _case(text[w.start:w.end], "can") + text[w.end:]
        if t.endswith("n't") and t in CONTRACTIONS:
            aux = CONTRACTIONS[t]
            if aux in DO and nxt and _lemma(nxt.text) and not minimal:
                return _undo_support(text, w, nxt, aux)
            return text[:w.start] + _case(text[w.start:w.end], aux) + text[w.end:]
        if t == "not" and prev is not None:
            if prev.text in DO and nxt and _lemma(nxt.text) and not minimal:
                return _undo_support(text, prev, nxt, prev.text, not_word=w)
            return text[:prev.end] + text[w.end:]
        if t == "no" and nxt is not None:
            after = text[w.end:].lstrip()
            if prev is not None and prev.text in ("are", "were"):
                plural = True
            elif prev is not None and prev.text in ("is", "was"):
                plural = False
            else:
                plural = nxt.text.endswith("s") and not nxt.text.endswith("ss")
            asked_any = re.search(r"\bany\b", question, re.IGNORECASE) is not None
            new = "some" if plural or asked_any else _article(after)
            return text[:w.start] + _case(text[w.start:w.end], new) + text[w.end:]
        if t in ("nothing", "nobody", "none"):
            new = {"nothing": "something", "nobody": "somebody", "none": "some"}[t]
            return text[:w.start] + _case(text[w.start:w.end], new) + text[w.end:]
    qw = {w.text for w in words(question)}
    cw = {w.text for w in ws}
    for w in ws:
        if w.text in ANTONYMS and w.text not in qw and any(q in qw and q not in cw for q in _antonyms(w.text)):
            q = next(q for q in sorted(_antonyms(w.text)) if q in qw)
            before = text[:w.start]
            if q == "same" and not re.search(r"\bthe\s+$", before, re.IGNORECASE):
                q = "the same"
            if w.text == "same" and re.search(r"\bthe\s+$", before, re.IGNORECASE):
                before = re.sub(r"\bthe\s+$", "", before, flags=re.IGNORECASE)
            return before + _case(text[w.start:w.end], q) + text[w.end:]
    return _negate(text, ws, minimal)


def _undo_support(text: str, aux: Word, verb: Word, aux_text: str, not_word: Word | None = None) -> str:
    """"does not contain" -> "contains", "don't see" -> "see", "did not see" -> "saw"."""
    base, _ = _lemma(verb.text)
    new = third_person(base) if aux_text == "does" else _past(base) if aux_text == "did" else base
    return text[:aux.start] + _case(text[aux.start:aux.end], new) + text[verb.end:]


def _negate(text: str, ws: list[Word], minimal: bool = True) -> str | None:
    for i, w in enumerate(ws):
        t = w.text
        nxt = ws[i + 1] if i + 1 < len(ws) else None
        if t in BE:
            if i > 0 and ws[i - 1].text == "there" and nxt is not None and nxt.text in ("a", "an", "any", "some"):
                return text[:nxt.start] + "no" + text[nxt.end:]
            if i > 0 and ws[i - 1].text == "there" and nxt is not None and nxt.text not in (
                    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many",
                    "several", "more", "fewer", "as", "only", "exactly", "at", "both", "either", "all", "the",
                    "lots", "plenty", "enough") and not nxt.text.isdigit():
                return text[:w.end] + " no" + text[w.end:]
            return text[:w.end] + " not" + text[w.end:]
        if t == "can":
            return text[:w.start] + _case(text[w.start:w.end], "cannot") + text[w.end:]
        if t in MODAL or t in DO and nxt is not None and _lemma(nxt.text):
            return text[:w.end] + " not" + text[w.end:]
        if t in HAVE and nxt is not None and (nxt.text in ("been", "got") or nxt.text.endswith(("ed", "en"))):
            return text[:w.end] + " not" + text[w.end:]
        lem = _lemma(t)
        if lem and i > 0:
            base, tense = lem
            subj = ws[i - 1].text
            if tense == "base" and subj not in ("i", "you", "we", "they") and not subj.endswith("s"):
                continue
            if minimal and nxt is not None and nxt.text in ("a", "an", "any", "some"):
                return text[:nxt.start] + _case(text[nxt.start:nxt.end], "no") + text[nxt.end:]
            aux = "does" if tense == "3sg" else "did" if tense == "past" else "do"
            return text[:w.start] + f"{aux} not {base}" + text[w.end:]
    return None


def flip_answer(answer: str, question: str = "") -> str | None:
    """The opposite answer of a "Yes, ..."/"No, ..." answer: the leading word flipped and the
    body's proposition negated or affirmed (:func:`toggle_negation`); a bare "Yes."/"No." just
    flips. None when the answer has no leading yes/no or its body offers no place to flip."""
    lead, body = split_lead(answer)
    if lead is None:
        return None
    m = _LEAD.match(answer.replace("’", "'"))
    head = answer[:m.end()]
    word = re.match(r"\s*(\w+)", head)
    new_lead = _case(word.group(1), "no" if lead == "yes" else "yes")
    head = head[:word.start(1)] + new_lead + head[word.end(1):]
    if not body:
        return head
    if not flippable(body, question):
        return None
    flipped = toggle_negation(body, question)
    if flipped is None:
        return None
    if not re.search(r"[,.!;:]\s*$", head):  # "Yes there is" -> "No there is not"
        head = head.rstrip() + " "
    return head + flipped


# ----------------------------------------------------------------------------- questions -> sentences


@dataclass(frozen=True)
class Proposition:
    """A yes/no question as a declarative body (without final period): ``text`` states the
    question's proposition as asked (negation included); ``negated``: the question is negated."""

    text: str
    negated: bool


_PREFIX = re.compile(r"^(?:(?:in|from|looking at|based on|according to) (?:the|this) "
                     r"(?:image|picture|photo|photograph|scene)\s*,?\s*|(?:please|tell me|answer)\s*[,:]?\s*)",
                     re.IGNORECASE)


def declarative(question: str) -> Proposition | None:
    """The yes/no ``question`` as a statement: auxiliary inversion undone ("Is the cat on the
    sofa?" -> "the cat is on the sofa"; "Does the image contain a dog?" -> "the image contains
    a dog"; "Can you see X?" -> "I can see X"; "Are there any X?" -> "there are some X"; "Is
    X present?" -> "X is present"), negations and contractions kept ("Isn't there a cat?" ->
    "there is not a cat"). None for anything else (wh-questions, several sentences)."""
    q = question.strip().replace("’", "'")
    q = re.sub(r"^<image>\s*", "", q).strip()
    if "\n" in q:
        q = q.splitlines()[-1].strip()
    q = q.rstrip("?").strip()
    q = _PREFIX.sub("", q)
    ws = words(q)
    if len(ws) < 2 or not q[:1].isalpha():
        return None
    first = ws[0].text
    neg = False
    if first in CONTRACTIONS:
        aux, neg = CONTRACTIONS[first], True
    elif first in AUX:
        aux = first
    else:
        return None
    rest_ws = ws[1:]
    if rest_ws and rest_ws[0].text == "not":  # "Is not the cat ..." (rare)
        neg, rest_ws = True, rest_ws[1:]
    if not rest_ws:
        return None
    rest = q[rest_ws[0].start:]
    rws = words(rest)
    if aux in BE and rws[0].text == "there":
        body = rest[rws[1].start:] if len(rws) > 1 else ""
        if not body:
            return None
        bws = words(body)
        if bws[0].text == "not":
            neg, body = True, body[bws[0].end:].lstrip()
            bws = words(body)
        if not bws:
            return None
        if bws[0].text == "any":
            body = ("some" if not neg else "any") + body[bws[0].end:]
        return Proposition(f"there {aux}{' not' if neg else ''} {body}", neg or negation_count(body) % 2 == 1)
    split = _subject(rws, aux)
    if split is None:
        return None
    s_end, p_start = split
    subj = rest[:rws[s_end - 1].end]
    pred_ws = rws[p_start:]
    pred = rest[pred_ws[0].start:] if pred_ws else ""
    if pred_ws and pred_ws[0].text == "not":
        neg, pred = True, rest[pred_ws[0].end:].lstrip()
    pred_ws = words(pred)
    subj_l = subj.lower()
    if subj_l == "you":
        subj = "I"
    if aux == "am" or subj_l == "you" and aux in BE:
        aux = "am" if aux in ("are", "am") else aux
    if subj_l == "you" and aux == "were":
        aux = "was"
    if not pred:
        return None
    qneg = neg or negation_count(subj) % 2 == 1
    if aux in DO:
        if not pred_ws:
            return None
        lem = _lemma(pred_ws[0].text)
        base = lem[0] if lem else pred_ws[0].text
        after = pred[pred_ws[0].end:]
        if neg:
            return Proposition(f"{subj} {aux} not {base}{after}", True)
        verb = third_person(base) if aux == "does" else _past(base) if aux == "did" else base
        return Proposition(f"{subj} {verb}{_some(after)}", qneg)
    if aux == "can" and neg:
        return Proposition(f"{subj} cannot {pred}", True)
    return Proposition(f"{subj} {aux}{' not' if neg else ''} {pred if neg else _some(pred)}", qneg)


def _some(text: str) -> str:
    """A positive statement says "some" where the question said "any" ("see any trees")."""
    return re.sub(r"\bany\b", "some", text, count=1)


def _subject(ws: list[Word], aux: str) -> tuple[int, int] | None:
    """(end of the subject, start of the predicate) in words after the auxiliary."""
    if not ws:
        return None
    if ws[0].text in _SUBJ_PRONOUNS and not (
            ws[0].text in ("this", "that", "these", "those") and len(ws) > 2 and ws[1].text not in _PRED_START):
        return 1, 1
    if aux in BE and ws[-1].text in ("present", "visible", "there", "shown", "pictured", "depicted",
                                     "here", "seen") and len(ws) >= 2:
        k = len(ws) - 1
        # "Is a dog present in the image" - the subject ends before "present"
        for j, w in enumerate(ws):
            if w.text in ("present", "visible", "shown", "pictured", "depicted", "seen") and j > 0:
                k = j
                break
        return k, k
    for j, w in enumerate(ws):
        if w.text in ("present", "visible", "shown", "pictured", "depicted") and j > 0 and aux in BE:
            return j, j
    if aux in DO or aux in MODAL or aux in HAVE:
        for j, w in enumerate(ws[1:], 1):
            if _lemma(w.text) and _lemma(w.text)[1] == "base" or w.text in ("not", "been", "be"):
                return j, j
        return (2, 2) if len(ws) > 2 else None
    # is/are SUBJ PRED: the predicate starts at the first predicate word after the subject's head
    start = 0
    if ws[0].text in ("both", "either", "neither"):  # "both the cup and the plate" is one subject
        conj = next((k for k, w in enumerate(ws) if w.text in ("and", "or", "nor")), None)
        if conj is None:
            return None
        start = conj + 1
    while start < len(ws) - 1 and (ws[start].text in _DETERMINERS or ws[start].text.endswith("'s")):
        start += 1
    for j in range(start + 1, len(ws)):
        w = ws[j].text
        if w in _PRED_START or w in _PARTICIPLES or w.endswith("ing") and len(w) > 4 \
                or w.endswith("ed") and len(w) > 4:
            if w in ("light", "dark") and j + 1 < len(ws):  # "the light blue car"
                continue
            return j, j
    if len(ws) >= 2:
        return len(ws) - 1, len(ws) - 1  # "Is the sky blue": the last word is the predicate
    return None


def yesno_sentence(question: str, yes: bool) -> str | None:
    """A bare yes/no answer to ``question`` as a sentence: "Yes, <proposition>." or
    "No, <its negation>." (negated questions read literally, see the module docstring)."""
    prop = declarative(question)
    if prop is None:
        return None
    body = prop.text if yes else toggle_negation(prop.text, question, minimal=False)
    if body is None:
        return None
    body = body[:1].upper() + body[1:] if body.startswith("I ") else body
    return f"{'Yes' if yes else 'No'}, {body}."
