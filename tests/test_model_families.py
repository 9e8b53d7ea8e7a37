"""The VLM families users bring, each as a tiny random model built offline from its real config,
model, processor and image processor classes (tests/tiny_families.py), run through HFModel:

- chat template: the rendered prompt puts the images where the family's template does;
- generate: greedy equals the model's own ``generate`` (tokens and log-probs);
- score: equals one unbatched forward over prompt + response; batched equals one at a time;
  offsets exact;
- attention maps: a patch grid where the family has one, else a one-line capability error;
- ``pairforge train --loss dpo``: one real optimizer step;
- TRL's ``DPOTrainer``: one step on a pairforge build (tests/test_trl_client.py's setting).

The README's family table cites these tests. Seconds per family (one thread).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import FAMILIES

from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, Request, SamplingParams
from pairforge.models.hf import HFModel

#: Families with one patch grid per image (attention maps defined), and the grid.
GRIDS = {"llava": (4, 4), "qwen2_vl": (5, 6), "qwen2_5_vl": (5, 6), "gemma3": (2, 2), "paligemma": (4, 4)}
#: Families whose processor takes several images in one prompt (PaliGemma: one image per prompt here).
MULTI_IMAGE = set(FAMILIES) - {"paligemma"}

#: The rendered two-image prompt "left <image> right <image>" per family: where the images go.
TWO_IMAGE_PROMPTS = {
    "llava": "USER: left<image> right<image>  ASSISTANT:",
    "llava_next": "[INST] <image>\n<image>\nleftright [/INST]",
    "llava_onevision": "<|im_start|>user <image><image>\nleft\nright<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_vl": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nleft"
                 "<|vision_start|><|image_pad|><|vision_end|>right<|vision_start|><|image_pad|><|vision_end|>"
                 "<|im_end|>\n<|im_start|>assistant\n"),
    "idefics3": "<|im_start|>User: left<image>right<image><end_of_utterance>\nAssistant:",
    "gemma3": "<bos><start_of_turn>user\nleft<start_of_image>right<start_of_image><end_of_turn>\n<start_of_turn>model\n",
}
TWO_IMAGE_PROMPTS["qwen2_5_vl"] = TWO_IMAGE_PROMPTS["qwen2_vl"]


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def _user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                        for p in parts]}


def _requests(family: str) -> tuple[list[Request], list[str]]:
    """Prompts of different lengths and image sizes; two pairs share a prompt (packing path)."""
    reqs = [Request([_user(None, "what color is the circle ?")], [_image(1)], id="r1"),
            Request([_user(None, "what color is the circle ?")], [_image(1)], id="r1b"),
            Request([_user(None, "how many square are there in the image ?")], [_image(2, (32, 56))], id="r2"),
            Request([_user(None, "is there a red triangle ?")], [_image(3, (36, 36))], id="r3")]
    resps = ["the circle is red .", "blue", "there are two square", "yes , there is a red triangle ."]
    if family in MULTI_IMAGE:
        reqs.append(Request([_user("left", None, "right", None)], [_image(4), _image(5, (48, 40))], id="r4"))
        resps.append("the left one is large")
    return reqs, resps


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in FAMILIES.items()}


_MODELS: dict[str, HFModel] = {}


def _model(dirs, family: str) -> HFModel:
    if family not in _MODELS:
        _MODELS[family] = HFModel(f"hf:{dirs[family]}", device="cpu", progress=False, batch_size=4)
    return _MODELS[family]


def _encode(m: HFModel, request: Request) -> dict:
    """The processor's own encoding of the rendered prompt (labels dropped)."""
    text = m.processor.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
    bos = m.tokenizer.bos_token
    enc = m.processor(text=[text], images=[list(request.images)], return_tensors="pt",
                      add_special_tokens=not (bos and bos in text))
    return {k: v for k, v in enc.items() if k != "labels"}


def _naive_logprobs(m: HFModel, request: Request, response: str) -> list[float]:
    """One unbatched forward over prompt + response through the model's own ``forward``; a
    per-token input (token types) is extended as the model's ``generate`` extends it."""
    enc = _encode(m, request)
    resp = m.tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"], torch.tensor([resp])], dim=1)
    extra = {}
    for k, v in enc.items():
        if k in ("input_ids", "attention_mask"):
            continue
        if v.dim() == 2 and v.shape == enc["input_ids"].shape:
            fill = 1 if (k == "token_type_ids" and m.model_type == "paligemma") else 0
            v = torch.cat([v, v.new_full((1, len(resp)), fill)], dim=1)
        extra[k] = v
    with torch.no_grad():
        logits = m.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    p = enc["input_ids"].shape[1]
    lp = torch.log_softmax(logits[p - 1:-1].double(), dim=-1)
    return lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1).tolist()


FAMILY_NAMES = list(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chat_template_puts_images_where_the_family_does(dirs, family):
    m = _model(dirs, family)
    assert m.is_vlm and Capability.IMAGES in m.capabilities and not m.trust_remote_code
    if family in TWO_IMAGE_PROMPTS:
        req = Request([_user("left", None, "right", None)], [_image(4), _image(5)])
        assert m._render([req], drop_images=False)[0].text == TWO_IMAGE_PROMPTS[family]
    else:  # PaliGemma: images, BOS, prompt, newline
        req = Request([_user(None, "what color ?")], [_image(4)])
        assert m._render([req], drop_images=False)[0].text == "<image><bos>what color ?\n"
    enc = _encode(m, req)  # the processor expands every placeholder into the model's image tokens
    image_id = m.model.config.image_token_id
    assert (enc["input_ids"] == image_id).sum() > len(req.images)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_equals_the_models_own_generate(dirs, family):
    m = _model(dirs, family)
    reqs, _ = _requests(family)
    reqs = [reqs[0], reqs[2], reqs[-1]]
    ours = m.generate(reqs, n=1, sampling=SamplingParams(temperature=0, max_new_tokens=6))
    for r, (c,) in zip(reqs, ours):
        enc = _encode(m, r)
        with torch.no_grad():
            ref = m.model.generate(**enc, do_sample=False, max_new_tokens=6, eos_token_id=sorted(m.stop_ids),
                                   pad_token_id=m.pad_id, output_logits=True, return_dict_in_generate=True)
        new = ref.sequences[0, enc["input_ids"].shape[1]:].tolist()
        logps = [torch.log_softmax(ref.logits[k][0].double(), -1)[t].item() for k, t in enumerate(new)]
        if new and new[-1] in m.stop_ids:
            new, logps = new[:-1], logps[:-1]
        assert c.token_ids == new
        assert c.token_logprobs == pytest.approx(logps, abs=1e-4)
        assert "".join(c.text[a:b] for a, b in c.offsets) == c.text
        assert m.tokenizer(c.text, add_special_tokens=False)["input_ids"] == c.token_ids
        if c.token_ids:  # the generated text scores to the generated log-probs
            assert m.score([r], [c.text])[0].token_logprobs == pytest.approx(c.token_logprobs, abs=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_score_exact_and_batched_equals_one_at_a_time(dirs, family):
    m = _model(dirs, family)
    reqs, resps = _requests(family)
    got = m.score(reqs, resps)
    for r, text, s in zip(reqs, resps, got):
        want = _naive_logprobs(m, r, text)
        assert s.n_tokens == len(want) > 0
        assert s.token_logprobs == pytest.approx(want, abs=1e-4)
    assert got[0].offsets == [(0, 3), (3, 10), (10, 13), (13, 17), (17, 19)]  # "the circle is red ."
    for r, text, s in zip(reqs, resps, got):
        alone = m.score([r], [text])[0]
        assert alone.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-5)
        assert alone.offsets == s.offsets


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_maps_or_a_capability_error(dirs, family):
    m = _model(dirs, family)
    req, resp = _requests(family)[0][0], "the circle is red ."
    if family not in GRIDS:
        assert Capability.ATTENTION not in m.capabilities
        with pytest.raises(PairforgeError, match="no single patch grid") as e:
            m.attention_map(req, resp)
        assert "\n" not in str(e.value) and family in str(e.value)
        return
    assert Capability.ATTENTION in m.capabilities
    got = m.attention_map(req, resp)
    assert got.shape == GRIDS[family] and np.isfinite(got).all() and got.sum() > 0
    # equals the mean over layers of per-layer maps (the same tokens, the same grid)
    per_layer = [m.attention_map(req, resp, layers=[layer]) for layer in (0, 1)]
    np.testing.assert_allclose(got, (per_layer[0] + per_layer[1]) / 2, rtol=1e-5, atol=1e-7)
    assert m.model.config._attn_implementation != "eager" or family == "paligemma"


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    from test_train_data import pair_rows

    from pairforge.schema import to_dataset

    out = tmp_path_factory.mktemp("dpo") / "pairs"
    to_dataset(pair_rows(4, "dpo")).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pairforge_train_dpo_step(dirs, dpo_data, family, tmp_path, monkeypatch):
    from pairforge.train import load_config, train

    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))
    result = train(load_config(data=str(dpo_data), model=f"hf:{dirs[family]}", loss="dpo", out=str(tmp_path / "run"),
                               steps=1, batch_size=2, probe_size=0, progress=False, lr=1e-2))
    logs = [r for r in _log(tmp_path / "run") if "loss" in r]
    assert logs and all(math.isfinite(r["loss"]) for r in logs), logs
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file(), result


def _log(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def build_rows(tmp_path_factory):
    from rich.console import Console

    from pairforge.engine import BuildConfig, build, load_build

    out = tmp_path_factory.mktemp("vapr") / "build"
    build(BuildConfig(recipe="vapr", source="shapes:train?n=8", out=out, params={"editor": "rule"}),
          console=Console(file=io.StringIO()), progress=False)
    return load_build(out).select(range(2))


@pytest.mark.parametrize("family", [f if f != "paligemma" else pytest.param(f, marks=pytest.mark.xfail(
    strict=True, raises=ValueError, reason="TRL 1.16's DataCollatorForVisionPreference tokenises the "
    "chosen / rejected texts with processor(text=...) and no images, which PaliGemmaProcessor refuses "
    "('images are expected')")) for f in FAMILY_NAMES])
def test_trl_dpo_trainer_step_on_a_pairforge_build(dirs, build_rows, family, tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForImageTextToText

    m = _model(dirs, family)
    model = AutoModelForImageTextToText.from_pretrained(dirs[family], dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=1e-3, use_cpu=True, bf16=False, fp16=False, report_to=[],
                         logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                         activation_checkpointing=False, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=build_rows, processing_class=m.processor)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 1 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4), logs
    assert math.isfinite(logs[0]["logps/chosen"]) and logs[0]["logps/chosen"] < 0


def test_remote_code_only_model_is_a_one_line_error(tmp_path):
    """A model whose code lives in its repository (``auto_map``, unknown to transformers) is
    refused with one line; trust_remote_code stays off unless passed."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    with pytest.raises(PairforgeError, match="trust_remote_code") as e:
        HFModel(f"hf:{tmp_path}", device="cpu", progress=False)
    assert "\n" not in str(e.value) and "remote-code" in str(e.value)
