"""Model specs: the one place where a model string becomes (backend, name, revision, url).

Forms::

    hf:PATH_OR_ID[@REVISION]          transformers (CPU or GPU); a GGUF file: hf:PATH.gguf
    vllm:ID[@REVISION]                vLLM offline engine (extra [vllm])
    openai:MODEL@BASE_URL[?OPTIONS]   any OpenAI-compatible server (vllm serve, hosted APIs);
                                      OPTIONS: key=value&… from OPENAI_OPTIONS, e.g.
                                      ?prompt_logprobs=1 (the server returns vLLM-style prompt
                                      log-probs, so the model can score)
    clip:PATH_OR_ID[@REVISION]        transformers CLIPModel
    open_clip:ARCH/PRETRAINED         open_clip (PRETRAINED: a tag or a local checkpoint path)
    default | tiny-vlm | tiny-clip | smollm2
                                      the embedded offline models

A bare path or Hub id with no prefix means ``hf:``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pairforge.errors import PairforgeError

BACKENDS = ("hf", "vllm", "openai", "clip", "open_clip", "embedded")
#: Options an ``openai:`` spec may carry after ``?``, with their types (OpenAIModel arguments).
OPENAI_OPTIONS = {"prompt_logprobs": bool, "logprobs": bool, "images": bool, "max_concurrency": int,
                  "max_retries": int, "timeout": float, "api_key_env": str}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
EMBEDDED = ("tiny-vlm", "tiny-clip", "smollm2")


@dataclass(frozen=True)
class ModelSpec:
    backend: str
    name: str
    revision: str = ""
    base_url: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if self.backend == "embedded":
            return self.name
        if self.backend == "openai":
            query = "&".join(f"{k}={v}" for k, v in self.options)
            return f"openai:{self.name}@{self.base_url}" + (f"?{query}" if query else "")
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.backend}:{self.name}{rev}"


def parse_model_spec(spec: str | None, *, default: str = "tiny-vlm") -> ModelSpec:
    """Parse a model string; ``None``/``"default"`` gives the embedded ``default``."""
    s = (spec or "default").strip()
    if s == "default":
        s = default
    if s in EMBEDDED:
        return ModelSpec("embedded", s)
    backend, sep, rest = s.partition(":")
    if not sep or backend not in BACKENDS or (len(backend) == 1 and rest.startswith("\\")):
        # no known prefix: a path or Hub id for transformers (also covers C:\ paths)
        backend, rest = "hf", s
    if not rest:
        raise PairforgeError(f"model spec '{spec}' names no model; e.g. hf:llava-hf/llava-1.5-7b-hf")
    if backend == "openai":
        model, at, url = rest.rpartition("@")
        if not at or not model or not url.startswith(("http://", "https://")):
            raise PairforgeError(
                f"model spec '{spec}': an OpenAI-compatible model is openai:MODEL@BASE_URL, "
                f"e.g. openai:gpt-4o-mini@https://api.openai.com/v1")
        url, _, query = url.partition("?")
        return ModelSpec("openai", model, base_url=url.rstrip("/"), options=_openai_options(spec, query))
    if backend == "open_clip":
        arch, slash, pretrained = rest.partition("/")
        if not slash or not arch or not pretrained:
            raise PairforgeError(f"model spec '{spec}': open_clip needs ARCH/PRETRAINED, "
                                 f"e.g. open_clip:ViT-B-32/laion2b_s34b_b79k")
        return ModelSpec("open_clip", rest)
    name, at, rev = rest.partition("@")
    if at and not rev:
        raise PairforgeError(f"model spec '{spec}': empty revision after '@'")
    return ModelSpec(backend, name, revision=rev)


def _openai_options(spec: str, query: str) -> tuple[tuple[str, str], ...]:
    """``key=value&…`` of an ``openai:`` spec, checked against :data:`OPENAI_OPTIONS`."""
    out = []
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        kind = OPENAI_OPTIONS.get(key)
        if kind is None or not eq:
            raise PairforgeError(f"model spec '{spec}': unknown option '{item}'; options are "
                                 f"{', '.join(f'{k}=…' for k in OPENAI_OPTIONS)}")
        try:
            openai_option_value(key, value)
        except ValueError:
            raise PairforgeError(f"model spec '{spec}': {key}={value!r} is not a valid "
                                 f"{kind.__name__}{' (1/0, true/false)' if kind is bool else ''}") from None
        out.append((key, value))
    return tuple(out)


def openai_option_value(key: str, value: str):
    """The typed value of an ``openai:`` spec option (raises ValueError when it does not parse)."""
    kind = OPENAI_OPTIONS[key]
    if kind is bool:
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(value)
        return value.lower() in _TRUE
    return kind(value)


def openai_options(spec: ModelSpec) -> dict:
    """The options of an ``openai:`` spec as OpenAIModel keyword arguments."""
    return {k: openai_option_value(k, v) for k, v in spec.options}
