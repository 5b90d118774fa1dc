"""The Hydra app behind ``python -m nbsim.refine``: fit schema keys of a model to observed images.

    python -m nbsim.refine observed=PATH refine='[key,key,...]' <model overrides of python -m nbsim>

``observed=PATH`` is short for ``observed.path=PATH`` (a list of paths fits several images, with the
keys of ``fit.per_image`` per image and the others shared). With several panels an image is raw
float32 in the ``-floatfile`` layout, or one file per panel (SMV or raw float32): the ``-intfile``
name (``observed=i.img`` reads ``i_<panel>.img``, as the front end and the store's ``int.img`` name
them) or a list of files in geometry order (``observed='[[a.img,b.img]]'``; ``observed_files``). The result is stored in
``<store.root>/refine/<hash>/`` (hash of the starting model, the observed files' contents and every
refine/fit setting), written atomically and reused when the same command runs again::

    result.json   {"params": {key: {"start", "value", "sigma"}}, "correlation": {"labels", "matrix"},
                   "loss": [...], "converged", "n_iter", "wall_s", ...}
    loss.png      loss against iteration
    residual.png  observed | model | residual (one row per image)
    fitted.yaml   the fitted model: python -m nbsim --config-path <folder> --config-name fitted
    config.yaml   the refine configuration

Every configuration or input error ends as one line on stderr (``nbsim.refine: error: ...``), exit
status 2 and nothing written; HYDRA_FULL_ERROR=1 gives the traceback instead. The last line printed
on stdout is the result folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from nbsim.spec import ExperimentSpec, SpecError, spec_from_dict, spec_to_dict
from pipeline.app import run_app, run_task
from pipeline.compose import CONF_DIR, NbsimConfig, cfg_to_spec

PROG = "nbsim.refine"
REFINE_SCHEMA = 1                     # bump when the meaning of a stored refinement changes
NOT_IN_APP = ("crystal.matrix", "crystal.F_table")   # fitted values with no config key to write


@dataclass
class ObservedConfig:
    path: Any = MISSING
    adc: float = 40.0
    scale: float = 1.0
    format: str = "auto"
    mask: Optional[str] = None
    roi: Optional[List[int]] = None
    near_spots_px: Optional[int] = None
    start: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class FitConfig:
    loss: str = "poisson"
    optimizer: str = "lbfgs"
    max_iter: int = 100
    lr: Optional[float] = None
    tol_step: float = 1e-4
    tol_loss: float = 1e-10
    background: float = 1e-3
    scales: Dict[str, Any] = field(default_factory=dict)
    bounds: Dict[str, Any] = field(default_factory=dict)
    per_image: List[str] = field(default_factory=list)
    blur_px: List[float] = field(default_factory=lambda: [2.0, 0.0])
    newton_steps: int = 6
    tol_sigma: float = 0.01


@dataclass
class RefineStoreConfig:
    root: str = "outputs"
    force: bool = False


@dataclass
class RefineConfig(NbsimConfig):
    store: RefineStoreConfig = field(default_factory=RefineStoreConfig)
    observed: ObservedConfig = field(default_factory=ObservedConfig)
    refine: List[str] = MISSING
    fit: FitConfig = field(default_factory=FitConfig)


ConfigStore.instance().store(name="nbsim_refine_schema", node=RefineConfig)
_MODEL_KEYS = [f.name for f in fields(NbsimConfig) if f.name != "store"]


def observed_shorthand(args: Sequence[str]) -> List[str]:
    """``observed=X`` → ``observed.path=X`` (the rest unchanged)."""
    return ["observed.path=" + a[len("observed="):] if a.startswith("observed=") else a for a in args]


def compose_refine(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/refine.yaml`` with ``overrides`` as the app does (tests, other tools)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=PROG):
            return compose(config_name="refine", overrides=observed_shorthand(overrides))
    finally:
        restore_gh_from_backup(backup)


# ---------------------------------------------------------------------------------------------
# config -> problem
# ---------------------------------------------------------------------------------------------

def _container(cfg: DictConfig, key: str):
    return OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True) \
        if OmegaConf.is_config(cfg[key]) else cfg[key]


def model_spec(cfg: DictConfig):
    """The starting model ``(ExperimentSpec, DeviceSpec)`` of a composed refine config."""
    return cfg_to_spec(OmegaConf.masked_copy(cfg, _MODEL_KEYS))


def refine_settings(cfg: DictConfig) -> dict:
    """The refine-specific settings as plain data, validated: ``observed`` (with ``paths``), ``refine``,
    ``fit``."""
    from nbsim.refine.core import LOSSES, OPTIMIZERS, check_refine_keys
    from nbsim.refine.observed import FORMATS
    if OmegaConf.is_missing(cfg, "refine"):
        raise SpecError("refine", "is required: the keys to fit, e.g. refine='[detector.distance_mm]'")
    if OmegaConf.is_missing(cfg.observed, "path"):
        raise SpecError("observed", "is required: the observed image, observed=PATH (SMV or raw float32)")
    obs = _container(cfg, "observed")
    keys = list(_container(cfg, "refine"))
    fit = _container(cfg, "fit")
    check_refine_keys(keys)
    for key in keys:
        if key in NOT_IN_APP:
            raise SpecError("refine", f"{key} is refined through the Python API only "
                            "(nbsim.refine.core), its fitted value has no config key")
    paths = obs["path"] if isinstance(obs["path"], list) else [obs["path"]]
    one = lambda p: isinstance(p, str) and bool(p)           # noqa: E731
    if not paths or not all(one(p) or (isinstance(p, list) and p and all(one(q) for q in p)) for p in paths):
        raise SpecError("observed", "must be a file path, a list of paths (several images), or per image a "
                        f"list of per-panel files ([[p0.img,p1.img]]), got {obs['path']!r}")
    obs["paths"] = paths
    if obs["format"] not in FORMATS:
        raise SpecError("observed.format", f"must be one of {', '.join(FORMATS)}; got {obs['format']!r}")
    if obs["near_spots_px"] is not None and not obs["near_spots_px"] >= 0:
        raise SpecError("observed.near_spots_px", f"must be >= 0 pixels (or null), got {obs['near_spots_px']!r}")
    if not obs["scale"] > 0:
        raise SpecError("observed.scale", f"must be > 0, got {obs['scale']!r}")
    if fit["loss"] not in LOSSES:
        raise SpecError("fit.loss", f"must be one of {', '.join(LOSSES)}; got {fit['loss']!r}")
    if fit["optimizer"] not in OPTIMIZERS:
        raise SpecError("fit.optimizer", f"must be one of {', '.join(OPTIMIZERS)}; got {fit['optimizer']!r}")
    if not fit["max_iter"] >= 1:
        raise SpecError("fit.max_iter", f"must be >= 1, got {fit['max_iter']!r}")
    if fit["lr"] is not None and not fit["lr"] > 0:
        raise SpecError("fit.lr", f"must be > 0 (or null), got {fit['lr']!r}")
    if not fit["newton_steps"] >= 0:
        raise SpecError("fit.newton_steps", f"must be >= 0, got {fit['newton_steps']!r}")
    for name in ("tol_step", "tol_loss", "tol_sigma"):
        if not fit[name] >= 0:
            raise SpecError(f"fit.{name}", f"must be >= 0, got {fit[name]!r}")
    if not fit["background"] >= 0:
        raise SpecError("fit.background", f"must be >= 0, got {fit['background']!r}")
    if fit["loss"] == "poisson" and not fit["background"] > 0:
        raise SpecError("fit.background", "must be > 0 with fit.loss=poisson (log of the model)")
    blur = fit["blur_px"]
    if not blur or any(not b >= 0 for b in blur) or blur[-1] != 0:
        raise SpecError("fit.blur_px", f"must be a list of blur widths >= 0 (pixels) ending with 0 (the "
                        f"loss itself, which the sigmas come from), got {blur!r}")
    for group in ("scales", "bounds"):
        for key in fit[group]:
            if key not in keys:
                raise SpecError(f"fit.{group}", f"{key} is not in refine ({', '.join(keys)})")
    for key in fit["per_image"]:
        if key not in keys:
            raise SpecError("fit.per_image", f"{key} is not in refine ({', '.join(keys)})")
    if obs["start"]:
        if len(obs["start"]) != len(paths):
            raise SpecError("observed.start", f"must have one entry per image ({len(paths)}), "
                            f"got {len(obs['start'])}")
        for entry in obs["start"]:
            for key in entry or {}:
                if key not in fit["per_image"]:
                    raise SpecError("observed.start", f"{key} is not in fit.per_image "
                                    f"({', '.join(fit['per_image']) or 'empty'}): only per-image keys "
                                    "have per-image starts")
    return {"observed": obs, "refine": keys, "fit": fit}


# keys whose derived value the setup reports under another name in ``nbsim.report.SetupReport``
REPORT_NAMES = {"beam.fluence_ph_per_m2": "fluence"}


def start_values(spec: ExperimentSpec, start, keys: Sequence[str], panels=None) -> Dict[str, np.ndarray]:
    """The starting value of every refined key: the spec's, else the value the setup derived
    (``start``: the start model's ``SimResult``; its ``setup`` report gives e.g. the beam centre
    nanoBragg puts at the detector centre, the default fluence). Per-panel keys
    (``detector.panels.<i>.<name>``): the panel's own value in ``panels`` (the ``PanelSpec``s of the
    spec or its geometry file), else the resolved one (``origin_mm``: the detector's ``pix0``)."""
    from nbsim.params import panel_key
    out = {}
    for key in keys:
        pk = panel_key(key)
        if pk is not None:
            i, name = pk
            v = getattr(panels[i], name)
            if v is None and name == "origin_mm":
                v = start.panels[i].report.origin_mm
            out[key] = np.asarray(v, np.float64)
            continue
        group, name = key.split(".", 1)
        v = getattr(getattr(spec, group), name, None)
        if v is None:
            v = getattr(start.setup, REPORT_NAMES.get(key, name), None)
        if v is None:
            raise SpecError("refine", f"{key} has no value in the starting model; set it, e.g. {key}=...")
        out[key] = np.asarray(v, np.float64)
    return out


def with_values(spec: ExperimentSpec, values: Dict[str, np.ndarray], panels=None, geometry=None) -> ExperimentSpec:
    """The spec with each ``key`` set to its value (numbers and lists, as a user writes them).

    Per-panel keys set ``detector.panels.<i>.<name>``; a detector read from a geometry file
    (``geometry``, its ``panels``) is then written out as what the file resolves to: its frame
    (``nbsim.panels.frame_spec``: custom convention, distance, pixel, the file's beam) and the list of
    its panels, so the fitted model is one config without the file."""
    import dataclasses as dc
    from nbsim.params import panel_key
    per_panel = {panel_key(k): v for k, v in values.items() if panel_key(k) is not None}
    base = spec
    if per_panel and spec.detector.panels is None:
        from nbsim.panels import frame_spec
        base = frame_spec(spec, geometry)
    d = spec_to_dict(base)
    if per_panel:
        d["detector"]["panels"] = [dc.asdict(pn) for pn in panels]
        for (i, name), v in per_panel.items():
            d["detector"]["panels"][i][name] = np.asarray(v, np.float64).tolist()
    for key, v in values.items():
        if panel_key(key) is not None:
            continue
        group, name = key.split(".", 1)
        d[group][name] = np.asarray(v, np.float64).tolist()
    return spec_from_dict(d)


def refine_hash(model_hash: str, observed_digests: Sequence[str], mask_digest: Optional[str],
                settings: dict) -> str:
    """Folder name of a refinement: the starting model's config hash, the observed images' and mask's
    contents, and every refine/fit/observed setting except the paths."""
    obs = {k: v for k, v in settings["observed"].items() if k not in ("path", "paths", "mask")}
    doc = {"schema": REFINE_SCHEMA, "model": model_hash, "observed": list(observed_digests),
           "mask": mask_digest, "observed_settings": obs, "refine": settings["refine"], "fit": settings["fit"]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolve(path: str, base_dir) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def observed_files(entry, base_dir, tags=None) -> List[Path]:
    """The files of one observed image ``entry`` (an item of ``observed.path``): ``[file]``, or with
    several panels (``tags``: the panels' file tags in geometry order, ``pipeline.store.panel_tags``)
    one file per panel: ``entry`` a list of files in geometry order, or a name that is no file, taken
    as the template the front end's ``-intfile`` and the store's ``int.img`` use: ``<stem>_<panel><ext>``
    (``nbsim.panels.panel_path``). A count that does not match the panels, or a missing panel file,
    is one ``SpecError('observed', ...)``."""
    from nbsim.panels import panel_path
    if isinstance(entry, list):
        n = 1 if tags is None else len(tags)
        if len(entry) != n:
            raise SpecError("observed", f"{len(entry)} per-panel files {entry} for a detector of {n} panel"
                            + ("s" if n != 1 else "") + (f" ({', '.join(tags)} in geometry order)" if tags else "")
                            + ": give one file per panel")
        return [_resolve(p, base_dir) for p in entry]
    p = _resolve(entry, base_dir)
    if tags is None or len(tags) == 1 or p.exists():
        return [p]
    files = [Path(panel_path(str(p), t)) for t in tags]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        stem, ext = os.path.splitext(p.name)
        raise SpecError("observed", f"{entry}: no such file, nor the per-panel files {stem}_<panel>{ext} of the "
                        f"{len(tags)} panels ({', '.join(tags)}): missing {', '.join(missing)}")
    return files


def read_panels_observed(files: Sequence[Path], shapes, names, obs_cfg: dict):
    """(photons, valid), each (1, all pixels): the per-panel files ``files`` (SMV or raw float32, one
    per panel of ``shapes`` (spixels, fpixels) in geometry order) read and put one after another, as
    the model image (the ``-floatfile`` layout)."""
    from nbsim.refine.observed import read_observed
    got = [read_observed(f, sh, adc=obs_cfg["adc"], scale=obs_cfg["scale"], fmt=obs_cfg["format"],
                         what=f"panel {name} of the geometry") for f, sh, name in zip(files, shapes, names)]
    return (np.concatenate([a.reshape(-1) for a, _ in got])[None, :],
            np.concatenate([v.reshape(-1) for _, v in got])[None, :])


def build_problem(spec: ExperimentSpec, device, settings: dict, base_dir, start, panels=None):
    """``(Problem, start values)`` from the validated settings: observed images read and checked
    against the model's shape, weights (valid pixels ∩ ROI ∩ mask ∩ simulated pixels).
    ``start``: the starting model's ``SimResult`` (setup report, simulated pixels, image).
    ``panels``: the ``PanelSpec``s of a multi-panel detector (``pipeline.store.entry_panels``): the
    observed image is then raw float32 in the ``-floatfile`` layout (every panel one after another,
    each slow-major), read as one row of all the pixels."""
    import torch
    from nbsim.inputs import load_inputs
    from nbsim.params import plain
    from nbsim.refine.core import ObservedImage, Problem, make_param
    from nbsim.refine.observed import _raw, detect_format, read_mask, read_observed, roi_mask
    obs_cfg, fit, keys = settings["observed"], settings["fit"], settings["refine"]
    shapes = None
    if start.panels is not None:
        shapes = [tuple(p.mask.shape) for p in start.panels]
        shape = (1, sum(s * f for s, f in shapes))
        if obs_cfg["roi"] is not None:
            raise SpecError("observed.roi", "not available with several panels: give each panel's roi "
                            "(detector.panels.<i>.roi) or observed.mask (float32, the -floatfile layout)")
    else:
        shape = (start.setup.spixels, start.setup.fpixels)
    inputs = load_inputs(spec, base_dir)
    common = roi_mask(shape, obs_cfg["roi"]) & np.asarray(start.mask, bool).reshape(shape)
    if obs_cfg["near_spots_px"] is not None:
        from nbsim.refine.core import near_spots
        if shapes is None:
            common &= near_spots(start.float32(), obs_cfg["near_spots_px"])
        else:
            common &= np.concatenate([near_spots(plain(p.image), obs_cfg["near_spots_px"]).reshape(-1)
                                      for p in start.panels]).reshape(shape)
    if obs_cfg["mask"] is not None:
        common &= read_mask(_resolve(obs_cfg["mask"], base_dir), shape)
    images = []
    tags = names = None
    if shapes is not None:
        from pipeline.store import panel_tags
        tags, names = panel_tags(panels), [p.name for p in start.panels]
    for path in obs_cfg["paths"]:
        files = observed_files(path, base_dir, tags)
        p = files[0]
        if len(files) > 1 or (shapes is not None and len(shapes) == 1):
            # one file per panel (SMV or raw float32), in geometry order
            photons, valid = read_panels_observed(files, shapes, names, obs_cfg)
        else:
            if shapes is not None and (obs_cfg["format"] == "smv" or
                                       (obs_cfg["format"] == "auto"
                                        and detect_format(_raw(p, "observed")) == "smv")):
                raise SpecError("observed", f"{path}: with several panels the observed image is raw float32 in "
                                f"the -floatfile layout ({shape[1]} pixels, the panels one after another), or "
                                "one SMV per panel: the -intfile name (observed=i.img for i_<panel>.img) or "
                                "a list of files in geometry order (observed='[[a.img,b.img]]')")
            photons, valid = read_observed(p, shape, adc=obs_cfg["adc"], scale=obs_cfg["scale"],
                                           fmt=obs_cfg["format"])
        w = valid & common
        if not w.any():
            raise SpecError("observed", f"{path}: no pixel is left to fit (mask, ROI, saturation)")
        if fit["loss"] == "poisson":
            neg = int(((photons < 0) & w).sum())
            if neg:
                raise SpecError("observed", f"{path}: {neg} pixels are negative after subtracting "
                                f"observed.adc={obs_cfg['adc']:g}; the Poisson loss needs counts >= 0 "
                                "(check observed.adc, or use fit.loss=lsq)")
        obs, weight = np.where(w, photons, 0.0), w.astype(np.float64)
        if shapes is not None:                   # as the model image: 1-D, the panels one after another
            obs, weight = obs.reshape(-1), weight.reshape(-1)
        images.append(ObservedImage(spec=spec, obs=torch.from_numpy(obs), weight=torch.from_numpy(weight),
                                    inputs=inputs, source=str(path), panel_shapes=shapes))
    starts = start_values(spec, start, keys, panels)
    per_image = set(fit["per_image"]) if len(images) > 1 else set()
    own = obs_cfg["start"] or [{} for _ in images]
    fparams = []
    for key in keys:
        owners = range(len(images)) if key in per_image else [None]
        for i in owners:
            x0 = starts[key] if i is None or key not in (own[i] or {}) else np.asarray(own[i][key], np.float64)
            if x0.shape != starts[key].shape:
                raise SpecError("observed.start", f"image {i}: {key} must have shape {list(starts[key].shape)}, "
                                f"got {list(x0.shape)}")
            fparams.append(make_param(key, x0, scale=fit["scales"].get(key),
                                      bounds=fit["bounds"].get(key), image=i))
    problem = Problem(images=images, fparams=fparams, loss=fit["loss"], background=fit["background"],
                      device=device, base_dir=str(base_dir))
    return problem, starts


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------

def loss_png(losses: Sequence[float], out: Path, title: str = "") -> Path:
    """Loss against iteration (log scale when the loss is positive), as a PNG drawn with Pillow."""
    from PIL import Image, ImageDraw
    from pipeline.contact_sheet import _save_atomic, font
    W, H, left, right, top, bottom = 480, 300, 70, 15, 30, 40
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    fnt = font(11)
    y = np.asarray(losses, np.float64)
    ok = np.isfinite(y)
    use_log = bool(ok.any() and (y[ok] > 0).all())
    v = np.log10(y) if use_log else y
    lo, hi = (float(v[ok].min()), float(v[ok].max())) if ok.any() else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    n = max(len(y) - 1, 1)
    pts = [(left + (W - left - right) * i / n, top + (H - top - bottom) * (1 - (vi - lo) / (hi - lo)))
           for i, vi in enumerate(v) if np.isfinite(vi)]
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    if len(pts) > 1:
        d.line(pts, fill=(200, 30, 30), width=2)
    for x, yy in pts:
        d.ellipse([x - 2, yy - 2, x + 2, yy + 2], fill=(200, 30, 30))
    fmt = (lambda t: f"{10 ** t:.4g}") if use_log else (lambda t: f"{t:.4g}")
    d.text((4, top - 6), fmt(hi), fill=(0, 0, 0), font=fnt)
    d.text((4, H - bottom - 6), fmt(lo), fill=(0, 0, 0), font=fnt)
    d.text((left, H - bottom + 6), "0", fill=(0, 0, 0), font=fnt)
    d.text((W - right - 30, H - bottom + 6), str(len(y) - 1), fill=(0, 0, 0), font=fnt)
    d.text((left + 120, H - bottom + 20), "iteration", fill=(0, 0, 0), font=fnt)
    d.text((left, 8), title or ("loss (log scale)" if use_log else "loss"), fill=(0, 0, 0), font=fnt)
    return _save_atomic(img, out)


def picture(a: np.ndarray, shapes=None) -> np.ndarray:
    """An image as (slow, fast) for the pictures: itself, or with ``shapes`` (several panels) the 1-D
    panels one after another stacked along slow, each at the left, 0 right of a narrower panel."""
    if shapes is None:
        return a
    flat = np.asarray(a).reshape(-1)
    out = np.zeros((sum(s for s, _ in shapes), max(f for _, f in shapes)), flat.dtype)
    row = start = 0
    for s, f in shapes:
        out[row:row + s, :f] = flat[start:start + s * f].reshape(s, f)
        row, start = row + s, start + s * f
    return out


def residual_png(rows: Sequence[tuple], out: Path, title: str = "") -> Path:
    """One row per image: observed | model | residual (model − observed), observed and model on the
    observed image's log scale. ``rows``: (observed, model, weight) float arrays (slow, fast)."""
    from PIL import Image
    from pipeline.contact_sheet import _save_atomic, log_scale, panels_png, signed_diff_rgb
    sheets = []
    for k, (obs, mu, w) in enumerate(rows):
        obs = np.where(w > 0, obs, 0.0)
        r = np.where(w > 0, mu - obs, 0.0)
        m = float(np.abs(r).max()) if r.size else 0.0
        tmp = Path(out).with_name(f".{Path(out).name}.{k}.part.png")
        panels_png([(log_scale(obs), f"observed{f' {k}' if len(rows) > 1 else ''}, max {obs.max():.4g}"),
                    (log_scale(mu, like=obs), f"model, max {mu.max():.4g}"),
                    (signed_diff_rgb(r, m), f"model - observed (red +, blue -), full scale {m:.3g}")],
                   tmp, title=title if k == 0 else None)
        with Image.open(tmp) as im:
            sheets.append(im.convert("RGB"))
        tmp.unlink()
    W = max(s.size[0] for s in sheets)
    H = sum(s.size[1] for s in sheets)
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    y = 0
    for s in sheets:
        sheet.paste(s, (0, y))
        y += s.size[1]
    return _save_atomic(sheet, out)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def _progress(max_iter: int, stage: str = ""):
    """A progress line on stderr (redrawn in place on a terminal, one line per iteration otherwise)."""
    tty = sys.stderr.isatty()

    def show(it: int, loss: float, step: float) -> None:
        n = 20
        filled = int(round(n * it / max_iter))
        line = (f"refine {stage} [{'#' * filled}{'.' * (n - filled)}] {it}/{max_iter} loss {loss:.6g} "
                f"step {step:.2g}")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    show.finish = (lambda: print("", file=sys.stderr) if tty else None)
    return show


def _params_doc(fparams, values, sigma) -> dict:
    """``{name: {"start", "value", "sigma", "unit"}}`` with lists for list keys."""
    from nbsim.params import param_info
    out, j = {}, 0
    for p, x in zip(fparams, values):
        k = p.size
        sig = sigma[j:j + k]
        one = p.start.ndim == 0
        out[p.name] = {"start": float(p.start) if one else p.start.tolist(),
                       "value": float(x) if one else np.asarray(x).tolist(),
                       "sigma": float(sig[0]) if one else sig.tolist(),
                       "unit": param_info(p.key).unit}
        j += k
    return out


def run_refine(cfg: DictConfig, base_dir, log=print) -> tuple:
    """Run (or reuse) the refinement of a composed config; returns ``(folder, reused, result)``."""
    import torch
    import nbsim
    from nbsim.io.atomic import atomic_dir
    from nbsim.refine.core import (check_panel_keys, curvature, jacobian, labels, minimise, newton_polish,
                                   physical, split, total_loss)
    from pipeline.hashing import config_hash, file_sha256
    from pipeline.store import check_device, entry_panels, panel_tags

    t0 = time.perf_counter()
    spec, device = model_spec(cfg)
    settings = refine_settings(cfg)
    check_device(device)
    base_dir = Path(base_dir)
    panels = entry_panels(spec, base_dir=base_dir)          # None for one panel
    check_panel_keys(settings["refine"], None if panels is None else len(panels))
    # the starting model once, forward only: shape, derived start values, simulated pixels
    r0 = nbsim.simulate(spec, dataclasses.replace(device, compile=False), base_dir=str(base_dir))
    problem, starts = build_problem(spec, device, settings, base_dir, r0, panels)
    tags = None if panels is None else panel_tags(panels)
    # per observed image: its file's sha256, or the per-panel files' joined by "+"
    digests = ["+".join(file_sha256(f) for f in observed_files(p, base_dir, tags))
               for p in settings["observed"]["paths"]]
    mask_digest = file_sha256(_resolve(settings["observed"]["mask"], base_dir)) \
        if settings["observed"]["mask"] else None
    h = refine_hash(config_hash(spec, device, base_dir), digests, mask_digest, settings)
    if not str(cfg.store.root):
        raise SpecError("store.root", "must be a folder path, got ''")
    root = Path(cfg.store.root)
    root_abs = root if root.is_absolute() else base_dir / root
    final = root_abs / "refine" / h
    if (final / "result.json").is_file() and not cfg.store.force:
        return final, True, json.loads((final / "result.json").read_text())

    names = labels(problem.fparams)

    def refuse_dead(loss0: float, grad) -> None:
        dead = [names[j] for j in range(len(names)) if float(grad[j]) == 0.0]
        if dead:
            raise SpecError("refine", f"{', '.join(dead)}: the model image does not depend on "
                            f"{'it' if len(dead) == 1 else 'them'} here (derivative 0 at the start)")

    fit = settings["fit"]
    u = torch.zeros(problem.n, dtype=torch.float64)
    t_fit = time.perf_counter()
    stages, n_iter, n_eval = [], 0, 0
    for k, blur in enumerate(fit["blur_px"]):
        show = _progress(fit["max_iter"], f"stage {k + 1}/{len(fit['blur_px'])}, blur {blur:g} px")
        try:
            trace = minimise(lambda v: total_loss(problem, v, blur), u, method=fit["optimizer"],
                             max_iter=fit["max_iter"], lr=fit["lr"], tol_step=fit["tol_step"],
                             tol_loss=fit["tol_loss"], progress=show, on_start=refuse_dead if k == 0 else None)
        except FloatingPointError as e:
            raise SpecError("observed", f"{e}: check observed.adc/observed.scale, the mask, and that the "
                            "model and image overlap") from None
        finally:
            show.finish()
        u = trace.u
        stages.append({"blur_px": blur, "n_iter": trace.n_iter, "converged": trace.converged,
                       "stop_reason": trace.reason, "loss": trace.loss})
        n_iter += trace.n_iter
        n_eval += trace.n_eval
    fit_s = time.perf_counter() - t_fit
    # Newton polish with the curvature (its last Jacobian gives the uncertainties)
    t_unc = time.perf_counter()
    polish_losses: List[float] = []
    if fit["newton_steps"] > 0:
        show = _progress(fit["newton_steps"], "Newton steps")

        def track(k, loss, dist):
            polish_losses.append(loss)
            show(k, loss, dist)
        try:
            pol = newton_polish(problem, u, tol_sigma=fit["tol_sigma"], max_steps=fit["newton_steps"],
                                progress=track)
        finally:
            show.finish()
        u, mus, J = pol.u, pol.mus, pol.J
        converged, reason = pol.converged, pol.reason
        stages.append({"newton": True, "n_iter": len(pol.steps_sigma), "steps_sigma": pol.steps_sigma,
                       "converged": pol.converged, "stop_reason": pol.reason, "loss": polish_losses})
        n_iter += len(pol.steps_sigma)
    else:
        mus, J = jacobian(problem, u)
        converged, reason = trace.converged, trace.reason
    curv = curvature(problem, u, mus, J)
    unc_s = time.perf_counter() - t_unc
    xs = [physical(part, p) for part, p in zip(split(u, problem.fparams), problem.fparams)]
    values = [x.detach().numpy() for x in xs]
    wall = time.perf_counter() - t0
    result = {
        "params": _params_doc(problem.fparams, values, curv.sigma),
        "correlation": {"labels": names, "matrix": np.where(np.isfinite(curv.corr), curv.corr, None).tolist()},
        "loss": trace.loss + polish_losses[1:],
        "loss_kind": problem.loss,
        "converged": converged,
        "stop_reason": reason,
        "n_iter": n_iter,
        "n_eval": n_eval,
        "stages": stages,
        "wall_s": round(wall, 3),
        "fit_s": round(fit_s, 3),
        "newton_and_uncertainty_s": round(unc_s, 3),
        "uncertainty": ("inverse Fisher information" if problem.loss == "poisson"
                        else "inverse Gauss-Newton Hessian x residual variance") + (f"; {curv.note}" if curv.note else ""),
        "observed": [str(p) for p in settings["observed"]["paths"]],
        "observed_sha256": digests,
        "pixels": [int(im.weight.sum()) for im in problem.images],
        "device": device.device, "dtype": device.dtype, "compile": device.compile,
        "hash": h,
    }
    fitted_values = {p.key: v for p, v in zip(problem.fparams, values) if p.image in (None, 0)}
    geometry = problem.images[0].inputs.geometry if panels is not None else None
    fitted = with_values(spec, fitted_values, panels, geometry)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        (tmp / "fitted.yaml").write_text(fitted_yaml(fitted, device, h))
        if len(problem.images) > 1:
            for i in range(1, len(problem.images)):
                vi = {p.key: v for p, v in zip(problem.fparams, values) if p.image in (None, i)}
                (tmp / f"fitted_{i}.yaml").write_text(fitted_yaml(with_values(spec, vi, panels, geometry),
                                                                  device, h))
        (tmp / "config.yaml").write_text(f"# nbsim.refine configuration, hash {h}\n"
                                         + OmegaConf.to_yaml(OmegaConf.masked_copy(
                                             cfg, _MODEL_KEYS + ["observed", "refine", "fit", "store"])))
        loss_png(result["loss"], tmp / "loss.png", f"{problem.loss} loss (unblurred stage and Newton steps)")
        residual_png([tuple(picture(a.numpy(), im.panel_shapes) for a in (im.obs, mu, im.weight))
                      for im, mu in zip(problem.images, mus)], tmp / "residual.png", title=f"refine {h}")
        (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return final, False, result


def fitted_yaml(spec: ExperimentSpec, device, h: str) -> str:
    """A primary config for ``python -m nbsim --config-path <folder> --config-name fitted``."""
    doc = {"defaults": ["nbsim_schema", {"override hydra/job_logging": "stdout"}, "_self_"],
           **spec_to_dict(spec), "device": {**spec_to_dict(device), "compile": "auto"},
           "hydra": {"job": {"name": "nbsim", "chdir": False}, "run": {"dir": "."}, "output_subdir": None}}
    return (f"# model fitted by nbsim.refine (result {h}); rerun with\n"
            f"#   python -m nbsim --config-path <this folder> --config-name fitted\n"
            + OmegaConf.to_yaml(OmegaConf.create(doc)))


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def summary_lines(result: dict) -> List[str]:
    """Person-readable lines: one per parameter (start → value ± sigma) and the fit's outcome."""
    out = []
    for name, p in result["params"].items():
        s, v, e = (np.atleast_1d(np.asarray(p[k], float)) for k in ("start", "value", "sigma"))
        vals = ", ".join(f"{a:.6g} -> {b:.6g} ± {c:.2g}" for a, b, c in zip(s, v, e))
        out.append(f"  {name} [{p['unit']}]: {vals}")
    loss = result["loss"]
    out.append(f"{'converged' if result['converged'] else 'not converged'} ({result['stop_reason']}) after "
               f"{result['n_iter']} iterations, {result['n_eval']} evaluations; loss {loss[0]:.6g} -> "
               f"{loss[-1]:.6g}; {result['wall_s']:.1f} s (L-BFGS {result['fit_s']:.1f} s, Newton steps "
               f"and uncertainties {result['newton_and_uncertainty_s']:.1f} s)")
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="refine")
def task(cfg: DictConfig) -> str:
    return run_task(_task, cfg, PROG)


def _task(cfg: DictConfig) -> str:
    base_dir = HydraConfig.get().runtime.cwd
    folder, reused, result = run_refine(cfg, base_dir)
    if reused:
        print(f"refined earlier in {result.get('wall_s', float('nan')):.1f} s; nothing computed")
    else:
        print(f"refined {len(result['params'])} keys against {len(result['observed'])} image(s), "
              f"{result['loss_kind']} loss (hash {result['hash']}):")
    for line in summary_lines(result):
        print(line)
    print(_shown(folder))
    return str(folder)


def main() -> None:
    """Console entry point (``python -m nbsim.refine``)."""
    sys.argv[1:] = observed_shorthand(sys.argv[1:])
    run_app(task, PROG)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------
# summaries of many refinements (workflows/rules/refine.smk)
# ---------------------------------------------------------------------------------------------

def summary_row(result: dict) -> dict:
    """One CSV row of a result: outcome, then ``<key>``, ``<key>_sigma``, ``<key>_start`` per scalar
    component (``key[j]`` for list keys)."""
    row = {"observed": " ".join(result.get("observed", [])), "converged": result["converged"],
           "n_iter": result["n_iter"], "loss": result["loss"][-1], "wall_s": result["wall_s"],
           "hash": result.get("hash")}
    for name, p in result["params"].items():
        v = np.atleast_1d(np.asarray(p["value"], float))
        s = np.atleast_1d(np.asarray(p["sigma"], float))
        x0 = np.atleast_1d(np.asarray(p["start"], float))
        for j in range(v.size):
            lab = name if np.ndim(p["value"]) == 0 else f"{name}[{j}]"
            row[lab] = repr(float(v[j]))
            row[f"{lab}_sigma"] = repr(float(s[j]))
            row[f"{lab}_start"] = repr(float(x0[j]))
    return row


def write_refine_summary(items: Sequence[str], folders: Sequence[Path], csv_path) -> List[dict]:
    """The CSV (one row per refined image: ``item``, folder, outcome, values, sigmas, starts),
    written atomically."""
    rows = []
    for item, folder in zip(items, folders):
        res = json.loads((Path(folder) / "result.json").read_text())
        rows.append({"item": item, "folder": str(folder), **summary_row(res)})
    from pipeline.sweep import write_csv
    write_csv(rows, csv_path)
    return rows


def merge_overrides(*groups: Sequence[str]) -> List[str]:
    """Override lists joined with one entry per key, a later group winning (start offsets on top
    of a sweep point's model)."""
    last: Dict[str, str] = {}
    for g in groups:
        for o in g:
            last[o.split("=", 1)[0].lstrip("+~")] = o
    return list(last.values())
