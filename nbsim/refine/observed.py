"""Observed images for refinement: SMV (int or noise images) or raw float32, as photons per pixel.

``read_observed(path, shape, adc=40, scale=1)`` returns ``(photons, valid)``: float64 (slow, fast)
``(counts − adc) / scale`` and a bool mask of pixels that count (SMV: not saturated at 65535;
float: finite). Every problem (missing, unreadable or truncated file, wrong shape) is a
``SpecError`` naming ``observed`` and the file, with the shape the model needs.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from nbsim.spec import SpecError

FORMATS = ("auto", "smv", "float")
SMV_SATURATED = 65535


def _raw(path: Path, key: str) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(key, f"file not found: {path}") from None
    except OSError as e:
        raise SpecError(key, f"cannot read {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SpecError(key, f"cannot read {path}: corrupt gzip data ({e})") from None
    return raw


def detect_format(raw: bytes) -> str:
    """``smv`` when the bytes start like an SMV header, else ``float``."""
    return "smv" if raw[:1] == b"{" and b"HEADER_BYTES" in raw[:1024] else "float"


def read_observed(path, shape: Tuple[int, int], *, adc: float = 40.0, scale: float = 1.0,
                  fmt: str = "auto", key: str = "observed",
                  what: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read an observed image for a model of ``shape`` = (spixels, fpixels).

    SMV: uint16 counts; ``(counts − adc)/scale`` photons; saturated pixels (65535) are not valid.
    float: raw little-endian float32 of exactly ``shape`` (nanoBragg ``-floatfile``), photons/``scale``.
    ``what``: what has that shape, for the error line (default: the model, detector.fpixels x spixels).
    """
    if fmt not in FORMATS:
        raise SpecError(f"{key}.format", f"must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if not scale > 0:
        raise SpecError(f"{key}.scale", f"must be > 0, got {scale!r}")
    path = Path(path)
    raw = _raw(path, key)
    kind = detect_format(raw) if fmt == "auto" else fmt
    S, F = int(shape[0]), int(shape[1])
    if kind == "smv":
        from nbsim.io.smv import parse_smv
        try:
            header, data = parse_smv(raw, str(path))
        except ValueError as e:
            raise SpecError(key, f"cannot read {path} as SMV: {e}") from None
        if data.shape != (S, F):
            raise SpecError(key, f"{path}: image is {data.shape[1]}x{data.shape[0]} pixels (fast x slow), "
                            + (f"{what} is {F}x{S}" if what else
                               f"the model is {F}x{S} (detector.fpixels x detector.spixels)"))
        valid = data < SMV_SATURATED
        return (data.astype(np.float64) - float(adc)) / float(scale), valid
    if len(raw) != 4 * S * F:
        owner = f"{what}'s" if what else "the model's"
        raise SpecError(key, f"{path}: {len(raw)} bytes is not a float32 image of {owner} shape "
                        f"{F}x{S} (fast x slow, {4 * S * F} bytes)")
    data = np.frombuffer(raw, dtype="<f4").astype(np.float64).reshape(S, F)
    valid = np.isfinite(data)
    return np.where(valid, data, 0.0) / float(scale), valid


def read_mask(path, shape: Tuple[int, int], key: str = "observed.mask") -> np.ndarray:
    """An SMV (or float) mask of ``shape``: pixels that are not 0 count."""
    raw = _raw(Path(path), key)
    data, _ = read_observed(path, shape, adc=0.0, key=key) if detect_format(raw) == "smv" else \
        read_observed(path, shape, adc=0.0, fmt="float", key=key)
    return data != 0


def roi_mask(shape: Tuple[int, int], roi: Optional[Sequence[int]], key: str = "observed.roi") -> np.ndarray:
    """Bool (slow, fast) mask of the inclusive ROI ``[xmin, xmax, ymin, ymax]`` (fast, slow pixel
    indices, as ``detector.roi``); all True when ``roi`` is None."""
    S, F = shape
    m = np.zeros((S, F), bool)
    if roi is None:
        m[:] = True
        return m
    if len(roi) != 4:
        raise SpecError(key, f"must be [xmin, xmax, ymin, ymax], got {list(roi)!r}")
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    if not (0 <= xmin <= xmax < F and 0 <= ymin <= ymax < S):
        raise SpecError(key, f"must satisfy 0 <= xmin <= xmax < {F} and 0 <= ymin <= ymax < {S}, "
                        f"got {list(roi)!r}")
    m[ymin:ymax + 1, xmin:xmax + 1] = True
    return m
