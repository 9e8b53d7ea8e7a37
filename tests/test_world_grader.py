"""grade(): our own answers, corrupted answers, gibberish, and hand-written answers per category."""

from __future__ import annotations

import random

import pytest

import pairforge.world as W
from pairforge.errors import PairforgeError
from pairforge.recipes.vapr.polarity import flip_answer
from pairforge.world.grader import KIND_WORDS

SCENE = W.Scene(112, 112, "beige", (
    W.Obj("circle", "red", "large", 10, 10, 40, 40),
    W.Obj("square", "blue", "small", 60, 12, 76, 28),
    W.Obj("triangle", "red", "small", 12, 70, 28, 86),
    W.Obj("star", "red", "large", 70, 70, 100, 100),
), seed=0)


def ex(attribute: str, value: str, scene: W.Scene = SCENE, **target) -> dict:
    t = {"attribute": attribute, "value": value, "object_index": -1, "reference_index": -1,
         "relation": None, "ignore": [], "options": [], "box": []}
    t.update(target)
    return {"target": t, "scene": scene.to_dict()}


# ----------------------------------------------------------------------------- generated examples


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [W.example_at("validation", i, seed=5) for i in range(600)]


def _other_values(r: dict) -> list[str]:
    """Valid replacements for the answer value that make the answer false."""
    t, v = r["target"], r["answer_value"]
    a = t["attribute"]
    if a == "caption":
        kind = KIND_WORDS[r["answer"][r["answer_span_end"]:].split()[0].strip(".,:")]
        return [c for c in W.COLORS
                if not any(o["color"] == c and o["kind"] == kind for o in r["scene"]["objects"])]
    return {
        "kind": [k for k in W.KINDS if k != v], "color": [c for c in W.COLORS if c != v],
        "size": [s for s in W.SIZES if s != v], "background": [b for b in W.BACKGROUNDS if b != v],
        "relation": [p for p in W.RELATIONS.values() if p != v],
        "count": [w for n, w in W.NUMBER_WORDS.items() if str(n) != t["value"]],
        "yesno": ["No" if v == "Yes" else "Yes"], "choice": [c for c in "ABCD" if c != v],
        "word": [w for w in W.OCR_WORDS if w != v], "bbox": ["[0, 0, 6, 6]", "[100, 100, 111, 111]"],
    }[a]


def test_own_answers_correct_corrupted_wrong_gibberish_unparseable(rows):
    rng = random.Random(0)
    seen = set()
    for r in rows:
        assert W.grade(r, r["answer"]) == "correct", (r["question"], r["answer"])
        s, e = r["answer_span_start"], r["answer_span_end"]
        alt = rng.choice(_other_values(r))
        corrupted = r["answer"][:s] + alt + r["answer"][e:]
        if r["target"]["attribute"] == "yesno":
            # only the leading word flipped: the sentence contradicts itself unless its body
            # says nothing the grader can read; the opposite proposition is wrong
            assert W.grade(r, corrupted) in ("incoherent", "wrong"), (r["question"], corrupted)
            flipped = flip_answer(r["answer"], r["question"])
            if flipped:
                assert W.grade(r, flipped) == "wrong", (r["question"], flipped)
        else:
            assert W.grade(r, corrupted) == "wrong", (r["question"], corrupted)
        for junk in ("Lorem ipsum dolor sit amet.", "", "Hmm, hard to say."):
            assert W.grade(r, junk) == "unparseable", (r["question"], junk)
        seen.add(r["filter_reason"] or r["task"])
    assert seen >= set(W.TASKS)


# ----------------------------------------------------------------------------- hand-written cases


def test_counting():
    three = ex("count", "3")
    assert W.grade(three, "There are three red shapes.") == "correct"
    assert W.grade(ex("count", "2"), "There are three red shapes.") == "wrong"
    assert W.grade(three, "3") == "correct"
    assert W.grade(three, "I count 3 of them, not 2.") == "unparseable"  # contradiction
    assert W.grade(three, "There are no red shapes.") == "wrong"  # "no <noun>" is zero
    assert W.grade(ex("count", "1"), "No, there is only one.") == "correct"  # leading "No," is not 0
    assert W.grade(three, "Many.") == "unparseable"
    # the question's "red shape" is stripped before parsing: "there is no ." still reads as 0
    stripped = ex("count", "1")
    stripped["target"]["ignore"] = ["red shape"]
    assert W.grade(stripped, "There is no red shape.") == "wrong"


def test_color_kind_size_with_synonyms_and_contradictions():
    assert W.grade(ex("color", "purple"), "It looks violet.") == "correct"
    assert W.grade(ex("color", "red"), "The circle is red, not blue.") == "unparseable"
    assert W.grade(ex("color", "red"), "The circle is gray.") == "wrong"  # outside the palette
    assert W.grade(ex("kind", "circle"), "It is a disc.") == "correct"
    assert W.grade(ex("kind", "circle"), "These are circles.") == "correct"
    assert W.grade(ex("kind", "circle"), "It is an oval.") == "wrong"
    assert W.grade(ex("kind", "cross"), "A plus sign.") == "correct"
    assert W.grade(ex("size", "large"), "It is quite big.") == "correct"
    assert W.grade(ex("size", "large"), "It is tiny.") == "wrong"
    assert W.grade(ex("size", "large"), "It is large and small.") == "unparseable"


def test_referential_ignores_the_reference_phrase():
    q = ex("color", "red", ignore=["to the right of the blue square", "right of the blue square"])
    assert W.grade(q, "The shape to the right of the blue square is red.") == "correct"
    assert W.grade(q, "The shape right of the blue one is red.") == "correct"
    assert W.grade(q, "It is blue.") == "wrong"  # naming the reference's colour is an error
    k = ex("kind", "star", ignore=["to the left of the circle", "left of the circle"])
    assert W.grade(k, "There is a star to the left of the circle.") == "correct"
    assert W.grade(k, "That is a circle.") == "wrong"


def test_spatial():
    e = ex("relation", "below")
    assert W.grade(e, "The red circle is below the blue square.") == "correct"
    assert W.grade(e, "It sits underneath it.") == "correct"
    assert W.grade(e, "It is on top of the square.") == "wrong"
    assert W.grade(e, "It is to the left of it.") == "wrong"
    assert W.grade(e, "It is above and to the left of the square.") == "unparseable"


def test_existence_yes_no():
    yes, no = ex("yesno", "yes", ignore=["red circle"]), ex("yesno", "no", ignore=["green triangle"])
    assert W.grade(yes, "Yes.") == "correct"
    assert W.grade(no, "Yes.") == "wrong"
    assert W.grade(no, "No, there is no green triangle in the image.") == "correct"
    assert W.grade(no, "There is no green triangle.") == "correct"  # negation, no leading no
    assert W.grade(yes, "There is a red circle at the top.") == "correct"
    assert W.grade(yes, "Yes. No.") == "unparseable"
    assert W.grade(yes, "Yes there is. No other shape is red.") == "correct"
    assert W.grade(no, "no") == "correct"
    assert W.grade(yes, "Maybe.") == "unparseable"


def test_yesno_sentence_whose_lead_and_body_disagree_is_incoherent():
    q = {"target": {"attribute": "yesno", "value": "no", "ignore": ["circle"]},
         "question": "Does the image contain a circle?"}
    assert W.grade(q, "No, the image does not contain a circle.") == "correct"
    assert W.grade(q, "Yes, the image contains a circle.") == "wrong"
    assert W.grade(q, "Yes, the image does not contain a circle.") == "incoherent"
    assert W.grade(q, "No, the image contains a circle.") == "incoherent"
    neg = {"target": {"attribute": "yesno", "value": "yes", "ignore": ["black shape"]},
           "question": "Is there not a black shape in the image?"}
    assert W.grade(neg, "Yes, there is no black shape in the image.") == "correct"
    assert W.grade(neg, "No, there is a black shape in the image.") == "wrong"
    assert W.grade(neg, "No, there is not a black shape in the image.") == "incoherent"
    more = {"target": {"attribute": "yesno", "value": "no", "relation": "more",
                       "ignore": ["red shapes", "blue shapes"]},
            "question": "Are there more red shapes than blue shapes?"}
    assert W.grade(more, "No, it has one red shape and three blue shapes.") == "correct"
    assert W.grade(more, "Yes, it has one red shape and three blue shapes.") == "incoherent"
    assert W.grade(more, "Yes, there are fewer red shapes than blue shapes.") == "incoherent"
    larger = {"target": {"attribute": "yesno", "value": "no", "relation": "larger", "ignore": ["circle", "star"]},
              "question": "Is the circle larger than the star?"}
    assert W.grade(larger, "No, the circle is smaller than the star.") == "correct"
    assert W.grade(larger, "Yes, the circle is smaller than the star.") == "incoherent"
    assert W.grade(larger, "Yes, the circle is larger than the star.") == "wrong"


def test_reasoning_needs_yes_or_no():
    more = ex("yesno", "yes", relation="more", ignore=["red shapes", "blue shapes"])
    assert W.grade(more, "Yes, there are more red shapes than blue ones.") == "correct"
    assert W.grade(more, "No, there are fewer red shapes.") == "wrong"
    assert W.grade(more, "There are more red shapes than blue ones.") == "unparseable"


def test_background():
    bg = ex("background", "gray")
    assert W.grade(bg, "The background is grey.") == "correct"
    assert W.grade(bg, "The shapes sit on a beige background.") == "wrong"
    assert W.grade(ex("background", "dark"), "A black background.") == "correct"
    assert W.grade(ex("background", "dark"), "The background is dark gray.") == "correct"
    assert W.grade(ex("background", "light blue"), "It is light blue.") == "correct"
    assert W.grade(ex("background", "light blue"), "It is blue.") == "wrong"
    assert W.grade(bg, "It is nice.") == "unparseable"


def test_captions():
    cap = ex("caption", "red")
    assert W.grade(cap, "A large red circle, a small blue square, a small red triangle and a "
                        "large red star on a beige background.") == "correct"
    assert W.grade(cap, "There are four shapes: a red circle and a blue square.") == "correct"
    assert W.grade(cap, "Three red shapes and a blue square.") == "correct"
    # names an absent object
    assert W.grade(cap, "A red circle, a blue square and a green star.") == "wrong"
    # wrong counts: total and per attribute
    assert W.grade(cap, "There are five shapes: a red circle and a blue square.") == "wrong"
    assert W.grade(cap, "Two red shapes and a blue square.") == "wrong"
    # wrong size, wrong background
    assert W.grade(cap, "A small red circle and a blue square.") == "wrong"
    assert W.grade(cap, "A red circle and a blue square on a dark background.") == "wrong"
    # true but covers fewer than half of the objects
    assert W.grade(cap, "I see a blue square.") == "wrong"
    assert W.grade(cap, "A pretty picture.") == "unparseable"
    # "the background is X" is checked as well as "X background"
    assert W.grade(cap, "Three red shapes and a blue square. The background is beige.") == "correct"
    assert W.grade(cap, "Three red shapes and a blue square. The background is dark.") == "wrong"
    # "no <noun>" in a caption is a count of zero
    assert W.grade(cap, "Three red shapes, a blue square and no green shapes.") == "correct"
    assert W.grade(cap, "Three red shapes, a blue square and no red circles.") == "wrong"


def test_caption_credit_hand_computed():
    """Scene: large red circle, small blue square, small red triangle, large red star."""
    cap = ex("caption", "red")
    credit = lambda text: W.caption_credit(cap, text)  # noqa: E731
    # 3 mentions, the green star does not hold: precision 2/3; circle + square named: 2 of 4
    assert credit("A red circle, a blue square and a green star.") == {"precision": 2 / 3, "recall": 0.5}
    assert credit("Three red shapes and a blue square.") == {"precision": 1.0, "recall": 1.0}
    # "two red shapes" is a wrong count (there are three): it names nobody
    assert credit("Two red shapes and a blue square.") == {"precision": 0.5, "recall": 0.25}
    assert credit("A pretty picture.") is None
    with pytest.raises(PairforgeError):
        W.caption_credit(ex("color", "red"), "It is red.")


def test_filter_kinds():
    mc = ex("choice", "B", options=["red", "blue", "green", "white"])
    assert W.grade(mc, "B") == "correct"
    assert W.grade(mc, "The answer is B.") == "correct"
    assert W.grade(mc, "C.") == "wrong"
    assert W.grade(mc, "A blue one.") == "correct"  # article "A", option text names B
    assert W.grade(mc, "B or C") == "unparseable"
    box = ex("bbox", "[10, 10, 40, 40]", box=[10, 10, 40, 40])
    assert W.grade(box, "[11, 10, 40, 41]") == "correct"
    assert W.grade(box, "[0.09, 0.09, 0.36, 0.36]") == "correct"  # normalised
    assert W.grade(box, "[60, 12, 76, 28]") == "wrong"
    assert W.grade(box, "[10, 10, 40]") == "unparseable"
    word = ex("word", "CAT")
    assert W.grade(word, "The word is cat.") == "correct"
    assert W.grade(word, "It says DOG.") == "wrong"
    assert W.grade(word, "I cannot read it.") == "unparseable"


def test_iou_hand_computed():
    # boxes [0,0,10,10] and [5,0,15,10]: intersection 5*10 = 50, union 100 + 100 - 50 = 150
    assert W.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert W.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert W.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0


def test_unknown_attribute_is_a_clear_error():
    with pytest.raises(PairforgeError, match="not gradable"):
        W.grade(ex("smell", "sweet"), "Sweet.")
