"""Loaders of existing preference sets: every format × container that matters, detection,
bad rows named by field, image-root confinement, laziness, and round trips."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from pairforge.errors import BadInput, PairforgeError
from pairforge.schema import (
    count_image_parts,
    make_pair,
    prompt_text,
    response_text,
    stable_id,
    to_dataset,
)
from pairforge.sources import FORMATS, containers, detect_format, read_pairs
from pairforge.sources.images import ImageResolver


def _png(color=(255, 0, 0), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


RED, BLUE = _png((255, 0, 0)), _png((0, 0, 255))


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _images(folder: Path, **files: bytes) -> None:
    for name, data in files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _parts(message: dict) -> list:
    return [p["type"] if p["type"] == "image" else p["text"] for p in message["content"]]


def _fields(stream) -> list[tuple[int, str | None]]:
    return [(b.row, b.field) for b in stream.skipped]


# ----------------------------------------------------------------------------- formats


def test_trl_standard_jsonl_placeholders_become_parts_in_order(tmp_path):
    _images(tmp_path, **{"img/a.png": RED, "img/b.png": BLUE})
    f = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Compare <image> with\n<image>  please.", "chosen": "Red, blue.",
         "rejected": "Blue, red.", "images": ["img/a.png", "img/b.png"]},
        {"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.",
         "images": ["img/a.png", "img/b.png"]},
    ])
    stream = read_pairs(f)
    assert (stream.name, stream.format) == ("pairs", "trl")
    rows = list(stream)
    # the text between tags is kept exactly (an export writes it back unchanged)
    assert _parts(rows[0]["prompt"][0]) == ["Compare ", "image", " with\n", "image", "  please."]
    assert [i["bytes"] for i in rows[0]["images"]] == [RED, BLUE]
    assert rows[0]["images"][0]["path"] == "img/a.png"
    # no placeholder but two images: the images go first
    assert _parts(rows[1]["prompt"][0]) == ["image", "image", "What colour?"]
    assert response_text(rows[1]["chosen"]) == "Red."
    assert response_text(rows[1]["rejected"]) == "Blue."
    assert rows[1]["source_dataset"] == "pairs" and rows[1]["source_id"] == "1"
    expected = make_pair(prompt=rows[1]["prompt"], chosen="Red.", rejected="Blue.",
                         images=rows[1]["images"], source_dataset="pairs", source_id=1)
    assert rows[1]["id"] == expected["id"]
    assert stream.n_read == 2 and stream.skipped == []


def test_trl_conversational_with_single_image_and_images_first(tmp_path):
    _images(tmp_path, **{"a.png": RED})
    user_parts = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    f = _jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": user_parts}],
         "chosen": [{"role": "assistant", "content": "A square."}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
         "image": "a.png"},
        {"prompt": [{"role": "user", "content": "Describe."}],
         "chosen": [{"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "assistant", "content": "Blue."}], "image": "a.png"},
    ])
    rows = list(read_pairs(f))
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert _parts(rows[0]["prompt"][1]) == ["image", "What is it?"]
    assert response_text(rows[0]["rejected"]) == "A cat."
    assert _parts(rows[1]["prompt"][0]) == ["image", "Describe."]
    assert rows[1]["images"][0]["bytes"] == RED


def test_rlaifv_parquet_with_hf_image_structs_and_provenance(tmp_path):
    feats = Features({"ds_name": Value("string"), "image": Image(), "question": Value("string"),
                      "chosen": Value("string"), "rejected": Value("string"),
                      "origin_dataset": Value("string"), "origin_split": Value("string"),
                      "idx": Value("string"), "image_path": Value("string")})
    Dataset.from_dict({
        "ds_name": ["RLAIF-V"], "image": [{"bytes": RED, "path": "coco/1.png"}],
        "question": ["What is on the table?"], "chosen": ["A red cup."], "rejected": ["A dog."],
        "origin_dataset": ["COCO"], "origin_split": ["train"], "idx": ["42"],
        "image_path": ["coco/1.png"]}, features=feats).to_parquet(tmp_path / "rlaifv.parquet")
    stream = read_pairs(tmp_path / "rlaifv.parquet")
    (row,) = list(stream)
    assert stream.format == "rlaif-v" and stream.total == 1
    assert _parts(row["prompt"][0]) == ["image", "What is on the table?"]
    assert row["images"] == [{"bytes": RED, "path": "coco/1.png"}]
    assert row["source_id"] == "42"
    assert {m["key"]: m["value"] for m in row["source_meta"]} == {
        "ds_name": "RLAIF-V", "origin_dataset": "COCO", "origin_split": "train", "idx": "42",
        "image_path": "coco/1.png"}


def test_llava_json_preference_multiturn_and_data_wrapper(tmp_path):
    _images(tmp_path, **{"coco/1.png": RED})
    conv = [{"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cup."},
            {"from": "human", "value": "Which colour?"}]
    records = [
        {"id": "q1", "image": "coco/1.png", "conversations": conv,
         "output_1": {"from": "llava", "value": "Red."}, "output_2": "Blue.", "preference": 1},
        {"id": "q2", "image": "coco/1.png", "conversations": conv,
         "output_1": "Red.", "output_2": {"from": "llava", "value": "Blue."}, "preference": 2},
        {"id": "q3", "image": ["coco/1.png"], "conversations": conv,
         "output_1": "Red.", "output_2": "Blue.", "preference": "output_1"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps({"info": {"n": [1, 2]}, "data": records}))
    stream = read_pairs(tmp_path / "llava.json")
    rows = list(stream)
    assert stream.format == "llava" and len(rows) == 3
    prompt = rows[0]["prompt"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert _parts(prompt[0]) == ["image", "\nWhat is it?"] and prompt_text(prompt) == "Which colour?"
    assert [response_text(r["chosen"]) for r in rows] == ["Red.", "Blue.", "Red."]
    assert [response_text(r["rejected"]) for r in rows] == ["Blue.", "Red.", "Blue."]
    # a record id keeps ids unique across sets
    assert rows[0]["id"] == stable_id("llava", "q1") and rows[0]["source_id"] == "q1"


def test_llava_chosen_rejected_variant_is_detected(tmp_path):
    _images(tmp_path, **{"x.png": RED})
    (tmp_path / "vlf.json").write_text(json.dumps([
        {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}],
         "chosen": "Yes.", "rejected": "No."}]))
    stream = read_pairs(tmp_path / "vlf.json")
    assert stream.format == "llava"
    assert response_text(next(iter(stream))["chosen"]) == "Yes."


def test_llamafactory_json_with_system_and_images(tmp_path):
    _images(tmp_path, **{"a.png": RED, "b.png": BLUE})
    (tmp_path / "lf.json").write_text(json.dumps([{
        "conversations": [{"from": "human", "value": "<image><image>Which is red?"}],
        "chosen": {"from": "gpt", "value": "The first."},
        "rejected": {"from": "gpt", "value": "The second."},
        "images": ["a.png", "b.png"], "system": "You see images."}]))
    stream = read_pairs(tmp_path / "lf.json")
    (row,) = list(stream)
    assert stream.format == "llamafactory"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert _parts(row["prompt"][1]) == ["image", "image", "Which is red?"]
    assert [i["bytes"] for i in row["images"]] == [RED, BLUE]


def test_swift_jsonl_last_assistant_is_chosen(tmp_path):
    _images(tmp_path, **{"a.png": RED, "b.png": BLUE})
    f = _jsonl(tmp_path / "swift.jsonl", [{
        "messages": [{"role": "system", "content": "Be exact."},
                     {"role": "user", "content": "<image>Colour?"},
                     {"role": "assistant", "content": "Red."},
                     {"role": "user", "content": "And this one? <image>"},
                     {"role": "assistant", "content": "Blue."}],
        "rejected_response": "Green.", "images": [{"path": "a.png"}, "b.png"]}])
    stream = read_pairs(f)
    (row,) = list(stream)
    assert stream.format == "swift"
    assert [m["role"] for m in row["prompt"]] == ["system", "user", "assistant", "user"]
    assert _parts(row["prompt"][3]) == ["And this one? ", "image"]
    assert response_text(row["chosen"]) == "Blue." and response_text(row["rejected"]) == "Green."
    assert [i["bytes"] for i in row["images"]] == [RED, BLUE]


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("keys, fmt", [
    (["messages", "rejected_response", "images"], "swift"),
    (["conversations", "output_1", "output_2", "preference", "image"], "llava"),
    (["conversations", "chosen", "rejected", "image"], "llava"),
    (["conversations", "chosen", "rejected", "images"], "llamafactory"),
    (["conversations", "chosen", "rejected"], "llamafactory"),
    (["question", "chosen", "rejected", "image", "idx"], "rlaif-v"),
    (["prompt", "chosen", "rejected", "images"], "trl"),
    (["prompt", "chosen", "rejected"], "trl"),
])
def test_detect_format_by_keys(keys, fmt):
    assert detect_format(dict.fromkeys(keys)) == fmt


def test_detect_canonical_and_unknown_keys(tmp_path):
    row = make_pair(prompt="Q", chosen="a", rejected="b")
    assert detect_format(row) == "canonical"
    f = _jsonl(tmp_path / "odd.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(PairforgeError) as e:
        read_pairs(f)
    msg = str(e.value)
    assert "odd.jsonl" in msg and "'instruction'" in msg and "--format" in msg
    assert all(name in msg for name in FORMATS) and "\n" not in msg
    assert detect_format(_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "a",
                                                        "rejected": "b"}])) == "trl"


def test_format_override_beats_detection(tmp_path):
    f = _jsonl(tmp_path / "both.jsonl", [
        {"question": "from question", "prompt": "from prompt", "chosen": "a", "rejected": "b"}])
    assert read_pairs(f).format == "rlaif-v"  # detection: question first
    # rlaif-v requires an image, trl does not
    assert [b.field for b in _drain(read_pairs(f)).skipped] == ["image"]
    (row,) = list(read_pairs(f, format="trl"))
    assert prompt_text(row["prompt"]) == "from prompt"
    with pytest.raises(PairforgeError, match="unknown format 'sharegpt'"):
        read_pairs(f, format="sharegpt")


def _drain(stream):
    for _ in stream:
        pass
    return stream


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_are_skipped_and_name_row_and_field(tmp_path):
    _images(tmp_path, **{"a.png": RED})
    good = {"prompt": "<image>Q", "chosen": "a", "rejected": "b", "images": ["a.png"]}
    lines = [
        json.dumps(good),                                           # 0 ok
        json.dumps({**good, "chosen": None}),                       # 1 None
        json.dumps({k: v for k, v in good.items() if k != "rejected"}),  # 2 missing
        json.dumps({**good, "chosen": "   "}),                      # 3 empty
        json.dumps({**good, "rejected": 7}),                        # 4 wrong type
        json.dumps({**good, "prompt": "<image><image>Q"}),          # 5 2 placeholders, 1 image
        '{"prompt": "Q", "chosen": "a",',                           # 6 broken JSON line
        json.dumps({**good, "images": "a.png"}),                    # 7 images not a list
        json.dumps({**good, "prompt": 3}),                          # 8 prompt wrong type
        json.dumps([1, 2]),                                         # 9 not an object
        "",                                                         # blank line: not a row
        json.dumps(good),                                           # 11 ok
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    stream = read_pairs(tmp_path / "bad.jsonl")
    rows = list(stream)
    assert len(rows) == 2
    assert _fields(stream) == [(1, "chosen"), (2, "rejected"), (3, "chosen"), (4, "rejected"),
                               (5, "images"), (6, None), (7, "images"), (8, "prompt"),
                               (9, None)]
    assert stream.n_read == 11 == len(rows) + len(stream.skipped)
    by_row = {b.row: b for b in stream.skipped}
    assert "2 image placeholder(s)" in by_row[5].reason and "1 image(s)" in by_row[5].reason
    assert "broken JSON line" in by_row[6].reason
    assert all(b.where.endswith("bad.jsonl") for b in stream.skipped)
    assert by_row[1].to_record() == {"where": str(tmp_path / "bad.jsonl"), "row": 1,
                                     "field": "chosen", "reason": "is None"}
    assert "skipped 9" in stream.summary()


@pytest.mark.parametrize("record, field", [
    ({"output_1": "a", "output_2": "b", "preference": 3}, "preference"),
    ({"output_1": "a", "output_2": "b", "preference": True}, "preference"),
    ({"output_1": "a", "output_2": "b"}, "preference"),
    ({"output_1": "a", "output_2": {"from": "gpt"}, "preference": 1}, "output_2"),
    ({"output_1": "a", "output_2": "b", "preference": 1,
      "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "conversations"),
    ({"output_1": "a", "output_2": "b", "preference": 1,
      "conversations": [{"from": "robot", "value": "Q"}]}, "conversations"),
])
def test_llava_bad_records(tmp_path, record, field):
    rec = {"conversations": [{"from": "human", "value": "Q"}], **record}
    (tmp_path / "l.json").write_text(json.dumps([rec]))
    stream = _drain(read_pairs(tmp_path / "l.json", format="llava"))
    assert _fields(stream) == [(0, field)]


def test_swift_last_message_must_be_assistant(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "Q"}],
                                       "rejected_response": "b"}])
    assert _fields(_drain(read_pairs(f))) == [(0, "messages")]


def test_on_error_fail_raises_the_first_bad_row(tmp_path):
    f = _jsonl(tmp_path / "f.jsonl", [
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
        {"prompt": "Q", "chosen": "", "rejected": "b"},
        {"prompt": "Q", "chosen": "a", "rejected": None},
    ])
    stream = read_pairs(f, on_error="fail")
    it = iter(stream)
    assert response_text(next(it)["chosen"]) == "a"
    with pytest.raises(BadInput) as e:
        next(it)
    assert (e.value.row, e.value.field) == (1, "chosen") and "f.jsonl" in str(e.value)


# ----------------------------------------------------------------------------- images


def _one_image_set(tmp_path: Path, image: str) -> Path:
    root = tmp_path / "set"
    root.mkdir(exist_ok=True)
    return _jsonl(root / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b",
                                      "images": [image]}])


@pytest.mark.parametrize("load_images", [True, False])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_paths_may_not_escape_the_root(tmp_path, how, load_images):
    (tmp_path / "outside.png").write_bytes(RED)
    if how == "symlink":
        (tmp_path / "set").mkdir()
        os.symlink(tmp_path / "outside.png", tmp_path / "set" / "link.png")
    image = {"dotdot": "../outside.png", "absolute": str(tmp_path / "outside.png"),
             "symlink": "link.png"}[how]
    stream = _drain(read_pairs(_one_image_set(tmp_path, image), load_images=load_images))
    assert _fields(stream) == [(0, "images")]
    assert "escapes the image root" in stream.skipped[0].reason
    assert "--image-root" in stream.skipped[0].reason
    if how != "absolute":
        return
    # the same row is fine once the root contains the image
    (row,) = list(read_pairs(_one_image_set(tmp_path, image), image_root=tmp_path,
                             load_images=load_images))
    assert row["images"][0]["bytes"] == (RED if load_images else None)


def test_absolute_path_inside_root_and_symlink_inside_are_fine(tmp_path):
    (tmp_path / "set").mkdir()
    _images(tmp_path / "set", **{"real.png": RED})
    os.symlink(tmp_path / "set" / "real.png", tmp_path / "set" / "alias.png")
    for image in (str(tmp_path / "set" / "real.png"), "alias.png", "sub/../real.png"):
        (row,) = list(read_pairs(_one_image_set(tmp_path, image)))
        assert row["images"] == [{"bytes": RED, "path": "real.png"}]


def test_missing_and_empty_image_files_are_bad_rows(tmp_path):
    root = tmp_path / "set"
    _images(root, **{"empty.png": b"", "ok.png": RED})
    f = _jsonl(root / "p.jsonl", [
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["nope.png"]},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["empty.png"]},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": [None]},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": [{"bytes": None, "path": None}]},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["ok.png"]},
    ])
    stream = read_pairs(f)
    assert len(list(stream)) == 1
    assert _fields(stream) == [(0, "images"), (1, "images"), (2, "images"), (3, "images")]
    reasons = [b.reason for b in stream.skipped]
    assert "not found" in reasons[0] and "0 bytes" in reasons[1] and "None" in reasons[2]


def test_image_values_pil_bytes_and_structs():
    pil = PILImage.open(io.BytesIO(RED))
    loaded = ImageResolver(None, load=True)([pil, BLUE, {"bytes": RED, "path": "r.png"}])
    assert PILImage.open(io.BytesIO(loaded[0]["bytes"])).getpixel((0, 0)) == (255, 0, 0)
    assert [i["bytes"] for i in loaded[1:]] == [BLUE, RED] and loaded[2]["path"] == "r.png"
    placeholders = ImageResolver(None, load=False)([pil, BLUE, {"bytes": RED, "path": "r.png"}])
    assert [i["bytes"] for i in placeholders] == [None, None, None]
    with pytest.raises(BadInput, match="image 1 has 0 bytes"):
        ImageResolver(None, load=True)([RED, b""])
    with pytest.raises(BadInput, match="no folder to be resolved against"):
        ImageResolver(None, load=True)(["a.png"])


def test_load_images_false_opens_no_image_file(tmp_path, monkeypatch):
    f = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "<image> and <image>", "chosen": "a", "rejected": "b",
         "images": ["absent1.png", "sub/absent2.png"]},
        {"prompt": "<image>", "chosen": "a", "rejected": "b", "images": ["x.png", "y.png"]},
    ])

    def no_reading(*a, **k):
        raise AssertionError("an image file was read")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    monkeypatch.setattr(PILImage, "open", no_reading)
    stream = read_pairs(f, load_images=False)
    rows = list(stream)
    assert len(rows) == 1 and count_image_parts(rows[0]["prompt"]) == 2
    assert rows[0]["images"] == [{"bytes": None, "path": "absent1.png"},
                                 {"bytes": None, "path": "sub/absent2.png"}]
    assert _fields(stream) == [(1, "images")]  # counts are still checked
    monkeypatch.undo()
    with pytest.raises(BadInput, match="not found"):  # with loading, the absent file is caught
        list(read_pairs(f, on_error="fail"))


def test_load_images_false_does_not_read_parquet_image_bytes(tmp_path, monkeypatch):
    feats = Features({"question": Value("string"), "chosen": Value("string"),
                      "rejected": Value("string"), "image": Image()})
    Dataset.from_dict({"question": ["Q"], "chosen": ["a"], "rejected": ["b"],
                       "image": [{"bytes": RED, "path": "r.png"}]},
                      features=feats).to_parquet(tmp_path / "r.parquet")
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        seen.append(k.get("columns"))
        return real(self, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    (row,) = list(read_pairs(tmp_path / "r.parquet", load_images=False))
    assert row["images"] == [{"bytes": None, "path": "r.png"}]
    assert "image.bytes" not in seen[0] and "image.path" in seen[0]


# ----------------------------------------------------------------------------- containers


def test_parquet_streams_by_row_group(tmp_path, monkeypatch):
    n = 2000
    table = pa.table({"prompt": [f"q{i}" for i in range(n)], "chosen": ["a"] * n,
                      "rejected": ["b"] * n})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100)
    pulled = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **k):
        for batch in real(self, *a, **k):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole file read"))
    stream = read_pairs(tmp_path / "big.parquet")
    assert stream.total == n
    first = next(iter(stream))
    assert prompt_text(first["prompt"]) == "q0"
    assert sum(pulled) <= containers.BATCH_ROWS < n  # only the first batch was read
    pulled.clear()
    assert sum(1 for _ in stream) == n and sum(pulled) == n  # a fresh pass reads all


def test_json_list_is_decoded_incrementally(tmp_path, monkeypatch):
    monkeypatch.setattr(containers, "JSON_CHUNK", 7)  # values straddle many chunk edges
    recs = [{"prompt": f"[q{i}] {{x}}, \"y\"", "chosen": "a" * (i + 1), "rejected": "b",
             "id": 10 ** i} for i in range(30)]
    (tmp_path / "l.json").write_text(json.dumps(recs, indent=1))
    rows = list(read_pairs(tmp_path / "l.json"))
    assert [prompt_text(r["prompt"]) for r in rows] == [r["prompt"] for r in recs]
    assert [r["source_id"] for r in rows] == [str(10 ** i) for i in range(30)]


def test_corrupt_parquet_row_group_is_file_level_after_the_good_rows(tmp_path):
    n = 1000
    pq.write_table(pa.table({"prompt": [f"q{i}" * 20 for i in range(n)], "chosen": ["a"] * n,
                             "rejected": ["b"] * n}), tmp_path / "c.parquet", row_group_size=500)
    offset = pq.ParquetFile(tmp_path / "c.parquet").metadata.row_group(1).column(0).data_page_offset
    data = bytearray((tmp_path / "c.parquet").read_bytes())
    data[offset:offset + 40] = b"\xff" * 40  # smash the second row group's first page header
    (tmp_path / "c.parquet").write_bytes(bytes(data))
    stream = read_pairs(tmp_path / "c.parquet")
    kept = []
    with pytest.raises(PairforgeError, match=r"c.parquet: cannot read past row \d+") as e:
        for row in stream:
            kept.append(prompt_text(row["prompt"]))
    assert 0 < len(kept) <= 500 and kept[0] == "q0" * 20
    assert "\n" not in str(e.value) and not isinstance(e.value, BadInput)


@pytest.mark.parametrize("text, match", [
    ('[{"prompt": "q", "chosen": "a", "rejected": "b"} {"x": 1}]', "expected ',' or ']'"),
    ('{"meta": 1}', "no 'data' list"),
    ('"just a string"', "expected '\\['"),
])
def test_broken_json_file_is_file_level(tmp_path, text, match):
    (tmp_path / "b.json").write_text(text)
    with pytest.raises(PairforgeError, match=match) as e:
        list(read_pairs(tmp_path / "b.json", format="trl", on_error="skip"))
    assert "b.json" in str(e.value)


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.jsonl", "no such file"),
    (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", "unsupported file type"),
    (lambda d: (d / "c.parquet").write_bytes(b"PAR1 not really") and d / "c.parquet",
     "not a readable parquet file"),
    (lambda d: (d / "e.jsonl").write_text("\n\n") and d / "e.jsonl", "empty"),
    (lambda d: (d / "e.json").write_text("[]") and d / "e.json", "empty"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "cannot load this dataset folder"),
])
def test_file_level_problems_raise_one_line(tmp_path, make, match):
    with pytest.raises(PairforgeError, match=match) as e:
        read_pairs(make(tmp_path), on_error="skip")
    assert "\n" not in str(e.value) and not isinstance(e.value, BadInput)


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(PairforgeError) as e:
        read_pairs("someorg/some-prefs")
    msg = str(e.value)
    assert msg.startswith("someorg/some-prefs: cannot load this dataset from the Hub")
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg


def _canonical_rows(tmp_path: Path) -> list[dict]:
    return [
        make_pair(prompt="What colour?", chosen="Red.", rejected="Blue.",
                  images=[{"bytes": RED, "path": "r.png"}], source_dataset="mine", source_id=0),
        make_pair(prompt=[{"role": "user", "content": [
                      {"type": "text", "text": "Left"}, {"type": "image"},
                      {"type": "text", "text": "right"}, {"type": "image"}]}],
                  chosen="Same.", rejected="Different.",
                  images=[{"bytes": BLUE, "path": "b.png"}, {"bytes": RED, "path": "r.png"}],
                  source_dataset="mine", source_id=1),
    ]


def _same(rows_in: list[dict], rows_out: list[dict]) -> None:
    assert len(rows_in) == len(rows_out)
    for a, b in zip(rows_in, rows_out, strict=True):
        assert a["id"] == b["id"]
        assert a["prompt"] == b["prompt"] and a["chosen"] == b["chosen"]
        assert a["rejected"] == b["rejected"]
        assert [i["bytes"] for i in a["images"]] == [i["bytes"] for i in b["images"]]


def test_round_trip_save_to_disk(tmp_path):
    rows = _canonical_rows(tmp_path)
    to_dataset(rows).save_to_disk(str(tmp_path / "saved"))
    stream = read_pairs(tmp_path / "saved")
    assert (stream.format, stream.name, stream.total) == ("canonical", "saved", 2)
    _same(rows, list(stream))
    placeholders = list(read_pairs(tmp_path / "saved", load_images=False))
    assert [i["bytes"] for i in placeholders[1]["images"]] == [None, None]
    assert [i["path"] for i in placeholders[1]["images"]] == ["b.png", "r.png"]


def test_hub_layout_folder_loads_with_split_choice(tmp_path):
    rows = _canonical_rows(tmp_path)
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    to_dataset(rows).to_parquet(data / "train-00000-of-00001.parquet")
    to_dataset(rows[:1]).to_parquet(data / "test-00000-of-00001.parquet")
    stream = read_pairs(tmp_path / "repo")
    assert (stream.format, stream.name) == ("canonical", "repo")
    _same(rows, list(stream))
    _same(rows[:1], list(read_pairs(tmp_path / "repo", split="test")))
    placeholders = list(read_pairs(tmp_path / "repo", load_images=False))
    assert [[i["bytes"] for i in r["images"]] for r in placeholders] == [[None], [None, None]]
    with pytest.raises(PairforgeError, match=r"no split 'dev'.*\['test', 'train'\]"):
        read_pairs(tmp_path / "repo", split="dev")


def test_hub_layout_folder_with_readme_configs(tmp_path):
    repo = tmp_path / "repo"
    _images(repo, **{"img/a.png": RED})
    (repo / "prefs").mkdir()
    _jsonl(repo / "prefs" / "all.jsonl",
           [{"prompt": "<image>Q", "chosen": "a", "rejected": "b", "images": ["img/a.png"]}])
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: eval\n    path: prefs/*.jsonl\n---\n# prefs\n")
    stream = read_pairs(repo)  # the only split, although not 'train'
    (row,) = list(stream)
    assert stream.format == "trl" and row["images"] == [{"bytes": RED, "path": "img/a.png"}]


def test_save_to_disk_dataset_dict_without_train_needs_split(tmp_path):
    rows = _canonical_rows(tmp_path)
    datasets.DatasetDict({"a": to_dataset(rows), "b": to_dataset(rows[:1])}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(PairforgeError, match="pass --split"):
        read_pairs(tmp_path / "dd")
    assert len(list(read_pairs(tmp_path / "dd", split="b"))) == 1


def test_trl_dataset_with_list_of_images_feature_round_trips(tmp_path):
    feats = Features({"prompt": Value("string"), "chosen": Value("string"),
                      "rejected": Value("string"), "images": List(Image())})
    Dataset.from_dict({"prompt": ["<image> vs <image>"], "chosen": ["a"], "rejected": ["b"],
                       "images": [[{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}]]},
                      features=feats).save_to_disk(str(tmp_path / "trl"))
    (row,) = list(read_pairs(tmp_path / "trl"))
    assert [i["bytes"] for i in row["images"]] == [RED, BLUE]
    (row,) = list(read_pairs(tmp_path / "trl", load_images=False))
    assert [i["bytes"] for i in row["images"]] == [None, None]


def test_split_is_refused_for_a_single_file(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(PairforgeError, match="--split applies to dataset folders"):
        read_pairs(f, split="train")


def test_second_pass_resets_counters(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                      {"prompt": "Q", "chosen": "", "rejected": "b"}])
    stream = read_pairs(f)
    assert len(list(stream)) == 1 and len(list(stream)) == 1
    assert stream.n_read == 2 and len(stream.skipped) == 1
