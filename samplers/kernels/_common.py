"""Shared helpers of the Triton kernels: launch sizes, the interpreter switch, in-kernel row
statistics and the order-preserving float -> int key used by the threshold searches."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "FP_FUSION", "device_guard", "block_for", "pick_layout", "warps_for", "lane_mask", "okey", "softmax_stats", "entropy_of",
           "top_mask", "finite_std", "saturate", "philox_uniform", "online_softmax"]

#: True when kernels run on the CPU through Triton's interpreter (the tests).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Largest row the whole-row kernels hold in one program (Triton's tensor size limit is 2**20).
MAX_BLOCK = 1 << 20

#: Rows whose whole-row block (next_pow2(V)) exceeds this use the column-blocked kernels
#: (``samplers.kernels.blocked``): past ~64k lanes a row in registers spills and compiles for minutes.
#: Read at call time, so tests can lower it (``monkeypatch.setattr(_common, "BLOCKED_ABOVE", ...)``).
BLOCKED_ABOVE = 65536

#: Tile of the column-blocked kernels (lanes per loop iteration; a power of two), and their
#: num_warps: 8192 lanes / 16 warps compile for sm_90 to 128 registers and no spills for
#: every stage code (``python -m samplers.kernels.aot --blocked``).
TILE = 8192
TILE_WARPS = 16


#: ``enable_fp_fusion`` of every launch. Off: a compiled ``a * b + c`` is two correctly
#: rounded operations, as in torch's op-by-op reference, not one FMA; with it (Triton's
#: default) the penalties, smoothing and the sums of squares would differ from the reference
#: in the last bit (kernels/README.md, "What is promised on a GPU").
FP_FUSION = False

#: The relative tolerance near a threshold within which the kernels may decide a token
#: differently from the torch reference (on a GPU ``tl.exp`` is ``ex2.approx`` and ``/``
#: ``div.full``; everywhere, the interpreter included, sums add in another order: a
#: probability or a mass is within ~1e-6 of the reference's). kernels/README.md.
THRESHOLD_RTOL = 1e-5

#: The threshold parameters that promise covers, each with the way it moves the removed set:
#: +1 where a larger value keeps more tokens, -1 where it keeps fewer. The promise is checked
#: by moving the parameter by ``THRESHOLD_RTOL`` both ways (``tests/kernel_promise.py``,
#: ``benchmarks/gpu_bench.py``). XTC removes the members of C = {p >= threshold} above C's least
#: likely: a larger threshold leaves C a subset whose least likely member is likelier, so it
#: removes a subset. top_k is exact (integer comparisons).
THRESHOLD_KEEP_MORE = {"top_p": +1, "typical_p": +1, "nsigma": +1, "xtc_threshold": +1, "min_p": -1,
                       "top_a": -1, "eta_cutoff": -1, "epsilon_cutoff": -1}


def device_guard(t: torch.Tensor):
    """Context of a launch on ``t``'s data: its CUDA device made current (Triton launches on
    the current device, not the tensors'; logits on cuda:1 while cuda:0 is current would
    fault), a no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def use_blocked(vocab: int) -> bool:
    """Whether rows of ``vocab`` tokens go to the column-blocked kernels."""
    return triton.next_power_of_2(max(int(vocab), 16)) > BLOCKED_ABOVE


def block_for(vocab: int) -> int:
    """Whole-row block: the next power of two >= V (every kernel keeps one row in one program)."""
    block = triton.next_power_of_2(max(int(vocab), 16))
    if block > MAX_BLOCK:
        raise ValueError(f"vocabulary of {vocab} tokens exceeds the kernels' row limit {MAX_BLOCK}")
    return block


#: Largest whole-row block on a GPU. Above it the whole-row chain spills to local memory
#: (1-3 KB per thread at BLOCK 16384-32768 for top_k + top_p, ``python -m samplers.kernels.aot``)
#: and needs up to 128 KB of shared memory, more than sm_86 / sm_89 / sm_120 allow per block;
#: the column-blocked chain does neither.
WHOLE_ROW_MAX_GPU = 8192

#: Shared memory per lane of the whole-row chain, an upper bound over every stage tuple and
#: input dtype (``aot`` with the JIT's alignment hints: top_p / typical_p's compaction and a
#: 16-bit input's upcast go through shared memory, at most 8 bytes a lane;
#: ``tests/test_kernels_compile.py`` checks it).
WHOLE_ROW_SHARED_PER_LANE = 8


def max_shared_memory(device: torch.device) -> int:
    """Shared memory a block may use on ``device`` (bytes): the opt-in limit, which Triton's
    launch compares a kernel's need with (99 KB on sm_86 / sm_89 / sm_120, 163 KB on sm_80,
    227 KB on sm_90)."""
    props = torch.cuda.get_device_properties(device)
    # (both read by name: torch's stubs list them from 2.9 on, its CUDA builds have them earlier)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block"))


def whole_row_limit(device: torch.device) -> int:
    """The largest block the whole-row chain runs with on ``device``: a static rule of the
    device's limits (never a timing, so a seeded row's result does not depend on what else is
    batched). GPU: ``WHOLE_ROW_MAX_GPU``, halved while its shared memory would exceed the
    device's per-block limit. The interpreter (no registers, no shared memory): up to
    ``BLOCKED_ABOVE``; both layouts are tested there."""
    if device.type != "cuda" or INTERPRET:
        return BLOCKED_ABOVE
    block, limit = WHOLE_ROW_MAX_GPU, max_shared_memory(device)
    while block > 16 and block * WHOLE_ROW_SHARED_PER_LANE > limit:
        block //= 2
    return block


def pick_layout(x: torch.Tensor) -> str:
    """"whole" (the row in one program's registers) or "blocked" (``samplers.kernels.blocked``)
    for the rows of ``x``: a function of V and the device only. The chain and the separate
    draw both follow it: a row's draw is then summed in the same order whether the chain's
    launch draws it or ``draw.sample_tokens`` does (which one runs depends on the batch)."""
    V = x.shape[1]
    if use_blocked(V) or block_for(V) > whole_row_limit(x.device):
        return "blocked"
    return "whole"


def warps_for(block: int) -> int:
    """num_warps heuristic for a whole-row program (ignored by the interpreter)."""
    if block <= 2048:
        return 4
    if block <= 16384:
        return 8
    if block <= 65536:
        return 16
    return 32


@triton.jit
def lane_mask(m):
    """``m`` as a bool lane mask for ``tl.load`` / ``tl.store``. A block mask ``&`` a scalar
    condition takes the scalar's integer type in Triton's interpreter, and triton 3.9's
    interpreter rejects a load or store mask that is not bool; compiled, this is free."""
    return m != 0


@triton.jit
def okey(x):
    """Order-preserving map fp32 -> int32 (a < b  <=>  okey(a) < okey(b)); -0.0 maps like +0.0,
    so keys agree with float comparisons (torch treats -0.0 == 0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def softmax_stats(x):
    """Row softmax in fp32, the formula of ``samplers.functional._stats.softmax_and_log_softmax``.

    ``x``: [BLOCK] fp32, removed tokens and padding lanes are -inf. Returns
    (raw max, p, log p); an all -inf row gives p = 0 and log p = -inf (no NaN).
    """
    m_raw = tl.max(x, 0)
    m = tl.where(m_raw > float("-inf"), m_raw, 0.0)
    z = x - m
    e = tl.exp(z)
    s = tl.sum(e, 0)
    s = tl.where(s > 0, s, 1.0)
    p = e / s
    logp = z - tl.log(s)
    return m_raw, p, logp


@triton.jit
def entropy_of(p, logp):
    """H = -sum(p log p) with 0 log 0 = 0 (``_stats.entropy``)."""
    return -tl.sum(p * tl.where(p > 0, logp, 0.0), 0)


@triton.jit
def top_mask(x, m_raw):
    """The row's top token(s): finite logits equal to the row max (``_stats.top_token_mask``)."""
    return (x == m_raw) & (x > float("-inf"))


@triton.jit
def finite_std(x):
    """(count, sample std) over the finite entries of ``x`` (torch.std, divisor N - 1; 0 if N <= 1)."""
    finite = (x > float("-inf")) & (x < float("inf"))
    count = tl.sum(finite.to(tl.int32), 0)
    countf = count.to(tl.float32)
    mean = tl.sum(tl.where(finite, x, 0.0), 0) / tl.maximum(countf, 1.0)
    d = tl.where(finite, x - mean, 0.0)
    sq = tl.sum(d * d, 0)
    std = tl.sqrt(sq / tl.maximum(countf - 1.0, 1.0))
    std = tl.where(count > 1, std, 0.0)
    return count, std


@triton.jit
def online_softmax(sm, ss, sez, sn, st, y):
    """Fold one tile into a row's running statistics (online softmax).

    ``y``: [TILE] fp32, removed tokens and padding lanes -inf. The running statistics, with
    m = the raw max ``sm`` (0 where it is -inf): ``ss`` = sum exp(x - m), ``sez`` =
    sum exp(x - m) (x - m) over exp > 0 (entropy: H = log ss - sez / ss), ``sn`` = finite
    count, ``st`` = sum of the finite values. When the max grows, the sums are rescaled by
    exp(m_old - m_new) (and ``sez`` shifted by (m_old - m_new) ``ss``). Returns the new
    (sm, ss, sez, sn, st) and the tile's own (max, sum exp(y - its max))."""
    tm = tl.max(y, 0)
    finite = (y > float("-inf")) & (y < float("inf"))
    tms = tl.where(tm > float("-inf"), tm, 0.0)
    z = y - tms
    e = tl.exp(z)
    ts = tl.sum(e, 0)
    tez = tl.sum(tl.where(e > 0, e * z, 0.0), 0)
    new_m = tl.maximum(sm, tm)
    new_safe = tl.where(new_m > float("-inf"), new_m, 0.0)
    d_old = tl.where(sm > float("-inf"), sm, 0.0) - new_safe
    d_t = tms - new_safe
    # a part that is all -inf contributes nothing (and its exp(d) may overflow)
    c_old = tl.where(sm > float("-inf"), tl.exp(d_old), 0.0)
    c_t = tl.where(tm > float("-inf"), tl.exp(d_t), 0.0)
    ss2 = ss * c_old + ts * c_t
    sez2 = c_old * (sez + d_old * ss) + c_t * (tez + d_t * ts)
    sn2 = sn + tl.sum(finite.to(tl.int32), 0)
    st2 = st + tl.sum(tl.where(finite, y, 0.0), 0)
    return new_m, ss2, sez2, sn2, st2, tm, ts


@triton.jit
def philox_uniform(key_ptr, row, B, purpose: tl.constexpr):
    """The row's uniform of ``samplers.sampling.row_uniforms`` for ``purpose``, drawn in the
    kernel: ``key_ptr`` is int32 [4, B] holding (key_lo, key_hi, step, sequence_index) as
    uint32 words (``samplers.kernels.fused.key_words``); bit-exact with the torch stream."""
    k0 = tl.load(key_ptr + row).to(tl.uint32)
    k1 = tl.load(key_ptr + B + row).to(tl.uint32)
    step = tl.load(key_ptr + 2 * B + row).to(tl.uint32)
    seq = tl.load(key_ptr + 3 * B + row).to(tl.uint32)
    zero = step * 0
    c0, _, _, _ = tl.random.philox_impl(step, seq, zero + purpose, zero, k0, k1)
    return tl.random.uint_to_uniform_float(c0)


def saturate(out32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> ``dtype`` with the reference's saturating cast (``_stats.cast_saturating``)."""
    if dtype == torch.float32:
        return out32
    fmax = torch.finfo(dtype).max
    return torch.where(torch.isfinite(out32), out32.clamp(-fmax, fmax), out32).to(dtype)
