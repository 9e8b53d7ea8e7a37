"""P2-DPO pairs: Focus-and-Enhance ("focus") and Visual Robustness ("robust") preference pairs.

Paper: Zhang, Li, Yuan, Chen, Zhang, "P²-DPO: Grounding Hallucination in Perceptual Processing
via Calibration Direct Preference Optimization", ICLR 2026, arXiv:2606.03376 (§4 Methodology;
App. B prompt; App. C "Cropping Algorithm"; App. D "Data Filtering Implementation Details").
Both pair kinds are on-policy: every answer is the policy's own.

- **focus** (§4.1.1): the policy's answer-to-image attention map — for the answer the policy
  itself *predicts* on the localisation prompt (App. B, ``prompts/p2dpo/localise.txt``), the
  forward pass the map is read from; ``attention_on="answer"`` uses the dataset answer instead,
  an option that leaks the ground truth into the crop — picks a region by the adaptive
  multi-scale crop (:func:`adaptive_crop`). Chosen = the policy's answer on
  I_aug = Combine(I, crop) with the enhancement prompt P_enh; rejected = its answer on
  I_deg = Erase(I, box) with the plain prompt.
- **robust** (§4.1.2): rejected = the policy's answer on I_noise = Noise(I), Gaussian noise by
  default (:func:`add_noise`; the paper's operator; σ is paper silent, see ``noise_sigma``),
  diffusion-style noise as an option; chosen = its contrastive-amplified answer (Eq. 3), logits
  (1+λ)·ℓ(I) − λ·ℓ(I_noise) on V_head = {v : p(v|I) ≥ β·max p}
  (:func:`pairforge.models.decoding.contrastive_amplified_logits`).
- **filter** (§4.1.2, App. D): max perplexity of the two answers, each under the policy on
  its own input, below ``max_ppl`` (:func:`filter_reason`); pairs with identical or empty
  answers are dropped too; then the log-prob margin M on the pair's DPO input inside the
  margin window — by default the central 95 % of *the run's own* margins (the 2.5th and 97.5th
  percentiles, App. D; the paper's −0.174 / 0.208 are what that rule gave on its data, kept as
  ``margin_window="fixed"``).
- **DDW** (§4.2.3, :func:`ddw_weights`): from r = CLIPScore(P, crop) / CLIPScore(P, I).

The pair's ``prompt`` / ``images`` are the example's own (the clean image and plain question);
the crop box, the DDW weights and the extra inputs travel in the ``p2dpo`` column group, read by
:mod:`pairforge.train` as follows: a focus pair's DPO input is the prompt image (Eq. 4), its
calibration inputs (Eq. 5) ``enhanced_prompt`` + ``enhanced_images`` — I_aug with P_enh, exactly
the input y_w was generated from — and the plain prompt with ``degraded_image``; a robust pair's
DPO input (Eq. 7) is the plain prompt with ``noisy_image``. A focus row therefore carries the
enhanced input and ``degraded_image`` (its ``noisy_image`` is null), a robust row
``noisy_image``; both carry ``crop_image`` (the crop the DDW weight came from), ``p2dpo_example``
(the example id: Eq. 8 sums a sample's two pairs) and ``p2dpo_margin``. P in DDW is the question.

**The margin window is fitted on the whole run** (:meth:`P2DPO.run_pass`,
:class:`pairforge.recipes.base.RunPass`): ``process`` keeps every pair that passes the other
filters and stores its margin; when the build finishes, the window is computed once from every
committed margin and the pairs outside it are dropped (an example left without pairs becomes a
``filter`` reject). The build's ``summary.json`` records ``margin_window_lo``,
``margin_window_hi`` and ``margin_kept_rate``. One rule judges every example, whatever the
chunking or resume; a sharded build fits its own shard's window and ``pairforge merge`` refits
it on all shards.

The helpers above the recipe class are pure (numpy / PIL, no models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, ImageTextScorer, Request, SamplingParams, clip_score, require
from pairforge.recipes.base import BuildContext, Example, Outcome, Reject, RunPass, pair_row, recipe_params
from pairforge.resources import resource_dir
from pairforge.schema import count_image_parts, stable_id, user_message

KINDS = ("focus", "robust")

#: Window ratios of the multi-scale search, relative to the base window (App. C).
WINDOW_RATIOS: tuple[float, ...] = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)

#: The prompt templates, one file each under ``prompts/p2dpo/``; ``{question}`` is replaced.
TEMPLATE_FILES = {"localise": "localise.txt", "enhance_two_images": "enhance_two_images.txt",
                  "enhance_side_by_side": "enhance_side_by_side.txt"}

Box = tuple[float, float, float, float]

# ----------------------------------------------------------------------------- crop search


def window_sums(attention: np.ndarray, n_h: int, n_w: int) -> np.ndarray:
    """Sum of ``attention`` (grid_h, grid_w) over every ``n_h × n_w`` window, shape
    (grid_h − n_h + 1, grid_w − n_w + 1); entry (i, j) is the window whose top-left cell is
    (row i, column j). Computed from the integral image."""
    a = np.asarray(attention, dtype=np.float64)
    gh, gw = a.shape
    if not (1 <= n_h <= gh and 1 <= n_w <= gw):
        raise ValueError(f"window {n_h}x{n_w} does not fit a {gh}x{gw} grid")
    s = np.zeros((gh + 1, gw + 1))
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    return s[n_h:, n_w:] - s[:-n_h, n_w:] - s[n_h:, :-n_w] + s[:-n_h, :-n_w]


def sharpness(sums: np.ndarray, pos: tuple[int, int], area: int) -> float:
    """Sharpness of the window at ``pos`` (row, column) among the windows ``sums`` of one scale:
    (its sum − mean of the sums of its 4-neighbour windows, shifted one cell up, down, left,
    right) / window area in grid cells (P2-DPO App. C). 0 when it has no neighbour (the window
    covers the whole grid): such a scale has no contrast."""
    i, j = pos
    h, w = sums.shape
    nbrs = [sums[a, b] for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
            if 0 <= a < h and 0 <= b < w]
    if not nbrs:
        return 0.0
    return float((sums[i, j] - np.mean(nbrs)) / area)


@dataclass(frozen=True)
class CropChoice:
    """The chosen crop: ``box`` (x0, y0, x1, y1) in whole pixels (end-exclusive, inside
    ``bounds``), the winning ``ratio``, its ``sharpness``, the ``window`` (n_h, n_w) in grid
    cells and its top-left ``cell`` (row, column); the attention ``grid`` shape (grid_h,
    grid_w) and ``sharpness_by_ratio`` for every scale."""

    box: tuple[int, int, int, int]
    ratio: float
    sharpness: float
    window: tuple[int, int]
    cell: tuple[int, int]
    grid: tuple[int, int] = (0, 0)
    sharpness_by_ratio: dict[float, float] = field(default_factory=dict)


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))


def adaptive_crop(attention: np.ndarray, frame_size: tuple[int, int], base: float,
                  ratios: Sequence[float] = WINDOW_RATIOS, bounds: Box | None = None) -> CropChoice:
    """Adaptive multi-scale crop from an attention map (P2-DPO App. C; the authors' code follows
    ViCrop, Zhang et al., "MLLMs Know Where to Look", ICLR 2025).

    ``attention`` (grid_h, grid_w) spans a frame of ``frame_size`` = (W, H) pixels, so a cell is
    W/grid_w × H/grid_h pixels. For each ratio ρ (1.0 to 2.0 by 0.2) the window side is
    ``base``·ρ pixels, i.e. floor(base·ρ / cell) cells per axis (at least 1, at most the grid;
    flooring keeps the window inside the pixel box below); the window with the largest
    attention sum is found and scored by :func:`sharpness`. The sharpest scale wins (the
    smallest ratio on ties). The box is base·ρ pixels per side (at most the bounds), centred on
    the winning window and shifted to lie inside ``bounds`` (default: the frame), in whole
    pixels.

    ``base`` is the base window side in pixels; the recipe sets it to ``base_window`` × the
    image's shorter side (the paper, following ViCrop, uses the vision encoder's input size,
    336 px for LLaVA-1.5, on high-resolution images; on images at or below the encoder's
    resolution that would be the whole image)."""
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim != 2 or att.size == 0:
        raise ValueError(f"attention must be a non-empty 2-D grid, got shape {att.shape}")
    if not np.isfinite(att).all():
        raise ValueError("attention has non-finite values")
    if base <= 0 or not ratios:
        raise ValueError(f"base={base} must be > 0 and ratios non-empty")
    gh, gw = att.shape
    fw, fh = frame_size
    cw, ch = fw / gw, fh / gh
    bx0, by0, bx1, by1 = bounds if bounds is not None else (0, 0, fw, fh)
    best: tuple[float, float, tuple[int, int], tuple[int, int]] | None = None
    by_ratio: dict[float, float] = {}
    for rho in ratios:
        side = base * rho
        n_h = min(max(int(side / ch + 1e-9), 1), gh)
        n_w = min(max(int(side / cw + 1e-9), 1), gw)
        sums = window_sums(att, n_h, n_w)
        cell = np.unravel_index(int(np.argmax(sums)), sums.shape)  # first maximum, row-major
        cell = (int(cell[0]), int(cell[1]))
        s = sharpness(sums, cell, n_h * n_w)
        by_ratio[float(rho)] = s
        if best is None or s > best[0]:
            best = (s, float(rho), (n_h, n_w), cell)
    s, rho, (n_h, n_w), (i, j) = best  # type: ignore[misc]
    bw = min(_round(base * rho), _round(bx1 - bx0))
    bh = min(_round(base * rho), _round(by1 - by0))
    cx, cy = (j + n_w / 2) * cw, (i + n_h / 2) * ch
    x0 = min(max(_round(cx - bw / 2), math.ceil(bx0)), math.floor(bx1) - bw)
    y0 = min(max(_round(cy - bh / 2), math.ceil(by0)), math.floor(by1) - bh)
    return CropChoice((x0, y0, x0 + bw, y0 + bh), rho, s, (n_h, n_w), (i, j), (gh, gw), by_ratio)


# ----------------------------------------------------------------------------- image operations


def mean_color(image: Image.Image) -> tuple[int, int, int]:
    """The image's mean colour (per RGB channel, rounded)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    return tuple(_round(v) for v in arr.reshape(-1, 3).mean(0))  # type: ignore[return-value]


def pad_to_square(image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
    """``image`` centred on a square canvas of its longer side, filled with its mean colour
    (LLaVA-1.5's "pad" preprocessing), and the (x, y) offset of the image in it. A square image
    comes back unchanged. An attention grid over the square spans the whole canvas whatever a
    processor's resize / centre-crop does to non-square images."""
    w, h = image.size
    if w == h:
        return image, (0, 0)
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), mean_color(image))
    off = ((side - w) // 2, (side - h) // 2)
    canvas.paste(image.convert("RGB"), off)
    return canvas, off


def erase(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """Erase(I, box): a copy of ``image`` with ``box`` (x0, y0, x1, y1, end-exclusive pixels)
    filled with the image's mean colour (P2-DPO §4, the degraded input of the rejected answer)."""
    out = image.convert("RGB").copy()
    x0, y0, x1, y1 = (int(v) for v in box)
    out.paste(mean_color(image), (x0, y0, x1, y1))
    return out


def side_by_side(image: Image.Image, crop: Image.Image) -> Image.Image:
    """Composite for single-image models: a canvas of ``image``'s size filled with its mean
    colour, ``image`` fitted into the left half and ``crop`` into the right half (each scaled to
    fit W/2 × H keeping its aspect ratio, vertically centred)."""
    w, h = image.size
    canvas = Image.new("RGB", (w, h), mean_color(image))
    half = w // 2
    for k, part in enumerate((image.convert("RGB"), crop.convert("RGB"))):
        pw, ph = part.size
        scale = min((half if k == 0 else w - half) / pw, h / ph)
        size = (max(1, _round(pw * scale)), max(1, _round(ph * scale)))
        fitted = part.resize(size, Image.BICUBIC)
        x = (0 if k == 0 else half) + ((half if k == 0 else w - half) - size[0]) // 2
        canvas.paste(fitted, (x, (h - size[1]) // 2))
    return canvas


def combine(image: Image.Image, crop: Image.Image, mode: str) -> list[Image.Image]:
    """Combine(I, crop) (P2-DPO §4): ``"two_images"`` → [I, crop] for models that take two
    images; ``"side_by_side"`` → [:func:`side_by_side` composite] for single-image models."""
    if mode == "two_images":
        return [image.convert("RGB"), crop.convert("RGB")]
    if mode == "side_by_side":
        return [side_by_side(image, crop)]
    raise ValueError(f"combine mode {mode!r}; use 'two_images' or 'side_by_side'")


def linear_betas(n_steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> np.ndarray:
    """β_1 … β_T of the linear schedule of DDPM (Ho et al., 2020, §4: T = 1000, β from 1e-4 to
    0.02), as the array ``betas[t − 1] = β_t``."""
    if n_steps < 1 or not 0 < beta_1 <= beta_T < 1:
        raise ValueError("schedule needs n_steps >= 1 and 0 < beta_1 <= beta_T < 1")
    return np.linspace(beta_1, beta_T, n_steps) if n_steps > 1 else np.array([beta_1])


def alpha_bar(t: int, betas: np.ndarray | None = None) -> float:
    """ᾱ_t = Π_{s=1..t} (1 − β_s) of the schedule ``betas`` (default :func:`linear_betas`);
    ᾱ_0 = 1 (no noise)."""
    betas = linear_betas() if betas is None else betas
    if not 0 <= t <= len(betas):
        raise ValueError(f"noise step t={t}: use 0 <= t <= {len(betas)}")
    return float(np.prod(1.0 - betas[:t]))


def diffusion_noise(x: np.ndarray, t: int, eps: np.ndarray, betas: np.ndarray | None = None) -> np.ndarray:
    """Forward diffusion to step t: x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε (DDPM eq. 4), the noisy
    image of P2-DPO's robust pairs (as in VCD, Leng et al., CVPR 2024, whose code uses a sigmoid
    β schedule; we use DDPM's linear one). ``x`` in the [−1, 1] scale."""
    ab = alpha_bar(t, betas)
    return math.sqrt(ab) * x + math.sqrt(1.0 - ab) * eps


def add_noise(image: Image.Image, kind: str, level: float, seed: int) -> Image.Image:
    """I_noise: ``kind="diffusion"`` → :func:`diffusion_noise` at step ``level`` (pixels mapped to
    [−1, 1], back and clipped); ``"gaussian"`` → pixel + σ·ε with σ = ``level`` in [0, 1] pixel
    units, clipped. ε ~ N(0, 1) per pixel and channel from ``numpy.random.default_rng(seed)``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    eps = np.random.default_rng(seed).standard_normal(arr.shape)
    if kind == "diffusion":
        out = (diffusion_noise(2.0 * arr - 1.0, int(level), eps) + 1.0) / 2.0
    elif kind == "gaussian":
        out = arr + float(level) * eps
    else:
        raise ValueError(f"noise {kind!r}; use 'diffusion' or 'gaussian'")
    return Image.fromarray(np.clip(np.floor(out * 255.0 + 0.5), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- weights and filter


def ddw_weights(clip_crop: float, clip_full: float, amplitude: float = 0.2,
                tau: float = 0.1) -> tuple[float, float]:
    """DDW (P2-DPO §4): r = CLIPScore(P, crop) / CLIPScore(P, I), α = amplitude·tanh((r − 1)/τ),
    (w_focus, w_robust) = (0.5 + α, 0.5 − α). With CLIPScore(P, I) = 0, r is 1 when the crop's
    score is 0 too and +∞ (α = amplitude) otherwise."""
    if clip_full > 0:
        r = clip_crop / clip_full
    else:
        r = 1.0 if clip_crop <= 0 else math.inf
    alpha = amplitude * math.tanh((r - 1.0) / tau)
    return 0.5 + alpha, 0.5 - alpha


def margin_reason(margin: float, low: float | None, high: float | None) -> str | None:
    """Why a margin M fails the window [θ_low, θ_high] (P2-DPO App. D: θ_low ≤ M ≤ θ_high),
    or None; a None bound is open; a NaN margin fails."""
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    if lo <= margin <= hi:
        return None
    return f"log-prob margin {margin:.3f} outside [{lo:.3f}, {hi:.3f}]"


def filter_reason(ppl_chosen: float, ppl_rejected: float, margin: float, max_ppl: float = 2.5,
                  margin_low: float = -math.inf, margin_high: float = math.inf) -> str | None:
    """Why a pair is dropped, or None when kept (P2-DPO App. D): max(PPL_w, PPL_l) must be
    < ``max_ppl`` and the margin within [``margin_low``, ``margin_high``]. NaN fails both."""
    worst = max(ppl_chosen, ppl_rejected)
    if not worst < max_ppl:
        return f"max perplexity {worst:.3f} >= {max_ppl}"
    if not margin_low <= margin <= margin_high:
        return f"log-prob margin {margin:.3f} outside [{margin_low}, {margin_high}]"
    return None


def central_interval(values: Sequence[float], coverage: float = 0.95) -> tuple[float, float]:
    """The central ``coverage`` interval of ``values``: the (1 − c)/2 and (1 + c)/2 quantiles
    (numpy's linear interpolation): P2-DPO App. D's margin window [θ_low, θ_high] with c = 0.95
    (the 2.5th and 97.5th percentiles). NaNs are ignored."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        raise PairforgeError("central_interval: no finite margins; build more examples first")
    if not 0 < coverage <= 1:
        raise PairforgeError(f"coverage={coverage}: use a share in (0, 1]")
    lo, hi = np.quantile(v, [(1 - coverage) / 2, (1 + coverage) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class P2DPOParams:
    """Semantic settings of a P2-DPO build (all enter the run identity).

    - ``kinds``: pair kinds to build ("focus", "robust").
    - ``base_window``: base window side as a share of the image's shorter side
      (:func:`adaptive_crop`; windows span 1 to 2 times it). The default 0.4 fits the offline
      world, whose objects are at most 35 of 112 px: on ground-truth maps the crop search
      contains the object in 98.7 % of crops at 0.4, 69 % at 0.33, 43 % at 0.25
      (``scripts/quality_p2dpo.py``, oracle row, 150 validation examples).
    - ``attention_on``: the response whose attention to the image is read: ``"policy"``
      (default; App. B: "the relevance of each patch to the predicted answer"), the policy's
      greedy answer on the localisation prompt and padded image, i.e. the very forward pass the
      map is read from; or ``"answer"``, the example's reference answer (the policy's answer
      when it has none) — it puts the ground truth into the crop, an option for ablations.
      ``attention_layers``: layers averaged (None: all).
    - ``combine``: ``"two_images"`` (models that take two images) or ``"side_by_side"``.
    - ``noise``: ``"gaussian"`` (default, the paper's operator, §4.1.2: pixel + σ·ε with σ =
      ``noise_sigma`` in [0, 1] pixel units) or ``"diffusion"`` (``noise_step`` t of the
      1000-step linear DDPM schedule, as VCD; t = 165 gives ᾱ_t ≈ 0.75). σ is paper silent for
      training; our σ = 0.2 is the level the paper's own stress test singles out as
      "low-to-moderate" noise (§5.2, Figs. 3–4, σ = 0.20). On the shapes world the tiny VLM
      needs about that much: of 60 examples, σ = 0.1 gives 10 non-identical robust pairs and
      none with a correct chosen and a wrong rejected answer, σ = 0.2 gives 18 (3), σ = 0.3
      31 (11) (benchmarks/fidelity.md).
    - ``lam``, ``beta``: contrastive amplification (λ = 0.1, App. F; β = 0.1 of V_head).
    - ``max_ppl``: τ_ppl = 2.5 (App. D). The margin M = ℓ̄(chosen) − ℓ̄(rejected), mean token
      log-probs under the policy on the pair's DPO input (the plain question with the example's
      image for focus pairs, the noisy image for robust pairs): App. D writes
      log p_ref(y_w) − log p_ref(y_l) and its Table 5 (mean 0.017, std 0.094, PPL ≈ 1.7) is on
      the per-token scale, so means.
    - ``margin_window``: ``"central"`` (default, App. D's rule): [θ_low, θ_high] = the
      (1 − c)/2 and (1 + c)/2 quantiles of the run's own margins, c = ``margin_coverage`` =
      0.95, fitted when the build finishes (module docstring); ``"fixed"``: [``margin_low``,
      ``margin_high``], default [−0.174, 0.208], the paper's numbers on its own data (``None``
      opens a side).
    - ``ddw_amplitude``, ``ddw_tau``: DDW's 0.2 and 0.1.
    - ``temperature`` (0 = greedy), ``max_new_tokens``: decoding of every answer.
    """

    kinds: tuple[str, ...] = KINDS
    base_window: float = 0.4
    attention_on: str = "policy"
    attention_layers: tuple[int, ...] | None = None
    combine: str = "two_images"
    noise: str = "gaussian"
    noise_step: int = 165
    noise_sigma: float = 0.2
    lam: float = 0.1
    beta: float = 0.1
    max_ppl: float = 2.5
    margin_window: str = "central"
    margin_coverage: float = 0.95
    margin_low: float = -0.174
    margin_high: float = 0.208
    ddw_amplitude: float = 0.2
    ddw_tau: float = 0.1
    temperature: float = 0.0
    max_new_tokens: int = 64

    def __post_init__(self):
        def bad(name: str, why: str) -> PairforgeError:
            return PairforgeError(f"p2dpo param '{name}'={getattr(self, name)!r}: {why}")

        kinds = self.kinds
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise bad("kinds", f"use a non-empty list of distinct kinds from {list(KINDS)}")
        if not 0 < self.base_window <= 1:
            raise bad("base_window", "use a share of the shorter image side in (0, 1]")
        if self.attention_on not in ("answer", "policy"):
            raise bad("attention_on", "use 'answer' or 'policy'")
        if self.combine not in ("two_images", "side_by_side"):
            raise bad("combine", "use 'two_images' (models that take two images) or 'side_by_side'")
        if self.noise not in ("diffusion", "gaussian"):
            raise bad("noise", "use 'diffusion' or 'gaussian'")
        if not 1 <= self.noise_step <= 1000:
            raise bad("noise_step", "use a step t in 1..1000 of the linear schedule")
        if not self.noise_sigma > 0:
            raise bad("noise_sigma", "use sigma > 0 (pixel values in [0, 1])")
        if not self.lam >= 0:
            raise bad("lam", "contrastive amplification needs lam >= 0")
        if not 0 <= self.beta <= 1:
            raise bad("beta", "V_head needs 0 <= beta <= 1")
        if not self.max_ppl > 1:
            raise bad("max_ppl", "perplexity is >= 1; use a bound > 1")
        if self.margin_window not in ("central", "fixed"):
            raise bad("margin_window", "use 'central' (the run's own central share) or 'fixed' "
                                       "(margin_low, margin_high)")
        if not 0 < self.margin_coverage <= 1:
            raise bad("margin_coverage", "use a share in (0, 1], e.g. 0.95")
        if not self.margin_low <= self.margin_high:
            raise bad("margin_low", f"must be <= margin_high={self.margin_high}")
        if not self.temperature >= 0:
            raise bad("temperature", "use temperature >= 0 (0 = greedy)")
        if not self.max_new_tokens >= 1:
            raise bad("max_new_tokens", "use at least 1")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> "P2DPOParams":
        """Params from a mapping (Python values, or ``--param k=v`` strings: ``kinds=focus,robust``,
        ``attention_layers=2,3``, ``margin_low=none`` for an open side)."""
        kw = dict(params)
        for key in ("kinds", "attention_layers"):
            value = kw.get(key)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                if key == "attention_layers":
                    value = None if value in ([], ["none"]) else value
            if value is not None:
                value = (value,) if isinstance(value, (str, int)) else tuple(value)
                if key == "attention_layers":
                    try:
                        value = tuple(int(v) for v in value)
                    except (TypeError, ValueError):
                        raise PairforgeError(f"p2dpo param 'attention_layers'={params[key]!r}: use "
                                             f"layer indices, e.g. 2,3 (or none for all)") from None
            if key in kw:
                kw[key] = value
        for key, open_side in (("margin_low", -math.inf), ("margin_high", math.inf)):
            if key in kw and (kw[key] is None or str(kw[key]).lower() == "none"):
                kw[key] = open_side
        for f in fields(cls):
            number = isinstance(f.default, (int, float)) and not isinstance(f.default, bool)
            value = kw.get(f.name, 0.0)
            if number and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
                raise PairforgeError(f"p2dpo param '{f.name}'={value!r}: expected a number")
        return recipe_params(cls, kw, "p2dpo")


@dataclass
class _Pair:
    """One candidate pair of an example: texts, own-input perplexities, margin."""

    kind: str
    chosen: str = ""
    rejected: str = ""
    ppl_chosen: float = math.nan
    ppl_rejected: float = math.nan
    margin: float = math.nan


@dataclass
class _Work:
    """Everything the recipe computes for one example before filtering."""

    example: Example
    image: Image.Image
    question: str
    choice: CropChoice | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    crop: Image.Image | None = None
    degraded: Image.Image | None = None
    noisy: Image.Image | None = None
    enhanced: tuple[list[dict], list[Image.Image]] = ([], [])  # (P_enh messages, Combine(I, crop))
    attention_response: str = ""
    attention_from_policy: bool = False
    ddw: tuple[float, float] = (0.5, 0.5)
    pairs: dict[str, _Pair] = field(default_factory=dict)


def load_templates(folder: Path | None = None) -> dict[str, str]:
    """The P2-DPO prompt templates by name (files under ``prompts/p2dpo/``, or ``folder``)."""
    folder = resource_dir("prompts") / "p2dpo" if folder is None else folder
    out = {}
    for name, file in TEMPLATE_FILES.items():
        path = folder / file
        if not path.is_file():
            raise PairforgeError(f"{path}: P2-DPO prompt template missing; restore it from the "
                                 f"pairforge repository (prompts/p2dpo/)")
        text = path.read_text(encoding="utf-8").strip()
        if "{question}" not in text:
            raise PairforgeError(f"{path}: template has no '{{question}}' placeholder; add one")
        out[name] = text
    return out


def fill(template: str, question: str) -> str:
    """A template with ``{question}`` replaced (plain replacement: braces in questions stay)."""
    return template.replace("{question}", question.strip())


class P2DPO:
    """The P2-DPO recipe (see the module docstring). Roles: ``policy`` (a VLM with attention
    maps and contrastive decoding) and ``clip`` (an :class:`~pairforge.models.ImageTextScorer`
    for DDW). One example yields up to one row per kind in ``kinds``; kinds dropped by the
    pass-one filters (empty, identical, perplexity) are counted in the outcome's stats, and an
    example with no row left is a :class:`~pairforge.recipes.Reject` naming each kind's reason.
    The margin window is pass two (:meth:`run_pass`), applied when the build finishes."""

    name: ClassVar[str] = "p2dpo"
    groups: ClassVar[tuple[str, ...]] = ("p2dpo",)
    roles: ClassVar[tuple[tuple[str, bool, str | None], ...]] = (
        ("policy", True, "tiny-vlm"), ("clip", True, "tiny-clip"))

    def __init__(self, params: P2DPOParams | None = None, templates: Mapping[str, str] | None = None):
        self.p = params or P2DPOParams()
        self._templates = dict(templates) if templates is not None else load_templates()

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "P2DPO":
        return cls(P2DPOParams.from_mapping(params))

    def params(self) -> dict[str, Any]:
        d = asdict(self.p)
        d["kinds"] = list(self.p.kinds)
        d["attention_layers"] = None if self.p.attention_layers is None else list(self.p.attention_layers)
        for key in ("margin_low", "margin_high"):  # an open side is None (JSON has no infinity)
            d[key] = None if math.isinf(d[key]) else d[key]
        return d

    @property
    def _enhance_name(self) -> str:
        return "enhance_" + self.p.combine

    def templates(self) -> dict[str, str]:
        """The templates this configuration sends: localisation always (the crop feeds DDW);
        the enhancement prompt of the ``combine`` mode when focus pairs are built."""
        names = ["localise"] + ([self._enhance_name] if "focus" in self.p.kinds else [])
        return {f"p2dpo/{TEMPLATE_FILES[n]}": self._templates[n] for n in names}

    def state_dict(self) -> dict[str, Any]:
        return {}  # no cross-example state: the margin window is fitted in pass two (run_pass)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def check(self, ctx: BuildContext) -> None:
        policy, clip = ctx.models.get("policy"), ctx.models.get("clip")
        if policy is None:
            raise PairforgeError("p2dpo needs a policy model (role 'policy'), e.g. tiny-vlm or hf:PATH")
        needed = [Capability.GENERATE, Capability.SCORE, Capability.IMAGES, Capability.ATTENTION]
        if "robust" in self.p.kinds:
            needed.append(Capability.CONTRASTIVE)
        require(policy, *needed, purpose="P2-DPO (attention crops, on-policy answers)")
        if clip is None or not isinstance(clip, ImageTextScorer):
            raise PairforgeError("p2dpo needs a CLIP scorer (role 'clip', e.g. tiny-clip or "
                                 "clip:PATH) for the DDW weights")

    # ------------------------------------------------------------------------- building

    def process(self, examples: Sequence[Example], ctx: BuildContext) -> list[Outcome]:
        """One outcome per example, in order (see the class docstring)."""
        works, outcomes = self._prepare(examples)
        done = self._build(list(works.values()), ctx)
        for k, w in zip(works, done):
            outcomes[k] = self._outcome(w, ctx)
        return outcomes  # type: ignore[return-value]

    def run_pass(self) -> RunPass:
        """Pass two (App. D's margin filter on the whole run): ``fit`` the window [θ_low, θ_high]
        on every kept pair's ``p2dpo_margin`` — :func:`central_interval` of the run's margins
        (``margin_window="central"``) or the fixed bounds — and ``judge`` each pair against it.
        The fit reports ``margin_window_lo`` / ``margin_window_hi`` (None = open), the share of
        margins inside (``margin_kept_rate``), the rule and the number of margins."""
        p = self.p

        def fit(values: Mapping[str, list]) -> dict[str, Any]:
            margins = [float(m) for m in values["p2dpo_margin"] if m is not None and math.isfinite(m)]
            if p.margin_window == "central":
                lo, hi = central_interval(margins, p.margin_coverage) if margins else (None, None)
                rule = f"central {p.margin_coverage:g} of the run's margins"
            else:
                lo = None if math.isinf(p.margin_low) else p.margin_low
                hi = None if math.isinf(p.margin_high) else p.margin_high
                rule = "fixed"
            kept = sum(margin_reason(m, lo, hi) is None for m in margins)
            return {"margin_window_rule": rule, "margin_window_lo": lo, "margin_window_hi": hi,
                    "margin_kept_rate": kept / len(margins) if margins else None,
                    "margin_window_n": len(margins)}

        def judge(row: Mapping[str, Any], fitted: Mapping[str, Any]) -> tuple[str, dict[str, float]] | None:
            m = row["p2dpo_margin"]
            why = margin_reason(math.nan if m is None else float(m), fitted["margin_window_lo"],
                                fitted["margin_window_hi"])
            if why is None:
                return None
            kind = row["p2dpo_kind"]
            return (f"{kind}: {why} ({fitted['margin_window_rule']})",
                    {f"{kind}_kept": -1, f"{kind}_dropped_margin": 1})

        return RunPass(columns=("p2dpo_margin", "p2dpo_kind"), group="p2dpo_example", fit=fit, judge=judge)

    def filter_rows(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list, dict[str, Any]]:
        """:meth:`run_pass` on in-memory rows (pass two without a build folder, e.g. the quality
        script): the rows inside the window and the fit."""
        rp = self.run_pass()
        fitted = rp.fit({c: [r[c] for r in rows] for c in rp.columns})
        return [r for r in rows if rp.judge(r, fitted) is None], fitted

    def _prepare(self, examples: Sequence[Example]) -> tuple[dict[int, _Work], list[Outcome | None]]:
        """Usable examples (one image, in the last user turn, and a question) as work items;
        the others get their reject now."""
        works: dict[int, _Work] = {}
        outcomes: list[Outcome | None] = [None] * len(examples)
        for k, ex in enumerate(examples):
            why = _unusable(ex)
            if why:
                outcomes[k] = Outcome(reject=Reject("filter", why))
            else:
                works[k] = _Work(ex, ex.images[0].convert("RGB"), ex.question)
        return works, outcomes

    def _build(self, works: list[_Work], ctx: BuildContext) -> list[_Work]:
        """Crop, degrade, generate, score and weight every work item (batched model calls)."""
        if not works:
            return works
        policy, clip = ctx.models["policy"], ctx.models["clip"]
        p = self.p
        sampling = SamplingParams(temperature=p.temperature, max_new_tokens=p.max_new_tokens, seed=ctx.seed)
        plain = [Request(_turn(w.example, w.question, 1), [w.image], f"{w.example.id}/plain") for w in works]

        # 1. attention map → crop box, crop, degraded and noisy images
        need = [i for i, w in enumerate(works) if p.attention_on == "policy" or not w.example.answer.strip()]
        for w in works:
            w.attention_response = w.example.answer
        answers = self.predicted_answers(policy, [(works[i].example, works[i].image) for i in need], ctx.seed)
        for i, text in zip(need, answers):
            works[i].attention_response = text
            works[i].attention_from_policy = True
        for w in works:
            w.choice, w.box = self.focus_crop(policy, w.example, w.image, w.attention_response)
            w.crop = w.image.crop(w.box)
            w.degraded = erase(w.image, w.box)
            level = p.noise_step if p.noise == "diffusion" else p.noise_sigma
            w.noisy = add_noise(w.image, p.noise, level, ctx.seed_for(w.example, "p2dpo-noise"))

        # 2. answers: focus chosen / rejected and robust rejected in one generate call
        reqs: list[Request] = []
        slots: list[tuple[_Work, str, str]] = []
        enhance = self._templates.get(self._enhance_name, "")
        for w, clean in zip(works, plain):
            key = w.example.id
            if "focus" in p.kinds:
                imgs = combine(w.image, w.crop, p.combine)
                w.enhanced = (_turn(w.example, fill(enhance, w.question), len(imgs)), imgs)
                reqs.append(Request(w.enhanced[0], imgs, f"{key}/focus-chosen"))
                reqs.append(Request(clean.messages, [w.degraded], f"{key}/focus-rejected"))
                slots += [(w, "focus", "chosen"), (w, "focus", "rejected")]
            if "robust" in p.kinds:
                reqs.append(Request(clean.messages, [w.noisy], f"{key}/robust-rejected"))
                slots.append((w, "robust", "rejected"))
            w.pairs = {k: _Pair(k) for k in p.kinds}
        completions = [c[0] for c in policy.generate(reqs, 1, sampling)]
        if "robust" in p.kinds:
            contrastive = policy.generate_contrastive(
                [Request(r.messages, r.images, f"{w.example.id}/robust-chosen") for r, w in zip(plain, works)],
                [[w.noisy] for w in works], lam=p.lam, beta=p.beta, sampling=sampling)
            for w, c in zip(works, contrastive):
                completions.append(c)
                slots.append((w, "robust", "chosen"))
        for (w, kind, side), c in zip(slots, completions):
            pair = w.pairs[kind]
            setattr(pair, side, c.text.strip())
            setattr(pair, f"ppl_{side}", c.perplexity)  # under the policy, on its own input

        # 3. margins on each pair's DPO input, the plain question with the example's image
        #    (focus) or the noisy image (robust), as the trainer reads them: one scoring call
        score_reqs, score_texts, score_slots = [], [], []
        for w, clean in zip(works, plain):
            for kind, pair in w.pairs.items():
                r = Request(clean.messages, [w.noisy], f"{w.example.id}/noisy") if kind == "robust" else clean
                if pair.chosen and pair.rejected:
                    score_reqs += [r, r]
                    score_texts += [pair.chosen, pair.rejected]
                    score_slots.append(pair)
        if score_reqs:
            scored = policy.score(score_reqs, score_texts)
            for k, pair in enumerate(score_slots):
                pair.margin = scored[2 * k].mean_logprob - scored[2 * k + 1].mean_logprob

        # 4. DDW from CLIPScore(P, crop) / CLIPScore(P, I)
        cos = clip.cosine([im for w in works for im in (w.crop, w.image)],
                          [w.question for w in works for _ in range(2)])
        for k, w in enumerate(works):
            w.ddw = ddw_weights(clip_score(cos[2 * k]), clip_score(cos[2 * k + 1]),
                                p.ddw_amplitude, p.ddw_tau)
        return works

    def localise_request(self, example: Example, image: Image.Image) -> tuple[Request, tuple[int, int]]:
        """The localisation prompt (App. B) around ``example``'s question with ``image`` padded to
        a square (so the patch grid spans all of it), and the image's offset in the square."""
        square, offset = pad_to_square(image)
        req = Request(_turn(example, fill(self._templates["localise"], example.question), 1), [square],
                      f"{example.id}/localise")
        return req, offset

    def predicted_answers(self, policy: Any, items: Sequence[tuple[Example, Image.Image]],
                          seed: int) -> list[str]:
        """The policy's greedy answers on the localisation requests of ``items`` (example, image):
        the "predicted answer" whose attention map is read (App. B), from the same input.
        A silent policy's answer is replaced by the question (attention needs a response)."""
        if not items:
            return []
        greedy = SamplingParams(temperature=0, max_new_tokens=self.p.max_new_tokens, seed=seed)
        got = policy.generate([self.localise_request(ex, im)[0] for ex, im in items], 1, greedy)
        return [c[0].text.strip() or ex.question for c, (ex, _) in zip(got, items)]

    def focus_crop(self, policy: Any, example: Example, image: Image.Image,
                   response: str) -> tuple[CropChoice, tuple[int, int, int, int]]:
        """The crop of ``image`` for ``example``'s question: the policy's attention from
        ``response`` to the image on :meth:`localise_request`, then :func:`adaptive_crop` with
        the base window ``base_window`` × the shorter side. Returns the choice (in padded
        coordinates) and the box in ``image`` pixels."""
        req, (ox, oy) = self.localise_request(example, image)
        square = req.images[0]
        att = policy.attention_map(req, response, layers=self.p.attention_layers)
        width, height = image.size
        choice = adaptive_crop(att, square.size, self.p.base_window * min(width, height),
                               bounds=(ox, oy, ox + width, oy + height))
        x0, y0, x1, y1 = choice.box
        return choice, (x0 - ox, y0 - oy, x1 - ox, y1 - oy)

    def _drop_reason(self, pair: _Pair) -> tuple[str, str] | None:
        """(tag, reason) why ``pair`` is dropped in pass one, or None: an empty answer, identical
        answers (no preference to learn), the perplexity bound or a non-finite margin. The margin
        window is pass two (:meth:`run_pass`)."""
        p = self.p
        if not pair.chosen or not pair.rejected:
            return "empty", "the policy returned an empty answer"
        if pair.chosen == pair.rejected:
            return "identical", "chosen and rejected answers are identical"
        why = filter_reason(pair.ppl_chosen, pair.ppl_rejected, pair.margin, p.max_ppl)
        if why is None:
            return None
        return ("ppl" if why.startswith("max perplexity") else "margin"), why

    def _outcome(self, w: _Work, ctx: BuildContext) -> Outcome:
        """Filter each candidate pair of ``w`` (pass one) and make the rows that pass."""
        rows, reasons, stats = [], [], {}
        for kind, pair in w.pairs.items():
            dropped = self._drop_reason(pair)
            if dropped:
                tag, why = dropped
                reasons.append(f"{kind}: {why}")
                stats[f"{kind}_dropped_{tag}"] = 1
                continue
            stats[f"{kind}_kept"] = 1
            focus = kind == "focus"
            row = pair_row(self, w.example, ctx, chosen=pair.chosen, rejected=pair.rejected,
                           p2dpo_kind=kind, p2dpo_example=w.example.id, p2dpo_margin=float(pair.margin),
                           crop_box=[float(v) for v in w.box],
                           ddw_focus=float(w.ddw[0]), ddw_robust=float(w.ddw[1]), crop_image=w.crop,
                           degraded_image=w.degraded if focus else None,
                           noisy_image=w.noisy if not focus else None,
                           enhanced_prompt=w.enhanced[0] if focus else None,
                           enhanced_images=w.enhanced[1] if focus else None)
            # one example may give a focus and a robust pair with the same texts: the kind is in the id
            row["id"] = stable_id(self.name, w.example.id, kind, pair.chosen, pair.rejected)
            rows.append(row)
        if w.attention_from_policy:
            stats["attention_on_policy_answer"] = 1
        if not rows:
            return Outcome(reject=Reject("filter", "; ".join(reasons)), stats=stats)
        return Outcome(rows=rows, stats=stats)


#: Smallest image side and largest side ratio P2-DPO takes: its crops of thinner images have
#: a side of 0 pixels once a processor resizes them (a ZeroDivisionError inside transformers).
MIN_IMAGE_SIDE, MAX_ASPECT = 8, 16


def _unusable(ex: Example) -> str | None:
    """Why ``ex`` cannot yield P2-DPO pairs, or None."""
    if len(ex.images) != 1:
        return f"P2-DPO needs exactly one image per example, this one has {len(ex.images)}"
    w, h = ex.images[0].size
    if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        return (f"the image is {w}x{h} pixels; P2-DPO crops need sides of at least "
                f"{MIN_IMAGE_SIDE} pixels and an aspect ratio of at most {MAX_ASPECT}:1")
    users = [m for m in ex.prompt_messages if m.get("role") == "user"]
    if not users or count_image_parts([users[-1]]) != 1 or count_image_parts(ex.prompt_messages) != 1:
        return "the image must be referred to once, in the last user message"
    if not ex.question.strip():
        return "the last user message has no question text"
    return None


def _turn(ex: Example, text: str, n_images: int) -> list[dict]:
    """The example's prompt with its last user message replaced by ``n_images`` image parts
    and ``text`` (earlier messages, e.g. a system prompt, kept)."""
    msgs = list(ex.prompt_messages)
    last = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
    return msgs[:last] + [user_message(text, n_images)] + msgs[last + 1:]
