"""Tests for samplers/functional/temperature.py (temperature, dynamic temperature, smoothing).

1. hand-computed values (arithmetic written out);
2. agreement with an independent float64 numpy re-implementation on random heterogeneous
   batches with -inf entries and ties;
3. hypothesis properties: disabled -> bit-identical, batch independence, -inf stays -inf,
   finite stays finite, order of tokens preserved where the transform is monotone;
4. fp16 / bf16 inputs keep their dtype (and saturate instead of overflowing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.functional.temperature import dynamic_temperature, quadratic_smoothing, temperature

from logit_helpers import bits, make_logits

NEG_INF = float("-inf")
HYP = settings(max_examples=40, deadline=None, derandomize=True)


def f32(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# --------------------------------------------------------------- numpy references


GREEDY = np.float32(1e-5)  # the threshold, compared in fp32 like the per-row parameter tensors


def ref_temperature(row: np.ndarray, t: float) -> np.ndarray:
    if t == 1.0 or np.float32(t) < GREEDY:
        return row.copy()
    return row / t


def ref_dynatemp(row: np.ndarray, lo: float, hi: float, ex: float) -> np.ndarray:
    if lo == 0 and hi == 0:
        return row.copy()
    fin = row[np.isfinite(row)]
    n = len(fin)
    if n <= 1:
        t = lo
    else:
        q = np.exp(fin - fin.max())
        q /= q.sum()
        q = q[q > 0]
        h = -(q * np.log(q)).sum()
        t = lo + (hi - lo) * min(max(h / math.log(n), 0.0), 1.0) ** ex
    t = max(t, float(GREEDY))
    return row / t


def ref_smoothing(row: np.ndarray, f: float, c: float) -> np.ndarray:
    if f == 0:
        return row.copy()
    out = row.copy()
    fin = np.isfinite(row)
    if not fin.any():
        return out
    m = row[fin].max()
    k = f * (3 - c) / 2
    s = f * (c - 1) / 2
    for i in np.nonzero(fin)[0]:
        d = row[i] - m
        out[i] = m - k * d ** 2 + s * d ** 3
    return out


def assert_rows_close(out: torch.Tensor, ref: np.ndarray, rtol=1e-5, atol=1e-5):
    got = out.double().numpy()
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=rtol, atol=atol)


# ------------------------------------------------------------ 1. hand-computed values


def test_temperature_hand():
    l = torch.tensor([[1.0, 2.0, NEG_INF]] * 5)
    out = temperature(l, f32(0.5, 2.0, 1.0, 0.0, 1e-6))
    # T=.5: [1/.5, 2/.5] = [2, 4]; T=2: [.5, 1]; T=1: unchanged; T=0 and T=1e-6 < 1e-5:
    # greedy rows, unchanged (the draw takes their argmax)
    assert out[0].tolist() == [2.0, 4.0, NEG_INF]
    assert out[1].tolist() == [0.5, 1.0, NEG_INF]
    for b in (2, 3, 4):
        assert torch.equal(bits(out[b]), bits(l[b]))


def test_temperature_greedy_boundary():
    l = torch.tensor([[1.0, 2.0]] * 2)
    t = f32(1e-5, 9.9e-6)
    out = temperature(l, t)
    # exactly 1e-5 is not greedy: 1 / 1e-5 = 1e5 (in fp32: l / fp32(1e-5))
    assert torch.equal(out[0], l[0] / t[0])
    assert torch.equal(out[1], l[1])


def test_temperature_one_is_bit_identical_even_for_negative_zero():
    l = torch.tensor([[-0.0, 1.0, NEG_INF], [-0.0, 1.0, NEG_INF]])
    out = temperature(l, f32(1.0, 2.0))
    assert torch.equal(bits(out[0]), bits(l[0]))
    assert out[1, 1].item() == 0.5


def test_dynatemp_hand():
    probs = [0.5, 0.3, 0.15, 0.05]
    row = [math.log(q) for q in probs]
    l = torch.tensor([row, [0.0, 0.0, 0.0, 0.0], [3.0, NEG_INF, NEG_INF, NEG_INF], row, row,
                      [1.0, NEG_INF, NEG_INF, NEG_INF]])
    out = dynamic_temperature(l, f32(0.5, 0.5, 0.5, 0.0, 0.7, 0.0), f32(1.5, 1.5, 1.5, 0.0, 0.7, 0.1),
                              f32(2.0, 1.0, 1.0, 1.0, 3.0, 1.0))
    # row0: H = .34657 + .36119 + .28457 + .14979 = 1.14212, log 4 = 1.38629,
    #       ratio = .82387, ** 2 = .67876, T = .5 + 1 * .67876 = 1.17876
    h = -sum(q * math.log(q) for q in probs)
    t0 = 0.5 + 1.0 * (h / math.log(4)) ** 2
    assert t0 == pytest.approx(1.17876, abs=1e-5)
    assert torch.allclose(out[0], l[0] / t0, rtol=1e-6)
    # row1: uniform, H = log 4, ratio 1 -> T = max = 1.5: 0 / 1.5 = 0
    assert out[1].tolist() == [0.0] * 4
    # row2: one finite token (N = 1) -> T = min = .5: 3 / .5 = 6
    assert out[2].tolist() == [6.0, NEG_INF, NEG_INF, NEG_INF]
    # row3: min = max = 0 -> disabled, bit-identical
    assert torch.equal(bits(out[3]), bits(l[3]))
    # row4: min = max = .7 -> T = .7 whatever the entropy
    assert torch.allclose(out[4], l[4] / 0.7, rtol=1e-6)
    # row5: N = 1 -> T = min = 0 < 1e-5 -> T = 1e-5: 1 / 1e-5 = 1e5
    assert out[5, 0].item() == pytest.approx(1e5, rel=1e-6)


def test_smoothing_hand():
    l = torch.tensor([[2.0, 1.0, -1.0, NEG_INF]] * 4)
    out = quadratic_smoothing(l, f32(0.5, 0.5, 0.0, 1.0), f32(1.0, 2.0, 1.0, 3.0))
    # row0: f=.5, c=1: k = .5*(3-1)/2 = .5, s = 0; d = [0, -1, -3]: 2 - .5*d^2 = [2, 1.5, -2.5]
    assert out[0].tolist() == [2.0, 1.5, -2.5, NEG_INF]
    # row1: f=.5, c=2: k = .5*1/2 = .25, s = .5*1/2 = .25:
    #   d=-1: 2 - .25 - .25 = 1.5; d=-3: 2 - .25*9 + .25*(-27) = 2 - 2.25 - 6.75 = -7
    assert out[1].tolist() == [2.0, 1.5, -7.0, NEG_INF]
    # row2: f=0 disabled
    assert torch.equal(bits(out[2]), bits(l[2]))
    # row3: f=1, c=3: k = 0, s = 1: 2 + d^3 = [2, 1, -25]
    assert out[3].tolist() == [2.0, 1.0, -25.0, NEG_INF]


def test_all_neg_inf_rows_no_nan():
    l = torch.full((2, 4), NEG_INF)
    for out in (temperature(l, f32(0.5, 2.0)),
                dynamic_temperature(l, f32(0.5, 0.0), f32(1.5, 1.0), f32(1.0, 1.0)),
                quadratic_smoothing(l, f32(0.5, 1.0), f32(1.0, 2.0))):
        assert torch.isneginf(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saturation_instead_of_overflow(dtype):
    big = torch.finfo(dtype).max
    l = torch.tensor([[10.0, -10.0, NEG_INF], [10.0, -10.0, NEG_INF]], dtype=dtype)
    out = temperature(l, f32(1e-5, 0.5))
    # fp16: 10 / 1e-5 = 1e6 > 65504: saturates at +-65504 rather than becoming +-inf
    if dtype == torch.float16:
        assert out[0].tolist() == [big, -big, NEG_INF]
    assert out[1].tolist() == [20.0, -20.0, NEG_INF]
    sm = quadratic_smoothing(torch.tensor([[0.0, -300.0]], dtype=dtype), f32(1.0), f32(1.0))
    # 0 - 1 * 300^2 = -90000: below fp16's range -> -65504 in fp16 (finite: not removed)
    assert torch.isfinite(sm).all()


# ------------------------------------------------ 2. independent numpy re-implementation


def test_temperature_matches_reference():
    rng = np.random.default_rng(0)
    for vocab in (1, 5, 100, 300):
        l = make_logits(rng, 8, vocab)
        t = f32(*np.float32(rng.choice([0.0, 1e-6, 0.1, 0.7, 1.0, 1.3, 5.0], 8)))
        out = temperature(l, t)
        rows = l.double().numpy()
        for b in range(8):
            assert_rows_close(out[b], ref_temperature(rows[b], float(t[b])), rtol=1e-6, atol=0)


def test_dynatemp_matches_reference():
    rng = np.random.default_rng(1)
    for vocab in (1, 2, 5, 100, 300):
        for scale in (0.3, 3.0):
            l = make_logits(rng, 8, vocab, scale=scale, ninf=rng.choice([0.0, 0.3, 0.9]))
            lo = np.float32(rng.choice([0.0, 0.1, 0.5, 1.0], 8))
            hi = np.float32(rng.choice([0.0, 0.3, 1.5, 3.0], 8))
            ex = np.float32(rng.choice([0.5, 1.0, 2.0], 8))
            out = dynamic_temperature(l, torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(ex))
            rows = l.double().numpy()
            for b in range(8):
                ref = ref_dynatemp(rows[b], float(lo[b]), float(hi[b]), float(ex[b]))
                assert_rows_close(out[b], ref, rtol=1e-4, atol=1e-4)


def test_smoothing_matches_reference():
    rng = np.random.default_rng(2)
    for vocab in (1, 3, 100, 300):
        l = make_logits(rng, 8, vocab, scale=2.0)
        f = np.float32(rng.choice([0.0, 0.1, 0.5, 2.0], 8))
        c = np.float32(rng.choice([1.0, 1.5, 2.5, 4.0], 8))
        out = quadratic_smoothing(l, torch.from_numpy(f), torch.from_numpy(c))
        rows = l.double().numpy()
        for b in range(8):
            ref = ref_smoothing(rows[b], float(f[b]), float(c[b]))
            assert_rows_close(out[b], ref, rtol=1e-5, atol=1e-3)


def _smoothing_as_written(l32: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """SEMANTICS.md's smoothing in float32, each operation as the formula writes it
    (``max - k * d**2 + s * d**3``, d**3 as ``d**2 * d``), on finite logits; -inf stays."""
    k = (f * (3.0 - c) / 2.0)[:, None]
    s = (f * (c - 1.0) / 2.0)[:, None]
    m = torch.where(torch.isfinite(l32), l32, torch.tensor(float("-inf"))).amax(dim=-1, keepdim=True)
    d = torch.where(torch.isfinite(l32), l32, torch.zeros(())) - m
    d2 = d * d
    out = m - k * d2 + s * (d2 * d)
    out = torch.where(torch.isfinite(l32), out, torch.tensor(float("-inf")))
    return torch.where((f != 0)[:, None], out, l32)


@pytest.mark.parametrize("with_removed", [False, True])
def test_smoothing_bits_are_the_formula_as_written(with_removed):
    """The in-place evaluation (two buffers, products and sums reordered only where IEEE
    arithmetic commutes) gives the bits of the formula evaluated as written, signed zeros
    included, on all-finite rows and on rows with removed tokens."""
    rng = np.random.default_rng(44 + with_removed)
    l = make_logits(rng, 12, 3000, scale=4.0, ninf=0.0)
    l[0] = torch.round(l[0])  # exact ties and zeros
    l[1, :5] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 0.0])
    l[1, 5:] = -torch.rand(l.shape[1] - 5)  # max +0.0
    l[2, :] = -0.0  # a row of -0.0: the max is -0.0, d = +0.0 everywhere
    l[3] *= 1e5  # large d**3
    if with_removed:
        l[4:, ::7] = float("-inf")
        l[5, 1:] = float("-inf")  # one token left
    f = torch.tensor([0.3, 1.0, 0.5, 2.0, 0.0, 0.7, 0.25, 3.0, 0.1, 0.6, 1.5, 0.2])
    c = torch.tensor([1.0, 1.0, 2.0, 1.5, 1.0, 4.0, 2.5, 1.0, 3.0, 1.0, 2.0, 1.2])
    got = quadratic_smoothing(l, f, c)
    assert torch.isfinite(got[~torch.isinf(l)]).all()
    assert torch.equal(bits(got), bits(_smoothing_as_written(l, f, c)))


# ---------------------------------------------------------------- 3. hypothesis properties

_fl = lambda lo, hi: st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)  # noqa: E731


@st.composite
def logit_batches(draw, max_batch=5, max_vocab=64):
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    ninf = draw(st.sampled_from([0.0, 0.3, 0.9]))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    return make_logits(np.random.default_rng(seed), batch, vocab, ninf=ninf, scale=scale)


def row_params(draw, batch, strategy):
    return torch.tensor(draw(st.lists(strategy, min_size=batch, max_size=batch)), dtype=torch.float32)


def _common_checks(fn, logits, params, disabled):
    before = logits.clone()
    out = fn(logits, *params)
    assert torch.equal(bits(logits), bits(before))
    assert out.dtype == logits.dtype and out.shape == logits.shape
    assert not torch.isnan(out).any()
    # -inf stays -inf, finite stays finite
    assert torch.equal(torch.isneginf(out), torch.isneginf(logits))
    assert torch.isfinite(out[torch.isfinite(logits)]).all()
    for b in range(logits.shape[0]):
        alone = fn(logits[b:b + 1].clone(), *[p[b:b + 1].clone() for p in params])
        assert torch.equal(bits(alone[0]), bits(out[b]))
        if disabled[b]:
            assert torch.equal(bits(out[b]), bits(logits[b]))
    return out


def _assert_order_preserved(logits, out):
    # a monotone non-decreasing transform: l(i) > l(j) => out(i) >= out(j); the top stays on top
    for b in range(logits.shape[0]):
        fin = torch.isfinite(logits[b])
        l, o = logits[b][fin], out[b][fin]
        order = torch.argsort(l, stable=True)
        assert torch.all(o[order][1:] >= o[order][:-1])


@HYP
@given(logits=logit_batches(), data=st.data())
def test_prop_temperature(logits, data):
    b = logits.shape[0]
    t = row_params(data.draw, b, st.one_of(st.sampled_from([0.0, 1e-6, 1.0]), _fl(1e-5, 10.0)))
    disabled = [(x == 1.0 or np.float32(x) < GREEDY) for x in t.tolist()]
    out = _common_checks(temperature, logits, [t], disabled)
    _assert_order_preserved(logits, out)


@HYP
@given(logits=logit_batches(), data=st.data())
def test_prop_dynamic_temperature(logits, data):
    b = logits.shape[0]
    lo = row_params(data.draw, b, st.one_of(st.just(0.0), _fl(0.0, 2.0)))
    hi = row_params(data.draw, b, st.one_of(st.just(0.0), _fl(0.0, 4.0)))
    ex = row_params(data.draw, b, _fl(0.1, 4.0))
    disabled = [(x == 0 and y == 0) for x, y in zip(lo.tolist(), hi.tolist())]
    out = _common_checks(dynamic_temperature, logits, [lo, hi, ex], disabled)
    _assert_order_preserved(logits, out)


@HYP
@given(logits=logit_batches(), data=st.data())
def test_prop_quadratic_smoothing(logits, data):
    b = logits.shape[0]
    f = row_params(data.draw, b, st.one_of(st.just(0.0), _fl(0.0, 5.0)))
    c = row_params(data.draw, b, _fl(1.0, 3.0))  # c in [1, 3]: the transform is monotone
    disabled = [x == 0 for x in f.tolist()]
    out = _common_checks(quadratic_smoothing, logits, [f, c], disabled)
    _assert_order_preserved(logits, out)
    # the top token keeps its logit (d = 0)
    top = logits == logits.amax(dim=-1, keepdim=True)
    assert torch.equal(out[top], logits[top])


def test_dynamic_temperature_of_a_row_does_not_depend_on_the_batch():
    """``T = min + (max - min) * ratio ** exponent`` is a [B] pow: torch's CPU loop raises the
    last ``B mod 32`` entries with the scalar ``pow``, an ulp off the vector one for ~1% of
    operands, so a row alone (in the tail) and among the first rows of a large batch (vector
    lanes) got temperatures an ulp apart (10 of 2000 rows here before ``pow_per_entry``)."""
    from samplers.functional.temperature import dynamic_temperature_values

    g = torch.Generator().manual_seed(1)
    b, v = 2000, 16
    x = torch.randn(b, v, generator=g) * 3
    lo, hi = torch.full((b,), 0.5), torch.full((b,), 1.7)
    ex = 0.3 + torch.rand(b, generator=g) * 3
    together = dynamic_temperature_values(x, lo, hi, ex)
    alone = torch.cat([dynamic_temperature_values(x[r:r + 1], lo[r:r + 1], hi[r:r + 1], ex[r:r + 1])
                       for r in range(b)])
    assert torch.equal(bits(alone), bits(together))


def test_pow_per_entry_depends_on_its_operands_alone():
    """Each entry is the vector ``pow`` of its own operands, at any length, offset, shape and
    thread count (plain ``torch.pow`` fails the first check wherever its scalar tail rounds
    otherwise than its vector body, as on the x86 CPUs of this project's machines)."""
    from samplers.functional._stats import pow_per_entry

    g = torch.Generator().manual_seed(0)
    base = 1 + torch.rand(70000, generator=g) * 4  # (more than one 16384-entry call)
    ex = torch.randint(-5, 60, (70000,), generator=g).float() + torch.rand(70000, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = pow_per_entry(base, ex)
    finally:
        torch.set_num_threads(before)
    singles = torch.cat([pow_per_entry(base[i:i + 1], ex[i:i + 1]) for i in range(2000)])
    assert torch.equal(bits(singles), bits(full[:2000]))
    grid = pow_per_entry(base[:50, None], ex[None, :70])  # broadcast: [50, 70]
    assert torch.equal(bits(grid[7]), bits(pow_per_entry(base[7].expand(70), ex[:70])))
    assert torch.allclose(full, torch.pow(base, ex), rtol=2e-7, atol=0)


# ------------------------------------------------------------------ 4. fp16 / bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    rng = np.random.default_rng(5)
    l32 = make_logits(rng, 4, 50)
    l = l32.to(dtype)
    cases = [
        (temperature, [f32(0.5, 1.0, 0.0, 2.0)]),
        (dynamic_temperature, [f32(0.5, 0.0, 0.2, 1.0), f32(1.5, 0.0, 0.9, 1.0), f32(1.0, 1.0, 2.0, 0.5)]),
        (quadratic_smoothing, [f32(0.3, 0.0, 1.0, 2.0), f32(1.0, 1.0, 2.0, 1.5)]),
    ]
    for fn, params in cases:
        out = fn(l, *params)
        assert out.dtype == dtype and out.shape == l.shape
        # same as computing on the exactly upcast input in fp32, then rounding once
        ref = fn(l.float(), *params).to(dtype)
        assert torch.equal(out, ref)
