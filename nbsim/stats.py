"""Image statistics of a finished run, as nanoBragg prints them (``nbsim.api.RunStats``)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from nbsim.io.images import image_stats as _c_stats


def image_stats(img32: np.ndarray, active: np.ndarray, model=None,
                roi: Optional[np.ndarray] = None) -> dict:
    """max_I (and where, in metres on the detector), mean, rms, rmsd, sum over the simulated pixels,
    computed as C does (``nbsim.io.images.image_stats``: C's loops and N-1 conventions).

    img32: (S, F) float32; active: (S, F) bool, the pixels the pixel loop computed (ROI and not
    masked); roi: (S, F) bool, the ROI (rmsd runs over it; default ``active``).
    """
    st = _c_stats(img32, active if roi is None else roi, active=active)
    at = [0.0, 0.0]
    if st["max_index"] is not None and model is not None:
        s, f = st["max_index"]
        from nbsim.params import value
        at = max_position_m(f, s, value(model.pixel_m), model.oversample)
    return dict(max_I=st["max_I"], max_I_at_m=at, mean=st["mean"], rms=st["rms"], rmsd=st["rmsd"],
                sum=st["sum"], pixels=st["n"])


def max_position_m(f: int, s: int, pixel_m: float, oversample: int) -> list:
    """[Fdet, Sdet] (m) that C prints for the maximum at pixel (fast ``f``, slow ``s``): the centre
    of that pixel's last sub-pixel."""
    sub = pixel_m / oversample
    return [sub * (f * oversample + oversample - 1) + sub / 2.0, sub * (s * oversample + oversample - 1) + sub / 2.0]


#: sub-pixel samples per chunk of the solid-angle sum (~30 MB of float64 geometry per chunk)
SOLID_ANGLE_CHUNK_SAMPLES = 1 << 18


_SOLID_ANGLE_SUMS: dict = {}       # detector sampling (by value) -> sum before the division by steps
_SOLID_ANGLE_SUMS_MAX = 64


def _solid_angle_key(m) -> tuple:
    """What the solid-angle sum depends on, by value: sizes, sampling flags and the geometry."""
    import torch

    def b(v):
        return torch.as_tensor(v).detach().cpu().numpy().tobytes()
    geometry = ("pixel_m", "fdet", "sdet", "odet", "pix0", "beam", "distance_m", "close_distance_m",
                "thickstep_m")
    return (m.fpixels, m.spixels, m.oversample, m.thicksteps, m.oversample_omega, m.point_pixel,
            m.curved, str(m.dtype), str(m.device), *(b(getattr(m, k)) for k in geometry),
            None if m.mask is None else b(m.mask))


def solid_angle_sum_sr(model, chunk_pixels=None) -> float:
    """C's "solid angle subtended by detector" (see ``_solid_angle_sum``). A detector sampled as
    before (the same geometry, sizes and mask, compared by value: the points of a sweep over the
    crystal) gets the sum without the pass over its pixels; ``chunk_pixels`` given: always summed."""
    if chunk_pixels is not None:
        return _solid_angle_sum(model, chunk_pixels) / model.steps
    key = _solid_angle_key(model)
    total = _SOLID_ANGLE_SUMS.get(key)
    if total is None:
        total = _solid_angle_sum(model)
        if len(_SOLID_ANGLE_SUMS) >= _SOLID_ANGLE_SUMS_MAX:
            _SOLID_ANGLE_SUMS.clear()                   # (a few detectors at a time in practice)
        _SOLID_ANGLE_SUMS[key] = total
    return total / model.steps


def _solid_angle_sum(model, chunk_pixels=None) -> float:
    """C's "solid angle subtended by detector" times ``steps`` (sources × domains × φ steps ×
    oversample², the division C prints it after): the sum over simulated pixels, sensor layers and
    sub-pixels of the pixel solid angle C uses there (the first sub-pixel's unless
    ``-oversample_omega``), in steradian. A report number only: evaluated without gradients, in chunks of ``chunk_pixels``
    (default: ``SOLID_ANGLE_CHUNK_SAMPLES`` samples).
    Positions and solid angle come from the engine's stage functions (one formula each)."""
    import torch

    from nbsim.engine import _positions, simulated_indices, sqrt_exact
    from nbsim.physics import airpath, solid_angle
    m = model
    idx_all = simulated_indices(m)
    n = m.spixels * m.fpixels if idx_all is None else int(idx_all.numel())
    T, O = m.thicksteps, m.oversample ** 2
    chunk_pixels = chunk_pixels or max(1, SOLID_ANGLE_CHUNK_SAMPLES // (T * O if m.oversample_omega
                                                                         else 1))
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, chunk_pixels):
            stop = min(n, start + chunk_pixels)
            idx = (torch.arange(start, stop, device=m.device) if idx_all is None else idx_all[start:stop])
            # (P, T, O) metres; without -oversample_omega the first sub-pixel's for every sample
            pos = _positions(m, idx, first=not m.oversample_omega)
            _, R = airpath([c.detach() for c in pos], sqrt_exact)
            if m.oversample_omega:
                om = solid_angle(R, m.pixel_m, m.close_distance_m, m.point_pixel).sum()
            else:
                om = solid_angle(R[:, 0, 0], m.pixel_m, m.close_distance_m, m.point_pixel).sum() * (T * O)
            total += float(om)
    return total
