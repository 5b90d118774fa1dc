"""The parameter tree: every continuous quantity of an experiment as a tensor, by its config name.

``PARAMS`` is the single table of the schema keys that carry gradients (key → shape, unit, what it
means). ``param_tree(spec, params)`` builds the tree the setup reads: a float64 tensor for every key
of the table that the spec sets (or that ``params`` gives), with the user's tensors taking the place
of the spec's values — so a tensor with ``requires_grad`` passes its graph on to the pixels, and a
plain tensor is an ordinary forward with that value.

Discrete choices derived from these values (auto oversampling, the number of sensor layers, whether
a φ step is exactly 0, which sources a round divergence keeps, whether a lattice axis has N > 1) are
taken at the given values; the gradient is the derivative with those choices held fixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from nbsim.spec import ExperimentSpec, SpecError


@dataclass(frozen=True)
class ParamInfo:
    """One differentiable key: its tensor shape, unit and meaning."""
    shape: Tuple[int, ...]
    unit: str
    doc: str


_S = ()
PARAMS: Dict[str, ParamInfo] = {
    "detector.distance_mm": ParamInfo(_S, "mm", "sample to beam spot along the beam"),
    "detector.close_distance_mm": ParamInfo(_S, "mm", "sample to detector plane along its normal"),
    "detector.pixel_mm": ParamInfo(_S, "mm", "pixel size"),
    "detector.xbeam_mm": ParamInfo(_S, "mm", "beam centre X (convention's frame)"),
    "detector.ybeam_mm": ParamInfo(_S, "mm", "beam centre Y (convention's frame)"),
    "detector.xclose_mm": ParamInfo(_S, "mm", "near point X (sample pivot)"),
    "detector.yclose_mm": ParamInfo(_S, "mm", "near point Y (sample pivot)"),
    "detector.orgx_px": ParamInfo(_S, "pixels", "XDS ORGX"),
    "detector.orgy_px": ParamInfo(_S, "pixels", "XDS ORGY"),
    "detector.rotx_deg": ParamInfo(_S, "deg", "detector rotation about lab x"),
    "detector.roty_deg": ParamInfo(_S, "deg", "detector rotation about lab y"),
    "detector.rotz_deg": ParamInfo(_S, "deg", "detector rotation about lab z"),
    "detector.twotheta_deg": ParamInfo(_S, "deg", "detector two-theta swing"),
    "detector.thick_um": ParamInfo(_S, "um", "sensor thickness"),
    "detector.attenuation_um": ParamInfo(_S, "um", "sensor attenuation length"),
    "beam.wavelength_A": ParamInfo(_S, "A", "central wavelength"),
    "beam.dispersion_pct": ParamInfo(_S, "%", "full spectral width"),
    "beam.hdivrange_mrad": ParamInfo(_S, "mrad", "horizontal divergence range"),
    "beam.vdivrange_mrad": ParamInfo(_S, "mrad", "vertical divergence range"),
    "beam.fluence_ph_per_m2": ParamInfo(_S, "photons/m^2", "fluence"),
    "beam.kahn_factor": ParamInfo(_S, "", "polarization (Kahn) factor"),
    "crystal.cell_A_deg": ParamInfo((6,), "A, deg", "a b c alpha beta gamma"),
    "crystal.misset_deg": ParamInfo((3,), "deg", "misset rotations about x, y, z"),
    "crystal.matrix": ParamInfo((3, 3), "1/A (x lambda)",
                                "MOSFLM A matrix (with crystal.matrix_file or an .expt crystal)"),
    "crystal.N": ParamInfo(_S, "cells", "cells along each axis (continuous in the lattice factor)"),
    "crystal.Na": ParamInfo(_S, "cells", "cells along a"),
    "crystal.Nb": ParamInfo(_S, "cells", "cells along b"),
    "crystal.Nc": ParamInfo(_S, "cells", "cells along c"),
    "crystal.default_F": ParamInfo(_S, "electrons", "structure factor outside the table"),
    "crystal.F_table": ParamInfo((-1, -1, -1), "electrons", "dense structure-factor table (h, k, l)"),
    "crystal.mosaic_deg": ParamInfo(_S, "deg", "mosaic spread"),
    "crystal.phi_deg": ParamInfo(_S, "deg", "spindle start angle"),
    "crystal.osc_deg": ParamInfo(_S, "deg", "oscillation range"),
}

#: per-panel keys of a multi-panel detector (``detector.panels.<i>.<name>``, README: Multi-panel
#: detectors); ``<i>`` is the panel's index in geometry order
PANEL_PARAMS: Dict[str, ParamInfo] = {
    "origin_mm": ParamInfo((3,), "mm", "panel i: corner of pixel (0, 0) of its frame, lab [x, y, z]"),
    "rot_deg": ParamInfo((3,), "deg", "panel i: rotation about lab x, y, z through its origin"),
}
PANEL_PREFIX = "detector.panels."


def panel_key(key: str) -> Optional[Tuple[int, str]]:
    """``(i, name)`` of a per-panel key ``detector.panels.<i>.<name>`` of ``PANEL_PARAMS``, else None."""
    if not key.startswith(PANEL_PREFIX):
        return None
    rest = key[len(PANEL_PREFIX):].split(".")
    if len(rest) != 2 or not rest[0].isdigit() or rest[1] not in PANEL_PARAMS:
        return None
    return int(rest[0]), rest[1]


def param_keys_text() -> str:
    """The keys that can carry a gradient, for messages: every ``PARAMS`` key, then the per-panel
    ones of ``PANEL_PARAMS`` as ``detector.panels.<i>.<name>``."""
    return ", ".join(PARAMS) + ", and per panel " + ", ".join(f"{PANEL_PREFIX}<i>.{k}" for k in PANEL_PARAMS)


def param_info(key: str) -> Optional[ParamInfo]:
    """The ``ParamInfo`` of a differentiable key (global or per-panel), else None."""
    pk = panel_key(key)
    return PANEL_PARAMS[pk[1]] if pk is not None else PARAMS.get(key)


# keys of the schema that exist but are discrete (or select files): named in the refusal message
_DISCRETE_HINT = ("integer counts (pixels, steps, domains), file names, switches and conventions "
                  "are discrete")


def check_params(params: Optional[Mapping[str, torch.Tensor]], spec: ExperimentSpec) -> None:
    """Refuse, with one line naming the key, what cannot be a parameter (``SpecError``)."""
    if not params:
        return
    if not isinstance(params, Mapping):
        raise SpecError("params", f"must map schema keys to tensors, got {type(params).__name__}")
    for key, value in params.items():
        info = param_info(key)
        if info is None:
            raise SpecError(key, "cannot carry a gradient (" + _DISCRETE_HINT + "); keys that can: "
                            + param_keys_text())
        if panel_key(key) is not None and spec.detector.panels is None and spec.detector.geometry_file is None:
            raise SpecError(key, "needs a multi-panel detector (detector.panels or detector.geometry_file)")
        if not isinstance(value, torch.Tensor):
            raise SpecError(key, f"params values must be torch tensors, got {type(value).__name__}")
        if not value.is_floating_point():
            raise SpecError(key, f"must be a floating-point tensor, got {value.dtype}")
        if key == "crystal.F_table":
            if value.dim() != 3:
                raise SpecError(key, f"must have the table's shape (h, k, l), got {tuple(value.shape)}")
        elif tuple(value.shape) != info.shape:
            raise SpecError(key, f"must have shape {info.shape}, got {tuple(value.shape)}")
        if key == "crystal.matrix" and spec.crystal.matrix_file is None and not (
                spec.detector.geometry_file is not None and spec.crystal.cell_A_deg is None):
            # the crystal of an .expt (crystal=geometry) is a MOSFLM matrix as a matrix file's is
            # (nbsim.inputs.geometry_crystal): the key replaces it the same way
            raise SpecError(key, "needs crystal.matrix_file, or the crystal of a .expt given as "
                            "detector.geometry_file without crystal.cell_A_deg (the matrix it replaces)")
        if (key == "crystal.F_table" and spec.crystal.hkl_file is None and spec.crystal.model_file is None
                and spec.crystal.fdump_file is None):
            raise SpecError(key, "needs crystal.hkl_file or crystal.model_file (the table it replaces)")
        if key == "crystal.cell_A_deg" and spec.crystal.cell_A_deg is None:
            raise SpecError(key, "needs crystal.cell_A_deg in the spec (the matrix path has no cell)")
        if key == "crystal.misset_deg" and spec.crystal.misset_random:
            raise SpecError(key, "cannot be a parameter with crystal.misset_random")
        if not bool(torch.isfinite(value.detach()).all()):
            raise SpecError(key, "must be finite")


def _spec_value(spec: ExperimentSpec, key: str):
    group, name = key.split(".", 1)
    return getattr(getattr(spec, group), name, None)


def param_tree(spec: ExperimentSpec, params: Optional[Mapping[str, torch.Tensor]] = None, *,
               device="cpu") -> Dict[str, torch.Tensor]:
    """Float64 tensors on ``device`` for every ``PARAMS`` key that the spec sets or ``params`` gives.

    The user's tensors keep their autograd graph (``.to`` is differentiable); keys the spec leaves
    unset (``None``) and ``params`` does not give are absent, so the setup applies nanoBragg's default.
    ``crystal.matrix`` and ``crystal.F_table`` appear only when given (the setup reads the files)."""
    check_params(params, spec)
    params = dict(params or {})
    tree = {}
    for key in PARAMS:
        if key in params:
            tree[key] = params[key].to(dtype=torch.float64, device=device)
            continue
        if key in ("crystal.matrix", "crystal.F_table"):
            continue
        v = _spec_value(spec, key)
        if v is None:
            continue
        tree[key] = torch.tensor(v, dtype=torch.float64, device=device)
    return tree


def plain(t: torch.Tensor):
    """The values of ``t`` as a NumPy array: detached, and unwrapped from ``torch.func`` transforms
    (for reports, statistics and writers, never on the path to the pixels)."""
    with torch._C._DisableFuncTorch():
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            t = torch._C._functorch.get_unwrapped(t)
        return t.detach().cpu().numpy().copy()


def value(x) -> float:
    """The plain number of a 0-d tensor or number, for a discrete choice taken at that value
    (never on the path from a parameter to the pixels)."""
    return float(plain(x)) if isinstance(x, torch.Tensor) else float(x)
