"""The compiled (numba) noise loop against the Python reference and the C program: bit for bit.

Every comparison runs both backends explicitly and checks ``noise.last_backend`` after each call,
so a silent fallback to the Python path cannot make a test pass.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nbsim import noise, rng
from nbsim.io import images, smv


def _both_deviates(vals, seed, table_factory=None):
    """(deviates, final stream) from the numba and the Python backend, same start state."""
    out = {}
    for backend in ("numba", "python"):
        table = table_factory() if table_factory else None
        r = rng.Ran1(seed, table)
        d = noise.poisson_deviates(vals, r, backend=backend)
        assert noise.last_backend == backend
        out[backend] = (d, r)
    return out["numba"], out["python"]


def _mixed_means(seed: int, n: int) -> np.ndarray:
    """Means covering the three poidev branches, repeats (poidev's cached statics), 0 and NaN."""
    g = np.random.default_rng(seed)
    parts = [g.uniform(0, 12, n), g.uniform(12, 2000, n // 4), g.uniform(1e6, 5e7, n // 8),
             np.full(7, 3.25), np.full(5, 40.0), [0.0, 11.999999, 12.0, 1e6, 1.0000001e6, np.nan, 5.0],
             g.exponential(1.0, n)]
    v = np.concatenate(parts).astype(np.float32)
    g.shuffle(v)
    return v


def test_numba_is_installed_and_compiles():
    assert noise.numba_available()
    from nbsim import noise_numba
    noise.poisson_deviates(np.ones(3, np.float32), rng.Ran1(-1), backend="numba")
    assert noise.last_backend == "numba"
    assert noise_numba._noise_loop.signatures          # the compiled loop ran


@pytest.mark.parametrize("seed", [-1, -7, -12345678, -2147483646, 0, 5])
def test_deviates_equal_python_for_all_branches(seed):
    vals = _mixed_means(abs(seed) % 1000, 3000)
    (dn, rn), (dp, rp) = _both_deviates(vals, seed)
    assert np.array_equal(dn, dp, equal_nan=True)
    assert np.isnan(dn).sum() == 1 and (vals > 1e6).sum() > 100 and ((vals >= 12) & (vals <= 1e6)).sum() > 100
    assert rn.state() == rp.state() and rn.ndraws == rp.ndraws > len(vals)
    assert rn() == rp()                                  # the streams go on identically


def test_deviates_equal_python_on_long_streams_and_large_means():
    """Many Lehmer blocks, long runs in each branch, values near the branch edges."""
    g = np.random.default_rng(11)
    vals = np.concatenate([np.full(20000, 11.9), g.uniform(12, 1e6, 3000), g.uniform(1e6, 1e9, 3000),
                           g.uniform(0, 0.01, 20000)]).astype(np.float32)
    (dn, rn), (dp, rp) = _both_deviates(vals, -424242)
    assert np.array_equal(dn, dp) and rn.state() == rp.state() and rn.ndraws == rp.ndraws


def test_positive_seed_continues_a_shared_table():
    """A positive C seed continues the table another stream (the mosaic domains) left behind."""
    def table():
        t = rng.Ran1Table()
        rng.mosaic_umats(0.01, 4, -99, t)
        return t
    vals = _mixed_means(3, 500)
    (dn, rn), (dp, rp) = _both_deviates(vals, 3, table)
    assert np.array_equal(dn, dp, equal_nan=True) and rn.state() == rp.state()
    fresh, _ = _both_deviates(vals, 3)                   # a fresh table gives other numbers
    assert not np.array_equal(fresh[0], dn, equal_nan=True)


def test_no_pixels_draw_nothing():
    for backend in ("numba", "python"):
        r = rng.Ran1(-5)
        assert noise.poisson_deviates(np.zeros(0, np.float32), r, backend=backend).size == 0
        assert noise.last_backend == backend
        assert r.state() == (-5, 0, (0,) * 32) and r.ndraws == 0


@pytest.mark.parametrize("seed,adc", [(-9, 40.0), (-31337, 10.0), (-2, -3.0), (-77, 0.0)])
def test_noise_image_equals_python(seed, adc):
    g = np.random.default_rng(abs(seed))
    img = g.exponential(2.0, (90, 110)).astype(np.float32)
    img[5:9, 7:30] = g.uniform(12, 7e4, (4, 23))        # rejection branch and overloads
    img[40, 3:9] = [2e6, 3e7, 1e9, 65535.0, 65495.0, np.nan]
    roi = np.zeros(img.shape, bool)
    roi[2:80, 1:100] = True
    for mask in (roi, None):
        res = {}
        for backend in ("numba", "python"):
            res[backend] = noise.noise_image(img, seed, adc, mask, backend=backend)
            assert noise.last_backend == backend
        (a, pa, oa), (b, pb, ob) = res["numba"], res["python"]
        assert a.dtype == b.dtype == np.uint16 and int(np.abs(a.astype(int) - b.astype(int)).max()) == 0
        assert pa == pb or (np.isnan(pa) and np.isnan(pb))
        assert oa == ob > 0


def test_auto_falls_back_to_python(monkeypatch):
    vals = _mixed_means(1, 200)
    # a state outside the kernel's range (seed beyond C's long range of command-line seeds)
    r = rng.Ran1(-(2 ** 40))
    ref = noise.poisson_deviates(vals, rng.Ran1(-(2 ** 40)), backend="python")
    assert np.array_equal(noise.poisson_deviates(vals, r), ref, equal_nan=True)
    assert noise.last_backend == "python"
    with pytest.raises(RuntimeError, match="range"):
        noise.poisson_deviates(vals, rng.Ran1(-(2 ** 40)), backend="numba")
    # -IM (command-line seed 2**31 - 1) loads an all-zero table: C reloads again on the next draw
    ref = noise.poisson_deviates(vals, rng.Ran1(-rng.IM), backend="python")
    assert np.array_equal(noise.poisson_deviates(vals, rng.Ran1(-rng.IM)), ref, equal_nan=True)
    assert noise.last_backend == "python"
    # numba missing
    monkeypatch.setattr(noise, "_kernels_mod", False)
    assert not noise.numba_available()
    img = np.full((4, 5), 3.0, np.float32)
    got = noise.noise_image(img, -3)
    assert noise.last_backend == "python"
    monkeypatch.undo()
    assert np.array_equal(got[0], noise.noise_image(img, -3, backend="numba")[0])
    with pytest.raises(ValueError, match="backend"):
        noise.noise_image(img, -3, backend="fast")


def test_auto_runs_small_images_in_python_until_the_loop_is_loaded(monkeypatch):
    img = np.random.default_rng(2).exponential(1.0, (50, 60)).astype(np.float32)
    ref = noise.noise_image(img, -3, backend="python")
    noise.noise_image(img, -3, backend="numba")                       # loaded in this process
    got = noise.noise_image(img, -3)
    assert noise.last_backend == "numba" and np.array_equal(got[0], ref[0])
    monkeypatch.setattr(noise, "_kernels_loaded", lambda: False)      # as in a new process
    got = noise.noise_image(img, -3)
    assert noise.last_backend == "python" and np.array_equal(got[0], ref[0])
    monkeypatch.setattr(noise, "NUMBA_MIN_PIXELS", img.size)           # large enough: compiled
    got = noise.noise_image(img, -3)
    assert noise.last_backend == "numba" and np.array_equal(got[0], ref[0])


def test_a_new_process_loads_the_compiled_loop_from_the_disk_cache():
    """cache=True: after one process compiled (or loaded) the loop, the next one loads it, no compile."""
    noise.poisson_deviates(np.ones(2, np.float32), rng.Ran1(-1), backend="numba")   # cache filled
    code = ("import numpy as np; from nbsim import noise, noise_numba, rng; "
            "noise.poisson_deviates(np.ones(2, np.float32), rng.Ran1(-1), backend='numba'); "
            "s = noise_numba._noise_loop.stats; print(len(s.cache_hits), len(s.cache_misses))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-800:]
    assert p.stdout.split() == ["1", "0"]


# --------------------------------------------------------------------------- the C program
C_CASES = {
    # means above 1e6 (gaussdev branch) and below 12, ROI, -adc 10, overloads
    "gauss_roi_adc": (64, ["-N", "5", "-pixel", "0.4", "-water", "50", "-fluence", "1e28", "-seed", "7",
                           "-roi", "3", "60", "5", "58", "-adc", "10"], (3, 60, 5, 58), 10.0),
    # every pixel in the rejection branch (water background of ~170 photons)
    "rejection": (128, ["-N", "10", "-pixel", "0.2", "-water", "50", "-fluence", "3e25",
                        "-seed", "31337"], None, 40.0),
    # small means only (poidev's direct method), default adc
    "small_means": (96, ["-N", "5", "-pixel", "0.3", "-seed", "123"], None, 40.0),
}


@pytest.mark.needs_c
@pytest.mark.parametrize("name", sorted(C_CASES))
def test_noise_and_int_images_equal_c(name, c_binary, tmp_path):
    npix, extra, roi, adc = C_CASES[name]
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-lambda", "1",
            "-distance", "100", "-detpixels", str(npix)] + extra + [
            "-floatfile", "f.bin", "-intfile", "i.img", "-noisefile", "n.img", "-nopgm", "-noprogress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([c_binary] + args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-500:]
    img = np.fromfile(tmp_path / "f.bin", dtype="<f4").reshape(npix, npix)
    mask = images.roi_mask(npix, npix, roi)
    seed = rng.c_seed(int(extra[extra.index("-seed") + 1]))
    got, photons, overloads = noise.noise_image(img, seed, adc, mask, backend="numba")
    assert noise.last_backend == "numba"
    _, ref = smv.parse_smv((tmp_path / "n.img").read_bytes())
    assert int(np.abs(got.astype(int) - ref.astype(int)).max()) == 0
    said = [ln for ln in p.stdout.splitlines() if "photons on noise image" in ln][0]
    assert said == f"{photons:.0f} photons on noise image ({overloads} overloads)"
    st = images.image_stats(img, mask)
    _, ref_int = smv.parse_smv((tmp_path / "i.img").read_bytes())
    got_int = images.int_image(img, images.default_int_scale(st["max_I"]), adc, mask)
    assert int(np.abs(got_int.astype(int) - ref_int.astype(int)).max()) == 0
