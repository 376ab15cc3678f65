"""Skew: reshape the final distribution just before the draw (reference torch path)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._stats import (
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
        skew: ``[B]`` float32, any value; ``0.0`` disables the row (bit-identical).

    Formula (SEMANTICS.md): ``p = softmax(l)`` in fp32, sorted descending;
    ``c = cumsum(p_sorted) ** exp(skew)``; ``p'_sorted = diff(c, prepend=0)`` (clamped at 0
    against rounding), scattered back to token order; the result is ``log(p')``, which is
    ``-inf`` where ``p' == 0``. ``skew > 0`` moves mass toward less likely tokens,
    ``skew < 0`` toward the most likely ones. The returned logits are not normalised
    (``sum p'`` is ``(sum p) ** exp(skew)``, 1 up to rounding); softmax of them is the skewed
    distribution.

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
    sk = row_param(skew, logits, _F32, "skew")
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
    p_sorted, order = sort_nonneg(p, descending=True)
    # c = cumsum(p_sorted) ** power; c_prev the same shifted by one (0 before position 0).
    c = torch.cumsum(p_sorted, dim=-1)
    c = c.pow_(power) if sparse is None else _pow_packed(c, power)
    c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=-1)
    if logits.device.type == "cpu":
        p_new_sorted = _skew_sorted_sparse_ties(p_sorted, c, c_prev)
    else:
        p_new_sorted = _skew_sorted_dense(p_sorted, c, c_prev)
    p_new = torch.empty_like(p_new_sorted).scatter_(-1, order, p_new_sorted)

    # The top token(s) keep at least the smallest normal probability (few entries: indexed).
    top = top_token_mask(l32).nonzero(as_tuple=True)
    p_new[top] = p_new[top].clamp_min(torch.finfo(_F32).tiny)
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
    out = torch.minimum(out, cap, out=cap)
    return select_rows(enabled, cast_saturating(out, logits.dtype), logits)


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
