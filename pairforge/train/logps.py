"""Per-sequence log-probs of a collated :class:`~pairforge.train.data.Batch` under a model:
one forward pass, logits only at the positions that predict response tokens."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from pairforge.models.decoding import token_logprobs
from pairforge.train.data import Batch


@dataclass
class SeqLogps:
    """``sums`` (N,) log π(y|x) = Σ_t log π(y_t|x, y_<t); ``counts`` (N,) response tokens;
    ``segment_sums`` / ``segment_counts`` (N, S) the same per sentence (when asked);
    ``entropy`` (N,) the summed per-token entropy of the next-token distribution (when asked)."""

    sums: torch.Tensor
    counts: torch.Tensor
    segment_sums: torch.Tensor | None = None
    segment_counts: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def means(self) -> torch.Tensor:
        """ℓ̄ = log π(y|x) / |y|, the per-token mean log-prob."""
        return self.sums / self.counts.clamp_min(1)


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped, de-PEFT-ed) model's forward accepts ``logits_to_keep``."""
    base = model
    while True:  # DDP-style wrappers keep the model in .module, peft in .get_base_model()
        inner = getattr(base, "module", None)
        if inner is None and hasattr(base, "get_base_model"):
            inner = base.get_base_model()
        if inner is None or inner is base:
            break
        base = inner
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def sequence_logps(model: torch.nn.Module, batch: Batch, *, segments: bool = False,
                   entropy: bool = False, logits_to_keep: bool = True) -> SeqLogps:
    """Log-probs of every sequence of ``batch`` (on the model's device) in one forward pass.

    Only the positions that predict a response token (``batch.keep``) are projected onto the
    vocabulary (``logits_to_keep`` as a boolean mask when the model takes it; otherwise the
    full logits, then those positions); ``batch.source`` maps each target to its row there."""
    if logits_to_keep:
        logits = model(**batch.inputs, logits_to_keep=batch.keep, use_cache=False).logits
    else:
        logits = model(**batch.inputs, use_cache=False).logits[batch.keep]
    lp = token_logprobs(logits, batch.targets, batch.source)
    n, seq = batch.n_sequences, batch.seq
    sums = lp.new_zeros(n).index_add(0, seq, lp)
    counts = torch.zeros(n, dtype=torch.long, device=lp.device).index_add(0, seq, torch.ones_like(seq))
    out = SeqLogps(sums, counts)
    if segments:
        s = batch.n_segments
        flat = seq * s + batch.segment
        out.segment_sums = lp.new_zeros(n * s).index_add(0, flat, lp).view(n, s)
        out.segment_counts = torch.zeros(n * s, dtype=torch.long, device=lp.device).index_add(
            0, flat, torch.ones_like(flat)).view(n, s)
    if entropy:
        with torch.no_grad():
            logp = torch.log_softmax(logits.detach().float(), dim=-1)[batch.source]
            h = -(logp.exp() * logp).sum(-1)
        out.entropy = h.new_zeros(n).index_add(0, seq, h)
    return out
