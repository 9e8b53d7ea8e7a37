"""`pairforge publish` offline: repo layout, load_dataset check, the card's YAML and body, and
the one-commit push with HfApi's network methods replaced by recorders (the token is set to a
fake value and must appear in no output, file or log).

Build dirs are made by the real engine (`pairforge.engine.build`: VaPR with the rule editor on
the offline world, a P2-DPO build with a random tiny LLaVA); hand-made rows stand only for sets
that are not build dirs (a `save_to_disk` folder, a parquet file)."""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import httpx2
import numpy as np
import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from rich.console import Console

from pairforge import __version__, cli
from pairforge.engine import build, load_build, load_config, merge
from pairforge.engine.manifest import Manifest
from pairforge.diagnostics.lengths import length_unit
from pairforge.diagnostics.text import pair_metrics
from pairforge.errors import PairforgeError
from pairforge.publish import open_pairset, publish
from pairforge.publish.card import card_data, size_category
from pairforge.publish.hub import stage, staged_files
from pairforge.publish.layout import arrow_nbytes, shard_count
from pairforge.publish.pairset import split_configs
from pairforge.resources import read_prompt
from pairforge.schema import make_pair, response_text, template_hash, to_dataset

FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789abcdefXYZ"


def image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))


def pixels(value) -> np.ndarray:
    """Pixels of a PIL image or of an image struct / bytes."""
    if isinstance(value, dict):
        value = value["bytes"]
    if isinstance(value, bytes):
        value = Image.open(io.BytesIO(value))
    return np.asarray(value.convert("RGB"))


def p2dpo_rows() -> list[dict]:
    rows = []
    for i in range(7):
        kind = "focus" if i % 3 else "robust"
        extra = ({"crop_image": image(100 + i), "degraded_image": image(200 + i)}
                 if kind == "focus" else {"noisy_image": image(300 + i)})
        rows.append(make_pair(
            prompt=f"How many shapes are in scene {i}?", chosen=f"There are {i + 2} shapes.",
            rejected=f"There are {i + 3} shapes.", images=[image(i)], recipe="p2dpo",
            source_dataset="shapes", seed=1, p2dpo_kind=kind, crop_box=[1.0, 2.0, 8.0, 9.0],
            ddw_focus=0.5, ddw_robust=1.5, **extra))
    return rows


VAPR_COMMAND = ("pairforge build vapr --source 'shapes:train?n=24' --out vapr-build --seed 7 "
                "--param penalty_top_k=2")


def engine_build(out: Path, *, recipe: str = "vapr", source: str = "shapes:train?n=24",
                 seed: int = 7, command: str = "", **cfg) -> Path:
    """A finished build dir made by the engine, quietly."""
    build(load_config(recipe=recipe, source=source, out=out, seed=seed, **cfg), command=command,
          progress=False, console=Console(file=io.StringIO()))
    return out


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def vapr_build(tmp_path_factory) -> Path:
    """VaPR (rule editor) on 24 world examples: 18 pairs, 6 rejects at two stages."""
    out = engine_build(tmp_path_factory.mktemp("vapr") / "vapr-build", command=VAPR_COMMAND,
                       params={"penalty_top_k": 2})
    assert summary_of(out)["counts"]["rejected"] > 0  # the card's rejects table has rows
    return out


@pytest.fixture(scope="module")
def vapr_staged(vapr_build, tmp_path_factory):
    """The vapr build staged with a small shard limit (so it needs several shards)."""
    folder = tmp_path_factory.mktemp("stage") / "hub"
    pset = open_pairset(vapr_build)
    staged = stage(pset, folder, repo_id="me/vapr-shapes",
                   max_shard_bytes=arrow_nbytes(pset.dataset) // 3, progress=False)
    return folder, staged, pset


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table under ``header`` (a header line of the card)."""
    lines = text.split(header + "\n", 1)[1].splitlines()[1:]  # skip the |---| line
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


# ----------------------------------------------------------------------------- pure bits


def test_size_category_boundaries():
    assert size_category(0) == "n<1K"
    assert size_category(999) == "n<1K"
    assert size_category(1000) == "1K<n<10K"
    assert size_category(99_999) == "10K<n<100K"
    assert size_category(2_500_000) == "1M<n<10M"
    assert size_category(10**13) == "n>1T"


def test_shard_count():
    assert shard_count(0, 10, 100) == 1
    assert shard_count(250, 10, 100) == 3
    assert shard_count(10**6, 4, 100) == 4  # never more shards than rows


# ----------------------------------------------------------------------------- layout


def test_layout_loads_back_with_every_row(vapr_build, vapr_staged):
    folder, staged, pset = vapr_staged
    (cf,) = staged
    n_shards = len(cf.files)
    assert n_shards == shard_count(arrow_nbytes(pset.dataset), len(pset.dataset),
                                   arrow_nbytes(pset.dataset) // 3) > 1
    assert staged_files(folder) == sorted(
        ["README.md", "images/len_gap.png", "images/lev_norm.png"]
        + [f"data/train-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)])
    loaded = load_dataset(str(folder), split="train", cache_dir=str(folder.parent / "cache"))
    assert loaded.features == pset.dataset.features
    original = load_build(vapr_build)  # the engine's own reading of its build
    assert len(loaded) == len(original) == summary_of(vapr_build)["counts"]["pairs"]
    for got, want in zip(loaded, original):
        assert got["id"] == want["id"]
        assert got["prompt"] == want["prompt"] and got["chosen"] == want["chosen"]
        assert got["rejected"] == want["rejected"] and got["models"] == want["models"]
        assert got["edit_replacement"] == want["edit_replacement"]
        assert got["lev_words"] == want["lev_words"]
        assert np.array_equal(pixels(got["images"][0]), pixels(want["images"][0]))


def test_card_yaml_round_trips_and_matches_the_files(vapr_build, vapr_staged):
    folder, staged, pset = vapr_staged
    text = (folder / "README.md").read_text()
    data = DatasetCard(text).data.to_dict()
    # what huggingface_hub parses from the file is exactly the metadata that was rendered
    assert data == card_data(pset, staged, pset.dataset.features,
                             repo_id="me/vapr-shapes", language=["en"]).to_dict()
    assert data["license"] == "apache-2.0"
    assert data["language"] == ["en"]  # detected from the answers
    assert data["task_categories"] == ["image-text-to-text"]
    assert {"dpo", "vapr", "synthetic"} <= set(data["tags"])
    assert data["size_categories"] == ["n<1K"]
    assert data["source_datasets"] == ["shapes:train"]
    (config,) = data["configs"]
    assert config["config_name"] == "default"
    (entry,) = config["data_files"]
    files = staged_files(folder)
    matched = [f for f in files if fnmatch.fnmatch(f, entry["path"])]
    assert entry["split"] == "train" and matched == staged[0].files
    info = data["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": staged[0].num_bytes,
                               "num_examples": summary_of(vapr_build)["counts"]["pairs"]}]
    assert info["download_size"] == sum((folder / f).stat().st_size for f in matched)
    assert [f["name"] for f in info["features"]][:5] == ["id", "prompt", "chosen", "rejected",
                                                         "images"]


def test_card_body_has_diagnostics_provenance_rejects_and_snippets(vapr_build, vapr_staged):
    folder, _, _ = vapr_staged
    text = (folder / "README.md").read_text()
    manifest, summary = Manifest.load(vapr_build).data, summary_of(vapr_build)
    rows = load_build(vapr_build)
    m = pair_metrics([response_text(r) for r in rows["chosen"]],
                     [response_text(r) for r in rows["rejected"]], length_unit("gpt2"))
    # diagnostics computed independently from the same rows
    assert f"| edits (median) | {np.median(m['lev_words']):.1f} |" in text
    assert f"| share changed (median) | {np.median(m['lev_norm']):.2f} |" in text
    assert "| edit unit | words |" in text
    longer = np.mean((m["len_chosen"] > m["len_rejected"])
                     + 0.5 * (m["len_chosen"] == m["len_rejected"]))
    assert f"| 'longer is chosen' accuracy | {longer:.1%} |" in text
    # the card's flags are those of the build's own audit (summary.json) of the same rows
    flags = re.findall(r"^- \*\*vapr-build\*\* `(\w+)`", text, flags=re.MULTILINE)
    assert flags == [f["id"] for f in summary["diagnostics"]["flags"]]
    # "its near-duplicate flag is expected" only when that flag was raised
    assert ("near-duplicate flag is" in text) == ("near_duplicates" in flags)
    assert "VaPR replacement values:" in text and "## Bias, Risks, and Limitations" in text
    assert ("No flags" in text) == (not flags)
    assert "![" in text and "(images/lev_norm.png)" in text and "(images/len_gap.png)" in text
    # provenance: the models that made the rows, with revisions; the configured LLM editor
    # that the rule editor never needed is named apart; params, seed, source, command, run id
    used = {(x["role"], x["name"], x["revision"]) for ms in rows["models"] for x in ms}
    assert used == {("editor", "vapr-rules", manifest["settings"]["params"]["rules_sha256"][:16])}
    assert table_rows(text, "| model role | name | revision |") == [
        [role, f"`{name}`", rev] for role, name, rev in sorted(used)]
    (configured,) = manifest["models"]
    assert (f"Configured for the build but used for no pair: editor `{configured['name']}` "
            f"({configured['revision']})") in text
    assert "| editor | `vapr-rules` |" in text
    assert "| `penalty_top_k` | `2` |" in text and '| `rules` | `""` |' in text
    assert "| seed | 7 |" in text
    assert f"| source | `{manifest['source']}` |" in text
    assert manifest["source"].startswith("shapes:train?n=24&seed=0")
    assert f"| pairforge version | {__version__} |" in text
    assert f"| run identity | `{manifest['identity']}` |" in text
    assert f"```bash\n{VAPR_COMMAND}\n```" in text
    assert "Prompt templates" not in text  # the rule editor sends no prompt
    # rejects by stage and reason kind, reconciled with summary.json
    counts = summary["counts"]
    assert f"{counts['rejected']} source example(s) yielded no pair" in text
    rejects = table_rows(text, "| stage | reason | examples |")
    assert sum(int(n) for _, _, n in rejects) == counts["rejected"]
    by_stage = Counter()
    for stage_, _, n in rejects:
        by_stage[stage_] += int(n)
    assert by_stage == {k: v["n"] for k, v in summary["rejects_by_stage"].items()}
    # the summary counts reasons by kind (numbers masked as N); the card puts the numbers back
    # (or their ranges), never a bare N
    as_kind = Counter()
    for stage_, reason, n in rejects:
        assert not re.search(r"\bN\b", reason), reason
        as_kind[(stage_, re.sub(r"\d[\d,.]*(–\d[\d,.]*)?", "N", reason))] += int(n)
    for stage_, v in summary["rejects_by_stage"].items():
        for reason, n in v["reasons"].items():
            assert as_kind[(stage_, reason.replace("|", "\\|"))] == n
    built = dict(table_rows(text, "| count | value |"))
    assert built["examples_in"] == str(counts["examples_in"]) == "24"
    assert built["pairs"] == str(counts["pairs"]) and built["rejected"] == str(counts["rejected"])
    assert counts["examples_in"] == counts["examples_with_pairs"] + counts["rejected"]
    step = summary["steps"]["recipe"]
    assert built["step recipe: in → forwarded (dropped)"] == \
        f"{step['in']} → {step['forwarded']} ({step['dropped']})"
    # recipe text, citation, load snippets
    assert "2510.01700" in text and "minimal edit" in text
    assert 'load_dataset("me/vapr-shapes", split="train")' in text
    assert "DPOTrainer(" in text and "processing_class=processor" in text


def test_p2dpo_build_publishes_one_config_per_kind_with_its_templates(tmp_path):
    """A real P2-DPO build (random tiny LLaVA): focus / robust configs load by name, and the
    card lists the prompt templates the build sent, with the sha256 of their text."""
    from pairforge.models.random_tiny import save_random_llava

    llava = save_random_llava(tmp_path / "llava")
    out = engine_build(tmp_path / "p2", recipe="p2dpo", source="shapes:train?n=6",
                       policy=f"hf:{llava}", command="pairforge build p2dpo ...",
                       params={"max_ppl": 1e9, "margin_low": None, "margin_high": None,
                               "max_new_tokens": 6})
    result = publish(out, "me/p2", dry_run=True, console=Console(file=io.StringIO()))
    assert result.staging == out / "hub"
    original = load_build(out)
    kinds = Counter(original["p2dpo_kind"])
    assert result.rows == {k: kinds[k] for k in ("focus", "robust") if kinds[k]}
    assert sum(result.rows.values()) == summary_of(out)["counts"]["pairs"] > 0
    for config, n in result.rows.items():
        ds = load_dataset(str(result.staging), name=config, split="train",
                          cache_dir=str(tmp_path / "cache"))
        assert len(ds) == n and set(ds["p2dpo_kind"]) == {config}
    text = (result.staging / "README.md").read_text()
    templates = Manifest.load(out)["prompt_templates"]
    assert {t["name"] for t in templates} == {"p2dpo/localise.txt",
                                              "p2dpo/enhance_two_images.txt"}
    for t in templates:  # the hash is that of the shipped template's text (P2-DPO strips it)
        assert t["sha256"] == template_hash(read_prompt(*t["name"].split("/")).strip())
        assert f"| {t['name']} | `{t['sha256']}` |" in text
    assert "| policy | `hf:<local>/llava` |" in text and str(tmp_path) not in text  # issue 14


def test_p2dpo_rows_saved_to_disk_load_by_config_name(tmp_path):
    """Not a build dir: canonical rows saved with save_to_disk, recipe taken from the rows."""
    saved = tmp_path / "p2"
    to_dataset(p2dpo_rows()).save_to_disk(str(saved))
    result = publish(saved, "me/p2", dry_run=True, staging=tmp_path / "hub")
    folder = result.staging
    assert result.rows == {"focus": 4, "robust": 3}
    data = DatasetCard((folder / "README.md").read_text()).data.to_dict()
    assert [(c["config_name"], c["data_files"][0]["path"]) for c in data["configs"]] == [
        ("focus", "data/focus/train-*"), ("robust", "data/robust/train-*")]
    assert {i["config_name"]: i["splits"][0]["num_examples"] for i in data["dataset_info"]} == \
        {"focus": 4, "robust": 3}
    rows = {r["id"]: r for r in p2dpo_rows()}
    for config, n in result.rows.items():
        ds = load_dataset(str(folder), name=config, split="train",
                          cache_dir=str(tmp_path / "cache"))
        assert len(ds) == n and set(ds["p2dpo_kind"]) == {config}
        for got in ds:
            want = rows[got["id"]]
            key = "crop_image" if config == "focus" else "noisy_image"
            assert np.array_equal(pixels(got[key]), pixels(want[key]))
    text = (folder / "README.md").read_text()
    assert "| metric | focus | robust | meaning |" in text
    assert 'load_dataset("me/p2", "focus", split="train")' in text
    assert "images/compare.png" in text
    assert "Rejected examples" not in text  # no build, no rejects


def test_merged_shards_publish_with_every_command(tmp_path):
    shards = [engine_build(tmp_path / f"s{i}", source="shapes:train?n=12", shard=f"{i}/2",
                           command=f"pairforge build vapr --shard {i}/2") for i in range(2)]
    merge(shards, tmp_path / "merged", command="pairforge merge s0 s1",
          console=Console(file=io.StringIO()))
    result = publish(tmp_path / "merged", "me/merged", dry_run=True,
                     console=Console(file=io.StringIO()))
    text = (result.staging / "README.md").read_text()
    assert ("```bash\npairforge build vapr --shard 0/2\npairforge build vapr --shard 1/2\n"
            "pairforge merge s0 s1\n```") in text
    assert "| merged from | 2 shard builds |" in text and "| shard |" not in text
    counts = summary_of(tmp_path / "merged")["counts"]
    assert sum(result.rows.values()) == counts["pairs"]
    assert counts["examples_in"] == 12
    assert f"{counts['rejected']} source example(s) yielded no pair" in text


def test_cwdpo_stages_become_configs_and_bad_kinds_are_named():
    rows = [make_pair(prompt=f"q{i}", chosen=f"right {i}", rejected=f"wrong {i}", recipe="cwdpo",
                      rejected_mean_logp=-1.0, rejected_n_tokens=3, cwdpo_stage=stage)
            for i, stage in enumerate([1, 2, 2, 1, 2])]
    configs = split_configs(to_dataset(rows), "cwdpo", "set")
    assert {k: list(v["id"]) for k, v in configs.items()} == {
        "stage1": [rows[0]["id"], rows[3]["id"]],
        "stage2": [rows[1]["id"], rows[2]["id"], rows[4]["id"]]}
    bad = p2dpo_rows()
    bad[2]["p2dpo_kind"] = None
    with pytest.raises(PairforgeError, match="set: row 2 field 'p2dpo_kind' is None"):
        split_configs(to_dataset(bad), "p2dpo", "set")

def test_plain_parquet_gets_the_audit_card(tmp_path):
    rows = [make_pair(prompt=f"Describe image {i}.", chosen="A long and detailed description "
                      f"of the picture with many words {i}.", rejected="Short.",
                      images=[image(i)], source_dataset="RLAIF-V") for i in range(12)]
    path = tmp_path / "rlaifv.parquet"
    to_dataset(rows).to_parquet(str(path))
    result = publish(path, "me/rlaifv-audited", dry_run=True)
    assert result.staging == tmp_path / "rlaifv.hub"
    text = (result.staging / "README.md").read_text()
    data = DatasetCard(text).data.to_dict()
    assert data["license"] == "other"
    assert "audit" in data["tags"] and "synthetic" not in data["tags"]
    assert "pairforge did not make these pairs" in text
    assert "length_shortcut" in text  # chosen is always longer: the audit flags it
    assert "Rejected examples" not in text and "## Provenance" in text
    # the Hub template's sections, filled from what was measured on these rows
    for heading in ("## Uses", "### Direct use", "### Out-of-scope use",
                    "## Bias, Risks, and Limitations"):
        assert heading in text
    risks = text.split("## Bias, Risks, and Limitations")[1].split("\n## ")[0]
    assert "the chosen one in 100% of 12 pairs (95% CI 76%–100%): a length shortcut" in risks
    assert "pairforge did not make these pairs" in risks and "license" in text
    assert data["language"] == ["en"]
    # too few pairs for a flag: said so, not flagged
    to_dataset(rows[:3]).to_parquet(str(tmp_path / "few.parquet"))
    few = publish(tmp_path / "few.parquet", "me/few", dry_run=True)
    few_text = (few.staging / "README.md").read_text()
    assert "length_shortcut`:" not in few_text and "too few to tell" in few_text


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(PairforgeError, match="no such file"):
        open_pairset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairforgeError, match="not a build dir"):
        open_pairset(tmp_path / "empty")
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}).to_parquet(
        str(tmp_path / "trl.parquet"))
    with pytest.raises(PairforgeError, match="missing columns id, images"):
        open_pairset(tmp_path / "trl.parquet")
    with pytest.raises(PairforgeError, match="ORG/NAME"):
        publish(tmp_path / "trl.parquet", "no-slash", dry_run=True)


def test_unfinished_changed_or_foreign_build_dirs_are_one_line_errors(vapr_build, tmp_path):
    unfinished = shutil.copytree(vapr_build, tmp_path / "unfinished")
    m = Manifest.load(unfinished)
    m.data["complete"] = False  # as a build killed before it finished
    m.save()
    with pytest.raises(PairforgeError, match="the build is not finished .* rerun its "
                                             "`pairforge build` command"):
        open_pairset(unfinished)

    changed = shutil.copytree(vapr_build, tmp_path / "changed")
    lines = (changed / "rejects.jsonl").read_text().splitlines(keepends=True)
    (changed / "rejects.jsonl").write_text("".join(lines[1:]))
    n = summary_of(changed)["counts"]["rejected"]
    with pytest.raises(PairforgeError, match=rf"rejects.jsonl holds {n - 1} records, "
                                             rf"summary.json counts {n} rejected"):
        open_pairset(changed)
    # as many records as counted, but not of the stages counted
    (changed / "rejects.jsonl").write_text("".join(
        line.replace('"stage": "filter"', '"stage": "read"') for line in lines))
    with pytest.raises(PairforgeError, match="holds 0 rejects of stage 'filter', summary.json "
                                             "counts 2"):
        open_pairset(changed)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"run_id": "x", "recipe": "vapr"}))
    with pytest.raises(PairforgeError, match="not a pairforge build manifest"):
        open_pairset(foreign)


def test_staging_refuses_a_foreign_folder(vapr_build, tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "notes.txt").write_text("mine")
    with pytest.raises(PairforgeError, match="not a pairforge staging folder"):
        publish(vapr_build, "me/x", dry_run=True, staging=tmp_path / "hub")
    assert (tmp_path / "hub" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- push


class Recorder:
    """Stands in for HfApi's network methods; ``fail`` maps a method name to an exception."""

    def __init__(self, monkeypatch, fail: dict | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail or {}
        for name in ("whoami", "create_repo", "create_branch", "create_commit",
                     "upload_folder", "upload_file", "preupload_lfs_files"):
            monkeypatch.setattr(HfApi, name, self._method(name))

    def _method(self, name):
        def method(api, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name in self.fail:
                raise self.fail[name]
            if name == "whoami":
                return {"name": "me"}
            if name == "create_commit":
                from huggingface_hub import CommitInfo

                return CommitInfo(commit_url="https://huggingface.co/datasets/me/x/commit/1",
                                  commit_message="m", commit_description="",
                                  oid="1" * 40, pr_url=None)
            return None
        return method

    def named(self, name: str) -> list:
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE off (the test suite runs with it on) and a fake token in HF_TOKEN."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)


def test_push_is_one_commit_of_the_staged_folder(vapr_build, tmp_path, online, monkeypatch,
                                                 capsys):
    rec = Recorder(monkeypatch)
    result = publish(vapr_build, "me/vapr-shapes", private=True, revision="pairs-v1",
                     create_pr=True, staging=tmp_path / "hub")
    assert [c[0] for c in rec.calls] == ["whoami", "create_repo", "create_branch",
                                         "create_commit"]
    (_, args, kwargs), = rec.named("create_commit")
    ops = args[1] if len(args) > 1 else kwargs["operations"]
    paths = sorted(op.path_in_repo for op in ops)
    assert paths == staged_files(tmp_path / "hub") == result.files
    assert "README.md" in paths and any(p.startswith("data/train-") for p in paths)
    for op in ops:
        assert Path(op.path_or_fileobj).read_bytes() == (tmp_path / "hub" /
                                                        op.path_in_repo).read_bytes()
    assert kwargs["repo_type"] == "dataset" and kwargs["revision"] == "pairs-v1"
    assert kwargs["create_pr"] is True
    (_, _, repo_kwargs), = rec.named("create_repo")
    assert repo_kwargs["private"] is True and repo_kwargs["exist_ok"] is True
    assert repo_kwargs["repo_type"] == "dataset"
    assert result.commit_url.endswith("/commit/1")
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err
    assert "one commit" in out.err


def _files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def _http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "https://huggingface.co/api/whoami-v2")
    return HfHubHTTPError("Invalid credentials", response=httpx2.Response(status,
                                                                          request=request))


@pytest.mark.parametrize("fail, expect", [
    ({"whoami": _http_error(401)}, "token was refused (401)"),
    ({"create_repo": _http_error(403)}, "may not write to me/vapr-shapes (403)"),
    ({"whoami": httpx2.ConnectError("[Errno -3] name resolution failed")},
     "cannot reach the Hugging Face Hub"),
    ({"create_commit": RuntimeError(f"upload failed, header Authorization: Bearer {FAKE_TOKEN}")},
     "the Hub refused 'commit'"),
])
def test_failures_are_one_line_and_never_show_the_token(vapr_build, tmp_path, online,
                                                        monkeypatch, capsys, caplog, fail,
                                                        expect):
    rec = Recorder(monkeypatch, fail)
    caplog.set_level(logging.DEBUG)
    staging = tmp_path / "hub"
    monkeypatch.setattr(sys, "argv", ["pairforge", "publish", str(vapr_build), "--repo-id",
                                      "me/vapr-shapes", "--staging", str(staging)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    out = capsys.readouterr()
    (line,) = out.err.strip().splitlines()[-1:]
    assert line.startswith("error: ") and expect in line and str(staging) in line
    assert FAKE_TOKEN not in out.out + out.err + caplog.text
    assert not _files_containing(tmp_path, FAKE_TOKEN)
    assert not _files_containing(vapr_build, FAKE_TOKEN)
    assert (staging / "README.md").is_file()  # the staged folder is left for a later push
    assert len(rec.named("create_commit")) <= 1


def test_missing_token_is_a_one_line_error(vapr_build, tmp_path, online, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    rec = Recorder(monkeypatch)
    with pytest.raises(PairforgeError, match="no Hugging Face token: set HF_TOKEN"):
        publish(vapr_build, "me/x", staging=tmp_path / "hub")
    assert rec.calls == []


def test_offline_stops_before_any_hub_call(vapr_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    rec = Recorder(monkeypatch)
    with pytest.raises(PairforgeError, match="HF_HUB_OFFLINE is set, so nothing was pushed"):
        publish(vapr_build, "me/x", staging=tmp_path / "hub")
    assert rec.calls == []
    assert (tmp_path / "hub" / "README.md").is_file()


def test_dry_run_makes_no_hub_call(vapr_build, tmp_path, online, monkeypatch):
    rec = Recorder(monkeypatch)
    result = publish(vapr_build, "me/x", dry_run=True, staging=tmp_path / "hub")
    assert rec.calls == [] and result.commit_url is None
    assert "pretty_name: x" in (tmp_path / "hub" / "README.md").read_text()


def test_a_key_in_the_manifest_never_reaches_the_repo(tmp_path):
    command = f"pairforge build vapr --editor openai:gpt@https://x?key={FAKE_TOKEN}"
    build_dir = engine_build(tmp_path / "b", source="shapes:train?n=6", command=command)
    assert _files_containing(build_dir, FAKE_TOKEN)  # the manifest records the command
    result = publish(build_dir, "me/x", dry_run=True, console=Console(file=io.StringIO()))
    assert "--editor openai:gpt@https://x?key=[redacted]" in (result.staging /
                                                               "README.md").read_text()
    assert not _files_containing(result.staging, FAKE_TOKEN)
