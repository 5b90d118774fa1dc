"""Property-based fuzzing (hypothesis) of everything a user types or names: the nanoBragg argv parser,
Hydra overrides and the input-file readers. The property: no input ends in an exception other than the
one-line kinds (``FrontendError``, ``SpecError``, ``InputFileError``) before the simulation starts.

Example counts are bounded so that the default run stays fast; ``NBSIM_FUZZ_EXAMPLES`` raises them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nbsim.checks import preflight  # noqa: E402
from nbsim.frontend.argv import FLAGS, FrontendError, parse_argv  # noqa: E402
from nbsim.io.inputs import InputFileError  # noqa: E402
from nbsim.spec import SpecError  # noqa: E402

N = int(os.environ.get("NBSIM_FUZZ_EXAMPLES", "0")) or None
FAST = settings(max_examples=N or 120, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SLOWER = settings(max_examples=N or 15, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))

NUMBERS = st.sampled_from(["0", "-0", "1", "-1", "2", "90", "180", "1e-300", "1e300", "-1e300", "nan", "inf",
                           "-inf", "1e6", "100000", "3.5", ".5", "1e", "--1", "+5", "0x10", "1000000000"])
WORDS = st.sampled_from(["beam", "sample", "random", "x.hkl", "m.mat", "s.txt", "mask.img", "F.bin",
                         "/dev/zero", "fifo", "nodir/x", "", " ", "-", "--", "-cell", "é", "a b"])
FLAG_NAMES = st.sampled_from(sorted({n for f in FLAGS for n in f.names} | {
    "--device", "--dtype", "--quirks", "--memory-budget-mb", "--time-limit-s", "--compile", "--no-compile"}))
TOKENS = st.one_of(FLAG_NAMES, NUMBERS, WORDS, st.text(max_size=6))
_NVALUES = {"": 0, "f": 1, "i": 1, "s": 1, "f3": 3, "i2": 2, "i4": 4, "misset": 3, "pivot": 1, "abs": 1,
            "cell": 6, "dummy": 1}
_INTS = st.sampled_from(["0", "1", "2", "3", "-1", "10", "100000", "1000000000", "-5"])


@st.composite
def flag_with_values(draw):
    """A flag followed by values of the kind it takes (mostly well-formed, so that the checks after
    the parser are reached), sometimes a stray token."""
    if draw(st.integers(0, 9)) == 0:
        return [draw(TOKENS)]
    f = draw(st.sampled_from(FLAGS))
    n = _NVALUES.get(f.kind, 1)
    pool = {"i": _INTS, "i2": _INTS, "i4": _INTS, "s": WORDS, "pivot": st.sampled_from(["beam", "sample", "x"]),
            "misset": NUMBERS}.get(f.kind, NUMBERS)
    return [draw(st.sampled_from(f.names))] + draw(st.lists(pool, min_size=n, max_size=n))


ARGV = st.lists(flag_with_values(), max_size=5).map(lambda parts: [w for part in parts for w in part])

VALID_FILES = {"x.hkl": "1 2 3 100\n-1 0 2 50\n", "m.mat": "0.01 0 0\n0 0.01 0\n0 0 0.01\n",
               "s.txt": "-10 0 0 1 1e-10\n", "F.bin": None}


@pytest.fixture(scope="module")
def fuzz_dir():
    """A folder with one valid and one awkward file of each kind (a FIFO too), shared by examples."""
    from nbsim.io.tables import fdump_bytes
    d = Path(tempfile.mkdtemp(prefix="nbsim_fuzz_"))
    for name, text in VALID_FILES.items():
        if text is None:
            import numpy as np
            (d / name).write_bytes(fdump_bytes((0, 1, 0, 1, 0, 1), np.full((2, 2, 2), 10.0)))
        else:
            (d / name).write_text(text)
    (d / "mask.img").write_bytes(b"{\nHEADER_BYTES=512;\nSIZE1=8;\nSIZE2=nan;\n}" + b" " * 470)
    os.mkfifo(d / "fifo")
    yield d


def _no_traceback(fn):
    """Run ``fn``; the only exceptions allowed are the one-line kinds."""
    try:
        fn()
    except (FrontendError, SpecError, InputFileError):
        pass


@FAST
@given(argv=ARGV)
def test_fuzz_argv_parser_and_preflight(argv, fuzz_dir):
    """Random nanoBragg command lines: parse, then the full pre-simulation check."""
    base = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "10", "-detpixels", "16"]

    def run():
        p = parse_argv(base + argv, cwd=str(fuzz_dir))
        if not p.help:
            preflight(p.spec, p.device, str(fuzz_dir))
    _no_traceback(run)


SCHEMA_KEYS = st.sampled_from([
    "detector.distance_mm", "detector.pixel_mm", "detector.fpixels", "detector.spixels", "detector.twotheta_deg",
    "detector.roi", "detector.oversample", "detector.thick_um", "detector.thicksteps", "detector.mask_file",
    "detector.convention", "detector.pivot", "detector.odet_vector", "detector.close_distance_mm",
    "beam.wavelength_A", "beam.dispersion_pct", "beam.dispsteps", "beam.hdivsteps", "beam.hdivrange_mrad",
    "beam.source_file", "beam.fluence_ph_per_m2", "beam.beam_vector", "crystal.N", "crystal.cell_A_deg",
    "crystal.hkl_file", "crystal.matrix_file", "crystal.fdump_file", "crystal.mosaic_domains",
    "crystal.mosaic_deg", "crystal.phisteps", "crystal.default_F", "image.adc", "quirks", "device.dtype",
    "device.memory_budget_mb", "device.time_limit_s", "store.preview", "crystal.Nx", "nonsense"])
VALUES = st.one_of(NUMBERS, WORDS, st.sampled_from([
    "null", "[]", "[1,2,3]", "[0,0,0]", "[-1,-1,-1,-1]", "[100,200,0,10]", "[1,2", "true", "'x'", "${oops}",
    "[100,100,100,90,90,90]", "[1,1,1,179,179,179]", "1,2", "{a:1}"]))


@pytest.mark.slow
@SLOWER
@given(pairs=st.lists(st.tuples(SCHEMA_KEYS, VALUES), min_size=1, max_size=3))
def test_fuzz_hydra_overrides(pairs, fuzz_dir):
    """Random Hydra overrides: composition errors and every error after it give one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.compose import cfg_to_spec, compose_config, format_error
    overrides = ["detector.fpixels=16", "detector.spixels=16"] + [f"{k}={v}" for k, v in pairs]
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        assert format_error(e, fallback=True)              # the app reports it in one line
        return
    try:
        spec, device = cfg_to_spec(cfg)
        preflight(spec, device, str(fuzz_dir))
    except Exception as e:                                  # noqa: BLE001 - the property under test
        msg = format_error(e)
        assert msg is not None, f"{type(e).__name__}: {e}"
        assert "\n" not in msg


@FAST
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8")),
                      st.lists(st.lists(NUMBERS, max_size=6).map(" ".join), max_size=6)
                      .map(lambda ls: "\n".join(ls).encode())))
def test_fuzz_input_readers(data, tmp_path_factory):
    """Arbitrary bytes as every kind of input file: read, or one ``InputFileError``."""
    from nbsim.io import smv, tables
    p = tmp_path_factory.getbasetemp() / "fuzz.in"
    p.write_bytes(data)
    for reader in (tables.parse_hkl, tables.read_matrix, tables.read_sourcefile, tables.read_fdump,
                   smv.read_smv):
        _no_traceback(lambda: reader(p))


@FAST
@given(head=st.lists(st.tuples(st.sampled_from(["HEADER_BYTES", "SIZE1", "SIZE2", "PIXEL_SIZE", "DISTANCE",
                                                "WAVELENGTH", "BEAM_CENTER_Y", "TYPE", "BYTE_ORDER"]),
                               st.one_of(NUMBERS, WORDS)), max_size=6),
       tail=st.integers(0, 3000))
def test_fuzz_smv_headers(head, tail, tmp_path_factory):
    """SMV files with random header values, through the app's reader and the front end's header pass."""
    from nbsim.io import smv
    text = "{\nHEADER_BYTES=512;\n" + "".join(f"{k}={v};\n" for k, v in head) + "}\f"
    raw = text.encode("utf-8").ljust(512, b" ") + b"\1" * tail
    p = tmp_path_factory.getbasetemp() / "fuzz.img"
    p.write_bytes(raw)
    _no_traceback(lambda: smv.read_smv(p))
    _no_traceback(lambda: parse_argv(["-cell", "100", "-default_F", "1", "-mask", str(p)], check_files=False))
    _no_traceback(lambda: parse_argv(["-cell", "100", "-default_F", "1", "-img", str(p)], check_files=False))
