"""pipeline.view: resolution rings, beam centre, colour bar; stored entries and SMV files agree."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nbsim.spec import CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec
from pipeline import store, view

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("view")
    spec = ExperimentSpec(detector=DetectorSpec(fpixels=48, spixels=40, distance_mm=50),
                          crystal=CrystalSpec(cell_A_deg=[40, 40, 40, 90, 90, 90], N=3, default_F=100))
    folder, _, _ = store.run_or_reuse(spec, DeviceSpec(compile=False), root=tmp, base_dir=tmp,
                                      log=lambda m: None)
    return folder


def test_geometry_of_a_stored_entry(entry):
    img, tt, centre, lam, _ = view.load_entry(entry)
    assert img.shape == (40, 48) and lam == 1.0
    # MOSFLM default: beam centre (detsize + pixel)/2 plus MOSFLM's half-pixel shift, i.e.
    # (4.8+0.1)/2 + 0.05 = 2.5 mm along fast, (4.0+0.1)/2 + 0.05 = 2.1 mm along slow; pixel i's centre
    # lies at (i+½)·pixel, so the beam hits (24.5, 20.5) in pixel coordinates
    assert centre == pytest.approx((24.5, 20.5), abs=1e-9)
    f, s = 0, 0                                   # a corner pixel, checked by hand
    df = (f - centre[0]) * 0.1
    ds = (s - centre[1]) * 0.1
    assert tt[s, f] == pytest.approx(math.atan2(math.hypot(df, ds), 50.0), rel=1e-9)
    d = view.d_spacing_A(tt, lam)
    assert d[s, f] == pytest.approx(1.0 / (2 * math.sin(tt[s, f] / 2)), rel=1e-12)
    levels = view.ring_levels(d)
    assert levels and all(d.min() <= v for v in levels) and levels == sorted(levels, reverse=True)


def test_smv_header_gives_the_same_rings(entry):
    _, tt_e, c_e, lam_e, _ = view.load_entry(entry)
    img, tt_f, c_f, lam_f, _ = view.load_file(entry / "int.img")
    assert c_f == pytest.approx(c_e, abs=1e-6) and lam_f == lam_e
    assert np.max(np.abs(tt_f - tt_e)) < 1e-9


def test_cli_writes_full_size_and_thumbnail(entry, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "v.png"
    assert view.main([str(entry), "-o", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "v.thumb.png")]
    with Image.open(out) as full, Image.open(tmp_path / "v.thumb.png") as small:
        assert full.width >= 48 * 2 and small.width == view.THUMB_PX
        rgb = np.asarray(full.convert("RGB")).reshape(-1, 3).astype(int)
    def near(colour):
        return int((np.abs(rgb - np.array(colour)).sum(axis=1) < 60).sum())
    assert near((214, 39, 40)) > 0 and near((31, 119, 180)) > 0      # the beam-centre cross, the rings
    assert view.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("pipeline.view: error: ")
    (tmp_path / "junk.img").write_bytes(b"not an image")
    assert view.main([str(tmp_path / "junk.img")]) == 2
    assert "cannot read it as an SMV or CBF image" in capsys.readouterr().err


def test_multi_panel_entry_is_refused_in_one_line(tmp_path, capsys):
    """A multi-panel entry (float.bin = the panels one after another) is named as such, exit 2."""
    from nbsim.spec import PanelSpec
    spec = ExperimentSpec(detector=DetectorSpec(fpixels=32, spixels=16, panels=[
                              PanelSpec(fpixels=16, spixels=16, offset_px=[0, 0]),
                              PanelSpec(fpixels=16, spixels=16, offset_px=[16, 0])]),
                          crystal=CrystalSpec(cell_A_deg=[40, 40, 40, 90, 90, 90], N=3, default_F=100))
    folder, _, _ = store.run_or_reuse(spec, DeviceSpec(compile=False), root=tmp_path, base_dir=tmp_path,
                                      log=lambda m: None)
    assert view.main([str(folder), "-o", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a multi-panel entry (2 panels" in err[0]
    assert not (tmp_path / "v.png").exists()
