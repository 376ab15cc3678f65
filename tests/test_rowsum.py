"""torch's CPU float32 row sum of rows that are zero but at a few entries, folded in torch's own
tree (samplers/functional/_rowsum.py): the bits of ``torch.sum`` of the full rows, checked
against torch itself, and the chain's results unchanged by it."""

from __future__ import annotations

import platform
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional import _rowsum, _stats

# torch's vectorised sum on x86-64 (AVX2 / AVX-512 builds) is the tree SumTree states; on
# other CPUs tree_lanes may find none, and sum_scattered then sums the full rows.
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _bits(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).view(np.int32)


def _full_sum(values: np.ndarray, flat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    dense = np.zeros(shape[0] * shape[1], dtype=np.float32)
    dense[flat] = values
    return torch.from_numpy(dense).view(shape).sum(dim=-1).numpy()


def _entries(rng: np.random.Generator, shape: tuple[int, int], density: float) -> tuple[np.ndarray, np.ndarray]:
    """Entries at random columns, magnitudes over ~20 orders and both signs: any other
    grouping of the terms rounds differently."""
    flat = np.flatnonzero(rng.random(shape[0] * shape[1]) < density)
    values = np.exp(rng.normal(0.0, 6.0, flat.size)) * rng.choice([-1.0, 1.0], flat.size)
    return flat, values.astype(np.float32)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# widths through every part of the tree: tail columns (V % 8), vectors past the 4-vector rows,
# the remainder rows, one to three levels of full groups (V = 1100000: level 2 and 3)
SHAPES = [(1, 17), (3, 33), (2, 515), (1, 4097), (7, 8191), (64, 32000), (2, 50257), (8, 128256),
          (5, 151936), (1, 300000), (2, 1100000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.006])
def test_the_tree_gives_torch_sums_bits(shape, density, threads):
    threads(1)
    lanes = _rowsum.tree_lanes(*shape)
    assert lanes is not None or not X86
    if lanes is None:
        pytest.skip("torch's row sum on this CPU is not the tree SumTree states")
    rng = np.random.default_rng(shape[1] + int(density * 1000))
    flat, values = _entries(rng, shape, density)
    assert np.array_equal(_bits(_rowsum.SumTree(flat, shape, lanes)(values)), _bits(_full_sum(values, flat, shape)))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), vocab=st.integers(1, 70000), density=st.sampled_from([0.5, 0.05, 0.002]),
       seed=st.integers(0, 2**31 - 1), n_threads=st.sampled_from([1, 2]))
def test_sum_scattered_equals_torch_at_every_shape_and_thread_count(batch, vocab, density, seed, n_threads):
    """Whichever way ``sum_scattered`` takes (the tree where it is checked, the full rows
    elsewhere), torch's bits for rows of a batch, which are its bits at one thread: also for a
    single row at two threads, which torch alone would split between them."""
    before = torch.get_num_threads()
    try:
        rng = np.random.default_rng(seed)
        flat, values = _entries(rng, (batch, vocab), density)
        torch.set_num_threads(1)
        want = _full_sum(values, flat, (batch, vocab))
        torch.set_num_threads(n_threads)
        got = _stats.sum_scattered(values, flat, (batch, vocab))
        assert got.shape == (batch, 1)
        assert np.array_equal(_bits(got[:, 0]), _bits(want))
    finally:
        torch.set_num_threads(before)


def _torch_sums(monkeypatch) -> list:
    calls = []
    real = torch.Tensor.sum

    def spy(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", spy)
    return calls


def _tree_rows(shape: tuple[int, int], per_row: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """A generator and the flat indices (increasing) of ``per_row`` random columns of every row,
    on rows the tree folds (the test is skipped on a CPU whose torch sums in another tree)."""
    if _rowsum.tree_lanes(*shape) is None:
        assert not X86
        pytest.skip("torch's row sum on this CPU is not the tree SumTree states")
    rng = np.random.default_rng(seed)
    cols = [r * shape[1] + rng.choice(shape[1], per_row, replace=False) for r in range(shape[0])]
    return rng, np.sort(np.concatenate(cols))


def test_sum_scattered_folds_few_entries_of_large_rows_in_the_tree(monkeypatch, threads):
    threads(1)
    shape = (64, 32000)
    rng, flat = _tree_rows(shape, 200, seed=0)
    values = rng.random(flat.size).astype(np.float32)
    want = _full_sum(values, flat, shape)
    sums = _torch_sums(monkeypatch)
    got = _stats.sum_scattered(values, flat, shape)
    assert sums == [] and np.array_equal(_bits(got[:, 0]), _bits(want))
    # non-finite entries (whose NaN bits could depend on the order) and dense entries: full rows
    for v, f in ((np.where(np.arange(flat.size) == 7, np.float32(np.inf), values), flat),
                 (rng.random(shape[0] * shape[1] // 8).astype(np.float32),
                  np.sort(rng.choice(shape[0] * shape[1], shape[0] * shape[1] // 8, replace=False)))):
        n = len(sums)
        got = _stats.sum_scattered(v, f, shape)
        assert len(sums) == n + 1 and np.array_equal(_bits(got[:, 0]), _bits(_full_sum(v, f, shape)))


def test_a_tree_torch_does_not_use_is_refused(monkeypatch, threads):
    """Lane counts that do not reproduce torch's sums are not taken (the check runs on probe
    rows), and the full rows are summed instead."""
    threads(1)
    monkeypatch.setattr(_rowsum, "_CANDIDATE_LANES", (4, 32))
    _rowsum._lanes_for.cache_clear()
    try:
        shape = (8, 128256)
        assert _rowsum.tree_lanes(*shape) is None
        rng = np.random.default_rng(1)
        flat, values = _entries(rng, shape, 0.002)
        sums = _torch_sums(monkeypatch)
        got = _stats.sum_scattered(values, flat, shape)
        assert len(sums) == 1 and np.array_equal(_bits(got[:, 0]), _bits(_full_sum(values, flat, shape)))
    finally:
        monkeypatch.undo()
        _rowsum._lanes_for.cache_clear()


def test_the_chain_gives_the_same_bits_with_and_without_the_tree(monkeypatch):
    """The 14-sampler chain on rows large enough for the tree (its packed samplers' sums):
    the same processed logits and tokens as with every sum over the full rows."""
    B, V = 12, 32000
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(B, V, generator=g) * 3
    logits[:, 5::1009] = float("-inf")
    rows = [SamplingParams(temperature=0.9, top_k=200, top_p=0.95, min_p=0.02, typical_p=0.98, eta_cutoff=3e-4,
                           epsilon_cutoff=3e-4, top_a=0.05, tfs=0.98, nsigma=3.0, xtc_threshold=0.1,
                           xtc_probability=0.5, smoothing_factor=0.2, skew=0.2, seed=r,
                           **(dict(dynatemp_min=0.5, dynatemp_max=1.5) if r % 2 else {})) for r in range(B)]
    batch = SamplingBatch(rows, vocab_size=V)
    trees = []
    real_tree = _stats._sum_tree
    monkeypatch.setattr(_stats, "_sum_tree", lambda *a: (lambda t: (trees.append(t is not None), t)[1])(real_tree(*a)))

    def run():
        pipe = SamplerPipeline("torch", seed=2)
        return pipe.process(logits, batch), pipe.sample(logits, batch, return_processed=True)

    processed, sample = run()
    assert any(trees) or not X86
    monkeypatch.setattr(_stats, "_TREE_MIN_ENTRIES", 1 << 62)
    ref_processed, ref_sample = run()
    assert torch.equal(processed.view(torch.int32), ref_processed.view(torch.int32))
    assert torch.equal(sample.token_ids, ref_sample.token_ids)
    assert torch.equal(sample.logprobs, ref_sample.logprobs)


def test_sums_past_the_float32_range_are_torch_sums_without_a_warning(threads):
    """Finite entries whose sum overflows float32 (hostile magnitudes: nsigma's mean of logits
    near 1e38) give torch's +-inf, and NaN where both signs overflow, with no numpy warning:
    under ``-W error`` a warning is an exception in the user's step."""
    threads(1)
    shape = (16, 32000)
    rng, flat = _tree_rows(shape, 100, seed=5)
    sign = np.where(flat // shape[1] % 4 == 0, 1.0, rng.choice([-1.0, 1.0], flat.size))  # rows 0, 4, ...: one sign
    values = (rng.uniform(1e37, 3.4e38, flat.size) * sign).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _stats.sum_scattered(values, flat, shape)[:, 0].numpy()
    want = _full_sum(values, flat, shape)
    assert np.isposinf(got[0]) and np.isnan(got).any()  # (the case overflows, both ways)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(_bits(got[~np.isnan(got)]), _bits(want[~np.isnan(want)]))


def test_the_chain_on_logits_near_the_float32_limit_warns_nothing():
    """nsigma after top_k on packed rows of logits near 1e38 (the tree's sums overflow): no
    warning, and each row's result is the row's alone."""
    B, V = 16, 32000
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(B, V, generator=g) * 1e37
    params = SamplingParams(top_k=50, nsigma=1.0, sampler_priority=["TOP_P_TOP_K", "TOP_NSIGMA"])
    batch = SamplingBatch([params] * B, vocab_size=V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = SamplerPipeline("torch").process(logits, batch)
    for r in (0, 7):
        alone = SamplerPipeline("torch").process(logits[r:r + 1], SamplingBatch([params], vocab_size=V))
        assert torch.equal(out[r:r + 1].view(torch.int32), alone.view(torch.int32))
    assert (torch.isfinite(out).sum(-1) >= 1).all()


@pytest.mark.parametrize("vocab", [4097, 50257, 100003, 151936, 262144])
def test_a_row_alone_is_summed_as_in_a_batch_at_every_thread_count(vocab, threads):
    """torch splits a single row's sum between its threads, in another grouping than a batch's
    row by row (at 2 threads 100003 and 262144 columns come out an ulp apart): batched_row_sum
    gives a row alone the bits of its sum among other rows, and the same at one thread."""
    rng = np.random.default_rng(vocab)
    x = torch.from_numpy(np.exp(rng.normal(0.0, 3.0, (3, vocab))).astype(np.float32))
    threads(1)
    serial = x.sum(dim=-1, keepdim=True)
    for n in (2, 3):
        threads(n)
        assert torch.equal(_rowsum.batched_row_sum(x), serial)
        for r in range(3):
            assert torch.equal(_rowsum.batched_row_sum(x[r:r + 1].clone()), serial[r:r + 1])
