"""One process-wide pool of worker threads for calibration statistics.

Why: numpy's elementwise passes and reductions release the GIL (``bincount`` does not), so while one
site's values are counted another site's can be scaled, floored and summed on the other core, between
two runs of the model. Nothing is kept longer than before (the batch's tensors are already in memory),
so calibration memory stays what it was.
``OMCT_NUM_THREADS`` sets the number of workers (default: the cores this process may run on).

The statistics run with numpy's BLAS on one thread (``one_blas_thread``): their matrix products are small (a
layer's 256 sampled rows a batch), and OpenBLAS's threads, which keep spinning after each call, took the cores
from ONNX Runtime's, torch's and these workers' threads (2 cores, no thread variables set: the PyTorch frontend's
PTQ of a ResNet took 1.9-2.3 s instead of 0.5 s).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_lock = threading.Lock()


def worker_count() -> int:
    env = os.environ.get("OMCT_NUM_THREADS", "")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"OMCT_NUM_THREADS must be a whole number, got '{env}'") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool, _pool_workers = ThreadPoolExecutor(workers, thread_name_prefix="omct"), workers
        return _pool


def run_all(tasks: Sequence[Callable[[], None]], costs: Sequence[float] | None = None) -> None:
    """Run every task and wait for all of them; the costliest start first so the cores finish together.
    Raises the exception of the first failing task in list order, whatever order they ran in."""
    workers = worker_count()
    if workers == 1 or len(tasks) < 2:
        for task in tasks:
            task()
        return
    order = iter(range(len(tasks)) if costs is None else sorted(range(len(tasks)), key=lambda i: -costs[i]))
    errors: list[BaseException | None] = [None] * len(tasks)
    taking = threading.Lock()

    def drain() -> None:
        while True:
            with taking:
                i = next(order, None)
            if i is None:
                return
            try:
                tasks[i]()
            except BaseException as e:  # noqa: BLE001 - raised below, in list order, once every task ran
                errors[i] = e

    # The calling thread takes tasks too, beside ``workers - 1`` pool threads. Why: every thread that allocates
    # gets its own malloc arena, which keeps its freed temporaries; the caller only waited before, and a third
    # thread's arena was 3-7 MB of a small CNN's peak RSS (issue 17 item 7).
    pool = _executor(workers - 1)
    futures: list[Future] = [pool.submit(drain) for _ in range(workers - 1)]
    drain()
    for future in futures:
        if not future.cancel():  # one still queued has nothing left to take (and a nested call cannot wait on it)
            future.result()
    for error in errors:
        if error is not None:
            raise error


def return_free_memory() -> None:
    """Hand the free pages of every malloc arena back to the system (glibc's ``malloc_trim``; nothing where the C
    library has none). Why: each thread's arena keeps what its temporaries freed, and the phase that follows the
    calibration batches (the records, the user's save_model) allocates on another thread, which cannot reuse it:
    a small CNN's worker arena held about 5 MB there (issue 17 item 7)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


#: Reused buffers of the statistics' hot loops, per thread: (thread id, name, dtype) -> 1-D array, grown to the
#: largest request. A dict rather than thread-local storage so that ``release_scratch`` can drop every thread's.
_SCRATCH: dict[tuple[int, str, np.dtype], np.ndarray] = {}


def scratch(name: str, shape: int | tuple[int, ...], dtype=np.float32, max_values: int | None = None) -> np.ndarray:
    """An array of ``shape`` in this thread's reused buffer ``name``, valid until the thread's next request of
    ``name``; a fresh array when it would hold more than ``max_values``. Why: a fresh temporary of a batch's size
    (binning chunks, learned rounding's rows and Gram product) is a new mapping whose pages fault in on every batch
    (binning 1.7x slower on MobileNetV2); reused, it stays mapped. Per thread, not per statistic: the workers update
    different tensors at the same time, and one buffer per thread serves them all."""
    size = math.prod(shape) if isinstance(shape, tuple) else shape
    if max_values is not None and size > max_values:
        return np.empty(shape, dtype)
    key = (threading.get_ident(), name, np.dtype(dtype))
    buf = _SCRATCH.get(key)
    if buf is None or buf.size < size:
        buf = _SCRATCH[key] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def release_scratch() -> None:
    """Drop every thread's scratch buffers, once calibration has fed its last batch: the records and the export
    that follow must not carry them in their peak memory. An update still running keeps its own arrays alive."""
    _SCRATCH.clear()


class _PhdrInfo(ctypes.Structure):
    """The head of glibc's (and musl's) ``struct dl_phdr_info``, up to the load and unload counters."""

    _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p), ("phdr", ctypes.c_void_p),
                ("phnum", ctypes.c_uint16), ("adds", ctypes.c_ulonglong), ("subs", ctypes.c_ulonglong)]


_PHDR_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t, ctypes.c_void_p)


def _library_counter() -> Callable[[], tuple[int, int] | None]:
    """A function returning the C library's (loads, unloads) counters of shared objects (``dl_iterate_phdr``'s
    ``dlpi_adds`` and ``dlpi_subs``, read from its first entry: a few microseconds), or None where it cannot
    tell (not Linux, an older C library): then the libraries are looked up every time."""
    try:
        iterate = ctypes.CDLL(None).dl_iterate_phdr
    except (AttributeError, OSError, TypeError):  # pragma: no cover - not an ELF system (macOS, Windows)
        return lambda: None
    iterate.argtypes, iterate.restype = [_PHDR_CALLBACK, ctypes.c_void_p], ctypes.c_int
    seen: list[tuple[int, int] | None] = [None]

    def first(info, size, _data) -> int:
        ok = size >= _PhdrInfo.subs.offset + _PhdrInfo.subs.size
        seen[0] = (info.contents.adds, info.contents.subs) if ok else None
        return 1  # stop after the first entry: the counters are the same in each

    callback = _PHDR_CALLBACK(first)

    def counters() -> tuple[int, int] | None:
        seen[0] = None
        iterate(callback, None)
        return seen[0]

    return counters


_library_counters: Callable[[], tuple[int, int] | None] | None = None
_blas: tuple[tuple[int, int], list] | None = None  # (counters when looked up, the BLAS libraries' controllers)


def _blas_controllers() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded now. Looking them up walks every loaded library
    (0.6-1.5 ms, once per calibration batch); they are kept until the C library reports a shared object loaded
    or unloaded since (scipy's or torch's OpenBLAS imported after the first batch is then found)."""
    global _library_counters, _blas
    import threadpoolctl

    with _lock:
        if _library_counters is None:
            _library_counters = _library_counter()
        now = _library_counters()
        if now is None or _blas is None or _blas[0] != now:
            found = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
            _blas = None if now is None else (now, found)
            return found
        return _blas[1]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (and any other BLAS library loaded) on one thread inside, as it was after; nothing when
    threadpoolctl is not installed. Libraries loaded since the last call (scipy's, torch's) are limited too."""
    try:
        controllers = _blas_controllers()
    except ImportError:  # pragma: no cover - a dependency of omct
        controllers = []
    before = [c.get_num_threads() for c in controllers]
    for c in controllers:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(controllers, before, strict=True):
            c.set_num_threads(n)
