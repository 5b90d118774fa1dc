"""The ``nbsim_batch`` Hydra launcher: a multirun in one process, points rendered in groups.

Hydra's basic launcher composes every job's config through its config loader, sets up logging, makes
a job folder and calls the task once per point (~0.3 s a point of nbsim's light grid, measured);
this launcher runs all points through ``pipeline.launcher.launch_points`` (fast composition, one
``pipeline.store.run_many``: checks and hashes first, stored points reused, the others rendered by
``nbsim.batch`` and stored one by one). Hydra finds the class here (plugins must live in the
``hydra_plugins`` namespace); the work is done in ``pipeline.launcher``.

The ``nbsim`` sweeper (``hydra/sweeper=nbsim``, the default of ``python -m nbsim``) is Hydra's basic
sweeper (same expansion of ``a=1,2 b=3,4``, same batches) except that, in front of the ``nbsim_batch``
launcher, it leaves out Hydra's check that every point composes (``validate_batch_is_legal``: one full
Hydra composition a point, ~0.1 s each, 6.6 s of a 64-point multirun measured): that launcher composes
and checks every point itself, in this process, before anything is simulated, and reports an error the
same way. In front of any other launcher (points composed in other processes) it validates as Hydra does.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper


@dataclass
class NbsimBatchLauncherConf:
    _target_: str = "hydra_plugins.nbsim_launcher.nbsim_launcher.NbsimBatchLauncher"
    thumb: Optional[int] = 200      # preview.png of each point: a thumbnail of at most this many pixels a side (null: full size)
    # processes sharing the points (pipeline.workers: this one and forked workers, CPU only);
    # auto: one per torch thread, at most one per 4 points; 1: everything in this process
    processes: Any = "auto"


ConfigStore.instance().store(group="hydra/launcher", name="nbsim_batch", node=NbsimBatchLauncherConf,
                             provider="nbsim")


class NbsimBatchLauncher(Launcher):
    def __init__(self, thumb: Optional[int] = 200, processes: Any = "auto") -> None:
        self.thumb = thumb
        self.processes = processes
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from pipeline.launcher import launch_points
        try:
            return launch_points(self.config, job_overrides, initial_job_idx, thumb=self.thumb,
                                 processes=self.processes)
        except KeyboardInterrupt as e:
            e.nbsim_multirun = True             # the app says: the points stored so far are complete
            raise
        except Exception as e:                  # noqa: BLE001 - re-raised
            from pipeline.compose import format_error
            if format_error(e) is None:         # not a configuration error: a failure of the run,
                e.nbsim_in_task = True          # reported with its traceback (pipeline.app.run_app)
            raise


@dataclass
class NbsimSweeperConf:
    _target_: str = "hydra_plugins.nbsim_launcher.nbsim_launcher.NbsimSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="nbsim", node=NbsimSweeperConf, provider="nbsim")


class NbsimSweeper(Sweeper):
    """Hydra's basic sweeper; in front of ``NbsimBatchLauncher`` without the per-point composition
    check (the launcher composes and checks every point before simulating any).

    It wraps a ``BasicSweeper`` made when it is made rather than subclassing it: Hydra's plugin scan
    executes the modules of its core plugins again, so a subclass defined at import time can hold
    another copy of ``BasicSweeper`` than the one Hydra runs (an editable install run outside the
    checkout; the launcher's class can come from two copies of this module for the same reason, so
    it is recognised by name)."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        self.basic = BasicSweeper(max_batch_size=max_batch_size, params=params)
        check = self.basic.validate_batch_is_legal

        def validate_batch_is_legal(batch: Sequence[Sequence[str]]) -> None:
            if type(self.basic.launcher).__name__ != NbsimBatchLauncher.__name__:
                check(batch)
        self.basic.validate_batch_is_legal = validate_batch_is_legal

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if type(self.basic.launcher).__name__ != NbsimBatchLauncher.__name__:
            from pipeline import prestart
            prestart.discard()                  # its render process is not needed: the points run elsewhere

    def sweep(self, arguments):
        return self.basic.sweep(arguments)
