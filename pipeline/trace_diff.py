"""Line-by-line comparison of two nanoBragg-style pixel traces (C instrumented build vs nbsim).

Usage::

    python -m pipeline.trace_diff A.txt B.txt [--rtol 1e-9] [--atol 1e-12] [--scope all|pixel]
    python -m pipeline.trace_diff --case "-cell 100 100 100 90 90 90 ... -trace_pixel S F" \
        [--c-cmd /path/to/instrumented/nanoBragg | env NB_C_BIN] [--pixel S F] [--cwd DIR]

Both trace formats are read: the helper lines ``TRACE_C:name=v v v`` (also ``name=[a b c; ...]`` and
``name=key:v key:v``), the pixel lines ``TRACE_C: name v v v``, ``TRACE_PY``-prefixed variants of
both, ``DETECTOR_*`` lines and ``TRACE_CONFIG:`` (compared as text). Free-text ``TRACE:`` lines (the
C cell-construction log, %g) are ignored.

Lines with the same name are paired in order of occurrence (the k-th ``hkl_frac`` of A with the
k-th of B). A value pair agrees when ``|a-b| <= atol`` or ``|a-b| <= rtol*max(|a|,|b|)``; tokens that
are not numbers are compared as strings. The table lists name, occurrence, the values of A and B,
the largest relative difference and a status; the first variable beyond tolerance is marked
``<== FIRST``. Exit status: 0 when everything agrees, 1 when something differs (or is missing on
one side), 2 when a trace could not be produced (e.g. the C binary is not an instrumented build).

``--case``: the C side is produced by running ``$NB_C_BIN <args> [-trace_pixel S F]`` (only an
instrumented build prints TRACE_C lines), the nbsim side by ``python -m nbsim.nanobragg <args>``,
falling back to ``nbsim.frontend.argv.parse_argv`` + ``nbsim.trace.trace_lines`` in-process when the
front end is not available or prints no trace. Both run in scratch directories (input file arguments
are made absolute against ``--cwd``) so no output files land in the current directory.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

__all__ = ["TraceLine", "parse_trace", "diff_traces", "format_table", "first_difference",
           "pixel_block", "untraced_names", "mark_untraced", "main"]

_PREFIXES = ("TRACE_C", "TRACE_PY")
_NUM_RE = re.compile(r"^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)$", re.I)


@dataclass
class TraceLine:
    name: str
    tokens: List[object]            # float, or (label, float), or str
    raw: str
    lineno: int = 0


def _token(tok: str):
    t = tok.strip("[];,")
    if t and _NUM_RE.match(t):
        return float(t.replace("-nan", "nan"))
    if t.lower() == "-nan":
        return float("nan")
    if ":" in t:
        label, _, v = t.rpartition(":")
        if _NUM_RE.match(v):
            return (label, float(v))
    return tok


def parse_line(line: str, lineno: int = 0) -> Optional[TraceLine]:
    """One trace line -> TraceLine, or None for lines that are not comparable trace lines."""
    s = line.rstrip("\r\n")
    st = s.strip()
    if not st:
        return None
    if st.startswith("TRACE_CONFIG:"):
        return TraceLine("TRACE_CONFIG", [st[len("TRACE_CONFIG:"):].strip()], s, lineno)
    if st.startswith("DETECTOR_"):
        parts = st.split()
        return TraceLine(parts[0], [_token(t) for t in parts[1:]], s, lineno)
    for p in _PREFIXES:
        if st.startswith(p + ":"):
            body = st[len(p) + 1:]
            if body.startswith(" "):           # pixel format: "TRACE_C: name v v v"
                parts = body.split()
                if not parts:
                    return None
                return TraceLine(parts[0], [_token(t) for t in parts[1:]], s, lineno)
            name, eq, rest = body.partition("=")   # helper format: "TRACE_C:name=v v v"
            if not eq:
                parts = body.split()
                return TraceLine(parts[0], [_token(t) for t in parts[1:]], s, lineno) if parts else None
            return TraceLine(name.strip(), [_token(t) for t in rest.split()], s, lineno)
    return None


def parse_trace(lines) -> List[TraceLine]:
    """Comparable trace lines of a text (str, or iterable of lines)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out = []
    for i, ln in enumerate(lines, 1):
        t = parse_line(ln, i)
        if t is not None:
            out.append(t)
    return out


def pixel_block(lines) -> List[str]:
    """The pixel-level lines: from ``TRACE_CONFIG: tracing pixel`` on, ``TRACE_C: name ...`` only."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out, on = [], False
    for ln in lines:
        st = ln.strip()
        if st.startswith("TRACE_CONFIG: tracing pixel"):
            on = True
            continue
        if on and any(st.startswith(p + ": ") for p in _PREFIXES):
            out.append(ln.rstrip("\r\n"))
    return out


def _num(tok):
    if isinstance(tok, float):
        return tok
    if isinstance(tok, tuple):
        return tok[1]
    return None


def _compare(ta, tb, rtol, atol) -> Tuple[bool, float]:
    """(ok, max relative difference) of two token lists."""
    ok = len(ta) == len(tb)
    worst = 0.0 if ok else math.inf
    for a, b in zip(ta, tb):
        na, nb = _num(a), _num(b)
        if na is None or nb is None or (isinstance(a, tuple) != isinstance(b, tuple)) or (
                isinstance(a, tuple) and a[0] != b[0]):
            if str(a) != str(b):
                ok, worst = False, math.inf
            continue
        if math.isnan(na) or math.isnan(nb):
            if not (math.isnan(na) and math.isnan(nb)):
                ok, worst = False, math.inf
            continue
        if na == nb:
            continue
        diff = abs(na - nb)
        scale = max(abs(na), abs(nb))
        rel = diff / scale if scale > 0 else math.inf
        if math.isinf(diff):
            rel = math.inf
        worst = max(worst, rel)
        if not (diff <= atol or diff <= rtol * scale):
            ok = False
    return ok, worst


def _show(tokens) -> str:
    if tokens is None:
        return "-"
    parts = []
    for t in tokens:
        if isinstance(t, float):
            parts.append("%.15g" % t)
        elif isinstance(t, tuple):
            parts.append("%s:%.15g" % (t[0], t[1]))
        else:
            parts.append(str(t))
    return " ".join(parts)


def diff_traces(a_lines, b_lines, rtol: float = 1e-9, atol: float = 1e-12) -> List[dict]:
    """Pair same-named lines of two traces by occurrence and compare them.

    Returns one row per pair (A's order, then lines only B has): dict with keys
    ``name, occurrence, a, b`` (token lists or None), ``a_text, b_text, max_rel, ok, status``
    (``ok``, ``DIFF``, ``only in A``, ``only in B``) and ``first`` (True on the first failing row).
    """
    A, B = parse_trace(a_lines), parse_trace(b_lines)
    from collections import defaultdict
    bmap = defaultdict(list)
    for t in B:
        bmap[t.name].append(t)
    seen = defaultdict(int)
    used = set()
    rows = []
    for t in A:
        k = seen[t.name]
        seen[t.name] += 1
        cand = bmap.get(t.name, [])
        if k < len(cand):
            u = cand[k]
            used.add(id(u))
            ok, rel = _compare(t.tokens, u.tokens, rtol, atol)
            rows.append(dict(name=t.name, occurrence=k, a=t.tokens, b=u.tokens, a_text=_show(t.tokens),
                             b_text=_show(u.tokens), max_rel=rel, ok=ok,
                             status="ok" if ok else "DIFF", first=False))
        else:
            rows.append(dict(name=t.name, occurrence=k, a=t.tokens, b=None, a_text=_show(t.tokens),
                             b_text="-", max_rel=math.inf, ok=False, status="only in A", first=False))
    bseen = defaultdict(int)
    for u in B:
        k = bseen[u.name]
        bseen[u.name] += 1
        if id(u) not in used:
            rows.append(dict(name=u.name, occurrence=k, a=None, b=u.tokens, a_text="-",
                             b_text=_show(u.tokens), max_rel=math.inf, ok=False, status="only in B",
                             first=False))
    for r in rows:
        if not r["ok"]:
            r["first"] = True
            break
    return rows


def _pixel_names(lines) -> List[str]:
    """Names of the pixel-level lines (``TRACE_C: name ...``) of a trace, in order of appearance."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    names: List[str] = []
    for ln in lines:
        st = ln.strip()
        if any(st.startswith(p + ": ") for p in _PREFIXES):
            t = parse_line(st)
            if t is not None and t.name not in names:
                names.append(t.name)
    return names


def untraced_names(lines, reference=()) -> List[str]:
    """Pixel-level names that a full instrumented build prints for this pixel but ``lines`` never
    prints: those every traced pixel gets (``nbsim.trace.PIXEL_NAMES_ALWAYS``) and those of the
    ``reference`` trace of the same pixel (nbsim's) that the full build knows
    (``PIXEL_NAMES_CONDITIONAL``). Empty when ``lines`` has no pixel-level line at all (the pixel
    was not traced: outside the detector, ROI or mask). A non-empty answer means a partly
    instrumented build."""
    from nbsim.trace import PIXEL_NAMES_ALWAYS, PIXEL_NAMES_CONDITIONAL
    have = set(_pixel_names(lines))
    if not have:
        return []
    known = set(PIXEL_NAMES_CONDITIONAL)
    wanted = list(PIXEL_NAMES_ALWAYS) + [n for n in _pixel_names(reference) if n in known]
    return [n for n in dict.fromkeys(wanted) if n not in have]


def mark_untraced(rows, side: str, names) -> None:
    """Rows of ``names`` missing on ``side`` ("A" or "B") because that build does not print them:
    status ``not traced by A/B``, not counted as differences; ``first`` is recomputed."""
    names = set(names)
    for r in rows:
        if r["name"] in names and r["status"] == f"only in {'B' if side == 'A' else 'A'}":
            r.update(ok=True, status=f"not traced by {side}", max_rel=None)
    for r in rows:
        r["first"] = False
    for r in rows:
        if not r["ok"]:
            r["first"] = True
            break


def first_difference(rows) -> Optional[dict]:
    for r in rows:
        if r["first"]:
            return r
    return None


def format_table(rows, only_diff: bool = False, width: int = 60) -> str:
    def cut(s):
        return s if len(s) <= width else s[:width - 3] + "..."
    head = ("name", "occ", "A", "B", "max_rel", "status")
    body = []
    for r in rows:
        if only_diff and r["ok"]:
            continue
        rel = "-" if r["max_rel"] is None else ("inf" if math.isinf(r["max_rel"]) else "%.3g" % r["max_rel"])
        body.append((r["name"], str(r["occurrence"]), cut(r["a_text"]), cut(r["b_text"]), rel,
                     r["status"] + ("  <== FIRST" if r["first"] else "")))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt_row = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    lines = [fmt_row(head), fmt_row(["-" * w for w in widths])]
    lines += [fmt_row(b) for b in body]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# producing traces from a nanoBragg command line
# ---------------------------------------------------------------------------------------------

class TraceUnavailable(RuntimeError):
    """A side of the comparison produced no trace."""


def _with_pixel(args: List[str], pixel: Optional[Tuple[int, int]]) -> Tuple[List[str], Tuple[int, int]]:
    args = list(args)
    found = None
    for i, a in enumerate(args):
        if a == "-trace_pixel" and i + 2 < len(args):
            found = (int(float(args[i + 1])), int(float(args[i + 2])))
    if pixel is not None and found is None:
        args += ["-trace_pixel", str(pixel[0]), str(pixel[1])]
        found = tuple(pixel)
    if found is None:
        raise SystemExit("trace_diff: give -trace_pixel S F in the case or --pixel S F")
    return args, found


def _absolutize(args: List[str], base: Path) -> List[str]:
    """Make argv words that name existing files under ``base`` absolute (the runs use scratch dirs)."""
    out = []
    for a in args:
        if not a.startswith("-") and not _NUM_RE.match(a):
            p = Path(a)
            if not p.is_absolute() and (base / p).exists():
                a = str((base / p).resolve())
        out.append(a)
    return out


def c_trace(binary: str, args: List[str], timeout: float = 3600) -> List[str]:
    """Run the (instrumented) C program single-threaded in a scratch directory; its trace lines."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="nb_c_trace_") as tmp:
        try:
            proc = subprocess.run([binary] + list(args), cwd=tmp, env=env, capture_output=True,
                                  text=True, errors="replace", timeout=timeout)
        except OSError as e:
            raise TraceUnavailable(f"cannot run C binary {binary!r}: {e}") from None
    lines = proc.stdout.splitlines()
    if not any(ln.startswith(("TRACE_C", "TRACE_CONFIG:", "DETECTOR_PIX0_VECTOR")) for ln in lines):
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-5:])
        raise TraceUnavailable(
            f"the C binary {binary!r} printed no TRACE_C lines (exit {proc.returncode}): it is not an "
            "instrumented (-DTRACING, hoidn/nanoBragg golden_suite_generator) build, or the pixel is "
            "outside the ROI/mask." + (f"\nlast output:\n{tail}" if tail else ""))
    return [ln for ln in lines if parse_line(ln) is not None]


def nbsim_trace(args: List[str], pixel: Tuple[int, int], base: Path, timeout: float = 3600) -> List[str]:
    """nbsim's trace for the same command line: the front end if it prints one, else in-process."""
    import importlib.util
    if importlib.util.find_spec("nbsim.nanobragg") is not None:
        with tempfile.TemporaryDirectory(prefix="nb_py_trace_") as tmp:
            try:
                proc = subprocess.run([sys.executable, "-m", "nbsim.nanobragg"] + list(args), cwd=tmp,
                                      capture_output=True, text=True, errors="replace", timeout=timeout)
                lines = [ln for ln in proc.stdout.splitlines() if parse_line(ln) is not None]
                if any(ln.startswith("TRACE_C: ") for ln in lines):
                    return lines
            except (OSError, subprocess.TimeoutExpired):
                pass
    # in-process fallback: parse argv, build the model, trace the pixel (no image is rendered)
    from nbsim.experiment import build_model
    from nbsim.frontend.argv import parse_argv
    from nbsim.api import resolve_device
    from nbsim.trace import trace_lines
    parsed = parse_argv(args, cwd=str(base))
    tdev, tdtype, _ = resolve_device(parsed.device)
    model = build_model(parsed.spec, dtype=tdtype, device=tdev, base_dir=str(base))
    return trace_lines(model, pixel, spec=parsed.spec)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _read(path: str) -> List[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    return Path(path).read_text(errors="replace").splitlines()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.trace_diff",
                                 description="Compare two nanoBragg-style pixel traces line by line.")
    ap.add_argument("files", nargs="*", help="A.txt B.txt (A: reference, e.g. the C trace)")
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--atol", type=float, default=1e-12)
    ap.add_argument("--scope", choices=("all", "pixel"), default="all",
                    help="'pixel': compare only the pixel-level TRACE_C lines after TRACE_CONFIG")
    ap.add_argument("--only-diff", action="store_true", help="list only the rows that differ")
    ap.add_argument("--case", help="a nanoBragg argv (one string) to run on both sides instead of files")
    ap.add_argument("--c-cmd", default=None, help="instrumented C binary (default: $NB_C_BIN)")
    ap.add_argument("--pixel", type=int, nargs=2, metavar=("S", "F"),
                    help="pixel (slow fast) when the case has no -trace_pixel")
    ap.add_argument("--cwd", default=".", help="directory relative input files of --case are in")
    ap.add_argument("--save", default=None, help="with --case: write the two traces to PREFIX.c.txt/.nbsim.txt")
    opts = ap.parse_args(argv)

    if opts.case is not None:
        if opts.files:
            ap.error("give either --case or two files, not both")
        binary = opts.c_cmd or os.environ.get("NB_C_BIN")
        if not binary:
            print("trace_diff: --case needs the instrumented C binary: --c-cmd PATH or NB_C_BIN",
                  file=sys.stderr)
            return 2
        args, pixel = _with_pixel(shlex.split(opts.case), tuple(opts.pixel) if opts.pixel else None)
        base = Path(opts.cwd).resolve()
        args = _absolutize(args, base)
        try:
            a_lines = c_trace(binary, args)
        except TraceUnavailable as e:
            print(f"trace_diff: {e}", file=sys.stderr)
            return 2
        b_lines = nbsim_trace(args, pixel, base)
        if opts.save:
            Path(opts.save + ".c.txt").write_text("\n".join(a_lines) + "\n")
            Path(opts.save + ".nbsim.txt").write_text("\n".join(b_lines) + "\n")
        labels = ("C", "nbsim")
    else:
        if len(opts.files) != 2:
            ap.error("need two trace files (or --case)")
        a_lines, b_lines = _read(opts.files[0]), _read(opts.files[1])
        labels = tuple(opts.files)

    for lines, label in ((a_lines, labels[0]), (b_lines, labels[1])):
        if not parse_trace(lines):
            print(f"trace_diff: no trace lines in {label}", file=sys.stderr)
            return 2
    # a partly instrumented build lacks whole names: say so, and do not report them as differences
    partial = [(side, label, untraced_names(own, other)) for side, label, own, other in
               (("A", labels[0], a_lines, b_lines), ("B", labels[1], b_lines, a_lines))]
    partial = [(side, label, names) for side, label, names in partial if names]
    if opts.scope == "pixel":
        a_lines, b_lines = pixel_block(a_lines), pixel_block(b_lines)
        if not a_lines and not b_lines:
            print("neither trace has pixel-level lines (pixel outside the detector, ROI or mask?)")
            return 0
    rows = diff_traces(a_lines, b_lines, opts.rtol, opts.atol)
    for side, label, names in partial:
        mark_untraced(rows, side, names)
    print(f"A = {labels[0]}\nB = {labels[1]}\nrtol = {opts.rtol:g}, atol = {opts.atol:g}\n")
    for side, label, names in partial:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        print(f"trace_diff: {side} ({label}) is a partly instrumented build: it never prints {len(names)} "
              f"trace lines the full -DTRACING build prints ({shown}); those rows are marked "
              f"'not traced by {side}', not differences")
    print(format_table(rows, only_diff=opts.only_diff))
    bad = [r for r in rows if not r["ok"]]
    first = first_difference(rows)
    print()
    if first is None:
        print(f"all {len(rows)} trace lines agree")
        return 0
    print(f"{len(bad)} of {len(rows)} trace lines differ; first: {first['name']} "
          f"(occurrence {first['occurrence']}, {first['status']})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
