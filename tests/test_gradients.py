"""Derivatives by config name (``nbsim.simulate(spec, device, params={key: tensor})``).

Every key of ``nbsim.params.PARAMS`` is checked against central finite differences taken *through the
spec* (the value changed in the experiment description and simulated again, as a user would), to
1e-6 relative; one key per family also through ``torch.autograd.gradcheck``; forward mode and
``torch.func`` agree with reverse mode. Oversampling is fixed in every spec (auto oversampling is a
discrete choice that finite differences could jump across)."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

import nbsim
from nbsim.params import PARAMS
from nbsim.spec import (BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec, SpecError,
                        spec_from_dict, spec_to_dict)
from tests.conftest import golden_dir

DEV = DeviceSpec(dtype="float64", compile=False)


def base(**kw) -> ExperimentSpec:
    """A small triclinic experiment near Bragg peaks (18×14 pixels of 0.9 mm)."""
    det = dict(fpixels=18, spixels=14, pixel_mm=0.9, distance_mm=80.0, oversample=1)
    crys = dict(cell_A_deg=[62.0, 71.0, 83.0, 88.0, 94.0, 97.0], misset_deg=[12.0, 7.0, 21.0],
                default_F=100.0, N=4)
    beam = dict(wavelength_A=1.1)
    det.update(kw.pop("detector", {}))
    crys.update(kw.pop("crystal", {}))
    beam.update(kw.pop("beam", {}))
    return ExperimentSpec(detector=DetectorSpec(**det), crystal=CrystalSpec(**crys), beam=BeamSpec(**beam),
                          **kw)


def with_value(spec: ExperimentSpec, key: str, v) -> ExperimentSpec:
    """The spec with ``key`` set to ``v`` (a number or a list), as a user would write it."""
    d = spec_to_dict(spec)
    group, name = key.split(".", 1)
    d[group][name] = v
    return spec_from_dict(d)


def weights(spec: ExperimentSpec) -> torch.Tensor:
    """Fixed pseudo-random pixel weights, so no derivative vanishes by symmetry."""
    r = nbsim.simulate(spec, DEV).image
    g = torch.Generator().manual_seed(7)
    return torch.rand(r.shape, generator=g, dtype=torch.float64) + 0.5


def loss(spec, w, base_dir=".", params=None):
    return (nbsim.simulate(spec, DEV, params=params, base_dir=base_dir).image * w).sum()


# key → (spec overrides that make the key matter, value or None for the spec's own, relative step)
CASES = {
    "detector.distance_mm": ({}, None),
    "detector.close_distance_mm": ({"detector": {"convention": "xds", "close_distance_mm": 79.0}}, None),
    "detector.pixel_mm": ({}, None),
    "detector.xbeam_mm": ({"detector": {"xbeam_mm": 6.1}}, None),
    "detector.ybeam_mm": ({"detector": {"ybeam_mm": 8.3}}, None),
    "detector.xclose_mm": ({"detector": {"convention": "custom", "pivot": "sample", "xclose_mm": 7.0}}, None),
    "detector.yclose_mm": ({"detector": {"convention": "custom", "pivot": "sample", "yclose_mm": 5.5}}, None),
    "detector.orgx_px": ({"detector": {"convention": "xds", "orgx_px": 8.2}}, None),
    "detector.orgy_px": ({"detector": {"convention": "xds", "orgy_px": 6.7}}, None),
    "detector.rotx_deg": ({"detector": {"rotx_deg": 2.0}}, None),
    "detector.roty_deg": ({"detector": {"roty_deg": -1.5}}, None),
    "detector.rotz_deg": ({"detector": {"rotz_deg": 3.0}}, None),
    "detector.twotheta_deg": ({"detector": {"twotheta_deg": 4.0}}, None),
    "detector.thick_um": ({"detector": {"thick_um": 300.0, "thicksteps": 3, "attenuation_um": 250.0}}, None),
    "detector.attenuation_um": ({"detector": {"thick_um": 300.0, "thicksteps": 3, "attenuation_um": 250.0}},
                                None),
    "beam.wavelength_A": ({}, None),
    "beam.dispersion_pct": ({"beam": {"dispersion_pct": 0.4, "dispsteps": 3}}, None),
    "beam.hdivrange_mrad": ({"beam": {"hdivrange_mrad": 2.0, "hdivsteps": 3, "round_div": False}}, None),
    "beam.vdivrange_mrad": ({"beam": {"vdivrange_mrad": 2.0, "vdivsteps": 3, "round_div": False}}, None),
    "beam.fluence_ph_per_m2": ({"beam": {"fluence_ph_per_m2": 3.0e29}}, None),
    "beam.kahn_factor": ({"beam": {"kahn_factor": 0.6}}, None),
    "crystal.cell_A_deg": ({}, None),
    "crystal.misset_deg": ({}, None),
    "crystal.N": ({}, None),
    "crystal.Na": ({"crystal": {"Na": 5}}, None),
    "crystal.Nb": ({"crystal": {"Nb": 3}}, None),
    "crystal.Nc": ({"crystal": {"Nc": 6}}, None),
    "crystal.default_F": ({}, None),
    "crystal.mosaic_deg": ({"crystal": {"mosaic_deg": 0.8, "mosaic_domains": 4}}, None),
    "crystal.phi_deg": ({"crystal": {"phi_deg": 5.0, "osc_deg": 1.0, "phisteps": 2}}, None),
    "crystal.osc_deg": ({"crystal": {"phi_deg": 5.0, "osc_deg": 1.0, "phisteps": 2}}, None),
}
FILE_KEYS = ("crystal.matrix", "crystal.F_table")
# whole numbers in the spec, continuous in the lattice factor: their finite differences go through
# ``params`` with plain tensors (the ordinary forward at that value), not through the spec
INTEGER_KEYS = ("crystal.N", "crystal.Na", "crystal.Nb", "crystal.Nc")


def test_every_param_key_is_tested():
    assert set(CASES) | set(FILE_KEYS) == set(PARAMS)


def _merge(spec_kw):
    return base(**{k: dict(v) for k, v in spec_kw.items()})


@pytest.fixture
def smooth_mosaic(request, monkeypatch):
    """C rounds each mosaic rotation angle to float32 (rot = (float)(spread·p)), so the image is a
    staircase in crystal.mosaic_deg with steps of ~6e-8 relative; finite differences of 1e-6 would
    measure the staircase. The derivative nbsim returns is that of the unrounded rotation, so for
    that key the finite differences are taken with the rounding switched off (on both sides)."""
    if request.node.callspec.params.get("key") == "crystal.mosaic_deg":
        import nbsim.rng
        monkeypatch.setattr(nbsim.rng, "f32", lambda x: x)


@pytest.mark.parametrize("key", sorted(CASES))
def test_gradient_matches_finite_differences_through_the_spec(key, smooth_mosaic):
    spec_kw, _ = CASES[key]
    spec = _merge(spec_kw)
    w = weights(spec)
    v0 = getattr(getattr(spec, key.split(".")[0]), key.split(".")[1])
    t = torch.tensor(v0, dtype=torch.float64, requires_grad=True)
    out = loss(spec, w, params={key: t})
    assert out.detach() == loss(spec, w)           # the parameter path is the ordinary forward
    (g,) = torch.autograd.grad(out, t)
    comps = range(len(v0)) if isinstance(v0, list) else [None]
    for i in comps:
        x = v0[i] if i is not None else v0
        h = 1e-6 * max(abs(x), 1.0)

        def at(delta):
            if key in INTEGER_KEYS:     # the spec takes whole numbers: the same forward via params
                return loss(spec, w, params={key: torch.tensor(x + delta, dtype=torch.float64)}).item()
            if i is None:
                return loss(with_value(spec, key, x + delta), w).item()
            vv = list(v0)
            vv[i] = x + delta
            return loss(with_value(spec, key, vv), w).item()
        fd = (at(h) - at(-h)) / (2 * h)
        gi = float(g if i is None else g[i])
        assert gi != 0.0, f"{key}[{i}]: zero derivative"
        assert abs(gi - fd) <= 1e-6 * abs(gi), f"{key}[{i}]: autograd {gi!r} vs finite differences {fd!r}"


@pytest.fixture
def inputs(tmp_path):
    for name in ("A.mat", "P1.hkl"):
        shutil.copy(golden_dir() / "inputs" / name, tmp_path / name)
    return tmp_path


def _matrix_spec():
    return ExperimentSpec(
        detector=DetectorSpec(fpixels=18, spixels=14, pixel_mm=0.9, distance_mm=80.0, oversample=1),
        crystal=CrystalSpec(matrix_file="A.mat", hkl_file="P1.hkl", default_F=30.0, N=4),
        beam=BeamSpec(wavelength_A=1.1))


def test_matrix_gradient_matches_finite_differences_through_the_file(inputs):
    from nbsim.io.tables import read_matrix
    spec = _matrix_spec()
    w = weights_in(spec, inputs)
    A = torch.as_tensor(read_matrix(inputs / "A.mat"), dtype=torch.float64)
    t = A.clone().requires_grad_(True)
    out = loss(spec, w, inputs, params={"crystal.matrix": t})
    assert out.detach() == loss(spec, w, inputs)
    (g,) = torch.autograd.grad(out, t)
    lines = (inputs / "A.mat").read_text().splitlines()
    for (r, c) in ((0, 0), (1, 2), (2, 1)):
        h = 1e-6 * abs(float(A[r, c]))

        def at(delta):
            B = A.clone()
            B[r, c] += delta
            p = inputs / "A_fd.mat"
            # MOSFLM layout: row r of the file holds row r of the matrix (columns a*, b*, c*)
            p.write_text("\n".join(" ".join(repr(float(x)) for x in B[i]) for i in range(3))
                         + "\n" + "\n".join(lines[3:]) + "\n")
            s = dataclasses.replace(spec, crystal=dataclasses.replace(spec.crystal, matrix_file="A_fd.mat"))
            return loss(s, w, inputs).item()
        fd = (at(h) - at(-h)) / (2 * h)
        assert g[r, c] != 0
        assert abs(float(g[r, c]) - fd) <= 1e-6 * abs(float(g[r, c])), (r, c, float(g[r, c]), fd)


def _expt_with_crystal(path, axes_nbsim_A):
    """A one-panel DIALS ``.expt`` (18x14 pixels of 0.9 mm facing the beam at 80 mm, as ``base()``)
    holding a crystal with the real-space axes ``axes_nbsim_A`` (rows a, b, c; nbsim frame, Å), all
    written in dxtbx's frame: (x_d, y_d, z_d) = (z_n, y_n, -x_n); floats with repr (read back exactly)."""
    import json
    to_d = lambda v: [float(v[2]), float(v[1]), 0.0 - float(v[0])]
    doc = {"__id__": "ExperimentList",
           "experiment": [{"__id__": "Experiment", "detector": 0, "beam": 0, "crystal": 0}],
           "detector": [{"panels": [{"name": "p", "type": "SENSOR_PAD", "fast_axis": to_d([0, 0, 1]),
                                     "slow_axis": to_d([0, -1, 0]), "origin": to_d([80.0, 6.3, -8.1]),
                                     "pixel_size": [0.9, 0.9], "image_size": [18, 14], "thickness": 0.0,
                                     "material": "", "mu": 0.0, "mask": []}]}],
           "beam": [{"__id__": "monochromatic", "direction": [0.0, 0.0, 1.0], "wavelength": 1.1}],
           "crystal": [{"__id__": "crystal", "real_space_a": to_d(axes_nbsim_A[0]),
                        "real_space_b": to_d(axes_nbsim_A[1]), "real_space_c": to_d(axes_nbsim_A[2]),
                        "space_group_hall_symbol": " P 1"}]}
    path.write_text(json.dumps(doc))


def test_matrix_gradient_of_an_expt_crystal_matches_finite_differences_through_the_file(tmp_path):
    """``crystal.matrix`` with the crystal of an ``.expt`` (crystal=geometry: no cell, no matrix file):
    the key replaces the MOSFLM matrix the file's crystal is turned into (as with -mat). Finite
    differences through the spec: the perturbed matrix A' written back into the .expt as the axes
    λ·inv(A') (rows a, b, c), simulated again."""
    import numpy as np

    from nbsim.inputs import load_inputs
    ref = nbsim.simulate(base(), DEV).info
    axes = [ref[k] for k in ("a_A", "b_A", "c_A")]
    _expt_with_crystal(tmp_path / "x.expt", axes)
    spec = ExperimentSpec(detector=DetectorSpec(geometry_file="x.expt", oversample=1),
                          beam=BeamSpec(wavelength_A=1.1), crystal=CrystalSpec(default_F=100.0, N=4)).validate()
    A = torch.as_tensor(load_inputs(spec, tmp_path).matrix, dtype=torch.float64)
    w = weights_in(spec, tmp_path)
    t = A.clone().requires_grad_(True)
    out = loss(spec, w, tmp_path, params={"crystal.matrix": t})
    assert out.detach() == loss(spec, w, tmp_path)          # the parameter path is the ordinary forward
    (g,) = torch.autograd.grad(out, t)
    for (r, c) in ((0, 0), (1, 2), (2, 1)):
        h = 1e-6 * abs(float(A[r, c]))

        def at(delta):
            B = A.clone().numpy()
            B[r, c] += delta
            _expt_with_crystal(tmp_path / "fd.expt", (1.1 * np.linalg.inv(B)).tolist())
            s = dataclasses.replace(spec, detector=dataclasses.replace(spec.detector, geometry_file="fd.expt"))
            return loss(s, w, tmp_path).item()
        fd = (at(h) - at(-h)) / (2 * h)
        assert g[r, c] != 0
        assert abs(float(g[r, c]) - fd) <= 1e-6 * abs(float(g[r, c])), (r, c, float(g[r, c]), fd)
    # a cell of the spec's own wins over the .expt crystal: then there is no matrix to replace
    cell = dataclasses.replace(spec, crystal=dataclasses.replace(spec.crystal, cell_A_deg=[62.0, 71.0, 83.0,
                                                                                           88.0, 94.0, 97.0]))
    with pytest.raises(SpecError, match=r"needs crystal\.matrix_file, or the crystal of a \.expt") as e:
        nbsim.simulate(cell, DEV, params={"crystal.matrix": t}, base_dir=str(tmp_path))
    assert e.value.key == "crystal.matrix"


def weights_in(spec, base_dir):
    r = nbsim.simulate(spec, DEV, base_dir=base_dir).image
    return torch.rand(r.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5


def test_F_table_gradient_matches_finite_differences_through_the_file(inputs):
    from nbsim.io.tables import hkl_table, read_hkl
    spec = _matrix_spec()
    spec.crystal.interpolate = False
    w = weights_in(spec, inputs)
    hkl, F = read_hkl(inputs / "P1.hkl")
    ranges, dense = hkl_table(hkl, F, spec.crystal.default_F)
    t = torch.as_tensor(dense, dtype=torch.float64).clone().requires_grad_(True)
    out = loss(spec, w, inputs, params={"crystal.F_table": t})
    assert out.detach() == loss(spec, w, inputs)
    (g,) = torch.autograd.grad(out, t)
    # the derivative is 2·F·Σ(w·rest) over the pixels that use a reflection: check the three
    # reflections with the largest derivative by perturbing them in the HKL file
    top = torch.topk(g.abs().reshape(-1), 3).indices
    rows = (inputs / "P1.hkl").read_text().splitlines()
    for flat in top.tolist():
        i, j, k = (int(x) for x in torch.unravel_index(torch.tensor(flat), g.shape))
        hh, kk, ll = i + ranges[0], j + ranges[2], k + ranges[4]
        F0 = float(dense[i, j, k])
        h = 1e-6 * abs(F0)

        def at(delta):
            out_rows = [ln for ln in rows if [int(x) for x in ln.split()[:3]] != [hh, kk, ll]]
            out_rows.append(f"{hh} {kk} {ll} {F0 + delta!r}")
            (inputs / "P1_fd.hkl").write_text("\n".join(out_rows) + "\n")
            s = dataclasses.replace(spec, crystal=dataclasses.replace(spec.crystal, hkl_file="P1_fd.hkl"))
            return loss(s, w, inputs).item()
        fd = (at(h) - at(-h)) / (2 * h)
        assert abs(float(g[i, j, k]) - fd) <= 1e-6 * abs(float(g[i, j, k])), ((hh, kk, ll), float(g[i, j, k]), fd)


# one key per family through torch.autograd.gradcheck (tiny detector)
GRADCHECK = [
    ("detector.distance_mm", {}, 80.0),
    ("detector.rotx_deg", {"detector": {"rotx_deg": 2.0}}, 2.0),
    ("beam.wavelength_A", {}, 1.1),
    ("beam.hdivrange_mrad", {"beam": {"hdivrange_mrad": 2.0, "hdivsteps": 3, "round_div": False}}, 2.0),
    ("crystal.cell_A_deg", {}, [62.0, 71.0, 83.0, 88.0, 94.0, 97.0]),
    ("crystal.N", {}, 4.0),
    ("detector.thick_um", {"detector": {"thick_um": 300.0, "thicksteps": 3, "attenuation_um": 250.0}}, 300.0),
]


@pytest.mark.parametrize("key,spec_kw,v0", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck(key, spec_kw, v0):
    kw = {k: dict(v) for k, v in spec_kw.items()}
    kw.setdefault("detector", {}).update(fpixels=5, spixels=4, pixel_mm=3.0)
    spec = base(**kw)
    t = torch.tensor(v0, dtype=torch.float64, requires_grad=True)
    scale = 1.0 / float(nbsim.simulate(spec, DEV).image.abs().max())

    def f(x):
        return nbsim.simulate(spec, DEV, params={key: x}).image * scale
    assert torch.autograd.gradcheck(f, (t,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_mosaic_gradient_is_the_unrounded_rotations(monkeypatch):
    """With C's float32 angle rounding the derivative is the same as without it (it is taken at the
    unrounded angle), and it matches wide finite differences of the rounded image."""
    spec = base(crystal={"mosaic_deg": 0.8, "mosaic_domains": 4})
    w = weights(spec)

    def grad():
        t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(loss(spec, w, params={"crystal.mosaic_deg": t}), t)[0]
    g = grad()
    h = 2e-3 * 0.8
    fd = (loss(with_value(spec, "crystal.mosaic_deg", 0.8 + h), w).item()
          - loss(with_value(spec, "crystal.mosaic_deg", 0.8 - h), w).item()) / (2 * h)
    assert abs(float(g) - fd) <= 1e-3 * abs(float(g))       # staircase + O(h²) of this wide step
    import nbsim.rng
    monkeypatch.setattr(nbsim.rng, "f32", lambda x: x)
    assert torch.allclose(grad(), g, rtol=1e-6, atol=0)


def test_forward_mode_and_torch_func_agree_with_reverse_mode():
    import torch.autograd.forward_ad as fwAD
    spec = base()
    w = weights(spec)
    cell0 = torch.tensor([62.0, 71.0, 83.0, 88.0, 94.0, 97.0], dtype=torch.float64)
    t = cell0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(spec, w, params={"crystal.cell_A_deg": t}), t)
    tangent = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(cell0, tangent)
        jvp = fwAD.unpack_dual(loss(spec, w, params={"crystal.cell_A_deg": dual})).tangent
    assert torch.allclose(jvp, (g * tangent).sum(), rtol=1e-12, atol=0)
    g_func = torch.func.grad(lambda c: loss(spec, w, params={"crystal.cell_A_deg": c}))(cell0)
    assert torch.allclose(g_func, g, rtol=1e-12, atol=0)


def test_cell_and_beam_centre_together():
    spec = base(detector={"xbeam_mm": 6.1, "ybeam_mm": 8.3})
    w = weights(spec)
    cell = torch.tensor(spec.crystal.cell_A_deg, dtype=torch.float64, requires_grad=True)
    xb = torch.tensor(6.1, dtype=torch.float64, requires_grad=True)
    out = loss(spec, w, params={"crystal.cell_A_deg": cell, "detector.xbeam_mm": xb})
    out.backward()
    assert torch.isfinite(cell.grad).all() and (cell.grad != 0).all()
    assert xb.grad != 0


def test_float32_run_differentiates_in_float32():
    spec = base()
    d = torch.tensor(80.0, dtype=torch.float64, requires_grad=True)
    r = nbsim.simulate(spec, DeviceSpec(dtype="float32", compile=False), params={"detector.distance_mm": d})
    assert r.image.dtype == torch.float32
    r.image.sum().backward()
    assert torch.isfinite(d.grad) and d.grad != 0


@pytest.mark.parametrize("key,value,match", [
    ("detector.fpixels", torch.tensor(5.0), "cannot carry a gradient"),
    ("crystal.mosaic_domains", torch.tensor(3.0), "cannot carry a gradient"),
    ("crystal.hkl_file", torch.tensor(1.0), "cannot carry a gradient"),
    ("detector.distance_mmm", torch.tensor(1.0), "cannot carry a gradient"),
    ("crystal.cell_A_deg", torch.ones(5, dtype=torch.float64), r"shape \(6,\)"),
    ("detector.distance_mm", torch.tensor(1, dtype=torch.int64), "floating-point"),
    ("detector.distance_mm", 100.0, "torch tensors"),
    ("detector.distance_mm", torch.tensor(float("nan")), "finite"),
    ("crystal.matrix", torch.eye(3, dtype=torch.float64), "matrix_file"),
    ("crystal.F_table", torch.ones(2, 2, 2, dtype=torch.float64), "hkl_file"),
])
def test_keys_that_cannot_be_parameters_are_refused(key, value, match):
    with pytest.raises(SpecError, match=match) as e:
        nbsim.simulate(base(), DEV, params={key: value})
    assert e.value.key == key


def test_compile_with_gradients_compiles_forward_and_backward():
    """device.compile=true with a derivative compiles the reference kernel (forward and backward):
    the same gradient as eager, and the result says which kernel ran."""
    spec = base()
    w = weights(spec)
    grads = {}
    for compile_ in (False, True):
        d = torch.tensor(80.0, dtype=torch.float64, requires_grad=True)
        r = nbsim.simulate(spec, DeviceSpec(compile=compile_), params={"detector.distance_mm": d})
        (r.image * w).sum().backward()
        grads[r.info["kernel"]] = d.grad
    assert set(grads) == {"reference", "reference-compiled"}
    assert torch.allclose(grads["reference-compiled"], grads["reference"], rtol=1e-12, atol=0)


def test_forward_mode_with_compile_runs_eager_and_keeps_the_tangent():
    """device.compile=true compiles reverse mode only; a forward-mode dual gets the eager kernel
    and the same tangent (a compiled graph would drop it: an all-zero tangent, found by refine)."""
    import torch.autograd.forward_ad as fwAD
    spec = base()
    tangents = {}
    for compile_ in (False, True):
        with fwAD.dual_level():
            d = fwAD.make_dual(torch.tensor(80.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
            r = nbsim.simulate(spec, DeviceSpec(compile=compile_), params={"detector.distance_mm": d})
            tangents[compile_] = fwAD.unpack_dual(r.image).tangent.clone()
            assert r.info["kernel"] == "reference"
    assert tangents[True].abs().sum() > 0
    assert torch.equal(tangents[True], tangents[False])


def test_chunked_backward_equals_one_chunk():
    """The backward recomputes chunk by chunk; the chunking changes nothing."""
    spec = base()
    w = weights(spec)
    grads = []
    for chunk in (None, 7):
        d = torch.tensor(80.0, dtype=torch.float64, requires_grad=True)
        out = (nbsim.simulate(spec, DEV, params={"detector.distance_mm": d}, chunk_pixels=chunk).image * w).sum()
        out.backward()
        grads.append(d.grad)
    # the same terms; only the order in which chunk contributions are summed differs
    assert torch.allclose(grads[0], grads[1], rtol=1e-13, atol=0)


def test_compose_matches_the_hydra_app_defaults():
    spec, device = nbsim.compose(["crystal=triclinic", "detector.fpixels=64", "detector.spixels=64"])
    assert spec.detector.fpixels == 64 and spec.crystal.misset_deg is not None
    assert isinstance(device, DeviceSpec)
