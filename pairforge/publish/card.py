"""The dataset card (``README.md``) of a published pair set.

YAML metadata goes through ``huggingface_hub.DatasetCardData``; ``configs`` and
``dataset_info`` are written by ``datasets``' own ``MetadataConfigs`` / ``DatasetInfosDict``, so
they are exactly what ``load_dataset`` and the Hub read. The body comes from the Jinja
templates in ``dataset_cards/`` (one per recipe, ``audit.md`` for sets made elsewhere, all
extending ``_base.md``): what the recipe does and its paper, provenance, the audit's
diagnostics table and plots (``pairforge.diagnostics``, run on the rows), the rejected
examples by stage and reason, and load snippets for ``datasets`` and TRL's ``DPOTrainer``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from pairforge import __version__
from pairforge.diagnostics.audit import SetAudit, SetResult
from pairforge.diagnostics.lengths import length_unit
from pairforge.diagnostics.report import ROWS, fmt, write_plots
from pairforge.errors import PairforgeError
from pairforge.publish.layout import ConfigFiles
from pairforge.publish.pairset import SPLIT, PairSet
from pairforge.resources import resource_dir
from pairforge.safety import SECRET, redact_local_paths
from pairforge.schema import COLUMN_GROUPS, CORE_FEATURES, prompt_text, response_text
from pairforge.world.scenes import WORLD_NAME

#: The templates' folder (``dataset_cards/``, shipped in the package).
TEMPLATES = resource_dir("dataset_cards")
#: Pairs per batch while auditing a config (bounds memory: image bytes are read along).
AUDIT_BATCH = 4096
#: Rejection reasons listed in the card; the rest are summed in one line.
MAX_REJECT_ROWS = 25
#: The Hub's size categories: (upper bound, label).
SIZE_CATEGORIES = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"),
                   (10**6, "100K<n<1M"), (10**7, "1M<n<10M"), (10**8, "10M<n<100M"),
                   (10**9, "100M<n<1B"), (10**10, "1B<n<10B"), (10**11, "10B<n<100B"),
                   (10**12, "100B<n<1T")]


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` label for ``n`` rows (``n<1K`` … ``n>1T``)."""
    for bound, label in SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>1T"


def is_synthetic(pset: PairSet) -> bool:
    """Built from the offline shapes world (the source is procedurally generated)."""
    spec = pset.manifest.get("source")
    names = sources(pset) + ([spec] if isinstance(spec, str) else [])
    return bool(names) and all(re.match(rf"{WORLD_NAME}(\b|$)", s) for s in names)


def sources(pset: PairSet) -> list[str]:
    """The source datasets named by the rows' ``source_dataset`` column."""
    return sorted(v for v in pset.dataset.unique("source_dataset") if v)


# ----------------------------------------------------------------------------- diagnostics


def audit_configs(configs: Mapping[str, Dataset], names: Mapping[str, str],
                  tokenizer: str = "gpt2") -> list[SetResult]:
    """The audit's text diagnostics of every config (one :class:`SetResult` each, named by
    ``names[config]``), computed as ``pairforge audit`` does."""
    unit = length_unit(tokenizer)
    results = []
    for config, ds in configs.items():
        audit = SetAudit(names[config], unit)
        cols = ds.select_columns(["id", "prompt", "chosen", "rejected", "images"])
        for batch in cols.with_format("arrow").iter(batch_size=AUDIT_BATCH):
            prompts = [prompt_text(m) for m in batch["prompt"].to_pylist()]
            n_images = pc.list_value_length(batch["images"]).fill_null(0).to_pylist()
            audit.add(batch["id"].to_pylist(), [hash(k) for k in zip(prompts, n_images)],
                      prompts, [response_text(m) for m in batch["chosen"].to_pylist()],
                      [response_text(m) for m in batch["rejected"].to_pylist()])
        result = audit.finish(n_skipped=0)
        if "delta_ref" in ds.column_names:  # a build with --reference: Δ_ref / IPS per pair
            from pairforge.diagnostics.model_based import build_model_result

            cols = ds.select_columns(["delta_ref", "ips", "images"]).to_dict()
            result.model = build_model_result(cols["delta_ref"], cols["ips"], has_images=any(cols["images"]))
            result.summary.update(result.model.summary)  # the table rows and the plots
            result.summary["flags"] = list(result.summary["flags"]) + result.model.flags
        results.append(result)
    return results


def diagnostics_table(results: Sequence[SetResult]) -> list[tuple[str, list[str], str]]:
    """(label, value per set, meaning) rows of the audit's summary table (less the count of
    unreadable rows: published rows are all read)."""
    from pairforge.diagnostics.report import MODEL_ROWS

    model = [row for row in MODEL_ROWS if any(r.summary.get(row[0]) is not None for r in results)]
    return [(label, [fmt(r.summary.get(key), pattern) for r in results], meaning)
            for key, label, meaning, pattern in ROWS + model if key != "n_skipped"]


# ----------------------------------------------------------------------------- languages, risks

#: Texts looked at to name a card's languages.
LANGUAGE_SAMPLE = 500
#: Scripts that name a language by themselves (ISO 639-1), checked in this order.
_SCRIPTS = (("ja", re.compile(r"[\u3040-\u30ff]")), ("zh", re.compile(r"[\u4e00-\u9fff]")),
            ("ko", re.compile(r"[\uac00-\ud7af]")), ("th", re.compile(r"[\u0e00-\u0e7f]")))
#: Common English words; Latin-script texts are English when enough of their words are these.
_ENGLISH = frozenset("the a an is are was were of in on at to and or it this that there with "
                     "for as by be has have what which who how".split())


def languages(texts: Sequence[str]) -> list[str]:
    """ISO 639-1 codes of the languages of ``texts`` (a sample of answers): a script that
    names one language (kana → ja, Han without kana → zh, Hangul → ko, Thai → th) counts when
    at least 5 % of the texts use it; Latin-script text counts as ``en`` when at least 15 % of
    its words are common English words. Nothing is guessed beyond that: an empty list means
    the card leaves ``language`` out."""
    texts = [t for t in texts if t]
    if not texts:
        return []
    found = []
    for code, pattern in _SCRIPTS:
        share = sum(bool(pattern.search(t)) for t in texts) / len(texts)
        if share >= 0.05 and not (code == "zh" and "ja" in found):
            found.append(code)
    latin = [w.lower().strip(".,;:!?") for t in texts for w in t.split() if w.isascii()]
    if latin and sum(w in _ENGLISH for w in latin) / len(latin) >= 0.15:
        found.insert(0, "en")
    return found


def sample_texts(configs: Mapping[str, Dataset], n: int = LANGUAGE_SAMPLE) -> list[str]:
    """Up to ``n`` chosen answers from the first rows of the first config."""
    for ds in configs.values():
        rows = ds.select_columns(["chosen"]).select(range(min(n, len(ds))))
        return [response_text(m) for m in rows["chosen"]]
    return []


def replacement_spread(ds: Dataset, top: int = 3) -> dict | None:
    """VaPR's replacement values (``edit_replacement``): how many edits, how many distinct
    values, and the ``top`` most frequent with their share of all edits. ``None`` without the
    column."""
    if "edit_replacement" not in ds.column_names:
        return None
    values = [v.strip().lower() for v in ds["edit_replacement"] if v]
    if not values:
        return None
    counts = Counter(values).most_common()
    head = counts[:top]
    return {"n": len(values), "distinct": len(counts), "top": [v for v, _ in head],
            "top_share": sum(c for _, c in head) / len(values)}


def measured_risks(results: Sequence[SetResult], pset: PairSet) -> list[str]:
    """Sentences for the card's "Bias, Risks, and Limitations", from the numbers measured on
    these rows: the length shortcut with its CI, near-duplicates, style differences, rates too
    uncertain to flag, and (VaPR) how concentrated the replacement values are."""
    out = []
    for r in results:
        s = r.summary
        if not s["n_pairs"]:
            continue
        ci = s.get("chosen_longer_rate_ci95")
        ci_text = f" (95% CI {ci[0]:.0%}–{ci[1]:.0%})" if ci else ""
        ids = {f["id"] for f in s["flags"]}
        length = (f"**{r.name}**: the longer answer (in {s['length_unit']}) is the chosen one "
                  f"in {s['chosen_longer_rate']:.0%} of {s['n_pairs']:,} pairs{ci_text}")
        out.append(length + (": a length shortcut a model can learn instead of content."
                             if "length_shortcut" in ids else
                             "; no length shortcut at the audit's thresholds."))
        if "near_duplicates" in ids:
            out.append(f"**{r.name}**: {s['near_duplicate_rate']:.0%} of pairs differ in a "
                       f"{'character' if s.get('edit_unit') == 'characters' else 'word'} or "
                       f"two: the preference rests on those edits, so an edit that does not "
                       f"make the answer wrong teaches the wrong thing.")
        if "style_different" in ids:
            out.append(f"**{r.name}**: chosen and rejected differ in most of their "
                       f"{s.get('edit_unit', 'words')} (median {s['lev_norm_median']:.0%}): "
                       f"a model can learn the style of the chosen answers instead of the facts.")
        for x in s.get("inconclusive", []):
            out.append(f"**{r.name}**: `{x['key']}` = {x['value']:.2f} is past its threshold but "
                       f"rests on {x['n_pairs']:,} pairs, too few to tell (95% CI reaches back "
                       f"over the threshold).")
    spread = replacement_spread(pset.dataset)
    if spread:
        out.append(f"VaPR replacement values: {spread['distinct']:,} distinct values over "
                   f"{spread['n']:,} edits; the {len(spread['top'])} most frequent ("
                   + ", ".join(_code(v) for v in spread["top"])
                   + f") make up {spread['top_share']:.0%} of them. The more concentrated they "
                   f"are, the more a model can learn to avoid those words rather than the error "
                   f"(the penalty lists exist to spread them).")
    return out


# ----------------------------------------------------------------------------- provenance


MODEL_KEYS = ("role", "name", "revision")


def provenance(pset: PairSet) -> dict[str, Any]:
    """Models, editor, prompt templates, parameters, seed, version, source, commands and run
    identity. A build's come from its manifest (:class:`pairforge.engine.manifest.Manifest`):
    ``settings.params``, ``prompt_templates``, ``seed``, ``source`` and ``settings.source.limit``,
    ``shard``, ``merged_from``, the ``command`` of each session, ``identity``. The models are
    those the rows name (the models that ran, with their revisions); a configured model that
    no row names is listed apart. A plain set's provenance comes from its rows alone."""
    m = pset.manifest
    settings = m.get("settings") or {}
    models = _distinct(pset.dataset, "models", MODEL_KEYS)
    named = {(r["role"], r["name"]) for r in models}
    unused = [r for r in _records(m.get("models"), MODEL_KEYS)
              if (r["role"], r["name"]) not in named]
    templates = _records(m.get("prompt_templates"), ("name", "sha256")) \
        or _distinct(pset.dataset, "prompt_templates", ("name", "sha256"))
    editors = sorted({r["name"] for r in models if r["role"] == "editor"})
    if not editors and "editor" in pset.dataset.column_names:
        editors = sorted(v for v in pset.dataset.unique("editor") if v)
    seeds = [m["seed"]] if m.get("seed") is not None else \
        sorted(v for v in pset.dataset.unique("seed") if v is not None)
    versions = sorted({v for v in [m.get("pairforge_version"),
                                   *pset.dataset.unique("pairforge_version")] if v})
    commands = list(dict.fromkeys(s["command"] for s in m.get("sessions") or ()
                                  if s.get("command")))
    shard = m.get("shard")
    merged = m.get("merged_from") or []
    return {
        "models": models,
        "unused_models": unused,
        "editors": editors,
        "templates": templates,
        "params": sorted((str(k), _value(v)) for k, v in (settings.get("params") or {}).items()),
        "seeds": seeds,
        "versions": versions,
        "source": m.get("source"),
        "limit": (settings.get("source") or {}).get("limit"),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "merged": f"{len(merged)} shard builds" if merged else None,
        "command": "\n".join(commands) or None,
        "run_id": m.get("identity"),
    }


def _records(value: Any, keys: tuple[str, ...]) -> list[dict]:
    """A manifest's list of dicts as records with ``keys`` (missing values as '')."""
    if not isinstance(value, list):
        return []
    return [{k: str(v.get(k) or "") for k in keys} for v in value if isinstance(v, Mapping)]


def _distinct(ds: Dataset, column: str, keys: tuple[str, ...]) -> list[dict]:
    """The distinct records of a list-of-structs column over all rows, in first-seen order."""
    seen: dict[tuple, None] = {}
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=AUDIT_BATCH):
        for value in batch[column].to_pylist():
            for rec in value or ():
                seen.setdefault(tuple(str(rec.get(k) or "") for k in keys), None)
    return [dict(zip(keys, t)) for t in seen]


def _value(v: Any) -> str:
    """A parameter value as text: strings as they are (the empty one as ``""``), the rest as
    JSON."""
    return v if isinstance(v, str) and v else json.dumps(v, sort_keys=True, ensure_ascii=False)


def rejects_table(pset: PairSet) -> tuple[int, list[tuple[str, str, int]], tuple[int, int]]:
    """(total rejected, (stage, reason kind, count) rows most frequent first, (other reasons,
    their count)) from the build's ``rejects.jsonl`` (reconciled with ``summary.json`` when
    the set was opened)."""
    ranked = sorted(pset.rejects.items(), key=lambda kv: (-kv[1], kv[0]))
    rest = ranked[MAX_REJECT_ROWS:]
    return (sum(pset.rejects.values()), [(s, r, n) for (s, r), n in ranked[:MAX_REJECT_ROWS]],
            (len(rest), sum(n for _, n in rest)))


def build_counts(summary: Mapping) -> list[tuple[str, str]]:
    """(name, value) rows of a build summary: its ``counts`` (``other_shards`` only when
    there are) and each step's examples in → forwarded (dropped)."""
    counts = summary.get("counts") or {}
    out = [(k, f"{v:,}") for k, v in counts.items()
           if isinstance(v, int) and not isinstance(v, bool) and (v or k != "other_shards")]
    for step, v in (summary.get("steps") or {}).items():
        out.append((f"step {step}: in → forwarded (dropped)",
                    f"{v['in']:,} → {v['forwarded']:,} ({v['dropped']:,})"))
    return out


# ----------------------------------------------------------------------------- YAML


def card_data(pset: PairSet, staged: Sequence[ConfigFiles], features: Features, *,
              repo_id: str, license: str | None = None,
              language: Sequence[str] = ()) -> DatasetCardData:
    """The card's YAML metadata. ``license`` defaults to apache-2.0 for sets built from the
    offline world (generated by pairforge) and ``other`` otherwise (set it with --license);
    ``language``: ISO 639-1 codes (:func:`languages`), left out when empty."""
    synthetic = is_synthetic(pset)
    tags = ["dpo", "preference", "vision-language", "pairforge"]
    tags.insert(1, pset.recipe or "audit")
    if synthetic:
        tags.append("synthetic")
    data = DatasetCardData(
        license=license or ("apache-2.0" if synthetic else "other"),
        task_categories=["image-text-to-text"],
        tags=tags,
        size_categories=[size_category(sum(c.n_rows for c in staged))],
        source_datasets=sources(pset) or None,
        pretty_name=repo_id.split("/")[-1],
        language=list(language) or None,
    )
    MetadataConfigs({c.name: {"data_files": [{"split": SPLIT, "path": c.pattern}]}
                     for c in staged}).to_dataset_card_data(data)
    DatasetInfosDict({c.name: DatasetInfo(
        features=features,
        splits=SplitDict({SPLIT: SplitInfo(name=SPLIT, num_bytes=c.num_bytes,
                                           num_examples=c.n_rows)}),
        download_size=c.download_size, dataset_size=c.num_bytes) for c in staged}
    ).to_dataset_card_data(data)
    return data


# ----------------------------------------------------------------------------- render


def render_card(pset: PairSet, staged: Sequence[ConfigFiles], features: Features,
                results: Sequence[SetResult], plots: Sequence[tuple[str, str]], *,
                repo_id: str, license: str | None = None,
                language: Sequence[str] = ()) -> DatasetCard:
    """The card: YAML from :func:`card_data`, body from ``dataset_cards/<template>.md``."""
    import jinja2

    template = f"{pset.template}.md"
    if not (TEMPLATES / template).is_file():
        raise PairforgeError(f"{TEMPLATES / template}: card template missing; pairforge's "
                             f"dataset_cards/ folder is incomplete, reinstall from the repository")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["cell"] = _cell
    env.filters["code"] = _code
    data = card_data(pset, staged, features, repo_id=repo_id, license=license,
                     language=language)
    total, reject_rows, reject_rest = rejects_table(pset)
    prov = provenance(pset)
    multi = [c.name for c in staged] != ["default"]
    groups = [g for g, spec in COLUMN_GROUPS.items() if set(spec) & set(features)]
    text = env.get_template(template).render(
        card_data=data.to_yaml(),
        repo_id=repo_id,
        pretty_name=data.pretty_name,
        recipe=pset.recipe,
        is_build=pset.is_build,
        synthetic=is_synthetic(pset),
        sources=sources(pset),
        n_rows=sum(c.n_rows for c in staged),
        configs=staged,
        multi_config=multi,
        first_config=staged[0].name if multi else None,
        split=SPLIT,
        core_columns=list(CORE_FEATURES),
        groups=[(g, [c for c in COLUMN_GROUPS[g] if c in features]) for g in groups],
        diag_sets=[r.name for r in results],
        diag_rows=diagnostics_table(results),
        diag_unit=results[0].summary["length_unit"] if results else "",
        flags=[(r.name, f) for r in results for f in r.summary["flags"]],
        flag_ids={f["id"] for r in results for f in r.summary["flags"]},
        risks=measured_risks(results, pset),
        plots=plots,
        prov=prov,
        build_counts=build_counts(pset.summary),
        n_rejected=total,
        reject_rows=reject_rows,
        reject_rest=reject_rest,
        version=__version__,
    )
    text = SECRET.sub("[redacted]", text)
    # no local path leaves the machine: the body (commands, source, models) is cut to names;
    # the YAML holds repo paths only and must round-trip as written
    head, sep, body = text.partition("\n---\n")
    text = head + sep + redact_local_paths(body) if sep else redact_local_paths(text)
    card = DatasetCard(text)
    if card.data.to_dict() != data.to_dict():  # the YAML must read back as written
        raise RuntimeError("the card's YAML does not round-trip; this is a pairforge bug")
    return card


def write_card(folder: Path, pset: PairSet, staged: Sequence[ConfigFiles], features: Features, *,
               repo_id: str, license: str | None = None, tokenizer: str = "gpt2",
               configs: Mapping[str, Dataset] | None = None) -> DatasetCard:
    """Audit the configs, write the plots into ``folder/images`` and the card into
    ``folder/README.md``; returns the card."""
    configs = configs if configs is not None else pset.configs()
    names = {c: (pset.name if c == "default" else c) for c in configs}
    results = audit_configs(configs, names, tokenizer)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    plots = [(f"images/{name}", caption) for name, caption in write_plots(images, results)]
    card = render_card(pset, staged, features, results, plots, repo_id=repo_id, license=license,
                       language=languages(sample_texts(configs)))
    (folder / "README.md").write_text(str(card), encoding="utf-8")
    return card


def _cell(value: Any) -> str:
    """A value as one markdown table cell: pipes escaped, newlines as spaces."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    """A value as inline code that its own backticks cannot break."""
    text = str(value).replace("\n", " ")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
