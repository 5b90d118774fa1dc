"""The benchmark command (issue 5): bad arguments, and one run on a tiny suite that writes a JSON
record with every measurement and compares with the previous one. Nothing here checks a timing."""
from __future__ import annotations

import json

import pytest

from pipeline import bench

TINY = {1: dict(name="tiny cubic 32²",
                argv="-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 "
                     "-detpixels 32 -pixel 1.6")}


@pytest.mark.parametrize("args,msg", [
    (["--cases", "9"], "--cases: expected comma-separated case ids from 1, 2, 3, 4; got '9'"),
    (["--cases", "1,x"], "--cases: expected comma-separated case ids"),
    (["--repeat", "0"], "--repeat: must be >= 1, got 0"),
])
def test_bad_arguments(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args + ["--no-c"])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_bad_c_binary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NB_C_BIN", str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--cases", "1"])
    assert e.value.code == 2
    assert f"NB_C_BIN={tmp_path / 'missing'}: not an executable file" in capsys.readouterr().err


def _run(tmp_path, monkeypatch, extra=()):
    monkeypatch.setattr(bench, "SUITE", TINY)
    out = tmp_path / "history.jsonl"
    assert bench.main(["--cases", "1", "--repeat", "1", "--json", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_record_without_c(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NB_C_BIN", raising=False)
    recs = _run(tmp_path, monkeypatch, ["--no-whole"])
    c = recs[-1]["cases"]["1"]
    for key in ("steady_f64", "steady_f64_compiled", "steady_f32", "steady_f32_compiled"):
        assert c[key]["steady_s"] > 0 and c[key]["via"] == "api"
    assert c["steady_f64_compiled"]["compiled"] is True            # device.compile reached it
    assert c["steady_f32_compiled"]["compiled"] is True
    assert c["steps"] > 0 and c["samples"] == 32 * 32 * c["steps"]
    assert "torch_import" not in recs[-1] and "minus_torch_import_s" not in c   # no whole runs
    assert c["f32_speedup"] > 0 and c["ratio_whole"] is None       # nothing to compare with C
    assert recs[-1]["machine"]["cores"] >= 1 and recs[-1]["git"]["commit"]
    recs = _run(tmp_path, monkeypatch, ["--no-whole", "--quick"])
    assert len(recs) == 2 and "steady_f32" not in recs[-1]["cases"]["1"]
    assert "vs previous record" in capsys.readouterr().out


def test_whole_process_minus_torch_import(tmp_path, monkeypatch):
    monkeypatch.delenv("NB_C_BIN", raising=False)
    rec = _run(tmp_path, monkeypatch, ["--quick", "--no-steady"])[-1]
    c, t = rec["cases"]["1"], rec["torch_import"]
    assert t["rc"] == 0 and t["wall_s"] > 0
    assert c["nbsim_whole"]["rc"] == 0
    assert c["nbsim_whole"]["minus_torch_import_s"] == c["nbsim_whole"]["wall_s"] - t["wall_s"]
    assert c["ratio_whole_minus_torch"] is None                       # no C run to compare with


@pytest.mark.needs_c
def test_record_with_c(tmp_path, monkeypatch, c_binary):
    monkeypatch.setenv("NB_C_BIN", str(c_binary))
    c = _run(tmp_path, monkeypatch, ["--quick"])[-1]["cases"]["1"]
    assert c["c"]["rc"] == 0 and c["c"]["wall_s"] > 0 and c["c"]["rss_mb"] > 0
    assert c["nbsim_whole"]["rc"] == 0 and c["ratio_whole"] > 0
    assert c["ratio_whole_minus_torch"] == c["c"]["wall_s"] / c["nbsim_whole"]["minus_torch_import_s"]
    assert c["parity_f64"]["pearson_r"] > 0.99999 and c["parity_f64"]["ndiff"] == 0
