"""Issue 14 items 8, 12 (train), 13 (--device), 14: a resumed run's log has each step once, a
truncated checkpoint falls back to the one before it (or stops with one line), state files are
written atomically, unwritable --out and NaN/inf settings and absent devices are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pairforge.cli import app
from pairforge.errors import PairforgeError
from pairforge.models.base import resolve_device
from pairforge.models.random_tiny import save_random_llava
from pairforge.schema import to_dataset
from pairforge.train import load_config, train
from pairforge.train.config import TrainConfig
from test_train_data import pair_rows


pytestmark = pytest.mark.usefixtures("fresh_cache")


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return save_random_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "dpo"
    to_dataset(pair_rows(12, "dpo")).save_to_disk(str(path))
    return path


def run(llava, data, out, **kw):
    settings = dict(data=str(data), model=f"hf:{llava}", loss="dpo", out=str(out), steps=4,
                    batch_size=4, probe_size=0, save_every=2, lr=1e-2, progress=False)
    settings.update(kw)
    return train(load_config(**settings))


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in
            (out / "train_log.jsonl").read_text().splitlines()]


def killed_after_step_2(out: Path) -> None:
    """What a kill -9 just before the step-4 checkpoint leaves: steps 3-4 logged (the last line
    cut mid-write), no step-4 checkpoint, no outputs."""
    import shutil

    (out / "checkpoints" / "step-000004").rename(out / "checkpoints" / "step-000004.partial")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "stage": 2, "lo')
    for name in ("adapter", "train_summary.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_resume_truncates_the_log_to_the_checkpoint(llava, data, tmp_path):
    run(llava, data, tmp_path)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]
    killed_after_step_2(tmp_path)
    resumed = run(llava, data, tmp_path, resume=True)
    assert resumed["resumed_at"] == 2
    assert steps_logged(tmp_path) == [1, 2, 3, 4]  # not 1, 2, 3, 4, 3, 4
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # the killed save's folder was replaced
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(llava, data, tmp_path):
    run(llava, data, tmp_path, steps=6)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000006"]
    state = ckpts / "step-000006" / "trainer_state.json"
    state.write_text(state.read_text()[:20])  # truncated
    resumed = run(llava, data, tmp_path, steps=6, resume=True)
    assert resumed["resumed_at"] == 4
    assert any("skipped the corrupt checkpoint step-000006" in n for n in resumed["notes"])
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]

    weights = next((ckpts / "step-000006").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated weights file
    resumed = run(llava, data, tmp_path, steps=6, resume=True)
    assert resumed["resumed_at"] == 4
    assert any("weights or optimizer state unreadable" in n for n in resumed["notes"])

    for c in ckpts.iterdir():  # nothing readable left
        (c / "trainer_state.json").write_text("{")
    with pytest.raises(PairforgeError) as e:
        run(llava, data, tmp_path, steps=6, resume=True)
    assert "no readable checkpoint to resume from" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- one line


@pytest.mark.parametrize("option, value", [("beta", "nan"), ("beta", "inf"), ("lr", "nan"),
                                           ("lr", "-inf"), ("epochs", "nan")])
def test_nan_and_inf_options_are_one_line(data, tmp_path, option, value):
    r = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "o"),
                                 f"--{option}", value])
    assert isinstance(r.exception, PairforgeError)
    assert f"{option}=" in str(r.exception) and "finite" in str(r.exception)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field", [f for f, v in TrainConfig.__dataclass_fields__.items()
                                   if str(v.type).replace(" | None", "") == "float"])
def test_every_float_setting_must_be_finite(field):
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(PairforgeError, match=rf"{field}=.*finite"):
            load_config(data="d", out="o", **{field: bad})


def test_settings_from_yaml_are_type_and_range_checked(tmp_path):
    for text, match in (("lr: fast\n", "lr=.*must be a number"),
                        ("batch_size: 2.5\n", "batch_size=.*integer"),
                        ("merge: 'yes'\n", "merge=.*true or false"),
                        ("lora_dropout: 1.0\n", r"lora_dropout=.*\[0, 1\)"),
                        ("min_lr_ratio: 2\n", r"min_lr_ratio=.*\[0, 1\]"),
                        ("max_grad_norm: 0\n", "max_grad_norm=.*> 0"),
                        ("weight_decay: -1\n", "weight_decay=.*>= 0")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(PairforgeError, match=match):
            load_config(tmp_path / "c.yaml", data="d", out="o")


def test_train_out_that_is_a_file_or_under_one_is_one_line(llava, data, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "run"):
        with pytest.raises(PairforgeError, match="--out .*a-file.*: cannot write"):
            run(llava, data, out, steps=1, save_every=None)


def test_devices_this_machine_lacks_are_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PairforgeError, match="not a device"):
        resolve_device("banana")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(PairforgeError, match="no CUDA device" if n == 0 else "CUDA device"):
        resolve_device(f"cuda:{max(n, 7)}")
    runner = CliRunner()
    for args in (["serve", "tiny-vlm", "--device", "cuda:7"],
                 ["audit", "missing.jsonl", "--out", "x", "--device", "cuda:7"]):
        r = runner.invoke(app, args)
        assert isinstance(r.exception, PairforgeError), (args, r.exception)
        assert "--device cuda:7" in str(r.exception)
