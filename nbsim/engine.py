"""The batched simulation kernel.

``Model`` holds every prepared tensor of an experiment; ``render`` evaluates any chunk of pixels as
one tensor program over pixels × layers (T) × sub-pixels (O = os²) × sources (S) × φ steps (F) ×
mosaic domains (M), and ``simulate_image`` runs the chunks. There is no Python loop over pixels or
any of those dimensions, and no host synchronisation inside the chunk loop.

Faithful mode reproduces the C program's loop-order-dependent behaviour with tensor ops:
* solid angle and polarization from the first sub-pixel / first executed source of a pixel, capture
  fraction of the last layer (quirk 6); ``-oversample_*`` compounding via a reverse cumulative product;
* the φ = 0 carry-over (quirk 4): steady-state orientations plus the very first loop iteration;
* the global switch-off of tricubic interpolation at the first out-of-range lookup (quirk 10), carried
  across chunks as a tensor state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from nbsim.physics import (HKLTable, capture_fraction, lattice_factor, polarization_factor,
                           solid_angle)
from nbsim.rotation import rotate_axis, unitize


@dataclass
class Model:
    """Everything the kernel needs. Vectors (3,) lab frame; lengths in metres unless noted."""
    fpixels: int
    spixels: int
    pixel_m: torch.Tensor
    oversample: int
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    pix0: torch.Tensor
    beam: torch.Tensor
    distance_m: torch.Tensor
    close_distance_m: torch.Tensor
    curved: bool
    point_pixel: bool
    thicksteps: int
    thickstep_m: float
    thick_m: float
    mu_per_m: float
    incident: torch.Tensor        # (S, 3) unit vectors along the incident beam
    wavelength_m: torch.Tensor    # (S,)
    source_weight: torch.Tensor   # (S,)
    lattice: torch.Tensor         # (F, M, 3, 3): rows a, b, c (m) for each φ step and mosaic domain
    lattice_first: Optional[torch.Tensor]  # (F, M, 3, 3) for the run's first loop iteration (quirk 4)
    first_iteration: Optional[tuple]       # (flat pixel index, T, O, S) of that iteration
    recip: tuple                  # setup a*, b*, c* (Å⁻¹)
    N: tuple                      # (Na, Nb, Nc) floats
    shape: str
    fudge: float
    table: Optional[HKLTable]
    default_F: float
    interpolate: bool
    kahn: float
    polar_vector: torch.Tensor
    nopolar: bool
    dmin_m: float
    I_bg: float                   # background added to every pixel's sum (C units)
    fluence: float
    r_e_sqr: float
    steps: int
    oversample_thick: bool
    oversample_polar: bool
    oversample_omega: bool
    faithful: bool
    mask: Optional[torch.Tensor] = None   # (spixels, fpixels) bool: pixels to simulate
    bg_physical: float = 0.0      # physical-mode background per pixel (photons/sr before factors)
    info: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.fdet.dtype

    @property
    def device(self):
        return self.fdet.device

    def per_pixel_elements(self) -> int:
        """Number of samples per pixel (T·O·S·F·M)."""
        return (self.thicksteps * self.oversample ** 2 * self.incident.shape[0]
                * self.lattice.shape[0] * self.lattice.shape[1])


def _positions(m: Model, idx: torch.Tensor):
    """Sub-pixel positions (P, T, O, 3) in metres for flat pixel indices ``idx`` (P,)."""
    os_ = m.oversample
    dt, dev = m.dtype, m.device
    s = torch.div(idx, m.fpixels, rounding_mode="floor").to(dt)
    f = (idx % m.fpixels).to(dt)
    sub = torch.arange(os_, dtype=dt, device=dev)
    subS = sub.repeat_interleave(os_)          # O = os*os, subS outer, subF inner (C loop order)
    subF = sub.repeat(os_)
    subpix = m.pixel_m / os_
    Fdet = subpix * (f[:, None] * os_ + subF) + subpix / 2.0      # (P, O)
    Sdet = subpix * (s[:, None] * os_ + subS) + subpix / 2.0
    Odet = torch.arange(m.thicksteps, dtype=dt, device=dev) * m.thickstep_m   # (T,)
    pos = (Fdet[:, None, :, None] * m.fdet + Sdet[:, None, :, None] * m.sdet
           + Odet[None, :, None, None] * m.odet + m.pix0)            # (P, T, O, 3)
    if m.curved:
        vec = (m.distance_m * m.beam).expand_as(pos)
        vec = rotate_axis(vec, m.sdet.expand_as(pos), pos[..., 1] / m.distance_m)
        pos = rotate_axis(vec, m.fdet.expand_as(pos), pos[..., 2] / m.distance_m)
    return pos


def _first_along(mask: torch.Tensor, values: torch.Tensor, dims: int, fill: float):
    """Value at the first True of ``mask`` over its last ``dims`` dims (C loop order), else ``fill``."""
    flat_m = mask.flatten(-dims)
    flat_v = values.flatten(-dims)
    first = torch.argmax(flat_m.to(torch.int8), dim=-1, keepdim=True)
    v = torch.gather(flat_v, -1, first).squeeze(-1)
    return torch.where(flat_m.any(-1), v, torch.full_like(v, fill))


def render(m: Model, idx: torch.Tensor, interp_on: torch.Tensor, *, first_local=None, trace=None):
    """Pixel values (P,) for flat indices ``idx`` (P,) in raster order, and the new interpolation state.

    interp_on: 0-d bool tensor, C's global ``interpolate`` flag before this chunk.
    first_local: (p, t, o, s) local index of the run's first loop iteration (quirk 4), or None.
    trace: optional dict filled with intermediate tensors (for per-pixel traces).
    """
    dt = m.dtype
    P = idx.shape[0]
    T, O = m.thicksteps, m.oversample ** 2
    pos = _positions(m, idx)                                   # (P, T, O, 3)
    d, R = unitize(pos)
    omega = solid_angle(R, m.pixel_m, m.close_distance_m, m.point_pixel)        # (P, T, O)
    layer = torch.arange(T, dtype=dt, device=m.device)[None, :, None]
    if m.thick_m == 0.0 and not m.oversample_thick:
        capture = torch.ones_like(omega)
    else:
        capture = capture_fraction(d, m.odet, layer, m.thickstep_m, m.mu_per_m)  # (P, T, O)

    inc = m.incident                                            # (S, 3)
    lam = m.wavelength_m                                        # (S,)
    scat = (d[..., None, :] - inc) / lam[:, None]               # (P, T, O, S, 3), m⁻¹
    executed = None
    if m.dmin_m > 0:
        stol = 0.5 * torch.sqrt((scat * scat).sum(-1))
        safe = torch.where(stol > 0, stol, torch.ones_like(stol))
        executed = ~((stol > 0) & (m.dmin_m > 0.5 / safe))     # (P, T, O, S)
    if m.nopolar and not (m.faithful and m.oversample_polar):   # C recomputes it per sub-pixel anyway
        polar = torch.ones(P, T, O, inc.shape[0], dtype=dt, device=m.device)
    else:
        polar = polarization_factor(m.kahn, inc.expand(P, T, O, -1, -1), d[..., None, :].expand(
            P, T, O, inc.shape[0], 3), m.polar_vector)         # (P, T, O, S)

    # Miller indices for every φ step and mosaic domain: h = a·S
    hkl = torch.einsum("ptosj,fmij->ptosfmi", scat, m.lattice)  # (P, T, O, S, F, M, 3)
    if first_local is not None and m.lattice_first is not None:
        p, t, o, s = first_local
        hkl = hkl.clone()
        hkl[p, t, o, s] = torch.einsum("j,fmij->fmi", scat[p, t, o, s], m.lattice_first)
    hkl0 = torch.ceil(hkl - 0.5)
    F_latt = lattice_factor(hkl, hkl0, m.shape, m.N, m.fudge, m.recip)        # (P,T,O,S,F,M)

    # which loop iterations actually run (dmin skip; C also skips F_latt == 0 without water)
    live = torch.ones_like(F_latt, dtype=torch.bool)
    if executed is not None:
        live = live & executed[..., None, None]
    if m.I_bg == 0.0 and m.bg_physical == 0.0:
        live = live & (F_latt != 0)

    new_state = interp_on
    if m.table is None:
        F_cell = torch.full_like(F_latt, m.default_F)
    elif m.interpolate:
        oor = m.table.interp_out_of_range(hkl) & live
        F_near = m.table.nearest(hkl0)
        F_int = m.table.tricubic(hkl)
        if m.faithful:
            # the first out-of-range lookup switches interpolation off for the rest of the run
            seen = torch.cumsum(oor.reshape(-1).to(torch.int32), 0).reshape(oor.shape) > 0
            use_int = interp_on & ~seen
            new_state = interp_on & ~oor.any()
        else:
            use_int = ~oor
        F_cell = torch.where(use_int, F_int, F_near)
    else:
        F_cell = m.table.nearest(hkl0)

    term = F_cell * F_cell * F_latt * F_latt                    # (P,T,O,S,F,M)
    term = torch.where(live, term, torch.zeros_like(term))
    w = m.source_weight[:, None, None]                          # (S,1,1)

    if m.faithful:
        over = m.oversample_thick or m.oversample_polar or m.oversample_omega
        if not over:
            I = m.I_bg + (term * w).sum(dim=(1, 2, 3, 4, 5))
        else:
            fac = torch.ones_like(term)
            if m.oversample_thick:
                fac = fac * capture[..., None, None, None]
            if m.oversample_polar:
                fac = fac * polar[..., None, None]
            if m.oversample_omega:
                fac = fac * omega[..., None, None, None]
            fac = torch.where(live, fac, torch.ones_like(fac)).reshape(P, -1)
            # running-sum compounding: I = I_bg·Πf + Σ_k t_k Π_{j>=k} f_j
            suffix = torch.flip(torch.cumprod(torch.flip(fac, [1]), 1), [1])
            I = m.I_bg * suffix[:, 0] + ((term * w).reshape(P, -1) * suffix).sum(1)
        val = m.r_e_sqr * m.fluence * I / m.steps
        if not m.oversample_thick:
            val = val * capture[:, -1, 0]
        if not m.oversample_polar:
            if executed is None:
                val = val * polar[:, 0, 0, 0]
            else:
                val = val * _first_along(executed, polar, 3, 1.0 if m.nopolar else 0.0)
        if not m.oversample_omega:
            val = val * omega[:, 0, 0]
    else:
        fac = capture[..., None] * polar * omega[..., None]        # (P, T, O, S)
        I = (term.sum(dim=(4, 5)) * fac * m.source_weight).sum(dim=(1, 2, 3))
        bg = m.bg_physical * (capture * polar.mean(-1) * omega).mean(dim=2).sum(1)
        val = m.r_e_sqr * m.fluence * (I / m.steps) + bg

    if trace is not None:
        trace.update(pos=pos, d=d, R=R, omega=omega, capture=capture, scat=scat, polar=polar,
                     hkl=hkl, hkl0=hkl0, F_latt=F_latt, F_cell=F_cell, I=I, val=val,
                     executed=executed, live=live)
    return val, new_state


def default_chunk_pixels(m: Model, budget_bytes: float) -> int:
    """Pixels per chunk so that the kernel's working set stays within ``budget_bytes``."""
    itemsize = torch.finfo(m.dtype).bits // 8
    per_elem = 24 + (80 if (m.table is not None and m.interpolate) else 0)   # live tensors per sample
    per_pixel = max(1, m.per_pixel_elements()) * per_elem * itemsize
    return int(max(1, min(m.fpixels * m.spixels, budget_bytes // per_pixel)))


def simulate_image(m: Model, *, chunk_pixels: Optional[int] = None, budget_bytes: float = 1.0e9,
                   progress=None) -> torch.Tensor:
    """The float image (spixels, fpixels) in the model's dtype; 0 outside the ROI/mask."""
    dev = m.device
    npix = m.fpixels * m.spixels
    if m.mask is not None:
        idx_all = torch.nonzero(m.mask.reshape(-1), as_tuple=False).reshape(-1).to(dev)
    else:
        idx_all = torch.arange(npix, device=dev)
    chunk = chunk_pixels or default_chunk_pixels(m, budget_bytes)
    out = torch.zeros(npix, dtype=m.dtype, device=dev)
    interp_on = torch.tensor(bool(m.interpolate), device=dev)
    first = m.first_iteration
    n = idx_all.shape[0]
    for start in range(0, n, chunk):
        idx = idx_all[start:start + chunk]
        first_local = None
        if first is not None and start <= first[0] < start + chunk:
            first_local = (first[0] - start,) + tuple(first[1:])
        val, interp_on = render(m, idx, interp_on, first_local=first_local)
        out = out.index_put((idx,), val)
        if progress is not None:
            progress(min(start + chunk, n), n)
    return out.reshape(m.spixels, m.fpixels)
