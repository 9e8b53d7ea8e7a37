"""The canonical pair row: construction, validation errors, and round trips with images intact."""

from __future__ import annotations

import io

import pytest
from datasets import Dataset, load_dataset, load_from_disk
from PIL import Image

from pairforge import __version__
from pairforge.errors import BadInput
from pairforge.schema import (
    COLUMN_GROUPS,
    assistant_message,
    count_image_parts,
    features,
    groups_of,
    make_pair,
    prompt_text,
    response_text,
    stable_id,
    to_dataset,
    user_message,
    validate_row,
)


def _img(color=(255, 0, 0), size=(16, 12)) -> Image.Image:
    im = Image.new("RGB", size, color)
    im.putpixel((3, 4), (1, 2, 3))  # a distinctive pixel, to check bytes survive
    return im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _row(**kw):
    base = dict(prompt="What colour is the circle?", chosen="The circle is red.",
                rejected="The circle is blue.", images=[_img()], task="color",
                source_dataset="unit", source_id="7")
    base.update(kw)
    return make_pair(**base)


def test_make_pair_is_trl_conversational_vision_format():
    row = _row()
    assert row["prompt"] == [{"role": "user", "content": [
        {"type": "image", "text": None}, {"type": "text", "text": "What colour is the circle?"}]}]
    assert row["chosen"] == [assistant_message("The circle is red.")]
    assert row["rejected"][0]["role"] == "assistant"
    assert row["pairforge_version"] == __version__
    assert row["source_meta"] == []
    validate_row(row)


def test_stable_id_depends_on_content_only():
    a, b = _row(), _row()
    assert a["id"] == b["id"] and len(a["id"]) == 16
    assert _row(rejected="The circle is green.")["id"] != a["id"]
    assert stable_id("a", "bc") != stable_id("ab", "c")  # parts are separated


def test_text_helpers():
    msgs = [user_message("Q?", n_images=2), assistant_message("A.")]
    assert count_image_parts(msgs) == 2
    assert prompt_text(msgs) == "Q?"
    assert response_text([assistant_message("A.")]) == "A."


@pytest.mark.parametrize(
    "mutate, field, needle",
    [
        (lambda r: r.pop("chosen"), "chosen", "missing"),
        (lambda r: r.update(chosen=[assistant_message("  ")]), "chosen", "empty response"),
        (lambda r: r.update(rejected=None), "rejected", "non-empty list"),
        (lambda r: r.update(rejected=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]),
         "rejected", "assistant"),
        (lambda r: r.update(chosen=[{"role": "assistant", "content": [{"type": "text", "text": 3}]}]),
         "chosen", "expected str"),
        (lambda r: r.update(images=[]), "images", "1 image placeholder(s) but 0 image(s)"),
        (lambda r: r.update(images="a.png"), "images", "must be a list"),
        (lambda r: r.update(images=[None]), "images", "None"),
        (lambda r: r.update(id=""), "id", "non-empty"),
        (lambda r: r.update(bogus=1), "bogus", "not a canonical column"),
        (lambda r: r.update(prompt=[{"role": "robot", "content": []}]), "prompt", "role"),
    ],
)
def test_validate_row_names_the_field(mutate, field, needle):
    row = _row()
    mutate(row)
    with pytest.raises(BadInput) as e:
        validate_row(row, where="sets/x.jsonl", row_index=12)
    assert e.value.field == field
    msg = str(e.value)
    assert needle in msg and "sets/x.jsonl" in msg and "row 12" in msg and field in msg
    assert "\n" not in msg


def test_features_groups():
    f = features("m3po", "diagnostics")
    assert "chosen_mas" in f and "lev_norm" in f and "crop_box" not in f
    with pytest.raises(ValueError, match="unknown column group"):
        features("nope")
    assert groups_of(["id", "ref_chosen_logps", "sentence_weights"]) == ["ref", "aspo"]
    # no column appears in two groups: a column's meaning is defined once
    seen = set()
    for spec in COLUMN_GROUPS.values():
        assert not (seen & set(spec))
        seen |= set(spec)


def test_round_trip_parquet_and_save_to_disk_images_intact(tmp_path):
    im1, im2 = _img((255, 0, 0)), _img((0, 0, 255), size=(9, 20))
    rows = [
        _row(images=[im1]),
        make_pair(prompt=[user_message("Compare the two.", n_images=2)], chosen="Left is red.",
                  rejected="Left is blue.", images=[{"bytes": _png(im1), "path": None}, im2],
                  recipe="m3po", task="reasoning", chosen_mas=0.7, rejected_mas=0.2, chosen_logp=-3.5,
                  rejected_logp=-2.0, m3p_score=0.25, seed=3),
    ]
    ds = to_dataset(rows)
    assert "m3p_score" in ds.features and ds[0]["m3p_score"] is None  # group filled with None
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    back_pq = load_dataset("parquet", data_files=str(tmp_path / "pairs.parquet"), split="train")
    back_disk = load_from_disk(str(tmp_path / "disk"))
    for back in (back_pq, back_disk):
        assert back.num_rows == 2
        assert back[0]["prompt"] == rows[0]["prompt"]
        assert back[1]["m3p_score"] == pytest.approx(0.25)
        got = back[1]["images"]
        assert [im.size for im in got] == [(16, 12), (9, 20)]
        assert got[0].convert("RGB").getpixel((3, 4)) == (1, 2, 3)
        assert got[1].convert("RGB").getpixel((0, 0)) == (0, 0, 255)
        for r in back:
            validate_row({k: v for k, v in r.items()})


def test_to_dataset_validates():
    bad = _row()
    bad["images"] = []
    with pytest.raises(BadInput, match="row 0"):
        to_dataset([bad])
    assert isinstance(to_dataset([_row()]), Dataset)


def test_derive_seed_is_stable_and_63_bit():
    from pairforge.schema import derive_seed
    assert derive_seed(0, "ex-1") == derive_seed(0, "ex-1")
    assert derive_seed(0, "ex-1") != derive_seed(1, "ex-1")
    assert derive_seed(0, "ex-1") == int(stable_id(0, "ex-1"), 16) & (2**63 - 1)
    assert 0 <= derive_seed("x") < 2**63
