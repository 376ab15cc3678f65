"""The draw in a kernel, and the Philox stream in a kernel.

``draw_tokens`` mirrors ``samplers.sampling.draw_tokens``: greedy rows take the argmax
(lowest id on ties); random rows take the inverse CDF of softmax(logits) in token-id order
(the first token whose cumulative probability exceeds ``u * total``), never a removed token.

``row_uniforms`` mirrors ``samplers.sampling.row_uniforms``: Philox4x32-10 keyed by the row's
(key_lo, key_hi), counter (step, sequence_index, purpose, 0), first word -> float32 with
Triton's ``uint_to_uniform_float``; bit-exact with the torch stream (tested).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (FP_FUSION, block_for, device_guard, lane_mask, online_softmax, philox_uniform, pick_layout,
                      softmax_stats, warps_for)
from .codes import blocked_draw_scratch_stride, compact_size

#: Tiles whose (max, sum) the blocked draw scans per step when it looks for the target tile.
_TILES_PER_STEP = 64


@triton.jit
def _row_uniform(u_ptr, key_ptr, row, B, KEYED: tl.constexpr):
    """The row's draw uniform: computed here from its Philox key words (KEYED), or given."""
    if KEYED:
        return philox_uniform(key_ptr, row, B, 0)
    else:
        return tl.load(u_ptr + row)


@triton.jit
def prefix_sum(p):
    """Inclusive prefix sum of ``p`` [N] in token-id order. On a GPU the scan adds in another
    order than token order (per thread, then a tree across threads), so the result can dip or
    step by an ulp on lanes with p = 0: the draw below never relies on it being
    non-decreasing. (A function of its own so that the tests can give it such rounding.)"""
    return tl.cumsum(p, 0)


@triton.jit
def draw_row(x, offs, valid, V, greedy, u):
    """The draw of a row held in registers (``x`` [BLOCK] fp32, -inf = removed or padding):
    argmax (lowest id on ties) for greedy rows, else the inverse CDF of softmax(x) in token-id
    order at ``u * total``, never a removed token. Returns (token id, its log-probability).

    The inverse CDF takes the first token *with p > 0* whose cumulative probability exceeds
    the target (with an exact, non-decreasing prefix sum that is the first token whose
    cumulative probability exceeds it, the reference's rule); if none does (rounding put the
    target at or past the total) the last token with p > 0; a row without one gives V - 1,
    as the reference. So whatever the rounding of the prefix sum, the token has p > 0."""
    am = tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
    m_raw, p, logp = softmax_stats(x)
    pos = valid & (p > 0)
    cdf = prefix_sum(p)
    total = tl.max(tl.where(pos, cdf, 0.0), 0)
    target = u * total
    first = tl.min(tl.where(pos & (cdf > target), offs, 2147483647), 0)
    last_pos = tl.max(tl.where(pos, offs, -1), 0)
    idx = tl.where(first < 2147483647, first, tl.where(last_pos >= 0, last_pos, V - 1)).to(tl.int64)
    tok = tl.where(greedy, am, idx)
    return tok, tl.sum(tl.where(offs == tok, logp, 0.0), 0)


@triton.jit
def draw_sparse(xs, ids, lane, n, V, greedy, u):
    """``draw_row`` for a row given by its finite entries: ``xs`` [K] values (-inf past the
    ``n`` ``lane``s) at token ids ``ids`` (increasing), every other token removed. Token-id
    order is lane order, so the inverse CDF and the lowest-id argmax are those of the row."""
    j = tl.arange(0, xs.shape[0])
    tok_lane, lp = draw_row(xs, j, lane, xs.shape[0], greedy, u)
    tok = tl.sum(tl.where(j == tok_lane, ids, 0), 0)
    # an all -inf row: the reference's argmax is token 0, its inverse CDF the last token
    tok = tl.where(n > 0, tok, tl.where(greedy, 0, V - 1).to(tl.int64))
    return tok, lp


@triton.jit
def append_kept(dst, x, ids, n, KMAX: tl.constexpr):
    """Append the lanes of ``x`` above -inf (at token ids ``ids``, increasing, past every id
    already listed) to the list at ``dst`` ([KMAX] values, then [KMAX] token ids as fp32),
    after its first ``n`` entries, in lane order; entries past KMAX are not stored. Returns
    the new count, which exceeds KMAX when the list overflowed."""
    keep = x > float("-inf")
    pos = n + tl.cumsum(keep.to(tl.int32), 0) - 1
    put = lane_mask(keep & (pos < KMAX))
    tl.store(dst + pos, x, mask=put)
    tl.store(dst + KMAX + pos, ids.to(tl.float32), mask=put)
    return n + tl.sum(keep.to(tl.int32), 0)


@triton.jit
def list_kept(dst, src, lo, hi, V, n, KMAX: tl.constexpr):
    """``append_kept`` of ``src[lo:hi]`` (a row in memory, any float dtype; token ids
    ``lo .. hi - 1``), read KMAX lanes at a time: a scan over [KMAX] lanes, not over a tile,
    keeps the kernels that call it within their registers."""
    for c in range(lo, hi, KMAX):
        offs = c + tl.arange(0, KMAX)
        y = tl.load(src + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        n = append_kept(dst, y, offs, n, KMAX)
    return n


@triton.jit
def draw_listed(src, n, V, greedy, u, KMAX: tl.constexpr):
    """``draw_sparse`` of the ``n <= KMAX`` entries ``append_kept`` listed at ``src``.

    The blocked layout's rule for a row with at most KMAX entries above -inf, in the chain's
    launch and in ``_blocked_draw_kernel`` alike: both list the same entries in the same
    lanes, so the row's mass is summed in the same order whichever kernel draws it."""
    j = tl.arange(0, KMAX)
    lane = j < n
    xs = tl.load(src + j, mask=lane, other=float("-inf"))
    ids = tl.load(src + KMAX + j, mask=lane, other=0.0).to(tl.int64)
    return draw_sparse(xs, ids, lane, n, V, greedy, u)


@triton.jit
def _draw_kernel(x_ptr, greedy_ptr, u_ptr, key_ptr, out_ptr, lp_ptr, B, V, stride_x, BLOCK: tl.constexpr,
                 KEYED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=float("-inf")).to(tl.float32)
    greedy = tl.load(greedy_ptr + row) != 0
    tok, lp = draw_row(x, offs, valid, V, greedy, _row_uniform(u_ptr, key_ptr, row, B, KEYED))
    tl.store(out_ptr + row, tok)
    tl.store(lp_ptr + row, lp)


@triton.jit
def pick_from_tiles(xr, tiles, NT, V, m_raw, s, am, greedy, u, TILE: tl.constexpr, NTB: tl.constexpr):
    """The draw of a long row from its statistics: ``m_raw`` (raw max), ``s`` (sum exp(x - m)),
    ``am`` (argmax) and ``tiles`` [2, NT], each tile's (max, sum exp(x - tile max)).

    Greedy rows take ``am``. Otherwise the tile whose cumulative mass first exceeds ``u * s``
    is found from the NT pairs (NTB at a time) and only that tile of ``xr`` is read: the
    inverse CDF in token-id order, carrying the mass of the tiles before it. Only tiles and
    lanes with mass are candidates (``draw_row``); rounding can leave the target at or past
    the total: then the last token with p > 0, as the reference. The token is always in the row.
    Returns (token id, its log-probability x - m - log s)."""
    m = tl.where(m_raw > float("-inf"), m_raw, 0.0)
    log_s = tl.log(tl.where(s > 0, s, 1.0))
    tok = am
    if not greedy:
        target = u * s
        carry = tl.full([], 0.0, tl.float32)
        hit = tl.full([], -1, tl.int32)
        before = tl.full([], 0.0, tl.float32)
        last_t = tl.full([], -1, tl.int32)
        for c in range(0, NT, NTB):
            j = c + tl.arange(0, NTB)
            inside = j < NT
            tmx = tl.load(tiles + j, mask=inside, other=float("-inf"))
            mass = tl.where(tmx > float("-inf"), tl.load(tiles + NT + j, mask=inside, other=0.0) * tl.exp(tmx - m),
                            0.0)
            cum = carry + prefix_sum(mass)
            # only a tile with mass can hold the token (see ``prefix_sum``: no monotone prefix assumed)
            first = tl.min(tl.where(inside & (mass > 0) & (cum > target), j, 2147483647), 0)
            found = (hit < 0) & (first < 2147483647)
            # mass before ``first``: the cumulative sum of its last predecessor with mass (the
            # prefix is read on tiles with mass only; it may move on the others)
            with_mass = inside & (mass > 0)
            before = tl.where(found, tl.max(tl.where(with_mass & (j < first), cum, carry), 0), before)
            hit = tl.where(found, first, hit)
            last_t = tl.maximum(last_t, tl.max(tl.where(with_mass, j, -1), 0))
            carry = tl.max(tl.where(with_mass, cum, carry), 0)
        t = tl.where(hit >= 0, hit, last_t)
        tok = tl.full([], 0, tl.int64) + V - 1
        if t >= 0:
            offs = t.to(tl.int64) * TILE + tl.arange(0, TILE)
            valid = offs < V
            e = tl.exp(tl.load(xr + offs, mask=valid, other=float("-inf")).to(tl.float32) - m)
            pos = valid & (e > 0)
            cdf = before + prefix_sum(e)
            # as ``draw_row``: the first lane with mass past the target, else the tile's last
            # lane with mass, else (a tile whose mass this read does not see) the argmax
            first_in = tl.min(tl.where(pos & (cdf > target), offs, V), 0)
            last_in = tl.max(tl.where(pos, offs, -1), 0)
            last_in = tl.where(last_in >= 0, last_in, am)
            tok = tl.where((hit >= 0) & (first_in < V), first_in, last_in)
        # never an index outside the row, whatever the rounding above
        tok = tl.where((tok >= 0) & (tok < V), tok, am)
    x_tok = tl.load(xr + tok).to(tl.float32)
    return tok, x_tok - m - log_s


@triton.jit
def _blocked_draw_kernel(x_ptr, greedy_ptr, u_ptr, key_ptr, out_ptr, lp_ptr, scr_ptr, B, V, stride_x, NT,
                         stride_scr, TILE: tl.constexpr, KMAX: tl.constexpr, KEYED: tl.constexpr,
                         NTB: tl.constexpr):
    """``_draw_kernel`` for long rows: one pass over the row (online softmax: max, argmax,
    sum exp, and each tile's (max, sum exp) in the scratch row after [2 * KMAX]
    (``codes.blocked_draw_scratch_stride``); the entries above -inf listed at its start while
    there are at most KMAX of them), then ``draw_listed`` for a row with at most KMAX entries
    above -inf, else ``pick_from_tiles`` (greedy rows read nothing more, the others one tile):
    the rule of the blocked chain's own draw."""
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    listed = scr_ptr + row * stride_scr
    tiles = listed + 2 * KMAX
    sm = tl.full([], float("-inf"), tl.float32)
    ss = tl.full([], 0.0, tl.float32)
    sez = tl.full([], 0.0, tl.float32)
    sn = tl.full([], 0, tl.int32)
    st = tl.full([], 0.0, tl.float32)
    am = tl.full([], 0, tl.int64)
    n = tl.full([], 0, tl.int32)
    for start in range(0, V, TILE):
        offs = start + tl.arange(0, TILE)
        x = tl.load(xr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        ti = tl.argmax(x, 0, tie_break_left=True).to(tl.int64) + start
        sm_old = sm
        sm, ss, sez, sn, st, tm, ts = online_softmax(sm, ss, sez, sn, st, x)
        am = tl.where((tm > sm_old) | ((start == 0) & (tm == sm_old)), ti, am)
        tl.store(tiles + start // TILE, tm)
        tl.store(tiles + NT + start // TILE, ts)
        if n <= KMAX:
            here = tl.sum((x > float("-inf")).to(tl.int32), 0)
            if n + here <= KMAX:  # (the tile is read again from the cache, KMAX lanes at a time)
                n = list_kept(listed, xr, start, start + TILE, V, n, KMAX)
            else:  # past KMAX: the row is drawn from the tiles
                n = n + here
    tl.debug_barrier()
    greedy = tl.load(greedy_ptr + row) != 0
    u = _row_uniform(u_ptr, key_ptr, row, B, KEYED)
    if n <= KMAX:
        tok, lp = draw_listed(listed, n, V, greedy, u, KMAX)
    else:
        tok, lp = pick_from_tiles(xr, tiles, NT, V, sm, ss, am, greedy, u, TILE, NTB)
    tl.store(out_ptr + row, tok)
    tl.store(lp_ptr + row, lp)


def _launch(logits: torch.Tensor, greedy: torch.Tensor, uniforms: Optional[torch.Tensor],
            keys: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return out, logp
    keyed = keys is not None
    g = greedy.to(torch.int8).contiguous()
    if keys is not None:
        u, k = out, keys.contiguous()  # (u: an unused pointer when keyed)
    else:
        assert uniforms is not None  # (draw_tokens passes uniforms, sample_tokens keys)
        u, k = uniforms.to(torch.float32).contiguous(), g
    with device_guard(logits):
        if pick_layout(logits) == "blocked":
            tile = _common.TILE
            kmax = compact_size(tile)  # the blocked chain's
            nt = triton.cdiv(V, tile)
            scratch = torch.empty((B, blocked_draw_scratch_stride(kmax, nt)), dtype=torch.float32,
                                  device=logits.device)
            _blocked_draw_kernel[(B,)](logits, g, u, k, out, logp, scratch, B, V, logits.stride(0), nt,
                                       scratch.stride(0), TILE=tile, KMAX=kmax, KEYED=keyed, NTB=_TILES_PER_STEP,
                                       num_warps=_common.TILE_WARPS, enable_fp_fusion=FP_FUSION)
        else:
            block = block_for(V)
            _draw_kernel[(B,)](logits, g, u, k, out, logp, B, V, logits.stride(0), BLOCK=block, KEYED=keyed,
                               num_warps=warps_for(block), enable_fp_fusion=FP_FUSION)
    return out, logp


def draw_tokens(logits: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.sampling.draw_tokens``: [B, V] logits, [B] bool greedy, [B] float32
    uniforms -> [B] int64 token ids."""
    return _launch(logits, greedy, uniforms, None)[0]


def sample_tokens(logits: torch.Tensor, greedy: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's draw in one launch: ``draw_tokens`` with each row's uniform computed in
    the kernel from its Philox words (``keys``: int32 [4, B], ``samplers.kernels.fused.key_words``;
    the same stream as ``row_uniforms(..., PURPOSE_DRAW)``), and the log-probability of the
    chosen token under softmax(logits) (``compute_logprobs``' value) as a by-product.

    Returns ([B] int64 token ids, [B] float32 log-probabilities)."""
    return _launch(logits, greedy, None, keys)


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
    with device_guard(key_lo):
        _uniform_kernel[(triton.cdiv(B, block),)](out, as32(key_lo), as32(key_hi), as32(step),
                                                  as32(sequence_index), int(purpose), B, BLOCK=block)
    return out
