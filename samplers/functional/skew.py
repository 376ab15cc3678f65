"""Skew: reshape the final distribution just before the draw (reference torch path)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._stats import (
    ParamLike,
    cast_saturating,
    check_logits,
    row_param,
    select_rows,
    softmax_and_log_softmax,
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
    enabled = sk != 0
    vocab = logits.shape[1]
    if vocab == 0:
        return logits.clone()
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    power = torch.exp(sk)[:, None]
    p_sorted, order = torch.sort(p, dim=-1, descending=True)
    cum = torch.cumsum(p_sorted, dim=-1)

    # Tie groups of the sorted probabilities: first and last sorted position of each group.
    pos = torch.arange(vocab, device=logits.device).expand_as(order)
    differs = p_sorted[:, 1:] != p_sorted[:, :-1]
    true_col = torch.ones((order.shape[0], 1), dtype=torch.bool, device=logits.device)
    starts_group = torch.cat([true_col, differs], dim=-1)
    ends_group = torch.cat([differs, true_col], dim=-1)
    first = torch.cummax(torch.where(starts_group, pos, torch.zeros_like(pos)), dim=-1).values
    last_flipped = torch.where(ends_group, pos, torch.full_like(pos, vocab - 1)).flip(-1)
    last = torch.cummin(last_flipped, dim=-1).values.flip(-1)

    c_hi = cum.gather(-1, last).pow(power)
    c_lo = torch.where(
        first > 0,
        cum.gather(-1, (first - 1).clamp_min(0)).pow(power),
        torch.zeros_like(c_hi),
    )
    group_size = (last - first + 1).to(_F32)
    p_new_sorted = (c_hi - c_lo).clamp_min(0.0) / group_size
    p_new = torch.empty_like(p_new_sorted).scatter_(-1, order, p_new_sorted)

    p_new = torch.where(top_token_mask(l32), p_new.clamp_min(torch.finfo(_F32).tiny), p_new)
    p_new = torch.where(p > 0, p_new, torch.zeros_like(p_new))
    out = torch.log(p_new)
    return select_rows(enabled, cast_saturating(out, logits.dtype), logits)
