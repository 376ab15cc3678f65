"""The row-parallel numpy sorts (samplers/functional/_threads.py): split over torch's thread
count, the same results as one single-threaded call, in the helper and through the samplers
that sort full rows."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import torch

import samplers.functional as F
from samplers.functional import _threads
from samplers.functional._stats import sort_nonneg, sort_values_desc


@pytest.fixture
def threads():
    """Run the body at a given torch thread count, restoring the old one afterwards."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _ranges(rows: int, entries: int) -> list[tuple[int, int, str]]:
    seen: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def record(start: int, stop: int) -> None:
        with lock:
            seen.append((start, stop, threading.current_thread().name))

    _threads.each_row_chunk(record, rows, entries)
    return sorted(seen)


@pytest.mark.parametrize("rows,entries,n_threads,chunks", [
    (64, 64 * 32000, 1, 1),  # one thread: one call
    (64, 64 * 32000, 2, 2),
    (64, 64 * 32000, 5, 5),  # uneven ranges
    (3, 3 * 128256, 8, 3),  # no more ranges than rows
    (1, 128256, 4, 1),  # one row
    (64, 64 * 100, 4, 1),  # too little work to hand over
    (8, 3 * _threads.MIN_ENTRIES_PER_CHUNK, 8, 3),  # ranges of at least the minimum
])
def test_ranges_cover_the_rows_once(threads, rows, entries, n_threads, chunks):
    threads(n_threads)
    seen = _ranges(rows, entries)
    assert len(seen) == chunks
    covered = [r for start, stop, _ in seen for r in range(start, stop)]
    assert covered == list(range(rows))
    assert seen[0][2] == threading.current_thread().name  # (the caller takes the first range)
    assert all(stop > start for start, stop, _ in seen)
    if chunks > 1:
        assert {name for _, _, name in seen[1:]} != {threading.current_thread().name}


def test_an_error_in_any_range_is_raised_after_all_ranges_ran(threads):
    threads(4)
    done = []

    def fn(start: int, stop: int) -> None:
        done.append(start)
        if start > 0:
            raise RuntimeError(f"range {start}")

    with pytest.raises(RuntimeError, match="range"):
        _threads.each_row_chunk(fn, 8, 8 * _threads.MIN_ENTRIES_PER_CHUNK)
    assert sorted(done) == [0, 2, 4, 6]


@pytest.mark.parametrize("n_threads", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_sort_rows_equals_numpy_sort(threads, n_threads, dtype):
    threads(n_threads)
    rng = np.random.default_rng(n_threads)
    a = (rng.integers(-2**40, 2**40, (13, 40000)) if dtype is np.int64
         else rng.standard_normal((13, 40000)).astype(np.float32))
    a[3, ::7] = a[3, 5]  # ties
    expected = np.sort(a, axis=-1)
    _threads.sort_rows_(a)
    assert np.array_equal(a, expected)


@pytest.mark.parametrize("shape", [(64, 32000), (5, 128256), (1, 128256)])
def test_full_row_sorts_do_not_depend_on_the_thread_count(threads, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * 3
    p = torch.softmax(x, dim=-1)
    p[0, ::3] = p[0, 1]  # ties
    results = []
    for n in (1, 2, 4):
        threads(n)
        values, order = sort_nonneg(p, descending=True)
        results.append((sort_values_desc(x), values, order, F.skew(x, torch.full((shape[0],), 0.5)),
                        F.typical_p(x, torch.full((shape[0],), 0.9)), F.tfs(x, torch.full((shape[0],), 0.95))))
    ref_values, ref_order = torch.sort(p, dim=-1, descending=True, stable=True)
    assert torch.equal(results[0][1], ref_values)
    # (the order among equal probabilities is unspecified; each position's value is not)
    assert torch.equal(p.gather(1, results[0][2]), ref_values)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# (Python 3.12 and newer warn at every fork of a process with threads: forking one is the test)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_sorts_on_threads_of_its_own(threads):
    threads(2)
    a = np.random.default_rng(0).integers(0, 2**50, (4, 100000))
    expected = np.sort(a, axis=-1)
    _threads.sort_rows_(a.copy())  # (the parent's pool exists before the fork)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 iff it sorted correctly on a working pool
        ok = False
        signal.alarm(30)  # (a pool whose threads did not survive the fork would hang: killed)
        try:
            b = a.copy()
            _threads.sort_rows_(b)
            ok = bool(np.array_equal(b, expected))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
