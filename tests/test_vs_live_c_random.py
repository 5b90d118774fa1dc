"""Random command lines (``tests/c_combos.py``) run by the C program (NB_C_BIN) and by the front end:
the float image equal to the last bit (max |Δ| = 0), the SMV int image, the noise image and the PGM
equal byte for byte, and stdout line for line but for the banner and the warnings (which nbsim
words in its own way and prints elsewhere).

Seeded, so a failure names a seed that reproduces it: ``NBSIM_C_COMBOS=N`` runs N combinations
(default 24), ``NBSIM_C_COMBOS_SEED=S`` starts at seed S. Where the C program writes an image with
infinite pixels, nbsim refuses it (exit 2, one line, nothing written) instead: that is checked too.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from c_combos import combo
from conftest import golden_dir

COUNT = int(os.environ.get("NBSIM_C_COMBOS", "24"))
FIRST = int(os.environ.get("NBSIM_C_COMBOS_SEED", "1"))
OUTS = ["-floatfile", "float.bin", "-intfile", "int.img", "-pgmfile", "img.pgm", "-noisefile",
        "noise.img", "-noprogress"]
PRODUCTS = ("int.img", "img.pgm", "noise.img")
# warnings (C's, with their continuation lines, and nbsim's), which the two print in other places;
# C's "oddball cell angles" warnings continue with six "sin(alpha_star) = ..." / "cos_beta = ..." lines
_WARNING = re.compile(r"^(WARNING|         (but|intensity|recommend) |(sin|cos)[(_9]\w+\)? *= )")


def printed(stdout: str) -> list:
    """What both programs print (the setup echo, statistics, output lines) without the banner,
    warnings, progress and blank lines, and C's "mmap(FILE) = <memory address>" after reading an
    SMV file."""
    return [ln for ln in stdout.splitlines()
            if ln.strip() and not _WARNING.match(ln) and not ln.endswith("% done")
            and not ln.startswith(("nanoBragg nanocrystal diffraction simulator", "mmap("))]


def _run(cmd, d, args, files):
    for f in (golden_dir() / "inputs").iterdir():
        shutil.copy(f, d)
    for name, data in files.items():
        (d / name).write_bytes(data)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd + args + OUTS, cwd=d, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.needs_c
@pytest.mark.parametrize("seed", range(FIRST, FIRST + COUNT))
def test_random_combination_equals_c(seed, c_binary, tmp_path):
    files = {}
    args = combo(random.Random(seed), files) + ["-seed", str(seed)]
    (tmp_path / "c").mkdir()
    (tmp_path / "nb").mkdir()
    c = _run([c_binary], tmp_path / "c", args, files)
    nb = _run([sys.executable, "-m", "nbsim.nanobragg"], tmp_path / "nb", args, files)
    cmd = " ".join(args)
    assert c.returncode == 0, f"the C program failed on seed {seed}: {cmd}\n{c.stdout[-500:]}"
    ref = np.fromfile(tmp_path / "c" / "float.bin", dtype="<f4")
    if not np.isfinite(ref).all():
        assert nb.returncode == 2, (seed, cmd, nb.stderr[-800:])
        assert len(nb.stderr.strip().splitlines()) == 1 and "infinite" in nb.stderr, nb.stderr
        assert not any((tmp_path / "nb" / f).exists() for f in ("float.bin",) + PRODUCTS)
        return
    assert nb.returncode == 0, f"seed {seed}: {cmd}\n{nb.stderr[-800:]}"
    got = np.fromfile(tmp_path / "nb" / "float.bin", dtype="<f4")
    assert got.size == ref.size, (seed, cmd)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    assert diff.max() == 0.0, (f"seed {seed}: {cmd}: max |Δ| {diff.max():.3g} in "
                               f"{int((got != ref).sum())} pixels")
    assert printed(nb.stdout) == printed(c.stdout), f"seed {seed}: {cmd}: stdout differs"
    for name in PRODUCTS:
        a, b = tmp_path / "c" / name, tmp_path / "nb" / name
        assert a.exists() and b.exists(), (seed, cmd, name)
        assert a.read_bytes() == b.read_bytes(), f"seed {seed}: {cmd}: {name} differs"
