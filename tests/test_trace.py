"""Per-pixel traces (nbsim.trace) against the instrumented nanoBragg C traces, and pipeline.trace_diff.

Acceptance bar: every numeric value of nbsim's pixel-level trace matches the stored C trace to 1e-9
relative or 1e-12 absolute, with the same line names, order and repetition.
"""
from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nbsim.experiment import build_model
from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec, ExperimentSpec, ImageSpec
from nbsim.trace import trace_lines
from pipeline.trace_diff import diff_traces, first_difference, format_table, main, parse_trace, pixel_block

ROOT = Path(__file__).resolve().parents[1]
TRACE_CASES = ("G01_cubic", "G03_mat_hkl", "G10_custom_pivot_beam_pix0")
RTOL, ATOL = 1e-9, 1e-12


def _golden_dir() -> Path:
    for p in (ROOT / "tests" / "golden", ROOT.parent / "shared" / "golden"):
        if (p / "manifest.json").is_file():
            return p
    pytest.skip("golden data not found (tests/golden or ../shared/golden)")


def _case(cid):
    g = _golden_dir()
    for c in json.loads((g / "manifest.json").read_text())["cases"]:
        if c["id"] == cid:
            return g, c
    pytest.skip(f"golden case {cid} not in manifest")


def _inputs(g: Path) -> Path:
    for p in (g / "inputs", ROOT / "tests" / "golden" / "inputs", ROOT.parent / "shared" / "golden" / "inputs"):
        if p.is_dir():
            return p
    pytest.skip("golden inputs directory not found")


def _hand_spec(cid) -> ExperimentSpec:
    """The three traced cases written out by hand (used when the argv front end is unavailable)."""
    cubic = [100.0, 100.0, 100.0, 90.0, 90.0, 90.0]
    if cid == "G01_cubic":
        return ExperimentSpec(
            detector=DetectorSpec(distance_mm=100, fpixels=256, spixels=256),
            beam=BeamSpec(wavelength_A=1.0),
            crystal=CrystalSpec(cell_A_deg=cubic, default_F=100, N=5), image=ImageSpec(noise_seed=7))
    if cid == "G03_mat_hkl":
        return ExperimentSpec(
            detector=DetectorSpec(distance_mm=90, fpixels=200, spixels=200, pixel_mm=0.25),
            beam=BeamSpec(wavelength_A=1.0),
            crystal=CrystalSpec(matrix_file="A.mat", hkl_file="P1.hkl", N=6))
    if cid == "G10_custom_pivot_beam_pix0":
        return ExperimentSpec(
            detector=DetectorSpec(convention="custom", pivot="beam", distance_mm=100, fpixels=256,
                                  spixels=256, fdet_vector=[0, 0, 1], sdet_vector=[0, -1, 0],
                                  odet_vector=[1, 0, 0], rotx_deg=5, roty_deg=3, rotz_deg=2,
                                  twotheta_deg=15, pix0_vector_mm=[95, 55, -45]),
            beam=BeamSpec(wavelength_A=1.0, beam_vector=[1, 0, 0], polar_vector=[0, 0, 1]),
            crystal=CrystalSpec(cell_A_deg=cubic, default_F=100, N=5, spindle_axis=[0, 0, 1]))
    raise KeyError(cid)


def _spec(cid, c, inputs):
    try:
        from nbsim.frontend.argv import parse_argv
    except ImportError:
        return _hand_spec(cid)
    return parse_argv(c["args"], cwd=str(inputs)).spec


def _model_and_trace(cid, spec_source="auto"):
    g, c = _case(cid)
    inputs = _inputs(g)
    spec = _hand_spec(cid) if spec_source == "hand" else _spec(cid, c, inputs)
    model = build_model(spec, dtype=torch.float64, base_dir=str(inputs))
    tp = c["trace_pixel"]
    lines = trace_lines(model, (tp["slow"], tp["fast"]), spec=spec)
    ref = (g / c["trace"]).read_text().splitlines()
    return model, spec, lines, ref, (tp["slow"], tp["fast"])


def _assert_rows_ok(rows):
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "trace differs from C:\n" + format_table(rows, only_diff=True)


# ---------------------------------------------------------------------------------------------
# nbsim traces vs the stored C traces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cid", TRACE_CASES)
def test_pixel_trace_matches_c(cid):
    _, _, lines, ref, _ = _model_and_trace(cid)
    a, b = pixel_block(ref), pixel_block(lines)
    assert len(a) > 20
    # same names, order and repetition
    assert [t.name for t in parse_trace(a)] == [t.name for t in parse_trace(b)]
    rows = diff_traces(a, b, RTOL, ATOL)
    _assert_rows_ok(rows)
    numeric = sum(isinstance(x, float) for r in rows for x in r["a"])
    assert numeric > 50


@pytest.mark.parametrize("cid", TRACE_CASES)
def test_pixel_trace_hand_spec(cid):
    """Same check with the spec written by hand (independent of the argv front end)."""
    _, _, lines, ref, _ = _model_and_trace(cid, spec_source="hand")
    _assert_rows_ok(diff_traces(pixel_block(ref), pixel_block(lines), RTOL, ATOL))


@pytest.mark.parametrize("cid", TRACE_CASES)
def test_full_trace_matches_c(cid):
    """Detector block (DETECTOR_* and TRACE_C:name= lines) too, when the spec is passed."""
    _, _, lines, ref, _ = _model_and_trace(cid)
    rows = diff_traces(ref, lines, RTOL, ATOL)
    _assert_rows_ok(rows)
    assert rows[0]["name"] == "DETECTOR_FAST_AXIS"
    assert any(r["name"] == "DETECTOR_PIX0_VECTOR" for r in rows)


@pytest.mark.parametrize("cid", TRACE_CASES)
def test_pixel_trace_text_identical_up_to_signed_zero(cid):
    """%.15g text equals C's, apart from -0 vs 0 (phi rotation by 0 turns C's -0 into +0)."""
    _, _, lines, ref, _ = _model_and_trace(cid)
    norm = lambda ls: [" ".join("0" if w == "-0" else w for w in ln.split()) for ln in ls]  # noqa: E731
    assert norm(pixel_block(ref)) == norm(pixel_block(lines))


def test_trace_is_the_image_value():
    """I_pixel_final / floatimage_accumulated are the rendered image's pixel (same tensors)."""
    from nbsim.engine import simulate_image
    model, _, lines, _, (s, f) = _model_and_trace("G01_cubic")
    img = simulate_image(model)
    vals = {ln.split()[1]: ln.split()[2] for ln in pixel_block(lines)}
    assert vals["I_pixel_final"] == "%.15g" % float(img[s, f])
    assert vals["floatimage_accumulated"] == "%.15g" % float(np.float32(float(img[s, f])))


def test_api_simulate_trace_pixel():
    from nbsim.api import simulate
    g, c = _case("G01_cubic")
    spec = _spec("G01_cubic", c, _inputs(g))
    tp = c["trace_pixel"]
    res = simulate(spec, base_dir=str(_inputs(g)), trace_pixel=(tp["slow"], tp["fast"]))
    ref = (g / c["trace"]).read_text().splitlines()
    _assert_rows_ok(diff_traces(pixel_block(ref), pixel_block(res.trace), RTOL, ATOL))


def test_pixel_outside_roi_has_no_pixel_lines():
    spec = _hand_spec("G01_cubic")
    spec.detector.fpixels = spec.detector.spixels = 32
    spec.detector.roi = [10, 20, 10, 20]
    spec.detector.oversample = 1
    model = build_model(spec)
    lines = trace_lines(model, (5, 5))
    assert lines[-1] == "TRACE_CONFIG: tracing pixel (spixel=5, fpixel=5)"
    assert pixel_block(lines) == []
    assert len(pixel_block(trace_lines(model, (12, 11)))) == 40


def test_repetition_per_layer_and_subpixel():
    spec = _hand_spec("G01_cubic")
    spec.detector.fpixels = spec.detector.spixels = 32
    spec.detector.oversample = 2
    spec.detector.thick_um = 100
    spec.detector.thicksteps = 3
    model = build_model(spec)
    names = [t.name for t in parse_trace(pixel_block(trace_lines(model, (3, 4))))]
    assert names.count("pixel_pos_meters") == 3 * 4
    assert names.count("F_cell") == 3 * 4
    assert names.count("I_pixel_final") == 1


def test_dmin_cut_source_prints_geometry_only():
    spec = _hand_spec("G01_cubic")
    spec.detector.fpixels = spec.detector.spixels = 64
    spec.crystal.N = 3
    spec.beam.dmin_A = 50.0
    names = [t.name for t in parse_trace(pixel_block(trace_lines(build_model(spec), (5, 5))))]
    assert "scattering_vec_A_inv" in names and "hkl_frac" not in names and "F_cell" not in names
    assert names[-1] == "floatimage_accumulated"


def test_non_square_shape_has_no_F_latt_factors():
    spec = _hand_spec("G01_cubic")
    spec.detector.fpixels = spec.detector.spixels = 32
    spec.crystal.shape = "gauss"
    names = [t.name for t in parse_trace(pixel_block(trace_lines(build_model(spec), (3, 4))))]
    assert "F_latt" not in names and "F_latt_a" not in names and "F_cell" in names


def test_interpolation_state_exact():
    """With tricubic interpolation, the trace uses C's global state at that pixel (quirk 10)."""
    from nbsim.engine import simulate_image
    g, _ = _case("G03_mat_hkl")
    spec = ExperimentSpec(
        detector=DetectorSpec(distance_mm=90, fpixels=100, spixels=100, pixel_mm=0.5),
        beam=BeamSpec(wavelength_A=1.0),
        crystal=CrystalSpec(matrix_file="A.mat", hkl_file="P1.hkl", N=2))
    model = build_model(spec, base_dir=str(_inputs(g)))
    assert model.interpolate
    img = simulate_image(model)
    pix = (50, 50)
    exact = {t.name: t.tokens for t in parse_trace(trace_lines(model, pix))}
    assert exact["I_pixel_final"][0] == float("%.15g" % float(img[pix]))
    initial = {t.name: t.tokens for t in parse_trace(trace_lines(model, pix, interp_on="initial"))}
    # the corner pixels switch interpolation off long before the centre is reached
    assert initial["I_pixel_final"][0] != exact["I_pixel_final"][0]


# ---------------------------------------------------------------------------------------------
# pipeline.trace_diff
# ---------------------------------------------------------------------------------------------

A_TXT = """DETECTOR_FAST_AXIS 0 0 1
TRACE_C:beam_center_m=X:1.285e-05 Y:1.285e-05 pixel_mm:0.1
TRACE_C:Rx=[1 0 0; 0 1 -0; 0 0 1]
TRACE: free text is ignored = 3
TRACE_CONFIG: tracing pixel (spixel=1, fpixel=2)
TRACE_C: hkl_frac 1.5 2.5 3.5
TRACE_C: hkl_rounded 1 2 3
TRACE_C: hkl_frac 1.25 2 3
TRACE_C: F_cell 100
"""


def test_diff_parses_both_formats():
    ts = parse_trace(A_TXT)
    assert [t.name for t in ts] == ["DETECTOR_FAST_AXIS", "beam_center_m", "Rx", "TRACE_CONFIG",
                                    "hkl_frac", "hkl_rounded", "hkl_frac", "F_cell"]
    assert ts[1].tokens == [("X", 1.285e-05), ("Y", 1.285e-05), ("pixel_mm", 0.1)]
    assert ts[2].tokens == [1.0, 0.0, 0.0, 0.0, 1.0, -0.0, 0.0, 0.0, 1.0]
    assert pixel_block(A_TXT) == ["TRACE_C: hkl_frac 1.5 2.5 3.5", "TRACE_C: hkl_rounded 1 2 3",
                                  "TRACE_C: hkl_frac 1.25 2 3", "TRACE_C: F_cell 100"]


def test_diff_identical_and_tolerances():
    rows = diff_traces(A_TXT, A_TXT)
    assert all(r["ok"] for r in rows) and first_difference(rows) is None
    b = A_TXT.replace("1.25 2 3", "1.2500000001 2 3")          # 8e-11 relative: ok
    assert all(r["ok"] for r in diff_traces(A_TXT, b, 1e-9, 1e-12))
    b = A_TXT.replace("1.25 2 3", "1.2500001 2 3")             # 8e-8 relative: differs
    rows = diff_traces(A_TXT, b, 1e-9, 1e-12)
    bad = [r for r in rows if not r["ok"]]
    assert len(bad) == 1 and bad[0]["name"] == "hkl_frac" and bad[0]["occurrence"] == 1
    assert bad[0]["first"] and math.isclose(bad[0]["max_rel"], 1e-7 / 1.2500001, rel_tol=1e-6)
    b = A_TXT.replace("pixel_mm:0.1", "pixel_mm:0.1000000000001").replace("-0;", "1e-13;")
    assert all(r["ok"] for r in diff_traces(A_TXT, b, 1e-9, 1e-12))   # atol covers 1e-13


def test_diff_marks_first_and_missing_and_strings():
    b = A_TXT.replace("X:1.285e-05", "Z:1.285e-05").replace("TRACE_C: F_cell 100\n", "")
    b += "TRACE_C: extra 1\n"
    rows = diff_traces(A_TXT, b)
    status = {(r["name"], r["occurrence"]): r["status"] for r in rows}
    assert status[("beam_center_m", 0)] == "DIFF"           # label differs: compared as strings
    assert status[("F_cell", 0)] == "only in A"
    assert status[("extra", 0)] == "only in B"
    firsts = [r for r in rows if r["first"]]
    assert len(firsts) == 1 and firsts[0]["name"] == "beam_center_m"
    table = format_table(rows)
    assert "<== FIRST" in table and "only in B" in table


def test_cli_exit_codes(tmp_path, capsys):
    g, c = _case("G01_cubic")
    ref = g / c["trace"]
    _, _, lines, _, _ = _model_and_trace("G01_cubic")
    mine = tmp_path / "nbsim.txt"
    mine.write_text("\n".join(lines) + "\n")
    assert main([str(ref), str(mine)]) == 0
    assert "agree" in capsys.readouterr().out
    bad = tmp_path / "bad.txt"
    bad.write_text(mine.read_text().replace("TRACE_C: polar 0.990370773019261",
                                            "TRACE_C: polar 0.990371773019261"))
    assert main([str(ref), str(bad), "--scope", "pixel"]) == 1
    out = capsys.readouterr().out
    assert "<== FIRST" in out and "first: polar" in out


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_cli_case_non_instrumented_binary(tmp_path, capsys, monkeypatch):
    fake = _script(tmp_path / "nanoBragg", "echo 'writing floatimage.bin'\n")
    monkeypatch.delenv("NB_C_BIN", raising=False)
    rc = main(["--case", "-cell 100 100 100 90 90 90 -default_F 100 -detpixels 16",
               "--pixel", "3", "4", "--c-cmd", fake])
    assert rc == 2
    assert "no TRACE_C lines" in capsys.readouterr().err
    assert main(["--case", "-cell 100 100 100 90 90 90 -default_F 100 -trace_pixel 3 4"]) == 2


@pytest.mark.skipif(sys.platform.startswith("win"), reason="shell script stands in for the C binary")
def test_cli_case_end_to_end(tmp_path, capsys, monkeypatch):
    """--case with a stand-in 'instrumented binary' that prints the stored G01 C trace."""
    g, c = _case("G01_cubic")
    fake = _script(tmp_path / "nanoBragg_trace", f"cat '{g / c['trace']}'\n")
    monkeypatch.setenv("NB_C_BIN", fake)
    tp = c["trace_pixel"]
    args = " ".join(c["args"]) + f" -trace_pixel {tp['slow']} {tp['fast']}"
    rc = main(["--case", args, "--scope", "pixel", "--cwd", str(_inputs(g)),
               "--save", str(tmp_path / "g01")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "g01.c.txt").exists() and (tmp_path / "g01.nbsim.txt").exists()


@pytest.mark.skipif(not os.environ.get("NB_C_BIN"), reason="NB_C_BIN (instrumented C build) not set")
@pytest.mark.parametrize("extra", ["-oversample 2 -detector_thick 100 -detector_thicksteps 2",
                                   "-phi 0 -osc 2 -phisteps 3 -dmin 30", "-curved_det -polar 0.5"])
def test_against_live_c_binary(extra, capsys):
    base = "-cell 100 100 100 90 90 90 -default_F 100 -lambda 1 -distance 100 -detpixels 64 -N 3"
    rc = main(["--case", f"{base} {extra} -trace_pixel 10 12", "--scope", "pixel"])
    out = capsys.readouterr()
    if rc == 2 and "no TRACE_C lines" in out.err:
        pytest.skip("NB_C_BIN is not an instrumented build")
    assert rc == 0, out.out


def test_float32_model_traces():
    """A float32 model gives the same lines; values agree with C to float32 precision."""
    g, c = _case("G01_cubic")
    spec = _spec("G01_cubic", c, _inputs(g))
    model = build_model(spec, dtype=torch.float32)
    tp = c["trace_pixel"]
    lines = pixel_block(trace_lines(model, (tp["slow"], tp["fast"])))
    ref = pixel_block((g / c["trace"]).read_text().splitlines())
    assert [t.name for t in parse_trace(lines)] == [t.name for t in parse_trace(ref)]
    rows = diff_traces(ref, lines, rtol=1e-4, atol=1e-5)
    key = ("pixel_pos_meters", "omega_pixel_sr", "hkl_rounded", "F_latt", "F_cell", "polar",
           "I_before_scaling", "I_pixel_final", "floatimage_accumulated")
    _assert_rows_ok([r for r in rows if r["name"] in key])


# ---------------------------------------------------------------------------------------------
# a partly instrumented C build (some TRACE lines missing) is recognised, not reported as differences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cid", TRACE_CASES)
def test_trace_name_table_matches_nbsim_and_c(cid):
    from nbsim.trace import PIXEL_NAMES_ALWAYS, PIXEL_NAMES_CONDITIONAL
    from pipeline.trace_diff import _pixel_names
    _, _, lines, ref, _ = _model_and_trace(cid)
    known = set(PIXEL_NAMES_ALWAYS) | set(PIXEL_NAMES_CONDITIONAL)
    for names in (_pixel_names(lines), _pixel_names(ref)):
        assert set(PIXEL_NAMES_ALWAYS) <= set(names) <= known
    assert set(_pixel_names(lines)) == set(_pixel_names(ref))


def _drop(lines, names):
    return [ln for ln in lines if not any(ln.strip().startswith(f"TRACE_C: {n} ") for n in names)]


def test_partly_instrumented_build_is_named_in_one_line(tmp_path, capsys):
    from pipeline.trace_diff import untraced_names
    g, c = _case("G01_cubic")
    _, _, lines, ref, _ = _model_and_trace("G01_cubic")
    gone = ["omega_pixel_sr", "F_latt_a", "F_latt_b", "F_latt_c", "capture_fraction"]
    partial = _drop(ref, gone)
    assert untraced_names(ref, lines) == [] and untraced_names(lines, ref) == []
    assert sorted(untraced_names(partial, lines)) == sorted(gone)
    assert untraced_names(pixel_block(partial)[:0], lines) == []          # no pixel lines: not traced
    a, b = tmp_path / "c_partial.txt", tmp_path / "nbsim.txt"
    a.write_text("\n".join(partial) + "\n")
    b.write_text("\n".join(lines) + "\n")
    assert main([str(a), str(b)]) == 0                                    # no false difference
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if "partly instrumented" in ln]
    assert len(notes) == 1 and notes[0].startswith(f"trace_diff: A ({a}) is a partly instrumented build: "
                                                   "it never prints 5 trace lines")
    assert "not traced by A" in out and "all " in out
    # a real difference next to the missing lines is still found
    b.write_text("\n".join(lines).replace("TRACE_C: polar 0.990370773019261",
                                          "TRACE_C: polar 0.990371773019261") + "\n")
    assert main([str(a), str(b)]) == 1
    assert "first: polar" in capsys.readouterr().out
    # the full build: no such line
    a.write_text("\n".join(ref) + "\n")
    b.write_text("\n".join(lines) + "\n")
    assert main([str(a), str(b)]) == 0
    assert "partly instrumented" not in capsys.readouterr().out


@pytest.mark.skipif(sys.platform.startswith("win"), reason="shell script stands in for the C binary")
def test_cli_case_partly_instrumented_binary(tmp_path, capsys, monkeypatch):
    g, c = _case("G01_cubic")
    partial = _drop((g / c["trace"]).read_text().splitlines(), ["hkl_frac", "hkl_rounded"])
    (tmp_path / "partial.txt").write_text("\n".join(partial) + "\n")
    monkeypatch.setenv("NB_C_BIN", _script(tmp_path / "nanoBragg_partial", f"cat '{tmp_path / 'partial.txt'}'\n"))
    tp = c["trace_pixel"]
    args = " ".join(c["args"]) + f" -trace_pixel {tp['slow']} {tp['fast']}"
    assert main(["--case", args, "--scope", "pixel", "--cwd", str(_inputs(g))]) == 0
    out = capsys.readouterr().out
    assert "trace_diff: A (C) is a partly instrumented build: it never prints 2 trace lines the full " \
           "-DTRACING build prints (hkl_frac, hkl_rounded)" in out
