"""Train the tiny LLaVA-architecture VLM of the offline world from scratch.

    python scripts/train_tiny_vlm.py --out /tmp/tiny-llava --seed 0

Data, generated while training and never repeated: conversation *i* is a fresh world scene
(:func:`pairforge.world.sample_scene`) with ``--turns`` of its questions of distinct task
categories (:func:`pairforge.world.make_examples`), asked one after the other about the one
image, with the loss on every answer: the image is encoded once for several supervised
answers. ``--curriculum`` grows the largest object count from 1 to 6 over the first share of
the steps. The decisive answer tokens (the world's ``answer_span_start:answer_span_end``: the
colour, kind, number, relation...) weigh ``--span-weight`` in the loss; ``--dense-weight``
adds a per-patch loss on the vision tower (:func:`patch_targets`: the kind and colour of the
object under each patch, with ``--dense-centre`` also its centre cell), which teaches a ViT
this small to see shapes far sooner than the answers alone do. ``--attend-weight`` adds an
attention-supervision loss (:func:`attention_loss`, training only): in one language-model layer,
head 0 at each position that predicts a decisive token attends to the patches of the object
the question names and head 1 to those of a spatial question's reference object, the two
look-ups a relation needs; ``--own-cell-weight`` asks each patch token for its own grid cell
(:func:`own_cell_loss`), so that what such a look-up reads says where the object is;
``--fetch-weight`` asks the residual stream after the supervised layer, at the same positions,
for where the two objects are (:func:`fetch_loss`), so the look-up heads' value path keeps
position (a trained model's drops it). ``--phase2-steps`` adds a second phase with its own
learning-rate schedule in which those two losses apply (from scratch they hold every skill
back). ``--init`` continues from a checkpoint. ``--always`` puts the listed task categories (e.g.
spatial,existence) into every conversation that has them.

Model: a randomly initialised ``LlavaForConditionalGeneration`` (CLIP vision tower +
projector + Llama LM, :func:`pairforge.world.models.vlm_config`). AdamW, linear warmup then
cosine decay, a fixed thread count and a seeded data stream (runs with the same arguments give
the same losses). Every ``--probe-every`` steps it logs, per task, how often the decisive token
is the argmax on the world's validation split. Saves model + processor with
``save_pretrained``, the model card and ``train_log.json`` (arguments, losses, probes, wall
time). Evaluate with ``scripts/eval_world_models.py``; ship with ``--out
pairforge/world/assets/tiny-llava``.
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
from tqdm import tqdm

from pairforge.schema import assistant_message, user_message
from pairforge.world import (
    WORLD_NAME,
    derive_seed,
    make_examples,
    sample_scene,
    sft_dataset,
    vocabulary,
)
from pairforge.world.models import (
    IMAGE_SIZE,
    PATCH_SIZE,
    TINY_CLIP_PATH,
    build_vlm_processor,
    dense_head_size,
    encode_sft_example,
    object_patch_masks,
    own_cell_loss,
    patch_loss,
    patch_target_tensors,
    patch_targets,
    pixel_values_from_uint8,
    save_checkpoint,
    seed_everything,
    training_parser,
    uint8_chw,
    vlm_config,
    warmup_cosine_lr,
)
from pairforge.world.scenes import MAX_OBJECTS


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(__doc__.split("\n")[0], steps=700, out_required=False)
    p.set_defaults(lr=1.5e-3, warmup=50)
    p.add_argument("--n-validation", type=int, default=500)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-intermediate", type=int, default=768)
    p.add_argument("--vision-tower", type=Path, default=TINY_CLIP_PATH,
                   help="a CLIPModel checkpoint (e.g. the tiny CLIP) whose vision tower initialises "
                        "ours, as LLaVA starts from a pretrained CLIP ViT; sizes must match (default: the "
                        "shipped tiny CLIP; 'none' starts from random weights)")
    p.add_argument("--init", type=Path, default=None, metavar="CHECKPOINT",
                   help="continue from this tiny-VLM checkpoint (its architecture; --vision-tower and "
                        "the size options are then ignored) instead of a fresh model")
    p.add_argument("--vision-lr-scale", type=float, default=0.3,
                   help="learning-rate factor of the vision tower (0 freezes it, as LLaVA does)")
    p.add_argument("--span-weight", type=float, default=3.0,
                   help="loss weight of the answer tokens that decide correctness (the world's "
                        "answer_span_start/end: the colour, kind, number, relation...); 1 = plain "
                        "mean over answer tokens")
    p.add_argument("--turns", type=int, default=4,
                   help="questions per training image, asked as one multi-turn conversation with "
                        "the loss on every answer (the image is encoded once for all of them)")
    p.add_argument("--curriculum", type=float, default=0.15,
                   help="share of the steps over which the largest object count of the training "
                        "scenes grows from 1 to 6 (0: every scene draws 1-6 objects, as the world does)")
    p.add_argument("--projector-lr-scale", type=float, default=2.0,
                   help="learning-rate factor of the projector (LLaVA trains it alone first)")
    p.add_argument("--always", default="",
                   help="comma-separated task categories asked in every training conversation whose "
                        "scene has such a question (the other turns are drawn at random); '' = none")
    p.add_argument("--own-cell-weight", type=float, default=0.0,
                   help="weight of a dense loss asking each patch token (the vision tower's output) for "
                        "its own grid column and row (own_cell_loss; linear head not saved), so the image "
                        "tokens the language model reads carry where they are; 0 = off")
    p.add_argument("--attend-weight", type=float, default=0.0,
                   help="weight of an attention-supervision loss (training only): in LM layer "
                        "--attend-layer, head 0 at the positions that predict a decisive answer token "
                        "attends to the image patches of the question's object, head 1 to those of its "
                        "reference object (spatial questions); 0 = off")
    p.add_argument("--attend-layer", type=int, default=2,
                   help="the language-model layer (0-based) whose heads 0 and 1 --attend-weight supervises "
                        "and whose output --fetch-weight reads")
    p.add_argument("--fetch-weight", type=float, default=0.0,
                   help="weight of a loss asking the residual stream after LM layer --attend-layer, at the "
                        "positions that predict a decisive answer token, for where the question's object "
                        "(and a spatial question's reference object) is: the grid column and row of its "
                        "patches' centre, through a linear head that is not saved (fetch_loss), so what "
                        "the look-ups fetch carries position; 0 = off")
    p.add_argument("--phase2-steps", type=int, default=0,
                   help="after --steps, this many more steps with a fresh warmup and cosine schedule "
                        "(--phase2-lr, --phase2-warmup) in which --attend-weight and --fetch-weight "
                        "apply; those losses are then off in the first --steps (0: no second phase; "
                        "they apply throughout)")
    p.add_argument("--phase2-lr", type=float, default=5e-4)
    p.add_argument("--phase2-warmup", type=int, default=20)
    p.add_argument("--probe-every", type=int, default=100,
                   help="every N steps, log per task how often the decisive answer token is "
                        "the argmax on the validation split (teacher-forced, one forward)")
    p.add_argument("--check", type=Path, default=None, metavar="CHECKPOINT",
                   help="determinism check instead of training: rerun the first --check-steps "
                        "steps of CHECKPOINT's recorded command (same arguments, schedule and data) "
                        "and compare the losses bit for bit with its train_log.json; the result "
                        "goes into its card")
    p.add_argument("--check-steps", type=int, default=40)
    args = p.parse_args(argv)
    if args.out is None and args.check is None:
        p.error("--out is required (the checkpoint folder to write), unless --check CHECKPOINT")
    if (args.attend_weight or args.fetch_weight) and not 0 <= args.attend_layer < args.text_layers:
        p.error(f"--attend-layer {args.attend_layer}: the language model has layers 0-{args.text_layers - 1}")
    if args.vision_tower is not None and str(args.vision_tower).lower() == "none":
        args.vision_tower = None
    return args


def span_mask(processor, row, n_labels: int) -> list[bool]:
    """Which of the answer's ``n_labels`` label tokens (answer tokens, then ``</s>``) overlap the
    world's decisive span ``answer_span_start:answer_span_end`` of ``row["answer"]``."""
    start, end = row.get("answer_span_start"), row.get("answer_span_end")
    if start is None or end is None:
        return [False] * n_labels
    enc = processor.tokenizer(row["answer"].strip(), add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    lead = len(row["answer"]) - len(row["answer"].lstrip())
    flags = [s < end - lead and e > start - lead for s, e in offsets]
    return (flags + [False] * n_labels)[:n_labels]


def encode_split(split, processor, desc: str):
    """Keep rows without ``filter_reason``; return (ids, labels, decisive-token masks, uint8
    images, tasks, n_excluded)."""
    keep = [i for i, r in enumerate(split["filter_reason"]) if r is None]
    rows = split.select(keep)
    ids, labels, spans, images = [], [], [], np.zeros((len(rows), 3, 112, 112), dtype=np.uint8)
    for i, row in enumerate(tqdm(rows, desc=desc, unit="ex")):
        if len(row["images"]) != 1:
            raise SystemExit(f"{desc}: row {row['id']} has {len(row['images'])} images; the tiny VLM "
                             f"trains on one image per example (filter_reason should mark it)")
        a, b, m = encode_turns(processor, [row])
        ids.append(a)
        labels.append(b)
        spans.append(m)
        images[i] = uint8_chw(row["images"][0])
    return ids, labels, spans, torch.from_numpy(images), list(rows["task"]), len(split) - len(rows)


def encode_turns(processor, rows) -> tuple[list[int], list[int], list[bool]]:
    """One conversation asking the questions of ``rows`` (all about the same image, which the
    first turn carries) in order: ids, labels (every answer) and the decisive-token mask."""
    messages = []
    for k, row in enumerate(rows):
        messages += [user_message(row["question"], n_images=int(k == 0)), assistant_message(row["answer"])]
    ids, labels = encode_sft_example(processor, messages)
    mask = [False] * len(ids)
    for (a, b), row in zip(label_runs(labels), rows, strict=True):
        mask[a:b] = span_mask(processor, row, b - a)
    return ids, labels, mask


def label_runs(labels: list[int]) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of labelled positions, one per answer."""
    runs, k = [], 0
    while k < len(labels):
        if labels[k] == -100:
            k += 1
            continue
        j = k
        while j < len(labels) and labels[j] != -100:
            j += 1
        runs.append((k, j))
        k = j
    return runs


def attention_targets(conversations) -> tuple[torch.Tensor, ...]:
    """The targets of the attention-supervision loss for a batch of ``(rows, labels, decisive
    mask, scene)`` conversations: one entry per position that predicts a decisive answer token
    (the position before it) and object the question names, as tensors ``row`` (N,),
    ``position`` (N,), ``head`` (N,: 0 for the target object, 1 for the reference object) and
    ``patches`` (N, P) bool: the object's patches (:func:`object_patch_masks`)."""
    rows_, pos_, head_, patches_ = [], [], [], []
    for r, (rows, labels, mask, scene) in enumerate(conversations):
        masks = None
        for (a, b), row in zip(label_runs(labels), rows, strict=True):
            target = row["target"]
            objects = [(0, target["object_index"]), (1, target["reference_index"])]
            objects = [(h, i) for h, i in objects if i is not None and i >= 0]
            if not objects:
                continue
            masks = masks if masks is not None else object_patch_masks(scene)
            for q in (k - 1 for k in range(a, b) if mask[k]):
                for h, i in objects:
                    rows_.append(r)
                    pos_.append(q)
                    head_.append(h)
                    patches_.append(masks[i])
    if not rows_:
        return (torch.zeros(0, dtype=torch.long),) * 3 + (torch.zeros(0, 0, dtype=torch.bool),)
    return (torch.tensor(rows_), torch.tensor(pos_), torch.tensor(head_), torch.tensor(patches_))


def attention_loss(attn: torch.Tensor, image_positions: torch.Tensor, targets) -> torch.Tensor:
    """Mean ``−log`` of the attention mass that each supervised (row, position, head) puts on
    its object's image patches: ``attn`` is one layer's (B, H, T, T) attention weights,
    ``image_positions`` (B, P) the sequence positions of each row's P image tokens (row-major
    patches), ``targets`` from :func:`attention_targets`. Zero when nothing is supervised."""
    rows, pos, head, patches = targets
    if len(rows) == 0:
        return attn.sum() * 0.0
    to_image = attn[rows, head, pos]                                # (N, T)
    on_patches = to_image.gather(1, image_positions[rows])           # (N, P)
    mass = (on_patches * patches).sum(-1)
    return -torch.log(mass.clamp(min=1e-6)).mean()


def fetch_loss(pred: torch.Tensor, head: torch.Tensor, patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean squared error of the predicted position of each supervised object: ``pred`` (N, 4)
    is a linear read of the residual stream at each entry of :func:`attention_targets` (column
    and row of the question's object, then of the reference object), ``head`` (N,) picks the
    pair (0: object, 1: reference), and the target is the centre of the object's ``patches``
    (N, grid²) on the row-major grid, scaled to [−1, 1]. Zero when nothing is supervised."""
    if len(head) == 0:
        return pred.sum() * 0.0
    p = torch.arange(grid * grid)
    cells = torch.stack([p % grid, p // grid], 1).to(pred.dtype)          # (P, 2): column, row
    weights = patches.to(pred.dtype)
    centre = (weights @ cells) / weights.sum(1, keepdim=True)             # (N, 2)
    half = (grid - 1) / 2
    chosen = pred.view(-1, 2, 2)[torch.arange(len(head)), head]           # (N, 2)
    return torch.nn.functional.mse_loss(chosen, (centre - half) / half)


def training_conversation(index: int, args, max_objects: int):
    """Training conversation ``index``: a fresh world scene with 1..``max_objects`` objects and
    ``--turns`` of its questions (distinct task categories, :func:`make_examples`), all drawn
    from ``(data_seed, index)``; returns the rows and the uint8 image."""
    base = derive_seed(WORLD_NAME, args.data_seed, "tiny-vlm-train", index)
    rng = random.Random(base)
    scene = sample_scene(derive_seed(base, "scene"), n_objects=rng.randint(1, max_objects))
    rows = make_examples(scene, derive_seed(base, "questions"))
    rng.shuffle(rows)
    always = {t for t in args.always.split(",") if t}
    if always:  # the listed tasks first
        rows = [r for r in rows if r["task"] in always] + [r for r in rows if r["task"] not in always]
    rows = rows[:args.turns]
    if always:  # then the chosen turns in random order
        rng.shuffle(rows)
    image = uint8_chw(rows[0]["images"][0])
    return rows, image, scene


def max_objects_at(step: int, args) -> int:
    """The curriculum: the largest object count grows linearly from 1 to 6 over the first
    ``--curriculum`` share of the steps."""
    if args.curriculum <= 0:
        return MAX_OBJECTS
    return min(MAX_OBJECTS, 1 + int(MAX_OBJECTS * step / (args.curriculum * args.steps)))


def supervised(step: int, args) -> bool:
    """Whether the attention-supervision and fetch losses apply at ``step``: in the second
    phase when there is one (``--phase2-steps``), else throughout."""
    return bool(args.attend_weight or args.fetch_weight) and (not args.phase2_steps or step >= args.steps)


def training_batch(step: int, args, processor):
    """The batch of ``step``: conversations ``step·B … step·B + B − 1`` encoded, their images
    and their per-patch targets (:func:`patch_target_tensors`)."""
    ids, labels, spans, images, patches, conversations = [], [], [], [], [], []
    cap = max_objects_at(step, args)
    for r in range(args.batch_size):
        rows, image, scene = training_conversation(step * args.batch_size + r, args, cap)
        a, b, m = encode_turns(processor, rows)
        ids.append(a)
        labels.append(b)
        spans.append(m)
        images.append(image)
        if args.dense_weight:
            patches.append(patch_targets(scene))
        if supervised(step, args):
            conversations.append((rows, b, m, scene))
    batch = collate(range(len(ids)), ids, labels, torch.from_numpy(np.stack(images)),
                    processor.image_processor, processor.tokenizer.pad_token_id, spans)
    if args.dense_weight:
        batch["patch"] = patch_target_tensors(patches, centre=args.dense_centre)
    if supervised(step, args):
        batch["attend"] = attention_targets(conversations)
    return batch


def collate(idx, ids, labels, images, image_processor, pad_id: int, spans=None):
    """Right-padded batch of the examples ``idx`` (``span`` marks decisive answer tokens)."""
    n = max(len(ids[i]) for i in idx)
    input_ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    lab = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    span = torch.zeros((len(idx), n), dtype=torch.bool)
    for r, i in enumerate(idx):
        k = len(ids[i])
        input_ids[r, :k] = torch.tensor(ids[i])
        lab[r, :k] = torch.tensor(labels[i])
        mask[r, :k] = 1
        if spans is not None:
            span[r, :k] = torch.tensor(spans[i])
    pixels = pixel_values_from_uint8(images[list(idx)], image_processor)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab, "pixel_values": pixels,
            "span": span}


def weighted_loss(model, batch, span_weight: float, attentions: list | None = None,
                  hidden: list | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, decisive tokens weighted
    ``span_weight`` (1: the model's own loss). With a list as ``attentions`` (``hidden``), the
    forward also returns every LM layer's attention weights (the LM's hidden states, embeddings
    first), appended to it."""
    span = batch.pop("span")
    labels = batch.pop("labels") if span_weight != 1.0 else None
    out = model(**batch, **({"output_attentions": True} if attentions is not None else {}),
                **({"output_hidden_states": True} if hidden is not None else {}))
    if attentions is not None:
        attentions.extend(out.attentions)
    if hidden is not None:
        hidden.extend(out.hidden_states)
    if labels is None:
        return out.loss
    logits = out.logits[:, :-1]
    target, decisive = labels[:, 1:], span[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                            reduction="none")
    keep = (target != -100).float()
    w = keep * torch.where(decisive, span_weight, 1.0)
    return (nll * w).sum() / w.sum()


class VisionCapture:
    """Keeps the vision tower's last hidden state of the latest forward (a forward hook), for
    the dense auxiliary loss; the LLaVA forward itself stays untouched."""

    def __init__(self, model):
        self.hidden = None
        model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.hidden = output.last_hidden_state


@torch.no_grad()
def decisive_probe(model, batches, tasks: list[str]) -> dict[str, float]:
    """Per task: how often every decisive answer token is the model's argmax given the true
    prefix (teacher-forced; a cheap stand-in for greedy accuracy; all of them, since the first
    token alone does not decide, e.g. "to the left of" / "to the right of")."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    row = 0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k not in ("span", "labels")}).logits[:, :-1]
        target, decisive = b["labels"][:, 1:], b["span"][:, 1:]
        pred = logits.argmax(-1)
        for r in range(len(target)):
            pos = decisive[r]
            if pos.any():
                hits.setdefault(tasks[row], []).append(bool((pred[r][pos] == target[r][pos]).all()))
            row += 1
    model.train()
    out = {t: float(np.mean(v)) for t, v in sorted(hits.items())}
    out["all"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


def init_vision_tower(model, clip_path: Path) -> None:
    """Copy a ``CLIPModel`` checkpoint's vision transformer into the LLaVA vision tower."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_path, dtype=torch.float32)
    try:
        model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    except RuntimeError as e:
        raise SystemExit(f"--vision-tower {clip_path}: its vision tower does not match ours "
                         f"({str(e).splitlines()[1].strip()}); use the same --vision-hidden / "
                         f"--vision-layers as the CLIP") from None
    print(f"vision tower initialised from {clip_path}")


def param_groups(model, args) -> list[dict]:
    """AdamW groups: weight decay on matrices except embeddings; the vision tower's learning
    rate scaled by ``--vision-lr-scale`` (frozen at 0), the projector's by
    ``--projector-lr-scale``."""
    groups: dict[tuple[str, bool], list] = {}
    scale = {"vision": args.vision_lr_scale, "projector": args.projector_lr_scale, "lm": 1.0}
    for name, p in model.named_parameters():
        part = ("vision" if ".vision_tower." in f".{name}" else
                "projector" if ".multi_modal_projector." in f".{name}" else "lm")
        if part == "vision" and args.vision_lr_scale == 0:
            p.requires_grad_(False)
            continue
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((part, decay), []).append(p)
    return [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0, "lr_scale": scale[part]}
            for (part, decay), ps in sorted(groups.items())]


@torch.no_grad()
def validation_loss(model, batches) -> float:
    model.eval()
    tot, n = 0.0, 0
    for b in batches:
        k = int((b["labels"][:, 1:] != -100).sum())
        tot += float(model(**{key: v for key, v in b.items() if key != "span"}).loss) * k
        n += k
    model.train()
    return tot / max(n, 1)


CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- llava
- tiny
- synthetic
- pairforge
- offline-world
---

# tiny-llava: pairforge's offline-world VLM

A {n_params_m:.2f}M-parameter LLaVA-architecture model (`LlavaForConditionalGeneration`) trained
from scratch on pairforge's procedural shapes world. A test bed for preference-pair recipes
with no Hub access: it answers questions about coloured shapes in full sentences, right
often enough to be useful and wrong often enough to leave room for preference training. It
knows nothing outside that world (its vocabulary is the world's {n_words} words).

## Use

```python
from pairforge.world.models import load_tiny_vlm       # or, the generic path:
model, processor = load_tiny_vlm()                      # AutoProcessor.from_pretrained(path)
                                                        # AutoModelForImageTextToText.from_pretrained(path)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What colour is the circle?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[image], return_tensors="pt")
answer = processor.decode(model.generate(**inputs, max_new_tokens=48)[0, inputs["input_ids"].shape[1]:],
                          skip_special_tokens=True)
```

Images are 112×112 RGB. `config.json` sets `attn_implementation: eager`, so
`output_attentions=True` returns answer-to-image attention over the 64 image tokens (an 8×8
grid of 14-px patches).

## Architecture

| part | configuration | parameters |
|---|---|---:|
| vision tower | CLIP ViT, 112 px, patch 14, hidden {vh}, {vl} layers, 4 heads; CLS dropped (`vision_feature_select_strategy="default"`) → 64 image tokens | {p_vision:,} |
| projector | LLaVA two-layer GELU MLP, {vh} → {th} → {th} | {p_proj:,} |
| language model | Llama, hidden {th}, {tl} layers, 4 heads, MLP {ti}, RoPE, tied embeddings, vocabulary {vocab} | {p_lm:,} |
| **total** | | **{n_params:,}** |

Tokenizer: word-level (`tokenizers` `WordLevel` in a `PreTrainedTokenizerFast`) over the world's
`vocabulary()`, lower-cased, a SentencePiece-style space marker so `decode` restores spacing and
punctuation; specials `<pad> <unk> <s> </s> <image> <|system|> <|user|> <|assistant|>`.
Chat template: `<|user|><image>question<|assistant|>answer</s>` (the tokenizer adds `<s>`).
Processor: `LlavaProcessor` with a `CLIPImageProcessor` at 112 px. Weights stored in
{save_dtype} (loaded in float32 by default).

## Data

Generated while training, never repeated: conversation *i* (*i* < {n_conv:,} = steps × batch)
is a fresh world scene drawn from `derive_seed("shapes", {data_seed}, "tiny-vlm-train", i)`
({objects_note}) with up to {turns} of its questions, of distinct task categories among the 10
(object, color, size, counting, spatial, existence, referential, background, reasoning,
captioning; `pairforge.world.make_examples`), asked one after the other in one conversation
about the image: {n_tokens:,} training tokens in all. Validation: the world's validation split
(`sft_dataset(n_validation={n_val}, seed={data_seed})`, {n_val_examples} single-question
examples after the filter rows). The test split's scenes come from other seeds.

## Training

```
{command}
```

{steps} steps × batch {batch}, AdamW (β = 0.9, 0.98; weight decay {wd}), learning rate {lr}
(projector × {proj_scale}) with {warmup} warmup steps then cosine decay to {min_lr_ratio}×,
gradient clipping {clip}. Loss: next-token cross-entropy on the answers' tokens (and each
closing `</s>`), the decisive tokens (the value the grader reads: colour, kind, number,
relation, yes/no) weighted {span_weight}×{dense_note}; {vision_note}.{phase2_note}
Measured here (2 shared CPU cores, torch {torch}, {threads} thread): validation data
{data_s:.0f} s, training {train_s:.0f} s, total **{total_min:.1f} min**. Final training loss
{final_loss:.3f}; validation loss {val_loss:.3f}.

## Evaluation (held-out test split, greedy, graded by `pairforge.world.grade`)

<!-- eval:start -->
(run `python scripts/eval_world_models.py --update-cards`)
<!-- eval:end -->

## Reproducibility

Training is deterministic on CPU for a fixed thread count: seeds for Python, NumPy and torch,
`torch.use_deterministic_algorithms(True)`, a seeded data order. Two runs of the same command
on the same machine and thread count give identical losses, hence the same held-out accuracy.
<!-- repro:start -->
(not checked for this run)
<!-- repro:end --> On another CPU type or thread count, float
reductions differ in their last bits; expect the overall accuracy within ±3 points.

## Limitations

Trained on one synthetic world only; lower-cases everything; unknown words become `<unk>`.
The grader is the reference: some answers it accepts are odd sentences.
"""


def write_card(out: Path, model, args, log: dict, n_words: int) -> None:
    """The model card (README.md) with the measured numbers; eval fills its table later."""
    def count(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    (out / "README.md").write_text(CARD.format(
        n_params_m=log["n_params"] / 1e6, n_params=log["n_params"], n_words=n_words,
        vh=args.vision_hidden, vl=args.vision_layers, th=args.text_hidden, tl=args.text_layers,
        ti=args.text_intermediate, vocab=model.config.text_config.vocab_size,
        p_vision=count("model.vision_tower."), p_proj=count("model.multi_modal_projector."),
        p_lm=count("model.language_model.") + count("lm_head."), save_dtype=args.save_dtype,
        n_conv=log["n_train_conversations"], data_seed=args.data_seed, turns=args.turns,
        objects_note=("1 to 6 objects, as the world draws them" if args.curriculum <= 0 else
                      f"1 to 6 objects; a curriculum lets the largest count grow from 1 to 6 over "
                      f"the first {args.curriculum:.0%} of the steps"),
        n_tokens=log["n_train_tokens"], n_val=args.n_validation, n_val_examples=log["n_validation_examples"],
        command=log["command"], steps=args.steps, batch=args.batch_size, wd=args.weight_decay, lr=args.lr,
        proj_scale=args.projector_lr_scale, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        clip=args.grad_clip, span_weight=args.span_weight,
        dense_note=(f", plus {args.dense_weight} × a dense auxiliary loss on the vision tower (each patch "
                    f"token predicts the kind and colour of the object covering it"
                    + (" and the grid cell of that object's centre" if args.dense_centre else "")
                    + ", from ground-truth boxes, through a linear head that is not shipped)"
                    if args.dense_weight else "")
                   + (f", plus {args.own_cell_weight} × a dense loss asking each patch token for its own grid "
                      f"column and row (linear head not shipped), so the image tokens carry where they are"
                      if args.own_cell_weight else "")
                   + (f", plus {args.attend_weight} × an attention-supervision loss (in language-model layer "
                      f"{args.attend_layer}, head 0 at each position that predicts a decisive token puts its "
                      f"attention on the image patches of the object the question names, head 1 on those of "
                      f"the reference object of a spatial question: −log of the attention mass on them)"
                      if args.attend_weight else "")
                   + (f", plus {args.fetch_weight} × a fetch loss (a linear head, not shipped, reads the "
                      f"residual stream after layer {args.attend_layer} at those positions and predicts where "
                      f"each of the two objects is: its patches' centre; squared error)"
                      if args.fetch_weight else ""),
        phase2_note=(f" Then a second phase of {args.phase2_steps} steps: learning rate {args.phase2_lr} with "
                     f"{args.phase2_warmup} warmup steps then cosine decay to {args.min_lr_ratio}×, and only "
                     f"in this phase the attention-supervision and fetch losses."
                     if args.phase2_steps else ""),
        vision_note=(
            f"all weights continued from the checkpoint {args.init}, vision learning-rate factor "
            f"{args.vision_lr_scale}" if args.init else
            f"vision tower initialised from the tiny CLIP ({args.vision_tower.name}), learning-rate "
            f"factor {args.vision_lr_scale}" if args.vision_tower else "all weights from random init"),
        torch=log["torch"], threads=log["threads"], data_s=log["data_seconds"],
        train_s=log["train_seconds"], total_min=log["total_seconds"] / 60,
        final_loss=float(np.mean(log["losses"][-50:])), val_loss=log["validation"][-1]["loss"]))


def check_determinism(checkpoint: Path, n_steps: int) -> None:
    """Rerun the first ``n_steps`` of ``checkpoint``'s training (its recorded arguments) and
    compare the losses with its ``train_log.json`` bit for bit; write the verdict into its
    card between the repro markers."""
    log = json.loads((checkpoint / "train_log.json").read_text())
    argv = shlex.split(log["command"])[2:]  # "python scripts/train_tiny_vlm.py ..."
    args = parse_args([*argv, "--probe-every", "0"])
    rerun = train(args, stop_after=n_steps)["losses"]
    same = rerun == log["losses"][:n_steps]
    first_diff = next((i for i, (a, b) in enumerate(zip(rerun, log["losses"])) if a != b), None)
    verdict = (f"Checked: the first {n_steps} steps rerun here with the same command and "
               f"{torch.get_num_threads()} thread gave {'bit-identical' if same else 'DIFFERENT'} "
               f"losses" + ("" if same else f" (first difference at step {first_diff + 1})")
               + f" (`python scripts/train_tiny_vlm.py --check <this folder> --check-steps {n_steps}`).")
    card = checkpoint / "README.md"
    text = card.read_text()
    head, rest = text.split("<!-- repro:start -->", 1)
    _, tail = rest.split("<!-- repro:end -->", 1)
    card.write_text(f"{head}<!-- repro:start -->\n{verdict}\n<!-- repro:end -->{tail}")
    print(verdict)
    if not same:
        raise SystemExit(1)


def train(args, stop_after: int | None = None) -> dict:
    """Build and train the model as ``args`` say (stopping after ``stop_after`` steps if
    given, same schedule); returns the model, processor and the run's records."""
    t0 = time.time()
    seed_everything(args.seed, args.threads)
    from transformers import LlavaForConditionalGeneration

    data = sft_dataset(n_train=0, n_validation=args.n_validation, n_test=0, seed=args.data_seed)
    processor = build_vlm_processor(vocabulary())
    tok = processor.tokenizer
    v_ids, v_labels, v_spans, v_images, v_tasks, _ = encode_split(data["validation"], processor, "encode validation")
    t_data = time.time() - t0

    config = vlm_config(len(tok), vision_hidden=args.vision_hidden, vision_layers=args.vision_layers,
                        text_hidden=args.text_hidden, text_layers=args.text_layers,
                        text_intermediate=args.text_intermediate)
    if args.init is not None:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32,
                                                              attn_implementation="eager")
    else:
        model = LlavaForConditionalGeneration(config)
        if args.vision_tower is not None:
            init_vision_tower(model, args.vision_tower)
    model.train()
    groups = param_groups(model, args)
    dense_head, cell_head, fetch_head, capture = None, None, None, None
    if args.dense_weight or args.own_cell_weight:
        capture = VisionCapture(model)
    if args.dense_weight:
        dense_head = torch.nn.Linear(args.vision_hidden, dense_head_size(centre=args.dense_centre))  # not saved
        groups.append({"params": list(dense_head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    if args.own_cell_weight:
        cell_head = torch.nn.Linear(args.vision_hidden, 2 * (IMAGE_SIZE // PATCH_SIZE))  # not saved
        groups.append({"params": list(cell_head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    if args.fetch_weight:
        fetch_head = torch.nn.Linear(model.config.text_config.hidden_size, 4)  # not saved
        groups.append({"params": list(fetch_head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))

    val_batches = [collate(range(s, min(s + 64, len(v_ids))), v_ids, v_labels, v_images,
                           processor.image_processor, tok.pad_token_id, v_spans)
                   for s in range(0, len(v_ids), 64)]
    losses, dense_losses, cell_losses, attend_losses, fetch_losses, probes, n_tokens, n_unk = [], [], [], [], [], [], 0, 0
    t1 = time.time()
    total = args.steps + args.phase2_steps
    bar = tqdm(range(total if stop_after is None else min(stop_after, total)), desc="train", unit="step")
    for step in bar:
        batch = training_batch(step, args, processor)
        n_tokens += int(batch["attention_mask"].sum())
        n_unk += int((batch["input_ids"] == tok.unk_token_id).sum())
        lr = (warmup_cosine_lr(step, args.steps, lr=args.lr, warmup=args.warmup, min_ratio=args.min_lr_ratio)
              if step < args.steps else
              warmup_cosine_lr(step - args.steps, args.phase2_steps, lr=args.phase2_lr, warmup=args.phase2_warmup,
                               min_ratio=args.min_lr_ratio))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        patch = batch.pop("patch") if args.dense_weight else None
        attend = batch.pop("attend", None)
        attentions = [] if attend is not None and args.attend_weight else None
        hidden = [] if attend is not None and args.fetch_weight else None
        image_positions = (batch["input_ids"] == model.config.image_token_index).nonzero()[:, 1].view(
            len(batch["input_ids"]), -1) if attentions is not None else None
        loss = weighted_loss(model, batch, args.span_weight, attentions, hidden)
        if attentions is not None:
            att = attention_loss(attentions[args.attend_layer], image_positions, attend)
            attend_losses.append(float(att))
            loss = loss + args.attend_weight * att
        if hidden is not None:
            rows, pos, head, patches = attend
            fetch = fetch_loss(fetch_head(hidden[args.attend_layer + 1][rows, pos]), head, patches,
                               IMAGE_SIZE // PATCH_SIZE)
            fetch_losses.append(float(fetch))
            loss = loss + args.fetch_weight * fetch
        if patch is not None:
            dense = patch_loss(dense_head(capture.hidden[:, 1:]), *patch)
            dense_losses.append(float(dense))
            loss = loss + args.dense_weight * dense
        if cell_head is not None:
            cell = own_cell_loss(cell_head(capture.hidden[:, 1:]))
            cell_losses.append(float(cell))
            loss = loss + args.own_cell_weight * cell
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if args.probe_every and ((step + 1) % args.probe_every == 0 or step + 1 == total):
            probes.append({"step": step + 1, "seconds": round(time.time() - t1, 1),
                           **decisive_probe(model, val_batches, v_tasks)})
            tqdm.write("probe " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                              for k, v in probes[-1].items()}))
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            bar.set_postfix(loss=f"{np.mean(losses[-args.log_every:]):.3f}", lr=f"{lr:.2e}",
                            objects=max_objects_at(step, args),
                            **({"cell": f"{np.mean(cell_losses[-args.log_every:]):.3f}"} if cell_losses else {}),
                            **({"attend": f"{np.mean(attend_losses[-args.log_every:]):.3f}"} if attend_losses else {}),
                            **({"fetch": f"{np.mean(fetch_losses[-args.log_every:]):.3f}"} if fetch_losses else {}))
    if n_unk:
        print(f"warning: {n_unk} <unk> tokens in the training conversations; the vocabulary misses some words")
    return {"model": model, "processor": processor, "val_batches": val_batches, "losses": losses,
            "losses_dense": dense_losses, "losses_own_cell": cell_losses, "losses_attend": attend_losses, "losses_fetch": fetch_losses, "probes": probes, "n_tokens": n_tokens,
            "n_validation_examples": len(v_ids), "t0": t0, "data_seconds": t_data,
            "train_seconds": time.time() - t1}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check is not None:
        check_determinism(args.check, args.check_steps)
        return
    run = train(args)
    model, processor = run["model"], run["processor"]
    n_params = sum(p.numel() for p in model.parameters())
    val = validation_loss(model, run["val_batches"])
    save_checkpoint(model, processor, args.out, dtype=getattr(torch, args.save_dtype))
    t_data, t_train, losses = run["data_seconds"], run["train_seconds"], run["losses"]
    log = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_params": n_params, "n_train_conversations": (args.steps + args.phase2_steps) * args.batch_size,
        "n_train_tokens": run["n_tokens"], "n_validation_examples": run["n_validation_examples"],
        "losses": losses, "losses_dense": run["losses_dense"], "losses_own_cell": run["losses_own_cell"],
        "losses_attend": run["losses_attend"], "losses_fetch": run["losses_fetch"],
        "probes": run["probes"],
        "validation": [{"step": args.steps + args.phase2_steps, "loss": val}],
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "total_seconds": round(time.time() - run["t0"], 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (args.out / "train_log.json").write_text(json.dumps(log) + "\n")
    write_card(args.out, model, args, log, n_words=len(vocabulary()))
    print(f"done: {n_params / 1e6:.2f}M params, {args.steps + args.phase2_steps} steps × {args.batch_size} conversations "
          f"× {args.turns} turns; final train loss {np.mean(losses[-50:]):.4f}, validation loss "
          f"{val:.4f}; data {t_data:.0f}s, train {t_train:.0f}s, total {time.time() - run['t0']:.0f}s → {args.out}")


if __name__ == "__main__":
    main()
