"""The noise worker process (``nbsim.noise_worker``): the same noise image as the in-process loops,
bit for bit, the same final stream state, and a fallback to this process whenever it cannot serve.

Every comparison checks ``noise.last_backend``, so a silent fallback cannot make a test pass.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nbsim import noise, rng
from nbsim.noise_worker import NoiseWorker, WorkerError

pytest.importorskip("numba")


def _image(seed: int, shape=(70, 90)) -> np.ndarray:
    """Means in all three poidev branches (direct, rejection, gaussdev) and a NaN."""
    g = np.random.default_rng(seed)
    flat = g.exponential(2.0, shape[0] * shape[1]).astype(np.float32)
    flat[::97] = g.uniform(12, 3000, flat[::97].size)
    flat[5::401] = 2e6
    flat[7] = np.nan
    return flat.reshape(shape)


@pytest.fixture
def worker():
    w = NoiseWorker.start()
    assert w is not None
    noise.use_worker(w)
    yield w
    noise.use_worker(None)
    w.close()


@pytest.mark.parametrize("seed", [-1, -987654, 5])
def test_worker_image_equals_the_in_process_loops(worker, seed, monkeypatch):
    img = _image(abs(seed))
    mask = np.ones(img.shape, bool)
    mask[:3] = False                                       # an ROI: pixels outside stay 0
    monkeypatch.setattr(noise, "_kernels_loaded", lambda: False)   # as in the front end's process
    t_w, t_p = rng.Ran1Table(), rng.Ran1Table()
    r_w, r_p = rng.Ran1(seed, t_w), rng.Ran1(seed, t_p)
    got = noise.noise_image(img, r_w, 10.0, mask)
    assert noise.last_backend == "numba-worker"
    ref = noise.noise_image(img, r_p, 10.0, mask, backend="python")
    assert noise.last_backend == "python"
    assert int(np.abs(got[0].astype(int) - ref[0].astype(int)).max()) == 0
    assert got[1:] == ref[1:]
    assert r_w.state() == r_p.state() and r_w.ndraws == r_p.ndraws
    assert r_w() == r_p()                                  # the streams go on identically


def test_a_dead_worker_falls_back_to_this_process(worker, monkeypatch):
    img = _image(3)
    assert worker.ready()
    worker._proc.kill()
    worker._proc.wait()
    monkeypatch.setattr(noise, "_kernels_loaded", lambda: False)
    ref = noise.noise_image(img, -11, backend="python")
    r = rng.Ran1(-11)
    got = noise.noise_image(img, r)
    assert noise.last_backend in ("numba", "python")      # not the worker: it is gone
    assert int(np.abs(got[0].astype(int) - ref[0].astype(int)).max()) == 0
    assert np.isnan(got[1]) and np.isnan(ref[1]) and got[2] == ref[2]     # a NaN mean: C's sum is NaN
    assert not worker.ready()
    with pytest.raises(WorkerError):
        worker.noise_counts(np.ones(2, np.float32), 40.0, np.array([-1, 0, 0], np.int64),
                            np.zeros(32, np.int64), np.empty(2, np.uint16))


def test_only_auto_uses_the_worker(worker):
    img = _image(4, (20, 30))
    noise.noise_image(img, -2, backend="numba")
    assert noise.last_backend == "numba"
    noise.noise_image(img, -2, backend="python")
    assert noise.last_backend == "python"


def test_worker_exits_when_the_parent_closes_it():
    w = NoiseWorker.start()
    assert w.ready()
    w.close()
    assert w._proc.wait(timeout=60) == 0


def test_front_end_uses_a_worker_and_writes_the_same_noise_image(tmp_path):
    """A 256x256 noise image (above NOISE_WORKER_MIN_PIXELS) made by the front end's worker equals
    the in-process Python loop's for the same float image and seed."""
    from nbsim import nanobragg
    from nbsim.frontend import parse_argv
    from nbsim.io import smv
    args = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "3",
            "-lambda", "1", "-distance", "100", "-detpixels", "256", "-pixel", "0.4", "-seed", "9",
            "-floatfile", "f.bin", "-noisefile", "n.img", "-nopgm", "-noprogress"]
    assert nanobragg._noise_pixels(parse_argv(args)) == 256 * 256 >= nanobragg.NOISE_WORKER_MIN_PIXELS
    assert nanobragg._noise_pixels(parse_argv(args + ["-nonoise"])) == 0
    code = ("import sys; from nbsim import nanobragg, noise; rc = nanobragg.main(sys.argv[1:]); "
            "print('BACKEND', noise.last_backend); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code] + args, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-800:]
    assert "BACKEND numba-worker" in p.stdout
    img = np.fromfile(tmp_path / "f.bin", dtype="<f4").reshape(256, 256)
    ref, photons, overloads = noise.noise_image(img, rng.c_seed(9), 40.0, backend="python")
    _, got = smv.parse_smv((tmp_path / "n.img").read_bytes())
    assert int(np.abs(got.astype(int) - ref.astype(int)).max()) == 0
    assert f"{photons:.0f} photons on noise image ({overloads} overloads)" in p.stdout


def test_noise_pixels_follows_the_detector_and_roi():
    from nbsim import nanobragg
    from nbsim.frontend import parse_argv
    base = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1", "-lambda", "1"]
    assert nanobragg._noise_pixels(parse_argv(base)) == 1024 * 1024          # 102.4 mm / 0.1 mm
    assert nanobragg._noise_pixels(parse_argv(base + ["-detpixels", "300"])) == 300 * 300
    assert nanobragg._noise_pixels(parse_argv(base + ["-detpixels", "300", "-roi", "0", "9", "10",
                                                      "29"])) == 10 * 20


def test_worker_without_memfd_uses_an_unlinked_temporary_file(monkeypatch):
    """Where the system has no memfd_create, the pixels travel through an unlinked temporary file."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    w = NoiseWorker.start()
    assert w is not None
    noise.use_worker(w)
    try:
        monkeypatch.setattr(noise, "_kernels_loaded", lambda: False)
        img = _image(8)
        got = noise.noise_image(img, -77)
        assert noise.last_backend == "numba-worker"
        ref = noise.noise_image(img, -77, backend="python")
        assert int(np.abs(got[0].astype(int) - ref[0].astype(int)).max()) == 0 and got[2] == ref[2]
    finally:
        noise.use_worker(None)
        w.close()


def test_a_worker_lost_between_begin_and_finish_falls_back(worker, monkeypatch):
    """noise_image_begin starts the worker; when its reply never comes, the call draws the image in
    this process from the unchanged stream: the same image and final state."""
    monkeypatch.setattr(noise, "_kernels_loaded", lambda: False)
    img = _image(12)
    r, r_ref = rng.Ran1(-5), rng.Ran1(-5)
    finish = noise.noise_image_begin(img, r, 40.0)
    assert noise.last_backend == "numba-worker"

    def lost():
        raise EOFError("worker gone")
    monkeypatch.setattr(worker._conn, "recv", lost)
    got = finish()
    assert noise.last_backend in ("numba", "python") and not worker.ready()
    ref = noise.noise_image(img, r_ref, 40.0, backend="python")
    assert int(np.abs(got[0].astype(int) - ref[0].astype(int)).max()) == 0 and got[2] == ref[2]
    assert r.state() == r_ref.state() and r.ndraws == r_ref.ndraws


def test_lean_in_process_load_skips_numbas_optional_modules_only_while_loading():
    """The front end's console process, loading the loop itself (no worker), does not import
    scipy.linalg for numba; the image equals the Python reference; scipy.linalg imports afterwards."""
    code = (
        "import sys, numpy as np\n"
        "from nbsim import noise\n"
        "noise.lean_numba_load = True\n"
        "img = np.random.default_rng(3).exponential(2.0, (40, 50)).astype(np.float32)\n"
        "got = noise.noise_image(img, -9, backend='numba')\n"
        "assert noise.last_backend == 'numba'\n"
        "ref = noise.noise_image(img, -9, backend='python')\n"
        "assert int(np.abs(got[0].astype(int) - ref[0].astype(int)).max()) == 0 and got[1:] == ref[1:]\n"
        "print('LINALG_LOADED', 'scipy.linalg' in sys.modules)\n"
        "import scipy.linalg.cython_blas, cffi\n"
        "print('IMPORTABLE_AFTER', 'scipy.linalg.cython_blas' in sys.modules and sys.modules['cffi'] is not None)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-800:]
    assert "LINALG_LOADED False" in p.stdout and "IMPORTABLE_AFTER True" in p.stdout
