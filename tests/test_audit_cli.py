"""`pairforge audit` end to end: TRL JSONL with real PNGs → summary.json, pairs.parquet,
report.html + plots, skipped.jsonl, terminal table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pairforge.cli import app
from pairforge.diagnostics.audit import SetAudit
from pairforge.diagnostics.lengths import GPT2Lengths, WordLengths
from pairforge.diagnostics.text import SplitTexts
from pairforge.schema import COLUMN_GROUPS

SUMMARY_KEYS = {"n_pairs", "n_skipped", "lev_words_mean", "lev_words_median", "lev_norm_mean",
                "len_chosen_mean", "len_rejected_mean", "len_gap_mean", "len_gap_median",
                "chosen_longer_rate", "identical_rate", "near_duplicate_rate", "length_unit",
                "repeated_prompt_rate", "flags", "source", "format"}

# minimal edits: same style and length, one word flips the answer
MINIMAL = [
    ("What colour is the square?", "The square in the picture is red.",
     "The square in the picture is blue."),
    ("How many circles are there?", "There are three circles in the image.",
     "There are four circles in the image."),
    ("Where is the triangle?", "The triangle is at the top left of the image.",
     "The triangle is at the bottom left of the image."),
    ("What shape is green?", "The green shape is a small circle near the centre.",
     "The green shape is a small square near the centre."),
]
# style-different: long, detailed chosen vs terse rejected
STYLE = [
    ("Describe the image.", "The image shows a large red square on the left, two small blue "
     "circles in the middle and a green triangle at the top right, all on a white background.",
     "Shapes."),
    ("What is in the picture?", "There is a yellow star in the centre of the picture, with a "
     "purple rectangle below it and three small orange dots scattered around the edges.",
     "A star <script>alert(1)</script>"),
    ("Describe the scene.", "A blue circle overlaps a red square; a thin black line runs from "
     "the bottom left corner to the top right corner of the image.", "Circle and square."),
]


def write_set(folder: Path, rows, extra_lines=(), name: str = "pairs.jsonl") -> Path:
    """TRL-standard JSONL with one real PNG per row."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", encoding="utf-8") as f:
        for i, (q, chosen, rejected) in enumerate(rows):
            Image.new("RGB", (8, 8), (40 * i % 255, 80, 120)).save(folder / f"img{i}.png")
            f.write(json.dumps({"prompt": f"<image>{q}", "chosen": chosen, "rejected": rejected,
                                "images": [f"img{i}.png"]}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return folder / name


def audit(*args: str):
    result = CliRunner().invoke(app, ["audit", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Audit of a minimal-edit set and a style-different set, side by side (words unit)."""
    root = tmp_path_factory.mktemp("two")
    a = write_set(root / "minimal", MINIMAL)
    # three views of each style pair: 9 pairs, enough for the flags' 95% CIs to clear the
    # thresholds (3 pairs would be "inconclusive")
    b = write_set(root / "style", [(f"{q} (view {k})", c, r) for k in range(3)
                                   for q, c, r in STYLE])
    out = root / "out"
    result = audit(a, b, "--out", out, "--tokenizer", "words")
    return out, result


def test_summary_json_per_set_with_disambiguated_names(two_sets):
    out, _ = two_sets
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["pairs", "pairs#2"]  # both files are called pairs.jsonl
    for s in summary.values():
        assert SUMMARY_KEYS <= set(s)
        assert s["length_unit"] == "words" and s["format"] == "trl" and s["n_skipped"] == 0
    minimal, style = summary["pairs"], summary["pairs#2"]
    assert minimal["n_pairs"] == 4 and style["n_pairs"] == 9
    assert minimal["lev_words_mean"] == 1.0 and minimal["chosen_longer_rate"] == 0.5
    assert minimal["flags"] == []  # minimal edits: no shortcut, no style difference
    assert {"length_shortcut", "style_different"} <= {f["id"] for f in style["flags"]}
    assert style["chosen_longer_rate"] == 1.0


def test_pairs_parquet_columns_match_the_schema(two_sets):
    out, _ = two_sets
    table = pq.read_table(out / "pairs.parquet")
    diag = list(COLUMN_GROUPS["diagnostics"])
    assert table.column_names == ["set", "id", *diag, "edit_unit", "prompt_repeated",
                                  "id_repeated", "images_unresolved"]
    assert str(table.schema.field("lev_norm").type) == "float"
    assert str(table.schema.field("lev_words").type) == "int32"
    df = table.to_pandas()
    assert df["set"].tolist() == ["pairs"] * 4 + ["pairs#2"] * 9
    assert df["id"].is_unique and (df["length_unit"] == "words").all()
    assert (df["edit_unit"] == "words").all()
    assert df["lev_words"].tolist()[:4] == [1, 1, 1, 1]
    np.testing.assert_allclose(df["lev_norm"][:4], [1 / 7, 1 / 7, 1 / 10, 1 / 10], rtol=1e-6)
    assert not df["prompt_repeated"].any()


def test_report_html_plots_and_escaping(two_sets):
    out, _ = two_sets
    for png in ("lev_norm.png", "len_gap.png", "compare.png"):  # compare: several sets
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert "<script>" not in page
    assert page.index("<h2>Flags</h2>") < page.index("<h2>Summary</h2>") < page.index("<h2>Plots")
    for png in ("lev_norm.png", "len_gap.png", "compare.png"):
        assert f'src="{png}"' in page
    assert "most different" in page and "most similar" in page
    assert "<mark>red.</mark>" in page  # the changed word of a minimal edit is highlighted
    assert "differ in style" in page  # the style flag's sentence


def test_terminal_shows_table_and_flags(two_sets):
    _, result = two_sets
    assert "pairs#2" in result.output and "style_different" in result.output
    assert "report.html" in result.output


def test_skip_counts_bad_rows_and_writes_skipped_jsonl(tmp_path):
    data = write_set(tmp_path / "d", MINIMAL, extra_lines=[
        "not json",
        json.dumps({"prompt": "<image>Q", "chosen": "A", "images": ["img0.png"]}),
    ])
    audit(data, "--out", tmp_path / "out", "--tokenizer", "words")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["pairs"]
    assert (s["n_pairs"], s["n_skipped"], s["n_read"]) == (4, 2, 6)
    assert "skipped_rows" in {f["id"] for f in s["flags"]}
    records = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").open()]
    assert [(r["set"], r["row"]) for r in records] == [("pairs", 4), ("pairs", 5)]
    assert records[1]["field"] == "rejected"
    assert all(set(r) == {"set", "where", "row", "field", "reason"} and r["reason"]
               for r in records)
    assert pq.read_table(tmp_path / "out" / "pairs.parquet").num_rows == 4


def test_fail_stops_with_one_line_error_and_exit_2(tmp_path):
    data = write_set(tmp_path / "d", MINIMAL, extra_lines=["not json"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pairforge", "audit", str(data), "--out",
                           str(tmp_path / "out"), "--on-error", "fail", "--tokenizer", "words"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "pairs.jsonl" in lines[0] and "row 4" in lines[0]


def test_length_units_words_gpt2_and_local_hf_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from pairforge.diagnostics.lengths import gpt2_tokenizer

    data = write_set(tmp_path / "d", STYLE)
    folder = tmp_path / "hf-tok"
    PreTrainedTokenizerFast(tokenizer_object=gpt2_tokenizer()).save_pretrained(folder)
    texts = [c for _, c, _ in STYLE] + [r for _, _, r in STYLE]
    expected = {"words": WordLengths().lengths(SplitTexts.of(texts)),
                "gpt2": GPT2Lengths().lengths(SplitTexts.of(texts))}
    expected[str(folder)] = expected["gpt2"]
    assert not np.array_equal(expected["words"], expected["gpt2"])
    for unit, lengths in expected.items():
        out = tmp_path / f"out-{len(unit)}"
        args = [data, "--out", out] + ([] if unit == "gpt2" else ["--tokenizer", unit])
        audit(*args)
        df = pq.read_table(out / "pairs.parquet").to_pandas()
        assert (df["length_unit"] == unit).all()
        assert df["len_chosen"].tolist() + df["len_rejected"].tolist() == lengths.tolist()
        s = json.loads((out / "summary.json").read_text())["pairs"]
        assert s["length_unit"] == unit


def test_bad_tokenizer_is_a_user_error(tmp_path):
    data = write_set(tmp_path / "d", MINIMAL)
    result = CliRunner().invoke(app, ["audit", str(data), "--out", str(tmp_path / "o"),
                                      "--tokenizer", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "--tokenizer" in str(result.exception)


def test_set_audit_keeps_most_different_and_most_similar_across_chunks():
    audit = SetAudit("s", WordLengths(), n_examples=2)
    texts = [("a b c d", "a b c d"), ("a b c d", "a b c x"), ("a b", "x y"), ("a b c d", "w x y z"),
             ("a b c d e", "a b c d f")]
    for k, (c, r) in enumerate(texts):  # one pair per chunk
        audit.add([f"p{k}"], [k], ["q"], [c], [r])
    result = audit.finish(0)
    assert [e.id for e in result.most_different] == ["p3", "p2"]  # 4/4 beats 2/2 on lev_words
    assert [e.id for e in result.most_similar] == ["p0", "p4"]    # 0, then 1/5 < 1/4
    assert result.summary["n_pairs"] == 5 and result.ids.to_pylist()[0] == "p0"


# LLaMA-Factory's dpo_zh_demo.json layout (ranking ShareGPT), written by hand: answers that
# differ by one or two characters, in a script without spaces between words
ZH = [
    ("这是什么动物？", "这是一只小猫咪。", "这是一只小狗。"),
    ("天空是什么颜色的？", "天空是蓝色的。", "天空是绿色的。"),
    ("图中有几个圆？", "图中有三个圆。", "图中有四个圆。"),
    ("正方形在哪里？", "正方形在图片的左上角。", "正方形在图片的右上角。"),
    ("三角形是什么颜色？", "三角形是红色的。", "三角形是黄色的。"),
    ("星星在哪里？", "星星在图片中间。", "星星在图片下面。"),
    ("有多少个方块？", "一共有两个方块。", "一共有五个方块。"),
    ("背景是什么颜色？", "背景是白色的。", "背景是黑色的。"),
    ("圆形大还是小？", "圆形很大。", "圆形很小。"),
    ("线是什么方向？", "线从左下到右上。", "线从左上到右下。"),
]


def test_unspaced_script_is_measured_in_characters(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": c},
             "rejected": {"from": "gpt", "value": r}} for q, c, r in ZH]
    data = tmp_path / "dpo_zh_demo.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    audit(data, "--out", out, "--tokenizer", "words")
    s = json.loads((out / "summary.json").read_text())["dpo_zh_demo"]
    # whitespace words would call every pair "100% of words changed" (one token each)
    assert s["edit_unit"] == "characters" and s["length_unit"] == "characters"
    assert s["unspaced_rate"] == 1.0
    assert s["lev_norm_median"] < 0.35 and s["lev_words_median"] <= 2
    assert "style_different" not in {f["id"] for f in s["flags"]}
    table = pq.read_table(out / "pairs.parquet").to_pandas()
    assert (table["edit_unit"] == "characters").all()
    assert table["lev_words"].tolist()[:3] == [2, 1, 1]  # 猫咪→狗, 蓝→绿, 三→四
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "edits in characters" in page and "<mark>猫咪</mark>" in page


def test_hostile_set_name_and_texts_are_escaped_in_the_report(tmp_path):
    data = write_set(tmp_path / "d", MINIMAL + [("<img src=x onerror=alert(2)>?", "<b>bold</b> yes",
                                                 "no")], name="<script>alert(1).jsonl")
    out = tmp_path / "out"
    audit(data, "--out", out, "--tokenizer", "words")
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "<h3>&lt;script&gt;alert(1)</h3>" in page  # the set name, escaped
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # a text, escaped


def test_progress_has_a_total_for_jsonl_and_names_each_stage(tmp_path, monkeypatch):
    import tqdm as tqdm_module

    from pairforge.diagnostics.audit import run_audit

    seen = {"totals": [], "stages": []}

    class Recorder(tqdm_module.tqdm):
        def __init__(self, *a, **kw):
            seen["totals"].append(kw.get("total"))
            super().__init__(*a, **{**kw, "disable": True})

        def set_postfix_str(self, s="", refresh=True):
            seen["stages"].append(s)

    monkeypatch.setattr(tqdm_module, "tqdm", Recorder)
    data = write_set(tmp_path / "d", MINIMAL + STYLE, extra_lines=["", "not json"])
    run_audit([data], tmp_path / "out", tokenizer="words")
    assert seen["totals"] == [len(MINIMAL) + len(STYLE) + 2]  # lines of the JSONL file
    assert seen["stages"] == ["text metrics of 7 pairs", "done"]
