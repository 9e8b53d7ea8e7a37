"""Pair recipes (VaPR, M3PO, P2-DPO, CW-DPO, ASPO annotations): pure logic on the models
protocol, driven by the build engine through :mod:`pairforge.recipes.base`.

Each recipe module defines one class implementing :class:`~pairforge.recipes.base.Recipe`
with a ``from_params(params: Mapping) -> Recipe`` classmethod; :func:`load_recipe` finds it by
name without importing the others (model code stays lazy)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pairforge.errors import PairforgeError
from pairforge.recipes.base import BuildContext, Example, Outcome, Recipe, Reject

#: recipe name → "module:Class"
RECIPES = {
    "vapr": "pairforge.recipes.vapr:VaPR",
    "m3po": "pairforge.recipes.m3po:M3PO",
    "p2dpo": "pairforge.recipes.p2dpo:P2DPO",
    "cwdpo": "pairforge.recipes.cwdpo:CWDPO",
    "aspo": "pairforge.recipes.aspo:ASPOAnnotate",
}


def load_recipe(name: str, params: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe ``name`` configured with ``params`` (unknown keys are an error)."""
    if name not in RECIPES:
        raise PairforgeError(f"recipe '{name}': choose one of {', '.join(RECIPES)}")
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls).from_params(dict(params or {}))


__all__ = ["RECIPES", "BuildContext", "Example", "Outcome", "Recipe", "Reject", "load_recipe"]
