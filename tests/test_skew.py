"""Tests for samplers/functional/skew.py.

1. hand-computed values (arithmetic written out), incl. ties and -inf;
2. agreement with an independent float64 numpy re-implementation on random heterogeneous
   batches with -inf entries and ties;
3. hypothesis properties: skew 0 -> bit-identical, batch independence, -inf stays -inf,
   the top token keeps a positive probability, mass conservation, direction of the effect;
4. fp16 / bf16 inputs keep their dtype;
5. the CPU's numpy route: bit for bit the torch route's results (ties, -inf, one-token rows,
   extreme skews, low precision), declining non-finite cases, and against the reference.
"""

from __future__ import annotations

import importlib
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.functional._stats import compact_rows, softmax_and_log_softmax, trusted_params
from samplers.functional.skew import skew

from logit_helpers import bits, make_logits

NEG_INF = float("-inf")
HYP = settings(max_examples=50, deadline=None, derandomize=True)


def logits_of(probs: list[float]) -> list[float]:
    return [math.log(q) if q > 0 else NEG_INF for q in probs]


def f32(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def exact_skew_probs(p32: np.ndarray, power: float) -> np.ndarray:
    """p' of one row of float32 probabilities ``p32`` (the ones skew sorts), each to ~1e-60,
    from exact sums: c = (prefix / total) ** power, in 320-bit floats (mpmath), which hold every
    sum of float32 values exactly; tied probabilities share their group's mass equally."""
    import mpmath

    with mpmath.workprec(320):
        total = mpmath.fsum(mpmath.mpf(float(v)) for v in p32)
        out = np.zeros(len(p32))
        before, before_pow = mpmath.mpf(0), mpmath.mpf(0)
        for v in sorted(set(float(v) for v in p32 if v > 0), reverse=True):
            members = np.nonzero(p32 == np.float32(v))[0]
            after = before + mpmath.mpf(v) * len(members)
            after_pow = mpmath.power(after / total, mpmath.mpf(power))
            out[members] = float((after_pow - before_pow) / len(members))
            before, before_pow = after, after_pow
    return out


def ref_skew_probs(row: np.ndarray, sk: float) -> np.ndarray:
    """Independent float64 reference: the skewed probabilities p' of one row.

    Sort by probability descending, c = (cumsum / total) ** exp(skew), p' = diff(c, prepend 0);
    tokens with equal probability share their group's mass equally (the tie rule)."""
    fin = np.isfinite(row)
    p = np.zeros_like(row)
    e = np.exp(row[fin] - row[fin].max())
    p[fin] = e / e.sum()
    power = math.exp(sk)
    values = sorted(set(p[fin].tolist()), reverse=True)
    out = np.zeros_like(p)
    total = float(p.sum())
    before = 0.0
    for v in values:
        members = np.nonzero(fin & (p == v))[0]
        after = before + v * len(members)
        out[members] = ((after / total) ** power - (before / total) ** power) / len(members)
        before = after
    return out


# ------------------------------------------------------------ 1. hand-computed values


def test_skew_hand():
    l = torch.tensor([logits_of([0.5, 0.3, 0.15, 0.05]),
                      logits_of([0.15, 0.05, 0.5, 0.3]),
                      logits_of([0.5, 0.3, 0.15, 0.05])])
    out = skew(l, f32(math.log(2.0), math.log(2.0), math.log(0.5)))
    # row0, exp(skew) = 2: c = .5 .8 .95 1 -> squared .25 .64 .9025 1
    #   -> p' = .25, .64-.25 = .39, .9025-.64 = .2625, 1-.9025 = .0975
    expected0 = [0.25, 0.39, 0.2625, 0.0975]
    assert torch.allclose(out[0].exp(), f32(*expected0), atol=1e-6)
    # row1: the same probabilities in another token order -> the same values, permuted
    assert torch.allclose(out[1].exp(), f32(0.2625, 0.0975, 0.25, 0.39), atol=1e-6)
    # row2, exp(skew) = .5: sqrt(c) = .70711 .89443 .97468 1 -> p' = .70711 .18732 .08025 .02532
    sq = [math.sqrt(x) for x in (0.5, 0.8, 0.95, 1.0)]
    expected2 = [sq[0], sq[1] - sq[0], sq[2] - sq[1], sq[3] - sq[2]]
    assert expected2 == pytest.approx([0.70711, 0.18732, 0.08025, 0.02532], abs=1e-5)
    assert torch.allclose(out[2].exp(), f32(*expected2), atol=1e-6)


def test_skew_ties_share_mass():
    l = torch.tensor([logits_of([0.3, 0.4, 0.3])])
    out = skew(l, f32(math.log(2.0)))
    # sorted .4 .3 .3 -> c = .4 .7 1 -> squared .16 .49 1; the tied pair shares 1 - .16 = .84:
    # .42 each (instead of .33 and .51 depending on the sort order)
    assert torch.allclose(out.exp(), f32(0.42, 0.16, 0.42), atol=1e-6)
    assert out[0, 0].item() == out[0, 2].item()


def test_skew_keeps_removed_tokens_removed():
    l = torch.tensor([logits_of([0.5, 0.0, 0.3, 0.2, 0.0])])
    out = skew(l, f32(0.7))
    assert torch.isneginf(out[0, [1, 4]]).all()
    assert torch.isfinite(out[0, [0, 2, 3]]).all()


def test_skew_zero_and_neighbours():
    l = torch.tensor([logits_of([0.5, 0.3, 0.2])] * 3)
    out = skew(l, f32(0.0, -0.0, 1e-3))
    assert torch.equal(bits(out[0]), bits(l[0]))
    assert torch.equal(bits(out[1]), bits(l[1]))
    assert not torch.equal(out[2], l[2])


def test_extreme_skew_keeps_top_token():
    l = torch.tensor([logits_of([0.5, 0.3, 0.2, 0.0])] * 2 + [[0.0] * 4])
    with pytest.raises(ValueError, match=r"skew must be in \[-80, 80\], got -120.0"):
        skew(l, f32(20.0, -120.0, 30.0))
    with trusted_params():  # (past the interval: what the formula does with it anyway)
        out = skew(l, f32(20.0, -120.0, 30.0))
    # skew 20: exp(20) = 4.85e8, .5 ** 4.85e8 underflows to 0: the top token would get p' = 0;
    # it is kept at the smallest normal fp32 probability instead (log = -87.34)
    assert torch.isfinite(out[:, 0]).all()
    assert out[0, 0].item() == pytest.approx(math.log(torch.finfo(torch.float32).tiny), abs=1e-3)
    # skew -120: exp(-120) underflows to 0 in fp32; the top token still gets mass, the rest 0
    assert torch.isfinite(out[1, 0]) and torch.isneginf(out[1, 1:]).all()
    # a uniform row is one tie group: every token gets (1 ** e - 0) / 4, whatever the skew
    assert torch.allclose(out[2].exp(), torch.full((4,), 1 / 4), atol=1e-6)
    assert not torch.isnan(out).any()


def test_all_neg_inf_row():
    out = skew(torch.full((1, 4), NEG_INF), f32(0.5))
    assert torch.isneginf(out).all()


# ------------------------------------------------ 2. independent numpy re-implementation


def test_matches_numpy_reference():
    rng = np.random.default_rng(11)
    for vocab in (1, 2, 3, 10, 100, 400):
        for scale in (0.3, 2.0, 6.0):
            l = make_logits(rng, 8, vocab, scale=scale, ninf=rng.choice([0.0, 0.3, 0.8]))
            sk = np.float32(rng.choice([0.0, -2.0, -0.5, -0.05, 0.05, 0.5, 2.0], 8))
            out = skew(l, torch.from_numpy(sk))
            rows = l.double().numpy()
            for b in range(8):
                ref = ref_skew_probs(rows[b], float(sk[b]))
                got = out[b].double().exp().numpy()
                if sk[b] == 0:
                    assert torch.equal(bits(out[b]), bits(l[b]))
                    continue
                np.testing.assert_allclose(got, ref, rtol=1e-3, atol=2e-6)
                assert np.all(np.isneginf(out[b].numpy())[~np.isfinite(rows[b])])


# ---------------------------------------------------------------- 3. hypothesis properties


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 5))
    vocab = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    ninf = draw(st.sampled_from([0.0, 0.3, 0.9]))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    logits = make_logits(np.random.default_rng(seed), batch, vocab, ninf=ninf, scale=scale)
    sk = draw(st.lists(st.one_of(st.just(0.0), st.floats(-5.0, 5.0, width=32)),
                       min_size=batch, max_size=batch))
    return logits, torch.tensor(sk, dtype=torch.float32)


@HYP
@given(case=cases())
def test_prop_skew(case):
    logits, sk = case
    before = logits.clone()
    out = skew(logits, sk)
    assert torch.equal(bits(logits), bits(before))
    assert out.dtype == logits.dtype and out.shape == logits.shape
    assert not torch.isnan(out).any()
    assert torch.all(torch.isneginf(out)[torch.isneginf(logits)])
    top = logits == logits.amax(dim=-1, keepdim=True)
    assert torch.isfinite(out[top]).all()
    p = torch.softmax(logits, dim=-1)
    for b in range(logits.shape[0]):
        alone = skew(logits[b:b + 1].clone(), sk[b:b + 1].clone())
        assert torch.equal(bits(alone[0]), bits(out[b]))
        if sk[b] == 0:
            assert torch.equal(bits(out[b]), bits(logits[b]))
            continue
        q = out[b].exp()
        # mass is conserved: sum p' = (sum p) ** exp(skew) = 1 (up to rounding / the top clamp)
        assert abs(q.sum().item() - 1.0) < 1e-4
        # skew > 0 moves mass away from the top tokens, skew < 0 toward them
        top_p, top_q = p[b][top[b]].sum().item(), q[top[b]].sum().item()
        if sk[b] > 0:
            assert top_q <= top_p + 1e-6
        else:
            assert top_q >= top_p - 1e-6


# ------------------------------------------------------------------ 4. fp16 / bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    l = make_logits(np.random.default_rng(3), 4, 60, scale=2.0).to(dtype)
    sk = f32(0.5, 0.0, -1.0, 3.0)
    out = skew(l, sk)
    assert out.dtype == dtype and out.shape == l.shape
    assert torch.equal(bits(out[1]), bits(l[1]))
    assert torch.equal(out, skew(l.float(), sk).to(dtype))


# ------------------------------------------- 5. the CPU's numpy route against the torch route

_skew_module = importlib.import_module("samplers.functional.skew")


@pytest.fixture
def routes(monkeypatch):
    """``routes(x, sk, numpy=True)``: skew with the CPU's numpy route, asserting that it was
    ``expect``-ed: "taken" (it gave the result), "declined" (it returned None) or "skipped"
    (not tried: a non-finite exp(skew)); ``numpy=False``: the torch route only."""
    calls = {"taken": 0, "declined": 0}
    real = _skew_module._skew_numpy

    def counting(*args):
        out = real(*args)
        calls["taken" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(_skew_module, "_skew_numpy", counting)

    def run(x, sk, numpy: bool, expect: str = "taken"):
        with trusted_params():  # (the routes' own handling of skews past the interval, NaN included)
            return run_trusted(x, sk, numpy, expect)

    def run_trusted(x, sk, numpy: bool, expect: str):
        if numpy:
            before = dict(calls)
            out = skew(x, sk)
            changed = {k for k in calls if calls[k] != before[k]}
            assert changed == (set() if expect == "skipped" else {expect}), (expect, calls, before)
            return out
        ok = _skew_module._numpy_path_ok
        _skew_module._numpy_path_ok = lambda p: False
        try:
            return skew(x, sk)
        finally:
            _skew_module._numpy_path_ok = ok

    return run


def _hard_rows(rng: np.random.Generator, batch: int, vocab: int) -> torch.Tensor:
    """Rows full of ties (bf16 rounding, small integers, ties at the max), -inf entries, an
    all -inf row and a row with one finite token."""
    kind = rng.integers(0, 4)
    x = make_logits(rng, batch, vocab, scale=float(rng.choice([0.5, 3.0, 12.0])),
                    ninf=float(rng.choice([0.0, 0.3, 0.95])), ties_at_max=True)
    if kind == 1:
        x = x.bfloat16().float()
    elif kind == 2:
        x = torch.round(x)
    if batch > 2:
        x[1] = NEG_INF
        x[2] = NEG_INF
        x[2, int(rng.integers(0, vocab))] = float(rng.normal())
    return x


SKEWS = [0.0, -0.0, 1e-3, -1e-3, 0.05, -0.05, 0.5, -0.5, 2.0, -2.0, 5.0, 20.0, -120.0, 80.0]


@pytest.mark.parametrize("ties", ["few", "many"])
@pytest.mark.parametrize("vocab", [1, 2, 3, 17, 400, 1500, 5000])
def test_numpy_route_matches_torch_route(vocab, ties, routes, monkeypatch):
    """Bit for bit, the numpy route (sorted-order passes, one scatter) and the torch route
    (sort_nonneg, scatter, token-order passes) on tie-heavy rows, with the tie groups
    described either way (``_sorted_tie_groups``: tied positions only, or every position);
    widths from 1024 on also go through the packed rows when mostly -inf."""
    monkeypatch.setattr(_skew_module, "_MANY_TIES", 0 if ties == "few" else 10**12)
    rng = np.random.default_rng(vocab)
    for trial in range(6):
        batch = int(rng.integers(1, 7))
        x = _hard_rows(rng, batch, vocab)
        sk = torch.from_numpy(rng.choice(SKEWS, batch).astype(np.float32))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            xd = x.to(dtype)
            assert torch.equal(bits(routes(xd, sk, numpy=True)), bits(routes(xd, sk, numpy=False))), \
                (vocab, trial, dtype)


@pytest.mark.parametrize("case", ["nan_logit", "inf_logit", "nan_skew", "inf_skew"])
def test_numpy_route_declines_non_finite_cases(case, routes):
    """NaN / +inf logits (NaN probabilities) and a NaN or infinite exp(skew) go the torch
    route: the results are its, bit for bit."""
    rng = np.random.default_rng(7)
    x = make_logits(rng, 3, 300, ninf=0.2)
    sk = f32(0.5, -0.5, 2.0)
    if case == "nan_logit":
        x[0, 5] = float("nan")
    elif case == "inf_logit":
        x[1, 7] = float("inf")
    elif case == "nan_skew":
        sk[2] = float("nan")
    else:
        sk[0] = float("inf")
    expect = "skipped" if case in ("nan_skew", "inf_skew") else "declined"
    via_numpy = routes(x, sk, numpy=True, expect=expect)
    assert torch.equal(bits(via_numpy), bits(routes(x, sk, numpy=False)))


#: Rows whose float32 sum of sorted probabilities rounds past 1 (seed 9, 300 tokens) and
#: short of it (a 6-token row): the two ways rounding broke large skews.
_ROUNDED_TOTALS = {
    "above_one": torch.randn(1, 300, generator=torch.Generator().manual_seed(9)),
    "below_one": torch.tensor([[-1.5726652145385742, -0.12324775755405426, 3.586989402770996,
                                -1.8312901258468628, 1.5987002849578857, -1.277006983757019]]),
}


@pytest.mark.parametrize("total", sorted(_ROUNDED_TOTALS))
@pytest.mark.parametrize("sk", [21.0, 40.0, 80.0, 88.0])
def test_large_skew_on_sums_rounded_off_one(sk, total, routes):
    """Rows whose sorted probabilities sum to 1.0000001 or 0.99999988 in float32, with an
    exp(skew) that raises those to +inf or 0 (skew >= ~20.4; 88 is past the parameter's
    interval, but a finite exp): no NaN and no +inf, both routes agree bit for bit, the values
    are the exact ones (from exact sums of the same float32 probabilities) to 1e-6, and the
    whole mass goes to the least likely token (a rounded total once sent it to the most
    likely one, or gave NaN; the plain differences of rounded sums to the first token where
    the float32 sums stopped changing)."""
    row = _ROUNDED_TOTALS[total]
    x = row.expand(3, row.shape[1]).contiguous()
    p, _ = softmax_and_log_softmax(x, with_log=False)  # (the probabilities skew sorts)
    sums = torch.cumsum(torch.sort(p, descending=True).values, -1)
    assert (sums[0, -1] > 1.0) if total == "above_one" else (sums[0, -1] < 1.0)  # the hostile case
    sks = f32(sk, sk, sk)
    via_numpy = routes(x, sks, numpy=True)
    assert torch.equal(bits(via_numpy), bits(routes(x, sks, numpy=False)))
    assert not torch.isnan(via_numpy).any() and not torch.isposinf(via_numpy).any()
    assert torch.isfinite(via_numpy[x == x.amax(dim=-1, keepdim=True)]).all()
    q = via_numpy.double().exp().numpy()
    exact = exact_skew_probs(p[0].numpy(), float(torch.exp(sks[0])))
    for got in q:
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e-6)
    assert q[0, int(p[0].argmin())] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sk", [21.0, 40.0, 80.0])
def test_large_skew_where_the_sums_stop_changing(sk, routes):
    """A long row whose float32 prefix sums stop changing well before its last token (the
    tail's terms are below half an ulp of the sum): at large skews the mass belongs to the
    least likely tokens, by the exact values (to 1e-6), on both routes. The plain
    differences of the rounded sums put it all on the first token where they stopped
    changing."""
    x = (torch.randn(2, 3000, generator=torch.Generator().manual_seed(4)) * 8).contiguous()
    p, _ = softmax_and_log_softmax(x, with_log=False)
    sums = torch.cumsum(torch.sort(p, descending=True).values, -1)
    assert int((sums[0] == sums[0, -1]).sum()) > 100  # (the hostile case)
    exact = exact_skew_probs(p[0].numpy(), float(torch.exp(f32(sk))[0]))
    for numpy in (True, False):
        q = routes(x, f32(sk, sk), numpy=numpy).double().exp().numpy()
        np.testing.assert_allclose(q[0], exact, rtol=0, atol=1e-6)
        assert abs(q[0].sum() - 1.0) < 1e-5


@pytest.mark.parametrize("sk", [0.1, -0.5, 2.0])
def test_tail_tokens_keep_their_skewed_probability(sk, routes):
    """Every token's p', down to the row's least likely (p < 1e-15, far below an ulp of the
    sums they join), within 1e-5 (relative) of its exact value on both routes, on rows with
    no token removed and on rows mostly removed (packed rows). The plain difference of the
    rounded powers gave each tail token 0 or a multiple of an ulp of 1: here ~40% of a full
    row's tokens were removed and most of the rest off by more than 1%, at any skew."""
    rng = np.random.default_rng(31)
    full = torch.from_numpy((rng.standard_normal((2, 3000)) * 8).astype(np.float32))
    sparse = torch.from_numpy((rng.standard_normal((2, 3000)) * 8).astype(np.float32))
    sparse[torch.from_numpy(rng.random((2, 3000)) < 0.9)] = NEG_INF
    assert compact_rows(sparse) is not None and compact_rows(full) is None
    power = float(torch.exp(f32(sk))[0])
    for x in (full, sparse):
        p, _ = softmax_and_log_softmax(x, with_log=False)
        for numpy in (True, False):
            q = routes(x, f32(sk, sk), numpy=numpy).double().exp().numpy()
            for b in range(2):
                exact = exact_skew_probs(p[b].numpy(), power)
                assert exact[exact > 0].min() < 1e-15  # (the deep tail is there)
                normal = exact > 1e-37  # (float32's normal range: below it p' loses digits)
                np.testing.assert_allclose(q[b][normal], exact[normal], rtol=1e-5, atol=0)
                assert np.all(q[b][exact == 0] == 0)


def test_large_skew_sends_the_mass_to_the_least_likely_token():
    """On short rows of distinct probabilities, large enough that their float32 sums take every
    term, skew 25..80 gives (nearly) all the mass to the least likely token and -80 to the most
    likely one, whatever the rounding of the row's total (about a quarter of these rows sum
    to 0.99999988)."""
    rng = np.random.default_rng(21)
    x = torch.from_numpy(rng.standard_normal((400, 6)).astype(np.float32) * 1.5)
    p = torch.softmax(x, -1)
    sorted_p = torch.sort(p, -1, descending=True).values
    assert (sorted_p[:, 1:] < sorted_p[:, :-1]).all()
    totals = torch.cumsum(sorted_p, -1)[:, -1]
    assert 20 < int((totals < 1).sum()) < 380  # (both sides of 1 are exercised)
    for sk in (25.0, 80.0):
        q = torch.softmax(skew(x, torch.full((400,), sk)), -1)
        assert torch.equal(q.argmax(-1), p.argmin(-1))
        assert (q.amax(-1) > 0.999).all()
    q = torch.softmax(skew(x, torch.full((400,), -80.0)), -1)
    assert torch.equal(q.argmax(-1), p.argmax(-1))


def test_numpy_route_against_numpy_reference_with_ties(routes):
    """The numpy route against the independent float64 reference on tie-heavy rows whose tie
    groups carry much of the mass (where splitting a group by sort position would be off by
    far more than the tolerance), plus the exact property that equal probabilities give
    equal bits. (Permuting a row's tokens need not permute the result bit for bit: the
    softmax's fp32 sum depends on the order of its terms.)"""
    rng = np.random.default_rng(5)
    for vocab in (5, 60, 2000):
        for trial in range(4):
            batch = 4
            x = torch.round(torch.from_numpy(rng.standard_normal((batch, vocab)).astype(np.float32))
                            * float(rng.choice([0.6, 2.0])))
            if trial % 2:
                x[torch.from_numpy(rng.random((batch, vocab)) < 0.5)] = NEG_INF
                x[:, 0] = 3.0
            sk = f32(*rng.choice([-1.5, -0.3, 0.3, 1.5], batch))
            out = routes(x, sk, numpy=True)
            rows = x.double().numpy()
            for b in range(batch):
                ref = ref_skew_probs(rows[b], float(sk[b]))
                np.testing.assert_allclose(out[b].double().exp().numpy(), ref, rtol=1e-3, atol=2e-6)
                p = torch.softmax(x[b], -1)
                for v in torch.unique(p):
                    members = out[b][p == v]
                    assert torch.equal(bits(members), bits(members[:1].expand_as(members)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numpy_route_low_precision_against_reference(dtype, routes):
    """fp16 / bf16 logits: against the reference on the same (rounded) logits, in probability
    space: fp32 rounding (``atol``, as above) plus the rounding of ``log p'`` to ``dtype``
    (a relative error of up to ``eps * |log p'|`` in ``p'``)."""
    rng = np.random.default_rng(9)
    x = make_logits(rng, 4, 3000, scale=2.0, ninf=0.3).to(dtype)
    sk = f32(0.7, -0.7, 2.5, -2.5)
    out = routes(x, sk, numpy=True)
    assert out.dtype == dtype
    rows = x.double().numpy()
    eps = torch.finfo(dtype).eps
    for b in range(4):
        ref = ref_skew_probs(rows[b], float(sk[b]))
        got = out[b].double().numpy()
        assert np.all(np.isneginf(got[~np.isfinite(rows[b])]))
        with np.errstate(divide="ignore"):
            rtol = 1e-3 + eps * np.abs(np.log(ref))
        rtol[ref == 0] = 0.0
        assert np.all(np.abs(np.exp(got) - ref) <= 2e-6 + rtol * ref)


def test_numpy_route_scratch_is_per_thread():
    """The numpy route's scratch buffers are per thread: concurrent calls of different shapes
    give the results of sequential ones."""
    rng = np.random.default_rng(3)
    inputs = [(make_logits(rng, b, v, ninf=0.1), torch.full((b,), s))
              for b, v, s in [(3, 5000, 0.5), (5, 3001, -0.5), (2, 8000, 1.5), (4, 4000, -1.0)]]
    expected = [skew(x, s) for x, s in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda a: skew(*a), inputs * 2))
            for g, e in zip(got, expected * 2):
                assert torch.equal(bits(g), bits(e))


def test_numpy_route_without_kept_scratch(monkeypatch):
    """Calls above the kept-scratch size (fresh arrays) give the same bits."""
    rng = np.random.default_rng(4)
    x = make_logits(rng, 3, 5000, ninf=0.1)
    sk = f32(0.5, -0.5, 1.5)
    kept = skew(x, sk)
    monkeypatch.setattr(_skew_module, "_SCRATCH_KEEP_MAX", 100)
    assert torch.equal(bits(skew(x, sk)), bits(kept))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pipeline_draws_a_kept_token_at_large_skew(backend):
    """Through the pipeline (skew is the last stage, then the draw) on ordinary rows: at skew
    40 and 80 the processed rows have no NaN or +inf, and each drawn token is one the
    processed row keeps, with a finite log-probability (the rows of seeds 7 and 14 once gave
    NaN there and drew the last token id)."""
    from samplers import SamplerPipeline, SamplingBatch, SamplingParams
    from samplers.pipeline import triton_available

    if backend == "triton" and not triton_available():
        pytest.skip("needs the Triton kernels")
    pipe = SamplerPipeline(backend, seed=0)
    for V, seeds in ((1000, range(6, 9)), (16, range(13, 16))):
        x = torch.cat([torch.randn(1, V, generator=torch.Generator().manual_seed(s)) * 3 for s in seeds])
        batch = SamplingBatch([SamplingParams(skew=sk, seed=1) for sk in (40.0, 80.0, 80.0)], vocab_size=V)
        out = pipe.sample(x, batch, return_processed=True)
        assert not torch.isnan(out.processed).any() and not torch.isposinf(out.processed).any()
        assert torch.isfinite(out.processed.gather(1, out.token_ids[:, None])).all()
        assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()


@pytest.mark.parametrize("vocab", [7, 50, 300, 5000])
def test_tie_groups_dense_and_listed_agree_bit_for_bit(vocab):
    """The accelerators' tie rule (every position at once) and the CPU's (the tied positions'
    list) give the same bits at every position with p > 0, on tie-heavy rows (bf16 logits)
    of widths that are and are not multiples of 64, at skews that do and do not take the
    sums of the later terms: both run the same operations in the same order, vectorised
    (the list is padded to a multiple of 64 entries, as the rows are)."""
    rng = np.random.default_rng(vocab)
    x = torch.from_numpy((rng.standard_normal((5, vocab)) * 3).astype(np.float32)).bfloat16().float()
    x[0, :] = 0.0  # (one group: the whole row)
    power = torch.exp(f32(0.5, -2.0, 3.0, 25.0, 80.0))[:, None]
    p, _ = softmax_and_log_softmax(x, with_log=False)
    p_sorted = torch.sort(p, dim=-1, descending=True).values
    dense = _skew_module._with_ties_dense(_skew_module._skewed_sorted(p_sorted, power), power)
    listed = _skew_module._with_ties_listed(_skew_module._skewed_sorted(p_sorted, power), power)
    kept = torch.cat([p_sorted, torch.zeros(5, dense.shape[1] - vocab)], dim=1) > 0
    assert torch.equal(bits(dense[kept]), bits(listed[kept]))
    assert torch.isfinite(dense[kept]).all() and (dense[kept] >= 0).all()
