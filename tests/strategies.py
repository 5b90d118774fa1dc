"""The engine's three rendering strategies as the tests select and check them (test-only helper).

* ``STRATEGIES``: "reference" (``engine.render``), "fast" (``engine.render_fast``) and "compiled"
  (``engine.render_compiled``), the names ``simulate_image(report=...)["kernel"]`` and
  ``SimResult.info["kernel"]`` use.
* ``not_applicable(model, strategy)``: why a strategy cannot run for a model (the engine then falls
  back to another kernel), or None; tests skip with this reason instead of comparing a kernel
  with itself.
* ``force_reference(monkeypatch)``: no user-facing option selects the reference kernel (the
  front end, the Hydra app and the API choose between fast and compiled only), so tests wrap
  ``engine.simulate_image`` to pass its existing ``fast=False``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from nbsim import engine

STRATEGIES = ("reference", "fast", "compiled")


def not_applicable(m: engine.Model, strategy: str) -> Optional[str]:
    """None where ``strategy`` runs for model ``m``, else the reason it does not (one line).

    The decision is the engine's (``fast_path_ok``, ``compile_ok``); the reason names the model
    feature behind it so that a skipped test says why."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if strategy == "reference":
        return None
    if not engine.fast_path_ok(m):
        if m.table is not None and m.interpolate:
            why = "tricubic F interpolation (the reference kernel carries its state across pixels)"
        elif m.faithful and (m.oversample_thick or m.oversample_polar or m.oversample_omega):
            why = "faithful -oversample_thick/polar/omega (C's running products)"
        else:
            why = "engine.fast_path_ok is False"
        return f"{strategy} kernel does not apply: {why}"
    if strategy == "fast" or engine.compile_ok(m):
        return None
    reasons = [w for cond, w in (
        (not m.faithful, "quirks=physical"),
        (m.dmin_m != 0, "-dmin cutoff"),
        (m.shape != "square", f"{m.shape} crystal shape"),
        (m.curved, "curved detector"),
        (all(n <= 1 for n in m.N), "N = 1 on every axis"),
        (engine.miller_mode(m) != "c" and m.dtype == torch.float64,
         "float64 with the BLAS Miller-index product (many phi steps x mosaic domains)"),
    ) if cond]
    return "compiled kernel does not apply: " + ("; ".join(reasons) or "engine.compile_ok is False")


def force_reference(monkeypatch) -> None:
    """Make every ``engine.simulate_image`` call in this test render with the reference kernel
    (``fast=False``), whichever path (front end, Hydra app, API) makes the call."""
    real = engine.simulate_image

    @functools.wraps(real)
    def reference_only(m, **kw):
        kw["fast"] = False
        kw["compile"] = False
        # one intra-op thread: the reference kernel's ops then never wait in OpenMP barriers, which
        # on a shared CPU made it 10-40x slower (the image does not depend on the thread count)
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return real(m, **kw)
        finally:
            torch.set_num_threads(prev)

    monkeypatch.setattr(engine, "simulate_image", reference_only)


def blas_miller_orders_differ(m: engine.Model, samples: int = 20000) -> bool:
    """Whether this machine's BLAS rounds the reference and the fast kernel's Miller-index
    products differently for model ``m`` (only in Miller mode "blas").

    Both kernels compute h = a·S as one matmul with k = 3, but with the (φ·domain, a/b/c) columns in
    different orders (reference: ``lattice.reshape(-1, 3).T``, f·M·3 + m·3 + row; fast:
    ``FastPlan.lat_t``, row·F·M + f·M + m). MKL 2024.2 on an AVX-512 AMD EPYC rounds a column
    differently depending on its position (fused or separate multiply-add), so a few percent of the
    indices differ in the last bit, and the float64 images by ~1e-14 relative (the float32 images
    written to files are unaffected). The row count does not matter. Returns False where the model
    is not in "blas" mode."""
    if engine.miller_mode(m) != "blas":
        return False
    plan = engine.FastPlan(m)
    g = torch.Generator().manual_seed(0)
    sc = (torch.rand(samples, 3, generator=g, dtype=torch.float64) - 0.5).to(m.dtype) * 2e10
    ref = engine.miller(sc, m.lattice, "blas").reshape(samples, plan.FM, 3)
    ref = ref.permute(0, 2, 1)[:, plan.rows]                     # (n, R, FM)
    fast = (sc @ plan.lat_t).view(samples, len(plan.rows), plan.FM)
    return not torch.equal(ref, fast)
