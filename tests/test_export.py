"""`pairforge export`: LLaMA-Factory and ms-swift files read back with the project's own loaders
(`read_pairs(..., format=...)`) equal the original rows: messages, answers, image pixels, counts.
Hand-made rows (a `save_to_disk` folder, parquet) cover the shapes a format must carry; a real
build dir (`pairforge.engine.build`, VaPR on the offline world) covers what the engine writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pairforge.engine import build, load_build, load_config
from pairforge.cli import app
from pairforge.errors import BadInput
from pairforge.publish.export import (
    check_turns,
    export,
    llamafactory_record,
    swift_record,
)
from pairforge.schema import (
    assistant_message,
    image_part,
    make_pair,
    text_part,
    to_dataset,
    user_message,
)
from pairforge.sources import read_pairs


def image(i: int, size=(9, 7)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def pixels(value) -> np.ndarray:
    data = value["bytes"] if isinstance(value, dict) else value
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if isinstance(data, bytes) \
        else np.asarray(value.convert("RGB"))


def rows() -> list[dict]:
    """Shapes the formats must carry: one image, two images around text, no image, a system
    turn, a multi-turn prompt, a JPEG, and an image shared by two pairs."""
    shared = image(0)
    jpeg = io.BytesIO()
    image(5, (16, 16)).save(jpeg, format="JPEG", quality=90)
    out = [
        make_pair(prompt="What colour is the square?", chosen="The square is red.",
                  rejected="The square is blue.", images=[shared]),
        make_pair(prompt="Is the circle above the star?", chosen="Yes, the circle is above it.",
                  rejected="No, the circle is below it.", images=[shared]),
        make_pair(prompt=[{"role": "user", "content": [
                      image_part(), text_part("Left picture."), image_part(),
                      text_part("Which has more shapes?")]}],
                  chosen="The first picture has more shapes.",
                  rejected="The second picture has more shapes.", images=[image(1), image(2)]),
        make_pair(prompt="Say hello without looking at anything.", chosen="Hello!",
                  rejected="Goodbye."),
        make_pair(prompt=[{"role": "system", "content": [text_part("You describe carefully.")]},
                          user_message("How many triangles are there?")],
                  chosen="There are two triangles.", rejected="There are three triangles.",
                  images=[image(3)]),
        make_pair(prompt=[user_message("What is in the picture?"),
                          assistant_message("A few shapes."),
                          user_message("Which one is largest?", n_images=0)],
                  chosen="The green circle is the largest.",
                  rejected="The red square is the largest.", images=[image(4)]),
        # as encoded bytes: datasets would re-encode a PIL JPEG (lossy) when storing it
        make_pair(prompt="Name the shape.", chosen="It is a hexagon.", rejected="It is a star.",
                  images=[{"bytes": jpeg.getvalue(), "path": None}]),
    ]
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("set") / "pairs"
    to_dataset(rows()).save_to_disk(str(folder))
    return folder


def _image_tags(texts) -> int:
    return sum(t.count("<image>") for t in texts)


@pytest.mark.parametrize("fmt, data_key", [("llamafactory", "conversations"),
                                           ("swift", "messages")])
def test_round_trip_through_the_projects_loaders(saved, tmp_path, fmt, data_key):
    out = tmp_path / fmt
    result = export(saved, fmt, out)
    original = rows()
    assert result.n_rows == len(original) and not result.skipped
    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    for rec, row in zip(lines, original):
        turns = rec[data_key]
        texts = [t["value"] if fmt == "llamafactory" else t["content"] for t in turns]
        assert _image_tags(texts) == len(rec["images"]) == len(row["images"])
        # default paths: relative to OUT for LLaMA-Factory (its dataset_dir), absolute for
        # ms-swift (which resolves relative paths against its working directory)
        assert all(Path(p).is_absolute() == (fmt == "swift") and (out / p).is_file()
                   for p in rec["images"])
    back = list(read_pairs(out / "pairs.jsonl", format=fmt, on_error="fail"))
    assert len(back) == len(original)
    for got, want in zip(back, original):
        assert got["prompt"] == want["prompt"]
        assert got["chosen"] == want["chosen"] and got["rejected"] == want["rejected"]
        assert len(got["images"]) == len(want["images"])
        for g, w in zip(got["images"], want["images"]):
            assert np.array_equal(pixels(g), pixels(w))


def test_images_are_written_once_by_content(saved, tmp_path):
    out = tmp_path / "lf"
    result = export(saved, "llamafactory", out)
    files = sorted((out / "images").iterdir())
    # 7 image references, 6 distinct images (one shared by the first two pairs)
    assert result.n_image_refs == 7 and result.n_image_files == len(files) == 6
    assert sorted(f.suffix for f in files) == [".jpg"] + [".png"] * 5
    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert lines[0]["images"] == lines[1]["images"]
    jpeg = next(f for f in files if f.suffix == ".jpg")
    assert Image.open(jpeg).format == "JPEG"  # bytes kept as they are, not re-encoded
    before = {f.name: f.stat().st_mtime_ns for f in files}
    export(saved, "llamafactory", out)  # again into the same folder: nothing rewritten
    assert {f.name: f.stat().st_mtime_ns for f in (out / "images").iterdir()} == before


def test_dataset_info_entry_is_merged(saved, tmp_path):
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}))
    export(saved, "llamafactory", out, name="shapes_vapr")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["other"] == {"file_name": "o.json"}
    entry = info["shapes_vapr"]
    assert entry["file_name"] == "shapes_vapr.jsonl" and (out / entry["file_name"]).is_file()
    assert entry["ranking"] is True and entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "conversations", "chosen": "chosen",
                                "rejected": "rejected", "images": "images"}
    assert entry["tags"]["user_tag"] == "human" and entry["tags"]["assistant_tag"] == "gpt"


def test_rows_a_format_cannot_hold_are_skipped_and_recorded(tmp_path):
    bad = make_pair(prompt="Explain the <image> tag.", chosen="It marks an image.",
                    rejected="It marks a video.")
    good = make_pair(prompt="What shape?", chosen="A circle.", rejected="A square.",
                     images=[image(9)])
    path = tmp_path / "set.parquet"
    to_dataset([good, bad]).to_parquet(str(path))
    result = export(path, "swift", tmp_path / "out")
    assert result.n_rows == 1 and len(result.skipped) == 1
    skipped = (tmp_path / "out" / "set.skipped.jsonl").read_text().splitlines()
    (rec,) = [json.loads(x) for x in skipped]
    assert rec["id"] == bad["id"] and rec["row"] == 1 and rec["field"] == "prompt"
    assert "<image>" in rec["reason"]
    with pytest.raises(BadInput, match=r"row 1, field 'prompt'"):
        export(path, "swift", tmp_path / "out2", on_error="fail")


def test_check_turns():
    u, a, s = ({"role": r, "content": []} for r in ("user", "assistant", "system"))
    check_turns([u])
    check_turns([s, u, a, u])
    for bad in ([], [a], [u, u], [u, a], [s], [u, s, u]):
        with pytest.raises(BadInput, match="do not alternate"):
            check_turns(bad)


def test_records_place_one_tag_per_image_part():
    row = make_pair(prompt=[{"role": "user", "content": [text_part("A"), image_part(),
                                                         text_part("B")]}],
                    chosen="yes", rejected="no", images=[image(1)])
    lf = llamafactory_record(row, ["images/x.png"])
    # tags go in place with nothing added around them; adjacent text parts get a newline
    assert lf["conversations"] == [{"from": "human", "value": "A<image>B"}]
    two = make_pair(prompt=[{"role": "user", "content": [text_part("A"), text_part("B"),
                                                         image_part()]}],
                    chosen="yes", rejected="no", images=[image(1)])
    assert llamafactory_record(two, ["x.png"])["conversations"][0]["value"] == "A\nB<image>"
    assert lf["chosen"] == {"from": "gpt", "value": "yes"}
    sw = swift_record(row, ["images/x.png"])
    assert sw["messages"][-1] == {"role": "assistant", "content": "yes"}
    assert sw["rejected_response"] == "no" and sw["images"] == ["images/x.png"]


def test_cli_export(saved, tmp_path):
    res = CliRunner().invoke(app, ["export", str(saved), "--to", "swift", "--out",
                                   str(tmp_path / "sw"), "--name", "my set"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sw" / "my_set.jsonl").is_file()
    assert len(list(read_pairs(tmp_path / "sw" / "my_set.jsonl", format="swift"))) == 7


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A build dir made by the engine: VaPR (rule editor) on 12 world examples."""
    from rich.console import Console

    out = tmp_path_factory.mktemp("build") / "vapr-12"
    build(load_config(recipe="vapr", source="shapes:train?n=12", out=out), progress=False,
          console=Console(file=io.StringIO()))
    return out


@pytest.mark.parametrize("fmt", ["llamafactory", "swift"])
def test_a_build_dir_exports_and_reads_back(built, tmp_path, fmt):
    original = load_build(built)
    result = export(built, fmt, tmp_path / fmt)
    n = json.loads((built / "summary.json").read_text())["counts"]["pairs"]
    assert result.n_rows == len(original) == n > 0 and not result.skipped
    assert result.data_file == tmp_path / fmt / "vapr-12.jsonl"  # named after the build dir
    # what the formats do not carry is reported, not dropped silently
    assert {"edit_original", "edit_replacement", "lev_words"} <= set(result.not_carried)
    back = list(read_pairs(result.data_file, format=fmt, on_error="fail"))
    assert len(back) == len(original)
    for got, want in zip(back, original):
        assert got["prompt"] == want["prompt"]
        assert got["chosen"] == want["chosen"] and got["rejected"] == want["rejected"]
        (g,), (w,) = got["images"], want["images"]
        assert np.array_equal(pixels(g), pixels(w))
