"""Publishing pair sets: the Hub repo layout, dataset cards, the one-commit push, exporters.

Modules, in the order a set flows through them: ``pairset`` (a build dir or a plain set of
canonical rows → :class:`PairSet`, split into configs), ``layout`` (parquet shards with
embedded images under ``data/``, verified with ``datasets.load_dataset``), ``card`` (README
card: YAML through ``DatasetCardData``, body from the ``dataset_cards/`` templates, the audit
table and plots), ``hub`` (``pairforge publish``: stage, verify, push in one commit) and
``export`` (``pairforge export``: LLaMA-Factory and ms-swift layouts).
"""

from __future__ import annotations

from pairforge.publish.export import ExportResult, export
from pairforge.publish.hub import PublishResult, publish
from pairforge.publish.pairset import PairSet, open_pairset

__all__ = ["ExportResult", "PairSet", "PublishResult", "export", "open_pairset", "publish"]
