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
    (700, 300, 0.70, True),   # 95% CI 67–73%: beyond 0.65
    (660, 340, 0.66, False),  # past 0.65, but the CI (63–69%) reaches back over it
    (300, 700, 0.30, True), (340, 660, 0.34, False),
    (0, 300, 0.35, False),  # 700 ties count half: 350 / 1000, on the threshold
    (500, 500, 0.5, False),
])
def test_length_shortcut_thresholds(longer, shorter, rate, fires):
    s = summary(metrics(1000, longer=longer, shorter=shorter))
    assert s["chosen_longer_rate"] == pytest.approx(rate)
    assert ("length_shortcut" in flag_ids(s)) == fires
    past = rate >= 0.65 or rate <= 0.35
    assert ("chosen_longer_rate" in {x["key"] for x in s["inconclusive"]}) == (past and not fires)


def test_wilson_interval_by_hand():
    # all n pairs on one side: the Wilson lower bound is n / (n + z²), z² = 3.8415
    for n in (2, 7, 8):
        lo, hi = summary(metrics(n, longer=n, shorter=0))["chosen_longer_rate_ci95"]
        assert lo == pytest.approx(n / (n + 1.959964 ** 2), abs=1e-6) and hi == 1.0
    # k = 1 of n = 4: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z2 = 1.959964 ** 2
    p, n = 0.25, 4
    centre, half = (p + z2 / (2 * n)), 1.959964 * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    lo, hi = summary(metrics(4, identical=1))["identical_rate_ci95"]
    assert (lo, hi) == (pytest.approx((centre - half) / (1 + z2 / n), abs=1e-6),
                        pytest.approx((centre + half) / (1 + z2 / n), abs=1e-6))


def test_tiny_samples_raise_no_rate_flag():
    """2 pairs, both chosen longer: 100%, but the 95% CI (34–100%) includes 0.65."""
    s = summary(metrics(2, longer=2, shorter=0), unit="gpt2")
    assert flag_ids(s) == set()
    assert {x["key"] for x in s["inconclusive"]} == {"chosen_longer_rate",
                                                     "chosen_more_words_rate"}
    assert all(x["n_pairs"] == 2 for x in s["inconclusive"])
    assert "Wilson" in s["flag_rule"]
    # 7 pairs all longer: lower bound 7 / 10.84 = 0.646 < 0.65; 8 pairs: 0.676, it fires
    assert "length_shortcut" not in flag_ids(summary(metrics(7, longer=7, shorter=0)))
    assert "length_shortcut" in flag_ids(summary(metrics(8, longer=8, shorter=0)))


def test_shorter_shortcut_says_shorter():
    s = summary(metrics(longer=10, shorter=90))
    (f,) = [f for f in s["flags"] if f["id"] == "length_shortcut"]
    assert "shorter" in f["message"] and "90%" in f["message"] and "95% CI" in f["message"]
    assert f["value"] == pytest.approx(0.1) and "0.65" in f["threshold"]


def test_word_count_shortcut_only_for_non_word_units():
    m = metrics(longer=80, shorter=10)
    assert flag_ids(summary(m, unit="words")) == {"length_shortcut"}
    assert flag_ids(summary(m, unit="gpt2")) == {"length_shortcut", "word_count_shortcut"}


def test_identical_flag_needs_its_interval_above_one_percent():
    assert "identical_pairs" not in flag_ids(summary(metrics(1000, identical=10)))  # 1%
    s = summary(metrics(1000, identical=12))  # 1.2%, CI 0.7–2.1%: inconclusive
    assert "identical_pairs" not in flag_ids(s)
    assert [x["key"] for x in s["inconclusive"]] == ["identical_rate"]
    assert "identical_pairs" in flag_ids(summary(metrics(1000, identical=30)))  # CI 2.1–4.3%


def test_near_duplicate_style_and_repeated_prompt_flags():
    assert "near_duplicates" in flag_ids(summary(metrics(1000, near_dup=150)))
    assert "near_duplicates" not in flag_ids(summary(metrics(1000, near_dup=110)))
    assert "near_duplicates" not in flag_ids(summary(metrics(1000, near_dup=100)))
    assert "style_different" in flag_ids(summary(metrics(lev_norm=0.51)))
    assert "style_different" not in flag_ids(summary(metrics(lev_norm=0.5)))
    assert "style_different" not in flag_ids(summary(metrics(3, lev_norm=0.9)))  # 3 pairs
    assert "repeated_prompts" in flag_ids(summary(metrics(1000), repeated_prompts=150))
    assert "repeated_prompts" not in flag_ids(summary(metrics(1000), repeated_prompts=100))


def test_every_flag_has_a_sentence_value_and_rule():
    s = summary(metrics(longer=90, shorter=0, identical=5, near_dup=30, lev_norm=0.9),
                repeated_prompts=50, n_skipped=3, unit="gpt2")
    assert flag_ids(s) == {"length_shortcut", "word_count_shortcut", "identical_pairs",
                           "near_duplicates", "style_different", "repeated_prompts",
                           "skipped_rows"}
    for f in s["flags"]:
        assert set(f) == {"id", "message", "value", "threshold", "ci95"}
        assert f["message"].endswith(".") and "\n" not in f["message"]
        assert f["id"] == "skipped_rows" or "95% CI" in f["threshold"]


def test_character_sets_name_their_unit_and_words_sets_warn_about_unspaced_pairs():
    m = dict(metrics(longer=80, shorter=10), prompt_repeated=np.zeros(100, dtype=bool))
    s = set_summary(m, n_skipped=0, length_unit="gpt2", edit_unit="characters", n_unspaced=100)
    assert s["edit_unit"] == "characters" and s["unspaced_rate"] == 1.0
    assert flag_ids(s) == {"length_shortcut", "char_count_shortcut"}
    s = set_summary(m, n_skipped=0, length_unit="characters", edit_unit="characters")
    assert flag_ids(s) == {"length_shortcut"}  # lengths are characters: one rule
    s = set_summary(m, n_skipped=0, length_unit="words", n_unspaced=30)
    assert "unspaced_in_words" in flag_ids(s)


def test_empty_set_has_no_statistics_but_reports_skipped_rows():
    m = {k: v[:0] for k, v in metrics().items()}
    s = summary(m, n_skipped=2)
    assert s["n_pairs"] == 0 and s["lev_words_mean"] is None and s["chosen_longer_rate"] is None
    assert flag_ids(s) == {"skipped_rows"}
