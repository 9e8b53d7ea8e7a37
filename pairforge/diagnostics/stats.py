"""Set statistics and bias flags, from the per-pair metrics of :mod:`pairforge.diagnostics.text`.

Pure logic: numpy arrays in, JSON-able dicts out. Flag rules use
:data:`pairforge.diagnostics.thresholds.THRESHOLDS`; each flag carries one plain sentence.

Small samples: every rate flag fires only when the whole 95 % Wilson score interval of its
rate lies beyond the threshold (:data:`FLAG_RULE`), so a handful of pairs cannot raise one
(``length_shortcut`` needs at least 8 pairs all on one side). A rate past its threshold whose
interval still reaches back over it is listed under ``inconclusive`` instead, with the pair
count it rests on. ``skipped_rows`` and ``unspaced_in_words`` are counts, not estimates.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pairforge.diagnostics.model_based import wilson_ci95
from pairforge.diagnostics.text import UNSPACED_PAIR_RATE
from pairforge.diagnostics.thresholds import THRESHOLDS, Thresholds

#: How a rate flag is decided (written into summary.json and the report).
FLAG_RULE = ("a rate flag fires only when the 95% Wilson score interval of its rate lies "
             "entirely beyond the threshold; past the threshold but with an interval that "
             "reaches back over it, the flag is listed as inconclusive (too few pairs)")


def shortcut_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float | None:
    """Share of pairs the rule "pick the answer with the larger value" gets right; a tie counts
    half (the rule guesses). ``None`` for an empty set."""
    if len(chosen) == 0:
        return None
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def repeated(keys: np.ndarray) -> np.ndarray:
    """Per element: does its key occur more than once in ``keys``?"""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > 1


def set_summary(m: Mapping[str, np.ndarray], *, n_skipped: int, length_unit: str,
                edit_unit: str = "words", n_unspaced: int = 0,
                thresholds: Thresholds = THRESHOLDS) -> dict:
    """The statistics of one set plus its flags. ``m``: the
    :func:`~pairforge.diagnostics.text.pair_metrics` of all its pairs and ``prompt_repeated``
    (:func:`repeated` of their prompt keys); ``edit_unit`` the unit of their edit distances,
    ``n_unspaced`` how many pairs are in scripts written without spaces. Statistics of an
    empty set are ``None``; each rate a flag reads has a ``_ci95`` Wilson interval."""
    n = len(m["lev_words"])

    def stat(fn, key: str, *args) -> float | None:
        return round(float(fn(m[key], *args)), 6) if n else None

    def rate(values: np.ndarray) -> float | None:
        return round(float(np.mean(values)), 6) if n else None

    def shortcut(a: str, b: str) -> float | None:
        acc = shortcut_accuracy(m[a], m[b])
        return None if acc is None else round(acc, 6)

    def ci(k: float) -> list[float] | None:
        c = wilson_ci95(k, n)
        return None if c is None else [round(c[0], 6), round(c[1], 6)]

    def wins(a: str, b: str) -> float:  # pairs the "larger value" rule gets right, ties half
        return float(np.sum(m[a] > m[b]) + 0.5 * np.sum(m[a] == m[b])) if n else 0.0

    out = {
        "n_pairs": n,
        "n_skipped": n_skipped,
        "n_read": n + n_skipped,
        "length_unit": length_unit,
        "edit_unit": edit_unit,
        "unspaced_rate": round(n_unspaced / n, 6) if n else None,
        "lev_words_mean": stat(np.mean, "lev_words"),
        "lev_words_median": stat(np.median, "lev_words"),
        "lev_words_p90": stat(np.percentile, "lev_words", 90),
        "lev_norm_mean": stat(np.mean, "lev_norm"),
        "lev_norm_median": stat(np.median, "lev_norm"),
        "lev_norm_p10": stat(np.percentile, "lev_norm", 10),
        "lev_norm_p90": stat(np.percentile, "lev_norm", 90),
        "len_chosen_mean": stat(np.mean, "len_chosen"),
        "len_rejected_mean": stat(np.mean, "len_rejected"),
        "len_gap_mean": stat(np.mean, "len_gap"),
        "len_gap_median": stat(np.median, "len_gap"),
        "len_gap_p10": stat(np.percentile, "len_gap", 10),
        "len_gap_p90": stat(np.percentile, "len_gap", 90),
        "len_ratio_median": stat(np.median, "len_ratio"),
        "chosen_longer_rate": shortcut("len_chosen", "len_rejected"),
        "chosen_more_words_rate": shortcut("words_chosen", "words_rejected"),
        "identical_rate": rate(m["is_identical"]),
        "near_duplicate_rate": rate(m["is_near_duplicate"]),
        "repeated_prompt_rate": rate(m["prompt_repeated"]),
        "style_lev_norm_rate": rate(m["lev_norm"] > thresholds.style_lev_norm_median),
    }
    out.update({
        "chosen_longer_rate_ci95": ci(wins("len_chosen", "len_rejected")),
        "chosen_more_words_rate_ci95": ci(wins("words_chosen", "words_rejected")),
        "identical_rate_ci95": ci(float(np.sum(m["is_identical"]))),
        "near_duplicate_rate_ci95": ci(float(np.sum(m["is_near_duplicate"]))),
        "repeated_prompt_rate_ci95": ci(float(np.sum(m["prompt_repeated"]))),
        "style_lev_norm_rate_ci95": ci(float(np.sum(m["lev_norm"] > thresholds.style_lev_norm_median))),
        "flag_rule": FLAG_RULE,
    })
    out["flags"], out["inconclusive"] = set_flags(out, thresholds, with_inconclusive=True)
    return out


def set_flags(s: Mapping, t: Thresholds = THRESHOLDS, *, with_inconclusive: bool = False):
    """The flags a set summary raises: ``{id, message, value, threshold, ci95}`` each (see
    :data:`FLAG_RULE`). With ``with_inconclusive``: ``(flags, inconclusive)``, the second
    listing the rates past their threshold whose interval does not exclude it."""
    flags: list[dict] = []
    inconclusive: list[dict] = []

    def flag(id: str, value: float, threshold: str, message: str, ci=None) -> None:
        flags.append({"id": id, "message": message, "value": value, "threshold": threshold,
                      "ci95": ci})

    def beyond(key: str, high: float | None = None, low: float | None = None,
               strict: bool = False) -> str | None:
        """'high' / 'low' when the rate and its whole CI are past a threshold; records an
        inconclusive entry when only the rate is."""
        v, c = s[key], s.get(f"{key}_ci95")
        past_high = high is not None and (v > high if strict else v >= high)
        past_low = low is not None and v <= low
        if not (past_high or past_low):
            return None
        lo, hi = c if c else (v, v)
        if past_high and (lo > high if strict else lo >= high):
            return "high"
        if past_low and hi <= low:
            return "low"
        inconclusive.append({"key": key, "value": v, "ci95": c, "n_pairs": s["n_pairs"],
                             "threshold": high if past_high else low})
        return None

    def ci_text(key: str) -> str:
        c = s.get(f"{key}_ci95")
        return f" (95% CI {c[0]:.0%}–{c[1]:.0%}, {s['n_pairs']:,} pairs)" if c else ""

    if s["n_skipped"]:
        v = round(s["n_skipped"] / s["n_read"], 6)
        flag("skipped_rows", v, "n_skipped > 0",
             f"{s['n_skipped']} of {s['n_read']} rows ({v:.1%}) could not be read and were "
             f"skipped; skipped.jsonl says why.")
    if not s["n_pairs"]:
        return (flags, inconclusive) if with_inconclusive else flags
    unit, edit_unit = s["length_unit"], s.get("edit_unit", "words")
    count = "characters" if edit_unit == "characters" else "words"
    if edit_unit == "words" and (s.get("unspaced_rate") or 0) >= UNSPACED_PAIR_RATE:
        v = s["unspaced_rate"]
        flag("unspaced_in_words", v, f"edit_unit == words and unspaced_rate >= "
                                     f"{UNSPACED_PAIR_RATE}",
             f"{v:.0%} of pairs are in scripts written without spaces (Chinese, Japanese, "
             f"Thai...), but the set was measured in words (decided on its first pairs): "
             f"their edit distances are too coarse; audit those pairs as a set of their own.")
    shortcuts = [("length_shortcut", "chosen_longer_rate",
                  f"longer answer (in {unit})", f"shorter answer (in {unit})")]
    if unit != count:  # with lengths in the edit unit both rules are the same rule
        shortcuts.append(("word_count_shortcut" if count == "words" else "char_count_shortcut",
                          "chosen_more_words_rate", f"answer with more {count}",
                          f"answer with fewer {count}"))
    for id, key, more, fewer in shortcuts:
        v = s[key]
        rule = (f"{key} >= {t.length_shortcut_high} or <= {t.length_shortcut_low}, "
                f"95% CI beyond it")
        side = beyond(key, t.length_shortcut_high, t.length_shortcut_low)
        if side:
            what, acc = (more, v) if side == "high" else (fewer, 1 - v)
            flag(id, v, rule,
                 f"Picking the {what} finds the chosen one in {acc:.0%} of pairs (ties count "
                 f"half){ci_text(key)}: a model can learn length instead of content.",
                 s.get(f"{key}_ci95"))
    v = s["identical_rate"]
    if beyond("identical_rate", t.identical_rate, strict=True):
        flag("identical_pairs", v, f"identical_rate > {t.identical_rate}, 95% CI beyond it",
             f"{v:.1%} of pairs have the same chosen and rejected text (up to whitespace)"
             f"{ci_text('identical_rate')}: they carry no preference and should be removed.",
             s.get("identical_rate_ci95"))
    v = s["near_duplicate_rate"]
    if beyond("near_duplicate_rate", t.near_duplicate_rate, strict=True):
        flag("near_duplicates", v, f"near_duplicate_rate > {t.near_duplicate_rate}, 95% CI "
                                   f"beyond it",
             f"{v:.0%} of pairs differ in at most {t.near_duplicate_lev_norm:.0%} of their "
             f"{count}{ci_text('near_duplicate_rate')}: the preference rests on a "
             f"{'word' if count == 'words' else 'character'} or two, so check that those "
             f"edits really make the rejected answer wrong (expected for minimal-edit sets such "
             f"as VaPR).",
             s.get("near_duplicate_rate_ci95"))
    # the median lev_norm is above the threshold with confidence when the share of pairs
    # above it is above one half with confidence (a sign test)
    if s.get("style_lev_norm_rate") is not None and beyond("style_lev_norm_rate", 0.5,
                                                              strict=True):
        v = s["lev_norm_median"]
        flag("style_different", v, f"lev_norm_median > {t.style_lev_norm_median} (share of "
                                   f"pairs above it > 0.5, 95% CI beyond it)",
             f"The median pair differs in {v:.0%} of its {count} ({s['style_lev_norm_rate']:.0%} "
             f"of pairs differ in more than {t.style_lev_norm_median:.0%}"
             f"{ci_text('style_lev_norm_rate')}): chosen and rejected differ in style, not "
             f"only in content, so a model can learn the style instead of the facts.",
             s.get("style_lev_norm_rate_ci95"))
    v = s["repeated_prompt_rate"]
    if beyond("repeated_prompt_rate", t.repeated_prompt_rate, strict=True):
        flag("repeated_prompts", v, f"repeated_prompt_rate > {t.repeated_prompt_rate}, 95% CI "
                                    f"beyond it",
             f"{v:.0%} of pairs share their prompt text and image count with another pair"
             f"{ci_text('repeated_prompt_rate')}: split train/eval by prompt, and expect "
             f"those prompts to weigh more in training.", s.get("repeated_prompt_rate_ci95"))
    return (flags, inconclusive) if with_inconclusive else flags


def integrity_summary(m: Mapping[str, np.ndarray]) -> dict:
    """Rows that are there but not as they should be, with their flags: ids that occur more
    than once in the set (``id_repeated``; the pairs are kept, each counted) and pairs whose
    images name no readable file (``images_unresolved``: per pair, images missing or empty
    under the image root). ``flags`` lists ``duplicate_ids`` / ``images_unresolved`` when
    any occur."""
    n_dup = int(np.sum(m["id_repeated"]))
    n_unres = int(np.sum(m["images_unresolved"] > 0))
    n = len(m["id_repeated"])
    out = {"n_duplicate_id_pairs": n_dup, "n_pairs_images_unresolved": n_unres,
           "n_images_unresolved": int(np.sum(m["images_unresolved"]))}
    flags = []
    if n_dup:
        flags.append({"id": "duplicate_ids", "value": n_dup, "threshold": "n_duplicate_id_pairs > 0",
                      "message": f"{n_dup} of {n} pairs share their id with another pair of the "
                                 f"set (id_repeated in pairs.parquet): both are kept; make ids "
                                 f"unique or drop the duplicates before training."})
    if n_unres:
        flags.append({"id": "images_unresolved", "value": n_unres,
                      "threshold": "n_pairs_images_unresolved > 0",
                      "message": f"{n_unres} of {n} pairs refer to image files that are missing "
                                 f"or empty under the image root (images_unresolved in "
                                 f"pairs.parquet): a trainer cannot load them; pass --image-root "
                                 f"or fix the paths."})
    out["flags"] = flags
    return out
