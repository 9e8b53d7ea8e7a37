"""Models behind one protocol: policy VLMs (hf | vllm | openai), CLIP scorers, LLM editors."""

from pairforge.models.base import (
    VLM,
    Capability,
    Completion,
    Request,
    SamplingParams,
    ScoredResponse,
    require,
)
from pairforge.models.spec import ModelSpec, parse_model_spec

__all__ = ["VLM", "Capability", "Completion", "ModelSpec", "Request", "SamplingParams",
           "ScoredResponse", "parse_model_spec", "require"]
