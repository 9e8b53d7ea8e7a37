"""The audit's report: PNG plots, a self-contained ``report.html``, and the terminal table.

Plots follow VaPR's comparison figure: per-set histograms on shared axes, and (for several
sets) violins side by side, so one sees at a glance that one set's pairs differ by a couple of
words and another's by dozens. Every text that comes from the data is ``html.escape``-d.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pairforge import __version__
from pairforge.diagnostics.model_based import CI_METHOD
from pairforge.diagnostics.thresholds import THRESHOLDS

#: Points per set drawn in a violin (a seeded sample; the histograms use every pair).
VIOLIN_SAMPLE = 20_000
#: Words of an example answer shown in the report before it is cut.
EXAMPLE_WORDS = 120

# (summary key, label, explanation, format) rows of the summary table
ROWS = [
    ("n_pairs", "pairs", "pairs audited", "{:,}"),
    ("n_skipped", "skipped", "rows that could not be read (see skipped.jsonl)", "{:,}"),
    ("lev_words_median", "word edits (median)", "word Levenshtein distance, chosen vs rejected",
     "{:.1f}"),
    ("lev_words_mean", "word edits (mean)", "", "{:.1f}"),
    ("lev_norm_median", "share of words changed (median)",
     "word Levenshtein / longer answer's words; 0 = same words, 1 = all differ", "{:.2f}"),
    ("lev_norm_mean", "share of words changed (mean)", "", "{:.2f}"),
    ("len_chosen_mean", "chosen length (mean)", "in the length unit", "{:.1f}"),
    ("len_rejected_mean", "rejected length (mean)", "in the length unit", "{:.1f}"),
    ("len_gap_mean", "length gap (mean)", "chosen − rejected", "{:+.1f}"),
    ("len_gap_median", "length gap (median)", "chosen − rejected", "{:+.1f}"),
    ("chosen_longer_rate", "'longer is chosen' accuracy",
     "share of pairs where the chosen answer is longer (ties half); 0.5 = no length shortcut",
     "{:.1%}"),
    ("chosen_more_words_rate", "'more words is chosen' accuracy", "same, counting words",
     "{:.1%}"),
    ("identical_rate", "identical pairs", "chosen == rejected up to whitespace", "{:.1%}"),
    ("near_duplicate_rate", "near-duplicate pairs",
     f"at most {THRESHOLDS.near_duplicate_lev_norm:.0%} of words differ", "{:.1%}"),
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
    unit = sets[0].summary["length_unit"]

    fig, axes = _grid(plt, len(sets))
    bins = np.linspace(0, 1, 21)
    for ax, r in zip(axes, sets):
        v = r.metrics["lev_norm"]
        ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), color="#4c72b0")
        ax.axvline(np.median(v), color="k", lw=1.2, label=f"median {np.median(v):.2f}")
        ax.axvline(THRESHOLDS.near_duplicate_lev_norm, color="#c44e52", ls="--", lw=1,
                   label="near-duplicate")
        ax.set_title(f"{r.name} (n={len(v):,})", fontsize=10)
        ax.set_xlabel("share of words changed (normalised word Levenshtein)")
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
        ax.set_title(f"{r.name}: chosen longer in {r.summary['chosen_longer_rate']:.0%}",
                     fontsize=10)
        ax.set_xlabel(f"length gap, chosen − rejected ({unit})")
    axes[0].set_ylabel("share of pairs")
    plots.append(_save(plt, fig, out, "len_gap.png",
                       f"Length gap per pair in {unit} (1st–99th percentile range; outliers in "
                       f"the edge bins). Mass right of 0 means the chosen answer tends to be "
                       f"longer."))

    if len(sets) > 1:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(sets) * 2), 4.2))
        rng = np.random.default_rng(0)
        for ax, key, label in ((a1, "lev_words", "word edits (word Levenshtein)"),
                               (a2, "len_gap", f"length gap, chosen − rejected ({unit})")):
            data = [_sample(r.metrics[key], rng) for r in sets]
            ax.violinplot(data, showmedians=True)
            ax.set_xticks(range(1, len(sets) + 1), [r.name for r in sets], rotation=20,
                          ha="right", fontsize=9)
            ax.set_ylabel(label)
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
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
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


def _sample(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return v if len(v) <= VIOLIN_SAMPLE else rng.choice(v, VIOLIN_SAMPLE, replace=False)


def _save(plt, fig, out: Path, name: str, caption: str) -> tuple[str, str]:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name, caption


# ----------------------------------------------------------------------------- html


def write_html(out: Path, results: Sequence, plots: Sequence[tuple[str, str]]) -> Path:
    """Write ``report.html`` (flags first, then the table, the plots and example pairs)."""
    e = html.escape
    unit = results[0].summary["length_unit"] if results else "?"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pairforge audit</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>pairforge audit</h1>",
             f"<p class='meta'>{len(results)} set(s) · length unit: <b>{e(unit)}</b> · "
             f"pairforge {e(__version__)}</p>",
             "<h2>Flags</h2>"]
    for r in results:
        parts.append(f"<h3>{e(r.name)}</h3>")
        if r.summary["flags"]:
            parts.append("<ul class='flags'>" + "".join(
                f"<li><b>{e(f['id'])}</b>: {e(f['message'])} <span class='rule'>(value "
                f"{f['value']:.3g}; rule: {e(f['threshold'])})</span></li>"
                for f in r.summary["flags"]) + "</ul>")
        else:
            parts.append("<p class='ok'>No flags: no length shortcut, few identical or "
                         "near-duplicate pairs, content-level differences.</p>")

    parts.append("<h2>Summary</h2><table><tr><th>metric</th>"
                 + "".join(f"<th>{e(r.name)}</th>" for r in results) + "<th>meaning</th></tr>")
    for key, label, meaning, pattern in ROWS:
        parts.append(f"<tr><td>{e(label)}</td>"
                     + "".join(f"<td class='num'>{e(fmt(r.summary.get(key), pattern))}</td>"
                               for r in results)
                     + f"<td class='meaning'>{e(meaning)}</td></tr>")
    for key, label, meaning, pattern in model_rows(results):
        parts.append(f"<tr><td>{e(label)}</td>"
                     + "".join(f"<td class='num'>{e(fmt_ci(r.summary, key, pattern))}</td>"
                               for r in results)
                     + f"<td class='meaning'>{e(meaning)}</td></tr>")
    parts.append("<tr><td>source</td>" + "".join(
        f"<td>{e(str(r.summary.get('source', '')))} ({e(str(r.summary.get('format', '')))})</td>"
        for r in results) + "<td></td></tr></table>")

    scored = [r for r in results if r.model is not None]
    if scored:
        parts.append("<h2>Model-based metrics</h2>")
        if any(r.summary.get("model_sampled") for r in scored):
            parts.append(f"<p class='meta'>{e(CI_METHOD)}.</p>")
        for r in scored:
            parts.append(f"<h3>{e(r.name)}</h3><ul class='notes'>"
                         + "".join(f"<li>{e(note)}</li>" for note in r.model.notes) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for name, caption in plots:
        parts.append(f"<figure><img src='{e(name)}' alt='{e(caption)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")

    parts.append("<h2>Example pairs</h2><p class='meta'>Words that differ between chosen and "
                 "rejected are highlighted.</p>")
    for r in results:
        parts.append(f"<h3>{e(r.name)}</h3>")
        for title, examples in (("most different", r.most_different),
                                ("most similar", r.most_similar)):
            parts.append(f"<h4>{title}</h4>")
            parts.extend(_example_html(x) for x in examples)

    parts.append("<h2>How flags are decided</h2><table><tr><th>threshold</th><th>value</th>"
                 "<th>meaning</th></tr>")
    parts.extend(f"<tr><td>{e(n)}</td><td class='num'>{v}</td><td>{e(d)}</td></tr>"
                 for n, v, d in THRESHOLDS.documented())
    parts.append("</table><p class='meta'>Per-pair metrics: pairs.parquet; numbers: "
                 "summary.json; skipped rows: skipped.jsonl.</p></body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _example_html(x) -> str:
    e = html.escape
    a, b = x.chosen.split(), x.rejected.split()
    marked_a, marked_b = _changed(a, b)
    return (f"<div class='ex'><div class='exmeta'>id {e(x.id)} · {x.lev_words} word edits "
            f"({x.lev_norm:.0%}) · lengths {x.len_chosen} vs {x.len_rejected}</div>"
            f"<div class='prompt'><b>prompt</b> {_tokens_html(x.prompt.split())}</div>"
            f"<div class='pair'><div><b>chosen</b> {_tokens_html(a, marked_a)}</div>"
            f"<div><b>rejected</b> {_tokens_html(b, marked_b)}</div></div></div>")


def _changed(a: list[str], b: list[str]) -> tuple[list[bool], list[bool]]:
    """Per token of ``a`` and of ``b``: is it outside the longest matching blocks (difflib)?"""
    ma, mb = [True] * len(a), [True] * len(b)
    for i, j, n in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        ma[i:i + n] = [False] * n
        mb[j:j + n] = [False] * n
    return ma, mb


def _tokens_html(tokens: list[str], marked: list[bool] | None = None) -> str:
    """The first :data:`EXAMPLE_WORDS` tokens, escaped, runs of marked tokens in ``<mark>``."""
    out, run = [], []
    for tok, m in zip(tokens[:EXAMPLE_WORDS], marked or [False] * len(tokens)):
        if m:
            run.append(html.escape(tok))
            continue
        if run:
            out.append("<mark>" + " ".join(run) + "</mark>")
            run = []
        out.append(html.escape(tok))
    if run:
        out.append("<mark>" + " ".join(run) + "</mark>")
    return " ".join(out) + (" …" if len(tokens) > EXAMPLE_WORDS else "")


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0} .meta{color:#666} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.meaning{color:#666;font-size:90%}
ul.flags li{margin:.4em 0} .rule{color:#666;font-size:85%} .ok{color:#2a7}
figure{margin:1em 0} img{max-width:100%} figcaption{color:#555;font-size:90%}
.ex{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0}
.exmeta{color:#666;font-size:85%} .pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}
mark{background:#ffe08a}
"""


# ----------------------------------------------------------------------------- terminal


#: Rows of the terminal table (keys of :data:`ROWS`).
TERMINAL_ROWS = ("n_pairs", "n_skipped", "lev_words_median", "lev_norm_median", "len_gap_mean",
                 "chosen_longer_rate", "identical_rate", "near_duplicate_rate",
                 "repeated_prompt_rate")


def print_summary(results: Sequence, console) -> None:
    """A short rich table (a column per set) and the flags, one sentence each."""
    from rich.markup import escape
    from rich.table import Table

    unit = results[0].summary["length_unit"] if results else "?"
    table = Table(title=f"pairforge audit (length unit: {escape(unit)})")
    table.add_column("")
    for r in results:
        table.add_column(escape(r.name), justify="right",
                         style="yellow" if r.summary["flags"] else None)
    rows = {key: (label, pattern) for key, label, _, pattern in ROWS}
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
