"""`pairforge build ... --reference M` (issue 16): per-pair log-probs under the reference (TRL's
``ref_chosen_logps`` / ``ref_rejected_logps``, summed), token counts, Δ_ref, and IPS under the
recipe's policy; the summary's model statistics and flags; shards give the same numbers as one
build; the published card shows Δ_ref and IPS."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from pairforge.diagnostics.model_based import wilson_ci95
from pairforge.engine import BuildConfig, build, load_build
from pairforge.errors import PairforgeError

SOURCE = "shapes:train?n=6"


def _build(out: Path, recipe: str, **kw):
    params = {"editor": "rule"} if recipe == "vapr" else {"k": 2, "max_new_tokens": 8}
    console = Console(file=io.StringIO(), width=150)
    summary = build(BuildConfig(recipe=recipe, source=SOURCE, out=out, params=params,
                                reference="tiny-vlm", **kw), console=console, progress=False)
    return summary, console.file.getvalue()


@pytest.fixture(scope="module")
def vapr(tmp_path_factory):
    out = tmp_path_factory.mktemp("vapr") / "build"
    summary, printed = _build(out, "vapr", chunk_size=3)
    return out, summary, printed


def test_vapr_build_carries_reference_columns_equal_to_the_audit_scores(vapr):
    from pairforge.diagnostics.model_based import score_pairs
    from pairforge.models import load_model

    out, summary, printed = vapr
    ds = load_build(out)
    assert len(ds) >= 2
    rows = ds.to_list()
    scores = score_pairs(load_model("tiny-vlm", batch_size=1, progress=False), rows, text_only=False)
    for r, c, rj, nc, nr in zip(rows, scores.chosen_logps, scores.rejected_logps, scores.chosen_n_tokens,
                                scores.rejected_n_tokens):
        assert r["ref_chosen_logps"] == pytest.approx(c, abs=1e-9)
        assert r["ref_rejected_logps"] == pytest.approx(rj, abs=1e-9)
        assert (r["ref_chosen_n_tokens"], r["ref_rejected_n_tokens"]) == (nc, nr)
        assert r["delta_ref"] == pytest.approx(r["ref_chosen_logps"] - r["ref_rejected_logps"], abs=1e-12)
        assert r["ips"] is None and r["policy_chosen_logps"] is None  # VaPR has no policy
    d = json.loads((out / "summary.json").read_text())["diagnostics"]
    deltas = [r["delta_ref"] for r in rows]
    assert d["delta_ref_mean"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-6)
    assert d["delta_ref_positive_rate"] == pytest.approx(sum(x > 0 for x in deltas) / len(deltas), abs=1e-6)
    assert "ips_mean" not in d
    # the audit's rule: the flag needs the whole 95% Wilson interval of the rate above 0.1
    n_near = sum(abs(x) <= 0.1 for x in deltas)
    assert ("near_zero_delta_ref" in {f["id"] for f in d["flags"]}) == (
        wilson_ci95(n_near, len(deltas))[0] > 0.1)
    assert "delta_ref_mean" in printed
    models = {m["role"]: m["name"] for m in json.loads((out / "manifest.json").read_text())["models"]}
    assert models["reference"] == "tiny-vlm"


def test_shards_give_the_same_reference_numbers(vapr, tmp_path):
    out, _, _ = vapr
    full = {r["id"]: r for r in load_build(out).to_list()}
    got = {}
    for i in range(2):
        _build(tmp_path / f"s{i}", "vapr", shard=(i, 2), chunk_size=2)
        got.update({r["id"]: r for r in load_build(tmp_path / f"s{i}").to_list()})
    assert got.keys() == full.keys()
    for k, r in got.items():  # bit-identical: one pair per forward pass, whatever the chunk
        assert (r["ref_chosen_logps"], r["ref_rejected_logps"], r["delta_ref"]) == \
            (full[k]["ref_chosen_logps"], full[k]["ref_rejected_logps"], full[k]["delta_ref"])


@pytest.fixture(scope="module")
def cwdpo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cwdpo") / "build"
    summary, _ = _build(out, "cwdpo")
    return out, summary


def test_cwdpo_build_has_ips_under_its_policy(cwdpo):
    out, summary = cwdpo
    rows = load_build(out).to_list()
    assert rows
    for r in rows:  # the policy is the reference here (tiny-vlm both): IPS = Δ_ref
        assert r["ips"] == r["delta_ref"] and r["policy_chosen_logps"] == r["ref_chosen_logps"]
        assert r["ref_rejected_n_tokens"] > 0
    d = summary["diagnostics"]
    assert d["ips_mean"] == pytest.approx(d["delta_ref_mean"]) and d["model_n_scored"] == len(rows)


def test_publish_dry_run_card_shows_delta_ref_and_ips(cwdpo):
    from pairforge.publish.hub import publish

    out, summary = cwdpo
    result = publish(out, "pairforge/cwdpo-ref-test", dry_run=True, console=Console(file=io.StringIO()))
    card = (Path(result.staging) / "README.md").read_text()
    assert "images/delta_ref.png" in card and (Path(result.staging) / "images" / "delta_ref.png").is_file()
    line = next(x for x in card.splitlines() if x.startswith("| Δ_ref (mean) |"))
    ips = next(x for x in card.splitlines() if x.startswith("| IPS (mean) |"))
    rows = load_build(out).to_list()
    for stage in sorted({r["cwdpo_stage"] for r in rows}):  # one card column per config (stage)
        d = [r["delta_ref"] for r in rows if r["cwdpo_stage"] == stage]
        assert f"{sum(d) / len(d):+.2f}" in line and f"{sum(d) / len(d):+.2f}" in ips


def test_cli_reference_from_the_config_file(tmp_path):
    from typer.testing import CliRunner

    from pairforge.cli import app

    config = tmp_path / "build.yaml"
    config.write_text("reference: tiny-vlm\nparams:\n  editor: rule\n")
    result = CliRunner().invoke(app, ["build", "vapr", "--source", "shapes:train?n=3", "--out",
                                      str(tmp_path / "b"), "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "delta_ref" in load_build(tmp_path / "b").column_names
    bad = CliRunner().invoke(app, ["build", "vapr", "--source", "shapes:train?n=3", "--out",
                                   str(tmp_path / "c"), "--reference", "tiny-clip", "--quiet"])
    # `pairforge` (cli.main) prints PairforgeError as one line with exit code 2
    assert isinstance(bad.exception, PairforgeError) and "gives no log-probs" in str(bad.exception)


def test_a_build_that_fails_mid_way_resumes_to_the_same_numbers(vapr, tmp_path, monkeypatch):
    """The reference scoring of chunk 2 fails; the rerun resumes after chunk 1 and ends with the
    rows of the uninterrupted build, reference columns included, bit for bit."""
    from pairforge.engine.engine import ReferenceScorer

    out_full, _, _ = vapr
    calls = {"n": 0}
    real = ReferenceScorer.add_columns

    def fail_second(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(self, rows)

    monkeypatch.setattr(ReferenceScorer, "add_columns", fail_second)
    with pytest.raises(RuntimeError, match="killed"):
        _build(tmp_path / "b", "vapr", chunk_size=3)
    assert len(json.loads((tmp_path / "b" / "manifest.json").read_text())["chunks"]) == 1
    monkeypatch.setattr(ReferenceScorer, "add_columns", real)
    _, printed = _build(tmp_path / "b", "vapr", chunk_size=3)
    cols = ["id", "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_n_tokens", "delta_ref"]
    assert load_build(tmp_path / "b").select_columns(cols).to_list() == \
        load_build(out_full).select_columns(cols).to_list()
