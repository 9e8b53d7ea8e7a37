"""Train the tiny CLIP of the offline world contrastively on scene descriptions and answer sentences.

    python scripts/train_tiny_clip.py --out /tmp/tiny-clip --seed 0

Data: the world's SFT train split (filter examples excluded), images pre-rendered as uint8.
Each step takes a batch of B images and, per image: its complete scene description
(:func:`pairforge.world.models.scene_description`), K hard negatives (the same description
with one minimal wrong edit each: colour, kind, count or position, :func:`edited_description`;
NegCLIP-style, Yuksekgonul et al. 2023), and the example's answer sentence. Loss (CLIP's symmetric InfoNCE, Radford et al. 2021, with
hard negatives as extra columns):

- image → text over the B true descriptions and the B·K edited ones (target: its own true one);
- description → image over the B images;
- image ↔ answer sentence, symmetric, where identical sentences in the batch count as
  positives for each other (weight ``--answer-weight``);
- a dense auxiliary loss on the vision tower (weight ``--dense-weight``): each patch token
  predicts the kind and colour of the object covering it and (``--dense-centre``) the grid cell
  of that object's centre, from the generator's ground-truth boxes
  (:func:`pairforge.world.models.patch_targets`), through a linear head that is not saved.
  Without it this small ViT does not learn shapes within the budget (kind edits stayed
  at chance after 1000 steps); the same patch features feed the tiny VLM;
- a pooled object loss (weight ``--object-weight``, both stages): from the projected image
  embedding, a linear head (not saved) predicts which colour+kind pairs the scene holds
  (binary cross-entropy) and each present pair's centre (squared error). It lifted kind edits
  from 66.8% to 79.9%; the centre part stayed near chance and position edits stayed at chance
  (benchmarks/world_models_clip_experiments.md);
- a pairwise relation loss (weight ``--relation-weight``): for each image whose description
  names a relation, ``-log σ(scale · (cos(image, true) − cos(image, relation flipped)))``.

Hard negatives are drawn with per-type weights (``--edit-weights``, default position 3, kind 2,
colour and count 1), so the weak edit types are among the K more often.

AdamW, linear warmup then cosine decay, fixed thread count and data order (runs with the
same arguments give the same losses). Saves ``CLIPModel`` + ``CLIPProcessor`` with
``save_pretrained`` and a ``train_log.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pairforge.world import COLORS, KINDS, derive_seed, sft_dataset, vocabulary
from pairforge.world.models import (
    DESCRIPTION_FORMATS,
    EDIT_TYPES,
    IMAGE_SIZE,
    PATCH_SIZE,
    build_clip_processor,
    clip_config,
    dense_head_size,
    edited_description,
    own_cell_loss,
    patch_loss,
    patch_target_tensors,
    patch_targets,
    pixel_values_from_uint8,
    save_checkpoint,
    scene_description,
    seed_everything,
    training_parser,
    uint8_chw,
    warmup_cosine_lr,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(__doc__.split("\n")[0], steps=1000, steps_help="stage 2: contrastive steps",
                        seed_help="seed of the initialisation, data order, edits")
    p.add_argument("--n-train", type=int, default=20000, help="train-split rows drawn (its filter rows are then left out)")
    p.add_argument("--hard-negatives", type=int, default=3,
                   help="minimal wrong edits per image (distinct edit types first)")
    p.add_argument("--answer-weight", type=float, default=0.5)
    p.add_argument("--dense-steps", type=int, default=2000,
                   help="stage 1: steps of the vision tower alone on the dense patch loss")
    p.add_argument("--edit-weights", type=str, default="color=1,kind=2,count=1,position=3",
                   help="relative weights of the edit types when drawing the hard negatives "
                        "(weighted order without replacement, then repeats)")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="weight of the pooled object loss: from the pooled image embedding, a "
                        "linear head (not saved) predicts which colour+kind pairs are present and "
                        "each present pair's centre (x, y); in both stages (stage 1 then also trains "
                        "the visual projection)")
    p.add_argument("--text-format", choices=DESCRIPTION_FORMATS, default="session-4",
                   help="format of the descriptions and their edits (pairforge.world.models."
                        "DESCRIPTION_FORMATS): session-4 (the default) reproduces the shipped CLIP, "
                        "but the text alone decides some of its position and count edits; fair "
                        "(what scripts/eval_world_models.py scores) does not allow that")
    p.add_argument("--own-cell-weight", type=float, default=0.0,
                   help="weight of a dense loss asking each patch token for its own grid column and row "
                        "(own_cell_loss; linear head not saved), in both stages, so the patch tokens the "
                        "tiny VLM starts from carry where they are; 0 = off")
    p.add_argument("--relation-weight", type=float, default=0.0,
                   help="weight of a pairwise relation loss: for images whose description names a "
                        "relation, -log σ(s(true) − s(relation flipped)) with the CLIP logit scale")
    p.add_argument("--text-steps", type=int, default=0,
                   help="stage 3: steps with the vision tower frozen (so the tiny VLM's init does not "
                        "change), training the text tower and both projections on the contrastive, "
                        "relation and text relation-code losses")
    p.add_argument("--text-code-weight", type=float, default=1.0,
                   help="stage 3: weight of the text relation-code loss: from the text embedding, a "
                        "linear head (not saved) predicts the sentence's relation as ±1 on the two "
                        "named colour+kind slots of the x or y axis (breaks the left/right symmetry "
                        "that keeps both towers ignoring the relation word)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this CLIPModel checkpoint (e.g. to run stage 3 alone: "
                        "--dense-steps 0 --steps 0 --text-steps N)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    return p.parse_args(argv)


def load_rows(args):
    """Train rows without ``filter_reason``: uint8 images, scenes, answers."""
    split = sft_dataset(n_train=args.n_train, n_validation=0, n_test=0, seed=args.data_seed)["train"]
    keep = [i for i, r in enumerate(split["filter_reason"]) if r is None]
    rows = split.select(keep)
    images = np.zeros((len(rows), 3, 112, 112), dtype=np.uint8)
    scenes, answers, ids = [], [], []
    for i, row in enumerate(tqdm(rows, desc="render train", unit="ex")):
        images[i] = uint8_chw(row["images"][0])
        scenes.append(row["scene"])
        answers.append(row["answer"])
        ids.append(row["id"])
    return torch.from_numpy(images), scenes, answers, ids, len(split) - len(rows)


def parse_edit_weights(text: str) -> dict[str, float]:
    """``"color=1,kind=2,..."`` → weights for every edit type (missing types weigh 1)."""
    weights = dict.fromkeys(EDIT_TYPES, 1.0)
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = part.partition("=")
        if name not in weights or not value:
            raise SystemExit(f"--edit-weights: '{part}' is not TYPE=WEIGHT with TYPE in {EDIT_TYPES}")
        weights[name] = float(value)
        if weights[name] <= 0:
            raise SystemExit(f"--edit-weights: {name} must weigh more than 0")
    return weights


def hard_negatives(scene, k: int, rng: random.Random, weights: dict[str, float] | None = None,
                   text_format: str = "session-4") -> list[str]:
    """``k`` minimal wrong edits of the scene's description, of distinct edit types while the
    scene allows them (colour and kind edits always exist), then repeated types. The types
    are ordered by weighted sampling without replacement (Efraimidis & Spirakis keys
    ``u ** (1 / w)``), so a heavier type is more often among the ``k``."""
    weights = weights or dict.fromkeys(EDIT_TYPES, 1.0)
    out: list[str] = []
    while len(out) < k:
        keys = {e: rng.random() ** (1.0 / weights[e]) for e in EDIT_TYPES}
        for e in sorted(EDIT_TYPES, key=lambda e: -keys[e]):
            text = edited_description(scene, e, rng, text_format)
            if text is not None and len(out) < k:
                out.append(text)
    return out


def object_targets(scene) -> tuple[list[float], list[float]]:
    """Per colour+kind pair (``len(COLORS) * len(KINDS)`` slots, colour-major): presence (0/1)
    and the mean centre of that pair's objects in [-1, 1] (x, y; 0 when absent), flattened as
    ``presence`` (S,) and ``centres`` (2S,). The pooled image embedding can only score a
    relation sentence ("the red circle is to the left of the blue square") linearly if it
    carries each object's position; this target asks for exactly that."""
    sc = scene if hasattr(scene, "objects") and not isinstance(scene, dict) else None
    if sc is None:
        from pairforge.world import Scene
        sc = Scene.from_dict(scene)
    colors, kinds = list(COLORS), list(KINDS)
    n = len(colors) * len(kinds)
    acc = np.zeros((n, 3))
    for o in sc.objects:
        s = colors.index(o.color) * len(kinds) + kinds.index(o.kind)
        cx, cy = o.center
        acc[s] += (1.0, 2 * cx / sc.width - 1, 2 * cy / sc.height - 1)
    present = (acc[:, 0] > 0).astype(float)
    centres = np.where(present[:, None] > 0, acc[:, 1:] / np.maximum(acc[:, :1], 1), 0.0)
    return present.tolist(), centres.reshape(-1).tolist()


def object_loss(logits, present, centres) -> torch.Tensor:
    """Binary cross-entropy of the presence logits (B, S) + mean squared error of the centres
    (B, 2S) on the present slots only."""
    S = present.shape[1]
    bce = F.binary_cross_entropy_with_logits(logits[:, :S], present)
    mask = present.repeat_interleave(2, dim=1)
    mse = ((logits[:, S:] - centres) ** 2 * mask).sum() / mask.sum().clamp(min=1)
    return bce + mse


def relation_loss(img, true, flipped, scale) -> torch.Tensor:
    """Mean ``-log σ(scale · (cos(img, true) − cos(img, flipped)))`` over images whose
    description names a relation, ``flipped`` being that description with the relation
    reversed: the one contrast that needs where the objects are."""
    return -F.logsigmoid(scale * ((img * true).sum(-1) - (img * flipped).sum(-1))).mean()


def relation_code(scene, text_format: str = "session-4") -> list[float]:
    """The relation its description states, as a (2·S,) vector over the colour+kind slots of
    :func:`object_targets` (:func:`pair_code`). All zeros when the description names no relation."""
    from pairforge.world.models import _description_parts, _scene

    groups, rel, _ = _description_parts(_scene(scene), text_format)
    if rel is None:
        return [0.0] * (2 * len(COLORS) * len(KINDS))
    a, r, b = rel
    return pair_code(tuple(groups[a][:2]), r, tuple(groups[b][:2]))


def pair_code(a: tuple[str, str], rel: str, b: tuple[str, str]) -> list[float]:
    """"The (colour, kind) ``a`` is ``rel`` the ``b``" as a (2·S,) vector over the colour+kind
    slots of :func:`object_targets` (x block, then y block): for "A is to the left of B"
    (x_A < x_B) +1 at B and −1 at A on the x block, so that code · centres > 0 exactly when the
    sentence is true; "right of" the opposite sign; "above"/"below" likewise on the y block (y
    grows downwards)."""
    colors, kinds = list(COLORS), list(KINDS)
    n = len(colors) * len(kinds)
    code = [0.0] * (2 * n)
    off, sign = {"left": (0, 1.0), "right": (0, -1.0), "above": (n, 1.0), "below": (n, -1.0)}[rel]
    code[off + colors.index(b[0]) * len(kinds) + kinds.index(b[1])] += sign
    code[off + colors.index(a[0]) * len(kinds) + kinds.index(a[1])] -= sign
    return code


def clip_losses(img, desc, neg, ans, answers: list[str] | None, scale) -> dict[str, torch.Tensor]:
    """The three InfoNCE terms on L2-normalised embeddings: images, descriptions and answers
    (B, D), hard negatives (B·K, D); ``answers`` are the answer strings (``ans`` None: no
    answer term)."""
    B = img.shape[0]
    target = torch.arange(B)
    logits_i2t = scale * img @ torch.cat([desc, neg]).T           # (B, B + B·K): negatives as columns
    logits_t2i = scale * desc @ img.T                              # (B, B)
    out = {"i2t": F.cross_entropy(logits_i2t, target), "t2i": F.cross_entropy(logits_t2i, target)}
    if ans is None:
        return out
    same = torch.tensor([[a == b for b in answers] for a in answers], dtype=torch.float32)
    soft = same / same.sum(1, keepdim=True)                        # identical sentences share the target
    logits_ia = scale * img @ ans.T
    out["answer"] = 0.5 * (F.cross_entropy(logits_ia, soft) + F.cross_entropy(logits_ia.T, soft))
    return out


CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags:
- clip
- tiny
- synthetic
- pairforge
- offline-world
---

# tiny-clip: pairforge's offline-world CLIP

A {n_params_m:.2f}M-parameter `CLIPModel` trained from scratch on pairforge's procedural shapes
world: the image-text scorer of the offline test bed (MAS for M3PO, CLIPScore for P2-DPO's
DDW, sentence similarity for ASPO). It scores sentences about coloured shapes against
112-px images; it knows nothing outside that world (vocabulary: the world's {n_words} words).
Its vision tower also initialises the tiny VLM's (`tiny-llava`), as CLIP ViT-L does LLaVA's.

## Use

```python
from pairforge.world.models import load_tiny_clip, clip_similarity   # or, the generic path:
model, processor = load_tiny_clip()            # AutoProcessor.from_pretrained(path)
                                               # CLIPModel.from_pretrained(path)
inputs = processor(text=["a red circle on a gray background."], images=[image],
                   return_tensors="pt", padding=True)
score = model(**inputs).logits_per_image
```

## Architecture

ViT vision tower (112 px, patch 14, hidden {hidden}, {layers} layers, 4 heads), causal text
transformer (hidden {hidden}, {layers} layers, 4 heads, up to 64 positions, pooled at the first
`</s>`), projections to {hidden} dimensions; {n_params:,} parameters. Tokenizer: the same
word-level `PreTrainedTokenizerFast` as tiny-llava (lower-cased, `<s> … </s>` added).
`CLIPProcessor` accepts it in transformers 5, so no BPE files are needed; `AutoProcessor`
loads it. Weights stored in {save_dtype} (loaded in float32 by default).

## Data

`pairforge.world.sft_dataset(n_train={n_train}, n_validation=0, n_test=0, seed={data_seed})`,
train split: {n_examples} images (the {n_excl} filter examples excluded). Texts per image:
its complete scene description (`pairforge.world.models.scene_description` in the `{text_format}`
format: every colour+kind group with its count, the background, one clear relation), {k} minimal wrong edits of it as
hard negatives (`edited_description`: one colour, kind, count or position swapped; edit types
drawn with weights {edit_weights}), and the example's SFT answer sentence.

## Training

```
{command}
```

{steps} steps × {batch} images, AdamW (weight decay {wd}), learning rate {lr}, {warmup} warmup
steps, cosine decay. Loss = image→text InfoNCE over the batch's descriptions plus all hard
negatives + description→image InfoNCE + {aw} × image↔answer InfoNCE (identical answers are
shared positives) + {dw} × a dense auxiliary loss (each patch token predicts the kind and colour
of the object covering it{centre_text}, from ground-truth boxes, through a linear head that is
not shipped; without it this ViT did not learn shapes within the budget){relation_text} + {ow} × a pooled object loss (from
the image embedding, a linear head that is not shipped predicts which colour+kind pairs are
present and each one's centre). Stage 1: {dense_steps} steps of the vision tower (and, with the
object loss, its projection) on the dense and object losses alone. Measured here (2 shared CPU
cores, torch {torch}, {threads} thread): data {data_s:.0f} s, training {train_s:.0f} s, total
**{total_min:.1f} min**. Final losses: image→text {i2t:.3f}, description→image {t2i:.3f},
dense {dense:.3f}.

## Evaluation (held-out test split scenes)

How often the true description scores higher than a minimal wrong edit of it:

<!-- eval:start -->
(run `python scripts/eval_world_models.py --update-cards`)
<!-- eval:end -->

## Reproducibility

Deterministic on CPU for a fixed thread count (seeds, `torch.use_deterministic_algorithms`,
seeded data order and edits): the same command on the same machine gives the same losses and
rates.
<!-- repro:start -->
(not checked for this run)
<!-- repro:end -->
On another CPU type or thread count expect the rates within ±3 points.

## Limitations

One synthetic world; lower-cases text; relations between objects are its weakest skill: a
flipped relation ("left of" ↔ "right of") is told apart at chance, so do not use its scores
for spatial claims.
"""


def write_card(out: Path, args, log: dict, n_words: int) -> None:
    """The model card (README.md) with the measured numbers; eval fills its table later."""
    last = lambda k: float(np.mean(log[k][-50:]))  # noqa: E731
    (out / "README.md").write_text(CARD.format(
        n_params_m=log["n_params"] / 1e6, n_params=log["n_params"], n_words=n_words,
        hidden=args.hidden, layers=args.layers, save_dtype=args.save_dtype, n_train=args.n_train,
        data_seed=args.data_seed, n_examples=log["n_train_examples"], n_excl=log["n_train_excluded"],
        k=args.hard_negatives, command=log["command"], steps=args.steps, batch=args.batch_size,
        wd=args.weight_decay, lr=args.lr, warmup=args.warmup, aw=args.answer_weight,
        dw=args.dense_weight, ow=args.object_weight,
        centre_text=" and the grid cell of that object's centre" if args.dense_centre else "",
        relation_text=(f" + {args.relation_weight} × a relation loss (−log σ of the scaled cosine margin "
                       f"of the true description over the same description with its relation flipped)"
                       if args.relation_weight else "")
                      + (f" + {args.own_cell_weight} × a dense loss asking each patch token for its own grid "
                         f"column and row (linear head not shipped; in both stages)" if args.own_cell_weight else ""),
        dense_steps=args.dense_steps, edit_weights=args.edit_weights, text_format=args.text_format,
        torch=log["torch"], threads=log["threads"], data_s=log["data_seconds"],
        train_s=log["train_seconds"], total_min=log["total_seconds"] / 60, i2t=last("losses_i2t"),
        t2i=last("losses_t2i"), dense=last("losses_dense")))


def pretrain_vision_dense(model, dense_head, images, patch_t, processor, args,
                          gen: torch.Generator, object_head=None, present_t=None,
                          centres_t=None, cell_head=None) -> list[float]:
    """Stage 1: the vision tower alone on the dense patch loss (``--dense-steps`` steps, linear
    warmup then a constant learning rate). A ViT this small learns shapes from per-patch
    targets in a few thousand cheap steps; from the contrastive loss alone it does not."""
    params = [*model.vision_model.parameters(), *dense_head.parameters()]
    if args.object_weight:  # the head reads the projected embedding, as the contrastive loss does
        params += [*model.visual_projection.parameters(), *object_head.parameters()]
    if cell_head is not None:
        params += list(cell_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    losses = []
    bar = tqdm(range(args.dense_steps), desc="stage 1: dense", unit="step")
    for step in bar:
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        pixels = pixel_values_from_uint8(images[idx], processor.image_processor)
        out = model.get_image_features(pixel_values=pixels)
        loss = patch_loss(dense_head(out.last_hidden_state[:, 1:]), *(t[idx] for t in patch_t))
        if args.object_weight:
            loss = loss + args.object_weight * object_loss(
                object_head(out.pooler_output), present_t[idx], centres_t[idx])
        if cell_head is not None:
            loss = loss + args.own_cell_weight * own_cell_loss(cell_head(out.last_hidden_state[:, 1:]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if (step + 1) % args.log_every == 0:
            bar.set_postfix(dense=f"{np.mean(losses[-args.log_every:]):.3f}")
    return losses


def train_text_side(model, processor, images, scenes, descriptions, flipped, args, gen,
                    edit_weights, ids) -> dict[str, list[float]]:
    """Stage 3 (``--text-steps``): the vision tower frozen, the text tower and both projections
    trained on i2t/t2i InfoNCE with hard negatives, the relation loss, and the text
    relation-code loss (:func:`relation_code`, linear head not saved)."""
    tok = processor.tokenizer
    n = len(COLORS) * len(KINDS)
    code_head = torch.nn.Linear(model.config.projection_dim, 2 * n)
    for p in model.vision_model.parameters():
        p.requires_grad_(False)
    params = [*model.text_model.parameters(), *model.text_projection.parameters(),
              *model.visual_projection.parameters(), model.logit_scale, *code_head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    logs: dict[str, list[float]] = {"i2t": [], "t2i": [], "relation": [], "code": []}
    codes_all = torch.tensor([relation_code(s, args.text_format) for s in scenes])
    order: list[int] = []
    bar = tqdm(range(args.text_steps), desc="stage 3: text side", unit="step")
    for step in bar:
        if len(order) < args.batch_size:
            order += torch.randperm(len(scenes), generator=gen).tolist()
        idx, order = order[:args.batch_size], order[args.batch_size:]
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, args.text_steps, lr=args.lr, warmup=args.warmup,
                                       min_ratio=args.min_lr_ratio)
        negs = [t for i in idx for t in hard_negatives(
            scenes[i], args.hard_negatives, random.Random(derive_seed(args.seed, ids[i], "text", step)),
            edit_weights, args.text_format)]
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=pixel_values_from_uint8(
                images[idx], processor.image_processor)).pooler_output
        img = F.normalize(model.visual_projection(pooled), dim=-1)
        rel = [(r, flipped[i]) for r, i in enumerate(idx) if flipped[i] is not None]
        texts = [descriptions[i] for i in idx] + negs + [t for _, t in rel]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
        raw = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
        txt = F.normalize(raw, dim=-1)
        B, n_neg = len(idx), len(negs)
        scale = model.logit_scale.exp().clamp(max=100)
        parts = clip_losses(img, txt[:B], txt[B:B + n_neg], None, None, scale)
        codes = codes_all[idx]
        parts["code"] = F.mse_loss(code_head(raw[:B]), codes) * codes.shape[1]
        loss = parts["i2t"] + parts["t2i"] + args.text_code_weight * parts["code"]
        if rel:
            rows = torch.tensor([r for r, _ in rel])
            parts["relation"] = relation_loss(img[rows], txt[rows], txt[B + n_neg:], scale)
            loss = loss + args.relation_weight * parts["relation"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, v in parts.items():
            logs[k].append(float(v))
        if (step + 1) % args.log_every == 0:
            bar.set_postfix({k: f"{np.mean(v[-args.log_every:]):.3f}" for k, v in logs.items() if v})
    for p in model.vision_model.parameters():
        p.requires_grad_(True)
    return logs


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    seed_everything(args.seed, args.threads)
    from transformers import CLIPModel

    images, scenes, answers, ids, n_excl = load_rows(args)
    descriptions = [scene_description(s, args.text_format) for s in scenes]
    targets = [patch_targets(s) for s in tqdm(scenes, desc="patch targets", unit="scene")]
    patch_t = patch_target_tensors(targets, centre=args.dense_centre)
    # the relation flipped (None: no relation), for the relation losses only
    flipped = ([edited_description(s, "position", random.Random(0), args.text_format) for s in scenes]
               if args.relation_weight or args.text_steps else [None] * len(scenes))
    objects = [object_targets(s) for s in scenes]
    present_t = torch.tensor([o[0] for o in objects], dtype=torch.float32)
    centres_t = torch.tensor([o[1] for o in objects], dtype=torch.float32)
    edit_weights = parse_edit_weights(args.edit_weights)
    processor = build_clip_processor(vocabulary())
    tok = processor.tokenizer
    n_unk = sum(t == tok.unk_token_id for seq in tok(descriptions[:2000]).input_ids for t in seq)
    if n_unk:
        print(f"warning: {n_unk} <unk> tokens in the descriptions; the vocabulary misses some words")
    t_data = time.time() - t0

    config = clip_config(len(tok), hidden=args.hidden, layers=args.layers)
    model = CLIPModel(config) if args.init is None else CLIPModel.from_pretrained(args.init, dtype=torch.float32)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    dense_head = torch.nn.Linear(args.hidden, dense_head_size(centre=args.dense_centre))  # not saved
    n_slots = len(COLORS) * len(KINDS)
    object_head = torch.nn.Linear(args.hidden, 3 * n_slots)  # not saved
    named = [*model.named_parameters(), *(("dense_head." + n, p) for n, p in dense_head.named_parameters())]
    if args.object_weight:
        named += [("object_head." + n, p) for n, p in object_head.named_parameters()]
    cell_head = None
    if args.own_cell_weight:
        cell_head = torch.nn.Linear(args.hidden, 2 * (IMAGE_SIZE // PATCH_SIZE))  # not saved
        named += [("cell_head." + n, p) for n, p in cell_head.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def embed_text(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
        out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        return F.normalize(out.pooler_output, dim=-1)

    gen = torch.Generator().manual_seed(args.seed)
    t1 = time.time()
    stage1 = pretrain_vision_dense(model, dense_head, images, patch_t, processor, args, gen,
                                   object_head, present_t, centres_t, cell_head)
    t_stage1 = time.time() - t1
    order: list[int] = []
    logs: dict[str, list[float]] = {"loss": [], "i2t": [], "t2i": [], "answer": [], "dense": []}
    if args.object_weight:
        logs["object"] = []
    if args.relation_weight:
        logs["relation"] = []
    if cell_head is not None:
        logs["own_cell"] = []
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        if len(order) < args.batch_size:
            order += torch.randperm(len(scenes), generator=gen).tolist()
        idx, order = order[:args.batch_size], order[args.batch_size:]
        negs = [t for i in idx for t in hard_negatives(
            scenes[i], args.hard_negatives, random.Random(derive_seed(args.seed, ids[i], step)), edit_weights,
            args.text_format)]
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, args.steps, lr=args.lr, warmup=args.warmup, min_ratio=args.min_lr_ratio)
        pixels = pixel_values_from_uint8(images[idx], processor.image_processor)
        vis = model.get_image_features(pixel_values=pixels)
        img = F.normalize(vis.pooler_output, dim=-1)
        batch_answers = [answers[i] for i in idx]
        rel = [(r, flipped[i]) for r, i in enumerate(idx) if flipped[i] is not None] if args.relation_weight else []
        desc = embed_text([descriptions[i] for i in idx] + negs + batch_answers + [t for _, t in rel])
        B = len(idx)
        scale = model.logit_scale.exp().clamp(max=100)
        n_neg = len(negs)
        parts = clip_losses(img, desc[:B], desc[B:B + n_neg], desc[B + n_neg:2 * B + n_neg], batch_answers, scale)
        parts["dense"] = patch_loss(dense_head(vis.last_hidden_state[:, 1:]), *(t[idx] for t in patch_t))
        loss = parts["i2t"] + parts["t2i"] + args.answer_weight * parts["answer"] + args.dense_weight * parts["dense"]
        if args.object_weight:
            parts["object"] = object_loss(object_head(vis.pooler_output), present_t[idx], centres_t[idx])
            loss = loss + args.object_weight * parts["object"]
        if cell_head is not None:
            parts["own_cell"] = own_cell_loss(cell_head(vis.last_hidden_state[:, 1:]))
            loss = loss + args.own_cell_weight * parts["own_cell"]
        if rel:
            rows = torch.tensor([r for r, _ in rel])
            parts["relation"] = relation_loss(img[rows], desc[rows], desc[2 * B + n_neg:], scale)
            loss = loss + args.relation_weight * parts["relation"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs["loss"].append(float(loss))
        for k, v in parts.items():
            logs[k].append(float(v))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            bar.set_postfix(loss=f"{np.mean(logs['loss'][-args.log_every:]):.3f}",
                            i2t=f"{np.mean(logs['i2t'][-args.log_every:]):.3f}",
                            dense=f"{np.mean(logs['dense'][-args.log_every:]):.3f}",
                            lr=f"{warmup_cosine_lr(step, args.steps, lr=args.lr, warmup=args.warmup, min_ratio=args.min_lr_ratio):.2e}")
    stage3 = (train_text_side(model, processor, images, scenes, descriptions, flipped, args, gen,
                              edit_weights, ids) if args.text_steps else {})
    t_train = time.time() - t1

    save_checkpoint(model, processor, args.out, dtype=getattr(torch, args.save_dtype))
    log = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_params": n_params, "n_train_examples": len(scenes), "n_train_excluded": n_excl,
        **{f"losses_{k}" if k != "loss" else "losses": v for k, v in logs.items()},
        "losses_stage1_dense": stage1, **{f"losses_stage3_{k}": v for k, v in stage3.items()}, "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "stage1_seconds": round(t_stage1, 1),
        "total_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (args.out / "train_log.json").write_text(json.dumps(log) + "\n")
    write_card(args.out, args, log, n_words=len(vocabulary()))
    print(f"done: {n_params / 1e6:.2f}M params, {args.steps} steps × {args.batch_size} on "
          f"{len(scenes)} examples ({n_excl} filter examples excluded); final loss "
          f"{np.mean(logs['loss'][-50:]):.4f} (image→text with hard negatives "
          f"{np.mean(logs['i2t'][-50:]):.4f}); data {t_data:.0f}s, train {t_train:.0f}s, "
          f"total {time.time() - t0:.0f}s → {args.out}")


if __name__ == "__main__":
    main()
