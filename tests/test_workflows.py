"""Snakemake sweeps (workflows/Snakefile) and their equivalence with `python -m nbsim --multirun`.

The Snakemake runs use a temporary working directory (``--directory``) and tiny 32x32 detectors so
the default suite stays fast; the shipped 4-point default sweep runs in a test marked slow.
"""
from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline import sweep
from pipeline.compose import compose_spec
from pipeline.hashing import config_hash

SNAKEFILE = ROOT / "workflows" / "Snakefile"
BIT_FILES = ("float.bin", "int.img", "preview.png", "config.yaml", "log.txt")
TINY = {"name": "tiny", "store_root": "store",
        "base": ["detector.fpixels=32", "detector.spixels=32"],
        "grid": {"crystal.N": [2, 3]}}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SLURM_CONF", None)
    return env


def snakemake(workdir: Path, config: Path, *extra, check=True, timeout=300):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(config), "--cores", "2", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def job_counts(text: str) -> dict:
    """Job stats table of a Snakemake (dry) run -> {rule: count}."""
    m = re.search(r"Job stats:\n(.*?)\n\n", text, re.S)
    out = {}
    for line in (m.group(1).splitlines() if m else []):
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def same_bits(a: Path, b: Path, names=BIT_FILES):
    return [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]


# ---------------------------------------------------------------------------------------------
# pure Python: config, points, hashes
# ---------------------------------------------------------------------------------------------

def test_format_value_is_hydra_syntax():
    f = sweep.format_value
    assert [f(80), f(80.5), f(True), f(None), f("xds"), f([1, 2.5, 3])] == \
        ["80", "80.5", "true", "null", "xds", "[1,2.5,3]"]
    assert f("a b") == "'a b'" and f("null") == "'null'"
    assert sweep.override("detector", "xds") == "detector=xds"


def test_default_sweep_has_four_small_points():
    cfg = sweep.load_config(ROOT / "workflows/config/sweep.yaml")
    pts = sweep.expand(cfg)
    assert len(pts) == 4 and len({p.hash for p in pts}) == 4
    for p in pts:
        spec, dev = compose_spec(p.overrides)
        assert (spec.detector.fpixels, spec.detector.spixels) == (128, 128)
        assert p.hash == config_hash(spec, dev, ".")
    assert [p.params for p in pts][:2] == [{"detector.distance_mm": 80, "crystal.N": 3},
                                           {"detector.distance_mm": 80, "crystal.N": 5}]
    mr = sweep.multirun_command(cfg)
    assert mr[:4] == ["python", "-m", "nbsim", "--multirun"]
    assert "detector.distance_mm=80,100" in mr and "crystal.N=3,5" in mr


def test_group_choices_in_the_grid_and_duplicates_merge():
    cfg = sweep.validate_config({"base": ["detector.fpixels=16", "detector.spixels=16"],
                                 "grid": {"detector": ["custom", "xds"], "pivot": ["beam", "sample"]}})
    pts = sweep.expand(cfg)
    assert len(pts) == 4
    spec, _ = compose_spec(pts[1].overrides)
    assert spec.detector.convention == "custom" and spec.detector.pivot == "sample"
    # two spellings of one experiment are one point (one job, one folder)
    dup = sweep.validate_config({"grid": {"detector.distance_mm": [100, 100.0]}})
    assert len(sweep.expand(dup)) == 1


def test_config_errors_name_the_key():
    with pytest.raises(sweep.SweepError, match=r"grid\.crystal\.N: 3 is not of type 'array'"):
        sweep.validate_config({"grid": {"crystal.N": 3}})
    with pytest.raises(sweep.SweepError, match=r"name: 'a b' does not match"):
        sweep.validate_config({"name": "a b", "grid": {"crystal.N": [3]}})
    with pytest.raises(sweep.SweepError, match="'grdi' was unexpected"):
        sweep.validate_config({"grdi": {"crystal.N": [3]}})
    with pytest.raises(sweep.SweepError, match=r"sweep point 1 \(N=-2\): crystal.N: must be an integer >= 1"):
        sweep.expand(sweep.validate_config({"grid": {"crystal.N": [3, -2]}}))
    with pytest.raises(sweep.SweepError, match="crystal.NN"):
        sweep.expand(sweep.validate_config({"grid": {"crystal.NN": [3]}}))


def test_snakefile_reports_bad_config_in_one_line(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"grid": {"crystal.N": 3}})
    p = snakemake(tmp_path, bad, "-n", check=False, timeout=120)
    assert p.returncode != 0
    assert "sweep config: grid.crystal.N: 3 is not of type 'array'" in p.stdout + p.stderr


def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        j = compose("config", overrides=["hydra/launcher=nbsim_joblib"], return_hydra_config=True)
        s = compose("config", overrides=["hydra/launcher=nbsim_slurm"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert j.hydra.launcher._target_.endswith("JoblibLauncher") and j.hydra.launcher.n_jobs == -1
    assert s.hydra.launcher._target_.endswith("SlurmLauncher") and s.hydra.launcher.cpus_per_task == 1
    assert s.hydra.launcher.account is None


def test_slurm_profile_has_the_local_cluster_settings():
    prof = yaml.safe_load((ROOT / "workflows/profiles/slurm/config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["slurm-no-account"] is True
    assert prof["slurm-status-command"] == "squeue" and prof["slurm-logdir"]


# ---------------------------------------------------------------------------------------------
# Snakemake end to end (tiny sweep)
# ---------------------------------------------------------------------------------------------

def test_sweep_runs_reruns_nothing_and_adds_one_job(tmp_path):
    cfg = _write(tmp_path / "tiny.yaml", TINY)
    p = snakemake(tmp_path, cfg)
    pts = sweep.expand(sweep.validate_config(TINY), base_dir=tmp_path)
    store = tmp_path / "store"
    for pt in pts:
        run = json.loads((store / pt.hash / "run.json").read_text())
        assert run["hash"] == pt.hash
    logs = list((store / "logs" / "sweep_batch").glob("*.log"))
    assert len(logs) == 2, logs            # 2 points, --cores 2, threads 1: one batch per job slot
    rows = list(csv.DictReader(open(store / "sweeps/tiny/summary.csv")))
    assert [r["hash"] for r in rows] == [pt.hash for pt in pts]
    assert [r["crystal.N"] for r in rows] == ["2", "3"]
    for r in rows:
        assert float(r["wall_time_s"]) > 0 and float(r["max_I"]) > 0 and r["overrides"].startswith("detector.fpixels=32")
    from PIL import Image
    with Image.open(store / "sweeps/tiny/contact_sheet.png") as im:
        assert im.size[0] >= 2 * 200

    again = snakemake(tmp_path, cfg)
    assert "Nothing to be done" in again.stdout + again.stderr

    more = _write(tmp_path / "more.yaml", {**TINY, "grid": {"crystal.N": [2, 3, 4]}})
    dry = snakemake(tmp_path, more, "-n")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts.get("sweep_batch") == 1 and counts.get("sweep_summary") == 1, dry.stdout


def test_multirun_and_snakemake_share_hash_folders(tmp_path):
    """`python -m nbsim --multirun` stores the same folders, bit for bit, and Snakemake then has
    nothing left to do."""
    mr_dir, sm_dir = tmp_path / "mr", tmp_path / "sm"
    mr_dir.mkdir(), sm_dir.mkdir()
    cfg = sweep.validate_config(TINY)
    cmd = sweep.multirun_command(cfg)
    assert cmd[:3] == ["python", "-m", "nbsim"]
    p = subprocess.run([sys.executable] + cmd[1:], cwd=mr_dir, capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    pts = sweep.expand(cfg, base_dir=mr_dir)
    got = sorted(d.name for d in (mr_dir / "store").iterdir() if re.fullmatch(r"[0-9a-f]{16}", d.name))
    assert got == sorted(pt.hash for pt in pts)

    # Snakemake in a workdir whose store already holds the multirun results: only the summary runs
    (sm_dir / "store").symlink_to(mr_dir / "store")
    dry = snakemake(sm_dir, _write(tmp_path / "tiny.yaml", TINY), "-n")
    counts = job_counts(dry.stdout + dry.stderr)
    assert "sweep_batch" not in counts and counts.get("sweep_summary") == 1

    # and a Snakemake run of its own gives the same bytes
    own = tmp_path / "own"
    own.mkdir()
    snakemake(own, _write(tmp_path / "tiny2.yaml", TINY))
    for pt in pts:
        assert same_bits(own / "store" / pt.hash, mr_dir / "store" / pt.hash) == []


@pytest.mark.slow
def test_default_sweep_under_a_minute(tmp_path):
    """The shipped default sweep (4 points, 128x128) from scratch, and the Hydra multirun equivalent."""
    import time
    cfg = yaml.safe_load((ROOT / "workflows/config/sweep.yaml").read_text())
    cfgp = _write(tmp_path / "sweep.yaml", cfg)
    t0 = time.perf_counter()
    snakemake(tmp_path, cfgp)
    assert time.perf_counter() - t0 < 60
    pts = sweep.expand(sweep.validate_config(cfg), base_dir=tmp_path)
    mr = tmp_path / "mr"
    mr.mkdir()
    p = subprocess.run([sys.executable, "-m", "nbsim", "--multirun", "crystal.N=3,5", "detector.distance_mm=80,100",
                        "detector.fpixels=128", "detector.spixels=128"], cwd=mr, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for pt in pts:
        assert same_bits(tmp_path / "outputs" / pt.hash, mr / "outputs" / pt.hash) == []


@pytest.mark.slow
def test_parity_rules_with_golden_data(tmp_path):
    """The Snakemake parity rules: one job per case, report.md, and the PASSED check."""
    from conftest import golden_dir
    cases = tmp_path / "cases.yaml"
    full = yaml.safe_load((ROOT / "workflows/config/parity_cases.yaml").read_text())
    keep = [c for c in full["cases"] if c["id"] in ("G16_thick_abs_os3", "G25_hkl_interp_inrange")]
    cases.write_text(yaml.safe_dump({"inputs": str(golden_dir() / "inputs"), "cases": keep}))
    cfg = _write(tmp_path / "parity.yaml", {"parity": {"cases": str(cases), "golden": str(golden_dir()),
                                                       "out": "par"}})
    p = snakemake(tmp_path, cfg)
    assert (tmp_path / "par" / "PASSED").is_file()
    md = (tmp_path / "par" / "report.md").read_text()
    assert "**2/2 cases pass**" in md
    again = snakemake(tmp_path, cfg)
    assert "Nothing to be done" in again.stdout + again.stderr
