"""``pipeline.store.run_many`` over several worker processes forked from this one (CPU sweeps).

A sweep point of a small image costs as much in Python (composition, checks, the model's setup,
statistics, the writes: ~10 ms, bound by the interpreter lock) as in its kernel, so threads cannot
use a second core for it; processes can. Started anew, each would pay Python's and torch's start
(~1.3 s on the 2-core machine this was measured on); forked from a process that has imported
everything and composed every point, a worker starts in about a millisecond. This is what the
``nbsim_batch`` Hydra launcher runs a multirun with (``hydra.launcher.processes``).

Every point is checked and hashed in this process first (a configuration error stops the run before
anything is simulated, in one line). Each process then takes every ``processes``-th point (kernel
shapes alternate in a grid, so the shares cost alike) and runs ``run_many`` on it with one torch
thread (GNU OpenMP does not survive a fork: a team of several threads in a worker would wait for
threads that exist only in the parent); results come back through a pipe, pickled (``finish_child``,
``read_child``, ``child_failure``: the multirun's render process, ``pipeline.prestart``, ends the
same way). Every point is stored exactly as
``run_many`` stores it, under its entry lock, so the workers and any other process share one store
safely; an interrupted run (Ctrl-C, SIGTERM: the workers are stopped too) leaves complete entries only.

Forking is used only where it is safe: a POSIX system, every point on the CPU, CUDA not initialised.
Otherwise, and for a single process or point, this is ``run_many``.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import List, Optional, Sequence

from nbsim.spec import SpecError

#: points a worker should have at least for ``processes="auto"`` to fork it
MIN_POINTS_PER_PROCESS = 4


def can_fork(items: Sequence) -> bool:
    """Whether forking workers is safe for these ``(spec, device)`` items."""
    from pipeline.proc import fork_supported
    if not fork_supported():
        return False
    if any(not str(d.device).startswith("cpu") for _, d in items):
        return False
    import torch
    return not torch.cuda.is_initialized()              # (asking is_available() could start the driver)


def resolve_processes(processes, n_points: int, threads: int) -> int:
    """The number of processes for ``n_points`` points: ``processes`` as given (an int ≥ 1), or for
    ``"auto"``/None one per torch thread, at most one per ``MIN_POINTS_PER_PROCESS`` points."""
    if processes in (None, "auto"):
        return max(1, min(threads, n_points // MIN_POINTS_PER_PROCESS))
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise SpecError("hydra.launcher.processes", f"must be a whole number ≥ 1 or auto; got {processes!r}")
    return processes


def _config_error_doc(e: BaseException) -> Optional[list]:
    """``[type name, message]`` of a configuration error (one line for the user), else None."""
    from nbsim.io.inputs import InputFileError
    if isinstance(e, SpecError):
        return ["SpecError", e.key, str(e)]
    if isinstance(e, InputFileError):
        return ["InputFileError", "", str(e)]
    return None


def _config_error_from(doc: list):
    from nbsim.io.inputs import InputFileError
    kind, key, msg = doc
    if kind == "SpecError":
        return SpecError(key, msg[len(key) + 2:] if msg.startswith(key + ": ") else msg)
    return InputFileError(msg)


def finish_child(work, wfd: int) -> None:
    """The end of a process forked by nbsim (a worker, the multirun's render process): ``work()``'s
    outcome as a document, pickled to ``wfd`` (``child_failure`` reads it), then ``exit_now``; never
    returns. ``{"ok": result}``; ``{"stopped": exit status}`` after Ctrl-C or SIGTERM (the parent
    reports it); ``{"config_error": ...}`` (a ``SpecError`` or ``InputFileError``); ``{"error": text}`` for anything
    else, its traceback printed here."""
    import pickle

    from pipeline.proc import exit_now
    code = 0
    try:
        doc = {"ok": work()}
    except (KeyboardInterrupt, SystemExit) as e:         # Ctrl-C / SIGTERM: the parent reports it
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        doc = {"stopped": code}
    except BaseException as e:                           # noqa: BLE001 - reported by the parent
        err = _config_error_doc(e)
        if err is None:
            traceback.print_exc()
            code = 1
        doc = {"config_error": err} if err else {"error": f"{type(e).__name__}: {e}"}
    try:
        with os.fdopen(wfd, "wb") as f:
            pickle.dump(doc, f, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:                                # noqa: BLE001 - the parent sees no result
        code = code or 1
    finally:
        exit_now(code)                                   # no interpreter teardown, no parent's atexit


def read_child(rfd: int, pid: int) -> dict:
    """The document ``finish_child`` wrote to the pipe ``rfd`` of the forked process ``pid``, after
    waiting for the process to end; an ``error`` document saying how it ended when it wrote none."""
    import pickle
    import signal
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        return pickle.loads(data)
    except Exception:                                    # noqa: BLE001 - no (whole) document
        pass
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        how = f"was killed by {sig.name}" + (" (out of memory?)" if sig == signal.SIGKILL else "")
    else:
        how = f"ended with status {os.WEXITSTATUS(status)}"
    return {"error": f"process {pid} {how} before it sent a result"}


def child_failure(doc: dict, what: str) -> Optional[BaseException]:
    """What a child's document (``finish_child``) raises in its parent: the configuration error as the
    same one-line error, KeyboardInterrupt for a stopped child, RuntimeError naming ``what``; None
    for a result."""
    if "config_error" in doc:
        return _config_error_from(doc["config_error"])
    if "stopped" in doc:
        return KeyboardInterrupt()
    if "error" in doc:
        return RuntimeError(f"{what}: {doc['error']}")
    return None


def _child(items, plans, share, wfd: int, kw: dict) -> None:
    """A forked worker: ``run_many`` on its share with one torch thread (GNU OpenMP does not survive
    a fork: a team of more threads would wait for threads that exist only in the parent), the
    outcome written to ``wfd`` (``finish_child``); never returns."""
    from pipeline.proc import die_with_parent, exit_on_sigterm
    exit_on_sigterm()                                    # unwind: entries stay whole
    die_with_parent()

    def work():
        import torch
        torch.set_num_threads(1)
        from pipeline.store import run_many
        return run_many([items[i] for i in share], plans=[plans[i] for i in share], **kw)
    finish_child(work, wfd)


def _stop(children) -> None:
    """Ask the workers to stop (they finish the entry they are writing: entries stay complete)."""
    import signal
    for _, pid, _ in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _collect(children) -> dict:
    """Each worker's result document, after waiting for every one of them."""
    return {p: read_child(r, pid) for p, pid, r in children}


def run_groups(groups: Sequence, processes="auto", where: str = "in this process", log=print,
               **kw) -> List[list]:
    """The points of a multirun: ``run_many_processes(items, n, log=log, **options, **kw)`` for each
    ``(options, items)`` of ``groups`` (points sharing their store options), ``n`` resolved once for all
    the points (``resolve_processes``); logs how many points run ``where``. The results, group by group."""
    import torch
    total = sum(len(items) for _, items in groups)
    nproc = resolve_processes(processes, total, torch.get_num_threads())
    log(f"multirun: {total} points {where} (nbsim_batch launcher"
        + (f", up to {nproc} processes)" if nproc > 1 else ")"))
    return [run_many_processes(list(items), nproc, log=log, **dict(opts), **kw) for opts, items in groups]


def run_many_processes(items, processes=1, **kw) -> list:
    """``pipeline.store.run_many(items, **kw)`` with the points shared among ``processes`` processes
    (``resolve_processes``: this one and forked workers, one torch thread each), where ``can_fork``.
    Every point is checked and hashed here first (``plan_point``), so a configuration error stops the
    run before anything is simulated, as ``run_many`` does; an error while rendering or storing is
    raised after every point ran. ``[(folder, reused, run_json)]`` in the order of ``items``."""
    import torch

    from pipeline.store import plan_point, run_many
    threads = torch.get_num_threads()
    n = min(resolve_processes(processes, len(items), threads), len(items))
    if n <= 1 or not can_fork(items):
        return run_many(items, **kw)
    pkw = {k: kw[k] for k in ("write_noise", "write_pgm", "formats", "nexus_dtype", "nexus_compression")
           if k in kw}
    base_dir = kw.get("base_dir", ".")
    plans = [plan_point(spec, device, base_dir, **pkw) for spec, device in items]
    shares = [list(range(p, len(items), n)) for p in range(n)]
    sys.stdout.flush()
    sys.stderr.flush()
    children, mine, error = [], None, None
    try:
        for p in range(1, n):
            r, w = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(r)
                os.close(w)
                raise
            if pid == 0:                                  # the worker
                os.close(r)
                _child(items, plans, shares[p], w, kw)
            os.close(w)
            children.append((p, pid, r))
        torch.set_num_threads(1)
        try:
            mine = run_many([items[i] for i in shares[0]], plans=[plans[i] for i in shares[0]], **kw)
        except SpecError as e:                            # after all its points ran: the others go on
            error = e
    except BaseException:
        _stop(children)
        raise
    finally:
        torch.set_num_threads(threads)
        docs = _collect(children)                         # every worker is waited for
    out: List = [None] * len(items)
    for i, res in zip(shares[0], mine or []):
        out[i] = res
    for p, doc in sorted(docs.items()):
        failure = child_failure(doc, "sweep worker process")
        if "config_error" in doc:                         # after every point ran, as run_many
            error = error or failure
        elif failure is not None:
            raise failure
        else:
            for i, res in zip(shares[p], doc["ok"]):
                out[i] = res
    if error is not None:
        raise error
    return out
