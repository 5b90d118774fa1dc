"""nanoBragg-compatible command line -> ``ExperimentSpec``.

The flags, their synonyms, units and interactions follow the upstream C program (see
``shared/NANOBRAGG_NOTES.md`` section 3), with one deliberate difference: upstream silently ignores
unknown flags and turns missing or garbage values into 0; here those are errors (``FrontendError``,
whose message names the flag).  Flags that upstream accepts but that change nothing are accepted with
a warning in ``Parsed.warnings``.

Structure
---------
* ``FLAGS`` is a table of ``Flag`` entries: spellings (exact names and C-style truncation prefixes),
  the kind of value, the spec key(s) written, the detector pivot the flag implies and whether it
  switches the convention to CUSTOM.
* ``parse_argv`` tokenizes argv against the table (errors for unknown flags and bad values), pre-reads
  the SMV headers of ``-mask`` and ``-img`` (their values are defaults the flags override), applies the
  flags in argv order, then resolves the argv-order rules of the C program (convention, pivot, phi
  defaults, Fdump cache) and validates the spec, mapping ``SpecError`` keys back to flag names.

Quirks (``--quirks faithful``, the default) reproduce the C parser's cross-matches that change the
result: ``-twotheta_axis`` also sets ``-twotheta`` to its first component (and pivot SAMPLE) and
``-misset_seed N`` also reads a misset from the three following argv words.  ``--quirks physical``
does not apply them and does not silently reuse a stale ``Fdump.bin``; ``--fix NAME,NAME`` fixes
just the named quirks (``nbsim.quirks``; the "command line" ones are applied here).
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nbsim import quirks as _quirks
from nbsim.spec import DeviceSpec, ExperimentSpec, SpecError

__all__ = ["FrontendError", "Flag", "FLAGS", "OutputFiles", "Parsed", "parse_argv", "usage",
           "lookup_flag", "spec_error_message", "DEFAULT_DUMP_FILE"]

DEFAULT_DUMP_FILE = "Fdump.bin"
HC_EV_A = 12398.42          # the constant nanoBragg uses for -energy: lambda[A] = 12398.42 / E[eV]


class FrontendError(ValueError):
    """A command-line problem; the message names the flag."""


# ---------------------------------------------------------------------------------------------
# value syntax
# ---------------------------------------------------------------------------------------------

_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_INT_RE = re.compile(r"[+-]?\d+$")
_ATOF_RE = re.compile(r"\s*([+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))",
                      re.IGNORECASE)


def _c_atof(s: str) -> float:
    """C ``atof``: the longest numeric prefix, 0.0 when there is none (only used for C quirks)."""
    m = _ATOF_RE.match(s)
    return float(m.group(1)) if m else 0.0


def _is_number(tok: str) -> bool:
    return bool(_FLOAT_RE.match(tok))


def _to_float(flag: str, tok: str) -> float:
    if not _FLOAT_RE.match(tok):
        raise FrontendError(f"{flag}: expected a number, got {tok!r}")
    return float(tok)


def _to_int(flag: str, tok: str) -> int:
    if not _INT_RE.match(tok):
        raise FrontendError(f"{flag}: expected an integer, got {tok!r}")
    return int(tok)


# ---------------------------------------------------------------------------------------------
# the flag table
# ---------------------------------------------------------------------------------------------

# value kinds: number of argv words consumed and their type
#   ""     switch, no value              "f"   one number          "i"   one integer
#   "s"    one word (file name)          "f3"  three numbers       "i2"/"i4"  two/four integers
#   "cell" 1..6 numbers (C stops at the first word starting with '-')
#   "misset"  three numbers or the word "random"
#   "pivot"   "beam" or "sample"         "abs"  a number or "inf"
#   "dummy"   optional ignored word (upstream -curved_det needs a following argument)
_NARGS = {"": 0, "f": 1, "i": 1, "s": 1, "f3": 3, "i2": 2, "i4": 4, "misset": 1, "pivot": 1,
          "abs": 1}


@dataclass(frozen=True)
class Flag:
    names: Tuple[str, ...]                 # exact spellings
    kind: str = ""                         # see _NARGS
    keys: Tuple[str, ...] = ()             # spec keys written with the (converted) value
    action: Optional[str] = None           # special handling (see _Builder.apply)
    prefixes: Tuple[str, ...] = ()         # C truncation matches: any word starting with one of these
    pivot: Optional[str] = None            # pivot implied (only honoured for CUSTOM)
    custom: bool = False                   # switches the convention to CUSTOM
    value: object = None                   # constant for switches (e.g. shape name)
    scale: float = 1.0                     # value multiplier (unit conversion into the spec unit)
    no_effect: Optional[str] = None        # accepted, warns with this reason
    group: str = "misc"
    help: str = ""

    @property
    def name(self) -> str:
        return self.names[0]


def _F(*names, **kw) -> Flag:
    return Flag(names=tuple(names), **kw)


FLAGS: Tuple[Flag, ...] = (
    # ---- crystal
    _F("-cell", kind="cell", keys=("crystal.cell_A_deg",), group="crystal",
       help="a b c alpha beta gamma: unit cell (A, deg); missing b,c = a, angles = 90"),
    _F("-mat", "-matrix", kind="s", keys=("crystal.matrix_file",), action="infile", group="crystal",
       help="FILE: MOSFLM A matrix (reciprocal vectors x lambda), alternative to -cell"),
    _F("-misset", kind="misset", action="misset", group="crystal",
       help="rx ry rz | random: crystal rotation about x, y, z (deg)"),
    _F("-misset_seed", kind="i", keys=("crystal.misset_seed",), action="misset_seed", group="crystal",
       help="N: seed for -misset random (give it before -misset)"),
    _F("-N", kind="i", keys=("crystal.N",), action="N", group="crystal",
       help="N: unit cells along every axis"),
    _F("-Na", kind="i", keys=("crystal.Na",), group="crystal", help="N: cells along a"),
    _F("-Nb", kind="i", keys=("crystal.Nb",), group="crystal", help="N: cells along b"),
    _F("-Nc", kind="i", keys=("crystal.Nc",), group="crystal", help="N: cells along c"),
    _F("-xtalsize", "-xtal_size", "-samplesize", "-sample_size", kind="f",
       keys=("crystal.size_x_mm", "crystal.size_y_mm", "crystal.size_z_mm"), group="crystal",
       help="mm: crystal size along a, b and c (overrides -N)"),
    _F("-xtal_x", "-xtal_thick", "-sample_x", "-sample_thick", kind="f", keys=("crystal.size_x_mm",),
       group="crystal", help="mm: crystal size along a"),
    _F("-xtal_y", "-xtal_width", "-sample_y", "-sample_width", "-width", kind="f",
       keys=("crystal.size_y_mm",), group="crystal", help="mm: crystal size along b"),
    _F("-xtal_z", "-xtal_height", "-sample_z", "-sample_height", "-height", kind="f",
       keys=("crystal.size_z_mm",), prefixes=("-xtal_heigh", "-sample_heigh", "-heigh"),
       group="crystal", help="mm: crystal size along c"),
    _F("-density", "-sample_density", kind="f", prefixes=("-sample_den",), group="crystal",
       no_effect="upstream overwrites it before use", help="g/cm^3 (no effect)"),
    _F("-MW", "-molecules", kind="f", prefixes=("-molec",), group="crystal",
       no_effect="upstream overwrites it before use", help="g/mol (no effect)"),
    _F("-square_xtal", keys=("crystal.shape",), value="square", group="crystal",
       help="parallelepiped crystal: sincg lattice factor (default)"),
    _F("-round_xtal", keys=("crystal.shape",), value="round", group="crystal",
       help="ellipsoidal crystal"),
    _F("-gauss_xtal", keys=("crystal.shape",), value="gauss", group="crystal",
       help="Gaussian spots"),
    _F("-tophat_spots", "-binary_spots", keys=("crystal.shape",), value="tophat", group="crystal",
       help="top-hat spots"),
    _F("-fudge", kind="f", keys=("crystal.fudge",), group="crystal",
       help="f: scales radius^2 of round/gauss/tophat spots"),
    _F("-mosaic", "-mosaicity", "-mosaic_spread", kind="f", keys=("crystal.mosaic_deg",),
       prefixes=("-mosaici", "-mosaic_spr"), group="mosaic", help="deg: isotropic mosaic spread"),
    _F("-mosaic_domains", "-mosaic_dom", kind="i", keys=("crystal.mosaic_domains",),
       prefixes=("-mosaic_dom",), group="mosaic", help="N: number of mosaic domains"),
    _F("-mosaic_seed", kind="i", keys=("crystal.mosaic_seed",), group="mosaic",
       help="N: seed of the mosaic domains (default 12345678)"),
    _F("-phi", kind="f", keys=("crystal.phi_deg",), group="rotation", help="deg: start angle"),
    _F("-osc", kind="f", keys=("crystal.osc_deg",), group="rotation", help="deg: oscillation range"),
    _F("-phistep", kind="f", keys=("crystal.phistep_deg",), group="rotation", help="deg: phi step"),
    _F("-phisteps", kind="i", keys=("crystal.phisteps",), group="rotation",
       help="N: number of phi steps"),
    _F("-spindle_axis", kind="f3", keys=("crystal.spindle_axis",), custom=True, group="rotation",
       help="x y z: phi rotation axis (switches to CUSTOM)"),
    _F("-water", kind="f", keys=("crystal.water_um",), group="background",
       help="um: water thickness for the background"),
    # ---- structure factors
    _F("-hkl", kind="s", keys=("crystal.hkl_file",), action="infile", group="F",
       help="FILE: text h k l F table, or an MTZ file expanded to P1 (also writes the Fdump file)"),
    _F("-mtz_column", kind="s", keys=("crystal.mtz_column",), group="F",
       help="LABEL or PLUS,MINUS: column of an MTZ -hkl file: F (amplitudes) or J (intensities, F = sqrt(I)), "
            "or an anomalous pair of G or K columns, e.g. 'F(+),F(-)' (F(+)/F(-) alone names the pair); "
            "default: the file's only F column"),
    _F("-model", kind="s", keys=("crystal.model_file",), action="infile", group="F",
       help="FILE: PDB or mmCIF model; F computed with gemmi at the beam's wavelength (instead of -hkl)"),
    _F("-model_dmin", kind="f", keys=("crystal.model_dmin_A",), group="F",
       help="A: resolution of the F computed from -model (default: the detector's edge)"),
    _F("-model_anomalous", keys=("crystal.model_anomalous",), value=True, group="F",
       help="add f' and f'' (Cromer-Liberman, at the wavelength) to the -model form factors"),
    _F("-default_F", kind="f", keys=("crystal.default_F",), group="F",
       help="F: structure factor of every hkl not in the table"),
    _F("-dump", kind="s", action="dump", group="F",
       help="FILE: binary F cache (default Fdump.bin): written with -hkl, read without it"),
    _F("-interpolate", keys=("crystal.interpolate",), value=True, group="F",
       help="force tricubic interpolation of F"),
    _F("-nointerpolate", keys=("crystal.interpolate",), value=False, group="F",
       help="disable interpolation of F"),
    # ---- beam and sources
    _F("-lambda", "-wavelength", "-wave", kind="f", keys=("beam.wavelength_A",), prefixes=("-wave",),
       group="beam", help="A: wavelength"),
    _F("-energy", kind="f", keys=("beam.wavelength_A",), action="energy", group="beam",
       help="eV: photon energy (lambda = 12398.42/E)"),
    _F("-dispersion", kind="f", keys=("beam.dispersion_pct",), group="sources",
       help="%: full spectral range dlambda/lambda"),
    _F("-dispsteps", kind="i", keys=("beam.dispsteps",), group="sources", help="N: wavelengths"),
    _F("-divergence", kind="f", keys=("beam.hdivrange_mrad", "beam.vdivrange_mrad"), group="sources",
       help="mrad: horizontal and vertical divergence range"),
    _F("-hdivrange", kind="f", keys=("beam.hdivrange_mrad",), group="sources", help="mrad"),
    _F("-vdivrange", kind="f", keys=("beam.vdivrange_mrad",), group="sources", help="mrad"),
    _F("-hdivstep", kind="f", keys=("beam.hdivstep_mrad",), group="sources", help="mrad"),
    _F("-vdivstep", kind="f", keys=("beam.vdivstep_mrad",), group="sources", help="mrad"),
    _F("-hdivsteps", kind="i", keys=("beam.hdivsteps",), group="sources", help="N"),
    _F("-vdivsteps", kind="i", keys=("beam.vdivsteps",), group="sources", help="N"),
    _F("-divsteps", kind="i", keys=("beam.hdivsteps", "beam.vdivsteps"), group="sources",
       help="N: horizontal and vertical divergence steps"),
    _F("-round_div", keys=("beam.round_div",), value=True, group="sources",
       help="elliptical cut of the divergence grid (default)"),
    _F("-square_div", keys=("beam.round_div",), value=False, group="sources",
       help="full divergence grid"),
    _F("-sourcefile", kind="s", keys=("beam.source_file",), action="infile", group="sources",
       help="FILE: columns X Y Z I lambda (m); I is ignored"),
    _F("-fluence", kind="f", keys=("beam.fluence_ph_per_m2",), group="beam", help="photons/m^2"),
    _F("-flux", kind="f", keys=("beam.flux_ph_per_s",), group="beam", help="photons/s"),
    _F("-exposure", kind="f", keys=("beam.exposure_s",), group="beam", help="s"),
    _F("-beamsize", kind="f", keys=("beam.beamsize_mm",), group="beam", help="mm"),
    _F("-polar", kind="f", keys=("beam.kahn_factor",), action="polar", group="polarization",
       help="K: Kahn polarization factor (default 0)"),
    _F("-nopolar", keys=("beam.nopolar",), value=True, group="polarization",
       help="polarization factor = 1"),
    _F("-polar_vector", kind="f3", keys=("beam.polar_vector",), custom=True, group="polarization",
       help="x y z: E-vector axis (switches to CUSTOM)"),
    _F("-beam_vector", kind="f3", keys=("beam.beam_vector",), custom=True, group="geometry",
       help="x y z: beam direction (switches to CUSTOM)"),
    _F("-dmin", kind="f", keys=("beam.dmin_A",), group="sampling", help="A: resolution cut-off"),
    # ---- detector geometry
    _F("-distance", kind="f", keys=("detector.distance_mm",), pivot="beam", group="geometry",
       help="mm: sample to beam spot along the beam (pivot beam)"),
    _F("-close_distance", kind="f", keys=("detector.close_distance_mm",), pivot="sample",
       group="geometry", help="mm: sample to detector plane (pivot sample)"),
    _F("-pixel", kind="f", keys=("detector.pixel_mm",), group="geometry", help="mm: pixel size"),
    _F("-detsize", kind="f", keys=("detector.detsize_f_mm", "detector.detsize_s_mm"),
       group="geometry", help="mm: detector size"),
    _F("-detsize_f", kind="f", keys=("detector.detsize_f_mm",), group="geometry", help="mm"),
    _F("-detsize_s", kind="f", keys=("detector.detsize_s_mm",), group="geometry", help="mm"),
    _F("-detpixels", kind="i", keys=("detector.fpixels", "detector.spixels"), group="geometry",
       help="N: detector size in pixels (overrides -detsize)"),
    _F("-detpixels_f", "-detpixels_x", kind="i", keys=("detector.fpixels",), group="geometry",
       help="N: fast pixels"),
    _F("-detpixels_s", "-detpixels_y", kind="i", keys=("detector.spixels",), group="geometry",
       help="N: slow pixels"),
    _F("-Xbeam", kind="f", keys=("detector.xbeam_mm",), pivot="beam", group="geometry",
       help="mm: beam centre X of the convention (pivot beam)"),
    _F("-Ybeam", kind="f", keys=("detector.ybeam_mm",), pivot="beam", group="geometry",
       help="mm: beam centre Y of the convention (pivot beam)"),
    _F("-Xclose", kind="f", keys=("detector.xclose_mm",), pivot="sample", group="geometry",
       help="mm: near point X (pivot sample)"),
    _F("-Yclose", kind="f", keys=("detector.yclose_mm",), pivot="sample", group="geometry",
       help="mm: near point Y (pivot sample)"),
    _F("-ORGX", kind="f", keys=("detector.orgx_px",), pivot="sample", group="geometry",
       help="px: XDS ORGX (pivot sample)"),
    _F("-ORGY", kind="f", keys=("detector.orgy_px",), pivot="sample", group="geometry",
       help="px: XDS ORGY (pivot sample)"),
    _F("-pivot", kind="pivot", action="pivot", group="geometry",
       help="beam|sample: detector pivot (only honoured for CUSTOM)"),
    _F("-mosflm", action="convention", value="mosflm", pivot="beam", group="geometry",
       help="MOSFLM convention (default)"),
    _F("-xds", action="convention", value="xds", pivot="sample", group="geometry",
       help="XDS convention"),
    _F("-adxv", action="convention", value="adxv", pivot="beam", group="geometry",
       help="ADXV convention"),
    _F("-denzo", action="convention", value="denzo", pivot="beam", group="geometry",
       help="DENZO convention"),
    # upstream's -dials sets pivot BEAM (the DIALS convention then forces SAMPLE; for a later
    # switch to CUSTOM the BEAM stands)
    _F("-dials", action="convention", value="dials", pivot="beam", group="geometry",
       help="DIALS convention"),
    _F("-fdet_vector", kind="f3", keys=("detector.fdet_vector",), custom=True, group="geometry",
       help="x y z: fast axis (switches to CUSTOM)"),
    _F("-sdet_vector", kind="f3", keys=("detector.sdet_vector",), custom=True, group="geometry",
       help="x y z: slow axis (switches to CUSTOM)"),
    _F("-odet_vector", kind="f3", keys=("detector.odet_vector",), custom=True, group="geometry",
       help="x y z: detector normal (switches to CUSTOM)"),
    _F("-twotheta_axis", kind="f3", keys=("detector.twotheta_axis",), custom=True,
       action="twotheta_axis", group="geometry",
       help="x y z: two-theta axis (switches to CUSTOM)"),
    _F("-pix0_vector_mm", kind="f3", keys=("detector.pix0_vector_mm",), custom=True, action="pix0",
       group="geometry", help="x y z (mm): first pixel (switches to CUSTOM; physical mode only)"),
    _F("-pix0_vector", kind="f3", keys=("detector.pix0_vector_mm",), custom=True, action="pix0",
       scale=1000.0, group="geometry",
       help="x y z (m): first pixel (switches to CUSTOM; physical mode only)"),
    _F("-detector_rotx", kind="f", keys=("detector.rotx_deg",), group="geometry", help="deg"),
    _F("-detector_roty", kind="f", keys=("detector.roty_deg",), group="geometry", help="deg"),
    _F("-detector_rotz", kind="f", keys=("detector.rotz_deg",), group="geometry", help="deg"),
    _F("-twotheta", kind="f", keys=("detector.twotheta_deg",), pivot="sample", group="geometry",
       help="deg: detector two-theta (pivot sample)"),
    _F("-curved_det", kind="dummy", keys=("detector.curved",), value=True, action="curved",
       prefixes=("-curved_det",), group="geometry", help="spherical detector"),
    _F("-point_pixel", keys=("detector.point_pixel",), value=True, group="geometry",
       help="solid angle 1/R^2 (no obliquity)"),
    # ---- sensor
    _F("-detector_absorb", "-detector_abs", kind="abs", action="abs", prefixes=("-detector_abs",),
       group="absorption", help="um: sensor attenuation length ('inf' or 0: thickness 0)"),
    _F("-detector_thick", kind="f", keys=("detector.thick_um",), group="absorption",
       help="um: sensor thickness"),
    _F("-detector_thicksteps", "-thicksteps", kind="i", keys=("detector.thicksteps",),
       group="absorption", help="N: sensor layers"),
    # ---- sampling
    _F("-oversample", kind="i", keys=("detector.oversample",), group="sampling",
       help="N: sub-pixels per axis"),
    _F("-oversample_thick", keys=("detector.oversample_thick",), value=True, group="sampling",
       help="per-subpixel capture fraction"),
    _F("-oversample_polar", keys=("detector.oversample_polar",), value=True, group="sampling",
       help="per-subpixel polarization"),
    _F("-oversample_omega", keys=("detector.oversample_omega",), value=True, group="sampling",
       help="per-subpixel solid angle"),
    _F("-roi", kind="i4", keys=("detector.roi",), group="ROI",
       help="xmin xmax ymin ymax: render only these pixels (inclusive)"),
    _F("-mask", kind="s", keys=("detector.mask_file",), action="mask", group="ROI",
       help="FILE: SMV mask (0 = skip); its header sets geometry defaults"),
    _F("-img", kind="s", action="img", group="geometry",
       help="FILE: SMV image whose header sets geometry defaults"),
    _F("--geom", kind="s", keys=("detector.geometry_file",), action="infile", group="geometry",
       help="FILE: multi-panel detector from a CrystFEL .geom or DIALS .expt (nbsim only; "
            "-floatfile holds the panels one after another, -intfile one SMV per panel)"),
    # ---- background tables nanoBragg reads but does not use
    _F("-stol", kind="s", group="background", no_effect="the table is read but unused by nanoBragg",
       help="FILE (no effect)"),
    _F("-4stol", kind="s", group="background", no_effect="the table is read but unused by nanoBragg",
       help="FILE (no effect)"),
    _F("-Q", kind="s", group="background", no_effect="the table is read but unused by nanoBragg",
       help="FILE (no effect)"),
    _F("-stolout", kind="s", group="background", no_effect="nanoBragg never writes it",
       help="FILE (no effect)"),
    # ---- outputs
    _F("-floatfile", "-floatimage", kind="s", action="out_float", group="output",
       help="FILE: raw float32 image (default floatimage.bin)"),
    _F("-intfile", "-intimage", kind="s", action="out_int", group="output",
       help="FILE: SMV image (default intimage.img)"),
    _F("-noisefile", "-noiseimage", kind="s", action="out_noise", group="output",
       help="FILE: SMV image with Poisson noise (default noiseimage.img)"),
    _F("-pgmfile", "-pgmimage", kind="s", action="out_pgm", group="output",
       help="FILE: 8-bit PGM (default image.pgm)"),
    _F("--cbf", kind="s", action="out_cbf", group="output",
       help="FILE: also write a CBF (int32 counts, miniCBF header; nbsim)"),
    _F("--nexus", kind="s", action="out_nexus", group="output",
       help="FILE: also write a NeXus NXmx HDF5 file (nbsim)"),
    _F("--nexus-dtype", kind="s", action="nexus_dtype", group="output",
       help="float32|int32: the NeXus data: the float image (default) or int32 counts"),
    _F("--nexus-compression", kind="s", action="nexus_compression", group="output",
       help="none|bslz4: NeXus data compression (bslz4: bitshuffle/LZ4 via hdf5plugin)"),
    _F("-nonoise", action="nonoise", group="output", help="do not write the noise image"),
    _F("-nopgm", action="nopgm", group="output", help="do not write the PGM"),
    _F("-scale", kind="f", keys=("image.int_scale",), group="output",
       help="s: int-image scale (default 55000/max)"),
    _F("-pgmscale", kind="f", keys=("image.pgm_scale",), action="pgmscale", group="output",
       help="s: PGM scale (default 250/(5 rmsd)); turns the PGM on"),
    _F("-adc", kind="f", keys=("image.adc",), group="output", help="counts: offset (default 40)"),
    _F("-seed", kind="i", keys=("image.noise_seed",), group="output",
       help="N: noise seed (default: the clock)"),
    # ---- debugging
    _F("-printout", action="printout", group="debug",
       no_effect="nbsim does not print pixel values; use -trace_pixel S F",
       help="(no effect in nbsim; turns progress off)"),
    _F("-printout_pixel", kind="i2", action="printout_pixel", group="debug",
       no_effect="nbsim does not print pixel values; use -trace_pixel S F",
       help="F S (no effect in nbsim)"),
    _F("-progress", action="progress", value=True, group="debug", help="progress lines"),
    _F("-noprogress", action="progress", value=False, group="debug", help="no progress lines"),
    _F("-coherent", group="debug", no_effect="upstream never uses it", help="(no effect)"),
    _F("-trace_pixel", kind="i2", action="trace", group="debug",
       help="S F: print TRACE lines for pixel (slow, fast)"),
)

# nbsim options: --name VALUE or --name=VALUE
_DOUBLE = {
    "--device": "device", "--dtype": "dtype", "--quirks": "quirks", "--fix": "fix",
    "--memory-budget-mb": "memory_budget_mb", "--time-limit-s": "time_limit_s", "--compile": "compile",
    "--no-compile": "no_compile", "--help": "help",
}
_HELP_WORDS = ("-h", "-help", "--help")

_EXACT: Dict[str, Flag] = {}
for _f in FLAGS:
    for _n in _f.names:
        assert _n not in _EXACT, _n
        _EXACT[_n] = _f
_PREFIX: List[Tuple[str, Flag]] = sorted(((p, f) for f in FLAGS for p in f.prefixes),
                                         key=lambda pf: -len(pf[0]))


def lookup_flag(word: str) -> Optional[Flag]:
    """The table entry a command-line word selects, or None (exact spelling first, then prefixes)."""
    f = _EXACT.get(word)
    if f is not None:
        return f
    for p, f in _PREFIX:
        if word.startswith(p):
            return f
    return None


_HINTS = {
    "-dispstep": "-dispsteps? nanoBragg has no dispersion step-size flag",
    "-hdiv": "-hdivrange", "-vdiv": "-vdivrange",
    "-detsize_x": "-detsize_f", "-detsize_y": "-detsize_s",
}


def _suggest(word: str) -> str:
    if word in _HINTS:
        h = _HINTS[word]
        return f" (did you mean {h})" if "?" in h else f" (did you mean {h}?)"
    names = list(_EXACT) + list(_DOUBLE) if word.startswith("--") else list(_EXACT)
    m = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not m and word.startswith("--"):
        m = difflib.get_close_matches(word[1:], list(_EXACT), n=1, cutoff=0.7)
    return f" (did you mean {m[0]}?)" if m else ""


# ---------------------------------------------------------------------------------------------
# result objects
# ---------------------------------------------------------------------------------------------

@dataclass
class OutputFiles:
    """Output files, with nanoBragg's defaults.  Float and int images are always written."""
    floatfile: str = "floatimage.bin"
    intfile: str = "intimage.img"
    noisefile: str = "noiseimage.img"
    pgmfile: str = "image.pgm"
    write_noise: bool = True               # -nonoise turns off, -noisefile turns on
    write_pgm: bool = True                 # -nopgm turns off, -pgmfile/-pgmscale turn on
    given: set = field(default_factory=set)  # output flags given explicitly (-noisefile, -pgmfile, -pgmscale)
    cbffile: Optional[str] = None          # --cbf (nbsim only)
    nexusfile: Optional[str] = None        # --nexus (nbsim only)
    nexus_dtype: str = "float32"           # --nexus-dtype
    nexus_compression: str = "none"        # --nexus-compression

    def paths(self) -> Dict[str, Optional[str]]:
        """Output paths, keyword arguments for ``nbsim.io.products.write_products``."""
        return {"float_path": self.floatfile, "int_path": self.intfile,
                "noise_path": self.noisefile if self.write_noise else None,
                "pgm_path": self.pgmfile if self.write_pgm else None,
                "cbf_path": self.cbffile, "nexus_path": self.nexusfile}

    def options(self) -> Dict[str, str]:
        """The writers' other keyword arguments (NeXus data type and compression)."""
        return {"nexus_dtype": self.nexus_dtype, "nexus_compression": self.nexus_compression}


@dataclass
class Parsed:
    spec: ExperimentSpec
    device: DeviceSpec
    outputs: OutputFiles
    trace_pixel: Optional[Tuple[int, int]] = None   # (slow, fast)
    printout: bool = False
    printout_pixel: Optional[Tuple[int, int]] = None  # (fast, slow), as upstream
    progress: bool = True
    warnings: List[str] = field(default_factory=list)
    dump_file: str = DEFAULT_DUMP_FILE      # upstream's dumpfilename (spec.crystal.fdump_file when used)
    help: bool = False
    origins: Dict[str, str] = field(default_factory=dict)   # spec key -> flag that set it last
    extras: Dict[str, object] = field(default_factory=dict)  # accepted values without a spec field
    argv: List[str] = field(default_factory=list)
    header_files: List[str] = field(default_factory=list)   # -mask, -img read by the pre-pass, as named


# ---------------------------------------------------------------------------------------------
# SMV header pre-read (-img / -mask), following upstream GetFrame()/ValueOf()
# ---------------------------------------------------------------------------------------------

def _read_smv_header(flag: str, path: str, shown: Optional[str] = None) -> str:
    """The text header of an SMV file (up to HEADER_BYTES); ``FrontendError`` naming ``flag`` for a
    file that is missing, not a regular file (FIFO, device), not SMV, or whose HEADER_BYTES is not a
    byte count inside the file."""
    from nbsim.io.inputs import MAX_IMAGE_BYTES, InputFileError, check_regular
    shown = path if shown is None else shown
    try:
        size = check_regular(path, MAX_IMAGE_BYTES)
        with open(path, "rb") as fh:
            head = fh.read(512)
            if not head.startswith(b"{\nHEADER_BYT"):
                raise FrontendError(f"{flag}: {shown} does not look like an SMV (ADSC) image")
            text = head.decode("latin-1")
            nbytes = _smv_value(text, "HEADER_BYTES")
            if nbytes is not None and not (math.isfinite(nbytes) and 0 < nbytes <= size):
                raise FrontendError(f"{flag}: {shown}: header value HEADER_BYTES={nbytes:g} is not a "
                                    f"byte count within the file ({size} bytes)")
            if nbytes is not None and int(nbytes) > 512:
                fh.seek(0)
                text = fh.read(int(nbytes)).decode("latin-1")
    except InputFileError as e:
        raise FrontendError(f"{flag}: {str(e).replace(path, shown, 1)}") from None
    except OSError as e:
        raise FrontendError(f"{flag}: cannot read {shown}: {e.strerror or e}") from None
    return text.split("\0", 1)[0]


def _header_number(header: str, key: str, flag: str, path: str) -> Optional[float]:
    """``_smv_value`` refusing a value that is not a finite number (``SIZE1=inf``, ``PIXEL_SIZE=nan``)."""
    v = _smv_value(header, key)
    if v is not None and not math.isfinite(v):
        raise FrontendError(f"{flag}: {path}: header value {key}={v:g} is not a finite number")
    return v


def _smv_value(header: str, key: str) -> Optional[float]:
    """Upstream ValueOf(): value after the '=' following the LAST occurrence of ``key`` (a substring
    match, so DISTANCE finds CLOSE_DISTANCE in nanoBragg-written headers); None when absent."""
    pos = header.rfind(key)
    if pos < 0:
        return None
    eq = header.find("=", pos + len(key))
    if eq < 0:
        return 0.0
    return _c_atof(header[eq + 1:])


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------

@dataclass
class _Event:
    flag: Flag
    word: str           # the spelling used
    pos: int            # index in argv
    values: list


def _split_options(argv: Sequence[str]):
    """Separate nbsim's double-dash options (and -h) from the nanoBragg words.

    Returns (nanoBragg argv as upstream would see it, options dict, help?)."""
    c_argv: List[str] = []
    opts: Dict[str, object] = {}
    want_help = False
    i, n = 0, len(argv)
    while i < n:
        word = argv[i]
        i += 1
        if word in _HELP_WORDS:
            want_help = True
            continue
        if not word.startswith("--") or _is_number(word):
            c_argv.append(word)
            continue
        name, eq, val = word.partition("=")
        if name in _EXACT:                     # a double-dash flag of the table (--nexus FILE ...)
            c_argv.extend([name, val] if eq else [name])
            continue
        key = _DOUBLE.get(name)
        if key is None:
            raise FrontendError(f"unknown option {name}{_suggest(name)}")
        if key in ("compile", "no_compile", "help"):
            if eq:
                raise FrontendError(f"{name}: takes no value")
            opts[key] = True
            want_help = want_help or key == "help"
            continue
        if not eq:
            if i >= n:
                raise FrontendError(f"{name}: missing value")
            val = argv[i]
            i += 1
        if key == "fix":                       # repeatable: the names add up
            opts.setdefault(key, []).append((name, val))
            continue
        opts[key] = (name, val)
    return c_argv, opts, want_help


def _tokenize(c_argv: Sequence[str]) -> List[_Event]:
    """nanoBragg words -> events; raises FrontendError for malformed input."""
    events: List[_Event] = []
    i, n = 0, len(c_argv)
    while i < n:
        word = c_argv[i]
        if not word.startswith("-") or _is_number(word):
            raise FrontendError(f"unexpected argument {word!r} (no flag takes it)")
        flag = lookup_flag(word)
        if flag is None:
            raise FrontendError(f"unknown flag {word}{_suggest(word)}")
        pos = i
        values, i = _read_values(flag, word, c_argv, i + 1)
        events.append(_Event(flag, word, pos, values))
    return events


def _read_values(flag: Flag, word: str, argv: Sequence[str], i: int):
    n = len(argv)
    kind = flag.kind
    if kind == "":
        return [], i
    if kind == "dummy":      # optional word after -curved_det (any non-flag word)
        if i < n and (not argv[i].startswith("-") or _is_number(argv[i])):
            return [argv[i]], i + 1
        return [], i
    if kind == "cell":
        vals = []
        while i < n and len(vals) < 6 and not argv[i].startswith("-"):
            vals.append(_to_float(word, argv[i]))
            i += 1
        if not vals:
            raise FrontendError(f"{word}: missing value (expected a b c alpha beta gamma)")
        return vals, i
    if kind == "misset":
        if i < n and argv[i].lower().startswith("rand"):
            return ["random"], i + 1
        if i + 3 > n:
            raise FrontendError(f"{word}: missing value (expected rx ry rz or 'random')")
        return [_to_float(word, w) for w in argv[i:i + 3]], i + 3
    nargs = _NARGS[kind]
    if i + nargs > n:
        what = {"f": "a number", "i": "an integer", "s": "a file name", "f3": "3 numbers",
                "i2": "2 integers", "i4": "4 integers", "pivot": "'beam' or 'sample'",
                "abs": "a number or 'inf'"}[kind]
        got = f", got {n - i}" if nargs > 1 and n > i else ""
        raise FrontendError(f"{word}: missing value (expected {what}{got})")
    words = list(argv[i:i + nargs])
    if kind in ("f", "f3"):
        return [_to_float(word, w) for w in words], i + nargs
    if kind in ("i", "i2", "i4"):
        return [_to_int(word, w) for w in words], i + nargs
    if kind == "s":
        w = words[0]
        if w.startswith("-") and (lookup_flag(w) is not None or w in _DOUBLE):
            raise FrontendError(f"{word}: missing value (expected a file name, got flag {w})")
        return [w], i + 1
    if kind == "pivot":
        w = words[0].lower()
        if w not in ("beam", "sample"):
            raise FrontendError(f"{word}: expected 'beam' or 'sample', got {words[0]!r}")
        return [w], i + 1
    if kind == "abs":
        w = words[0]
        if w.lower() in ("inf", "infinity", "+inf"):
            return [math.inf], i + 1
        return [_to_float(word, w)], i + 1
    raise AssertionError(kind)


class _Builder:
    """Applies events to a spec, tracking what C tracks (argv order rules)."""

    def __init__(self, argv, quirks, cwd, check_files, fix=()):
        self.argv = list(argv)
        self.q = _quirks.resolve(quirks, fix)
        self.cwd = cwd
        self.check_files = check_files
        self.spec = ExperimentSpec()
        self.spec.quirks = quirks
        self.spec.fix = list(fix)
        self.out = OutputFiles()
        self.origins: Dict[str, str] = {}
        self.warnings: List[str] = []
        self.extras: Dict[str, object] = {}
        self.convention = "mosflm"
        self.convention_flag: Optional[str] = None
        self.pivot_events: List[Tuple[str, str]] = []     # (pivot, flag) in argv order
        self.explicit_pivot: Optional[str] = None
        self.vectors: Dict[str, Tuple[list, str]] = {}    # custom-only keys
        self.misset_mode: Optional[str] = None            # None | "angles" | "random"
        self.misset_angles: Optional[List[float]] = None
        self.misset_flag = "-misset"
        self.dump_file = DEFAULT_DUMP_FILE
        self.dump_given = False
        self.trace_pixel = None
        self.printout = False
        self.printout_pixel = None
        self.progress = True
        self.header_close: Optional[str] = None         # -img/-mask whose header set CLOSE_DISTANCE

    # -- helpers
    def set(self, key: str, value, origin: str):
        group, name = key.split(".")
        setattr(getattr(self.spec, group), name, value)
        self.origins[key] = origin

    def warn(self, msg: str):
        if msg not in self.warnings:
            self.warnings.append(msg)

    def _path(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.cwd, p)

    # -- SMV headers (upstream pre-pass: mask first, then img; flags override both)
    def header_defaults(self, flag: str, path: str):
        h = _read_smv_header(flag, self._path(path), path)
        src = f"{flag} header"
        num = lambda key: _header_number(h, key, flag, path)  # noqa: E731
        width = num("SIZE1")
        height = num("SIZE2")
        width = int(width) if width is not None else 0
        height = int(height) if height is not None else 0
        if width == 0:
            dd = num("DETECTOR_DIMENSIONS")
            width = height = int(dd) if dd is not None else 0
        if width <= 0 or height <= 0:
            raise FrontendError(f"{flag}: {path}: header has no usable SIZE1/SIZE2")
        self.set("detector.fpixels", width, src)
        self.set("detector.spixels", height, src)
        v = num("PIXEL_SIZE")
        if v is not None:
            self.set("detector.pixel_mm", v, src)
        pixel_mm = self.spec.detector.pixel_mm
        for key, hkey in (("detector.distance_mm", "DISTANCE"),
                          ("detector.close_distance_mm", "CLOSE_DISTANCE"),
                          ("beam.wavelength_A", "WAVELENGTH"),
                          ("detector.xbeam_mm", "BEAM_CENTER_X"),
                          ("detector.orgx_px", "ORGX"), ("detector.orgy_px", "ORGY"),
                          ("crystal.phi_deg", "PHI"), ("crystal.osc_deg", "OSC_RANGE")):
            v = num(hkey)
            if v is not None:
                self.set(key, v, src)
        v = num("BEAM_CENTER_Y")
        if v is not None:
            # upstream: the mask header's Y is flipped (detsize_s - value), the img header's is not
            self.set("detector.ybeam_mm", pixel_mm * height - v if flag == "-mask" else v, src)
        if _smv_value(h, "CLOSE_DISTANCE") is not None:
            self.header_close = flag

    # -- one event
    def apply(self, ev: _Event):
        f, word, vals = ev.flag, ev.word, ev.values
        if f.no_effect:
            self.warn(f"{word}: has no effect ({f.no_effect})")
            self.extras[f.name] = vals[0] if len(vals) == 1 else (tuple(vals) if vals else True)
        if f.custom:
            self.convention = "custom"
            self.convention_flag = word
        if f.pivot is not None:
            self.pivot_events.append((f.pivot, word))
        act = f.action
        if act is None:
            if f.keys:
                if f.kind == "":
                    v = f.value
                elif f.kind in ("f", "i", "s"):
                    v = vals[0]
                else:
                    v = list(vals)
                for k in f.keys:
                    self._set_value(k, v, word, f)
            return
        handler = getattr(self, "_act_" + act)
        handler(ev)

    def _set_value(self, key, v, word, f: Flag):
        if key in _CUSTOM_ONLY_KEYS:
            self.vectors[key] = ([x * f.scale for x in v], word)
            return
        if f.scale != 1.0:
            v = v * f.scale
        self.set(key, v, word)

    def _act_infile(self, ev):
        path = ev.values[0]
        if self.check_files and not os.path.exists(self._path(path)):
            raise FrontendError(f"{ev.word}: file not found: {path}")
        self.set(ev.flag.keys[0], path, ev.word)

    def _act_misset(self, ev):
        if ev.values == ["random"]:
            self.misset_mode = "random"
        else:
            self.misset_mode = "angles"
            self.misset_angles = list(ev.values)
        self.misset_flag = ev.word

    def _act_misset_seed(self, ev):
        self.set("crystal.misset_seed", ev.values[0], ev.word)
        # upstream strstr("-misset") also matches: reads a misset from the next three argv words
        if not self.q.fixed("misset_seed_reads_misset") and len(self.argv) > ev.pos + 3:
            words = self.argv[ev.pos + 1:ev.pos + 4]
            angles = [_c_atof(w) for w in words]
            self.misset_mode = "angles"
            self.misset_angles = angles
            self.misset_flag = ev.word
            self.misset_seed_words = words

    def _act_N(self, ev):
        self.set("crystal.N", ev.values[0], ev.word)
        for k in ("crystal.Na", "crystal.Nb", "crystal.Nc"):   # -N sets all three, in argv order
            self.set(k, None, ev.word)

    def _act_energy(self, ev):
        e = ev.values[0]
        if not e > 0:
            raise FrontendError(f"{ev.word}: must be > 0 eV, got {ev.values[0]!r}")
        self.set("beam.wavelength_A", HC_EV_A / e, ev.word)

    def _act_dump(self, ev):
        self.dump_file = ev.values[0]
        self.dump_given = True

    def _act_polar(self, ev):
        self.set("beam.kahn_factor", ev.values[0], ev.word)
        self.set("beam.nopolar", False, ev.word)       # upstream: -polar clears -nopolar

    def _act_pivot(self, ev):
        self.pivot_events.append((ev.values[0], ev.word))
        self.explicit_pivot = ev.values[0]

    def _act_convention(self, ev):
        self.convention = ev.flag.value
        self.convention_flag = ev.word

    def _act_twotheta_axis(self, ev):
        self._set_value("detector.twotheta_axis", ev.values, ev.word, ev.flag)
        if not self.q.fixed("twotheta_axis_sets_twotheta"):
            # upstream strstr("-twotheta") also matches -twotheta_axis: twotheta = first component
            self.set("detector.twotheta_deg", ev.values[0], ev.word)
            self.pivot_events.append(("sample", ev.word))
            if ev.values[0] != 0:
                self.warn(f"{ev.word}: upstream also reads it as -twotheta {ev.values[0]:g} "
                          f"(quirk twotheta_axis_sets_twotheta); "
                          f"give -twotheta after it to set the angle")

    def _act_pix0(self, ev):
        self._set_value("detector.pix0_vector_mm", ev.values, ev.word, ev.flag)
        if not self.q.fixed("pix0_overwritten"):
            self.warn(f"{ev.word}: the value has no effect (quirk pix0_overwritten: the pivot "
                      f"formula overwrites pix0); it only switches the convention to CUSTOM")

    def _act_curved(self, ev):
        if ev.pos == len(self.argv) - 1 and not self.q.fixed("curved_det_needs_value"):
            self.warn(f"{ev.word}: has no effect as the last argument (quirk curved_det_needs_value: "
                      f"upstream needs a following word); give it as '-curved_det 1'")
            return
        self.set("detector.curved", True, ev.word)

    def _act_abs(self, ev):
        v = ev.values[0]
        if v == math.inf or v == 0.0:
            # upstream: attenuation 'inf' (or 0) means thickness 0 and mu 0
            self.set("detector.thick_um", 0.0, ev.word)
            self.set("detector.attenuation_um", None, ev.word)
            self.extras["detector_mu_zero"] = True
        else:
            self.set("detector.attenuation_um", v, ev.word)
            self.extras.pop("detector_mu_zero", None)

    def _act_mask(self, ev):
        self.set("detector.mask_file", ev.values[0], ev.word)

    def _act_img(self, ev):
        self.extras["-img"] = ev.values[0]

    def _act_out_float(self, ev):
        self.out.floatfile = ev.values[0]

    def _act_out_int(self, ev):
        self.out.intfile = ev.values[0]

    def _act_out_noise(self, ev):
        self.out.given.add("-noisefile")
        self.out.noisefile = ev.values[0]
        self.out.write_noise = True
        self.set("image.noise", True, ev.word)

    def _act_out_pgm(self, ev):
        self.out.given.add("-pgmfile")
        self.out.pgmfile = ev.values[0]
        self.out.write_pgm = True

    def _act_out_cbf(self, ev):
        self.out.cbffile = ev.values[0]

    def _act_out_nexus(self, ev):
        self.out.nexusfile = ev.values[0]

    def _act_nexus_dtype(self, ev):
        from nbsim.io.nexus import NEXUS_DTYPES
        if ev.values[0] not in NEXUS_DTYPES:
            raise FrontendError(f"{ev.word}: expected {' or '.join(NEXUS_DTYPES)}, got {ev.values[0]!r}")
        self.out.nexus_dtype = ev.values[0]

    def _act_nexus_compression(self, ev):
        from nbsim.io.nexus import COMPRESSIONS
        if ev.values[0] not in COMPRESSIONS:
            raise FrontendError(f"{ev.word}: expected {' or '.join(COMPRESSIONS)}, got {ev.values[0]!r}")
        self.out.nexus_compression = ev.values[0]

    def _act_nonoise(self, ev):
        self.out.write_noise = False
        self.set("image.noise", False, ev.word)

    def _act_nopgm(self, ev):
        self.out.write_pgm = False

    def _act_pgmscale(self, ev):
        self.out.given.add("-pgmscale")
        self.set("image.pgm_scale", ev.values[0], ev.word)
        self.out.write_pgm = True

    def _act_printout(self, ev):
        self.printout = True

    def _act_printout_pixel(self, ev):
        self.printout = True
        self.printout_pixel = (ev.values[0], ev.values[1])

    def _act_progress(self, ev):
        self.progress = ev.flag.value

    def _act_trace(self, ev):
        self.trace_pixel = (ev.values[0], ev.values[1])

    # -- after all flags: the argv-order rules of the C program
    def finish(self):
        d, c = self.spec.detector, self.spec.crystal
        # convention and pivot (quirk convention_pivot)
        d.convention = self.convention
        self.origins["detector.convention"] = self.convention_flag or "(default)"
        forced = {"mosflm": "beam", "adxv": "beam", "denzo": "beam", "xds": "sample",
                  "dials": "sample"}
        if self.convention == "custom":
            for key, (v, word) in self.vectors.items():
                self.set(key, v, word)
            if self.pivot_events:
                pv, word = self.pivot_events[-1]
                self.set("detector.pivot", pv, word)
            else:
                self.set("detector.pivot", "beam", "(default)")
        else:
            for key, (v, word) in self.vectors.items():
                self.warn(f"{word}: has no effect: the later {self.convention_flag} sets the "
                          f"{self.convention.upper()} vectors")
            if self.explicit_pivot is not None:
                self.set("detector.pivot", self.explicit_pivot, "-pivot")
                if (not self.q.fixed("convention_pivot")
                        and self.explicit_pivot != forced[self.convention]):
                    self.warn(f"-pivot {self.explicit_pivot}: has no effect: the "
                              f"{self.convention.upper()} convention forces pivot "
                              f"{forced[self.convention]} (quirk convention_pivot)")
            if not self.q.fixed("convention_pivot"):
                if self.convention in ("xds", "dials"):
                    for k, fl in (("detector.xbeam_mm", "-Xbeam"), ("detector.ybeam_mm", "-Ybeam")):
                        if self.origins.get(k) == fl:
                            self.warn(f"{fl}: only changes the header for the "
                                      f"{self.convention.upper()} convention (pivot sample); "
                                      f"use -ORGX/-ORGY or -Xclose/-Yclose")
                else:
                    for k, fl in (("detector.orgx_px", "-ORGX"), ("detector.orgy_px", "-ORGY"),
                                  ("detector.xclose_mm", "-Xclose"), ("detector.yclose_mm", "-Yclose")):
                        if self.origins.get(k) == fl:
                            self.warn(f"{fl}: has no effect for the {self.convention.upper()} "
                                      f"convention (pivot beam); use -Xbeam/-Ybeam")
        # misset
        if self.misset_mode == "random":
            self.set("crystal.misset_random", True, self.misset_flag)
            self.set("crystal.misset_deg", None, self.misset_flag)
        elif self.misset_mode == "angles":
            if self.misset_flag == "-misset_seed":
                a, w = self.misset_angles, self.misset_seed_words
                self.warn(f"-misset_seed: upstream also reads it as -misset {' '.join(w)}, a misset "
                          f"of {a[0]:g} {a[1]:g} {a[2]:g} deg (quirk misset_seed_reads_misset); "
                          f"give -misset after it")
            self.set("crystal.misset_deg", list(self.misset_angles), self.misset_flag)
            self.set("crystal.misset_random", False, self.misset_flag)
        if (self.header_close and self.origins.get("detector.close_distance_mm", "").endswith("header")
                and self.origins.get("detector.distance_mm") == "-distance"):
            self.warn(f"-distance: the {self.header_close} header's CLOSE_DISTANCE takes precedence "
                      f"(the distance is derived from it, as upstream); give -close_distance instead")
        # detector attenuation 'inf' followed by a thickness
        if self.extras.get("detector_mu_zero") and d.thick_um > 0:
            self.warn("-detector_abs inf/0 before -detector_thick: upstream then uses attenuation "
                      "mu = 0 (capture fraction 0, a blank image); nbsim uses attenuation length = "
                      "thickness instead. Give -detector_abs after -detector_thick")
        # Fdump cache (quirk fdump_from_cwd)
        if c.hkl_file is not None:
            self.set("crystal.fdump_file", self.dump_file, "-dump" if self.dump_given else "-hkl")
        elif c.model_file is not None:
            if self.dump_given:
                self.warn(f"-dump {self.dump_file}: not read or written with -model (F comes from the model)")
        else:
            exists = os.path.exists(self._path(self.dump_file))
            if exists and (not self.q.fixed("fdump_from_cwd") or self.dump_given):
                self.set("crystal.fdump_file", self.dump_file, "-dump" if self.dump_given else "(cwd)")
                if not self.dump_given:
                    self.warn(f"no -hkl: reading structure factors from {self.dump_file} in the "
                              f"working directory (left by an earlier run; quirk fdump_from_cwd)")
            elif exists:
                self.warn(f"fdump_from_cwd fixed: ignoring {self.dump_file} in the working directory "
                          f"(pass -dump {self.dump_file} to use it)")
            elif self.dump_given:
                self.warn(f"-dump {self.dump_file}: file not found; no structure factor cache read")
        # the two upstream usage checks (exit 9 there)
        if c.cell_A_deg is None and c.matrix_file is None and self.spec.detector.geometry_file is None:
            raise FrontendError("no unit cell: give -cell a b c alpha beta gamma or -mat FILE "
                                "(or --geom FILE.expt with a crystal)")
        if c.hkl_file is None and c.model_file is None and c.fdump_file is None and c.default_F == 0.0:
            raise FrontendError("no structure factors: give -hkl FILE, -model FILE or a nonzero -default_F F "
                                f"(or keep an F cache: -dump FILE, default {DEFAULT_DUMP_FILE})")
        # cell: C's 1..6 value form and its defaults for missing values
        if c.cell_A_deg is not None:
            cell = list(c.cell_A_deg) + [0.0] * (6 - len(c.cell_A_deg))
            a = cell[0]
            cell[1] = cell[1] if cell[1] > 0 else a
            cell[2] = cell[2] if cell[2] > 0 else a
            for j in (3, 4, 5):
                cell[j] = cell[j] if cell[j] > 0 else 90.0
            c.cell_A_deg = cell


_CUSTOM_ONLY_KEYS = {"detector.fdet_vector", "detector.sdet_vector", "detector.odet_vector",
                     "detector.twotheta_axis", "detector.pix0_vector_mm", "beam.beam_vector",
                     "beam.polar_vector", "crystal.spindle_axis"}


def _fix_from(values) -> List[str]:
    """Quirk names of the ``--fix a,b`` options (in order, duplicates dropped)."""
    names: List[str] = []
    for name, val in values:
        for word in val.split(","):
            word = word.strip()
            if not word:
                raise FrontendError(f"{name}: empty quirk name in {val!r}; accepted: "
                                    f"{_quirks.accepted_text()}")
            if word not in _quirks.BY_NAME:
                raise FrontendError(f"{name}: unknown quirk {word!r}; accepted: "
                                    f"{_quirks.accepted_text()}")
            if word not in names:
                names.append(word)
    return names


def _device_from(opts) -> Tuple[DeviceSpec, str]:
    dev = DeviceSpec()
    quirks = "faithful"
    for key, v in opts.items():
        if key == "compile":
            dev.compile = True
        elif key == "no_compile":
            dev.compile = False
        elif key in ("help", "fix"):
            pass
        else:
            name, val = v
            if key == "device":
                if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", val):
                    raise FrontendError(f"{name}: expected cpu or cuda[:N], got {val!r}")
                dev.device = val
            elif key == "dtype":
                if val not in ("float64", "float32"):
                    raise FrontendError(f"{name}: expected float64 or float32, got {val!r}")
                dev.dtype = val
            elif key == "quirks":
                if val not in _quirks.PRESET_NAMES:
                    raise FrontendError(f"{name}: expected {' or '.join(_quirks.PRESET_NAMES)}, "
                                        f"got {val!r}")
                quirks = val
            elif key == "memory_budget_mb":
                x = _to_float(name, val)
                if not x > 0:
                    raise FrontendError(f"{name}: must be > 0, got {val}")
                dev.memory_budget_mb = x
            elif key == "time_limit_s":
                x = _to_float(name, val)
                if not x > 0:
                    raise FrontendError(f"{name}: must be > 0, got {val}")
                dev.time_limit_s = x
    return dev, quirks


_KEY_FLAG: Dict[str, str] = {}
for _f in FLAGS:
    for _k in _f.keys:
        _KEY_FLAG.setdefault(_k, _f.name)
_KEY_FLAG["crystal.misset_random"] = "-misset"
_KEY_FLAG["crystal.misset_deg"] = "-misset"
_KEY_FLAG["detector.attenuation_um"] = "-detector_abs"
_KEY_FLAG["crystal.fdump_file"] = "-dump"
_KEY_FLAG["device.memory_budget_mb"] = "--memory-budget-mb"
_KEY_FLAG["device.time_limit_s"] = "--time-limit-s"


def spec_error_message(e: SpecError, origins: Optional[Dict[str, str]] = None) -> str:
    """The message of a ``SpecError`` in command-line terms: the flag that set the key (from
    ``origins``, spec key -> flag), else the flag that sets that key."""
    msg = str(e)
    prefix = f"{e.key}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    flag = (origins or {}).get(e.key)
    if flag is None or flag.startswith("("):
        flag = _KEY_FLAG.get(e.key)
        if flag is None:
            return str(e)
    if flag == "-energy":
        return f"{flag}: gives {e.key} which {msg}"
    if flag.endswith(" header"):
        return f"{flag}: {e.key} {msg}"
    return f"{flag}: {msg}"


def parse_argv(argv: Sequence[str], *, cwd: Optional[str] = None, check_files: bool = True,
               validate: bool = True) -> Parsed:
    """Parse a nanoBragg command line (without the program name).

    ``cwd``: directory that relative input paths and the Fdump cache are looked up in (default: the
    current directory).  ``check_files``: fail early when -hkl/-mat/-sourcefile files are missing.
    With ``-h``/``--help`` the result has ``help=True`` and the spec is not checked.
    """
    argv = [str(a) for a in argv]
    cwd = os.getcwd() if cwd is None else cwd
    c_argv, opts, want_help = _split_options(argv)
    device, quirks = _device_from(opts)
    b = _Builder(c_argv, quirks, cwd, check_files, _fix_from(opts.get("fix", [])))
    if want_help:
        return Parsed(spec=b.spec, device=device, outputs=b.out, help=True, argv=argv)
    events = _tokenize(c_argv)
    # upstream pre-pass: the last -mask and the last -img give defaults (mask first, img second)
    header_files = []
    for action in ("mask", "img"):
        last = [ev for ev in events if ev.flag.action == action]
        if last:
            b.header_defaults(last[-1].word, last[-1].values[0])
            header_files.append(last[-1].values[0])
    for ev in events:
        b.apply(ev)
    b.finish()
    if validate:
        try:
            b.spec.validate()
        except SpecError as e:
            raise FrontendError(spec_error_message(e, b.origins)) from None
    return Parsed(spec=b.spec, device=device, outputs=b.out, trace_pixel=b.trace_pixel,
                  printout=b.printout, printout_pixel=b.printout_pixel,
                  progress=b.progress and not b.printout, warnings=b.warnings,
                  dump_file=b.dump_file, origins=b.origins, extras=b.extras, argv=argv,
                  header_files=header_files)


# ---------------------------------------------------------------------------------------------
# usage
# ---------------------------------------------------------------------------------------------

_GROUP_ORDER = ("crystal", "F", "mosaic", "rotation", "beam", "sources", "polarization", "geometry",
                "absorption", "sampling", "ROI", "background", "output", "debug", "misc")


def usage(prog: str = "python -m nbsim.nanobragg") -> str:
    lines = [f"usage: {prog} -cell a b c al be ga | -mat FILE  -hkl FILE | -default_F F  [flags]",
             "",
             "nanoBragg-compatible front end of nbsim. Flags and units follow nanoBragg; unknown flags,",
             "missing and non-numeric values are errors.",
             ""]
    for g in _GROUP_ORDER:
        fl = [f for f in FLAGS if f.group == g]
        if not fl:
            continue
        lines.append(f"{g}:")
        for f in fl:
            names = " ".join(f.names)
            if f.prefixes:
                names += " (also " + ", ".join(p + "*" for p in f.prefixes) + ")"
            lines.append(f"  {names:<40s} {f.help}")
        lines.append("")
    lines += ["nbsim options:",
              "  --device cpu|cuda[:N]                    compute device (default cpu)",
              "  --dtype float64|float32                  compute precision (default float64)",
              "  --quirks faithful|physical               reproduce nanoBragg's quirks or fix them all",
              "  --fix NAME[,NAME...]                     fix just these quirks (repeatable):",
              *("      " + line for line in _quirks.help_text(94).splitlines()),
              "  --memory-budget-mb X                     working memory budget",
              "  --time-limit-s X                         refuse a run estimated to take longer",
              "  --compile | --no-compile                 torch.compile always | never (default:",
              "                                           where one image repays compiling)",
              "  -h, --help                               this text"]
    return "\n".join(lines) + "\n"
