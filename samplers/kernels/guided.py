"""Guided decoding: apply a packed allowed-token bitmask to logits in a kernel.

Mirrors ``samplers.guided.apply_token_bitmask_torch``: ``bitmask`` is ``[K, ceil(V / 32)]``
int32 (bit ``t % 32`` of word ``t // 32`` set = token t allowed); bitmask row i applies to
logits row ``rows[i]`` (or row i when ``rows`` is None); every token whose bit is 0 becomes
``-inf``, every other logit is copied unchanged (bit-identical), and rows not listed in ``rows``
are copied unchanged. Tokens past the bitmask's width count as disallowed. The result is a new
tensor in the logits' dtype. Grid: (K, ceil(V / BLOCK)); each program reads BLOCK logits and
BLOCK / 32 words.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import device_guard

BLOCK = 1024


@triton.jit
def _apply_bitmask_kernel(out_ptr, mask_ptr, rows_ptr, V, W, stride_o, stride_m,
                          HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < V
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i
    word_idx = offs // 32
    words = tl.load(mask_ptr + i * stride_m + word_idx, mask=inb & (word_idx < W), other=0)
    bit = (words >> (offs % 32)) & 1
    banned = inb & (bit == 0)
    neg = tl.full([BLOCK], float("-inf"), tl.float32)
    tl.store(out_ptr + row * stride_o + offs, neg.to(out_ptr.dtype.element_ty), mask=banned)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kernel of ``samplers.guided.apply_token_bitmask_torch`` (a new tensor)."""
    out = logits.contiguous().clone()
    if out.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    V = out.shape[1]
    K = bitmask.shape[0]
    if K == 0 or V == 0:
        return out
    bm = bitmask.to(device=out.device, dtype=torch.int32).contiguous()
    if rows is not None:
        rows_t = rows.to(device=out.device, dtype=torch.int64).contiguous()
        if rows_t.numel() != K:
            raise ValueError(f"rows has {rows_t.numel()} entries for {K} bitmask rows")
    else:
        if K != out.shape[0]:
            raise ValueError(f"bitmask has {K} rows for {out.shape[0]} logits rows; pass rows=")
        rows_t = bm  # unused (HAS_ROWS=False)
    grid = (K, triton.cdiv(V, BLOCK))
    with device_guard(out):
        _apply_bitmask_kernel[grid](out, bm, rows_t, V, bm.shape[1], out.stride(0), bm.stride(0),
                                    HAS_ROWS=rows is not None, BLOCK=BLOCK, num_warps=4)
    return out


__all__ = ["apply_token_bitmask"]
