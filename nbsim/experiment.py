"""ExperimentSpec → engine ``Model``: resolves nanoBragg's defaults, reads input files, builds tensors.

This is the only place where the description (plain numbers, file names) meets torch. It knows
nothing of Hydra or of the nanoBragg command line.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from nbsim import quirks
from nbsim.crystal import build_lattice, cell_parameters, oddball_cell
from nbsim.engine import Model
from nbsim.geometry import detector_geometry
from nbsim.inputs import load_inputs
from nbsim.params import param_tree, value
from nbsim.physics import AVOGADRO, R_E_SQR, HKLTable
from nbsim.report import SetupReport
from nbsim.rotation import magnitude, rotate_axis, rotate_umat
from nbsim.sampling import (make_sources, resolve_dispersion, resolve_divergence, resolve_mosaic,
                            resolve_phi, resolve_thickness)
from nbsim.sampling import spectrum
from nbsim.spec import ExperimentSpec, SpecError
from nbsim.units import (RTD, angstrom_to_m, deg_to_rad, mm_to_m, mrad_to_rad, percent_to_fraction,
                         um_to_m, water_um_to_m)

DEFAULT_FLUENCE = 125932015286227086360700780544.0


def effective_phi(phi0, phistep, phisteps, carryover):
    """Per-step rotation angles (rad) actually applied, and the first iteration's angles.

    ``carryover`` (quirk phi0_carryover not fixed): a step whose φ is exactly 0.0 keeps the previous
    loop iteration's orientation; at the very first iteration of the run "previous" is the unrotated crystal.
    ``phi0``/``phistep`` may be 0-d tensors (the choice "exactly 0" is taken at their values).
    Returns (steady list, first list or None when identical).
    """
    phis = [phi0 + phistep * i for i in range(phisteps)]
    if not carryover:
        return phis, None

    def walk(prev):
        out = []
        for p in phis:
            prev = p if value(p) != 0.0 else prev
            out.append(prev)
        return out
    first = walk(0.0)
    steady = walk(first[-1])
    same = all(x is y for x, y in zip(first, steady))
    return steady, (None if same else first)


def _carries_derivative(t: torch.Tensor) -> bool:
    """True for a tensor on the path of a derivative: ``requires_grad``, a forward-mode dual, or a
    ``torch.func`` transform's wrapper."""
    if t.requires_grad:
        return True
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return True
    from torch.autograd import forward_ad
    try:
        return forward_ad.unpack_dual(t).tangent is not None
    except RuntimeError:
        return False


def setup_values(tree: dict) -> dict:
    """The parameter tree as the setup reads it: tensors that carry a derivative stay tensors (their
    graph reaches the pixels); the others become plain numbers (lists for vectors), so a run without
    gradients does exactly the arithmetic it always did."""
    out = {}
    for k, t in tree.items():
        if _carries_derivative(t):
            out[k] = t
        else:
            out[k] = float(t) if t.dim() == 0 else t.tolist()
    return out


def build_model(spec: ExperimentSpec, *, dtype=torch.float64, device="cpu", base_dir=".",
                params=None, inputs=None) -> Model:
    """Resolve ``spec`` into a ``Model``. ``model.report`` (``nbsim.report.SetupReport``) carries
    the numbers nanoBragg prints (``report.echo()``: its setup lines) and this run's quirk warnings.

    ``params``: schema key → tensor (``nbsim.params.PARAMS``), taking the place of the spec's value;
    a tensor with ``requires_grad`` (or a forward-mode dual) passes its graph on to the model.
    ``inputs``: the files the spec names, already read (``nbsim.inputs.load_inputs``; read here
    from ``base_dir`` when not given). Nothing is written."""
    spec.validate()
    if inputs is None:
        inputs = load_inputs(spec, base_dir)
    d, b, c = spec.detector, spec.beam, spec.crystal
    q = quirks.of(spec)
    warnings = []
    tkw = dict(dtype=dtype, device=device)
    p = setup_values(param_tree(spec, params, device=device))
    differentiable = any(isinstance(v, torch.Tensor) for v in p.values())

    geo = detector_geometry(d, b, c, quirks=q, p=p, **tkw)
    warnings += geo.warnings
    wavelength_A = p["beam.wavelength_A"]
    lambda0 = angstrom_to_m(wavelength_A)

    # ---- crystal
    matrix = None
    if c.matrix_file is not None:
        matrix = inputs.matrix
    misset = None
    if c.misset_random:
        from nbsim.rng import c_seed, random_misset
        seed = c.misset_seed
        if seed is None:
            raise SpecError("crystal.misset_seed", "crystal.misset_random needs a misset_seed "
                            "(the C program would use the clock)")
        misset = tuple(random_misset(c_seed(seed)))
    elif "crystal.misset_deg" in p:
        misset = tuple(deg_to_rad(p["crystal.misset_deg"][i]) for i in range(3))
    if "crystal.matrix" in p:
        matrix = p["crystal.matrix"]
    lat = build_lattice(cell_A_deg=p.get("crystal.cell_A_deg"), matrix=matrix,
                        wavelength_A=wavelength_A, misset_rad=misset,
                        faithful=not q.fixed("triclinic_cstar"), **tkw)
    odd = oddball_cell(p["crystal.cell_A_deg"]) if "crystal.cell_A_deg" in p else None
    real, recip, odd_final = cell_parameters(lat)
    warnings += [w for w in [odd] + odd_final if w]
    if (not q.fixed("triclinic_cstar") and c.cell_A_deg is not None
            and max(abs(x - y) for x, y in zip(real, c.cell_A_deg)) > 1e-3):
        warnings.append("quirk triclinic_cstar: -cell c* construction changes the triclinic cell to "
                        + " ".join(f"{x:g}" for x in real) + " (fixed: the textbook c*)")

    # crystal size
    la, lb, lc = (value(magnitude(v)) for v in (lat.a, lat.b, lat.c))
    Na, Nb, Nc = (p.get(f"crystal.{k}", p["crystal.N"]) for k in ("Na", "Nb", "Nc"))
    N_before_size = tuple(value(x) for x in (Na, Nb, Nc))
    size_y = mm_to_m(c.size_y_mm) if c.size_y_mm else 0.0
    size_z = mm_to_m(c.size_z_mm) if c.size_z_mm else 0.0
    beamsize = mm_to_m(b.beamsize_mm)
    if beamsize < size_y:
        warnings.append(f"clipping sample ({size_y:g} m high) with beam ({beamsize:g} m)")
        size_y = beamsize
    if beamsize < size_z:
        warnings.append(f"clipping sample ({size_z:g} m wide) with beam ({beamsize:g} m)")
        size_z = beamsize
    if c.size_x_mm:
        Na = float(math.ceil(mm_to_m(c.size_x_mm) / la))
    if size_y > 0:
        Nb = float(math.ceil(size_y / lb))
    if size_z > 0:
        Nc = float(math.ceil(size_z / lc))
    Na, Nb, Nc = (x if value(x) >= 1.0 else 1.0 for x in (Na, Nb, Nc))
    Nv = tuple(value(x) for x in (Na, Nb, Nc))                 # discrete choices: at the values
    xtal_max = max(la * Nv[0], lb * Nv[1], lc * Nv[2])
    distance = value(geo.distance_m)
    px = value(geo.pixel_m)
    recommended = int(math.ceil(3.0 * xtal_max / (value(lambda0) * distance / px)))
    recommended = max(recommended, 1)
    oversample = d.oversample if d.oversample and d.oversample > 0 else recommended
    xtal_size_m = (la * Nv[0], lb * Nv[1], lc * Nv[2])
    # C's rough estimate: density 1.2e6 g/m^3 over the crystal volume, per unit cell
    molecular_weight = xtal_size_m[0] * xtal_size_m[1] * xtal_size_m[2] * 1.2e6 * AVOGADRO / (Nv[0] * Nv[1] * Nv[2])

    # ---- structure factors
    default_F = p["crystal.default_F"]
    table = None
    sf = inputs.structure_factors
    warnings += list(inputs.notes)
    if sf is not None:
        ranges, count = sf.ranges, sf.count
        dense = sf.filled(value(default_F))
    else:
        ranges = None
        count = 0
        if value(default_F) == 0.0:
            raise SpecError("crystal.default_F", "no structure factors: give crystal.hkl_file, crystal.model_file, a "
                            "Fdump file, or a non-zero crystal.default_F")
    if ranges is not None:
        hr, kr, lr = ranges[1] - ranges[0] + 1, ranges[3] - ranges[2] + 1, ranges[5] - ranges[4] + 1
        F_table = torch.as_tensor(np.asarray(dense)[:hr, :kr, :lr], **tkw)
        if isinstance(default_F, torch.Tensor) and sf.listed is not None:
            # entries the file does not list are default_F: keep its derivative there
            F_table = torch.where(torch.as_tensor(sf.listed, device=device), F_table, default_F.to(dtype))
        if "crystal.F_table" in p:
            given = torch.as_tensor(p["crystal.F_table"], **tkw)
            if tuple(given.shape) != tuple(F_table.shape):
                raise SpecError("crystal.F_table", f"must have the table's shape {tuple(F_table.shape)} "
                                f"(h {ranges[0]}..{ranges[1]}, k {ranges[2]}..{ranges[3]}, "
                                f"l {ranges[4]}..{ranges[5]}), got {tuple(given.shape)}")
            F_table = given
        table = HKLTable(ranges, F_table, default_F, count)
    interpolate_auto = None
    if c.interpolate is None:
        interpolate = interpolate_auto = any(x <= 2 for x in N_before_size)
    else:
        interpolate = bool(c.interpolate)
    if count == 0:
        interpolate = False

    # ---- sampling
    phi0 = deg_to_rad(p["crystal.phi_deg"])
    phisteps, osc, phistep = resolve_phi(phi0,
                                         deg_to_rad(p["crystal.osc_deg"]) if "crystal.osc_deg" in p else None,
                                         None if c.phistep_deg is None else deg_to_rad(c.phistep_deg),
                                         c.phisteps)
    carry = not q.fixed("phi0_carryover")
    steady, first = effective_phi(phi0, phistep, phisteps, carry)
    if first is not None or (carry and [value(x) for x in steady]
                             != [value(phi0 + phistep * i) for i in range(phisteps)]):
        warnings.append("quirk phi0_carryover: phi step(s) at exactly 0 deg keep the previous "
                        "orientation (C phi carry-over); fixed: such steps use the unrotated crystal")
    mosaic_domains, spread, mwarn = resolve_mosaic(deg_to_rad(p["crystal.mosaic_deg"]), c.mosaic_domains)
    if mwarn:
        warnings.append(mwarn)
    if value(spread) > 0:
        from nbsim.rng import c_seed, mosaic_umats_tensor
        umats = mosaic_umats_tensor(spread, mosaic_domains, c_seed(c.mosaic_seed), **tkw)
    else:
        umats = None

    def orient(angles):
        phi_t = torch.stack([torch.as_tensor(x, **tkw) for x in angles])   # (F,)
        base = torch.stack((lat.a, lat.b, lat.c))                        # (3 vectors, 3)
        ap = rotate_axis(base[None].expand(len(angles), 3, 3), geo.spindle, phi_t[:, None])  # (F,3,3)
        if umats is None:
            return ap[:, None]                                           # (F, 1, 3, 3)
        return rotate_umat(ap[:, None, :, :], umats[None, :, None, :, :])   # (F, M, 3, 3)

    lattice = orient(steady)
    lattice_first = orient(first) if first is not None else None

    hdiv = resolve_divergence(mrad_to_rad(p["beam.hdivrange_mrad"]) if "beam.hdivrange_mrad" in p else None,
                              None if b.hdivstep_mrad is None else mrad_to_rad(b.hdivstep_mrad), b.hdivsteps)
    vdiv = resolve_divergence(mrad_to_rad(p["beam.vdivrange_mrad"]) if "beam.vdivrange_mrad" in p else None,
                              None if b.vdivstep_mrad is None else mrad_to_rad(b.vdivstep_mrad), b.vdivsteps)
    disp = resolve_dispersion(percent_to_fraction(p["beam.dispersion_pct"]), b.dispsteps)
    table_src = inputs.sources
    src = make_sources(beam=geo.beam, polar=geo.polar, vert=geo.vert, wavelength_m=lambda0,
                       hdiv=hdiv, vdiv=vdiv, disp=disp, round_div=b.round_div, table=table_src,
                       ignore_intensity=not q.fixed("source_intensity_ignored"), **tkw)
    nsrc = src.direction.shape[0]
    if nsrc == 0:
        raise SpecError("beam.hdivrange_mrad", "the divergence grid selects no source")

    thicksteps, thick, thickstep = resolve_thickness(um_to_m(p["detector.thick_um"]), d.thicksteps,
                                                     c_layers=not q.fixed("thickness_layers"))
    if "detector.attenuation_um" in p:
        att = p["detector.attenuation_um"]
        if value(att) == 0 or math.isinf(value(att)):
            thicksteps, thick, thickstep, mu = 1, 0.0, 0.0, 0.0
        else:
            mu = 1.0 / um_to_m(att)
    else:
        mu = -1.0
        if value(thick) > 0.0:
            mu = 1.0 / thick
            warnings.append(f"no sensor attenuation given: using attenuation length = thickness "
                            f"(mu = {value(mu):g} /m)")

    steps = nsrc * mosaic_domains * phisteps * oversample * oversample

    # ---- beam intensity
    fluence = p.get("beam.fluence_ph_per_m2", DEFAULT_FLUENCE)
    if b.flux_ph_per_s != 0.0 and b.exposure_s > 0:
        fluence = b.flux_ph_per_s * b.exposure_s / beamsize / beamsize
    water = water_um_to_m(c.water_um)
    bg_core = 2.57 * 2.57 * water ** 3 * 1e6 * AVOGADRO / 18.0
    water_sq = not q.fixed("water_fluence_squared")
    I_bg = bg_core * R_E_SQR * fluence if water_sq else 0.0      # fluence applied twice
    bg_physical = R_E_SQR * fluence * bg_core if not water_sq else 0.0

    # quirks that change this run's result (one line each; none for a fixed quirk)
    if d.twotheta_deg != 0.0 and not q.fixed("ratio_ignores_twotheta"):
        warnings.append("quirk ratio_ignores_twotheta: the beam/detector-normal ratio ignores two-theta, so "
                        f"the recomputed distance is {geo.report.distance_mm:g} mm (fixed: includes it)")
    if water > 0 and abs(R_E_SQR * value(fluence) - 1.0) > 1e-12 and water_sq:
        warnings.append("quirk water_fluence_squared: the water background scales with fluence squared "
                        "(fixed: linear in fluence)")
    if table_src is not None and len(table_src) and not q.fixed("source_intensity_ignored"):
        col = table_src[:, 3]
        col = col[~np.isnan(col)]
        if col.size and np.ptp(col) > 0:
            warnings.append("quirk source_intensity_ignored: the source file's intensity column is "
                            "ignored (fixed: used as weights)")
    if ((d.oversample_thick or d.oversample_polar or d.oversample_omega)
            and not q.fixed("oversample_compounding")):
        warnings.append("quirk oversample_compounding: -oversample_thick/_polar/_omega multiply the "
                        "running sum (fixed: each contribution by its own factor)")
    if b.nopolar and d.oversample_polar and not q.fixed("nopolar_oversample_polar"):
        warnings.append("quirk nopolar_oversample_polar: -nopolar has no effect with -oversample_polar "
                        "(fixed: -nopolar wins)")
    tstep, tthick = value(thickstep), value(thick)
    if tthick > 0 and thicksteps > 1 and not q.fixed("thickness_layers"):
        warnings.append(f"quirk thickness_layers: {thicksteps} sensor layers {tstep * 1e6:g} um apart "
                        f"cover {thicksteps * tstep * 1e6:g} um of a {tthick * 1e6:g} um sensor, each "
                        "adds its full intensity (fixed: N layers of T/N)")
    if tthick > 0 and thicksteps > 1 and not (q.fixed("last_layer_capture") or d.oversample_thick):
        warnings.append("quirk last_layer_capture: only the last sensor layer's capture fraction is "
                        "applied (fixed: each layer weighted by its own)")

    # ---- ROI and mask
    fpix, spix = geo.fpixels, geo.spixels
    from nbsim.checks import resolve_roi
    roi = resolve_roi(d) or [0, fpix, 0, spix]                  # C's rule for negative bounds
    mask_np = np.zeros((spix, fpix), dtype=bool)
    mask_np[max(roi[2], 0):roi[3] + 1, max(roi[0], 0):roi[1] + 1] = True
    if inputs.mask is not None:
        mdata = inputs.mask
        if mdata.shape != (spix, fpix):
            raise SpecError("detector.mask_file", f"mask is {mdata.shape[1]}x{mdata.shape[0]} pixels, "
                            f"detector is {fpix}x{spix}")
        mask_np &= mdata != 0
    full = bool(mask_np.all())
    mask_t = None if full else torch.as_tensor(mask_np, device=device)

    # first loop iteration of the run (quirk 4): first simulated pixel, layer 0, sub-pixel 0, source 0
    first_iteration = (0, 0, 0, 0) if lattice_first is not None and mask_np.any() else None
    if first_iteration is not None and b.dmin_A > 0:
        warnings.append("quirk: with dmin the first rotated iteration is taken at the first simulated pixel")

    rep = SetupReport(
        **dataclasses.asdict(geo.report),
        wavelength_A=value(wavelength_A), phi_deg=value(p["crystal.phi_deg"]), osc_deg=value(osc) * RTD,
        phistep_deg=value(phistep) * RTD,
        phisteps=phisteps, mosaic_domains=mosaic_domains, mosaic_deg=value(spread) * RTD,
        sources=nsrc, divsteps=src.divsteps, dispsteps=disp[0], oversample=oversample,
        spectrum_A=tuple(tuple(r) for r in spectrum(src)), exposure_s=float(b.exposure_s),  # NeXus/CBF writers
        recommended_oversample=recommended, thicksteps=thicksteps, thick_m=value(thick),
        mu_per_m=value(mu), steps=steps, Na=Nv[0], Nb=Nv[1], Nc=Nv[2], fluence=value(fluence),
        interpolate=interpolate, hkls=count,
        roi=tuple(roi), unit_cell=tuple(real), recp_cell=tuple(recip), V_cell_A3=value(lat.V_cell_A3),
        a_A=tuple(value(x) * 1e10 for x in lat.a), b_A=tuple(value(x) * 1e10 for x in lat.b),
        c_A=tuple(value(x) * 1e10 for x in lat.c),
        a_star=tuple(value(x) for x in lat.a_star), b_star=tuple(value(x) for x in lat.b_star),
        c_star=tuple(value(x) for x in lat.c_star), source_listing=tuple(src.listing),
        hdiv=tuple(value(x) for x in hdiv), vdiv=tuple(value(x) for x in vdiv),
        dispersion=tuple(value(x) for x in disp), quirks=q.label(), differentiable=differentiable,
        warnings=tuple(warnings),
        interpolate_auto=interpolate_auto, oversample_auto=not d.oversample,
        matrix_file=c.matrix_file, hkl_file=c.hkl_file,
        fdump_read=(c.fdump_file if sf is not None and sf.from_fdump else None),
        fdump_written=(c.fdump_file if sf is not None and not sf.from_fdump else None),
        misset_random_deg=None if not c.misset_random else tuple(x * RTD for x in misset),
        xtal_size_m=xtal_size_m, molecular_weight=molecular_weight, thickstep_m=value(thickstep),
        phi_values_deg=tuple(value(phi0 + phistep * i) * RTD for i in range(phisteps)),
        phi_end_deg=value(phi0 + osc) * RTD,
        divergence_deviations_rad=tuple(src.deviations), lambdas_m=tuple(src.lambdas_m),
        source_file=b.source_file if table_src is not None and len(table_src) else None,
        default_F=value(default_F), shape=c.shape, kahn_factor=value(p["beam.kahn_factor"]),
        nopolar=bool(b.nopolar), curved=bool(d.curved), point_pixel=bool(d.point_pixel),
        oversample_flags=tuple(n for n, on in (("thick", d.oversample_thick), ("polar", d.oversample_polar),
                                               ("omega", d.oversample_omega)) if on),
        mask_file=d.mask_file, noise=bool(spec.image.noise),
        noise_seed=None if spec.image.noise_seed is None else -int(spec.image.noise_seed),
        water_m=water,
    )
    return Model(
        fpixels=fpix, spixels=spix, pixel_m=geo.pixel_m, oversample=oversample,
        fdet=geo.fdet, sdet=geo.sdet, odet=geo.odet, pix0=geo.pix0, beam=geo.beam,
        distance_m=geo.distance_m, close_distance_m=geo.close_distance_m, curved=d.curved,
        point_pixel=d.point_pixel, thicksteps=thicksteps, thickstep_m=thickstep, thick_m=thick,
        mu_per_m=mu, incident=-src.direction, wavelength_m=src.wavelength_m,
        source_weight=src.weight, lattice=lattice, lattice_first=lattice_first,
        first_iteration=first_iteration, recip=(lat.a_star, lat.b_star, lat.c_star), N=(Na, Nb, Nc),
        shape=c.shape, fudge=c.fudge, table=table, default_F=default_F, interpolate=interpolate,
        kahn=p["beam.kahn_factor"], polar_vector=geo.polar, nopolar=b.nopolar, dmin_m=b.dmin_A * 1e-10,
        I_bg=I_bg, fluence=fluence, r_e_sqr=R_E_SQR, steps=steps,
        oversample_thick=d.oversample_thick, oversample_polar=d.oversample_polar,
        oversample_omega=d.oversample_omega, quirks=q, mask=mask_t,
        bg_physical=bg_physical, differentiable=differentiable, report=rep)
