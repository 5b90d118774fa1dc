"""NeXus NXmx (HDF5) images: the data, the detector modules, the beam and the φ goniometer.

Frames
------
nbsim's lab frame is nanoBragg's: the beam runs along ``info['beam']`` (+x in the MOSFLM, DENZO and
CUSTOM conventions, +z in XDS, DIALS and ADXV), y is "up" for the default conventions.  NeXus uses the
McStas frame: z along the beam, y up, x = y × z (right-handed).  The writer turns nbsim vectors into
McStas vectors with one proper rotation ``R`` (:func:`mcstas_rotation`) built from the run's beam:

* ``ẑ = beam``, ``ŷ = unit(y_nb − (y_nb·ẑ) ẑ)`` (nbsim's +y made perpendicular to the beam; nbsim's
  −z when the beam runs along ±y), ``x̂ = ŷ × ẑ``; McStas coordinates ``v' = R v`` with rows x̂, ŷ, ẑ.
* For the beam along +x this is ``(X, Y, Z)_McStas = (−z, y, x)_nbsim``.  It is a rotation (det +1):
  the plain swap ``(z, y, x)`` would be a mirror.  dxtbx turns McStas into its imgCIF frame with
  ``diag(−1, 1, −1)``, giving ``(z, y, −x)_nbsim``: exactly the ``DIALS_ORIGIN`` nanoBragg writes into
  its SMV headers (``1000·(pix0_z, pix0_y, −pix0_x)``), which ``tests/test_nexus_cbf.py`` checks.

Every vector (detector fast/slow axes, module origins, the spindle) goes through the same ``R``; a
rotation keeps every distance and angle, so the geometry is the run's, only expressed in McStas axes.

Layout written (one image, ``nP = 1``)::

    /entry                      NXentry  definition = "NXmx"
      data/data                 (1, S, F) float32 photons/pixel, or int32 counts (never 16 bits)
      instrument/beam           NXbeam   incident_wavelength [Å] (array + incident_wavelength_weights
                                         when the sources have several wavelengths)
      instrument/detector       NXdetector  depends_on transformations/detector_z (+z, the distance),
                                distance, beam_center_x/y [pixels] (one panel; :func:`direct_beam`),
                                count_time, sensor
      instrument/detector/module<k>   NXdetector_module: data_origin/size (slow, fast); module_offset
                                (translation from detector_z to the corner of the module's first pixel);
                                fast/slow_pixel_direction (translation by the pixel size along the axes)
      instrument/detector/pixel_mask  int32, 1 outside the ROI (and right of narrower panels), else 0
      sample                    NXsample depends_on transformations/phi (rotation about the spindle;
                                phi = start, phi_end = start + oscillation, phi_increment_set)
      sample/beam               hard link to instrument/beam (older NXmx readers look there)
      source                    NXsource

Panels are stacked along the slow axis of ``/entry/data/data`` (module ``k`` starts at row
``sum(S_0..S_{k-1})``, width ``max F``).  A module's origin is the *corner* of its first pixel
(nanoBragg's ``pix0``; pixel (s, f) covers ``origin + [f, f+1)·px·f̂ + [s, s+1)·px·ŝ``), which is how
dxtbx reads ``module_offset`` (its panel origin).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .atomic import atomic_write_bytes

__all__ = ["COMPRESSIONS", "NEXUS_DTYPES", "PanelGeometry", "direct_beam", "mcstas_rotation", "nexus_bytes",
           "panels_from_info", "write_nexus"]

NEXUS_DTYPES = ("float32", "int32")
COMPRESSIONS = ("none", "bslz4")

_DET = "/entry/instrument/detector"


@dataclass(frozen=True)
class PanelGeometry:
    """One detector panel in nbsim's lab frame.

    ``fdet``/``sdet``: (3,) unit fast/slow axes; ``origin_mm``: (3,) corner of the first pixel (mm,
    nanoBragg's ``pix0``); ``pixel_mm``: square pixel size; ``fpixels``/``spixels``: counts."""
    fpixels: int
    spixels: int
    pixel_mm: float
    fdet: tuple
    sdet: tuple
    origin_mm: tuple
    name: str = "module0"


def panels_from_info(info: dict) -> list:
    """The panels of a run: those of ``info['panels']`` when the run has several (the entries of
    ``nbsim.report.PanelReport.to_dict``: ``name``, ``fpixels``, ``spixels``, ``pixel_mm``, ``fast``,
    ``slow`` and ``corner_mm``, the corner of the panel's first pixel), else the single panel of
    ``fdet``, ``sdet``, ``pix0_m``, ``pixel_mm``, ``fpixels``, ``spixels``."""
    if info.get("panels"):
        return [PanelGeometry(fpixels=int(p["fpixels"]), spixels=int(p["spixels"]),
                              pixel_mm=float(p["pixel_mm"]), fdet=tuple(map(float, p["fast"])),
                              sdet=tuple(map(float, p["slow"])),
                              origin_mm=tuple(map(float, p["corner_mm"])), name=str(p["name"]))
                for p in info["panels"]]
    return [PanelGeometry(fpixels=int(info["fpixels"]), spixels=int(info["spixels"]),
                          pixel_mm=float(info["pixel_mm"]), fdet=tuple(map(float, info["fdet"])),
                          sdet=tuple(map(float, info["sdet"])),
                          origin_mm=tuple(float(x) * 1000.0 for x in info["pix0_m"]))]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    if not n > 0 or not math.isfinite(n):
        raise ValueError(f"nexus: cannot normalize the vector {v.tolist()}")
    return v / n


def mcstas_rotation(beam) -> np.ndarray:
    """(3, 3) rotation taking nbsim lab vectors to McStas (NeXus) vectors, ``v' = R @ v``: rows are
    the McStas x̂, ŷ, ẑ in nbsim coordinates (see the module docstring)."""
    z = _unit(beam)
    up = np.array([0.0, 1.0, 0.0])
    y = up - np.dot(up, z) * z
    if np.linalg.norm(y) < 1e-9:                 # beam along ±y: take nbsim's -z as "up"
        up = np.array([0.0, 0.0, -1.0])
        y = up - np.dot(up, z) * z
    y = _unit(y)
    x = np.cross(y, z)
    return np.stack([x, y, z])


def direct_beam(info: dict) -> tuple:
    """``(distance_mm, fbeam_mm, sbeam_mm)``: where the beam from the sample meets the plane of the
    (first) panel, from the panel's ``pix0``, ``fdet``, ``sdet`` and the ``beam`` (nbsim lab frame).

    The distance is measured along the beam, the beam centre from the corner of the first pixel along
    fast and slow.  These equal the run's ``distance_mm``/``fbeam_mm``/``sbeam_mm`` except under the
    faithful quirk ``ratio_ignores_twotheta`` with a two-theta angle, where nanoBragg reports a
    distance that ignores two-theta; the files give the true geometry (the one simulated).  NaN when
    the beam is parallel to the panel."""
    return _direct_beam(panels_from_info(info)[0], info["beam"])


def _direct_beam(p: PanelGeometry, beam) -> tuple:
    """``direct_beam`` for the panel ``p`` and the ``beam`` direction (nbsim lab frame)."""
    o = np.asarray(p.origin_mm, dtype=np.float64)
    f, s_ = _unit(p.fdet), _unit(p.sdet)
    b = _unit(beam)
    n = np.cross(f, s_)
    den = float(np.dot(b, n))
    if den == 0.0:
        return math.nan, math.nan, math.nan
    t = float(np.dot(o, n)) / den
    hit = t * b - o
    return t, float(np.dot(hit, f)), float(np.dot(hit, s_))


def _set_class(g, nx_class: str) -> None:
    g.attrs["NX_class"] = nx_class


def _scalar(g, name: str, value, units: Optional[str] = None, dtype=None):
    ds = g.create_dataset(name, data=np.asarray(value, dtype=dtype))
    if units is not None:
        ds.attrs["units"] = units
    return ds


def _axis(g, name: str, value, vector, *, kind: str, units: str, depends_on: str, offset=None):
    """One NXtransformations axis: a dataset with ``transformation_type``, ``vector``, ``depends_on``
    (and ``offset`` in mm when given)."""
    ds = g.create_dataset(name, data=np.atleast_1d(np.asarray(value, dtype=np.float64)))
    ds.attrs["units"] = units
    ds.attrs["transformation_type"] = kind
    ds.attrs["vector"] = np.asarray(vector, dtype=np.float64)
    ds.attrs["depends_on"] = depends_on
    if offset is not None:
        ds.attrs["offset"] = np.asarray(offset, dtype=np.float64)
        ds.attrs["offset_units"] = "mm"
    return ds


def _stack_panels(data, panels) -> np.ndarray:
    """(S_total, F_max) array of the panels' images, stacked along the slow axis."""
    arrays = [np.asarray(data)] if not isinstance(data, (list, tuple)) else [np.asarray(a) for a in data]
    if len(arrays) != len(panels):
        raise ValueError(f"nexus: {len(arrays)} image(s) for {len(panels)} panel(s)")
    for a, p in zip(arrays, panels):
        if a.shape != (p.spixels, p.fpixels):
            raise ValueError(f"nexus: image of {p.name} has shape {a.shape}, panel is "
                             f"({p.spixels}, {p.fpixels}) (slow, fast)")
    if len(arrays) == 1:
        return arrays[0]
    out = np.zeros((sum(p.spixels for p in panels), max(p.fpixels for p in panels)), arrays[0].dtype)
    row = 0
    for a, p in zip(arrays, panels):
        out[row:row + p.spixels, :p.fpixels] = a
        row += p.spixels
    return out


def nexus_bytes(data, info: dict, *, dtype: str = "float32", compression: str = "none",
                panels: Optional[Sequence[PanelGeometry]] = None, mask=None) -> bytes:
    """The complete NXmx file as bytes (built in memory; see the module docstring for the layout).

    Parameters
    ----------
    data : array (S, F), or a list of per-panel (S_k, F_k) arrays
        float32 photons/pixel (``dtype='float32'``) or int32 counts (``dtype='int32'``); the values
        are stored exactly (a float32/int32 input is not converted).
    info : dict
        The run's values (``SimResult.info``): ``wavelength_A``, ``spectrum_A`` (optional
        ``[[λ_A, weight], ...]``), ``beam``, ``spindle``, ``phi_deg``, ``osc_deg``, ``distance_mm``,
        ``fbeam_mm``, ``sbeam_mm``, ``exposure_s``, ``thick_m`` and the panel keys of
        :func:`panels_from_info`.
    dtype : 'float32' | 'int32'
    compression : 'none' | 'bslz4' (bitshuffle + LZ4 through ``hdf5plugin``)
    panels : list of PanelGeometry, optional
        Default :func:`panels_from_info`.
    mask : bool array like ``data``, optional
        The ROI (pixels written); the others are flagged in ``pixel_mask`` (bit 0, "dead", as NXmx
        defines; written always, all 0 when every pixel is inside).
    """
    import h5py

    if dtype not in NEXUS_DTYPES:
        raise ValueError(f"nexus: dtype must be one of {', '.join(NEXUS_DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"nexus: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    panels = list(panels) if panels is not None else panels_from_info(info)
    img = _stack_panels(data, panels)
    np_dtype = np.float32 if dtype == "float32" else np.int32
    if img.dtype != np_dtype:
        if dtype == "int32" and not np.issubdtype(img.dtype, np.integer):
            raise TypeError(f"nexus: int32 output needs integer counts, got {img.dtype}")
        if dtype == "int32" and img.size and (img.min() < -2**31 or img.max() > 2**31 - 1):
            raise ValueError("nexus: counts outside the int32 range")
        img = img.astype(np_dtype)
    R = mcstas_rotation(info["beam"])
    filters = {}
    if compression == "bslz4":
        import hdf5plugin
        filters = dict(hdf5plugin.Bitshuffle(cname="lz4"))

    buf = io.BytesIO()
    with h5py.File(buf, "w", libver=("earliest", "v110"), track_order=True) as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        _set_class(entry, "NXentry")
        entry.attrs["default"] = "data"
        entry.create_dataset("definition", data="NXmx")

        nxdata = entry.create_group("data")
        _set_class(nxdata, "NXdata")
        nxdata.attrs["signal"] = "data"
        ds = nxdata.create_dataset("data", data=img[None], chunks=(1,) + img.shape, **filters)
        if dtype == "int32":
            ds.attrs["units"] = "counts"            # float32: photons per pixel (no NeXus unit for it)

        inst = entry.create_group("instrument")
        _set_class(inst, "NXinstrument")
        inst.create_dataset("name", data="nbsim (simulated)")

        beam = inst.create_group("beam")
        _set_class(beam, "NXbeam")
        spec = [list(map(float, row)) for row in (info.get("spectrum_A") or [])]
        if len(spec) > 1:
            _scalar(beam, "incident_wavelength", [r[0] for r in spec], "angstrom", np.float64)
            _scalar(beam, "incident_wavelength_weights", [r[1] for r in spec], None, np.float64)
        else:
            lam = spec[0][0] if spec else float(info["wavelength_A"])
            _scalar(beam, "incident_wavelength", lam, "angstrom", np.float64)

        det = inst.create_group("detector", track_order=True)   # modules listed in panel order
        _set_class(det, "NXdetector")
        det.create_dataset("description", data="nbsim simulated detector")
        det.create_dataset("depends_on", data=f"{_DET}/transformations/detector_z")
        distance_mm, fbeam_mm, sbeam_mm = _direct_beam(panels[0], info["beam"])
        if math.isfinite(distance_mm):
            _scalar(det, "distance", distance_mm, "mm", np.float64)
        else:
            distance_mm = 0.0
        if len(panels) == 1 and math.isfinite(fbeam_mm):
            px = panels[0].pixel_mm
            _scalar(det, "beam_center_x", fbeam_mm / px, "pixel", np.float64)
            _scalar(det, "beam_center_y", sbeam_mm / px, "pixel", np.float64)
        _scalar(det, "count_time", float(info.get("exposure_s", 1.0)), "s", np.float64)
        # nbsim's sensor has a thickness and an attenuation length, no material; DIALS needs one
        det.create_dataset("sensor_material", data="Si")
        _scalar(det, "sensor_thickness", float(info.get("thick_m", 0.0)), "m", np.float64)
        if dtype == "int32":
            from .images import COUNT_MAX
            _scalar(det, "saturation_value", COUNT_MAX, None, np.int32)
        # always present (some dxtbx versions require it); deflate keeps an all-zero mask small
        m = np.ones(img.shape, bool) if mask is None else _stack_panels(mask, panels).astype(bool)
        if len(panels) > 1:                      # the padding right of a narrower panel is no pixel
            gap = np.ones(img.shape, bool)
            row = 0
            for p in panels:
                gap[row:row + p.spixels, :p.fpixels] = False
                row += p.spixels
            m &= ~gap
        det.create_dataset("pixel_mask", data=(~m).astype(np.int32), chunks=img.shape, compression="gzip",
                           compression_opts=1)
        det.create_dataset("pixel_mask_applied", data=False)
        tr = det.create_group("transformations")
        _set_class(tr, "NXtransformations")
        _axis(tr, "detector_z", distance_mm, (0.0, 0.0, 1.0), kind="translation", units="mm",
              depends_on=".")
        row = 0
        for p in panels:
            mod = det.create_group(p.name)
            _set_class(mod, "NXdetector_module")
            _scalar(mod, "data_origin", [row, 0], None, np.int64)
            _scalar(mod, "data_size", [p.spixels, p.fpixels], None, np.int64)
            _scalar(mod, "data_stride", [1, 1], None, np.int64)
            row += p.spixels
            origin = R @ np.asarray(p.origin_mm, dtype=np.float64)
            d = origin - np.array([0.0, 0.0, distance_mm])
            dn = float(np.linalg.norm(d))
            _axis(mod, "module_offset", dn, d / dn if dn > 0 else (1.0, 0.0, 0.0), kind="translation",
                  units="mm", depends_on=f"{_DET}/transformations/detector_z")
            for name, axis in (("fast_pixel_direction", p.fdet), ("slow_pixel_direction", p.sdet)):
                _axis(mod, name, p.pixel_mm, R @ _unit(axis), kind="translation", units="mm",
                      depends_on=f"{_DET}/{p.name}/module_offset", offset=(0.0, 0.0, 0.0))

        sample = entry.create_group("sample")
        _set_class(sample, "NXsample")
        sample.create_dataset("name", data="nbsim crystal")
        sample.create_dataset("depends_on", data="/entry/sample/transformations/phi")
        st = sample.create_group("transformations")
        _set_class(st, "NXtransformations")
        phi = float(info.get("phi_deg", 0.0))
        osc = float(info.get("osc_deg", 0.0))
        _axis(st, "phi", phi, R @ _unit(info["spindle"]), kind="rotation", units="deg", depends_on=".")
        _scalar(st, "phi_end", [phi + osc], "deg", np.float64)
        _scalar(st, "phi_increment_set", osc, "deg", np.float64)
        sample["beam"] = beam                     # hard link

        source = entry.create_group("source")
        _set_class(source, "NXsource")
        source.create_dataset("name", data="nbsim simulation")
    return buf.getvalue()


def write_nexus(path, data, info: dict, **kw) -> Path:
    """Write :func:`nexus_bytes` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, nexus_bytes(data, info, **kw))
