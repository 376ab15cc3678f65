"""Row statistics shared by the samplers, computed once per row inside the kernels.

The ``@triton.jit`` helpers live in ``samplers.kernels._common`` (``softmax_stats``, ``entropy_of``,
``finite_std``, ``top_mask``) and are what every stage of the fused chain calls on the row in
registers. This module exposes them as one standalone kernel, ``row_stats``, so they are
tested directly against the torch formulas of ``samplers.functional._stats`` and
``samplers.functional.truncation.nsigma``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION, block_for, device_guard, entropy_of, finite_std, softmax_stats, warps_for


@triton.jit
def _row_stats_kernel(x_ptr, out_ptr, V, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=float("-inf")).to(tl.float32)
    m_raw, p, logp = softmax_stats(x)
    h = entropy_of(p, logp)
    count, std = finite_std(x)
    m = tl.where(m_raw > float("-inf"), m_raw, 0.0)
    lse = m + tl.log(tl.sum(tl.exp(x - m), 0))
    tl.store(out_ptr + row * 5 + 0, m_raw)
    tl.store(out_ptr + row * 5 + 1, lse)
    tl.store(out_ptr + row * 5 + 2, h)
    tl.store(out_ptr + row * 5 + 3, std)
    tl.store(out_ptr + row * 5 + 4, count.to(tl.float32))


def row_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row statistics of [B, V] logits (any float dtype, fp32 math), each a float32 [B]:
    ``max`` (amax), ``logsumexp``, ``entropy`` (of softmax, natural log, 0 log 0 = 0; as
    ``_stats.entropy``), ``std`` (sample std over finite logits, as ``nsigma``) and ``count``
    (number of finite logits)."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty((B, 5), dtype=torch.float32, device=logits.device)
    block = block_for(V)
    with device_guard(logits):
        _row_stats_kernel[(B,)](logits, out, V, logits.stride(0), BLOCK=block, num_warps=warps_for(block),
                                enable_fp_fusion=FP_FUSION)
    return {name: out[:, i] for i, name in enumerate(("max", "logsumexp", "entropy", "std", "count"))}
