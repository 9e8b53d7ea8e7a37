"""Preference losses on per-sequence log-prob tensors: DPO, CW-DPO (SFT-C + cooling-weighted
DPO), ASPO (sentence-weighted DPO) and P2-DPO (focus + calibration + robust, DDW-weighted).

Every function here is pure torch: no model, no I/O. Inputs are log-probs that the loop has
already reduced per sequence (``Σ_t log π(y_t | x, y_<t)`` over the response tokens, or the
per-token mean where a docstring says so); shapes are ``(B,)`` for B pairs unless stated.
Each loss returns a :class:`PreferenceLoss` with the per-pair losses and the implicit rewards
``β·(log π − log π_ref)`` of chosen and rejected (detached), for logging.

Settings a paper is silent on are marked "paper silent" with our choice in the docstrings and
are all configurable (:class:`pairforge.train.config.TrainConfig`); deliberate deviations are
listed in ``benchmarks/fidelity.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: Default β of every DPO-style term (Rafailov et al. 2023 use 0.1 in most experiments; P2-DPO's
#: App. F too).
BETA = 0.1
#: CW-DPO's λ of SFT-C (Eq. 4.2; paper silent, our choice). C, ℓ_floor and τ have no default
#: here: the trainer sets them from the data (:func:`pairforge.recipes.cwdpo.cooling_calibration`).
SFTC_LAMBDA = 0.1
#: P2-DPO's weight of the calibration loss (App. F: λ_calib = 0.3).
P2DPO_LAMBDA_CALIB = 0.3


@dataclass
class PreferenceLoss:
    """Per-pair ``losses`` (B,) (differentiable; average them for the step loss), the implicit
    rewards of chosen and rejected (B,) (detached), and loss-specific statistics (detached
    tensors, e.g. the cooling weights)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = BETA) -> PreferenceLoss:
    """DPO, sigmoid form (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model", https://arxiv.org/abs/2305.18290, eq. 7):

        L = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

    All arguments are summed response log-probs, shape (B,). Rewards: β·(log π − log π_ref)."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


# ----------------------------------------------------------------------------- CW-DPO


def sft_c_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, lam: float = SFTC_LAMBDA,
               margin: float) -> tuple[torch.Tensor, dict]:
    """CW-DPO Stage 1, constrained SFT with gentle negatives (Zhang, Cai, Yang, Wang & Wang,
    "Dynamics-Aware Preference Optimization for Vision-Language Models", CVPR 2026 version of
    arXiv:2510.11978, §4.1, Eq. 4.2, the Lagrangian relaxation of Eq. 4.1):

        L_SFT-C = E_batch[−log π_θ(y⁺|x)] + λ·ReLU(C − E_batch[−log π_θ(y⁻|x)])

    ``chosen_logps`` / ``rejected_logps`` (B,) are log π_θ(y|x), the *sequence* log-probs (sums
    over the response tokens), as in the equation; C = ``margin`` is then in nats per sequence.
    Per-token means (ℓ̄, C in nats per token) are a documented option of the trainer
    (``sftc_reduction="token_mean"``); the formula is the same. The hinge acts when the batch's
    mean NLL of the negatives falls below C, i.e. when they become too likely (the equation;
    §4.1's prose says the constraint keeps "sufficient probability" on negatives, which the
    equation's direction contradicts — we follow the equation). λ = 0.1 is our choice, C comes
    from the data (paper silent on both). Returns the scalar loss and detached statistics."""
    nll_chosen = -chosen_logps
    nll_rejected = -rejected_logps.mean()
    hinge = F.relu(margin - nll_rejected)
    loss = nll_chosen.mean() + lam * hinge
    return loss, {"nll_chosen": nll_chosen.mean().detach(), "nll_rejected": nll_rejected.detach(),
                  "sftc_hinge": hinge.detach()}


def cooling_weight(rejected_mean_logps: torch.Tensor, *, floor: float, tau: float) -> torch.Tensor:
    """CW-DPO's cooling weight (CVPR 2026 version of arXiv:2510.11978, §4.2, Eq. 4.4):

        w_c = σ((ℓ̄_θ(y_l|x) − ℓ_floor) / τ),   detached ("treating w_c as locally constant", Eq. 4.6),

    from the current policy's mean token log-prob ℓ̄ (§3.2) of the negative: an easy negative
    (ℓ̄ ≪ ℓ_floor, already unlikely) gets w_c → 0, a hard one (ℓ̄ ≫ ℓ_floor) w_c → 1. ℓ_floor and
    τ are paper silent; the trainer sets them from the data
    (:func:`pairforge.recipes.cwdpo.cooling_calibration`). Shape (B,) → (B,)."""
    return torch.sigmoid((rejected_mean_logps.detach() - floor) / tau)


def cwdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               policy_rejected_mean_logps: torch.Tensor, beta: float = BETA, *,
               floor: float, tau: float) -> PreferenceLoss:
    """CW-DPO Stage 2, cooling-weighted DPO (CVPR 2026 version of arXiv:2510.11978, §4.2, Eq. 4.5):

        L = −log σ(β·(Δ_w − w_c·Δ_l)),   Δ = log π(y|x) − log π_ref(y|x),

    with π_ref the Stage-1 policy and w_c = :func:`cooling_weight` of the current policy's mean
    token log-prob of y_l (``policy_rejected_mean_logps``, detached). Sums (B,) otherwise.
    With w_c = 1 this is :func:`dpo_loss`. Extras: ``cooling_weight`` (B,)."""
    w = cooling_weight(policy_rejected_mean_logps, floor=floor, tau=tau)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - w * rejected))
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach(),
                          {"cooling_weight": w})


# ----------------------------------------------------------------------------- ASPO


ASPO_RATIOS = ("reward", "length")


def aspo_weighted_logratio(sentence_logratios: torch.Tensor, sentence_weights: torch.Tensor,
                           sentence_lengths: torch.Tensor, ratio: str = "reward",
                           beta: float = BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen side of ASPO's adaptive margin, divided by β (Wang et al. 2025, "ASPO:
    Adaptive Sentence-Level Preference Optimization for Fine-Grained Multimodal Reasoning",
    arXiv:2505.19100, §3.2.1, Eq. 12):

        M_c = sg(R_c / R_c*) · Σ_i (1 + w_i)·Δ_i,     Δ_i = log π_θ(s_i|x) − log π_ref(s_i|x),
        R_c = Σ_i β·Δ_i,   R_c* = Σ_i β·(1 + w_i)·Δ_i,

    R_c and R_c* being, as Eq. 12's text says, the original and the reweighted sums of the
    chosen answer's sentence-level implicit rewards. **Read literally the ratio cancels**:
    (R_c/R_c*)·R_c*/β = R_c/β, i.e. DPO's chosen log-ratio, and the weights would do nothing.
    Here the ratio is a stop-gradient (``sg``, detached) normaliser: the *value* of M_c is
    DPO's Σ_i Δ_i, but its *gradient* is sg(R_c/R_c*)·(1 + w_i)·∇Δ_i per sentence, so
    the weights move credit towards the high-weight sentences while the total stays on DPO's
    scale, as the paper's stated purpose of the ratio (keep longer answers from gaining from
    the total weight) asks. Degenerate ratios (paper silent; our choice): R_c* = 0 (e.g. the
    first step, π_θ = π_ref) takes the equal-reward limit n/Σ_i(1 + w_i), and the ratio is
    clamped to [1/(1 + max w), 1/(1 + min w)], the range it spans whenever the sentence
    rewards share a sign, so sentence rewards of mixed signs cannot blow it up.

    ``ratio="length"``: pairforge's earlier substitute, R_c = Σ_i L_i and R_c* = Σ_i (1+w_i)·L_i
    with L_i the sentence's tokens, not detached (a documented option, not the paper's).

    Shapes (B, S), padded with L_i = 0 (padding ignored); weights must be > −1. Returns M_c (B,)
    and the ratio used (B,, detached)."""
    if ratio not in ASPO_RATIOS:
        raise ValueError(f"aspo ratio={ratio!r}; choose one of {ASPO_RATIOS}")
    dtype = sentence_logratios.dtype
    present = sentence_lengths > 0
    logratios = torch.where(present, sentence_logratios, torch.zeros_like(sentence_logratios))
    factor = torch.where(present, 1 + sentence_weights.to(dtype), torch.zeros_like(logratios))
    weighted = (factor * logratios).sum(-1)
    if ratio == "length":
        lengths = sentence_lengths.to(dtype)
        r = lengths.sum(-1) / (factor * lengths).sum(-1).clamp_min(torch.finfo(dtype).tiny)
        return r * weighted, r.detach()
    with torch.no_grad():
        r_c = beta * logratios.sum(-1)
        r_c_star = beta * weighted
        n = present.sum(-1).to(dtype)
        equal = n / factor.sum(-1).clamp_min(torch.finfo(dtype).tiny)
        r = torch.where(r_c_star != 0, r_c / torch.where(r_c_star != 0, r_c_star, torch.ones_like(r_c_star)),
                        equal)
        big = torch.finfo(dtype).max
        hi = 1 / torch.where(present, factor, torch.full_like(factor, big)).amin(-1)
        lo = 1 / torch.where(present, factor, torch.zeros_like(factor)).amax(-1).clamp_min(torch.finfo(dtype).tiny)
        r = torch.minimum(torch.maximum(r, lo), hi)
    return r * weighted, r


def aspo_loss(policy_chosen_sentence_logps: torch.Tensor, ref_chosen_sentence_logps: torch.Tensor,
              sentence_weights: torch.Tensor, sentence_lengths: torch.Tensor,
              policy_rejected_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
              beta: float = BETA, ratio: str = "reward") -> PreferenceLoss:
    """ASPO (Wang et al. 2025, arXiv:2505.19100, §3.2.1–3.2.2, Eqs. 12–13):

        M* = (R_c/R_c*)·Σ_i β(1 + w_i)·log(π_θ(s_i|x)/π_ref(s_i|x)) − β·log(π_θ(y_r|x)/π_ref(y_r|x))
        L  = −log σ(M*)

    with the ratio a stop-gradient normaliser (see :func:`aspo_weighted_logratio`: literally
    it cancels and M* would be DPO's margin; detached, the weights shape the gradient).
    Sentence log-probs (B, S) are per-sentence sums of the chosen answer's token log-probs;
    weights w_i (B, S) are Eq. 10's (the trainer recomputes their perplexity part from the
    current policy, Alg. 1); rejected log-probs are sums (B,). Chosen reward: β·M_c.
    Extras: ``aspo_ratio`` (B,)."""
    chosen, r = aspo_weighted_logratio(policy_chosen_sentence_logps - ref_chosen_sentence_logps,
                                       sentence_weights, sentence_lengths, ratio, beta)
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach(), {"aspo_ratio": r})


# ----------------------------------------------------------------------------- P2-DPO


def p2dpo_calibration_loss(policy_chosen_enhanced_logps: torch.Tensor,
                           policy_chosen_degraded_logps: torch.Tensor,
                           ref_rejected_enhanced_logps: torch.Tensor,
                           ref_rejected_degraded_logps: torch.Tensor,
                           beta: float = BETA) -> torch.Tensor:
    """P2-DPO's calibration loss (Zhang et al., "P²-DPO: Grounding Hallucination in
    Perceptual Processing via Calibration Direct Preference Optimization", ICLR 2026,
    arXiv:2606.03376, §4.2.1 Eq. 5, derived in App. E Eqs. 25–29), per focus pair:

        L_calib = −log σ(β·[log π_θ(y_w|I, I_crop, P) − log π_θ(y_w|I_deg, P)]
                         − β·[log π_ref(y_l|I, I_crop, P) − log π_ref(y_l|I_deg, P)])

    i.e. β·(Δ_πθ(y_w) − Δ_πref(y_l)) with the perceptual confidence gain Δ_π(y) (Eq. 25). The
    enhanced input (I, I_crop, P) is I_aug = Combine(I, I_crop) with the enhancement prompt —
    the input y_w was generated from (§4.1.1; Eq. 5 writes P, we use P_enh so that the gain is
    measured on y_w's own input, see benchmarks/fidelity.md); the degraded input is I_deg with
    the plain prompt. As in the paper, the winner's gain is the policy's and the loser's the
    reference's. Sums (B,) → (B,)."""
    policy = policy_chosen_enhanced_logps - policy_chosen_degraded_logps
    ref = ref_rejected_enhanced_logps - ref_rejected_degraded_logps
    return -F.logsigmoid(beta * (policy - ref))


def p2dpo_loss(is_focus: torch.Tensor, ddw_weights: torch.Tensor,
               policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               policy_chosen_enhanced_logps: torch.Tensor, policy_chosen_degraded_logps: torch.Tensor,
               ref_rejected_enhanced_logps: torch.Tensor, ref_rejected_degraded_logps: torch.Tensor,
               beta: float = BETA, lambda_calib: float = P2DPO_LAMBDA_CALIB,
               sample: torch.Tensor | None = None) -> PreferenceLoss:
    """P2-DPO's total loss (Zhang et al. 2026, arXiv:2606.03376, §4.2, Eqs. 4–8), per sample
    (I, P):

        L_total = E[w_focus·L_focus + w_robust·L_dpo_rob]                         (Eq. 8)
        L_focus = L_dpo_focus + λ_calib·L_Calib                                    (Eq. 6)

    with L_dpo_focus the DPO loss of the focus pair on (I, P) (Eq. 4), L_Calib
    :func:`p2dpo_calibration_loss` (Eq. 5), L_dpo_rob the DPO loss of the robust pair on
    (I_noise, P) (Eq. 7) and (w_focus, w_robust) = DDW's w_base ± α (§4.2.3). Rows are pairs:
    ``is_focus`` (B,) bool; ``ddw_weights`` (B,) the stored DDW weight of each row's kind;
    ``sample`` (B,) long, the index (0..S−1) of the sample each row belongs to — a sample's focus
    and robust rows are *summed* (Eq. 8), and ``losses`` has one entry per sample (S,), so its
    mean is Eq. 8's expectation; a sample whose other pair was filtered out contributes its one
    term. ``sample=None``: every row is its own sample. ``policy/ref_chosen/rejected_logps`` (B,)
    are on the row's DPO input; the four calibration inputs (B,) are read on focus rows only
    (anything finite on robust rows). λ_calib = 0.3, β = 0.1 by default (App. F). Rewards stay
    per row; extras: ``calibration`` (B,) (0 on robust rows), ``ddw_weight`` (B,)."""
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    calib = p2dpo_calibration_loss(policy_chosen_enhanced_logps, policy_chosen_degraded_logps,
                                   ref_rejected_enhanced_logps, ref_rejected_degraded_logps, beta)
    calib = torch.where(is_focus, calib, torch.zeros_like(calib))
    w = ddw_weights.to(dpo.losses.dtype)
    terms = w * (dpo.losses + lambda_calib * calib)
    if sample is None:
        losses = terms
    else:
        n = int(sample.max().item()) + 1 if sample.numel() else 0
        losses = terms.new_zeros(n).index_add(0, sample.to(terms.device), terms)
    return PreferenceLoss(losses, dpo.chosen_rewards, dpo.rejected_rewards,
                          {"calibration": calib.detach(), "ddw_weight": w.detach()})
