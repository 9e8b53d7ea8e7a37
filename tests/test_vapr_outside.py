"""VaPR on outside wording (``tests/data/vapr_outside.jsonl``: hand-written cases in the public
question styles of VQAv2, GQA, LLaVA conversation/detail, yes/no with and without negation),
and the yes/no proposition logic (:mod:`pairforge.recipes.vapr.polarity`) on hand examples."""

from __future__ import annotations


import pytest
from conftest import script_module

from pairforge.recipes.vapr import polarity as P



@pytest.fixture(scope="module")
def outside():
    with script_module("quality_vapr_outside") as module:
        cases = module.load_cases()
        _, outs, recipe, _ = module.build(cases)
        yield module, cases, outs, recipe


def test_corpus_is_large_and_carries_verdicts(outside):
    _, cases, _, _ = outside
    assert len(cases) >= 300 and len({c["id"] for c in cases}) == len(cases)
    for c in cases:
        assert c.get("expect_filter") or c["truth"]["kind"] in ("yesno", "value"), c


def test_every_case_is_a_coherent_wrong_pair_or_a_right_reject(outside):
    module, cases, outs, recipe = outside
    rules = recipe.rules
    for c, o in zip(cases, outs):
        v, detail = module.verdict(c, o, rules)
        if c.get("expect_filter"):
            assert v == "filtered_right", (c, detail)
        elif v == "reject":
            # a case without a pair: the rules do not know its value (nor have seen it in an
            # earlier block of the source), or its wording has no task rule; never a yes/no
            # question whose answer could be flipped
            if c["truth"]["kind"] == "yesno":
                assert P.flip_answer(o.rows[0] if o.rows else c["answer"], c["question"]) is None \
                    or "no categorizer rule" in detail, (c, detail)
            elif "first: too_different" in detail:
                # a four- or five-word sentence: one changed word is over the default 0.2 share;
                # or a two-word value ("teddy bear") whose group has no other two-word value
                assert len(c["answer"].split()) <= 5 or " " in c["truth"]["value"], (c, detail)
            elif "no categorizer rule" not in detail:
                # the value is not one of the task's classes ("couch" answering "Where is the
                # cat?" is no relation), or a form the classes do not produce ("zero", "left")
                named = detail.split("has no ")[1].split(" value")[0].split("/") if "has no " in detail \
                    else list(rules.classes)
                values = {" ".join(w) for n in named for w in rules.classes[n].phrases}
                assert c["truth"]["value"] not in values or c["truth"]["value"] in ("0", "zero", "left", "right") \
                    or c["truth"]["value"] in c["question"].lower(), (c, detail)  # copied: never edited
        else:
            assert v == "pair_ok", (c, v, detail)


def test_outside_targets(outside):
    module, cases, outs, recipe = outside
    rep = module.evaluate(cases, outs, recipe)
    assert rep["pair_share"] >= 0.80
    assert rep["coherent_wrong_share"] >= 0.95
    assert rep["failures"]["double_negation"] == 0 and rep["failures"]["yes_negation"] == 0


@pytest.mark.parametrize("question, yes, no", [
    ("Is there a red circle in the image?", "Yes, there is a red circle in the image.",
     "No, there is no red circle in the image."),
    ("Is there not a black shape in the image?", "Yes, there is not a black shape in the image.",
     "No, there is a black shape in the image."),
    ("Is no circle present?", "Yes, no circle is present.", "No, a circle is present."),
    ("Does the image not contain a triangle?", "Yes, the image does not contain a triangle.",
     "No, the image contains a triangle."),
    ("Isn't the cat on the sofa?", "Yes, the cat is not on the sofa.", "No, the cat is on the sofa."),
    ("Don't you see a car?", "Yes, I do not see a car.", "No, I see a car."),
    ("Are there any people?", "Yes, there are some people.", "No, there are no people."),
    ("Do you see any trees?", "Yes, I see some trees.", "No, I do not see any trees."),
    ("Did the man catch the ball?", "Yes, the man caught the ball.", "No, the man did not catch the ball."),
    ("Was the photo taken at night?", "Yes, the photo was taken at night.",
     "No, the photo was not taken at night."),
    ("Are these bananas ripe?", "Yes, these bananas are ripe.", "No, these bananas are not ripe."),
    ("Can you see a dog?", "Yes, I can see a dog.", "No, I cannot see a dog."),
])
def test_yesno_sentences_and_their_opposites(question, yes, no):
    assert P.yesno_sentence(question, True) == yes
    assert P.yesno_sentence(question, False) == no
    # the opposite answer of each is the other one: leading word and body flipped together
    assert P.split_lead(P.flip_answer(yes, question))[0] == "no"
    assert P.coherent(P.flip_answer(yes, question), question) is not False
    assert not P.double_negation(P.flip_answer(no, question))


@pytest.mark.parametrize("answer, question, flipped", [
    ("No, the circle is smaller than the star.", "Is the circle larger than the star?",
     "Yes, the circle is larger than the star."),
    ("No, the man isn't wearing a hat.", "Is the man wearing a hat?", "Yes, the man is wearing a hat."),
    # the fewest changed words: emphatic do instead of a new verb form, "no" for the article
    ("No, I don't see any cars.", "Do you see any cars?", "Yes, I do see some cars."),
    ("No, the image does not contain a bicycle.", "Does the image contain a bicycle?",
     "Yes, the image does contain a bicycle."),
    ("Yes, the image contains a bicycle.", "Does the image contain a bicycle?",
     "No, the image contains no bicycle."),
    ("Yes, the image has more red shapes than blue shapes.",
     "Does the image have more red shapes than blue shapes?",
     "No, the image does not have more red shapes than blue shapes."),
    ("No, the numbers of circles and squares are different.",
     "Is the number of circles the same as the number of squares?",
     "Yes, the numbers of circles and squares are the same."),
    ("No, it has one red shape and two blue shapes.", "Are there more red shapes than blue shapes?", None),
])
def test_flip_answer(answer, question, flipped):
    assert P.flip_answer(answer, question) == flipped


def test_coherence_and_double_negation():
    q = "Does the image contain a circle?"
    assert P.coherent("No, the image does not contain a circle.", q) is True
    assert P.coherent("Yes, the image does not contain a circle.", q) is False
    assert P.coherent("No, there is not a brown shape.", "Is there not a brown shape?") is False
    assert P.coherent("Yes, I see a dog and a cat.", "Is it sunny?") is None
    assert P.double_negation("No, there is not not a black shape in the image.")
    assert P.double_negation("I can't see no cars.")
    assert not P.double_negation("There is no dog and no cat.")


def test_validator_rejects_incoherent_yesno_edits(outside):
    _, _, _, recipe = outside
    v = recipe.validator
    q = "Is there a red shape?"
    a = "No, there is no red shape."
    cases = {
        "No, there is no blue shape.": "attribute_swap",
        "Yes, there is no red shape.": "lead_only",
        "Yes, there is not no red shape.": "double_negation",
        "Yes, there is a blue shape.": "attribute_swap",
        "There is a red shape.": "lead_missing",
    }
    for edited, code in cases.items():
        assert (v.check([(q, a, "existence", edited)])[0] or "").startswith(code + ":"), edited
    assert v.check([(q, a, "existence", "Yes, there is a red shape.")]) == [None]


def test_validator_type_and_repeated_value(outside):
    _, _, _, recipe = outside
    v = recipe.validator
    q = "What colour is the car?"
    assert v.check([(q, "red", "color", "blue")]) == [None]  # a one-word answer: its one value changes
    assert v.check([(q, "The car parked on the street is red.", "color",
                     "The car parked on the street is circle.")])[0].startswith("type_change:")
    assert v.check([(q, "The car is red and white.", "color",
                     "The car is white and white.")])[0].startswith("repeated_value:")
    assert v.check([("How many dogs are there?", "2", "counting", "3")]) == [None]
    assert v.check([("How many dogs are there?", "2", "counting", "blue")])[0].startswith("type_change:")


def _sport(i: int, answer: str):
    from pairforge.recipes import Example
    from pairforge.schema import assistant_message, user_message
    return Example(id=f"s{i}", messages=[user_message("What sport is this?"), assistant_message(answer)],
                   images=["img"])


SPORTS = ["tennis", "baseball", "soccer", "skiing", "surfing", "golf"]


def test_answer_values_come_from_the_data_per_block_and_survive_resume():
    """Sports are in no class of the rules: the first block (8 examples) has no value to swap in;
    later ones swap in values the source's earlier blocks answered, never a colour or shape."""
    from pairforge.recipes import BuildContext
    from pairforge.recipes.vapr import VaPR
    from pairforge.schema import response_text

    exs = [_sport(i, SPORTS[i % len(SPORTS)]) for i in range(32)]
    whole = VaPR.from_params({"penalty_every": 8})
    outs = whole.process(exs, BuildContext(seed=1))
    assert all(o.reject and o.reject.reason.startswith("no_span:") for o in outs[:8])
    rows = [(ex, o.rows[0]) for ex, o in zip(exs[8:], outs[8:])]
    assert len(rows) == 24
    for ex, row in rows:
        rejected = response_text(row["rejected"])
        assert rejected in SPORTS and rejected != ex.answer
    # batching and resume give the same rows: the vocabulary is committed per block and saved
    chunked = VaPR.from_params({"penalty_every": 8})
    first = chunked.process(exs[:13], BuildContext(seed=1))
    resumed = VaPR.from_params({"penalty_every": 8})
    resumed.load_state_dict(chunked.state_dict())
    rest = resumed.process(exs[13:], BuildContext(seed=1))
    assert [response_text(o.rows[0]["rejected"]) if o.rows else None for o in first + rest] == \
        [response_text(o.rows[0]["rejected"]) if o.rows else None for o in outs]
    # the validator accepts a value of the data, and nothing else, for such an answer
    v = whole.validator
    assert v.check([("What sport is this?", "tennis", "object", "golf")]) == [None]
    assert v.check([("What sport is this?", "tennis", "object", "chess")])[0].startswith("type_change:")


def test_alternative_question_takes_the_other_option():
    from pairforge.recipes import BuildContext, Example
    from pairforge.recipes.vapr import VaPR
    from pairforge.schema import assistant_message, response_text, user_message

    ex = Example(id="alt", messages=[user_message("Is the fence wooden or metal?"), assistant_message("metal")],
                 images=["img"])
    [o] = VaPR().process([ex], BuildContext())
    assert response_text(o.rows[0]["rejected"]) == "wooden"
