"""Trainer data: loading pair sets, per-role sequences, collation (labels on response tokens
only, images attached) and per-sequence log-probs equal to ``HFModel.score``'s.

Uses a random tiny LLaVA (``save_random_llava``: 32 px images, 4×4 patches + CLS = 17 image
tokens) and synthetic canonical rows from :func:`pair_rows` (also used by test_train_loop.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pairforge.errors import BadInput, PairforgeError
from pairforge.models.base import Request
from pairforge.models.hf import HFModel
from pairforge.models.random_tiny import save_random_llava
from pairforge.schema import make_pair, to_dataset
from pairforge.train.data import (
    PairCollator,
    check_columns,
    load_pairs,
    pair_sequence,
    rows_at,
    token_sentences,
)
from pairforge.train.logps import sequence_logps

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAVA_IMAGE_TOKENS = 17


def random_image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def pair_rows(n: int, loss: str = "dpo") -> list[dict]:
    """``n`` canonical rows with the columns ``loss`` needs (words of the random LLaVA's
    vocabulary). ASPO: two sentences (spans tile the text) weighted 1.0 / 0.2; CW-DPO: every
    third row is Stage 1; P2-DPO: alternating focus / robust pairs with their extra inputs, the
    two pairs of one sample (rows 2k and 2k+1) sharing ``p2dpo_example`` ``ex{k}``."""
    colors = ("red", "green", "blue", "yellow")
    rows = []
    for i in range(n):
        c, w = colors[i % 4], colors[(i + 1) % 4]
        chosen = f"the circle is {c}." + (" it is on the left." if loss == "aspo" else "")
        extra: dict = {}
        if loss == "aspo":
            cut = chosen.index(" it")
            extra = dict(sentence_spans=[{"start": 0, "end": cut}, {"start": cut, "end": len(chosen)}],
                         sentence_weights=[1.0, 0.2])
        elif loss == "cwdpo":
            extra = dict(cwdpo_stage=1 if i % 3 == 0 else 2, rejected_mean_logp=-0.5 - 0.1 * i, rejected_n_tokens=5)
        elif loss == "p2dpo":
            kind = "focus" if i % 2 == 0 else "robust"
            focus = kind == "focus"
            crop = random_image(100 + i, 16)
            enhanced = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                                      {"type": "text", "text": "the second image is a zoom. what color?"}]}]
            extra = dict(p2dpo_kind=kind, p2dpo_example=f"ex{i // 2}", p2dpo_margin=0.01,
                         ddw_focus=0.6, ddw_robust=0.4, crop_box=[0.0, 0.0, 16.0, 16.0], crop_image=crop,
                         degraded_image=random_image(200 + i) if focus else None,
                         noisy_image=random_image(300 + i) if not focus else None,
                         enhanced_prompt=enhanced if focus else None,
                         enhanced_images=[random_image(i), crop] if focus else None)
        rows.append(make_pair(prompt=f"what color is the circle {('left', 'right', 'top')[i % 3]}?",
                              chosen=chosen, rejected=f"the circle is {w}.", images=[random_image(i)],
                              source_id=str(i), **extra))
    return rows


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HFModel:
    path = save_random_llava(tmp_path_factory.mktemp("llava"))
    return HFModel(f"hf:{path}", device="cpu", progress=False)


# ----------------------------------------------------------------------------- loading


def test_load_pairs_build_dir_save_to_disk_dict_and_parquet(tmp_path):
    from datasets import DatasetDict

    ds = to_dataset(pair_rows(4))
    ds.save_to_disk(str(tmp_path / "build" / "dataset"))
    assert len(load_pairs(tmp_path / "build")) == 4
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(tmp_path / "dd")) == 4
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    loaded = load_pairs(tmp_path / "pairs.parquet")
    assert len(loaded) == 4 and loaded[0]["chosen"] == ds[0]["chosen"]
    assert loaded[0]["images"][0].size == (32, 32)


def test_load_pairs_errors_name_the_input(tmp_path):
    with pytest.raises(PairforgeError, match="no such file"):
        load_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairforgeError, match="no parquet files"):
        load_pairs(tmp_path / "empty")
    with pytest.raises(PairforgeError, match="column 'sentence_weights' missing, needed by --loss aspo"):
        check_columns(["prompt", "chosen", "rejected", "images", "sentence_spans"], "aspo", "x.parquet")


# ----------------------------------------------------------------------------- sequences


def test_p2dpo_sequences_swap_images_by_kind():
    focus, robust = pair_rows(2, "p2dpo")
    s = pair_sequence(focus, 0, "chosen", "p2dpo")
    assert s.images == focus["images"]
    # Eq. 5's enhanced input: Combine(I, I_crop) with the enhancement prompt, y_w's own input
    enh = pair_sequence(focus, 0, "chosen@enhanced", "p2dpo")
    assert enh.images == [focus["images"][0], focus["crop_image"]] and enh.messages == focus["enhanced_prompt"]
    assert pair_sequence(focus, 0, "rejected@enhanced", "p2dpo").messages == focus["enhanced_prompt"]
    deg = pair_sequence(focus, 0, "rejected@degraded", "p2dpo")
    assert deg.images == [focus["degraded_image"]] and deg.messages == focus["prompt"]  # plain prompt
    with pytest.raises(BadInput, match="field 'enhanced_prompt'.*rebuild"):
        pair_sequence(dict(focus, enhanced_images=[focus["crop_image"]]), 0, "chosen@enhanced", "p2dpo")
    assert pair_sequence(robust, 1, "rejected", "p2dpo").images == [robust["noisy_image"]]
    assert pair_sequence(robust, 1, "chosen@enhanced", "p2dpo") is None
    broken = dict(robust, noisy_image=None)
    with pytest.raises(BadInput, match="field 'noisy_image'") as e:
        pair_sequence(broken, 7, "chosen", "p2dpo", where="pairs.parquet")
    assert "pairs.parquet, row 7" in str(e.value)
    with pytest.raises(BadInput, match="p2dpo_kind"):
        pair_sequence(dict(focus, p2dpo_kind="zoom"), 0, "chosen", "p2dpo")


def test_aspo_spans_are_checked():
    row = pair_rows(1, "aspo")[0]
    with pytest.raises(BadInput, match="must match one to one"):
        pair_sequence(dict(row, sentence_weights=[1.0]), 3, "chosen", "aspo")
    with pytest.raises(BadInput, match="outside the chosen text"):
        pair_sequence(dict(row, sentence_spans=[{"start": 0, "end": 999}], sentence_weights=[1.0]), 3,
                      "chosen", "aspo")
    assert pair_sequence(row, 0, "rejected", "aspo").spans is None  # sentences: chosen only


def test_token_sentences_assigns_every_token():
    text = "ab cd. ef gh."
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12), (12, 13)]
    assert token_sentences(text, offsets, [(0, 6), (6, 13)]) == [0, 0, 0, 1, 1, 1]
    # spans with a gap: the space-led token " ef" starts in the gap and joins the next sentence
    assert token_sentences(text, offsets, [(0, 6), (7, 13)]) == [0, 0, 0, 1, 1, 1]
    assert token_sentences(text, offsets, [(3, 6), (7, 13)]) == [0, 0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- collation


def dpo_specs(n: int) -> list:
    rows = pair_rows(n)
    return [pair_sequence(r, i, role, "dpo") for role in ("chosen", "rejected") for i, r in enumerate(rows)]


def test_collate_unpacked_targets_only_response_tokens_and_images_attached(hf):
    specs = dpo_specs(3)
    batch = PairCollator(hf, pack=False)(specs)
    ids = batch.inputs["input_ids"]
    assert ids.shape[0] == 6 and not batch.packed  # 2B rows
    assert batch.inputs["pixel_values"].shape[0] == 6  # each row carries its image
    image_id = hf.model.config.image_token_id
    pos = batch.keep.nonzero()  # (row, position) predicting each target, row-major = target order
    assert len(pos) == len(batch.targets)
    for k, s in enumerate(specs):
        expected = hf.tokenizer(s.response, add_special_tokens=False)["input_ids"]
        mine = (batch.seq == k).nonzero().squeeze(-1)
        assert batch.targets[mine].tolist() == expected  # the response tokens, nothing else
        rows_pos = pos[batch.source[mine]]
        assert (rows_pos[:, 0] == k).all()
        assert ids[k, rows_pos[:, 1] + 1].tolist() == expected  # each target is the next input token
        prompt_len = int(rows_pos[0, 1]) + 1  # the first target follows the prompt's last token
        assert (ids[k, :prompt_len] == image_id).sum().item() == LLAVA_IMAGE_TOKENS
        assert image_id not in batch.targets[mine].tolist()


def test_collate_packs_chosen_and_rejected_after_one_prompt(hf):
    specs = dpo_specs(3)
    packed, flat = PairCollator(hf)(specs), PairCollator(hf, pack=False)(specs)
    assert packed.packed and packed.inputs["input_ids"].shape[0] == 3  # B rows: one per pair
    assert packed.inputs["pixel_values"].shape[0] == 3  # each image once
    assert packed.inputs["attention_mask"].dim() == 4
    assert torch.equal(torch.sort(packed.targets).values, torch.sort(flat.targets).values)
    assert packed.keep.sum() == len(packed.targets) - 3  # chosen and rejected share the prompt's last position


@pytest.mark.parametrize("pack", [True, False])
def test_collated_logps_equal_hf_score(hf, pack):
    specs = dpo_specs(3)
    with torch.no_grad():
        got = sequence_logps(hf.model, PairCollator(hf, pack=pack)(specs))
    scored = hf.score([Request(s.messages, s.images) for s in specs], [s.response for s in specs])
    want = torch.tensor([r.sum_logprob for r in scored])
    assert torch.allclose(got.sums, want, atol=1e-4)
    assert got.counts.tolist() == [r.n_tokens for r in scored]


def test_calibration_term_on_the_combine_input_by_hand(hf):
    """P2-DPO Eq. 5 on the paper's inputs: the four log-probs scored directly (HFModel.score on
    Combine(I, crop) + P_enh and on I_deg + P), the loss computed from the equation with math,
    equals the trainer's path (roles → collator → sequence_logps → p2dpo_calibration_loss)."""
    import math

    from pairforge.train.losses import p2dpo_calibration_loss

    row = pair_rows(1, "p2dpo")[0]
    y_w, y_l = row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]
    aug = Request(row["enhanced_prompt"], [row["images"][0], row["crop_image"]])
    deg = Request(row["prompt"], [row["degraded_image"]])
    w_aug, w_deg, l_aug, l_deg = (r.sum_logprob for r in hf.score([aug, deg, aug, deg], [y_w, y_w, y_l, y_l]))
    beta = 0.1
    z = beta * (w_aug - w_deg) - beta * (l_aug - l_deg)  # πθ on y_w, πref on y_l (here one model)
    want = math.log1p(math.exp(-z))  # −log σ(z)
    roles = ("chosen@enhanced", "chosen@degraded", "rejected@enhanced", "rejected@degraded")
    specs = [pair_sequence(row, 0, r, "p2dpo") for r in roles]
    with torch.no_grad():
        sums = sequence_logps(hf.model, PairCollator(hf)(specs)).sums
    got = p2dpo_calibration_loss(*(sums[k:k + 1] for k in range(4)), beta=beta)
    assert got.item() == pytest.approx(want, abs=1e-4)


def test_packed_gradients_equal_unpacked(hf):
    specs = dpo_specs(2)
    grads = []
    for pack in (True, False):
        hf.model.zero_grad()
        sequence_logps(hf.model, PairCollator(hf, pack=pack)(specs)).sums.sum().backward()
        grads.append(hf.model.lm_head.weight.grad.clone())
    hf.model.zero_grad(set_to_none=True)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_aspo_segment_sums_equal_span_logprobs(hf):
    rows = pair_rows(2, "aspo")
    specs = [pair_sequence(r, i, "chosen", "aspo") for i, r in enumerate(rows)]
    with torch.no_grad():
        got = sequence_logps(hf.model, PairCollator(hf)(specs), segments=True, entropy=True)
    scored = hf.score([Request(s.messages, s.images) for s in specs], [s.response for s in specs])
    for k, (s, sc) in enumerate(zip(specs, scored)):
        want = [sum(sc.span_logprobs(a, b)) for a, b in s.spans]
        assert torch.allclose(got.segment_sums[k, :2], torch.tensor(want), atol=1e-4)
        assert got.segment_counts[k].sum().item() == sc.n_tokens
    assert (got.entropy > 0).all()


def test_max_length_cuts_responses_and_rejects_long_prompts(hf):
    spec = pair_sequence(pair_rows(1)[0], 0, "chosen", "dpo")
    full = PairCollator(hf)([spec])
    p = int(full.keep.nonzero()[0, 1]) + 1  # prompt length
    cut = PairCollator(hf, max_length=p + 2)([spec])
    assert len(cut.targets) == 2 and cut.n_truncated == 1
    with pytest.raises(BadInput, match="raise --max-length"):
        PairCollator(hf, max_length=p)([spec])


def test_rows_at_decodes_images():
    ds = to_dataset(pair_rows(3, "p2dpo"))
    rows = rows_at(ds, [2, 0])
    assert rows[0]["id"] == ds[2]["id"] and rows[1]["crop_image"].size == (16, 16)
