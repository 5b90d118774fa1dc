"""Performance benchmark: nbsim against the nanoBragg C program on the same machine.

usage: python -m pipeline.bench [--cases 1,2,3,4|none] [--quick] [--json OUT] [--repeat N]
                                [--scaling] [--plot PNG] [--no-c] [--no-whole]
                                [--sweeps light,heavy] [--sweep-cores N]

Runs the suite of issue 5 against the C binary named by ``NB_C_BIN`` (run with OMP_NUM_THREADS=2,
as upstream builds it with OpenMP) and against nbsim, and reports per case

* C whole-process wall time and peak resident memory (each run in a fresh temporary directory
  holding only the inputs it needs, so a stray ``Fdump.bin`` cannot change the experiment);
* nbsim whole-process wall time and peak memory of ``python -m nbsim.nanobragg`` with the same
  arguments and output files (Python start, imports, setup, writing the files), and the same minus
  the wall time of ``python -c "import torch"`` (measured the same way, best of the same number of
  runs): the fixed costs that are nbsim's own, apart from Python's and torch's start-up;
* the same whole process with a warm kernel cache (``nbsim.kernel_cache build`` into a fresh folder
  first, its time recorded; cases 1-3), where ``device.compile=auto`` loads the compiled kernel;
* nbsim in-process steady state: ``nbsim.api.simulate`` called again in a process that already
  ran it once (what a sweep or refinement loop pays per image), float64 eager, float64 compiled
  (``device.compile``), float32 eager and float32 compiled;
* pixels·steps per second and the ratios C / nbsim; parity of nbsim's float64 image with C's
  float image (largest difference, differing pixels, Pearson r) and of float32 (Pearson r).

Times are the best of ``--repeat`` runs (default 3; ``--quick`` = 1 run, float64 only (eager and
compiled), case 4 only when asked for). Each run appends one JSON record (machine, torch version,
git commit, load average, all numbers) to ``benchmarks/history.jsonl`` (or ``--json``) and prints
the ratios against the previous record. ``--sweeps light,heavy`` adds the sweep cases of
``pipeline.bench_sweep`` (a grid through Snakemake, the multirun and a loop over the C program; record
key ``sweeps``). ``--scaling`` also times a pixel-count series and a
steps series and draws ``benchmarks/scaling.png`` (or ``--plot``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
INPUTS = BENCH_DIR / "inputs"

SUITE = {
    1: dict(name="cubic 1024², N=5, auto oversampling",
            argv="-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 "
                 "-detpixels 1024", kernel_cache=True),
    2: dict(name="triclinic+misset, 10 domains, 3 φ, os 2, 3 λ × 5 div, 256², 0.4 mm",
            argv="-cell 70 80 90 75 85 95 -misset 10 20 30 -default_F 100 -N 5 -lambda 1 "
                 "-distance 100 -detpixels 256 -pixel 0.4 -mosaic 0.5 -mosaic_dom 10 "
                 "-mosaic_seed 7 -phi 0 -osc 0.3 -phisteps 3 -oversample 2 -dispersion 1 "
                 "-dispsteps 3 -divergence 1 -divsteps 3", kernel_cache=True),
    3: dict(name="2048² with HKL table (A.mat, P1.hkl), N=6",
            argv="-mat A.mat -hkl P1.hkl -lambda 1 -N 6 -distance 100 -detpixels 2048 -pixel 0.1",
            inputs=["A.mat", "P1.hkl"], kernel_cache=True),
    4: dict(name="4096² with 100 mosaic domains",
            argv="-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 "
                 "-detpixels 4096 -pixel 0.05 -mosaic 0.5 -mosaic_dom 100 -mosaic_seed 7",
            max_repeat=1),
}
OUT_FLAGS = ["-floatfile", "float.bin", "-nopgm", "-nonoise"]
TARGETS = ("steady ≥ 4× C (cases 1-3); case 2 whole ≥ 2× C, ≥ 2.5× with a warm kernel cache; "
           "float32 ≥ 1.5× float64; case 4 RSS < 4 GB")


# ---------------------------------------------------------------------------------------------
# machine and run bookkeeping
# ---------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import torch
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(), mem_gb=mem_gb,
                python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--",
                                                                  "nbsim", "pipeline")))


def loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def others_busy(seconds=1.0):
    """Share of the CPU (0..1) other processes used while this one slept for ``seconds`` (the load
    average would count the benchmark's own runs)."""
    try:
        import psutil
        return round(psutil.cpu_percent(interval=seconds) / 100.0, 2)
    except ImportError:
        return None


def case_dir(case: dict) -> Path:
    """A fresh temporary directory holding only the case's inputs."""
    d = Path(tempfile.mkdtemp(prefix="nbsim-bench-"))
    for name in case.get("inputs", []):
        src = INPUTS / name
        if not src.exists():
            src = ROOT / "nbsim" / "data" / name
        shutil.copy(src, d / name)
    return d


def timed_run(cmd, cwd, env=None, timeout=3600) -> dict:
    """Wall time (s) and peak resident memory (MB) of one whole process."""
    env = dict(os.environ if env is None else env)
    tfile = Path(cwd) / ".time"
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    full = [gnu_time, "-f", "%M", "-o", str(tfile)] + list(cmd) if gnu_time else list(cmd)
    peak = [0]
    t0 = time.perf_counter()
    p = subprocess.Popen(full, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    if not gnu_time:                                   # poll the child's RSS instead
        try:
            import psutil
            proc = psutil.Process(p.pid)
            while p.poll() is None:
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss // 1024)
                except psutil.Error:
                    break
                time.sleep(0.02)
        except ImportError:
            pass
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    wall = time.perf_counter() - t0
    rss_kb = peak[0]
    if gnu_time and tfile.exists():
        try:
            rss_kb = int(tfile.read_text().split()[-1])
        except (ValueError, IndexError):
            pass
    return dict(wall_s=wall, rss_mb=rss_kb / 1024.0, rc=p.returncode,
                err=(err or "").strip().splitlines()[-3:])


def best_of(runs):
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return dict(runs[-1], wall_s=None)
    return dict(wall_s=min(r["wall_s"] for r in ok), rss_mb=max(r["rss_mb"] for r in ok), rc=0,
                walls=[round(r["wall_s"], 3) for r in ok])


# ---------------------------------------------------------------------------------------------
# the three kinds of measurement
# ---------------------------------------------------------------------------------------------

def run_c(cbin, case, repeat) -> dict:
    argv = case["argv"].split()
    runs, img = [], None
    for _ in range(repeat):
        d = case_dir(case)
        env = dict(os.environ, OMP_NUM_THREADS="2")
        r = timed_run([cbin] + argv + OUT_FLAGS, d, env)
        if r["rc"] == 0 and (d / "float.bin").exists():
            img = np.fromfile(d / "float.bin", dtype="<f4")
        runs.append(r)
        shutil.rmtree(d, ignore_errors=True)
    out = best_of(runs)
    return out, img


def run_nbsim_whole(case, repeat, extra=(), kernel_cache="off") -> dict:
    """``python -m nbsim.nanobragg`` as a whole process, best of ``repeat``; ``kernel_cache``: its
    ``NBSIM_KERNEL_CACHE`` ("off": no compiled kernel from disk, ``device.compile=auto`` then
    decides as if none had ever been built)."""
    argv = case["argv"].split()
    runs = []
    env = dict(os.environ, NBSIM_KERNEL_CACHE=str(kernel_cache))
    for _ in range(repeat):
        d = case_dir(case)
        r = timed_run([sys.executable, "-m", "nbsim.nanobragg"] + argv + OUT_FLAGS + list(extra), d,
                      env)
        runs.append(r)
        shutil.rmtree(d, ignore_errors=True)
    return best_of(runs)


def run_nbsim_whole_cached(case, repeat) -> dict:
    """The whole process with a warm kernel cache: ``python -m nbsim.kernel_cache build`` into a
    fresh folder (``bench_sweep.warm_kernel_cache``; its wall time and message recorded as
    ``build_s``/``build``), then ``run_nbsim_whole`` with that cache, which ``device.compile=auto``
    uses."""
    from pipeline.bench_sweep import warm_kernel_cache
    cache = Path(tempfile.mkdtemp(prefix="nbsim-bench-kernels-"))
    try:
        d = case_dir(case)
        try:
            w = warm_kernel_cache([case["argv"].split()], cache, cwd=d)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if w["rc"] != 0 or not w["entries"]:
            return dict(wall_s=None, rc=w["rc"], build=w["message"])
        out = run_nbsim_whole(case, repeat, kernel_cache=cache)
        return dict(out, build_s=w["build_s"], build=w["message"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run_torch_import(repeat) -> dict:
    """Whole-process wall time and peak memory of ``python -c "import torch"``, timed like the nbsim
    runs (fresh temporary directory, same interpreter and environment), best of ``repeat``."""
    runs = []
    for _ in range(repeat):
        d = Path(tempfile.mkdtemp(prefix="nbsim-bench-"))
        runs.append(timed_run([sys.executable, "-c", "import torch"], d))
        shutil.rmtree(d, ignore_errors=True)
    return best_of(runs)


def run_steady(case, dtype, compile_, repeat) -> dict:
    """First and best later in-process call of ``nbsim.api.simulate`` with
    ``DeviceSpec(dtype=dtype, compile=compile_)``: what a sweep or refinement loop pays per image.
    ``compiled``: whether the compiled kernels rendered it (the result's ``stats.kernel``)."""
    import torch
    from nbsim.api import simulate
    from nbsim.frontend.argv import parse_argv
    from nbsim.spec import DeviceSpec
    d = case_dir(case)
    try:
        spec = parse_argv(case["argv"].split(), cwd=str(d)).spec
        dev = DeviceSpec(dtype=dtype, compile=compile_)

        def call():
            return simulate(spec, dev, base_dir=str(d))
        t0 = time.perf_counter()
        res = call()
        first = time.perf_counter() - t0
        times = []
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            res = call()
            times.append(time.perf_counter() - t0)
        out = dict(first_s=first, steady_s=min(times), times=[round(t, 4) for t in times],
                   via="api", compiled=res.stats.kernel == "compiled", steps=res.setup.steps)
        out["image"] = res.image.detach().to("cpu", torch.float64).numpy().reshape(-1)
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def parity(img: np.ndarray, ref32: np.ndarray) -> dict:
    if img is None or ref32 is None or img.size != ref32.size:
        return {}
    got32 = img.astype(np.float32)
    ref = ref32.astype(np.float64)
    r = float(np.corrcoef(got32.astype(np.float64), ref)[0, 1]) if ref.std() > 0 else 1.0
    return dict(max_abs=float(np.abs(got32.astype(np.float64) - ref).max()),
                ndiff=int((got32 != ref32).sum()), pearson_r=r)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def ratio(a, b):
    return a / b if (a and b) else None


def _best(c, keys):
    vals = [c[k]["steady_s"] for k in keys if c.get(k, {}).get("steady_s")]
    return min(vals) if vals else None


def print_table(rec):
    """One row per case; "+c" columns are the compiled path (blank where it does not apply, the
    eager kernel then runs); C/best and f64/f32 use the faster of eager and compiled."""
    rows = []
    head = ["case", "Msamples", "C s", "nb whole s", "C/whole", "whole-torch s", "cached s", "C/cached",
            "f64 s", "f64+c s", "C/best",
            "f32 s", "f32+c s", "f64/f32", "Msamples/s", "C MB", "nb MB", "parity f64 vs C"]
    for cid, c in rec["cases"].items():
        cw = c.get("c", {}).get("wall_s")

        def st(k):
            v = c.get(k, {})
            if not v or (k.endswith("compiled") and not v.get("compiled")):
                return None
            return v.get("steady_s")
        best64 = min([x for x in (st("steady_f64"), st("steady_f64_compiled")) if x] or [0]) or None
        best32 = min([x for x in (st("steady_f32"), st("steady_f32_compiled")) if x] or [0]) or None
        par = c.get("parity_f64", {})
        rows.append([
            str(cid), fmt(c["samples"] / 1e6, 1), fmt(cw), fmt(c.get("nbsim_whole", {}).get("wall_s")),
            fmt(c.get("ratio_whole"), 2), fmt(c.get("nbsim_whole", {}).get("minus_torch_import_s")),
            fmt(c.get("nbsim_whole_cached", {}).get("wall_s")), fmt(c.get("ratio_whole_cached"), 2),
            fmt(st("steady_f64")), fmt(st("steady_f64_compiled")),
            fmt(ratio(cw, best64), 2), fmt(st("steady_f32")), fmt(st("steady_f32_compiled")),
            fmt(ratio(best64, best32), 2),
            fmt(c["samples"] / best64 / 1e6 if best64 else None, 0),
            fmt(c.get("c", {}).get("rss_mb"), 0), fmt(c.get("nbsim_whole", {}).get("rss_mb"), 0),
            (f"max|Δ|={par['max_abs']:.3g} ndiff={par['ndiff']} r={par['pearson_r']:.7f}"
             if par else "-")])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    if any(c.get("c", {}).get("samples_per_s") for c in rec["cases"].values()):
        print("C Msamples/s: " + ", ".join(
            f"case {cid} {c['c']['samples_per_s'] / 1e6:.0f}" for cid, c in rec["cases"].items()
            if c.get("c", {}).get("samples_per_s")))


def compare_previous(rec, history: Path):
    prev = None
    if history.exists():
        for line in history.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("cases"):        # (other kinds of record: pipeline.bench_grad's, sweeps only)
                    prev = r
    if prev is None:
        print("(no previous record to compare with)")
        return
    print(f"vs previous record ({prev.get('timestamp')}, commit {str(prev.get('git', {}).get('commit'))[:10]}, "
          f"{prev.get('machine', {}).get('cpu')}): new/old time (< 1 is faster)")
    keys = [("c", "wall_s"), ("nbsim_whole", "wall_s"), ("nbsim_whole_cached", "wall_s"),
            ("steady_f64", "steady_s"),
            ("steady_f64_compiled", "steady_s"), ("steady_f32", "steady_s"),
            ("steady_f32_compiled", "steady_s")]
    for cid, c in rec["cases"].items():
        p = prev.get("cases", {}).get(str(cid)) or prev.get("cases", {}).get(cid)
        if not p:
            continue
        parts = []
        for k, f in keys:
            a, b = c.get(k, {}).get(f), p.get(k, {}).get(f)
            if a and b:
                parts.append(f"{k} {a / b:.2f}")
        print(f"  case {cid}: " + ", ".join(parts))


# ---------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------

def scaling(cbin, repeat) -> dict:
    base = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100"
    pix = [128, 256, 512, 1024]
    doms = [1, 4, 16, 64]
    series = dict(pixels=dict(x=[], C=[], nbsim=[], nbsim_compiled=[]),
                  steps=dict(x=[], C=[], nbsim=[], nbsim_compiled=[]))
    for n in pix:
        case = dict(argv=f"{base} -detpixels {n} -pixel {0.1 * 1024 / n:g} -oversample 2")
        _add_point(series["pixels"], case, n * n, cbin, repeat)
    for md in doms:
        case = dict(argv=f"{base} -detpixels 256 -pixel 0.4 -oversample 2 -mosaic 0.5 "
                         f"-mosaic_dom {md} -mosaic_seed 7")
        _add_point(series["steps"], case, 4 * md, cbin, repeat)
    return series


def _add_point(s, case, x, cbin, repeat):
    s["x"].append(x)
    c = run_c(cbin, case, repeat)[0]["wall_s"] if cbin else None
    e = run_steady(case, "float64", False, repeat)
    k = run_steady(case, "float64", True, repeat)
    kc = k["steady_s"] if k["compiled"] else None        # None: float64 stays eager there
    s["C"].append(c)
    s["nbsim"].append(e["steady_s"])
    s["nbsim_compiled"].append(kc)
    print(f"  scaling x={x}: C {fmt(c)} s, nbsim {fmt(e['steady_s'])} s, "
          f"compiled {fmt(kc) + ' s' if kc else '(not applied)'}", flush=True)


PIX_LABEL = "pixels (cubic cell, N=5, oversample 2; detector 128x128 ... 1024x1024)"
STEP_LABEL = "steps per pixel (256x256 pixels, oversample 2 x 1 ... 64 mosaic domains)"
SERIES_LABEL = {"C": "C, whole run (2 threads)", "nbsim": "nbsim steady, eager",
                "nbsim_compiled": "nbsim steady, compiled (where float64 compiles)"}


def _xtick(key, x):
    if key == "pixels":
        return f"{int(round(math.sqrt(x)))}^2"
    return f"{x:g}"


def plot_scaling(series, path: Path):
    """Two log-log panels (time vs pixels, time vs steps per pixel) drawn with Pillow."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (key, xl) in zip(axes, (("pixels", PIX_LABEL), ("steps", STEP_LABEL))):
            s = series[key]
            for name, col in (("C", "k"), ("nbsim", "tab:blue"), ("nbsim_compiled", "tab:orange")):
                pts = [(x, y) for x, y in zip(s["x"], s[name]) if y]
                if pts:
                    ax.loglog(*zip(*pts), "o-", color=col, label=SERIES_LABEL[name])
            ax.set_xlabel(xl)
            ax.set_ylabel("wall time (s)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return
    except ImportError:
        pass
    from PIL import Image, ImageDraw
    W, H, pad = 1000, 420, 60
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    colors = {"C": (0, 0, 0), "nbsim": (31, 119, 180), "nbsim_compiled": (255, 127, 14)}
    for k, (key, xl) in enumerate((("pixels", PIX_LABEL), ("steps", STEP_LABEL))):
        s = series[key]
        x0, x1 = k * W // 2 + pad, (k + 1) * W // 2 - 20
        y0, y1 = 30, H - pad
        ys = [y for n in colors for y in s[n] if y]
        xs = [x for x in s["x"] if x]
        if not ys or not xs:
            continue
        lx0, lx1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
        ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        if ly1 == ly0:
            ly1 += 1

        def px(x):
            return x0 + (math.log10(x) - lx0) / (lx1 - lx0) * (x1 - x0)

        def py(y):
            return y1 - (math.log10(y) - ly0) / (ly1 - ly0) * (y1 - y0)
        dr.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        for e in range(int(ly0), int(ly1) + 1):
            yy = py(10 ** e)
            dr.line([x0, yy, x1, yy], fill=(220, 220, 220))
            dr.text((x0 - 45, yy - 6), f"1e{e} s", fill=(0, 0, 0))
        for x in xs:
            dr.text((px(x) - 12, y1 + 5), _xtick(key, x), fill=(0, 0, 0))
        dr.text((x0 + 10, y1 + 25), xl, fill=(0, 0, 0))
        for j, (name, col) in enumerate(colors.items()):
            pts = [(px(x), py(y)) for x, y in zip(s["x"], s[name]) if y]
            if len(pts) > 1:
                dr.line(pts, fill=col, width=2)
            for p in pts:
                dr.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
            dr.text((x0 + 10, y0 + 8 + 14 * j), SERIES_LABEL[name], fill=col)
    img.save(path)


# ---------------------------------------------------------------------------------------------

def _fail(msg: str):
    """One line on stderr, exit status 2, nothing measured or written."""
    print(f"python -m pipeline.bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None, help="comma-separated case ids (default 1,2,3,4; "
                    "--quick: 1,2,3)")
    ap.add_argument("--quick", action="store_true",
                    help="one run each, float64 only (eager and compiled)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 3)")
    ap.add_argument("--json", default=None, help="history file to append to "
                    "(default benchmarks/history.jsonl)")
    ap.add_argument("--scaling", action="store_true", help="also time the scaling series and plot")
    ap.add_argument("--plot", default=None, help="scaling plot path (default benchmarks/scaling.png)")
    ap.add_argument("--no-c", action="store_true", help="skip the C runs")
    ap.add_argument("--no-whole", action="store_true", help="skip nbsim whole-process runs")
    ap.add_argument("--no-steady", action="store_true", help="skip in-process steady-state runs")
    ap.add_argument("--sweeps", default=None,
                    help="sweep cases light,heavy (pipeline.bench_sweep): a 64-point grid (8 with "
                    "--quick) through Snakemake, the multirun and a loop over NB_C_BIN; "
                    "--cases none runs only these")
    ap.add_argument("--sweep-cores", type=int, default=None,
                    help="cores of the sweep cases (default: all of this machine)")
    a = ap.parse_args(argv)

    import signal

    import torch

    def _term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)
    spec = a.cases or ("1,2,3" if a.quick else "1,2,3,4")
    try:
        cases = [] if spec == "none" else [int(x) for x in spec.split(",")]
    except ValueError:
        cases = None
    from pipeline.bench_sweep import GRIDS
    sweeps = [x for x in (a.sweeps or "").split(",") if x]
    if any(x not in GRIDS for x in sweeps):
        _fail(f"--sweeps: expected comma-separated sweep cases from {', '.join(GRIDS)}; got {a.sweeps!r}")
    if a.sweep_cores is not None and a.sweep_cores < 1:
        _fail(f"--sweep-cores: must be >= 1, got {a.sweep_cores}")
    if cases == [] and not sweeps:
        _fail("--cases none: needs --sweeps (nothing to measure otherwise)")
    if cases is None or any(c not in SUITE for c in cases):
        _fail(f"--cases: expected comma-separated case ids from {', '.join(map(str, SUITE))}; "
                 f"got {spec!r}")
    if a.repeat is not None and a.repeat < 1:
        _fail(f"--repeat: must be >= 1, got {a.repeat}")
    repeat = a.repeat or (1 if a.quick else 3)
    cbin = None if a.no_c else os.environ.get("NB_C_BIN")
    if cbin and not (Path(cbin).is_file() and os.access(cbin, os.X_OK)):
        _fail(f"NB_C_BIN={cbin}: not an executable file (unset it or pass --no-c to skip the "
                 "C runs)")
    if not cbin and not a.no_c:
        print("NB_C_BIN not set: C runs skipped", file=sys.stderr)
    history = Path(a.json) if a.json else BENCH_DIR / "history.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)

    rec = dict(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine_info(),
               git=git_commit(), c_binary=cbin, c_threads=2, repeat=repeat, quick=a.quick,
               targets=TARGETS, load_before=loadavg(), cases={})
    print(f"machine: {rec['machine']['cpu']}, {rec['machine']['cores']} cores, "
          f"{rec['machine']['mem_gb']} GB; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); commit {rec['git']['commit'][:10]}"
          f"{' (dirty)' if rec['git']['dirty'] else ''}; load {rec['load_before']}")
    if not a.no_whole:
        rec["torch_import"] = run_torch_import(repeat)
        print(f"python -c 'import torch': {fmt(rec['torch_import']['wall_s'])} s "
              f"(subtracted from nbsim's whole-process times)", flush=True)
    variants = [("steady_f64", "float64", False), ("steady_f64_compiled", "float64", True)]
    if not a.quick:
        variants += [("steady_f32", "float32", False), ("steady_f32_compiled", "float32", True)]
    try:
        _run_cases(a, cases, repeat, cbin, variants, rec)
    except KeyboardInterrupt:                      # keep what was measured
        rec["partial"] = True
        print("interrupted: recording the cases measured so far", file=sys.stderr)

    if sweeps and not rec.get("partial"):
        from pipeline.bench_sweep import run_sweep_case
        cores = a.sweep_cores or os.cpu_count() or 1
        rec["sweeps"] = {}
        try:
            for kind in sweeps:
                rec["sweeps"][kind] = run_sweep_case(kind, a.quick, cbin, cores)
        except KeyboardInterrupt:
            rec["partial"] = True
            print("interrupted: recording the sweeps measured so far", file=sys.stderr)

    if a.scaling and not rec.get("partial"):
        print("scaling series", flush=True)
        rec["scaling"] = scaling(cbin, repeat)
        plot = Path(a.plot) if a.plot else BENCH_DIR / "scaling.png"
        plot_scaling(rec["scaling"], plot)
        rec["scaling_plot"] = str(plot)
        print(f"  wrote {plot}")
    rec["load_after"] = loadavg()

    print()
    if rec["cases"]:
        print_table(rec)
    if rec.get("sweeps"):
        from pipeline.bench_sweep import print_sweeps
        print_sweeps(rec["sweeps"])
    print(f"targets: {TARGETS}")
    compare_previous(rec, history)
    with open(history, "a") as f:
        f.write(json.dumps(rec, default=float) + "\n")
    print(f"appended to {history}")
    return 0


def _run_cases(a, cases, repeat, cbin, variants, rec):
    import torch
    for cid in cases:
        case = SUITE[cid]
        print(f"case {cid}: {case['name']}", flush=True)
        c = dict(name=case["name"], argv=case["argv"], load_start=loadavg(),
                 others_busy=others_busy())
        if (c["others_busy"] or 0) > 0.15:
            print(f"  note: other processes used {100 * c['others_busy']:.0f} % of the CPU just "
                  "before this case; timings (C's and nbsim's) are unreliable", flush=True)
        case_repeat = min(repeat, case.get("max_repeat", repeat))
        cimg = None
        if cbin:
            c["c"], cimg = run_c(cbin, case, case_repeat)
            print(f"  C whole {fmt(c['c']['wall_s'])} s, {fmt(c['c']['rss_mb'], 0)} MB", flush=True)
        if not a.no_whole:
            c["nbsim_whole"] = run_nbsim_whole(case, case_repeat)
            print(f"  nbsim whole {fmt(c['nbsim_whole']['wall_s'])} s, "
                  f"{fmt(c['nbsim_whole'].get('rss_mb'), 0)} MB "
                  f"{'' if c['nbsim_whole']['rc'] == 0 else c['nbsim_whole'].get('err')}", flush=True)
            if case.get("kernel_cache"):
                w = c["nbsim_whole_cached"] = run_nbsim_whole_cached(case, case_repeat)
                print(f"  nbsim whole, warm kernel cache {fmt(w.get('wall_s'))} s "
                      f"(cache built in {fmt(w.get('build_s'), 1)} s: {w.get('build')})", flush=True)
        steps = None
        if not a.no_steady and not (cid == 4 and a.quick):
            for key, dt, comp in variants:
                r = run_steady(case, dt, comp, case_repeat)
                img = r.pop("image")
                steps = r.get("steps", steps)
                if dt == "float64" and "parity_f64" not in c:
                    c["parity_f64"] = parity(img, cimg)
                if dt == "float32" and "parity_f32" not in c:
                    c["parity_f32"] = parity(img, cimg)
                c[key] = r
                print(f"  {key}: first {fmt(r['first_s'])} s, steady {fmt(r['steady_s'])} s", flush=True)
        if steps is None:
            from nbsim.experiment import build_model
            from nbsim.frontend.argv import parse_argv
            d = case_dir(case)
            m = build_model(parse_argv(case["argv"].split(), cwd=str(d)).spec, base_dir=str(d),
                            dtype=torch.float32)
            steps = m.report.steps
            shutil.rmtree(d, ignore_errors=True)
        npix = int(case["argv"].split("-detpixels ")[1].split()[0]) ** 2
        c["pixels"], c["steps"], c["samples"] = npix, steps, npix * steps
        cw = c.get("c", {}).get("wall_s")
        c["ratio_whole"] = ratio(cw, c.get("nbsim_whole", {}).get("wall_s"))
        c["ratio_whole_cached"] = ratio(cw, c.get("nbsim_whole_cached", {}).get("wall_s"))
        _minus_torch(c, rec)
        for key, _, _ in variants:
            if key in c:
                c[key]["ratio_c"] = ratio(cw, c[key]["steady_s"])
                c[key]["samples_per_s"] = c["samples"] / c[key]["steady_s"]
        b64 = _best(c, ["steady_f64"] + (["steady_f64_compiled"]
                                         if c.get("steady_f64_compiled", {}).get("compiled") else []))
        b32 = _best(c, ["steady_f32"] + (["steady_f32_compiled"]
                                         if c.get("steady_f32_compiled", {}).get("compiled") else []))
        c["best_steady_f64_s"], c["best_steady_f32_s"] = b64, b32
        c["ratio_steady_best"] = ratio(cw, b64)
        c["f32_speedup"] = ratio(b64, b32)
        if cw:
            c["c"]["samples_per_s"] = c["samples"] / cw
        if c.get("nbsim_whole", {}).get("wall_s"):
            c["nbsim_whole"]["samples_per_s"] = c["samples"] / c["nbsim_whole"]["wall_s"]
        c["load_end"] = loadavg()
        rec["cases"][str(cid)] = c


def _minus_torch(c: dict, rec: dict) -> None:
    """``nbsim_whole.minus_torch_import_s`` (whole process minus ``import torch``) and
    ``ratio_whole_minus_torch`` (C's whole process / that) of one case record."""
    whole = c.get("nbsim_whole", {}).get("wall_s")
    torch_s = rec.get("torch_import", {}).get("wall_s")
    if whole and torch_s:
        c["nbsim_whole"]["minus_torch_import_s"] = whole - torch_s
        c["ratio_whole_minus_torch"] = ratio(c.get("c", {}).get("wall_s"), whole - torch_s)


if __name__ == "__main__":
    sys.exit(main())
