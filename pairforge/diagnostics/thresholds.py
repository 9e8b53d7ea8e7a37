"""Every number that labels a pair or raises a flag in ``pairforge audit``, in one place.

Rates are shares of a set's pairs (0..1); ``lev_norm`` is the word Levenshtein distance
divided by the longer answer's word count. ``summary.json``, the report and the terminal print
each flag with the value it saw and its rule; the report lists all rules with the ``doc`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _t(value: float, doc: str) -> float:
    return field(default=value, metadata={"doc": doc})


@dataclass(frozen=True)
class Thresholds:
    near_duplicate_lev_norm: float = _t(
        0.05, "a pair is a near-duplicate when lev_norm <= this (at most 1 word in 20 differs)")
    length_shortcut_high: float = _t(
        0.65, "length shortcut: 'pick the longer answer' is right for at least this share of "
              "pairs (ties count half)")
    length_shortcut_low: float = _t(
        0.35, "length shortcut: ... or for at most this share ('pick the shorter' is the "
              "shortcut)")
    identical_rate: float = _t(
        0.01, "many identical pairs: more than this share has chosen == rejected (up to "
              "whitespace)")
    near_duplicate_rate: float = _t(
        0.10, "many near-duplicates: more than this share of pairs are near-duplicates")
    style_lev_norm_median: float = _t(
        0.5, "style-different pairs: the median lev_norm is above this, i.e. most words differ, "
             "so chosen and rejected differ in style rather than in content")
    repeated_prompt_rate: float = _t(
        0.10, "repeated prompts: more than this share of pairs shares its prompt text and image "
              "count with another pair of the set")

    # model-based metrics (pairforge audit --scorer / --policy / --text-only)
    delta_ref_near_zero: float = _t(
        0.1, "a pair's Δ_ref is near zero when |log π_ref(y_w|x) − log π_ref(y_l|x)| <= this "
             "(nats): the scorer finds chosen and rejected equally likely (self-preference "
             "duplicates)")
    near_zero_delta_rate: float = _t(
        0.10, "many near-zero Δ_ref: more than this share of scored pairs has |Δ_ref| near zero")
    text_only_separable_high: float = _t(
        0.75, "vision-agnostic set: scored without the image, the chosen answer is the more "
              "likely one (Δ_ref > 0) in at least this share of pairs")
    text_only_separable_low: float = _t(
        0.25, "vision-agnostic set: ... or in at most this share ('pick the less likely "
              "answer' separates the pairs without the image)")

    def documented(self) -> list[tuple[str, float, str]]:
        """``(name, value, doc)`` for every threshold, in declaration order."""
        return [(f.name, getattr(self, f.name), f.metadata["doc"]) for f in fields(self)]


THRESHOLDS = Thresholds()
