"""Batched sweeps: fast composition, batch planning, the run-batch job, a batch killed half-way,
an extended grid, and the in-process Hydra launcher (hydra/launcher=nbsim_batch)."""
from __future__ import annotations

import filecmp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline import sweep
from pipeline.compose import compose_spec, format_error
from pipeline.hashing import config_hash
from pipeline.store import verify_entry

SNAKEFILE = ROOT / "workflows" / "Snakefile"
BIT_FILES = ("float.bin", "int.img", "preview.png", "config.yaml", "log.txt")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SLURM_CONF", None)
    return env


def _snakemake(workdir: Path, config: dict, *extra, timeout=300):
    cfgp = workdir / "sweep.yaml"
    cfgp.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(cfgp), "--cores", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _entries(store: Path) -> dict:
    return {d.name: d for d in store.iterdir() if re.fullmatch(r"[0-9a-f]{16}", d.name)} \
        if store.is_dir() else {}


# ---------------------------------------------------------------------------------------------
# composition and planning (pure Python)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    ["detector.fpixels=32", "crystal.N=3"],
    ["crystal=triclinic", "crystal.misset_deg=[10,20,30]", "detector.distance_mm=80.5"],
    ["detector=xds", "pivot=sample", "crystal.N=4", "beam.wavelength_A=1.2"],
    ["beam=divergent", "image.int_scale=null", "quirks=physical", "fix=[phi0_carryover]"],
    ["detector=custom", "detector.distance_mm=100", "detector.distance_mm=90"],  # the last wins
    ["store.root='a b'", "device.dtype=float32", "crystal.N=3"],
])
def test_composer_equals_hydra_compose(overrides):
    comp = sweep.Composer()
    for _ in range(2):                                # the second time from the cached base
        spec, dev = comp.spec(overrides)
        ref_spec, ref_dev = compose_spec(overrides)
        assert spec == ref_spec and dev == ref_dev
        assert config_hash(spec, dev) == config_hash(ref_spec, ref_dev)
    assert comp.config(overrides).store == __import__("pipeline.compose", fromlist=["x"]).compose_config(overrides).store
    assert comp.resolve(overrides)[:2] == compose_spec(overrides)


def test_composer_undoes_each_point():
    """Points resolved one after the other from one cached base: each equals its own composition
    (a key set by one point is back to its default for the next)."""
    seq = [["crystal.N=7", "detector.distance_mm=80", "crystal.misset_deg=[1,2,3]", "store.write_pgm=true"],
           ["crystal.N=2"], ["detector.distance_mm=90", "crystal.cell_A_deg=[60,70,80,90,90,90]"], [],
           ["crystal.misset_deg=null", "image.noise=false"], ["crystal.N=7"]]
    comp = sweep.Composer()
    from pipeline.compose import compose_config
    for ovr in seq:
        spec, dev, store, quiet = comp.resolve(ovr)
        cfg = compose_config(ovr)
        assert (spec, dev) == compose_spec(ovr)
        assert store == __import__("omegaconf").OmegaConf.to_container(cfg.store) and quiet is False


def test_composer_grid_points_incrementally_equal_their_compositions():
    """Grid points applied incrementally to one base (only changed keys set again, keys a point does
    not set put back) equal their own compositions, also when the pattern breaks in between (a key
    set twice, a key inside another, a mapping value, an error, ``config``)."""
    from omegaconf import OmegaConf

    from pipeline.compose import compose_config
    base = ["crystal=triclinic", "detector.fpixels=24", "detector.spixels=24", "crystal.misset_deg=[10,20,30]"]
    grid = [base + [f"crystal.cell_A_deg={c}", f"crystal.N={n}", f"detector.distance_mm={d}"]
            for c in ("[70,80,90,75,85,95]", "[60,70,80,80,85,95]") for n in (3, 4) for d in (80, 100.5)]
    seq = grid[:3] + [base + ["crystal.N=5", "crystal.N=6"], grid[3],
                      base + ["image.adc=10", "image={adc:20}"], grid[4], base + ["crystal.N=-1"],
                      grid[5], base + ["crystal.phisteps=2"], "config", grid[6], grid[6], base, grid[7],
                      ["crystal=triclinic", "crystal.N=4", "store.root=elsewhere", "quiet=true"], grid[0]]
    comp = sweep.Composer()
    for ovr in seq:
        if ovr == "config":
            assert comp.config(grid[2]) == compose_config(grid[2])
            continue
        try:
            want = compose_spec(ovr)
        except Exception as e:                        # noqa: BLE001 - the same error both ways
            with pytest.raises(type(e)):
                comp.resolve(ovr)
            continue
        spec, dev, store, quiet = comp.resolve(ovr)
        cfg = compose_config(ovr)
        assert (spec, dev) == want, ovr
        assert config_hash(spec, dev) == config_hash(*want)
        assert store == OmegaConf.to_container(cfg.store) and quiet == bool(cfg.quiet), ovr
    # the incremental path ran: the next grid point (one value changed) is one update of the base
    calls = []
    real = OmegaConf.update
    monkey = pytest.MonkeyPatch()
    monkey.setattr(OmegaConf, "update", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    try:
        comp.resolve(grid[1])
    finally:
        monkey.undo()
    assert calls == ["detector.distance_mm"]
    assert comp.resolve(grid[1])[:2] == compose_spec(grid[1])


@pytest.mark.parametrize("bad", [["crystal.NN=3"], ["crystal.N=abc"], ["detector=nope"], ["crystal.N=[1"]])
def test_composer_errors_read_as_hydra_errors(bad):
    def message(fn):
        try:
            fn(bad)
        except Exception as e:                        # noqa: BLE001
            return format_error(e, fallback=True)
        raise AssertionError("no error")
    assert message(sweep.Composer().spec) == message(compose_spec)


def test_point_hash_is_the_stores_hash_with_a_negative_roi_bound():
    """The store hashes a spec after its preflight resolved the ROI (a negative bound: the detector
    edge); the sweep's planned hash is the same."""
    from nbsim.checks import preflight
    ovr = ["detector.fpixels=32", "detector.spixels=32", "detector.roi=[-1,10,-1,12]"]
    spec, dev = compose_spec(ovr)
    preflight(spec, dev)
    assert spec.detector.roi == [0, 10, 0, 12]
    assert sweep.point_hash(ovr) == config_hash(spec, dev)
    plain = ["detector.fpixels=32", "detector.spixels=32", "detector.roi=[2,10,3,12]"]
    assert sweep.point_hash(plain) == config_hash(*compose_spec(plain))     # unchanged hashes


def _points(n):
    return [sweep.Point(index=i, params={}, overrides=["detector.fpixels=16", "detector.spixels=16",
                                                       f"crystal.N={i + 1}"], hash=f"{i:016x}")
            for i in range(n)]


@pytest.mark.parametrize("shape", [(256, 256), (255, 301), (17, 5), (999, 37)])
@pytest.mark.parametrize("thumb", [200, 10, 3, 1000])
def test_thumbnail_block_max_is_the_block_maximum(shape, thumb):
    """preview.block_max (strided maxima) equals the maximum of each k x k block of the image padded
    with its minimum, bit for bit, NaN included."""
    import numpy as np

    from pipeline.preview import block_max
    a = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    a[3, 2] = np.nan if shape == (17, 5) else a[3, 2]
    k = max(1, -(-max(shape) // thumb))
    s2, f2 = -(-shape[0] // k), -(-shape[1] // k)
    pad = np.full((s2 * k, f2 * k), np.nanmin(a), dtype=a.dtype)
    pad[:shape[0], :shape[1]] = a
    want = pad.reshape(s2, k, f2, k).max(axis=(1, 3))
    got = block_max(a, thumb)
    assert got.dtype == a.dtype and got.shape == want.shape and np.array_equal(got, want, equal_nan=True)


def test_plan_batches():
    pts = _points(7)
    assert [len(b.points) for b in sweep.plan_batches(pts, "auto", slots=2)] == [4, 3]
    assert [len(b.points) for b in sweep.plan_batches(pts, "auto", slots=16)] == [1] * 7
    assert [len(b.points) for b in sweep.plan_batches(pts, 3)] == [3, 3, 1]
    # on a cluster: ~batch_seconds of estimated work per job (each tiny point counts 50 ms)
    assert [len(b.points) for b in sweep.plan_batches(pts, "auto", cluster=True, batch_seconds=0.1)] \
        == [2, 2, 2, 1]
    assert len(sweep.plan_batches(pts, "auto", cluster=True)) == 1
    ids = [b.id for b in sweep.plan_batches(pts, 3)]
    assert len(set(ids)) == 3 and ids == [b.id for b in sweep.plan_batches(pts, 3)]
    assert sweep.plan_batches([], "auto") == []
    with pytest.raises(sweep.SweepError, match="batch_size: must be an integer >= 1 or auto"):
        sweep.plan_batches(pts, 0)


def test_schema_batch_size():
    assert sweep.validate_config({"grid": {"crystal.N": [3]}, "batch_size": 4})["batch_size"] == 4
    with pytest.raises(sweep.SweepError, match="batch_size"):
        sweep.validate_config({"grid": {"crystal.N": [3]}, "batch_size": "big"})


# ---------------------------------------------------------------------------------------------
# the run-batch job
# ---------------------------------------------------------------------------------------------

def test_points_file_round_trip_and_summary_of_names_missing_points(tmp_path, capsys):
    """The summary job reads the points from the points file the workflow wrote (same points, same
    hashes, rewritten only when they change) and fails, naming them, when points are not stored."""
    cfg = sweep.validate_config({"name": "t", "store_root": str(tmp_path / "store"),
                                 "base": ["detector.fpixels=16", "detector.spixels=16"],
                                 "grid": {"crystal.N": [2, 3], "detector.distance_mm": [80, 100.5]}})
    points = sweep.expand(cfg)
    f = sweep.write_points_file(points, tmp_path / "points.json")
    assert sweep.read_points_file(f) == points
    stamp = f.stat().st_mtime_ns
    sweep.write_points_file(points, f)
    assert f.stat().st_mtime_ns == stamp                  # unchanged points: the file is not touched
    rc = sweep.summary_of(f, tmp_path / "store", tmp_path / "s.csv", tmp_path / "s.png", name="t",
                          logs="logs/sweep_batch/")
    err = capsys.readouterr().err
    assert rc == 1 and "sweep t: 4 points were not stored" in err and "logs/sweep_batch/" in err, err
    assert (tmp_path / "s.csv").read_text().count("\n") == 5


def test_run_batch_stores_every_point_and_skips_stored(tmp_path):
    cfg = sweep.validate_config({"store_root": "store", "base": ["detector.fpixels=24", "detector.spixels=24"],
                                 "grid": {"crystal.N": [2, 3], "detector.distance_mm": [80, 100]}})
    pts = sweep.expand(cfg, base_dir=tmp_path)
    (b,) = sweep.plan_batches(pts, 4)
    man = sweep.write_manifest(b, tmp_path / "store")
    run = lambda: subprocess.run([sys.executable, "-m", "pipeline.sweep", "run-batch", str(man), "--done",  # noqa: E731
                                  str(b.marker(tmp_path / "store"))], cwd=tmp_path, capture_output=True,
                                 text=True, env=_env(), timeout=300)
    p = run()
    assert p.returncode == 0, p.stderr
    assert "4 points, 4 computed, 0 stored already" in p.stderr
    for pt in pts:
        doc, why = verify_entry(tmp_path / "store" / pt.hash, pt.hash)
        assert doc is not None, why
        assert doc["preview_thumb_px"] == 200
    assert b.marker(tmp_path / "store").read_text().split() == [pt.hash for pt in pts]
    before = {pt.hash: (tmp_path / "store" / pt.hash / "run.json").stat().st_mtime_ns for pt in pts}
    p = run()
    assert p.returncode == 0 and "4 points, 0 computed, 4 stored already" in p.stderr
    assert before == {pt.hash: (tmp_path / "store" / pt.hash / "run.json").stat().st_mtime_ns for pt in pts}


def test_run_batch_refuses_a_changed_configuration(tmp_path):
    pts = sweep.expand(sweep.validate_config({"store_root": "s", "grid": {"crystal.N": [2]}}), base_dir=tmp_path)
    pts[0].hash = "0" * 16
    (b,) = sweep.plan_batches(pts, 1)
    man = sweep.write_manifest(b, tmp_path / "s")
    p = subprocess.run([sys.executable, "-m", "pipeline.sweep", "run-batch", str(man)], cwd=tmp_path,
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "now hashes to" in p.stderr and "planned 0000000000000000" in p.stderr
    assert _entries(tmp_path / "s") == {}


@pytest.mark.slow
def test_killed_batch_leaves_complete_entries_and_the_rerun_completes_it(tmp_path):
    """Snakemake is killed while its one batch is half-way: every entry on disk is complete, and the
    next run computes only the points still missing."""
    config = {"name": "kill", "store_root": "store", "batch_size": 6,
              "base": ["detector.fpixels=160", "detector.spixels=160", "crystal.mosaic_deg=0.5",
                       "crystal.mosaic_domains=6", "detector.oversample=2"],
              "grid": {"crystal.N": [3, 4, 5, 6, 7, 8]}}
    cfgp = tmp_path / "sweep.yaml"
    cfgp.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
           "--configfile", str(cfgp), "--cores", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    store = tmp_path / "store"
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 240 and proc.poll() is None:
            if any((d / "run.json").is_file() for d in _entries(store).values()):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)           # Snakemake and its batch job (as scancel does)
        proc.wait(timeout=60)
    done = {h for h, d in _entries(store).items() if (d / "run.json").is_file()}
    assert 1 <= len(done) < 6, f"{len(done)} of 6 stored when killed (timing)"
    assert set(_entries(store)) == done               # no entry without its run.json
    assert not [d for d in store.iterdir() if d.name.endswith(".tmp")]   # the half-built one removed
    for h in done:
        assert verify_entry(store / h, h)[0] is not None
    mtimes = {h: (store / h / "run.json").stat().st_mtime_ns for h in done}

    p = _snakemake(tmp_path, config)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    logs = sorted((store / "logs" / "sweep_batch").glob("*.log"), key=lambda f: f.stat().st_mtime)
    assert f"{6 - len(done)} points, {6 - len(done)} computed, 0 stored already" in logs[-1].read_text()
    assert {h: (store / h / "run.json").stat().st_mtime_ns for h in done} == mtimes
    assert len(_entries(store)) == 6 and all(verify_entry(d, h)[0] for h, d in _entries(store).items())


@pytest.mark.slow
def test_extended_grid_runs_only_the_new_points_and_a_rerun_nothing(tmp_path):
    """(The default run covers the same with a dry run: tests/test_workflows.py.)"""
    config = {"name": "ext", "store_root": "store", "base": ["detector.fpixels=16", "detector.spixels=16"],
              "grid": {"crystal.N": [2, 3]}}
    assert _snakemake(tmp_path, config).returncode == 0
    store = tmp_path / "store"
    first = {h: (d / "run.json").stat().st_mtime_ns for h, d in _entries(store).items()}
    assert len(first) == 2
    again = _snakemake(tmp_path, config)
    assert "Nothing to be done" in again.stdout + again.stderr
    config["grid"]["crystal.N"] = [2, 3, 4, 5]
    p = _snakemake(tmp_path, config)
    assert p.returncode == 0
    logs = [f.read_text() for f in (store / "logs" / "sweep_batch").glob("*.log")]
    new = [t for t in logs if "2 stored already" not in t and "computed" in t]
    assert sum(int(re.search(r"(\d+) computed", t).group(1)) for t in logs) == 4   # 2 + 2, none twice
    assert new
    assert {h: (store / h / "run.json").stat().st_mtime_ns for h in first} == first
    assert len(_entries(store)) == 4
    again = _snakemake(tmp_path, config)
    assert "Nothing to be done" in again.stdout + again.stderr


# ---------------------------------------------------------------------------------------------
# Hydra: the in-process launcher
# ---------------------------------------------------------------------------------------------

def test_batch_launcher_equals_hydra_basic_launcher(tmp_path):
    """The default launcher (nbsim_batch) and Hydra's basic launcher store the same folders, bit for
    bit (32x32 images: the preview thumbnail is the full image), and print one folder per point."""
    args = ["--multirun", "detector.fpixels=32", "detector.spixels=32", "crystal.N=2,3",
            "detector.distance_mm=80,100"]
    out = {}
    for launcher in ("nbsim_batch", "basic"):
        wd = tmp_path / launcher
        wd.mkdir()
        p = subprocess.run([sys.executable, "-m", "nbsim", *args, f"hydra/launcher={launcher}"], cwd=wd,
                           capture_output=True, text=True, env=_env(), timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        out[launcher] = (wd, p.stdout.split())
    (wb, folders_b), (wr, folders_r) = out["nbsim_batch"], out["basic"]
    assert folders_b == folders_r and len(folders_b) == 4
    for f in folders_b:
        assert [n for n in BIT_FILES if not filecmp.cmp(wb / f / n, wr / f / n, shallow=False)] == []
    # a rerun reuses everything; a config error of one point stops the multirun before it simulates
    p = subprocess.run([sys.executable, "-m", "nbsim", *args], cwd=wb, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert p.returncode == 0 and "0 computed" in p.stderr and "4 reused" in p.stderr
    bad = subprocess.run([sys.executable, "-m", "nbsim", "--multirun", "detector.fpixels=32",
                          "detector.spixels=32", "crystal.N=7,-1", "store.root=bad"], cwd=wb,
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith("nbsim: error: crystal.N")
    assert _entries(wb / "bad") == {}                 # nothing simulated (Hydra's own .hydra/ aside)


def test_nbsim_sweeper_validates_only_in_front_of_other_launchers(monkeypatch):
    """hydra/sweeper=nbsim (the app's default) leaves out Hydra's per-point composition check in front
    of nbsim_batch (which composes every point itself) and keeps it in front of any other launcher."""
    from hydra.plugins.sweeper import Sweeper

    from hydra_plugins.nbsim_launcher.nbsim_launcher import NbsimBatchLauncher, NbsimSweeper
    calls = []
    monkeypatch.setattr(Sweeper, "validate_batch_is_legal", lambda self, batch: calls.append(batch))
    s = NbsimSweeper(max_batch_size=None)
    assert isinstance(s, Sweeper)
    s.basic.launcher = NbsimBatchLauncher()           # what BasicSweeper.sweep calls
    s.basic.validate_batch_is_legal([["crystal.N=3"]])
    assert calls == []
    s.basic.launcher = object()                       # e.g. Hydra's basic launcher
    s.basic.validate_batch_is_legal([["crystal.N=3"]])
    assert calls == [[["crystal.N=3"]]]


@pytest.mark.parametrize("bad, msg", [
    ("detector.fpixels=32,abc", "nbsim: error: detector.fpixels: must be an integer"),
    ("crystal=cubic,nosuch", "nbsim: error: crystal=nosuch: no such option"),
])
def test_multirun_composition_error_of_one_point_is_one_line(tmp_path, bad, msg):
    """Without Hydra's validation pass a point that does not compose still stops the multirun before
    anything is simulated, in one line, exit 2."""
    p = subprocess.run([sys.executable, "-m", "nbsim", "--multirun", "detector.fpixels=32",
                        "detector.spixels=32", bad, "store.root=bad"], cwd=tmp_path,
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith(msg), p.stderr
    assert _entries(tmp_path / "bad") == {}


def test_process_settings_openmp_policy_and_exit_now(monkeypatch):
    """pipeline.proc: the OpenMP wait policy defaults to PASSIVE and a user's value is kept; malloc's
    thresholds are raised on glibc unless the user set them; exit_now
    ends with the code given, stdout and log lines flushed, atexit handlers skipped."""
    from pipeline import proc
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    proc.quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    proc.quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    # glibc's thresholds: applied on Linux/glibc unless the user set MALLOC_MMAP_THRESHOLD_
    import platform
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert proc.reuse_freed_memory() is glibc
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert proc.reuse_freed_memory() is False
    code = ("import atexit, logging, sys; from pipeline.proc import exit_now; "
            "logging.basicConfig(stream=sys.stderr); atexit.register(print, 'atexit ran'); "
            "print('folder', end=''); logging.getLogger('t').warning('logged'); exit_now(3)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 3 and p.stdout == "folder" and "logged" in p.stderr, (p.stdout, p.stderr)


# ---------------------------------------------------------------------------------------------
# the benchmark's sweep cases
# ---------------------------------------------------------------------------------------------

def test_bench_sweep_grids_and_flags(capsys):
    from pipeline import bench, bench_sweep
    for kind in bench_sweep.GRIDS:
        full = sweep.expand(sweep.validate_config(bench_sweep.grid_config(kind, False)))
        quick = sweep.expand(sweep.validate_config(bench_sweep.grid_config(kind, True)))
        assert (len(full), len(quick)) == (64, 8)
        spec, _ = compose_spec(full[-1].overrides)
        assert spec.crystal.misset_deg == [10.0, 20.0, 30.0] and spec.detector.fpixels in (256, 512)
        assert len(bench_sweep.c_argvs(quick[:1])[0]) > 10
    for argv, msg in ((["--cases", "none"], "--cases none: needs --sweeps"),
                      (["--sweeps", "medium"], "--sweeps: expected comma-separated sweep cases"),
                      (["--sweeps", "light", "--sweep-cores", "0"], "--sweep-cores: must be >= 1")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, err


def _small_grid(tmp_path):
    cfg = sweep.validate_config({"store_root": "store", "base": ["detector.fpixels=20", "detector.spixels=20",
                                                                 "crystal=triclinic"],
                                 "grid": {"crystal.N": [2, 3], "detector.distance_mm": [80, 100]}})
    return sweep.expand(cfg, base_dir=tmp_path)


def test_batch_rebuilds_resolved_configs_without_composing(tmp_path, monkeypatch):
    """A manifest carries each point's resolved configuration: the batch job rebuilds the specs from
    it (no Hydra composition) and stores exactly what the overrides give, file for file."""
    pts = _small_grid(tmp_path)
    assert all(p.resolved is not None for p in pts)
    by_overrides = sweep.run_points([p.overrides for p in pts], tmp_path / "a", base_dir=tmp_path,
                                    hashes=[p.hash for p in pts], log=lambda s: None)
    calls = []
    monkeypatch.setattr(sweep.Composer, "resolve", lambda self, ovr: calls.append(ovr) or 1 / 0)
    by_resolved = sweep.run_points([p.overrides for p in pts], tmp_path / "b", base_dir=tmp_path,
                                   hashes=[p.hash for p in pts], resolved=[p.resolved for p in pts],
                                   log=lambda s: None)
    assert calls == []
    assert [r[0].name for r in by_resolved] == [r[0].name for r in by_overrides] == [p.hash for p in pts]
    for p in pts:
        for name in ("float.bin", "int.img", "config.yaml", "log.txt", "preview.png"):
            assert filecmp.cmp(tmp_path / "a" / p.hash / name, tmp_path / "b" / p.hash / name, shallow=False)


def test_resolved_config_that_no_longer_hashes_as_planned_is_composed_again(tmp_path, monkeypatch):
    pts = _small_grid(tmp_path)[:2]
    resolved = [dict(p.resolved) for p in pts]
    resolved[1] = {**resolved[1], "spec": {**resolved[1]["spec"],
                                           "detector": {**resolved[1]["spec"]["detector"], "distance_mm": 55.0}}}
    calls = []
    original = sweep.Composer.resolve
    monkeypatch.setattr(sweep.Composer, "resolve", lambda self, ovr: calls.append(ovr) or original(self, ovr))
    res = sweep.run_points([p.overrides for p in pts], tmp_path / "s", base_dir=tmp_path,
                           hashes=[p.hash for p in pts], resolved=resolved, log=lambda s: None)
    assert calls == [pts[1].overrides]                  # only the changed one composed
    assert [r[0].name for r in res] == [p.hash for p in pts]
    assert all(verify_entry(r[0], r[0].name)[0] is not None for r in res)


def test_a_failed_write_stops_the_batch_and_leaves_complete_entries(tmp_path, monkeypatch):
    """Points are written by a writer thread while the next renders: a write that fails is raised (as
    the store's one-line error naming store.root), the entries written before it are complete, none
    is half-built, and no later point is written."""
    import pipeline.store as store_mod
    from nbsim.spec import SpecError
    pts = _small_grid(tmp_path)
    original, writes = store_mod._compute, []

    def compute(final, *a, **k):
        writes.append(final.name)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        return original(final, *a, **k)
    monkeypatch.setattr(store_mod, "_compute", compute)
    with pytest.raises(SpecError, match="store.root: cannot write the result under .*No space left"):
        sweep.run_points([p.overrides for p in pts], tmp_path / "s", base_dir=tmp_path,
                         hashes=[p.hash for p in pts], log=lambda s: None)
    stored = _entries(tmp_path / "s")
    assert set(stored) == {pts[0].hash}
    assert verify_entry(stored[pts[0].hash], pts[0].hash)[0] is not None
    assert len(writes) == 2 and not [d for d in (tmp_path / "s").iterdir() if d.name.endswith(".tmp")]
