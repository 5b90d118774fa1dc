"""Structure factors from MTZ files and atomic models (issue 13, "Structure factors").

* An MTZ written here (with gemmi) from the golden ``P1.hkl`` gives the image of ``-hkl P1.hkl``,
  bit for bit (max |diff| = 0), through the front end and the API, and equals the C reference image.
* An MTZ holding only the asymmetric unit of a non-P1 space group is expanded to the full P1 table.
* F from a small model (written here with gemmi) equals gemmi's own calculation at every P1
  reflection, and with f'/f'' the textbook sum over the atoms and their symmetry images.
* Bad MTZ files and models give one line naming the flag/key and the file, exit status 2, nothing
  written.
* The configuration hash covers the contents of MTZ and model files.
Nothing is downloaded: every file is written by the tests.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

gemmi = pytest.importorskip("gemmi")

import golden_data  # noqa: E402
from nbsim.io.structure_factors import expand_to_p1, read_mtz  # noqa: E402
from nbsim.io.tables import hkl_table, parse_hkl  # noqa: E402

GOLDEN_INPUTS = golden_data.GOLDEN / "inputs"


# ---------------------------------------------------------------------------------------------
# helpers: files written with gemmi
# ---------------------------------------------------------------------------------------------

def write_mtz(path, hkl, columns: dict, spacegroup="P 1", cell=(50, 60, 70, 90, 90, 90)):
    """An MTZ file with H K L and ``columns`` {label: (type, values)} (values as float32)."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(spacegroup)
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    mtz.add_dataset("sim")
    for label, (typ, _) in columns.items():
        mtz.add_column(label, typ)
    data = np.column_stack([np.asarray(hkl, float)] + [np.asarray(v, float) for _, v in columns.values()])
    mtz.set_data(data.astype(np.float32))
    mtz.write_to_file(str(path))
    return Path(path)


ATOMS = [("Fe", (3.0, 4.0, 5.0), 15.0, 1.0), ("S", (8.0, 2.5, 11.0), 20.0, 1.0),
         ("O", (1.0, 9.0, 3.0), 25.0, 0.7), ("N", (12.0, 13.0, 7.0), 22.0, 1.0),
         ("C", (5.0, 15.0, 20.0), 18.0, 1.0)]
MODEL_CELL = (30.0, 35.0, 40.0, 90.0, 90.0, 90.0)


def make_structure(atoms=ATOMS, cell=MODEL_CELL, spacegroup="P 21 21 21"):
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(*cell)
    st.spacegroup_hm = spacegroup
    model, chain = gemmi.Model("1"), gemmi.Chain("A")
    for i, (el, xyz, b, occ) in enumerate(atoms):
        res = gemmi.Residue()
        res.name, res.seqid = "LIG", gemmi.SeqId(i + 1, " ")
        a = gemmi.Atom()
        a.name, a.element, a.pos, a.b_iso, a.occ = el.upper(), gemmi.Element(el), gemmi.Position(*xyz), b, occ
        res.add_atom(a)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st


def write_pdb(path, **kw) -> Path:
    make_structure(**kw).write_pdb(str(path))
    return Path(path)


def write_cif(path, **kw) -> Path:
    make_structure(**kw).make_mmcif_document().write_file(str(path))
    return Path(path)


def golden_p1():
    return parse_hkl(GOLDEN_INPUTS / "P1.hkl")


def table_of(hkl, F):
    """(ranges, dense, listed) of rows, as nbsim.inputs builds them."""
    ranges, dense = hkl_table(hkl, F, 0.0)
    listed = hkl_table(hkl, np.ones(len(F)), 0.0)[1] != 0
    return ranges, dense, listed


# ---------------------------------------------------------------------------------------------
# MTZ from the golden P1.hkl: the same image, bit for bit
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def golden_workdir(tmp_path, monkeypatch):
    golden_data.copy_inputs(tmp_path)
    hkl, F = golden_p1()
    write_mtz(tmp_path / "P1.mtz", hkl, {"FP": ("F", F)})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_mtz_table_equals_the_text_table(golden_workdir):
    from nbsim.frontend import parse_argv
    from nbsim.inputs import load_inputs
    base = ["-mat", "A.mat", "-lambda", "1", "-N", "2", "-distance", "90", "-detpixels", "16"]
    txt = load_inputs(parse_argv(base + ["-hkl", "P1.hkl"]).spec, golden_workdir).structure_factors
    mtz = load_inputs(parse_argv(base + ["-hkl", "P1.mtz"]).spec, golden_workdir).structure_factors
    assert mtz.source.name == "P1.mtz" and txt.source.name == "P1.hkl"
    assert mtz.ranges == txt.ranges == (-8, 8, -8, 8, -8, 8)
    assert mtz.count == txt.count == 4913
    assert np.array_equal(mtz.listed, txt.listed)
    assert np.abs(mtz.dense - txt.dense).max() == 0.0
    # the MTZ holds float32: read without the shortest-decimal rule the numbers would differ
    assert np.abs(txt.dense.astype(np.float32).astype(np.float64) - txt.dense).max() > 0


@pytest.mark.parametrize("case_id", ["G20_hkl_interp", "G03_mat_hkl"])
def test_mtz_image_bit_identical_api(golden_workdir, case_id):
    from nbsim.api import simulate
    from nbsim.frontend import parse_argv
    args = golden_data.case(case_id)["args"]
    assert "P1.hkl" in args
    mtz_args = [("P1.mtz" if a == "P1.hkl" else a) for a in args]
    ref = simulate(parse_argv(args).spec, base_dir=golden_workdir).float32()
    res = simulate(parse_argv(mtz_args).spec, base_dir=golden_workdir)
    img = res.float32()
    assert any("column FP of P1.mtz" in w for w in res.warnings)           # the MTZ was read
    assert img.max() > 0 and np.count_nonzero(img) > 100
    assert np.abs(img - ref).max() == 0.0
    golden_data.assert_bit_identical(img, case_id, "MTZ written from P1.hkl")


def test_mtz_image_bit_identical_frontend(golden_workdir):
    from nbsim.nanobragg import main
    args = golden_data.case("G20_hkl_interp")["args"]
    mtz_args = [("P1.mtz" if a == "P1.hkl" else a) for a in args]
    out = ["-nopgm", "-nonoise", "-noprogress"]
    assert main(args + out + ["-floatfile", "txt.bin", "-dump", "txt.dump"]) == 0
    assert main(mtz_args + out + ["-floatfile", "mtz.bin", "-dump", "mtz.dump", "-mtz_column", "FP"]) == 0
    a = np.fromfile(golden_workdir / "txt.bin", np.float32)
    b = np.fromfile(golden_workdir / "mtz.bin", np.float32)
    assert a.size == 160 * 160 and a.max() > 0
    assert np.abs(a - b).max() == 0.0
    # the Fdump cache written from the MTZ is the one written from the text table
    assert (golden_workdir / "mtz.dump").read_bytes() == (golden_workdir / "txt.dump").read_bytes()


def test_mtz_column_choice(tmp_path):
    hkl, F = golden_p1()
    two = write_mtz(tmp_path / "two.mtz", hkl, {"FC": ("F", 2 * F), "FP": ("F", F), "SIGFP": ("Q", F / 10)})
    with pytest.raises(ValueError, match=r"several amplitude \(type F\) columns \(FC, FP\)"):
        read_mtz(two)
    got_hkl, got_F = read_mtz(two, "FP")[:2]
    assert np.array_equal(got_hkl, hkl) and np.abs(got_F - F).max() == 0.0
    assert np.abs(read_mtz(two, "FC")[1] - 2 * F).max() == 0.0
    # a reflection listed twice: the later row wins (as in a text table)
    dup = write_mtz(tmp_path / "dup.mtz", np.vstack([hkl[:3], hkl[:1]]), {"FP": ("F", [1.5, 2.5, 3.5, 4.5])})
    got = dict(zip(map(tuple, read_mtz(dup)[0]), read_mtz(dup)[1]))
    assert got[tuple(hkl[0])] == 4.5 and got[tuple(-hkl[0])] == 4.5 and got[tuple(hkl[1])] == 2.5
    # missing values (NaN) are not listed
    Fm = F.copy()
    Fm[::7] = np.nan
    part = write_mtz(tmp_path / "part.mtz", hkl, {"F": ("F", Fm)})
    got_hkl, got_F = read_mtz(part)[:2]
    keep = ~np.isnan(Fm)
    # the Friedel mates of the missing reflections come back from their listed mates
    want = {tuple(h): f for h, f in zip(hkl[keep], F[keep])}
    for h, f in zip(hkl[keep], F[keep]):
        want.setdefault(tuple(-h), f)
    assert {tuple(h): f for h, f in zip(got_hkl, got_F)} == want


# ---------------------------------------------------------------------------------------------
# anomalous pairs and intensities
# ---------------------------------------------------------------------------------------------

def _as_dict(hkl, F):
    return {tuple(map(int, h)): float(f) for h, f in zip(hkl, F)}


def _p1_halves():
    """The golden P1 table split as an anomalous P1 MTZ lists it: the rows of gemmi's P1 reciprocal
    ASU (a half sphere), F(+) = F(h) and F(-) = F(-h) as the table gives them (they differ)."""
    hkl, F = golden_p1()
    value = _as_dict(hkl, F)
    asu = gemmi.ReciprocalAsu(gemmi.SpaceGroup("P 1"))
    half = np.array([h for h in hkl if asu.is_in(list(map(int, h)))])
    plus = np.array([value[tuple(h)] for h in half])
    minus = np.array([value[tuple(-h)] for h in half])
    return half, plus, minus


def test_mtz_anomalous_pair_is_the_p1_table(tmp_path):
    """F(+) goes to (h k l) and F(-) to (-h -k -l): a P1 anomalous MTZ written from the golden P1
    table's two halves reads back as that table, Bijvoet mates differing as written."""
    hkl, F = golden_p1()
    half, plus, minus = _p1_halves()
    assert 2 * len(half) == len(hkl) + 1 and np.abs(plus - minus).max() > 1     # 000 is its own mate
    path = write_mtz(tmp_path / "anom.mtz", half, {"F(+)": ("G", plus), "SIGF(+)": ("L", plus / 10),
                                                   "F(-)": ("G", minus), "SIGF(-)": ("L", minus / 10)})
    want = _as_dict(hkl, F)
    for column in ("F(+),F(-)", "F(+)", "F(-)", " F(+) , F(-) "):
        t = read_mtz(path, column)
        assert (t.label, t.kind, t.missing, t.negative) == ("F(+),F(-)", "G", 0, 0)
        assert _as_dict(t.hkl, t.F) == want
    got = _as_dict(*read_mtz(path, "F(+),F(-)")[:2])
    differ = [h for h in half if got[tuple(h)] != got[tuple(-h)]]
    assert len(differ) > 0.9 * len(half)
    # the pair read the other way round swaps the Bijvoet mates
    swapped = _as_dict(*read_mtz(path, "F(-),F(+)")[:2])
    assert all(swapped[tuple(h)] == got[tuple(-h)] for h in half)


@pytest.mark.parametrize("sg_name, cell", [("P 21 21 21", (50, 60, 70, 90, 90, 90)),
                                           ("C 1 2 1", (60, 50, 70, 90, 100, 90))])
def test_mtz_anomalous_pair_expands_to_p1(tmp_path, sg_name, cell):
    """An anomalous ASU in a space group: every P1 reflection takes F(+) of its ASU representative when
    gemmi's to_asu reaches it with a proper operation (odd ISYM), F(-) when through a Friedel mate
    (even ISYM); centric reflections have F(+) = F(-). Also what gemmi's own Mtz.expand_to_p1 gives
    (F(+) at h, F(-) at -h). Missing F(-) values stay unlisted and are counted."""
    sg = gemmi.SpaceGroup(sg_name)
    ops = sg.operations()
    asu = gemmi.ReciprocalAsu(sg)
    r = np.arange(-6, 7)
    box = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    box = box[[np.any(h != 0) and not ops.is_systematically_absent(list(map(int, h))) for h in box]]
    rows = np.array(sorted({tuple(asu.to_asu(list(map(int, h)), ops)[0]) for h in box}))
    rng = np.random.default_rng(3)
    plus = np.round(rng.uniform(10, 500, len(rows)), 2)
    minus = np.round(plus * rng.uniform(0.8, 1.2, len(rows)), 2)
    centric = np.array([ops.is_reflection_centric(list(map(int, h))) for h in rows])
    minus[centric] = plus[centric]
    assert centric.any() and (~centric).any()
    path = write_mtz(tmp_path / "anom.mtz", rows, {"F(+)": ("G", plus), "F(-)": ("G", minus)},
                     spacegroup=sg_name, cell=cell)
    t = read_mtz(path, "F(+),F(-)")
    got = _as_dict(t.hkl, t.F)
    fp, fm = dict(zip(map(tuple, rows), plus)), dict(zip(map(tuple, rows), minus))
    want = {}
    for h in box:
        rep, isym = asu.to_asu(list(map(int, h)), ops)
        want[tuple(h)] = (fp if isym % 2 == 1 else fm)[tuple(rep)]
    assert got == want
    assert any(got[tuple(h)] != got[tuple(-h)] for h in box)
    mtz = gemmi.read_mtz_file(str(path))
    mtz.expand_to_p1()
    arr = np.asarray(mtz.array)
    g = {}
    for h, a, b in zip(arr[:, :3].astype(int), arr[:, 3], arr[:, 4]):
        g[tuple(h)] = float(np.float32(a).astype(str))
        g[tuple(-h)] = float(np.float32(b).astype(str))
    assert g == got
    # F(-) missing at the acentric rows: -h is not listed (default_F there), and the note says how many
    minus_nan = minus.copy()
    minus_nan[~centric] = np.nan
    path = write_mtz(tmp_path / "part.mtz", rows, {"F(+)": ("G", plus), "F(-)": ("G", minus_nan)},
                     spacegroup=sg_name, cell=cell)
    t = read_mtz(path, "F(+)")
    assert t.missing == int((~centric).sum())
    is_centric = dict(zip(map(tuple, rows), centric))
    want_part = {}
    for h in box:
        rep, isym = asu.to_asu(list(map(int, h)), ops)
        if isym % 2 == 1 or is_centric[tuple(rep)]:
            want_part[tuple(h)] = want[tuple(h)]
    assert _as_dict(t.hkl, t.F) == want_part and len(want_part) < len(want)
    from nbsim.io.structure_factors import mtz_note
    assert f"; {t.missing} missing values skipped" in mtz_note(t, "part.mtz")


def _intensity_mtz(tmp_path, name="I.mtz"):
    hkl, F = golden_p1()
    return write_mtz(tmp_path / name, hkl, {"IMEAN": ("J", F * F), "SIGIMEAN": ("Q", F)}), hkl, F


def test_mtz_intensities_give_the_text_table(tmp_path):
    """I = F^2 of the golden P1.hkl, as float32 in an MTZ: F = the shortest decimal whose square
    rounds to I is the table's F, every one (max |diff| = 0); sqrt(I) itself, in float64 or rounded
    to float32, differs (within a float32 ulp)."""
    from nbsim.io.structure_factors import shortest_float64, shortest_root
    path, hkl, F = _intensity_mtz(tmp_path)
    t = read_mtz(path, "IMEAN")
    assert (t.kind, t.label, t.missing, t.negative) == ("J", "IMEAN", 0, 0)
    assert np.array_equal(t.hkl, hkl) and np.abs(t.F - F).max() == 0.0
    I32 = (F * F).astype(np.float32)
    for plain in (np.sqrt(I32.astype(np.float64)), shortest_float64(np.sqrt(I32.astype(np.float64)).astype(np.float32))):
        assert np.abs(plain - F).max() > 0 and np.abs(plain / F - 1).max() < 2.0 ** -22     # 1 float32 ulp
    # the rule: every F squares to the stored I; zero stays zero; a long decimal is kept to 1e-7
    x = np.array([0.0, 1.0, 2.0, 0.5, 1e-3, 3.14159265358979, 12345.678, 1e5 / 3, 7e12])
    i32 = (x * x).astype(np.float32)
    r = shortest_root(i32)
    assert r[0] == 0.0 and np.all((r * r).astype(np.float32) == i32)
    assert np.all(np.abs(r[1:] / x[1:] - 1) < 1e-7)
    assert list(r[[1, 2, 3, 4, 6]]) == [1.0, 2.0, 0.5, 1e-3, 12345.678]
    # the anomalous intensities of the golden table's halves
    half, plus, minus = _p1_halves()
    pair = write_mtz(tmp_path / "Ipm.mtz", half, {"I(+)": ("K", plus ** 2), "I(-)": ("K", minus ** 2)})
    t = read_mtz(pair, "I(+)")
    assert (t.kind, t.label) == ("K", "I(+),I(-)")
    assert _as_dict(t.hkl, t.F) == _as_dict(hkl, F)


def test_mtz_negative_intensities_read_as_zero(tmp_path):
    hkl, F = golden_p1()
    I = F * F
    I[::10] = -I[::10] / 100
    I[1::10] = np.nan
    path = write_mtz(tmp_path / "neg.mtz", hkl, {"IMEAN": ("J", I)})
    t = read_mtz(path, "IMEAN")
    n_neg, n_nan = len(I[::10]), len(I[1::10])
    assert (t.negative, t.missing) == (n_neg, n_nan)
    got = _as_dict(t.hkl, t.F)
    assert all(got[tuple(h)] == 0.0 for h in hkl[::10])
    from nbsim.io.structure_factors import mtz_note
    note = mtz_note(t, "neg.mtz")
    assert f"{n_neg} negative intensities read as F = 0" in note and f"{n_nan} missing values" in note
    assert "(intensities, F = sqrt(I))" in note


@pytest.mark.parametrize("case_id", ["G20_hkl_interp", "G03_mat_hkl"])
def test_mtz_intensity_and_anomalous_images_bit_identical(golden_workdir, case_id):
    """An intensity MTZ (I = F^2) and an anomalous MTZ (the table's halves as F(+), F(-)) made from
    the golden P1.hkl give the image of -hkl P1.hkl bit for bit (max |diff| = 0)."""
    from nbsim.api import simulate
    from nbsim.frontend import parse_argv
    _intensity_mtz(golden_workdir)
    half, plus, minus = _p1_halves()
    write_mtz(golden_workdir / "anom.mtz", half, {"F(+)": ("G", plus), "F(-)": ("G", minus)})
    args = golden_data.case(case_id)["args"]
    ref = simulate(parse_argv(args).spec, base_dir=golden_workdir).float32()
    for name, column, note in (("I.mtz", "IMEAN", "column IMEAN (intensities"),
                               ("anom.mtz", "F(+),F(-)", "column F(+),F(-) (anomalous pair")):
        words = [(name if a == "P1.hkl" else a) for a in args] + ["-mtz_column", column]
        res = simulate(parse_argv(words).spec, base_dir=golden_workdir)
        img = res.float32()
        assert any(note in w for w in res.warnings), res.warnings
        assert img.max() > 0 and np.abs(img - ref).max() == 0.0, name


# ---------------------------------------------------------------------------------------------
# expansion to P1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sg_name, cell", [("P 43 21 2", (50, 50, 70, 90, 90, 90)),
                                           ("C 1 2 1", (60, 50, 70, 90, 100, 90)),
                                           ("P 1", (50, 60, 70, 80, 85, 95))])
def test_asu_mtz_expands_to_the_p1_table(tmp_path, sg_name, cell):
    """A symmetric P1 table (every reflection of the golden P1.hkl box takes the value of its
    reciprocal-ASU representative, found with gemmi's to_asu, i.e. independently of the expansion)
    written as its ASU only, in a space group, is read back as the whole P1 table."""
    sg = gemmi.SpaceGroup(sg_name)
    ops = sg.operations()
    asu = gemmi.ReciprocalAsu(sg)
    hkl, F = golden_p1()
    value = {tuple(h): f for h, f in zip(hkl, F.astype(np.float32).astype(str).astype(float))}
    rep = [tuple(asu.to_asu(list(map(int, h)), ops)[0]) for h in hkl]
    inside = [r in value for r in rep]                      # representative inside the -8..8 box
    box = hkl[inside]
    if sg_name.startswith("C"):                              # drop the centring-absent reflections
        keep = [not ops.is_systematically_absent(list(map(int, h))) for h in box]
        box = box[keep]
    rep_box = [tuple(asu.to_asu(list(map(int, h)), ops)[0]) for h in box]
    want_F = np.array([value[r] for r in rep_box])
    asu_rows = np.array(sorted(set(rep_box)))
    asu_F = np.array([value[tuple(r)] for r in asu_rows])
    path = write_mtz(tmp_path / "asu.mtz", asu_rows, {"FP": ("F", asu_F)}, spacegroup=sg_name, cell=cell)
    got_hkl, got_F, got_cell, got_sg, label = read_mtz(path)[:5]
    assert label == "FP" and got_sg == sg.hm
    assert len(asu_rows) < len(box) or sg_name == "P 1"
    assert len(got_hkl) == len(box)
    got = table_of(got_hkl, got_F)
    want = table_of(box, want_F)
    assert got[0] == want[0]
    assert np.array_equal(got[2], want[2])
    assert np.abs(got[1] - want[1]).max() == 0.0
    # and gemmi's own expansion (plus Friedel mates) gives the same reflections and amplitudes
    mtz = gemmi.read_mtz_file(str(path))
    mtz.expand_to_p1()
    arr = np.asarray(mtz.array)
    g = {}
    for h, f in zip(arr[:, :3].astype(int), arr[:, 3].astype(np.float32).astype(str).astype(float)):
        g.setdefault(tuple(h), f)
        g.setdefault(tuple(-h), f)
    assert g == {tuple(h): f for h, f in zip(got_hkl, got_F)}


def test_expand_to_p1_listed_rows_win():
    """A listed reflection keeps its value even where a symmetry mate of another listed one lands."""
    R = [op.rot for op in gemmi.SpaceGroup("P 2 2 2").operations().sym_ops]
    hkl = np.array([[1, 2, 3], [-1, -2, 3]])
    F = np.array([10.0, 20.0])
    got = dict(zip(map(tuple, expand_to_p1(hkl, F, R)[0]), expand_to_p1(hkl, F, R)[1]))
    assert got[(1, 2, 3)] == 10.0 and got[(-1, -2, 3)] == 20.0
    assert got[(1, -2, -3)] == 10.0 and got[(-1, 2, -3)] == 10.0      # mates of the first row
    assert got[(-1, -2, -3)] == 10.0                                   # Friedel mate of the first
    assert len(got) == 8


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

MODEL_ARGS = ["-cell", *map(str, MODEL_CELL), "-lambda", "1.74", "-N", "3", "-distance", "100",
              "-detpixels", "48", "-pixel", "0.5"]


def _model_table(tmp_path, model, extra=()):
    from nbsim.frontend import parse_argv
    from nbsim.inputs import load_inputs
    spec = parse_argv(MODEL_ARGS + ["-model", str(model), *extra], cwd=str(tmp_path)).spec
    inputs = load_inputs(spec, tmp_path)
    sf = inputs.structure_factors
    idx = np.argwhere(sf.listed)
    hkl = idx + np.array(sf.ranges[::2])
    return spec, inputs, hkl, sf.dense[sf.listed]


def _d_spacing(cell, hkl):
    uc = gemmi.UnitCell(*cell)
    return np.array([uc.calculate_d(list(map(int, h))) for h in hkl])


@pytest.mark.parametrize("writer", [write_pdb, write_cif], ids=["pdb", "mmcif"])
def test_model_F_equals_gemmi(tmp_path, writer):
    model = writer(tmp_path / ("m.pdb" if writer is write_pdb else "m.cif"))
    spec, inputs, hkl, F = _model_table(tmp_path, model, ["-model_dmin", "2.45"])
    # the listed reflections: every h != 000 with d >= 2.45 A (enumerated here over a box; no d is
    # within rounding of 2.45, where gemmi and this enumeration could disagree)
    r = np.arange(-17, 18)
    box = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    box = box[np.any(box != 0, axis=1)]
    d = 1.0 / np.sqrt(((box / np.array(MODEL_CELL[:3])) ** 2).sum(1))
    assert np.abs(d - 2.45).min() > 1e-6
    assert {tuple(h) for h in box[d >= 2.45]} == {tuple(h) for h in hkl}
    # |F| equals gemmi's direct summation at every P1 reflection
    st = gemmi.read_structure(str(model))
    st.setup_cell_images()
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    ref = np.array([abs(calc.calculate_sf_from_model(st[0], list(map(int, h)))) for h in hkl])
    assert ref.max() > 10
    np.testing.assert_allclose(F, ref, rtol=1e-12, atol=1e-12 * ref.max())
    # no anomalous scattering: Friedel mates are equal
    table = {tuple(h): f for h, f in zip(hkl, F)}
    assert all(table[tuple(-h)] == f for h, f in zip(hkl, F))


@pytest.mark.parametrize("sg_name, cell", [("C 1 2 1", (30.0, 35.0, 40.0, 90.0, 103.0, 90.0)),
                                           ("P 1", (30.0, 35.0, 40.0, 80.0, 95.0, 105.0))])
def test_model_F_equals_gemmi_aniso_charges_blocks(tmp_path, monkeypatch, sg_name, cell):
    """The vectorised sum equals gemmi's calculate_sf_from_model (complex) with an anisotropic atom
    (ANISOU), a charged atom, partial occupancy, centring translations and a triclinic cell; and
    atom images split in blocks of 2 give the same F to rounding."""
    from nbsim.io import sf_kernel
    from nbsim.io.structure_factors import model_sf_complex
    st = make_structure(cell=cell, spacegroup=sg_name)
    st[0][0][0][0].aniso = gemmi.SMat33f(0.2, 0.3, 0.25, 0.01, -0.02, 0.03)
    st[0][0][1][0].charge = -2
    st.write_pdb(str(tmp_path / "m.pdb"))
    st = gemmi.read_structure(str(tmp_path / "m.pdb"))
    assert st[0][0][0][0].aniso.nonzero() and st[0][0][1][0].charge == -2
    st.setup_cell_images()
    hkl = np.asarray(gemmi.make_miller_array(st.cell, gemmi.SpaceGroup("P 1"), 2.5, 0.0, False))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    ref = np.array([calc.calculate_sf_from_model(st[0], h) for h in hkl.tolist()])
    els = sorted({c.atom.element.name for c in st[0].all()})
    zero = np.zeros(len(els))
    A, B = model_sf_complex(st, st[0], els, hkl, zero, zero)
    assert np.abs(ref).max() > 10 and np.abs(B).max() == 0.0
    assert np.abs(A - ref).max() <= 1e-12 * np.abs(ref).max()
    big = np.abs(ref) > 1e-3 * np.abs(ref).max()
    np.testing.assert_allclose(np.abs(A[big]), np.abs(ref[big]), rtol=1e-12)
    monkeypatch.setattr(sf_kernel, "BLOCK", 2)
    A2, _ = model_sf_complex(st, st[0], els, hkl, zero, zero)
    assert np.abs(A2 - A).max() <= 1e-13 * np.abs(ref).max()
    # and through the reader: |F| at every P1 reflection
    from nbsim.io.structure_factors import model_structure_factors
    got_hkl, got_F = model_structure_factors(tmp_path / "m.pdb", 1.0, 2.5)[:2]
    want = dict(zip(map(tuple, hkl), np.abs(ref)))
    assert len(got_hkl) == len(want)
    w = np.array([want[tuple(h)] for h in got_hkl])
    np.testing.assert_allclose(got_F, w, rtol=1e-12, atol=1e-12 * w.max())


def _textbook_F(st, hkl, energy_eV):
    """sum over atoms and symmetry images of occ (f0(s) + f' + i f'') exp(-B s^2/4) exp(2 pi i h.x)."""
    ops = st.find_spacegroup().operations()
    out = np.zeros(len(hkl), complex)
    s2 = np.array([st.cell.calculate_1_d2(list(map(int, h))) for h in hkl])          # 1/d^2
    for cra in st[0].all():
        a = cra.atom
        fp, fdp = gemmi.cromer_liberman(a.element.atomic_number, energy_eV)
        f0 = np.array([a.element.it92.calculate_sf(x / 4) for x in s2])
        frac = st.cell.fractionalize(a.pos)
        for op in ops:
            x = np.array(op.apply_to_xyz([frac.x, frac.y, frac.z]))
            out += (a.occ * (f0 + fp + 1j * fdp) * np.exp(-a.b_iso * s2 / 4)
                    * np.exp(2j * math.pi * (hkl @ x)))
    return np.abs(out)


def test_model_anomalous_F_equals_textbook_sum(tmp_path):
    model = write_pdb(tmp_path / "m.pdb")
    spec, inputs, hkl, F = _model_table(tmp_path, model, ["-model_dmin", "4", "-model_anomalous"])
    st = gemmi.read_structure(str(model))
    ref = _textbook_F(st, hkl, 12398.42 / 1.74)
    np.testing.assert_allclose(F, ref, rtol=1e-6, atol=1e-9 * ref.max())   # absences: ~1e-14
    table = {tuple(h): f for h, f in zip(hkl, F)}
    bijvoet = np.array([table[tuple(h)] - table[tuple(-h)] for h in hkl])
    assert np.abs(bijvoet).max() > 0.1                     # Fe at 1.74 A: f'' ~ 3.9 e
    # without f'/f'' the same sum with f' = f'' = 0
    spec0, _, hkl0, F0 = _model_table(tmp_path, model, ["-model_dmin", "4"])
    assert not np.allclose(np.sort(F0), np.sort(F))


def test_model_resolution_covers_the_detector(tmp_path):
    """Without -model_dmin, the reflections reach beyond the highest resolution of any pixel."""
    from nbsim.geometry import detector_geometry
    from nbsim.inputs import detector_dmin_A
    model = write_pdb(tmp_path / "m.pdb")
    spec, inputs, hkl, F = _model_table(tmp_path, model)
    info = detector_geometry(spec.detector, spec.beam, spec.crystal).report.to_dict()
    px = info["pixel_mm"] * 1e-3
    f, s = np.meshgrid(np.arange(info["fpixels"] + 1), np.arange(info["spixels"] + 1))
    pos = (np.array(info["pix0_m"]) + f[..., None] * px * np.array(info["fdet"])
           + s[..., None] * px * np.array(info["sdet"]))
    cos2t = np.clip((pos @ np.array(info["beam"])) / np.linalg.norm(pos, axis=-1), -1, 1)
    with np.errstate(divide="ignore"):                     # the pixel on the beam: d = inf
        d_pixels = spec.beam.wavelength_A / (2 * np.sin(np.arccos(cos2t) / 2))
    assert detector_dmin_A(spec) <= d_pixels.min() < 1.05 * detector_dmin_A(spec)
    assert _d_spacing(MODEL_CELL, hkl).min() < d_pixels.min()
    # every hkl with d >= the detector's d_min is listed
    r = np.arange(-25, 26)
    box = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    box = box[np.any(box != 0, axis=1)]
    d = 1.0 / np.sqrt(((box / np.array(MODEL_CELL[:3])) ** 2).sum(1))
    assert {tuple(h) for h in box[d >= d_pixels.min()]} <= {tuple(h) for h in hkl}


def test_model_image_through_frontend_and_api(tmp_path, monkeypatch):
    from nbsim.api import simulate
    from nbsim.frontend import parse_argv
    from nbsim.nanobragg import main
    model = write_pdb(tmp_path / "m.pdb")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Fdump.bin").write_bytes(b"not read with -model")
    args = MODEL_ARGS + ["-model", "m.pdb", "-model_dmin", "3"]
    assert main(args + ["-floatfile", "fe.bin", "-nopgm", "-nonoise", "-noprogress"]) == 0
    img = np.fromfile(tmp_path / "fe.bin", np.float32).reshape(48, 48)
    api = simulate(parse_argv(args, cwd=str(tmp_path)).spec, base_dir=tmp_path).float32()
    assert img.max() > 0 and np.abs(img - api).max() == 0.0
    assert (tmp_path / "Fdump.bin").read_bytes() == b"not read with -model"


def test_flags_round_trip(tmp_path):
    """-model/-model_dmin/-model_anomalous and -mtz_column are flags of the table; spec_to_argv
    writes them back."""
    from nbsim.frontend import parse_argv
    from nbsim.frontend.to_argv import spec_to_argv
    write_pdb(tmp_path / "m.pdb")
    (tmp_path / "P1.mtz").write_bytes(b"MTZ ")
    for extra in (["-model", "m.pdb", "-model_dmin", "2.5", "-model_anomalous"], ["-hkl", "P1.mtz", "-mtz_column", "FP"]):
        spec = parse_argv(MODEL_ARGS + extra, cwd=str(tmp_path)).spec
        assert parse_argv(spec_to_argv(spec), cwd=str(tmp_path)).spec == spec
    c = parse_argv(MODEL_ARGS + ["-model", "m.pdb", "-model_dmin", "2.5", "-model_anomalous"], cwd=str(tmp_path)).spec.crystal
    assert (c.model_file, c.model_dmin_A, c.model_anomalous, c.fdump_file) == ("m.pdb", 2.5, True, None)


# ---------------------------------------------------------------------------------------------
# the configuration hash covers the contents
# ---------------------------------------------------------------------------------------------

def test_config_hash_covers_mtz_and_model_contents(tmp_path):
    from nbsim.spec import ExperimentSpec
    from pipeline.hashing import config_hash
    hkl, F = golden_p1()
    write_mtz(tmp_path / "a.mtz", hkl, {"FP": ("F", F)})
    write_mtz(tmp_path / "b.mtz", hkl, {"FP": ("F", F * 1.01)})
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "a.mtz", tmp_path / "sub" / "moved.mtz")
    spec = ExperimentSpec()
    spec.crystal.cell_A_deg = [50, 60, 70, 90, 90, 90]

    def h(**kw):
        s = ExperimentSpec()
        s.crystal.cell_A_deg = [50, 60, 70, 90, 90, 90]
        for k, v in kw.items():
            setattr(s.crystal, k, v)
        return config_hash(s, base_dir=tmp_path)

    assert h(hkl_file="a.mtz") == h(hkl_file="sub/moved.mtz")
    assert h(hkl_file="a.mtz") != h(hkl_file="b.mtz")
    assert h(hkl_file="a.mtz", mtz_column="FP") != h(hkl_file="a.mtz")
    write_pdb(tmp_path / "m1.pdb")
    atoms = list(ATOMS)
    atoms[0] = ("Fe", (3.0, 4.0, 5.5), 15.0, 1.0)
    write_pdb(tmp_path / "m2.pdb", atoms=atoms)
    shutil.copy(tmp_path / "m1.pdb", tmp_path / "sub" / "m1.pdb")
    assert h(model_file="m1.pdb") == h(model_file="sub/m1.pdb")
    assert h(model_file="m1.pdb") != h(model_file="m2.pdb")
    assert h(model_file="m1.pdb") != h(model_file="m1.pdb", model_anomalous=True)
    # a stray Fdump.bin is not an input of a model run
    before = h(model_file="m1.pdb")
    (tmp_path / "Fdump.bin").write_bytes(b"x")
    assert h(model_file="m1.pdb") == before


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the flag/key and the file, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

FE_BASE = ["-cell", "30", "35", "40", "90", "90", "90", "-N", "2", "-lambda", "1", "-distance", "100",
           "-detpixels", "32", "-nonoise", "-nopgm"]
APP_BASE = ["detector.fpixels=32", "detector.spixels=32", "crystal.N=2"]


def _bad_files(d: Path):
    hkl, F = golden_p1()
    write_mtz(d / "x.mtz", hkl, {"FP": ("F", F)})
    write_mtz(d / "two.mtz", hkl, {"FP": ("F", F), "FC": ("F", F)})
    write_mtz(d / "int.mtz", hkl, {"IMEAN": ("J", F), "SIGI": ("Q", F)})
    write_mtz(d / "anom.mtz", hkl, {"FP": ("F", F), "F(+)": ("G", F), "F(-)": ("G", F)})
    write_mtz(d / "lone.mtz", hkl, {"F(+)": ("G", F), "FANO": ("G", F)})
    write_mtz(d / "nan.mtz", hkl[:5], {"FP": ("F", np.full(5, np.nan))})
    (d / "corrupt.mtz").write_bytes(b"MTZ " + b"\x00\x01garbage" * 20)
    (d / "x.hkl").write_text("1 2 3 100\n")
    (d / "noatoms.pdb").write_text("CRYST1   30.000   35.000   40.000  90.00  90.00  90.00 P 21 21 21\nEND\n")
    (d / "noatoms.cif").write_text("data_x\n_cell.length_a 30\n_cell.length_b 35\n_cell.length_c 40\n")
    (d / "broken.cif").write_text("data_x\nloop_\n_atom_site.id\n_atom_site.type_symbol\n'unterminated\n")
    (d / "binary.pdb").write_bytes(b"\x00\x01\x02\xff")
    pdb = make_structure()
    pdb.cell = gemmi.UnitCell()
    pdb.write_pdb(str(d / "nocell.pdb"))
    (d / "unknown.pdb").write_text(
        "CRYST1   30.000   35.000   40.000  90.00  90.00  90.00 P 1\n"
        "HETATM    1  XX  UNK A   1       1.000   2.000   3.000  1.00 20.00           X\nEND\n")
    (d / "dir.pdb").mkdir()
    os.mkfifo(d / "fifo.pdb")
    os.mkfifo(d / "fifo.mtz")


BAD = [
    # id, front-end words, Hydra overrides, regex of the message (after "error: ")
    ("mtz_no_column", ["-hkl", "x.mtz", "-mtz_column", "FOO"], ["crystal.hkl_file=x.mtz", "crystal.mtz_column=FOO"],
     r"^(-mtz_column|crystal\.mtz_column): x\.mtz: no column 'FOO' .*the file has H, K, L, FP"),
    ("mtz_no_amplitudes", ["-hkl", "int.mtz"], ["crystal.hkl_file=int.mtz"],
     r"^(-hkl|crystal\.hkl_file): int\.mtz: no amplitude \(type F\) column among H, K, L, IMEAN, SIGI; "
     r"name one with crystal\.mtz_column \(-mtz_column\); usable: IMEAN \(J\)$"),
    ("mtz_ambiguous", ["-hkl", "two.mtz"], ["crystal.hkl_file=two.mtz"],
     r"^(-hkl|crystal\.hkl_file): two\.mtz: several amplitude \(type F\) columns \(FP, FC\)"),
    ("mtz_wrong_type", ["-hkl", "int.mtz", "-mtz_column", "SIGI"], ["crystal.hkl_file=int.mtz", "crystal.mtz_column=SIGI"],
     r"^(-mtz_column|crystal\.mtz_column): int\.mtz: column 'SIGI' .*has MTZ type 'Q', not F or J; accepted: .*usable: IMEAN \(J\)"),
    ("mtz_pair_types", ["-hkl", "anom.mtz", "-mtz_column", "FP,F(-)"], ["crystal.hkl_file=anom.mtz", "crystal.mtz_column='FP,F(-)'"],
     r"^(-mtz_column|crystal\.mtz_column): anom\.mtz: columns 'FP', 'F\(-\)' .*have MTZ types 'F', 'G'; an anomalous pair"),
    ("mtz_pair_missing_column", ["-hkl", "anom.mtz", "-mtz_column", "F(+),FX(-)"],
     ["crystal.hkl_file=anom.mtz", "crystal.mtz_column='F(+),FX(-)'"],
     r"^(-mtz_column|crystal\.mtz_column): anom\.mtz: no column 'FX\(-\)' .*usable: FP \(F\), F\(\+\) \(G\)"),
    ("mtz_partner_missing", ["-hkl", "lone.mtz", "-mtz_column", "F(+)"], ["crystal.hkl_file=lone.mtz", "crystal.mtz_column='F(+)'"],
     r"^(-mtz_column|crystal\.mtz_column): lone\.mtz: no column 'F\(-\)'"),
    ("mtz_unpaired_anomalous", ["-hkl", "lone.mtz", "-mtz_column", "FANO"], ["crystal.hkl_file=lone.mtz", "crystal.mtz_column=FANO"],
     r"^(-mtz_column|crystal\.mtz_column): lone\.mtz: column 'FANO' .*type 'G' .*one of a pair: name both as PLUS,MINUS"),
    ("mtz_three_columns", ["-hkl", "anom.mtz", "-mtz_column", "FP,F(+),F(-)"],
     ["crystal.hkl_file=anom.mtz", "crystal.mtz_column='FP,F(+),F(-)'"],
     r"^(-mtz_column|crystal\.mtz_column): anom\.mtz: crystal\.mtz_column 'FP,F\(\+\),F\(-\)' names 3 columns"),
    ("mtz_all_missing", ["-hkl", "nan.mtz"], ["crystal.hkl_file=nan.mtz"],
     r"^(-hkl|crystal\.hkl_file): nan\.mtz: column 'FP' holds no values"),
    ("mtz_corrupt", ["-hkl", "corrupt.mtz"], ["crystal.hkl_file=corrupt.mtz"],
     r"^(-hkl|crystal\.hkl_file): corrupt\.mtz: not a readable MTZ file"),
    ("mtz_column_text_table", ["-hkl", "x.hkl", "-mtz_column", "FP"], ["crystal.hkl_file=x.hkl", "crystal.mtz_column=FP"],
     r"^(-mtz_column|crystal\.mtz_column): x\.hkl is not an MTZ file"),
    ("mtz_column_without_hkl", ["-default_F", "1", "-mtz_column", "FP"], ["crystal.mtz_column=FP"],
     r"^(-mtz_column|crystal\.mtz_column): applies to an MTZ crystal\.hkl_file"),
    ("model_no_atoms_pdb", ["-model", "noatoms.pdb"], ["crystal.model_file=noatoms.pdb"],
     r"^(-model|crystal\.model_file): noatoms\.pdb: no atoms in the model"),
    ("model_no_atoms_cif", ["-model", "noatoms.cif"], ["crystal.model_file=noatoms.cif"],
     r"^(-model|crystal\.model_file): noatoms\.cif: no atoms in the model"),
    ("model_broken_cif", ["-model", "broken.cif"], ["crystal.model_file=broken.cif"],
     r"^(-model|crystal\.model_file): broken\.cif: not a readable PDB or mmCIF model \(.+\)$"),
    ("model_binary", ["-model", "binary.pdb"], ["crystal.model_file=binary.pdb"],
     r"^(-model|crystal\.model_file): binary\.pdb: binary data"),
    ("model_no_cell", ["-model", "nocell.pdb"], ["crystal.model_file=nocell.pdb"],
     r"^(-model|crystal\.model_file): nocell\.pdb: the model has no unit cell"),
    ("model_unknown_element", ["-model", "unknown.pdb"], ["crystal.model_file=unknown.pdb"],
     r"^(-model|crystal\.model_file): unknown\.pdb: no X-ray form factor for element 'X'"),
    ("model_missing", ["-model", "nothere.pdb"], ["crystal.model_file=nothere.pdb"],
     r"^(-model: file not found: nothere\.pdb|crystal\.model_file: .*nothere\.pdb)"),
    ("model_directory", ["-model", "dir.pdb"], ["crystal.model_file=dir.pdb"],
     r"^(-model|crystal\.model_file): dir\.pdb: is a directory"),
    ("model_fifo", ["-model", "fifo.pdb"], ["crystal.model_file=fifo.pdb"],
     r"^(-model|crystal\.model_file): fifo\.pdb: is a FIFO \(named pipe\), not a regular file"),
    ("hkl_fifo_not_opened", ["-hkl", "fifo.mtz"], ["crystal.hkl_file=fifo.mtz"],
     r"^(-hkl|crystal\.hkl_file): fifo\.mtz: is a FIFO \(named pipe\), not a regular file"),
    ("model_and_hkl", ["-model", "noatoms.pdb", "-hkl", "x.hkl"],
     ["crystal.model_file=noatoms.pdb", "crystal.hkl_file=x.hkl"],
     r"^(-model|crystal\.model_file): give either crystal\.model_file or crystal\.hkl_file"),
    ("model_dmin_negative", ["-model", "noatoms.pdb", "-model_dmin", "-1"],
     ["crystal.model_file=noatoms.pdb", "crystal.model_dmin_A=-1"],
     r"^(-model_dmin|crystal\.model_dmin_A): must be > 0"),
    ("model_anomalous_without_model", ["-default_F", "1", "-model_anomalous"], ["crystal.model_anomalous=true"],
     r"^(-model_anomalous|crystal\.model_anomalous): applies to crystal\.model_file"),
]


def _one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    return lines[0]


@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_frontend_bad_input(row, tmp_path, monkeypatch, capsys):
    from nbsim.nanobragg import main
    _, fe, _, msg = row
    _bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    rc = main(FE_BASE + fe)
    out = capsys.readouterr()
    line = _one_line(out.err)
    assert rc == 2
    prefix = "nbsim.nanobragg: error: "
    assert line.startswith(prefix) and re.search(msg, line[len(prefix):]), line
    assert "Traceback" not in out.err + out.out
    assert sorted(os.listdir(tmp_path)) == before          # no image, no Fdump cache


@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_app_bad_input(row, tmp_path, monkeypatch, capsys):
    from pipeline import app
    _, _, overrides, msg = row
    _bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(sys, "argv", ["nbsim", *APP_BASE, "crystal.cell_A_deg=[30,35,40,90,90,90]", *overrides])
    with pytest.raises(SystemExit) as exc:
        app.main()
    out = capsys.readouterr()
    line = _one_line(out.err)
    assert exc.value.code == 2
    prefix = "nbsim: error: "
    assert line.startswith(prefix) and re.search(msg, line[len(prefix):]), line
    assert "Traceback" not in out.err + out.out
    assert sorted(os.listdir(tmp_path)) == before


def test_readers_never_open_a_fifo(tmp_path):
    """MTZ detection and the MTZ/model readers refuse a FIFO from its stat (opening it would block)."""
    from nbsim.io.inputs import InputFileError
    from nbsim.io.structure_factors import is_mtz, model_structure_factors
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    assert is_mtz(fifo) is False
    with pytest.raises(InputFileError, match="is a FIFO"):
        read_mtz(fifo)
    with pytest.raises(InputFileError, match="is a FIFO"):
        model_structure_factors(fifo, 1.0, 3.0)


@pytest.mark.slow
def test_subprocess_bad_mtz_column(tmp_path):
    import subprocess
    _bad_files(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "nbsim.nanobragg", *FE_BASE, "-hkl", "x.mtz", "-mtz_column", "FOO"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert re.search(r"-mtz_column: x\.mtz: no column 'FOO'", _one_line(p.stderr))


def test_batch_does_not_share_model_F_across_wavelengths(tmp_path):
    """Model structure factors depend on the wavelength (f', f'') and the detector's resolution:
    a batch over wavelengths renders each point from its own F, as unbatched runs do."""
    from nbsim.api import simulate
    from nbsim.batch import simulate_many
    from nbsim.frontend import parse_argv
    write_pdb(tmp_path / "m.pdb")
    specs = [parse_argv(MODEL_ARGS + ["-model", "m.pdb", "-model_anomalous", "-lambda", lam],
                        cwd=str(tmp_path)).spec for lam in ("1.0", "1.9")]
    batched = simulate_many(specs, base_dir=tmp_path)
    for spec, r in zip(specs, batched):
        single = simulate(spec, base_dir=tmp_path).float32()
        assert single.max() > 0 and np.abs(r.float32() - single).max() == 0.0
    assert np.abs(batched[0].float32() - batched[1].float32()).max() > 0


def test_truncated_or_damaged_mtz_is_refused_before_gemmi_reads_it(tmp_path):
    """An MTZ file whose header position lies beyond its end (truncated, or a damaged first record)
    is one line at once, not gemmi filling memory first (a damaged 184-byte file took 14 s)."""
    from nbsim.io.inputs import InputFileError
    from nbsim.io.structure_factors import _read_mtz_file
    hkl = np.array([[1, 2, 3], [2, 0, 1]])
    write_mtz(tmp_path / "ok.mtz", hkl, {"FP": ("F", np.array([10.0, 20.0]))})
    data = (tmp_path / "ok.mtz").read_bytes()
    assert _read_mtz_file(tmp_path / "ok.mtz").nreflections == 2
    header_at = (int.from_bytes(data[4:8], "little") - 1) * 4
    (tmp_path / "cut.mtz").write_bytes(data[:header_at + 40])               # half its first record
    (tmp_path / "far.mtz").write_bytes(data[:4] + b"\xff\xff\xff\x7f" + data[8:])
    for name in ("cut.mtz", "far.mtz"):
        with pytest.raises(InputFileError, match=rf"{name}: not a readable MTZ file \(its header position "
                                                 "lies beyond the end of the file\\)"):
            _read_mtz_file(tmp_path / name)
