"""Skew: reshape the final distribution just before the draw (reference torch path)."""

from __future__ import annotations

import sys
import threading
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._stats import (
    SKEW_MAX,
    ParamLike,
    SparseRows,
    cast_saturating,
    check_logits,
    compact_rows,
    row_param,
    select_rows,
    softmax_and_log_softmax,
    sort_nonneg,
    top_token_mask,
    upcast,
)

__all__ = ["skew"]

_F32 = torch.float32


def skew(logits: Tensor, skew: ParamLike) -> Tensor:
    """Skew the distribution over tokens sorted by probability (exllamav2's definition).

    Args:
        logits: ``[B, V]`` float tensor.
        skew: ``[B]`` float32 in ``[-80, 80]`` (``exp(skew)`` a finite float32); ``0.0`` disables
            the row (bit-identical).

    Formula (SEMANTICS.md): ``p = softmax(l)`` in fp32, sorted descending;
    ``c = (cumsum(p_sorted) / sum(p)) ** exp(skew)`` (divided by the float32 total, which
    rounding leaves a few ulps off 1, so that the last sum is exactly 1 and none exceeds it:
    a large ``exp(skew)`` raises 1.0000001 to ``+inf`` and 0.99999988 to 0);
    ``p'_sorted = diff(c, prepend=0)`` (clamped at 0 against rounding), scattered back to
    token order; the result is ``log(p')``, which is ``-inf`` where ``p' == 0``.
    ``skew > 0`` moves mass toward less likely tokens, ``skew < 0`` toward the most likely
    ones. The returned logits are normalised up to rounding (``sum p'`` telescopes to the
    last ``c``, 1); softmax of them is the skewed distribution.

    Tie rule: tokens with equal probability get equal ``p'``: a group of ``n`` tied tokens
    occupying sorted positions ``i .. j`` each gets ``(c[j] - c[i - 1]) / n`` (the mean of
    what the positions would get, so the result does not depend on token ids or sort
    stability; without ties this is exactly ``diff(c)``).

    Removed tokens (``-inf``, probability 0) stay ``-inf``; so does any token whose fp32
    probability or skewed probability is 0. The row's top token(s) always keep a positive
    probability (at least the smallest normal fp32, ``log`` of which is about -87.3).

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``.
    """
    check_logits(logits)
    sk = row_param(skew, logits, _F32, "skew", -SKEW_MAX, SKEW_MAX)
    if logits.shape[1] == 0:
        return logits.clone()
    # After a truncation: sort only the tokens still in (the cumulative sums of the sorted
    # probabilities are prefix sums, the same on packed rows).
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand(_skew(sparse.logits, sk, sparse))
    return _skew(logits, sk)


def _skew(logits: Tensor, sk: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = sk != 0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    power = torch.exp(sk)[:, None]
    if _numpy_path_ok(p) and bool(torch.isfinite(power).all()):
        out = _skew_numpy(l32, p, power, sparse is not None)
        if out is not None:
            # (its values are -inf or logs of normal or subnormal floats no larger than a
            # finite fp32: magnitudes below 104, which every float dtype holds: a plain cast
            # is cast_saturating's result)
            return select_rows(enabled, out.to(logits.dtype), logits)
        p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)  # (p was overwritten)
    out = _skew_torch(l32, p, power, sparse is not None)
    return select_rows(enabled, cast_saturating(out, logits.dtype), logits)


def _skew_torch(l32: Tensor, p: Tensor, power: Tensor, packed: bool) -> Tensor:
    """log p' in token order, on any device (``_skew_numpy`` is the CPU's faster route to the
    same values)."""
    p_sorted, order = sort_nonneg(p, descending=True)
    # c = cumsum(p_sorted) ** power; c_prev the same shifted by one (0 before position 0).
    c = _cumsum_pow(p_sorted, power, packed)
    c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=-1)
    if l32.device.type == "cpu":
        p_new_sorted = _skew_sorted_sparse_ties(p_sorted, c, c_prev)
    else:
        p_new_sorted = _skew_sorted_dense(p_sorted, c, c_prev)
    p_new = torch.empty_like(p_new_sorted).scatter_(-1, order, p_new_sorted)

    # The top token(s) keep at least the smallest normal probability (few entries: indexed on
    # the CPU; elsewhere a masked pass, as the indices would be a device read).
    top_mask = top_token_mask(l32)
    if l32.device.type == "cpu":
        top = top_mask.nonzero(as_tuple=True)
        p_new[top] = p_new[top].clamp_min(torch.finfo(_F32).tiny)
    else:
        p_new = torch.where(top_mask, p_new.clamp_min(torch.finfo(_F32).tiny), p_new)
    # log(p') where p > 0, -inf elsewhere (and where p' = 0). log(0) is slow on the CPU, so
    # zeros are replaced by 1 before the log and set to -inf after it (x * 1, x + 0 exact).
    if p.device.type == "cpu" and p.is_contiguous() and p_new.is_contiguous():
        pn, qn = p.numpy(), p_new.numpy()
        qn *= pn > 0  # (numpy's bool masks and bool -> float, several times faster than torch's)
        zero = torch.from_numpy((qn == 0).astype(np.float32))
    else:
        p_new.mul_((p > 0).to(_F32))
        zero = (p_new == 0).to(_F32)
    out = p_new.add_(zero).log_()
    cap = zero.sub_(0.5).mul_(float("-inf"))  # -inf where p' = 0, +inf elsewhere
    return torch.minimum(out, cap, out=cap)


def _cumsum_pow(p_sorted: Tensor, power: Tensor, packed: bool, in_place: bool = False) -> Tensor:
    """``(cumsum(p_sorted) / total) ** power`` along the rows (the one place both routes
    compute it, so both get the same bits: torch's ``pow`` rounds differently in a row's
    scalar tail).
    ``in_place``: the sums overwrite ``p_sorted`` (the same values), and so do the powers
    unless the rows are packed."""
    c = p_sorted.cumsum_(dim=-1) if in_place else torch.cumsum(p_sorted, dim=-1)
    # The sums are divided by the row's total (the last sum), which rounding leaves a few ulps
    # off 1: past it (1.0000001), a large exp(skew) raises the tail to +inf (skew 21:
    # 1.0000001 ** 1.3e9) and differences of +inf are NaN; short of it (0.99999988), to 0, and
    # the mass that belongs to the least likely token goes nowhere (the top-token floor then
    # hands the row to the most likely one). A correctly rounded c / total of c <= total is at
    # most 1, and the total's own quotient is exactly 1. (A row with every token removed has
    # the total 0: at least 1 / V otherwise; the floor keeps its 0 / 0 out of NaN.)
    c.div_(c[:, -1:].clamp_min(torch.finfo(_F32).tiny))
    return c.pow_(power) if not packed else _pow_packed(c, power)


def _numpy_path_ok(p: Tensor) -> bool:
    """Whether ``_skew_numpy`` may try ``p`` (its keys hold flat indices in int32 halves)."""
    return (p.device.type == "cpu" and p.dtype == _F32 and p.dim() == 2 and p.is_contiguous()
            and not p.requires_grad and 0 < p.numel() < 2**31 and sys.byteorder == "little")


#: A row whose first sorted key has a high half below this holds a probability >= 2, NaN or
#: with its sign bit set: only non-finite logits produce those (the torch route takes them).
_KEY_SANE_MIN = 0x40000000


def _skew_numpy(l32: Tensor, p: Tensor, power: Tensor, packed: bool) -> Optional[Tensor]:
    """``_skew_torch``'s values on a contiguous CPU float32 ``p`` (a fresh tensor of the
    caller's, which this overwrites, also when it returns None), or None where NaN or
    infinite probabilities (non-finite logits) turn up: those go the torch route, whose
    results, NaN's sign and payload included, are then the answer.

    Everything after the sort happens in sorted order, where a row is contiguous (the tie
    groups, the top token(s), the zeros and the log, which torch computes the same way in
    any layout), and one scatter puts the final values in token order. The sort is one
    numpy sort of int64 keys ``(0x7FFFFFFF - bits(p)) << 32 | flat index`` (``sort_nonneg``'s
    order), written as the two int32 halves of each key: the sorted values are read back
    from the high halves (no gather), the scatter's indices from the low halves.

    Fresh ``[B, V]`` buffers cost page faults comparable to the passes over them, so there is
    none: ``p``'s buffer holds the sorted probabilities, then their skewed cumulative sums,
    then the result; p', the keys and the masks live in per-thread scratch buffers
    (``_scratch_array``: 13 bytes per entry of ``p``, kept between calls up to a size).
    """
    batch, width = p.shape
    n = batch * width
    key = _scratch_array("key", n, np.int64)
    halves = key.view(np.int32).reshape(batch, width, 2)  # little-endian: [..., 0] is the low half
    np.subtract(0x7FFFFFFF, p.numpy().view(np.int32), out=halves[..., 1])
    # (the low halves: flat indices, row * width + column, which order a row as its columns do)
    np.add(np.arange(width, dtype=np.int32), (np.arange(batch, dtype=np.int32) * width)[:, None],
           out=halves[..., 0])
    key.reshape(batch, width).sort(axis=-1)
    if bool((halves[:, 0, 1] < _KEY_SANE_MIN).any()):
        return None
    buf = p.numpy()  # p, then sorted p, then c, then the result
    ps = buf
    np.subtract(0x7FFFFFFF, halves[..., 1], out=ps.view(np.int32))
    has_zero_p = bool((ps[:, -1] == 0).any())
    mask = _scratch_array("mask", n, np.bool_)
    groups = _sorted_tie_groups(ps, has_zero_p, mask)
    positive = None
    if has_zero_p:
        positive = mask.reshape(batch, width)
        np.greater(ps, 0, out=positive)
    c = _cumsum_pow(p, power, packed, in_place=True).numpy()  # (in [0, 1]: finite)
    d = _scratch_array("d", n, np.float32).reshape(batch, width)  # p' in sorted order
    first, last = _apply_tie_rule(c, d, groups)
    _clamp_top_sorted(l32, halves, d, first, last)
    if positive is not None:
        d *= positive
    # log(p') with log(0) = -inf, p' clamped at 0; log(0) is slow on the CPU: the zeros (and
    # any negative p') are replaced by 1 first, then their logs (0) by -inf
    zero = mask.reshape(batch, width)
    np.less_equal(d, 0, out=zero)
    np.maximum(d, zero, out=d)
    torch.from_numpy(d).log_()
    # log(1) = +0.0: OR-ing in -inf's bits gives -inf (a masked copy mispredicts its branches)
    or_bits = buf.view(np.int32)  # (c is no longer needed)
    np.multiply(zero, np.int32(_NEG_INF_BITS), out=or_bits)
    np.bitwise_or(d.view(np.int32), or_bits, out=d.view(np.int32))
    np.bitwise_and(key, 0xFFFFFFFF, out=key)  # back to token order
    buf.reshape(-1)[key] = d.reshape(-1)
    return p


_scratch = threading.local()

#: Scratch arrays are kept between calls up to this many entries (13 bytes each: at most
#: ~52 MiB per thread); larger calls allocate theirs afresh.
_SCRATCH_KEEP_MAX = 1 << 22


def _scratch_array(name: str, size: int, dtype: type) -> np.ndarray:
    """A 1-D array of ``size`` elements (contents undefined): a per-thread one kept between
    calls (and grown when too small) up to ``_SCRATCH_KEEP_MAX`` entries, a fresh one above."""
    if size > _SCRATCH_KEEP_MAX:
        return np.empty(size, dtype=dtype)
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:size]


def _sorted_tie_groups(ps: np.ndarray, has_zero_p: bool, mask: np.ndarray) -> Optional[tuple]:
    """The groups of equal positive values in the rows of ``ps`` (``[B, W]``, sorted), as
    ``_apply_tie_rule`` takes them: None when there are none; ``("few", pos, starts)``: the
    flat positions (``[B * W]`` numbering) of every member but each group's first,
    ascending, and which of them open a group; ``("many", firsts, group)`` when most
    positions are tied (low-precision logits): every group's first flat position, singletons
    included, and each position's group number, counted from 1. ``mask``: scratch, at least ``B * W`` bools."""
    batch, width = ps.shape
    if width < 2:
        return None
    tie = mask[:batch * (width - 1)].reshape(batch, width - 1)
    np.equal(ps[:, 1:], ps[:, :-1], out=tie)  # position k + 1 ties position k
    if has_zero_p:
        tie &= ps[:, 1:] > 0
    n_tied = np.count_nonzero(tie)
    if n_tied == 0:
        return None
    if n_tied * _MANY_TIES > ps.size:
        starts = np.ones((batch, width), dtype=np.bool_)
        np.logical_not(tie, out=starts[:, 1:])
        starts = starts.reshape(-1)
        # (each position's group, counted from 1; int32: numpy's cumsum of bools into int64
        # is several times slower)
        return "many", np.flatnonzero(starts), np.cumsum(starts, dtype=np.int32)
    later = np.flatnonzero(tie)
    rows, cols = np.divmod(later, width - 1)
    pos = rows * width + cols + 1
    starts = np.ones(pos.size, dtype=np.bool_)
    starts[1:] = pos[1:] != pos[:-1] + 1
    return "few", pos, starts


#: ``_sorted_tie_groups`` describes the groups position by position when more than 1 / this
#: of the positions are tied (index arrays over the tied positions cost more then).
_MANY_TIES = 4


def _apply_tie_rule(c: np.ndarray, d: np.ndarray, groups: Optional[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """p' in sorted order into ``d`` (``[B, W]``): ``c[k] - c[k-1]`` (``c[-1]`` = 0; negative
    values, which the caller counts as 0, are possible only if ``pow`` is not monotone),
    except that a group of ``n`` equal positive probabilities at positions ``i .. j`` of a
    row gets ``max(c[j] - c[i-1], 0) / n`` at each (the tie rule). ``groups``:
    ``_sorted_tie_groups``'. Returns the groups' first and last flat positions."""
    batch, width = d.shape
    if groups is None or groups[0] == "few":  # (the clamp at 0 is left to the caller)
        np.subtract(c[:, 1:], c[:, :-1], out=d[:, 1:])
        d[:, 0] = c[:, 0]
    if groups is None:
        return _EMPTY, _EMPTY
    kind, pos, marks = groups
    if kind == "few":
        first, last = pos[marks] - 1, pos[np.append(marks[1:], True)]
    else:
        first = pos
        last = np.append(first[1:] - 1, batch * width - 1)
    # (c: packed rows' are a view of wider rows, see _pow_packed: indexed by row and column)
    prev = np.maximum(first - 1, 0)
    before = np.where(first % width > 0, c[prev // width, prev % width], np.float32(0.0))
    size = (last - first + 1).astype(np.float32)
    value = np.maximum(c[last // width, last % width] - before, np.float32(0.0)) / size
    df = d.reshape(-1)
    if kind == "few":
        df[first] = value
        df[pos] = value[np.cumsum(marks) - 1]
    else:  # (singletons too: x / 1 is x)
        np.take(np.concatenate([value[:1], value]), marks, out=df)  # (groups counted from 1)
    return first, last


_EMPTY = np.zeros(0, dtype=np.int64)


def _clamp_top_sorted(l32: Tensor, halves: np.ndarray, d: np.ndarray,
                      first: np.ndarray, last: np.ndarray) -> None:
    """The row's top token(s) (``top_token_mask``: finite logits equal to the row max) keep at
    least the smallest normal probability, in place on ``d`` (sorted order).

    With every probability finite (``_skew_numpy`` checked; a NaN or ``+inf`` logit makes
    its row's NaN), the row max's tokens have the row's largest probability
    (``exp(0) / sum``), so they sit at position 0 or in the tie group starting there
    (``first`` / ``last``: ``_sorted_tie_groups``' groups): the row max is the largest
    logit among those few candidates."""
    batch, width = d.shape
    counts = np.ones(batch, dtype=np.int64)
    at_zero = first % width == 0
    counts[first[at_zero] // width] = last[at_zero] - first[at_zero] + 1
    offsets = np.cumsum(counts) - counts
    rows = np.repeat(np.arange(batch), counts)
    pos = rows * width + (np.arange(rows.size) - offsets[rows])  # flat sorted positions
    cols = halves.reshape(-1, 2)[pos, 0].astype(np.int64) - rows * width
    cand = l32[torch.from_numpy(rows), torch.from_numpy(cols)].numpy()
    row_max = np.maximum.reduceat(cand, offsets)[rows]
    top = pos[(cand == row_max) & (row_max > -np.inf)]
    df = d.reshape(-1)
    df[top] = np.maximum(df[top], _TINY)


_TINY = np.float32(torch.finfo(_F32).tiny)
_NEG_INF_BITS = int(np.float32(-np.inf).view(np.int32))


#: Packed rows are raised to the power on a width that is a multiple of this (see _pow_packed).
_POW_ALIGN = 64


def _pow_packed(c: Tensor, power: Tensor) -> Tensor:
    """``c ** power`` for packed rows, with the values the full rows get. torch's CPU loops
    compute the last ``width mod (2 * vector width)`` entries of a row (of a thread's chunk)
    with the scalar ``pow``, which can differ from the vectorised one in the last place; in
    the full rows the packed positions (the first ``V / 8``) are never among those, so the
    packed rows are padded to a multiple of 64 columns to take the vector path too (also
    when two threads split the rows: they split at a multiple of 32 columns)."""
    batch, width = c.shape
    padded = -(-width // _POW_ALIGN) * _POW_ALIGN
    buf = c.new_ones(batch, padded)
    buf[:, :width] = c
    return buf.pow_(power)[:, :width]


def _skew_sorted_dense(p_sorted: Tensor, c: Tensor, c_prev: Tensor) -> Tensor:
    """p' in sorted order: a tie group at sorted positions i..j gets (c[j] - c[i-1]) / n each."""
    batch, vocab = p_sorted.shape
    pos = torch.arange(vocab, device=p_sorted.device).expand(batch, vocab)
    differs = p_sorted[:, 1:] != p_sorted[:, :-1]
    true_col = torch.ones((batch, 1), dtype=torch.bool, device=p_sorted.device)
    starts_group = torch.cat([true_col, differs], dim=-1)
    ends_group = torch.cat([differs, true_col], dim=-1)
    first = torch.cummax(torch.where(starts_group, pos, torch.zeros_like(pos)), dim=-1).values
    last_flipped = torch.where(ends_group, pos, torch.full_like(pos, vocab - 1)).flip(-1)
    last = torch.cummin(last_flipped, dim=-1).values.flip(-1)
    group_size = (last - first + 1).to(_F32)
    return (c.gather(-1, last) - c_prev.gather(-1, first)).clamp_min(0.0) / group_size


def _skew_sorted_sparse_ties(p_sorted: Tensor, c: Tensor, c_prev: Tensor) -> Tensor:
    """Same values as ``_skew_sorted_dense`` at every position with ``p > 0`` (positions with
    ``p = 0`` are discarded by the caller): singletons get ``c - c_prev`` (dividing by a
    group size of 1 is exact); only the few positions tied with a neighbour are grouped,
    from their list of indices (no full-width cumulative max/min)."""
    out = (c - c_prev).clamp_min_(0.0)
    # Boolean work in numpy (several times faster than torch's boolean CPU kernels).
    ps = p_sorted.contiguous().numpy()
    tie_next_np = (ps[:, 1:] == ps[:, :-1]) & (ps[:, 1:] > 0)  # k+1 ties k
    tied = np.zeros(ps.shape, dtype=np.bool_)
    tied[:, 1:] |= tie_next_np
    tied[:, :-1] |= tie_next_np
    # row-major: a group's positions are consecutive
    rows, cols = (torch.from_numpy(a) for a in np.divmod(np.flatnonzero(tied), ps.shape[1]))
    tie_next = torch.from_numpy(tie_next_np)
    if rows.numel() == 0:
        return out
    same = torch.zeros_like(rows, dtype=torch.bool)
    same[1:] = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1] + 1) & tie_next[rows[1:], (cols[1:] - 1).clamp_min(0)]
    starts = ~same
    ends = torch.cat([starts[1:], torch.ones_like(starts[:1])])
    group = torch.cumsum(starts.to(torch.int64), dim=0) - 1
    first = cols[starts][group]
    last = cols[ends][group]
    size = (last - first + 1).to(_F32)
    out[rows, cols] = (c[rows, last] - c_prev[rows, first]).clamp_min(0.0) / size
    return out
