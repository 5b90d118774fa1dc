"""Per-sample physics as small pure tensor functions (nanoBragg §4.3).

Shapes use ``...`` for any batch of samples (pixels × layers × sub-pixels × sources × φ × domains).
No function branches on tensor values; ``torch.where`` keeps them differentiable (unused branches are
evaluated on safe inputs so they produce no NaN gradients).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from nbsim.params import value
from nbsim.rotation import cross, dot, unitize

R_E_SQR = 7.94079248018965e-30          # classical electron radius squared, m²
AVOGADRO = 6.02214179e23
ROUND_NORM = 0.723601254558268          # sqrt of the cube/sphere volume ratio


def full_like(x: torch.Tensor, v) -> torch.Tensor:
    """``x``'s shape filled with ``v``, a number or a 0-d tensor (whose graph is kept)."""
    if isinstance(v, torch.Tensor):
        return v.to(x.dtype).expand_as(x)
    return torch.full_like(x, v)


# ---------------------------------------------------------------------------------------------
# geometry stages: pixel → sub-pixel position → diffracted direction → scattering vector → h, k, l
# ---------------------------------------------------------------------------------------------
# Each takes its operands already shaped to broadcast (the caller, an evaluation strategy, picks
# the layout: pixels first for the eager kernels, pixels last for the compiled one) and returns
# per-component lists [x, y, z] where a trailing axis of 3 would cost a strided pass.

def subpixel_offsets(s, f, sub_s, sub_f, oversample: int, pixel_m):
    """(Fdet, Sdet): in-plane coordinates (m) of sub-pixel centres, C's
    subpixel·(pixel·oversample + sub) + subpixel/2, from slow/fast pixel coordinates ``s``, ``f``
    and sub-pixel indices ``sub_s``, ``sub_f`` (any broadcasting shapes; pixel_m: m)."""
    subpix = pixel_m / oversample
    return (subpix * (f * oversample + sub_f) + subpix / 2.0,
            subpix * (s * oversample + sub_s) + subpix / 2.0)


def flat_positions(Fdet, Sdet, Odet, fdet, sdet, odet, pix0):
    """[x, y, z] lab-frame positions (m) pix0 + Fdet·f̂ + Sdet·ŝ + Odet·ô of flat-detector samples,
    summed in C's order ((F + S) + O) + pix0; ``Fdet``, ``Sdet`` (m) broadcast against ``Odet``
    (m, the sensor layer depth); vectors (3,)."""
    return [Fdet * fdet[c] + Sdet * sdet[c] + Odet * odet[c] + pix0[c] for c in range(3)]


def airpath(p, sqrt=torch.sqrt):
    """(d, R): unit vectors [dx, dy, dz] along positions ``p`` = [x, y, z] (m) and their length R
    = sqrt(x·x + y·y + z·z) (m, C's order; ``sqrt`` the correctly rounded square root to use)."""
    R = sqrt(p[0] * p[0] + p[1] * p[1] + p[2] * p[2])
    safe = torch.where(R == 0, 1.0, R)
    return [c / safe for c in p], R


def scattering_vector(d, incident, wavelength_m, out=None):
    """[Sx, Sy, Sz] = (d − i)/λ (m⁻¹) for diffracted unit vectors ``d`` and incident unit vectors
    ``incident`` (per-component lists) and wavelengths (m), broadcast; ``out``: optional list of
    3 tensors to write into."""
    if out is None:
        return [(d[c] - incident[c]) / wavelength_m for c in range(3)]
    return [torch.div(d[c] - incident[c], wavelength_m, out=out[c]) for c in range(3)]


def dmin_executed(scat: torch.Tensor, dmin_m, sqrt=torch.sqrt) -> torch.Tensor:
    """Bool (...): False where C's ``-dmin`` cut skips a scattering vector (..., 3) (m⁻¹):
    stol = |S|/2 > 0 and dmin > 1/(2·stol)."""
    stol = 0.5 * sqrt((scat * scat).sum(-1))
    safe = torch.where(stol > 0, stol, torch.ones_like(stol))
    return ~((stol > 0) & (dmin_m > 0.5 / safe))


def miller_index(sx, sy, sz, row, out=None, tmp=None):
    """Fractional Miller index a·S = a_x·S_x + a_y·S_y + a_z·S_z in C's order, without fused
    multiply-add: the C program's index to the last bit. ``row``: (a_x, a_y, a_z) of a real-space
    axis (m), S (m⁻¹), all broadcasting. ``out``/``tmp``: buffers of the result's shape for an
    evaluation without allocation (the same three products and two sums)."""
    if out is None:
        return sx * row[0] + sy * row[1] + sz * row[2]
    h = torch.mul(sx, row[0], out=out)
    h.add_(torch.mul(sy, row[1], out=tmp))
    return h.add_(torch.mul(sz, row[2], out=tmp))


def nearest_index(h: torch.Tensor, out=None) -> torch.Tensor:
    """C's rounding of a fractional Miller index to the nearest whole one: ceil(h − 0.5)
    (``out``: a buffer to write it into)."""
    if out is None:
        return torch.ceil(h - 0.5)
    return torch.sub(h, 0.5, out=out).ceil_()


# ---------------------------------------------------------------------------------------------
# lattice factor
# ---------------------------------------------------------------------------------------------

def sincg_from_sines(sin_nx: torch.Tensor, sin_x: torch.Tensor, n, inplace: bool = False):
    """sin(n·x)/sin(x) from its two sines, n where sin(x) == 0 (for a float x only at x == 0).
    ``inplace``: the ratio is written into ``sin_nx`` and the 0/0 there left as NaN, for the caller
    to set to n (``nan_to_num_``) where it occurs."""
    if inplace:
        return sin_nx.div_(sin_x)
    zero = sin_x == 0
    return torch.where(zero, n, sin_nx / torch.where(zero, 1.0, sin_x))


def sincg(x: torch.Tensor, n) -> torch.Tensor:
    """sin(n·x)/sin(x), n at x == 0 (the 1-D lattice interference function); ``n`` a number or a
    0-d tensor."""
    return sincg_from_sines(torch.sin(n * x), torch.sin(x), n)


def sincg_reduced(h: torch.Tensor, h0: torch.Tensor, n, signed: bool = True) -> torch.Tensor:
    """sin(n·π·h)/sin(π·h) for whole n from f = h − h0 (h0 any whole number near h):
    (−1)^((n−1)·h0) · sin(n·π·f)/sin(π·f), n where f == 0. Same value, well conditioned below
    float64 far from the origin. ``signed=False`` leaves the sign out (for F_latt², where it
    cancels)."""
    r = sincg((h - h0) * math.pi, n)
    if signed and int(value(n)) % 2 == 0:
        r = r * (1.0 - 2.0 * torch.remainder(h0, 2.0))
    return r


def lattice_axis_factors(hkl, hkl0, N, reduced: bool = False):
    """Per-axis factors [sincg(π·h, Na), sincg(π·k, Nb), sincg(π·l, Nc)] of the SQUARE shape for
    fractional ``hkl`` (list or (..., 3)), None for an axis with N ≤ 1 (factor 1, skipped);
    ``reduced``: from h − hkl0 (``sincg_reduced``)."""
    return [None if value(n) <= 1 else
            (sincg_reduced(hkl[i], hkl0[i], n) if reduced else sincg(math.pi * hkl[i], n))
            for i, n in enumerate(N)]


def sinc3(x: torch.Tensor) -> torch.Tensor:
    """3(sin x/x − cos x)/x², 1 at x == 0 (Fourier transform of a sphere)."""
    zero = x == 0
    xs = torch.where(zero, 1.0, x)
    return torch.where(zero, 1.0, 3.0 * (torch.sin(xs) / xs - torch.cos(xs)) / (xs * xs))


def product(factors, like: torch.Tensor) -> torch.Tensor:
    """The product of the non-None ``factors`` left to right (ones shaped like ``like`` if none)."""
    out = None
    for f in factors:
        if f is not None:
            out = f if out is None else out * f
    return torch.ones_like(like) if out is None else out


def lattice_factor(hkl: torch.Tensor, hkl0: torch.Tensor, shape: str, N, fudge: float,
                   recip=None, reduced: bool = False) -> torch.Tensor:
    """F_latt for fractional (..., 3) ``hkl`` and rounded ``hkl0`` (``reduced``: SQUARE from h − h0,
    see ``sincg_reduced``).

    N: (Na, Nb, Nc) numbers or 0-d tensors (an axis with N ≤ 1 is skipped, decided at its value).
    recip: (a*, b*, c*) (3,) Å⁻¹ setup vectors, needed by gauss/tophat.
    """
    Na, Nb, Nc = N
    if shape == "square":
        return product(lattice_axis_factors(hkl.unbind(-1), hkl0.unbind(-1) if reduced else None,
                                            N, reduced), like=hkl[..., 0])
    d = hkl - hkl0
    dh, dk, dl = d.unbind(-1)
    NNN = Na * Nb * Nc
    if shape == "round":
        hrad_sqr = dh * dh * Na * Na + dk * dk * Nb * Nb + dl * dl * Nc * Nc
        return NNN * ROUND_NORM * sinc3(math.pi * torch.sqrt(hrad_sqr * fudge))
    a_s, b_s, c_s = recip
    dq = dh.unsqueeze(-1) * a_s + dk.unsqueeze(-1) * b_s + dl.unsqueeze(-1) * c_s
    rad_sqr = (dq * dq).sum(-1) * Na * Na * Nb * Nb * Nc * Nc
    if shape == "gauss":
        return NNN * torch.exp(-(rad_sqr / 0.63 * fudge))
    if shape == "tophat":
        return NNN * (rad_sqr * fudge < 0.3969).to(hkl.dtype)
    raise ValueError(f"unknown crystal shape {shape!r}")


def polarization_factor(kahn, incident: torch.Tensor, diffracted: torch.Tensor,
                        axis: torch.Tensor) -> torch.Tensor:
    """Kahn polarization factor ½(1 + cos²2θ − K·cos2ψ·sin²2θ) for unit (..., 3) vectors."""
    cos2t = dot(incident, diffracted)
    c2 = cos2t * cos2t
    s2 = 1 - c2
    if isinstance(kahn, (int, float)) and kahn == 0:
        return 0.5 * (1.0 + c2 - 0.0 * s2)
    B, _ = unitize(cross(axis.expand_as(incident), incident))
    E, _ = unitize(cross(incident, B))
    psi = -torch.atan2(dot(diffracted, B), dot(diffracted, E))
    return 0.5 * (1.0 + c2 - kahn * torch.cos(2 * psi) * s2)


def solid_angle(R: torch.Tensor, pixel_m, close_distance_m, point_pixel: bool) -> torch.Tensor:
    """Pixel solid angle (sr) at airpath R (m): px²/R²·cos(obliquity), or 1/R² for point pixels."""
    if point_pixel:
        return 1.0 / R / R
    return pixel_m * pixel_m / R / R * close_distance_m / R


def capture_fraction(diffracted: torch.Tensor, odet: torch.Tensor, layer: torch.Tensor,
                     thickstep_m, mu_per_m) -> torch.Tensor:
    """Fraction of photons absorbed in sensor layer ``layer`` (broadcastable index) along ``diffracted``."""
    parallax = dot(diffracted, odet)
    return (torch.exp(-layer * thickstep_m * mu_per_m / parallax)
            - torch.exp(-(layer + 1) * thickstep_m * mu_per_m / parallax))


def bragg_term(F_latt: torch.Tensor, F_cell=None, F_sqr=None, out=None) -> torch.Tensor:
    """F_cell²·F_latt² of one sample, C's (F_cell·F_cell·F_latt)·F_latt; without ``F_cell``,
    ``F_sqr`` = default_F² (the same number: F_cell·F_cell is rounded once either way).
    ``out``: a buffer to evaluate it in."""
    if out is not None:
        if F_cell is None:
            torch.mul(F_latt, F_sqr, out=out)
        else:
            torch.mul(F_cell, F_cell, out=out).mul_(F_latt)
        return out.mul_(F_latt)
    if F_cell is None:
        return F_latt * F_sqr * F_latt
    return F_cell * F_cell * F_latt * F_latt


def photon_scale(I, r_e_sqr, fluence, steps):
    """C's final scaling of a pixel's sum: r_e²·fluence·I/steps (I: F² units; r_e² m²,
    fluence photons/m²)."""
    return r_e_sqr * fluence * I / steps


# ---------------------------------------------------------------------------------------------
# structure factors
# ---------------------------------------------------------------------------------------------

class BorderedTable(NamedTuple):
    """A structure-factor table bordered with default_F (``HKLTable.bordered``): flat values,
    and per axis the index below the table (lo), the largest bordered index (hi), and the k, l
    extents of the bordered table (kl)."""
    flat: torch.Tensor
    lo: tuple
    hi: tuple
    kl: tuple


def nearest_F(bt: BorderedTable, h0: torch.Tensor, k0: torch.Tensor, l0: torch.Tensor):
    """F_cell at whole-number indices h0, k0, l0 (any shape, float): the bordered table's entry,
    default_F outside the table. Index arithmetic in the indices' dtype where it is exact for
    every entry, else in float64."""
    exact = bt.flat.numel() < 2.0 / torch.finfo(h0.dtype).eps
    idt = h0.dtype if exact else torch.float64
    ix = [(h.detach().to(idt) - bt.lo[a]).clamp_(0.0, bt.hi[a]) for a, h in enumerate((h0, k0, l0))]
    return bt.flat[ix[0].mul_(bt.kl[0]).add_(ix[1]).mul_(bt.kl[1]).add_(ix[2]).long()]


class HKLTable:
    """Dense structure-factor table on [hmin..hmax]×[kmin..kmax]×[lmin..lmax] (F, electrons)."""

    def __init__(self, ranges, table: torch.Tensor, default_F: float, count: int):
        self.hmin, self.hmax, self.kmin, self.kmax, self.lmin, self.lmax = (int(x) for x in ranges)
        self.table = table          # (hr, kr, lr) with hr = hmax - hmin + 1 (no C padding)
        self.default_F = default_F
        self.count = count          # C's "hkls"
        self.hr = self.hmax - self.hmin + 1
        self.kr = self.kmax - self.kmin + 1
        self.lr = self.lmax - self.lmin + 1
        self.flat = table.reshape(-1)

    def bordered(self) -> "BorderedTable":
        """The table with a border of default_F on every side (differentiable in both): clamping an
        index onto the border gives default_F outside the table, without range tests."""
        t, d = self.table, self.default_F
        for dim in range(3):
            shape = list(t.shape)
            shape[dim] = 1
            edge = (d.to(t.dtype).expand(shape) if isinstance(d, torch.Tensor)
                    else torch.full(shape, float(d), dtype=t.dtype, device=t.device))
            t = torch.cat((edge, t, edge), dim)
        return BorderedTable(t.reshape(-1), (float(self.hmin - 1), float(self.kmin - 1),
                                             float(self.lmin - 1)),
                             (float(self.hr + 1), float(self.kr + 1), float(self.lr + 1)),
                             (float(self.kr + 2), float(self.lr + 2)))

    def nearest(self, hkl0: torch.Tensor) -> torch.Tensor:
        """F at integer indices ``hkl0`` (..., 3) (float tensor of whole numbers); default_F outside."""
        return nearest_F(self.bordered(), *hkl0.unbind(-1))

    def interp_out_of_range(self, hkl: torch.Tensor) -> torch.Tensor:
        """True where C's tricubic interpolation would leave the table (bool, hkl.shape[:-1])."""
        h, k, l = hkl.unbind(-1)
        return (((h - self.hmin + 3) > self.hr) | (h - 2 < self.hmin)
                | ((k - self.kmin + 3) > self.kr) | (k - 2 < self.kmin)
                | ((l - self.lmin + 3) > self.lr) | (l - 2 < self.lmin))

    def tricubic(self, hkl: torch.Tensor) -> torch.Tensor:
        """4×4×4 Lagrange interpolation of F at fractional ``hkl`` (..., 3), C's polin3 (l, then k, then h).
        Out-of-range points are clamped (callers decide what to use there)."""
        fl = torch.floor(hkl)
        offs = torch.arange(-1, 3, dtype=hkl.dtype, device=hkl.device)        # (4,)
        nodes = fl.unsqueeze(-1) + offs                                         # (..., 3, 4)
        x = hkl.unsqueeze(-1)                                                    # (..., 3, 1)
        # Lagrange basis weights w[..., axis, i] = prod_{j≠i} (x - x_j)/(x_i - x_j); nodes are unit spaced
        w = []
        for i in range(4):
            num = torch.ones_like(x[..., 0])
            den = 1.0
            for j in range(4):
                if j != i:
                    num = num * (x[..., 0] - nodes[..., j])
                    den *= float(i - j)
            w.append(num / den)
        w = torch.stack(w, dim=-1)                                               # (..., 3, 4)
        hi = (nodes[..., 0, :] - self.hmin).clamp(0, self.hr - 1).long()         # (..., 4)
        ki = (nodes[..., 1, :] - self.kmin).clamp(0, self.kr - 1).long()
        li = (nodes[..., 2, :] - self.lmin).clamp(0, self.lr - 1).long()
        idx = ((hi[..., :, None, None] * self.kr + ki[..., None, :, None]) * self.lr
               + li[..., None, None, :])                                         # (..., 4, 4, 4)
        sub = self.flat[idx]
        along_l = (sub * w[..., 2, None, None, :]).sum(-1)                       # (..., 4, 4)
        along_k = (along_l * w[..., 1, None, :]).sum(-1)                         # (..., 4)
        return (along_k * w[..., 0, :]).sum(-1)
