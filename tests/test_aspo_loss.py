"""ASPO's loss, Eqs. 12–13 of Wang et al. 2025 (arXiv:2505.19100), against vectors computed by
hand from the equations (not from pairforge's code): the ratio R_c/R_c* as a stop-gradient, so
the loss *value* is DPO's while the *gradient* of each sentence is scaled by (1 + w_i); its
degenerate cases; and the per-step weights of Alg. 1 (Eq. 9 perplexity of the current policy,
Eq. 10 mix with the stored CLIP similarities)."""

from __future__ import annotations

import math

import pytest
import torch

from pairforge.train import losses as L
from pairforge.train.loop import aspo_step_weights


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_aspo_margin_hand_vector_value_and_gradient():
    # Δ_1 = −3 − (−4) = 1, Δ_2 = −4 − (−6) = 2 (sentence log-ratios), w = (0.5, 0), β = 0.1,
    # rejected: −6.5 − (−7) = 0.5.
    # R_c = 0.1·(1 + 2) = 0.3; R_c* = 0.1·(1.5·1 + 1·2) = 0.35; ratio = 6/7
    # M* = (6/7)·0.35 − 0.1·0.5 = 0.25;  L = −log σ(0.25) = log(1 + e^−0.25)
    pol = torch.tensor([[-3.0, -4.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-4.0, -6.0]], dtype=torch.float64)
    out = L.aspo_loss(pol, ref, torch.tensor([[0.5, 0.0]], dtype=torch.float64), torch.tensor([[4, 5]]),
                      torch.tensor([-6.5], dtype=torch.float64), torch.tensor([-7.0], dtype=torch.float64),
                      beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.25)), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.3, abs=1e-12)  # β·M_c = R_c: the value is DPO's
    assert out.extras["aspo_ratio"].item() == pytest.approx(6 / 7, abs=1e-12)
    out.losses.sum().backward()
    # ∂L/∂Δ_i = −σ(−M*)·(R_c/R_c*)·β·(1 + w_i): 1.5 : 1 between the sentences (DPO: 1 : 1)
    g = -sig(-0.25) * (6 / 7) * 0.1
    assert pol.grad.tolist()[0] == pytest.approx([g * 1.5, g * 1.0], abs=1e-12)


def test_aspo_literal_ratio_cancels_to_dpo_value():
    """Every same-sign case: the value of M* equals DPO's margin (the ratio cancels)."""
    g = torch.Generator().manual_seed(1)
    pol = -torch.rand(6, 3, generator=g, dtype=torch.float64) * 3
    ref = pol - torch.rand(6, 3, generator=g, dtype=torch.float64)  # all Δ_i > 0
    w = torch.rand(6, 3, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 6, (6, 3), generator=g)
    pr, rr = -torch.rand(6, generator=g, dtype=torch.float64), -torch.rand(6, generator=g, dtype=torch.float64)
    aspo = L.aspo_loss(pol, ref, w, lengths, pr, rr, beta=0.1)
    dpo = L.dpo_loss(pol.sum(-1), pr, ref.sum(-1), rr, beta=0.1)
    assert torch.allclose(aspo.losses, dpo.losses, atol=1e-12, rtol=0)


def test_aspo_degenerate_ratios():
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    lengths = torch.tensor([[2, 2]])
    # π_θ = π_ref (first step): R_c = R_c* = 0 → the equal-reward limit n/Σ(1 + w) = 2/3
    zero = torch.zeros(1, 2, dtype=torch.float64)
    _, r = L.aspo_weighted_logratio(zero, w, lengths)
    assert r.item() == pytest.approx(2 / 3)
    # Δ = (1, −2): R_c* = 0.1·(2 − 2) = 0 → 2/3; M_c = (2/3)·0 = 0 (DPO's would be −1)
    m, r = L.aspo_weighted_logratio(torch.tensor([[1.0, -2.0]], dtype=torch.float64), w, lengths)
    assert r.item() == pytest.approx(2 / 3) and m.item() == pytest.approx(0.0)
    # Δ = (2, −1), w = (1, 0.5): R_c/R_c* = 1/2.5 = 0.4, clamped to [1/2, 1/1.5] → 0.5; M_c = 0.5·2.5
    m, r = L.aspo_weighted_logratio(torch.tensor([[2.0, -1.0]], dtype=torch.float64),
                                    torch.tensor([[1.0, 0.5]], dtype=torch.float64), lengths)
    assert r.item() == pytest.approx(0.5) and m.item() == pytest.approx(1.25)
    # padding (L_i = 0) is ignored: one real sentence → ratio 1/(1 + w_1), value Δ_1
    m, r = L.aspo_weighted_logratio(torch.tensor([[3.0, 9.0]], dtype=torch.float64), w, torch.tensor([[2, 0]]))
    assert r.item() == pytest.approx(0.5) and m.item() == pytest.approx(3.0)


def test_aspo_step_weights_hand_vector():
    """Alg. 1: PPL'_i from the current policy's sentence log-probs (Eq. 9, negated, min-max),
    S'_i from the stored similarities (Eq. 7), w_i = α·S'_i + (1 − α)·PPL'_i (Eq. 10)."""
    sums = torch.tensor([[-2.0, -6.0, -3.0, 0.0]])  # sentence log-prob sums; the 4th is padding
    counts = torch.tensor([[2, 4, 1, 0]])
    # PPL = (e^1, e^1.5, e^3); −PPL min-max: ((e^3 − e^1)/(e^3 − e^1), (e^3 − e^1.5)/(e^3 − e^1), 0)
    sims = [[0.2, 0.6, 0.4]]  # S' = (0, 1, 0.5)
    w = aspo_step_weights(sums, counts, sims, alpha=0.5)
    e = math.e
    p = [1.0, (e ** 3 - e ** 1.5) / (e ** 3 - e), 0.0]
    want = [0.5 * s + 0.5 * q for s, q in zip([0.0, 1.0, 0.5], p)]
    assert w[0, :3].tolist() == pytest.approx(want, abs=1e-6) and w[0, 3].item() == 0.0
    # one sentence → weight 0 (ASPO reduces to DPO); a sentence with no token of its own → PPL' = 0
    w1 = aspo_step_weights(torch.tensor([[-2.0, 0.0]]), torch.tensor([[3, 0]]), [[0.9]], alpha=0.5)
    assert w1[0].tolist() == [0.0, 0.0]
    # PPL = (e, none → worst e, e^0.5): −PPL min-max (0, 0, 1)
    w2 = aspo_step_weights(torch.tensor([[-2.0, 0.0, -0.5]]), torch.tensor([[2, 0, 1]]), [[0.0, 0.0, 0.0]],
                           alpha=0.0)
    assert w2[0].tolist() == pytest.approx([0.0, 0.0, 1.0])
