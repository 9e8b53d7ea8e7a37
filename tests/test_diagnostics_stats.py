"""Set statistics, shortcut accuracies and flags (pairforge.diagnostics.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from pairforge.diagnostics.stats import repeated, set_summary, shortcut_accuracy

REQUIRED = {"n_pairs", "n_skipped", "lev_words_mean", "lev_words_median", "lev_norm_mean",
            "len_chosen_mean", "len_rejected_mean", "len_gap_mean", "len_gap_median",
            "chosen_longer_rate", "identical_rate", "near_duplicate_rate", "length_unit",
            "repeated_prompt_rate", "lev_norm_median", "flags"}


def metrics(n: int = 100, *, longer: int = 50, shorter: int = 50, identical: int = 0,
            near_dup: int = 0, lev_norm: float = 0.3) -> dict[str, np.ndarray]:
    """``n`` pairs: ``longer`` with a longer chosen answer, ``shorter`` with a shorter one, the
    rest ties; the first ``identical`` pairs identical, the first ``near_dup`` near-duplicates."""
    len_c = np.full(n, 10)
    len_r = np.full(n, 10)
    len_r[:longer] = 5
    len_r[longer:longer + shorter] = 15
    lev_norm_a = np.full(n, lev_norm)
    lev_norm_a[:near_dup] = 0.0
    return {"lev_words": np.round(lev_norm_a * 10).astype(np.int32), "lev_norm": lev_norm_a,
            "len_chosen": len_c, "len_rejected": len_r, "len_gap": len_c - len_r,
            "len_ratio": len_c / len_r, "words_chosen": len_c, "words_rejected": len_r,
            "is_identical": np.arange(n) < identical, "is_near_duplicate": np.arange(n) < near_dup}


def summary(m=None, *, repeated_prompts: int = 0, n_skipped: int = 0, unit: str = "words") -> dict:
    m = dict(metrics() if m is None else m)
    m["prompt_repeated"] = np.arange(len(m["lev_words"])) < repeated_prompts
    return set_summary(m, n_skipped=n_skipped, length_unit=unit)


def flag_ids(s: dict) -> set[str]:
    return {f["id"] for f in s["flags"]}


def test_shortcut_accuracy_counts_ties_half():
    # wins, tie, loss, tie → (1 + 0.5 + 0 + 0.5) / 4
    assert shortcut_accuracy(np.array([3, 2, 2, 1]), np.array([1, 2, 3, 1])) == 0.5
    assert shortcut_accuracy(np.array([5, 5, 5]), np.array([1, 5, 9])) == pytest.approx(0.5)
    assert shortcut_accuracy(np.array([2, 2]), np.array([1, 1])) == 1.0
    assert shortcut_accuracy(np.array([]), np.array([])) is None


def test_repeated_marks_every_member_of_a_repeated_key():
    assert repeated(np.array([1, 2, 1, 3, 2, 4])).tolist() == [True, True, True, False, True, False]
    assert repeated(np.array([], dtype=np.int64)).tolist() == []


def test_summary_values_by_hand():
    s = summary(metrics(4, longer=2, shorter=1, identical=1, near_dup=2),
                repeated_prompts=2, n_skipped=1)
    assert REQUIRED <= set(s)
    assert (s["n_pairs"], s["n_skipped"], s["n_read"]) == (4, 1, 5)
    assert s["chosen_longer_rate"] == pytest.approx((2 + 0.5) / 4)  # 2 longer, 1 tie
    assert s["len_gap_mean"] == pytest.approx((5 + 5 - 5 + 0) / 4)
    assert s["len_gap_median"] == pytest.approx(2.5)
    assert s["identical_rate"] == 0.25 and s["near_duplicate_rate"] == 0.5
    assert s["repeated_prompt_rate"] == 0.5
    assert s["lev_norm_median"] == pytest.approx(0.15)  # median of 0, 0, 0.3, 0.3
    assert s["len_chosen_mean"] == 10 and s["len_rejected_mean"] == pytest.approx(35 / 4)


def test_balanced_set_raises_no_flag():
    s = summary()
    assert s["flags"] == []


@pytest.mark.parametrize("longer, shorter, rate, fires", [
    (65, 35, 0.65, True), (64, 36, 0.64, False), (36, 64, 0.36, False), (35, 65, 0.35, True),
    (0, 30, 0.35, True),  # 70 ties count half: 35 / 100
    (50, 50, 0.5, False),
])
def test_length_shortcut_thresholds(longer, shorter, rate, fires):
    s = summary(metrics(longer=longer, shorter=shorter))
    assert s["chosen_longer_rate"] == pytest.approx(rate)
    assert ("length_shortcut" in flag_ids(s)) == fires


def test_shorter_shortcut_says_shorter():
    s = summary(metrics(longer=10, shorter=90))
    (f,) = [f for f in s["flags"] if f["id"] == "length_shortcut"]
    assert "shorter" in f["message"] and "90%" in f["message"]
    assert f["value"] == pytest.approx(0.1) and "0.65" in f["threshold"]


def test_word_count_shortcut_only_for_non_word_units():
    m = metrics(longer=80, shorter=10)
    assert flag_ids(summary(m, unit="words")) == {"length_shortcut"}
    assert flag_ids(summary(m, unit="gpt2")) == {"length_shortcut", "word_count_shortcut"}


def test_identical_flag_is_strictly_above_one_percent():
    assert "identical_pairs" not in flag_ids(summary(metrics(identical=1)))   # 1%
    assert "identical_pairs" in flag_ids(summary(metrics(identical=2)))       # 2%


def test_near_duplicate_style_and_repeated_prompt_flags():
    assert "near_duplicates" in flag_ids(summary(metrics(near_dup=11)))
    assert "near_duplicates" not in flag_ids(summary(metrics(near_dup=10)))
    assert "style_different" in flag_ids(summary(metrics(lev_norm=0.51)))
    assert "style_different" not in flag_ids(summary(metrics(lev_norm=0.5)))
    assert "repeated_prompts" in flag_ids(summary(repeated_prompts=11))
    assert "repeated_prompts" not in flag_ids(summary(repeated_prompts=10))


def test_every_flag_has_a_sentence_value_and_rule():
    s = summary(metrics(longer=90, shorter=0, identical=5, near_dup=30, lev_norm=0.9),
                repeated_prompts=50, n_skipped=3, unit="gpt2")
    assert flag_ids(s) == {"length_shortcut", "word_count_shortcut", "identical_pairs",
                           "near_duplicates", "style_different", "repeated_prompts",
                           "skipped_rows"}
    for f in s["flags"]:
        assert set(f) == {"id", "message", "value", "threshold"}
        assert f["message"].endswith(".") and "\n" not in f["message"]


def test_empty_set_has_no_statistics_but_reports_skipped_rows():
    m = {k: v[:0] for k, v in metrics().items()}
    s = summary(m, n_skipped=2)
    assert s["n_pairs"] == 0 and s["lev_words_mean"] is None and s["chosen_longer_rate"] is None
    assert flag_ids(s) == {"skipped_rows"}
