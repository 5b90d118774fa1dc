"""Poisson noise image exactly as nanoBragg makes its ``-noisefile``.

C behaviour reproduced (nanoBragg.c, after the pgm output):

* Pixels are visited in raster order (slow index outer, fast index inner); only pixels inside the
  ROI are drawn.  Pixels masked by ``-mask`` are *inside* the ROI: their float value is 0, they still
  consume one draw and get ``adc`` counts.  Pixels outside the ROI stay 0 (no adc offset).
* ``test = poidev(float_value, &seed)``; ``photons += test`` (double, sequential);
  ``test += adc``; ``test > 65535`` -> 65535 and one overload; then ``(unsigned short) test``
  (truncation; a negative result, possible only with a negative adc, wraps modulo 65536 as the
  x86-64 ``cvttsd2si`` conversion does, NaN gives 0).
* ``seed`` is the C-internal value: ``-N`` for ``-seed N``, ``-time()`` by default.

Two implementations of the same sequential loop, equal bit for bit:

* ``"numba"`` (default when numba is installed): :mod:`nbsim.noise_numba`, compiled once and cached on
  disk; a 1024x1024 image takes a few tens of milliseconds.
* ``"python"``: the reference, built on :mod:`nbsim.rng` (bit-exact ``ran1``/``poidev``); the uniform
  stream is generated in vectorised chunks, only the per-pixel consumption loop runs in Python.  Used
  when numba is missing, or for a stream state outside the compiled kernel's range (a seed beyond
  +-(2**31 - 2)).

``backend="auto"`` picks the first that applies, except that a process which has not loaded the
compiled loop yet runs images under :data:`NUMBA_MIN_PIXELS` pixels in Python: importing numba and
loading the cached machine code costs ~0.4 s once per process, more than the Python loop takes for
such an image (~0.7 us per pixel).  A process that registered a :class:`nbsim.noise_worker.NoiseWorker`
(:func:`use_worker`; the nanoBragg front end does, before it imports torch) runs ``"auto"`` images in
that worker instead, where the compiled loop was loaded in parallel ("numba-worker"; it falls back to
the choices above when the worker cannot serve).  :data:`last_backend` names the implementation the
latest call used.
"""

from __future__ import annotations

import contextlib
import math
import struct
import sys

import numpy as np

from .io.images import c_ushort
from .rng import Deviates, Ran1, Ran1Table, _as_stream, f32, gammln

__all__ = ["BACKENDS", "c_ushort", "last_backend", "noise_image", "numba_available",
           "numba_unavailable_reason", "poisson_deviates"]

_F32 = struct.Struct("f")
_MAX_CHUNK = 1 << 20  # draws generated ahead at a time (a Python list: ~32 MB)
BACKENDS = ("auto", "numba", "python")
#: "auto" in a process without the compiled loop loaded: smaller images run in Python (see above)
NUMBA_MIN_PIXELS = 1 << 19
#: the implementation the latest ``poisson_deviates``/``noise_image`` call ran ("numba", "numba-worker"
#: (the compiled loop in the registered worker process) or "python")
last_backend: str | None = None
_worker = None               # the NoiseWorker registered by use_worker, or None
#: True in a process that uses numba for this loop only (the front end's console entry sets it):
#: loading the loop there skips numba's optional BLAS and cffi support (importing ``scipy.linalg``
#: alone costs ~0.2 s), which stay unavailable to numba in that process. Other imports of those
#: modules work as usual once the loop is loaded.
lean_numba_load = False
_kernels_mod = None          # nbsim.noise_numba once imported; False when numba is unavailable
#: why the compiled kernels are unavailable (None while they are, or before the first use)
numba_unavailable_reason: str | None = None


def _kernels():
    """The compiled kernels module, imported on first use (importing numba costs ~0.15 s, loading
    the cached machine code on the first call ~0.3 s more); None when numba cannot be imported or
    cannot set up its cache (numba raises RuntimeError when no cache directory is writable)."""
    global _kernels_mod, numba_unavailable_reason
    if _kernels_mod is None:
        try:
            from . import noise_numba
            _kernels_mod = noise_numba
        except (ImportError, RuntimeError) as e:
            _kernels_mod = False
            numba_unavailable_reason = f"{type(e).__name__}: {e}"
    return _kernels_mod or None


def _kernels_loaded() -> bool:
    """Whether this process has the compiled loop ready (numba imported and the code loaded)."""
    return bool(_kernels_mod) and bool(_kernels_mod._noise_loop.signatures)


def numba_available() -> bool:
    """True when the compiled noise kernels can be used (numba importable)."""
    return _kernels() is not None


def _kernel_state(rng: Ran1):
    """(st, iv) int64 arrays for the compiled kernels, or None when the stream's state is not one they
    take (see :mod:`nbsim.noise_numba`): seed in (-IM, IM), ``iy`` in [0, IM), and, unless the next
    draw reloads the table, every table entry in [1, IM).  Every state a nanoBragg run reaches from
    command-line seeds ``|N| < 2**31 - 1`` is one of these (C's seed is ``-N``)."""
    from .rng import IM
    tab = rng.table
    seed, iy = rng.seed, tab.iy
    if not (-IM < seed < IM and 0 <= iy < IM):
        return None
    reloads = seed <= 0 or iy == 0
    if not reloads and not all(0 < v < IM for v in tab.iv):
        return None
    return (np.array([seed, iy, 0], dtype=np.int64), np.array(tab.iv, dtype=np.int64))


def _store_state(rng: Ran1, st: np.ndarray, iv: np.ndarray) -> None:
    """Copy the kernels' final state back into the stream and its (shared) table."""
    rng.seed = int(st[0])
    rng.table.iy = int(st[1])
    rng.table.iv[:] = iv.tolist()
    rng.ndraws += int(st[2])


def use_worker(worker) -> None:
    """Register ``worker`` (a started :class:`nbsim.noise_worker.NoiseWorker`, or None to drop it):
    ``backend="auto"`` noise images then run there while it can serve."""
    global _worker
    _worker = worker


def _worker_for(backend: str, rng: Ran1):
    """(registered worker, state) where the worker runs this ``backend="auto"`` image (this process
    has not loaded the compiled loop itself, the state is one the loop takes, the worker is ready),
    else None."""
    global last_backend
    if backend != "auto" or _worker is None or _kernels_loaded():
        return None
    state = _kernel_state(rng)
    if state is None or not _worker.ready():
        return None
    last_backend = "numba-worker"
    return _worker, state


def _choose(backend: str, rng: Ran1, n: int):
    """(kernels module, state) for the numba path, or None for the Python path (``n`` pixels)."""
    global last_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    small = backend == "auto" and n < NUMBA_MIN_PIXELS and not _kernels_loaded()
    if backend != "python" and not small:
        k = _kernels()
        state = _kernel_state(rng) if k is not None else None
        if state is not None:
            last_backend = "numba"
            return k, state
        if backend == "numba":
            raise RuntimeError("noise backend 'numba': " + (
                f"numba is unavailable ({numba_unavailable_reason})" if k is None
                else "stream state outside the kernel's range"))
    last_backend = "python"
    return None


class _BufferedUniforms:
    """Chunked view of a :class:`Ran1` stream; ``finish()`` leaves the stream exactly ``consumed``
    draws further on (so a shared table ends in the same state as in C)."""

    def __init__(self, rng: Ran1, first_chunk: int) -> None:
        self.rng = rng
        self.chunk = min(max(int(first_chunk), 1024), _MAX_CHUNK)
        self._snap = rng.state()
        self._snap_ndraws = rng.ndraws
        self.buf: list[float] = rng.draw(self.chunk).tolist()
        self.pos = 0
        self.consumed_before = 0  # draws consumed from earlier chunks

    def refill(self, hint: int = 0) -> None:
        self.consumed_before += len(self.buf)
        self.chunk = min(max(self.chunk, int(hint), 65536), _MAX_CHUNK)
        self._snap = self.rng.state()
        self._snap_ndraws = self.rng.ndraws
        self.buf = self.rng.draw(self.chunk).tolist()
        self.pos = 0

    def __call__(self) -> float:
        if self.pos >= len(self.buf):
            self.refill()
        u = self.buf[self.pos]
        self.pos += 1
        return u

    @property
    def consumed(self) -> int:
        return self.consumed_before + self.pos

    def finish(self) -> None:
        self.rng.restore(self._snap)
        self.rng.ndraws = self._snap_ndraws
        self.rng.draw(self.pos)


def poisson_deviates(values, rng: Ran1, *, backend: str = "auto") -> np.ndarray:
    """``poidev(v, &seed)`` for each value in order, sharing one set of C statics.

    Parameters
    ----------
    values : array-like, shape (n,)
        Means (photons); rounded to float32 as C's float image is.
    rng : Ran1
        Stream to draw from; on return it has advanced by exactly the draws C would make.
    backend : "auto", "numba" or "python"
        Implementation (module docstring); "numba" raises RuntimeError when it cannot run.

    Returns
    -------
    ndarray, shape (n,), float64 — the float32 deviates (integers, except for means > 1e6).
    """
    vals = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))
    chosen = _choose(backend, rng, vals.size)
    if chosen is not None:
        k, (st, iv) = chosen
        out = np.empty(vals.size, dtype=np.float64)
        k.poisson_deviates_into(vals, st, iv, out)
        _store_state(rng, st, iv)
        return out
    return _poisson_deviates_python(vals, rng)


def _poisson_deviates_python(vals: np.ndarray, rng: Ran1) -> np.ndarray:
    """The reference loop of :func:`poisson_deviates` (vals: float32 (n,))."""
    n = vals.size
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    src = _BufferedUniforms(rng, n + n // 4 + 1024)
    dv = Deviates(src)  # type: ignore[arg-type]  (duck-typed: a callable returning draws)
    pack, unpack = _F32.pack, _F32.unpack
    exp, log, sqrt, tan, floor, pi = math.exp, math.log, math.sqrt, math.tan, math.floor, math.pi
    gl_cache: dict[float, float] = {}

    def gl(x: float) -> float:  # memoised gammln (x is float32-valued; results are pure)
        v = gl_cache.get(x)
        if v is None:
            v = gl_cache[x] = gammln(x)
        return v

    # C statics of poidev, kept in locals and synced with dv around delegated calls
    oldm, g, sq, alxm = dv.oldm, dv.g, dv.sq, dv.alxm
    buf = src.buf
    nbuf = len(buf)
    p = 0
    for c0 in range(0, n, _MAX_CHUNK):          # Python floats a chunk at a time (bounded memory)
        xs = vals[c0:c0 + _MAX_CHUNK].tolist()
        for j, xm in enumerate(xs):
            i = c0 + j
            if xm < 12.0:
                # direct method (C: em=-1; t=1; do {++em; t*=ran1} while (t>g))
                if xm != oldm:
                    oldm = xm
                    g = f32(exp(-xm))
                if p >= nbuf:
                    src.pos = p
                    src.refill(2 * (n - i) + 1024)
                    buf, p, nbuf = src.buf, 0, len(src.buf)
                t = buf[p]
                p += 1
                em = 0.0
                while t > g:
                    if p >= nbuf:
                        src.pos = p
                        src.refill(2 * (n - i) + 1024)
                        buf, p, nbuf = src.buf, 0, len(src.buf)
                    t = unpack(pack(t * buf[p]))[0]
                    p += 1
                    em += 1.0
                out[i] = em
            elif xm <= 1.0e6:
                # rejection method with a Lorentzian comparison function (all values finite here)
                if xm != oldm:
                    oldm = xm
                    sq = unpack(pack(sqrt(2.0 * xm)))[0]
                    alxm = unpack(pack(log(xm)))[0]
                    g = unpack(pack(unpack(pack(xm * alxm))[0] - gl(unpack(pack(xm + 1.0))[0])))[0]
                src.pos = p
                while True:
                    while True:
                        y = unpack(pack(tan(pi * src())))[0]
                        em = unpack(pack(unpack(pack(sq * y))[0] + xm))[0]
                        if not (em < 0.0):
                            break
                    em = float(floor(em))
                    lt = unpack(pack(unpack(pack(em * alxm))[0] - gl(unpack(pack(em + 1.0))[0])))[0]
                    t = f32(0.9 * (1.0 + unpack(pack(y * y))[0]) * exp(unpack(pack(lt - g))[0]))
                    if not (src() > t):
                        break
                out[i] = em
                buf, p, nbuf = src.buf, src.pos, len(src.buf)
            else:
                # xm > 1e6 (gaussdev) or NaN: the reference implementation
                src.pos = p
                dv.oldm, dv.g, dv.sq, dv.alxm = oldm, g, sq, alxm
                out[i] = dv.poidev(xm)
                oldm, g, sq, alxm = dv.oldm, dv.g, dv.sq, dv.alxm
                buf, p, nbuf = src.buf, src.pos, len(src.buf)
    src.pos = p
    src.finish()
    return out


def noise_image(img, seed, adc: float = 40.0, mask=None, *,
                table: Ran1Table | None = None, backend: str = "auto") -> tuple[np.ndarray, float, int]:
    """Poisson-noise SMV data exactly as nanoBragg computes it.

    Parameters
    ----------
    img : array-like, shape (S, F)
        Float image in photons/pixel (slow, fast); converted to float32 like C's ``floatimage``.
    seed : int or Ran1
        C-internal noise seed (``-N`` for ``-seed N``; C default ``-time()``), or a stream.
        A positive value continues the shared shuffle ``table`` (C semantics; pass the table the
        mosaic domains used to reproduce that case).
    adc : float
        ADC offset added to every drawn pixel (C default 40).
    mask : bool array, shape (S, F), optional
        The ROI: pixels C visits (True).  Pixels excluded by a ``-mask`` file are inside the ROI and
        must be True here (they get ``poidev(0) + adc``).  None = whole image.
    table : Ran1Table, optional
        Shared ``ran1`` table (fresh when omitted).
    backend : "auto", "numba" or "python"
        Implementation (module docstring); "numba" raises RuntimeError when it cannot run.

    Returns
    -------
    (noise uint16 (S, F), photons float, overloads int)
        ``photons`` is C's double sum of the deviates (printed with ``%.0f``); ``overloads`` counts
        pixels whose deviate + adc exceeded 65535.
    """
    return noise_image_begin(img, seed, adc, mask, table=table, backend=backend)()


def noise_image_begin(img, seed, adc: float = 40.0, mask=None, *, table: Ran1Table | None = None,
                      backend: str = "auto"):
    """:func:`noise_image` in two steps: returns a function of no arguments that returns what
    :func:`noise_image` returns. Where the registered worker (:func:`use_worker`) runs the loop, it
    starts there now and this process is free until the call (the writers convert the other images
    meanwhile); otherwise all the work happens in the call. A stream ``seed`` advances in the call."""
    from .noise_worker import WorkerError
    a = np.asarray(img, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"noise_image: expected a 2-D (slow, fast) image, got shape {a.shape}")
    if mask is None:
        roi = np.ones(a.shape, dtype=bool)
    else:
        roi = np.asarray(mask, dtype=bool)
        if roi.shape != a.shape:
            raise ValueError(f"noise_image: mask shape {roi.shape} != image shape {a.shape}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    rng = _as_stream(seed, table)
    whole = mask is None or bool(roi.all())
    vals = np.ascontiguousarray(a.reshape(-1) if whole else a[roi])

    def placed(counts):
        if whole:
            return counts.reshape(a.shape)
        out = np.zeros(a.shape, dtype=np.uint16)
        out[roi] = counts
        return out

    def in_process():
        return _noise_here(vals, rng, adc, backend, placed)

    use = _worker_for(backend, rng)
    if use is not None:
        worker, (st, iv) = use
        counts = np.empty(vals.size, dtype=np.uint16)
        try:
            done = worker.begin(vals, float(adc), st, iv, counts)
        except WorkerError:                   # dropped: this process draws the image
            return in_process
        def finish():
            try:
                photons, overloads = done()
            except WorkerError:               # dropped: this process draws the image after all
                return in_process()
            _store_state(rng, st, iv)
            return placed(counts), float(photons), int(overloads)
        return finish
    return in_process


@contextlib.contextmanager
def _numba_lean():
    """While numba loads the loop (under ``lean_numba_load``, before it is loaded): the modules of
    its optional features (``nbsim.noise_worker.NUMBA_OPTIONAL``) cannot be imported."""
    from .noise_worker import NUMBA_OPTIONAL
    blocked = [] if not lean_numba_load or _kernels_loaded() else \
        [n for n in NUMBA_OPTIONAL if n not in sys.modules]
    for n in blocked:
        sys.modules[n] = None
    try:
        yield
    finally:
        for n in blocked:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]


def _noise_here(vals: np.ndarray, rng: Ran1, adc: float, backend: str, placed):
    """The noise loop in this process over the ROI values ``vals`` (float32 (n,)), compiled or
    Python (``_choose``); ``placed(counts)`` puts the uint16 (n,) counts into the image."""
    with _numba_lean():
        chosen = _choose(backend, rng, vals.size)
        if chosen is not None:
            k, (st, iv) = chosen
            counts = np.empty(vals.size, dtype=np.uint16)
            photons, overloads = k.noise_counts(vals, float(adc), st, iv, counts)
    if chosen is not None:
        _store_state(rng, st, iv)
        return placed(counts), float(photons), int(overloads)
    dev = _poisson_deviates_python(vals, rng)
    photons = 0.0
    overloads = 0
    counts = np.empty(dev.shape, dtype=np.uint16)
    for c0 in range(0, dev.size, _MAX_CHUNK):       # bounded temporaries for any detector size
        d = dev[c0:c0 + _MAX_CHUNK]
        photons = float(np.add.accumulate(np.concatenate(([photons], d)))[-1])   # C's running sum
        test = d + float(adc)
        over = test > 65535.0
        overloads += int(np.count_nonzero(over))
        test[over] = 65535.0
        counts[c0:c0 + _MAX_CHUNK] = c_ushort(test)
    return placed(counts), photons, overloads
