"""torch's CPU softmax / log_softmax of mostly removed rows on lane-preserving packed rows
(``samplers._lanes``): the full rows' bits at the kept entries, and the draw and the
log-probabilities that use them."""

import numpy as np
import pytest
import torch

from samplers import _lanes, sampling
from samplers.sampling import compute_logprobs, draw_tokens

NINF = float("-inf")


def _rows(rng: np.random.Generator, batch: int, vocab: int) -> np.ndarray:
    """float32 [batch, vocab] rows that are mostly -inf: per row a random share of kept
    entries (one entry up to ~4%), values from a narrow to a huge range (p underflowing to 0),
    ties, and now and then every entry in a few lanes or a block."""
    x = np.full((batch, vocab), -np.inf, dtype=np.float32)
    for r in range(batch):
        n = int(rng.integers(1, max(2, int(vocab * rng.choice([0.001, 0.01, 0.04])))))
        kind = rng.random()
        if kind < 0.1:
            cols = rng.choice(np.arange(3, vocab, 16), min(n, (vocab - 3) // 16), replace=False)  # one lane
        elif kind < 0.2:
            start = int(rng.integers(0, vocab - n))
            cols = np.arange(start, start + n)  # a block
        else:
            cols = rng.choice(vocab, n, replace=False)
        values = rng.standard_normal(cols.size).astype(np.float32) * rng.choice([0.5, 3.0, 40.0])
        if rng.random() < 0.3:
            values = np.round(values)
        x[r, cols] = values
    return x


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_kernels_give_the_full_rows_bits(threads):
    """On every row shape and density: ``torch.softmax`` and ``torch.log_softmax`` of the lane
    packing equal the full rows' at the kept entries, bit for bit (including the tails of
    V not a multiple of the SIMD width and p that underflow to 0)."""
    rng = np.random.default_rng(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _lanes.simd_lanes() in _lanes._CANDIDATE_LANES
        packed = 0
        for _ in range(60):
            batch, vocab = int(rng.integers(1, 70)), int(rng.choice([1031, 4096, 32000, 50257, 128256, 151936]))
            if batch * vocab > 3_000_000:
                batch = max(1, 3_000_000 // vocab)
            x = torch.from_numpy(_rows(rng, batch, vocab))
            rows = _lanes.lane_pack(x)
            if rows is None:
                continue
            packed += 1
            assert np.array_equal(rows.flat, np.flatnonzero(x.numpy().reshape(-1) != -np.inf))
            for kernel in (torch.softmax, torch.log_softmax):
                want = kernel(x, dim=-1).numpy().reshape(-1)[rows.flat]
                got = rows.at_entries(kernel(rows.values, dim=-1))
                assert np.array_equal(got.view(np.int32), want.view(np.int32)), (kernel, batch, vocab)
        assert packed >= 30  # (the others: too dense or too wide to pack)
    finally:
        torch.set_num_threads(before)


def test_the_probe_rejects_a_wrong_width():
    """The width is checked, not assumed: packing with any other candidate width breaks the
    kernels' bits on some probe rows (so ``simd_lanes`` can fail, and then packs nothing)."""
    lanes = _lanes.simd_lanes()
    probes = _lanes._probe_rows()
    assert all(_lanes._reproduces(x, lanes) for x in probes)
    for other in _lanes._CANDIDATE_LANES:
        if other != lanes:
            assert not all(_lanes._reproduces(x, other) for x in probes), other


def test_lane_pack_declines_what_it_cannot_reproduce():
    x = torch.full((2, 4096), NINF)
    x[:, 7] = 1.0
    assert _lanes.lane_pack(x) is not None
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 100] = bad  # (the kernels' row is NaN throughout)
        assert _lanes.lane_pack(y) is None
    y = x.clone()
    y[1] = NINF  # a row without a kept entry
    assert _lanes.lane_pack(y) is None
    assert _lanes.lane_pack(torch.randn(2, 4096)) is None  # rows mostly kept
    assert _lanes.lane_pack(x.double()) is None
    y = x.clone()
    y[0, ::16] = 0.5  # 256 entries in one lane: a layout 16 x 256 wide, as wide as the row
    assert _lanes.lane_pack(y) is None


def test_lane_pack_keeps_each_entry_in_its_lane_and_order():
    """Hand-checked layout for 16 lanes: columns 3, 19, 35 share lane 3 (ranks 0, 1, 2),
    column 4 is lane 4; the width is 16 x the most entries in a lane."""
    x = np.full((1, 2048), -np.inf, dtype=np.float32)
    x[0, [3, 4, 19, 35]] = [1.0, 2.0, 3.0, 4.0]
    rows = _lanes._pack(np.flatnonzero(x.reshape(-1) != -np.inf), x[0, [3, 4, 19, 35]], (1, 2048), 16)
    assert rows.values.shape == (1, 48)
    values = rows.values.numpy()[0]
    assert values[3] == 1.0 and values[4] == 2.0 and values[19] == 3.0 and values[35] == 4.0
    assert np.isneginf(np.delete(values, [3, 4, 19, 35])).all()


def _reference_draw(x: torch.Tensor, greedy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The draw's definition on the full rows (``_draw_tokens_dense``)."""
    return sampling._draw_tokens_dense(x, greedy, u)


def test_draw_and_logprobs_through_the_packing_equal_the_full_rows(monkeypatch):
    """Tokens and chosen / top log-probabilities on mostly removed rows equal those of the full
    rows (torch.log_softmax, gather, top_logprobs), bit for bit, and the packing is what computes them."""
    rng = np.random.default_rng(7)
    used = []
    real = _lanes.lane_pack
    monkeypatch.setattr(sampling, "lane_pack", lambda t: (lambda r: (used.append(r is not None), r)[1])(real(t)))
    for _ in range(80):
        batch, vocab = int(rng.integers(1, 20)), int(rng.choice([2048, 32000, 50257]))
        x = torch.from_numpy(_rows(rng, batch, vocab))
        greedy = torch.from_numpy(rng.random(batch) < 0.2)
        u = torch.from_numpy(rng.random(batch).astype(np.float32))
        if rng.random() < 0.2:
            u[:] = 1.0  # past the total: the last token with p > 0
        tokens = draw_tokens(x, greedy, u)
        assert torch.equal(tokens, _reference_draw(x, greedy, u))
        full = torch.log_softmax(x, dim=-1)
        # the drawn tokens, and tokens that are removed (their log-probability is -inf)
        for ids in (tokens, torch.from_numpy(rng.integers(0, vocab, batch))):
            for k in (0, 3, 20):  # (20: past some rows' kept entries, or the packed width)
                chosen, top = compute_logprobs(x, x, torch.zeros(batch, dtype=torch.bool), ids, k, any_raw=False)
                want = full.gather(-1, ids[:, None])[:, 0]
                assert torch.equal(chosen.view(torch.int32), want.view(torch.int32))
                if k:
                    want_ids, values = sampling.top_logprobs(full, k)
                    assert torch.equal(top[1].view(torch.int32), values.view(torch.int32))
                    assert torch.equal(top[0], want_ids)
    assert sum(used) > 150


def test_without_a_width_every_route_still_gives_the_same_values(monkeypatch):
    """Where no SIMD width reproduces the kernels (``simd_lanes`` None), the full rows are used:
    the same tokens and log-probabilities."""
    rng = np.random.default_rng(9)
    x = torch.from_numpy(_rows(rng, 8, 32000))
    greedy, u = torch.zeros(8, dtype=torch.bool), torch.from_numpy(rng.random(8).astype(np.float32))
    with_lanes = draw_tokens(x, greedy, u), compute_logprobs(x, x, greedy, torch.arange(8), 2, any_raw=False)
    monkeypatch.setattr(_lanes, "simd_lanes", lambda: None)
    assert _lanes.lane_pack(x) is None
    without = draw_tokens(x, greedy, u), compute_logprobs(x, x, greedy, torch.arange(8), 2, any_raw=False)
    assert torch.equal(with_lanes[0], without[0])
    assert torch.equal(with_lanes[1][0], without[1][0]) and torch.equal(with_lanes[1][1][1], without[1][1][1])


def test_the_pipeline_draw_reuses_the_chains_packing(monkeypatch):
    """Inside ``sample`` the draw and the log-probabilities find the truncated rows' entries
    from the layout the chain noted for its result, without a pass over the rows
    (``_live_hint`` / ``flatnonzero`` are that pass), pack them once for both, and give the
    full rows' values."""
    from samplers import SamplerPipeline, SamplingBatch, SamplingParams
    from samplers.functional import _stats

    x = torch.randn(4, 32000, generator=torch.Generator().manual_seed(1)) * 3
    batch = SamplingBatch(SamplingParams(top_k=40, min_p=0.02, seed=3), [[]] * 4, None, vocab_size=32000)
    pipe = SamplerPipeline("torch", seed=0)
    want = pipe.sample(x, batch, return_processed=True)
    passes = []
    real = _stats._live_hint
    monkeypatch.setattr(_stats, "_live_hint", lambda *a: (passes.append(1), real(*a))[1])
    packs, layouts = [], []
    real_pack = sampling.lane_pack
    monkeypatch.setattr(sampling, "lane_pack", lambda t: (lambda r: (packs.append(r is not None), r)[1])(real_pack(t)))
    real_layout = _lanes._pack
    monkeypatch.setattr(_lanes, "_pack", lambda *a: (layouts.append(1), real_layout(*a))[1])
    got = pipe.sample(x, batch)
    # (the draw and the log-probabilities both ask; the second is given the first's packing)
    assert packs == [True, True] and len(layouts) == 1 and not passes
    assert torch.equal(got.token_ids, want.token_ids)
    full = torch.log_softmax(want.processed, dim=-1).gather(-1, want.token_ids[:, None])[:, 0]
    assert torch.equal(got.logprobs.view(torch.int32), full.view(torch.int32))


def test_a_packing_is_shared_only_within_the_block_and_only_while_the_tensor_is_unchanged():
    """``sharing_lane_packs``: the same tensor, unchanged, is packed once; an in-place write
    (a new version), another tensor, or a call outside the block packs afresh, and the
    values follow the write."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32000, generator=g) * 3
    x[torch.rand(4, 32000, generator=g) > 0.01] = NINF
    with _lanes.sharing_lane_packs():
        first = _lanes.lane_pack(x)
        assert first is not None and _lanes.lane_pack(x) is first
        assert _lanes.lane_pack(x.clone()) is not first
        x[0, int(first.flat[0])] += 1.0  # (in place: the version moves on)
        again = _lanes.lane_pack(x)
        assert again is not first
        assert again.at_entries(again.values)[0] == x.reshape(-1)[int(first.flat[0])]
    assert _lanes.lane_pack(x) is not again


def test_inference_tensors_are_shared_too():
    """Under ``torch.inference_mode`` (vLLM's) tensors have no version counter: the packing is
    shared by identity, and ``sample`` gives the same tokens and log-probabilities."""
    from samplers import SamplerPipeline, SamplingBatch, SamplingParams

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 32000, generator=g) * 3
    batch = SamplingBatch(SamplingParams(top_k=30, seed=3, logprobs=2), [[]] * 3, None, vocab_size=32000)
    want = SamplerPipeline("torch", seed=0).sample(x, batch)
    with torch.inference_mode():
        y = x.clone()
        with _lanes.sharing_lane_packs():
            y[:, 100:] = NINF
            first = _lanes.lane_pack(y)
            assert first is not None and _lanes.lane_pack(y) is first
        got = SamplerPipeline("torch", seed=0).sample(x.clone(), batch)
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.logprobs.view(torch.int32), want.logprobs.view(torch.int32))
    assert torch.equal(got.top_logprobs[1].view(torch.int32), want.top_logprobs[1].view(torch.int32))
