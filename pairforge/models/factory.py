"""One entry point from a model spec string to a loaded model, by backend.

Backends import lazily (torch, transformers, openai, vllm and open_clip load only when a spec
names them), so the CLI and pure logic stay light."""

from __future__ import annotations

from typing import Any

from pairforge.errors import PairforgeError
from pairforge.models.spec import ModelSpec, parse_model_spec

#: Embedded defaults by role.
DEFAULTS = {"policy": "tiny-vlm", "clip": "tiny-clip", "editor": "smollm2", "judge": "smollm2",
            "scorer": "tiny-vlm"}


def load_model(spec: str | ModelSpec | None, *, role: str = "policy", **kw: Any) -> Any:
    """Load the model a spec names: a :class:`~pairforge.models.VLM` for ``hf:`` / ``vllm:`` /
    ``openai:`` / ``tiny-vlm`` / ``smollm2``, an :class:`~pairforge.models.ImageTextScorer`
    for ``clip:`` / ``open_clip:`` / ``tiny-clip``. ``None`` gives the role's embedded default
    (:data:`DEFAULTS`). ``kw`` goes to the backend's constructor (device, dtype, batch_size)."""
    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec, default=DEFAULTS.get(role, "tiny-vlm"))
    backend = spec.backend
    if backend == "embedded":
        backend = "clip" if spec.name == "tiny-clip" else "hf"
    if backend == "hf":
        from pairforge.models.hf import HFModel

        return HFModel(spec, **kw)
    if backend in ("clip", "open_clip"):
        from pairforge.models.clip import load_clip_scorer

        return load_clip_scorer(spec, **kw)
    if backend == "openai":
        from pairforge.models.openai_compat import OpenAIModel
        from pairforge.models.spec import openai_options

        return OpenAIModel(spec, **{**openai_options(spec), **kw})
    if backend == "vllm":
        from pairforge.models.vllm import VLLMModel

        return VLLMModel(spec, **kw)
    raise PairforgeError(f"model spec '{spec}': no loader for backend '{spec.backend}'")  # pragma: no cover
