"""`pairforge publish` offline: repo layout, load_dataset check, the card's YAML and body, and
the one-commit push with HfApi's network methods replaced by recorders (the token is set to a
fake value and must appear in no output, file or log)."""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import sys
from pathlib import Path

import httpx2
import numpy as np
import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from pairforge import cli
from pairforge.diagnostics.lengths import length_unit
from pairforge.diagnostics.text import pair_metrics
from pairforge.errors import PairforgeError
from pairforge.publish import open_pairset, publish
from pairforge.publish.card import card_data, size_category
from pairforge.publish.hub import stage, staged_files
from pairforge.publish.layout import arrow_nbytes, shard_count
from pairforge.publish.pairset import split_configs
from pairforge.schema import make_pair, response_text, to_dataset

FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789abcdefXYZ"
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


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


def vapr_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = COLOURS[i % 6], COLOURS[(i + 1) % 6]
        rows.append(make_pair(
            prompt=f"What colour is shape number {i}?",
            chosen=f"Shape number {i} in the picture is {a}.",
            rejected=f"Shape number {i} in the picture is {b}.",
            images=[image(i)], recipe="vapr", task="color", source_dataset="shapes",
            source_id=f"shapes-train-0-{i}",
            models=[{"role": "editor", "name": "rule", "revision": ""},
                    {"role": "policy", "name": "tiny-vlm", "revision": "3f2a"}],
            prompt_templates=[{"name": "edit", "sha256": "ab" * 32}], seed=7,
            edit_original=a, edit_replacement=b, editor="rule"))
    return rows


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


def make_build(folder: Path, rows: list[dict], recipe: str, *, rejects=()) -> Path:
    folder.mkdir(parents=True)
    to_dataset(rows).save_to_disk(str(folder / "dataset"))
    (folder / "manifest.json").write_text(json.dumps({
        "run_id": "run-1234", "recipe": recipe, "params": {"penalty_top_k": 3, "min_edit": 1},
        "seed": 7, "source": "shapes:train?n=14",
        "command": f"pairforge build {recipe} --out {folder.name} --seed 7",
        "pairforge_version": "0.1.0"}))
    (folder / "summary.json").write_text(json.dumps({"examples_in": len(rows) + len(rejects),
                                                     "rejected": len(rejects)}))
    with open(folder / "rejects.jsonl", "w") as f:
        for i, (stage_, reason) in enumerate(rejects):
            f.write(json.dumps({"id": f"r{i}", "source_id": str(i), "stage": stage_,
                                "reason": reason}) + "\n")
    return folder


@pytest.fixture(scope="module")
def vapr_build(tmp_path_factory) -> Path:
    rejects = [("filter", "multiple-choice question"), ("filter", "multiple-choice question"),
               ("validate", "edit did not flip the answer")]
    return make_build(tmp_path_factory.mktemp("vapr") / "vapr-build", vapr_rows(), "vapr",
                      rejects=rejects)


@pytest.fixture(scope="module")
def vapr_staged(vapr_build, tmp_path_factory):
    """The vapr build staged with a tiny shard limit (so it needs several shards)."""
    folder = tmp_path_factory.mktemp("stage") / "hub"
    pset = open_pairset(vapr_build)
    staged = stage(pset, folder, repo_id="me/vapr-shapes", max_shard_bytes=1500,
                   progress=False)
    return folder, staged, pset


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


def test_layout_loads_back_with_every_row(vapr_staged):
    folder, staged, pset = vapr_staged
    (cf,) = staged
    n_shards = len(cf.files)
    assert n_shards == shard_count(arrow_nbytes(pset.dataset), 12, 1500) > 1
    assert staged_files(folder) == sorted(
        ["README.md", "images/len_gap.png", "images/lev_norm.png"]
        + [f"data/train-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)])
    loaded = load_dataset(str(folder), split="train", cache_dir=str(folder.parent / "cache"))
    assert loaded.features == pset.dataset.features
    original = vapr_rows()
    assert len(loaded) == len(original)
    for got, want in zip(loaded, original):
        assert got["id"] == want["id"]
        assert got["prompt"] == want["prompt"] and got["chosen"] == want["chosen"]
        assert got["edit_replacement"] == want["edit_replacement"]
        assert np.array_equal(pixels(got["images"][0]), pixels(want["images"][0]))


def test_card_yaml_round_trips_and_matches_the_files(vapr_staged):
    folder, staged, pset = vapr_staged
    text = (folder / "README.md").read_text()
    data = DatasetCard(text).data.to_dict()
    # what huggingface_hub parses from the file is exactly the metadata that was rendered
    assert data == card_data(pset, staged, pset.dataset.features,
                             repo_id="me/vapr-shapes").to_dict()
    assert data["license"] == "apache-2.0"
    assert data["task_categories"] == ["image-text-to-text"]
    assert {"dpo", "vapr", "synthetic"} <= set(data["tags"])
    assert data["size_categories"] == ["n<1K"]
    assert data["source_datasets"] == ["shapes"]
    (config,) = data["configs"]
    assert config["config_name"] == "default"
    (entry,) = config["data_files"]
    files = staged_files(folder)
    matched = [f for f in files if fnmatch.fnmatch(f, entry["path"])]
    assert entry["split"] == "train" and matched == staged[0].files
    info = data["dataset_info"]
    assert info["splits"] == [{"name": "train", "num_bytes": staged[0].num_bytes,
                               "num_examples": 12}]
    assert info["download_size"] == sum((folder / f).stat().st_size for f in matched)
    assert [f["name"] for f in info["features"]][:5] == ["id", "prompt", "chosen", "rejected",
                                                         "images"]


def test_card_body_has_diagnostics_provenance_rejects_and_snippets(vapr_staged):
    folder, _, _ = vapr_staged
    text = (folder / "README.md").read_text()
    rows = vapr_rows()
    m = pair_metrics([response_text(r["chosen"]) for r in rows],
                     [response_text(r["rejected"]) for r in rows], length_unit("gpt2"))
    # diagnostics computed independently from the same rows
    assert f"| word edits (median) | {np.median(m['lev_words']):.1f} |" in text
    assert f"| share of words changed (median) | {np.median(m['lev_norm']):.2f} |" in text
    assert "| 'longer is chosen' accuracy | 50.0% |" in text
    assert "No flags" in text  # one word in eight differs, lengths equal: nothing to flag
    assert "![" in text and "(images/lev_norm.png)" in text and "(images/len_gap.png)" in text
    # provenance: models with revisions, editor, templates with hashes, params, seed, command
    assert "| policy | `tiny-vlm` | 3f2a |" in text
    assert "| editor | `rule` |" in text
    assert f"| edit | `{'ab' * 32}` |" in text
    assert "| `penalty_top_k` | `3` |" in text
    assert "| seed | 7 |" in text
    assert "pairforge build vapr --out vapr-build --seed 7" in text
    assert "`run-1234`" in text
    # rejects by stage and reason
    assert "3 source example(s) yielded no pair" in text
    assert "| filter | multiple-choice question | 2 |" in text
    assert "| validate | edit did not flip the answer | 1 |" in text
    # recipe text, citation, load snippets
    assert "2510.01700" in text and "minimal edit" in text
    assert 'load_dataset("me/vapr-shapes", split="train")' in text
    assert "DPOTrainer(" in text and "processing_class=processor" in text


def test_p2dpo_configs_load_by_name(tmp_path):
    build = make_build(tmp_path / "p2", p2dpo_rows(), "p2dpo")
    result = publish(build, "me/p2", dry_run=True, staging=tmp_path / "hub")
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
                      images=[image(i)], source_dataset="RLAIF-V") for i in range(5)]
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
    build = make_build(tmp_path / "b", vapr_rows(3), "vapr")
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["command"] += f" --editor openai:gpt@https://x?key={FAKE_TOKEN}"
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = publish(build, "me/x", dry_run=True)
    assert "--editor openai:gpt@https://x?key=[redacted]" in (result.staging /
                                                               "README.md").read_text()
    assert not _files_containing(result.staging, FAKE_TOKEN)
