"""The batched simulation kernel: stages, accumulation policies, three evaluation strategies.

``Model`` holds every prepared tensor of an experiment. A pixel value is the composition of stages,
each a small pure function whose formula lives in ``nbsim.physics`` and nowhere else: sample
positions (``sample_positions``: ``subpixel_offsets``, ``flat_positions``; curved detector in
``_positions``) → ``airpath`` (direction, distance) → ``scattering_vector`` → ``dmin_executed`` →
``miller_index`` / ``nearest_index`` → lattice factor (``lattice_axis_factors``, ``sincg``,
``lattice_factor``) → structure factor (``nearest_F`` on ``HKLTable.bordered()``, or tricubic) →
``bragg_term`` → factors (``_factors``: ``capture_fraction``, ``polarization_factor``,
``solid_angle``) → accumulation (``accumulate``, ``finish_outer``, ``finish_inner``,
``photon_scale``).

C's loop-order quirks are accumulation policies on the stage outputs (``factor_layout``): solid
angle and polarization of the first sub-pixel / first executed source, capture of the last layer
(first_subpixel_factors, last_layer_capture); ``-oversample_*`` compounding as a reverse cumulative
product (oversample_compounding); the φ = 0 carry-over (phi0_carryover) as the very first loop
iteration's own lattice; the global switch-off of tricubic interpolation at the first out-of-range
lookup (tricubic_global_off) as a tensor state carried across chunks.

Strategies differ only in how they evaluate the stages, never in what: ``render`` (reference: one
broadcast over pixels × layers T × sub-pixels O × sources S × φ steps F × domains M, every quirk,
derivatives; ``nbsim.trace`` observes its stage outputs), ``render_fast`` (cache-sized blocks,
bit for bit equal to ``render`` in float64 where it applies) and ``render_compiled`` (the stages
fused by torch.compile, pixels last). One chunk driver (``Chunks``) serves all of them. Square
roots are the correctly rounded ones and Miller indices a fixed arithmetic (``miller_mode``), so an
image never depends on how its pixels were chunked. Below float64, sincg uses the reduced index
(``sincg_reduced``).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint

from nbsim import libm
from nbsim.params import value
from nbsim.physics import (BorderedTable, HKLTable, airpath, bragg_term, capture_fraction,
                           dmin_executed, flat_positions, full_like, lattice_axis_factors,
                           lattice_factor, miller_index, nearest_F, nearest_index, photon_scale,
                           polarization_factor, product, scattering_vector, sincg_from_sines,
                           solid_angle, subpixel_offsets)
from nbsim.quirks import QuirkSet
from nbsim.rotation import rotate_axis


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
    thickstep_m: "float | torch.Tensor"   # numbers, or 0-d tensors on a derivative's path
    thick_m: "float | torch.Tensor"
    mu_per_m: "float | torch.Tensor"
    incident: torch.Tensor        # (S, 3) unit vectors along the incident beam
    wavelength_m: torch.Tensor    # (S,)
    source_weight: torch.Tensor   # (S,)
    lattice: torch.Tensor         # (F, M, 3, 3): rows a, b, c (m) for each φ step and mosaic domain
    lattice_first: Optional[torch.Tensor]  # (F, M, 3, 3) for the run's first loop iteration (quirk 4)
    first_iteration: Optional[tuple]       # (flat pixel index, T, O, S) of that iteration
    recip: tuple                  # setup a*, b*, c* (Å⁻¹)
    N: tuple                      # (Na, Nb, Nc) numbers (0-d tensors on a derivative's path)
    shape: str
    fudge: float
    table: Optional[HKLTable]
    default_F: "float | torch.Tensor"
    interpolate: bool
    kahn: "float | torch.Tensor"
    polar_vector: torch.Tensor
    nopolar: bool
    dmin_m: float
    I_bg: "float | torch.Tensor"  # background added to every pixel's sum (C units)
    fluence: "float | torch.Tensor"
    r_e_sqr: float
    steps: int
    oversample_thick: bool
    oversample_polar: bool
    oversample_omega: bool
    quirks: QuirkSet              # effective set of fixed quirks
    mask: Optional[torch.Tensor] = None   # (spixels, fpixels) bool: pixels to simulate
    bg_physical: "float | torch.Tensor" = 0.0   # water background per pixel when water_fluence_squared is fixed
    differentiable: bool = False  # some field is a tensor on a derivative's path (nbsim.params)
    report: object = None         # nbsim.report.SetupReport: what the setup resolved (frozen)

    @property
    def dtype(self):
        return self.fdet.dtype

    @property
    def device(self):
        return self.fdet.device

    def astype(self, dtype) -> "Model":
        """A copy whose floating-point tensors (and structure-factor table) have ``dtype``.

        Lower precisions are best built this way, from a float64 setup: the setup's derived
        quantities (auto-selected oversampling, beam centre, pixel origin) then come out exactly
        as in float64 and only the per-pixel arithmetic runs in ``dtype``."""
        import copy
        import dataclasses

        def conv(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.to(dtype)
            if isinstance(v, tuple):
                return tuple(conv(x) for x in v)
            return v
        kw = {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.table is not None:
            t = copy.copy(self.table)
            t.table = self.table.table.to(dtype)
            t.flat = t.table.reshape(-1)
            kw["table"] = t
        return Model(**kw)

    def per_pixel_elements(self) -> int:
        """Number of samples per pixel (T·O·S·F·M)."""
        return (self.thicksteps * self.oversample ** 2 * self.incident.shape[0]
                * self.lattice.shape[0] * self.lattice.shape[1])


# ---------------------------------------------------------------------------------------------
# stages: what every strategy evaluates. The formulas live in nbsim.physics (positions, airpath,
# scattering vector, Miller index, lattice factor, structure-factor lookup, polarization, solid
# angle, capture fraction, scaling); the functions here arrange them for a Model.
# ---------------------------------------------------------------------------------------------

def _row_col(idx: torch.Tensor, fpixels: int, dtype):
    """Slow and fast pixel coordinates (row, column) of flat raster indices ``idx``, in ``dtype``.
    Computed in float64 (exact for any detector size): unlike int64 division it vectorises, also
    inside the compiled kernels."""
    i = idx.to(torch.float64)
    s = torch.floor(i / fpixels)
    return s.to(dtype), (i - s * fpixels).to(dtype)


def sample_positions(idx, fpixels: int, oversample: int, thicksteps: int, pixel_m, thickstep_m,
                     fdet, sdet, odet, pix0, pixels_last: bool = False, first: bool = False):
    """[x, y, z] lab-frame positions (m) of the flat detector's samples for flat raster pixel
    indices ``idx`` (P,): each (P, T, O), or (T, O, P) with ``pixels_last``. Sub-pixels in C's
    loop order (slow outer, fast inner), layers at Odet = t·thickstep_m; vectors (3,).
    ``first``: only the first layer and sub-pixel (T = O = 1), the same numbers."""
    dt, dev = fdet.dtype, fdet.device
    s, f = _row_col(idx, fpixels, dt)
    n = 1 if first else oversample
    thicksteps = 1 if first else thicksteps
    sub = torch.arange(n, dtype=dt, device=dev)
    subS, subF = sub.repeat_interleave(n), sub.repeat(n)
    Odet = torch.arange(thicksteps, dtype=dt, device=dev) * thickstep_m
    if pixels_last:
        Fd, Sd = subpixel_offsets(s, f, subS[:, None], subF[:, None], oversample, pixel_m)  # (O, P)
        return flat_positions(Fd[None], Sd[None], Odet[:, None, None], fdet, sdet, odet, pix0)
    Fd, Sd = subpixel_offsets(s[:, None], f[:, None], subS, subF, oversample, pixel_m)      # (P, O)
    return flat_positions(Fd[:, None], Sd[:, None], Odet[None, :, None], fdet, sdet, odet, pix0)


def _positions(m: Model, idx: torch.Tensor, first: bool = False):
    """[x, y, z] (P, T, O) sample positions (m) of flat pixel indices ``idx`` (P,), flat or curved
    detector (the curved one rotates the beam-axis point by the in-plane offsets / distance);
    ``first``: the first layer and sub-pixel only (T = O = 1)."""
    p = sample_positions(idx, m.fpixels, m.oversample, m.thicksteps, m.pixel_m, m.thickstep_m,
                         m.fdet, m.sdet, m.odet, m.pix0, first=first)
    if not m.curved:
        return p
    pos = torch.stack(p, -1)
    vec = (m.distance_m * m.beam).expand_as(pos)
    vec = rotate_axis(vec, m.sdet.expand_as(pos), pos[..., 1] / m.distance_m)
    return list(rotate_axis(vec, m.fdet.expand_as(pos), pos[..., 2] / m.distance_m).unbind(-1))


def _scattering(m: Model, d, out=None):
    """[Sx, Sy, Sz] (P, T, O, S) (m⁻¹) for diffracted directions ``d`` (3 × (P, T, O))."""
    return scattering_vector([c[..., None] for c in d], m.incident.unbind(-1), m.wavelength_m,
                             out=out)


def _first_along(mask: torch.Tensor, values: torch.Tensor, dims: int, fill: float):
    """Value at the first True of ``mask`` over its last ``dims`` dims (C loop order), else ``fill``."""
    flat_m = mask.flatten(-dims)
    flat_v = values.flatten(-dims)
    first = torch.argmax(flat_m.to(torch.int8), dim=-1, keepdim=True)
    v = torch.gather(flat_v, -1, first).squeeze(-1)
    return torch.where(flat_m.any(-1), v, torch.full_like(v, fill))


def sqrt_exact(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root, as C's ``sqrt`` (``nbsim.libm.sqrt``). ATen's CPU ``torch.sqrt``
    is one ulp off for about 1 % of inputs; near a Bragg peak that last bit of a distance reaches the
    Miller index, and sin(N·π·h)/sin(π·h) turns it into a ~1e-10 relative change of the pixel.
    (Inside the compiled kernels Inductor's sqrt is the IEEE one.)"""
    return libm.sqrt(x)


_BLAS_MIN_FM = 8                 # φ steps × mosaic domains from which Miller indices use BLAS
_BLAS_ROWS = 4096                # fixed matmul shape of the reference kernel


def miller_mode(m: Model) -> str:
    """How Miller indices are computed for this experiment (every kernel uses the same):

    ``"c"``: a_x·S_x + a_y·S_y + a_z·S_z, C's order without fused multiply-add
    (``physics.miller_index``): the C program's indices to the last bit;
    ``"blas"``: one (n, 3) × (3, F·M·3) product, which BLAS evaluates as
    fma(a_z, S_z, fma(a_y, S_y, a_x·S_x)) — within an ulp of C's, and cheaper when many φ steps ×
    mosaic domains share each scattering vector. Below float64 only: which kernel BLAS picks (and
    so the last bit) depends on the matrix shape and the processor (measured: the blocked and the
    reference kernels disagreed in the last bit on an AMD EPYC, not on an Intel Xeon), and float64
    promises the same image from every strategy and C's indices to the last bit.
    """
    if m.dtype == torch.float64:
        return "c"
    return "blas" if _phi_domains(m) >= _BLAS_MIN_FM else "c"


def rows_matmul(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """``a @ b`` for ``a`` (n, 3), evaluated in matmuls of exactly ``rows`` rows (the last padded).

    BLAS picks its kernel, and with it the rounding of the 3-term dot products, from the matrix
    shape (a few rows take another path), so a fixed shape is what makes each Miller index
    independent of how the pixels were chunked.
    """
    n = a.shape[0]
    out = []
    for i in range(0, max(n, 1), rows):
        piece = a[i:i + rows]
        k = piece.shape[0]
        if k < rows:
            piece = torch.cat((piece, piece.new_zeros(rows - k, a.shape[1])))
        out.append((piece @ b)[:k])
    return out[0] if len(out) == 1 else torch.cat(out)


def miller(scat: torch.Tensor, lattice: torch.Tensor, mode: str = "c") -> torch.Tensor:
    """h, k, l = a·S, b·S, c·S for scattering vectors (..., 3) and lattices (F, M, 3, 3) (rows a, b,
    c): (..., F, M, 3), evaluated as ``mode`` says (see ``miller_mode``); either way each index
    does not depend on how pixels are batched."""
    if mode == "blas":
        Fn, Mn = lattice.shape[:2]
        flat = rows_matmul(scat.reshape(-1, 3), lattice.reshape(-1, 3).T, _BLAS_ROWS)
        return flat.view(*scat.shape[:-1], Fn, Mn, 3)
    sx, sy, sz = (scat[..., c, None, None, None] for c in range(3))
    return miller_index(sx, sy, sz, lattice.unbind(-1))


def reduced_sincg(m: Model) -> bool:
    """Below float64, sin(N·π·h)/sin(π·h) loses all its digits near a Bragg peak far from the origin
    (π·h carries an absolute error of an ulp of π·h, comparable to sin(π·h) itself), so the lower
    precisions evaluate it from the reduced index h − h0 (``physics.sincg_reduced``). float64 keeps
    C's expression, bit for bit."""
    return m.dtype != torch.float64


def _polar_exact(m: Model, incident: torch.Tensor, diffracted: torch.Tensor) -> torch.Tensor:
    """``polarization_factor`` for (..., 3) vectors, computed so that every element takes ATen's
    vectorised atan2 path: scalar-tail elements (std::atan2) can differ in the last bit, which would
    make a pixel's value depend on where it falls in its chunk. Pads to whole vectors and evaluates
    in pieces below ATen's parallel grain size."""
    shape = diffracted.shape[:-1]
    inc = incident.expand_as(diffracted).reshape(-1, 3)
    dif = diffracted.reshape(-1, 3)
    n = dif.shape[0]
    if not (isinstance(m.kahn, (int, float)) and m.kahn == 0):
        padded = -(-n // 64) * 64
        if padded != n:
            inc = torch.cat((inc, inc[:1].expand(padded - n, 3)))
            dif = torch.cat((dif, dif[:1].expand(padded - n, 3)))
        piece = 16384
        out = torch.cat([polarization_factor(m.kahn, inc[i:i + piece], dif[i:i + piece], m.polar_vector)
                         for i in range(0, padded, piece)])[:n]
    else:
        out = polarization_factor(m.kahn, inc, dif, m.polar_vector)
    return out.reshape(shape)


def _factors(m: Model, d, R: torch.Tensor, *, capture: bool, polar: bool, omega: bool):
    """(capture fraction, polarization, solid angle) for diffracted directions ``d`` (3 × (P, T,
    O)) at airpaths ``R`` (P, T, O) (m): (P, T, O), (P, T, O, S), (P, T, O) where the flag is True
    (every layer, sub-pixel, source), else only the value C applies once per pixel (capture of
    the last layer, polarization and solid angle of the first sub-pixel and source), shaped
    (P, 1, 1) / (P, 1, 1, 1). C's -nopolar and a zero-thickness sensor give exact ones."""
    P, T, O = R.shape
    S = m.incident.shape[0]
    kw = dict(dtype=m.dtype, device=m.device)
    om = solid_angle(R if omega else R[:, :1, :1], m.pixel_m, m.close_distance_m, m.point_pixel)
    if value(m.thick_m) == 0.0 and not m.oversample_thick:
        cap = torch.ones((P, T, O) if capture else (P, 1, 1), **kw)
    else:
        layer = torch.arange(T, **kw)[None, :, None]
        dc = torch.stack(d if capture else [c[:, -1:, 0:1] for c in d], -1)
        cap = capture_fraction(dc, m.odet, layer if capture else layer[:, -1:], m.thickstep_m,
                               m.mu_per_m)
    Tp, Op, Sp = (T, O, S) if polar else (1, 1, 1)
    if _polar_off(m):
        pol = torch.ones(P, Tp, Op, Sp, **kw)
    else:
        dp = torch.stack([c[:, :Tp, :Op, None] for c in d], -1).expand(P, Tp, Op, Sp, 3)
        pol = _polar_exact(m, m.incident[:Sp], dp)
    return cap, pol, om


def _first_polar(m: Model, polar: torch.Tensor, executed: Optional[torch.Tensor]) -> torch.Tensor:
    """The polarization C applies once per pixel (P,): that of the first executed (layer,
    sub-pixel, source) (``polar`` (P, T, O, S)), or of the first one without a dmin cut."""
    if executed is None:
        return polar[:, 0, 0, 0]
    return _first_along(executed, polar, 3, 1.0 if m.nopolar else 0.0)


# ---------------------------------------------------------------------------------------------
# accumulation policies: how C's loop order folds the terms F_cell²·F_latt² into a pixel
# ---------------------------------------------------------------------------------------------

def factor_layout(m: Model):
    """Where capture fraction, polarization and solid angle enter a pixel, as (flags, inside, compounding).

    flags[k]: the ``-oversample_thick/_polar/_omega`` flag of factor k ("capture", "polar", "omega");
    inside[k]: k multiplies each contribution (per layer, sub-pixel, source) instead of the pixel's
    sum once (C: capture of the last layer, polarization and solid angle of the first sub-pixel,
    unless last_layer_capture / first_subpixel_factors is fixed); compounding: the flagged factors
    multiply the running sum (oversample_compounding not fixed)."""
    q = m.quirks
    flags = {"capture": m.oversample_thick, "polar": m.oversample_polar, "omega": m.oversample_omega}
    inside = {"capture": flags["capture"] or q.fixed("last_layer_capture"),
              "polar": flags["polar"] or q.fixed("first_subpixel_factors"),
              "omega": flags["omega"] or q.fixed("first_subpixel_factors")}
    return flags, inside, any(flags.values()) and not q.fixed("oversample_compounding")


def _polar_off(m: Model) -> bool:
    """-nopolar in effect (C recomputes polarization per sub-pixel under -oversample_polar anyway)."""
    return m.nopolar and not (m.oversample_polar and not m.quirks.fixed("nopolar_oversample_polar"))


def layout_kind(m: Model) -> str:
    """"outer": every factor once per pixel (C without -oversample_*), "inner": every factor per
    contribution, no compounding (all quirks fixed), "mixed": anything else (reference kernel only)."""
    flags, inside, comp = factor_layout(m)
    if not any(inside.values()) and value(m.bg_physical) == 0.0:
        return "outer"
    if (all(inside.values()) and not comp and value(m.I_bg) == 0.0
            and (_polar_off(m) or not m.nopolar)):
        return "inner"
    return "mixed"


def _times(val: torch.Tensor, factors) -> torch.Tensor:
    """``val`` multiplied by each of ``factors`` in turn (None: skipped)."""
    for f in factors:
        if f is not None:
            val = val * f
    return val


def finish_outer(I_sum, I_bg, r_e_sqr, fluence, steps, factors):
    """Pixel values (P,) of the "outer" layout: C's scaling of I_bg + Σ terms (``I_sum`` (P,)),
    times the once-per-pixel (capture, polarization, solid angle) ``factors`` (each (P,) or None)."""
    return _times(photon_scale(I_bg + I_sum, r_e_sqr, fluence, steps), factors)


def _water(m: Model, capture, polar, omega, inside) -> torch.Tensor:
    """The physical water background (P,) (water_fluence_squared fixed): the per-contribution
    factors averaged over sub-pixels and sources, summed over layers."""
    one = torch.ones_like(omega)
    f = ((capture if inside["capture"] else one) * (polar.mean(-1) if inside["polar"] else one)
         * (omega if inside["omega"] else one))
    return m.bg_physical * f.mean(dim=2).sum(1)


def finish_inner(m: Model, I_tos: torch.Tensor, capture, polar, omega):
    """(pixel values (P,), weighted sums (P,)) of the "inner" layout from the φ·domain sums
    ``I_tos`` (P, T, O, S): every factor multiplies its own contribution."""
    fac = capture[..., None] * polar * omega[..., None]
    I = (I_tos * fac * m.source_weight).sum(dim=(1, 2, 3))
    inside = dict.fromkeys(("capture", "polar", "omega"), True)
    return photon_scale(I, m.r_e_sqr, m.fluence, m.steps) + _water(m, capture, polar, omega, inside), I


def accumulate(m: Model, term, capture, polar, omega, executed, live):
    """(pixel values (P,), I before scaling (P,)) from the terms (P, T, O, S, F, M) and the factors
    of ``_factors``, as C's loop order does it (``factor_layout``): flagged factors multiply the
    running sum (compounding, as a reverse cumulative product over the executed iterations) or
    each contribution; the others multiply the pixel's sum once."""
    P = term.shape[0]
    if layout_kind(m) == "inner":
        return finish_inner(m, term.sum(dim=(4, 5)), capture, polar, omega)
    flags, inside, comp = factor_layout(m)
    t, compound = term * m.source_weight[:, None, None], []
    for k, f in (("capture", capture[..., None, None, None]), ("polar", polar[..., None, None]),
                 ("omega", omega[..., None, None, None])):
        if inside[k]:
            if comp and flags[k]:
                compound.append(f)
            else:
                t = t * f
    if not compound:
        I = m.I_bg + t.sum(dim=(1, 2, 3, 4, 5))
    else:
        fac = torch.ones_like(term)
        for f in compound:
            fac = fac * f
        fac = torch.where(live, fac, torch.ones_like(fac)).reshape(P, -1)
        # running-sum compounding: I = I_bg·Πf + Σ_k t_k Π_{j>=k} f_j
        suffix = torch.flip(torch.cumprod(torch.flip(fac, [1]), 1), [1])
        I = m.I_bg * suffix[:, 0] + (t.reshape(P, -1) * suffix).sum(1)
    val = photon_scale(I, m.r_e_sqr, m.fluence, m.steps)
    if value(m.bg_physical) != 0.0:
        val = val + _water(m, capture, polar, omega, inside)
    once = (None if inside["capture"] else capture[:, -1, 0],
            None if inside["polar"] else _first_polar(m, polar, executed),
            None if inside["omega"] else omega[:, 0, 0])
    return _times(val, once), I


# ---------------------------------------------------------------------------------------------
# reference strategy: one broadcast over (P, T, O, S, F, M), every quirk, derivatives
# ---------------------------------------------------------------------------------------------

def render(m: Model, idx: torch.Tensor, interp_on: torch.Tensor, *, first_local=None, trace=None):
    """Pixel values (P,) for flat indices ``idx`` (P,) in raster order, and the new interpolation state.

    interp_on: 0-d bool tensor, C's global ``interpolate`` flag before this chunk.
    first_local: (p, t, o, s) local index of the run's first loop iteration (quirk 4), or None.
    trace: optional dict that receives the stage outputs (for per-pixel traces).
    """
    p = _positions(m, idx)                                     # 3 × (P, T, O), m
    d, R = airpath(p, sqrt_exact)
    scat = torch.stack(_scattering(m, d), -1)                  # (P, T, O, S, 3), m⁻¹
    executed = dmin_executed(scat, m.dmin_m, sqrt_exact) if m.dmin_m > 0 else None   # (P,T,O,S)
    # C applies the solid angle and polarization of the first sub-pixel and the capture fraction of
    # the last layer once per pixel (first_subpixel_factors, last_layer_capture): only those values
    # are computed unless a factor enters each contribution, the water background needs them all,
    # or the pixel is traced
    flags, inside, comp = factor_layout(m)
    full = trace is not None or layout_kind(m) == "inner" or value(m.bg_physical) != 0.0
    capture, polar, omega = _factors(m, d, R, capture=full or inside["capture"],
                                     polar=full or inside["polar"] or executed is not None,
                                     omega=full or inside["omega"])

    # Miller indices for every φ step and mosaic domain: h = a·S
    mode = miller_mode(m)
    hkl = miller(scat, m.lattice, mode)                         # (P, T, O, S, F, M, 3)
    if first_local is not None and m.lattice_first is not None:
        pl, t, o, s = first_local
        hkl = hkl.clone()
        hkl[pl, t, o, s] = miller(scat[pl, t, o, s], m.lattice_first, mode)
    hkl0 = nearest_index(hkl)
    F_axes = None
    if m.shape == "square":
        F_axes = lattice_axis_factors(hkl.unbind(-1), hkl0.unbind(-1), m.N, reduced_sincg(m))
        F_latt = product(F_axes, like=hkl[..., 0])             # (P, T, O, S, F, M)
    else:
        F_latt = lattice_factor(hkl, hkl0, m.shape, m.N, m.fudge, m.recip)

    # which loop iterations actually run (dmin skip; C also skips F_latt == 0 without water).
    # Needed where a skipped iteration would change the sum: dmin, interpolation state, the
    # compounding running product; otherwise a skipped term (F_latt == 0) is 0 anyway
    need_live = (executed is not None or (m.table is not None and m.interpolate)
                 or any(flags.values()) or trace is not None)
    live = None
    if need_live:
        live = torch.ones_like(F_latt, dtype=torch.bool)
        if executed is not None:
            live = live & executed[..., None, None]
        if value(m.I_bg) == 0.0 and value(m.bg_physical) == 0.0:
            live = live & (F_latt != 0)

    new_state = interp_on
    if m.table is None:
        F_cell = full_like(F_latt, m.default_F)
    elif m.interpolate:
        oor = m.table.interp_out_of_range(hkl) & live
        F_near = m.table.nearest(hkl0)
        F_int = m.table.tricubic(hkl)
        if not m.quirks.fixed("tricubic_global_off"):
            # the first out-of-range lookup switches interpolation off for the rest of the run
            seen = torch.cumsum(oor.reshape(-1).to(torch.int32), 0).reshape(oor.shape) > 0
            use_int = interp_on & ~seen
            new_state = interp_on & ~oor.any()
        else:
            use_int = ~oor
        F_cell = torch.where(use_int, F_int, F_near)
    else:
        F_cell = m.table.nearest(hkl0)

    term = bragg_term(F_latt, F_cell)                           # (P, T, O, S, F, M)
    if live is not None:
        term = torch.where(live, term, torch.zeros_like(term))
    val, I = accumulate(m, term, capture, polar, omega, executed, live)
    if trace is not None:
        trace.update(pos=torch.stack(p, -1), d=torch.stack(d, -1), R=R, omega=omega,
                     capture=capture, scat=scat, polar=polar, hkl=hkl, hkl0=hkl0, F_axes=F_axes,
                     F_latt=F_latt, F_cell=F_cell, I=I, val=val, executed=executed, live=live)
    return val, new_state


# ---------------------------------------------------------------------------------------------
# fast path: the same numbers as ``render`` (bit for bit in float64), organised for throughput
# ---------------------------------------------------------------------------------------------
#
# ``render_fast`` runs the stages of ``render`` (the same functions, so the same IEEE operations in
# the same order) wherever ``fast_path_ok`` holds (the "outer" and "inner" ``layout_kind``s, without
# tricubic interpolation, which keeps C's loop-order state). What differs is only how:
# * the per-sample work (Miller index, lattice factor, F lookup, Bragg term) runs on blocks of whole
#   pixels sized to the CPU cache, in per-thread scratch buffers that are reused (no allocation, no
#   page faults), each stage written into its buffer (the stage functions' ``out=`` forms, sines
#   and products in place); axes with N == 1 (factor exactly 1) are skipped;
# * the per-pixel factors (solid angle, polarization, capture) are computed only where C uses them;
# * ``torch.where(live, ...)`` is dropped: it only zeroes terms whose F_latt is 0, which are 0
#   already, and sincg's 0/0 (NaN in place) is patched only in blocks whose sums came out NaN.
# Each pixel's sum is one contiguous inner reduction in C loop order, so images do not depend on
# how the pixels are chunked.

_CACHE_BYTES = 16 << 20         # working set of one sample block (per worker thread)
_GEO_BYTES = 32 << 20           # geometry working set of one chunk of pixels (per worker thread)
_MAX_CHUNKS_PER_WORKER = 4      # at least this many chunks per worker when the image allows


def _requires_grad(m: Model) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(m).values())


def fast_path_ok(m: Model) -> bool:
    """True when ``render_fast`` reproduces ``render`` (no loop-order state, no autograd)."""
    if m.differentiable:
        return False
    if layout_kind(m) == "mixed":
        return False
    if m.table is not None and m.interpolate:
        return False
    return not _requires_grad(m)


class FastPlan:
    """Per-image constants of ``render_fast`` (built once, outside the chunk loop)."""

    def __init__(self, m: Model, block_pixels: Optional[int] = None):
        Fn, Mn = m.lattice.shape[:2]
        self.FM = Fn * Mn
        self.outer = layout_kind(m) == "outer"    # else "inner" (see fast_path_ok)
        self.S = m.incident.shape[0]
        self.axes = [i for i in range(3) if m.N[i] > 1] if m.shape == "square" else []
        need_all = m.table is not None or m.shape != "square"
        self.rows = [0, 1, 2] if need_all else list(self.axes)
        R = len(self.rows)
        self.mode = miller_mode(m)
        self.reduced = reduced_sincg(m)
        # "c": lattice row self.rows[r] (a, b or c), component c, over (f, m): (F·M,) vectors
        self.Lc = [[m.lattice[:, :, i, c].reshape(self.FM).contiguous() for c in range(3)]
                   for i in self.rows]
        # "blas": (3 coords, rows·F·M): column r·FM + f·M + m holds lattice row self.rows[r]
        self.lat_t = (m.lattice[:, :, self.rows, :].permute(2, 0, 1, 3).reshape(R * self.FM, 3).T
                      .contiguous() if R else None)
        self.axes_in_rows = [self.rows.index(i) for i in self.axes]
        self._local = threading.local()
        self.Nvals = [float(m.N[i]) for i in self.axes]
        self.Nv = torch.tensor(self.Nvals, dtype=m.dtype, device=m.device)[:, None]
        self.same_N = len(set(self.Nvals)) <= 1
        self.w_one = bool((m.source_weight == 1).all())
        self.FF = float(m.default_F) * float(m.default_F)
        self.table = m.table.bordered() if m.table is not None else None   # see nearest_F
        itemsize = torch.finfo(m.dtype).bits // 8
        per_sample = (2 * R + 4 + (12 if m.table is not None else 0)) * itemsize
        samples = max(1, m.thicksteps * m.oversample ** 2 * self.S * self.FM)
        self.block_pixels = block_pixels or max(1, _CACHE_BYTES // (samples * per_sample))
        rows_per_pixel = m.thicksteps * m.oversample ** 2 * self.S
        self.block_rows = max(64, self.block_pixels * rows_per_pixel)
        self.geo_bytes_per_pixel = m.thicksteps * m.oversample ** 2 * (16 + 12 * self.S) * itemsize

    def workspace(self, m: Model) -> "_Workspace":
        """This thread's scratch buffers (created on first use)."""
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = _Workspace(m, self)
        return ws


class _Workspace:
    """Scratch buffers of one sample block, reused block after block (one set per thread): no
    allocation, no page faults, and the same cache lines every time. Flat storage: a block of n
    rows uses the contiguous prefix of each buffer."""

    def __init__(self, m: Model, plan: "FastPlan"):
        kw = dict(dtype=m.dtype, device=m.device)
        rows, FM = plan.block_rows, plan.FM
        R, A = max(1, len(plan.rows)), max(1, len(plan.axes))
        self.sc = torch.zeros(rows, 3, **kw) if plan.mode == "blas" else None
        self.hkl = torch.empty(rows * R * FM, **kw)
        self.x = torch.empty(rows * A * FM, **kw)
        self.g = torch.empty(rows * A * FM, **kw)
        self.h0 = (torch.empty(rows * R * FM, **kw)
                   if (m.table is not None or plan.reduced) else None)
        self.f = torch.empty(rows * FM, **kw)
        self.t = torch.empty(rows * FM, **kw)


def _block_sums(m: Model, plan: "FastPlan", sc: torch.Tensor, ex: Optional[torch.Tensor],
                npx: int) -> torch.Tensor:
    """Σ over φ·domains (and, for the "outer" layout, over layers·sub-pixels·sources) of
    F_cell²·F_latt² for the scattering vectors ``sc`` (n, 3) of ``npx`` whole pixels, rows in C loop
    order. Returns (npx,) for the "outer" layout, (n,) per-row sums for "inner".

    Miller indices are laid out (n, R, FM) in "blas" mode (the matmul's output) and (R, n, FM) in
    "c" mode; every per-sample operation runs on whole contiguous buffers, only the product over
    axes picks them apart."""
    n = sc.shape[0]
    FM = plan.FM
    W = plan.workspace(m)
    R, A = len(plan.rows), len(plan.axes)
    blas = plan.mode == "blas"

    def buf(storage, k):                       # contiguous (n, k, FM) or (k, n, FM) view
        v = storage[:n * k * FM]
        return v.view(n, k, FM) if blas else v.view(k, n, FM)

    def axis(t, j):
        return t[:, j] if blas else t[j]

    hkl0 = F_cell = None
    if R:
        hkl = buf(W.hkl, R)
        if blas:
            W.sc[:n].copy_(sc)                 # fixed shape and alignment: see rows_matmul
            W.sc[n:].zero_()
            torch.mm(W.sc[:n] if n == plan.block_rows else W.sc, plan.lat_t,
                     out=W.hkl[:plan.block_rows * R * FM].view(plan.block_rows, R * FM))
        else:
            # C's order a_x·S_x + a_y·S_y + a_z·S_z (see ``miller``)
            tmp = W.t[:n * FM].view(n, FM)
            sx, sy, sz = sc[:, 0:1], sc[:, 1:2], sc[:, 2:3]
            for r in range(R):
                miller_index(sx, sy, sz, plan.Lc[r], out=hkl[r], tmp=tmp)
    reduced = m.shape == "square" and plan.reduced
    if m.table is not None or m.shape != "square":
        hkl0 = nearest_index(hkl, out=buf(W.h0, R) if W.h0 is not None else None)
    elif reduced:                  # any nearby whole number serves the reduced sincg: one pass
        hkl0 = torch.round(hkl, out=buf(W.h0, R))
    if m.table is not None:
        F_cell = nearest_F(plan.table, *[axis(hkl0, i) for i in range(3)])    # (n, FM)
    G = None
    if m.shape != "square":
        perm = (0, 2, 1) if blas else (1, 2, 0)
        F = lattice_factor(hkl.permute(*perm), hkl0.permute(*perm), m.shape, m.N, m.fudge,
                           m.recip)
    elif A:
        if reduced:                                                           # see reduced_sincg
            hkl.sub_(hkl0)
        if A == R:
            X = hkl.mul_(math.pi)                                             # π·h, in place
        else:
            X = buf(W.x, A)
            for j, r in enumerate(plan.axes_in_rows):
                torch.mul(axis(hkl, r), math.pi, out=axis(X, j))
        if plan.same_N:
            Nb = plan.Nvals[0]
        else:
            Nb = plan.Nv.view(1, A, 1) if blas else plan.Nv.view(A, 1, 1)
        G = torch.mul(X, Nb, out=buf(W.g, A))
        sincg_from_sines(G.sin_(), X.sin_(), None, inplace=True)   # NaN exactly where π·h == 0
        # (reduced: the sign (−1)^((N−1)·h0) is left out — F_latt only enters squared, and
        # (−F·F²_cell)·(−F) is (F·F²_cell)·F to the last bit)
        if m.device.type != "cpu" or reduced:   # (reduced: whole h are common in float32)
            _fix_sincg_zero(plan, G, axis)
    else:
        F = torch.ones(n, FM, dtype=m.dtype, device=m.device)

    def finish():
        if G is not None:
            F = axis(G, 0)
            if A > 1:
                F = torch.mul(axis(G, 0), axis(G, 1), out=W.f[:n * FM].view(n, FM))
                for j in range(2, A):
                    F.mul_(axis(G, j))
        else:
            F = F_nonsq
        term = bragg_term(F, F_cell, plan.FF, out=W.t[:n * FM].view(n, FM))
        if ex is not None:
            term.masked_fill_(~ex[:, None], 0.0)
        if plan.outer:
            if not plan.w_one:
                term.view(-1, plan.S, FM).mul_(m.source_weight[:, None])
            return term.view(npx, -1).sum(1)
        return term.sum(1)                    # "inner" weighs after the φ·domain sum

    F_nonsq = F if G is None else None
    out = finish()
    if G is not None and m.device.type == "cpu" and not reduced and bool(torch.isnan(out).any()):
        # a Miller index exactly 0 (sincg's x == 0 case) somewhere in this block: patch and redo.
        # Checking the block's sums instead of patching every sample saves a full pass; on the
        # CPU reading a flag is no device synchronisation.
        _fix_sincg_zero(plan, G, axis)
        out = finish()
    return out


def _fix_sincg_zero(plan: "FastPlan", G: torch.Tensor, axis):
    """sincg(0, N) = N: the 0/0 of sin(N·0)/sin(0) is the only NaN the ratio can hold."""
    if plan.same_N:
        G.nan_to_num_(nan=plan.Nvals[0])
    else:
        for j, nv in enumerate(plan.Nvals):
            axis(G, j).nan_to_num_(nan=nv)


def render_fast(m: Model, idx: torch.Tensor, plan: FastPlan, *, first_local=None) -> torch.Tensor:
    """Pixel values (P,) for flat indices ``idx``, identical to ``render`` where ``fast_path_ok``:
    the same stages, geometry on contiguous (P, T, O) components, the per-sample work in
    cache-sized blocks (``_block_sums``)."""
    P = idx.shape[0]
    T, O, S = m.thicksteps, m.oversample ** 2, plan.S
    d, R = airpath(_positions(m, idx), sqrt_exact)             # 3 × (P, T, O), (P, T, O)
    scat = torch.empty(P, T, O, S, 3, dtype=m.dtype, device=m.device)
    _scattering(m, d, out=scat.unbind(-1))                      # (P, T, O, S, 3), m⁻¹
    executed = dmin_executed(scat, m.dmin_m, sqrt_exact) if m.dmin_m > 0 else None
    rows = T * O * S
    scat = scat.reshape(P * rows, 3)
    ex = executed.reshape(P * rows) if executed is not None else None
    parts = []
    for b in range(0, P, plan.block_pixels):
        e = min(P, b + plan.block_pixels)
        parts.append(_block_sums(m, plan, scat[b * rows:e * rows],
                                 None if ex is None else ex[b * rows:e * rows], e - b))
    I = parts[0] if len(parts) == 1 else torch.cat(parts)
    full = not plan.outer
    capture, polar, omega = _factors(m, d, R, capture=full, polar=full or executed is not None,
                                     omega=full)
    if plan.outer:
        val = finish_outer(I, m.I_bg, m.r_e_sqr, m.fluence, m.steps,
                           (capture[:, -1, 0], _first_polar(m, polar, executed), omega[:, 0, 0]))
    else:
        val, _ = finish_inner(m, I.view(P, T, O, S), capture, polar, omega)
    return _with_first_iteration(m, idx, val, first_local)


def _with_first_iteration(m: Model, idx, val, first_local):
    """The run's very first loop iteration uses the unrotated crystal (quirk 4): that one pixel
    goes through the reference kernel."""
    if first_local is None or m.lattice_first is None:
        return val
    p = first_local[0]
    v1, _ = render(m, idx[p:p + 1], torch.tensor(False, device=m.device),
                   first_local=(0,) + tuple(first_local[1:]))
    return torch.cat((val[:p], v1, val[p + 1:]))


# ---------------------------------------------------------------------------------------------
# compiled path (device option ``compile``)
# ---------------------------------------------------------------------------------------------
#
# torch.compile (Inductor) fuses the stage functions (the very ones ``render`` calls) of a chunk of
# pixels into two kernels: ``_k_geometry`` (positions, scattering vectors 3 × (T, O, S, P) and the
# once-per-pixel factors) and ``_k_sum``, one loop nest in which, per pixel, the sum over layers ×
# sub-pixels × sources × φ × domains is a reduction whose every operand (Miller indices, both sines,
# sincg, F_cell, the Bragg term) is computed in registers, never stored. Inductor normally stores an
# intermediate that is read by many consumers or is costly to recompute; ``_FUSE_OPTIONS`` raise
# those thresholds for ``_k_sum`` so that nothing is (bench case 2, float64, 2 threads: 1.22 CPU-s
# against 2.67 for the eager kernel; the kernels that stored π·h and N·π·h took 4.5 s wall against
# 1.2). The split at the scattering vectors keeps Inductor's code generation small: one graph of
# both compiled in 60–220 s, the two in 10–45 s, and run as fast.
# Miller indices are C's a_x·S_x + a_y·S_y + a_z·S_z (Miller mode "c", the float64 eager kernel's
# own numbers); the sines are Inductor's (SLEEF, within an ulp), so compiled float64 equals eager to
# rounding (~1e-15 relative, tested to 1e-12). Layout is pixels-last (…, P), so the reduction
# vectorises across pixels, and Inductor's OpenMP threads share a chunk's pixels.
#
# Shapes and discrete choices are static (``CompiledPlan.cfg``); every continuous number (N of each
# sincg axis, default_F², background, r_e², fluence, steps, layer thickness, μ, Kahn factor) is a
# tensor input (``CompiledPlan.consts``), like the geometry, so a sweep over any of them reuses one
# compiled kernel. Chunks are padded to a fixed size: each shape compiles once per process, or once
# for all processes through ``nbsim.kernel_cache``.

_COMPILE_VEC = 16                # pad chunks to a multiple of this many pixels
_COMPILE_CHUNKS = 16             # chunks per image (progress, and OpenMP load balance)
_COMPILE_MAX_CHUNK = 1 << 16     # pixels per compiled chunk at most
_COMPILE_CHUNK_BYTES = 64 << 20  # CPU working set of one compiled chunk at most
# "cpp.dynamic_threads": the kernels take OpenMP's thread count when they run, not the count of the
# process that compiled them (a kernel from the cache in a one-thread sweep worker uses one thread)
_FUSE_OPTIONS = {"_k_geometry": {"cpp.dynamic_threads": True},
                 "_k_sum": {"cpp.dynamic_threads": True,
                            "assert_indirect_indexing": False,   # table indices are clamped in range
                            "realize_opcount_threshold": 100000,
                            "realize_reads_threshold": 1000,
                            "realize_acc_reads_threshold": 1000}}
_FUSE_OPTIONS.update(_k_geometry_stack=_FUSE_OPTIONS["_k_geometry"],
                     _k_sum_stack=_FUSE_OPTIONS["_k_sum"])
#: images per stacked kernel call (``simulate_images``; a shorter stack is padded, so each group
#: compiles one shape)
STACK_IMAGES = 8
#: the continuous numbers of the compiled kernels' ``consts`` after the N of each sincg axis
CONSTS = ("default_F_sqr", "I_bg", "r_e_sqr", "fluence", "steps", "thickstep_m", "mu_per_m", "kahn")
_compiled = {}


def compile_ok(m: Model) -> bool:
    """True when ``render_compiled`` supports the model (else the eager fast path runs)."""
    return (fast_path_ok(m) and layout_kind(m) == "outer" and m.dmin_m == 0 and m.shape == "square"
            and not m.curved and any(n > 1 for n in m.N))


def _phi_domains(m: Model) -> int:
    """φ steps × mosaic domains: the samples that share each scattering vector."""
    return m.lattice.shape[0] * m.lattice.shape[1]


# pixel·samples from which compiling within one process (about 35 s on the 2-core CPU this was
# measured on, Inductor's caches cold) is repaid by one image: the fused kernel saves about
# 40 ns·core per sample in float64 (bench case 2: 2.6 → 1.3 CPU-s for 2.9e7 samples). A kernel
# that ``nbsim.kernel_cache`` holds is used whatever the size.
_AUTO_COMPILE_SAMPLES = 2e9


def compile_pays_off(m: Model) -> bool:
    """Whether compiling is repaid within a single image (``device.compile: auto``). CPU only: the
    figure behind ``_AUTO_COMPILE_SAMPLES`` was measured there."""
    if not compile_ok(m) or m.device.type != "cpu":
        return False
    return m.fpixels * m.spixels * m.per_pixel_elements() >= _AUTO_COMPILE_SAMPLES


def _k_geometry(idx, fdet, sdet, odet, pix0, incident, wavelength, polar_vector, pixel, close,
                consts, cfg):
    """The first of the two compiled kernels, for the flat pixel indices ``idx`` (P,): scattering
    vectors 3 × (T, O, S, P) (m⁻¹) and the once-per-pixel (capture, polarization, solid angle)
    (P,) (None: exactly 1). Vectors (3,) and geometry in m, as in ``Model``; ``consts``: see
    ``CompiledPlan``."""
    fpix, os_, T, use_cap, nopolar, kahn0, point, axes, tab, reduced, w_one = cfg
    FF, I_bg, r_e_sqr, fluence, steps, thickstep, mu, kahn = consts[len(axes):].unbind()
    p = sample_positions(idx, fpix, os_, T, pixel, thickstep, fdet, sdet, odet, pix0,
                         pixels_last=True)                                # 3 × (T, O, P)
    d, R = airpath(p)                                                     # IEEE sqrt in Inductor
    sc = scattering_vector([c[:, :, None, :] for c in d], [incident[:, c, None] for c in range(3)],
                           wavelength[:, None])                           # 3 × (T, O, S, P)
    d00 = torch.stack([c[0, 0] for c in d], -1)                           # (P, 3)
    cap = (capture_fraction(torch.stack([c[-1, 0] for c in d], -1), odet,
                            torch.full((), float(T - 1), dtype=fdet.dtype, device=fdet.device),
                            thickstep, mu) if use_cap else None)
    pol = (None if nopolar else
           polarization_factor(0.0 if kahn0 else kahn, incident[0].expand_as(d00), d00,
                               polar_vector))
    return sc, cap, pol, solid_angle(R[0, 0], pixel, close, point)


def _k_sum(sc, lat, table_flat, w, consts, cap, pol, om, cfg):
    """The second compiled kernel: pixel values (P,) from the scattering vectors ``sc`` 3 ×
    (T, O, S, P) and the per-pixel factors of ``_k_geometry``, every per-sample stage (Miller
    indices, sincg, F_cell, Bragg term, the sum over (T, O, S, F, M)) in one loop nest. ``lat``
    (F, M, 3, 3) Å-scaled lattices; ``w`` (S,) source weights."""
    fpix, os_, T, use_cap, nopolar, kahn0, point, axes, tab, reduced, w_one = cfg
    Nv = consts[:len(axes)].unbind()
    FF, I_bg, r_e_sqr, fluence, steps, thickstep, mu, kahn = consts[len(axes):].unbind()
    sx, sy, sz = (c[:, :, :, None, None] for c in sc)                    # (T, O, S, 1, 1, P)
    L = lat[:, :, None]                                                   # (F, M, 1, 3, 3)
    hkl = [miller_index(sx, sy, sz, L[..., i, :].unbind(-1)) for i in range(3)]
    h0 = [nearest_index(h) for h in hkl] if (tab is not None or reduced) else None
    F_cell = nearest_F(BorderedTable(table_flat, *tab), *h0) if tab is not None else None
    # sincg of each axis; reduced: π·(h − h0) (its sign left out: F_latt only enters squared)
    X = [((hkl[i] - h0[i]) if reduced else hkl[i]) * math.pi for i in axes]
    F = product([sincg_from_sines(torch.sin(x * n), torch.sin(x), n) for x, n in zip(X, Nv)],
                like=X[0])
    term = bragg_term(F, F_cell, FF)
    if not w_one:
        term = term * w[:, None, None, None]
    return finish_outer(term.sum(dim=(0, 1, 2, 3, 4)), I_bg, r_e_sqr, fluence, steps,
                        (cap, pol, om))


def _k_geometry_stack(idx, fdet, sdet, odet, pix0, incident, wavelength, polar_vector, pixel, close,
                      consts, cfg):
    """``_k_geometry`` of B experiments at once (``torch.vmap``): every input but ``idx`` with a
    leading batch axis B; outputs likewise (B, ...)."""
    out = (0, 0 if cfg[3] else None, None if cfg[4] else 0, 0)        # capture, polarization: None
    return torch.vmap(lambda *a: _k_geometry(idx, *a, cfg), out_dims=out)(
        fdet, sdet, odet, pix0, incident, wavelength, polar_vector, pixel, close, consts)


def _k_sum_stack(sc, lat, table_flat, w, consts, cap, pol, om, cfg):
    """``_k_sum`` of B experiments at once (``torch.vmap``): (B, P) pixel values; the
    structure-factor table is shared."""
    dims = (0, 0, None, 0, 0) + tuple(None if x is None else 0 for x in (cap, pol, om))
    return torch.vmap(lambda *a: _k_sum(*a, cfg), in_dims=dims)(sc, lat, table_flat, w, consts,
                                                                  cap, pol, om)


def _compiled_fn(name: str):
    fn = _compiled.get(name)
    if fn is None:
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = _compiled[name] = torch.compile(globals()[name], dynamic=False,
                                             options=_FUSE_OPTIONS[name])
    return fn


def _consts(m: Model, plan: FastPlan) -> torch.Tensor:
    """The compiled kernels' continuous inputs (A + len(CONSTS),) in the model's dtype: the N of
    each sincg axis, then ``CONSTS``."""
    vals = [m.N[i] for i in plan.axes] + [plan.FF, m.I_bg, m.r_e_sqr, m.fluence, m.steps,
                                          m.thickstep_m, m.mu_per_m, m.kahn]
    return torch.stack([torch.as_tensor(v, dtype=m.dtype, device=m.device) for v in vals])


class CompiledPlan:
    """Fixed chunk size, static configuration and continuous inputs of ``render_compiled``."""

    def __init__(self, m: Model, fast: FastPlan, budget_bytes: float, chunk_pixels=None):
        itemsize = torch.finfo(m.dtype).bits // 8
        npix = m.fpixels * m.spixels if m.mask is None else max(1, int(m.mask.sum()))
        # a chunk stores the scattering vectors of its samples before φ and domains (3 × T·O·S per
        # pixel, between the two kernels) and a few numbers per pixel; nothing per φ or domain
        per_pixel = (3 * m.thicksteps * m.oversample ** 2 * m.incident.shape[0] + 16) * itemsize
        asked = chunk_pixels is not None          # an explicit chunk size is taken as given
        if chunk_pixels is None:
            cap = min(budget_bytes, _COMPILE_CHUNK_BYTES) if m.device.type == "cpu" else budget_bytes
            chunk_pixels = max(1, min(_COMPILE_MAX_CHUNK, -(-npix // _COMPILE_CHUNKS),
                                      int(cap // per_pixel)))
        chunk = min(chunk_pixels, npix)
        self.chunk = -(-chunk // _COMPILE_VEC) * _COMPILE_VEC
        self.fits = self.chunk * per_pixel <= budget_bytes or asked
        use_cap = not (m.thick_m == 0.0 and not m.oversample_thick)
        tab = (fast.table.lo, fast.table.hi, fast.table.kl) if m.table is not None else None
        self.table_flat = (fast.table.flat if m.table is not None
                           else torch.zeros(1, dtype=m.dtype, device=m.device))
        kahn0 = isinstance(m.kahn, (int, float)) and m.kahn == 0     # polarization_factor's branch
        self.cfg = (m.fpixels, m.oversample, m.thicksteps, use_cap, bool(m.nopolar), kahn0,
                    bool(m.point_pixel), tuple(fast.axes), tab, fast.reduced, fast.w_one)
        self.consts = _consts(m, fast)
        self.aot = None                    # the kernel from nbsim.kernel_cache, when used


#: the Model fields ``_k_geometry`` takes, in its order (between the pixel indices and ``consts``);
#: a stack of models stacks each of them along a leading batch axis
_STACKED = ("fdet", "sdet", "odet", "pix0", "incident", "wavelength_m", "polar_vector", "pixel_m",
            "close_distance_m")


def _geometry_inputs(m: Model, idx: torch.Tensor, plan: CompiledPlan) -> tuple:
    return (idx, *(getattr(m, k) for k in _STACKED), plan.consts)


def _aot_kernels(names, cfg, key_in, geo_in, sum_mid, *, build: bool):
    """The AOT-compiled pair ``names`` = (geometry kernel, sum kernel) of ``nbsim.kernel_cache`` for
    inputs shaped like ``key_in``, or None where the cache lacks one (``build``: compile the missing
    ones into it first; the sum kernel's example inputs are the geometry kernel's outputs on
    ``geo_in`` around ``sum_mid``, its inputs between the scattering vectors and the factors)."""
    from nbsim import kernel_cache
    if kernel_cache.disabled():
        return None
    kernels = [kernel_cache.load(name, cfg, key_in) for name in names]
    if None in kernels and build:
        fns = [globals()[name] for name in names]
        if kernels[0] is None:
            kernels[0] = kernel_cache.build(names[0], fns[0], cfg, key_in, geo_in,
                                            options=_FUSE_OPTIONS[names[0]])
        sc, cap, pol, om = kernels[0](*geo_in)
        if kernels[1] is None:
            kernels[1] = kernel_cache.build(names[1], fns[1], cfg, key_in,
                                            (sc, *sum_mid, cap, pol, om),
                                            options=_FUSE_OPTIONS[names[1]])
    return None if None in kernels else tuple(kernels)


def cached_kernels(m: Model, plan: CompiledPlan, *, build: bool = False):
    """The AOT-compiled (``_k_geometry``, ``_k_sum``) of this plan from ``nbsim.kernel_cache``, or
    None where the cache has none (``build``: compile them ahead of time into the cache first)."""
    idx = torch.arange(plan.chunk, device=m.device) % (m.fpixels * m.spixels)
    geo_in = _geometry_inputs(m, idx, plan)
    sum_mid = (m.lattice, plan.table_flat, m.source_weight, plan.consts)
    return _aot_kernels(("_k_geometry", "_k_sum"), plan.cfg, geo_in + sum_mid[:3], geo_in, sum_mid,
                        build=build)


def render_compiled(m: Model, idx: torch.Tensor, plan: CompiledPlan) -> torch.Tensor:
    """``render_fast`` through Inductor for ``plan.chunk`` pixels (``idx`` is padded to that size):
    the kernels of the cache (``plan.aot``) or compiled in this process."""
    P = idx.shape[0]
    if P < plan.chunk:
        idx = torch.cat((idx, idx[-1:].expand(plan.chunk - P)))
    geometry, total = plan.aot or (_compiled_fn("_k_geometry"), _compiled_fn("_k_sum"))
    cfg = () if plan.aot else (plan.cfg,)
    sc, cap, pol, om = geometry(*_geometry_inputs(m, idx, plan), *cfg)
    return total(sc, m.lattice, plan.table_flat, m.source_weight, plan.consts, cap, pol, om,
                 *cfg)[:P]


def _field(m: Model, k: str) -> torch.Tensor:
    """Model field ``k`` as a tensor of the model's dtype and device (for stacking)."""
    return torch.as_tensor(getattr(m, k), dtype=m.dtype, device=m.device)


def stack_key(m: Model, plan: CompiledPlan) -> tuple:
    """Models with equal keys render in one stacked kernel call: equal static configuration, chunk,
    simulated pixels and input shapes (the structure-factor table itself is compared apart)."""
    shapes = tuple(tuple(_field(m, k).shape) for k in _STACKED)
    mask = None if m.mask is None else m.mask.cpu().numpy().tobytes()
    return (plan.cfg, plan.chunk, shapes, tuple(m.lattice.shape), tuple(m.source_weight.shape),
            m.dtype, str(m.device), m.fpixels, m.spixels, mask)


def simulate_images(models, *, budget_bytes: float = 1.0e9, progress=None, report=None,
                    aot: bool = True, build: bool = True):
    """The float images of ``models`` (a list) with the compiled kernels stacked along a leading
    batch axis: ``STACK_IMAGES`` images per kernel call (the last stack padded with its last
    model), each image bit for bit what ``simulate_image(m, compile=True)`` renders alone (the
    per-image kernel ``torch.vmap``-ed: the same arithmetic per pixel). Returns None where the
    models cannot be stacked (not all ``compile_ok``, or unequal ``stack_key`` or tables): render
    them one at a time then. ``aot``: use the kernel cache (``build``: build missing kernels into
    it). ``report``: receives ``kernel`` ("compiled-stacked"), ``kernel_cache``, ``chunk_pixels``."""
    if not models or not all(fast_path_ok(m) and compile_ok(m) for m in models):
        return None
    plans = [CompiledPlan(m, FastPlan(m), budget_bytes) for m in models]
    key = stack_key(models[0], plans[0])
    t0 = plans[0].table_flat
    if not all(stack_key(m, p) == key and (p.table_flat is t0 or torch.equal(p.table_flat, t0))
               for m, p in zip(models, plans)):
        return None
    B = STACK_IMAGES
    # a stack holds B chunks' scattering vectors: the chunk shrinks B-fold (same budget)
    chunk = max(_COMPILE_VEC, plans[0].chunk // B // _COMPILE_VEC * _COMPILE_VEC)
    if not plans[0].fits:
        return None
    m0 = models[0]
    idx_all = simulated_indices(m0)
    chunks = Chunks(m0, chunk, idx_all)
    kernels = None
    if aot:
        kernels = _stacked_kernels(models[0], plans[0], chunk, B, build=build)
    geometry, total = kernels or (_compiled_fn("_k_geometry_stack"), _compiled_fn("_k_sum_stack"))
    cfg = () if kernels else (plans[0].cfg,)
    images = []
    for s0 in range(0, len(models), B):
        ms = list(models[s0:s0 + B])
        ps = list(plans[s0:s0 + B])
        ms += [ms[-1]] * (B - len(ms))
        ps += [ps[-1]] * (B - len(ps))
        geo, consts, lat, w = _stack_inputs(ms, ps)
        n = min(B, len(models) - s0)
        own = [Chunks(m, chunk, idx_all) for m in ms[:n]]      # each model's first iteration
        results = [[] for _ in range(n)]
        for start, idx, _ in chunks.run(lambda *a: None):
            P = idx.shape[0]
            pad = torch.cat((idx, idx[-1:].expand(chunk - P))) if P < chunk else idx
            sc, cap, pol, om = geometry(pad, *geo, consts, *cfg)
            vals = total(sc, lat, t0, w, consts, cap, pol, om, *cfg)[:, :P]
            for i in range(n):
                fl = own[i].first_local(start)
                v = vals[i] if fl is None else _with_first_iteration(ms[i], idx, vals[i], fl)
                results[i].append((start, idx, v))
            if progress is not None:
                progress(s0 * chunks.n + min(start + chunk, chunks.n), len(models) * chunks.n)
        images += [c.image(r) for c, r in zip(own, results)]
    if report is not None:
        report.update(kernel="compiled-stacked", kernel_cache=kernels is not None, chunk_pixels=chunk)
    return images


def _stack_inputs(models, plans) -> tuple:
    """The inputs of the stacked kernels but the pixel indices and the shared table: geometry
    fields, continuous numbers, lattices, source weights, each with a leading batch axis."""
    geo = [torch.stack([_field(m, k) for m in models]) for k in _STACKED]
    return (geo, torch.stack([p.consts for p in plans]), torch.stack([m.lattice for m in models]),
            torch.stack([m.source_weight for m in models]))


def _stacked_kernels(m: Model, plan: CompiledPlan, chunk: int, B: int, *, build: bool):
    """The AOT-compiled stacked kernels (``_k_geometry_stack``, ``_k_sum_stack``) for stacks of
    ``B`` models like ``m`` and chunks of ``chunk`` pixels from ``nbsim.kernel_cache``, or None
    (``build``: compile missing ones into it first)."""
    geo, consts, lat, w = _stack_inputs([m] * B, [plan] * B)
    idx = torch.arange(chunk, device=m.device) % (m.fpixels * m.spixels)
    return _aot_kernels(("_k_geometry_stack", "_k_sum_stack"), plan.cfg,
                        (idx, *geo, consts, lat, plan.table_flat, w), (idx, *geo, consts),
                        (lat, plan.table_flat, w, consts), build=build)


def default_chunk_pixels(m: Model, budget_bytes: float, *, plan: Optional[FastPlan] = None,
                         workers: int = 1) -> int:
    """Pixels per chunk so that the kernel's working set stays within ``budget_bytes``.

    ``plan``: size chunks for ``render_fast`` (geometry per pixel plus one cache-sized sample block)
    rather than for ``render`` (the whole (T, O, S, F, M) broadcast per pixel). On the CPU chunks are
    also capped so that each of ``workers`` threads gets a few chunks whose working set stays near the
    cache; on a GPU the budget alone decides.
    """
    npix = m.fpixels * m.spixels
    if m.mask is not None:
        npix = max(1, int(m.mask.sum()))
    itemsize = torch.finfo(m.dtype).bits // 8
    budget = budget_bytes / max(1, workers)
    cpu = m.device.type == "cpu"
    if plan is None:
        per_elem = 24 + (80 if (m.table is not None and m.interpolate) else 0)   # live tensors/sample
        per_pixel = max(1, m.per_pixel_elements()) * per_elem * itemsize
        if cpu:
            budget = min(budget, 64 * 2 ** 20)
        return int(max(1, min(npix, budget // per_pixel)))
    block_bytes = plan.block_pixels * max(1, m.per_pixel_elements()) * 3 * itemsize
    avail = max(budget - block_bytes, plan.geo_bytes_per_pixel)
    if cpu:
        avail = min(avail, _GEO_BYTES)
    chunk = int(max(1, avail // plan.geo_bytes_per_pixel))
    if cpu and workers > 1:
        chunk = min(chunk, max(plan.block_pixels, -(-npix // (workers * _MAX_CHUNKS_PER_WORKER))))
    return int(max(1, min(npix, chunk)))


def _compiled_reference():
    """``render`` through torch.compile (forward and, via AOTAutograd, backward), built once."""
    fn = _compiled.get("render")
    if fn is None:
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = _compiled["render"] = torch.compile(render, dynamic=False)
    return fn


def _reverse_mode(m: Model) -> bool:
    """True when some model tensor takes part in reverse-mode autograd (not forward-mode duals
    or ``torch.func`` wrappers, which keep no graph to recompute)."""
    def tensors(v):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                yield from tensors(x)
    vals = list(vars(m).values()) + ([m.table.table, m.table.default_F] if m.table is not None else [])
    return any(t.requires_grad and not torch._C._functorch.is_functorch_wrapped_tensor(t)
               for v in vals for t in tensors(v))


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` chunk threads, started once and kept: a sweep renders
    many small images (a 256² image at 2 workers: 7.8 ms with the pool, 8.7 ms starting its threads
    anew, medians of 40)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbsim")
        return pool


def _forget_pools() -> None:
    """In a forked child: the parent's pool threads do not exist there; pools are started anew."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


class Chunks:
    """The pixels of one image in raster order, split into chunks: the one chunk driver that every
    kernel (reference, fast, compiled) and the trace go through.

    ``idx_all``: the flat indices to render (None: every pixel, chunks are contiguous runs);
    ``first``: the run's first loop iteration (quirk phi0_carryover) as (flat position, t, o, s)."""

    def __init__(self, m: Model, chunk: int, idx_all: Optional[torch.Tensor] = None):
        self.m, self.chunk, self.idx_all = m, int(chunk), idx_all
        self.n = m.fpixels * m.spixels if idx_all is None else idx_all.shape[0]
        self.starts = range(0, self.n, self.chunk)

    def pixels(self, start: int) -> torch.Tensor:
        """Flat indices (P,) of the chunk that begins at position ``start``."""
        if self.idx_all is not None:
            return self.idx_all[start:start + self.chunk]
        return torch.arange(start, min(start + self.chunk, self.n), device=self.m.device)

    def first_local(self, start: int):
        """(p, t, o, s) of the run's first loop iteration if it falls in this chunk, else None."""
        first = self.m.first_iteration
        if first is not None and start <= first[0] < start + self.chunk:
            return (first[0] - start,) + tuple(first[1:])
        return None

    def run(self, job, *, workers: int = 1, progress=None):
        """``job(start, idx, first_local)`` for every chunk; yields (start, idx, result) in raster
        order (``workers`` > 1: chunks on that many threads, each single-threaded)."""
        def call(start):
            idx = self.pixels(start)
            return idx, job(start, idx, self.first_local(start))
        if workers > 1 and len(self.starts) > 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for start, (idx, val) in zip(self.starts, _worker_pool(workers).map(call, self.starts)):
                    yield start, idx, val
                    if progress is not None:
                        progress(min(start + self.chunk, self.n), self.n)
            finally:
                torch.set_num_threads(prev)
            return
        for start in self.starts:
            idx, val = call(start)
            yield start, idx, val
            if progress is not None:
                progress(min(start + self.chunk, self.n), self.n)

    def image(self, results) -> torch.Tensor:
        """The (spixels, fpixels) image from (start, idx, values) in raster order, 0 outside the
        mask. Written into one buffer, or, on a derivative's path, assembled out of place (one
        differentiable op for autograd and ``torch.func``)."""
        m = self.m
        npix = m.fpixels * m.spixels
        if m.differentiable:
            vals = [v for _, _, v in results]
            flat = torch.cat(vals) if len(vals) > 1 else vals[0]
            if self.idx_all is not None:
                flat = torch.zeros(npix, dtype=flat.dtype, device=flat.device).index_put(
                    (self.idx_all,), flat)
            return flat.reshape(m.spixels, m.fpixels)
        out = torch.zeros(npix, dtype=m.dtype, device=m.device)
        for start, idx, val in results:
            if self.idx_all is not None:
                out.index_put_((idx,), val)
            else:
                out[start:start + val.shape[0]] = val
        return out.reshape(m.spixels, m.fpixels)


def simulated_indices(m: Model) -> Optional[torch.Tensor]:
    """Flat indices of the pixels the mask/ROI leaves to simulate (None: all of them)."""
    if m.mask is None:
        return None
    return torch.nonzero(m.mask.reshape(-1), as_tuple=False).reshape(-1).to(m.device)


def render_reference_chunks(m: Model, chunks: Chunks, *, kernel=None, recompute: bool = False,
                            progress=None):
    """``render`` (or ``kernel``, a compiled ``render``) over ``chunks``, carrying C's global
    interpolation flag from chunk to chunk; yields (start, idx, values) and finally sets
    ``chunks.interp_on``. ``recompute``: each chunk keeps only its inputs and is rendered again
    during backward (one chunk's graph at a time)."""
    kernel = kernel or render
    state = {"on": torch.tensor(bool(m.interpolate), device=m.device)}

    def job(start, idx, first_local):
        if recompute:
            val, state["on"] = torch.utils.checkpoint.checkpoint(
                lambda i, s: kernel(m, i, s, first_local=first_local), idx, state["on"],
                use_reentrant=False)
        else:
            val, state["on"] = kernel(m, idx, state["on"], first_local=first_local)
        chunks.interp_on = state["on"]
        return val
    chunks.interp_on = state["on"]
    yield from chunks.run(job, progress=progress)


def simulate_image(m: Model, *, chunk_pixels: Optional[int] = None, budget_bytes: float = 1.0e9,
                   progress=None, workers: Optional[int] = None, fast: Optional[bool] = None,
                   compile: Optional[bool] = False, report: Optional[dict] = None) -> torch.Tensor:
    """The float image (spixels, fpixels) in the model's dtype; 0 outside the ROI/mask.

    ``fast``: use ``render_fast`` (default: whenever ``fast_path_ok``; False forces ``render``).
    ``compile``: run ``render_compiled`` (torch.compile) where ``compile_ok``; chunks then have a
    fixed, padded size and results equal the eager path to rounding (not bit for bit). ``None``:
    only where it pays off within this one call (see ``compile_pays_off``); a process that renders
    many images (a sweep, a refinement loop) should ask for it explicitly. With derivatives
    (``m.differentiable``) the reference kernel runs, compiled (forward and backward) when
    ``compile`` is true.
    ``workers``: CPU threads that render chunks concurrently, each running its ops single-threaded
    (default ``torch.get_num_threads()``). ``workers=1`` renders one chunk at a time with torch's
    intra-op (OpenMP) threads instead: ~10 % faster on an idle machine, but every op then ends in a
    thread barrier, and when another process holds a core those barriers stall — measured 40-90×
    slower on a shared 2-core machine, where worker threads just share the remaining core. The
    image does not depend on ``chunk_pixels`` or ``workers``.
    ``report``: a dict that receives ``kernel`` ("compiled", "fast", "reference" or
    "reference-compiled": which kernel rendered the image) and ``chunk_pixels``.
    """
    dev = m.device
    idx_all = simulated_indices(m)
    use_fast = fast_path_ok(m) if fast is None else (fast and fast_path_ok(m))
    plan = FastPlan(m) if use_fast else None
    cplan = None
    if compile is not False and use_fast and compile_ok(m):
        # kernels compiled ahead of time by an earlier process (nbsim.kernel_cache): used under
        # compile=true and auto; compile=true builds them on first use
        cplan = CompiledPlan(m, plan, budget_bytes, chunk_pixels)
        cplan.aot = cached_kernels(m, cplan, build=bool(compile)) if cplan.fits else None
        if compile is None and cplan.aot is None and not compile_pays_off(m):
            cplan = None
    compile = bool(compile) or cplan is not None
    # compiled forward+backward serves reverse mode (AOTAutograd); forward-mode duals and
    # torch.func transforms run the eager reference kernel (a compiled graph drops their tangents)
    compile_reference = bool(compile) and m.differentiable and not use_fast and _reverse_mode(m)
    if report is not None:
        report["kernel"] = ("compiled" if cplan is not None and cplan.fits
                            else "fast" if use_fast
                            else "reference-compiled" if compile_reference else "reference")
        report["kernel_cache"] = cplan is not None and cplan.aot is not None
    if cplan is not None and cplan.fits:
        chunks = Chunks(m, cplan.chunk, idx_all)

        def compiled_job(start, idx, first_local):
            val = render_compiled(m, idx, cplan)
            return val if first_local is None else _with_first_iteration(m, idx, val, first_local)
        results = chunks.run(compiled_job, progress=progress)
    else:
        if not (use_fast and dev.type == "cpu"):
            workers = 1
        elif workers is None:
            workers = torch.get_num_threads()
        workers = max(1, int(workers))
        chunk = chunk_pixels or default_chunk_pixels(m, budget_bytes, plan=plan, workers=workers)
        chunks = Chunks(m, chunk, idx_all)
        if use_fast:
            results = chunks.run(lambda start, idx, fl: render_fast(m, idx, plan, first_local=fl),
                                 workers=workers, progress=progress)
        else:
            # reverse mode: recompute chunk by chunk during backward when there are several
            recompute = (chunks.n > chunk and m.differentiable and torch.is_grad_enabled()
                         and _reverse_mode(m))
            results = render_reference_chunks(
                m, chunks, kernel=_compiled_reference() if compile_reference else None,
                recompute=recompute, progress=progress)
    if report is not None:
        report["chunk_pixels"] = chunks.chunk
    return chunks.image(results)
