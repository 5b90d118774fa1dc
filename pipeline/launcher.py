"""The work of nbsim's Hydra launcher (``hydra_plugins.nbsim_launcher``, ``hydra/launcher=nbsim_batch``,
the default launcher of ``python -m nbsim --multirun``).

``launch_points`` takes the override lists of a multirun (Hydra's sweeper expands ``a=1,2 b=3,4``) and
computes every point in this process: each override list is composed by ``pipeline.sweep.Composer``
(Hydra composes once per distinct set of config-group choices, ~8 ms a point instead of ~60 ms),
checked and hashed; stored points are reused; the others are rendered by ``nbsim.batch`` (groups of
equal kernel shapes, a compiled kernel built once per group under ``device.compile``) and stored in
``<store.root>/<hash>/`` one by one, exactly the entries ``python -m nbsim`` stores. The rendering
happens in the render process that ``python -m nbsim --multirun`` forked as it started (``pipeline.prestart``:
it imported torch while this process started Hydra and composed), or in this process when there is
none (``NBSIM_PRESTART=0``, Hydra's Python API); on the CPU the points are shared with worker
processes forked from the one that renders (``pipeline.workers``, ``hydra.launcher.processes``: auto,
one per torch thread). As the app does,
stdout carries one result folder per point (in the order of the points) and stderr the log lines.
Nothing is written under ``hydra.sweep.dir``: there is no per-job folder, logging set-up or config
dump. A configuration error of any point stops the multirun before anything is simulated (one line,
exit 2, as the app).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence

from pipeline.preview import SWEEP_THUMB_PX

log = logging.getLogger("nbsim")


def _app_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides that configure the experiment (Hydra's own, ``hydra.*`` / ``hydra/...``, left out)."""
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra")]


def launch_points(config, job_overrides: Sequence[Sequence[str]], initial_job_idx: int = 0,
                  thumb: Optional[int] = SWEEP_THUMB_PX, processes="auto"):
    """Compute the points ``job_overrides``: composed here, rendered in the render process forked as the
    command started (``pipeline.prestart``) or else in this process (and, CPU only, ``processes − 1``
    workers forked from it: ``pipeline.workers.run_groups``); Hydra ``JobReturn``s in their order."""
    from hydra.core.utils import JobReturn, JobStatus, configure_log

    from pipeline.app import _shown, log_computed, say_folder
    from pipeline.store import store_options
    from pipeline.sweep import Composer
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from pipeline import prestart
    from pipeline.workers import run_groups

    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    configure_log(config.hydra.job_logging, config.hydra.verbose)
    HydraConfig.instance().set_config(config)
    base_dir = Path(config.hydra.runtime.cwd)
    t0 = time.perf_counter()
    composer = Composer()
    items, groups = [], {}
    for k, ovr in enumerate(job_overrides):
        spec, device, st, quiet = composer.resolve(_app_overrides(ovr))
        groups.setdefault((tuple(store_options(st).items()), quiet), []).append(k)
        items.append((spec, device))
    quiet = all(key[-1] for key in groups)
    if quiet:
        log.setLevel(logging.WARNING)
    batches = [(dict(opts), [items[k] for k in idx]) for (opts, _), idx in groups.items()]
    kw = dict(processes=processes, base_dir=base_dir, thumb=thumb)
    server, got = prestart.take(), None
    if server is not None:                    # the render process forked as the command started
        got = server.run(batches, where=f"in the render process {server.pid} started with the command",
                         logging=OmegaConf.to_container(config.hydra.job_logging, resolve=True),
                         verbose=OmegaConf.to_container(config.hydra.verbose)
                         if OmegaConf.is_config(config.hydra.verbose) else config.hydra.verbose,
                         quiet=quiet, **kw)
    if got is None:                           # none, or it ended before it took the points
        got = run_groups(batches, log=log.info, **kw)
    results: list = [None] * len(items)
    for (_, idx), res in zip(groups.items(), got):
        for k, r in zip(idx, res):
            results[k] = r
    runs = []
    computed = 0
    for k, (ovr, (folder, reused, run)) in enumerate(zip(job_overrides, results)):
        computed += not reused
        if reused:
            log.info(f"reusing stored result {_shown(folder)} (config hash {run['hash']})")
        else:
            log_computed(folder, run)
        say_folder(folder)
        ret = JobReturn(overrides=list(ovr), cfg=config, hydra_cfg=config, working_dir=str(base_dir),
                        task_name=config.hydra.job.name, status=JobStatus.COMPLETED,
                        _return_value=str(folder))
        runs.append(ret)
    sim = sum(float(r[2].get("wall_time_s") or 0.0) for r in results if not r[1])
    log.info(f"multirun: {computed} computed ({sim:.2f} s simulating), {len(items) - computed} reused; "
             f"total {time.perf_counter() - t0:.2f} s")
    if quiet:
        log.setLevel(logging.NOTSET)
    return runs
