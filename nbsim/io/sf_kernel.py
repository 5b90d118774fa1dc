"""Compiled (numba) direct summation of structure factors over atoms x reflections (``-model``).

The arithmetic of gemmi's ``StructureFactorCalculator::calculate_sf_from_model`` (``sfcalc.hpp``),
for all reflections at once instead of one Python call per reflection:

    F(h) = sum_atoms occ * f_el(s) * sum_images exp(2 pi i h.x_image) * DW

* ``DW`` (isotropic B): gemmi computes it in float32 -- ``expf(-(stol2_f32 * B_f32))`` -- and so does
  this kernel (numba's ``math.exp`` of a float32 is the C library's ``expf``, as in gemmi), so the
  factor is the same float, bit for bit. With an anisotropic U, per image
  ``exp(-2 pi^2 (h R) U* (h R))``, with ``U* = F U F^T`` (``F`` the fractionalisation matrix), in double.
* The phase: ``exp(2 pi i (h x + k y + l z))`` as the product of three factors
  ``exp(2 pi i h x) exp(2 pi i k y) exp(2 pi i l z)``, each computed once per atom image and index
  (tables over the index range), which replaces cos/sin per (reflection, atom image) by two complex
  products; it differs from gemmi's single cos/sin by float rounding (~1e-15 relative per term).
* ``f_el(s)`` is given per reflection and element (gemmi's own IT92 evaluation, see
  :mod:`nbsim.io.structure_factors`), and ``fdp_el`` (f'') per element: the kernel returns the sum
  with f and the sum with f'' separately, A(h) and B(h); then F(h) = A + i B and F(-h) = conj(A) + i conj(B).

Atom images are processed in blocks of ``BLOCK`` (the phase tables of one block:
``3 x (2 hmax + 1) x BLOCK`` complex numbers), so memory stays bounded for any model size.
``cache=True`` keeps the machine code on disk (numba's cache), as :mod:`nbsim.noise_numba` does.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["direct_sum", "BLOCK"]

#: atom images per block of phase tables
BLOCK = 4096


@njit(cache=True)
def _phase_tables(pos, hmax, out):
    """exp(2 pi i m x) for m = -hmax..hmax of every coordinate: pos float64 (na, 3) fractional,
    out complex128 (3, 2 hmax + 1, na) filled."""
    two_pi = 2.0 * math.pi
    for c in range(3):
        for m in range(-hmax, hmax + 1):
            for a in range(pos.shape[0]):
                arg = two_pi * (m * pos[a, c])
                out[c, m + hmax, a] = complex(math.cos(arg), math.sin(arg))


@njit(cache=True)
def _sum_block(hkl, stol2, f_el, fdp_el, tab, hmax, img_atom, img_rot, el, occ, b_iso, aniso, ustar, A, B):
    """Add the contributions of one block of atom images to A and B (complex128 (n,))."""
    n = hkl.shape[0]
    ni = img_atom.shape[0]
    two_pi2 = 2.0 * math.pi * math.pi
    for r in range(n):
        h0, h1, h2 = hkl[r, 0], hkl[r, 1], hkl[r, 2]
        s = stol2[r]
        a_sum = 0j
        b_sum = 0j
        i = 0
        while i < ni:
            atom = img_atom[i]
            e = el[atom]
            acc = 0j
            j = i
            if aniso[atom]:
                u = ustar[atom]
                while j < ni and img_atom[j] == atom:
                    R = img_rot[j]
                    # h R: the index as the image sees it (gemmi: image.mat.left_multiply(h))
                    g0 = h0 * R[0, 0] + h1 * R[1, 0] + h2 * R[2, 0]
                    g1 = h0 * R[0, 1] + h1 * R[1, 1] + h2 * R[2, 1]
                    g2 = h0 * R[0, 2] + h1 * R[1, 2] + h2 * R[2, 2]
                    rur = (g0 * g0 * u[0] + g1 * g1 * u[1] + g2 * g2 * u[2]
                           + 2.0 * (g0 * g1 * u[3] + g0 * g2 * u[4] + g1 * g2 * u[5]))
                    ph = tab[0, h0 + hmax, j] * tab[1, h1 + hmax, j] * tab[2, h2 + hmax, j]
                    acc += ph * math.exp(-two_pi2 * rur)
                    j += 1
                w = occ[atom]
            else:
                while j < ni and img_atom[j] == atom:
                    acc += tab[0, h0 + hmax, j] * tab[1, h1 + hmax, j] * tab[2, h2 + hmax, j]
                    j += 1
                dw = math.exp(-(s * b_iso[atom]))           # float32, as gemmi: expf of a float product
                w = occ[atom] * np.float64(dw)
            a_sum += (w * f_el[r, e]) * acc
            b_sum += (w * fdp_el[e]) * acc
            i = j
        A[r] += a_sum
        B[r] += b_sum


def direct_sum(hkl, stol2_f32, f_el, fdp_el, img_pos, img_atom, img_rot, el, occ, b_iso_f32, aniso, ustar):
    """A(h) = sum occ f DW sum_images phase, and B(h) the same with f'' (see the module docstring).

    hkl int64 (n, 3); stol2_f32 float32 (n,) (sin theta / lambda)^2 rounded to float32 as gemmi does;
    f_el float64 (n, ne) form factor (+ f') of each element at each reflection; fdp_el float64 (ne,);
    img_pos float64 (m, 3) fractional positions of all atom images, grouped by atom (the atom itself
    first); img_atom int64 (m,) their atom; img_rot float64 (m, 3, 3) the image's rotation (identity
    for the atom itself); el int64 (na,) element index; occ float64 (na,); b_iso_f32 float32 (na,) A^2;
    aniso bool (na,); ustar float64 (na, 6) U* = F U F^T as (11, 22, 33, 12, 13, 23).
    Returns (A, B) complex128 (n,)."""
    hkl = np.ascontiguousarray(hkl, dtype=np.int64)
    n = len(hkl)
    A = np.zeros(n, np.complex128)
    B = np.zeros(n, np.complex128)
    if n == 0 or len(img_atom) == 0:
        return A, B
    hmax = int(np.abs(hkl).max())
    m = len(img_atom)
    start = 0
    while start < m:
        stop = min(m, start + BLOCK)
        # never split an atom's images across blocks
        while stop < m and img_atom[stop] == img_atom[stop - 1]:
            stop += 1
        tab = np.empty((3, 2 * hmax + 1, stop - start), np.complex128)
        _phase_tables(np.ascontiguousarray(img_pos[start:stop]), hmax, tab)
        _sum_block(hkl, np.asarray(stol2_f32, np.float32), np.ascontiguousarray(f_el, np.float64),
                   np.asarray(fdp_el, np.float64), tab, hmax, np.ascontiguousarray(img_atom[start:stop]),
                   np.ascontiguousarray(img_rot[start:stop], np.float64), np.asarray(el, np.int64),
                   np.asarray(occ, np.float64), np.asarray(b_iso_f32, np.float32), np.asarray(aniso, np.bool_),
                   np.ascontiguousarray(ustar, np.float64), A, B)
        start = stop
    return A, B
