"""The audit's fast path (issue 17, item 12): plain TRL JSON Lines parsed block by block by
pyarrow, texts measured as Arrow arrays. Everything here checks that it gives exactly what the
row path gives: same pairs, ids, texts, skipped rows and metrics, on a corpus in TRL's
documented JSONL layout (``prompt`` / ``chosen`` / ``rejected`` strings, optional ``id`` and
``images``) mixed with the broken lines real files hold."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pairforge.diagnostics import audit as audit_module
from pairforge.diagnostics import text as text_module
from pairforge.diagnostics.audit import exact_chunks, prefetched, run_audit
from pairforge.diagnostics.lengths import GPT2Lengths, WordLengths
from pairforge.diagnostics.text import pair_metrics, split_whitespace, unspaced
from pairforge.schema import prompt_text, response_text, stable_id, stable_ids
from pairforge.sources import containers, read_pairs
from pairforge.sources import reader as reader_module
from pairforge.sources.reader import NOT_PY_SPACE, TextBatch, plain_trl_block

WORDS = ("the red square is on the left, a blue circle sits at the top. Two small green "
         "triangles — don't miss them: naïve café 3.5 这是一只小猫咪。 ｆｕｌｌ").split()


def _text(rng: random.Random, n: int) -> str:
    t = " ".join(rng.choice(WORDS) for _ in range(n))
    r = rng.random()
    if r < 0.05:
        t = t.replace(" ", "\n", 2)
    elif r < 0.08:
        t = t.replace(" ", "  ", 1)
    elif r < 0.10:
        t = " " + t
    elif r < 0.12:
        t = t.replace(" ", "\u00a0", 1)
    elif r < 0.13:
        t = t + " \U0001F600"
    return t


def write_corpus(path: Path, n: int = 1500, seed: int = 3) -> Path:
    """TRL JSONL: stretches of plain records (the fast path) and stretches with ids, idx,
    images, blank answers, conversational answers, blank / broken / doubled lines, a lone
    surrogate escape, a top-level list and invalid UTF-8 (the row path)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(n):
            chosen = _text(rng, rng.randint(1, 30))
            rejected = _text(rng, rng.randint(1, 30)) if rng.random() < 0.5 \
                else chosen.replace("red", "blue")
            rec: dict = {"prompt": f"Q{i % 50} " + _text(rng, 3), "chosen": chosen,
                         "rejected": rejected}
            messy = (i // 300) % 2 == 1
            r = rng.random()
            if messy:
                if r < 0.02:
                    rec["id"] = rng.choice([i, f"r{i}", 1.5])
                elif r < 0.04:
                    rec["idx"] = i
                elif r < 0.06:
                    rec["prompt"] = "<image>\n" + rec["prompt"]
                    rec["images"] = [f"img{i}.png"]
                elif r < 0.08:
                    rec["chosen"] = "  \u3000 "
                elif r < 0.10:
                    rec["chosen"] = [{"role": "assistant", "content": chosen}]
                elif r < 0.11:
                    rec["prompt"] = ""
                elif r < 0.12:
                    rec["meta"] = rng.choice([1, "x", [1, 2]])
            line = json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode()
            if messy:
                r2 = rng.random()
                if r2 < 0.01:
                    line = b"{broken"
                elif r2 < 0.02:
                    line = b""
                elif r2 < 0.03:
                    line = line.replace(b'"chosen": "', b'"chosen": "\\ud800', 1)
                elif r2 < 0.04:
                    line = line + b" " + line
                elif r2 < 0.05:
                    line = b"[1, 2]"
                elif r2 < 0.06:
                    line = line.replace(b"red", b"\xff", 1)
            f.write(line + b"\n")
    return path


def _rows_view(spec: Path) -> tuple[list[tuple], list[dict], list[int], int]:
    stream = read_pairs(spec, load_images=False)
    rows = [(r["id"], prompt_text(r["prompt"]), response_text(r["chosen"]),
             response_text(r["rejected"]), len(r["images"] or ()),
             stream.n_unresolved(r["images"])) for r in stream]
    return rows, [b.to_record() for b in stream.skipped], stream.skipped_at, stream.n_read


def _batches_view(spec: Path, size: int = 100) -> tuple[list[tuple], list[dict], list[int], int]:
    stream = read_pairs(spec, load_images=False)
    rows = []
    for b in stream.text_batches(size):
        assert len(b) <= size
        rows += zip(b.ids, b.prompts.to_pylist(), b.chosen.to_pylist(), b.rejected.to_pylist(),
                    b.n_images.tolist(), b.unresolved.tolist())
    return rows, [b.to_record() for b in stream.skipped], stream.skipped_at, stream.n_read


def test_text_batches_give_the_rows_pairs_ids_texts_and_skips(tmp_path, monkeypatch):
    spec = write_corpus(tmp_path / "mixed.jsonl")
    monkeypatch.setattr(containers, "JSONL_BLOCK", 4096)  # ~30 lines a block: many blocks
    calls = {"fast": 0, "rows": 0}
    real = reader_module.plain_trl_block

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls["fast" if out is not None else "rows"] += 1
        return out

    monkeypatch.setattr(reader_module, "plain_trl_block", spy)
    expected = _rows_view(spec)
    got = _batches_view(spec)
    assert got[0] == expected[0]
    assert got[1:] == expected[1:]
    assert expected[3] == 1500 - sum(1 for line in spec.read_bytes().split(b"\n")[:-1]
                                     if not line.strip())
    assert calls["fast"] > 10 and calls["rows"] > 10  # both paths ran
    # a second pass starts afresh
    stream = read_pairs(spec, load_images=False)
    first = sum(map(len, stream.text_batches()))
    assert sum(map(len, stream.text_batches())) == first and stream.n_read == expected[3]


def test_text_batches_of_other_formats_come_from_the_rows(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"prompt": "Q?", "chosen": "Yes it is.", "rejected": "No."},
                                {"prompt": "Q?", "chosen": "  ", "rejected": "No."}]))
    assert _batches_view(path) == _rows_view(path)


@pytest.mark.parametrize("block,why", [
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n\n', "blank line"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n  \t\n', "whitespace line"),
    ((b'{"prompt": "Q", "chosen": "a", "rejected": "b"} {"prompt": "Q", "chosen": "a", '
      b'"rejected": "b"}\n'), "two records on one line"),
    (b'{"prompt": "Q", "chosen": "a\xff", "rejected": "b"}\n', "not UTF-8"),
    (b'{"prompt": "Q", "chosen": "a\\ud800", "rejected": "b"}\n', "lone surrogate"),
    ((b'{"prompt": "Q", "chosen": "a", "rejected": "b", "id": "x"}\n'
      b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n'), "an id in some rows only"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b", "id": 1.5}\n', "a float id"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b", "id": true}\n', "a boolean id"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b", "idx": [3]}\n', "a list idx"),
    (b'{"prompt": "<image>Q", "chosen": "a", "rejected": "b"}\n', "an image tag"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b", "images": []}\n', "an images list"),
    (b'{"prompt": "Q", "chosen": "\\u2003", "rejected": "b"}\n', "a blank answer"),
    (b'{"prompt": " ", "chosen": "a", "rejected": "b"}\n', "a blank prompt"),
    (b'{"prompt": "Q", "chosen": null, "rejected": "b"}\n', "a null"),
    (b'{"prompt": "Q", "chosen": ["a"], "rejected": "b"}\n', "a list answer"),
    (b'{"prompt": "Q", "chosen": "a", "chosen": "c", "rejected": "b"}\n', "a repeated key"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b", "x": 1e400}\n', "a number json reads"),
    (b'[1]\n', "not an object"),
])
def test_plain_trl_block_leaves_anything_unusual_to_the_rows(block, why):
    assert plain_trl_block(block, 5, "set") is None, why


def test_plain_trl_block_ids_and_texts_are_the_row_paths(tmp_path):
    recs = [{"prompt": "Describe it.", "chosen": "A red “square”.\n", "rejected": "A cat 🐈",
             "score": 1.5}, {"prompt": "Q\u00e9", "chosen": "x", "rejected": "y", "id": None}]
    block = b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in recs)
    batch = plain_trl_block(block, 0, "my set")
    assert batch is not None
    assert batch.ids == [stable_id("my set", i, r["prompt"], r["chosen"], r["rejected"])
                         for i, r in enumerate(recs)]
    assert batch.chosen.to_pylist() == [r["chosen"] for r in recs]
    path = tmp_path / "my set.jsonl"
    path.write_bytes(block)
    assert _batches_view(path) == _rows_view(path)


@pytest.mark.parametrize("ids", [{"id": "a"}, {"id": 7}, {"idx": 3}, {"idx": "x"},
                                 {"id": None, "idx": 5}, {"id": -0, "idx": "ignored"}],
                         ids=str)
def test_plain_trl_block_takes_ids_as_the_row_path_does(tmp_path, ids):
    recs = [{"prompt": f"Q{i}", "chosen": "yes it is", "rejected": "no",
             **{k: (v if not isinstance(v, (int, str)) or isinstance(v, bool) else
                    (v + i if isinstance(v, int) else f"{v}{i}")) for k, v in ids.items()}}
            for i in range(3)]
    block = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    assert plain_trl_block(block, 0, "s") is not None
    path = tmp_path / "s.jsonl"
    path.write_bytes(block)
    assert _batches_view(path) == _rows_view(path)


def test_stable_ids_hash_what_stable_id_hashes():
    parts = [["set", 0, "Q", "a", "b"], ["sét", 12, "", "日本語", "x\n"], ["s", 3, "p", "c", "r"]]
    joined = pa.array(["".join(f"{p}\x1f" for p in row) for row in parts], pa.string())
    joined = pc.cast(joined, pa.binary())
    assert stable_ids(joined) == [stable_id(*row) for row in parts]
    assert stable_ids(joined.slice(1, 2)) == [stable_id(*row) for row in parts[1:]]


def test_jsonl_blocks_cut_at_line_ends_and_count_lines(tmp_path):
    lines = [b"a" * 10, b"", b"b" * 50, b"c\r", b"d" * 3]
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline at the end
    for size in (1, 7, 16, 1000):
        blocks = list(containers.jsonl_blocks(path, "x", size))
        assert b"".join(b for _, b in blocks) == path.read_bytes()
        for start, block in blocks:
            assert block.endswith(b"\n") or block is blocks[-1][1]
            assert block.split(b"\n")[0] == lines[start]


def test_not_py_space_is_the_complement_of_str_isspace():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    kept = pc.match_substring_regex(pa.array(chars), NOT_PY_SPACE).to_numpy(zero_copy_only=False)
    assert kept.tolist() == [not c.isspace() for c in chars]


def _words_and_edges(lists: pa.ListArray) -> list[tuple[list[str], bool]]:
    """Non-empty tokens, and whether there is an empty (edge) token, per text: all any metric
    reads of a split. (The UTF-8 kernel gives one more empty token than the ASCII one after a
    run of two or more trailing whitespace characters: ``"a  "`` → ``a, "", ""``.)"""
    return [([t for t in toks if t], "" in toks) for toks in lists.to_pylist()]


def test_split_whitespace_splits_as_utf8_split_whitespace():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    spaces = [c for c in chars if c.isspace()]
    others = pa.array(["a" + c + "b " + c for c in chars if not c.isspace()])
    assert split_whitespace(others).equals(pc.utf8_split_whitespace(others))  # ASCII kernel
    for s in spaces:  # each whitespace character is seen, whatever the kernel
        arr = pa.array(["x y", f"a{s}b", f"{s}c"])
        assert split_whitespace(arr).to_pylist() == pc.utf8_split_whitespace(arr).to_pylist()
    rng = random.Random(0)
    # near misses of the UTF-8 whitespace bytes (U+2010, U+2030, U+0080, U+00A1, U+3001) too
    pool = [" ", "\t", "\n", "a", "é", "日", "—", "“", "\U0001F600", "\u2010", "\u2030",
            "\x80", "\xa1", "\u3001", "\u1681"]
    for i in range(400):
        texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(6)]
        if i % 4 == 0:
            texts[rng.randrange(6)] += rng.choice(spaces)
        arr = pa.array(["pad", *texts]).slice(1)
        # Python's own split as the reference (the UTF-8 kernel, on sliced arrays, was seen to
        # return a "\n" token once in a full test run, so it is not the reference here)
        assert _words_and_edges(split_whitespace(arr)) == [
            (t.split(), not t or t[0].isspace() or t[-1].isspace()) for t in texts]


@pytest.mark.parametrize("unit", [WordLengths(), GPT2Lengths()], ids=["words", "gpt2"])
def test_metrics_do_not_depend_on_the_split_kernel(monkeypatch, unit):
    rng = random.Random(1)
    edges = ["", " ", "  ", "\n\n", " \t ", "\x0b\x0c"]
    chosen = [rng.choice(edges) + " ".join(rng.choices(WORDS, k=rng.randint(0, 9)))
              + rng.choice(edges) for _ in range(300)]
    rejected = [c.replace("red", "blue") + rng.choice(edges) for c in chosen]
    both = pa.array(chosen + rejected)
    assert split_whitespace(both).to_pylist() != pc.utf8_split_whitespace(both).to_pylist()
    fast = pair_metrics(chosen, rejected, unit, threads=1)
    monkeypatch.setattr(text_module, "split_whitespace", pc.utf8_split_whitespace)
    slow = pair_metrics(chosen, rejected, unit, threads=1)
    for k in fast:
        np.testing.assert_array_equal(fast[k], slow[k], err_msg=k)


def test_unspaced_finds_scripts_behind_the_byte_check():
    texts = ["plain ascii", "naïve café", "这是一只小猫咪。", "“quoted” — dash", "ภาษาไทย ok"]
    assert unspaced(texts).tolist() == [False, False, True, False, True]
    assert unspaced(pa.array(texts).slice(3)).tolist() == [False, True]


@pytest.mark.parametrize("unit", [WordLengths(), GPT2Lengths()], ids=["words", "gpt2"])
@pytest.mark.parametrize("edit_unit", ["words", "characters"])
def test_pair_metrics_of_arrow_texts_equal_those_of_lists(tmp_path, unit, edit_unit):
    rows = _rows_view(write_corpus(tmp_path / "c.jsonl", n=600))[0]
    chosen, rejected = [r[2] for r in rows], [r[3] for r in rows]
    expected = pair_metrics(chosen, rejected, unit, edit_unit=edit_unit, threads=1)
    arrow_c = pa.array(["pad"] + chosen, pa.string()).slice(1)  # a slice, as batches are
    got = pair_metrics(arrow_c, pa.array(rejected, pa.string()), unit, edit_unit=edit_unit,
                       threads=2)
    assert expected.keys() == got.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def _outputs(out: Path) -> tuple:
    summary = json.loads((out / "summary.json").read_text())
    return (pq.read_table(out / "pairs.parquet"), summary,
            (out / "skipped.jsonl").read_text())


@pytest.mark.parametrize("tokenizer", ["words", "gpt2"])
def test_audit_outputs_equal_the_row_paths(tmp_path, monkeypatch, tokenizer):
    spec = write_corpus(tmp_path / "mixed.jsonl")
    monkeypatch.setattr(containers, "JSONL_BLOCK", 8192)
    monkeypatch.setattr(audit_module, "CHUNK_PAIRS", 256)  # chunks cut across batches
    run_audit([spec], tmp_path / "fast", tokenizer=tokenizer)
    monkeypatch.setattr(reader_module, "plain_trl_block", lambda *a, **kw: None)
    run_audit([spec], tmp_path / "rows", tokenizer=tokenizer)
    fast, rows = _outputs(tmp_path / "fast"), _outputs(tmp_path / "rows")
    assert fast[0].equals(rows[0])
    assert fast[1] == rows[1]
    assert fast[2] == rows[2]
    assert fast[1]["mixed"]["n_skipped"] > 10


def _batch(ids: list[str]) -> TextBatch:
    texts = pa.array([f"t{i}" for i in ids])
    n = len(ids)
    return TextBatch(ids, texts, texts, texts, np.zeros(n, np.int32), np.arange(n, dtype=np.int32))


def test_exact_chunks_cut_every_size_pairs_whatever_the_batches():
    ids = [str(i) for i in range(23)]
    batches = [_batch(ids[a:b]) for a, b in ((0, 5), (5, 6), (6, 17), (17, 23))]
    calls = []
    chunks = list(exact_chunks(batches, 4, lambda: calls.append(1)))
    assert [len(c) for c in chunks] == [4] * 5 + [3]
    assert [i for c in chunks for i in c.ids] == ids
    assert [t for c in chunks for t in c.chosen.to_pylist()] == [f"t{i}" for i in ids]
    assert len(calls) == len(batches)


def test_prefetched_keeps_order_raises_the_producers_error_and_stops_early():
    assert list(prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        list(prefetched(failing()))
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    for i in prefetched(endless()):
        if i == 3:
            break
    assert len(produced) < 10  # the producer stopped soon after
