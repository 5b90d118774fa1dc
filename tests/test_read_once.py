"""Each input file is read once per run: the preflight reads them (``nbsim.inputs.load_inputs``) and
the run takes what it read (``est.inputs``), in the front end and in the store."""
from __future__ import annotations

import pytest

from tests import golden_data as gd

READERS = [("nbsim.io.tables", "read_hkl"), ("nbsim.io.tables", "read_matrix"),
           ("nbsim.io.tables", "read_sourcefile_lines"), ("nbsim.io.smv", "read_smv")]


@pytest.fixture
def counted(monkeypatch):
    import importlib
    calls = {}
    for mod, name in READERS:
        m = importlib.import_module(mod)
        real = getattr(m, name)

        def wrapper(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(m, name, wrapper)
    return calls


@pytest.fixture
def files(tmp_path):
    from tests.test_bad_input import smv
    gd.copy_inputs(tmp_path)
    (tmp_path / "mask.img").write_bytes(smv("SIZE1=32;\nSIZE2=24;\nPIXEL_SIZE=0.4;\n", pixels=32 * 24))
    return tmp_path


def test_front_end_reads_each_file_once(files, counted, monkeypatch, capsys):
    from nbsim import nanobragg
    monkeypatch.chdir(files)
    rc = nanobragg.main(["-mat", "A.mat", "-hkl", "P1.hkl", "-sourcefile", "sources.txt", "-mask", "mask.img",
                         "-N", "2", "-distance", "100", "-detpixels_f", "32", "-detpixels_s", "24",
                         "-pixel", "0.4", "-oversample", "1", "-nonoise", "-nopgm", "-noprogress",
                         "-floatfile", "f.bin"])
    assert rc == 0, capsys.readouterr().err
    assert counted == {"read_hkl": 1, "read_matrix": 1, "read_sourcefile_lines": 1, "read_smv": 1}


def test_store_reads_each_file_once(files, counted):
    from nbsim.spec import DeviceSpec
    from pipeline import store
    from pipeline.compose import compose_spec
    spec, _ = compose_spec(["crystal.matrix_file=A.mat", "crystal.hkl_file=P1.hkl", "crystal.cell_A_deg=null",
                            "crystal.N=2", "beam.source_file=sources.txt", "detector.mask_file=mask.img",
                            "detector.fpixels=32", "detector.spixels=24", "detector.pixel_mm=0.4",
                            "detector.oversample=1"])
    store.run_or_reuse(spec, DeviceSpec(), root=files / "out", base_dir=files, log=lambda m: None,
                       progress=False)
    assert counted == {"read_hkl": 1, "read_matrix": 1, "read_sourcefile_lines": 1, "read_smv": 1}


def test_store_sweep_reads_each_file_once_per_point(files, counted):
    """A batched sweep (``run_many``): each point's preflight reads its files once and the batch
    renders from what the preflights read (grouping, compile decision and run read nothing again)."""
    from nbsim.spec import DeviceSpec
    from pipeline import store
    from pipeline.compose import compose_spec
    items = []
    for dist in (90, 100):
        spec, _ = compose_spec(["crystal.matrix_file=A.mat", "crystal.hkl_file=P1.hkl", "crystal.cell_A_deg=null",
                                "crystal.N=2", "beam.source_file=sources.txt", "detector.mask_file=mask.img",
                                "detector.fpixels=32", "detector.spixels=24", "detector.pixel_mm=0.4",
                                "detector.oversample=1", f"detector.distance_mm={dist}"])
        items.append((spec, DeviceSpec()))
    out = store.run_many(items, root=files / "out", base_dir=files, log=lambda m: None, thumb=200)
    assert [reused for _, reused, _ in out] == [False, False]
    assert counted == {"read_hkl": 2, "read_matrix": 2, "read_sourcefile_lines": 2, "read_smv": 2}
