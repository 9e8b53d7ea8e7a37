"""The thin trainer: preference losses on per-sequence log-probs (:mod:`.losses`), collation of
canonical pair rows (:mod:`.data`), cached reference log-probs (:mod:`.reference`) and the
accelerate + peft loop (:mod:`.loop`, :func:`train`). accelerate, peft and transformers load
only when a run starts.
"""

from __future__ import annotations

from typing import Any

from pairforge.train.config import LOSSES, TrainConfig, load_config

__all__ = ["LOSSES", "TrainConfig", "load_config", "train"]


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a training job (see :func:`pairforge.train.loop.train`)."""
    from pairforge.train.loop import train as _train

    return _train(config)
