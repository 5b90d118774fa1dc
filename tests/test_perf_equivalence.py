"""The performance paths compute the same image (issue 5). Nothing here is timed.

* chunked == unchunked, bit for bit in float64: several chunk sizes (1, primes, odd leftovers),
  with and without an ROI, through the fast kernel (``render_fast``) and the reference kernel
  (``render``, which keeps the tricubic-interpolation state across chunks), with worker threads;
* the fast kernel == the reference kernel, bit for bit, over the features it covers;
* compiled (torch.compile) == eager to 1e-12 relative in float64;
* the float32 path keeps Pearson r >= 0.9999 against the golden C float images.

Every comparison of two strategies asserts, through ``simulate_image(report=...)`` or
``info["kernel"]``, that each side ran the kernel it names; where a kernel does not apply to a case
the test is skipped with the reason (``strategies.not_applicable``). The float64 golden images,
bit for bit through every path and kernel, are in test_parity_golden.py.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from nbsim import engine
from nbsim.experiment import build_model
from nbsim.frontend.argv import parse_argv

import golden_data as gd
from conftest import golden_cases, golden_dir
from strategies import not_applicable

CUBIC = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100"
TRICLINIC = "-cell 70 80 90 75 85 95 -misset 10 20 30 -default_F 100 -N 4 -lambda 1.2 -distance 80"

# (id, nanoBragg arguments); small detectors so every variant runs in well under a second
CASES = [
    ("cubic", f"{CUBIC} -detpixels 48 -pixel 0.4"),
    ("cubic_roi", f"{CUBIC} -detpixels 48 -pixel 0.4 -roi 5 40 3 29"),
    ("miller_zero", f"{CUBIC} -detpixels 41 -pixel 0.1 -oversample 1 -Xbeam 2.0 -Ybeam 2.0"),
    ("miller_zero_evenN", "-cell 100 100 100 90 90 90 -default_F 100 -N 4 -lambda 1 -distance 100 "
                          "-detpixels 41 -pixel 0.1 -oversample 1 -Xbeam 2.0 -Ybeam 2.0"),
    ("triclinic_mosaic_phi", f"{TRICLINIC} -detpixels 36 -pixel 0.8 -mosaic 0.5 -mosaic_dom 5 "
                             "-mosaic_seed 3 -phi 0 -osc 0.3 -phisteps 3 -oversample 2"),
    ("div_disp_polar", f"{CUBIC} -detpixels 32 -pixel 0.8 -divergence 1 -divsteps 3 "
                       "-dispersion 1 -dispsteps 3 -polar 0.9 -oversample 2"),
    ("hkl", "-mat A.mat -hkl P1.hkl -lambda 1 -N 6 -distance 90 -detpixels 40 -pixel 1.0"),
    ("hkl_interp", "-mat A.mat -hkl P1.hkl -lambda 1 -N 2 -distance 90 -detpixels 40 -pixel 1.0"),
    ("hkl_interp_roi", "-mat A.mat -hkl P1.hkl -lambda 1 -N 2 -distance 90 -detpixels 40 "
                       "-pixel 1.0 -roi 3 30 5 33"),
    ("hkl_mosaic_mixedN", "-mat A.mat -hkl P1.hkl -lambda 1 -Na 1 -Nb 4 -Nc 3 -nointerpolate "
                          "-distance 90 -detpixels 32 -pixel 1.0 -mosaic 0.5 -mosaic_dom 9"),
    ("round_mosaic", f"{TRICLINIC} -detpixels 32 -pixel 0.8 -round_xtal -mosaic 0.5 "
                     "-mosaic_dom 8"),
    ("gauss_dmin_water", f"{TRICLINIC} -detpixels 32 -pixel 0.8 -gauss_xtal -dmin 3 -water 20"),
    ("thick_curved", f"{CUBIC} -detpixels 32 -pixel 0.8 -detector_thick 200 -thicksteps 2 "
                     "-curved_det"),
    ("oversample_flags", f"{CUBIC} -detpixels 24 -pixel 0.8 -oversample 2 -oversample_omega "
                         "-oversample_polar -detector_thick 100 -oversample_thick"),
    ("physical", f"{TRICLINIC} -detpixels 32 -pixel 0.8 -mosaic 0.5 -mosaic_dom 8 -water 10 "
                 "-divergence 1 -divsteps 3 --quirks physical"),
    ("sourcefile_weights", f"{CUBIC} -detpixels 32 -pixel 0.8 -oversample 2 "
                           "-sourcefile weighted.txt --quirks physical"),
]

WEIGHTED_SOURCES = """\
-10 0 0 1.0 1e-10
-10 0.002 0 0.5 1.01e-10
-10 0 0.003 2.0 0.99e-10
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("perf_inputs")
    src = golden_dir() / "inputs"
    for name in ("A.mat", "P1.hkl"):
        shutil.copy(src / name, d / name)
    (d / "weighted.txt").write_text(WEIGHTED_SOURCES)
    return d


def model(args: str, inputs, dtype=torch.float64):
    parsed = parse_argv(args.split(), cwd=str(inputs))
    return build_model(parsed.spec, dtype=dtype, base_dir=str(inputs))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def run(m, kernel: str, **kw) -> torch.Tensor:
    """``engine.simulate_image(m, **kw)``, asserting that ``kernel`` rendered it."""
    rep = {}
    img = engine.simulate_image(m, report=rep, **kw)
    assert rep["kernel"] == kernel, f"asked for the {kernel} kernel, {rep['kernel']} ran ({kw})"
    return img


def require(m, strategy: str, what: str) -> None:
    """Skip (with the reason) where ``strategy`` does not apply to model ``m``."""
    why = not_applicable(m, strategy)
    if why:
        pytest.skip(f"{what}: {why}")


@pytest.mark.parametrize("cid,args", CASES, ids=[c[0] for c in CASES])
def test_chunking_is_bit_identical(cid, args, inputs):
    m = model(args, inputs)
    # the default kernel: fast, or the reference where the fast one does not apply
    k = "reference" if not_applicable(m, "fast") else "fast"
    whole = run(m, k, chunk_pixels=10 ** 7)
    assert torch.isfinite(whole).all()
    assert (whole != 0).any()
    for chunk in (1, 2, 7, 97, 1009):
        assert same(run(m, k, chunk_pixels=chunk), whole), f"chunk {chunk}"
    # worker threads (each chunk on its own thread) change nothing either
    assert same(run(m, k, chunk_pixels=97, workers=2), whole)
    # the reference kernel, chunked the same ways
    ref = run(m, "reference", chunk_pixels=10 ** 7, fast=False)
    for chunk in (1, 13, 331):
        assert same(run(m, "reference", chunk_pixels=chunk, fast=False), ref), f"ref {chunk}"


@pytest.mark.parametrize("cid,args", CASES, ids=[c[0] for c in CASES])
def test_fast_kernel_equals_reference(cid, args, inputs):
    m = model(args, inputs)
    require(m, "fast", cid)
    fast = run(m, "fast", fast=True)
    ref = run(m, "reference", fast=False)
    assert same(fast, ref)


F32_CASES = ["cubic", "miller_zero", "miller_zero_evenN", "triclinic_mosaic_phi", "hkl",
             "hkl_mosaic_mixedN", "physical"]


@pytest.mark.parametrize("cid", F32_CASES)
def test_fast_kernel_equals_reference_float32(cid, inputs):
    """float32 (reduced sincg) through the fast kernel: still the reference's numbers, any chunking."""
    m = model(dict(CASES)[cid], inputs).astype(torch.float32)
    require(m, "fast", cid)
    ref = run(m, "reference", fast=False)
    assert torch.isfinite(ref).all()
    assert same(run(m, "fast", fast=True), ref)
    assert same(run(m, "fast", fast=True, chunk_pixels=7), ref)


def test_fast_path_coverage(inputs):
    """The cases above exercise both Miller-index modes, the x == 0 sincg patch and the fallbacks."""
    ms = {cid: model(args, inputs) for cid, args in CASES}
    assert engine.fast_path_ok(ms["cubic"]) and engine.miller_mode(ms["cubic"]) == "c"
    # float64 always takes C's order (BLAS's last bit depends on shape and processor)
    assert engine.miller_mode(ms["triclinic_mosaic_phi"]) == "c"
    blas = model(BLAS_CASE, inputs)
    assert engine.miller_mode(blas) == "c" and engine.compile_ok(blas)
    assert engine.miller_mode(blas.astype(torch.float32)) == "blas"
    assert engine.compile_ok(blas.astype(torch.float32))
    assert ms["triclinic_mosaic_phi"].lattice_first is not None           # quirk 4 pixel
    assert not engine.fast_path_ok(ms["hkl_interp"])                       # interpolation state
    assert not engine.fast_path_ok(ms["oversample_flags"])                 # C's running products
    assert not bool((ms["sourcefile_weights"].source_weight == 1).all())
    m = ms["miller_zero"]
    tr = {}
    engine.render(m, torch.arange(m.fpixels * m.spixels), torch.tensor(False), trace=tr)
    assert (tr["hkl"] == 0).any(), "no Miller index is exactly 0: the sincg(0) branch is untested"


def test_chunk_budget():
    """Chunks follow the memory budget; any budget gives the same image."""
    args = f"{TRICLINIC} -detpixels 40 -pixel 0.8 -mosaic 0.5 -mosaic_dom 6"
    m = build_model(parse_argv(args.split()).spec, dtype=torch.float64)
    plan = engine.FastPlan(m)
    small = engine.default_chunk_pixels(m, 2e5, plan=plan)
    large = engine.default_chunk_pixels(m, 2e9, plan=plan)
    assert 1 <= small < large <= m.fpixels * m.spixels
    ref_chunk = engine.default_chunk_pixels(m, 2e5)
    assert ref_chunk * m.per_pixel_elements() * 8 * 24 <= 2e5 or ref_chunk == 1
    a = run(m, "fast", budget_bytes=2e5)
    b = run(m, "fast", budget_bytes=2e9)
    assert same(a, b)


def test_compile_respects_budget(monkeypatch):
    """Where one padded chunk of the compiled kernels would exceed the memory budget, the eager
    kernel (which also splits the samples of a pixel) runs instead."""
    args = f"{TRICLINIC} -detpixels 40 -pixel 0.8 -mosaic 0.5 -mosaic_dom 6"
    m = build_model(parse_argv(args.split()).spec, dtype=torch.float64)
    assert engine.compile_ok(m)
    plan = engine.CompiledPlan(m, engine.FastPlan(m), 1e4)
    assert not plan.fits
    assert engine.CompiledPlan(m, engine.FastPlan(m), 1e9).fits
    calls = []
    monkeypatch.setattr(engine, "render_compiled", lambda *a, **k: calls.append(1))
    img = run(m, "fast", budget_bytes=1e4, compile=True)
    assert not calls and same(img, run(m, "fast", compile=False))


def test_sqrt_exact_is_correctly_rounded():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, dtype=torch.float64, generator=g) * 0.05
    got = engine.sqrt_exact(x)
    want = torch.tensor([math.sqrt(v) for v in x.tolist()], dtype=torch.float64)
    assert same(got, want)
    xr = x.clone().requires_grad_(True)
    engine.sqrt_exact(xr).sum().backward()
    assert torch.allclose(xr.grad, 0.5 / want)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

COMPILE_CASES = [
    ("cubic", f"{CUBIC} -detpixels 40 -pixel 0.4"),
    ("hkl_polar_thick", "-mat A.mat -hkl P1.hkl -lambda 1 -N 6 -distance 90 -detpixels 36 "
                        "-pixel 1.0 -polar 0.8 -detector_thick 100 -thicksteps 2"),
    ("phi_carry_sources", f"{TRICLINIC} -detpixels 30 -pixel 0.8 -phi 0 -osc 0.3 -phisteps 2 "
                          "-dispersion 1 -dispsteps 3 -oversample 2"),
]
# many φ steps × domains: the eager kernel takes the BLAS Miller-index product (compiled in float32)
BLAS_CASE = f"{TRICLINIC} -detpixels 24 -pixel 1.0 -mosaic 0.5 -mosaic_dom 6 -mosaic_seed 3 " \
            "-phi 0 -osc 0.3 -phisteps 2 -oversample 2"


@pytest.mark.slow
@pytest.mark.parametrize("cid,args", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compiled_equals_eager(cid, args, inputs):
    pytest.importorskip("torch._inductor")
    m = model(args, inputs)
    assert engine.compile_ok(m)
    eager = run(m, "fast")
    compiled = run(m, "compiled", compile=True, chunk_pixels=256)   # several padded chunks
    scale = eager.abs().max()
    rel = ((compiled - eager).abs() / scale).max().item()
    assert rel <= 1e-12, rel
    nz = eager.abs() > 1e-6 * scale
    per_pixel = ((compiled - eager).abs()[nz] / eager.abs()[nz]).max().item()
    assert per_pixel <= 1e-12, per_pixel


@pytest.mark.slow
def test_api_forwards_device_compile(inputs, monkeypatch):
    """``device.compile`` reaches the engine: true runs the compiled kernels (to rounding of the
    eager image), false never does, auto only where one image repays compiling."""
    pytest.importorskip("torch._inductor")
    from nbsim.api import simulate
    from nbsim.spec import DeviceSpec
    calls = []
    real = engine.render_compiled
    monkeypatch.setattr(engine, "render_compiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = parse_argv(COMPILE_CASES[0][1].split(), cwd=str(inputs)).spec
    res = simulate(spec, DeviceSpec(compile=False), base_dir=str(inputs))
    eager = res.image
    assert not calls and res.info["kernel"] == "fast"
    small = simulate(spec, DeviceSpec(compile="auto"), base_dir=str(inputs)).image
    assert not calls and torch.equal(small, eager)      # a small image does not repay compiling
    res = simulate(spec, DeviceSpec(compile=True), base_dir=str(inputs))
    compiled = res.image
    assert calls and res.info["kernel"] == "compiled"
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("args", [COMPILE_CASES[0][1], BLAS_CASE], ids=["cubic", "blas"])
def test_compiled_float32_close_to_eager(args, inputs):
    pytest.importorskip("torch._inductor")
    m = model(args, inputs).astype(torch.float32)            # float64 setup, as the API does
    assert engine.compile_ok(m)
    eager = run(m, "fast").double().reshape(-1)
    compiled = run(m, "compiled", compile=True).double().reshape(-1)
    r = float(np.corrcoef(eager.numpy(), compiled.numpy())[0, 1])
    assert r >= 0.999999, r


# ---------------------------------------------------------------------------------------------
# float32 parity against the golden C images
# ---------------------------------------------------------------------------------------------

FLOAT32_GOLDEN = [c["id"] for c in golden_cases()]          # all of them


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
@pytest.mark.parametrize("gid", FLOAT32_GOLDEN)
def test_float32_parity_with_golden(gid, compile_, tmp_path):
    """float32 through the public API (what ``device.dtype: float32`` gives a user), eager and
    with ``device.compile: true`` (the compiled kernels; skipped where they do not apply)."""
    from nbsim.api import simulate
    from nbsim.spec import DeviceSpec
    gd.copy_inputs(tmp_path)
    spec = parse_argv(gd.case(gid)["args"], cwd=str(tmp_path)).spec
    m32 = build_model(spec, dtype=torch.float64, base_dir=str(tmp_path)).astype(torch.float32)
    if compile_:
        require(m32, "compiled", f"{gid} float32")
        want = "compiled"
    else:
        want = "reference" if not_applicable(m32, "fast") else "fast"
    res = simulate(spec, DeviceSpec(dtype="float32", compile=compile_), base_dir=str(tmp_path))
    assert res.image.dtype == torch.float32
    assert res.info["kernel"] == want
    img = res.image.reshape(-1).double().numpy()
    ref = gd.load_float(gid).reshape(-1).astype(np.float64)
    r = float(np.corrcoef(img, ref)[0, 1])
    assert r >= 0.9999, r
    assert abs(img.sum() / ref.sum() - 1) < 1e-3


def test_float32_model_from_float64_setup(inputs):
    """``Model.astype``: a float64 setup run in float32 keeps the float64 oversampling and geometry."""
    args = f"{CUBIC} -detpixels 32 -pixel 0.8 -mosaic 0.5 -mosaic_dom 4"
    m64 = model(args, inputs)
    m32 = m64.astype(torch.float32)
    assert m32.dtype == torch.float32 and m32.oversample == m64.oversample
    assert m32.lattice.dtype == torch.float32 and m32.incident.dtype == torch.float32
    a = run(m64, "fast").double()
    b = run(m32, "fast").double()
    r = float(np.corrcoef(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0, 1])
    assert r >= 0.999999, r
