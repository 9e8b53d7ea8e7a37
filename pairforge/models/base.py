"""The models protocol: one small interface for a policy VLM, whatever runs it.

A backend (Hugging Face transformers, vLLM, an OpenAI-compatible server) implements
:class:`VLM`:

- ``generate(requests, n, sampling)`` → for each request, ``n`` sampled :class:`Completion` s,
  each with its token log-probs and token-to-character offsets;
- ``score(requests, responses)`` → for each (request, response), a :class:`ScoredResponse`
  with per-token log-probs and offsets, so that sentence sums (ASPO) and per-token means
  (CW-DPO's ℓ̄, perplexity) come out exact.

Backends declare their :class:`Capability` s; :func:`require` lets a recipe fail before any
work starts when the backend lacks one, naming a backend that has it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from pairforge.errors import PairforgeError


class Capability(str, Enum):
    GENERATE = "generate"            # sampling with token log-probs
    SCORE = "score"                  # per-token log-probs of given responses
    IMAGES = "images"                # accepts image inputs (False for a text-only LM)
    ATTENTION = "attention"          # answer-to-image attention maps (P2-DPO focus crops)
    CONTRASTIVE = "contrastive"      # contrastive amplification decoding (P2-DPO robust)


#: Which backend to suggest when a capability is missing.
_PROVIDED_BY = {
    Capability.GENERATE: "hf:, vllm: or openai:",
    Capability.SCORE: "hf: or vllm: (an openai: server only if it returns prompt log-probs)",
    Capability.IMAGES: "an image-text-to-text model (hf:, vllm: or openai: with a VLM)",
    Capability.ATTENTION: "an hf: model (transformers, eager attention)",
    Capability.CONTRASTIVE: "an hf: model (transformers)",
}


@dataclass(frozen=True)
class Request:
    """One prompt: TRL conversational messages and the images their image parts refer to."""

    messages: Sequence[dict]
    images: Sequence[Any] = ()
    id: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy. ``seed`` makes sampling
    reproducible per request (backends combine it with the request id)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise PairforgeError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise PairforgeError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise PairforgeError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class ScoredResponse:
    """Per-token log-probs of a response, with each token's character span in ``text``."""

    text: str
    token_logprobs: list[float]
    offsets: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def sum_logprob(self) -> float:
        """log π(y|x) = Σ_t log π(y_t | x, y_<t)."""
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        """ℓ̄ = (1/T) Σ_t log π(y_t | x, y_<t); NaN for an empty response."""
        return self.sum_logprob / self.n_tokens if self.n_tokens else math.nan

    @property
    def perplexity(self) -> float:
        """PPL = exp(−ℓ̄)."""
        return math.exp(-self.mean_logprob) if self.n_tokens else math.nan

    def span_logprobs(self, start: int, end: int) -> list[float]:
        """Log-probs of the tokens whose character span overlaps ``[start, end)``.

        A token that straddles a boundary (e.g. the space before a sentence) is counted in the
        span where it starts, so adjacent spans partition the tokens exactly."""
        if len(self.offsets) != len(self.token_logprobs):
            raise PairforgeError("span log-probs need token offsets; this backend returned none")
        return [lp for lp, (s, _) in zip(self.token_logprobs, self.offsets) if start <= s < end]


@dataclass
class Completion(ScoredResponse):
    """A sampled response with its token log-probs (under the sampling distribution's model)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


@runtime_checkable
class VLM(Protocol):
    name: str
    revision: str
    capabilities: frozenset[Capability]

    def generate(self, requests: Sequence[Request], n: int,
                 sampling: SamplingParams) -> list[list[Completion]]: ...

    def score(self, requests: Sequence[Request], responses: Sequence[str]) -> list[ScoredResponse]: ...


def require(model: VLM, *needed: Capability, purpose: str) -> None:
    """Fail before any work starts when ``model`` lacks a capability ``purpose`` needs."""
    missing = [c for c in needed if c not in model.capabilities]
    if missing:
        c = missing[0]
        raise PairforgeError(
            f"{purpose} needs '{c.value}', which backend {model.name} does not provide; "
            f"use {_PROVIDED_BY[c]}")


@runtime_checkable
class ImageTextScorer(Protocol):
    """A CLIP-style scorer: cosine similarity of image and text embeddings.

    ``cosine(images, texts)`` pairs them by index (``len(images) == len(texts)``) and returns one
    cosine per pair; ``cosine_matrix(images, texts)`` returns the ``len(images) × len(texts)``
    matrix. Implementations batch internally."""

    name: str
    revision: str

    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]: ...

    def cosine_matrix(self, images: Sequence[Any], texts: Sequence[str]) -> list[list[float]]: ...


def clip_score(cosine: float, w: float = 2.5) -> float:
    """CLIPScore(I, c) = w · max(cos(E_I, E_c), 0), w = 2.5 (Hessel et al., 2021, eq. 1)."""
    return w * max(cosine, 0.0)


def resolve_device(device: Any = None):
    """``--device`` as a ``torch.device`` that exists on this machine (default: ``cuda`` when
    available, else ``cpu``); a one-line :class:`PairforgeError` for a malformed device or one
    this machine lacks (``cuda:7`` with fewer GPUs, ``cuda`` without CUDA) instead of torch's
    ``AssertionError`` at the first tensor moved there."""
    import torch

    if device is None or (isinstance(device, str) and not device.strip()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise PairforgeError(f"--device {device!r}: not a device ({str(e).splitlines()[0][:120]}); "
                             f"use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise PairforgeError(f"--device {device}: this machine has no CUDA device; use "
                                 f"--device cpu")
        if dev.index is not None and dev.index >= n:
            raise PairforgeError(f"--device {device}: this machine has {n} CUDA device(s), "
                                 f"cuda:0 to cuda:{n - 1}; pick one of those")
        return dev
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise PairforgeError(f"--device {device}: no {dev.type} device on this machine; use "
                             f"--device cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    return dev
