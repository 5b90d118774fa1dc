"""Shared test fixtures: where the golden C reference data lives."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """tests/golden (committed copy) or ../shared/golden beside the checkout."""
    for p in (ROOT / "tests" / "golden", ROOT.parent / "shared" / "golden"):
        if (p / "manifest.json").exists():
            return p
    pytest.skip("golden data not found (tests/golden or ../shared/golden)")


def golden_cases() -> list:
    return json.loads((golden_dir() / "manifest.json").read_text())["cases"]


@pytest.fixture
def c_binary():
    """Path of the nanoBragg C binary from NB_C_BIN; skips cleanly when unset."""
    b = os.environ.get("NB_C_BIN")
    if not b or not Path(b).exists():
        pytest.skip("NB_C_BIN not set: C reference binary unavailable")
    return b
