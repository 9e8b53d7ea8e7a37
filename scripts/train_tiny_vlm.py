"""Train the tiny LLaVA-architecture VLM of the offline world on the scene generator's SFT split.

    python scripts/train_tiny_vlm.py --out /tmp/tiny-llava --seed 0

Steps: draw the world's SFT dataset (train split, filter examples excluded and counted),
tokenise every conversation once (loss only on answer tokens) and pre-render the images as
uint8; build a randomly initialised ``LlavaForConditionalGeneration`` (CLIP vision tower +
projector + Llama LM, :func:`pairforge.world.models.vlm_config`); train with AdamW, linear
warmup then cosine decay, a fixed data order and a fixed CPU thread count (runs with the same
arguments give the same losses); save model + processor with ``save_pretrained`` and a
``train_log.json`` (arguments, per-step losses, wall time). Evaluate with
``scripts/eval_world_models.py``; copy into the package with ``--out pairforge/world/assets/tiny-llava``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pairforge.world import sft_dataset, vocabulary
from pairforge.world.models import (
    build_vlm_processor, encode_sft_example, pixel_values_from_uint8, save_checkpoint, seed_everything,
    training_parser, vlm_config, warmup_cosine_lr,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(__doc__.split("\n")[0], steps=1500)
    p.add_argument("--n-validation", type=int, default=500)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-intermediate", type=int, default=768)
    p.add_argument("--vision-tower", type=Path, default=None,
                   help="a CLIPModel checkpoint (e.g. the tiny CLIP) whose vision tower initialises "
                        "ours, as LLaVA starts from a pretrained CLIP ViT; sizes must match")
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="learning-rate factor of the vision tower (0 freezes it, as LLaVA does)")
    p.add_argument("--span-weight", type=float, default=1.0,
                   help="loss weight of the answer tokens that decide correctness (the world's "
                        "answer_span_start/end: the colour, kind, number, relation...); 1 = plain "
                        "mean over answer tokens")
    return p.parse_args(argv)


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
    images, n_excluded)."""
    keep = [i for i, r in enumerate(split["filter_reason"]) if r is None]
    rows = split.select(keep)
    ids, labels, spans, images = [], [], [], np.zeros((len(rows), 3, 112, 112), dtype=np.uint8)
    for i, row in enumerate(tqdm(rows, desc=desc, unit="ex")):
        a, b = encode_sft_example(processor, row["messages"])
        ids.append(a)
        labels.append(b)
        n_ans = sum(t != -100 for t in b)
        spans.append([False] * (len(b) - n_ans) + span_mask(processor, row, n_ans))
        if len(row["images"]) != 1:
            raise SystemExit(f"{desc}: row {row['id']} has {len(row['images'])} images; the tiny VLM "
                             f"trains on one image per example (filter_reason should mark it)")
        images[i] = np.asarray(row["images"][0].convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    return ids, labels, spans, torch.from_numpy(images), len(split) - len(rows)


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


def weighted_loss(model, batch, span_weight: float) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, decisive tokens weighted
    ``span_weight`` (1: the model's own loss)."""
    span = batch.pop("span")
    if span_weight == 1.0:
        return model(**batch).loss
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    target, decisive = labels[:, 1:], span[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                            reduction="none")
    keep = (target != -100).float()
    w = keep * torch.where(decisive, span_weight, 1.0)
    return (nll * w).sum() / w.sum()


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
    rate scaled by ``--vision-lr-scale`` (frozen at 0)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        vision = ".vision_tower." in f".{name}"
        if vision and args.vision_lr_scale == 0:
            p.requires_grad_(False)
            continue
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((vision, decay), []).append(p)
    return [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0,
             "lr_scale": args.vision_lr_scale if vision else 1.0}
            for (vision, decay), ps in sorted(groups.items())]


def length_bucketed_batches(lengths: list[int], batch_size: int, gen: torch.Generator, span: int = 16):
    """Endless batches of indices: each pass is a seeded permutation cut into windows of
    ``span`` batches, sorted by length inside a window (less padding), batch order shuffled."""
    while True:
        perm = torch.randperm(len(lengths), generator=gen).tolist()
        for w in range(0, len(perm) - batch_size + 1, span * batch_size):
            window = sorted(perm[w:w + span * batch_size], key=lambda i: lengths[i])
            chunks = [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
            chunks = [c for c in chunks if len(c) == batch_size]
            for j in torch.randperm(len(chunks), generator=gen).tolist():
                yield chunks[j]


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

`pairforge.world.sft_dataset(n_train={n_train}, n_validation={n_val}, n_test=0, seed={data_seed})`,
train split: {n_examples} examples across the 10 task categories (object, color, size,
counting, spatial, existence, referential, background, reasoning, captioning), one 112-px
image each; the {n_excl} filter examples (text-only, multiple-choice, bbox, OCR) were excluded.

## Training

```
{command}
```

{steps} steps × batch {batch} (≈{epochs:.1f} epochs), AdamW (β = 0.9, 0.98; weight decay {wd}),
learning rate {lr} with {warmup} warmup steps then cosine decay to {min_lr_ratio}×, gradient clipping
{clip}, loss on answer tokens (and the closing `</s>`) only; {vision_note}.
Measured here (2 shared CPU cores, torch {torch}, {threads} thread): data preparation
{data_s:.0f} s, training {train_s:.0f} s, total **{total_min:.1f} min**. Final training loss
{final_loss:.3f}; validation loss ({n_val_examples} examples) {val_loss:.3f}.

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
        n_train=args.n_train, n_val=args.n_validation, data_seed=args.data_seed,
        n_examples=log["n_train_examples"], n_excl=log["n_train_excluded"], command=log["command"],
        steps=args.steps, batch=args.batch_size, epochs=args.steps * args.batch_size / log["n_train_examples"],
        wd=args.weight_decay, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        clip=args.grad_clip, vision_note=(
            f"vision tower initialised from the tiny CLIP ({args.vision_tower.name}), learning-rate "
            f"factor {args.vision_lr_scale}" if args.vision_tower else "all weights from random init"),
        torch=log["torch"], threads=log["threads"], data_s=log["data_seconds"],
        train_s=log["train_seconds"], total_min=log["total_seconds"] / 60,
        final_loss=float(np.mean(log["losses"][-50:])), n_val_examples=log["n_validation_examples"],
        val_loss=log["validation"][-1]["loss"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    seed_everything(args.seed, args.threads)
    from transformers import LlavaForConditionalGeneration

    data = sft_dataset(n_train=args.n_train, n_validation=args.n_validation, n_test=0, seed=args.data_seed)
    processor = build_vlm_processor(vocabulary())
    tok = processor.tokenizer
    ids, labels, spans, images, n_excl = encode_split(data["train"], processor, "encode train")
    v_ids, v_labels, _, v_images, _ = encode_split(data["validation"], processor, "encode validation")
    n_unk = sum(t == tok.unk_token_id for seq in ids for t in seq)
    if n_unk:
        print(f"warning: {n_unk} <unk> tokens in the training set; the vocabulary misses some words")
    t_data = time.time() - t0

    config = vlm_config(len(tok), vision_hidden=args.vision_hidden, vision_layers=args.vision_layers,
                        text_hidden=args.text_hidden, text_layers=args.text_layers,
                        text_intermediate=args.text_intermediate)
    model = LlavaForConditionalGeneration(config)
    if args.vision_tower is not None:
        init_vision_tower(model, args.vision_tower)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.98))

    batches = length_bucketed_batches([len(x) for x in ids], args.batch_size,
                                      torch.Generator().manual_seed(args.seed))
    val_batches = [collate(range(s, min(s + 64, len(v_ids))), v_ids, v_labels, v_images,
                           processor.image_processor, tok.pad_token_id) for s in range(0, len(v_ids), 64)]
    losses, val_log = [], []
    t1 = time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        batch = collate(next(batches), ids, labels, images, processor.image_processor, tok.pad_token_id,
                        spans)
        lr = warmup_cosine_lr(step, args.steps, lr=args.lr, warmup=args.warmup, min_ratio=args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss = weighted_loss(model, batch, args.span_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            bar.set_postfix(loss=f"{np.mean(losses[-args.log_every:]):.3f}", lr=f"{lr:.2e}")
    t_train = time.time() - t1
    val = validation_loss(model, val_batches)
    val_log.append({"step": args.steps, "loss": val})

    dtype = getattr(torch, args.save_dtype)
    save_checkpoint(model, processor, args.out, dtype=dtype)
    log = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_params": n_params, "n_train_examples": len(ids), "n_train_excluded": n_excl,
        "n_validation_examples": len(v_ids), "losses": losses, "validation": val_log,
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "total_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (args.out / "train_log.json").write_text(json.dumps(log) + "\n")
    write_card(args.out, model, args, log, n_words=len(vocabulary()))
    print(f"done: {n_params / 1e6:.2f}M params, {args.steps} steps × {args.batch_size} on "
          f"{len(ids)} examples ({n_excl} filter examples excluded); final train loss "
          f"{np.mean(losses[-50:]):.4f}, validation loss {val:.4f}; data {t_data:.0f}s, train "
          f"{t_train:.0f}s, total {time.time() - t0:.0f}s → {args.out}")


if __name__ == "__main__":
    main()
