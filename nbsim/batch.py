"""Many experiments in one process: ``simulate_many(specs, device)``.

A sweep renders many images that differ in a few numbers. Rendered one process each, every image pays
for Python, torch and (with ``device.compile``) the compiled kernel; rendered here, they pay once:

* the experiments are put in **groups** of equal kernel shapes (``group_key``: detector size, resolved
  oversampling, layers, sources, φ steps, mosaic domains, dtype, device) and of equal discrete
  choices that the compiled kernels bake in (see below); the groups run one after the other, in the
  order of their first member, and within a group in the given order;
* under ``device.compile: auto`` a group is compiled when the **whole group** repays the compilation
  (the engine's single-image rule ``compile_pays_off`` applied to the sum of the group's samples),
  so the compiled kernel (``nbsim.kernel_cache``, an AOTInductor package on disk) is built once for
  the group, by its first image, and loaded by every later image and process; ``true`` / ``false``
  are taken as given;
* input files (HKL table, matrix, source list, mask) are read once per distinct file set.

Each image is rendered by ``nbsim.api.simulate`` with the group's compile flag, so it is **bit for
bit** the image that ``simulate(spec, replace(device, compile=flag))`` renders alone
(``SimResult.stats.batch_compile``, also in ``SimResult.info``, records the flag; with ``compile: false`` or ``true`` it is the
flag given). Where the group is compiled (flag true), its images are **stacked** along a leading
batch axis, ``engine.STACK_IMAGES`` per kernel call (``nbsim.api.simulate_stack``,
``engine.simulate_images``: the per-image kernels ``torch.vmap``-ed, the same arithmetic per pixel,
so the images stay bit for bit the compiled ones; info ``kernel`` "compiled-stacked"). That fills a
GPU with small images; on the CPU it costs the same as image by image. Eager groups render image by
image.

What recompiles (the compiled kernels' static configuration, ``CompiledPlan.cfg``, and input
shapes): the detector size, oversampling, layers, sources, φ steps, mosaic domains, whether the
sensor absorbs (thickness 0 or not), the point-pixel and polarization switches, Kahn factor 0 or
not, which crystal axes have N > 1, and the structure-factor table's extent: a sweep over these
builds one kernel per value. Every continuous number is a tensor input: distance, beam centre,
rotations, misset, cell, wavelength, divergence, dispersion, N, default_F, fluence, background,
steps, thickness, μ and the Kahn factor; sweeping them reuses one kernel.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from nbsim.spec import DeviceSpec, ExperimentSpec

def group_key(spec: ExperimentSpec, device: DeviceSpec, base_dir=".", matrix=None) -> tuple:
    """The key of the group ``spec`` renders in: resolved sample counts (``nbsim.checks.estimate``),
    dtype, device, and the constants the compiled kernels bake in. Equal keys: equal kernel shapes
    and one compiled kernel. ``matrix``: the matrix file as read (read here when needed and not given)."""
    from nbsim.checks import estimate
    est = estimate(spec, device, base_dir, matrix=matrix)
    c, b, d = spec.crystal, spec.beam, spec.detector
    return (device.device, device.dtype, est.fpixels, est.spixels, est.pixels, est.thicksteps,
            est.oversample, est.sources, est.phisteps, est.mosaic_domains,
            tuple(min(3, c.N if n is None else n) for n in (c.Na, c.Nb, c.Nc)),   # 1, 2 or more
            c.hkl_file, c.shape, d.thick_um == 0, d.oversample_thick, d.thicksteps, d.point_pixel,
            b.nopolar, b.kahn_factor == 0)


def _samples(spec: ExperimentSpec, device: DeviceSpec, base_dir, matrix=None) -> float:
    from nbsim.checks import estimate
    est = estimate(spec, device, base_dir, matrix=matrix)
    return float(est.pixels) * est.samples_per_pixel


def group_compile(specs: Sequence[ExperimentSpec], device: DeviceSpec, base_dir=".",
                  inputs=None) -> Optional[bool]:
    """The compile flag of one group: ``device.compile`` when it is true or false; under ``auto``
    True when the engine supports compiling the group's kernel (``engine.compile_ok``) and the whole
    group repays it (the engine's single-image threshold on the sum of the group's samples, CPU),
    else None (the engine's own per-image ``auto``: a cached kernel is used where one exists)."""
    from nbsim.spec import compile_mode
    flag = compile_mode(device.compile)
    if flag is not None or len(specs) < 2:
        return flag
    import torch

    from nbsim import engine
    from nbsim.api import resolve_device
    from nbsim.experiment import build_model
    tdev, tdtype, _ = resolve_device(device)
    if tdev.type != "cpu":
        return None
    model = build_model(specs[0], dtype=torch.float64, device=tdev, base_dir=base_dir, inputs=inputs)
    if tdtype != torch.float64:
        model = model.astype(tdtype)
    if not engine.compile_ok(model):
        return None
    total = sum(_samples(s, device, base_dir, getattr(inputs, "matrix", None)) for s in specs)
    return True if total >= engine._AUTO_COMPILE_SAMPLES else None


def plan_groups(specs: Sequence[ExperimentSpec], device: DeviceSpec, base_dir=".",
                matrices: Optional[Sequence] = None) -> List[List[int]]:
    """Indices of ``specs`` in groups of equal ``group_key``, groups in order of first member.
    ``matrices``: per spec, its matrix file as read (or None)."""
    groups: dict = {}
    for i, s in enumerate(specs):
        m = matrices[i] if matrices is not None else None
        groups.setdefault(group_key(s, device, base_dir, matrix=m), []).append(i)
    return list(groups.values())


def _inputs_key(spec: ExperimentSpec) -> tuple:
    """Specs with equal keys read the same files into the same ``Inputs``. Structure factors computed
    from a model depend on the whole experiment (wavelength for f'/f'', the detector's resolution for
    d_min): such specs share them only when they are equal."""
    c, b, d = spec.crystal, spec.beam, spec.detector
    whole = repr(spec) if c.model_file is not None else None
    return (c.hkl_file, c.mtz_column, c.model_file, c.model_dmin_A, c.model_anomalous, c.matrix_file,
            c.fdump_file, b.source_file, d.mask_file, d.geometry_file, whole)


def iter_many(specs: Sequence[ExperimentSpec], device: Optional[DeviceSpec] = None, *, base_dir=".",
              progress=None, devices: Optional[Sequence[DeviceSpec]] = None,
              inputs: Optional[Sequence] = None, solid_angle: bool = False) -> Iterator[Tuple[int, "object"]]:
    """Render ``specs`` group by group; yield ``(index, SimResult)`` as each image is done (the caller
    can store it before the next one starts). ``devices``: one DeviceSpec per spec (then ``device``
    is ignored; specs on different devices or dtypes are never grouped together). ``inputs``: per
    spec, its files as already read (``nbsim.inputs.load_inputs``, e.g. the preflight's
    ``est.inputs``), so nothing is read again; else read once per distinct file set. ``solid_angle``:
    as ``simulate``'s (the store asks for it, as for a single run)."""
    from nbsim.api import simulate, simulate_stack
    from nbsim.engine import STACK_IMAGES
    from nbsim.inputs import load_inputs
    if devices is None:
        devices = [device or DeviceSpec()] * len(specs)
    if len(devices) != len(specs):
        raise ValueError(f"simulate_many: {len(specs)} specs but {len(devices)} devices")
    by_device: dict = {}
    for i, d in enumerate(devices):
        by_device.setdefault(dataclasses.astuple(d), []).append(i)
    given = list(inputs) if inputs is not None else [None] * len(specs)
    inputs_cache: dict = {}
    for idx in by_device.values():
        dev = devices[idx[0]]
        for group in plan_groups([specs[i] for i in idx], dev, base_dir,
                                 matrices=[getattr(given[i], "matrix", None) for i in idx]):
            members = [idx[j] for j in group]
            ikey = _inputs_key(specs[members[0]])
            if ikey not in inputs_cache:
                inputs_cache[ikey] = given[members[0]] or load_inputs(specs[members[0]], base_dir)
            first = inputs_cache[ikey]
            flag = group_compile([specs[i] for i in members], dev, base_dir, inputs=first)
            run_dev = dataclasses.replace(dev, compile="auto" if flag is None else flag)
            own = {i: given[i] or (first if _inputs_key(specs[i]) == ikey else None) for i in members}
            # compiled groups: STACK_IMAGES images per kernel call where they stack
            step = STACK_IMAGES if flag is True and len(members) > 1 else 1
            for s0 in range(0, len(members), step):
                part = members[s0:s0 + step]
                rs = (simulate_stack([specs[i] for i in part], run_dev, inputs=[own[i] for i in part],
                                     base_dir=base_dir, progress=progress, solid_angle=solid_angle)
                      if len(part) > 1 else None)
                if rs is None:
                    rs = [simulate(specs[i], run_dev, base_dir=base_dir, progress=progress,
                                   inputs=own[i], solid_angle=solid_angle) for i in part]
                for i, r in zip(part, rs):
                    if getattr(r, "stats", None) is not None:
                        r.stats = dataclasses.replace(
                            r.stats, batch_compile="auto" if flag is None else flag,
                            batch_group=len(members))
                    yield i, r


def simulate_many(specs: Sequence[ExperimentSpec], device: Optional[DeviceSpec] = None, *,
                  base_dir=".", progress=None, devices: Optional[Sequence[DeviceSpec]] = None,
                  on_result: Optional[Callable[[int, "object"], None]] = None) -> list:
    """Render every spec (see the module docstring); return the ``SimResult``s in the order of
    ``specs``. ``on_result(index, result)`` is called as each image is done (in render order)."""
    out: list = [None] * len(specs)
    for i, r in iter_many(specs, device, base_dir=base_dir, progress=progress, devices=devices):
        if on_result is not None:
            on_result(i, r)
        out[i] = r
    return out


def estimated_seconds(spec: ExperimentSpec, device: DeviceSpec, base_dir=".") -> float:
    """The kernel time ``nbsim.checks.estimate`` predicts for one image (for sizing batches)."""
    from nbsim.checks import estimate
    s = estimate(spec, device, base_dir).seconds
    return s if math.isfinite(s) else 1e9
