"""CLIP scorers: image-text cosine similarity behind :class:`~pairforge.models.ImageTextScorer`.

Two backends, one behaviour:

- :class:`CLIPScorer` — transformers ``CLIPModel`` (spec ``clip:PATH_OR_ID[@REV]``; the
  embedded ``tiny-clip``): ``get_image_features`` / ``get_text_features``, L2-normalised.
- :class:`OpenCLIPScorer` — open_clip (spec ``open_clip:ARCH/PRETRAINED``, PRETRAINED a tag or
  a local checkpoint file; ``open_clip:local-dir:/folder`` for a folder with
  ``open_clip_config.json`` and weights). Optional extra ``[open_clip]`` (``open_clip_torch``,
  ``torchvision``), imported only when such a spec is loaded.

Both embed each distinct image and text of a call once (a pair set repeats its images), in
batches of ``batch_size``; images are PIL images, paths, bytes or ``datasets`` image dicts.
Texts longer than the text tower's context are truncated, as CLIP itself was trained; the
scorer says so once (on stderr), not per call. :func:`clip_scores` turns cosines into
CLIPScore = 2.5·max(cos, 0) (Hessel et al., 2021, eq. 1).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pairforge.errors import PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.models.base import ImageTextScorer, clip_score, resolve_device
from pairforge.models.render import folder_or_hub_id
from pairforge.models.render import load_error as _load_error
from pairforge.models.render import pin_revision as _pin_revision
from pairforge.models.render import resolve_dtype as _resolve_dtype
from pairforge.models.render import to_pil as _pil
from pairforge.models.spec import ModelSpec, parse_model_spec

OPEN_CLIP_EXTRA = "pip install 'pairforge[open_clip]' (open_clip_torch, torchvision)"


def clip_scores(scorer: ImageTextScorer, images: Sequence[Any], texts: Sequence[str],
                w: float = 2.5) -> list[float]:
    """CLIPScore(I, c) = w · max(cos(E_I, E_c), 0) of each (image, text) pair, w = 2.5
    (Hessel et al., 2021, eq. 1), from one batched ``scorer.cosine`` call."""
    return [clip_score(c, w) for c in scorer.cosine(images, texts)]


def load_clip_scorer(spec: str | ModelSpec, **kw: Any) -> CLIPScorer | OpenCLIPScorer:
    """The scorer a spec names: ``tiny-clip`` / ``clip:…`` → :class:`CLIPScorer`,
    ``open_clip:…`` → :class:`OpenCLIPScorer`. ``kw``: device, dtype, batch_size, progress
    (and ``revision`` for ``clip:``)."""
    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec, default="tiny-clip")
    if spec.backend == "open_clip":
        return OpenCLIPScorer(spec, **kw)
    if spec.backend == "clip" or (spec.backend == "embedded" and spec.name == "tiny-clip"):
        return CLIPScorer(spec, **kw)
    raise PairforgeError(f"model spec '{spec}' is not a CLIP scorer; use tiny-clip, "
                         f"clip:PATH_OR_ID or open_clip:ARCH/PRETRAINED")


class _EmbeddingScorer:
    """Cosines from L2-normalised embeddings; subclasses embed one batch of PIL images or
    of texts (``_image_batch``, ``_text_batch``) and count text tokens (``_n_tokens``)."""

    name: str
    revision: str
    batch_size: int
    progress: bool
    max_text_tokens: int

    def _image_batch(self, images: list) -> torch.Tensor: ...  # pragma: no cover

    def _text_batch(self, texts: list[str]) -> torch.Tensor: ...  # pragma: no cover

    def _n_tokens(self, texts: list[str]) -> list[int] | None: ...  # pragma: no cover

    # ------------------------------------------------------------------ protocol

    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """cos(E_I, E_c) of each (image, text) pair (paired by index)."""
        if len(images) != len(texts):
            raise PairforgeError(f"cosine: {len(images)} images but {len(texts)} texts; they "
                                 f"are paired one to one (use cosine_matrix for all pairs)")
        if not images:
            return []
        img = self.embed_images(images)
        txt = self.embed_texts(texts)
        return (img * txt).sum(-1).tolist()

    def cosine_matrix(self, images: Sequence[Any], texts: Sequence[str]) -> list[list[float]]:
        """The ``len(images) × len(texts)`` matrix of cosines."""
        if not images or not texts:
            return [[] for _ in images]
        return (self.embed_images(images) @ self.embed_texts(texts).T).tolist()

    # ------------------------------------------------------------------ embeddings

    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm float32 CPU embeddings ``(N, D)``; each distinct image embedded once
        (same path, or same object)."""
        keys = [("path", str(im)) if isinstance(im, (str, Path)) else ("obj", id(im)) for im in images]
        unique: dict[tuple, int] = {}
        firsts: list[int] = []
        for i, k in enumerate(keys):
            if k not in unique:
                unique[k] = len(firsts)
                firsts.append(i)
        pils = [_pil(images[i], f"image {i}", i) for i in firsts]
        emb = self._batched(pils, self._image_batch, "images")
        return emb[[unique[k] for k in keys]]

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm float32 CPU embeddings ``(N, D)``; each distinct text embedded once.
        Texts past the text tower's context are truncated (noticed once per scorer)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise PairforgeError(f"text {i} is {type(t).__name__}, expected str")
        distinct = list(dict.fromkeys(texts))
        self._notice_truncation(distinct)
        emb = self._batched(distinct, self._text_batch, "texts")
        index = {t: k for k, t in enumerate(distinct)}
        return emb[[index[t] for t in texts]]

    @torch.no_grad()
    def _batched(self, items: list, embed: Callable[[list], torch.Tensor], what: str) -> torch.Tensor:
        from tqdm.auto import tqdm

        out = []
        starts = range(0, len(items), self.batch_size)
        for s in tqdm(starts, desc=f"embed {what} {self.name}", unit="batch", leave=False,
                      disable=not self.progress or len(starts) < 2):
            out.append(torch.nn.functional.normalize(embed(items[s:s + self.batch_size]).float(), dim=-1).cpu())
        return torch.cat(out)

    _truncation_noticed = False

    def _notice_truncation(self, texts: list[str]) -> None:
        """Say once per scorer that texts longer than the text tower's context are cut."""
        if self._truncation_noticed or not texts:
            return
        counts = self._n_tokens(texts)
        if counts is None:
            return
        long = [t for t, n in zip(texts, counts) if n > self.max_text_tokens]
        if long:
            self._truncation_noticed = True
            print(f"pairforge: {self.name} reads at most {self.max_text_tokens} tokens per text; "
                  f"{len(long)} of {len(texts)} texts in this call are longer and are truncated "
                  f"(e.g. {long[0][:60]!r}…). Said once per scorer.", file=sys.stderr)


# ----------------------------------------------------------------------------- transformers


class CLIPScorer(_EmbeddingScorer):
    """A transformers CLIP (``CLIPModel`` + its processor) as an
    :class:`~pairforge.models.ImageTextScorer`.

    ``spec_or_path``: ``clip:PATH_OR_ID[@REV]``, ``tiny-clip`` or a folder. ``device``
    defaults to CUDA when available, ``dtype`` to float32 on CPU (bfloat16 / float16 on GPU).
    ``revision`` overrides the spec's ``@REV``; a Hub id's revision is pinned to its commit."""

    def __init__(self, spec_or_path: str | Path | ModelSpec = "tiny-clip",
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 32, revision: str | None = None, *, progress: bool = True):
        spec = spec_or_path if isinstance(spec_or_path, ModelSpec) else _clip_spec(spec_or_path)
        if batch_size < 1:
            raise PairforgeError(f"batch_size={batch_size}: must be >= 1")
        self.spec, self.name, self.batch_size, self.progress = spec, str(spec), batch_size, progress
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        source, rev = _clip_source(spec, revision)
        self._load(source, rev)

    def __repr__(self) -> str:
        return f"CLIPScorer({self.name!r}, device={self.device}, dtype={self.dtype})"

    def _load(self, source: str, revision: str | None) -> None:
        from transformers import AutoConfig, AutoModel, AutoProcessor

        revision, self.revision = _pin_revision(source, revision)
        kw: dict[str, Any] = {"revision": revision} if revision else {}
        try:
            config = AutoConfig.from_pretrained(source, **kw)
            if not hasattr(config, "text_config") or not hasattr(config, "vision_config"):
                raise PairforgeError(f"model '{self.name}': {source} is a '{config.model_type}' "
                                     f"model, not a CLIP (two towers); pass a CLIPModel checkpoint")
            processor = AutoProcessor.from_pretrained(source, **kw)
            model = AutoModel.from_pretrained(source, dtype=self.dtype, **kw)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise PairforgeError(_load_error(self.name, source, e)) from None
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise PairforgeError(f"model '{self.name}': {type(model).__name__} has no "
                                 f"get_image_features / get_text_features; pass a CLIPModel checkpoint")
        self.model = model.to(self.device).eval()
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        limits = [config.text_config.max_position_embeddings, self.tokenizer.model_max_length]
        self.max_text_tokens = int(min(n for n in limits if n))

    def _image_batch(self, images: list) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return getattr(out, "pooler_output", out)

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device))
        return getattr(out, "pooler_output", out)

    def _n_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]


def _clip_spec(spec_or_path: str | Path) -> ModelSpec:
    """A spec string, or a bare folder, as a CLIP spec (a bare path means ``clip:``)."""
    s = str(spec_or_path)
    spec = parse_model_spec(s, default="tiny-clip")
    return ModelSpec("clip", s) if spec.backend == "hf" else spec


def _clip_source(spec: ModelSpec, revision: str | None) -> tuple[str, str | None]:
    """The folder or Hub id ``from_pretrained`` loads for a CLIP spec, and its revision."""
    if spec.backend == "embedded":
        if spec.name != "tiny-clip":
            raise PairforgeError(f"model spec '{spec}' is a policy model, not a CLIP scorer; "
                                 f"use tiny-clip, clip:PATH_OR_ID or open_clip:ARCH/PRETRAINED")
        from pairforge.world.models import TINY_CLIP_PATH

        if not (TINY_CLIP_PATH / "config.json").is_file():
            raise PairforgeError(f"tiny-clip: no checkpoint at {TINY_CLIP_PATH}; reinstall pairforge "
                                 f"or train it with scripts/train_tiny_clip.py")
        return str(TINY_CLIP_PATH), None
    if spec.backend != "clip":
        raise PairforgeError(f"model spec '{spec}': CLIPScorer runs clip: specs (transformers); "
                             f"load {spec.backend}: specs with their own backend")
    name, rev = spec.name, revision or spec.revision or None
    return folder_or_hub_id(spec, Path(name).expanduser(), rev, example="openai/clip-vit-base-patch32")


# ----------------------------------------------------------------------------- open_clip


class OpenCLIPScorer(_EmbeddingScorer):
    """An open_clip model as an :class:`~pairforge.models.ImageTextScorer` (extra ``[open_clip]``).

    ``spec``: ``open_clip:ARCH/PRETRAINED`` with PRETRAINED a tag of ARCH
    (``open_clip.list_pretrained_tags_by_model``; downloaded by open_clip, so not offline) or a
    local checkpoint file (``open_clip:ViT-B-32//ckpt/model.pt``), or
    ``open_clip:local-dir:/folder`` (``open_clip_config.json`` + weights). ``revision``: the tag,
    or the first 16 hex digits of the checkpoint file's sha256."""

    def __init__(self, spec: str | ModelSpec, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = 32, *, progress: bool = True):
        if not isinstance(spec, ModelSpec):
            spec = parse_model_spec(spec)
        if spec.backend != "open_clip":
            raise PairforgeError(f"model spec '{spec}': OpenCLIPScorer runs open_clip:ARCH/PRETRAINED specs")
        if batch_size < 1:
            raise PairforgeError(f"batch_size={batch_size}: must be >= 1")
        try:
            import open_clip
        except ImportError as e:
            raise PairforgeError(f"model '{spec}' needs open_clip, which is not installed "
                                 f"({_first_line(e)}); {OPEN_CLIP_EXTRA}") from None
        self.spec, self.name, self.batch_size, self.progress = spec, str(spec), batch_size, progress
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        model_name, pretrained, self.revision = _open_clip_source(spec, open_clip)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device)
            tokenizer = open_clip.get_tokenizer(model_name)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise PairforgeError(f"model '{spec}': open_clip could not load it ({_first_line(e)}); "
                                 f"check ARCH (open_clip.list_models()) and that the checkpoint "
                                 f"matches it") from None
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.max_text_tokens = int(getattr(tokenizer, "context_length", None)
                                   or getattr(model, "context_length", 77))

    def __repr__(self) -> str:
        return f"OpenCLIPScorer({self.name!r}, device={self.device}, dtype={self.dtype})"

    def _image_batch(self, images: list) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images])
        return self.model.encode_image(pixels.to(self.device, self.dtype))

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def _n_tokens(self, texts: list[str]) -> list[int] | None:
        """Token counts with start and end tokens (open_clip's SimpleTokenizer or HF tokenizer)."""
        encode = getattr(self.tokenizer, "encode", None)
        if callable(encode):
            return [len(encode(t)) + 2 for t in texts]
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None:
            return [len(ids) for ids in hf(texts)["input_ids"]]
        return None


def _open_clip_source(spec: ModelSpec, open_clip) -> tuple[str, str | None, str]:
    """(model name for open_clip, pretrained tag / file or None, revision) of a spec."""
    name = spec.name
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise PairforgeError(f"model '{spec}': {folder} has no open_clip_config.json; pass a "
                                 f"folder with open_clip_config.json and the weights")
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        return f"local-dir:{folder}", None, _file_revision(weights[0]) if weights else ""
    if name.startswith("hf-hub:"):
        return name, None, ""
    arch, _, pretrained = name.partition("/")
    if arch not in open_clip.list_models():
        raise PairforgeError(f"model '{spec}': unknown open_clip architecture '{arch}'; choose one "
                             f"of open_clip.list_models(), e.g. ViT-B-32")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return arch, str(path), _file_revision(path)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained in tags:
        return arch, pretrained, pretrained
    raise PairforgeError(f"model '{spec}': '{pretrained}' is neither a checkpoint file nor a "
                         f"pretrained tag of {arch} (tags: {', '.join(tags) or 'none'})")


def _file_revision(path: Path) -> str:
    """First 16 hex digits of a file's sha256: the revision of a local checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
