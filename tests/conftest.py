"""Shared test settings: offline Hub, and one torch thread per test module.

One thread keeps the suite fast and its numbers stable on shared 2-core machines (two
threads were several times slower there), and makes model outputs independent of the
machine's core count."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
