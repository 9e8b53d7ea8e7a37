"""The build engine with fake recipes on the offline world: reconciliation, batching,
determinism, resume after a recipe crash, run identity, shards and merge, provenance,
diagnostics, config handling."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Image, List
from PIL import Image as PILImage
from rich.console import Console
from test_build_fakes import CRASH_ENV, Echo, register
from typer.testing import CliRunner

from pairforge import __version__
from pairforge.engine import BuildConfig, build, load_build, load_config, merge, parse_params
from pairforge.engine.manifest import Manifest, run_identity, settings_diff, shard_of
from pairforge.engine.merge import check_disjoint
from pairforge.cli import app
from pairforge.diagnostics.lengths import gpt2_tokenizer
from pairforge.diagnostics.text import reference_pair_metrics
from pairforge.errors import PairforgeError
from pairforge.schema import COLUMN_GROUPS, response_text

register()


def run(out: Path, recipe: str = "echo", source: str = "shapes?n=40", **kw) -> dict:
    kw.setdefault("chunk_size", 8)
    cfg = BuildConfig(recipe=recipe, source=source, out=out, **kw)
    return build(cfg, console=Console(file=io.StringIO()), progress=False)


def rows_of(out: Path) -> list[dict]:
    return load_build(out).with_format("arrow")[:].to_pylist()


def rejects_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def test_every_example_is_a_pair_or_a_reject(tmp_path):
    s = run(tmp_path / "b")
    c = s["counts"]
    assert c["examples_in"] == 40 == c["examples_with_pairs"] + c["rejected"]
    rejects = rejects_of(tmp_path / "b")
    assert len(rejects) == c["rejected"] > 0  # the world has counting questions
    assert {r["stage"] for r in rejects} == {"filter"}
    assert all(set(r) == {"id", "source_id", "stage", "reason"} for r in rejects)
    rows = rows_of(tmp_path / "b")
    assert len(rows) == c["pairs"] == c["examples_with_pairs"]
    # the examples of rows and rejects are exactly the 40 source examples, none twice
    ids = [r["source_id"] for r in rows] + [r["id"] for r in rejects]
    assert sorted(ids) == [f"shapes-train-0-{i:07d}" for i in range(40)]
    assert s["rejects_by_stage"]["filter"]["n"] == c["rejected"]
    assert s["recipe_stats"] == {"pairs_made": float(c["pairs"])}
    assert s["steps"]["recipe"] == {"in": 40, "forwarded": c["examples_with_pairs"],
                                    "dropped": c["rejected"]}
    assert s["n_chunks"] == 5 and s["chunk_size"] == 8


def test_rows_carry_provenance_diagnostics_and_embedded_images(tmp_path):
    s = run(tmp_path / "b", seed=3)
    ds = load_build(tmp_path / "b")
    assert set(COLUMN_GROUPS["diagnostics"]) <= set(ds.column_names)
    row = ds[0]
    assert row["recipe"] == "echo" and row["seed"] == 3
    assert row["source_dataset"] == "shapes:train" and row["source_id"].startswith("shapes-train-0-")
    assert row["task"] in {"object", "color", "size", "spatial", "existence", "referential",
                           "background", "reasoning", "captioning"}
    meta = {m["key"]: m["value"] for m in row["source_meta"]}
    assert json.loads(meta["target"])["attribute"]  # the world's ground truth travels along
    sha = hashlib.sha256(Echo({}).templates()["rejected"].encode()).hexdigest()
    assert row["prompt_templates"] == [{"name": "rejected", "sha256": sha}]
    assert row["pairforge_version"] == __version__
    assert isinstance(row["images"][0], PILImage.Image) and row["images"][0].size == (112, 112)
    # diagnostics: the audit's per-pair metrics, checked against its pure-Python definition
    chosen = [response_text(r["chosen"]) for r in ds]
    rejected = [response_text(r["rejected"]) for r in ds]
    ref = reference_pair_metrics(chosen, rejected)
    assert ds["lev_words"] == ref["lev_words"].tolist()
    assert ds["is_identical"] == [False] * len(ds)
    assert row["len_chosen"] == len(gpt2_tokenizer().encode(chosen[0]).ids)
    assert row["len_gap"] == row["len_chosen"] - row["len_rejected"]
    assert row["length_unit"] == "gpt2"
    assert s["diagnostics"]["n_pairs"] == len(ds)


def test_batch_size_changes_nothing_but_the_batches(tmp_path):
    Echo.batches.clear()
    run(tmp_path / "b1", batch_size=1)
    assert set(Echo.batches) == {1}
    Echo.batches.clear()
    run(tmp_path / "b7", batch_size=7)
    assert max(Echo.batches) == 7  # 8 examples per chunk → batches of 7 and 1
    assert rows_of(tmp_path / "b1") == rows_of(tmp_path / "b7")
    assert rejects_of(tmp_path / "b1") == rejects_of(tmp_path / "b7")
    ident = [json.loads((tmp_path / b / "summary.json").read_text())["run_identity"]
             for b in ("b1", "b7")]
    assert ident[0] == ident[1]


def test_seed_changes_rows(tmp_path):
    run(tmp_path / "a", seed=0)
    run(tmp_path / "b", seed=1)
    assert rows_of(tmp_path / "a") != rows_of(tmp_path / "b")


def test_recipe_crash_keeps_committed_chunks_and_resume_matches(tmp_path, monkeypatch):
    run(tmp_path / "ref")
    monkeypatch.setenv(CRASH_ENV, "shapes-train-0-0000019")  # in chunk 2 (examples 16..23)
    with pytest.raises(PairforgeError, match=r"recipe echo failed in chunk 2 .*fake crash.*"
                                             r"rerun the same command to resume"):
        run(tmp_path / "b")
    m = Manifest.load(tmp_path / "b")
    assert len(m.chunks) == 2 and not m["complete"] and m["state"] == {"seen": 16}
    assert "RuntimeError: fake crash" in (tmp_path / "b" / "error.log").read_text()
    with pytest.raises(PairforgeError, match="not finished"):
        load_build(tmp_path / "b")
    monkeypatch.delenv(CRASH_ENV)
    s = run(tmp_path / "b")
    assert len(s["commands"]) == 2
    assert rows_of(tmp_path / "b") == rows_of(tmp_path / "ref")
    assert rejects_of(tmp_path / "b") == rejects_of(tmp_path / "ref")


def test_rerunning_a_finished_build_does_nothing(tmp_path):
    s1 = run(tmp_path / "b")
    mtime = (tmp_path / "b" / "data" / "chunk-00000.parquet").stat().st_mtime_ns
    s2 = run(tmp_path / "b")
    assert s1 == s2
    assert (tmp_path / "b" / "data" / "chunk-00000.parquet").stat().st_mtime_ns == mtime


def test_resume_with_other_settings_names_the_setting(tmp_path):
    run(tmp_path / "b", params={"reject_task": "size"})
    with pytest.raises(PairforgeError, match=r"params\.reject_task: \"size\" → \"color\".*"
                                             r"--out with a new folder, or --overwrite"):
        run(tmp_path / "b", params={"reject_task": "color"})
    with pytest.raises(PairforgeError, match=r"seed: 0 → 5"):
        run(tmp_path / "b", params={"reject_task": "size"}, seed=5)
    with pytest.raises(PairforgeError, match=r"source\.spec"):
        run(tmp_path / "b", source="shapes?n=41", params={"reject_task": "size"})
    s = run(tmp_path / "b", params={"reject_task": "color"}, overwrite=True)
    assert "color" not in {r["task"] for r in rows_of(tmp_path / "b")}
    assert s["counts"]["examples_in"] == 40


def test_identity_ignores_batch_chunk_size_and_out(tmp_path):
    a = run(tmp_path / "a", batch_size=2, chunk_size=4)
    b = run(tmp_path / "elsewhere", batch_size=8, chunk_size=16)
    assert a["run_identity"] == b["run_identity"]
    assert rows_of(tmp_path / "a") == rows_of(tmp_path / "elsewhere")


def test_identity_helpers():
    s = {"recipe": "x", "params": {"a": 1}, "seed": 0}
    assert run_identity(s) == run_identity(json.loads(json.dumps(s)))
    assert run_identity(s) != run_identity({**s, "seed": 1})
    assert settings_diff(s, {**s, "params": {"a": 2}}) == "params.a: 1 → 2"
    assert settings_diff(s, s) is None
    # the shard of an id is stable (sha256) and spreads ids over the shards
    assert shard_of("shapes-train-0-0000000", 4) == shard_of("shapes-train-0-0000000", 4)
    counts = [0] * 4
    for i in range(400):
        counts[shard_of(f"id-{i}", 4)] += 1
    assert min(counts) > 60


def test_shards_cover_the_source_and_merge(tmp_path):
    full = run(tmp_path / "full", limit=30)
    shards = [run(tmp_path / f"s{i}", shard=(i, 3), limit=30) for i in range(3)]
    assert sum(s["counts"]["examples_in"] for s in shards) == 30
    assert all(s["counts"]["other_shards"] == 30 - s["counts"]["examples_in"] for s in shards)
    m = merge([tmp_path / "s2", tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged",
              console=Console(file=io.StringIO()))
    assert m["counts"]["examples_in"] == 30 and m["counts"]["other_shards"] == 0
    assert m["run_identity"] == full["run_identity"]
    merged = {r["id"]: r for r in rows_of(tmp_path / "merged")}
    # a stateless view of the rows: the echo's running count differs per shard by design
    strip = lambda r: {k: v for k, v in r.items() if k not in ("rejected", "id", "lev_words",  # noqa: E731
                       "lev_norm", "len_rejected", "len_gap", "len_ratio", "is_near_duplicate")}
    full_rows = sorted((strip(r) for r in rows_of(tmp_path / "full")), key=lambda r: r["source_id"])
    merged_rows = sorted((strip(r) for r in merged.values()), key=lambda r: r["source_id"])
    assert merged_rows == full_rows
    assert sorted(r["id"] for r in rejects_of(tmp_path / "merged")) == \
        sorted(r["id"] for r in rejects_of(tmp_path / "full"))
    # each example went to the shard its id hashes to
    for i in range(3):
        assert all(shard_of(r["source_id"], 3) == i for r in rows_of(tmp_path / f"s{i}"))


def test_merge_refuses_missing_duplicate_and_foreign_shards(tmp_path):
    quiet = Console(file=io.StringIO())
    for i in range(2):
        run(tmp_path / f"s{i}", shard=(i, 2), limit=12)
    run(tmp_path / "other", shard=(1, 2), limit=12, seed=9)
    with pytest.raises(PairforgeError, match=r"shard\(s\) 1/2 missing"):
        merge([tmp_path / "s0"], tmp_path / "m", console=quiet)
    with pytest.raises(PairforgeError, match="given twice"):
        merge([tmp_path / "s0", tmp_path / "s1", tmp_path / "s1"], tmp_path / "m", console=quiet)
    with pytest.raises(PairforgeError, match=r"another run .*seed: 0 → 9"):
        merge([tmp_path / "s0", tmp_path / "other"], tmp_path / "m", console=quiet)
    fake = tmp_path / "fake1"  # shard 0's rows relabelled as shard 1: overlaps, covers wrong
    shutil.copytree(tmp_path / "s0", fake)
    m = json.loads((fake / "manifest.json").read_text())
    m["shard"] = [1, 2]
    (fake / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PairforgeError, match="hold .* examples but their source has 12"):
        merge([tmp_path / "s0", fake], tmp_path / "m", console=quiet)
    with pytest.raises(PairforgeError, match="is in shard 0 and shard 1; the shards overlap"):
        check_disjoint([Manifest.load(tmp_path / "s0"), Manifest.load(fake)])
    with pytest.raises(PairforgeError, match="is one of the shard folders"):
        merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "s1", console=quiet)
    run(tmp_path / "plain", limit=12)
    with pytest.raises(PairforgeError, match="built without --shard"):
        merge([tmp_path / "plain"], tmp_path / "m", console=quiet)
    with pytest.raises(PairforgeError, match="holds a build, not a merge"):
        merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "plain", console=quiet)


def test_resume_with_another_shard_is_refused(tmp_path):
    run(tmp_path / "b", shard=(0, 2), limit=8)
    with pytest.raises(PairforgeError, match=r"holds shard 0/2, this build is 1/2"):
        run(tmp_path / "b", shard=(1, 2), limit=8)


def test_multi_row_outcomes_and_single_image_columns(tmp_path):
    s = run(tmp_path / "b", recipe="crops", limit=16)
    ds = load_build(tmp_path / "b")
    assert s["counts"]["pairs"] == 2 * s["counts"]["examples_with_pairs"] == len(ds)
    row = ds[0]
    assert row["p2dpo_kind"] == "focus" and row["crop_box"] == [0.0, 0.0, 56.0, 56.0]
    assert row["crop_image"].size == (56, 56) and row["noisy_image"] is None
    assert row["crop_image"].tobytes() == row["images"][0].crop((0, 0, 56, 56)).tobytes()
    assert row["models"] == [{"role": "annotator", "name": "fake-annotator", "revision": ""}]


class FakeModel:
    def __init__(self, name):
        self.name, self.revision = name, "rev-" + name


def test_optional_models_load_on_first_use_and_rows_name_the_models_used(tmp_path, monkeypatch):
    import pairforge.models.factory as factory

    loaded = []
    monkeypatch.setattr(factory, "load_model",
                        lambda spec, role: loaded.append(role) or FakeModel(str(spec)))
    s = run(tmp_path / "a", recipe="lazy", limit=8)
    assert loaded == ["policy"]  # the optional editor was never asked for
    assert [m["role"] for m in s["models_configured"]] == ["policy", "editor"]
    assert load_build(tmp_path / "a")[0]["models"] == [
        {"role": "policy", "name": "tiny-vlm", "revision": "rev-tiny-vlm"}]
    loaded.clear()
    run(tmp_path / "b", recipe="lazy", limit=8, params={"use_editor": True},
        models={"editor": "hf:some/editor@v2"})
    assert loaded == ["policy", "editor"]
    assert load_build(tmp_path / "b")[0]["models"][1] == {
        "role": "editor", "name": "hf:some/editor@v2", "revision": "rev-hf:some/editor@v2"}


def test_invalid_rows_reject_their_example(tmp_path):
    s = run(tmp_path / "b", recipe="invalid", limit=9)
    rejects = rejects_of(tmp_path / "b")
    assert [r["stage"] for r in rejects] == ["row"] * 3
    assert "field 'rejected': empty response text" in rejects[0]["reason"]
    assert s["counts"]["examples_with_pairs"] == 6


def test_recipe_contract_violations_stop_the_build(tmp_path):
    with pytest.raises(PairforgeError, match="returned 7 outcomes for 8 examples"):
        run(tmp_path / "a", recipe="short")
    with pytest.raises(PairforgeError, match=r"wrote column 'm3p_score'.*groups"):
        run(tmp_path / "b", recipe="undeclared")


def test_model_roles_are_checked_before_loading(tmp_path):
    with pytest.raises(PairforgeError, match="recipe judged needs a judge model; pass --judge"):
        run(tmp_path / "a", recipe="judged")
    with pytest.raises(PairforgeError, match="recipe echo uses no policy model.*drop --policy"):
        run(tmp_path / "b", models={"policy": "tiny-vlm"})


def test_batch_size_above_chunk_size_is_capped_with_a_note(tmp_path):
    Echo.batches.clear()
    console = Console(file=io.StringIO(), width=200)
    build(BuildConfig(recipe="echo", source="shapes?n=10", out=tmp_path / "b", chunk_size=4,
                      batch_size=9), console=console, progress=False)
    assert Echo.batches == [4, 4, 2]
    assert "batch size 9 capped at the chunk size 4" in console.file.getvalue()


def test_out_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(PairforgeError, match="holds files pairforge did not write"):
        run(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]  # no lock left
    run(tmp_path / "b", overwrite=True)  # --overwrite builds beside them, never removes them
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_empty_source_builds_an_empty_dataset(tmp_path):
    s = run(tmp_path / "b", limit=0)
    assert s["counts"]["examples_in"] == 0 and len(load_build(tmp_path / "b")) == 0


def test_config_yaml_with_cli_overrides(tmp_path):
    cfg_file = tmp_path / "build.yaml"
    cfg_file.write_text("recipe: echo\nsource: shapes?n=5\nbatch-size: 4\nseed: 2\n"
                        "policy: tiny-vlm\nshard: 1/3\nparams:\n  reject_task: size\n  sleep: 0\n")
    cfg = load_config(cfg_file, out=tmp_path / "o", seed=7, batch_size=None,
                      params=parse_params(["reject_task=color", "alpha=0.5", "flag=true"]))
    assert (cfg.recipe, cfg.source, cfg.batch_size, cfg.seed) == ("echo", "shapes?n=5", 4, 7)
    assert cfg.models == {"policy": "tiny-vlm"} and cfg.shard == (1, 3)
    assert cfg.params == {"reject_task": "color", "sleep": 0, "alpha": 0.5, "flag": True}
    cfg_file.write_text("recipe: echo\nbatchsize: 4\n")
    with pytest.raises(PairforgeError, match=r"build.yaml: unknown key 'batchsize'"):
        load_config(cfg_file, out=tmp_path / "o")
    with pytest.raises(PairforgeError, match=r"--shard 3/3: expected I/N"):
        load_config(None, recipe="echo", out=tmp_path / "o", shard="3/3")
    with pytest.raises(PairforgeError, match="--param 'alpha': expected key=value"):
        parse_params(["alpha"])
    with pytest.raises(PairforgeError, match="no recipe"):
        load_config(None, out=tmp_path / "o")


def test_cli_build_and_merge(tmp_path):
    runner = CliRunner()
    for i in range(2):
        res = runner.invoke(app, ["build", "echo", "--source", "shapes?n=10", "--out",
                                  str(tmp_path / f"s{i}"), "--shard", f"{i}/2", "--chunk-size", "4",
                                  "--param", "reject_task=size", "--quiet"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["counts"]["examples_in"] == 10
    assert s["settings"]["params"] == {"reject_task": "size", "sleep": 0.0}
    assert sum(len(pq.read_table(p)) for p in (tmp_path / "m" / "data").glob("*.parquet")) == \
        s["counts"]["pairs"] == len(load_build(tmp_path / "m"))
    # the two shard builds, then the merge
    assert len(s["commands"]) == 3 and all(c.startswith("pairforge ") for c in s["commands"])


def test_file_source_read_rejects_and_original_image_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 12), (10, 200, 30)).save(buf, format="JPEG", quality=70)
    (src / "a.jpg").write_bytes(buf.getvalue())
    (src / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    recs = [{"id": f"r{i}", "image": img, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "It is green."}]}
        for i, img in enumerate(["a.jpg", "bad.jpg", "a.jpg", "gone.jpg"])]
    (src / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = run(tmp_path / "b", source=str(src / "d.jsonl"))
    assert s["counts"] == {"source_examples": 4, "other_shards": 0, "examples_in": 4,
                           "examples_with_pairs": 2, "rejected": 2, "pairs": 2}
    rejects = rejects_of(tmp_path / "b")
    assert [(r["id"], r["stage"]) for r in rejects] == [("r1", "read"), ("r3", "read")]
    assert "bad.jpg cannot be decoded" in rejects[0]["reason"]
    assert s["rejects_by_stage"]["read"]["n"] == 2
    raw = load_build(tmp_path / "b").cast_column("images", List(Image(decode=False)))
    assert raw[0]["images"][0]["bytes"] == (src / "a.jpg").read_bytes()  # not re-encoded
    assert raw[0]["source_dataset"] == "d" and raw[0]["source_id"] == "r0"


def test_run_pass_fits_the_margin_window_on_the_whole_run_and_resumes(tmp_path):
    """P2-DPO's margin window (App. D) as pass two: fitted once on every committed margin (the
    central 95 %), the rows outside dropped, an example left without rows rejected; counts,
    rejects, dataset and stats agree; a rerun is complete; a merge of shards refits globally."""
    import numpy as np

    from pairforge.recipes.p2dpo import central_interval
    from test_build_fakes import fake_margin

    s = run(tmp_path / "b", recipe="windowed", source="shapes?n=40", chunk_size=8)
    ids = [f"shapes-train-0-{i:07d}" for i in range(40)]
    margins = {(i, k): fake_margin(i, k) for i in ids for k in ("focus", "robust")}
    lo, hi = central_interval(list(margins.values()), 0.95)
    assert (s["margin_window_lo"], s["margin_window_hi"]) == (pytest.approx(lo), pytest.approx(hi))
    inside = {key for key, m in margins.items() if lo <= m <= hi}
    assert s["margin_kept_rate"] == pytest.approx(len(inside) / 80) and 0 < 80 - len(inside) <= 6
    rows = rows_of(tmp_path / "b")
    assert {(r["p2dpo_example"], r["p2dpo_kind"]) for r in rows} == inside
    c = s["counts"]
    gone = [i for i in ids if not any((i, k) in inside for k in ("focus", "robust"))]
    assert c["pairs"] == len(rows) == len(inside)
    assert c["rejected"] == len(gone) and c["examples_with_pairs"] + c["rejected"] == c["examples_in"] == 40
    rejects = rejects_of(tmp_path / "b")
    assert sorted(r["id"] for r in rejects) == sorted(gone)
    assert all(r["stage"] == "filter" and "outside" in r["reason"] for r in rejects)
    kept = Counter(k for _, k in inside)
    assert s["recipe_stats"]["focus_kept"] == kept["focus"] and s["recipe_stats"]["robust_kept"] == kept["robust"]
    assert s["recipe_stats"].get("focus_dropped_margin", 0) + s["recipe_stats"].get("robust_dropped_margin", 0) \
        == 80 - len(inside)
    assert s["steps"]["run_pass"] == {"in": 40, "forwarded": 40 - len(gone), "dropped": len(gone)}
    again = run(tmp_path / "b", recipe="windowed", source="shapes?n=40", chunk_size=8)
    assert again["margin_window_lo"] == s["margin_window_lo"] and again["counts"] == c
    # the fixed window of the paper's data instead
    f = run(tmp_path / "f", recipe="windowed", source="shapes?n=40", params={"margin_window": "fixed"})
    assert (f["margin_window_lo"], f["margin_window_hi"]) == (-0.174, 0.208)
    assert f["margin_kept_rate"] == pytest.approx(np.mean([-0.174 <= m <= 0.208 for m in margins.values()]))
    # shards fit their own windows; the merge refits on all rows: the unsharded build's window
    quiet = Console(file=io.StringIO())
    for i in range(2):
        run(tmp_path / f"s{i}", recipe="windowed", source="shapes?n=40", shard=(i, 2))
    m = merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", console=quiet)
    assert (m["margin_window_lo"], m["margin_window_hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert m["counts"]["pairs"] == c["pairs"] and m["counts"]["rejected"] == c["rejected"]


def test_old_import_path_still_works():
    """The engine moved from ``pairforge/build/`` to ``pairforge/engine/`` (issue 17 item 21);
    ``from pairforge.build import load_build`` stays a working alias for users' scripts."""
    import pairforge.build as old
    import pairforge.engine as new

    for name in old.__all__:
        assert getattr(old, name) is getattr(new, name)
