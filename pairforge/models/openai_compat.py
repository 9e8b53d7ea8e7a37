"""The OpenAI-compatible backend of the models protocol (:class:`OpenAIModel`): any server that
speaks ``/v1/chat/completions`` (``vllm serve``, ``pairforge serve``, hosted APIs).

Spec: ``openai:MODEL@BASE_URL``, e.g. ``openai:Qwen/Qwen2-VL-7B-Instruct@http://gpu1:8000/v1``.
Needs the ``openai`` package (extra ``pairforge[openai]``), imported when a model is built.

- **Requests**: one chat completion per request with ``n`` choices; image parts become
  ``image_url`` parts holding base64 PNG data URLs, in the order of the request's images.
  ``temperature``, ``top_p``, ``max_tokens`` and ``seed`` come from :class:`SamplingParams`; the
  ``seed`` sent for a request is :func:`wire_seed` (the global seed and the request id, as the
  HF backend seeds its samples), so results do not depend on order or concurrency.
- **Log-probs**: with ``logprobs=True`` (default) the server's ``choices[j].logprobs.content``
  become ``Completion.token_logprobs``; offsets come from the returned token strings (or their
  UTF-8 ``bytes`` when the strings do not spell the text). A server that returns none gives
  completions with empty log-probs, a warning, and a model without :attr:`Capability.GENERATE`
  (which promises token log-probs); ``logprobs=False`` declares that up front.
- **Scoring** (``prompt_logprobs=True``, declares :attr:`Capability.SCORE`): vLLM's extension of
  chat completions. The response is sent as a final assistant message with
  ``continue_final_message=true, add_generation_prompt=false, prompt_logprobs=0, max_tokens=1``;
  the response's tokens are the tail of the returned ``prompt_logprobs`` whose decoded tokens
  spell the response. Works with ``pairforge serve`` (tested) and ``vllm serve`` (by its
  documented protocol); hosted APIs return no prompt log-probs, so leave it off for them.
- **Reliability**: at most ``max_concurrency`` requests in flight (a thread pool); each is
  retried by ``tenacity`` up to ``max_retries`` times with exponential backoff and jitter
  (:func:`backoff_delay`, at least the server's ``Retry-After``) on HTTP 408 / 429 / 5xx,
  timeouts, connection errors and malformed replies (a 200 with a broken body, which the
  ``openai`` SDK's own retries do not cover, hence tenacity); other HTTP errors fail at once. Errors are one line naming the URL,
  the status and the fix; the API key (from ``$OPENAI_API_KEY`` or ``api_key_env``) is never
  logged or put into a message.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.models.base import (
    Capability,
    Completion,
    Request,
    SamplingParams,
    ScoredResponse,
    require,
)
from pairforge.models.decoding import prefix_offsets, request_seed
from pairforge.models.render import request_key, to_pil
from pairforge.models.spec import ModelSpec, openai_options, parse_model_spec
from pairforge.schema import count_image_parts

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying: request timeout, rate limit, and every 5xx.
RETRY_STATUSES = frozenset({408, 429})
#: Environment variable holding the key unless ``api_key_env`` names another.
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
#: Key sent when the variable is unset (servers started without a key, e.g. ``vllm serve``,
#: ``pairforge serve``, accept any).
NO_KEY = "EMPTY"


class MalformedResponse(Exception):
    """A reply that is not a usable chat completion (bad JSON, missing fields); retried."""


class _Retryable(Exception):
    """A failed attempt worth retrying: what went wrong, the fix to suggest if it is the last,
    and the server's ``Retry-After`` in seconds (0 when absent)."""

    def __init__(self, last: str, fix: str, retry_after: float = 0.0):
        super().__init__(last)
        self.last, self.fix, self.retry_after = last, fix, retry_after


def _import_openai():
    try:
        import openai
        import tenacity  # noqa: F401  (retries)
    except ImportError as e:
        raise PairforgeError(f"openai: models need the '{e.name}' package; "
                             f"`pip install 'pairforge[openai]'` (or `pip install openai tenacity`)") from None
    return openai


# ----------------------------------------------------------------------------- pure pieces


def backoff_delay(attempt: int, base: float, cap: float, u: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential backoff with "equal
    jitter", d = min(cap, base·2^attempt), delay = d/2 + u·d/2 for a uniform u in [0, 1),
    so the delay lies in [d/2, d) and concurrent clients spread out."""
    d = min(cap, base * 2.0 ** attempt)
    return d / 2 + u * d / 2


def wire_seed(sampling: SamplingParams, request: Request) -> int:
    """The ``seed`` sent with ``request``: the HF backend's seed of the request's first sample,
    (``sampling.seed``, request id), reduced to 31 bits (servers take an int32)."""
    return request_seed(sampling.seed, request_key(request), 0) % 2**31


def image_data_url(image: Any, where: str, index: int) -> str:
    """A base64 PNG ``data:`` URL of an image (PIL, path, bytes, datasets dict or array)."""
    buf = io.BytesIO()
    to_pil(image, where, index).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(request: Request, where: str) -> list[dict]:
    """TRL conversational messages → OpenAI chat messages: text parts stay text parts, image
    parts become ``image_url`` parts with the request's images in order."""
    images = iter(enumerate(request.images))
    out = []
    for m in request.messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m.get("role"), "content": content})
            continue
        parts = []
        for p in content or ():
            if p.get("type") == "image":
                i, img = next(images)
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(img, where, i)}})
            else:
                parts.append({"type": "text", "text": p.get("text") or ""})
        out.append({"role": m.get("role"), "content": parts})
    return out


def token_offsets(text: str, tokens: Sequence[str], token_bytes: Sequence[Sequence[int] | None]) -> list[tuple[int, int]]:
    """Character spans of returned tokens in ``text``: cumulative lengths of the token strings
    when they spell the text, else of the UTF-8 decoded cumulative ``bytes`` (a multi-byte
    character split over tokens belongs to every token holding some of its bytes, as in the
    HF backend), then :func:`~pairforge.models.decoding.prefix_offsets` (non-decreasing,
    clipped to the text)."""
    pending = None
    if "".join(tokens) != text and token_bytes and all(b is not None for b in token_bytes):
        lengths, pending, acc = [], [], b""
        for b in token_bytes:
            acc += bytes(b)
            whole = acc.decode("utf-8", errors="ignore")
            lengths.append(len(whole))
            pending.append(len(whole.encode("utf-8")) < len(acc))  # ends inside a character
    else:
        lengths, n = [], 0
        for t in tokens:
            n += len(t)
            lengths.append(n)
    return prefix_offsets(lengths, len(text), pending)


def parse_chat_completion(data: Any, n: int) -> list[Completion]:
    """The ``n`` completions of a chat-completion reply, in choice order; a choice without
    log-probs gets empty ``token_logprobs``. Raises :class:`MalformedResponse` for a reply that
    is not a chat completion."""
    if not isinstance(data, Mapping) or not isinstance(data.get("choices"), list):
        raise MalformedResponse("no 'choices' list")
    choices = data["choices"]
    if not all(isinstance(c, Mapping) and isinstance(c.get("message"), Mapping) for c in choices):
        raise MalformedResponse("a choice has no 'message'")
    if len(choices) != n:
        raise MalformedResponse(f"{len(choices)} choice(s) for n={n}")
    choices = sorted(choices, key=lambda c: c.get("index", 0))
    out = []
    for c in choices:
        text = c["message"].get("content") or ""
        if not isinstance(text, str):
            raise MalformedResponse("a choice's message content is not a string")
        content = (c.get("logprobs") or {}).get("content") or []
        try:
            tokens = [str(t["token"]) for t in content]
            lps = [float(t["logprob"]) for t in content]
            raw_bytes = [t.get("bytes") for t in content]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MalformedResponse("a log-prob entry lacks 'token' or 'logprob'") from None
        offsets = token_offsets(text, tokens, raw_bytes) if tokens else []
        reason = str(c.get("finish_reason") or "")
        if reason == "stop" and offsets and offsets[-1] == (len(text), len(text)):
            # the end-of-turn token that stopped it (vLLM returns its log-prob; the HF and vLLM
            # backends never count it): drop it so that sum/mean log-probs are the text's own
            lps, offsets = lps[:-1], offsets[:-1]
        out.append(Completion(text, lps, offsets, finish_reason=reason))
    return out


def parse_prompt_logprobs(data: Any, response: str) -> ScoredResponse:
    """Per-token log-probs of ``response`` from a vLLM-style reply's ``prompt_logprobs``
    (``[null | {token_id: {logprob, rank, decoded_token}}, …]``, one entry per prompt token, the
    scored response last): the tail whose decoded tokens spell ``response``, with the entries
    just before it that decode to ``""`` (leading bytes of a multi-byte first character, which
    vLLM and ``pairforge serve`` both give an empty string). Raises
    :class:`MalformedResponse` when there is no such list, and :class:`PairforgeError` when its
    tail does not spell the response (the server tokenised across the prompt/response boundary
    or returned top-k alternatives)."""
    entries = data.get("prompt_logprobs") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise MalformedResponse("no 'prompt_logprobs' list (does the server support vLLM's "
                                "prompt_logprobs?)")
    tokens: list[str] = []
    lps: list[float] = []
    spelled = 0
    for e in reversed(entries):
        if spelled >= len(response):
            break
        if not isinstance(e, Mapping) or len(e) != 1:
            break
        (info,) = e.values()
        try:
            tok, lp = str(info["decoded_token"]), float(info["logprob"])
        except (KeyError, TypeError, ValueError):
            raise MalformedResponse("a prompt_logprobs entry lacks 'decoded_token' or 'logprob'") from None
        tokens.append(tok)
        lps.append(lp)
        spelled += len(tok)
    # tokens that decode to "" just before: leading bytes of the response's first character
    k = len(entries) - len(tokens) - 1
    while spelled and k >= 0 and isinstance(entries[k], Mapping) and len(entries[k]) == 1:
        (info,) = entries[k].values()
        if not isinstance(info, Mapping) or info.get("decoded_token") != "":
            break
        tokens.append("")
        lps.append(float(info.get("logprob", math.nan)))
        k -= 1
    tokens.reverse()
    lps.reverse()
    if "".join(tokens) != response:
        raise PairforgeError(
            "the server's prompt log-probs do not line up with the scored response (its last "
            f"tokens spell {''.join(tokens)[-40:]!r}, the response ends {response[-40:]!r}); score "
            "with an hf: or vllm: model instead")
    return ScoredResponse(response, lps, token_offsets(response, tokens, []))


# ----------------------------------------------------------------------------- the backend


class OpenAIModel:
    """A policy VLM behind an OpenAI-compatible server; implements :class:`~pairforge.models.VLM`.

    ``spec``: ``openai:MODEL@BASE_URL`` (or a :class:`ModelSpec`). ``api_key_env``: the
    environment variable holding the key (unset → no key, which servers started without one
    accept). ``images=False`` declares a text-only server; ``logprobs=False`` a server that
    returns no token log-probs; ``prompt_logprobs=True`` one that returns vLLM-style prompt
    log-probs (enables :meth:`score`). ``max_concurrency`` requests in flight; ``max_retries``
    retries per request, waiting :func:`backoff_delay` (``backoff_base``, ``backoff_max``
    seconds); ``timeout`` seconds per HTTP request. ``extra_body`` is merged into every request
    body (server-specific options, e.g. vLLM's ``top_k``). ``progress`` shows a bar over requests.
    """

    def __init__(self, spec: str | ModelSpec, *, api_key_env: str | None = None, images: bool = True,
                 logprobs: bool = True, prompt_logprobs: bool = False, max_concurrency: int = 8,
                 max_retries: int = 4, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 timeout: float = 120.0, extra_body: Mapping[str, Any] | None = None,
                 progress: bool = True, **unsupported: Any):
        spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(str(spec))
        if spec.backend != "openai":
            raise PairforgeError(f"model spec '{spec}': OpenAIModel needs openai:MODEL@BASE_URL")
        self.spec = spec
        self.name = str(spec)
        self.revision = ""
        # options in the spec (openai:M@URL?prompt_logprobs=1) stand in for arguments left at
        # their defaults; an argument passed with another value wins
        given = {"prompt_logprobs": prompt_logprobs, "logprobs": logprobs, "images": images,
                 "max_concurrency": max_concurrency, "max_retries": max_retries, "timeout": timeout,
                 "api_key_env": api_key_env}
        defaults = {k: p.default for k, p in inspect.signature(OpenAIModel.__init__).parameters.items()}
        for key, value in openai_options(spec).items():
            if given[key] == defaults[key]:
                given[key] = value
        prompt_logprobs, logprobs, images = given["prompt_logprobs"], given["logprobs"], given["images"]
        max_concurrency, max_retries = given["max_concurrency"], given["max_retries"]
        timeout, api_key_env = given["timeout"], given["api_key_env"]
        if unsupported:
            raise PairforgeError(f"{self.name}: option(s) {', '.join(sorted(unsupported))} do not "
                                 f"apply to an OpenAI-compatible server (set them on the server); drop them")
        if max_concurrency < 1 or max_retries < 0 or backoff_base < 0 or backoff_max < 0 or timeout <= 0:
            raise PairforgeError(f"{self.name}: need max_concurrency >= 1, max_retries >= 0, "
                                 f"backoff_base/backoff_max >= 0 and timeout > 0")
        self.url = f"{spec.base_url}/chat/completions"
        self.key_env = api_key_env or DEFAULT_KEY_ENV
        key = os.environ.get(self.key_env)
        if api_key_env and not key:
            raise PairforgeError(f"{self.name}: api_key_env={api_key_env!r} but ${api_key_env} is "
                                 f"not set; export the key in that variable")
        self._key = key or NO_KEY
        self.logprobs = logprobs
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.backoff_base, self.backoff_max, self.timeout = backoff_base, backoff_max, timeout
        self.extra_body = dict(extra_body or {})
        self.progress = progress
        caps = {Capability.GENERATE} if logprobs else set()
        if images:
            caps.add(Capability.IMAGES)
        if prompt_logprobs:
            caps.add(Capability.SCORE)
        self.capabilities = frozenset(caps)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.n_attempts = 0  # HTTP attempts made, retries included
        self.n_retries = 0
        openai = _import_openai()
        self._openai = openai
        self._client = openai.OpenAI(api_key=self._key, base_url=spec.base_url, max_retries=0,
                                     timeout=timeout)

    def __repr__(self) -> str:
        return (f"OpenAIModel({self.name!r}, capabilities={sorted(c.value for c in self.capabilities)}, "
                f"max_concurrency={self.max_concurrency})")

    # ------------------------------------------------------------------------- protocol

    def generate(self, requests: Sequence[Request], n: int = 1, sampling: SamplingParams = SamplingParams(),
                 *, drop_images: bool = False) -> list[list[Completion]]:
        """``n`` completions per request, in request order, with token log-probs when the
        server returns them (see the module docs). ``drop_images=True`` sends the text alone."""
        if n < 1:
            raise PairforgeError(f"generate: n={n}; ask for at least one completion per request")
        self._check(requests, drop_images)

        def one(k: int, r: Request) -> list[Completion]:
            body = {"messages": self._messages(r, k, drop_images), "n": n,
                    "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "max_tokens": sampling.max_new_tokens, "seed": wire_seed(sampling, r)}
            if self.logprobs:
                body["logprobs"] = True
            done = self._post(body, f"request {r.id or k}", lambda data: parse_chat_completion(data, n))
            if self.logprobs and any(not c.token_logprobs and c.text for c in done):
                self._lost_logprobs()
            return done

        return self._map(one, requests, "generate")

    def score(self, requests: Sequence[Request], responses: Sequence[str], *,
              drop_images: bool = False) -> list[ScoredResponse]:
        """Per-token log-probs of each response given its request (servers with vLLM-style
        prompt log-probs only: ``prompt_logprobs=True``)."""
        require(self, Capability.SCORE, purpose="score")
        if len(requests) != len(responses):
            raise PairforgeError(f"score: {len(requests)} requests but {len(responses)} responses; "
                                 f"pass one response per request")
        for k, resp in enumerate(responses):
            if not isinstance(resp, str):
                raise BadInput(f"response is {type(resp).__name__}, expected str", where=f"response {k}")
        self._check(requests, drop_images)
        items = list(zip(requests, responses))

        def one(k: int, item: tuple[Request, str]) -> ScoredResponse:
            r, resp = item
            messages = self._messages(r, k, drop_images) + [{"role": "assistant", "content": resp}]
            body = {"messages": messages, "max_tokens": 1, "temperature": 0.0,
                    "add_generation_prompt": False, "continue_final_message": True, "prompt_logprobs": 0}
            return self._post(body, f"request {r.id or k}", lambda data: parse_prompt_logprobs(data, resp))

        return self._map(one, items, "score")

    # ------------------------------------------------------------------------- internals

    def _check(self, requests: Sequence[Request], drop_images: bool) -> None:
        """Fail before any request is sent: image counts match, and no images for a text-only server."""
        for k, r in enumerate(requests):
            where = f"request {r.id or k}"
            n_parts = count_image_parts(r.messages)
            if n_parts != len(r.images):
                raise BadInput(f"the messages have {n_parts} image part(s) but {len(r.images)} "
                               f"image(s) were given; they must match one to one", where=where, field="images")
            if n_parts and not drop_images and Capability.IMAGES not in self.capabilities:
                raise PairforgeError(f"{where}: {self.name} is declared text-only (images=False) and the "
                                     f"prompt has {n_parts} image(s); serve a VLM, or pass drop_images=True")

    def _messages(self, r: Request, k: int, drop_images: bool) -> list[dict]:
        if drop_images:
            r = Request([{"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str)
                          else [p for p in m.get("content") or () if p.get("type") != "image"]}
                         for m in r.messages], (), r.id)
        return to_openai_messages(r, f"request {r.id or k}")

    def _map(self, fn, items: Sequence, what: str) -> list:
        """``fn(k, item)`` for every item on at most ``max_concurrency`` threads, results in
        input order; the first error cancels what has not started and is raised."""
        from tqdm.auto import tqdm

        if not items:
            return []
        results: list = [None] * len(items)
        retries0, t0 = self.n_retries, time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)),
                                  thread_name_prefix="pairforge-openai")
        bar = tqdm(total=len(items), desc=f"{what} {self.name}", unit="req",
                   disable=not self.progress or len(items) < 2, leave=True)
        try:
            futures = {pool.submit(fn, k, it): k for k, it in enumerate(items)}
            for f in as_completed(futures):
                results[futures[f]] = f.result()  # raises the request's error
                bar.update(1)
                bar.set_postfix_str(f"{self.n_retries - retries0} retries")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
        log.info("%s %s: %d request(s), %d retries, %.1f s", what, self.name, len(items),
                 self.n_retries - retries0, time.perf_counter() - t0)
        return results

    def _post(self, body: dict, where: str, parse):
        """POST one chat completion, retried by ``tenacity`` (up to ``max_retries`` times on
        :class:`_Retryable` failures, waiting :meth:`_delay`: backoff with jitter, at least the
        server's ``Retry-After``); ``parse(json)`` may raise MalformedResponse."""
        import tenacity

        params = {"model": self.spec.name, **self.extra_body, **body}

        def count(state) -> None:
            with self._lock:
                self.n_attempts += 1
                self.n_retries += state.attempt_number > 1

        def wait(state) -> float:
            return self._delay(state.attempt_number - 1, state.outcome.exception().retry_after)

        def log_failure(state) -> None:
            log.debug("%s: %s: attempt %d failed: %s", self.name, where, state.attempt_number,
                      state.outcome.exception().last)

        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(self.max_retries + 1), wait=wait,
                                     retry=tenacity.retry_if_exception_type(_Retryable), before=count,
                                     after=log_failure, reraise=True)
        try:
            return retrying(self._attempt, params, where, parse, body.get("n", 1))
        except _Retryable as e:
            raise PairforgeError(f"{self.name}: {where} failed {self.max_retries + 1} time(s) "
                                 f"(max_retries={self.max_retries}); last: {e.last}; {e.fix}") from None

    def _attempt(self, params: dict, where: str, parse, n: int):
        """One HTTP attempt: the parsed reply, :class:`_Retryable` for a failure worth retrying
        (HTTP 408 / 429 / 5xx, timeout, connection error, malformed reply), PairforgeError else."""
        openai = self._openai
        try:
            raw = self._client.post("/chat/completions", body=params, cast_to=str,
                                    options={"timeout": self.timeout})
            return parse(json.loads(raw))
        except openai.APITimeoutError:
            raise _Retryable(f"no response from {self.url} within timeout={self.timeout:g} s",
                             "raise timeout, or lower max_tokens / max_concurrency") from None
        except openai.APIConnectionError as e:
            raise _Retryable(f"cannot connect to {self.url} ({self._scrub(_cause(e))})",
                             "check that the server is running and the base URL is right") from None
        except openai.APIStatusError as e:
            status = e.status_code
            last = f"HTTP {status} from {self.url}: {self._scrub(_error_detail(e))}"
            if status not in RETRY_STATUSES and status < 500:
                raise PairforgeError(f"{self.name}: {where}: {last}; {self._fix_for(status)}") from None
            raise _Retryable(last, "the server is rate-limiting; lower max_concurrency or raise max_retries / "
                             "backoff_base" if status == 429 else
                             "the server is failing; check its logs, or raise max_retries",
                             _retry_after(e)) from None
        except (json.JSONDecodeError, UnicodeDecodeError, MalformedResponse) as e:
            raise _Retryable(f"malformed reply from {self.url} ({self._scrub(str(e))[:120]})",
                             "check that the base URL is an OpenAI-compatible /v1 endpoint serving "
                             f"chat completions (with n={n})") from None

    def _delay(self, attempt: int, retry_after: float) -> float:
        with self._lock:
            u = self._rng.random()
        return max(backoff_delay(attempt, self.backoff_base, self.backoff_max, u),
                   min(retry_after, self.backoff_max))

    def _fix_for(self, status: int) -> str:
        if status in (401, 403):
            return f"set ${self.key_env} (or pass api_key_env) to a key this server accepts"
        if status == 404:
            return (f"check the model name (GET {self.spec.base_url}/models lists them) and that the "
                    f"base URL ends with /v1")
        return "the server rejected the request; check the options it supports (n, logprobs, seed, images)"

    def _scrub(self, text: str) -> str:
        """``text`` with the API key blanked out (servers may echo headers)."""
        return text.replace(self._key, "***") if self._key and self._key != NO_KEY else text

    def _lost_logprobs(self) -> None:
        with self._lock:
            if Capability.GENERATE not in self.capabilities:
                return
            self.capabilities = self.capabilities - {Capability.GENERATE}
        log.warning("%s: the server returned no token log-probs although logprobs=True; completions "
                    "have empty log-probs and the model no longer declares 'generate' (pass "
                    "logprobs=False for this server)", self.name)


def _error_detail(e: Any) -> str:
    """The server's error message (``error.message`` of an OpenAI error body, else the body
    text), one line, at most 200 characters."""
    body = getattr(e, "body", None)
    msg = None
    if isinstance(body, Mapping):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, Mapping) else str(err)
    if msg is None:
        try:
            msg = e.response.text
        except Exception:
            msg = ""
    lines = str(msg).strip().splitlines()
    line = lines[0] if lines else (getattr(e.response, "reason_phrase", "") or "no message")
    return line if len(line) <= 200 else line[:197] + "..."


def _cause(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = str(cause or e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def _retry_after(e: Any) -> float:
    """The ``Retry-After`` header in seconds (0 when absent or a date)."""
    try:
        return max(0.0, float(e.response.headers.get("retry-after", 0)))
    except (TypeError, ValueError, AttributeError):
        return 0.0
