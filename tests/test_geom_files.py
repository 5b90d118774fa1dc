"""Geometry files (``nbsim.io.geom``): CrystFEL ``.geom`` and dxtbx ``.expt`` panels in nbsim's frame.

* a one-panel file of each kind reproduces the custom-vector single-panel run (bit-identical);
* the same physical detector written in both formats gives the same pixels (the two frame
  conversions agree with each other);
* frames: conversions are proper rotations, and a DIALS origin read back matches the
  ``dials_origin_mm`` that nbsim reports for its own detector;
* bad regions mask pixels; bad files give one line naming file, line and key.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import nbsim
from nbsim.io.geom import from_crystfel, from_dxtbx, read_geometry
from nbsim.io.inputs import InputFileError
from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec, SpecError
from crystfel_geom import COS30, ROTATED_16x12, SIN30, geom

DEV = DeviceSpec(dtype="float64", compile=False)
C, S = COS30, SIN30           # a panel rotated by ~30 deg about the beam

GEOM = geom(ROTATED_16x12, res=5000, clen=0.06, coffset=0.001, comment="one rotated panel",
            header=["adu_per_eV = 0.00105"])


def expt_doc(**beam):
    """The same physical panel as GEOM in dxtbx's frame: x_d = -x_c, y_d = y_c, z_d = -z_c (mm)."""
    doc = {"__id__": "ExperimentList",
           "experiment": [{"__id__": "Experiment", "detector": 0, "beam": 0}],
           "detector": [{"hierarchy": {"name": "", "fast_axis": [1, 0, 0], "slow_axis": [0, 1, 0],
                                       "origin": [0, 0, 0], "children": [{"panel": 0}]},
                         "panels": [{"name": "Panel", "type": "SENSOR_PAD", "fast_axis": [-C, S, 0.0],
                                     "slow_axis": [S, C, 0.0], "origin": [4.0, -1.5, -61.0],
                                     "pixel_size": [0.2, 0.2], "image_size": [16, 12],
                                     "thickness": 0.0, "material": "", "mu": 0.0, "mask": []}]}],
           "beam": [dict({"__id__": "monochromatic", "direction": [0.0, 0.0, 1.0], "wavelength": 1.1},
                         **beam)]}
    return doc


def crystal(**kw):
    return CrystalSpec(**dict(dict(cell_A_deg=[42.0, 51.0, 63.0, 88.0, 93.0, 97.0],
                                   misset_deg=[11.0, 23.0, 35.0], N=3, default_F=100.0), **kw))


def custom_single_panel(fast, slow, origin_mm, npix=(16, 12), pixel_mm=0.2, oversample=None, **det):
    """The custom-vector single-panel run of a panel (pix0 given; the quirk that ignores it fixed)."""
    return ExperimentSpec(
        detector=DetectorSpec(convention="custom", fpixels=npix[0], spixels=npix[1], pixel_mm=pixel_mm,
                              fdet_vector=fast, sdet_vector=slow,
                              odet_vector=np.cross(fast, slow).tolist(), pix0_vector_mm=origin_mm,
                              distance_mm=61.0, oversample=oversample, **det),
        beam=BeamSpec(wavelength_A=1.1, kahn_factor=0.4), crystal=crystal(), fix=["pix0_overwritten"])


def from_file(tmp_path, name, text, oversample=None, **det):
    (tmp_path / name).write_text(text)
    return ExperimentSpec(detector=DetectorSpec(geometry_file=name, oversample=oversample, **det),
                          beam=BeamSpec(wavelength_A=1.1, kahn_factor=0.4), crystal=crystal()).validate()


def test_frame_conversions_are_proper_rotations():
    for conv in (from_crystfel, from_dxtbx):
        M = np.array([conv(e) for e in np.eye(3)]).T       # columns: images of the unit vectors
        assert np.array_equal(M @ M.T, np.eye(3)) and round(np.linalg.det(M)) == 1
    # the beam: CrystFEL +z and dxtbx -z are nbsim's +x; y (up) is y in all three
    assert from_crystfel([0, 0, 1]) == [1, 0, 0] and from_dxtbx([0, 0, -1]) == [1, 0, 0]
    assert from_crystfel([0, 1, 0]) == [0, 1, 0] == from_dxtbx([0, 1, 0])


def test_dxtbx_conversion_inverts_the_dials_origin_nbsim_reports():
    spec = ExperimentSpec(detector=DetectorSpec(convention="custom", fpixels=8, spixels=8, xbeam_mm=3.0,
                                                ybeam_mm=-2.0, rotx_deg=4.0, roty_deg=-3.0),
                          crystal=crystal()).validate()
    info = nbsim.simulate(spec, DEV).info
    back = from_dxtbx(info["dials_origin_mm"])
    assert np.allclose(back, np.array(info["pix0_m"]) * 1e3, rtol=0, atol=1e-12)


SENSOR = {"thick_um": 320.0, "thicksteps": 3, "attenuation_um": 250.0}


@pytest.mark.parametrize("kind,det", [("geom", {}), ("expt", {}), ("geom", SENSOR), ("expt", SENSOR),
                                      ("expt-sensor", SENSOR)])
def test_one_panel_file_reproduces_the_custom_vector_single_panel_run(tmp_path, kind, det):
    doc = expt_doc()
    given = det
    if kind == "expt-sensor":       # the sensor from the file: thickness 0.32 mm, mu 4 / mm = 250 um
        doc["detector"][0]["panels"][0].update(thickness=0.32, mu=4.0, material="Si")
        given = {"thicksteps": 3}
        kind = "expt"
    text = GEOM if kind == "geom" else json.dumps(doc)
    spec = from_file(tmp_path, f"d.{kind}", text, oversample=2, **given)
    multi = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    pn = read_geometry(tmp_path / f"d.{kind}").panels[0]
    # the vectors a reader of the file expects in nbsim's frame, written out by hand
    assert pn.fast == [0.0, S, -C] and pn.slow == [0.0, C, S] and pn.origin_mm == [61.0, -1.5, 4.0]
    single = nbsim.simulate(custom_single_panel([0.0, S, -C], [0.0, C, S], [61.0, -1.5, 4.0], oversample=2,
                                                **det), DEV)
    assert float(single.image.max()) > 0
    p = multi.panels[0]
    assert np.allclose(p.info["origin_mm"], [61.0, -1.5, 4.0], rtol=0, atol=0)
    assert float((p.image - single.image).abs().max()) == 0.0


def test_same_detector_in_both_formats_gives_the_same_pixels(tmp_path):
    (tmp_path / "d.geom").write_text(GEOM.replace("p0/", "q0/") + ROTATED_16x12
                                     .replace("corner_x = -20", "corner_x = 1").replace("-7.5", "4"))
    doc = expt_doc()
    p1 = dict(doc["detector"][0]["panels"][0], name="q1", origin=[-0.2, 0.8, -61.0])
    doc["detector"][0]["panels"] = [dict(doc["detector"][0]["panels"][0], name="q0"), p1]
    (tmp_path / "d.expt").write_text(json.dumps(doc))
    a = nbsim.simulate(from_file(tmp_path, "d.geom", (tmp_path / "d.geom").read_text(), 1), DEV,
                       base_dir=str(tmp_path))
    b = nbsim.simulate(from_file(tmp_path, "d.expt", (tmp_path / "d.expt").read_text(), 1), DEV,
                       base_dir=str(tmp_path))
    assert [p.name for p in a.panels] == ["q0", "p0"] and len(b.panels) == 2
    assert float(a.image.max()) > 0
    assert float((a.image - b.image).abs().max()) == 0.0


def test_expt_beam_sets_wavelength_and_direction(tmp_path):
    # dxtbx's direction points from the sample to the source; the beam travels the other way
    doc = expt_doc(wavelength=0.9, direction=[0.02, 0.0, 2.0])
    spec = from_file(tmp_path, "d.expt", json.dumps(doc))
    g = read_geometry(tmp_path / "d.expt")
    n = (0.02 ** 2 + 4.0) ** 0.5
    assert g.wavelength_A == 0.9 and np.allclose(g.beam_vector, [2.0 / n, 0.0, -0.02 / n], rtol=0, atol=1e-15)
    r = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    assert r.info["wavelength_A"] == 0.9
    assert np.allclose(r.info["beam"], [2.0 / n, 0.0, -0.02 / n], rtol=0, atol=1e-15)
    assert not any("sensor" in w for w in r.warnings) and r.info["thick_m"] == 0.0


def test_geom_bad_regions_mask_pixels_and_notes(tmp_path):
    text = GEOM + "bad_a/min_fs = 2\nbad_a/max_fs = 4\nbad_a/min_ss = 1\nbad_a/max_ss = 1\nbad_a/panel = p0\n"
    spec = from_file(tmp_path, "d.geom", text, 1)
    r = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    m = r.panels[0].mask
    assert not m[1, 2:5].any() and m.sum() == 16 * 12 - 3
    assert float(r.panels[0].image[1, 2:5].abs().max()) == 0.0
    assert any("adu_per_eV ignored" in w for w in r.warnings)
    assert any("bad region bad_a" in w for w in r.warnings)


BAD_GEOM = [
    ("p0/res = -3\n", "d.geom:14: p0/res: must be > 0 pixels per metre"),
    ("p0/fs = +1.0q\n", "d.geom:14: p0/fs: must be terms like"),
    ("p0/wobble = 3\n", "d.geom:14: p0/wobble: unknown panel key (accepted: min_fs"),
    ("p0/ss = +1.0x +0.5y\n", "d.geom:14: p0/ss: must be perpendicular to fs"),
    ("p0/max_fs = 1.5\n", "d.geom:14: p0/max_fs: must be an integer >= 0"),
    ("clen = /LCLS/detector_1/EncoderValue\np0/clen = /LCLS/x\n", "p0/clen: must be a distance in metres"),
    ("p0/corner_x = nan\n", "d.geom:14: p0/corner_x: must be a finite number"),
    ("just words\n", "d.geom:14: just: expected 'key = value'"),
    ("bad_z/min_fs = 1\n", "d.geom:14: bad_z/max_fs: missing"),
    ("bad_z/min_fs = 1\nbad_z/min_x = 1\n", "d.geom:14: bad_z: a bad region needs either"),
]


@pytest.mark.parametrize("extra,msg", BAD_GEOM)
def test_bad_geom_files_name_file_line_and_key(tmp_path, extra, msg):
    (tmp_path / "d.geom").write_text(GEOM + extra)
    with pytest.raises(InputFileError) as e:
        read_geometry(tmp_path / "d.geom")
    assert msg in str(e.value) and "\n" not in str(e.value)


def _expt_with(mut):
    doc = expt_doc()
    mut(doc)
    return json.dumps(doc, indent=1)


BAD_EXPT = [
    (lambda d: d["detector"][0]["panels"][0].update(pixel_size=[0.2, 0.1]), "detector.panels.0.pixel_size: must be square"),
    (lambda d: d["detector"][0]["panels"][0].update(image_size=[16, 0]), "detector.panels.0.image_size: must be 2 integers >= 1"),
    (lambda d: d["detector"][0]["panels"][0].update(fast_axis=[1, 0]), "detector.panels.0.fast_axis: must be a list of 3 finite numbers"),
    (lambda d: d["detector"][0]["panels"][0].pop("origin"), "detector.panels.0.origin: missing"),
    (lambda d: d["beam"][0].update(wavelength=-1), "beam.wavelength: must be > 0"),
    (lambda d: d["detector"][0]["hierarchy"].update(children=[{"panel": 3}]), "detector.hierarchy.children.0.panel: must be a panel index in 0..0"),
    (lambda d: d["detector"][0]["hierarchy"].update(fast_axis=[0, 0, 0]), "detector.hierarchy.fast_axis: must not be the zero vector"),
    (lambda d: d.pop("detector"), "detector: missing"),
    (lambda d: d["detector"][0]["panels"][0].update(thickness=-0.1), "detector.panels.0.thickness: must be a number >= 0 (mm)"),
    (lambda d: d["detector"][0]["panels"][0].update(mu="x"), "detector.panels.0.mu: must be a number >= 0 (1/mm)"),
    (lambda d: d["detector"][0]["panels"][0].update(mask=[[1, 2, 3]]), "detector.panels.0.mask: each rectangle must be 4 integers"),
    (lambda d: d["detector"][0]["panels"][0].update(mask=[[5, 2, 5, 4]]), "detector.panels.0.mask: rectangle [5, 2, 5, 4]"),
    (lambda d: d["detector"][0]["panels"][0].update(mask=[[20, 0, 30, 4]]), "covers no pixel of the 16x12 panel"),
]


@pytest.mark.parametrize("mut,msg", BAD_EXPT)
def test_bad_expt_files_name_file_line_and_key(tmp_path, mut, msg):
    (tmp_path / "d.expt").write_text(_expt_with(mut))
    with pytest.raises(InputFileError) as e:
        read_geometry(tmp_path / "d.expt")
    assert msg in str(e.value) and "\n" not in str(e.value) and "d.expt" in str(e.value)


def test_expt_mask_rectangles_are_not_simulated(tmp_path):
    # dxtbx untrusted rectangles [x0, y0, x1, y1], half-open: fast 2..4 and slow 3..5; fast 14..15, slow 0
    doc = expt_doc()
    plain = nbsim.simulate(from_file(tmp_path, "a.expt", json.dumps(doc), oversample=1), DEV, base_dir=str(tmp_path))
    doc["detector"][0]["panels"][0]["mask"] = [[2, 3, 5, 6], [14, -3, 99, 1]]
    r = nbsim.simulate(from_file(tmp_path, "m.expt", json.dumps(doc), oversample=1), DEV, base_dir=str(tmp_path))
    assert read_geometry(tmp_path / "m.expt").panels[0].bad == [[2, 4, 3, 5], [14, 15, 0, 0]]
    masked = np.zeros((12, 16), bool)
    masked[3:6, 2:5] = True
    masked[0:1, 14:16] = True
    img, ref = r.panels[0].image.numpy(), plain.panels[0].image.numpy()
    assert np.array_equal(r.panels[0].mask, ~masked) and (img[masked] == 0).all() and (ref[masked] > 0).all()
    assert np.array_equal(img[~masked], ref[~masked])
    assert any("2 untrusted rectangle(s)" in w for w in r.warnings)


def test_expt_sensor_precedence_and_panels_that_differ(tmp_path):
    doc = expt_doc()
    doc["detector"][0]["panels"][0].update(thickness=0.45, mu=3.0)
    (tmp_path / "s.expt").write_text(json.dumps(doc))
    r = nbsim.simulate(from_file(tmp_path, "s.expt", json.dumps(doc), oversample=1), DEV, base_dir=str(tmp_path))
    assert r.info["thick_m"] == pytest.approx(450e-6, rel=1e-15)
    assert any(w.startswith("sensor from s.expt: thickness 450 um, attenuation length 333.333 um") for w in r.warnings)
    # the spec's own thick_um wins: the same pixels as without the file's sensor, and a note
    own = nbsim.simulate(from_file(tmp_path, "s.expt", json.dumps(doc), oversample=1, thick_um=200.0), DEV,
                         base_dir=str(tmp_path))
    bare = expt_doc()
    ref = nbsim.simulate(from_file(tmp_path, "b.expt", json.dumps(bare), oversample=1, thick_um=200.0), DEV,
                         base_dir=str(tmp_path))
    assert own.info["thick_m"] == pytest.approx(200e-6, rel=1e-15)
    assert float((own.image - ref.image).abs().max()) == 0.0 and float(ref.image.max()) > 0
    assert any("is not used: detector.thick_um 200 is given" in w for w in own.warnings)
    # two panels with different sensors: one line naming the key
    p1 = dict(doc["detector"][0]["panels"][0], name="q1", origin=[-0.2, 0.8, -61.0], thickness=0.32)
    doc["detector"][0]["panels"].append(p1)
    (tmp_path / "two.expt").write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=r"^detector\.geometry_file: two\.expt: the panels differ in sensor "
                                        r"thickness/mu .*give detector\.thick_um"):
        nbsim.simulate(from_file(tmp_path, "two.expt", json.dumps(doc)), DEV, base_dir=str(tmp_path))


def test_broken_json_names_the_line(tmp_path):
    (tmp_path / "d.expt").write_text('{\n "detector": [\n  {,}\n]}\n')
    with pytest.raises(InputFileError, match=r"d\.expt:3: not valid JSON"):
        read_geometry(tmp_path / "d.expt")


def test_geometry_file_errors_reach_the_spec_key(tmp_path):
    (tmp_path / "d.geom").write_text(GEOM + "p0/res = 0\n")
    spec = ExperimentSpec(detector=DetectorSpec(geometry_file="d.geom"), crystal=crystal()).validate()
    with pytest.raises(SpecError) as e:
        nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    assert e.value.key == "detector.geometry_file" and "p0/res" in str(e.value)
    with pytest.raises(SpecError) as e:
        dataclasses.replace(spec, detector=dataclasses.replace(spec.detector, panels=[])).validate()
    assert e.value.key == "detector.panels"


# ---- entry points: the front end (--geom) and the Hydra app (detector.geometry_file / panels)

TWO_PANELS = GEOM + ROTATED_16x12.replace("p0/", "p1/").replace("corner_x = -20", "corner_x = 1")
FE = ["-cell", "42", "51", "63", "88", "93", "97", "-misset", "11", "23", "35", "-N", "3", "-default_F", "100",
      "-lambda", "1.1", "-polar", "0.4", "-oversample", "1", "-noprogress"]


def _fe(tmp_path, monkeypatch, capsys, argv):
    from nbsim.nanobragg import main
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_front_end_geom_writes_the_panels_in_order_and_an_smv_per_panel(tmp_path, monkeypatch, capsys):
    import fabio
    (tmp_path / "d.geom").write_text(TWO_PANELS)
    rc, out, err = _fe(tmp_path, monkeypatch, capsys,
                       FE + ["--geom", "d.geom", "-floatfile", "f.bin", "-intfile", "i.img", "-nonoise", "-nopgm"])
    assert rc == 0, err
    spec = from_file(tmp_path, "d.geom", TWO_PANELS, oversample=1)
    spec.beam.kahn_factor = 0.4
    api = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    f = np.fromfile(tmp_path / "f.bin", "<f4")
    assert f.shape == (2 * 16 * 12,) and np.array_equal(f, api.float32())
    assert np.array_equal(f[:192].reshape(12, 16), api.panel_float32()[0])
    assert np.array_equal(f[192:].reshape(12, 16), api.panel_float32()[1])
    for name in ("p0", "p1"):
        im = fabio.open(str(tmp_path / f"i_{name}.img"))
        assert im.data.shape == (12, 16)
        assert float(im.header["PIXEL_SIZE"]) == 0.2 and float(im.header["WAVELENGTH"]) == 1.1
    # the panel's own distance: the corner is 61 mm from the sample along the beam (normal = beam)
    assert abs(float(fabio.open(str(tmp_path / "i_p0.img")).header["DISTANCE"]) - 61.0) < 1e-4
    assert "2 panels one after another" in out


def test_front_end_one_panel_geom_writes_noise_pgm_and_cbf_like_the_single_panel_run(tmp_path, monkeypatch,
                                                                                    capsys):
    import fabio
    (tmp_path / "d.geom").write_text(GEOM)
    outs = lambda tag: ["-floatfile", f"f{tag}.bin", "-intfile", f"i{tag}.img", "-noisefile", f"n{tag}.img",
                        "-pgmfile", f"p{tag}.pgm", "--cbf", f"c{tag}.cbf", "-seed", "7"]
    rc, out1, err = _fe(tmp_path, monkeypatch, capsys, FE + ["--geom", "d.geom"] + outs("g"))
    assert rc == 0, err
    assert "noise and PGM images are not written" not in out1 and "several panels" not in out1
    # the matching custom-vector single-panel run (the vectors test_one_panel_file_... checks)
    odet = np.cross([0.0, S, -C], [0.0, C, S]).tolist()
    custom = ["-fdet_vector", "0", str(S), str(-C), "-sdet_vector", "0", str(C), str(S),
              "-odet_vector"] + [repr(x) for x in odet] + ["-pix0_vector_mm", "61", "-1.5", "4",
                                                          "-distance", "61", "-detpixels_f", "16",
                                                          "-detpixels_s", "12", "-pixel", "0.2",
                                                          "--fix", "pix0_overwritten"]
    rc, out2, err = _fe(tmp_path, monkeypatch, capsys, FE + custom + outs("s"))
    assert rc == 0, err
    f = np.fromfile(tmp_path / "fg.bin", "<f4")
    assert f.shape == (16 * 12,) and f.max() > 1.0
    assert np.array_equal(f, np.fromfile(tmp_path / "fs.bin", "<f4"))
    for name in ("i", "n", "c"):
        a, b = (fabio.open(str(tmp_path / f"{name}{t}.{'cbf' if name == 'c' else 'img'}")) for t in "gs")
        assert a.data.shape == (12, 16) and a.data.max() > 0, name
        assert np.array_equal(a.data, b.data), name
        if name == "c":
            continue
        for k in ("PIXEL_SIZE", "DISTANCE", "WAVELENGTH", "SIZE1", "SIZE2"):
            assert abs(float(a.header[k]) - float(b.header[k])) <= 1e-6 * abs(float(b.header[k])), k
        # the beam centre: where the beam (+x) meets the panel, in its fast/slow axes from its corner
        # (the custom-vector run's header keeps the unused default Xbeam/Ybeam instead)
        hit = np.array([61.0, 0.0, 0.0]) - np.array([61.0, -1.5, 4.0])
        fb, sb = hit @ np.array([0.0, S, -C]), hit @ np.array([0.0, C, S])
        assert abs(float(a.header["BEAM_CENTER_X"]) - fb) <= 1e-4 and abs(float(a.header["BEAM_CENTER_Y"]) - sb) <= 1e-4
    assert (tmp_path / "pg.pgm").read_bytes() == (tmp_path / "ps.pgm").read_bytes()
    hdr = lambda t: {ln.split()[1]: ln.split()[2] for ln in
                     fabio.open(str(tmp_path / f"c{t}.cbf")).header["_array_data.header_contents"].splitlines()
                     if ln.startswith("# ") and ln.split()[1] in ("Pixel_size", "Detector_distance", "Wavelength")}
    assert hdr("g") and all(abs(float(hdr("g")[k]) - float(hdr("s")[k])) <= 1e-6 * abs(float(hdr("s")[k]))
                            for k in hdr("s"))
    photons = [ln for ln in out1.splitlines() if "photons on noise image" in ln]
    assert photons and photons == [ln for ln in out2.splitlines() if "photons on noise image" in ln]
    at = lambda out: [ln for ln in out.splitlines() if ln.startswith("max_I")]
    assert at(out1) == at(out2) and " at " in at(out1)[0]


@pytest.mark.parametrize("extra,msg", [
    (["-noisefile", "n.img"], r"^nbsim\.nanobragg: error: -noisefile: not available with several panels"),
    (["-pgmfile", "x.pgm"], r"^nbsim\.nanobragg: error: -pgmfile: not available with several panels"),
])
def test_front_end_refuses_single_image_outputs_with_panels(tmp_path, monkeypatch, capsys, extra, msg):
    import re
    (tmp_path / "d.geom").write_text(TWO_PANELS)
    rc, out, err = _fe(tmp_path, monkeypatch, capsys, FE + ["--geom", "d.geom"] + extra)
    assert rc == 2 and re.match(msg, err) and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.geom"]


@pytest.mark.parametrize("name,text,msg", [
    ("d.geom", GEOM + "p0/res = 0\n", r"--geom: d\.geom:14: p0/res: must be > 0 pixels per metre"),
    ("d.geom", GEOM + "p0/fs = 2q\n", r"--geom: d\.geom:14: p0/fs: must be terms like"),
    ("d.expt", _expt_with(lambda d: d["detector"][0]["panels"][0].update(image_size=[0, 3])),
     r"--geom: d\.expt:\d+: detector\.panels\.0\.image_size: must be 2 integers >= 1"),
    ("d.txt", "x", r"--geom: d\.txt: unknown geometry file type"),
    ("missing.geom", None, r"--geom: file not found: missing\.geom"),
])
def test_front_end_bad_geometry_file_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys,
                                                                        name, text, msg):
    import re
    if text is not None:
        (tmp_path / name).write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = _fe(tmp_path, monkeypatch, capsys, FE + ["--geom", name])
    assert rc == 2 and err.count("\n") == 1 and re.search(msg, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_front_end_geom_as_a_subprocess_exits_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "d.geom").write_text(GEOM + "p0/corner_x = inf\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, "-m", "nbsim.nanobragg"] + FE + ["--geom=d.geom"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "--geom: d.geom:14: p0/corner_x: must be a finite number" in p.stderr


def test_hydra_app_geometry_file_and_panels_list(tmp_path):
    from pipeline.compose import compose_spec
    from pipeline.store import run_or_reuse
    (tmp_path / "d.geom").write_text(TWO_PANELS)
    over = ["crystal.cell_A_deg=[42,51,63,88,93,97]", "crystal.misset_deg=[11,23,35]", "crystal.N=3",
            "crystal.default_F=100", "beam.wavelength_A=1.1", "detector.oversample=1"]
    spec, dev = compose_spec(over + ["detector.geometry_file=d.geom"])
    folder, reused, doc = run_or_reuse(spec, dev, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    api = nbsim.simulate(spec, dev, base_dir=str(tmp_path))
    assert np.array_equal(np.fromfile(folder / "float.bin", "<f4"), api.float32())
    assert doc["info"]["npanels"] == 2 and not reused
    assert run_or_reuse(spec, dev, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)[1]
    # a list of panels tiling the 16x12 single-panel detector
    tiles = "[{fpixels:9,spixels:12,offset_px:[0,0]},{fpixels:7,spixels:12,offset_px:[9,0]}]"
    spec2, _ = compose_spec(over + ["detector.fpixels=16", "detector.spixels=12", f"detector.panels={tiles}"])
    single, _ = compose_spec(over + ["detector.fpixels=16", "detector.spixels=12"])
    a = nbsim.simulate(spec2, dev).panels
    b = nbsim.simulate(single, dev).image
    assert float((a[0].image - b[:, :9]).abs().max()) == 0.0 and float((a[1].image - b[:, 9:]).abs().max()) == 0.0


def _with_crystal(doc, axes_nbsim_A):
    """``doc`` with a dxtbx crystal whose real-space axes are ``axes_nbsim_A`` (nbsim frame, Å),
    written in dxtbx's frame: (x_d, y_d, z_d) = (z_n, y_n, -x_n), the inverse of ``from_dxtbx``."""
    doc["experiment"][0]["crystal"] = 0
    to_d = [[v[2], v[1], 0.0 - v[0]] for v in axes_nbsim_A]
    doc["crystal"] = [{"__id__": "crystal", "real_space_a": to_d[0], "real_space_b": to_d[1],
                       "real_space_c": to_d[2], "space_group_hall_symbol": " P 1"}]
    return doc


def test_expt_crystal_is_converted_to_nbsim_frame(tmp_path):
    doc = expt_doc()
    doc["experiment"][0]["crystal"] = 0
    doc["crystal"] = [{"__id__": "crystal", "real_space_a": [10.0, 0.0, 0.0], "real_space_b": [0.0, 20.0, 0.0],
                       "real_space_c": [0.0, 0.0, 30.0], "space_group_hall_symbol": " P 1"}]
    (tmp_path / "d.expt").write_text(json.dumps(doc))
    g = read_geometry(tmp_path / "d.expt")
    assert g.crystal_axes_A == [[0.0, 0.0, 10.0], [0.0, 20.0, 0.0], [-30.0, 0.0, 0.0]]


def _reference_and_expt(tmp_path):
    """The cell + misset run through a crystal-less .expt, and the .expt holding that run's crystal
    (the real-space vectors it reports) with no cell of the spec's own."""
    doc = expt_doc()
    ref = nbsim.simulate(from_file(tmp_path, "d.expt", json.dumps(doc), oversample=1), DEV,
                         base_dir=str(tmp_path))
    axes = [ref.info[k] for k in ("a_A", "b_A", "c_A")]
    (tmp_path / "x.expt").write_text(json.dumps(_with_crystal(doc, axes)))
    spec = ExperimentSpec(detector=DetectorSpec(geometry_file="x.expt", oversample=1),
                          beam=BeamSpec(wavelength_A=1.1, kahn_factor=0.4),
                          crystal=CrystalSpec(N=3, default_F=100.0)).validate()
    return ref, axes, spec


def test_expt_crystal_sets_cell_and_orientation_of_the_cell_misset_run(tmp_path):
    from nbsim.crystal import mosflm_matrix
    ref, axes, spec = _reference_and_expt(tmp_path)
    assert spec.crystal.cell_A_deg is None and spec.crystal.matrix_file is None
    r = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    # the matrix: reciprocal vectors x lambda, i.e. lambda * inverse of the rows a, b, c (textbook)
    A = mosflm_matrix(*axes, 1.1).numpy()
    assert np.allclose(A, 1.1 * np.linalg.inv(np.array(axes)), rtol=1e-14, atol=0)
    for k in ("a_A", "b_A", "c_A"):
        assert np.allclose(r.info[k], ref.info[k], rtol=0, atol=1e-12)
    assert np.allclose(r.info["unit_cell"], ref.info["unit_cell"], rtol=1e-12, atol=0)
    # not bit-identical: the lattice is built by other float64 arithmetic (matrix inversion of the
    # reported vectors, not the cell formula and misset rotation); measured 5e-14 of the maximum
    top = float(ref.image.max())
    assert top > 1.0
    assert float((r.image - ref.image).abs().max()) <= 1e-9 * top
    assert not any("not used" in w for w in r.warnings)


def test_expt_crystal_is_bit_identical_to_the_same_matrix_as_a_matrix_file(tmp_path):
    from nbsim.crystal import mosflm_matrix
    ref, axes, spec = _reference_and_expt(tmp_path)
    r = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    A = mosflm_matrix(*axes, 1.1).numpy()          # written with repr: read back exactly
    (tmp_path / "x.mat").write_text("\n".join(" ".join(repr(float(x)) for x in row) for row in A) + "\n")
    mat = ExperimentSpec(detector=DetectorSpec(geometry_file="d.expt", oversample=1),
                         beam=BeamSpec(wavelength_A=1.1, kahn_factor=0.4),
                         crystal=CrystalSpec(matrix_file="x.mat", N=3, default_F=100.0)).validate()
    m = nbsim.simulate(mat, DEV, base_dir=str(tmp_path))
    assert float(m.image.max()) > 1.0 and r.setup.matrix_file == "x.expt" and m.setup.matrix_file == "x.mat"
    assert float((r.image - m.image).abs().max()) == 0.0


def test_user_cell_takes_precedence_over_the_expt_crystal_with_a_note(tmp_path):
    doc = expt_doc()
    plain = nbsim.simulate(from_file(tmp_path, "d.expt", json.dumps(doc), oversample=1), DEV,
                           base_dir=str(tmp_path))
    other = [[0.0, 0.0, 30.0], [0.0, 35.0, 0.0], [-40.0, 0.0, 0.0]]
    r = nbsim.simulate(from_file(tmp_path, "c.expt", json.dumps(_with_crystal(doc, other)), oversample=1), DEV,
                       base_dir=str(tmp_path))
    assert float(plain.image.max()) > 1.0
    assert float((r.image - plain.image).abs().max()) == 0.0
    assert any("crystal of c.expt (real_space_a/b/c) is not used: crystal.cell_A_deg is given" in w
               for w in r.warnings)


def test_no_cell_and_no_expt_crystal_is_one_line(tmp_path):
    (tmp_path / "d.expt").write_text(json.dumps(expt_doc()))
    spec = ExperimentSpec(detector=DetectorSpec(geometry_file="d.expt"), beam=BeamSpec(wavelength_A=1.1),
                          crystal=CrystalSpec(default_F=100.0)).validate()
    with pytest.raises(SpecError, match=r"^crystal\.cell_A_deg: a unit cell is required: .*d\.expt has none"):
        nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    doc = _with_crystal(expt_doc(), [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 3.0, 0.0]])
    (tmp_path / "flat.expt").write_text(json.dumps(doc, indent=1))
    with pytest.raises(InputFileError, match=r"flat\.expt:\d+: crystal\.real_space_c: .*coplanar"):
        read_geometry(tmp_path / "flat.expt")


def test_front_end_and_hydra_take_the_expt_crystal(tmp_path, monkeypatch, capsys):
    from pipeline.compose import compose_spec
    ref, axes, spec = _reference_and_expt(tmp_path)
    api = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    fe = [a for a in FE if a not in ("-cell", "42", "51", "63", "88", "93", "97", "-misset", "11", "23", "35")]
    assert len(fe) == len(FE) - 11
    rc, out, err = _fe(tmp_path, monkeypatch, capsys, fe + ["--geom", "x.expt", "-floatfile", "f.bin",
                                                            "-intfile", "i.img", "-nonoise", "-nopgm"])
    assert rc == 0, err
    assert np.array_equal(np.fromfile(tmp_path / "f.bin", "<f4"), api.float32())
    # without a crystal in the file and no -cell/-mat: one line, exit 2
    rc, out, err = _fe(tmp_path, monkeypatch, capsys, fe + ["--geom", "d.expt"])
    assert rc == 2 and err.count("\n") == 1 and "a unit cell is required" in err and "d.expt has none" in err
    hspec, dev = compose_spec(["crystal=geometry", "crystal.N=3", "beam.wavelength_A=1.1",
                               "beam.kahn_factor=0.4", "detector.oversample=1",
                               f"detector.geometry_file={tmp_path / 'x.expt'}"])
    assert hspec.crystal.cell_A_deg is None
    h = nbsim.simulate(hspec, DEV)
    assert float((h.image - api.image).abs().max()) == 0.0


def test_expt_error_line_is_the_faulty_panels_key(tmp_path):
    doc = expt_doc()
    p = doc["detector"][0]["panels"][0]
    doc["detector"][0]["panels"] = [p, dict(p, name="b", origin=[1, 2])]
    text = json.dumps(doc, indent=1)
    (tmp_path / "d.expt").write_text(text)
    with pytest.raises(InputFileError) as e:
        read_geometry(tmp_path / "d.expt")
    line = int(str(e.value).split("d.expt:")[1].split(":")[0])
    assert "detector.panels.1.origin" in str(e.value)
    # the second "origin" after "panels" (the hierarchy's own origin comes first in this file)
    lines = [i + 1 for i, t in enumerate(text.splitlines()) if '"origin"' in t]
    assert line == lines[-1] and len(lines) == 3


def test_panel_whose_fast_x_slow_faces_the_sample_gets_the_outward_normal(tmp_path):
    # dxtbx fast +x, slow +y: fast x slow = +z_d, towards the source; nbsim's normal must point away
    doc = expt_doc()
    doc["detector"][0]["panels"][0].update(fast_axis=[1.0, 0.0, 0.0], slow_axis=[0.0, 1.0, 0.0])
    spec = from_file(tmp_path, "d.expt", json.dumps(doc), oversample=1, thick_um=200.0, thicksteps=2)
    r = nbsim.simulate(spec, DEV, base_dir=str(tmp_path))
    assert r.panels[0].info["normal"] == [1.0, 0.0, 0.0]
    fast, slow = from_dxtbx([1.0, 0.0, 0.0]), from_dxtbx([0.0, 1.0, 0.0])     # nbsim [0,0,1], [0,1,0]
    ref = custom_single_panel(fast, slow, [61.0, -1.5, 4.0], oversample=1, thick_um=200.0, thicksteps=2)
    ref.detector.odet_vector = [1.0, 0.0, 0.0]
    single = nbsim.simulate(ref, DEV)
    assert float(single.image.min()) > 0
    assert float((r.panels[0].image - single.image).abs().max()) == 0.0


def _hierarchy_doc(group_frames, panel_local):
    """An .expt whose one panel sits in nested groups (outermost first): each frame (fast, slow,
    origin), the panel's frame local to the innermost group."""
    doc = expt_doc()
    node = {"name": "", "fast_axis": [1, 0, 0], "slow_axis": [0, 1, 0], "origin": [0, 0, 0], "children": []}
    root, cur = node, node
    for k, (f, s_, o) in enumerate(group_frames):
        child = {"name": f"g{k}", "fast_axis": f, "slow_axis": s_, "origin": o, "children": []}
        cur["children"].append(child)
        cur = child
    cur["children"].append({"panel": 0})
    det = doc["detector"][0]
    det["hierarchy"] = root
    det["panels"][0].update(fast_axis=panel_local[0], slow_axis=panel_local[1], origin=panel_local[2])
    return doc


def test_expt_hierarchy_group_frames_are_composed_like_dxtbx(tmp_path):
    """A panel given in its group's frame (90° about z, whole-number offsets: every product exact)
    is the flat file's panel, bit for bit: same PanelSpec vectors and the same image."""
    flat = expt_doc()["detector"][0]["panels"][0]
    v_f, v_s, v_o = flat["fast_axis"], flat["slow_axis"], flat["origin"]
    po = [10.0, 20.0, -30.0]
    # group axes: fast (0, 1, 0), slow (-1, 0, 0), normal (0, 0, 1); local = P^T (v - po)
    def local(v):
        return [v[1], -v[0], v[2]]
    doc = _hierarchy_doc([([0, 1, 0], [-1, 0, 0], po)],
                         (local(v_f), local(v_s), local([a - b for a, b in zip(v_o, po)])))
    nested = from_file(tmp_path, "h.expt", json.dumps(doc))
    plain = from_file(tmp_path, "p.expt", json.dumps(expt_doc()))
    g_n, g_p = read_geometry(tmp_path / "h.expt"), read_geometry(tmp_path / "p.expt")
    assert [(p.fast, p.slow, p.origin_mm) for p in g_n.panels] == [(p.fast, p.slow, p.origin_mm) for p in g_p.panels]
    assert any("hierarchy" in n for n in g_n.notes)
    a = nbsim.simulate(nested, DEV, base_dir=str(tmp_path)).image
    b = nbsim.simulate(plain, DEV, base_dir=str(tmp_path)).image
    assert float((a - b).abs().max()) == 0.0 and float(a.max()) > 0


def test_expt_hierarchy_two_levels_match_an_independent_composition(tmp_path):
    """Two nested tilted groups: the panel's lab frame equals the product of 4×4 homogeneous
    transforms (numpy) to 1e-12, mapped to nbsim's frame."""
    def rot(axis, deg):
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        t = np.radians(deg)
        K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K
    R1, o1 = rot([0.3, -0.2, 1.0], 33.0), np.array([1.5, -2.0, -100.0])
    R2, o2 = rot([1.0, 0.4, 0.1], 7.0), np.array([20.0, 5.5, 0.25])
    lf, ls, lo = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, -4.0, 0.5]
    doc = _hierarchy_doc([(R1[:, 0].tolist(), R1[:, 1].tolist(), o1.tolist()),
                          (R2[:, 0].tolist(), R2[:, 1].tolist(), o2.tolist())], (lf, ls, lo))
    (tmp_path / "h2.expt").write_text(json.dumps(doc))
    p = read_geometry(tmp_path / "h2.expt").panels[0]

    def H(R, o):
        M = np.eye(4)
        M[:3, :3], M[:3, 3] = R, o
        return M
    M = H(R1, o1) @ H(R2, o2)
    want_f, want_s = M[:3, :3] @ lf, M[:3, :3] @ ls
    want_o = (M @ np.array([*lo, 1.0]))[:3]
    for got, want in ((p.fast, want_f), (p.slow, want_s), (p.origin_mm, want_o)):
        assert np.allclose(got, from_dxtbx(want.tolist()), rtol=0, atol=1e-12)
