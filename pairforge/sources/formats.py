"""Preference-set formats: detect a record's layout and turn it into canonical messages.

Pure logic, no I/O: a converter takes one record (a dict) and returns a :class:`Draft` whose
images are still the raw values of the record (paths, bytes, structs); the reader resolves
them (:mod:`pairforge.sources.images`) and builds the row with ``make_pair``. A bad record
raises :class:`~pairforge.errors.BadInput` naming the field; the reader adds file and row.

Detection looks at the keys of the first record; the first rule that matches wins:

1. ``canonical``    every column of ``pairforge.schema.CORE_FEATURES``
2. ``swift``        ``messages`` and one of ``rejected_response``, ``rejected_messages``,
                    ``rejected_images`` (ms-swift's RLHF layouts)
3. ``llava``        ``conversations`` with ``output_1`` and ``output_2``; or ``conversations``,
                    ``chosen``, ``rejected`` with ``image`` (singular) and no ``images``
4. ``llamafactory`` ``conversations``, ``chosen``, ``rejected`` (ShareGPT ranking); or
                    ``chosen_messages`` and ``rejected_messages`` (LLaMA-Factory v1 JSONL)
5. ``rlaif-v``      ``question``, ``chosen``, ``rejected``
6. ``trl``          ``prompt``, ``chosen``, ``rejected``; or only ``chosen`` and ``rejected``
                    (TRL's implicit prompt: the prompt is their common prefix)

Implicit prompts follow TRL's ``extract_prompt``: conversational rows split at the first
message where chosen and rejected differ; standard (string) rows at the first character, a
space just before it going to the answers (``"The sky is blue."`` / ``"The sky is green."``
→ prompt ``"The sky is"``, answers ``" blue."`` / ``" green."``). What follows the shared
prompt must be assistant turns only; LLaMA-Factory v1 and ms-swift ``rejected_messages`` rows
are split the same way.

``<image>`` tags in prompt texts become image parts in order; the text between tags is kept
exactly as written (only empty pieces are dropped), so an export writes the same text back.
The number of image parts must equal the number of images, except that a prompt with no
image part at all gets the images first, in its first user turn.

A canonical pair holds one image list for both answers, so a row whose rejected answer comes
with other images (ms-swift ``rejected_images`` that differ from ``images``, e.g. pairs where
only the image differs) is skipped with that reason (field ``rejected_images``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.schema import (
    CORE_FEATURES,
    ROLES,
    assistant_message,
    count_image_parts,
    image_part,
    text_part,
)

FORMATS = ("canonical", "trl", "rlaif-v", "llava", "llamafactory", "swift")

IMAGE_TAG = "<image>"

#: RLAIF-V columns kept as provenance in ``source_meta``.
RLAIFV_META = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")

#: ms-swift's columns for the rejected side (any one makes a ``messages`` record ms-swift's).
SWIFT_REJECTED = ("rejected_response", "rejected_messages", "rejected_images")

#: ShareGPT speaker names (LLaVA, LLaMA-Factory) → roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class Draft:
    """One record as canonical messages; ``images`` are the record's raw image values."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    images: list[Any]
    record_id: str | None = None  # the record's own ``id``: the pair id is derived from it
    source_id: str | None = None  # ``id`` or ``idx``; the reader falls back to the row index
    source_meta: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- detection


def detect_format(record: Mapping, *, where: str | None = None) -> str:
    """The format of a record, by its keys (rules in the module docstring)."""
    keys = set(record)
    if set(CORE_FEATURES) <= keys:
        return "canonical"
    if "messages" in keys and keys & set(SWIFT_REJECTED):
        return "swift"
    if {"chosen_messages", "rejected_messages"} <= keys:
        return "llamafactory"
    if "conversations" in keys:
        if {"output_1", "output_2"} <= keys:
            return "llava"
        if {"chosen", "rejected"} <= keys:
            return "llava" if "image" in keys and "images" not in keys else "llamafactory"
    if {"question", "chosen", "rejected"} <= keys:
        return "rlaif-v"
    if {"chosen", "rejected"} <= keys and not keys & {"messages", "conversations"}:
        return "trl"  # with a prompt, or with the prompt implicit in both answers
    prefix = f"{where}: " if where else ""
    raise PairforgeError(f"{prefix}cannot detect the format from the first record's keys "
                         f"{sorted(keys)}; pass --format, one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- pieces


def _bad(field: str, reason: str) -> BadInput:
    return BadInput(reason, field=field)


def _require(rec: Mapping, key: str) -> Any:
    if key not in rec:
        raise _bad(key, "missing")
    if rec[key] is None:
        raise _bad(key, "is None")
    return rec[key]


def _text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _bad(field, "is empty")
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise _bad(field, f"expected a list, got {type(value).__name__}")
    return value


def tagged_parts(text: str) -> list[dict]:
    """Content parts of a text: each ``<image>`` tag becomes an image part, in order; the
    text between tags is kept exactly (``"<image>\\nQ"`` → image, ``"\\nQ"``), empty pieces
    are dropped. ``pairforge.publish.export.tagged_text`` is the inverse."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            parts.append(image_part())
        if piece:
            parts.append(text_part(piece))
    return parts


def _content(value: Any, field: str, *, tags: bool) -> list[dict]:
    """A message content (string or list of parts) as canonical parts."""
    if isinstance(value, str):
        return tagged_parts(value) if tags else [text_part(value)]
    if isinstance(value, list):
        parts = []
        for p in value:
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "image":
                parts.append(image_part())
            elif kind == "text" and isinstance(p.get("text"), str):
                parts.append(text_part(p["text"]))
            else:
                raise _bad(field, f"content part {p!r:.60} is not {{'type': 'image'}} or "
                                  f"{{'type': 'text', 'text': str}}")
        return parts
    raise _bad(field, f"message content must be a string or a list of parts, "
                      f"got {type(value).__name__}")


def _messages(value: Any, field: str, *, tags: bool) -> list[dict]:
    """Role/content messages (TRL conversational, ms-swift) as canonical messages."""
    out = []
    for j, m in enumerate(_list(value, field)):
        if not isinstance(m, Mapping):
            raise _bad(field, f"message {j} is {type(m).__name__}, expected a dict with role "
                              f"and content")
        if m.get("role") not in ROLES:
            raise _bad(field, f"message {j} has role {m.get('role')!r}; expected one of {ROLES}")
        out.append({"role": m["role"], "content": _content(m.get("content"), field, tags=tags)})
    return out


def _sharegpt(turns: Any, field: str) -> list[dict]:
    """ShareGPT turns (``from``/``value``) as canonical messages, ``<image>`` tags parsed."""
    out = []
    for j, t in enumerate(_list(turns, field)):
        if not isinstance(t, Mapping):
            raise _bad(field, f"turn {j} is {type(t).__name__}, expected a dict with from "
                              f"and value")
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise _bad(field, f"turn {j} is from {t.get('from')!r}; expected one of "
                              f"{sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": tagged_parts(_text(t.get("value"), field))})
    return out


def _prompt_ends_with_user(prompt: list[dict], field: str, what: str) -> list[dict]:
    if not prompt:
        raise _bad(field, f"{what} is an empty list: no question; add the turns or drop the "
                          f"record")
    if prompt[-1]["role"] != "user":
        raise _bad(field, f"{what} must end with a user turn (the question)")
    return prompt


def _response(value: Any, field: str) -> list[dict]:
    """A chosen/rejected value: a string, a ShareGPT turn ``{"from", "value"}``, or a list
    of role/content messages (TRL conversational)."""
    if isinstance(value, str):
        return [assistant_message(_text(value, field))]
    if isinstance(value, Mapping):
        text = value.get("value", value.get("content"))
        if text is None:
            raise _bad(field, "a response dict needs a 'value' (or 'content') string")
        return [assistant_message(_text(text, field))]
    if isinstance(value, list):
        msgs = _messages(value, field, tags=False)
        if not msgs:
            raise _bad(field, "is an empty list of messages")
        if count_image_parts(msgs):
            raise _bad(field, "a response must be text only, found an image part")
        return msgs
    raise _bad(field, f"expected a string, a {{'from', 'value'}} dict or a list of messages, "
                      f"got {type(value).__name__}")


def _images(rec: Mapping, key: str, *, required: bool = False) -> list[Any]:
    """The raw image values under ``key``: a list, or (for ``image``) a single value."""
    if key not in rec or rec[key] is None:
        if required:
            raise _bad(key, "missing" if key not in rec else "is None")
        return []
    value = rec[key]
    if isinstance(value, list):
        return value
    if key == "images":
        raise _bad(key, f"expected a list of images, got {type(value).__name__}")
    return [value]


def place_images(prompt: list[dict], n_images: int) -> list[dict]:
    """Check the prompt's image parts against ``n_images``; a prompt without any image part
    gets the images first, in its first user turn."""
    if not prompt:
        raise _bad("prompt", "is an empty list of messages: no question; add it or drop the "
                             "record")
    n_parts = count_image_parts(prompt)
    if n_parts == n_images:
        return prompt
    if n_parts == 0:
        for m in prompt:
            if m["role"] == "user":
                m["content"] = [image_part() for _ in range(n_images)] + m["content"]
                return prompt
    raise _bad("images", f"prompt has {n_parts} image placeholder(s) but the record gives "
                         f"{n_images} image(s); they must match one to one")


def _ids(rec: Mapping) -> tuple[str | None, str | None]:
    """(the record's own ``id``, its ``id`` or ``idx`` for ``source_id``)."""
    rid = rec.get("id")
    rid = None if rid is None else str(rid)
    idx = rec.get("idx")
    return rid, rid if rid is not None else (None if idx is None else str(idx))


def _draft(rec: Mapping, prompt: list[dict], chosen: list[dict], rejected: list[dict],
           images: list[Any], **meta: Any) -> Draft:
    record_id, source_id = _ids(rec)
    return Draft(place_images(prompt, len(images)), chosen, rejected, images,
                 record_id=record_id, source_id=source_id, **meta)


# ----------------------------------------------------------------------------- converters


def from_trl(rec: Mapping) -> Draft:
    """TRL standard (strings) or conversational (message lists); ``images`` or ``image``; the
    prompt explicit (``prompt``) or implicit in ``chosen`` and ``rejected``."""
    if rec.get("images") is not None and rec.get("image") is not None:
        raise _bad("images", "the record has both 'image' and 'images'; keep one")
    images = _images(rec, "images") if rec.get("images") is not None else _images(rec, "image")
    if "prompt" not in rec:
        prompt, chosen, rejected = _implicit_prompt(_require(rec, "chosen"),
                                                    _require(rec, "rejected"))
        return _draft(rec, prompt, chosen, rejected, images)
    raw = _require(rec, "prompt")
    if isinstance(raw, str):
        prompt = [{"role": "user", "content": tagged_parts(_text(raw, "prompt", allow_empty=True))}]
    else:
        prompt = _messages(raw, "prompt", tags=True)
    return _draft(rec, prompt, _response(_require(rec, "chosen"), "chosen"),
                  _response(_require(rec, "rejected"), "rejected"), images)


def shared_prefix(chosen: Sequence, rejected: Sequence) -> int:
    """Length of the common prefix of two sequences (TRL ``extract_prompt``'s split point,
    before its space rule)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    return n


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL implicit prompt: (prompt, chosen, rejected) from two full texts or conversations."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = shared_prefix(chosen, rejected)
        if n and chosen[n - 1] == " ":  # TRL: the space before the split goes to the answers
            n -= 1
        if n == min(len(chosen), len(rejected)):
            raise _bad("rejected", "chosen and rejected are the same text, or one is a prefix "
                                   "of the other, so no prompt can be split off; fix the row "
                                   "or give a 'prompt' column")
        if not chosen[:n].strip():
            raise _bad("prompt", "no 'prompt' column and chosen and rejected share no prefix, "
                                 "so the prompt is empty; give a 'prompt' column")
        prompt = [{"role": "user", "content": tagged_parts(chosen[:n])}]
        return prompt, [assistant_message(chosen[n:])], [assistant_message(rejected[n:])]
    return split_conversations(_messages(chosen, "chosen", tags=True),
                               _messages(rejected, "rejected", tags=True),
                               ("chosen", "rejected"))


def split_conversations(chosen: list, rejected: list,
                        fields: tuple[str, str]) -> tuple[list, list, list]:
    """(shared prompt, chosen answer turns, rejected answer turns) of two full conversations,
    split where they first differ; what follows must be assistant turns, text only. The items
    may be messages or ``(message, raw images)`` pairs (then compared with their images)."""
    n = shared_prefix(chosen, rejected)

    def msg(m: Any) -> dict:
        return m[0] if isinstance(m, tuple) else m

    if n == 0:
        raise _bad(fields[1], f"{fields[0]} and {fields[1]} differ from their first message on, "
                              f"so they share no prompt; a pair needs one prompt")
    rest = {fields[0]: chosen[n:], fields[1]: rejected[n:]}
    for name, turns in rest.items():
        if not turns:
            raise _bad(name, f"{fields[0]} and {fields[1]} are the same conversation, or one "
                             f"ends where the other goes on: {name} has no answer after the "
                             f"shared prompt")
        if any(msg(m)["role"] != "assistant" for m in turns):
            raise _bad(name, f"{fields[0]} and {fields[1]} differ before their last user turn "
                             f"(different prompts); a pair shares one prompt, so only the "
                             f"assistant's answer may differ")
        if count_image_parts([msg(m) for m in turns]):
            raise _bad(name, "an answer must be text only, found an image part")
    return chosen[:n], rest[fields[0]], rest[fields[1]]


def from_rlaifv(rec: Mapping) -> Draft:
    """RLAIF-V (openbmb/RLAIF-V-Dataset): question, chosen, rejected, image + provenance."""
    question = _text(_require(rec, "question"), "question")
    prompt = [{"role": "user", "content": tagged_parts(question)}]
    meta = {k: str(rec[k]) for k in RLAIFV_META if rec.get(k) is not None}
    return _draft(rec, prompt, _response(_require(rec, "chosen"), "chosen"),
                  _response(_require(rec, "rejected"), "rejected"),
                  _images(rec, "image", required=True), source_meta=meta)


def _preference(rec: Mapping) -> int:
    value = _require(rec, "preference")
    if not isinstance(value, bool):
        if value in (1, "1", "output_1"):
            return 1
        if value in (2, "2", "output_2"):
            return 2
    raise _bad("preference", f"is {value!r}; expected 1 or 2 (or 'output_1' / 'output_2')")


def from_llava(rec: Mapping) -> Draft:
    """LLaVA / VLFeedback JSON: conversations + output_1/output_2 + preference, or
    chosen/rejected."""
    prompt = _prompt_ends_with_user(_sharegpt(_require(rec, "conversations"), "conversations"),
                                    "conversations", "conversations")
    if "output_1" in rec or "output_2" in rec:
        first = _response(_require(rec, "output_1"), "output_1")
        second = _response(_require(rec, "output_2"), "output_2")
        chosen, rejected = (first, second) if _preference(rec) == 1 else (second, first)
    else:
        chosen = _response(_require(rec, "chosen"), "chosen")
        rejected = _response(_require(rec, "rejected"), "rejected")
    return _draft(rec, prompt, chosen, rejected, _images(rec, "image"))


def from_llamafactory(rec: Mapping) -> Draft:
    """LLaMA-Factory ranking ShareGPT (conversations, chosen/rejected turns, images, system),
    or its v1 JSONL (``chosen_messages`` / ``rejected_messages``)."""
    if "conversations" not in rec and ("chosen_messages" in rec or "rejected_messages" in rec):
        return _from_llamafactory_v1(rec)
    prompt = _prompt_ends_with_user(_sharegpt(_require(rec, "conversations"), "conversations"),
                                    "conversations", "conversations")
    if rec.get("system") is not None:
        prompt.insert(0, {"role": "system", "content": [text_part(_text(rec["system"], "system"))]})
    return _draft(rec, prompt, _response(_require(rec, "chosen"), "chosen"),
                  _response(_require(rec, "rejected"), "rejected"), _images(rec, "images"))


#: LLaMA-Factory v1 content part types that carry an image (its value is the path or URL).
V1_IMAGE_TYPES = ("image_url", "image")


def _v1_message(m: Any, j: int, field: str) -> tuple[dict, tuple]:
    """One LLaMA-Factory v1 message → (canonical message, its raw image values). Content is a
    list of ``{"type": "text" | "image_url", "value": ...}`` parts (or a plain string);
    ``loss_weight`` and other keys are ignored."""
    if not isinstance(m, Mapping):
        raise _bad(field, f"message {j} is {type(m).__name__}, expected a dict with role and "
                          f"content")
    if m.get("role") not in ROLES:
        raise _bad(field, f"message {j} has role {m.get('role')!r}; expected one of {ROLES}")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": [text_part(content)]}, ()
    parts, images = [], []
    for p in _list(content, field):
        kind = p.get("type") if isinstance(p, Mapping) else None
        value = p.get("value", p.get("text")) if isinstance(p, Mapping) else None
        if kind == "text" and isinstance(value, str):
            parts.append(text_part(value))
        elif kind in V1_IMAGE_TYPES and value is not None:
            parts.append(image_part())
            images.append(value)
        else:
            raise _bad(field, f"message {j} has a content part {p!r:.60} that is not "
                              f"{{'type': 'text', 'value': str}} or {{'type': 'image_url', "
                              f"'value': path}} (pairforge pairs hold text and images)")
    return {"role": m["role"], "content": parts}, tuple(images)


def _from_llamafactory_v1(rec: Mapping) -> Draft:
    turns = {f: [_v1_message(m, j, f) for j, m in enumerate(_list(_require(rec, f), f))]
             for f in ("chosen_messages", "rejected_messages")}
    prompt, chosen, rejected = split_conversations(turns["chosen_messages"],
                                                   turns["rejected_messages"],
                                                   ("chosen_messages", "rejected_messages"))
    images = [v for _, imgs in prompt for v in imgs]
    prompt = _prompt_ends_with_user([m for m, _ in prompt], "chosen_messages",
                                    "the shared messages before the answers")
    return _draft(rec, prompt, [m for m, _ in chosen], [m for m, _ in rejected], images)


def from_swift(rec: Mapping) -> Draft:
    """ms-swift: messages (the last assistant turn is chosen) with ``rejected_response`` (the
    rejected answer) or ``rejected_messages`` (the whole rejected conversation), images;
    ``rejected_images`` must equal ``images`` (one image list per pair)."""
    msgs = _list(_require(rec, "messages"), "messages")
    if not msgs or not isinstance(msgs[-1], Mapping) or msgs[-1].get("role") != "assistant":
        raise _bad("messages", "the last message must be the assistant's (chosen) answer")
    images = _images(rec, "images")
    if rec.get("rejected_images") is not None:
        rejected_images = _images(rec, "rejected_images")
        if rejected_images != images:
            only = "rejected_response" not in rec and "rejected_messages" not in rec
            raise _bad("rejected_images",
                       ("only the images differ (same text, other rejected_images): an "
                        if only else "the rejected answer comes with other images than the "
                        "chosen one: an ") + "image-contrast pair, which a canonical pair (one "
                       "image list for both answers) cannot hold; the row is skipped")
    if rec.get("rejected_messages") is not None and "rejected_response" not in rec:
        c = _messages(msgs, "messages", tags=True)
        r = _messages(rec["rejected_messages"], "rejected_messages", tags=True)
        prompt, chosen, rejected = split_conversations(c, r, ("messages", "rejected_messages"))
        prompt = _prompt_ends_with_user(prompt, "messages",
                                        "the shared messages before the answers")
        return _draft(rec, prompt, chosen, rejected, images)
    prompt = _prompt_ends_with_user(_messages(msgs[:-1], "messages", tags=True), "messages",
                                    "the messages before the last assistant answer")
    chosen = _response(msgs[-1].get("content"), "messages")
    if "rejected_response" not in rec:
        raise _bad("rejected_response", "missing (and no rejected_messages); ms-swift DPO rows "
                                        "need one of them")
    rejected = _response(_require(rec, "rejected_response"), "rejected_response")
    return _draft(rec, prompt, chosen, rejected, images)


#: Converters of the non-canonical formats (canonical rows pass through the reader).
CONVERTERS: dict[str, Callable[[Mapping], Draft]] = {
    "trl": from_trl,
    "rlaif-v": from_rlaifv,
    "llava": from_llava,
    "llamafactory": from_llamafactory,
    "swift": from_swift,
}


def check_format(name: str | None) -> None:
    """Raise a one-line error for a format name not in :data:`FORMATS`."""
    if name is not None and name not in FORMATS:
        raise PairforgeError(f"unknown format {name!r}; pass --format, one of {', '.join(FORMATS)}")
