"""Shared test settings: offline Hub, and one torch thread per test module.

One thread keeps the suite fast and its numbers stable on shared 2-core machines (two
threads were several times slower there), and makes model outputs independent of the
machine's core count."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A local Ray instance (tests/test_build_ray.py) on 127.0.0.1, not the machine's network address;
# read by Ray when it is first imported (pairforge.engine.ray_executor.LOOPBACK_ENV)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    torch = sys.modules.get("torch")
    if torch is None:  # a module that never touches torch: do not pay its import
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A module's own empty ``PAIRFORGE_CACHE`` (restored afterwards): for tests that must not
    see, or leave, cached reference log-probs and converted models."""
    before = os.environ.get("PAIRFORGE_CACHE")
    os.environ["PAIRFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["PAIRFORGE_CACHE"])
    if before is None:
        os.environ.pop("PAIRFORGE_CACHE", None)
    else:
        os.environ["PAIRFORGE_CACHE"] = before


@contextlib.contextmanager
def script_module(name: str):
    """``scripts/NAME.py`` imported as module ``NAME`` (registered in ``sys.modules``, where
    dataclasses look their module up), unregistered afterwards; the environment is restored
    too (scripts set e.g. OMP_NUM_THREADS for a run of their own)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    env = dict(os.environ)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        os.environ.clear()
        os.environ.update(env)
