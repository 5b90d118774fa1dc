"""Markdown report of a parity run (one ``result.json`` per case -> ``report.md``).

usage: python -m pipeline.report parity RESULTS_DIR [--report PATH] [--ids A,B] [--check]
       python -m pipeline.report check RESULTS_DIR [--ids A,B]

``RESULTS_DIR`` holds ``<case>/result.json`` (written by ``python -m pipeline.parity``); the report
is written next to them (default ``RESULTS_DIR/report.md``) and links each case's ``compare.png``.
``--check``: exit 1 when a case did not pass (what the Snakemake rule ``parity_check`` uses).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

COLUMNS = ("case", "verdict", "r", "p99.9 |Δ|/max", "max |Δ|", "sum ratio", "peak shift max/mean (px)",
           "reference", "nbsim s", "C s")


def _fmt(x, spec):
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return ""


def row(res: dict) -> List[str]:
    m = res.get("metrics") or {}
    ref = res.get("reference") or {}
    status = res.get("status", "error").upper()
    if status == "PASS":
        verdict = "✅ PASS"
    elif status == "FAIL":
        verdict = "❌ FAIL"
    else:
        verdict = "⚠️ ERROR"
    peaks = "" if not m else f"{m.get('max_peak_offset_px', 0):.2g} / {m.get('mean_peak_offset_px', 0):.2g}"
    return [res.get("id", "?"), verdict, _fmt(m.get("pearson_r"), ".7f"), _fmt(m.get("p999_rel"), ".2e"),
            _fmt(m.get("max_abs_diff"), ".3g"), _fmt(m.get("sum_ratio"), ".6f"), peaks,
            ref.get("source", ""), _fmt((res.get("nbsim") or {}).get("wall_s"), ".2f"),
            _fmt(ref.get("wall_s"), ".2f")]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def counts(results: Sequence[dict]) -> dict:
    c = {"pass": 0, "fail": 0, "error": 0}
    for r in results:
        c[r.get("status", "error")] = c.get(r.get("status", "error"), 0) + 1
    return c


def write_parity_report(results: Sequence[dict], path, meta: Optional[dict] = None) -> Path:
    """Write the Markdown report; image links are relative to the report's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    c = counts(results)
    n = len(results)
    lines = ["# nbsim parity report", ""]
    lines.append(f"**{c['pass']}/{n} cases pass**" + (f", {c['fail']} fail" if c["fail"] else "")
                 + (f", {c['error']} errors" if c["error"] else "") + ".")
    lines.append("")
    when = meta.pop("created", _dt.datetime.now().isoformat(timespec="seconds"))
    lines.append(f"- created: {when}")
    for k, v in meta.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in v.items())
        lines.append(f"- {k}: {v}")
    lines += ["", "## Verdicts", "", _md_table(COLUMNS, [row(r) for r in results]), ""]
    lines += ["Criteria (defaults of `tests/golden/parity.py`): Pearson r ≥ min_r, 99.9th percentile of "
              "|nbsim − C| / max(C) ≤ max_p999_rel, |sum ratio − 1| ≤ max_sum_dev; plus: none of the 25 "
              "brightest C peaks moves (intensity-weighted centroid of its 7×7 window) by more than max_peak_offset_px.", ""]
    lines += ["## Cases", ""]
    for r in results:
        cid = r.get("id", "?")
        lines.append(f"### {cid}: {r.get('status', 'error').upper()}")
        lines.append("")
        if r.get("argv") is not None:
            lines.append(f"nanoBragg arguments: `{shlex.join(r['argv'])}`")
            lines.append("")
        if r.get("overrides"):
            lines.append(f"Hydra overrides: `{' '.join(r['overrides'])}`")
            lines.append("")
        for why in r.get("reasons") or []:
            lines.append(f"- fails: {why}")
        if r.get("error"):
            lines += ["```", str(r["error"]).strip(), "```"]
        ref = r.get("reference") or {}
        if ref:
            lines.append(f"- reference: {ref.get('source')}"
                         + (f" ({ref.get('folder')})" if ref.get("folder") else ""))
        m = r.get("metrics")
        if m:
            lines.append(f"- r = {m['pearson_r']:.9f}, p99.9 |Δ|/max = {m['p999_rel']:.3e}, "
                         f"max |Δ| = {m['max_abs_diff']:.4g} ({m['max_rel_diff']:.3e} of max), "
                         f"sum ratio = {m['sum_ratio']:.8f}, max C = {m['ref_max']:.6g}, "
                         f"max nbsim = {m['test_max']:.6g}"
                         + (" — images bit-identical" if m.get("identical") else ""))
            moved = sorted((p for p in m.get("peaks", []) if p["offset_px"] > 0.05),
                           key=lambda p: -p["offset_px"])
            lines.append(f"- 25 brightest C peaks, centroid shift nbsim − C: max {m['max_peak_offset_px']:.3g} px, "
                         f"mean {m['mean_peak_offset_px']:.3g} px" + (
                             "; largest: " + ", ".join(f"(s={p['s']}, f={p['f']}) by ({p['ds']:+.2f}, {p['df']:+.2f})"
                                                       for p in moved[:8]) if moved else ""))
        png = r.get("png")
        if png:
            rel = os.path.relpath(Path(png).resolve(), path.parent.resolve())
            lines += ["", f"![{cid}: C | nbsim | difference]({rel})"]
        lines.append("")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def load_results(results_dir, ids: Optional[Sequence[str]] = None) -> List[dict]:
    d = Path(results_dir)
    if ids is None:
        files = sorted(d.glob("*/result.json"))
    else:
        files = [d / i / "result.json" for i in ids]
    out = []
    for f in files:
        if f.is_file():
            out.append(json.loads(f.read_text()))
        else:
            out.append({"id": f.parent.name, "status": "error", "error": f"no result: {f} is missing"})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity", help="Markdown report from <dir>/<case>/result.json")
    p.add_argument("results_dir")
    p.add_argument("--report", help="output path (default RESULTS_DIR/report.md)")
    p.add_argument("--ids", help="comma-separated case ids, in this order (default: all found)")
    p.add_argument("--meta", help="JSON file with header lines for the report")
    p.add_argument("--check", action="store_true", help="exit 1 if a case did not pass")
    q = sub.add_parser("check", help="exit 1 unless every <dir>/<case>/result.json passed")
    q.add_argument("results_dir")
    q.add_argument("--ids", help="comma-separated case ids (default: all found)")
    a = ap.parse_args(argv)
    ids = a.ids.split(",") if a.ids else None
    results = load_results(a.results_dir, ids)
    if a.cmd == "check":
        bad = [r for r in results if r.get("status") != "pass"]
        for r in bad:
            why = "; ".join(r.get("reasons") or []) or (str(r.get("error", "")).splitlines() or [""])[0]
            print(f"{r.get('status', 'error').upper()} {r.get('id')}: {why}")
        print(f"parity: {len(results) - len(bad)}/{len(results)} cases pass")
        return 1 if bad or not results else 0
    meta = json.loads(Path(a.meta).read_text()) if a.meta else {}
    out = write_parity_report(results, a.report or Path(a.results_dir) / "report.md", meta)
    c = counts(results)
    print(f"parity: {c['pass']}/{len(results)} cases pass ({c['fail']} fail, {c['error']} errors); report {out}")
    return 1 if (a.check and c["pass"] != len(results)) else 0


if __name__ == "__main__":
    sys.exit(main())
