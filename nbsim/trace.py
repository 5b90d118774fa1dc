"""Per-pixel TRACE lines in the format of the instrumented nanoBragg C build (``-trace_pixel S F``).

``trace_lines(model, (slow, fast))`` returns the lines the instrumented C program prints for one pixel
(names, order, units, repetition and ``%.15g`` formatting as in ``shared/NANOBRAGG_NOTES.md`` §5), so
that ``python -m pipeline.trace_diff`` can pair them with a C trace line by line.

Every pixel-level value comes from the tensors the image itself is made of: the pixel is evaluated by
``nbsim.engine.render`` on a one-pixel index with a ``trace`` dict; nothing here recomputes physics
except reading values out of those tensors (the stage outputs ``render`` hands to its ``trace`` dict,
among them the per-axis F_latt factors).

Lines (C names; quirks of the instrumented build are reproduced, not fixed):

* detector block (nice-to-have, from ``model`` / ``model.report`` and, when given, the spec):
  ``DETECTOR_FAST_AXIS/SLOW_AXIS/NORMAL_AXIS``, for BEAM pivot the ``TRACE_C:name=...`` geometry lines
  (``detector_convention=MOSFLM`` and ``initial_*`` are hard-coded in C, ``beam_center_m`` is
  Xbeam[m]/1000, the ``*_after_rotz`` vectors are the final ones), then ``DETECTOR_PIX0_VECTOR``.
* ``TRACE_CONFIG: tracing pixel (spixel=S, fpixel=F)``.
* for every layer × sub-pixel (C loop order), source 0 only: ``pix0_vector_meters fdet_vec sdet_vec
  pixel_pos_meters R_distance_meters omega_pixel_sr`` (the cached first-sub-pixel value unless
  -oversample_omega) ``close_distance_meters obliquity_factor diffracted_vec incident_vec
  lambda_meters lambda_angstroms scattering_vec_A_inv`` (in m⁻¹ despite the name); then, unless
  source 0 was cut by dmin, for φ step 0 / mosaic domain 0: ``rot_a/b/c_angstroms`` (crystal after
  φ and mosaic, Å), ``rot_a/b/c_star_A_inv`` (the *setup* reciprocal vectors), ``hkl_frac``,
  ``hkl_rounded`` (%d), ``F_latt_a/b/c F_latt`` (SQUARE shape only) and ``F_cell`` (not printed when
  F_latt == 0 without background, as C ``continue``s before it).
* once: ``I_before_scaling r_e_meters r_e_sqr fluence_photons_per_m2 steps oversample_thick
  oversample_polar oversample_omega capture_fraction polar omega_pixel cos_2theta`` (last source and
  last sub-pixel) ``I_pixel_final floatimage_accumulated`` (float32, the float image value).

Known textual difference: where C skips the φ rotation (φ == 0) its ``rot_*_angstroms`` can print
``-0``; the engine's lattice is rotated by 0 (Rodrigues), which gives ``+0``. The values are equal, so
``trace_diff`` (numeric comparison) reports them as agreeing.

Interpolation state: with tricubic interpolation (quirk tricubic_global_off), C switches interpolation off
globally at the first out-of-range lookup of the run, so the traced pixel's F_cell depends on every
earlier pixel. By default (``interp_on="exact"``) the earlier pixels are rendered first, in chunks,
stopping at the first out-of-range lookup (usually within the first rows; at worst one image); only
then is the state exact. ``interp_on="initial"`` skips that and uses the run's initial state (cheap,
but wrong for pixels after an out-of-range lookup); a bool sets the state explicitly. Without a table,
without interpolation or with tricubic_global_off fixed nothing is rendered.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from nbsim.units import deg_to_rad

__all__ = ["trace_lines", "interp_state_before", "fmt", "PIXEL_NAMES_ALWAYS", "PIXEL_NAMES_CONDITIONAL"]

#: pixel-level names (``TRACE_C: name ...``) that the full instrumented (-DTRACING) C build, and
#: ``trace_lines``, print for every traced pixel inside the ROI and mask, whatever the case
#: (``pipeline.trace_diff`` uses them to recognise a partly instrumented build)
PIXEL_NAMES_ALWAYS = (
    "pix0_vector_meters", "fdet_vec", "sdet_vec", "pixel_pos_meters", "R_distance_meters",
    "omega_pixel_sr", "close_distance_meters", "obliquity_factor", "diffracted_vec", "incident_vec",
    "lambda_meters", "lambda_angstroms", "scattering_vec_A_inv",
    "I_before_scaling", "r_e_meters", "r_e_sqr", "fluence_photons_per_m2", "steps", "oversample_thick",
    "oversample_polar", "oversample_omega", "capture_fraction", "polar", "omega_pixel", "cos_2theta",
    "I_pixel_final", "floatimage_accumulated",
)
#: names printed only in some cases: not when source 0 is cut by dmin, F_latt_* only for the SQUARE
#: shape, F_cell not when F_latt == 0 without background
PIXEL_NAMES_CONDITIONAL = (
    "rot_a_angstroms", "rot_b_angstroms", "rot_c_angstroms", "rot_a_star_A_inv", "rot_b_star_A_inv",
    "rot_c_star_A_inv", "hkl_frac", "hkl_rounded", "F_latt_a", "F_latt_b", "F_latt_c", "F_latt", "F_cell",
)


def fmt(x) -> str:
    """C ``%.15g`` of a double (Python's %-formatting is correctly rounded like glibc)."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return "%.15g" % x


def _vals(v) -> str:
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif isinstance(v, (list, tuple, np.ndarray)):
        v = [float(x) for x in np.asarray(v, dtype=float).reshape(-1)]
    else:
        v = [float(v)]
    return " ".join(fmt(x) for x in v)


def _f(t) -> float:
    return float(t.detach().to("cpu", torch.float64)) if isinstance(t, torch.Tensor) else float(t)


def _dot(a, b) -> float:
    """C ``dot_product`` order: x*x + y*y + z*z, in doubles."""
    a = [_f(x) for x in a]
    b = [_f(x) for x in b]
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _simulated_indices(model) -> torch.Tensor:
    """Flat indices of the simulated pixels in raster (C loop) order, as ``simulate_image``."""
    from nbsim.engine import simulated_indices
    idx = simulated_indices(model)
    return torch.arange(model.fpixels * model.spixels, device=model.device) if idx is None else idx


def interp_state_before(model, pixel, chunk_pixels: Optional[int] = None,
                        budget_bytes: float = 2.5e8) -> bool:
    """C's global ``interpolate`` flag when the loop reaches ``pixel`` (slow, fast).

    Renders every simulated pixel before it (in chunks), exactly as ``simulate_image`` does.
    """
    from nbsim.engine import Chunks, default_chunk_pixels, render_reference_chunks
    state = torch.tensor(bool(model.interpolate), device=model.device)
    if not (model.table is not None and model.interpolate
            and not model.quirks.fixed("tricubic_global_off")):
        return bool(state)
    s, f = int(pixel[0]), int(pixel[1])
    flat = s * model.fpixels + f
    idx_all = _simulated_indices(model)
    before = idx_all[idx_all < flat]
    if before.shape[0] == 0:
        return bool(state)
    chunks = Chunks(model, chunk_pixels or default_chunk_pixels(model, budget_bytes), before)
    for _ in render_reference_chunks(model, chunks):
        if not bool(chunks.interp_on):
            break
    return bool(chunks.interp_on)


# ---------------------------------------------------------------------------------------------
# detector block (nice-to-have)
# ---------------------------------------------------------------------------------------------

def _rot_mats(rx, ry, rz):
    cx, sx = math.cos(rx), math.sin(rx)
    cy, sy = math.cos(ry), math.sin(ry)
    cz, sz = math.cos(rz), math.sin(rz)
    Rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]]
    Ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]]
    Rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]]

    def mul(A, B):          # C: sum starts at 0 (turns -0 into +0), k = 0, 1, 2
        return [[0.0 + A[i][0] * B[0][j] + A[i][1] * B[1][j] + A[i][2] * B[2][j] for j in range(3)]
                for i in range(3)]
    return Rx, Ry, Rz, mul(Rz, mul(Ry, Rx))


def _mat(M) -> str:
    return "[" + "; ".join(" ".join(fmt(x) for x in row) for row in M) + "]"


def _detector_lines(model, spec=None) -> list:
    rep = model.report
    out = [f"DETECTOR_FAST_AXIS {_vals(model.fdet)}",
           f"DETECTOR_SLOW_AXIS {_vals(model.sdet)}",
           f"DETECTOR_NORMAL_AXIS {_vals(model.odet)}"]
    if rep is None or rep.pivot == "beam":
        d = spec.detector if spec is not None else None
        px = _f(model.pixel_m)
        conv = rep.convention if rep is not None else "mosflm"
        angles = None
        if d is not None:
            angles = tuple(deg_to_rad(x) for x in (d.rotx_deg, d.roty_deg, d.rotz_deg, d.twotheta_deg))
        nan = float("nan")
        xbeam = (rep.xbeam_mm if rep is not None else nan) * 1e-3
        ybeam = (rep.ybeam_mm if rep is not None else nan) * 1e-3
        detsize_s = (rep.detsize_s_mm if rep is not None else nan) * 1e-3
        if conv == "mosflm":
            Fbeam, Sbeam = ybeam + 0.5 * px, xbeam + 0.5 * px
        elif conv == "denzo":
            Fbeam, Sbeam = ybeam, xbeam
        elif conv == "adxv":
            Fbeam, Sbeam = xbeam, detsize_s - ybeam
        else:
            Fbeam, Sbeam = xbeam, ybeam
        fdet = [_f(x) for x in model.fdet]
        sdet = [_f(x) for x in model.sdet]
        beam = [_f(x) for x in model.beam]
        pix0 = [_f(x) for x in model.pix0]
        if d is not None:
            ratio = rep.ratio if rep is not None else 1.0
            close = d.close_distance_mm * 1e-3 if d.close_distance_mm is not None else \
                abs(ratio * d.distance_mm * 1e-3)
            distance = close / ratio
        else:   # pix0 = -Fbeam f - Sbeam s + distance beam
            distance = sum((pix0[i] + Fbeam * fdet[i] + Sbeam * sdet[i]) * beam[i] for i in range(3))
        out.append("TRACE_C:detector_convention=MOSFLM")
        if angles is not None:
            out.append("TRACE_C:angles_rad=rotx:%s roty:%s rotz:%s twotheta:%s"
                       % tuple(fmt(a) for a in angles))
        out.append("TRACE_C:beam_center_m=X:%s Y:%s pixel_mm:%s"
                   % (fmt(xbeam / 1000.0), fmt(ybeam / 1000.0), fmt(px * 1000.0)))
        out += ["TRACE_C:initial_fdet=0 0 1", "TRACE_C:initial_sdet=0 -1 0",
                "TRACE_C:initial_odet=1 0 0"]
        if angles is not None:
            Rx, Ry, Rz, R = _rot_mats(*angles[:3])
            out += [f"TRACE_C:Rx={_mat(Rx)}", f"TRACE_C:Ry={_mat(Ry)}", f"TRACE_C:Rz={_mat(Rz)}",
                    f"TRACE_C:R_total={_mat(R)}"]
        final = (("fdet", model.fdet), ("sdet", model.sdet), ("odet", model.odet))
        out += [f"TRACE_C:{n}_after_rotz={_vals(v)}" for n, v in final]
        if rep is not None:
            out.append(f"TRACE_C:twotheta_axis={_vals(rep.twotheta_axis)}")
        out += [f"TRACE_C:{n}_after_twotheta={_vals(v)}" for n, v in final]
        out.append("TRACE_C:convention_mapping=Fbeam←Ybeam_mm(+0.5px),Sbeam←Xbeam_mm(+0.5px),"
                   "beam_vec=[1 0 0]")
        out += [f"TRACE_C:Fbeam_m={fmt(Fbeam)}", f"TRACE_C:Sbeam_m={fmt(Sbeam)}",
                f"TRACE_C:distance_m={fmt(distance)}"]
        out.append("TRACE_C:term_fast=" + " ".join(fmt(-Fbeam * x) for x in fdet))
        out.append("TRACE_C:term_slow=" + " ".join(fmt(-Sbeam * x) for x in sdet))
        out.append("TRACE_C:term_beam=" + " ".join(fmt(distance * x) for x in beam))
        out.append(f"TRACE_C:pix0_vector={_vals(model.pix0)}")
    out.append(f"DETECTOR_PIX0_VECTOR {_vals(model.pix0)}")
    return out


# ---------------------------------------------------------------------------------------------
# pixel block
# ---------------------------------------------------------------------------------------------

def trace_lines(model, pixel: Sequence[int], *, spec=None, interp_on="exact",
                detector: bool = True) -> list:
    """TRACE lines of pixel ``(slow, fast)`` as the instrumented nanoBragg C build prints them.

    spec: the ExperimentSpec the model was built from (optional; completes the detector block).
    interp_on: C's global interpolation flag when the pixel is reached: "exact" (default: render the
    earlier pixels to find it), "initial" or None (the run's initial state), or a bool.
    detector: include the detector-level block before ``TRACE_CONFIG``.
    """
    from nbsim.engine import _first_along, render

    m = model
    s_pix, f_pix = int(pixel[0]), int(pixel[1])
    out = _detector_lines(m, spec) if detector else []
    out.append(f"TRACE_CONFIG: tracing pixel (spixel={s_pix}, fpixel={f_pix})")
    if not (0 <= s_pix < m.spixels and 0 <= f_pix < m.fpixels):
        return out                      # C never reaches the pixel: no pixel-level lines
    flat = s_pix * m.fpixels + f_pix
    if m.mask is not None and not bool(m.mask.reshape(-1)[flat]):
        return out                      # outside the ROI or masked: C `continue`s before any trace

    # interpolation state and the run's first loop iteration (φ carry-over quirk)
    if interp_on == "exact":
        state = interp_state_before(m, pixel)
    elif interp_on is None or interp_on == "initial":
        state = bool(m.interpolate)
    elif isinstance(interp_on, str):
        raise ValueError(f"interp_on must be 'exact', 'initial', None or a bool, got {interp_on!r}")
    else:
        state = bool(interp_on)
    state = torch.tensor(state, device=m.device)
    first_local = None
    first = m.first_iteration
    if first is not None:
        idx_all = _simulated_indices(m)
        if int(idx_all[first[0]]) == flat:
            first_local = (0,) + tuple(first[1:])

    idx = torch.tensor([flat], device=m.device)
    tr = {}
    with torch.no_grad():
        val, _ = render(m, idx, state, first_local=first_local, trace=tr)

    T, O = m.thicksteps, m.oversample ** 2
    pos, d, R = tr["pos"][0], tr["d"][0], tr["R"][0]                 # (T,O,3), (T,O,3), (T,O)
    omega, capture, polar = tr["omega"][0], tr["capture"][0], tr["polar"][0]
    scat = tr["scat"][0]                                             # (T,O,S,3)
    hkl, hkl0 = tr["hkl"][0], tr["hkl0"][0]                          # (T,O,S,F,M,3)
    F_latt, F_cell = tr["F_latt"][0], tr["F_cell"][0]                # (T,O,S,F,M)
    executed = tr.get("executed")
    executed = None if executed is None else executed[0]            # (T,O,S)
    live = tr.get("live")
    live = None if live is None else live[0]                         # (T,O,S,F,M)
    inc, lam = m.incident, m.wavelength_m
    close = m.close_distance_m
    pix0_l = f"TRACE_C: pix0_vector_meters {_vals(m.pix0)}"
    fdet_l = f"TRACE_C: fdet_vec {_vals(m.fdet)}"
    sdet_l = f"TRACE_C: sdet_vec {_vals(m.sdet)}"
    stars = [f"TRACE_C: rot_{n}_star_A_inv {_vals(v)}" for n, v in zip("abc", m.recip)]
    background = m.I_bg != 0.0 or m.bg_physical != 0.0

    for t in range(T):
        for o in range(O):
            om = omega[t, o] if m.oversample_omega else omega[0, 0]
            out += [pix0_l, fdet_l, sdet_l,
                    f"TRACE_C: pixel_pos_meters {_vals(pos[t, o])}",
                    f"TRACE_C: R_distance_meters {_vals(R[t, o])}",
                    f"TRACE_C: omega_pixel_sr {_vals(om)}",
                    f"TRACE_C: close_distance_meters {_vals(close)}",
                    f"TRACE_C: obliquity_factor {fmt(_f(close) / _f(R[t, o]))}",
                    f"TRACE_C: diffracted_vec {_vals(d[t, o])}",
                    f"TRACE_C: incident_vec {_vals(inc[0])}",
                    f"TRACE_C: lambda_meters {_vals(lam[0])}",
                    f"TRACE_C: lambda_angstroms {fmt(_f(lam[0]) * 1e10)}",
                    f"TRACE_C: scattering_vec_A_inv {_vals(scat[t, o, 0])}"]
            if executed is not None and not bool(executed[t, o, 0]):
                continue                 # source 0 cut by dmin: C `continue`s before the φ loop
            lat = m.lattice[0, 0]
            if first_local is not None and m.lattice_first is not None and (t, o, 0) == tuple(first_local[1:]):
                lat = m.lattice_first[0, 0]
            out += [f"TRACE_C: rot_{n}_angstroms " + " ".join(fmt(_f(x) * 1e10) for x in lat[i])
                    for i, n in enumerate("abc")]
            out += stars
            h = hkl[t, o, 0, 0, 0]
            out.append(f"TRACE_C: hkl_frac {_vals(h)}")
            out.append("TRACE_C: hkl_rounded " + " ".join("%d" % int(_f(x)) for x in hkl0[t, o, 0, 0, 0]))
            fl = F_latt[t, o, 0, 0, 0]
            if m.shape == "square":
                for n, fa in zip("abc", tr["F_axes"]):
                    v = 1.0 if fa is None else fa[0, t, o, 0, 0, 0]
                    out.append(f"TRACE_C: F_latt_{n} {_vals(v)}")
                out.append(f"TRACE_C: F_latt {_vals(fl)}")
            if _f(fl) == 0.0 and not background:
                continue                 # C: `if(F_latt == 0.0 && water_size == 0.0) continue;`
            out.append(f"TRACE_C: F_cell {_vals(F_cell[t, o, 0, 0, 0])}")

    # values of C's variables after all loops
    if m.oversample_thick:
        cap = capture[-1, -1]
    else:
        cap = capture[-1, 0]
    if m.nopolar and not m.oversample_polar:
        pol = 1.0
    elif m.oversample_polar:
        if executed is None:
            pol = polar[-1, -1, -1]
        else:   # last executed (layer, sub-pixel, source)
            flat_e = executed.reshape(-1)
            pol = polar.reshape(-1)[int(torch.nonzero(flat_e).max())] if bool(flat_e.any()) else \
                (1.0 if m.nopolar else 0.0)
    elif executed is None:
        pol = polar[0, 0, 0]
    else:
        pol = _first_along(executed[None], polar[None], 3, 1.0 if m.nopolar else 0.0)[0]
    om_final = omega[-1, -1] if m.oversample_omega else omega[0, 0]
    I = tr["I"][0]
    v = val[0]
    out += [f"TRACE_C: I_before_scaling {_vals(I)}",
            f"TRACE_C: r_e_meters {fmt(math.sqrt(m.r_e_sqr))}",
            f"TRACE_C: r_e_sqr {fmt(m.r_e_sqr)}",
            f"TRACE_C: fluence_photons_per_m2 {fmt(m.fluence)}",
            f"TRACE_C: steps {int(m.steps)}",
            f"TRACE_C: oversample_thick {int(bool(m.oversample_thick))}",
            f"TRACE_C: oversample_polar {int(bool(m.oversample_polar))}",
            f"TRACE_C: oversample_omega {int(bool(m.oversample_omega))}",
            f"TRACE_C: capture_fraction {_vals(cap)}",
            f"TRACE_C: polar {_vals(pol)}",
            f"TRACE_C: omega_pixel {_vals(om_final)}",
            f"TRACE_C: cos_2theta {fmt(_dot(inc[-1], d[-1, -1]))}",
            f"TRACE_C: I_pixel_final {_vals(v)}",
            f"TRACE_C: floatimage_accumulated {fmt(float(np.float32(_f(v))))}"]
    return out
