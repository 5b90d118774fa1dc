"""The Hydra store with several panels: ``store.formats=[smv,cbf,nexus]`` writes an SMV and a CBF per
panel and one NeXus file with a module per panel, read back with independent readers (fabio, h5py +
nxmx); formats asked later are added from ``float.bin`` without simulating; the entry's checksums
cover the new files.

The expected header values come from the geometry file the test writes (distance along the beam, pixel
size, where the beam meets each panel), not from the writers; the expected pixels from ``float.bin``.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
nxmx = pytest.importorskip("nxmx")
fabio = pytest.importorskip("fabio")

import nbsim.api  # noqa: E402
from nbsim.io.images import count_image, int_image  # noqa: E402
from nbsim.io.nexus import mcstas_rotation  # noqa: E402
from pipeline import app, store  # noqa: E402
from pipeline.compose import compose_spec  # noqa: E402
from crystfel_geom import COS30, ROTATED_16x12, SIN30, geom, panel  # noqa: E402

REL = 1e-6
C, S = math.cos(math.radians(30.0)), math.sin(math.radians(30.0))
RES = 5000.0                                    # pixels per metre: 0.2 mm pixels
CLEN_M, COFFSET_M = 0.06, 0.001                 # both panels face the beam at 61 mm
# p0 axis-aligned, p1 rotated by 30 degrees about the beam; 32 x 32 pixels each
GEOM = geom(panel("p0", 32, 32, "+1x", "+1y", -40, -10),
            panel("p1", 32, 32, f"+{C!r}x +{S!r}y", f"-{S!r}x +{C!r}y", 2, -10),
            res=f"{RES:g}", clen=CLEN_M, coffset=COFFSET_M, comment="two 32x32 panels")
PANELS = ("p0", "p1")
PX_MM = 1e3 / RES
DIST_MM = (CLEN_M + COFFSET_M) * 1e3


def expected_beam_px(corner, fs, ss):
    """Where the beam (CrystFEL's +z through the origin) meets a panel facing it, in pixels from the
    corner of its first pixel along fast and slow (CrystFEL's own frame)."""
    d = -np.asarray(corner, float)
    return float(d @ np.asarray(fs)), float(d @ np.asarray(ss))


BEAM_PX = {"p0": expected_beam_px((-40, -10), (1, 0), (0, 1)),
           "p1": expected_beam_px((2, -10), (C, S), (-S, C))}
OVER = ["crystal.cell_A_deg=[42,51,63,88,93,97]", "crystal.misset_deg=[11,23,35]", "crystal.N=3",
        "crystal.default_F=100", "beam.wavelength_A=1.1", "detector.oversample=1",
        "detector.geometry_file=d.geom"]
WAVELENGTH_A = 1.1


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the real ``nbsim.api.simulate`` (the store looks it up at call time)."""
    calls = []
    real = nbsim.api.simulate

    def simulate(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(nbsim.api, "simulate", simulate)
    return calls


def run_app(monkeypatch, capsys, *overrides):
    monkeypatch.setattr(sys, "argv", ["nbsim", *overrides])
    app.main()
    return capsys.readouterr()


def _close(a, b, rel=REL):
    return np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=rel, atol=0.0)


def panels_of(folder):
    """float.bin split into the panels (info['panels'] order and shapes)."""
    doc = json.loads((folder / "run.json").read_text())
    flat = np.fromfile(folder / "float.bin", "<f4")
    out, start = [], 0
    for p in doc["info"]["panels"]:
        n = p["spixels"] * p["fpixels"]
        out.append(flat[start:start + n].reshape(p["spixels"], p["fpixels"]))
        start += n
    assert start == flat.size
    return doc, out


def check_files(folder, doc, images, formats):
    """Every per-panel file of ``formats`` read back: pixels from float.bin, headers from GEOM."""
    scale = doc["intfile_scale"]
    assert scale > 0
    names = [p["name"] for p in doc["info"]["panels"]]
    assert names == list(PANELS)
    for name, a in zip(names, images):
        fb, sb = BEAM_PX[name]
        if "smv" in formats:
            im = fabio.open(str(folder / f"int_{name}.img"))
            assert np.array_equal(im.data, int_image(a, scale, 40.0, np.ones(a.shape, bool)))
            h = im.header
            assert _close(float(h["DISTANCE"]), DIST_MM) and _close(float(h["PIXEL_SIZE"]), PX_MM)
            assert _close(float(h["WAVELENGTH"]), WAVELENGTH_A)
            # the panel as a custom-convention detector: beam centre (mm) from its first pixel's corner
            assert _close([float(h["BEAM_CENTER_X"]), float(h["BEAM_CENTER_Y"])], [fb * PX_MM, sb * PX_MM])
        if "cbf" in formats:
            im = fabio.open(str(folder / f"image_{name}.cbf"))
            want = count_image(a, scale, 40.0, np.ones(a.shape, bool))
            assert im.data.dtype == np.int32 and np.array_equal(im.data, want)
            text = im.header["_array_data.header_contents"]
            hd = {ln[2:].split(" ", 1)[0]: ln[2:].split(" ", 1)[1] for ln in text.splitlines() if ln.startswith("# ")}
            assert _close(float(hd["Detector_distance"].split()[0]), DIST_MM * 1e-3)
            assert _close(float(hd["Pixel_size"].split()[0]), PX_MM * 1e-3)
            assert _close(float(hd["Wavelength"].split()[0]), WAVELENGTH_A)
            bx, by = (float(v) for v in hd["Beam_xy"].split(")")[0].strip("(").split(","))
            assert _close([bx, by], [fb, sb])
    if "nexus" in formats:
        from test_nexus_cbf import read_nexus
        nx = read_nexus(folder / "image.nxs")
        assert len(nx["modules"]) == len(images)
        row = 0
        R = mcstas_rotation(doc["info"]["beam"])
        for m, a, p in zip(nx["modules"], images, doc["info"]["panels"]):
            block = nx["data"][0, row:row + a.shape[0], :a.shape[1]]
            assert block.dtype == np.float32 and float(np.abs(block - a).max()) == 0.0    # bit for bit
            assert m["data_origin"] == (row, 0) and m["data_size"] == a.shape
            row += a.shape[0]
            fb, sb = BEAM_PX[p["name"]]
            assert _close(m["distance"], DIST_MM) and _close([m["px_f"], m["px_s"]], [PX_MM, PX_MM])
            assert _close([m["beam_f_px"], m["beam_s_px"]], [fb, sb])
            assert _close(m["fast"], R @ np.asarray(p["fast"])) and _close(m["slow"], R @ np.asarray(p["slow"]))
        assert _close(nx["wavelength"], WAVELENGTH_A)


def test_hydra_store_writes_every_format_per_panel_and_reuses(tmp_path, monkeypatch, capsys, counted):
    (tmp_path / "d.geom").write_text(GEOM)
    monkeypatch.chdir(tmp_path)
    fmts = "store.formats=[smv,cbf,nexus]"
    out = run_app(monkeypatch, capsys, *OVER, fmts)
    folder = tmp_path / out.out.strip()
    assert len(counted) == 1 and (folder / "run.json").is_file(), out.err
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["float.bin", "config.yaml", "log.txt", "run.json", "image.nxs", "preview.png", "preview.thumb.png"]
        + [f"int_{n}.img" for n in PANELS] + [f"image_{n}.cbf" for n in PANELS])
    doc, images = panels_of(folder)
    assert [a.shape for a in images] == [(32, 32), (32, 32)] and all(a.max() > 0 for a in images)
    check_files(folder, doc, images, ("smv", "cbf", "nexus"))
    assert store.verify_entry(folder, folder.name)[0] is not None
    assert set(doc["files_sha256"]) >= {"image.nxs", "int_p0.img", "image_p1.cbf"}
    # a rerun does not simulate
    out = run_app(monkeypatch, capsys, *OVER, fmts)
    assert tmp_path / out.out.strip() == folder and len(counted) == 1
    assert f"reusing stored result {out.out.strip()} (config hash {folder.name})" in out.err


def test_formats_added_later_are_written_from_float_bin(tmp_path, monkeypatch, capsys, counted):
    """An entry stored with the SMV files only gets the CBF and NeXus files later without simulating,
    byte for byte the files a fresh run with every format writes; its checksums cover them."""
    (tmp_path / "d.geom").write_text(GEOM)
    monkeypatch.chdir(tmp_path)
    out = run_app(monkeypatch, capsys, *OVER, "store.formats=[smv]")
    folder = tmp_path / out.out.strip()
    assert len(counted) == 1 and not (folder / "image.nxs").exists()
    assert sorted(p.name for p in folder.glob("*.cbf")) == []
    before = json.loads((folder / "run.json").read_text())
    out = run_app(monkeypatch, capsys, *OVER, "store.formats=[smv,cbf,nexus]")
    assert tmp_path / out.out.strip() == folder and len(counted) == 1, out.err
    assert "added image_p0.cbf, image_p1.cbf, image.nxs" in out.err and "nothing simulated" in out.err
    doc, images = panels_of(folder)
    assert doc["created_utc"] == before["created_utc"] and doc["files_sha256"]["float.bin"] == \
        before["files_sha256"]["float.bin"]
    check_files(folder, doc, images, ("smv", "cbf", "nexus"))
    # the same files as a fresh run with every format (another root)
    out = run_app(monkeypatch, capsys, *OVER, "store.formats=[smv,cbf,nexus]", "store.root=fresh")
    fresh = tmp_path / out.out.strip()
    assert len(counted) == 2 and fresh.name == folder.name          # the config hash is the same
    for name in ("int_p0.img", "int_p1.img", "image_p0.cbf", "image_p1.cbf", "float.bin"):
        assert (fresh / name).read_bytes() == (folder / name).read_bytes(), name
    with h5py.File(fresh / "image.nxs") as a, h5py.File(folder / "image.nxs") as b:
        assert np.array_equal(a["/entry/data/data"][()], b["/entry/data/data"][()])
    # verification covers the added files: a changed CBF is found and the entry recomputed
    assert store.verify_entry(folder, folder.name)[0] is not None
    cbf = folder / "image_p1.cbf"
    raw = bytearray(cbf.read_bytes())
    raw[-10] ^= 0xFF
    cbf.write_bytes(bytes(raw))
    doc, why = store.verify_entry(folder, folder.name)
    assert doc is None and why == "image_p1.cbf does not match its checksum (edited or corrupted)"
    out = run_app(monkeypatch, capsys, *OVER, "store.formats=[smv,cbf,nexus]")
    assert len(counted) == 3 and "image_p1.cbf does not match its checksum" in out.err
    assert store.verify_entry(folder, folder.name)[0] is not None


def test_panel_roi_and_int32_nexus_added_later(tmp_path, counted):
    """detector.panels tiling a 32x32 detector in 4 panels, one with a ROI: the files added later keep
    0 outside that panel's ROI, as the fresh run's do (ROI from the spec's panels)."""
    tiles = ("[{fpixels:16,spixels:16,offset_px:[0,0]},{fpixels:16,spixels:16,offset_px:[16,0],roi:[2,9,3,12]},"
             "{fpixels:16,spixels:16,offset_px:[0,16]},{fpixels:16,spixels:16,offset_px:[16,16]}]")
    spec, dev = compose_spec(OVER[:-1] + ["detector.fpixels=32", "detector.spixels=32", f"detector.panels={tiles}"])
    kw = dict(base_dir=tmp_path, log=lambda m: None, nexus_dtype="int32")
    folder, reused, doc = store.run_or_reuse(spec, dev, root=tmp_path / "a", formats=(), **kw)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "float.bin", "log.txt", "preview.png",
                                                        "preview.thumb.png", "run.json"]
    folder, reused, doc = store.run_or_reuse(spec, dev, root=tmp_path / "a", formats=("smv", "cbf", "nexus"), **kw)
    assert reused and len(counted) == 1
    fresh, _, fdoc = store.run_or_reuse(spec, dev, root=tmp_path / "b", formats=("smv", "cbf", "nexus"), **kw)
    assert len(counted) == 2 and doc["intfile_scale"] == fdoc["intfile_scale"]
    names = [f"{s}_p{i}.{e}" for i in range(4) for s, e in (("int", "img"), ("image", "cbf"))]
    for name in names:
        assert (fresh / name).read_bytes() == (folder / name).read_bytes(), name
    roi = np.zeros((16, 16), bool)
    roi[3:13, 2:10] = True
    cbf = fabio.open(str(folder / "image_p1.cbf")).data
    assert (cbf[~roi] == 0).all() and (cbf[roi] > 0).all()
    with h5py.File(folder / "image_int32.nxs") as f:
        data = f["/entry/data/data"][0]
        assert data.dtype == np.int32 and np.array_equal(data[16:32], cbf)
        assert np.array_equal(f["/entry/instrument/detector/pixel_mask"][16:32] == 1, ~roi)
    assert store.verify_entry(folder, folder.name)[0] is not None


def test_noise_and_pgm_still_refused_with_panels(tmp_path):
    spec, dev = compose_spec(OVER)
    (tmp_path / "d.geom").write_text(GEOM)
    for key in ("write_noise", "write_pgm"):
        with pytest.raises(store.SpecError) as e:
            store.run_or_reuse(spec, dev, root=tmp_path / "o", base_dir=tmp_path, log=lambda m: None,
                               **{key: True})
        assert e.value.key == f"store.{key}" and "several panels" in str(e.value)


# ---------------------------------------------------------------------------------------------
# a one-panel geometry file is stored like a single-panel run
# ---------------------------------------------------------------------------------------------

Cr, Sr = COS30, SIN30                            # the rotated 16x12 panel of test_geom_files
ONE_PANEL = geom(ROTATED_16x12, res=5000, clen=0.06, coffset=0.001, comment="one rotated panel")
# the same panel as a custom-vector single-panel detector (nbsim frame: CrystFEL (x, y, z) = (z, y, x))
FAST, SLOW, ORIGIN_MM = [0.0, Sr, -Cr], [0.0, Cr, Sr], [61.0, -1.5, 4.0]
ONE_OVER = OVER[:-1] + ["detector.oversample=2", "image.noise_seed=7"]
SINGLE_FILES = ("float.bin", "int.img", "noise.img", "image.pgm", "image.cbf", "preview.png")


def _custom_vector_over():
    odet = np.cross(FAST, SLOW).tolist()
    vec = lambda v: "[" + ",".join(repr(float(x)) for x in v) + "]"
    return ["detector=custom", "detector.fpixels=16", "detector.spixels=12", "detector.pixel_mm=0.2",
            "detector.distance_mm=61", f"detector.fdet_vector={vec(FAST)}", f"detector.sdet_vector={vec(SLOW)}",
            f"detector.odet_vector={vec(odet)}", f"detector.pix0_vector_mm={vec(ORIGIN_MM)}",
            "detector.rotx_deg=0", "detector.roty_deg=0", "detector.rotz_deg=0", "detector.twotheta_deg=0",
            "fix=[pix0_overwritten]"]


def _header_close(a, b, keys):
    for k in keys:
        x, y = float(a[k]), float(b[k])
        assert abs(x - y) <= 1e-6 * abs(y), (k, x, y)


@pytest.mark.parametrize("how", ["geom", "panels"])
def test_one_panel_entry_is_a_single_panel_entry(tmp_path, counted, how):
    """A one-panel geometry file (or detector.panels with one entry) with noise, PGM, CBF and NeXus
    writes the single-panel entry's files (int.img, noise.img, image.pgm, image.cbf, preview.png), equal
    to those of the matching custom-vector single-panel run: data bit for bit, headers to 1e-6."""
    (tmp_path / "d.geom").write_text(ONE_PANEL)
    if how == "geom":
        over = ONE_OVER + ["detector.geometry_file=d.geom"]
    else:
        one = ("[{fpixels:16,spixels:12,pixel_mm:0.2,fast:" + str(FAST).replace(" ", "") + ",slow:"
               + str(SLOW).replace(" ", "") + ",origin_mm:" + str(ORIGIN_MM).replace(" ", "") + "}]")
        over = ONE_OVER + [f"detector.panels={one}"]
    spec, dev = compose_spec(over)
    kw = dict(base_dir=tmp_path, log=lambda m: None, write_noise=True, write_pgm=True,
              formats=("smv", "cbf", "nexus"))
    folder, reused, doc = store.run_or_reuse(spec, dev, root=tmp_path / "g", **kw)
    single_spec, sdev = compose_spec(ONE_OVER + _custom_vector_over())
    sfolder, _, sdoc = store.run_or_reuse(single_spec, sdev, root=tmp_path / "s", **kw)
    assert len(counted) == 2 and not reused
    names = sorted(p.name for p in folder.iterdir())
    assert set(SINGLE_FILES) <= set(names) and "image.nxs" in names
    assert not [n for n in names if n.startswith(("int_", "image_p"))]
    assert store.verify_entry(folder, folder.name)[0] is not None
    f = np.fromfile(folder / "float.bin", "<f4")
    assert f.size == 16 * 12 and f.max() > 1.0
    assert np.array_equal(f, np.fromfile(sfolder / "float.bin", "<f4"))
    for name in ("int.img", "noise.img", "image.cbf"):
        a, b = fabio.open(str(folder / name)), fabio.open(str(sfolder / name))
        assert a.data.shape == (12, 16) and a.data.max() > 0, name
        assert float(np.abs(a.data.astype(np.int64) - b.data.astype(np.int64)).max()) == 0.0, name
        if name != "image.cbf":
            _header_close(a.header, b.header, ("PIXEL_SIZE", "DISTANCE", "WAVELENGTH", "SIZE1", "SIZE2"))
    assert (folder / "image.pgm").read_bytes() == (sfolder / "image.pgm").read_bytes()
    assert doc["photons"] == sdoc["photons"] and doc["intfile_scale"] == sdoc["intfile_scale"]
    hdr = lambda d: {ln.split()[1]: ln.split()[2] for ln in
                     fabio.open(str(d / "image.cbf")).header["_array_data.header_contents"].splitlines()
                     if ln.startswith("# ") and ln.split()[1] in ("Pixel_size", "Detector_distance", "Wavelength")}
    assert len(hdr(folder)) == 3
    _header_close(hdr(folder), hdr(sfolder), hdr(sfolder))
    with h5py.File(folder / "image.nxs") as a, h5py.File(sfolder / "image.nxs") as b:
        da, db = a["/entry/data/data"][()], b["/entry/data/data"][()]
        assert da.shape == db.shape and float(np.abs(da - db).max()) == 0.0
    # the panel's own beam centre (the custom-vector header keeps the unused default Xbeam/Ybeam)
    hit = np.array([61.0, 0.0, 0.0]) - np.array(ORIGIN_MM)
    h = fabio.open(str(folder / "int.img")).header
    assert abs(float(h["BEAM_CENTER_X"]) - hit @ FAST) <= 1e-4 and abs(float(h["BEAM_CENTER_Y"]) - hit @ SLOW) <= 1e-4


def test_one_panel_products_added_later_equal_a_fresh_run(tmp_path, counted):
    """Noise, PGM and CBF asked later of a one-panel .geom entry are added from float.bin (nothing
    simulated), byte for byte those of a fresh run, with the panel's header."""
    (tmp_path / "d.geom").write_text(ONE_PANEL)
    spec, dev = compose_spec(ONE_OVER + ["detector.geometry_file=d.geom"])
    kw = dict(base_dir=tmp_path, log=lambda m: None)
    folder, _, _ = store.run_or_reuse(spec, dev, root=tmp_path / "a", formats=(), **kw)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("preview")) == \
        ["config.yaml", "float.bin", "log.txt", "run.json"]
    more = dict(kw, write_noise=True, write_pgm=True, formats=("smv", "cbf"))
    folder, reused, doc = store.run_or_reuse(spec, dev, root=tmp_path / "a", **more)
    assert reused and len(counted) == 1
    fresh, _, fdoc = store.run_or_reuse(spec, dev, root=tmp_path / "b", **more)
    assert len(counted) == 2 and fresh.name == folder.name
    for name in ("float.bin", "int.img", "noise.img", "image.pgm", "image.cbf"):
        assert (fresh / name).read_bytes() == (folder / name).read_bytes(), name
    assert doc["photons"] == fdoc["photons"] is not None
    assert store.verify_entry(folder, folder.name)[0] is not None


# ---------------------------------------------------------------------------------------------
# the preview of a multi-panel entry: written, verified, added later, on the sweep's contact sheet
# ---------------------------------------------------------------------------------------------

def _rewrite_run_json(folder, doc):
    doc[store.CHECKSUM_KEY] = store._doc_checksum(doc)
    (folder / "run.json").write_text(json.dumps(doc, indent=2) + "\n")


def test_multi_panel_preview_is_verified_and_added_to_an_older_entry(tmp_path, counted):
    pytest.importorskip("matplotlib")
    (tmp_path / "d.geom").write_text(GEOM)
    spec, dev = compose_spec(OVER)
    kw = dict(base_dir=tmp_path, log=lambda m: None)
    folder, _, doc = store.run_or_reuse(spec, dev, root=tmp_path / "a", **kw)
    assert {"preview.png", "preview.thumb.png"} <= set(doc["files_sha256"])
    full, thumb = (folder / "preview.png").read_bytes(), (folder / "preview.thumb.png").read_bytes()
    # a damaged thumbnail is found by the verification (and the entry recomputed, same picture)
    raw = bytearray(thumb)
    raw[len(raw) // 2] ^= 0xFF
    (folder / "preview.thumb.png").write_bytes(bytes(raw))
    assert store.verify_entry(folder, folder.name) == (
        None, "preview.thumb.png does not match its checksum (edited or corrupted)")
    folder, reused, doc = store.run_or_reuse(spec, dev, root=tmp_path / "a", **kw)
    assert not reused and len(counted) == 2 and (folder / "preview.thumb.png").read_bytes() == thumb
    # an entry stored before multi-panel previews (no preview files, no previews): the preview is
    # added from float.bin without simulating, the same files as a fresh run's
    for n in ("preview.png", "preview.thumb.png"):
        (folder / n).unlink()
        del doc["files_sha256"][n]
    doc["previews"] = {}
    doc["files"] = [n for n in doc["files"] if n != "preview.png"]
    _rewrite_run_json(folder, doc)
    assert store.verify_entry(folder, folder.name)[0] is not None
    folder, reused, doc = store.run_or_reuse(spec, dev, root=tmp_path / "a", **kw)
    assert reused and len(counted) == 2
    assert (folder / "preview.png").read_bytes() == full and (folder / "preview.thumb.png").read_bytes() == thumb
    assert store.verify_entry(folder, folder.name)[0] is not None and doc["previews"] == {"log": "preview.png"}


def test_sweep_contact_sheet_shows_multi_panel_thumbnails(tmp_path, counted):
    """A sweep of a two-panel detector (run_many with the sweep's thumbnail size): each point's
    preview.png is the multi-panel picture at most 200 px a side, and the contact sheet shows it
    (before, the entry had no preview and the sheet a grey 'missing' tile)."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from pipeline.contact_sheet import _fit
    from pipeline.sweep import Point, write_summary
    (tmp_path / "d.geom").write_text(GEOM)
    items = [compose_spec(OVER + [f"crystal.N={n}"]) for n in (2, 3)]
    out = store.run_many(items, root=tmp_path / "st", base_dir=tmp_path, log=lambda m: None, thumb=200)
    points = []
    for i, (folder, reused, doc) in enumerate(out):
        assert not reused and doc["preview_thumb_px"] == 200
        assert sorted(n for n in doc["files_sha256"] if n.startswith("preview")) == ["preview.png"]
        with Image.open(folder / "preview.png") as im:
            assert max(im.size) <= 200 and min(im.size) > 50
            rgb = np.asarray(im.convert("RGB")).astype(int)
        assert rgb.min() < 100 and rgb.max() > 240            # dark pixels (spots) and white gaps
        assert store.entry_thumbnail(folder) == folder / "preview.png"
        points.append(Point(index=i, params={"crystal.N": (2, 3)[i]}, overrides=[], hash=folder.name))
    sheet = tmp_path / "sheet.png"
    write_summary(points, tmp_path / "st", tmp_path / "s.csv", sheet, name="p", thumb=200)
    with Image.open(sheet) as im:
        got = np.asarray(im.convert("RGB")).astype(int)
    pad, title_h = 6, 12 + 10
    for c, (folder, _, _) in enumerate(out):
        with Image.open(folder / "preview.png") as im:
            t = np.asarray(_fit(im.convert("RGB"), 200)).astype(int)
        x = pad + c * (200 + pad) + (200 - t.shape[1]) // 2
        y = title_h + pad + (200 - t.shape[0]) // 2
        assert np.array_equal(got[y:y + t.shape[0], x:x + t.shape[1]], t), c
    # an entry of a single run has the full picture and its thumbnail: the sheet takes the thumbnail
    folder, _, _ = store.run_or_reuse(*items[0], root=tmp_path / "one", base_dir=tmp_path, log=lambda m: None)
    assert store.entry_thumbnail(folder) == folder / "preview.thumb.png"


def test_multi_panel_preview_without_matplotlib_is_the_panels_stacked(tmp_path, monkeypatch):
    """Without matplotlib the preview is grayscale: the panels stacked along slow in geometry order
    (narrower ones padded with the minimum), white = bright, as the single-panel grayscale preview."""
    from PIL import Image

    from pipeline.preview import panels_preview_png, to_uint8
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.full((2, 3), 20.0, np.float32)
    written = panels_preview_png([a, b], tmp_path / "p.png", "log")
    assert written == [tmp_path / "p.png"]
    with Image.open(tmp_path / "p.png") as im:
        got = np.asarray(im)
    stack = np.zeros((5, 4))
    stack[:3], stack[3:, :3] = a, b
    assert got.shape == (5, 4) and np.array_equal(got, to_uint8(stack, "log"))
    assert got[3:, :3].min() == 255 and got[3:, 3].max() == 0
