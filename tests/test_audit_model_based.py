"""Model-based audit: Δ_ref / IPS / shortcut / near-zero / confidence intervals on hand-computed
vectors, the seeded sample, flags; then `pairforge audit --scorer smollm2 --sample 20` end to
end (numbers equal direct HFModel.score results), and an image set scored by random tiny
LLaVAs with and without the image (--text-only) and with a separate policy (IPS)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pairforge.cli import app
from pairforge.diagnostics.model_based import (
    ModelAuditor,
    gap_summary,
    mean_ci95,
    model_fields,
    model_flags,
    model_summary,
    preference_gap,
    sample_positions,
    score_pairs,
    text_only_messages,
    wilson_ci95,
)
from pairforge.diagnostics.thresholds import Thresholds
from pairforge.errors import PairforgeError
from pairforge.models import Request, ScoredResponse
from pairforge.schema import make_pair

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- pure logic


def test_delta_ref_shortcut_and_near_zero_hand_vector():
    chosen = np.array([-3.0, -5.0, -2.0, -4.05])
    rejected = np.array([-4.0, -5.0, -1.5, -4.0])
    gap = preference_gap(chosen, rejected)
    np.testing.assert_allclose(gap, [1.0, 0.0, -0.5, -0.05])
    s = gap_summary("delta_ref", gap, with_ci=False, near_zero=0.1)
    assert s["delta_ref_mean"] == pytest.approx(0.1125)      # (1 + 0 − 0.5 − 0.05) / 4
    assert s["delta_ref_median"] == pytest.approx(-0.025)    # (−0.05 + 0) / 2
    assert s["delta_ref_positive_rate"] == 0.25              # "Δ_ref > 0" accuracy: 1 of 4
    assert s["delta_ref_negative_rate"] == 0.5
    assert s["delta_ref_near_zero_rate"] == 0.5              # |0| and |−0.05| <= 0.1
    assert not any(k.endswith("_ci95") for k in s)


def test_mean_ci95_normal_approximation_hand_case():
    # [1..5]: mean 3, s = √2.5 = 1.5811388, s/√5 = 0.7071068, 1.959964 · 0.7071068 = 1.3859038
    lo, hi = mean_ci95(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert (lo, hi) == pytest.approx((1.6140962, 4.3859038), abs=1e-6)
    assert mean_ci95(np.array([2.0])) is None


def test_wilson_ci95_hand_cases():
    # 8/10: z² = 3.841459, denominator 1 + z²/n = 1.3841459,
    # centre (0.8 + 0.1920730) / 1.3841459 = 0.7167402,
    # half 1.959964 · √(0.016 + 0.0096036) / 1.3841459 = 1.959964 · 0.1600114 / 1.3841459 = 0.2265777
    # (tables give 0.4902 – 0.9433)
    assert wilson_ci95(8, 10) == pytest.approx((0.4901625, 0.9433179), abs=1e-6)
    # 0/20: [0, z² / (n + z²)] = [0, 3.841459 / 23.841459]
    lo, hi = wilson_ci95(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611250, abs=1e-6)
    assert wilson_ci95(0, 0) is None


def test_model_summary_has_intervals_only_for_a_sample():
    gaps = {"delta_ref": np.array([1.0, 2.0, 3.0, 4.0, 5.0]), "ips": np.array([-1.0, 1, 1, 1, 1])}
    sampled = model_summary(gaps, n_pairs=100)
    assert sampled["model_sampled"] and sampled["model_n_scored"] == 5
    assert sampled["delta_ref_mean_ci95"] == pytest.approx([1.614096, 4.385904], abs=1e-6)
    assert sampled["ips_negative_rate"] == 0.2
    assert sampled["ips_negative_rate_ci95"] == pytest.approx(list(wilson_ci95(1, 5)), abs=1e-6)
    assert "Wilson" in sampled["model_ci_method"]
    full = model_summary(gaps, n_pairs=5)
    assert not full["model_sampled"] and not any(k.endswith("_ci95") for k in full)
    assert full["delta_ref_mean"] == 3.0 and full["ips_mean"] == 0.6


def test_model_flags_near_zero_and_vision_agnostic():
    t = Thresholds()
    # 20 of 80 pairs scored: half near zero (CI 30-70% > 10%), all 20 text-only positive
    # (CI 84-100% >= 75%)
    s = model_summary({"delta_ref": np.repeat([0.0, 0.05, 2.0, 3.0], 5),
                       "ips": np.repeat([0.0, 0.05, 2.0, 3.0], 5),
                       "text_only_delta_ref": np.repeat([1.0, 2.0, 3.0, 4.0], 5),
                       "text_only_ips": np.repeat([1.0, 2.0, 3.0, 4.0], 5)}, n_pairs=80)
    ids = {f["id"]: f for f in model_flags(s, has_images=True, t=t)}
    assert set(ids) == {"near_zero_delta_ref", "vision_agnostic"}
    assert ids["near_zero_delta_ref"]["value"] == 0.5
    assert "20 of 80" in ids["vision_agnostic"]["message"] and "95% CI" in ids["vision_agnostic"]["message"]
    # the same rates on 4 scored pairs: text-only 4/4 has a CI of 51-100%, no flag
    s4 = model_summary({"delta_ref": np.array([0.0, 0.05, 2.0, 3.0]),
                        "ips": np.array([0.0, 0.05, 2.0, 3.0]),
                        "text_only_delta_ref": np.array([1.0, 2.0, 3.0, 4.0]),
                        "text_only_ips": np.array([1.0, 2.0, 3.0, 4.0])}, n_pairs=40)
    assert "vision_agnostic" not in {f["id"] for f in model_flags(s4, has_images=True, t=t)}
    # a set without images cannot be vision-agnostic; 50 % text-only accuracy is no shortcut
    assert {f["id"] for f in model_flags(s, has_images=False, t=t)} == {"near_zero_delta_ref"}
    s2 = model_summary({"delta_ref": np.array([1.0, -1.0]), "ips": np.array([1.0, -1.0]),
                        "text_only_delta_ref": np.array([1.0, -1.0]),
                        "text_only_ips": np.array([1.0, -1.0])}, n_pairs=2)
    assert model_flags(s2, has_images=True, t=t) == []
    # the low side: the text-only scorer prefers the rejected answer almost always
    s3 = dict(s2, model_n_scored=40, text_only_delta_ref_positive_rate=0.05)
    assert [f["id"] for f in model_flags(s3, has_images=True, t=t)] == ["vision_agnostic"]
    # ... but on 2 scored pairs nothing can be told: the 95% CI spans the thresholds
    assert model_flags(dict(s2, text_only_delta_ref_positive_rate=0.0), has_images=True,
                       t=t) == []
    # 1 of 4 near zero: 25% > 10%, but the CI (5-70%) reaches below the threshold
    tiny = model_summary({"delta_ref": np.array([0.0, 1.0, 2.0, 3.0]),
                          "ips": np.array([0.0, 1.0, 2.0, 3.0])}, n_pairs=4)
    assert tiny["delta_ref_near_zero_rate"] == 0.25
    assert model_flags(tiny, has_images=False, t=t) == []


def test_sample_positions_seeded_sorted_without_replacement():
    a = sample_positions(1000, 20, seed=3)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and (np.diff(a) > 0).all()
    assert (a == sample_positions(1000, 20, seed=3)).all()
    assert not (a == sample_positions(1000, 20, seed=4)).all()
    assert (sample_positions(5, None, 0) == np.arange(5)).all()
    assert (sample_positions(5, 9, 0) == np.arange(5)).all()
    with pytest.raises(PairforgeError, match="--sample 0"):
        sample_positions(5, 0, 0)


def test_text_only_messages_drop_image_parts():
    pair = make_pair(prompt="What colour?", chosen="Red.", rejected="Blue.", images=["a.png"])
    assert [p["type"] for p in pair["prompt"][0]["content"]] == ["image", "text"]
    stripped = text_only_messages(pair["prompt"])
    assert stripped[0]["content"] == [{"type": "text", "text": "What colour?"}]
    assert pair["prompt"][0]["content"][0]["type"] == "image"  # the input is not modified


class _RecordingVLM:
    """Scores a response as −(its length): records the requests it was given."""

    name, revision = "recording", ""

    def __init__(self):
        self.calls = []

    def score(self, requests, responses):
        self.calls.append((list(requests), list(responses)))
        return [ScoredResponse(r, [-1.0] * len(r)) for r in responses]


def test_score_pairs_one_batched_call_chosen_then_rejected():
    rows = [make_pair(prompt="Q1", chosen="abc", rejected="abcde", images=["x.png"], id="p1"),
            make_pair(prompt="Q2", chosen="abcdef", rejected="ab", images=[], id="p2")]
    vlm = _RecordingVLM()
    s = score_pairs(vlm, rows, text_only=False)
    assert len(vlm.calls) == 1
    requests, responses = vlm.calls[0]
    assert responses == ["abc", "abcde", "abcdef", "ab"]
    assert requests[0] is requests[1] and requests[0].images == ["x.png"] and requests[0].id == "p1"
    np.testing.assert_array_equal(s.chosen_logps, [-3.0, -6.0])
    np.testing.assert_array_equal(s.rejected_n_tokens, [5, 2])
    np.testing.assert_array_equal(s.chosen_mean_logp, [-1.0, -1.0])
    np.testing.assert_array_equal(s.gap, [2.0, -4.0])
    score_pairs(vlm, rows, text_only=True)
    r0 = vlm.calls[1][0][0]
    assert isinstance(r0, Request) and r0.images == () and \
        [p["type"] for p in r0.messages[0]["content"]] == ["text"]


def test_default_scorer_depends_on_images_and_bad_options_fail_early():
    assert ModelAuditor.resolve("default", has_images=True) == "tiny-vlm"
    assert ModelAuditor.resolve("default", has_images=False) == "smollm2"
    assert ModelAuditor.resolve("hf:/m", has_images=True) == "hf:/m"
    with pytest.raises(PairforgeError, match="--sample"):
        ModelAuditor("smollm2", sample=0)
    with pytest.raises(PairforgeError, match="open_clip needs ARCH/PRETRAINED"):
        ModelAuditor("open_clip:ViT-B-32")
    a = ModelAuditor(None, "smollm2")
    assert a.scorer == a.policy == "smollm2"
    names = [f.name for f in model_fields(True)]
    assert {"ref_chosen_logps", "ref_rejected_logps", "delta_ref", "ips", "text_only_delta_ref",
            "text_only_ips", "policy_chosen_n_tokens", "model_scored"} <= set(names)


# ----------------------------------------------------------------------------- end to end


def audit(*args) -> str:
    result = CliRunner().invoke(app, ["audit", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_text_only_needs_a_model(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}) + "\n")
    result = CliRunner().invoke(app, ["audit", str(data), "--out", str(tmp_path / "o"), "--text-only"])
    assert result.exit_code != 0 and "--scorer" in str(result.exception)


SUMMARY_KEYS = {"delta_ref_mean", "delta_ref_median", "delta_ref_positive_rate", "ips_mean",
                "ips_negative_rate", "delta_ref_near_zero_rate", "delta_ref_mean_ci95",
                "delta_ref_positive_rate_ci95", "ips_negative_rate_ci95", "model_n_scored",
                "model_n_pairs", "model_scorer", "model_policy", "model_ci_method"}

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


@pytest.mark.smollm2
def test_audit_with_smollm2_on_a_sample_equals_direct_scores(tmp_path):
    from pairforge.models.hf import HFModel
    from pairforge.sources import read_pairs

    data = tmp_path / "text.jsonl"
    with open(data, "w") as f:
        for i in range(30):
            c, r = COLOURS[i % 6], COLOURS[(i + 1) % 6]
            f.write(json.dumps({"prompt": f"Which colour is shape {i}?", "chosen": f"It is {c}.",
                                "rejected": f"It is {r}."}) + "\n")
    out = tmp_path / "out"
    output = audit(data, "--out", out, "--scorer", "smollm2", "--sample", 20, "--tokenizer", "words",
                   "--batch-size", 20)
    s = json.loads((out / "summary.json").read_text())["text"]
    assert SUMMARY_KEYS <= set(s)
    assert (s["model_n_scored"], s["model_n_pairs"], s["model_sampled"]) == (20, 30, True)
    assert s["model_scorer"] == s["model_policy"] == "smollm2"
    assert "scored 20 of 30 pairs" in " ".join(output.split())

    df = pq.read_table(out / "pairs.parquet").to_pandas()
    scored = df[df["model_scored"]]
    assert len(scored) == 20 and df.loc[~df["model_scored"], "delta_ref"].isna().all()
    expected_positions = sample_positions(30, 20, seed=0)
    assert scored.index.tolist() == expected_positions.tolist()

    rows = [row for k, row in enumerate(read_pairs(data)) if k in set(expected_positions.tolist())]
    assert [r["id"] for r in rows] == scored["id"].tolist()
    model = HFModel("smollm2", progress=False, batch_size=20)
    direct = model.score([Request(r["prompt"], (), r["id"]) for r in rows for _ in range(2)],
                         [t for r in rows for t in (r["chosen"][0]["content"][0]["text"],
                                                    r["rejected"][0]["content"][0]["text"])])
    chosen = np.array([d.sum_logprob for d in direct[0::2]])
    rejected = np.array([d.sum_logprob for d in direct[1::2]])
    np.testing.assert_allclose(scored["ref_chosen_logps"], chosen, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scored["ref_rejected_logps"], rejected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(scored["ref_chosen_n_tokens"], [d.n_tokens for d in direct[0::2]])
    np.testing.assert_allclose(scored["ref_chosen_mean_logp"], [d.mean_logprob for d in direct[0::2]],
                               rtol=1e-4, atol=1e-4)
    gap = chosen - rejected
    np.testing.assert_allclose(scored["delta_ref"], gap, atol=2e-3)
    np.testing.assert_allclose(scored["ips"], scored["delta_ref"])  # one model: IPS = Δ_ref
    assert s["delta_ref_mean"] == pytest.approx(gap.mean(), abs=2e-3)
    assert s["delta_ref_median"] == pytest.approx(np.median(gap), abs=2e-3)
    assert s["delta_ref_positive_rate"] == pytest.approx((gap > 0).mean())
    assert s["ips_negative_rate"] == pytest.approx((gap < 0).mean())
    lo, hi = s["delta_ref_mean_ci95"]
    assert lo < s["delta_ref_mean"] < hi
    page = (out / "report.html").read_text()
    assert "Model-based metrics" in page and "scored 20 of 30 pairs" in page
    assert 'src="delta_ref.png"' in page and (out / "delta_ref.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from pairforge.models.random_tiny import save_random_llava

    root = tmp_path_factory.mktemp("llava")
    return save_random_llava(root / "ref", seed=0), save_random_llava(root / "policy", seed=1)


def test_image_set_text_only_differs_from_image_scoring(tmp_path, llava_dirs):
    from pairforge.models.hf import HFModel
    from pairforge.sources import read_pairs

    ref_dir, policy_dir = llava_dirs
    folder = tmp_path / "set"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"prompt": "<image>what color is the circle ?",
                                "chosen": f"the circle is {COLOURS[i % 3]} .",
                                "rejected": f"the circle is {COLOURS[(i + 1) % 3]} .",
                                "images": [f"{i}.png"]}) + "\n")
    out = tmp_path / "out"
    audit(folder / "pairs.jsonl", "--out", out, "--scorer", f"hf:{ref_dir}", "--policy",
          f"hf:{policy_dir}", "--text-only", "--tokenizer", "words", "--batch-size", 4)
    s = json.loads((out / "summary.json").read_text())["pairs"]
    assert s["model_n_scored"] == 6 and not s["model_sampled"] and s["model_scorer_sees_images"]
    assert {"text_only_delta_ref_mean", "text_only_delta_ref_positive_rate", "text_only_ips_mean",
            "text_only_ips_negative_rate"} <= set(s)
    df = pq.read_table(out / "pairs.parquet").to_pandas()
    assert df["model_scored"].all()
    # the image changes the scores
    assert not np.allclose(df["ref_chosen_logps"], df["text_only_ref_chosen_logps"], atol=1e-4)
    assert not np.allclose(df["delta_ref"], df["text_only_delta_ref"], atol=1e-4)
    # a separate policy gives a different gap (IPS)
    assert not np.allclose(df["delta_ref"], df["ips"], atol=1e-4)

    rows = list(read_pairs(folder / "pairs.jsonl"))
    responses = [t for r in rows for t in (r["chosen"][0]["content"][0]["text"],
                                           r["rejected"][0]["content"][0]["text"])]
    requests = [Request(r["prompt"], r["images"], r["id"]) for r in rows for _ in range(2)]
    ref = HFModel(f"hf:{ref_dir}", progress=False)
    with_image = ref.score(requests, responses)
    without = ref.score(requests, responses, drop_images=True)
    np.testing.assert_allclose(df["ref_chosen_logps"], [d.sum_logprob for d in with_image[0::2]],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(df["text_only_ref_rejected_logps"],
                               [d.sum_logprob for d in without[1::2]], rtol=1e-4, atol=1e-4)
    assert s["text_only_delta_ref_mean"] == pytest.approx(
        np.mean([a.sum_logprob - b.sum_logprob for a, b in zip(without[0::2], without[1::2])]),
        abs=1e-3)
    for png in ("delta_ref.png", "ips.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not math.isnan(s["ips_mean"])


def test_long_scoring_warns_with_an_estimate_from_the_first_batch():
    from rich.console import Console

    console = Console(record=True, width=200)
    a = ModelAuditor("smollm2", console=console)
    # 8 pairs in 10 s → 0.8 pairs/s; 992 left → 1240 s ≈ 21 min; 300 s covers 240 pairs
    assert a._estimate("big", seconds=10.0, done=8, planned=1000, n_pairs=1000) == pytest.approx(0.8)
    text = console.export_text()
    assert "all 1,000 pairs will take about 21 min at 0.8 pairs/s" in text
    assert "--sample 240" in text
    quiet = Console(record=True, width=200)
    ModelAuditor("smollm2", console=quiet)._estimate("small", seconds=1.0, done=8, planned=100, n_pairs=100)
    assert quiet.export_text() == ""
