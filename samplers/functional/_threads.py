"""Row-parallel numpy work on the CPU, on as many threads as torch's intra-op setting.

The CPU path hands its full-width sorts to numpy (several times faster than ``torch.sort``,
see ``_stats.sort_nonneg``), but a numpy sort runs on the calling thread only, where torch's
own passes use every intra-op thread: at torch's default setting on a many-core machine the
sorts then take most of a step. numpy releases the GIL while it sorts, so the rows of one call
can be sorted on several Python threads at once; each row's result is the one the single call
gives (rows are independent), so nothing changes but the time.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["sort_rows_"]

#: A chunk of rows gets at least this many entries: below it handing the chunk to another
#: thread (~20-50 us) costs about what sorting it saves.
MIN_ENTRIES_PER_CHUNK = 1 << 16

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_workers = 0


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool there."""
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _workers(extra: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``extra`` threads (grown when torch's setting grows)."""
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers < extra:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_workers = ThreadPoolExecutor(max_workers=extra, thread_name_prefix="samplers-rows"), extra
        return _pool


def each_row_chunk(fn: Callable[[int, int], None], rows: int, entries: int) -> None:
    """Call ``fn(start, stop)`` on consecutive row ranges that cover ``[0, rows)``: one range
    per thread of ``torch.get_num_threads()`` (the caller's thread takes the first) when the
    ``entries`` of the rows give each range at least ``MIN_ENTRIES_PER_CHUNK``, else one
    call ``fn(0, rows)``. ``fn`` must touch only its own rows; it pays only where it releases
    the GIL (numpy's sorts and ufuncs do). An exception in any range is raised here, after
    every range has finished."""
    chunks = min(torch.get_num_threads(), rows, entries // MIN_ENTRIES_PER_CHUNK)
    if chunks <= 1:
        fn(0, rows)
        return
    bounds = [rows * i // chunks for i in range(chunks + 1)]
    pool = _workers(chunks - 1)
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, chunks)]
    try:
        fn(bounds[0], bounds[1])
    finally:
        errors = [f.exception() for f in futures]  # (waits for every range)
    for error in errors:
        if error is not None:
            raise error


def sort_rows_(a: np.ndarray) -> None:
    """``a.sort(axis=-1)`` in place for a C-contiguous 2-D array, its rows split over torch's
    intra-op thread count (``each_row_chunk``). The same result as the single call."""
    def sort(start: int, stop: int) -> None:
        a[start:stop].sort(axis=-1)

    each_row_chunk(sort, a.shape[0], a.size)
