"""``ExperimentSpec`` -> canonical nanoBragg argument list (the inverse of ``parse_argv``).

``parse_argv(spec_to_argv(spec)).spec == spec`` for every spec in canonical form, i.e. one that
``parse_argv`` can produce: CUSTOM specs carry an explicit pivot, specs with an HKL file carry their
Fdump file name, a cell has 6 values.  The list contains no output-file flags; values are written
with ``repr`` so floats round-trip exactly.  Flags are ordered so that upstream's argv-order rules
give the same result: vectors before ``-twotheta`` (``-twotheta_axis`` also matches ``-twotheta``
upstream), ``-N`` before ``-Na/-Nb/-Nc``, ``-misset_seed`` right before ``-misset`` (or last, so
that upstream does not read a misset from the words after it), ``-pivot`` after every
pivot-implying flag.
"""
from __future__ import annotations

from typing import List, Optional

from nbsim.spec import DeviceSpec, ExperimentSpec, compile_mode

from .argv import DEFAULT_DUMP_FILE, FrontendError

__all__ = ["spec_to_argv"]


def _num(x) -> str:
    if isinstance(x, bool):
        raise TypeError(x)
    if isinstance(x, int):
        return str(x)
    r = repr(float(x))
    return r


def spec_to_argv(spec: ExperimentSpec, device: Optional[DeviceSpec] = None) -> List[str]:
    """A nanoBragg command line (without program name and output files) describing ``spec``.

    With ``device``, the nbsim double-dash options for it are appended (defaults omitted).
    Raises ``FrontendError`` for a spec no command line can express.
    """
    d, b, c, im = spec.detector, spec.beam, spec.crystal, spec.image
    if d.panels is not None or d.geometry_file is not None:
        # nanoBragg has one panel; nbsim's front end reads a geometry file (--geom), not a panel list
        raise FrontendError("spec_to_argv: a multi-panel detector (detector.panels / geometry_file) "
                            "has no nanoBragg command line")
    dflt = ExperimentSpec()
    out: List[str] = []
    if spec.quirks != "faithful":
        out += ["--quirks", spec.quirks]
    if spec.fix:
        out += ["--fix", ",".join(spec.fix)]
    if device is not None:
        dd = DeviceSpec()
        if device.device != dd.device:
            out += ["--device", device.device]
        if device.dtype != dd.dtype:
            out += ["--dtype", device.dtype]
        if device.memory_budget_mb is not None:
            out += ["--memory-budget-mb", _num(device.memory_budget_mb)]
        mode = compile_mode(device.compile)
        if mode is not None:
            out.append("--compile" if mode else "--no-compile")

    def add(flag, *vals):
        out.append(flag)
        out.extend(_num(v) if not isinstance(v, str) else v for v in vals)

    # a -mask header sets defaults (pixel, distance, wavelength, phi, osc...): with a mask every
    # such value is written explicitly so that the header cannot change it
    hdr = d.mask_file is not None

    def add_if(flag, value, default, header=False):
        if value is not None and (value != default or (header and hdr)):
            add(flag, value)

    # -- convention first; vectors only for CUSTOM (any vector flag switches to CUSTOM)
    custom = d.convention == "custom"
    if custom:
        vecs = [("-fdet_vector", d.fdet_vector), ("-sdet_vector", d.sdet_vector),
                ("-odet_vector", d.odet_vector), ("-beam_vector", b.beam_vector),
                ("-polar_vector", b.polar_vector), ("-spindle_axis", c.spindle_axis),
                ("-twotheta_axis", d.twotheta_axis), ("-pix0_vector_mm", d.pix0_vector_mm)]
        given = [(f, v) for f, v in vecs if v is not None]
        if not given:
            raise FrontendError("spec_to_argv: a custom-convention spec needs at least one vector "
                                "(only vector flags select CUSTOM in nanoBragg)")
        for f, v in given:
            add(f, *v)
    else:
        if d.convention != "mosflm":
            out.append("-" + d.convention)
        for name, v in (("detector.fdet_vector", d.fdet_vector), ("detector.sdet_vector", d.sdet_vector),
                        ("detector.odet_vector", d.odet_vector), ("beam.beam_vector", b.beam_vector),
                        ("beam.polar_vector", b.polar_vector), ("crystal.spindle_axis", c.spindle_axis),
                        ("detector.twotheta_axis", d.twotheta_axis),
                        ("detector.pix0_vector_mm", d.pix0_vector_mm)):
            if v is not None:
                raise FrontendError(f"spec_to_argv: {name} is only expressible with the custom "
                                    f"convention (a vector flag switches nanoBragg to CUSTOM)")

    # -- crystal
    if c.cell_A_deg is not None:
        add("-cell", *c.cell_A_deg)
    if c.matrix_file is not None:
        add("-mat", c.matrix_file)
    if c.hkl_file is not None:
        add("-hkl", c.hkl_file)
        if c.fdump_file is not None and c.fdump_file != DEFAULT_DUMP_FILE:
            add("-dump", c.fdump_file)
    elif c.fdump_file is not None:
        add("-dump", c.fdump_file)
    for flag, v in (("-mtz_column", c.mtz_column), ("-model", c.model_file), ("-model_dmin", c.model_dmin_A)):
        if v is not None:
            add(flag, v)
    if c.model_anomalous:
        add("-model_anomalous")
    add_if("-default_F", c.default_F, dflt.crystal.default_F)
    if c.N != dflt.crystal.N:
        add("-N", c.N)
    for flag, v in (("-Na", c.Na), ("-Nb", c.Nb), ("-Nc", c.Nc)):
        if v is not None:
            add(flag, v)
    sizes = (c.size_x_mm, c.size_y_mm, c.size_z_mm)
    if sizes[0] is not None and sizes[0] == sizes[1] == sizes[2]:
        add("-xtalsize", sizes[0])
    else:
        for flag, v in zip(("-xtal_x", "-xtal_y", "-xtal_z"), sizes):
            if v is not None:
                add(flag, v)
    if c.shape != "square":
        out.append({"round": "-round_xtal", "gauss": "-gauss_xtal", "tophat": "-tophat_spots"}[c.shape])
    add_if("-fudge", c.fudge, dflt.crystal.fudge)
    if c.interpolate is not None:
        out.append("-interpolate" if c.interpolate else "-nointerpolate")
    add_if("-mosaic", c.mosaic_deg, dflt.crystal.mosaic_deg)
    if c.mosaic_domains is not None:
        add("-mosaic_domains", c.mosaic_domains)
    add_if("-mosaic_seed", c.mosaic_seed, dflt.crystal.mosaic_seed)
    add_if("-phi", c.phi_deg, dflt.crystal.phi_deg, header=True)
    if c.osc_deg is not None:
        add("-osc", c.osc_deg)
    if c.phistep_deg is not None:
        add("-phistep", c.phistep_deg)
    if c.phisteps is not None:
        add("-phisteps", c.phisteps)
    add_if("-water", c.water_um, dflt.crystal.water_um)

    # -- beam
    add_if("-lambda", b.wavelength_A, dflt.beam.wavelength_A, header=True)
    add_if("-dispersion", b.dispersion_pct, dflt.beam.dispersion_pct)
    if b.dispsteps is not None:
        add("-dispsteps", b.dispsteps)
    if b.hdivrange_mrad is not None and b.hdivrange_mrad == b.vdivrange_mrad:
        add("-divergence", b.hdivrange_mrad)
    else:
        if b.hdivrange_mrad is not None:
            add("-hdivrange", b.hdivrange_mrad)
        if b.vdivrange_mrad is not None:
            add("-vdivrange", b.vdivrange_mrad)
    if b.hdivstep_mrad is not None:
        add("-hdivstep", b.hdivstep_mrad)
    if b.vdivstep_mrad is not None:
        add("-vdivstep", b.vdivstep_mrad)
    if b.hdivsteps is not None and b.hdivsteps == b.vdivsteps:
        add("-divsteps", b.hdivsteps)
    else:
        if b.hdivsteps is not None:
            add("-hdivsteps", b.hdivsteps)
        if b.vdivsteps is not None:
            add("-vdivsteps", b.vdivsteps)
    if not b.round_div:
        out.append("-square_div")
    if b.source_file is not None:
        add("-sourcefile", b.source_file)
    if b.fluence_ph_per_m2 is not None:
        add("-fluence", b.fluence_ph_per_m2)
    add_if("-flux", b.flux_ph_per_s, dflt.beam.flux_ph_per_s)
    add_if("-exposure", b.exposure_s, dflt.beam.exposure_s)
    add_if("-beamsize", b.beamsize_mm, dflt.beam.beamsize_mm)
    add_if("-polar", b.kahn_factor, dflt.beam.kahn_factor)
    if b.nopolar:
        out.append("-nopolar")          # after -polar, which clears it upstream
    add_if("-dmin", b.dmin_A, dflt.beam.dmin_A)

    # -- detector
    add_if("-distance", d.distance_mm, dflt.detector.distance_mm, header=True)
    if d.close_distance_mm is not None:
        add("-close_distance", d.close_distance_mm)
    add_if("-pixel", d.pixel_mm, dflt.detector.pixel_mm, header=True)
    if d.detsize_f_mm is not None and d.detsize_f_mm == d.detsize_s_mm:
        add("-detsize", d.detsize_f_mm)
    else:
        if d.detsize_f_mm is not None:
            add("-detsize_f", d.detsize_f_mm)
        if d.detsize_s_mm is not None:
            add("-detsize_s", d.detsize_s_mm)
    if d.fpixels is not None and d.fpixels == d.spixels:
        add("-detpixels", d.fpixels)
    else:
        if d.fpixels is not None:
            add("-detpixels_f", d.fpixels)
        if d.spixels is not None:
            add("-detpixels_s", d.spixels)
    for flag, v in (("-Xbeam", d.xbeam_mm), ("-Ybeam", d.ybeam_mm), ("-Xclose", d.xclose_mm),
                    ("-Yclose", d.yclose_mm), ("-ORGX", d.orgx_px), ("-ORGY", d.orgy_px)):
        if v is not None:
            add(flag, v)
    add_if("-detector_rotx", d.rotx_deg, 0.0)
    add_if("-detector_roty", d.roty_deg, 0.0)
    add_if("-detector_rotz", d.rotz_deg, 0.0)
    if d.twotheta_deg != 0.0 or (custom and d.twotheta_axis is not None):
        add("-twotheta", d.twotheta_deg)       # after -twotheta_axis
    if d.curved:
        out += ["-curved_det", "1"]
    if d.point_pixel:
        out.append("-point_pixel")
    add_if("-detector_thick", d.thick_um, dflt.detector.thick_um)
    if d.attenuation_um is not None:
        if not d.attenuation_um > 0:
            raise FrontendError("spec_to_argv: detector.attenuation_um = 0 has no nanoBragg flag "
                                "(-detector_abs 0 means 'no attenuation, thickness 0')")
        add("-detector_abs", d.attenuation_um)
    if d.thicksteps is not None:
        add("-thicksteps", d.thicksteps)
    if d.oversample is not None:
        add("-oversample", d.oversample)
    if d.oversample_thick:
        out.append("-oversample_thick")
    if d.oversample_polar:
        out.append("-oversample_polar")
    if d.oversample_omega:
        out.append("-oversample_omega")
    if d.roi is not None:
        add("-roi", *[int(x) for x in d.roi])
    if d.mask_file is not None:
        add("-mask", d.mask_file)

    # -- image
    add_if("-adc", im.adc, dflt.image.adc)
    if im.int_scale is not None:
        add("-scale", im.int_scale)
    if im.pgm_scale is not None:
        add("-pgmscale", im.pgm_scale)
    if not im.noise:
        out.append("-nonoise")
    if im.noise_seed is not None:
        add("-seed", im.noise_seed)

    # -- pivot: last of the pivot-implying flags
    if d.pivot is not None:
        add("-pivot", d.pivot)

    # -- misset (with -misset_seed right before it; alone it goes last, see module doc)
    if c.misset_random or c.misset_deg is not None:
        if c.misset_seed is not None:
            add("-misset_seed", c.misset_seed)
        if c.misset_random:
            out += ["-misset", "random"]
        else:
            add("-misset", *c.misset_deg)
    elif c.misset_seed is not None:
        add("-misset_seed", c.misset_seed)

    return out
