"""The random stream (Philox4x32-10), the draw and the log-probabilities."""

import numpy as np
import pytest
import torch

from samplers import sampling
from samplers.sampling import (
    compute_logprobs,
    draw_tokens,
    philox4x32,
    row_uniforms,
    split_seed,
    uint32_to_uniform,
)


def _t(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        # Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
@pytest.mark.parametrize("route", ["public", "torch"])
def test_philox_known_answers(counter, key, expected, route):
    fn = philox4x32 if route == "public" else sampling._philox4x32_torch  # (public: numpy on the CPU)
    out = fn(*_t(*counter), *_t(*key))
    assert tuple(int(o) for o in out) == expected


_EDGE_WORDS = [0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]


def _words(rng: np.random.Generator, n: int) -> torch.Tensor:
    """n uint32 words in int64: random ones and the edges of 16- and 32-bit arithmetic."""
    w = rng.integers(0, 2**32, n, dtype=np.int64)
    edges = rng.permutation(_EDGE_WORDS)[:n]
    w[: edges.size] = edges
    return torch.from_numpy(w)


@pytest.mark.parametrize("n,rounds", [(1, 10), (8, 10), (1000, 10), (64, 7), (5, 0)])
def test_philox_numpy_route_matches_torch_route(n, rounds):
    rng = np.random.default_rng(n + rounds)
    words = [_words(rng, n) for _ in range(6)]
    got = philox4x32(*words, rounds=rounds)
    want = sampling._philox4x32_torch(*words, rounds=rounds)
    for g, w in zip(got, want):
        assert g.dtype == torch.int64 and torch.equal(g, w)


@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("purpose", [0, 1, 7])
def test_row_uniforms_numpy_route_matches_torch_route(n, purpose):
    """On the CPU row_uniforms is numpy from start to end; the torch route is what other
    devices run. Steps beyond 32 bits and negative ones are masked alike."""
    rng = np.random.default_rng(n * 10 + purpose)
    key_lo, key_hi = _words(rng, n), _words(rng, n)
    step = torch.from_numpy(rng.integers(-(2**40), 2**40, n, dtype=np.int64))
    seq = torch.from_numpy(rng.integers(0, 4, n, dtype=np.int64)).to(torch.int32)
    got = row_uniforms(key_lo, key_hi, step, seq, purpose)
    want = sampling._row_uniforms_torch(key_lo, key_hi, step, seq, purpose)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, want)


def test_row_uniforms_of_one_row_match_the_torch_route():
    """A batch of one row is computed in Python ints (not numpy arrays): the same bits as the
    torch route and as that row inside a larger batch, for every edge word in every place."""
    rng = np.random.default_rng(11)
    cases = [(w, rng.integers(0, 2**32), rng.integers(-(2**40), 2**40), rng.integers(0, 4)) for w in _EDGE_WORDS]
    cases += [(rng.integers(0, 2**32), w, w - 2**32, 0) for w in _EDGE_WORDS]
    cases += [tuple(rng.integers(0, 2**32, 4)) for _ in range(100)]
    words = [torch.tensor([int(c[i]) for c in cases], dtype=torch.int64) for i in range(4)]
    for purpose in (0, 1, 2**32 - 1):
        batched = row_uniforms(*words, purpose)
        want = sampling._row_uniforms_torch(*words, purpose)
        assert torch.equal(batched, want)
        for i in range(len(cases)):
            one = row_uniforms(*(w[i:i + 1] for w in words), purpose)
            assert one.dtype == torch.float32 and one.shape == (1,)
            assert torch.equal(one, want[i:i + 1]), (cases[i], purpose)


def _numpy_uniform(word: int) -> np.float32:
    """Triton's uint -> float conversion, written independently with numpy scalars."""
    signed = np.int64(np.uint32(word).view(np.int32))
    magnitude = -signed - 1 if signed < 0 else signed
    return np.float32(magnitude) * np.float32(4.6566127342e-10)


def test_uniform_conversion_matches_numpy_and_stays_below_one():
    words = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
    got = uint32_to_uniform(torch.tensor(words, dtype=torch.int64))
    for w, g in zip(words, got.tolist()):
        assert np.float32(g) == _numpy_uniform(w)
    assert float(got.max()) < 1.0 and float(got.min()) >= 0.0


def test_row_uniforms_are_uniform_and_depend_on_every_counter_word():
    n = 20000
    lo, hi = split_seed(1234)
    key_lo = torch.full((n,), lo, dtype=torch.int64)
    key_hi = torch.full((n,), hi, dtype=torch.int64)
    steps = torch.arange(n)
    u = row_uniforms(key_lo, key_hi, steps, torch.zeros(n, dtype=torch.int64), 0)
    # Kolmogorov-Smirnov distance against U(0, 1): 1.63/sqrt(n) is the 1% critical value.
    xs = np.sort(u.numpy().astype(np.float64))
    ks = np.max(np.abs(xs - (np.arange(1, n + 1) / n)))
    assert ks < 1.63 / np.sqrt(n)
    other_seq = row_uniforms(key_lo, key_hi, steps, torch.ones(n, dtype=torch.int64), 0)
    other_purpose = row_uniforms(key_lo, key_hi, steps, torch.zeros(n, dtype=torch.int64), 1)
    other_key = row_uniforms(key_lo + 1, key_hi, steps, torch.zeros(n, dtype=torch.int64), 0)
    for other in (other_seq, other_purpose, other_key):
        assert (other != u).float().mean() > 0.99


def test_split_seed_handles_negative_and_large():
    assert split_seed(0) == (0, 0)
    assert split_seed(2**32 + 5) == (5, 1)
    assert split_seed(-1) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_row_uniforms_match_triton_philox_bit_for_bit():
    """The kernels' stream: tl.philox in Triton (run by the interpreter) gives the same bits."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _kernel(out_ptr, key_lo_ptr, key_hi_ptr, step_ptr, seq_ptr, purpose, N: tl.constexpr):
        i = tl.arange(0, N)
        k0 = tl.load(key_lo_ptr + i).to(tl.uint32)
        k1 = tl.load(key_hi_ptr + i).to(tl.uint32)
        step = tl.load(step_ptr + i).to(tl.uint32)
        seq = tl.load(seq_ptr + i).to(tl.uint32)
        zero = step * 0
        c0, _, _, _ = tl.random.philox_impl(step, seq, zero + purpose, zero, k0, k1)
        tl.store(out_ptr + i, tl.random.uint_to_uniform_float(c0))

    seeds = [0, 1, 2**40 + 5, -7, 123456789, 2**63 - 1, 2**64 - 1, 42]
    words = torch.tensor([split_seed(s) for s in seeds], dtype=torch.int64).t()
    step = torch.arange(8, dtype=torch.int64) * 1000 + 3
    seq = torch.arange(8, dtype=torch.int64) % 3
    for purpose in (0, 1):
        expected = row_uniforms(words[0], words[1], step, seq, purpose)
        # int64 -> int32 views keep the low 32 bits; the kernel reinterprets them as uint32.
        got = torch.empty(8, dtype=torch.float32)
        _kernel[(1,)](got, words[0].to(torch.int32), words[1].to(torch.int32),
                      step.to(torch.int32), seq.to(torch.int32), purpose, N=8)
        assert torch.equal(got, expected)


def test_draw_greedy_takes_lowest_id_among_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("-inf"), 0.0, -1.0, 0.0]])
    tokens = draw_tokens(logits, torch.tensor([True, True]), torch.zeros(2))
    assert tokens.tolist() == [1, 1]


def test_draw_inverse_cdf_hand_computed():
    # probabilities [0.1, 0.2, 0.3, 0.4] -> cumulative [0.1, 0.3, 0.6, 1.0]
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(5, 1)
    u = torch.tensor([0.05, 0.15, 0.35, 0.65, 0.999])
    tokens = draw_tokens(logits, torch.zeros(5, dtype=torch.bool), u)
    assert tokens.tolist() == [0, 1, 2, 3, 3]


def test_draw_never_returns_a_removed_token():
    ninf = float("-inf")
    logits = torch.tensor([[0.0, 0.0, ninf, ninf], [ninf, 0.0, ninf, ninf]])
    u = torch.tensor([0.99999994, 0.99999994])  # the largest float32 below 1
    tokens = draw_tokens(logits, torch.zeros(2, dtype=torch.bool), u)
    assert tokens.tolist() == [1, 1]


def test_draw_on_a_truncated_row_hand_computed():
    """Rows mostly removed take the packed route (_draw_tokens_cpu): ids and fallbacks."""
    V = 1000
    ninf = float("-inf")
    x = torch.full((6, V), ninf)
    x[:, [17, 400, 901]] = torch.log(torch.tensor([0.2, 0.3, 0.5]))  # cumulative 0.2, 0.5, 1.0
    x[5] = ninf  # a row without any token: V - 1, as the dense route
    u = torch.tensor([0.1, 0.25, 0.6, 0.999, 1.0, 0.5])  # (1.0: past the total, the last token)
    greedy = torch.tensor([False, False, False, False, False, False])
    assert draw_tokens(x, greedy, u).tolist() == [17, 400, 901, 901, 901, V - 1]
    greedy[1] = True
    assert draw_tokens(x, greedy, u).tolist() == [17, 901, 901, 901, 901, V - 1]


def _draw_case(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, V = int(rng.integers(1, 7)), int(rng.integers(1024, 2500))  # (the packed route's rows: V >= 1024)
    x = rng.standard_normal((B, V)).astype(np.float32) * rng.uniform(0.1, 60)
    x[rng.random((B, V)) < rng.uniform(0.9, 1.0)] = -np.inf  # truncated rows
    if rng.random() < 0.3:
        x = np.round(x)  # ties
    if rng.random() < 0.15:
        x[0] = -np.inf
    if rng.random() < 0.05:
        x[-1, 3] = np.nan
    if rng.random() < 0.05:
        x[-1, 5] = np.inf
    logits = torch.from_numpy(x)
    if rng.random() < 0.2:
        logits = logits.to(torch.float16)
    greedy = torch.from_numpy(rng.random(B) < 0.25)
    u = torch.from_numpy(rng.random(B).astype(np.float32))
    if rng.random() < 0.2:
        u[:] = 1.0  # at the total: the fallback to the last token with p > 0
    elif rng.random() < 0.2:
        u[:] = 0.0
    return logits, greedy, u


def test_draw_on_truncated_rows_equals_the_dense_route(monkeypatch):
    """The packed route of the CPU draws the dense route's tokens, rows of ties, huge logit
    ranges (finite logits whose p is 0), rows without tokens, NaN / +inf rows, fp16, greedy
    rows, u at 0 and at the total; and it is the route taken."""
    rng = np.random.default_rng(5)
    dense_calls = []
    real = sampling._draw_tokens_dense
    monkeypatch.setattr(sampling, "_draw_tokens_dense", lambda *a, **k: (dense_calls.append(1), real(*a, **k))[1])
    packed = 0
    for _ in range(400):
        logits, greedy, u = _draw_case(rng)
        n = len(dense_calls)
        got = draw_tokens(logits, greedy, u)
        packed += len(dense_calls) == n and not bool(greedy.all())
        assert torch.equal(got, real(logits.float(), greedy, u))
    assert packed > 250


def test_inverse_cdf_skips_removed_tokens_when_the_sums_are_not_monotone():
    """A parallel scan (a GPU's cumsum) may round a sum up at a token with p = 0: a binary
    search then stops there. The general rule reads the sums at tokens with p > 0 only."""
    probs = torch.tensor([[0.25, 0.25, 0.0, 0.5]])
    cdf = torch.tensor([[0.25, 0.5, 0.50000006, 1.0]])  # one ulp up at the removed token 2
    u = torch.tensor([0.5])  # target 0.5: past token 1's sum, below "token 2's"
    assert sampling._inverse_cdf(probs, cdf, u, monotone=True).tolist() == [2]  # (the hazard)
    assert sampling._inverse_cdf(probs, cdf, u, monotone=False).tolist() == [3]
    # a sum rounded down at a removed token past the target: still the next token with p > 0
    cdf = torch.tensor([[0.25, 0.5, 0.49999997, 1.0]])
    assert sampling._inverse_cdf(probs, cdf, torch.tensor([0.3]), monotone=False).tolist() == [1]
    # the total is the largest sum at a token with p > 0, not the last sum
    probs = torch.tensor([[0.5, 0.5, 0.0]])
    cdf = torch.tensor([[0.5, 1.0, 0.99999994]])
    assert sampling._inverse_cdf(probs, cdf, torch.tensor([0.5]), monotone=False).tolist() == [1]  # (token 0 with 0.99999994)


def test_inverse_cdf_rules_agree_on_running_sums():
    """On a running sum (torch's CPU cumsum) both rules give every row the same token: rows of
    zeros, ties, u at 0 and at the total, rows without a token."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        logits, _, u = _draw_case(rng)
        probs = torch.softmax(logits.float().nan_to_num(nan=float("-inf")), dim=-1).nan_to_num(nan=0.0)
        cdf = probs.cumsum(dim=-1)
        assert torch.equal(sampling._inverse_cdf(probs, cdf, u, monotone=True),
                           sampling._inverse_cdf(probs, cdf, u, monotone=False))


def _scan_in_chunks(p: np.ndarray, width: int) -> np.ndarray:
    """``p``'s cumulative sums along the rows grouped as a blocked parallel scan groups them:
    each chunk of ``width`` summed on its own, the chunks' running totals added after (in
    ``p``'s dtype, as a GPU's float32 scan accumulates in float32)."""
    B, V = p.shape
    local = np.cumsum(p.reshape(B, V // width, width), axis=-1)
    totals = local[:, :, -1]
    return (local + (np.cumsum(totals, axis=-1) - totals)[:, :, None]).reshape(B, V)


def test_draw_off_the_cpu_does_not_see_the_scan_grouping():
    """Off the CPU the draw scans in float64: a running sum and a blocked scan (a GPU's cumsum
    picks its grouping from the batch's shape) draw the same tokens, where float32 sums draw
    different ones for some of the same uniforms (checked here, so the test can fail)."""
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(256, 32768, generator=g), dim=-1)  # (flat: p ~ 3e-5)
    u = torch.rand(256, generator=g)
    tokens = {}
    for dtype in (np.float32, np.float64):
        p = probs.numpy().astype(dtype)
        tokens[dtype] = [sampling._inverse_cdf(probs, torch.from_numpy(cdf), u, monotone=False)
                         for cdf in (np.cumsum(p, axis=-1), _scan_in_chunks(p, 1024))]
    assert torch.equal(*tokens[np.float64])
    assert not torch.equal(*tokens[np.float32])


def test_draw_accepts_logits_that_require_grad():
    x = torch.full((2, 3000), float("-inf"))
    x[:, [5, 70]] = torch.tensor([0.0, 1.0])
    x.requires_grad_(True)
    u = torch.tensor([0.1, 0.9])
    got = draw_tokens(x, torch.zeros(2, dtype=torch.bool), u)
    assert torch.equal(got, sampling._draw_tokens_dense(x.detach(), torch.zeros(2, dtype=torch.bool), u))


def test_draw_on_dense_rows_takes_the_dense_route(monkeypatch):
    calls = []
    real = sampling._draw_tokens_dense
    monkeypatch.setattr(sampling, "_draw_tokens_dense", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    x = torch.randn(3, 5000)
    u = torch.tensor([0.1, 0.5, 0.9])
    got = draw_tokens(x, torch.zeros(3, dtype=torch.bool), u)
    assert calls and torch.equal(got, real(x, torch.zeros(3, dtype=torch.bool), u))


def test_logprobs_processed_and_raw():
    raw = torch.tensor([[0.0, 1.0, 2.0]])
    processed = torch.tensor([[float("-inf"), 1.0, 2.0]])
    tok = torch.tensor([1])
    chosen, top = compute_logprobs(processed, raw, torch.tensor([False]), tok, 2)
    expected = 1.0 - np.log(np.exp(1.0) + np.exp(2.0))
    assert chosen.item() == pytest.approx(expected, abs=1e-6)
    assert top[0].tolist() == [[2, 1]]
    chosen_raw, _ = compute_logprobs(processed, raw, torch.tensor([True]), tok, 0)
    assert chosen_raw.item() == pytest.approx(1.0 - np.log(1 + np.exp(1.0) + np.exp(2.0)), abs=1e-6)


def _mostly_removed_rows(rng, batch, vocab, ties):
    """float32 [batch, vocab] rows of -inf with a few finite entries each (some rows with
    fewer than a handful), quarter-step values when ``ties``."""
    x = np.full((batch, vocab), -np.inf, dtype=np.float32)
    for r in range(batch):
        n = int(rng.integers(1, vocab // 10))
        values = rng.standard_normal(n).astype(np.float32) * 3
        x[r, rng.choice(vocab, n, replace=False)] = np.round(values * 4) / 4 if ties else values
    return x


def _reference_top(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference of the top-k rule: per row, NaN first, then values descending,
    equal values (-0.0 == +0.0, -inf ones included) by ascending token id."""
    ids = np.empty((rows.shape[0], k), dtype=np.int64)
    for r, row in enumerate(rows):
        nan = np.isnan(row)
        order = np.lexsort((np.arange(row.size), -np.where(nan, 0.0, row), ~nan))
        ids[r] = order[:k]
    return ids, np.take_along_axis(rows, ids, axis=-1)


@pytest.mark.parametrize("vocab", [7, 64, 1000])
def test_top_logprobs_breaks_ties_by_token_id(vocab):
    """``top_logprobs``: the k largest, most likely first, ties in ascending id order, against
    the numpy reference on rows of many ties (quarter steps, -inf, -0.0 and +0.0, NaN, +inf),
    k up to V; and each row's first j columns are its top j (no dependence on k)."""
    rng = np.random.default_rng(vocab)
    candidates_ran = 0
    for trial in range(30):
        x = np.round(rng.standard_normal((5, vocab)) * 4) / 4
        x[rng.random((5, vocab)) < (0.3 if trial % 2 else 0.0)] = -np.inf
        x[0, : vocab // 2] = rng.choice([0.0, -0.0], vocab // 2)
        if trial % 5 == 1:
            x[1, rng.integers(vocab)] = np.nan
            x[2, rng.integers(vocab)] = np.inf
        x = x.astype(np.float32)
        for k in sorted({1, 3, min(8, vocab), vocab}):
            ids, values = sampling.top_logprobs(torch.from_numpy(x), k)
            want_ids, want_values = _reference_top(x, k)
            assert np.array_equal(ids.numpy(), want_ids), (trial, k)
            assert np.array_equal(values.numpy().view(np.int32), want_values.view(np.int32))
            first, _ = sampling.top_logprobs(torch.from_numpy(x), 1)
            assert torch.equal(first[:, 0], ids[:, 0])
            # each route: the keys (any device), the candidates (CPU, tied rows; None on rows it
            # leaves to the keys); top_logprobs above took the plain topk where it is exact
            assert np.array_equal(sampling._top_by_keys(torch.from_numpy(x), k)[0].numpy(), want_ids)
            by_candidates = sampling._top_by_candidates(torch.from_numpy(x), k, torch.from_numpy(x).topk(k).values[:, -1])
            candidates_ran += by_candidates is not None
            if by_candidates is not None:
                assert np.array_equal(by_candidates[0].numpy(), want_ids)
                assert np.array_equal(by_candidates[1].numpy().view(np.int32), want_values.view(np.int32))
    assert candidates_ran > 10


def test_top_logprobs_of_a_row_do_not_depend_on_the_batch():
    """A row's alternatives in a batch whose largest ``logprobs`` is 20 are those it gets alone
    with its own 2, on rows of many ties (bf16-like logits): full rows and truncated ones."""
    from samplers import SamplerPipeline, SamplingBatch, SamplingParams

    V = 257
    g = torch.Generator().manual_seed(1)
    for trial in range(6):
        logits = torch.round(torch.randn(2, V, generator=g) * 2) / 2
        extra = dict(top_k=40) if trial % 2 else {}
        mine = SamplingParams(temperature=0.0, logprobs=2, **extra)
        both = SamplingBatch([mine, SamplingParams(temperature=0.0, logprobs=20)], vocab_size=V)
        with_other = SamplerPipeline("torch", seed=0).sample(logits, both).top_logprobs
        alone = SamplerPipeline("torch", seed=0).sample(logits[:1], SamplingBatch([mine], vocab_size=V)).top_logprobs
        assert torch.equal(with_other[0][0, :2], alone[0][0]) and torch.equal(with_other[1][0, :2], alone[1][0])
        processed = SamplerPipeline("torch", seed=0).process(logits[:1], SamplingBatch([mine], vocab_size=V))
        want_ids, _ = _reference_top(torch.log_softmax(processed, -1).numpy(), 2)
        assert alone[0].tolist() == want_ids.tolist()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("vocab", [200, 4096])
def test_top_logprobs_on_truncated_rows_are_topks(ties, vocab):
    """The top alternatives on mostly removed rows, selected among the finite entries, are the
    reference's (ids and value bits): rows with fewer than k entries, ties at the k-th place
    and NaN take the keyed selection of the full rows."""
    rng = np.random.default_rng(vocab + ties)
    packed_rows = 0
    for trial in range(40):
        x = torch.from_numpy(_mostly_removed_rows(rng, 6, vocab, ties))
        if trial % 7 == 3:
            x[2, int(rng.integers(vocab))] = float("nan")
        # (log_softmax turns a NaN row to NaN throughout: the rows themselves carry the lone NaN)
        for rows in (torch.log_softmax(x, dim=-1), x):
            for k in (1, 3, 8):
                got = sampling._top_of_packed(rows, k)
                if got is None:
                    continue
                ids, values = _reference_top(rows.numpy(), k)
                assert np.array_equal(got[0].numpy(), ids)
                assert np.array_equal(got[1].numpy().view(np.int32), values.view(np.int32))
                packed_rows += int((torch.isfinite(rows).sum(-1) >= k).sum())
    assert packed_rows > 100  # (the packed selection did run)


def test_top_logprobs_leave_full_rows_to_topk(monkeypatch):
    """Rows mostly kept, and CUDA-like layouts (non-contiguous), take topk: the packed route says so."""
    x = torch.randn(4, 4096)
    assert sampling._top_of_packed(torch.log_softmax(x, -1), 5) is None
    y = torch.full((4, 4096), float("-inf"))
    y[:, :8] = torch.randn(4, 8)
    assert sampling._top_of_packed(torch.log_softmax(y, -1).t().contiguous().t(), 5) is None
    assert sampling._top_of_packed(torch.log_softmax(y, -1), 5) is not None


def test_top_logprobs_through_compute_logprobs_hand_computed():
    """Two rows after a truncation, one with a tie at the 2nd place: ids most likely first."""
    x = torch.full((2, 64), float("-inf"))
    x[0, [7, 40, 3]] = torch.tensor([1.0, 3.0, 2.0])
    x[1, [9, 11, 30]] = torch.tensor([2.0, 1.0, 1.0])
    chosen, (ids, values) = compute_logprobs(x, x, torch.tensor([False, False]), torch.tensor([40, 9]), 2)
    assert ids[0].tolist() == [40, 3]
    assert ids[1].tolist() == [9, 11]  # (11 and 30 tie: the lower id first)
    log_z0 = np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))
    assert values[0].tolist() == pytest.approx([3.0 - log_z0, 2.0 - log_z0], abs=1e-6)
    assert chosen.tolist() == pytest.approx([3.0 - log_z0, 2.0 - np.log(np.exp(2.0) + 2 * np.exp(1.0))], abs=1e-6)
