"""The store checks what it reuses: a truncated, zeroed, edited or missing file, or an unreadable or
edited run.json, is reported in one line and recomputed; it is never returned and never crashes a
later run (``pipeline.store.verify_entry``)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from nbsim.spec import CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec
from pipeline import store

DEV = DeviceSpec(dtype="float64", compile=False)


@pytest.fixture
def spec():
    return ExperimentSpec(detector=DetectorSpec(fpixels=16, spixels=16),
                          crystal=CrystalSpec(cell_A_deg=[100, 100, 100, 90, 90, 90], N=2, default_F=100))


def _edit_json(p, fn):
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))


def _flip_byte(p, at=100):
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


CORRUPTIONS = {
    "float_truncated": (lambda e: e.joinpath("float.bin").write_bytes(e.joinpath("float.bin").read_bytes()[:100]),
                        "float.bin has 100 bytes"),
    "float_zeroed": (lambda e: e.joinpath("float.bin").write_bytes(bytes(16 * 16 * 4)),
                     "float.bin does not match its checksum"),
    "float_one_byte": (lambda e: _flip_byte(e / "float.bin"), "float.bin does not match its checksum"),
    "float_missing": (lambda e: (e / "float.bin").unlink(), "float.bin is missing"),
    "float_is_dir": (lambda e: ((e / "float.bin").unlink(), (e / "float.bin").mkdir()), "float.bin is missing"),
    "int_truncated": (lambda e: e.joinpath("int.img").write_bytes(b"{"), "int.img has 1 bytes"),
    "int_edited": (lambda e: _flip_byte(e / "int.img", 600), "int.img does not match its checksum"),
    "preview_missing": (lambda e: (e / "preview.png").unlink(), "preview.png is missing"),
    "config_edited": (lambda e: e.joinpath("config.yaml").write_text("edited\n"), "config.yaml has 7 bytes"),
    "log_emptied": (lambda e: e.joinpath("log.txt").write_text(""), "log.txt has 0 bytes"),
    "run_json_truncated": (lambda e: e.joinpath("run.json").write_text(e.joinpath("run.json").read_text()[:50]),
                           "run.json is unreadable"),
    "run_json_empty": (lambda e: e.joinpath("run.json").write_text(""), "run.json is unreadable"),
    "run_json_binary": (lambda e: e.joinpath("run.json").write_bytes(b"\xff\xfe\x00garbage"), "run.json is unreadable"),
    "run_json_list": (lambda e: e.joinpath("run.json").write_text("[]"), "run.json is not a JSON object"),
    "run_json_stats_edited": (lambda e: _edit_json(e / "run.json", lambda d: d["stats"].update(max_I=1.0)),
                              "run.json was edited"),
    "run_json_hash_edited": (lambda e: _edit_json(e / "run.json", lambda d: d.update(hash="0" * 16)),
                             "run.json names hash"),
    "run_json_old_format": (lambda e: _edit_json(e / "run.json", lambda d: d.pop(store.CHECKSUM_KEY)),
                            "run.json has no checksums"),
    "manifest_entry_dropped": (lambda e: _edit_json(e / "run.json", lambda d: d[store.MANIFEST_KEY].pop("float.bin")),
                               "run.json was edited"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_damaged_entry_is_reported_and_recomputed(kind, tmp_path, spec):
    corrupt, reason = CORRUPTIONS[kind]
    logs = []
    folder, reused, run = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=logs.append)
    assert not reused
    good = (folder / "float.bin").read_bytes()
    assert store.verify_entry(folder, run["hash"])[0] is not None
    corrupt(folder)
    assert store.verify_entry(folder, run["hash"])[0] is None

    logs.clear()
    folder2, reused2, run2 = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path,
                                                log=logs.append)
    assert folder2 == folder and not reused2
    assert len(logs) == 1 and reason in logs[0] and logs[0].endswith("recomputing"), logs
    assert (folder / "float.bin").read_bytes() == good               # recomputed, the same image
    assert store.verify_entry(folder, run2["hash"])[0] is not None

    logs.clear()
    _, reused3, _ = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=logs.append)
    assert reused3 and logs[0].startswith("reusing stored result")


def test_entry_folder_replaced_by_a_file_is_recomputed(tmp_path, spec):
    folder, _, run = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    folder2, reused, _ = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    assert not reused and folder2.is_dir() and store.verify_entry(folder2, run["hash"])[0] is not None


def test_manifest_covers_every_file(tmp_path, spec):
    folder, _, run = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None,
                                        write_pgm=True)
    names = sorted(p.name for p in folder.iterdir() if p.name != "run.json")
    assert sorted(run[store.MANIFEST_KEY]) == names
    for n in names:
        rec = run[store.MANIFEST_KEY][n]
        assert rec["bytes"] == (folder / n).stat().st_size and len(rec["sha256"]) == 64


def test_app_recomputes_a_damaged_entry(tmp_path, monkeypatch, capsys):
    """Through the Hydra app: the damaged entry is named on one line and the run succeeds."""
    from pipeline import app
    monkeypatch.chdir(tmp_path)
    args = ["nbsim", "detector.fpixels=16", "detector.spixels=16", "crystal.N=2"]
    monkeypatch.setattr(sys, "argv", args)
    app.main()
    entry = next(p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith("."))
    (entry / "float.bin").write_bytes(b"\0" * 8)
    capsys.readouterr()
    app.main()
    cap = capsys.readouterr()
    assert f"stored result outputs/{entry.name}: float.bin has 8 bytes, run.json recorded 1024 bytes; recomputing" in cap.err
    assert cap.out == f"outputs/{entry.name}\n"
    assert (entry / "float.bin").stat().st_size == 1024


def _run_in_child(args):
    import time

    from nbsim import api
    root, base, n = args
    real = api.simulate
    arrived = Path(base) / "arrived"
    (arrived / str(os.getpid())).touch()

    def slow_simulate(*a, **k):              # the computation starts once every process has arrived
        deadline = time.time() + 120
        while len(os.listdir(arrived)) < n and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        return real(*a, **k)
    api.simulate = slow_simulate
    spec = ExperimentSpec(detector=DetectorSpec(fpixels=64, spixels=64),
                          crystal=CrystalSpec(cell_A_deg=[100, 100, 100, 90, 90, 90], N=3, default_F=100))
    logs = []
    folder, reused, run = store.run_or_reuse(spec, DEV, root=root, base_dir=base, log=logs.append)
    return str(folder), reused, logs


def test_concurrent_runs_compute_once(tmp_path):
    """Four processes ask for one configuration at once: one computes, the others wait and reuse its
    entry; nothing hidden (lock, temporary or old folders) is left in the store."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")            # fork after torch's thread pools ran can deadlock
    (tmp_path / "arrived").mkdir()
    with ctx.Pool(4) as pool:
        results = pool.map(_run_in_child, [(str(tmp_path / "out"), str(tmp_path), 4)] * 4, chunksize=1)
    folders = {f for f, _, _ in results}
    assert len(folders) == 1
    assert sorted(r for _, r, _ in results) == [False] + [True] * 3
    waited = [lg for _, r, lg in results if r and lg and lg[-1].endswith("computed meanwhile")]
    assert waited, [lg for _, _, lg in results]                        # they did run concurrently
    folder = Path(folders.pop())
    assert store.verify_entry(folder, folder.name)[0] is not None
    assert os.listdir(tmp_path / "out") == [folder.name]


def test_store_cli_list_verify_gc(tmp_path, spec, capsys):
    folder, _, _ = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    spec.crystal.N = 3
    other, _, _ = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    stale = tmp_path / "out" / ".abc.123.tmp"
    stale.mkdir()
    os.utime(stale, (0, 0))
    root = str(tmp_path / "out")
    assert store.main(["list", "--root", root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(" ok " in line for line in out)
    assert any("crystal.N=3" in line for line in out) and any("crystal.N=2" in line for line in out)
    (other / "float.bin").write_bytes(b"")
    assert store.main(["verify", "--root", root]) == 1
    out = capsys.readouterr().out
    assert f"{other.name}  DAMAGED: float.bin has 0 bytes" in out and f"{folder.name}  ok" in out
    assert store.main(["show", other.name[:6], "--root", root]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("state         DAMAGED: float.bin has 0 bytes") and "crystal.N=3" in out[2]
    assert any(line.startswith("file          float.bin") and line.endswith("0 bytes  CHANGED") for line in out)
    assert store.main(["show", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"entry         {folder}" and out[1] == "state         ok"
    assert any(line.startswith("stats         max_I=") for line in out)
    assert sum(line.startswith("file ") for line in out) == len(os.listdir(folder))
    assert store.main(["show", "zzzz", "--root", root]) == 2
    assert "no entry under" in capsys.readouterr().err
    assert store.main(["show", "--root", root]) == 2
    assert store.main(["gc", "--root", root]) == 0
    assert sorted(os.listdir(root)) == [folder.name]
    assert store.main(["verify", "--root", str(tmp_path / "nope")]) == 2


def test_unavailable_device_is_refused_even_when_stored(tmp_path, spec):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    from nbsim.spec import SpecError
    with pytest.raises(SpecError, match="^device.device: cuda requested but torch finds no CUDA device"):
        store.run_or_reuse(spec, DeviceSpec(device="cuda"), root=tmp_path / "out", base_dir=tmp_path,
                           log=lambda m: None)


def test_asking_for_more_products_adds_them_without_simulating(tmp_path, spec, monkeypatch):
    """write_pgm / write_noise / another preview mode on a stored entry add the files, bit-identical
    to a fresh run's, without simulating and without touching the files already there."""
    import nbsim.api
    from pipeline.preview import preview_png
    spec.image.noise_seed = 7
    quiet = dict(base_dir=tmp_path, log=lambda m: None)
    fresh, _, fresh_run = store.run_or_reuse(spec, DEV, root=tmp_path / "a", write_noise=True,
                                             write_pgm=True, **quiet)
    folder, reused, _ = store.run_or_reuse(spec, DEV, root=tmp_path / "b", **quiet)
    assert not reused and not (folder / "noise.img").exists() and not (folder / "image.pgm").exists()
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ("run.json", "log.txt")}
    calls = []
    real = nbsim.api.simulate
    monkeypatch.setattr(nbsim.api, "simulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    logs = []
    folder2, reused, run = store.run_or_reuse(spec, DEV, root=tmp_path / "b", write_noise=True,
                                              write_pgm=True, preview="percentile", base_dir=tmp_path,
                                              log=logs.append)
    assert folder2 == folder and reused and calls == []
    assert logs and logs[0].startswith("added noise.img, image.pgm, preview_percentile.png to stored result")
    for name, data in before.items():                                 # nothing dropped or changed
        assert (folder / name).read_bytes() == data, name
    for name in ("noise.img", "image.pgm"):
        assert (folder / name).read_bytes() == (fresh / name).read_bytes(), name
    assert run["photons"] == fresh_run["photons"] and run["overloads"] == fresh_run["overloads"]
    img = __import__("numpy").fromfile(folder / "float.bin", dtype="float32").reshape(16, 16)
    from pipeline.view import entry_title
    expect = preview_png(img, tmp_path / "p.png", "percentile", info=run["info"],
                         title=entry_title(folder.name, run["info"]))[0].read_bytes()
    assert (folder / "preview_percentile.png").read_bytes() == expect != before["preview.png"]
    assert "preview_percentile.thumb.png" in run[store.MANIFEST_KEY]          # its thumbnail, checked too
    assert run["previews"] == {"log": "preview.png", "percentile": "preview_percentile.png"}
    doc, why = store.verify_entry(folder, folder.name)
    assert doc == run and why == ""
    assert {"noise.img", "image.pgm", "preview_percentile.png"} <= set(doc[store.MANIFEST_KEY])
    assert "photons on noise image" in (folder / "log.txt").read_text()
    # asked again (or with fewer products): reused as it is
    logs.clear()
    for kw in (dict(write_noise=True, write_pgm=True, preview="percentile"), {}):
        assert store.run_or_reuse(spec, DEV, root=tmp_path / "b", base_dir=tmp_path, log=logs.append,
                                  **kw)[1]
    assert calls == [] and all(m.startswith("reusing stored result") for m in logs)
    # a later edit of an added file is caught like any other
    _flip_byte(folder / "noise.img", 600)
    assert "noise.img does not match its checksum" in store.verify_entry(folder, folder.name)[1]
