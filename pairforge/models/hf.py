"""The Hugging Face transformers backend of the models protocol (:class:`HFModel`).

One class runs any image-text-to-text model (LLaVA, Qwen2-VL / Qwen2.5-VL, … through
``AutoModelForImageTextToText`` + ``AutoProcessor``) and any text-only causal LM
(``AutoModelForCausalLM`` + ``AutoTokenizer``), on CPU or GPU, with the model's own chat
template.

Conventions, shared by every method:

- **Prompt**: ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``,
  then the processor (tokenizer) with the images. Special tokens are added by the tokenizer
  only when the rendered template does not already start with the BOS token.
- **Response tokens**: the response is tokenised on its own (no special tokens) and appended
  to the prompt tokens. Only the response tokens are scored: the model's end-of-turn token
  is *not* appended, so ``sum_logprob`` is log π(y|x) of the text itself and does not depend
  on how a template closes a turn. Offsets come from the fast tokenizer, each span extended
  back over the whitespace before its token, so spans tile the response text.
- **Scoring**: pairs are batched longest first; prompt and responses go through one forward
  pass per batch, with logits (and the log-softmax normaliser) computed only where they
  predict a response token. Responses that share a prompt (chosen / rejected, N candidates)
  are packed into one sequence after a single copy of the prompt, each response attending
  to the prompt and itself only, so the prompt and its images are computed once.
- **Log-probs** are always those of the model distribution at temperature 1 (no top-p), also
  for sampled and contrastive completions, so that ``generate`` and ``score`` agree.
- **Seeds**: sample ``j`` of a request is drawn from its own ``torch.Generator`` seeded by
  (``sampling.seed``, request id, ``j``): results do not depend on batch size, batch
  composition, order or device.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairforge.errors import BadInput, PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.models.base import (
    Capability,
    Completion,
    Request,
    SamplingParams,
    ScoredResponse,
    resolve_device,
)
from pairforge.models.decoding import (
    choose_tokens,
    contrastive_amplified_logits,
    prefix_offsets,
    request_seed,
    tile_offsets,
    token_logprobs,
)
from pairforge.models.render import (
    copy_completion,
    load_error,
    pin_revision,
    request_key,
    resolve_dtype,
    resolve_source,
    stop_ids,
    template_message,
    to_pil,
    whole_characters,
)
from pairforge.models.spec import ModelSpec, parse_model_spec
from pairforge.schema import count_image_parts


@dataclass
class _Prompt:
    """A request rendered for the model: the chat-template text and its PIL images."""

    text: str
    images: list
    n_text_tokens: int = 0


@dataclass
class _Batch:
    """Model inputs for rows of prompt + response(s), right-padded, with the positions whose
    logits predict each response token."""

    inputs: dict[str, Any]
    keep: torch.Tensor          # (B, T) bool: positions whose logits are needed
    source: torch.Tensor        # (N,) for each response token, its row among the kept logits
    targets: torch.Tensor       # (N,) the response tokens, responses concatenated
    prompt_lengths: list[int]   # per row
    response_lengths: list[int]  # per response, rows concatenated


#: Image-text-to-text model types whose image tokens are not one patch grid per image, so
#: answer-to-image attention maps (P2-DPO focus crops) are not defined for them; why, per type.
TILED_IMAGE_TYPES = {
    "llava_next": "splits each image into anyres tiles plus a base image with row newlines",
    "llava_onevision": "splits each image into anyres tiles plus a base image with row newlines",
    "idefics3": "splits each image into tiles plus a global image, each pixel-shuffled",
    "smolvlm": "splits each image into tiles plus a global image, each pixel-shuffled",
}
#: Families whose attention maps are tested (tests/test_model_families.py).
GRID_IMAGE_FAMILIES = ("LLaVA-1.5", "Qwen2-VL", "Qwen2.5-VL", "Gemma 3", "PaliGemma")

#: At most this many responses share one packed sequence with their prompt.
MAX_RESPONSES_PER_ROW = 8


class HFModel:
    """A policy VLM (or text-only LM) run by transformers; implements :class:`~pairforge.models.VLM`.

    ``spec_or_path``: a model spec (``hf:PATH_OR_ID[@REV]``, ``hf:FILE.gguf``, ``smollm2``,
    ``tiny-vlm``) or a folder. ``device`` defaults to CUDA when available; ``dtype`` to
    float32 on CPU and bfloat16 on GPU. ``batch_size`` counts sequences per forward pass (a
    scoring sequence holds one prompt and up to :data:`MAX_RESPONSES_PER_ROW` responses).
    ``revision`` overrides the spec's ``@REV``. ``progress`` shows a bar over batches.
    ``attn_implementation`` is passed to ``from_pretrained`` (default: transformers' choice,
    SDPA where available); attention maps switch to eager attention for their call.
    ``trust_remote_code`` (default off) runs model code from the model repository; only
    when the user passes it.
    """

    def __init__(self, spec_or_path: str | Path | ModelSpec, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = 8,
                 revision: str | None = None, *, progress: bool = True,
                 attn_implementation: str | None = None, trust_remote_code: bool = False):
        spec = spec_or_path if isinstance(spec_or_path, ModelSpec) else parse_model_spec(str(spec_or_path))
        if batch_size < 1:
            raise PairforgeError(f"batch_size={batch_size}: must be >= 1")
        self.spec = spec
        self.name = str(spec)
        self.batch_size = batch_size
        self.progress = progress
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        source, rev = resolve_source(spec, revision)
        self.trust_remote_code = bool(trust_remote_code)
        self._load(source, rev, attn_implementation)
        caps = {Capability.GENERATE, Capability.SCORE, Capability.ATTENTION, Capability.CONTRASTIVE}
        if self.is_vlm:
            caps.add(Capability.IMAGES)
            if self.model_type in TILED_IMAGE_TYPES:
                caps.discard(Capability.ATTENTION)
        self.capabilities = frozenset(caps)

    def __repr__(self) -> str:
        kind = "image-text-to-text" if self.is_vlm else "text-only"
        return f"HFModel({self.name!r}, {kind}, device={self.device}, dtype={self.dtype})"

    # ------------------------------------------------------------------------- loading

    def _load(self, source: str, revision: str | None, attn_implementation: str | None) -> None:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        revision, self.revision = pin_revision(source, revision)
        kw: dict[str, Any] = {"revision": revision} if revision else {}
        if self.trust_remote_code:
            kw["trust_remote_code"] = True
        try:
            config = AutoConfig.from_pretrained(source, **kw)
            self.is_vlm = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            if self.is_vlm:
                self.processor = _load_processor(AutoProcessor, source, kw)
                self.tokenizer = self.processor.tokenizer
                auto = AutoModelForImageTextToText
            else:
                self.processor = None
                self.tokenizer = AutoTokenizer.from_pretrained(source, **kw)
                auto = AutoModelForCausalLM
            model = auto.from_pretrained(source, dtype=self.dtype, attn_implementation=attn_implementation,
                                         **kw)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise PairforgeError(load_error(self.name, source, e)) from None
        self.model_type = config.model_type
        self.model = model.to(self.device).eval()
        self._template_owner = self.processor if self.is_vlm else self.tokenizer
        if not getattr(self._template_owner, "chat_template", None):
            raise PairforgeError(f"model '{self.name}' has no chat template; use a chat/instruct "
                                 f"checkpoint or add chat_template.jinja to its folder")
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
        self.pad_id = int(tok.pad_token_id)
        gen_config = getattr(self.model, "generation_config", None)
        self.stop_ids = stop_ids(tok, gen_config)
        self.suppress_ids = sorted(set(getattr(gen_config, "suppress_tokens", None) or ()) - self.stop_ids)
        params = inspect.signature(self.model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._takes_position_ids = "position_ids" in params
        self._can_pack = _can_pack(self.model, self._takes_position_ids)

    # ------------------------------------------------------------------------- prompts

    def _render(self, requests: Sequence[Request], drop_images: bool) -> list[_Prompt]:
        """Chat-template text and PIL images of each request, checked one by one."""
        out = []
        for k, r in enumerate(requests):
            where = f"request {r.id or k}"
            n_parts = count_image_parts(r.messages)
            if n_parts != len(r.images):
                raise BadInput(f"the messages have {n_parts} image part(s) but {len(r.images)} "
                               f"image(s) were given; they must match one to one",
                               where=where, field="images")
            keep_images = self.is_vlm and not drop_images
            if n_parts and not self.is_vlm and not drop_images:
                raise PairforgeError(
                    f"{where}: {self.name} is a text-only model and the prompt has {n_parts} "
                    f"image(s); use an image-text-to-text model, or pass drop_images=True to "
                    f"score the text alone")
            messages = [template_message(m, keep_images, as_text=not self.is_vlm) for m in r.messages]
            try:
                text = self._template_owner.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # jinja raises its own errors (e.g. roles must alternate)
                raise BadInput(f"the chat template of {self.name} rejects these messages: "
                               f"{_first_line(e)}", where=where, field="messages") from None
            images = [to_pil(im, where, i) for i, im in enumerate(r.images)] if keep_images else []
            out.append(_Prompt(text, images))
        lengths = self.tokenizer([p.text for p in out], add_special_tokens=False)["input_ids"] if out else []
        for p, ids in zip(out, lengths):
            p.n_text_tokens = len(ids)
        return out

    def _encode(self, prompts: Sequence[_Prompt], padding_side: str) -> dict[str, torch.Tensor]:
        """Tokenise (and process the images of) a batch of prompts, padded on ``padding_side``."""
        texts = [p.text for p in prompts]
        bos = self.tokenizer.bos_token
        kw = dict(return_tensors="pt", padding=True, padding_side=padding_side,
                  add_special_tokens=not (bos and bos in texts[0]))
        if self.is_vlm:
            # one list of images per prompt: processors that count images per sample (Gemma 3)
            # need it, and every other one accepts it
            images = [list(p.images) for p in prompts] if any(p.images for p in prompts) else None
            enc = self.processor(text=texts, images=images, **kw)
        else:
            enc = self.tokenizer(texts, **kw)
        # PaliGemma's processor returns all-ignored training labels; the model would compute a loss
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "labels"}

    def _tokenize_responses(self, responses: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        for k, r in enumerate(responses):
            if not isinstance(r, str):
                raise BadInput(f"response is {type(r).__name__}, expected str", where=f"response {k}")
        if not responses:
            return [], []
        enc = self.tokenizer(list(responses), add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tile_offsets(o) for o in enc["offset_mapping"]]

    # Public names of the encode/render steps, for the trainer (pairforge.train.data) and other
    # backends that lay out sequences exactly as scoring does.
    def render(self, requests: Sequence[Request], drop_images: bool = False) -> list[_Prompt]:
        """Chat-template text and PIL images of each request (see :meth:`_render`)."""
        return self._render(requests, drop_images)

    def encode(self, prompts: Sequence[_Prompt], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Model inputs of rendered prompts (see :meth:`_encode`)."""
        return self._encode(prompts, padding_side)

    def tokenize_responses(self, responses: Sequence[str]):
        """Token ids and tiled character spans of each response."""
        return self._tokenize_responses(responses)

    def scoring_batch(self, prompts: Sequence[_Prompt], responses: Sequence[Sequence[list[int]]]) -> _Batch:
        """The scoring layout of prompts and their responses (see :meth:`_scoring_batch`)."""
        return self._scoring_batch(prompts, responses)

    @property
    def can_pack(self) -> bool:
        """Whether responses sharing a prompt are packed into one sequence."""
        return self._can_pack

    # ------------------------------------------------------------------------- forward helpers

    def _model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      extra: Mapping[str, torch.Tensor],
                      position_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Inputs of one forward pass, on the model's device. Without ``position_ids``, the
        model's own (left or right padding; 3-D rope positions for Qwen2-VL-style models)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        elif self._takes_position_ids:
            make = getattr(self.model, "_prepare_position_ids_for_generation", None)
            if make is not None:
                inputs["position_ids"] = make(input_ids, dict(inputs))
            else:
                pos = attention_mask.long().cumsum(-1) - 1
                inputs["position_ids"] = pos.masked_fill(attention_mask == 0, 0)
        return {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def _scoring_batch(self, prompts: Sequence[_Prompt], responses: Sequence[Sequence[list[int]]]) -> _Batch:
        """One row per prompt: the prompt then its responses, right-padded (real tokens stay at
        positions 0..L−1, exactly as unbatched). A row with several responses is *packed*: each
        response restarts at the position after the prompt and attends to the prompt and to
        itself only (a 4-D mask), so the prompt, images included, is computed once."""
        enc = self._encode(prompts, "right")
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        b, p_max = ids.shape
        per_token = {k: v for k, v in enc.items() if v.dim() >= 2 and tuple(v.shape[:2]) == (b, p_max)}
        packed = any(len(rs) > 1 for rs in responses)
        if packed and per_token:  # token-type inputs carry mask semantics of their own: unpack
            self._can_pack = False
            return self._scoring_batch([p for p, rs in zip(prompts, responses) for _ in rs],
                                       [[r] for rs in responses for r in rs])
        plens = mask.sum(1).tolist()
        t = max(p + sum(len(r) for r in rs) for p, rs in zip(plens, responses))
        input_ids = torch.full((b, t), self.pad_id, dtype=ids.dtype)
        positions = torch.zeros((b, t), dtype=torch.long)
        segment = torch.full((b, t), -1, dtype=torch.long)  # 0 prompt, j response j, −1 padding
        grown = {k: v.new_full((b, t, *v.shape[2:]), self._response_fill(k)) for k, v in per_token.items()}
        sources: list[int] = []  # flat (row · t + position) of the logits predicting each target
        for i, (p, rs) in enumerate(zip(plens, responses)):
            input_ids[i, :p] = ids[i, :p]
            positions[i, :p] = torch.arange(p)
            segment[i, :p] = 0
            for k, v in per_token.items():
                grown[k][i, :p] = v[i, :p]
            start = p
            for j, r in enumerate(rs, 1):
                n = len(r)
                input_ids[i, start:start + n] = torch.tensor(r, dtype=ids.dtype)
                positions[i, start:start + n] = torch.arange(p, p + n)
                segment[i, start:start + n] = j
                sources += [i * t + q for q in ([p - 1] + list(range(start, start + n - 1)))[:n]]
                start += n
        keep = torch.zeros(b * t, dtype=torch.bool)
        keep[sources] = True
        source = (keep.cumsum(0) - 1)[sources]
        extra = {**{k: v for k, v in enc.items() if k not in per_token}, **grown}
        if packed:
            eager = self.model.config._attn_implementation == "eager"
            attention = _packed_mask(segment, self.dtype if eager else None)
            inputs = self._model_inputs(input_ids, attention, extra, position_ids=positions)
        else:
            inputs = self._model_inputs(input_ids, (segment >= 0).long(), extra)
        targets = torch.tensor([tok for rs in responses for r in rs for tok in r], dtype=torch.long)
        return _Batch(inputs, keep.view(b, t), source, targets, plens,
                      [len(r) for rs in responses for r in rs])

    def _response_fill(self, key: str) -> int:
        """The value of a per-token input (``token_type_ids``) at response positions, as the
        model's own ``generate`` extends it: 1 for PaliGemma (suffix tokens, causal; 0 marks the
        bidirectional prefix of image and prompt), 0 otherwise (Gemma 3: text, not image)."""
        return 1 if key == "token_type_ids" and self.model_type == "paligemma" else 0

    def _response_logits(self, batch: _Batch, **kw: Any):
        """One forward pass; logits only at the positions that predict response tokens,
        shape (K, V), in the order of ``batch.keep`` (``batch.source`` maps tokens to rows)."""
        keep = batch.keep.to(self.device)
        if self._takes_logits_to_keep:
            out = self.model(**batch.inputs, logits_to_keep=keep, use_cache=False, **kw)
            logits = out.logits
        else:
            out = self.model(**batch.inputs, use_cache=False, **kw)
            logits = out.logits[keep]
        return out, logits

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{desc} {self.name}", unit="batch",
                    disable=not self.progress or total < 2, leave=True)

    # ------------------------------------------------------------------------- score

    @torch.no_grad()
    def score(self, requests: Sequence[Request], responses: Sequence[str], *,
              drop_images: bool = False) -> list[ScoredResponse]:
        """Per-token log-probs of each response given its request, in input order.

        Batched and length-sorted; prompt and response go through ONE forward pass per batch,
        and logits (then log-softmax values) are computed only at the response positions.
        ``drop_images=True`` scores the text alone (required for a text-only model given
        requests with images)."""
        if len(requests) != len(responses):
            raise PairforgeError(f"score: {len(requests)} requests but {len(responses)} responses; "
                                 f"pass one response per request")
        prompts = self._render(requests, drop_images)
        resp_ids, offsets = self._tokenize_responses(responses)
        results: list[ScoredResponse | None] = [None] * len(prompts)
        batches = self._scoring_plan(prompts, resp_ids)
        n_tokens, t0 = 0, time.perf_counter()
        with self._progress(len(batches), "score") as bar:
            for rows in batches:
                lps = self._score_batch([prompts[row[0]] for row in rows],
                                        [[resp_ids[i] for i in row] for row in rows])
                for i, lp in zip((i for row in rows for i in row), lps):
                    results[i] = ScoredResponse(responses[i], lp, offsets[i])
                    n_tokens += len(lp)
                bar.update(1)
                bar.set_postfix_str(f"{n_tokens} tokens, {n_tokens / (time.perf_counter() - t0):.0f} tok/s")
        return results  # type: ignore[return-value]

    def _scoring_plan(self, prompts: Sequence[_Prompt], resp_ids: Sequence[list[int]]) -> list[list[list[int]]]:
        """Batches of rows; a row lists the pairs that share one prompt (up to
        :data:`MAX_RESPONSES_PER_ROW`, when the model allows packing) or a single pair. Rows
        are sorted longest first and grouped by image count, so padding stays small."""
        groups: dict[Any, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(_prompt_key(p) if self._can_pack else i, []).append(i)
        rows = [g[s:s + MAX_RESPONSES_PER_ROW] for g in groups.values()
                for s in range(0, len(g), MAX_RESPONSES_PER_ROW)]
        rows.sort(reverse=True, key=lambda row: (len(prompts[row[0]].images), prompts[row[0]].n_text_tokens
                                                 + sum(len(resp_ids[i]) for i in row)))
        return [rows[s:s + self.batch_size] for s in range(0, len(rows), self.batch_size)]

    def _score_batch(self, prompts: Sequence[_Prompt], responses: Sequence[Sequence[list[int]]]) -> list[list[float]]:
        """Token log-probs of each response (rows concatenated) in one forward pass."""
        batch = self._scoring_batch(prompts, responses)
        _, logits = self._response_logits(batch)
        lp = token_logprobs(logits, batch.targets.to(logits.device), batch.source.to(logits.device))
        lp = lp.cpu().tolist()
        out, start = [], 0
        for r in batch.response_lengths:
            out.append(lp[start:start + r])
            start += r
        return out

    # ------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], n: int = 1, sampling: SamplingParams = SamplingParams(),
                 *, drop_images: bool = False) -> list[list[Completion]]:
        """``n`` completions per request, with token log-probs (temperature 1) and offsets.

        Greedy when ``sampling.temperature == 0`` (the ``n`` copies are then identical and
        decoded once), else temperature / top-p sampling, each sample from its own generator
        seeded by (``sampling.seed``, request id, sample index). Decoding is a batched loop
        over left-padded prompts with a KV cache; a sequence stops at EOS / end-of-turn (not
        included in the completion) or after ``max_new_tokens``; the generation config's
        ``suppress_tokens`` are never chosen. The stored log-probs belong to ``token_ids``;
        ``score(text)`` reproduces them when the text re-tokenises to the same ids."""
        if n < 1:
            raise PairforgeError(f"generate: n={n}; ask for at least one completion per request")
        prompts = self._render(requests, drop_images)
        n_draws = 1 if sampling.greedy else n
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n_draws)]
        jobs.sort(key=lambda job: (len(prompts[job[0]].images), prompts[job[0]].n_text_tokens), reverse=True)
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        batches = [jobs[s:s + self.batch_size] for s in range(0, len(jobs), self.batch_size)]
        n_tokens = 0
        with self._progress(len(batches), "generate") as bar:
            for batch in batches:
                seeds = [request_seed(sampling.seed, request_key(requests[i]), j) for i, j in batch]
                done = self._decode([prompts[i] for i, _ in batch], seeds, sampling)
                for (i, j), c in zip(batch, done):
                    out[i][j] = c
                    n_tokens += c.n_tokens
                bar.update(1)
                bar.set_postfix_str(f"{n_tokens} tokens")
        if sampling.greedy:
            for row in out:
                row[1:] = [copy_completion(row[0]) for _ in range(n - 1)]
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def generate_contrastive(self, requests: Sequence[Request], amateur_images: Sequence[Sequence[Any]],
                             lam: float = 0.1, beta: float = 0.1,
                             sampling: SamplingParams = SamplingParams(temperature=0)) -> list[Completion]:
        """One contrastive-amplified completion per request (P2-DPO Visual Robustness pairs).

        At each step the next token is chosen (greedy or sampled per ``sampling``) from
        :func:`~pairforge.models.decoding.contrastive_amplified_logits` of the logits given the
        request's images, ℓ(I), and given ``amateur_images`` (the noisy images, one list per
        request, same count), ℓ(I_noise): (1+λ)·ℓ(I) − λ·ℓ(I_noise) on V_head. Both streams
        decode the same tokens in one batched forward per step. The stored token log-probs are
        those of the policy given the clean images, log p(y_t | I, y_<t), at temperature 1."""
        if not self.is_vlm:
            raise PairforgeError(f"contrastive decoding contrasts images; {self.name} is a "
                                 f"text-only model, use an image-text-to-text model")
        if lam < 0 or not 0 <= beta <= 1:
            raise PairforgeError(f"generate_contrastive: lam={lam}, beta={beta}; contrastive "
                                 f"amplification needs lam >= 0 and 0 <= beta <= 1")
        if len(amateur_images) != len(requests):
            raise PairforgeError(f"generate_contrastive: {len(requests)} requests but "
                                 f"{len(amateur_images)} amateur image lists; pass one per request")
        prompts = self._render(requests, drop_images=False)
        amateurs = []
        for k, (r, p, imgs) in enumerate(zip(requests, prompts, amateur_images)):
            where = f"request {r.id or k}"
            if len(imgs) != len(p.images):
                raise BadInput(f"{len(imgs)} amateur image(s) for {len(p.images)} image(s); "
                               f"give one noisy image per image", where=where, field="amateur_images")
            amateurs.append(_Prompt(p.text, [to_pil(im, where, i) for i, im in enumerate(imgs)],
                                    p.n_text_tokens))
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].images), prompts[i].n_text_tokens),
                       reverse=True)
        size = max(1, self.batch_size // 2)  # each request decodes two streams
        out: list[Completion | None] = [None] * len(prompts)
        batches = [order[s:s + size] for s in range(0, len(order), size)]
        with self._progress(len(batches), "contrastive") as bar:
            for idx in batches:
                seeds = [request_seed(sampling.seed, request_key(requests[i]), 0) for i in idx]
                done = self._decode([prompts[i] for i in idx], seeds, sampling,
                                    amateurs=[amateurs[i] for i in idx], lam=lam, beta=beta)
                for i, c in zip(idx, done):
                    out[i] = c
                bar.update(1)
        return out  # type: ignore[return-value]

    def _decode(self, prompts: Sequence[_Prompt], seeds: Sequence[int], sampling: SamplingParams, *,
                amateurs: Sequence[_Prompt] | None = None, lam: float = 0.0,
                beta: float = 0.0) -> list[Completion]:
        """The batched decode loop: left-padded prefill, then one token per step from a KV cache.

        With ``amateurs`` the batch holds 2·B rows (clean prompts, then amateur prompts) fed the
        same tokens; the choice uses the contrastive-amplified logits of each pair of rows."""
        from transformers import DynamicCache

        b = len(prompts)
        rows = list(prompts) + list(amateurs or [])
        enc = self._encode(rows, "left")
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        per_token = [k for k, v in enc.items() if v.dim() >= 2 and tuple(v.shape[:2]) == tuple(ids.shape)]
        inputs = self._model_inputs(ids, mask, enc)
        mask, positions = inputs["attention_mask"], inputs.get("position_ids")
        cache = DynamicCache(config=self.model.config)
        kw = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        logits = self.model(**inputs, past_key_values=cache, use_cache=True, **kw).logits[:, -1]

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        tokens: list[list[int]] = [[] for _ in range(b)]
        logprobs: list[list[float]] = [[] for _ in range(b)]
        finished = [False] * b
        reasons = ["length"] * b
        stop = self.stop_ids
        for step in range(sampling.max_new_tokens):
            expert = logits[:b].float()
            choice_logits = (contrastive_amplified_logits(expert, logits[b:], lam, beta)
                             if amateurs is not None else expert)
            if self.suppress_ids:  # the generation config's suppress_tokens are never chosen
                choice_logits = choice_logits.clone()
                choice_logits[:, self.suppress_ids] = float("-inf")
            uniforms = None if sampling.greedy else torch.stack(
                [torch.rand((), generator=g) for g in generators])
            # rows that finished still draw, so no row's stream depends on another's length
            chosen = choose_tokens(choice_logits, sampling.temperature, sampling.top_p,
                                   uniforms.to(self.device) if uniforms is not None else None)
            lps = token_logprobs(expert, chosen).tolist()
            chosen_list = chosen.tolist()
            for i in range(b):
                if finished[i]:
                    continue
                if chosen_list[i] in stop:
                    finished[i], reasons[i] = True, "stop"
                else:
                    tokens[i].append(chosen_list[i])
                    logprobs[i].append(lps[i])
            if all(finished) or step == sampling.max_new_tokens - 1:
                break
            nxt = chosen.to(self.device).unsqueeze(-1)
            if amateurs is not None:
                nxt = torch.cat([nxt, nxt])
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            step_inputs: dict[str, Any] = {"input_ids": nxt, "attention_mask": mask}
            if positions is not None:
                positions = positions[..., -1:] + 1
                step_inputs["position_ids"] = positions
            for k in per_token:
                step_inputs[k] = enc[k].new_full((nxt.shape[0], 1), self._response_fill(k)).to(self.device)
            logits = self.model(**step_inputs, past_key_values=cache, use_cache=True).logits[:, -1]
        return [self._completion(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons)]

    def _completion(self, ids: list[int], logprobs: list[float], reason: str) -> Completion:
        decode = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = self.tokenizer.decode(ids, **decode)
        prefixes = self.tokenizer.batch_decode([ids[:k] for k in range(1, len(ids) + 1)], **decode)
        whole = [whole_characters(p, text) for p in prefixes]
        offsets = prefix_offsets(whole, len(text), [w < len(p) for w, p in zip(whole, prefixes)])
        return Completion(text, logprobs, offsets, token_ids=list(ids), finish_reason=reason)

    # ------------------------------------------------------------------------- attention maps

    def attention_map(self, request: Request, response: str, layers: Sequence[int] | None = None,
                      heads: str | int | Sequence[int] = "mean", *, grad_weighted: bool = False,
                      image_index: int = 0) -> np.ndarray:
        """Answer-to-image attention over the patch grid of image ``image_index``, shape
        (grid_h, grid_w): attention from each response token to each image token, averaged
        over response tokens, the selected heads (``"mean"``: all; or indices) and ``layers``
        (default all; negative indices count from the last). A CLS token ("full" feature
        strategy) is excluded. Computed with eager attention (switched on for the call).

        ``grad_weighted=True`` weights each attention weight by the positive part of the
        gradient of the response log-prob log π(y|x) with respect to it, A ⊙ max(∂log π/∂A, 0),
        before averaging."""
        if not self.is_vlm:
            raise PairforgeError(f"attention maps are over image tokens; {self.name} is a "
                                 f"text-only model, use an image-text-to-text model")
        if self.model_type in TILED_IMAGE_TYPES:
            raise PairforgeError(
                f"attention maps: {self.name} ({self.model_type}) {TILED_IMAGE_TYPES[self.model_type]}, "
                f"so its image tokens form no single patch grid; use a model with one grid per "
                f"image ({', '.join(GRID_IMAGE_FAMILIES)})")
        prompt = self._render([request], drop_images=False)[0]
        where = f"request {request.id or 0}"
        if not 0 <= image_index < len(prompt.images):
            raise BadInput(f"image_index={image_index} but the request has {len(prompt.images)} "
                           f"image(s)", where=where, field="images")
        resp_ids, _ = self._tokenize_responses([response])
        if not resp_ids[0]:
            raise BadInput("empty response; an attention map needs at least one response token",
                           where=where, field="response")
        batch = self._scoring_batch([prompt], [resp_ids])
        image_pos, grid = self._image_grid(batch.inputs, image_index, len(prompt.images))
        p, r = batch.prompt_lengths[0], batch.response_lengths[0]
        with self._eager_attention(), torch.set_grad_enabled(grad_weighted):
            out, logits = self._response_logits(batch, output_attentions=True)
            attentions = out.attentions
            n_layers = len(attentions)
            chosen = list(range(n_layers)) if layers is None else [int(l) for l in layers]
            for l in chosen:
                if not -n_layers <= l < n_layers:
                    raise PairforgeError(f"attention_map: layer {l} does not exist; the model has "
                                         f"{n_layers} layers (0..{n_layers - 1})")
            maps = [attentions[l] for l in chosen]  # (1, H, T, T) each
            if grad_weighted:
                logp = token_logprobs(logits, batch.targets.to(logits.device),
                                      batch.source.to(logits.device)).sum()
                grads = torch.autograd.grad(logp, maps)
                maps = [a * g.clamp(min=0) for a, g in zip(maps, grads)]
            stacked = torch.stack([a[0, :, p:p + r][:, :, image_pos] for a in maps]).float()  # (L, H, r, K)
            stacked = _select_heads(stacked, heads)
            grid_map = stacked.mean(dim=(0, 1, 2)).detach().cpu().numpy()
        return grid_map.reshape(grid)

    def _image_grid(self, inputs: Mapping[str, torch.Tensor], image_index: int,
                    n_images: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Sequence positions of image ``image_index``'s patch tokens and their (h, w) grid."""
        cfg = self.model.config
        token_id = getattr(cfg, "image_token_id", None)
        if token_id is None:
            token_id = getattr(cfg, "image_token_index", None)
        if token_id is None:
            raise PairforgeError(f"{self.name}: the config names no image token; attention maps "
                                 f"support {', '.join(GRID_IMAGE_FAMILIES)}")
        positions = (inputs["input_ids"][0] == token_id).nonzero().squeeze(-1).cpu()
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is not None:  # Qwen2-VL: t·h·w patches merged merge×merge into one token
            merge = getattr(getattr(cfg, "vision_config", cfg), "spatial_merge_size", 1)
            sizes = [int(t * h * w) // merge**2 for t, h, w in grid_thw.tolist()]
            t, h, w = grid_thw[image_index].tolist()
            grid = (int(h) // merge, int(w) // merge)
            if int(t) != 1:
                raise PairforgeError(f"{self.name}: image {image_index} has {t} temporal patches; "
                                     f"attention maps need a single still image")
        else:
            sizes = [len(positions) // n_images] * n_images
            grid = None
        start = sum(sizes[:image_index])
        pos = positions[start:start + sizes[image_index]]
        if grid is None:
            if getattr(cfg, "vision_feature_select_strategy", None) == "full":
                pos = pos[1:]  # the CLS token comes first
            side = math.isqrt(len(pos))
            if side * side != len(pos):
                raise PairforgeError(f"{self.name}: {len(pos)} image tokens do not form a square "
                                     f"patch grid; attention maps support LLaVA-1.5-style and "
                                     f"Qwen2-VL-style models")
            grid = (side, side)
        return pos, grid

    @contextmanager
    def _eager_attention(self) -> Iterator[None]:
        """Eager attention for the duration of the block (the only kind that returns weights)."""
        current = self.model.config._attn_implementation
        if current == "eager":
            yield
            return
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(current)


# ----------------------------------------------------------------------------- helpers


def _load_processor(auto_processor, source: str, kw: Mapping[str, Any]):
    """``AutoProcessor.from_pretrained``; when that fails only because the processor's *video*
    processor needs torchvision (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision in transformers 5), the
    same processor class built from its image processor and tokenizer, without video support
    (pairforge sends still images only)."""
    try:
        return auto_processor.from_pretrained(source, **kw)
    except ImportError as e:
        if "torchvision" not in str(e).lower() or "videoprocessor" not in str(e).replace(" ", "").lower():
            raise
    return image_only_processor(source, kw)


def image_only_processor(source: str, kw: Mapping[str, Any] | None = None):
    """The processor of ``source`` (its ``processor_class``) with ``video_processor=None``."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    kw = dict(kw or {})
    image_processor = AutoImageProcessor.from_pretrained(source, **kw)
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    name = getattr(image_processor, "processor_class", None) or PROCESSOR_MAPPING_NAMES.get(
        AutoConfig.from_pretrained(source, **kw).model_type)
    cls = getattr(transformers, str(name), None)
    if cls is None:
        raise ImportError(f"no processor class {name!r} in transformers")
    template = getattr(tokenizer, "chat_template", None)
    settings = {}  # the processor's own settings (e.g. LLaVA-OneVision's num_image_tokens)
    config_file = Path(source) / "processor_config.json"
    if config_file.is_file():
        accepted = inspect.signature(cls.__init__).parameters
        settings = {k: v for k, v in json.loads(config_file.read_text()).items()
                    if k in accepted and k not in ("image_processor", "tokenizer", "video_processor")}
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, attribute, arg):  # video_processor=None has no class to check against
        return None if arg is None else check(self, attribute, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                        **{"chat_template": template, **settings})
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    processor.save_pretrained = lambda out, **_: save_image_only_processor(processor, out, settings)
    return processor


def save_image_only_processor(processor, out: str | Path, settings: Mapping[str, Any]) -> None:
    """Write a processor without a video processor in the Hub layout that
    :func:`image_only_processor` reads back (``save_pretrained`` of transformers 5 fails on
    the missing video processor): image processor (naming the processor class), tokenizer,
    ``chat_template.jinja`` and ``processor_config.json`` with the processor's settings."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor.image_processor.processor_class = type(processor).__name__
    processor.image_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    if processor.chat_template:
        (out / "chat_template.jinja").write_text(processor.chat_template)
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": type(processor).__name__, **settings}, indent=2))


def _can_pack(model, takes_position_ids: bool) -> bool:
    """Whether responses sharing a prompt may be packed into one sequence: the model takes
    plain 2-D position ids (no model-specific rope positions), runs eager or SDPA attention
    (which accept a 4-D mask) and attends causally over the whole sequence (no sliding window,
    no per-layer attention types)."""
    from transformers import GenerationMixin

    own_positions = getattr(type(model), "_prepare_position_ids_for_generation", None)
    if not takes_position_ids or (own_positions is not None and own_positions
                                  is not GenerationMixin._prepare_position_ids_for_generation):
        return False
    if model.config._attn_implementation not in ("eager", "sdpa"):
        return False
    text = model.config.get_text_config()
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    return all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ())


def _packed_mask(segment: torch.Tensor, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """4-D attention mask (B, 1, T, T) of packed rows: query q sees key k ≤ q when k is in
    the prompt (segment 0) or in q's own response; padding (−1) sees only itself, so that no
    row is empty. Boolean (True = attend) for SDPA; additive (0 / dtype min) when
    ``additive_dtype`` is given, for eager attention."""
    t = segment.shape[1]
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((t, t), dtype=torch.bool).tril()
    allowed = (causal & (k >= 0) & ((k == 0) | (k == q))) | torch.eye(t, dtype=torch.bool)
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype)
    return mask.masked_fill(~allowed, torch.finfo(additive_dtype).min)


def _prompt_key(p: _Prompt) -> tuple:
    """Identity of a rendered prompt: its text and the pixels of its images."""
    return (p.text, *((im.size, im.mode, hashlib.blake2b(im.tobytes(), digest_size=16).digest())
                      for im in p.images))


def _select_heads(stacked: torch.Tensor, heads: str | int | Sequence[int]) -> torch.Tensor:
    """Keep the requested heads of a (L, H, r, K) tensor."""
    n = stacked.shape[1]
    if heads == "mean":
        return stacked
    idx = [heads] if isinstance(heads, int) else list(heads)
    if not idx or any(not -n <= h < n for h in idx):
        raise PairforgeError(f"attention_map: heads={heads!r}; use 'mean' or indices in 0..{n - 1}")
    return stacked[:, idx]


