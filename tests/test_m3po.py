"""M3PO recipe: hand-computed M3P-scores and selections, degenerate pools, the recipe's wiring
with a scripted fake policy / CLIP / judge, parameters, and an end-to-end run on a random tiny
LLaVA (per-example seeding: results do not depend on batching)."""

from __future__ import annotations

import math
import os
import re

import pytest
from PIL import Image

from pairforge.errors import PairforgeError
from pairforge.models import Capability, Completion, ScoredResponse
from pairforge.models.hf import HFModel
from pairforge.models.random_tiny import save_random_llava
from pairforge.recipes import BuildContext, Example, load_recipe
from pairforge.recipes.m3po import M3PO, DegeneratePool, M3POParams, m3p_score, select_pair
from pairforge.schema import assistant_message, to_dataset, user_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- fakes


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class FakeClip:
    """cos(image, text) = share of the text's words among the image's ``info["words"]``."""

    name, revision = "fake-clip", "r1"

    def __init__(self):
        self.calls = 0

    def cosine(self, images, texts):
        self.calls += 1
        out = []
        for im, t in zip(images, texts, strict=True):
            ws = _words(t)
            out.append(sum(w in im.info["words"] for w in ws) / len(ws) if ws else 0.0)
        return out

    def cosine_matrix(self, images, texts):
        return [self.cosine([im] * len(texts), texts) for im in images]


class ScriptedPolicy:
    """Returns the scripted completions (text, token log-probs) of each request id."""

    name, revision = "scripted-policy", ""
    capabilities = frozenset({Capability.GENERATE, Capability.SCORE, Capability.IMAGES})

    def __init__(self, script: dict[str, list[tuple[str, list[float]]]]):
        self.script = script
        self.generate_calls = []

    def generate(self, requests, n, sampling):
        self.generate_calls.append(([r.id for r in requests], n, sampling))
        return [[Completion(t, list(lps)) for t, lps in self.script[r.id][:n]] for r in requests]

    def score(self, requests, responses):
        raise AssertionError("m3po does not score")


class YesNoJudge:
    """A text-only judge whose log p("Yes") − log p("No") is scripted by candidate answer."""

    name, revision = "fake-judge", ""
    capabilities = frozenset({Capability.SCORE})

    def __init__(self, margin_by_answer: dict[str, float]):
        self.margin = margin_by_answer
        self.requests = []

    def score(self, requests, responses):
        out = []
        for r, resp in zip(requests, responses, strict=True):
            self.requests.append(r)
            text = r.messages[-1]["content"][-1]["text"]
            answer = re.search(r"Answer: (.*)\n", text).group(1)
            lp = self.margin[answer] if resp == "Yes" else 0.0
            out.append(ScoredResponse(resp, [lp]))
        return out


def _image(words: set[str], colour=(200, 30, 30)) -> Image.Image:
    im = Image.new("RGB", (32, 32), colour)
    im.info["words"] = set(words)
    return im


def _example(eid: str, question: str, answer: str, image: Image.Image | None) -> Example:
    n = 1 if image is not None else 0
    return Example(id=eid, messages=[user_message(question, n_images=n), assistant_message(answer)],
                   images=[image] if image is not None else [], task="color", source_dataset="unit",
                   source_id=eid, meta={"answer_value": "red"})


# ----------------------------------------------------------------------------- pure logic


def test_m3p_score_hand_computed():
    # S = (MAS_w − MAS_j) − α·max(0, logP_w − logP_j − δ)
    assert m3p_score(2.0, 1.5, -10.0, -9.0) == pytest.approx(0.5)  # j more likely: no penalty
    assert m3p_score(2.0, 0.5, -10.0, -20.0) == pytest.approx(1.5 - 0.5 * 9.9)  # −3.45
    assert m3p_score(2.0, 1.9, -10.0, -10.05) == pytest.approx(0.1)  # gap 0.05 < δ
    assert m3p_score(2.0, 1.0, -10.0, -11.0, alpha=1.0, delta=0.5) == pytest.approx(1.0 - 0.5)


def test_select_pair_prefers_a_confident_mistake_over_an_easy_one():
    texts = ["a", "b", "c", "d"]
    mas = [2.0, 1.5, 0.5, 1.9]
    logp = [-10.0, -9.0, -20.0, -10.05]
    # S: b = 0.5, c = 1.5 − 0.5·9.9 = −3.45 (easy: the policy would rarely say it), d = 0.1
    sel = select_pair(texts, mas, logp)
    assert (sel.chosen, sel.rejected) == (0, 1)
    assert sel.m3p_score == pytest.approx(0.5)
    # without the confidence term the largest MAS gap would win
    assert select_pair(texts, mas, logp, alpha=0.0).rejected == 2
    # second vector: S_1 = 1.0 − 0.5·0.9 = 0.55, S_2 = 1.8 − 0.5·2.9 = 0.35
    sel = select_pair(["x", "y", "z"], [2.0, 1.0, 0.2], [-10.0, -11.0, -13.0])
    assert (sel.chosen, sel.rejected, round(sel.m3p_score, 10)) == (0, 1, 0.55)


def test_select_pair_ties_duplicates_and_empties():
    # chosen: the first of the tied maxima; a candidate tied with it is no preference
    sel = select_pair(["p", "q", "r"], [1.0, 1.0, 0.4], [-1.0, -1.0, -1.0])
    assert (sel.chosen, sel.rejected) == (0, 2)
    # a duplicate of the chosen text is never the rejected one, whatever its scores
    sel = select_pair(["p", " p ", "r"], [1.0, 0.2, 0.4], [-1.0, 5.0, -1.0])
    assert sel.rejected == 2
    # empty candidates are left out
    sel = select_pair(["", "p", "r"], [math.nan, 1.0, 0.4], [0.0, -1.0, -1.0])
    assert (sel.chosen, sel.rejected) == (1, 2)


@pytest.mark.parametrize("texts,mas,match", [
    (["same", "same ", " same"], [1.0, 1.0, 1.0], "1 distinct non-empty candidate.*all identical"),
    (["", "", "x"], [math.nan, math.nan, 1.0], "2 empty"),
    (["a", "b", "c"], [0.7, 0.7, 0.7], "same MAS"),
])
def test_select_pair_degenerate_pools_say_why(texts, mas, match):
    with pytest.raises(DegeneratePool, match=match):
        select_pair(texts, mas, [0.0] * len(texts))


# ----------------------------------------------------------------------------- recipe wiring


def _script():
    return {
        "ex1": [("The circle is red.", [-1.0, -1.0, -1.0, -1.0]),     # all 4 words in the image
                ("The circle is blue.", [-1.0, -1.0, -1.0, -0.5]),    # more likely, wrong colour
                ("A green square is here.", [-9.0] * 5),              # unlikely and wrong
                ("The circle is red.", [-1.0, -1.0, -1.0, -1.0])],
        "ex2": [("same", [-1.0])] * 4,
    }


def test_recipe_rows_columns_and_values():
    clip = FakeClip()
    policy = ScriptedPolicy(_script())
    ctx = BuildContext(seed=3, models={"policy": policy, "clip": clip})
    recipe = M3PO(M3POParams(n=4))
    recipe.check(ctx)
    img = _image({"the", "circle", "is", "red"})
    out = recipe.process([_example("ex1", "What colour is the circle?", "It is red.", img),
                          _example("ex2", "What colour?", "Red.", img),
                          _example("ex3", "Any text?", "No.", None)], ctx)
    row = out[0].rows[0]
    assert (row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]) == \
        ("The circle is red.", "The circle is blue.")
    assert row["chosen_mas"] == pytest.approx(2.5)            # 4/4 words in the image
    assert row["rejected_mas"] == pytest.approx(2.5 * 3 / 4)
    assert row["chosen_logp"] == pytest.approx(-4.0) and row["rejected_logp"] == pytest.approx(-3.5)
    # S(blue) = 0.625 − 0.5·max(0, −4 + 3.5 − 0.1) = 0.625; S(green) = 2.5·(1 − 1/5) − 0.5·(41 − 0.1)
    assert row["m3p_score"] == pytest.approx(0.625)
    assert row["recipe"] == "m3po" and row["task"] == "color" and row["seed"] == 3
    assert {m["role"]: m["name"] for m in row["models"]} == {"policy": "scripted-policy", "clip": "fake-clip"}
    assert row["images"] == [img] and row["prompt"][0]["content"][1]["text"] == "What colour is the circle?"
    assert out[0].stats == {"candidates": 4.0, "empty_candidates": 0.0, "distinct_candidates": 3.0}
    assert out[1].reject.stage == "select" and "all identical" in out[1].reject.reason
    assert out[2].reject.stage == "filter" and "image" in out[2].reject.reason
    # one batched generate call for the examples with images, temperature 1, n candidates
    (ids, n, sampling), = policy.generate_calls
    assert ids == ["ex1", "ex2"] and n == 4 and sampling.temperature == 1.0
    assert clip.calls == 1
    ds = to_dataset(out[0].rows, "m3po")
    assert ds.features["m3p_score"].dtype == "float64" and ds[0]["chosen_logp"] == -4.0


def test_judge_mixes_into_mas_and_is_recorded():
    texts = {"The circle is red.": 4.0, "The circle is blue.": -4.0, "A green square is here.": 0.0}
    judge = YesNoJudge(texts)
    ctx = BuildContext(models={"policy": ScriptedPolicy(_script()), "clip": FakeClip(), "judge": judge})
    recipe = load_recipe("m3po", {"n": "4", "judge_weight": "0.5"})
    recipe.check(ctx)
    img = _image({"the", "circle", "is", "red"})
    row, = recipe.process([_example("ex1", "What colour is the circle?", "It is red.", img)], ctx)[0].rows
    p_yes = 1 / (1 + math.exp(-4.0))
    assert row["chosen_mas"] == pytest.approx(0.5 * 2.5 + 0.5 * 2.5 * p_yes)
    assert row["rejected_mas"] == pytest.approx(0.5 * 2.5 * 0.75 + 0.5 * 2.5 * (1 - p_yes))
    # the judge is text-only here: the prompt carries question and answer, no image
    assert all(not r.images for r in judge.requests)
    assert "What colour is the circle?" in judge.requests[0].messages[0]["content"][-1]["text"]
    assert [t["name"] for t in row["prompt_templates"]] == ["m3po/judge.txt"]
    assert "judge" in {m["role"] for m in row["models"]}
    assert M3PO().templates() == {}  # judge off: the template is not part of the build identity


def test_params_and_checks():
    with pytest.raises(PairforgeError, match="unknown parameter 'N'"):
        load_recipe("m3po", {"N": 8})
    with pytest.raises(PairforgeError, match="n=1"):
        load_recipe("m3po", {"n": 1})
    with pytest.raises(PairforgeError, match="'abc' is not a float"):
        load_recipe("m3po", {"alpha": "abc"})
    assert load_recipe("m3po", {"alpha": "0.25"}).params()["alpha"] == 0.25
    with pytest.raises(PairforgeError, match="needs a judge model"):
        M3PO(M3POParams(judge_weight=0.3)).check(BuildContext(models={"policy": ScriptedPolicy({}),
                                                                       "clip": FakeClip()}))

    class TextOnly(ScriptedPolicy):
        capabilities = frozenset({Capability.GENERATE, Capability.SCORE})

    with pytest.raises(PairforgeError, match="'images'"):
        M3PO().check(BuildContext(models={"policy": TextOnly({}), "clip": FakeClip()}))


# ----------------------------------------------------------------------------- real backend


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> HFModel:
    return HFModel(save_random_llava(tmp_path_factory.mktemp("tiny-llava")), batch_size=4, progress=False)


def test_end_to_end_random_llava_is_batch_independent(llava):
    clip = FakeClip()
    words = {"the", "circle", "is", "red", "a", "square"}
    exs = [_example(f"e{i}", "what color is the circle ?", "red", _image(words, (40 * i, 90, 30)))
           for i in range(3)]
    ctx = BuildContext(seed=7, models={"policy": llava, "clip": clip})
    recipe = load_recipe("m3po", {"n": 4, "max_new_tokens": 8})
    together = recipe.process(exs, ctx)
    alone = [recipe.process([ex], ctx)[0] for ex in exs]
    for a, b in zip(together, alone):
        assert (a.reject, [r["id"] for r in a.rows]) == (b.reject, [r["id"] for r in b.rows])
        for ra, rb in zip(a.rows, b.rows):
            for k in ("chosen_mas", "rejected_mas", "chosen_logp", "rejected_logp", "m3p_score"):
                assert ra[k] == pytest.approx(rb[k], abs=1e-5)
    rows = [r for o in together for r in o.rows]
    assert rows, [o.reject for o in together]
    for r in rows:
        assert r["chosen_mas"] > r["rejected_mas"]
        assert r["chosen_logp"] < 0 and r["rejected_logp"] < 0
    # another run seed draws other pools
    other = recipe.process(exs, BuildContext(seed=8, models={"policy": llava, "clip": clip}))
    assert [r["id"] for o in other for r in o.rows] != [r["id"] for r in rows]
    to_dataset(rows, "m3po")


# ----------------------------------------------------------------------------- paper preset, MAS(R | I, Q)


def test_paper_preset_and_overrides():
    p = load_recipe("m3po", {"preset": "paper"}).params()
    # N = 32 (§3.2, §4.1), α = 0.5, δ = 0.1 (§4.1); nucleus sampling at a moderate temperature
    # (§3.2 gives no numbers: 0.7 / 0.9 ours); the question-aware judge is on
    assert (p["n"], p["alpha"], p["delta"]) == (32, 0.5, 0.1)
    assert p["temperature"] < 1.0 and p["top_p"] < 1.0 and p["judge_weight"] > 0
    assert load_recipe("m3po", {"preset": "paper", "n": "16"}).params()["n"] == 16  # explicit wins
    assert load_recipe("m3po", {}).params()["n"] == 8  # the CPU default stays small
    with pytest.raises(PairforgeError, match="preset='gpu'"):
        load_recipe("m3po", {"preset": "gpu"})
    with pytest.raises(PairforgeError, match="moderate temperature with nucleus sampling"):
        load_recipe("m3po", {"temperature": "0"})  # no longer attributes 1.0 to the paper


def test_paper_preset_needs_the_judge_and_samples_with_top_p():
    recipe = load_recipe("m3po", {"preset": "paper", "n": "4"})
    with pytest.raises(PairforgeError, match="needs a judge model"):
        recipe.check(BuildContext(models={"policy": ScriptedPolicy(_script()), "clip": FakeClip()}))
    policy = ScriptedPolicy(_script())
    judge = YesNoJudge({"The circle is red.": 4.0, "The circle is blue.": -4.0, "A green square is here.": 0.0})
    ctx = BuildContext(models={"policy": policy, "clip": FakeClip(), "judge": judge})
    recipe.check(ctx)
    img = _image({"the", "circle", "is", "red"})
    recipe.process([_example("ex1", "What colour is the circle?", "It is red.", img)], ctx)
    (_, _, sampling), = policy.generate_calls
    assert (sampling.temperature, sampling.top_p) == (0.7, 0.9)
    # the judge is asked about the question: instruction adherence is part of MAS(R | I, Q)
    prompt = judge.requests[0].messages[0]["content"][-1]["text"]
    assert "What colour is the circle?" in prompt and "what the question asks" in prompt


def test_clip_on_question_and_answer():
    """clip_text=question+answer: CLIP scores "Q R" against the image, so an answer that drops
    the question's words scores lower than with the answer alone."""
    clip = FakeClip()
    ctx = BuildContext(models={"policy": ScriptedPolicy(_script()), "clip": clip})
    recipe = load_recipe("m3po", {"n": "4", "clip_text": "question+answer"})
    img = _image({"the", "circle", "is", "red", "what", "colour"})
    row, = recipe.process([_example("ex1", "What colour is the circle?", "It is red.", img)], ctx)[0].rows
    # "What colour is the circle? The circle is red." = 9 words, all in the image → 2.5
    # "... The circle is blue." → 8/9 in the image
    assert row["chosen_mas"] == pytest.approx(2.5) and row["rejected_mas"] == pytest.approx(2.5 * 8 / 9)
    with pytest.raises(PairforgeError, match="clip_text='image'"):
        load_recipe("m3po", {"clip_text": "image"})
