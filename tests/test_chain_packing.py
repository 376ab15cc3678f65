"""The speed paths of a chain of truncations give the plain paths' results, bit for bit.

- typical_p runs on packed rows after a truncation (``compact_rows``), like the other samplers;
- a truncation's packed layout is noted (``note_live_hint``) and taken over by the next
  ``compact_rows`` only when it still holds every entry that is not ``-inf``;
- top_k writes a sparse result entry by entry (``_sparse_result``) instead of
  ``keep_at_least``'s full-width passes, its k-th values found among candidates above a
  sampled threshold (``_top_k_from_candidates``) or by a selection over the rows.

Each is compared with the plain computation (packing switched off through the module's
thresholds, the sparse top_k through its own) on inputs that take the path, and each test
checks that the path was taken: ties, rows of one token, rows without any, disabled rows,
fp16 / bf16 (whose plain path is compared with the fp32 fast path).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional import _stats
from samplers.functional import truncation as T
from test_packed_rows import PACKED, _params  # the samplers that pack, random parameters for each

NINF = float("-inf")

CHAIN7 = dict(temperature=0.9, top_k=200, top_p=0.95, min_p=0.02, typical_p=0.98, eta_cutoff=3e-4,
              epsilon_cutoff=3e-4)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.fixture
def plain(monkeypatch):
    """plain(): from here on, no packing, no layout hints, no sparse top_k (the reference)."""

    def switch_off() -> None:
        monkeypatch.setattr(_stats, "_SPARSE_FRACTION", 8)
        monkeypatch.setattr(_stats, "_SPARSE_MIN_VOCAB", 10**12)
        monkeypatch.setattr(T, "_TOP_K_SPARSE_FRACTION", 10**12)

    return switch_off


@pytest.fixture(autouse=True)
def no_hint_left():
    _stats._scratch.live_hint = None
    yield
    _stats._scratch.live_hint = None


def _truncated(g: torch.Generator, B: int, V: int, rounded: bool, max_kept: int = 300) -> torch.Tensor:
    """Rows as a truncation leaves them: a few tokens (one, sometimes), some rows without any."""
    x = torch.randn(B, V, generator=g) * (0.5 + 4 * torch.rand(1, generator=g).item())
    if rounded:
        x = torch.round(x * 2) / 2  # ties everywhere (in p, and in typical_p's deviations)
    for b in range(B):
        r = torch.rand(1, generator=g).item()
        kept = 1 if r < 0.15 else int(torch.randint(2, max_kept, (1,), generator=g))
        x[b, torch.randperm(V, generator=g)[kept:]] = NINF
        if 0.15 <= r < 0.25:
            x[b] = NINF
    return x


def _spy(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("rounded", [False, True])
def test_typical_p_on_packed_rows_equals_the_full_rows(rounded, plain, monkeypatch):
    g = torch.Generator().manual_seed(int(rounded))
    packs = _spy(monkeypatch, T, "compact_rows")
    for trial in range(10):
        B, V = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(4096, 9000, (1,), generator=g))
        x = _truncated(g, B, V, rounded)
        tp = torch.rand(B, generator=g) * 1.05  # some rows disabled (>= 1)
        tp[0] = 0.98
        packs.clear()
        h_fast = _spy(monkeypatch, T, "entropy")
        fast = F.typical_p(x, tp)
        assert packs and packs[0] is not None, "typical_p did not pack its rows"
        monkeypatch.undo()
        plain()
        h_ref = _spy(monkeypatch, T, "entropy")
        ref = F.typical_p(x, tp)
        monkeypatch.undo()
        packs = _spy(monkeypatch, T, "compact_rows")
        assert torch.equal(_bits(fast), _bits(ref)), (trial, B, V)
        # The entropy too (summed as over the full rows): a last-bit difference in H changes
        # the order of deviations only near ties, which random rows rarely have.
        assert torch.equal(_bits(h_fast[0]), _bits(h_ref[0])), (trial, B, V)


def test_typical_p_in_fp16_and_bf16_equals_the_packed_fp32_path():
    # Only float32 rows are packed: the half-precision (full-width) results must be the fp32
    # fast path's, cast (kept entries keep their values, statistics are fp32 in both).
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16):
        for trial in range(4):
            x = _truncated(g, 4, 4096, rounded=trial % 2 == 0).to(dtype)
            tp = torch.tensor([0.5, 0.9, 0.98, 1.0])
            assert _stats.compact_rows(x.float()) is not None
            assert torch.equal(_bits(F.typical_p(x, tp)), _bits(F.typical_p(x.float(), tp).to(dtype)))


def _layout(live: np.ndarray, B: int, V: int, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A SparseRows-like layout of the flat indices ``live | extra`` (sorted, row-major)."""
    flat = np.union1d(live, extra)
    rows = flat // V
    counts = np.bincount(rows, minlength=B)
    width = int(counts.max()) + 3
    starts = np.cumsum(counts) - counts
    pos = rows * width + (np.arange(flat.size) - starts[rows])
    return flat, pos, width


@pytest.mark.parametrize("name", PACKED)
def test_a_hinted_layout_with_removed_entries_gives_the_full_rows_results(name, plain, monkeypatch):
    # The layout taken over from the previous sampler holds the entries still in plus some
    # that it removed (-inf), anywhere in the rows, and is wider than needed.
    g = torch.Generator().manual_seed(100 + PACKED.index(name))
    fn = getattr(F, name)
    for trial in range(6):
        B, V = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(2048, 6000, (1,), generator=g))
        x = _truncated(g, B, V, rounded=trial % 2 == 1, max_kept=200)
        live = np.flatnonzero(x.numpy().reshape(-1) != -np.inf)
        # (compact_rows takes a layout as it is while at least half of its entries are in)
        extra = torch.randint(0, B * V, (max(1, live.size // 2),), generator=g).numpy()
        flat, pos, width = _layout(live, B, V, extra)
        args = _params(name, B, g)
        _stats.note_live_hint((B, V), flat, pos, width)
        packed = _stats.compact_rows(x)
        taken = 2 * live.size >= flat.size
        assert packed is not None and (packed.logits.shape == (B, width)) == taken  # the hint's layout
        _stats.note_live_hint((B, V), flat, pos, width)
        fast = fn(x, *args)
        plain()
        ref = fn(x, *args)
        monkeypatch.undo()
        assert torch.equal(_bits(fast), _bits(ref)), (name, trial, B, V)


def test_a_mostly_emptied_layout_is_packed_again_tightly():
    # top_k packs the wide rows nsigma leaves, then keeps k of them: the next samplers must
    # not go on working on the wide layout (still a valid hint: it holds every kept entry).
    g = torch.Generator().manual_seed(9)
    B, V = 4, 8192
    x = _truncated(g, B, V, rounded=False, max_kept=1000)
    wide = _stats.compact_rows(x)
    cut = F.top_k(x, torch.tensor([3, 5, 1, 4]))  # notes its (wide) layout
    packed = _stats.compact_rows(cut)
    kept = np.count_nonzero(cut.numpy() != -np.inf, axis=-1)
    assert 2 * kept.sum() < wide._flat.size  # the layout has mostly emptied
    assert packed is not None and packed.logits.shape == (B, int(kept.max()))
    assert torch.equal(_bits(packed.expand(packed.logits)), _bits(cut))
    for name in ("top_a", "tfs", "xtc", "quadratic_smoothing", "min_p"):
        args = _params(name, B, g)
        _stats.note_live_hint((B, V), wide._flat, wide._pos, wide.logits.shape[1])
        fast = getattr(F, name)(cut, *args)
        _stats._scratch.live_hint = None
        assert torch.equal(_bits(fast), _bits(getattr(F, name)(cut, *args))), name


def test_a_hint_missing_an_entry_is_not_taken():
    g = torch.Generator().manual_seed(7)
    B, V = 3, 4096
    x = _truncated(g, B, V, rounded=False, max_kept=100)
    x[0, :5] = torch.randn(5, generator=g)  # flat indices 0..4 live in row 0
    fresh = _stats.compact_rows(x)
    live = np.flatnonzero(x.numpy().reshape(-1) != -np.inf)
    for missing in (0, 1, live[-1]):  # on the strided sample (0), off it (1), the last one
        flat, pos, width = _layout(live[live != missing], B, V, np.array([], dtype=np.int64))
        for hint in ((flat, pos, width), (flat, None, 0)):
            _stats.note_live_hint((B, V), *hint)
            got = _stats.compact_rows(x)
            assert got.logits.shape == fresh.logits.shape
            assert torch.equal(got.expand(got.logits), x)
            assert np.array_equal(got._flat, fresh._flat)
    # a hint for other rows' shape is ignored
    _stats.note_live_hint((B, V + 1), live, None, 0)
    assert torch.equal(_stats.compact_rows(x).expand(_stats.compact_rows(x).logits), x)


def test_a_hint_of_dense_rows_does_not_pack_them():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4096, generator=g)
    x[:, 300:] = NINF
    _stats.note_live_hint((2, 4096), np.arange(2 * 4096), None, 0)  # covers everything
    assert _stats.compact_rows(x) is not None  # checked against the rows: they are sparse
    y = torch.randn(2, 4096, generator=g)
    _stats.note_live_hint((2, 4096), np.arange(2 * 4096), None, 0)
    assert _stats.compact_rows(y) is None


def _top_k_cases(g: torch.Generator):
    V = 4096
    x = torch.randn(6, V, generator=g)
    yield x, torch.tensor([1, 5, 50, 200, 500, 512]), True
    r = torch.round(torch.randn(5, V, generator=g) * 2) / 2  # large tie groups at the k-th value
    yield r, torch.tensor([1, 7, 100, 300, 400]), True
    some_inf = torch.randn(3, V, generator=g)
    some_inf[:, torch.randperm(V, generator=g)[: V // 10]] = NINF  # few enough for the partition
    yield some_inf, torch.tensor([20, 20, 300]), True
    one = torch.full((2, V), NINF)
    one[:, 0] = 0.0
    one[1, 1:] = torch.randn(V - 1, generator=g)  # row 0: one token and -inf, in the topk branch
    yield one, torch.tensor([3, 3]), False  # row 0 keeps its 4096 entries (-inf ones too)
    signed = torch.randn(2, V, generator=g)
    signed[0, :100] = -0.0
    signed[0, 100:200] = 0.0
    yield signed, torch.tensor([150, 60]), True


def _selection_only(monkeypatch) -> None:
    """top_k without the candidates: its k-th values from the selection over the rows."""
    monkeypatch.setattr(T, "_CANDIDATE_SAMPLE", 10**12)


@pytest.mark.parametrize("route", ["candidates", "selection"])
@pytest.mark.parametrize("threads", [1, 2])
def test_top_k_sparse_result_equals_keep_at_least(threads, route, plain, monkeypatch):
    # threads=2: torch.topk finds the k-th values (the partition needs one torch thread)
    g = torch.Generator().manual_seed(threads)

    def setup():
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        if route == "selection":
            _selection_only(monkeypatch)

    setup()
    found = []
    for x, k, noted in _top_k_cases(g):
        calls = _spy(monkeypatch, T, "_sparse_result")
        candidates = _spy(monkeypatch, T, "_top_k_from_candidates")
        _stats._scratch.live_hint = None
        fast = F.top_k(x, k)
        assert calls, "the sparse path was not taken"
        found += [r is not None for r in candidates]
        hint = _stats._scratch.live_hint
        plain()
        ref = F.top_k(x, k)
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert torch.equal(_bits(fast), _bits(ref))
        # the noted entries: every kept one (and -inf ones of rows with fewer than k finite
        # tokens: those rows keep all, and are noted only when the result is still sparse)
        live = np.flatnonzero(ref.numpy().reshape(-1) != -np.inf)
        assert (hint is not None) == noted
        if noted:
            assert np.all(np.diff(hint[1]) > 0) and np.isin(live, hint[1]).all()
        monkeypatch.undo()
        setup()
    assert any(found) == (route == "candidates")


def _numpy_top_k(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """top_k's rule re-implemented: keep l >= the k-th largest of the row (a full sort)."""
    kth = np.sort(x, axis=-1)[np.arange(x.shape[0]), x.shape[1] - k]
    return np.where(x >= kth[:, None], x, np.float32(-np.inf))


def _candidate_rows(rng: np.random.Generator, B: int, V: int, kind: str) -> np.ndarray:
    x = (rng.standard_normal((B, V)) * rng.uniform(0.5, 5.0)).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2) / 2  # large tie groups at the threshold and at the k-th value
    elif kind == "truncated":  # mostly -inf, as nsigma leaves rows
        x[rng.random((B, V)) < 0.88] = -np.inf
    elif kind == "off_grid":  # the largest values where the strided sample never looks
        step = V // T._CANDIDATE_SAMPLE
        off = np.arange(V) % step != 0
        x[:, off] += np.where(rng.random((B, int(off.sum()))) < 0.02, np.float32(20.0), np.float32(0.0))
    elif kind == "trend":  # logits that grow along the vocabulary (ids ordered by frequency)
        x += np.linspace(-6.0, 6.0, V, dtype=np.float32)
    elif kind == "signed_zero":  # the largest values: a tie group of +0.0 and -0.0
        x = -np.abs(x)
        x[:, : V // 64] = np.where(rng.random((B, V // 64)) < 0.5, np.float32(-0.0), np.float32(0.0))
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "truncated", "off_grid", "trend", "signed_zero"])
def test_top_k_candidates_equal_a_full_sort_and_the_selection(kind, monkeypatch):
    """The candidates' kept entries, bit for bit: against a full sort in numpy and against the
    selection path, for rows whose threshold lands in ties, rows mostly -inf, rows whose
    largest values the sample misses (then the candidates are refused: too few or too many)
    and k that differ per row (up to four distinct values, and more)."""
    rng = np.random.default_rng(["normal", "ties", "truncated", "off_grid", "trend", "signed_zero"].index(kind))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # (the candidates' condition, on any machine)
    taken = _spy(monkeypatch, T, "_top_k_from_candidates")
    results = []
    for B, V in [(1, 4096), (6, 8192), (3, 20000)]:
        x = _candidate_rows(rng, B, V, kind)
        for k in (np.full(B, 1), np.full(B, 50), rng.integers(1, V // 16, B), rng.choice([7, 300], B)):
            xt, kt = torch.from_numpy(x), torch.from_numpy(k.astype(np.int64))
            fast = F.top_k(xt, kt)
            results.append(taken[-1])
            assert torch.equal(_bits(fast), _bits(torch.from_numpy(_numpy_top_k(x, k)))), (B, V, k)
            with monkeypatch.context() as m:
                _selection_only(m)
                assert torch.equal(_bits(fast), _bits(F.top_k(xt, kt)))
    used = sum(r is not None for r in results)
    if kind == "off_grid":
        assert used < len(results)  # the sample missed them: some calls fell back
    else:
        assert used >= len(results) // 2, (used, len(results))


def test_top_k_candidates_take_a_different_k_on_every_row(monkeypatch):
    """A serving batch: every row its own k (here 16 distinct values, rounded logits with ties):
    one sort of the samples and of the candidates serves them all, with a full sort's values."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    taken = _spy(monkeypatch, T, "_top_k_from_candidates")
    g = np.random.default_rng(16)
    x = np.round(g.standard_normal((16, 16384)).astype(np.float32) * 6) / 2
    k = np.arange(1, 17) * 37
    out = F.top_k(torch.from_numpy(x), torch.from_numpy(k))
    assert taken and taken[-1] is not None
    assert torch.equal(_bits(out), _bits(torch.from_numpy(_numpy_top_k(x, k))))


def test_top_k_candidates_with_disabled_rows_mixed_in(monkeypatch):
    """Rows with k = 0, -1 or k >= V (disabled) among enabled ones: the disabled rows come back
    bit for bit (NaN, +-inf and -0.0 included), the others with a full sort's values; the
    selection path gives the same tensor (its NaN may carry other bits: keep_at_least's
    ``minimum`` makes its own NaN)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    taken = _spy(monkeypatch, T, "_top_k_from_candidates")
    g = np.random.default_rng(21)
    V = 8192
    x = (g.standard_normal((6, V)) * 3).astype(np.float32)
    x[1, :5] = [np.nan, np.inf, -np.inf, -0.0, 0.0]  # a disabled row with every special value
    k = np.array([50, 0, 7, -1, V, 300])
    out = F.top_k(torch.from_numpy(x), torch.from_numpy(k))
    assert taken and taken[-1] is not None
    on = (k > 0) & (k < V)
    ref = x.copy()
    ref[on] = _numpy_top_k(x[on], k[on])
    assert torch.equal(_bits(out), _bits(torch.from_numpy(ref)))
    with monkeypatch.context() as m:
        _selection_only(m)
        sel = F.top_k(torch.from_numpy(x), torch.from_numpy(k))
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(sel)) and int(nan.sum()) == 1
    assert torch.equal(_bits(out)[~nan], _bits(sel)[~nan])


@pytest.mark.parametrize("threads,B,taken", [(8, 6, False), (8, 2, True), (1, 6, True), (3, 3, False)])
def test_top_k_candidates_leave_many_threads_to_topk(threads, B, taken, monkeypatch):
    """With more than two threads and rows to split over them, torch.topk's row split takes
    over; the values are the same either way."""
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 8192, generator=g)
    k = torch.full((B,), 40)
    ref = F.top_k(x, k)
    calls = _spy(monkeypatch, T, "_top_k_from_candidates")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    out = F.top_k(x, k)
    assert bool(calls) == taken
    assert torch.equal(_bits(out), _bits(ref))


def test_top_k_candidates_refuse_nan_and_inf_rows(monkeypatch):
    """A NaN counts as the largest value (torch.topk's order); NaN and +inf rows go to the
    selection, which keeps that rule: the candidates never decide them."""
    taken = _spy(monkeypatch, T, "_top_k_from_candidates")
    g = torch.Generator().manual_seed(9)
    for poison in (float("nan"), float("inf")):
        x = torch.randn(2, 8192, generator=g)
        x[1, 4097] = poison
        out = F.top_k(x, torch.tensor([20, 20]))
        assert taken[-1] is None
        assert not torch.isfinite(out[1, 4097]) and int(torch.isfinite(out[1]).sum()) == 19  # kept, 19 more
        with monkeypatch.context() as m:
            _selection_only(m)
            assert torch.equal(_bits(out), _bits(F.top_k(x, torch.tensor([20, 20]))))


def test_top_k_leaves_nan_inf_and_disabled_rows_to_keep_at_least(monkeypatch):
    g = torch.Generator().manual_seed(3)
    V = 4096
    calls = _spy(monkeypatch, T, "_sparse_result")
    for poison in (float("nan"), float("inf")):
        x = torch.randn(3, V, generator=g)
        x[1, 17] = poison
        out = F.top_k(x, torch.tensor([10, 10, 10]))
        assert not calls
        ref = _stats.keep_at_least(x, x, T._kth_largest(x, torch.tensor([10] * 3), torch.ones(3, dtype=torch.bool),
                                                          10)[0])
        assert torch.equal(_bits(out), _bits(ref))
    x = torch.randn(2, V, generator=g)
    F.top_k(x, torch.tensor([10, 0]))  # a disabled row keeps everything: not sparse
    assert not calls


def test_top_k_in_fp16_and_bf16_equals_the_sparse_fp32_path(monkeypatch):
    g = torch.Generator().manual_seed(4)
    calls = _spy(monkeypatch, T, "_sparse_result")
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(4, 4096, generator=g) * 3).to(dtype)  # half precision: many ties
        k = torch.tensor([1, 40, 200, 300])
        calls.clear()
        ref = F.top_k(x.float(), k)
        assert calls
        assert torch.equal(_bits(F.top_k(x, k)), _bits(ref.to(dtype)))


def _chain(x: torch.Tensor) -> list[torch.Tensor]:
    B = x.shape[0]
    full = lambda v: torch.full((B,), v)  # noqa: E731
    outs = [F.temperature(x, full(0.9))]
    outs.append(F.top_k(outs[-1], torch.full((B,), 200)))
    for name, v in [("top_p", 0.95), ("min_p", 0.02), ("eta_cutoff", 3e-4), ("epsilon_cutoff", 3e-4),
                    ("typical_p", 0.98), ("top_p", 0.5), ("typical_p", 0.5)]:
        outs.append(getattr(F, name)(outs[-1], full(v)))
    return outs


@pytest.mark.parametrize("rounded", [False, True])
def test_the_chain_of_truncations_equals_the_plain_chain_stage_by_stage(rounded, plain, monkeypatch):
    g = torch.Generator().manual_seed(10 + int(rounded))
    x = torch.randn(8, 8192, generator=g) * 3
    if rounded:
        x = torch.round(x)
    x[3, 500:] = NINF  # a row with few tokens from the start
    x[5, 1:] = NINF  # a row of one token
    hints = _spy(monkeypatch, _stats, "_live_hint") + [None]
    made = _spy(monkeypatch, _stats, "_made_hint")
    fast = _chain(x)
    hints += made
    assert sum(h is not None for h in hints) >= 5, "the layouts were not carried over"
    monkeypatch.undo()
    plain()
    ref = _chain(x)
    for stage, (a, b) in enumerate(zip(fast, ref)):
        assert torch.equal(_bits(a), _bits(b)), stage


@pytest.mark.parametrize("B,V", [(1, 4096), (5, 8192)])
def test_pipeline_chain7_equals_the_plain_chain(B, V, plain):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, V, generator=g) * 3
    empty = [[] for _ in range(B)]
    batch = SamplingBatch(SamplingParams(**CHAIN7), empty, empty, vocab_size=V)
    fast = SamplerPipeline("torch", seed=0).process(x, batch)
    fast2 = SamplerPipeline("torch", seed=0).process(x, batch)  # a hint left by the last call
    plain()
    ref = SamplerPipeline("torch", seed=0).process(x, batch)
    assert torch.equal(_bits(fast), _bits(ref)) and torch.equal(_bits(fast2), _bits(ref))


@pytest.mark.parametrize("first", ["temperature", "nsigma"])
@pytest.mark.parametrize("B", [1, 2])
def test_a_fused_pair_after_a_truncation_keeps_the_chains_rows(first, B, plain):
    """temperature (or nsigma) then top_k on rows a truncation has packed (min_p keeps
    ~1800 of 32000: packed rows wider than the packing floor), then a packed sampler and a
    sampler that reads token ids: the fused pair runs on full rows only, so its result stays
    the chain's rows of the full vocabulary. (The pair once packed the packed rows again as if
    they were the whole vocabulary; no_repeat_ngram then got 1780 columns.) The values are the
    samplers' one after the other."""
    V = 32000
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(min_p=0.08, top_k=5, eta_cutoff=1e-6, no_repeat_ngram_size=1,
                            sampler_priority=["min_p", first, "top_k", "eta_cutoff"],
                            **({"temperature": 0.3} if first == "temperature" else {"nsigma": 0.5}))
    batch = SamplingBatch([params] * B, [[1, 2]] * B, [[3]] * B, vocab_size=V)
    got = SamplerPipeline("torch", seed=0).process(x, batch)
    assert 1024 <= int(torch.isfinite(F.min_p(x, 0.08)).sum(-1).max()) <= V // 8  # (the case: packed, wide)
    steps = [lambda t: F.min_p(t, 0.08),
             (lambda t: F.temperature(t, 0.3)) if first == "temperature" else (lambda t: F.nsigma(t, 0.5)),
             lambda t: F.top_k(t, 5), lambda t: F.eta_cutoff(t, 1e-6)]
    plain()
    want = x
    for step in steps:
        want = step(want)
    want = F.no_repeat_ngram(want, batch.history, 1)
    assert torch.equal(_bits(got), _bits(want))


def test_a_layout_is_taken_without_a_pass_only_from_the_unwritten_tensor_it_describes(monkeypatch):
    """``expand_truncated`` notes its result; the next ``compact_rows`` of that very tensor
    takes the layout without reading the rows. Any write to the tensor (in place, or through
    a view) bumps its version and the layout is checked again by the counting path; another
    tensor with the same values is checked too; inference-mode tensors (no version counter)
    take the checked path, except inside the ``library_call`` block that noted them. Every
    result equals the plain path's."""
    g = torch.Generator().manual_seed(5)
    x = _truncated(g, 4, 4096, rounded=False, max_kept=200)
    x[:, :3] = torch.randn(4, 3, generator=g)  # every row keeps something
    made = _spy(monkeypatch, _stats, "_made_hint")
    checked = _spy(monkeypatch, _stats, "_live_hint")
    tp = torch.full((4,), 0.9)

    def fresh():
        out = F.top_p(x, tp)
        assert _stats._scratch.live_hint is not None and _stats._scratch.live_hint[4] is not None
        return out

    y = fresh()
    sparse = _stats.compact_rows(y)
    assert made[-1] is not None and sparse is not None
    assert torch.equal(sparse.expand(sparse.logits), y)

    y = fresh()
    y[0, 4095] = 1.0  # a new live entry outside the layout
    made.clear(), checked.clear()
    sparse = _stats.compact_rows(y)
    assert made == [None] and checked == [None]  # not taken: the count disagrees
    assert torch.equal(sparse.expand(sparse.logits), y)

    y = fresh()
    y.view(-1)[5] = 2.0  # through a view
    made.clear()
    assert _stats.compact_rows(y) is not None and made == [None]

    y = fresh()
    made.clear()
    assert _stats.compact_rows(y.clone()) is not None and made == [None]

    with torch.inference_mode():
        xi = x.clone()
        y = F.top_p(xi, tp)
        made.clear()
        sparse = _stats.compact_rows(y)
        assert made == [None] and torch.equal(sparse.expand(sparse.logits), y)
        # inside the library_call block that noted it, by identity
        with _stats.library_call():
            y = F.top_p(xi, tp)
            made.clear()
            sparse = _stats.compact_rows(y)
            assert made[-1] is not None and torch.equal(sparse.expand(sparse.logits), y)
            y_earlier = F.top_p(xi, tp)
        # not in a later block: the caller may have written it in between
        y_earlier[1, 4095] = 3.0
        with _stats.library_call():
            made.clear()
            sparse = _stats.compact_rows(y_earlier)
            assert made == [None] and torch.equal(sparse.expand(sparse.logits), y_earlier)


def test_sum_scattered_remembers_only_equal_sums(monkeypatch):
    """The remembered sums: returned for the same entries (bits), columns, shape and thread
    count, and recomputed when any differs; a caller writing to a returned sum does not change
    what is remembered. Each result equals torch's sum of the full rows."""
    rng = np.random.default_rng(5)
    shape = (3, 5000)
    flat = np.sort(rng.choice(shape[0] * shape[1], 300, replace=False))
    values = rng.standard_normal(300).astype(np.float32)

    def full_sum(v, f):
        dense = np.zeros(shape[0] * shape[1], dtype=np.float32)
        dense[f] = v
        return torch.from_numpy(dense).view(shape).sum(dim=-1, keepdim=True)

    sums = _spy(monkeypatch, torch.Tensor, "sum")
    first = _stats.sum_scattered(values, flat, shape)
    assert torch.equal(_bits(first), _bits(full_sum(values, flat)))
    first.add_(1.0)  # (the caller's tensor, not the remembered one)
    n = len(sums)
    again = _stats.sum_scattered(values.copy(), flat.copy(), shape)
    assert len(sums) == n and torch.equal(_bits(again), _bits(full_sum(values, flat)))
    signed = values.copy()
    signed[0] = -signed[0]
    other_flat = flat.copy()
    other_flat[-1] = shape[0] * shape[1] - 1 if flat[-1] != shape[0] * shape[1] - 1 else flat[-1] - 1
    for v, f, s in [(signed, flat, shape), (values, other_flat, shape), (values, flat, (1, 15000))]:
        n = len(sums)
        out = _stats.sum_scattered(v, f, s)
        assert len(sums) == n + 1  # computed, not remembered
        if s == shape:
            assert torch.equal(_bits(out), _bits(full_sum(v, f)))
    n = len(sums)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # (one row's sum is split over threads)
    _stats.sum_scattered(values, flat, shape)
    assert len(sums) == n + 1


@pytest.mark.parametrize("share", [0.0, 0.005, 0.2, 0.6, 1.0])
def test_exp_either_route_equals_torch_exp(share):
    """``exp_`` (in place) and ``exp_of`` (a new tensor) at every share of slow entries (-inf,
    the subnormal band, far below it), on both sides of the masked route's share: torch's
    ``exp`` bit for bit, NaN kept."""
    rng = np.random.default_rng(int(share * 1000))
    z = (rng.standard_normal((16, 4096)) * 3 - 8).astype(np.float32)
    slow = rng.random(z.shape) < share
    z[slow] = rng.choice(np.array([-np.inf, -95.0, -104.5, -300.0, -1e30], dtype=np.float32), size=int(slow.sum()))
    z[0, 0] = np.nan
    t = torch.from_numpy(z)
    before = t.clone()
    ref = torch.exp(t)
    got = _stats.exp_of(t)
    assert got is not t and torch.equal(_bits(got), _bits(ref))
    assert torch.equal(_bits(t), _bits(before))  # (the input is left alone)
    inplace = t.clone()
    assert _stats.exp_(inplace) is inplace and torch.equal(_bits(inplace), _bits(ref))


@pytest.mark.parametrize("shape", [(64, 2000), (3, 50000), (1, 9000)])
def test_exp_fast_route_equals_torch_exp(shape):
    """``_stats.exp_``'s route for rows with entries far below 0 (-inf, the subnormal band
    (-110, -87) computed on its own, values around both edges): torch's ``exp`` bit for bit."""
    rng = np.random.default_rng(shape[1])
    z = (rng.standard_normal(shape) * 40 - 60).astype(np.float32)
    z[rng.random(shape) < 0.3] = -np.inf
    edges = np.array([-87.0, -110.0, np.nextafter(np.float32(-87.0), np.float32(0)),
                      np.nextafter(np.float32(-87.0), np.float32(-200)), -103.97, -0.0, 0.0], dtype=np.float32)
    z.reshape(-1)[: edges.size] = edges
    t = torch.from_numpy(z)
    sample = z.reshape(-1)[::61]
    share = np.count_nonzero(sample < _stats._EXP_NORMAL_MIN) / sample.size
    assert share >= _stats._EXP_MASKED_SHARE and t.numel() > _stats._EXP_PLAIN_MAX  # (the masked route)
    out = _stats.exp_(t.clone())
    ref = t.clone().exp_()
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(_stats.exp_of(t)), _bits(ref))
    assert int((out > 0).logical_and(out < torch.finfo(torch.float32).tiny).sum()) > 0  # subnormals were made
