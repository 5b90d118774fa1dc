"""Sampling grids: sources (divergence × dispersion or a source file), φ steps, mosaic domains and
sensor layers, with nanoBragg's auto-selection rules (§4.2 items 6-8, §4.4).

Each ``resolve_*`` takes plain numbers (None = "not given") and returns plain numbers, so the rules
are testable without torch; a range or angle may also be a 0-d tensor (a parameter of
``nbsim.params``): the rules then decide at its value and the returned range and step are tensors
that keep its graph. ``make_sources`` builds the tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nbsim.params import plain, value
from nbsim.rotation import rotate_axis, unitize
from nbsim.units import RTD


def _auto_steps(steps, rng, step, *, none_range=0.0, steps_only_range=1.0):
    """C's shared (range, step, steps) auto-selection; None = not given (C's -1)."""
    steps = -1 if steps is None else steps
    rng = -1.0 if rng is None else rng
    step = -1.0 if step is None else step
    if steps <= 0:
        if value(rng) < 0.0:
            if value(step) <= 0.0:
                steps, rng, step = 1, 0.0, 0.0
            else:
                rng, steps = step, 2
        else:
            if value(step) <= 0.0:
                step, steps = rng, 2
            else:
                steps = int(math.ceil(value(rng) / value(step)))
    else:
        if value(rng) < 0.0:
            if value(step) <= 0.0:
                rng = steps_only_range
                step = rng / steps
            else:
                rng, steps = step, 2
        else:
            if value(step) <= 0.0:
                if steps <= 1:
                    steps = 2
                step = rng / (steps - 1)
    if value(rng) <= 0.0 or value(step) <= 0.0 or steps <= 0:
        steps, rng, step = 1, 0.0, 0.0
    return steps, rng, step


def resolve_divergence(range_rad, step_rad, steps):
    """(steps, range, step) of one divergence axis (rad)."""
    return _auto_steps(steps, range_rad, step_rad)


def resolve_dispersion(dispersion_frac, dispsteps):
    """(steps, dispersion, dispstep) — fractional; C has no dispstep flag."""
    return _auto_steps(dispsteps, dispersion_frac, None)


def resolve_phi(phi0_rad, osc_rad, phistep_rad, phisteps):
    """(phisteps, osc, phistep) in rad, C's rules (note -osc 0 gives 2 steps of 0)."""
    steps = -1 if phisteps is None else phisteps
    osc = -1.0 if osc_rad is None else osc_rad
    step = -1.0 if phistep_rad is None else phistep_rad
    if steps < 0:
        if value(osc) < 0.0:
            if value(step) <= 0.0:
                steps, osc, step = 1, 0.0, 0.0
            else:
                osc, steps = step, 2
        else:
            if value(step) <= 0.0:
                steps, step = 2, osc / 2.0
            else:
                steps = int(math.ceil(value(osc) / value(step)))
    else:
        if steps == 0:
            steps = 1
        if value(osc) < 0.0:
            if value(step) <= 0.0:
                osc = 1.0 / RTD
                step = osc / steps
            else:
                osc, steps = step, 2
        else:
            if value(step) < 0.0:
                step = osc / steps
    return steps, osc, step


def resolve_thickness(thick_m, thicksteps, *, c_layers=True):
    """(thicksteps, thick, thickstep) in m. ``c_layers`` (quirk thickness_layers not fixed): layers
    at 0, Δ, ..., T with Δ = T/(N-1) (or T/2 with N=2 when only T is given); else N layers of T/N."""
    steps = -1 if thicksteps is None else thicksteps
    thick = thick_m
    if not c_layers:
        if value(thick) <= 0:
            return 1, 0.0, 0.0
        n = steps if steps > 0 else 2
        return n, thick, thick / n
    step = -1.0
    if steps <= 0:
        if value(thick) < 0.0:
            steps, thick, step = 1, 0.0, 0.0
        else:
            steps, step = 2, thick / 2
    else:
        if value(thick) < 0.0:
            thick = 0.5e-6
            step = thick / steps
        else:
            if steps <= 1:
                steps = 2
            step = thick / (steps - 1)
    if value(thick) <= 0.0 or value(step) <= 0.0 or steps <= 0:
        steps, thick, step = 1, 0.0, 0.0
    return steps, thick, step


def resolve_mosaic(spread_rad, domains):
    """(domains, spread, warning or None)."""
    d = -1 if domains is None else domains
    if d <= 0:
        if value(spread_rad) <= 0.0:
            return 1, 0.0, None
        return 10, spread_rad, "finite mosaicity with only one domain! upping to 10 mosaic domains"
    if value(spread_rad) <= 0.0:
        return 1, 0.0, ("zero mosaic spread specified.  setting mosaic_domains = 1" if d > 1 else None)
    return d, spread_rad, None


def _div2(num, den):
    """num/den/den with IEEE semantics (0/0 = NaN keeps the point, x/0 = ±inf)."""
    if den != 0:
        return num / den / den
    return float("nan") if num == 0 else math.copysign(float("inf"), num)


def _stack(values, dtype, device) -> torch.Tensor:
    """(n,) tensor of numbers or 0-d tensors (their graphs kept)."""
    return torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in values])


@dataclass
class Sources:
    direction: torch.Tensor   # (S, 3) unit vectors from the sample towards each source
    wavelength_m: torch.Tensor  # (S,)
    weight: torch.Tensor      # (S,) relative weights (all 1 unless source_intensity_ignored is fixed)
    divsteps: int
    dispsteps: int
    hdiv: tuple
    vdiv: tuple
    dispersion: tuple
    listing: list             # C-style lines "X Y Z I lambda" (before unitizing)
    deviations: list = field(default_factory=list)   # (h, v) divergence angles kept (rad), C's order
    lambdas_m: list = field(default_factory=list)    # the dispersion's wavelengths (m), C's order


def spectrum(src: Sources) -> list:
    """The beam's spectrum as plain numbers: ``[[wavelength_A, weight], ...]`` over the distinct
    source wavelengths, ascending, each weight the sum of the weights of the sources with that
    wavelength, normalized to sum 1 (report/output only: no graph is kept)."""
    lam = plain(src.wavelength_m).astype(np.float64) * 1e10
    w = plain(src.weight).astype(np.float64)
    if lam.size == 0:
        return []
    uniq, inv = np.unique(lam, return_inverse=True)
    tot = np.zeros(uniq.shape)
    np.add.at(tot, inv, w)
    s = tot.sum()
    tot = tot / s if s > 0 else np.full(uniq.shape, 1.0 / uniq.size)
    return [[float(a), float(b)] for a, b in zip(uniq, tot)]


def make_sources(*, beam, polar, vert, wavelength_m, hdiv, vdiv, disp, round_div=True, table=None,
                 ignore_intensity=True, dtype=torch.float64, device="cpu") -> Sources:
    """Sources from divergence (steps, range, step) × dispersion (steps, frac, step), or a table
    (n, 5) of X Y Z I λ (m) with NaN for missing values. beam/polar/vert: (3,) unit vectors."""
    source_distance = 10.0
    listing = []
    if table is not None and len(table):
        rows = []
        for X, Y, Z, I, lam in table:
            X = -source_distance * float(beam[0]) if math.isnan(X) else X
            Y = -source_distance * float(beam[1]) if math.isnan(Y) else Y
            Z = -source_distance * float(beam[2]) if math.isnan(Z) else Z
            I = 1.0 if math.isnan(I) else I
            lam = wavelength_m if math.isnan(lam) else lam
            rows.append((X, Y, Z, I, lam))
        pos = torch.tensor([r[:3] for r in rows], dtype=dtype, device=device)
        lams = _stack([r[4] for r in rows], dtype, device)
        w = torch.tensor([r[3] for r in rows], dtype=dtype, device=device)
        weight = torch.ones_like(w) if ignore_intensity else w / w.mean()
        listing = [f"{r[0]:g} {r[1]:g} {r[2]:g}   {r[3]:g} {value(r[4]):g}" for r in rows]
        direction, _ = unitize(pos)
        return Sources(direction, lams, weight, len(rows), 1, (1, 0.0, 0.0), (1, 0.0, 0.0), (1, 0.0, 0.0),
                       listing)
    hsteps, hrange, hstep = hdiv
    vsteps, vrange, vstep = vdiv
    dsteps, dispersion, dstep = disp
    angles = []
    for i in range(hsteps):
        for j in range(vsteps):
            h = hstep * i - hrange / 2.0
            v = vstep * j - vrange / 2.0
            hv, vv, hs, vs = value(h), value(v), value(hstep), value(vstep)
            test = _div2(hv * hv - hs * hs / 4.0 * (1 - hsteps % 2), value(hrange))
            test += _div2(vv * vv - vs * vs / 4.0 * (1 - vsteps % 2), value(vrange))
            if round_div and test * 4.0 > 1.1:
                continue
            angles.append((h, v))
    lam_list = [wavelength_m * (1.0 + dstep * k - dispersion / 2.0) for k in range(dsteps)]
    dirs, lams = [], []
    base = -source_distance * beam
    weight_val = 1.0 / (len(angles) * dsteps) if angles else 0.0
    for h, v in angles:
        vec = rotate_axis(rotate_axis(base, polar, v), vert, h)
        for lam in lam_list:
            dirs.append(vec)
            lams.append(lam)
            listing.append(f"{value(vec[0]):g} {value(vec[1]):g} {value(vec[2]):g}   {weight_val:g} "
                           f"{value(lam):g}")
    pos = torch.stack(dirs)
    direction, _ = unitize(pos)
    lam_t = _stack(lams, dtype, device)
    return Sources(direction, lam_t, torch.ones_like(lam_t), len(angles), dsteps, hdiv, vdiv, disp, listing,
                   deviations=[(value(h), value(v)) for h, v in angles],
                   lambdas_m=[value(lam) for lam in lam_list])
