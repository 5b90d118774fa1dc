"""Unit conversions as the C program rounds them (``nbsim.units``), from the command line to the
model's tensors and the SMV header.

Each value below is one where the algebraically equal form (``x * 1e-3``, ``x * π/180``) rounds
differently from C's ``atof(argv[i+1])/1000.0`` or ``/RTD``: the tests check that both forms differ
for it, so they would fail if the conversion went back to the other form."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from nbsim.experiment import build_model
from nbsim.frontend.argv import parse_argv
from nbsim.io.smv import parse_smv
from nbsim import units

RTD = 180.0 * (1.0 / math.pi)      # C: RTD = 180.0*M_1_PI


def _model(args):
    return build_model(parse_argv(args.split()).spec)


def test_conversions_are_the_c_expressions():
    assert units.RTD == 180.0 / math.pi
    for x in (0.369, 90.656, 102.4, 0.1, 1.2345):
        assert units.mm_to_m(x) == x / 1000.0
        assert units.mrad_to_rad(x) == x / 1000.0
        assert units.angstrom_to_m(x) == x / 1.0e10
        assert units.deg_to_rad(x) == x / RTD
        assert units.um_to_m(x) == x * 1e-6
        assert units.water_um_to_m(x) == x / 1e6
        assert units.percent_to_fraction(x) == x / 100.0
    t = torch.tensor(0.369, dtype=torch.float64, requires_grad=True)
    units.mm_to_m(t).backward()
    assert t.grad == 1.0 / 1000.0


def test_lengths_wavelength_and_angles_reach_the_model_as_c_rounds_them():
    # each value rounds differently through the other form (what the test guards against)
    assert 0.369 / 1000.0 != 0.369 * 1e-3
    assert 90.656 / 1000.0 != 90.656 * 1e-3
    m = _model("-cell 100 100 100 90 90 90 -default_F 10 -N 2 -lambda 1 -detpixels 16 "
               "-pixel 0.369 -distance 90.656")
    assert m.pixel_m.item() == 0.369 / 1000.0
    assert m.distance_m.item() == 90.656 / 1000.0
    phi = 0.39                          # φ0 = phi/RTD; back in degrees exactly 0.39
    assert (phi * (math.pi / 180.0)) * RTD != phi
    m = _model(f"-cell 100 100 100 90 90 90 -default_F 10 -N 2 -lambda 1 -detpixels 16 -phi {phi} "
               "-osc 0.1")
    assert m.report.phi_values_deg[0] == phi


@pytest.mark.needs_c
def test_smv_header_equals_c_where_the_pixel_size_rounding_showed(tmp_path, c_binary):
    """49 pixels of 0.369 mm and ORGY 43.315 put ADXV_CENTER_Y on a %g tie (2.282265): with the pixel
    size converted as 0.369·1e-3 the header said 2.28226, C says 2.28227 (and the max_I line's
    position differed in the 6th digit the same way)."""
    args = ("-cell 100 100 100 90 90 90 -default_F 10 -N 1 -lambda 1.357 -dials -detpixels_f 30 "
            "-detpixels_s 49 -pixel 0.369 -distance 90.656 -ORGX 6.333 -ORGY 43.315 -nonoise -nopgm "
            "-intfile int.img -noprogress").split()
    out = {}
    for who, cmd in (("c", [c_binary]), ("nb", [sys.executable, "-m", "nbsim.nanobragg"])):
        d = tmp_path / who
        d.mkdir()
        p = subprocess.run(cmd + args, cwd=d, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        header = parse_smv((d / "int.img").read_bytes())[0]
        out[who] = (header, [ln for ln in p.stdout.splitlines() if ln.startswith("max_I")])
    assert out["nb"] == out["c"]
    assert out["c"][0]["ADXV_CENTER_Y"] == "2.28227"
