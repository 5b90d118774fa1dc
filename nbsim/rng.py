"""Bit-exact port of nanoBragg's random-number machinery (Numerical Recipes ``ran1`` family).

This module sits outside the differentiable path: everything here is plain Python / numpy and
reproduces the C program's draws exactly, including its float32 arithmetic.

C semantics reproduced
----------------------
* ``ran1`` is the Numerical Recipes minimal-standard generator with a 32-entry Bays-Durham shuffle.
  The shuffle table (``iy``, ``iv[32]``) is a C ``static``: **one table shared by every stream**.
  Each stream only owns its ``long`` seed variable (``idum``).  The table is (re)loaded whenever a
  call sees ``idum <= 0`` or an empty table (``iy == 0``); a positive seed on an already-loaded table
  therefore continues from whatever state another stream left behind.  A positive seed on a fresh
  table is replaced by 1 (NR's ``if(-(*idum) < 1) *idum = 1``).
* nanoBragg stores ``-N`` for a command-line seed ``N`` (``-seed``, ``-mosaic_seed``,
  ``-misset_seed``); the default mosaic seed is ``-12345678`` and the default noise seed ``-time()``.
  **Every ``seed`` argument in this package is that C-internal value** (use :func:`c_seed` to convert
  a command-line value).
* Draw order in the program: random misset (only with ``-misset random``) -> mosaic domains -> noise.
* ``ran1`` returns a float32; ``gaussdev``/``poidev``/``gammln`` compute in the mix of float and
  double that the C source prescribes (x86-64 SSE, no FMA: every float operation rounds to float32).

Public API
----------
``Ran1Table``, ``Ran1`` (a stream), ``c_seed``, ``gammln``, ``Deviates`` (gaussdev/poidev with their
C statics), ``mosaic_rotation_umat``, ``umat2misset``, ``mosaic_umats``, ``random_misset``.
"""

from __future__ import annotations

import math
import struct

import numpy as np

__all__ = [
    "AM",
    "IA",
    "IM",
    "IQ",
    "IR",
    "NDIV",
    "NTAB",
    "RNMX",
    "Deviates",
    "Ran1",
    "Ran1Table",
    "c_seed",
    "f32",
    "gammln",
    "mosaic_rotation_umat",
    "mosaic_umats",
    "random_misset",
    "umat2misset",
]

# Numerical Recipes ran1 constants (as #defined in nanoBragg.c)
IA = 16807
IM = 2147483647
AM = 1.0 / IM
IQ = 127773
IR = 2836
NTAB = 32
NDIV = 1 + (IM - 1) // NTAB  # = 2**26
EPS = 1.2e-7
RNMX = 1.0 - EPS
_RNMX_F32 = float(np.float32(RNMX))  # what "return RNMX" gives from a float function

_F32 = struct.Struct("f")


def f32(x: float) -> float:
    """Round a Python float (double) to the nearest float32, as a C ``(float)`` cast does.

    Returns a Python float holding the float32 value; overflow gives +-inf (C semantics), NaN stays NaN.
    """
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def c_seed(user_value: int) -> int:
    """C-internal seed for a command-line seed ``N``: nanoBragg stores ``-atoi(N)``."""
    return -int(user_value)


def _ctrunc_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero) for Python ints."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _schrage(idum: int) -> int:
    """One step of ``idum = IA*idum mod IM`` exactly as C writes it (Schrage's method)."""
    k = _ctrunc_div(idum, IQ)
    idum = IA * (idum - k * IQ) - IR * k
    if idum < 0:
        idum += IM
    return idum


class Ran1Table:
    """The static shuffle table of C ``ran1`` (``static long iy, iv[NTAB]``), shared by all streams.

    A fresh table has ``iy == 0`` (C zero-initialised statics) and is loaded by the first draw.
    """

    __slots__ = ("iv", "iy")

    def __init__(self) -> None:
        self.iy: int = 0
        self.iv: list[int] = [0] * NTAB

    def copy(self) -> Ran1Table:
        t = Ran1Table()
        t.iy = self.iy
        t.iv = list(self.iv)
        return t

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Ran1Table(iy={self.iy})"


def _powers(n: int) -> np.ndarray:
    """``IA**k mod IM`` for k = 1..n as int64 (products stay below 2**62)."""
    p = np.empty(n, dtype=np.int64)
    p[0] = IA
    m = 1
    while m < n:
        step = int(p[m - 1])  # IA**m mod IM
        c = min(m, n - m)
        p[m:m + c] = (p[:c] * step) % IM
        m += c
    return p


class Ran1:
    """One ``ran1`` stream: a C ``long`` seed variable bound to a (shared) :class:`Ran1Table`.

    Parameters
    ----------
    seed : int
        The C-internal seed value (``-N`` for a command-line ``N``).  Negative (or zero) re-loads the
        shared table on the first draw; positive continues the shared table as the C code does.
    table : Ran1Table, optional
        Shared table; a fresh one (as at program start) when omitted.

    Calling the stream returns one draw: a Python float holding the float32 value in (0, 1).
    """

    __slots__ = ("ndraws", "seed", "table")

    def __init__(self, seed: int, table: Ran1Table | None = None) -> None:
        self.seed = int(seed)
        self.table = table if table is not None else Ran1Table()
        self.ndraws = 0  # draws made by this stream object (diagnostic)

    def _reload(self) -> None:
        idum = self.seed
        idum = max(-idum, 1)
        iv = self.table.iv
        for j in range(NTAB + 7, -1, -1):
            idum = _schrage(idum)
            if j < NTAB:
                iv[j] = idum
        self.table.iy = iv[0]
        self.seed = idum

    def __call__(self) -> float:
        tab = self.table
        if self.seed <= 0 or not tab.iy:
            self._reload()
        idum = _schrage(self.seed)
        self.seed = idum
        j = _ctrunc_div(tab.iy, NDIV)
        iy = tab.iv[j]
        tab.iv[j] = idum
        tab.iy = iy
        self.ndraws += 1
        temp = f32(AM * iy)
        return _RNMX_F32 if temp > RNMX else temp

    def draw(self, n: int) -> np.ndarray:
        """``n`` consecutive draws as a float32 array of shape (n,); state advances exactly n draws.

        Vectorised: the Lehmer sequence is computed with numpy, only the shuffle runs in Python.
        """
        n = int(n)
        out = np.empty(n, dtype=np.float32)
        if n <= 0:
            return out
        first = 0
        # scalar path while the table needs loading, the seed is unusual, or few draws remain
        while first < n and (n - first < 64 or self.seed <= 0 or not self.table.iy
                             or not (0 < self.seed < IM) or not (0 < self.table.iy < IM)):
            out[first] = self()
            first += 1
        if first == n:
            return out
        m = n - first
        xs = ((_powers(m) * self.seed) % IM).tolist()
        tab = self.table
        iv = tab.iv
        iy = tab.iy
        ys = [0] * m
        i = 0
        for x in xs:
            j = iy >> 26  # iy // NDIV for 0 <= iy < IM
            iy = iv[j]
            iv[j] = x
            ys[i] = iy
            i += 1
        tab.iy = iy
        self.seed = xs[-1]
        self.ndraws += m
        temp = (np.asarray(ys, dtype=np.float64) * AM).astype(np.float32)
        temp[temp.astype(np.float64) > RNMX] = np.float32(_RNMX_F32)
        out[first:] = temp
        return out

    def state(self) -> tuple[int, int, tuple[int, ...]]:
        """Snapshot (seed, iy, iv) of the stream and its table."""
        return self.seed, self.table.iy, tuple(self.table.iv)

    def restore(self, snap: tuple[int, int, tuple[int, ...]]) -> None:
        """Restore a :meth:`state` snapshot (writes into the shared table)."""
        self.seed, self.table.iy, iv = snap[0], snap[1], snap[2]
        self.table.iv[:] = list(iv)


_GAMMLN_COF = (76.18009172947146, -86.50532032941677, 24.01409824083091,
               -1.231739572450155, 0.1208650973866179e-2, -0.5395239384953e-5)


def gammln(xx: float) -> float:
    """ln Gamma(xx) exactly as C ``float gammln(float xx)``: float32 in, double inside, float32 out."""
    x = y = f32(xx)
    tmp = x + 5.5
    tmp -= (x + 0.5) * math.log(tmp)
    ser = 1.000000000190015
    for c in _GAMMLN_COF:
        y += 1.0
        ser += c / y
    return f32(-tmp + math.log(2.5066282746310005 * ser / x))


def _c_floor(x: float) -> float:
    """C ``floor`` on a float value (NaN/inf pass through instead of raising)."""
    if math.isfinite(x):
        return float(math.floor(x))
    return x


class Deviates:
    """``gaussdev`` and ``poidev`` with their C ``static`` variables, drawing from one :class:`Ran1`.

    C keeps ``iset/gset`` (gaussdev's spare deviate) and ``oldm/g/sq/alxm`` (poidev's cache) as
    statics; one instance of this class plays the role of one program run.
    """

    def __init__(self, rng: Ran1) -> None:
        self.rng = rng
        self.iset = 0
        self.gset = 0.0
        self.oldm = -1.0
        self.g = 0.0
        self.sq = 0.0
        self.alxm = 0.0

    def gaussdev(self) -> float:
        """Unit-variance Gaussian deviate (Box-Muller polar form), float32 value."""
        if self.iset == 0:
            rng = self.rng
            while True:
                v1 = f32(2.0 * rng() - 1.0)
                v2 = f32(2.0 * rng() - 1.0)
                rsq = f32(f32(v1 * v1) + f32(v2 * v2))
                if not (rsq >= 1.0 or rsq == 0):
                    break
            fac = f32(math.sqrt(-2.0 * math.log(rsq) / rsq))
            self.gset = f32(v1 * fac)
            self.iset = 1
            return f32(v2 * fac)
        self.iset = 0
        return self.gset

    def poidev(self, xm: float) -> float:
        """Poisson deviate with mean ``xm`` (float32), all three C branches; returns a float32 value.

        * xm > 1e6: ``xm + sqrt(xm)*gaussdev`` (not an integer in general)
        * xm < 12: product of uniforms compared with ``g = exp(-xm)``
        * otherwise: Lorentzian rejection with :func:`gammln`
        """
        xm = f32(xm)
        rng = self.rng
        if xm > 1.0e6:
            return f32(xm + math.sqrt(xm) * self.gaussdev())
        if xm < 12.0:
            if xm != self.oldm:
                self.oldm = xm
                self.g = f32(math.exp(-xm))
            g = self.g
            em = 0.0
            t = rng()
            while t > g:
                em += 1.0
                t = f32(t * rng())
            return em
        if xm != self.oldm:
            self.oldm = xm
            self.sq = f32(math.sqrt(2.0 * xm))
            self.alxm = f32(math.log(xm))
            self.g = f32(f32(xm * self.alxm) - gammln(f32(xm + 1.0)))
        sq, alxm, g = self.sq, self.alxm, self.g
        while True:
            while True:
                y = f32(math.tan(math.pi * rng()))
                em = f32(f32(sq * y) + xm)
                if not (em < 0.0):
                    break
            em = _c_floor(em)
            t = f32(0.9 * (1.0 + f32(y * y))
                    * math.exp(f32(f32(f32(em * alxm) - gammln(f32(em + 1.0))) - g)))
            if not (rng() > t):
                break
        return em


def _as_stream(seed, table: Ran1Table | None) -> Ran1:
    if isinstance(seed, Ran1):
        if table is not None and table is not seed.table:
            raise ValueError("pass either a Ran1 stream or a seed with a table, not a stream and another table")
        return seed
    return Ran1(int(seed), table)


def mosaic_rotation_umat(mosaicity: float, rng: Ran1) -> np.ndarray:
    """Random rotation on a spherical cap, as C ``mosaic_rotation_umat`` (3 draws).

    Parameters
    ----------
    mosaicity : float
        Cap size in radians; passed through a C ``float`` parameter (rounded to float32).
        ``90.0`` (radians, as C passes it) gives an isotropic random orientation.
    rng : Ran1
        Stream to draw from.

    Returns
    -------
    ndarray, shape (3, 3), float64
        Row-major ``umat`` (``umat[0] = uxx uxy uxz``); rotate a vector with ``umat @ v``
        (C ``rotate_umat``: ``new_i = sum_j U[3i+j] v_j``).
    """
    v1, v2, v3, p = _cap_draw(rng)
    rot = f32(f32(mosaicity) * p)
    return np.array(_cap_umat(rot, v1, v2, v3, math.cos, math.sin), dtype=np.float64)


def _cap_draw(rng: Ran1):
    """The 3 draws of C ``mosaic_rotation_umat``: the rotation axis (v1, v2, v3) and the float32
    factor ``p`` (powf((float)(1 - r3²), 1/3)); the angle is (float)(mosaicity · p)."""
    r1 = 2.0 * rng() - 1.0
    r2 = 2.0 * rng() - 1.0
    r3 = 2.0 * rng() - 1.0
    xyrad = math.sqrt(1.0 - r2 * r2)
    p = f32(math.pow(f32(1.0 - r3 * r3), f32(1.0 / 3.0)))
    return xyrad * math.sin(math.pi * r1), xyrad * math.cos(math.pi * r1), r2, p


def _cap_umat(rot, v1, v2, v3, cos, sin):
    """Rows of the rotation by ``rot`` about (v1, v2, v3), C's term order (numbers or tensors)."""
    t1 = cos(rot)
    t2 = 1.0 - t1
    t3 = v1 * v1
    t6 = t2 * v1
    t7 = t6 * v2
    t8 = sin(rot)
    t9 = t8 * v3
    t11 = t6 * v3
    t12 = t8 * v2
    t15 = v2 * v2
    t19 = t2 * v2 * v3
    t20 = t8 * v1
    t24 = v3 * v3
    return [
        [t1 + t2 * t3, t7 - t9, t11 + t12],
        [t7 + t9, t1 + t2 * t15, t19 - t20],
        [t11 - t12, t19 + t20, t1 + t2 * t24],
    ]


def umat2misset(umat) -> tuple[float, float, float]:
    """Missetting angles (rotx, roty, rotz) in radians of a rotation matrix, as C ``umat2misset``.

    ``umat``: (3, 3) row-major (or 9 values).  The angles reproduce ``umat`` through nanoBragg's
    ``rotate()`` (x, then y, then z).  Includes C's re-orthonormalisation steps and its gimbal-lock
    branch (``uzx**2 >= 1``: rotx = pi, roty = pi/2, rotz = atan2(uxy, -uyy)).
    """
    u = [float(v) for v in np.asarray(umat, dtype=np.float64).reshape(9)]
    uxx, uxy, uxz, uyx, uyy, uyz, uzx, uzy, uzz = u
    sqrt = math.sqrt

    mx = sqrt(uxx * uxx + uxy * uxy + uxz * uxz)
    my = sqrt(uyx * uyx + uyy * uyy + uyz * uyz)
    mz = sqrt(uzx * uzx + uzy * uzy + uzz * uzz)
    if mx > 0:
        uxx /= mx; uxy /= mx; uxz /= mx
    if my > 0:
        uyx /= my; uyy /= my; uyz /= my
    if mz > 0:
        uzx /= mz; uzy /= mz; uzz /= mz

    if mx >= 0 and my <= 0 and mz <= 0:
        uyx, uyy, uyz = 0.0, 1.0, 0.0
        uzx, uzy, uzz = 0.0, 0.0, 1.0
    if mx <= 0 and my >= 0 and mz <= 0:
        uxx, uxy, uxz = 1.0, 0.0, 0.0
        uzx, uzy, uzz = 0.0, 0.0, 1.0
    if mx <= 0 and my <= 0 and mz >= 0:
        uxx, uxy, uxz = 1.0, 0.0, 0.0
        uyx, uyy, uyz = 0.0, 1.0, 0.0

    def _norm(x, y, z):
        m = sqrt(x * x + y * y + z * z)
        if m > 0:
            x /= m; y /= m; z /= m
        return x, y, z

    for _ in range(2):  # C does the cross-product substitution twice
        xcy = _norm(uxy * uyz - uxz * uyy, uxz * uyx - uxx * uyz, uxx * uyy - uxy * uyx)
        ycz = _norm(uyy * uzz - uyz * uzy, uyz * uzx - uyx * uzz, uyx * uzy - uyy * uzx)
        zcx = _norm(uzy * uxz - uzz * uxy, uzz * uxx - uzx * uxz, uzx * uxy - uzy * uxx)
        if mx <= 0:
            uxx, uxy, uxz = ycz
        if my <= 0:
            uyx, uyy, uyz = zcx
        if mz <= 0:
            uzx, uzy, uzz = xcy

    mx = sqrt(uxx * uxx + uxy * uxy + uxz * uxz)
    my = sqrt(uyx * uyx + uyy * uyy + uyz * uyz)
    mz = sqrt(uzx * uzx + uzy * uzy + uzz * uzz)
    if mx > 0:
        uxx /= mx; uxy /= mx; uxz /= mx
    if my > 0:
        uyx /= my; uyy /= my; uyz /= my
    if mz > 0:
        uzx /= mz; uzy /= mz; uzz /= mz

    if uzx * uzx < 1.0:
        rotx = math.atan2(uzy, uzz)
        roty = math.atan2(-uzx, sqrt(uzy * uzy + uzz * uzz))
        rotz = math.atan2(uyx, uxx)
    else:
        rotx = math.atan2(1, 1) * 4
        roty = math.atan2(1, 1) * 2
        rotz = math.atan2(uxy, -uyy)
    return rotx, roty, rotz


def mosaic_umats(mosaic_spread_rad: float, n_domains: int, seed=-12345678,
                 table: Ran1Table | None = None) -> np.ndarray:
    """Mosaic-domain rotation matrices exactly as nanoBragg builds them.

    Every domain, domain 0 included, calls :func:`mosaic_rotation_umat` (3 draws each); domain 0 is
    then overwritten with the identity.

    Parameters
    ----------
    mosaic_spread_rad : float
        Mosaic spread in radians (C ``mosaic_spread``, after its domain logic: 0 when mosaicity is off).
    n_domains : int
        Number of domains (>= 1).
    seed : int or Ran1
        C-internal mosaic seed (default -12345678, i.e. ``-N`` for ``-mosaic_seed N``), or a stream.
    table : Ran1Table, optional
        Shared shuffle table (e.g. the one a random misset already used).

    Returns
    -------
    ndarray, shape (n_domains, 3, 3), float64 — row-major umats, ``a_domain = U @ a``.
    """
    n = int(n_domains)
    if n < 1:
        raise ValueError(f"mosaic_umats: n_domains must be >= 1, got {n_domains!r}")
    rng = _as_stream(seed, table)
    out = np.empty((n, 3, 3), dtype=np.float64)
    for m in range(n):
        out[m] = mosaic_rotation_umat(mosaic_spread_rad, rng)
    out[0] = np.eye(3)
    return out


def mosaic_umats_tensor(spread_rad, n_domains: int, seed, *, dtype, device):
    """``mosaic_umats`` as a (n, 3, 3) tensor; ``spread_rad`` may be a 0-d tensor with a derivative.

    The values are exactly ``mosaic_umats``' (C's float32 angle, libm's sin/cos); the derivative
    with respect to the spread is that of the same rotations at the unrounded angle spread·p
    (value + (surrogate − surrogate.detach())), so forward values never change."""
    import torch
    exact = torch.as_tensor(mosaic_umats(float(spread_rad.detach()) if isinstance(spread_rad, torch.Tensor)
                                         else spread_rad, n_domains, seed), dtype=dtype, device=device)
    if not isinstance(spread_rad, torch.Tensor):
        return exact
    rng = _as_stream(seed, None)
    rows = []
    for m in range(int(n_domains)):
        v1, v2, v3, p = _cap_draw(rng)
        u = _cap_umat(spread_rad.to(dtype) * p, v1, v2, v3, torch.cos, torch.sin)
        rows.append(torch.stack([torch.stack([torch.as_tensor(x, dtype=dtype, device=device)
                                              for x in r]) for r in u]))
    sur = torch.stack(rows)
    sur = torch.cat((torch.eye(3, dtype=dtype, device=device)[None], sur[1:]))
    return exact + (sur - sur.detach())


def random_misset(misset_seed, table: Ran1Table | None = None) -> tuple[float, float, float]:
    """``-misset random``: ``umat2misset(mosaic_rotation_umat(90.0, misset_seed))``, radians.

    ``misset_seed`` is the C-internal value (``-N`` for ``-misset_seed N``; C's default is the
    noise seed's clock value ``-time()``) or a :class:`Ran1` stream.  The angles are what nanoBragg
    prints (``random orientation misset angles``, in degrees) and then applies with ``rotate()``.
    """
    rng = _as_stream(misset_seed, table)
    return umat2misset(mosaic_rotation_umat(90.0, rng))
