"""`pairforge train --loss aspo` on a random tiny LLaVA: the sentence weights are recomputed in
every step from the policy being trained (ASPO, arXiv:2505.19100, Alg. 1) and the build's
CLIP similarities; the stored weights are used only on request or by sets without
similarities (with a note); a row whose similarities do not match its sentences is named."""

from __future__ import annotations

import os

import pytest

from pairforge.errors import BadInput
from pairforge.models.random_tiny import save_random_llava
from pairforge.schema import to_dataset
from test_train_data import pair_rows
from test_train_loop import log_records, run

pytestmark = pytest.mark.usefixtures("fresh_cache")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_random_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspo-sets")
    rows = pair_rows(12, "aspo")  # stored weights (1.0, 0.2) on two sentences
    to_dataset([dict(r, sentence_similarities=[0.3, 0.1]) for r in rows]).save_to_disk(str(root / "sims"))
    to_dataset(rows).save_to_disk(str(root / "old"))
    bad = [dict(r, sentence_similarities=[0.3]) for r in rows]
    to_dataset(bad).save_to_disk(str(root / "bad"))
    return {k: root / k for k in ("sims", "old", "bad")}


def test_weights_are_recomputed_from_the_policy(llava, sets, tmp_path):
    summary = run(llava, {"aspo": sets["sims"]}, tmp_path, loss="aspo", steps=2, lr=1e-2)
    records = log_records(tmp_path)
    assert not any("sentence_similarities" in n for n in summary["notes"])
    for r in records:
        # S' = (1, 0) from the stored similarities; PPL' ∈ {(1, 0), (0, 1)} from the policy:
        # w ∈ {(1, 0), (0.5, 0.5)}, never the stored (1.0, 0.2)
        assert r["aspo_weight/min"] in (pytest.approx(0.0), pytest.approx(0.5))
        assert r["aspo_weight/max"] in (pytest.approx(1.0), pytest.approx(0.5))
        assert 0.5 - 1e-6 <= r["aspo_ratio/min"] <= r["aspo_ratio/max"] <= 1 + 1e-6


def test_stored_weights_on_request_and_for_old_sets(llava, sets, tmp_path):
    run(llava, {"aspo": sets["sims"]}, tmp_path / "stored", loss="aspo", steps=1, aspo_weights="stored")
    rec, = log_records(tmp_path / "stored")
    assert rec["aspo_weight/min"] == pytest.approx(0.2) and rec["aspo_weight/max"] == pytest.approx(1.0)
    summary = run(llava, {"aspo": sets["old"]}, tmp_path / "old", loss="aspo", steps=1)
    assert any("no sentence_similarities" in n for n in summary["notes"])
    rec, = log_records(tmp_path / "old")
    assert rec["aspo_weight/min"] == pytest.approx(0.2)


def test_mismatched_similarities_are_named(llava, sets, tmp_path):
    with pytest.raises(BadInput, match="sentence_similarities"):
        run(llava, {"aspo": sets["bad"]}, tmp_path, loss="aspo", steps=1)
