"""OpenAI-compatible backend against what a real vLLM server sends (issue 16): the end-of-turn
log-prob entry of a stopped completion, characters split over tokens (one offset rule with the HF
backend), ``prompt_logprobs`` turned on from a spec, and the model auditor's options.

Fake replies are shaped like vLLM's OpenAI server's (``logprobs.content`` entries with ``token``,
``logprob`` and ``bytes``; ``prompt_logprobs`` as ``[null | {id: {logprob, rank, decoded_token}}]``).
"""

from __future__ import annotations

import pytest

from pairforge.errors import PairforgeError
from pairforge.models.openai_compat import parse_chat_completion, parse_prompt_logprobs
from pairforge.models.spec import parse_model_spec


def _entry(token: str, lp: float) -> dict:
    return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8")), "top_logprobs": []}


def _reply(text: str, entries: list[dict], reason: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": entries}, "finish_reason": reason, "stop_reason": None}]}


@pytest.mark.parametrize("eot", ["<|im_end|>", ""])
def test_stopped_completion_drops_the_end_of_turn_entry(eot):
    """vLLM returns n+1 entries for a completion that stopped at <|im_end|> (the stop token's
    log-prob last, spelled as the token or as ""); the HF and vLLM backends never count it."""
    entries = [_entry("The", -0.5), _entry(" capital", -1.0), _entry(".", -0.25), _entry(eot, -0.125)]
    (c,) = parse_chat_completion(_reply("The capital.", entries, "stop"), 1)
    assert c.token_logprobs == [-0.5, -1.0, -0.25] and c.sum_logprob == -1.75
    assert c.offsets == [(0, 3), (3, 11), (11, 12)]
    assert c.mean_logprob == pytest.approx(-1.75 / 3)


def test_completion_cut_by_length_keeps_every_entry():
    entries = [_entry("The", -0.5), _entry(" capital", -1.0)]
    (c,) = parse_chat_completion(_reply("The capital", entries, "length"), 1)
    assert c.token_logprobs == [-0.5, -1.0] and c.offsets == [(0, 3), (3, 11)]


def test_split_character_spans_equal_the_hf_backends(tmp_path):
    """Japanese through a byte-level BPE: HFModel.score takes spans from the fast tokenizer (each
    piece of a split character gets the character); the OpenAI backend, from vLLM's decoded
    tokens ("" for leading bytes) or from generated tokens' bytes, and HFModel's own generated
    completions must give the same spans."""
    from pairforge.models.base import Request
    from pairforge.models.hf import HFModel
    from pairforge.models.random_tiny import save_random_llama
    from pairforge.models.render import whole_characters as _whole_characters

    model = HFModel(f"hf:{save_random_llama(tmp_path / 'llama')}", device="cpu", progress=False)
    tok = model.tokenizer
    req = Request([{"role": "user", "content": [{"type": "text", "text": "Where?"}]}])
    for text in ["東京は晴れ", "日本語です。", "¡Hola! ¿Qué tal?"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        hf = model.score([req], [text])[0]
        assert len(hf.offsets) == len(ids) and any(a == b for a, b in zip(hf.offsets, hf.offsets[1:]))
        # vLLM prompt_logprobs: each token decoded incrementally, whole characters only
        prefixes = [_whole_characters(tok.decode(ids[:k]), text) for k in range(len(ids) + 1)]
        decoded = [text[prefixes[k]:prefixes[k + 1]] for k in range(len(ids))]
        data = {"prompt_logprobs": [None, {"9": {"logprob": -1.0, "rank": 1, "decoded_token": "Q"}}]
                + [{str(i): {"logprob": lp, "rank": 1, "decoded_token": d}}
                   for i, lp, d in zip(ids, hf.token_logprobs, decoded)]}
        served = parse_prompt_logprobs(data, text)
        assert served.token_logprobs == hf.token_logprobs
        if text.startswith("¡Hola"):  # "ĠÂ" = space + 1st byte of ¿: decoded tokens cannot say so
            k = tok.convert_ids_to_tokens(ids).index("ĠÂ")
            assert hf.offsets[k] == (6, 8) and served.offsets[k] == (6, 7)
            assert served.offsets[:k] + served.offsets[k + 1:] == hf.offsets[:k] + hf.offsets[k + 1:]
        else:
            assert served.offsets == hf.offsets
        # generated tokens with their bytes (vLLM's logprobs.content), stopped by <|im_end|>
        raw = tok.convert_ids_to_tokens(ids)
        byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
        entries = [{"token": t, "logprob": -1.0, "bytes": [byte_decoder[ch] for ch in t]} for t in raw]
        (c,) = parse_chat_completion(_reply(text, entries + [_entry("<|im_end|>", -0.1)], "stop"), 1)
        assert c.offsets == hf.offsets and len(c.token_logprobs) == len(ids)
        # HFModel's own completion of those ids
        assert model._completion(ids, [0.0] * len(ids), "length").offsets == hf.offsets


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_openai_spec_options_turn_on_prompt_logprobs():
    from pairforge.models import Capability, load_model

    spec = parse_model_spec("openai:Qwen/Qwen2-VL-2B@http://127.0.0.1:8000/v1?prompt_logprobs=1&max_retries=2")
    assert spec.base_url == "http://127.0.0.1:8000/v1" and spec.name == "Qwen/Qwen2-VL-2B"
    assert str(parse_model_spec(str(spec))) == str(spec)
    model = load_model(spec)  # no request is sent when a model is built
    assert Capability.SCORE in model.capabilities and model.max_retries == 2
    assert Capability.SCORE not in load_model("openai:m@http://127.0.0.1:8000/v1").capabilities
    from pairforge.models.openai_compat import OpenAIModel  # built directly: the spec's options too

    direct = OpenAIModel("openai:m@http://127.0.0.1:8000/v1?prompt_logprobs=1&timeout=5", max_retries=1)
    assert Capability.SCORE in direct.capabilities and (direct.timeout, direct.max_retries) == (5.0, 1)
    for bad, needle in [("?prompt_logprob=1", "unknown option"), ("?prompt_logprobs=maybe", "not a valid bool"),
                        ("?max_retries=x", "not a valid int")]:
        with pytest.raises(PairforgeError, match=needle) as e:
            parse_model_spec(f"openai:m@http://h/v1{bad}")
        assert "\n" not in str(e.value)


def test_model_auditor_loads_an_openai_scorer_without_batch_size():
    """The auditor passed batch_size to every backend, which the OpenAI backend refuses."""
    from pairforge.diagnostics.model_based import ModelAuditor

    auditor = ModelAuditor("openai:m@http://127.0.0.1:9/v1?prompt_logprobs=1", batch_size=4)
    model = auditor.model("openai:m@http://127.0.0.1:9/v1?prompt_logprobs=1")
    assert type(model).__name__ == "OpenAIModel"
    with pytest.raises(PairforgeError, match="'score'"):  # without prompt log-probs: refused up front
        auditor.model("openai:m@http://127.0.0.1:9/v1")
