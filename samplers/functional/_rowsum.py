"""torch's CPU float32 row sum of ``[B, V]`` rows that are zero but at a few entries, bit for
bit, at the cost of those entries instead of the full rows.

A sampler that works on packed rows (a truncation left a few hundred tokens of each row) must
sum them as torch sums the full rows, zeros included, or its statistics would round
differently from the same sampler on the full rows (``SparseRows.row_sum``). torch groups a
float32 row sum's terms by their columns, in a fixed tree (measured on torch 2.13's CPU
kernels; ``SumTree`` states it). Adding ``+0.0`` changes no partial sum (the partial sums start
at ``+0.0`` and never become ``-0.0``), so the zero columns can be left out of every node of
the tree: the nonzero entries, folded in the tree's order, give the full row's sum. One
scatter-add builds the tree's leaves (``np.add.at`` adds in the order of its indices: a left
fold per accumulator), and the levels above are small dense arrays.

The tree is not taken on trust: ``tree_lanes`` checks it, once per process, width and torch
thread count, against torch's own row sums (``batched_row_sum``) on probe rows (torch picks
its kernels by the CPU's instruction set, which sets the lane count).
Where no lane count reproduces torch, it returns None and callers sum the full rows.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

__all__ = ["SumTree", "batched_row_sum", "tree_lanes"]

#: Lane counts (float32 lanes of torch's vectorised sum) tried, the likeliest first.
_CANDIDATE_LANES = (8, 16)
#: Partial sums a vector row adds in turn, and the fold of ``S`` rows per level.
_ACCUMULATORS = 4


def batched_row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(dim=-1, keepdim=True)`` for ``[B, V]`` rows, each row's terms grouped as torch
    groups a row of a batch, whatever the rows beside it.

    torch sums a batch's rows on its threads row by row, each row in one fixed tree, but a
    single CPU row (one output) it splits between its threads, in another grouping of the
    terms: from two threads on, a row alone and the same row in a batch then got sums an ulp
    apart, and every value made from them (dynamic temperature's divisor: every logit of the
    row). A single row is therefore summed as the first of two rows (a view, no copy; both
    threads sum the same row, ~1.5x a split sum's time at [1, 128256])."""
    if x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu" and torch.get_num_threads() > 1:
        return x.expand(2, x.shape[1]).sum(dim=-1, keepdim=True)[:1]
    return x.sum(dim=-1, keepdim=True)


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else int(x - 1).bit_length()


class SumTree:
    """The float32 row sums of the ``shape`` (``[B, V]``) array that is 0 everywhere except at
    the flat indices ``flat`` (increasing), as ``torch.sum(dim=-1)`` adds them with ``lanes``
    float32 lanes; ``tree(values)`` gives ``[B]`` sums for the values at those indices.

    Each row splits into vectors of ``lanes`` columns; ``_ACCUMULATORS`` (4) vectors form one
    "row" of the reduction. Column ``c`` is vector ``v = c // lanes``, lane ``c % lanes``,
    accumulator ``v % 4`` and reduction row ``v // 4``. With ``n`` = the rows in the first
    ``4 * (V // lanes // 4)`` vectors and ``S = 2 ** max(4, ceil(log2(n)) // 4)``, each
    (accumulator, lane) stream folds its values over blocks of ``S`` rows (level 0), the full
    blocks over groups of ``S`` (level 1), the full groups over groups of ``S`` again (level
    2), and the full ones of those in turn (level 3); the rows past the last full block are
    the remainder. Per stream: ``((remainder + level-1 leftover group) + level-2 leftover
    group) + level 3``. Per lane: accumulator 0, then the vectors past the 4-vector rows (in
    order), then accumulators 1, 2, 3. Per row: the columns past the last whole vector (in
    order), then the lanes 0, 1, ... Each "then" is a left fold.
    """

    def __init__(self, flat: np.ndarray, shape: tuple[int, int], lanes: int) -> None:
        batch, vocab = shape
        self.batch, self.lanes = batch, lanes
        vectors = vocab // lanes
        rows = vectors // _ACCUMULATORS
        self.S = S = 1 << max(4, _ceil_log2(rows) // 4)
        self.blocks = rows // S
        self.groups1 = self.blocks // S
        self.groups2 = self.groups1 // S
        self.tail = vocab - vectors * lanes
        self.left = vectors - _ACCUMULATORS * rows
        self.streams = streams = batch * _ACCUMULATORS * lanes
        # (flat is row-major and increasing: each row's entries are a run; lanes, 4 and S are
        # powers of 2: shifts and masks instead of integer divisions)
        # (int32 where it fits: half the bytes to move)
        index: type[np.signedinteger] = np.int32 if batch * vocab < 2**31 else np.int64
        ends = np.searchsorted(flat, np.arange(1, batch + 1, dtype=np.int64) * vocab)
        row = np.repeat(np.arange(batch, dtype=index), np.diff(ends, prepend=0))
        col = flat.astype(index) - row * index(vocab)
        vec = col >> (lanes.bit_length() - 1)
        lane = col & (lanes - 1)
        core_end = _ACCUMULATORS * rows * lanes
        self.core = core = np.flatnonzero(col < core_end)
        v = vec[core]
        stream = ((row[core] << 2) + (v & 3)) * lanes + lane[core]
        block = np.minimum(v >> (2 + S.bit_length() - 1), self.blocks)  # (the remainder: block `blocks`)
        # Block-major leaves: within a stream, entries in flat order are in row order, so the
        # scatter-add folds each leaf in the tree's order.
        self.leaf = block * streams + stream
        self.left_at = np.flatnonzero((col >= core_end) & (col < vectors * lanes))
        at = self.left_at
        self.left_to = (1 + vec[at] - _ACCUMULATORS * rows) * (batch * lanes) + row[at] * lanes + lane[at]
        self.tail_at = np.flatnonzero(col >= vectors * lanes)
        self.tail_to = (col[self.tail_at] - vectors * lanes) * batch + row[self.tail_at]

    def __call__(self, values: np.ndarray) -> np.ndarray:
        # Finite values whose sum leaves the float32 range give +-inf (and inf - inf NaN), as
        # torch's sum does, silently: no numpy warning (an error under ``-W error``).
        with np.errstate(over="ignore", invalid="ignore"):
            return self._fold_entries(values)

    def _fold_entries(self, values: np.ndarray) -> np.ndarray:
        S, blocks, g1, g2, streams = self.S, self.blocks, self.groups1, self.groups2, self.streams
        leaves: np.ndarray = np.zeros((blocks + 1) * streams, dtype=np.float32)
        np.add.at(leaves, self.leaf, values[self.core])
        leaves = leaves.reshape(blocks + 1, streams)
        level1 = _fold_groups(leaves[:g1 * S], S)
        level2 = _fold_groups(level1[:g2 * S], S)
        stream_sum = (((leaves[blocks] + _fold(leaves[g1 * S:blocks])) + _fold(level1[g2 * S:g1]))
                      + _fold(level2))
        by_acc = stream_sum.reshape(self.batch, _ACCUMULATORS, self.lanes)
        # per lane: accumulator 0, the left-over vectors, accumulators 1..3 (position-major)
        lane_terms = np.zeros((_ACCUMULATORS + self.left, self.batch, self.lanes), dtype=np.float32)
        lane_terms[0] = by_acc[:, 0]
        lane_terms.reshape(-1)[self.left_to] = values[self.left_at]
        lane_terms[self.left + 1:] = by_acc[:, 1:].transpose(1, 0, 2)
        row_terms = np.zeros((self.tail + self.lanes, self.batch), dtype=np.float32)
        row_terms.reshape(-1)[self.tail_to] = values[self.tail_at]
        row_terms[self.tail:] = _fold(lane_terms).T
        return _fold(row_terms)


def _fold(terms: np.ndarray) -> np.ndarray:
    """The left fold of the C-contiguous ``terms`` over their first axis (``0`` for none).

    numpy reduces an axis that is not the innermost of the iteration one add at a time (its
    pairwise summation splits only the innermost loop); a last axis of size 1 would make the
    first one innermost, so such terms are folded by hand. (``tree_lanes``'s check runs the
    same shapes: a numpy that grouped differently would fail it.)"""
    if terms.shape[0] == 0:
        return np.zeros(terms.shape[1:], dtype=np.float32)
    if terms.shape[-1] > 1:
        return np.add.reduce(terms, axis=0)
    out = terms[0].copy()
    for t in terms[1:]:
        out += t
    return out


def _fold_groups(terms: np.ndarray, size: int) -> np.ndarray:
    """``terms`` (``[n * size, m]``, C-contiguous, ``m > 1``) folded in groups of ``size``
    consecutive rows: ``[n, m]`` (a middle axis: one add at a time, as in ``_fold``)."""
    return np.add.reduce(terms.reshape(-1, size, terms.shape[1]), axis=1)


#: The probes: this many rows in all (over as many probes of the batch's shape as that takes)
#: get this share of their columns, several entries per leaf, so that the order within a leaf
#: counts; each other row gets a few entries. A row's sum can come out equal under another
#: grouping by chance (measured with these values: up to ~1 in 3, one row split over two
#: threads), so 24 rows leave ~1e-12.
_PROBE_ROWS = 24
_PROBE_DENSE_SHARE = 0.05
_PROBE_ROW_ENTRIES = 64


def _probe_columns(rng: np.random.Generator, rows: np.ndarray, vocab: int, share: float) -> np.ndarray:
    """Flat indices (increasing) of random columns of ``rows`` (increasing), about ``share``
    of each row's, drawn as gaps (no pass over the full rows)."""
    n = int(vocab * share * 1.5) + 16
    cols = np.cumsum(rng.geometric(min(1.0, share), size=(rows.size, n)), axis=1) - 1
    flat = rows[:, None] * vocab + cols
    return flat[cols < vocab]


@functools.lru_cache(maxsize=256)
def _lanes_for(batch: int, vocab: int, threads: int) -> Optional[int]:
    rng = np.random.default_rng(vocab * 1_000_003 + batch)
    all_rows = np.arange(batch, dtype=np.int64)
    dense_rows = np.unique(np.linspace(0, batch - 1, min(batch, _PROBE_ROWS)).astype(np.int64))
    sparse_rows = np.setdiff1d(all_rows, dense_rows, assume_unique=True)
    probes = []
    for _ in range(-(-_PROBE_ROWS // dense_rows.size)):
        flat = np.sort(np.concatenate([_probe_columns(rng, dense_rows, vocab, _PROBE_DENSE_SHARE),
                                       _probe_columns(rng, sparse_rows, vocab, _PROBE_ROW_ENTRIES / vocab)]))
        # (magnitudes alike, signs mixed: nearly every addition rounds, so groupings differ)
        values = (rng.uniform(1.0, 2.0, flat.size) * rng.choice([-1.0, 1.0], flat.size)).astype(np.float32)
        full = np.zeros(batch * vocab, dtype=np.float32)
        full[flat] = values
        want = batched_row_sum(torch.from_numpy(full).view(batch, vocab))[:, 0]
        probes.append((flat, values, want.numpy().view(np.int32)))
    for lanes in _CANDIDATE_LANES:
        if all(np.array_equal(SumTree(flat, (batch, vocab), lanes)(values).view(np.int32), want)
               for flat, values, want in probes):
            return lanes
    return None


def tree_lanes(batch: int, vocab: int) -> Optional[int]:
    """The lane count with which ``SumTree`` reproduces ``batched_row_sum`` of float32 ``[batch,
    vocab]`` rows at torch's current thread count, checked on probe rows once per width and
    thread count; None when none does."""
    # (batched_row_sum sums each row alone, whatever the batch, at any thread count: one check
    # per width and thread count, a probe of two rows standing for every batch)
    return _lanes_for(min(batch, 2), vocab, torch.get_num_threads())
