"""Preference losses against hand-computed vectors (softplus(−z) = −log σ(z) worked by hand).

Pair 1: log π(y_w)=−5, log π(y_l)=−7, ref −6 / −6 → Δ_w = 1, Δ_l = −1.
Pair 2: log π(y_w)=−3, log π(y_l)=−2, ref −2 / −4 → Δ_w = −1, Δ_l = 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from pairforge.train import losses as L

PC = torch.tensor([-5.0, -3.0], dtype=torch.float64)
PR = torch.tensor([-7.0, -2.0], dtype=torch.float64)
RC = torch.tensor([-6.0, -2.0], dtype=torch.float64)
RR = torch.tensor([-6.0, -4.0], dtype=torch.float64)


def close(a, b, tol=1e-9):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


def test_dpo_hand_vector():
    out = L.dpo_loss(PC, PR, RC, RR, beta=0.1)
    # z = 0.1·(1 − (−1)) = 0.2 → log(1 + e^−0.2); z = 0.1·(−1 − 2) = −0.3 → log(1 + e^0.3)
    assert close(out.losses, [0.5981388693815918, 0.8543552444685272])
    assert close(out.chosen_rewards, [0.1, -0.1])
    assert close(out.rejected_rewards, [-0.1, 0.2])
    assert not out.chosen_rewards.requires_grad


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    L.dpo_loss(pc, pr, RC, RR).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log π(y_w), lowers log π(y_l)


def test_sft_c_hand_vector():
    chosen = torch.tensor([-0.5, -1.5])
    # negatives' mean NLL 0.6 < C = 1 → hinge 0.4; loss = 1.0 + 0.1·0.4
    loss, stats = L.sft_c_loss(chosen, torch.tensor([-0.4, -0.8]), lam=0.1, margin=1.0)
    assert math.isclose(loss.item(), 1.04, abs_tol=1e-6)
    assert math.isclose(stats["sftc_hinge"].item(), 0.4, abs_tol=1e-6)
    # negatives already unlikely (mean NLL 3 > C): the hinge is off, pure SFT
    loss, stats = L.sft_c_loss(chosen, torch.tensor([-2.0, -4.0]), lam=0.1, margin=1.0)
    assert math.isclose(loss.item(), 1.0, abs_tol=1e-6) and stats["sftc_hinge"].item() == 0


def test_sft_c_on_sequence_nll_hand_vector():
    """CW-DPO Eq. 4.2 with −log π(y|x) the sequence NLL. Positives: 10 and 3 tokens, summed
    log-probs −5 and −9 (per-token means −0.5 and −3); negatives: 4 and 20 tokens, sums −6 and
    −10 (means −1.5, −0.5). C = 9 nats, λ = 0.1:
    E[−log π(y⁺)] = (5 + 9)/2 = 7; E[−log π(y⁻)] = (6 + 10)/2 = 8 → ReLU(9 − 8) = 1 → 7.1.
    On per-token means the same numbers give 1.75 + 0.1·ReLU(9 − 1) = 2.55: a different loss."""
    pos, neg = torch.tensor([-5.0, -9.0]), torch.tensor([-6.0, -10.0])
    loss, stats = L.sft_c_loss(pos, neg, lam=0.1, margin=9.0)
    assert math.isclose(loss.item(), 7.1, abs_tol=1e-6)
    assert math.isclose(stats["nll_rejected"].item(), 8.0, abs_tol=1e-6)
    means, _ = L.sft_c_loss(torch.tensor([-0.5, -3.0]), torch.tensor([-1.5, -0.5]), lam=0.1, margin=9.0)
    assert math.isclose(means.item(), 2.55, abs_tol=1e-6)


def test_cooling_weight_hand_vector():
    w = L.cooling_weight(torch.tensor([-2.0, -1.0, -4.0]), floor=-2.0, tau=0.5)  # Eq. 4.4
    # σ(0), σ(2), σ(−4)
    assert close(w, [0.5, 0.8807970779778823, 0.01798620996209156], tol=1e-7)


def test_cwdpo_hand_vector_and_detached_weight():
    mean = torch.tensor([-2.0, -1.0], dtype=torch.float64, requires_grad=True)
    pr = PR.clone().requires_grad_()
    out = L.cwdpo_loss(PC, pr, RC, RR, mean, beta=0.1, floor=-2.0, tau=0.5)
    # pair 1: w = 0.5, z = 0.1·(1 − 0.5·(−1)) = 0.15; pair 2: w = σ(2), z = 0.1·(−1 − σ(2)·2)
    assert close(out.losses, [0.6209570477895321, 0.8407297516263603])
    assert close(out.extras["cooling_weight"], [0.5, 0.8807970779778823])
    out.losses.sum().backward()
    assert mean.grad is None  # w_c is detached: no gradient through ℓ̄
    # the rejected gradient is scaled by w_c relative to DPO's
    pr2 = PR.clone().requires_grad_()
    L.dpo_loss(PC, pr2, RC, RR, beta=0.1).losses.sum().backward()
    assert pr.grad[0].abs() < pr2.grad[0].abs()


def test_cwdpo_with_weight_one_is_dpo():
    hot = torch.tensor([100.0, 100.0], dtype=torch.float64)  # ℓ̄ ≫ floor → w_c = 1
    assert close(L.cwdpo_loss(PC, PR, RC, RR, hot, floor=-3.0, tau=0.5).losses, L.dpo_loss(PC, PR, RC, RR).losses)


def test_cooling_calibration_from_data_by_hand():
    """ℓ_floor and τ from the Stage-2 negatives' ℓ̄ (quartiles, τ = IQR / ln 9), C from the
    Stage-1 negatives' sequence NLL. Stage-2 ℓ̄ = −1.0, −0.8, −0.6, −0.4, −0.2: numpy's linear
    quartiles −0.8 and −0.4 → ℓ_floor = −0.8, τ = 0.4 / ln 9; w_c(−0.8) = σ(0) = 0.5,
    w_c(−0.4) = σ(ln 9) = 0.9. Stage 1: ℓ̄ −0.5 × 4 tokens, −1.0 × 6 → NLL 2 and 6 → C = 4
    (per token: (0.5 + 1.0)/2 = 0.75)."""
    from pairforge.recipes.cwdpo import cooling_calibration

    lbar = [-1.0, -0.8, -0.6, -0.4, -0.2, -0.5, -1.0]
    n = [5, 5, 5, 5, 5, 4, 6]
    stage = [2, 2, 2, 2, 2, 1, 1]
    got = cooling_calibration(lbar, n, stage)
    assert got["cooling_floor"] == pytest.approx(-0.8) and got["cooling_tau"] == pytest.approx(0.4 / math.log(9))
    assert (got["sftc_margin"], got["sftc_margin_token"]) == (pytest.approx(4.0), pytest.approx(0.75))
    w = L.cooling_weight(torch.tensor([-0.8, -0.4, -1.0], dtype=torch.float64), floor=got["cooling_floor"],
                         tau=got["cooling_tau"])
    # σ(0), σ(ln 9) = 9/10, σ(−0.2·ln 9/0.4) = σ(−ln 3) = 1/4
    assert close(w, [0.5, 0.9, 0.25], tol=1e-9)
    assert got["cooling_weight_p50"] == pytest.approx(1 / (1 + math.exp(-0.2 * math.log(9) / 0.4)))
    empty = cooling_calibration([-1.0], [3], [2])
    assert empty["cooling_floor"] is None and empty["sftc_margin"] is None


def test_aspo_weighted_logratio_hand_vector():
    # Σ(1+w)Δ = 2·2 + 1.5·(−1) = 2.5; R_c = 3 + 2 = 5, R_c* = 2·3 + 1.5·2 = 9 → M_c = 2.5·5/9
    r, _ = L.aspo_weighted_logratio(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.5]]), torch.tensor([[3, 2]]),
                                    ratio="length")  # the token-length option; the paper's form: test_aspo_loss.py
    assert math.isclose(r.item(), 12.5 / 9, abs_tol=1e-6)


def test_aspo_loss_hand_vector():
    out = L.aspo_loss(torch.tensor([[-3.0, -4.0]]), torch.tensor([[-5.0, -3.0]]), torch.tensor([[1.0, 0.5]]),
                      torch.tensor([[3, 2]]), torch.tensor([-6.5]), torch.tensor([-6.0]), beta=0.1, ratio="length")
    # sentence log-ratios (2, −1) → M_c = 12.5/9; Δ_l = −0.5; z = 0.1·(12.5/9 + 0.5)
    assert math.isclose(out.losses.item(), 0.6031559982203895, abs_tol=1e-6)
    assert math.isclose(out.chosen_rewards.item(), 1.25 / 9, abs_tol=1e-6)


def test_aspo_reduces_to_dpo_for_one_sentence_and_for_equal_weights():
    g = torch.Generator().manual_seed(0)
    pol_c, ref_c = -torch.rand(4, 1, generator=g) * 9, -torch.rand(4, 1, generator=g) * 9
    pol_r, ref_r = -torch.rand(4, generator=g) * 9, -torch.rand(4, generator=g) * 9
    weights = torch.rand(4, 1, generator=g)  # any weight of a single sentence
    lengths = torch.randint(1, 9, (4, 1), generator=g)
    aspo = L.aspo_loss(pol_c, ref_c, weights, lengths, pol_r, ref_r, beta=0.2)
    dpo = L.dpo_loss(pol_c[:, 0], pol_r, ref_c[:, 0], ref_r, beta=0.2)
    assert torch.equal(aspo.losses, dpo.losses) or torch.allclose(aspo.losses, dpo.losses, atol=1e-7, rtol=0)
    # several sentences, equal weights (padding with length 0 ignored) → DPO on the sums
    pol3, ref3 = -torch.rand(4, 3, generator=g) * 5, -torch.rand(4, 3, generator=g) * 5
    lengths3 = torch.tensor([[2, 3, 0], [1, 1, 1], [4, 0, 0], [2, 2, 5]])
    pol3, ref3 = pol3 * (lengths3 > 0), ref3 * (lengths3 > 0)
    aspo3 = L.aspo_loss(pol3, ref3, torch.full((4, 3), 0.7), lengths3, pol_r, ref_r)
    dpo3 = L.dpo_loss(pol3.sum(-1), pol_r, ref3.sum(-1), ref_r)
    assert torch.allclose(aspo3.losses, dpo3.losses, atol=1e-6, rtol=0)


def test_aspo_weights_shift_credit_between_sentences():
    # the same total log-ratio, but the higher-weighted sentence carries it → larger M_c
    lengths, w = torch.tensor([[2, 2]]), torch.tensor([[1.0, 0.0]])
    first, _ = L.aspo_weighted_logratio(torch.tensor([[1.0, 0.0]]), w, lengths, ratio="length")
    second, _ = L.aspo_weighted_logratio(torch.tensor([[0.0, 1.0]]), w, lengths, ratio="length")
    assert math.isclose(first.item(), 4 / 3, abs_tol=1e-6) and math.isclose(second.item(), 2 / 3, abs_tol=1e-6)


def test_p2dpo_calibration_hand_vector():
    # policy y_w: enhanced −4 vs degraded −6 → 2; reference y_l: −5 vs −5.5 → 0.5; z = 0.1·1.5
    loss = L.p2dpo_calibration_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]),
                                    torch.tensor([-5.5]), beta=0.1)
    assert math.isclose(loss.item(), 0.6209570477895321, abs_tol=1e-6)


def test_p2dpo_eq8_total_is_per_sample_by_hand():
    """Eq. 8 for one sample (I, P) with both pairs, from the paper's equations with math.
    DDW (§4.2.3, App. F): r = 1.05, α = 0.2·tanh(0.05/0.1), w_focus = 0.5 + α, w_robust = 0.5 − α.
    Focus pair: Δ_w = 1, Δ_l = −1 → L_dpo_focus = −log σ(0.1·2) (Eq. 4); calibration gains
    Δ_πθ(y_w) = −4 − (−6) = 2, Δ_πref(y_l) = −5 − (−5.5) = 0.5 → L_Calib = −log σ(0.1·1.5) (Eq. 5);
    L_focus = L_dpo_focus + 0.3·L_Calib (Eq. 6). Robust pair: Δ_w = −1, Δ_l = 2 →
    L_dpo_rob = −log σ(−0.3) (Eq. 7). L_total = w_focus·L_focus + w_robust·L_dpo_rob: the two
    pairs are summed for their sample, not averaged."""
    def nls(z):  # −log σ(z)
        return math.log1p(math.exp(-z))

    alpha = 0.2 * math.tanh((1.05 - 1.0) / 0.1)
    w_f, w_r = 0.5 + alpha, 0.5 - alpha
    want = w_f * (nls(0.2) + 0.3 * nls(0.15)) + w_r * nls(-0.3)
    f64 = dict(dtype=torch.float64)
    args = (torch.tensor([True, False]), torch.tensor([w_f, w_r], **f64), PC, PR, RC, RR,
            torch.tensor([-4.0, 0.0], **f64), torch.tensor([-6.0, 0.0], **f64),
            torch.tensor([-5.0, 0.0], **f64), torch.tensor([-5.5, 0.0], **f64))
    out = L.p2dpo_loss(*args, beta=0.1, lambda_calib=0.3, sample=torch.tensor([0, 0]))
    assert out.losses.shape == (1,) and out.losses.mean().item() == pytest.approx(want, abs=1e-12)
    # two samples (the robust pair of another sample): the mean over samples of their terms
    two = L.p2dpo_loss(*args, beta=0.1, lambda_calib=0.3, sample=torch.tensor([0, 1]))
    assert two.losses.mean().item() == pytest.approx(want / 2, abs=1e-12)


def test_p2dpo_hand_vector_focus_and_robust():
    focus = torch.tensor([True, False])
    ddw = torch.tensor([0.8, 1.2], dtype=torch.float64)
    nan = float("nan")  # calibration inputs of the robust pair are never read
    out = L.p2dpo_loss(focus, ddw, PC, PR, RC, RR,
                       torch.tensor([-4.0, 0.0], dtype=torch.float64), torch.tensor([-6.0, 0.0], dtype=torch.float64),
                       torch.tensor([-5.0, nan], dtype=torch.float64), torch.tensor([-5.5, nan], dtype=torch.float64),
                       beta=0.1, lambda_calib=0.3)
    # focus: 0.8·(softplus(−0.2) + 0.3·softplus(−0.15)); robust: 1.2·softplus(0.3)
    assert close(out.losses, [0.6275407869747611, 1.0252262933622325])
    assert close(out.extras["calibration"], [0.6209570477895321, 0.0])
    assert close(out.extras["ddw_weight"], [0.8, 1.2], tol=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_dpo_is_symmetric_in_swapping_preference(beta):
    a = L.dpo_loss(PC, PR, RC, RR, beta).losses
    b = L.dpo_loss(PR, PC, RR, RC, beta).losses
    # −log σ(z) − (−log σ(−z)) = −z
    z = beta * ((PC - RC) - (PR - RR))
    assert close(a - b, -z)
