"""``pipeline.store.run_many`` over several worker processes forked from this one (CPU sweeps).

A sweep point of a small image costs as much in Python (composition, checks, the model's setup,
statistics, the writes: ~10 ms, bound by the interpreter lock) as in its kernel, so threads cannot
use a second core for it; processes can. Started anew, each would pay Python's and torch's start
(~1.3 s on the 2-core machine this was measured on); forked from a process that has imported
everything and composed every point, a worker starts in about a millisecond. This is what the
``nbsim_batch`` Hydra launcher runs a multirun with (``hydra.launcher.processes``).

Each process takes every ``processes``-th point (kernel shapes alternate in a grid, so the shares
cost alike) and runs ``run_many`` on it with ``threads // processes`` torch threads; results come back
through a pipe as JSON (the run documents are JSON already). Every point is stored exactly as
``run_many`` stores it, under its entry lock, so the workers and any other process share one store
safely; an interrupted run leaves complete entries only.

Forking is used only where it is safe: a POSIX system, every point on the CPU, CUDA not initialised.
Otherwise, and for a single process or point, this is ``run_many``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from nbsim.spec import SpecError

#: points a worker should have at least for ``processes="auto"`` to fork it
MIN_POINTS_PER_PROCESS = 4


def can_fork(items: Sequence) -> bool:
    """Whether forking workers is safe for these ``(spec, device)`` items."""
    if not hasattr(os, "fork") or sys.platform == "darwin":
        return False
    if any(not str(d.device).startswith("cpu") for _, d in items):
        return False
    import torch
    return not (torch.cuda.is_available() and torch.cuda.is_initialized())


def resolve_processes(processes, n_points: int, threads: int) -> int:
    """The number of processes for ``n_points`` points: ``processes`` as given (an int ≥ 1), or for
    ``"auto"``/None one per torch thread, at most one per ``MIN_POINTS_PER_PROCESS`` points."""
    if processes in (None, "auto"):
        return max(1, min(threads, n_points // MIN_POINTS_PER_PROCESS))
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise SpecError("hydra.launcher.processes", f"must be a whole number ≥ 1 or auto; got {processes!r}")
    return processes


def _encode(got) -> list:
    return [[str(folder), bool(reused), run] for folder, reused, run in got]


def _child(items, share, threads: int, wfd: int, kw: dict) -> None:
    """A forked worker: ``run_many`` on its share, the outcome written to ``wfd``; never returns."""
    code = 0
    try:
        import torch
        torch.set_num_threads(threads)
        from pipeline.store import run_many
        doc = {"ok": _encode(run_many([items[i] for i in share], **kw))}
    except SpecError as e:
        doc = {"spec_error": [e.key, str(e)]}
    except BaseException as e:                           # noqa: BLE001 - reported by the parent
        traceback.print_exc()
        doc = {"error": f"{type(e).__name__}: {e}"}
        code = 1
    try:
        with os.fdopen(wfd, "w") as f:
            json.dump(doc, f)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)                                   # no interpreter teardown, no parent's atexit


def run_many_processes(items, processes=1, **kw) -> list:
    """``pipeline.store.run_many(items, **kw)`` with the points shared among ``processes`` processes
    (this one and ``processes − 1`` forked workers; ``resolve_processes``), where ``can_fork``.
    ``[(folder, reused, run_json)]`` in the order of ``items``; the first configuration error of any
    point is raised after every point ran, as ``run_many`` does."""
    import torch

    from pipeline.store import run_many
    threads = torch.get_num_threads()
    n = resolve_processes(processes, len(items), threads)
    if n <= 1 or len(items) < 2 or not can_fork(items):
        return run_many(items, **kw)
    n = min(n, len(items))
    shares = [list(range(p, len(items), n)) for p in range(n)]
    per = max(1, threads // n)
    sys.stdout.flush()
    sys.stderr.flush()
    children = []
    try:
        for p in range(1, n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                                  # the worker
                os.close(r)
                _child(items, shares[p], per, w, kw)
            os.close(w)
            children.append((p, pid, r))
        torch.set_num_threads(per)
        mine: Optional[list] = None
        error: Optional[BaseException] = None
        try:
            mine = run_many([items[i] for i in shares[0]], **kw)
        except SpecError as e:
            error = e
    finally:
        torch.set_num_threads(threads)
        docs = {}
        for p, pid, r in children:                       # every worker is waited for
            with os.fdopen(r) as f:
                text = f.read()
            _, status = os.waitpid(pid, 0)
            docs[p] = (json.loads(text) if text else {"error": f"worker {pid} ended without a result "
                                                                f"(wait status {status})"})
    out: List = [None] * len(items)
    for i, res in zip(shares[0], mine or []):
        out[i] = res
    for p, doc in sorted(docs.items()):
        if "error" in doc:
            raise RuntimeError(f"sweep worker process: {doc['error']}")
        if "spec_error" in doc:
            key, msg = doc["spec_error"]
            error = error or SpecError(key, msg[len(key) + 2:] if msg.startswith(key + ": ") else msg)
            continue
        for i, (folder, reused, run) in zip(shares[p], doc["ok"]):
            out[i] = (Path(folder), reused, run)
    if error is not None:
        raise error
    return out
