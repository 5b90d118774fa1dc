"""Multi-panel detectors: one engine ``Model`` per panel, sharing everything but the pixel geometry.

A detector is a list of panels (``detector.panels`` or ``detector.geometry_file``). Each panel has
its pixel counts, pixel size, fast/slow unit vectors, the origin of its frame (the corner of pixel
(0, 0) of that frame, nbsim's ``pix0``) and an integer offset: the panel's first pixel is pixel
(``offset_px[0]``, ``offset_px[1]``) (fast, slow) of that frame. A panel read from a geometry file
has offset 0 and its own corner as origin; a panel that tiles a single-panel detector keeps that
detector's ``pix0`` and vectors and says where it starts by its offset, so its sub-pixel positions
``pix0 + Fdet·f̂ + Sdet·ŝ`` are computed from the same numbers as the single-panel run's: the pixels
are bit-identical (``tests/test_panels.py``).

The kernel is unchanged: a panel is rendered as a ``Model`` whose frame spans pixels
[0, offset + count) on both axes with a mask that selects the panel's own pixels (and its ROI and
bad regions); the image is that frame's [offset:, offset:] block. Memory: a panel with offsets
allocates its whole frame block once (its pixels are the only ones rendered).

Frames: every vector here is in nbsim's lab frame (metres in tensors; mm in the spec); geometry
files are converted by ``nbsim.io.geom``. Loop-order quirks: the faithful φ = 0 carry-over's "first
iteration of the run" is taken on the first panel (as in a single-panel run, where it is the first
simulated pixel); the tricubic switch-off state is not carried from one panel to the next.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from nbsim.params import PANEL_PREFIX, panel_key, value
from nbsim.rotation import cross, dot, rotate_xyz, unitize
from nbsim.spec import ExperimentSpec, PanelSpec, SpecError, has_panels  # noqa: F401 - re-exported
from nbsim.units import deg_to_rad, mm_to_m


@dataclass
class Panel:
    """One resolved panel. Tensors are (3,) nbsim lab vectors (unit) or 0-d, metres."""
    name: str
    fpixels: int
    spixels: int
    offset: tuple                 # (f0, s0): first pixel of the panel in its frame
    pixel_m: torch.Tensor
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    pix0: torch.Tensor            # corner of the frame's pixel (0, 0)
    active: np.ndarray            # (spixels, fpixels) bool: pixels simulated (ROI, not bad)
    roi_mask: np.ndarray          # (spixels, fpixels) bool: the ROI (written; 0 outside)

    def report(self):
        """The panel as plain numbers (``nbsim.report.PanelReport``: mm, unit vectors)."""
        from nbsim.report import PanelReport
        f0, s0 = self.offset
        px = value(self.pixel_m)
        corner = [value(self.pix0[c]) + px * (f0 * value(self.fdet[c]) + s0 * value(self.sdet[c]))
                  for c in range(3)]
        return PanelReport(name=self.name, fpixels=self.fpixels, spixels=self.spixels, offset_px=(f0, s0),
                           pixel_mm=px * 1e3, fast=tuple(value(x) for x in self.fdet),
                           slow=tuple(value(x) for x in self.sdet), normal=tuple(value(x) for x in self.odet),
                           origin_mm=tuple(value(x) * 1e3 for x in self.pix0),
                           corner_mm=tuple(x * 1e3 for x in corner),
                           close_distance_mm=value(dot(self.pix0, self.odet)) * 1e3)


def panel_params(params, n: int) -> dict:
    """``{(i, name): tensor}`` of the per-panel keys in ``params``; an index >= ``n`` raises."""
    out = {}
    for key, t in (params or {}).items():
        pk = panel_key(key)
        if pk is None:
            continue
        if pk[0] >= n:
            raise SpecError(key, f"panel index {pk[0]} out of range: the detector has {n} panels "
                            f"(0..{n - 1})")
        out[pk] = t
    return out


def _box_mask(shape, box) -> np.ndarray:
    """(S, F) bool, True inside ``box`` = [fmin, fmax, smin, smax] (inclusive, clipped)."""
    m = np.zeros(shape, bool)
    m[box[2]:box[3] + 1, box[0]:box[1] + 1] = True
    return m


def panel_name(pn: PanelSpec, i: int) -> str:
    """The name of panel ``i``: its own (geometry files: the file's), else ``p<i>``."""
    return pn.name or f"p{i}"


def panel_roi_mask(pn: PanelSpec, spixels: int, fpixels: int) -> np.ndarray:
    """(spixels, fpixels) bool: the panel's ROI (``roi``; the whole panel without one), the pixels
    every output writes (0 outside)."""
    if pn.roi is None:
        return np.ones((spixels, fpixels), bool)
    return _box_mask((spixels, fpixels), pn.roi)


def resolve_panels(panels: List[PanelSpec], frame, params=None) -> List[Panel]:
    """Resolve ``panels`` against the single-panel frame ``frame`` (an engine ``Model``: its
    pixel size, vectors and ``pix0`` are a panel's defaults). ``params``: schema key → tensor; the
    per-panel keys (``detector.panels.<i>.origin_mm`` / ``rot_deg``) replace the spec's values."""
    dt, dev = frame.dtype, frame.device
    pp = panel_params(params, len(panels))
    out = []
    for i, pn in enumerate(panels):
        key = f"{PANEL_PREFIX}{i}"
        fpix = pn.fpixels if pn.fpixels is not None else frame.fpixels
        spix = pn.spixels if pn.spixels is not None else frame.spixels
        pixel_m = frame.pixel_m if pn.pixel_mm is None else torch.tensor(mm_to_m(pn.pixel_mm), dtype=dt, device=dev)
        fdet, sdet, odet = frame.fdet, frame.sdet, frame.odet
        if pn.fast is not None or pn.slow is not None:
            if pn.fast is not None:
                fdet, _ = unitize(torch.tensor([float(x) for x in pn.fast], dtype=dt, device=dev))
            if pn.slow is not None:
                sdet, _ = unitize(torch.tensor([float(x) for x in pn.slow], dtype=dt, device=dev))
            if abs(value(dot(fdet, sdet))) > 1e-6:
                raise SpecError(f"{key}.slow", f"fast and slow axes must be perpendicular "
                                f"(|cos| <= 1e-6), got cos = {value(dot(fdet, sdet)):.3g}")
            odet, _ = unitize(cross(fdet, sdet))
        pix0 = frame.pix0
        if (i, "origin_mm") in pp:
            pix0 = mm_to_m(pp[(i, "origin_mm")].to(dt))
        elif pn.origin_mm is not None:
            pix0 = torch.tensor([mm_to_m(x) for x in pn.origin_mm], dtype=dt, device=dev)
        rot = pp.get((i, "rot_deg"))
        if rot is None and any(x != 0 for x in pn.rot_deg):
            rot = torch.tensor([float(x) for x in pn.rot_deg], dtype=dt, device=dev)
        if rot is not None:
            r = deg_to_rad(rot.to(dt))
            rel = [rotate_xyz(v, r[0], r[1], r[2]) for v in (fdet, sdet, odet)]
            fdet, sdet, odet = rel
        # the normal points away from the sample (C's odet): a panel whose fast x slow faces the
        # sample is flipped (a discrete choice, taken at the values)
        if value(dot(pix0, odet)) < 0:
            odet = -odet
        if abs(value(dot(pix0, odet))) < 1e-12:
            raise SpecError(f"{key}.origin_mm", "the panel's plane passes through the sample")
        if pn.roi is not None and (pn.roi[1] >= fpix or pn.roi[3] >= spix):
            raise SpecError(f"{key}.roi", f"must lie inside the panel's {fpix}x{spix} pixels "
                            f"(fast 0..{fpix - 1}, slow 0..{spix - 1}), got {list(pn.roi)}")
        roi_mask = panel_roi_mask(pn, spix, fpix)
        active = roi_mask.copy()
        for box in pn.bad or []:
            active &= ~_box_mask((spix, fpix), box)
        out.append(Panel(name=panel_name(pn, i), fpixels=fpix, spixels=spix,
                         offset=(int(pn.offset_px[0]), int(pn.offset_px[1])), pixel_m=pixel_m,
                         fdet=fdet, sdet=sdet, odet=odet, pix0=pix0, active=active, roi_mask=roi_mask))
    return out


def panel_model(frame, panel: Panel, *, first: bool):
    """The engine ``Model`` that renders ``panel``: ``frame``'s model with the panel's pixel
    geometry, a frame of (s0 + spixels) x (f0 + fpixels) pixels and a mask selecting the panel's
    active pixels. ``first``: this panel carries the run's first loop iteration (quirk 4)."""
    f0, s0 = panel.offset
    W, H = f0 + panel.fpixels, s0 + panel.spixels
    mask = np.zeros((H, W), bool)
    mask[s0:, f0:] = panel.active
    from nbsim.experiment import _carries_derivative
    close = dot(panel.pix0, panel.odet)
    same = (panel.pix0 is frame.pix0 and panel.odet is frame.odet)
    # a per-panel parameter on a derivative's path (requires_grad, a forward-mode dual, torch.func)
    # makes the panel's model differentiable, as build_model does for the frame's parameters
    differentiable = frame.differentiable or any(
        isinstance(t, torch.Tensor) and _carries_derivative(t)
        for t in (panel.pix0, panel.fdet, panel.sdet, panel.odet, panel.pixel_m))
    first_it = frame.first_iteration if (first and mask.any()) else None
    return dataclasses.replace(
        frame, fpixels=W, spixels=H, pixel_m=panel.pixel_m, fdet=panel.fdet, sdet=panel.sdet,
        odet=panel.odet, pix0=panel.pix0,
        close_distance_m=frame.close_distance_m if same else close,
        distance_m=frame.distance_m if same else close,
        mask=None if mask.all() else torch.as_tensor(mask, device=frame.device),
        first_iteration=first_it, differentiable=differentiable)


def sensor_from_geometry(spec: ExperimentSpec, geometry):
    """(detector keys, notes): the sensor an ``.expt`` gives (its panels' ``thickness`` mm and ``mu``
    1/mm) as ``detector.thick_um`` and ``detector.attenuation_um`` (= 1000/mu; left to the spec, or
    its default, when mu is 0 or the spec gives one). nbsim's sensor is one for the whole detector:
    used when the spec's ``detector.thick_um`` is 0 (its default) and every panel gives the same
    values; a ``thick_um`` > 0 of the spec wins (a note says so); panels that differ raise
    ``SpecError`` (give ``detector.thick_um``)."""
    t = getattr(geometry, "thickness_mm", None)
    if geometry is None or t is None:
        return {}, ()
    d = spec.detector
    name = d.geometry_file or geometry.path.name
    mu = geometry.mu_per_mm or [0.0] * len(t)
    if d.thick_um:
        return {}, (f"the sensor of {name} (panel thickness {max(t):g} mm) is not used: detector.thick_um "
                    f"{d.thick_um:g} is given and takes precedence",)
    if len(set(t)) > 1 or len(set(mu)) > 1:
        raise SpecError("detector.geometry_file", f"{name}: the panels differ in sensor thickness/mu "
                        f"(thickness {sorted(set(t))} mm, mu {sorted(set(mu))} 1/mm); nbsim's sensor is one for "
                        "the detector: give detector.thick_um (and detector.attenuation_um)")
    kw = {"thick_um": t[0] * 1e3}
    note = f"sensor from {name}: thickness {t[0] * 1e3:g} um"
    if mu[0] > 0 and d.attenuation_um is None:
        kw["attenuation_um"] = 1e3 / mu[0]
        note += f", attenuation length {1e3 / mu[0]:g} um (mu {mu[0]:g} 1/mm)"
    return kw, (note,)


def frame_spec(spec: ExperimentSpec, geometry=None) -> ExperimentSpec:
    """The single-panel experiment whose model every panel shares (all but the pixel geometry).

    With a geometry file the frame is the custom convention (beam +x unless the file gives the
    beam) at the nearest panel's distance with the smallest pixel, so that auto oversampling is
    chosen for the finest panel; an ``.expt`` beam sets the wavelength and beam direction. An
    ``.expt`` crystal, when it is the run's (``nbsim.inputs.crystal_from_geometry``), is the frame's
    ``crystal.matrix_file`` (the file's name; the matrix itself is ``inputs.matrix``); its panels'
    sensor sets ``detector.thick_um``/``attenuation_um`` (``sensor_from_geometry``)."""
    d, b = spec.detector, spec.beam
    for key, given, what in (("detector.roi", d.roi is not None, "give each panel's roi "
                              "(detector.panels.<i>.roi)"),
                             ("detector.mask_file", d.mask_file is not None, "give each panel's bad "
                              "regions (detector.panels.<i>.bad, or bad regions in the .geom)"),
                             ("detector.curved", d.curved, "a curved detector has one panel")):
        if given:
            raise SpecError(key, f"not supported with several panels: {what}")
    kw: dict = dict(panels=None, geometry_file=None)
    if geometry is not None:
        dists, pix = [], []
        for pn in geometry.panels:
            f = torch.tensor(pn.fast, dtype=torch.float64)
            s = torch.tensor(pn.slow, dtype=torch.float64)
            n, _ = unitize(cross(unitize(f)[0], unitize(s)[0]))
            dists.append(abs(value(dot(torch.tensor(pn.origin_mm, dtype=torch.float64), n))))
            pix.append(pn.pixel_mm)
        if not min(dists) > 0:
            raise SpecError("detector.geometry_file", f"{geometry.path}: a panel's plane passes through "
                            "the sample")
        kw.update(convention="custom", distance_mm=min(dists), pixel_mm=min(pix),
                  fpixels=geometry.panels[0].fpixels, spixels=geometry.panels[0].spixels,
                  detsize_f_mm=None, detsize_s_mm=None, close_distance_mm=None, xbeam_mm=None,
                  ybeam_mm=None, xclose_mm=None, yclose_mm=None, orgx_px=None, orgy_px=None,
                  rotx_deg=0.0, roty_deg=0.0, rotz_deg=0.0, twotheta_deg=0.0, fdet_vector=None,
                  sdet_vector=None, odet_vector=None, pix0_vector_mm=None)
        kw.update(sensor_from_geometry(spec, geometry)[0])
        bkw = {}
        if geometry.wavelength_A is not None:
            bkw["wavelength_A"] = geometry.wavelength_A
        if geometry.beam_vector is not None:
            bkw["beam_vector"] = list(geometry.beam_vector)
        b = dataclasses.replace(b, **bkw)
        from nbsim.inputs import crystal_from_geometry
        if crystal_from_geometry(spec, geometry):
            # the file's crystal is the frame's matrix file: its MOSFLM matrix is inputs.matrix
            # (nbsim.inputs.geometry_crystal), built into the lattice as a -mat matrix is
            c = dataclasses.replace(spec.crystal, matrix_file=str(spec.detector.geometry_file))
            return dataclasses.replace(spec, detector=dataclasses.replace(d, **kw), beam=b, crystal=c)
    return dataclasses.replace(spec, detector=dataclasses.replace(d, **kw), beam=b)


def panel_list(spec: ExperimentSpec, geometry=None) -> List[PanelSpec]:
    """The panels of ``spec``: ``detector.panels``, or those of its geometry file (read)."""
    if spec.detector.panels is not None:
        return list(spec.detector.panels)
    if geometry is None:
        raise SpecError("detector.geometry_file", "the geometry file was not read")
    return list(geometry.panels)


@dataclass
class PanelImage:
    """One panel's result: ``image`` (spixels, fpixels) tensor, ``mask`` pixels simulated,
    ``roi_mask`` the ROI (numpy bool), ``report`` the panel's geometry (``nbsim.report.PanelReport``)."""
    name: str
    image: torch.Tensor
    mask: np.ndarray
    roi_mask: np.ndarray
    report: object

    @property
    def info(self):
        """Read-only plain view of ``report`` (what ``run.json`` stores under ``info["panels"]``)."""
        from types import MappingProxyType
        return MappingProxyType(self.report.to_dict())


def simulate_panels(spec, device=None, *, params=None, inputs=None, base_dir=".", progress=None,
                    chunk_pixels=None, trace_pixel=None):
    """``nbsim.api.simulate`` for a multi-panel detector: one engine run per panel, in geometry
    order. ``result.image`` is every panel's pixels one after another (each slow-major, 1-D: what
    ``-floatfile`` writes); ``result.panels[i].image`` is panel i as (spixels, fpixels)."""
    import time

    from nbsim.api import RunStats, SimResult, _float32, memory_budget_bytes, resolve_device
    from nbsim.engine import simulate_image
    from nbsim.experiment import build_model
    from nbsim.inputs import load_inputs
    from nbsim.io.images import image_stats
    from nbsim.params import check_params, plain
    from nbsim.spec import compile_mode

    if trace_pixel is not None:
        raise SpecError("detector.panels", "-trace_pixel is not supported with several panels")
    tdev, tdtype, device = resolve_device(device)
    compile_ = compile_mode(device.compile)
    t0 = time.perf_counter()
    check_params(params, spec)
    if inputs is None:
        inputs = load_inputs(spec, base_dir)
    geometry = inputs.geometry
    panels_spec = panel_list(spec, geometry)
    fspec = frame_spec(spec, geometry)
    base_params = {k: v for k, v in (params or {}).items() if panel_key(k) is None}
    frame = build_model(fspec, dtype=torch.float64, device=tdev, base_dir=base_dir,
                        params=base_params or None, inputs=inputs)
    panels = resolve_panels(panels_spec, frame, params)
    budget = memory_budget_bytes(device, tdev)
    images, results, kernels = [], [], set()
    for i, pn in enumerate(panels):
        m = panel_model(frame, pn, first=(i == 0))
        if tdtype != torch.float64:
            m = m.astype(tdtype)
        kernel: dict = {}
        full = simulate_image(m, chunk_pixels=chunk_pixels, budget_bytes=budget, progress=progress,
                              compile=compile_, report=kernel)
        kernels.add(kernel.get("kernel"))
        f0, s0 = pn.offset
        img = full[s0:, f0:]
        images.append(img)
        results.append(PanelImage(name=pn.name, image=img, mask=pn.active.copy(),
                                  roi_mask=pn.roi_mask.copy(), report=pn.report()))
    image = torch.cat([im.reshape(-1) for im in images])
    if params:
        image = image + sum(0.0 * t.sum() for t in params.values())
    mask = np.concatenate([r.mask.reshape(-1) for r in results])
    roi_mask = np.concatenate([r.roi_mask.reshape(-1) for r in results])
    img32 = _float32(plain(image))
    st = image_stats(img32[None, :], roi_mask[None, :], active=mask[None, :])
    at = None
    if st["max_index"] is not None:
        flat = st["max_index"][1]
        for r in results:
            n = r.mask.size
            if flat < n:
                at = (r.name, flat // r.mask.shape[1], flat % r.mask.shape[1])
                break
            flat -= n
    at_m = None
    if len(panels) == 1 and at is not None:      # one panel: C's "max_I ... at" position, as a single panel's
        from nbsim.stats import max_position_m
        at_m = tuple(max_position_m(at[2] + panels[0].offset[0], at[1] + panels[0].offset[1],
                                    value(panels[0].pixel_m), frame.oversample))
    stats = RunStats(max_I=st["max_I"], max_I_at_m=at_m, max_I_at=at, mean=st["mean"], rms=st["rms"],
                     rmsd=st["rmsd"], sum=st["sum"], pixels=st["n"], wall_s=time.perf_counter() - t0,
                     kernel=",".join(sorted(k for k in kernels if k)), kernel_cache=False)
    setup = frame.report
    if geometry is not None and geometry.notes:
        setup = dataclasses.replace(setup, warnings=tuple(setup.warnings) + tuple(geometry.notes))
    return SimResult(image=image, setup=setup, mask=mask, roi_mask=roi_mask, stats=stats, panels=results)


def panel_header_info(info, i: int) -> dict:
    """Header values of panel ``i`` of a multi-panel run as a single-panel run's ``info`` (plain
    numbers, mm), from the run's ``info`` (``SimResult.info`` or ``run.json``'s: ``beam`` and
    ``panels[i]``, a ``PanelReport`` dict): the panel as a custom-convention detector of its own, its
    first pixel's corner as origin (``pix0_m``) and its own axes (``fdet``/``sdet``/``odet``); beam
    centre = where the beam meets the panel's plane, in the panel's fast/slow axes. What the SMV
    (``smv_header``) and CBF (``cbf_header``) writers take for that panel."""
    p = info["panels"][i]
    beam = np.asarray(info["beam"], float)
    f, s, n = (np.asarray(p[k], float) for k in ("fast", "slow", "normal"))
    corner = np.asarray(p["corner_mm"], float)
    close = float(corner @ n)
    ratio = float(beam @ n)
    distance = close / ratio
    hit = distance * beam - corner                   # beam spot relative to the corner, mm
    fb, sb = float(f @ hit), float(s @ hit)
    px = float(p["pixel_mm"])
    out = {k: v for k, v in dict(info).items() if k not in ("panels", "npanels")}
    out.update(fpixels=int(p["fpixels"]), spixels=int(p["spixels"]), pixel_mm=px,
               detsize_f_mm=px * int(p["fpixels"]), detsize_s_mm=px * int(p["spixels"]),
               distance_mm=distance, close_distance_mm=close, xbeam_mm=fb, ybeam_mm=sb,
               fbeam_mm=fb, sbeam_mm=sb, orgx_px=float(-(corner @ f)) / px + 0.5,
               orgy_px=float(-(corner @ s)) / px + 0.5,
               fdet=f.tolist(), sdet=s.tolist(), odet=n.tolist(), pix0_m=(corner * 1e-3).tolist(),
               dials_origin_mm=[float(corner[2]), float(corner[1]), 0.0 - float(corner[0])])
    return out


def panel_path(path: str, name: str) -> str:
    """The file of one panel of a per-panel output: ``int.img`` -> ``int_<name>.img``."""
    import os
    stem, ext = os.path.splitext(path)
    return f"{stem}_{name}{ext}"


_FILE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def panel_file_tags(names) -> List[str]:
    """What names each panel's file of a per-panel output (``panel_path``): the panel names when they
    are distinct and safe in a file name (letters, digits, ``_ . + -``), else ``panel<i>`` for every
    panel (so no two panels ever share a file)."""
    names = [str(n) for n in names]
    if len(set(names)) == len(names) and all(_FILE_TAG.fullmatch(n) for n in names):
        return names
    return [f"panel{i}" for i in range(len(names))]
