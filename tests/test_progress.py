"""Progress bar (nbsim.progress) and the Hydra app's streams: stdout carries only the result folder."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from nbsim import progress as prog
from nbsim.checks import estimate
from nbsim.spec import CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec
from pipeline import store
from pipeline.compose import compose_spec

ROOT = Path(__file__).resolve().parent.parent


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_should_show():
    assert not prog.should_show(0.5, io.StringIO())                 # short, not a terminal
    assert prog.should_show(prog.LONG_RUN_S * 2, io.StringIO())     # long: shown in a log too
    assert prog.should_show(0.01, FakeTTY())                        # terminal (drawn after a delay)
    assert not prog.should_show(100.0, FakeTTY(), enabled=False)    # quiet
    assert prog.should_show(0.0, io.StringIO(), enabled=True)


def test_bar_counts_pixel_steps_with_rate():
    out = io.StringIO()
    with prog.progress_bar(50, 10.0, 400, stream=out) as cb:
        assert cb is not None
        cb(200, 400)
        cb(400, 400)
    text = out.getvalue()
    assert "100%" in text and "20.0k/20.0k" in text and "pixel·steps/s" in text
    with prog.progress_bar(50, 0.1, 400, stream=io.StringIO()) as cb:
        assert cb is None                                          # short run, not a terminal


def test_store_run_shows_bar(tmp_path, capsys):
    spec = ExperimentSpec(detector=DetectorSpec(fpixels=16, spixels=16),
                          crystal=CrystalSpec(cell_A_deg=[100, 100, 100, 90, 90, 90], N=2, default_F=100))
    dev = DeviceSpec(dtype="float64", compile=False)
    spp = estimate(spec, dev).samples_per_pixel
    store.run_or_reuse(spec, dev, root=tmp_path, base_dir=tmp_path, log=lambda m: None, progress=True)
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "100%" in cap.err and f"{256 * spp}/{256 * spp}" in cap.err and "pixel·steps/s" in cap.err
    # reused: nothing simulated, no bar
    store.run_or_reuse(spec, dev, root=tmp_path, base_dir=tmp_path, log=lambda m: None, progress=True)
    assert capsys.readouterr().err == ""


def _cli(tmp_path, *overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "nbsim", f"store.root={tmp_path / 'out'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_stdout_is_only_the_folder_and_long_runs_show_progress(tmp_path):
    """``dir=$(python -m nbsim ...)``: stdout is the folder and nothing else, when computing (with a
    progress bar on stderr for a run estimated over LONG_RUN_S, stderr being a pipe), when reusing
    and when adding a product; quiet=true leaves stderr empty."""
    long_run = ["detector.fpixels=512", "detector.spixels=512", "crystal.mosaic_deg=0.5",
                "crystal.mosaic_domains=10"]
    spec, dev = compose_spec(long_run)
    assert estimate(spec, dev).seconds > prog.LONG_RUN_S
    first = _cli(tmp_path, *long_run)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1 and first.stdout.endswith("\n")
    folder = tmp_path / lines[0]
    assert (folder / "run.json").is_file() and folder.parent == tmp_path / "out"
    assert "pixel·steps/s" in first.stderr and "100%" in first.stderr and "computed" in first.stderr
    for extra in ([], ["store.write_pgm=true"], ["quiet=true"]):
        again = _cli(tmp_path, *long_run, *extra)
        assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
        assert "pixel·steps" not in again.stderr
        if extra == ["quiet=true"]:
            assert again.stderr == ""
    assert (folder / "image.pgm").is_file()
