"""Image statistics of a finished run, as nanoBragg prints them (``SimResult.info``)."""
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
        os_ = model.oversample
        from nbsim.params import value
        sub = value(model.pixel_m) / os_
        # C reports the last sub-pixel of the maximum's pixel
        at = [sub * (f * os_ + os_ - 1) + sub / 2.0, sub * (s * os_ + os_ - 1) + sub / 2.0]
    return dict(max_I=st["max_I"], max_I_at_m=at, mean=st["mean"], rms=st["rms"], rmsd=st["rmsd"],
                sum=st["sum"], pixels=st["n"])
