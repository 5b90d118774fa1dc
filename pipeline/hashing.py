"""Configuration hash: names the folder ``outputs/<hash>/`` of a stored result.

The hash covers everything that changes the pixels: the whole ExperimentSpec (detector, beam, crystal,
image, and the effective set of fixed quirks: ``quirks`` + ``fix`` hash as "faithful", "physical" or
the sorted list of fixed names, so ``fix=[every name]`` hashes like ``quirks=physical``),
``device.dtype``, and the *contents* of the input files the spec names (not their paths: moving an HKL
file keeps the hash, editing it changes it). It does not cover where results are stored, the compute
device (cpu/cuda), the memory budget or the compile flag.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from nbsim import quirks
from nbsim.io.atomic import file_sha256  # noqa: F401 (re-exported)
from nbsim.spec import DeviceSpec, ExperimentSpec, SpecError

HASH_SCHEMA = 1          # bump when the meaning of a stored result changes for the same spec
HASH_CHARS = 16
# spec keys that name input files: hashed by content
INPUT_FILES = ("crystal.hkl_file", "crystal.model_file", "crystal.matrix_file", "crystal.fdump_file",
               "beam.source_file", "detector.mask_file", "detector.geometry_file")
DEFAULT_FDUMP = "Fdump.bin"   # nanoBragg reads ./Fdump.bin when no HKL table is given (quirk fdump_from_cwd)


def resolve_input(path: str, base_dir: Union[str, Path] = ".") -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def input_digests(spec: ExperimentSpec, base_dir: Union[str, Path] = ".") -> Dict[str, str]:
    """``{'crystal.hkl_file': sha256, ...}`` for every input file the spec reads.

    ``crystal.hkl_file`` is a text table or an MTZ file, ``crystal.model_file`` a PDB/mmCIF model: both
    hash by content, as every input does.
    ``crystal.fdump_file`` is an input only when no HKL table or model is given (otherwise nanoBragg writes it);
    with neither given, a ``Fdump.bin`` in ``base_dir`` counts, because nanoBragg silently reads it.
    Raises ``SpecError`` naming the key when a file is missing.
    """
    out = {}
    for key in INPUT_FILES:
        section, name = key.split(".")
        path = getattr(getattr(spec, section), name)
        if key == "crystal.fdump_file" and (spec.crystal.hkl_file is not None
                                            or spec.crystal.model_file is not None):
            continue
        if path is None:
            continue
        p = resolve_input(path, base_dir)
        if not p.is_file():
            raise SpecError(key, f"file not found: {p}")
        out[key] = file_sha256(p)
    c = spec.crystal
    if c.hkl_file is None and c.model_file is None and c.fdump_file is None:
        p = Path(base_dir) / DEFAULT_FDUMP
        if p.is_file():
            out["crystal.fdump_file"] = file_sha256(p)
    return out


def _canonical(obj, type_str: str = ""):
    """Plain JSON-able value; ints in float-typed fields become floats (100 == 100.0)."""
    if is_dataclass(obj):
        return {f.name: _canonical(getattr(obj, f.name), str(f.type)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(x, type_str) for x in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int) and "float" in type_str:
        return float(obj)
    if isinstance(obj, (int, float)):
        return obj
    return str(obj)


def hash_payload(spec: ExperimentSpec, device: Optional[DeviceSpec] = None,
                 base_dir: Union[str, Path] = ".") -> dict:
    """The exact document that is hashed (also stored in run.json for inspection)."""
    device = device or DeviceSpec()
    spec_doc = _canonical(spec)
    spec_doc.pop("fix", None)
    spec_doc["quirks"] = quirks.of(spec).label()
    digests = input_digests(spec, base_dir)
    for key in INPUT_FILES:                       # paths out, contents in
        section, name = key.split(".")
        spec_doc[section][name] = {"sha256": digests[key]} if key in digests else None
    return {"schema": HASH_SCHEMA, "spec": spec_doc, "dtype": device.dtype}


def config_hash(spec: ExperimentSpec, device: Optional[DeviceSpec] = None,
                base_dir: Union[str, Path] = ".") -> str:
    """16 hex characters of sha256 over the canonical JSON of ``hash_payload``."""
    text = json.dumps(hash_payload(spec, device, base_dir), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]
