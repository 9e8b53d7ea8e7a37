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


def test_cooling_weight_hand_vector():
    w = L.cooling_weight(torch.tensor([-2.0, -1.0, -4.0]), floor=-2.0, tau=0.5)
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
    assert close(L.cwdpo_loss(PC, PR, RC, RR, hot).losses, L.dpo_loss(PC, PR, RC, RR).losses)


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
