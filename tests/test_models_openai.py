"""OpenAI-compatible backend and `pairforge serve`.

Real model, real HTTP: ``pairforge serve smollm2`` runs as a subprocess on a free port, and a
random tiny LLaVA is served in-process by :class:`pairforge.serve.ChatServer`; the backend's
completions and scores must equal those of calling :class:`HFModel` directly with the same
seeds. Fault behaviour (429, 500, hangs, broken JSON, permanent failures, a server that echoes
the key) is checked against a scripted local HTTP server that counts attempts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pairforge.errors import BadInput, PairforgeError
from pairforge.models import Capability, Request, SamplingParams, load_model
from pairforge.models.hf import HFModel
from pairforge.models.openai_compat import (
    OpenAIModel,
    backoff_delay,
    parse_chat_completion,
    parse_prompt_logprobs,
    token_offsets,
    wire_seed,
)
from pairforge.models.random_tiny import save_random_llava
from pairforge.schema import user_message
from pairforge.serve import ChatServer, HTTPError, parse_chat_request, server_request_id, token_pieces

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SECRET = "sk-test-7f3a9c1e5b"  # a key that must never show up in errors or logs


def _text_request(text: str, id: str = "") -> Request:
    return Request([{"role": "user", "content": [{"type": "text", "text": text}]}], id=id)


def _direct(model: HFModel, requests, n: int, sampling: SamplingParams):
    """What the server computes for each request: HFModel with the wire seed in the request id
    (HFModel's samples do not depend on batching, so one call does)."""
    same = [Request(r.messages, r.images, id=server_request_id(wire_seed(sampling, r))) for r in requests]
    return model.generate(same, n, dataclasses.replace(sampling, seed=0))


def _assert_same(served, direct):
    assert len(served) == len(direct)
    for row_s, row_d in zip(served, direct):
        assert [c.text for c in row_s] == [c.text for c in row_d]
        for cs, cd in zip(row_s, row_d):
            assert cs.n_tokens == cd.n_tokens
            np.testing.assert_allclose(cs.token_logprobs, cd.token_logprobs, atol=1e-4)
            assert cs.offsets == cd.offsets
            assert cs.finish_reason == cd.finish_reason


# ----------------------------------------------------------------------------- fault server


class _FaultHandler(BaseHTTPRequestHandler):
    """Scripted replies chosen by the request's ``model``; attempts counted per (model, prompt),
    requests in flight (``peak``) for model "slow"."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        content = body["messages"][0]["content"]
        prompt = content if isinstance(content, str) else content[-1]["text"]
        key = (model, prompt)
        slow = model == "slow"
        with srv.lock:
            srv.attempts[key] += 1
            attempt = srv.attempts[key]
            srv.in_flight += slow
            srv.peak = max(srv.peak, srv.in_flight)
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("Authorization"))
        try:
            self._reply(model, prompt, attempt, body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with srv.lock:
                srv.in_flight -= slow

    def _reply(self, model, prompt, attempt, body):
        if model == "429-once" and attempt == 1:
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if model == "500-twice" and attempt <= 2:
            return self._send(500, {"error": {"message": "boom"}})
        if model == "hang-once" and attempt == 1:
            time.sleep(1.5)
        if model == "badjson-once" and attempt == 1:
            return self._send_raw(200, b'{"choices": [{"message": ')
        if model == "always-503":
            return self._send(503, {"error": {"message": "overloaded"}})
        if model == "always-wrong-n":
            return self._send(200, {"choices": []})
        if model == "404":
            return self._send(404, {"error": {"message": "The model `404` does not exist."}})
        if model == "401-echo":  # a careless server that echoes the request's headers
            return self._send(401, {"error": {"message": f"bad key: {self.headers.get('Authorization')}"}})
        if model == "slow":
            time.sleep(0.05)
        text = f"echo: {prompt}"
        pieces = ["echo:", text[5:]]
        choices = []
        for j in range(body.get("n", 1)):
            lp = None if model == "nologprobs" else {"content": [
                {"token": t, "logprob": -0.5 * (k + 1), "bytes": list(t.encode()), "top_logprobs": []}
                for k, t in enumerate(pieces)]}
            choices.append({"index": j, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop", "logprobs": lp})
        self._send(200, {"object": "chat.completion", "choices": choices})

    def _send(self, status, payload, headers=None):
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status, data, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def fault():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultHandler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.attempts, server.in_flight, server.peak = Counter(), 0, 0
    server.bodies, server.auth = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def _fault_model(fault, scenario, **kw) -> OpenAIModel:
    kw = {"progress": False, "max_retries": 3, "backoff_base": 0.001, "backoff_max": 0.01,
          "timeout": 5.0, **kw}
    return OpenAIModel(f"openai:{scenario}@{fault.url}", **kw)


@pytest.mark.parametrize("scenario,expected_attempts,kw", [
    ("429-once", 2, {}),
    ("500-twice", 3, {}),
    ("hang-once", 2, {"timeout": 0.3}),
    ("badjson-once", 2, {}),
    ("ok", 1, {}),
])
def test_retries_then_succeeds(fault, scenario, expected_attempts, kw):
    model = _fault_model(fault, scenario, **kw)
    out = model.generate([_text_request(f"retry {scenario}")], 2, SamplingParams(max_new_tokens=4))
    assert fault.attempts[(scenario, f"retry {scenario}")] == expected_attempts
    assert (model.n_attempts, model.n_retries) == (expected_attempts, expected_attempts - 1)
    c = out[0][0]
    assert c.text == f"echo: retry {scenario}" and c.token_logprobs == [-0.5, -1.0]
    assert c.offsets == [(0, 5), (5, len(c.text))] and c.finish_reason == "stop"


@pytest.mark.parametrize("scenario,retries,status,fix", [
    ("always-503", 2, "HTTP 503", "check its logs"),
    ("always-wrong-n", 1, "malformed reply", "OpenAI-compatible /v1 endpoint"),
])
def test_permanent_failure_is_one_line_after_max_retries(fault, scenario, retries, status, fix):
    model = _fault_model(fault, scenario, max_retries=retries)
    with pytest.raises(PairforgeError) as e:
        model.generate([_text_request(f"perm {scenario}", id="r7")], 1, SamplingParams())
    msg = str(e.value)
    assert fault.attempts[(scenario, f"perm {scenario}")] == retries + 1
    assert "\n" not in msg and f"{fault.url}/chat/completions" in msg and status in msg and fix in msg
    assert f"max_retries={retries}" in msg and "request r7" in msg


def test_client_errors_are_not_retried(fault):
    model = _fault_model(fault, "404")
    with pytest.raises(PairforgeError, match=r"HTTP 404 .*does not exist.*check the model name"):
        model.generate([_text_request("not found")], 1, SamplingParams())
    assert fault.attempts[("404", "not found")] == 1


def test_key_comes_from_env_and_never_leaks(fault, monkeypatch, caplog):
    monkeypatch.setenv("PF_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    model = _fault_model(fault, "401-echo", api_key_env="PF_TEST_KEY")
    with pytest.raises(PairforgeError) as e:
        model.generate([_text_request("key")], 1, SamplingParams())
    assert fault.auth[-1] == f"Bearer {SECRET}"  # the key was sent ...
    msg = str(e.value)
    assert SECRET not in msg and "***" in msg and "$PF_TEST_KEY" in msg and "HTTP 401" in msg  # ... never shown
    assert SECRET not in caplog.text and SECRET not in repr(model)
    monkeypatch.delenv("PF_TEST_KEY")
    with pytest.raises(PairforgeError, match=r"\$PF_TEST_KEY is not set"):
        _fault_model(fault, "ok", api_key_env="PF_TEST_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    _fault_model(fault, "ok").generate([_text_request("default key")], 1, SamplingParams())
    assert fault.auth[-1] == f"Bearer {SECRET}"


def test_bounded_concurrency_and_request_order(fault):
    model = _fault_model(fault, "slow", max_concurrency=3)
    fault.peak = 0
    requests = [_text_request(f"order {i}") for i in range(12)]
    out = model.generate(requests, 1, SamplingParams())
    assert [row[0].text for row in out] == [f"echo: order {i}" for i in range(12)]
    assert 2 <= fault.peak <= 3


def test_request_body_carries_sampling_seed_and_images(fault):
    model = _fault_model(fault, "ok")
    img = Image.new("RGB", (6, 4), (10, 200, 30))
    req = Request([user_message("body check")], [img], id="x1")
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11)
    model.generate([req], 3, sampling)
    body = fault.bodies[-1]
    assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["logprobs"]) == (3, 0.7, 0.9, 5, True)
    assert body["seed"] == wire_seed(sampling, req) != wire_seed(sampling, dataclasses.replace(req, id="x2"))
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "body check"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    import base64
    import io
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (6, 4) and decoded.getpixel((0, 0)) == (10, 200, 30)


def test_server_without_logprobs_gives_empty_logprobs_and_says_so(fault, caplog):
    model = _fault_model(fault, "nologprobs")
    assert Capability.GENERATE in model.capabilities
    out = model.generate([_text_request("no lp")], 2, SamplingParams())
    assert out[0][0].text == "echo: no lp" and out[0][0].token_logprobs == [] and out[0][0].offsets == []
    assert Capability.GENERATE not in model.capabilities
    assert "no token log-probs" in caplog.text
    declared = _fault_model(fault, "nologprobs", logprobs=False, images=False)
    assert declared.capabilities == frozenset()
    declared.generate([_text_request("no lp 2")], 1, SamplingParams())
    assert "logprobs" not in fault.bodies[-1]  # not asked for


def test_capabilities_checked_before_any_request(fault):
    text_only = _fault_model(fault, "ok", images=False)
    req = Request([user_message("image?")], [Image.new("RGB", (4, 4))])
    with pytest.raises(PairforgeError, match="text-only"):
        text_only.generate([req], 1, SamplingParams())
    with pytest.raises(BadInput, match="image part"):
        text_only.generate([Request([user_message("two", n_images=2)], [Image.new("RGB", (4, 4))])], 1,
                           SamplingParams())
    assert fault.attempts[("ok", "image?")] == 0 and fault.attempts[("ok", "two")] == 0
    with pytest.raises(PairforgeError, match="needs 'score'"):
        text_only.score([_text_request("s")], ["x"])


def test_factory_and_missing_package(fault, monkeypatch):
    model = load_model(f"openai:ok@{fault.url}", progress=False)
    assert isinstance(model, OpenAIModel) and model.name == f"openai:ok@{fault.url}"
    with pytest.raises(PairforgeError, match="device.*do not apply"):
        load_model(f"openai:ok@{fault.url}", device="cpu")
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(PairforgeError, match=r"pairforge\[openai\]"):
        load_model(f"openai:ok@{fault.url}")


# ----------------------------------------------------------------------------- pure pieces


def test_backoff_delay_vector():
    # d = min(cap, base·2^k); delay = d/2 + u·d/2
    assert backoff_delay(0, 0.5, 30, 0.0) == 0.25
    assert backoff_delay(2, 0.5, 30, 0.5) == 1.5  # d = 2 → 1 + 0.5
    assert backoff_delay(10, 0.5, 30, 0.9) == pytest.approx(28.5)  # d capped at 30 → 15 + 13.5
    model = OpenAIModel("openai:m@http://127.0.0.1:9/v1", backoff_base=0.001, progress=False)
    assert model._delay(0, retry_after=0.2) == 0.2  # Retry-After wins over a shorter backoff


def test_token_offsets_from_bytes_when_strings_do_not_spell_the_text():
    text = "é!"
    # a byte-level server returns the two bytes of é as separate tokens with unprintable strings;
    # both pieces own the character, as the HF backend's fast-tokenizer offsets have it
    assert token_offsets(text, ["bytes:\\xc3", "bytes:\\xa9", "!"], [[0xC3], [0xA9], [0x21]]) == \
        [(0, 1), (0, 1), (1, 2)]
    assert token_offsets("ab c", ["ab", " c"], [None, None]) == [(0, 2), (2, 4)]


def test_parse_chat_completion_rejects_malformed():
    from pairforge.models.openai_compat import MalformedResponse

    with pytest.raises(MalformedResponse):
        parse_chat_completion({"error": "x"}, 1)
    with pytest.raises(MalformedResponse):
        parse_chat_completion({"choices": [{"message": {"content": "a"}}]}, 2)
    out = parse_chat_completion({"choices": [{"index": 1, "message": {"content": "b"}},
                                             {"index": 0, "message": {"content": None}}]}, 2)
    assert [c.text for c in out] == ["", "b"]  # choice order by index


def test_parse_prompt_logprobs_tail_must_spell_response():
    data = {"prompt_logprobs": [None, {"5": {"logprob": -1.0, "decoded_token": "Q"}},
                                {"7": {"logprob": -0.5, "decoded_token": "Hi"}},
                                {"8": {"logprob": -0.25, "decoded_token": " there"}}]}
    s = parse_prompt_logprobs(data, "Hi there")
    assert s.token_logprobs == [-0.5, -0.25] and s.offsets == [(0, 2), (2, 8)]
    with pytest.raises(PairforgeError, match="do not line up"):
        parse_prompt_logprobs(data, "i there")
    split = {"prompt_logprobs": [None, {"1": {"logprob": -3.0, "decoded_token": ""}},  # 1st byte of ¡
                                 {"2": {"logprob": -0.1, "decoded_token": "¡"}},
                                 {"3": {"logprob": -0.2, "decoded_token": "Hola"}}]}
    s = parse_prompt_logprobs(split, "¡Hola")
    assert s.token_logprobs == [-3.0, -0.1, -0.2] and s.offsets == [(0, 1), (0, 1), (1, 5)]


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "other"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://a/b.png"}}]}]},
     400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0}, 400, "prompt_logprobs"),
])
def test_server_rejects_bad_requests_naming_the_field(body, status, param):
    with pytest.raises(HTTPError) as e:
        parse_chat_request(body, "served")
    assert (e.value.status, e.value.param) == (status, param) and "\n" not in e.value.message


def test_server_parses_images_seed_and_scoring_requests():
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    job = parse_chat_request({"model": "served", "seed": 5, "n": 2, "max_tokens": 7, "logprobs": True,
                              "messages": [{"role": "user", "content": [
                                  {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]}]},
                             "served")
    assert job.request.id == server_request_id(5) and job.n == 2 and job.logprobs
    assert job.sampling == SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=7, seed=0)
    assert job.request.messages[0]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": "q"}]
    assert job.request.images[0].getpixel((0, 0)) == (1, 2, 3)
    score = parse_chat_request({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}],
                                "prompt_logprobs": 0, "continue_final_message": True,
                                "add_generation_prompt": False}, "served")
    assert score.score_response == "a b" and [m["role"] for m in score.request.messages] == ["user"]
    assert token_pieces("ab cd", [(0, 2), (2, 5)]) == ["ab", " cd"]
    assert token_pieces("¡x", [(0, 1), (0, 1), (1, 2)]) == ["", "¡", "x"]  # pieces partition the text


# ----------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def _smollm2_process(tmp_path_factory):
    """`pairforge serve smollm2 --port 0` as a subprocess, started early (it loads while the
    other tests run); stderr goes to a log file."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pairforge.cli", "serve", "smollm2", "--port", "0",
                                 "--quiet", "--max-batch", "4"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    yield proc, log_path
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def smollm2_url(_smollm2_process) -> str:
    proc, log_path = _smollm2_process
    line = proc.stdout.readline()  # "pairforge serve: smollm2 on http://127.0.0.1:PORT/v1 (...)"
    if " on http" not in line:
        pytest.fail(f"pairforge serve did not start: {line!r}\n{log_path.read_text()[-2000:]}")
    return line.split(" on ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def smollm2() -> HFModel:
    return HFModel("smollm2", batch_size=4, progress=False)


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory):
    """A random tiny LLaVA served in-process on a free port; yields (url, the served HFModel)."""
    model = HFModel(save_random_llava(tmp_path_factory.mktemp("tiny-llava")), batch_size=4, progress=False)
    server = ChatServer(model, port=0, served_name="tiny-llava", quiet=True, api_key=SECRET)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url, model
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", autouse=True)
def _start_smollm2_early(_smollm2_process):
    """Start the subprocess before the first test, so loading overlaps the fast tests."""


QUESTIONS = ["What is the capital of France?", "Say hello in Spanish."]


def test_served_tiny_llava_images_equal_hfmodel(llava_server, monkeypatch):
    url, llava = llava_server
    monkeypatch.setenv("PF_LLAVA_KEY", SECRET)
    model = OpenAIModel(f"openai:tiny-llava@{url}", prompt_logprobs=True, progress=False,
                        api_key_env="PF_LLAVA_KEY")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    requests = [Request([user_message("what color is the shape ?")], [imgs[0]], id="a"),
                Request([user_message("how many are there ?")], [imgs[1]], id="b"),
                Request([user_message("describe the picture", n_images=2)], imgs[1:], id="c")]
    for sampling in (SamplingParams(temperature=0, max_new_tokens=8),
                     SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)):
        served = model.generate(requests, 2, sampling)
        _assert_same(served, _direct(llava, requests, 2, sampling))
    responses = ["the red circle", "two", "a blue square on the left"]
    for s, d in zip(model.score(requests, responses), llava.score(requests, responses)):
        np.testing.assert_allclose(s.token_logprobs, d.token_logprobs, atol=1e-4)


def test_models_endpoint_key_and_unknown_model(llava_server, monkeypatch):
    url, _ = llava_server
    import openai

    client = openai.OpenAI(api_key=SECRET, base_url=url, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-llava"]
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    with pytest.raises(PairforgeError, match=r"HTTP 401 .*set \$OPENAI_API_KEY"):
        OpenAIModel(f"openai:tiny-llava@{url}", progress=False).generate([_text_request("hi")], 1, SamplingParams())
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with pytest.raises(PairforgeError, match=r"HTTP 404 .*model name"):
        OpenAIModel(f"openai:other@{url}", progress=False).generate([_text_request("hi")], 1, SamplingParams())


def test_served_smollm2_greedy_equals_hfmodel(smollm2_url, smollm2):
    model = OpenAIModel(f"openai:smollm2@{smollm2_url}", progress=False)
    requests = [_text_request(q, id=f"q{i}") for i, q in enumerate(QUESTIONS)]
    sampling = SamplingParams(temperature=0, max_new_tokens=8)
    served = model.generate(requests, 2, sampling)
    _assert_same(served, _direct(smollm2, requests, 2, sampling))
    assert served[0][0].text and served[0][0].text == served[0][1].text  # greedy: n equal copies
    assert model.capabilities >= {Capability.GENERATE}


def test_served_smollm2_sampling_equals_hfmodel_with_same_seed(smollm2_url, smollm2):
    model = OpenAIModel(f"openai:smollm2@{smollm2_url}", progress=False)
    requests = [_text_request(q, id=f"s{i}") for i, q in enumerate(QUESTIONS)]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=7)
    served = model.generate(requests, 2, sampling)
    _assert_same(served, _direct(smollm2, requests, 2, sampling))
    assert served[0][0].text != served[0][1].text  # the n samples differ
    other = model.generate(requests[:1], 2, dataclasses.replace(sampling, seed=8))
    assert [c.text for c in other[0]] != [c.text for c in served[0]]  # another seed, other samples


def test_served_smollm2_score_equals_hfmodel(smollm2_url, smollm2):
    model = OpenAIModel(f"openai:smollm2@{smollm2_url}", prompt_logprobs=True, progress=False)
    assert Capability.SCORE in model.capabilities
    requests = [_text_request(q) for q in QUESTIONS]
    responses = ["The capital of France is Paris.", "¡Hola! ¿Qué tal?"]
    served = model.score(requests, responses)
    direct = smollm2.score(requests, responses)
    for s, d in zip(served, direct):
        assert s.text == d.text and s.n_tokens == d.n_tokens > 0
        np.testing.assert_allclose(s.token_logprobs, d.token_logprobs, atol=1e-4)
        # one offset rule: split characters belong to each piece; prompt log-probs carry decoded
        # tokens only, so a token ending with a character's leading bytes ("ĠÂ" of " ¿") keeps
        # its whole characters (tests/test_openai_fixes.py)
        diff = [k for k, (a, b) in enumerate(zip(s.offsets, d.offsets)) if a != b]
        assert all(s.offsets[k][0] == d.offsets[k][0] and s.offsets[k][1] == d.offsets[k][1] - 1
                   for k in diff) and len(diff) <= 1


def test_served_smollm2_text_only_refuses_images_with_one_line(smollm2_url):
    model = OpenAIModel(f"openai:smollm2@{smollm2_url}", progress=False, max_retries=3,
                        backoff_base=0.01)
    req = Request([user_message("What colour is this?")], [Image.new("RGB", (8, 8), "red")])
    with pytest.raises(PairforgeError) as e:  # the server answers 400: not retried
        model.generate([req], 1, SamplingParams(max_new_tokens=4))
    msg = str(e.value)
    assert "\n" not in msg and "HTTP 400" in msg and "text-only" in msg and smollm2_url in msg


def test_cli_audit_with_an_openai_scorer_equals_the_hf_backend(smollm2_url, smollm2, tmp_path):
    """`pairforge audit --scorer openai:M@URL?prompt_logprobs=1` (issue 16): the auditor no longer
    passes batch_size to the OpenAI backend, and the spec option turns scoring on; Δ_ref equals
    the HF backend's on the same weights within 1e-3."""
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pairforge.cli import app

    data = tmp_path / "pairs.jsonl"
    pairs = [("What is the capital of France?", "Paris is the capital.", "Lyon is the capital."),
             ("Say hello in Spanish.", "¡Hola!", "Bonjour!")]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    spec = f"openai:smollm2@{smollm2_url}?prompt_logprobs=1"
    result = CliRunner().invoke(app, ["audit", str(data), "--out", str(tmp_path / "out"), "--scorer", spec,
                                      "--tokenizer", "words"])
    assert result.exit_code == 0, (result.output, result.exception)
    got = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pandas()["delta_ref"].tolist()
    want = [s[0].sum_logprob - s[1].sum_logprob for s in (
        smollm2.score([_text_request(p)] * 2, [c, r]) for p, c, r in pairs)]
    np.testing.assert_allclose(got, want, atol=1e-3)
