"""A small pool of single-threaded LAPACK workers for independent eigen-batches.

OpenMP is controlled per thread through ``ctypes`` (``omp_set_num_threads``); a fork hook
forgets the pool in a forked child (which inherits the object but not its threads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None
_POOL_OK: bool | None = None


def _forget_pool() -> None:  # a forked child inherits the pool object but not its threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _single_threaded_worker() -> None:
    """Pool-thread initializer: one OpenMP thread for LAPACK calls made from this thread.

    ``omp_set_num_threads`` sets a per-thread value, so the caller's threads are untouched;
    without it, 2 pool threads × 2 OpenMP threads oversubscribe the cores and batched
    ``eigvalsh`` runs several times *slower* than sequentially."""
    import ctypes

    ctypes.CDLL(None).omp_set_num_threads(1)


def _pool_map(fn: Callable, items: list) -> list:
    """Map over items with a small thread pool of single-threaded LAPACK workers: batched
    eigensolvers on small matrices use about one core, so independent buckets run side by side
    (torch releases the GIL). Sequential where OpenMP's per-thread setting is unavailable."""
    global _POOL, _POOL_OK
    nw = max(1, torch.get_num_threads())
    if _POOL_OK is None:
        try:
            import ctypes

            _POOL_OK = hasattr(ctypes.CDLL(None), "omp_set_num_threads")
        except Exception:
            _POOL_OK = False
    if nw == 1 or len(items) < 2 or not _POOL_OK:
        return [fn(x) for x in items]
    if _POOL is None or _POOL._max_workers != nw:  # noqa: SLF001
        _POOL = ThreadPoolExecutor(
            max_workers=nw, thread_name_prefix="trajscope-eig", initializer=_single_threaded_worker
        )
    return list(_POOL.map(fn, items))
