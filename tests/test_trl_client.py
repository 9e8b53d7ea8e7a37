"""TRL as a real client of our pair datasets (issue 6): a VaPR set built through the engine on
the offline world goes into ``trl.DPOTrainer(train_dataset=...)`` as it is, no conversion step,
with the tiny VLM loaded from its folder through the Auto classes; and the same set as a Hub
user gets it (the published repo layout read back with ``datasets.load_dataset``).

TRL's vision path keeps ``prompt``, ``chosen``, ``rejected``, ``images`` (its signature
columns) and tokenises on the fly in ``DataCollatorForVisionPreference``; with
``remove_unused_columns=False`` the collator gets every column of our rows, which the collator
test covers. CPU, one thread (tests/conftest.py), a few steps: about 30 s on a busy 2-core box.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'pairforge[trl]')")
torch = pytest.importorskip("torch")

from pairforge.schema import response_text  # noqa: E402

#: The trained candidate, used until the shipped checkpoint exists (same architecture).
CANDIDATE_VLM = Path("/tmp/tw/run1/tiny-llava")
STEPS = 3
#: Keys of TRL's DPO log that show it computed the DPO loss against a reference.
DPO_LOG_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory) -> Path:
    """The tiny VLM's folder: the shipped one, else the trained candidate, else a random LLaVA."""
    from pairforge.world.models import TINY_VLM_PATH

    for path in (TINY_VLM_PATH, CANDIDATE_VLM):
        if (path / "config.json").is_file():
            return path
    from pairforge.models.random_tiny import save_random_llava

    return save_random_llava(tmp_path_factory.mktemp("random-llava"))


@pytest.fixture(scope="module")
def processor(vlm_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm_path)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """VaPR (rule editor) on 16 world examples, built for real by the engine."""
    import io

    from rich.console import Console

    from pairforge.engine import BuildConfig, build

    out = tmp_path_factory.mktemp("vapr") / "build"
    summary = build(BuildConfig(recipe="vapr", source="shapes:train?n=16", out=out,
                                params={"editor": "rule"}),
                    console=Console(file=io.StringIO()), progress=False)
    assert summary["counts"]["pairs"] >= 4  # two batches of two, at least
    return out


@pytest.fixture(scope="module")
def pairs(build_dir):
    from pairforge.engine import load_build

    return load_build(build_dir)


@pytest.fixture(scope="module")
def hub_pairs(build_dir):
    """The published layout (``publish --dry-run``) loaded as a Hub user loads it."""
    import io

    from datasets import load_dataset
    from rich.console import Console

    from pairforge.publish.hub import publish

    result = publish(build_dir, "pairforge/vapr-shapes-test", dry_run=True,
                     console=Console(file=io.StringIO()))
    return load_dataset(str(result.staging), split="train")


def _train(vlm_path, processor, dataset, out: Path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vlm_path, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=STEPS,
                         learning_rate=5e-4, use_cpu=True, bf16=False, fp16=False, report_to=[],
                         logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                         activation_checkpointing=False, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=processor)
    assert trainer.train_dataset is dataset  # no conversion, no preprocessing: the rows as built
    result = trainer.train()
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    return result, [log for log in trainer.state.log_history if "loss" in log], changed


@pytest.mark.parametrize("which", ["load_build", "hub_layout"])
def test_dpo_trainer_trains_on_our_dataset_as_is(which, request, vlm_path, processor, tmp_path):
    dataset = request.getfixturevalue("pairs" if which == "load_build" else "hub_pairs")
    result, logs, changed = _train(vlm_path, processor, dataset, tmp_path)

    assert result.global_step == STEPS and len(logs) == STEPS
    for log in logs:
        assert math.isfinite(log["loss"]), log
        assert all(k in log and math.isfinite(log[k]) for k in DPO_LOG_KEYS), log
    # step 1: the policy is the reference, so every implicit reward is 0 and the loss is ln 2
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # later steps: the policy has moved away from the reference
    assert any(abs(log["rewards/chosen"]) > 1e-6 for log in logs[1:])
    assert changed > 0


def _bos_left_to_tokenizer(processor) -> bool:
    """True when the chat template does not render BOS but the tokenizer adds it: TRL tokenises
    the templated text with ``add_special_tokens=False`` and so never gets that BOS."""
    tok = processor.tokenizer
    if tok.bos_token is None:
        return False
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                                         add_generation_prompt=True)
    return not text.startswith(tok.bos_token) and tok("a").input_ids[:1] == [tok.bos_token_id]


def _collate_and_reference(processor, pairs, n: int = 2):
    """TRL's batch of the first ``n`` rows, handed over with every column (as
    ``remove_unused_columns=False`` does), and for each of its 2n sequences (chosen rows, then
    rejected rows) the processor's own encoding ``processor(text=apply_chat_template(prompt +
    answer), images=...)`` plus the length of its prompt part."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    rows = [dict(pairs[i]) for i in range(n)]
    batch = DataCollatorForVisionPreference(processor=processor)([dict(r) for r in rows])
    refs = []
    for key in ("chosen", "rejected"):
        for r in rows:
            full = processor.apply_chat_template(r["prompt"] + r[key])
            prompt = processor.apply_chat_template(r["prompt"], add_generation_prompt=True)
            ids = processor(text=full, images=r["images"]).input_ids[0]
            n_prompt = len(processor(text=prompt, images=r["images"]).input_ids[0])
            refs.append((list(ids), n_prompt, response_text(r[key])))
    return rows, batch, refs


def test_trl_collates_our_rows_as_the_model_reads_them(processor, pairs):
    """Every column of our rows reaches the collator without harm; each sequence is the
    processor's own encoding (image tokens expanded, answer last, answer alone in the
    completion mask); pixel values are the processor's. BOS: next test."""
    rows, batch, refs = _collate_and_reference(processor, pairs)
    assert len(rows[0]) > 10  # provenance, vapr and diagnostics columns came along
    bos = processor.tokenizer.bos_token_id
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for j, (ref, n_prompt, answer) in enumerate(refs):
        keep = batch["attention_mask"][j].bool()
        seq = batch["input_ids"][j][keep].tolist()
        completion = batch["input_ids"][j][batch["completion_mask"][j].bool()].tolist()
        drop = 1 if ref[:1] == [bos] and seq[:1] != [bos] else 0  # the BOS gap, tested below
        assert seq == ref[drop:]
        assert completion == ref[n_prompt:]
        assert seq.count(image_id) == ref.count(image_id) > 0
        answer_ids = processor.tokenizer(answer, add_special_tokens=False).input_ids
        assert completion[:len(answer_ids)] == answer_ids  # the answer, then the end of turn
    pixels = processor.image_processor([im for r in rows for im in r["images"]],
                                       return_tensors="pt").pixel_values
    assert torch.allclose(batch["pixel_values"], torch.cat([pixels, pixels]))


def test_trl_keeps_the_bos_the_model_reads(request, processor, pairs):
    """TRL's sequences equal the model's own encoding token for token, BOS included."""
    if _bos_left_to_tokenizer(processor):
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "the tiny VLM's chat template leaves <s> to the tokenizer (llava-1.5-hf style) while "
            "TRL's DataCollatorForVisionPreference tokenises the templated text with "
            "add_special_tokens=False, so TRL trains on sequences without <s>; fix: the "
            "template renders {{ bos_token }} and the tokenizer adds none")))
    _, batch, refs = _collate_and_reference(processor, pairs)
    for j, (ref, _, _) in enumerate(refs):
        assert batch["input_ids"][j][batch["attention_mask"][j].bool()].tolist() == ref


def test_no_canonical_column_is_one_trl_reads():
    """TRL's preference path reads these names from a row besides prompt/chosen/rejected/images:
    ``image`` would be taken as the images, ``label`` / ``completion`` / ``messages`` make
    ``trl.data_utils.apply_chat_template`` refuse the row (with ``remove_unused_columns=False``),
    ``tools`` / ``chat_template_kwargs`` are TRL signature columns (the latter goes to the chat
    template). No pairforge column may use them."""
    from pairforge.schema import COLUMN_GROUPS, features

    reserved = {"image", "label", "completion", "messages", "tools", "chat_template_kwargs"}
    assert not reserved & set(features(*COLUMN_GROUPS))
