"""The papers' training settings shipped as presets (`pairforge train --config vapr`): each
number checked against the paper's text (cited next to it), loading by name from the package,
the options they need (weight decay, warmup as a share of the steps, LoRA on the language
model's attention blocks) and one short run through the CLI with a preset."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from pairforge.cli import app
from pairforge.errors import PairforgeError
from pairforge.models.random_tiny import save_random_llava
from pairforge.schema import to_dataset
from pairforge.train.config import PRESET_DIR, PRESETS, load_config
from pairforge.train.loop import language_lora_targets
from test_train_data import pair_rows

pytestmark = pytest.mark.usefixtures("fresh_cache")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAPER = {
    # vapr-summary §5.2 (LLaVA-v1.5): lr 1e-6, effective batch 32, 5 epochs, warmup ratio 0.03,
    # LoRA 128 / 256 on the language backbone, β 0.1, max length 2048
    "vapr": dict(loss="dpo", lr=1e-6, effective_batch=32, epochs=5, warmup_ratio=0.03, lora_r=128,
                 lora_alpha=256, lora_target="language", beta=0.1, max_length=2048),
    # P2-DPO App. F.1/F.2: AdamW, cosine to 0, peak 2e-5, 100 warmup steps, weight decay 0.1,
    # LoRA 64 / 64 on the attention blocks of the language model, β 0.1, λ_calib 0.3
    "p2dpo": dict(loss="p2dpo", lr=2e-5, warmup=100, weight_decay=0.1, min_lr_ratio=0.0, lora_r=64,
                  lora_alpha=64, lora_target="language-attention", beta=0.1, lambda_calib=0.3),
    # ASPO §4.1 (LLaVA-v1.5): 1 epoch, batch 10, lr 2e-6, weight decay 0, LoRA 1024 / 2048, β 0.1,
    # α = 0.5 (Eq. 10)
    "aspo": dict(loss="aspo", epochs=1, effective_batch=10, lr=2e-6, weight_decay=0.0, lora_r=1024,
                 lora_alpha=2048, beta=0.1, aspo_alpha=0.5, aspo_weights="dynamic", aspo_ratio="reward"),
    # M3PO §3.6 / §4.1: batch 8, lr 5e-5, warmup 0.05 of the steps, one epoch
    "m3po": dict(loss="dpo", effective_batch=8, lr=5e-5, warmup_ratio=0.05, epochs=1),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_hold_the_papers_numbers(name):
    assert name in PRESETS and (PRESET_DIR / f"{name}.yaml").is_file()
    c = load_config(name, data="pairs", out="run")
    for key, want in PAPER[name].items():
        got = c.batch_size * c.grad_accum if key == "effective_batch" else getattr(c, key)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key


def test_presets_live_in_the_package_and_bad_names_are_named(tmp_path):
    from pathlib import Path

    import pairforge

    # package data (pyproject: pairforge = ["**/*.yaml"]), next to the trainer
    assert PRESET_DIR == Path(pairforge.__file__).parent / "train" / "presets"
    with pytest.raises(PairforgeError, match="no such config file or preset; .* aspo, m3po, p2dpo, vapr"):
        load_config("vaprr", data="x", out="y")
    # a file of that name wins over a preset; explicit options win over both
    f = tmp_path / "mine.yaml"
    f.write_text("lr: 0.5\n")
    assert load_config(str(f), data="x", out="y").lr == 0.5
    assert load_config("vapr", data="x", out="y", lr=3e-6).lr == 3e-6


def test_new_options_are_checked():
    with pytest.raises(PairforgeError, match="warmup_ratio=1.5"):
        load_config(data="x", out="y", warmup_ratio=1.5)
    with pytest.raises(PairforgeError, match="not both"):
        load_config(data="x", out="y", warmup_ratio=0.1, warmup=5)
    with pytest.raises(PairforgeError, match="weight_decay=-0.1"):
        load_config(data="x", out="y", weight_decay=-0.1)


def test_language_attention_targets(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(save_random_llava(tmp_path / "llava"))
    every = language_lora_targets(model)
    attn = language_lora_targets(model, attention_only=True)
    assert attn and set(attn) < set(every)
    assert all("attn" in n for n in attn) and not any("mlp" in n for n in attn)
    assert not any("vision" in n for n in every)


def test_cli_trains_with_a_preset_and_weight_decay(tmp_path):
    llava = save_random_llava(tmp_path / "llava")
    to_dataset(pair_rows(12)).save_to_disk(str(tmp_path / "pairs"))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(tmp_path / "pairs"), "--config", "m3po", "--model", f"hf:{llava}",
                                   "--out", str(out), "--steps", "21", "--batch-size", "2", "--weight-decay",
                                   "0.01"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert "warmup: 2 steps (0.05 of 21)" in summary["notes"]  # ceil(0.05·21)
    lrs = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert lrs[:3] == pytest.approx([2.5e-5, 5e-5, 5e-5])  # linear warmup over 2 steps to the peak, then cosine
