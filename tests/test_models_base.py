"""Models protocol: spec parsing, log-prob aggregates with hand-computed values, capability checks."""

from __future__ import annotations

import math

import pytest

from pairforge.errors import PairforgeError
from pairforge.models import Capability, ModelSpec, SamplingParams, ScoredResponse, parse_model_spec, require


@pytest.mark.parametrize("spec, want", [
    (None, ModelSpec("embedded", "tiny-vlm")),
    ("default", ModelSpec("embedded", "tiny-vlm")),
    ("smollm2", ModelSpec("embedded", "smollm2")),
    ("hf:llava-hf/llava-1.5-7b-hf", ModelSpec("hf", "llava-hf/llava-1.5-7b-hf")),
    ("hf:Qwen/Qwen2.5-VL-3B-Instruct@a1b2c3", ModelSpec("hf", "Qwen/Qwen2.5-VL-3B-Instruct", "a1b2c3")),
    ("llava-hf/llava-1.5-7b-hf", ModelSpec("hf", "llava-hf/llava-1.5-7b-hf")),
    ("/models/tiny", ModelSpec("hf", "/models/tiny")),
    ("vllm:llava-hf/llava-1.5-7b-hf", ModelSpec("vllm", "llava-hf/llava-1.5-7b-hf")),
    ("openai:gpt-4o-mini@https://api.example.com/v1/", ModelSpec("openai", "gpt-4o-mini", base_url="https://api.example.com/v1")),
    ("openai:org/model@name@http://127.0.0.1:8000/v1", ModelSpec("openai", "org/model@name", base_url="http://127.0.0.1:8000/v1")),
    ("open_clip:ViT-B-32/laion2b_s34b_b79k", ModelSpec("open_clip", "ViT-B-32/laion2b_s34b_b79k")),
    ("clip:/ckpt/clip", ModelSpec("clip", "/ckpt/clip")),
])
def test_parse_model_spec(spec, want):
    got = parse_model_spec(spec)
    assert got == want
    assert parse_model_spec(str(got)) == got  # str() round-trips


@pytest.mark.parametrize("spec, needle", [
    ("openai:gpt-4o", "openai:MODEL@BASE_URL"),
    ("openai:gpt-4o@ftp://x", "openai:MODEL@BASE_URL"),
    ("open_clip:ViT-B-32", "ARCH/PRETRAINED"),
    ("hf:", "names no model"),
    ("hf:x@", "empty revision"),
])
def test_bad_specs_are_one_line(spec, needle):
    with pytest.raises(PairforgeError, match=needle) as e:
        parse_model_spec(spec)
    assert "\n" not in str(e.value)


def test_scored_response_aggregates_hand_computed():
    # text "Red. Blue." tokens: "Red" "." " Blue" "."
    r = ScoredResponse("Red. Blue.", [-1.0, -0.5, -2.0, -0.5], [(0, 3), (3, 4), (4, 9), (9, 10)])
    assert r.n_tokens == 4
    assert r.sum_logprob == pytest.approx(-4.0)
    assert r.mean_logprob == pytest.approx(-1.0)
    assert r.perplexity == pytest.approx(math.e)
    # sentence spans [0,4) and [4,10) partition the tokens; the leading space goes with "Blue"
    assert r.span_logprobs(0, 4) == [-1.0, -0.5]
    assert r.span_logprobs(4, 10) == [-2.0, -0.5]
    assert math.isnan(ScoredResponse("", []).mean_logprob)
    with pytest.raises(PairforgeError, match="offsets"):
        ScoredResponse("x", [-1.0]).span_logprobs(0, 1)


def test_sampling_params_checks():
    assert SamplingParams(temperature=0).greedy
    for kw in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(PairforgeError):
            SamplingParams(**kw)


class _TextOnly:
    name = "hf:smollm2"
    revision = ""
    capabilities = frozenset({Capability.GENERATE, Capability.SCORE})


def test_require_names_missing_capability_and_alternative():
    require(_TextOnly(), Capability.SCORE, purpose="audit --scorer")
    with pytest.raises(PairforgeError) as e:
        require(_TextOnly(), Capability.SCORE, Capability.ATTENTION, purpose="P2-DPO focus pairs")
    msg = str(e.value)
    assert "P2-DPO focus pairs needs 'attention'" in msg and "hf:smollm2" in msg and "use an hf: model" in msg
