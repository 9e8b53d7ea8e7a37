"""The `pairforge` command line. Each sub-command lives in a small function that parses options
and calls library code; user errors print one line (no traceback) and exit with status 2."""

from __future__ import annotations

import sys

import typer

from pairforge import __version__
from pairforge.errors import PairforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build, audit, publish and train on vision-language preference pairs.")


@app.command()
def version() -> None:
    """Print the pairforge version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app()
    except PairforgeError as e:  # errors a user can cause: one line, no traceback
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
