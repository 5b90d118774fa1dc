"""Detector geometry (pix0, beam centres, close point, axes, DIALS origin) against C stdout.

Golden stdout covers MOSFLM, XDS, DIALS, ADXV, DENZO and CUSTOM with both pivots; with NB_C_BIN set,
a grid of convention × pivot × rotation combinations is also checked against the live C program.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import golden_cases, golden_dir
from nbsim.experiment import build_model
from nbsim.frontend.argv import parse_argv

PAIRS = {  # stdout key -> (info key, scale from info units to C's printed units)
    "Xbeam": ("xbeam_mm", 1e-3), "Ybeam": ("ybeam_mm", 1e-3),
    "Fbeam": ("fbeam_mm", 1e-3), "Sbeam": ("sbeam_mm", 1e-3),
    "Xclose": ("xclose_mm", 1e-3), "Yclose": ("yclose_mm", 1e-3),
    "Fclose": ("fclose_mm", 1e-3), "Sclose": ("sclose_mm", 1e-3),
    "distance": ("distance_mm", 1e-3),
}
VECTORS = {"DIRECTION_OF_DETECTOR_X-AXIS": "fdet", "DIRECTION_OF_DETECTOR_Y-AXIS": "sdet",
           "DIRECTION_OF_DETECTOR_Z-AXIS": "odet", "INCIDENT_BEAM_DIRECTION": "beam",
           "spindle ROTATION_AXIS": "spindle", "dials origin": "dials_origin_mm",
           "POLARIZATION_PLANE_NORMAL": "polarization_plane_normal"}


def parse_stdout(text: str) -> dict:
    out = {}
    for m in re.finditer(r"\b(Xbeam|Ybeam|Fbeam|Sbeam|Xclose|Yclose|Fclose|Sclose|distance)=(\S+)", text):
        out.setdefault(m.group(1), float(m.group(2)))
    for line in text.splitlines():
        for key in VECTORS:
            if line.strip().startswith(key + "="):
                out[key] = [float(x) for x in line.split("=", 1)[1].split()]
    m = re.search(r"^(\w+) convention selected", text, re.M)
    out["convention"] = m.group(1)
    out["pivot"] = "sample" if "pivoting detector around sample" in text else "beam"
    return out


def close(a, b):
    # C prints %g (6 significant digits)
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b)) + 1e-9


def check(info, c):
    assert info["convention"] == c["convention"]
    assert info["pivot"] == c["pivot"]
    for key, (ik, scale) in PAIRS.items():
        assert close(info[ik] * scale, c[key]), (key, info[ik] * scale, c[key])
    for key, ik in VECTORS.items():
        for x, y in zip(info[ik], c[key]):
            assert close(x, y), (key, info[ik], c[key])


@pytest.mark.parametrize("case", [c for c in golden_cases() if int(c["id"][1:3]) <= 10 or c["id"] == "G22_energy_rect"],
                         ids=lambda c: c["id"])
def test_geometry_matches_golden_stdout(case):
    gd = golden_dir()
    c = parse_stdout((gd / case["stdout"]).read_text())
    spec = parse_argv(case["args"], cwd=str(gd / "inputs")).spec
    m = build_model(spec, base_dir=gd / "inputs")
    check(m.report.to_dict(), c)


GRID = [
    ["-mosflm"], ["-xds"], ["-dials"], ["-adxv"], ["-denzo"],
    ["-fdet_vector", "0", "0", "1", "-pivot", "beam"],
    ["-fdet_vector", "0", "0", "1", "-pivot", "sample"],
]
ROTS = [[], ["-detector_rotx", "3", "-detector_roty", "-2", "-detector_rotz", "5"],
        ["-twotheta", "12", "-detector_rotz", "1"], ["-Xbeam", "3.1", "-Ybeam", "4.4"],
        ["-ORGX", "20", "-ORGY", "9", "-close_distance", "80"]]


@pytest.mark.needs_c
@pytest.mark.parametrize("conv", GRID, ids=lambda a: "_".join(a).replace("-", ""))
@pytest.mark.parametrize("rot", ROTS, ids=lambda a: "_".join(a).replace("-", "") or "none")
def test_geometry_matches_live_c(conv, rot, c_binary, tmp_path):
    args = ["-cell", "80", "80", "80", "90", "90", "90", "-default_F", "1", "-N", "1",
            "-detpixels", "32", "-pixel", "0.5", "-distance", "90", "-oversample", "1"] + conv + rot
    p = subprocess.run([c_binary] + args + ["-floatfile", "f.bin", "-nopgm", "-nonoise", "-noprogress",
                                            "-intfile", "i.img"],
                       cwd=tmp_path, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-500:]
    c = parse_stdout(p.stdout)
    m = build_model(parse_argv(args + ["-nonoise"]).spec)
    check(m.report.to_dict(), c)
    from tests.test_echo import c_setup_lines
    assert m.report.echo() == c_setup_lines(p.stdout)          # the whole setup echo, as text
