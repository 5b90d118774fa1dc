"""Raw float images, nanoBragg's integer (SMV) and PGM pixel conversions, and its image statistics.

All arrays are (S, F) = (slow, fast), C raster order (index = s*fpixels + f).  ``mask`` arguments
are the **ROI** (``-roi xmin xmax ymin ymax``, inclusive, fast then slow): the pixels C writes.
Pixels excluded by a ``-mask`` file are inside the ROI: their float value is 0 but they still get the
adc offset in the int/noise images, so pass the ROI here, not ROI & mask.

C details reproduced (nanoBragg.c, output section):

* ``floatimage`` is ``float*``: statistics and ``max_I`` use the float32 values;
  ``sumsqr += f*f`` squares in float32 before the double accumulation.
* int: ``test = f*scale + adc`` (double), clip to [0, 65535], ``(unsigned short) floorf(test + 0.5)``
  (the argument of ``floorf`` is rounded to float32).  Outside the ROI: 0, no adc.
* default int scale: ``55000/max_I`` if ``max_I > 0`` else 1 (``-scale`` <= 0 also means default).
* pgm: ``test = f*pgm_scale`` (double), ``> 255 -> 255``, ``(unsigned char) test`` (truncation);
  default ``pgm_scale = 250/(5*rmsd)`` if rmsd > 0 else the int scale.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes

__all__ = [
    "c_uchar",
    "c_ushort",
    "count_image",
    "default_int_scale",
    "default_pgm_scale",
    "float_bytes",
    "image_stats",
    "int_image",
    "pgm_bytes",
    "pgm_image",
    "read_float",
    "roi_mask",
    "write_float",
    "write_pgm",
]


def roi_mask(fpixels: int, spixels: int, roi=None) -> np.ndarray:
    """Boolean (S, F) ROI from C's ``-roi xmin xmax ymin ymax`` (pixels, inclusive, fast then slow).

    ``roi=None`` = whole detector.  Negative entries mean "not given" as in C (min -> 0, max -> the
    last pixel).
    """
    m = np.zeros((int(spixels), int(fpixels)), dtype=bool)
    if roi is None:
        m[:] = True
        return m
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    xmin = max(xmin, 0)
    if xmax < 0:
        xmax = fpixels
    ymin = max(ymin, 0)
    if ymax < 0:
        ymax = spixels
    m[max(ymin, 0):max(ymax + 1, 0), max(xmin, 0):max(xmax + 1, 0)] = True
    return m


def float_bytes(img) -> bytes:
    """Raw little-endian float32 bytes of an (S, F) image (C writes native order; x86 is little)."""
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError(f"float_bytes: expected a 2-D (slow, fast) image, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def write_float(path, img) -> Path:
    """Write ``img`` (S, F) as raw little-endian float32, no header (nanoBragg ``-floatfile``), atomically."""
    return atomic_write_bytes(path, float_bytes(img))


def read_float(path, fpixels: int, spixels: int) -> np.ndarray:
    """Read a raw float32 image (``.gz`` transparently) -> float32 (spixels, fpixels)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    n = int(fpixels) * int(spixels)
    if len(raw) != 4 * n:
        raise ValueError(f"{path}: expected {4 * n} bytes ({fpixels}x{spixels} float32), file has {len(raw)}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(int(spixels), int(fpixels))


def _c_int_convert(values, bits: int, dtype) -> np.ndarray:
    """C ``(unsigned <bits>) x`` of floating ``x`` on x86-64, as ``dtype`` (same shape).

    Fast path: every value in [0, 2**bits) (NaN fails the test), where the conversion is a plain
    truncation.  Otherwise: truncate to int32 (NaN / out of range -> INT_MIN), keep the low bits."""
    v = np.asarray(values)
    if v.dtype.kind != "f":
        v = v.astype(np.float64)
    if v.size == 0 or (v.min() >= 0.0 and v.max() < float(1 << bits)):
        return v.astype(dtype)
    v = v.astype(np.float64)
    t = np.trunc(v)
    ok = np.isfinite(t) & (t > -2147483649.0) & (t < 2147483648.0)
    out = np.zeros(v.shape, dtype=np.int64)
    out[ok] = t[ok].astype(np.int64)
    return (out & ((1 << bits) - 1)).astype(dtype)


def c_ushort(values) -> np.ndarray:
    """C ``(unsigned short) x`` for floating ``x`` as gcc/x86-64 does it: truncate to int32
    (NaN / out of range -> INT_MIN), keep the low 16 bits.  Same shape, uint16."""
    return _c_int_convert(values, 16, np.uint16)


def c_uchar(values) -> np.ndarray:
    """C ``(unsigned char) x`` for floating ``x`` (x86-64): like :func:`c_ushort`, low 8 bits, uint8."""
    return _c_int_convert(values, 8, np.uint8)


def _roi(img: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return np.ones(img.shape, dtype=bool)
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape:
        raise ValueError(f"mask shape {m.shape} != image shape {img.shape}")
    return m


def _roi_blockwise(img, mask, dtype, convert) -> np.ndarray:
    """(S, F) array of ``dtype``: ``convert(float32 values)`` inside the ROI, 0 outside, computed a
    block of rows at a time (bounded temporary memory for any detector size)."""
    a = np.asarray(img, dtype=np.float32)
    roi = _roi(a, mask)
    whole = bool(roi.all())
    out = np.zeros(a.shape, dtype=dtype)
    for r0, r1 in _row_blocks(a):
        if whole:
            out[r0:r1] = convert(a[r0:r1].reshape(-1)).reshape(r1 - r0, a.shape[1])
        else:
            m = roi[r0:r1]
            out[r0:r1][m] = convert(a[r0:r1][m])
    return out


def default_int_scale(max_I: float) -> float:
    """C default ``intfile_scale``: ``55000/max_I`` if ``max_I > 0`` else 1.0."""
    max_I = float(max_I)
    return 55000.0 / max_I if max_I > 0.0 else 1.0


def default_pgm_scale(rmsd: float, intfile_scale: float) -> float:
    """C default ``pgm_scale``: ``250/(5*rmsd)`` if ``rmsd > 0`` else ``intfile_scale``."""
    rmsd = float(rmsd)
    return 250.0 / (5.0 * rmsd) if rmsd > 0.0 else float(intfile_scale)


def _rounded_counts(vals, scale: float, adc: float, top: float) -> np.ndarray:
    """The int-image formula on float32 pixel values: ``floorf((float)(clip(f*scale + adc, 0, top)
    + 0.5))`` as float32 (NaN stays NaN).  ``top``: 65535 for the SMV image, 2**31 - 128 (the largest
    float32 below 2**31) for the int32 count image."""
    test = vals.astype(np.float64)
    test *= float(scale)
    test += float(adc)
    np.minimum(test, float(top), out=test)   # C: test > 65535 -> 65535; NaN stays NaN
    np.maximum(test, 0.0, out=test)          # C: test < 0 -> 0
    test += 0.5
    t32 = test.astype(np.float32)            # floorf's float argument
    return np.floor(t32, out=t32)


def int_image(img_f32, scale: float, adc: float = 40.0, mask=None) -> np.ndarray:
    """nanoBragg's ``-intfile`` pixels.

    Parameters
    ----------
    img_f32 : array (S, F)
        Float image (photons/pixel); taken as float32 like C's ``floatimage``.
    scale : float
        ``intfile_scale`` (see :func:`default_int_scale`).
    adc : float
        Offset added inside the ROI (C default 40).
    mask : bool array (S, F), optional
        ROI (pixels written); outside it the value is 0 with no adc.

    Returns
    -------
    uint16 (S, F): ``(uint16) floorf((float)(clip(f*scale + adc, 0, 65535) + 0.5))``.
    """
    return _roi_blockwise(img_f32, mask, np.uint16,
                          lambda vals: c_ushort(_rounded_counts(vals, scale, adc, 65535.0)))


#: the int32 count image's ceiling: the largest float32 below 2**31 (the formula rounds in float32)
COUNT_MAX = 2147483520


def count_image(img_f32, scale: float, adc: float = 40.0, mask=None) -> np.ndarray:
    """The int image as 32-bit counts (NeXus ``int32``, CBF): the ``-intfile`` formula
    (:func:`int_image`: same scale, adc, rounding and ROI) clipped to [0, :data:`COUNT_MAX`] instead
    of [0, 65535], so Bragg spots are never cut at 16 bits.  Where ``int_image`` does not clip the two
    are equal.  NaN pixels give 0.  Returns int32 (S, F)."""
    def convert(vals):
        t = _rounded_counts(vals, scale, adc, float(COUNT_MAX))
        return np.nan_to_num(t, nan=0.0).astype(np.int32)
    return _roi_blockwise(img_f32, mask, np.int32, convert)


def pgm_image(img_f32, scale: float, mask=None) -> np.ndarray:
    """PGM pixels: ``(uint8) min(f*scale, 255)`` inside the ROI, 0 outside.  (S, F) uint8."""
    def convert(vals):
        test = vals.astype(np.float64)
        test *= float(scale)
        return c_uchar(np.minimum(test, 255.0, out=test))   # C: test > 255 -> 255; NaN stays NaN
    return _roi_blockwise(img_f32, mask, np.uint8, convert)


def pgm_bytes(img, scale: float, mask=None) -> bytes:
    """Complete nanoBragg PGM file: ``P5\\n<F> <S>\\n# pixels scaled by <%g>\\n255\\n`` + uint8 pixels."""
    from .smv import c_g

    a = np.asarray(img, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"pgm_bytes: expected a 2-D (slow, fast) image, got shape {a.shape}")
    S, F = a.shape
    head = f"P5\n{F} {S}\n# pixels scaled by {c_g(scale)}\n255\n".encode("ascii")
    return head + pgm_image(a, scale, mask).tobytes()


def write_pgm(path, img, scale: float, mask=None) -> Path:
    """Write :func:`pgm_bytes` atomically."""
    return atomic_write_bytes(path, pgm_bytes(img, scale, mask))


_STATS_ROWS_BYTES = 8 << 20     # float32 bytes of image rows per statistics block


def _row_blocks(a: np.ndarray):
    rows = max(1, _STATS_ROWS_BYTES // max(1, a.shape[1] * 4))
    for r0 in range(0, a.shape[0], rows):
        yield r0, min(a.shape[0], r0 + rows)


def _add(carry: float, values: np.ndarray) -> float:
    """``carry`` plus the double sum of ``values`` (C's terms; numpy's pairwise order rather than C's
    running sum: the two differ by ~1e-16 relative, far below the 6 digits nanoBragg prints, and
    the pairwise sum is several times faster than a running one)."""
    if values.size == 0:
        return carry
    return carry + float(np.add.reduce(values, dtype=np.float64))


def image_stats(img, mask=None, *, active=None) -> dict:
    """The statistics nanoBragg prints after the pixel loop, computed as C does.

    Parameters
    ----------
    img : array (S, F)
        The float image; taken as float32 (C's ``floatimage``).
    mask : bool array (S, F), optional
        ROI (default: all).  ``rmsd`` runs over every ROI pixel.
    active : bool array (S, F), optional
        Pixels the C pixel loop computed: ROI and not zero in a ``-mask`` file (default: ``mask``).
        ``max_I``, ``sum``, ``mean``, ``rms`` run over these, in raster order.

    Returns
    -------
    dict with
        ``max_I``  max(0, max active value) (C starts at 0.0 and uses ``>``);
        ``sum``    double sum of the active values; ``sumsqr`` sum of float32 squares;
        ``n``      number of active pixels; ``mean`` = sum/max(n, 1);
        ``rms``    sqrt(sumsqr/(n' - 1)) with n' = max(n, 2) (after C's clamps);
        ``rmsd``   sqrt(sum over ROI of (v - mean)^2 / (m' - 1)), m' = max(#ROI, 2);
        ``max_index`` (s, f) of the first maximum in raster order, or None when max_I == 0.

    The sums add C's terms in double (pairwise, see ``_add``); the image is read in blocks of rows,
    so the extra memory is a few MB whatever the detector size.
    """
    a = np.asarray(img, dtype=np.float32)
    roi = _roi(a, mask)
    act = roi if active is None else _roi(a, active)
    all_act, all_roi = bool(act.all()), bool(roi.all())
    F = a.shape[1]
    n = 0
    total = sumsqr = 0.0
    max_I = 0.0
    max_index = None
    for r0, r1 in _row_blocks(a):
        blk = a[r0:r1]
        v = blk.reshape(-1) if all_act else blk[act[r0:r1]]
        if v.size == 0:
            continue
        n += int(v.size)
        i = int(np.argmax(v))                                   # (a NaN would win argmax:
        if np.isnan(v[i]):                                      #  C's '>' never picks one)
            i = int(np.argmax(np.where(np.isnan(v), -np.inf, v)))
        if float(v[i]) > max_I:                                 # C: strictly greater, from 0.0
            max_I = float(v[i])
            k = i if all_act else int(np.flatnonzero(act[r0:r1])[i])
            max_index = (r0 + k // F, k % F)
        total = _add(total, v)
        sumsqr = _add(sumsqr, np.square(v))                    # float*float in C: float32 squares
    sumn = n if n > 0 else 1
    mean = total / sumn
    if sumn <= 1:
        sumn = 2
    rms = float(np.sqrt(sumsqr / (sumn - 1)))
    m = 0
    sumsqr2 = 0.0
    for r0, r1 in _row_blocks(a):
        blk = a[r0:r1]
        d = (blk.reshape(-1) if all_roi else blk[roi[r0:r1]]).astype(np.float64) - mean
        m += int(d.size)
        sumsqr2 = _add(sumsqr2, np.square(d, out=d))
    if m <= 1:
        m = 2
    rmsd = float(np.sqrt(sumsqr2 / (m - 1)))
    return {"max_I": max_I, "sum": total, "sumsqr": sumsqr, "n": n, "mean": mean, "rms": rms,
            "rmsd": rmsd, "max_index": max_index}
