"""Image metrics for parity runs: nbsim ("test") against the nanoBragg C program ("reference").

The per-image metrics and the default pass/fail bar are those of ``tests/golden/parity.py`` (the
project's reference parity script), re-implemented here so they also work on in-memory arrays:

* Pearson r between the images (1 if both are constant and equal, 0 if constant and different);
* the 99.9th percentile of ``|T - C| / max|C|`` (``p999_rel``);
* ``max |T - C|`` (absolute, and relative to ``max|C|``);
* the sum ratio ``sum(T) / sum(C)``;
* the offsets of the 25 brightest peaks of C: for each, the shift of the intensity-weighted centroid
  of a 7x7 window around it from C to T (pixels; slow, fast).

A case passes when ``r >= min_r``, ``p999_rel <= max_p999_rel``, ``|sum_ratio - 1| <= max_sum_dev``
(the three criteria of parity.py) and no peak moved farther than ``max_peak_offset_px`` (not in
parity.py; it fails only cases the first three would almost always fail too).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

import numpy as np

N_PEAKS = 25


@dataclass
class Thresholds:
    min_r: float = 0.99999              # parity.py: r >= 0.99999
    max_p999_rel: float = 1e-5          # parity.py: 99.9th percentile of |T-C|/max(C) <= 1e-5
    max_sum_dev: float = 1e-4           # parity.py: |sum(T)/sum(C) - 1| <= 1e-4
    max_peak_offset_px: Optional[float] = 0.5   # not in parity.py (centroid shift); None: off

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Thresholds":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown threshold(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
        return cls(**d)

    def merged(self, d: Optional[dict]) -> "Thresholds":
        base = asdict(self)
        base.update(d or {})
        return Thresholds.from_dict(base)


@dataclass
class Metrics:
    shape: Tuple[int, int]
    pearson_r: float
    p999_rel: float
    max_abs_diff: float
    max_rel_diff: float
    sum_ratio: float
    ref_max: float
    test_max: float
    ref_sum: float
    test_sum: float
    identical: bool
    peaks: List[dict] = field(default_factory=list)   # {s, f, value, ds, df, offset_px}
    max_peak_offset_px: float = 0.0
    mean_peak_offset_px: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _as2d(a, shape=None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1 and shape is not None:
        a = a.reshape(shape)
    if a.ndim != 2:
        raise ValueError(f"need a 2-D image (slow, fast), got shape {a.shape}")
    return a


def pearson_r(test: np.ndarray, ref: np.ndarray) -> float:
    """parity.py's rule: corrcoef, or 1/0 for a constant reference (equal/different)."""
    t, r = test.ravel(), ref.ravel()
    if r.std() > 0 and t.std() > 0:
        return float(np.corrcoef(t, r)[0, 1])
    if r.std() > 0:                       # constant test image against a varying reference
        return 0.0
    return 1.0 if np.allclose(t, r) else 0.0


def local_maxima(img: np.ndarray, radius: int = 2) -> np.ndarray:
    """Boolean mask of pixels that are the maximum of their (2r+1)^2 window, > 0, and above the
    window's minimum (flat regions are not peaks)."""
    a = np.asarray(img, dtype=np.float64)
    k = (2 * radius + 1, 2 * radius + 1)
    hi = np.lib.stride_tricks.sliding_window_view(np.pad(a, radius, constant_values=-np.inf), k).max(axis=(-1, -2))
    lo = np.lib.stride_tricks.sliding_window_view(np.pad(a, radius, mode="edge"), k).min(axis=(-1, -2))
    return (a >= hi) & (a > lo) & (a > 0)


def find_peaks(img: np.ndarray, n: int = N_PEAKS, radius: int = 2, min_sep: int = 3) -> List[Tuple[int, int, float]]:
    """The ``n`` brightest local maxima ``(slow, fast, value)``, at least ``min_sep`` px apart.

    Ties (plateaus) are broken by raster order, so identical images give identical lists."""
    a = np.asarray(img, dtype=np.float64)
    ss, ff = np.nonzero(local_maxima(a, radius))
    if ss.size == 0:
        return []
    vals = a[ss, ff]
    order = np.lexsort((ff, ss, -vals))         # brightest first, then raster order
    out: List[Tuple[int, int, float]] = []
    for i in order:
        s, f = int(ss[i]), int(ff[i])
        if any(max(abs(s - s2), abs(f - f2)) < min_sep for s2, f2, _ in out):
            continue
        out.append((s, f, float(vals[i])))
        if len(out) == n:
            break
    return out


def _centroid(win: np.ndarray, base: float) -> Tuple[float, float]:
    w = np.clip(win - base, 0, None)
    tot = w.sum()
    if not tot > 0:
        c = ((win.shape[0] - 1) / 2, (win.shape[1] - 1) / 2)
        return float(c[0]), float(c[1])
    ss, ff = np.indices(win.shape)
    return float((w * ss).sum() / tot), float((w * ff).sum() / tot)


def peak_offsets(test: np.ndarray, ref: np.ndarray, n: int = N_PEAKS, search: int = 3) -> List[dict]:
    """For each of the ``n`` brightest peaks of ``ref``: how far the spot moved in ``test``.

    The offset is the difference of the intensity-weighted centroids of a (2*search+1)^2 window
    around the reference peak (weights above the reference window's minimum), in pixels (slow,
    fast). Identical images give exactly 0; unlike the position of the maximum it does not jump
    across flat-topped spots when values differ in the last bits."""
    out = []
    S, F = ref.shape
    for s, f, v in find_peaks(ref, n):
        s0, s1, f0, f1 = max(0, s - search), min(S, s + search + 1), max(0, f - search), min(F, f + search + 1)
        rw, tw = ref[s0:s1, f0:f1], test[s0:s1, f0:f1]
        base = float(rw.min())
        (rs, rf), (ts, tf) = _centroid(rw, base), _centroid(tw, base)
        ds, df = ts - rs, tf - rf
        out.append({"s": s, "f": f, "value": v, "test_value": float(test[s, f]), "ds": ds, "df": df,
                    "offset_px": math.hypot(ds, df)})
    return out


def compare_images(test, ref, shape=None, n_peaks: int = N_PEAKS) -> Metrics:
    """All metrics of ``test`` (nbsim) against ``ref`` (C). Images are (slow, fast) or flat + ``shape``."""
    ref = _as2d(ref, shape)
    test = _as2d(test, shape if shape is not None else ref.shape)
    if test.shape != ref.shape:
        raise ValueError(f"image shapes differ: nbsim {test.shape} vs C {ref.shape}")
    mx = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-30)
    diff = np.abs(test - ref)
    rel = diff / mx
    rsum, tsum = float(ref.sum()), float(test.sum())
    peaks = peak_offsets(test, ref, n_peaks)
    offs = [p["offset_px"] for p in peaks]
    return Metrics(
        shape=tuple(ref.shape), pearson_r=pearson_r(test, ref),
        p999_rel=float(np.quantile(rel, 0.999)) if rel.size else 0.0,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        max_rel_diff=float(rel.max()) if rel.size else 0.0,
        sum_ratio=tsum / rsum if rsum != 0 else (1.0 if tsum == 0 else float("nan")),
        ref_max=float(ref.max()), test_max=float(test.max()), ref_sum=rsum, test_sum=tsum,
        identical=bool(np.array_equal(test, ref)),
        peaks=peaks, max_peak_offset_px=max(offs) if offs else 0.0,
        mean_peak_offset_px=float(np.mean(offs)) if offs else 0.0)


def verdict(m: Metrics, th: Thresholds = Thresholds()) -> Tuple[bool, List[str]]:
    """``(passed, reasons)``; reasons name every criterion that failed."""
    why = []
    if not (m.pearson_r >= th.min_r):
        why.append(f"r={m.pearson_r:.7f} < {th.min_r}")
    if not (m.p999_rel <= th.max_p999_rel):
        why.append(f"p99.9 |d|/max={m.p999_rel:.2e} > {th.max_p999_rel:.0e}")
    if not (abs(m.sum_ratio - 1) <= th.max_sum_dev):
        why.append(f"sum ratio={m.sum_ratio:.6f} off by more than {th.max_sum_dev:.0e}")
    if th.max_peak_offset_px is not None and m.max_peak_offset_px > th.max_peak_offset_px:
        why.append(f"peak shift {m.max_peak_offset_px:.2f} px > {th.max_peak_offset_px} px")
    return not why, why


def summary_line(m: Metrics) -> str:
    return (f"r={m.pearson_r:.7f} p99.9err={m.p999_rel:.2e} max|d|={m.max_abs_diff:.3g} "
            f"sum_ratio={m.sum_ratio:.6f} peak_shift<={m.max_peak_offset_px:.2g}px")


def read_float_image(path, shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A raw float32 image (nanoBragg -floatfile; ``.gz`` accepted). Flat unless ``shape``."""
    import gzip
    from pathlib import Path
    p = Path(path)
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if shape is not None:
        if a.size != shape[0] * shape[1]:
            raise ValueError(f"{p}: {a.size} floats, expected {shape[0]}x{shape[1]}")
        a = a.reshape(shape)
    return a
