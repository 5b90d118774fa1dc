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
        elif engine.layout_kind(m) == "mixed":
            why = ("capture/polarization/solid angle per contribution for some factors only "
                   "(-oversample_* or single quirk fixes: C's running products)")
        elif m.differentiable:
            why = "derivatives requested (the reference kernel carries them)"
        else:
            why = "engine.fast_path_ok is False"
        return f"{strategy} kernel does not apply: {why}"
    if strategy == "fast" or engine.compile_ok(m):
        return None
    reasons = [w for cond, w in (
        (engine.layout_kind(m) != "outer", "factors per contribution (quirks fixed)"),
        (m.dtype == torch.float64 and engine._phi_domains(m) >= engine._BLAS_MIN_FM,
         "float64 with many phi steps x mosaic domains (the eager kernel is faster there)"),
        (m.dmin_m != 0, "-dmin cutoff"),
        (m.shape != "square", f"{m.shape} crystal shape"),
        (m.curved, "curved detector"),
        (all(n <= 1 for n in m.N), "N = 1 on every axis"),
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
