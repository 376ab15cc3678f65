"""Column-blocked chain kernel for large vocabularies.

The whole-row kernels (``samplers.kernels.fused``, ``samplers.kernels.draw``) hold a row in registers
(``BLOCK = next_pow2(V)``); past ~64k lanes that spills and compiles for minutes. Here one
program per row loops over the row in tiles of ``TILE`` lanes (``_common.TILE``):

- The first pass reads the input row (any float dtype, upcast after the load) only for its
  statistics. The first stage that changes the row reads the input and writes the fp32
  output row, which is the working row from then on; every later pass reads it tile by
  tile (from L2 for the usual B) and rewrites it in place. A row no stage changes is copied
  at the end.
- Every pass that writes the row also folds what it writes into the row statistics
  (online softmax, ``_common.online_softmax``: max, sum exp, entropy, finite count and sum,
  argmax, and each tile's own max and sum exp), so the next stage starts from the
  statistics of its input instead of re-reading the row for them.
- Threshold searches run as loops of tile reductions (top_k: 4 radix passes of a 256-bin
  histogram accumulated over the tiles; top_p / typical_p: bisection, each iteration one
  pass, or on a compacted ``[KMAX]`` copy of the surviving values when at most KMAX tokens
  are finite).
- A stage whose row mask (or parameter) disables it for a row skips every pass of that row.
- With ``DRAW``, the launch ends with the token draw (``samplers.kernels.draw``): the last write
  pass left each tile's mass, so the inverse CDF reads one tile.

Per-element formulas are those of the whole-row stages (``p = exp(x - m) / s``, ...); only
the summation order of the reductions differs. Stage codes are those of
``samplers.kernels.codes`` and are compile-time constants, like the whole-row chain.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import lane_mask, okey, online_softmax, philox_uniform
from .codes import SCRATCH_HEADER as _HEADER
from .draw import append_kept, draw_listed, list_kept, pick_from_tiles
from .penalties import stage_ban, stage_penalties
from .stage import prm, stage
from .temperature import dynatemp_of
from .truncation import bisect_mass_above, bisect_mass_below, radix_select

_NINF = float("-inf")
SCRATCH_HEADER = tl.constexpr(_HEADER)


# --------------------------------------------------------------------------- row access
@triton.jit
def _ld(o, xin, wr, start, V, TILE: tl.constexpr):
    """Tile ``start`` of the working row: the output row once a stage wrote it (``wr``),
    the input row before (only one of the two masked loads moves memory)."""
    offs = start + tl.arange(0, TILE)
    valid = offs < V
    xo = tl.load(o + offs, mask=lane_mask(valid & (wr != 0)), other=float("-inf"))
    xi = tl.load(xin + offs, mask=lane_mask(valid & (wr == 0)), other=float("-inf")).to(tl.float32)
    return offs, valid, tl.where(wr != 0, xo, xi)


@triton.jit
def _fresh():
    """Row statistics before the first tile: (max, sum exp, sum e z, finite count, finite sum, argmax)."""
    return (tl.full([], float("-inf"), tl.float32), tl.full([], 0.0, tl.float32), tl.full([], 0.0, tl.float32),
            tl.full([], 0, tl.int32), tl.full([], 0.0, tl.float32), tl.full([], 0, tl.int64))


@triton.jit
def _put(o, tiles, NT, offs, valid, start, y, sm, ss, sez, sn, st, am, TILE: tl.constexpr):
    """Store tile ``y`` of the working row and fold it into the running statistics; each
    tile's (max, sum exp(y - max)) goes to ``tiles`` [2, NT] for the draw."""
    tl.store(o + offs, y, mask=valid)
    y = tl.where(valid, y, float("-inf"))
    ti = tl.argmax(y, 0, tie_break_left=True).to(tl.int64) + start
    sm_old = sm
    sm, ss, sez, sn, st, tm, ts = online_softmax(sm, ss, sez, sn, st, y)
    am = tl.where((tm > sm_old) | ((start == 0) & (tm == sm_old)), ti, am)
    t = start // TILE
    tl.store(tiles + t, tm)
    tl.store(tiles + NT + t, ts)
    return sm, ss, sez, sn, st, am


@triton.jit
def _derive(sm, ss, sez, sn):
    """(safe max m, safe sum s, entropy H) from the running statistics; the formulas of
    ``_common.softmax_stats`` / ``entropy_of``: p = exp(x - m) / s, H = log s - sum(e z) / s."""
    m = tl.where(sm > float("-inf"), sm, 0.0)
    s = tl.where(ss > 0, ss, 1.0)
    h = tl.where(sn > 0, tl.log(s) - sez / s, 0.0)
    return m, s, h


@triton.jit
def _p_of(x, m, s):
    return tl.exp(x - m) / s


@triton.jit
def _ukey(x):
    return okey(x).to(tl.uint32, bitcast=True) ^ 0x80000000


# --------------------------------------------------------------------------- write passes
@triton.jit
def _apply_keep(o, xin, wr, tiles, NT, V, MODE: tl.constexpr, thr, m_raw, m, s, h, TILE: tl.constexpr,
                KMAX: tl.constexpr):
    """Rewrite the row keeping the tokens of the rule MODE (and, for the threshold samplers,
    MODE 0 to 3, the row's top token(s)); returns the state after the pass (wr, statistics of
    the written row). The survivors are also compacted (value, token id) into the sparse
    region of the scratch row: when there are at most KMAX of them, the rest of the chain
    runs on them in registers (``_bstage``).

    MODE 0: p >= thr; 1: x >= thr; 2: ukey(x) >= thr; 3: bits(p) >= thr;
    4 (typical_p, which does not add the top token back): okey(|-log p - H|) <= thr."""
    sm, ss, sez, sn, st, am = _fresh()
    sps = tiles - 2 * KMAX - SCRATCH_HEADER
    kept_n = tl.full([], 0, tl.int32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, xin, wr, start, V, TILE)
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
        if MODE != 4:
            keep = keep | ((x == m_raw) & (x > float("-inf")))
        y = tl.where(keep, x, float("-inf"))
        sm, ss, sez, sn, st, am = _put(o, tiles, NT, offs, valid, start, y, sm, ss, sez, sn, st, am, TILE)
        alive = valid & (y > float("-inf"))
        pos = kept_n + tl.cumsum(alive.to(tl.int32), 0) - 1
        tl.store(sps + pos, y, mask=lane_mask(alive & (pos < KMAX)))
        tl.store(sps + KMAX + pos, offs.to(tl.float32), mask=lane_mask(alive & (pos < KMAX)))
        kept_n += tl.sum(alive.to(tl.int32), 0)
    tl.store(sps + 2 * KMAX, tl.where(kept_n <= KMAX, kept_n, -1).to(tl.float32))
    tl.store(sps + 2 * KMAX + 1, 0.0)  # the row is -inf outside the survivors already
    tl.debug_barrier()
    return wr | 1, sm, ss, sez, sn, st, am


@triton.jit
def _scale(o, xin, wr, tiles, NT, V, temp, TILE: tl.constexpr):
    sm, ss, sez, sn, st, am = _fresh()
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, xin, wr, start, V, TILE)
        sm, ss, sez, sn, st, am = _put(o, tiles, NT, offs, valid, start, tl.math.div_rn(x, temp),
                                       sm, ss, sez, sn, st, am, TILE)
    tl.debug_barrier()
    return wr | 1, sm, ss, sez, sn, st, am


# --------------------------------------------------------------------------- stages
# Each stage takes the row state (wr: the output row holds the working row; the running
# statistics sm, ss, sez, sn, st, am of the working row) and returns it updated.
#: top_k's window: logits within 255 / WINDOW_SCALE of the row max are histogrammed in bins
#: of 1 / WINDOW_SCALE (the last bin takes the rest)
WINDOW_SCALE = tl.constexpr(8.0)


@triton.jit
def _window_bin(x, ref):
    """Bin of x in top_k's window below ``ref``: 1 / WINDOW_SCALE wide, clamped to [0, 255]."""
    return tl.maximum(tl.minimum((ref - x) * WINDOW_SCALE, 255.0), 0.0).to(tl.int32)


@triton.jit
def _b_top_k(o, xin, wr, tiles, NT, V, k, en, sm, ss, sez, sn, st, am, scr, pre_hist, pre_ref, has_pre,
             TILE: tl.constexpr, KMAX: tl.constexpr):
    """``has_pre``: the window histogram (``pre_hist`` below ``pre_ref``) was taken by the
    statistics pass (top_k first in the chain), so this stage does not read the row for it."""
    en = en & (k > 0) & (k < V)
    if en:
        need = k.to(tl.int32)
        # The k largest logits are near the max: a histogram of the distance to the max in
        # bins of 1 / WINDOW_SCALE gives the smallest window holding >= k tokens. When it
        # holds at most KMAX, they are compacted and the radix select runs in registers on
        # them (the window is an upper set, so its k-th largest is the row's); otherwise the
        # radix select makes its 4 histogram passes over the row.
        bins = tl.arange(0, 256)
        if has_pre != 0:
            hist = pre_hist
            ref = pre_ref
        else:
            hist = tl.zeros([256], tl.int32)
            ref = sm
            for start in range(0, V, TILE):
                offs, valid, x = _ld(o, xin, wr, start, V, TILE)
                finite = valid & (x > float("-inf")) & (x < float("inf"))
                hist += tl.histogram(_window_bin(x, ref), 256, mask=finite)
        upto = tl.cumsum(hist, 0)
        last_bin = tl.min(tl.where(upto >= need, bins, 255), 0)
        count = tl.sum(tl.where(bins <= last_bin, hist, 0), 0)
        if count <= KMAX:
            base = tl.full([], 0, tl.int32)
            for start in range(0, V, TILE):
                offs, valid, x = _ld(o, xin, wr, start, V, TILE)
                cand = valid & (x > float("-inf")) & (x < float("inf")) & (_window_bin(x, ref) <= last_bin)
                pos = base + tl.cumsum(cand.to(tl.int32), 0) - 1
                tl.store(scr + pos, x, mask=cand)
                tl.store(scr + KMAX + pos, offs.to(tl.float32), mask=cand)
                base += tl.sum(cand.to(tl.int32), 0)
            tl.debug_barrier()
            j = tl.arange(0, KMAX)
            lane = j < count
            xc = tl.load(scr + j, mask=lane, other=float("-inf"))
            prefix = radix_select(_ukey(xc), lane, need)
            # the window holds every survivor: the row is sparse from here, without a keep pass
            keep = (_ukey(xc) >= prefix) | ((xc == sm) & (xc > float("-inf")))
            tl.store(scr + 2 * KMAX + j, tl.where(keep, xc, float("-inf")), mask=lane)
            tl.store(scr + 3 * KMAX + j, tl.load(scr + KMAX + j, mask=lane, other=0.0), mask=lane)
            tl.store(scr + 4 * KMAX, count.to(tl.float32))
            tl.store(scr + 4 * KMAX + 1, 1.0)
            tl.debug_barrier()
        else:
            prefix = tl.full([], 0, tl.uint32)
            for p in tl.static_range(4):
                hist = tl.zeros([256], tl.int32)
                for start in range(0, V, TILE):
                    offs, valid, x = _ld(o, xin, wr, start, V, TILE)
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
            wr, sm, ss, sez, sn, st, am = _apply_keep(o, xin, wr, tiles, NT, V, 2, prefix, sm, sm, 1.0, 0.0, TILE,
                                                      KMAX)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _d_of(x, m, s, h):
    """typical_p's distance d = |-log p - H|."""
    return tl.abs(-((x - m) - tl.log(s)) - h)


@triton.jit
def _d_bin(d):
    """typical_p's histogram bin of d: 1/16 wide, the last one (d >= 255/16) takes the rest."""
    return tl.minimum(d * 16.0, 255.0).to(tl.int32)


@triton.jit
def _b_mass_hist(o, xin, wr, V, m, s, h, OF_D: tl.constexpr, TILE: tl.constexpr):
    """256-bin histogram over the tokens with p > 0: of bits(p) >> 22 (half-octaves of p, for
    top_p), or with OF_D of ``_d_bin(d)`` (typical_p's d in bins of 1/16)."""
    hist = tl.zeros([256], tl.int32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, xin, wr, start, V, TILE)
        p = _p_of(x, m, s)
        if OF_D:
            b = _d_bin(_d_of(x, m, s, h))
        else:
            b = p.to(tl.int32, bitcast=True) >> 22
        hist += tl.histogram(b, 256, mask=valid & (p > 0))
    return hist


@triton.jit
def _b_mass_beyond(o, xin, wr, V, m, s, h, mid, OF_D: tl.constexpr, TILE: tl.constexpr):
    """One step of the row bisections: the mass of the tokens with bits(p) > mid (top_p), or
    with OF_D of those with okey(d) < mid (typical_p)."""
    mass = tl.full([], 0.0, tl.float32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, xin, wr, start, V, TILE)
        p = _p_of(x, m, s)
        if OF_D:
            beyond = okey(_d_of(x, m, s, h)) < mid
        else:
            beyond = p.to(tl.int32, bitcast=True) > mid
        mass += tl.sum(tl.where(beyond, p, 0.0), 0)
    return mass


#: Thresholds top_p's row search tests per pass over a flat row (``_b_mass_above_many``).
TOP_P_PROBES = tl.constexpr(16)


@triton.jit
def _b_mass_above_many(o, xin, wr, V, m, s, mids, TILE: tl.constexpr, NQ: tl.constexpr):
    """top_p's row search, several steps in one pass: for each of the NQ thresholds
    ``mids`` [NQ], the mass of the tokens with bits(p) > mids[q] (each summed per tile, in
    the order of ``_b_mass_beyond``)."""
    q = tl.arange(0, NQ)
    mass = tl.zeros([NQ], tl.float32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, xin, wr, start, V, TILE)
        p = _p_of(x, m, s)
        key = p.to(tl.int32, bitcast=True)
        for i in range(NQ):  # not unrolled: 16 unrolled reductions spill the blocked chain
            mid = tl.sum(tl.where(q == i, mids, 0), 0)
            mass += tl.where(q == i, tl.sum(tl.where(key > mid, p, 0.0), 0), 0.0)
    return mass


@triton.jit
def _b_compact(o, xin, wr, V, m, s, h, scr, floor, dcap, WITH_D: tl.constexpr, KMAX: tl.constexpr,
               TILE: tl.constexpr):
    """Store p (and, WITH_D, d = |-log p - H| at ``scr + KMAX``) of the tokens with p > 0,
    bits(p) >= ``floor`` and ``_d_bin(d) < dcap`` contiguously at ``scr`` in token order
    (the caller checked there are at most KMAX of them); returns how many."""
    base = tl.full([], 0, tl.int32)
    for start in range(0, V, TILE):
        offs, valid, x = _ld(o, xin, wr, start, V, TILE)
        p = _p_of(x, m, s)
        alive = valid & (p > 0) & (p.to(tl.int32, bitcast=True) >= floor)
        if WITH_D:
            d = _d_of(x, m, s, h)
            alive = alive & (_d_bin(d) < dcap)
        pos = base + tl.cumsum(alive.to(tl.int32), 0) - 1
        tl.store(scr + pos, p, mask=alive)
        if WITH_D:
            tl.store(scr + KMAX + pos, d, mask=alive)
        base += tl.sum(alive.to(tl.int32), 0)
    tl.debug_barrier()
    return base


@triton.jit
def _b_top_p(o, xin, wr, tiles, NT, V, tp, en, sm, ss, sez, sn, st, am, scr, TILE: tl.constexpr,
             KMAX: tl.constexpr):
    en = en & (tp < 1.0)
    if en:
        m, s, h = _derive(sm, ss, sez, sn)
        # bisection over the bits of p (p >= 0: its bits are ordered) for the smallest tau
        # with mass(p > tau) < top_p; the top token's p is exp(0) / s, the row's largest
        lo = tl.full([], -1, tl.int32)
        hi = tl.where(sm > float("-inf"), (1.0 / s).to(tl.int32, bitcast=True), 0)
        floor = tl.full([], 0, tl.int32)
        if sn > KMAX:
            # Many tokens: a 256-bin histogram of bits(p) >> 22 (half-octaves of p) gives the
            # lowest bin edge with at most KMAX tokens at or above it; they are compacted.
            # If their exact mass reaches top_p, every token below the edge has at least
            # top_p of mass above it and is removed, so the search runs on them alone.
            bins = tl.arange(0, 256)
            hist = _b_mass_hist(o, xin, wr, V, m, s, h, False, TILE)
            count_above = tl.cumsum(hist, 0, reverse=True)
            floor = tl.min(tl.where(count_above <= KMAX, bins, 255), 0) << 22
        n = _b_compact(o, xin, wr, V, m, s, h, scr, floor, 256, False, KMAX, TILE)
        j = tl.arange(0, KMAX)
        pc = tl.load(scr + j, mask=j < n, other=0.0)
        if (floor == 0) | (tl.sum(pc, 0) >= tp):  # all tokens with p > 0, or enough mass
            lo = floor - 1
            lo, hi = bisect_mass_above(pc.to(tl.int32, bitcast=True), pc, lo, hi, tp)
        else:
            # a flat row: NQ thresholds evenly inside (lo, hi) per pass over the row, so ~8
            # passes instead of ~31 halvings; the predicate is monotone in the threshold (sums
            # of p >= 0 in a fixed order), so the bound found is the bisection's
            q = tl.arange(0, TOP_P_PROBES)
            while hi - lo > 1:
                span = (hi - lo).to(tl.int64)
                mids = (lo + span * (q + 1).to(tl.int64) // (TOP_P_PROBES + 1)).to(tl.int32)
                good = _b_mass_above_many(o, xin, wr, V, m, s, mids, TILE, TOP_P_PROBES) < tp
                hi = tl.minimum(hi, tl.min(tl.where(good, mids, hi), 0))
                lo = tl.maximum(lo, tl.max(tl.where(good, lo, mids), 0))
        wr, sm, ss, sez, sn, st, am = _apply_keep(o, xin, wr, tiles, NT, V, 3, hi, sm, m, s, h, TILE, KMAX)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_typical(o, xin, wr, tiles, NT, V, tp, en, sm, ss, sez, sn, st, am, scr, TILE: tl.constexpr,
               KMAX: tl.constexpr):
    en = en & (tp < 1.0)
    if en:
        m, s, h = _derive(sm, ss, sez, sn)
        # bisection for the largest tau with mass(okey(d) < tau) < typical_p, d >= 0 (or +inf);
        # tau = the least deviation key passes (mass 0 below it), so the row never empties
        lo = tl.full([], -1, tl.int32)
        hi = tl.full([], 0x7F800001, tl.int32)
        cap = tl.full([], 256, tl.int32)
        if sn > KMAX:
            # Many tokens: a histogram of d in bins of 1/16 gives the largest bin bound with at
            # most KMAX tokens below it; they are compacted. If their exact mass reaches
            # typical_p, every token above the bound has at least typical_p of mass below it
            # and is removed (the top token too: typical_p does not add it back), so the
            # search runs on them alone.
            bins = tl.arange(0, 256)
            hist = _b_mass_hist(o, xin, wr, V, m, s, h, True, TILE)
            below = tl.cumsum(hist, 0) - hist  # tokens in the bins before each bin
            cap = tl.max(tl.where(below <= KMAX, bins, 0), 0)
            cap = tl.where(tl.sum(hist, 0) <= KMAX, 256, cap)
        n = _b_compact(o, xin, wr, V, m, s, h, scr, 0, cap, True, KMAX, TILE)
        j = tl.arange(0, KMAX)
        pc = tl.load(scr + j, mask=j < n, other=0.0)
        if (cap == 256) | (tl.sum(pc, 0) >= tp):  # every token with p > 0, or enough mass
            keyc = okey(tl.load(scr + KMAX + j, mask=j < n, other=0.0))
            # (with a cap, the tokens above it have larger keys and are removed)
            hi = tl.where(cap == 256, hi, tl.max(tl.where(j < n, keyc, 0), 0) + 1)
            lo, hi = bisect_mass_below(keyc, pc, lo, hi, tp)
        else:
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                good = _b_mass_beyond(o, xin, wr, V, m, s, h, mid, True, TILE) < tp
                lo = tl.where(good, mid, lo)
                hi = tl.where(good, hi, mid)
        wr, sm, ss, sez, sn, st, am = _apply_keep(o, xin, wr, tiles, NT, V, 4, lo, sm, m, s, h, TILE, KMAX)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_prob_cut(o, xin, wr, tiles, NT, V, KIND: tl.constexpr, a, en, sm, ss, sez, sn, st, am,
                TILE: tl.constexpr, KMAX: tl.constexpr):
    """KIND 0 top_a (p >= a p_max^2), 1 min_p (p >= a p_max), 2 eta, 3 epsilon (p >= a)."""
    en = en & (a > 0)
    if en:
        m, s, h = _derive(sm, ss, sez, sn)
        pmax = tl.where(sm > float("-inf"), 1.0 / s, 0.0)
        if KIND == 0:
            thr = a * pmax * pmax
        elif KIND == 1:
            thr = a * pmax
        elif KIND == 2:
            thr = tl.minimum(a, tl.sqrt(tl.maximum(a, 0.0)) * tl.exp(-h))
        else:
            thr = a
        wr, sm, ss, sez, sn, st, am = _apply_keep(o, xin, wr, tiles, NT, V, 0, thr, sm, m, s, h, TILE, KMAX)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_nsigma(o, xin, wr, tiles, NT, V, nsig, en, sm, ss, sez, sn, st, am, TILE: tl.constexpr,
              KMAX: tl.constexpr):
    en = en & (nsig > 0)
    if en:
        # the two-pass sample std of the reference: the mean from the running sum, then
        # one pass for the squared deviations
        countf = sn.to(tl.float32)
        mean = st / tl.maximum(countf, 1.0)
        sq = tl.full([], 0.0, tl.float32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, xin, wr, start, V, TILE)
            finite = (x > float("-inf")) & (x < float("inf"))
            d = tl.where(finite, x - mean, 0.0)
            sq += tl.sum(d * d, 0)
        std = tl.sqrt(sq / tl.maximum(countf - 1.0, 1.0))
        std = tl.where(sn > 1, std, 0.0)
        wr, sm, ss, sez, sn, st, am = _apply_keep(o, xin, wr, tiles, NT, V, 1, sm - nsig * std, sm, sm, 1.0, 0.0,
                                                  TILE, KMAX)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_xtc(o, xin, wr, tiles, NT, V, threshold, probability, coin, en, sm, ss, sez, sn, st, am,
           TILE: tl.constexpr):
    en = en & (probability > 0) & (coin < probability)
    if en:
        m, s, h = _derive(sm, ss, sez, sn)
        size = tl.full([], 0, tl.int32)
        min_c = tl.full([], float("inf"), tl.float32)
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, xin, wr, start, V, TILE)
            p = _p_of(x, m, s)
            in_c = (p >= threshold) & (x > float("-inf")) & (x < float("inf")) & valid
            size += tl.sum(in_c.to(tl.int32), 0)
            min_c = tl.minimum(min_c, tl.min(tl.where(in_c, p, float("inf")), 0))
        if size >= 2:
            sm, ss, sez, sn, st, am = _fresh()
            for start in range(0, V, TILE):
                offs, valid, x = _ld(o, xin, wr, start, V, TILE)
                p = _p_of(x, m, s)
                in_c = (p >= threshold) & (x > float("-inf")) & (x < float("inf")) & valid
                sm, ss, sez, sn, st, am = _put(o, tiles, NT, offs, valid, start,
                                               tl.where(in_c & (p > min_c), float("-inf"), x),
                                               sm, ss, sez, sn, st, am, TILE)
            tl.debug_barrier()
            wr = wr | 1
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_dynatemp(o, xin, wr, tiles, NT, V, t_min, t_max, exponent, en, sm, ss, sez, sn, st, am,
                TILE: tl.constexpr):
    en = en & ((t_min != 0) | (t_max != 0))
    if en:
        m, s, h = _derive(sm, ss, sez, sn)
        wr, sm, ss, sez, sn, st, am = _scale(o, xin, wr, tiles, NT, V, dynatemp_of(h, sn, t_min, t_max, exponent),
                                             TILE)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_temperature(o, xin, wr, tiles, NT, V, t, en, sm, ss, sez, sn, st, am, TILE: tl.constexpr):
    en = en & (t != 1.0) & (t >= 1e-5)
    if en:
        wr, sm, ss, sez, sn, st, am = _scale(o, xin, wr, tiles, NT, V, t, TILE)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_smoothing(o, xin, wr, tiles, NT, V, f, c, en, sm, ss, sez, sn, st, am, TILE: tl.constexpr):
    en = en & (f != 0)
    if en:
        k = f * (3.0 - c) / 2.0
        sc = f * (c - 1.0) / 2.0
        m = sm
        sm, ss, sez, sn, st, am = _fresh()
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, xin, wr, start, V, TILE)
            finite = (x > float("-inf")) & (x < float("inf"))
            d = tl.where(finite, x - m, 0.0)
            dd = d * d
            smoothed = m - k * dd + sc * (dd * d)
            sm, ss, sez, sn, st, am = _put(o, tiles, NT, offs, valid, start, tl.where(finite, smoothed, x),
                                           sm, ss, sez, sn, st, am, TILE)
        tl.debug_barrier()
        wr = wr | 1
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _b_side(o, xin, wr, tiles, NT, V, CODE: tl.constexpr, side_ptr, cnt_ptr, r, f, pr, en,
            sm, ss, sez, sn, st, am, TILE: tl.constexpr):
    """Elementwise stages with a [V] side input: PENALTIES (seen, counts), NGRAM (ban mask)."""
    if en:
        sm, ss, sez, sn, st, am = _fresh()
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, xin, wr, start, V, TILE)
            if CODE == 1:
                seen = tl.load(side_ptr + offs, mask=valid, other=0) != 0
                cnt = tl.load(cnt_ptr + offs, mask=valid, other=0)
                y = stage_penalties(x, seen, cnt, r, f, pr, en)
            else:
                banned = tl.load(side_ptr + offs, mask=valid, other=0) != 0
                y = stage_ban(x, banned, en)
            sm, ss, sez, sn, st, am = _put(o, tiles, NT, offs, valid, start, y, sm, ss, sez, sn, st, am, TILE)
        tl.debug_barrier()
        wr = wr | 1
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _sparse(scr, KMAX: tl.constexpr):
    """The sparse mode's survivors: (count or -1 when not sparse, lane mask, values, token ids)."""
    n = tl.load(scr + 4 * KMAX).to(tl.int32)
    j = tl.arange(0, KMAX)
    lane = j < n
    xs = tl.load(scr + 2 * KMAX + j, mask=lane, other=float("-inf"))
    ids = tl.load(scr + 3 * KMAX + j, mask=lane, other=0.0).to(tl.int64)
    return n, lane, xs, ids


@triton.jit
def _bstage(CODE: tl.constexpr, SLOT: tl.constexpr, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr,
            seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am,
            TILE: tl.constexpr, KMAX: tl.constexpr):
    """Stage CODE on the row: in registers on the survivors when the row is sparse (a
    truncation left at most KMAX tokens: the whole-row stage dispatch ``stage.stage`` on them,
    side inputs gathered at their token ids), else tile by tile (``_bstage_tiles``)."""
    if CODE != 0:
        n, lane, xs, ids = _sparse(scr, KMAX)
        if n >= 0:
            xs = stage(CODE, SLOT, xs, lane, ids, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
                        key_ptr, scr, stride_s, stride_c, stride_b, KMAX)
            tl.store(scr + 2 * KMAX + tl.arange(0, KMAX), xs, mask=lane)
            tl.debug_barrier()
        else:
            wr, sm, ss, sez, sn, st, am = _bstage_tiles(CODE, SLOT, o, xin, wr, tiles, NT, row, B, V, prm_ptr,
                                                        rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr,
                                                        stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am,
                                                        TILE, KMAX)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _bstage_tiles(CODE: tl.constexpr, SLOT: tl.constexpr, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr,
                  seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am,
                  TILE: tl.constexpr, KMAX: tl.constexpr):
    if CODE != 0:
        en = tl.load(rmask_ptr + SLOT * B + row) != 0
        if CODE == 1:  # PENALTIES
            r, f, pr = prm(prm_ptr, 0, row, B), prm(prm_ptr, 1, row, B), prm(prm_ptr, 2, row, B)
            wr, sm, ss, sez, sn, st, am = _b_side(
                o, xin, wr, tiles, NT, V, 1, seen_ptr + row * stride_s, cnt_ptr + row * stride_c, r, f, pr,
                en & ((r != 1.0) | (f != 0.0) | (pr != 0.0)), sm, ss, sez, sn, st, am, TILE)
        elif CODE == 2:  # NGRAM
            wr, sm, ss, sez, sn, st, am = _b_side(o, xin, wr, tiles, NT, V, 2, ban_ptr + row * stride_b, cnt_ptr,
                                                  1.0, 0.0, 0.0, en, sm, ss, sez, sn, st, am, TILE)
        elif CODE == 3:
            wr, sm, ss, sez, sn, st, am = _b_temperature(o, xin, wr, tiles, NT, V, prm(prm_ptr, 3, row, B), en,
                                                         sm, ss, sez, sn, st, am, TILE)
        elif CODE == 4:  # dynatemp, then static temperature (the pipeline's temperature unit)
            wr, sm, ss, sez, sn, st, am = _b_dynatemp(o, xin, wr, tiles, NT, V, prm(prm_ptr, 4, row, B),
                                                      prm(prm_ptr, 5, row, B), prm(prm_ptr, 6, row, B), en,
                                                      sm, ss, sez, sn, st, am, TILE)
            wr, sm, ss, sez, sn, st, am = _b_temperature(o, xin, wr, tiles, NT, V, prm(prm_ptr, 3, row, B), en,
                                                         sm, ss, sez, sn, st, am, TILE)
        elif CODE == 5:
            wr, sm, ss, sez, sn, st, am = _b_nsigma(o, xin, wr, tiles, NT, V, prm(prm_ptr, 9, row, B), en,
                                                    sm, ss, sez, sn, st, am, TILE, KMAX)
        elif CODE == 6:
            wr, sm, ss, sez, sn, st, am = _b_top_k(o, xin, wr, tiles, NT, V, prm(prm_ptr, 10, row, B), en,
                                                   sm, ss, sez, sn, st, am, scr, tl.zeros([256], tl.int32), 0.0,
                                                   0, TILE, KMAX)
        elif CODE == 7:
            wr, sm, ss, sez, sn, st, am = _b_top_p(o, xin, wr, tiles, NT, V, prm(prm_ptr, 11, row, B), en,
                                                   sm, ss, sez, sn, st, am, scr, TILE, KMAX)
        elif CODE == 8:
            wr, sm, ss, sez, sn, st, am = _b_prob_cut(o, xin, wr, tiles, NT, V, 0, prm(prm_ptr, 12, row, B), en,
                                                      sm, ss, sez, sn, st, am, TILE, KMAX)
        elif CODE == 9:
            wr, sm, ss, sez, sn, st, am = _b_prob_cut(o, xin, wr, tiles, NT, V, 1, prm(prm_ptr, 13, row, B), en,
                                                      sm, ss, sez, sn, st, am, TILE, KMAX)
        elif CODE == 10:
            wr, sm, ss, sez, sn, st, am = _b_prob_cut(o, xin, wr, tiles, NT, V, 2, prm(prm_ptr, 14, row, B), en,
                                                      sm, ss, sez, sn, st, am, TILE, KMAX)
        elif CODE == 11:
            wr, sm, ss, sez, sn, st, am = _b_prob_cut(o, xin, wr, tiles, NT, V, 3, prm(prm_ptr, 15, row, B), en,
                                                      sm, ss, sez, sn, st, am, TILE, KMAX)
        elif CODE == 12:
            wr, sm, ss, sez, sn, st, am = _b_typical(o, xin, wr, tiles, NT, V, prm(prm_ptr, 16, row, B), en,
                                                     sm, ss, sez, sn, st, am, scr, TILE, KMAX)
        elif CODE == 13:
            wr, sm, ss, sez, sn, st, am = _b_smoothing(o, xin, wr, tiles, NT, V, prm(prm_ptr, 7, row, B),
                                                       prm(prm_ptr, 8, row, B), en, sm, ss, sez, sn, st, am, TILE)
        elif CODE == 14:
            wr, sm, ss, sez, sn, st, am = _b_xtc(o, xin, wr, tiles, NT, V, prm(prm_ptr, 17, row, B),
                                                 prm(prm_ptr, 18, row, B), prm(prm_ptr, 19, row, B), en,
                                                 sm, ss, sez, sn, st, am, TILE)
        elif CODE == 15:
            wr, sm, ss, sez, sn, st, am = _b_xtc(o, xin, wr, tiles, NT, V, prm(prm_ptr, 17, row, B),
                                                 prm(prm_ptr, 18, row, B), philox_uniform(key_ptr, row, B, 1), en,
                                                 sm, ss, sez, sn, st, am, TILE)
    return wr, sm, ss, sez, sn, st, am


@triton.jit
def _blocked_chain_kernel(x_ptr, out_ptr, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr_ptr,
                          greedy_ptr, tok_ptr, lp_ptr, B, V, NT, stride_x, stride_o, stride_s, stride_c, stride_b,
                          stride_scr,
                          S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                          S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
                          S8: tl.constexpr, S9: tl.constexpr, S10: tl.constexpr, S11: tl.constexpr,
                          S12: tl.constexpr, S13: tl.constexpr, S14: tl.constexpr, S15: tl.constexpr,
                          TILE: tl.constexpr, KMAX: tl.constexpr, DRAW: tl.constexpr, NTB: tl.constexpr,
                          STORE: tl.constexpr):
    """The stages S0..S15 on one row in tiles; with DRAW, then the draw (tokens to ``tok_ptr``,
    their log-probabilities to ``lp_ptr``, uniforms from the rows' Philox words ``key_ptr``).
    ``scr_ptr`` rows (``codes.blocked_scratch_stride``): [2 * KMAX] for the compacted searches,
    [2 * KMAX] the sparse mode's survivors (values, token ids), [SCRATCH_HEADER]: their count
    (-1: not sparse), whether the row outside them still has to be set to -inf, padding so
    that the [2, NT] tile statistics after it start 128-byte aligned.
    ``STORE`` False (only with DRAW): a row that ends sparse is not written (the caller
    wants the tokens only)."""
    row = tl.program_id(0).to(tl.int64)
    o = out_ptr + row * stride_o
    xin = x_ptr + row * stride_x
    scr = scr_ptr + row * stride_scr
    tiles = scr + 4 * KMAX + SCRATCH_HEADER
    tl.store(scr + 4 * KMAX, -1.0)  # not sparse (yet)
    tl.debug_barrier()  # (the scratch comes from torch.empty: no thread may read it first)
    # statistics of the input row: one read, nothing written yet
    sm, ss, sez, sn, st, am = _fresh()
    # A chain that starts with min_p (code 9) also collects its candidates in this pass:
    # x >= running max + log(min_p) (a superset of the survivors, the max only grows)
    pre_en = tl.full([], 0, tl.int1)
    log_a = tl.full([], 0.0, tl.float32)
    a = tl.full([], 0.0, tl.float32)
    if S0 == 9:
        a = tl.load(prm_ptr + 13 * B + row)
        pre_en = (tl.load(rmask_ptr + row) != 0) & (a > 0)
        log_a = tl.log(tl.maximum(a, 1e-30)) - 1e-3  # (a margin far above rounding)
    # A chain that starts with top_k takes its window histogram in this pass, below a
    # reference fixed by the first tile (its max + 16 / ... logits; tokens above it share
    # bin 0); used when the window it gives holds at most KMAX tokens.
    hist0 = tl.zeros([256], tl.int32)
    ref0 = tl.full([], 0.0, tl.float32)
    sps = scr + 2 * KMAX
    n_pre = tl.full([], 0, tl.int32)
    for start in range(0, V, TILE):
        offs = start + tl.arange(0, TILE)
        x = tl.load(xin + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        sm, ss, sez, sn, st, tm, ts = online_softmax(sm, ss, sez, sn, st, x)
        if S0 == 6:
            ref0 = tl.where(start == 0, tl.where(tm > float("-inf"), tm, 0.0) + 255.0 / (2 * WINDOW_SCALE), ref0)
            hist0 += tl.histogram(_window_bin(x, ref0), 256, mask=(offs < V) & (x > float("-inf")) & (x < float("inf")))
        if S0 == 9:
            cand = pre_en & (x > float("-inf")) & (x >= sm + log_a)
            pos = n_pre + tl.cumsum(cand.to(tl.int32), 0) - 1
            tl.store(sps + pos, x, mask=lane_mask(cand & (pos < KMAX)))
            tl.store(sps + KMAX + pos, offs.to(tl.float32), mask=lane_mask(cand & (pos < KMAX)))
            n_pre += tl.sum(cand.to(tl.int32), 0)
    wr = tl.full([], 0, tl.int32)
    pre = pre_en & (n_pre <= KMAX)
    if pre:
        # min_p on the candidates, with the row's statistics and the formula of the tile
        # stage (p = exp(x - m) / s >= min_p * p_max, top token kept); the row is sparse
        # from here, nothing of it written yet
        tl.debug_barrier()
        j = tl.arange(0, KMAX)
        lane = j < n_pre
        xs = tl.load(sps + j, mask=lane, other=float("-inf"))
        m, s, h = _derive(sm, ss, sez, sn)
        pmax = tl.where(sm > float("-inf"), 1.0 / s, 0.0)
        keep = (_p_of(xs, m, s) >= a * pmax) | ((xs == sm) & (xs > float("-inf")))
        tl.store(sps + j, tl.where(keep, xs, float("-inf")), mask=lane)
        tl.store(sps + 2 * KMAX, n_pre.to(tl.float32))
        tl.store(sps + 2 * KMAX + 1, 1.0)  # nothing of the row written: fill it at the end
        tl.debug_barrier()
    elif S0 == 6:
        k0 = tl.load(prm_ptr + 10 * B + row)
        upto0 = tl.cumsum(hist0, 0)
        fits = tl.min(tl.where(upto0 >= k0.to(tl.int32), upto0, 2147483647), 0) <= KMAX
        wr, sm, ss, sez, sn, st, am = _b_top_k(o, xin, wr, tiles, NT, V, k0, tl.load(rmask_ptr + row) != 0,
                                               sm, ss, sez, sn, st, am, scr, hist0, ref0, fits.to(tl.int32),
                                               TILE, KMAX)
    else:
        wr, sm, ss, sez, sn, st, am = _bstage(S0, 0, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S1, 1, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S2, 2, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S3, 3, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S4, 4, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S5, 5, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S6, 6, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S7, 7, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S8, 8, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S9, 9, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S10, 10, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S11, 11, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S12, 12, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S13, 13, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S14, 14, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    wr, sm, ss, sez, sn, st, am = _bstage(S15, 15, o, xin, wr, tiles, NT, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr, stride_s, stride_c, stride_b, sm, ss, sez, sn, st, am, TILE, KMAX)
    n, lane, xs, ids = _sparse(scr, KMAX)
    if n >= 0:
        if STORE:
            # sparse: write the survivors' final values; the rest of the row is -inf already
            # when a keep pass wrote it, else (entered without one) it is set now
            if tl.load(scr + 4 * KMAX + 1) != 0:
                for start in range(0, V, TILE):
                    offs = start + tl.arange(0, TILE)
                    tl.store(o + offs, tl.full([TILE], float("-inf"), tl.float32), mask=offs < V)
                tl.debug_barrier()
            tl.store(o + ids, xs, mask=lane)
    elif wr == 0:  # no stage changed this row: the output is the fp32 input
        sm, ss, sez, sn, st, am = _fresh()
        for start in range(0, V, TILE):
            offs, valid, x = _ld(o, xin, wr, start, V, TILE)
            sm, ss, sez, sn, st, am = _put(o, tiles, NT, offs, valid, start, x, sm, ss, sez, sn, st, am, TILE)
        tl.debug_barrier()
    if DRAW:
        greedy = tl.load(greedy_ptr + row) != 0
        u = philox_uniform(key_ptr, row, B, 0)
        # The separate draw's rule (``draw._blocked_draw_kernel``), which sees the stored row
        # only: a row with at most KMAX entries above -inf is drawn from them, listed in token
        # order (the searches' scratch is free now), else from the tiles.
        tl.debug_barrier()
        if n >= 0:
            nf = append_kept(scr, xs, ids, 0, KMAX)
        else:
            nf = tl.full([], KMAX + 1, tl.int32)
            if sn <= KMAX:  # a dense row with few finite entries (bans, a grammar's mask)
                nf = list_kept(scr, o, 0, V, V, tl.full([], 0, tl.int32), KMAX)
        tl.debug_barrier()
        if nf <= KMAX:
            tok, lp = draw_listed(scr, nf, V, greedy, u, KMAX)
        else:
            tok, lp = pick_from_tiles(o, tiles, NT, V, sm, ss, am, greedy, u, TILE, NTB)
        tl.store(tok_ptr + row, tok)
        tl.store(lp_ptr + row, lp)
