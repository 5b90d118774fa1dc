"""The ahead-of-time kernel cache (nbsim.kernel_cache): built once, loaded by later processes,
equal to the eager kernel, never used when stale or broken. Building costs ~20-40 s: slow."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ARGV = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1",
        "-distance", "100", "-detpixels", "96", "-pixel", "0.4"]


def _spec():
    from nbsim.frontend import parse_argv
    return parse_argv(ARGV).spec


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache folder holding the kernels of ARGV, built through ``device.compile=true``."""
    root = tmp_path_factory.mktemp("kernels")
    mp = pytest.MonkeyPatch()
    mp.setenv("NBSIM_KERNEL_CACHE", str(root))
    import nbsim
    from nbsim.spec import DeviceSpec
    r = nbsim.simulate(_spec(), DeviceSpec(compile=True))
    mp.undo()
    assert r.info["kernel"] == "compiled" and r.info["kernel_cache"]
    return root


@pytest.fixture
def cache(built, tmp_path, monkeypatch):
    """A private copy of the built cache, selected for this test."""
    root = tmp_path / "kernels"
    shutil.copytree(built, root)
    monkeypatch.setenv("NBSIM_KERNEL_CACHE", str(root))
    from nbsim import kernel_cache
    kernel_cache._LOADED.clear()
    return root


def _eager():
    import nbsim
    from nbsim.spec import DeviceSpec
    return nbsim.simulate(_spec(), DeviceSpec(compile=False))


def test_a_new_process_loads_the_kernels_and_equals_eager(cache, tmp_path):
    out = tmp_path / "img.pt"
    code = ("import sys, torch, nbsim\nfrom nbsim.frontend import parse_argv\nfrom nbsim.spec import DeviceSpec\n"
            f"r = nbsim.simulate(parse_argv({ARGV!r}).spec, DeviceSpec(compile='auto'))\n"
            "print(r.info['kernel'], r.info['kernel_cache'])\n"
            f"torch.save(r.image, {str(out)!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "NBSIM_KERNEL_CACHE": str(cache)}, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["compiled", "True"]            # auto took the cached kernels
    img, ref = torch.load(out), _eager().image
    assert ((img - ref).abs().max() / ref.abs().max()).item() <= 1e-12


def test_a_stale_entry_is_never_used(cache, monkeypatch):
    """Another nbsim (or torch, or engine source) names other keys: nothing is loaded, and gc
    removes the entries no current key can name."""
    import nbsim
    from nbsim import kernel_cache
    from nbsim.spec import DeviceSpec
    monkeypatch.setattr(nbsim, "__version__", "0.0.0-other")
    loads = []
    monkeypatch.setattr(kernel_cache, "_Runner", lambda p: loads.append(p))
    r = nbsim.simulate(_spec(), DeviceSpec(compile="auto"))
    assert not r.info["kernel_cache"] and not loads
    assert kernel_cache.gc() == 2 and not any(cache.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "manifest", "missing"])
def test_a_broken_entry_is_rebuilt_never_used(cache, damage):
    import nbsim
    from nbsim import kernel_cache
    from nbsim.spec import DeviceSpec
    entry = next(e for e in cache.iterdir() if json.loads((e / "manifest.json").read_text())
                 ["fields"]["kernel"] == "_k_sum")
    pkg = entry / "kernel.pt2"
    if damage == "truncate":
        pkg.write_bytes(pkg.read_bytes()[:1000])
    elif damage == "garbage":
        pkg.write_bytes(b"\0" * pkg.stat().st_size)
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{")
    else:
        pkg.unlink()
    r = nbsim.simulate(_spec(), DeviceSpec(compile="auto"))      # not used: the eager kernel runs
    assert not r.info["kernel_cache"] and not entry.exists()
    kernel_cache._LOADED.clear()
    r = nbsim.simulate(_spec(), DeviceSpec(compile=True))         # rebuilt
    assert r.info["kernel_cache"] and entry.exists()
    ref = _eager().image
    assert ((r.image - ref).abs().max() / ref.abs().max()).item() <= 1e-12


def test_command_line(cache, capsys):
    from nbsim import kernel_cache
    assert kernel_cache.main(["list"]) == 0
    assert capsys.readouterr().out.count("_k_") == 2
    assert kernel_cache.main(["build", *ARGV]) == 0               # present: nothing to build
    assert "compiled kernels" in capsys.readouterr().out
    assert kernel_cache.main(["nonsense"]) == 2
    assert capsys.readouterr().err.startswith("usage:")
    assert kernel_cache.main(["build", *ARGV, "-distance", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-distance" in err[0]


@pytest.mark.parametrize("module", ["engine", "physics"])
def test_key_follows_the_kernels_source(module, tmp_path, monkeypatch):
    """The compiled kernels are the stage functions of nbsim.engine and nbsim.physics: editing
    either file changes every key (no build needed to check)."""
    import importlib
    from nbsim import kernel_cache
    mod = importlib.import_module(f"nbsim.{module}")
    before = kernel_cache.key_fields("_k_sum", (), [])
    edited = tmp_path / f"{module}.py"
    edited.write_bytes(open(mod.__file__, "rb").read() + b"\n# edited\n")
    monkeypatch.setattr(mod, "__file__", str(edited))
    after = kernel_cache.key_fields("_k_sum", (), [])
    assert before["engine_sha256"] != after["engine_sha256"]
    assert kernel_cache.entry_key(before) != kernel_cache.entry_key(after)
