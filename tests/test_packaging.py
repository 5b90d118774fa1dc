"""Packaging: the wheel carries every package and the Hydra configs, and runs outside a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source_packages() -> set:
    """Dotted names of the folders of nbsim/, pipeline/ and hydra_plugins/ holding an __init__.py."""
    found = set()
    for top in ("nbsim", "pipeline", "hydra_plugins"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            if "__pycache__" not in rel.parts:
                found.add(".".join(rel.parts))
    return found


def test_pyproject_lists_every_package_and_ships_conf():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert listed - {"nbsim.conf"} == _source_packages()
    assert cfg["package-dir"]["nbsim.conf"] == "conf"
    assert (ROOT / "conf" / "config.yaml").is_file()


def _env_without_checkout() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return env


def test_wheel_runs_outside_checkout(tmp_path):
    """Build a wheel from a copy of the tree, install it (not editable) in a fresh venv that sees the
    system site (torch etc.), and run both entry points from a folder outside any checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("nbsim", "pipeline", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    whl = tmp_path / "whl"
    env = _env_without_checkout()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(whl), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, env=env, cwd=tmp_path)
    (wheel,) = whl.glob("nbsim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    conf_files = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert sorted(n[len("nbsim/conf/"):] for n in names if n.startswith("nbsim/conf/")) == conf_files

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import nbsim, pipeline.compose as c; "
                            "print(nbsim.__file__); print(c.CONF_DIR)"],
                           check=True, env=env, cwd=work, capture_output=True, text=True).stdout.split()
    site = venv / "lib"
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in where), where

    app = subprocess.run([str(py), "-m", "nbsim", f"store.root={tmp_path / 'out'}", "detector.fpixels=32",
                          "detector.spixels=32"], env=env, cwd=work, capture_output=True, text=True)
    assert app.returncode == 0, app.stderr
    folder = Path(app.stdout.strip().splitlines()[-1])
    assert (folder / "float.bin").stat().st_size == 32 * 32 * 4
    # the multirun's default launcher (hydra_plugins.nbsim_launcher) ships in the wheel
    mr = subprocess.run([str(py), "-m", "nbsim", "--multirun", f"store.root={tmp_path / 'out'}",
                         "detector.fpixels=32", "detector.spixels=32", "crystal.N=2,3"],
                        env=env, cwd=work, capture_output=True, text=True)
    assert mr.returncode == 0 and "nbsim_batch launcher" in mr.stderr, mr.stderr
    assert len(mr.stdout.split()) == 2

    fe = subprocess.run([str(py), "-m", "nbsim.nanobragg", "-default_F", "100", "-cell", "100", "100", "100",
                         "90", "90", "90", "-lambda", "1", "-N", "3", "-detpixels", "32", "-distance", "100",
                         "-floatfile", "fe.bin", "-nonoise", "-nopgm"],
                        env=env, cwd=work, capture_output=True, text=True)
    assert fe.returncode == 0, fe.stderr
    assert (work / "fe.bin").stat().st_size == 32 * 32 * 4


def test_multirun_outside_the_checkout(tmp_path):
    """The installed app (the README's editable install) from a folder that is not the checkout's
    root: the default in-process launcher (hydra_plugins.nbsim_launcher) is found, and each point's
    entry has the files store.formats asks for."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    probe = subprocess.run([sys.executable, "-c", "import nbsim"], cwd=tmp_path, env=env,
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("nbsim is not installed (only importable through PYTHONPATH)")
    r = subprocess.run([sys.executable, "-m", "nbsim", "--multirun", "crystal.N=3,4", "detector.fpixels=32",
                        "detector.spixels=32", "store.formats=[smv,cbf]", f"store.root={tmp_path / 'out'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    folders = r.stdout.split()
    assert len(folders) == 2
    for f in folders:
        entry = tmp_path / f if not os.path.isabs(f) else Path(f)
        assert (entry / "float.bin").is_file() and (entry / "image.cbf").is_file()
