"""Compatibility import: the build engine moved to :mod:`pairforge.engine` (a package named
``build`` is what packaging tools, linters and test collectors skip as an artefact folder).
``from pairforge.build import load_build`` keeps working; new code imports from
``pairforge.engine``. The command stays ``pairforge build``."""

from pairforge.engine import BuildConfig, build, load_build, load_config, merge, parse_params, parse_shard

__all__ = ["BuildConfig", "build", "load_build", "load_config", "merge", "parse_params",
           "parse_shard"]
