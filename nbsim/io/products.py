"""Write nanoBragg's output files (float, int SMV, PGM, noise SMV) from a finished float image.

Mirrors the C output section: statistics -> float file -> int file -> pgm -> noise, with the same
default scales and the same numbers printed.  Every file is written atomically
(:func:`nbsim.io.atomic.atomic_write_bytes`); each one is handed to a background thread as soon as
its bytes are ready, so its fsync overlaps the next product's computation and the other files' fsyncs.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import numpy as np

from ..noise import noise_image_begin
from ..rng import Ran1Table
from . import atomic as _atomic
from .atomic import atomic_write_bytes
from .images import count_image, default_int_scale, default_pgm_scale, float_bytes, image_stats, int_image, pgm_bytes
from .smv import c_g, smv_bytes

__all__ = ["clock_seed", "write_products"]


def clock_seed() -> int:
    """nanoBragg's default noise (and misset) seed: ``-time(NULL)``."""
    return -int(time.time())


class _BackgroundWriter:
    """Atomic file writes in worker threads, in submission order of the returned paths.

    ``submit`` raises at once if an earlier write has already failed (no further file is started);
    leaving the ``with`` block waits for every started write, and :meth:`paths` raises the first
    failure.  Every file is atomic on its own: it is complete or absent, never partial.

    The threads are there to overlap the fsyncs; inside :func:`nbsim.io.atomic.unsynced_files`
    (sweeps: no fsync) a file is written in the calling thread instead, with the same outcomes (a
    completed future), saving a thread start and join per file (~1.5 ms a sweep point, profiled)."""

    def __init__(self, workers: int = 4) -> None:
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []

    def __enter__(self) -> "_BackgroundWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def submit(self, path, data: bytes) -> None:
        """Start writing ``data`` to ``path`` (atomically)."""
        self._raise_failed()
        if not _atomic._SYNC["files"]:                  # nothing to overlap: write it here
            f: Future = Future()
            try:
                f.set_result(atomic_write_bytes(path, data))
            except Exception as e:                      # noqa: BLE001 - raised by paths(), as threaded
                f.set_exception(e)
            self._futures.append(f)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="nbsim-write")
        self._futures.append(self._pool.submit(atomic_write_bytes, path, data))

    def paths(self) -> list[Path]:
        """Wait for every write; the written paths in submission order (the first failure raises)."""
        return [f.result() for f in self._futures]


def _spec(spec, name: str, default=None):
    if spec is None:
        return default
    if isinstance(spec, dict):
        return spec.get(name, default)
    return getattr(spec, name, default)


def write_products(img_f32, mask, info: dict, image_spec, *, float_path=None, int_path=None,
                   noise_path=None, pgm_path=None, cbf_path=None, nexus_path=None,
                   nexus_dtype: str = "float32", nexus_compression: str = "none", active=None,
                   table: Ran1Table | None = None, stats: dict | None = None) -> dict:
    """Write the requested output files and return what nanoBragg prints about them.

    Parameters
    ----------
    img_f32 : array (S, F)
        Final float image (photons/pixel), taken as float32 (C ``floatimage``).
    mask : bool array (S, F) or None
        The ROI (pixels C writes; others are 0 in every output).  Pixels excluded by a ``-mask`` file
        belong to the ROI; give them through ``active``.
    info : dict
        SMV header values (see :func:`nbsim.io.smv.smv_header`; needed when ``int_path`` or
        ``noise_path`` is given).  Optional ``max_I``: the engine's C ``max_I``; C takes it from the
        float32 image, so it equals ``image_stats(...)['max_I']`` and is computed when absent.
        Optional ``max_I_x_m``/``max_I_y_m`` only feed the ``max_I = ... at x y`` line.
    image_spec : object or dict
        Attributes ``adc`` (default 40), ``int_scale`` (None or <= 0 -> 55000/max_I, or 1 when
        max_I == 0), ``pgm_scale`` (None or <= 0 -> 250/(5*rmsd), or the int scale when rmsd == 0),
        ``noise_seed`` (C-internal value, ``-N`` for ``-seed N``; None -> ``-time()``).
    float_path, int_path, noise_path, pgm_path, cbf_path, nexus_path : path or None
        Files to write (None = skip).  CBF: int32 counts (:func:`nbsim.io.images.count_image`, the
        int file's formula without the 16-bit clip) with a miniCBF header (:mod:`nbsim.io.cbf`; needs
        ``info`` like the SMV header plus ``thick_m``, ``exposure_s``).  NeXus NXmx
        (:mod:`nbsim.io.nexus`; needs the geometry keys of ``SimResult.info``).
    nexus_dtype : 'float32' (the float image) | 'int32' (the CBF's counts)
    nexus_compression : 'none' | 'bslz4'
        Bitshuffle/LZ4 through ``hdf5plugin``.
    active : bool array (S, F), optional
        ROI and not masked (the pixels the C loop computed) for mean/rms; default ``mask``.
    table : Ran1Table, optional
        Shared ran1 table (only matters for a positive noise seed, see :mod:`nbsim.rng`).
    stats : dict, optional
        ``image_stats(img_f32, mask, active=active)`` when the caller already has it (keys
        ``max_I, mean, rms, rmsd, sum``); computed here otherwise.

    Returns
    -------
    dict: ``max_I, mean, rms, rmsd, sum, intfile_scale, pgm_scale, photons, overloads, noise_seed,
    adc, written`` (list of paths) and ``lines`` (the stdout lines C prints, in order).  ``photons``,
    ``overloads`` and ``noise_seed`` are None without ``noise_path``; ``pgm_scale`` is always computed.
    """
    a = np.asarray(img_f32, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"write_products: expected a 2-D (slow, fast) image, got shape {a.shape}")
    roi = np.ones(a.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if roi.shape != a.shape:
        raise ValueError(f"write_products: mask shape {roi.shape} != image shape {a.shape}")
    adc = _spec(image_spec, "adc")
    adc = 40.0 if adc is None else float(adc)

    st = stats if stats is not None else image_stats(a, roi, active=active)
    max_I = float(info["max_I"]) if info and info.get("max_I") is not None else st["max_I"]
    int_scale = _spec(image_spec, "int_scale")
    if int_scale is None or float(int_scale) <= 0.0:
        int_scale = default_int_scale(max_I)
    int_scale = float(int_scale)
    pgm_scale = _spec(image_spec, "pgm_scale")
    if pgm_scale is None or float(pgm_scale) <= 0.0:
        pgm_scale = default_pgm_scale(st["rmsd"], int_scale)
    pgm_scale = float(pgm_scale)

    lines: list[str] = []
    if info and "max_I_x_m" in info and "max_I_y_m" in info:
        lines.append(f"max_I = {c_g(max_I)}  at {c_g(info['max_I_x_m'])} {c_g(info['max_I_y_m'])}")
    lines.append(f"mean= {c_g(st['mean'])} rms= {c_g(st['rms'])} rmsd= {c_g(st['rmsd'])}")
    lines.append(f"intfile_scale = {c_g(int_scale)}")

    photons = overloads = seed = noise = None
    if noise_path is not None:
        # started first: where a noise worker runs the loop, the other images are made meanwhile
        seed = _spec(image_spec, "noise_seed")
        seed = clock_seed() if seed is None else int(seed)
        noise = noise_image_begin(a, seed, adc, roi, table=table)
    with _BackgroundWriter() as writer:
        if float_path is not None:
            writer.submit(float_path, float_bytes(a))
        if int_path is not None:
            writer.submit(int_path, smv_bytes(int_image(a, int_scale, adc, roi), info))
        if pgm_path is not None:
            lines.append(f"pgm_scale = {c_g(pgm_scale)}")
            writer.submit(pgm_path, pgm_bytes(a, pgm_scale, roi))
        if noise_path is not None:
            noise, photons, overloads = noise()
            lines.append(f"{photons:.0f} photons on noise image ({overloads} overloads)")
            writer.submit(noise_path, smv_bytes(noise, info))
        counts = None
        if cbf_path is not None or (nexus_path is not None and nexus_dtype == "int32"):
            counts = count_image(a, int_scale, adc, roi)
        if cbf_path is not None:
            from .cbf import cbf_bytes
            writer.submit(cbf_path, cbf_bytes(counts, info))
        if nexus_path is not None:
            from .nexus import nexus_bytes
            data = counts if nexus_dtype == "int32" else a
            writer.submit(nexus_path, nexus_bytes(data, info, dtype=nexus_dtype, compression=nexus_compression,
                                                  mask=roi))
    written = writer.paths()

    return {
        "max_I": max_I, "mean": st["mean"], "rms": st["rms"], "rmsd": st["rmsd"], "sum": st["sum"],
        "intfile_scale": int_scale, "pgm_scale": pgm_scale, "photons": photons,
        "overloads": overloads, "noise_seed": seed, "adc": adc, "written": written, "lines": lines,
    }


def _writer_args(image_spec) -> dict:
    """``image_spec`` as the writers take it: the user's seed (``-seed N``) becomes C's internal ``-N``."""
    seed = getattr(image_spec, "noise_seed", None)
    return {"adc": image_spec.adc, "int_scale": image_spec.int_scale, "pgm_scale": image_spec.pgm_scale,
            "noise_seed": None if seed is None else -int(seed)}


def write_stored(img_f32, roi_mask, info: Mapping, image_spec, **paths) -> dict:
    """Write products of a stored result from its float image and ``run.json``'s ``info`` (the
    ``SimResult.info`` view the run stored: header values and statistics), exactly as
    ``write_result`` wrote them for the live result."""
    header = dict(info)
    at = header.get("max_I_at_m")
    if at is not None:
        header["max_I_x_m"], header["max_I_y_m"] = at
    keys = ("max_I", "mean", "rms", "rmsd", "sum")
    stats = {k: header[k] for k in keys} if all(k in header for k in keys) else None
    return write_products(img_f32, roi_mask, header, _writer_args(image_spec), active=roi_mask,
                          stats=stats, **paths)


def write_result(result, image_spec, *, img32=None, **paths) -> dict:
    """Write a ``SimResult``'s products: the one place where the description meets the writers.

    ``img32``: ``result.float32()`` when the caller already has it (not converted again).

    ``image_spec.noise_seed`` is the user's seed (``-seed N``); the writers take C's internal ``-N``.
    The ROI (what nanoBragg writes, 0 outside) comes from ``result.roi_mask``; pixels skipped by a mask
    file are inside it but not simulated (``result.mask``). Header values come from ``result.setup``,
    the statistics (computed by the API with the same call) from ``result.stats``.
    """
    header = result.setup.to_dict()                    # SMV header values
    stats = None
    st = result.stats
    if st is not None:
        header.update(max_I=st.max_I, max_I_x_m=st.max_I_at_m[0], max_I_y_m=st.max_I_at_m[1])
        stats = {"max_I": st.max_I, "mean": st.mean, "rms": st.rms, "rmsd": st.rmsd, "sum": st.sum}
    return write_products(result.float32() if img32 is None else img32, result.roi_mask, header,
                          _writer_args(image_spec), active=result.mask, stats=stats, **paths)


def write_panel_result(result, i: int, image_spec, *, img32=None, **paths) -> dict:
    """``write_result`` of panel ``i`` of a multi-panel ``SimResult`` as a single image (a one-panel
    geometry file: float, int, noise, PGM, CBF and NeXus as for a single-panel run). Header values:
    ``nbsim.panels.panel_header_info`` (the panel as a detector of its own; ``info['panels']`` for
    NeXus); statistics: ``result.stats`` (a one-panel run's are the panel's)."""
    from nbsim.panels import panel_header_info
    header = panel_header_info(result.info, i)
    p = result.panels[i]
    st = result.stats
    header.update(max_I=st.max_I)
    if st.max_I_at_m is not None:
        header.update(max_I_x_m=st.max_I_at_m[0], max_I_y_m=st.max_I_at_m[1])
    stats = {"max_I": st.max_I, "mean": st.mean, "rms": st.rms, "rmsd": st.rmsd, "sum": st.sum}
    a = result.panel_float32()[i] if img32 is None else img32
    return write_products(a, p.roi_mask, header, _writer_args(image_spec), active=p.mask, stats=stats, **paths)


def write_panels_nexus(path, images, roi_masks, info: Mapping, *, scale: float, adc: float = 40.0,
                       dtype: str = "float32", compression: str = "none") -> Path:
    """NeXus NXmx of a multi-panel run (``nbsim.panels``): one ``NXdetector_module`` per panel (its
    first pixel's corner, fast/slow axes and pixel size: ``info['panels']``), the panels' images
    stacked along the slow axis in geometry order: float32 as ``-floatfile`` (0 outside each ROI), or
    int32 counts (``count_image``) with ``scale``, the whole detector's (as the SMV files).

    ``images``: per panel float32 (spixels, fpixels); ``roi_masks``: per panel bool, the ROI."""
    from nbsim.io.images import count_image
    from nbsim.io.nexus import panels_from_info, write_nexus
    if dtype == "int32":
        images = [count_image(a, scale, adc, m) for a, m in zip(images, roi_masks)]
    return write_nexus(path, list(images), dict(info), dtype=dtype, compression=compression,
                       panels=panels_from_info(info), mask=list(roi_masks))


def panel_images(flat_f32, info: Mapping) -> list:
    """The panels' float32 (spixels, fpixels) images from the ``-floatfile`` layout ``flat_f32``
    (every panel one after another in geometry order, each slow-major; ``info['panels']``)."""
    a = np.asarray(flat_f32, dtype=np.float32).reshape(-1)
    shapes = [(int(p["spixels"]), int(p["fpixels"])) for p in info["panels"]]
    if a.size != sum(s * f for s, f in shapes):
        raise ValueError(f"panel_images: {a.size} pixels for panels of {sum(s * f for s, f in shapes)}")
    out, start = [], 0
    for s, f in shapes:
        out.append(a[start:start + s * f].reshape(s, f))
        start += s * f
    return out


def write_panels(images, roi_masks, info: Mapping, image_spec, tags, *, int_path=None, cbf_path=None,
                 nexus_path=None, nexus_dtype: str = "float32", nexus_compression: str = "none") -> dict:
    """Write the per-panel products of a multi-panel run: the one place the front end (``-intfile``,
    ``--nexus``) and the result store (``store.formats``) write them.

    Parameters
    ----------
    images : list of float32 (spixels, fpixels) arrays, one per panel in geometry order
    roi_masks : list of bool arrays like ``images``: each panel's ROI (0 outside in every file)
    info : mapping
        The run's ``info`` (``SimResult.info`` or ``run.json``'s): ``panels`` (``PanelReport`` dicts),
        ``beam``, ``max_I`` and the header values (:func:`nbsim.panels.panel_header_info`).
    image_spec : object or dict
        ``adc`` and ``int_scale`` (None or <= 0: 55000 / ``max_I`` over all panels).
    tags : list of str
        Per panel, what names its file (``nbsim.panels.panel_file_tags``).
    int_path, cbf_path : path or None
        Templates: panel k's SMV (uint16, ``int_image``) / CBF (int32 counts, ``count_image``, miniCBF
        header) goes to ``panel_path(template, tags[k])``, each with the panel's own header
        (``panel_header_info``) and the scale of the whole detector.
    nexus_path : path or None
        One NXmx file with a module per panel (:func:`write_panels_nexus`).

    Every file is written atomically; if one fails, those written by this call are removed and the
    error is raised. Returns ``intfile_scale``, ``written`` (paths) and ``lines``.
    """
    import os

    from nbsim.panels import panel_header_info, panel_path
    from .cbf import cbf_bytes

    adc = _spec(image_spec, "adc")
    adc = 40.0 if adc is None else float(adc)
    scale = _spec(image_spec, "int_scale")
    scale = default_int_scale(float(info["max_I"])) if scale is None or float(scale) <= 0.0 else float(scale)
    written: list = []
    try:
        for k, (a, m) in enumerate(zip(images, roi_masks)):
            header = None
            if int_path is not None or cbf_path is not None:
                header = panel_header_info(info, k)
            if int_path is not None:
                written.append(atomic_write_bytes(panel_path(str(int_path), tags[k]),
                                                  smv_bytes(int_image(a, scale, adc, m), header)))
            if cbf_path is not None:
                written.append(atomic_write_bytes(panel_path(str(cbf_path), tags[k]),
                                                  cbf_bytes(count_image(a, scale, adc, m), header)))
        if nexus_path is not None:
            written.append(write_panels_nexus(nexus_path, images, roi_masks, info, scale=scale, adc=adc,
                                              dtype=nexus_dtype, compression=nexus_compression))
    except BaseException:
        for w in written:
            try:
                os.unlink(w)
            except OSError:
                pass
        raise
    return {"intfile_scale": scale, "written": written, "lines": [f"intfile_scale = {c_g(scale)}"]}
