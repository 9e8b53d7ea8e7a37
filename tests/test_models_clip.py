"""CLIP scorers: CLIPScore test vector, the transformers CLIPScorer on a random tiny CLIP
(equal to a direct CLIPModel computation, batching- and duplicate-invariant, truncation said
once), the trained tiny CLIP's preference for true scene descriptions, and open_clip.

open_clip is an optional extra (open_clip_torch + torchvision, whose wheels pin another torch):
its tests skip here when it is not importable and run in their own venv through
``scripts/test_open_clip_env.sh``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from pairforge.errors import PairforgeError
from pairforge.models import ImageTextScorer, clip_score, load_model
from pairforge.models.clip import CLIPScorer, OpenCLIPScorer, clip_scores, load_clip_scorer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


@pytest.fixture(scope="module")
def world():
    """Three world scenes: images, true descriptions and one wrong description each."""
    from pairforge.world import render_scene, scenes
    from pairforge.world import models as wm

    sc = scenes(3, seed=5)
    images = [render_scene(s) for s in sc]
    trues = [wm.scene_description(s) for s in sc]
    wrongs = [wm.edited_description(s, "color", random.Random(i)) for i, s in enumerate(sc)]
    return images, trues, wrongs


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory) -> Path:
    """A random tiny CLIP in the tiny-clip layout (world tokenizer, 16 text positions)."""
    from transformers import CLIPModel

    from pairforge.world import vocabulary
    from pairforge.world import models as wm

    processor = wm.build_clip_processor(vocabulary(), max_length=16)
    config = wm.clip_config(len(processor.tokenizer), hidden=32, layers=1, heads=2,
                            projection_dim=16, max_positions=16)
    torch.manual_seed(0)
    return wm.save_checkpoint(CLIPModel(config), processor, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(random_clip_dir) -> CLIPScorer:
    return load_model(f"clip:{random_clip_dir}", progress=False)


# ----------------------------------------------------------------------------- CLIPScore


class _FixedScorer:
    """An ImageTextScorer whose cosines are given."""

    name, revision = "fixed", ""

    def __init__(self, cosines):
        self.cosines = cosines

    def cosine(self, images, texts):
        assert len(images) == len(texts) == len(self.cosines)
        return list(self.cosines)

    def cosine_matrix(self, images, texts):  # pragma: no cover - not used
        raise NotImplementedError


def test_clip_score_hand_computed_vector():
    # CLIPScore = 2.5 · max(cos, 0) (Hessel et al., 2021, eq. 1)
    fixed = _FixedScorer([0.3, -0.2, 0.0, 1.0, 0.284])
    assert isinstance(fixed, ImageTextScorer)
    got = clip_scores(fixed, ["i"] * 5, ["t"] * 5)
    assert got == pytest.approx([0.75, 0.0, 0.0, 2.5, 0.71])
    assert clip_scores(fixed, ["i"] * 5, ["t"] * 5, w=1.0) == pytest.approx([0.3, 0.0, 0.0, 1.0, 0.284])
    assert clip_score(0.3) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- transformers CLIP


def test_clip_scorer_equals_direct_clipmodel(scorer, random_clip_dir, world):
    from pairforge.world import models as wm

    images, trues, wrongs = world
    assert isinstance(scorer, ImageTextScorer) and isinstance(scorer, CLIPScorer)
    assert scorer.name == f"clip:{random_clip_dir}" and scorer.revision == ""
    model, processor = wm.load_tiny_clip(path=random_clip_dir)
    expected = wm.clip_similarity(model, processor, images, trues).tolist()
    assert scorer.cosine(images, trues) == pytest.approx(expected, abs=1e-5)
    matrix = scorer.cosine_matrix(images, trues + wrongs)
    assert len(matrix) == 3 and all(len(row) == 6 for row in matrix)
    assert [matrix[i][i] for i in range(3)] == pytest.approx(expected, abs=1e-5)
    assert [matrix[i][3 + i] for i in range(3)] == pytest.approx(scorer.cosine(images, wrongs), abs=1e-5)
    assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for row in matrix for c in row)
    assert scorer.cosine([], []) == [] and scorer.cosine_matrix([], ["a"]) == []


def test_batching_paths_and_duplicates_do_not_change_cosines(scorer, random_clip_dir, world, tmp_path):
    images, trues, _ = world
    paths = []
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    one = load_clip_scorer(f"clip:{random_clip_dir}", batch_size=1, progress=False)
    ref = scorer.cosine(images, trues)
    assert one.cosine(images, trues) == pytest.approx(ref, abs=1e-5)
    assert scorer.cosine(paths, trues) == pytest.approx(ref, abs=1e-5)
    # the same image against every text: embedded once, same numbers as the matrix row
    row = scorer.cosine([images[0]] * 3, trues)
    assert row == pytest.approx(scorer.cosine_matrix(images[:1], trues)[0], abs=1e-5)
    assert row[0] == pytest.approx(ref[0], abs=1e-5)


def test_long_texts_are_truncated_and_said_once(random_clip_dir, world, capsys):
    images, trues, _ = world
    fresh = CLIPScorer(random_clip_dir, progress=False)  # a bare folder means clip:
    assert fresh.max_text_tokens == 16
    long_text = trues[0] + " " + " ".join(["a red circle."] * 20)
    fresh.cosine(images[:1], [long_text])
    fresh.cosine(images[:1], [long_text + " a blue square."])
    err = capsys.readouterr().err
    assert err.count("truncated") == 1 and "16 tokens" in err
    # truncation keeps the first 16 tokens: any two texts sharing them score the same
    a, b = fresh.cosine(images[:1] * 2, [long_text, long_text + " green."])
    assert a == pytest.approx(b, abs=1e-6)


def test_clip_errors_are_one_line(tmp_path, scorer, world):
    images, trues, _ = world
    with pytest.raises(PairforgeError, match="no such folder"):
        load_model(f"clip:{tmp_path / 'nowhere'}")
    with pytest.raises(PairforgeError, match="paired one to one"):
        scorer.cosine(images, trues[:2])
    with pytest.raises(PairforgeError, match="not a CLIP scorer"):
        load_clip_scorer("hf:some/model")
    with pytest.raises(PairforgeError, match="image 0 cannot be read"):
        scorer.cosine([str(tmp_path / "missing.png")], ["a red circle."])


def test_tiny_clip_spec_names_the_shipped_checkpoint():
    from pairforge.world.models import TINY_CLIP_PATH

    if (TINY_CLIP_PATH / "config.json").is_file():
        s = load_model("tiny-clip", progress=False)
        assert isinstance(s, CLIPScorer) and s.name == "tiny-clip"
    else:
        with pytest.raises(PairforgeError, match="train_tiny_clip.py"):
            load_model("tiny-clip")


def _trained_tiny_clip() -> Path | None:
    """The shipped tiny CLIP, or the candidate being trained until it ships."""
    from pairforge.world.models import TINY_CLIP_PATH

    for path in (TINY_CLIP_PATH, Path("/tmp/tw/run1/tiny-clip")):
        if (path / "config.json").is_file():
            return path
    return None


@pytest.mark.skipif(_trained_tiny_clip() is None,
                    reason="no trained tiny CLIP (pairforge/world/assets/tiny-clip nor the "
                           "training candidate /tmp/tw/run1/tiny-clip)")
def test_trained_tiny_clip_prefers_true_descriptions():
    from pairforge.world import render_scene, scenes
    from pairforge.world import models as wm

    s = load_model(f"clip:{_trained_tiny_clip()}", progress=False)
    images, trues, wrongs = [], [], []
    for i, scene in enumerate(scenes(20, seed=11)):
        for edit in ("color", "count"):  # the edits the model card reports as learned
            wrong = wm.edited_description(scene, edit, random.Random(i))
            if wrong is not None:
                images.append(render_scene(scene))
                trues.append(wm.scene_description(scene))
                wrongs.append(wrong)
    true_cos, wrong_cos = s.cosine(images, trues), s.cosine(images, wrongs)
    wins = sum(t > w for t, w in zip(true_cos, wrong_cos))
    assert len(images) >= 30 and wins >= 0.9 * len(images), (wins, len(images))  # measured 38 of 39
    # CLIPScore of a true description: 2.5 · its (positive) cosine
    assert true_cos[0] > 0
    assert clip_scores(s, images[:1], trues[:1]) == pytest.approx([2.5 * true_cos[0]], abs=1e-5)


# ----------------------------------------------------------------------------- open_clip


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed; this checks the error without it")
def test_open_clip_missing_names_the_extra():
    with pytest.raises(PairforgeError, match=r"pairforge\[open_clip\].*open_clip_torch, torchvision"):
        load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")


TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                 "patch_size": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                               "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory):
    """A random tiny open_clip model: its config registered as 'pf-tiny-clip', its weights in
    a local checkpoint file, and a local-dir folder (open_clip_config.json + weights)."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (optional extra "
                                    "[open_clip]; run scripts/test_open_clip_env.sh)")
    root = tmp_path_factory.mktemp("open_clip")
    (root / "configs").mkdir()
    (root / "configs" / "pf-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("pf-tiny-clip")
    ckpt = root / "pf-tiny-clip.pt"
    torch.save(model.state_dict(), ckpt)
    folder = root / "local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    shutil.copyfile(ckpt, folder / "open_clip_pytorch_model.bin")
    return open_clip, model.eval(), ckpt, folder


def test_open_clip_scorer_from_local_checkpoint(open_clip_ckpt, world, capsys):
    open_clip, model, ckpt, folder = open_clip_ckpt
    images, trues, wrongs = world
    s = load_model(f"open_clip:pf-tiny-clip/{ckpt}", progress=False)
    assert isinstance(s, OpenCLIPScorer) and isinstance(s, ImageTextScorer)
    assert s.name == f"open_clip:pf-tiny-clip/{ckpt}" and len(s.revision) == 16
    _, _, preprocess = open_clip.create_model_and_transforms("pf-tiny-clip")
    tokenizer = open_clip.get_tokenizer("pf-tiny-clip")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(tokenizer(trues))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1).tolist()
    assert s.cosine(images, trues) == pytest.approx(expected, abs=1e-5)
    matrix = s.cosine_matrix(images, trues + wrongs)
    assert [matrix[i][i] for i in range(3)] == pytest.approx(expected, abs=1e-5)
    # the descriptions are longer than 16 tokens: truncated, said once
    assert capsys.readouterr().err.count("truncated") == 1
    # the same weights through a local-dir folder give the same numbers
    local = load_model(f"open_clip:local-dir:{folder}", progress=False)
    assert local.cosine(images, trues) == pytest.approx(expected, abs=1e-5)
    assert local.revision == s.revision  # same bytes, same sha256


def test_open_clip_spec_errors(open_clip_ckpt, tmp_path):
    with pytest.raises(PairforgeError, match="unknown open_clip architecture"):
        load_model("open_clip:No-Such-Arch/openai")
    with pytest.raises(PairforgeError, match="neither a checkpoint file nor a pretrained tag"):
        load_model(f"open_clip:pf-tiny-clip/{tmp_path / 'missing.pt'}")
    with pytest.raises(PairforgeError, match="open_clip_config.json"):
        load_model(f"open_clip:local-dir:{tmp_path}")
