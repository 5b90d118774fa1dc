"""Process-level settings of nbsim's commands (``python -m nbsim``, ``python -m pipeline.sweep``):
how idle OpenMP threads wait, set at start, and ending without the interpreter's teardown.

``quiet_openmp``: idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` unless
the user set it; read once, when torch loads OpenMP, so it is set before torch is imported). On a
machine shared with other jobs, torch's spinning threads burn the cores that the other threads of
the same process need: the light sweep benchmark's 64 images in one process at 2 threads, load 3.3 on
the 2 cores, took 2.3 s and 13.2 s of simulation with the default policy and 1.6 s and 1.9 s passive
(measured back to back, alternating).

``exit_now``: once torch is imported, Python's own shutdown (some 190 000 objects and every module)
took 0.3-0.9 s on the 2-core machine, measured between a sweep batch's last write and its exit: a
fixed cost each sweep process paid after its work was done. ``exit_now`` flushes and closes the
logging handlers and stdout/stderr, then ends the process at once. Every output of nbsim is complete
by then (each file and store entry appears by an atomic rename; the write threads are joined before
a point is stored). Only for command-line entry points, after success.
"""
from __future__ import annotations

import logging
import os
import sys

OMP_WAIT_POLICY_DEFAULT = "PASSIVE"


def quiet_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set; call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)


def exit_now(code: int = 0) -> None:
    """Flush logging and stdio, then ``os._exit(code)`` (no atexit handlers, no module teardown)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):                # closed or broken pipe: nothing more to say
            pass
    os._exit(int(code))
