"""Render and encode helpers shared by the model backends (HF, vLLM, OpenAI-compatible, CLIP)
and the trainer: chat-template messages, images to PIL, request seeds' keys, stop tokens,
whole-character prefix lengths, and where a model spec's files come from (dtype, folder or Hub
id, pinned revision, one-line load errors). Public: the backends import these names, never
another module's private helpers. torch and transformers are imported inside the functions."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pairforge.errors import BadInput, PairforgeError, first_line
from pairforge.models.base import Completion, Request
from pairforge.models.spec import ModelSpec
from pairforge.schema import message_text, stable_id

#: End-of-turn tokens of common chat templates; generation stops at any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "</s>", "<|end_of_text|>", "<|eot|>")

#: A Hub id (``owner/name`` or ``name``).
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def template_message(m: Mapping, keep_images: bool, as_text: bool) -> dict:
    """A message as chat templates expect it: parts for a VLM (image parts without a text
    key), one string for a text-only model; image parts dropped unless ``keep_images``."""
    content = m.get("content")
    if as_text:
        return {"role": m.get("role"), "content": message_text(m)}
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    else:
        parts = []
        for part in content or ():
            if part.get("type") == "image":
                if keep_images:
                    parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.get("text") or ""})
    return {"role": m.get("role"), "content": parts}


def to_pil(image: Any, where: str, index: int):
    """A PIL RGB image from a PIL image, a path, bytes, a ``datasets`` image dict or an array."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, Mapping) and (image.get("bytes") or image.get("path")):
            img = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        elif isinstance(image, (str, Path)):
            img = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        elif isinstance(image, np.ndarray):
            img = Image.fromarray(image)
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}")
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:
        raise BadInput(f"image {index} cannot be read ({first_line(e)}); pass a PIL image, a "
                       f"path, bytes or a datasets image dict", where=where, field="images") from None


def request_key(r: Request) -> str:
    """The request id that seeds its samples; without an id, a hash of its messages."""
    return r.id or stable_id("messages", repr(list(r.messages)))


def copy_completion(c: Completion) -> Completion:
    return Completion(c.text, list(c.token_logprobs), list(c.offsets), token_ids=list(c.token_ids),
                      finish_reason=c.finish_reason)


def stop_ids(tokenizer, generation_config) -> frozenset[int]:
    """EOS ids of the generation config and tokenizer, plus known end-of-turn tokens."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(int(i) for i in ids)


def whole_characters(prefix: str, text: str) -> int:
    """Length of a decoded prefix in whole characters: replacement characters at its end that
    the text does not have there (the bytes of a character cut by the prefix) are not counted."""
    n = len(prefix)
    while n and prefix[n - 1] == "\ufffd" and text[n - 1:n] != "\ufffd":
        n -= 1
    return n


def resolve_dtype(dtype, device):
    """A torch dtype from a name or dtype; default float32 on CPU, bfloat16 (else float16) on CUDA."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise PairforgeError(f"dtype={dtype!r}: not a torch dtype; use float32, bfloat16 or float16")
    return resolved


def resolve_source(spec: ModelSpec, revision: str | None) -> tuple[str, str | None]:
    """The folder or Hub id that ``from_pretrained`` loads for ``spec``, and the revision."""
    from pairforge.models.local import convert_gguf, gguf_cache_dir, smollm2_path

    if spec.backend == "embedded":
        if spec.name == "smollm2":
            return str(smollm2_path()), None
        if spec.name == "tiny-vlm":
            from pairforge.world.models import TINY_VLM_PATH

            if not (TINY_VLM_PATH / "config.json").is_file():
                raise PairforgeError(f"tiny-vlm: no checkpoint at {TINY_VLM_PATH}; reinstall pairforge "
                                     f"or train it with scripts/train_tiny_vlm.py")
            return str(TINY_VLM_PATH), None
        raise PairforgeError(f"model spec '{spec}' is a CLIP scorer, not a policy model; "
                             f"use tiny-vlm, smollm2 or hf:PATH_OR_ID")
    if spec.backend != "hf":
        raise PairforgeError(f"model spec '{spec}': HFModel runs hf: models (transformers); "
                             f"load {spec.backend}: specs with their own backend")
    name, rev = spec.name, revision or spec.revision or None
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise PairforgeError(f"model '{spec}': no such GGUF file {name}; pass the path of a .gguf file")
        return str(convert_gguf(path, gguf_cache_dir(path))), None
    return folder_or_hub_id(spec, path, rev, example="llava-hf/llava-1.5-7b-hf")


def folder_or_hub_id(spec: ModelSpec, path: Path, rev: str | None, *,
                     example: str) -> tuple[str, str | None]:
    """``(source, revision)`` of a spec naming a local folder (no revision) or a Hub id; a
    one-line error when it is neither (``example``: a Hub id of the right kind for the message)."""
    if path.exists():
        return str(path), None
    name = spec.name
    if not HUB_ID.match(name) or name.startswith((".", "~")):
        raise PairforgeError(f"model '{spec}': no such folder {name}; pass a folder written by "
                             f"save_pretrained or a Hub id such as {example}")
    return name, rev


def pin_revision(source: str, revision: str | None) -> tuple[str | None, str]:
    """(revision to load, commit hash): a Hub id's revision resolved to the commit it points
    to (from the local cache when offline), so every file of the load comes from that commit
    and the hash can be recorded; ``""`` for a local folder."""
    if Path(source).exists():
        return None, ""
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(source, revision)
    except Exception:
        return revision, ""
    commit = getattr(resolved, "resolved", None) or (
        resolved if resolved and re.fullmatch(r"[0-9a-f]{40}", str(resolved)) else "")
    return resolved, str(commit or "")


def load_error(name: str, source: str, e: BaseException) -> str:
    from huggingface_hub import constants

    if "trust_remote_code" in str(e):
        return (f"model '{name}': its code lives in the model repository (a remote-code model, "
                f"not part of transformers) and would need trust_remote_code, which pairforge "
                f"enables only when passed (HFModel(..., trust_remote_code=True)); or use a "
                f"transformers-native checkpoint of the family")
    if Path(source).exists():
        return (f"model '{name}': {source} is not a loadable transformers model ({first_line(e)}); "
                f"pass a folder written by save_pretrained (config.json, weights, tokenizer)")
    if constants.HF_HUB_OFFLINE:
        return (f"model '{name}': '{source}' is not in the local Hugging Face cache and the Hub is "
                f"offline (HF_HUB_OFFLINE=1); download it where the Hub is reachable "
                f"(`hf download {source}`) or pass a local folder")
    return (f"model '{name}': '{source}' could not be loaded ({first_line(e)}); check the Hub id "
            f"and revision, or pass a local folder")
