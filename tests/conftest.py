"""Shared test fixtures: where the golden C reference data lives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import golden_data

ROOT = Path(__file__).resolve().parents[1]

# compiled kernels are compiled in the test process (torch.compile), not taken from or built into
# the user's ahead-of-time kernel cache; tests/test_kernel_cache.py points it at a folder of its own
os.environ.setdefault("NBSIM_KERNEL_CACHE", "off")


def golden_dir() -> Path:
    """tests/golden (the committed copy; see golden_data.py, the one loader of the golden set)."""
    try:
        return golden_data.golden_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def golden_cases() -> list:
    """The manifest entries of the golden cases (``golden_data.cases``)."""
    golden_dir()
    return golden_data.cases()


@pytest.fixture
def c_binary():
    """Path of the nanoBragg C binary from NB_C_BIN; skips cleanly when unset."""
    b = os.environ.get("NB_C_BIN")
    if not b or not Path(b).exists():
        pytest.skip("NB_C_BIN not set: C reference binary unavailable")
    return b
