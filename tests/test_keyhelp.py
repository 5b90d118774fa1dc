"""``python -m nbsim --help``: every key of the schema with its meaning (the schema's comment) and unit."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from pipeline.keyhelp import field_comments, key_rows, keys_help, unit_of

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class _Example:
    a_mm: float = 1.0                 # first: with a # inside the comment
    b: str = "x # not a comment"      # second
    c: List[int] = field(default_factory=lambda: [1,   # third, over two lines
                                                   2])      # (not read)
    d: Optional[int] = None
    e: dict = field(default_factory=dict)  # fifth


def test_field_comments_are_read_with_tokenize():
    assert field_comments(_Example) == {"a_mm": "first: with a # inside the comment", "b": "second",
                                        "c": "third, over two lines", "e": "fifth"}


def test_units_from_the_name():
    assert [unit_of(n) for n in ("distance_mm", "wavelength_A", "cell_A_deg", "phi_deg", "thick_um",
                                 "hdivrange_mrad", "dispersion_pct", "fluence_ph_per_m2", "exposure_s",
                                 "orgx_px", "memory_budget_mb", "N", "shape")] == \
        ["mm", "Å", "Å, deg", "deg", "µm", "mrad", "%", "photons/m^2", "s", "pixels", "MB", "", ""]


def test_every_key_has_a_meaning():
    rows = key_rows()
    assert len(rows) > 90
    missing = [k for k, _t, _d, _u, meaning in rows if not meaning]
    assert missing == [], f"schema keys without a comment (nbsim/spec.py, pipeline/compose.py): {missing}"
    lines = keys_help().splitlines()
    for key, _t, _d, unit, meaning in rows:
        entry = _entry(lines, key)
        assert meaning.split()[-1] in entry, key
        if unit:
            assert f"[{unit}]" in entry, key


def _entry(lines, key):
    """The help text of ``key``: its line and the indented lines that continue it."""
    i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(key + " "))
    out = [lines[i]]
    for ln in lines[i + 1:]:
        if not ln.startswith(" " * 10):
            break
        out.append(ln.strip())
    return " ".join(out)


def test_cli_help_shows_keys_with_current_values():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "nbsim", "detector=xds", "crystal.N=7", "--help"],
                       cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "detector: adxv, custom, denzo, dials, mosflm, xds" in lines
    def line(key):
        return _entry(lines, key)
    assert line("crystal.N").split("=")[1].split()[0] == "7"
    assert line("detector.convention").split("=")[1].split()[0] == "xds"
    assert "[mm] sample -> beam spot along the beam" in line("detector.distance_mm")
    assert "[Å]" in line("beam.wavelength_A") and "null (float)" in line("detector.xbeam_mm")
    assert len([ln for ln in lines if ln.startswith("  ") and " = " in ln]) == len(key_rows())
