"""The shapes world: scenes, ground truth, generated examples and the SFT dataset."""

from __future__ import annotations

import io
import random
import math
import re
from collections import defaultdict

import numpy as np
import pytest

import pairforge.world as W
from pairforge.world import tasks as T
from pairforge.world.tasks import relation

N = 2000  # examples checked by the generator-wide tests (about 2 s to generate)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [W.example_at("train", i, seed=7) for i in range(N)]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_scene_image_and_texts():
    a, b = W.example_at("train", 3, seed=11), W.example_at("train", 3, seed=11)
    assert _png(a["images"][0]) == _png(b["images"][0])
    assert (a["question"], a["answer"], a["scene"]) == (b["question"], b["answer"], b["scene"])
    assert _png(W.render_scene(W.sample_scene(5))) == _png(W.render_scene(W.sample_scene(5)))


def test_different_seed_differs():
    assert W.sample_scene(1) != W.sample_scene(2)
    imgs = {_png(W.render_scene(W.sample_scene(s))) for s in range(20)}
    assert len(imgs) == 20
    texts = {(r["question"], r["answer"]) for r in (W.example_at("train", 0, seed=s) for s in range(20))}
    assert len(texts) > 15


def test_render_depends_only_on_scene():
    scene = W.sample_scene(42)
    again = W.Scene.from_dict(scene.to_dict())
    assert again == scene
    assert _png(W.render_scene(again)) == _png(W.render_scene(scene))


# ----------------------------------------------------------------------------- ground truth


def test_boxes_inside_image_and_apart():
    for seed in range(300):
        s = W.sample_scene(seed, with_word=seed % 5 == 0)
        assert 1 <= len(s.objects) <= 6
        boxes = [o.box for o in s.objects] + ([s.word_box] if s.word_box else [])
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (seed, a, b)
        for o in s.objects:
            assert o.kind in W.KINDS and o.size in W.SIZES and o.color in W.colors_for(s.background)


def _nearest_color(rgb) -> str:
    return min(W.COLORS, key=lambda c: math.dist(W.COLORS[c], rgb))


def test_pixel_at_object_centre_has_its_colour():
    checked = 0
    for seed in range(200):
        s = W.sample_scene(seed)
        img = np.asarray(W.render_scene(s))
        for o in s.objects:
            cx, cy = int(o.center[0]), int(o.center[1])
            assert _nearest_color(img[cy, cx]) == o.color, (seed, o)
            checked += 1
        # a background pixel far from every object reads as the background, not a shape colour
        corner = img[0, 0].astype(float)
        assert math.dist(corner, W.BACKGROUNDS[s.background]) < 40
    assert checked > 500


def test_object_pixels_fill_their_box_edges():
    """The box is tight: every edge row/column of the box holds pixels of the object."""
    for seed in range(60):
        s = W.sample_scene(seed)
        img = np.asarray(W.render_scene(s)).astype(float)
        for o in s.objects:
            crop = img[o.y0:o.y1, o.x0:o.x1]
            is_obj = np.linalg.norm(crop - np.array(W.COLORS[o.color]), axis=2) < 30
            assert is_obj[0].any() and is_obj[-1].any() and is_obj[:, 0].any() and is_obj[:, -1].any(), (seed, o)


def test_sizes_separate_by_pixels():
    small, large = [], []
    for seed in range(300):
        for o in W.sample_scene(seed).objects:
            (small if o.size == "small" else large).append(max(o.x1 - o.x0, o.y1 - o.y0))
    assert small and large and max(small) < min(large)


def test_palette_contrasts_with_backgrounds():
    for bg in W.BACKGROUNDS:
        allowed = W.colors_for(bg)
        assert len(allowed) >= 8
    assert "black" not in W.colors_for("dark")
    assert len(W.COLORS) >= 8 and {"circle", "square", "triangle"} <= set(W.KINDS)


# ----------------------------------------------------------------------------- examples


def test_answer_span_is_answer_value(rows):
    for r in rows:
        assert r["answer"][r["answer_span_start"]:r["answer_span_end"]] == r["answer_value"]
        assert r["answer_value"]


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile("^" + "(.+?)".join(re.escape(p) for p in parts) + "$", re.IGNORECASE)


ANSWER_TEMPLATES = {
    "object": T.A_OBJECT, "color": T.A_COLOR, "size": T.A_SIZE,
    "counting": T.A_COUNT_MANY + T.A_COUNT_ONE, "spatial": T.A_SPATIAL,
    "existence": T.A_EXIST_YES + T.A_EXIST_NO, "referential": T.A_REF_KIND + T.A_REF_COLOR,
    "background": T.A_BACKGROUND, "captioning": T.A_CAPTION,
    "reasoning": T.A_MORE_YES + T.A_MORE_NO + T.A_SAME_YES + T.A_SAME_NO + T.A_LARGER_YES + T.A_LARGER_NO,
}
QUESTION_TEMPLATES = {
    "object": T.Q_OBJECT, "color": T.Q_COLOR, "size": T.Q_SIZE, "counting": T.Q_COUNT,
    "spatial": T.Q_SPATIAL, "existence": T.Q_EXIST, "referential": T.Q_REF_KIND + T.Q_REF_COLOR,
    "background": T.Q_BACKGROUND, "captioning": T.Q_CAPTION, "reasoning": T.Q_MORE + T.Q_SAME + T.Q_LARGER,
}


def test_every_task_has_three_phrasings(rows):
    """Each answer matches one of its task's templates; each task shows >= 3 answer and >= 3
    question templates."""
    used_a, used_q = defaultdict(set), defaultdict(set)
    for r in rows:
        if r["filter_reason"] is not None:
            continue
        t = r["task"]
        hits = [k for k, tpl in enumerate(ANSWER_TEMPLATES[t]) if _template_regex(tpl).match(r["answer"])]
        assert hits, (t, r["answer"])
        # several templates can match one text ("It is {V}." vs "It is a {V}."): count the most specific
        used_a[t].add(max(hits, key=lambda k: len(ANSWER_TEMPLATES[t][k])))
        hits_q = [k for k, tpl in enumerate(QUESTION_TEMPLATES[t]) if _template_regex(tpl).match(r["question"])]
        assert hits_q, (t, r["question"])
        used_q[t].add(max(hits_q, key=lambda k: len(QUESTION_TEMPLATES[t][k])))
    assert set(used_a) == set(W.TASKS)
    for t in W.TASKS:
        assert len(used_a[t]) >= 3 and len(used_q[t]) >= 3, t


def test_tasks_are_balanced(rows):
    counts = defaultdict(int)
    for r in rows:
        counts[r["task"]] += 1
    for t in W.TASKS:
        assert counts[t] > N / 10 * 0.7, (t, counts[t])


def test_filter_examples_present_and_marked(rows):
    by = defaultdict(list)
    for r in rows:
        by[r["filter_reason"]].append(r)
    assert set(by) == {None, *W.FILTER_REASONS}
    share = 1 - len(by[None]) / N
    assert 0.03 < share < 0.075
    for r in by["text_only"]:
        assert r["images"] == [] and r["scene"] is None
        assert all(p["type"] == "text" for p in r["messages"][0]["content"])
    for r in by["multiple_choice"]:
        assert all(f"\n{L}. " in r["question"] for L in "ABCD")
        assert r["answer_value"] in "ABCD"
        opt = r["target"]["options"]["ABCD".index(r["answer_value"])]
        assert opt == r["scene"]["objects"][r["target"]["object_index"]]["color"]
    for r in by["bbox"]:
        o = r["scene"]["objects"][r["target"]["object_index"]]
        assert [int(v) for v in re.findall(r"\d+", r["answer_value"])] == [o["x0"], o["y0"], o["x1"], o["y1"]]
    for r in by["ocr"]:
        assert r["scene"]["word"] and r["scene"]["word"] in r["answer"]
    for r in by[None]:
        assert len(r["images"]) == 1


def _attrs_in(phrase: str) -> dict:
    words = phrase.split()
    out = {}
    for w in words:
        if w in W.COLORS:
            out["color"] = w
        elif w in W.SIZES:
            out["size"] = w
        elif w in W.KINDS:
            out["kind"] = w
        elif w in W.PLURALS.values():
            out["kind"] = next(k for k, p in W.PLURALS.items() if p == w)
    return out


def _matching(scene: dict, attrs: dict) -> list[int]:
    return [i for i, o in enumerate(scene["objects"]) if all(o[k] == v for k, v in attrs.items())]


def test_questions_are_unambiguous(rows):
    """Each referring expression in a question picks out exactly the object asked about."""
    n = 0
    for r in rows:
        if r["filter_reason"] or r["task"] not in ("object", "color", "size", "spatial"):
            continue
        t = r["target"]
        for phrase, idx in zip(t["ignore"], (t["object_index"], t["reference_index"])):
            assert phrase in r["question"]
            assert _matching(r["scene"], _attrs_in(phrase)) == [idx], (r["question"], r["scene"])
            n += 1
    assert n > 400


def test_referential_questions_pick_one_object(rows):
    cells = {"top left corner": (0, 0), "top right corner": (2, 0), "bottom left corner": (0, 2),
             "bottom right corner": (2, 2), "center": (1, 1)}
    n_region = n_next = 0
    for r in rows:
        if r["task"] != "referential" or r["filter_reason"]:
            continue
        objs, t = r["scene"]["objects"], r["target"]
        centres = [((o["x0"] + o["x1"]) / 2, (o["y0"] + o["y1"]) / 2) for o in objs]
        region = next((c for name, c in cells.items() if f"in the {name}" in r["question"]), None)
        if region is not None:
            col, row = region
            inside = [i for i, (x, y) in enumerate(centres)
                      if col * 112 / 3 - 4 <= x <= (col + 1) * 112 / 3 + 4
                      and row * 112 / 3 - 4 <= y <= (row + 1) * 112 / 3 + 4]
            assert inside == [t["object_index"]], r["question"]
            n_region += 1
        else:
            ref = objs[t["reference_index"]]
            rel = next(k for k, p in W.RELATIONS.items() if f" {p} the " in r["question"])
            beyond = [i for i, (x, y) in enumerate(centres) if {
                "left": x < ref["x0"], "right": x > ref["x1"], "above": y < ref["y0"], "below": y > ref["y1"]}[rel]]
            assert beyond == [t["object_index"]], r["question"]
            n_next += 1
    assert n_region > 30 and n_next > 30


def test_ground_truth_answers(rows):
    """Answers agree with the scene, recomputed independently of the builders."""
    for r in rows:
        if r["filter_reason"]:
            continue
        s, t, o = r["scene"], r["target"], None
        if t["object_index"] >= 0:
            o = s["objects"][t["object_index"]]
        if r["task"] == "color":
            assert o["color"] == r["answer_value"]
        elif r["task"] == "object":
            assert o["kind"] == r["answer_value"]
        elif r["task"] == "size":
            assert o["size"] == r["answer_value"]
        elif r["task"] == "background":
            assert s["background"] == r["answer_value"]
        elif r["task"] == "counting":
            phrase = re.sub(r"^(how many|count the|what is the number of) ", "", r["question"].lower())
            n = len(_matching(s, _attrs_in(phrase.split(" are ")[0].split(" can ")[0].split(" in ")[0])))
            assert str(n) == t["value"], r["question"]
        elif r["task"] == "spatial":
            scene = W.Scene.from_dict(s)
            rel = relation(scene.objects[t["object_index"]], scene.objects[t["reference_index"]])
            assert W.RELATIONS[rel] == r["answer_value"]
        elif r["task"] == "existence":
            np_ = re.sub(r"^(is there an?|does the image contain an?|can you see an?) ", "",
                         r["question"].lower()).split(" in the ")[0].rstrip("?")
            present = bool(_matching(s, _attrs_in(np_)))
            assert r["answer_value"] == ("Yes" if present else "No"), r["question"]


def test_vocabulary_covers_everything_emitted(rows):
    vocab = set(W.vocabulary())
    assert len(vocab) == len(W.vocabulary())
    missing = {tok for r in rows for text in (r["question"], r["answer"]) for tok in W.tokenize(text)
               if tok not in vocab}
    assert not missing
    assert W.tokenize("It is 12, red.") == ["It", "is", "1", "2", ",", "red", "."]


def test_make_examples_covers_tasks():
    scene = W.sample_scene(0, n_objects=5)
    exs = W.make_examples(scene, seed=1)
    assert {e["task"] for e in exs} >= {"object", "color", "counting", "background", "captioning"}
    assert all(e["images"][0] is exs[0]["images"][0] for e in exs)
    assert len({e["id"] for e in exs}) == len(exs)
    assert all(W.grade(e, e["answer"]) == "correct" for e in exs)


# ----------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def dsd():
    return W.sft_dataset(n_train=40, n_validation=20, n_test=20, seed=3, progress=False)


def test_dataset_features_typed(dsd):
    from datasets import Image, List, Value

    f = dsd["train"].features
    assert f["images"] == List(Image())
    assert f["filter_reason"] == Value("string") and f["answer_span_start"] == Value("int32")
    assert f["scene"]["objects"].feature["x0"] == Value("int32")
    assert f["target"]["attribute"] == Value("string")
    from pairforge.schema import MESSAGES

    assert f["messages"] == MESSAGES
    row = dsd["train"][0]
    assert isinstance(row["scene"]["objects"], list) and isinstance(row["target"], dict)
    user, assistant = row["messages"]
    if row["images"]:
        assert user["content"][0] == {"type": "image", "text": None}
        assert row["images"][0].size == (112, 112)
    assert user["content"][-1]["text"] == row["question"]
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}


def test_splits_disjoint_and_independent_of_other_sizes(dsd):
    seeds = {s: {r["seed"] for r in dsd[s]} for s in dsd}
    ids = {s: set(dsd[s]["id"]) for s in dsd}
    scenes = {s: {str(r["scene"]) for r in dsd[s] if r["scene"]} for s in dsd}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not seeds[a] & seeds[b] and not ids[a] & ids[b] and not scenes[a] & scenes[b]
    other = W.sft_dataset(n_train=10, n_validation=0, n_test=5, seed=3, progress=False)
    assert other["train"]["answer"] == dsd["train"]["answer"][:10]
    assert other["test"]["question"] == dsd["test"]["question"][:5]
    assert len(other["validation"]) == 0


def test_dataset_rows_grade_correct(dsd):
    for split in dsd:
        for r in dsd[split]:
            assert W.grade(r, r["answer"]) == "correct", r["id"]


def test_filter_only_dataset_round_trips():
    d = W.sft_dataset(n_train=30, n_validation=0, n_test=0, seed=1, filter_share=1.0, progress=False)
    rows = list(d["train"])
    assert {r["filter_reason"] for r in rows} == set(W.FILTER_REASONS)
    for r in rows:
        assert (r["scene"] is None) == (r["filter_reason"] == "text_only") == (r["images"] == [])
        assert W.grade(r, r["answer"]) == "correct"


def test_user_errors_are_one_line():
    from pairforge.errors import PairforgeError

    with pytest.raises(PairforgeError, match="n_test is -1"):
        W.sft_dataset(1, 1, -1, progress=False)
    with pytest.raises(PairforgeError, match="unknown task 'colour'"):
        W.make_example(W.sample_scene(0), "colour", random.Random(0))
    with pytest.raises(PairforgeError, match="too small"):
        W.sample_scene(0, width=20)


def test_world_name_and_light_import():
    import subprocess
    import sys

    assert W.WORLD_NAME == "shapes" and len(W.TASKS) == 10
    out = subprocess.run([sys.executable, "-c", "import sys, pairforge.world; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_scenes_is_deterministic_and_varied():
    from pairforge.world import scenes

    a, b = scenes(20, seed=3), scenes(20, seed=3)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.to_dict() for s in scenes(20, seed=4)] != [s.to_dict() for s in a]
    assert len({len(s.objects) for s in a}) >= 3 and len({s.background for s in a}) >= 3
