"""Process-level settings of nbsim's commands (``python -m nbsim``, ``python -m pipeline.sweep``):
how idle OpenMP threads wait and how freed memory is reused, set at start (``prepare_process``), and
ending without the interpreter's teardown.

``quiet_openmp``: idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` unless
the user set it; read once, when torch loads OpenMP, so it is set before torch is imported). On a
machine shared with other jobs, torch's spinning threads burn the cores that the other threads of
the same process need: the light sweep benchmark's 64 images in one process at 2 threads, load 3.3 on
the 2 cores, took 2.3 s and 13.2 s of simulation with the default policy and 1.6 s and 1.9 s passive
(measured back to back, alternating).

``reuse_freed_memory``: glibc's malloc hands every block above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) to a fresh ``mmap`` and returns it with ``munmap`` when freed, so each
intermediate tensor of an eager kernel (a 256² image at oversampling 2 in float64: 4 MiB) page-faults
its memory in again: half the system time of the light sweep's multirun (1.0 s → 0.5 s of system CPU,
3.8-4.3 s → 3.4-3.5 s wall, measured back to back with the equivalent ``MALLOC_*_`` variables). With
the thresholds below, freed blocks up to ``MMAP_THRESHOLD_BYTES`` are reused from the heap; the heap
keeps at most ``TRIM_THRESHOLD_BYTES`` of free memory at its top. glibc only (``mallopt``); elsewhere,
or when the user set ``MALLOC_MMAP_THRESHOLD_``, nothing is changed.

``exit_now``: once torch is imported, Python's own shutdown (some 190 000 objects and every module)
took 0.3-0.9 s on the 2-core machine, measured between a sweep batch's last write and its exit: a
fixed cost each sweep process paid after its work was done. ``exit_now`` flushes and closes the
logging handlers and stdout/stderr, then ends the process at once; a command's own process first
runs what a normal exit runs before its teardown (the thread-exit hooks, with which executors stop
their workers, and the ``atexit`` handlers). Every output of nbsim is complete
by then (each file and store entry appears by an atomic rename; the write threads are joined before
a point is stored). Only for command-line entry points, after success.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

OMP_WAIT_POLICY_DEFAULT = "PASSIVE"
#: glibc malloc settings of ``reuse_freed_memory`` (bytes)
MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 128 << 20
TOP_PAD_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3        # glibc's mallopt parameters


def quiet_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set; call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (``mallopt``) so that freed tensors are reused instead
    of unmapped; True if applied. Call early, before the work allocates."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES)))
    except (OSError, AttributeError):                # not glibc
        return False
    return ok


#: the modules a command that renders imports (``preload``): torch and nbsim's render path (the front
#: end), and the store's (the app, sweeps)
ENGINE_MODULES = ("torch", "nbsim.api", "nbsim.batch", "nbsim.engine", "nbsim.checks", "nbsim.experiment",
                  "nbsim.io.smv", "nbsim.io.products")
RENDER_MODULES = ENGINE_MODULES + ("pipeline.store", "pipeline.workers", "pipeline.preview")
_command = False                                     # prepare_process ran: this is one of nbsim's commands


def preload_render() -> None:
    """``preload(RENDER_MODULES)`` in one of nbsim's commands (``prepare_process`` ran) that has not
    imported torch yet and is about to render; elsewhere (a library caller, a test process) nothing."""
    if _command and "torch" not in sys.modules:
        preload(RENDER_MODULES)


def preload(names) -> None:
    """Import the modules ``names`` with the cyclic garbage collector paused, then freeze what they made
    (``gc.freeze``: later collections never scan it). Importing torch makes ~200 000 objects, and the
    collections this triggers on the way cost ~0.2 s on the 2-core machine (``python -c "import
    torch"``: 1.47-1.52 s, with ``gc.disable()`` first 1.28-1.32 s, measured back to back). A module
    that fails to import is skipped: its importer meets the error where it is used."""
    import gc
    import importlib
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:                          # noqa: BLE001 - reported where it is used
                pass
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


_exit_code = None          # set once SIGTERM asked this process to unwind


def _exit_once(signum, frame) -> None:
    """SIGTERM: unwind with ``SystemExit(128 + signum)``, ignoring any further SIGTERM while unwinding
    (a second one, e.g. a launcher forwarding what its whole process group got, would interrupt the
    clean-up of a half-built entry)."""
    global _exit_code
    signal.signal(signum, signal.SIG_IGN)
    _exit_code = 128 + signum
    sys.exit(_exit_code)


def _unraisable(info) -> None:
    """The ``SystemExit`` of ``_exit_once`` raised where Python cannot raise (a weakref callback, a
    ``__del__``: it printed "Exception ignored in ..." with a traceback and went on running) is
    delivered again, as a signal, at the next point where it can unwind; anything else is reported
    as usual."""
    exc = info.exc_value
    if isinstance(exc, SystemExit) and _exit_code is not None and exc.code == _exit_code:
        import threading
        signal.signal(signal.SIGTERM, _exit_once)
        # sent from another thread a moment later: a signal this thread sends itself runs its
        # handler at once, inside this hook, where SystemExit would be swallowed again
        threading.Timer(0.001, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return
    sys.__unraisablehook__(info)


def exit_on_sigterm():
    """Let SIGTERM (kill, a scheduler's time limit) unwind this process like Ctrl-C does, once
    (``_exit_once``); the previous handler, for ``signal.signal`` to restore."""
    sys.unraisablehook = _unraisable
    return signal.signal(signal.SIGTERM, _exit_once)


def fork_supported() -> bool:
    """Whether nbsim forks processes here: a POSIX ``fork`` that is not macOS's (whose system libraries
    are not safe to use in a forked child of a threaded process)."""
    return hasattr(os, "fork") and sys.platform != "darwin"


def die_with_parent() -> None:
    """SIGTERM to this (forked) process when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere
    nothing), so that it stops the way a SIGTERM stops it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGTERM))      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def prepare_process() -> None:
    """What a command-line entry point does first: ``quiet_openmp`` and ``reuse_freed_memory``; marks
    the process as a command (``preload_render``)."""
    global _command
    _command = True
    quiet_openmp()
    reuse_freed_memory()


def exit_now(code: int = 0, exit_handlers: bool = False) -> None:
    """Flush logging and stdio, then ``os._exit(code)`` (no module teardown). ``exit_handlers``: run
    the ``atexit`` handlers first, as a normal exit does (a command's own process: e.g. joblib stops
    its worker processes there, which otherwise keep the command's stdout open for minutes); never in
    a forked child, whose inherited handlers belong to its parent."""
    if exit_handlers:                                # what Python's own exit runs first:
        import atexit
        import threading
        threading._shutdown()                        # its thread-exit hooks (executors stop their
        atexit._run_exitfuncs()                      # workers), then the atexit handlers
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):                # closed or broken pipe: nothing more to say
            pass
    os._exit(int(code))
