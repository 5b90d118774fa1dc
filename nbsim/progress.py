"""A progress bar for long simulations (tqdm on stderr): pixel·steps done, their rate and an ETA.

The engine reports ``progress(done_pixels, total_pixels)`` after each chunk (``nbsim.api.simulate
(progress=...)``); ``progress_bar`` turns that into a bar counting pixel·steps (pixels x the samples
each pixel sums: sub-pixels x layers x sources x phi steps x mosaic domains, ``nbsim.checks.Estimate``).

When it shows (``should_show``): on a terminal, for runs that last more than ``TTY_DELAY_S`` (drawn
only after that delay, so quick runs print nothing); elsewhere (a log file, a SLURM job) only for runs
estimated to take more than ``LONG_RUN_S``, and redrawn at most every ``LOG_INTERVAL_S``.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional

LONG_RUN_S = 2.0        # estimated seconds from which a non-terminal stderr gets a bar
TTY_DELAY_S = 1.0       # a terminal's bar appears only after this many seconds
LOG_INTERVAL_S = 10.0   # at most one line per this many seconds when stderr is not a terminal

ProgressFn = Callable[[int, int], None]


def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def should_show(estimated_s: float, stream=None, enabled: Optional[bool] = None) -> bool:
    """Whether a run estimated to take ``estimated_s`` seconds gets a bar on ``stream`` (default
    stderr). ``enabled``: True/False force it on/off, None decides as the module docstring says."""
    if enabled is not None:
        return bool(enabled)
    stream = sys.stderr if stream is None else stream
    return isatty(stream) or estimated_s > LONG_RUN_S


@contextlib.contextmanager
def progress_bar(samples_per_pixel: int, estimated_s: float, pixels: Optional[int] = None, *,
                 stream=None, enabled: Optional[bool] = None,
                 desc: str = "nbsim") -> Iterator[Optional[ProgressFn]]:
    """Yield a ``progress(done_pixels, total_pixels)`` callback driving a tqdm bar on ``stream``
    (default stderr), or None when no bar is shown (``should_show``). The bar counts pixel·steps
    (``done_pixels * samples_per_pixel``; ``pixels``: the expected total, until the engine reports
    its own) and shows their rate and the ETA; it is closed on exit."""
    stream = sys.stderr if stream is None else stream
    if not should_show(estimated_s, stream, enabled):
        yield None
        return
    from tqdm import tqdm
    tty = isatty(stream)
    spp = max(1, int(samples_per_pixel))
    bar = tqdm(total=pixels * spp if pixels else None, file=stream, desc=desc, unit=" pixel·steps", unit_scale=True,
               dynamic_ncols=tty, delay=TTY_DELAY_S if tty else 0.0,
               mininterval=0.2 if tty else LOG_INTERVAL_S, leave=not tty)

    def progress(done: int, total: int) -> None:
        if total <= 0:
            return
        if bar.total != total * spp:
            bar.total = total * spp
        bar.update(done * spp - bar.n)

    try:
        yield progress
    finally:
        bar.close()
