"""Public Python API: ExperimentSpec -> SimResult.  (engine entry point; owned by the engine author)

Contract used by the front end, the Hydra app and the writers:

simulate(spec, device=None, *, base_dir=".", progress=None) -> SimResult

SimResult.image   torch.Tensor (spixels, fpixels), configured device/dtype; exactly 0 outside ROI/mask
SimResult.float32() -> numpy float32 array (spixels, fpixels), what -floatfile writes
SimResult.info    dict of derived values, all plain Python numbers / lists:
    fpixels, spixels (int); pixel_mm, distance_mm, close_distance_mm, wavelength_A,
    xbeam_mm, ybeam_mm, fbeam_mm, sbeam_mm, fclose_mm, sclose_mm, detsize_f_mm, detsize_s_mm,
    orgx_px, orgy_px, dials_origin_mm [x, y, z], phi_deg, osc_deg, twotheta_deg,
    roi [xmin, xmax, ymin, ymax] (resolved, inclusive), convention, pivot,
    steps, sources, mosaic_domains, phisteps, oversample, thicksteps,
    max_I, max_I_at_m [Fdet, Sdet], mean, rms, rmsd, sum, omega_sum_sr,
    kernel ("compiled", "fast", "reference" or, with derivatives and device.compile=true,
    "reference-compiled": what rendered the image), wall_s
SimResult.mask    numpy bool (spixels, fpixels): pixels that were simulated (ROI and mask)
SimResult.warnings list[str]  (quirk warnings etc.)
SimResult.log      list[str]  (nanoBragg-style stdout lines describing the setup)
SimResult.panels   None, or (multi-panel detector, ``nbsim.panels``) one PanelImage per panel: then
                   ``image``/``mask``/``roi_mask`` are 1-D, the panels one after another (slow-major)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from nbsim.params import plain
from nbsim.spec import DeviceSpec, ExperimentSpec

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class SimResult:
    image: torch.Tensor
    info: dict
    mask: np.ndarray              # pixels simulated (ROI and mask file)
    roi_mask: Optional[np.ndarray] = None   # the ROI alone: what nanoBragg writes (0 outside)
    warnings: list = field(default_factory=list)
    log: list = field(default_factory=list)
    trace: list = field(default_factory=list)
    panels: Optional[list] = None  # multi-panel detector: nbsim.panels.PanelImage per panel, in order

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


def simulate(spec: ExperimentSpec, device: Optional[DeviceSpec] = None, *, params=None, inputs=None,
             base_dir=".", progress=None, trace_pixel=None, chunk_pixels=None) -> SimResult:
    """Simulate one image. See the module docstring for the result's contents.

    ``params``: schema key → tensor (the keys of ``nbsim.params.PARAMS``), each replacing the spec's
    value. A tensor with ``requires_grad`` makes ``result.image`` differentiable with respect to it
    (``result.image.sum().backward()``); forward-mode AD and ``torch.func`` work the same way.
    A key that cannot carry a gradient raises ``SpecError`` naming it.
    ``inputs``: the files the spec names, already read (``nbsim.inputs.load_inputs(spec, base_dir)``),
    e.g. once for many calls of a fitting loop; read from ``base_dir`` when not given."""
    from nbsim.engine import simulate_image
    from nbsim.experiment import build_model
    from nbsim.panels import has_panels, simulate_panels
    from nbsim.spec import compile_mode
    from nbsim.stats import image_stats

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
    kernel: dict = {}
    image = simulate_image(model, chunk_pixels=chunk_pixels, budget_bytes=budget, progress=progress,
                           compile=compile_, report=kernel)
    if params:
        # every given tensor reaches the image, with derivative exactly 0 where the experiment does
        # not depend on it (e.g. xclose_mm under a sample pivot), so backward never meets a
        # disconnected input
        image = image + sum(0.0 * t.sum() for t in params.values())
    info = model.info
    mask = np.ones((model.spixels, model.fpixels), bool) if model.mask is None else \
        model.mask.cpu().numpy()
    img32 = _float32(plain(image))
    xmin, xmax, ymin, ymax = info["roi"]
    roi_mask = np.zeros_like(mask)
    roi_mask[max(ymin, 0):ymax + 1, max(xmin, 0):xmax + 1] = True
    info.update(image_stats(img32, mask, model, roi=roi_mask))
    info["wall_s"] = time.perf_counter() - t0
    info["kernel"] = kernel.get("kernel")                  # which kernel rendered the image
    info["kernel_cache"] = bool(kernel.get("kernel_cache"))  # compiled kernels loaded from the cache
    result = SimResult(image=image, info=info, mask=mask, roi_mask=roi_mask, warnings=list(info.pop("warnings", [])),
                       log=list(info.pop("log", [])))
    if trace_pixel is not None:
        from nbsim.trace import trace_lines
        result.trace = trace_lines(model, trace_pixel, spec=spec)
    return result
