"""NeXus NXmx and CBF output, read back with independent readers (nxmx + h5py, fabio).

The reference values are the run's own geometry (``build_model(spec).report.to_dict()``: what the engine
simulates with), never the writer's output; the NeXus geometry is rebuilt from the transformation
chain by ``nxmx`` (distance and beam centre from where the +z beam meets the module plane), and the
frame mapping is checked against the ``dials origin`` nanoBragg C prints (golden stdout).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
nxmx = pytest.importorskip("nxmx")
fabio = pytest.importorskip("fabio")

from conftest import golden_cases, golden_dir  # noqa: E402
from nbsim.experiment import build_model  # noqa: E402
from nbsim.frontend import parse_argv  # noqa: E402
from nbsim.io.images import count_image, read_float  # noqa: E402
from nbsim.io.nexus import PanelGeometry, mcstas_rotation, nexus_bytes, panels_from_info  # noqa: E402
from nbsim.io.smv import read_smv  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MCSTAS_TO_IMGCIF = np.diag([-1.0, 1.0, -1.0])      # dxtbx's conversion (NeXus McStas -> imgCIF)
REL = 1e-6

RUN = ("-cell 100 100 100 90 90 90 -default_F 100 -lambda 1.3 -distance 120 -detpixels_f 48 "
       "-detpixels_s 40 -pixel 0.15 -Xbeam 3.1 -Ybeam 2.7 -N 5 -phi 12 -osc 0.4 -exposure 2.5 "
       "-scale 1e7 -nopgm -nonoise").split()


def _env():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(module, args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(), text=True,
                          capture_output=True, timeout=300)


def _close(a, b, rel=REL):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.allclose(a, b, rtol=rel, atol=0.0)


def read_nexus(path):
    """Geometry and data of an NXmx file through the nxmx reader: per module the corner of the first
    pixel, unit axes and pixel size (McStas, mm), plus where the +z beam meets the module's plane."""
    with h5py.File(path, "r") as f:
        entry = nxmx.NXmx(f).entries[0]
        assert entry.definition == "NXmx"
        inst = entry.instruments[0]
        det = inst.detectors[0]
        beam = inst.beams[0]
        sample = entry.samples[0]
        modules = []
        for m in det.modules:
            A = nxmx.get_cumulative_transformation(nxmx.get_dependency_chain(m.fast_pixel_direction.depends_on))
            origin = A[0, :3, 3]
            fast = np.asarray(m.fast_pixel_direction.vector, float)
            slow = np.asarray(m.slow_pixel_direction.vector, float)
            px_f = m.fast_pixel_direction[()].to("mm").magnitude.item()
            px_s = m.slow_pixel_direction[()].to("mm").magnitude.item()
            n = np.cross(fast, slow)
            t = np.dot(origin, n) / n[2]                 # the beam (+z from the sample) meets the plane
            hit = np.array([0.0, 0.0, t]) - origin
            modules.append(dict(origin=origin, fast=fast, slow=slow, px_f=px_f, px_s=px_s, distance=t,
                                beam_f_px=np.dot(hit, fast) / px_f, beam_s_px=np.dot(hit, slow) / px_s,
                                data_origin=tuple(m.data_origin), data_size=tuple(m.data_size)))
        chain = nxmx.get_dependency_chain(sample.depends_on)
        axes = nxmx.get_rotation_axes(chain)
        phi = sample.depends_on
        out = dict(
            modules=modules, data=f["/entry/data/data"][()],
            wavelength=beam.incident_wavelength.to("angstrom").magnitude,
            weights=f["/entry/instrument/beam"].get("incident_wavelength_weights"),
            distance=None if det.distance is None else det.distance.to("mm").magnitude,
            beam_center=(None if det.beam_center_x is None else
                         (det.beam_center_x.magnitude, det.beam_center_y.magnitude)),
            count_time=det.count_time.to("s").magnitude, spindle=axes.axes[0], phi=axes.angles[0],
            phi_end=phi.end[0].magnitude if phi.end is not None else None,
            phi_inc=phi.increment_set.to("deg").magnitude,
            filters=f["/entry/data/data"]._filters)
        if out["weights"] is not None:
            out["weights"] = out["weights"][()]
    return out


def _true_direct_beam(info):
    """Where the beam meets the detector plane, from the run's pixel geometry (nbsim frame, mm)."""
    o = np.asarray(info["pix0_m"]) * 1e3
    f, s, b = (np.asarray(info[k]) for k in ("fdet", "sdet", "beam"))
    n = np.cross(f, s)
    t = np.dot(o, n) / np.dot(b, n)
    return t, np.dot(t * b - o, f), np.dot(t * b - o, s)


def cbf_header(cbf):
    """The miniCBF header of a fabio image, parsed by fabio's PilatusHeader."""
    from fabio.cbfimage import PilatusHeader
    assert cbf.header["_array_data.header_convention"] == "GENERIC_MINI"
    return PilatusHeader(cbf.header["_array_data.header_contents"])


def check_geometry(nx, info, module=0):
    """The NeXus geometry equals the run's (distance, pixel size, beam centre, frame).

    The run's reported distance/beam centre ignore two-theta under the faithful quirk
    ``ratio_ignores_twotheta``; the file carries the simulated geometry, so there the reference is
    the plane of the run's pixels (and ``test_nexus_geometry_every_convention`` also checks the run
    with the quirk fixed against its reported values)."""
    m = nx["modules"][module]
    R = mcstas_rotation(info["beam"])
    assert abs(np.linalg.det(R) - 1.0) < 1e-12 and np.allclose(R @ R.T, np.eye(3), atol=1e-12)
    q = info["quirks"]
    quirky = info["twotheta_deg"] != 0 and q != "physical" and "ratio_ignores_twotheta" not in q
    dist, fbeam, sbeam = (_true_direct_beam(info) if quirky else
                          (info["distance_mm"], info["fbeam_mm"], info["sbeam_mm"]))
    assert _close(m["distance"], dist) and _close(nx["distance"], dist)
    assert _close([m["px_f"], m["px_s"]], [info["pixel_mm"]] * 2)
    px = info["pixel_mm"]
    assert _close([m["beam_f_px"] * px, m["beam_s_px"] * px], [fbeam, sbeam])
    assert _close(np.asarray(nx["beam_center"]) * px, [fbeam, sbeam])
    assert np.allclose(m["origin"], R @ (np.asarray(info["pix0_m"]) * 1e3), rtol=0, atol=1e-9)
    assert np.allclose(m["fast"], R @ np.asarray(info["fdet"]), atol=1e-12)
    assert np.allclose(m["slow"], R @ np.asarray(info["sdet"]), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# front end
# ---------------------------------------------------------------------------------------------

def test_frontend_writes_nexus_and_cbf(tmp_path):
    r = _run("nbsim.nanobragg", RUN + ["--nexus", "o.nxs", "--cbf", "o.cbf"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "writing o.nxs as NeXus NXmx (float32)" in r.stdout
    info = build_model(parse_argv(RUN).spec).report.to_dict()
    S, F = 40, 48
    img = read_float(tmp_path / "floatimage.bin", F, S)

    nx = read_nexus(tmp_path / "o.nxs")
    assert nx["data"].dtype == np.float32 and nx["data"].shape == (1, S, F)
    assert np.array_equal(nx["data"][0], img)                       # bit-identical float image
    check_geometry(nx, info)
    assert _close(nx["distance"], info["distance_mm"]) and _close(nx["distance"], 120.0)
    assert _close(nx["wavelength"], 1.3) and nx["weights"] is None
    assert _close(nx["beam_center"], [info["fbeam_mm"] / 0.15, info["sbeam_mm"] / 0.15])
    assert _close(nx["count_time"], 2.5)
    assert _close([nx["phi"], nx["phi_end"], nx["phi_inc"]], [12.0, 12.4, 0.4])
    # DIALS reads the module origin through diag(-1, 1, -1): nanoBragg's DIALS_ORIGIN
    hdr, smv = read_smv(tmp_path / "intimage.img")
    dials = [float(x) for x in hdr["DIALS_ORIGIN"].split(",")]
    assert np.allclose(MCSTAS_TO_IMGCIF @ nx["modules"][0]["origin"], info["dials_origin_mm"], rtol=1e-12, atol=1e-9)
    assert np.allclose(MCSTAS_TO_IMGCIF @ nx["modules"][0]["origin"], dials, rtol=1e-5)   # %g in the header
    assert np.allclose(MCSTAS_TO_IMGCIF @ nx["spindle"], [info["spindle"][2], info["spindle"][1], -info["spindle"][0]])

    cbf = fabio.open(str(tmp_path / "o.cbf"))
    counts = count_image(img, 1e7, 40.0)
    assert cbf.data.dtype == np.int32 and np.array_equal(cbf.data, counts)
    assert counts.max() > 65535                                    # past 16 bits, not clipped
    low = counts <= 65535
    assert np.array_equal(counts[low], smv[low].astype(np.int32))  # the SMV int image where it fits
    assert (smv[~low] == 65535).all() and (~low).sum() > 0
    h = cbf_header(cbf)
    assert _close(h["Pixel_size"], [0.15e-3, 0.15e-3])
    assert _close(h["Detector_distance"], info["distance_mm"] * 1e-3)
    assert _close(h["Wavelength"], 1.3)
    assert _close(h["Beam_xy"], [info["fbeam_mm"] / 0.15, info["sbeam_mm"] / 0.15])
    assert _close([h["Exposure_time"], h["Start_angle"], h["Angle_increment"], h["Phi"], h["Phi_increment"]],
                  [2.5, 12.0, 0.4, 12.0, 0.4])


def test_frontend_nexus_int32_bslz4(tmp_path):
    r = _run("nbsim.nanobragg", RUN + ["--nexus=c.nxs", "--nexus-dtype", "int32",
                                       "--nexus-compression", "bslz4"], tmp_path)
    assert r.returncode == 0, r.stderr
    import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading)
    img = read_float(tmp_path / "floatimage.bin", 48, 40)
    nx = read_nexus(tmp_path / "c.nxs")
    assert 32008 in nx["filters"] or "32008" in nx["filters"]       # bitshuffle
    assert nx["data"].dtype == np.int32
    counts = count_image(img, 1e7, 40.0)
    assert counts.max() > 65535 and np.array_equal(nx["data"][0], counts)
    check_geometry(nx, build_model(parse_argv(RUN).spec).report.to_dict())


@pytest.mark.parametrize("extra,flag", [
    (["--nexus", "nodir/o.nxs"], "--nexus"),
    (["--cbf", "."], "--cbf"),
    (["--nexus-dtype", "int16", "--nexus", "o.nxs"], "--nexus-dtype"),
    (["--nexus-compression", "gzip", "--nexus", "o.nxs"], "--nexus-compression"),
])
def test_frontend_bad_outputs(tmp_path, monkeypatch, capsys, extra, flag):
    from nbsim import nanobragg
    monkeypatch.chdir(tmp_path)
    assert nanobragg.main(RUN + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nbsim.nanobragg: error: {flag}"), err
    assert list(tmp_path.iterdir()) == []                          # nothing written


# ---------------------------------------------------------------------------------------------
# frames and geometry for every convention
# ---------------------------------------------------------------------------------------------

def _golden_info(case_id, extra=()):
    case = next(c for c in golden_cases() if c["id"] == case_id)
    spec = parse_argv(list(case["args"]) + list(extra), cwd=str(golden_dir() / "inputs")).spec
    return build_model(spec, base_dir=str(golden_dir() / "inputs")).report.to_dict()


@pytest.mark.parametrize("case_id", ["G01_cubic", "G04_mosflm_beamcenter", "G05_xds_orgx_rot",
                                     "G06_dials_twotheta", "G07_adxv", "G08_denzo_rotz",
                                     "G09_custom_pivot_sample", "G10_custom_pivot_beam_pix0"])
def test_nexus_geometry_every_convention(tmp_path, case_id):
    """Distance, pixel size and beam centre from the nxmx transformation chain equal the run's for
    every convention (tilted and two-theta detectors included); with the beam along +x (MOSFLM,
    DENZO, CUSTOM) the origin DIALS reads is the ``dials origin`` nanoBragg C prints."""
    info = _golden_info(case_id)
    p = tmp_path / "g.nxs"
    p.write_bytes(nexus_bytes(np.zeros((info["spixels"], info["fpixels"]), np.float32), info))
    nx = read_nexus(p)
    check_geometry(nx, info)
    if info["beam"] == [1.0, 0.0, 0.0]:
        text = (golden_dir() / f"{case_id}.stdout.txt").read_text()
        c_origin = [float(x) for x in re.search(r"dials origin=\s*(\S+) (\S+) (\S+)", text).groups()]
        assert np.allclose(MCSTAS_TO_IMGCIF @ nx["modules"][0]["origin"], c_origin, rtol=1e-5, atol=1e-4)
    else:
        assert case_id in ("G05_xds_orgx_rot", "G06_dials_twotheta", "G07_adxv")
    if info["twotheta_deg"] != 0:
        fixed = _golden_info(case_id, ["--fix", "ratio_ignores_twotheta"])
        assert "ratio_ignores_twotheta" in str(fixed["quirks"])
        p.write_bytes(nexus_bytes(np.zeros((info["spixels"], info["fpixels"]), np.float32), fixed))
        check_geometry(read_nexus(p), fixed)          # the reported values themselves


def test_nexus_spectrum():
    """Several wavelengths: incident_wavelength is the spectrum, with weights (sum 1)."""
    spec = parse_argv("-cell 100 100 100 90 90 90 -default_F 100 -lambda 1 -distance 100 -detpixels 16 "
                      "-N 5 -dispersion 2 -dispsteps 5 -divergence 1 -divsteps 3".split()).spec
    info = build_model(spec).report.to_dict()
    lam = np.array([r[0] for r in info["spectrum_A"]])
    assert lam.size == 5
    import io
    nx = read_nexus(io.BytesIO(nexus_bytes(np.zeros((16, 16), np.float32), info)))
    assert np.array_equal(nx["wavelength"], lam)
    assert np.allclose(nx["weights"], 0.2, rtol=1e-12) and abs(nx["weights"].sum() - 1) < 1e-12
    assert abs(np.dot(nx["weights"], nx["wavelength"]) - 1.0) < 1e-12


def test_nexus_panel_list():
    """A list of panel records: two halves of a tilted detector, each an NXdetector_module, give the
    pixel positions and data of the single-panel file."""
    info = _golden_info("G09_custom_pivot_sample")
    S, F = info["spixels"], info["fpixels"]
    img = np.random.default_rng(1).random((S, F)).astype(np.float32)
    one = panels_from_info(info)[0]
    h = S // 2
    top = PanelGeometry(F, h, one.pixel_mm, one.fdet, one.sdet, one.origin_mm, "top")
    shift = np.asarray(one.origin_mm) + h * one.pixel_mm * np.asarray(one.sdet)
    bottom = PanelGeometry(F, S - h, one.pixel_mm, one.fdet, one.sdet, tuple(shift), "bottom")
    import io
    single = read_nexus(io.BytesIO(nexus_bytes(img, info)))
    two = read_nexus(io.BytesIO(nexus_bytes([img[:h], img[h:]], info, panels=[top, bottom])))
    assert np.array_equal(two["data"], single["data"]) and len(two["modules"]) == 2
    assert [m["data_origin"] for m in two["modules"]] == [(0, 0), (h, 0)]
    assert [m["data_size"] for m in two["modules"]] == [(h, F), (S - h, F)]
    s0 = single["modules"][0]
    for m in two["modules"]:
        r0 = m["data_origin"][0]
        for s, f in ((0, 0), (3, 7), (m["data_size"][0] - 1, F - 1)):
            want = s0["origin"] + f * s0["px_f"] * s0["fast"] + (s + r0) * s0["px_s"] * s0["slow"]
            got = m["origin"] + f * m["px_f"] * m["fast"] + s * m["px_s"] * m["slow"]
            assert np.allclose(got, want, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Hydra app and store
# ---------------------------------------------------------------------------------------------

HYDRA = ["detector.fpixels=40", "detector.spixels=32", "crystal.N=5", "image.int_scale=1e7",
         "crystal.phi_deg=5", "crystal.osc_deg=0.25"]


def test_hydra_app_formats(tmp_path):
    r = _run("nbsim", HYDRA + ["store.formats=[smv,cbf,nexus]", "quiet=true"], tmp_path)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / r.stdout.strip().splitlines()[-1]
    run = json.loads((folder / "run.json").read_text())
    info = run["info"]
    img = np.fromfile(folder / "float.bin", dtype=np.float32).reshape(32, 40)
    nx = read_nexus(folder / "image.nxs")
    assert np.array_equal(nx["data"][0], img)
    check_geometry(nx, info)
    assert _close(nx["wavelength"], info["wavelength_A"])
    assert _close([nx["phi"], nx["phi_end"]], [5.0, 5.25])
    cbf = fabio.open(str(folder / "image.cbf"))
    counts = count_image(img, 1e7, 40.0)
    assert counts.max() > 65535 and np.array_equal(cbf.data, counts)
    h = cbf_header(cbf)
    assert _close(h["Detector_distance"], info["distance_mm"] * 1e-3)
    assert _close(h["Beam_xy"], [info["fbeam_mm"] / info["pixel_mm"], info["sbeam_mm"] / info["pixel_mm"]])
    assert (folder / "int.img").is_file()

    # int32 NeXus asked later: added to the stored entry, nothing simulated
    r2 = _run("nbsim", HYDRA + ["store.formats=[nexus]", "store.nexus_dtype=int32"], tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert "added image_int32.nxs" in r2.stderr and "nothing simulated" in r2.stderr
    nx32 = read_nexus(folder / "image_int32.nxs")
    assert nx32["data"].dtype == np.int32 and np.array_equal(nx32["data"][0], counts)

    bad = _run("nbsim", HYDRA + ["store.formats=[smv,tiff]"], tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "store.formats" in lines[0] and "smv, cbf, nexus" in lines[0]


def test_store_added_files_equal_fresh_ones(tmp_path):
    """A NeXus/CBF file added to a stored entry from float.bin is byte-identical to a fresh run's,
    and asking for formats keeps the config hash."""
    from nbsim.spec import DeviceSpec
    from pipeline import store
    from pipeline.compose import compose_spec
    spec, _ = compose_spec(HYDRA)
    dev = DeviceSpec(compile=False)
    quiet = dict(base_dir=tmp_path, log=lambda m: None, progress=False)
    fresh, _, _ = store.run_or_reuse(spec, dev, root=tmp_path / "a", formats=("cbf", "nexus"), **quiet)
    assert not (fresh / "int.img").exists()
    folder, _, _ = store.run_or_reuse(spec, dev, root=tmp_path / "b", **quiet)
    assert folder.name == fresh.name and not (folder / "image.nxs").exists()
    folder, reused, run = store.run_or_reuse(spec, dev, root=tmp_path / "b", formats=("smv", "cbf", "nexus"), **quiet)
    assert reused and {"image.cbf", "image.nxs"} <= set(run["files"])
    for name in ("image.nxs", "image.cbf", "float.bin"):
        assert (folder / name).read_bytes() == (fresh / name).read_bytes(), name
    doc, why = store.verify_entry(folder, folder.name)
    assert doc is not None, why


@pytest.mark.parametrize("override,words", [
    ("store.formats=smv", "store.formats: must be a list of formats like [smv, cbf, nexus]"),
    ("store.formats=[smv,tiff]", "store.formats: unknown format 'tiff'; accepted: smv, cbf, nexus"),
    ("store.nexus_dtype=int16", "store.nexus_dtype: must be one of float32, int32"),
    ("store.nexus_compression=gzip", "store.nexus_compression: must be one of none, bslz4"),
])
def test_hydra_store_format_keys_one_line(override, words):
    from pipeline.compose import cfg_to_spec, compose_config, format_error
    with pytest.raises(Exception) as ei:
        cfg_to_spec(compose_config([override]))
    msg = format_error(ei.value, fallback=True)
    assert msg is not None and "\n" not in msg and msg.startswith(words), msg


def test_nexus_pixel_mask():
    """pixel_mask (always written): 1 outside the ROI, and right of a narrower panel."""
    import io
    from nbsim.io.images import roi_mask
    info = _golden_info("G19_roi_nopolar")
    S, F = info["spixels"], info["fpixels"]
    roi = roi_mask(F, S, info["roi"])
    assert 0 < roi.sum() < roi.size
    with h5py.File(io.BytesIO(nexus_bytes(np.zeros((S, F), np.float32), info, mask=roi)), "r") as f:
        pm = nxmx.NXmx(f).entries[0].instruments[0].detectors[0].pixel_mask[()]
        assert pm.dtype == np.int32 and np.array_equal(pm, (~roi).astype(np.int32))
    one = panels_from_info(info)[0]
    narrow = PanelGeometry(F - 10, 7, one.pixel_mm, one.fdet, one.sdet, one.origin_mm, "a")
    wide = PanelGeometry(F, 5, one.pixel_mm, one.fdet, one.sdet, one.origin_mm, "b")
    data = [np.ones((7, F - 10), np.float32), np.ones((5, F), np.float32)]
    with h5py.File(io.BytesIO(nexus_bytes(data, info, panels=[narrow, wide])), "r") as f:
        pm = f["/entry/instrument/detector/pixel_mask"][()]
        assert pm.shape == (12, F) and pm[:7, F - 10:].all() and pm.sum() == 7 * 10
        assert np.array_equal(f["/entry/data/data"][0] == 0, pm == 1)


# ---------------------------------------------------------------------------------------------
# multi-panel detectors (--geom): one NXdetector_module per panel
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_frontend_geom_writes_one_module_per_panel(tmp_path, monkeypatch, capsys, dtype):
    """A two-panel CrystFEL geometry through the front end: the NeXus file has a module per panel at
    the panel's own corner and axes (McStas frame of the run's beam), and its data are the panels'
    images (as -floatfile writes them, or their int32 counts) stacked in geometry order."""
    from test_geom_files import FE, TWO_PANELS
    from nbsim.nanobragg import main
    from nbsim.panels import panel_header_info  # noqa: F401  (multi-panel support present)
    (tmp_path / "d.geom").write_text(TWO_PANELS)
    monkeypatch.chdir(tmp_path)
    rc = main(FE + ["--geom", "d.geom", "-floatfile", "f.bin", "-intfile", "i.img", "-nonoise", "-nopgm",
                    "--nexus", "d.nxs", "--nexus-dtype", dtype, "-scale", "1e9"])
    out, err = capsys.readouterr()
    assert rc == 0, err + out
    assert "2 detector modules" in out
    parsed = parse_argv(FE + ["--geom", "d.geom"], cwd=str(tmp_path))
    import nbsim
    res = nbsim.simulate(parsed.spec, parsed.device, base_dir=str(tmp_path))
    f = np.fromfile(tmp_path / "f.bin", "<f4")
    nx = read_nexus(tmp_path / "d.nxs")
    assert len(nx["modules"]) == 2
    panels = res.panel_float32()
    want = (np.concatenate(panels) if dtype == "float32" else
            np.concatenate([count_image(a, 1e9, 40.0, p.roi_mask) for a, p in zip(panels, res.panels)]))
    assert nx["data"].shape == (1, 24, 16) and np.array_equal(nx["data"][0], want)
    if dtype == "float32":
        assert np.array_equal(nx["data"][0].reshape(-1), f)
    R = mcstas_rotation(res.info["beam"])
    for m, p in zip(nx["modules"], res.panels):
        rep = p.report
        assert _close(m["origin"], R @ np.asarray(rep.corner_mm))
        assert _close(m["fast"], R @ np.asarray(rep.fast)) and _close(m["slow"], R @ np.asarray(rep.slow))
        assert _close(m["px_f"], rep.pixel_mm) and m["data_size"] == (rep.spixels, rep.fpixels)
    assert [m["data_origin"] for m in nx["modules"]] == [(0, 0), (12, 0)]


def test_frontend_geom_writes_one_cbf_per_panel(tmp_path, monkeypatch, capsys):
    """--cbf with a two-panel CrystFEL geometry: one CBF per panel (<stem>_<panel>.cbf, as -intfile),
    int32 counts of the panel's -floatfile pixels with the whole detector's scale, and the panel's own
    header: 61 mm along the beam (the .geom's clen + coffset, panels facing the beam), 0.2 mm pixels."""
    from test_geom_files import FE, TWO_PANELS
    from nbsim.nanobragg import main
    (tmp_path / "d.geom").write_text(TWO_PANELS)
    monkeypatch.chdir(tmp_path)
    rc = main(FE + ["--geom", "d.geom", "--cbf", "x.cbf", "-floatfile", "f.bin", "-intfile", "i.img",
                    "-nonoise", "-nopgm"])
    out, err = capsys.readouterr()
    assert rc == 0, err + out
    f = np.fromfile(tmp_path / "f.bin", "<f4")
    scale = 55000.0 / float(f.max())                 # C's default int scale, over every panel
    assert _close(float(re.search(r"^intfile_scale = (\S+)$", out, re.M).group(1)), scale, 1e-5)
    for k, name in enumerate(("p0", "p1")):
        assert f"writing x_{name}.cbf as CBF" in out
        im = fabio.open(str(tmp_path / f"x_{name}.cbf"))
        a = f[k * 192:(k + 1) * 192].reshape(12, 16)
        assert im.data.dtype == np.int32 and np.array_equal(im.data, count_image(a, scale, 40.0, np.ones(a.shape, bool)))
        hd = dict(ln[2:].split(" ", 1) for ln in im.header["_array_data.header_contents"].splitlines()
                  if ln.startswith("# "))
        assert _close(float(hd["Detector_distance"].split()[0]), 0.061)
        assert _close(float(hd["Pixel_size"].split()[0]), 0.2e-3)
        assert _close(float(hd["Wavelength"].split()[0]), 1.1)
