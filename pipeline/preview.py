"""The stored preview of a float image: with the run's geometry (``info``) and matplotlib, the
picture ``pipeline.view`` draws (colour bar, detector axes, beam centre, resolution rings in Å) at
full size plus ``<name>.thumb.png``; otherwise a person-readable 8-bit grayscale PNG (white = bright).
Sweeps ask for a thumbnail (``thumb``): then the preview is one cheap grayscale PNG of at most that
many pixels a side, block maxima so single-pixel spots stay visible.

A multi-panel entry's preview (``panels_preview_png``) is the picture ``pipeline.view`` draws of it
(``pipeline.view.render_panels``: the detector seen from the sample) and its thumbnail; in a sweep,
that picture scaled to the thumbnail size; without matplotlib, the panels stacked top to bottom in
geometry order (as in the NeXus data array) in grayscale."""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
from PIL import Image

#: the preview of a sweep point (any multirun launcher, ``run_many``): a thumbnail this many pixels a side
SWEEP_THUMB_PX = 200

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
    if (S, F) != (s2 * k, f2 * k):
        pad = np.full((s2 * k, f2 * k), np.nanmin(a) if a.size else 0, dtype=a.dtype)
        pad[:S, :F] = a
        a = pad
    rows = a[0::k].copy()                     # max over each block: the k rows, then the k columns
    for i in range(1, k):                     # (np.maximum of strided views: exact, NaN as np.max)
        np.maximum(rows, a[i::k], out=rows)
    out = rows[:, 0::k].copy()
    for j in range(1, k):
        np.maximum(out, rows[:, j::k], out=out)
    return out


def preview_png(img, path: Union[str, Path], mode: str = "log", info=None, title: str = "",
                thumb: Optional[int] = None) -> List[Path]:
    """Write the preview of ``img`` (S, F; rows = slow axis) atomically; return the written paths.

    ``thumb`` (sweeps: many points, each preview must be cheap): the preview IS a grayscale thumbnail
    of at most ``thumb`` pixels a side (``block_max``), one file. Otherwise (single runs), with the
    run's setup values ``info`` (``run.json`` ``info``) holding the geometry
    (``pipeline.view.GEOMETRY_KEYS``) and matplotlib installed, the annotated picture and its
    thumbnail (``mode`` "log": log colour scale, "percentile": linear), else the grayscale PNG."""
    if mode not in MODES:
        raise ValueError(f"preview mode must be one of {', '.join(MODES)}; got {mode!r}")
    path = Path(path)
    if thumb:
        img = block_max(img, thumb)
    elif info is not None and _annotatable(info):
        from pipeline import view
        tt, centre, lam = view.geometry_from_info(info, np.shape(img))
        return view.render(np.asarray(img), path, two_theta=tt, centre=centre, wavelength_A=lam, title=title,
                           scale="log" if mode == "log" else "linear")
    buf = io.BytesIO()
    # a sweep's thumbnail: zlib's fastest level (3x faster, ~15 % larger on 200 px thumbnails)
    Image.fromarray(to_uint8(img, mode)).save(buf, format="PNG", compress_level=1 if thumb else 6)
    return [atomic_write_bytes(path, buf.getvalue())]


def _annotatable(info) -> bool:
    """The run's geometry is known and matplotlib can draw it."""
    from pipeline.view import GEOMETRY_KEYS
    if not all(k in info for k in GEOMETRY_KEYS):
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def panels_preview_png(images, path: Union[str, Path], mode: str = "log", info=None, title: str = "",
                       thumb: Optional[int] = None) -> List[Path]:
    """Write the preview of a multi-panel run atomically; return the written paths.

    ``images``: per panel float32 (spixels, fpixels) in geometry order; ``info``: the run's ``info``
    (``info['panels']``, ``beam``, ``wavelength_A``). With matplotlib: ``pipeline.view.render_panels``
    (the same picture ``python -m pipeline.view`` draws; ``mode`` "log": log colour scale,
    "percentile": linear) with ``<name>.thumb.png``, or with ``thumb`` that picture alone at most
    ``thumb`` pixels a side. Without matplotlib: the panels stacked along the slow axis (narrower
    ones padded with the minimum), grayscale (``to_uint8``; ``block_max`` with ``thumb``)."""
    if mode not in MODES:
        raise ValueError(f"preview mode must be one of {', '.join(MODES)}; got {mode!r}")
    path = Path(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        arrays = [np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
                  for a in images]
        low = min(float(a.min()) for a in arrays)
        width = max(a.shape[1] for a in arrays)
        stack = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=low)
                                for a in arrays])
        return preview_png(stack, path, mode, thumb=thumb)
    from pipeline import view
    return view.render_panels(list(images), info, path, title=title, scale="log" if mode == "log" else "linear",
                              max_px=thumb or None)
