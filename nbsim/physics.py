"""Per-sample physics as small pure tensor functions (nanoBragg §4.3).

Shapes use ``...`` for any batch of samples (pixels × layers × sub-pixels × sources × φ × domains).
No function branches on tensor values; ``torch.where`` keeps them differentiable (unused branches are
evaluated on safe inputs so they produce no NaN gradients).
"""
from __future__ import annotations

import math

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


def sincg(x: torch.Tensor, n) -> torch.Tensor:
    """sin(n·x)/sin(x), n at x == 0 (the 1-D lattice interference function); ``n`` a number or a
    0-d tensor."""
    zero = x == 0
    xs = torch.where(zero, 1.0, x)
    return torch.where(zero, n, torch.sin(n * xs) / torch.sin(xs))


def sinc3(x: torch.Tensor) -> torch.Tensor:
    """3(sin x/x − cos x)/x², 1 at x == 0 (Fourier transform of a sphere)."""
    zero = x == 0
    xs = torch.where(zero, 1.0, x)
    return torch.where(zero, 1.0, 3.0 * (torch.sin(xs) / xs - torch.cos(xs)) / (xs * xs))


def lattice_factor(hkl: torch.Tensor, hkl0: torch.Tensor, shape: str, N, fudge: float,
                   recip=None) -> torch.Tensor:
    """F_latt for fractional (..., 3) ``hkl`` and rounded ``hkl0``.

    N: (Na, Nb, Nc) numbers or 0-d tensors (an axis with N ≤ 1 is skipped, decided at its value).
    recip: (a*, b*, c*) (3,) Å⁻¹ setup vectors, needed by gauss/tophat.
    """
    Na, Nb, Nc = N
    h, k, l = hkl.unbind(-1)
    if shape == "square":
        f = None
        for n, x in ((Na, h), (Nb, k), (Nc, l)):
            if value(n) > 1:
                s = sincg(math.pi * x, n)
                f = s if f is None else f * s
        return torch.ones_like(h) if f is None else f
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


# ---------------------------------------------------------------------------------------------
# structure factors
# ---------------------------------------------------------------------------------------------

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

    def nearest(self, hkl0: torch.Tensor) -> torch.Tensor:
        """F at integer indices ``hkl0`` (..., 3) (float tensor of whole numbers); default_F outside."""
        h0, k0, l0 = hkl0.unbind(-1)
        inside = ((h0 >= self.hmin) & (h0 <= self.hmax) & (k0 >= self.kmin) & (k0 <= self.kmax)
                  & (l0 >= self.lmin) & (l0 <= self.lmax))
        hi = (h0 - self.hmin).clamp(0, self.hr - 1).long()
        ki = (k0 - self.kmin).clamp(0, self.kr - 1).long()
        li = (l0 - self.lmin).clamp(0, self.lr - 1).long()
        F = self.flat[(hi * self.kr + ki) * self.lr + li]
        return torch.where(inside, F, full_like(F, self.default_F))

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
