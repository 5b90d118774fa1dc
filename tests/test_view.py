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


@pytest.fixture(scope="module")
def four_panels(tmp_path_factory):
    """A store entry of 4 panels of 16x16 pixels (0.1 mm) normal to the beam at 50 mm, 2x2 around the
    beam with 0.4 mm gaps (MOSFLM-like axes: fast = lab +z, slow = lab -y)."""
    from nbsim.spec import PanelSpec
    tmp = tmp_path_factory.mktemp("view4")
    corners = {"ul": (1.8, -1.8), "ur": (1.8, 0.2), "ll": (-0.2, -1.8), "lr": (-0.2, 0.2)}   # (y, z) mm
    # the pixels next to the beam are the brightest (the 000 reflection): masked (0) in all panels
    # but "ur", which is then the known bright panel; the masked mirror places are white
    near_beam = {"ul": [[10, 15, 10, 15]], "ur": [], "ll": [[10, 15, 0, 5]], "lr": [[0, 5, 0, 5]]}
    panels = [PanelSpec(name=n, fpixels=16, spixels=16, pixel_mm=0.1, fast=[0, 0, 1], slow=[0, -1, 0],
                        origin_mm=[50.0, y, z], bad=near_beam[n]) for n, (y, z) in corners.items()]
    spec = ExperimentSpec(detector=DetectorSpec(panels=panels),
                          crystal=CrystalSpec(cell_A_deg=[12, 13, 14, 90, 90, 90], misset_deg=[10, 20, 30],
                                              N=3, default_F=100))
    folder, _, _ = store.run_or_reuse(spec, DeviceSpec(compile=False), root=tmp, base_dir=tmp,
                                      log=lambda m: None)
    return folder, corners


def test_multi_panel_entry_is_drawn_with_each_panel_in_its_place(four_panels, tmp_path, capsys):
    from matplotlib import colormaps
    from PIL import Image
    plt_cmap = colormaps.get_cmap
    folder, corners = four_panels
    images, info = view.load_panels(folder)
    assert [a.shape for a in images] == [(16, 16)] * 4 and len(info["panels"]) == 4
    # the brightest pixel and the panel that holds it
    k = int(np.argmax([a.max() for a in images]))
    s, f = np.unravel_index(int(np.argmax(images[k])), images[k].shape)
    assert info["panels"][k]["name"] == "ur" and (s, f) == (15, 0)      # next to the beam
    assert images[k][s, f] > 10 * np.median(np.concatenate([a.ravel() for a in images]))
    # where it must land, by hand: the panel is normal to the beam (+x), so the picture plane is the
    # panel's plane: horizontal = lab z, vertical = lab y; the pixel centre is corner + (f+½, s+½) pixels
    y0, z0 = corners[info["panels"][k]["name"]]
    X, Y = z0 + (f + 0.5) * 0.1, y0 - (s + 0.5) * 0.1
    layouts, D = view.panel_layout(info)
    assert D == pytest.approx(50.0, abs=1e-12)
    Xg, Yg = layouts[k]
    assert 0.25 * (Xg[s, f] + Xg[s + 1, f + 1] + Xg[s, f + 1] + Xg[s + 1, f]) == pytest.approx(X, abs=1e-12)
    assert 0.25 * (Yg[s, f] + Yg[s + 1, f + 1] + Yg[s, f + 1] + Yg[s + 1, f]) == pytest.approx(Y, abs=1e-12)
    # the PNG written by the CLI: the bright pixel is black (gray_r, one scale), the gap between the
    # panels is white; the figure's own transform maps mm to PNG pixels (fixed layout)
    out = tmp_path / "v.png"
    assert view.main([str(folder), "-o", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "v.thumb.png")]
    fig, ax = view.panel_figure(images, info, title=view.panels_title(folder.name, info))
    fig.canvas.draw()
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.shape[:2] == (round(fig.get_size_inches()[1] * fig.dpi), round(fig.get_size_inches()[0] * fig.dpi))
    def at(x, y):
        cx, cy = ax.transData.transform((x, y))
        return rgb[int(round(rgb.shape[0] - cy)), int(round(cx))]
    assert at(X, Y).sum() < 60, at(X, Y)                       # black: the maximum
    for mx, my in ((-X, Y), (X, -Y), (-X, -Y)):                # the masked mirror places: white
        assert (at(mx, my) >= 250).all(), (mx, my, at(mx, my))
    # the other panels are drawn with the same colour scale: a mid-grey pixel of "ll" away from its mask
    ll = [p["name"] for p in info["panels"]].index("ll")
    v = images[ll][12, 2]
    assert 0 < v < images[k][s, f]
    grey = at(-1.8 + 2.5 * 0.1, -0.2 - 12.5 * 0.1)
    assert 0 < grey.sum() < 765
    norm, _ = view.colour_norm(np.concatenate([a.ravel().astype(float) for a in images]), "log")
    expected = 255 * np.asarray(plt_cmap("gray_r")(norm(max(v, norm.vmin)))[:3])
    assert np.abs(grey - expected).max() <= 2, (grey, expected)
    for gx, gy in ((0.0, 1.3), (1.3, 0.0), (0.0, -1.3), (-1.3, 0.0)):   # gaps between the panels: white
        assert (at(gx, gy) >= 250).all(), (gx, gy, at(gx, gy))
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_stored_preview_of_a_multi_panel_entry_is_the_view_picture(four_panels, tmp_path, capsys):
    """The store's preview.png / preview.thumb.png of a multi-panel entry are the files
    ``python -m pipeline.view`` writes for it, byte for byte (one drawing function), recorded in the
    entry's checksums."""
    folder, _ = four_panels
    doc, why = store.verify_entry(folder, folder.name)
    assert doc is not None, why
    assert {"preview.png", "preview.thumb.png"} <= set(doc["files_sha256"])
    assert doc["previews"] == {"log": "preview.png"}
    out = tmp_path / "v.png"
    assert view.main([str(folder), "-o", str(out)]) == 0
    capsys.readouterr()
    assert (folder / "preview.png").read_bytes() == out.read_bytes()
    assert (folder / "preview.thumb.png").read_bytes() == (tmp_path / "v.thumb.png").read_bytes()
