"""Config hash, atomic result store, reuse / force, preview PNG (fake engine: no simulation)."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import nbsim.api
import nbsim.io
from nbsim.spec import DeviceSpec, SpecError, spec_from_dict
from pipeline import app, store
from pipeline.compose import compose_spec
from pipeline.hashing import config_hash, hash_payload
from pipeline.preview import preview_png, to_uint8


# ---------------------------------------------------------------------------------------------
# a fake engine and writer, injected where pipeline.store looks them up
# ---------------------------------------------------------------------------------------------

class FakeResult:
    def __init__(self, spec):
        s, f = spec.detector.spixels or 16, spec.detector.fpixels or 16
        yy, xx = np.mgrid[0:s, 0:f]
        img = 100 * np.exp(-((xx - f / 2) ** 2 + (yy - s / 2) ** 2) / 20)
        img += spec.detector.distance_mm * 1e-3
        self._img = img.astype(np.float32)
        self.mask = np.ones((s, f), dtype=bool)
        a = self._img.astype(np.float64)
        self.info = {"fpixels": f, "spixels": s, "max_I": float(a.max()), "mean": float(a.mean()),
                     "rms": float(np.sqrt((a ** 2).mean())), "rmsd": float(a.std()),
                     "sum": float(a.sum())}
        self.warnings = ["fake warning"]
        self.log = ["fake engine"]

    def float32(self):
        return self._img


def fake_write_products(img_f32, mask, info, image_spec, *, float_path=None, int_path=None,
                        noise_path=None, pgm_path=None, active=None):
    for path, data in ((float_path, img_f32.tobytes()), (int_path, b"SMV"), (noise_path, b"SMV"),
                       (pgm_path, b"P5")):
        if path is not None:
            Path(path).write_bytes(data)
    return {"intfile_scale": 55000.0 / info["max_I"], "pgm_scale": 1.0,
            "photons": 123 if noise_path else None, "overloads": 0 if noise_path else None}


@pytest.fixture
def engine(monkeypatch):
    """Counts calls of the fake ``nbsim.api.simulate``; ``engine.fail`` makes the next step raise."""
    state = types.SimpleNamespace(calls=0, fail=None)

    def simulate(spec, device=None, *, base_dir=".", progress=None, inputs=None, solid_angle=False):
        state.calls += 1
        if state.fail == "simulate":
            raise RuntimeError("simulated crash in the engine")
        return FakeResult(spec)

    def write_products(*a, **kw):
        out = fake_write_products(*a, **kw)
        if state.fail == "write":
            raise KeyboardInterrupt            # interrupted after float.bin / int.img were written
        return out

    products = types.ModuleType("nbsim.io.products")
    products.write_products = write_products
    products.write_result = lambda result, image_spec, **paths: write_products(
        result.float32(), getattr(result, "roi_mask", None), result.info, image_spec,
        active=getattr(result, "mask", None), **paths)
    products.write_stored = lambda img, roi_mask, info, image_spec, **paths: write_products(
        img, roi_mask, info, image_spec, active=roi_mask, **paths)
    monkeypatch.setattr(nbsim.api, "simulate", simulate, raising=False)
    monkeypatch.setitem(sys.modules, "nbsim.io.products", products)
    monkeypatch.setattr(nbsim.io, "products", products, raising=False)
    return state


@pytest.fixture
def spec():
    s, _ = compose_spec(["detector.fpixels=24", "detector.spixels=20"])
    return s


DEV = DeviceSpec()


# ---------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------

def test_hash_is_16_hex_and_stable(spec):
    h = config_hash(spec, DEV)
    assert len(h) == 16 and int(h, 16) >= 0
    assert config_hash(spec, DeviceSpec()) == h
    again, _ = compose_spec(["detector.fpixels=24", "detector.spixels=20"])
    assert config_hash(again, DEV) == h


def test_hash_changes_with_what_changes_pixels(spec):
    h = config_hash(spec, DEV)
    assert config_hash(replace(spec, detector=replace(spec.detector, distance_mm=101.0)), DEV) != h
    assert config_hash(replace(spec, beam=replace(spec.beam, wavelength_A=1.1)), DEV) != h
    assert config_hash(replace(spec, crystal=replace(spec.crystal, N=6)), DEV) != h
    assert config_hash(replace(spec, image=replace(spec.image, noise_seed=2)), DEV) != h
    assert config_hash(replace(spec, quirks="physical"), DEV) != h
    assert config_hash(spec, DeviceSpec(dtype="float32")) != h


def test_hash_ignores_where_and_how_it_runs(spec):
    h = config_hash(spec, DEV)
    assert config_hash(spec, DeviceSpec(device="cuda", memory_budget_mb=100.0, compile=True)) == h
    base = compose_spec([])
    assert config_hash(*compose_spec(["store.root=/somewhere/else", "store.force=true",
                                      "store.write_noise=true", "device=cuda"])) == config_hash(*base)


def test_hash_int_equals_float(spec):
    a = replace(spec, detector=replace(spec.detector, distance_mm=100))
    b = replace(spec, detector=replace(spec.detector, distance_mm=100.0))
    assert config_hash(a, DEV) == config_hash(b, DEV)


def test_hash_uses_input_file_contents_not_paths(tmp_path, spec):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    d1.mkdir(), d2.mkdir()
    (d1 / "x.hkl").write_text("0 0 1 10.0\n")
    (d2 / "y.hkl").write_text("0 0 1 10.0\n")
    s1 = replace(spec, crystal=replace(spec.crystal, hkl_file=str(d1 / "x.hkl")))
    s2 = replace(spec, crystal=replace(spec.crystal, hkl_file="two/y.hkl"))      # relative to base_dir
    h1 = config_hash(s1, DEV, base_dir=tmp_path)
    assert config_hash(s2, DEV, base_dir=tmp_path) == h1
    assert "x.hkl" not in json.dumps(hash_payload(s1, DEV, tmp_path))
    (d1 / "x.hkl").write_text("0 0 1 11.0\n")
    assert config_hash(s1, DEV, base_dir=tmp_path) != h1


def test_hash_missing_input_file_names_the_key(tmp_path, spec):
    s = replace(spec, beam=replace(spec.beam, source_file="nope.txt"))
    with pytest.raises(SpecError, match=r"^beam.source_file: file not found"):
        config_hash(s, DEV, base_dir=tmp_path)


def test_hash_fdump_is_output_when_hkl_given(tmp_path, spec):
    (tmp_path / "P1.hkl").write_text("0 0 1 10.0\n")
    s = replace(spec, crystal=replace(spec.crystal, hkl_file="P1.hkl", fdump_file="dump.bin"))
    h = config_hash(s, DEV, base_dir=tmp_path)                # dump.bin does not exist yet: fine
    (tmp_path / "dump.bin").write_bytes(b"written by the engine")
    assert config_hash(s, DEV, base_dir=tmp_path) == h


def test_hash_counts_stale_fdump_in_base_dir(tmp_path, spec):
    """nanoBragg silently reads ./Fdump.bin when no HKL table is given (quirk 12)."""
    h = config_hash(spec, DEV, base_dir=tmp_path)
    (tmp_path / "Fdump.bin").write_bytes(b"stale")
    assert config_hash(spec, DEV, base_dir=tmp_path) != h


def test_matrix_example_inputs_are_hashed_by_content(tmp_path, monkeypatch):
    s, d = compose_spec(["crystal=matrix"])
    monkeypatch.chdir(tmp_path)                               # any cwd: the paths are absolute
    doc = hash_payload(s, d, tmp_path)
    assert set(doc["spec"]["crystal"]["matrix_file"]) == {"sha256"}
    assert set(doc["spec"]["crystal"]["hkl_file"]) == {"sha256"}


# ---------------------------------------------------------------------------------------------
# store: complete entry, atomicity, reuse, force
# ---------------------------------------------------------------------------------------------

def test_complete_entry(tmp_path, engine, spec):
    folder, reused, run = store.run_or_reuse(spec, DEV, root=tmp_path / "out", write_noise=True,
                                             write_pgm=True, base_dir=tmp_path, log=lambda m: None)
    assert not reused and engine.calls == 1
    assert folder == tmp_path / "out" / config_hash(spec, DEV, tmp_path)
    names = {p.name for p in folder.iterdir()}
    assert names == {"float.bin", "int.img", "noise.img", "image.pgm", "preview.png", "config.yaml",
                     "log.txt", "run.json"}
    assert (folder / "float.bin").stat().st_size == 24 * 20 * 4
    stored = json.loads((folder / "run.json").read_text())
    assert stored == json.loads(json.dumps(run))
    for key in ("hash", "nbsim_version", "torch_version", "device", "dtype", "wall_time_s", "stats",
                "intfile_scale", "photons", "overloads", "warnings"):
        assert key in stored, key
    assert set(stored["stats"]) == {"max_I", "mean", "rms", "rmsd", "sum"}
    assert stored["photons"] == 123
    cfg = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    dev = cfg.pop("device")
    assert spec_from_dict(cfg) == spec and dev["dtype"] == "float64"
    with Image.open(folder / "preview.png") as im:
        assert im.mode == "L" and im.size == (24, 20)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [folder.name]   # no temp leftovers


@pytest.mark.parametrize("where", ["simulate", "write"])
def test_crash_leaves_no_complete_entry(tmp_path, engine, spec, where):
    engine.fail = where
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    # neither a final nor a temp folder, and the store root this run created is removed again
    assert not (tmp_path / "out").exists()


def test_reuse_then_force(tmp_path, engine, spec, capsys):
    kw = dict(root=tmp_path / "out", base_dir=tmp_path)
    folder, reused, run1 = store.run_or_reuse(spec, DEV, **kw)
    folder2, reused2, run2 = store.run_or_reuse(spec, DEV, **kw)
    assert (folder2, reused2, engine.calls) == (folder, True, 1)
    assert run2 == json.loads(json.dumps(run1))
    h = folder.name
    assert f"reusing stored result {tmp_path / 'out' / h} (config hash {h})" in capsys.readouterr().out
    (folder / "marker").write_text("old entry")
    folder3, reused3, _ = store.run_or_reuse(spec, DEV, force=True, **kw)
    assert (folder3, reused3, engine.calls) == (folder, False, 2)
    assert not (folder / "marker").exists()                   # replaced as a whole
    assert [p.name for p in (tmp_path / "out").iterdir()] == [h]


def test_failed_force_keeps_old_entry(tmp_path, engine, spec):
    folder, _, _ = store.run_or_reuse(spec, DEV, root=tmp_path, base_dir=tmp_path, log=lambda m: None)
    before = (folder / "run.json").read_text()
    engine.fail = "write"
    with pytest.raises(KeyboardInterrupt):
        store.run_or_reuse(spec, DEV, root=tmp_path, base_dir=tmp_path, force=True, log=lambda m: None)
    assert (folder / "run.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_missing_requested_product_is_added(tmp_path, engine, spec):
    kw = dict(root=tmp_path, base_dir=tmp_path, log=lambda m: None)
    folder, _, _ = store.run_or_reuse(spec, DEV, **kw)
    assert not (folder / "noise.img").exists()
    _, reused, _ = store.run_or_reuse(spec, DEV, write_noise=True, **kw)
    assert reused and (folder / "noise.img").exists() and engine.calls == 1
    _, reused, _ = store.run_or_reuse(spec, DEV, **kw)          # a superset is fine
    assert reused and engine.calls == 1


def test_unavailable_device_is_a_spec_error(tmp_path, engine, spec, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match=r"^device.device: "):
        store.run_or_reuse(spec, DeviceSpec(device="cuda"), root=tmp_path, base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [] and engine.calls == 0


# ---------------------------------------------------------------------------------------------
# the Hydra app in-process (fake engine): printing, reuse, store.force=true, nothing else written
# ---------------------------------------------------------------------------------------------

def run_app(monkeypatch, capsys, *overrides):
    monkeypatch.setattr(sys, "argv", ["nbsim", *overrides])
    app.main()
    return capsys.readouterr()


def test_app_reuse_and_force(tmp_path, engine, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["detector.fpixels=16", "detector.spixels=16"]
    out = run_app(monkeypatch, capsys, *small)
    h = out.out.strip().split("/")[-1]
    assert out.out == f"outputs/{h}\n" and (tmp_path / "outputs" / h / "run.json").is_file()
    err = out.err.splitlines()
    assert err[-1].startswith(f"computed outputs/{h} (config hash {h}): simulation ")
    assert "warning: fake warning" in out.err
    out = run_app(monkeypatch, capsys, *small)
    assert f"reusing stored result outputs/{h} (config hash {h})" in out.err
    assert out.out == f"outputs/{h}\n" and engine.calls == 1
    out = run_app(monkeypatch, capsys, *small, "store.write_pgm=true")      # adds image.pgm only
    assert out.out == f"outputs/{h}\n" and engine.calls == 1 and "added image.pgm" in out.err
    out = run_app(monkeypatch, capsys, *small, "store.force=true")
    assert out.out == f"outputs/{h}\n" and engine.calls == 2
    out = run_app(monkeypatch, capsys, *small, "quiet=true")
    assert out.out == f"outputs/{h}\n" and out.err == "" and engine.calls == 2
    # Hydra left nothing behind: no .hydra/, no log file, no other folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [h]


def test_app_store_root_and_relative_input(tmp_path, engine, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "my.hkl").write_text("0 0 1 10.0\n")
    out = run_app(monkeypatch, capsys, "detector.fpixels=8", "detector.spixels=8",
                  "crystal.hkl_file=my.hkl", f"store.root={tmp_path / 'elsewhere'}")
    folder = Path(out.out.strip().splitlines()[-1])          # outside cwd: printed absolute
    assert folder.parent == tmp_path / "elsewhere" and (folder / "run.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["my.hkl"]
    assert json.loads((folder / "run.json").read_text())["inputs_sha256"].keys() == {"crystal.hkl_file"}


def test_app_real_bug_keeps_its_traceback(tmp_path, engine, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    engine.fail = "simulate"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_app(monkeypatch, capsys, "detector.fpixels=8", "detector.spixels=8")
    assert "nbsim: error" not in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()                 # no empty store root left behind


def test_app_config_error_in_process(tmp_path, engine, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_app(monkeypatch, capsys, "detector.distance_mm=-5")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "nbsim: error: detector.distance_mm: must be > 0, got -5.0\n"
    assert list(tmp_path.iterdir()) == [] and engine.calls == 0


# ---------------------------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["log", "percentile"])
def test_preview_png(tmp_path, mode):
    img = np.zeros((30, 40), np.float32)
    img[10, 20] = 1e6
    img[5:8, 5:8] = 10.0
    [path] = preview_png(img, tmp_path / "p.png", mode)             # no geometry: grayscale only
    with Image.open(path) as im:
        a = np.asarray(im)
    assert a.shape == (30, 40) and a.dtype == np.uint8
    assert a[10, 20] == 255 and a[0, 0] == 0 and a[6, 6] > 0          # weak spots stay visible
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_stored_preview_is_the_annotated_picture(tmp_path):
    """A real entry's preview.png is the picture pipeline.view draws (colour, colour bar and axes make
    it larger than the image; beam-centre marker in red) plus a thumbnail, both in the manifest."""
    pytest.importorskip("matplotlib")
    spec, _ = compose_spec(["detector.fpixels=64", "detector.spixels=48", "crystal.N=3"])
    folder, _, run = store.run_or_reuse(spec, DEV, root=tmp_path / "out", base_dir=tmp_path, log=lambda m: None)
    with Image.open(folder / "preview.png") as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    assert a.shape[0] > 48 and a.shape[1] > 64 + 60                   # axes and colour bar around it
    red = (a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)
    assert red.sum() > 10                                               # the beam-centre cross
    with Image.open(folder / "preview.thumb.png") as th:
        assert th.width == 256
    assert {"preview.png", "preview.thumb.png"} <= set(run[store.MANIFEST_KEY])


def test_preview_flat_and_bad_mode(tmp_path):
    assert not to_uint8(np.full((4, 4), 3.0)).any()
    with pytest.raises(ValueError, match="preview mode"):
        to_uint8(np.ones((2, 2)), "linear")


def test_app_multirun(tmp_path, engine, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = run_app(monkeypatch, capsys, "-m", "detector=mosflm,xds", "detector.fpixels=8",
                  "detector.spixels=8")
    assert engine.calls == 2 and out.err.count("computed outputs/") == 2
    assert len(out.out.splitlines()) == 2 and all(line.startswith("outputs/") for line in out.out.splitlines())
    entries = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(entries) == 3 and entries[0] == ".hydra"      # Hydra's sweep record stays hidden
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
