"""The `pairforge` command line. Each sub-command lives in a small function that parses options
and calls library code; user errors print one line (no traceback) and exit with status 2."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pairforge import __version__
from pairforge.errors import PairforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
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
        "--format", help="Input format, one of pairforge.sources.FORMATS; detected from the "
                         "first record when omitted.")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Folder image paths are relative to (default: the data file's "
                             "folder).")] = None,
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="Length unit: 'words', 'gpt2' (offline GPT-2 BPE), or a Hugging "
                            "Face tokenizer folder / id.")] = "gpt2",
    on_error: Annotated[OnError, typer.Option(
        "--on-error", help="skip: count bad rows and list them in skipped.jsonl; fail: stop "
                           "at the first.")] = OnError.skip,
) -> None:
    """Audit preference sets for length and style shortcuts (text metrics, flags, report)."""
    from pairforge.diagnostics.audit import run_audit

    run_audit(data, out, format=format, image_root=image_root, tokenizer=tokenizer,
              on_error=on_error.value)


def main() -> None:
    try:
        app()
    except PairforgeError as e:  # errors a user can cause: one line, no traceback
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
