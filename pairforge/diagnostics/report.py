"""The audit's report: PNG plots, a self-contained ``report.html``, and the terminal table.

Plots follow VaPR's comparison figure: per-set histograms on shared axes, and (for several
sets) violins side by side, so one sees at a glance that one set's pairs differ by a couple of
words and another's by dozens. ``report.html`` is rendered from ``report.html.jinja`` with
jinja2's autoescape, so every text that comes from the data (set names included) is escaped.
"""

from __future__ import annotations

import difflib
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pairforge import __version__
from pairforge.diagnostics.model_based import CI_METHOD
from pairforge.diagnostics.stats import FLAG_RULE
from pairforge.diagnostics.thresholds import THRESHOLDS

#: Points per set drawn in a violin (a seeded sample; the histograms use every pair).
VIOLIN_SAMPLE = 20_000
#: Words of an example answer shown in the report before it is cut.
EXAMPLE_WORDS = 120
#: The report's jinja2 template, next to this module.
TEMPLATE = "report.html.jinja"

# (summary key, label, explanation, format) rows of the summary table
ROWS = [
    ("n_pairs", "pairs", "pairs audited", "{:,}"),
    ("n_skipped", "skipped", "rows that could not be read (see skipped.jsonl)", "{:,}"),
    ("edit_unit", "edit unit", "words; characters for scripts written without spaces "
     "(Chinese, Japanese, Thai...)", "{}"),
    ("lev_words_median", "edits (median)", "Levenshtein distance in the edit unit, chosen vs "
     "rejected", "{:.1f}"),
    ("lev_words_mean", "edits (mean)", "", "{:.1f}"),
    ("lev_norm_median", "share changed (median)",
     "Levenshtein / longer answer's length in the edit unit; 0 = same, 1 = all differ",
     "{:.2f}"),
    ("lev_norm_mean", "share changed (mean)", "", "{:.2f}"),
    ("len_chosen_mean", "chosen length (mean)", "in the length unit", "{:.1f}"),
    ("len_rejected_mean", "rejected length (mean)", "in the length unit", "{:.1f}"),
    ("len_gap_mean", "length gap (mean)", "chosen − rejected", "{:+.1f}"),
    ("len_gap_median", "length gap (median)", "chosen − rejected", "{:+.1f}"),
    ("chosen_longer_rate", "'longer is chosen' accuracy",
     "share of pairs where the chosen answer is longer (ties half); 0.5 = no length shortcut",
     "{:.1%}"),
    ("chosen_more_words_rate", "'more words is chosen' accuracy",
     "same, counting the edit unit (words or characters)", "{:.1%}"),
    ("identical_rate", "identical pairs", "chosen == rejected up to whitespace", "{:.1%}"),
    ("near_duplicate_rate", "near-duplicate pairs",
     f"at most {THRESHOLDS.near_duplicate_lev_norm:.0%} of words (characters) differ",
     "{:.1%}"),
    ("repeated_prompt_rate", "repeated prompts",
     "pairs whose prompt text + image count occurs more than once", "{:.1%}"),
]


#: Rows of the model-based metrics (shown when a set was scored; keys absent elsewhere).
MODEL_ROWS = [
    ("model_n_scored", "pairs scored by the model", "all pairs, or a seeded random sample", "{:,}"),
    ("delta_ref_mean", "Δ_ref (mean)", "log π_ref(chosen|x) − log π_ref(rejected|x), in nats",
     "{:+.2f}"),
    ("delta_ref_median", "Δ_ref (median)", "", "{:+.2f}"),
    ("delta_ref_positive_rate", "'Δ_ref > 0' accuracy",
     "share of pairs whose chosen answer the scorer already finds more likely", "{:.1%}"),
    ("delta_ref_near_zero_rate", "near-zero Δ_ref",
     f"|Δ_ref| <= {THRESHOLDS.delta_ref_near_zero} nats: equally likely to the scorer", "{:.1%}"),
    ("ips_mean", "IPS (mean)", "the same gap under the policy to be trained", "{:+.2f}"),
    ("ips_negative_rate", "IPS < 0", "share of pairs the policy prefers the rejected answer",
     "{:.1%}"),
    ("text_only_delta_ref_mean", "text-only Δ_ref (mean)", "Δ_ref scored without the image",
     "{:+.2f}"),
    ("text_only_delta_ref_positive_rate", "text-only 'Δ_ref > 0' accuracy",
     "near 0.5: the text alone does not tell chosen from rejected", "{:.1%}"),
    ("text_only_ips_mean", "text-only IPS (mean)", "IPS scored without the image", "{:+.2f}"),
    ("text_only_ips_negative_rate", "text-only IPS < 0", "", "{:.1%}"),
]


def fmt(value, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def fmt_ci(summary, key: str, pattern: str) -> str:
    """A value with its 95 % CI ``[lo, hi]`` when the summary has one (sampled sets)."""
    text = fmt(summary.get(key), pattern)
    ci = summary.get(f"{key}_ci95")
    return f"{text} [{pattern.format(ci[0])}, {pattern.format(ci[1])}]" if ci else text


def model_rows(results: Sequence) -> list[tuple[str, str, str, str]]:
    """The :data:`MODEL_ROWS` some set has a value for."""
    return [row for row in MODEL_ROWS if any(r.summary.get(row[0]) is not None for r in results)]


# ----------------------------------------------------------------------------- plots


def write_plots(out: Path, results: Sequence) -> list[tuple[str, str]]:
    """Write the PNGs into ``out``; returns ``(file name, caption)`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [r for r in results if r.summary["n_pairs"]]
    if not sets:
        return []
    plots = []
    units = sorted({r.summary["length_unit"] for r in sets})
    unit = units[0] if len(units) == 1 else "each set's own unit"

    fig, axes = _grid(plt, len(sets))
    bins = np.linspace(0, 1, 21)
    for ax, r in zip(axes, sets):
        v = r.metrics["lev_norm"]
        ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), color="#4c72b0")
        ax.axvline(np.median(v), color="k", lw=1.2, label=f"median {np.median(v):.2f}")
        ax.axvline(THRESHOLDS.near_duplicate_lev_norm, color="#c44e52", ls="--", lw=1,
                   label="near-duplicate")
        ax.set_title(_wrap(f"{r.name} (n={len(v):,})"), fontsize=10)
        edits = r.summary.get("edit_unit", "words")
        ax.set_xlabel(_wrap(f"share of {edits} changed (normalised Levenshtein in {edits})"),
                      fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("share of pairs")
    plots.append(_save(plt, fig, out, "lev_norm.png",
                       "Normalised word Levenshtein per pair: near 0, chosen and rejected are "
                       "minimal edits of each other; near 1, they are different answers."))

    fig, axes = _grid(plt, len(sets))
    lo = min(np.percentile(r.metrics["len_gap"], 1) for r in sets)
    hi = max(np.percentile(r.metrics["len_gap"], 99) for r in sets)
    edge = max(abs(lo), abs(hi), 1.0)
    bins = np.linspace(-edge, edge, 41)
    for ax, r in zip(axes, sets):
        v = np.clip(r.metrics["len_gap"], -edge, edge)
        ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), color="#55a868")
        ax.axvline(0, color="k", lw=1)
        ax.set_title(_wrap(f"{r.name}: chosen longer in {r.summary['chosen_longer_rate']:.0%}"),
                     fontsize=10)
        ax.set_xlabel(_wrap(f"length gap, chosen − rejected ({r.summary['length_unit']})"),
                      fontsize=9)
    axes[0].set_ylabel("share of pairs")
    plots.append(_save(plt, fig, out, "len_gap.png",
                       f"Length gap per pair in {unit} (1st–99th percentile range; outliers in "
                       f"the edge bins). Mass right of 0 means the chosen answer tends to be "
                       f"longer."))
    edit_units = sorted({r.summary.get("edit_unit", "words") for r in sets})

    if len(sets) > 1:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(sets) * 2), 4.2))
        rng = np.random.default_rng(0)
        edits = edit_units[0] if len(edit_units) == 1 else "each set's unit"
        for ax, key, label, per_set in (
                (a1, "lev_words", f"edits (Levenshtein in {edits})", "edit_unit"),
                (a2, "len_gap", f"length gap, chosen − rejected ({unit})", "length_unit")):
            data = [_sample(r.metrics[key], rng) for r in sets]
            ax.violinplot(data, showmedians=True)
            names = [r.name if len({x.summary.get(per_set) for x in sets}) == 1
                     else f"{r.name} ({r.summary.get(per_set, 'words')})" for r in sets]
            ax.set_xticks(range(1, len(sets) + 1), [_wrap(n, 24) for n in names], rotation=20,
                          ha="right", fontsize=9)
            ax.set_ylabel(_wrap(label, 40), fontsize=9)
            if key == "len_gap":
                ax.axhline(0, color="k", lw=0.8)
        plots.append(_save(plt, fig, out, "compare.png",
                           "The sets side by side on shared axes: how many words separate "
                           "chosen from rejected, and how much longer the chosen answer is."))
    plots += _model_plots(plt, out, [r for r in sets if r.model is not None and r.model.gaps])
    return plots


def _model_plots(plt, out: Path, sets: Sequence) -> list[tuple[str, str]]:
    """Δ_ref (and, with a separate policy, IPS) histograms per set on shared axes; the
    text-only gap overlaid when it was computed."""
    if not sets:
        return []
    plots = []
    kinds = [("delta_ref", "Δ_ref = log π_ref(chosen|x) − log π_ref(rejected|x)", "delta_ref.png",
              "Δ_ref per scored pair: right of 0 the scorer already prefers the chosen answer; "
              "mass at 0 means pairs it cannot tell apart.")]
    if any(r.summary.get("model_policy") != r.summary.get("model_scorer") for r in sets):
        kinds.append(("ips", "IPS = log π(chosen|x) − log π(rejected|x) under the policy",
                      "ips.png", "Implicit preference strength under the policy to be trained: "
                      "left of 0 the policy prefers the rejected answer."))
    for key, xlabel, name, caption in kinds:
        series = [[r.model.gaps[k] for k in (key, f"text_only_{key}") if k in r.model.gaps] for r in sets]
        values = np.concatenate([v for ser in series for v in ser])
        edge = max(float(np.percentile(np.abs(values), 99)) if len(values) else 1.0, 0.5)
        bins = np.linspace(-edge, edge, 41)
        fig, axes = _grid(plt, len(sets))
        for ax, r, ser in zip(axes, sets, series):
            for v, label, color in zip(ser, ("with image", "text only"), ("#4c72b0", "#dd8452")):
                v = np.clip(v, -edge, edge)
                lab = label if len(ser) > 1 else None
                ax.hist(v, bins=bins, weights=np.full(len(v), 1 / max(len(v), 1)), color=color,
                        alpha=0.6 if len(ser) > 1 else 1.0, label=lab)
            ax.axvline(0, color="k", lw=1)
            rate = r.summary.get(f"{key}_positive_rate")
            n = r.summary.get("model_n_scored", 0)
            title = f"{r.name} (n={n:,})" + (f": > 0 in {rate:.0%}" if rate is not None else "")
            ax.set_title(_wrap(title), fontsize=10)
            ax.set_xlabel(_wrap(xlabel), fontsize=8)
            if len(ser) > 1:
                ax.legend(fontsize=8)
        axes[0].set_ylabel("share of scored pairs")
        if any(len(ser) > 1 for ser in series):
            caption += " Orange: scored without the image (text only)."
        plots.append(_save(plt, fig, out, name, caption))
    return plots


def _grid(plt, n: int):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharex=True,
                             sharey=True, squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, list(flat)


def _wrap(text: str, width: int = 44) -> str:
    """A plot label broken into lines of at most ``width`` characters (labels never run past
    the figure's edge)."""
    return textwrap.fill(text, width, break_long_words=True)


def _sample(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return v if len(v) <= VIOLIN_SAMPLE else rng.choice(v, VIOLIN_SAMPLE, replace=False)


def _save(plt, fig, out: Path, name: str, caption: str) -> tuple[str, str]:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110, bbox_inches="tight")  # nothing cut at the edges
    plt.close(fig)
    return name, caption


# ----------------------------------------------------------------------------- html


def write_html(out: Path, results: Sequence, plots: Sequence[tuple[str, str]]) -> Path:
    """Write ``report.html`` (flags first, then the table, the plots and example pairs) from
    the ``report.html.jinja`` template, rendered with autoescape: every value from the data
    is escaped by jinja2, none is marked safe."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    page = env.get_template(TEMPLATE).render(report_context(results, plots))
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def report_context(results: Sequence, plots: Sequence[tuple[str, str]]) -> dict:
    """The template's values: plain strings and numbers, nothing pre-rendered as HTML."""
    rows = [{"label": label, "meaning": meaning,
             "cells": [fmt(r.summary.get(key), pattern) for r in results]}
            for key, label, meaning, pattern in ROWS]
    rows += [{"label": label, "meaning": meaning,
              "cells": [fmt_ci(r.summary, key, pattern) for r in results]}
             for key, label, meaning, pattern in model_rows(results)]
    scored = [r for r in results if r.model is not None]
    sets = [{
        "name": r.name,
        "edit_unit": r.summary.get("edit_unit", "words"),
        "length_unit": r.summary["length_unit"],
        "flags": r.summary["flags"],
        "inconclusive": r.summary.get("inconclusive", []),
        "source": str(r.summary.get("source", "")),
        "format": str(r.summary.get("format", "")),
        "examples": [(title, [_example(x, r.summary.get("edit_unit", "words")) for x in xs])
                     for title, xs in (("most different", r.most_different),
                                       ("most similar", r.most_similar))],
    } for r in results]
    return {
        "version": __version__, "sets": sets, "rows": rows, "flag_rule": FLAG_RULE,
        "scored": [{"name": r.name, "notes": r.model.notes} for r in scored],
        "ci_method": CI_METHOD if any(r.summary.get("model_sampled") for r in scored) else "",
        "plots": [{"file": name, "caption": caption} for name, caption in plots],
        "thresholds": THRESHOLDS.documented(),
    }


def _example(x, edit_unit: str) -> dict:
    """One example pair as runs of ``(text, changed)`` tokens (changed tokens highlighted)."""
    split = list if edit_unit == "characters" else str.split
    a, b = split(x.chosen), split(x.rejected)
    marked_a, marked_b = _changed(a, b)
    prompt = x.prompt.split()
    return {"id": x.id, "lev": x.lev_words, "lev_norm": x.lev_norm,
            "len_chosen": x.len_chosen, "len_rejected": x.len_rejected,
            "prompt": _runs(prompt, [False] * len(prompt), " "),
            "prompt_cut": len(prompt) > EXAMPLE_WORDS,
            "sep": "" if edit_unit == "characters" else " ",
            "chosen": _runs(a, marked_a, "" if edit_unit == "characters" else " "),
            "chosen_cut": len(a) > EXAMPLE_WORDS * (4 if edit_unit == "characters" else 1),
            "rejected": _runs(b, marked_b, "" if edit_unit == "characters" else " "),
            "rejected_cut": len(b) > EXAMPLE_WORDS * (4 if edit_unit == "characters" else 1)}


def _changed(a: list[str], b: list[str]) -> tuple[list[bool], list[bool]]:
    """Per token of ``a`` and of ``b``: is it outside the longest matching blocks (difflib)?"""
    ma, mb = [True] * len(a), [True] * len(b)
    for i, j, n in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        ma[i:i + n] = [False] * n
        mb[j:j + n] = [False] * n
    return ma, mb


def _runs(tokens: list[str], marked: list[bool], sep: str) -> list[tuple[str, bool]]:
    """The first :data:`EXAMPLE_WORDS` tokens (4× as many characters) as runs of equally
    marked tokens joined by ``sep``: ``[(text, marked), ...]``; the template joins the runs
    with ``sep`` again."""
    limit = EXAMPLE_WORDS * (4 if sep == "" else 1)
    runs: list[tuple[str, bool]] = []
    for tok, m in zip(tokens[:limit], marked):
        if runs and runs[-1][1] == m:
            runs[-1] = (runs[-1][0] + sep + tok, m)
        else:
            runs.append((tok, m))
    return runs


# ----------------------------------------------------------------------------- terminal


#: Rows of the terminal table (keys of :data:`ROWS`).
TERMINAL_ROWS = ("n_pairs", "n_skipped", "lev_words_median", "lev_norm_median", "len_gap_mean",
                 "chosen_longer_rate", "identical_rate", "near_duplicate_rate",
                 "repeated_prompt_rate")


def print_summary(results: Sequence, console) -> None:
    """A short rich table (a column per set) and the flags, one sentence each."""
    from rich.markup import escape
    from rich.table import Table

    units = sorted({r.summary["length_unit"] for r in results})
    title = (f"pairforge audit (length unit: {escape(units[0])})" if len(units) == 1
             else "pairforge audit")
    table = Table(title=title)
    table.add_column("")
    for r in results:
        table.add_column(escape(r.name), justify="right",
                         style="yellow" if r.summary["flags"] else None)
    rows = {key: (label, pattern) for key, label, _, pattern in ROWS}
    if len(units) > 1 or any(r.summary.get("edit_unit", "words") != "words" for r in results):
        table.add_row("units (edits / lengths)",
                      *(f"{r.summary.get('edit_unit', 'words')} / {r.summary['length_unit']}"
                        for r in results))
    for key in TERMINAL_ROWS:
        label, pattern = rows[key]
        table.add_row(label, *(fmt(r.summary[key], pattern) for r in results))
    for key, label, _, pattern in model_rows(results):
        table.add_row(label, *(fmt_ci(r.summary, key, pattern) for r in results))
    table.add_row("flags", *(str(len(r.summary["flags"])) for r in results))
    console.print(table)
    for r in results:
        if r.model is not None:
            for note in r.model.notes:
                console.print(f"[bold]{escape(r.name)}[/bold] {escape(note)}", highlight=False)
    for r in results:
        for f in r.summary["flags"]:
            console.print(f"[yellow]⚑[/yellow] [bold]{escape(r.name)}[/bold] {f['id']}: "
                          f"{escape(f['message'])}", highlight=False)
        for x in r.summary.get("inconclusive", []):
            console.print(f"[dim]· {escape(r.name)} {x['key']} = {x['value']:.3g} is past its "
                          f"threshold, but on {x['n_pairs']:,} pairs the 95% CI reaches back "
                          f"over it: too few pairs to flag[/dim]", highlight=False)
