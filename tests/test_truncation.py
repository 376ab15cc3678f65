"""Tests for samplers/functional/truncation.py (the reference torch path).

1. hand-computed values on tiny rows (arithmetic written out);
2. agreement with an independent float64 numpy re-implementation written here, on random
   rows with heterogeneous parameters, -inf entries and ties (tokens whose decision is within
   rounding of the threshold are reported "ambiguous" by the reference and not compared);
3. hypothesis properties: disabled -> bit-identical, batch independence, top token kept
   (the threshold samplers; typical_p need not keep it), never all removed, monotonicity;
   typical_p's kept set equals a plain numpy sort of the definition on rows with ties;
4. fp16 / bf16 inputs keep their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from samplers.functional.truncation import (
    epsilon_cutoff,
    eta_cutoff,
    min_p,
    nsigma,
    tfs,
    top_a,
    top_k,
    top_p,
    typical_p,
    xtc,
)

from functools import partial

from logit_helpers import bits
from logit_helpers import make_logits as _make_logits

make_logits = partial(_make_logits, ties_at_max=True)

NEG_INF = float("-inf")
HYP = settings(max_examples=40, deadline=None, derandomize=True)


# --------------------------------------------------------------------------- helpers


def logits_of(probs: list[float]) -> torch.Tensor:
    """A [1, V] row whose softmax is `probs` (probabilities summing to 1; 0 -> -inf)."""
    return torch.tensor([[math.log(q) if q > 0 else NEG_INF for q in probs]], dtype=torch.float32)


def kept(out: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(r)).flatten().tolist() for r in out]


def f32(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------- numpy reference
# Each returns (keep, ambiguous) boolean arrays for one row of float64 logits.

REL = 1e-4     # relative tolerance on probability thresholds (fp32 softmax vs float64)
MASS = 1e-4    # absolute tolerance on cumulative masses


def np_softmax(row: np.ndarray) -> np.ndarray:
    fin = np.isfinite(row)
    p = np.zeros_like(row)
    if fin.any():
        e = np.exp(row[fin] - row[fin].max())
        p[fin] = e / e.sum()
    return p


def np_top(row: np.ndarray) -> np.ndarray:
    fin = np.isfinite(row)
    return fin & (row == row[fin].max()) if fin.any() else np.zeros(row.shape, bool)


def threshold_decision(value: np.ndarray, thr: float, rel: float = REL):
    """keep iff value >= thr; ambiguous when within rel of thr."""
    keep = value >= thr
    amb = np.abs(value - thr) <= rel * max(abs(thr), 1e-30)
    return keep, amb


def mass_decision(lo: np.ndarray, hi: np.ndarray, limit: float):
    """keep iff mass < limit, where the mass is known to lie in [lo, hi] up to rounding."""
    keep_sure = hi < limit - MASS
    remove_sure = lo >= limit + MASS
    return keep_sure, ~(keep_sure | remove_sure)


def ref_top_k(row, k):
    v = len(row)
    if k <= 0 or k >= v:
        return np.ones(v, bool), np.zeros(v, bool)
    kth = sorted(row.tolist(), reverse=True)[k - 1]
    return row >= kth, np.zeros(v, bool)


def ref_top_p(row, tp):
    p = np_softmax(row)
    if tp >= 1.0:
        return np.ones(len(row), bool), np.zeros(len(row), bool)
    # mass of tokens with probability strictly greater than p(t), with a band for near-ties
    lo = np.array([p[p > q * (1 + 1e-5)].sum() for q in p])
    hi = np.array([p[p > q * (1 - 1e-5)].sum() for q in p])
    keep, amb = mass_decision(lo, hi, tp)
    top = np_top(row)
    return keep | top, amb & ~top


def ref_min_p(row, mp):
    p = np_softmax(row)
    if mp <= 0:
        return np.ones(len(row), bool), np.zeros(len(row), bool)
    keep, amb = threshold_decision(p, mp * p.max())
    top = np_top(row)
    return keep | top, amb & ~top


def ref_top_a(row, a):
    p = np_softmax(row)
    if a <= 0:
        return np.ones(len(row), bool), np.zeros(len(row), bool)
    keep, amb = threshold_decision(p, a * p.max() ** 2)
    top = np_top(row)
    return keep | top, amb & ~top


def ref_epsilon(row, eps):
    p = np_softmax(row)
    if eps <= 0:
        return np.ones(len(row), bool), np.zeros(len(row), bool)
    keep, amb = threshold_decision(p, eps)
    top = np_top(row)
    return keep | top, amb & ~top


def np_entropy(p):
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def ref_eta(row, eta):
    p = np_softmax(row)
    if eta <= 0:
        return np.ones(len(row), bool), np.zeros(len(row), bool)
    eps = min(eta, math.sqrt(eta) * math.exp(-np_entropy(p)))
    keep, amb = threshold_decision(p, eps)
    top = np_top(row)
    return keep | top, amb & ~top


def ref_tfs(row, z):
    v = len(row)
    p = np_softmax(row)
    if z >= 1.0 or v < 3:
        return np.ones(v, bool), np.zeros(v, bool)
    ps = np.sort(p)[::-1]
    d2 = np.abs(np.diff(np.diff(ps)))
    if d2.sum() == 0:
        return np.ones(v, bool), np.zeros(v, bool)
    c = np.cumsum(d2 / d2.sum())

    def n_kept(limit):
        n = 1
        for k in range(1, v):
            if c[min(k, v - 2) - 1] <= limit:
                n += 1
            else:
                break
        return n

    thr_hi = ps[n_kept(z - 1e-3) - 1]   # fewest positions kept under rounding
    thr_lo = ps[n_kept(z + 1e-3) - 1]   # most positions kept under rounding
    keep = p >= ps[n_kept(z) - 1]
    sure_keep = p >= thr_hi * (1 + 1e-5)
    sure_remove = p < thr_lo * (1 - 1e-5)
    amb = ~(sure_keep | sure_remove)
    top = np_top(row)
    return keep | top, amb & ~top & (p > 0)


def ref_typical(row, tp):
    v = len(row)
    p = np_softmax(row)
    if tp >= 1.0:
        return np.ones(v, bool), np.zeros(v, bool)
    h = np_entropy(p)
    with np.errstate(divide="ignore"):
        dev = np.where(p > 0, np.abs(-np.log(p) - h), np.inf)
    lo = np.array([p[dev < d - 1e-4].sum() for d in dev])
    # near-ties in d may round either way, but a token never precedes one of equal logit
    # (their d are computed by the same operations: equal in every precision)
    hi = np.array([p[(dev < d + 1e-4) & (row != l)].sum() for d, l in zip(dev, row)])
    keep, amb = mass_decision(lo, hi, tp)
    # no top token added back: typical_p removes it when its deviation is large
    return keep & (p > 0), amb & (p > 0)


def ref_nsigma(row, n):
    v = len(row)
    if n <= 0:
        return np.ones(v, bool), np.zeros(v, bool)
    fin = row[np.isfinite(row)]
    std = float(np.std(fin, ddof=1)) if len(fin) > 1 else 0.0
    thr = fin.max() - n * std
    keep = row >= thr
    amb = np.abs(row - thr) <= 1e-4 * (1 + abs(thr))
    top = np_top(row)
    return keep | top, amb & ~top


def ref_xtc(row, threshold, probability, coin):
    v = len(row)
    none = np.zeros(v, bool)
    if not (probability > 0 and coin < probability):
        return np.ones(v, bool), none
    p = np_softmax(row)
    fin = np.isfinite(row)
    if np.any(fin & (np.abs(p - threshold) <= REL * max(threshold, 1e-30))):
        return np.ones(v, bool), np.ones(v, bool)  # membership of C uncertain: skip the row
    members = [t for t in range(v) if fin[t] and p[t] >= threshold]
    keep = np.ones(v, bool)
    amb = none.copy()
    if len(members) >= 2:
        low = min(row[t] for t in members)  # least likely member, by logit (exact ties)
        for t in members:
            if row[t] > low:
                keep[t] = False
                amb[t] = p[t] <= p[members].min() * (1 + 1e-5)  # near-tie with the minimum
    return keep, amb


# --------------------------------------------------------------------- sampler table


@dataclass
class Spec:
    fn: Callable
    ref: Callable
    dtype: torch.dtype
    disabled: list
    enabled: st.SearchStrategy
    larger_keeps_more: bool
    keeps_top: bool = True  # the threshold samplers; typical_p may remove the top token


def _fl(lo, hi):
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)


SPECS: dict[str, Spec] = {
    "top_k": Spec(top_k, ref_top_k, torch.int64, [0, -1], st.integers(1, 80), True),
    "top_p": Spec(top_p, ref_top_p, torch.float32, [1.0], _fl(0.01, 0.999), True),
    "min_p": Spec(min_p, ref_min_p, torch.float32, [0.0], _fl(0.001, 1.0), False),
    "top_a": Spec(top_a, ref_top_a, torch.float32, [0.0], _fl(0.001, 5.0), False),
    "tfs": Spec(tfs, ref_tfs, torch.float32, [1.0], _fl(0.01, 0.999), True),
    "eta_cutoff": Spec(eta_cutoff, ref_eta, torch.float32, [0.0], _fl(1e-4, 0.99), False),
    "epsilon_cutoff": Spec(epsilon_cutoff, ref_epsilon, torch.float32, [0.0], _fl(1e-4, 0.99), False),
    "typical_p": Spec(typical_p, ref_typical, torch.float32, [1.0], _fl(0.01, 0.999), True, keeps_top=False),
    "nsigma": Spec(nsigma, ref_nsigma, torch.float32, [0.0], _fl(0.01, 5.0), True),
}


# ------------------------------------------------------------- 1. hand-computed values

P4 = [0.5, 0.3, 0.15, 0.05]


def test_top_k_hand():
    # logits [3, 1, 2, 2, 0]: sorted 3, 2, 2, 1, 0.
    l = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]] * 5)
    out = top_k(l, torch.tensor([1, 2, 3, 0, 9]))
    # k=1: kth = 3 -> {0}; k=2: kth = 2 -> {0, 2, 3}; k=3: kth = 2 -> {0, 2, 3} (tie kept);
    # k=0: off; k=9 >= V: everything.
    assert kept(out) == [[0], [0, 2, 3], [0, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert torch.equal(out[1, [0, 2, 3]], l[1, [0, 2, 3]])


def test_top_k_with_neg_inf():
    # the 3rd largest of [5, -inf, 4, -inf] is -inf: everything finite is kept
    l = torch.tensor([[5.0, NEG_INF, 4.0, NEG_INF]])
    assert kept(top_k(l, torch.tensor([3]))) == [[0, 2]]
    assert kept(top_k(l, torch.tensor([1]))) == [[0]]


def test_top_p_hand():
    l = logits_of(P4).repeat(3, 1)
    out = top_p(l, f32(0.75, 0.85, 0.4))
    # mass strictly above each token: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95
    # top_p=0.75: 0 < .75, .5 < .75, .8 >= .75 -> {0, 1}
    # top_p=0.85: .8 < .85 -> {0, 1, 2};   top_p=0.4: .5 >= .4 -> {0}
    assert kept(out) == [[0, 1], [0, 1, 2], [0]]


def test_top_p_ties():
    l = logits_of([0.3, 0.4, 0.3]).repeat(2, 1)
    out = top_p(l, f32(0.5, 0.35))
    # mass strictly above a 0.3 token = 0.4: 0.4 < 0.5 keeps BOTH tied tokens; 0.4 >= 0.35 keeps none
    assert kept(out) == [[0, 1, 2], [1]]


def test_min_p_hand():
    l = logits_of(P4).repeat(3, 1)
    out = min_p(l, f32(0.2, 0.5, 1.0))
    # threshold = min_p * p_max: 0.2*0.5 = 0.1 -> {.5,.3,.15}; 0.5*0.5 = 0.25 -> {.5,.3};
    # 1.0*0.5 = 0.5 -> {.5}
    assert kept(out) == [[0, 1, 2], [0, 1], [0]]


def test_top_a_hand():
    l = logits_of(P4).repeat(3, 1)
    out = top_a(l, f32(0.5, 1.0, 3.0))
    # threshold = a * p_max^2 = a * 0.25: 0.125 -> {.5,.3,.15}; 0.25 -> {.5,.3};
    # 0.75 > p_max -> only the top token survives
    assert kept(out) == [[0, 1, 2], [0, 1], [0]]


def test_tfs_hand():
    l = logits_of([0.4, 0.3, 0.15, 0.1, 0.05]).repeat(4, 1)
    out = tfs(l, f32(0.5, 0.2, 0.99, 1.0))
    # p sorted = .4 .3 .15 .1 .05; diff = -.1 -.15 -.05 -.05; second diff = -.05 .1 0
    # |d2| = .05 .1 0, sum .15 -> normalised 1/3 2/3 0 -> c = 1/3, 1, 1
    # position 1 uses c[0] = 1/3, positions 2, 3 use c[1], c[2] = 1, position 4 uses c[2] = 1.
    # z=0.5 -> {0, 1}; z=0.2 -> {0}; z=0.99 -> {0, 1}; z=1.0 disabled -> all
    assert kept(out) == [[0, 1], [0], [0, 1], [0, 1, 2, 3, 4]]


def test_tfs_flat_and_linear_keep_all():
    flat = torch.zeros(1, 6)
    lin = logits_of([0.4, 0.3, 0.2, 0.1])  # diffs all -0.1: d2 = 0 (up to rounding: tiny)
    assert kept(tfs(flat, f32(0.1))) == [list(range(6))]
    assert kept(tfs(torch.zeros(1, 2), f32(0.1))) == [[0, 1]]  # V < 3
    assert 0 in kept(tfs(lin, f32(0.1)))[0]


def test_tfs_tie_at_boundary():
    # p = .4 .2 .2 .1 .1: diffs -.2 0 -.1 0; d2 = .2 .1 .1 -> /.4 = .5 .25 .25; c = .5 .75 1
    # position 1 kept iff .5 <= z; position 2 iff .75 <= z. z = 0.6 keeps positions 0, 1; the
    # token at position 2 ties with position 1 (both 0.2), so it is kept too.
    l = logits_of([0.2, 0.1, 0.4, 0.1, 0.2])
    assert kept(tfs(l, f32(0.6))) == [[0, 2, 4]]


def test_eta_hand():
    l = logits_of(P4).repeat(4, 1)
    h = -sum(q * math.log(q) for q in P4)  # 0.34657 + 0.36119 + 0.28457 + 0.14979 = 1.14212
    assert h == pytest.approx(1.14212, abs=1e-5)
    # eps = min(eta, sqrt(eta) * exp(-H)); exp(-H) = 0.31914
    # eta=.09: min(.09, .3*.31914=.0957) = .09 -> keep p >= .09: {.5,.3,.15}
    # eta=.2: min(.2, .44721*.31914=.14273) -> {.5,.3,.15};  eta=.3: .54772*.31914=.17480 -> {.5,.3}
    # eta=.9: .94868*.31914=.30277 -> {.5} (.3 < .30277)
    assert math.sqrt(0.9) * math.exp(-h) == pytest.approx(0.30277, abs=1e-5)
    out = eta_cutoff(l, f32(0.09, 0.2, 0.3, 0.9))
    assert kept(out) == [[0, 1, 2], [0, 1, 2], [0, 1], [0]]


def test_epsilon_hand():
    l = logits_of(P4).repeat(3, 1)
    out = epsilon_cutoff(l, f32(0.1, 0.2, 0.6))
    # keep p >= eps: .1 -> {.5,.3,.15}; .2 -> {.5,.3}; .6 -> nothing but the top token is kept
    assert kept(out) == [[0, 1, 2], [0, 1], [0]]


def test_typical_hand():
    l = logits_of(P4).repeat(3, 1)
    h = -sum(q * math.log(q) for q in P4)  # 1.14212
    dev = [abs(-math.log(q) - h) for q in P4]
    # |0.69315-1.14212| = .44897, |1.20397-1.14212| = .06185, |1.89712-1.14212| = .75500,
    # |2.99573-1.14212| = 1.85361: order by deviation: token 1, 0, 2, 3
    assert sorted(range(4), key=lambda t: dev[t]) == [1, 0, 2, 3]
    out = typical_p(l, f32(0.2, 0.75, 0.9))
    # typical_p=.2: mass before token1 = 0 < .2 keep; token0 (the top token): .3 >= .2 -> removed
    #   (not added back) -> {1}
    # typical_p=.75: token0: .3 < .75 keep; token2: mass before = .3+.5 = .8 >= .75 -> {0, 1}
    # typical_p=.9: token2: .8 < .9 keep; token3: .95 >= .9 -> {0, 1, 2}
    assert kept(out) == [[1], [0, 1], [0, 1, 2]]


# The published expectations of the two reference implementations, as numbers:
# Hugging Face transformers tests/generation/test_logits_process.py::test_typical_dist_warper
# (TypicalLogitsWarper(0.5)) and llama.cpp tests/test-sampling.cpp::test_typical
# (llama_sampler_init_typical(0.5, 0)) both give these kept sets.
TYPICAL_PUBLISHED = [
    ([0.97, 0.01, 0.01, 0.01], 0.5, [0]),       # only the 0.97 token
    ([0.4, 0.2, 0.2, 0.2], 0.5, [1, 2, 3]),     # only the three 0.2 tokens: the top token goes
]


def test_typical_published_cases():
    l = torch.cat([logits_of(p) for p, _, _ in TYPICAL_PUBLISHED])
    out = typical_p(l, f32(*[tp for _, tp, _ in TYPICAL_PUBLISHED]))
    # row 1 by hand: H = -(.4 ln .4 + 3 * .2 ln .2) = .36652 + .96566 = 1.33218;
    # d(.4) = |.91629 - 1.33218| = .41589 > d(.2) = |1.60944 - 1.33218| = .27726, so the
    # three tied .2 tokens come first and their mass .6 >= .5 ends the prefix before the .4
    assert kept(out) == [k for _, _, k in TYPICAL_PUBLISHED]
    assert torch.equal(out[torch.isfinite(out)], l[torch.isfinite(out)])


def test_typical_peaked_row_keeps_the_least_deviating_token():
    # a peaked row: here the top token is the one closest to the entropy
    l = logits_of([0.9, 0.05, 0.05])
    # H = -(.9 ln .9 + 2 * .05 ln .05) = .09482 + .29957 = .39439
    # dev: top |.10536-.39439| = .28903, others |2.99573-.39439| = 2.60134 (tied)
    # typical_p = 0.5: top has mass 0 before it -> kept; the tied pair has .9 before -> removed
    assert kept(typical_p(l, f32(0.5))) == [[0]]
    # typical_p = 0.95: tied pair: .9 < .95 -> both kept (tie rule)
    assert kept(typical_p(l, f32(0.95))) == [[0, 1, 2]]


def test_nsigma_hand():
    l = torch.tensor([[2.0, 1.0, 0.0, -1.0, NEG_INF]] * 3)
    # finite: 2, 1, 0, -1 -> mean .5, squared deviations 2.25 .25 .25 2.25 = 5,
    # sample var 5/3, std = 1.29099
    std = math.sqrt(5 / 3)
    assert torch.tensor([2.0, 1.0, 0.0, -1.0]).std().item() == pytest.approx(std)
    out = nsigma(l, f32(1.0, 2.0, 0.5))
    # n=1: 2 - 1.291 = .709 -> {2, 1}; n=2: 2 - 2.582 = -.582 -> {2, 1, 0}; n=.5: 1.355 -> {2}
    assert kept(out) == [[0, 1], [0, 1, 2], [0]]


def test_nsigma_single_finite_token():
    l = torch.tensor([[NEG_INF, 3.0, NEG_INF]])
    out = nsigma(l, f32(1.0))
    assert kept(out) == [[1]] and not torch.isnan(out).any()


def test_xtc_hand():
    l = logits_of([0.4, 0.3, 0.2, 0.1]).repeat(5, 1)
    out = xtc(l, f32(0.15, 0.35, 0.15, 0.15, 0.15), f32(1.0, 1.0, 0.5, 0.5, 0.0),
              f32(0.0, 0.0, 0.7, 0.3, 0.0))
    # row0: C = {.4,.3,.2} (>= .15), least likely member .2 survives -> remove .4, .3
    # row1: C = {.4}, |C| = 1 -> nothing removed
    # row2: coin .7 >= probability .5 -> not applied; row3: coin .3 < .5 -> applied like row0
    # row4: probability 0 -> disabled
    assert kept(out) == [[2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3]]


def test_xtc_ties_at_minimum_survive():
    l = logits_of([0.3, 0.3, 0.1, 0.3]).repeat(2, 1)
    # C = {all three .3 tokens} (>= .2), min of C = .3 and every member ties with it: nothing removed
    out = xtc(l, f32(0.2, 0.05), f32(1.0, 1.0), f32(0.0, 0.0))
    # threshold .05: C = all four, min .1 -> the three .3 tokens are removed
    assert kept(out) == [[0, 1, 2, 3], [2]]


def test_xtc_threshold_zero_ignores_removed_tokens():
    l = torch.tensor([[1.0, NEG_INF, 0.0, -1.0]])
    out = xtc(l, f32(0.0), f32(1.0), f32(0.0))
    # C = the three finite tokens (removed tokens never belong to C): only the least likely stays
    assert kept(out) == [[3]]


def test_probability_thresholds_are_inclusive():
    # logits [0, ln .5]: exp gives exactly 1 and 0.5 in fp32, so p = [1/1.5, 0.5/1.5] and
    # p[1] == 0.5 * p[0] exactly (halving is exact); a token exactly at the threshold is kept.
    l = torch.tensor([[0.0, math.log(0.5)]])
    assert torch.exp(l)[0, 1].item() == 0.5
    p = torch.tensor([1.0, 0.5]) / torch.tensor(1.5)
    assert (p[0] * 0.5).item() == p[1].item()
    assert kept(min_p(l, f32(0.5))) == [[0, 1]]                   # p1 >= 0.5 * p_max
    assert kept(epsilon_cutoff(l, p[1:2].clone())) == [[0, 1]]    # p1 >= eps = p1
    nudged = torch.nextafter(p[1:2], torch.tensor([1.0]))
    assert kept(epsilon_cutoff(l, nudged)) == [[0]]               # one ulp above: removed


@pytest.mark.parametrize("name", list(SPECS))
def test_all_neg_inf_row_stays_without_nan(name):
    spec = SPECS[name]
    l = torch.tensor([[NEG_INF] * 5, [1.0, 2.0, NEG_INF, 0.5, 2.0]])
    val = 2 if spec.dtype == torch.int64 else 0.5
    out = spec.fn(l, torch.tensor([val, val], dtype=spec.dtype))
    assert not torch.isnan(out).any()
    assert torch.isneginf(out[0]).all()
    assert torch.isinf(out[1, 2])


# ------------------------------------------------ 2. independent numpy re-implementation


def random_params(spec: Spec, rng: np.random.Generator, batch: int, vocab: int) -> torch.Tensor:
    vals = []
    for _ in range(batch):
        u = rng.random()
        if u < 0.2:
            vals.append(spec.disabled[int(rng.integers(len(spec.disabled)))])
        elif spec.dtype == torch.int64:
            vals.append(int(rng.integers(1, vocab + 2)))
        else:
            vals.append(float(np.float32(RANDOM_RANGES[spec.fn.__name__](rng))))
    return torch.tensor(vals, dtype=spec.dtype)


RANDOM_RANGES = {
    "top_p": lambda r: r.uniform(0.05, 0.99),
    "min_p": lambda r: r.uniform(0.001, 0.5),
    "top_a": lambda r: r.uniform(0.001, 2.0),
    "tfs": lambda r: r.uniform(0.05, 0.99),
    "eta_cutoff": lambda r: 10 ** r.uniform(-4, -0.5),
    "epsilon_cutoff": lambda r: 10 ** r.uniform(-4, -0.5),
    "typical_p": lambda r: r.uniform(0.05, 0.99),
    "nsigma": lambda r: r.uniform(0.05, 3.0),
}


def compare_with_reference(out, logits, ref_rows):
    n_amb = n_total = 0
    for b, (keep_ref, amb) in enumerate(ref_rows):
        fin = torch.isfinite(logits[b]).numpy()
        got = torch.isfinite(out[b]).numpy()
        check = fin & ~amb
        bad = np.nonzero(check & (got != keep_ref))[0]
        assert len(bad) == 0, f"row {b}: tokens {bad.tolist()} differ (got {got[bad]}, ref {keep_ref[bad]})"
        # kept tokens keep their value exactly; removed tokens are -inf
        assert torch.equal(out[b][torch.from_numpy(got)], logits[b][torch.from_numpy(got)])
        assert got.any() or not fin.any()
        n_amb += int((amb & fin).sum())
        n_total += int(fin.sum())
    return n_amb, n_total


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_numpy_reference(name):
    spec = SPECS[name]
    rng = np.random.default_rng(1234 + len(name))
    n_amb = n_total = 0
    for vocab in (1, 2, 3, 7, 50, 257):
        for scale in (0.5, 3.0):
            logits = make_logits(rng, 6, vocab, scale=scale)
            params = random_params(spec, rng, 6, vocab)
            out = spec.fn(logits, params)
            rows = logits.double().numpy()
            refs = [spec.ref(rows[b], params[b].item()) for b in range(6)]
            a, t = compare_with_reference(out, logits, refs)
            n_amb += a
            n_total += t
    assert n_amb <= 0.02 * n_total, f"too many ambiguous tokens: {n_amb}/{n_total}"


def test_xtc_matches_numpy_reference():
    rng = np.random.default_rng(99)
    n_amb = n_total = 0
    for vocab in (1, 2, 5, 20, 200):
        for scale in (0.3, 1.0, 3.0):
            logits = make_logits(rng, 8, vocab, scale=scale)
            thr = torch.tensor(rng.choice([0.0, 0.01, 0.05, 0.1, 0.3, 0.6], 8), dtype=torch.float32)
            prob = torch.tensor(rng.choice([0.0, 0.3, 1.0], 8), dtype=torch.float32)
            coin = torch.tensor(rng.random(8), dtype=torch.float32)
            out = xtc(logits, thr, prob, coin)
            rows = logits.double().numpy()
            refs = [ref_xtc(rows[b], thr[b].item(), prob[b].item(), coin[b].item()) for b in range(8)]
            a, t = compare_with_reference(out, logits, refs)
            n_amb += a
            n_total += t
    assert n_amb <= 0.1 * n_total


# ---------------------------------------------------------------- 3. hypothesis properties


@st.composite
def batches(draw, spec: Spec, max_batch: int = 5, max_vocab: int = 64):
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    ninf = draw(st.sampled_from([0.0, 0.3, 0.8]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    logits = make_logits(np.random.default_rng(seed), batch, vocab, ninf=ninf, scale=scale)
    vals = draw(st.lists(st.one_of(st.sampled_from(spec.disabled), spec.enabled),
                         min_size=batch, max_size=batch))
    return logits, torch.tensor(vals, dtype=spec.dtype)


def _prop(name, check):
    spec = SPECS[name]

    @HYP
    @given(data=batches(spec))
    def run(data):
        check(spec, *data)

    run()


def check_disabled_bit_identical(spec, logits, params):
    out = spec.fn(logits, params)
    assert out.dtype == logits.dtype and out.shape == logits.shape
    assert out.data_ptr() != logits.data_ptr()
    for b in range(logits.shape[0]):
        if params[b].item() in spec.disabled:
            assert torch.equal(bits(out[b]), bits(logits[b]))


def check_batch_independence(spec, logits, params):
    out = spec.fn(logits, params)
    for b in range(logits.shape[0]):
        alone = spec.fn(logits[b:b + 1].clone(), params[b:b + 1].clone())
        assert torch.equal(bits(alone[0]), bits(out[b]))


def check_keeps_top_and_something(spec, logits, params):
    before = logits.clone()
    out = spec.fn(logits, params)
    assert torch.equal(bits(logits), bits(before))  # input not modified
    assert not torch.isnan(out).any()
    if spec.keeps_top:
        top = logits == logits.amax(dim=-1, keepdim=True)
        assert torch.equal(out[top], logits[top])
    assert torch.isfinite(out).any(dim=-1).all()
    # removal only: every output is either the input value or -inf
    assert torch.all((out == logits) | torch.isneginf(out))


def check_monotone(spec, logits, params):
    # `looser` is the more permissive value of each row's parameter: it must keep a superset
    if spec.dtype == torch.int64:
        looser = torch.where(params > 0, params + 3, params)
    elif spec.larger_keeps_more:
        looser = params * 1.3
        if spec.fn in (top_p, typical_p, tfs):
            looser = looser.clamp(max=1.0)
    else:
        looser = params * 0.7
    kept_strict = torch.isfinite(spec.fn(logits, params))
    kept_loose = torch.isfinite(spec.fn(logits, looser))
    assert torch.all(kept_loose | ~kept_strict), "the more permissive parameter removed a token"


@pytest.mark.parametrize("name", list(SPECS))
def test_prop_disabled_bit_identical(name):
    _prop(name, check_disabled_bit_identical)


@pytest.mark.parametrize("name", list(SPECS))
def test_prop_batch_independence(name):
    _prop(name, check_batch_independence)


@pytest.mark.parametrize("name", list(SPECS))
def test_prop_keeps_top_never_all(name):
    _prop(name, check_keeps_top_and_something)


@pytest.mark.parametrize("name", list(SPECS))
def test_prop_monotone(name):
    _prop(name, check_monotone)


@HYP
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 64),
       thr=st.lists(_fl(0.0, 1.0), min_size=4, max_size=4),
       prob=st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=4, max_size=4),
       coin=st.lists(_fl(0.0, 0.999), min_size=4, max_size=4))
def test_prop_xtc(seed, vocab, thr, prob, coin):
    logits = make_logits(np.random.default_rng(seed), 4, vocab, ninf=0.3)
    thr_t, prob_t, coin_t = f32(*thr), f32(*prob), f32(*coin)
    out = xtc(logits, thr_t, prob_t, coin_t)
    assert torch.isfinite(out).any(dim=-1).all()
    assert torch.all((out == logits) | torch.isneginf(out))
    for b in range(4):
        alone = xtc(logits[b:b + 1], thr_t[b:b + 1], prob_t[b:b + 1], coin_t[b:b + 1])
        assert torch.equal(bits(alone[0]), bits(out[b]))
        if not (prob[b] > 0 and coin[b] < prob[b]):
            assert torch.equal(bits(out[b]), bits(logits[b]))


# typical_p against a plain sort of its definition, on rows with many exact ties


def np_typical_sorted(row: np.ndarray, tp: float) -> tuple[np.ndarray, bool]:
    """typical_p by its definition, in float64: sort the tokens by d = |-log p - H|
    ascending, take the shortest prefix whose mass is >= tp, keep every token whose d is <=
    that of the prefix's last one (ties in d kept). Nothing is added back.

    Returns (keep, unsure): ``unsure`` when fp32 rounding could change the answer: two
    different logits whose deviations are within 1e-6 (their order), or a cumulative mass
    at the end of a group of tied tokens within 1e-5 of tp (where the prefix ends)."""
    fin = np.isfinite(row)
    if tp >= 1.0:
        return fin, False
    p = np_softmax(row)
    pos = p > 0
    with np.errstate(divide="ignore"):
        logp = np.where(pos, np.log(np.where(pos, p, 1.0)), -np.inf)
    h = float(-(p[pos] * logp[pos]).sum())
    d = np.where(pos, np.abs(-logp - h), np.inf)
    order = np.argsort(d, kind="stable")
    cum = np.cumsum(p[order])
    n = min(int(np.searchsorted(cum, tp, side="left")) + 1, len(row))  # first cum >= tp
    keep = fin & (d <= d[order[n - 1]])
    # equal logits have exactly equal d: one group of tied tokens per distinct logit, whose
    # d is |lse - l - H| (-log p = lse - l)
    levels = np.unique(row[pos])
    lse = float(row[pos][0] - logp[pos][0])
    d_lv = np.abs(lse - levels - h)
    by_d = np.argsort(d_lv)
    mass_lv = np.array([p[row == v].sum() for v in levels])[by_d]
    unsure = bool(np.any(np.diff(d_lv[by_d]) <= 1e-6 * (1 + d_lv.max(initial=0.0)))
                  or np.any(np.abs(np.cumsum(mass_lv) - tp) <= 1e-5))
    return keep, unsure


def test_np_typical_sorted_on_the_published_cases():
    # the numpy definition itself reproduces the HF / llama.cpp numbers
    for probs, tp, want in TYPICAL_PUBLISHED:
        keep, unsure = np_typical_sorted(logits_of(probs)[0].double().numpy(), tp)
        assert np.nonzero(keep)[0].tolist() == want and not unsure


@st.composite
def quantised_rows(draw, max_batch: int = 4, max_vocab: int = 48):
    """Logits on a coarse grid (many exact ties, at the maximum too), some -inf, never a
    whole row; per-row typical_p, sometimes disabled."""
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(1, max_vocab))
    scale = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    levels = draw(st.integers(1, 9))
    rows = draw(st.lists(st.lists(st.integers(-1, levels - 1), min_size=vocab, max_size=vocab),
                         min_size=batch, max_size=batch))
    x = np.array(rows, dtype=np.float32) * np.float32(scale)
    x[np.array(rows) < 0] = -np.inf
    x[:, 0] = np.where(np.isfinite(x).any(axis=1), x[:, 0], 0.0)  # never a whole row removed
    tps = draw(st.lists(st.one_of(st.just(1.0), _fl(0.01, 0.999)), min_size=batch, max_size=batch))
    return torch.from_numpy(x), torch.tensor(tps, dtype=torch.float32)


def check_typical_equals_sorted_definition(fn, logits, tp):
    """``fn`` (F.typical_p or a kernel) keeps exactly the numpy definition's set (rows where
    rounding could decide are rejected, so each compared row is an exact claim)."""
    rows = logits.double().numpy()
    refs = [np_typical_sorted(rows[b], tp[b].item()) for b in range(len(rows))]
    assume(not any(unsure for _, unsure in refs))
    out = fn(logits, tp)
    for b, (keep, _) in enumerate(refs):
        got = torch.isfinite(out[b]).numpy()
        assert np.array_equal(got, keep), (b, rows[b].tolist(), tp[b].item(), got.tolist(), keep.tolist())
        assert torch.equal(out[b][torch.from_numpy(got)], logits[b][torch.from_numpy(got)])
        assert got.any()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=quantised_rows())
def test_prop_typical_equals_the_sorted_definition(data):
    check_typical_equals_sorted_definition(typical_p, *data)


# ------------------------------------------------------------------ 4. fp16 / bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPECS) + ["xtc"])
def test_low_precision_dtypes(name, dtype):
    rng = np.random.default_rng(7)
    logits32 = make_logits(rng, 4, 40)
    logits = logits32.to(dtype)
    if name == "xtc":
        args = (f32(0.05, 0.1, 0.0, 0.2), f32(1.0, 1.0, 0.0, 0.5), f32(0.1, 0.2, 0.3, 0.4))
        out, ref = xtc(logits, *args), xtc(logits.float(), *args)
    else:
        spec = SPECS[name]
        params = random_params(spec, rng, 4, 40)
        out, ref = spec.fn(logits, params), spec.fn(logits.float(), params)
    assert out.dtype == dtype and out.shape == logits.shape
    # the same tokens are removed as for the exactly upcast fp32 input, kept values unchanged
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.equal(out.float()[torch.isfinite(out)], ref[torch.isfinite(ref)])


def test_param_shape_error():
    with pytest.raises(ValueError, match="min_p"):
        min_p(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="logits"):
        min_p(torch.zeros(4), torch.zeros(1))


@pytest.mark.parametrize("seed", range(6))
def test_kth_largest_on_rows_mostly_minus_inf_matches_topk(seed):
    """top_k's negated numpy partition (taken at one torch thread when more than an eighth of
    the entries are -inf and none is NaN) gives torch.topk's k-th largest values, and a block
    holding the k largest: ties, +-0.0, +inf, rows with fewer than k finite entries; a NaN
    anywhere sends the call to topk (NaN counts as the largest there)."""
    from samplers.functional import truncation as T

    g = torch.Generator().manual_seed(seed)
    B, V = 5, 3000
    x = torch.round(torch.randn(B, V, generator=g) * 4) / 2  # many ties
    x[torch.rand(B, V, generator=g) < 0.87] = float("-inf")
    x[0, :3] = torch.tensor([0.0, -0.0, float("inf")])
    x[1, 10:] = float("-inf")  # fewer finite entries than k
    if seed % 3 == 2:
        x[2, 7] = float("nan")
    k = torch.tensor([1, 50, 7, 50, 200])[:B]
    enabled = torch.ones(B, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kth, block = T._kth_largest(x, k, enabled, int(k.max()))
    finally:
        torch.set_num_threads(threads)
    ref = torch.topk(x, int(k.max()), dim=-1).values
    expected = ref.gather(-1, (k - 1)[:, None])[:, 0]
    assert torch.equal(kth.isnan(), expected.isnan())
    assert torch.equal(kth[~kth.isnan()], expected[~expected.isnan()])
    for b in range(B):  # the block holds the row's k largest (as a multiset)
        top = ref[b, : int(k[b])]
        got = torch.sort(block[b], descending=True).values[: int(k[b])]
        assert torch.equal(got.isnan(), top.isnan()) and torch.equal(got[~got.isnan()], top[~top.isnan()])


@pytest.mark.parametrize("dense", [True, False])
def test_kth_largest_of_one_row_partitions_with_several_threads(dense, monkeypatch):
    """One row: the numpy partition whatever torch's thread count (topk cannot split a row),
    with topk's values."""
    from samplers.functional import truncation as T

    g = torch.Generator().manual_seed(11)
    x = torch.round(torch.randn(1, 5000, generator=g) * 4) / 2
    if not dense:
        x[torch.rand(1, 5000, generator=g) < 0.9] = float("-inf")
    k = torch.tensor([37])
    expected = torch.topk(x, 37, dim=-1).values
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: pytest.fail("topk on one row"))
    torch.set_num_threads(2)
    try:
        kth, block = T._kth_largest(x, k, torch.ones(1, dtype=torch.bool), 37)
    finally:
        torch.set_num_threads(threads)
    assert float(kth[0]) == float(expected[0, -1])
    assert torch.equal(torch.sort(block[0], descending=True).values[:37], expected[0])


def test_count_below_counts_rows_that_dip():
    """A GPU's cumsum can dip by an ulp; the count rule counts the entries below the bound
    whatever the row's order, where a binary search stops at some crossing. On running sums
    both rules agree."""
    from samplers.functional._stats import count_below

    dipping = torch.tensor([[0.1, 0.5, 0.49999997, 0.5, 0.9, 1.0]])
    bound = torch.tensor([0.5])
    assert count_below(dipping, bound, monotone=False).tolist() == [2]  # 0.1, 0.49999997
    assert count_below(dipping, bound, inclusive=True, monotone=False).tolist() == [4]
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.random((4, int(rng.integers(1, 300)))).astype(np.float32)
        p[rng.random(p.shape) < 0.5] = 0.0
        cum = torch.from_numpy(p).cumsum(dim=-1)
        b = torch.from_numpy(rng.random(4).astype(np.float32)) * cum[:, -1]
        for inclusive in (False, True):
            assert torch.equal(count_below(cum, b, inclusive, monotone=True),
                               count_below(cum, b, inclusive, monotone=False))
