"""Skew: reshape the final distribution just before the draw (reference torch path)."""

from __future__ import annotations

import sys
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ._stats import (
    ParamLike,
    SparseRows,
    cast_saturating,
    check_logits,
    compact_rows,
    sampler_param,
    select_rows,
    softmax_and_log_softmax,
    sort_nonneg,
    top_token_mask,
    upcast,
)
from ._threads import sort_rows_

__all__ = ["skew"]

_F32 = torch.float32
_TINY_F32 = torch.finfo(_F32).tiny


def skew(logits: Tensor, skew: ParamLike) -> Tensor:
    """Skew the distribution over tokens sorted by probability (exllamav2's definition).

    Args:
        logits: ``[B, V]`` float tensor.
        skew: ``[B]`` float32 in ``[-80, 80]`` (``exp(skew)`` a finite float32); ``0.0`` disables
            the row (bit-identical).

    Formula (SEMANTICS.md): ``p = softmax(l)`` in fp32, sorted descending;
    ``c = cumsum(p_sorted) / sum(p)`` (divided by the float32 total, which rounding leaves a
    few ulps off 1, so that the last sum is exactly 1 and none exceeds it);
    ``p'_sorted = diff(c ** exp(skew), prepend=0)``, scattered back to token order; the
    result is ``log(p')``, which is ``-inf`` where ``p' == 0``. ``skew > 0`` moves mass toward
    less likely tokens, ``skew < 0`` toward the most likely ones. The difference is taken in
    a form that keeps every ``p'``, down to the least likely token's, within a few ulps
    (times ``exp(skew)``) of its value (``_skewed_sorted``): a plain difference of rounded
    powers gives the tail tokens, whose terms no longer change a float32 sum, 0 or an ulp of
    1. The returned logits are normalised up to rounding (``sum p'`` telescopes to 1);
    softmax of them is the skewed distribution.

    Tie rule: tokens with equal probability get equal ``p'``: a group of ``n`` tied tokens
    occupying sorted positions ``i .. j`` each gets ``(c[j] ** e - c[i - 1] ** e) / n`` (the
    mean of what the positions would get, so the result does not depend on token ids or sort
    stability).

    Removed tokens (``-inf``, probability 0) stay ``-inf``; so does any token whose fp32
    probability or skewed probability is 0. The row's top token(s) always keep a positive
    probability (at least the smallest normal fp32, ``log`` of which is about -87.3).

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``.
    """
    check_logits(logits)
    sk = sampler_param(skew, logits, "skew")
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
        out = _skew_numpy(l32, p, power)
        if out is not None:
            # (its values are -inf or logs of normal or subnormal floats no larger than a
            # finite fp32: magnitudes below 104, which every float dtype holds: a plain cast
            # is cast_saturating's result)
            return select_rows(enabled, out.to(logits.dtype), logits)
        p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)  # (p was overwritten)
    out = _skew_torch(l32, p, power)
    return select_rows(enabled, cast_saturating(out, logits.dtype), logits)


def _skew_torch(l32: Tensor, p: Tensor, power: Tensor) -> Tensor:
    """log p' in token order, on any device (``_skew_numpy`` is the CPU's faster route to the
    same values)."""
    p_sorted, order = sort_nonneg(p, descending=True)
    parts = _skewed_sorted(p_sorted, power)
    if l32.device.type == "cpu":
        p_new_sorted = _with_ties_listed(parts, power)
    else:
        p_new_sorted = _with_ties_dense(parts, power)
    p_new_sorted = p_new_sorted[:, :p_sorted.shape[1]]
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


class _SkewedSorted(NamedTuple):
    """``_skewed_sorted``'s results, ``[B, W']`` float32 each, in sorted order, on the rows
    padded to ``W'`` columns (``_padded``; the rows' own ``W`` first)."""

    p_sorted: Tensor  #: the padded rows
    untied: Tensor  #: p' of each position as if no two probabilities were equal
    prefix: Tensor  #: cumsum(p_sorted)
    top: Tensor  #: c ** exp(skew), c = prefix / total


#: Rows whose ``exp(skew)`` is above this take ``c`` near 1 from the sums of the later terms
#: (``_skewed_sorted``); below it, raising a ``c`` rounded to the nearest float32 costs ``p'``
#: at most ~this many ulps (1e-6 relative).
_SUFFIX_POWER_MIN = 16.0


def _skewed_sorted(p_sorted: Tensor, power: Tensor) -> _SkewedSorted:
    """The skewed probabilities of sorted rows ``p_sorted`` (``[B, W]`` float32, descending,
    zeros last; ``power``: ``[B, 1]``, ``exp(skew)``) as if untied, with the sums the GPU's tie
    groups start from (``_tie_group_values``). Every route computes them here, on rows padded
    to a multiple of 64 columns (``_padded``), so that all get the same bits.

    ``c = prefix / total`` (the float32 total is a few ulps off 1: divided by it, the last sum
    is exactly 1 and none exceeds it) and ``p'_k = c_k ** e - c_(k-1) ** e`` (``e = power``,
    ``c_(-1) = 0``), in a form that keeps each ``p'``, however small, within a few ulps (times
    ``e``) of that difference of the rounded sums' exact powers:

    - ``p'_k = c_k ** e * -expm1(-e * log1p(p_k / prefix_(k-1)))``: the ratio
      ``c_k / c_(k-1)`` taken from the term itself, not from two rounded sums;
      ``p'_0 = c_0 ** e``;
    - ``c ** e = exp(e * log c)``; where ``e > 16`` (``_SUFFIX_POWER_MIN``) and ``c_k >= 1/2``,
      ``log c_k = log1p(-later_k / total)`` (``later_k``: the sum of the terms after position
      k, summed from the row's end), since near 1 the prefix sums have rounded the tail terms
      away (past the point where a float32 sum stops changing, every later ``c`` is the same
      float), which a large power magnifies.

    The plain difference of the rounded powers gave each tail token 0 or a multiple of an ulp
    of 1: on a [1, 128256] row of ``randn * 3`` logits, a third of the tokens removed at any
    skew, and at a large one the row's mass on the first token where the sums stopped
    changing instead of the least likely."""
    p_sorted = _padded(p_sorted)
    prefix = torch.cumsum(p_sorted, dim=-1)
    total = prefix[:, -1:].clamp_min(_TINY_F32)  # (0 only in a row with every token removed)
    # (c >= p_0 >= 1 / V but in an empty row, whose 0 the floor keeps from 0 * log 0 = NaN
    # at an underflowed power)
    c = torch.div(prefix, total).clamp_min_(_TINY_F32)
    large = power > _SUFFIX_POWER_MIN
    # (no host read off the CPU: there every row takes the choice below)
    suffix = p_sorted.device.type != "cpu" or bool(large.any())
    near_one = (c >= 0.5) & large if suffix else None
    log_c = c.log_()
    if near_one is not None:  # (suffix)
        later = torch.empty_like(prefix)
        later[:, -1] = 0.0
        later[:, :-1] = torch.cumsum(p_sorted.flip(-1), dim=-1).flip(-1)[:, 1:]
        log_c = torch.where(near_one, later.div_(total).neg_().log1p_(), log_c)
    top = log_c.mul_(power).exp_()
    untied = torch.empty_like(prefix)
    untied[:, 0] = 1.0  # (a placeholder: position 0 is set below)
    untied[:, 1:] = prefix[:, :-1]
    # (every prefix sum after the first is at least p_0 > 0 unless the row is empty; the floor
    # keeps an empty row's 0 / 0 out of NaN)
    torch.div(p_sorted, untied.clamp_min_(_TINY_F32), out=untied)
    untied.log1p_().mul_(-power).expm1_().neg_()
    untied[:, 0] = 1.0
    untied.mul_(top)
    return _SkewedSorted(p_sorted, untied, prefix, top)


def _tie_group_values(parts: _SkewedSorted, power: Tensor, rows: Tensor, first: Tensor,
                      last: Tensor) -> Tensor:
    """p' of each member of the tie groups at sorted positions ``first .. last`` of the rows
    ``rows`` (1-D int64; groups of at least two equal positive probabilities): a group of ``n``
    equal probabilities ``p`` gets ``(c_last ** e - c_(first-1) ** e) / n`` each, in
    ``_skewed_sorted``'s form: ``top_last * -expm1(-e * log1p(n p / prefix_(first-1))) / n``
    (``top_last / n`` for a group at position 0; ``_group_value``). The list is padded to a multiple of 64 entries, so that every ``log1p`` and
    ``expm1`` runs in torch's vectorised loop, as at full width: a group's bits then depend on
    neither the other groups nor the route."""
    count = rows.numel()
    if count % _ALIGN:
        fill = torch.zeros(-count % _ALIGN, dtype=rows.dtype)
        rows, first, last = (torch.cat([t, t[fill]]) for t in (rows, first, last))
    return _group_value(parts.p_sorted[rows, first], first, last - first + 1,
                        parts.prefix[rows, (first - 1).clamp_min(0)], parts.top[rows, last],
                        power[rows, 0])[:count]


def _group_value(p: Tensor, first: Tensor, size: Tensor, prefix_before: Tensor, top_last: Tensor,
                 power: Tensor) -> Tensor:
    """Each member's p' in a tie group of ``size`` probabilities ``p`` starting at sorted
    position ``first`` (``prefix_before``: the prefix sum at ``first - 1``, any value where
    ``first`` is 0; ``top_last``: ``c ** e`` at the group's last position), elementwise on
    operands of one shape: ``top_last * -expm1(-e * log1p(size p / prefix_before)) / size``,
    ``top_last / size`` at position 0. The one place both tie routes compute it, so they run
    the same operations in the same order."""
    size = size.to(_F32)
    d = (p * size).div_(prefix_before.clamp_min(_TINY_F32)).log1p_().mul_(-power).expm1_().neg_()
    return torch.where(first > 0, d, 1.0).mul_(top_last).div_(size)


def _numpy_path_ok(p: Tensor) -> bool:
    """Whether ``_skew_numpy`` may try ``p`` (its keys hold flat indices in int32 halves)."""
    return (p.device.type == "cpu" and p.dtype == _F32 and p.dim() == 2 and p.is_contiguous()
            and not p.requires_grad and 0 < p.numel() < 2**31 and sys.byteorder == "little")


#: A row whose first sorted key has a high half below this holds a probability >= 2, NaN or
#: with its sign bit set: only non-finite logits produce those (the torch route takes them).
_KEY_SANE_MIN = 0x40000000


def _skew_numpy(l32: Tensor, p: Tensor, power: Tensor) -> Optional[Tensor]:
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

    Fresh ``[B, V]`` buffers cost page faults comparable to the passes over them, so there are
    few: ``p``'s buffer holds the sorted probabilities, then the result; the keys and the
    masks live in per-thread scratch buffers (``_scratch_array``: 9 bytes per entry of ``p``,
    kept between calls up to a size); ``_skewed_sorted`` makes p' and the sums it needs.
    """
    batch, width = p.shape
    n = batch * width
    key = _scratch_array("key", n, np.int64)
    halves = key.view(np.int32).reshape(batch, width, 2)  # little-endian: [..., 0] is the low half
    np.subtract(0x7FFFFFFF, p.numpy().view(np.int32), out=halves[..., 1])
    # (the low halves: flat indices, row * width + column, which order a row as its columns do)
    np.add(np.arange(width, dtype=np.int32), (np.arange(batch, dtype=np.int32) * width)[:, None],
           out=halves[..., 0])
    sort_rows_(key.reshape(batch, width))
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
    parts = _skewed_sorted(p, power)
    d = parts.untied[:, :width].contiguous().numpy()  # p' in sorted order
    first, last = _apply_tie_rule(d, groups, parts, power)
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
    or_bits = buf.view(np.int32)  # (the sorted p is no longer needed)
    np.multiply(zero, np.int32(_NEG_INF_BITS), out=or_bits)
    np.bitwise_or(d.view(np.int32), or_bits, out=d.view(np.int32))
    np.bitwise_and(key, 0xFFFFFFFF, out=key)  # back to token order
    buf.reshape(-1)[key] = d.reshape(-1)
    return p


_scratch = threading.local()

#: Scratch arrays are kept between calls up to this many entries (9 bytes each: at most
#: ~36 MiB per thread); larger calls allocate theirs afresh.
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
        starts: np.ndarray = np.ones((batch, width), dtype=np.bool_)
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


def _apply_tie_rule(d: np.ndarray, groups: Optional[tuple], parts: _SkewedSorted,
                    power: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Overwrites the members of the tie groups (``_sorted_tie_groups``' ``groups``) in ``d``
    (``[B, W]``, p' in sorted order as if untied) with ``_tie_group_values``. Returns the
    groups' first and last flat positions (groups of at least two members only)."""
    if groups is None:
        return _EMPTY, _EMPTY
    batch, width = d.shape
    kind, pos, marks = groups
    if kind == "few":
        first, last = pos[marks] - 1, pos[np.append(marks[1:], True)]
    else:  # (every group, singletons included: only the others are tie groups)
        last = np.append(pos[1:] - 1, batch * width - 1)
        tie_group = last > pos
        first, last = pos[tie_group], last[tie_group]
    rows, first_col = np.divmod(first, width)
    values = _tie_group_values(parts, power, torch.from_numpy(rows), torch.from_numpy(first_col),
                               torch.from_numpy(last - rows * width)).numpy()
    df = d.reshape(-1)
    if kind == "few":
        df[first] = values
        df[pos] = values[np.cumsum(marks) - 1]
    else:  # (marks: each position's group, counted from 1)
        member = tie_group[marks - 1]
        df[member] = values[(np.cumsum(tie_group) - 1)[marks[member] - 1]]
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


#: ``_skewed_sorted`` computes on a width that is a multiple of this (see _padded).
_ALIGN = 64


def _padded(p_sorted: Tensor) -> Tensor:
    """Sorted rows with zeros appended up to a multiple of 64 columns (the rows themselves
    when their width is one). torch's CPU loops compute the last ``n mod (2 * vector width)``
    entries of a loop (a row, a flat tensor, a thread's chunk) with the scalar ``log`` /
    ``exp`` / ``log1p`` / ``expm1``, which can differ from the vectorised ones in the last
    place; on this width there are none (also when two threads split the work: they split at
    a multiple of 32 columns), so a row gets the same bits alone, in any batch and packed
    (``SparseRows``: its kept tokens are the full row's first positions). The zeros are what
    full rows hold after their kept tokens: probability 0, which changes no sum."""
    batch, width = p_sorted.shape
    if width % _ALIGN == 0:
        return p_sorted
    buf = p_sorted.new_zeros(batch, -(-width // _ALIGN) * _ALIGN)
    buf[:, :width] = p_sorted
    return buf


def _with_ties_dense(parts: _SkewedSorted, power: Tensor) -> Tensor:
    """p' in sorted order, every position at once (no index lists: no host read off the CPU):
    a tie group of ``n`` equal probabilities ``p`` at sorted positions i..j gets
    ``(c_j ** e - c_(i-1) ** e) / n`` at each member, in ``_skewed_sorted``'s form
    (``_group_value``)."""
    p_sorted = parts.p_sorted
    batch, vocab = p_sorted.shape
    pos = torch.arange(vocab, device=p_sorted.device).expand(batch, vocab)
    differs = p_sorted[:, 1:] != p_sorted[:, :-1]
    true_col = torch.ones((batch, 1), dtype=torch.bool, device=p_sorted.device)
    starts_group = torch.cat([true_col, differs], dim=-1)
    ends_group = torch.cat([differs, true_col], dim=-1)
    first = torch.cummax(torch.where(starts_group, pos, torch.zeros_like(pos)), dim=-1).values
    last_flipped = torch.where(ends_group, pos, torch.full_like(pos, vocab - 1)).flip(-1)
    last = torch.cummin(last_flipped, dim=-1).values.flip(-1)
    size = last - first + 1
    # (p at a member is p at its group's first)
    grouped = _group_value(p_sorted, first, size, parts.prefix.gather(-1, (first - 1).clamp_min(0)),
                           parts.top.gather(-1, last), power)
    return torch.where(size > 1, grouped, parts.untied)


def _with_ties_listed(parts: _SkewedSorted, power: Tensor) -> Tensor:
    """``_with_ties_dense``'s values at every position with ``p > 0`` (positions with ``p = 0``
    are discarded by the caller), in place on ``parts.untied``: only the few positions tied
    with a neighbour are grouped, from their list of indices (no full-width cumulative
    max/min)."""
    out = parts.untied
    # Boolean work in numpy (several times faster than torch's boolean CPU kernels).
    ps = parts.p_sorted.contiguous().numpy()
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
    values = _tie_group_values(parts, power, rows[starts], cols[starts], cols[ends])
    out[rows, cols] = values[torch.cumsum(starts.to(torch.int64), dim=0) - 1]
    return out
