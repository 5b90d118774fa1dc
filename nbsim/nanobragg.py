"""nanoBragg-compatible command line: ``python -m nbsim.nanobragg ARGS`` (or ``nbsim-nanobragg``).

Parses nanoBragg flags (``nbsim.frontend``), simulates with ``nbsim.api.simulate`` and writes the
same files as the C program (float, int, noise, pgm images), printing nanoBragg-like lines.
Command-line and specification errors print one line ``nbsim.nanobragg: error: ...`` on stderr and
exit with status 2 before anything is written.
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import List, Optional

PROG = "nbsim.nanobragg"


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _progress_printer():
    state = {"last": -1}

    def progress(done: int, total: int):
        if total <= 0:
            return
        pct = int(100 * done // total)
        step = pct - pct % 5
        if step > state["last"]:
            state["last"] = step
            print(f"{step}% done", flush=True)
    return progress


_OUTPUT_FLAGS = {"float_path": "-floatfile", "int_path": "-intfile", "noise_path": "-noisefile",
                 "pgm_path": "-pgmfile", "cbf_path": "--cbf", "nexus_path": "--nexus"}


def _check_output_paths(parsed) -> None:
    """``FrontendError`` naming the flag and path when an output cannot be created: its folder is
    missing or not writable, or the path is a folder. (A full disk shows only when writing.)"""
    from nbsim.frontend import FrontendError
    targets = [(_OUTPUT_FLAGS[k], p) for k, p in parsed.outputs.paths().items() if p is not None]
    c = parsed.spec.crystal
    if c.hkl_file is not None and c.fdump_file is not None:
        targets.append(("-dump", c.fdump_file))          # the structure-factor cache is written too
    for flag, p in targets:
        parent = os.path.dirname(p) or "."
        if os.path.isdir(p):
            raise FrontendError(f"{flag}: cannot write {p}: it is a directory")
        if not os.path.isdir(parent):
            raise FrontendError(f"{flag}: cannot write {p}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FrontendError(f"{flag}: cannot write {p}: directory {parent} is not writable")


def _call_simulate(simulate, spec, device, parsed, warn, inputs=None):
    """``simulate`` with the files the preflight read (``inputs``; read here when not given)."""
    from nbsim.inputs import load_inputs, write_fdump_cache
    if inputs is None:
        inputs = load_inputs(spec, os.getcwd())
    write_fdump_cache(spec, inputs, os.getcwd())          # as C does, before it simulates
    kw = {"base_dir": os.getcwd()}
    try:
        params = inspect.signature(simulate).parameters
        has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, has_var_kw = {}, True
    if "inputs" in params or has_var_kw:
        kw["inputs"] = inputs                              # the files are read once
    if "solid_angle" in params or has_var_kw:
        kw["solid_angle"] = True                           # C prints the detector's solid angle
    if parsed.progress and ("progress" in params or has_var_kw):
        kw["progress"] = _progress_printer()
    if parsed.trace_pixel is not None:
        if "trace_pixel" in params or has_var_kw:
            kw["trace_pixel"] = tuple(parsed.trace_pixel)
        else:
            warn("-trace_pixel: this engine does not support tracing yet; ignored")
    return simulate(spec, device, **kw)


def _panel_count(parsed, inputs) -> int:
    """The number of panels of the run (1 for a single-panel detector); ``inputs``: the files the
    preflight read (the geometry file among them)."""
    from nbsim.panels import has_panels, panel_list
    if not has_panels(parsed.spec):
        return 1
    return len(panel_list(parsed.spec, inputs.geometry if inputs is not None else None))


def _check_panel_outputs(parsed, inputs=None) -> None:
    """With several panels: SMV and PGM hold one image, so ``-noisefile``/``-pgmfile``/``-pgmscale``
    given explicitly are refused (``FrontendError``); the int image and ``--cbf`` are written per
    panel. A one-panel detector (a one-panel geometry file) writes them as a single-panel run does."""
    from nbsim.frontend import FrontendError
    if _panel_count(parsed, inputs) == 1:
        return
    for flag in ("-noisefile", "-pgmfile", "-pgmscale"):
        if flag in parsed.outputs.given:
            raise FrontendError(f"{flag}: not available with several panels (--geom): write -floatfile "
                                "(the panels one after another, raw float32) and -intfile (one SMV per "
                                "panel, <name>_<panel>.img)")


def _write_panels(result, parsed, warn) -> int:
    """The outputs of a multi-panel run: ``-floatfile`` = every panel's float32 pixels one after
    another (geometry order, each slow-major); ``-intfile`` and ``--cbf`` = one SMV / CBF file per panel
    (``<stem>_<panel><ext>``, ``nbsim.panels.panel_file_tags``), all with the scale of the whole
    detector (55000 / max over panels, or ``-scale``); ``--nexus`` = one file, a module per panel. The
    noise and PGM images are not written (one line says so)."""
    from nbsim.io.atomic import atomic_write_bytes
    from nbsim.io.images import float_bytes
    from nbsim.io.products import write_panels
    from nbsim.io.smv import c_g
    from nbsim.panels import panel_file_tags, panel_path

    paths = parsed.outputs.paths()
    st = result.stats                        # nbsim.api.RunStats
    im = parsed.spec.image
    float_path = paths["float_path"]
    tags = panel_file_tags([p.name for p in result.panels])
    int_paths = [panel_path(paths["int_path"], t) for t in tags] if paths["int_path"] is not None else []
    opts = parsed.outputs.options()
    try:
        atomic_write_bytes(float_path, float_bytes(result.float32()[None, :]))   # one row: all panels
        try:
            prod = write_panels(result.panel_float32(), [p.roi_mask for p in result.panels], result.info,
                                im, tags, int_path=paths["int_path"], cbf_path=paths.get("cbf_path"),
                                nexus_path=paths.get("nexus_path"),
                                nexus_dtype=opts["nexus_dtype"], nexus_compression=opts["nexus_compression"])
        except BaseException:
            try:
                os.unlink(float_path)
            except OSError:
                pass
            raise
    except OSError as e:
        named = f"-floatfile {float_path}, -intfile {paths['int_path']}"
        for flag, key in (("--cbf", "cbf_path"), ("--nexus", "nexus_path")):
            if paths.get(key) is not None:
                named += f", {flag} {paths[key]}"
        return _error(f"cannot write output ({named}): {e.strerror or e}")
    scale = prod["intfile_scale"]
    n = sum(p.mask.size for p in result.panels)
    print(f"writing {float_path} as {n} 4-byte floats ({len(result.panels)} panels one after another)")
    at = st.max_I_at                         # (panel, slow, fast)
    where = f"  at panel {at[0]} slow {at[1]} fast {at[2]}" if at else ""
    print(f"max_I = {c_g(st.max_I)}{where}")
    print(f"mean= {c_g(st.mean)} rms= {c_g(st.rms)} rmsd= {c_g(st.rmsd)}")
    print(f"intfile_scale = {c_g(scale)}")
    for ip in int_paths:
        print(f"writing {ip} as 2-byte integers")
    if paths.get("cbf_path") is not None:
        for t in tags:
            print(f"writing {panel_path(paths['cbf_path'], t)} as CBF (4-byte integer counts, miniCBF header)")
    if paths.get("nexus_path") is not None:
        print(f"writing {paths['nexus_path']} as NeXus NXmx ({parsed.outputs.nexus_dtype}, "
              f"{len(result.panels)} detector modules)")
    if paths["noise_path"] is not None or paths["pgm_path"] is not None:
        warn("several panels: the noise and PGM images are not written (one image each); "
             "-nonoise -nopgm silence this")
    return 0


#: noise images from this many pixels on get a noise worker (below, the Python loop is as quick:
#: ~2 us per pixel against the worker's ~0.35 s of CPU, spent on the other core)
NOISE_WORKER_MIN_PIXELS = 1 << 15


def _noise_pixels(parsed) -> int:
    """The pixels the noise image will draw, estimated from the parsed detector (fpixels/spixels,
    else the detector size over the pixel size (102.4 mm by default), within the ROI); 0 without a
    noise image."""
    if parsed.outputs.paths()["noise_path"] is None:
        return 0
    d = parsed.spec.detector
    try:
        n = [p if p else round((size or 102.4) / d.pixel_mm)
             for p, size in ((d.fpixels, d.detsize_f_mm), (d.spixels, d.detsize_s_mm))]
        if d.roi is not None:
            n = [min(n[k], max(0, hi - max(lo, 0) + 1) if hi >= 0 else n[k])
                 for k, (lo, hi) in enumerate((d.roi[0:2], d.roi[2:4]))]
        return int(n[0] * n[1])
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return 0


def _start_noise_worker(parsed):
    """A started :class:`nbsim.noise_worker.NoiseWorker` registered with :mod:`nbsim.noise` when this
    run writes a noise image of at least ``NOISE_WORKER_MIN_PIXELS`` pixels (None otherwise). Called
    before torch is imported: the worker loads the compiled noise loop on the other core meanwhile."""
    if _noise_pixels(parsed) < NOISE_WORKER_MIN_PIXELS:
        return None
    from nbsim.noise_worker import NoiseWorker
    worker = NoiseWorker.start()
    from nbsim import noise
    noise.use_worker(worker)
    return worker


def main(argv: Optional[List[str]] = None, *, console: bool = False) -> int:
    """The front end; returns the exit status. ``console``: this is the whole process (``run``),
    which uses numba for the noise loop only (``nbsim.noise.lean_numba_load``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from nbsim.frontend import FrontendError, parse_argv, usage
    from nbsim.spec import SpecError
    try:
        parsed = parse_argv(argv)
    except FrontendError as e:
        return _error(str(e))
    except SpecError as e:           # pragma: no cover - parse_argv maps these itself
        return _error(str(e))
    if parsed.help:
        sys.stdout.write(usage())
        return 0
    worker = _start_noise_worker(parsed)
    if console:
        from nbsim import noise
        from pipeline.proc import ENGINE_MODULES, preload
        noise.lean_numba_load = True
        preload(ENGINE_MODULES)      # the whole process: torch and the render path, collector paused
    try:
        return _run(parsed)
    finally:
        if worker is not None:
            from nbsim import noise
            noise.use_worker(None)
            worker.close()


def _run(parsed) -> int:
    """Everything after parsing: checks, simulation, output files and printed lines."""
    from nbsim.checks import check_image
    from nbsim.frontend import FrontendError
    from nbsim.frontend.argv import spec_error_message
    from nbsim.io.inputs import InputFileError
    from nbsim.spec import SpecError

    def warn(msg: str):
        print(f"WARNING: {msg}")

    # refuse what cannot be simulated or written before anything runs (nothing written yet)
    try:
        from nbsim.checks import preflight
        est = preflight(parsed.spec, parsed.device, os.getcwd())
        _check_output_paths(parsed)
        _check_panel_outputs(parsed, est.inputs)
    except SpecError as e:
        return _error(spec_error_message(e, parsed.origins))
    except FrontendError as e:
        return _error(str(e))

    for w in parsed.warnings:
        warn(w)
    if est.seconds > 60:
        warn(f"estimated run time {est.describe()} (--time-limit-s refuses such runs)")

    import numpy as np
    try:
        from nbsim.api import simulate
        try:
            with np.errstate(all="ignore"):          # an overflow is reported once, by check_image
                result = _call_simulate(simulate, parsed.spec, parsed.device, parsed, warn, est.inputs)
        except ImportError as e:
            if parsed.trace_pixel is None:
                raise
            warn(f"-trace_pixel: tracing is not available ({e}); running without it")
            parsed.trace_pixel = None
            result = _call_simulate(simulate, parsed.spec, parsed.device, parsed, warn, est.inputs)
    except SpecError as e:
        return _error(spec_error_message(e, parsed.origins))
    except FrontendError as e:
        return _error(str(e))
    except OSError as e:
        return _error(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
    except InputFileError as e:        # a reader's one-line message (preflight normally catches it)
        return _error(str(e))
    one_panel = getattr(result, "panels", None) is not None and len(result.panels) == 1
    # converted once: checked, then written (a one-panel geometry: that panel as a single image)
    img = result.panel_float32()[0] if one_panel else result.float32()
    try:
        check_image(img, parsed.spec)
    except SpecError as e:
        return _error(spec_error_message(e, parsed.origins))

    for name in parsed.header_files:     # C's GetFrame; its next line, "mmap(FILE) = <address>", is not
        print(f"reading {name}")         # reproducible
    for line in result.log:
        print(line)
    said_fdump = any("quirk fdump_from_cwd" in w for w in parsed.warnings)
    for w in result.warnings:
        if said_fdump and w.startswith("reading structure factors from"):
            continue                       # the front end already explained it
        warn(w)
    for line in getattr(result, "trace", None) or []:
        print(line)

    if getattr(result, "panels", None) is not None and not one_panel:
        return _write_panels(result, parsed, warn)
    st = result.stats                        # nbsim.api.RunStats
    spixels, fpixels = img.shape
    from nbsim.report import solid_angle_lines
    for line in solid_angle_lines(getattr(st, "omega_sum_sr", None)):
        print(line)

    from nbsim.io.products import write_panel_result, write_result
    paths = parsed.outputs.paths()
    at = st.max_I_at_m if st is not None else None
    new_files = [p for p in paths.values() if p is not None and not os.path.lexists(p)]
    try:
        if one_panel:
            res = write_panel_result(result, 0, parsed.spec.image, img32=img, **paths,
                                     **parsed.outputs.options())
        else:
            res = write_result(result, parsed.spec.image, img32=img, **paths, **parsed.outputs.options()) or {}
    except OSError as e:
        for p in new_files:                  # no half set of outputs: remove what this run created
            try:
                os.unlink(p)
            except OSError:
                pass
        named = [f"{f} {paths[k]}" for k, f in _OUTPUT_FLAGS.items() if paths.get(k)]
        return _error(f"cannot write output ({', '.join(named)}): {e.strerror or e}")

    # upstream's order: float file, stats, int file, pgm, noise
    print(f"writing {paths['float_path']} as {fpixels * spixels} 4-byte floats")
    lines = res.get("lines")
    if lines is None:                      # writer without printed lines: format them here
        lines = []
        given = {k: res.get(k, getattr(st, k, None)) for k in ("max_I", "mean", "rms", "rmsd")}
        if at is not None and given["max_I"] is not None:
            lines.append(f"max_I = {given['max_I']:g}  at {at[0]:g} {at[1]:g}")
        if all(given[k] is not None for k in ("mean", "rms", "rmsd")):
            lines.append(f"mean= {given['mean']:g} rms= {given['rms']:g} rmsd= {given['rmsd']:g}")
        if res.get("intfile_scale") is not None:
            lines.append(f"intfile_scale = {res['intfile_scale']:g}")
        if paths["pgm_path"] is not None and res.get("pgm_scale") is not None:
            lines.append(f"pgm_scale = {res['pgm_scale']:g}")
        if paths["noise_path"] is not None and res.get("photons") is not None:
            lines.append(f"{res['photons']:.0f} photons on noise image "
                         f"({int(res.get('overloads') or 0)} overloads)")
    int_written = False
    for line in lines:
        if not int_written and not line.startswith(("max_I", "mean=", "intfile_scale")):
            print(f"writing {paths['int_path']} as 2-byte integers")
            int_written = True
        print(line)
        if line.startswith("intfile_scale"):
            print(f"writing {paths['int_path']} as 2-byte integers")
            int_written = True
        elif line.startswith("pgm_scale") and paths["pgm_path"] is not None:
            print(f"writing {paths['pgm_path']} as 1-byte integers")
        elif "photons on noise image" in line and paths["noise_path"] is not None:
            print(f"writing {paths['noise_path']} as 2-byte integers")
    if not int_written:
        print(f"writing {paths['int_path']} as 2-byte integers")
    if paths.get("cbf_path") is not None:
        print(f"writing {paths['cbf_path']} as CBF (4-byte integer counts, miniCBF header)")
    if paths.get("nexus_path") is not None:
        print(f"writing {paths['nexus_path']} as NeXus NXmx ({parsed.outputs.nexus_dtype})")
    return 0


def run() -> None:
    """Console entry point: ``main`` then an immediate exit. Every output file is closed and renamed
    into place before ``main`` returns, so the interpreter's teardown (about 0.3 s with torch
    loaded, a large share of a short run) is skipped. This process uses numba for the noise loop
    only, so where it loads that loop itself it skips numba's optional features
    (``nbsim.noise.lean_numba_load``)."""
    try:
        rc = main(console=True)
    except SystemExit as e:                      # pragma: no cover - main returns its status
        rc = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    run()
