"""The golden parity bar, run in-process through the nanoBragg front end on all 25 C reference cases.

Same thresholds as ../shared/golden/parity.py (its ``compare`` is used verbatim): Pearson r >= 0.99999,
p99.9 |Δ|/max <= 1e-5, sums within 1e-4, int images ±1 on >= 99.9 %, noise images exact on >= 99 %.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from conftest import golden_cases, golden_dir
from nbsim.nanobragg import main as nanobragg_main


def _parity_module():
    gd = golden_dir()
    spec = importlib.util.spec_from_file_location("golden_parity", gd / "parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod




@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["id"])
def test_golden_parity(case, tmp_path, monkeypatch, capsys):
    gd = golden_dir()
    parity = _parity_module()
    for f in (gd / "inputs").iterdir():
        shutil.copy(f, tmp_path)
    outs = ["-floatfile", "float.bin", "-nopgm"]
    outs += ["-intfile", "int.img"] if "int" in case else []
    outs += ["-noisefile", "noise.img"] if "noise" in case else ["-nonoise"]
    monkeypatch.chdir(tmp_path)
    rc = nanobragg_main(case["args"] + outs + ["-noprogress"])
    assert rc in (0, None)
    ok, msg = parity.compare(case, gd, tmp_path)
    assert ok, f"{case['id']}: {msg}"
