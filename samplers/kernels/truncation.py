"""Truncation samplers as in-kernel stages (threshold form, no vocabulary sort).

Each ``stage_*`` is a ``@triton.jit`` function on one row held in registers: ``x`` is the
row in fp32 ([BLOCK], removed tokens and padding lanes -inf), ``valid`` marks the real lanes,
``en`` says whether the stage applies to this row (its row mask). They are composed by the
chain kernels (``stage.stage``); ``ops`` runs one stage alone, mirroring
``samplers.functional.truncation`` function by function.

Every rule is a threshold on the row, found without sorting:

- top_k: the k-th largest logit, found by a radix select over the order-preserving 32-bit
  keys of the logits: 4 passes of a 256-bin ``tl.histogram`` (no sort, no bisection).
- top_p: keep p(t) iff mass(p > p(t)) < top_p: bisection for the smallest probability key
  tau with mass(key > tau) < top_p; keep key >= tau (ties at the boundary all kept).
- typical_p: keep t iff mass(d < d(t)) < typical_p, d = |-log p - H|: bisection for the
  largest deviation key tau with mass(key < tau) < typical_p; keep key <= tau (the top token
  is not added back: it goes when its deviation is large, as in HF and llama.cpp).
- min_p, top_a, eta, epsilon: a probability threshold from the row's max / entropy.
- nsigma: a logit threshold max - n * std (std over finite logits, divisor N - 1).
- XTC: C = {p >= threshold}; when |C| >= 2 every member above min_C p is removed.

tfs is defined on the sorted second differences of p; it has no exact threshold form here,
so ``ops.tfs`` calls the torch reference on the (GPU) tensor. See kernels/README.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import entropy_of, finite_std, lane_mask, okey, softmax_stats, top_mask

_I32_MAX = 2147483647
_I32_MIN = -2147483648


@triton.jit
def _keep_only(x, keep, en):
    """Apply a keep mask on enabled rows (nothing added to it)."""
    out = tl.where(keep, x, float("-inf"))
    return tl.where(en, out, x)


@triton.jit
def _finish(x, keep, m_raw, en):
    """Apply a keep mask (the top token(s) always kept) on enabled rows: the threshold samplers."""
    return _keep_only(x, keep | top_mask(x, m_raw), en)


@triton.jit
def radix_select(ukey, valid, need):
    """The ``need``-th largest of the uint32 keys ``ukey`` over the ``valid`` lanes: 4 passes,
    each a 256-bin ``tl.histogram`` of the next 8-bit digit of the keys that share the prefix
    found so far, picking the digit that holds the need-th largest. (0 when fewer than
    ``need`` lanes are valid.) Shared by the whole-row and the column-blocked top_k."""
    prefix = tl.full([], 0, tl.uint32)
    bins = tl.arange(0, 256)
    for p in tl.static_range(4):
        digit = ((ukey >> (24 - 8 * p)) & 255).to(tl.int32)
        if p == 0:
            match = valid
        else:
            match = valid & ((ukey >> (32 - 8 * p)) == prefix)
        hist = tl.histogram(digit, 256, mask=match)
        from_top = tl.cumsum(hist, 0, reverse=True)  # count of matching digits >= d
        d = tl.max(tl.where(from_top >= need, bins, 0), 0)
        above = tl.sum(tl.where(bins > d, hist, 0), 0)
        need = need - above
        prefix = prefix * 256 + d.to(tl.uint32)
    return prefix


@triton.jit
def bisect_mass_above(key, p, lo, hi, tp):
    """top_p's search: narrow (lo, hi] to the smallest ``hi`` with mass(key > hi) < tp, given
    that ``lo`` fails and ``hi`` passes (``key``: int32 bits of p, ``p`` the masses; lanes
    that hold no token carry p = 0). Returns (lo, hi) with hi - lo <= 1."""
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        good = tl.sum(tl.where(key > mid, p, 0.0), 0) < tp
        hi = tl.where(good, mid, hi)
        lo = tl.where(good, lo, mid)
    return lo, hi


@triton.jit
def bisect_mass_below(key, p, lo, hi, tp):
    """typical_p's search: narrow [lo, hi) to the largest ``lo`` with mass(key < lo) < tp,
    given that ``lo`` passes and ``hi`` fails (``key``: okey of d). Returns (lo, hi)."""
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        good = tl.sum(tl.where(key < mid, p, 0.0), 0) < tp
        lo = tl.where(good, mid, lo)
        hi = tl.where(good, hi, mid)
    return lo, hi


@triton.jit
def stage_top_k(x, valid, k, vocab, en):
    """``F.top_k``: keep l >= the k-th largest logit (k <= 0 or k >= V: row disabled).

    Radix select over the 32-bit order-preserving key (unsigned form, 4 digits of 8 bits):
    each pass histograms the next digit of the keys that share the prefix found so far
    (``tl.histogram``) and picks the digit holding the k-th largest. After 4 passes the
    prefix is exactly the k-th largest key; ties at the boundary are all kept.
    """
    en = en & (k > 0) & (k < vocab)
    # unsigned form of the key: flip the sign bit (same order, compared as uint32)
    ukey = okey(x).to(tl.uint32, bitcast=True) ^ 0x80000000
    prefix = radix_select(ukey, valid, tl.where(en, k, 1.0).to(tl.int32))
    keep = ukey >= prefix
    return _finish(x, keep, tl.max(x, 0), en)


@triton.jit
def _compact(values, alive, scr_ptr, KMAX: tl.constexpr):
    """Store ``values`` of the ``alive`` lanes contiguously at ``scr_ptr`` (at most KMAX of
    them, in token order) and load them back as a [KMAX] tensor (0 past the end)."""
    n = tl.sum(alive.to(tl.int32), 0)
    pos = tl.cumsum(alive.to(tl.int32), 0) - 1
    tl.store(scr_ptr + pos, values, mask=lane_mask(alive & (n <= KMAX)))
    tl.debug_barrier()
    j = tl.arange(0, KMAX)
    return tl.load(scr_ptr + j, mask=lane_mask((j < n) & (n <= KMAX)), other=0.0)


@triton.jit
def stage_top_p(x, valid, tp, en, scr_ptr, KMAX: tl.constexpr):
    """``F.top_p``: keep t iff mass(p > p(t)) < top_p (top_p >= 1: row disabled).

    Bisection over the bits of p. When at most KMAX tokens have p > 0 (an earlier top_k or
    other truncation left few survivors), their probabilities are first compacted into a
    [KMAX] scratch row, so the ~31 iterations reduce over KMAX values instead of the row.
    """
    en = en & (tp < 1.0)
    m_raw, p, logp = softmax_stats(x)
    key = p.to(tl.int32, bitcast=True)  # p >= 0: the raw bits are order-preserving
    # int32 bounds: keys are bits of p >= 0, so lo >= -1 and hi - lo never overflows
    lo = tl.min(tl.where(valid, key, 2147483647), 0) - 1
    hi = tl.max(tl.where(valid, key, 0), 0)
    lo = tl.where(en, lo, hi - 1)
    alive = valid & (p > 0) & en
    small = tl.sum(alive.to(tl.int32), 0) <= KMAX
    pc = _compact(p, alive, scr_ptr, KMAX)
    keyc = pc.to(tl.int32, bitcast=True)
    # mass(key > hi) < tp always (hi = max key gives 0); find the smallest such hi, on the
    # compacted values when there are few (then the row search has nothing left to do)
    if small:
        lo, hi = bisect_mass_above(keyc, pc, lo, hi, tp)
    lo, hi = bisect_mass_above(key, p, lo, hi, tp)
    keep = key >= hi
    return _finish(x, keep, m_raw, en)


@triton.jit
def stage_top_a(x, a, en):
    """``F.top_a``: keep p >= a * p_max ** 2 (a = 0: row disabled)."""
    en = en & (a > 0)
    m_raw, p, logp = softmax_stats(x)
    p_max = tl.max(p, 0)
    keep = p >= a * p_max * p_max
    return _finish(x, keep, m_raw, en)


@triton.jit
def stage_min_p(x, mp, en):
    """``F.min_p``: keep p >= min_p * p_max (min_p = 0: row disabled)."""
    en = en & (mp > 0)
    m_raw, p, logp = softmax_stats(x)
    keep = p >= mp * tl.max(p, 0)
    return _finish(x, keep, m_raw, en)


@triton.jit
def stage_eta(x, eta, en):
    """``F.eta_cutoff``: keep p >= min(eta, sqrt(eta) * exp(-H)) (eta = 0: disabled)."""
    en = en & (eta > 0)
    m_raw, p, logp = softmax_stats(x)
    h = entropy_of(p, logp)
    eps = tl.minimum(eta, tl.sqrt(tl.maximum(eta, 0.0)) * tl.exp(-h))
    keep = p >= eps
    return _finish(x, keep, m_raw, en)


@triton.jit
def stage_epsilon(x, eps, en):
    """``F.epsilon_cutoff``: keep p >= epsilon (0: disabled)."""
    en = en & (eps > 0)
    m_raw, p, logp = softmax_stats(x)
    keep = p >= eps
    return _finish(x, keep, m_raw, en)


@triton.jit
def stage_typical(x, valid, tp, en, scr_ptr, KMAX: tl.constexpr):
    """``F.typical_p``: keep t iff mass(d < d(t)) < typical_p, d = |-log p - H| (the top
    token only when the rule keeps it).

    Bisection over the bits of d (>= 0); with at most KMAX tokens of p > 0 the (p, d) pairs
    are compacted first (see ``stage_top_p``). ``lo`` starts at the row's least deviation
    key and only grows, so the least-deviation token(s) are always kept: a row with a finite
    token never empties."""
    en = en & (tp < 1.0)
    _, p, logp = softmax_stats(x)
    h = entropy_of(p, logp)
    d = tl.abs(-logp - h)  # +inf for removed tokens and padding
    key = okey(d)
    # int32 bounds: d >= 0 (or +inf), so keys are in [0, 0x7F800000] and hi - lo never overflows
    lo = tl.min(tl.where(valid, key, 2147483647), 0)
    hi = tl.max(tl.where(valid, key, 0), 0) + 1
    hi = tl.where(en, hi, lo + 1)
    alive = valid & (p > 0) & en
    small = tl.sum(alive.to(tl.int32), 0) <= KMAX
    pc = _compact(p, alive, scr_ptr, KMAX)
    dc = _compact(d, alive, scr_ptr + KMAX, KMAX)
    keyc = okey(dc)
    # mass(key < lo) < tp always (lo = min key gives 0); find the largest such lo
    if small:
        lo, hi = bisect_mass_below(keyc, pc, lo, hi, tp)
    lo, hi = bisect_mass_below(key, p, lo, hi, tp)
    keep = key <= lo
    return _keep_only(x, keep, en)


@triton.jit
def stage_nsigma(x, n, en):
    """``F.nsigma``: keep l >= max - n * std (std over finite logits, N - 1; n = 0: disabled)."""
    en = en & (n > 0)
    count, std = finite_std(x)
    m_raw = tl.max(x, 0)
    keep = x >= m_raw - n * std
    return _finish(x, keep, m_raw, en)


@triton.jit
def stage_xtc(x, valid, threshold, probability, coin, en):
    """``F.xtc``: on rows whose coin < probability, remove every member of
    C = {finite t : p(t) >= threshold} above min_C p when |C| >= 2."""
    en = en & (probability > 0) & (coin < probability)
    m_raw, p, logp = softmax_stats(x)
    in_c = (p >= threshold) & (x > float("-inf")) & (x < float("inf")) & valid
    size = tl.sum(in_c.to(tl.int32), 0)
    min_c = tl.min(tl.where(in_c, p, float("inf")), 0)
    remove = in_c & (p > min_c) & (size >= 2)
    out = tl.where(remove, float("-inf"), x)
    return tl.where(en, out, x)
