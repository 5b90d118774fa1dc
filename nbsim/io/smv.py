"""SMV (ADSC) images as nanoBragg writes them: 512-byte text header + uint16 pixels.

Header (``-intfile`` and ``-noisefile`` are identical apart from data), one ``KEY=value;`` per line,
numbers with C ``%g`` (6 significant digits)::

    {
    HEADER_BYTES=512;  DIM=2;  BYTE_ORDER=little_endian;  TYPE=unsigned_short;
    SIZE1=<fpixels>;  SIZE2=<spixels>;  PIXEL_SIZE=<mm>;  DISTANCE=<mm>;  WAVELENGTH=<A>;
    BEAM_CENTER_X=<Xbeam mm>;  BEAM_CENTER_Y=<Ybeam mm>;
    ADXV_CENTER_X=<Fbeam mm>;  ADXV_CENTER_Y=<(detsize_s - Sbeam) mm>;
    MOSFLM_CENTER_X=<(Sbeam - px/2) mm>;  MOSFLM_CENTER_Y=<(Fbeam - px/2) mm>;
    DENZO_X_BEAM=<Sbeam mm>;  DENZO_Y_BEAM=<Fbeam mm>;
    DIALS_ORIGIN=<x>,<y>,<z>          <- no ';' (C quirk)
    XDS_ORGX=<px>;  XDS_ORGY=<px>;  CLOSE_DISTANCE=<mm>;
    PHI=<deg>;  OSC_START=<deg>;  OSC_RANGE=<deg>;  TWOTHETA=<deg>;
    DETECTOR_SN=000;  BEAMLINE=fake;
    }\\f  then spaces up to byte 512 (no padding, no truncation if the text is longer)

Pixels follow as uint16, slow-major (index = s*fpixels + f).  C writes native byte order and names
it; this module always writes little-endian and says so.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .inputs import MAX_IMAGE_BYTES, InputFileError, gunzip_bounded, read_input_bytes

__all__ = ["c_g", "parse_smv", "read_smv", "smv_bytes", "smv_header", "smv_info", "write_smv"]

RTD = 180.0 / math.pi  # C: #define RTD (180.0/M_PI)

#: keys :func:`smv_header` needs (mm unless noted)
REQUIRED_KEYS = (
    "fpixels", "spixels", "pixel_mm", "distance_mm", "wavelength_A", "xbeam_mm", "ybeam_mm",
    "fbeam_mm", "sbeam_mm", "detsize_s_mm", "dials_origin_mm", "orgx_px", "orgy_px",
    "close_distance_mm", "phi_deg", "osc_deg", "twotheta_deg",
)


def c_g(x) -> str:
    """C ``printf("%g", x)`` for a double (Python's ``%g`` plus glibc's ``-nan``)."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return "%g" % x


def smv_info(*, fpixels: int, spixels: int, pixel_size_m: float, distance_m: float,
             lambda_m: float, Xbeam_m: float, Ybeam_m: float, Fbeam_m: float, Sbeam_m: float,
             detsize_s_m: float, dials_origin_mm, ORGX: float, ORGY: float,
             close_distance_m: float, phi0_rad: float = 0.0, osc_rad: float = 0.0,
             twotheta_rad: float = 0.0) -> dict:
    """Build the :func:`smv_header` ``info`` dict from nanoBragg's internal SI values.

    Every printed value is computed with the same double arithmetic as the C ``fprintf`` arguments
    (e.g. ``(detsize_s - Sbeam)*1000``, ``phi0*RTD``), so the derived ``*_mm`` keys match C bit for
    bit.  Lengths in metres, angles in radians, ``dials_origin_mm`` (3,) already in mm as C stores it,
    ``ORGX/ORGY`` in pixels.  These are the post-rotation values (notes 4.1 step 8).
    """
    return {
        "fpixels": int(fpixels),
        "spixels": int(spixels),
        "pixel_mm": pixel_size_m * 1000.0,
        "distance_mm": distance_m * 1000.0,
        "wavelength_A": lambda_m * 1e10,
        "xbeam_mm": Xbeam_m * 1000.0,
        "ybeam_mm": Ybeam_m * 1000,
        "fbeam_mm": Fbeam_m * 1000.0,
        "sbeam_mm": Sbeam_m * 1000.0,
        "detsize_s_mm": detsize_s_m * 1000.0,
        "adxv_center_y_mm": (detsize_s_m - Sbeam_m) * 1000,
        "mosflm_center_x_mm": (Sbeam_m - 0.5 * pixel_size_m) * 1000.0,
        "mosflm_center_y_mm": (Fbeam_m - 0.5 * pixel_size_m) * 1000,
        "denzo_x_beam_mm": (Sbeam_m - 0.0 * pixel_size_m) * 1000.0,
        "denzo_y_beam_mm": (Fbeam_m - 0.0 * pixel_size_m) * 1000,
        "dials_origin_mm": [float(v) for v in dials_origin_mm],
        "orgx_px": float(ORGX),
        "orgy_px": float(ORGY),
        "close_distance_mm": close_distance_m * 1000.0,
        "phi_deg": phi0_rad * RTD,
        "osc_deg": osc_rad * RTD,
        "twotheta_deg": twotheta_rad * RTD,
    }


def smv_header(info: dict, header_bytes: int = 512, byte_order: str = "little_endian") -> bytes:
    """The SMV header bytes nanoBragg writes (see module docstring).

    Parameters
    ----------
    info : dict
        Keys :data:`REQUIRED_KEYS` (floats in mm / A / px / deg, ``fpixels``/``spixels`` ints,
        ``dials_origin_mm`` a 3-sequence).  Optional exact overrides, as :func:`smv_info` provides:
        ``adxv_center_y_mm``, ``mosflm_center_x_mm``, ``mosflm_center_y_mm``, ``denzo_x_beam_mm``,
        ``denzo_y_beam_mm``; when absent they are derived from the mm values
        (e.g. ADXV_CENTER_Y = detsize_s - Sbeam, MOSFLM_CENTER_X = Sbeam - px/2), which can differ from
        C in the 6th significant digit only in rare rounding cases.
    header_bytes : int
        Padding target and the value written as HEADER_BYTES (C: 512).  A longer text is not cut.
    byte_order : str
        ``little_endian`` or ``big_endian`` (the data order the caller will write).

    Returns
    -------
    bytes — ``max(header_bytes, len(text))`` bytes of ASCII.
    """
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise KeyError(f"smv_header: info is missing {', '.join(missing)}")
    if byte_order not in ("little_endian", "big_endian"):
        raise ValueError(f"smv_header: byte_order must be little_endian or big_endian, got {byte_order!r}")
    px = float(info["pixel_mm"])
    fb = float(info["fbeam_mm"])
    sb = float(info["sbeam_mm"])
    def exact(key, derived):                  # None: an entry stored without the exact value
        v = info.get(key)
        return derived if v is None else v
    adxv_y = exact("adxv_center_y_mm", float(info["detsize_s_mm"]) - sb)
    mos_x = exact("mosflm_center_x_mm", sb - 0.5 * px)
    mos_y = exact("mosflm_center_y_mm", fb - 0.5 * px)
    den_x = info.get("denzo_x_beam_mm", sb)
    den_y = info.get("denzo_y_beam_mm", fb)
    dials = [float(v) for v in info["dials_origin_mm"]]
    if len(dials) != 3:
        raise ValueError(f"smv_header: dials_origin_mm must have 3 values, got {len(dials)}")
    g = c_g
    text = (
        "{\n"
        f"HEADER_BYTES={int(header_bytes)};\nDIM=2;\nBYTE_ORDER={byte_order};\nTYPE=unsigned_short;\n"
        f"SIZE1={int(info['fpixels'])};\nSIZE2={int(info['spixels'])};\n"
        f"PIXEL_SIZE={g(px)};\nDISTANCE={g(info['distance_mm'])};\n"
        f"WAVELENGTH={g(info['wavelength_A'])};\n"
        f"BEAM_CENTER_X={g(info['xbeam_mm'])};\nBEAM_CENTER_Y={g(info['ybeam_mm'])};\n"
        f"ADXV_CENTER_X={g(fb)};\nADXV_CENTER_Y={g(adxv_y)};\n"
        f"MOSFLM_CENTER_X={g(mos_x)};\nMOSFLM_CENTER_Y={g(mos_y)};\n"
        f"DENZO_X_BEAM={g(den_x)};\nDENZO_Y_BEAM={g(den_y)};\n"
        f"DIALS_ORIGIN={g(dials[0])},{g(dials[1])},{g(dials[2])}\n"
        f"XDS_ORGX={g(info['orgx_px'])};\nXDS_ORGY={g(info['orgy_px'])};\n"
        f"CLOSE_DISTANCE={g(info['close_distance_mm'])};\n"
        f"PHI={g(info['phi_deg'])};\nOSC_START={g(info['phi_deg'])};\nOSC_RANGE={g(info['osc_deg'])};\n"
        f"TWOTHETA={g(info['twotheta_deg'])};\n"
        "DETECTOR_SN=000;\n"
        "BEAMLINE=fake;\n"
        "}\f"
    )
    raw = text.encode("ascii")
    if len(raw) < header_bytes:
        raw += b" " * (header_bytes - len(raw))
    return raw


def smv_bytes(data_u16, info: dict, header_bytes: int = 512) -> bytes:
    """Header + little-endian uint16 pixels.  ``data_u16``: (S, F) with S = spixels, F = fpixels."""
    d = np.asarray(data_u16)
    if d.ndim != 2:
        raise ValueError(f"smv_bytes: data must be 2-D (slow, fast), got shape {d.shape}")
    if d.dtype != np.uint16:
        raise TypeError(f"smv_bytes: data must be uint16, got {d.dtype}")
    S, F = d.shape
    if (int(info.get("spixels", S)), int(info.get("fpixels", F))) != (S, F):
        raise ValueError(f"smv_bytes: data shape {d.shape} != (spixels, fpixels) = "
                         f"({info.get('spixels')}, {info.get('fpixels')})")
    return smv_header(info, header_bytes) + np.ascontiguousarray(d, dtype="<u2").tobytes()


def write_smv(path, data_u16, info: dict, header_bytes: int = 512) -> Path:
    """Write an SMV file atomically (see :func:`smv_bytes`); returns the path."""
    return atomic_write_bytes(path, smv_bytes(data_u16, info, header_bytes))


_HB_RE = re.compile(rb"HEADER_BYTES\s*=\s*(\d+)")


def parse_smv(raw: bytes, name: str = "<bytes>") -> tuple[dict, np.ndarray]:
    """Parse SMV bytes: returns (header dict of str -> str, data uint16 (SIZE2, SIZE1), native order).

    Header lines are ``KEY=VALUE`` with an optional trailing ``;`` (nanoBragg's DIALS_ORIGIN line has
    none).  Supports TYPE=unsigned_short and either BYTE_ORDER.
    """
    m = _HB_RE.search(raw[:1024])
    if raw[:1] != b"{" or m is None:
        raise InputFileError(f"{name}: not an SMV file (no '{{' / HEADER_BYTES in the first bytes)")
    hb = int(m.group(1))
    if not 1 <= hb <= len(raw):
        raise InputFileError(f"{name}: HEADER_BYTES={m.group(1).decode()} is outside the file "
                             f"({len(raw)} bytes)")
    text = raw[:hb].decode("latin-1")
    end = text.find("}")
    body = text[1:end if end >= 0 else len(text)]
    header: dict[str, str] = {}
    for line in body.splitlines():
        line = line.strip()
        if not line or "=" not in line:
            continue
        key, _, val = line.partition("=")
        header[key.strip()] = val.strip().rstrip(";").strip()
    try:
        fast = int(header["SIZE1"])
        slow = int(header["SIZE2"])
    except (KeyError, ValueError) as e:
        raise InputFileError(f"{name}: SMV header lacks a valid SIZE1/SIZE2 ({e})") from None
    if fast < 1 or slow < 1:
        raise InputFileError(f"{name}: SIZE1={fast}, SIZE2={slow}: need >= 1 pixel each")
    typ = header.get("TYPE", "unsigned_short")
    if typ != "unsigned_short":
        raise InputFileError(f"{name}: unsupported SMV TYPE={typ!r} (only unsigned_short)")
    order = header.get("BYTE_ORDER", "little_endian")
    if order not in ("little_endian", "big_endian"):
        raise InputFileError(f"{name}: unknown BYTE_ORDER={order!r}")
    n = fast * slow
    if len(raw) < hb + 2 * n:
        raise InputFileError(f"{name}: truncated SMV data: need {hb + 2 * n} bytes, file has {len(raw)}")
    dt = np.dtype("<u2" if order == "little_endian" else ">u2")
    data = np.frombuffer(raw, dtype=dt, count=n, offset=hb).astype(np.uint16).reshape(slow, fast)
    return header, data


def read_smv(path) -> tuple[dict, np.ndarray]:
    """Read an SMV file (``.gz`` transparently): (header dict str -> str, data uint16 (S, F))."""
    path = Path(path)
    raw = read_input_bytes(path, MAX_IMAGE_BYTES)
    if raw[:2] == b"\x1f\x8b":
        raw = gunzip_bounded(raw, path, MAX_IMAGE_BYTES)
    return parse_smv(raw, str(path))
