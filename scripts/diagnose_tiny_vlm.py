"""Where a tiny VLM looks and what its image tokens carry: two measurements that say why a
skill (e.g. spatial relations) is or is not learned.

    python scripts/diagnose_tiny_vlm.py --vlm pairforge/world/assets/tiny-llava --json /tmp/diag.json

1. **Look-ups.** For every validation question that names an object (the world's
   ``target.object_index``, and ``reference_index`` for a spatial question's second object),
   at each position that predicts a decisive answer token: the attention mass each layer's
   each head puts on that object's image patches (:func:`pairforge.world.models.object_patch_masks`).
   Per task, the best head of each layer. A head that looks an object up puts most of its
   mass there; the uniform share over an image is a few percent.
2. **Position in the image tokens.** A ridge regression from the image tokens the language model
   reads (the projector's output) to each token's own grid column and row, fit on 70% of the
   tokens of ``--n-images`` world images and scored (R²) on the rest. Near 0: the tokens' values
   do not say where they are, so no look-up can read an object's position from them, and a
   relation between two objects cannot be computed from what attention returns.
3. **Position through each head's value path.** For every object of those images: the image
   tokens entering each language-model layer, and what each head's value-output path (its
   slice of ``v_proj`` then of ``o_proj``) makes of them, averaged over the object's patches
   (a perfect look-up), and the ridge R² of the object's column and row (its patches' centre)
   from that, on standardised features. A head whose R² is far below the tokens' own can look
   an object up but returns *what* it is, not *where*.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_vlm import attention_targets, encode_turns  # noqa: E402

from pairforge.world import Scene, render_scene, sample_scene, sft_dataset  # noqa: E402
from pairforge.world.models import (  # noqa: E402
    TINY_VLM_PATH,
    load_tiny_vlm,
    object_patch_masks,
    pixel_values_from_uint8,
    uint8_chw,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vlm", type=Path, default=TINY_VLM_PATH, help="tiny-VLM checkpoint folder")
    p.add_argument("--n-validation", type=int, default=300,
                   help="validation questions drawn (those naming an object are measured)")
    p.add_argument("--n-images", type=int, default=200, help="world images for the position probe")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


@torch.no_grad()
def lookup_mass(model, processor, rows) -> dict[str, list[list[float]]]:
    """``"task/obj"`` or ``"task/ref"`` → (layers × heads) mean attention mass on the object's patches."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for row in tqdm(rows, desc="look-ups", unit="q"):
        ids, labels, mask = encode_turns(processor, [row])
        _, pos, head, patches = attention_targets([([row], labels, mask, Scene.from_dict(row["scene"]))])
        if len(pos) == 0:
            continue
        inp = torch.tensor([ids])
        out = model(input_ids=inp, attention_mask=torch.ones_like(inp), output_attentions=True,
                    pixel_values=pixel_values_from_uint8(torch.tensor(uint8_chw(row["images"][0]))[None], processor.image_processor))
        image_pos = (inp[0] == model.config.image_token_index).nonzero()[:, 0]
        att = torch.stack(out.attentions)[:, 0]                       # (L, H, T, T)
        mass = (att[:, :, pos][..., image_pos] * patches).sum(-1)     # (L, H, N)
        for e in range(len(pos)):
            key = f"{row['task']}/{'obj' if head[e] == 0 else 'ref'}"
            sums[key] = sums.get(key, 0) + mass[:, :, e].numpy()
            counts[key] = counts.get(key, 0) + 1
    return {k: (sums[k] / counts[k]).round(3).tolist() for k in sorted(sums)}


def ridge_r2(x: np.ndarray, y: np.ndarray, lam: float = 1.0, share: float = 0.7) -> float:
    """R² on the held-out ``1 - share`` of a ridge regression (with intercept) fit on the rest."""
    n = int(share * len(x))
    x1 = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(x1[:n].T @ x1[:n] + lam * np.eye(x1.shape[1]), x1[:n].T @ y[:n])
    pred, true = x1[n:] @ w, y[n:]
    return float(1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())


def standardised_r2(x: np.ndarray, y: np.ndarray) -> float:
    """:func:`ridge_r2` on features scaled to unit variance (a value path's output is small)."""
    return ridge_r2((x - x.mean(0)) / (x.std(0) + 1e-8), y)


@torch.no_grad()
def position_r2(model, processor, n_images: int, seed: int) -> tuple[dict[str, float], dict]:
    """R² of each image token's own column and row from the projected image tokens, and per LM
    layer the R² of each object's position (its patches' centre) from the image tokens entering
    the layer and from each head's value-output path, pooled over the object's patches."""
    lm = model.model.language_model
    n_heads = model.config.text_config.num_attention_heads
    feats, pooled, centres = [], {}, []
    for i in tqdm(range(n_images), desc="position probe", unit="img"):
        scene = sample_scene(seed * 100_003 + i)
        image = render_scene(scene)
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                               add_generation_prompt=True)
        enc = processor(text=prompt, images=[image], return_tensors="pt")
        hidden = model(**enc, output_hidden_states=True).hidden_states
        image_pos = (enc["input_ids"][0] == model.config.image_token_index).nonzero()[:, 0]
        feats.append(hidden[0][0, image_pos])                               # the projector's output
        masks = torch.tensor(object_patch_masks(scene), dtype=torch.float32)
        weights = masks / masks.sum(1, keepdim=True)                       # (objects, P)
        grid = round(len(image_pos) ** 0.5)
        cells = torch.stack([torch.arange(grid * grid) % grid, torch.arange(grid * grid) // grid], 1).float()
        centres.append((weights @ cells).numpy())
        for k, layer in enumerate(lm.layers):
            x = hidden[k][0, image_pos]                                     # (P, D) entering layer k
            v = layer.self_attn.v_proj(layer.input_layernorm(x))
            d = v.shape[1] // n_heads
            pooled.setdefault((k, "tokens"), []).append((weights @ x).numpy())
            for h in range(n_heads):
                path = v[:, h * d:(h + 1) * d] @ layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d].T
                pooled.setdefault((k, h), []).append((weights @ path).numpy())
    x = torch.cat(feats).numpy()
    grid = round(len(feats[0]) ** 0.5)
    cell = np.tile(np.arange(len(feats[0])), n_images)
    own = {"column": round(ridge_r2(x, (cell % grid).astype(float)), 3),
           "row": round(ridge_r2(x, (cell // grid).astype(float)), 3)}
    y = np.concatenate(centres)
    value_path: dict[str, list] = {}
    for (k, h), parts in pooled.items():
        z = np.concatenate(parts)
        value_path.setdefault(f"layer {k}", {})[str(h)] = [round(standardised_r2(z, y[:, 0]), 3),
                                                          round(standardised_r2(z, y[:, 1]), 3)]
    return own, value_path


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_tiny_vlm(path=args.vlm)
    split = sft_dataset(n_train=0, n_validation=args.n_validation, n_test=0, seed=args.data_seed)["validation"]
    rows = [r for r in split if r["filter_reason"] is None and r["target"]["object_index"] is not None
            and r["target"]["object_index"] >= 0]
    mass = lookup_mass(model, processor, rows)
    r2, value_path = position_r2(model, processor, args.n_images, args.data_seed)
    print(f"## {args.vlm}\n\nAttention mass on the named object's patches, best head per layer "
          f"(head index in brackets), at the positions that predict a decisive token:\n")
    n_layers = len(next(iter(mass.values())))
    print("| task / object | " + " | ".join(f"layer {k}" for k in range(n_layers)) + " |")
    print("|---|" + "---:|" * n_layers)
    for key, m in mass.items():
        print(f"| {key} | " + " | ".join(f"{max(h):.2f} ({int(np.argmax(h))})" for h in m) + " |")
    print(f"\nImage tokens' own grid cell from their values (ridge R² on held-out tokens of "
          f"{args.n_images} images): column {r2['column']:.3f}, row {r2['row']:.3f}")
    heads = [h for h in next(iter(value_path.values())) if h != "tokens"]
    print("\nAn object's column / row (R², standardised ridge) from the image tokens entering each layer, "
          "pooled over the object's patches, and from each head's value-output path of them "
          "(what a perfect look-up would return):\n")
    print("| layer | tokens | " + " | ".join(f"head {h}" for h in heads) + " |")
    print("|---|" + "---:|" * (len(heads) + 1))
    for layer, r in value_path.items():
        print(f"| {layer.split()[1]} | " + " | ".join(f"{r[h][0]:.2f} / {r[h][1]:.2f}" for h in ["tokens", *heads]) + " |")
    if args.json:
        args.json.write_text(json.dumps({"vlm": str(args.vlm), "lookup_mass": mass, "position_r2": r2,
                                         "value_path_r2": value_path}, indent=1) + "\n")


if __name__ == "__main__":
    main()
