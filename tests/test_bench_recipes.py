"""scripts/bench_recipes.py: its pure pieces (ECE, reward-accuracy windows, the control pairs,
CW-DPO's step split) and a ``--quick`` smoke run at tiny size (random tiny LLaVA)."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import script_module



@pytest.fixture(scope="module")
def bench():
    with script_module("bench_recipes") as module:
        yield module


# ----------------------------------------------------------------------------- ECE


def test_ece_hand_computed(bench):
    # bins (0, .1], (.1, .2], ..., (.9, 1]:
    #   bin 0: {0.05: wrong}        acc 0,   conf 0.05  -> 1/5 * 0.05  = 0.010
    #   bin 1: {0.15: ok, 0.18: wrong} acc 0.5, conf 0.165 -> 2/5 * 0.335 = 0.134
    #   bin 9: {0.95: ok, 1.0: ok}  acc 1,   conf 0.975 -> 2/5 * 0.025 = 0.010
    conf = [0.05, 0.15, 0.18, 0.95, 1.0]
    correct = [False, True, False, True, True]
    assert bench.expected_calibration_error(conf, correct) == pytest.approx(0.154)


def test_ece_bin_edges_and_perfect_calibration(bench):
    # 0.1 belongs to the first bin (b/n, (b+1)/n]: |1 - 0.1|/2 + |0 - 0.2|/2 = 0.55
    # (were 0.1 binned with 0.2 it would be |0.5 - 0.15| = 0.35)
    assert bench.expected_calibration_error([0.1, 0.2], [True, False]) == pytest.approx(0.55)
    assert bench.expected_calibration_error([0.0], [False]) == pytest.approx(0.0)
    assert bench.expected_calibration_error([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    assert math.isnan(bench.expected_calibration_error([], []))
    with pytest.raises(ValueError):
        bench.expected_calibration_error([1.5], [True])


def test_answer_confidence_is_geometric_mean_token_probability(bench):
    assert bench.answer_confidence([-1.0, -3.0]) == pytest.approx(math.exp(-2.0))
    assert bench.answer_confidence([]) == 0.0


# ----------------------------------------------------------------------------- trainer log


def test_reward_accuracy_windows(bench):
    stage1 = [{"step": i, "stage": 1, "loss": 1.0} for i in range(1, 4)]  # SFT-C: no rewards
    values = [0.0, 0.5, 0.25, 1, 1, 1, 1, 1, 1, 0.75, 0.5]  # step 1 (policy = reference) dropped
    stage2 = [{"step": 4 + i, "stage": 2, "rewards/accuracy": v} for i, v in enumerate(values)]
    early, end = bench.reward_accuracy_windows(stage1 + stage2)
    # 10 counted steps -> 2 per window: (0.5 + 0.25) / 2 and (0.75 + 0.5) / 2
    assert (early, end) == pytest.approx((0.375, 0.625))
    assert all(math.isnan(x) for x in bench.reward_accuracy_windows(stage1))


def test_cw_stage_steps_fit_the_budget(bench):
    epochs, s1, s2 = bench.cw_stage_steps(60, n_stage1=40, batch_size=8)
    assert (s1, s2) == (15, 45)
    assert math.ceil(epochs * 40 / 8) == 15  # what the trainer will run
    assert bench.cw_stage_steps(60, n_stage1=0, batch_size=8) == (0.0, 0, 60)
    epochs, s1, s2 = bench.cw_stage_steps(4, n_stage1=3, batch_size=4)
    assert (s1, s2) == (1, 3) and math.ceil(epochs * 3 / 4) == 1


# ----------------------------------------------------------------------------- controls


def test_length_biased_pair_keeps_the_grade(bench):
    from pairforge.world import example_at, grade

    rng = random.Random(0)
    rows = [r for r in (example_at("train", i, 0) for i in range(150)) if r["filter_reason"] is None]
    for r in rows:
        chosen, rejected = bench.length_biased_pair(r["answer"], rng)
        words = r["answer"].split()
        assert chosen.startswith(r["answer"]) and len(chosen) > len(r["answer"])
        assert rejected.split() == words[:math.ceil(len(words) / 2)]
        assert len(rejected) < len(chosen)
        # the appended clause says nothing gradable: the chosen answer grades as the answer does
        assert grade(r, chosen) == grade(r, r["answer"]) == "correct", (r["answer"], chosen)
    assert bench.length_biased_pair("Yes.", rng) is None


def test_random_negative(bench):
    rng = random.Random(0)
    picks = {bench.random_negative("It is red.", ["it is red. ", "It is blue.", "It is green."], rng)
             for _ in range(50)}
    assert picks == {"It is blue.", "It is green."}
    assert bench.random_negative("It is red.", ["It is red.", "it is red."], rng) is None


def test_control_rows_account_for_every_example(bench):
    from pairforge.sources.sft import read_examples

    examples = list(read_examples("shapes:train?n=40"))
    for name in bench.CONTROLS:
        rows, dropped = bench.control_rows(name, examples, seed=0)
        assert len(rows) + sum(dropped.values()) == len(examples)
        assert rows == bench.control_rows(name, examples, seed=0)[0]  # deterministic
        by_id = {ex.id: ex for ex in examples}
        for row in rows:
            ex = by_id[row["source_id"]]
            assert not ex.meta.get("filter_reason")
            assert row["task"] == ex.task and row["images"] == ex.images
            chosen, rejected = row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]
            assert chosen != rejected
            if name == "random-negative":
                assert chosen == ex.answer
                assert rejected in {e.answer for e in examples if e.task == ex.task and e.id != ex.id}


# ----------------------------------------------------------------------------- smoke run


def test_quick_run_writes_the_report_and_reports_broken_recipes(bench, tmp_path, monkeypatch):
    from pairforge.recipes import RECIPES

    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(RECIPES, "m3po", "pairforge.recipes.no_such_module:M3PO")  # not importable
    out = tmp_path / "out"
    bench.main(["--quick", "--work", str(tmp_path / "work"), "--out-dir", str(out),
                "--sets", "vapr,length-biased,m3po"])
    report = json.loads((out / "recipes.json").read_text())
    md = (out / "recipes.md").read_text()
    sets = report["sets"]
    assert report["base"]["n"] == 12 and report["settings"]["steps"] == 4
    for name in ("vapr", "length-biased"):
        assert sets[name]["status"] == "ok", sets[name]["reason"]
        assert sets[name]["pairs"] > 0 and len(sets[name]["runs"]) == 1
        run = sets[name]["runs"][0]
        assert run["steps"] == 4 and 0 <= run["accuracy"] <= 1
        assert sets[name]["summary"]["accuracy_after"][0] == pytest.approx(run["accuracy"])
        assert f"| {name} | dpo | {sets[name]['pairs']} |" in md
    assert sets["m3po"]["status"] == "not run" and "no_such_module" in sets["m3po"]["reason"]
    assert "| m3po | dpo | not run: build failed:" in md
    # the length-biased set: chosen always longer, so the audit raises the length flag
    assert "length_shortcut" in sets["length-biased"]["audit_flags"]
    assert sets["length-biased"]["chosen_longer_rate"] == 1.0
    assert sets["vapr"]["chosen_correct"] == 1.0
    assert [c["verdict"] for c in report["checks"]][2] == "yes"
    assert "## Accuracy per category" in md and report["finished"]
