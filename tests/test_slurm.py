"""The sweep on a real SLURM cluster: Snakemake's SLURM executor and Hydra's submitit launcher.

Needs a cluster that answers ``sinfo`` (skipped otherwise). On one machine:

    scripts/slurm_local.sh start
    pytest -m slurm tests/test_slurm.py        # about a minute
    scripts/slurm_local.sh stop

Both paths must produce the same hash folders as a local run, bit for bit.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SNAKEFILE = ROOT / "workflows" / "Snakefile"
PROFILE = ROOT / "workflows" / "profiles" / "slurm"
BIT_FILES = ("float.bin", "int.img", "preview.png", "config.yaml", "log.txt")
BASE = ["detector.fpixels=64", "detector.spixels=64"]
GRID = {"detector.distance_mm": [80, 100], "crystal.N": [3, 5]}


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _cluster_answers():
    pytest.skip("no SLURM cluster answers `sinfo` (start one with scripts/slurm_local.sh start)",
                allow_module_level=True)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _hash_dirs(store: Path) -> dict:
    return {d.name: d for d in store.iterdir() if re.fullmatch(r"[0-9a-f]{16}", d.name)}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same 4 points run locally (Hydra's basic launcher)."""
    wd = tmp_path_factory.mktemp("local")
    p = subprocess.run([sys.executable, "-m", "nbsim", "--multirun", "hydra/launcher=basic", *BASE,
                        "detector.distance_mm=80,100", "crystal.N=3,5", "store.root=store"],
                       cwd=wd, capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    dirs = _hash_dirs(wd / "store")
    assert len(dirs) == 4
    return dirs


def _assert_same(store: Path, local: dict):
    got = _hash_dirs(store)
    assert sorted(got) == sorted(local)
    for h, d in got.items():
        diff = [n for n in BIT_FILES if not filecmp.cmp(d / n, local[h] / n, shallow=False)]
        assert diff == [], f"{h}: {diff} differ from the local run"


def test_snakemake_slurm_executor(tmp_path, local_run):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"name": "slurm4", "store_root": "store", "base": BASE, "grid": GRID}))
    (tmp_path / "outputs" / "logs" / "slurm").mkdir(parents=True)       # the profile's slurm-logdir
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
           "--configfile", str(cfg), "--workflow-profile", str(PROFILE)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    # batch_size auto on a cluster: ~10 s of estimated work per job, so the 4 small points are one
    # batch, one SLURM job
    assert len(re.findall(r"Job \d+ has been submitted with SLURM jobid \d+", log)) == 1, log[-3000:]
    (blog,) = (tmp_path / "store" / "logs" / "sweep_batch").glob("*.log")
    assert "4 points, 4 computed, 0 stored already" in blog.read_text()
    _assert_same(tmp_path / "store", local_run)
    assert (tmp_path / "store" / "sweeps" / "slurm4" / "summary.csv").is_file()
    # a rerun submits nothing
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_snakemake_slurm_batches_of_two(tmp_path, local_run):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"name": "slurm2", "store_root": "store", "base": BASE, "grid": GRID,
                                   "batch_size": 2}))
    (tmp_path / "outputs" / "logs" / "slurm").mkdir(parents=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
           "--configfile", str(cfg), "--workflow-profile", str(PROFILE)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert len(re.findall(r"Job \d+ has been submitted with SLURM jobid \d+", log)) == 2, log[-3000:]
    _assert_same(tmp_path / "store", local_run)


def test_hydra_submitit_launcher(tmp_path, local_run):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    p = subprocess.run([sys.executable, "-m", "nbsim", "--multirun", "hydra/launcher=nbsim_slurm", *BASE,
                        "detector.distance_mm=80,100", "crystal.N=3,5", "store.root=store"],
                       cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "Submitit 'slurm' sweep output dir" in p.stdout + p.stderr
    _assert_same(tmp_path / "store", local_run)
    # the jobs really ran under SLURM: submitit wrote their logs with SLURM job ids
    logs = list((tmp_path / "store" / ".hydra").rglob(".submitit/*/*_log.out"))
    assert logs, "no submitit job logs"
