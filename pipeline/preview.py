"""A person-readable 8-bit grayscale PNG of a float image (white = bright)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from nbsim.io.atomic import atomic_write_bytes

MODES = ("log", "percentile")


def to_uint8(img, mode: str = "log", percentile: float = 99.5, log_range: float = 30.0) -> np.ndarray:
    """Scale ``img`` (S, F) to uint8; white is the ``percentile``-th percentile and above.

    ``percentile``: linear between the image minimum and that level. ``log``: log1p compression so
    that a pixel at 1/``log_range`` of that level is still about a third grey (shows weak and strong
    spots alike).
    """
    if mode not in MODES:
        raise ValueError(f"preview mode must be one of {', '.join(MODES)}; got {mode!r}")
    a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim != 2:
        raise ValueError(f"preview needs a 2-D image, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    a = a - a.min()
    top = np.percentile(a, percentile)
    if top <= 0:                                  # mostly empty image: scale to the maximum
        top = a.max()
    if top <= 0:
        return np.zeros(a.shape, dtype=np.uint8)
    v = a / top
    if mode == "log":
        v = np.log1p(v * log_range) / np.log1p(log_range)
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


def preview_png(img, path: Union[str, Path], mode: str = "log") -> Path:
    """Write ``img`` (S, F; rows = slow axis) as a grayscale PNG, atomically (temp file + rename)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img, mode)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
