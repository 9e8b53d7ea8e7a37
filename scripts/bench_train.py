"""Optimizer steps per second: ``pairforge train`` against TRL's ``DPOTrainer``, side by side.

Same tiny VLM (the world's tiny LLaVA: the shipped weights when present, else the same
architecture randomly initialised), same DPO pairs (shapes-world SFT rows; chosen = the
answer, rejected = another answer of the same task), same batch size, LoRA settings (rank,
alpha, the text model's linear layers), learning rate and schedule, float32, one process.
Runs, in this order, each timed over its steps after ``--warmup-steps``:

- pairforge, 2B rows (``--no-pack``: chosen and rejected each with their own copy of the
  prompt, as TRL lays them out), reference forward in every step;
- pairforge, 2B rows, reference log-probs precomputed once;
- pairforge (default: chosen and rejected packed after one copy of the prompt), reference
  forward in every step (``--no-precompute-ref``);
- pairforge default: packed, reference precomputed;
- TRL, reference forward in every step (its default; TRL 1.x refuses
  ``precompute_ref_log_probs=True`` for vision datasets).

Time spent before the first step (model load, tokenisation, precomputing the reference) is
reported separately and not counted in steps/s. pairforge's probe set is switched off
(``probe_size=0``) because TRL has no counterpart. On a shared machine the load drifts, so the
runs go in ``--rounds`` rounds, forward then reversed order (A B C D E, E D C B A, …), and each
figure is the mean over rounds; ratios are only meaningful within one run of this script.

    OMP_NUM_THREADS=1 python scripts/bench_train.py --out /tmp/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(folder: Path, seed: int = 0) -> Path:
    """The world's tiny LLaVA architecture with random weights, saved like the shipped one."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from pairforge.world import vocabulary
    from pairforge.world.models import build_vlm_processor, save_checkpoint, vlm_config

    processor = build_vlm_processor(vocabulary())
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(vlm_config(len(processor.tokenizer)))
    return save_checkpoint(model, processor, folder)


def pick_model(arg: str | None, tmp: Path) -> tuple[str, str]:
    """(model spec, description): --model, else the shipped tiny VLM, else a random one."""
    from pairforge.world.models import TINY_VLM_PATH

    if arg:
        return arg, arg
    if (TINY_VLM_PATH / "config.json").is_file():
        return "tiny-vlm", "shipped tiny VLM"
    return f"hf:{build_model(tmp / 'tiny-vlm-random')}", "tiny VLM architecture, random weights"


def build_pairs(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` canonical DPO pairs from shapes-world SFT rows, saved with save_to_disk."""
    from pairforge.schema import make_pair, response_text, to_dataset
    from pairforge.world import sft_dataset

    sft = sft_dataset(n_train=2 * n, n_validation=0, n_test=0, seed=seed, progress=False)["train"]
    sft = sft.filter(lambda r: r["filter_reason"] is None and len(r["images"]) == 1)
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(sft["task"]):
        by_task.setdefault(t, []).append(i)
    rows = []
    for i, r in enumerate(sft):
        answer = response_text(r["messages"][-1:])
        peers = [j for j in by_task[r["task"]] if sft[j]["answer"] != r["answer"]]
        if not peers:
            continue
        other = sft[peers[i % len(peers)]]["answer"]
        rows.append(make_pair(prompt=r["messages"][:-1], chosen=answer, rejected=other, images=r["images"],
                              id=r["id"], task=r["task"], source_dataset="shapes", source_id=r["id"]))
        if len(rows) == n:
            break
    to_dataset(rows).save_to_disk(str(folder))
    return folder


def steps_per_second(times: list[float], warmup: int) -> float:
    """Steps per second over the steps after ``warmup`` from each step's end time."""
    if len(times) <= warmup + 1:
        raise SystemExit("bench_train: too few steps to time; raise --steps above --warmup-steps + 1")
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def run_pairforge(model: str, data: Path, out: Path, args, precompute: bool, pack: bool = True) -> dict:
    from pairforge.train import load_config, train

    t0 = time.perf_counter()
    summary = train(load_config(data=str(data), model=model, loss="dpo", out=str(out), steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, beta=0.1, lora_r=args.lora_r,
                                lora_alpha=args.lora_alpha, precompute_ref=precompute, probe_size=0,
                                seed=0, progress=False, ref_batch_size=args.batch_size, pack=pack))
    wall = time.perf_counter() - t0
    times = [json.loads(line)["elapsed_s"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"steps_per_s": steps_per_second(times, args.warmup_steps),
            "setup_s": wall - summary["train_seconds"], "wall_s": wall,
            "final_loss": summary["final"].get("loss")}


def run_trl(model: str, data: Path, out: Path, args, precompute: bool) -> dict:
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pairforge.models.hf import HFModel
    from pairforge.train.loop import language_lora_targets

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter())

    t0 = time.perf_counter()
    hf = HFModel(model, device="cpu", dtype=torch.float32, progress=False)  # the same load as pairforge's
    policy, processor = hf.model, hf.processor
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=language_lora_targets(policy))
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
                       lr_scheduler_type="cosine", warmup_steps=0, beta=0.1, logging_steps=10_000,
                       save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                       gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
                       precompute_ref_log_probs=precompute,
                       max_length=None, seed=0, weight_decay=0.0, max_grad_norm=1.0)
    trainer = DPOTrainer(model=policy, args=config, train_dataset=load_from_disk(str(data)),
                         processing_class=processor, peft_config=lora, callbacks=[Clock()])
    t_train = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    return {"steps_per_s": steps_per_second([t - t_train for t in times], args.warmup_steps),
            "setup_s": t_train - t0, "wall_s": wall, "final_loss": result.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model spec (default: the shipped tiny VLM, else a random one)")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp_name:
        tmp = Path(tmp_name)
        model, described = pick_model(args.model, tmp)
        data = build_pairs(tmp / "pairs", args.pairs)
        plan = (("pairforge 2B", run_pairforge, dict(precompute=False, pack=False)),
                ("pairforge 2B+precompute", run_pairforge, dict(precompute=True, pack=False)),
                ("pairforge", run_pairforge, dict(precompute=False)),
                ("pairforge+precompute", run_pairforge, dict(precompute=True)),
                ("trl", run_trl, dict(precompute=False)))
        rounds: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
        for r in range(args.rounds):
            for name, fn, kw in (plan if r % 2 == 0 else plan[::-1]):
                print(f"bench_train: round {r + 1}, {name} ...", file=sys.stderr, flush=True)
                folder = tmp / f"{r}-{name.replace(' ', '_').replace('+', '_')}"
                os.environ["PAIRFORGE_CACHE"] = str(folder / "cache")  # cold: setup includes the reference pass
                rounds[name].append(fn(model, data, folder / "run", args, **kw))
    runs = {name: {k: sum(x[k] for x in rs) / len(rs) for k in ("steps_per_s", "setup_s", "wall_s")}
            | {"steps_per_s_by_round": [x["steps_per_s"] for x in rs]} for name, rs in rounds.items()}
    base = runs["trl"]["steps_per_s"]
    ratios = {f"{name} / trl": r["steps_per_s"] / base for name, r in runs.items() if name != "trl"}
    report = {"model": described, "pairs": args.pairs, "steps": args.steps, "warmup_steps": args.warmup_steps,
              "rounds": args.rounds,
              "batch_size": args.batch_size, "lora_r": args.lora_r, "threads": args.threads,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "runs": runs, "ratios": ratios}
    print(f"\nDPO, {described}, batch {args.batch_size}, LoRA r={args.lora_r}, {args.steps} steps "
          f"(first {args.warmup_steps} untimed), {report['device']}, {args.threads} thread(s), "
          f"mean of {args.rounds} round(s)")
    print(f"{'run':<26}{'steps/s':>9}{'x trl':>8}{'setup s':>9}{'wall s':>9}   by round")
    for name, r in runs.items():
        by_round = " ".join(f"{v:.3f}" for v in r["steps_per_s_by_round"])
        print(f"{name:<26}{r['steps_per_s']:>9.3f}{r['steps_per_s'] / base:>7.2f}x{r['setup_s']:>9.1f}"
              f"{r['wall_s']:>9.1f}   {by_round}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
