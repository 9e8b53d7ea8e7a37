"""VaPR rules, rule editor, validator, penalty lists and the recipe on the offline world (pure,
no model: the LLM path is in test_vapr_llm.py)."""

from __future__ import annotations

import random

import pytest

import pairforge.world as W
from pairforge.diagnostics.lengths import length_unit
from pairforge.errors import PairforgeError
from pairforge.recipes import BuildContext, Example, load_recipe
from pairforge.recipes.vapr import (
    PenaltyLists,
    VaPR,
    Validator,
    VaprRules,
    distribution_from_stats,
    replacement_distribution,
    rule_candidates,
    word_diff,
)
from pairforge.recipes.vapr.editing import fix_article, match_case
from pairforge.schema import assistant_message, response_text, to_dataset, user_message, validate_row
from pairforge.sources.sft import read_examples


@pytest.fixture(scope="module")
def rules() -> VaprRules:
    return VaprRules.load()


@pytest.fixture(scope="module")
def validator(rules) -> Validator:
    return Validator(rules, length_unit("gpt2"))


@pytest.fixture(scope="module")
def world() -> list[Example]:
    """World examples as the build engine reads them (ground truth in ``meta``)."""
    return list(read_examples("shapes:validation?n=240&seed=11"))


def example(question: str, answer: str, *, images: int = 1, id: str = "x", task: str | None = None) -> Example:
    return Example(id=id, messages=[user_message(question, n_images=images), assistant_message(answer)],
                   images=["img"] * images, task=task)


def candidates(rules, answer, question, task, **kw) -> list[str]:
    cands = rule_candidates(answer, question, task, rules, rng=random.Random(0), **kw)
    assert cands, (answer, task)
    return cands


# ----------------------------------------------------------------------------- categorizer


def test_categorizer_is_exact_on_world_questions(rules, world):
    kept = [ex for ex in world if ex.meta["filter_reason"] is None]
    wrong = [(ex.task, ex.question) for ex in kept if rules.categorize(ex.question) != ex.task]
    assert len(kept) > 200 and wrong == []


@pytest.mark.parametrize("question, task", [
    ("What colour is the car?", "color"),
    ("Which color are the flowers?", "color"),
    ("How many dogs are on the sofa?", "counting"),
    ("Count the apples.", "counting"),
    ("Is there a cat in the picture?", "existence"),
    ("Does the image contain a bicycle?", "existence"),
    ("Where is the lamp relative to the bed?", "spatial"),
    ("Is the dog bigger than the cat?", "reasoning"),
    ("Are there more apples than oranges?", "reasoning"),
    ("Describe this photo in detail.", "captioning"),
    ("What is the object in the top right corner?", "referential"),
    ("What is to the left of the lamp?", "referential"),
    ("What colour is the wall in the background?", "background"),
    ("Is the ball small or large?", "size"),
    ("What kind of animal is on the bed?", "object"),
])
def test_categorizer_rules(rules, question, task):
    assert rules.categorize(question) == task


def test_categorizer_unknown_question_is_rejected_at_categorize(rules):
    recipe = VaPR()
    out = recipe.process([example("Hello there", "Hi.")], BuildContext())[0]
    assert rules.categorize("Hello there") is None
    assert out.reject.stage == "categorize" and "Hello there" in out.reject.reason


def test_trust_source_task_uses_the_label(rules):
    ex = example("Hello there, what do you see?", "The ball is red.", task="color")
    assert VaPR().prepare(ex).reject.stage == "categorize"
    work = VaPR.from_params({"trust_source_task": "true"}).prepare(ex)
    assert work.task == "color"
    stats = VaPR().prepare(example("What colour is it?", "The ball is red.", task="size")).stats
    assert stats == {"categorizer/disagree": 1}


# ----------------------------------------------------------------------------- filters


def test_filters_on_world_filter_rows(world):
    recipe = VaPR()
    to_filter = [ex for ex in world if ex.meta["filter_reason"]]
    assert {ex.meta["filter_reason"] for ex in to_filter} == set(W.FILTER_REASONS)
    for ex in to_filter:
        out = recipe.prepare(ex)
        why = ex.meta["filter_reason"]
        assert out.reject.stage == "filter"
        assert out.reject.reason.startswith(why + ":"), (ex.question, out.reject.reason)
        assert out.stats == {f"filter/{why}": 1}
    kept = [ex for ex in world if not ex.meta["filter_reason"]]
    assert all(not hasattr(recipe.prepare(ex), "reject") for ex in kept)


@pytest.mark.parametrize("question, answer, reason", [
    ("What is the colour of the bus?\nA. red\nB. blue\nC. green\nD. white", "B", "multiple_choice"),
    ("Which fruit is shown? Answer with the option's letter.", "The answer is C.", "multiple_choice"),
    ("Please give the bounding box of the dog.", "[0.1, 0.2, 0.5, 0.9]", "bbox"),
    ("Where is the dog?", "The dog is at [12, 40, 88, 120].", "bbox"),
    ("What does the sign say?", "It says STOP.", "ocr"),
    ("Read the text on the label.", "It reads MILK.", "ocr"),
])
def test_filter_rules(rules, question, answer, reason):
    assert rules.filter_reason(question, answer).startswith(reason + ":")


def test_text_only_and_missing_answer_are_filtered():
    recipe = VaPR()
    assert recipe.prepare(example("What colour is the sky?", "It is blue.", images=0)).reject.reason \
        .startswith("text_only:")
    ex = Example(id="q", messages=[user_message("What colour is it?")], images=["img"])
    assert recipe.prepare(ex).reject.reason.startswith("no_answer:")


# ----------------------------------------------------------------------------- yes/no sentences


@pytest.mark.parametrize("question, answer, sentence", [
    ("Is there a red circle in the image?", "Yes.", "Yes, there is a red circle in the image."),
    ("Is there a red circle in the image?", "no", "No, there is no red circle in the image."),
    ("Are there more cats than dogs?", "Yes", "Yes, there are more cats than dogs."),
    ("Does the image contain a bicycle?", "Yes.", "Yes, the image contains a bicycle."),
    ("Does the image contain a bicycle?", "No.", "No, the image does not contain a bicycle."),
    ("Does the picture have a dog?", "yes!", "Yes, the picture has a dog."),
    ("Can you see a blue star?", "No.", "No, I cannot see a blue star."),
    ("Is the red star larger than the blue cross?", "Yes.", "Yes, the red star is larger than the blue cross."),
    ("Is the cat to the left of the dog?", "No.", "No, the cat is not to the left of the dog."),
])
def test_yesno_sentences(rules, question, answer, sentence):
    assert rules.yesno_sentence(question, answer) == sentence


def test_yesno_without_rule_is_filtered_and_a_sentence_is_edited(rules):
    recipe = VaPR()
    out = recipe.prepare(example("Compared to the cat, is the dog bigger?", "Yes."))
    assert out.reject.stage == "filter" and out.reject.reason.startswith("yesno:")
    assert rules.yesno_sentence("What colour is it?", "It is red.") is None
    [o] = recipe.process([example("Is there a red circle in the image?", "Yes.", id="yn")], BuildContext())
    row = o.rows[0]
    assert response_text(row["chosen"]) == "Yes, there is a red circle in the image."
    assert response_text(row["rejected"]) == "No, there is no red circle in the image."
    assert row["task"] == "existence" and o.stats["yesno_sentence"] == 1


# ----------------------------------------------------------------------------- rule editor


def test_colour_edit_keeps_case_and_skips_copied_and_stated_values(rules):
    cands = candidates(rules, "Red is the colour of the shape left of the blue square.",
                       "What colour is the shape left of the blue square?", "color")
    firsts = {c.split()[0] for c in cands}
    # the copied "blue square" is never edited, and blue is never used: the answer states it
    assert firsts == {v.capitalize() for v in rules.classes["color"].values} - {"Red", "Blue"}
    assert all(c.endswith(" the blue square.") for c in cands)


def test_kind_edit_fixes_the_article(rules):
    cands = candidates(rules, "The red object is a circle.", "What shape is the red object?", "object")
    assert "The red object is an oval." in cands and "The red object is a square." in cands
    assert "The red object is a oval." not in cands
    assert fix_article("It is an star", 9) == "It is a star"
    assert match_case("Red", "blue") == "Blue" and match_case("CAT", "dog") == "DOG"


def test_size_edit(rules):
    cands = candidates(rules, "The circle is small.", "Is the circle small or large?", "size")
    assert sorted(cands) == ["The circle is large.", "The circle is medium."]
    # "big" is a synonym of large: never a replacement of "large"
    assert "The square is big." not in candidates(rules, "The square is large.", "How big is the square?", "size")


def test_number_edit_keeps_form_and_agreement(rules):
    plural = candidates(rules, "There are 3 circles.", "How many circles are there?", "counting")
    assert "There are 5 circles." in plural and "There is 1 circle." in plural
    assert "There are 0 circles." in plural and "There are three circles." not in plural  # a digit stays a digit
    single = candidates(rules, "There is one blue circle in the image.", "How many blue circles are there?",
                        "counting")
    assert "There is no blue circle in the image." in single
    assert "There are two blue circles in the image." in single
    assert not any("There is two" in c or "two blue circle " in c for c in single)


def test_relation_edit_replaces_the_phrase(rules):
    cands = candidates(rules, "The red circle is to the left of the blue square.",
                       "Where is the red circle relative to the blue square?", "spatial")
    assert set(cands) == {"The red circle is to the right of the blue square.",
                          "The red circle is above the blue square.",
                          "The red circle is below the blue square."}


def test_background_edit_matches_multiword_values(rules):
    cands = candidates(rules, "The background is light blue.", "What colour is the background?", "background")
    assert "The background is light green." in cands and "The background is gray." in cands
    assert not any("light gray" in c for c in candidates(rules, "It is a gray background.",
                                                           "What is the background colour?", "background"))


def test_yesno_edit_coherent_variant_first(rules):
    # a yes/no answer has one candidate: the opposite proposition, never a lead-only flip
    cands = candidates(rules, "Yes, there is a red circle in the image.", "Is there a red circle?", "existence")
    assert cands == ["No, there is no red circle in the image."]
    cands = candidates(rules, "No, I cannot see a red circle.", "Can you see a red circle?", "existence")
    assert cands == ["Yes, I can see a red circle."]
    # a body stating other facts than the question's proposition has no coherent opposite
    assert rule_candidates("No, it has no red shapes and two blue shapes.", "Are there more red shapes "
                           "than blue shapes?", "reasoning", rules) == []


def test_no_editable_span_is_rejected_at_edit():
    [o] = VaPR().process([example("What colour is the ball?", "I am not sure.")], BuildContext())
    assert o.reject.stage == "edit" and o.reject.reason.startswith("no_span:")


# ----------------------------------------------------------------------------- validator


def check(validator, answer, edited, task="color", question="What colour is the ball?"):
    return validator.check([(question, answer, task, edited)])[0]


def test_validator_passes_a_minimal_edit(validator):
    assert check(validator, "The small ball is red in colour.", "The small ball is blue in colour.") is None


@pytest.mark.parametrize("answer, edited, code", [
    ("The ball is red in colour.", "  ", "empty"),
    ("The ball is red in colour.", "The ball is red  in colour.", "unchanged"),
    ("The ball is red in colour.", "The ball is blue and it is big.", "too_different"),
    ("The ball on the table is red in colour.", "The ball on the table is red-orange-yellow-green in colour.",
     "length_gap"),
    ("The ball on the table is red in colour.", "The cup on the table is red in colour.", "no_critical_span"),
    ("The ball on the table is purple in colour.", "The ball on the table is violet in colour.", "same_value"),
])
def test_validator_reasons(validator, answer, edited, code):
    assert check(validator, answer, edited).startswith(code + ":")


def test_validator_thresholds_and_copied_spans(rules):
    short = ("What colour is the ball?", "The ball is red.", "color", "The ball is blue.")
    assert Validator(rules, length_unit("words")).check([short])[0].startswith("too_different:")
    assert Validator(rules, length_unit("words"), lev_floor_words=1).check([short]) == [None]
    # a short answer is judged by its decisive span: its one value may change
    assert Validator(rules, length_unit("words")).check([("What colour is the ball?", "It is red.", "color",
                                                          "It is blue.")]) == [None]
    q = "What colour is the shape left of the blue square?"
    a = "The shape left of the blue square is red in colour."
    v = Validator(rules, length_unit("gpt2"))
    assert v.check([(q, a, "color", a.replace("blue", "green"))])[0].startswith("no_critical_span:")
    assert v.check([(q, a, "color", a.replace("red", "green"))]) == [None]


def test_word_diff_and_describe(validator):
    d = word_diff("Yes, there is a red circle.", "No, there is not a red circle.")
    a, b = "Yes, there is a red circle.", "No, there is not a red circle."
    assert (a[slice(*d.a_hull)], b[slice(*d.b_hull)]) == ("Yes, there is", "No, there is not")
    e = validator.describe("Is there a red circle?", a, "existence", b, "rule")
    assert (e.original, e.replacement, e.value, e.editor) == ("Yes, there is", "No, there is not", "no", "rule")
    e = validator.describe("How many?", "There are two cats.", "counting", "There are 5 cats.", "llm")
    assert e.value == "5"


# ----------------------------------------------------------------------------- penalty lists


def test_penalty_lists_commit_per_block_and_round_trip():
    p = PenaltyLists(top_k=2, every=3)
    for v in ("red", "red", "blue"):
        p.record("color", v)
    p.advance(2)
    assert p.penalty("color") == []  # the block is not over: nothing committed
    p.advance(1)
    assert p.penalty("color") == ["red", "blue"]
    p.record("color", "green")
    p.record("color", "green")
    p.record("color", "green")
    p.advance(1)
    assert p.penalty("color") == ["red", "blue"]
    assert p.totals() == {"color": {"red": 2, "blue": 1, "green": 3}}
    q = PenaltyLists(top_k=2, every=3)
    q.load_state_dict(p.state_dict())
    q.advance(2)
    assert q.penalty("color") == ["green", "red"] and q.n_seen == 6
    with pytest.raises(ValueError):
        q.advance(4)


def test_rule_editor_avoids_penalised_values(rules):
    answer, question = "The cube on the table is red.", "What colour is the cube?"
    plain = rule_candidates(answer, question, "color", rules, rng=random.Random(1))
    penalty = [c.split()[-1].rstrip(".") for c in plain[:3]]
    counts = {penalty[0]: 9, penalty[1]: 2, penalty[2]: 5}
    steered = rule_candidates(answer, question, "color", rules, penalty=penalty, counts=counts,
                              rng=random.Random(1))
    assert sorted(steered) == sorted(plain)
    last3 = [c.split()[-1].rstrip(".") for c in steered[-3:]]
    assert last3 == [penalty[1], penalty[2], penalty[0]]  # penalised last, least used first


def test_replacement_distribution_hand_computed():
    d = replacement_distribution({"color": {"red": 2, "blue": 1, "green": 1}, "size": {}})
    assert list(d) == ["color"]
    c = d["color"]
    # H = -(1/2 log2 1/2 + 2 * 1/4 log2 1/4) = 0.5 + 1 = 1.5 bits
    assert c["entropy_bits"] == pytest.approx(1.5) and c["max_entropy_bits"] == pytest.approx(1.584963)
    assert (c["n"], c["top_value"], c["top_share"]) == (4, "red", 0.5)
    assert distribution_from_stats({"value/color/red": 2.0, "value/color/blue": 1.0, "value/color/green": 1,
                                    "editor/rule": 4})["color"]["counts"] == {"red": 2, "blue": 1, "green": 1}


def test_penalty_lists_spread_world_edits(world):
    recipe = VaPR.from_params({"penalty_every": 4})
    recipe.process(world, BuildContext(seed=2))
    dist = recipe.replacement_stats()
    for task in ("color", "object", "background", "referential", "captioning"):
        assert dist[task]["top_share"] <= 0.35, (task, dist[task])


def test_penalty_lists_make_repeated_edits_round_robin():
    """n colours can replace "red"; with every=1 and top_k=n-1 each example must take the one
    least used value, so 2n identical questions use every colour exactly twice."""
    n = len(VaPR().rules.classes["color"].values) - 1
    exs = [example("What colour is the cube?", "The cube on the table is red.", id=f"c{i}") for i in range(2 * n)]
    steered = VaPR.from_params({"penalty_every": 1, "penalty_top_k": n - 1})
    steered.process(exs, BuildContext(seed=0))
    counts = steered.replacement_stats()["color"]["counts"]
    assert len(counts) == n and set(counts.values()) == {2}
    free = VaPR.from_params({"penalty_top_k": 0})
    free.process(exs, BuildContext(seed=0))
    assert max(free.replacement_stats()["color"]["counts"].values()) > 2


# ----------------------------------------------------------------------------- recipe


def test_world_pairs_are_wrong_minimal_and_valid_rows(world):
    recipe = load_recipe("vapr", {})
    outs = recipe.process(world, BuildContext(seed=0))
    assert len(outs) == len(world)
    rows = [(ex.meta, o.rows[0]) for ex, o in zip(world, outs) if o.rows]
    assert len(rows) > 0.7 * len(world)
    grades = [W.grade(truth, response_text(row["rejected"])) for truth, row in rows]
    assert grades.count("wrong") >= 0.95 * len(rows)
    assert all(W.grade(truth, response_text(row["chosen"])) == "correct" for truth, row in rows)
    for _, row in rows:
        validate_row(row)
        assert row["recipe"] == "vapr" and row["editor"] == "rule" and row["seed"] == 0
        assert row["models"] == [{"role": "editor", "name": "vapr-rules",
                                  "revision": recipe.rules.sha256[:16]}]
        assert row["prompt_templates"] == [] and row["edit_original"] != row["edit_replacement"]
    ds = to_dataset([row for _, row in rows])
    assert "edit_replacement" in ds.column_names and ds[0]["editor"] == "rule"


def test_same_seed_same_edits_whatever_the_batching(world):
    exs = world[:120]

    def run(chunks: list[int], seed: int = 5) -> list:
        recipe = VaPR.from_params({"penalty_every": 8})
        out, i = [], 0
        for n in chunks:
            out += recipe.process(exs[i:i + n], BuildContext(seed=seed))
            i += n
        return [(o.rows[0]["rejected"], o.rows[0]["id"]) if o.rows else o.reject for o in out], recipe

    whole, r1 = run([120])
    chunked, r2 = run([1, 7, 13, 2, 40, 57])
    assert whole == chunked and r1.state_dict() == r2.state_dict()
    other, _ = run([120], seed=6)
    assert other != whole


def test_resume_from_state_dict_gives_the_same_rows(world):
    exs = world[:90]
    full = VaPR.from_params({"penalty_every": 5})
    expected = full.process(exs, BuildContext(seed=1))
    first = VaPR.from_params({"penalty_every": 5})
    head = first.process(exs[:37], BuildContext(seed=1))
    resumed = VaPR.from_params({"penalty_every": 5})
    resumed.load_state_dict(first.state_dict())
    tail = resumed.process(exs[37:], BuildContext(seed=1))
    assert [o.rows or o.reject for o in head + tail] == [o.rows or o.reject for o in expected]
    assert resumed.state_dict() == full.state_dict()


def test_params_round_trip_and_errors(tmp_path):
    recipe = VaPR()
    params = recipe.params()
    assert params["editor"] == "rule" and len(params["rules_sha256"]) == 64
    assert VaPR.from_params(params).params() == params
    assert recipe.templates() == {}
    with pytest.raises(PairforgeError, match="unknown parameter 'editr'"):
        VaPR.from_params({"editr": "llm"})
    with pytest.raises(PairforgeError, match="editor='gpt'"):
        VaPR.from_params({"editor": "gpt"})
    with pytest.raises(PairforgeError, match="not the"):
        VaPR.from_params({"rules_sha256": "0" * 64})
    bad = tmp_path / "rules.yaml"
    bad.write_text("tasks: {color: [hue]}\nclasses: {}\n")
    with pytest.raises(PairforgeError, match="names class 'hue'"):
        VaPR.from_params({"rules": str(bad)})
    with pytest.raises(PairforgeError, match="cannot read it"):
        VaPR.from_params({"rules": str(tmp_path / "missing.yaml")})


def test_rules_file_covers_the_world_vocabulary(rules):
    assert set(W.COLORS) <= set(rules.classes["color"].values)
    assert set(W.KINDS) <= set(rules.classes["kind"].values)
    assert set(W.SIZES) <= set(rules.classes["size"].values)
    assert set(W.BACKGROUNDS) <= set(rules.classes["background"].values)
    assert set(rules.tasks) == set(W.TASKS)
