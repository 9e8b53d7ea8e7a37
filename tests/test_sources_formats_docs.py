"""Preference layouts as their own tools document them, read and written back.

Every record here is written by hand after the examples in the tools' documentation, not
produced by pairforge's writers:

- TRL, "Dataset formats and types" (preference type, *implicit prompt*, standard and
  conversational) and ``trl.extract_prompt``'s docstring: the prompt is the common prefix of
  ``chosen`` and ``rejected``; for strings a space before the split goes to the answers.
- ms-swift, "Custom Dataset" (RLHF section): ``messages`` + ``rejected_response``; since 3.8
  ``rejected_messages`` (with ``rejected_images`` in multimodal rows); ``rejected_images``
  alone for pairs that differ only in the image.
- LLaMA-Factory, ``data/README.md`` (ranking ShareGPT, ``mllm_demo.json``: ``"<image>Who are
  they?"``) and the v1 layout of ``data/v1_dpo_demo.jsonl`` / ``v1_multimodal_demo.jsonl``:
  ``chosen_messages`` / ``rejected_messages``, content parts ``{"type", "value"}``,
  ``loss_weight`` per message.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image as PILImage

from pairforge.errors import BadInput
from pairforge.publish.export import export, llamafactory_record, swift_record
from pairforge.schema import prompt_text, response_text, to_dataset
from pairforge.sources import detect_format, read_pairs


def _png(color) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (5, 4), color).save(buf, format="PNG")
    return buf.getvalue()


CAT, DOG = _png((200, 120, 40)), _png((40, 40, 40))


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _parts(message: dict) -> list:
    return [p["type"] if p["type"] == "image" else p["text"] for p in message["content"]]


def _read(path: Path, **kw):
    stream = read_pairs(path, **kw)
    rows = list(stream)
    return stream, rows


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- TRL implicit prompt


def test_trl_standard_implicit_prompt_splits_like_extract_prompt(tmp_path):
    f = _jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "The sky is blue.", "rejected": "The sky is blue."},  # nothing to split
        {"chosen": "Blue.", "rejected": "Green."},  # no shared prefix: no prompt
    ])
    stream, rows = _read(f)
    assert stream.format == "trl"
    (row,) = rows
    # TRL: prompt "The sky is", chosen " blue.", rejected " green." (the space goes along)
    assert prompt_text(row["prompt"]) == "The sky is"
    assert response_text(row["chosen"]) == " blue."
    assert response_text(row["rejected"]) == " green."
    assert [(b.row, b.field) for b in stream.skipped] == [(1, "rejected"), (2, "prompt")]
    assert "same text" in stream.skipped[0].reason
    assert "give a 'prompt' column" in stream.skipped[1].reason


def test_trl_conversational_implicit_prompt_with_an_image(tmp_path):
    (tmp_path / "sky.png").write_bytes(CAT)
    question = [{"type": "image"}, {"type": "text", "text": "What color is the sky?"}]
    f = _jsonl(tmp_path / "conv.jsonl", [
        {"chosen": [_user("What color is the sky?"), _assistant("It is blue.")],
         "rejected": [_user("What color is the sky?"), _assistant("It is green.")]},
        {"chosen": [_user(question), _assistant("It is blue.")],
         "rejected": [_user(question), _assistant("It is green.")], "images": ["sky.png"]},
        # different questions: not one prompt
        {"chosen": [_user("Where is the sun?"), _assistant("In the sky.")],
         "rejected": [_user("Where is the moon?"), _assistant("In the sky.")]},
    ])
    stream, rows = _read(f)
    assert stream.format == "trl" and len(rows) == 2
    assert [m["role"] for m in rows[0]["prompt"]] == ["user"]
    assert prompt_text(rows[0]["prompt"]) == "What color is the sky?"
    assert response_text(rows[0]["chosen"]) == "It is blue."
    assert response_text(rows[0]["rejected"]) == "It is green."
    assert _parts(rows[1]["prompt"][0]) == ["image", "What color is the sky?"]
    assert rows[1]["images"][0]["bytes"] == CAT
    (bad,) = stream.skipped
    assert bad.row == 2 and "first message" in bad.reason


def test_trl_implicit_prompt_is_detected_but_not_for_other_layouts():
    assert detect_format({"chosen": "a b", "rejected": "a c"}) == "trl"
    assert detect_format({"chosen": [], "rejected": [], "images": []}) == "trl"
    # chosen/rejected next to messages or conversations belong to other layouts
    with pytest.raises(Exception, match="cannot detect"):
        detect_format({"messages": [], "chosen": "a", "rejected": "b"})


# ----------------------------------------------------------------------------- ms-swift


def test_swift_rejected_response_rejected_messages_and_image_only_pairs(tmp_path):
    (tmp_path / "cat.png").write_bytes(CAT)
    (tmp_path / "dog.png").write_bytes(DOG)
    f = _jsonl(tmp_path / "swift.jsonl", [
        # the classic layout
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      _user("What is the weather tomorrow?"),
                      _assistant("Tomorrow will be sunny.")],
         "rejected_response": "I don't know."},
        # ms-swift >= 3.8: rejected_messages (+ rejected_images equal to images)
        {"messages": [_user("这是什么"), _assistant("这是一只小猫咪。")], "images": ["cat.png"],
         "rejected_messages": [_user("这是什么"), _assistant("这是一只小狗。")],
         "rejected_images": ["cat.png"]},
        # only the images differ: the same answer, a different image for the rejected side
        {"messages": [_user("<image>What is this?"), _assistant("A cat.")],
         "images": ["cat.png"], "rejected_images": ["dog.png"]},
        # rejected_messages with another image
        {"messages": [_user("这是什么"), _assistant("这是一只小猫咪。")], "images": ["cat.png"],
         "rejected_messages": [_user("这是什么"), _assistant("这是一只小狗。")],
         "rejected_images": ["dog.png"]},
    ])
    stream, rows = _read(f)
    assert stream.format == "swift" and len(rows) == 2
    assert response_text(rows[0]["rejected"]) == "I don't know."
    assert _parts(rows[1]["prompt"][0]) == ["image", "这是什么"]
    assert response_text(rows[1]["chosen"]) == "这是一只小猫咪。"
    assert response_text(rows[1]["rejected"]) == "这是一只小狗。"
    assert rows[1]["images"][0]["bytes"] == CAT
    # skipped with the real reason, not "rejected_response missing"
    assert [(b.row, b.field) for b in stream.skipped] == [(2, "rejected_images"),
                                                          (3, "rejected_images")]
    assert "only the images differ" in stream.skipped[0].reason
    assert all("image-contrast pair" in b.reason for b in stream.skipped)


def test_swift_layouts_are_detected_by_any_rejected_column():
    for key in ("rejected_response", "rejected_messages", "rejected_images"):
        assert detect_format({"messages": [], key: None}) == "swift"


def test_swift_rejected_messages_with_another_question_is_skipped(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [
        {"messages": [_user("What is 1 + 1?"), _assistant("2")],
         "rejected_messages": [_user("What is 1 + 2?"), _assistant("2")]},
    ])
    stream, rows = _read(f)
    assert rows == [] and stream.skipped[0].field == "rejected_messages"
    assert "share no prompt" in stream.skipped[0].reason


# ----------------------------------------------------------------------------- LLaMA-Factory v1


def _v1(role, *parts, weight=0.0):
    return {"role": role, "content": list(parts), "loss_weight": weight}


def _text(value):
    return {"type": "text", "value": value}


def test_llamafactory_v1_chosen_and_rejected_messages(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "1.jpg").write_bytes(CAT)
    system = _v1("system", _text("You are an AI assistant."))
    user = _v1("user", _text("Translate to Russian:\n\n1973 Summer Universiade\n\nRussian:"))
    picture = _v1("user", {"type": "image_url", "value": "data/1.jpg"}, _text("Who are they?"))
    f = _jsonl(tmp_path / "v1_dpo.jsonl", [
        {"chosen_messages": [system, user, _v1("assistant", _text("1973 Летняя Универсиада"),
                                                weight=1.0)],
         "rejected_messages": [system, user, _v1("assistant", _text(" Sure, here it is."),
                                                  weight=1.0)]},
        {"chosen_messages": [picture, _v1("assistant", _text("Kane and Gretzka."), weight=1.0)],
         "rejected_messages": [picture, _v1("assistant", _text("Two referees."), weight=1.0)]},
    ])
    stream, rows = _read(f)
    assert stream.format == "llamafactory" and stream.skipped == []
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert prompt_text(rows[0]["prompt"]).startswith("Translate to Russian:\n\n1973")
    assert response_text(rows[0]["chosen"]) == "1973 Летняя Универсиада"
    assert response_text(rows[0]["rejected"]) == " Sure, here it is."
    assert _parts(rows[1]["prompt"][0]) == ["image", "Who are they?"]
    assert rows[1]["images"][0]["bytes"] == CAT


def test_llamafactory_v1_bad_rows_name_the_field(tmp_path):
    user = _v1("user", _text("Q?"))
    f = _jsonl(tmp_path / "v1.jsonl", [
        {"chosen_messages": [user, _v1("assistant", _text("A"))],
         "rejected_messages": [user, _v1("assistant", _text("A"))]},  # identical
        {"chosen_messages": [user, _v1("assistant", {"type": "video_url", "value": "v.mp4"})],
         "rejected_messages": [user, _v1("assistant", _text("B"))]},
    ])
    stream, rows = _read(f)
    assert rows == []
    assert [(b.row, b.field) for b in stream.skipped] == [(0, "chosen_messages"),
                                                          (1, "chosen_messages")]
    assert "same conversation" in stream.skipped[0].reason
    assert "video_url" in stream.skipped[1].reason


# ----------------------------------------------------------------------------- exact round trips


@pytest.mark.parametrize("question", ["<image>Who are they?", "<image>\nWho are they?",
                                      "Compare <image> and <image>, please."])
def test_export_keeps_the_prompt_text_exactly_where_the_tag_is(tmp_path, question):
    for name, data in (("1.jpg", CAT), ("2.jpg", DOG)):
        (tmp_path / name).write_bytes(data)
    n = question.count("<image>")
    lf_rec = {"conversations": [{"from": "human", "value": question}],
              "chosen": {"from": "gpt", "value": "Kane and Gretzka."},
              "rejected": {"from": "gpt", "value": "Two referees."},
              "images": ["1.jpg", "2.jpg"][:n]}
    sw_rec = {"messages": [_user(question), _assistant("Kane and Gretzka.")],
              "rejected_response": "Two referees.", "images": ["1.jpg", "2.jpg"][:n]}
    (lf_row,) = list(read_pairs(_jsonl(tmp_path / "lf.jsonl", [lf_rec]), on_error="fail"))
    (sw_row,) = list(read_pairs(_jsonl(tmp_path / "sw.jsonl", [sw_rec]), on_error="fail"))
    paths = [f"images/{i}.png" for i in range(n)]
    assert llamafactory_record(lf_row, paths)["conversations"][0]["value"] == question
    assert swift_record(sw_row, paths)["messages"][0]["content"] == question


def test_swift_export_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    (tmp_path / "1.jpg").write_bytes(CAT)
    rec = {"messages": [_user("<image>Who are they?"), _assistant("Kane.")],
           "rejected_response": "A referee.", "images": ["1.jpg"]}
    rows = list(read_pairs(_jsonl(tmp_path / "in.jsonl", [rec]), on_error="fail"))
    to_dataset(rows).save_to_disk(str(tmp_path / "set"))
    out = tmp_path / "exported"
    result = export(tmp_path / "set", "swift", out)
    assert result.absolute
    (line,) = (out / "set.jsonl").read_text().splitlines()
    (path,) = json.loads(line)["images"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ms-swift opens the path as written, from its own cwd
    assert Path(path).is_absolute() and Path(path).read_bytes() == CAT
    # --relative: the command says what to set
    relative = export(tmp_path / "set", "swift", tmp_path / "rel", absolute=False)
    assert not relative.absolute
    (line,) = (tmp_path / "rel" / "set.jsonl").read_text().splitlines()
    assert not Path(json.loads(line)["images"][0]).is_absolute()


# ----------------------------------------------------------------------------- the plain TRL path


def test_plain_trl_rows_equal_the_general_converter(tmp_path):
    """The reader's direct path for plain TRL-standard rows builds exactly the row the general
    converter (from_trl + make_pair + validate_row) builds, and leaves every other record,
    bad ones included, to the general path."""
    for name, data in (("a.png", CAT), ("b.png", DOG)):
        (tmp_path / name).write_bytes(data)
    plain = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "<image>Who are they?", "chosen": "Kane.", "rejected": "Two referees.",
         "images": ["a.png"]},
        {"prompt": "Compare <image> and\n<image>.", "chosen": "Same.", "rejected": "Different.",
         "images": ["a.png", "b.png"], "id": 7},
        {"prompt": "What is it?", "chosen": "A cat.", "rejected": "A dog.", "image": "a.png",
         "idx": "r9", "extra": 1},
        {"prompt": "", "chosen": "A cat.", "rejected": "A dog.", "images": ["a.png", "b.png"]},
    ]
    general_only = [
        {"prompt": "   ", "chosen": "a", "rejected": "b"},  # no prompt text, no image
        {"prompt": "Q", "chosen": " ", "rejected": "b"},  # blank answer
        {"prompt": "<image>Q", "chosen": "a", "rejected": "b"},  # tag without image
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["a.png"], "image": "b.png"},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    ]
    escaping = {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["../outside.png"]}
    f = _jsonl(tmp_path / "plain.jsonl", plain + general_only + [escaping])
    for load in (True, False):
        stream = read_pairs(f, load_images=load)
        for i, rec in enumerate(plain):
            row = stream._plain_trl_row(i, rec)
            assert row is not None and row == stream._general_row(i, rec), i
        for i, rec in enumerate(general_only, start=len(plain)):
            assert stream._plain_trl_row(i, rec) is None, i
        errors = []
        for path in (stream._plain_trl_row, stream._general_row):
            with pytest.raises(BadInput) as e:
                path(0, escaping)
            errors.append(str(e.value))
        assert errors[0] == errors[1] and "escapes the image root" in errors[0]
        rows = list(stream)
        assert len(rows) == len(plain) + 2  # the conversational and implicit-prompt rows are fine
        assert [b.field for b in stream.skipped] == ["prompt", "chosen", "images", "images",
                                                     "images"]
