"""Column-blocked chain and draw kernels for large vocabularies.

The whole-row kernels (``kernels.fused``, ``kernels.draw``) hold a row in registers
(``BLOCK = next_pow2(V)``); past ~64k lanes that spills and compiles for minutes. Here one
program per row loops over the row in tiles of ``TILE`` lanes (``_common.TILE``):

- the input row is read once (any float dtype, upcast after the load) and written as fp32
  to the output row, which is then the working row: every stage re-reads it tile by tile
  from global memory (L2 for the usual B), computes its row statistics with streaming
  reductions (max pass, then sum exp / entropy / count pass), runs its threshold search as
  loops of tile reductions (top_k: 4 radix passes of a 256-bin histogram accumulated over
  the tiles; top_p / typical_p: bisection, each iteration one pass, or on a compacted
  ``[KMAX]`` copy of the surviving probabilities when at most KMAX tokens have p > 0), and
  rewrites the row in place;
- a stage whose row mask (or parameter) disables it for a row skips every pass of that row.

Per-element formulas are those of the whole-row stages (``p = exp(x - m) / s``, ...); only
the summation order of the reductions differs. Stage codes are the ones of
``kernels.fused`` and are compile-time constants, like the whole-row chain.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import okey, philox_uniform
from .penalties import stage_ban, stage_penalties
from .temperature import dynatemp_of, stage_temperature

_NINF = float("-inf")


# --------------------------------------------------------------------------- streaming stats
@triton.jit
def _ld(o, start, V, TILE: tl.constexpr):
    offs = start + tl.arange(0, TILE)
    valid = offs < V
    x = tl.load(o + offs, mask=valid, other=float("-inf"))
    return offs, valid, x


@triton.jit
def _row_max(o, V, TILE: tl.constexpr):
    m = tl.full([], float("-inf"), tl.float32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, start, V, TILE)
        m = tl.maximum(m, tl.max(x, 0))
    return m


@triton.jit
def _row_softmax(o, V, TILE: tl.constexpr):
    """(raw max, safe max m, safe sum s, entropy H, finite count) of the row (two passes);
    the formulas of ``_common.softmax_stats`` / ``entropy_of``: p = exp(x - m) / s."""
    m_raw = _row_max(o, V, TILE)
    m = tl.where(m_raw > float("-inf"), m_raw, 0.0)
    s = tl.full([], 0.0, tl.float32)
    ez = tl.full([], 0.0, tl.float32)
    n = tl.full([], 0, tl.int32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, start, V, TILE)
        z = x - m
        e = tl.exp(z)
        s += tl.sum(e, 0)
        ez += tl.sum(tl.where(e > 0, e * z, 0.0), 0)
        n += tl.sum(((x > float("-inf")) & (x < float("inf"))).to(tl.int32), 0)
    s = tl.where(s > 0, s, 1.0)
    # H = -sum p log p = log s - sum(e z) / s
    h = tl.log(s) - ez / s
    h = tl.where(n > 0, h, 0.0)
    return m_raw, m, s, h, n


@triton.jit
def _p_of(x, m, s):
    return tl.exp(x - m) / s


@triton.jit
def _ukey(x):
    return okey(x).to(tl.uint32, bitcast=True) ^ 0x80000000


# --------------------------------------------------------------------------- apply pass
@triton.jit
def _apply_keep(o, V, MODE: tl.constexpr, thr, m_raw, m, s, h, TILE: tl.constexpr):
    """Rewrite the row keeping the tokens of the rule MODE (and the row's top token(s)).

    MODE 0: p >= thr; 1: x >= thr; 2: ukey(x) >= thr; 3: bits(p) >= thr;
    4: okey(|-log p - H|) <= thr."""
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, start, V, TILE)
        if MODE == 0:
            keep = _p_of(x, m, s) >= thr
        elif MODE == 1:
            keep = x >= thr
        elif MODE == 2:
            keep = _ukey(x) >= thr
        elif MODE == 3:
            keep = _p_of(x, m, s).to(tl.int32, bitcast=True) >= thr
        else:
            logp = (x - m) - tl.log(s)
            keep = okey(tl.abs(-logp - h)) <= thr
        keep = keep | ((x == m_raw) & (x > float("-inf")))
        tl.store(o + offs, tl.where(keep, x, float("-inf")), mask=valid)
    tl.debug_barrier()


# --------------------------------------------------------------------------- stages
@triton.jit
def _b_top_k(o, V, k, en, TILE: tl.constexpr):
    en = en & (k > 0) & (k < V)
    if en:
        need = k.to(tl.int32)
        prefix = tl.full([], 0, tl.uint32)
        bins = tl.arange(0, 256)
        for p in tl.static_range(4):
            hist = tl.zeros([256], tl.int32)
            for start in range(0, V, TILE):
                offs, valid, x = _ld(o, start, V, TILE)
                ukey = _ukey(x)
                digit = ((ukey >> (24 - 8 * p)) & 255).to(tl.int32)
                if p == 0:
                    match = valid
                else:
                    match = valid & ((ukey >> (32 - 8 * p)) == prefix)
                hist += tl.histogram(digit, 256, mask=match)
            from_top = tl.cumsum(hist, 0, reverse=True)
            d = tl.max(tl.where(from_top >= need, bins, 0), 0)
            above = tl.sum(tl.where(bins > d, hist, 0), 0)
            need = need - above
            prefix = prefix * 256 + d.to(tl.uint32)
        m_raw = _row_max(o, V, TILE)
        _apply_keep(o, V, 2, prefix, m_raw, m_raw, 1.0, 0.0, TILE)


@triton.jit
def _b_compact(o, V, m, s, h, VAL: tl.constexpr, scr, TILE: tl.constexpr):
    """Store p (VAL 0) or d = |-log p - H| (VAL 1) of the tokens with p > 0 contiguously at
    ``scr`` in token order (the caller checked there are at most KMAX of them)."""
    base = tl.full([], 0, tl.int32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, start, V, TILE)
        p = _p_of(x, m, s)
        alive = valid & (p > 0)
        pos = base + tl.cumsum(alive.to(tl.int32), 0) - 1
        if VAL == 0:
            val = p
        else:
            val = tl.abs(-((x - m) - tl.log(s)) - h)
        tl.store(scr + pos, val, mask=alive)
        base += tl.sum(alive.to(tl.int32), 0)
    tl.debug_barrier()


@triton.jit
def _b_top_p(o, V, tp, en, scr, TILE: tl.constexpr, KMAX: tl.constexpr):
    en = en & (tp < 1.0)
    if en:
        m_raw, m, s, h, n_fin = _row_softmax(o, V, TILE)
        lo = tl.full([], 2147483647, tl.int32)
        hi = tl.full([], 0, tl.int32)
        n = tl.full([], 0, tl.int32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            p = _p_of(x, m, s)
            key = p.to(tl.int32, bitcast=True)
            lo = tl.minimum(lo, tl.min(tl.where(valid, key, 2147483647), 0))
            hi = tl.maximum(hi, tl.max(tl.where(valid, key, 0), 0))
            n += tl.sum((valid & (p > 0)).to(tl.int32), 0)
        lo = lo - 1
        if n <= KMAX:
            _b_compact(o, V, m, s, h, 0, scr, TILE)
            j = tl.arange(0, KMAX)
            pc = tl.load(scr + j, mask=j < n, other=0.0)
            keyc = pc.to(tl.int32, bitcast=True)
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                good = tl.sum(tl.where(keyc > mid, pc, 0.0), 0) < tp
                hi = tl.where(good, mid, hi)
                lo = tl.where(good, lo, mid)
        else:
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                mass = tl.full([], 0.0, tl.float32)
                for start in range(0, V, TILE):
                    offs, valid, x = _ld(o, start, V, TILE)
                    p = _p_of(x, m, s)
                    mass += tl.sum(tl.where(p.to(tl.int32, bitcast=True) > mid, p, 0.0), 0)
                good = mass < tp
                hi = tl.where(good, mid, hi)
                lo = tl.where(good, lo, mid)
        _apply_keep(o, V, 3, hi, m_raw, m, s, h, TILE)


@triton.jit
def _b_typical(o, V, tp, en, scr, TILE: tl.constexpr, KMAX: tl.constexpr):
    en = en & (tp < 1.0)
    if en:
        m_raw, m, s, h, n_fin = _row_softmax(o, V, TILE)
        lo = tl.full([], 2147483647, tl.int32)
        hi = tl.full([], 0, tl.int32)
        n = tl.full([], 0, tl.int32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            p = _p_of(x, m, s)
            key = okey(tl.abs(-((x - m) - tl.log(s)) - h))
            lo = tl.minimum(lo, tl.min(tl.where(valid, key, 2147483647), 0))
            hi = tl.maximum(hi, tl.max(tl.where(valid, key, 0), 0))
            n += tl.sum((valid & (p > 0)).to(tl.int32), 0)
        hi = hi + 1
        if n <= KMAX:
            _b_compact(o, V, m, s, h, 0, scr, TILE)
            _b_compact(o, V, m, s, h, 1, scr + KMAX, TILE)
            j = tl.arange(0, KMAX)
            pc = tl.load(scr + j, mask=j < n, other=0.0)
            keyc = okey(tl.load(scr + KMAX + j, mask=j < n, other=0.0))
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                good = tl.sum(tl.where(keyc < mid, pc, 0.0), 0) < tp
                lo = tl.where(good, mid, lo)
                hi = tl.where(good, hi, mid)
        else:
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                mass = tl.full([], 0.0, tl.float32)
                for start in range(0, V, TILE):
                    offs, valid, x = _ld(o, start, V, TILE)
                    p = _p_of(x, m, s)
                    key = okey(tl.abs(-((x - m) - tl.log(s)) - h))
                    mass += tl.sum(tl.where(key < mid, p, 0.0), 0)
                good = mass < tp
                lo = tl.where(good, mid, lo)
                hi = tl.where(good, hi, mid)
        _apply_keep(o, V, 4, lo, m_raw, m, s, h, TILE)


@triton.jit
def _b_prob_cut(o, V, KIND: tl.constexpr, a, en, TILE: tl.constexpr):
    """KIND 0 top_a (p >= a p_max^2), 1 min_p (p >= a p_max), 2 eta, 3 epsilon (p >= a)."""
    en = en & (a > 0)
    if en:
        m_raw, m, s, h, n = _row_softmax(o, V, TILE)
        pmax = tl.where(m_raw > float("-inf"), 1.0 / s, 0.0)
        if KIND == 0:
            thr = a * pmax * pmax
        elif KIND == 1:
            thr = a * pmax
        elif KIND == 2:
            thr = tl.minimum(a, tl.sqrt(tl.maximum(a, 0.0)) * tl.exp(-h))
        else:
            thr = a
        _apply_keep(o, V, 0, thr, m_raw, m, s, h, TILE)


@triton.jit
def _b_nsigma(o, V, nsig, en, TILE: tl.constexpr):
    en = en & (nsig > 0)
    if en:
        m_raw = tl.full([], float("-inf"), tl.float32)
        cnt = tl.full([], 0, tl.int32)
        tot = tl.full([], 0.0, tl.float32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            finite = (x > float("-inf")) & (x < float("inf"))
            m_raw = tl.maximum(m_raw, tl.max(x, 0))
            cnt += tl.sum(finite.to(tl.int32), 0)
            tot += tl.sum(tl.where(finite, x, 0.0), 0)
        countf = cnt.to(tl.float32)
        mean = tot / tl.maximum(countf, 1.0)
        sq = tl.full([], 0.0, tl.float32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            finite = (x > float("-inf")) & (x < float("inf"))
            d = tl.where(finite, x - mean, 0.0)
            sq += tl.sum(d * d, 0)
        std = tl.sqrt(sq / tl.maximum(countf - 1.0, 1.0))
        std = tl.where(cnt > 1, std, 0.0)
        _apply_keep(o, V, 1, m_raw - nsig * std, m_raw, m_raw, 1.0, 0.0, TILE)


@triton.jit
def _b_xtc(o, V, threshold, probability, coin, en, TILE: tl.constexpr):
    en = en & (probability > 0) & (coin < probability)
    if en:
        m_raw, m, s, h, n = _row_softmax(o, V, TILE)
        size = tl.full([], 0, tl.int32)
        min_c = tl.full([], float("inf"), tl.float32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            p = _p_of(x, m, s)
            in_c = (p >= threshold) & (x > float("-inf")) & (x < float("inf")) & valid
            size += tl.sum(in_c.to(tl.int32), 0)
            min_c = tl.minimum(min_c, tl.min(tl.where(in_c, p, float("inf")), 0))
        if size >= 2:
            for start in range(0, V, TILE):
                offs, valid, x = _ld(o, start, V, TILE)
                p = _p_of(x, m, s)
                in_c = (p >= threshold) & (x > float("-inf")) & (x < float("inf")) & valid
                tl.store(o + offs, tl.where(in_c & (p > min_c), float("-inf"), x), mask=valid)
            tl.debug_barrier()


@triton.jit
def _b_scale(o, V, temp, TILE: tl.constexpr):
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, start, V, TILE)
        tl.store(o + offs, tl.math.div_rn(x, temp), mask=valid)
    tl.debug_barrier()


@triton.jit
def _b_dynatemp(o, V, t_min, t_max, exponent, en, TILE: tl.constexpr):
    en = en & ((t_min != 0) | (t_max != 0))
    if en:
        m_raw, m, s, h, n = _row_softmax(o, V, TILE)
        _b_scale(o, V, dynatemp_of(h, n, t_min, t_max, exponent), TILE)


@triton.jit
def _b_temperature(o, V, t, en, TILE: tl.constexpr):
    en = en & (t != 1.0) & (t >= 1e-5)
    if en:
        _b_scale(o, V, t, TILE)


@triton.jit
def _b_smoothing(o, V, f, c, en, TILE: tl.constexpr):
    en = en & (f != 0)
    if en:
        k = f * (3.0 - c) / 2.0
        sc = f * (c - 1.0) / 2.0
        m = _row_max(o, V, TILE)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            finite = (x > float("-inf")) & (x < float("inf"))
            d = tl.where(finite, x - m, 0.0)
            dd = d * d
            smoothed = m - k * dd + sc * (dd * d)
            tl.store(o + offs, tl.where(finite, smoothed, x), mask=valid)
        tl.debug_barrier()


@triton.jit
def _b_side(o, V, CODE: tl.constexpr, side_ptr, cnt_ptr, r, f, pr, en, TILE: tl.constexpr):
    """Elementwise stages with a [V] side input: PENALTIES (seen, counts), NGRAM (ban mask)."""
    if en:
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, start, V, TILE)
            if CODE == 1:
                seen = tl.load(side_ptr + offs, mask=valid, other=0) != 0
                cnt = tl.load(cnt_ptr + offs, mask=valid, other=0)
                y = stage_penalties(x, seen, cnt, r, f, pr, en)
            else:
                banned = tl.load(side_ptr + offs, mask=valid, other=0) != 0
                y = stage_ban(x, banned, en)
            tl.store(o + offs, y, mask=valid)
        tl.debug_barrier()


@triton.jit
def _prm(prm_ptr, idx: tl.constexpr, row, B):
    return tl.load(prm_ptr + idx * B + row)


@triton.jit
def _bstage(CODE: tl.constexpr, SLOT: tl.constexpr, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr,
            ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE: tl.constexpr, KMAX: tl.constexpr):
    if CODE != 0:
        en = tl.load(rmask_ptr + SLOT * B + row) != 0
        if CODE == 1:  # PENALTIES
            _b_side(o, V, 1, seen_ptr + row * stride_s, cnt_ptr + row * stride_c, _prm(prm_ptr, 0, row, B),
                    _prm(prm_ptr, 1, row, B), _prm(prm_ptr, 2, row, B),
                    en & ((_prm(prm_ptr, 0, row, B) != 1.0) | (_prm(prm_ptr, 1, row, B) != 0.0)
                          | (_prm(prm_ptr, 2, row, B) != 0.0)), TILE)
        elif CODE == 2:  # NGRAM
            _b_side(o, V, 2, ban_ptr + row * stride_b, cnt_ptr, 1.0, 0.0, 0.0, en, TILE)
        elif CODE == 3:
            _b_temperature(o, V, _prm(prm_ptr, 3, row, B), en, TILE)
        elif CODE == 4:
            _b_dynatemp(o, V, _prm(prm_ptr, 4, row, B), _prm(prm_ptr, 5, row, B), _prm(prm_ptr, 6, row, B),
                        en, TILE)
            _b_temperature(o, V, _prm(prm_ptr, 3, row, B), en, TILE)
        elif CODE == 5:
            _b_nsigma(o, V, _prm(prm_ptr, 9, row, B), en, TILE)
        elif CODE == 6:
            _b_top_k(o, V, _prm(prm_ptr, 10, row, B), en, TILE)
        elif CODE == 7:
            _b_top_p(o, V, _prm(prm_ptr, 11, row, B), en, scr, TILE, KMAX)
        elif CODE == 8:
            _b_prob_cut(o, V, 0, _prm(prm_ptr, 12, row, B), en, TILE)
        elif CODE == 9:
            _b_prob_cut(o, V, 1, _prm(prm_ptr, 13, row, B), en, TILE)
        elif CODE == 10:
            _b_prob_cut(o, V, 2, _prm(prm_ptr, 14, row, B), en, TILE)
        elif CODE == 11:
            _b_prob_cut(o, V, 3, _prm(prm_ptr, 15, row, B), en, TILE)
        elif CODE == 12:
            _b_typical(o, V, _prm(prm_ptr, 16, row, B), en, scr, TILE, KMAX)
        elif CODE == 13:
            _b_smoothing(o, V, _prm(prm_ptr, 7, row, B), _prm(prm_ptr, 8, row, B), en, TILE)
        elif CODE == 14:
            _b_xtc(o, V, _prm(prm_ptr, 17, row, B), _prm(prm_ptr, 18, row, B), _prm(prm_ptr, 19, row, B), en, TILE)
        elif CODE == 15:
            _b_xtc(o, V, _prm(prm_ptr, 17, row, B), _prm(prm_ptr, 18, row, B), philox_uniform(key_ptr, row, B, 1), en, TILE)


@triton.jit
def _blocked_chain_kernel(x_ptr, out_ptr, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr_ptr,
                          B, V, stride_x, stride_o, stride_s, stride_c, stride_b,
                          S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                          S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
                          S8: tl.constexpr, S9: tl.constexpr, S10: tl.constexpr, S11: tl.constexpr,
                          S12: tl.constexpr, S13: tl.constexpr, S14: tl.constexpr, S15: tl.constexpr,
                          TILE: tl.constexpr, KMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o = out_ptr + row * stride_o
    scr = scr_ptr + row * (2 * KMAX)
    for start in range(0, V, TILE):  # the one read of the input: fp32 copy into the working row
        offs = start + tl.arange(0, TILE)
        valid = offs < V
        x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=float("-inf")).to(tl.float32)
        tl.store(o + offs, x, mask=valid)
    tl.debug_barrier()
    _bstage(S0, 0, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S1, 1, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S2, 2, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S3, 3, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S4, 4, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S5, 5, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S6, 6, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S7, 7, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S8, 8, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S9, 9, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S10, 10, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S11, 11, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S12, 12, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S13, 13, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S14, 14, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
    _bstage(S15, 15, o, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, TILE, KMAX)
