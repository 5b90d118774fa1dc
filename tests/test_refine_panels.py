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
from crystfel_geom import geom, panel

ROOT = Path(__file__).resolve().parent.parent
# two 24x24 panels of 0.8 mm side by side at 60 mm (CrystFEL frame: beam +z)
GEOM = geom(panel("p0", 24, 24, "+1x", "+1y", -24, -12), panel("p1", 24, 24, "+1x", "+1y", 1, -12),
            res=1250, clen=0.06, coffset=0)
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


# ---------------------------------------------------------------------------------------------
# per-panel SMV files as the observation (what -intfile and the store's int.img write)
# ---------------------------------------------------------------------------------------------

def _per_panel_smv(tmp_path, truth, name="i.img"):
    """The truth written as the front end's -intfile / the store's smv format writes it (one SMV per
    panel, <stem>_<panel>.img, the whole detector's scale); returns that scale."""
    from nbsim.io.products import write_panels
    from nbsim.panels import panel_file_tags
    tags = panel_file_tags([p.name for p in truth.panels])
    out = write_panels(truth.panel_float32(), [p.roi_mask for p in truth.panels], truth.info,
                       {"adc": 40.0, "int_scale": None}, tags, int_path=str(tmp_path / name))
    return out["intfile_scale"]


def test_per_panel_smv_observation_forms_read_the_panels_in_geometry_order(tmp_path):
    import fabio
    from pipeline.refine import build_problem, observed_files, refine_settings
    model, spec, dev, o1, truth = _setup(tmp_path, "geometry_file")
    scale = _per_panel_smv(tmp_path, truth)
    counts = [fabio.open(str(tmp_path / f"i_{n}.img")).data.astype(np.float64) for n in ("p0", "p1")]
    assert all(c.shape == (24, 24) for c in counts) and counts[1].max() > 1000
    want = np.concatenate([((c - 40.0) / scale).reshape(-1) for c in counts])
    start = nbsim.simulate(spec, dev, base_dir=str(tmp_path))
    from pipeline.store import entry_panels
    panels = entry_panels(spec, base_dir=tmp_path)
    obs = {}
    for form in ("observed=i.img", "observed=[[i_p0.img,i_p1.img]]"):
        cfg = compose_refine([form, f"observed.scale={scale!r}", f"refine=[{KEY}]"] + model)
        settings = refine_settings(cfg)
        problem, _ = build_problem(spec, dev, settings, tmp_path, start, panels)
        (im,) = problem.images
        obs[form] = im.obs.numpy()
        assert im.obs.shape == (2 * 24 * 24,) and float(np.abs(obs[form] - want).max()) == 0.0, form
        assert [f.name for f in observed_files(settings["observed"]["paths"][0], tmp_path, ["p0", "p1"])] == \
            ["i_p0.img", "i_p1.img"]
    # the list is taken in its order (geometry order is the user's to give): swapped panels differ
    cfg = compose_refine(["observed=[[i_p1.img,i_p0.img]]", f"observed.scale={scale!r}", f"refine=[{KEY}]"] + model)
    swapped = build_problem(spec, dev, refine_settings(cfg), tmp_path, start, panels)[0].images[0].obs.numpy()
    assert np.array_equal(swapped[:576], want[576:]) and not np.array_equal(swapped, want)


def test_refine_from_per_panel_smv_finds_the_moved_panel(tmp_path):
    model, spec, dev, o1, truth = _setup(tmp_path, "geometry_file")
    scale = _per_panel_smv(tmp_path, truth)
    cfg = compose_refine(["observed=i.img", f"observed.scale={scale!r}", f"refine=[{KEY}]",
                          f"store.root={tmp_path / 'store'}"] + model)
    folder, reused, res = run_refine(cfg, tmp_path)
    p = res["params"][KEY]
    assert res["converged"], res["stop_reason"]
    err = np.asarray(p["value"]) - (o1 + DELTA_MM)
    assert np.abs(err).max() <= SMV_TOL_MM, err
    assert len(res["observed_sha256"]) == 1 and res["observed_sha256"][0].count("+") == 1


# counts rounded to whole numbers (scale ~8.5 counts per photon): measured |fitted - true| 7.3e-6 mm
# (sigmas 1.7e-3 / 3e-4 mm); 5e-5 mm is 7x that and 1000x below the 0.05 mm the fit has to move
SMV_TOL_MM = 5e-5


@pytest.mark.parametrize("form,phrase", [
    ("observed=[[i_p0.img,i_p1.img,i_p1.img]]", "observed: 3 per-panel files ['i_p0.img', 'i_p1.img', 'i_p1.img'] "
                                                "for a detector of 2 panels (p0, p1 in geometry order): give one "
                                                "file per panel"),
    ("observed=j.img", "observed: j.img: no such file, nor the per-panel files j_<panel>.img of the 2 panels "
                       "(p0, p1): missing j_p1.img"),
    ("observed=[[i_p0.img,small.img]]", "small.img: image is 8x8 pixels (fast x slow), panel p1 of the geometry "
                                        "is 24x24"),
])
def test_per_panel_files_that_do_not_match_the_geometry_are_one_line(tmp_path, form, phrase):
    from pipeline.compose import format_error
    from nbsim.io.smv import smv_bytes
    model, spec, dev, o1, truth = _setup(tmp_path, "geometry_file")
    _per_panel_smv(tmp_path, truth)
    (tmp_path / "j_p0.img").write_bytes((tmp_path / "i_p0.img").read_bytes())
    hdr = dict(truth.info, fpixels=8, spixels=8)
    from nbsim.panels import panel_header_info
    (tmp_path / "small.img").write_bytes(smv_bytes(np.zeros((8, 8), np.uint16), dict(panel_header_info(hdr, 1),
                                                                                      fpixels=8, spixels=8)))
    cfg = compose_refine([form, f"refine=[{KEY}]", f"store.root={tmp_path / 'store'}"] + model)
    with pytest.raises(SpecError) as e:
        run_refine(cfg, tmp_path)
    msg = format_error(e.value)
    assert "\n" not in msg and phrase in msg, msg
    assert not (tmp_path / "store").exists()


def test_cli_per_panel_count_mismatch_is_one_line_exit_2(tmp_path):
    (tmp_path / "d.geom").write_text(GEOM)
    (tmp_path / "a.img").write_bytes(b"x")
    q = _cli("observed=[[a.img]]", f"refine=[{KEY}]", *BASE, *MODELS["geometry_file"], cwd=tmp_path)
    lines = q.stderr.strip().splitlines()
    assert q.returncode == 2 and q.stdout == "" and len(lines) == 1, q.stderr
    assert lines[0] == ("nbsim.refine: error: observed: 1 per-panel files ['a.img'] for a detector of 2 panels "
                        "(p0, p1 in geometry order): give one file per panel"), lines[0]
