"""Set statistics and bias flags, from the per-pair metrics of :mod:`pairforge.diagnostics.text`.

Pure logic: numpy arrays in, JSON-able dicts out. Flag rules use
:data:`pairforge.diagnostics.thresholds.THRESHOLDS`; each flag carries one plain sentence.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pairforge.diagnostics.thresholds import THRESHOLDS, Thresholds


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
                thresholds: Thresholds = THRESHOLDS) -> dict:
    """The statistics of one set plus its flags. ``m``: the
    :func:`~pairforge.diagnostics.text.pair_metrics` of all its pairs and ``prompt_repeated``
    (:func:`repeated` of their prompt keys). Statistics of an empty set are ``None``."""
    n = len(m["lev_words"])

    def stat(fn, key: str, *args) -> float | None:
        return round(float(fn(m[key], *args)), 6) if n else None

    def rate(values: np.ndarray) -> float | None:
        return round(float(np.mean(values)), 6) if n else None

    def shortcut(a: str, b: str) -> float | None:
        acc = shortcut_accuracy(m[a], m[b])
        return None if acc is None else round(acc, 6)

    out = {
        "n_pairs": n,
        "n_skipped": n_skipped,
        "n_read": n + n_skipped,
        "length_unit": length_unit,
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
    }
    out["flags"] = set_flags(out, thresholds)
    return out


def set_flags(s: Mapping, t: Thresholds = THRESHOLDS) -> list[dict]:
    """The flags a set summary raises: ``{id, message, value, threshold}`` each."""
    flags = []

    def flag(id: str, value: float, threshold: str, message: str) -> None:
        flags.append({"id": id, "message": message, "value": value, "threshold": threshold})

    if s["n_skipped"]:
        v = round(s["n_skipped"] / s["n_read"], 6)
        flag("skipped_rows", v, "n_skipped > 0",
             f"{s['n_skipped']} of {s['n_read']} rows ({v:.1%}) could not be read and were "
             f"skipped; skipped.jsonl says why.")
    if not s["n_pairs"]:
        return flags
    unit = s["length_unit"]
    shortcuts = [("length_shortcut", "chosen_longer_rate",
                  f"longer answer (in {unit})", f"shorter answer (in {unit})")]
    if unit != "words":  # with word lengths both rules are the same rule
        shortcuts.append(("word_count_shortcut", "chosen_more_words_rate",
                          "answer with more words", "answer with fewer words"))
    for id, key, more, fewer in shortcuts:
        v, rule = s[key], f"{key} >= {t.length_shortcut_high} or <= {t.length_shortcut_low}"
        if v >= t.length_shortcut_high or v <= t.length_shortcut_low:
            what, acc = (more, v) if v >= t.length_shortcut_high else (fewer, 1 - v)
            flag(id, v, rule,
                 f"Picking the {what} finds the chosen one in {acc:.0%} of pairs (ties count "
                 f"half): a model can learn length instead of content.")
    v = s["identical_rate"]
    if v > t.identical_rate:
        flag("identical_pairs", v, f"identical_rate > {t.identical_rate}",
             f"{v:.1%} of pairs have the same chosen and rejected text (up to whitespace): they "
             f"carry no preference and should be removed.")
    v = s["near_duplicate_rate"]
    if v > t.near_duplicate_rate:
        flag("near_duplicates", v, f"near_duplicate_rate > {t.near_duplicate_rate}",
             f"{v:.0%} of pairs differ in at most {t.near_duplicate_lev_norm:.0%} of their words: "
             f"the preference rests on a word or two, so check that those edits really make the "
             f"rejected answer wrong (expected for minimal-edit sets such as VaPR).")
    v = s["lev_norm_median"]
    if v > t.style_lev_norm_median:
        flag("style_different", v, f"lev_norm_median > {t.style_lev_norm_median}",
             f"The median pair differs in {v:.0%} of its words: chosen and rejected differ in "
             f"style, not only in content, so a model can learn the style instead of the facts.")
    v = s["repeated_prompt_rate"]
    if v > t.repeated_prompt_rate:
        flag("repeated_prompts", v, f"repeated_prompt_rate > {t.repeated_prompt_rate}",
             f"{v:.0%} of pairs share their prompt text and image count with another pair: "
             f"split train/eval by prompt, and expect those prompts to weigh more in training.")
    return flags


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
