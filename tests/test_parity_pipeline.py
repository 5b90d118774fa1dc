"""Parity pipeline: metrics, report, C-output cache and the no-NB_C_BIN path (pipeline.parity & co).

Uses the committed golden data (tests/golden) and small cases with nbsim; the C program is replaced
by a tiny fake (a Python script) where behaviour of the runner, not of nanoBragg, is tested.
"""
from __future__ import annotations

import importlib.util
import json
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, golden_dir
from pipeline import c_runner, parity
from pipeline.compare import Thresholds, compare_images, find_peaks, peak_offsets, read_float_image, verdict

SMALL = ["G16_thick_abs_os3", "G19_roi_nopolar", "G25_hkl_interp_inrange"]   # <= 200 px, fast


def _golden_case(cid):
    for c in json.loads((golden_dir() / "manifest.json").read_text())["cases"]:
        if c["id"] == cid:
            return c
    raise KeyError(cid)


def _write_cases(path: Path, ids, extra=None) -> Path:
    cases = [{"id": i, "argv": " ".join(_golden_case(i)["args"])} for i in ids]
    doc = {"inputs": str(golden_dir() / "inputs"), "cases": cases, **(extra or {})}
    path.write_text(yaml.safe_dump(doc))
    return path


FAKE_C = textwrap.dedent('''\
    #!{py}
    """Fake nanoBragg: logs its call, writes -floatfile from $FAKE_C_IMAGE (gz) times $FAKE_C_SCALE,
    or an image derived from argv and input-file contents."""
    import gzip, hashlib, os, sys
    import numpy as np
    argv = sys.argv[1:]
    with open(os.environ["FAKE_C_LOG"], "a") as f:
        f.write(" ".join(argv) + "\\n")
    out = argv[argv.index("-floatfile") + 1]
    print("OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset"))
    print("cwd=" + os.getcwd())
    print("files=" + ",".join(sorted(os.listdir("."))))
    src = os.environ.get("FAKE_C_IMAGE")
    if src:
        a = np.frombuffer(gzip.decompress(open(src, "rb").read()), "<f4") * float(os.environ.get("FAKE_C_SCALE", "1"))
    else:
        n = int(argv[argv.index("-detpixels") + 1]) if "-detpixels" in argv else 8
        h = hashlib.sha256(" ".join(argv).encode())
        for name in sorted(os.listdir(".")):
            h.update(name.encode() + open(name, "rb").read())
        a = np.full(n * n, int(h.hexdigest()[:6], 16), np.float32)
    a.astype("<f4").tofile(out)
    ''')


@pytest.fixture
def fake_c(tmp_path, monkeypatch):
    exe = tmp_path / "fake_nanoBragg"
    exe.write_text(FAKE_C.format(py=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    monkeypatch.setenv("FAKE_C_LOG", str(calls))
    monkeypatch.setenv(c_runner.ENV_VAR, str(exe))
    return exe, calls


def _ncalls(calls: Path) -> int:
    return len([ln for ln in calls.read_text().splitlines() if ln.strip()])


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def _spots(shape=(64, 64), centres=((10, 10), (30, 40), (50, 20), (20, 52)), width=3.0):
    yy, xx = np.indices(shape)
    a = np.full(shape, 0.5)
    for k, (s, f) in enumerate(centres):
        a += (100 - 10 * k) * np.exp(-((yy - s) ** 2 + (xx - f) ** 2) / width)
    return a


def test_metrics_identical_images_pass_exactly():
    a = _spots()
    m = compare_images(a.copy(), a)
    assert m.identical and m.pearson_r == 1.0 and m.p999_rel == 0.0 and m.max_abs_diff == 0.0
    assert m.sum_ratio == 1.0 and m.max_peak_offset_px == 0.0
    assert len(m.peaks) == 4 and (m.peaks[0]["s"], m.peaks[0]["f"]) == (10, 10)
    assert verdict(m) == (True, [])


def test_metrics_detect_shift_scale_and_noise():
    a = _spots()
    shifted = np.roll(a, 1, axis=1)                      # every spot moves one pixel along fast
    m = compare_images(shifted, a)
    ok, why = verdict(m)
    assert not ok and m.max_peak_offset_px > 0.8
    assert all(abs(p["ds"]) < 1e-9 and p["df"] > 0.8 for p in m.peaks)
    assert any("peak shift" in w for w in why) and any(w.startswith("r=") for w in why)
    m2 = compare_images(a * 1.001, a)                    # 0.1 % brighter: only the sum and p99.9 fail
    ok2, why2 = verdict(m2)
    assert not ok2 and m2.pearson_r > 0.999999 and abs(m2.sum_ratio - 1.001) < 1e-12
    assert any("sum ratio" in w for w in why2) and m2.max_peak_offset_px < 1e-9
    rng = np.random.default_rng(1)
    m3 = compare_images(a * (1 + 1e-8 * rng.standard_normal(a.shape)), a)   # float32-level noise passes
    assert verdict(m3)[0] and m3.max_peak_offset_px < 1e-3
    assert verdict(m2, Thresholds(max_sum_dev=1e-2, max_p999_rel=1e-2))[0]


def test_find_peaks_separation_and_order():
    a = np.zeros((20, 20))
    a[5, 5], a[5, 6], a[15, 15] = 10, 9, 8           # (5,6) is next to a brighter pixel: not a peak
    assert [(s, f) for s, f, _ in find_peaks(a, 5)] == [(5, 5), (15, 15)]
    assert peak_offsets(a, a) and all(p["offset_px"] == 0 for p in peak_offsets(a, a))


def test_metrics_agree_with_golden_parity_py(tmp_path):
    """pipeline.compare reproduces ../shared/golden/parity.py's numbers and verdict."""
    gd = golden_dir()
    spec = importlib.util.spec_from_file_location("golden_parity", gd / "parity.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    case = _golden_case("G16_thick_abs_os3")
    ref = read_float_image(gd / case["float"], (case["spixels"], case["fpixels"]))
    rng = np.random.default_rng(3)
    for scale in (1e-7, 3e-5):
        test = (ref * (1 + scale * rng.standard_normal(ref.shape))).astype("<f4")
        test.tofile(tmp_path / "float.bin")
        ok_ref, msg = gp.compare(case, gd, tmp_path)
        m = compare_images(test.astype(np.float64), ref)
        fields = dict(kv.split("=") for kv in msg.split())
        assert float(fields["r"]) == pytest.approx(m.pearson_r, abs=1e-7)
        assert float(fields["p99.9err"]) == pytest.approx(m.p999_rel, rel=1e-2)
        assert float(fields["sum_ratio"]) == pytest.approx(m.sum_ratio, abs=1e-6)
        assert verdict(m, Thresholds(max_peak_offset_px=None))[0] == ok_ref


# ---------------------------------------------------------------------------------------------
# cases file
# ---------------------------------------------------------------------------------------------

def test_default_cases_file_lists_the_25_golden_cases():
    cf = parity.load_cases(ROOT / "workflows/config/parity_cases.yaml")
    gd = golden_dir()
    manifest = {c["id"]: c["args"] for c in json.loads((gd / "manifest.json").read_text())["cases"]}
    assert [c.id for c in cf.cases] == list(manifest)
    for c in cf.cases:
        assert c.argv == manifest[c.id]
    assert all((d / "P1.hkl").is_file() for d in cf.inputs)


def test_cases_file_schema_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases:\n  - id: x\n    argv: '-N 3'\n    overrides: [crystal.N=3]\n")
    with pytest.raises(parity.ParityConfigError, match="cases.0"):
        parity.load_cases(bad)
    bad.write_text("cases:\n  - id: x\n    argv: '-N 3'\nthresholds: {min_rr: 1}\n")
    with pytest.raises(parity.ParityConfigError, match="min_rr"):
        parity.load_cases(bad)
    assert parity.main(["--cases", str(bad)]) == 2


# ---------------------------------------------------------------------------------------------
# whole command on golden data with nbsim: metrics + report
# ---------------------------------------------------------------------------------------------

def test_parity_command_on_golden_data_writes_report(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(c_runner.ENV_VAR, raising=False)
    cases = _write_cases(tmp_path / "cases.yaml", SMALL)
    out, rep = tmp_path / "out", tmp_path / "rep" / "report.md"
    rc = parity.main(["--cases", str(cases), "--golden", str(golden_dir()), "--out", str(out),
                      "--report", str(rep)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "parity: 3/3 cases pass" in text
    md = rep.read_text()
    assert "**3/3 cases pass**" in md and "| case | verdict | r |" in md
    for cid in SMALL:
        res = json.loads((out / cid / "result.json").read_text())
        assert res["status"] == "pass" and res["reference"]["source"] == "golden"
        m = res["metrics"]
        assert m["pearson_r"] >= 0.99999 and abs(m["sum_ratio"] - 1) <= 1e-4
        assert len(m["peaks"]) == 25 or cid == "G25_hkl_interp_inrange"
        png = out / cid / "compare.png"
        from PIL import Image
        with Image.open(png) as im:
            assert im.size[0] > 3 * 200 and im.mode == "RGB"
        link = f"](../out/{cid}/compare.png)"
        assert link in md, f"report should link {link}"
        assert f"| {cid} | ✅ PASS |" in md


def test_parity_golden_refuses_different_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(c_runner.ENV_VAR, raising=False)
    cases = tmp_path / "cases.yaml"
    argv = " ".join(_golden_case("G16_thick_abs_os3")["args"]).replace("-N 5", "-N 4")
    cases.write_text(yaml.safe_dump({"cases": [{"id": "G16_thick_abs_os3", "argv": argv}]}))
    rc = parity.main(["--cases", str(cases), "--golden", str(golden_dir()), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 1 and "ERROR G16_thick_abs_os3" in out and "different arguments" in out
    assert "⚠️ ERROR" in (tmp_path / "o" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# without NB_C_BIN
# ---------------------------------------------------------------------------------------------

def test_without_c_binary_says_how_to_provide_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(c_runner.ENV_VAR, raising=False)
    cases = _write_cases(tmp_path / "cases.yaml", ["G16_thick_abs_os3"])
    rc = parity.main(["--cases", str(cases), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "NB_C_BIN" in err and "export NB_C_BIN=" in err and "--golden" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv(c_runner.ENV_VAR, str(tmp_path / "nope"))
    assert parity.main(["--cases", str(cases), "--out", str(tmp_path / "o")]) == 2
    assert "is not an executable file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# C runner and its cache, with a fake C program
# ---------------------------------------------------------------------------------------------

def test_c_cache_reruns_only_what_changed(tmp_path, fake_c):
    exe, calls = fake_c
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "P1.hkl").write_text("0 0 1 100\n")
    (inputs / "unused.txt").write_text("x")
    cache = tmp_path / "cache"
    argv = ["-cell", "100", "100", "100", "90", "90", "90", "-hkl", "P1.hkl", "-detpixels", "4"]

    r1 = c_runner.run_c(argv, inputs=[inputs], cache_root=cache)
    assert not r1.cached and _ncalls(calls) == 1
    out = r1.stdout_path.read_text()
    assert "OMP_NUM_THREADS=1" in out and "files=P1.hkl\n" in out      # only the named input copied in
    assert str(cache) not in out                                       # ran in a fresh temp folder
    meta = json.loads((r1.folder / "meta.json").read_text())
    assert meta["argv"] == argv and set(meta["inputs_sha256"]) == {"P1.hkl"}
    img1 = read_float_image(r1.float_path)
    assert img1.size == 16

    # same argv (output flags added by the user are the runner's business): cached, not run
    r2 = c_runner.run_c(argv + ["-floatfile", "mine.bin", "-nopgm"], inputs=[inputs], cache_root=cache)
    assert r2.cached and r2.key == r1.key and _ncalls(calls) == 1
    # a changed argument runs C once more
    r3 = c_runner.run_c(argv[:-1] + ["5"], inputs=[inputs], cache_root=cache)
    assert not r3.cached and r3.key != r1.key and _ncalls(calls) == 2
    # an unrelated input file changing does not matter; the named one does
    (inputs / "unused.txt").write_text("y")
    assert c_runner.run_c(argv, inputs=[inputs], cache_root=cache).cached and _ncalls(calls) == 2
    (inputs / "P1.hkl").write_text("0 0 1 200\n")
    r4 = c_runner.run_c(argv, inputs=[inputs], cache_root=cache)
    assert not r4.cached and r4.key != r1.key and _ncalls(calls) == 3
    assert not np.array_equal(read_float_image(r4.float_path), img1)
    # a different binary is a different cache entry; --force-c reruns
    assert c_runner.run_c(argv, inputs=[inputs], cache_root=cache, force=True).key == r4.key
    assert _ncalls(calls) == 4
    assert sorted(p.name for p in cache.iterdir()) == sorted({r1.key, r3.key, r4.key})


def test_c_runner_reports_failures(tmp_path, monkeypatch):
    bad = tmp_path / "bad_c"
    bad.write_text("#!/bin/sh\necho 'ERROR: unable to open P1.hkl.'\nexit 9\n")
    bad.chmod(0o755)
    with pytest.raises(c_runner.CRunError, match="status 9.*\n.*unable to open P1.hkl"):
        c_runner.run_c(["-hkl", "P1.hkl"], binary=str(bad), cache_root=tmp_path / "c")
    assert not any((tmp_path / "c").iterdir())                  # nothing half-written in the cache
    monkeypatch.delenv(c_runner.ENV_VAR, raising=False)
    with pytest.raises(c_runner.CRunError, match="NB_C_BIN"):
        c_runner.run_c(["-N", "1"], cache_root=tmp_path / "c")


def test_parity_command_with_fake_c_cache_and_failure(tmp_path, fake_c, monkeypatch, capsys):
    """End to end through the C path: nbsim vs 'C' (the golden image), cached on the rerun; a C
    image 1 % too bright fails the case and the exit status."""
    exe, calls = fake_c
    cid = "G16_thick_abs_os3"
    monkeypatch.setenv("FAKE_C_IMAGE", str(golden_dir() / _golden_case(cid)["float"]))
    cases = _write_cases(tmp_path / "cases.yaml", [cid])
    args = ["--cases", str(cases), "--out", str(tmp_path / "o"), "--c-cache", str(tmp_path / "cc")]
    assert parity.main(args) == 0
    assert _ncalls(calls) == 1 and "-floatfile float.bin" in calls.read_text()
    assert parity.main(args) == 0
    assert _ncalls(calls) == 1                                  # second run: C output from the cache
    res = json.loads((tmp_path / "o" / cid / "result.json").read_text())
    assert res["reference"]["source"] == "C cache" and res["status"] == "pass"
    capsys.readouterr()

    monkeypatch.setenv("FAKE_C_SCALE", "1.01")
    assert parity.main(args + ["--force-c"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {cid}" in out and "sum ratio" in out
    assert "❌ FAIL" in (tmp_path / "o" / "report.md").read_text()
    assert parity.main(args + ["--no-fail"]) == 0               # cached (bad) C image, --no-fail


def test_report_check_command(tmp_path):
    from pipeline import report
    for cid, st in (("a", "pass"), ("b", "fail")):
        (tmp_path / cid).mkdir()
        (tmp_path / cid / "result.json").write_text(json.dumps({"id": cid, "status": st, "reasons": ["r<x"]}))
    assert report.main(["check", str(tmp_path), "--ids", "a"]) == 0
    assert report.main(["check", str(tmp_path)]) == 1
    assert report.main(["check", str(tmp_path), "--ids", "a,zzz"]) == 1      # missing result
    assert report.main(["parity", str(tmp_path), "--report", str(tmp_path / "r.md")]) == 0
    assert "**1/2 cases pass**, 1 fail" in (tmp_path / "r.md").read_text()


@pytest.mark.slow
@pytest.mark.needs_c
def test_hydra_override_cases_against_c(tmp_path, c_binary):
    """Cases given as Hydra overrides: C gets spec_to_argv(spec), input files copied in."""
    rc = parity.main(["--cases", str(ROOT / "workflows/config/parity_hydra.yaml"), "--out", str(tmp_path / "o"),
                      "--c-cache", str(tmp_path / "cc"), "--c-bin", c_binary])
    assert rc == 0
