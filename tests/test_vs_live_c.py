"""Extra parity cases against the live C program (NB_C_BIN), beyond the stored golden set.

Each case runs the C binary (single thread) and the nbsim front end in fresh folders and applies
the golden parity bar to the float image (and the int image).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import golden_dir

BASE = ["-default_F", "100", "-lambda", "1", "-distance", "100", "-detpixels", "64", "-pixel", "0.4"]
CUBIC = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5"]
TRI = ["-cell", "60", "70", "80", "80", "95", "105", "-N", "4", "-misset", "7", "-13", "22"]

CASES = {
    "phi_nonzero_start": TRI + ["-phi", "10", "-osc", "3", "-phisteps", "3"],
    "phi_crosses_zero": TRI + ["-phi", "-1", "-osc", "2", "-phisteps", "2"],
    "phistep_only": CUBIC + ["-phistep", "0.5"],
    "osc_zero": CUBIC + ["-osc", "0"],
    "spindle_custom": TRI + ["-spindle_axis", "0", "1", "1", "-phi", "5", "-osc", "4", "-phisteps", "2"],
    "mosaic_default_domains": TRI + ["-mosaic", "0.5", "-mosaic_seed", "3"],
    "mosaic_phi0_carry": CUBIC + ["-mosaic", "1", "-mosaic_dom", "5", "-phi", "0", "-osc", "1"],
    "square_div": CUBIC + ["-divergence", "2", "-divsteps", "4", "-square_div"],
    "hdiv_vdiv": CUBIC + ["-hdivrange", "1", "-vdivrange", "3", "-hdivsteps", "2", "-vdivsteps", "3"],
    "divstep_only": CUBIC + ["-hdivrange", "1", "-hdivstep", "0.4"],
    "dispersion_default_steps": CUBIC + ["-dispersion", "2"],
    "dmin": CUBIC + ["-dmin", "6", "-dispersion", "1", "-dispsteps", "2"],
    "polar_custom": TRI + ["-polar", "0.6", "-polar_vector", "0", "1", "0"],
    "thick_only": CUBIC + ["-detector_thick", "200", "-twotheta", "15"],
    "thick_abs_os2": CUBIC + ["-detector_thick", "100", "-detector_abs", "300", "-thicksteps", "4",
                              "-oversample", "2"],
    "oversample_omega": CUBIC + ["-oversample", "2", "-oversample_omega"],
    "oversample_polar_thick": CUBIC + ["-oversample", "2", "-oversample_polar", "-oversample_thick",
                                       "-detector_thick", "100"],
    "water_only": CUBIC + ["-water", "30", "-fluence", "1e24"],
    "round_fudge_mosaic": TRI + ["-round_xtal", "-fudge", "0.5", "-mosaic", "0.3", "-mosaic_dom", "4"],
    "gauss_mat": ["-mat", "A.mat", "-N", "4", "-gauss_xtal", "-default_F", "10"],
    "tophat_hkl": ["-mat", "A.mat", "-hkl", "P1.hkl", "-N", "4", "-tophat_spots", "-misset", "3", "2", "1"],
    "hkl_interp_forced": ["-mat", "A.mat", "-hkl", "P1.hkl", "-N", "5", "-interpolate"],
    "hkl_nointerp_small_N": ["-mat", "A.mat", "-hkl", "P1.hkl", "-N", "2", "-nointerpolate"],
    "xtalsize_axes": ["-cell", "50", "60", "70", "90", "90", "90", "-sample_thick", "0.0003",
                      "-sample_width", "0.0002", "-sample_height", "0.0005", "-beamsize", "0.0004"],
    "rect_detector_xds": CUBIC + ["-xds", "-detpixels_f", "70", "-detpixels_s", "50", "-ORGX", "30",
                                  "-ORGY", "20", "-twotheta", "8"],
    "detsize": CUBIC + ["-detsize", "30", "-pixel", "0.35"],
    "close_distance_sample": CUBIC + ["-close_distance", "90", "-pivot", "sample", "-fdet_vector", "0",
                                      "0", "1", "-detector_rotx", "4"],
    "curved_rot": CUBIC + ["-curved_det", "1", "-detector_roty", "3"],
    "point_pixel_rot": CUBIC + ["-point_pixel", "-detector_rotz", "10"],
    "sourcefile_div": CUBIC + ["-sourcefile", "sources.txt", "-polar", "0.3"],
    "roi_interp": ["-mat", "A.mat", "-hkl", "P1.hkl", "-N", "2", "-roi", "10", "40", "5", "50"],
    "flux_beamsize": CUBIC + ["-flux", "1e12", "-exposure", "2", "-beamsize", "0.05"],
    "energy_dispersion": CUBIC + ["-energy", "12000", "-dispersion", "0.5", "-dispsteps", "3"],
    "mosflm_beam_twotheta": TRI + ["-Xbeam", "10", "-Ybeam", "14", "-twotheta", "5"],
    "adxv_rot": TRI + ["-adxv", "-detector_rotx", "2", "-Xbeam", "11"],
    "denzo_mosaic": TRI + ["-denzo", "-mosaic", "0.2", "-mosaic_dom", "3"],
    "dials_rot_twotheta": CUBIC + ["-dials", "-detector_rotx", "2", "-twotheta", "3"],
    "custom_beam_vector": CUBIC + ["-beam_vector", "1", "0.02", "0.01", "-polar", "0.5"],
    "nopolar_os_polar": CUBIC + ["-nopolar", "-oversample_polar", "-oversample", "2"],
}


def _run(cmd, cwd, args, outs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + args + outs, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, (cmd, p.stdout[-800:], p.stderr[-800:])


def _smv(path, npix):
    """SMV pixel data: the last 2·npix bytes (C's header can overflow its declared 512 bytes)."""
    raw = path.read_bytes()
    return np.frombuffer(raw[len(raw) - 2 * npix:], dtype="<u2").astype(int)


@pytest.mark.needs_c
@pytest.mark.parametrize("name", sorted(CASES))
def test_live_c_parity(name, c_binary, tmp_path):
    args = (BASE if "-mat" not in CASES[name] else BASE[2:]) + CASES[name]
    outs = ["-floatfile", "float.bin", "-intfile", "int.img", "-nopgm", "-nonoise", "-noprogress"]
    res = {}
    for who, cmd in (("c", [c_binary]), ("nb", [sys.executable, "-m", "nbsim.nanobragg"])):
        d = tmp_path / who
        d.mkdir()
        for f in (golden_dir() / "inputs").iterdir():
            shutil.copy(f, d)
        _run(cmd, d, args, outs)
        img = np.fromfile(d / "float.bin", dtype="<f4").astype(float)
        res[who] = (img, _smv(d / "int.img", img.size), (d / "int.img").read_bytes())
    (ref, ref_int, ref_raw), (got, got_int, got_raw) = res["c"], res["nb"]
    assert got.size == ref.size
    mx = max(np.abs(ref).max(), 1e-30)
    p999 = float(np.quantile(np.abs(got - ref) / mx, 0.999))
    r = float(np.corrcoef(got, ref)[0, 1]) if ref.std() > 0 else float(np.allclose(got, ref))
    sr = float(got.sum() / ref.sum()) if ref.sum() else 1.0
    assert r >= 0.99999 and p999 <= 1e-5 and abs(sr - 1) <= 1e-4, (name, r, p999, sr)
    assert np.mean(np.abs(got_int - ref_int) <= 1) >= 0.999
    assert len(got_raw) == len(ref_raw)          # same SMV header length
