"""Multi-panel detectors (``nbsim.panels``): tilings are bit-identical to the single-panel run, per-panel
ROI/bad regions, per-panel origin and rotation gradients against finite differences through the spec."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import nbsim
from nbsim.spec import (BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec, PanelSpec,
                        SpecError, spec_from_dict, spec_to_dict)

DEV = DeviceSpec(dtype="float64", compile=False)


def small(**det) -> ExperimentSpec:
    d = dict(fpixels=16, spixels=12, pixel_mm=0.6, distance_mm=60.0)
    d.update(det)
    return ExperimentSpec(detector=DetectorSpec(**d), beam=BeamSpec(wavelength_A=1.1, kahn_factor=0.5),
                          crystal=CrystalSpec(cell_A_deg=[42.0, 51.0, 63.0, 88.0, 93.0, 97.0],
                                              misset_deg=[11.0, 23.0, 35.0], N=3, default_F=100.0))


def with_panels(spec, panels) -> ExperimentSpec:
    s = dataclasses.replace(spec, detector=dataclasses.replace(spec.detector, panels=panels))
    return s.validate()


def tiles(nf, ns, cut_f, cut_s):
    """Four panels that tile an nf x ns detector, cut at fast index cut_f and slow index cut_s."""
    out = []
    for s0, sn in ((0, cut_s), (cut_s, ns - cut_s)):
        for f0, fn in ((0, cut_f), (cut_f, nf - cut_f)):
            out.append(PanelSpec(fpixels=fn, spixels=sn, offset_px=[f0, s0]))
    return out


@pytest.mark.parametrize("det", [
    {},                                                             # mosflm, auto oversampling
    {"oversample": 2, "thick_um": 300.0, "thicksteps": 2, "convention": "xds", "rotz_deg": 3.0},
    {"convention": "custom", "fdet_vector": [0.0, 0.3, 1.0], "sdet_vector": [0.0, -1.0, 0.3],
     "odet_vector": [1.0, 0.0, 0.0], "twotheta_deg": 5.0, "pivot": "sample"},
])
def test_four_tiles_are_bit_identical_to_the_single_panel_run(det):
    spec = small(**det)
    single = nbsim.simulate(spec, DEV)
    multi = nbsim.simulate(with_panels(spec, tiles(16, 12, 7, 5)), DEV)
    assert multi.panels is not None and len(multi.panels) == 4
    img = single.image
    assert float(img.max()) > 0
    flat = []
    for pimg, pn in zip(multi.panels, tiles(16, 12, 7, 5)):
        f0, s0 = pn.offset_px
        ref = img[s0:s0 + pn.spixels, f0:f0 + pn.fpixels]
        assert pimg.image.shape == ref.shape
        assert float((pimg.image - ref).abs().max()) == 0.0
        flat.append(ref.reshape(-1))
    # result.image: the panels one after another, each slow-major (the -floatfile layout)
    assert torch.equal(multi.image, torch.cat(flat))
    assert np.array_equal(multi.float32(), torch.cat(flat).numpy().astype(np.float32))
    assert multi.info["max_I"] == single.info["max_I"]


def test_tiles_with_the_phi_carryover_quirk_and_float32():
    # faithful phi = 0 carry-over: the run's first iteration is taken on the first panel, as the
    # single-panel run takes it at its first pixel
    spec = dataclasses.replace(small(), crystal=dataclasses.replace(
        small().crystal, phi_deg=-0.5, osc_deg=1.0, phisteps=3))
    dev32 = DeviceSpec(dtype="float32", compile=False)
    for dev in (DEV, dev32):
        single = nbsim.simulate(spec, dev).image
        multi = nbsim.simulate(with_panels(spec, tiles(16, 12, 8, 6)), dev)
        for pimg, pn in zip(multi.panels, tiles(16, 12, 8, 6)):
            f0, s0 = pn.offset_px
            assert float((pimg.image - single[s0:s0 + pn.spixels, f0:f0 + pn.fpixels]).abs().max()) == 0.0


def test_panel_with_explicit_vectors_and_origin_equals_the_custom_single_panel_run():
    spec = small(convention="custom", fdet_vector=[0.0, 0.0, 1.0], sdet_vector=[0.0, -1.0, 0.0],
                 odet_vector=[1.0, 0.0, 0.0], pix0_vector_mm=[60.0, 3.3, -4.1])
    spec = dataclasses.replace(spec, fix=["pix0_overwritten"])
    single = nbsim.simulate(spec, DEV)
    pn = PanelSpec(fpixels=16, spixels=12, pixel_mm=0.6, fast=[0.0, 0.0, 1.0], slow=[0.0, -1.0, 0.0],
                   origin_mm=[60.0, 3.3, -4.1])
    multi = nbsim.simulate(with_panels(small(), [pn]), DEV)
    assert float((multi.panels[0].image - single.image).abs().max()) == 0.0


def test_panel_roi_and_bad_regions_leave_pixels_at_zero():
    spec = small()
    single = nbsim.simulate(spec, DEV).image
    pn = PanelSpec(fpixels=16, spixels=12, roi=[2, 13, 1, 10], bad=[[4, 6, 3, 4]])
    r = nbsim.simulate(with_panels(spec, [pn]), DEV)
    img = r.panels[0].image
    roi = np.zeros((12, 16), bool)
    roi[1:11, 2:14] = True
    active = roi.copy()
    active[3:5, 4:7] = False
    assert np.array_equal(r.panels[0].mask, active) and np.array_equal(r.panels[0].roi_mask, roi)
    assert float(img[~torch.as_tensor(active)].abs().max()) == 0.0
    assert float((img[torch.as_tensor(active)] - single[torch.as_tensor(active)]).abs().max()) == 0.0


def test_bad_panel_values_are_refused_with_the_key():
    for pn, key in ((PanelSpec(fpixels=0), "detector.panels.0.fpixels"),
                    (PanelSpec(offset_px=[-1, 0]), "detector.panels.0.offset_px"),
                    (PanelSpec(roi=[3, 2, 0, 1]), "detector.panels.0.roi"),
                    (PanelSpec(fast=[0, 0, 0]), "detector.panels.0.fast")):
        with pytest.raises(SpecError) as e:
            with_panels(small(), [pn])
        assert e.value.key == key
    with pytest.raises(SpecError) as e:
        nbsim.simulate(with_panels(small(), [PanelSpec(fast=[0, 0, 1], slow=[0, 0.5, 1])]), DEV)
    assert e.value.key == "detector.panels.0.slow"
    with pytest.raises(SpecError) as e:
        nbsim.simulate(with_panels(small(), [PanelSpec(roi=[0, 16, 0, 3])]), DEV)
    assert e.value.key == "detector.panels.0.roi"
    with pytest.raises(SpecError) as e:
        spec_from_dict({"detector": {"panels": [{"fpix": 3}]}, "crystal": {"cell_A_deg": [1, 1, 1, 90, 90, 90]}})
    assert e.value.key == "detector.panels.0.fpix"


def test_panel_spec_round_trips_through_dicts():
    spec = with_panels(small(), tiles(16, 12, 7, 5))
    assert spec_from_dict(spec_to_dict(spec)) == spec


# ---- gradients: per-panel origin and rotation, against central differences through the spec

def grad_spec():
    spec = small(oversample=1, convention="custom")
    panels = [PanelSpec(fpixels=8, spixels=6, pixel_mm=0.9, fast=[0.0, 0.1, 1.0], slow=[0.0, -1.0, 0.1],
                        origin_mm=[58.0, 3.0, -6.0], rot_deg=[1.0, -2.0, 0.5]),
              PanelSpec(fpixels=6, spixels=7, pixel_mm=0.9, fast=[0.0, 0.0, 1.0], slow=[0.0, -1.0, 0.0],
                        origin_mm=[61.0, -4.0, 1.5], rot_deg=[0.0, 0.0, 0.0])]
    return with_panels(spec, panels)


def _loss(spec, w, params=None):
    return (nbsim.simulate(spec, DEV, params=params).image * w).sum()


@pytest.mark.parametrize("i,name", [(0, "origin_mm"), (1, "origin_mm"), (0, "rot_deg"), (1, "rot_deg")])
def test_panel_gradients_match_finite_differences_through_the_spec(i, name):
    spec = grad_spec()
    n = sum(p.fpixels * p.spixels for p in spec.detector.panels)
    w = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    v0 = list(getattr(spec.detector.panels[i], name))
    key = f"detector.panels.{i}.{name}"
    t = torch.tensor(v0, dtype=torch.float64, requires_grad=True)
    out = _loss(spec, w, {key: t})
    if any(v0) or name == "origin_mm":
        assert out.detach() == _loss(spec, w)          # the parameter path is the ordinary forward
    (g,) = torch.autograd.grad(out, t)
    for c in range(3):
        # origin: 1e-6 relative, as tests/test_gradients.py. rotation: 1e-4 deg, because at 1e-6 deg
        # the rounding noise of the loss (~1e3, summed over pixels) is ~1e-5 absolute, the size of
        # the small components here; truncation error at 1e-4 deg is ~1e-9 relative (measured:
        # rot_deg[1] -15.0671710 at steps 1e-3 and 1e-4 deg, autograd -15.0671710)
        h = 1e-6 * max(abs(v0[c]), 1.0) if name == "origin_mm" else 1e-4

        def at(delta):
            d = spec_to_dict(spec)
            d["detector"]["panels"][i][name][c] = v0[c] + delta
            return float(_loss(spec_from_dict(d), w))
        fd = (at(h) - at(-h)) / (2 * h)
        assert float(g[c]) != 0.0, f"{key}[{c}]: zero derivative"
        assert abs(float(g[c]) - fd) <= 1e-6 * abs(float(g[c])), f"{key}[{c}]: {float(g[c])!r} vs {fd!r}"


def test_panel_keys_are_refused_out_of_range_and_without_panels():
    spec = grad_spec()
    with pytest.raises(SpecError) as e:
        nbsim.simulate(spec, DEV, params={"detector.panels.2.origin_mm": torch.zeros(3, dtype=torch.float64)})
    assert e.value.key == "detector.panels.2.origin_mm" and "0..1" in str(e.value)
    with pytest.raises(SpecError) as e:
        nbsim.simulate(small(), DEV, params={"detector.panels.0.rot_deg": torch.zeros(3, dtype=torch.float64)})
    assert "multi-panel" in str(e.value)
    with pytest.raises(SpecError) as e:
        nbsim.simulate(spec, DEV, params={"detector.panels.0.origin_mm": torch.zeros(2, dtype=torch.float64)})
    assert "shape" in str(e.value)
