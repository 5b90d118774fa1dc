"""The front end's setup echo against the C program's stdout of every golden case.

C prints its setup (convention, pivot, cell, crystal size, sources, mosaic domains, fluence, detector
geometry, sampling, noise parameters) and, after the pixel loop, the detector's solid angle. nbsim
prints the same lines from the typed setup report (``nbsim.report.SetupReport.echo``) and the run's
statistics. Claimed: every C line from "<convention> convention selected." to the end of the setup
block, except C's WARNING lines (nbsim prints its warnings after the echo), compared line by line as
text, and the solid-angle line; not claimed: the banner, the progress lines, the output-file lines
(tested elsewhere)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import golden_data as gd

# C's warnings and their indented continuation lines ("WARNING: maximum dimension ...", "   but ...")
_WARNING = re.compile(r"^(WARNING: |         (but|intensity|recommend) )")


def c_setup_lines(text: str) -> list:
    """C's setup block: the lines after the banner up to the first progress line (or the blank line
    before the solid angle), without WARNING lines."""
    out = []
    for line in text.splitlines()[1:]:
        if line.endswith("% done") or line.startswith("solid angle"):
            break
        if _WARNING.match(line):
            continue
        out.append(line)
    while out and out[-1] == "":                 # the blank line C prints after the pixel loop
        out.pop()
    return out


def c_solid_angle_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("solid angle"))


def case_argv(cid: str) -> list:
    """The golden case's arguments as the generator ran them: no noise image unless +noise."""
    c = gd.case(cid)
    return list(c["args"]) + ([] if c.get("noise") else ["-nonoise"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return gd.copy_inputs(tmp_path_factory.mktemp("golden_inputs"))


@pytest.mark.parametrize("cid", gd.case_ids())
def test_setup_echo_equals_c(cid, inputs):
    """Every claimed setup line, and the solid angle, equal C's for this case (text, line by line)."""
    from nbsim.experiment import build_model
    from nbsim.frontend import parse_argv
    from nbsim.report import solid_angle_lines
    from nbsim.stats import solid_angle_sum_sr
    text = gd.stdout(cid)
    parsed = parse_argv(case_argv(cid), cwd=str(inputs))
    model = build_model(parsed.spec, base_dir=str(inputs))
    got = model.report.echo()
    want = c_setup_lines(text)
    assert len(want) > 40
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{cid} setup line {i + 1}: nbsim {g!r} != C {w!r}"
    assert len(got) == len(want), f"{cid}: nbsim prints {len(got)} setup lines, C {len(want)}"
    assert solid_angle_lines(solid_angle_sum_sr(model))[-1] == c_solid_angle_line(text)


def test_report_is_frozen_and_round_trips(inputs):
    """The report is immutable; ``to_dict`` (what run.json stores) reads back to an equal report
    apart from the echo-only fields, and holds no echo-only key."""
    import dataclasses

    from nbsim.experiment import build_model
    from nbsim.frontend import parse_argv
    from nbsim.report import SetupReport
    parsed = parse_argv(case_argv("G12_div_disp_polar"), cwd=str(inputs))
    rep = build_model(parsed.spec, base_dir=str(inputs)).report
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.distance_mm = 1.0
    d = rep.to_dict()
    assert "warnings" not in d and "log" not in d and "lambdas_m" not in d
    back = SetupReport.from_dict(d)
    assert back.to_dict() == d
    assert back.sources == rep.sources == 15 and back.fdet == rep.fdet


@pytest.mark.slow
def test_front_end_prints_the_echo(tmp_path):
    """``python -m nbsim.nanobragg`` prints C's setup lines and solid angle, in order (G12)."""
    cid = "G12_div_disp_polar"
    gd.copy_inputs(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-m", "nbsim.nanobragg", *case_argv(cid), "-noprogress",
                          "-floatfile", "float.bin"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    text = gd.stdout(cid)
    want = c_setup_lines(text) + ["", c_solid_angle_line(text)]
    assert lines[:len(want)] == want


def test_store_log_keeps_the_echo(tmp_path):
    """A stored entry's log.txt holds the setup echo and the solid angle, as the front end prints them."""
    from pipeline.compose import compose_spec
    from pipeline import store
    from nbsim.spec import DeviceSpec
    spec, _ = compose_spec(["detector.fpixels=24", "detector.spixels=20", "crystal.N=2"])
    folder, reused, run = store.run_or_reuse(spec, DeviceSpec(), root=tmp_path / "out", base_dir=tmp_path,
                                             log=lambda m: None, progress=False)
    lines = (folder / "log.txt").read_text().splitlines()
    assert not reused and lines[0].endswith(" convention selected.") and len(lines) > 50
    assert any(x.startswith("solid angle subtended by detector = ") for x in lines)
    assert any(x.startswith("  distance=") for x in lines)


def test_solid_angle_sum_is_reused_only_for_the_same_detector():
    """The solid-angle sum of a detector sampled as before is reused (a sweep over the crystal) and
    equals the sum computed afresh; another distance or oversampling is summed again."""
    import nbsim
    from nbsim import stats
    from nbsim.experiment import build_model

    def model(*extra):
        spec, _ = nbsim.compose(["detector.fpixels=40", "detector.spixels=30", *extra])
        return build_model(spec)
    a, b = model("crystal.N=3"), model("crystal.N=3", "crystal.mosaic_domains=2", "crystal.mosaic_deg=0.1",
                                       "crystal.cell_A_deg=[100,100,100,90,90,90]")
    c, d = model("crystal.N=3", "detector.distance_mm=90"), model("crystal.N=3", "detector.oversample=3")
    stats._SOLID_ANGLE_SUMS.clear()
    got = [stats.solid_angle_sum_sr(m) for m in (a, b, c, d)]
    assert len(stats._SOLID_ANGLE_SUMS) == 3                     # a and b share their detector
    for m, g in zip((a, b, c, d), got):
        assert g == stats._solid_angle_sum(m) / m.steps           # summed afresh
    assert b.steps != a.steps and got[1] == got[0] * a.steps / b.steps
    assert got[2] != got[0] and got[3] != got[0]


def test_checked_geometry_is_reused_across_crystals_but_not_spindle_axes():
    """``checks.check_geometry`` reuses the report of a detector checked before when only the crystal
    differs (a sweep over cells and N), equal to the report resolved afresh; another spindle axis (the
    one crystal setting of the detector geometry), distance or beam is resolved again."""
    import nbsim
    from nbsim import checks

    def spec(*extra):
        return nbsim.compose(["detector.fpixels=40", "detector.spixels=30", *extra])[0]
    a = spec("crystal.N=3")
    b = spec("crystal.N=5", "crystal.cell_A_deg=[70,80,90,75,85,95]", "crystal.misset_deg=[10,20,30]")
    c = spec("crystal.N=3", "detector.convention=custom", "crystal.spindle_axis=[0,1,0]")
    d = spec("crystal.N=3", "detector.distance_mm=90")
    e = spec("crystal.N=3", "detector.convention=custom")                 # c without its spindle axis
    checks._CHECKED_GEOMETRY.clear()
    got = [checks.check_geometry(s) for s in (a, b, c, d, e)]
    assert len(checks._CHECKED_GEOMETRY) == 4 and got[1] is got[0]      # a and b share their detector
    for s, g in zip((a, b, c, d, e), got):
        assert g == checks._check_geometry(s)                              # resolved afresh
    assert got[3] != got[0]


def test_source_file_echo_keeps_the_flags_dispersion_steps(inputs):
    """With -sourcefile the sources come from the file, but C's "wave=" line prints the dispersion
    steps the flags resolve to (here 4), not the file's one wavelength per source."""
    from nbsim.experiment import build_model
    from nbsim.frontend import parse_argv
    args = ("-cell 100 100 100 90 90 90 -default_F 10 -N 2 -lambda 1.5 -detpixels 8 -sourcefile "
            "sources.txt -dispersion 0.775 -dispsteps 4").split()
    echo = build_model(parse_argv(args, cwd=str(inputs)).spec, base_dir=str(inputs)).report.echo()
    assert "  wave=1.5e-10 meters +/- 0.775% in 4 steps" in echo


def test_front_end_says_which_smv_header_it_read(tmp_path):
    """C's GetFrame prints "reading FILE" for -mask/-img before its setup lines; so does the front end."""
    import numpy as np
    header = ("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\nSIZE1=8;\n"
              "SIZE2=6;\nPIXEL_SIZE=0.2;\n}\f").encode().ljust(512, b" ")
    (tmp_path / "m.img").write_bytes(header + np.ones((6, 8), "<u2").tobytes())
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-m", "nbsim.nanobragg", "-mask", "m.img", "-cell", "100", "100",
                          "100", "90", "90", "90", "-default_F", "10", "-N", "2", "-noprogress",
                          "-floatfile", "f.bin"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "reading m.img"
    assert out.stdout.splitlines()[1] == "mosflm convention selected."


def test_oddball_cell_angles_are_warned_as_c_does():
    """A triclinic cell whose reciprocal angles come out beyond ±1.0000001 (C: "WARNING: oddball
    reciprocal cell angles:" and six numbers) is warned about, with those numbers; a regular one not."""
    from nbsim.experiment import build_model
    from nbsim.frontend import parse_argv
    base = "-default_F 10 -N 2 -lambda 1 -detpixels 8 -cell "
    odd = build_model(parse_argv((base + "97.549 97.258 107.854 81.436 108.623 92.67").split()).spec)
    lines = [w for w in odd.report.warnings if w.startswith("oddball reciprocal cell angles:")]
    assert len(lines) == 1
    values = dict(kv.split(" = ") for kv in lines[0].split(": ", 1)[1].split(", "))
    assert float(values["sin(gamma_star)"]) > 1.0000001
    assert all(abs(float(v)) <= 1.0000001 for k, v in values.items() if k != "sin(gamma_star)")
    fine = build_model(parse_argv((base + "70 80 90 75 85 95").split()).spec)
    assert not any("oddball" in w for w in fine.report.warnings)
