"""The draw in a kernel, and the Philox stream in a kernel.

``draw_tokens`` mirrors ``samplers.sampling.draw_tokens``: greedy rows take the argmax
(lowest id on ties); random rows take the inverse CDF of softmax(logits) in token-id order
(the first token whose cumulative probability exceeds ``u * total``), never a removed token.

``row_uniforms`` mirrors ``samplers.sampling.row_uniforms``: Philox4x32-10 keyed by the row's
(key_lo, key_hi), counter (step, sequence_index, purpose, 0), first word -> float32 with
Triton's ``uint_to_uniform_float``; bit-exact with the torch stream (tested).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import block_for, softmax_stats, warps_for


@triton.jit
def _draw_kernel(x_ptr, greedy_ptr, u_ptr, out_ptr, V, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=float("-inf")).to(tl.float32)
    greedy = tl.load(greedy_ptr + row) != 0
    u = tl.load(u_ptr + row)
    am = tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
    m_raw, p, logp = softmax_stats(x)
    cdf = tl.cumsum(p, 0)
    total = tl.max(cdf, 0)
    target = u * total
    idx = tl.sum((valid & (cdf <= target)).to(tl.int64), 0)
    last_pos = tl.max(tl.where(p > 0, offs, -1), 0).to(tl.int64)
    last_pos = tl.where(last_pos >= 0, last_pos, V - 1)
    idx = tl.minimum(idx, last_pos)
    tl.store(out_ptr + row, tl.where(greedy, am, idx))


def draw_tokens(logits: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.sampling.draw_tokens``: [B, V] logits, [B] bool greedy, [B] float32
    uniforms -> [B] int64 token ids."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    if _common.use_blocked(V):
        from .blocked import _blocked_draw_kernel

        tile = _common.TILE
        _blocked_draw_kernel[(B,)](logits, greedy.to(torch.int8).contiguous(), uniforms.to(torch.float32).contiguous(),
                                   out, V, logits.stride(0), TILE=tile, num_warps=_common.TILE_WARPS)
        return out
    block = block_for(V)
    _draw_kernel[(B,)](logits, greedy.to(torch.int8).contiguous(), uniforms.to(torch.float32).contiguous(),
                       out, V, logits.stride(0), BLOCK=block, num_warps=warps_for(block))
    return out


@triton.jit
def _uniform_kernel(out_ptr, klo_ptr, khi_ptr, step_ptr, seq_ptr, purpose, B, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < B
    k0 = tl.load(klo_ptr + i, mask=m, other=0).to(tl.uint32)
    k1 = tl.load(khi_ptr + i, mask=m, other=0).to(tl.uint32)
    step = tl.load(step_ptr + i, mask=m, other=0).to(tl.uint32)
    seq = tl.load(seq_ptr + i, mask=m, other=0).to(tl.uint32)
    zero = step * 0
    c0, _, _, _ = tl.random.philox_impl(step, seq, zero + purpose, zero, k0, k1)
    tl.store(out_ptr + i, tl.random.uint_to_uniform_float(c0), mask=m)


def row_uniforms(key_lo: torch.Tensor, key_hi: torch.Tensor, step: torch.Tensor,
                 sequence_index: torch.Tensor, purpose: int) -> torch.Tensor:
    """Kernel of ``samplers.sampling.row_uniforms``: one float32 uniform per row, in-kernel Philox."""
    B = key_lo.shape[0]
    out = torch.empty(B, dtype=torch.float32, device=key_lo.device)
    if B == 0:
        return out
    # int64 -> int32 keeps the low 32 bits; the kernel reinterprets them as uint32.
    as32 = lambda t: (t.to(torch.int64) & 0xFFFFFFFF).to(torch.int32).contiguous()  # noqa: E731
    block = 128
    _uniform_kernel[(triton.cdiv(B, block),)](out, as32(key_lo), as32(key_hi), as32(step),
                                              as32(sequence_index), int(purpose), B, BLOCK=block)
    return out
