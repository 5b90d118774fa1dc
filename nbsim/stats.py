"""Image statistics exactly as nanoBragg prints them (computed from the float32 image)."""
from __future__ import annotations

import numpy as np


def image_stats(img32: np.ndarray, mask: np.ndarray, model=None) -> dict:
    """max_I (and where), mean, rms, rmsd, sum over simulated pixels; C's N-1 conventions.

    img32: (S, F) float32; mask: (S, F) bool of simulated pixels.
    """
    whole = bool(mask.all())
    vals = (img32.reshape(-1) if whole else img32[mask]).astype(np.float64)
    n = vals.size
    total = float(vals.sum())
    # (no BLAS here: numpy's BLAS threads spin after a call and slow the next torch kernels)
    sumsqr = float(np.square(vals).sum())
    max_I = 0.0
    at = [0.0, 0.0]
    if n:
        # first maximum in raster order among simulated pixels
        flat = img32.reshape(-1) if whole else np.where(mask.reshape(-1), img32.reshape(-1),
                                                         np.float32(-np.inf))
        k = int(np.argmax(flat))
        if flat[k] > 0.0:
            max_I = float(flat[k])
            if model is not None:
                s, f = divmod(k, model.fpixels)
                os_ = model.oversample
                sub = float(model.pixel_m) / os_
                at = [sub * (f * os_ + os_ - 1) + sub / 2.0, sub * (s * os_ + os_ - 1) + sub / 2.0]
    sumn = max(n, 1)
    mean = total / sumn
    rms = float(np.sqrt(sumsqr / (max(n, 2) - 1)))
    vals -= mean
    rmsd = float(np.sqrt(np.square(vals, out=vals).sum() / (max(n, 2) - 1)))
    return dict(max_I=max_I, max_I_at_m=at, mean=mean, rms=rms, rmsd=rmsd, sum=total, pixels=n)
