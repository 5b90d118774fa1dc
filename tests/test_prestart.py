"""The multirun's render process forked as ``python -m nbsim --multirun`` starts (``pipeline.prestart``):
the same entries as without it, errors as one line, nothing left running after the command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import prestart

REPO = Path(__file__).resolve().parents[1]
SMALL = ["detector.fpixels=32", "detector.spixels=32", "crystal.N=3,4", "detector.distance_mm=80,100"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", prestart.ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NBSIM_KERNEL_CACHE"] = "off"
    env.update(extra)
    return env


def _nbsim(args, cwd, **extra):
    return subprocess.run([sys.executable, "-m", "nbsim", *args], cwd=cwd, env=_env(**extra), text=True,
                          capture_output=True, timeout=300)


def _session_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """True once no process of the session (process group) ``pgid`` is left."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("argv,want", [
    (["-m", "crystal.N=3,4"], True),
    (["--multirun", "crystal.N=3,4"], True),
    (["crystal.N=3"], False),                                        # one run: nothing to overlap
    (["-m", "hydra/launcher=nbsim_slurm", "crystal.N=3,4"], False),  # another launcher renders
    (["-m", "--help"], False),
    (["-m", "--cfg", "job"], False),
    (["-m", "--cfg=job"], False),
    (["-m", "--hel"], False),                                        # argparse takes abbreviations
    (["-m", "-c", "hydra"], False),
    (["-m", "--config-dir", "d", "--config-name", "mine"], True),
])
def test_wanted(monkeypatch, argv, want):
    monkeypatch.delenv(prestart.ENV, raising=False)
    assert prestart.wanted(argv) is want
    monkeypatch.setenv(prestart.ENV, "0")
    assert prestart.wanted(argv) is False


def test_multirun_stores_what_it_stores_without_the_render_process(tmp_path):
    on = _nbsim(["-m", *SMALL, "store.root=on"], tmp_path)
    off = _nbsim(["-m", *SMALL, "store.root=off"], tmp_path, **{prestart.ENV: "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "4 points in the render process" in on.stderr, on.stderr          # both ways really ran
    assert "4 points in this process" in off.stderr, off.stderr
    folders = on.stdout.split()
    assert [Path(f).name for f in folders] == [Path(f).name for f in off.stdout.split()]
    assert len(set(folders)) == 4
    for f in folders:
        h = Path(f).name
        a, b = tmp_path / "on" / h, tmp_path / "off" / h
        assert (a / "float.bin").read_bytes() == (b / "float.bin").read_bytes()
        assert (a / "int.img").read_bytes() == (b / "int.img").read_bytes()
        assert json.loads((a / "run.json").read_text())["hash"] == h
    again = _nbsim(["-m", *SMALL, "store.root=on"], tmp_path)                 # a rerun reuses all
    assert again.returncode == 0 and again.stdout == on.stdout
    assert again.stderr.count("reusing stored result") == 4, again.stderr


@pytest.mark.parametrize("bad,key,in_child", [
    ("crystal.N=3,-1", "crystal.N", False),                        # refused while composing (here)
    ("crystal.hkl_file=nope.hkl,nope2.hkl", "crystal.hkl_file", True),   # while planning (there)
])
def test_a_bad_point_is_one_line_and_nothing_is_stored(tmp_path, bad, key, in_child):
    r = _nbsim(["-m", "detector.fpixels=32", "detector.spixels=32", bad, "store.root=s"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"nbsim: error: {key}:"), r.stderr
    assert ("points in the render process" in r.stderr) is in_child, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "s").exists() or not [p for p in (tmp_path / "s").iterdir()
                                                 if not p.name.startswith(".")]


def test_an_unused_render_process_ends_with_the_command(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "nbsim", "-m", "detector.fpixelz=32", "crystal.N=3,4"],
                         cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.startswith("nbsim: error: detector.fpixelz"), err
    assert _session_gone(p.pid, timeout_s=0.3), "a process of the command outlived it"  # ended and reaped


def _children(pid: int) -> list:
    return subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                          text=True).stdout.split()


def _start_long_multirun(tmp_path):
    """A 16-point multirun, returned once its render process stored a first entry."""
    args = ["-m", "detector.fpixels=768", "detector.spixels=768", "detector.oversample=3",
            "crystal.N=3,4,5,6", "detector.distance_mm=80,100,120,140", "store.root=s", "quiet=true"]
    p = subprocess.Popen([sys.executable, "-m", "nbsim", *args], cwd=tmp_path, env=_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    store = tmp_path / "s"
    deadline = time.time() + 120
    while time.time() < deadline and not any(store.glob("*/run.json")):
        time.sleep(0.05)
    if p.poll() is not None:
        pytest.skip("the multirun finished before it could be interrupted")
    return p, store


def _only_complete_entries(store: Path, killed_writer: bool = False) -> None:
    """Every entry complete, and no temp folder or entry lock left. ``killed_writer``: a process of the
    run was killed with SIGKILL, which nothing can catch; the one entry it was writing itself may keep
    its hidden temp folder and lock, or only the lock once published (``pipeline.store``: a temp
    folder is never read; the next run takes the lock over)."""
    entries = [e for e in store.iterdir() if not e.name.startswith(".")]
    assert 1 <= len(entries) < 16
    for e in entries:
        assert (e / "run.json").is_file() and (e / "float.bin").is_file(), e
    left = [e.name for e in store.iterdir() if e.name.startswith(".") and e.name != ".hydra"]
    if killed_writer:
        hashes = {name.split(".")[1] for name in left}     # killed before or after publishing it
        assert len(hashes) <= 1, left
        return
    assert not left, f"temp folders or entry locks left: {left}"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGTERM to the group", "SIGINT to the group"])
def test_stopped_mid_run_leaves_complete_entries_and_no_process(tmp_path, sig):
    """SIGTERM to the command (kill), to its whole process group (a scheduler, ``timeout``), or Ctrl-C
    (SIGINT to the group, as a terminal sends it), while the render process and its workers store
    entries."""
    p, store = _start_long_multirun(tmp_path)
    render = _children(p.pid)
    assert len(render) == 1 and _children(int(render[0])), "no render process with its worker"
    if sig == "SIGTERM":
        p.send_signal(signal.SIGTERM)
    else:
        os.killpg(p.pid, signal.SIGTERM if "TERM" in sig else signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == (130 if "INT" in sig else 143), err
    assert "Traceback" not in err, err
    assert _session_gone(p.pid), "a process of the command is still running"
    _only_complete_entries(store)


def test_a_killed_render_process_is_reported_and_its_workers_stop(tmp_path):
    """The render process killed (the kernel's out-of-memory killer): the command says so, exits
    with 1 (a failure of the run, not of its input) without waiting for the workers' shares, and
    leaves complete entries only."""
    p, store = _start_long_multirun(tmp_path)
    render = _children(p.pid)
    assert len(render) == 1
    t0 = time.time()
    os.kill(int(render[0]), signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    assert "was killed by SIGKILL (out of memory?)" in err, err
    assert time.time() - t0 < 30
    assert _session_gone(p.pid), "a worker outlived the command"
    _only_complete_entries(store, killed_writer=True)   # the render process renders a share itself


def test_another_launcher_ends_the_render_process_at_once(tmp_path):
    """A configuration that picks Hydra's basic launcher (not on the command line, so the render
    process is started): the ``nbsim`` sweeper ends it before the points run elsewhere."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mine.yaml").write_text(
        "defaults:\n  - config\n  - override hydra/launcher: basic\n  - _self_\n")
    p = subprocess.Popen([sys.executable, "-m", "nbsim", "-m", "--config-dir", str(tmp_path / "cfg"),
                          "--config-name", "mine", *SMALL, "store.root=s"], cwd=tmp_path, env=_env(),
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    children = None
    for line in p.stderr:                                  # Hydra's basic launcher announces its jobs
        if "Launching 4 jobs locally" in line:
            children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True,
                                      text=True).stdout.split()
            break
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and len(out.split()) == 4
    assert children == [], f"processes of the command while the basic launcher runs: {children}"
    assert _session_gone(p.pid)


@pytest.mark.parametrize("prestarted", ["1", "0"])
def test_a_bug_while_rendering_is_a_traceback_and_exit_1(tmp_path, prestarted):
    """A failure that is not a configuration error (here a ZeroDivisionError injected into the store's
    writer) keeps its traceback and exits 1, with or without the render process: it is not reported
    as bad input."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import pipeline.store as s\n"
        "def _boom(*a, **k):\n"
        "    raise ZeroDivisionError('injected')\n"
        "s._compute = _boom\n")
    env = _env(**{prestart.ENV: prestarted})
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env["PYTHONPATH"]])
    r = subprocess.run([sys.executable, "-m", "nbsim", "-m", *SMALL, "store.root=s"], cwd=tmp_path,
                       env=env, text=True, capture_output=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr and "injected" in r.stderr
    assert "nbsim: error:" not in r.stderr, r.stderr
    assert ("points in the render process" in r.stderr) is (prestarted == "1")


@pytest.mark.slow
def test_a_joblib_multirun_ends_with_its_worker_processes(tmp_path):
    """``hydra/launcher=nbsim_joblib``: the command ends as a normal exit does, its thread-exit hooks and
    exit handlers run (joblib stops its worker processes there), so nothing keeps its stdout open
    (``dir=$(...)`` waited for the workers' 300 s idle timeout when the command skipped them)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "nbsim", "-m", "hydra/launcher=nbsim_joblib", *SMALL[:3],
                          "store.root=s"], cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=120)              # returns once every holder closed the pipes
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, err
    assert len(out.split()) == 2 and time.time() - t0 < 120
    assert _session_gone(p.pid, timeout_s=5.0), "a joblib worker outlived the command"


def test_sigterm_landing_in_a_weakref_callback_still_unwinds(tmp_path):
    """SIGTERM whose ``SystemExit`` is raised inside a weakref callback (where Python prints
    "Exception ignored in ..." with a traceback and runs on; seen in CI when the process group got
    Ctrl-C) is delivered again where it can unwind: exit 143, ``finally`` blocks run, no traceback."""
    code = (
        "import os, signal, sys, weakref\n"
        "from pipeline import proc\n"
        "proc.exit_on_sigterm()\n"
        "class A: pass\n"
        "def cb(ref):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "a = A(); r = weakref.ref(a, cb)\n"
        "try:\n"
        "    del a\n"
        "    for _ in range(10**8): pass\n"
        "    print('ran on', flush=True)\n"
        "finally:\n"
        "    print('unwound', flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 143, p.stderr
    assert p.stdout == "unwound\n" and "Traceback" not in p.stderr, (p.stdout, p.stderr)
