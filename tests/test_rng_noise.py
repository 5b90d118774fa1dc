"""nbsim.rng and nbsim.noise against the nanoBragg C reference (bit-exact)."""
from __future__ import annotations

import math

import numpy as np
import pytest

try:
    import golden_data as gd
except ImportError:  # tests/ imported as a package
    from tests import golden_data as gd

from nbsim import noise, rng
from nbsim.io import images, smv

RTD = 180.0 / math.pi


def f32list(v):
    return [float(np.float32(x)) for x in v]


# --------------------------------------------------------------------------- ran1
def test_ran1_scalar_and_vectorised_streams_match_c():
    ref = gd.rng_reference()
    r = rng.Ran1(-7)
    assert [r() for _ in range(200)] == f32list(ref["ran1_seed_m7"])
    assert r.seed == ref["ran1_seed_m7_idum_after"]
    r = rng.Ran1(-7)
    parts = [r.draw(1), r.draw(70), r.draw(5), r.draw(124)]  # any chunking gives the same stream
    assert np.concatenate(parts).tolist() == f32list(ref["ran1_seed_m7"])
    assert r.seed == ref["ran1_seed_m7_idum_after"]
    assert rng.Ran1(-12345678).draw(50).tolist() == f32list(ref["ran1_seed_m12345678"])
    assert rng.Ran1(0).draw(10).tolist() == f32list(ref["ran1_seed_0"])  # seed 0 -> 1


def test_ran1_table_is_shared_between_streams():
    ref = gd.rng_reference()
    table = rng.Ran1Table()
    a, b = rng.Ran1(-99, table), rng.Ran1(5, table)  # b positive: continues a's table
    got = [a() for _ in range(5)] + [b() for _ in range(5)] + [a() for _ in range(5)]
    assert got == f32list(ref["ran1_shared_A5_B5_A5"])
    assert [a.seed, b.seed] == ref["ran1_shared_idums"]
    # a positive seed on a fresh table is replaced by 1
    assert rng.Ran1(5).draw(10).tolist() == rng.Ran1(-1).draw(10).tolist()
    assert rng.c_seed(7) == -7


def test_gammln_and_poidev_all_branches_match_c():
    ref = gd.rng_reference()
    assert [rng.gammln(x) for x in ref["gammln_x"]] == f32list(ref["gammln_y"])
    dv = rng.Deviates(rng.Ran1(-5))
    xm = ref["poidev_xm"]
    assert any(x > 1e6 for x in xm) and any(12 <= x <= 1e6 for x in xm) and any(x < 12 for x in xm)
    assert [dv.poidev(x) for x in xm] == f32list(ref["poidev_seed_m5"])
    assert dv.rng.seed == ref["poidev_idum_after"]


# --------------------------------------------------------------------------- mosaic / misset
def test_mosaic_umats_match_c():
    for m in gd.rng_reference()["mosaic"]:
        U = rng.mosaic_umats(m["spread_rad"], m["n"], m["seed"])
        assert U.shape == (m["n"], 3, 3)
        assert U.reshape(-1).tolist() == m["umats"]  # bit-exact
        assert np.array_equal(U[0], np.eye(3))
        # domain 0 also consumed its 3 draws
        r = rng.Ran1(m["seed"])
        rng.mosaic_umats(m["spread_rad"], m["n"], r)
        assert r.seed == m["seed_after"] and r.ndraws == 3 * m["n"]


def test_mosaic_g11_parameters_are_rotations():
    spread = 0.8 / RTD  # G11: -mosaic 0.8 -mosaic_dom 12 -mosaic_seed 99
    U = rng.mosaic_umats(spread, 12, rng.c_seed(99))
    assert np.allclose(U @ U.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    ang = np.degrees(np.arccos(np.clip((np.trace(U, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert ang[0] == 0 and 0 < ang[1:].max() <= 0.8 * (1 + 1e-6)
    with pytest.raises(ValueError):
        rng.mosaic_umats(spread, 0, -1)


def test_random_misset_matches_c_and_g23_stdout():
    for m in gd.rng_reference()["misset"]:
        ang = rng.random_misset(m["seed"])
        assert list(ang) == m["misset_rad"]
        assert "%f %f %f" % tuple(a * RTD for a in ang) == m["printed_deg"]
    # G23: -misset_seed 31 -misset random
    printed = gd.stdout_numbers(gd.stdout("G23_misset_random"))["misset_deg"]
    ang = rng.random_misset(rng.c_seed(31))
    assert "%f %f %f" % tuple(a * RTD for a in ang) == printed
    for m in gd.rng_reference()["umat2misset_special"]:
        assert list(rng.umat2misset(m["umat"])) == m["misset_rad"]


def test_umat2misset_inverts_rotate():
    rx, ry, rz = 0.3, -0.7, 1.1
    Rx = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    Ry = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
    Rz = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    assert np.allclose(rng.umat2misset(Rz @ Ry @ Rx), (rx, ry, rz), atol=1e-12)


# --------------------------------------------------------------------------- noise images
@pytest.mark.parametrize("backend", ["numba", "python"])
@pytest.mark.parametrize("cid", ["G01_cubic", "G17_water_flux_noise"])
def test_noise_image_reproduces_golden(cid, backend):
    img = gd.load_float(cid)
    seed = gd.c_noise_seed(cid)
    got, photons, overloads = noise.noise_image(img, seed, 40.0, backend=backend)
    assert noise.last_backend == backend
    _, ref = smv.parse_smv(gd.smv_raw(cid, "noise"))
    assert int(np.abs(got.astype(int) - ref.astype(int)).max()) == 0
    out = gd.stdout_numbers(gd.stdout(cid))
    assert f"{photons:.0f}" == out["photons"] and str(overloads) == out["overloads"]
    assert str(seed) == out["seed"]


@pytest.mark.parametrize("backend", ["numba", "python"])
def test_noise_gauss_and_rejection_branches_roi_adc_overloads(backend):
    """c1: means up to 4e7 (xm > 1e6 and rejection branches), ROI, -adc 10, overloads."""
    cx = gd.c_extra_cases()["c1"]
    img = gd.c_extra_float("c1")
    roi = images.roi_mask(cx["fpixels"], cx["spixels"], cx["roi"])
    got, photons, overloads = noise.noise_image(img, cx["noise_seed"], cx["adc"], roi, backend=backend)
    assert noise.last_backend == backend
    _, ref = smv.parse_smv(gd.c_extra_file("c1.noise.img"))
    assert np.array_equal(got, ref)
    assert np.all(got[~roi] == 0)
    out = gd.stdout_numbers(gd.c_extra_file("c1.stdout.txt").decode())
    assert f"{photons:.0f}" == out["photons"] and str(overloads) == out["overloads"] == "1845"
    v = img[roi]
    assert (v > 1e6).sum() > 100 and ((v >= 12) & (v <= 1e6)).sum() > 100


@pytest.mark.parametrize("backend", ["numba", "python"])
def test_noise_positive_seed_continues_mosaic_table(backend):
    """c2: '-seed -3' makes the C seed +3, which reuses the shuffle table the mosaic stream left."""
    cx = gd.c_extra_cases()["c2"]
    img = gd.c_extra_float("c2")
    _, ref = smv.parse_smv(gd.c_extra_file("c2.noise.img"))
    table = rng.Ran1Table()
    rng.mosaic_umats(cx["mosaic_spread_deg"] / RTD, cx["mosaic_domains"], cx["mosaic_seed"], table)
    got, photons, _ = noise.noise_image(img, cx["noise_seed"], 40.0, table=table, backend=backend)
    assert noise.last_backend == backend
    assert np.array_equal(got, ref)
    assert f"{photons:.0f}" == gd.stdout_numbers(gd.c_extra_file("c2.stdout.txt").decode())["photons"]
    fresh, _, _ = noise.noise_image(img, cx["noise_seed"], 40.0, backend=backend)  # without the shared table: differs
    assert not np.array_equal(fresh, ref)


@pytest.mark.parametrize("backend", ["numba", "python"])
def test_noise_masked_pixels_get_adc(backend):
    cx = gd.c_extra_cases()["c3"]
    img = gd.c_extra_float("c3")
    _, mask = smv.parse_smv(gd.c_extra_file("c3.mask.img"))
    roi = images.roi_mask(48, 48, cx["roi"])
    got, _, _ = noise.noise_image(img, cx["noise_seed"], 40.0, roi, backend=backend)
    assert noise.last_backend == backend
    _, ref = smv.parse_smv(gd.c_extra_file("c3.noise.img"))
    assert np.array_equal(got, ref)
    assert np.all(got[roi & (mask == 0)] == 40)


@pytest.mark.parametrize("backend", ["numba", "python"])
def test_noise_stream_state_and_chunking_are_exact(backend):
    """The stream ends exactly where per-draw C code ends, whatever the internal chunking."""
    vals = np.array([0.0, 3.0, 11.5, 40.0, 2.5e6, 0.2] * 700, dtype=np.float32)
    r1 = rng.Ran1(-42)
    d1 = noise.poisson_deviates(vals, r1, backend=backend)
    assert noise.last_backend == backend
    r2 = rng.Ran1(-42)
    dv = rng.Deviates(r2)
    d2 = np.array([dv.poidev(float(v)) for v in vals])
    assert np.array_equal(d1, d2)
    assert r1.state() == r2.state()
    assert r1() == r2()


def test_noise_negative_adc_wraps_like_c_and_shape_errors():
    img = np.zeros((2, 3), np.float32)
    got, photons, overloads = noise.noise_image(img, -1, -3.0)
    assert got.tolist() == [[65533] * 3] * 2 and photons == 0.0 and overloads == 0
    with pytest.raises(ValueError):
        noise.noise_image(np.zeros(5, np.float32), -1)
    with pytest.raises(ValueError):
        noise.noise_image(img, -1, 40.0, np.ones((3, 2), bool))


def test_poisson_deviates_do_not_depend_on_chunking(monkeypatch):
    """Means and draws are handled a chunk at a time; the deviates are the same for any chunk size."""
    from nbsim import noise as noise_mod
    from nbsim.rng import Ran1
    g = np.random.default_rng(3)
    vals = np.concatenate([g.uniform(0, 11, 3000), g.uniform(12, 500, 1500), [0.0, 2e6, 7.5]])
    ref = noise_mod.poisson_deviates(vals, Ran1(-5), backend="python")
    monkeypatch.setattr(noise_mod, "_MAX_CHUNK", 1000)
    rng = Ran1(-5)
    got = noise_mod.poisson_deviates(vals, rng, backend="python")
    assert noise_mod.last_backend == "python"
    assert np.array_equal(got, ref)


def test_noise_image_does_not_depend_on_chunking(monkeypatch):
    from nbsim import noise as noise_mod
    img = np.random.default_rng(4).uniform(0, 40, (60, 70)).astype(np.float32)
    img[3, 4] = 70000.0                                           # an overload
    roi = np.zeros(img.shape, bool)
    roi[5:50, 2:66] = True
    ref = noise_mod.noise_image(img, -9, 40.0, roi, backend="python")
    monkeypatch.setattr(noise_mod, "_MAX_CHUNK", 500)
    got = noise_mod.noise_image(img, -9, 40.0, roi, backend="python")
    assert noise_mod.last_backend == "python"
    assert np.array_equal(got[0], ref[0]) and got[1:] == ref[1:]
    whole = noise_mod.noise_image(img, -9, 40.0, backend="python")
    assert whole[2] == 1 and whole[0][3, 4] == 65535
