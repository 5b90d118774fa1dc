"""``python -m nbsim --help``: every key with its type, current value, unit and meaning.

The meaning of a key is the comment on its line in the schema dataclasses (``nbsim/spec.py``,
``pipeline/compose.py``: the single source, read once with ``tokenize``); its unit is spelled by the
suffix of its name (``UNIT_SUFFIXES``). ``conf/config.yaml`` puts the table into Hydra's help
template through the OmegaConf resolver ``${nbsim_keys_help:}`` (registered by
``pipeline.compose.register``), which reads the current values (defaults and overrides) from the
composed config.
"""
from __future__ import annotations

import functools
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from typing import Dict, List, Optional, Tuple

#: key-name suffix -> unit, longest first (the units are in the names, see nbsim/spec.py)
UNIT_SUFFIXES: Tuple[Tuple[str, str], ...] = (
    ("_ph_per_m2", "photons/m^2"), ("_ph_per_s", "photons/s"), ("_A_deg", "Å, deg"),
    ("_mrad", "mrad"), ("_pct", "%"), ("_deg", "deg"), ("_mm", "mm"), ("_um", "µm"), ("_px", "pixels"),
    ("_mb", "MB"), ("_eV", "eV"), ("_A", "Å"), ("_s", "s"),
)


def unit_of(name: str) -> str:
    """The unit spelled by the suffix of a key name, '' for none (counts, flags, names)."""
    for suffix, unit in UNIT_SUFFIXES:
        if name.endswith(suffix):
            return unit
    return ""


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> Dict[str, str]:
    """``{field name: comment}`` of a dataclass: the ``#`` comment on the line of each field
    (the text after ``#``, stripped), read from the class source with ``tokenize``."""
    src = textwrap.dedent(inspect.getsource(cls))
    names = {f.name for f in fields(cls)}
    out: Dict[str, str] = {}
    line_field: Dict[int, str] = {}
    depth = 0
    prev = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif (tok.type == tokenize.OP and tok.string == ":" and depth == 0 and prev is not None
              and prev.type == tokenize.NAME and prev.string in names and prev.start[1] == 4):
            line_field[prev.start[0]] = prev.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
            prev = tok
    return out


def _type_name(f) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace("typing.", "")


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:                      # type: ignore[misc]
        return f.default_factory()                            # type: ignore[misc]
    return None


def key_rows(cls=None, prefix: str = "") -> List[Tuple[str, str, object, str, str]]:
    """``(key, type, schema default, unit, meaning)`` for every leaf key of the app schema."""
    if cls is None:
        from pipeline.compose import NbsimConfig
        cls = NbsimConfig
    rows = []
    comments = field_comments(cls)
    for f in fields(cls):
        default = _default(f)
        if is_dataclass(default):
            rows.extend(key_rows(type(default), f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, _type_name(f), default, unit_of(f.name), comments.get(f.name, "")))
    return rows


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _current(root, key: str, fallback):
    if root is None:
        return fallback
    from omegaconf import OmegaConf
    try:
        return OmegaConf.select(root, key, throw_on_missing=False, default=fallback)
    except Exception:                                        # noqa: BLE001 - help never fails
        return fallback


def keys_help(root=None, width: int = 110) -> str:
    """The help table: per section, ``key = value  [unit]  meaning`` (values from the composed
    config ``root`` when given, else the schema defaults; a null value shows the key's type)."""
    lines: List[str] = []
    section: Optional[str] = None
    rows = sorted(key_rows(), key=lambda r: "." not in r[0])     # sections first, then top level
    keyw = max(len(k) for k, *_ in rows)
    for key, type_, default, unit, meaning in rows:
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append("")
            lines.append(f"{sec}:" if sec else "top level:")
        current = _current(root, key, default)
        value = _show(current) + (f" ({type_.replace('Optional[', '')[:-1]})" if current is None else "")
        text = (f"[{unit}] " if unit else "") + re.sub(r"\bNone\b", "null", meaning)
        head = f"  {key:<{keyw}} = {value:<14}"
        indent = " " * (keyw + 5 + 14 + 1)
        body = textwrap.wrap(text, width=max(30, width - len(indent))) or [""]
        if len(head) > len(indent) - 1:                       # a long value: the text on the next lines
            lines.append(head.rstrip())
            lines.extend(indent + b for b in body)
        else:
            lines.append(f"{head} {body[0]}".rstrip())
            lines.extend(indent + b for b in body[1:])
    return "\n".join(lines).lstrip("\n").replace("$", "$$")   # Hydra's help is a string.Template


def _resolver(*_args, _root_=None) -> str:
    return keys_help(_root_)
