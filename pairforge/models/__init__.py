"""Models behind one protocol: policy VLMs (hf | vllm | openai), CLIP scorers, LLM editors."""

from pairforge.models.base import (
    VLM,
    Capability,
    Completion,
    Request,
    SamplingParams,
    ImageTextScorer,
    ScoredResponse,
    clip_score,
    require,
)
from pairforge.models.factory import DEFAULTS, load_model
from pairforge.models.spec import ModelSpec, parse_model_spec

__all__ = ["DEFAULTS", "VLM", "Capability", "Completion", "ImageTextScorer", "ModelSpec", "Request", "SamplingParams",
           "ScoredResponse", "clip_score", "load_model", "parse_model_spec", "require"]
