"""The compiled noise loop in a helper process, made ready while the front end starts.

Loading numba's cached machine code for :mod:`nbsim.noise_numba` costs a new process ~0.35 s of
CPU (importing numba, building its typing and target registries), and the C-exact noise loop is
sequential, so the front end cannot hide that cost behind its own work: torch's import, the setup
and the kernel all run first. A :class:`NoiseWorker` is a second Python process, started by the
front end before it imports torch, that imports and loads the compiled loop on the other core and
then runs ``noise_counts`` on request. The image is the same bit for bit: the worker runs the same
:func:`nbsim.noise_numba.noise_counts` on the same float32 values and the same stream state, and
the state it ends in is copied back (:func:`nbsim.noise.noise_image` does that as for the in-process
kernel).

Being a process of its own, the worker can also skip what numba loads for other programs: its
optional BLAS support (``scipy.linalg``, ~0.2 s to import) and cffi support. Nothing else runs in
that process, and the noise loop uses neither.

Protocol: a ``multiprocessing.connection`` socket pair carries pickled tuples, and a shared file
(``memfd_create`` where the system has it, else an unlinked temporary file), mapped by both
processes, carries the pixels: the float32 values ``vals`` (n,) at offset 0 and the uint16 counts
(n,) after them. worker -> parent first ``("ready", None)`` or ``("unavailable", reason)``; then per
request parent -> worker ``("noise_counts", n, adc, st int64 (3,), iv int64 (32,))`` and worker ->
parent ``("ok", photons, overloads, st, iv)`` or ``("error", text)``. The worker exits when the
parent closes its end (or exits).

Any failure (no interpreter path, numba missing, the worker dying or timing out) raises
:class:`WorkerError` or makes :meth:`NoiseWorker.ready` false; :mod:`nbsim.noise` then runs the
loop in-process as before.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

__all__ = ["NoiseWorker", "WorkerError", "READY_TIMEOUT_S"]

#: longest wait for the worker to be ready (it compiles when numba's cache is cold: seconds)
READY_TIMEOUT_S = 300.0
#: modules numba imports for optional features the noise loop never uses: its BLAS support
#: (``scipy.linalg``, ~0.2 s to import) and its cffi support (blocked in the worker, and in the front
#: end's console process while it loads the loop itself: see ``nbsim.noise.lean_numba_load``)
NUMBA_OPTIONAL = ("scipy.linalg.cython_blas", "cffi")


class WorkerError(RuntimeError):
    """The worker cannot serve a request (not ready, died, or replied with an error)."""


class NoiseWorker:
    """Handle of a started worker process (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, conn, shared_fd: int) -> None:
        self._proc = proc
        self._conn = conn
        self._fd = shared_fd                        # the shared file of the pixels
        self._state: Optional[bool] = None          # None: not heard from yet; True ready; False dead
        self.reason: Optional[str] = None           # why the worker is unusable, once it is

    @classmethod
    def start(cls) -> Optional["NoiseWorker"]:
        """Start a worker process (returns at once; it loads in the background), or None when no
        process can be started here. (This module imports neither numpy nor numba: the front end
        starts the worker before its own imports.)"""
        if not sys.executable:
            return None
        try:
            from multiprocessing.connection import Pipe
            fd = _shared_file()
        except OSError:
            return None
        try:
            ours, theirs = Pipe(duplex=True)
        except OSError:
            os.close(fd)
            return None
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from nbsim.noise_worker import serve; serve({theirs.fileno()}, {fd})")
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(), fd),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        except (OSError, ValueError):
            ours.close()
            os.close(fd)
            return None
        finally:
            theirs.close()
        return cls(proc, ours, fd)

    def _fail(self, reason: str) -> None:
        self._state = False
        self.reason = reason
        self.close()

    def ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait (at most ``timeout`` s) until the worker has loaded the compiled loop; False when it
        cannot serve (numba unavailable there, died, or too slow)."""
        if self._state is None:
            try:
                if not self._conn.poll(timeout):
                    self._fail(f"not ready after {timeout:g} s")
                    return False
                status, detail = self._conn.recv()
            except (EOFError, OSError, ValueError) as e:
                self._fail(f"worker gone: {type(e).__name__}: {e}")
                return False
            if status == "ready":
                self._state = True
            else:
                self._fail(str(detail))
        return bool(self._state)

    def noise_counts(self, vals, adc: float, st, iv, counts):
        """:func:`nbsim.noise_numba.noise_counts` run by the worker: same arguments, ``counts``,
        ``st`` and ``iv`` updated in place, returns ``(photons, overloads)``. Raises
        :class:`WorkerError` (and leaves every argument untouched) when the worker cannot run it."""
        return self.begin(vals, adc, st, iv, counts)()

    def begin(self, vals, adc: float, st, iv, counts):
        """Start :meth:`noise_counts` in the worker; returns the function (no arguments) that waits
        for it, fills ``counts``, ``st`` and ``iv`` and returns ``(photons, overloads)``. Either
        step raises :class:`WorkerError` (arguments untouched) when the worker cannot run it."""
        if not self.ready():
            raise WorkerError(f"noise worker unavailable: {self.reason}")
        n = int(vals.shape[0])
        px = _Pixels(self._fd, n, create=True)
        try:
            px.open()
            px.vals[...] = vals
            self._conn.send(("noise_counts", n, float(adc), st, iv))
        except (OSError, ValueError) as e:
            px.close()
            self._fail(f"worker gone: {type(e).__name__}: {e}")
            raise WorkerError(f"noise worker failed: {self.reason}") from None

        def finish():
            try:
                reply = self._conn.recv()
                if reply[0] == "ok":
                    counts[...] = px.counts
            except (EOFError, OSError, ValueError) as e:
                self._fail(f"worker gone: {type(e).__name__}: {e}")
                raise WorkerError(f"noise worker failed: {self.reason}") from None
            finally:
                px.close()
            if reply[0] != "ok":
                self._fail(str(reply[1]))
                raise WorkerError(f"noise worker failed: {self.reason}")
            _, photons, overloads, st_out, iv_out = reply
            st[...] = st_out
            iv[...] = iv_out
            return photons, overloads
        return finish

    def close(self) -> None:
        """Let the worker exit (it does when its end of the connection closes); reaps it if done."""
        try:
            self._conn.close()
        except OSError:
            pass
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        if self._state is not False:
            self._state = False
            self.reason = self.reason or "closed"
        self._proc.poll()


def _shared_file() -> int:
    """A file descriptor both processes map: an anonymous memory file, else an unlinked temporary
    file (the same pages through the page cache)."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("nbsim-noise", 0)
        except OSError:
            pass
    import tempfile
    fd, path = tempfile.mkstemp(prefix="nbsim-noise-")
    os.unlink(path)
    return fd


class _Pixels:
    """The shared file mapped for ``n`` pixels: ``vals`` float32 (n,) at offset 0, then ``counts``
    uint16 (n,) (``create``: the parent sizes the file first). ``open``/``close`` or ``with``."""

    def __init__(self, fd: int, n: int, create: bool = False) -> None:
        self.fd, self.n, self.create = fd, n, create
        self._map = None

    def open(self) -> "_Pixels":
        import mmap

        import numpy as np
        size = max(1, 6 * self.n)
        if self.create:
            os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self.vals = np.frombuffer(self._map, dtype=np.float32, count=self.n, offset=0)
        self.counts = np.frombuffer(self._map, dtype=np.uint16, count=self.n, offset=4 * self.n)
        return self

    def close(self) -> None:
        if self._map is not None:
            del self.vals, self.counts            # (no view may outlive the mapping)
            self._map.close()
            self._map = None

    __enter__ = open

    def __exit__(self, *exc) -> None:
        self.close()


def serve(conn_fd: int, shared_fd: int) -> None:
    """The worker process: load the compiled loop, say so, then answer requests until EOF."""
    from multiprocessing.connection import Connection

    import numpy as np
    conn = Connection(conn_fd)
    for name in NUMBA_OPTIONAL:               # numba then runs without these optional features
        sys.modules.setdefault(name, None)
    try:
        from nbsim import noise_numba as k
        # the first call loads (or, with a cold cache, compiles) the code for these argument types
        k.noise_counts(np.zeros(1, np.float32), 0.0, np.array([-1, 0, 0], np.int64),
                       np.zeros(32, np.int64), np.empty(1, np.uint16))
    except Exception as e:                     # numba missing or unusable: the parent runs it
        conn.send(("unavailable", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            _, n, adc, st, iv = msg
            with _Pixels(shared_fd, n) as px:
                photons, overloads = k.noise_counts(px.vals, adc, st, iv, px.counts)
            reply = ("ok", photons, overloads, st, iv)
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
