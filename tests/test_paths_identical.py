"""The Hydra app, the Python API and the nanoBragg front end give bit-identical images for the same physics."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from nbsim.api import simulate
from nbsim.frontend.to_argv import spec_to_argv
from nbsim.nanobragg import main as nanobragg_main
from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec, ExperimentSpec

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = ["detector=custom", "pivot=beam", "crystal=triclinic", "beam=divergent",
             "detector.fpixels=40", "detector.spixels=32", "detector.pixel_mm=0.5",
             "crystal.mosaic_deg=0.3", "crystal.mosaic_domains=3", "crystal.phi_deg=0",
             "crystal.osc_deg=1", "crystal.phisteps=2", "beam.kahn_factor=0.5"]


def api_spec() -> ExperimentSpec:
    """The same experiment written by hand with the Python API (values from conf/ + OVERRIDES)."""
    return ExperimentSpec(
        detector=DetectorSpec(convention="custom", pivot="beam", distance_mm=100.0, pixel_mm=0.5,
                              fpixels=40, spixels=32, fdet_vector=[0.0, 0.0, 1.0],
                              sdet_vector=[0.0, -1.0, 0.0], odet_vector=[1.0, 0.0, 0.0],
                              twotheta_axis=[0.0, 0.0, -1.0], rotx_deg=5.0, roty_deg=3.0, rotz_deg=2.0,
                              twotheta_deg=5.0),
        beam=BeamSpec(wavelength_A=1.0, hdivrange_mrad=1.0, vdivrange_mrad=1.0, hdivsteps=3, vdivsteps=3,
                      kahn_factor=0.5),
        crystal=CrystalSpec(cell_A_deg=[70.0, 80.0, 90.0, 75.0, 85.0, 95.0], misset_deg=[10.0, 20.0, 30.0],
                            N=4, default_F=100.0, mosaic_deg=0.3, mosaic_domains=3, phi_deg=0.0,
                            osc_deg=1.0, phisteps=2),
    )


def test_hydra_api_frontend_bit_identical(tmp_path, monkeypatch):
    # 1. Hydra app, as a user runs it
    store = tmp_path / "store"
    p = subprocess.run([sys.executable, "-m", "nbsim", *OVERRIDES, f"store.root={store}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    folder = Path(p.stdout.strip().splitlines()[-1])
    hydra_img = np.fromfile(folder / "float.bin", dtype=np.float32)

    # 2. Python API
    spec = api_spec()
    api_img = simulate(spec).float32().reshape(-1)

    # 3. nanoBragg front end, from the spec's own argv
    work = tmp_path / "fe"
    work.mkdir()
    monkeypatch.chdir(work)
    assert nanobragg_main(spec_to_argv(spec) + ["-floatfile", "f.bin", "-nonoise", "-nopgm",
                                                "-noprogress"]) == 0
    fe_img = np.fromfile(work / "f.bin", dtype=np.float32)

    assert api_img.max() > 0
    assert hydra_img.tobytes() == api_img.tobytes()
    assert fe_img.tobytes() == api_img.tobytes()
