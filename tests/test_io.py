"""nbsim.io against the nanoBragg C reference outputs: SMV headers, int/pgm pixels, statistics,
tables, atomic writes and the combined product writer."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

try:
    import golden_data as gd
except ImportError:  # tests/ imported as a package
    from tests import golden_data as gd

from nbsim.io import atomic, images, products, smv, tables

RTD = 180.0 / math.pi


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.bin"
    atomic.atomic_write_bytes(p, b"first")
    atomic.atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic.atomic_write_bytes(p, 12345)  # not bytes-like: fails while writing the temp file
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.atomic_write_bytes(tmp_path / "nodir" / "x", b"")


def test_atomic_dir_success_failure_and_replace(tmp_path):
    final = tmp_path / "run"
    with atomic.atomic_dir(final) as d:
        (d / "a.txt").write_text("1")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "1"

    with pytest.raises(RuntimeError), atomic.atomic_dir(tmp_path / "broken") as d:
        (d / "partial").write_text("x")
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing left behind

    with atomic.atomic_dir(final) as d:  # replaces the existing tree
        (d / "b.txt").write_text("2")
    assert sorted(os.listdir(final)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["run"]


# --------------------------------------------------------------------------- SMV headers
def test_smv_header_g01_by_hand():
    """G01 header from the numbers in its C stdout (mm / A / px / deg)."""
    info = dict(fpixels=256, spixels=256, pixel_mm=0.1, distance_mm=100.0, wavelength_A=1.0,
                xbeam_mm=12.85, ybeam_mm=12.85, fbeam_mm=12.9, sbeam_mm=12.9, detsize_s_mm=25.6,
                dials_origin_mm=[-12.9, 12.9, -100.0], orgx_px=129.5, orgy_px=129.5,
                close_distance_mm=100.0, phi_deg=0.0, osc_deg=0.0, twotheta_deg=0.0)
    head = smv.smv_header(info)
    assert len(head) == 512
    assert head == gd.smv_raw("G01_cubic", "int")[:512]
    assert head == gd.smv_raw("G01_cubic", "noise")[:512]


def test_smv_header_g17_from_si_values():
    """G17 header through smv_info from C's internal SI values (stdout: metres)."""
    info = smv.smv_info(fpixels=192, spixels=192, pixel_size_m=0.00015, distance_m=0.1,
                        lambda_m=1e-10, Xbeam_m=0.014475, Ybeam_m=0.014475, Fbeam_m=0.01455,
                        Sbeam_m=0.01455, detsize_s_m=0.0288, dials_origin_mm=[-14.55, 14.55, -100],
                        ORGX=97.5, ORGY=97.5, close_distance_m=0.1)
    assert smv.smv_header(info) == gd.smv_raw("G17_water_flux_noise", "int")[:512]
    assert smv.smv_header(info) == gd.smv_raw("G17_water_flux_noise", "noise")[:512]


def _info_from_header(h: dict) -> dict:
    """Re-derive an info dict from a parsed nanoBragg header (exact printed values)."""
    f = lambda k: float(h[k])
    return dict(fpixels=int(h["SIZE1"]), spixels=int(h["SIZE2"]), pixel_mm=f("PIXEL_SIZE"),
                distance_mm=f("DISTANCE"), wavelength_A=f("WAVELENGTH"), xbeam_mm=f("BEAM_CENTER_X"),
                ybeam_mm=f("BEAM_CENTER_Y"), fbeam_mm=f("ADXV_CENTER_X"), sbeam_mm=f("DENZO_X_BEAM"),
                detsize_s_mm=0.0, adxv_center_y_mm=f("ADXV_CENTER_Y"),
                mosflm_center_x_mm=f("MOSFLM_CENTER_X"), mosflm_center_y_mm=f("MOSFLM_CENTER_Y"),
                denzo_x_beam_mm=f("DENZO_X_BEAM"), denzo_y_beam_mm=f("DENZO_Y_BEAM"),
                dials_origin_mm=[float(v) for v in h["DIALS_ORIGIN"].split(",")],
                orgx_px=f("XDS_ORGX"), orgy_px=f("XDS_ORGY"), close_distance_mm=f("CLOSE_DISTANCE"),
                phi_deg=f("PHI"), osc_deg=f("OSC_RANGE"), twotheta_deg=f("TWOTHETA"))


def _all_smv():
    out = [(cid, kind, gd.smv_raw(cid, kind)) for kind in ("int", "noise") for cid in gd.case_ids(kind)]
    for cid in ("c1", "c2", "c3"):
        for kind in ("int", "noise"):
            out.append((cid, kind, gd.c_extra_file(f"{cid}.{kind}.img")))
    return out


def test_smv_parse_and_reemit_every_reference_image(tmp_path):
    for cid, kind, raw in _all_smv():
        h, data = smv.parse_smv(raw, cid)
        assert h["HEADER_BYTES"] == "512" and h["BYTE_ORDER"] == "little_endian"
        assert data.dtype == np.uint16 and data.shape == (int(h["SIZE2"]), int(h["SIZE1"]))
        assert "XDS_ORGX" in h and h["DIALS_ORIGIN"].count(",") == 2  # DIALS line has no ';'
        info = _info_from_header(h)
        assert smv.smv_header(info) == raw[:512], (cid, kind)
        p = smv.write_smv(tmp_path / f"{cid}.{kind}.img", data, info)
        assert p.read_bytes() == raw, (cid, kind)
        h2, d2 = smv.read_smv(p)
        assert h2 == h and np.array_equal(d2, data)


def test_smv_big_endian_and_errors(tmp_path):
    h, data = smv.parse_smv(gd.smv_raw("G19_roi_nopolar", "int"))
    info = _info_from_header(h)
    raw = smv.smv_header(info, byte_order="big_endian") + data.astype(">u2").tobytes()
    h2, d2 = smv.parse_smv(raw)
    assert h2["BYTE_ORDER"] == "big_endian" and np.array_equal(d2, data)
    with pytest.raises(ValueError, match="truncated"):
        smv.parse_smv(raw[:-2], "x.img")
    with pytest.raises(ValueError, match="not an SMV"):
        smv.parse_smv(b"P5\n1 1\n255\n\0", "x.img")
    with pytest.raises(KeyError, match="wavelength_A"):
        smv.smv_header({k: v for k, v in info.items() if k != "wavelength_A"})
    with pytest.raises(ValueError, match="shape"):
        smv.smv_bytes(data[:, :-1], info)


def test_c_g_matches_printf():
    assert [smv.c_g(v) for v in (0.1, 100.0, 1e6, 1e-5, 129.5, -0.0, 474.28, float("inf"))] == \
        ["0.1", "100", "1e+06", "1e-05", "129.5", "-0", "474.28", "inf"]
    assert smv.c_g(float("nan")) == "nan" and smv.c_g(-float("nan")) == "-nan"


# --------------------------------------------------------------------------- images / stats
INT_CASES = ["G01_cubic", "G17_water_flux_noise", "G19_roi_nopolar"]


@pytest.mark.parametrize("cid", INT_CASES)
def test_int_image_matches_golden_exactly(cid):
    c = gd.case(cid)
    img = gd.load_float(cid)
    roi = images.roi_mask(c["fpixels"], c["spixels"], gd.roi(cid))
    st = images.image_stats(img, roi)
    scale = images.default_int_scale(st["max_I"])
    got = images.int_image(img, scale, 40.0, roi)
    _, ref = smv.parse_smv(gd.smv_raw(cid, "int"))
    exact = float(np.mean(got == ref))
    assert exact == 1.0, f"{cid}: exact fraction {exact}"
    assert smv.c_g(scale) == gd.stdout_numbers(gd.stdout(cid))["intfile_scale"]


def test_g19_roi_outside_is_zero():
    img = gd.load_float("G19_roi_nopolar")
    roi = images.roi_mask(200, 200, (50, 150, 60, 120))
    assert roi.sum() == 101 * 61 and roi[60, 50] and roi[120, 150] and not roi[59, 50] and not roi[60, 151]
    _, ref = smv.parse_smv(gd.smv_raw("G19_roi_nopolar", "int"))
    assert np.all(ref[~roi] == 0) and np.all(img[~roi] == 0)


@pytest.mark.parametrize("cid", gd.case_ids())
def test_image_stats_match_c_stdout(cid):
    c = gd.case(cid)
    img = gd.load_float(cid)
    roi = images.roi_mask(c["fpixels"], c["spixels"], gd.roi(cid))
    st = images.image_stats(img, roi)
    ref = gd.stdout_numbers(gd.stdout(cid))
    assert smv.c_g(st["max_I"]) == ref["max_I"]
    assert (smv.c_g(st["mean"]), smv.c_g(st["rms"]), smv.c_g(st["rmsd"])) == (ref["mean"], ref["rms"], ref["rmsd"])
    assert smv.c_g(images.default_int_scale(st["max_I"])) == ref["intfile_scale"]


def test_int_scale_defaults_and_clipping():
    assert images.default_int_scale(0.0) == 1.0 and images.default_int_scale(-5.0) == 1.0
    assert images.default_int_scale(110.0) == 500.0
    assert images.default_pgm_scale(0.0, 7.0) == 7.0 and images.default_pgm_scale(5.0, 7.0) == 10.0
    img = np.array([[0.0, 1.0, 2.0, -1.0], [1e9, 0.49999, 0.5, np.nan]], dtype=np.float32)
    got = images.int_image(img, 1.0, 0.0)
    assert got.tolist() == [[0, 1, 2, 0], [65535, 0, 1, 0]]
    m = np.array([[True, False, True, True], [True, True, True, True]])
    assert images.int_image(img, 1.0, 40.0, m)[0].tolist() == [40, 0, 42, 39]
    assert images.c_uchar(np.array([255.9, -3.5, np.nan])).tolist() == [255, 253, 0]


def test_pgm_and_full_products_match_c_byte_for_byte(tmp_path):
    """c3: -mask + -roi; every output file identical to the C program's."""
    cx = gd.c_extra_cases()["c3"]
    img = gd.c_extra_float("c3")
    _, maskdata = smv.parse_smv(gd.c_extra_file("c3.mask.img"))
    roi = images.roi_mask(48, 48, cx["roi"])
    active = roi & (maskdata != 0)
    h, _ = smv.parse_smv(gd.c_extra_file("c3.int.img"))
    info = _info_from_header(h)
    spec = {"adc": 40.0, "int_scale": None, "pgm_scale": None, "noise_seed": cx["noise_seed"]}
    res = products.write_products(img, roi, info, spec, float_path=tmp_path / "f.bin",
                                  int_path=tmp_path / "i.img", noise_path=tmp_path / "n.img",
                                  pgm_path=tmp_path / "p.pgm", active=active)
    assert (tmp_path / "f.bin").read_bytes() == gd.c_extra_file("c3.float.bin")
    assert (tmp_path / "i.img").read_bytes() == gd.c_extra_file("c3.int.img")
    assert (tmp_path / "p.pgm").read_bytes() == gd.c_extra_file("c3.pgm")
    assert (tmp_path / "n.img").read_bytes() == gd.c_extra_file("c3.noise.img")
    out = gd.c_extra_file("c3.stdout.txt").decode()
    for line in res["lines"]:
        assert line in out.splitlines(), line
    assert res["overloads"] == 0 and res["noise_seed"] == -21
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "i.img", "n.img", "p.pgm"]


@pytest.mark.parametrize("synced", [True, False])
def test_products_write_failure_raises_and_leaves_no_partial_file(tmp_path, monkeypatch, synced):
    """Files are written in background threads (fsync'ed), or in the calling thread inside
    ``unsynced_files`` (no thread started): either way a failing one still raises, every other file
    is complete or absent, and no temporary file is left behind."""
    import contextlib

    from nbsim.io.atomic import unsynced_files
    if not synced:
        monkeypatch.setattr(products, "ThreadPoolExecutor", None)   # any thread pool would fail
    img = gd.c_extra_float("c2")
    info = _info_from_header(smv.parse_smv(gd.c_extra_file("c3.int.img"))[0])
    spec = {"adc": 40.0, "int_scale": None, "pgm_scale": None, "noise_seed": -5}
    with contextlib.nullcontext() if synced else unsynced_files():
        with pytest.raises(FileNotFoundError, match="does not exist"):
            products.write_products(img, None, info, spec, float_path=tmp_path / "f.bin",
                                    int_path=tmp_path / "missing" / "i.img", noise_path=tmp_path / "n.img")
        for name in os.listdir(tmp_path):
            assert name in ("f.bin", "n.img"), name
        if (tmp_path / "f.bin").exists():
            assert (tmp_path / "f.bin").read_bytes() == img.astype("<f4").tobytes()
        res = products.write_products(img, None, info, spec, float_path=tmp_path / "f.bin",
                                      int_path=tmp_path / "i.img", noise_path=tmp_path / "n.img",
                                      pgm_path=tmp_path / "p.pgm")
    assert res["written"] == [tmp_path / "f.bin", tmp_path / "i.img", tmp_path / "p.pgm", tmp_path / "n.img"]
    assert (tmp_path / "f.bin").read_bytes() == img.astype("<f4").tobytes()
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "i.img", "n.img", "p.pgm"]


def test_pgm_c2_and_products_defaults(tmp_path):
    img = gd.c_extra_float("c2")
    st = images.image_stats(img)
    ps = images.default_pgm_scale(st["rmsd"], images.default_int_scale(st["max_I"]))
    assert images.pgm_bytes(img, ps) == gd.c_extra_file("c2.pgm")
    # only the float file requested: nothing else written; clock seed not used
    res = products.write_products(img, None, {}, None, float_path=tmp_path / "f.bin")
    assert res["photons"] is None and res["written"] == [tmp_path / "f.bin"]
    assert images.read_float(tmp_path / "f.bin", 48, 48).tobytes() == img.tobytes()
    assert abs(products.clock_seed()) > 1_600_000_000
    with pytest.raises(ValueError, match="expected"):
        images.read_float(tmp_path / "f.bin", 48, 47)


# --------------------------------------------------------------------------- tables
def test_read_hkl_and_dense_table():
    hkl, F = tables.read_hkl(gd.golden_dir() / "inputs" / "P1.hkl")
    assert hkl.shape == (4913, 3) and hkl.dtype == np.int64 and F.shape == (4913,)
    assert hkl[0].tolist() == [-8, -8, -8] and F[0] == 90.018
    ranges, table = tables.hkl_table(hkl, F, default_F=0.0)
    assert ranges == (-8, 8, -8, 8, -8, 8) and table.shape == (17, 17, 17)
    assert table[0, 0, 1] == 58.143  # (-8, -8, -7)
    assert "4913 initialized hkls" in gd.stdout("G03_mat_hkl")


def test_hkl_table_default_and_duplicates(tmp_path):
    p = tmp_path / "x.hkl"
    p.write_text("0 0 0 1\n\n 2 1 0 2.5\n0 0 0 3.0\n")
    hkl, F = tables.read_hkl(p)
    ranges, t = tables.hkl_table(hkl, F, default_F=7.0)
    assert ranges == (0, 2, 0, 1, 0, 0) and t.shape == (3, 2, 1)
    assert t[0, 0, 0] == 3.0 and t[2, 1, 0] == 2.5 and t[1, 0, 0] == 7.0  # last duplicate wins


@pytest.mark.parametrize("text,msg", [
    ("1 2 3 4\n1 2 x 4\n", r"x.hkl:2: h, k, l must be integers"),
    ("1 2 3 4\n1.5 2 3 4\n", r"x.hkl:2: h, k, l must be integers"),
    ("1 2 3\n", r"x.hkl:1: expected 'h k l F'"),
    ("1 2 3 4 5\n", r"x.hkl:1: expected 'h k l F'"),
    ("1 2 3 F\n", r"x.hkl:1: F is not a number"),
    ("\n\n", r"no 'h k l F' entries"),
])
def test_read_hkl_errors_name_file_and_line(tmp_path, text, msg):
    p = tmp_path / "x.hkl"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
        tables.read_hkl(p)


def test_fdump_matches_c_and_round_trips(tmp_path):
    hkl, F = tables.read_hkl(gd.C_EXTRA / "small.hkl")
    ranges, table = tables.hkl_table(hkl, F, default_F=3.0)
    c_bytes = (gd.C_EXTRA / "small.Fdump.bin").read_bytes()
    assert tables.fdump_bytes(ranges, table) == c_bytes  # header "%d...\n\f", +1 zero padding
    r2, t2 = tables.read_fdump(gd.C_EXTRA / "small.Fdump.bin")
    assert r2 == ranges and np.array_equal(t2, table)
    # the big table round-trips
    hkl, F = tables.read_hkl(gd.golden_dir() / "inputs" / "P1.hkl")
    ranges, table = tables.hkl_table(hkl, F)
    p = tables.write_fdump(tmp_path / "Fdump.bin", ranges, table)
    assert p.stat().st_size == len(b"-8 8 -8 8 -8 8\n\f") + 18 ** 3 * 8
    r3, t3 = tables.read_fdump(p)
    assert r3 == ranges and np.array_equal(t3, table)
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        tables.read_fdump(p)


def test_read_matrix_columns_are_reciprocal_vectors(tmp_path):
    M = tables.read_matrix(gd.golden_dir() / "inputs" / "A.mat")
    assert M.shape == (3, 3)
    # G03 trace: "a_star (raw) = [0.0177549, 0.0180335, 0.00554525]" = first column of the file
    assert np.allclose(M[:, 0], [0.0177549, 0.0180335, 0.00554525], rtol=1e-5)
    assert np.allclose(M[:, 2], [8.30553e-05, -0.00405912, 0.0164468], rtol=1e-5)
    p = tmp_path / "bad.mat"
    p.write_text("1 2 3\n4 5 6\n7 8\n")
    with pytest.raises(ValueError, match="need 9 numbers"):
        tables.read_matrix(p)
    p.write_text("1 2 3\n4 five 6\n")
    with pytest.raises(ValueError, match=r"bad.mat:2"):
        tables.read_matrix(p)


def test_read_sourcefile(tmp_path):
    s = tables.read_sourcefile(gd.golden_dir() / "inputs" / "sources.txt")
    assert s.shape == (4, 5) and s[2].tolist() == [-10, 0, -0.004, 1, 1.002e-10]
    p = tmp_path / "src.txt"
    p.write_text("-10, 0;0\n\n  \n-10\t1e-3 0 2 1e-10 99\n")
    s = tables.read_sourcefile(p)
    assert s.shape == (2, 5)
    assert s[0, :3].tolist() == [-10, 0, 0] and np.isnan(s[0, 3:]).all()
    assert s[1].tolist() == [-10, 1e-3, 0, 2, 1e-10]
    p.write_text("-10 0 0\n# comment\n")
    with pytest.raises(ValueError, match=r"src.txt:2: column 1"):
        tables.read_sourcefile(p)


def test_read_hkl_remembers_unchanged_files(tmp_path):
    p = tmp_path / "x.hkl"
    p.write_text("1 2 3 10\n-1 0 0 5.5\n")
    a = tables.read_hkl(p)
    assert tables.read_hkl(p)[0] is a[0]                   # parsed once
    with pytest.raises(ValueError):
        a[1][0] = 1.0                                       # shared arrays are read-only
    p.write_text("1 2 3 10\n-1 0 0 7.5\n0 0 1 1\n")       # changed file: parsed again
    hkl, F = tables.read_hkl(p)
    assert F.tolist() == [10.0, 7.5, 1.0] and hkl.shape == (3, 3)


def test_write_result_reuses_the_api_statistics(tmp_path):
    """write_result hands the API's statistics to the writers: the same numbers they compute."""
    from nbsim.api import simulate
    from nbsim.frontend.argv import parse_argv
    spec = parse_argv("-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 "
                      "-detpixels 40 -pixel 0.4 -roi 3 30 5 25".split()).spec
    res = simulate(spec)
    own = products.write_products(res.float32(), res.roi_mask, {}, None, active=res.mask)
    via = products.write_result(res, spec.image)
    for k in ("max_I", "mean", "rms", "rmsd", "sum", "intfile_scale", "pgm_scale"):
        assert via[k] == own[k], k
