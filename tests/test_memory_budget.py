"""``device.memory_budget_mb`` bounds the working set of every path: measured as the peak RSS of a
fresh process during ``nbsim.simulate`` above its RSS before (Linux: ``/proc/self/clear_refs`` resets
the peak; glibc is told to return freed blocks at once, so RSS follows live memory).

The image (128x128 pixels, 2x2 sub-pixels, 20 mosaic domains: 80 samples per pixel) needs ~0.5 GB
as one broadcast, so every path must chunk. A control run with a forced large chunk shows that the
measurement sees a run that exceeds the budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, sys
    import torch
    import nbsim
    from nbsim.spec import BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec

    def status():
        d = {}
        for line in open("/proc/self/status"):
            k, v = line.split(":", 1)
            if k in ("VmRSS", "VmHWM"):
                d[k] = int(v.split()[0]) * 1024
        return d

    path, budget_mb, chunk = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) or None
    def spec(n):
        return ExperimentSpec(detector=DetectorSpec(fpixels=n, spixels=n, oversample=2),
                              crystal=CrystalSpec(cell_A_deg=[100, 100, 100, 90, 90, 90], N=5, default_F=100,
                                                  mosaic_deg=0.5, mosaic_domains=domains))
    domains = 20
    dev = DeviceSpec(memory_budget_mb=budget_mb, compile=(path == "compiled"))

    def run(n, chunk_pixels=None):
        params = None
        if path == "backward":
            d = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
            params = {"detector.distance_mm": d}
        r = nbsim.simulate(spec(n), dev, params=params, chunk_pixels=chunk_pixels)
        if path == "backward":
            r.image.sum().backward()
            assert d.grad is not None
        return r
    run(32, 64)       # imports, kernels, first use of chunking/checkpointing: not part of the run
    before = status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                         # reset the peak (VmHWM) to the current RSS
    r = run(128, chunk)
    peak = status()["VmHWM"]
    print(json.dumps({"kernel": r.stats.kernel, "delta_mb": (peak - before) / 2 ** 20}))
""")


def measure(path: str, budget_mb: float, chunk: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", PROBE, path, str(budget_mb), str(chunk)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
pytestmark = pytest.mark.slow            # each case is a fresh process (~10 s on a loaded machine)


@needs_proc
@pytest.mark.parametrize("path,budget_mb,kernel", [
    ("reference", 16, "reference"),      # below the fast kernel's per-thread workspace: reference
    ("fast", 64, "fast"),
    ("fast", 40, "fast"),                # one worker's workspace fits, two do not
    ("backward", 32, "reference"),
    ("backward", 64, "reference"),
])
def test_budget_bounds_peak_memory(path, budget_mb, kernel):
    m = measure(path, budget_mb)
    assert m["kernel"] == kernel
    assert m["delta_mb"] <= budget_mb, m


@needs_proc
def test_measurement_sees_an_over_budget_run():
    """Control: one chunk of every pixel (the caller's explicit chunk_pixels) exceeds the budget,
    and the measurement shows it."""
    m = measure("reference", 16, chunk=128 * 128)
    assert m["kernel"] == "reference" and m["delta_mb"] > 4 * 16, m


@needs_proc
def test_budget_bounds_compiled_path():
    """The compiled kernel (torch.compile; its compilation not counted: warmed up first) stays within
    the budget (4 mosaic domains: float64 compiles below 8 orientations)."""
    m = measure("compiled", 64)
    assert m["kernel"] == "compiled"
    assert m["delta_mb"] <= 64, m
