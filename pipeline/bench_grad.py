"""Benchmark of derivatives: forward + backward against the forward, and the memory of a large backward.

usage: python -m pipeline.bench_grad [--repeat N] [--json OUT] [--large N] [--no-large]

Per variant (eager, and ``device.compile=true``), in one process, best of ``--repeat`` steady runs
(after one warm-up run that also pays any compilation):

* ``forward_s``: ``nbsim.simulate`` of the 256², N=5 cubic image without derivatives (the default
  strategy: the fast kernel, or the compiled kernel with ``compile``);
* ``fwd_bwd_s``: ``simulate(params={"detector.distance_mm": d, "crystal.cell_A_deg": cell})`` and
  ``backward()`` of a weighted sum; ``ratio`` = fwd_bwd_s / forward_s (issue 9's target: ≤ 3).

Then, in a fresh process each, the ``--large``² image (default 1024) with the same derivative under
``device.memory_budget_mb`` of 64 and 512: wall time and peak resident memory, and whether the
backward ran chunk by chunk. One JSON record (kind "gradients") is appended to
``benchmarks/history.jsonl`` (or ``--json``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.bench import BENCH_DIR, git_commit, loadavg, machine_info

SPEC_ARGS = dict(cell=[100.0, 100.0, 100.0, 90.0, 90.0, 90.0], N=5, default_F=100.0)


def _spec(pixels: int):
    from nbsim.spec import CrystalSpec, DetectorSpec, ExperimentSpec
    return ExperimentSpec(detector=DetectorSpec(fpixels=pixels, spixels=pixels),
                          crystal=CrystalSpec(cell_A_deg=list(SPEC_ARGS["cell"]), N=SPEC_ARGS["N"],
                                              default_F=SPEC_ARGS["default_F"]))


def _fwd_bwd(spec, device):
    import torch

    import nbsim
    d = torch.tensor(spec.detector.distance_mm, dtype=torch.float64, requires_grad=True)
    cell = torch.tensor(spec.crystal.cell_A_deg, dtype=torch.float64, requires_grad=True)
    r = nbsim.simulate(spec, device, params={"detector.distance_mm": d, "crystal.cell_A_deg": cell})
    (r.image * r.image.detach()).sum().backward()
    return r.stats.kernel, float(d.grad)


def steady(compile_: bool, repeat: int) -> dict:
    """Forward and forward+backward of the 256² image in this process (best of ``repeat``)."""
    import nbsim
    from nbsim.spec import DeviceSpec
    spec = _spec(256)
    device = DeviceSpec(dtype="float64", compile=compile_)
    out = {}
    for name, fn in (("forward", lambda: nbsim.simulate(spec, device).stats.kernel),
                     ("fwd_bwd", lambda: _fwd_bwd(spec, device)[0])):
        t0 = time.perf_counter()
        kernel = fn()                       # warm-up (and compilation)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = dict(first_s=first, best_s=min(times), times=times, kernel=kernel)
    out["ratio"] = out["fwd_bwd"]["best_s"] / out["forward"]["best_s"]
    return out


def large(pixels: int, budget_mb: float) -> dict:
    """Forward + backward of a ``pixels``² image under a memory budget, in a fresh process."""
    code = (
        "import resource, time, json, sys\n"
        "from pipeline.bench_grad import _spec, _fwd_bwd\n"
        "from nbsim.spec import DeviceSpec\n"
        f"spec = _spec({pixels})\n"
        f"dev = DeviceSpec(dtype='float64', compile=False, memory_budget_mb={budget_mb})\n"
        "t = time.perf_counter(); kernel, g = _fwd_bwd(spec, dev); wall = time.perf_counter() - t\n"
        "print(json.dumps(dict(wall_s=wall, kernel=kernel, grad=g,\n"
        "      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(BENCH_DIR.parent), timeout=3600)
    if p.returncode != 0:
        return dict(error=(p.stderr.strip().splitlines() or ["failed"])[-1])
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["budget_mb"] = budget_mb
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench_grad", description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--large", type=int, default=1024)
    ap.add_argument("--no-large", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    if a.repeat < 1 or a.large < 1:
        print("bench_grad: error: --repeat and --large must be >= 1", file=sys.stderr)
        return 2
    rec = dict(kind="gradients", time=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=machine_info(),
               git=git_commit(), load_before=loadavg(), image="256² cubic, N=5, f64",
               params=["detector.distance_mm", "crystal.cell_A_deg"])
    rec["eager"] = steady(False, a.repeat)
    print(f"eager:    forward {rec['eager']['forward']['best_s']:.3f} s "
          f"({rec['eager']['forward']['kernel']}), forward+backward {rec['eager']['fwd_bwd']['best_s']:.3f} s "
          f"({rec['eager']['fwd_bwd']['kernel']}): {rec['eager']['ratio']:.2f}×")
    if not a.no_compile:
        rec["compiled"] = steady(True, a.repeat)
        c = rec["compiled"]
        print(f"compiled: forward {c['forward']['best_s']:.3f} s ({c['forward']['kernel']}), "
              f"forward+backward {c['fwd_bwd']['best_s']:.3f} s ({c['fwd_bwd']['kernel']}): "
              f"{c['ratio']:.2f}× (first call {c['fwd_bwd']['first_s']:.1f} s)")
        # against the default forward (what a user without compile pays per image)
        c["ratio_vs_eager_forward"] = c["fwd_bwd"]["best_s"] / rec["eager"]["forward"]["best_s"]
    if not a.no_large:
        rec["large"] = [large(a.large, mb) for mb in (64, 512)]
        for r in rec["large"]:
            print(f"{a.large}² forward+backward, budget {r.get('budget_mb')} MB: "
                  + (r["error"] if "error" in r else
                     f"{r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"))
    rec["load_after"] = loadavg()
    history = Path(a.json) if a.json else BENCH_DIR / "history.jsonl"
    with open(history, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"appended to {history}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
