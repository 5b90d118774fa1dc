"""Crystal lattice setup (nanoBragg §4.2): cell or MOSFLM matrix, misset, real-space vectors.

All lattice vectors are lab-frame (3,) torch tensors. Reciprocal vectors ``a*, b*, c*`` are in Å⁻¹,
real-space vectors ``a, b, c`` in metres (as the C program stores them for the pixel loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from nbsim import libm
from nbsim.params import value
from nbsim.rotation import cross, dot, magnitude, rotate_xyz
from nbsim.units import deg_to_rad


@dataclass
class Lattice:
    a: torch.Tensor          # real-space cell vectors, metres, (3,) each — the φ=0, mosaic=0 orientation
    b: torch.Tensor
    c: torch.Tensor
    a_star: torch.Tensor     # reciprocal vectors, Å⁻¹ (include misset, not φ or mosaic)
    b_star: torch.Tensor
    c_star: torch.Tensor
    V_cell_A3: torch.Tensor
    info: dict = field(default_factory=dict)


def _vrescale(v, new_mag):
    return v * (new_mag / magnitude(v))


def cell_reciprocal(cell_A_deg, *, faithful: bool, dtype, device):
    """Reciprocal vectors (Å⁻¹) of the default orientation and the formula volume (Å³) for a cell.

    cell_A_deg: [a, b, c, alpha, beta, gamma], numbers or a (6,) tensor (its graph is kept).
    ``faithful`` reproduces C's c*_z term (quirk 5).
    Returns (a*, b*, c*, V_cell, (a, b, c) lengths) as tensors.
    """
    cell = torch.as_tensor(cell_A_deg, dtype=dtype, device=device)
    a, b, c = cell.unbind(0)[:3]
    al, be, ga = (deg_to_rad(x) for x in cell.unbind(0)[3:])
    V, ast, bst, cst = _volume_and_reciprocal_lengths(a, b, c, al, be, ga, libm.sin, libm.sqrt)
    Vs = 1.0 / V
    sin_gs = torch.clamp(c * Vs / ast / bst, min=-1.0, max=1.0)
    # C: a cosine whose square exceeds 1 becomes 1 (whatever its sign)
    cos_as, cos_bs, cos_gs = (torch.where(x * x > 1.0, torch.ones_like(x), x)
                              for x in _reciprocal_cosines(al, be, ga, libm.sin, libm.cos))
    zero = torch.zeros_like(ast)
    a_star = torch.stack((ast, zero, zero))
    b_star = torch.stack((bst * cos_gs, bst * sin_gs, zero))
    if faithful:
        cz = cst * V / (a * b * c * sin_gs)          # quirk 5 (C's expression)
    else:
        cz = Vs / (ast * bst * sin_gs)               # textbook V*/(a* b* sin γ*)
    c_star = torch.stack((cst * cos_bs, cst * (cos_as - cos_bs * cos_gs) / sin_gs, cz))
    return a_star, b_star, c_star, V, (a, b, c)


def _volume_and_reciprocal_lengths(a, b, c, al, be, ga, sin, sqrt):
    """(V, |a*|, |b*|, |c*|) of a cell (lengths Å, angles rad), C's expressions: numbers or tensors,
    with the ``sin``/``sqrt`` of either (``math``'s and ``nbsim.libm``'s round alike)."""
    s = (al + be + ga) / 2
    V = 2.0 * a * b * c * sqrt(abs(sin(s) * sin(s - al) * sin(s - be) * sin(s - ga)))
    Vs = 1.0 / V
    return V, b * c * sin(al) * Vs, c * a * sin(be) * Vs, a * b * sin(ga) * Vs


def _reciprocal_cosines(al, be, ga, sin, cos):
    """cos α*, cos β*, cos γ* from the cell angles (rad), C's expressions (numbers or tensors)."""
    return ((cos(be) * cos(ga) - cos(al)) / (sin(be) * sin(ga)),
            (cos(ga) * cos(al) - cos(be)) / (sin(ga) * sin(al)),
            (cos(al) * cos(be) - cos(ga)) / (sin(al) * sin(be)))


_ODDBALL = 1.0000001


def _oddball(title: str, names, values) -> Optional[str]:
    """C's warning when a cell's sines or cosines leave ±1.0000001 (an impossible cell, or nearly):
    ``title`` and the six numbers (%.25g), as one line; None when all are in range."""
    if all(-_ODDBALL <= v <= _ODDBALL for v in values):
        return None
    return f"{title}: " + ", ".join(f"{n} = {v:.25g}" for n, v in zip(names, values))


_RECIPROCAL_NAMES = ("sin(alpha_star)", "cos(alpha_star)", "sin(beta_star)", "cos(beta_star)",
                     "sin(gamma_star)", "cos(gamma_star)")


def oddball_cell(cell_A_deg) -> Optional[str]:
    """C's first check, of the reciprocal angles the -cell angles imply (before any vector is built):
    the warning, or None. Numbers only (report, no graph)."""
    a, b, c, al, be, ga = (float(value(x)) for x in cell_A_deg)
    al, be, ga = (deg_to_rad(x) for x in (al, be, ga))
    V, ast, bst, cst = _volume_and_reciprocal_lengths(a, b, c, al, be, ga, math.sin, math.sqrt)
    Vs = 1.0 / V
    sines = (a * Vs / bst / cst, b * Vs / ast / cst, c * Vs / ast / bst)
    vals = [x for pair in zip(sines, _reciprocal_cosines(al, be, ga, math.sin, math.cos)) for x in pair]
    return _oddball("oddball reciprocal cell angles (of the -cell angles)", _RECIPROCAL_NAMES, vals)


def mosflm_matrix(a_A, b_A, c_A, wavelength_A):
    """The MOSFLM A matrix (what a ``-mat`` / ``crystal.matrix_file`` holds) of real-space axes.

    a_A, b_A, c_A: (3,) real-space cell vectors in nbsim's lab frame, Å (e.g. a dxtbx crystal,
    ``nbsim.io.geom``). Returns a float64 (3, 3) tensor whose columns are a* = (b × c)/V,
    b* = (c × a)/V, c* = (a × b)/V (1/Å, V = a·(b × c)) times ``wavelength_A``: ``build_lattice``
    divides by the wavelength again, as nanoBragg does with a matrix file.
    """
    a, b, c = (torch.as_tensor(v, dtype=torch.float64) for v in (a_A, b_A, c_A))
    V = dot(a, cross(b, c))
    return torch.stack((cross(b, c), cross(c, a), cross(a, b)), dim=1) * (wavelength_A / V)


def build_lattice(*, cell_A_deg=None, matrix=None, wavelength_A=1.0, misset_rad=None,
                  faithful: bool = True, dtype=torch.float64, device="cpu") -> Lattice:
    """Lattice from a cell and/or a MOSFLM A matrix (columns a*, b*, c* × λ), then misset (rad, xyz).

    Every continuous input (cell, matrix, wavelength, misset angles) may be a tensor whose graph
    reaches the lattice vectors.

    Mirrors C: with a user cell the cross products are rescaled to the formula volume; with -mat
    alone the volume comes from the matrix.
    """
    user_cell = cell_A_deg is not None
    if user_cell:
        a_star, b_star, c_star, V_cell, (la, lb, lc) = cell_reciprocal(
            cell_A_deg, faithful=faithful, dtype=dtype, device=device)
    if matrix is not None:
        m = torch.as_tensor(matrix, dtype=dtype, device=device) * (1.0 / wavelength_A)
        a_star, b_star, c_star = m[:, 0], m[:, 1], m[:, 2]
    if misset_rad is not None:
        a_star, b_star, c_star = (rotate_xyz(v, *misset_rad) for v in (a_star, b_star, c_star))
    bxc, cxa, axb = cross(b_star, c_star), cross(c_star, a_star), cross(a_star, b_star)
    V_star = dot(a_star, bxc)
    if user_cell:
        bxc = _vrescale(bxc, la / V_cell)
        cxa = _vrescale(cxa, lb / V_cell)
        axb = _vrescale(axb, lc / V_cell)
        V_star = 1.0 / V_cell
    V_cell = 1.0 / V_star
    a, b, c = bxc * V_cell, cxa * V_cell, axb * V_cell
    a_star = cross(b, c) * V_star
    b_star = cross(c, a) * V_star
    c_star = cross(a, b) * V_star
    return Lattice(a=a * 1e-10, b=b * 1e-10, c=c * 1e-10, a_star=a_star, b_star=b_star, c_star=c_star,
                   V_cell_A3=V_cell)


def cell_parameters(lat: Lattice):
    """(a, b, c [Å], α, β, γ [deg]) of the real-space vectors, and the same for the reciprocal ones,
    as C derives them: each angle is atan2(sin, cos) with the sine from the volume
    (sin α = |a*|·V/(|b||c|), sin α* = |a|·V*/(|b*||c*|)) and the cosine from the dot product, so
    a cell made inconsistent by the triclinic c* quirk prints C's numbers. Third: C's warnings where
    a sine or cosine left ±1.0000001 before it was clamped (``_oddball``)."""
    a, b, c = (v * 1e10 for v in (lat.a, lat.b, lat.c))
    vs = (lat.a_star, lat.b_star, lat.c_star)
    V = value(lat.V_cell_A3)
    L = [value(magnitude(v)) for v in (a, b, c)]
    Ls = [value(magnitude(v)) for v in vs]

    raw = []

    def angles(vec, lens, other_lens, vol):
        out = []
        for i, (j, k) in enumerate(((1, 2), (0, 2), (0, 1))):
            sin = other_lens[i] * vol / lens[j] / lens[k]
            cos = value(dot(vec[j], vec[k])) / lens[j] / lens[k]
            raw.extend((sin, cos))
            sin = min(1.0, max(-1.0, sin))
            cos = 1.0 if cos * cos > 1.0 else cos
            out.append(math.degrees(math.atan2(sin, cos)))
        return out
    real = L + angles((a, b, c), L, Ls, V)
    recip = Ls + angles(vs, Ls, L, 1.0 / V)
    warnings = [w for w in (
        _oddball("oddball cell angles", ("sin_alpha", "cos_alpha", "sin_beta", "cos_beta", "sin_gamma",
                                         "cos_gamma"), raw[:6]),
        _oddball("oddball reciprocal cell angles", _RECIPROCAL_NAMES, raw[6:])) if w]
    return real, recip, warnings
