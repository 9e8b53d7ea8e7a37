"""Word-level Levenshtein, lengths, identical / near-duplicate pairs (diagnostics.text)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pairforge.diagnostics import text
from pairforge.diagnostics.lengths import WordLengths
from pairforge.diagnostics.text import (
    SplitTexts,
    WordCodes,
    normalize_word,
    pair_metrics,
    reference_pair_metrics,
    word_levenshtein,
    words,
)

WORDS = WordLengths()


def one(chosen: str, rejected: str) -> dict:
    m = pair_metrics([chosen], [rejected], WORDS)
    return {k: v[0].item() for k, v in m.items()}


@pytest.mark.parametrize("token, word", [
    ("The", "the"), ("cat.", "cat"), ("(Red),", "red"), ("**bold**", "bold"),
    ("don't", "don't"), ("3.5", "3.5"), ("CAT!!!", "cat"), ("—", ""), ("_x_", "x"),
    ("«Été»", "été"),
])
def test_normalize_word(token, word):
    assert normalize_word(token) == word


def test_words_drop_punctuation_only_tokens():
    assert words("  The cat — sat.\n(On) the MAT!  ") == ["the", "cat", "sat", "on", "the", "mat"]
    assert words("") == [] and words("... — !") == []


@pytest.mark.parametrize("a, b, d", [
    ("the cat sat", "the dog sat", 1),               # one substitution
    ("", "a b", 2),                                   # two insertions
    ("a b c", "", 3),                                 # three deletions
    ("k i t t e n", "s i t t i n g", 3),              # kitten → sitting, on words
    ("a b c d", "b c d a", 2),                        # move = delete + insert
    ("same words here", "same words here", 0),
])
def test_word_levenshtein_hand_vectors(a, b, d):
    assert word_levenshtein(a.split(), b.split()) == d
    assert one(a, b)["lev_words"] == d


def test_case_and_edge_punctuation_do_not_count_as_edits():
    m = one("The cat sat on the mat.", "the CAT sat on a mat")
    assert m["lev_words"] == 1  # only the → a
    assert m["lev_norm"] == pytest.approx(1 / 6)
    assert not m["is_identical"]


def test_normalised_by_the_longer_answer_and_zero_when_both_empty():
    assert one("a b c d", "a b")["lev_norm"] == pytest.approx(0.5)   # 2 deletions / 4 words
    assert one("a b", "a b c d")["lev_norm"] == pytest.approx(0.5)
    assert one("a b", "")["lev_norm"] == 1.0
    both_empty = one("", "")
    assert both_empty["lev_words"] == 0 and both_empty["lev_norm"] == 0.0
    punct_only = one("...", "— !")  # whitespace tokens but no words
    assert punct_only["lev_norm"] == 0.0 and punct_only["len_chosen"] == 1


def test_identical_means_equal_up_to_whitespace():
    assert one("Two  circles.\n", " Two circles.")["is_identical"]
    case = one("Two circles", "two circles")
    assert not case["is_identical"] and case["lev_words"] == 0 and case["is_near_duplicate"]
    assert not one("Two circles.", "Two circles")["is_identical"]


def test_near_duplicate_threshold_is_inclusive():
    base = [f"w{i}" for i in range(20)]
    edited = base[:-1] + ["other"]
    assert one(" ".join(base), " ".join(edited))["lev_norm"] == pytest.approx(0.05)
    assert one(" ".join(base), " ".join(edited))["is_near_duplicate"]           # 1/20
    assert not one(" ".join(base[1:]), " ".join(edited[1:]))["is_near_duplicate"]  # 1/19


def test_lengths_gap_and_ratio_with_zero_guard():
    m = one("one two three", "one")
    assert (m["len_chosen"], m["len_rejected"], m["len_gap"]) == (3, 1, 2)
    assert m["len_ratio"] == 3.0
    assert one("a b", "")["len_ratio"] == 2.0   # an empty answer counts as length 1
    assert one("", "")["len_ratio"] == 1.0
    assert one("", "a b c d")["len_gap"] == -4


def test_empty_input_gives_empty_arrays():
    m = pair_metrics([], [], WORDS)
    assert all(len(v) == 0 for v in m.values())
    assert set(m) == set(reference_pair_metrics([], []))


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        pair_metrics(["a"], [], WORDS)


def _random_text(rng: random.Random) -> str:
    vocab = ["the", "The", "cat", "CAT.", "sat", "(on)", "mat!", "don't", "3.5", "—", "...",
             "Été", "ÉTÉ,", "naïve", "日本", "x_y", "**b**", "a", "A", "İstanbul", "ß", "😀"]
    seps = [" ", " ", " ", "  ", "\n", "\t", "\u00a0", "\u3000", "\x1c", " \n "]
    n = rng.randint(0, 25)
    out = rng.choice(["", " ", "\n"])
    for _ in range(n):
        out += rng.choice(vocab) + rng.choice(seps)
    return out if rng.random() < 0.5 else out.strip()


def _minimal_edit(rng: random.Random, t: str) -> str:
    toks = t.split()
    if toks:
        toks[rng.randrange(len(toks))] = rng.choice(["dog", "Cat", "sat."])
    return " ".join(toks)


def test_fast_path_equals_pure_python_on_random_inputs(monkeypatch):
    """Exact equality of every metric, over several batches run on threads."""
    monkeypatch.setattr(text, "BATCH_PAIRS", 64)
    rng = random.Random(7)
    chosen = [_random_text(rng) for _ in range(600)]
    rejected = [_minimal_edit(rng, c) if rng.random() < 0.4 else _random_text(rng)
                for c in chosen]
    rejected[:5] = chosen[:5]  # some identical pairs
    fast = pair_metrics(chosen, rejected, WORDS, threads=2)
    ref = reference_pair_metrics(chosen, rejected)
    assert set(fast) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(fast[k], ref[k], err_msg=k)
    assert fast["is_identical"][:5].all() and 0 < fast["lev_words"].mean()


def test_batches_with_too_many_words_are_split(monkeypatch):
    """When a batch has more distinct words than code points, it is halved until it fits."""
    monkeypatch.setattr(text, "_MAX_CODES", 40)
    monkeypatch.setattr(text, "_WORD_CODES", WordCodes())
    chosen = [" ".join(f"c{i}_{j}" for j in range(10)) for i in range(8)]
    rejected = [" ".join(f"r{i}_{j}" for j in range(5)) for i in range(8)]
    m = pair_metrics(chosen, rejected, WORDS)
    np.testing.assert_array_equal(m["lev_words"], [10] * 8)


def test_word_codes_survive_a_cache_reset(monkeypatch):
    monkeypatch.setattr(WordCodes, "LIMIT", 6)
    monkeypatch.setattr(text, "_WORD_CODES", WordCodes())
    rng = random.Random(3)
    chosen = [_random_text(rng) for _ in range(50)]
    rejected = [_random_text(rng) for _ in range(50)]
    fast = pair_metrics(chosen, rejected, WORDS)
    np.testing.assert_array_equal(fast["lev_words"],
                                  reference_pair_metrics(chosen, rejected)["lev_words"])


def test_split_texts_whitespace_counts():
    texts = ["", " ", "a", " a b ", "a\n\nb\tc", "\u00a0x\u3000y "]
    assert SplitTexts.of(texts).whitespace_counts().tolist() == [len(t.split()) for t in texts]


# ----------------------------------------------------------------------------- unspaced scripts


def test_unspaced_scripts_are_detected_by_share_of_characters():
    texts = ["这是一只小猫咪。", "これはペンです。", "ฉันชอบกินข้าวผัด", "The cat sat.",
             "The name 王 appears once in this long English sentence.", ""]
    assert text.unspaced(texts).tolist() == [True, True, True, False, False, False]
    assert text.choose_edit_unit(np.array([True] * 1 + [False] * 9)) == "characters"  # 10%
    assert text.choose_edit_unit(np.array([True] * 1 + [False] * 10)) == "words"
    assert text.choose_edit_unit(np.array([], dtype=bool)) == "words"


def test_character_edits_by_hand():
    """这是一只小猫咪。 vs 这是一只小狗。: characters 这是一只小猫咪 (7) vs 这是一只小狗 (6);
    猫→狗 and delete 咪: distance 2, normalised 2/7. Thai keeps its combining vowels."""
    from pairforge.diagnostics.lengths import CharacterLengths

    assert text.characters("这是一只小猫咪。") == "这是一只小猫咪"
    assert text.characters("The Cat, sat!") == "thecatsat"
    assert text.characters("กินข้าว") == "กินข้าว"  # marks (ิ ้) kept
    c = ["这是一只小猫咪。", "ฉันชอบกินข้าวผัด", "The cat sat."]
    r = ["这是一只小狗。", "ฉันชอบกินข้าวต้ม", "The dog sat."]
    m = text.pair_metrics(c, r, CharacterLengths(), edit_unit="characters")
    assert m["lev_words"].tolist() == [2, 3, 3]
    assert m["lev_norm"][0] == pytest.approx(2 / 7)
    assert m["len_chosen"].tolist() == [7, 16, 9] and m["words_rejected"].tolist() == [6, 16, 9]
    ref = text.reference_pair_metrics(c, r, edit_unit="characters")
    for k in ref:
        np.testing.assert_array_equal(m[k], ref[k])
    # in words the first pair is one token each: "everything changed"
    assert text.pair_metrics(c, r, WordLengths())["lev_norm"][0] == 1.0
    with pytest.raises(Exception, match="edit unit"):
        text.pair_metrics(c, r, WordLengths(), edit_unit="bytes")
