"""`pairforge train` end to end on a random tiny LLaVA: real optimizer steps with each loss,
the reference cache, on-the-fly vs precomputed reference, resume, and the written adapter /
merged / fully trained weights loading back in peft + transformers.

Each run is a few optimizer steps on a dozen synthetic canonical rows (``pair_rows``), one
thread, a session-local ``PAIRFORGE_CACHE``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pairforge.cli import app
from pairforge.errors import PairforgeError
from pairforge.models.random_tiny import save_random_llava
from pairforge.schema import to_dataset
from pairforge.train import load_config, train
from pairforge.train.loop import lr_multiplier, step_rows
from test_train_data import pair_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return save_random_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, llava) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for loss in ("dpo", "cwdpo", "aspo", "p2dpo"):
        rows = pair_rows(12, loss)
        if loss == "cwdpo":  # ℓ̄ of the negatives under the policy that trains, as a cwdpo build stores it
            from pairforge.models.base import Request
            from pairforge.models.hf import HFModel

            hf = HFModel(f"hf:{llava}", device="cpu", progress=False)
            scored = hf.score([Request(r["prompt"], r["images"]) for r in rows],
                              [r["rejected"][0]["content"][0]["text"] for r in rows])
            rows = [dict(r, rejected_mean_logp=sc.mean_logprob, rejected_n_tokens=sc.n_tokens)
                    for r, sc in zip(rows, scored)]
        to_dataset(rows).save_to_disk(str(root / loss))
        out[loss] = root / loss
    return out


def run(llava, data, out, loss="dpo", **kw):
    settings = dict(data=str(data[loss]), model=f"hf:{llava}", loss=loss, out=str(out), steps=3,
                    batch_size=4, probe_size=2, probe_every=1, progress=False)
    settings.update(kw)
    return train(load_config(**settings))


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- pure pieces


def test_step_rows_are_seeded_permutations_per_epoch():
    idx = list(range(10, 20))
    first = [step_rows(idx, s, 4, seed=0, salt="x") for s in range(5)]  # 20 rows = 2 epochs
    flat = [r for rows in first for r in rows]
    assert sorted(flat[:10]) == idx and sorted(flat[10:]) == idx
    assert first == [step_rows(idx, s, 4, seed=0, salt="x") for s in range(5)]
    assert first != [step_rows(idx, s, 4, seed=1, salt="x") for s in range(5)]


def test_lr_multiplier_warmup_cosine_restarts_per_stage():
    assert lr_multiplier(0, [0, 10], warmup=2, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(1, [0, 10], warmup=2, min_ratio=0.0) == pytest.approx(1.0)
    assert lr_multiplier(6, [0, 10], warmup=2, min_ratio=0.0) == pytest.approx(0.5)  # cos(π/2)
    assert lr_multiplier(4, [4, 4], warmup=2, min_ratio=0.0) == pytest.approx(0.5)  # Stage 2 warms up again


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("loss", ["dpo", "cwdpo", "aspo", "p2dpo"])
def test_each_loss_takes_real_optimizer_steps(llava, data, tmp_path, loss):
    summary = run(llava, data, tmp_path, loss)
    records = log_records(tmp_path)
    assert len(records) == summary["steps"] == summary["stage1_steps"] + 3
    lora_b = [t for k, t in adapter_tensors(tmp_path).items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at 0: the steps moved it
    pref = [r for r in records if r["stage"] == 2]
    for r in pref:
        assert all(k in r for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                                    "rewards/margin", "lr", "grad_norm", "probe/entropy",
                                    "probe/dlogp_chosen", "probe/dlogp_rejected"))
        assert all(isinstance(v, (int, float)) and v == v for v in r.values())  # finite, no NaN
    assert pref[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    if loss == "cwdpo":
        stage1 = [r for r in records if r["stage"] == 1]
        assert stage1 and all("nll_chosen" in r and "sftc_hinge" in r for r in stage1)
        assert {"cooling_weight/mean", "cooling_weight/min", "cooling_weight/max", "cooling_weight/std"} <= set(pref[0])
        assert any("Stage-1" in n or "computed" in n for n in summary["notes"])
        # ℓ_floor, τ and C fitted on the data's ℓ̄ columns; the cooling weight varies across pairs
        assert any("cooling_floor" in n and "from the data" in n for n in summary["notes"])
        cool = summary["cooling"]
        assert cool["cooling_weight_p95"] - cool["cooling_weight_p05"] > 0.05 and cool["sftc_margin"] > 0
    if loss == "p2dpo":
        assert {"ddw_weight/mean", "calibration/mean", "focus_share"} <= set(pref[0])
        assert pref[0]["ddw_weight/min"] >= 0.4 - 1e-6 and pref[0]["ddw_weight/max"] <= 0.6 + 1e-6


def test_p2dpo_samples_are_the_unit_of_eq8(data, tmp_path):
    """A sample's focus and robust rows are one sampling unit (Eq. 8 sums them): units group
    rows by p2dpo_example, and the epoch counts samples."""
    from pairforge.train.loop import Trainer

    t = Trainer(load_config(data=str(data["p2dpo"]), loss="p2dpo", out=str(tmp_path), probe_size=0,
                            batch_size=2, progress=False))
    t._setup_data()
    assert t.unit_rows == {2 * k: [2 * k, 2 * k + 1] for k in range(6)} and t.stage2_units == [0, 2, 4, 6, 8, 10]
    assert t._stage_steps() == [0, 3]  # 6 samples, 2 per step


def test_dpo_steps_raise_chosen_over_rejected(llava, tmp_path):
    """A preference the policy can learn (always "red" over "blue"): the margin grows and the
    held-out probe pairs move the same way (Δ log p of chosen up, of rejected down)."""
    from pairforge.schema import assistant_message

    rows = [dict(r, chosen=[assistant_message("the circle is red.")],
                 rejected=[assistant_message("the circle is blue.")]) for r in pair_rows(12)]
    to_dataset(rows).save_to_disk(str(tmp_path / "pairs"))
    run(llava, {"dpo": tmp_path / "pairs"}, tmp_path / "run", steps=8, lr=1e-2, probe_every=4)
    records = log_records(tmp_path / "run")
    assert records[-1]["rewards/margin"] > records[1]["rewards/margin"] > 0
    assert records[-1]["rewards/accuracy"] == 1.0 and records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["probe/dlogp_chosen"] > 0 > records[-1]["probe/dlogp_rejected"]


def test_reference_cache_hit_on_second_run(llava, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))  # empty: earlier runs do not count
    first = run(llava, data, tmp_path / "a", loss="aspo", steps=1)
    second = run(llava, data, tmp_path / "b", loss="aspo", steps=1)
    assert first["reference_cache_hit"] is False and second["reference_cache_hit"] is True
    files_a, files_b = sorted((tmp_path / "a" / "reference").glob("*.npz")), sorted((tmp_path / "b" / "reference").glob("*.npz"))
    assert [f.name for f in files_a] == [f.name for f in files_b]
    import numpy as np
    with np.load(files_a[0]) as za, np.load(files_b[0]) as zb:
        assert all(np.array_equal(za[k], zb[k], equal_nan=True) for k in za.files)
    # the same weights either way
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["dpo", "cwdpo", "aspo", "p2dpo"])
def test_on_the_fly_reference_matches_precomputed(llava, data, tmp_path, loss):
    """The reference run in every step (adapter disabled; CW-DPO: a frozen copy of the Stage-1
    policy) gives the same training as the precomputed, cached log-probs."""
    run(llava, data, tmp_path / "pre", loss=loss, steps=2, lr=1e-2)
    summary = run(llava, data, tmp_path / "live", loss=loss, steps=2, lr=1e-2, precompute_ref=False)
    assert summary["reference_cache_hit"] is None  # nothing precomputed
    a, b = adapter_tensors(tmp_path / "pre"), adapter_tensors(tmp_path / "live")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # float rounding only (lr 1e-2)
    pre, live = log_records(tmp_path / "pre"), log_records(tmp_path / "live")
    assert [r["loss"] for r in pre] == pytest.approx([r["loss"] for r in live], abs=1e-5)


def test_gradient_accumulation_and_packing_do_not_change_the_step(llava, data, tmp_path):
    """4 pairs per step as 1×4 packed, 2×2 accumulated, or 1×4 as 2B separate rows: the same
    optimizer steps (micro-batch means of equal size average to the batch mean; packing only
    changes float rounding, which Adam's first normalised step can amplify to ~1e-4 on
    near-zero gradients, hence the tolerance on weights of size lr = 1e-2)."""
    run(llava, data, tmp_path / "one", steps=3, lr=1e-2)
    run(llava, data, tmp_path / "accum", steps=3, lr=1e-2, batch_size=2, grad_accum=2)
    run(llava, data, tmp_path / "flat", steps=3, lr=1e-2, pack=False)
    one, one_log = adapter_tensors(tmp_path / "one"), log_records(tmp_path / "one")
    for other in ("accum", "flat"):
        got, log = adapter_tensors(tmp_path / other), log_records(tmp_path / other)
        assert all(torch.allclose(one[k], got[k], atol=1e-3) for k in one), other
        for a, b in zip(one_log, log):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), other
            assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-4), other


def test_resume_from_checkpoint_gives_the_same_weights(llava, data, tmp_path):
    kw = dict(loss="cwdpo", steps=3, save_every=2, lr=1e-2)  # Stage 1 (1 step) + 3 Stage-2 steps
    full = run(llava, data, tmp_path, **kw)
    assert full["steps"] == 4
    uninterrupted = adapter_tensors(tmp_path)
    # crash after the step-2 checkpoint: later checkpoints and outputs are lost
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "adapter")
    (tmp_path / "train_log.jsonl").unlink()
    resumed = run(llava, data, tmp_path, resume=True, **kw)
    assert resumed["resumed_at"] == 2 and resumed["steps_this_run"] == 2
    after = adapter_tensors(tmp_path)
    assert all(torch.allclose(uninterrupted[k], after[k], atol=1e-6) for k in after)
    with pytest.raises(PairforgeError, match="other training settings"):
        run(llava, data, tmp_path, resume=True, **{**kw, "lr": 1e-3})


def test_adapter_and_merged_weights_load_in_peft_and_transformers(llava, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    summary = run(llava, data, tmp_path, steps=2, lr=1e-2, merge=True)
    assert set(summary["outputs"]) == {"adapter", "model"}
    processor = AutoProcessor.from_pretrained(tmp_path / "adapter")
    text = processor.apply_chat_template(pair_rows(1)[0]["prompt"], add_generation_prompt=True)
    inputs = processor(text=[text], images=[pair_rows(1)[0]["images"][0]], return_tensors="pt")
    base = AutoModelForImageTextToText.from_pretrained(llava).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
        peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(llava), tmp_path / "adapter").eval()
        adapter_logits = peft(**inputs).logits
        merged_logits = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()(**inputs).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)


def test_full_finetune_writes_a_loadable_model(llava, data, tmp_path):
    from transformers import AutoModelForImageTextToText

    summary = run(llava, data, tmp_path, steps=1, lr=1e-3, full_finetune=True)
    assert set(summary["outputs"]) == {"model"}
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    base = AutoModelForImageTextToText.from_pretrained(llava)
    diff = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters())]
    assert max(diff) > 0


# ----------------------------------------------------------------------------- CLI


def test_cli_train_runs_and_reports(llava, data, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("probe_size: 2\nprogress: false\nbatch_size: 4\n")
    result = CliRunner().invoke(app, ["train", str(data["dpo"]), "--model", f"hf:{llava}", "--loss", "dpo",
                                      "--out", str(tmp_path / "run"), "--steps", "1", "--lora-r", "4",
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "trained 1 steps of dpo" in result.output and "adapter:" in result.output
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_cli_train_missing_column_is_one_line(data, tmp_path, monkeypatch, capsys):
    from pairforge.cli import main

    monkeypatch.setattr("sys.argv", ["pairforge", "train", str(data["dpo"]), "--loss", "aspo",
                                     "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "column 'sentence_spans' missing, needed by --loss aspo" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
