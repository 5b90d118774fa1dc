"""Fitting an experiment's parameters to observed images: losses, the parameter vector, the optimiser
loop, and uncertainties from the curvature at the optimum.

Frames and units: every image is (slow, fast) in photons per pixel (observed images already have
their ADC offset removed and are divided by their photons→counts scale); a multi-panel image is 1-D,
the panels one after another (each slow-major, the ``-floatfile`` layout), with its panels' shapes in
``ObservedImage.panel_shapes``. Parameters are schema keys of ``nbsim.params.PARAMS``, or per-panel
keys ``detector.panels.<i>.<name>`` of ``nbsim.params.PANEL_PARAMS``, in their own units (mm, deg, Å, ...).

The optimiser works in a *scaled* space: for each scalar component ``x = x0 + s·u`` (``s`` from
``scale_for``, per key and unit, so that one unit of ``u`` moves the image about as much for a
millimetre, a degree or an ångström), or, for a component with bounds ``lo < x < hi``,
``x = c + h·tanh(atanh((x0 - c)/h) + s·u/h)`` (``c``, ``h``: centre and half-width of the bounds),
which has the same slope ``s`` at ``u = 0`` where ``x0`` is at the centre. Uncertainties are computed in that
scaled space (better conditioned) and reported in the keys' units.

Several images: a ``FitParam`` with ``image=None`` is shared by all images, one with ``image=i``
belongs to image ``i`` only (per-shot orientation, scale).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nbsim.params import PANEL_PARAMS, PANEL_PREFIX, PARAMS, panel_key, param_info, param_keys_text, plain
from nbsim.spec import DeviceSpec, ExperimentSpec, SpecError

LOSSES = ("poisson", "lsq")
OPTIMIZERS = ("lbfgs", "adam")

# optimiser step unit per unit of a key (README: Refinement); a key's own entry wins
UNIT_SCALES = {"mm": 0.1, "deg": 0.1, "A": 0.1, "pixels": 1.0, "um": 10.0, "mrad": 0.1, "%": 0.01,
               "cells": 0.1, "electrons": 1.0, "": 0.01}
# cell: a, b, c in Å, alpha, beta, gamma in degrees
CELL_SCALES = (0.1, 0.1, 0.1, 0.1, 0.1, 0.1)
RELATIVE_SCALE = 0.01           # keys without a unit scale (fluence): 1 % of the start value


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitParam:
    """One refined key. ``start``, ``scale``, ``lower``, ``upper``: float64 arrays of the key's shape
    (``lower``/``upper`` ±inf where unbounded); ``image``: None when shared by all images."""
    key: str
    start: np.ndarray
    scale: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    image: Optional[int] = None

    @property
    def name(self) -> str:
        """The key, with ``@i`` for a parameter of image ``i`` only."""
        return self.key if self.image is None else f"{self.key}@{self.image}"

    @property
    def size(self) -> int:
        return int(self.start.size)


def scale_for(key: str, start: np.ndarray) -> np.ndarray:
    """Default optimiser scale of ``key`` (array of the key's shape), from its unit."""
    start = np.asarray(start, np.float64)
    if key == "crystal.cell_A_deg":
        return np.array(CELL_SCALES, np.float64)
    unit = param_info(key).unit
    if unit in UNIT_SCALES and key not in ("beam.fluence_ph_per_m2",):
        return np.full(start.shape, UNIT_SCALES[unit], np.float64)
    return np.maximum(np.abs(start) * RELATIVE_SCALE, 1e-12)


def check_refine_keys(keys: Sequence[str]) -> None:
    """Refuse (``SpecError('refine', ...)``) an empty list, a repeated key, a key that is not in the
    schema, or a schema key that cannot carry a gradient (counts, files, switches). Per-panel keys
    are those of ``PANEL_PARAMS`` (``detector.panels.<i>.<name>``); their index is checked against the
    detector by ``check_panel_keys``."""
    import difflib
    from dataclasses import fields as dc_fields
    from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec, ImageSpec
    sections = {"detector": DetectorSpec, "beam": BeamSpec, "crystal": CrystalSpec, "image": ImageSpec}
    if not keys:
        raise SpecError("refine", "lists no key; give e.g. refine='[detector.distance_mm,crystal.cell_A_deg]' "
                        f"(keys that can be refined: {param_keys_text()})")
    seen = set()
    for key in keys:
        if not isinstance(key, str):
            raise SpecError("refine", f"entries must be schema keys, got {key!r}")
        if key in seen:
            raise SpecError("refine", f"{key} is listed twice")
        seen.add(key)
        if key in PARAMS or panel_key(key) is not None:
            continue
        if key.startswith(PANEL_PREFIX):
            per_panel = ", ".join(f"{PANEL_PREFIX}<i>.{k}" for k in PANEL_PARAMS)
            raise SpecError("refine", f"{key}: unknown per-panel key; per-panel keys that can be refined: "
                            f"{per_panel} (<i>: the panel's index in geometry order, 0 first)")
        section, _, name = key.partition(".")
        known = section in sections and name in {f.name for f in dc_fields(sections[section])}
        if known:
            raise SpecError("refine", f"{key} cannot carry a gradient (counts, files, switches and "
                            f"conventions are discrete); keys that can: {param_keys_text()}")
        close = difflib.get_close_matches(key, list(PARAMS), n=1)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise SpecError("refine", f"{key}: unknown key{hint}; keys that can be refined: {param_keys_text()}")


def check_panel_keys(keys: Sequence[str], n_panels: Optional[int]) -> None:
    """Refuse (``SpecError('refine', ...)``) a per-panel key whose panel index is not one of the
    detector's ``n_panels`` panels, or any per-panel key when the detector has one panel (None)."""
    for key in keys:
        pk = panel_key(key)
        if pk is None:
            continue
        if n_panels is None:
            raise SpecError("refine", f"{key}: needs a multi-panel detector (detector.panels or "
                            "detector.geometry_file)")
        if pk[0] >= n_panels:
            raise SpecError("refine", f"{key}: panel index {pk[0]} out of range: the detector has "
                            f"{n_panels} panels (0..{n_panels - 1})")


def _as_array(value, shape, what: str) -> np.ndarray:
    a = np.asarray(value, np.float64)
    if a.shape == ():
        a = np.full(shape, float(a))
    if a.shape != tuple(shape):
        raise SpecError(what, f"must be a number or have shape {tuple(shape)}, got {list(a.shape)}")
    return a


def make_param(key: str, start, *, scale=None, bounds=None, image: Optional[int] = None) -> FitParam:
    """A ``FitParam`` for ``key`` starting at ``start``; ``scale`` (number or array) overrides the
    unit's default; ``bounds`` = ``[lower, upper]`` (numbers or arrays), the start strictly inside."""
    start = np.asarray(start, np.float64)
    shape = start.shape
    sc = scale_for(key, start) if scale is None else _as_array(scale, shape, f"fit.scales.{key}")
    if not np.all(np.isfinite(sc)) or np.any(sc <= 0):
        raise SpecError(f"fit.scales.{key}", f"must be > 0, got {sc.tolist()}")
    lo = np.full(shape, -np.inf)
    hi = np.full(shape, np.inf)
    if bounds is not None:
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise SpecError(f"fit.bounds.{key}", f"must be [lower, upper], got {bounds!r}")
        lo = _as_array(bounds[0], shape, f"fit.bounds.{key}")
        hi = _as_array(bounds[1], shape, f"fit.bounds.{key}")
        if not np.all(lo < start) or not np.all(start < hi):
            raise SpecError(f"fit.bounds.{key}", f"the start {start.tolist()} must lie strictly inside "
                            f"[{lo.tolist()}, {hi.tolist()}]")
    return FitParam(key, start, sc, lo, hi, image)


def physical(u: torch.Tensor, p: FitParam) -> torch.Tensor:
    """The key's value (its shape) for the scaled vector ``u`` (flat, ``p.size``); differentiable."""
    x0 = torch.as_tensor(p.start.reshape(-1), dtype=u.dtype)
    s = torch.as_tensor(p.scale.reshape(-1), dtype=u.dtype)
    bounded = np.isfinite(p.lower.reshape(-1)) & np.isfinite(p.upper.reshape(-1))
    x = x0 + s * u
    if bounded.any():
        lo = torch.as_tensor(np.where(bounded, p.lower.reshape(-1), 0.0), dtype=u.dtype)
        hi = torch.as_tensor(np.where(bounded, p.upper.reshape(-1), 2.0), dtype=u.dtype)
        c, h = (lo + hi) / 2, (hi - lo) / 2
        xb = c + h * torch.tanh(torch.atanh((x0 - c) / h) + s * u / h)
        x = torch.where(torch.as_tensor(bounded), xb, x)
    return x.reshape(p.start.shape)


def split(u: torch.Tensor, fparams: Sequence[FitParam]) -> List[torch.Tensor]:
    """The flat scaled vector ``u`` cut into one piece per ``FitParam``."""
    return list(torch.split(u, [p.size for p in fparams]))


def image_params(xs: Sequence[torch.Tensor], fparams: Sequence[FitParam], image: int) -> Dict[str, torch.Tensor]:
    """``params`` for ``nbsim.simulate`` of image ``image``: shared keys and that image's own."""
    return {p.key: x for x, p in zip(xs, fparams) if p.image is None or p.image == image}


def labels(fparams: Sequence[FitParam]) -> List[str]:
    """One label per scalar component: ``key`` or ``key[j]`` (with ``@i`` for per-image keys)."""
    out = []
    for p in fparams:
        if p.start.ndim == 0:
            out.append(p.name)
        else:
            out.extend(f"{p.name}[{j}]" for j in range(p.size))
    return out


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def poisson_loss(mu: torch.Tensor, obs: torch.Tensor, weight: torch.Tensor, background: float) -> torch.Tensor:
    """Half the Poisson deviance, ``Σ w·(m − y + y·log(y/m))`` with ``m = mu + background``
    (photons; ≥ 0, 0 for a perfect fit; its gradient is that of the negative log-likelihood).
    ``mu``, ``obs``, ``weight``: same shape; ``obs`` ≥ 0."""
    m = mu + background
    return (weight * (m - obs + torch.special.xlogy(obs, obs) - torch.special.xlogy(obs, m))).sum()


def lsq_loss(mu: torch.Tensor, obs: torch.Tensor, weight: torch.Tensor, background: float = 0.0) -> torch.Tensor:
    """Half the sum of squared residuals, ``½ Σ w·(mu + background − obs)²`` (photons²)."""
    r = mu + background - obs
    return 0.5 * (weight * r * r).sum()


LOSS_FUNCTIONS = {"poisson": poisson_loss, "lsq": lsq_loss}


# ---------------------------------------------------------------------------------------------
# the problem
# ---------------------------------------------------------------------------------------------

@dataclass
class ObservedImage:
    """One observed image and its model: ``obs`` and ``weight`` float64 tensors (slow, fast), obs in
    photons, weight 1 on pixels that count and 0 elsewhere; ``spec``: the starting model;
    ``inputs``: its files, read once; ``source``: a name for messages."""
    spec: ExperimentSpec
    obs: torch.Tensor
    weight: torch.Tensor
    inputs: object = None
    source: str = ""
    panel_shapes: Optional[List[Tuple[int, int]]] = None   # several panels: (spixels, fpixels) each


def panel_blur(img: torch.Tensor, shapes: Optional[Sequence[Tuple[int, int]]], sigma_px: float) -> torch.Tensor:
    """``gaussian_blur`` of an image: (slow, fast), or with ``shapes`` a 1-D multi-panel image
    blurred panel by panel (no blur across a panel's edge)."""
    if shapes is None:
        return gaussian_blur(img, sigma_px)
    parts = torch.split(img.reshape(-1), [s * f for s, f in shapes])
    return torch.cat([gaussian_blur(p.reshape(s, f), sigma_px).reshape(-1) for p, (s, f) in zip(parts, shapes)])


@dataclass
class Problem:
    images: List[ObservedImage]
    fparams: List[FitParam]
    loss: str = "poisson"
    background: float = 1e-3          # photons added to the model in the loss (keeps log finite)
    device: DeviceSpec = field(default_factory=lambda: DeviceSpec(compile=False))
    base_dir: str = "."

    @property
    def n(self) -> int:
        return sum(p.size for p in self.fparams)


def model_images(problem: Problem, xs: Sequence[torch.Tensor], device: Optional[DeviceSpec] = None):
    """The model image of every observed image for parameter values ``xs`` (one per FitParam)."""
    import nbsim
    device = device or problem.device
    return [nbsim.simulate(im.spec, device, params=image_params(xs, problem.fparams, i), inputs=im.inputs,
                           base_dir=problem.base_dir).image
            for i, im in enumerate(problem.images)]


def gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """``img`` (slow, fast) convolved with a normalised Gaussian of ``sigma_px`` pixels (zero
    padding; separable; differentiable). ``sigma_px`` = 0 returns ``img``."""
    if sigma_px <= 0:
        return img
    r = max(1, int(math.ceil(3 * sigma_px)))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = k / k.sum()
    a = img[None, None]
    a = torch.nn.functional.conv2d(a, k.view(1, 1, 1, -1), padding=(0, r))
    a = torch.nn.functional.conv2d(a, k.view(1, 1, -1, 1), padding=(r, 0))
    return a[0, 0]


def near_spots(model: np.ndarray, radius_px: int, level: float = 0.01) -> np.ndarray:
    """Bool (slow, fast): pixels within ``radius_px`` (a square) of a pixel where ``model`` exceeds
    ``level`` × its maximum — the pixels near predicted spots."""
    m = torch.as_tensor(np.asarray(model, np.float64))
    hot = (m > level * float(m.max())).to(torch.float64)[None, None]
    k = 2 * int(radius_px) + 1
    grown = torch.nn.functional.max_pool2d(hot, k, stride=1, padding=int(radius_px))
    return grown[0, 0].numpy() > 0


def image_loss(problem: Problem, mu: torch.Tensor, im: "ObservedImage", blur_px: float = 0.0) -> torch.Tensor:
    """The loss of one image. With ``blur_px`` > 0 the masked model and observed images are both
    blurred first (a smoother surrogate with a wider basin, for the first stages of a fit)."""
    fn = LOSS_FUNCTIONS[problem.loss]
    mu = mu.to(torch.float64)
    if blur_px > 0:
        return fn(panel_blur(mu * im.weight, im.panel_shapes, blur_px),
                  panel_blur(im.obs * im.weight, im.panel_shapes, blur_px),
                  torch.ones_like(im.weight), problem.background)
    return fn(mu, im.obs, im.weight, problem.background)


def total_loss(problem: Problem, u: torch.Tensor, blur_px: float = 0.0) -> torch.Tensor:
    """The loss summed over all images at scaled vector ``u`` (scalar tensor, differentiable)."""
    xs = [physical(part, p) for part, p in zip(split(u, problem.fparams), problem.fparams)]
    mus = model_images(problem, xs)
    return sum(image_loss(problem, mu, im, blur_px) for mu, im in zip(mus, problem.images))


# ---------------------------------------------------------------------------------------------
# optimiser
# ---------------------------------------------------------------------------------------------

@dataclass
class FitTrace:
    u: torch.Tensor                  # final scaled vector
    loss: List[float]                # loss at the start and after every iteration
    n_iter: int
    n_eval: int
    converged: bool
    reason: str


def minimise(fun: Callable[[torch.Tensor], torch.Tensor], u0: torch.Tensor, *, method: str = "lbfgs",
             max_iter: int = 100, lr: Optional[float] = None, tol_step: float = 1e-4,
             tol_loss: float = 1e-9, progress: Optional[Callable[[int, float, float], None]] = None,
             on_start: Optional[Callable[[float, torch.Tensor], None]] = None) -> FitTrace:
    """Minimise ``fun(u)`` (a scalar tensor) from ``u0`` with ``torch.optim`` L-BFGS (strong Wolfe
    line search) or Adam.

    Converged (from the second iteration on) when an iteration moves no scaled component by more than
    ``tol_step``, or (L-BFGS) changes the loss by less than ``tol_loss``·max(1, |loss|); an iteration
    whose line search finds no lower loss ends the fit, converged if the step before was below
    10·``tol_step``. ``progress(iteration, loss, step)`` is called after
    every iteration; ``on_start(loss, gradient)`` once at ``u0`` (it may raise to refuse the start).
    Raises ``FloatingPointError`` when the loss or its gradient is not finite at ``u0``."""
    if method not in OPTIMIZERS:
        raise SpecError("fit.optimizer", f"must be one of {', '.join(OPTIMIZERS)}; got {method!r}")
    u = u0.detach().clone().requires_grad_(True)
    cache = {}
    n_eval = [0]

    def evaluate():
        key = u.detach().clone()
        if "u" in cache and torch.equal(cache["u"], key):
            u.grad = cache["g"].clone()
            return cache["L"]
        if u.grad is not None:
            u.grad = None
        L = fun(u)
        L.backward()
        n_eval[0] += 1
        Ld = L.detach()
        cache.update(u=key, L=Ld, g=u.grad.detach().clone())
        return Ld

    L0 = evaluate()
    if not bool(torch.isfinite(L0)):
        raise FloatingPointError(f"the loss is {float(L0)} at the start")
    if not bool(torch.isfinite(u.grad).all()):
        raise FloatingPointError(f"the loss's gradient is not finite at the start ({u.grad.tolist()})")
    if on_start:
        on_start(float(L0), u.grad.detach().clone())
    losses = [float(L0)]
    if method == "lbfgs":
        opt = torch.optim.LBFGS([u], lr=1.0 if lr is None else lr, max_iter=1, max_eval=26, history_size=20,
                                tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")
    else:
        opt = torch.optim.Adam([u], lr=0.05 if lr is None else lr)
    converged, reason, it, prev_step = False, f"stopped after max_iter={max_iter} iterations", 0, math.inf
    for it in range(1, max_iter + 1):
        before = u.detach().clone()
        if method == "lbfgs":
            opt.step(evaluate)  # one iteration per call (max_eval: its line search may evaluate 25 times)
        else:
            evaluate()
            opt.step()
        L = evaluate()
        step = float((u.detach() - before).abs().max())
        losses.append(float(L))
        if progress:
            progress(it, float(L), step)
        if not math.isfinite(losses[-1]):
            reason = f"the loss became {losses[-1]} at iteration {it}"
            break
        small_change = abs(losses[-2] - losses[-1]) <= tol_loss * max(1.0, abs(losses[-1]))
        if step == 0.0:
            # the line search found no lower loss: at the minimum to the precision of the loss, if the
            # iteration before had already nearly stopped moving
            converged = it >= 2 and prev_step <= 10 * tol_step
            reason = (f"the line search found no lower loss after a step of {prev_step:.2g} (largest "
                      f"scaled gradient {float(cache['g'].abs().max()):.3g})")
            break
        # (the first L-BFGS step is a short gradient step: it says nothing about convergence)
        if it >= 2 and step <= tol_step:
            converged, reason = True, f"step below fit.tol_step={tol_step:g}"
            break
        if it >= 2 and small_change and method == "lbfgs":
            converged, reason = True, f"loss change below fit.tol_loss={tol_loss:g} (relative)"
            break
        prev_step = step
    return FitTrace(u.detach(), losses, it, n_eval[0], converged, reason)


# ---------------------------------------------------------------------------------------------
# uncertainties
# ---------------------------------------------------------------------------------------------

def jacobian(problem: Problem, u: torch.Tensor):
    """``(mus, J)``: the model image of every image at ``u`` (list of (slow, fast) float64 tensors)
    and d(model image)/du (list of (slow, fast, n)), by forward-mode automatic differentiation (one
    pass per scaled component) through the eager reference kernel (not the compiled one: forward-mode
    tangents through it come back as zeros)."""
    import torch.autograd.forward_ad as fwAD
    device = dataclasses.replace(problem.device, compile=False, dtype="float64")
    cols: List[List[torch.Tensor]] = [[] for _ in problem.images]
    mus: List[torch.Tensor] = []
    n = u.numel()
    for j in range(n):
        with fwAD.dual_level():
            t = torch.zeros(n, dtype=torch.float64)
            t[j] = 1.0
            ud = fwAD.make_dual(u.detach().to(torch.float64), t)
            xs = [physical(part, p) for part, p in zip(split(ud, problem.fparams), problem.fparams)]
            for i, mu in enumerate(model_images(problem, xs, device)):
                primal, tan = fwAD.unpack_dual(mu)
                if j == 0:
                    mus.append(plain_tensor(primal))
                cols[i].append(torch.zeros_like(mus[i]) if tan is None else plain_tensor(tan))
    return mus, [torch.stack(c, dim=-1) for c in cols]


def gradient_and_curvature(problem: Problem, mus: Sequence[torch.Tensor], J: Sequence[torch.Tensor]):
    """``(loss, g, H, c)`` at the point where ``mus`` and ``J`` were computed, all in scaled space:
    the loss, its gradient ``Jᵀ ∂loss/∂mu``, the Fisher information (Poisson: ``Jᵀ diag(w/m) J``) or
    Gauss-Newton Hessian (least squares: ``Jᵀ diag(w) J``), and ``c``, the factor that makes
    ``c·H⁻¹`` the covariance (1 for Poisson, the residual variance ``Σ w r² / (n − p)`` for least
    squares). float64 tensors; ``g`` (n,), ``H`` (n, n)."""
    n = J[0].shape[-1]
    loss = torch.zeros((), dtype=torch.float64)
    g = torch.zeros(n, dtype=torch.float64)
    H = torch.zeros(n, n, dtype=torch.float64)
    rss, npix = 0.0, 0.0
    fn = LOSS_FUNCTIONS[problem.loss]
    for im, mu, Ji in zip(problem.images, mus, J):
        m = (mu + problem.background).reshape(-1)
        Jf = Ji.reshape(-1, n)
        w = im.weight.reshape(-1)
        y = im.obs.reshape(-1)
        loss = loss + fn(mu, im.obs, im.weight, problem.background)
        if problem.loss == "poisson":
            g += Jf.T @ (w * (1 - y / m))
            H += Jf.T @ (Jf * (w / m)[:, None])
        else:
            r = m - y
            g += Jf.T @ (w * r)
            H += Jf.T @ (Jf * w[:, None])
            rss += float((w * r * r).sum())
            npix += float(w.sum())
    c = 1.0 if problem.loss == "poisson" else rss / max(npix - n, 1.0)
    return loss, g, H, c


def _solve(H: torch.Tensor, g: torch.Tensor) -> Optional[torch.Tensor]:
    """``H⁻¹ g`` with ``H`` normalised to a unit diagonal first; None when ``H`` is singular."""
    d = torch.sqrt(torch.diagonal(H))
    if not bool((d > 0).all()):
        return None
    try:
        x = torch.linalg.solve(H / torch.outer(d, d), g / d) / d
    except RuntimeError:
        return None
    return x if bool(torch.isfinite(x).all()) else None


@dataclass
class Polish:
    u: torch.Tensor
    mus: List[torch.Tensor]
    J: List[torch.Tensor]
    steps_sigma: List[float]     # length of each Newton step, in standard deviations
    converged: bool
    reason: str


def newton_polish(problem: Problem, u: torch.Tensor, *, tol_sigma: float = 0.01, max_steps: int = 6,
                  progress: Optional[Callable[[int, float, float], None]] = None) -> Polish:
    """Newton steps with the curvature of ``gradient_and_curvature`` (Fisher scoring for the
    Poisson loss, Gauss-Newton for least squares) from ``u``, until the step is shorter than
    ``tol_sigma`` standard deviations (``√(δᵀHδ/c)``) — a quasi-Newton optimiser stops early along a
    long narrow valley (cell against distance), this reaches the optimum the uncertainties need.
    A step that does not lower the loss is halved (up to 6 times). Returns the final point with its
    model images and Jacobians (for ``curvature``)."""
    steps: List[float] = []
    mus, J = jacobian(problem, u)
    for k in range(1, max_steps + 1):
        loss, g, H, c = gradient_and_curvature(problem, mus, J)
        delta = _solve(H, g)
        if delta is None:
            return Polish(u, mus, J, steps, False, "the curvature matrix is singular")
        dist = float(torch.sqrt(torch.clamp(delta @ H @ delta / c, min=0)))
        steps.append(dist)
        if progress:
            progress(k, float(loss), dist)
        if dist < tol_sigma:
            return Polish(u, mus, J, steps, True, f"Newton step {dist:.2g} sigma < fit.tol_sigma={tol_sigma:g}")
        t = 1.0
        for _ in range(7):
            trial = u - t * delta
            with torch.no_grad():
                new = float(total_loss(problem, trial))
            if new <= float(loss):
                break
            t /= 2
        else:
            return Polish(u, mus, J, steps, dist < 1.0,
                          f"no Newton step lowers the loss (step {dist:.2g} sigma)")
        u = trial
        mus, J = jacobian(problem, u)
    loss, g, H, c = gradient_and_curvature(problem, mus, J)
    delta = _solve(H, g)
    dist = float("nan") if delta is None else float(torch.sqrt(torch.clamp(delta @ H @ delta / c, min=0)))
    return Polish(u, mus, J, steps, dist < tol_sigma,
                  f"after {max_steps} Newton steps the next is {dist:.2g} sigma")


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain float64 tensor of ``t``'s values (no dual, no graph)."""
    return torch.from_numpy(plain(t)).to(torch.float64)


@dataclass
class Curvature:
    cov: np.ndarray          # (n, n) covariance in the keys' units
    sigma: np.ndarray        # (n,)
    corr: np.ndarray         # (n, n)
    info: np.ndarray         # (n, n) Fisher information / Gauss-Newton Hessian in scaled space
    dead: List[int]          # components the images do not depend on (zero curvature)
    note: str


def curvature(problem: Problem, u: torch.Tensor, mus: Sequence[torch.Tensor],
              J: Sequence[torch.Tensor]) -> Curvature:
    """Covariance of the fitted values from the curvature at the optimum, in scaled space.

    Poisson: the inverse Fisher information ``(Jᵀ diag(w/m) J)⁻¹`` with ``m = mu + background``.
    Least squares: the inverse Gauss-Newton Hessian of the loss times the residual variance,
    ``s² (Jᵀ diag(w) J)⁻¹`` with ``s² = Σ w r² / (n_pixels − n_params)``.
    ``mus``, ``J``: the model images and scaled Jacobians of ``jacobian`` at ``u``. The covariance of
    ``u`` is mapped to the keys' units with ``dx/du`` (the scale, times the tanh slope of bounds)."""
    n = u.numel()
    _, _, H, c = gradient_and_curvature(problem, mus, J)
    info_np = H.numpy()
    diag = np.diag(info_np).copy()
    dead = [j for j in range(n) if not diag[j] > 0]
    dxdu = _dx_du(problem.fparams, u)
    d = np.where(diag > 0, np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    norm = info_np / np.outer(d, d)               # unit diagonal: better conditioned
    note = ""
    try:
        cov_u = np.linalg.inv(norm) / np.outer(d, d)
        if dead or not np.all(np.isfinite(cov_u)) or np.any(np.diag(cov_u) <= 0):
            raise np.linalg.LinAlgError("not positive definite")
    except np.linalg.LinAlgError:
        cov_u = np.full((n, n), np.nan)
        note = "curvature matrix is singular (parameters not determined by the images); sigma is NaN"
    cov = c * cov_u * np.outer(dxdu, dxdu)
    sigma = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sigma, sigma)
    return Curvature(cov, sigma, corr, info_np, dead, note)


def _dx_du(fparams: Sequence[FitParam], u: torch.Tensor) -> np.ndarray:
    """d(physical value)/du per scalar component at ``u`` (the scale, times the tanh slope)."""
    out = []
    for part, p in zip(split(u.detach(), fparams), fparams):
        uu = part.clone().requires_grad_(True)
        x = physical(uu, p).reshape(-1)
        g = torch.autograd.grad(x.sum(), uu)[0]     # diagonal map: each x_j depends on u_j only
        out.append(g.numpy())
    return np.concatenate(out) if out else np.zeros(0)
