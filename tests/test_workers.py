"""Sweep points shared among forked worker processes (pipeline.workers): the same entries, file for
file, as one process; every process really stores points; errors come back as one line."""
from __future__ import annotations

import filecmp
import os

import pytest

from pipeline import workers
from pipeline.compose import compose_spec
from pipeline.store import verify_entry
from nbsim.spec import DeviceSpec, SpecError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forking workers needs POSIX fork")


def _items(n):
    return [compose_spec(["detector.fpixels=24", "detector.spixels=20", "crystal=triclinic",
                          f"crystal.N={2 + i % 3}", f"detector.distance_mm={80 + 5 * i}"]) for i in range(n)]


def _pids_of_writes(monkeypatch, tmp_path):
    """Wrap the store's entry writer so that each write appends its process id to a file."""
    import pipeline.store as store_mod
    original, log = store_mod._compute, tmp_path / "pids.txt"

    def compute(final, *a, **k):
        import torch
        with open(log, "a") as f:
            f.write(f"{os.getpid()}:{torch.get_num_threads()}\n")
        return original(final, *a, **k)
    monkeypatch.setattr(store_mod, "_compute", compute)
    return lambda: [line.split(":")[0] for line in log.read_text().split()], \
        lambda: {int(line.split(":")[1]) for line in log.read_text().split()}


def test_two_processes_store_what_one_process_stores(tmp_path, monkeypatch):
    items = _items(5)
    one = workers.run_many_processes(items, 1, root=tmp_path / "one", base_dir=tmp_path, log=lambda s: None,
                                     thumb=200)
    pids, threads = _pids_of_writes(monkeypatch, tmp_path)
    two = workers.run_many_processes(items, 2, root=tmp_path / "two", base_dir=tmp_path, log=lambda s: None,
                                     thumb=200)
    assert len(set(pids())) == 2 and len(pids()) == 5          # both processes wrote points
    assert threads() == {1}                                    # one torch thread in each
    assert [r[0].name for r in two] == [r[0].name for r in one]
    assert all(not r[1] for r in two)
    for (f1, _, run1), (f2, _, run2) in zip(one, two):
        assert verify_entry(f2, f2.name)[0] is not None
        assert run2["hash"] == run1["hash"] and run2["stats"] == run1["stats"]
        for name in ("float.bin", "int.img", "config.yaml", "log.txt", "preview.png"):
            assert filecmp.cmp(f1 / name, f2 / name, shallow=False), name
    again = workers.run_many_processes(items, 2, root=tmp_path / "two", base_dir=tmp_path, log=lambda s: None)
    assert all(r[1] for r in again) and len(pids()) == 5         # a rerun stores nothing


def test_a_workers_configuration_error_is_raised_after_every_point(tmp_path, monkeypatch):
    """A point refused in a worker (here: its write) comes back as the same one-line SpecError, after
    the other points of every process are stored."""
    import pipeline.store as store_mod
    items = _items(4)
    original = store_mod._compute
    bad = {}

    def compute(final, *a, **k):
        if final.name == bad["hash"]:
            raise SpecError("image.int_scale", "the image overflows (test)")
        return original(final, *a, **k)
    from pipeline.hashing import config_hash
    bad["hash"] = config_hash(*items[1])                       # every 2nd point goes to the worker
    monkeypatch.setattr(store_mod, "_compute", compute)
    with pytest.raises(SpecError) as e:
        workers.run_many_processes(items, 2, root=tmp_path / "s", base_dir=tmp_path, log=lambda s: None)
    assert str(e.value) == "image.int_scale: the image overflows (test)" and e.value.key == "image.int_scale"
    stored = {d.name for d in (tmp_path / "s").iterdir() if (d / "run.json").is_file()}
    assert stored == {config_hash(*it) for i, it in enumerate(items) if i != 1}


def test_processes_setting():
    assert workers.resolve_processes("auto", 64, 2) == 2
    assert workers.resolve_processes(None, 7, 2) == 1              # fewer than 4 points a process
    assert workers.resolve_processes("auto", 64, 16) == 16
    assert workers.resolve_processes(3, 2, 1) == 3
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(SpecError, match="hydra.launcher.processes: must be a whole number"):
            workers.resolve_processes(bad, 10, 2)


def test_no_fork_for_gpu_points():
    spec, dev = _items(1)[0]
    assert workers.can_fork([(spec, dev)])
    assert not workers.can_fork([(spec, dev), (spec, DeviceSpec(device="cuda"))])


def test_a_bad_point_stops_the_run_before_anything_is_simulated(tmp_path, monkeypatch):
    """Every point is checked in the launching process before any worker starts: a point whose input
    file is missing is one line, and nothing is rendered or stored."""
    from nbsim.io.inputs import InputFileError
    items = _items(6)
    items[4] = compose_spec(["detector.fpixels=24", "detector.spixels=20", "crystal.hkl_file=missing.hkl"])
    import nbsim.batch
    rendered = []
    monkeypatch.setattr(nbsim.batch, "iter_many", lambda *a, **k: rendered.append(1) or iter(()))
    with pytest.raises((SpecError, InputFileError), match="missing.hkl"):
        workers.run_many_processes(items, 2, root=tmp_path / "s", base_dir=tmp_path, log=lambda s: None)
    assert rendered == [] and not (tmp_path / "s").exists()
