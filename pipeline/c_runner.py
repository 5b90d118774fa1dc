"""Run the nanoBragg C program (``$NB_C_BIN``) on an argument list, with a content-addressed cache.

Each run happens in a fresh temporary folder holding copies of the input files the arguments name
(``-hkl P1.hkl`` ...), single-threaded (``OMP_NUM_THREADS=1``). The runner owns the output flags: it
strips any ``-floatfile``/``-intfile``/``-noisefile``/``-pgmfile``/``-nopgm``/``-nonoise`` from the
arguments and adds its own (float + int image, no PGM; noise image only when asked).

Results are cached under ``<cache_root>/<key>/`` where ``key`` is the sha256 of the canonical argument
list, the contents of every input file it names (by base name), the sha256 of the binary, and the set
of requested outputs. A cache entry is complete exactly when its ``meta.json`` exists (the entry is
built in a temporary sibling folder and renamed into place).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.hashing import file_sha256
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

ENV_VAR = "NB_C_BIN"
CACHE_SCHEMA = 1
# output flags the runner controls: flag -> number of values it takes
OUTPUT_FLAGS = {"-floatfile": 1, "-floatimage": 1, "-intfile": 1, "-intimage": 1, "-noisefile": 1,
                "-noiseimage": 1, "-pgmfile": 1, "-pgmimage": 1, "-nopgm": 0, "-nonoise": 0}

HOW_TO_PROVIDE = f"""\
the nanoBragg C program is needed for parity runs, but ${ENV_VAR} is not set (or does not name an
executable file). Provide it, e.g.:

    git clone https://github.com/bl831/nanoBragg && cd nanoBragg
    gcc -O2 -fopenmp -o nanoBragg nanoBragg.c -lm
    export {ENV_VAR}=$PWD/nanoBragg

(any build of bl831/nanoBragg, file header 8-10-25, reproduces the stored golden data) and rerun.
Without it, '--golden tests/golden' compares against the stored golden outputs instead."""


class CRunError(RuntimeError):
    """The C program failed or did not write its float image."""


@dataclass
class CResult:
    key: str
    folder: Path                     # cache entry
    cached: bool                     # True: taken from the cache, nothing was run
    argv: List[str]                  # canonical argv (without output flags), as run
    wall_s: float                    # wall time of the C run (of the original run when cached)
    files: Dict[str, str] = field(default_factory=dict)   # input base name -> sha256

    @property
    def float_path(self) -> Path:
        return self.folder / "float.bin"

    @property
    def int_path(self) -> Path:
        return self.folder / "int.img"

    @property
    def noise_path(self) -> Path:
        return self.folder / "noise.img"

    @property
    def stdout_path(self) -> Path:
        return self.folder / "stdout.txt"


def find_binary(explicit: Optional[str] = None) -> Optional[str]:
    """``explicit`` or ``$NB_C_BIN`` if it names an executable file, else None."""
    cand = explicit or os.environ.get(ENV_VAR)
    if not cand:
        return None
    p = Path(cand).expanduser()
    if not p.is_file():
        found = shutil.which(cand)
        if not found:
            return None
        p = Path(found)
    return str(p.resolve()) if os.access(p, os.X_OK) else None


def split_argv(argv: Union[str, Sequence]) -> List[str]:
    """An argument list from a string (shell words) or a list (items made strings, stripped)."""
    if isinstance(argv, str):
        return shlex.split(argv)
    return [str(a).strip() for a in argv]


def strip_output_flags(argv: Sequence[str]) -> List[str]:
    out, i = [], 0
    while i < len(argv):
        n = OUTPUT_FLAGS.get(argv[i])
        if n is None:
            out.append(argv[i])
            i += 1
        else:
            i += 1 + n
    return out


def _looks_numeric(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def resolve_inputs(argv: Sequence[str], search_dirs: Iterable[Union[str, Path]] = ()) -> Tuple[List[str], Dict[str, Path]]:
    """Find the input files an argument list names.

    A word that is not a flag or a number and names an existing file (absolute, or relative to one of
    ``search_dirs``, then the current directory) is an input: it is replaced by its base name (the run
    folder holds a copy under that name). Returns ``(argv, {base name: source path})``."""
    dirs = [Path(d) for d in search_dirs] + [Path.cwd()]
    out, files = [], {}
    for i, tok in enumerate(argv):
        if tok.startswith("-") or _looks_numeric(tok):
            out.append(tok)
            continue
        p = Path(tok).expanduser()
        cands = [p] if p.is_absolute() else [d / p for d in dirs]
        src = next((c for c in cands if c.is_file()), None)
        if src is None:
            out.append(tok)
            continue
        name = src.name
        if name in files and files[name].resolve() != src.resolve():
            raise CRunError(f"two different input files share the name {name!r}: {files[name]} and {src}")
        files[name] = src
        out.append(name)
    return out, files


def output_flags(noise: bool) -> List[str]:
    flags = ["-floatfile", "float.bin", "-intfile", "int.img", "-nopgm"]
    return flags + (["-noisefile", "noise.img"] if noise else ["-nonoise"])


def cache_key(argv: Sequence[str], file_digests: Dict[str, str], binary_sha: str, noise: bool) -> str:
    doc = {"schema": CACHE_SCHEMA, "argv": list(argv), "inputs": dict(sorted(file_digests.items())),
           "binary_sha256": binary_sha, "outputs": output_flags(noise)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


_BIN_SHA: Dict[Tuple[str, float, int], str] = {}


def _binary_sha(binary: str) -> str:
    st = os.stat(binary)
    k = (binary, st.st_mtime, st.st_size)
    if k not in _BIN_SHA:
        _BIN_SHA[k] = file_sha256(binary)
    return _BIN_SHA[k]


def _tail(text: str, n: int = 8) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def run_c(argv: Union[str, Sequence], *, binary: Optional[str] = None,
          inputs: Iterable[Union[str, Path]] = (), cache_root: Union[str, Path] = "outputs/c_cache",
          noise: bool = False, force: bool = False, timeout: float = 1800,
          log=None) -> CResult:
    """Run (or reuse) the C program on ``argv``; return where its outputs are.

    ``inputs``: folders the input files named in ``argv`` are looked up in. ``force``: run even when
    cached (the entry is replaced). Raises ``CRunError`` when there is no binary or the run fails."""
    binary = find_binary(binary)
    if binary is None:
        raise CRunError(HOW_TO_PROVIDE)
    canon, files = resolve_inputs(strip_output_flags(split_argv(argv)), inputs)
    digests = {name: file_sha256(src) for name, src in files.items()}
    key = cache_key(canon, digests, _binary_sha(binary), noise)
    root = Path(cache_root)
    final = root / key
    if (final / "meta.json").is_file() and (final / "float.bin").is_file() and not force:
        meta = json.loads((final / "meta.json").read_text())
        if log:
            log(f"C output cached: {final}")
        return CResult(key=key, folder=final, cached=True, argv=canon, wall_s=meta.get("wall_s", float("nan")),
                       files=digests)

    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="nanoBragg-run-"))
    try:
        for name, src in files.items():
            shutil.copyfile(src, run_dir / name)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [binary] + canon + output_flags(noise)
        if log:
            log(f"running C: {shlex.join(cmd)}  (in {run_dir})")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CRunError(f"nanoBragg timed out after {timeout:.0f} s: {shlex.join(cmd)}") from e
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise CRunError(f"nanoBragg exited with status {p.returncode}: {shlex.join(cmd)}\n"
                            f"{_tail(p.stderr) or _tail(p.stdout)}")
        if not (run_dir / "float.bin").is_file():
            raise CRunError(f"nanoBragg wrote no float image: {shlex.join(cmd)}\n{_tail(p.stdout)}")
        tmp = root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for name in ("float.bin", "int.img", "noise.img"):
                if (run_dir / name).is_file():
                    shutil.move(str(run_dir / name), tmp / name)
            (tmp / "stdout.txt").write_text(p.stdout)
            (tmp / "stderr.txt").write_text(p.stderr)
            meta = {"key": key, "argv": canon, "command": cmd[:1] + canon + output_flags(noise),
                    "binary": binary, "binary_sha256": _binary_sha(binary), "inputs_sha256": digests,
                    "env": {"OMP_NUM_THREADS": "1"}, "wall_s": round(wall, 6),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            if final.exists():
                old = root / f".{key}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:                       # another process published it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                if not (final / "meta.json").is_file():
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CResult(key=key, folder=final, cached=False, argv=canon, wall_s=wall, files=digests)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
