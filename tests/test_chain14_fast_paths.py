"""The CPU speed paths of dynamic temperature and nsigma (issue 15, the 14-sampler chain).

- ``_stats.entropy_of_logits`` (one ``exp`` pass: ``H = log S - sum(e z) / S``) against a
  float64 numpy entropy and against the two-pass ``entropy(softmax, log_softmax)``;
- ``dynamic_temperature`` computes the statistics of the enabled rows only and skips the
  saturation and row-selection passes when they provably change nothing: each row of a mixed
  batch equals that row processed alone (bit for bit), disabled rows come back bit-identical
  (NaN payloads, -0.0 and infinities included), large magnitudes still saturate;
- ``_stats.keep_logits_at_least`` (numpy comparison + ``fill_removed``) equals
  ``keep_at_least`` bit for bit, and nsigma's finiteness test by row min / max gives the
  results of the masked path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samplers.functional as F
from samplers.functional import _stats

from logit_helpers import bits, make_logits

NINF, INF = float("-inf"), float("inf")
FMAX = torch.finfo(torch.float32).max


def _np_entropy(row: np.ndarray) -> float:
    fin = row[np.isfinite(row)]
    if fin.size == 0:
        return 0.0
    q = np.exp(fin - fin.max())
    q /= q.sum()
    q = q[q > 0]
    return float(-(q * np.log(q)).sum())


def _entropy_rows() -> torch.Tensor:
    rng = np.random.default_rng(0)
    rows = [make_logits(rng, 6, 300, ninf=0.3, ties=0.4, ties_at_max=True)]
    rows.append(torch.tensor([[NINF] * 299 + [2.0]]))  # one finite token: H = 0
    rows.append(torch.tensor([[1.5] * 300]))  # flat: H = log 300
    rows.append(torch.full((1, 300), NINF))  # nothing left: H = 0, no NaN
    big = np.float32(rng.standard_normal(300) * 1e3)  # most e underflow to 0 (0 * z terms)
    rows.append(torch.from_numpy(big)[None])
    huge = np.float32(rng.standard_normal(300) * 1e37)  # z spans near the float32 range
    rows.append(torch.from_numpy(huge)[None])
    return torch.cat(rows)


def test_entropy_of_logits_matches_float64_and_the_two_pass_entropy():
    x = _entropy_rows()
    h = _stats.entropy_of_logits(x)
    p, logp = _stats.softmax_and_log_softmax(x)
    two_pass = _stats.entropy(p, logp)
    ref = np.array([_np_entropy(r) for r in x.double().numpy()])
    assert h.dtype == torch.float32 and h.shape == (x.shape[0],)
    assert torch.isfinite(h).all()
    np.testing.assert_allclose(h.double().numpy(), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(h, two_pass, rtol=2e-6, atol=2e-6)
    assert h[6].item() == 0.0 and h[8].item() == 0.0
    assert abs(h[7].item() - np.log(300)) < 2e-6
    # the caller's row max and buffer: the same bits (and the buffer then holds l - max)
    scratch = x.clone()
    again = _stats.entropy_of_logits(scratch, overwrite=True, row_max=x.amax(dim=-1))
    assert torch.equal(bits(again), bits(h))
    m = torch.where(torch.isfinite(x.amax(dim=-1)), x.amax(dim=-1), torch.zeros(x.shape[0]))
    assert torch.equal(bits(scratch), bits(x - m[:, None]))


def _ref_dynatemp(row: np.ndarray, lo: float, hi: float, ex: float) -> np.ndarray:
    if lo == 0 and hi == 0:
        return row.copy()
    fin = row[np.isfinite(row)]
    t = lo if fin.size <= 1 else lo + (hi - lo) * min(max(_np_entropy(row) / np.log(fin.size), 0.0), 1.0) ** ex
    with np.errstate(over="ignore"):
        out = row / max(t, 1e-5)
    return np.where(np.isfinite(row), np.clip(out, -FMAX, FMAX), row)


def _mixed_batch(dtype: torch.dtype):
    rng = np.random.default_rng(3)
    x = make_logits(rng, 8, 2000, ninf=0.0, ties=0.3, ties_at_max=True)
    x[1, :1500] = NINF  # enabled row with removed tokens
    x[2, 5] = -0.0  # disabled rows: -0.0, infinities, a signalling NaN must keep their bits
    x[4, 7], x[4, 8] = NINF, INF
    x.view(torch.int32)[6, 11] = 0x7F800001  # a signalling NaN (x / 1 would quiet it)
    x[7, :1999] = NINF  # enabled row with a single token: T = min
    lo = torch.tensor([0.5, 0.3, 0.0, 1.0, 0.0, 0.2, 0.0, 0.7])
    hi = torch.tensor([1.5, 2.0, 0.0, 1.0, 0.0, 3.0, 0.0, 1.7])
    ex = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    return x.to(dtype), lo, hi, ex


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dynatemp_mixed_batch_rows_alone_disabled_bits_and_reference(dtype):
    x, lo, hi, ex = _mixed_batch(dtype)
    out = F.dynamic_temperature(x, lo, hi, ex)
    assert out.dtype == dtype and out.shape == x.shape
    for b in range(x.shape[0]):
        alone = F.dynamic_temperature(x[b:b + 1].clone(), lo[b:b + 1], hi[b:b + 1], ex[b:b + 1])
        assert torch.equal(bits(out[b]), bits(alone[0])), b
        if lo[b] == 0 and hi[b] == 0:
            assert torch.equal(bits(out[b]), bits(x[b])), b
    assert out[7, -1].item() == pytest.approx(x[7, -1].float().item() / 0.7, rel=1e-2)
    if dtype == torch.float32:
        rows = x.double().numpy()
        for b in (0, 1, 3, 5, 7):
            ref = _ref_dynatemp(rows[b], float(lo[b]), float(hi[b]), float(ex[b]))
            got = out[b].double().numpy()
            assert np.array_equal(np.isneginf(got), np.isneginf(ref))
            fin = np.isfinite(ref)
            np.testing.assert_allclose(got[fin], ref[fin], rtol=2e-5, atol=1e-5)
    else:  # the exactly upcast input in fp32, rounded once
        assert torch.equal(bits(out), bits(F.dynamic_temperature(x.float(), lo, hi, ex).to(dtype)))


def test_dynatemp_nan_in_an_enabled_row_only():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, -0.0, 3.0]])
    out = F.dynamic_temperature(x, torch.tensor([0.5, 0.0]), torch.tensor([1.5, 0.0]), torch.ones(2))
    assert torch.equal(bits(out[1]), bits(x[1]))


def test_dynatemp_large_magnitudes_saturate():
    # min = max: T is min exactly; 3e38 / 0.01 overflows and saturates, -inf stays -inf
    x = torch.tensor([[3e38, -3e38, 1.0, NINF], [3e38, -3e38, 1.0, 2.0], [1e37, 2.0, 3.0, 4.0]])
    t = torch.tensor([0.01, 0.0, 0.01])
    out = F.dynamic_temperature(x, t, t, torch.ones(3))
    assert out[0].tolist() == [FMAX, -FMAX, np.float32(1.0) / np.float32(0.01), NINF]
    assert torch.equal(bits(out[1]), bits(x[1]))  # disabled
    assert out[2, 0].item() == FMAX and out[2, 1].item() == pytest.approx(200.0)


def test_dynatemp_all_rows_disabled_is_a_copy():
    x = make_logits(np.random.default_rng(1), 4, 50)
    z = torch.zeros(4)
    out = F.dynamic_temperature(x, z, z, torch.ones(4))
    assert torch.equal(bits(out), bits(x)) and out.data_ptr() != x.data_ptr()


def _thresholds(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per row: a logit of the row (a tie at the threshold), -inf (disabled), 0.0, or a value
    between two logits."""
    out = []
    for b in range(x.shape[0]):
        fin = x[b][torch.isfinite(x[b])]
        kind = b % 4
        if kind == 0 and fin.numel():
            out.append(float(fin[int(rng.integers(0, fin.numel()))]))
        elif kind == 1:
            out.append(NINF)
        elif kind == 2:
            out.append(0.0)
        else:
            out.append(float(rng.standard_normal()))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_keep_logits_at_least_equals_keep_at_least(dtype):
    rng = np.random.default_rng(7)
    for trial in range(6):
        x = make_logits(rng, 8, 1500, ninf=[0.0, 0.5, 0.95][trial % 3], ties=0.5, ties_at_max=True)
        x = torch.round(x * 2) / 2  # many exact ties, +-0.0 among them
        x[0, :7] = -0.0
        x[2, :5] = -0.0  # -0.0 against a +0.0 threshold: kept
        x[3, 3] = float("nan")
        x[5] = NINF  # a row with nothing left
        x = x.to(dtype)
        l32 = x.float()
        thr = _thresholds(l32, rng)
        want = _stats.keep_at_least(x, l32, thr)
        got = _stats.keep_logits_at_least(x, l32, thr)
        assert got.dtype == dtype and torch.equal(bits(got), bits(want)), trial
        assert torch.equal(bits(got[1]), bits(x[1]))  # threshold -inf: bit-identical


def test_nsigma_rows_with_and_without_removed_tokens_match_rows_alone():
    """One row with -inf sends the batch through the masked path: every row must still get
    the result it gets alone (where it may take the all-finite path)."""
    rng = np.random.default_rng(11)
    x = make_logits(rng, 6, 3000, ninf=0.0, ties=0.3)
    x[2, :100] = NINF
    x[4, 10] = INF  # +inf counts as not finite (it reads as 0 in the statistics)
    n = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 0.0])
    out = F.nsigma(x, n)
    for b in range(6):
        alone = F.nsigma(x[b:b + 1].clone(), n[b:b + 1])
        assert torch.equal(bits(out[b]), bits(alone[0])), b
    assert torch.equal(bits(out[5]), bits(x[5]))
    # against float64: keep l >= max - n * std over the finite logits (rows 0, 1, 3: all
    # finite; row 2: 100 removed tokens)
    for b in (0, 1, 2, 3):
        row = x[b].double().numpy()
        fin = row[np.isfinite(row)]
        thr = fin.max() - float(n[b]) * fin.std(ddof=1)
        assert np.abs(fin - thr).min() > 1e-4  # no token within rounding of the threshold
        assert np.array_equal(torch.isfinite(out[b]).numpy(), row >= thr), b


def test_xtc_without_a_processed_row_returns_a_copy():
    x = make_logits(np.random.default_rng(5), 3, 2000, ninf=0.95)
    x = x * 4  # peaked rows: several tokens above the threshold
    thr, prob = torch.full((3,), 0.05), torch.tensor([0.5, 0.0, 1.0])
    out = F.xtc(x, thr, prob, torch.tensor([0.5, 0.0, 1.0]))  # coin >= probability everywhere
    assert torch.equal(bits(out), bits(x)) and out.data_ptr() != x.data_ptr()
    processed = F.xtc(x, thr, prob, torch.tensor([0.4, 0.0, 0.5]))  # row 0's coin comes up
    assert torch.isneginf(processed[0]).sum() > torch.isneginf(x[0]).sum()
    assert torch.equal(bits(processed[1:]), bits(x[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_divides_once_as_dynatemp_then_temperature_would(dtype):
    """The pipeline's temperature stage divides each row once, by its dynamic temperature
    (``F.dynamic_temperature_values``) times its static one: the same bits as applying
    ``F.dynamic_temperature`` and then ``F.temperature`` (the two-pass composition), on a
    batch mixing dynatemp, static, greedy and default rows, with removed tokens."""
    from samplers import SamplerPipeline, SamplingBatch, SamplingParams

    g = torch.Generator().manual_seed(3)
    V = 3000
    rows = [SamplingParams(dynatemp_min=0.5, dynatemp_max=1.5), SamplingParams(temperature=0.7),
            SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(dynatemp_min=0.0, dynatemp_max=2.0,
                                                                             dynatemp_exponent=2.0),
            SamplingParams(temperature=1.3)]
    x = (torch.randn(len(rows), V, generator=g) * 3).to(dtype)
    x[0, 5:] = float("-inf")
    batch = SamplingBatch(rows, vocab_size=V)
    got = SamplerPipeline("torch", seed=0).process(x, batch)
    ref = F.dynamic_temperature(x.float(), batch.param("dynatemp_min_active"), batch.param("dynatemp_max_active"),
                                batch.param("dynatemp_exponent"))
    ref = F.temperature(ref, batch.param("static_temperature")).to(dtype)
    assert torch.equal(got.float().view(torch.int32) if dtype == torch.float32 else got.view(torch.int16),
                       ref.float().view(torch.int32) if dtype == torch.float32 else ref.view(torch.int16))
    assert not torch.equal(got[0], x[0]) and not torch.equal(got[1], x[1]) and torch.equal(got[3], x[3])
