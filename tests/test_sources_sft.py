"""SFT example sources: the offline world, LLaVA JSON/JSONL (multi-turn split per turn), rows
with messages + images (jsonl, parquet, save_to_disk), and one test per bad-input case, each
a `read` reject with a one-line reason while reading goes on."""

from __future__ import annotations

import io
import json
from itertools import pairwise
from pathlib import Path

import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from pairforge.errors import PairforgeError
from pairforge.recipes.base import Example
from pairforge.schema import MESSAGES, count_image_parts
from pairforge.sources.sft import (
    ReadReject,
    decode_image,
    parse_source,
    read_examples,
    reason_kind,
    source_bytes,
)


def png(color=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def llava(i: int, image: str | None = "img.png", q: str = "What colour is it?",
          a: str = "It is red.", **extra) -> dict:
    rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                            {"from": "gpt", "value": a}], **extra}
    if image is not None:
        rec["image"] = image
    return rec


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def items(spec, **kw) -> list:
    return list(read_examples(spec, **kw))


def only_reject(spec, **kw) -> ReadReject:
    got = items(spec, **kw)
    bad = [x for x in got if isinstance(x, ReadReject)]
    assert len(bad) == 1, got
    assert "\n" not in bad[0].reason and bad[0].stage == "read"
    return bad[0]


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "img.png").write_bytes(png())
    return tmp_path


# ----------------------------------------------------------------------------- the world


def test_world_examples_carry_ground_truth_and_task():
    stream = read_examples("shapes:validation?n=6&seed=2")
    got = list(stream)
    assert [x.id for x in got] == [f"shapes-validation-2-{i:07d}" for i in range(6)]
    ex = got[0]
    assert isinstance(ex, Example) and ex.task and ex.source_dataset == "shapes:validation"
    assert {"scene", "target", "answer_value", "answer_span_start", "filter_reason"} <= set(ex.meta)
    assert ex.answer[ex.meta["answer_span_start"]:ex.meta["answer_span_end"]] == ex.meta["answer_value"]
    assert ex.images[0].size == (112, 112) and count_image_parts(ex.prompt_messages) == 1
    assert stream.n_examples == 6 and stream.total == 6
    assert "6 examples read, 6 ok, 0 rejected" in stream.summary()


def test_world_spec_defaults_and_errors():
    assert str(parse_source("shapes")) == \
        "shapes:train?n=300&seed=0&width=112&height=112&filter_share=0.05"
    assert parse_source("shapes:test?n=500&seed=1").option("n") == 500
    assert read_examples("shapes").total == 300
    with pytest.raises(PairforgeError, match="no world split 'dev'"):
        parse_source("shapes:dev")
    with pytest.raises(PairforgeError, match="unknown option 'size'"):
        parse_source("shapes?size=3")
    with pytest.raises(PairforgeError, match="n='x' is not a int"):
        parse_source("shapes?n=x")


def test_entries_are_lazy_and_equal_to_loaded_ids():
    stream = read_examples("shapes?n=5")
    entries = list(stream.entries())  # no scene is rendered here
    assert [e.id for e in entries] == [e.load().id for e in entries]


# ----------------------------------------------------------------------------- LLaVA


def test_llava_json_multi_turn_becomes_one_example_per_turn(folder):
    rec = {"id": "conv", "image": "img.png", "source": "coco", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the box?"},
        {"from": "gpt", "value": "The box is red."},
        {"from": "human", "value": "How many boxes are there?"},
        {"from": "gpt", "value": "There is one box."}]}
    (folder / "data.json").write_text(json.dumps([rec, llava(1)]))
    got = items(folder / "data.json")
    assert [x.id for x in got] == ["conv#0", "conv#1", "r1"]
    first, second = got[0], got[1]
    assert first.question == "What colour is the box?" and first.answer == "The box is red."
    assert second.question == "How many boxes are there?" and second.answer == "There is one box."
    assert len(second.messages) == 4  # the first turn is context
    assert first.images[0] is second.images[0]  # decoded once per record
    assert second.source_id == "conv" and second.meta == {"source": "coco", "turn": 1}
    assert source_bytes(first.images[0]) == {"bytes": png(), "path": "img.png"}
    assert first.task is None


def test_llava_question_without_answer_is_a_reject_the_rest_goes_on(folder):
    rec = llava(0)
    rec["conversations"].append({"from": "human", "value": "And the shape?"})
    write_jsonl(folder / "d.jsonl", [rec])
    got = items(folder / "d.jsonl")
    assert isinstance(got[0], Example) and got[0].id == "r0#0"
    assert isinstance(got[1], ReadReject) and got[1].id == "r0#1"
    assert "turn 1 is a question with no answer" in got[1].reason


# ----------------------------------------------------------------------------- messages rows


def test_world_sft_dataset_saved_to_disk_reads_with_task_and_meta(tmp_path):
    from pairforge.world import sft_dataset

    sft_dataset(n_train=5, n_validation=1, n_test=3, seed=4, progress=False).save_to_disk(
        str(tmp_path / "sft"))
    train = items(tmp_path / "sft")
    world = items("shapes?n=5&seed=4")
    assert [x.id for x in train] == [x.id for x in world]
    assert [x.messages for x in train] == [x.messages for x in world]
    assert [x.task for x in train] == [x.task for x in world]
    assert train[0].meta["target"] == world[0].meta["target"]
    assert train[0].images[0].tobytes() == world[0].images[0].tobytes()
    assert len(items(f"{tmp_path / 'sft'}?split=test")) == 3


def test_messages_rows_from_parquet_and_jsonl(folder):
    feats = Features({"id": Value("string"), "messages": MESSAGES, "images": List(Image()),
                      "task": Value("string")})
    msgs = [{"role": "user", "content": [{"type": "image", "text": None},
                                         {"type": "text", "text": "Shape?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]}]
    Dataset.from_dict({"id": ["m0"], "messages": [msgs], "images": [[{"bytes": png(), "path": None}]],
                       "task": ["object"]}, features=feats).to_parquet(folder / "m.parquet")
    (ex,) = items(folder / "m.parquet")
    assert (ex.id, ex.task, ex.question, ex.answer) == ("m0", "object", "Shape?", "A circle.")
    write_jsonl(folder / "m.jsonl", [{"messages": [{"role": "user", "content": "<image>Shape?"},
                                                   {"role": "assistant", "content": "A box."}],
                                      "images": ["img.png"]}])
    (ex,) = items(folder / "m.jsonl")
    assert ex.id == "row-0" and ex.images[0].size == (8, 6) and ex.answer == "A box."


# ----------------------------------------------------------------------------- bad input


def test_corrupt_image_bytes(folder):
    (folder / "bad.png").write_bytes(b"this is not an image at all")
    write_jsonl(folder / "d.jsonl", [llava(0, "bad.png"), llava(1)])
    r = only_reject(folder / "d.jsonl")
    assert r.id == "r0" and "bad.png cannot be decoded" in r.reason and "row 0" in r.reason


def test_truncated_image(folder):
    data = png(size=(64, 64))
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    write_jsonl(folder / "d.jsonl", [llava(0), llava(1, "cut.png")])
    r = only_reject(folder / "d.jsonl")
    assert r.id == "r1" and "cut.png cannot be decoded" in r.reason and "truncated" in r.reason


def test_missing_image_file(folder):
    write_jsonl(folder / "d.jsonl", [llava(0, "nope.png"), llava(1)])
    r = only_reject(folder / "d.jsonl")
    assert "image file 'nope.png' not found" in r.reason and "field 'images'" in r.reason


def test_image_path_outside_the_source_root(folder):
    (folder / "root").mkdir()
    (folder / "root" / "ok.png").write_bytes(png())
    (folder / "root" / "link.png").symlink_to(folder / "img.png")  # inside by name only
    write_jsonl(folder / "root" / "d.jsonl", [llava(0, "../img.png"), llava(1, "ok.png"),
                                              llava(2, str(folder / "img.png")),
                                              llava(3, "link.png")])
    got = items(folder / "root" / "d.jsonl")
    assert isinstance(got[1], Example)
    for x in (got[0], got[2], got[3]):
        assert isinstance(x, ReadReject) and "escapes the image root" in x.reason
        assert "--image-root" in x.reason  # names the fix


def test_zero_byte_image_file(folder):
    (folder / "empty.png").write_bytes(b"")
    write_jsonl(folder / "d.jsonl", [llava(0, "empty.png"), llava(1)])
    assert "is empty (0 bytes)" in only_reject(folder / "d.jsonl").reason


def test_image_above_the_pixel_limit(folder):
    PILImage.new("RGB", (20, 20)).save(folder / "big.png")
    write_jsonl(folder / "d.jsonl", [llava(0, "big.png"), llava(1)])
    r = only_reject(folder / "d.jsonl", max_pixels=399)
    assert "big.png is 20x20 = 400 pixels, above the limit of 399" in r.reason
    assert all(isinstance(x, Example) for x in items(folder / "d.jsonl", max_pixels=400))


def test_decompression_bomb_is_refused_from_its_header_by_default(folder):
    PILImage.new("1", (4097, 4097)).save(folder / "bomb.png")  # ~16.8 Mpx in a few KB
    assert (folder / "bomb.png").stat().st_size < 100_000
    write_jsonl(folder / "d.jsonl", [llava(0, "bomb.png"), llava(1)])
    assert "4097x4097 = 16,785,409 pixels, above the limit of 16,777,216" in \
        only_reject(folder / "d.jsonl").reason


def test_empty_instruction(folder):
    write_jsonl(folder / "d.jsonl", [llava(0, q="   "), llava(1)])
    r = only_reject(folder / "d.jsonl")
    assert r.id == "r0" and "empty instruction" in r.reason


def test_empty_answer(folder):
    write_jsonl(folder / "d.jsonl", [llava(0), llava(1, a="")])
    r = only_reject(folder / "d.jsonl")
    assert r.id == "r1" and "empty answer" in r.reason


def test_broken_record_and_duplicate_id(folder):
    path = folder / "d.jsonl"
    path.write_text(json.dumps(llava(0)) + "\n{not json\n" + json.dumps(llava(0)) + "\n"
                    + json.dumps({"id": "x", "text": "no conversation"}) + "\n")
    got = items(path)
    assert isinstance(got[0], Example)
    assert got[1].id == "row-1" and "broken JSON line" in got[1].reason
    assert got[2].id == "r0" and "occurs more than once" in got[2].reason
    assert got[3].id == "x" and "needs a 'conversations' list" in got[3].reason


def test_source_level_errors_are_one_line(tmp_path):
    with pytest.raises(PairforgeError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(PairforgeError, match="unknown option 'n'"):
        read_examples(f"{tmp_path}/x.jsonl?n=3")
    with pytest.raises(PairforgeError, match="--max-pixels 0"):
        read_examples("shapes", max_pixels=0)


def test_decode_image_keeps_source_bytes_and_reason_kinds_group():
    img = decode_image({"bytes": png(), "path": "a.png"}, 0)
    assert img.size == (8, 6) and source_bytes(img)["path"] == "a.png"
    assert source_bytes(img.convert("L")) is None  # a derived image is re-encoded, not aliased
    a = "d.jsonl, row 3, field 'images': image file 'a.png' not found under '/x'; check"
    b = "d.jsonl, row 17, field 'images': image file 'b/c.png' not found under '/x'; check"
    assert reason_kind(a) == reason_kind(b) == "images: image file … not found under …; check"


# ----------------------------------------------------------------------------- pair sets


def quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


def pixels(img) -> bytes:
    return img.convert("RGB").tobytes()


def test_pair_rows_read_as_examples_with_the_pair_in_meta(tmp_path):
    from pairforge.schema import make_pair, to_dataset, user_message

    sys_turn = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    rows = [make_pair(prompt=[sys_turn, user_message("What colour is it?")],
                      chosen="It is red. It is round.", rejected="It is blue. It is round.",
                      images=[PILImage.new("RGB", (8, 6), (200, 30, 30))], id="p0",
                      recipe="vapr", task="color", source_dataset="shapes:train",
                      source_id="s0", source_meta={"answer_value": "red"},
                      edit_original="red", edit_replacement="blue", editor="rule"),
            make_pair(prompt="How many?", chosen="Two.", rejected="Three.", id="p1",
                      images=[PILImage.new("RGB", (4, 4))])]
    rows[1]["prompt"][0]["content"].append({"type": "image", "text": None})  # 2 parts, 1 image
    path = tmp_path / "pairs.parquet"
    to_dataset(rows, validate=False).to_parquet(str(path))
    stream = read_examples(path)
    ex, bad = list(stream)
    assert isinstance(ex, Example) and ex.id == ex.source_id == "p0" and ex.task == "color"
    assert ex.messages == rows[0]["prompt"] + rows[0]["chosen"]
    assert ex.prompt_messages == rows[0]["prompt"] and ex.answer == "It is red. It is round."
    assert pixels(ex.images[0]) == pixels(rows[0]["images"][0])
    pair = ex.meta["pair"]
    assert not {"prompt", "chosen", "images"} & set(pair)  # those are the example's
    assert pair["rejected"] == rows[0]["rejected"] and pair["id"] == "p0"
    assert (pair["recipe"], pair["source_id"], pair["edit_replacement"]) == ("vapr", "s0", "blue")
    assert pair["source_meta"] == [{"key": "answer_value", "value": "red"},
                                   {"key": "pair_id", "value": "p0"}]
    assert isinstance(bad, ReadReject) and bad.id == "p1"
    assert "row 1, field 'images'" in bad.reason and "2 image placeholder(s)" in bad.reason
    assert (stream.n_examples, stream.n_rejected) == (1, 1)


@pytest.fixture(scope="module")
def vapr_build(tmp_path_factory) -> Path:
    """VaPR (rule editor) on 12 world examples, built by the engine."""
    from pairforge.engine import build, load_config

    out = tmp_path_factory.mktemp("vapr") / "vapr-12"
    build(load_config(recipe="vapr", source="shapes:train?n=12", out=out), progress=False,
          console=quiet())
    return out


def test_a_build_dir_reads_as_its_pairs(vapr_build, tmp_path):
    from pairforge.engine import load_build

    pairs = load_build(vapr_build)
    stream = read_examples(vapr_build)
    got = list(stream)
    assert stream.name == "vapr-12" and len(got) == len(pairs) > 0
    for ex, row in zip(got, pairs):
        assert ex.id == row["id"] and ex.messages == row["prompt"] + row["chosen"]
        assert ex.meta["pair"]["rejected"] == row["rejected"]
        assert ex.meta["pair"]["edit_original"] == row["edit_original"]
        assert pixels(ex.images[0]) == pixels(row["images"][0])
    # the dataset/ folder alone (save_to_disk) reads the same
    assert [ex.id for ex in read_examples(vapr_build / "dataset")] == pairs["id"]
    import shutil

    from pairforge.engine.manifest import Manifest

    unfinished = shutil.copytree(vapr_build, tmp_path / "unfinished")
    m = Manifest.load(unfinished)
    m.data["complete"] = False
    m.save()
    with pytest.raises(PairforgeError, match="the build is not finished"):
        read_examples(unfinished)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny LLaVA (policy) and a random tiny CLIP, saved like the shipped ones."""
    import torch
    from transformers import CLIPModel

    from pairforge.models.random_tiny import save_random_llava
    from pairforge.world import models as wm
    from pairforge.world import vocabulary

    processor = wm.build_clip_processor(vocabulary(), max_length=16)
    config = wm.clip_config(len(processor.tokenizer), hidden=32, layers=1, heads=2,
                            projection_dim=16, max_positions=16)
    torch.manual_seed(0)
    clip = wm.save_checkpoint(CLIPModel(config), processor, tmp_path_factory.mktemp("clip"))
    return save_random_llava(tmp_path_factory.mktemp("llava")), clip


def test_aspo_build_annotates_a_vapr_build_dir(vapr_build, tiny_models, tmp_path, monkeypatch):
    """`pairforge build aspo --source <vapr build dir>`: every pair annotated, its chosen,
    rejected and VaPR columns kept."""
    import sys

    from pairforge import cli
    from pairforge.engine import load_build

    llava, clip = tiny_models
    out = tmp_path / "aspo"
    monkeypatch.setattr(sys, "argv", [
        "pairforge", "build", "aspo", "--source", str(vapr_build), "--out", str(out),
        "--policy", f"hf:{llava}", "--clip", f"clip:{clip}", "--quiet"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    vapr = {r["id"]: r for r in load_build(vapr_build)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["examples_in"] == summary["counts"]["pairs"] == len(vapr)
    assert summary["source_dataset"] == "vapr-12"
    rows = load_build(out)
    assert set(rows["recipe"]) == {"aspo"}
    for row in rows:
        meta = {m["key"]: m["value"] for m in row["source_meta"]}
        before = vapr[meta["pair_id"]]  # the annotated pair, by its id in the VaPR build
        assert (row["prompt"], row["chosen"], row["rejected"]) == \
            (before["prompt"], before["chosen"], before["rejected"])
        assert (row["edit_original"], row["edit_replacement"], row["task"], row["source_id"]) \
            == (before["edit_original"], before["edit_replacement"], before["task"],
                before["source_id"])
        assert pixels(row["images"][0]) == pixels(before["images"][0])
        text = row["chosen"][0]["content"][0]["text"]
        spans = [(s["start"], s["end"]) for s in row["sentence_spans"]]
        assert spans[0][0] == 0 and spans[-1][1] == len(text)  # spans tile the chosen text
        assert all(a[1] == b[0] for a, b in pairwise(spans))
        assert len(row["sentence_weights"]) == len(spans)
        assert {"aspo_policy", "aspo_clip", "editor"} <= {m["role"] for m in row["models"]}


def test_aspo_weighs_the_sentences_of_canonical_rows(tiny_models, tmp_path):
    """Multi-sentence answers read from a parquet of canonical rows get one weight per
    sentence, min-max mixed: the top sentence of one of the two terms gets at least 1/2."""
    from pairforge.engine import build, load_build, load_config
    from pairforge.schema import make_pair, to_dataset

    rng = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    rows = [make_pair(prompt="describe the image", chosen=f"the circle is red. the square is "
                      f"blue. there are {n} shapes.", rejected="there is one shape.",
                      images=[PILImage.new("RGB", (32, 32), c)], id=f"x{n}")
            for n, c in enumerate(rng)]
    path = tmp_path / "pairs.parquet"
    to_dataset(rows).to_parquet(str(path))
    llava, clip = tiny_models
    build(load_config(recipe="aspo", source=str(path), out=tmp_path / "out",
                      policy=f"hf:{llava}", clip=f"clip:{clip}"), progress=False,
          console=quiet())
    got = load_build(tmp_path / "out")
    assert len(got) == 3
    for w, spans in zip(got["sentence_weights"], got["sentence_spans"]):
        assert len(w) == len(spans) == 3
        assert all(0.0 <= x <= 1.0 for x in w) and max(w) >= 0.5


def test_reason_tally_shows_numbers_and_keeps_apostrophes():
    """The build's terminal summary and the card show a kind of reason with its numbers (or
    their range), never a bare N; an apostrophe is not taken for a quoted name."""
    from pairforge.sources.sft import ReasonTally

    tally = ReasonTally()
    for n in (2, 7, 5):
        tally.add("validate", f"none of {n} edits passed; first: too_different")
    tally.add("edit", "no_flip: the answer's statement is not the question's proposition")
    tally.add("read", "data.json, row 4, field 'images': 'a.png' cannot be decoded (x 3)")
    tally.add("read", "data.json, row 9, field 'images': 'b.png' cannot be decoded (y 1)")
    assert tally.counts() == {
        ("validate", "none of 2–7 edits passed; first: too_different"): 3,
        ("edit", "no_flip: the answer's statement is not the question's proposition"): 1,
        ("read", "images: … cannot be decoded …"): 2,
    }
