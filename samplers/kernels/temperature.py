"""Temperature family as in-kernel stages: temperature, dynamic temperature, smoothing.

Mirrors ``samplers.functional.temperature``. In the fused chain the row is fp32 throughout
(as in the pipeline's torch path, where the chain runs on ``logits.float()``); ``ops``' one-stage
wrappers cast back to the input dtype with the reference's saturating cast.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import entropy_of, softmax_stats


@triton.jit
def stage_temperature(x, t, en):
    """``F.temperature``: l / T on rows with T != 1 and T >= 1e-5 (greedy rows untouched)."""
    en = en & (t != 1.0) & (t >= 1e-5)
    safe = tl.where(en, t, 1.0)
    return tl.where(en, tl.math.div_rn(x, safe), x)


@triton.jit
def dynatemp_of(h, n, t_min, t_max, exponent):
    """The dynamic temperature of a row with entropy ``h`` over ``n`` finite logits:
    ``min + (max - min) * (h / log n) ** exponent`` (ratio clamped to [0, 1]; ``n <= 1``:
    ``min``; at least 1e-5), as ``F.dynamic_temperature``. Shared by the whole-row and the
    column-blocked kernels."""
    log_n = tl.log(tl.maximum(n, 2).to(tl.float32))
    ratio = tl.minimum(tl.maximum(h / log_n, 0.0), 1.0)
    # ratio ** exponent as exp2(exponent * log2(ratio)); a tiny ratio (a row whose top token
    # holds nearly all the mass: subnormal at times) is scaled by 2**64 first, exactly, so
    # that no log2 flushes or clamps it (a small exponent still lifts it far above 0)
    tiny = ratio < 1e-18
    log2_ratio = tl.log2(tl.where(tiny, ratio * 18446744073709551616.0, ratio)) - tl.where(tiny, 64.0, 0.0)
    powed = tl.where(ratio > 0, tl.exp2(exponent * log2_ratio), 0.0)
    temp = t_min + (t_max - t_min) * powed
    temp = tl.where(n <= 1, t_min, temp)
    return tl.maximum(temp, 1e-5)


@triton.jit
def stage_dynatemp(x, t_min, t_max, exponent, en):
    """``F.dynamic_temperature``: T = min + (max - min) * (H / log N) ** exponent, then l / T."""
    en = en & ((t_min != 0) | (t_max != 0))
    m_raw, p, logp = softmax_stats(x)
    h = entropy_of(p, logp)
    n = tl.sum(((x > float("-inf")) & (x < float("inf"))).to(tl.int32), 0)
    temp = tl.where(en, dynatemp_of(h, n, t_min, t_max, exponent), 1.0)
    return tl.where(en, tl.math.div_rn(x, temp), x)


@triton.jit
def stage_smoothing(x, f, c, en):
    """``F.quadratic_smoothing``: max - k d^2 + s d^3, d = l - max, k = f(3-c)/2, s = f(c-1)/2."""
    en = en & (f != 0)
    k = f * (3.0 - c) / 2.0
    s = f * (c - 1.0) / 2.0
    m = tl.max(x, 0)
    finite = (x > float("-inf")) & (x < float("inf"))
    d = tl.where(finite, x - m, 0.0)
    dd = d * d
    smoothed = m - k * dd + s * (dd * d)
    out = tl.where(finite, smoothed, x)
    return tl.where(en, out, x)
