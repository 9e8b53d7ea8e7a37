"""P2-DPO recipe: hand-computed vectors for the crop search, sharpness, Erase, Combine, noise
schedule, DDW and filter; the recipe's wiring with a scripted fake policy (which image and
prompt each answer came from, own-input perplexities, margins on the pair's prompt); an
end-to-end build with a random tiny LLaVA; capabilities checked up front."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from pairforge.errors import PairforgeError
from pairforge.models import Capability, Completion, ScoredResponse
from pairforge.recipes import BuildContext, Example, load_recipe
from pairforge.recipes.p2dpo import (
    P2DPO,
    WINDOW_RATIOS,
    adaptive_crop,
    add_noise,
    alpha_bar,
    central_interval,
    combine,
    ddw_weights,
    diffusion_noise,
    erase,
    filter_reason,
    linear_betas,
    load_templates,
    mean_color,
    pad_to_square,
    sharpness,
    side_by_side,
    window_sums,
)
from pairforge.schema import assistant_message, count_image_parts, to_dataset, user_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- crop search


def test_window_sums_and_sharpness_hand_computed():
    att = np.arange(1, 10, dtype=float).reshape(3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    sums = window_sums(att, 2, 2)
    np.testing.assert_allclose(sums, [[12, 16], [24, 28]])
    np.testing.assert_allclose(window_sums(att, 1, 3), [[6], [15], [24]])
    # best window (1,1)=28; neighbours up (0,1)=16 and left (1,0)=24 → (28 − 20) / 4
    assert sharpness(sums, (1, 1), 4) == pytest.approx(2.0)
    # a window covering the whole grid has no neighbour: no contrast
    assert sharpness(window_sums(att, 3, 3), (0, 0), 9) == 0.0
    with pytest.raises(ValueError):
        window_sums(att, 4, 1)


def test_window_ratios_are_one_to_two_by_point_two():
    assert WINDOW_RATIOS == pytest.approx((1.0, 1.2, 1.4, 1.6, 1.8, 2.0))


def test_adaptive_crop_single_peak_hand_computed():
    # 4×4 grid over 40×40 px (10-px cells), base 10 px: ratios 1.0–1.8 → 1×1 windows, 2.0 → 2×2.
    att = np.zeros((4, 4))
    att[1, 2] = 8.0
    c = adaptive_crop(att, (40, 40), base=10)
    # 1×1: peak 8, neighbours all 0 → 8. 2×2: first max at (0,1) = 8, neighbours (1,1)=8,
    # (0,0)=0, (0,2)=8 → (8 − 16/3) / 4 = 2/3. The smallest ratio among the sharpest wins.
    assert c.ratio == 1.0 and c.window == (1, 1) and c.cell == (1, 2)
    assert c.sharpness == pytest.approx(8.0)
    assert c.sharpness_by_ratio[2.0] == pytest.approx(2 / 3)
    assert c.box == (20, 10, 30, 20)  # 10-px box centred on the cell centre (25, 15)


def test_adaptive_crop_prefers_the_scale_that_fits_the_blob():
    # 8×8 grid over 80×80 px, a 3×3 blob of ones at rows/cols 2..4, base 20 px.
    att = np.zeros((8, 8))
    att[2:5, 2:5] = 1.0
    c = adaptive_crop(att, (80, 80), base=20)
    # 2×2 (ρ 1.0–1.4): 4 − mean(2, 4, 2, 4) = 1 → 1/4; 3×3 (ρ 1.6, 1.8): (9 − 6)/9 = 1/3;
    # 4×4 (ρ 2.0): 9 at (1,1), neighbours 6, 9, 6, 9 → 1.5/16.
    assert c.sharpness_by_ratio[1.0] == pytest.approx(0.25)
    assert c.sharpness_by_ratio[1.6] == pytest.approx(1 / 3)
    assert c.sharpness_by_ratio[2.0] == pytest.approx(1.5 / 16)
    assert c.ratio == pytest.approx(1.6) and c.window == (3, 3) and c.cell == (2, 2)
    # side 20·1.6 = 32 px centred on the window centre (35, 35)
    assert c.box == (19, 19, 51, 51)


def test_adaptive_crop_box_stays_inside_image_and_bounds():
    att = np.zeros((4, 4))
    att[0, 0] = 1.0
    c = adaptive_crop(att, (40, 40), base=16)
    x0, y0, x1, y1 = c.box
    assert (x0, y0) == (0, 0) and x1 - x0 == y1 - y0 == 16  # pushed in from the corner
    att = np.zeros((4, 4))
    att[3, 3] = 1.0
    assert adaptive_crop(att, (40, 40), base=16).box == (24, 24, 40, 40)
    # a 40×20 image padded to 40×40 (rows 10..30): the box lies inside the real image
    att = np.zeros((4, 4))
    att[0, 1] = 1.0  # attention on the padding above the image
    x0, y0, x1, y1 = adaptive_crop(att, (40, 40), base=5, bounds=(0, 10, 40, 30)).box
    assert 10 <= y0 and y1 <= 30 and 0 <= x0 and x1 <= 40
    # a base window larger than the image is clipped to it
    assert adaptive_crop(att, (40, 40), base=100, bounds=(0, 10, 40, 30)).box == (0, 10, 40, 30)
    with pytest.raises(ValueError):
        adaptive_crop(np.full((2, 2), np.nan), (10, 10), base=5)


# ----------------------------------------------------------------------------- image operations


def _checker() -> Image.Image:
    """4×2 image: left column block red (200, 0, 0), right block blue (0, 0, 100)."""
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[:, :2] = (200, 0, 0)
    arr[:, 2:] = (0, 0, 100)
    return Image.fromarray(arr, "RGB")


def test_erase_fills_box_with_mean_colour_hand_computed():
    img = _checker()
    assert mean_color(img) == (100, 0, 50)
    out = np.asarray(erase(img, (1, 0, 3, 1)))
    assert out[0, 1].tolist() == [100, 0, 50] and out[0, 2].tolist() == [100, 0, 50]
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [200, 0, 0]  # outside: kept
    assert out[0, 3].tolist() == [0, 0, 100]
    assert np.asarray(img)[0, 1].tolist() == [200, 0, 0]  # the input is not modified


def test_pad_to_square_centres_image_on_mean_colour():
    sq, off = pad_to_square(_checker())
    assert sq.size == (4, 4) and off == (0, 1)
    arr = np.asarray(sq)
    assert arr[0, 0].tolist() == [100, 0, 50] and arr[1, 0].tolist() == [200, 0, 0]
    img = Image.new("RGB", (5, 5))
    assert pad_to_square(img) == (img, (0, 0))


def test_combine_two_images_or_side_by_side():
    img = Image.new("RGB", (40, 40), (10, 20, 30))
    crop = Image.new("RGB", (10, 20), (250, 0, 0))
    a, b = combine(img, crop, "two_images")
    assert a.size == (40, 40) and b.size == (10, 20)
    (comp,) = combine(img, crop, "side_by_side")
    assert comp.size == img.size == side_by_side(img, crop).size
    arr = np.asarray(comp)
    # left half: the image scaled to 20×20, vertically centred (rows 10..29)
    assert arr[20, 10].tolist() == [10, 20, 30]
    # right half: the 10×20 crop scaled ×2 to 20×40, centred in the 20-px half (x 20..39)
    assert arr[20, 30].tolist() == [250, 0, 0]
    with pytest.raises(ValueError):
        combine(img, crop, "grid")


def test_linear_schedule_and_alpha_bar_hand_computed():
    betas = linear_betas(3, 0.1, 0.3)
    np.testing.assert_allclose(betas, [0.1, 0.2, 0.3])
    assert alpha_bar(0, betas) == 1.0
    assert alpha_bar(2, betas) == pytest.approx(0.9 * 0.8)
    assert alpha_bar(3, betas) == pytest.approx(0.9 * 0.8 * 0.7)
    # DDPM's default: β_1 = 1e-4, β_2 = 1e-4 + 0.0199/999, β_1000 = 0.02
    default = linear_betas()
    assert len(default) == 1000 and default[-1] == pytest.approx(0.02)
    assert alpha_bar(2) == pytest.approx((1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)))
    with pytest.raises(ValueError):
        alpha_bar(1001)


def test_diffusion_noise_hand_computed_and_images_seeded():
    betas = linear_betas(3, 0.1, 0.3)
    got = diffusion_noise(np.array([0.5, -1.0]), 2, np.array([1.0, 0.0]), betas)
    np.testing.assert_allclose(got, [math.sqrt(0.72) * 0.5 + math.sqrt(0.28), -math.sqrt(0.72)])
    img = Image.new("RGB", (16, 16), (128, 64, 200))
    a, b = add_noise(img, "diffusion", 200, seed=7), add_noise(img, "diffusion", 200, seed=7)
    assert a.tobytes() == b.tobytes() and a.tobytes() != add_noise(img, "diffusion", 200, seed=8).tobytes()
    assert add_noise(img, "diffusion", 0, seed=1).tobytes() == img.tobytes()  # t = 0: no noise
    # more steps, more noise (the per-pixel deviation grows with t)
    dev = [np.abs(np.asarray(add_noise(img, "diffusion", t, 3), float) - np.asarray(img, float)).mean()
           for t in (50, 200, 800)]
    assert dev[0] < dev[1] < dev[2]
    g = np.asarray(add_noise(img, "gaussian", 0.1, seed=3), float) - np.asarray(img, float)
    assert 0.07 * 255 < g.std() < 0.13 * 255
    with pytest.raises(ValueError):
        add_noise(img, "blur", 1, 0)


# ----------------------------------------------------------------------------- DDW, filter


def test_ddw_weights_hand_computed():
    assert ddw_weights(2.0, 2.0) == pytest.approx((0.5, 0.5))
    a = 0.2 * math.tanh(1.0)  # r = 1.1 → (r − 1)/0.1 = 1
    assert ddw_weights(1.1, 1.0) == pytest.approx((0.5 + a, 0.5 - a))
    assert ddw_weights(1.1, 1.0) == pytest.approx((0.652318, 0.347682), abs=1e-6)
    b = 0.2 * math.tanh(-0.5)  # r = 0.95
    assert ddw_weights(0.95, 1.0) == pytest.approx((0.5 + b, 0.5 - b))
    assert sum(ddw_weights(3.0, 1.0)) == pytest.approx(1.0)
    assert ddw_weights(0.0, 0.0) == (0.5, 0.5)  # CLIPScore(P, I) = 0: r = 1 ...
    assert ddw_weights(0.5, 0.0) == pytest.approx((0.7, 0.3))  # ... or +∞ → α = 0.2


def test_filter_reason_ppl_and_margin_window():
    assert filter_reason(2.4, 1.1, 0.0, 2.5, -0.2, 0.2) is None
    assert "perplexity 2.500" in filter_reason(1.0, 2.5, 0.0, 2.5)
    assert "margin 0.300" in filter_reason(1.2, 1.3, 0.3, 2.5, -0.2, 0.2)
    assert filter_reason(1.2, 1.3, -0.2, 2.5, -0.2, 0.2) is None  # bounds are inclusive
    assert filter_reason(math.nan, 1.0, 0.0) is not None
    assert filter_reason(1.0, 1.0, math.nan) is not None


def test_central_interval_hand_computed():
    assert central_interval(range(101), 0.95) == pytest.approx((2.5, 97.5))
    assert central_interval([1.0, 2.0, math.nan, 3.0], 1.0) == (1.0, 3.0)
    with pytest.raises(PairforgeError):
        central_interval([math.nan])


# ----------------------------------------------------------------------------- recipe with fakes


class FakeClip:
    """Cosine = 0.4 for the full 112-px image, 0.44 for anything smaller (the crop): r = 1.1."""

    name, revision = "fake-clip", "r1"

    def cosine(self, images, texts):
        assert len(images) == len(texts)
        return [0.4 if im.size == (112, 112) else 0.44 for im in images]

    def cosine_matrix(self, images, texts):
        return [self.cosine([im] * len(texts), texts) for im in images]


class FakePolicy:
    """A scripted policy: attention peaks at grid cell (2, 5) of an 8×8 grid; answers and their
    token log-probs come from a table keyed by the request id's suffix; every call is logged."""

    name, revision = "fake-vlm", "abc"

    def __init__(self, capabilities=None, answers=None, scores=None):
        self.capabilities = frozenset(capabilities or Capability)
        self.calls: list[tuple] = []
        self.answers = answers or {
            "focus-chosen": ("It is red.", [-0.1, -0.2]),      # PPL exp(0.15)
            "focus-rejected": ("It is blue.", [-0.3, -0.1]),   # PPL exp(0.2)
            "robust-rejected": ("It is green.", [-0.2, -0.2]),
            "robust-chosen": ("It is a red square.", [-0.1, -0.1]),
            "localise": ("It is pink.", [-0.5]),  # the predicted answer, on the localisation prompt
        }
        self.scores = scores or {"It is red.": [-0.2, -0.4], "It is blue.": [-0.3, -0.4],
                                 "It is green.": [-1.0, -1.0], "It is a red square.": [-0.5, -0.7]}

    def attention_map(self, request, response, layers=None, **kw):
        self.calls.append(("attention", request, response))
        att = np.zeros((8, 8))
        att[2, 5] = 1.0
        return att

    def _completion(self, request):
        text, lps = self.answers[request.id.split("/", 1)[1]]
        return Completion(text, lps)

    def generate(self, requests, n, sampling):
        self.calls.append(("generate", list(requests)))
        return [[self._completion(r)] for r in requests]

    def generate_contrastive(self, requests, amateur_images, lam, beta, sampling):
        self.calls.append(("contrastive", list(requests), amateur_images, lam, beta))
        return [self._completion(r) for r in requests]

    def score(self, requests, responses):
        self.calls.append(("score", list(requests), list(responses)))
        return [ScoredResponse(t, self.scores[t]) for t in responses]


def _world_example(i: int = 0, *, answer: str = "The circle is red.") -> Example:
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), "RGB")
    msgs = [user_message("What colour is the circle?"), assistant_message(answer)]
    return Example(f"ex{i}", msgs, [img], task="color", source_dataset="shapes", source_id=f"row{i}")


def _ctx(policy, clip=None, seed=0) -> BuildContext:
    return BuildContext(seed=seed, models={"policy": policy, "clip": clip or FakeClip()})


def test_recipe_wiring_with_scripted_policy():
    pol = FakePolicy()
    rec = P2DPO.from_params({"max_ppl": 2.5, "base_window": 0.25})
    ex = _world_example()
    (out,) = rec.process([ex], _ctx(pol))
    assert out.reject is None and out.stats == {"focus_kept": 1, "robust_kept": 1, "attention_on_policy_answer": 1}
    focus, robust = out.rows
    # attention (App. B): the answer the policy predicts on the localisation prompt, read from
    # that same forward pass: one greedy generate on exactly the attention request
    (_, att_req, att_resp), = [c for c in pol.calls if c[0] == "attention"]
    assert att_resp == "It is pink."
    (_, predicted_reqs), (_, gen_reqs) = [c for c in pol.calls if c[0] == "generate"]
    assert [r.id for r in predicted_reqs] == [att_req.id] == ["ex0/localise"]
    assert predicted_reqs[0].messages == att_req.messages
    assert predicted_reqs[0].images[0].tobytes() == att_req.images[0].tobytes()
    assert "What colour is the circle?" in att_req.messages[-1]["content"][-1]["text"]
    assert att_req.messages[-1]["content"][-1]["text"] != "What colour is the circle?"
    # peak at cell (2,5) of 14-px cells, base 28 px: 2×2 window at (1,4), box centred on (70, 28)
    assert focus["crop_box"] == robust["crop_box"] == [56.0, 14.0, 84.0, 42.0]
    by_id = {r.id.split("/")[1]: r for r in gen_reqs}
    chosen_req = by_id["focus-chosen"]
    assert count_image_parts(chosen_req.messages) == 2 and chosen_req.images[1].size == (28, 28)
    assert np.array_equal(np.asarray(chosen_req.images[1]), np.asarray(ex.images[0].crop((56, 14, 84, 42))))
    assert chosen_req.messages[-1]["content"][-1]["text"].endswith("What colour is the circle?")
    assert len(chosen_req.messages[-1]["content"][-1]["text"]) > len("What colour is the circle?")
    rej = by_id["focus-rejected"]
    assert rej.messages[-1]["content"][-1]["text"] == "What colour is the circle?"
    deg = np.asarray(rej.images[0]).astype(int)
    assert (deg[14:42, 56:84] == np.asarray(mean_color(ex.images[0]))).all()
    assert np.array_equal(deg[:14], np.asarray(ex.images[0])[:14])
    noisy = by_id["robust-rejected"].images[0]
    (_, c_reqs, amateurs, lam, beta), = [c for c in pol.calls if c[0] == "contrastive"]
    assert (lam, beta) == (0.1, 0.1)
    assert c_reqs[0].images[0].tobytes() == ex.images[0].tobytes()  # expert: the clean image
    assert amateurs[0][0].tobytes() == noisy.tobytes() != ex.images[0].tobytes()
    # margins: mean log-probs on each pair's DPO input (focus: the clean image, robust: noisy)
    (_, s_reqs, s_texts), = [c for c in pol.calls if c[0] == "score"]
    assert s_texts == ["It is red.", "It is blue.", "It is a red square.", "It is green."]
    assert [r.images[0].tobytes() for r in s_reqs] == [ex.images[0].tobytes()] * 2 + [noisy.tobytes()] * 2
    assert all(r.messages[-1]["content"][-1]["text"] == "What colour is the circle?" for r in s_reqs)
    # rows: texts, kinds, images, DDW with r = 1.1
    assert focus["chosen"][0]["content"][0]["text"] == "It is red."
    assert focus["rejected"][0]["content"][0]["text"] == "It is blue."
    assert robust["chosen"][0]["content"][0]["text"] == "It is a red square."
    assert robust["rejected"][0]["content"][0]["text"] == "It is green."
    assert (focus["p2dpo_kind"], robust["p2dpo_kind"]) == ("focus", "robust")
    a = 0.2 * math.tanh(1.0)
    assert focus["ddw_focus"] == pytest.approx(0.5 + a) and focus["ddw_robust"] == pytest.approx(0.5 - a)
    assert focus["degraded_image"].tobytes() == rej.images[0].tobytes() and focus["noisy_image"] is None
    assert robust["noisy_image"].tobytes() == noisy.tobytes() and robust["degraded_image"] is None
    assert focus["crop_image"].size == (28, 28)
    # the calibration's enhanced input is exactly y_w's input: Combine(I, crop) with P_enh (Eq. 5)
    assert focus["enhanced_prompt"] == chosen_req.messages
    assert [im.tobytes() for im in focus["enhanced_images"]] == [im.tobytes() for im in chosen_req.images]
    assert robust["enhanced_prompt"] is None and robust["enhanced_images"] is None
    # Eq. 8's sample and App. D's margin (focus 0.05, robust 0.4: see the next test)
    assert focus["p2dpo_example"] == robust["p2dpo_example"] == "ex0"
    assert (focus["p2dpo_margin"], robust["p2dpo_margin"]) == (pytest.approx(0.05), pytest.approx(0.4))
    assert focus["prompt"] == ex.prompt_messages and focus["images"][0].tobytes() == ex.images[0].tobytes()
    assert [t["name"] for t in focus["prompt_templates"]] == ["p2dpo/enhance_two_images.txt", "p2dpo/localise.txt"]
    assert [m["role"] for m in focus["models"]] == ["policy", "clip"] and focus["id"] != robust["id"]
    ds = to_dataset(out.rows)
    assert ds[0]["crop_box"] == [56.0, 14.0, 84.0, 42.0] and ds[1]["noisy_image"].size == (112, 112)
    assert [im.size for im in ds[0]["enhanced_images"]] == [(112, 112), (28, 28)]


def test_filter_uses_own_input_perplexity_and_margin_on_the_pair_prompt():
    pol = FakePolicy()
    # focus margin = mean(−0.2, −0.4) − mean(−0.3, −0.4) = 0.05; robust = −0.6 − (−1.0) = 0.4;
    # the margin window is pass two (run_pass): process keeps both, the fixed window drops robust
    rec = P2DPO.from_params({"margin_window": "fixed", "margin_low": -0.1, "margin_high": 0.1})
    (out,) = rec.process([_world_example()], _ctx(pol))
    assert [r["p2dpo_kind"] for r in out.rows] == ["focus", "robust"]
    kept, fit = rec.filter_rows(out.rows)
    assert [r["p2dpo_kind"] for r in kept] == ["focus"]
    assert fit == {"margin_window_rule": "fixed", "margin_window_lo": -0.1, "margin_window_hi": 0.1,
                   "margin_kept_rate": 0.5, "margin_window_n": 2}
    rp = rec.run_pass()
    assert rp.judge(out.rows[1], fit) == ("robust: log-prob margin 0.400 outside [-0.100, 0.100] (fixed)",
                                          {"robust_kept": -1, "robust_dropped_margin": 1})
    # own-input PPLs: chosen exp(0.15) ≈ 1.162, rejected exp(0.2) ≈ 1.221 → 1.15 drops, 1.25 keeps
    (out,) = P2DPO.from_params({"kinds": ["focus"], "max_ppl": 1.15, "margin_low": None,
                                "margin_high": None}).process([_world_example()], _ctx(FakePolicy()))
    assert out.reject is not None and out.reject.stage == "filter"
    assert out.reject.reason.startswith("focus: max perplexity 1.2")
    (out,) = P2DPO.from_params({"kinds": ["focus"], "max_ppl": 1.25}).process([_world_example()], _ctx(FakePolicy()))
    assert out.rows


def test_kind_order_does_not_change_inputs():
    calls = []
    for kinds in (["focus", "robust"], ["robust", "focus"]):
        pol = FakePolicy()
        P2DPO.from_params({"kinds": kinds}).process([_world_example()], _ctx(pol))
        (_, s_reqs, s_texts), = [c for c in pol.calls if c[0] == "score"]
        calls.append(sorted((t, r.images[0].tobytes()) for r, t in zip(s_reqs, s_texts)))
    assert calls[0] == calls[1]


def test_central_window_is_fitted_on_the_runs_own_margins():
    """App. D: [θ_low, θ_high] = the 2.5th and 97.5th percentiles of the run's margins. 41
    margins 0.00, 0.01, …, 0.40 plus one outlier 2.0: numpy's linear quantiles at ranks
    0.025·41 = 1.025 and 0.975·41 = 39.975 → 0.01025 and 0.39975; 0.00, 0.01, 0.40 and 2.0
    fall outside, 38 of 42 kept."""
    rec = P2DPO.from_params({})
    margins = [k / 100 for k in range(41)] + [2.0]
    rows = [{"p2dpo_margin": m, "p2dpo_kind": "focus"} for m in margins]
    kept, fit = rec.filter_rows(rows)
    assert (fit["margin_window_lo"], fit["margin_window_hi"]) == (pytest.approx(0.01025), pytest.approx(0.39975))
    assert len(kept) == 38 and fit["margin_kept_rate"] == pytest.approx(38 / 42)
    assert fit["margin_window_rule"] == "central 0.95 of the run's margins" and rec.state_dict() == {}
    # the process itself keeps both pairs with their margins for pass two
    (out,) = rec.process([_world_example()], _ctx(FakePolicy()))
    assert sorted(r["p2dpo_margin"] for r in out.rows) == [pytest.approx(0.05), pytest.approx(0.4)]


def test_identical_or_empty_answers_and_unusable_examples_are_rejected_with_reasons():
    answers = dict(FakePolicy().answers)
    answers["robust-chosen"] = answers["robust-rejected"]
    answers["focus-rejected"] = ("", [])
    pol = FakePolicy(answers=answers)
    text_only = Example("t", [user_message("What colour is red?", n_images=0), assistant_message("Red.")])
    two = _world_example(3)
    two = Example("two", [user_message("Compare them.", n_images=2), assistant_message("Same.")],
                  two.images * 2)
    outs = P2DPO.from_params({}).process([text_only, _world_example(), two], _ctx(pol))
    assert [o.reject.stage for o in outs] == ["filter"] * 3
    assert "exactly one image" in outs[0].reject.reason and "has 0" in outs[0].reject.reason
    assert outs[1].reject.reason == ("focus: the policy returned an empty answer; "
                                     "robust: chosen and rejected answers are identical")
    assert outs[1].stats == {"focus_dropped_empty": 1, "robust_dropped_identical": 1, "attention_on_policy_answer": 1}
    assert "has 2" in outs[2].reject.reason
    # the margin window (pass two) only sees pairs that pass every other filter
    same = dict(FakePolicy().answers, **{"robust-chosen": FakePolicy().answers["robust-rejected"]})
    (out,) = P2DPO.from_params({}).process([_world_example()], _ctx(FakePolicy(answers=same)))
    assert [(r["p2dpo_kind"], r["p2dpo_margin"]) for r in out.rows] == [("focus", pytest.approx(0.05))]
    assert not [c for c in pol.calls if c[0] == "attention" and c[1].id.startswith(("t/", "two/"))]


def test_dataset_answer_for_attention_only_when_asked():
    pol = FakePolicy()
    no_answer = Example("na", [user_message("What colour is the circle?")], _world_example().images)
    rec = P2DPO.from_params({"kinds": ["focus"], "max_ppl": 10, "attention_on": "answer"})
    outs = rec.process([no_answer, _world_example(1)], _ctx(pol))
    responses = [c[2] for c in pol.calls if c[0] == "attention"]
    assert responses == ["It is pink.", "The circle is red."]  # predicted only where no answer
    assert "attention_on_policy_answer" not in outs[1].stats
    pol = FakePolicy()
    outs = P2DPO.from_params({"max_ppl": 10}).process([_world_example()], _ctx(pol))  # the default
    assert [c[2] for c in pol.calls if c[0] == "attention"] == ["It is pink."]
    assert outs[0].stats["attention_on_policy_answer"] == 1


def test_side_by_side_combine_sends_one_composite_and_its_template():
    pol = FakePolicy()
    rec = P2DPO.from_params({"kinds": ["focus"], "combine": "side_by_side", "max_ppl": 10})
    assert list(rec.templates()) == ["p2dpo/localise.txt", "p2dpo/enhance_side_by_side.txt"]
    (out,) = rec.process([_world_example()], _ctx(pol))
    (_, reqs) = [c for c in pol.calls if c[0] == "generate"][-1]
    chosen = [r for r in reqs if r.id.endswith("focus-chosen")][0]
    assert len(out.rows[0]["enhanced_images"]) == 1 and count_image_parts(out.rows[0]["enhanced_prompt"]) == 1
    assert len(chosen.images) == 1 and chosen.images[0].size == (112, 112)
    assert count_image_parts(chosen.messages) == 1
    assert list(P2DPO.from_params({"kinds": ["robust"]}).templates()) == ["p2dpo/localise.txt"]


def test_check_fails_up_front_without_attention_or_contrastive_or_clip():
    no_attention = FakePolicy(capabilities=set(Capability) - {Capability.ATTENTION})
    rec = P2DPO.from_params({})
    with pytest.raises(PairforgeError, match="'attention'.*hf: model"):
        rec.check(_ctx(no_attention))
    no_contrastive = FakePolicy(capabilities=set(Capability) - {Capability.CONTRASTIVE})
    with pytest.raises(PairforgeError, match="'contrastive'"):
        rec.check(_ctx(no_contrastive))
    P2DPO.from_params({"kinds": ["focus"]}).check(_ctx(no_contrastive))  # focus only: fine
    with pytest.raises(PairforgeError, match="CLIP scorer"):
        rec.check(BuildContext(models={"policy": FakePolicy(), "clip": None}))
    with pytest.raises(PairforgeError, match="policy model"):
        rec.check(BuildContext(models={"clip": FakeClip()}))


@pytest.mark.parametrize("params, needle", [
    ({"kind": ["focus"]}, "unknown parameter 'kind'"),
    ({"lam": "x"}, "lam='x' is not a float"),
    ({"attention_layers": "a"}, "'attention_layers'"),
    ({"kinds": ["focus", "sharp"]}, "'kinds'"),
    ({"kinds": []}, "'kinds'"),
    ({"combine": "grid"}, "'combine'"),
    ({"noise_step": 0}, "'noise_step'"),
    ({"beta": 1.5}, "'beta'"),
    ({"margin_low": 1.0, "margin_high": 0.0}, "'margin_low'"),
    ({"base_window": 0}, "'base_window'"),
    ({"lam": [0.1]}, "'lam'.*expected a number"),
])
def test_bad_params_name_the_param(params, needle):
    with pytest.raises(PairforgeError, match=needle):
        load_recipe("p2dpo", params)


def test_params_from_cli_strings():
    got = load_recipe("p2dpo", {"kinds": "robust", "attention_layers": "2,3", "margin_low": "none",
                                "lam": "0.2", "noise_step": "100", "combine": "side_by_side"}).params()
    assert (got["kinds"], got["attention_layers"], got["margin_low"], got["margin_high"]) == \
        (["robust"], [2, 3], None, 0.208)
    assert (got["lam"], got["noise_step"], got["combine"]) == (0.2, 100, "side_by_side")
    assert load_recipe("p2dpo", got).params() == got  # params() round-trips


def test_templates_load_from_prompts_folder(tmp_path):
    t = load_templates()
    assert set(t) == {"localise", "enhance_two_images", "enhance_side_by_side"}
    assert all("{question}" in v for v in t.values())
    (tmp_path / "localise.txt").write_text("no placeholder")
    with pytest.raises(PairforgeError, match="localise.txt"):
        load_templates(tmp_path)


# ----------------------------------------------------------------------------- random tiny LLaVA


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from pairforge.models.hf import HFModel
    from pairforge.models.random_tiny import save_random_llava

    return HFModel(save_random_llava(tmp_path_factory.mktemp("p2dpo-llava")), batch_size=4, progress=False)


def _world(n: int) -> list[Example]:
    from pairforge.world import example_at

    out = []
    for i in range(n):
        r = example_at("train", i, filter_share=0.0)
        out.append(Example(r["id"], r["messages"], r["images"], r["task"], "shapes", r["id"],
                           {"scene": r["scene"], "target": r["target"]}))
    return out


def test_end_to_end_with_random_tiny_llava_is_batch_independent(tiny_llava):
    params = {"max_ppl": 1e9, "margin_low": None, "margin_high": None, "max_new_tokens": 6}
    exs = _world(3)
    rec = load_recipe("p2dpo", params)
    ctx = _ctx(tiny_llava, seed=5)
    rec.check(ctx)
    together = rec.process(exs, ctx)
    apart = [o for ex in exs for o in rec.process([ex], ctx)]
    rows = [r for o in together for r in o.rows]
    assert rows and [r["id"] for r in rows] == [r["id"] for o in apart for r in o.rows]
    for a, b in zip(rows, (r for o in apart for r in o.rows)):
        assert (a["chosen"], a["rejected"], a["crop_box"]) == (b["chosen"], b["rejected"], b["crop_box"])
    for r in rows:
        x0, y0, x1, y1 = r["crop_box"]
        assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
        assert r["crop_image"].size == (x1 - x0, y1 - y0)
        assert r["recipe"] == "p2dpo" and r["models"][0]["name"] == tiny_llava.name
    ds = to_dataset(rows)
    assert "focus" in ds.unique("p2dpo_kind")


def test_noise_is_seeded_per_example_and_run_seed():
    def noisy(seed, ex):
        pol = FakePolicy()
        P2DPO.from_params({"kinds": ["robust"]}).process([ex], _ctx(pol, seed=seed))
        (_, reqs) = [c for c in pol.calls if c[0] == "generate"][-1]
        return reqs[0].images[0].tobytes()

    ex = _world_example()
    assert noisy(0, ex) == noisy(0, ex) != noisy(1, ex)
    assert noisy(0, ex) != noisy(0, Example("other-id", ex.messages, ex.images))


def test_robust_pairs_default_to_gaussian_noise_diffusion_as_option():
    """§4.1.2: I_noise = I + Gaussian noise (σ = 0.2 in [0, 1] pixel units, paper silent on σ);
    diffusion-style noise (DDPM step t) is an option."""
    ex = _world_example()
    ctx = _ctx(FakePolicy())
    seed = ctx.seed_for(ex, "p2dpo-noise")
    for params, want in (({}, add_noise(ex.images[0], "gaussian", 0.2, seed)),
                         ({"noise": "diffusion"}, add_noise(ex.images[0], "diffusion", 165, seed))):
        pol = FakePolicy()
        (out,) = P2DPO.from_params({"kinds": ["robust"], **params}).process([ex], _ctx(pol))
        assert out.rows[0]["noisy_image"].tobytes() == want.tobytes()
    assert P2DPO.from_params({}).params()["noise"] == "gaussian"
