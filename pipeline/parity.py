"""Parity runs: nbsim against the nanoBragg C program, case by case, with a Markdown report.

usage: python -m pipeline.parity --cases workflows/config/parity_cases.yaml
           [--golden tests/golden] [--report outputs/parity/report.md] [--out outputs/parity]
           [--only ID,ID] [--c-bin PATH] [--c-cache outputs/c_cache] [--force-c]
           [--device cpu] [--dtype float64] [--threshold KEY=VALUE ...] [--no-fail] [--no-report]

For every case (a nanoBragg argument list, or Hydra overrides of ``python -m nbsim``):

* nbsim simulates it in process (argv cases: through the nanoBragg front end, in a fresh folder holding
  copies of the input files, exactly like the C run);
* the reference is the C program named by ``$NB_C_BIN`` (or ``--c-bin``), run single-threaded in a
  fresh folder, its outputs cached under ``outputs/c_cache/<key>/`` by the canonical argument list,
  the input files' contents and the binary (``pipeline.c_runner``); with ``--golden DIR`` the stored
  golden outputs of the case with the same id (and the same arguments) stand in for C;
* ``pipeline.compare`` computes Pearson r, p99.9 |Δ|/max, max |Δ|, the sum ratio and the offsets of the
  25 brightest peaks, and applies the thresholds (defaults: tests/golden/parity.py);
* ``<out>/<id>/result.json`` and ``<out>/<id>/compare.png`` (C | nbsim | difference) are written, and
  ``report.md`` with the verdict table.

Exit status: 0 every case passes; 1 a case fails or errors; 2 usage error, or no C program and no
golden data (the message says how to provide ``NB_C_BIN``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


from pipeline import c_runner
from pipeline.compare import Thresholds, compare_images, read_float_image, summary_line, verdict

REPO = Path(__file__).resolve().parent.parent
CASES_SCHEMA = REPO / "workflows" / "schemas" / "parity_cases.schema.yaml"
DEFAULT_CASES = REPO / "workflows" / "config" / "parity_cases.yaml"


class ParityConfigError(ValueError):
    pass


@dataclass
class Case:
    id: str
    argv: Optional[List[str]] = None          # nanoBragg arguments (without output flags)
    overrides: Optional[List[str]] = None     # Hydra overrides
    golden: Optional[str] = None              # golden case id (default: id)
    thresholds: Dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class CaseFile:
    path: Path
    cases: List[Case]
    inputs: List[Path]
    golden: Optional[Path]
    thresholds: Dict[str, float]


def load_cases(path) -> CaseFile:
    """Read and validate a cases file; relative paths in it are taken from its folder."""
    import jsonschema
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ParityConfigError(f"{path}: no such cases file")
    data = yaml.safe_load(path.read_text()) or {}
    schema = yaml.safe_load(CASES_SCHEMA.read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ParityConfigError(f"{path}: {where}: {e.message}") from None
    here = path.resolve().parent
    inp = data.get("inputs") or []
    inputs = [(here / p).resolve() for p in ([inp] if isinstance(inp, str) else inp)]
    golden = (here / data["golden"]).resolve() if data.get("golden") else None
    cases, seen = [], set()
    for c in data["cases"]:
        if c["id"] in seen:
            raise ParityConfigError(f"{path}: duplicate case id {c['id']!r}")
        seen.add(c["id"])
        argv = c_runner.split_argv(c["argv"]) if "argv" in c else None
        cases.append(Case(id=c["id"], argv=argv, overrides=list(c["overrides"]) if "overrides" in c else None,
                          golden=c.get("golden"), thresholds=dict(c.get("thresholds") or {}),
                          note=c.get("note", "")))
    return CaseFile(path=path, cases=cases, inputs=inputs, golden=golden,
                    thresholds=dict(data.get("thresholds") or {}))


# ---------------------------------------------------------------------------------------------
# golden data standing in for C
# ---------------------------------------------------------------------------------------------

class Golden:
    def __init__(self, folder):
        self.folder = Path(folder)
        mf = self.folder / "manifest.json"
        if not mf.is_file():
            raise ParityConfigError(f"--golden {folder}: no manifest.json there")
        self.cases = {c["id"]: c for c in json.loads(mf.read_text())["cases"]}

    def inputs_dir(self) -> Path:
        return self.folder / "inputs"

    def lookup(self, gid: str, argv: Optional[List[str]]) -> Tuple[Optional[dict], str]:
        """``(manifest entry, '')`` or ``(None, why not)``."""
        c = self.cases.get(gid)
        if c is None:
            return None, f"no golden case {gid!r} in {self.folder}"
        if argv is not None:
            gargv = c_runner.strip_output_flags([str(a) for a in c["args"]])
            if gargv != list(argv):
                return None, (f"golden case {gid} was made with different arguments "
                              f"({' '.join(gargv)})")
        return c, ""


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------

@dataclass
class Context:
    out: Path
    c_bin: Optional[str]
    c_cache: Path
    golden: Optional[Golden]
    inputs: List[Path]
    thresholds: Thresholds
    device: Optional[str] = None
    dtype: Optional[str] = None
    force_c: bool = False
    log: object = print


def _device(parsed_device, ctx: Context):
    from nbsim.spec import DeviceSpec
    d = parsed_device or DeviceSpec()
    kw = asdict(d)
    if ctx.device:
        kw["device"] = ctx.device
    if ctx.dtype:
        kw["dtype"] = ctx.dtype
    return DeviceSpec(**kw)


def _simulate_argv(argv: List[str], files: Dict[str, Path], ctx: Context):
    """nbsim on a nanoBragg argument list, in a fresh folder with the same input files as C."""
    from nbsim import api
    from nbsim.frontend.argv import parse_argv
    run_dir = Path(tempfile.mkdtemp(prefix="nbsim-parity-"))
    try:
        for name, src in files.items():
            shutil.copyfile(src, run_dir / name)
        parsed = parse_argv(argv, cwd=str(run_dir))
        device = _device(parsed.device, ctx)
        t0 = time.perf_counter()
        res = api.simulate(parsed.spec, device, base_dir=str(run_dir))
        img = res.float32()
        return img, time.perf_counter() - t0, device, list(res.warnings)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _simulate_overrides(overrides: List[str], ctx: Context):
    """nbsim on Hydra overrides; also the equivalent nanoBragg argv (spec_to_argv)."""
    from nbsim import api
    from pipeline.compose import compose_spec
    spec, device = compose_spec(overrides)
    try:
        from nbsim.frontend.to_argv import spec_to_argv
    except ImportError as e:
        raise RuntimeError("cases given as Hydra overrides need nbsim.frontend.to_argv.spec_to_argv "
                           f"(not available: {e})") from None
    argv = [str(a) for a in spec_to_argv(spec)]
    device = _device(device, ctx)
    t0 = time.perf_counter()
    res = api.simulate(spec, device, base_dir=".")
    return argv, res.float32(), time.perf_counter() - t0, device, list(res.warnings)


def _reference(case: Case, raw_argv: List[str], argv: List[str], ctx: Context):
    """``(flat float image, info)`` of the C side: golden data, the C cache or a C run.

    ``raw_argv`` names input files as given (paths), ``argv`` by base name (for the golden check)."""
    why_not_golden = ""
    if ctx.golden is not None:
        entry, why_not_golden = ctx.golden.lookup(case.golden or case.id,
                                                  argv if case.overrides is None else None)
        if entry is not None:
            img = read_float_image(ctx.golden.folder / entry["float"])
            return img, {"source": "golden", "folder": str(ctx.golden.folder / entry["float"]),
                         "shape": [entry.get("spixels"), entry.get("fpixels")]}
    if ctx.c_bin is None:
        raise RuntimeError(("no reference: " + why_not_golden + "; " if why_not_golden else "no reference: ")
                           + f"${c_runner.ENV_VAR} is not set")
    res = c_runner.run_c(raw_argv, binary=ctx.c_bin, inputs=ctx.inputs, cache_root=ctx.c_cache,
                         force=ctx.force_c, log=ctx.log)
    return read_float_image(res.float_path), {"source": "C cache" if res.cached else "C run",
                                              "folder": str(res.folder), "key": res.key,
                                              "wall_s": res.wall_s}


def run_case(case: Case, ctx: Context) -> dict:
    """Run one case; write ``<out>/<id>/result.json`` (+ compare.png); return the result."""
    from pipeline.contact_sheet import comparison_png
    folder = ctx.out / case.id
    folder.mkdir(parents=True, exist_ok=True)
    th = ctx.thresholds.merged(case.thresholds)
    res: dict = {"id": case.id, "status": "error", "argv": None, "overrides": case.overrides,
                 "thresholds": asdict(th), "note": case.note}
    try:
        if case.overrides is not None:
            raw, img, wall, device, warns = _simulate_overrides(case.overrides, ctx)
            argv, _files = c_runner.resolve_inputs(raw, ctx.inputs)
        else:
            raw = c_runner.strip_output_flags(case.argv)
            argv, files = c_runner.resolve_inputs(raw, ctx.inputs)
            img, wall, device, warns = _simulate_argv(argv, files, ctx)
        res["argv"] = argv                       # input files by base name, as the C run sees them
        res["nbsim"] = {"wall_s": round(wall, 4), "device": device.device, "dtype": device.dtype,
                        "warnings": warns}
        ref, info = _reference(case, raw, argv, ctx)
        res["reference"] = info
        if ref.size != img.size:
            raise RuntimeError(f"image sizes differ: nbsim {img.shape[0]}x{img.shape[1]} "
                               f"({img.size} px) vs reference {ref.size} px")
        ref = ref.reshape(img.shape)
        m = compare_images(img, ref)
        ok, reasons = verdict(m, th)
        res.update(status="pass" if ok else "fail", reasons=reasons, metrics=m.to_dict(),
                   summary=summary_line(m))
        png = comparison_png(ref, img, folder / "compare.png",
                             title=f"{case.id}: {'PASS' if ok else 'FAIL'}  {summary_line(m)}")
        res["png"] = str(png)
    except Exception as exc:                       # noqa: BLE001 - recorded as the case's error
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
    tmp = folder / f".result.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, folder / "result.json")
    return res


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parse_thresholds(items: Sequence[str]) -> dict:
    out = {}
    for it in items or ():
        k, sep, v = it.partition("=")
        if not sep:
            raise ParityConfigError(f"--threshold {it!r}: expected KEY=VALUE")
        out[k.strip()] = None if v.strip().lower() in ("none", "null") else float(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.parity",
                                 description="nbsim vs nanoBragg C parity runs with a Markdown report.")
    ap.add_argument("--cases", default=str(DEFAULT_CASES.relative_to(Path.cwd()) if
                                          DEFAULT_CASES.is_relative_to(Path.cwd()) else DEFAULT_CASES),
                    help="cases YAML (default %(default)s)")
    ap.add_argument("--golden", help="golden data folder (e.g. tests/golden): its stored C outputs "
                    "stand in for the C program")
    ap.add_argument("--out", default="outputs/parity", help="per-case results and PNGs (default %(default)s)")
    ap.add_argument("--report", help="Markdown report path (default OUT/report.md)")
    ap.add_argument("--only", help="comma-separated case ids")
    ap.add_argument("--c-bin", help=f"the C program (default ${c_runner.ENV_VAR})")
    ap.add_argument("--c-cache", default="outputs/c_cache", help="C output cache (default %(default)s)")
    ap.add_argument("--force-c", action="store_true", help="rerun C even when cached")
    ap.add_argument("--device", help="nbsim device (default: cpu / the case's)")
    ap.add_argument("--dtype", choices=("float64", "float32"), help="nbsim dtype (default float64)")
    ap.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                    help="override a threshold: min_r, max_p999_rel, max_sum_dev, max_peak_offset_px")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when cases fail")
    ap.add_argument("--no-report", action="store_true", help="write only the per-case results")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cf = load_cases(a.cases)
        th = Thresholds.from_dict(cf.thresholds).merged(_parse_thresholds(a.threshold))
        golden_dir = a.golden or (str(cf.golden) if cf.golden else None)
        golden = Golden(golden_dir) if golden_dir else None
    except (ParityConfigError, ValueError) as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    cases = cf.cases
    if a.only:
        want = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in {c.id for c in cases}]
        if unknown:
            print(f"parity: error: --only: unknown case(s) {', '.join(unknown)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.id in want]
    if a.list:
        for c in cases:
            print(f"{c.id}: {' '.join(c.argv) if c.argv else 'overrides ' + ' '.join(c.overrides)}")
        return 0
    c_bin = c_runner.find_binary(a.c_bin)
    if c_bin is None and golden is None:
        given = a.c_bin or os.environ.get(c_runner.ENV_VAR)
        if given:
            print(f"parity: {given!r} is not an executable file.", file=sys.stderr)
        print("parity: " + c_runner.HOW_TO_PROVIDE, file=sys.stderr)
        return 2
    inputs = list(cf.inputs) + ([golden.inputs_dir()] if golden else [])
    ctx = Context(out=Path(a.out), c_bin=c_bin, c_cache=Path(a.c_cache), golden=golden, inputs=inputs,
                  thresholds=th, device=a.device, dtype=a.dtype, force_c=a.force_c,
                  log=lambda s: print(f"  {s}", flush=True))
    ref_desc = (f"C program {c_bin}" if c_bin else "") + (" + " if c_bin and golden else "") + \
        (f"golden data {golden.folder}" if golden else "")
    print(f"parity: {len(cases)} case(s) against {ref_desc}", flush=True)
    results = []
    t_all = time.perf_counter()
    for case in cases:
        r = run_case(case, ctx)
        results.append(r)
        tag = r["status"].upper()
        detail = r.get("summary") or r.get("error", "")
        if r.get("reasons"):
            detail += "  [" + "; ".join(r["reasons"]) + "]"
        src = (r.get("reference") or {}).get("source", "-")
        print(f"{tag:5s} {case.id}: {detail} (nbsim {(r.get('nbsim') or {}).get('wall_s', 0):.2f} s, "
              f"ref: {src})", flush=True)
    npass = sum(r["status"] == "pass" for r in results)
    if not a.no_report:
        from pipeline.report import write_parity_report
        meta = {"created": _dt.datetime.now().isoformat(timespec="seconds"),
                "cases file": str(a.cases), "reference": ref_desc,
                "C binary sha256": c_runner._binary_sha(c_bin) if c_bin else "-",
                "thresholds": asdict(th), "nbsim device": f"{a.device or 'cpu'} {a.dtype or 'float64'}",
                "wall time": f"{time.perf_counter() - t_all:.1f} s"}
        try:
            import nbsim
            import torch
            meta["versions"] = {"nbsim": getattr(nbsim, "__version__", "?"), "torch": torch.__version__}
        except ImportError:
            pass
        rep = write_parity_report(results, a.report or Path(a.out) / "report.md", meta)
        print(f"report: {rep}")
    print(f"parity: {npass}/{len(results)} cases pass")
    return 0 if (npass == len(results) or a.no_fail) else 1


if __name__ == "__main__":
    sys.exit(main())
