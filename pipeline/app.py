"""The Hydra app behind ``python -m nbsim``: compose -> validate -> run or reuse -> print the folder.

stdout carries only the result folder (``dir=$(python -m nbsim ...)`` works); everything else goes
through Python's logging to stderr (``conf/hydra/job_logging/stderr.yaml``): what was reused or
computed, warnings, and a progress bar for long runs (``nbsim.progress``). ``quiet=true`` leaves
only errors; ``hydra.verbose=nbsim`` adds debug lines.

Every configuration error ends as one line on stderr (``nbsim: error: <key>: <what is accepted>``)
and exit status 2; set HYDRA_FULL_ERROR=1 to get the full traceback instead.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.compose import CONF_DIR, cfg_to_spec, format_error  # also registers schema + resolver
from pipeline.proc import exit_on_sigterm, preload_render
from pipeline.store import run_or_reuse, store_options

log = logging.getLogger("nbsim")
_state: dict = {}


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def say_folder(path: Path) -> None:
    """The result folder on stdout, one line in one write: processes of a parallel launcher share
    the stream, and ``print`` writes the text and its newline apart (seen interleaved as
    "s/As/B\\n\\n" under joblib)."""
    sys.stdout.write(f"{_shown(path)}\n")
    sys.stdout.flush()


_FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
_user_wants_traceback = os.environ.get(_FULL_ERROR_ENV) == "1"


def fail_on_config_error(exc: BaseException, prog: str = "nbsim", composing: bool = False) -> None:
    """Exit 2 with one line ``PROG: error: ...`` if ``exc`` is a configuration error; return if not.

    ``composing``: raised by Hydra before the task ran (composition, override syntax): always a
    problem of the command line, reported by its first line even if ``format_error`` does not know it.
    """
    if _user_wants_traceback:
        return
    message = format_error(exc)
    if message is None and composing:
        message = format_error(exc, fallback=True)
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def run_task(body, cfg: DictConfig, prog: str = "nbsim"):
    """``body(cfg)`` inside a Hydra task: configuration errors are reported by us in one line (Hydra
    would add "Error executing job with overrides: [...]"); anything else is a real bug, marked so
    that ``run_app`` keeps its traceback."""
    try:
        return body(cfg)
    except Exception as exc:                        # noqa: BLE001 - non-config errors re-raised
        fail_on_config_error(exc, prog)
        exc.nbsim_in_task = True
        raise


def run_app(task, prog: str) -> None:
    """Run the ``@hydra.main`` function ``task`` as a command: composition errors in one line and
    exit 2, Ctrl-C and SIGTERM (kill, SLURM time limit) unwind so a half-built entry is removed
    (exit 130 / 128+signal), ``HYDRA_FULL_ERROR=1`` from the user keeps full tracebacks."""
    global _user_wants_traceback
    saved = os.environ.get(_FULL_ERROR_ENV)
    _user_wants_traceback = saved == "1"
    os.environ[_FULL_ERROR_ENV] = "1"               # composition errors reach us, not Hydra's printer
    old_term = exit_on_sigterm()
    try:
        task()
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted; " + ("the points stored so far are complete"
                                          if getattr(exc, "nbsim_multirun", False)
                                          else "nothing was stored for this run"), file=sys.stderr)
        sys.exit(130)
    except Exception as exc:                        # noqa: BLE001 - non-config errors re-raised
        fail_on_config_error(exc, prog, composing=not getattr(exc, "nbsim_in_task", False))
        raise                                       # a real bug: full traceback
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if saved is None:
            os.environ.pop(_FULL_ERROR_ENV, None)
        else:
            os.environ[_FULL_ERROR_ENV] = saved


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> str:
    return run_task(_task, cfg)


def _sweep_thumb():
    """A point of a multirun (any launcher) stores a thumbnail preview, as the batch launcher does."""
    from hydra.types import RunMode

    from pipeline.preview import SWEEP_THUMB_PX
    return SWEEP_THUMB_PX if HydraConfig.get().mode == RunMode.MULTIRUN else None


def log_computed(folder: Path, run: dict, total: Optional[float] = None) -> None:
    """Log a computed result: its warnings, then ``computed <folder> (config hash <h>): simulation
    <s> s on <device> (<dtype>, <kernel> kernel)`` (``, total <s> s`` when ``total`` is given), from its
    ``run.json`` ``run`` (the app and the batch launcher both)."""
    for w in run.get("warnings", []):
        log.warning(f"warning: {w}")
    kernel = (run.get("info") or {}).get("kernel") or "unknown"
    log.info(f"computed {_shown(folder)} (config hash {run['hash']}): simulation {run['wall_time_s']:.2f} s "
             f"on {run.get('device')} ({run.get('dtype')}, {kernel} kernel)"
             + ("" if total is None else f", total {total:.2f} s"))


def _task(cfg: DictConfig) -> str:
    from pipeline import prestart
    prestart.discard()                              # a point computed here: no render process needed
    t0 = time.perf_counter()
    spec, device = cfg_to_spec(cfg)
    quiet = bool(cfg.get("quiet", False))
    if quiet:
        log.setLevel(logging.WARNING)
        _state["quieted"] = True
    elif _state.pop("quieted", False):              # an earlier in-process run was quiet
        log.setLevel(logging.NOTSET)
    if log.isEnabledFor(logging.DEBUG):             # hydra.verbose=nbsim
        from nbsim.spec import spec_to_dict
        log.debug(f"resolved experiment: {spec_to_dict(spec)}; device: {spec_to_dict(device)}")
    base_dir = HydraConfig.get().runtime.cwd        # where nbsim was started, even if Hydra chdir'ed
    preload_render()                                # (the checks before a reuse need torch too)
    folder, reused, run = run_or_reuse(spec, device, **store_options(cfg.store), base_dir=base_dir,
                                       log=log.info, progress=False if quiet else None, thumb=_sweep_thumb())
    total = time.perf_counter() - t0
    if reused:
        log.info(f"simulated earlier in {run.get('wall_time_s', float('nan')):.2f} s "
                 f"({run.get('device')}, {run.get('dtype')}); nothing computed, {total:.2f} s")
    else:
        log_computed(folder, run, total)
    say_folder(folder)                              # stdout: the result folder, nothing else
    return str(folder)


def main() -> None:
    """Console entry point (``nbsim`` / ``python -m nbsim``)."""
    run_app(task, "nbsim")


if __name__ == "__main__":
    main()
