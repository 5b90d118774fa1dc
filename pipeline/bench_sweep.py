"""Sweep cases of the benchmark (``python -m pipeline.bench --sweeps light,heavy``).

A grid of 4 cells × 4 N × 4 distances (64 points, triclinic with misset; ``--quick``: 2 × 2 × 2 = 8
points) is computed three ways on the same cores, each from scratch in a fresh folder:

* **snakemake**: ``snakemake -s workflows/Snakefile --cores C`` on the grid's sweep config (batched
  jobs, threads 1 each; summary.csv and contact sheet included);
* **multirun**: ``python -m nbsim --multirun <grid>`` (nbsim's in-process launcher,
  ``OMP_NUM_THREADS=C``);
* **c_loop**: a shell loop over ``$NB_C_BIN`` with the same experiments (``spec_to_argv``), writing a
  float and an SMV image per point (``OMP_NUM_THREADS=C``).

The heavy grid runs with a warm kernel cache (``warm_kernel_cache``: one ``nbsim.kernel_cache
build`` per kernel shape of the grid into a fresh folder, timed and recorded as ``kernel_cache``),
which ``device.compile=auto`` then loads in every process; the light grid with the cache off, and
``light-cached`` is the light grid with a warm cache (its automatic oversampling gives several
kernel shapes).

Reported per grid: the wall time and points per second of each, ``ratio_c`` = C loop's wall time /
that way's wall time (> 1: faster than the C loop), the sum of nbsim's own simulation times
(``run.json`` ``wall_time_s``), which kernels rendered the points, and ``outside_kernel_per_point_s``:
in one process (started as nbsim's commands start: ``pipeline.proc``) that already rendered a point,
``pipeline.sweep.run_points`` over the grid, minus the points' simulation times, per point (checks,
hashing, composition, every write), in wall time and in CPU time (``outside_kernel_cpu_per_point_s``:
less dependent on other jobs on the machine, but a lower bound: ``run_many``'s writer thread writes a
point while the next one renders, and its CPU in that time counts as simulation CPU).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

CELLS = [[70, 80, 90, 75, 85, 95], [60, 70, 80, 80, 85, 95], [75, 85, 95, 70, 80, 100],
         [65, 75, 85, 85, 95, 100]]
NS = [3, 4, 5, 6]
DISTANCES = [80, 100, 120, 140]

LIGHT_BASE = ["crystal=triclinic", "detector.fpixels=256", "detector.spixels=256",
              "crystal.misset_deg=[10,20,30]"]
GRIDS = {
    "light": dict(name="light: 256², auto oversampling, triclinic + misset", base=LIGHT_BASE),
    "light-cached": dict(name="light: 256², auto oversampling, triclinic + misset, warm kernel cache",
                         base=LIGHT_BASE, kernel_cache=True),
    "heavy": dict(name="heavy: 512², 4 mosaic domains × 2 φ, oversample 2, triclinic + misset",
                  base=["crystal=triclinic", "detector.fpixels=512", "detector.spixels=512",
                        "crystal.misset_deg=[10,20,30]", "detector.oversample=2",
                        "crystal.mosaic_deg=0.5", "crystal.mosaic_domains=4", "crystal.osc_deg=0.2",
                        "crystal.phisteps=2"],
                  kernel_cache=True),
}


def grid_config(kind: str, quick: bool) -> dict:
    """The sweep config (``workflows/schemas/sweep.schema.yaml``) of grid ``kind``."""
    n = 2 if quick else 4
    return {"name": f"bench_{kind}", "store_root": "store", "base": list(GRIDS[kind]["base"]),
            "grid": {"crystal.cell_A_deg": CELLS[:n], "crystal.N": NS[:n],
                     "detector.distance_mm": DISTANCES[:n]}}


def _env(threads: int, kernel_cache="off") -> dict:
    """The environment of one way of running the grid; ``kernel_cache``: its
    ``NBSIM_KERNEL_CACHE`` (a folder, or "off")."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NBSIM_KERNEL_CACHE=str(kernel_cache))
    env.pop("SLURM_CONF", None)
    return env


def warm_kernel_cache(argvs: List[List[str]], cache: Path, cwd: Optional[Path] = None) -> dict:
    """``python -m nbsim.kernel_cache build`` into ``cache`` of each of ``argvs`` (for a grid, one
    point per kernel shape, ``shape_representatives``: the compiled kernels every point of the grid
    loads, its continuous numbers being kernel inputs), run in ``cwd`` (the folder holding the files
    the arguments name; default a fresh empty one). Wall time, message and the entries left."""
    d = Path(cwd) if cwd is not None else Path(tempfile.mkdtemp(prefix="nbsim-bench-sweep-"))
    try:
        t0, rc, msgs = time.perf_counter(), 0, []
        for argv in argvs:
            p = subprocess.run([sys.executable, "-m", "nbsim.kernel_cache", "build", *argv], cwd=d,
                               env=_env(2, cache), capture_output=True, text=True)
            rc = rc or p.returncode
            msgs.append((p.stdout if p.returncode == 0 else p.stdout + p.stderr).strip()[-300:])
        return {"build_s": time.perf_counter() - t0, "rc": rc, "shapes": len(argvs),
                "message": "; ".join(msgs)[-600:],
                "entries": len(list(cache.iterdir())) if cache.exists() else 0}
    finally:
        if cwd is None:
            shutil.rmtree(d, ignore_errors=True)


def shape_representatives(points) -> List[int]:
    """Indices of one point per kernel shape (resolved oversampling, layers, sources, φ steps,
    domains, detector size: ``nbsim.batch.group_key``), first occurrence first."""
    from nbsim.batch import group_key
    from pipeline.sweep import Composer
    comp, seen, out = Composer(), set(), []
    for i, p in enumerate(points):
        spec, dev = comp.spec(p.overrides)
        k = group_key(spec, dev)
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def _timed(cmd: List[str], cwd: Path, env: dict, timeout: float = 7200) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rc": p.returncode,
            "err": (p.stderr or "").strip().splitlines()[-3:] if p.returncode else []}


def _store_figures(store: Path, hashes: List[str]) -> dict:
    sims, kernels = [], {}
    for h in hashes:
        f = store / h / "run.json"
        if not f.is_file():
            continue
        run = json.loads(f.read_text())
        sims.append(float(run.get("wall_time_s") or 0.0))
        k = (run.get("info") or {}).get("kernel") or "unknown"
        kernels[k] = kernels.get(k, 0) + 1
    return {"stored": len(sims), "sum_simulate_s": sum(sims), "kernels": kernels}


def run_snakemake(cfg: dict, cores: int, hashes: List[str], kernel_cache="off") -> dict:
    import yaml
    d = Path(tempfile.mkdtemp(prefix="nbsim-bench-sweep-"))
    try:
        (d / "sweep.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflows" / "Snakefile"),
               "--directory", str(d), "--configfile", str(d / "sweep.yaml"), "--cores", str(cores),
               "--quiet", "all"]
        r = _timed(cmd, d, _env(1, kernel_cache))
        r.update(_store_figures(d / "store", hashes))
        r["jobs"] = len(list((d / "store" / ".sweep_batches").glob("*.done")))
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_multirun(cfg: dict, cores: int, hashes: List[str], kernel_cache="off") -> dict:
    from pipeline.sweep import multirun_command
    d = Path(tempfile.mkdtemp(prefix="nbsim-bench-sweep-"))
    try:
        cmd = [sys.executable] + multirun_command(cfg)[1:] + ["quiet=true"]
        r = _timed(cmd, d, _env(cores, kernel_cache))
        r.update(_store_figures(d / "store", hashes))
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


def c_argvs(points) -> List[List[str]]:
    from nbsim.frontend.to_argv import spec_to_argv
    from pipeline.sweep import Composer
    comp = Composer()
    return [spec_to_argv(comp.spec(p.overrides)[0]) for p in points]


def run_c_loop(cbin: str, argvs: List[List[str]], cores: int) -> dict:
    d = Path(tempfile.mkdtemp(prefix="nbsim-bench-sweep-"))
    try:
        lines = ["set -e"]
        for i, a in enumerate(argvs):
            lines.append(shlex.join([cbin, *a, "-floatfile", f"float_{i}.bin", "-intfile", f"int_{i}.img",
                                     "-nopgm", "-nonoise"]) + " > /dev/null")
        (d / "loop.sh").write_text("\n".join(lines) + "\n")
        r = _timed(["bash", str(d / "loop.sh")], d, _env(cores))
        r["stored"] = len(list(d.glob("float_*.bin")))
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


def outside_kernel(points, cores: int) -> dict:
    """In a fresh process started as nbsim's commands start (``pipeline.proc.prepare_process``: the
    OpenMP wait policy and malloc's thresholds, fixed before torch loads, so not in the benchmark's own
    process): ``outside_kernel_here`` of the points' overrides, its figures (a dict)."""
    env = _env(cores, "off")
    doc = json.dumps({"overrides": [p.overrides for p in points], "cores": cores})
    p = subprocess.run([sys.executable, "-m", "pipeline.bench_sweep", "outside-kernel"], input=doc,
                       capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        return {"points": len(points), "rc": p.returncode, "err": p.stderr.strip().splitlines()[-3:],
                "total_s": float("nan"), "outside_kernel_per_point_s": float("nan"),
                "outside_kernel_cpu_per_point_s": float("nan")}
    return json.loads(p.stdout.strip().splitlines()[-1])


def outside_kernel_here(points, cores: int) -> dict:
    """In this process: one point rendered first (imports, Hydra), then ``run_points`` over all
    points (objects with ``overrides``) into a fresh store; (total − Σ simulation) / points."""
    import torch

    import nbsim.api
    from pipeline.sweep import Composer, run_points
    torch.set_num_threads(cores)
    d = Path(tempfile.mkdtemp(prefix="nbsim-bench-sweep-"))
    original, sim_cpu = nbsim.api.simulate, [0.0]

    def timed_simulate(*args, **kw):              # CPU seconds (all threads) inside simulate
        c0 = time.process_time()
        try:
            return original(*args, **kw)
        finally:
            sim_cpu[0] += time.process_time() - c0
    try:
        comp = Composer()
        run_points([points[0].overrides], d / "warm", base_dir=d, composer=comp, log=lambda s: None)
        nbsim.api.simulate = timed_simulate
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_points([p.overrides for p in points], d / "store", base_dir=d, composer=comp,
                         log=lambda s: None)
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        sim = sum(float(r[2].get("wall_time_s") or 0.0) for r in res)
        return {"points": len(points), "total_s": total, "sum_simulate_s": sim,
                "outside_kernel_per_point_s": (total - sim) / len(points),
                "outside_kernel_cpu_per_point_s": (total_cpu - sim_cpu[0]) / len(points)}
    finally:
        nbsim.api.simulate = original
        shutil.rmtree(d, ignore_errors=True)


def run_sweep_case(kind: str, quick: bool, cbin, cores: int) -> Dict:
    from pipeline.sweep import expand, validate_config
    cfg = validate_config(grid_config(kind, quick))
    points = expand(cfg)
    hashes = [p.hash for p in points]
    n = len(points)
    rec = {"name": GRIDS[kind]["name"], "points": n, "cores": cores, "config": cfg}
    print(f"sweep {kind}: {rec['name']}, {n} points, {cores} cores", flush=True)
    argvs = c_argvs(points)
    if cbin:
        rec["c_loop"] = run_c_loop(cbin, argvs, cores)
        print(f"  C loop      {rec['c_loop']['wall_s']:.2f} s", flush=True)
    cache = "off"
    if GRIDS[kind].get("kernel_cache"):
        cache = Path(tempfile.mkdtemp(prefix="nbsim-bench-kernels-"))
        rec["kernel_cache"] = warm_kernel_cache([argvs[i] for i in shape_representatives(points)], cache)
        print(f"  kernel cache built in {rec['kernel_cache']['build_s']:.1f} s "
              f"({rec['kernel_cache']['entries']} entries): {rec['kernel_cache']['message']}", flush=True)
    try:
        _run_ways(rec, kind, cfg, cores, hashes, points, cache)
    finally:
        if cache != "off":
            shutil.rmtree(cache, ignore_errors=True)
    c_wall = (rec.get("c_loop") or {}).get("wall_s") if (rec.get("c_loop") or {}).get("rc") == 0 else None
    for way in ("c_loop", "snakemake", "multirun"):
        r = rec.get(way)
        if not r or r.get("rc") != 0:
            continue
        r["points_per_s"] = n / r["wall_s"]
        if c_wall and way != "c_loop":
            r["ratio_c"] = c_wall / r["wall_s"]
    return rec


def _run_ways(rec, kind, cfg, cores, hashes, points, cache) -> None:
    """Snakemake, the multirun and (light grid) the in-process figures of one grid."""
    rec["snakemake"] = run_snakemake(cfg, cores, hashes, cache)
    print(f"  snakemake   {rec['snakemake']['wall_s']:.2f} s ({rec['snakemake']['jobs']} batch jobs, "
          f"{rec['snakemake']['sum_simulate_s']:.2f} s simulating) {rec['snakemake']['err'] or ''}", flush=True)
    rec["multirun"] = run_multirun(cfg, cores, hashes, cache)
    print(f"  multirun    {rec['multirun']['wall_s']:.2f} s ({rec['multirun']['sum_simulate_s']:.2f} s "
          f"simulating) {rec['multirun']['err'] or ''}", flush=True)
    if kind == "light":
        rec["in_process"] = outside_kernel(points, cores)
        print(f"  in process  {rec['in_process']['total_s']:.2f} s, outside the kernel "
              f"{1e3 * rec['in_process']['outside_kernel_per_point_s']:.1f} ms/point (CPU "
              f"{1e3 * rec['in_process']['outside_kernel_cpu_per_point_s']:.1f} ms/point)", flush=True)


def print_sweeps(sweeps: dict) -> None:
    print(f"{'sweep':<13}{'points':>7}{'C loop s':>10}{'snakemake s':>13}{'×C':>7}{'multirun s':>12}{'×C':>7}"
          f"{'pts/s C':>9}{'pts/s sm':>10}{'pts/s mr':>10}")
    for kind, r in sweeps.items():
        c, s, m = r.get("c_loop") or {}, r.get("snakemake") or {}, r.get("multirun") or {}

        def f(x, nd=2):
            return "-" if x is None else f"{x:.{nd}f}"
        print(f"{kind:<13}{r['points']:>7}{f(c.get('wall_s')):>10}{f(s.get('wall_s')):>13}"
              f"{f(s.get('ratio_c')):>7}{f(m.get('wall_s')):>12}{f(m.get('ratio_c')):>7}"
              f"{f(c.get('points_per_s')):>9}{f(s.get('points_per_s')):>10}{f(m.get('points_per_s')):>10}")


if __name__ == "__main__":        # python -m pipeline.bench_sweep outside-kernel < {"overrides": [...], "cores": N}
    if sys.argv[1:] != ["outside-kernel"]:
        sys.exit("usage: python -m pipeline.bench_sweep outside-kernel < JSON (used by outside_kernel)")
    from types import SimpleNamespace

    from pipeline.proc import prepare_process
    prepare_process()                                   # as nbsim's commands start, before torch loads
    _doc = json.loads(sys.stdin.read())
    _res = outside_kernel_here([SimpleNamespace(overrides=o) for o in _doc["overrides"]], int(_doc["cores"]))
    print(json.dumps(_res))
