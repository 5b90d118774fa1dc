"""ExperimentSpec → engine ``Model``: resolves nanoBragg's defaults, reads input files, builds tensors.

This is the only place where the description (plain numbers, file names) meets torch. It knows
nothing of Hydra or of the nanoBragg command line.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from nbsim import quirks
from nbsim.crystal import build_lattice, cell_parameters
from nbsim.engine import Model
from nbsim.geometry import detector_geometry
from nbsim.physics import AVOGADRO, R_E_SQR, HKLTable
from nbsim.rotation import rotate_axis, rotate_umat
from nbsim.sampling import (make_sources, resolve_dispersion, resolve_divergence, resolve_mosaic,
                            resolve_phi, resolve_thickness)
from nbsim.spec import ExperimentSpec, SpecError

DEFAULT_FLUENCE = 125932015286227086360700780544.0
RTD = 180.0 / math.pi


def _path(base_dir, name, key):
    p = Path(name)
    if not p.is_absolute():
        p = Path(base_dir) / p
    if not p.exists():
        raise SpecError(key, f"file not found: {p}")
    return p


def effective_phi(phi0, phistep, phisteps, carryover):
    """Per-step rotation angles (rad) actually applied, and the first iteration's angles.

    ``carryover`` (quirk phi0_carryover not fixed): a step whose φ is exactly 0.0 keeps the previous
    loop iteration's orientation; at the very first iteration of the run "previous" is the unrotated crystal.
    Returns (steady list, first list or None when identical).
    """
    phis = [phi0 + phistep * i for i in range(phisteps)]
    if not carryover:
        return phis, None

    def walk(prev):
        out = []
        for p in phis:
            prev = p if p != 0.0 else prev
            out.append(prev)
        return out
    first = walk(0.0)
    steady = walk(first[-1])
    return steady, (first if first != steady else None)


def build_model(spec: ExperimentSpec, *, dtype=torch.float64, device="cpu", base_dir=".",
                write_fdump=True) -> Model:
    """Resolve ``spec`` into a ``Model``. ``model.info`` carries the numbers nanoBragg prints;
    ``model.info['log']`` the nanoBragg-style setup lines and ``['warnings']`` quirk warnings."""
    spec.validate()
    d, b, c = spec.detector, spec.beam, spec.crystal
    q = quirks.of(spec)
    warnings, log = [], []
    tkw = dict(dtype=dtype, device=device)

    geo = detector_geometry(d, b, c, quirks=q, **tkw)
    warnings += geo.warnings
    info = dict(geo.info)
    lambda0 = b.wavelength_A * 1e-10

    # ---- crystal
    matrix = None
    if c.matrix_file is not None:
        from nbsim.io.tables import read_matrix
        matrix = read_matrix(_path(base_dir, c.matrix_file, "crystal.matrix_file"))
    misset = None
    if c.misset_random:
        from nbsim.rng import c_seed, random_misset
        seed = c.misset_seed
        if seed is None:
            raise SpecError("crystal.misset_seed", "crystal.misset_random needs a misset_seed "
                            "(the C program would use the clock)")
        misset = tuple(random_misset(c_seed(seed)))
        log.append("random orientation misset angles: %g %g %g deg" % tuple(x * RTD for x in misset))
    elif c.misset_deg is not None:
        misset = tuple(math.radians(x) for x in c.misset_deg)
    lat = build_lattice(cell_A_deg=c.cell_A_deg, matrix=matrix, wavelength_A=b.wavelength_A,
                        misset_rad=misset, faithful=not q.fixed("triclinic_cstar"), **tkw)
    real, recip = cell_parameters(lat)
    if (not q.fixed("triclinic_cstar") and c.cell_A_deg is not None
            and max(abs(x - y) for x, y in zip(real, c.cell_A_deg)) > 1e-3):
        warnings.append("quirk triclinic_cstar: -cell c* construction changes the triclinic cell to "
                        + " ".join(f"{x:g}" for x in real) + " (fixed: the textbook c*)")
    log.append("Unit Cell: " + " ".join(f"{x:g}" for x in real))
    log.append("Recp Cell: " + " ".join(f"{x:g}" for x in recip))
    log.append(f"volume = {float(lat.V_cell_A3):g} A^3")

    # crystal size
    la, lb, lc = (float(torch.linalg.vector_norm(v)) for v in (lat.a, lat.b, lat.c))
    Nbase = c.N
    Na = float(c.Na if c.Na is not None else Nbase)
    Nb = float(c.Nb if c.Nb is not None else Nbase)
    Nc = float(c.Nc if c.Nc is not None else Nbase)
    N_before_size = (Na, Nb, Nc)
    size_y = c.size_y_mm * 1e-3 if c.size_y_mm else 0.0
    size_z = c.size_z_mm * 1e-3 if c.size_z_mm else 0.0
    beamsize = b.beamsize_mm * 1e-3
    if beamsize < size_y:
        warnings.append(f"clipping sample ({size_y:g} m high) with beam ({beamsize:g} m)")
        size_y = beamsize
    if beamsize < size_z:
        warnings.append(f"clipping sample ({size_z:g} m wide) with beam ({beamsize:g} m)")
        size_z = beamsize
    if c.size_x_mm:
        Na = float(math.ceil(c.size_x_mm * 1e-3 / la))
    if size_y > 0:
        Nb = float(math.ceil(size_y / lb))
    if size_z > 0:
        Nc = float(math.ceil(size_z / lc))
    Na, Nb, Nc = (max(1.0, x) for x in (Na, Nb, Nc))
    xtal_max = max(la * Na, lb * Nb, lc * Nc)
    distance = float(geo.distance_m)
    px = float(geo.pixel_m)
    recommended = int(math.ceil(3.0 * xtal_max / (lambda0 * distance / px)))
    recommended = max(recommended, 1)
    oversample = d.oversample if d.oversample and d.oversample > 0 else recommended
    log.append(f"crystal is {la * Na * 1e6:g} x {lb * Nb * 1e6:g} x {lc * Nc * 1e6:g} microns")
    if not d.oversample:
        log.append(f"auto-selected {oversample}-fold oversampling")

    # ---- structure factors
    table = None
    fdump = c.fdump_file
    if c.hkl_file is not None:
        from nbsim.io.tables import hkl_table, read_hkl
        hkl, F = read_hkl(_path(base_dir, c.hkl_file, "crystal.hkl_file"))
        ranges, dense = hkl_table(hkl, F, c.default_F)
        count = len(F)
        if fdump and write_fdump:
            from nbsim.io.tables import write_fdump as _wf
            _wf(Path(base_dir) / fdump, ranges, dense)
    elif fdump is not None and (Path(base_dir) / fdump).exists():
        from nbsim.io.tables import read_fdump
        ranges, dense = read_fdump(Path(base_dir) / fdump)
        hr, kr, lr = ranges[1] - ranges[0] + 1, ranges[3] - ranges[2] + 1, ranges[5] - ranges[4] + 1
        dense = np.asarray(dense)[:hr, :kr, :lr]
        count = hr * kr * lr
        warnings.append(f"reading structure factors from {fdump} (no hkl file given)")
    else:
        ranges = None
        count = 0
        if c.default_F == 0.0:
            raise SpecError("crystal.default_F", "no structure factors: give crystal.hkl_file, a "
                            "Fdump file, or a non-zero crystal.default_F")
    if ranges is not None:
        hr, kr, lr = ranges[1] - ranges[0] + 1, ranges[3] - ranges[2] + 1, ranges[5] - ranges[4] + 1
        table = HKLTable(ranges, torch.as_tensor(np.asarray(dense)[:hr, :kr, :lr], **tkw),
                         c.default_F, count)
    if c.interpolate is None:
        interpolate = any(x <= 2 for x in N_before_size)
        log.append("auto-selected " + ("tricubic interpolation of structure factors" if interpolate
                                       else "no interpolation"))
    else:
        interpolate = bool(c.interpolate)
    if count == 0:
        interpolate = False
    log.append(f"  {count} initialized hkls (all others ={c.default_F:g})")

    # ---- sampling
    phisteps, osc, phistep = resolve_phi(math.radians(c.phi_deg),
                                         None if c.osc_deg is None else math.radians(c.osc_deg),
                                         None if c.phistep_deg is None else math.radians(c.phistep_deg),
                                         c.phisteps)
    phi0 = math.radians(c.phi_deg)
    carry = not q.fixed("phi0_carryover")
    steady, first = effective_phi(phi0, phistep, phisteps, carry)
    if first is not None or (carry and steady != [phi0 + phistep * i for i in range(phisteps)]):
        warnings.append("quirk phi0_carryover: phi step(s) at exactly 0 deg keep the previous "
                        "orientation (C phi carry-over); fixed: such steps use the unrotated crystal")
    mosaic_domains, spread, mwarn = resolve_mosaic(math.radians(c.mosaic_deg), c.mosaic_domains)
    if mwarn:
        warnings.append(mwarn)
    if spread > 0:
        from nbsim.rng import c_seed, mosaic_umats
        umats = torch.as_tensor(np.asarray(mosaic_umats(spread, mosaic_domains, c_seed(c.mosaic_seed))), **tkw)
    else:
        umats = None

    def orient(angles):
        phi_t = torch.tensor(angles, **tkw)                              # (F,)
        base = torch.stack((lat.a, lat.b, lat.c))                        # (3 vectors, 3)
        ap = rotate_axis(base[None].expand(len(angles), 3, 3), geo.spindle, phi_t[:, None])  # (F,3,3)
        if umats is None:
            return ap[:, None]                                           # (F, 1, 3, 3)
        return rotate_umat(ap[:, None, :, :], umats[None, :, None, :, :])   # (F, M, 3, 3)

    lattice = orient(steady)
    lattice_first = orient(first) if first is not None else None

    hdiv = resolve_divergence(None if b.hdivrange_mrad is None else b.hdivrange_mrad * 1e-3,
                              None if b.hdivstep_mrad is None else b.hdivstep_mrad * 1e-3, b.hdivsteps)
    vdiv = resolve_divergence(None if b.vdivrange_mrad is None else b.vdivrange_mrad * 1e-3,
                              None if b.vdivstep_mrad is None else b.vdivstep_mrad * 1e-3, b.vdivsteps)
    disp = resolve_dispersion(b.dispersion_pct / 100.0, b.dispsteps)
    table_src = None
    if b.source_file is not None:
        from nbsim.io.tables import read_sourcefile
        table_src = np.asarray(read_sourcefile(_path(base_dir, b.source_file, "beam.source_file")), float)
        if len(table_src) == 0:
            raise SpecError("beam.source_file", f"no sources in {b.source_file}")
    src = make_sources(beam=geo.beam, polar=geo.polar, vert=geo.vert, wavelength_m=lambda0,
                       hdiv=hdiv, vdiv=vdiv, disp=disp, round_div=b.round_div, table=table_src,
                       ignore_intensity=not q.fixed("source_intensity_ignored"), **tkw)
    nsrc = src.direction.shape[0]
    if nsrc == 0:
        raise SpecError("beam.hdivrange_mrad", "the divergence grid selects no source")

    thicksteps, thick, thickstep = resolve_thickness(d.thick_um * 1e-6, d.thicksteps,
                                                  c_layers=not q.fixed("thickness_layers"))
    if d.attenuation_um is not None:
        if d.attenuation_um == 0 or math.isinf(d.attenuation_um):
            thicksteps, thick, thickstep, mu = 1, 0.0, 0.0, 0.0
        else:
            mu = 1.0 / (d.attenuation_um * 1e-6)
    else:
        mu = -1.0
        if thick > 0.0:
            mu = 1.0 / thick
            warnings.append(f"no sensor attenuation given: using attenuation length = thickness "
                            f"(mu = {mu:g} /m)")

    steps = nsrc * mosaic_domains * phisteps * oversample * oversample

    # ---- beam intensity
    fluence = b.fluence_ph_per_m2 if b.fluence_ph_per_m2 is not None else DEFAULT_FLUENCE
    if b.flux_ph_per_s != 0.0 and b.exposure_s > 0:
        fluence = b.flux_ph_per_s * b.exposure_s / beamsize / beamsize
    water = c.water_um * 1e-6
    bg_core = 2.57 * 2.57 * water ** 3 * 1e6 * AVOGADRO / 18.0
    water_sq = not q.fixed("water_fluence_squared")
    I_bg = bg_core * R_E_SQR * fluence if water_sq else 0.0      # fluence applied twice
    bg_physical = R_E_SQR * fluence * bg_core if not water_sq else 0.0

    # quirks that change this run's result (one line each; none for a fixed quirk)
    if d.twotheta_deg != 0.0 and not q.fixed("ratio_ignores_twotheta"):
        warnings.append("quirk ratio_ignores_twotheta: the beam/detector-normal ratio ignores two-theta, so "
                        f"the recomputed distance is {info['distance_mm']:g} mm (fixed: includes it)")
    if water > 0 and abs(R_E_SQR * fluence - 1.0) > 1e-12 and water_sq:
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
    if thick > 0 and thicksteps > 1 and not q.fixed("thickness_layers"):
        warnings.append(f"quirk thickness_layers: {thicksteps} sensor layers {thickstep * 1e6:g} um apart "
                        f"cover {thicksteps * thickstep * 1e6:g} um of a {thick * 1e6:g} um sensor, each "
                        "adds its full intensity (fixed: N layers of T/N)")
    if thick > 0 and thicksteps > 1 and not (q.fixed("last_layer_capture") or d.oversample_thick):
        warnings.append("quirk last_layer_capture: only the last sensor layer's capture fraction is "
                        "applied (fixed: each layer weighted by its own)")

    # ---- ROI and mask
    fpix, spix = geo.fpixels, geo.spixels
    roi = list(d.roi) if d.roi is not None else [0, fpix, 0, spix]
    mask_np = np.zeros((spix, fpix), dtype=bool)
    mask_np[max(roi[2], 0):roi[3] + 1, max(roi[0], 0):roi[1] + 1] = True
    if d.mask_file is not None:
        from nbsim.io.smv import read_smv
        _, mdata = read_smv(_path(base_dir, d.mask_file, "detector.mask_file"))
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

    info.update(
        wavelength_A=b.wavelength_A, phi_deg=c.phi_deg, osc_deg=osc * RTD, phistep_deg=phistep * RTD,
        phisteps=phisteps, mosaic_domains=mosaic_domains, mosaic_deg=spread * RTD,
        sources=nsrc, divsteps=src.divsteps, dispsteps=src.dispsteps, oversample=oversample,
        recommended_oversample=recommended, thicksteps=thicksteps, thick_m=thick, mu_per_m=mu,
        steps=steps, Na=Na, Nb=Nb, Nc=Nc, fluence=fluence, interpolate=interpolate, hkls=count,
        roi=roi, unit_cell=real, recp_cell=recip, V_cell_A3=float(lat.V_cell_A3),
        a_A=[float(x) * 1e10 for x in lat.a], b_A=[float(x) * 1e10 for x in lat.b],
        c_A=[float(x) * 1e10 for x in lat.c],
        a_star=[float(x) for x in lat.a_star], b_star=[float(x) for x in lat.b_star],
        c_star=[float(x) for x in lat.c_star], source_listing=src.listing,
        hdiv=list(hdiv), vdiv=list(vdiv), dispersion=list(disp), quirks=q.label(),
        log=log, warnings=warnings,
    )
    return Model(
        fpixels=fpix, spixels=spix, pixel_m=geo.pixel_m, oversample=oversample,
        fdet=geo.fdet, sdet=geo.sdet, odet=geo.odet, pix0=geo.pix0, beam=geo.beam,
        distance_m=geo.distance_m, close_distance_m=geo.close_distance_m, curved=d.curved,
        point_pixel=d.point_pixel, thicksteps=thicksteps, thickstep_m=thickstep, thick_m=thick,
        mu_per_m=mu, incident=-src.direction, wavelength_m=src.wavelength_m,
        source_weight=src.weight, lattice=lattice, lattice_first=lattice_first,
        first_iteration=first_iteration, recip=(lat.a_star, lat.b_star, lat.c_star), N=(Na, Nb, Nc),
        shape=c.shape, fudge=c.fudge, table=table, default_F=c.default_F, interpolate=interpolate,
        kahn=b.kahn_factor, polar_vector=geo.polar, nopolar=b.nopolar, dmin_m=b.dmin_A * 1e-10,
        I_bg=I_bg, fluence=fluence, r_e_sqr=R_E_SQR, steps=steps,
        oversample_thick=d.oversample_thick, oversample_polar=d.oversample_polar,
        oversample_omega=d.oversample_omega, quirks=q, mask=mask_t,
        bg_physical=bg_physical, info=info)
