"""CBF images with a miniCBF header, written through fabio.

The pixels are int32 counts (:func:`nbsim.io.images.count_image`: the ``-intfile`` formula without the
16-bit clip), compressed with CBF byte-offset as fabio writes them.  The header convention is ``GENERIC_MINI``,
the one dxtbx defines for simulated pixel-array data of any size (its ``FormatCBFMini`` reads it;
``PILATUS_1.2`` would make DIALS apply a real PILATUS's module gaps and require a timestamp).  The
header carries, in the PILATUS miniCBF keywords that DIALS and fabio's ``PilatusHeader`` read::

    # Detector: nbsim simulated detector
    # Pixel_size <px m> m x <px m> m
    # Silicon sensor, thickness <m> m
    # Exposure_time <s> s                 # Exposure_period <s> s
    # Count_cutoff <COUNT_MAX> counts
    # Wavelength <Å> A
    # Detector_distance <m> m
    # Beam_xy (<Fbeam/px>, <Sbeam/px>) pixels
    # Start_angle <φ0> deg.               # Angle_increment <osc> deg.
    # Phi <φ0> deg.                       # Phi_increment <osc> deg.
    # Detector_2theta <deg> deg.

numbers with 12 significant digits.  ``Beam_xy`` is the direct-beam position in pixels from the corner
of the first pixel along fast and slow (DIALS's convention; nbsim's ``Fbeam``/``Sbeam`` over the
pixel size), ``Detector_distance`` the distance along the beam (both from
:func:`nbsim.io.nexus.direct_beam`).  The miniCBF header describes a detector facing the beam
(fast +x, slow −y in imgCIF); a tilted or rotated detector is described exactly only by the NeXus
file (:mod:`nbsim.io.nexus`).  A CBF holds one panel.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .images import COUNT_MAX

__all__ = ["HEADER_CONVENTION", "cbf_bytes", "cbf_header", "write_cbf"]

HEADER_CONVENTION = "GENERIC_MINI"


def _g(x) -> str:
    return "%.12g" % float(x)


def cbf_header(info: dict) -> str:
    """The miniCBF header text (lines ``# Keyword value``, CR LF separated) from the run's ``info``
    (``pixel_mm``, ``thick_m``, ``exposure_s``, ``wavelength_A``, ``phi_deg``, ``osc_deg``,
    ``twotheta_deg``; distance and beam centre from the geometry keys by
    :func:`nbsim.io.nexus.direct_beam`)."""
    from .nexus import direct_beam
    px_m = float(info["pixel_mm"]) * 1e-3
    px_mm = float(info["pixel_mm"])
    distance_mm, fbeam_mm, sbeam_mm = direct_beam(info)
    exposure = float(info.get("exposure_s", 1.0))
    lines = [
        "Detector: nbsim simulated detector",
        f"Pixel_size {_g(px_m)} m x {_g(px_m)} m",
        f"Silicon sensor, thickness {_g(info.get('thick_m', 0.0))} m",
        f"Exposure_time {_g(exposure)} s",
        f"Exposure_period {_g(exposure)} s",
        f"Count_cutoff {COUNT_MAX} counts",
        f"Wavelength {_g(info['wavelength_A'])} A",
        f"Detector_distance {_g(distance_mm * 1e-3)} m",
        f"Beam_xy ({_g(fbeam_mm / px_mm)}, {_g(sbeam_mm / px_mm)}) pixels",
        f"Start_angle {_g(info.get('phi_deg', 0.0))} deg.",
        f"Angle_increment {_g(info.get('osc_deg', 0.0))} deg.",
        f"Phi {_g(info.get('phi_deg', 0.0))} deg.",
        f"Phi_increment {_g(info.get('osc_deg', 0.0))} deg.",
        f"Detector_2theta {_g(info.get('twotheta_deg', 0.0))} deg.",
    ]
    return "\r\n".join(f"# {line}" for line in lines)


def cbf_bytes(counts, info: dict) -> bytes:
    """The CBF file as bytes: int32 ``counts`` (S, F) and the header of :func:`cbf_header`."""
    from fabio.cbfimage import CbfImage

    if len(info.get("panels") or ()) > 1:
        raise ValueError("cbf: a CBF holds one panel; write a multi-panel detector as NeXus")
    a = np.asarray(counts)
    if a.ndim != 2:
        raise ValueError(f"cbf: expected a 2-D (slow, fast) image, got shape {a.shape}")
    if a.dtype != np.int32:
        raise TypeError(f"cbf: counts must be int32, got {a.dtype}")
    img = CbfImage(data=np.ascontiguousarray(a), header={
        "_array_data.header_convention": HEADER_CONVENTION,
        "_array_data.header_contents": cbf_header(info)})
    # fabio writes to a file name only: write into a private temporary folder and read it back
    with tempfile.TemporaryDirectory(prefix="nbsim-cbf-") as tmp:
        p = os.path.join(tmp, "image.cbf")
        img.write(p)
        return Path(p).read_bytes()


def write_cbf(path, counts, info: dict) -> Path:
    """Write :func:`cbf_bytes` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, cbf_bytes(counts, info))
