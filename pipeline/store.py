"""Content-addressed result store: ``<root>/<config hash>/``, written atomically, reused when present.

A complete entry holds::

    float.bin     raw float32 image, nanoBragg layout (slow-major)
    int.img       SMV uint16 image              (with ``smv`` in ``store.formats``, the default)
    image.cbf     CBF, int32 counts, miniCBF header            (with ``cbf`` in ``store.formats``)
    image.nxs     NeXus NXmx, float32    (with ``nexus``; ``image_int32.nxs`` / ``image_bslz4.nxs`` /
                  ``image_int32_bslz4.nxs`` for ``store.nexus_dtype=int32`` / ``nexus_compression=bslz4``)
    noise.img     Poisson SMV image            (only with write_noise and image.noise)
    image.pgm     nanoBragg's 8-bit PGM         (only with write_pgm)
    preview.png   the picture pipeline.view draws (colour bar, axes, beam centre, rings in Å) and
                  preview.thumb.png; grayscale only without matplotlib (a sweep's: the thumbnail alone)
    config.yaml   the resolved experiment description (spec + device)
    log.txt       nanoBragg's setup lines (SetupReport.echo), solid angle and product lines
    run.json      hash, versions, device, wall time, image statistics, scales   (written last)

A multi-panel entry (``detector.panels`` / ``detector.geometry_file``) holds ``float.bin`` (the panels
one after another, geometry order, each slow-major), per panel ``int_<panel>.img`` (``smv``) and
``image_<panel>.cbf`` (``cbf``), each with the panel's own header and the whole detector's scale, and
one NeXus file with an ``NXdetector_module`` per panel (``nexus``); ``<panel>`` is the panel's name
(``p<i>`` by default), or ``panel<i>`` for every panel when the names are not distinct or not safe in
a file name (``nbsim.panels.panel_file_tags``). The front end's ``-intfile``/``--nexus`` write the
same files through the same function (``nbsim.io.products.write_panels``), and ``preview.png`` (with
``preview.thumb.png``): the multi-panel picture ``python -m pipeline.view`` draws, by the same function
(``pipeline.preview.panels_preview_png`` -> ``pipeline.view.render_panels``). No noise or PGM.
A ONE-panel geometry (``detector.geometry_file`` with one panel, ``detector.panels`` with one entry)
is stored like a single-panel run: ``int.img``, ``noise.img``, ``image.pgm``, ``image.cbf``, the
NeXus file and ``preview.png`` each hold its one image with the panel's own header, written by the
front end's function (``nbsim.io.products.write_panel_result``; ``several_panels``).

``run.json`` also records the size and sha256 of every other file (``files_sha256``) and a checksum
of itself (``run_json_sha256``); an entry is verified (``verify_entry``) before it is reused, and a
damaged one is reported in one line and recomputed.

Asking a stored entry for more products (``write_noise``, ``write_pgm``, another ``preview`` mode,
another format of ``store.formats``)
adds them to it from its ``float.bin`` (``add_products``): nothing is recomputed and no file is
dropped. ``preview.png`` is rendered in the mode of the first run; another mode asked later is added
as ``preview_<mode>.png`` (``run.json`` ``previews``: mode -> file).

The entry is built in a hidden sibling folder (``nbsim.io.atomic.atomic_dir``) and appears under its
final name only by a rename, so ``<root>/<hash>/run.json`` exists exactly when the entry is complete.
(A process killed with SIGKILL may leave a hidden ``.<hash>.*.tmp`` folder behind; it is never read.)
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from nbsim.io.atomic import atomic_dir, file_sha256, unsynced_files
from nbsim.spec import DeviceSpec, ExperimentSpec, SpecError, spec_to_dict
from pipeline.hashing import config_hash, input_digests
from pipeline.preview import panels_preview_png, preview_png
from pipeline.view import entry_title, panels_title

STAT_KEYS = ("max_I", "max_I_at_m", "mean", "rms", "rmsd", "sum")
PRODUCT_KEYS = ("intfile_scale", "pgm_scale", "photons", "overloads", "noise_seed")


FORMATS = ("smv", "cbf", "nexus")     # store.formats: output files besides float.bin


def nexus_name(nexus_dtype: str = "float32", nexus_compression: str = "none") -> str:
    """The entry's NeXus file for these writer options (each variant is its own file)."""
    return ("image" + ("" if nexus_dtype == "float32" else f"_{nexus_dtype}")
            + ("" if nexus_compression == "none" else f"_{nexus_compression}") + ".nxs")


def entry_panels(spec: ExperimentSpec, est=None, base_dir: Union[str, Path] = ".") -> Optional[list]:
    """The panels (``PanelSpec``s, geometry order) of a multi-panel ``spec``, from ``detector.panels``
    or its geometry file as the preflight read it (``est.inputs``; read here without one); None for a
    single-panel detector. They name the per-panel files and give each panel's ROI."""
    from nbsim.spec import has_panels
    if not has_panels(spec):
        return None
    from nbsim.panels import panel_list
    geometry = getattr(getattr(est, "inputs", None), "geometry", None)
    if geometry is None and spec.detector.panels is None:
        from nbsim.inputs import load_inputs
        geometry = load_inputs(spec, str(base_dir)).geometry
    return panel_list(spec, geometry)


def several_panels(panels: Optional[list]) -> bool:
    """True for an entry of several panels (per-panel files); a one-panel geometry file
    (``detector.geometry_file`` with one panel, ``detector.panels`` with one entry) is stored like a
    single-panel run: the same files, with the panel's own header (``write_panel_result``)."""
    return panels is not None and len(panels) > 1


def panel_tags(panels) -> list:
    """Per panel, what names its files in an entry (``nbsim.panels.panel_file_tags``)."""
    from nbsim.panels import panel_file_tags, panel_name
    return panel_file_tags([panel_name(pn, i) for i, pn in enumerate(panels)])


PANEL_TEMPLATES = {"smv": "int.img", "cbf": "image.cbf"}   # per-panel files: int_<panel>.img, image_<panel>.cbf


def wanted_files(spec: ExperimentSpec, write_noise: bool = False, write_pgm: bool = False,
                 formats=("smv",), nexus_dtype: str = "float32", nexus_compression: str = "none",
                 panels: Optional[list] = None) -> list:
    """The files of a complete entry for these options. ``panels``: ``entry_panels(spec, ...)``,
    needed for a multi-panel spec, whose entry holds ``float.bin`` (the panels one after another,
    geometry order, each slow-major), one SMV (``int_<panel>.img``) and one CBF (``image_<panel>.cbf``)
    per panel (``panel_tags``), and one NeXus file with a module per panel."""
    from nbsim.panels import panel_path
    from nbsim.spec import has_panels
    if has_panels(spec) and panels is None:
        raise ValueError("wanted_files: a multi-panel spec needs its panels (entry_panels)")
    if several_panels(panels):
        # SMV noise and PGM hold one image each and are not written
        for key, on in (("store.write_noise", write_noise), ("store.write_pgm", write_pgm)):
            if on:
                raise SpecError(key, "not available with several panels (detector.panels / "
                                "detector.geometry_file): the entry holds float.bin (the panels one "
                                "after another) and, per store.formats, an SMV and a CBF file per panel "
                                "and one NeXus file")
        names = ["float.bin", "preview.png", "config.yaml", "run.json"]
        for fmt in ("smv", "cbf"):
            if fmt in formats:
                names += [panel_path(PANEL_TEMPLATES[fmt], t) for t in panel_tags(panels)]
        if "nexus" in formats:
            names.append(nexus_name(nexus_dtype, nexus_compression))
        return names
    names = ["float.bin", "preview.png", "config.yaml", "run.json"]
    if "smv" in formats:
        names.insert(1, "int.img")
    if "cbf" in formats:
        names.append("image.cbf")
    if "nexus" in formats:
        names.append(nexus_name(nexus_dtype, nexus_compression))
    if write_noise and spec.image.noise:
        names.append("noise.img")
    if write_pgm:
        names.append("image.pgm")
    return names


def _panel_writer_paths(folder: Path, names) -> dict:
    """``nbsim.io.products.write_panels`` keyword arguments for the per-panel files ``names``
    (``int_<panel>.img``, ``image_<panel>.cbf``, ``*.nxs``) in ``folder``: the templates."""
    kw = _writer_paths(folder, [n for n in names if n.endswith(".nxs")])
    for fmt, arg in (("smv", "int_path"), ("cbf", "cbf_path")):
        stem, ext = os.path.splitext(PANEL_TEMPLATES[fmt])
        if any(n.startswith(stem + "_") and n.endswith(ext) for n in names):
            kw[arg] = str(folder / PANEL_TEMPLATES[fmt])
    return kw


def _writer_paths(folder: Path, names) -> dict:
    """``write_products`` keyword arguments for the product files ``names`` in ``folder``."""
    kw = {}
    for n in names:
        if n == "int.img":
            kw["int_path"] = str(folder / n)
        elif n == "noise.img":
            kw["noise_path"] = str(folder / n)
        elif n == "image.pgm":
            kw["pgm_path"] = str(folder / n)
        elif n == "image.cbf":
            kw["cbf_path"] = str(folder / n)
        elif n.endswith(".nxs"):
            kw["nexus_path"] = str(folder / n)
            kw["nexus_dtype"] = "int32" if "_int32" in n else "float32"
            kw["nexus_compression"] = "bslz4" if "_bslz4" in n else "none"
    return kw


def _info_for_writers(info: dict, spec: ExperimentSpec) -> dict:
    """``run.json`` ``info`` of an entry written before the NeXus/CBF writers existed lacks
    ``exposure_s`` and ``spectrum_A``: take them from the spec when it has one wavelength."""
    info = dict(info)
    info.setdefault("exposure_s", spec.beam.exposure_s)
    if "spectrum_A" not in info:
        b = spec.beam
        if b.source_file is not None or (b.dispersion_pct > 0 and (b.dispsteps or 2) > 1):
            raise SpecError("store.formats", "this stored entry predates the NeXus writer and its beam has "
                            "several wavelengths; recompute it with store.force=true")
        info["spectrum_A"] = [[float(info["wavelength_A"]), 1.0]]
    return info


def check_device(device: DeviceSpec) -> None:
    """Raise ``SpecError('device.device', ...)`` if the requested device is not usable here (torch is
    imported only for a device other than the CPU)."""
    if device.device == "cpu":
        return
    import torch
    if device.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError("device.device", f"{device.device} requested but torch finds no CUDA device; "
                        "use device=cpu")
    if device.device == "mps" and not torch.backends.mps.is_available():
        raise SpecError("device.device", "mps requested but not available; use device=cpu")


# ---------------------------------------------------------------------------------------------
# run or reuse
# ---------------------------------------------------------------------------------------------

def _jsonable(x):
    if hasattr(x, "tolist"):                     # numpy / torch scalars and arrays
        return x.tolist()
    return str(x)


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, default=_jsonable, allow_nan=True) + "\n")


def _versions() -> dict:
    import nbsim
    try:
        import torch
        tv = torch.__version__
    except ImportError:                          # pragma: no cover
        tv = None
    return {"nbsim_version": getattr(nbsim, "__version__", None), "torch_version": tv,
            "python_version": platform.python_version()}


MANIFEST_KEY = "files_sha256"      # run.json: {file name: {"bytes": n, "sha256": hex}} of every other file
CHECKSUM_KEY = "run_json_sha256"   # run.json: sha256 of its own canonical text without this key


def _doc_checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, default=_jsonable, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest(folder: Path, names) -> dict:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` in ``folder``."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in sorted(names)}


def verify_entry(folder: Path, h: str, want=()) -> Tuple[Optional[dict], str]:
    """Check a stored entry before it is reused: ``(run_json, "")`` when it is complete and intact,
    else ``(None, reason)`` (one line). ``run.json`` must parse, carry this hash and its own checksum;
    every file of its manifest must have the recorded size and sha256; ``want`` files must exist."""
    rj = folder / "run.json"
    try:
        doc = json.loads(rj.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"run.json is unreadable ({type(e).__name__})"
    if not isinstance(doc, dict):
        return None, "run.json is not a JSON object"
    if doc.get("hash") != h:
        return None, f"run.json names hash {doc.get('hash')!r}, not {h}"
    files = doc.get(MANIFEST_KEY)
    if not isinstance(files, dict) or CHECKSUM_KEY not in doc:
        return None, "run.json has no checksums (written by an older nbsim)"
    if doc[CHECKSUM_KEY] != _doc_checksum(doc):
        return None, "run.json was edited (its checksum does not match)"
    missing = [n for n in want if n != "run.json" and n not in files]
    if missing:
        return None, f"it lacks {', '.join(missing)}"
    for name, rec in files.items():
        p = folder / name
        try:
            size = p.stat().st_size if p.is_file() else None
        except OSError:
            size = None
        if size is None:
            return None, f"{name} is missing"
        if not isinstance(rec, dict) or size != rec.get("bytes"):
            recorded = rec.get("bytes") if isinstance(rec, dict) else "?"
            return None, f"{name} has {size} bytes, run.json recorded {recorded} bytes"
        try:
            digest = file_sha256(p)
        except OSError as e:
            return None, f"{name} is unreadable ({e.strerror or e})"
        if digest != rec.get("sha256"):
            return None, f"{name} does not match its checksum (edited or corrupted)"
    return doc, ""


def preview_name(doc: dict, mode: str) -> str:
    """The file of an entry holding its preview in ``mode``: ``preview.png`` for the mode of the run
    that computed it (``log`` for entries that do not say), ``preview_<mode>.png`` for one added later."""
    previews = doc.get("previews") or {"log": "preview.png"}
    return previews.get(mode, f"preview_{mode}.png")


def entry_thumbnail(folder: Path) -> Path:
    """The small picture of an entry for a contact sheet: ``preview.thumb.png`` where the preview has
    one (the annotated picture of a single run, single- or multi-panel), else ``preview.png`` (a
    sweep point's preview is itself the thumbnail; a grayscale preview)."""
    thumb = Path(folder) / "preview.thumb.png"
    return thumb if thumb.is_file() else Path(folder) / "preview.png"


def missing_products(doc: dict, want, preview: str) -> list:
    """Files of ``want`` (and the preview in mode ``preview``) that the intact entry ``doc`` lacks."""
    files = doc.get(MANIFEST_KEY) or {}
    names = [n for n in want if n not in ("run.json", "preview.png")]
    if "preview.png" in want:
        names.append(preview_name(doc, preview))
    return [n for n in names if n not in files]


def add_products(folder: Path, doc: dict, spec: ExperimentSpec, names: list, preview: str,
                 panels: Optional[list] = None) -> dict:
    """Add the products ``names`` (``int.img``, ``noise.img``, ``image.pgm``, ``image.cbf``, ``*.nxs``,
    ``preview*.png``; for a multi-panel entry ``int_<panel>.img``, ``image_<panel>.cbf``, ``*.nxs``)
    to the intact entry ``folder`` from its ``float.bin``, without simulating; return the updated
    ``run.json``. ``panels``: ``entry_panels(spec, ...)`` for a multi-panel entry (each panel's ROI).

    The files are bit-identical to those a fresh run writes: the writers take the same float32 image,
    ROI (``info.roi``, or each panel's), statistics and header values (``run.json`` ``info``). Each
    file is written atomically, then ``run.json`` (manifest, ``files``, checksum) is replaced
    atomically; the caller holds the entry lock."""
    import numpy as np

    from nbsim.io import products
    from nbsim.io.atomic import atomic_write_bytes

    info = dict(doc.get("info") or {})
    if any(n.endswith((".cbf", ".nxs")) for n in names):
        info = _info_for_writers(info, spec)
    new = [n for n in names if not n.startswith("preview")]
    flat = np.fromfile(folder / "float.bin", dtype=np.float32)
    prod = {}
    doc = dict(doc)
    if info.get("panels") and panels is None:
        raise ValueError("add_products: a multi-panel entry needs its panels (entry_panels)")
    images = None
    if several_panels(info.get("panels")):       # per-panel files (wanted_files)
        from nbsim.panels import panel_roi_mask
        images = products.panel_images(flat, info)
        rois = [panel_roi_mask(pn, *a.shape) for pn, a in zip(panels, images)]
        with np.errstate(all="ignore"):
            prod = products.write_panels(images, rois, info, spec.image, panel_tags(panels),
                                         **_panel_writer_paths(folder, new))
        if doc.get("intfile_scale") is None:     # an entry stored before the per-panel files
            doc["intfile_scale"] = prod["intfile_scale"]
    else:
        if info.get("panels"):                   # one panel: its own header, as _compute wrote it
            from nbsim.panels import panel_header_info, panel_roi_mask
            info = panel_header_info(info, 0)
        s, f = int(info["spixels"]), int(info["fpixels"])
        img = flat.reshape(s, f)
        if panels is not None:
            roi_mask = panel_roi_mask(panels[0], s, f)
        else:
            roi_mask = np.zeros((s, f), dtype=bool)
            xmin, xmax, ymin, ymax = info.get("roi", (0, f - 1, 0, s - 1))
            roi_mask[max(ymin, 0):ymax + 1, max(xmin, 0):xmax + 1] = True
        if new:
            with np.errstate(all="ignore"):
                prod = products.write_stored(img, roi_mask, info, spec.image, **_writer_paths(folder, new)) or {}
    previews = dict(doc.get("previews") or {"log": "preview.png"})
    thumbs = []
    for n in names:
        if n.startswith("preview") and images is not None:
            written = panels_preview_png(images, folder / n, preview, info=info,
                                         title=panels_title(folder.name, info), thumb=doc.get("preview_thumb_px"))
        elif n.startswith("preview"):
            written = preview_png(img, folder / n, preview, info=info, title=entry_title(folder.name, info),
                                  thumb=doc.get("preview_thumb_px"))          # a sweep's: the thumbnail
            thumbs += [p.name for p in written if p.name != n]
            previews[preview] = n
    doc["previews"] = previews
    if "noise.img" in new:
        doc.update({k: prod.get(k) for k in ("photons", "overloads", "noise_seed")})
    added = [line for line in prod.get("lines") or []
             if line.startswith("pgm_scale") or "photons on noise image" in line]
    if added:
        log_text = (folder / "log.txt").read_text() + "".join(f"{line}\n" for line in added)
        atomic_write_bytes(folder / "log.txt", log_text.encode())
    doc["files"] = sorted(set(doc.get("files") or []) | set(names))
    doc[MANIFEST_KEY] = {**doc[MANIFEST_KEY], **manifest(folder, names + thumbs + (["log.txt"] if added else []))}
    doc = json.loads(json.dumps(doc, default=_jsonable, allow_nan=True))
    doc[CHECKSUM_KEY] = _doc_checksum(doc)
    atomic_write_bytes(folder / "run.json", (json.dumps(doc, indent=2, allow_nan=True) + "\n").encode())
    return doc


def _prepare_root(root_abs: Path, shown: Path) -> bool:
    """Create the store root if needed; ``SpecError('store.root', ...)`` naming the path the user gave
    when it cannot be used. Returns whether it was created (to remove it again if the run fails)."""
    created = False
    if not root_abs.exists():
        try:
            root_abs.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise SpecError("store.root", f"cannot create {shown}: {e.strerror or e}") from None
    if not root_abs.is_dir():
        raise SpecError("store.root", f"{shown} is not a directory")
    if not os.access(root_abs, os.W_OK | os.X_OK):
        raise SpecError("store.root", f"{shown} is not writable")
    return created


@contextlib.contextmanager
def _store_root(root_abs: Path, shown: Path):
    """The store root made ready (``_prepare_root``) for the writes inside the block: an ``OSError``
    becomes one ``SpecError('store.root', ...)`` naming the path the user gave; on any failure a root
    this block created is removed again if it stayed empty."""
    created = _prepare_root(root_abs, shown)
    try:
        yield
    except OSError as e:
        _remove_if_empty(root_abs, created)
        raise SpecError("store.root", f"cannot write the result under {shown}: {e.strerror or e}") from None
    except BaseException:
        _remove_if_empty(root_abs, created)
        raise


@contextlib.contextmanager
def entry_lock(root_abs: Path, h: str):
    """Exclusive lock of one entry among processes (``flock`` on ``<root>/.<hash>.lock``): concurrent
    runs of one configuration compute it once, the others wait and then reuse it. The lock file is
    removed by its holder; a waiter that wakes up on a removed file takes the lock again."""
    from nbsim.io.atomic import file_lock
    with file_lock(root_abs / f".{h}.lock"):
        yield


def complete_stored(final: Path, spec: ExperimentSpec, want: list, preview: str, panels: Optional[list],
                    log: Callable[[str], None], shown: Path) -> Optional[Tuple[dict, list]]:
    """The stored entry ``final`` (named by its hash) completed with the products of ``want`` it lacks,
    added from its ``float.bin`` without simulating (``add_products``; one log line names them):
    ``(run_json, added names)``, or None when no intact entry is stored. The caller holds the entry
    lock (``entry_lock``); ``shown``: the entry's path as the user gave the root."""
    doc = verify_entry(final, final.name)[0]
    if doc is None:
        return None
    extra = missing_products(doc, want, preview)
    if extra:
        doc = add_products(final, doc, spec, extra, preview, panels)
        log(f"added {', '.join(extra)} to stored result {shown} (config hash {final.name}); nothing simulated")
    return doc, extra


def run_or_reuse(spec: ExperimentSpec, device: DeviceSpec, root: Union[str, Path] = "outputs",
                 force: bool = False, write_noise: bool = False, write_pgm: bool = False,
                 preview: str = "log", base_dir: Union[str, Path] = ".",
                 log: Callable[[str], None] = print,
                 progress: Optional[bool] = None, formats=("smv",), nexus_dtype: str = "float32",
                 nexus_compression: str = "none", thumb: Optional[int] = None) -> Tuple[Path, bool, dict]:
    """Return ``(folder, reused, run_json)`` for ``spec`` simulated on ``device``.

    The spec is checked first (``nbsim.checks.preflight``: input files, geometry, size), and the
    device must exist, whether or not the result is stored. If ``<root>/<hash>/`` holds a complete
    entry that passes ``verify_entry`` nothing is simulated; a damaged entry is reported in one line
    and recomputed; ``force=True`` recomputes and replaces the entry. Relative input paths in
    ``spec`` and a relative ``root`` are taken from ``base_dir``. ``progress``: a progress bar on
    stderr while simulating (True/False; None: on a terminal, or when the run is estimated to take
    more than a few seconds, see ``nbsim.progress``). ``formats``: files besides ``float.bin``
    (``FORMATS``: ``smv`` int.img, ``cbf`` image.cbf, ``nexus`` the NeXus file of ``nexus_name``).
    ``thumb``: the preview is a grayscale thumbnail of at most this many pixels a side (a point of a
    sweep, ``pipeline.preview``); None: the annotated picture and its thumbnail.
    """
    base_dir = Path(base_dir)
    root = Path(root)
    root_abs = root if root.is_absolute() else base_dir / root
    est, h, panels, want = plan_point(spec, device, base_dir, write_noise=write_noise, write_pgm=write_pgm,
                                      formats=formats, nexus_dtype=nexus_dtype,
                                      nexus_compression=nexus_compression)
    final, shown = root_abs / h, root / h

    if (final / "run.json").is_file() and not force:
        doc, why = verify_entry(final, h)
        if doc is not None and not missing_products(doc, want, preview):
            log(f"reusing stored result {shown} (config hash {h})")
            return final, True, doc
        if doc is None:
            log(f"stored result {shown}: {why}; recomputing")

    with _store_root(root_abs, root):
        with entry_lock(root_abs, h):
            if not force and (final / "run.json").is_file():
                got = complete_stored(final, spec, want, preview, panels, log, shown)
                if got is not None:              # intact (maybe computed by another process meanwhile)
                    doc, extra = got
                    if not extra:
                        log(f"reusing stored result {shown} (config hash {h}), computed meanwhile")
                    return final, True, doc
            if est.seconds > 60 and progress is not False:
                import sys
                print(f"nbsim: estimated {est.describe()} (device.time_limit_s refuses such runs)",
                      file=sys.stderr)
            run = _compute(final, spec, device, want, preview, base_dir, est, progress, thumb=thumb)
    return final, False, run


def store_options(store, root=None) -> dict:
    """``run_or_reuse`` / ``run_many`` keyword arguments of a config's ``store`` section (a mapping or
    DictConfig; ``root``: instead of the section's own root): the one place a ``store`` section becomes
    them. Fixed key order and hashable values: ``tuple(store_options(...).items())`` groups the points
    stored alike."""
    return {"root": str(root if root is not None else store["root"]), "force": bool(store["force"]),
            "write_noise": bool(store["write_noise"]), "write_pgm": bool(store["write_pgm"]),
            "preview": str(store["preview"]), "formats": tuple(store.get("formats") or ("smv",)),
            "nexus_dtype": str(store.get("nexus_dtype", "float32")),
            "nexus_compression": str(store.get("nexus_compression", "none"))}


def plan_point(spec: ExperimentSpec, device: DeviceSpec, base_dir: Union[str, Path] = ".", *,
               write_noise: bool = False, write_pgm: bool = False, formats=("smv",),
               nexus_dtype: str = "float32", nexus_compression: str = "none") -> tuple:
    """What ``run_many`` establishes of a point before anything is rendered: ``(estimate, config hash,
    panels, wanted files)``, after the checks (``check_device``, ``preflight``: a bad point raises
    its one-line error here)."""
    from nbsim.checks import preflight
    check_device(device)
    est = preflight(spec, device, base_dir)
    h = config_hash(spec, device, base_dir)      # after preflight (resolved ROI), as run_or_reuse
    panels = entry_panels(spec, est, base_dir)
    return est, h, panels, wanted_files(spec, write_noise, write_pgm, formats, nexus_dtype,
                                        nexus_compression, panels)


def run_many(items, root: Union[str, Path] = "outputs", *, force: bool = False,
             write_noise: bool = False, write_pgm: bool = False, preview: str = "log",
             base_dir: Union[str, Path] = ".", log: Callable[[str], None] = print,
             thumb: Optional[int] = None, formats=("smv",), nexus_dtype: str = "float32",
             nexus_compression: str = "none", plans: Optional[list] = None) -> list:
    """``run_or_reuse`` for many ``(spec, device)`` pairs in one process: ``[(folder, reused, run_json)]``
    in the order of ``items``.

    Every pair is checked (``preflight``, device) and hashed first (``plan_point``; ``plans``: those
    already made, one per item); stored intact entries are reused
    (products asked for are added, as in ``run_or_reuse``); the others are rendered by
    ``nbsim.batch.iter_many`` (grouped by kernel shapes, a compiled kernel built once per group) and
    each is stored, atomically and under its entry lock, as soon as its image is done, so a batch
    killed half-way leaves complete entries only. ``thumb``: previews as thumbnails of at most this
    many pixels a side. A
    point that fails (e.g. an image that overflows) does not stop the others; the first such
    ``SpecError`` is raised after all of them ran."""
    from nbsim.batch import iter_many
    base_dir = Path(base_dir)
    root = Path(root)
    root_abs = root if root.is_absolute() else base_dir / root
    out: list = [None] * len(items)
    todo, ests, hs, pans, wants = [], {}, [], [], []
    for i, (spec, device) in enumerate(items):
        ests[i], h, panels, want = plans[i] if plans is not None else plan_point(
            spec, device, base_dir, write_noise=write_noise, write_pgm=write_pgm, formats=formats,
            nexus_dtype=nexus_dtype, nexus_compression=nexus_compression)
        hs.append(h)
        final = root_abs / h
        pans.append(panels)
        wants.append(want)
        if (final / "run.json").is_file() and not force:
            doc, why = verify_entry(final, h)
            if doc is not None and not missing_products(doc, want, preview):
                out[i] = (final, True, doc)
                continue
            if doc is None:
                log(f"stored result {root / h}: {why}; recomputing")
        todo.append(i)
    if not todo:
        return out
    first_error = None
    with _store_root(root_abs, root):
        specs = [items[i][0] for i in todo]
        devs = [items[i][1] for i in todo]
        # a point whose entry only lacks products is completed without simulating
        rest = []
        for j, i in enumerate(todo):
            spec, device = items[i]
            final = root_abs / hs[i]
            if not force and (final / "run.json").is_file():
                with entry_lock(root_abs, hs[i]):
                    got = complete_stored(final, spec, wants[i], preview, pans[i], log, root / hs[i])
                if got is not None:
                    out[i] = (final, True, got[0])
                    continue
            rest.append(j)
        specs, devs = [specs[j] for j in rest], [devs[j] for j in rest]
        index = [todo[j] for j in rest]
        results = iter_many(specs, devices=devs, base_dir=str(base_dir), solid_angle=True,
                            inputs=[getattr(ests[i], "inputs", None) for i in index])   # as the preflight read them

        def store(i, result):
            """Store point ``i``'s rendered ``result`` under its entry lock (the writer thread)."""
            spec, device = items[i]
            h = hs[i]
            final = root_abs / h
            with entry_lock(root_abs, h):
                doc = verify_entry(final, h)[0] if not force and (final / "run.json").is_file() else None
                if doc is not None:
                    return (final, True, doc), None          # stored meanwhile by another process
                try:
                    with unsynced_files():           # entries are verified by checksum when reused
                        run = _compute(final, spec, device, wants[i], preview, base_dir, ests[i], False,
                                       result=result, thumb=thumb)
                except SpecError as e:
                    log(f"point {i} ({h}): {e}")
                    return None, e
            return (final, False, run), None

        def collect(i, fut):
            nonlocal first_error
            got, err = fut.result()                   # any other exception propagates
            if got is not None:
                out[i] = got
            first_error = first_error or err

        # each point is written by one writer thread while the next one renders (the writes of a
        # small image, ~5-10 ms, cost as much as its kernel); at most two images are held at once,
        # and leaving the block waits for the last write, also when rendering fails
        pending = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbsim-store") as writer:
            while True:
                try:
                    k, result = next(results)
                except StopIteration:
                    break
                except SpecError as e:                   # an image refused while rendering
                    if pending is not None:              # (an earlier point's error comes first)
                        collect(*pending)
                        pending = None
                    first_error = first_error or e
                    break
                if pending is not None:               # the previous point's write: done by now,
                    collect(*pending)                 # or its failure stops the batch here
                pending = (index[k], writer.submit(store, index[k], result))
                del result
            if pending is not None:
                collect(*pending)
    if first_error is not None:
        raise first_error
    return out


def _remove_if_empty(root_abs: Path, created: bool) -> None:
    if created:
        try:
            root_abs.rmdir()
        except OSError:
            pass


def config_yaml(doc: dict, h: str) -> str:
    """The text of an entry's ``config.yaml``: the resolved spec and device as YAML (block style,
    keys in schema order; read back by ``OmegaConf.load``). PyYAML's C emitter where available
    (OmegaConf's own ``to_yaml`` costs ~25 ms a point)."""
    import yaml
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return f"# nbsim configuration, hash {h}\n" + yaml.dump(doc, Dumper=dumper, default_flow_style=False,
                                                            allow_unicode=True, sort_keys=False)


def _compute(final: Path, spec: ExperimentSpec, device: DeviceSpec, want: list, preview: str,
             base_dir: Path, est=None, progress: Optional[bool] = None, result=None,
             thumb: Optional[int] = None) -> dict:
    """Simulate (or take the already simulated ``result``: a ``SimResult`` of ``spec`` on ``device``),
    write every file of the entry into a temp folder, rename it to ``final``. ``thumb``: the preview
    is a thumbnail of at most this many pixels a side (sweeps; ``pipeline.preview``)."""
    import numpy as np

    from nbsim import api                        # looked up at call time (tests monkeypatch it)
    from nbsim.checks import check_image
    from nbsim.io import products

    h = final.name
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        t0 = time.perf_counter()
        if result is None:
            from nbsim.progress import progress_bar
            spp, seconds, npix = (est.samples_per_pixel, est.seconds, est.pixels) if est is not None else (1, 0.0, None)
            with np.errstate(all="ignore"), progress_bar(spp, seconds, npix, enabled=progress) as bar:
                # an overflow is reported once, by check_image
                result = api.simulate(spec, device, base_dir=str(base_dir), progress=bar,
                                      inputs=getattr(est, "inputs", None),   # as the preflight read them
                                      solid_angle=True)                       # log.txt / run.json
            wall = time.perf_counter() - t0
        else:
            st = getattr(result, "stats", None)
            wall = float(st.wall_s or 0.0) if st is not None else 0.0
        img = result.float32()
        check_image(img, spec)
        info = dict(result.info)
        several = several_panels(getattr(result, "panels", None))
        if several:                                                  # per-panel files (wanted_files)
            from nbsim.io.images import write_float
            from nbsim.panels import panel_file_tags
            write_float(tmp / "float.bin", img[None, :])
            images = result.panel_float32()
            prod = products.write_panels(images, [p.roi_mask for p in result.panels], info,
                                         spec.image, panel_file_tags([p.name for p in result.panels]),
                                         **_panel_writer_paths(tmp, want))
            panels_preview_png(images, tmp / "preview.png", preview, info=info, title=panels_title(h, info),
                               thumb=thumb)
        else:
            if getattr(result, "panels", None) is not None:         # one panel: the front end's writer
                from nbsim.panels import panel_header_info
                img, pinfo = result.panel_float32()[0], panel_header_info(info, 0)
                prod = products.write_panel_result(result, 0, spec.image, img32=img,
                                                   float_path=str(tmp / "float.bin"), **_writer_paths(tmp, want))
            else:
                pinfo = info
                prod = products.write_result(result, spec.image, float_path=str(tmp / "float.bin"),
                                             **_writer_paths(tmp, want)) or {}
            preview_png(img, tmp / "preview.png", preview, info=pinfo, title=entry_title(h, pinfo), thumb=thumb)
        doc = {**spec_to_dict(spec), "device": spec_to_dict(device)}
        (tmp / "config.yaml").write_text(config_yaml(doc, h))
        from nbsim.report import solid_angle_lines
        lines = (list(getattr(result, "log", None) or [])           # C's setup echo, solid angle, products
                 + solid_angle_lines(getattr(getattr(result, "stats", None), "omega_sum_sr", None))
                 + list(prod.get("lines") or []))
        (tmp / "log.txt").write_text("".join(f"{line}\n" for line in lines))
        run = {
            "hash": h,
            **_versions(),
            "device": device.device,
            "dtype": device.dtype,
            "wall_time_s": round(wall, 6),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stats": {k: prod.get(k, info.get(k)) for k in STAT_KEYS if k in prod or k in info},
            **{k: prod.get(k) for k in PRODUCT_KEYS},
            "files": sorted(want),
            "previews": {preview: "preview.png"},
            **({"preview_thumb_px": thumb} if thumb else {}),
            "inputs_sha256": input_digests(spec, base_dir),
            "warnings": list(getattr(result, "warnings", None) or []),
            "info": info,
        }
        run[MANIFEST_KEY] = manifest(tmp, [p.name for p in tmp.iterdir() if p.name != "run.json"])
        run = json.loads(json.dumps(run, default=_jsonable, allow_nan=True))   # as it will be read back
        run[CHECKSUM_KEY] = _doc_checksum(run)
        _write_json(tmp / "run.json", run)
    return run


# ---------------------------------------------------------------------------------------------
# python -m pipeline.store list | show HASH | verify | gc
# ---------------------------------------------------------------------------------------------

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def entry_overrides(folder: Path) -> str:
    """The keys of an entry's ``config.yaml`` that differ from the schema defaults, ``key=value ...``."""
    from nbsim.spec import ExperimentSpec
    try:
        from omegaconf import OmegaConf
        doc = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    except Exception as e:                       # noqa: BLE001 - a damaged entry is listed, not fatal
        return f"(config.yaml unreadable: {type(e).__name__})"
    default = _flat({**spec_to_dict(ExperimentSpec()), "device": spec_to_dict(DeviceSpec())})
    got = _flat(doc if isinstance(doc, dict) else {})
    return " ".join(f"{k}={v}" for k, v in got.items() if default.get(k, object()) != v) or "(defaults)"


def entries(root: Path):
    """Entry folders (named by a hash) under ``root``, sorted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())


def show_lines(folder: Path) -> list:
    """What ``python -m pipeline.store show HASH`` prints about one entry: its state, key overrides,
    run facts, image statistics and files (size, and whether each matches its checksum)."""
    doc, why = verify_entry(folder, folder.name)
    lines = [f"entry         {folder}", f"state         {'ok' if doc else 'DAMAGED: ' + why}",
             f"overrides     {entry_overrides(folder)}"]
    if doc is None:
        try:
            doc = json.loads((folder / "run.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
    for key in ("created_utc", "device", "dtype", "wall_time_s", "nbsim_version", "torch_version"):
        if key in doc:
            lines.append(f"{key:<13} {doc[key]}")
    if isinstance(doc.get("info"), dict) and doc["info"].get("kernel"):
        lines.append(f"kernel        {doc['info']['kernel']}")
    stats = doc.get("stats") if isinstance(doc.get("stats"), dict) else {}
    if stats:
        lines.append("stats         " + "  ".join(f"{k}={v:.6g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                            for k, v in stats.items()))
    for w in doc.get("warnings") or []:
        lines.append(f"warning       {w}")
    files = doc.get(MANIFEST_KEY) if isinstance(doc.get(MANIFEST_KEY), dict) else {}
    for name in sorted(set(files) | {p.name for p in folder.iterdir() if p.is_file()}):
        p = folder / name
        size = p.stat().st_size if p.is_file() else None
        rec = files.get(name)
        if name == "run.json":
            note = ""
        elif rec is None:
            note = "  (not recorded in run.json)"
        elif size is None:
            note = "  MISSING"
        else:
            note = "" if size == rec.get("bytes") and file_sha256(p) == rec.get("sha256") else "  CHANGED"
        lines.append(f"file          {name:<24} {'-' if size is None else size:>12} bytes{note}")
    return lines


def main(argv=None) -> int:
    """``python -m pipeline.store list|show HASH|verify|gc [--root outputs]``: a table of the entries
    with their key overrides, the details of one entry, a check of every entry (exit 1 if any is
    damaged), removal of damaged entries and of temporary folders left by killed runs (older than
    ``--min-age-h`` hours)."""
    import argparse
    import shutil
    import sys
    ap = argparse.ArgumentParser(prog="python -m pipeline.store")
    ap.add_argument("command", choices=("list", "show", "verify", "gc"))
    ap.add_argument("hash", nargs="?", help="show: the entry (its hash, a unique prefix, or its folder)")
    ap.add_argument("--root", default="outputs")
    ap.add_argument("--min-age-h", type=float, default=1.0, help="gc: age of temporary folders to remove")
    a = ap.parse_args(argv)
    if (a.hash is not None) != (a.command == "show"):
        print(f"pipeline.store: error: {'show needs a HASH' if a.command == 'show' else a.command + ' takes no HASH'}",
              file=sys.stderr)
        return 2
    if a.command == "show" and Path(a.hash).is_dir() and (Path(a.hash) / "run.json").exists():
        a.root, a.hash = str(Path(a.hash).parent), Path(a.hash).name
    root = Path(a.root)
    if not root.is_dir():
        print(f"pipeline.store: error: --root: {root} is not a directory", file=sys.stderr)
        return 2
    if a.command == "show":
        found = [e for e in entries(root) if e.name.startswith(a.hash)]
        if len(found) != 1:
            what = "no entry" if not found else f"{len(found)} entries ({', '.join(e.name for e in found)})"
            print(f"pipeline.store: error: HASH: {what} under {root} starts with {a.hash!r}", file=sys.stderr)
            return 2
        print("\n".join(show_lines(found[0])))
        return 0 if verify_entry(found[0], found[0].name)[0] else 1
    bad = 0
    for e in entries(root):
        doc, why = verify_entry(e, e.name)
        if a.command == "list":
            state = "ok" if doc else f"DAMAGED ({why})"
            when = (doc or {}).get("created_utc", "?")
            print(f"{e.name}  {when}  {state}  {entry_overrides(e)}")
        elif a.command == "verify":
            print(f"{e.name}  {'ok' if doc else 'DAMAGED: ' + why}")
            bad += doc is None
        elif doc is None:
            shutil.rmtree(e, ignore_errors=True)
            print(f"removed {e} ({why})")
    if a.command == "gc":
        now = time.time()
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith((".tmp", ".old")) and p.is_dir() \
                    and now - p.stat().st_mtime > a.min_age_h * 3600:
                shutil.rmtree(p, ignore_errors=True)
                print(f"removed {p} (left by an interrupted run)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
