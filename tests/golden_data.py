"""Locate and load the committed nanoBragg C reference data (tests/golden, tests/data).

tests/golden is a copy of the project's golden set (manifest.json, cases.txt, inputs/, *.gz,
*.stdout.txt, *.trace.txt) so tests never depend on a directory outside the checkout.
tests/data holds extra reference values made with the C program (see the JSON files' ``_about``).
"""
from __future__ import annotations

import functools
import gzip
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
DATA = TESTS / "data"
C_EXTRA = DATA / "c_extra"


def golden_dir() -> Path:
    """tests/golden; a clear error when the committed copy is missing."""
    if not (GOLDEN / "manifest.json").is_file():
        raise FileNotFoundError(f"golden data missing: {GOLDEN}/manifest.json (copy of the project's golden set)")
    return GOLDEN


@functools.cache
def manifest() -> dict:
    return json.loads((golden_dir() / "manifest.json").read_text())


def case(case_id: str) -> dict:
    for c in manifest()["cases"]:
        if c["id"] == case_id:
            return c
    raise KeyError(f"no golden case {case_id!r}")


def case_ids(with_key: str | None = None) -> list[str]:
    """All case ids, or those whose manifest entry has ``with_key`` (e.g. 'int', 'noise')."""
    return [c["id"] for c in manifest()["cases"] if with_key is None or c.get(with_key)]


def cases() -> list[dict]:
    """The manifest entries of all golden cases, in manifest order."""
    return manifest()["cases"]


def copy_inputs(dest: Path) -> Path:
    """Copy the golden input files (A.mat, P1.hkl, sources.txt, ...) into ``dest``; returns ``dest``.

    The cases' arguments name these files relative to the working directory."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in (golden_dir() / "inputs").iterdir():
        shutil.copy(f, dest / f.name)
    return dest


@dataclass(frozen=True)
class Exactness:
    """How a float image differs from a golden float image (both float32, compared in float64).

    ``max_abs``: max |Δ| (0.0 when bit-identical); ``n_diff``: pixels whose float32 values differ
    (bitwise, so -0.0 vs 0.0 and NaNs count); ``first``: (slow, fast) of the largest |Δ| or None."""
    case_id: str
    max_abs: float
    n_diff: int
    first: tuple | None

    @property
    def identical(self) -> bool:
        return self.n_diff == 0

    def __str__(self) -> str:
        if self.identical:
            return f"{self.case_id}: bit-identical"
        return (f"{self.case_id}: not bit-identical: max |Δ| = {self.max_abs:.6g} at (slow, fast) = "
                f"{self.first}, {self.n_diff} pixel(s) differ")


def exactness(image, case_id: str) -> Exactness:
    """Compare a float image (anything ``np.asarray`` takes: (spixels, fpixels) or flat, any float
    dtype; written files are float32) with the golden C float image of ``case_id``.

    The image is rounded to float32 first, as ``-floatfile`` writes it; the comparison is bitwise."""
    ref = load_float(case_id)
    img = np.asarray(image, dtype=np.float32).reshape(ref.shape)
    differ = img.view(np.uint32) != ref.view(np.uint32)
    n = int(differ.sum())
    if n == 0:
        return Exactness(case_id, 0.0, 0, None)
    d = np.abs(img.astype(np.float64) - ref.astype(np.float64))
    d = np.where(differ & ~np.isfinite(d), np.inf, d)
    at = np.unravel_index(int(np.argmax(d)), d.shape)
    return Exactness(case_id, float(d.max()), n, (int(at[0]), int(at[1])))


def assert_bit_identical(image, case_id: str, what: str = "") -> None:
    """Fail unless ``image`` equals the golden float image bit for bit (max |Δ| == 0)."""
    e = exactness(image, case_id)
    assert e.identical and e.max_abs == 0.0, f"{what + ': ' if what else ''}{e}"


def _read(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def load_float(case_id: str) -> np.ndarray:
    """Golden float image, float32 (spixels, fpixels)."""
    c = case(case_id)
    a = np.frombuffer(_read(golden_dir() / c["float"]), dtype="<f4")
    return a.astype(np.float32).reshape(c["spixels"], c["fpixels"])


def smv_raw(case_id: str, kind: str = "int") -> bytes:
    """Raw (decompressed) bytes of the golden SMV ``kind`` ('int' or 'noise') image."""
    c = case(case_id)
    if not c.get(kind):
        raise KeyError(f"golden case {case_id} has no {kind} image")
    return _read(golden_dir() / c[kind])


def stdout(case_id: str) -> str:
    return (golden_dir() / case(case_id)["stdout"]).read_text()


def arg_value(args: list[str], flag: str, n: int = 1):
    """Values following ``flag`` (exact match) in an argument list, or None."""
    if flag not in args:
        return None
    i = args.index(flag)
    vals = args[i + 1:i + 1 + n]
    return vals[0] if n == 1 else vals


def c_noise_seed(case_id: str) -> int:
    """C-internal noise seed of a case: -N for '-seed N'."""
    v = arg_value(case(case_id)["args"], "-seed")
    if v is None:
        raise KeyError(f"golden case {case_id} has no -seed")
    return -int(v)


def roi(case_id: str):
    """(xmin, xmax, ymin, ymax) from '-roi', or None."""
    v = arg_value(case(case_id)["args"], "-roi", 4)
    return None if v is None else tuple(int(x) for x in v)


def stdout_numbers(text: str) -> dict:
    """The result lines of a nanoBragg stdout as strings (exactly as printed)."""
    out: dict = {}
    pats = {
        "max_I": r"^max_I = (\S+)",
        "mean": r"^mean= (\S+) rms=",
        "rms": r" rms= (\S+) rmsd=",
        "rmsd": r" rmsd= (\S+)$",
        "intfile_scale": r"^intfile_scale = (\S+)",
        "pgm_scale": r"^pgm_scale = (\S+)",
        "photons": r"^(\S+) photons on noise image",
        "overloads": r"photons on noise image \((\d+) overloads\)",
        "misset_deg": r"^random orientation misset angles: (.*) deg",
        "seed": r"^\s+seed: (\S+)",
    }
    for k, p in pats.items():
        m = re.search(p, text, re.MULTILINE)
        if m:
            out[k] = m.group(1)
    return out


@functools.cache
def rng_reference() -> dict:
    return json.loads((DATA / "rng_reference.json").read_text())


@functools.cache
def c_extra_cases() -> dict:
    return json.loads((C_EXTRA / "cases.json").read_text())


def c_extra_file(name: str) -> bytes:
    """Decompressed bytes of tests/data/c_extra/<name>(.gz)."""
    p = C_EXTRA / name
    if not p.exists():
        p = C_EXTRA / (name + ".gz")
    return _read(p)


def c_extra_float(cid: str) -> np.ndarray:
    c = c_extra_cases()[cid]
    a = np.frombuffer(c_extra_file(f"{cid}.float.bin"), dtype="<f4")
    return a.astype(np.float32).reshape(c["spixels"], c["fpixels"])
