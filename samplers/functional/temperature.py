"""Temperature family: temperature, dynamic temperature, quadratic smoothing (reference torch path).

Each function takes ``logits`` ``[B, V]`` (fp32, fp16 or bf16, any device) and per-row
float32 parameters ``[B]``, computes in fp32 and returns a NEW tensor of the input's dtype
and shape. ``-inf`` (removed) logits stay ``-inf``; a row whose parameters have the disabled
value comes out bit-identical. Finite results that would overflow the output dtype (e.g. a
small temperature on fp16 logits) saturate at the dtype's largest finite magnitude rather
than becoming ``+-inf``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._stats import (
    GREEDY_TEMPERATURE,
    ParamLike,
    SparseRows,
    cast_saturating,
    check_logits,
    compact_rows,
    count_true,
    entropy_of_logits,
    fill_removed,
    is_finite,
    note_removed,
    noted_removed,
    pow_per_entry,
    removed_in_rows,
    removed_tokens,
    sampler_param,
    saturate_finite,
    select_rows,
    upcast,
)

__all__ = ["temperature", "temperature_divisors", "dynamic_temperature", "dynamic_temperature_values",
           "quadratic_smoothing", "GREEDY_TEMPERATURE"]

_F32 = torch.float32


def temperature(logits: Tensor, temperature: ParamLike) -> Tensor:
    """Temperature scaling: ``l / T``.

    Args:
        logits: ``[B, V]`` float tensor.
        temperature: ``[B]`` float32 ``T >= 0``. ``1.0`` disables the row (bit-identical).

    Greedy rows: ``T < 1e-5`` (``GREEDY_TEMPERATURE``, compared in fp32, so a ``T`` given as
    ``1e-5`` is not greedy) means greedy decoding. Such rows are
    returned unchanged (bit-identical) here: dividing by ~0 would only overflow, and the draw
    takes the argmax of the processed logits for them (lowest id on ties), which scaling by
    a positive factor would not change anyway.

    ``-inf`` stays ``-inf``. Computed in fp32; finite results beyond the output dtype's range
    (float32's included) saturate at its largest finite value.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``.
    """
    check_logits(logits)
    t = sampler_param(temperature, logits, "temperature")
    enabled, safe_t = temperature_divisors(t)
    l32 = upcast(logits)
    out = saturate_finite(l32 / safe_t[:, None], l32)
    result = select_rows(enabled, cast_saturating(out, logits.dtype), logits)
    removed = noted_removed(logits)
    if removed is not None and result is not logits:
        # (l / T with T > 0: -inf stays -inf, finite stays finite, saturating: the same removed tokens)
        note_removed(result, *removed)
    return result


def temperature_divisors(t: Tensor) -> tuple[Tensor, Tensor]:
    """``temperature``'s rule per row, for ``[B]`` float32 temperatures ``t >= 0``: which rows
    it scales (``T != 1`` and not greedy) and the divisor of each row (``T`` there, ``1.0``
    elsewhere, which leaves a row's values as they are)."""
    if t.device.type == "cpu" and not t.requires_grad:
        # (numpy: a fraction of torch's per-op cost on [B] values; the same float32 comparisons)
        tn = t.numpy()
        enabled = (tn != 1.0) & (tn >= np.float32(GREEDY_TEMPERATURE))
        return torch.from_numpy(enabled), torch.from_numpy(np.where(enabled, tn, np.float32(1.0)))
    enabled = (t != 1.0) & (t >= GREEDY_TEMPERATURE)
    return enabled, torch.where(enabled, t, torch.ones_like(t))


def dynamic_temperature(
    logits: Tensor,
    dynatemp_min: ParamLike,
    dynatemp_max: ParamLike,
    dynatemp_exponent: ParamLike,
) -> Tensor:
    """Entropy-based dynamic temperature: ``l / T`` with a per-row ``T`` from the row's entropy.

    Args:
        logits: ``[B, V]`` float tensor.
        dynatemp_min: ``[B]`` float32 ``>= 0``.
        dynatemp_max: ``[B]`` float32 ``>= 0``. A row with both ``min`` and ``max`` equal to
            0 is disabled (bit-identical).
        dynatemp_exponent: ``[B]`` float32 ``> 0`` (default 1.0).

    Formula: ``T = min + (max - min) * (H / log N) ** exponent`` where ``N`` is the number of
    finite logits of the row and ``H`` the entropy (natural log, ``0 log 0 = 0``) of the
    softmax over them, in fp32. ``H / log N`` is in ``[0, 1]`` mathematically; it is clamped
    to that interval to absorb rounding. If ``N <= 1``, ``T = min``. If the resulting
    ``T < 1e-5`` it is raised to ``1e-5`` (this avoids ``0 / 0``; the row is then effectively
    greedy). The temperature then divides every logit; ``-inf`` stays ``-inf``, and finite
    results beyond the output dtype's range saturate at its largest finite value.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``.
    """
    return temperature(logits, dynamic_temperature_values(logits, dynatemp_min, dynatemp_max, dynatemp_exponent))


def dynamic_temperature_values(
    logits: Tensor,
    dynatemp_min: ParamLike,
    dynatemp_max: ParamLike,
    dynatemp_exponent: ParamLike,
) -> Tensor:
    """``[B]`` float32: the temperature ``T`` by which ``dynamic_temperature`` divides each
    row (its formula; at least ``1e-5``), and ``1.0`` on disabled rows. Dividing by it
    (``temperature(logits, T)``) is ``dynamic_temperature``; a caller that also scales other
    rows by a static temperature can divide once by the two combined."""
    check_logits(logits)
    t_min = sampler_param(dynatemp_min, logits, "dynatemp_min")
    t_max = sampler_param(dynatemp_max, logits, "dynatemp_max")
    exponent = sampler_param(dynatemp_exponent, logits, "dynatemp_exponent")
    sparse = compact_rows(logits)  # after a truncation: the entropy of the tokens still in
    if sparse is not None:
        return _dynamic_temperature_values(sparse.logits, t_min, t_max, exponent, sparse)
    return _dynamic_temperature_values(logits, t_min, t_max, exponent)


def _dynamic_temperature_values(logits: Tensor, t_min: Tensor, t_max: Tensor, exponent: Tensor,
                                sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = (t_min != 0) | (t_max != 0)
    l32 = upcast(logits)
    cpu = l32.device.type == "cpu"
    stats, rows = l32, None
    if cpu and sparse is None and not bool(enabled.all()):
        # The statistics of the enabled rows only (on the CPU reading ``enabled`` is no sync;
        # each row's statistics depend on that row alone).
        rows = enabled.nonzero().squeeze(1)
        stats = l32.index_select(0, rows)
    hi_s = stats.amax(dim=-1)
    lo_s = removed = None
    noted = noted_removed(l32) if cpu and sparse is None else None
    if noted is not None and noted[0].numel():
        # The removed tokens (the only non-finite logits) as this chain's earlier samplers
        # noted them: no search, and no row minimum (``removed`` leaves it unused below).
        removed, n_removed = noted if rows is None else removed_in_rows(*noted, rows, l32.shape[1])
        n = stats.shape[1] - n_removed
    elif noted is not None:
        # Noted: no removed token and nothing else non-finite (the input rule proved it). No
        # row minimum either: the entropy's exp judges its slow range from a sample instead.
        n = torch.full(hi_s.shape, l32.shape[1], dtype=torch.int64)
    else:
        lo_s = stats.amin(dim=-1)
        if cpu and sparse is None and bool(((lo_s > float("-inf")) & (hi_s < float("inf"))).all()):
            n = torch.full(lo_s.shape, l32.shape[1], dtype=torch.int64)  # every logit finite
        elif cpu and sparse is None and stats.numel() and stats.is_contiguous() and bool((hi_s < float("inf")).all()):
            # No NaN (it would be its row's max) nor +inf: the only non-finite logits are -inf
            # (a grammar's mask, a banned EOS), found and counted once.
            removed, n_removed = removed_tokens(stats)
            n = stats.shape[1] - n_removed
            if rows is None:  # (for the division by T and the next sampler: see note_removed)
                note_removed(stats, removed, n_removed)
        else:
            n = count_true(is_finite(stats))
    # (the selected rows are a copy: their buffer is reused)
    h = entropy_of_logits(stats, sparse, overwrite=rows is not None, row_max=hi_s, row_min=lo_s,
                          removed=removed)
    pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))  # noqa: E731
    t_lo = pick(t_min)
    log_n = torch.log(n.clamp_min(2).to(_F32))
    ratio = (h / log_n).clamp(0.0, 1.0)
    # (pow_per_entry: a row's T must not depend on its place in the batch)
    t = t_lo + (pick(t_max) - t_lo) * pow_per_entry(ratio, pick(exponent))
    t = torch.where(n <= 1, t_lo, t)
    t = t.clamp_min(GREEDY_TEMPERATURE)
    if rows is not None:
        return torch.ones_like(t_min).index_copy_(0, rows, t)
    return torch.where(enabled, t, torch.ones_like(t))


def quadratic_smoothing(
    logits: Tensor,
    smoothing_factor: ParamLike,
    smoothing_curve: ParamLike,
) -> Tensor:
    """Quadratic / cubic smoothing (Aphrodite's formula).

    Args:
        logits: ``[B, V]`` float tensor.
        smoothing_factor: ``[B]`` float32 ``f`` in ``[0, 1e18]``; ``0.0`` disables the row (bit-identical).
        smoothing_curve: ``[B]`` float32 ``c`` in ``[1, 1e18]`` (``1.0`` = purely quadratic).

    Formula: ``k = f * (3 - c) / 2``, ``s = f * (c - 1) / 2`` and, for each finite logit,
    ``d = l - max(l) <= 0``: ``l_new = max(l) - k * d**2 + s * d**3``. With ``c = 1`` this
    is ``max(l) - f * d**2``: the top token keeps its logit, the others fall quadratically.
    ``-inf`` logits stay ``-inf``. Computed in fp32; finite results beyond the output dtype's
    range saturate at its largest finite value (so no finite logit becomes ``-inf``).

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``.
    """
    check_logits(logits)
    f = sampler_param(smoothing_factor, logits, "smoothing_factor")
    c = sampler_param(smoothing_curve, logits, "smoothing_curve")
    sparse = compact_rows(logits)
    if sparse is not None:
        # (finite logits stay finite: the packed layout carries over to the next sampler)
        return sparse.expand_truncated(_quadratic_smoothing(sparse.logits, f, c))
    return _quadratic_smoothing(logits, f, c)


def _quadratic_smoothing(logits: Tensor, f: Tensor, c: Tensor) -> Tensor:
    enabled = f != 0
    l32 = upcast(logits)
    k = (f * (3.0 - c) / 2.0)[:, None]
    s = (f * (c - 1.0) / 2.0)[:, None]
    hi = l32.amax(dim=-1, keepdim=True)
    # Rows without a finite logit: any finite stand-in (every entry stays -inf below).
    row_max = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    cpu = l32.device.type == "cpu"
    finite = removed = None
    if cpu and bool(((l32.amin(dim=-1, keepdim=True) > float("-inf")) & (hi < float("inf"))).all()):
        d = l32 - row_max  # every logit finite: nothing to read as 0, nothing to put back
    elif cpu and l32.is_contiguous() and bool((hi < float("inf")).all()):
        # No NaN (it would be its row's max) nor +inf: the only non-finite logits are -inf,
        # found once; their d is any finite value (0) and their result -inf, set back below.
        removed = removed_tokens(l32)[0]
        d = l32 - row_max
        d.view(-1)[removed] = 0.0
    else:
        finite = is_finite(l32)
        # Non-finite logits are read as 0 (so no inf * 0 = NaN; finite ones are unchanged) and
        # set back to -inf at the end.
        d = l32.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).sub_(row_max)
    # row_max - k * d**2 + s * d**3, each product and sum rounded as written, in two buffers
    # (IEEE products and sums commute; x - y is -y + x, signed zeros included)
    d2 = d * d
    cube = d.mul_(d2).mul_(s)  # s * (d2 * d)
    smoothed = torch.sub(row_max, d2.mul_(k), out=d2).add_(cube)
    # Past the float32 range (a logit spread of ~1e19 and more) the terms overflow, and
    # 0 * inf or inf - inf would be NaN: those entries are computed again in float64 (where
    # nothing in range overflows: |d| < 7e38, |k|, |s| < 1e36) and saturate. (Removed entries
    # too: fill_removed's minimum would keep a NaN.) Finite row sums: every entry is finite.
    if not cpu or not bool(torch.isfinite(smoothed.sum(dim=-1)).all()):
        bad = ~torch.isfinite(smoothed)
        if bool(bad.any()):
            d64 = l32.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) - row_max.double()
            exact = row_max.double() - k.double() * d64 * d64 + s.double() * d64 * d64 * d64
            fmax = torch.finfo(_F32).max
            smoothed = torch.where(bad, exact.clamp(-fmax, fmax).float(), smoothed)
    if removed is not None:
        smoothed.view(-1)[removed] = float("-inf")
    out = smoothed if finite is None else fill_removed(smoothed, finite)
    return select_rows(enabled, cast_saturating(out, logits.dtype), logits)
