"""Geometry files in: CrystFEL ``.geom`` and the DIALS/dxtbx experiment list ``.expt`` (JSON).

``read_geometry(path) -> GeometryFile``: the panels as ``PanelSpec``s in nbsim's lab frame (mm,
unit vectors), plus the beam (and the crystal's real-space axes) of an ``.expt`` where present.
A file that cannot be used raises ``InputFileError`` with one line ``path:line: key: problem
(accepted: ...)``; the callers prefix the config key or flag (``detector.geometry_file``, ``--geom``).

Frames (all right-handed, y up; README "Multi-panel detectors and geometry files"):

* nbsim (nanoBragg's lab frame as the custom convention uses it): the beam travels along +x, y is
  up, z = x × y.
* CrystFEL: the beam travels along +z, y is up, x = y × z. The same physical axes are nbsim's
  (x_n, y_n, z_n) = (z_c, y_c, -x_c). (A plain swap (z_c, y_c, x_c) would be a reflection: it turns
  a right-handed frame into a left-handed one and mirrors the detector.)
* dxtbx/DIALS: the beam travels along -z (``beam.direction`` points from the sample towards the
  source, +z), y is up, x = y × z. nbsim's (x_n, y_n, z_n) = (-z_d, y_d, x_d); this is the inverse
  of the ``dials_origin_mm`` nbsim has always reported (x_d, y_d, z_d) = (z_n, y_n, -x_n).

Both conversions only permute components and change signs: they are exact in floating point.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from nbsim.io.inputs import InputFileError, read_input_bytes
from nbsim.spec import PanelSpec

__all__ = ["GeometryFile", "read_geometry", "read_crystfel", "read_expt", "from_crystfel", "from_dxtbx"]

MAX_GEOMETRY_BYTES = 64 * 2 ** 20
#: Planck constant x speed of light, eV·Å (CODATA 2018)
HC_EV_A = 12398.419843320026


def from_crystfel(v) -> List[float]:
    """A CrystFEL lab vector (x, y, z) in nbsim's lab frame: (z, y, -x)."""
    return [float(v[2]), float(v[1]), 0.0 - float(v[0])]       # 0.0 - x: no -0.0


def from_dxtbx(v) -> List[float]:
    """A dxtbx/DIALS lab vector (x, y, z) in nbsim's lab frame: (-z, y, x)."""
    return [0.0 - float(v[2]), float(v[1]), float(v[0])]


@dataclass
class GeometryFile:
    """What a geometry file gives: panels (nbsim frame, mm) in file order, and optionally the beam."""
    path: Path
    kind: str                                   # "crystfel" | "dxtbx"
    panels: List[PanelSpec]
    wavelength_A: Optional[float] = None        # .expt beam
    beam_vector: Optional[List[float]] = None   # direction of travel, nbsim frame
    thickness_mm: Optional[List[float]] = None   # .expt panels' sensor thickness (mm; 0 where not given)
    mu_per_mm: Optional[List[float]] = None      # .expt panels' sensor attenuation coefficient (1/mm; 0: not given)
    crystal_axes_A: Optional[List[List[float]]] = None   # .expt real-space a, b, c (nbsim frame, Å):
    #                                             the run's crystal when the spec gives no cell/matrix
    notes: Tuple[str, ...] = field(default_factory=tuple)


def read_geometry(path) -> GeometryFile:
    """Read a ``.geom`` (CrystFEL) or ``.expt``/``.json`` (dxtbx) file by its suffix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".geom":
        return read_crystfel(p)
    if suffix in (".expt", ".json"):
        return read_expt(p)
    raise InputFileError(f"{p}: unknown geometry file type {p.suffix!r} (accepted: .geom for CrystFEL, "
                         ".expt or .json for a DIALS experiment list)")


# ---------------------------------------------------------------------------------------------
# CrystFEL .geom
# ---------------------------------------------------------------------------------------------

_PANEL_NUM = ("min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "res", "clen", "coffset")
_PANEL_KEYS = _PANEL_NUM + ("fs", "ss")
_BAD_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss", "min_x", "max_x", "min_y", "max_y", "panel")
#: keys that describe the data file, the ADC or indexing, not where pixels are: ignored with a note
_IGNORED = ("adu_per_eV", "adu_per_photon", "max_adu", "data", "dim0", "dim1", "dim2", "dim3", "mask",
            "mask_file", "mask_good", "mask_bad", "mask0_data", "mask0_file", "mask0_goodbits",
            "mask0_badbits", "saturation_map", "saturation_map_file", "photon_energy",
            "photon_energy_bandwidth", "photon_energy_scale", "bandwidth", "peak_list",
            "peak_list_type", "no_index", "flag_lessthan", "flag_morethan", "flag_equal",
            "detector_shift_x", "detector_shift_y", "wavelength", "electron_voltage", "profile_radius",
            "magic")
_VEC_TERM = re.compile(r"\s*([+-]?)\s*([0-9]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([xyz])\s*")


def _fail(path, line, key, msg) -> InputFileError:
    where = f"{path}:{line}" if line else f"{path}"
    return InputFileError(f"{where}: {key}: {msg}")


def _number(path, line, key, text) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _fail(path, line, key, f"must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise _fail(path, line, key, f"must be a finite number, got {text!r}")
    return v


def _vector(path, line, key, text) -> List[float]:
    """A CrystFEL direction such as ``+0.5x -0.866y`` (terms of x, y, z) as [x, y, z]."""
    out, pos, seen = [0.0, 0.0, 0.0], 0, set()
    s = text.strip()
    while pos < len(s):
        m = _VEC_TERM.match(s, pos)
        if m is None or m.end() == pos:
            raise _fail(path, line, key, f"must be terms like +1.0x -0.5y +0.0z, got {text!r}")
        sign, num, axis = m.groups()
        if axis in seen:
            raise _fail(path, line, key, f"axis {axis} given twice in {text!r}")
        seen.add(axis)
        c = float(num) if num not in ("", ".") else 1.0
        out["xyz".index(axis)] = -c if sign == "-" else c
        pos = m.end()
    if not seen:
        raise _fail(path, line, key, f"must be terms like +1.0x -0.5y, got {text!r}")
    if all(x == 0 for x in out):
        raise _fail(path, line, key, f"must not be the zero vector, got {text!r}")
    return out


def read_crystfel(path) -> GeometryFile:
    """Parse a CrystFEL geometry file (``crystfel_geometry(5)``): panels ``name/key = value``;
    a key without a panel sets the default of the panels that appear after it; ``bad_*/key``
    bad regions (``min_fs``..``max_ss`` with ``panel``, or ``min_x``..``max_y`` in the lab plane,
    pixel units) become panel ``bad`` boxes / masked pixels."""
    path = Path(path)
    raw = read_input_bytes(path, MAX_GEOMETRY_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text file (UTF-8)") from None
    defaults: dict = {}
    panels: dict = {}           # name -> {key: (value, line)}
    bads: dict = {}
    notes, ignored = [], {}
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise _fail(path, ln, line.split()[0], "expected 'key = value'")
        key, val = (x.strip() for x in line.split("=", 1))
        if not key or not val:
            raise _fail(path, ln, key or "(empty)", "expected 'key = value'")
        if key.startswith("rigid_group") or key.startswith("rigid_group_collection"):
            ignored.setdefault(key.split("_")[0] + "_group", ln)
            continue
        if "/" in key:
            owner, k = key.split("/", 1)
            if owner.startswith("bad"):
                if k not in _BAD_KEYS:
                    raise _fail(path, ln, key, f"unknown bad-region key (accepted: {', '.join(_BAD_KEYS)})")
                bads.setdefault(owner, {})[k] = (val, ln)
                continue
            if k in _IGNORED:
                ignored.setdefault(k, ln)
                continue
            if k not in _PANEL_KEYS:
                raise _fail(path, ln, key, f"unknown panel key (accepted: {', '.join(_PANEL_KEYS)}; "
                            f"ignored: {', '.join(_IGNORED)})")
            if owner not in panels:
                panels[owner] = {kk: vv for kk, vv in defaults.items()}
            panels[owner][k] = (val, ln)
            continue
        if key in _IGNORED:
            ignored.setdefault(key, ln)
            continue
        if key not in _PANEL_KEYS:
            raise _fail(path, ln, key, f"unknown key (accepted: {', '.join(_PANEL_KEYS)}, panel/key, "
                        f"bad_name/key; ignored: {', '.join(_IGNORED)})")
        defaults[key] = (val, ln)
    if not panels:
        raise InputFileError(f"{path}: no panels (lines 'name/min_fs = ...')")
    for k, ln in ignored.items():
        what = {"adu_per_eV": "detector gain: nbsim images are in photons",
                "adu_per_photon": "detector gain: nbsim images are in photons",
                "photon_energy": "the wavelength is beam.wavelength_A"}.get(k, "not geometry")
        notes.append(f"{path.name}:{ln}: {k} ignored ({what})")

    out = []
    layout = {}
    for name, kv in panels.items():
        for k in ("min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "res", "clen", "fs", "ss"):
            if k not in kv:
                raise _fail(path, 0, f"{name}/{k}", "missing (every panel needs min_fs, max_fs, min_ss, "
                            "max_ss, fs, ss, corner_x, corner_y, res and clen, or a default before it)")
        num = {k: _number(path, kv[k][1], f"{name}/{k}", kv[k][0]) for k in _PANEL_NUM
               if k in kv and not (k == "clen" and not _is_number(kv[k][0]))}
        if "clen" not in num:
            raise _fail(path, kv["clen"][1], f"{name}/clen", f"must be a distance in metres; a data-file "
                        f"location ({kv['clen'][0]}) is not supported")
        for k in ("min_fs", "max_fs", "min_ss", "max_ss"):
            if num[k] != int(num[k]) or num[k] < 0:
                raise _fail(path, kv[k][1], f"{name}/{k}", f"must be an integer >= 0, got {kv[k][0]}")
        nf = int(num["max_fs"]) - int(num["min_fs"]) + 1
        ns = int(num["max_ss"]) - int(num["min_ss"]) + 1
        if nf < 1 or ns < 1:
            raise _fail(path, kv["max_fs"][1] if nf < 1 else kv["max_ss"][1], f"{name}/max_{'fs' if nf < 1 else 'ss'}",
                        "must be >= min (the range is inclusive)")
        res = num["res"]
        if not res > 0:
            raise _fail(path, kv["res"][1], f"{name}/res", f"must be > 0 pixels per metre, got {kv['res'][0]}")
        z = num["clen"] + num.get("coffset", 0.0)
        fs = _vector(path, kv["fs"][1], f"{name}/fs", kv["fs"][0])
        ss = _vector(path, kv["ss"][1], f"{name}/ss", kv["ss"][0])
        nfs, nss = math.sqrt(sum(x * x for x in fs)), math.sqrt(sum(x * x for x in ss))
        cosang = sum(a * b for a, b in zip(fs, ss)) / (nfs * nss)
        if abs(cosang) > 1e-6:
            raise _fail(path, kv["ss"][1], f"{name}/ss", f"must be perpendicular to fs (|cos| <= 1e-6), "
                        f"got cos = {cosang:.3g}")
        if abs(nfs - 1) > 1e-3 or abs(nss - 1) > 1e-3:
            notes.append(f"{path.name}: {name}: fs/ss of length {nfs:g}/{nss:g} pixels are normalised "
                         "(pixels are square, of size 1/res)")
        if not z > 0:
            raise _fail(path, kv["clen"][1], f"{name}/clen", f"clen + coffset must be > 0 m (the "
                        f"detector downstream of the sample), got {z:g}")
        origin_m = [num["corner_x"] / res, num["corner_y"] / res, z]
        layout[name] = (num, fs, ss, nf, ns)
        out.append(PanelSpec(name=name, fpixels=nf, spixels=ns, pixel_mm=1e3 / res,
                             fast=from_crystfel(fs), slow=from_crystfel(ss),
                             origin_mm=[x * 1e3 for x in from_crystfel(origin_m)], bad=[]))
    _apply_bad_regions(path, bads, out, layout, notes)
    return GeometryFile(path=path, kind="crystfel", panels=out, notes=tuple(notes))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _apply_bad_regions(path, bads, panels, layout, notes) -> None:
    """Bad regions as panel ``bad`` boxes [fmin, fmax, smin, smax] (panel pixels, inclusive)."""
    by_name = {p.name: p for p in panels}
    for owner, kv in bads.items():
        has_fs = any(k in kv for k in ("min_fs", "max_fs", "min_ss", "max_ss"))
        has_xy = any(k in kv for k in ("min_x", "max_x", "min_y", "max_y"))
        ln = min(v[1] for v in kv.values())
        if has_fs == has_xy:
            raise _fail(path, ln, owner, "a bad region needs either min_fs/max_fs/min_ss/max_ss (with "
                        "panel) or min_x/max_x/min_y/max_y, not both or neither")
        need = ("min_fs", "max_fs", "min_ss", "max_ss") if has_fs else ("min_x", "max_x", "min_y", "max_y")
        for k in need:
            if k not in kv:
                raise _fail(path, ln, f"{owner}/{k}", "missing")
        num = {k: _number(path, kv[k][1], f"{owner}/{k}", kv[k][0]) for k in need}
        if has_fs:
            pname = kv.get("panel", (None, ln))[0]
            targets = [pname] if pname is not None else list(by_name)
            if pname is not None and pname not in by_name:
                raise _fail(path, kv["panel"][1], f"{owner}/panel", f"unknown panel {pname!r} "
                            f"(panels: {', '.join(by_name)})")
            for t in targets:
                pnum = layout[t][0]
                f0, s0 = int(pnum["min_fs"]), int(pnum["min_ss"])
                nf, ns = layout[t][3], layout[t][4]
                box = [max(int(num["min_fs"]) - f0, 0), min(int(num["max_fs"]) - f0, nf - 1),
                       max(int(num["min_ss"]) - s0, 0), min(int(num["max_ss"]) - s0, ns - 1)]
                if box[0] <= box[1] and box[2] <= box[3]:
                    by_name[t].bad.append(box)
        else:
            # lab-plane region (pixel units of x, y): pixels whose centre lies inside
            for t, p in by_name.items():
                pnum, fs, ss, nf, ns = layout[t]
                for s in range(ns):
                    for f in range(nf):
                        x = pnum["corner_x"] + (f + 0.5) * fs[0] + (s + 0.5) * ss[0]
                        y = pnum["corner_y"] + (f + 0.5) * fs[1] + (s + 0.5) * ss[1]
                        if num["min_x"] <= x <= num["max_x"] and num["min_y"] <= y <= num["max_y"]:
                            p.bad.append([f, f, s, s])
        notes.append(f"{path.name}:{ln}: bad region {owner}: its pixels are not simulated (0)")


# ---------------------------------------------------------------------------------------------
# dxtbx / DIALS experiment list (.expt JSON)
# ---------------------------------------------------------------------------------------------

def _json_line(text: str, needle: str, nth: int = 0, after: Optional[str] = None) -> int:
    """Line of the ``nth`` occurrence of ``needle`` in ``text`` (after the first ``after``, when
    given), the last one found when there are fewer, 0 when absent: for messages (panel i's key is
    the i-th occurrence after ``"panels"``)."""
    i = text.find(after) if after is not None else -1
    found = -1
    for _ in range(nth + 1):
        j = text.find(needle, i + 1)
        if j < 0:
            break
        i = found = j
    return text.count("\n", 0, found) + 1 if found >= 0 else 0


def _vec3(path, text, where, v, *, nonzero=True, nth=0) -> List[float]:
    line = _json_line(text, f'"{where.split(".")[-1]}"', nth, '"panels"' if where.startswith("detector.") else None)
    if (not isinstance(v, list) or len(v) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        raise _fail(path, line, where, f"must be a list of 3 finite numbers, got {v!r}")
    if nonzero and all(x == 0 for x in v):
        raise _fail(path, line, where, "must not be the zero vector")
    return [float(x) for x in v]


_LAB = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0))   # fast, slow, normal, origin


def compose_frame(parent, fast, slow, origin):
    """dxtbx's global frame of a node (``VirtualPanelFrame::update_global_frame``) from its parent's
    global frame ``parent`` = (fast, slow, normal, origin) and its local ``fast``, ``slow`` and
    ``origin`` (mm): each local vector v becomes pf·v₀ + ps·v₁ + pn·v₂, the origin plus the parent's
    origin. Returns the node's (fast, slow, normal = fast × slow, origin)."""
    pf, ps, pn, po = parent

    def rot(v):
        return [pf[c] * v[0] + ps[c] * v[1] + pn[c] * v[2] for c in range(3)]
    f, s_ = rot(fast), rot(slow)
    n = [f[1] * s_[2] - f[2] * s_[1], f[2] * s_[0] - f[0] * s_[2], f[0] * s_[1] - f[1] * s_[0]]
    o = [x + y for x, y in zip(rot(origin), po)]
    return f, s_, n, o


def _identity_frame(g: dict) -> bool:
    return (g.get("fast_axis", [1, 0, 0]) == [1, 0, 0] and g.get("slow_axis", [0, 1, 0]) == [0, 1, 0]
            and g.get("origin", [0, 0, 0]) == [0, 0, 0])


def _panel_parents(path, text, hier, npanels: int) -> dict:
    """Panel index -> the global frame of its group in the dxtbx ``hierarchy`` (panels' own
    ``fast_axis``/``slow_axis``/``origin`` are local to it, as dxtbx writes them). Groups whose
    frames are all the identity are left out (their panels' frames are already lab frames)."""
    parents, stack = {}, [(hier, _LAB, "detector.hierarchy")] if isinstance(hier, dict) else []
    while stack:
        g, parent, where = stack.pop()
        frame = parent
        if not _identity_frame(g):
            vecs = [_vec3(path, text, f"{where}.{k}", g.get(k, d), nonzero=(k != "origin"))
                    for k, d in (("fast_axis", [1, 0, 0]), ("slow_axis", [0, 1, 0]), ("origin", [0, 0, 0]))]
            frame = compose_frame(parent, *vecs)
        for j, c in enumerate(g.get("children") or []):
            if not isinstance(c, dict):
                raise _fail(path, _json_line(text, '"hierarchy"'), f"{where}.children.{j}", "must be an object")
            if "panel" in c:
                i = c["panel"]
                if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < npanels):
                    raise _fail(path, _json_line(text, '"hierarchy"'), f"{where}.children.{j}.panel",
                                f"must be a panel index in 0..{npanels - 1}, got {i!r}")
                if frame is not _LAB:
                    parents[i] = frame
            else:
                stack.append((c, frame, f"{where}.children.{j}"))
    return parents


def read_expt(path) -> GeometryFile:
    """Parse a dxtbx experiment list: the first experiment's detector panels (``fast_axis``,
    ``slow_axis``, ``origin`` (mm, corner of pixel (0, 0)), ``pixel_size``, ``image_size``, the
    untrusted rectangles ``mask`` as bad boxes, sensor ``thickness`` (mm) and ``mu`` (1/mm)), its
    beam (``wavelength`` Å, ``direction`` = sample to source) and crystal (``real_space_a/b/c``)."""
    path = Path(path)
    raw = read_input_bytes(path, MAX_GEOMETRY_BYTES)
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a text file (UTF-8)") from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("detector"), list) or not doc["detector"]:
        raise InputFileError(f"{path}: detector: missing (a DIALS experiment list has a 'detector' list)")
    notes = []
    exps = doc.get("experiment") or [{}]
    exp = exps[0] if isinstance(exps, list) and isinstance(exps[0], dict) else {}
    if isinstance(exps, list) and len(exps) > 1:
        notes.append(f"{path.name}: {len(exps)} experiments; the first one's detector, beam and crystal are used")

    def pick(kind):
        items = doc.get(kind)
        if not isinstance(items, list) or not items:
            return None
        i = exp.get(kind, 0)
        if not isinstance(i, int) or not 0 <= i < len(items):
            raise _fail(path, _json_line(text, f'"{kind}"'), f"experiment.{kind}",
                        f"index {i!r} out of range 0..{len(items) - 1}")
        return items[i]

    det = pick("detector")
    if not isinstance(det, dict) or not isinstance(det.get("panels"), list) or not det["panels"]:
        raise _fail(path, _json_line(text, '"panels"'), "detector.panels", "missing or empty")
    parents = _panel_parents(path, text, det.get("hierarchy"), len(det["panels"]))
    if parents:
        notes.append(f"{path.name}: {len(parents)} panel(s) placed through the detector hierarchy's "
                     "group frames (dxtbx: panel frames are local to their group)")
    panels = []
    for i, pd in enumerate(det["panels"]):
        where = f"detector.panels.{i}"
        if not isinstance(pd, dict):
            raise _fail(path, _json_line(text, '"panels"'), where, "must be an object")
        for k in ("fast_axis", "slow_axis", "origin", "pixel_size", "image_size"):
            if k not in pd:
                raise _fail(path, _json_line(text, '"panels"'), f"{where}.{k}", "missing")
        fast = _vec3(path, text, f"{where}.fast_axis", pd["fast_axis"], nth=i)
        slow = _vec3(path, text, f"{where}.slow_axis", pd["slow_axis"], nth=i)
        origin = _vec3(path, text, f"{where}.origin", pd["origin"], nonzero=False, nth=i)
        ps, size = pd["pixel_size"], pd["image_size"]
        if (not isinstance(ps, list) or len(ps) != 2
                or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in ps)):
            raise _fail(path, _json_line(text, '"pixel_size"', i, '"panels"'), f"{where}.pixel_size",
                        f"must be 2 numbers > 0 (mm), got {ps!r}")
        if ps[0] != ps[1]:
            raise _fail(path, _json_line(text, '"pixel_size"', i, '"panels"'), f"{where}.pixel_size",
                        f"must be square (nbsim's pixels are), got {ps!r}")
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in size)):
            raise _fail(path, _json_line(text, '"image_size"', i, '"panels"'), f"{where}.image_size",
                        f"must be 2 integers >= 1 [fast, slow], got {size!r}")
        nf_, ns_ = math.sqrt(sum(x * x for x in fast)), math.sqrt(sum(x * x for x in slow))
        cosang = sum(a * b for a, b in zip(fast, slow)) / (nf_ * ns_)
        if abs(cosang) > 1e-6:
            raise _fail(path, _json_line(text, '"slow_axis"', i, '"panels"'), f"{where}.slow_axis",
                        f"must be perpendicular to fast_axis (|cos| <= 1e-6), got cos = {cosang:.3g}")
        if i in parents:                               # local to its group: compose (dxtbx)
            fast, slow, _, origin = compose_frame(parents[i], fast, slow, origin)
        bad = _expt_mask(path, text, where, pd.get("mask") or [], size, i)
        if bad:
            notes.append(f"{path.name}: {where}.mask: {len(bad)} untrusted rectangle(s): their pixels are "
                         "not simulated (0)")
        for k in ("thickness", "mu"):
            v = pd.get(k, 0.0)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise _fail(path, _json_line(text, f'"{k}"', i, '"panels"'), f"{where}.{k}",
                            f"must be a number >= 0 ({'mm' if k == 'thickness' else '1/mm'}), got {v!r}")
        panels.append(PanelSpec(name=str(pd.get("name") or f"p{i}"), fpixels=size[0], spixels=size[1],
                                pixel_mm=float(ps[0]), fast=from_dxtbx(fast), slow=from_dxtbx(slow),
                                origin_mm=from_dxtbx(origin), bad=bad))
    thickness = [float(pd.get("thickness", 0.0)) for pd in det["panels"]]
    mu = [float(pd.get("mu", 0.0)) for pd in det["panels"]]
    wavelength = beam_vec = None
    beam = pick("beam")
    if isinstance(beam, dict):
        if "wavelength" in beam:
            w = beam["wavelength"]
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise _fail(path, _json_line(text, '"wavelength"'), "beam.wavelength", f"must be > 0 Å, got {w!r}")
            wavelength = float(w)
        if "direction" in beam:
            d = _vec3(path, text, "beam.direction", beam["direction"])
            norm = math.sqrt(sum(x * x for x in d))
            beam_vec = from_dxtbx([0.0 - x / norm for x in d])   # direction: sample -> source
    axes = None
    cryst = pick("crystal")
    if isinstance(cryst, dict) and all(k in cryst for k in ("real_space_a", "real_space_b", "real_space_c")):
        axes = [from_dxtbx(_vec3(path, text, f"crystal.{k}", cryst[k]))
                for k in ("real_space_a", "real_space_b", "real_space_c")]
        a, b, c = axes
        triple = (a[0] * (b[1] * c[2] - b[2] * c[1]) + a[1] * (b[2] * c[0] - b[0] * c[2])
                  + a[2] * (b[0] * c[1] - b[1] * c[0]))
        lengths = math.prod(math.sqrt(sum(x * x for x in v)) for v in axes)
        if not abs(triple) > 1e-9 * lengths:
            raise _fail(path, _json_line(text, '"real_space_c"'), "crystal.real_space_c",
                        "the axes a, b, c must span a volume (they are coplanar)")
    return GeometryFile(path=path, kind="dxtbx", panels=panels, wavelength_A=wavelength,
                        beam_vector=beam_vec, crystal_axes_A=axes, notes=tuple(notes),
                        thickness_mm=thickness if any(thickness) else None, mu_per_mm=mu if any(mu) else None)


def _expt_mask(path, text, where, mask, size, nth) -> List[List[int]]:
    """A dxtbx panel ``mask``: untrusted rectangles [x0, y0, x1, y1] (fast, slow pixels, half-open:
    x0 <= f < x1, y0 <= s < y1, clipped to the panel; dxtbx ``Panel.apply_untrusted_rectangle_mask``)
    as nbsim ``bad`` boxes [fmin, fmax, smin, smax] (inclusive)."""
    line = _json_line(text, '"mask"', nth, '"panels"')
    if not isinstance(mask, list):
        raise _fail(path, line, f"{where}.mask", f"must be a list of [x0, y0, x1, y1] rectangles, got {mask!r}")
    out = []
    for r in mask:
        if (not isinstance(r, list) or len(r) != 4
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise _fail(path, line, f"{where}.mask", f"each rectangle must be 4 integers [x0, y0, x1, y1], got {r!r}")
        x0, y0, x1, y1 = max(r[0], 0), max(r[1], 0), min(r[2], size[0]), min(r[3], size[1])
        if not (x0 < x1 and y0 < y1):
            raise _fail(path, line, f"{where}.mask", f"rectangle {r} [x0, y0, x1, y1] covers no pixel of the "
                        f"{size[0]}x{size[1]} panel (needs x0 < x1, y0 < y1 after clipping)")
        out.append([x0, x1 - 1, y0, y1 - 1])
    return out
