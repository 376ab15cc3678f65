"""Private helpers shared by the reference torch samplers.

Every row statistic that more than one sampler needs (fp32 softmax, log-softmax, entropy,
the top-token mask, exclusive cumulative sums, the boundary of a kept prefix) is written
here once, so no formula exists twice in ``samplers/functional``.

Conventions used throughout (see ``conventions.md`` / ``SEMANTICS.md``):

- ``logits`` is a ``[B, V]`` float tensor (fp32, fp16 or bf16); statistics are computed in
  fp32 on an upcast copy; the input is never modified.
- A removed token is ``-inf``; it has probability exactly 0 and log-probability ``-inf``.
  A row made only of ``-inf`` produces probabilities 0 (never NaN).
- Per-row parameters are 1-D tensors ``[B]`` on the logits' device.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GREEDY_TEMPERATURE",
    "check_logits",
    "row_param",
    "upcast",
    "softmax_and_log_softmax",
    "entropy",
    "top_token_mask",
    "exclusive_cumsum",
    "prefix_boundary",
    "apply_keep",
    "cast_saturating",
    "saturate_finite",
    "select_rows",
    "fill_removed",
    "sort_values_desc",
    "sort_nonneg",
    "is_finite",
    "count_below",
    "keep_at_least",
]

#: Temperatures below this value mean "greedy" (SEMANTICS.md, temperature).
GREEDY_TEMPERATURE: float = 1e-5

ParamLike = Union[Tensor, float, int]


def check_logits(logits: Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is a 2-D floating-point tensor ``[B, V]``."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [B, V], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating-point dtype, got {logits.dtype}")


def row_param(value: ParamLike, logits: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Return ``value`` as a ``[B]`` tensor of ``dtype`` on ``logits.device``.

    A tensor already of that dtype and device is returned as is (no copy). A Python number
    or a 0-d tensor is broadcast to every row. Any other shape is a ``ValueError``.
    """
    batch = logits.shape[0]
    t = torch.as_tensor(value, dtype=dtype, device=logits.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected a tensor of shape [{batch}], got {tuple(t.shape)}")
    return t


def upcast(logits: Tensor) -> Tensor:
    """The logits as fp32 (the input itself when already fp32: callers never write to it)."""
    return logits if logits.dtype == torch.float32 else logits.to(torch.float32)


def softmax_and_log_softmax(l32: Tensor, with_log: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Row-wise ``p = softmax(l)`` and ``log p`` in fp32.

    ``-inf`` logits get ``p = 0`` and ``log p = -inf``. A row whose logits are all ``-inf``
    gets ``p = 0`` everywhere and ``log p = -inf`` everywhere (no NaN). With
    ``with_log=False`` the second value is ``None`` (one full pass saved).
    """
    m = l32.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = l32 - m
    if not with_log:
        e = exp_(z)  # z is not needed afterwards: one [B, V] buffer instead of two
        s = e.sum(dim=-1, keepdim=True)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return e.div_(s), None
    e = exp_(z.clone())
    s = e.sum(dim=-1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    # In place on temporaries: the same values as ``e / s`` and ``z - log(s)``.
    return e.div_(s), z.sub_(torch.log(s))


#: ``exp`` of fp32 values below this is subnormal or 0; torch's CPU kernel takes a slow
#: path (tens of times slower) for such inputs, ``-inf`` included.
_EXP_NORMAL_MIN = -87.0
#: ``exp`` of fp32 values below this is exactly 0 (well below ``log(2**-150)``).
_EXP_ZERO_BELOW = -110.0


def exp_(z: Tensor) -> Tensor:
    """``z.exp_()`` with the same values, fast on the CPU when ``z`` has entries far below 0
    (removed tokens, ``-inf``): those are computed as ``exp(max(z, -87))`` times 0, except
    the few in ``(-110, -87)`` (subnormal results), which are computed exactly on their own.
    NaN inputs give 0 instead of NaN (logits are never NaN)."""
    if z.device.type != "cpu" or z.dtype != torch.float32 or z.numel() == 0 or not z.is_contiguous():
        return z.exp_()
    if not bool(z.amin() < _EXP_NORMAL_MIN):
        return z.exp_()
    flat = z.view(-1)
    zn = flat.numpy()
    band = np.flatnonzero((zn < _EXP_NORMAL_MIN) & (zn > _EXP_ZERO_BELOW))
    exact = torch.exp(flat[torch.from_numpy(band)]) if band.size else None
    normal = (z >= _EXP_NORMAL_MIN).to(torch.float32)
    z.clamp_min_(_EXP_NORMAL_MIN).exp_().mul_(normal)
    if exact is not None:
        flat[torch.from_numpy(band)] = exact
    return z


def entropy(p: Tensor, logp: Tensor, overwrite_logp: bool = False) -> Tensor:
    """``H = -sum(p * log p)`` per row (natural log), with ``0 * log 0 = 0``. Shape ``[B]``.

    ``p * log p`` is NaN exactly where ``p = 0`` and ``log p = -inf`` (and ``-0.0`` or ``0``
    where ``p`` underflowed to 0 with a finite ``log p``): replacing NaN by 0 gives the same
    sum as masking ``p > 0`` (signed zeros do not change a sum), without a ``where`` pass.
    With ``overwrite_logp`` the products are formed in ``logp``'s buffer (same values).
    """
    terms = logp.mul_(p) if overwrite_logp else p * logp
    terms = terms.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return -terms.sum(dim=-1)


def is_finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` for float tensors, as ``-inf < x < inf`` (same values, NaN
    included; vectorised comparisons instead of ``isfinite``'s slower CPU kernel)."""
    finite = x > float("-inf")
    return finite.logical_and_(x < float("inf"))


def top_token_mask(l32: Tensor, row_max: Optional[Tensor] = None) -> Tensor:
    """Boolean ``[B, V]``: the row's most likely token(s), i.e. finite logits equal to the row max.

    Tokens tied at the maximum are all marked, so the kept set never depends on token ids.
    ``row_max`` (``[B, 1]``, ``l32.amax(-1, keepdim=True)``) may be passed when already known.
    """
    m = l32.amax(dim=-1, keepdim=True) if row_max is None else row_max
    # l == m and l > -inf  <=>  l == m', with m' = m where m > -inf, else NaN (equal to nothing):
    # one [B, V] comparison.
    m = torch.where(m > float("-inf"), m, torch.full_like(m, float("nan")))
    return l32 == m


def exclusive_cumsum(x: Tensor) -> Tensor:
    """``out[:, i] = x[:, 0] + ... + x[:, i-1]`` (``out[:, 0] = 0``), same shape as ``x``."""
    c = torch.cumsum(x, dim=-1)
    return torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=-1)


def prefix_boundary(sorted_vals: Tensor, n_kept: Tensor) -> Tensor:
    """Value ``sorted_vals[row, n_kept - 1]`` as ``[B, 1]`` (``n_kept`` clamped to ``[1, V]``).

    Used to turn "the first ``n_kept`` positions of a sorted order are kept" into a
    threshold on the sort key, so that every token tied with the last kept one is kept too
    (results then do not depend on sort stability).
    """
    idx = n_kept.clamp(1, sorted_vals.shape[-1]) - 1
    return sorted_vals.gather(-1, idx.to(torch.int64)[:, None])


def select_rows(enabled: Tensor, out: Tensor, logits: Tensor) -> Tensor:
    """``out`` on enabled rows, the untouched input (bit-identical) on the others.

    ``out`` must be a fresh tensor of the caller's (it may be written in place). On the CPU,
    where reading ``enabled`` costs no device sync, only the disabled rows are copied
    (nothing when every row is enabled) instead of a full ``where`` pass.
    """
    if out.device.type == "cpu" and out.dtype == logits.dtype and out.shape == logits.shape:
        if bool(enabled.all()):
            return out
        off = (~enabled).nonzero().squeeze(1)
        return out.index_copy_(0, off, logits.index_select(0, off))
    return torch.where(enabled[:, None], out, logits)


def fill_removed(logits: Tensor, keep: Tensor, scratch: Optional[Tensor] = None) -> Tensor:
    """``logits.masked_fill(~keep, -inf)`` (a new tensor), computed as
    ``minimum(logits, +inf where keep else -inf)``: bit-identical for every kept entry
    (``min(x, +inf) = x``) and ``-inf`` for the others, with vectorised float passes
    instead of a boolean-masked one (several times faster on the CPU).

    ``scratch``: an optional temporary of the caller's, used as the output buffer when it
    has the logits' dtype and shape (saves an allocation)."""
    if scratch is not None and scratch.dtype == logits.dtype and scratch.shape == logits.shape:
        cap = scratch.copy_(keep)
    else:
        cap = keep.to(logits.dtype)
    cap.sub_(0.5).mul_(float("inf"))  # 1 -> +inf, 0 -> -inf
    return torch.minimum(logits, cap, out=cap)


def keep_at_least(logits: Tensor, values: Tensor, threshold: Tensor, values_is_scratch: bool = False,
                  values_not_negative_zero: bool = False) -> Tensor:
    """``logits`` where ``values >= threshold[:, None]``, ``-inf`` elsewhere (a new tensor).

    ``values``: fp32 ``[B, V]`` (probabilities or the logits themselves); ``threshold``: fp32
    ``[B]`` (``-inf`` keeps the whole row, bit-identical). Computed without a boolean mask:
    ``d = values - threshold`` is ``>= +0.0`` exactly when the value is kept (IEEE
    subtraction of two different floats is never 0; equal ones give ``+0.0``, or ``-0.0``
    for ``-0.0 - +0.0``, which adding ``+0.0`` turns into ``+0.0``), so
    ``copysign(inf, d)`` is ``+inf`` on kept entries and ``-inf`` on the others, and
    ``minimum(logits, that)`` gives the result (kept entries bit-identical). Where ``d`` is
    NaN (``-inf - -inf``) the logit is ``-inf`` and stays ``-inf`` whatever the sign.
    With ``values_is_scratch`` ``values`` is overwritten (one allocation saved).
    ``values_not_negative_zero`` (e.g. probabilities, which are ``>= +0.0``) skips the
    ``-0.0`` fix-up pass, which cannot matter then.
    """
    t = threshold.to(torch.float32)[:, None]
    d = values.sub_(t) if values_is_scratch else values - t
    if not values_not_negative_zero:
        d.add_(0.0)  # -0.0 (from -0.0 - +0.0: equal values) -> +0.0; nonzero d unchanged
    torch.copysign(torch.tensor(float("inf"), device=d.device), d, out=d)
    if d.dtype != logits.dtype:
        d = d.to(logits.dtype)
    return torch.minimum(logits, d, out=d)


def apply_keep(logits: Tensor, l32: Tensor, keep: Tensor, enabled: Tensor,
               keeps_top: bool = False, row_max: Optional[Tensor] = None,
               scratch: Optional[Tensor] = None) -> Tensor:
    """Finish a truncation sampler.

    Tokens outside ``keep`` become ``-inf``; the row's top token(s) are always kept (so a
    row never loses every token); kept tokens keep their exact input value and dtype; rows
    with ``enabled`` False are returned bit-identical (every entry of theirs is kept).
    ``keeps_top=True`` tells that ``keep`` already contains the top token(s);
    ``row_max`` is ``l32.amax(-1, keepdim=True)`` when the caller has it. ``keep`` must be
    the caller's temporary (it is updated in place); so must ``scratch`` (see
    ``fill_removed``).
    """
    if not keeps_top:
        keep.logical_or_(top_token_mask(l32, row_max))
    keep.logical_or_(~enabled[:, None])
    return fill_removed(logits, keep, scratch)


def cast_saturating(out32: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast fp32 values to ``dtype``; finite values beyond the dtype's range saturate at its
    largest finite magnitude instead of overflowing to ``+-inf`` (``-inf`` stays ``-inf``)."""
    if dtype == torch.float32 and out32.dtype == torch.float32:
        return out32  # every finite fp32 value is in range; infinities stay as they are
    if torch.finfo(dtype).max >= torch.finfo(out32.dtype).max:
        return out32.to(dtype)  # a wider dtype (float64) holds every value
    fmax = torch.finfo(dtype).max
    out = torch.where(torch.isfinite(out32), out32.clamp(-fmax, fmax), out32)
    return out.to(dtype)


def saturate_finite(out32: Tensor, in32: Tensor) -> Tensor:
    """``out32`` with each result of a finite input clamped to the float32 range: arithmetic on
    a finite logit (a small temperature, a small repetition penalty) never overflows to
    ``+-inf``; non-finite inputs keep their results (``-inf`` stays removed)."""
    fmax = torch.finfo(torch.float32).max
    return torch.where(torch.isfinite(in32), out32.clamp(-fmax, fmax), out32)


def sort_values_desc(x: Tensor) -> Tensor:
    """Each row of ``x`` sorted in descending order (values only; no order is returned, so
    ties cannot matter). On the CPU this uses numpy's (SIMD) sort, much faster than
    ``torch.sort``, which always computes the permutation too."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=-1)).flip(-1)
    return torch.sort(x, dim=-1, descending=True).values


def sort_nonneg(x: Tensor, descending: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.sort(x, dim=-1, descending=descending)`` for a float32 ``x`` whose entries
    are ``+0.0``, positive or ``+inf`` (probabilities, deviations): ``(values, indices)``.

    The order among equal values is unspecified (callers use tie-independent rules). On the
    CPU the permutation comes from one numpy sort of int64 keys ``bits(x) << 32 | index``
    (the bit patterns of non-negative floats sort as integers), several times faster than
    ``torch.sort``.
    """
    batch, vocab = x.shape
    if x.device.type == "cpu" and x.dtype == torch.float32 and vocab < 2**31 and not x.requires_grad:
        x = x.contiguous()
        key = x.numpy().view(np.int32).astype(np.int64)  # >= 0: the bits of x >= +0.0
        if descending:
            np.subtract(0x7FFFFFFF, key, out=key)  # larger value, smaller key
        np.left_shift(key, 32, out=key)
        np.bitwise_or(key, np.arange(vocab, dtype=np.int64), out=key)
        key.sort(axis=-1)
        np.bitwise_and(key, 0xFFFFFFFF, out=key)
        order = torch.from_numpy(key)
        return x.gather(-1, order), order
    return torch.sort(x, dim=-1, descending=descending)


def count_below(sorted_rows: Tensor, bound: Tensor, inclusive: bool = False) -> Tensor:
    """Per row, how many entries of the non-decreasing row are ``< bound`` (``<= bound``
    with ``inclusive``): ``((sorted_rows < bound[:, None]).sum(-1))`` by binary search.
    ``bound``: ``[B]``. Returns int64 ``[B]``."""
    q = bound.to(sorted_rows.dtype).reshape(-1, 1).contiguous()
    return torch.searchsorted(sorted_rows.contiguous(), q, right=inclusive).squeeze(1)
