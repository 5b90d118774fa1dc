"""Pillow images for people: a contact sheet of sweep previews, and C | nbsim | difference panels.

``contact_sheet(entries, out)``: thumbnails in a grid, each with its parameters written under it.
``comparison_png(ref, test, out)``: reference and test on the same (log) intensity scale, side by
side, and a signed difference image (red: test brighter, blue: test dimmer), each panel labelled.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BG = (255, 255, 255)
FG = (0, 0, 0)


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1: scalable built-in font
    except TypeError:                                # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def _save_atomic(img: Image.Image, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:                # zlib level 1: a 64-point sheet 0.1 s instead of
            img.save(f, format="PNG", compress_level=1)  # 0.22 s, and no larger (measured: 1.74 vs 1.77 MB)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list:
    """Greedy word wrap of ``text`` (explicit newlines kept) to ``width`` pixels."""
    out = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=fnt) > width:
                out.append(line)
                line = word
            else:
                line = trial
        out.append(line)
    return out


def _fit(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / max(w, h)
    if s >= 1 and max(w, h) * 2 <= size:             # small images: integer upscale, crisp pixels
        k = int(size // max(w, h))
        return img.resize((w * k, h * k), Image.NEAREST)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS if s < 1 else Image.NEAREST)


def contact_sheet(entries: Sequence[Tuple[Union[str, Path, Image.Image, None], str]],
                  out: Union[str, Path], thumb: int = 200, cols: Optional[int] = None,
                  title: Optional[str] = None, font_size: int = 12) -> Path:
    """Grid of ``(image or path, caption)``; a missing image becomes a grey 'missing' tile."""
    n = max(1, len(entries))
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))), 6)
    rows = math.ceil(n / cols)
    fnt = font(font_size)
    pad = 6
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(scratch, cap, fnt, thumb) for _, cap in entries]
    line_h = font_size + 3
    cap_h = max((len(c) for c in captions), default=1) * line_h + pad
    title_h = (font_size + 10) if title else 0
    W = cols * (thumb + pad) + pad
    H = title_h + rows * (thumb + cap_h + pad) + pad
    sheet = Image.new("RGB", (W, H), BG)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=FG, font=font(font_size + 2))
    for i, (src, _) in enumerate(entries):
        r, c = divmod(i, cols)
        x = pad + c * (thumb + pad)
        y = title_h + pad + r * (thumb + cap_h + pad)
        img = None
        if isinstance(src, Image.Image):
            img = src
        elif src is not None and Path(src).is_file():
            img = Image.open(src)
            img.load()
        if img is None:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
            draw.text((x + 8, y + thumb // 2), "missing", fill=FG, font=fnt)
        else:
            t = _fit(img.convert("RGB"), thumb)
            sheet.paste(t, (x + (thumb - t.size[0]) // 2, y + (thumb - t.size[1]) // 2))
        for j, line in enumerate(captions[i]):
            draw.text((x, y + thumb + 2 + j * line_h), line, fill=FG, font=fnt)
    return _save_atomic(sheet, out)


# ---------------------------------------------------------------------------------------------
# C | nbsim | difference
# ---------------------------------------------------------------------------------------------

def log_scale(img: np.ndarray, like: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 log display of ``img`` using the scale of ``like`` (default: itself), so two images
    shown with the same ``like`` are directly comparable."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    ref = a if like is None else np.nan_to_num(np.asarray(like, dtype=np.float64))
    lo = float(ref.min()) if ref.size else 0.0
    pos = ref[ref > lo] - lo
    unit = float(np.median(pos)) if pos.size else 1.0
    unit = max(unit, 1e-30)
    top = float(np.log1p((ref.max() - lo) / unit)) if ref.size else 0.0
    if top <= 0:
        return np.zeros(a.shape, np.uint8)
    v = np.log1p(np.clip(a - lo, 0, None) / unit) / top
    return np.clip(np.rint(v * 255), 0, 255).astype(np.uint8)


def signed_diff_rgb(diff: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
    """RGB image of a signed difference: white 0, red positive, blue negative (linear to ``scale``)."""
    d = np.nan_to_num(np.asarray(diff, dtype=np.float64))
    scale = float(np.abs(d).max()) if scale is None else float(scale)
    if scale <= 0:
        return np.full(d.shape + (3,), 255, np.uint8)
    v = np.clip(d / scale, -1, 1)
    rgb = np.empty(d.shape + (3,), np.float64)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb[..., 0] = 255 * (1 - neg)
    rgb[..., 1] = 255 * (1 - pos - neg)
    rgb[..., 2] = 255 * (1 - pos)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def panels_png(panels: Sequence[Tuple[np.ndarray, str]], out: Union[str, Path], size: int = 256,
               title: Optional[str] = None, font_size: int = 12) -> Path:
    """Labelled panels side by side (uint8 gray (H, W) or RGB (H, W, 3) arrays)."""
    imgs = []
    for arr, cap in panels:
        im = Image.fromarray(arr).convert("RGB")
        imgs.append((_fit(im, size), cap))
    fnt = font(font_size)
    pad, line_h = 6, font_size + 3
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caps = [_wrap(scratch, c, fnt, size) for _, c in imgs]
    cap_h = max(len(c) for c in caps) * line_h + pad
    title_lines = _wrap(scratch, title, fnt, len(imgs) * (size + pad)) if title else []
    title_h = len(title_lines) * line_h + (pad if title else 0)
    W = len(imgs) * (size + pad) + pad
    H = title_h + size + cap_h + 2 * pad
    sheet = Image.new("RGB", (W, H), BG)
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(title_lines):
        draw.text((pad, pad + j * line_h), line, fill=FG, font=fnt)
    for i, (im, _) in enumerate(imgs):
        x, y = pad + i * (size + pad), title_h + pad
        sheet.paste(im, (x + (size - im.size[0]) // 2, y + (size - im.size[1]) // 2))
        for j, line in enumerate(caps[i]):
            draw.text((x, y + size + 2 + j * line_h), line, fill=FG, font=fnt)
    return _save_atomic(sheet, out)


def comparison_png(ref: np.ndarray, test: np.ndarray, out: Union[str, Path], title: Optional[str] = None,
                   ref_label: str = "C (nanoBragg)", test_label: str = "nbsim", size: int = 256) -> Path:
    """``ref | test | test - ref`` panels. The two images share the log scale of ``ref``."""
    ref = np.asarray(ref, np.float64)
    test = np.asarray(test, np.float64)
    d = test - ref
    m = float(np.abs(d).max()) if d.size else 0.0
    mx = float(np.abs(ref).max()) if ref.size else 0.0
    dcap = "difference: identical" if m == 0 else \
        f"difference nbsim - C (red +, blue -), full scale {m:.3g} = {m / max(mx, 1e-30):.2e} max"
    return panels_png([(log_scale(ref), f"{ref_label}, max {mx:.4g}"),
                       (log_scale(test, like=ref), f"{test_label}, max {float(test.max()):.4g}"),
                       (signed_diff_rgb(d, m), dcap)], out, size=size, title=title)
