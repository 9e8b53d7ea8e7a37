"""Pure decoding pieces shared by the model backends: token choice, contrastive amplification,
per-request seeds and token-to-character offsets. No I/O, no model loading (torch only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pairforge.schema import derive_seed


def request_seed(seed: int, request_id: str, sample: int) -> int:
    """The seed of sample ``sample`` of request ``request_id`` under the global ``seed``:
    a 63-bit hash of the three, so that a sample never depends on batch size, batch
    composition, order or device (DESIGN.md, "Per-example randomness")."""
    return derive_seed("sample", seed, request_id, sample)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits[rows[i]])[targets[i]] for each target, with ``rows`` defaulting to
    0..N−1: ``logit − logsumexp`` in float32, without materialising the log-softmax (logits
    (K, V); several targets may share a row, e.g. the last prompt position)."""
    logits = logits.float()
    if rows is None:
        rows = torch.arange(len(targets), device=logits.device)
    return logits[rows, targets] - torch.logsumexp(logits, dim=-1)[rows]


def choose_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  uniforms: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, V).

    Greedy (``temperature == 0``): the argmax. Otherwise nucleus sampling by inverse CDF:
    probabilities ``softmax(logits / temperature)`` sorted descending, truncated to the
    smallest prefix whose mass reaches ``top_p`` (the token crossing ``top_p`` is kept),
    renormalised; the token is the first whose cumulative mass exceeds ``u · kept mass``
    for the row's uniform ``u`` in [0, 1). One uniform per row makes every row's draw depend
    only on its own random stream.
    """
    if temperature == 0:
        return logits.argmax(-1)
    if uniforms is None:
        raise ValueError("sampling needs one uniform per row")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    cdf = sorted_p.cumsum(-1)
    target = uniforms.to(cdf).unsqueeze(-1) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    # never land on a truncated (zero-mass) token through rounding at the top of the CDF
    n_kept = (sorted_p > 0).sum(-1, keepdim=True)
    pick = torch.minimum(pick, n_kept - 1)
    return order.gather(-1, pick).squeeze(-1)


def contrastive_amplified_logits(expert: torch.Tensor, amateur: torch.Tensor,
                                 lam: float, beta: float) -> torch.Tensor:
    """Contrastive amplification, the decoding step of P2-DPO's Visual Robustness pairs
    (Zhang et al., "P²-DPO: Grounding Hallucination in Perceptual Processing via Calibration
    Direct Preference Optimization", ICLR 2026, arXiv:2606.03376):

        ℓ̃_v = (1 + λ)·ℓ_v(I) − λ·ℓ_v(I_noise)   for v ∈ V_head = {v : p(v|I) ≥ β·max_w p(w|I)},
        ℓ̃_v = −inf                              otherwise,

    where ``expert`` = ℓ(I) are the logits given the clean image, ``amateur`` = ℓ(I_noise)
    those given the noisy image and p(·|I) = softmax(ℓ(I)). Shapes (..., V); float32 out."""
    if lam < 0 or not 0 <= beta <= 1:
        raise ValueError(f"contrastive amplification needs lam >= 0 and 0 <= beta <= 1, "
                         f"got lam={lam}, beta={beta}")
    expert, amateur = expert.float(), amateur.float()
    # p(v|I) >= β·max p(v|I)  ⇔  ℓ_v − max ℓ >= log β  (softmax shares one normaliser)
    head = expert - expert.amax(-1, keepdim=True) >= torch.log(torch.tensor(beta))
    combined = (1 + lam) * expert - lam * amateur
    return combined.masked_fill(~head, float("-inf"))


def tile_offsets(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token character spans from a fast tokenizer, extended back over the whitespace before
    each token (start = min(own start, previous end); the first token starts at 0), so that
    consecutive spans tile the text and a token owns the space in front of it."""
    out: list[tuple[int, int]] = []
    prev_end = 0
    for s, e in offsets:
        s = min(int(s), prev_end)
        e = max(int(e), s)
        out.append((s, e))
        prev_end = e
    return out


def prefix_offsets(prefix_lengths: Sequence[int], text_length: int,
                   pending: Sequence[bool] | None = None) -> list[tuple[int, int]]:
    """Spans of tokens from the lengths of the decoded prefixes ``ids[:1]``, ``ids[:2]``, …,
    each counted in whole characters (a character whose bytes the prefix cuts is not counted;
    ``pending[k]`` says that prefix k ends inside one). Token k spans [end_{k−1}, end_k), plus
    the cut character when ``pending[k]``; ends non-decreasing and clipped to the text; then
    :func:`own_split_characters`. This is the fast tokenizer's rule (a token owns every
    character its bytes touch), which the HF backend's scores use, so every backend gives a
    response the same spans; without ``pending`` (a server's decoded tokens only), a token that
    ends with the leading bytes of a character that another token completes gets only its
    whole characters."""
    out: list[tuple[int, int]] = []
    prev = 0
    for k, n in enumerate(prefix_lengths):
        end = min(max(int(n), prev), text_length)
        cut = bool(pending[k]) if pending is not None else False
        out.append((prev, min(end + cut, text_length)))
        prev = end
    return own_split_characters(out)


def own_split_characters(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """A character split over several tokens (e.g. the UTF-8 bytes of a Japanese character)
    belongs to each of its pieces, as a fast tokenizer's offsets have it: a token with an empty
    span followed by one whose span starts at the same place gets that token's first
    character, [s, s+1). Empty spans at the end of the text (nothing follows) stay empty."""
    out = list(spans)
    for k in range(len(out) - 2, -1, -1):
        s, e = out[k]
        ns, ne = out[k + 1]
        if s == e and ns == s and ne > ns:
            out[k] = (s, s + 1)
    return out
