"""ASPO annotations: sentence spans that tile the answer, min-max and sentence weights by hand
(the direction of perplexity: less perplexing → larger weight), :func:`annotate` with a
scripted policy and CLIP, one-sentence answers, bad rows named, the recipe wrapper, and a
random tiny LLaVA whose per-sentence log-probs add up exactly to the answer's."""

from __future__ import annotations

import io
import math
import os
import re

import pytest
from PIL import Image

from pairforge.errors import BadInput
from pairforge.models import Capability, ScoredResponse
from pairforge.models.hf import HFModel
from pairforge.models.random_tiny import save_random_llava
from pairforge.recipes import BuildContext, Example, load_recipe
from pairforge.recipes.aspo import annotate, aspo_weights, min_max, sentence_spans
from pairforge.schema import make_pair, to_dataset, user_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- fakes


class FakeClip:
    """cos = share of the text's words among the image's ``info["words"]``; records texts."""

    name, revision = "fake-clip", ""

    def __init__(self):
        self.texts = []

    def cosine(self, images, texts):
        self.texts += list(texts)
        out = []
        for im, t in zip(images, texts, strict=True):
            ws = re.findall(r"[a-z]+", t.lower())
            out.append(sum(w in im.info.get("words", ()) for w in ws) / len(ws) if ws else 0.0)
        return out


class WordPolicy:
    """Scores a response token by token (whitespace-led words, offsets including the space
    before, as the HF backend tiles them) with the log-prob of the word in ``lp``."""

    name, revision = "word-policy", ""
    capabilities = frozenset({Capability.SCORE, Capability.IMAGES})

    def __init__(self, lp: dict[str, float]):
        self.lp = lp
        self.calls = []

    def score(self, requests, responses):
        self.calls.append(list(responses))
        out = []
        for r in responses:
            toks = list(re.finditer(r"\s*\S+", r))
            out.append(ScoredResponse(r, [self.lp[m.group().strip()] for m in toks],
                                      [(m.start(), m.end()) for m in toks]))
        return out


def _row(chosen: str, image, rid: str = "r1", rejected: str = "Nothing here."):
    return make_pair(prompt="Describe the image.", chosen=chosen, rejected=rejected, images=[image], id=rid,
                     recipe="vapr", task="captioning")


def _img(words) -> Image.Image:
    im = Image.new("RGB", (32, 32), (10, 120, 200))
    im.info["words"] = set(words)
    return im


# ----------------------------------------------------------------------------- pure logic


@pytest.mark.parametrize("text,sentences", [
    ("It is red.", ["It is red."]),
    ("The square is red. The circle is blue!  Is it? Yes", ["The square is red.", " The circle is blue!",
                                                             "  Is it?", " Yes"]),
    ("There are e.g. two shapes. Value 3.5 here.\nNext line", ["There are e.g. two shapes.", " Value 3.5 here.",
                                                               "\nNext line"]),
    ("A list\n\n- one\n- two", ["A list", "\n\n- one", "\n- two"]),
    # pysbd reads a single capital + period as an initial ("John F. Kennedy"): no cut there
    ("The answer is A. It is red.", ["The answer is A. It is red."]),
    ("  Hi. ", ["  Hi. "]),
    ("(Really.) Done... ok", ["(Really.)", " Done... ok"]),  # an ellipsis before lower case goes on
    ("", []),
    # abbreviations, times and weekdays (issue 17 item 19: the old regex cut all of these)
    ("We met on Mon. at 3 p.m. in the lab. It rained.", ["We met on Mon. at 3 p.m. in the lab.", " It rained."]),
    ("We met on Mon. and talked.", ["We met on Mon. and talked."]),
    ("Open at 5 p.m. Come early.", ["Open at 5 p.m.", " Come early."]),
    ("Dr. Smith agrees. The U.S. flag is red.", ["Dr. Smith agrees.", " The U.S. flag is red."]),
    # numbers and decimals
    ("The box is 3.5 cm wide. It costs $2.75 today.", ["The box is 3.5 cm wide.", " It costs $2.75 today."]),
    ("Pi is approx. 3.14. Yes.", ["Pi is approx. 3.14.", " Yes."]),
    ("There are 3 circles. 2 are red.", ["There are 3 circles.", " 2 are red."]),
    ("Version 1.2.3 is out. See fig. 2 below.", ["Version 1.2.3 is out.", " See fig. 2 below."]),
])
def test_sentence_spans_tile_the_text(text, sentences):
    spans = sentence_spans(text)
    assert [text[s:e] for s, e in spans] == sentences
    if spans:
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_min_max_and_weights_hand_computed():
    assert min_max([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert min_max([7.0, 7.0]) == [0.0, 0.0] and min_max([3.0]) == [0.0]
    # S' = [0, 1, 1/3]; PPL' = min-max(−PPL) = [1, 0, 0.5]: the least perplexing sentence gets 1
    w = aspo_weights([0.2, 0.5, 0.3], [2.0, 4.0, 3.0], alpha=0.25)
    assert w == pytest.approx([0.75, 0.25, 0.25 / 3 + 0.375])
    assert aspo_weights([0.2, 0.5, 0.3], [2.0, 4.0, 3.0]) == pytest.approx([0.5, 0.5, 1 / 6 + 0.25])
    assert aspo_weights([0.9], [1.5]) == [0.0] and aspo_weights([], []) == []


# ----------------------------------------------------------------------------- annotate


def test_annotate_hand_computed_weights():
    lp = {"The": -1.0, "circle": -1.0, "is": -1.0, "red.": -1.0, "square": -2.0, "blue.": -2.0,
          "It": -0.5, "big.": -0.5}
    policy = WordPolicy(lp)
    clip = FakeClip()
    img = _img({"the", "circle", "is", "red"})
    text = "The circle is red. The square is blue. It is big."
    # tokens: s1 The circle is red. (−1 each) | s2 The square is blue. (−1, −2, −1, −2) | s3 It is big.
    # (−0.5, −1, −0.5)
    row, one = annotate([_row(text, img), _row("It is red.", img, rid="r2")], policy, clip)
    assert row["sentence_spans"] == [{"start": 0, "end": 18}, {"start": 18, "end": 38}, {"start": 38, "end": 49}]
    ppl = [math.exp(1.0), math.exp(1.5), math.exp(2 / 3)]
    sims = [1.0, 0.5, 1 / 3]
    s_norm = [1.0, 0.25, 0.0]
    p_norm = [(ppl[1] - x) / (ppl[1] - ppl[2]) for x in ppl]   # min-max of −PPL
    assert row["sentence_weights"] == pytest.approx([0.5 * a + 0.5 * b for a, b in zip(s_norm, p_norm)])
    assert row["sentence_similarities"] == pytest.approx(sims)  # raw S_i, for the trainer's weights
    assert one["sentence_similarities"] == [0.0]
    assert clip.texts == ["The circle is red.", "The square is blue.", "It is big."]
    assert sims == pytest.approx(FakeClip().cosine([img] * 3, clip.texts))
    # a one-sentence answer: weight 0 and no model call for it
    assert one["sentence_weights"] == [0.0] and one["sentence_spans"] == [{"start": 0, "end": 10}]
    assert policy.calls == [[text]]
    assert "sentence_weights" not in _row(text, img)  # the input rows are not modified
    ds = to_dataset([row, one], "aspo")
    assert ds.features["sentence_weights"].feature.dtype == "float32"


def test_annotate_names_a_bad_row():
    ok = _row("A. B.", _img({"a"}))
    no_image = make_pair(prompt="Text only?", chosen="Yes. Really.", rejected="No.", id="t")
    with pytest.raises(BadInput, match=r"set.jsonl, row 1, field 'images': has no image"):
        annotate([ok, no_image], WordPolicy({}), FakeClip(), where="set.jsonl")
    broken = dict(ok, chosen=[])
    with pytest.raises(BadInput, match=r"row 0, field 'chosen'"):
        annotate([broken], WordPolicy({}), FakeClip())


def test_recipe_wraps_annotate():
    img = _img({"the", "circle", "is", "red"})
    row = _row("The circle is red. It is big.", img)
    lp = {"The": -1.0, "circle": -1.0, "is": -1.0, "red.": -1.0, "It": -3.0, "big.": -3.0}
    ctx = BuildContext(models={"policy": WordPolicy(lp), "clip": FakeClip()})
    recipe = load_recipe("aspo", {"alpha": "0.5"})
    recipe.check(ctx)
    exs = [Example(id="a", messages=[user_message("x", n_images=0)], meta={"pair": row}),
           Example(id="b", messages=[user_message("x", n_images=0)]),
           Example(id="c", messages=[user_message("x", n_images=0)],
                   meta={"pair": make_pair(prompt="q?", chosen="A. B.", rejected="C.", id="z")})]
    out = recipe.process(exs, ctx)
    got = out[0].rows[0]
    assert got["sentence_weights"] == pytest.approx([1.0, 0.0])  # on-image and less perplexing
    assert got["recipe"] == "vapr" and got["id"] == "r1"        # provenance of the pair is kept
    assert [m["role"] for m in got["models"]] == ["aspo_policy", "aspo_clip"]
    assert out[0].stats == {"sentences": 2.0, "one_sentence": 0.0}
    assert out[1].reject.stage == "filter" and "meta['pair']" in out[1].reject.reason
    assert out[2].reject.stage == "filter" and "has no image" in out[2].reject.reason
    to_dataset([got], "aspo", "vapr")


def test_recipe_takes_a_pair_read_as_an_sft_example():
    """A pair file read as SFT examples: messages = prompt + chosen, the rejected in meta."""
    img = _img({"the", "circle", "is", "red"})
    lp = {"The": -1.0, "circle": -1.0, "is": -1.0, "red.": -1.0, "It": -3.0, "big.": -3.0}
    ctx = BuildContext(seed=4, models={"policy": WordPolicy(lp), "clip": FakeClip()})
    ex = Example(id="p1", messages=[user_message("Describe the image."),
                                    {"role": "assistant", "content": [{"type": "text",
                                                                       "text": "The circle is red. It is big."}]}],
                 images=[img], task="captioning", source_dataset="pairs.jsonl", source_id="p1",
                 meta={"rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A blue square."}]}]})
    out, = load_recipe("aspo").process([ex], ctx)
    row, = out.rows
    assert row["chosen"][0]["content"][0]["text"] == "The circle is red. It is big."
    assert row["rejected"][0]["content"][0]["text"] == "A blue square."
    assert row["images"] == [img] and row["sentence_weights"] == pytest.approx([1.0, 0.0])
    assert [m["role"] for m in row["models"]] == ["aspo_policy", "aspo_clip"]
    to_dataset([row], "aspo")


# ----------------------------------------------------------------------------- real backend


def test_random_llava_sentence_logprobs_partition_the_answer(tmp_path):
    llava = HFModel(save_random_llava(tmp_path / "llava"), batch_size=2, progress=False)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    image = {"bytes": buf.getvalue(), "path": None}  # as rows loaded from parquet carry it
    text = "The circle is red. The square is blue! Is it large?"
    row = make_pair(prompt="describe the image", chosen=text, rejected="no", images=[image], id="x")
    clip = FakeClip()
    out, = annotate([row], llava, clip)
    spans = [(s["start"], s["end"]) for s in out["sentence_spans"]]
    assert [text[s:e].strip() for s, e in spans] == ["The circle is red.", "The square is blue!",
                                                    "Is it large?"]
    scored, = llava.score([_request(row)], [text])
    per_sentence = [scored.span_logprobs(s, e) for s, e in spans]
    assert sum(len(x) for x in per_sentence) == scored.n_tokens
    assert sum(sum(x) for x in per_sentence) == pytest.approx(scored.sum_logprob, abs=1e-5)
    w = out["sentence_weights"]
    assert len(w) == 3 and all(0.0 <= x <= 1.0 for x in w) and max(w) > 0


def _request(row):
    from pairforge.models import Request

    return Request(row["prompt"], row["images"], id=row["id"])
