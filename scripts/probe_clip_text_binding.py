"""Can the tiny CLIP's text tower bind a relation word to the two objects it names? A text-only probe.

    python scripts/probe_clip_text_binding.py --mode sentence --steps 1500

The position edit flips one word of a description ("to the left of" ↔ "to the right of"). A
contrastive loss can only score that edit if the text embedding of "the red circle is to the left
of the blue square." depends on the relation word *jointly with* which two objects it names: a
bag of words cannot say which object is on which side. This probe trains the tiny CLIP's text
tower (``clip_config``'s text part, random init or ``--init``'s) and projection, with a linear
head, to output the relation code of ``scripts/train_tiny_clip.py``'s ``relation_code`` (``pair_code``: +1
at the second object's slot and −1 at the first one's on the relation's axis, signs by direction)
from the sentence alone, and reports on held-out sentences how often the code is read the right
way round, for the sentence and for its flipped twin, and their embeddings' cosine (1.0: the
relation word is ignored).

Modes: ``sentence`` (the relation sentence alone), ``listing`` (a listing of 2-5 groups in the
``fair`` format's order in front of it, as in a full scene description), ``curriculum``
(sentences for the first ``--sentence-steps`` steps, then with the listing; scored with it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_clip import pair_code  # noqa: E402

from pairforge.world import COLORS, KINDS, RELATIONS, vocabulary  # noqa: E402
from pairforge.world.models import build_clip_processor, clip_config  # noqa: E402

_FLIP = {"left": "right", "right": "left", "above": "below", "below": "above"}
MODES = ("sentence", "listing", "curriculum")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, default="sentence")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--sentence-steps", type=int, default=1500, help="curriculum: steps on sentences alone")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--init", type=Path, default=None, help="a CLIPModel checkpoint whose text tower to start from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the evaluations here")
    return p.parse_args(argv)


def relation_example(rng: random.Random, listing: bool) -> tuple[str, str, torch.Tensor]:
    """A random relation sentence between two distinct colour+kind objects, its flipped twin,
    and its relation code over the ``len(COLORS) * len(KINDS)`` slots (x block, then y block)."""
    colors, kinds = list(COLORS), list(KINDS)
    a = (rng.choice(colors), rng.choice(kinds))
    b = a
    while b == a:
        b = (rng.choice(colors), rng.choice(kinds))
    rel = rng.choice(list(RELATIONS))
    code = torch.tensor(pair_code(a, rel, b))
    head = ""
    if listing:  # the fair format's order: by colour, then kind
        groups = sorted({a, b, *((rng.choice(colors), rng.choice(kinds)) for _ in range(rng.randint(0, 3)))})
        head = ", ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c, k in groups) + " on a white background. "
    say = lambda r: f"{head}the {a[0]} {a[1]} is {RELATIONS[r]} the {b[0]} {b[1]}."  # noqa: E731
    return say(rel), say(_FLIP[rel]), code


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import CLIPModel, CLIPTextModelWithProjection

    tok = build_clip_processor(vocabulary()).tokenizer
    config = clip_config(len(tok)).text_config
    model = CLIPTextModelWithProjection(config)
    if args.init is not None:
        clip = CLIPModel.from_pretrained(args.init)
        model.text_model.load_state_dict(clip.text_model.state_dict())
        model.text_projection.load_state_dict(clip.text_projection.state_dict())
    n_slots = len(COLORS) * len(KINDS)
    head = torch.nn.Linear(config.projection_dim, 2 * n_slots)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr)
    scored_with_listing = args.mode != "sentence"
    test = [relation_example(random.Random(10**6 + i), scored_with_listing) for i in range(args.n_test)]
    rng = random.Random(args.seed)

    def embed(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, return_tensors="pt", padding=True)
        return F.normalize(model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).text_embeds, dim=-1)

    evals = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                true, flipped = embed([t for t, _, _ in test]), embed([f for _, f, _ in test])
                code = torch.stack([c for _, _, c in test])
                evals.append({"step": step,
                              "true_read_right": round(float(((head(true) * code).sum(1) > 0).float().mean()), 3),
                              "flipped_read_flipped": round(float(((head(flipped) * code).sum(1) < 0).float().mean()), 3),
                              "cos_true_flipped": round(float((true * flipped).sum(1).mean()), 3)})
            print(json.dumps(evals[-1]), flush=True)
        if step == args.steps:
            break
        listing = args.mode == "listing" or (args.mode == "curriculum" and step >= args.sentence_steps)
        batch = [relation_example(rng, listing) for _ in range(args.batch_size)]
        loss = F.mse_loss(head(embed([t for t, _, _ in batch])), torch.stack([c for _, _, c in batch])) * 2 * n_slots
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "evals": evals}) + "\n")
    return evals


if __name__ == "__main__":
    main()
