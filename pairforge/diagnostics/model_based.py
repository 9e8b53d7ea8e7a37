"""Model-based diagnostics of ``pairforge audit``: how a scoring model sees each pair.

Per pair, under a reference (scorer) model π_ref and the base policy π_θ to be trained:
log π(y_w|x) and log π(y_l|x) of chosen and rejected (sum over response tokens, per-token
mean, token count), Δ_ref = log π_ref(y_w|x) − log π_ref(y_l|x) and IPS, the same gap under
the policy (equal to Δ_ref when one model is given). With ``text_only`` both are also computed
with the image removed from the prompt: a set whose preference the text alone predicts is
vision-agnostic. Per set: distributions, the "Δ_ref > 0" shortcut accuracy, the share of
near-zero gaps, flags, and — on a seeded sample of N of M pairs — 95 % confidence intervals:

- means: normal approximation, mean ± z·s/√n (s with n − 1; z = 1.96), without finite-
  population correction (conservative when the sample is a large share of the set);
- rates: Wilson score interval (Wilson, 1927).

Layout: pure functions first (numpy in, numbers and dicts out: :func:`preference_gap`,
:func:`mean_ci95`, :func:`wilson_ci95`, :func:`gap_summary`, :func:`model_summary`,
:func:`model_flags`, :func:`sample_positions`), then :func:`score_pairs` (one batched
``VLM.score`` call per chunk of pairs) and :class:`ModelAuditor`, which loads the models,
re-reads a set's sampled rows (images included when a model sees them), scores them with a
progress bar and a time estimate, and returns a :class:`ModelResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pairforge.diagnostics.thresholds import THRESHOLDS, Thresholds
from pairforge.errors import PairforgeError
from pairforge.schema import response_text

if TYPE_CHECKING:
    from rich.console import Console

#: z of a two-sided 95 % interval.
Z95 = 1.959963984540054
#: Planned scoring longer than this (seconds) gets a warning with the estimate.
LONG_SCORING_S = 300.0
#: Pairs scored per chunk after the first (the first is one model batch, to measure the rate).
CHUNK_PAIRS = 256
#: How confidence intervals are computed (written into summary.json and the report).
CI_METHOD = ("95% CI: means by normal approximation (mean ± 1.96·s/√n), rates by Wilson score "
             "interval; on the sampled pairs, no finite-population correction")

#: Per-pair scores kept for each (model, mode) prefix, with their parquet types.
_SCORE_COLUMNS = (("chosen_logps", pa.float64()), ("rejected_logps", pa.float64()),
                  ("chosen_mean_logp", pa.float64()), ("rejected_mean_logp", pa.float64()),
                  ("chosen_n_tokens", pa.int32()), ("rejected_n_tokens", pa.int32()))
#: Column prefixes (ref_chosen_logps / ref_rejected_logps are TRL's reference log-prob names)
#: and the gap column each prefix yields.
_PREFIXES = (("ref", "delta_ref"), ("policy", "ips"),
             ("text_only_ref", "text_only_delta_ref"), ("text_only_policy", "text_only_ips"))


# ----------------------------------------------------------------------------- pure logic


def preference_gap(chosen_logps: np.ndarray, rejected_logps: np.ndarray) -> np.ndarray:
    """log π(y_w|x) − log π(y_l|x) per pair, from sequence log-probs (sums over response
    tokens). Under the reference model this is Δ_ref, the reference margin the DPO loss
    subtracts from the policy's (Rafailov et al., 2023, eq. 7); under the base policy to be
    trained it is the implicit preference strength (IPS)."""
    return np.asarray(chosen_logps, dtype=np.float64) - np.asarray(rejected_logps, dtype=np.float64)


def mean_ci95(values: np.ndarray) -> tuple[float, float] | None:
    """95 % CI of the mean by normal approximation: x̄ ± 1.96·s/√n, s the sample standard
    deviation (n − 1). ``None`` for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    half = Z95 * float(np.std(v, ddof=1)) / math.sqrt(len(v))
    m = float(np.mean(v))
    return m - half, m + half


def wilson_ci95(k: int, n: int) -> tuple[float, float] | None:
    """Wilson score 95 % interval of a rate k/n (Wilson, 1927):
    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n). ``None`` for n = 0."""
    if n <= 0:
        return None
    p, z2 = k / n, Z95 * Z95
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def gap_summary(name: str, gap: np.ndarray, *, with_ci: bool, near_zero: float) -> dict:
    """Statistics of one gap (``delta_ref``, ``ips``, …) over the scored pairs: mean, median,
    10th / 90th percentiles, the shares with gap > 0 (the "Δ > 0" shortcut accuracy), < 0
    and |gap| <= ``near_zero``; with ``with_ci`` a ``_ci95`` [lo, hi] for the mean and each
    rate. Values ``None`` when no pair was scored."""
    g = np.asarray(gap, dtype=np.float64)
    n = len(g)
    r6 = lambda x: None if x is None else round(float(x), 6)  # noqa: E731
    out: dict[str, Any] = {
        f"{name}_mean": r6(np.mean(g)) if n else None,
        f"{name}_median": r6(np.median(g)) if n else None,
        f"{name}_p10": r6(np.percentile(g, 10)) if n else None,
        f"{name}_p90": r6(np.percentile(g, 90)) if n else None,
    }
    counts = {"positive": int((g > 0).sum()), "negative": int((g < 0).sum()),
              "near_zero": int((np.abs(g) <= near_zero).sum())}
    for key, k in counts.items():
        out[f"{name}_{key}_rate"] = r6(k / n) if n else None
    if with_ci:
        ci = mean_ci95(g)
        out[f"{name}_mean_ci95"] = None if ci is None else [r6(ci[0]), r6(ci[1])]
        for key, k in counts.items():
            ci = wilson_ci95(k, n)
            out[f"{name}_{key}_rate_ci95"] = None if ci is None else [r6(ci[0]), r6(ci[1])]
    return out


def model_summary(gaps: Mapping[str, np.ndarray], *, n_pairs: int,
                  thresholds: Thresholds = THRESHOLDS) -> dict:
    """The summary.json keys of the model-based metrics of one set. ``gaps``: per scored pair,
    ``delta_ref`` and ``ips`` (and ``text_only_delta_ref`` / ``text_only_ips`` when computed).
    Confidence intervals come with every mean and rate when fewer than ``n_pairs`` pairs
    were scored (a sample)."""
    n_scored = len(next(iter(gaps.values()))) if gaps else 0
    sampled = n_scored < n_pairs
    out: dict[str, Any] = {"model_n_scored": n_scored, "model_n_pairs": n_pairs,
                           "model_sampled": sampled}
    for name, gap in gaps.items():
        out.update(gap_summary(name, gap, with_ci=sampled, near_zero=thresholds.delta_ref_near_zero))
    if sampled:
        out["model_ci_method"] = CI_METHOD
    return out


def model_flags(s: Mapping, *, has_images: bool, t: Thresholds = THRESHOLDS) -> list[dict]:
    """Flags of the model-based metrics (``{id, message, value, threshold}`` each):
    ``near_zero_delta_ref`` and, for a set with images scored with ``--text-only``,
    ``vision_agnostic``."""
    flags = []
    if not s.get("model_n_scored"):
        return flags
    on = (f" (on a sample of {s['model_n_scored']:,} of {s['model_n_pairs']:,} pairs)"
          if s.get("model_sampled") else "")

    n = s["model_n_scored"]

    def interval(key: str) -> tuple[float, float]:
        """The rate's 95% Wilson interval over the scored pairs (pairforge.diagnostics.stats
        FLAG_RULE: a flag needs all of it beyond the threshold)."""
        return wilson_ci95(round(s[key] * n), n)

    def ci(key: str) -> str:
        c = s.get(f"{key}_ci95") or interval(key)
        return f", 95% CI {c[0]:.0%}–{c[1]:.0%}"

    v = s["delta_ref_near_zero_rate"]
    if v > t.near_zero_delta_rate and interval("delta_ref_near_zero_rate")[0] > t.near_zero_delta_rate:
        flags.append({
            "id": "near_zero_delta_ref", "value": v,
            "threshold": f"delta_ref_near_zero_rate > {t.near_zero_delta_rate} "
                         f"(|Δ_ref| <= {t.delta_ref_near_zero})",
            "message": f"The scorer finds chosen and rejected about equally likely "
                       f"(|Δ_ref| <= {t.delta_ref_near_zero} nats) in {v:.0%} of pairs"
                       f"{ci('delta_ref_near_zero_rate')}{on}: near-duplicates that give DPO "
                       f"little to learn from; check that they really differ."})
    v = s.get("text_only_delta_ref_positive_rate")
    lo_hi = interval("text_only_delta_ref_positive_rate") if v is not None else None
    if has_images and v is not None and (lo_hi[0] >= t.text_only_separable_high
                                         or lo_hi[1] <= t.text_only_separable_low):
        which, acc = ("more", v) if v >= t.text_only_separable_high else ("less", 1 - v)
        flags.append({
            "id": "vision_agnostic", "value": v,
            "threshold": f"text_only_delta_ref_positive_rate >= {t.text_only_separable_high} "
                         f"or <= {t.text_only_separable_low}",
            "message": f"Without the image, picking the answer the scorer finds {which} likely "
                       f"finds the chosen one in {acc:.0%} of pairs"
                       f"{ci('text_only_delta_ref_positive_rate')}{on}: the preference is "
                       f"predictable from the text alone, so training on it need not use the "
                       f"image."})
    return flags


def sample_positions(n_pairs: int, n_sample: int | None, seed: int) -> np.ndarray:
    """Sorted positions (0-based, among a set's readable pairs) of a seeded random sample of
    ``n_sample`` pairs without replacement; all positions when ``n_sample`` is ``None`` or
    at least ``n_pairs``."""
    if n_sample is not None and n_sample < 1:
        raise PairforgeError(f"--sample {n_sample}: must be at least 1 (or omit it to score every pair)")
    if n_sample is None or n_sample >= n_pairs:
        return np.arange(n_pairs, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_pairs, size=n_sample, replace=False)).astype(np.int64)


def model_fields(text_only: bool) -> list[pa.Field]:
    """The per-pair model columns of ``pairs.parquet`` (null where a pair was not scored)."""
    prefixes = _PREFIXES if text_only else _PREFIXES[:2]
    fields = [pa.field("model_scored", pa.bool_()), pa.field("model_skip_reason", pa.string())]
    for prefix, gap in prefixes:
        fields += [pa.field(f"{prefix}_{c}", t) for c, t in _SCORE_COLUMNS]
        fields.append(pa.field(gap, pa.float64()))
    return fields


def text_only_messages(messages: Sequence[Mapping]) -> list[dict]:
    """The messages with every image part removed (string contents kept as they are)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "image")]
        out.append({**m, "content": content})
    return out


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Per-pair scores of one model in one mode, over the scored pairs, in order."""

    chosen_logps: np.ndarray
    rejected_logps: np.ndarray
    chosen_mean_logp: np.ndarray
    rejected_mean_logp: np.ndarray
    chosen_n_tokens: np.ndarray
    rejected_n_tokens: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        names = [c for c, _ in _SCORE_COLUMNS]
        if not parts:
            return cls(*(np.zeros(0) for _ in names))
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in names))

    @property
    def gap(self) -> np.ndarray:
        return preference_gap(self.chosen_logps, self.rejected_logps)


def score_pairs(model, rows: Sequence[Mapping], *, text_only: bool) -> Scores:
    """log π(chosen|x) and log π(rejected|x) of canonical rows through ``model.score`` (the
    :class:`~pairforge.models.VLM` protocol), in ONE batched call: chosen and rejected share
    their request, so backends that pack responses sharing a prompt compute it once.
    ``text_only``: image parts and images are removed from the prompt."""
    from pairforge.models import Request

    requests, responses = [], []
    for r in rows:
        if text_only:
            req = Request(text_only_messages(r["prompt"]), (), r["id"])
        else:
            req = Request(r["prompt"], list(r["images"] or ()), r["id"])
        requests += [req, req]
        responses += [response_text(r["chosen"]), response_text(r["rejected"])]
    scored = model.score(requests, responses)
    sums = np.array([s.sum_logprob for s in scored], dtype=np.float64).reshape(-1, 2)
    means = np.array([s.mean_logprob for s in scored], dtype=np.float64).reshape(-1, 2)
    counts = np.array([s.n_tokens for s in scored], dtype=np.int64).reshape(-1, 2)
    return Scores(sums[:, 0], sums[:, 1], means[:, 0], means[:, 1], counts[:, 0], counts[:, 1])


def reference_columns(reference, rows: Sequence[Mapping], policy=None) -> dict[str, list]:
    """The ``ref`` and ``model_diagnostics`` columns of canonical rows (a build with
    ``--reference``): log π_ref of chosen and rejected (summed, TRL's ``ref_*_logps``), their
    token counts, Δ_ref, and with ``policy`` its log-probs and IPS (``policy`` may be the
    reference itself: IPS = Δ_ref). Scored by :func:`score_pairs`."""
    n = len(rows)
    if not n:
        return {}
    ref = score_pairs(reference, rows, text_only=False)
    out: dict[str, list] = {
        "ref_chosen_logps": ref.chosen_logps.tolist(), "ref_rejected_logps": ref.rejected_logps.tolist(),
        "ref_chosen_n_tokens": ref.chosen_n_tokens.tolist(),
        "ref_rejected_n_tokens": ref.rejected_n_tokens.tolist(), "delta_ref": ref.gap.tolist(),
        "policy_chosen_logps": [None] * n, "policy_rejected_logps": [None] * n, "ips": [None] * n}
    if policy is not None:
        pol = ref if policy is reference else score_pairs(policy, rows, text_only=False)
        out.update(policy_chosen_logps=pol.chosen_logps.tolist(),
                   policy_rejected_logps=pol.rejected_logps.tolist(), ips=pol.gap.tolist())
    return out


@dataclass
class ModelResult:
    """The model-based audit of one set: per-pair columns over all its pairs (scored or not),
    the summary keys, flags, and lines for the terminal and the report."""

    columns: dict[str, np.ndarray]
    scored: np.ndarray
    summary: dict
    flags: list[dict]
    notes: list[str] = field(default_factory=list)
    gaps: dict[str, np.ndarray] = field(default_factory=dict)
    skips: dict[int, str] = field(default_factory=dict)  # position → why it was not scored


def build_model_result(delta_ref: Sequence[float], ips: Sequence[float | None], *,
                       has_images: bool, thresholds: Thresholds = THRESHOLDS) -> ModelResult:
    """The model audit's result (summary keys, flags, gaps for the plots) of a build's
    ``delta_ref`` / ``ips`` columns (a build with ``--reference``: every pair scored)."""
    gaps = {"delta_ref": np.asarray(delta_ref, dtype=np.float64)}
    if len(ips) and all(v is not None for v in ips):
        gaps["ips"] = np.asarray(ips, dtype=np.float64)
    n = len(gaps["delta_ref"])
    s = model_summary(gaps, n_pairs=n, thresholds=thresholds)
    return ModelResult(columns={}, scored=np.ones(n, dtype=bool), summary=s,
                       flags=model_flags(s, has_images=has_images, t=thresholds), gaps=gaps)


def model_table_columns(result: ModelResult | None, fields: Sequence[pa.Field], n: int) -> dict[str, pa.Array]:
    """Arrow arrays of the model columns of ``pairs.parquet`` (null for unscored pairs, all
    null when the set was not scored)."""
    out = {}
    for f in fields:
        if result is None:
            out[f.name] = pa.nulls(n, type=f.type)
        elif f.name == "model_scored":
            out[f.name] = pa.array(result.scored, type=pa.bool_())
        elif f.name == "model_skip_reason":
            out[f.name] = (pa.array([result.skips.get(i) for i in range(n)], type=pa.string())
                           if result.skips else pa.nulls(n, type=pa.string()))
        else:
            out[f.name] = pa.array(result.columns[f.name], mask=~result.scored).cast(f.type)
    return out


class ModelAuditor:
    """Scores the pairs of each audited set under ``scorer`` (π_ref) and ``policy`` (π_θ).

    ``scorer`` / ``policy``: model specs (``default``: ``tiny-vlm`` for a set with images,
    ``smollm2`` for a text-only set); either may be ``None``, the other then stands in
    (IPS = Δ_ref). ``text_only``: also score with the image removed. ``sample``: score a
    seeded random sample of that many pairs per set (``seed``). Models load once per run."""

    def __init__(self, scorer: str | None, policy: str | None = None, *, text_only: bool = False,
                 sample: int | None = None, seed: int = 0, batch_size: int = 8,
                 device: str | None = None, console: Console | None = None,
                 thresholds: Thresholds = THRESHOLDS, max_pixels: int | None = None):
        if scorer is None and policy is None:
            raise PairforgeError("the model-based audit needs --scorer or --policy (e.g. --scorer default)")
        if sample is not None and sample < 1:
            raise PairforgeError(f"--sample {sample}: must be at least 1 (or omit it to score every pair)")
        if batch_size < 1:
            raise PairforgeError(f"--batch-size {batch_size}: must be at least 1")
        from pairforge.models.base import resolve_device
        from pairforge.models.spec import parse_model_spec

        resolve_device(device)  # a device this machine lacks fails before any set is read
        for spec in (scorer, policy):  # a malformed spec fails before any set is read
            if spec is not None and spec.strip() != "default":
                parse_model_spec(spec)
        self.scorer, self.policy = scorer or policy, policy or scorer
        self.text_only, self.sample, self.seed = text_only, sample, seed
        self.batch_size, self.device, self.thresholds = batch_size, device, thresholds
        self.console = console
        from pairforge.sources.sft import DEFAULT_MAX_PIXELS

        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        if self.max_pixels < 1:
            raise PairforgeError(f"--max-pixels {max_pixels}: must be >= 1")
        self._models: dict[str, Any] = {}

    def preload(self) -> None:
        """Load the models whose spec does not depend on the set (all but ``default``), so a
        bad model fails before any set is read."""
        for spec in dict.fromkeys((self.scorer, self.policy)):
            if spec.strip() != "default":
                self.model(spec)

    def fields(self) -> list[pa.Field]:
        return model_fields(self.text_only)

    # ------------------------------------------------------------------ models

    @staticmethod
    def resolve(spec: str, has_images: bool) -> str:
        """``default`` → ``tiny-vlm`` for a set with images, ``smollm2`` for a text-only set."""
        if spec.strip() == "default":
            return "tiny-vlm" if has_images else "smollm2"
        return spec

    def model(self, spec: str):
        """The loaded model of ``spec`` (loaded once per run), checked to score responses."""
        if spec not in self._models:
            from pairforge.models import Capability, load_model, parse_model_spec, require

            ms = parse_model_spec(spec)
            kw: dict[str, Any] = {}
            if ms.backend in ("hf", "embedded", "vllm"):  # an openai: server batches on its side
                kw["batch_size"] = self.batch_size
            if ms.backend in ("hf", "embedded"):
                kw.update(progress=False, device=self.device)
            model = load_model(ms, role="scorer", **kw)
            if not hasattr(model, "score"):
                raise PairforgeError(f"--scorer/--policy {spec}: {type(model).__name__} is an "
                                     f"image-text scorer, not a language model; use a model that "
                                     f"scores responses (tiny-vlm, smollm2, hf:PATH_OR_ID)")
            require(model, Capability.SCORE, purpose="the model-based audit (log π(y|x))")
            self._models[spec] = model
        return self._models[spec]

    # ------------------------------------------------------------------ one set

    def audit_set(self, name: str, spec: Any, ids: pa.Array, *, has_images: bool,
                  format: str | None, image_root: Any = None,
                  first_skipped: Sequence[int] = ()) -> ModelResult:
        """Score the sampled pairs of one set (re-read from ``spec``; positions among its
        readable rows, checked against ``ids`` from the first pass, whose skipped record
        indices are ``first_skipped``). A sampled pair whose images cannot be read, decoded
        or exceed the build's pixel limit is not scored: its reason is in ``skips``."""
        from pairforge.models import Capability

        n_pairs = len(ids)
        positions = sample_positions(n_pairs, self.sample, self.seed)
        ref_spec = self.resolve(self.scorer, has_images)
        pol_spec = self.resolve(self.policy, has_images)
        ref, pol = self.model(ref_spec), self.model(pol_spec)

        def mode(model, want_text_only: bool) -> bool:  # True: score the text alone
            return want_text_only or not has_images or Capability.IMAGES not in model.capabilities

        wanted = {"ref": (ref_spec, mode(ref, False)), "policy": (pol_spec, mode(pol, False))}
        if self.text_only:
            wanted.update(text_only_ref=(ref_spec, True), text_only_policy=(pol_spec, True))
        jobs = list(dict.fromkeys(wanted.values()))  # (spec, text_only) pairs, each scored once
        notes = [f"model metrics: scorer (π_ref) {ref.name}, policy (IPS) {pol.name}"
                 + (" (the same model: IPS = Δ_ref)" if ref_spec == pol_spec else "")]
        if has_images and Capability.IMAGES not in ref.capabilities:
            notes.append(f"{ref.name} cannot see images: its Δ_ref is computed on the text alone")
        notes.append(f"scored {len(positions):,} of {n_pairs:,} pairs"
                     + (f" (seeded random sample, seed {self.seed}; [lo, hi] = 95% confidence "
                        f"interval)" if len(positions) < n_pairs else ""))

        parts: dict[tuple[str, bool], list[Scores]] = {job: [] for job in jobs}
        t0 = time.perf_counter()
        needs_images = any(not text for _, text in jobs)
        done, rate = 0, None
        skips: dict[int, str] = {}
        for rows in self._sampled_rows(name, spec, ids, positions, format=format,
                                       image_root=image_root, load_images=needs_images,
                                       first_skipped=first_skipped, skips=skips):
            for job in jobs:
                parts[job].append(score_pairs(self.model(job[0]), rows, text_only=job[1]))
            done += len(rows)
            if done == len(rows):  # the first chunk: measure the rate, estimate the rest
                rate = self._estimate(name, time.perf_counter() - t0, done, len(positions), n_pairs)
        seconds = time.perf_counter() - t0
        scores = {job: Scores.concat(p) for job, p in parts.items()}
        if skips:
            positions = np.array([p for p in positions.tolist() if p not in skips], dtype=np.int64)
            notes.append(f"{len(skips):,} sampled pair(s) not scored: their images cannot be "
                         f"read (model_skip_reason in pairs.parquet says why)")

        columns: dict[str, np.ndarray] = {}
        gaps: dict[str, np.ndarray] = {}
        for prefix, gap_name in _PREFIXES:
            if prefix not in wanted:
                continue
            s = scores[wanted[prefix]]
            for c, _ in _SCORE_COLUMNS:
                full = np.zeros(n_pairs, dtype=np.float64)
                full[positions] = getattr(s, c)
                columns[f"{prefix}_{c}"] = full
            gaps[gap_name] = s.gap
            full = np.zeros(n_pairs, dtype=np.float64)
            full[positions] = s.gap
            columns[gap_name] = full
        scored = np.zeros(n_pairs, dtype=bool)
        scored[positions] = True
        summary = model_summary(gaps, n_pairs=n_pairs, thresholds=self.thresholds)
        summary.update(model_scorer=ref.name, model_scorer_revision=getattr(ref, "revision", ""),
                       model_policy=pol.name, model_policy_revision=getattr(pol, "revision", ""),
                       model_scorer_sees_images=has_images and not wanted["ref"][1],
                       model_seed=self.seed, model_seconds=round(seconds, 3),
                       model_n_skipped=len(skips))
        flags = model_flags(summary, has_images=has_images, t=self.thresholds)
        if skips:
            from pairforge.sources.sft import reason_kind

            kind = reason_kind(next(iter(skips.values())))
            flags.append({"id": "model_skipped_rows", "value": len(skips),
                          "threshold": "model_n_skipped > 0",
                          "message": f"{len(skips):,} sampled pair(s) were not scored because "
                                     f"their images cannot be used (first: {kind}); "
                                     f"model_skip_reason in pairs.parquet says why."})
        notes.append(f"scoring took {seconds:.1f} s ({len(positions) / max(seconds, 1e-9):.1f} "
                     f"pairs/s, {len(jobs)} model pass(es))"
                     + (f"; all {n_pairs:,} pairs would take about {_duration(n_pairs / rate)}"
                        if rate and len(positions) < n_pairs and n_pairs / rate > 60 else ""))
        return ModelResult(columns, scored, summary, flags, notes, gaps, skips)

    def _sampled_rows(self, name: str, spec: Any, ids: pa.Array, positions: np.ndarray, *,
                      format: str | None, image_root: Any, load_images: bool,
                      first_skipped: Sequence[int] = (), skips: dict[int, str] | None = None):
        """Chunks of the canonical rows at ``positions`` (a second pass over the set), with a
        progress bar; the first chunk is one model batch, so its time gives the rate early.

        Loading images, the second pass may skip rows the first (text) pass kept: a missing
        or empty image file. Such a row still takes its position (records skipped in the
        first pass, ``first_skipped``, do not); at a sampled position it goes to ``skips``
        with its reason, as does a row whose images do not decode or exceed ``max_pixels``
        (default :data:`~pairforge.sources.sft.DEFAULT_MAX_PIXELS`, the build's limit)."""
        from tqdm import tqdm

        from pairforge.sources import read_pairs

        skips = {} if skips is None else skips
        first = set(first_skipped)
        stream = read_pairs(spec, format=format, image_root=image_root, on_error="skip",
                            load_images=load_images)
        wanted = iter(positions.tolist())
        target = next(wanted, None)
        chunk: list[Mapping] = []
        size = self.batch_size
        k = n_seen = 0  # k: position among the first pass's rows; n_seen: skips looked at

        def newly_skipped() -> None:  # rows of the first pass that this pass skipped
            nonlocal k, n_seen, target
            while n_seen < len(stream.skipped):
                at, bad = stream.skipped_at[n_seen], stream.skipped[n_seen]
                n_seen += 1
                if at in first:
                    continue
                if k == target:
                    skips[k] = bad.one_line()
                    target = next(wanted, None)
                k += 1

        with tqdm(total=len(positions), desc=f"score {name}", unit=" pairs", disable=None) as bar:
            for row in stream:
                newly_skipped()
                if target is None:
                    break
                if k == target:
                    if k >= len(ids) or row["id"] != ids[k].as_py():
                        raise PairforgeError(f"{name}: row {k} has id {row['id']} on the second "
                                             f"read but {ids[k].as_py() if k < len(ids) else 'none'} "
                                             f"on the first; the source is not stable between "
                                             f"reads (copy it to a local file)")
                    row, why = (_decoded(row, stream.where, self.max_pixels) if load_images
                                else (row, None))
                    if why is not None:
                        skips[k] = why
                    else:
                        chunk.append(row)
                    target = next(wanted, None)
                    if len(chunk) == size:
                        yield chunk
                        bar.update(len(chunk))
                        chunk, size = [], CHUNK_PAIRS
                k += 1
            newly_skipped()
            if chunk:
                yield chunk
                bar.update(len(chunk))
        if target is not None:
            raise PairforgeError(f"{name}: the second read ended after {k} pairs, before sampled "
                                 f"position {target}; the source is not stable between reads")

    def _estimate(self, name: str, seconds: float, done: int, planned: int, n_pairs: int) -> float | None:
        """The scoring rate (pairs/s) on the first chunk; warns when scoring the rest of the
        planned pairs (all of them without --sample) would take long."""
        if done == 0 or seconds <= 0:
            return None
        rate = done / seconds
        eta = (planned - done) / rate
        if self.console is not None and planned - done > 0 and eta > LONG_SCORING_S:
            suggest = max(100, int(rate * LONG_SCORING_S))
            what = (f"the remaining {planned - done:,} sampled pairs" if planned < n_pairs
                    else f"all {n_pairs:,} pairs")
            self.console.print(
                f"[yellow]⚠[/yellow] {name}: scoring {what} will take about {_duration(eta)} at "
                f"{rate:.1f} pairs/s (measured on the first {done} pairs); pass --sample "
                f"{suggest:,} to finish in about {_duration(LONG_SCORING_S)} with 95% confidence "
                f"intervals", highlight=False)
        return rate


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _decoded(row: Mapping, where: str, max_pixels: int) -> tuple[Mapping, str | None]:
    """The row with its images decoded (:func:`~pairforge.sources.sft.decode_image`, with
    the pixel limit), or ``(row, reason)`` when one cannot be used."""
    from pairforge.errors import BadInput
    from pairforge.sources.sft import decode_image

    try:
        images = [decode_image(im, i, max_pixels) for i, im in enumerate(row["images"] or ())]
    except BadInput as e:
        return row, f"{where}, id {row['id']}: {e.one_line()}"
    return {**row, "images": images}, None
