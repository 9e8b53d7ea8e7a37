"""scripts/bench_recipes.py: its pure pieces (ECE, reward-accuracy windows, the control pairs,
CW-DPO's step split, the paired statistics, the README table) and a ``--smoke`` run at tiny size
(random tiny LLaVA)."""

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


# ----------------------------------------------------------------------------- paired statistics


def test_mcnemar_exact_hand_computed(bench):
    # after/before per question: improved (0->1) at 0, 1; worsened (1->0) at 3; the rest concordant.
    # b = 2, c = 1, n = 3: p = 2 * (C(3,0) + C(3,1)) / 2^3 = 2 * 4 / 8 = 1.0
    m = bench.mcnemar_exact([1, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0])
    assert m == {"improved": 2, "worsened": 1, "p": 1.0}
    # b = 8, c = 1, n = 9: p = 2 * (1 + 9) / 512 = 0.0390625
    after, before = [1] * 8 + [0] + [1] * 5, [0] * 8 + [1] + [1] * 5
    assert bench.mcnemar_exact(after, before)["p"] == pytest.approx(20 / 512)
    # b = 0, c = 5: p = 2 * 1 / 32 (symmetric in b and c)
    assert bench.mcnemar_exact([0] * 5, [1] * 5) == {"improved": 0, "worsened": 5, "p": 2 / 32}
    assert bench.mcnemar_exact([1, 0], [1, 0])["p"] == 1.0  # no discordant pair
    with pytest.raises(ValueError):
        bench.mcnemar_exact([1], [1, 0])


def test_majority_vote(bench):
    import numpy as np

    c = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
    assert bench.majority_vote(c).tolist() == [True, True, False, False]
    assert bench.majority_vote(np.array([[1, 0], [0, 0]])).tolist() == [False, False]  # a tie is not correct


def test_paired_bootstrap_point_estimate_and_degenerate_intervals(bench):
    import numpy as np

    base = np.array([[1, 0, 0, 1, 0]])
    after = np.array([[1, 1, 0, 1, 1], [1, 1, 0, 0, 0]])  # per seed: +2/5 and 0
    r = bench.paired_bootstrap_delta(after, base, n_boot=500, seed=0)
    assert r["per_seed"] == pytest.approx([0.4, 0.0]) and r["delta"] == pytest.approx(0.2)
    assert r["sd_seeds"] == pytest.approx(0.4 / 2 ** 0.5)
    assert r["ci"][0] <= r["delta"] <= r["ci"][1]
    assert r == bench.paired_bootstrap_delta(after, base, n_boot=500, seed=0)  # deterministic
    # the same answers on both sides: Δ = 0 and so is every replicate
    same = bench.paired_bootstrap_delta(base, base, n_boot=200)
    assert same["delta"] == 0 and same["ci"] == [0, 0]
    # every question gained on every seed: Δ = 1 whatever the resample
    assert bench.paired_bootstrap_delta(np.ones((3, 4)), np.zeros((1, 4)), n_boot=200)["ci"] == [1, 1]


def test_paired_bootstrap_resamples_seeds(bench):
    import numpy as np

    # Two seeds, Δ = +1 on every question for seed 0 and −1 for seed 1: the question resample
    # changes nothing, the seed resample gives −1, 0, +1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5th and 97.5th percentiles are −1 and +1 (a question-only bootstrap would give [0, 0]).
    after = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    before = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])
    r = bench.paired_bootstrap_delta(after, before, n_boot=2000, seed=1)
    assert r["delta"] == 0 and r["ci"] == [-1, 1] and r["per_seed"] == [1, -1]


def test_paired_bootstrap_is_paired_and_has_the_normal_width(bench):
    import numpy as np

    rng = np.random.default_rng(0)
    n = 400
    base = (rng.random(n) < 0.5).astype(float)
    flip = rng.random(n) < 0.1  # after differs from before on ~10% of the questions
    after = np.where(flip, 1 - base, base)
    r = bench.paired_bootstrap_delta(after[None], base[None], n_boot=4000, seed=0)
    d = after - base
    half = 1.96 * d.std(ddof=1) / n ** 0.5  # the paired normal approximation
    assert (r["ci"][1] - r["ci"][0]) / 2 == pytest.approx(half, rel=0.15)
    # unpaired, the half-width would be that of two independent accuracies: ~3x wider here
    unpaired = 1.96 * (base.var(ddof=1) / n + after.var(ddof=1) / n) ** 0.5
    assert (r["ci"][1] - r["ci"][0]) / 2 < unpaired / 2
    with pytest.raises(ValueError):
        bench.paired_bootstrap_delta(np.ones((2, 3)), np.ones((2, 4)))


def test_compare_and_summary_against_the_base_and_the_full_method(bench):
    base = {"accuracy": 0.5, "per_task": {"color": {"n": 2, "accuracy": 0.5}, "size": {"n": 2, "accuracy": 0.5}},
            "correct": "1010"}
    run = lambda seed, c: {"seed": seed, "accuracy": c.count("1") / 4, "ece": 0.1, "reward_acc_early": 0.5,
                           "reward_acc_end": 0.8, "correct": c,
                           "per_task": {"color": {"accuracy": int(c[0]) / 2 + int(c[1]) / 2},
                                        "size": {"accuracy": int(c[2]) / 2 + int(c[3]) / 2}}}
    full = [run(0, "1111"), run(1, "1110")]
    abl = [run(1, "1010"), run(0, "1011")]  # seeds in another order: paired by seed
    sm = bench.summarize(abl, base, full, n_boot=100)
    assert sm["vs_base"]["per_seed"] == pytest.approx([0, 0.25])
    assert sm["vs_full"]["seeds"] == [1, 0]
    assert sm["vs_full"]["per_seed"] == pytest.approx([-0.25, -0.25])
    # majority over seeds: ablation 1010 (ties at index 3 count as wrong), full 1110 + 1111 -> 1110 + tie 0
    assert sm["vs_full"]["mcnemar"] == {"improved": 0, "worsened": 1, "p": 1.0}
    assert sm["per_task_delta"]["size"] == pytest.approx(0.25)
    assert sm["vs_full"]["ci"][0] <= -0.25 <= sm["vs_full"]["ci"][1] <= 0
    assert bench.ablation_verdict({"delta": -0.2, "ci": [-0.3, -0.1]}) == "mechanism helps (full > ablation)"
    assert bench.ablation_verdict({"delta": 0.2, "ci": [0.1, 0.3]}) == "mechanism hurts (ablation > full)"
    assert bench.ablation_verdict({"delta": 0.0, "ci": [-0.1, 0.1]}).startswith("no difference")
    with pytest.raises(ValueError):
        bench.compare(["101"], ["1010"])


# ----------------------------------------------------------------------------- sets, views, README


def test_caption_heavy_answers_have_several_sentences_and_keep_the_grade(bench):
    from pairforge.recipes.aspo import sentence_spans
    from pairforge.world import grade

    rows = bench.caption_rows(12, 0)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    for r in rows:
        assert r["task"] == "captioning" and r["messages"][1]["content"][0]["text"] == r["answer"]
        assert len(sentence_spans(r["answer"])) >= 3, r["answer"]
        assert r["answer"][r["answer_span_start"]:r["answer_span_end"]].lower() == r["answer_value"].lower()
        assert grade(r, r["answer"]) == "correct", r["answer"]


def test_views_and_budget(bench):
    from datasets import Dataset

    ds = Dataset.from_dict({"cwdpo_stage": [1, 2, None, 2], "p2dpo_kind": ["focus", "robust", "focus", "robust"],
                            "ddw_focus": [0.7, 0.7, 0.6, 0.6], "ddw_robust": [0.3, 0.3, 0.4, 0.4]})
    assert len(bench.make_view(ds, "stage2")) == 3
    assert bench.make_view(ds, "focus")["p2dpo_kind"] == ["focus", "focus"]
    fixed = bench.make_view(ds, "ddw-fixed")
    assert fixed["ddw_focus"] == [0.5] * 4 and fixed["ddw_robust"] == [0.5] * 4
    assert fixed["cwdpo_stage"] == [1, 2, None, 2]
    assert bench.train_batch("p2dpo", 8) == 4 and bench.train_batch("p2dpo", 3) == 2
    assert bench.train_batch("dpo", 8) == 8
    for v in bench.ABLATIONS:  # every ablation names a full method and a known build
        assert v.of in {m.name for m in bench.MAIN} and v.build in bench.BUILDS


def _tiny_report(bench, finished="finished 2026-12-03 12:00"):
    runs = [{"seed": s, "accuracy": 0.75, "ece": 0.2, "reward_acc_early": 0.6, "reward_acc_end": 0.9,
             "correct": c, "reward_curve": [0.5, 1.0], "per_task": {"color": {"accuracy": 0.75}}}
            for s, c in ((0, "1110"), (1, "1101"))]
    base = {"accuracy": 0.5, "n": 4, "ece": 0.25, "correct": "1100", "per_task": {"color": {"n": 4, "accuracy": 0.5}}}
    sets = {"vapr": {"of": "", "loss": "dpo", "status": "ok", "reason": "", "pairs": 10, "stage1_rows": 0,
                     "params": {}, "what": "", "runs": runs, "summary": bench.summarize(runs, base, n_boot=100)},
            "m3po": {"of": "", "loss": "dpo", "status": "not run", "reason": "build failed: x | y", "pairs": 0,
                     "stage1_rows": 0, "params": {"n": 4}, "what": "", "runs": [], "summary": None},
            "vapr/no-penalty-lists": {"of": "vapr", "loss": "dpo", "status": "ok", "reason": "", "pairs": 10,
                                      "stage1_rows": 0, "params": {}, "what": "without penalty lists",
                                      "runs": runs[:1], "summary": bench.summarize(runs[:1], base, runs, n_boot=100)}}
    return {"settings": {"steps": 3, "batch_size": 2, "lora_r": 8, "seeds": [0, 1], "threads": 2},
            "base": base, "sets": sets, "finished": finished, "wall_s": 120.0}


def test_readme_table_is_regenerated_between_the_markers(bench, tmp_path):
    report = _tiny_report(bench)
    (tmp_path / "r.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n{bench.README_START}\nold typed table\n{bench.README_END}\n\n## next\n")
    bench.main(["--readme-from", str(tmp_path / "r.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old typed table" not in text and text.startswith("# x\n\nintro\n") and text.endswith("\n## next\n")
    body = text.split(bench.README_START)[1].split(bench.README_END)[0]
    assert "| vapr | dpo | 10 | +25.0 [" in body  # Δ = 0.75 − 0.5 on both seeds
    assert "| m3po (n = 4) | dpo | not run: build failed: x / y |" in body
    assert "| vapr/no-penalty-lists | without penalty lists |" in body
    # idempotent: a second run gives the same file
    bench.main(["--readme-from", str(tmp_path / "r.json"), "--readme", str(readme)])
    assert readme.read_text() == text
    readme.write_text("no markers here\n")
    with pytest.raises(bench.PairforgeError, match="put them around the recipe table"):
        bench.main(["--readme-from", str(tmp_path / "r.json"), "--readme", str(readme)])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(bench.PairforgeError, match="not a bench_recipes report"):
        bench.main(["--readme-from", str(tmp_path / "bad.json"), "--readme", str(readme)])


def test_the_repository_readme_has_the_markers(bench):
    text = (bench.ROOT / "README.md").read_text()
    bench.replace_between_markers(text, "x")  # raises when the markers are missing or out of order


def test_modes_and_ablation_selection(bench, tmp_path):
    model = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    a = bench.parse_args(["--model", model, "--quick"])
    assert a.mode == "quick" and a.seeds == [0, 1] and a.n_eval == 200 and a.steps == 12
    assert a.ablations == list(bench.QUICK_ABLATIONS)
    assert a.sets == [v.name for v in bench.MAIN]
    full = bench.parse_args(["--model", model])
    assert full.mode == "full" and full.n_eval >= 1000 and len(full.seeds) >= 3
    assert full.ablations == [v.name for v in bench.ABLATIONS]
    # an ablation brings its full method along; an explicit option beats the mode's default
    a = bench.parse_args(["--model", model, "--quick", "--sets", "vapr", "--ablations", "p2dpo/focus-only",
                          "--n-eval", "30"])
    assert a.sets == ["vapr", "p2dpo"] and a.ablations == ["p2dpo/focus-only"] and a.n_eval == 30
    assert bench.parse_args(["--model", model, "--ablations", "none"]).ablations == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", model, "--ablations", "p2dpo/no-such"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", model, "--sets", "p2dpo/focus-only"])  # an ablation is not a set


# ----------------------------------------------------------------------------- smoke run


def test_quick_run_writes_the_report_and_reports_broken_recipes(bench, tmp_path, monkeypatch):
    from pairforge.recipes import RECIPES

    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(RECIPES, "m3po", "pairforge.recipes.no_such_module:M3PO")  # not importable
    out = tmp_path / "out"
    bench.main(["--smoke", "--work", str(tmp_path / "work"), "--out-dir", str(out),
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
    assert "| m3po (n = 2) | dpo | not run: build failed:" in md
    # the length-biased set: chosen always longer, so the audit raises the length flag
    assert "length_shortcut" in sets["length-biased"]["audit_flags"]
    assert sets["length-biased"]["chosen_longer_rate"] == 1.0
    assert sets["vapr"]["chosen_correct"] == 1.0
    assert [c["verdict"] for c in report["checks"]][2] == "yes"
    assert "## Δ accuracy per category" in md and report["finished"]
    # the paired statistics: every run answered the base model's 12 questions
    assert len(report["base"]["correct"]) == 12
    vs = sets["vapr"]["summary"]["vs_base"]
    assert len(sets["vapr"]["runs"][0]["correct"]) == 12 and vs["n"] == 12
    assert vs["ci"][0] <= vs["delta"] <= vs["ci"][1] and 0 <= vs["mcnemar"]["p"] <= 1
    assert vs["delta"] == pytest.approx(sets["vapr"]["summary"]["delta"][0])
    assert sorted(report["plots"]) == ["recipes_delta.png", "recipes_reward.png"]
    assert (out / "recipes_delta.png").stat().st_size > 1000


def test_merge_of_parts_equals_one_run(bench, tmp_path, monkeypatch):
    """Two --smoke parts with one set each, merged, give the same statistics as the one run with
    both sets (the runs are deterministic); parts that do not belong together are refused."""
    from pairforge.errors import PairforgeError

    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--smoke", "--work", str(tmp_path / "work")]
    bench.main([*common, "--out-dir", str(tmp_path / "both"), "--sets", "vapr,length-biased"])
    bench.main([*common, "--out-dir", str(tmp_path / "a"), "--sets", "vapr"])
    bench.main([*common, "--out-dir", str(tmp_path / "b"), "--sets", "length-biased"])
    merged = bench.main(["--merge", str(tmp_path / "a" / "recipes.json"), str(tmp_path / "b" / "recipes.json"),
                         "--out-dir", str(tmp_path / "m")])
    one = json.loads((tmp_path / "both" / "recipes.json").read_text())
    on_disk = json.loads((tmp_path / "m" / "recipes.json").read_text())
    assert on_disk["sets"].keys() == one["sets"].keys() == {"vapr", "length-biased"}
    for name in one["sets"]:
        assert on_disk["sets"][name]["runs"][0]["correct"] == one["sets"][name]["runs"][0]["correct"]
        assert on_disk["sets"][name]["summary"]["vs_base"] == one["sets"][name]["summary"]["vs_base"]
    assert [c["verdict"] for c in on_disk["checks"]] == [c["verdict"] for c in one["checks"]]
    assert merged["settings"]["threads"] == 2 and len(on_disk["parts"]) == 2
    assert "Merged from 2 parts" in (tmp_path / "m" / "recipes.md").read_text()
    with pytest.raises(PairforgeError, match="also run in"):
        bench.merge_reports([tmp_path / "a" / "recipes.json"] * 2, tmp_path / "x", "merge")
    other = json.loads((tmp_path / "b" / "recipes.json").read_text())
    other["settings"]["steps"] = 5
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(PairforgeError, match="settings differ .* in steps"):
        bench.merge_reports([tmp_path / "a" / "recipes.json", tmp_path / "other.json"], tmp_path / "x", "merge")
