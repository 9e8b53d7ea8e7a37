"""The offline world's tiny models: a LLaVA-architecture VLM and a CLIP, shipped in the package.

Both are plain ``transformers`` checkpoints in :data:`TINY_VLM_PATH` / :data:`TINY_CLIP_PATH`,
loaded through the same ``from_pretrained(path)`` calls that load ``llava-hf/llava-1.5-7b-hf``
or ``openai/clip-vit-base-patch32`` (``AutoProcessor``, ``AutoModelForImageTextToText``,
``LlavaForConditionalGeneration``, ``CLIPModel``). They are trained by
``scripts/train_tiny_vlm.py`` and ``scripts/train_tiny_clip.py``; their model cards sit next
to the weights.

This module holds what those scripts, the evaluation script and the tests share:

- loading: :func:`load_tiny_vlm`, :func:`load_tiny_clip`;
- building (offline, from the world's :func:`~pairforge.world.vocabulary`): the word-level
  tokenizer (:func:`build_tokenizer`), the chat template (:data:`CHAT_TEMPLATE`), the
  processors, the model configs, and :func:`save_checkpoint`;
- the VLM's supervised example encoding (:func:`encode_sft_example`: loss on answer tokens
  only, one or several turns) and image normalisation (:func:`pixel_values_from_uint8`);
- the CLIP's scene descriptions and their minimal wrong edits (:func:`scene_description`,
  :func:`edited_description`), used both to train it and to measure it.

Import-light: ``torch`` and ``transformers`` are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pairforge.errors import PairforgeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_VLM_PATH = ASSETS / "tiny-llava"
TINY_CLIP_PATH = ASSETS / "tiny-clip"

IMAGE_SIZE = 112
PATCH_SIZE = 14  # 112 / 14 = 8 → an 8×8 grid of image tokens

# ----------------------------------------------------------------------------- loading


def _check_checkpoint(path: Path, what: str, script: str) -> None:
    if not (path / "config.json").is_file():
        raise PairforgeError(
            f"{path}: no {what} checkpoint (config.json missing); reinstall pairforge or "
            f"train one with `python {script} --out {path}`")


def load_tiny_vlm(device: str = "cpu", dtype: "torch.dtype | None" = None, *,
                  path: str | Path | None = None, attn_implementation: str = "eager"):
    """The shipped tiny LLaVA as ``(model, processor)``, through ``AutoModelForImageTextToText``
    and ``AutoProcessor`` (the generic path any Hub VLM takes). ``dtype`` defaults to float32;
    eager attention so that ``output_attentions=True`` returns answer-to-image maps."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path) if path is not None else TINY_VLM_PATH
    _check_checkpoint(path, "tiny VLM", "scripts/train_tiny_vlm.py")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    return model.to(device).eval(), processor


def load_tiny_clip(device: str = "cpu", dtype: "torch.dtype | None" = None, *,
                   path: str | Path | None = None):
    """The shipped tiny CLIP as ``(model, processor)``, through ``CLIPModel`` and
    ``AutoProcessor``. ``dtype`` defaults to float32."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    path = Path(path) if path is not None else TINY_CLIP_PATH
    _check_checkpoint(path, "tiny CLIP", "scripts/train_tiny_clip.py")
    processor = AutoProcessor.from_pretrained(path)
    model = CLIPModel.from_pretrained(path, dtype=dtype or torch.float32)
    return model.to(device).eval(), processor


# ----------------------------------------------------------------------------- tokenizer

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE, *ROLE_TOKENS.values())  # ids 0..7, in this order
SPACE = "▁"  # marks a word that follows a space (as in SentencePiece), so decode restores spacing

#: The world's word split (letter runs, single digits, single other characters), each piece
#: keeping the space marker in front of it; a lone marker stands for an extra space.
_SPLIT = r"▁?(?:[^\W\d_]+|\d|[^\w▁]|_)|▁"

#: Chat template (jinja) of the tiny VLM. It writes ``<s>`` itself and the VLM's tokenizer adds
#: none, so every path gets exactly one: ``processor(text=apply_chat_template(...))``, and
#: TRL, which tokenises the templated text with ``add_special_tokens=False``.
#: Handles string content and TRL-style content parts (``{"type": "image"}`` → ``<image>``,
#: text parts joined by a space). An assistant turn ends with ``</s>``, inside a
#: ``{% generation %}`` block so ``return_assistant_tokens_mask=True`` marks the answer:
#: ``<s><|user|><image>What colour is the circle?<|assistant|>It is red.</s>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% set ns = namespace(text='', sep='') %}"
    "{% for part in parts %}"
    "{% if part['type'] == 'image' %}{% set ns.text = ns.text + '<image>' %}{% set ns.sep = '' %}"
    "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + ns.sep + (part['text'] | trim) %}"
    "{% set ns.sep = ' ' %}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ ns.text + eos_token }}{% endgeneration %}"
    "{% else %}{{ ns.text }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def token_vocabulary(words: Iterable[str]) -> list[str]:
    """The tokenizer's vocabulary for the world's ``words``: the special tokens, the space
    marker, then every lower-cased word with and without a leading space marker."""
    lower = sorted({w.lower() for w in words if w and not w.isspace()})
    vocab = list(SPECIAL_TOKENS) + [SPACE]
    vocab += [SPACE + w for w in lower] + lower
    seen: set[str] = set()
    return [t for t in vocab if not (t in seen or seen.add(t))]


def build_tokenizer(words: Iterable[str], *, add_bos: bool = True, add_eos: bool = False,
                    chat_template: str | None = None, model_max_length: int = 512,
                    padding_side: str = "right"):
    """A word-level ``PreTrainedTokenizerFast`` over the world's ``words`` (built offline).

    Text is NFKC-normalised and lower-cased, split like the world's ``tokenize`` (letter runs,
    single digits, single punctuation marks) with a space marker kept in front of a word that
    follows a space, so ``decode(encode(s)) == s.lower()`` for any in-vocabulary ``s``
    ("the circle is red."). With ``add_bos`` ``<s>`` is prepended (the VLM's tokenizer does
    not: its chat template writes ``<s>``); with ``add_eos`` (the CLIP text tower pools
    at ``</s>``) ``</s>`` is appended too. Unknown words become ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(token_vocabulary(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=False),
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=False)
    single = " ".join(([BOS] if add_bos else []) + ["$A"] + ([EOS] if add_eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=single + " $B", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IMAGE, *ROLE_TOKENS.values()], model_max_length=model_max_length,
        padding_side=padding_side, clean_up_tokenization_spaces=False)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


# ----------------------------------------------------------------------------- the tiny VLM


def _image_processor():
    """A ``CLIPImageProcessor`` at :data:`IMAGE_SIZE` px (OpenAI CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_vlm_processor(words: Iterable[str]):
    """``LlavaProcessor`` (``CLIPImageProcessor`` at 112 px + the word tokenizer + chat
    template). Like llava-1.5: ``vision_feature_select_strategy="default"`` drops the CLS token,
    so each ``<image>`` becomes (112/14)² = 64 image tokens, one per patch of the 8×8 grid."""
    from transformers import LlavaProcessor

    tokenizer = build_tokenizer(words, add_bos=False, chat_template=CHAT_TEMPLATE, padding_side="left")
    return LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer,
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def n_image_tokens(processor) -> int:
    """How many ``<image>`` tokens one image expands to (the processor's own rule)."""
    crop = processor.image_processor.crop_size
    n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def vlm_config(vocab_size: int, *, vision_hidden: int = 128, vision_layers: int = 3,
               text_hidden: int = 256, text_layers: int = 4, text_intermediate: int = 768,
               heads: int = 4, max_positions: int = 256):
    """``LlavaConfig`` of the tiny VLM: a CLIP vision tower (112 px, patch 14), the LLaVA
    two-layer GELU projector and a Llama language model with tied embeddings. Eager attention,
    so ``output_attentions=True`` works."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        projection_dim=vision_hidden)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, pad_token_id=ids[PAD], bos_token_id=ids[BOS],
        eos_token_id=ids[EOS], tie_word_embeddings=True)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=ids[IMAGE],
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    return config


def save_checkpoint(model, processor, out: str | Path, *, dtype: "torch.dtype | None" = None) -> Path:
    """``save_pretrained`` model and processor into ``out``, weights cast to ``dtype`` (e.g.
    bfloat16 to halve the shipped size; loading casts back to the dtype asked for), and record
    ``attn_implementation: eager`` in ``config.json`` so that a plain ``from_pretrained`` gives
    attention maps (``save_pretrained`` does not keep it; a caller can still override it)."""
    import copy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    to_save = copy.deepcopy(model).to(dtype) if dtype is not None else model
    to_save.save_pretrained(out)
    processor.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["attn_implementation"] = "eager"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def training_parser(description: str, *, steps: int, steps_help: str = "optimizer steps",
                    seed_help: str = "seed of the initialisation and data order", out_required: bool = True):
    """The arguments both training scripts share (output, seeds, data size, optimiser,
    schedule, threads, saving); each script adds its own model and loss arguments.
    ``out_required=False`` for a script with a mode that writes no checkpoint (it checks ``--out``
    itself)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=out_required, help="checkpoint folder (created)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the world's sft_dataset")
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor as a share of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, fixed for determinism (1 is fastest on a shared CPU)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--dense-weight", type=float, default=1.0,
                   help="weight of a dense auxiliary loss on the vision tower: each patch token "
                        "predicts the kind and colour of the object covering it (ground-truth "
                        "boxes, patch_targets), through a linear head that is not saved")
    p.add_argument("--dense-centre", action=argparse.BooleanOptionalAction, default=False,
                   help="the dense loss also asks each patch for the grid cell of its object's "
                        "centre, so patch tokens carry where each object is (for relations)")
    return p


def seed_everything(seed: int, threads: int) -> None:
    """Seed Python, NumPy and torch, fix torch's CPU thread count (reductions, hence losses,
    depend on it) and ask torch for deterministic algorithms: same arguments, same run."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def warmup_cosine_lr(step: int, steps: int, *, lr: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning rate at 0-based ``step``: linear warmup over ``warmup`` steps to ``lr``, then
    cosine decay to ``min_ratio * lr`` at ``steps`` (SGDR, Loshchilov & Hutter 2017, eq. 5,
    one cycle, no restart)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def encode_sft_example(processor, messages: Sequence[Mapping], *, ignore_index: int = -100
                       ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one SFT conversation (a user turn with image parts, then an
    assistant answer; more user/assistant turns may follow), exactly as
    ``processor(text=apply_chat_template(messages))`` tokenises it (each ``<image>`` expanded to
    :func:`n_image_tokens` copies). Labels are ``ignore_index`` everywhere but on each
    assistant turn's tokens and its closing ``</s>``: the loss is on the answers."""
    if not messages or messages[-1].get("role") != "assistant":
        raise PairforgeError("SFT messages must end with one assistant message (the answer)")
    tok = processor.tokenizer
    expand = IMAGE * n_image_tokens(processor)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the conversation text tokenised so far
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = processor.apply_chat_template(list(messages[:k]), add_generation_prompt=True)
        full = processor.apply_chat_template(list(messages[:k + 1]))
        if not (prompt.startswith(done) and full.startswith(prompt)):  # pragma: no cover - template change
            raise PairforgeError("chat template: a longer conversation does not extend the shorter one")
        p_ids = tok(prompt[len(done):].replace(IMAGE, expand), add_special_tokens=not done).input_ids
        a_ids = tok(full[len(prompt):], add_special_tokens=False).input_ids  # <s> from the template
        ids += p_ids + a_ids
        labels += [ignore_index] * len(p_ids) + a_ids
        done = full
    return ids, labels


def uint8_chw(image):
    """A PIL image as the ``(3, H, W)`` uint8 array (RGB) that :func:`pixel_values_from_uint8`
    takes, stacked into a batch (read-only: a view of the image's buffer)."""
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def pixel_values_from_uint8(images: "torch.Tensor", image_processor) -> "torch.Tensor":
    """``(B, 3, H, W)`` uint8 images at the processor's size → normalised float pixel values,
    equal to what the ``CLIPImageProcessor`` returns for those images (no resize or crop
    needed at 112 px). Lets training keep its pre-rendered images as compact uint8."""
    import torch

    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = images.to(torch.float32) * float(image_processor.rescale_factor)
    return (x - mean) / std


# ----------------------------------------------------------------------------- the tiny CLIP


def build_clip_processor(words: Iterable[str], max_length: int = 64):
    """``CLIPProcessor`` = ``CLIPImageProcessor`` at 112 px + the word tokenizer with ``</s>``
    appended (CLIP's text tower pools at the first ``</s>``). ``CLIPProcessor`` accepts a
    ``PreTrainedTokenizerFast`` in transformers 5, so no BPE files are needed."""
    from transformers import CLIPProcessor

    tokenizer = build_tokenizer(words, add_eos=True, model_max_length=max_length)
    return CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer)


def clip_config(vocab_size: int, *, hidden: int = 128, layers: int = 3, heads: int = 4,
                projection_dim: int = 128, max_positions: int = 64):
    """``CLIPConfig`` of the tiny CLIP (ViT at 112 px, patch 14; a small causal text tower).
    ``eos_token_id`` is ``</s>``'s id (not 2), so pooling takes the first ``</s>``."""
    from transformers import CLIPConfig

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                projection_dim=projection_dim, pad_token_id=ids[PAD], bos_token_id=ids[BOS],
                eos_token_id=ids[EOS])
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                  projection_dim=projection_dim)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    config._attn_implementation = "eager"
    return config


# ----------------------------------------------------------------------------- CLIP texts

#: The minimal edits that turn a true scene description into a wrong one.
EDIT_TYPES = ("color", "kind", "count", "position")
_FLIP = {"left": "right", "right": "left", "above": "below", "below": "above"}
#: The formats of a CLIP description and its edits. ``fair``: the (colour, kind) groups listed
#: by colour, then kind, which says nothing about where the objects are, and count edits never
#: touch a group the relation sentence names. ``session-4`` (the shipped tiny CLIP's training
#: text, kept to reproduce it): groups listed left to right, so whether a horizontal relation
#: sentence follows the listing order tells a true description from its position edit without
#: the image, and a count edit can turn "a red circle" into "two red circles" while the relation
#: sentence still says "the red circle", which the text alone also gives away.
DESCRIPTION_FORMATS = ("fair", "session-4")


def _scene(scene: Any):
    from pairforge.world import Scene

    return scene if isinstance(scene, Scene) else Scene.from_dict(scene)


def _description_parts(scene, text_format: str = "fair"
                       ) -> tuple[list[list], tuple[int, str, int] | None, str]:
    """Groups ``[color, kind, count, first_object_index]`` in ``text_format``'s order
    (:data:`DESCRIPTION_FORMATS`), the relation ``(group_a, rel, group_b)`` between the first
    two single-object groups with a clear relation (in either order, by the scene seed's
    parity; the world's :func:`~pairforge.world.tasks.relation`), and the background."""
    from pairforge.world.tasks import relation

    if text_format not in DESCRIPTION_FORMATS:
        raise PairforgeError(f"description format '{text_format}': choose one of {DESCRIPTION_FORMATS}")
    objs = sorted(range(len(scene.objects)),
                  key=(lambda i: (scene.objects[i].center, i)) if text_format == "session-4"
                  else (lambda i: (scene.objects[i].color, scene.objects[i].kind, i)))
    groups: list[list] = []
    where: dict[tuple[str, str], int] = {}
    for i in objs:
        o = scene.objects[i]
        key = (o.color, o.kind)
        if key in where:
            groups[where[key]][2] += 1
        else:
            where[key] = len(groups)
            groups.append([o.color, o.kind, 1, i])
    rel = None
    singles = [g for g, grp in enumerate(groups) if grp[2] == 1]
    for a in singles:
        for b in singles:
            r = relation(scene.objects[groups[a][3]], scene.objects[groups[b][3]]) if a < b else None
            if r is not None:  # odd seeds name the right/lower object first: both words occur
                rel = (b, _FLIP[r], a) if scene.seed % 2 else (a, r, b)
                break
        if rel is not None:
            break
    return groups, rel, scene.background


def _render_description(groups: Sequence[Sequence], rel: tuple[int, str, int] | None,
                        background: str) -> str:
    from pairforge.world import NUMBER_WORDS, PLURALS, RELATIONS

    phrases = [(f"{'an' if color[0] in 'aeiou' else 'a'} {color} {kind}" if n == 1
                else f"{NUMBER_WORDS.get(n, str(n))} {color} {PLURALS[kind]}")
               for color, kind, n, *_ in groups]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = f"{listing} on a {background} background."
    if rel is not None:
        a, r, b = rel
        text += (f" the {groups[a][0]} {groups[a][1]} is {RELATIONS[r]} "
                 f"the {groups[b][0]} {groups[b][1]}.")
    return text


def scene_description(scene: Any, text_format: str = "fair") -> str:
    """A deterministic, complete description of a scene (``Scene`` or its ``scene`` column
    dict) for the CLIP: every (colour, kind) group with its count, in ``text_format``'s order
    (:data:`DESCRIPTION_FORMATS`), the background, and one clear relation between two single
    objects when there is one: e.g. "two blue squares and a red circle on a gray background. the red circle
    is to the left of the ..."."""
    return _render_description(*_description_parts(_scene(scene), text_format))


def edited_description(scene: Any, edit: str, rng: random.Random, text_format: str = "fair"
                       ) -> str | None:
    """The scene's description with one minimal edit that makes it false (:data:`EDIT_TYPES`):
    ``color`` / ``kind``: one group's colour or kind swapped for one no group has;
    ``count``: one group's count changed by one (never to zero nor past the world's
    :data:`~pairforge.world.scenes.MAX_OBJECTS`; in the ``fair`` format never a group the
    relation sentence names);
    ``position``: the relation flipped (left ↔ right, above ↔ below). None when the scene allows no such edit (no
    relation for ``position``; every alternative taken). In the ``fair`` format the edited groups
    are listed in its order again, so the order does not give the edit away."""
    from pairforge.world import KINDS, colors_for
    from pairforge.world.scenes import MAX_OBJECTS

    sc = _scene(scene)
    groups, rel, background = _description_parts(sc, text_format)
    if not groups:
        return None
    groups = [list(g) for g in groups]
    taken = {(g[0], g[1]) for g in groups}
    if edit == "position":
        if rel is None:
            return None
        rel = (rel[0], _FLIP[rel[1]], rel[2])
    elif edit in ("color", "kind"):
        # colours drawable on this background only, so the text alone does not give it away
        field, values = (0, colors_for(background)) if edit == "color" else (1, list(KINDS))
        options = [(g, v) for g, grp in enumerate(groups) for v in values
                   if v != grp[field] and ((v, grp[1]) if field == 0 else (grp[0], v)) not in taken]
        if not options:
            return None
        g, v = rng.choice(options)
        groups[g][field] = v
    elif edit == "count":
        room = sum(g[2] for g in groups) < MAX_OBJECTS
        # "two red circles ... the red circle is" would give itself away
        named = set() if rel is None or text_format == "session-4" else {rel[0], rel[2]}
        options = [(g, d) for g, grp in enumerate(groups) for d in (-1, 1)
                   if g not in named and ((d == 1 and room) or (d == -1 and grp[2] > 1))]
        if not options:
            return None
        g, d = rng.choice(options)
        groups[g][2] += d
    else:
        raise PairforgeError(f"edit '{edit}': choose one of {EDIT_TYPES}")
    if text_format == "fair":  # keep the order sorted, or an unsorted listing gives the edit away
        order = sorted(range(len(groups)), key=lambda g: (groups[g][0], groups[g][1]))
        where = {g: k for k, g in enumerate(order)}
        groups = [groups[g] for g in order]
        rel = None if rel is None else (where[rel[0]], rel[1], where[rel[2]])
    return _render_description(groups, rel, background)


class PatchTargets(NamedTuple):
    """Per-patch ground truth of a scene (row-major, as the ViT orders its patch tokens):
    the index in :data:`~pairforge.world.KINDS` / :data:`~pairforge.world.COLORS` of the object
    covering the patch, and the grid column / row of that object's centre; the last index of
    each ("no object": ``len(KINDS)``, ``len(COLORS)``, grid width, grid height) where no
    object covers the patch."""

    kind: list[int]
    color: list[int]
    col: list[int]
    row: list[int]


def patch_targets(scene: Any, *, patch_size: int = PATCH_SIZE, min_overlap: float = 0.1
                  ) -> PatchTargets:
    """Per-patch ground truth of a scene for the vision tower's dense auxiliary loss
    (:class:`PatchTargets`): for each patch of the ``patch_size`` grid, the kind and colour of
    the object whose box covers most of the patch, and the grid cell of that object's centre;
    "no object" when no box covers at least ``min_overlap`` of the patch. A ViT this small does
    not learn shapes from the contrastive signal alone within our budget; this dense signal
    teaches it quickly. The centre cell makes every patch of an object carry where the *object*
    is (not only where the patch is), so attention pooled over an object's patches reads its
    position: what a relation ("left of", "above") between two named objects needs."""
    import numpy as np
    from pairforge.world import COLORS, KINDS

    sc = _scene(scene)
    gw, gh = sc.width // patch_size, sc.height // patch_size
    x0 = np.arange(gw) * patch_size
    y0 = np.arange(gh) * patch_size
    best = np.full((gh, gw), min_overlap * patch_size * patch_size)
    kind = np.full((gh, gw), len(KINDS))
    color = np.full((gh, gw), len(COLORS))
    col = np.full((gh, gw), gw)
    row = np.full((gh, gw), gh)
    kinds, colors = list(KINDS), list(COLORS)
    for o in sc.objects:
        ox = np.clip(np.minimum(o.x1, x0 + patch_size) - np.maximum(o.x0, x0), 0, None)
        oy = np.clip(np.minimum(o.y1, y0 + patch_size) - np.maximum(o.y0, y0), 0, None)
        area = oy[:, None] * ox[None, :]
        win = area >= best
        best = np.where(win, area, best)
        kind[win] = kinds.index(o.kind)
        color[win] = colors.index(o.color)
        cx, cy = o.center
        col[win] = min(gw - 1, max(0, int(cx // patch_size)))
        row[win] = min(gh - 1, max(0, int(cy // patch_size)))
    return PatchTargets(*(a.reshape(-1).tolist() for a in (kind, color, col, row)))


def object_patch_masks(scene: Any, *, patch_size: int = PATCH_SIZE, min_overlap: float = 0.1
                       ) -> list[list[bool]]:
    """Per object of the scene (in ``scene.objects`` order), which patches of the
    ``patch_size`` grid (row-major, as the ViT orders its patch tokens) it covers: its box
    covers at least ``min_overlap`` of the patch, or, for an object too small to cover that
    much of any patch, the one patch holding its centre. What an attention head that looks
    the object up should attend to (``scripts/train_tiny_vlm.py --attend-weight``)."""
    import numpy as np

    sc = _scene(scene)
    gw, gh = sc.width // patch_size, sc.height // patch_size
    x0 = np.arange(gw) * patch_size
    y0 = np.arange(gh) * patch_size
    out = []
    for o in sc.objects:
        ox = np.clip(np.minimum(o.x1, x0 + patch_size) - np.maximum(o.x0, x0), 0, None)
        oy = np.clip(np.minimum(o.y1, y0 + patch_size) - np.maximum(o.y0, y0), 0, None)
        mask = (oy[:, None] * ox[None, :]) >= min_overlap * patch_size * patch_size
        if not mask.any():
            cx, cy = o.center
            mask[min(gh - 1, max(0, int(cy // patch_size))), min(gw - 1, max(0, int(cx // patch_size)))] = True
        out.append(mask.reshape(-1).tolist())
    return out


def patch_target_tensors(targets: Sequence[PatchTargets], *, centre: bool) -> tuple:
    """:func:`patch_targets` of a batch (or a whole training set) as the ``(N, P)`` long tensors
    :func:`patch_loss` takes: kind and colour, and with ``centre`` the centre's column and row."""
    import torch

    fields = PatchTargets._fields if centre else PatchTargets._fields[:2]
    return tuple(torch.tensor([getattr(t, f) for t in targets]) for f in fields)


def dense_head_size(grid: int = IMAGE_SIZE // PATCH_SIZE, *, centre: bool = True) -> int:
    """Outputs per patch of the dense head :func:`patch_loss` reads: kind + colour (each with
    "no object"), and with ``centre`` the centre's column and row (each ``grid`` + 1)."""
    from pairforge.world import COLORS, KINDS

    return len(KINDS) + 1 + len(COLORS) + 1 + (2 * (grid + 1) if centre else 0)


def patch_loss(logits: "torch.Tensor", kind: "torch.Tensor", color: "torch.Tensor",
               col: "torch.Tensor | None" = None, row: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The dense auxiliary loss on per-patch predictions ``logits`` (B, P, :func:`dense_head_size`:
    kind, colour, then with ``col``/``row`` the centre's column and row, "no object" last in
    each) against :func:`patch_targets` (B, P each): the sum of the mean cross-entropies."""
    import torch.nn.functional as F
    from pairforge.world import COLORS, KINDS

    heads = [(len(KINDS) + 1, kind), (len(COLORS) + 1, color)]
    if (col is None) != (row is None):
        raise PairforgeError("patch_loss: pass both col and row (the centre cell) or neither")
    if col is not None:
        grid = (logits.shape[-1] - heads[0][0] - heads[1][0]) // 2
        heads += [(grid, col), (grid, row)]
    loss, at = 0.0, 0
    for n, target in heads:
        loss = loss + F.cross_entropy(logits[..., at:at + n].flatten(0, 1), target.flatten())
        at += n
    if at != logits.shape[-1]:
        raise PairforgeError(f"patch_loss: logits have {logits.shape[-1]} outputs per patch, the "
                             f"targets need {at}; size the head with dense_head_size()")
    return loss


def own_cell_loss(logits: "torch.Tensor", grid: int = IMAGE_SIZE // PATCH_SIZE) -> "torch.Tensor":
    """Cross-entropy of every patch's own grid column and row (patch ``p`` of the row-major
    grid: column ``p % grid``, row ``p // grid``) from per-patch ``logits`` (B, grid², 2·grid:
    column then row), summed over the two. A ViT trained only on pooled or per-object targets
    can wash its position embedding out of the patch tokens (the session-4 tiny CLIP's did: its
    patch features hold no linear trace of their column); this target keeps it in, so a
    language model reading the tokens' values can tell where a looked-up object is."""
    import torch
    import torch.nn.functional as F

    n = grid * grid
    if logits.shape[-2:] != (n, 2 * grid):
        raise PairforgeError(f"own_cell_loss: logits must be (B, {n}, {2 * grid}) for a {grid}×{grid} "
                             f"grid, got {tuple(logits.shape)}")
    p = torch.arange(n, device=logits.device).expand(logits.shape[0], n)
    return (F.cross_entropy(logits[..., :grid].flatten(0, 1), (p % grid).flatten())
            + F.cross_entropy(logits[..., grid:].flatten(0, 1), (p // grid).flatten()))


# ----------------------------------------------------------------------------- evaluation helpers


def generate_answers(model, processor, rows: Sequence[Mapping], *, batch_size: int = 32,
                     max_new_tokens: int = 64, temperature: float = 0.0,
                     num_samples: int = 1, seed: int = 0) -> list[list[str]]:
    """Answers of the VLM to SFT ``rows`` (``messages`` with the user turn first, ``images``):
    greedy when ``temperature == 0``, else ``num_samples`` pure samples (no top-k / top-p)
    per row. Returns one list of decoded answers per row."""
    import torch

    out: list[list[str]] = []
    greedy = temperature == 0
    torch.manual_seed(seed)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        prompts = [processor.apply_chat_template([r["messages"][0]], add_generation_prompt=True)
                   for r in chunk]
        images = [img.convert("RGB") for r in chunk for img in r["images"]]
        inputs = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        kw = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            num_return_sequences=num_samples)
        with torch.no_grad():
            seqs = model.generate(**inputs, max_new_tokens=max_new_tokens, **kw)
        texts = processor.batch_decode(seqs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        k = 1 if greedy else num_samples
        out += [[t.strip() for t in texts[i * k:(i + 1) * k]] for i in range(len(chunk))]
    return out


def clip_similarity(model, processor, images: Sequence[Any], texts: Sequence[str]) -> "torch.Tensor":
    """Cosine similarity of each image with its text (paired one to one), shape ``(N,)``."""
    import torch

    if len(images) != len(texts):
        raise PairforgeError(f"clip_similarity: {len(images)} images but {len(texts)} texts; "
                             f"they are paired one to one")
    inputs = processor(text=list(texts), images=[im.convert("RGB") for im in images],
                       return_tensors="pt", padding=True, truncation=True).to(model.device)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
