"""Every quirk its own switch (``nbsim.quirks``): names, both entry points, presets, hash, warnings,
and bit-for-bit parity of single fixes with the upstream branches that fix them.

C comparisons (marker needs_c) read the binaries from the environment and skip cleanly without them:
NB_C_BIN (bl831/nanoBragg main), NB_C_BIN_FIX_PHI0 (branch fix/phi0-stale-rotation) and
NB_C_BIN_FIX_OVERSAMPLE (branch fix/subpixel-oversampling).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbsim import quirks
from nbsim.api import simulate
from nbsim.frontend import parse_argv
from nbsim.frontend.argv import FrontendError
from nbsim.frontend.to_argv import spec_to_argv
from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec, ExperimentSpec, SpecError
from pipeline.compose import compose_spec, format_error
from pipeline.hashing import config_hash

REPO = Path(__file__).resolve().parents[1]
BASE = ["-default_F", "100", "-lambda", "1", "-distance", "100", "-detpixels", "48", "-pixel", "0.4"]
CUBIC = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5"]
TRI = ["-cell", "60", "70", "80", "80", "95", "105", "-N", "4", "-misset", "7", "-13", "22"]


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def test_names_are_stable_snake_case_and_unique():
    assert len(set(quirks.NAMES)) == len(quirks.NAMES)
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)+", n) for n in quirks.NAMES)
    assert quirks.BY_NAME["phi0_carryover"].upstream == "fix/phi0-stale-rotation"
    assert quirks.BY_NAME["oversample_compounding"].upstream == "fix/subpixel-oversampling"
    assert quirks.PRESETS["faithful"] == frozenset()
    assert quirks.PRESETS["physical"] == frozenset(quirks.NAMES)


def test_readme_list_is_generated_from_the_table():
    readme = (REPO / "README.md").read_text()
    assert quirks.readme_list() in readme


def test_unknown_name_in_code_is_an_error():
    with pytest.raises(KeyError):
        quirks.QuirkSet().fixed("phi0_carry_over")


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", quirks.NAMES)
def test_every_name_accepted_by_both_entry_points(name):
    p = parse_argv(BASE + CUBIC + ["--fix", name])
    assert p.spec.quirks == "faithful" and p.spec.fix == [name]
    assert quirks.of(p.spec).fixed_names == {name}
    spec, _ = compose_spec([f"fix=[{name}]"])
    assert spec.fix == [name] and quirks.of(spec).fixed(name)


def test_fix_lists_add_up_and_round_trip():
    p = parse_argv(BASE + CUBIC + ["--fix", "phi0_carryover,oversample_compounding",
                                   "--fix=triclinic_cstar", "--fix", "phi0_carryover"])
    assert p.spec.fix == ["phi0_carryover", "oversample_compounding", "triclinic_cstar"]
    argv = spec_to_argv(p.spec)
    assert "--fix" in argv
    assert parse_argv(argv).spec == p.spec
    spec, _ = compose_spec(["fix=[phi0_carryover,oversample_compounding]", "quirks=physical"])
    assert quirks.of(spec).fixed_names == frozenset(quirks.NAMES)


@pytest.mark.parametrize("bad", ["bogus", "phi0_carryover,bogus", "phi0_carryover,,x"])
def test_front_end_refuses_unknown_names(bad):
    with pytest.raises(FrontendError) as e:
        parse_argv(BASE + CUBIC + ["--fix", bad])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--fix: ") and "phi0_carryover, " in msg


def test_spec_refuses_unknown_names():
    spec = ExperimentSpec(crystal=CrystalSpec(cell_A_deg=[50, 50, 50, 90, 90, 90], default_F=1))
    spec.fix = ["phi0_carryover", "nope"]
    with pytest.raises(SpecError) as e:
        spec.validate()
    assert str(e.value).startswith("fix: unknown quirk 'nope'; accepted: ")
    for override in ("fix=[nope]", "fix=nope"):
        try:
            compose_spec([override])
        except Exception as exc:                               # noqa: BLE001
            msg = format_error(exc)
        else:
            pytest.fail(f"{override} was accepted")
        assert msg is not None and "\n" not in msg and msg.startswith("fix: "), msg


def _run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.parametrize("args,prefix", [
    (["nbsim.nanobragg"] + BASE + CUBIC + ["--fix", "phi0_carryover,bogus"],
     "nbsim.nanobragg: error: --fix: unknown quirk 'bogus'"),
    (["nbsim", "fix=[bogus]"], "nbsim: error: fix: unknown quirk 'bogus'"),
])
def test_unknown_name_exits_2_with_one_line(args, prefix, tmp_path):
    if args[0] == "nbsim":
        args = args + [f"store.root={tmp_path}/store"]
    r = _run(args, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), r.stderr
    assert "accepted: convention_pivot" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# presets, hash, warnings
# ---------------------------------------------------------------------------------------------

def rich_spec(**kw) -> ExperimentSpec:
    """Small experiment in which many quirks change pixels: triclinic -cell, φ from 0 with mosaic,
    two-theta, a thick sensor with -oversample_thick/_omega, divergence, water."""
    spec = ExperimentSpec(
        detector=DetectorSpec(fpixels=24, spixels=20, pixel_mm=0.8, distance_mm=100, oversample=2,
                              twotheta_deg=4.0, thick_um=100.0, thicksteps=3, oversample_thick=True,
                              oversample_omega=True),
        beam=BeamSpec(wavelength_A=1.0, hdivrange_mrad=1.0, hdivsteps=2, fluence_ph_per_m2=1e24),
        crystal=CrystalSpec(cell_A_deg=[60, 70, 80, 80, 95, 105], N=4, default_F=100,
                            misset_deg=[7, -13, 22], phi_deg=0.0, osc_deg=2.0, phisteps=2,
                            mosaic_deg=0.5, mosaic_domains=3, water_um=20.0))
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def _image(spec):
    return simulate(spec).image.numpy()


def test_presets_equal_their_explicit_lists():
    physical = _image(rich_spec(quirks="physical"))
    listed = _image(rich_spec(fix=list(quirks.NAMES)))
    faithful = _image(rich_spec())
    assert np.abs(physical - listed).max() == 0
    assert np.abs(faithful - _image(rich_spec(fix=[]))).max() == 0
    assert np.abs(physical - faithful).max() > 0                 # the case exercises the quirks


@pytest.mark.parametrize("name", [q.name for q in quirks.QUIRKS if q.scope == "engine"])
def test_each_fix_alone_runs_and_silences_its_warning(name):
    base = simulate(rich_spec())
    res = simulate(rich_spec(fix=[name]))
    img = res.image.numpy()
    assert np.isfinite(img).all() and img.max() > 0
    assert not any(f"quirk {name}" in w for w in res.warnings), res.warnings
    # the other quirks' warnings stay
    others = [w for w in base.warnings if w.startswith("quirk ") and f"quirk {name}" not in w]
    assert all(w in res.warnings for w in others)


def test_faithful_warns_with_names():
    warned = {m.group(1) for w in simulate(rich_spec()).warnings
              for m in [re.match(r"quirk (\w+):", w)] if m}
    assert {"phi0_carryover", "triclinic_cstar", "oversample_compounding", "thickness_layers",
            "ratio_ignores_twotheta", "water_fluence_squared"} <= warned
    assert warned <= set(quirks.NAMES)
    assert not [w for w in simulate(rich_spec(quirks="physical")).warnings if w.startswith("quirk")]


def test_front_end_quirk_switches():
    argv = BASE + CUBIC + ["-twotheta_axis", "2", "0", "1", "-misset_seed", "3", "-N", "5", "-phi", "0"]
    p = parse_argv(argv)
    assert p.spec.detector.twotheta_deg == 2.0 and p.spec.crystal.misset_deg == [3.0, 0.0, 5.0]
    assert any("quirk twotheta_axis_sets_twotheta" in w for w in p.warnings)
    assert any("quirk misset_seed_reads_misset" in w for w in p.warnings)
    p = parse_argv(argv + ["--fix", "twotheta_axis_sets_twotheta,misset_seed_reads_misset"])
    assert p.spec.detector.twotheta_deg == 0.0 and p.spec.crystal.misset_deg is None
    assert p.warnings == []
    p = parse_argv(argv + ["--fix", "misset_seed_reads_misset"])
    assert p.spec.detector.twotheta_deg == 2.0 and p.spec.crystal.misset_deg is None


def test_hash_uses_the_effective_set():
    spec = rich_spec()
    h = config_hash(spec)
    assert config_hash(rich_spec(fix=[])) == h
    assert config_hash(rich_spec(quirks="physical")) == config_hash(rich_spec(fix=list(quirks.NAMES)))
    assert config_hash(rich_spec(quirks="physical")) == config_hash(
        rich_spec(quirks="physical", fix=["phi0_carryover"]))
    a = config_hash(rich_spec(fix=["phi0_carryover", "oversample_compounding"]))
    assert a == config_hash(rich_spec(fix=["oversample_compounding", "phi0_carryover"]))
    assert len({h, a, config_hash(rich_spec(fix=["phi0_carryover"])),
                config_hash(rich_spec(quirks="physical"))}) == 4


def test_mixed_layout_kernel_agrees_with_the_per_row_kernel(monkeypatch):
    """The general (running-sum) kernel with every factor quirk fixed computes what the per-row kernel
    of quirks=physical computes (water background included), up to summation order."""
    import torch

    from nbsim import engine
    from nbsim.experiment import build_model
    m = build_model(rich_spec(quirks="physical"))
    assert engine.layout_kind(m) == "inner"
    idx = torch.arange(m.fpixels * m.spixels)
    on = torch.tensor(False)
    ref, _ = engine.render(m, idx, on)
    monkeypatch.setattr(engine, "layout_kind", lambda m: "mixed")
    got, _ = engine.render(m, idx, on)
    assert ref.max() > 0 and m.bg_physical > 0
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# parity with the upstream branches (needs_c)
# ---------------------------------------------------------------------------------------------

PHI0_CASES = {
    "phi0_tri_mosaic": TRI + ["-phi", "0", "-osc", "3", "-phisteps", "3", "-mosaic", "0.5",
                              "-mosaic_dom", "4"],
    "phi0_cubic_mosaic": CUBIC + ["-phi", "0", "-osc", "1", "-phisteps", "4", "-mosaic", "1",
                                  "-mosaic_dom", "5"],
    "phi_crosses_zero_mosaic": TRI + ["-phi", "-1", "-osc", "2", "-phisteps", "2", "-mosaic", "0.3",
                                      "-mosaic_dom", "3"],
}
OVERSAMPLE_CASES = {
    "os_thick_polar_omega_div": CUBIC + ["-detector_thick", "100", "-thicksteps", "3", "-oversample",
                                         "2", "-oversample_thick", "-oversample_polar",
                                         "-oversample_omega", "-divergence", "1", "-divsteps", "3",
                                         "-twotheta", "10"],
    "os_thick_hvdiv": TRI + ["-detector_thick", "200", "-thicksteps", "2", "-oversample", "2",
                             "-oversample_thick", "-hdivrange", "1", "-vdivrange", "1", "-hdivsteps",
                             "2", "-vdivsteps", "2"],
    "os_polar_omega_div": TRI + ["-oversample", "3", "-oversample_polar", "-oversample_omega",
                                 "-divergence", "2", "-divsteps", "3", "-polar", "0.6"],
    "os_omega_thick_div": CUBIC + ["-detector_thick", "100", "-thicksteps", "3", "-oversample", "2",
                                   "-oversample_omega", "-divergence", "1", "-divsteps", "2"],
}
OUTS = ["-floatfile", "float.bin", "-nopgm", "-nonoise", "-noprogress"]


def _binary(var):
    b = os.environ.get(var)
    if not b or not Path(b).is_file():
        pytest.skip(f"{var} not set: C build unavailable")
    return b


def _float_image(cmd, args, workdir, threads=1):
    workdir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.run(cmd + args + OUTS, cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (cmd, p.stdout[-800:], p.stderr[-800:])
    img = np.fromfile(workdir / "float.bin", dtype="<f4").astype(np.float64)
    shutil.rmtree(workdir)
    return img


NB = [sys.executable, "-m", "nbsim.nanobragg"]


@pytest.mark.needs_c
@pytest.mark.parametrize("case,var,name", [(c, "NB_C_BIN_FIX_PHI0", "phi0_carryover") for c in PHI0_CASES]
                         + [(c, "NB_C_BIN_FIX_OVERSAMPLE", "oversample_compounding")
                            for c in OVERSAMPLE_CASES])
def test_single_fix_equals_upstream_branch(case, var, name, tmp_path):
    branch = _binary(var)
    args = BASE + {**PHI0_CASES, **OVERSAMPLE_CASES}[case]
    ref = _float_image([branch], args, tmp_path / "c")
    got = _float_image(NB + ["--fix", name], args, tmp_path / "nb")
    faithful = _float_image(NB, args, tmp_path / "nb_faithful")
    assert ref.max() > 0 and np.abs(faithful - got).max() > 0     # the case exercises the quirk
    assert np.abs(got - ref).max() == 0
    if name == "phi0_carryover":        # the fixed branch no longer depends on thread order
        assert np.abs(_float_image([branch], args, tmp_path / "c2", threads=2) - ref).max() == 0


@pytest.mark.needs_c
@pytest.mark.parametrize("case", sorted({**PHI0_CASES, **OVERSAMPLE_CASES}))
def test_faithful_equals_main_on_the_fix_cases(case, tmp_path):
    main = _binary("NB_C_BIN")
    args = BASE + {**PHI0_CASES, **OVERSAMPLE_CASES}[case]
    ref = _float_image([main], args, tmp_path / "c")
    got = _float_image(NB, args, tmp_path / "nb")
    assert ref.max() > 0 and np.abs(got - ref).max() == 0
