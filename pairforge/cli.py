"""The `pairforge` command line. Each sub-command lives in a small function that parses options
and calls library code; user errors print one line (no traceback) and exit with status 2."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from pairforge import __version__
from pairforge.errors import PairforgeError


class _Commands(TyperGroup):
    """The command list shows each command's first sentence whole (wrapped), where click
    would cut it to one line mid-sentence ("... (text...")."""

    def format_commands(self, ctx, formatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


# Plain click help: boolean options show as switches (no "<bool>" value), and docstrings are
# reflowed as paragraphs instead of keeping their source line breaks.
app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  rich_markup_mode=None,
                  help="Build, audit, publish and train on vision-language preference pairs.")


@app.command()
def version() -> None:
    """Print the pairforge version."""
    typer.echo(__version__)


class OnError(str, Enum):
    skip = "skip"
    fail = "fail"


@app.command()
def audit(
    data: Annotated[list[str], typer.Argument(
        help="Preference sets: .jsonl/.json/.parquet files, dataset folders or Hub ids.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for summary.json, pairs.parquet, "
                                      "report.html, plots and skipped.jsonl.")],
    format: Annotated[str | None, typer.Option(
        "--format", help="Input format: canonical, trl (prompt/chosen/rejected, or an implicit "
                         "prompt in chosen/rejected), rlaif-v, llava, llamafactory (ranking "
                         "sharegpt or v1 chosen_messages/rejected_messages), swift "
                         "(rejected_response or rejected_messages); detected from the first "
                         "record when omitted.")] = None,
    edit_unit: Annotated[str | None, typer.Option(
        "--edit-unit", help="Unit of the edit distance: words or characters (default: "
                            "characters for sets in scripts written without spaces, such as "
                            "Chinese, Japanese or Thai; words otherwise).")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Folder image paths are relative to (default: the data file's "
                             "folder).")] = None,
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="Length unit: 'words', 'gpt2' (offline GPT-2 BPE), or a Hugging "
                            "Face tokenizer folder / id.")] = "gpt2",
    on_error: Annotated[OnError, typer.Option(
        "--on-error", help="skip: count bad rows and list them in skipped.jsonl; fail: stop "
                           "at the first.")] = OnError.skip,
    scorer: Annotated[str | None, typer.Option(
        "--scorer", help="Reference model for log π(y|x) and Δ_ref per pair: tiny-vlm, smollm2, "
                         "hf:PATH_OR_ID, or 'default' (tiny-vlm for image sets, smollm2 for "
                         "text-only sets).")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="Base policy to be trained, for IPS (default: the scorer, so IPS = "
                         "Δ_ref).")] = None,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="Also score with the image removed: flags sets whose preference "
                            "the text alone predicts.")] = False,
    sample: Annotated[int | None, typer.Option(
        "--sample", help="Score a seeded random sample of N pairs per set (95% confidence "
                         "intervals); default: every pair.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --sample.")] = 0,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Pairs per forward pass of the scoring model.")] = 8,
    device: Annotated[str | None, typer.Option(
        "--device", help="Device of the scoring model: cpu, cuda, cuda:1 (default: cuda if "
                         "available).")] = None,
    max_pixels: Annotated[int | None, typer.Option(
        "--max-pixels", help="With --scorer: pairs with a larger image are not scored "
                             "(default 4096*4096, as build).")] = None,
) -> None:
    """Audit preference sets for length and style shortcuts (text metrics, flags, report),
    and with --scorer / --policy for what a model already prefers (Δ_ref, IPS)."""
    from pairforge.diagnostics.audit import run_audit
    from pairforge.models.base import resolve_device

    if device is not None:  # before any set is read: a device this machine lacks is one line
        resolve_device(device)
    run_audit(data, out, format=format, image_root=image_root, tokenizer=tokenizer,
              edit_unit=edit_unit,
              on_error=on_error.value, scorer=scorer, policy=policy, text_only=text_only,
              sample=sample, seed=seed, batch_size=batch_size, device=device,
              max_pixels=max_pixels)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model to serve: tiny-vlm, smollm2, hf:PATH_OR_ID "
                                              "or a folder (run by transformers).")],
    port: Annotated[int, typer.Option("--port", help="Port (0 = any free port).")] = 8000,
    host: Annotated[str, typer.Option(
        "--host", help="Interface to listen on. Any host but loopback (127.0.0.1, ::1, "
                       "localhost) is refused without --api-key-env, unless --insecure.")
    ] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(
        "--name", help="Model name clients send (default: MODEL as given).")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Concurrent requests decoded together.")] = 8,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help="Require 'Authorization: Bearer $VAR' with the key in this "
                              "environment variable.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ...")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16, float16.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No log line per request.")] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve on a non-loopback --host without --api-key-env: anyone who "
                           "can reach the port can use the model.")] = False,
) -> None:
    """Serve a model on an OpenAI-compatible /v1/chat/completions (+ /v1/models) endpoint."""
    from pairforge.serve import serve as run_server

    run_server(model, host=host, port=port, served_name=name, max_batch=max_batch,
               api_key_env=api_key_env, device=device, dtype=dtype, quiet=quiet,
               insecure=insecure)


@app.command()
def publish(
    data: Annotated[Path, typer.Argument(
        help="A build dir (dataset/ + manifest.json + summary.json), or a save_to_disk folder "
             "/ .parquet file of canonical pair rows (published with the audit card).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub dataset repo, ORG/NAME.")],
    private: Annotated[bool, typer.Option(
        "--private", help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Branch to commit to (created from main when missing).")] = None,
    create_pr: Annotated[bool, typer.Option(
        "--create-pr", help="Open a pull request with the commit instead of committing.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Stage and verify the repo folder, do not push.")] = False,
    staging: Annotated[Path | None, typer.Option(
        "--staging", help="Folder for the repo layout (default: DIR/hub for a build dir, "
                          "else DATA.hub beside the set).")] = None,
    license: Annotated[str | None, typer.Option(
        "--license", help="Card license id (default: apache-2.0 for sets from the offline "
                          "world, else 'other').")] = None,
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="Length unit of the card's diagnostics: words, gpt2 or a "
                            "tokenizer folder / id.")] = "gpt2",
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Folder that image paths in the rows must lie in (default: the "
                             "build dir or the set's folder); a row whose image is outside "
                             "it, too big or not an image stops the publish.")] = None,
) -> None:
    """Publish a pair set to the Hugging Face Hub: parquet shards + card + plots, loaded back
    with datasets.load_dataset, pushed in one commit (token: HF_TOKEN or `hf auth login`)."""
    from pairforge.publish.hub import publish as run_publish

    run_publish(data, repo_id, private=private, revision=revision, create_pr=create_pr,
                dry_run=dry_run, staging=staging, license=license, tokenizer=tokenizer,
                image_root=image_root)


class ExportFormat(str, Enum):
    llamafactory = "llamafactory"
    swift = "swift"


@app.command()
def export(
    data: Annotated[Path, typer.Argument(
        help="A build dir, or a save_to_disk folder / .parquet file of canonical pair rows.")],
    to: Annotated[ExportFormat, typer.Option(
        "--to", help="llamafactory: ranking sharegpt JSONL + dataset_info.json entry; "
                     "swift: ms-swift DPO JSONL.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (images go to OUT/images).")],
    name: Annotated[str | None, typer.Option(
        "--name", help="Data file and dataset_info entry name (default: the set's name).")
    ] = None,
    absolute: Annotated[bool | None, typer.Option(
        "--absolute/--relative",
        help="Image paths in the data file: absolute, or relative to OUT. Default: absolute "
             "for swift (ms-swift resolves relative paths against its working directory, or "
             "ROOT_IMAGE_DIR when set), relative for llamafactory (resolved against its "
             "dataset_dir, which is OUT).", show_default=False)] = None,
    on_error: Annotated[OnError, typer.Option(
        "--on-error", help="skip: list rows the format cannot hold in NAME.skipped.jsonl; "
                           "fail: stop at the first.")] = OnError.skip,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Folder that image paths in the rows must lie in (default: the "
                             "build dir or the set's folder); other rows are skipped.")] = None,
) -> None:
    """Export pairs for LLaMA-Factory or ms-swift (images written once, named by content)."""
    from pairforge.publish.export import export as run_export

    run_export(data, to.value, out, name=name, on_error=on_error.value, absolute=absolute,
               image_root=image_root)


@app.command()
def train(
    data: Annotated[str, typer.Argument(
        help="Pair set: a build folder, a save_to_disk folder or parquet of canonical rows.")],
    model: Annotated[str | None, typer.Option(
        "--model", help="Policy: tiny-vlm, hf:PATH_OR_ID[@REV] or a folder (default tiny-vlm).")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="dpo, cwdpo, aspo or p2dpo (default dpo).")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", help="Run folder: adapter/ or model/, checkpoints/, train_log.jsonl, summary.")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", help="YAML of settings (names as in pairforge.train.TrainConfig), or a shipped "
                         "paper preset: vapr, p2dpo, aspo, m3po; options given here override it.")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank (default 16).")] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha (default 32).")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="β of the DPO terms (default 0.1).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 1e-4).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs over the pairs (default 1).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (instead of --epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Pairs per device per micro-batch (default 8).")] = None,
    grad_accum: Annotated[int | None, typer.Option(
        "--grad-accum", help="Micro-batches per optimizer step (default 1).")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Warmup optimizer steps (default 0).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", help="AdamW weight decay (default 0).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of order and init (default 0).")] = None,
    precompute_ref: Annotated[bool | None, typer.Option(
        "--precompute-ref/--no-precompute-ref",
        help="Reference log-probs once before training, cached (default) / in every step.")] = None,
    full_finetune: Annotated[bool, typer.Option(
        "--full-finetune", help="Train all weights instead of a LoRA adapter.")] = False,
    merge: Annotated[bool, typer.Option(
        "--merge", help="Also write the LoRA adapter merged into the weights (OUT/model).")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last checkpoint in OUT/checkpoints.")] = False,
    save_every: Annotated[int | None, typer.Option(
        "--save-every", help="Checkpoint every N optimizer steps (default: at the end only).")] = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Cut responses so prompt + response fit in N tokens.")] = None,
    pack: Annotated[bool | None, typer.Option(
        "--pack/--no-pack", help="Chosen and rejected after one shared copy of the prompt "
                                 "(default, where the model allows) / as 2B separate rows.")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="auto (bf16 where supported), bf16, fp16 or no.")] = None,
) -> None:
    """Train a policy on preference pairs (DPO, CW-DPO, ASPO, P2-DPO) with LoRA or fully."""
    from pairforge.train import load_config
    from pairforge.train import train as run_training

    if epochs is not None and steps is not None:
        raise PairforgeError("give --epochs or --steps, not both")
    settings = dict(data=data, model=model, loss=loss, out=out, lora_r=lora_r, lora_alpha=lora_alpha,
                    beta=beta, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size,
                    grad_accum=grad_accum, warmup=warmup, weight_decay=weight_decay, seed=seed,
                    precompute_ref=precompute_ref,
                    save_every=save_every, max_length=max_length, pack=pack, precision=precision)
    for flag, on in (("full_finetune", full_finetune), ("merge", merge), ("resume", resume)):
        if on:
            settings[flag] = True
    summary = run_training(load_config(config, **settings))
    final = summary["final"]
    typer.echo(f"trained {summary['steps_this_run']} steps of {summary['loss']} in "
               f"{summary['train_seconds']:.1f} s ({summary['steps_per_s'] or 0:.2f} steps/s); "
               f"loss {final.get('loss', float('nan')):.4f}, reward accuracy "
               f"{final.get('rewards/accuracy', float('nan')):.2f}")
    for note in summary["notes"]:
        typer.echo(f"  {note}")
    for kind, path in summary["outputs"].items():
        typer.echo(f"  {kind}: {path}")
    typer.echo(f"  log: {summary['out']}/train_log.jsonl")


@app.command()
def build(
    recipe: Annotated[str | None, typer.Argument(
        help="Recipe: vapr, m3po, p2dpo, cwdpo, aspo (or `recipe:` in --config).")] = None,
    source: Annotated[str | None, typer.Option(
        "--source", help="SFT examples: shapes[:SPLIT][?n=N&seed=S] (the offline world, "
                         "default), a LLaVA .json/.jsonl, or rows with messages + images "
                         "(.jsonl, .parquet, save_to_disk folder[?split=NAME]); for aspo, "
                         "a pair set: a build folder or canonical pair rows.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Build folder (rerun the same command to resume).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML with any of these options (params: for recipe parameters); "
                         "options given here win.")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Policy VLM spec.")] = None,
    clip: Annotated[str | None, typer.Option("--clip", help="CLIP scorer spec.")] = None,
    editor: Annotated[str | None, typer.Option("--editor", help="Editor LLM spec.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Judge LLM spec.")] = None,
    describer: Annotated[str | None, typer.Option(
        "--describer", help="VLM (the policy) that describes images for VaPR's LLM editor when the "
                            "source has no caption, e.g. tiny-vlm.")] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="Reference model (e.g. tiny-vlm, hf:PATH_OR_ID, openai:M@URL?prompt_logprobs=1): "
                            "store ref_chosen_logps / ref_rejected_logps, token counts and Δ_ref per pair, "
                            "and IPS under the recipe's policy when it has one (default: none).")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="Use the first N examples of the source.")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="I/N: build the examples whose id hashes to shard I of N.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Run seed (default 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Examples per recipe call (default 8).")] = None,
    chunk_size: Annotated[int | None, typer.Option(
        "--chunk-size", help="Examples per committed chunk of a new build (default 64).")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Recipe parameter key=value (repeatable).")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Folder image paths are relative to (default: the data file's "
                             "folder).")] = None,
    max_pixels: Annotated[int | None, typer.Option(
        "--max-pixels", help="Reject images with more pixels (default 4096*4096).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Discard an existing build in --out (only the files it wrote; "
                            "other files stay).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    executor: Annotated[str | None, typer.Option(
        "--executor", help="local (default) or ray: build on a Ray cluster, one actor pool "
                           "per model role (needs pairforge's ray extra).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster to join (e.g. auto, ray://HOST:10001); default: "
                              "a local Ray instance.")] = None,
) -> None:
    """Build preference pairs from SFT examples with a recipe (checkpointed, resumable)."""
    from pairforge.engine import build as run_build
    from pairforge.engine import load_config, parse_params

    cfg = load_config(config, recipe=recipe, source=source, out=out, policy=policy, clip=clip,
                      editor=editor, judge=judge, describer=describer, reference=reference,
                      limit=limit, shard=shard, seed=seed, batch_size=batch_size,
                      chunk_size=chunk_size, image_root=image_root,
                      max_pixels=max_pixels, overwrite=overwrite or None,
                      params=parse_params(param or []) or None, executor=executor,
                      ray_address=ray_address)
    run_build(cfg, command=recorded_command(), progress=not quiet)


@app.command()
def merge(
    shards: Annotated[list[Path], typer.Argument(help="The build folders of all --shard I/N runs.")],
    out: Annotated[Path, typer.Option("--out", help="Merged build folder.")],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a build (not a merge) already in --out, or merge "
                            "beside other files (never removed).")] = False,
) -> None:
    """Join shard builds (same run, all shards, no overlap) into one build folder."""
    from pairforge.engine import merge as run_merge

    run_merge(shards, out, overwrite=overwrite, command=recorded_command())


def recorded_command() -> str:
    """The command line as the build records it (manifest, summary, published card): absolute
    local paths are cut to ``<local>/name`` so that no folder of this machine is published, and
    token- or key-shaped strings are cut out."""
    import shlex

    from pairforge.safety import redact_local_paths, redact_secrets

    return redact_secrets(redact_local_paths(shlex.join(["pairforge", *sys.argv[1:]])))


def main() -> None:
    import os

    # datasets' own "Map" / "Creating parquet" bars would interleave with pairforge's progress
    # bars; a user who wants them sets HF_DATASETS_DISABLE_PROGRESS_BARS=0
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except PairforgeError as e:  # errors a user can cause: one line, no traceback
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
