"""Property-based test (issue 14 item 17): generated rows — random types, unicode with lone
surrogates and NULs, missing and extra fields, random bytes as images, odd image sizes,
broken lines — through ``read_pairs``, the text audit and a tiny VaPR build.

Properties: no exception escapes but the one-line :class:`PairforgeError` for a file as a
whole; every row is kept or skipped / rejected with a reason; counts reconcile.
Settings keep the whole file well under 60 s on a 2-core CI machine."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from rich.console import Console

from pairforge.engine import BuildConfig, build
from pairforge.diagnostics.audit import run_audit
from pairforge.errors import PairforgeError
from pairforge.sources import read_pairs


def fuzz(n: int) -> settings:
    """``n`` examples, no deadline, the same examples every run (no example database)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

# images: the files are made once (module fixture), rows refer to them by name
IMAGE_FILES = {
    "ok.png": ("png", (16, 16)), "dot.png": ("png", (1, 1)), "wide.png": ("png", (10000, 1)),
    "tall.png": ("png", (1, 3000)), "empty.png": ("raw", b""),
    "noise.png": ("raw", b"\x00\xff random bytes \x89PNG"),
}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-images")
    for name, (kind, arg) in IMAGE_FILES.items():
        if kind == "png":
            PILImage.new("RGB", arg, "red").save(d / name)
        else:
            (d / name).write_bytes(arg)
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buf, format="PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[:30])
    return d


# any unicode, lone surrogates (category Cs) and NUL included
text = st.text(st.characters(exclude_categories=()), max_size=12)
answers = st.sampled_from(["The square in the picture is red.", "There are two blue circles "
                           "in the image.", "The large triangle is green.", "Yes.", "no", "",
                           " ", "<image>"])
# mostly plausible text, sometimes with hostile characters appended, sometimes anything
words = (answers | st.tuples(answers, text).map("".join) | text)
scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | text
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(text, inner, max_size=3), max_leaves=6)
image_names = st.sampled_from([*IMAGE_FILES, "ok.png", "ok.png", "truncated.png", "gone.png",
                               "o\x00k.png", "../escape.png", "/etc/passwd", ""])
image = (image_names | image_names | st.fixed_dictionaries({"bytes": text | st.none(),
                                                           "path": image_names})
         | st.binary(max_size=12).map(lambda b: {"bytes": list(b)}) | anything)
images = st.lists(image_names, min_size=1, max_size=1) | st.lists(image, max_size=2) | image
ids = text | st.integers() | st.sampled_from(["a", "a", "b", "c"])


def record(fields: dict) -> st.SearchStrategy:
    """Usually every field of ``fields`` with a drawn value; sometimes a field missing or
    replaced by anything, and extra fields."""
    sane = st.fixed_dictionaries(fields, optional={"id": ids, "extra": anything})
    wild = st.fixed_dictionaries({}, optional={
        **{k: st.one_of(v, anything) for k, v in fields.items()}, "id": ids, "extra": anything})
    return sane | sane | wild


pair_record = record({
    "prompt": st.one_of(words.map(lambda w: "<image>What colour is it? " + w), words),
    "chosen": words, "rejected": words, "images": images})
question = st.sampled_from(["<image>\nWhat colour is the square?", "<image>\nHow many circles "
                            "are there?", "What?", "<image><image>Compare."])
turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "bot"]),
                              "value": words | anything})
conversation = (st.tuples(question, words).map(lambda qa: [
    {"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}])
    | st.lists(turn, max_size=4))
sft_record = record({"conversations": conversation, "image": images})

# rows a reader should mostly keep: the bad part, if any, is a detail (a suffix with a
# surrogate or NUL, an odd-sized, corrupt or missing image, a repeated id)
plausible = answers | st.tuples(answers, text).map("".join)
plausible_pair = st.fixed_dictionaries({
    "prompt": plausible.map(lambda w: "<image>What colour is it? " + w),
    "chosen": plausible, "rejected": plausible,
    "images": st.lists(image_names, min_size=1, max_size=1)},
    optional={"id": ids, "extra": anything})
plausible_sft = st.fixed_dictionaries({
    "conversations": st.tuples(question, plausible).map(lambda qa: [
        {"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]),
    "image": image_names}, optional={"id": ids, "extra": anything})
dumps = lambda v: json.dumps(v).encode("ascii")  # noqa: E731 - surrogates as \ud800 escapes
line = (pair_record.map(dumps) | sft_record.map(dumps) | anything.map(dumps)
        | st.binary(max_size=20).filter(lambda b: b"\n" not in b))  # not JSON, maybe not UTF-8


def mixed(good: st.SearchStrategy) -> st.SearchStrategy:
    """1-4 lines from ``good`` and 0-3 hostile lines, in a drawn order."""
    return st.tuples(st.lists(good.map(dumps), min_size=1, max_size=4),
                     st.lists(line, max_size=3)).flatmap(lambda t: st.permutations(t[0] + t[1]))


def write(folder: Path, lines: list[bytes]) -> tuple[Path, int]:
    """The JSONL file and its number of non-blank lines (the rows a reader sees)."""
    path = folder / "d.jsonl"
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    n = sum(1 for i, x in enumerate(path.read_bytes().split(b"\n"))
            if (x.removeprefix(b"\xef\xbb\xbf") if i == 0 else x).strip())
    return path, n


def fresh(image_dir: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=image_dir))
    for name in (*IMAGE_FILES, "truncated.png"):
        os.link(image_dir / name, tmp / name)  # not a symlink: that would escape the root
    return tmp


def rejects_reasons(out: Path) -> list[str]:
    from pairforge.sources.sft import reason_kind

    return [reason_kind(json.loads(x)["reason"])[:60]
            for x in (out / "rejects.jsonl").read_text().splitlines()]


@fuzz(60)
@given(lines=mixed(plausible_pair))
def test_read_pairs_keeps_or_skips_every_row(image_dir, lines):
    folder = fresh(image_dir)
    path, n = write(folder, lines)
    for fmt, load in (("trl", True), ("trl", False), (None, True)):
        try:
            stream = read_pairs(path, format=fmt, load_images=load)
            kept = list(stream)
        except PairforgeError as e:  # the file as a whole: one line
            assert "\n" not in str(e) and str(e)
            event(f"read_pairs {fmt}: file-level error")
            continue
        n_skipped = len(stream.skipped)
        event(f"read_pairs {fmt}: kept {min(len(kept), 2)}+, skipped {min(n_skipped, 2)}+")
        assert stream.n_read == n == len(kept) + len(stream.skipped)
        assert all(b.reason and b.row is not None for b in stream.skipped)
        assert len(stream.skipped_at) == len(stream.skipped)


@fuzz(12)
@given(lines=mixed(plausible_pair))
def test_text_audit_reconciles(image_dir, lines):
    folder = fresh(image_dir)
    path, n = write(folder, lines)
    try:
        (res,) = run_audit([str(path)], folder / "out", format="trl", tokenizer="words",
                           console=Console(file=io.StringIO()))
    except PairforgeError as e:
        assert "\n" not in str(e)
        event("audit: file-level error")
        return
    s = res.summary
    event(f"audit: pairs {min(s['n_pairs'], 2)}+, skipped {min(s['n_skipped'], 2)}+")
    assert s["n_read"] == n == s["n_pairs"] + s["n_skipped"]
    skipped = (folder / "out" / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == s["n_skipped"] and all(json.loads(x)["reason"] for x in skipped)
    assert len(res.ids) == s["n_pairs"]


@fuzz(10)
@given(lines=mixed(plausible_sft))
def test_tiny_vapr_build_reconciles(image_dir, lines):
    folder = fresh(image_dir)
    path, n = write(folder, lines)
    cfg = BuildConfig(recipe="vapr", source=str(path), out=folder / "b", chunk_size=4)
    try:
        s = build(cfg, progress=False, console=Console(file=io.StringIO()))
    except PairforgeError as e:
        assert "\n" not in str(e)
        event("build: file-level error")
        return
    c = s["counts"]
    event(f"build: pairs {min(c['examples_with_pairs'], 2)}+, rejected {min(c['rejected'], 2)}+")
    for r in rejects_reasons(folder / "b"):
        event(f"build reject: {r}")
    assert c["examples_in"] == c["examples_with_pairs"] + c["rejected"]
    assert c["examples_in"] >= n  # a multi-turn conversation is one example per turn
    rejects = [json.loads(x) for x in (folder / "b" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == c["rejected"] and all(r["reason"] and r["stage"] for r in rejects)
