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


@pytest.mark.parametrize("removed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_divides_once_as_dynatemp_then_temperature_would(dtype, removed):
    """The pipeline's temperature stage divides each row once, by its dynamic temperature
    (``F.dynamic_temperature_values``) times its static one: the same bits as applying
    ``F.dynamic_temperature`` and then ``F.temperature`` (the two-pass composition), on a
    batch mixing dynatemp, static, greedy and default rows, with removed tokens or with every
    logit finite (which the chain then knows from the input rule)."""
    from samplers import SamplerPipeline, SamplingBatch, SamplingParams

    g = torch.Generator().manual_seed(3)
    V = 3000
    rows = [SamplingParams(dynatemp_min=0.5, dynatemp_max=1.5), SamplingParams(temperature=0.7),
            SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(dynatemp_min=0.0, dynatemp_max=2.0,
                                                                             dynatemp_exponent=2.0),
            SamplingParams(temperature=1.3)]
    x = (torch.randn(len(rows), V, generator=g) * 3).to(dtype)
    if removed:
        x[0, 5:] = float("-inf")
    batch = SamplingBatch(rows, vocab_size=V)
    got = SamplerPipeline("torch", seed=0).process(x, batch)
    ref = F.dynamic_temperature(x.float(), batch.param("dynatemp_min_active"), batch.param("dynatemp_max_active"),
                                batch.param("dynatemp_exponent"))
    ref = F.temperature(ref, batch.param("static_temperature")).to(dtype)
    assert torch.equal(got.float().view(torch.int32) if dtype == torch.float32 else got.view(torch.int16),
                       ref.float().view(torch.int32) if dtype == torch.float32 else ref.view(torch.int16))
    assert not torch.equal(got[0], x[0]) and not torch.equal(got[1], x[1]) and torch.equal(got[3], x[3])


# --- full-row fast paths (exp at once with the row min, the sign keep, nsigma's finiteness by sums) ---


def _hostile_rows(rng: np.random.Generator, vocab: int) -> torch.Tensor:
    """Rows for the fast-path-vs-general-path checks: ties (at the max too), -inf entries,
    all but one removed, +-0.0 and subnormals, a flat row, magnitudes whose sums or squares
    overflow float32, tiny magnitudes, a row spanning more than exp's normal range."""
    x = make_logits(rng, 12, vocab, ninf=0.0, ties=0.4, ties_at_max=True)
    x[1, : vocab // 3] = NINF
    x[2, :-1] = NINF  # one token left
    x[3, :4] = torch.tensor([-0.0, 0.0, 1e-45, -1e-45])
    x[4] = 1.25  # flat: std 0, H = log V
    x[5] *= 1e37  # squares and sums overflow
    x[5, 0], x[5, 1] = 3e38, -3e38
    x[6] *= 1e-30  # tiny
    x[7, 0] = -200.0  # z below exp's normal range
    x[8] = torch.round(x[8] * 2) / 2  # many exact ties, +-0.0 among them
    x[9, 3] = -0.0
    x[10, ::7] = NINF
    x[11] *= 60.0
    return x


@pytest.fixture
def general_path(monkeypatch):
    """Call it to send dynatemp's statistics down the general torch path: no numpy routes
    (``_numpy_ok`` false: torch's masks and counts) and no known row minimum in
    ``entropy_of_logits`` (``exp_`` on a copy of ``z``, after its own pass for the minimum)."""
    def switch():
        monkeypatch.setattr(_stats, "_numpy_ok", lambda *tensors: False)
        plain = _stats.entropy_of_logits
        monkeypatch.setattr(_stats, "entropy_of_logits",
                            lambda l32, sparse=None, overwrite=False, row_max=None, row_min=None, removed=None:
                            plain(l32, sparse, overwrite, row_max))
        import importlib

        monkeypatch.setattr(importlib.import_module("samplers.functional.temperature"), "entropy_of_logits",
                            _stats.entropy_of_logits)

    return switch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dynatemp_fast_path_equals_general_path_on_hostile_rows(dtype, general_path):
    rng = np.random.default_rng(21)
    cases = []
    for vocab in (300, 2048):
        x = _hostile_rows(rng, vocab).to(dtype)
        B = x.shape[0]
        for enabled in (torch.ones(B, dtype=torch.bool), torch.arange(B) % 3 != 1, torch.arange(B) == 5):
            params = (torch.where(enabled, 0.3, 0.0), torch.where(enabled, 2.0, 0.0), torch.where(enabled, 0.7, 1.0))
            fast = F.dynamic_temperature_values(x, *params)
            out = F.dynamic_temperature(x, *params)
            for b in range(B):  # each row alone (all rows enabled: no selection)
                alone = F.dynamic_temperature_values(x[b:b + 1].clone(), *(p[b:b + 1] for p in params))
                assert torch.equal(bits(alone), bits(fast[b:b + 1])), (vocab, b)
            assert torch.all(fast[~enabled] == 1.0)
            cases.append((x, params, fast, out))
    general_path()
    for x, params, fast, out in cases:
        assert torch.equal(bits(F.dynamic_temperature_values(x, *params)), bits(fast))
        assert torch.equal(bits(F.dynamic_temperature(x, *params)), bits(out))


def test_entropy_of_logits_with_the_row_min_equals_the_general_path(general_path):
    rng = np.random.default_rng(22)
    x = _hostile_rows(rng, 1500)
    y = x[[0, 3, 4, 6, 8, 9]]  # no -inf, narrower than exp's normal range: exp at once
    assert torch.isfinite(y).all() and bool((y.amin(-1) - y.amax(-1) > -87).all())
    m, lo = x.amax(dim=-1), x.amin(dim=-1)
    runs = {}
    for label, rows in (("x", x), ("y", y)):
        m, lo = rows.amax(dim=-1), rows.amin(dim=-1)
        for i, kw in enumerate(({}, {"row_max": m}, {"row_max": m, "row_min": lo})):
            runs[label, i, False] = (rows, kw, _stats.entropy_of_logits(rows, **kw))
            scratch = rows.clone()
            runs[label, i, True] = (rows, kw, _stats.entropy_of_logits(scratch, overwrite=True, **kw))
            assert torch.equal(bits(scratch), bits(rows - torch.where(torch.isfinite(m), m, 0)[:, None]))
    general_path()  # clone + exp_ (its band path for the row reaching -200)
    for (label, i, overwrite), (rows, kw, got) in runs.items():
        want = _stats.entropy_of_logits(rows.clone(), overwrite=overwrite, **kw)
        assert torch.equal(bits(got), bits(want)), (label, i, overwrite)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nsigma_fast_path_equals_masked_path_on_hostile_rows(dtype):
    """All-finite rows (finiteness read from the row sums; (l - mean)**2 by mse_loss; the keep
    by sign) against the masked path, which a -inf in another row of the batch forces."""
    rng = np.random.default_rng(25)
    for vocab in (300, 2048):
        x = _hostile_rows(rng, vocab)
        finite_rows = [b for b in range(x.shape[0]) if bool(torch.isfinite(x[b]).all())]
        assert len(finite_rows) >= 8
        for n_value in (0.5, 1.0, 3.0, 1e30):
            n = torch.full((x.shape[0],), n_value)
            n[4] = 0.0  # a disabled row
            masked = F.nsigma(x.to(dtype), n)  # rows 1, 2 and 10 have -inf: the masked path
            for b in finite_rows:
                alone = F.nsigma(x[b:b + 1].to(dtype).clone(), n[b:b + 1])
                assert torch.equal(bits(alone[0]), bits(masked[b])), (vocab, n_value, b)
            assert torch.equal(bits(masked[4]), bits(x[4].to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nsigma_removed_only_path_equals_masked_path(dtype, monkeypatch):
    """Rows whose only non-finite logits are -inf (a grammar's mask, a banned EOS; told by row
    sums that are finite or -inf) take the path that masks the squares once. Against the
    masked path, which a NaN row appended to the batch forces, bit for bit, with the row
    sums' overflow row left out (its sum may be +inf)."""
    import importlib

    truncation = importlib.import_module("samplers.functional.truncation")
    rng = np.random.default_rng(29)
    for vocab in (300, 2048):
        x = _hostile_rows(rng, vocab)
        x = torch.cat([x[:5], x[6:]])  # (row 5's sums overflow)
        x[0, 1::3] = NINF
        x[3, -1] = NINF
        poisoned = torch.cat([x, torch.full((1, vocab), float("nan"))]).to(dtype)
        for n_value in (0.5, 1.0, 3.0, 1e30):
            n = torch.full((x.shape[0] + 1,), n_value)
            n[4] = 0.0  # a disabled row
            masked = F.nsigma(poisoned, n)[:-1]
            with monkeypatch.context() as m:
                def no_mask(*a, **kw):
                    raise AssertionError("the masked path")
                m.setattr(truncation, "is_finite", no_mask)
                fast = F.nsigma(x.to(dtype), n[:-1])
            assert torch.equal(bits(fast), bits(masked)), (vocab, n_value)
            assert torch.equal(bits(fast[4]), bits(x[4].to(dtype)))


def test_rows_with_removed_tokens_as_a_strided_view():
    """nsigma, dynatemp and smoothing on a non-contiguous view (a transposed tensor's rows) with
    removed tokens: the index-based paths for -inf rows need contiguous rows; the view gives
    the contiguous rows' bits (``upcast`` makes the rows contiguous first: dynatemp's entropy
    is a torch sum, which adds a strided row's terms in another order)."""
    rng = np.random.default_rng(31)
    x = torch.from_numpy((rng.standard_normal((3000, 12)) * 3).astype(np.float32)).t()
    x[:, 5::97] = NINF
    x[3, :] = NINF
    x[3, 7] = 1.0  # one token left
    assert not x.is_contiguous()
    B = x.shape[0]
    lo, hi, ex = torch.full((B,), 0.5), torch.full((B,), 1.5), torch.ones(B)
    for fn in (lambda t: F.nsigma(t, torch.full((B,), 1.5)),
               lambda t: F.quadratic_smoothing(t, torch.full((B,), 0.3), torch.full((B,), 1.5)),
               lambda t: F.dynamic_temperature(t, lo, hi, ex)):
        assert torch.equal(bits(fn(x).contiguous()), bits(fn(x.contiguous())))


def test_mse_loss_squares_are_the_sub_and_pow_bits():
    """nsigma's one-pass squares: ``mse_loss(l, mean, reduction="none")`` equals
    ``(l - mean).pow_(2)`` bit for bit on finite rows (overflow to inf included)."""
    x = _hostile_rows(np.random.default_rng(27), 2048)
    x[1] = x[0] * 1e30  # squares overflow, the sum does not
    mean = x.sum(dim=-1, keepdim=True) / x.shape[1]
    x = x[torch.isfinite(mean[:, 0])]  # (as on nsigma's path: the row sums are finite)
    mean = mean[torch.isfinite(mean[:, 0])]
    mean[0] = -0.0
    got = torch.nn.functional.mse_loss(x, mean.expand_as(x), reduction="none")
    assert torch.equal(bits(got), bits((x - mean).pow_(2)))
    assert torch.isinf(got[1]).any() and x.shape[0] >= 8


def test_keep_by_sign_equals_keep_at_least_on_hostile_rows_and_thresholds():
    rng = np.random.default_rng(26)
    x = _hostile_rows(rng, 1500)
    x[0, 5] = INF  # +inf: kept by any threshold below +inf
    x[3, 9] = float("nan")
    B = x.shape[0]
    rows = torch.arange(B)
    for thr in (torch.full((B,), NINF), torch.zeros(B), torch.full((B,), -0.0), torch.full((B,), 3e38),
                torch.full((B,), -3e38), torch.full((B,), 1e-45), x[rows, torch.argmax(x, dim=-1)],
                x[rows, 7], torch.from_numpy(rng.standard_normal(B).astype(np.float32))):
        thr = torch.where(torch.isfinite(thr) | (thr == NINF), thr, torch.zeros_like(thr))  # (x[:, 7] may be -inf)
        want = _stats.fill_removed(x, x >= thr[:, None])
        got = _stats._keep_by_sign(x, thr[:, None].contiguous())
        assert torch.equal(bits(got), bits(want)), thr[:4]
        assert torch.equal(bits(_stats.keep_logits_at_least(x, x, thr)), bits(want))
        scratch = torch.empty_like(x)
        assert _stats._keep_by_sign(x, thr[:, None].contiguous(), scratch) is scratch
        # rows without NaN or +inf (-inf allowed: removed tokens): the d * inf cap and fmin
        fin = ((x > NINF) | (x == NINF)).all(dim=-1) & (x < INF).all(dim=-1)
        assert bool((x[fin] == NINF).any()) and bool(torch.isfinite(x[fin]).all(dim=-1).any())
        xf, tf = x[fin], thr[fin][:, None].contiguous()
        assert torch.equal(bits(_stats._keep_by_sign(xf, tf, finite=True)), bits(want[fin])), thr[:4]
        assert torch.equal(bits(_stats.keep_logits_at_least(xf, xf, thr[fin], finite=True)), bits(want[fin]))
    # a +inf threshold takes the boolean route (the sign of inf - inf is not defined)
    thr = torch.full((B,), INF)
    assert torch.equal(bits(_stats.keep_logits_at_least(x, x, thr)), bits(_stats.fill_removed(x, x >= INF)))


def _nsigma_threshold_f32(row: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """SEMANTICS.md's nsigma threshold of an all-finite float32 row, step by step in float32:
    ``max - n * sqrt(sum((l - mean)**2) / (N - 1))`` with ``mean = sum(l) / N``."""
    N = float(row.shape[-1])
    mean = row.sum(dim=-1, keepdim=True) / N
    std = torch.sqrt(((row - mean) ** 2).sum(dim=-1, keepdim=True) / (N - 1))
    return row.amax(dim=-1, keepdim=True) - n * std


def test_nsigma_fast_path_threshold_at_a_token_is_exact():
    """Per row an ``n`` (found by search) that puts the float32 threshold exactly on a token
    of the row: the fast path (sum finiteness, one-pass squares, keep by sign) keeps that
    token and removes the next lower one, as the step-by-step float32 threshold says; an
    ulp off in the mean, the squares or the sum of squares would move the threshold."""
    rng = np.random.default_rng(28)
    x = make_logits(rng, 16, 3000, ninf=0.0, ties=0.0) * torch.tensor([3.0, 1e-3, 1e3, 17.0] * 4)[:, None]
    x[3, 10] = -0.0
    ns, hits = [], 0
    for b in range(x.shape[0]):
        row = x[b:b + 1]
        values = torch.sort(row[0], descending=True).values
        best = torch.tensor([1.0])
        for k in (30, 100, 400):
            target = values[k]
            std = _nsigma_threshold_f32(row, torch.zeros(1, 1)) - _nsigma_threshold_f32(row, torch.ones(1, 1))
            n0 = ((values[0] - target) / std[0, 0]).reshape(1)
            for step in range(-8, 9):  # n0 and its float32 neighbours, up to 8 ulps away
                cand = n0
                for _ in range(abs(step)):
                    cand = torch.nextafter(cand, torch.tensor([np.inf if step > 0 else -np.inf]))
                if _nsigma_threshold_f32(row, cand[:, None])[0, 0] == target:
                    best, hits = cand, hits + 1
                    break
            else:
                continue
            break
        ns.append(best)
    assert hits >= 12
    n = torch.cat(ns)
    got = F.nsigma(x, n)
    thr = _nsigma_threshold_f32(x, n[:, None])
    assert torch.equal(torch.isfinite(got), x >= thr)
    assert torch.equal(bits(got[torch.isfinite(got)]), bits(x[torch.isfinite(got)]))
    assert int((x == thr).sum()) >= 12  # tokens exactly at the threshold, kept
