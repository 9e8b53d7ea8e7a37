"""Grade any free-text answer against the ground truth of a shapes-world example.

:func:`grade` returns ``"correct"``, ``"wrong"`` or ``"unparseable"``. It reads only the
example's ``target`` (and ``scene`` for captions), so it grades a model's sentence as well as
ours. Rules, by ``target["attribute"]``:

- ``kind`` / ``color`` / ``size`` / ``background``: the answer's words are mapped through a
  lexicon (plurals and synonyms: "disc" → circle, "violet" → purple, "big" → large, "grey" →
  gray, "black" background → dark, ...); words naming values outside the world ("oval",
  "cyan", "medium") count as stated values too. After the question's own referring
  expressions (``target["ignore"]``, e.g. "blue square" in "the shape to the right of the
  blue square") are removed, exactly one distinct value must remain: it decides correct or
  wrong; none, or two different ones (a contradiction), is unparseable. For backgrounds,
  background names win over plain colour words.
- ``count``: numbers as digits or words ("none"/"zero"/"no <noun>" are 0); one distinct
  number must remain.
- ``relation``: "left", "right", "above"/"over"/"on top of"/"higher", "below"/"under"/
  "beneath"/"underneath"/"lower"; exactly one distinct relation.
- ``yesno``: the "yes"/"no" opening the answer (or a later sentence, when punctuation follows
  it: "No." but not "No other shape ..."); both → unparseable. A whole sentence is judged:
  when the statement after the leading word restates the question's proposition and says
  the opposite of it ("Yes, the image does not contain a circle." to "Does the image contain
  a circle?", :func:`pairforge.recipes.vapr.polarity.coherent`), or states two counts that
  contradict it ("Yes, it has one red shape and three blue shapes." to "Are there more red
  shapes than blue shapes?"), the answer is ``incoherent``, whatever its leading word.
  Without one, existence questions (no ``relation`` in the target) read a negation ("no",
  "not", "cannot", "none", "n't") as no, and a plain statement as yes; comparisons without a
  yes/no are unparseable.
- ``caption`` (rule): each mention "[number|a] [size] [colour] kind(s)" (or "... shape(s)")
  must match scene objects — some object with all the stated attributes, and, when a number
  is stated, exactly that many; "N shapes" with no attribute must equal the object count; a
  background named before "background" (or after "background is") must be the scene's.
  Any violation → wrong. With no violation, correct when at least half of the objects
  (rounded up) are matched by some mention, wrong otherwise; no mention at all →
  unparseable.
- ``choice``: a standalone letter A-D (not the article "A ..."), else exactly one option's
  text; ``bbox``: exactly four numbers, correct when IoU with the true box ≥ 0.5 (values all
  ≤ 1 with a fraction are read as normalised); ``word``: the OCR word, case-insensitive.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from pairforge.errors import PairforgeError
from pairforge.recipes.vapr.polarity import coherent, split_lead
from pairforge.world.scenes import BACKGROUNDS, COLORS, KINDS, OCR_WORDS, PLURALS
from pairforge.world.tasks import OPTION_LETTERS, tokenize

GRADES = ("correct", "wrong", "unparseable", "incoherent")

COLOR_WORDS: dict[str, str] = {c: c for c in COLORS} | {
    "violet": "purple", "lilac": "purple", "magenta": "pink",
    # colours outside the palette: stated values that are never right
    "gray": "gray", "grey": "gray", "cyan": "cyan", "teal": "teal", "turquoise": "turquoise",
    "gold": "gold", "golden": "gold", "silver": "silver", "beige": "beige", "navy": "navy",
    "maroon": "maroon", "tan": "tan", "khaki": "khaki",
}
KIND_WORDS: dict[str, str] = {k: k for k in KINDS} | {p: k for k, p in PLURALS.items()} | {
    "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle", "circular": "circle",
    "round": "circle", "dot": "circle", "dots": "circle", "triangular": "triangle",
    "rhombus": "diamond", "rhombuses": "diamond", "plus": "cross", "squared": "square",
    # kinds outside the world
    "oval": "oval", "ovals": "oval", "ellipse": "oval", "rectangle": "rectangle",
    "rectangles": "rectangle", "hexagon": "hexagon", "hexagons": "hexagon", "pentagon": "pentagon",
    "pentagons": "pentagon", "heart": "heart", "hearts": "heart", "arrow": "arrow",
}
SIZE_WORDS: dict[str, str] = {"small": "small", "little": "small", "tiny": "small",
                              "large": "large", "big": "large", "huge": "large",
                              "medium": "medium"}
BACKGROUND_WORDS: dict[str, str] = {b: b for b in BACKGROUNDS} | {
    "grey": "gray", "light gray": "gray", "light grey": "gray",
    "pale blue": "light blue", "sky blue": "light blue", "baby blue": "light blue",
    "pale green": "light green", "mint": "light green", "mint green": "light green",
    "tan": "beige", "cream": "beige", "sand": "beige", "khaki": "beige",
    "black": "dark", "dark gray": "dark", "dark grey": "dark", "very dark": "dark",
    "charcoal": "dark", "dark blue": "dark blue", "dark green": "dark green",
}
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())} | {
    "none": 0, "single": 1}
RELATION_PATTERNS: dict[str, str] = {
    "left": r"\bleft\b", "right": r"\bright\b",
    "above": r"\babove\b|\bover\b|\bon top of\b|\bhigher\b",
    "below": r"\bbelow\b|\bunder\b|\bbeneath\b|\bunderneath\b|\blower\b",
}
_GENERIC = {"shape": False, "shapes": True, "object": False, "objects": True}
_HEADS = {"shape", "shapes", "object", "objects", "one", "ones"}


def grade(example: Mapping, answer: str) -> str:
    """``"correct"`` | ``"wrong"`` | ``"unparseable"`` for ``answer`` to ``example``'s question."""
    target = example["target"]
    attr, expected = target["attribute"], target["value"]
    text = " " + (answer or "").strip() + " "
    if attr == "caption":
        return _grade_caption(example["scene"], text)
    if attr == "yesno":
        return _grade_yesno(text, expected, target, str(example.get("question") or ""))
    if attr == "choice":
        return _grade_choice(text, expected, target.get("options") or [])
    if attr == "bbox":
        return _grade_bbox(text, target["box"], example.get("scene"))
    if attr == "word":
        return _grade_word(text, expected)
    text = _strip(text.lower(), target.get("ignore") or [])
    if attr == "background":
        found = _phrases(text, BACKGROUND_WORDS)
        if not found:
            found = {COLOR_WORDS[w] for w in _words(text) if w in COLOR_WORDS}
        return _verdict(found, expected)
    if attr == "relation":
        found = {r for r, pat in RELATION_PATTERNS.items() if re.search(pat, text)}
        return _verdict(found, expected)
    if attr == "count":
        return _verdict(_numbers(text), int(expected))
    lexicon = {"kind": KIND_WORDS, "color": COLOR_WORDS, "size": SIZE_WORDS}.get(attr)
    if lexicon is None:
        raise PairforgeError(f"target attribute {attr!r} is not gradable; expected one of kind, color, "
                         f"size, count, relation, yesno, background, caption, choice, bbox, word")
    return _verdict({lexicon[w] for w in _words(text) if w in lexicon}, expected)


# ----------------------------------------------------------------------------- parsing helpers


def _verdict(found: set, expected) -> str:
    if len(found) != 1:
        return "unparseable"
    return "correct" if next(iter(found)) == expected else "wrong"


def _words(text: str) -> list[str]:
    """Lower-cased words, whole numbers and punctuation marks."""
    return re.findall(r"[a-z]+|\d+|[^\sa-z\d]", text.lower())


def _phrases(text: str, lexicon: Mapping[str, str]) -> set[str]:
    """Values of the lexicon phrases in ``text``, longest phrase first, each span used once."""
    found = set()
    for phrase in sorted(lexicon, key=len, reverse=True):
        pat = re.compile(r"\b" + re.escape(phrase) + r"\b")
        if pat.search(text):
            found.add(lexicon[phrase])
            text = pat.sub(" ", text)
    return found


def _strip(text: str, phrases: list[str]) -> str:
    """Remove the question's referring expressions; in a phrase of two or more words the last
    may be replaced by a generic head ("blue square" also strips "blue shape", "blue one")."""
    for p in sorted(phrases, key=len, reverse=True):
        words = p.lower().split()
        if not words:
            continue
        last = [words[-1]] + (sorted(_HEADS) if len(words) > 1 else [])
        if words[-1] in KIND_WORDS:
            last.append(PLURALS.get(words[-1], words[-1]))
        pat = r"\b" + "".join(re.escape(w) + r"\s+" for w in words[:-1]) \
            + "(?:" + "|".join(re.escape(w) for w in last) + r")\b"
        text = re.sub(pat, " ", text)
    return text


def _numbers(text: str) -> set[int]:
    found = {int(m) for m in re.findall(r"\d+", text)}
    words = _words(text)
    for i, w in enumerate(words):
        if w in NUMBER_WORDS and not (w == "single" and i == 0):
            found.add(NUMBER_WORDS[w])
        elif w == "no" and i > 0 and (i + 1 == len(words) or words[i + 1] != ","):
            # "there are no circles", or "there is no ." once the question's "red shape" is
            # stripped; a leading "No," is an interjection
            found.add(0)
    return found


def _leading_yesno(text: str) -> set[str]:
    """The yes/no that open the answer's sentences: the first sentence's first word, or a later
    sentence's first word when punctuation follows it ("No other shape" is not an answer)."""
    out = set()
    words = _words(text)
    for i, w in enumerate(words):
        starts = i == 0 or words[i - 1] in (".", "!", "?", ";")
        if not starts or w not in ("yes", "yeah", "yep", "no", "nope"):
            continue
        if i == 0 or (i + 1 == len(words) or not words[i + 1].isalnum()):
            out.add("yes" if w.startswith("y") else "no")
    return out


def _grade_yesno(text: str, expected: str, target: Mapping, question: str = "") -> str:
    found = _leading_yesno(text)
    if len(found) == 1 and _incoherent(text, next(iter(found)), target, question):
        return "incoherent"
    if found:
        return _verdict(found, expected)
    if target.get("relation"):  # a comparison stated without yes/no: not parsed
        return "unparseable"
    low = text.lower()
    if re.search(r"\b(no|not|none|cannot|never)\b|n't\b", low):
        return _verdict({"no"}, expected)
    mentions = any(re.search(r"\b" + re.escape(p.lower()) + r"s?\b", low)
                   for p in target.get("ignore") or [])
    return _verdict({"yes"}, expected) if mentions else "unparseable"


def _incoherent(text: str, lead: str, target: Mapping, question: str) -> bool:
    """The leading yes/no disagrees with the sentence's own statement (see the module docstring)."""
    if question and coherent(text.strip(), question) is False:
        return True
    rel = target.get("relation")
    if rel not in ("more", "fewer", "same"):
        return False
    _, body = split_lead(text.strip())
    counts = [int(w) if w.isdigit() else NUMBER_WORDS.get(w, 0) for w in _words(body)
              if w.isdigit() or w in NUMBER_WORDS or w == "no"]
    if len(counts) != 2 or re.search(r"\b(more|fewer|less|as many|same|different)\b", body.lower()):
        return False
    a, b = counts
    says_yes = a > b if rel == "more" else a < b if rel == "fewer" else a == b
    return says_yes != (lead == "yes")


def _grade_choice(text: str, expected: str, options: list[str]) -> str:
    toks = tokenize(text)
    letters = {t for i, t in enumerate(toks) if t in OPTION_LETTERS  # "A red ..." is an article
               and not (t == "A" and i + 1 < len(toks) and toks[i + 1].isalpha())}
    if not letters:
        low = _words(text)
        letters = {OPTION_LETTERS[k] for k, o in enumerate(options) if o.lower() in low}
    return _verdict(letters, expected)


def _grade_bbox(text: str, box: list[int], scene: Mapping | None) -> str:
    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]
    if len(nums) != 4:
        return "unparseable"
    if scene and all(0 <= v <= 1 for v in nums) and any(v != int(v) for v in nums):
        w, h = scene["width"], scene["height"]
        nums = [nums[0] * w, nums[1] * h, nums[2] * w, nums[3] * h]
    return "correct" if iou(nums, box) >= 0.5 else "wrong"


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _grade_word(text: str, expected: str) -> str:
    toks = tokenize(text)
    found = {t.upper() for t in toks if t.upper() in OCR_WORDS or (t.isupper() and len(t) >= 2)}
    return _verdict(found, expected.upper())


# ----------------------------------------------------------------------------- captions


def _mentions(text: str) -> list[dict]:
    """Object mentions "[number|a] [size] [colour] head" in reading order."""
    words = _words(text)
    out = []
    for i, w in enumerate(words):
        if w in KIND_WORDS:
            m = {"kind": KIND_WORDS[w]}
        elif w in _GENERIC:
            m = {}
        else:
            continue
        j = i - 1
        while j >= 0:
            p = words[j]
            if p in COLOR_WORDS and "color" not in m:
                m["color"] = COLOR_WORDS[p]
            elif p in SIZE_WORDS and "size" not in m:
                m["size"] = SIZE_WORDS[p]
            elif p in NUMBER_WORDS or p.isdigit():
                m["count"] = int(p) if p.isdigit() else NUMBER_WORDS[p]
                break
            elif p == "no":  # "no red circles": a count of zero
                m["count"] = 0
                break
            elif p not in ("light", "dark"):  # an article or any other word ends the mention
                break
            j -= 1
        out.append(m)
    return out


def _mention_hits(objs: Sequence[Mapping], m: dict) -> tuple[bool, list[int]]:
    """Whether mention ``m`` holds in the scene, and the objects it names."""
    attrs = {k: m[k] for k in ("kind", "color", "size") if k in m}
    hits = [i for i, o in enumerate(objs) if all(o[k] == v for k, v in attrs.items())]
    ok = len(hits) == m["count"] if "count" in m else bool(hits)
    return ok, hits if ("kind" in attrs or "color" in attrs) else []


def caption_credit(example: Mapping, answer: str) -> dict[str, float] | None:
    """Partial credit of a caption (``target["attribute"] == "caption"``), beside its all-or-
    nothing :func:`grade`: ``precision``, the share of its object mentions that hold in the
    scene (the same rule as :func:`grade`: attributes present, and the exact number when one
    is stated), and ``recall``, the share of the scene's objects named by a mention that
    holds. None when the answer has no object mention (``grade`` says unparseable)."""
    if example["target"]["attribute"] != "caption" or not example.get("scene"):
        raise PairforgeError("caption_credit: the example is not a captioning example with a scene")
    objs = example["scene"]["objects"]
    mentions = [m for m in _mentions(" " + (answer or "").strip() + " ")
                if "kind" in m or "color" in m or "count" in m]
    if not mentions:
        return None
    covered: set[int] = set()
    ok = 0
    for m in mentions:
        holds, hits = _mention_hits(objs, m)
        ok += holds
        if holds:
            covered.update(hits)
    return {"precision": ok / len(mentions), "recall": len(covered) / len(objs) if objs else 1.0}


def _grade_caption(scene: Mapping | None, text: str) -> str:
    if not scene:
        return "unparseable"
    objs = scene["objects"]
    low = text.lower()
    # two passes: in one alternation "the background is red" would match "the background" only
    named_phrases = [m.group(1) for m in re.finditer(r"\b([a-z]+(?: [a-z]+)?) background\b", low)]
    named_phrases += [m.group(1) for m in
                      re.finditer(r"\bbackground is (?:a |an )?([a-z]+(?: [a-z]+)?)", low)]
    for phrase in named_phrases:
        named = _phrases(phrase, BACKGROUND_WORDS) or {COLOR_WORDS[w] for w in phrase.split()
                                                       if w in COLOR_WORDS}
        if named and named != {scene["background"]}:
            return "wrong"
    mentions = _mentions(text)
    if not any(("kind" in m or "color" in m) for m in mentions) and not any("count" in m for m in mentions):
        return "unparseable"
    covered = set()
    for m in mentions:
        holds, hits = _mention_hits(objs, m)
        if not holds:
            return "wrong"
        covered.update(hits)
    return "correct" if len(covered) >= math.ceil(len(objs) / 2) else "wrong"
