"""Issue 14 items 6, 7, 12 (publish / export share), 13 (empty build): publish never deletes
files it did not write, never leaves a half-written layout under the staging name, and says in
one line when it cannot write or has nothing to publish."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from pairforge.engine import build, load_config
from pairforge.cli import app
from pairforge.errors import PairforgeError
from pairforge.publish import export, publish
from pairforge.publish import hub as hub_module
from pairforge.publish import layout
from pairforge.publish.layout import MARKER
from pairforge.schema import make_pair, to_dataset

QUIET = Console(file=io.StringIO())


def image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))


@pytest.fixture
def pairs(tmp_path) -> Path:
    rows = [make_pair(prompt=f"What is shown in picture {i}?", chosen=f"A red square {i}.",
                      rejected=f"A blue square {i}.", images=[image(i)]) for i in range(4)]
    path = tmp_path / "pairs.parquet"
    to_dataset(rows).to_parquet(str(path))
    return path


def user_folder(folder: Path) -> dict[str, bytes]:
    """A user's own folder that looks like a repo layout: README.md, data/, images/."""
    files = {"README.md": b"# my notes\n", "data/train.parquet": b"PAR1 mine",
             "images/cat.png": b"\x89PNG mine"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def test_a_users_folder_is_never_cleared(pairs, tmp_path):
    folder = tmp_path / "mine"
    files = user_folder(folder)
    with pytest.raises(PairforgeError, match="not a pairforge staging folder .*never deletes"):
        publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    assert {n: (folder / n).read_bytes() for n in files} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "pairs.parquet"]


def test_a_staging_folder_is_marked_and_replaced_but_not_a_users_file_in_it(pairs, tmp_path):
    folder = tmp_path / "hub"
    first = publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["complete"] and marker["files"] == first.files and MARKER not in first.files
    (folder / "data" / "stale-00000.parquet").write_bytes(b"x")  # the user put a file there
    with pytest.raises(PairforgeError, match="holds 'data/stale-00000.parquet', which "
                                             "pairforge did not stage"):
        publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    assert (folder / "data" / "stale-00000.parquet").read_bytes() == b"x"
    (folder / "data" / "stale-00000.parquet").unlink()
    second = publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    assert second.files == first.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "pairs.parquet"]  # no tmp left


def test_a_killed_publish_leaves_nothing_under_the_staging_name(pairs, tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl+C after the parquet shards were written

    monkeypatch.setattr(hub_module, "write_card", killed)
    with pytest.raises(KeyboardInterrupt):
        publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "pairs.parquet"]
    monkeypatch.undo()
    # a kill -9 leaves the marked temporary folder: the next run removes it, and only it
    left = tmp_path / ".hub.partial-dead"
    (left / "data").mkdir(parents=True)
    (left / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 trunc")
    (left / MARKER).write_text(json.dumps({"complete": False, "files": []}))
    unmarked = tmp_path / ".hub.partial-not-ours"
    unmarked.mkdir()
    publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    assert not left.exists() and unmarked.is_dir()


def test_unwritable_staging_and_export_out_are_one_line(pairs, tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(PairforgeError, match="--staging .*a-file/hub: cannot write there"):
        publish(pairs, "me/x", dry_run=True, staging=a_file / "hub", console=QUIET)
    with pytest.raises(PairforgeError, match="exists and is not a folder"):
        publish(pairs, "me/x", dry_run=True, staging=a_file, console=QUIET)
    with pytest.raises(PairforgeError, match="--out .*a-file/lf: cannot write there"):
        export(pairs, "llamafactory", a_file / "lf", console=QUIET)
    with pytest.raises(PairforgeError, match="exists and is not a folder"):
        export(pairs, "swift", a_file, console=QUIET)

    # a read-only folder (root ignores chmod, so the OSError is raised where pairforge writes)
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(layout.tempfile, "mkdtemp", read_only)
    with pytest.raises(PairforgeError, match=r"cannot write there \(Permission denied\); pass "
                                             r"--staging with a writable folder"):
        publish(pairs, "me/x", dry_run=True, staging=tmp_path / "ro" / "hub", console=QUIET)
    monkeypatch.undo()
    import importlib

    export_module = importlib.import_module("pairforge.publish.export")

    monkeypatch.setattr(export_module.ImageWriter, "__init__", read_only)
    with pytest.raises(PairforgeError, match=r"--out .*: cannot write there \(Permission"):
        export(pairs, "swift", tmp_path / "ro-out", console=QUIET)


def test_cli_lines_for_unwritable_places(pairs, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    runner = CliRunner()
    for args in (["publish", str(pairs), "--repo-id", "me/x", "--dry-run", "--staging",
                  str(a_file / "hub")],
                 ["export", str(pairs), "--to", "swift", "--out", str(a_file / "out")]):
        r = runner.invoke(app, args)
        assert isinstance(r.exception, PairforgeError), r.exception
        assert "\n" not in str(r.exception)


def test_an_empty_build_says_it_has_no_pairs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image(0).save(src / "a.png")
    recs = [{"id": f"r{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "The square is red."}]} for i in range(3)]
    (src / "d.json").write_text(json.dumps(recs))
    out = tmp_path / "b"
    summary = build(load_config(recipe="vapr", source=str(src / "d.json"), out=out),
                    progress=False, console=QUIET)
    assert summary["counts"]["pairs"] == 0
    with pytest.raises(PairforgeError) as e:
        publish(out, "me/x", dry_run=True, console=QUIET)
    assert "has no pairs, so there is nothing to publish" in str(e.value)
    assert "bug" not in str(e.value) and not (out / "hub").exists()


def test_a_staged_file_the_user_removed_does_not_block_the_next_staging(pairs, tmp_path):
    """A file the marker lists but the user deleted is simply not there to move: the next
    publish replaces the staging as usual (it used to fail on every later run)."""
    folder = tmp_path / "hub"
    first = publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    (folder / "README.md").unlink()
    second = publish(pairs, "me/x", dry_run=True, staging=folder, console=QUIET)
    assert second.files == first.files and (folder / "README.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "pairs.parquet"]
