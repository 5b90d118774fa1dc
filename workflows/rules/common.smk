# Shared settings of the nbsim rules.
import shlex
import sys
from pathlib import Path

PY = shlex.quote(sys.executable)        # the interpreter running Snakemake (also inside SLURM jobs)
REPO = Path(workflow.basedir).resolve().parent   # the nbsim checkout (the workdir may be elsewhere)
STORE = config.get("store_root", "outputs")
LOGS = f"{STORE}/logs"


def workflow_error(msg):
    from snakemake.exceptions import WorkflowError
    return WorkflowError(msg)


def parity_reference_or_stop(parity_cfg, code_files):
    """Input of the parity jobs (nbsim's code); stops with instructions when there is neither a
    C program ($NB_C_BIN) nor golden data."""
    import pipeline.c_runner

    if parity_cfg.get("golden") is None and pipeline.c_runner.find_binary() is None:
        raise workflow_error(pipeline.c_runner.HOW_TO_PROVIDE)
    return code_files


def stop_rescheduling_timers():
    """Cancel the timers of Snakemake's job-rate limiter once the workflow is done: each scheduling
    round leaves a non-daemon ``threading.Timer`` (``--max-jobs-per-timespan``, default 100/1s)
    behind, and the finished process waited for the last one, up to 1 s of every run (seen at
    shutdown; the light benchmark sweep took 5.0-5.2 s in all)."""
    import threading

    for t in threading.enumerate():
        fn = getattr(t, "function", None)
        if isinstance(t, threading.Timer) and "_schedule_reevalutation" in getattr(fn, "__qualname__", ""):
            t.cancel()


def exit_without_teardown_after_success():
    """Once Snakemake's command line ends a successful run (``sys.exit(0)``), run every exit handler
    (logging, executor plugins) and leave without the interpreter's teardown of Snakemake's process:
    freeing its modules and objects took 0.4 s of every run (measured between the last exit handler
    and the end of the process: 0.42 s, 10 % of the light benchmark sweep). Only for the
    ``snakemake`` command (not Snakemake called from Python), and only on success: a failure exits
    as Snakemake decides."""
    import atexit

    argv0 = Path(sys.argv[0] or "")
    if not (argv0.name == "snakemake" or argv0.parent.name == "snakemake"):
        return
    real_exit = sys.exit

    def finish():
        from pipeline.proc import exit_now
        atexit.unregister(finish)
        exit_now(0, exit_handlers=True)        # every other exit handler, as a normal exit runs them

    def exit_(code=0):
        if code in (0, None):
            atexit.register(finish)
        real_exit(code)

    sys.exit = exit_


onsuccess:
    stop_rescheduling_timers()
    exit_without_teardown_after_success()


onerror:
    stop_rescheduling_timers()
