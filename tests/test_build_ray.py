"""`pairforge build --executor ray` on a local Ray instance (2 CPUs, started once for the
module): the same build folder as a local build of the same run identity (rows with their
image bytes, rejects, chunk records, recipe state), for the stateless recipes on the Ray Data
stage (M3PO, P2-DPO) and for the recipes with cross-example state (VaPR, CW-DPO); in the M3PO
and CW-DPO builds a model actor and a recipe-stage actor are SIGKILLed mid-call, and Ray's
retries lose or double no row; a driver SIGKILLed mid-run leaves its chunks and the same
command resumes.

Torch runs one thread here and in the model actors (role ``threads``): CPU float sums depend
on the thread count, and the comparison is bit for bit."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from pairforge.engine import BuildConfig, build, load_build, load_config
from pairforge.engine.ray_executor import RayOptions, import_ray
from pairforge.errors import PairforgeError

#: Small but real builds with the shipped tiny models (a few seconds each, locally).
CASES = {
    "vapr": dict(source="shapes?n=48&seed=5", params={}),
    "m3po": dict(source="shapes?n=16&seed=5", params={"n": 3, "max_new_tokens": 10}),
    "cwdpo": dict(source="shapes?n=16&seed=5", params={"k": 4, "max_new_tokens": 10}),
    "p2dpo": dict(source="shapes?n=8&seed=5", params={"max_new_tokens": 8}),
}
#: Processes killed mid-call during the Ray build (``ray::Class.method`` titles).
KILL = {"m3po": ("RoleServer.call", "MapBatches(ChunkWorker)).submit"),  # Ray Data stage
        "cwdpo": ("ChunkWorker.run", "RoleServer.call")}                 # the stateful path
CHUNK, BATCH = 8, 4


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pairforge[ray]')")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the local reference builds: as the model actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()
    torch.set_num_threads(threads)


def ray_settings() -> dict:
    return {"roles": {r: {"threads": 1} for r in ("policy", "clip", "editor", "judge")}}


def config(recipe: str, out: Path, **kw) -> BuildConfig:
    case = CASES[recipe]
    return BuildConfig(recipe=recipe, source=case["source"], params=dict(case["params"]),
                       out=out, chunk_size=CHUNK, batch_size=BATCH, **kw)


def quiet(cfg: BuildConfig) -> dict:
    return build(cfg, console=Console(file=io.StringIO()), progress=False)


_LOCAL: dict[str, Path] = {}


def local_build(recipe: str, tmp_path_factory) -> Path:
    """The reference: a local build of the case (once per module)."""
    if recipe not in _LOCAL:
        out = tmp_path_factory.mktemp(f"local-{recipe}")
        quiet(config(recipe, out))
        _LOCAL[recipe] = out
    return _LOCAL[recipe]


def assert_same_build(got: Path, want: Path) -> None:
    a = load_build(got).with_format("arrow")[:].to_pylist()
    b = load_build(want).with_format("arrow")[:].to_pylist()
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # ids, texts, scores, image bytes: everything
        assert x == y, {k: (x[k], y[k]) for k in x if x[k] != y[k] and k != "images"}
    assert (got / "rejects.jsonl").read_text() == (want / "rejects.jsonl").read_text()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (got, want))
    assert ma["identity"] == mb["identity"]
    assert ma["chunks"] == mb["chunks"] and ma["state"] == mb["state"]
    s = json.loads((got / "summary.json").read_text())["counts"]
    assert s["examples_in"] == s["examples_with_pairs"] + s["rejected"]


# ----------------------------------------------------------------------------- faults


def busy_pids(title: str) -> list[int]:
    """Processes whose title (Ray sets ``ray::Class.method`` while a call runs) has
    ``title``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and title in cmd:
                pids.append(int(d.name))
    return pids


def kill_when_busy(title: str, deadline: float) -> int | None:
    while time.monotonic() < deadline:
        for pid in busy_pids(title):
            try:
                os.kill(pid, signal.SIGKILL)
                return pid
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("recipe", list(CASES))
def test_ray_build_equals_local_build(recipe, ray_local, tmp_path, tmp_path_factory):
    """Same build folder as locally; with KILL, after actors were SIGKILLed mid-call."""
    want = local_build(recipe, tmp_path_factory)
    out = tmp_path / "ray"
    titles = KILL.get(recipe, ()) if Path("/proc/self/cmdline").exists() else ()
    errors: list[BaseException] = []
    summaries: list[dict] = []

    def run():
        try:
            summaries.append(quiet(config(recipe, out, executor="ray", ray=ray_settings())))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    killed = [kill_when_busy(title, time.monotonic() + 300) for title in titles]
    t.join(600)
    assert not t.is_alive() and not errors, errors
    assert all(killed), f"no busy {titles} process to kill: {killed}"
    n = int(CASES[recipe]["source"].split("n=")[1].split("&")[0])
    assert summaries[0]["counts"]["examples_in"] == n
    assert_same_build(out, want)


def test_driver_killed_mid_run_then_rerun_resumes(ray_local, tmp_path, tmp_path_factory):
    """A `pairforge build --executor ray` process joined to the running Ray instance, killed
    after its first committed chunk, then the same command again."""
    want = local_build("m3po", tmp_path_factory)
    out = tmp_path / "ray"
    case = CASES["m3po"]
    threads = ray_settings()["roles"]["policy"]["threads"]
    cfg = tmp_path / "build.yaml"
    cfg.write_text("executor: ray\nray:\n  roles:\n" + "".join(
        f"    {r}: {{threads: {threads}}}\n" for r in ("policy", "clip", "judge")))
    cmd = [sys.executable, "-m", "pairforge", "build", "m3po", "--source", case["source"],
           "--out", str(out), "--chunk-size", str(CHUNK), "--batch-size", str(BATCH),
           "--config", str(cfg), "--ray-address", ray_local.get_runtime_context().gcs_address,
           "--quiet", *[a for k, v in case["params"].items() for a in ("--param", f"{k}={v}")]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def committed() -> int:
        try:
            return len(json.loads((out / "manifest.json").read_text())["chunks"])
        except (OSError, ValueError):
            return 0

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while committed() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = committed()
    assert 1 <= n_killed < 3
    assert not json.loads((out / "manifest.json").read_text())["complete"]

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming run" in rerun.stderr
    assert_same_build(out, want)
    assert len(json.loads((out / "summary.json").read_text())["commands"]) == 2


# ----------------------------------------------------------------------------- settings


def test_ray_settings_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("recipe: m3po\nout: x\nexecutor: ray\nray:\n  window: 8\n  stage: {pool: 3}\n"
                    "  roles:\n    policy: {pool: 2, num_gpus: 1, num_cpus: 2}\n")
    cfg = load_config(path, ray_address="auto")
    assert cfg.executor == "ray" and cfg.ray["address"] == "auto"
    o = RayOptions.parse(cfg.ray)
    assert o.address == "auto" and o.window == 8 and o.stage.size == 3
    assert o.roles["policy"].size == 2 and o.roles["policy"].num_gpus == 1.0
    assert load_config(path, executor="local").executor == "local"


@pytest.mark.parametrize("ray,match", [
    ({"roles": {"critic": {}}}, "ray: roles.critic: not a model role"),
    ({"roles": {"policy": {"pool": 0}}}, "ray: roles.policy.pool: 0: must be an integer >= 1"),
    ({"roles": {"policy": {"gpus": 1}}}, "ray: roles.policy.gpus: unknown key"),
    ({"stage": {"num_cpus": -1}}, "ray: stage.num_cpus: -1: must be a number >= 0"),
    ({"window": 0}, "ray: window: 0: must be an integer >= 1"),
    ({"adress": "auto"}, "ray: adress: unknown setting"),
])
def test_bad_ray_settings_are_one_line_errors(ray, match):
    with pytest.raises(PairforgeError, match=match):
        RayOptions.parse(ray)


def test_unknown_executor_and_missing_ray_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(PairforgeError, match="--executor spark: choose from local, ray"):
        BuildConfig(recipe="vapr", out=tmp_path, executor="spark").check()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(PairforgeError, match=r"needs Ray.*pip install 'pairforge\[ray\]'"):
        import_ray()


def test_a_pool_shares_each_per_item_call_in_order(monkeypatch):
    """With split, generate/score/cosine on a pool of 3 go out as 3 contiguous parts, one per
    actor, and come back joined in order; other calls, and all without split, go whole."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pairforge[ray]')")
    from pairforge.engine.ray_executor import remote_model

    calls: list[tuple[int, str, tuple]] = []

    class Actor:
        def __init__(self, k):
            self.k = k
            self.call = self
            self.info = self

        def remote(self, *a):
            if not a:  # info.remote()
                return {"attrs": {"name": "fake"}, "methods": ["generate", "score", "embed"],
                        "pid": 0}
            method, args, kwargs = a
            calls.append((self.k, method, args))
            if method == "embed":
                return "whole"
            return [f"{method}:{x}" for x in args[0]]

    monkeypatch.setattr(ray, "get", lambda x: x)
    m = remote_model("policy", [Actor(0), Actor(1), Actor(2)], "fake", split=True)
    assert m.name == "fake"
    out = m.generate(list("abcdefg"), 4, None)
    assert out == [f"generate:{x}" for x in "abcdefg"]
    parts = [(k, args) for k, method, args in calls]
    assert sorted(k for k, _ in parts) == [0, 1, 2]
    assert [a[0] for _, a in parts] == [["a", "b"], ["c", "d"], ["e", "f", "g"]]
    assert all(a[1:] == (4, None) for _, a in parts)
    calls.clear()
    assert m.score(list("xy"), ["1", "2"]) == ["score:x", "score:y"]
    assert [a for _, _, a in calls] in ([(["x"], ["1"]), (["y"], ["2"])],)
    calls.clear()
    assert m.embed(list("abc")) == "whole" and len(calls) == 1
    with pytest.raises(AttributeError):
        m.cosine_matrix  # noqa: B018 - not a method of this model
    calls.clear()
    whole = remote_model("policy", [Actor(0), Actor(1)], "fake")
    assert whole.generate(list("abc"), 1, None) == ["generate:a", "generate:b", "generate:c"]
    assert len(calls) == 1


def test_pools_the_cluster_cannot_hold_are_refused_before_any_actor(tmp_path):
    from pairforge.engine.ray_executor import RayExecutor

    ex = RayExecutor(BuildConfig(recipe="m3po", out=tmp_path, executor="ray", ray={
        "roles": {"policy": {"pool": 2, "num_gpus": 1}}}))
    ex.specs = {"policy": "tiny-vlm", "clip": "tiny-clip", "judge": None}
    ex.check_resources({"CPU": 16.0, "GPU": 2.0})  # 2 GPUs, 0.25 * 5 CPUs: fits
    with pytest.raises(PairforgeError, match="ask for 2 GPUs at once, the cluster has 1"):
        ex.check_resources({"CPU": 16.0, "GPU": 1.0})
    with pytest.raises(PairforgeError, match="ask for 1.25 CPUs at once, the cluster has 1"):
        ex.check_resources({"CPU": 1.0, "GPU": 2.0})


def test_a_crash_on_a_worker_is_one_line_on_the_driver_with_the_traceback_in_error_log(tmp_path):
    """A recipe crash inside a recipe-stage actor comes back as data (no Ray retry of a
    deterministic failure); the driver writes its traceback to error.log and stops with one
    line naming the chunk and the resume."""
    from pairforge.engine.ray_executor import ChunkWorker, RayChunker

    class Broken:
        recipe = None

        def build_chunk(self, index, entries):
            raise ValueError("bad crop box")

    worker = ChunkWorker.__new__(ChunkWorker)
    worker.chunker = Broken()
    res = worker.run(3, [], None)
    assert res["index"] == 3 and "ValueError: bad crop box" in res["error"]
    assert "Traceback" in res["trace"]
    chunker = RayChunker.__new__(RayChunker)
    chunker.out = tmp_path
    with pytest.raises(PairforgeError, match=r"chunk 3 failed on Ray \(ValueError: bad crop "
                                             r"box\).*traceback is in .*error.log; 3 chunk\(s\) "
                                             r"are committed.*rerun the same command"):
        chunker._result(res)
    assert "bad crop box" in (tmp_path / "error.log").read_text()
