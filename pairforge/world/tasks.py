"""Questions and full-sentence answers generated from a scene's ground truth.

One builder per VaPR task category (:data:`TASKS`). Each picks something the ground truth
makes unambiguous (e.g. "what colour is the circle" only when the scene has exactly one
circle), phrases the question and the answer with a template drawn at random (at least
three answer phrasings per category), and records:

- ``answer_value`` and its character span in the answer: the task-critical value (colour,
  kind, size, count, relation phrase, Yes/No, background; for captions the colour of the
  first object described) — the span a VaPR minimal edit replaces;
- ``target``: what the grader needs (:mod:`pairforge.world.grader`): the asked ``attribute``
  and expected ``value``, the objects involved, and ``ignore`` phrases (the question's own
  referring expressions, stripped from an answer before parsing).

About 5 % of dataset rows are examples a VaPR build must filter out, marked in
``filter_reason``: ``text_only`` (no image; task ``counting`` or ``color``),
``multiple_choice`` (options A-D, the answer is a letter; task of the underlying question),
``bbox`` (the answer is ``[x0, y0, x1, y1]``; task ``referential``) and ``ocr`` (a word
drawn on the image; task ``object``).

Words: :func:`tokenize` splits text into letter runs, single digits and single punctuation
marks; :func:`vocabulary` lists every token the templates can emit (also capitalised).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from pairforge.errors import PairforgeError
from pairforge.world.scenes import (
    BACKGROUNDS, COLORS, KINDS, OCR_WORDS, PLURALS, SIZES, WORLD_NAME, Obj, Scene, render_scene,
)

TASKS: tuple[str, ...] = ("object", "color", "size", "counting", "spatial", "existence",
                          "referential", "background", "reasoning", "captioning")
FILTER_REASONS: tuple[str, ...] = ("text_only", "multiple_choice", "bbox", "ocr")

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of",
                             "above": "above", "below": "below"}
REGIONS: dict[tuple[int, int], str] = {(0, 0): "top left corner", (2, 0): "top right corner",
                                      (0, 2): "bottom left corner", (2, 2): "bottom right corner",
                                      (1, 1): "center"}
OPTION_LETTERS = ("A", "B", "C", "D")

# ----------------------------------------------------------------------------- templates
# "{V}" marks the answer value (its span is recorded); other fields are filled per example.

Q_OBJECT = ("What shape is the {ref}?", "What kind of shape is the {ref}?",
            "What type of shape is the {ref}?", "What is the form of the {ref}?",
            "Identify the shape of the {ref}.")
A_OBJECT = ("The {ref} is a {V}.", "It is a {V}.", "That shape is a {V}.",
            "The {ref} has the shape of a {V}.")

Q_COLOR = ("What colour is the {ref}?", "What color is the {ref}?",
           "What is the colour of the {ref}?", "Which color does the {ref} have?",
           "Tell me the colour of the {ref}.")
A_COLOR = ("The {ref} is {V}.", "It is {V}.", "The colour of the {ref} is {V}.",
           "The {ref} is {V} in colour.")

Q_SIZE = ("Is the {ref} small or large?", "Is the {ref} large or small?", "What size is the {ref}?",
          "How big is the {ref}?", "Is the {ref} big or small?")
A_SIZE = ("The {ref} is {V}.", "It is {V}.", "The {ref} is {V} in size.", "It is a {V} shape.")

Q_COUNT = ("How many {np} are there?", "How many {np} are in the image?",
           "How many {np} can you see?", "Count the {np} in the image.",
           "What is the number of {np} in the picture?")
A_COUNT_MANY = ("There are {V} {np}.", "I can see {V} {np}.", "The image contains {V} {np}.",
                "There are {V} {np} in the image.")
A_COUNT_ONE = ("There is {V} {np}.", "I can see {V} {np}.", "The image contains {V} {np}.",
               "There is {V} {np} in the image.")

Q_SPATIAL = ("Where is the {a} relative to the {b}?", "Where is the {a} compared to the {b}?",
             "What is the position of the {a} relative to the {b}?",
             "Where is the {a} located with respect to the {b}?")
A_SPATIAL = ("The {a} is {V} the {b}.", "It is {V} the {b}.", "The {a} lies {V} the {b}.",
             "It is located {V} the {b}.")

Q_EXIST = ("Is there {art} {np} in the image?", "Does the image contain {art} {np}?",
           "Can you see {art} {np}?", "Is there {art} {np} in the picture?")
A_EXIST_YES = ("{V}, there is {art} {np} in the image.", "{V}, the image contains {art} {np}.",
               "{V}, I can see {art} {np}.", "{V}, {art} {np} is present.")
A_EXIST_NO = ("{V}, there is no {np} in the image.", "{V}, the image does not contain {art} {np}.",
              "{V}, I cannot see {art} {np}.", "{V}, there is not {art} {np} in the picture.")

Q_REF_KIND = ("What is the shape {loc}?", "What shape is {loc}?", "Which shape can you see {loc}?",
              "What kind of shape is {loc}?")
A_REF_KIND = ("The shape {loc} is a {V}.", "It is a {V}.", "There is a {V} {loc}.", "That is a {V}.")
Q_REF_COLOR = ("What colour is the shape {loc}?", "What is the color of the shape {loc}?",
               "Which colour does the shape {loc} have?")
A_REF_COLOR = ("The shape {loc} is {V}.", "It is {V}.", "That shape is {V}.",
               "The colour of the shape {loc} is {V}.")

Q_BACKGROUND = ("What colour is the background?", "What is the background color?",
                "What color is the background of the image?", "What is the colour of the background?",
                "Describe the colour of the background.")
A_BACKGROUND = ("The background is {V}.", "The background colour is {V}.",
                "The shapes are on a {V} background.", "It is a {V} background.")

Q_MORE = ("Are there {cmp} {A} than {B}?", "Does the image have {cmp} {A} than {B}?",
          "Does the picture show {cmp} {A} than {B}?")
A_MORE_YES = ("{V}, there are {cmp} {A} than {B}.", "{V}, the image has {cmp} {A} than {B}.",
              "{V}, it has {cA} and {cB}.")
A_MORE_NO = ("{V}, there are not {cmp} {A} than {B}.", "{V}, the image does not have {cmp} {A} than {B}.",
             "{V}, it has {cA} and {cB}.")
Q_SAME = ("Are there as many {A} as {B}?", "Is the number of {A} the same as the number of {B}?",
          "Does the image have equally many {A} and {B}?")
A_SAME_YES = ("{V}, there are as many {A} as {B}.", "{V}, the number of {A} is the same as the number of {B}.",
              "{V}, it has {cA} and {cB}.")
A_SAME_NO = ("{V}, there are not as many {A} as {B}.", "{V}, the numbers of {A} and {B} are different.",
             "{V}, it has {cA} and {cB}.")
Q_LARGER = ("Is the {X} {cmp} than the {Y}?", "Compared to the {Y}, is the {X} {cmp}?",
            "Would you say the {X} is {cmp} than the {Y}?")
A_LARGER_YES = ("{V}, the {X} is {cmp} than the {Y}.", "{V}, it is {cmp} than the {Y}.",
                "{V}, the {X} is the {cmp} of the two.")
A_LARGER_NO = ("{V}, the {X} is {opp} than the {Y}.", "{V}, it is {opp} than the {Y}.",
               "{V}, the {X} is the {opp} of the two.")
COMPARATIVES = {"larger": "smaller", "bigger": "smaller", "smaller": "larger"}

Q_CAPTION = ("Describe the image.", "What does the image show?", "Give a short description of the scene.",
             "Describe what you see in the picture.", "Write a caption for this image.")
A_CAPTION = ("The image shows {n} {shapes} on a {bg} background: {L}.",
             "On a {bg} background, there {be} {n} {shapes}: {L}.",
             "This picture contains {L} on a {bg} background.",
             "I can see {L}. The background is {bg}.")

# filter examples (a VaPR build drops them)
Q_SIDES = "How many sides does a {kind} have?"
A_SIDES = ("A {kind} has {V} sides.", "It has {V} sides.", "Every {kind} has {V} sides.")
SIDES = {"triangle": 3, "square": 4, "diamond": 4}
SIDE_WORDS = {3: "three", 4: "four"}
Q_MIX = "What colour do you get when you mix {c1} and {c2}?"
A_MIX = ("Mixing {c1} and {c2} gives {V}.", "You get {V}.", "{c1} and {c2} make {V}.")
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
         ("red", "white"): "pink"}
Q_CHOICE_TAIL = "Answer with the letter of the correct option."
A_CHOICE = ("{V}", "{V}.", "The answer is {V}.")
Q_BBOX = ("Give the bounding box of the {ref}.", "What are the coordinates of the {ref}?",
          "Output the bounding box of the {ref} as [x0, y0, x1, y1].")
A_BBOX = ("{V}", "The {ref} is at {V}.", "The bounding box is {V}.")
Q_OCR = ("What word is written in the image?", "What does the text in the image say?",
         "Read the word in the image.")
A_OCR = ("The word is {V}.", "It says {V}.", "The text reads {V}.")


# ----------------------------------------------------------------------------- words


_TOKEN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def tokenize(text: str) -> list[str]:
    """The world's word split: runs of letters, single digits, single other characters
    (punctuation); whitespace separates and is dropped."""
    return _TOKEN.findall(text)


def _all_templates() -> list[str]:
    return [t for name, v in globals().items() if name[:2] in ("Q_", "A_")
            for t in ((v,) if isinstance(v, str) else v)]


def vocabulary() -> list[str]:
    """Every token (:func:`tokenize`) the generator can emit in a question or an answer, each
    also capitalised; sorted. Digits are single tokens, so any number is covered."""
    words: set[str] = set()
    for t in _all_templates():
        words.update(tokenize(re.sub(r"\{\w+\}", " ", t)))
    fillers: list[str] = [*COLORS, *BACKGROUNDS, *KINDS, *PLURALS.values(), *SIZES,
                          *NUMBER_WORDS.values(), *RELATIONS.values(), *REGIONS.values(),
                          *OCR_WORDS, *OPTION_LETTERS, *COMPARATIVES, *COMPARATIVES.values(),
                          *SIDE_WORDS.values(), "0123456789", "[ , ] . :",
                          "a an no Yes No is are and shape shapes object objects the more fewer"]
    for f in fillers:
        words.update(tokenize(f))
    words |= {w[:1].upper() + w[1:] for w in words}
    return sorted(words)


# ----------------------------------------------------------------------------- helpers


def _a(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _fill(template: str, value: str, **kw: str) -> tuple[str, int, int]:
    """Fill ``template``; returns the text and the span of the value put at ``{V}``."""
    pre, post = template.split("{V}")
    head = pre.format(**kw)
    text = head + value + post.format(**kw)
    text = text[:1].upper() + text[1:]
    return text, len(head), len(head) + len(value)


def _np(kind: str | None = None, color: str | None = None, size: str | None = None,
        plural: bool = False, noun: str = "shape") -> str:
    """Noun phrase: "small red circle", "red shapes", "circles", "shape"."""
    head = (PLURALS[kind] if plural else kind) if kind else (noun + "s" if plural else noun)
    return " ".join(w for w in (size, color, head) if w)


def _counted(n: int, **attrs: str) -> str:
    """"three red shapes", "one circle", "no squares"."""
    word = NUMBER_WORDS.get(n, "no") if n else "no"
    return f"{word} {_np(plural=n != 1, **attrs)}"


def _matches(o: Obj, attrs: dict[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def _count(scene: Scene, attrs: dict[str, str]) -> int:
    return sum(_matches(o, attrs) for o in scene.objects)


def describe(scene: Scene, i: int, fields: Sequence[Sequence[str]]) -> dict[str, str] | None:
    """The first attribute set in ``fields`` (e.g. ``[("kind",), ("size", "kind")]``) that
    singles out object ``i`` in the scene; None when none does."""
    o = scene.objects[i]
    for fs in fields:
        attrs = {f: getattr(o, f) for f in fs}
        if _count(scene, attrs) == 1:
            return attrs
    return None


_ANY = (("kind",), ("color", "kind"), ("size", "kind"), ("size", "color", "kind"))


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b`` ("left", "right", "above", "below") when it is
    clear: the boxes are apart on that axis and the centre offset is twice the other axis's."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 2 * abs(dy) and (a.x1 <= b.x0 or b.x1 <= a.x0):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and (a.y1 <= b.y0 or b.y1 <= a.y0):
        return "above" if dy < 0 else "below"
    return None


def _beyond(o: Obj, ref: Obj, rel: str) -> bool:
    """``o``'s centre lies past ``ref``'s box in direction ``rel``."""
    cx, cy = o.center
    return {"left": cx < ref.x0, "right": cx > ref.x1, "above": cy < ref.y0, "below": cy > ref.y1}[rel]


def region_of(scene: Scene, o: Obj, margin: float = 4.0) -> tuple[int, int] | None:
    """The 3×3 grid cell (col, row) holding ``o``'s centre, None when within ``margin`` px
    of a cell border."""
    cell = []
    for c, size in zip(o.center, (scene.width, scene.height)):
        edges = (size / 3, 2 * size / 3)
        if any(abs(c - e) < margin for e in edges):
            return None
        cell.append(sum(c > e for e in edges))
    return (cell[0], cell[1])


def _near_cell(scene: Scene, o: Obj, cell: tuple[int, int], grow: float = 6.0) -> bool:
    """``o``'s centre lies in ``cell`` grown by ``grow`` px on every side."""
    for c, k, size in zip(o.center, cell, (scene.width, scene.height)):
        if not (k * size / 3 - grow <= c <= (k + 1) * size / 3 + grow):
            return False
    return True


def _target(attribute: str, value: str, *, obj: int = -1, ref: int = -1, relation: str | None = None,
            ignore: Iterable[str] = (), options: Iterable[str] = (), box: Iterable[int] = ()) -> dict:
    return {"attribute": attribute, "value": value, "object_index": obj, "reference_index": ref,
            "relation": relation, "ignore": list(ignore), "options": list(options), "box": list(box)}


def _ex(task: str, question: str, filled: tuple[str, int, int], value: str, target: dict,
        filter_reason: str | None = None) -> dict:
    answer, s, e = filled
    assert answer[s:e].lower() == value.lower(), (answer, value)
    return {"task": task, "question": question, "answer": answer, "answer_value": answer[s:e],
            "answer_span_start": s, "answer_span_end": e, "target": target,
            "filter_reason": filter_reason}


# ----------------------------------------------------------------------------- builders
# Each returns a partial example (see _ex) or None when the scene cannot support the task.


def _pick_described(scene: Scene, rng: random.Random, fields) -> tuple[int, dict] | None:
    idx = list(range(len(scene.objects)))
    rng.shuffle(idx)
    for i in idx:
        d = describe(scene, i, fields)
        if d:
            return i, d
    return None


def _object(scene: Scene, rng: random.Random) -> dict | None:
    got = _pick_described(scene, rng, (("color",), ("size", "color")))
    if not got:
        return None
    i, d = got
    ref = _np(noun=rng.choice(("shape", "object")), **d)
    kind = scene.objects[i].kind
    return _ex("object", rng.choice(Q_OBJECT).format(ref=ref),
               _fill(rng.choice(A_OBJECT), kind, ref=ref), kind,
               _target("kind", kind, obj=i, ignore=[ref]))


def _color(scene: Scene, rng: random.Random) -> dict | None:
    got = _pick_described(scene, rng, (("kind",), ("size", "kind")))
    if not got:
        return None
    i, d = got
    ref, color = _np(**d), scene.objects[i].color
    return _ex("color", rng.choice(Q_COLOR).format(ref=ref),
               _fill(rng.choice(A_COLOR), color, ref=ref), color,
               _target("color", color, obj=i, ignore=[ref]))


def _size(scene: Scene, rng: random.Random) -> dict | None:
    got = _pick_described(scene, rng, (("kind",), ("color", "kind")))
    if not got:
        return None
    i, d = got
    ref, size = _np(**d), scene.objects[i].size
    return _ex("size", rng.choice(Q_SIZE).format(ref=ref),
               _fill(rng.choice(A_SIZE), size, ref=ref), size,
               _target("size", size, obj=i, ignore=[ref]))


def _counting(scene: Scene, rng: random.Random) -> dict | None:
    if not scene.objects:
        return None
    o = rng.choice(scene.objects)
    fields = rng.choice(((), ("kind",), ("kind",), ("color",), ("color", "kind"), ("size", "kind")))
    attrs = {f: getattr(o, f) for f in fields}
    n = _count(scene, attrs)
    value = str(n) if rng.random() < 0.2 else NUMBER_WORDS[n]
    tpl = rng.choice(A_COUNT_ONE if n == 1 else A_COUNT_MANY)
    np_q = _np(plural=True, **attrs)
    return _ex("counting", rng.choice(Q_COUNT).format(np=np_q),
               _fill(tpl, value, np=_np(plural=n != 1, **attrs)), value,
               _target("count", str(n), ignore=[np_q]))


def _spatial(scene: Scene, rng: random.Random) -> dict | None:
    pairs = [(i, j) for i in range(len(scene.objects)) for j in range(len(scene.objects))
             if i != j and relation(scene.objects[i], scene.objects[j])]
    rng.shuffle(pairs)
    for i, j in pairs:
        da, db = describe(scene, i, _ANY), describe(scene, j, _ANY)
        if da and db:
            rel = relation(scene.objects[i], scene.objects[j])
            a, b, phrase = _np(**da), _np(**db), RELATIONS[rel]
            return _ex("spatial", rng.choice(Q_SPATIAL).format(a=a, b=b),
                       _fill(rng.choice(A_SPATIAL), phrase, a=a, b=b), phrase,
                       _target("relation", rel, obj=i, ref=j, relation=rel, ignore=[a, b]))
    return None


def _existence(scene: Scene, rng: random.Random) -> dict | None:
    fields = rng.choice((("color", "kind"),) * 4 + (("kind",), ("color",)))
    if scene.objects and rng.random() < 0.5:
        o = rng.choice(scene.objects)
        attrs = {f: getattr(o, f) for f in fields}
    else:
        absent = [a for a in ({"color": c, "kind": k} for c in COLORS for k in KINDS)
                  if _count(scene, {f: a[f] for f in fields}) == 0]
        if not absent:
            return None
        attrs = {f: v for f, v in rng.choice(absent).items() if f in fields}
    present = _count(scene, attrs) > 0
    np_ = _np(**attrs)
    value = "Yes" if present else "No"
    tpl = rng.choice(A_EXIST_YES if present else A_EXIST_NO)
    return _ex("existence", rng.choice(Q_EXIST).format(art=_a(np_), np=np_),
               _fill(tpl, value, art=_a(np_), np=np_), value,
               _target("yesno", value.lower(), ignore=[np_]))


def _referential(scene: Scene, rng: random.Random) -> dict | None:
    options: list[tuple[int, str, list[str], int]] = []  # (object, location phrase, ignore, ref)
    for i, o in enumerate(scene.objects):
        cell = region_of(scene, o)
        if cell in REGIONS and sum(_near_cell(scene, p, cell) for p in scene.objects) == 1:
            options.append((i, f"in the {REGIONS[cell]}", [], -1))
    for j, ref in enumerate(scene.objects):
        d = describe(scene, j, _ANY)
        if not d:
            continue
        for rel, phrase in RELATIONS.items():
            beyond = [i for i, o in enumerate(scene.objects) if i != j and _beyond(o, ref, rel)]
            if len(beyond) == 1 and relation(scene.objects[beyond[0]], ref) == rel:
                ref_np = _np(**d)
                ignore = [f"{phrase} the {ref_np}", f"{rel} of the {ref_np}"] if rel in (
                    "left", "right") else [f"{phrase} the {ref_np}"]
                options.append((beyond[0], f"{phrase} the {ref_np}", ignore, j))
    if not options:
        return None
    i, loc, ignore, j = rng.choice(options)
    o = scene.objects[i]
    if rng.random() < 0.5:
        return _ex("referential", rng.choice(Q_REF_KIND).format(loc=loc),
                   _fill(rng.choice(A_REF_KIND), o.kind, loc=loc), o.kind,
                   _target("kind", o.kind, obj=i, ref=j, ignore=ignore))
    return _ex("referential", rng.choice(Q_REF_COLOR).format(loc=loc),
               _fill(rng.choice(A_REF_COLOR), o.color, loc=loc), o.color,
               _target("color", o.color, obj=i, ref=j, ignore=ignore))


def _background(scene: Scene, rng: random.Random) -> dict | None:
    bg = scene.background
    return _ex("background", rng.choice(Q_BACKGROUND), _fill(rng.choice(A_BACKGROUND), bg), bg,
               _target("background", bg))


def _reasoning(scene: Scene, rng: random.Random) -> dict | None:
    kind = rng.choice(("more", "more", "same", "larger"))
    if kind == "larger":
        pairs = [(i, j) for i, a in enumerate(scene.objects) for j, b in enumerate(scene.objects)
                 if a.size != b.size]
        rng.shuffle(pairs)
        for i, j in pairs:
            dx, dy = describe(scene, i, _ANY), describe(scene, j, _ANY)
            if dx and dy:
                cmp = rng.choice(list(COMPARATIVES))
                bigger = scene.objects[i].size == "large"
                yes = bigger == (cmp != "smaller")
                kw = {"X": _np(**dx), "Y": _np(**dy), "cmp": cmp, "opp": COMPARATIVES[cmp]}
                value = "Yes" if yes else "No"
                return _ex("reasoning", rng.choice(Q_LARGER).format(**kw),
                           _fill(rng.choice(A_LARGER_YES if yes else A_LARGER_NO), value, **kw), value,
                           _target("yesno", value.lower(), obj=i, ref=j, relation=cmp,
                                   ignore=[kw["X"], kw["Y"]]))
        return None
    field = rng.choice(("color", "kind"))
    present = sorted({getattr(o, field) for o in scene.objects})
    pool = list(COLORS) if field == "color" else list(KINDS)
    if not present:
        return None
    va = rng.choice(present)
    vb = rng.choice([v for v in (present if len(present) > 1 and rng.random() < 0.7 else pool)
                     if v != va])
    if rng.random() < 0.5:
        va, vb = vb, va
    na, nb = _count(scene, {field: va}), _count(scene, {field: vb})
    kw = {"A": _np(plural=True, **{field: va}), "B": _np(plural=True, **{field: vb}),
          "cA": _counted(na, **{field: va}), "cB": _counted(nb, **{field: vb})}
    if kind == "more":
        cmp = rng.choice(("more", "fewer"))
        yes = na > nb if cmp == "more" else na < nb
        q, ys, ns = Q_MORE, A_MORE_YES, A_MORE_NO
    else:
        cmp, yes = "same", na == nb
        q, ys, ns = Q_SAME, A_SAME_YES, A_SAME_NO
    kw["cmp"] = cmp
    value = "Yes" if yes else "No"
    return _ex("reasoning", rng.choice(q).format(**kw), _fill(rng.choice(ys if yes else ns), value, **kw),
               value, _target("yesno", value.lower(), relation=cmp, ignore=[kw["A"], kw["B"]]))


def _captioning(scene: Scene, rng: random.Random) -> dict | None:
    if not scene.objects:
        return None
    groups = Counter((o.size, o.color, o.kind) for o in scene.objects)
    items = list(groups.items())
    rng.shuffle(items)
    phrases = []
    for (size, color, kind), n in items:
        phrases.append(f"{_a(size)} {size} {color} {kind}" if n == 1
                       else f"{NUMBER_WORDS[n]} {size} {color} {PLURALS[kind]}")
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    (size, color, _), _ = items[0]
    off = phrases[0].index(f" {color} ") + 1
    n = len(scene.objects)
    kw = {"n": NUMBER_WORDS[n], "shapes": "shape" if n == 1 else "shapes", "be": "is" if n == 1 else "are",
          "bg": scene.background}
    tpl = rng.choice(A_CAPTION)
    head, tail = tpl.split("{L}")
    head = head.format(**kw)
    answer = head + listing + tail.format(**kw)
    answer = answer[:1].upper() + answer[1:]
    s = len(head) + off
    return _ex("captioning", rng.choice(Q_CAPTION), (answer, s, s + len(color)), color,
               _target("caption", color))


BUILDERS = {"object": _object, "color": _color, "size": _size, "counting": _counting,
            "spatial": _spatial, "existence": _existence, "referential": _referential,
            "background": _background, "reasoning": _reasoning, "captioning": _captioning}


# ----------------------------------------------------------------------------- filter examples


def _text_only(scene: Scene, rng: random.Random) -> dict:
    if rng.random() < 0.5:
        kind = rng.choice(list(SIDES))
        n = SIDES[kind]
        return _ex("counting", Q_SIDES.format(kind=kind),
                   _fill(rng.choice(A_SIDES), SIDE_WORDS[n], kind=kind), SIDE_WORDS[n],
                   _target("count", str(n), ignore=[kind]), "text_only")
    (c1, c2), mix = rng.choice(list(MIXES.items()))
    return _ex("color", Q_MIX.format(c1=c1, c2=c2), _fill(rng.choice(A_MIX), mix, c1=c1, c2=c2), mix,
               _target("color", mix, ignore=[f"{c1} and {c2}"]), "text_only")


def _multiple_choice(scene: Scene, rng: random.Random) -> dict | None:
    got = _pick_described(scene, rng, (("kind",),))
    if not got:
        return None
    i, d = got
    color = scene.objects[i].color
    opts = [color] + rng.sample([c for c in COLORS if c != color], 3)
    rng.shuffle(opts)
    letter = OPTION_LETTERS[opts.index(color)]
    q = (rng.choice(Q_COLOR).format(ref=_np(**d)) + "\n"
         + "\n".join(f"{L}. {c}" for L, c in zip(OPTION_LETTERS, opts)) + "\n" + Q_CHOICE_TAIL)
    return _ex("color", q, _fill(rng.choice(A_CHOICE), letter), letter,
               _target("choice", letter, obj=i, options=opts), "multiple_choice")


def _bbox(scene: Scene, rng: random.Random) -> dict | None:
    got = _pick_described(scene, rng, _ANY)
    if not got:
        return None
    i, d = got
    o, ref = scene.objects[i], _np(**d)
    value = "[" + ", ".join(str(v) for v in o.box) + "]"
    return _ex("referential", rng.choice(Q_BBOX).format(ref=ref), _fill(rng.choice(A_BBOX), value, ref=ref),
               value, _target("bbox", value, obj=i, ignore=[ref], box=o.box), "bbox")


def _ocr(scene: Scene, rng: random.Random) -> dict | None:
    if not scene.word:
        return None
    return _ex("object", rng.choice(Q_OCR), _fill(rng.choice(A_OCR), scene.word), scene.word,
               _target("word", scene.word), "ocr")


FILTER_BUILDERS = {"text_only": _text_only, "multiple_choice": _multiple_choice, "bbox": _bbox,
                   "ocr": _ocr}


# ----------------------------------------------------------------------------- rows


def make_example(scene: Scene, task: str, rng: random.Random, *, filter_reason: str | None = None,
                 image=None, id: str | None = None) -> dict | None:
    """One SFT row for ``task`` (or for the filter kind ``filter_reason``) on ``scene``, or None
    when the scene cannot support it. ``image`` is the rendered scene (rendered here if None;
    text-only rows have no image and ``scene`` None)."""
    if filter_reason is not None:
        if filter_reason not in FILTER_BUILDERS:
            raise PairforgeError(f"unknown filter_reason {filter_reason!r}; choose from {FILTER_REASONS}")
        ex = FILTER_BUILDERS[filter_reason](scene, rng)
    else:
        if task not in BUILDERS:
            raise PairforgeError(f"unknown task {task!r}; choose from {TASKS}")
        ex = BUILDERS[task](scene, rng)
    if ex is None:
        return None
    from pairforge.schema import assistant_message, user_message  # noqa: PLC0415 (datasets import)

    text_only = ex["filter_reason"] == "text_only"
    if not text_only and image is None:
        image = render_scene(scene)
    return {
        "id": id or f"{WORLD_NAME}-{scene.seed}-{ex['filter_reason'] or ex['task']}",
        "images": [] if text_only else [image],
        "messages": [user_message(ex["question"], n_images=0 if text_only else 1),
                     assistant_message(ex["answer"])],
        **ex,
        "scene": None if text_only else scene.to_dict(),
        "seed": scene.seed,
    }


def make_examples(scene: Scene, seed: int, tasks: Sequence[str] = TASKS) -> list[dict]:
    """One row per task of ``tasks`` that ``scene`` supports (same image for all), drawn with
    ``random.Random(seed)``."""
    rng = random.Random(seed)
    image = render_scene(scene)
    out = []
    for t in tasks:
        ex = make_example(scene, t, rng, image=image, id=f"{WORLD_NAME}-{scene.seed}-{seed}-{t}")
        if ex is not None:
            out.append(ex)
    return out
