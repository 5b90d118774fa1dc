"""The multirun's render process, forked as ``python -m nbsim --multirun`` starts.

A light multirun (64 points of 256², 2-core machine) spent its first ~1.3 s one step after another
in one process: Python's and Hydra's start and the composition of the points (~0.5 s, no torch), and
``import torch`` with nbsim's render modules (~0.8 s). Only then could a second core help. Forked at
the very start, before anything heavy is imported, a render process imports torch and the render
modules on the other core while this one runs Hydra and composes; the ``nbsim_batch`` launcher
hands it the composed points (``Server.run``) and it runs them exactly as the launcher would have
(``pipeline.workers.run_groups``: checked and hashed first, shared with workers forked from it,
stored under ``<store.root>/<hash>/``), logging to stderr as the launcher's job logging says, and
sends back each point's ``(folder, reused, run)``. The launching process never imports torch.

Started only for a command that asks for a multirun on nbsim's own launcher, on a POSIX system
(``wanted``; ``NBSIM_PRESTART=0`` turns it off). The render process ends with the command: it reads
the end of its job pipe when the launcher does not use it (or at once, ``discard``, when the ``nbsim``
sweeper finds another launcher configured), and the kernel stops it when the
launching process dies first (Linux: ``PR_SET_PDEATHSIG``; its workers likewise when it dies). SIGTERM or Ctrl-C while it renders stop
it and its workers the way they stop the launcher (complete entries only), and the command then
ends as it would have.
"""
from __future__ import annotations

import atexit
import os
import pickle
import signal
import sys
import time
from typing import List, Optional, Sequence

from pipeline.proc import RENDER_MODULES, fork_supported

ENV = "NBSIM_PRESTART"
#: what the render process imports while the launching process starts Hydra (``pipeline.proc.preload``:
#: one that fails to import fails the job, which reports it)
PRELOAD = RENDER_MODULES + ("hydra.core.utils",)

#: after Ctrl-C, how long the launching process lets the render process stop by itself (it gets the
#: same SIGINT from the terminal) before it sends SIGTERM
CTRL_C_GRACE_S = 5.0

_server: Optional["Server"] = None


#: Hydra's options that print or run something else instead of the multirun (long forms, which
#: argparse also takes abbreviated and as ``--name=value``; short forms)
NO_RENDER_OPTIONS = ("help", "hydra-help", "version", "cfg", "info", "shell-completion", "run",
                     "experimental-rerun")
NO_RENDER_SHORT = ("-h", "-c", "-i", "-sc", "-r")


def _renders_nothing(arg: str) -> bool:
    if arg in NO_RENDER_SHORT:
        return True
    if arg.startswith("--") and len(arg) > 2:
        name = arg[2:].split("=", 1)[0]
        return any(opt.startswith(name) for opt in NO_RENDER_OPTIONS) and not "multirun".startswith(name)
    return False


def wanted(argv: Sequence[str]) -> bool:
    """Whether a command with arguments ``argv`` (without the program) should fork the render process:
    a multirun (``-m``/``--multirun``) on the default launcher, none of Hydra's options that print
    instead (``NO_RENDER_OPTIONS``), forking possible, not turned off."""
    if os.environ.get(ENV, "1") == "0" or not fork_supported():
        return False
    if not any(a in ("-m", "--multirun") for a in argv) or any(_renders_nothing(a) for a in argv):
        return False
    return not any(a.lstrip("+~").startswith("hydra/launcher=") for a in argv)


def start() -> None:
    """Fork the render process (once; nothing if the fork fails); the launcher takes it with ``take``,
    and a command that ends without taking it ends it (``discard``, at exit)."""
    global _server
    if _server is not None:
        return
    job_r, job_w = os.pipe()
    res_r, res_w = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:                                    # (no process to spare: all happens here)
        for fd in (job_r, job_w, res_r, res_w):
            os.close(fd)
        return
    if pid == 0:
        os.close(job_w)
        os.close(res_r)
        _serve(parent, job_r, res_w)                   # never returns
    os.close(job_r)
    os.close(res_w)
    _server = Server(pid, job_w, res_r)
    atexit.register(discard)


def take() -> Optional["Server"]:
    """The render process started with this command, if any and not taken yet (it serves one job)."""
    global _server
    server, _server = _server, None
    return server


def discard() -> None:
    """End the render process if it was started and not taken (a launcher other than ``nbsim_batch``
    runs the points): it reads the end of its job pipe and exits."""
    server = take()
    if server is not None:
        server.close()


class Server:
    """The launching process's end of the render process: one job, then it is gone."""

    def __init__(self, pid: int, job_w: int, res_r: int):
        self.pid, self._job_w, self._res_r = pid, job_w, res_r

    def run(self, groups: list, **kw) -> Optional[List[list]]:
        """``pipeline.workers.run_groups(groups, **kw)`` in the render process; its result, or its
        error raised here (a configuration error as the same one-line error); None if it ended before
        it took the job (the caller runs it)."""
        from pipeline.workers import child_failure, read_child
        try:
            try:
                with os.fdopen(self._job_w, "wb") as f:
                    pickle.dump({"groups": groups, "kw": kw}, f, protocol=pickle.HIGHEST_PROTOCOL)
            except BrokenPipeError:                    # it ended before it took the job
                self.close()
                return None
            doc = read_child(self._res_r, self.pid)
        except KeyboardInterrupt:                      # Ctrl-C reaches the whole process group: it
            self._stop(grace_s=CTRL_C_GRACE_S)         # stops by itself, or is stopped after a while
            raise
        except BaseException:                          # SIGTERM here: stop it too, then go on
            self._stop()
            raise
        failure = child_failure(doc, "render process")
        if failure is not None:
            raise failure
        return doc["ok"]

    def close(self) -> None:
        """No job: close both pipes, stop the render process (it may still be importing) and wait."""
        for fd in (self._job_w, self._res_r):
            try:
                os.close(fd)
            except OSError:                            # (closed already)
                pass
        self._stop()

    def _stop(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for the render process to end, then SIGTERM it (it stops its workers;
        entries stay complete) and wait for it."""
        deadline = time.monotonic() + grace_s
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(parent: int, job_r: int, res_w: int) -> None:
    """The render process (forked from ``parent``): import the render path, read one job, run it,
    send the outcome (``pipeline.workers.finish_child``); never returns."""
    from pipeline.proc import die_with_parent, exit_now, exit_on_sigterm, preload
    exit_on_sigterm()                                  # unwind: entries stay whole
    die_with_parent()
    if os.getppid() != parent:                         # the launching process is already gone
        exit_now(0)
    try:
        preload(PRELOAD)
        from pipeline.workers import finish_child
    except (KeyboardInterrupt, SystemExit):            # stopped while importing
        exit_now(0)
    # a worker forked from here must not hold the result pipe: the launcher reads it to its end
    os.register_at_fork(after_in_child=lambda: os.close(res_w))

    def work():
        with os.fdopen(job_r, "rb") as f:
            try:
                job = pickle.load(f)
            except EOFError:                           # the launcher did not need it
                exit_now(0)
        return _run_job(job)
    finish_child(work, res_w)


def _run_job(job: dict) -> list:
    """Set up logging as the launcher's job logging says, then ``run_groups``."""
    import logging

    from pipeline.workers import run_groups
    kw = dict(job["kw"])
    logging_cfg, verbose, quiet = kw.pop("logging"), kw.pop("verbose"), kw.pop("quiet")
    if logging_cfg is not None:
        from hydra.core.utils import configure_log
        from omegaconf import OmegaConf
        configure_log(OmegaConf.create(logging_cfg), verbose)
    log = logging.getLogger("nbsim")
    if quiet:
        log.setLevel(logging.WARNING)
    return run_groups(job["groups"], log=log.info, **kw)
