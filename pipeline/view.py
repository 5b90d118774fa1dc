"""Pictures a crystallographer can read: ``python -m pipeline.view outputs/<hash> | image.img | image.cbf``.

The image (photons per pixel, log or linear colour scale) with its colour bar, the detector axes (fast
pixel to the right, slow pixel down, as the file stores them), the beam centre (a cross) and
resolution rings labelled in Å, saved at full size (at least one screen pixel per detector pixel)
and as a small thumbnail. Needs matplotlib (``pip install 'nbsim[view]'``).

Geometry: for a stored entry, every pixel's scattering angle comes from the entry's detector vectors
(``run.json`` ``info``: ``pix0_m``, ``fdet``, ``sdet``, ``odet``, ``beam``, ``pixel_mm``,
``wavelength_A``), so rotated and two-theta detectors get exact rings (a curved detector is drawn as
if flat). For an SMV or CBF file only the header is known: a flat detector normal to the beam at
``DISTANCE``, beam centre from ``XDS_ORGX/ORGY`` (nanoBragg headers) or ``BEAM_CENTER_X/Y`` (mm).

A multi-panel entry (``info['panels']``; ``float.bin`` holds the panels one after another, each
slow-major) is drawn as the detector seen from the sample: every panel's pixel corners are projected
from the sample onto the plane perpendicular to the beam at the nearest panel's depth (``panel_layout``:
horizontal = beam × up, vertical = lab y made perpendicular to the beam; for MOSFLM-like axes, fast to
the right and slow down as in the single-panel picture), one colour scale over all panels, the beam
at (0, 0) and resolution rings as circles (exact in this projection). The store's ``preview.png`` of
such an entry is this picture (``render_panels``), so the two are the same file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

THUMB_PX = 256                 # thumbnail width in pixels
NICE_D_A = (50.0, 30.0, 20.0, 15.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.2, 2.0, 1.8, 1.6, 1.5,
            1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


class ViewError(ValueError):
    """An input that cannot be shown (one line)."""


# ---------------------------------------------------------------------------------------------
# geometry: scattering angle per pixel, beam centre, ring levels
# ---------------------------------------------------------------------------------------------

def two_theta_from_vectors(shape: Tuple[int, int], pix0_m, fdet, sdet, beam, pixel_mm: float) -> np.ndarray:
    """2θ (rad) at every pixel centre, (S, F): position = pix0 + (f+½)·pixel·fdet + (s+½)·pixel·sdet
    (lab frame, m; nanoBragg's pixel centres), angle between it and the beam direction."""
    s_n, f_n = shape
    px = pixel_mm * 1e-3
    f = (np.arange(f_n) + 0.5) * px
    s = (np.arange(s_n) + 0.5) * px
    pos = (np.asarray(pix0_m, float)[None, None, :] + f[None, :, None] * np.asarray(fdet, float)[None, None, :]
           + s[:, None, None] * np.asarray(sdet, float)[None, None, :])
    b = np.asarray(beam, float)
    b = b / np.linalg.norm(b)
    cos2t = (pos @ b) / np.linalg.norm(pos, axis=-1)
    return np.arccos(np.clip(cos2t, -1.0, 1.0))


def beam_centre_from_vectors(pix0_m, fdet, sdet, odet, beam, pixel_mm: float) -> Optional[Tuple[float, float]]:
    """Where the direct beam meets the detector plane, as (fast, slow) pixel coordinates with pixel
    ``i``'s centre at ``i``; None when the beam is parallel to the plane."""
    b, o, p0 = (np.asarray(v, float) for v in (beam, odet, pix0_m))
    b = b / np.linalg.norm(b)
    denom = float(b @ o)
    if abs(denom) < 1e-12:
        return None
    hit = (float(p0 @ o) / denom) * b
    px = pixel_mm * 1e-3
    rel = hit - p0
    return float(rel @ np.asarray(fdet, float)) / px - 0.5, float(rel @ np.asarray(sdet, float)) / px - 0.5


def two_theta_flat(shape: Tuple[int, int], centre_px: Tuple[float, float], distance_mm: float,
                   pixel_mm: float) -> np.ndarray:
    """2θ (rad) per pixel for a flat detector normal to the beam at ``distance_mm``, the beam at
    ``centre_px`` (fast, slow; pixel centres at integers)."""
    s_n, f_n = shape
    df = (np.arange(f_n) - centre_px[0]) * pixel_mm
    ds = (np.arange(s_n) - centre_px[1]) * pixel_mm
    r = np.hypot(df[None, :], ds[:, None])
    return np.arctan2(r, distance_mm)


def d_spacing_A(two_theta_rad: np.ndarray, wavelength_A: float) -> np.ndarray:
    """Bragg's law: d = λ / (2 sin θ) in Å (inf at 2θ = 0)."""
    with np.errstate(divide="ignore"):
        return wavelength_A / (2.0 * np.sin(np.asarray(two_theta_rad) / 2.0))


def ring_levels(d_map: np.ndarray, n: int = 5) -> List[float]:
    """Up to ``n`` round d values (Å) spread evenly in 1/d over the part of the image they cross,
    from the resolution at 15 % of the largest angle to the highest resolution on the image."""
    finite = d_map[np.isfinite(d_map)]
    if finite.size == 0:
        return []
    q_hi = 1.0 / float(finite.min())
    q_lo = 0.15 * q_hi
    out: List[float] = []
    for q in np.linspace(q_lo, q_hi, n + 1)[1:]:
        d = min(NICE_D_A, key=lambda v: abs(1.0 / v - q))
        if 1.0 / d <= q_hi and 1.0 / d >= q_lo and d not in out:
            out.append(d)
    return sorted(out, reverse=True)


# ---------------------------------------------------------------------------------------------
# inputs: a stored entry or an image file
# ---------------------------------------------------------------------------------------------

def load_entry(folder: Path) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple[float, float]], float, str]:
    """(image (S, F) float32, 2θ map, beam centre, wavelength Å, title) of a store entry."""
    try:
        info = json.loads((folder / "run.json").read_text())["info"]
        panels = info.get("panels") if isinstance(info, dict) else None
        if panels:
            sizes = ", ".join(f"{p['name']} {p['fpixels']}x{p['spixels']}" for p in panels)
        else:
            s_n, f_n = int(info["spixels"]), int(info["fpixels"])
            img = np.fromfile(folder / "float.bin", dtype="<f4")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ViewError(f"{folder}: not a readable store entry ({type(e).__name__}: {e})") from None
    if panels:
        raise ViewError(f"{folder}: a multi-panel entry ({len(panels)} panels: {sizes}): read it with "
                        "load_panels (view() draws it with render_panels)")
    if img.size != s_n * f_n:
        raise ViewError(f"{folder}: float.bin has {img.size} pixels, run.json says {f_n}x{s_n}")
    img = img.reshape(s_n, f_n)
    tt, centre, lam = geometry_from_info(info, (s_n, f_n))
    return img, tt, centre, lam, entry_title(folder.name, info)


def load_panels(folder: Path) -> Optional[Tuple[List[np.ndarray], dict]]:
    """(per-panel images (spixels, fpixels) float32 in geometry order, run.json ``info``) of a
    multi-panel store entry; None for a single-panel entry."""
    try:
        info = json.loads((folder / "run.json").read_text())["info"]
        panels = info.get("panels") if isinstance(info, dict) else None
        if not panels:
            return None
        sizes = [(int(p["spixels"]), int(p["fpixels"])) for p in panels]
        flat = np.fromfile(folder / "float.bin", dtype="<f4")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ViewError(f"{folder}: not a readable store entry ({type(e).__name__}: {e})") from None
    n = sum(s_n * f_n for s_n, f_n in sizes)
    if flat.size != n:
        raise ViewError(f"{folder}: float.bin has {flat.size} pixels, run.json's {len(panels)} panels "
                        f"have {n}")
    ends = np.cumsum([s_n * f_n for s_n, f_n in sizes])[:-1]
    return [a.reshape(sz) for a, sz in zip(np.split(flat, ends), sizes)], info


def picture_axes(beam) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(b, right, up): unit beam direction and the picture's horizontal and vertical lab axes, seen
    from the sample looking downstream: up = lab y made perpendicular to the beam (lab z when the
    beam runs along y), right = b × up."""
    b = np.asarray(beam, float)
    b = b / np.linalg.norm(b)
    ref = np.array([0.0, 1.0, 0.0]) if abs(b[1]) < 0.99 else np.array([0.0, 0.0, 1.0])
    up = ref - (ref @ b) * b
    up /= np.linalg.norm(up)
    return b, np.cross(b, up), up


def panel_layout(info) -> Tuple[List[Tuple[np.ndarray, np.ndarray]], float]:
    """Where each panel's pixels lie in the picture: per panel (X, Y), each (spixels + 1, fpixels + 1)
    mm, the pixel corners ``corner + f·pixel·fast + s·pixel·slow`` (``info['panels']``, lab mm)
    projected from the sample onto the plane perpendicular to the beam at depth D (the nearest
    corner's, mm): X = D (p·right)/(p·b), Y = D (p·up)/(p·b) (``picture_axes``). The beam meets
    the plane at (0, 0); 2θ at (X, Y) is atan(hypot(X, Y) / D). Returns (layouts, D)."""
    b, right, up = picture_axes(info["beam"])
    grids = []
    for p in info["panels"]:
        px = float(p["pixel_mm"])
        f = np.arange(int(p["fpixels"]) + 1) * px
        s = np.arange(int(p["spixels"]) + 1) * px
        pos = (np.asarray(p["corner_mm"], float)[None, None, :] + f[None, :, None] * np.asarray(p["fast"], float)
               + s[:, None, None] * np.asarray(p["slow"], float))
        depth = pos @ b
        if not depth.min() > 0:
            raise ViewError(f"panel {p['name']}: not in front of the sample along the beam (cannot be drawn "
                            "as seen from the sample)")
        grids.append((pos, depth))
    D = min(float(depth.min()) for _, depth in grids)
    return [(D * (pos @ right) / depth, D * (pos @ up) / depth) for pos, depth in grids], D


GEOMETRY_KEYS = ("pix0_m", "fdet", "sdet", "odet", "beam", "pixel_mm", "wavelength_A")


def geometry_from_info(info, shape: Tuple[int, int]):
    """(2θ map (S, F) rad, beam centre (fast, slow) px or None, wavelength Å) from a run's setup
    values (``run.json`` ``info`` / ``SetupReport.to_dict()``: ``GEOMETRY_KEYS``)."""
    vec = [info[k] for k in ("pix0_m", "fdet", "sdet", "beam")]
    tt = two_theta_from_vectors(shape, *vec, float(info["pixel_mm"]))
    centre = beam_centre_from_vectors(info["pix0_m"], info["fdet"], info["sdet"], info["odet"], info["beam"],
                                      float(info["pixel_mm"]))
    return tt, centre, float(info["wavelength_A"])


def entry_title(name: str, info) -> str:
    """The picture's title: entry, convention, distance, wavelength (what ``info`` holds of them)."""
    return (f"{name}: {info.get('convention', '?')}, {info.get('distance_mm', float('nan')):g} mm, "
            f"λ {float(info.get('wavelength_A', float('nan'))):g} Å")


def panels_title(name: str, info) -> str:
    """The multi-panel picture's title: entry, panel count, wavelength."""
    return f"{name}: {len(info['panels'])} panels, λ {float(info.get('wavelength_A', float('nan'))):g} Å"


def _header_float(h: Dict[str, str], *keys) -> Optional[float]:
    for k in keys:
        for key in (k, k.lower()):
            if key in h:
                try:
                    v = float(str(h[key]).split()[0].rstrip(";"))
                except (ValueError, IndexError):
                    continue
                if math.isfinite(v):
                    return v
    return None


def load_file(path: Path) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[Tuple[float, float]], float, str]:
    """(image, 2θ map or None, beam centre or None, wavelength Å, title) of an SMV or CBF file."""
    try:
        if path.suffix.lower() == ".cbf":
            import fabio
            im = fabio.open(str(path))
            header, data = {str(k): str(v) for k, v in im.header.items()}, np.asarray(im.data)
        else:
            from nbsim.io.smv import read_smv
            header, data = read_smv(path)
    except Exception as e:                                   # noqa: BLE001 - any reader error: one line
        raise ViewError(f"{path}: cannot read it as an SMV or CBF image ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    img = np.asarray(data, dtype=np.float32)
    if img.ndim != 2:
        raise ViewError(f"{path}: not a 2-D image (shape {img.shape})")
    pixel = _header_float(header, "PIXEL_SIZE")
    dist = _header_float(header, "DISTANCE")
    lam = _header_float(header, "WAVELENGTH")
    orgx, orgy = _header_float(header, "XDS_ORGX"), _header_float(header, "XDS_ORGY")
    centre = None
    if orgx is not None and orgy is not None:
        centre = (orgx - 1.0, orgy - 1.0)                    # nanoBragg: ORGX = Fclose/pixel + 0.5
    elif pixel:
        bx, by = _header_float(header, "BEAM_CENTER_X"), _header_float(header, "BEAM_CENTER_Y")
        if bx is not None and by is not None:
            centre = (bx / pixel - 0.5, by / pixel - 0.5)
    tt = None
    if centre is not None and pixel and dist and lam:
        tt = two_theta_flat(img.shape, centre, dist, pixel)
    return img, tt, centre, lam or float("nan"), f"{path.name}" + (f": {dist:g} mm, λ {lam:g} Å" if dist and lam else "")


# ---------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------

def render(img: np.ndarray, out: Path, *, two_theta: Optional[np.ndarray] = None,
           centre: Optional[Tuple[float, float]] = None, wavelength_A: float = float("nan"),
           title: str = "", scale: str = "log", thumb: bool = True,
           unit: str = "photons / pixel") -> List[Path]:
    """Write ``out`` (full size) and ``<out stem>.thumb.png``; return the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    a = _finite(img)
    s_n, f_n = a.shape
    norm, low = colour_norm(a, scale)
    shown = np.clip(a, low, None) if low is not None else a
    dpi = 100
    side = max(6.0, f_n / dpi + 2.5), max(4.5, s_n / dpi + 1.5)
    fig, ax = plt.subplots(figsize=side, dpi=dpi)
    im = ax.imshow(shown, cmap="gray_r", norm=norm, origin="upper", interpolation="nearest",
                   extent=(-0.5, f_n - 0.5, s_n - 0.5, -0.5))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(unit + (" (log scale)" if isinstance(norm, LogNorm) else ""))
    ax.set_xlabel("fast pixel →")
    ax.set_ylabel("← slow pixel")
    if two_theta is not None and math.isfinite(wavelength_A):
        d = d_spacing_A(two_theta, wavelength_A)
        levels = ring_levels(d)
        if levels:
            cs = ax.contour(np.arange(f_n), np.arange(s_n), d, levels=sorted(levels), colors="tab:blue",
                            linewidths=0.8, alpha=0.8)
            ax.clabel(cs, fmt=lambda v: f"{v:g} Å", fontsize=8, inline=True)
    if centre is not None:
        ax.plot([centre[0]], [centre[1]], marker="+", color="tab:red", markersize=14, mew=1.5,
                label=f"beam centre ({centre[0]:.1f}, {centre[1]:.1f})")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.7)
    ax.set_xlim(-0.5, f_n - 0.5)
    ax.set_ylim(s_n - 0.5, -0.5)
    if title:
        ax.set_title(title, fontsize=9)
    return save_png(fig, out, thumb=thumb, tight=True)


def _finite(img) -> np.ndarray:
    """float64 copy with NaN and inf as 0 (what the picture shows of them)."""
    return np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def colour_norm(a: np.ndarray, scale: str):
    """(matplotlib norm, low clip or None) of the pixel values ``a`` (any shape): log from
    max(smallest positive, 1e-4 × top) to the 99.9th percentile of the positive values (``top``),
    or linear from the minimum to ``top``."""
    from matplotlib.colors import LogNorm, Normalize
    pos = a[a > 0]
    top = float(np.percentile(pos, 99.9)) if pos.size else 1.0
    if scale == "log" and pos.size:
        low = max(float(pos.min()), top * 1e-4)
        return LogNorm(vmin=low, vmax=max(top, low * 10)), low
    return Normalize(vmin=float(a.min()), vmax=max(top, float(a.min()) + 1e-30)), None


def save_png(fig, out: Path, *, thumb: bool = True, tight: bool = False,
             max_px: Optional[int] = None) -> List[Path]:
    """Write ``fig`` to ``out`` (PNG at the figure's dpi; ``tight``: cropped to its content) and
    ``<out stem>.thumb.png``, each atomically; close the figure; return the written paths.
    ``max_px``: instead, ``out`` alone, drawn at a lower dpi and scaled to at most ``max_px``
    pixels a side (a sweep point's preview: the thumbnail is the preview)."""
    import io

    import matplotlib.pyplot as plt

    from nbsim.io.atomic import atomic_write_bytes
    buf = io.BytesIO()
    dpi = fig.dpi
    if max_px:
        w, h = fig.get_size_inches()
        dpi = min(float(fig.dpi), float(max_px) / max(w, h))
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    if max_px:
        from PIL import Image
        with Image.open(io.BytesIO(buf.getvalue())) as full:
            k = min(1.0, max_px / max(full.size))
            small = full.convert("RGB").resize((max(1, int(full.width * k)), max(1, int(full.height * k))),
                                               Image.LANCZOS)
            tb = io.BytesIO()
            small.save(tb, format="PNG")
        return [atomic_write_bytes(out, tb.getvalue())]
    written = [atomic_write_bytes(out, buf.getvalue())]
    if thumb:
        from PIL import Image
        with Image.open(io.BytesIO(buf.getvalue())) as full:
            h = max(1, round(full.height * THUMB_PX / full.width))
            small = full.convert("RGB").resize((THUMB_PX, h), Image.LANCZOS)
            tb = io.BytesIO()
            small.save(tb, format="PNG")
        written.append(atomic_write_bytes(out.with_name(out.stem + ".thumb.png"), tb.getvalue()))
    return written


def panel_figure(images: Sequence[np.ndarray], info, *, title: str = "", scale: str = "log",
                 unit: str = "photons / pixel"):
    """The matplotlib (figure, axes) of a multi-panel detector: each panel's pixels as quadrilaterals
    at their ``panel_layout`` places (mm in the picture plane), one colour scale over all panels
    (``colour_norm``), panel outlines and names, the beam (0, 0) as a cross and resolution rings
    (circles of radius D tan 2θ). The layout is fixed (no cropping), so ``ax.transData`` after
    ``fig.canvas.draw()`` maps mm to the saved PNG's pixels (y from the bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    layouts, D = panel_layout(info)
    arrays = [_finite(a) for a in images]
    norm, low = colour_norm(np.concatenate([a.reshape(-1) for a in arrays]), scale)
    xs = np.concatenate([X.reshape(-1) for X, _ in layouts])
    ys = np.concatenate([Y.reshape(-1) for _, Y in layouts])
    pad = 0.04 * max(float(xs.max() - xs.min()), float(ys.max() - ys.min()), 1e-9)
    x0, x1 = min(float(xs.min()), 0.0) - pad, max(float(xs.max()), 0.0) + pad
    y0, y1 = min(float(ys.min()), 0.0) - pad, max(float(ys.max()), 0.0) + pad
    finest = min(float(p["pixel_mm"]) for p in info["panels"])
    dpi = 100
    w_in = min(max(6.0, (x1 - x0) / finest / dpi * 1.5), 30.0)     # >= 1.5 screen pixels per detector pixel
    h_in = w_in * (y1 - y0) / (x1 - x0)
    fig = plt.figure(figsize=(w_in + 2.0, h_in + 1.2), dpi=dpi)
    W, H = w_in + 2.0, h_in + 1.2
    ax = fig.add_axes((0.8 / W, 0.6 / H, w_in / W, h_in / H))
    cax = fig.add_axes(((0.9 + w_in) / W, 0.6 / H, 0.2 / W, h_in / H))
    mesh = None
    for (X, Y), a, p in zip(layouts, arrays, info["panels"]):
        shown = np.clip(a, low, None) if low is not None else a
        mesh = ax.pcolormesh(X, Y, shown, cmap="gray_r", norm=norm, shading="flat", antialiased=False,
                             edgecolors="none")
        edge = np.concatenate([np.stack((X[0, :], Y[0, :]), 1), np.stack((X[:, -1], Y[:, -1]), 1),
                               np.stack((X[-1, ::-1], Y[-1, ::-1]), 1), np.stack((X[::-1, 0], Y[::-1, 0]), 1)])
        ax.plot(edge[:, 0], edge[:, 1], color="tab:green", linewidth=0.6, alpha=0.7)
        # the name just outside the corner of pixel (0, 0): shows where the panel's rows start
        ax.text(float(2 * X[0, 0] - X[1, 1]), float(2 * Y[0, 0] - Y[1, 1]), str(p["name"]), color="tab:green",
                fontsize=7, ha="center", va="center", clip_on=True)
    cb = fig.colorbar(mesh, cax=cax)
    cb.set_label(unit + (" (log scale)" if isinstance(norm, LogNorm) else ""))
    lam = float(info.get("wavelength_A", float("nan")))
    if math.isfinite(lam):
        r_max = math.hypot(max(abs(x0), abs(x1)), max(abs(y0), abs(y1)))
        d_px = [d_spacing_A(np.arctan(np.hypot(X, Y) / D), lam).reshape(-1) for X, Y in layouts]
        t = np.linspace(0.0, 2.0 * math.pi, 361)
        for d in ring_levels(np.concatenate(d_px)):
            r = D * math.tan(2.0 * math.asin(min(1.0, lam / (2.0 * d))))
            if r < r_max:
                ax.plot(r * np.cos(t), r * np.sin(t), color="tab:blue", linewidth=0.8, alpha=0.8)
                ax.text(r * math.cos(math.pi / 4), r * math.sin(math.pi / 4), f"{d:g} Å", color="tab:blue",
                        fontsize=8, clip_on=True)
    ax.plot([0.0], [0.0], marker="+", color="tab:red", markersize=14, mew=1.5, label="beam")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.7)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel(f"mm → (seen from the sample: the plane normal to the beam at {D:g} mm)")
    ax.set_ylabel("mm ↑")
    if title:
        ax.set_title(title, fontsize=9)
    return fig, ax


def render_panels(images: Sequence[np.ndarray], info, out: Path, *, title: str = "", scale: str = "log",
                  thumb: bool = True, unit: str = "photons / pixel",
                  max_px: Optional[int] = None) -> List[Path]:
    """Write the multi-panel picture (``panel_figure``) to ``out`` and its thumbnail, atomically
    (``max_px``: ``out`` alone, at most that many pixels a side, ``save_png``). The one drawing of a
    multi-panel entry: ``python -m pipeline.view`` and the store's ``preview.png``
    (``pipeline.preview.panels_preview_png``) both call it."""
    fig, _ = panel_figure(images, info, title=title, scale=scale, unit=unit)
    return save_png(fig, out, thumb=thumb, max_px=max_px)


def view(source: Path, out: Optional[Path] = None, scale: str = "log") -> List[Path]:
    """Render a store entry (folder with run.json) or an SMV/CBF file; default output
    ``<entry hash or file stem>.view.png`` in the current folder."""
    if not source.exists():
        raise ViewError(f"{source}: no such file or folder")
    if source.is_dir():
        multi = load_panels(source)
        if multi is not None:
            images, info = multi
            out = out or Path(f"{source.name}.view.png")
            return render_panels(images, info, out, scale=scale, title=panels_title(source.name, info))
        img, tt, centre, lam, title = load_entry(source)
        unit = "photons / pixel"
    elif source.is_file():
        img, tt, centre, lam, title = load_file(source)
        unit = "counts / pixel"
    else:
        raise ViewError(f"{source}: not a regular file or a store entry folder")
    out = out or Path(f"{source.name if source.is_dir() else source.stem}.view.png")
    return render(img, out, two_theta=tt, centre=centre, wavelength_A=lam, title=title, scale=scale, unit=unit)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.view",
                                 description="Render a stored nbsim image or an SMV/CBF file with beam "
                                             "centre, resolution rings, colour bar and axes.")
    ap.add_argument("source", help="outputs/<hash> (a store entry), or an SMV (.img) / CBF (.cbf) file")
    ap.add_argument("-o", "--out", help="output PNG (default: <hash or stem>.view.png here); "
                                        "a .thumb.png is written next to it")
    ap.add_argument("--scale", choices=("log", "linear"), default="log")
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("pipeline.view: error: needs matplotlib: pip install 'nbsim[view]' (or matplotlib)",
              file=sys.stderr)
        return 2
    try:
        paths = view(Path(a.source), Path(a.out) if a.out else None, a.scale)
    except ViewError as e:
        print(f"pipeline.view: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pipeline.view: error: {a.out or a.source}: {e.strerror or e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def run() -> None:
    """Console entry point ``nbsim-view``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
