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


onsuccess:
    stop_rescheduling_timers()


onerror:
    stop_rescheduling_timers()
