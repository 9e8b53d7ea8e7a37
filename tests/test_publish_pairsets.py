"""``scripts/publish_pairsets.py`` at tiny sizes: each recipe's world preset builds through the
engine and stages its Hub repo with ``--dry-run`` (read back with ``datasets.load_dataset``);
the full presets differ from the world ones only in source, models, parameters and size.

The model-based recipes use the shipped tiny VLM / CLIP, else the trained candidates in
/tmp/tw/run1 (same architecture), else they skip. One thread; about 30 s in all.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from conftest import script_module

pytest.importorskip("torch")  # imported here, so tests/conftest.py gives this module one thread

from pairforge.errors import PairforgeError  # noqa: E402

CANDIDATES = {"policy": Path("/tmp/tw/run1/tiny-llava"), "clip": Path("/tmp/tw/run1/tiny-clip")}
#: Small sampling settings for the tiny runs (the recipes' code path is the same).
TINY_PARAMS = {"m3po": ["n=2", "max_new_tokens=24"], "cwdpo": ["k=2", "max_new_tokens=24"],
               "p2dpo": ["max_new_tokens=24"]}
#: Config names the publisher splits a recipe's rows into (one "default" otherwise).
CONFIGS = {"p2dpo": {"focus", "robust"}, "cwdpo": {"stage1", "stage2"}}


@pytest.fixture(scope="module")
def script():
    with script_module("publish_pairsets") as module:
        yield module


@pytest.fixture(scope="module")
def world_models() -> list[str]:
    """``--policy/--clip`` options: none when the tiny models are shipped, else the trained
    candidates; skips when neither exists."""
    from pairforge.world.models import TINY_CLIP_PATH, TINY_VLM_PATH

    if (TINY_VLM_PATH / "config.json").is_file() and (TINY_CLIP_PATH / "config.json").is_file():
        return []
    if not all((p / "config.json").is_file() for p in CANDIDATES.values()):
        pytest.skip("no tiny VLM / CLIP: neither shipped in pairforge/world/assets nor in /tmp/tw/run1")
    return ["--policy", f"hf:{CANDIDATES['policy']}", "--clip", f"clip:{CANDIDATES['clip']}"]


def _main(script, argv: list[str]) -> dict:
    from rich.console import Console

    p = script.plan(argv)
    return script.run(p, command="test", console=Console(file=io.StringIO()), progress=False)


def _staged(summary: dict) -> dict:
    """Config name → the staged rows, loaded as a Hub user loads them."""
    from datasets import get_dataset_config_names, load_dataset

    staging = summary["staging"]
    return {c: load_dataset(staging, c, split="train") for c in get_dataset_config_names(staging)}


def test_vapr_world_builds_stages_and_resumes(script, tmp_path):
    argv = ["vapr", "--n", "12", "--root", str(tmp_path), "--dry-run"]
    summary = _main(script, argv)
    assert summary["pushed"] is None and summary["counts"]["examples_in"] == 12
    staged = _staged(summary)
    assert list(staged) == ["default"]
    rows = staged["default"]
    assert len(rows) == summary["counts"]["pairs"] > 0
    assert set(rows["recipe"]) == {"vapr"} and set(rows["editor"]) == {"rule"}
    # the rule editor made every edit: no LLM is named (nor loaded) for it
    assert {m["name"] for ms in rows["models"] for m in ms} == {"vapr-rules"}
    assert "pretty_name: vapr-shapes" in (Path(summary["staging"]) / "README.md").read_text()
    manifest = json.loads((tmp_path / "vapr-shapes" / "manifest.json").read_text())
    assert manifest["settings"]["source"]["spec"].startswith("shapes:train?n=12&")
    # the same command again: the build is complete, nothing is rebuilt, the set is the same
    again = _main(script, argv)
    assert again["run_identity"] == summary["run_identity"]
    assert len(_staged(again)["default"]) == len(rows)
    # two shards: built apart, not published; merged, they hold the same pairs
    from rich.console import Console

    from pairforge.engine import load_build, merge

    shards = [_main(script, [*argv, "--shard", f"{i}/2"]) for i in range(2)]
    assert all(s["staging"] is None for s in shards)
    folders = [tmp_path / f"vapr-shapes-shard{i}of2" for i in range(2)]
    merge(folders, tmp_path / "merged", console=Console(file=io.StringIO()))
    assert sorted(load_build(tmp_path / "merged")["id"]) == sorted(rows["id"])


@pytest.mark.parametrize("recipe", ["m3po", "cwdpo", "p2dpo"])
def test_model_recipes_world_build_and_stage(recipe, script, world_models, tmp_path):
    params = [x for kv in TINY_PARAMS[recipe] for x in ("--param", kv)]
    summary = _main(script, [recipe, "--n", "8", "--root", str(tmp_path), "--dry-run",
                             *world_models, *params])
    staged = _staged(summary)
    assert set(staged) <= CONFIGS.get(recipe, {"default"})
    assert sum(len(ds) for ds in staged.values()) == summary["counts"]["pairs"] > 0
    for ds in staged.values():
        assert set(ds["recipe"]) == {recipe}
        assert {m["role"] for ms in ds["models"] for m in ms} >= {"policy"}


def test_aspo_world_annotates_the_vapr_world_set(script, world_models, tmp_path):
    """ASPO's source is the VaPR set: the engine reads the built pairs as examples."""
    _main(script, ["vapr", "--n", "8", "--root", str(tmp_path), "--dry-run"])
    summary = _main(script, ["aspo", "--root", str(tmp_path), "--dry-run", *world_models])
    rows = _staged(summary)["default"]
    assert len(rows) == summary["counts"]["pairs"] > 0
    assert all(len(s) == len(w) for s, w in zip(rows["sentence_spans"], rows["sentence_weights"]))


def test_full_presets_change_only_source_models_params_and_size(script, tmp_path):
    from pairforge.models.spec import parse_model_spec

    root = ["--root", str(tmp_path)]
    for recipe in ("vapr", "m3po", "p2dpo", "cwdpo", "aspo"):
        world = script.plan([recipe, *root])
        full = script.plan([recipe, "--preset", "full", "--source", "/data/llava/mix665k.json",
                            *root])
        a, b = dataclasses.asdict(world.config), dataclasses.asdict(full.config)
        differ = {k for k in a if a[k] != b[k]}
        assert differ <= {"source", "models", "params", "limit", "out", "batch_size"}, recipe
        assert full.config.out.parent == world.config.out.parent == tmp_path
        assert world.config.limit is None or recipe == "aspo"  # the world's size is in its spec
        assert full.config.limit == script.PRESETS[(recipe, "full")].n
        for spec in full.config.models.values():  # real models, each a valid spec
            assert parse_model_spec(spec).backend != "embedded", (recipe, spec)
        assert all(parse_model_spec(s).backend == "embedded" for s in world.config.models.values())
    with pytest.raises(PairforgeError, match="--source"):
        script.plan(["m3po", "--preset", "full", *root])
    sized = script.plan(["vapr", "--n", "40", *root, "--param", "max_lev_norm=0.3"])
    assert sized.config.source == "shapes:train?n=40"
    assert sized.config.params == {"editor": "rule", "max_lev_norm": 0.3}
