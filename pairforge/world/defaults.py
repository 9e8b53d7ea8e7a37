"""One call for the embedded defaults: the world's data and its two tiny models."""

from __future__ import annotations

from typing import Any

from pairforge.schema import derive_seed
from pairforge.world.scenes import WORLD_NAME, Scene, sample_scene


def scenes(n: int, seed: int = 0, **kw: Any) -> list[Scene]:
    """``n`` scenes drawn deterministically from ``seed`` (``kw`` goes to
    :func:`~pairforge.world.sample_scene`: width, height, n_objects, with_word)."""
    return [sample_scene(derive_seed(WORLD_NAME, "scenes", seed, i), **kw) for i in range(n)]


def default_vlm(**kw: Any):
    """The shipped tiny LLaVA as ``(model, processor)`` (see
    :func:`pairforge.world.models.load_tiny_vlm`); ``hf:``-style use goes through
    ``pairforge.models.load_model("tiny-vlm")``."""
    from pairforge.world.models import load_tiny_vlm

    return load_tiny_vlm(**kw)


def default_clip(**kw: Any):
    """The shipped tiny CLIP as ``(model, processor)`` (see
    :func:`pairforge.world.models.load_tiny_clip`)."""
    from pairforge.world.models import load_tiny_clip

    return load_tiny_clip(**kw)
