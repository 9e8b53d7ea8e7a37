"""A real `pairforge build` subprocess killed with SIGKILL mid-build, rerun with the same
command, ends with exactly the rows and rejects of an uninterrupted build (none lost, none
twice), the fake recipe's cross-example state restored from the manifest."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from test_build_fakes import HERE, register

from pairforge.engine import BuildConfig, build, load_build

# a slow-ish build: 12 chunks of 6 examples, 2 batches of 3 per chunk, 0.08 s per batch
SOURCE, CHUNK, BATCH, SLEEP = "shapes?n=72&seed=1", 6, 3, 0.08
LAUNCH = ("import sys; sys.path.insert(0, {here!r}); import test_build_fakes as f; f.register(); "
          "from pairforge.cli import main; sys.argv = ['pairforge'] + sys.argv[1:]; main()")


def command(out: Path) -> list[str]:
    return [sys.executable, "-c", LAUNCH.format(here=str(HERE)), "build", "echo",
            "--source", SOURCE, "--out", str(out), "--chunk-size", str(CHUNK),
            "--batch-size", str(BATCH), "--param", f"sleep={SLEEP}", "--quiet"]


def committed(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["chunks"])
    except (OSError, ValueError):  # not written yet (it is replaced atomically, never torn)
        return 0


def test_sigkill_mid_build_then_rerun_equals_an_uninterrupted_build(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed(out) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = committed(out)
    assert 4 <= n_killed < 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["state"] == {"seen": n_killed * CHUNK}

    rerun = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming run" in rerun.stderr

    register()
    ref = tmp_path / "uninterrupted"
    build(BuildConfig(recipe="echo", source=SOURCE, out=ref, chunk_size=CHUNK, batch_size=BATCH,
                      params={"sleep": SLEEP}), console=Console(file=io.StringIO()),
          progress=False)
    got = load_build(out).with_format("arrow")[:].to_pylist()
    want = load_build(ref).with_format("arrow")[:].to_pylist()
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):  # row by row, images (bytes) included
        assert a == b
    assert (out / "rejects.jsonl").read_text() == (ref / "rejects.jsonl").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["examples_in"] == 72 == (summary["counts"]["examples_with_pairs"]
                                                      + summary["counts"]["rejected"])
    assert len(summary["commands"]) == 2
    assert not list(out.glob("*/.*.tmp"))  # a torn temporary file is rewritten by the rerun
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == \
        [f"chunk-{i:05d}.parquet" for i in range(12)]
