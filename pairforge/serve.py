"""`pairforge serve`: a small OpenAI-compatible HTTP server around :class:`~pairforge.models.hf.HFModel`,
a Starlette app run by uvicorn.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (no streaming). A chat
request's image parts must be ``data:`` URLs (base64 PNG/JPEG/…); they become PIL images and
the parts become ``{"type": "image"}`` in the model's chat template. Supported fields: ``n``,
``temperature``, ``top_p``, ``seed``, ``max_tokens`` (or ``max_completion_tokens``),
``logprobs`` (``top_logprobs`` > 0 is refused: only the chosen tokens' log-probs exist).

Conventions:

- **Seeds**: a request with ``seed = s`` is decoded exactly as ``HFModel.generate`` decodes
  ``Request(messages, images, id=server_request_id(s))`` under ``SamplingParams(seed=0)``:
  sample ``j`` draws from its own generator seeded by (0, ``"seed-s"``, ``j``). Same request and
  seed → same completions, whatever else the server is doing. No seed → a random one.
- **Log-probs** (``logprobs: true``): ``choices[j].logprobs.content`` lists each generated token
  with its log-prob under the model at temperature 1 (as HFModel), its text and UTF-8 bytes;
  the token texts partition the completion text exactly.
- **Scoring** (vLLM's extension): with ``prompt_logprobs`` set, ``continue_final_message: true``
  and ``add_generation_prompt: false``, the final assistant message is scored by
  ``HFModel.score`` given the messages before it; the response's top-level
  ``prompt_logprobs`` is ``[null, {token_id: {logprob, rank: null, decoded_token}} …]``, one entry
  per response token (the prompt's own tokens are not scored and are summarised by the leading
  ``null``). No new tokens are generated for such a request.
- **Batching**: concurrent requests with the same sampling settings are decoded in one
  ``HFModel.generate`` call (up to ``max_batch``); per-request seeds make results independent of
  batching. One worker thread owns the model.
- **Key**: with ``api_key_env`` set, requests must carry ``Authorization: Bearer $VAR``. A
  host other than loopback is refused without a key unless ``insecure`` is set.
- **Images**: at most the build's pixel limit (``DEFAULT_MAX_PIXELS``), checked from the
  image header before the pixels are decoded; a larger one is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pairforge.errors import PairforgeError
from pairforge.models.base import Capability, Completion, Request, SamplingParams, ScoredResponse

#: ``max_tokens`` when a request gives none.
DEFAULT_MAX_TOKENS = 256
#: Largest ``n`` one request may ask for.
MAX_N = 64
#: Largest request body accepted (bytes).
MAX_BODY = 64 * 2**20


def server_request_id(seed: int) -> str:
    """The HFModel request id a chat request with ``seed`` is decoded under (with
    ``SamplingParams(seed=0)``): sample ``j`` is seeded by (0, this id, ``j``)."""
    return f"seed-{seed}"


class HTTPError(Exception):
    """An error answered to the client with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


# ----------------------------------------------------------------------------- request parsing


@dataclass
class ChatJob:
    """One parsed chat request: what to generate, or (``score_response`` set) what to score."""

    request: Request
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: bool = False
    score_response: str | None = None


def parse_chat_request(body: Any, served_name: str) -> ChatJob:
    """Validate an OpenAI chat-completions body and turn it into a :class:`ChatJob`.

    Raises :class:`HTTPError` (400, or 404 for another model name) naming the bad field."""
    if not isinstance(body, Mapping):
        raise HTTPError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_name:
        raise HTTPError(404, f"model '{model}' is not served here; this server serves "
                             f"'{served_name}' (GET /v1/models)", param="model", type_="not_found_error")
    if body.get("stream"):
        raise HTTPError(400, "streaming is not supported by pairforge serve; send stream=false",
                        param="stream")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise HTTPError(400, "messages must be a non-empty list", param="messages")
    messages, images = [], []
    for k, m in enumerate(raw):
        msg, imgs = _parse_message(m, k)
        messages.append(msg)
        images.extend(imgs)

    n = _int(body, "n", 1, lo=1, hi=MAX_N)
    temperature = _float(body, "temperature", 1.0, lo=0.0, hi=2.0)
    top_p = _float(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise HTTPError(400, "top_p must be in (0, 1]", param="top_p")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, DEFAULT_MAX_TOKENS, lo=1)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif not isinstance(seed, int) or isinstance(seed, bool):
        raise HTTPError(400, f"seed must be an integer, got {seed!r:.40}", param="seed")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise HTTPError(400, "logprobs must be true or false", param="logprobs")
    if body.get("top_logprobs"):
        raise HTTPError(400, "top_logprobs > 0 is not supported by pairforge serve (only the "
                             "chosen tokens' log-probs are returned); send top_logprobs=0",
                        param="top_logprobs")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=0)

    score_response = None
    continue_final = bool(body.get("continue_final_message"))
    if body.get("prompt_logprobs") is not None or continue_final:
        if not (continue_final and body.get("add_generation_prompt") is False
                and body.get("prompt_logprobs") is not None and messages[-1]["role"] == "assistant"):
            raise HTTPError(400, "pairforge serve returns prompt log-probs only to score a final "
                                 "assistant message: send prompt_logprobs=0, "
                                 "continue_final_message=true and add_generation_prompt=false with "
                                 "the response as the last (assistant) message", param="prompt_logprobs")
        last = messages.pop()
        if any(p.get("type") == "image" for p in last["content"]):
            raise HTTPError(400, "the assistant message to score must be text only", param="messages")
        score_response = "".join(p["text"] for p in last["content"])
    elif messages[-1]["role"] == "assistant":
        raise HTTPError(400, "the last message is an assistant message; continuing it needs "
                             "continue_final_message=true (supported only with prompt_logprobs)",
                        param="messages")
    request = Request(messages, images, id=server_request_id(seed))
    return ChatJob(request, n, sampling, logprobs, score_response)


def _parse_message(m: Any, k: int) -> tuple[dict, list]:
    """An OpenAI message → a TRL message (parts) and the PIL images of its image parts."""
    where = f"messages[{k}]"
    if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant"):
        raise HTTPError(400, f"{where} must be an object with role system, user or assistant",
                        param="messages")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": [{"type": "text", "text": content}]}, []
    if not isinstance(content, list):
        raise HTTPError(400, f"{where}.content must be a string or a list of parts", param="messages")
    parts, images = [], []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, Mapping) else None
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            images.append(_decode_data_url(url, f"{where}.content[{j}]"))
            parts.append({"type": "image", "text": None})
        else:
            raise HTTPError(400, f"{where}.content[{j}] must be a text part or an image_url part",
                            param="messages")
    return {"role": m["role"], "content": parts}, images


def _decode_data_url(url: Any, where: str):
    """A ``data:image/...;base64,...`` URL → an RGB PIL image."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise HTTPError(400, f"{where}: only data: URLs are supported (base64 images); "
                             f"pairforge serve does not fetch remote images", param="messages")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise HTTPError(400, f"{where}: expected data:image/png;base64,<data>", param="messages")
    from pairforge.errors import BadInput
    from pairforge.sources.sft import DEFAULT_MAX_PIXELS, decode_image

    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPError(400, f"{where}: the data URL is not valid base64 ({e})", param="messages") from None
    try:  # the build's pixel limit, checked from the header before any pixel is decoded
        img = decode_image({"bytes": data, "path": "the data URL image"}, 0, DEFAULT_MAX_PIXELS)
    except BadInput as e:  # the build's fix ("raise --max-pixels ...") is not the client's
        reason = e.reason.split("; ")[0]
        raise HTTPError(400, f"{where}: {reason}; send a smaller image", param="messages") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def _int(body: Mapping, key: str, default: int, *, lo: int, hi: int | None = None) -> int:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise HTTPError(400, f"{key} must be an integer {bound}, got {v!r:.40}", param=key)
    return v


def _float(body: Mapping, key: str, default: float, *, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise HTTPError(400, f"{key} must be a number in [{lo}, {hi}], got {v!r:.40}", param=key)
    return float(v)


# ----------------------------------------------------------------------------- responses


def token_pieces(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Token texts that partition ``text``: piece k runs from token k's start to token k+1's
    start (the last to the end of the text), so the pieces concatenate to ``text``."""
    starts = [min(max(s, 0), len(text)) for s, _ in offsets]
    for k in range(1, len(starts)):
        starts[k] = max(starts[k], starts[k - 1])
    if starts:
        starts[0] = 0
    ends = starts[1:] + [len(text)]
    return [text[s:e] for s, e in zip(starts, ends)]


def token_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> list[bytes]:
    """UTF-8 bytes of each token that reproduce ``offsets`` under the clients' rule
    (:func:`pairforge.models.decoding.prefix_offsets`): a token whose span overlaps the next
    one's holds leading bytes of the character they share (one byte, or one more than the
    tokens before it), the token after completes it. The bytes concatenate to the text."""
    data = text.encode("utf-8")
    at = [len(text[:i].encode("utf-8")) for i in range(len(text) + 1)]  # byte offset of each char
    out, sent = [], 0
    for k, (s, e) in enumerate(offsets):
        e = min(max(e, 0), len(text))
        target = at[e]
        if k + 1 < len(offsets) and offsets[k + 1][0] < e:  # the character at e−1 is cut here
            target = min(max(at[e - 1] + 1, sent + 1), at[e] - 1)
        target = max(target, sent)
        out.append(data[sent:target])
        sent = target
    if out:
        out[-1] += data[sent:]
    return out


def _logprobs_content(c: Completion) -> list[dict]:
    pieces = token_bytes(c.text, c.offsets) if c.offsets else [b""] * c.n_tokens
    return [{"token": t.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(t),
             "top_logprobs": []} for t, lp in zip(pieces, c.token_logprobs)]


def chat_response(job: ChatJob, completions: Sequence[Completion], served_name: str) -> dict:
    """The OpenAI ``chat.completion`` object for generated completions."""
    choices = []
    for j, c in enumerate(completions):
        choices.append({
            "index": j,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason or "stop",
            "logprobs": {"content": _logprobs_content(c)} if job.logprobs else None,
        })
    n_tokens = sum(c.n_tokens for c in completions)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": served_name, "choices": choices,
            "usage": {"completion_tokens": n_tokens}}


def score_response(scored: ScoredResponse, token_ids: Sequence[int], served_name: str) -> dict:
    """The vLLM-style response to a scoring request: ``prompt_logprobs`` holds one entry per
    token of the scored assistant message after a leading ``null`` (see the module docs)."""
    pieces = token_pieces(scored.text, scored.offsets)
    entries: list[dict | None] = [None]
    for tid, piece, lp in zip(token_ids, pieces, scored.token_logprobs):
        entries.append({str(tid): {"logprob": lp, "rank": None, "decoded_token": piece}})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                         "finish_reason": "length", "logprobs": None}],
            "prompt_logprobs": entries}


# ----------------------------------------------------------------------------- the model worker


class Batcher:
    """One worker thread that owns the model. Jobs queued while it is busy are run together:
    generation jobs with the same ``n`` and sampling settings in one ``generate`` call, scoring
    jobs in one ``score`` call. When a batch fails, its jobs are rerun one by one, so a bad
    request fails alone."""

    def __init__(self, model: Any, max_batch: int = 8, wait_s: float = 0.005):
        if max_batch < 1:
            raise PairforgeError(f"max_batch={max_batch}: must be >= 1")
        self.model, self.max_batch, self.wait_s = model, max_batch, wait_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pairforge-serve-model", daemon=True)
        self._thread.start()

    def submit(self, job: ChatJob) -> Future:
        fut: Future = Future()
        self._queue.put((job, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            deadline = time.monotonic() + self.wait_s
            while len(items) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                items.append(nxt)
            groups: dict[tuple, list] = {}
            for job, fut in items:
                key = ("score",) if job.score_response is not None else ("gen", job.n, job.sampling)
                groups.setdefault(key, []).append((job, fut))
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list) -> None:
        try:
            results = self._call([job for job, _ in group])
        except Exception as e:
            if len(group) == 1:
                group[0][1].set_exception(e)
                return
            for item in group:
                self._run_group([item])
            return
        for (_, fut), res in zip(group, results):
            fut.set_result(res)

    def _call(self, jobs: list[ChatJob]) -> list:
        if jobs[0].score_response is not None:
            responses = [j.score_response or "" for j in jobs]
            scored = self.model.score([j.request for j in jobs], responses)
            ids = self.model.tokenizer(responses, add_special_tokens=False)["input_ids"]
            return list(zip(scored, ids))
        return self.model.generate([j.request for j in jobs], jobs[0].n, jobs[0].sampling)


# ----------------------------------------------------------------------------- HTTP


def _json(status: int, payload: dict):
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status)


def make_app(server: "ChatServer"):
    """The Starlette app: ``GET /v1/models``, ``POST /v1/chat/completions`` (also without the
    ``/v1`` prefix); every error is an OpenAI-style JSON body."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    def denied(request):
        if server.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if secrets.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            return None
        return _json(401, HTTPError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                    type_="authentication_error").body())

    async def models(request):
        return denied(request) or _json(200, {"object": "list", "data": [
            {"id": server.served_name, "object": "model", "created": server.started,
             "owned_by": "pairforge"}]})

    async def chat(request):
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return _json(413, HTTPError(413, f"Content-Length must be 0..{MAX_BODY} bytes").body())
        refused = denied(request)
        if refused is not None:
            return refused
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                return _json(413, HTTPError(413, f"the body exceeds {MAX_BODY} bytes").body())
        try:
            try:
                body = json.loads(bytes(raw))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"the request body is not JSON ({e})") from None
            job = parse_chat_request(body, server.served_name)
            if job.request.images and not server.takes_images:
                raise HTTPError(400, f"{server.served_name} is a text-only model; send no "
                                     f"image_url parts", param="messages")
            result = await asyncio.wrap_future(server.batcher.submit(job))
            server.count_served()
            if job.score_response is not None:
                scored, ids = result
                return _json(200, score_response(scored, ids, server.served_name))
            return _json(200, chat_response(job, result, server.served_name))
        except HTTPError as e:
            return _json(e.status, e.body())
        except PairforgeError as e:  # a request the model cannot take (bad image count, template)
            return _json(400, HTTPError(400, str(e)).body())
        except Exception as e:  # noqa: BLE001 - a bug or a model failure: 500, one line
            line = str(e).splitlines()[0] if str(e) else ""
            return _json(500, HTTPError(500, f"{type(e).__name__}: {line}",
                                        type_="server_error").body())

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = (f"no such endpoint {request.url.path}; use /v1/models or "
                       f"/v1/chat/completions")
            return _json(404, HTTPError(404, message, type_="not_found_error").body())
        return _json(exc.status_code, HTTPError(exc.status_code, str(exc.detail)).body())

    routes = [Route(path, models, methods=["GET"]) for path in ("/v1/models", "/models")]
    routes += [Route(path, chat, methods=["POST"])
               for path in ("/v1/chat/completions", "/chat/completions")]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


class ChatServer:
    """The OpenAI-compatible server: a Starlette app run by uvicorn, one :class:`Batcher` for
    the model. The socket is bound on construction, so ``server_address`` holds the bound port
    (pass port 0 for a free one); :meth:`serve_forever` runs until :meth:`shutdown` (or, in
    the main thread, SIGINT / SIGTERM)."""

    def __init__(self, model: Any, *, host: str = "127.0.0.1", port: int = 8000,
                 served_name: str | None = None, max_batch: int = 8, api_key: str | None = None,
                 quiet: bool = False):
        import uvicorn

        self.served_name = served_name or getattr(model, "name", "model")
        self.takes_images = Capability.IMAGES in getattr(model, "capabilities", ())
        self.api_key = api_key
        self.quiet = quiet
        self.started = int(time.time())
        self.n_served = 0
        self._count_lock = threading.Lock()
        bind = host.strip("[]")
        self.socket = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET,
                                    socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((bind, port))
            self.socket.listen(2048)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.batcher = Batcher(model, max_batch=max_batch)
        config = uvicorn.Config(make_app(self), log_level="warning", lifespan="off",
                                access_log=not quiet)
        self._uvicorn = _uvicorn_server_class()(config)
        if not quiet:  # one line per request on stderr, as before (stdout has the URL line)
            import logging

            access = logging.getLogger("uvicorn.access")
            access.setLevel(logging.INFO)
            for handler in access.handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.setStream(sys.stderr)
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def count_served(self) -> None:
        with self._count_lock:
            self.n_served += 1

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._stopped.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()
        self.batcher.close()


def _uvicorn_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGINT / SIGTERM only stop it (no re-raise after shutdown),
        so ``serve`` prints its summary and exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handlers = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

    return Server


def is_loopback(host: str) -> bool:
    """``host`` is this machine only: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, api_key_env: str | None, insecure: bool) -> None:
    """Refuse to serve on a non-loopback interface without a key, unless ``insecure``."""
    if not is_loopback(host) and not api_key_env and not insecure:
        raise PairforgeError(f"--host {host} serves the model to other machines without a key; "
                             f"pass --api-key-env VAR (clients send 'Authorization: Bearer "
                             f"$VAR'), or --insecure to serve anyone who can reach the port")


def serve(model_spec: str, *, host: str = "127.0.0.1", port: int = 8000, served_name: str | None = None,
          max_batch: int = 8, api_key_env: str | None = None, device: str | None = None,
          dtype: str | None = None, quiet: bool = False, insecure: bool = False) -> None:
    """Load ``model_spec`` with :class:`~pairforge.models.hf.HFModel` and serve it until
    interrupted. Prints ``pairforge serve: MODEL on URL`` to stdout once listening (with the
    bound port when ``port`` is 0), and a summary on exit. A non-loopback ``host`` needs
    ``api_key_env`` or ``insecure=True``."""
    from pairforge.models.base import resolve_device
    from pairforge.models.hf import HFModel

    check_exposure(host, api_key_env, insecure)
    resolve_device(device)  # a device this machine lacks: one line before the model loads
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise PairforgeError(f"--api-key-env {api_key_env}: the environment variable is not set; "
                                 f"export it or drop the option to serve without a key")
    model = HFModel(model_spec, device=device, dtype=dtype, batch_size=max_batch, progress=False)
    try:
        server = ChatServer(model, host=host, port=port, served_name=served_name or model_spec,
                            max_batch=max_batch, api_key=api_key, quiet=quiet)
    except OSError as e:
        raise PairforgeError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another "
                             f"--port (0 = any free port)") from None
    print(f"pairforge serve: {model.name} on {server.url} (Ctrl+C to stop)", flush=True)
    t0 = time.monotonic()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"pairforge serve: stopped after {time.monotonic() - t0:.0f} s, "
              f"{server.n_served} request(s) served", file=sys.stderr, flush=True)
