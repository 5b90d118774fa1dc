"""A person-readable 8-bit grayscale PNG of a float image (white = bright)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

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


def block_max(img, thumb: int) -> np.ndarray:
    """``img`` (S, F) reduced by the smallest integer factor k that brings both sides to at most
    ``thumb`` pixels: each output pixel is the maximum of a k × k block (edge blocks padded with the
    image minimum), so a one-pixel Bragg spot stays visible. ``k == 1``: the image itself."""
    a = np.asarray(img)
    k = max(1, -(-max(a.shape) // max(1, int(thumb))))
    if k == 1:
        return a
    S, F = a.shape
    s2, f2 = -(-S // k), -(-F // k)
    pad = np.full((s2 * k, f2 * k), np.nanmin(a) if a.size else 0, dtype=a.dtype)
    pad[:S, :F] = a
    return pad.reshape(s2, k, f2, k).max(axis=(1, 3))


def preview_png(img, path: Union[str, Path], mode: str = "log", thumb: Optional[int] = None) -> Path:
    """Write ``img`` (S, F; rows = slow axis) as a grayscale PNG, atomically (temp file + rename).
    ``thumb``: at most this many pixels a side (``block_max``; sweeps write thumbnails)."""
    if thumb:
        img = block_max(img, thumb)
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img, mode)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
