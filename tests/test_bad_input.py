"""Bad input, table-driven, through both entry points: one line naming the culprit, exit status 2,
nothing written (no image, no store entry, no Fdump cache, no empty outputs/ folder).

Each row of the tables below is one bad input: the files it needs, the nanoBragg command line for
the front end (``python -m nbsim.nanobragg``) and/or the Hydra overrides for the app
(``python -m nbsim``), and a regular expression the one-line message must match (naming the flag or
key and, for files, the file and line). Rows run in process (``main()`` with captured stderr) for
speed; ``test_subprocess_*`` run a few of them as real commands to prove the exit status and that
stderr is a single line.
"""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from nbsim.io.tables import fdump_bytes

REPO = Path(__file__).resolve().parent.parent

# small, fast valid runs that each bad input spoils
FE_BASE = ["-default_F", "100", "-N", "2", "-lambda", "1", "-distance", "100", "-detpixels", "32",
           "-nonoise", "-nopgm"]
FE_CELL = ["-cell", "100", "100", "100", "90", "90", "90"]
APP_BASE = ["detector.fpixels=32", "detector.spixels=32", "crystal.N=2"]


def smv(header: str, data: Optional[bytes] = None, pixels: int = 32 * 32, hb: int = 512) -> bytes:
    """An SMV file: ``{\\nHEADER_BYTES=..`` + ``header`` lines, padded to ``hb`` bytes, then data."""
    text = "{\nHEADER_BYTES=%d;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n" % hb
    raw = (text + header + "}\f").encode()
    raw += b" " * max(0, hb - len(raw))
    return raw + (np.ones(pixels, "<u2").tobytes() if data is None else data)


GOOD_SMV_HEAD = "SIZE1=32;\nSIZE2=32;\nPIXEL_SIZE=0.1;\n"


@dataclass
class Case:
    id: str
    files: Dict[str, object] = field(default_factory=dict)   # name -> str | bytes | "FIFO" | "DIR"
    fe: Optional[List[str]] = None       # front-end words added to FE_BASE (+ FE_CELL unless -mat)
    app: Optional[List[str]] = None      # Hydra overrides added to APP_BASE
    fe_msg: str = ""                     # regex the front-end message must match
    app_msg: str = ""                    # regex the app message must match
    fe_opts: List[str] = field(default_factory=list)     # double-dash options (front end)


CASES: List[Case] = []


def add(id, files=None, fe=None, app=None, fe_msg="", app_msg="", fe_opts=()):
    CASES.append(Case(id, dict(files or {}), fe, app, fe_msg, app_msg, list(fe_opts)))


# ------------------------------------------------------------------ input files: text tables
HKL_BAD = {
    "nan_F": ("0 0 0 nan\n", r"x\.hkl:1: F must be a finite number"),
    "inf_F": ("1 1 1 100\n0 0 0 inf\n", r"x\.hkl:2: F must be a finite number"),
    "minus_inf_F": ("0 0 0 -inf\n", r"x\.hkl:1: F must be a finite"),
    "word_F": ("0 0 0 abc\n", r"x\.hkl:1: F is not a number"),
    "comma_F": ("0 0 0 1,5\n", r"x\.hkl:1: F is not a number"),
    "empty": ("", r"x\.hkl: no 'h k l F' entries"),
    "blank_lines": ("\n  \n\t\n", r"x\.hkl: no 'h k l F' entries"),
    "binary": (b"\x00\x01\x02\xff\xfe", r"x\.hkl:1: binary data"),
    "binary_line3": (b"1 1 1 1\n2 2 2 2\n\x00\x00\n", r"x\.hkl:3: binary data"),
    "three_fields": ("0 0 0\n", r"x\.hkl:1: expected 'h k l F'"),
    "five_fields": ("0 0 0 1 5\n", r"x\.hkl:1: expected 'h k l F'"),
    "fractional_h": ("0.5 0 0 1\n", r"x\.hkl:1: h, k, l must be integers"),
    "nan_index": ("nan 0 0 1\n", r"x\.hkl:1: h, k, l must be integers"),
    "inf_index": ("0 inf 0 1\n", r"x\.hkl:1: h, k, l must be integers"),
    "huge_index": ("1e300 0 0 1\n", r"x\.hkl:1: Miller index out of range"),
    "big_index": ("0 0 2000000 1\n", r"x\.hkl:1: Miller index out of range"),
    "header_line": ("h k l F\n1 2 3 4\n", r"x\.hkl:1: h, k, l must be integers"),
    "bad_line_2": ("1 2 3 4\n1 2 x 4\n", r"x\.hkl:2: h, k, l must be integers"),
    "table_too_big": ("-1000 0 0 1\n1000 1000 1000 1\n", r"x\.hkl: Miller indices span .*dense table"),
    "huge_span": ("0 0 100000 1\n0 0 -100000 1\n100000 100000 0 1\n", r"x\.hkl: Miller indices span"),
}
for name, (content, msg) in HKL_BAD.items():
    add(f"hkl_{name}", {"x.hkl": content}, ["-hkl", "x.hkl"], ["crystal.hkl_file=x.hkl"],
        r"^-hkl: " + msg, r"^crystal\.hkl_file: " + msg)

MAT_BAD = {
    "zeros": ("0 0 0\n0 0 0\n0 0 0\n", r"m\.mat: the orientation matrix is singular"),
    "rank2": ("0.01 0 0.01\n0 0.01 0.01\n0 0 0\n", r"m\.mat: the orientation matrix is singular"),
    "zero_column": ("0.01 0 0\n0 0.01 0\n0 0 0\n", r"m\.mat: the orientation matrix is singular"),
    "nan": ("nan 0 0\n0 0.01 0\n0 0 0.01\n", r"m\.mat:1: orientation matrix entries must be finite"),
    "inf": ("0.01 0 0\n0 inf 0\n0 0 0.01\n", r"m\.mat:2: orientation matrix entries must be finite"),
    "two_numbers": ("1 2\n", r"m\.mat: need 9 numbers .* found 2"),
    "empty": ("", r"m\.mat: need 9 numbers .* found 0"),
    "word": ("0.01 0 0\n0 a 0\n", r"m\.mat:2: expected a number in the matrix"),
    "binary": (b"\x00\x10\x20", r"m\.mat:1: binary data"),
}
for name, (content, msg) in MAT_BAD.items():
    add(f"mat_{name}", {"m.mat": content}, ["-mat", "m.mat"], ["crystal=matrix", "crystal.matrix_file=m.mat"],
        r"^-mat: " + msg, r"^crystal\.matrix_file: " + msg)

SRC_BAD = {
    "at_sample": ("0 0 0 1 1e-10\n", r"s\.txt:1: source at the sample position"),
    "at_sample_line2": ("-10 0 0 1 1e-10\n\n0 0 0\n", r"s\.txt:3: source at the sample position"),
    "negative_lambda": ("-10 0 0 1 -1e-10\n", r"s\.txt:1: wavelength -1e-10 m must be > 0"),
    "zero_lambda": ("-10 0 0 1 0\n", r"s\.txt:1: wavelength 0 m must be > 0"),
    "inf_position": ("-inf 0 0 1 1e-10\n", r"s\.txt:1: column 1 must be finite"),
    "inf_lambda": ("-10 0 0 1 inf\n", r"s\.txt:1: column 5 must be finite"),
    "word": ("-10 0 0 1 x\n", r"s\.txt:1: column 5 is not a number"),
    "empty": ("", r"s\.txt: no sources"),
    "blank": ("\n \n", r"s\.txt: no sources"),
    "binary": (b"\x00abc", r"s\.txt:1: binary data"),
}
for name, (content, msg) in SRC_BAD.items():
    add(f"src_{name}", {"s.txt": content}, ["-sourcefile", "s.txt"], ["beam.source_file=s.txt"],
        r"^-sourcefile: " + msg, r"^beam\.source_file: " + msg)

# ------------------------------------------------------------------ input files: Fdump cache
GOOD_TABLE = np.full((2, 2, 2), 100.0)
FDUMP_BAD = {
    "truncated": (b"0 0 0 0 0 0\n\f" + b"\0" * 8, r"F\.bin: truncated"),
    "no_header": (b"hello world" * 10, r"F\.bin: not an Fdump file"),
    "empty": (b"", r"F\.bin: not an Fdump file"),
    "empty_ranges": (b"1 0 0 0 0 0\n\f" + b"\0" * 64, r"F\.bin: empty index ranges"),
    "nan_value": (fdump_bytes((0, 1, 0, 1, 0, 1), np.where(np.eye(2)[:, :, None] > 0, np.nan, GOOD_TABLE)),
                  r"F\.bin: F\(0 0 0\) = nan"),
    "inf_value": (fdump_bytes((0, 1, 0, 1, 0, 1), np.full((2, 2, 2), np.inf)), r"F\.bin: F\(0 0 0\) = inf"),
    "huge_ranges": (b"-999999 999999 -999999 999999 -999999 999999\n\f" + b"\0" * 64, r"F\.bin: truncated"),
}
for name, (content, msg) in FDUMP_BAD.items():
    add(f"fdump_{name}", {"F.bin": content}, ["-dump", "F.bin", "-default_F", "0"],
        ["crystal.fdump_file=F.bin"], r"^-dump: " + msg, r"^crystal\.fdump_file: " + msg)
# a stray ./Fdump.bin is read in faithful mode when no -hkl is given (quirk 12)
add("fdump_stray_cwd", {"Fdump.bin": b"garbage"}, ["-default_F", "0"], None,
    r"^-dump: Fdump\.bin: not an Fdump file")
add("fdump_stray_cwd_nan", {"Fdump.bin": FDUMP_BAD["nan_value"][0]}, [], None, r"^-dump: Fdump\.bin: F\(0 0 0\)")

# ------------------------------------------------------------------ input files: SMV mask / img
SMV_BAD = {
    "size1_inf": (smv("SIZE1=inf;\nSIZE2=32;\n"), r"SIZE1=inf is not a finite number", r"lacks a valid SIZE1/SIZE2"),
    "size1_nan": (smv("SIZE1=nan;\nSIZE2=32;\n"), r"SIZE1=nan is not a finite number", r"lacks a valid SIZE1/SIZE2"),
    "size2_zero": (smv("SIZE1=32;\nSIZE2=0;\n"), r"no usable SIZE1/SIZE2", r"need >= 1 pixel"),
    "header_bytes_nan": (smv(GOOD_SMV_HEAD).replace(b"HEADER_BYTES=512", b"HEADER_BYTES=nan"),
                         r"HEADER_BYTES=nan is not a byte count", r"not an SMV file"),
    "header_bytes_huge": (smv(GOOD_SMV_HEAD).replace(b"HEADER_BYTES=512", b"HEADER_BYTES=99999999999"),
                          r"HEADER_BYTES=1e\+11 is not a byte count", r"HEADER_BYTES=99999999999 is outside"),
    "truncated_data": (smv(GOOD_SMV_HEAD, data=b"\1\0" * 10), None, r"truncated SMV data"),
    "header_only": (smv(GOOD_SMV_HEAD, data=b"")[:300], r"HEADER_BYTES=512 is not a byte count",
                    r"HEADER_BYTES=512 is outside"),
    "not_smv": (b"hello" * 200, r"does not look like an SMV", r"not an SMV file"),
    "empty": (b"", r"does not look like an SMV", r"not an SMV file"),
    "float_type": (smv(GOOD_SMV_HEAD).replace(b"TYPE=unsigned_short", b"TYPE=float"), None,
                   r"unsupported SMV TYPE"),
    "wrong_size": (smv("SIZE1=16;\nSIZE2=16;\n", pixels=256), None, r"mask is 16x16 pixels, detector is 32x32"),
    "pixel_nan": (smv(GOOD_SMV_HEAD + "PIXEL_SIZE=nan;\n"), r"PIXEL_SIZE=nan is not a finite number", None),
    "distance_inf": (smv(GOOD_SMV_HEAD + "DISTANCE=inf;\n"), r"DISTANCE=inf is not a finite number", None),
    "gzip_garbage": (b"\x1f\x8b" + b"\0" * 100, r"does not look like an SMV", r"corrupt gzip data"),
}
for name, (content, fe_msg, app_msg) in SMV_BAD.items():
    add(f"mask_{name}", {"m.img": content}, ["-mask", "m.img"] if fe_msg else None,
        ["detector.mask_file=m.img"] if app_msg else None,
        r"^-mask: m\.img:? .*" + (fe_msg or ""), r"^detector\.mask_file: m\.img: .*" + (app_msg or ""))
    if fe_msg and name not in ("empty", "not_smv", "gzip_garbage"):
        add(f"img_{name}", {"i.img": content}, ["-img", "i.img"], None, r"^-img: i\.img:? .*" + fe_msg)
add("img_not_smv", {"i.img": b"P5\n32 32\n255\n" + b"\0" * 1024}, ["-img", "i.img"], None,
    r"^-img: i\.img does not look like an SMV")
add("img_wavelength_nan", {"i.img": smv(GOOD_SMV_HEAD + "WAVELENGTH=nan;\n")}, ["-img", "i.img"], None,
    r"^-img: i\.img: header value WAVELENGTH=nan")

# ------------------------------------------------------------------ input files: not regular files
SPECIAL = {"FIFO": r"is a FIFO \(named pipe\), not a regular file", "DIR": r"is a directory, not a regular file",
           "/dev/zero": r"/dev/zero: is a character device, not a regular file",
           "LINK_ZERO": r"is a character device, not a regular file",
           "MISSING": r"(no such file|file not found)"}
for kind, msg in SPECIAL.items():
    fname = "/dev/zero" if kind == "/dev/zero" else "in.dat"
    files = {} if kind in ("/dev/zero", "MISSING") else {"in.dat": kind}
    tag = kind.strip("/").replace("/", "_").lower()
    for fe_flag, key, extra_fe, extra_app in (
            ("-hkl", "crystal.hkl_file", [], []),
            ("-mat", "crystal.matrix_file", [], ["crystal=matrix"]),
            ("-sourcefile", "beam.source_file", [], []),
            ("-mask", "detector.mask_file", [], []),
            ("-dump", "crystal.fdump_file", ["-default_F", "0"], [])):
        if kind == "MISSING" and fe_flag == "-dump":
            continue                         # a missing cache is not an error (it is written or skipped)
        add(f"{tag}_{fe_flag.strip('-')}", files, [fe_flag, fname] + extra_fe, extra_app + [f"{key}={fname}"],
            "^" + re.escape(fe_flag) + ": .*" + msg, "^" + re.escape(key) + ": .*" + msg)
    if kind != "MISSING":
        add(f"{tag}_img", files, ["-img", fname], None, "^-img: .*" + msg)

# ------------------------------------------------------------------ geometry
UNROTATED = ["detector.rotx_deg=0", "detector.roty_deg=0", "detector.rotz_deg=0", "detector.twotheta_deg=0"]
GEOMETRY = [
    # id, front-end words, app overrides, flag, key, regex
    ("twotheta_90", ["-twotheta", "90"], ["detector.twotheta_deg=90"], "-twotheta", "detector.twotheta_deg",
     "beam is parallel to the detector plane"),
    ("twotheta_m90", ["-twotheta", "-90"], ["detector.twotheta_deg=-90"], "-twotheta", "detector.twotheta_deg",
     "beam is parallel to the detector plane"),
    ("twotheta_270", ["-twotheta", "270"], ["detector.twotheta_deg=270"], "-twotheta", "detector.twotheta_deg",
     "beam is parallel to the detector plane"),
    ("roty_90", ["-detector_roty", "90"], ["detector.roty_deg=90"], "-detector_roty", "detector.roty_deg",
     "beam is parallel"),
    ("rotz_90", ["-detector_rotz", "90"], ["detector.rotz_deg=90"], "-detector_rotz", "detector.rotz_deg",
     "beam is parallel"),
    ("beam_along_y", ["-beam_vector", "0", "1", "0"], ["detector=custom", *UNROTATED, "beam.beam_vector=[0,1,0]"],
     "-beam_vector", "beam.beam_vector", "beam is parallel"),
    ("beam_along_z", ["-beam_vector", "0", "0", "1"], ["detector=custom", *UNROTATED, "beam.beam_vector=[0,0,1]"],
     "-beam_vector", "beam.beam_vector", "beam is parallel"),
    ("odet_perp_beam", ["-odet_vector", "0", "0", "1"], ["detector=custom", *UNROTATED,
                                                          "detector.odet_vector=[0,0,1]"],
     "-odet_vector", "detector.odet_vector", "beam is parallel"),
    ("plane_through_sample", ["-close_distance", "1e-300", "-pivot", "sample"],
     ["detector.close_distance_mm=1e-300"], "-close_distance", "detector.close_distance_mm",
     "detector plane passes through the sample"),
    ("distance_tiny", ["-distance", "1e-6"], ["detector.distance_mm=1e-6"], "-distance", "detector.distance_mm",
     "the run cannot fit: .*sub-pixels"),
    ("dispersion_200", ["-dispersion", "200", "-dispsteps", "3"], ["beam.dispersion_pct=200", "beam.dispsteps=3"],
     "-dispersion", "beam.dispersion_pct", "shortest wavelength 0 A"),
    ("dispersion_300", ["-dispersion", "300", "-dispsteps", "3"], ["beam.dispersion_pct=300", "beam.dispsteps=3"],
     "-dispersion", "beam.dispersion_pct", "shortest wavelength -0.5 A"),
    ("dispersion_1000", ["-dispersion", "1000", "-dispsteps", "2"], ["beam.dispersion_pct=1000",
                                                                     "beam.dispsteps=2"],
     "-dispersion", "beam.dispersion_pct", "every wavelength must be > 0"),
    ("divsteps_1", ["-divsteps", "1"], ["beam.hdivsteps=1", "beam.vdivsteps=1"], "-divsteps", "beam.hdivsteps",
     "divergence grid .* selects no source"),
    ("hdivsteps_1", ["-hdivsteps", "1", "-vdivsteps", "1"], ["beam.hdivsteps=1", "beam.vdivsteps=1"],
     "-hdivsteps", "beam.hdivsteps", "selects no source"),
    ("roi_outside_x", ["-roi", "100", "200", "0", "10"], ["detector.roi=[100,200,0,10]"], "-roi",
     "detector.roi", r"selects no pixel of the 32x32 detector"),
    ("roi_outside_y", ["-roi", "0", "10", "32", "40"], ["detector.roi=[0,10,32,40]"], "-roi", "detector.roi",
     r"selects no pixel"),
    ("roi_just_outside", ["-roi", "32", "32", "0", "0"], ["detector.roi=[32,32,0,0]"], "-roi", "detector.roi",
     r"selects no pixel"),
    ("roi_neg_max_outside", ["-roi", "40", "-1", "0", "-1"], ["detector.roi=[40,-1,0,-1]"], "-roi",
     "detector.roi", r"selects no pixel"),
    ("roi_inverted_x", ["-roi", "10", "5", "0", "10"], ["detector.roi=[10,5,0,10]"], "-roi", "detector.roi",
     "needs xmin <= xmax"),
    ("roi_inverted_y", ["-roi", "0", "10", "10", "5"], ["detector.roi=[0,10,10,5]"], "-roi", "detector.roi",
     "needs xmin <= xmax"),
    ("N_0", ["-N", "0"], ["crystal.N=0"], "-N", "crystal.N", "must be an integer >= 1, got 0"),
    ("N_negative", ["-N", "-3"], ["crystal.N=-3"], "-N", "crystal.N", "must be an integer >= 1"),
    ("Na_0", ["-Na", "0"], ["crystal.Na=0"], "-Na", "crystal.Na", "must be an integer >= 1"),
    ("Nb_0", ["-Nb", "0"], ["crystal.Nb=0"], "-Nb", "crystal.Nb", "must be an integer >= 1"),
    ("Nc_0", ["-Nc", "0"], ["crystal.Nc=0"], "-Nc", "crystal.Nc", "must be an integer >= 1"),
]
for id_, fe, app, flag, key, msg in GEOMETRY:
    add(f"geom_{id_}", {}, fe, app, "^" + re.escape(flag) + ": .*" + msg, "^" + re.escape(key) + ": .*" + msg)

# ------------------------------------------------------------------ sizes
SIZES = [
    ("detpixels_1e5", ["-detpixels", "100000"], ["detector.fpixels=100000", "detector.spixels=100000"],
     "-detpixels", "detector.fpixels", r"the run cannot fit: 100000x100000 pixels.*GiB memory"),
    ("phisteps_1e9", ["-phisteps", "1000000000", "-osc", "1"], ["crystal.phisteps=1000000000", "crystal.osc_deg=1"],
     "-phisteps", "crystal.phisteps", r"the run cannot fit: .*1000000000 phi steps"),
    ("mosaic_1e10", ["-mosaic", "1", "-mosaic_dom", "10000000000"],
     ["crystal.mosaic_deg=1", "crystal.mosaic_domains=10000000000"], "-mosaic_dom", "crystal.mosaic_domains",
     r"cannot fit: .*10000000000 mosaic domains"),
    ("oversample_1e5", ["-oversample", "100000"], ["detector.oversample=100000"], "-oversample",
     "detector.oversample", r"cannot fit: .*100000\^2 sub-pixels"),
    ("dispsteps_1e9", ["-dispersion", "1", "-dispsteps", "1000000000"],
     ["beam.dispersion_pct=1", "beam.dispsteps=1000000000"], "-dispsteps", "beam.dispsteps",
     r"cannot fit: .*1000000000 sources"),
    ("thicksteps_1e9", ["-detector_thick", "100", "-thicksteps", "1000000000"],
     ["detector.thick_um=100", "detector.thicksteps=1000000000"], "-thicksteps", "detector.thicksteps",
     r"cannot fit: .*1000000000 layers"),
]
for id_, fe, app, flag, key, msg in SIZES:
    add(f"size_{id_}", {}, fe, app, "^" + re.escape(flag) + ": .*" + msg, "^" + re.escape(key) + ": .*" + msg)
add("size_time_limit_mosaic", {}, ["-mosaic", "1", "-mosaic_dom", "1000000"],
    ["crystal.mosaic_deg=1", "crystal.mosaic_domains=1000000", "device.time_limit_s=10"],
    r"^--time-limit-s: estimated .* over the limit of 10 s", r"^device\.time_limit_s: estimated .*over the limit",
    fe_opts=["--time-limit-s", "10"])
add("size_time_limit_tiny", {}, [], ["device.time_limit_s=1e-9"], r"^--time-limit-s: estimated",
    r"^device\.time_limit_s: estimated", fe_opts=["--time-limit-s", "1e-9"])
add("size_budget_one_pixel", {}, ["-mosaic", "1", "-mosaic_dom", "100000"],
    ["crystal.mosaic_deg=1", "crystal.mosaic_domains=100000", "device.memory_budget_mb=0.5"],
    r"^--memory-budget-mb: one pixel needs .* more than the budget of 0\.5 MB",
    r"^device\.memory_budget_mb: one pixel needs", fe_opts=["--memory-budget-mb", "0.5"])

# ------------------------------------------------------------------ overflow
OVERFLOW = [
    ("fluence_1e300", ["-fluence", "1e300"], ["beam.fluence_ph_per_m2=1e300"]),
    ("default_F_1e200", ["-default_F", "1e200"], ["crystal.default_F=1e200"]),
    ("default_F_1e30_fluence", ["-default_F", "1e30", "-fluence", "1e40"],
     ["crystal.default_F=1e30", "beam.fluence_ph_per_m2=1e40"]),
    ("flux_1e300", ["-flux", "1e300", "-exposure", "1e8"], ["beam.flux_ph_per_s=1e300", "beam.exposure_s=1e8"]),
]
for id_, fe, app in OVERFLOW:
    msg = r"image: the simulated image holds \d+ NaN and \d+ infinite pixels"
    add(f"overflow_{id_}", {}, fe, app, "^" + msg, "^" + msg)

# ------------------------------------------------------------------ output paths (front end)
for flag, extra in (("-floatfile", []), ("-intfile", []), ("-noisefile", []), ("-pgmfile", [])):
    add(f"out_missing_dir{flag}", {}, [flag, "nodir/out.x"] + extra, None,
        "^" + re.escape(flag) + r": cannot write nodir/out\.x: directory nodir does not exist")
    add(f"out_is_dir{flag}", {"adir": "DIR"}, [flag, "adir"] + extra, None,
        "^" + re.escape(flag) + r": cannot write adir: it is a directory")
add("out_dump_missing_dir", {"x.hkl": "1 1 1 100\n"}, ["-hkl", "x.hkl", "-dump", "nodir/F.bin"], None,
    r"^-dump: cannot write nodir/F\.bin: directory nodir does not exist")
add("out_readonly_fs", {}, ["-floatfile", "/proc/nbsim/f.bin"], None,
    r"^-floatfile: cannot write /proc/nbsim/f\.bin: directory /proc/nbsim does not exist")
# store root (Hydra app)
add("store_root_is_file", {"afile": "x"}, None, ["store.root=afile"], "", r"^store\.root: afile is not a directory")
add("store_root_cannot_create", {}, None, ["store.root=/proc/nbsim_store"], "",
    r"^store\.root: cannot create /proc/nbsim_store: No such file or directory")
add("store_root_readonly_fs", {}, None, ["store.root=/sys/nbsim_store"], "",
    r"^store\.root: cannot create /sys/nbsim_store: ")
add("store_root_under_file", {"afile": "x"}, None, ["store.root=afile/sub"], "",
    r"^store\.root: cannot create afile/sub: Not a directory")


# ---------------------------------------------------------------------------------------------
# running a row
# ---------------------------------------------------------------------------------------------

def _make_files(d: Path, files: Dict[str, object]) -> List[str]:
    for name, content in files.items():
        p = d / name
        if content == "FIFO":
            os.mkfifo(p)
        elif content == "DIR":
            p.mkdir()
        elif content == "LINK_ZERO":
            os.symlink("/dev/zero", p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return sorted(os.listdir(d))


def _one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    return lines[0]


FE_CASES = [c for c in CASES if c.fe is not None]
APP_CASES = [c for c in CASES if c.app is not None]


def fe_argv(c: Case) -> List[str]:
    cell = [] if "-mat" in c.fe else FE_CELL
    return FE_BASE + cell + c.fe + c.fe_opts


@pytest.mark.parametrize("case", FE_CASES, ids=[c.id for c in FE_CASES])
def test_frontend_bad_input(case, tmp_path, monkeypatch, capsys):
    from nbsim.nanobragg import main
    monkeypatch.chdir(tmp_path)
    before = _make_files(tmp_path, case.files)
    rc = main(fe_argv(case))
    out = capsys.readouterr()
    line = _one_line(out.err)
    assert rc == 2
    prefix = "nbsim.nanobragg: error: "
    assert line.startswith(prefix)
    assert re.search(case.fe_msg, line[len(prefix):]), line
    assert "Traceback" not in out.err + out.out
    assert sorted(os.listdir(tmp_path)) == before          # no image, no Fdump cache, nothing


def run_app(overrides, monkeypatch, capsys):
    from pipeline import app
    monkeypatch.setattr(sys, "argv", ["nbsim", *overrides])
    with pytest.raises(SystemExit) as exc:
        app.main()
    out = capsys.readouterr()
    return exc.value.code, out


@pytest.mark.parametrize("case", APP_CASES, ids=[c.id for c in APP_CASES])
def test_app_bad_input(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = _make_files(tmp_path, case.files)
    rc, out = run_app(APP_BASE + case.app, monkeypatch, capsys)
    line = _one_line(out.err)
    assert rc == 2
    prefix = "nbsim: error: "
    assert line.startswith(prefix)
    assert re.search(case.app_msg, line[len(prefix):]), line
    assert "Traceback" not in out.err + out.out
    assert sorted(os.listdir(tmp_path)) == before          # no outputs/ folder, no entry, no cache


def test_table_size():
    """The issue asks for at least 200 bad inputs across both entry points."""
    assert len(FE_CASES) + len(APP_CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------
# what bad input must not break: C's "whole detector" ROI, and a full disk
# ---------------------------------------------------------------------------------------------

def test_negative_roi_means_whole_detector(tmp_path, monkeypatch, capsys):
    """C: a negative ROI bound means "not given" (min -> 0, max -> the detector edge); the image is
    the same as without -roi (it was all zero before: the bounds wrapped around numpy indices)."""
    from nbsim.io.images import read_float
    from nbsim.nanobragg import main
    monkeypatch.chdir(tmp_path)
    args = FE_BASE + FE_CELL
    assert main(args + ["-floatfile", "whole.bin"]) == 0
    assert main(args + ["-roi", "-1", "-1", "-1", "-1", "-floatfile", "neg.bin"]) == 0
    assert main(args + ["-roi", "3", "-1", "-5", "20", "-floatfile", "part.bin"]) == 0
    capsys.readouterr()
    whole, neg, part = (read_float(tmp_path / n, 32, 32) for n in ("whole.bin", "neg.bin", "part.bin"))
    assert whole.max() > 0
    assert np.array_equal(neg, whole)
    assert np.array_equal(part[:21, 3:], whole[:21, 3:]) and part[21:].max() == 0 and part[:, :3].max() == 0


def test_app_full_disk_names_store_root(tmp_path, monkeypatch, capsys):
    """A write that fails (ENOSPC) is one line naming store.root, and nothing is left behind."""
    import errno

    from nbsim.io import products
    monkeypatch.chdir(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "outputs/.abc.tmp/float.bin"))
    monkeypatch.setattr(products, "write_result", full)
    rc, out = run_app(APP_BASE, monkeypatch, capsys)
    line = _one_line(out.err)
    assert rc == 2 and line == "nbsim: error: store.root: cannot write the result under outputs: No space left on device"
    assert os.listdir(tmp_path) == []


def test_frontend_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from nbsim.io import atomic, images, products, smv
    from nbsim.nanobragg import main
    monkeypatch.chdir(tmp_path)
    real = atomic.atomic_write_bytes

    def full(path, data):                    # the float file is written, the disk is full for the int file
        if str(path).endswith(".img"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    for module in (images, smv, products):   # every writer's reference to the atomic write
        monkeypatch.setattr(module, "atomic_write_bytes", full)
    rc = main(FE_BASE + FE_CELL)
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line == ("nbsim.nanobragg: error: cannot write output (-floatfile floatimage.bin, -intfile "
                    "intimage.img): No space left on device")
    assert os.listdir(tmp_path) == []        # the float file written before the failure is removed


def test_input_readers_never_open_a_fifo(tmp_path):
    """The readers refuse a FIFO from its stat (opening it would block without a writer)."""
    from nbsim.io import smv, tables
    from nbsim.io.inputs import InputFileError
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    for reader in (tables.read_hkl, tables.read_matrix, tables.read_sourcefile, tables.read_fdump, smv.read_smv):
        with pytest.raises(InputFileError, match="is a FIFO"):
            reader(fifo)


def test_gzip_bomb_is_refused(tmp_path):
    from nbsim.io import inputs, smv
    p = tmp_path / "bomb.img.gz"
    p.write_bytes(gzip.compress(b"\0" * (4 << 20)))
    with pytest.raises(inputs.InputFileError, match="decompresses to more than"):
        inputs.gunzip_bounded(p.read_bytes(), p, max_bytes=1 << 20)
    with pytest.raises(inputs.InputFileError, match="not an SMV file"):
        smv.read_smv(p)


# ---------------------------------------------------------------------------------------------
# real commands: exit status 2 and a single stderr line
# ---------------------------------------------------------------------------------------------

def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


SUBPROCESS_ROWS = ["hkl_nan_F", "overflow_fluence_1e300"]


@pytest.mark.slow
@pytest.mark.parametrize("row", SUBPROCESS_ROWS)
def test_subprocess_frontend(row, tmp_path):
    case = next(c for c in FE_CASES if c.id == row)
    before = _make_files(tmp_path, case.files)
    p = subprocess.run([sys.executable, "-m", "nbsim.nanobragg", *fe_argv(case)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    line = _one_line(p.stderr)
    assert p.returncode == 2 and re.search(case.fe_msg, line.split("error: ", 1)[1]), p.stderr
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow
@pytest.mark.parametrize("row", ["dev_zero_mask"])
def test_subprocess_app(row, tmp_path):
    case = next(c for c in APP_CASES if c.id == row)
    before = _make_files(tmp_path, case.files)
    p = subprocess.run([sys.executable, "-m", "nbsim", *APP_BASE, *case.app], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    line = _one_line(p.stderr)
    assert p.returncode == 2 and re.search(case.app_msg, line.split("error: ", 1)[1]), p.stderr
    assert sorted(os.listdir(tmp_path)) == before
