"""Preference losses on per-sequence log-prob tensors: DPO, CW-DPO (SFT-C + cooling-weighted
DPO), ASPO (sentence-weighted DPO) and P2-DPO (focus + calibration + robust, DDW-weighted).

Every function here is pure torch: no model, no I/O. Inputs are log-probs that the loop has
already reduced per sequence (``Σ_t log π(y_t | x, y_<t)`` over the response tokens, or the
per-token mean where a docstring says so); shapes are ``(B,)`` for B pairs unless stated.
Each loss returns a :class:`PreferenceLoss` with the per-pair losses and the implicit rewards
``β·(log π − log π_ref)`` of chosen and rejected (detached), for logging.

Defaults that the papers' text available to us does not pin down are marked "our choice" in
the docstrings and are all configurable (:class:`pairforge.train.config.TrainConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: Default β of every DPO-style term (Rafailov et al. 2023 use 0.1 in most experiments; P2-DPO's
#: default too).
BETA = 0.1
#: CW-DPO defaults (our choice; see :func:`sft_c_loss` and :func:`cooling_weight`).
SFTC_LAMBDA = 0.1
SFTC_MARGIN = 1.0
COOLING_FLOOR = -3.0
COOLING_TAU = 0.5
#: P2-DPO's weight of the calibration loss.
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


def sft_c_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor,
               lam: float = SFTC_LAMBDA, margin: float = SFTC_MARGIN) -> tuple[torch.Tensor, dict]:
    """CW-DPO Stage 1, SFT with gentle negatives (SFT-C) (Zhang, Cai, Yang & Wang, "Learning
    Dynamics of VLM Finetuning", ICLR 2026, https://arxiv.org/abs/2510.11978, Stage 1):

        L = E[−ℓ̄_θ(y⁺|x)] + λ·ReLU(C − E_batch[−ℓ̄_θ(y⁻|x)])

    with ℓ̄_θ the per-token *mean* log-prob (so C is in nats per token, on the scale of the
    cooling floor). The hinge only acts when the batch's average NLL of the negatives falls
    below C: a low-weight push that keeps negatives from becoming likely, no explicit penalty
    otherwise. Defaults λ = 0.1, C = 1.0 nat/token are our choice (the paper's values were
    not available to us). Arguments (B,); returns the scalar loss and detached statistics."""
    nll_chosen = -chosen_mean_logps
    nll_rejected = -rejected_mean_logps.mean()
    hinge = F.relu(margin - nll_rejected)
    loss = nll_chosen.mean() + lam * hinge
    return loss, {"nll_chosen": nll_chosen.mean().detach(), "nll_rejected": nll_rejected.detach(),
                  "sftc_hinge": hinge.detach()}


def cooling_weight(rejected_mean_logps: torch.Tensor, floor: float = COOLING_FLOOR,
                   tau: float = COOLING_TAU) -> torch.Tensor:
    """CW-DPO's cooling weight (Zhang et al. 2026, arXiv:2510.11978, Stage 2):

        w_c = σ((ℓ̄_θ(y_l|x) − ℓ_floor) / τ),   detached,

    from the current policy's mean token log-prob of the negative: an easy negative
    (ℓ̄ ≪ ℓ_floor, already unlikely) gets w_c → 0, a hard one (ℓ̄ ≫ ℓ_floor) w_c → 1.
    Defaults ℓ_floor = −3.0 nat/token (the cwdpo recipe's floor, which drops negatives with
    ℓ̄ < ℓ_floor − 2) and τ = 0.5 are pairforge's choices, not paper numbers. Shape (B,) → (B,)."""
    return torch.sigmoid((rejected_mean_logps.detach() - floor) / tau)


def cwdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               policy_rejected_mean_logps: torch.Tensor, beta: float = BETA,
               floor: float = COOLING_FLOOR, tau: float = COOLING_TAU) -> PreferenceLoss:
    """CW-DPO Stage 2, cooling-weighted DPO (Zhang et al. 2026, arXiv:2510.11978, Stage 2):

        L = −log σ(β·(Δ_w − w_c·Δ_l)),   Δ = log π(y|x) − log π_ref(y|x),

    with π_ref the Stage-1 policy and w_c = :func:`cooling_weight` of the current policy's mean
    token log-prob of y_l (``policy_rejected_mean_logps``, detached). Sums (B,) otherwise.
    With w_c = 1 this is :func:`dpo_loss`. Extras: ``cooling_weight`` (B,)."""
    w = cooling_weight(policy_rejected_mean_logps, floor, tau)
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
    arXiv:2606.03376), per focus pair:

        L_calib = −log σ(β·([log π(y_w|x_enh) − log π(y_w|x_deg)]
                             − [log π_ref(y_l|x_enh) − log π_ref(y_l|x_deg)]))

    where x_enh is the prompt with the enhanced (crop) image and x_deg with the degraded
    (erased) image: the policy should gain more from the visual evidence on y_w than the
    reference does on y_l. Sums (B,) → (B,)."""
    policy = policy_chosen_enhanced_logps - policy_chosen_degraded_logps
    ref = ref_rejected_enhanced_logps - ref_rejected_degraded_logps
    return -F.logsigmoid(beta * (policy - ref))


def p2dpo_loss(is_focus: torch.Tensor, ddw_weights: torch.Tensor,
               policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               policy_chosen_enhanced_logps: torch.Tensor, policy_chosen_degraded_logps: torch.Tensor,
               ref_rejected_enhanced_logps: torch.Tensor, ref_rejected_degraded_logps: torch.Tensor,
               beta: float = BETA, lambda_calib: float = P2DPO_LAMBDA_CALIB) -> PreferenceLoss:
    """P2-DPO (Zhang et al. 2026, arXiv:2606.03376): a batch of focus and robust pairs,

        focus pair:  L = w_focus  · (L_DPO(x) + λ_calib·L_calib)
        robust pair: L = w_robust · L_DPO(x_noise)

    ``is_focus`` (B,) bool; ``ddw_weights`` (B,) the stored DDW weight of each pair's kind
    (``ddw_focus`` / ``ddw_robust``); ``policy/ref_chosen/rejected_logps`` (B,) are on the
    pair's DPO input (the prompt image for focus pairs, the noisy image for robust pairs); the
    four calibration inputs (B,) are read on focus rows only (anything, e.g. 0, on robust
    rows). λ_calib = 0.3, β = 0.1 by default. Extras: ``calibration`` (B,) (0 on robust rows),
    ``ddw_weight`` (B,)."""
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    calib = p2dpo_calibration_loss(policy_chosen_enhanced_logps, policy_chosen_degraded_logps,
                                   ref_rejected_enhanced_logps, ref_rejected_degraded_logps, beta)
    calib = torch.where(is_focus, calib, torch.zeros_like(calib))
    w = ddw_weights.to(dpo.losses.dtype)
    losses = w * (dpo.losses + lambda_calib * calib)
    return PreferenceLoss(losses, dpo.chosen_rewards, dpo.rejected_rewards,
                          {"calibration": calib.detach(), "ddw_weight": w.detach()})
