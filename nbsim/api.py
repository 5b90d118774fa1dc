"""Public Python API: ExperimentSpec -> SimResult.  (engine entry point; owned by the engine author)

Contract used by the front end, the Hydra app and the writers:

simulate(spec, device=None, *, base_dir=".", progress=None) -> SimResult

SimResult.image   torch.Tensor (spixels, fpixels), configured device/dtype; exactly 0 outside ROI/mask
SimResult.float32() -> numpy float32 array (spixels, fpixels), what -floatfile writes
SimResult.setup   nbsim.report.SetupReport (frozen): what the setup resolved, named fields with units
    (fpixels, spixels, pixel_mm, distance_mm, xbeam_mm, ..., wavelength_A, steps, oversample, roi, ...)
SimResult.stats   RunStats (frozen): max_I, max_I_at_m (Fdet, Sdet), mean, rms, rmsd, sum, pixels,
    omega_sum_sr, wall_s, kernel ("compiled", "compiled-stacked" (``simulate_stack``), "fast", "reference" or, with derivatives and device.compile=true,
    "reference-compiled": what rendered the image), kernel_cache
SimResult.info    a read-only plain-dict view of both (``setup.to_dict()`` + ``stats.to_dict()``):
    what ``run.json`` stores under ``info``
SimResult.mask    numpy bool (spixels, fpixels): pixels that were simulated (ROI and mask)
SimResult.warnings list[str]  (quirk warnings etc.)
SimResult.log      list[str]  (nanoBragg's setup lines: ``setup.echo()``)
SimResult.panels   None, or (multi-panel detector, ``nbsim.panels``) one PanelImage per panel (its
                   geometry: ``PanelImage.report``, a ``nbsim.report.PanelReport``): then
                   ``image``/``mask``/``roi_mask`` are 1-D, the panels one after another (slow-major),
                   ``setup`` is the frame the panels share and ``info`` holds ``npanels`` and ``panels``
                   instead of the frame's pixel geometry
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

import numpy as np
import torch

from nbsim.params import plain
from nbsim.report import SetupReport
from nbsim.spec import DeviceSpec, ExperimentSpec

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class RunStats:
    """What a finished run measured: C's image statistics over the simulated pixels (``nbsim.stats``),
    where the maximum is (metres on the detector, C's last sub-pixel), and how it ran."""
    max_I: Optional[float]
    max_I_at_m: Optional[Tuple[float, float]]   # None with several panels (see max_I_at)
    mean: Optional[float]
    rms: Optional[float]
    rmsd: Optional[float]
    sum: float
    pixels: int
    wall_s: Optional[float] = None
    kernel: Optional[str] = None
    kernel_cache: bool = False
    omega_sum_sr: Optional[float] = None    # C's "solid angle subtended by detector" (nbsim.stats)
    # ---- recorded only when set (left out of to_dict when None)
    max_I_at: Optional[Tuple[str, int, int]] = None  # several panels: (panel name, slow, fast) of max_I
    batch_compile: Optional[object] = None   # nbsim.batch: the group's compile flag (True/False/"auto")
    batch_group: Optional[int] = None        # nbsim.batch: images in the group

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["max_I_at_m"] = None if self.max_I_at_m is None else list(self.max_I_at_m)
        for k in ("max_I_at", "batch_compile", "batch_group"):
            if d[k] is None:
                del d[k]
        if self.max_I_at is not None:
            d["max_I_at"] = dict(zip(("panel", "slow", "fast"), self.max_I_at))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Optional["RunStats"]:
        """From ``run.json``'s ``info`` (None when it holds no statistics)."""
        if not all(k in d for k in ("max_I", "mean", "rms", "rmsd")):
            return None
        return cls(max_I=d["max_I"], max_I_at_m=tuple(d.get("max_I_at_m") or (0.0, 0.0)), mean=d["mean"],
                   rms=d["rms"], rmsd=d["rmsd"], sum=d.get("sum", 0.0), pixels=int(d.get("pixels", 0)),
                   wall_s=d.get("wall_s"), kernel=d.get("kernel"), kernel_cache=bool(d.get("kernel_cache")),
                   omega_sum_sr=d.get("omega_sum_sr"),
                   max_I_at=(None if not d.get("max_I_at") else
                             tuple(d["max_I_at"][k] for k in ("panel", "slow", "fast"))),
                   batch_compile=d.get("batch_compile"), batch_group=d.get("batch_group"))


@dataclass
class SimResult:
    image: torch.Tensor
    setup: SetupReport
    mask: np.ndarray              # pixels simulated (ROI and mask file)
    roi_mask: Optional[np.ndarray] = None   # the ROI alone: what nanoBragg writes (0 outside)
    stats: Optional[RunStats] = None
    trace: list = field(default_factory=list)
    panels: Optional[list] = None  # multi-panel detector: nbsim.panels.PanelImage per panel, in order

    @property
    def info(self) -> Mapping:
        """Read-only plain view: ``setup.to_dict()`` then ``stats.to_dict()`` (``run.json``'s ``info``)."""
        d = self.setup.to_dict()
        if self.panels is not None:              # the panels' geometry replaces the shared frame's
            from nbsim.report import FRAME_ONLY_KEYS
            for k in FRAME_ONLY_KEYS:
                d.pop(k, None)
            d.update(npanels=len(self.panels), panels=[p.report.to_dict() for p in self.panels])
        if self.stats is not None:
            d.update(self.stats.to_dict())
        return MappingProxyType(d)

    @property
    def warnings(self) -> list:
        return list(self.setup.warnings)

    @property
    def log(self) -> list:
        """nanoBragg's setup lines (``SetupReport.echo``)."""
        return self.setup.echo()

    def float32(self) -> np.ndarray:
        """The float image as nanoBragg writes it: float32 (spixels, fpixels); with several panels
        1-D, the panels one after another (each slow-major), as ``-floatfile`` writes them."""
        return _float32(plain(self.image))

    def panel_float32(self) -> list:
        """Per panel, float32 (spixels, fpixels) (a one-element list for a single-panel run)."""
        if self.panels is None:
            return [self.float32()]
        return [_float32(plain(p.image)) for p in self.panels]


def _float32(a: np.ndarray) -> np.ndarray:
    """float64 → float32 as C casts (round to nearest, inf past 3.4e38), without NumPy's overflow
    warning: an image that overflows is reported once, by ``nbsim.checks.check_image``."""
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


def resolve_device(device: Optional[DeviceSpec]):
    device = device or DeviceSpec()
    if device.dtype not in _DTYPES:
        from nbsim.spec import SpecError
        raise SpecError("device.dtype", f"must be one of float64, float32; got {device.dtype!r}")
    dev = device.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        from nbsim.spec import SpecError
        raise SpecError("device.device", "CUDA was requested but torch sees no CUDA device")
    return torch.device(dev), _DTYPES[device.dtype], device


def memory_budget_bytes(device: DeviceSpec, torch_device) -> float:
    """Working-set budget for one chunk: the configured value, else a share of free memory."""
    if device.memory_budget_mb:
        return device.memory_budget_mb * 2 ** 20
    if torch_device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch_device)
        return 0.4 * free
    try:
        import os
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 * 2 ** 30
    return max(64 * 2 ** 20, min(0.25 * avail, 2 * 2 ** 30))


#: The engine sizes chunks from its own per-pixel estimate (``nbsim.engine.default_chunk_pixels``);
#: these measured corrections make ``device.memory_budget_mb`` bound the peak working set of every
#: path (peak RSS above the set-up model, CPU, float64; ``tests/test_memory_budget.py``):
#: reverse mode recomputes one chunk during backward and holds its saved graph, measured 1.1-1.2x
#: the forward estimate, so the engine gets this share of the budget;
BACKWARD_BUDGET_SHARE = 2.0 / 3.0
#: the blocked ("fast") kernel keeps one sample-block workspace of ``engine._CACHE_BYTES`` (16 MiB)
#: per worker thread whatever the budget (measured 11-12 MiB touched, plus a chunk's geometry):
#: below this per worker the reference kernel, whose chunks shrink with the budget, runs instead.
FAST_MIN_BUDGET_PER_WORKER = 2 * (16 << 20)


def engine_budget(model, budget_bytes: float, *, reverse_mode: bool, chunk_pixels=None) -> dict:
    """Keyword arguments for ``nbsim.engine.simulate_image`` that keep the run within
    ``budget_bytes``: the budget the engine sizes chunks with, and (CPU) the number of worker
    threads of the fast kernel, or ``fast=False`` where not even one worker's workspace fits.
    An explicit ``chunk_pixels`` is taken as given (the caller's choice of chunk size)."""
    kw = {"budget_bytes": budget_bytes}
    if reverse_mode:
        if chunk_pixels is None:
            kw["budget_bytes"] = budget_bytes * BACKWARD_BUDGET_SHARE
        return kw
    fits = int(budget_bytes // FAST_MIN_BUDGET_PER_WORKER)
    if fits < 1:
        kw["fast"] = False
    elif model.device.type == "cpu":
        kw["workers"] = max(1, min(torch.get_num_threads(), fits))
    return kw


def simulate(spec: ExperimentSpec, device: Optional[DeviceSpec] = None, *, params=None, inputs=None,
             base_dir=".", progress=None, trace_pixel=None, chunk_pixels=None,
             solid_angle: bool = False) -> SimResult:
    """Simulate one image. See the module docstring for the result's contents.

    ``params``: schema key → tensor (the keys of ``nbsim.params.PARAMS``), each replacing the spec's
    value. A tensor with ``requires_grad`` makes ``result.image`` differentiable with respect to it
    (``result.image.sum().backward()``); forward-mode AD and ``torch.func`` work the same way.
    A key that cannot carry a gradient raises ``SpecError`` naming it.
    ``inputs``: the files the spec names, already read (``nbsim.inputs.load_inputs(spec, base_dir)``),
    e.g. once for many calls of a fitting loop; read from ``base_dir`` when not given.
    ``solid_angle``: also sum the detector's solid angle (``stats.omega_sum_sr``, the line C prints;
    a pass over every pixel's geometry, so off by default: the front end and the store ask for it)."""
    from nbsim.engine import simulate_image
    from nbsim.experiment import build_model
    from nbsim.panels import has_panels, simulate_panels
    from nbsim.spec import compile_mode

    if has_panels(spec):
        return simulate_panels(spec, device, params=params, inputs=inputs, base_dir=base_dir,
                               progress=progress, chunk_pixels=chunk_pixels, trace_pixel=trace_pixel)

    tdev, tdtype, device = resolve_device(device)
    compile_ = compile_mode(device.compile)
    t0 = time.perf_counter()
    # the setup (geometry, lattice, auto oversampling) is always resolved in float64, so a float32
    # run samples exactly what the float64 run samples; only the kernel runs in the chosen dtype
    model = build_model(spec, dtype=torch.float64, device=tdev, base_dir=base_dir, params=params,
                        inputs=inputs)
    if tdtype != torch.float64:
        model = model.astype(tdtype)
    budget = memory_budget_bytes(device, tdev)
    reverse = bool(params) and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in params.values())
    kernel: dict = {}
    image = simulate_image(model, chunk_pixels=chunk_pixels, progress=progress, compile=compile_, report=kernel,
                           **engine_budget(model, budget, reverse_mode=reverse, chunk_pixels=chunk_pixels))
    if params:
        # every given tensor reaches the image, with derivative exactly 0 where the experiment does
        # not depend on it (e.g. xclose_mm under a sample pivot), so backward never meets a
        # disconnected input
        image = image + sum(0.0 * t.sum() for t in params.values())
    result = _result(model, image, kernel, time.perf_counter() - t0, solid_angle)
    if trace_pixel is not None:
        from nbsim.trace import trace_lines
        result.trace = trace_lines(model, trace_pixel, spec=spec)
    return result


def _result(model, image, kernel: dict, wall_s: float, solid_angle: bool) -> SimResult:
    """The ``SimResult`` of ``model``'s rendered ``image``: masks, statistics, setup report;
    ``kernel``: the engine's report (which kernel, whether from the cache)."""
    from nbsim.stats import image_stats, solid_angle_sum_sr
    mask = np.ones((model.spixels, model.fpixels), bool) if model.mask is None else \
        model.mask.cpu().numpy()
    img32 = _float32(plain(image))
    xmin, xmax, ymin, ymax = model.report.roi
    roi_mask = np.zeros_like(mask)
    roi_mask[max(ymin, 0):ymax + 1, max(xmin, 0):xmax + 1] = True
    st = image_stats(img32, mask, model, roi=roi_mask)
    stats = RunStats(max_I=st["max_I"], max_I_at_m=tuple(st["max_I_at_m"]), mean=st["mean"], rms=st["rms"],
                     rmsd=st["rmsd"], sum=st["sum"], pixels=st["pixels"], wall_s=wall_s,
                     kernel=kernel.get("kernel"),                      # which kernel rendered the image
                     kernel_cache=bool(kernel.get("kernel_cache")),   # compiled kernels from the cache
                     omega_sum_sr=solid_angle_sum_sr(model) if solid_angle else None)
    return SimResult(image=image, setup=model.report, mask=mask, roi_mask=roi_mask, stats=stats)


def simulate_stack(specs, device: Optional[DeviceSpec] = None, *, inputs=None, base_dir=".",
                   progress=None, solid_angle: bool = False) -> Optional[list]:
    """Render several experiments with the compiled kernel stacked along a batch axis
    (``nbsim.engine.simulate_images``): the ``SimResult`` of each, bit for bit what
    ``simulate(spec, replace(device, compile=True))`` gives alone, or None where they cannot be
    stacked (other kernel shapes or discrete choices, several panels, a kernel that does not
    compile): render them one at a time then. ``inputs``: per spec, its files as read, or None.
    Each result's ``wall_s`` is the stack's time divided among its images."""
    from nbsim.engine import simulate_images
    from nbsim.experiment import build_model
    from nbsim.panels import has_panels
    if not specs or any(has_panels(s) for s in specs):
        return None
    tdev, tdtype, device = resolve_device(device)
    t0 = time.perf_counter()
    inputs = list(inputs) if inputs is not None else [None] * len(specs)
    models = []
    for spec, inp in zip(specs, inputs):
        m = build_model(spec, dtype=torch.float64, device=tdev, base_dir=base_dir, inputs=inp)
        models.append(m.astype(tdtype) if tdtype != torch.float64 else m)
    kernel: dict = {}
    images = simulate_images(models, budget_bytes=memory_budget_bytes(device, tdev), progress=progress,
                             report=kernel)
    if images is None:
        return None
    share = (time.perf_counter() - t0) / len(models)
    return [_result(m, im, kernel, share, solid_angle) for m, im in zip(models, images)]
