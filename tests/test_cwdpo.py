"""CW-DPO recipe: hand-checked pure pieces (easy filter, stage split, dataset-negative count,
CLIP grading rule), the recipe's wiring with a scripted fake policy on shapes-world examples
(ground-truth grading, duplicates, easy negatives, stages, chosen from the policy, dataset
negatives across examples and resume), and a random tiny LLaVA run whose stored ℓ̄ matches the
policy's own scoring."""

from __future__ import annotations

import os
import random
import re

import pytest
from PIL import Image

from pairforge.errors import PairforgeError
from pairforge.models import Capability, Completion, ScoredResponse
from pairforge.models.hf import HFModel
from pairforge.models.random_tiny import save_random_llava
from pairforge.recipes import BuildContext, Example, load_recipe
from pairforge.recipes.cwdpo import (
    CWDPO,
    CWDPOParams,
    cwdpo_stage,
    grade_by_mas,
    is_too_easy,
    n_dataset_negatives,
)
from pairforge.schema import assistant_message, to_dataset, user_message
from pairforge.world import make_example, sample_scene

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- helpers


def world_example(row: dict) -> Example:
    meta = {k: row[k] for k in ("target", "scene", "answer_value", "filter_reason")}
    return Example(id=row["id"], messages=row["messages"], images=row["images"], task=row["task"],
                   source_dataset="shapes", source_id=row["id"], meta=meta)


def colour_examples(n: int) -> list[Example]:
    """``n`` colour questions with pairwise different answers."""
    out, values = [], set()
    seed = 0
    while len(out) < n:
        seed += 1
        row = make_example(sample_scene(seed), "color", random.Random(seed))
        if row is not None and row["answer_value"] not in values:
            values.add(row["answer_value"])
            out.append(world_example(row))
    return out


def other_colour(value: str, k: int = 0) -> str:
    return [c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c != value][k]


class ScriptedPolicy:
    """generate: ``script(example_value)`` completions per request; score: −2 per word."""

    name, revision = "scripted", ""
    capabilities = frozenset({Capability.GENERATE, Capability.SCORE, Capability.IMAGES})

    def __init__(self, script, values: dict[str, str]):
        self.script, self.values = script, values
        self.scored = []

    def generate(self, requests, n, sampling):
        return [[Completion(t, list(lp)) for t, lp in self.script(self.values[r.id])][:n] for r in requests]

    def score(self, requests, responses):
        self.scored += list(responses)
        return [ScoredResponse(t, [-2.0] * len(t.split())) for t in responses]


def script(value: str):
    return [
        (f"It is {value}.", [-0.2, -0.2, -0.2]),                    # correct
        (f"It is {other_colour(value)}.", [-1.0, -1.0, -1.0]),      # wrong, ℓ̄ −1
        (f"it is  {other_colour(value)}.", [-0.9, -0.9, -0.9]),     # the same wrong answer again
        (f"The circle is {other_colour(value, 1)}.", [-0.5] * 4),   # wrong, ℓ̄ −0.5
        (f"It is {other_colour(value, 2)}.", [-8.0, -8.0, -8.0]),   # wrong but too easy: ℓ̄ −8
        ("I do not know.", [-0.1] * 4),                             # unparseable
    ]


class FakeClip:
    """cos = share of the text's words among the image's ``info["words"]``."""

    name, revision = "fake-clip", ""

    def cosine(self, images, texts):
        out = []
        for im, t in zip(images, texts, strict=True):
            ws = re.findall(r"[a-z]+", t.lower())
            out.append(sum(w in im.info["words"] for w in ws) / len(ws) if ws else 0.0)
        return out


def _ctx(exs, seed=0, policy_script=script, **models):
    policy = ScriptedPolicy(policy_script, {e.id: e.meta["answer_value"] for e in exs})
    return BuildContext(seed=seed, models={"policy": policy, **models}), policy


def _texts(rows, key="rejected"):
    return [r[key][0]["content"][0]["text"] for r in rows]


# ----------------------------------------------------------------------------- pure logic


def test_easy_filter_and_mas_rule():
    assert is_too_easy(-5.01, l_floor=-3.0, margin=2.0)
    assert not is_too_easy(-5.0, l_floor=-3.0, margin=2.0)
    assert grade_by_mas(2.0, 2.5, margin=0.5) == "wrong"
    assert grade_by_mas(2.1, 2.5, margin=0.5) == "undecided"
    assert grade_by_mas(2.5, 2.5, margin=0.5) == "correct"


def test_dataset_negative_count_hand_computed():
    assert n_dataset_negatives(3, 0.25, 0.99) == 1        # x = 1/3·3 = 1 exactly
    assert n_dataset_negatives(3, 0.5, 0.0) == 3          # x = 3
    assert n_dataset_negatives(2, 0.2, 0.3) == 1          # x = 0.5: up when u < 0.5
    assert n_dataset_negatives(2, 0.2, 0.7) == 0
    assert n_dataset_negatives(0, 0.25, 0.1) == 1 and n_dataset_negatives(0, 0.25, 0.5) == 0
    assert n_dataset_negatives(5, 0.0, 0.0) == 0


def test_stage_split_is_a_function_of_the_id():
    ids = [f"ex-{i}" for i in range(4000)]
    stages = [cwdpo_stage(i, 0.75) for i in ids]
    assert stages == [cwdpo_stage(i, 0.75) for i in ids]
    assert abs(stages.count(1) / len(ids) - 0.75) < 0.03
    assert {cwdpo_stage(i, 0.0) for i in ids} == {2} and {cwdpo_stage(i, 1.0) for i in ids} == {1}
    # a larger share only moves examples from Stage 2 to Stage 1
    assert all(cwdpo_stage(i, 0.9) == 1 for i, s in zip(ids, stages) if s == 1)


# ----------------------------------------------------------------------------- recipe wiring


def test_stage2_pairs_easy_and_duplicate_negatives_counted():
    ex, = colour_examples(1)
    v = ex.meta["answer_value"]
    ctx, _ = _ctx([ex], seed=1)
    recipe = CWDPO(CWDPOParams(k=6, stage1_share=0.0))
    recipe.check(ctx)
    out, = recipe.process([ex], ctx)
    assert _texts(out.rows) == [f"It is {other_colour(v)}.", f"The circle is {other_colour(v, 1)}."]
    assert _texts(out.rows, "chosen") == [ex.answer] * 2
    assert [r["rejected_mean_logp"] for r in out.rows] == pytest.approx([-1.0, -0.5])
    assert [r["rejected_n_tokens"] for r in out.rows] == [3, 4]
    assert {r["cwdpo_stage"] for r in out.rows} == {2}
    assert out.stats["easy_negatives"] == 1 and out.stats["duplicate_negatives"] == 1
    assert (out.stats["graded_correct"], out.stats["graded_wrong"], out.stats["graded_unparseable"]) == (1, 4, 1)
    assert out.stats["stage2_pairs"] == 2
    ds = to_dataset(out.rows, "cwdpo")
    assert ds.features["cwdpo_stage"].dtype == "int8" and ds[0]["rejected_n_tokens"] == 3


def test_run_pass_fits_the_cooling_weight_on_the_rows():
    """Pass two of a cwdpo build: ℓ_floor, τ and C fitted on every row's ℓ̄, token count and
    stage (cooling_calibration; hand vector in test_losses.py); no row is dropped."""
    from pairforge.recipes.cwdpo import cooling_calibration

    exs = colour_examples(3)
    ctx, _ = _ctx(exs, seed=1)
    recipe = CWDPO(CWDPOParams(k=6, stage1_share=0.0))
    rows = [r for o in recipe.process(exs, ctx) for r in o.rows]
    rp = recipe.run_pass()
    assert rp.judge is None and rp.group is None
    cols = {c: [r[c] for r in rows] for c in rp.columns}
    got = rp.fit(cols)
    assert got == cooling_calibration(cols["rejected_mean_logp"], cols["rejected_n_tokens"], cols["cwdpo_stage"])
    assert got["cooling_n"] == len(rows) and got["cooling_floor"] == pytest.approx(-1.0)  # ℓ̄ −1, −0.5 per example


def test_easy_threshold_is_a_parameter():
    ex, = colour_examples(1)
    ctx, _ = _ctx([ex])
    # the −8 negative: dropped below −7 − 0.5, kept above −7 − 1.5
    out, = CWDPO(CWDPOParams(k=6, stage1_share=0.0, l_floor=-7.0, easy_margin=0.5)).process([ex], ctx)
    assert len(out.rows) == 2 and out.stats["easy_negatives"] == 1
    out, = CWDPO(CWDPOParams(k=6, stage1_share=0.0, l_floor=-7.0, easy_margin=1.5)).process([ex], ctx)
    assert len(out.rows) == 3 and out.stats["easy_negatives"] == 0


def test_stage1_keeps_the_gentlest_negatives():
    ex, = colour_examples(1)
    v = ex.meta["answer_value"]
    ctx, _ = _ctx([ex])
    out, = CWDPO(CWDPOParams(k=6, stage1_share=1.0)).process([ex], ctx)
    assert _texts(out.rows) == [f"The circle is {other_colour(v, 1)}."]    # highest ℓ̄ (−0.5)
    assert out.rows[0]["cwdpo_stage"] == 1 and out.stats["stage1_pairs"] == 1
    out, = CWDPO(CWDPOParams(k=6, stage1_share=1.0, gentle_negatives=5)).process([ex], ctx)
    assert len(out.rows) == 2


def test_chosen_from_the_policy_and_its_fallback():
    ex, = colour_examples(1)
    v = ex.meta["answer_value"]
    ctx, _ = _ctx([ex])
    out, = CWDPO(CWDPOParams(k=6, chosen="policy", stage1_share=0.0)).process([ex], ctx)
    assert set(_texts(out.rows, "chosen")) == {f"It is {v}."}
    assert "chosen_fallback_dataset" not in out.stats
    wrong_only = lambda value: script(value)[1:]  # noqa: E731
    ctx, _ = _ctx([ex], policy_script=wrong_only)
    out, = CWDPO(CWDPOParams(k=6, chosen="policy", stage1_share=0.0)).process([ex], ctx)
    assert set(_texts(out.rows, "chosen")) == {ex.answer} and out.stats["chosen_fallback_dataset"] == 1


def test_no_usable_negative_is_rejected_with_counts():
    ex, = colour_examples(1)
    ctx, _ = _ctx([ex], policy_script=lambda value: [script(value)[0], script(value)[4]])
    out, = CWDPO(CWDPOParams(k=2)).process([ex], ctx)
    assert out.reject.stage == "select"
    assert "1 correct, 1 wrong" in out.reject.reason and "1 too easy" in out.reject.reason


def test_dataset_negatives_follow_source_order_and_survive_resume():
    exs = colour_examples(4)
    params = {"k": 6, "dataset_negative_share": 0.5, "stage1_share": 0.0}
    ctx, policy = _ctx(exs, seed=5)
    recipe = load_recipe("cwdpo", params)
    together = recipe.process(exs, ctx)
    # example 0 has no earlier example: on-policy only; later ones add earlier answers, which
    # the scripted score gives ℓ̄ = −2 (on-policy negatives have −1 and −0.5)
    assert together[0].stats["dataset_negatives"] == 0
    for i in range(1, 4):
        from_dataset = [r for r in together[i].rows if r["rejected_mean_logp"] == -2.0]
        assert 0 < len(from_dataset) == together[i].stats["dataset_negatives"] <= min(i, 3)
        assert set(_texts(from_dataset)) <= {e.answer for e in exs[:i]}
        assert len(together[i].rows) == 2 + len(from_dataset)
    assert set(policy.scored) <= {e.answer for e in exs}
    # resume after example 1 from the state dict: identical rows
    first = load_recipe("cwdpo", params)
    part1 = first.process(exs[:2], _ctx(exs, seed=5)[0])
    second = load_recipe("cwdpo", params)
    second.load_state_dict(first.state_dict())
    part2 = second.process(exs[2:], _ctx(exs, seed=5)[0])
    assert [o.rows for o in part1 + part2] == [o.rows for o in together]


def test_without_ground_truth_clip_grades_against_the_dataset_answer():
    img = Image.new("RGB", (32, 32))
    img.info["words"] = {"the", "circle", "is", "red"}
    ex = Example(id="x", messages=[user_message("What colour is the circle?"), assistant_message("The circle is red.")],
                 images=[img], task="color", meta={"answer_value": "red"})
    policy_script = lambda value: [("The circle is red.", [-0.5] * 4), ("The circle is blue.", [-1.0] * 4),  # noqa: E731
                                   ("A blue square.", [-1.0] * 3)]
    ctx, _ = _ctx([ex], policy_script=policy_script, clip=FakeClip())
    out, = CWDPO(CWDPOParams(k=3, stage1_share=0.0, mas_margin=0.5)).process([ex], ctx)
    # MAS: reference 2.5, "blue circle" 2.5·3/4 = 1.875 (≤ 2.0: wrong), "A blue square." 0
    assert _texts(out.rows) == ["The circle is blue.", "A blue square."]
    assert out.stats["graded_correct"] == 1
    out, = CWDPO(CWDPOParams(k=3, stage1_share=0.0, mas_margin=1.0)).process([ex], ctx)
    assert _texts(out.rows) == ["A blue square."] and out.stats["graded_undecided"] == 1
    # neither ground truth nor CLIP: rejected up front, with the fix
    out, = CWDPO().process([ex], _ctx([ex], policy_script=policy_script)[0])
    assert out.reject.stage == "grade" and "--clip" in out.reject.reason


def test_params_are_checked():
    with pytest.raises(PairforgeError, match="chosen='gold'"):
        load_recipe("cwdpo", {"chosen": "gold"})
    with pytest.raises(PairforgeError, match=r"dataset_negative_share=1.0"):
        load_recipe("cwdpo", {"dataset_negative_share": 1.0})
    with pytest.raises(PairforgeError, match="unknown parameter 'l_flor'"):
        load_recipe("cwdpo", {"l_flor": -2})


# ----------------------------------------------------------------------------- real backend


def test_random_llava_rejected_logp_is_the_policys_mean_logprob(tmp_path):
    llava = HFModel(save_random_llava(tmp_path / "llava"), batch_size=4, progress=False)
    img = Image.new("RGB", (32, 32), (200, 20, 20))
    img.info["words"] = {"red"}
    exs = [Example(id=f"e{i}", messages=[user_message("what color is the circle ?"), assistant_message("red")],
                   images=[img], task="color") for i in range(2)]
    ctx = BuildContext(seed=2, models={"policy": llava, "clip": FakeClip()})
    recipe = load_recipe("cwdpo", {"k": 4, "max_new_tokens": 6, "stage1_share": 0.0, "l_floor": -99})
    out = recipe.process(exs, ctx)
    rows = [r for o in out for r in o.rows]
    assert rows, [o.reject for o in out]
    ex_by_id = {e.id: e for e in exs}
    rescored = llava.score([_request(ex_by_id[r["source_id"]]) for r in rows], _texts(rows))
    for r, s in zip(rows, rescored):
        assert r["rejected_mean_logp"] == pytest.approx(s.mean_logprob, abs=1e-4)
        assert r["rejected_n_tokens"] == s.n_tokens
    assert [o.rows for o in recipe.process(exs, ctx)] == [o.rows for o in out]


def _request(ex: Example):
    from pairforge.models import Request

    return Request(ex.prompt_messages, ex.images, id=ex.id)
