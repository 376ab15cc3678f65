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

from typing import Union

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
    "select_rows",
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


def softmax_and_log_softmax(l32: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``p = softmax(l)`` and ``log p`` in fp32.

    ``-inf`` logits get ``p = 0`` and ``log p = -inf``. A row whose logits are all ``-inf``
    gets ``p = 0`` everywhere and ``log p = -inf`` everywhere (no NaN).
    """
    m = l32.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = l32 - m
    e = torch.exp(z)
    s = e.sum(dim=-1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return e / s, z - torch.log(s)


def entropy(p: Tensor, logp: Tensor) -> Tensor:
    """``H = -sum(p * log p)`` per row (natural log), with ``0 * log 0 = 0``. Shape ``[B]``."""
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def top_token_mask(l32: Tensor) -> Tensor:
    """Boolean ``[B, V]``: the row's most likely token(s), i.e. finite logits equal to the row max.

    Tokens tied at the maximum are all marked, so the kept set never depends on token ids.
    """
    m = l32.amax(dim=-1, keepdim=True)
    return (l32 == m) & (l32 > float("-inf"))


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
    """``out`` on enabled rows, the untouched input (bit-identical) on the others."""
    return torch.where(enabled[:, None], out, logits)


def apply_keep(logits: Tensor, l32: Tensor, keep: Tensor, enabled: Tensor) -> Tensor:
    """Finish a truncation sampler.

    Tokens outside ``keep`` become ``-inf``; the row's top token(s) are always kept (so a
    row never loses every token); kept tokens keep their exact input value and dtype; rows
    with ``enabled`` False are returned bit-identical.
    """
    keep = keep | top_token_mask(l32)
    out = logits.masked_fill(~keep, float("-inf"))
    return select_rows(enabled, out, logits)


def cast_saturating(out32: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast fp32 values to ``dtype``; finite values beyond the dtype's range saturate at its
    largest finite magnitude instead of overflowing to ``+-inf`` (``-inf`` stays ``-inf``)."""
    fmax = torch.finfo(dtype).max
    out = torch.where(torch.isfinite(out32), out32.clamp(-fmax, fmax), out32)
    return out.to(dtype)
