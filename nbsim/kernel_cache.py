"""Compiled kernels that every process can use: AOTInductor packages on disk.

``torch.compile`` costs a fresh process about 4 s even with a warm Inductor cache (Dynamo traces the
kernel again; 10–45 s cold). This cache keeps the compiled kernels of ``nbsim.engine``
(``_k_geometry`` and ``_k_sum``, and their stacked forms ``_k_geometry_stack`` and ``_k_sum_stack``)
as AOTInductor packages (``torch._inductor.aoti_compile_and_package`` of a ``torch.export`` program),
which a new process loads in milliseconds.

An entry's key is a hash of everything that decides the compiled code: the kernel's name, its static
configuration (detector and crystal constants baked into the code), the shapes, dtypes and devices of
its inputs, the torch version, the nbsim version and the source text of ``nbsim/engine.py`` and
``nbsim/physics.py`` (the stage functions the kernels call). Another
torch or nbsim, other shapes or an edited engine give another key, so a stale entry is never used
(``gc`` removes entries no current key names, nothing else does). Every entry carries a manifest
with its key fields and the package's SHA-256; an entry whose package is missing, truncated, edited
or fails to load is deleted and rebuilt, never used.

Where: ``$NBSIM_KERNEL_CACHE``, else ``~/.cache/nbsim/kernels``. Built on first use under
``device.compile=true``; ``device.compile=auto`` uses an entry that exists and otherwise decides as
before (``engine.compile_pays_off``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from nbsim.io.atomic import file_sha256

_LOADED: dict = {}                    # key -> loaded callable (per process)
_LOCK = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("NBSIM_KERNEL_CACHE") or Path.home() / ".cache" / "nbsim" / "kernels")


def _engine_source_hash() -> str:
    """Hash of the source of the compiled kernels: ``nbsim/engine.py`` and the stage functions
    they call (``nbsim/physics.py``)."""
    import nbsim.engine
    import nbsim.physics
    h = hashlib.sha256()
    for mod in (nbsim.engine, nbsim.physics):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ["tensor", list(x.shape), str(x.dtype), x.device.type]
    if isinstance(x, (list, tuple)):
        return [_describe(v) for v in x]
    return repr(x)


def key_fields(name: str, cfg, inputs: Sequence) -> dict:
    """What decides the compiled code of kernel ``name`` (see the module docstring); ``inputs``: the
    tensors that decide its input shapes (for a kernel that consumes another's outputs, that
    kernel's inputs)."""
    import nbsim
    return {"kernel": name, "cfg": repr(cfg), "inputs": _describe(list(inputs)),
            "torch": torch.__version__, "nbsim": nbsim.__version__, "engine_sha256": _engine_source_hash()}


def entry_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _entry(key: str) -> Path:
    return cache_dir() / key


def _valid(entry: Path, fields: dict) -> bool:
    """The entry's manifest names these key fields and its package has the recorded checksum."""
    try:
        man = json.loads((entry / "manifest.json").read_text())
        pkg = entry / "kernel.pt2"
        return man.get("fields") == fields and man.get("sha256") == file_sha256(pkg)
    except (OSError, ValueError):
        return False


def _remove(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True)


def disabled() -> bool:
    """``NBSIM_KERNEL_CACHE=off``: no cache (the test suite sets it; ``torch.compile`` as before)."""
    return os.environ.get("NBSIM_KERNEL_CACHE", "").lower() in ("off", "0", "no", "false")


def load(name: str, cfg, key_inputs: Sequence) -> Optional[Callable]:
    """The cached kernel, or None (no entry, cache disabled; a broken entry is deleted)."""
    if disabled():
        return None
    fields = key_fields(name, cfg, key_inputs)
    key = entry_key(fields)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
    entry = _entry(key)
    if not entry.exists():
        return None
    if not _valid(entry, fields):
        _remove(entry)
        return None
    try:
        fn = _Runner(entry / "kernel.pt2")
    except Exception:                              # a package that does not load is rebuilt
        _remove(entry)
        return None
    with _LOCK:
        _LOADED[key] = fn
    return fn


class _Runner:
    """A loaded package, called like the kernel (without its cfg). The same calls as
    ``torch._inductor.aoti_load_package``'s model, without importing Inductor's Python side
    (about 2 s in a fresh process; this loads in milliseconds)."""

    def __init__(self, path: Path):
        from torch.utils import _pytree as pytree
        self._pytree = pytree
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.out_spec = pytree.treespec_loads(self.loader.get_call_spec()[1])

    def __call__(self, *args):
        flat = [x for x in self._pytree.tree_flatten((args, {}))[0] if isinstance(x, torch.Tensor)]
        return self._pytree.tree_unflatten(self.loader.boxed_run(flat), self.out_spec)


class _Bound(torch.nn.Module):
    """``fn(*inputs, cfg)`` as a module of the inputs alone (cfg is baked into the program)."""

    def __init__(self, fn, cfg):
        super().__init__()
        self.fn, self.cfg = fn, cfg

    def forward(self, *inputs):
        return self.fn(*inputs, self.cfg)


def build(name: str, fn: Callable, cfg, key_inputs: Sequence, inputs: Sequence,
          options: Optional[dict] = None) -> Callable:
    """Compile ``fn(*inputs, cfg)`` ahead of time into the cache (atomically) and load it;
    ``options``: Inductor's configuration (as ``torch.compile``'s ``options``)."""
    fields = key_fields(name, cfg, key_inputs)
    key = entry_key(fields)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        program = torch.export.export(_Bound(fn, cfg), tuple(inputs))
        pkg = tmp / "kernel.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(pkg),
                                                 inductor_configs=dict(options or {}))
        (tmp / "manifest.json").write_text(json.dumps({"fields": fields, "sha256": file_sha256(pkg)},
                                                      indent=1))
        entry = _entry(key)
        try:
            os.rename(tmp, entry)                  # atomic; another process may have won the race
        except OSError:
            _remove(tmp)
    finally:
        if tmp.exists():
            _remove(tmp)
    loaded = load(name, cfg, key_inputs)
    if loaded is None:
        raise RuntimeError(f"kernel cache: the entry just built for {name} does not load")
    return loaded


def gc() -> int:
    """Remove every entry whose manifest names another torch, nbsim or engine source (or none):
    entries no current key can name. Returns how many were removed."""
    import nbsim
    root = cache_dir()
    if not root.exists():
        return 0
    current = {"torch": torch.__version__, "nbsim": nbsim.__version__,
               "engine_sha256": _engine_source_hash()}
    removed = 0
    for entry in root.iterdir():
        try:
            f = json.loads((entry / "manifest.json").read_text())["fields"]
            stale = any(f.get(k) != v for k, v in current.items())
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            _remove(entry)
            removed += 1
    return removed


def entries() -> list:
    """(key, kernel name, torch, nbsim, size in bytes) of every entry."""
    root = cache_dir()
    out = []
    for entry in sorted(root.iterdir()) if root.exists() else []:
        try:
            f = json.loads((entry / "manifest.json").read_text())["fields"]
            out.append((entry.name, f["kernel"], f["torch"], f["nbsim"],
                        (entry / "kernel.pt2").stat().st_size))
        except (OSError, ValueError, KeyError, TypeError):
            out.append((entry.name, "(broken)", "", "", 0))
    return out


def build_for_argv(argv) -> str:
    """Build the compiled kernels the experiment of nanoBragg arguments ``argv`` uses."""
    from nbsim.api import memory_budget_bytes, resolve_device
    from nbsim.engine import CompiledPlan, FastPlan, cached_kernels, compile_ok, fast_path_ok
    from nbsim.experiment import build_model
    from nbsim.frontend import parse_argv
    parsed = parse_argv(list(argv))
    tdev, tdtype, device = resolve_device(parsed.device)
    m = build_model(parsed.spec, dtype=torch.float64, device=tdev, base_dir=os.getcwd())
    if tdtype != torch.float64:
        m = m.astype(tdtype)
    if not (fast_path_ok(m) and compile_ok(m)):
        return "this experiment runs an eager kernel (no compiled kernel to build)"
    plan = CompiledPlan(m, FastPlan(m), memory_budget_bytes(device, tdev))
    if not plan.fits:
        return "one compiled chunk exceeds the memory budget: this experiment runs the eager kernel"
    cached_kernels(m, plan, build=True)
    return f"compiled kernels for chunks of {plan.chunk} pixels are in {cache_dir()}"


def main(argv=None) -> int:
    """``python -m nbsim.kernel_cache build <nanoBragg arguments> | list | gc``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m nbsim.kernel_cache build <nanoBragg arguments> | list | gc"
    if not argv or argv[0] not in ("build", "list", "gc"):
        print(usage, file=sys.stderr)
        return 2
    if disabled():
        print("nbsim.kernel_cache: error: NBSIM_KERNEL_CACHE is off", file=sys.stderr)
        return 2
    if argv[0] == "list":
        for key, kernel, tv, nv, size in entries():
            print(f"{key}  {kernel:10s} torch {tv}  nbsim {nv}  {size / 2 ** 20:.1f} MB")
        return 0
    if argv[0] == "gc":
        print(f"removed {gc()} stale entries from {cache_dir()}")
        return 0
    from nbsim.frontend import FrontendError
    from nbsim.spec import SpecError
    try:
        print(build_for_argv(argv[1:]))
    except (FrontendError, SpecError) as e:
        print(f"nbsim.kernel_cache: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
