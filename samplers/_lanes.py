"""torch's CPU ``softmax`` / ``log_softmax`` of rows that are mostly ``-inf``, bit for bit,
at the cost of their kept entries instead of the full rows.

The draw and the log-probabilities are defined by torch's own kernels (``torch.softmax`` and
``torch.log_softmax`` of the processed rows). On the CPU those kernels reduce a row along the
last dimension with one SIMD accumulator: lane ``i`` adds the row's terms at the columns
congruent to ``i`` modulo the vector width ``L``, in column order, and the lanes are combined
at the end; the max is exact, and ``exp`` and the final scaling or shift work entry by entry.
A removed token (``-inf``) adds ``exp(-inf) = 0``, which changes no sum. So rows packed such
that every kept entry keeps its lane (column mod ``L``) and, within its lane, its order
(``LanePacked``) give the same two sums, hence the same values at the kept entries, in a
fraction of the passes; at the removed tokens the full rows' values are 0 and ``-inf``.

``L`` is not taken on trust: ``simd_lanes`` finds it once per process and thread count by
checking the candidate widths against the kernels themselves on probe rows (``torch`` picks
its kernels by the CPU's instruction set: 16 with AVX-512, 8 with AVX2). Where no width
reproduces them, ``lane_pack`` returns None and callers use the full rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import numpy as np
import torch

from .functional._stats import compact_rows, packed_columns

#: Candidate SIMD widths (float32 lanes), the likeliest first.
_CANDIDATE_LANES = (16, 8, 32, 4, 64)
#: ``lane_pack`` declines rows whose lane layout is wider than 1 / this of ``V`` (kept entries
#: piled in a few lanes): the full rows' kernels are then about as cheap.
_MAX_WIDTH_FRACTION = 4


class LanePacked:
    """The kept entries of ``[B, V]`` float32 rows in lane-preserving packed rows (see the
    module docstring): ``values`` ``[B, W]`` (``W`` a multiple of the SIMD width, ``-inf`` in
    the free places), whose ``torch.softmax`` / ``torch.log_softmax`` equal the full rows' at
    the kept entries."""

    __slots__ = ("values", "flat", "shape", "_pos")

    def __init__(self, values: torch.Tensor, flat: np.ndarray, pos: np.ndarray, shape: tuple[int, int]) -> None:
        self.values = values
        #: the kept entries' flat indices in ``[B * V]`` (increasing)
        self.flat = flat
        self._pos = pos  # each kept entry's flat index in ``[B * W]``
        self.shape = shape

    def at_entries(self, packed: torch.Tensor) -> np.ndarray:
        """``packed``'s values (``[B, W]``, this layout) at the kept entries, in ``flat``'s order."""
        return packed.contiguous().numpy().reshape(-1)[self._pos]

    def expand(self, packed: torch.Tensor, fill: float) -> torch.Tensor:
        """``[B, V]`` float32: ``packed``'s values at the kept entries, ``fill`` elsewhere."""
        out = np.full(self.shape[0] * self.shape[1], fill, dtype=np.float32)
        out[self.flat] = self.at_entries(packed)
        return torch.from_numpy(out).view(self.shape)

    def in_token_order(self, values: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``values`` (one per kept entry, in ``flat``'s order) packed to the left of ``[B, K]``
        rows in token order (0 after each row's), and the index in ``flat`` of each row's first."""
        row, counts, starts, cols = packed_columns(self.flat, self.shape)
        width = int(counts.max())
        out = np.zeros(self.shape[0] * width, dtype=np.float32)
        out[row * width + cols] = values
        return torch.from_numpy(out).view(self.shape[0], width), starts

    def token_ids(self, at: np.ndarray) -> np.ndarray:
        """The token ids (columns of the full rows) at the packed columns ``at`` (``[B, j]``
        int64, places of kept entries, row by row)."""
        columns = np.full(self.values.numel(), -1, dtype=np.int64)
        columns[self._pos] = self.flat % self.shape[1]
        width = self.values.shape[1]
        return columns[np.arange(self.shape[0])[:, None] * width + at]

    def at_tokens(self, packed: torch.Tensor, tokens: torch.Tensor, fill: float) -> torch.Tensor:
        """``[B]`` float32: ``packed``'s value at each row's token (``tokens`` ``[B]`` int64),
        ``fill`` where the token is not a kept entry."""
        batch, vocab = self.shape
        want = np.arange(batch, dtype=np.int64) * vocab + tokens.numpy()
        i = np.minimum(np.searchsorted(self.flat, want), max(self.flat.size - 1, 0))
        found = self.flat[i] == want if self.flat.size else np.zeros(batch, dtype=np.bool_)
        out = np.full(batch, fill, dtype=np.float32)
        out[found] = self.at_entries(packed)[i[found]]
        return torch.from_numpy(out)


#: Inside ``sharing_lane_packs``: ``[(tensor, its version, lane_pack's result)]``, the latest.
_SHARED: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("samplers_lane_packs", default=None)


@contextlib.contextmanager
def sharing_lane_packs() -> Iterator[None]:
    """Within the block, ``lane_pack`` of the tensor it packed last (the same object, its
    version unchanged) returns that packing again: the draw and the log-probabilities of one
    ``sample`` call read the same processed rows. Nothing is kept past the block: a write
    through a numpy view (as between a user's calls) leaves a tensor's version as it was."""
    token = _SHARED.set([])
    try:
        yield
    finally:
        _SHARED.reset(token)


def lane_pack(x: torch.Tensor) -> Optional[LanePacked]:
    """``LanePacked`` rows of ``x`` when ``x`` (``[B, V]`` float32 on the CPU) is mostly
    ``-inf`` (``compact_rows``: after a chain, its last sampler's layout, found without a pass
    over the rows), every row keeps a finite entry and none holds NaN or ``+inf`` (which make
    the kernels' values NaN throughout the row); else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.requires_grad:
        return None
    shared = _SHARED.get()
    if shared is None:
        return _lane_pack(x)
    version = _version(x)
    if shared and shared[0][0] is x and shared[0][1] == version:
        return shared[0][2]
    rows = _lane_pack(x)
    shared[:] = [(x, version, rows)]
    return rows


def _version(x: torch.Tensor) -> Optional[int]:
    """``x``'s version counter; None for an inference tensor (``torch.inference_mode``, as
    vLLM runs), which has none: within ``sharing_lane_packs`` only the library's own code
    runs, and it does not write the processed rows between the draw and the log-probabilities."""
    return None if x.is_inference() else x._version


def _lane_pack(x: torch.Tensor) -> Optional[LanePacked]:
    lanes = simd_lanes()
    if lanes is None:
        return None
    rows = compact_rows(x)
    if rows is None:
        return None
    flat, values = rows.entries()
    kept = values != -np.inf
    if not kept.all():
        flat, values = flat[kept], values[kept]
    if not np.isfinite(values).all():
        return None
    batch, vocab = x.shape
    return _pack(flat, values, (batch, vocab), lanes)


def _pack(flat: np.ndarray, values: np.ndarray, shape: tuple[int, int], lanes: int) -> Optional[LanePacked]:
    """The lane-preserving layout of the entries ``values`` at the flat indices ``flat``
    (increasing) of ``shape`` rows; None when a row has none or the layout is too wide."""
    batch, vocab = shape
    row, col = np.divmod(flat, vocab)
    group = row * lanes + col % lanes
    counts = np.bincount(group, minlength=batch * lanes)
    per_lane = int(counts.max(initial=0))
    width = lanes * max(per_lane, 1)
    if width * _MAX_WIDTH_FRACTION > vocab or (counts.reshape(batch, lanes).sum(axis=1) == 0).any():
        return None
    # each entry's rank in its (row, lane): entries are in column order, so a stable sort by
    # group keeps each lane's order
    order = np.argsort(group, kind="stable")
    starts = np.cumsum(counts) - counts
    rank = np.empty_like(flat)
    rank[order] = np.arange(flat.size) - starts[group[order]]
    pos = row * width + rank * lanes + col % lanes
    packed = np.full(batch * width, -np.inf, dtype=np.float32)
    packed[pos] = values
    return LanePacked(torch.from_numpy(packed).view(batch, width), flat, pos, shape)


def simd_lanes() -> Optional[int]:
    """The vector width (float32 lanes) of torch's CPU softmax kernels at the current thread
    count, found by probing (see the module docstring); None when no candidate reproduces them."""
    return _lanes_for(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _lanes_for(threads: int) -> Optional[int]:
    probes = _probe_rows()
    for lanes in _CANDIDATE_LANES:
        if all(_reproduces(x, lanes) for x in probes):
            return lanes
    return None


def _probe_rows() -> list[torch.Tensor]:
    """Rows like truncated ones, many of them: a sum computed in another order often rounds
    to the same float, so one row rarely tells two widths apart. Measured on AVX-512 (16
    lanes): 8 or 32 lanes leave a row's bits intact in ~75% of the first shape's rows (scale
    2, 10% kept), so the chance that a wrong width passes all 256 is ~1e-32; the other
    shapes check long rows and their tails."""
    g = torch.Generator().manual_seed(0)
    probes = []
    for batch, vocab, kept in ((256, 4099, 0.1), (8, 32000, 0.01), (2, 128263, 0.004)):
        x = torch.randn(batch, vocab, generator=g) * 2
        x[torch.rand(batch, vocab, generator=g) >= kept] = float("-inf")
        x[:, 1] = 1.5  # (every row keeps an entry)
        probes.append(x)
    return probes


def _reproduces(x: torch.Tensor, lanes: int) -> bool:
    """Whether ``lanes``-wide packed rows give ``x``'s softmax and log_softmax bits."""
    flat = np.flatnonzero(x.numpy().reshape(-1) != -np.inf)
    batch, vocab = x.shape
    rows = _pack(flat, x.numpy().reshape(-1)[flat], (batch, vocab), lanes)
    if rows is None:
        return False
    for kernel in (torch.softmax, torch.log_softmax):
        full = kernel(x, dim=-1).numpy().reshape(-1)[flat]
        if not np.array_equal(rows.at_entries(kernel(rows.values, dim=-1)).view(np.int32), full.view(np.int32)):
            return False
    return True
