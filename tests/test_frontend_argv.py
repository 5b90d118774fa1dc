"""nanoBragg command-line front end: argv -> ExperimentSpec, the inverse, and the CLI wrapper.

These tests need neither the engine nor the C binary.
"""
from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from nbsim.frontend import (FLAGS, FrontendError, lookup_flag, parse_argv, spec_to_argv, usage)
from nbsim.spec import (BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec, ImageSpec,
                        SpecError)

ROOT = Path(__file__).resolve().parents[1]
BASE = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100"]


def _golden_dir():
    for p in (ROOT / "tests" / "golden", ROOT.parent / "shared" / "golden"):
        if (p / "cases.txt").exists():
            return p
    return None


def golden_lines():
    g = _golden_dir()
    if g is None:
        return []
    out = []
    for line in (g / "cases.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cid, args = line.split(":", 1)
        out.append((cid.strip(), [w for w in shlex.split(args) if not w.startswith("+")]))
    return out


GOLDEN = golden_lines()


@pytest.fixture
def inputs_dir():
    g = _golden_dir()
    if g is None:
        pytest.skip("golden data not found (tests/golden or ../shared/golden)")
    return str(g / "inputs")


def P(*args, cwd=None, **kw):
    """parse BASE + args (a tmp-free cwd without any Fdump.bin)"""
    words = []
    for a in args:
        words += a.split() if isinstance(a, str) else list(a)
    return parse_argv(BASE + words, cwd=cwd or str(ROOT / "nbsim"), **kw)


# ---------------------------------------------------------------------------------------------
# golden cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not GOLDEN, reason="golden cases.txt not found")
@pytest.mark.parametrize("cid,words", GOLDEN, ids=[c for c, _ in GOLDEN])
def test_golden_case_parses_and_round_trips(cid, words, inputs_dir):
    p = parse_argv(words, cwd=inputs_dir)
    p.spec.validate()
    argv2 = spec_to_argv(p.spec)
    p2 = parse_argv(argv2, cwd=inputs_dir)
    assert p2.spec == p.spec, (argv2, p.spec, p2.spec)
    assert spec_to_argv(p2.spec) == argv2           # canonical form is a fixed point


def _golden(cid, inputs_dir):
    words = dict(GOLDEN)[cid]
    return parse_argv(words, cwd=inputs_dir)


@pytest.mark.skipif(not GOLDEN, reason="golden cases.txt not found")
def test_golden_specific_mappings(inputs_dir):
    s = _golden("G01_cubic", inputs_dir).spec
    assert s.crystal.cell_A_deg == [100, 100, 100, 90, 90, 90]
    assert (s.detector.fpixels, s.detector.spixels) == (256, 256)
    assert s.crystal.N == 5 and s.image.noise_seed == 7 and s.detector.convention == "mosflm"
    assert s.detector.pivot is None
    s = _golden("G03_mat_hkl", inputs_dir).spec
    assert s.crystal.matrix_file == "A.mat" and s.crystal.hkl_file == "P1.hkl"
    assert s.crystal.fdump_file == "Fdump.bin"          # upstream writes the cache with -hkl
    s = _golden("G05_xds_orgx_rot", inputs_dir).spec
    assert s.detector.convention == "xds" and s.detector.orgx_px == 100 and s.detector.roty_deg == -3
    s = _golden("G09_custom_pivot_sample", inputs_dir).spec
    assert s.detector.convention == "custom" and s.detector.pivot == "sample"
    assert s.crystal.spindle_axis == [0, 0, 1] and s.beam.polar_vector == [0, 0, 1]
    p = _golden("G10_custom_pivot_beam_pix0", inputs_dir)
    assert p.spec.detector.pivot == "beam" and p.spec.detector.pix0_vector_mm == [95, 55, -45]
    assert any("-pix0_vector_mm" in w and "no effect" in w for w in p.warnings)
    s = _golden("G11_mosaic_phi", inputs_dir).spec
    assert (s.crystal.mosaic_deg, s.crystal.mosaic_domains, s.crystal.mosaic_seed) == (0.8, 12, 99)
    assert (s.crystal.phi_deg, s.crystal.osc_deg, s.crystal.phisteps) == (0, 2, 4)
    s = _golden("G12_div_disp_polar", inputs_dir).spec
    assert s.beam.hdivrange_mrad == s.beam.vdivrange_mrad == 1.0
    assert s.beam.hdivsteps == s.beam.vdivsteps == 3 and s.beam.dispersion_pct == 1.0
    assert s.beam.kahn_factor == 0.9
    s = _golden("G16_thick_abs_os3", inputs_dir).spec
    assert (s.detector.thick_um, s.detector.attenuation_um, s.detector.thicksteps) == (300, 500, 3)
    s = _golden("G17_water_flux_noise", inputs_dir).spec
    assert s.beam.flux_ph_per_s == 1e14 and s.beam.beamsize_mm == 0.01 and s.crystal.water_um == 50
    s = _golden("G18_curved", inputs_dir).spec
    assert s.detector.curved
    s = _golden("G19_roi_nopolar", inputs_dir).spec
    assert s.detector.roi == [50, 150, 60, 120] and s.beam.nopolar
    s = _golden("G22_energy_rect", inputs_dir).spec
    assert s.beam.wavelength_A == pytest.approx(12398.42 / 9000, rel=1e-15)
    assert (s.detector.fpixels, s.detector.spixels) == (200, 150)
    p = _golden("G23_misset_random", inputs_dir)
    assert p.spec.crystal.misset_random and p.spec.crystal.misset_seed == 31
    assert p.spec.crystal.misset_deg is None and p.warnings == []
    s = _golden("G24_point_pixel_xtalsize", inputs_dir).spec
    assert s.crystal.size_x_mm == s.crystal.size_y_mm == s.crystal.size_z_mm == 0.0004
    assert s.detector.point_pixel


# ---------------------------------------------------------------------------------------------
# units and synonyms
# ---------------------------------------------------------------------------------------------

def test_units_are_the_spec_units():
    s = P("-distance 120 -close_distance 110 -pixel 0.172 -Xbeam 20 -Ybeam 21 -water 3 -dmin 2.5 "
          "-detector_thick 450 -detector_abs 320 -beamsize 0.05 -divergence 0.5 -dispersion 0.2 "
          "-mosaic 0.3 -phi 10 -osc 1 -twotheta 5 -detector_rotx 1").spec
    d, b, c = s.detector, s.beam, s.crystal
    assert (d.distance_mm, d.close_distance_mm, d.pixel_mm, d.xbeam_mm, d.ybeam_mm) == (120, 110, 0.172, 20, 21)
    assert (d.thick_um, d.attenuation_um, d.twotheta_deg, d.rotx_deg) == (450, 320, 5, 1)
    assert (c.water_um, b.dmin_A, b.beamsize_mm, b.dispersion_pct) == (3, 2.5, 0.05, 0.2)
    assert (b.hdivrange_mrad, b.vdivrange_mrad) == (0.5, 0.5)
    assert (c.mosaic_deg, c.phi_deg, c.osc_deg) == (0.3, 10, 1)


def test_energy_to_wavelength_and_last_wins():
    assert P("-energy 12398.42").spec.beam.wavelength_A == pytest.approx(1.0)
    assert P("-energy 12398.42 -lambda 2").spec.beam.wavelength_A == 2.0
    assert P("-lambda 2 -energy 6199.21").spec.beam.wavelength_A == pytest.approx(2.0)
    with pytest.raises(FrontendError, match="-energy"):
        P("-energy 0")


def test_detector_size_flags():
    d = P("-detpixels 300").spec.detector
    assert (d.fpixels, d.spixels) == (300, 300)
    d = P("-detpixels_x 300 -detpixels_y 200").spec.detector
    assert (d.fpixels, d.spixels) == (300, 200)
    d = P("-detsize 51.2").spec.detector
    assert (d.detsize_f_mm, d.detsize_s_mm) == (51.2, 51.2)
    d = P("-detsize 51.2 -detsize_s 20").spec.detector
    assert (d.detsize_f_mm, d.detsize_s_mm) == (51.2, 20)


def test_crystal_size_and_N_order():
    c = P("-xtalsize 0.01").spec.crystal
    assert c.size_x_mm == c.size_y_mm == c.size_z_mm == 0.01          # -xtalsize is all three axes
    c = P("-samplesize 0.01 -sample_height 0.002 -width 0.003").spec.crystal
    assert (c.size_x_mm, c.size_y_mm, c.size_z_mm) == (0.01, 0.003, 0.002)
    c = P("-Na 3 -N 5").spec.crystal                                  # -N sets all three, in order
    assert (c.N, c.Na, c.Nb, c.Nc) == (5, None, None, None)
    c = P("-N 5 -Na 3").spec.crystal
    assert (c.N, c.Na, c.Nb, c.Nc) == (5, 3, None, None)


@pytest.mark.parametrize("flag,key,value", [
    ("-mosaic_spread 0.2", "crystal.mosaic_deg", 0.2),
    ("-mosaicity 0.2", "crystal.mosaic_deg", 0.2),
    ("-mosaic_domains 7", "crystal.mosaic_domains", 7),
    ("-mosaic_dom 7", "crystal.mosaic_domains", 7),
    ("-wavelength 1.5", "beam.wavelength_A", 1.5),
    ("-wave 1.5", "beam.wavelength_A", 1.5),
    ("-detector_absorb 200", "detector.attenuation_um", 200),
    ("-detector_absorption 200", "detector.attenuation_um", 200),
    ("-sample_heigh 0.1", "crystal.size_z_mm", 0.1),
    ("-xtal_height 0.1", "crystal.size_z_mm", 0.1),
    ("-heigh 0.1", "crystal.size_z_mm", 0.1),
    ("-xtal_thick 0.1", "crystal.size_x_mm", 0.1),
    ("-sample_y 0.1", "crystal.size_y_mm", 0.1),
    ("-thicksteps 4", "detector.thicksteps", 4),
    ("-detector_thicksteps 4", "detector.thicksteps", 4),
    ("-binary_spots", "crystal.shape", "tophat"),
    ("-matrix A.mat", "crystal.matrix_file", "A.mat"),
    ("-curved_detector 1", "detector.curved", True),
])
def test_synonyms(flag, key, value, inputs_dir):
    s = P(flag, cwd=inputs_dir).spec
    group, name = key.split(".")
    assert getattr(getattr(s, group), name) == value


def test_lookup_is_exact_or_declared_prefix():
    assert lookup_flag("-mosaic").name == "-mosaic"
    assert lookup_flag("-mosaic_seed").name == "-mosaic_seed"
    assert lookup_flag("-mosaic_domainsXYZ").name == "-mosaic_domains"
    assert lookup_flag("-distancefoo") is None      # upstream's strstr would accept this
    assert lookup_flag("-hdiv") is None and lookup_flag("-dispstep") is None
    assert lookup_flag("-detsize_x") is None


def test_polar_and_nopolar_order():
    assert P("-nopolar -polar 0.5").spec.beam.nopolar is False        # -polar clears -nopolar
    b = P("-polar 0.5 -nopolar").spec.beam
    assert b.nopolar is True and b.kahn_factor == 0.5


def test_detector_abs_inf_means_no_thickness():
    d = P("-detector_thick 300 -detector_abs inf").spec.detector
    assert d.thick_um == 0 and d.attenuation_um is None
    p = P("-detector_abs inf -detector_thick 300")
    assert p.spec.detector.thick_um == 300
    assert any("-detector_abs" in w for w in p.warnings)


def test_cell_short_forms():
    s = parse_argv(["-cell", "50", "-default_F", "1"], cwd="/").spec
    assert s.crystal.cell_A_deg == [50, 50, 50, 90, 90, 90]
    s = parse_argv(["-cell", "50", "60", "70", "-default_F", "1"], cwd="/").spec
    assert s.crystal.cell_A_deg == [50, 60, 70, 90, 90, 90]


def test_misset_forms():
    c = P("-misset 1 -2 3").spec.crystal
    assert c.misset_deg == [1, -2, 3] and not c.misset_random
    c = P("-misset 1 2 3 -misset random -misset_seed 4").spec.crystal
    assert c.misset_random and c.misset_deg is None and c.misset_seed == 4


def test_misset_seed_quirk_faithful_only():
    # upstream's strstr("-misset") also matches -misset_seed and reads the next three words
    p = P("-misset random -misset_seed 31 -N 5")
    assert p.spec.crystal.misset_random is False
    assert p.spec.crystal.misset_deg == [31.0, 0.0, 5.0]
    assert any("quirk misset_seed_reads_misset" in w for w in p.warnings)
    p = P("-misset random -misset_seed 31 -N 5 --quirks physical")
    assert p.spec.crystal.misset_random is True and p.spec.crystal.misset_deg is None
    # at the end of argv (fewer than 3 words follow) nothing happens
    p = P("-misset random -misset_seed 31")
    assert p.spec.crystal.misset_random is True and p.warnings == []


def test_phi_flags_stored_as_given():
    c = P().spec.crystal                             # "not given" stays None (engine defaults)
    assert (c.phi_deg, c.osc_deg, c.phisteps, c.phistep_deg) == (0.0, None, None, None)
    c = P("-phisteps 4").spec.crystal
    assert (c.osc_deg, c.phisteps, c.phistep_deg) == (None, 4, None)
    c = P("-osc 0 -phistep 0.25").spec.crystal
    assert (c.osc_deg, c.phisteps, c.phistep_deg) == (0.0, None, 0.25)


def test_curved_det_dummy_argument():
    assert P("-curved_det 1").spec.detector.curved
    assert P("-curved_det -point_pixel").spec.detector.curved
    p = P("-curved_det")                             # upstream ignores it as the last word
    assert not p.spec.detector.curved and any("-curved_det" in w for w in p.warnings)
    assert P("-curved_det --quirks physical").spec.detector.curved


# ---------------------------------------------------------------------------------------------
# convention and pivot rules
# ---------------------------------------------------------------------------------------------

VECTOR_FLAGS = ["-fdet_vector", "-sdet_vector", "-odet_vector", "-beam_vector", "-polar_vector",
                "-spindle_axis", "-twotheta_axis", "-pix0_vector", "-pix0_vector_mm"]


@pytest.mark.parametrize("flag", VECTOR_FLAGS)
def test_vector_flags_switch_to_custom(flag):
    p = P(f"{flag} 0 1 0")
    assert p.spec.detector.convention == "custom"
    assert p.spec.detector.pivot in ("beam", "sample")


def test_vector_values_and_pix0_units():
    s = P("-fdet_vector 0 0 1 -beam_vector 1 0 0 -spindle_axis 0 1 0 -pix0_vector 0.1 0.02 -0.03").spec
    assert s.detector.fdet_vector == [0, 0, 1] and s.beam.beam_vector == [1, 0, 0]
    assert s.crystal.spindle_axis == [0, 1, 0]
    assert s.detector.pix0_vector_mm == pytest.approx([100, 20, -30])     # -pix0_vector is metres
    assert P("-pix0_vector_mm 100 20 -30").spec.detector.pix0_vector_mm == [100, 20, -30]


def test_later_convention_flag_overrides_vectors():
    p = P("-fdet_vector 1 0 0 -xds")
    assert p.spec.detector.convention == "xds" and p.spec.detector.fdet_vector is None
    assert any("-fdet_vector" in w and "no effect" in w for w in p.warnings)
    p = P("-xds -fdet_vector 1 0 0")
    assert p.spec.detector.convention == "custom" and p.spec.detector.fdet_vector == [1, 0, 0]


@pytest.mark.parametrize("args,pivot", [
    ("-fdet_vector 0 0 1", "beam"),                                   # custom default
    ("-fdet_vector 0 0 1 -twotheta 5", "sample"),
    ("-fdet_vector 0 0 1 -twotheta 5 -distance 90", "beam"),          # last one wins
    ("-fdet_vector 0 0 1 -distance 90 -ORGX 10", "sample"),
    ("-fdet_vector 0 0 1 -distance 90 -Xclose 10", "sample"),
    ("-fdet_vector 0 0 1 -close_distance 90 -Ybeam 10", "beam"),
    ("-fdet_vector 0 0 1 -twotheta 5 -pivot beam", "beam"),
    ("-pivot sample -fdet_vector 0 0 1 -distance 90", "beam"),
    ("-xds -fdet_vector 0 0 1", "sample"),                            # convention flags set it too
    ("-dials -fdet_vector 0 0 1", "beam"),                            # upstream: -dials sets BEAM
    ("-distance 90 -twotheta_axis 0 1 0", "sample"),                  # -twotheta_axis ~ -twotheta
])
def test_custom_pivot_from_last_flag(args, pivot):
    assert P(args).spec.detector.pivot == pivot


def test_non_custom_pivot_only_from_explicit_flag():
    assert P("-twotheta 10").spec.detector.pivot is None
    assert P("-xds -distance 100").spec.detector.pivot is None
    p = P("-pivot sample")
    assert p.spec.detector.pivot == "sample"
    assert any("forces pivot beam" in w for w in p.warnings)
    assert P("-xds -pivot sample").warnings == []


def test_twotheta_axis_quirk():
    d = P("-twotheta_axis 3 0 1").spec.detector
    assert d.twotheta_axis == [3, 0, 1] and d.twotheta_deg == 3.0
    d = P("-twotheta_axis 3 0 1 -twotheta 7").spec.detector
    assert d.twotheta_deg == 7.0
    d = P("-twotheta_axis 3 0 1 --quirks physical").spec.detector
    assert d.twotheta_deg == 0.0 and d.pivot == "beam"


def test_convention_irrelevant_flag_warnings():
    assert any("-Xbeam" in w for w in P("-xds -Xbeam 10").warnings)
    assert any("-ORGX" in w for w in P("-ORGX 10").warnings)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,pattern", [
    ("-dispstep 3", r"unknown flag -dispstep .*-dispsteps"),
    ("-hdiv 0.2", r"unknown flag -hdiv .*-hdivrange"),
    ("-detsize_x 10", r"unknown flag -detsize_x .*-detsize_f"),
    ("-distancefoo 10", r"unknown flag -distancefoo"),
    ("-distance", r"^-distance: missing value"),
    ("-fdet_vector 0 1", r"^-fdet_vector: missing value"),
    ("-distance abc", r"^-distance: expected a number, got 'abc'"),
    ("-distance -pixel 0.1", r"^-distance: expected a number, got '-pixel'"),
    ("-N 2.5", r"^-N: expected an integer, got '2.5'"),
    ("-roi 0 10 0", r"^-roi: missing value"),
    ("-pivot middle", r"^-pivot: expected 'beam' or 'sample'"),
    ("-distance -5", r"^-distance: must be > 0, got -5"),
    ("-pixel 0", r"^-pixel: must be > 0"),
    ("-detpixels 0", r"^-detpixels: must be an integer >= 1"),
    ("-polar 3", r"^-polar: must be in \[-1, 1\]"),
    ("-oversample 0", r"^-oversample: must be an integer >= 1"),
    ("-cell 100 100 100 90 90 190", r"^-cell: cell angles"),
    ("-hkl", r"^-hkl: missing value"),
    ("-hkl -N 2", r"^-hkl: missing value \(expected a file name, got flag -N\)"),
    ("-hkl does_not_exist.hkl", r"^-hkl: file not found"),
    ("17", r"unexpected argument '17'"),
    ("--frobnicate", r"unknown option --frobnicate"),
    ("--device tpu", r"^--device: expected cpu or cuda"),
    ("--dtype float16", r"^--dtype"),
    ("--quirks lax", r"^--quirks"),
    ("--memory-budget-mb -1", r"^--memory-budget-mb"),
    ("--device", r"^--device: missing value"),
])
def test_errors_name_the_flag(args, pattern):
    with pytest.raises(FrontendError, match=pattern):
        P(args)


def test_frontend_error_is_value_error():
    assert issubclass(FrontendError, ValueError)


def test_no_cell_and_no_F_source(tmp_path):
    with pytest.raises(FrontendError, match="no unit cell"):
        parse_argv(["-default_F", "1"], cwd=str(tmp_path))
    with pytest.raises(FrontendError, match="no structure factors"):
        parse_argv(["-cell", "50"], cwd=str(tmp_path))
    with pytest.raises(FrontendError, match="no unit cell"):
        parse_argv([], cwd=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# no-effect flags, nbsim options, outputs, debug flags
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", ["-stol x.stol", "-4stol x", "-Q x", "-stolout o.stol",
                                  "-density 1.2", "-sample_density 1.2", "-MW 1000",
                                  "-molecules 3", "-coherent", "-printout", "-printout_pixel 3 4"])
def test_no_effect_flags_warn(args):
    p = P(args)
    assert p.spec == P().spec
    assert any(args.split()[0] in w and "no effect" in w for w in p.warnings)


def test_double_dash_options():
    p = P("--device cuda --dtype=float32 --quirks physical --memory-budget-mb 512 --compile")
    assert p.device == DeviceSpec(device="cuda", dtype="float32", memory_budget_mb=512.0, compile=True)
    assert p.spec.quirks == "physical"
    assert P().device == DeviceSpec() and P().spec.quirks == "faithful"
    assert P().device.compile == "auto"
    assert P("--no-compile").device.compile is False
    with pytest.raises(FrontendError, match="^--no-compile: takes no value"):
        P("--no-compile=1")


def test_outputs():
    o = P().outputs
    assert (o.floatfile, o.intfile, o.noisefile, o.pgmfile) == ("floatimage.bin", "intimage.img",
                                                                "noiseimage.img", "image.pgm")
    assert o.paths() == {"float_path": "floatimage.bin", "int_path": "intimage.img",
                         "noise_path": "noiseimage.img", "pgm_path": "image.pgm", "cbf_path": None,
                         "nexus_path": None}
    p = P("-nonoise -nopgm -floatfile f.bin -intimage i.img")
    assert p.outputs.paths() == {"float_path": "f.bin", "int_path": "i.img", "noise_path": None,
                                 "pgm_path": None, "cbf_path": None, "nexus_path": None}
    assert p.spec.image.noise is False
    p = P("-nonoise -noisefile n.img -nopgm -pgmscale 3")
    assert p.outputs.paths()["noise_path"] == "n.img" and p.spec.image.noise is True
    assert p.outputs.paths()["pgm_path"] == "image.pgm" and p.spec.image.pgm_scale == 3
    s = P("-scale 2 -adc 10 -seed 42").spec.image
    assert (s.int_scale, s.adc, s.noise_seed) == (2, 10, 42)


def test_debug_flags():
    p = P("-trace_pixel 533 654")
    assert p.trace_pixel == (533, 654) and p.progress
    assert P("-noprogress").progress is False
    p = P("-printout_pixel 3 4")
    assert p.printout and p.printout_pixel == (3, 4) and p.progress is False


def test_help():
    assert parse_argv(["-h"]).help and parse_argv(["--help"]).help
    text = usage()
    for f in FLAGS:
        for name in f.names:
            assert name in text


# ---------------------------------------------------------------------------------------------
# Fdump cache (quirk 12)
# ---------------------------------------------------------------------------------------------

def test_fdump_cache(tmp_path, inputs_dir):
    d = str(tmp_path)
    assert parse_argv(BASE, cwd=d).spec.crystal.fdump_file is None
    (tmp_path / "Fdump.bin").write_bytes(b"0 0 0 0 0 0\n\f" + b"\0" * 64)
    p = parse_argv(BASE, cwd=d)
    assert p.spec.crystal.fdump_file == "Fdump.bin"
    assert any("Fdump.bin" in w for w in p.warnings)
    p = parse_argv(["-cell", "50"], cwd=d)                 # the cache is an F source
    assert p.spec.crystal.fdump_file == "Fdump.bin"
    p = parse_argv(BASE + ["--quirks", "physical"], cwd=d)
    assert p.spec.crystal.fdump_file is None and any("ignoring" in w for w in p.warnings)
    p = parse_argv(BASE + ["--quirks", "physical", "-dump", "Fdump.bin"], cwd=d)
    assert p.spec.crystal.fdump_file == "Fdump.bin"
    hkl = str(Path(inputs_dir) / "P1.hkl")
    p = parse_argv(BASE + ["-hkl", hkl, "-dump", "my.dump"], cwd=d)
    assert p.spec.crystal.fdump_file == "my.dump" and p.dump_file == "my.dump"


# ---------------------------------------------------------------------------------------------
# -img / -mask headers
# ---------------------------------------------------------------------------------------------

def write_smv(path, fields, shape, data=None):
    s = "{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
    s += f"SIZE1={shape[1]};\nSIZE2={shape[0]};\n"
    s += "".join(f"{k}={v};\n" for k, v in fields.items()) + "}\f"
    raw = s.encode().ljust(512, b" ")
    arr = np.ones(shape, "<u2") if data is None else np.asarray(data, "<u2")
    Path(path).write_bytes(raw + arr.tobytes())


def test_img_header_defaults(tmp_path):
    write_smv(tmp_path / "h.img", {"PIXEL_SIZE": 0.172, "DISTANCE": 250, "WAVELENGTH": 0.97,
                                   "BEAM_CENTER_X": 10.5, "BEAM_CENTER_Y": 12.5, "XDS_ORGX": 60.5,
                                   "XDS_ORGY": 70.5, "CLOSE_DISTANCE": 240, "PHI": 3,
                                   "OSC_START": 3, "OSC_RANGE": 0.5, "TWOTHETA": 20}, (30, 40))
    p = parse_argv(BASE + ["-img", "h.img"], cwd=str(tmp_path))
    d, c = p.spec.detector, p.spec.crystal
    assert (d.fpixels, d.spixels, d.pixel_mm) == (40, 30, 0.172)
    # upstream ValueOf() takes the LAST occurrence: DISTANCE finds CLOSE_DISTANCE's value
    assert (d.distance_mm, d.close_distance_mm) == (240, 240)
    assert p.spec.beam.wavelength_A == 0.97
    assert (d.xbeam_mm, d.ybeam_mm, d.orgx_px, d.orgy_px) == (10.5, 12.5, 60.5, 70.5)
    assert (c.phi_deg, c.osc_deg) == (3, 0.5)
    assert d.twotheta_deg == 0                         # upstream reads it into an unused variable
    assert d.pivot is None and d.mask_file is None
    p = parse_argv(["-img", "h.img"] + BASE + ["-pixel", "0.1", "-detpixels", "64"], cwd=str(tmp_path))
    assert (p.spec.detector.pixel_mm, p.spec.detector.fpixels) == (0.1, 64)   # flags override
    assert not any("CLOSE_DISTANCE" in w for w in p.warnings)
    p = parse_argv(BASE + ["-img", "h.img", "-distance", "300"], cwd=str(tmp_path))
    assert p.spec.detector.distance_mm == 300 and p.spec.detector.close_distance_mm == 240
    assert any("CLOSE_DISTANCE takes precedence" in w for w in p.warnings)


def test_mask_header_inverts_beam_y(tmp_path):
    write_smv(tmp_path / "m.img", {"PIXEL_SIZE": 0.2, "BEAM_CENTER_Y": 1.5}, (30, 40))
    p = parse_argv(BASE + ["-mask", "m.img"], cwd=str(tmp_path))
    d = p.spec.detector
    assert d.mask_file == "m.img" and (d.fpixels, d.spixels) == (40, 30)
    assert d.ybeam_mm == pytest.approx(0.2 * 30 - 1.5)
    # the round trip writes the header-affected values explicitly
    a = spec_to_argv(p.spec)
    assert parse_argv(a, cwd=str(tmp_path)).spec == p.spec


def test_bad_smv(tmp_path):
    (tmp_path / "x.img").write_bytes(b"not an image" * 50)
    with pytest.raises(FrontendError, match="^-img: .*SMV"):
        parse_argv(BASE + ["-img", "x.img"], cwd=str(tmp_path))
    with pytest.raises(FrontendError, match="^-mask: nope.img: no such file"):
        parse_argv(BASE + ["-mask", "nope.img"], cwd=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# round trip of hand-made specs
# ---------------------------------------------------------------------------------------------

def _specs():
    yield ExperimentSpec(crystal=CrystalSpec(cell_A_deg=[50.0, 60, 70, 80, 95, 100], default_F=3))
    yield ExperimentSpec(
        detector=DetectorSpec(convention="custom", pivot="sample", distance_mm=123.25,
                              close_distance_mm=120.5, pixel_mm=0.0752, fpixels=321, spixels=123,
                              xbeam_mm=1.5, ybeam_mm=-2.25, rotx_deg=1, roty_deg=-2, rotz_deg=0.5,
                              twotheta_deg=12.5, fdet_vector=[0, 0, 1.0], sdet_vector=[0, -1, 0.0],
                              odet_vector=[1, 0, 0.0], twotheta_axis=[0, 0.6, 0.8],
                              pix0_vector_mm=[100, 5, -5.0], point_pixel=True, curved=True,
                              thick_um=100, attenuation_um=250, thicksteps=4, oversample=2,
                              oversample_thick=True, oversample_polar=True, oversample_omega=True,
                              roi=[1, 20, 3, 40]),
        beam=BeamSpec(wavelength_A=0.7749, dispersion_pct=0.5, dispsteps=5, hdivrange_mrad=0.3,
                      vdivrange_mrad=0.2, hdivstep_mrad=0.1, vdivstep_mrad=0.05, hdivsteps=3,
                      vdivsteps=5, round_div=False, fluence_ph_per_m2=1e24, flux_ph_per_s=1e12,
                      exposure_s=0.1, beamsize_mm=0.02, kahn_factor=-0.5, nopolar=True,
                      beam_vector=[1, 0, 0.0], polar_vector=[0, 1, 0.0], dmin_A=1.5),
        crystal=CrystalSpec(cell_A_deg=[78, 78, 38, 90, 90, 90], misset_deg=[1.5, -2, 3],
                            misset_seed=5, N=3, Na=2, Nc=7, size_x_mm=1e-3, size_z_mm=2e-3,
                            shape="gauss", fudge=0.5, default_F=10, interpolate=False,
                            mosaic_deg=0.25, mosaic_domains=4, mosaic_seed=77, phi_deg=-10,
                            osc_deg=0.0, phisteps=3, phistep_deg=0.125, spindle_axis=[0, 1, 0.0],
                            water_um=12.5),
        image=ImageSpec(adc=0, int_scale=1.5, pgm_scale=2.5, noise=False, noise_seed=-3),
        quirks="physical")
    yield ExperimentSpec(detector=DetectorSpec(convention="xds", orgx_px=100.5, orgy_px=90,
                                               xclose_mm=3, yclose_mm=4, detsize_f_mm=30,
                                               detsize_s_mm=20),
                         crystal=CrystalSpec(cell_A_deg=[40.0] * 3 + [90.0] * 3, default_F=1,
                                             misset_random=True, misset_seed=9, interpolate=True,
                                             size_x_mm=0.1, size_y_mm=0.1, size_z_mm=0.1))
    yield ExperimentSpec(detector=DetectorSpec(convention="dials", pivot="beam"),
                         crystal=CrystalSpec(cell_A_deg=[40.0] * 3 + [90.0] * 3, default_F=1,
                                             misset_seed=12345))
    yield ExperimentSpec(detector=DetectorSpec(convention="adxv"), crystal=CrystalSpec(
        cell_A_deg=[40.0] * 3 + [90.0] * 3, default_F=1, osc_deg=0.5, shape="tophat"))
    yield ExperimentSpec(detector=DetectorSpec(convention="denzo"), crystal=CrystalSpec(
        cell_A_deg=[40.0] * 3 + [90.0] * 3, default_F=1, phisteps=4, shape="round"))
    yield ExperimentSpec(detector=DetectorSpec(convention="custom", pivot="beam",
                                               twotheta_axis=[1, 0, 0.0], twotheta_deg=0.0),
                         crystal=CrystalSpec(cell_A_deg=[40.0] * 3 + [90.0] * 3, default_F=1))


@pytest.mark.parametrize("spec", list(_specs()))
def test_round_trip_hand_made(spec):
    spec.validate()
    argv = spec_to_argv(spec)
    p = parse_argv(argv, cwd="/")
    assert p.spec == spec, argv
    for compile_ in (True, False, "auto"):
        dev = DeviceSpec(device="cuda", dtype="float32", memory_budget_mb=100.0, compile=compile_)
        p = parse_argv(spec_to_argv(spec, dev), cwd="/")
        assert p.spec == spec and p.device == dev


def test_round_trip_fdump_without_hkl(tmp_path):
    (tmp_path / "cache.bin").write_bytes(b"0 0 0 0 0 0\n\f")
    spec = ExperimentSpec(crystal=CrystalSpec(cell_A_deg=[40.0] * 3 + [90.0] * 3,
                                              fdump_file="cache.bin"))
    for quirks in ("faithful", "physical"):
        spec.quirks = quirks
        assert parse_argv(spec_to_argv(spec), cwd=str(tmp_path)).spec == spec


def test_to_argv_rejects_inexpressible():
    s = ExperimentSpec(detector=DetectorSpec(fdet_vector=[1, 0, 0.0]),
                       crystal=CrystalSpec(cell_A_deg=[40.0] * 3 + [90.0] * 3, default_F=1))
    with pytest.raises(FrontendError, match="custom"):
        spec_to_argv(s)


# ---------------------------------------------------------------------------------------------
# the CLI wrapper
# ---------------------------------------------------------------------------------------------

def test_main_help(capsys):
    from nbsim.nanobragg import main
    assert main(["--help"]) == 0
    assert "-distance" in capsys.readouterr().out


@pytest.mark.parametrize("args,pattern", [
    (["-distance", "abc"], "-distance: expected a number"),
    (BASE + ["-distance", "-5"], "-distance: must be > 0"),
    (["-default_F", "1"], "no unit cell"),
])
def test_main_errors_one_line_exit_2(args, pattern, capsys, tmp_path, monkeypatch):
    from nbsim.nanobragg import main
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nbsim.nanobragg: error: ") and pattern in err
    assert list(tmp_path.iterdir()) == []


def test_main_runs_and_writes(monkeypatch, capsys, tmp_path):
    """main() with stand-ins for the engine and the writers: call contract and printed lines."""
    from nbsim import nanobragg
    calls = {}

    from nbsim.api import RunStats

    class Setup:                                 # stands in for nbsim.report.SetupReport
        def to_dict(self):
            return {"fpixels": 5, "spixels": 4}

    class Result:
        setup = Setup()
        stats = RunStats(max_I=12.5, max_I_at_m=(0.001, 0.002), mean=1.0, rms=2.0, rmsd=3.0, sum=0.0,
                         pixels=20, omega_sum_sr=0.1)
        mask = np.ones((4, 5), bool)
        roi_mask = np.ones((4, 5), bool)
        warnings = ["engine says hi"]
        log = ["mosflm convention selected."]
        trace = ["TRACE_C: pix0_vector_meters 0 0 0"]

        def float32(self):
            return np.zeros((4, 5), np.float32)

    def simulate(spec, device=None, *, base_dir=".", progress=None, trace_pixel=None):
        calls["sim"] = (spec, device, base_dir, trace_pixel)
        if progress:
            progress(20, 20)
        return Result()

    def write_products(img, mask, info, image_spec, *, float_path=None, int_path=None,
                       noise_path=None, pgm_path=None, cbf_path=None, nexus_path=None,
                       nexus_dtype=None, nexus_compression=None, active=None, stats=None):
        assert (cbf_path, nexus_path, nexus_dtype, nexus_compression) == (None, None, "float32", "none")
        calls["write"] = (img.shape, float_path, int_path, noise_path, pgm_path)
        calls["image_spec"] = image_spec
        return {"intfile_scale": 4400.0, "pgm_scale": None, "photons": 123.0, "overloads": 0}

    monkeypatch.setitem(sys.modules, "nbsim.api", types.SimpleNamespace(simulate=simulate))
    import nbsim.io.products as products
    monkeypatch.setattr(products, "write_products", write_products)   # the real write_result calls it
    monkeypatch.chdir(tmp_path)
    rc = nanobragg.main(BASE + ["-detpixels", "5", "-nopgm", "-seed", "7", "-trace_pixel", "1", "2", "-coherent",
                                "-floatfile", "f.bin"])
    assert rc == 0
    spec, device, base_dir, tp = calls["sim"]
    assert spec.detector.fpixels == 5 and base_dir == str(tmp_path) and tp == (1, 2)
    assert calls["write"] == ((4, 5), "f.bin", "intimage.img", "noiseimage.img", None)
    assert calls["image_spec"]["noise_seed"] == -7          # upstream's internal seed
    out = capsys.readouterr().out
    for line in ("WARNING: -coherent: has no effect", "mosflm convention selected.",
                 "WARNING: engine says hi", "TRACE_C: pix0_vector_meters", "100% done",
                 "max_I = 12.5  at 0.001 0.002", "mean= 1 rms= 2 rmsd= 3", "intfile_scale = 4400",
                 "123 photons on noise image (0 overloads)", "writing f.bin as 20 4-byte floats",
                 "writing noiseimage.img as 2-byte integers",
                 "\nsolid angle subtended by detector = 0.1 steradian ( 0.795775% sphere)\n"):
        assert line in out, line
    assert "image.pgm" not in out


def test_main_maps_engine_spec_errors_to_flags(monkeypatch, capsys, tmp_path):
    from nbsim import nanobragg

    def simulate(spec, device=None, **kw):
        raise SpecError("crystal.misset_seed", "crystal.misset_random needs a misset_seed")

    monkeypatch.setitem(sys.modules, "nbsim.api", types.SimpleNamespace(simulate=simulate))
    monkeypatch.chdir(tmp_path)
    assert nanobragg.main(BASE + ["-misset", "random", "-noprogress"]) == 2
    err = capsys.readouterr().err
    assert err == "nbsim.nanobragg: error: -misset_seed: crystal.misset_random needs a misset_seed\n"
    assert list(tmp_path.iterdir()) == []
