"""top_p on full rows finds its nucleus among candidates (``truncation._top_p_by_candidates``):
the same tensor, bit for bit, as sorting the full rows, on every kind of row, and the rule's
kept set against an independent numpy implementation.

The candidates are the tokens at least as likely as a threshold sampled from each row; a row
is decided by them only when they hold ``top_p`` of its mass and its boundary lies above
the least likely of them; other rows are sorted in full. The full sort is forced by
making the sample coarser than any row (``_CANDIDATE_SAMPLE``), which refuses the candidates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional import _stats
from samplers.functional import truncation as T
from logit_helpers import bits

KINDS = ["normal", "peaky", "flat", "ties", "truncated", "mixed_rows", "off_grid", "trend"]


def _spy(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _full_sort(monkeypatch, x: torch.Tensor, tp: torch.Tensor) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(T, "_CANDIDATE_SAMPLE", 10**12)  # (a step of 0: the candidates are refused)
        return F.top_p(x, tp)


def _rows(rng: np.random.Generator, B: int, V: int, kind: str) -> np.ndarray:
    x = (rng.standard_normal((B, V)) * rng.uniform(0.5, 5.0)).astype(np.float32)
    if kind == "peaky":  # one token with most of the mass, a few with some
        x[np.arange(B), rng.integers(0, V, B)] += 25.0
        x[:, rng.integers(0, V, 5)] += 18.0
    elif kind == "flat":  # a nucleus of most of the row: sorted in full
        x *= np.float32(0.05)
    elif kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "truncated":  # mostly -inf, as a truncation leaves rows
        x[rng.random((B, V)) < 0.9] = -np.inf
    elif kind == "mixed_rows":  # top_k on some rows of a serving batch, not on others
        cut = rng.random(B) < 0.5
        kth = -np.sort(-x, axis=-1)[:, 150]
        x[cut] = np.where(x[cut] > kth[cut, None], x[cut], np.float32(-np.inf))
    elif kind == "off_grid":  # likely tokens where the strided sample never looks
        step = V // T._CANDIDATE_SAMPLE
        off = np.arange(V) % step != 0
        x[:, off] += np.where(rng.random((B, int(off.sum()))) < 0.01, np.float32(9.0), np.float32(0.0))
    elif kind == "trend":
        x += np.linspace(-6.0, 6.0, V, dtype=np.float32)
    return x


def _numpy_top_p(x: np.ndarray, tp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule re-implemented in float64: keep t iff the mass of the tokens more likely than t
    is < top_p. Also where the float32 computation may decide either way (that mass within
    1e-5 of top_p, or t's probability within 1e-6 relative of the boundary's)."""
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, -1)
    before = np.cumsum(ps, axis=-1) - ps  # mass strictly before each sorted position
    keep = np.zeros_like(p, dtype=bool)
    close = np.zeros_like(keep)
    for b in range(x.shape[0]):
        if tp[b] >= 1.0:
            keep[b] = True
            continue
        n = max(1, int(np.count_nonzero(before[b] < tp[b])))
        boundary = ps[b, n - 1]
        keep[b] = p[b] >= boundary
        near_mass = np.abs(before[b] - tp[b]) < 1e-5
        close[b, order[b][near_mass]] = True
        close[b] |= np.abs(p[b] - boundary) <= 1e-6 * boundary
    return keep, close


def run_cases(monkeypatch, rng: np.random.Generator, kind: str, sampler, route: str, full, rule, params) -> list[bool]:
    """For rows of ``kind`` at three shapes and every parameter set of ``params(rng, B)``:
    ``sampler`` equals ``full`` bit for bit, and its kept set is ``rule``'s wherever ``rule``
    is not close to its threshold. Returns, call by call, whether the candidates (``route``,
    a function of the truncation module) decided it."""
    calls = _spy(monkeypatch, T, route)
    used = []
    for B, V in [(1, 4096), (5, 8192), (3, 20000)]:
        x = _rows(rng, B, V, kind)
        for p in params(rng, B):
            xt, pt = torch.from_numpy(x), torch.from_numpy(p.astype(np.float32))
            calls.clear()
            fast = sampler(xt, pt)
            used.append(bool(calls) and calls[-1][1] is not None)
            assert torch.equal(bits(fast), bits(full(monkeypatch, xt, pt))), (kind, B, V, p)
            keep, close = rule(x, p.astype(np.float32).astype(np.float64))
            got = fast.numpy() > -np.inf
            # (-inf logits are never kept: probability 0)
            assert not ((got != (keep & (x > -np.inf))) & ~close).any(), (kind, B, V, p)
    return used


@pytest.mark.parametrize("kind", KINDS)
def test_top_p_candidates_equal_the_full_sort(kind, monkeypatch):
    decided = run_cases(monkeypatch, np.random.default_rng(KINDS.index(kind)), kind, F.top_p,
                        "_top_p_by_candidates", _full_sort, _numpy_top_p,
                        lambda rng, B: (np.full(B, 0.95), rng.uniform(0.05, 0.999, B),
                                        rng.choice([0.5, 0.9, 1.0], B), np.full(B, 0.01)))
    if kind == "flat":
        assert not all(decided)  # wide nuclei: sorted in full
    elif kind == "truncated":
        assert not any(decided)  # rows mostly -inf are packed (compact_rows) before any candidates
    else:
        assert sum(decided) >= len(decided) // 2, decided


def test_rows_the_candidates_miss_are_sorted_in_full(monkeypatch):
    """A batch of peaky rows (few candidates) and flat ones (a wide nucleus): one call decides
    the first from their candidates and sorts the others in full, with the full sort's values."""
    rng = np.random.default_rng(7)
    x = np.concatenate([_rows(rng, 3, 16384, "peaky"), _rows(rng, 3, 16384, "flat")])
    x = x[[0, 3, 1, 4, 2, 5]]
    tp = torch.full((6,), 0.9)
    full_rows = _spy(monkeypatch, T, "_top_p_threshold")
    calls = _spy(monkeypatch, T, "_top_p_by_candidates")
    out = F.top_p(torch.from_numpy(x), tp)
    assert calls[-1][1] is not None
    assert len(full_rows) == 1 and full_rows[0][0][0].shape[0] == 3  # the three flat rows
    assert torch.equal(bits(out), bits(_full_sort(monkeypatch, torch.from_numpy(x), tp)))


def test_top_p_candidates_with_disabled_rows_and_hostile_values(monkeypatch):
    """Disabled rows (top_p = 1) come back bit for bit, NaN, +-inf and -0.0 included, and a row of
    -inf stays so; a NaN or
    +inf in an enabled row sends the whole call to the full sort, which decides it as before."""
    rng = np.random.default_rng(3)
    V = 8192
    x = (rng.standard_normal((5, V)) * 3).astype(np.float32)
    x[1, :5] = [np.nan, np.inf, -np.inf, -0.0, 0.0]
    x[4] = -np.inf  # (an enabled row without tokens: no candidates, sorted in full)
    tp = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.9])
    calls = _spy(monkeypatch, T, "_top_p_by_candidates")
    out = F.top_p(torch.from_numpy(x), tp)
    assert calls[-1][1] is not None
    assert torch.equal(bits(out[1]), bits(torch.from_numpy(x[1])))
    assert torch.equal(bits(out[3]), bits(torch.from_numpy(x[3])))
    # (the full sort's keep_at_least makes its own NaN, whose bits may differ)
    ref = _full_sort(monkeypatch, torch.from_numpy(x), tp)
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(ref)) and int(nan.sum()) == 1
    assert torch.equal(bits(out)[~nan], bits(ref)[~nan])
    for poison in (np.nan, np.inf):
        y = x.copy()
        y[2, 4000] = poison
        out = F.top_p(torch.from_numpy(y), tp)
        assert calls[-1][1] is None
        assert torch.equal(bits(out), bits(_full_sort(monkeypatch, torch.from_numpy(y), tp)))


def test_a_pipeline_without_top_k_equals_the_full_sort(monkeypatch):
    """The common request (temperature, top_p, min_p; no top_k) and a batch where only some
    rows have top_p: the candidates' result, packed on to min_p, is the full sort's."""
    rng = np.random.default_rng(11)
    B, V = 6, 32000
    x = torch.from_numpy((rng.standard_normal((B, V)) * 3).astype(np.float32))
    empty = [[] for _ in range(B)]
    batches = [SamplingBatch(SamplingParams(temperature=0.8, top_p=0.9, min_p=0.02), empty, empty, vocab_size=V),
               SamplingBatch([SamplingParams(temperature=0.8, top_p=0.9 if r % 2 else 1.0, min_p=0.05 * (r % 3))
                              for r in range(B)], empty, empty, vocab_size=V)]
    calls = _spy(monkeypatch, T, "_top_p_by_candidates")
    for b in batches:
        fast = SamplerPipeline("torch", seed=0).process(x, b)
        assert calls[-1][1] is not None
        with monkeypatch.context() as m:
            m.setattr(T, "_CANDIDATE_SAMPLE", 10**12)
            ref = SamplerPipeline("torch", seed=0).process(x, b)
        assert torch.equal(bits(fast), bits(ref))


@pytest.mark.parametrize("density", [0.0, 0.01, 0.03, 0.08, 0.3, 1.0])
def test_flat_not_below_is_flatnonzero(density):
    """Both of its ways (numpy's scan and the branch-free loop through the buffer's True tail),
    on masks of every density, NaN entries counted, and with the buffer reused by calls of
    other sizes in between."""
    rng = np.random.default_rng(int(density * 100))
    for B, V in [(64, 2000), (3, 20000), (64, 2000), (1, 5)]:
        x = rng.standard_normal((B, V)).astype(np.float32)
        x[rng.random((B, V)) < 0.01] = np.nan
        t = np.quantile(np.nan_to_num(x), 1.0 - density, axis=-1).astype(np.float32)
        t[rng.random(B) < 0.2] = -np.inf
        expected = np.flatnonzero(~(x < t[:, None]))
        got = _stats.flat_not_below(x, t)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.03, 0.3, 1.0])
def test_removed_tokens_are_the_minus_inf_entries(density):
    """``flat_removed`` (both of ``flat_not_below``'s ways) and ``removed_tokens`` (its flat
    indices and per-row counts, on the numpy route and on a non-contiguous tensor's torch
    route): the ``-inf`` entries, not NaN, +inf or the most negative finite value."""
    rng = np.random.default_rng(int(density * 1000) + 3)
    for B, V in [(64, 2000), (3, 20000), (1, 5)]:
        x = rng.standard_normal((B, V)).astype(np.float32)
        x[rng.random((B, V)) < density] = -np.inf
        x[rng.random((B, V)) < 0.01] = rng.choice(np.array([np.nan, np.inf, -3.4028235e38], dtype=np.float32))
        expected = np.flatnonzero(x == -np.inf)
        got = _stats.flat_removed(x)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        counts = np.count_nonzero(x == -np.inf, axis=-1)
        for t in (torch.from_numpy(x), torch.from_numpy(np.asfortranarray(x))):
            flat, n = _stats.removed_tokens(t)
            assert np.array_equal(flat.numpy(), expected) and np.array_equal(n.numpy(), counts)


@pytest.mark.parametrize("n", [0, 100, 4096, 4097, 50000])
def test_packed_columns_both_ways(n):
    """Division and bincount (few entries) or binary search and repeats (many): the rows, counts,
    starts and packed columns of a plain loop."""
    rng = np.random.default_rng(n)
    B, V = 7, 20000
    flat = np.sort(rng.choice(B * V, n, replace=False)).astype(np.int64)
    rows, counts, starts, cols = _stats.packed_columns(flat, (B, V))
    ref_rows = flat // V
    ref_counts = np.array([np.count_nonzero(ref_rows == b) for b in range(B)])
    ref_starts = np.concatenate([[0], np.cumsum(ref_counts)[:-1]])
    ref_cols = np.array([i - ref_starts[r] for i, r in enumerate(ref_rows)], dtype=np.int64)
    assert np.array_equal(rows, ref_rows) and np.array_equal(counts, ref_counts)
    assert np.array_equal(starts, ref_starts) and np.array_equal(cols, ref_cols)
