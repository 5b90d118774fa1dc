"""Compiled (numba) kernels of the C-exact noise image: ``ran1``, ``gammln``, ``gaussdev``, ``poidev``.

The same arithmetic as the reference implementation in :mod:`nbsim.rng` (``Ran1``, ``gammln``,
``Deviates``), statement for statement: every value C keeps in a ``float`` is rounded to float32
with :func:`_f32` exactly where :mod:`nbsim.rng` calls ``f32``, everything else is double, and the
operations run in the same order (no fastmath, so LLVM neither reorders nor contracts them).  The
transcendental functions (``exp``, ``log``, ``tan``) are the C library's, as in CPython's ``math``.

``ran1`` is split in its two independent parts, as :meth:`nbsim.rng.Ran1.draw` does: the Lehmer
sequence ``idum <- IA*idum mod IM`` does not depend on how the draws are consumed, so it is
generated ahead in blocks of ``BLOCK`` values by ``LANES`` interleaved jump-ahead chains
(``x[i] = IA**LANES * x[i-LANES] mod IM``, exact in int64, the same numbers as Schrage's method);
only the Bays-Durham shuffle runs draw by draw.

Importing this module imports numba; :mod:`nbsim.noise` does so lazily and falls back to the pure
Python path when numba is missing.  ``cache=True`` keeps the machine code on disk (numba's cache
next to this file, or its user-wide cache directory when that is not writable), so only the first
process after an install or a change of this file compiles.

State shared with :mod:`nbsim.noise`
------------------------------------
``st`` : int64 (3,)  ``[idum, iy, draws]`` -- the stream's C ``long`` seed, the shared table's ``iy``
          and a counter of draws made (added to ``Ran1.ndraws``).
``iv`` : int64 (32,) the shared shuffle table.
Both are updated in place; the caller copies them back into the ``Ran1``/``Ran1Table`` objects.
The caller passes only *regular* states (:func:`nbsim.noise._kernel_state`): ``-IM < idum < IM``,
``0 <= iy < IM``, and, unless the first draw reloads the table (``idum <= 0`` or ``iy == 0``), every
``iv`` in ``[1, IM)``.  From a regular state ``idum`` and ``iy`` stay in ``[1, IM)`` forever, so no
later draw reloads the table (C checks on every draw; the check never fires).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["noise_counts", "poisson_deviates_into"]

# the ran1 constants of nbsim.rng (Numerical Recipes, as #defined in nanoBragg.c); numba freezes
# module globals into the compiled (and cached) code
from nbsim.rng import AM, IA, IM, IQ, IR, NTAB, RNMX as _RNMX  # noqa: E402

NDIV_SHIFT = 26              # NDIV = 1 + (IM-1)/NTAB = 2**26; iy/NDIV == iy >> 26 for 0 <= iy < IM
RNMX = _RNMX
RNMX_F32 = float(np.float32(RNMX))
PI = math.pi
GAMMLN_COF = (76.18009172947146, -86.50532032941677, 24.01409824083091,
              -1.231739572450155, 0.1208650973866179e-2, -0.5395239384953e-5)
C0, C1, C2, C3, C4, C5 = GAMMLN_COF
LANES = 8                    # independent jump-ahead chains of the Lehmer block
BLOCK = 512                  # Lehmer values generated ahead (a multiple of LANES)


@njit(cache=True, inline="always")
def _f32(x):
    """C ``(float)`` cast of a double, returned as a double holding the float32 value."""
    return np.float64(np.float32(x))


@njit(cache=True, inline="always")
def _schrage(idum):
    """``idum = IA*idum mod IM`` as C writes it (Schrage's method), for ``idum >= 1`` (where C's
    truncating division equals ``//``)."""
    k = idum // IQ
    idum = IA * (idum - k * IQ) - IR * k
    if idum < 0:
        idum += IM
    return idum


@njit(cache=True)
def _load_table(idum, iv):
    """The table (re)load of C ``ran1`` for a seed ``idum``; returns the new ``(idum, iy)``."""
    idum = -idum
    if idum < 1:
        idum = 1
    for j in range(NTAB + 7, -1, -1):
        idum = _schrage(idum)
        if j < NTAB:
            iv[j] = idum
    return idum, iv[0]


@njit(cache=True)
def _lehmer_stream(idum):
    """Work arrays of the block generator: ``xs`` (BLOCK,) with ``xs[-1] = idum`` (the next draw
    refills it) and ``mult`` (LANES,) = ``IA**k mod IM`` for k = 1..LANES."""
    xs = np.empty(BLOCK, dtype=np.int64)
    xs[BLOCK - 1] = idum
    mult = np.empty(LANES, dtype=np.int64)
    m = 1
    for k in range(LANES):
        m = (m * IA) % IM
        mult[k] = m
    return xs, mult


@njit(cache=True)
def _refill(xs, mult):
    """Next BLOCK Lehmer values after ``xs[-1]`` (products < 2**62: exact in int64); returns the new
    read position 0."""
    last = xs[BLOCK - 1]
    for k in range(LANES):
        xs[k] = (last * mult[k]) % IM
    step = mult[LANES - 1]
    for i in range(LANES, BLOCK):
        xs[i] = (xs[i - LANES] * step) % IM
    return 0


@njit(cache=True)
def _ran1(p, iy, xs, iv):
    """One ``ran1`` draw from a regular state: ``(u, p + 1, iy)`` with u the float32 value in (0, 1) as
    a double.  ``p`` (position in the Lehmer block ``xs``, < BLOCK) and ``iy`` are carried by the
    caller, the table ``iv`` is updated in place.

    Every call site reads ``if p == BLOCK: p = _refill(xs, mult)`` first: with that branch (a call
    taking arrays) inside this function, numba's reference counting stays in the hot loop and a draw
    costs several times more."""
    idum = xs[p]
    j = iy >> NDIV_SHIFT
    iy = iv[j]
    iv[j] = idum
    temp = _f32(AM * iy)
    if temp > RNMX:
        temp = RNMX_F32
    return temp, p + 1, iy


@njit(cache=True)
def _gammln(xx):
    """ln Gamma as C ``float gammln(float)`` (float32 in, double inside, float32 out)."""
    x = _f32(xx)
    y = x
    tmp = x + 5.5
    tmp -= (x + 0.5) * math.log(tmp)
    ser = 1.000000000190015
    y += 1.0
    ser += C0 / y
    y += 1.0
    ser += C1 / y
    y += 1.0
    ser += C2 / y
    y += 1.0
    ser += C3 / y
    y += 1.0
    ser += C4 / y
    y += 1.0
    ser += C5 / y
    return _f32(-tmp + math.log(2.5066282746310005 * ser / x))


@njit(cache=True)
def _gaussdev(p, iy, xs, iv, mult, ps):
    """Box-Muller polar deviate with C's static spare (``ps[4]`` = iset, ``ps[5]`` = gset).
    Returns ``(value, p, iy, draws)``."""
    n = 0
    if ps[4] == 0.0:
        while True:
            if p == BLOCK:
                p = _refill(xs, mult)
            u, p, iy = _ran1(p, iy, xs, iv)
            v1 = _f32(2.0 * u - 1.0)
            if p == BLOCK:
                p = _refill(xs, mult)
            u, p, iy = _ran1(p, iy, xs, iv)
            v2 = _f32(2.0 * u - 1.0)
            n += 2
            rsq = _f32(_f32(v1 * v1) + _f32(v2 * v2))
            if not (rsq >= 1.0 or rsq == 0):
                break
        fac = _f32(math.sqrt(-2.0 * math.log(rsq) / rsq))
        ps[5] = _f32(v1 * fac)
        ps[4] = 1.0
        return _f32(v2 * fac), p, iy, n
    ps[4] = 0.0
    return ps[5], p, iy, n


@njit(cache=True)
def _poidev_large(xm, p, iy, xs, iv, mult, ps):
    """poidev for xm >= 12 (and NaN): Lorentzian rejection; ``(em, p, iy, draws)``."""
    n = 0
    if xm != ps[0]:                                # also NaN (C: never equal)
        ps[0] = xm
        ps[2] = _f32(math.sqrt(2.0 * xm))
        ps[3] = _f32(math.log(xm))
        ps[1] = _f32(_f32(xm * ps[3]) - _gammln(_f32(xm + 1.0)))
    sq = ps[2]
    alxm = ps[3]
    g = ps[1]
    while True:
        while True:
            if p == BLOCK:
                p = _refill(xs, mult)
            u, p, iy = _ran1(p, iy, xs, iv)
            n += 1
            y = _f32(math.tan(PI * u))
            em = _f32(_f32(sq * y) + xm)
            if not (em < 0.0):
                break
        em = np.floor(em)
        t = _f32(0.9 * (1.0 + _f32(y * y))
                 * math.exp(_f32(_f32(_f32(em * alxm) - _gammln(_f32(em + 1.0))) - g)))
        if p == BLOCK:
            p = _refill(xs, mult)
        u, p, iy = _ran1(p, iy, xs, iv)
        n += 1
        if not (u > t):
            break
    return em, p, iy, n


@njit(cache=True)
def _poidev_rare(xm, p, iy, xs, iv, mult, ps):
    """poidev's two rare branches: xm > 1e6 (``xm + sqrt(xm)*gaussdev``) and xm >= 12 or NaN
    (Lorentzian rejection).  ``(deviate, p, iy, draws)``."""
    if xm > 1.0e6:
        d, p, iy, n = _gaussdev(p, iy, xs, iv, mult, ps)
        return _f32(xm + math.sqrt(xm) * d), p, iy, n
    return _poidev_large(xm, p, iy, xs, iv, mult, ps)


@njit(cache=True)
def _fresh_statics():
    """poidev's and gaussdev's C statics at program start, ``[oldm, g, sq, alxm, iset, gset]`` =
    ``[-1, 0, 0, 0, 0, 0]``."""
    ps = np.zeros(6, dtype=np.float64)
    ps[0] = -1.0
    return ps


@njit(cache=True)
def _begin(st, iv, n):
    """Stream work state ``(p, iy, xs, mult)`` from ``st``/``iv``.  C reloads the table on the first draw
    when ``idum <= 0`` or ``iy == 0``; every pixel draws at least once, so with ``n > 0`` pixels the
    reload is done here, up front (with none, nothing is drawn and nothing changes)."""
    idum, iy = st[0], st[1]
    if n > 0 and (idum <= 0 or iy == 0):
        idum, iy = _load_table(idum, iv)
    xs, mult = _lehmer_stream(idum)
    return BLOCK, iy, xs, mult


@njit(cache=True)
def _end(st, p, iy, xs, draws):
    """Write the final ``idum`` (the last Lehmer value drawn), ``iy`` and the draw count into ``st``."""
    st[0] = xs[p - 1]
    st[1] = iy
    st[2] += draws


@njit(cache=True)
def _noise_loop(vals, st, iv, dev, adc, counts):
    """The one pixel loop: ``poidev(vals[i])`` in order with one set of fresh C statics; writes the
    deviates to ``dev`` (float64 (n,)) when ``dev`` has n entries, and the noise counts to ``counts``
    (uint16 (n,)) when ``counts`` has n entries (see :func:`noise_counts`).  Returns
    ``(photons, overloads)``.

    The small-mean branch of ``poidev`` (xm < 12: nearly every pixel) is written out here with its
    statics in local variables; the other branches are calls that get and return the statics in
    ``ps``, as the C statics they are."""
    n = vals.shape[0]
    want_dev = dev.shape[0] == n
    want_counts = counts.shape[0] == n
    ps = _fresh_statics()
    oldm = ps[0]
    g = ps[1]
    p, iy, xs, mult = _begin(st, iv, n)
    draws = 0
    photons = 0.0
    overloads = 0
    for i in range(n):
        xm = np.float64(vals[i])                 # float32 value (C: float parameter)
        if xm < 12.0:
            if xm != oldm:
                oldm = xm
                g = _f32(math.exp(-xm))
            em = 0.0
            if p == BLOCK:
                p = _refill(xs, mult)
            t, p, iy = _ran1(p, iy, xs, iv)
            draws += 1
            while t > g:
                em += 1.0
                if p == BLOCK:
                    p = _refill(xs, mult)
                u, p, iy = _ran1(p, iy, xs, iv)
                draws += 1
                t = _f32(t * u)
        else:
            ps[0] = oldm
            ps[1] = g
            em, p, iy, k = _poidev_rare(xm, p, iy, xs, iv, mult, ps)
            draws += k
            oldm = ps[0]
            g = ps[1]
        if want_dev:
            dev[i] = em
        if want_counts:
            photons += em
            test = em + adc
            if test > 65535.0:
                test = 65535.0
                overloads += 1
            t = np.trunc(test)
            if t > -2147483649.0 and t < 2147483648.0:
                counts[i] = np.uint16(np.int64(t) & 0xFFFF)
            else:
                counts[i] = 0
    _end(st, p, iy, xs, draws)
    return photons, overloads


def poisson_deviates_into(vals, st, iv, out):
    """``out[i] = poidev(vals[i])`` in order, one set of fresh statics.  vals: float32 (n,); out: float64 (n,)."""
    _noise_loop(vals, st, iv, out, 0.0, np.empty(0, dtype=np.uint16))


def noise_counts(vals, adc, st, iv, counts):
    """nanoBragg's noise loop over the ROI pixels ``vals`` (float32 (n,), raster order).

    ``counts[i] = (unsigned short) min(poidev(vals[i]) + adc, 65535)`` (uint16 (n,), x86-64 conversion:
    truncate to int32, NaN/out of range -> INT_MIN, keep the low 16 bits).  Returns
    ``(photons, overloads)``: C's sequential double sum of the deviates and the clipped-pixel count.
    """
    photons, overloads = _noise_loop(vals, st, iv, np.empty(0, dtype=np.float64), float(adc), counts)
    return float(photons), int(overloads)
