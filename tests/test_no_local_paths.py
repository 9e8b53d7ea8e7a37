"""Issue 14 item 2 / issue 17 item 13: a build run with absolute --source, --image-root, --out and
model paths records its command without them, and `publish --dry-run` stages no absolute path
of this machine in any file (card, parquet rows, plots), and no token.

The source is a LLaVA JSON (the format's documented `image` + `conversations` record) written
from the offline world into an absolute temporary folder; the commands run as a user runs them
(`python -m pairforge ...` in a subprocess, so `sys.argv` is the real command line)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Image, List
from PIL import Image as PILImage
from rich.console import Console

from pairforge.publish import publish
from pairforge.safety import redact_local_paths
from pairforge.schema import make_pair, to_dataset
from pairforge.world.models import TINY_VLM_PATH

FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789abcdefXYZ"


@pytest.mark.parametrize("text, want", [
    ("pairforge build vapr --source /tmp/x/d.json --out /tmp/x/b",
     "pairforge build vapr --source <local>/d.json --out <local>/b"),
    ("--source=/data/y.jsonl", "--source=<local>/y.jsonl"),
    ("--policy hf:/models/llava@abc", "--policy hf:<local>/llava@abc"),
    ("'/tmp/with space/d.json'", "'<local>/d.json'"),
    ("file:///srv/d.json", "file://<local>/d.json"),
    (r"C:\Users\me\d.json", "<local>/d.json"),
    # kept: URLs, relative paths, specs, fractions
    ("openai:gpt@https://api.example.com/v1", "openai:gpt@https://api.example.com/v1"),
    ("http://localhost:8000/v1 shapes:train?n=24 data/d.json ../x 1/2 km/h",
     "http://localhost:8000/v1 shapes:train?n=24 data/d.json ../x 1/2 km/h"),
])
def test_redact_local_paths(text, want):
    assert redact_local_paths(text) == want


def all_text(folder: Path) -> str:
    """Every staged file as text: parquet files decoded (their pages are compressed), others
    as raw bytes."""
    parts = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            rows = pq.read_table(p).to_pylist()
            parts.append(json.dumps(rows, default=lambda b: "<bytes>"))
            parts.append(str(pq.read_schema(p).metadata))
        else:
            parts.append(p.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def pf(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pairforge", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_build_with_absolute_paths_publishes_none(tmp_path):
    from pairforge.world.dataset import sft_dataset

    src = tmp_path / "private-src"
    src.mkdir()
    ds = sft_dataset(12, 0, 0, seed=3)
    ds = (ds["train"] if hasattr(ds, "keys") else ds).cast_column(
        "images", List(Image(decode=False)))
    recs = []
    for i, r in enumerate(ds):
        if r["images"]:
            (src / f"{i}.png").write_bytes(r["images"][0]["bytes"])
            recs.append({"id": r["id"], "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\n" + r["question"]},
                {"from": "gpt", "value": r["answer"]}]})
    (src / "d.json").write_text(json.dumps(recs))
    out = tmp_path / "private-build"
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN}
    r = pf("build", "vapr", "--source", str(src / "d.json"), "--image-root", str(src),
           "--out", str(out), "--editor", f"hf:{TINY_VLM_PATH}", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["pairs"] > 0
    recorded = " ".join(summary["commands"])
    assert str(tmp_path) not in recorded and str(TINY_VLM_PATH) not in recorded
    assert "--source <local>/d.json --image-root <local>/private-src" in recorded

    staging = tmp_path / "private-hub"
    r = pf("publish", str(out), "--repo-id", "me/x", "--dry-run", "--staging", str(staging),
           env=env)
    assert r.returncode == 0, r.stderr
    text = all_text(staging)
    assert "<local>/d.json" in text  # the card still says what the source was
    for secret in (str(tmp_path), str(TINY_VLM_PATH), "private-src/", FAKE_TOKEN,
                   os.path.expanduser("~") + "/"):
        assert secret not in text, secret


def test_model_paths_in_rows_are_cut_before_publishing(tmp_path):
    img = PILImage.new("RGB", (8, 8), (1, 2, 3))
    rows = [make_pair(prompt=f"Q{i}?", chosen=f"Answer {i} is right.",
                      rejected=f"Answer {i} is wrong.", images=[img],
                      models=[{"role": "policy", "name": f"{tmp_path}/models/llava-7b",
                               "revision": ""},
                              {"role": "clip", "name": "openai/clip-vit-base-patch32",
                               "revision": "r1"}]) for i in range(3)]
    path = tmp_path / "rows.parquet"
    to_dataset(rows).to_parquet(str(path))
    result = publish(path, "me/x", dry_run=True, console=Console(file=io.StringIO()))
    text = all_text(result.staging)
    assert str(tmp_path) not in text
    assert "<local>/llava-7b" in text and "openai/clip-vit-base-patch32" in text


def test_the_recorded_command_has_no_path_and_no_key(monkeypatch):
    from pairforge.cli import recorded_command

    monkeypatch.setattr(sys, "argv", ["/usr/bin/pairforge", "build", "vapr", "--source",
                                      "/home/alice/data/train.json", "--editor",
                                      f"openai:gpt@https://x.example/v1?key={FAKE_TOKEN}",
                                      "--out", "/home/alice/builds/v1"])
    assert recorded_command() == ("pairforge build vapr --source <local>/train.json --editor "
                                  "'openai:gpt@https://x.example/v1?key=[redacted]' "
                                  "--out <local>/v1")


def test_embedded_images_keep_only_their_file_name(tmp_path):
    from datasets import Image as ImageFeature
    from datasets import List as ListFeature

    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    rows = [make_pair(prompt=f"Q{i}?", chosen=f"Answer {i} is right.",
                      rejected=f"Answer {i} is wrong.",
                      images=[{"bytes": buf.getvalue(),
                               "path": f"{tmp_path}/alice-photos/img{i}.png"}])
            for i in range(2)]
    path = tmp_path / "rows.parquet"
    to_dataset(rows).to_parquet(str(path))
    result = publish(path, "me/x", dry_run=True, console=Console(file=io.StringIO()))
    assert str(tmp_path) not in all_text(result.staging)
    from datasets import load_dataset

    ds = load_dataset(str(result.staging), split="train").cast_column(
        "images", ListFeature(ImageFeature(decode=False)))
    assert [r["images"][0]["path"] for r in ds] == ["img0.png", "img1.png"]
