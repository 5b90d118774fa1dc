"""``python -m nbsim.refine`` with per-panel keys (``detector.panels.<i>.origin_mm`` / ``rot_deg``, the
table ``nbsim.params.PANEL_PARAMS``): a panel moved by 0.05 mm along each lab axis is found again on
two 24x24-pixel panels (a few seconds), the fitted model reruns to the fitted pixels, and bad keys are
one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import nbsim
from nbsim.params import PANEL_PARAMS
from nbsim.refine.core import check_panel_keys, check_refine_keys
from nbsim.spec import SpecError, spec_from_dict
from pipeline.compose import compose_spec
from pipeline.refine import compose_refine, run_refine

ROOT = Path(__file__).resolve().parent.parent
# two 24x24 panels of 0.8 mm side by side at 60 mm (CrystFEL frame: beam +z)
GEOM = """res = 1250
clen = 0.06
coffset = 0
p0/min_fs = 0
p0/max_fs = 23
p0/min_ss = 0
p0/max_ss = 23
p0/fs = +1x
p0/ss = +1y
p0/corner_x = -24
p0/corner_y = -12
p1/min_fs = 0
p1/max_fs = 23
p1/min_ss = 0
p1/max_ss = 23
p1/fs = +1x
p1/ss = +1y
p1/corner_x = 1
p1/corner_y = -12
"""
BASE = ["crystal=triclinic", "detector.oversample=1", "device.compile=false"]
MODELS = {
    "geometry_file": ["detector.geometry_file=d.geom"],
    "panels": ["detector.fpixels=48", "detector.spixels=24", "detector.pixel_mm=0.8", "detector.distance_mm=60",
               "detector.panels=[{fpixels:24,spixels:24,offset_px:[0,0]},{fpixels:24,spixels:24,offset_px:[24,0]}]"],
}
KEY = "detector.panels.1.origin_mm"
DELTA_MM = np.array([0.05, 0.05, 0.05])      # the true panel 1 is moved by this from the start model
# Measured (noise-free float32 observation, Poisson loss): |fitted - true| <= 3.3e-6 mm on the
# normal (x) and 3e-7 mm in the plane, from the float32 rounding of the observed pixels; the fit's own
# sigmas are 1.7e-3 / 3e-4 mm. 2e-5 mm is 6x the largest measured error and 2500x below the 0.05 mm
# the fit has to move: a fit that stays at the start or stops half-way fails.
TOL_MM = 2e-5


def _setup(tmp_path, kind):
    (tmp_path / "d.geom").write_text(GEOM)
    model = BASE + MODELS[kind]
    spec, dev = compose_spec(model)
    start = nbsim.simulate(spec, dev, base_dir=str(tmp_path))
    o1 = np.asarray(start.panels[1].report.origin_mm)
    truth = nbsim.simulate(spec, dev, base_dir=str(tmp_path),
                           params={KEY: torch.tensor(o1 + DELTA_MM, dtype=torch.float64)})
    truth.float32().tofile(tmp_path / "obs.bin")           # the -floatfile layout: panel 0, then panel 1
    return model, spec, dev, o1, truth


@pytest.mark.parametrize("kind", ["geometry_file", "panels"])
def test_refine_finds_a_moved_panel(tmp_path, kind):
    model, spec, dev, o1, truth = _setup(tmp_path, kind)
    cfg = compose_refine(["observed=obs.bin", "observed.format=float", f"refine=[{KEY}]",
                          f"store.root={tmp_path / 'store'}"] + model)
    folder, reused, res = run_refine(cfg, tmp_path)
    p = res["params"][KEY]
    assert res["converged"], res["stop_reason"]
    assert np.allclose(p["start"], o1, rtol=0, atol=1e-12) and p["unit"] == "mm"
    err = np.asarray(p["value"]) - (o1 + DELTA_MM)
    assert np.abs(err).max() <= TOL_MM, err
    assert all(0 < s < 0.01 for s in p["sigma"])
    # the fitted model (one config, without the geometry file) gives the fitted panel's pixels
    doc = OmegaConf.to_container(OmegaConf.load(folder / "fitted.yaml"))
    fitted = spec_from_dict({k: doc[k] for k in ("detector", "beam", "crystal", "image", "fix") if k in doc})
    assert fitted.detector.geometry_file is None and len(fitted.detector.panels) == 2
    a = nbsim.simulate(fitted, dev, base_dir=str(tmp_path)).image
    b = nbsim.simulate(spec, dev, base_dir=str(tmp_path),
                       params={KEY: torch.tensor(p["value"], dtype=torch.float64)}).image
    assert float((a - b).abs().max()) == 0.0
    # the picture: both panels, stacked
    assert (folder / "residual.png").is_file()


def test_per_panel_keys_come_from_the_table():
    check_refine_keys([f"detector.panels.3.{k}" for k in PANEL_PARAMS] + ["detector.distance_mm"])
    with pytest.raises(SpecError) as e:
        check_refine_keys(["detector.panels.0.origin"])
    msg = str(e.value)
    assert msg.startswith("refine: detector.panels.0.origin: unknown per-panel key")
    assert all(f"detector.panels.<i>.{k}" in msg for k in PANEL_PARAMS)
    check_panel_keys(["detector.panels.1.rot_deg"], 2)
    with pytest.raises(SpecError, match=r"panel index 2 out of range: the detector has 2 panels \(0\.\.1\)"):
        check_panel_keys(["detector.panels.2.rot_deg"], 2)
    with pytest.raises(SpecError, match="needs a multi-panel detector"):
        check_panel_keys(["detector.panels.0.origin_mm"], None)


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "nbsim.refine", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("key,phrase", [
    ("detector.panels.2.origin_mm", "refine: detector.panels.2.origin_mm: panel index 2 out of range: the "
                                    "detector has 2 panels (0..1)"),
    ("detector.panels.0.shift_mm", "refine: detector.panels.0.shift_mm: unknown per-panel key; per-panel keys "
                                   "that can be refined: detector.panels.<i>.origin_mm, detector.panels.<i>.rot_deg"),
])
def test_cli_bad_panel_key_is_one_line_exit_2(tmp_path, key, phrase):
    (tmp_path / "d.geom").write_text(GEOM)
    (tmp_path / "obs.bin").write_bytes(np.zeros(2 * 24 * 24, np.float32).tobytes())
    q = _cli("observed=obs.bin", f"refine=[{key}]", *BASE, *MODELS["geometry_file"], cwd=tmp_path)
    lines = q.stderr.strip().splitlines()
    assert q.returncode == 2 and q.stdout == "" and len(lines) == 1, q.stderr
    assert lines[0].startswith("nbsim.refine: error: " + phrase), lines[0]
    assert not (tmp_path / "outputs").exists()


def test_smv_observed_with_panels_is_refused(tmp_path):
    from pipeline.compose import format_error
    (tmp_path / "d.geom").write_text(GEOM)
    (tmp_path / "obs.img").write_bytes(b"{\nHEADER_BYTES=512;\n" + b" " * 600)
    cfg = compose_refine(["observed=obs.img", f"refine=[{KEY}]", f"store.root={tmp_path / 'store'}"]
                         + BASE + MODELS["geometry_file"])
    with pytest.raises(SpecError) as e:
        run_refine(cfg, tmp_path)
    assert "with several panels the observed image is raw float32 in the -floatfile layout (1152 pixels" \
        in format_error(e.value)
