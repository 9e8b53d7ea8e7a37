"""Where the project's text resources live: ``prompts/`` (recipe prompt templates) and
``dataset_cards/`` (card templates).

They live in the package (``pairforge/prompts``, ``pairforge/dataset_cards``) so that wheels
carry them; the repository's top-level ``prompts`` and ``dataset_cards`` are links to them, so
people find and edit them next to the code."""

from __future__ import annotations

from pathlib import Path

from pairforge.errors import PairforgeError

RESOURCES = ("prompts", "dataset_cards")
_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder of resource ``name`` (:data:`RESOURCES`)."""
    if name not in RESOURCES:
        raise PairforgeError(f"resource '{name}': choose one of {RESOURCES}")
    path = _PACKAGE / name
    if path.is_dir():
        return path
    raise PairforgeError(f"the '{name}' folder is missing from this install of pairforge; "
                         f"reinstall it (pip install pairforge, or pip install -e . in a checkout)")


def read_prompt(*parts: str) -> str:
    """Text of the prompt template ``prompts/<parts...>`` (e.g. ``read_prompt("vapr", "color.txt")``)."""
    path = resource_dir("prompts").joinpath(*parts)
    if not path.is_file():
        raise PairforgeError(f"prompt template {path} not found; reinstall pairforge or restore it")
    return path.read_text(encoding="utf-8")
