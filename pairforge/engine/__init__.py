"""The build engine: SFT examples → a recipe → a checkpointed, resumable pair dataset.

    from pairforge.engine import BuildConfig, build, load_build
    build(BuildConfig(recipe="vapr", out=Path("builds/vapr")))
    pairs = load_build("builds/vapr")          # datasets.Dataset of canonical rows

Modules in the order a build runs through them: ``config`` (YAML + command line),
``manifest`` (run identity, atomic files, resume), ``engine`` (select, chunks: read → recipe
→ rows → commit), ``summary`` (rejects.jsonl, dataset/, summary.json, table; ``load_build``),
``merge`` (join ``--shard I/N`` builds), ``ray_executor`` (``--executor ray``: the same
chunks built on a Ray cluster).
"""

from pairforge.engine.config import BuildConfig, load_config, parse_params, parse_shard
from pairforge.engine.engine import build
from pairforge.engine.merge import merge
from pairforge.engine.summary import load_build

__all__ = ["BuildConfig", "build", "load_build", "load_config", "merge", "parse_params",
           "parse_shard"]
