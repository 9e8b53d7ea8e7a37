"""Issue 14 item 1: publish, export and train read an image only inside the set's allowed root,
bounded and decodable; a row that points anywhere else is refused with its reason and its
bytes never reach a staged, exported or trained-on file.

Fixtures: canonical parquet files (the layout `Dataset.to_parquet` writes for pairforge rows)
whose image structs carry ``{"bytes": null, "path": ...}``, the struct `datasets` itself
writes for an unembedded image, pointing at /etc/passwd, at a key file outside the set's folder,
through a symlink that leaves the folder, and through ``..``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Image, List
from PIL import Image as PILImage
from rich.console import Console
from typer.testing import CliRunner

from pairforge import safety
from pairforge.cli import app
from pairforge.errors import PairforgeError
from pairforge.publish import export, open_pairset, publish
from pairforge.schema import make_pair, to_dataset
from pairforge.train.data import load_pairs

KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAsecretsecretsecret\n"
QUIET = Console(file=io.StringIO())


def png(seed: int = 0, size=(10, 8)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def parquet_pointing_at(folder: Path, paths: list[str | None]) -> Path:
    """A canonical parquet in ``folder``: row i's one image is ``{"bytes": None, "path":
    paths[i]}`` (``None``: an embedded PNG)."""
    rows = [make_pair(prompt=f"What is in picture {i}?", chosen=f"A red square number {i}.",
                      rejected=f"A blue circle number {i}.",
                      images=[PILImage.open(io.BytesIO(png(i)))]) for i in range(len(paths))]
    ds = to_dataset(rows).cast_column("images", List(Image(decode=False)))
    ds = ds.map(lambda r, i: {"images": r["images"] if paths[i] is None
                              else [{"bytes": None, "path": paths[i]}]}, with_indices=True)
    ds = ds.cast_column("images", List(Image()))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "pairs.parquet"
    # pyarrow, not Dataset.to_parquet (which would itself read the files the paths name)
    table = ds.with_format("arrow")[:]
    pq.write_table(table.replace_schema_metadata(ds.data.table.schema.metadata), out)
    stored = pq.read_table(out).column("images").to_pylist()
    assert [s[0] for s, p in zip(stored, paths) if p is not None] == \
        [{"bytes": None, "path": p} for p in paths if p is not None]
    return out


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the set's folder with a private key and a real image in it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "id_ed25519").write_bytes(KEY)
    (d / "holiday.png").write_bytes(png(99))
    return d


def hostile_paths(set_dir: Path, outside: Path) -> dict[str, str]:
    set_dir.mkdir(parents=True, exist_ok=True)
    (set_dir / "escape.png").symlink_to(outside / "holiday.png")
    (set_dir / "key.png").symlink_to(outside / "id_ed25519")
    return {"/etc/passwd": "escapes", str(outside / "id_ed25519"): "escapes",
            str(outside / "holiday.png"): "escapes", "../outside/id_ed25519": "escapes",
            "escape.png": "escapes", "key.png": "escapes"}


@pytest.mark.parametrize("case", range(6))
def test_publish_refuses_a_row_pointing_outside_and_stages_nothing(tmp_path, outside, case):
    set_dir = tmp_path / "set"
    path, why = list(hostile_paths(set_dir, outside).items())[case]
    data = parquet_pointing_at(set_dir, [None, path, None])
    staging = tmp_path / "hub"
    with pytest.raises(PairforgeError) as e:
        publish(data, "me/x", dry_run=True, staging=staging, console=QUIET)
    msg = str(e.value)
    assert "\n" not in msg and "row 1" in msg and why in msg and "nothing was written" in msg
    assert not staging.exists()
    assert not files_containing(tmp_path / "set", KEY)  # nothing copied beside the set


def test_publish_refuses_non_images_and_oversized_files_inside_the_root(tmp_path, monkeypatch):
    set_dir = tmp_path / "set"
    set_dir.mkdir()
    (set_dir / "notes.png").write_bytes(b"just text, not an image")
    (set_dir / "empty.png").write_bytes(b"")
    (set_dir / "big.png").write_bytes(png(1, (200, 200)))
    (set_dir / "sub").mkdir()
    os.mkfifo(set_dir / "pipe.png")  # opening it for reading would block
    for name, reason in (("notes.png", "cannot be decoded"), ("empty.png", "empty"),
                         ("sub", "not a regular file"), ("pipe.png", "not a regular file"),
                         ("gone.png", "not found")):
        data = parquet_pointing_at(set_dir, [name])
        with pytest.raises(PairforgeError, match=reason):
            publish(data, "me/x", dry_run=True, staging=tmp_path / "hub", console=QUIET)
    monkeypatch.setattr(safety, "MAX_IMAGE_BYTES", 1000)
    data = parquet_pointing_at(set_dir, ["big.png"])
    with pytest.raises(PairforgeError, match="above the limit of 1,000"):
        publish(data, "me/x", dry_run=True, staging=tmp_path / "hub", console=QUIET)
    assert not (tmp_path / "hub").exists()


def test_a_decompression_bomb_path_is_refused_from_its_header(tmp_path):
    set_dir = tmp_path / "set"
    set_dir.mkdir()
    buf = io.BytesIO()
    PILImage.new("1", (5000, 5000)).save(buf, format="PNG")  # 25 Mpx, a few KB
    (set_dir / "bomb.png").write_bytes(buf.getvalue())
    data = parquet_pointing_at(set_dir, ["bomb.png"])
    with pytest.raises(PairforgeError, match="25,000,000 pixels, above the limit"):
        open_pairset(data)


def test_an_image_inside_the_root_is_embedded_and_its_path_cut_to_a_name(tmp_path):
    set_dir = tmp_path / "set"
    (set_dir / "imgs").mkdir(parents=True)
    (set_dir / "imgs" / "a.png").write_bytes(png(5))
    data = parquet_pointing_at(set_dir, ["imgs/a.png", None])
    result = publish(data, "me/x", dry_run=True, staging=tmp_path / "hub", console=QUIET)
    from datasets import load_dataset

    loaded = load_dataset(str(result.staging), split="train").cast_column(
        "images", List(Image(decode=False)))
    assert loaded[0]["images"][0] == {"bytes": png(5), "path": "a.png"}
    assert not files_containing(result.staging, str(tmp_path).encode())


def test_an_explicit_image_root_allows_that_folder_only(tmp_path, outside):
    data = parquet_pointing_at(tmp_path / "set", [str(outside / "holiday.png")])
    with pytest.raises(PairforgeError, match="escapes"):
        open_pairset(data)
    pset = open_pairset(data, image_root=outside)
    raw = pset.dataset.cast_column("images", List(Image(decode=False)))
    assert raw[0]["images"][0]["bytes"] == png(99)
    with pytest.raises(PairforgeError, match="escapes"):  # the key is not an image anyway
        open_pairset(parquet_pointing_at(tmp_path / "set2", ["/etc/passwd"]),
                     image_root=outside)


def test_export_skips_the_row_with_its_reason_and_writes_no_secret(tmp_path, outside):
    set_dir = tmp_path / "set"
    paths = list(hostile_paths(set_dir, outside))
    data = parquet_pointing_at(set_dir, [None, *paths, None])
    out = tmp_path / "lf"
    result = export(data, "llamafactory", out, console=QUIET)
    assert result.n_rows == 2 and len(result.skipped) == len(paths)
    assert sorted(b.row for b in result.skipped) == list(range(1, len(paths) + 1))
    assert all("escapes" in b.reason for b in result.skipped)
    assert not files_containing(out, KEY) and not files_containing(out, b"root:x:0:0")
    assert (out / "pairs.skipped.jsonl").read_text().count("\n") == len(paths)
    with pytest.raises(PairforgeError, match="row 1"):
        export(data, "swift", tmp_path / "sw", on_error="fail", console=QUIET)


def test_cli_publish_and_export_say_one_line(tmp_path, outside):
    data = parquet_pointing_at(tmp_path / "set", ["/etc/passwd"])
    runner = CliRunner()
    r = runner.invoke(app, ["publish", str(data), "--repo-id", "me/x", "--dry-run"])
    assert r.exit_code != 0 and isinstance(r.exception, PairforgeError)
    assert "'/etc/passwd' escapes the image root" in str(r.exception)


def test_train_refuses_to_read_outside_the_set(tmp_path, outside):
    data = parquet_pointing_at(tmp_path / "set", [None, str(outside / "holiday.png")])
    with pytest.raises(PairforgeError, match="row 1.*escapes"):
        load_pairs(data)
    ok = parquet_pointing_at(tmp_path / "ok", [None, None])
    assert len(load_pairs(ok)) == 2


def test_embedded_bytes_that_are_no_image_get_a_stable_reason(tmp_path):
    guard = safety.ImageGuard(tmp_path)
    reasons = set()
    for _ in range(2):
        with pytest.raises(Exception) as e:
            guard({"bytes": b"not an image at all", "path": None})
        reasons.add(e.value.reason)
    assert len(reasons) == 1 and "0x" not in reasons.pop()
    (tmp_path / "a.png").write_bytes(b"not an image either")
    with pytest.raises(Exception) as e:
        guard("a.png")
    assert "cannot be decoded" in e.value.reason and "0x" not in e.value.reason
