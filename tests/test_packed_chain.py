"""The pipeline keeps truncated rows packed from one unit to the next (``PackedChain``): its
results are the unpacked chain's, bit for bit, whatever the order of the samplers, the rows'
orders, the histories and the dtypes; and the packed hand-over is really taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers import pipeline as P
from samplers.functional import _stats
from samplers.priority import DEFAULT_ORDER, SamplerID

V = 2048


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _row_params(rng: np.random.Generator, order: list[SamplerID] | None, strong: bool = False,
                **fixed) -> SamplingParams:
    """One row's parameters: most samplers on, at values that keep a few hundred tokens or fewer;
    ``strong``: the truncations over wider intervals (they may leave a row one or two tokens).
    ``fixed``: parameters set instead of drawn."""
    on = lambda p: rng.random() < p  # noqa: E731
    wide = lambda usual, wider: wider if strong else usual  # noqa: E731
    kw = dict(
        temperature=float(rng.uniform(0.3, 1.5)) if on(0.8) else 1.0,
        top_k=int(rng.integers(1, 400)) if on(0.7) else 0,
        top_p=float(rng.uniform(wide(0.5, 0.3), 1.0)) if on(0.6) else 1.0,
        min_p=float(rng.uniform(0.0, wide(0.2, 0.6))) if on(0.5) else 0.0,
        top_a=float(rng.uniform(0.0, wide(0.3, 0.9))) if on(0.4) else 0.0,
        tfs=float(rng.uniform(wide(0.5, 0.05), 1.0)) if on(wide(0.4, 0.6)) else 1.0,
        typical_p=float(rng.uniform(wide(0.5, 0.05), 1.0)) if on(0.4) else 1.0,
        eta_cutoff=float(rng.uniform(0.0, wide(0.01, 0.5))) if on(0.4) else 0.0,
        epsilon_cutoff=float(rng.uniform(0.0, wide(0.01, 0.5))) if on(0.4) else 0.0,
        nsigma=float(rng.uniform(wide(0.5, 0.1), 3.0)) if on(0.3) else 0.0,
        xtc_threshold=float(rng.uniform(0.0, wide(0.3, 0.5))), xtc_probability=float(rng.random()) if on(0.4) else 0.0,
        smoothing_factor=float(rng.uniform(0.0, wide(1.0, 2.0))) if on(0.3) else 0.0,
        skew=float(rng.normal()) if on(0.3) else 0.0,
        repetition_penalty=float(rng.uniform(1.0, 1.5)) if on(0.4) else 1.0,
        frequency_penalty=float(rng.uniform(0.0, 0.5)) if on(0.3) else 0.0,
        no_repeat_ngram_size=int(rng.integers(2, 4)) if on(0.3) else 0,
        dry_multiplier=float(rng.uniform(0.0, 1.0)) if on(0.3) else 0.0,
        seed=int(rng.integers(0, 2**31)),
    )
    if on(0.4):
        kw.update(dynatemp_min=float(rng.uniform(0.1, 0.8)), dynatemp_max=float(rng.uniform(0.8, 2.0)))
    if order is not None:
        kw["sampler_priority"] = order
    return SamplingParams(**{**kw, **fixed})


def _orders(rng: np.random.Generator) -> list[SamplerID]:
    """A random order of every sampler: token-id readers may come after truncations."""
    return [DEFAULT_ORDER[i] for i in rng.permutation(len(DEFAULT_ORDER))]


def _case(seed: int, B: int, mixed_orders: bool):
    rng = np.random.default_rng(seed)
    shared = _orders(rng) if rng.random() < 0.5 else None
    params = [_row_params(rng, _orders(rng) if mixed_orders else shared) for _ in range(B)]
    hist = [rng.integers(0, 300, int(rng.integers(0, 40))).tolist() for _ in range(B)]
    prompts = [h[: len(h) // 2] for h in hist]
    outputs = [h[len(h) // 2:] for h in hist]
    batch = SamplingBatch(params, prompts, outputs, vocab_size=V)
    scale = float(rng.uniform(0.5, 4.0))
    x = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * scale)
    if rng.random() < 0.3:
        x = torch.round(x * 2) / 2  # ties
    if rng.random() < 0.3:
        x[:, rng.integers(0, V, V // 3)] = float("-inf")  # removed before the chain (a bias, a ban)
    return x, batch


def _run_both(monkeypatch, x: torch.Tensor, batch: SamplingBatch):
    adopted = []
    real_adopt = _stats.PackedChain.adopt

    def spy(self, layout, packed):
        adopted.append(packed.shape)
        return real_adopt(self, layout, packed)

    with monkeypatch.context() as m:
        m.setattr(_stats.PackedChain, "adopt", spy)
        fast = SamplerPipeline("torch", seed=3).process(x, batch)
        fast_draw = SamplerPipeline("torch", seed=3).sample(x, batch).token_ids
    with monkeypatch.context() as m:
        m.setattr(P, "PackedChain", lambda: None)  # the unpacked chain: every unit gets [B, V] rows
        ref = SamplerPipeline("torch", seed=3).process(x, batch)
        ref_draw = SamplerPipeline("torch", seed=3).sample(x, batch).token_ids
    return fast, ref, fast_draw, ref_draw, adopted


@pytest.mark.parametrize("seed", range(24))
def test_packed_chain_equals_the_unpacked_chain(seed, monkeypatch):
    B = 1 + seed % 6
    x, batch = _case(seed, B, mixed_orders=seed % 3 == 2)
    fast, ref, fast_draw, ref_draw, _ = _run_both(monkeypatch, x, batch)
    assert fast.shape == ref.shape == x.shape and fast.dtype == ref.dtype
    assert torch.equal(_bits(fast), _bits(ref))
    assert torch.equal(fast_draw, ref_draw)


def test_the_packed_hand_over_is_taken_and_token_id_units_get_full_rows(monkeypatch):
    """top_k first, then penalties, DRY, no_repeat_ngram between truncations: the chain packs
    after top_k, expands for the token-id units, packs again after the next truncation."""
    order = [SamplerID.TOP_P_TOP_K, SamplerID.PENALTIES, SamplerID.MIN_P, SamplerID.DRY, SamplerID.TFS,
             SamplerID.NO_REPEAT_NGRAM, SamplerID.TYPICAL_P, SamplerID.TEMPERATURE, SamplerID.XTC]
    params = SamplingParams(top_k=100, top_p=0.9, min_p=0.01, tfs=0.95, typical_p=0.95, temperature=0.8,
                            repetition_penalty=1.3, dry_multiplier=0.8, no_repeat_ngram_size=2,
                            xtc_threshold=0.05, xtc_probability=1.0, skew=0.5, sampler_priority=order)
    B = 4
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, 50, 30).tolist() for _ in range(B)]
    batch = SamplingBatch(params, hist, [[] for _ in range(B)], vocab_size=V)
    x = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * 3)
    x[:, :50] += 4  # the history's tokens are among the kept ones
    seen_shapes = []
    for units in (P.UNITS, P.UNITS_IN_PLACE):  # (the copying units and those writing in place)
        real = {s: units[s] for s in (SamplerID.PENALTIES, SamplerID.DRY, SamplerID.NO_REPEAT_NGRAM) if s in units}
        for s, fn in real.items():
            monkeypatch.setitem(units, s, lambda x, b, r, fn=fn: (seen_shapes.append(tuple(x.shape)), fn(x, b, r))[1])
    fast, ref, fast_draw, ref_draw, adopted = _run_both(monkeypatch, x, batch)
    assert torch.equal(_bits(fast), _bits(ref)) and torch.equal(fast_draw, ref_draw)
    assert seen_shapes and all(s == (B, V) for s in seen_shapes)
    assert len(adopted) >= 4 and all(s[1] < V for s in adopted)


def test_half_precision_logits_and_rows_that_differ_in_order(monkeypatch):
    for dtype in (torch.float16, torch.bfloat16):
        for seed in range(4):
            x, batch = _case(100 + seed, 5, mixed_orders=True)
            fast, ref, fast_draw, ref_draw, _ = _run_both(monkeypatch, x.to(dtype), batch)
            assert fast.dtype == dtype and torch.equal(_bits(fast), _bits(ref))
            assert torch.equal(fast_draw, ref_draw)


def test_the_chain_is_off_outside_the_pipeline():
    """A sampler called on its own expands its result (no chain is active)."""
    import samplers.functional as F

    x = torch.randn(3, V)
    out = F.top_p(F.top_k(x, torch.full((3,), 20)), torch.full((3,), 0.9))
    assert out.shape == (3, V) and _stats._CHAIN.get() is None


def test_most_random_cases_take_the_packed_path(monkeypatch):
    """(so that the equality above is about the packed chain)"""
    taken = 0
    for seed in range(24):
        x, batch = _case(seed, 1 + seed % 6, mixed_orders=seed % 3 == 2)
        adopted = []
        real_adopt = _stats.PackedChain.adopt
        with monkeypatch.context() as m:
            m.setattr(_stats.PackedChain, "adopt",
                      lambda self, layout, packed: (adopted.append(1), real_adopt(self, layout, packed))[1])
            SamplerPipeline("torch", seed=3).process(x, batch)
        taken += bool(adopted)
    assert taken >= 12


@pytest.mark.parametrize("removed", [False, True], ids=["finite", "removed-tokens"])
def test_nsigma_hands_its_few_tokens_on_packed(removed, monkeypatch):
    """nsigma on full rows usually keeps a few tokens per row: inside the chain it hands them
    on packed (rows of at most V / 8 columns, no [B, V] result for the next sampler to pack
    again), with the unpacked chain's bits. The next sampler, a min_p that removes nothing,
    passes nsigma's tokens through."""
    from samplers.functional import truncation

    rng = np.random.default_rng(5)
    B = 6
    x = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * 3)
    if removed:  # (nsigma's statistics then skip them: its path for rows with removed tokens)
        x[:, rng.integers(0, V, 40)] = float("-inf")
    nsigma = np.array([0.5, 1.0, 1.5, 2.0, 1.2, 0.8], dtype=np.float32)
    params = [SamplingParams(nsigma=float(n), min_p=1e-30, seed=1,
                             sampler_priority=[SamplerID.TOP_NSIGMA, SamplerID.MIN_P]) for n in nsigma]
    batch = SamplingBatch(params, [[] for _ in range(B)], [[] for _ in range(B)], vocab_size=V)
    widths = []
    real = truncation._keep_at_least_if_few

    def spy(*args):
        out = real(*args)
        widths.append(None if out is None else out.shape[1])
        return out

    monkeypatch.setattr(truncation, "_keep_at_least_if_few", spy)
    fast, ref, fast_draw, ref_draw, _ = _run_both(monkeypatch, x, batch)
    assert torch.equal(_bits(fast), _bits(ref)) and torch.equal(fast_draw, ref_draw)
    assert len(widths) == 2 and all(w is not None and w * 8 <= V for w in widths)  # process, sample
    # against float64: keep l >= max - n * std over the finite logits
    for b in range(B):
        row = x[b].double().numpy()
        finite = row[np.isfinite(row)]
        threshold = finite.max() - float(nsigma[b]) * finite.std(ddof=1)
        assert np.abs(finite - threshold).min() > 1e-4  # (no token within rounding of it)
        assert np.array_equal(torch.isfinite(fast[b]).numpy(), row >= threshold), b


def test_tfs_after_a_truncation_to_two_tokens_is_not_skipped(monkeypatch):
    """Rows packed to fewer than 3 columns (top_k = 2 kept two tokens) still have the full
    rows' second differences: tfs must not take them for a vocabulary of 2. Hand-computed:
    p = (12/13, 1/13) after top_k, d2 = (|p1 - 2 p2|, p2) = (10/13, 1/13), normalised
    c = (10/11, 1); z = 0.9 < 10/11 keeps the top token only."""
    x = torch.full((1, V), -20.0)
    x[0, 7] = float(np.log(12.0))
    x[0, 900] = 0.0
    batch = SamplingBatch(SamplingParams(top_k=2, tfs=0.9), [[]], [[]], vocab_size=V)
    fast, ref, fast_draw, ref_draw, adopted = _run_both(monkeypatch, x, batch)
    assert adopted  # (the chain packed the rows after top_k)
    assert torch.isfinite(fast[0]).nonzero().flatten().tolist() == [7]
    assert torch.equal(_bits(fast), _bits(ref)) and torch.equal(fast_draw, ref_draw)


@pytest.mark.parametrize("seed", range(40))
def test_packed_chain_after_a_truncation_to_one_to_three_tokens(seed, monkeypatch):
    """top_k of 1-3 first, then every other sampler in a random order: the chain's packed
    rows are 1-3 columns wide (narrower than any rule's small-vocabulary case) and must give
    the unpacked chain's bits."""
    rng = np.random.default_rng(1000 + seed)
    order = [SamplerID.TOP_P_TOP_K] + [s for s in _orders(rng) if s != SamplerID.TOP_P_TOP_K]
    B = int(rng.integers(1, 4))
    params = [_row_params(rng, order, strong=True, top_k=int(rng.integers(1, 4))) for _ in range(B)]
    batch = SamplingBatch(params, [[] for _ in range(B)], [[] for _ in range(B)], vocab_size=V)
    x = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * float(rng.uniform(0.5, 4.0)))
    if rng.random() < 0.3:
        x = torch.round(x * 2) / 2  # ties
    fast, ref, fast_draw, ref_draw, _ = _run_both(monkeypatch, x, batch)
    assert torch.equal(_bits(fast), _bits(ref))
    assert torch.equal(fast_draw, ref_draw)


def test_short_rows_are_never_packed(monkeypatch):
    """Below compact_rows' minimum width (1024) a truncation's result is not packed either:
    in rows shorter than two SIMD vectors every entry is in the scalar tail of torch's loops,
    whose ``pow`` rounds differently from the vector one that skew's packed rows use (an
    ulp in 5 of these 500 rows when they were packed)."""
    for vocab in (8, 16, 20, 24, 31):
        for seed in range(100):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(1, vocab, generator=g) * 2
            skew = float(torch.rand(1, generator=g) * 2 - 1)
            batch = SamplingBatch([SamplingParams(top_k=2, skew=skew)], [[]], [[]], vocab_size=vocab)
            fast, ref, fast_draw, ref_draw, adopted = _run_both(monkeypatch, x, batch)
            assert not adopted
            assert torch.equal(_bits(fast), _bits(ref)), (vocab, seed)


def test_nsigma_takes_the_removed_tokens_dynatemp_found(monkeypatch):
    """Dynamic temperature finds the removed tokens of its rows; its division keeps them as
    they are, and nsigma, next in the chain, takes them from the note (no second search),
    with the unpacked chain's bits. Outside a chain nothing is noted."""
    import importlib

    import samplers.functional as F

    truncation = importlib.import_module("samplers.functional.truncation")
    rng = np.random.default_rng(8)
    B = 5
    x = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * 3)
    x[:, rng.integers(0, V, 30)] = float("-inf")  # (removed before the chain: a ban, a bias)
    x[2, 100:400] = float("-inf")
    params = SamplingParams(dynatemp_min=0.5, dynatemp_max=1.5, nsigma=2.0, min_p=1e-30, seed=2)
    batch = SamplingBatch(params, [[] for _ in range(B)], [[] for _ in range(B)], vocab_size=V)
    searches = []
    real = truncation.removed_tokens
    monkeypatch.setattr(truncation, "removed_tokens", lambda t: (searches.append(1), real(t))[1])
    fast, ref, fast_draw, ref_draw, _ = _run_both(monkeypatch, x, batch)
    assert torch.equal(_bits(fast), _bits(ref)) and torch.equal(fast_draw, ref_draw)
    assert len(searches) == 2  # (the unpacked chain's process and sample: nothing to take there)
    assert _stats.noted_removed(x) is None
    t = F.temperature(x, torch.full((B,), 0.7))
    assert _stats.noted_removed(t) is None


def _history_case(rng: np.random.Generator, B: int) -> tuple[torch.Tensor, SamplingBatch]:
    """Rows with repetitive histories (ids from a small set: n-gram bans, DRY matches), the
    units that read them (DRY, some rows with penalties that overflow to ``-inf``, the
    penalties, no_repeat_ngram), dynamic temperature on all or some rows, then nsigma."""
    params = []
    for _ in range(B):
        kw = dict(
            repetition_penalty=float(rng.uniform(1.0, 1.5)) if rng.random() < 0.5 else 1.0,
            frequency_penalty=float(rng.uniform(-0.5, 0.5)) if rng.random() < 0.5 else 0.0,
            no_repeat_ngram_size=int(rng.integers(0, 4)),
            dry_multiplier=float(rng.choice([0.0, 0.8, 1e20])),
            dry_base=float(rng.choice([1.75, 1e20])),  # (1e20 * 1e20 ** k: inf from k = 1 on)
            dry_allowed_length=int(rng.integers(1, 3)),
            nsigma=float(rng.uniform(0.5, 3.0)) if rng.random() < 0.7 else 0.0,
            seed=int(rng.integers(0, 2**31)),
        )
        if rng.random() < 0.7:
            kw.update(dynatemp_min=float(rng.uniform(0.1, 0.8)), dynatemp_max=float(rng.uniform(0.8, 2.0)))
        params.append(SamplingParams(**kw))
    ids = int(rng.choice([6, 40]))  # (6: long matches, so DRY's huge penalties overflow)
    hist = [rng.integers(0, ids, int(rng.integers(0, 120))).tolist() for _ in range(B)]
    batch = SamplingBatch(params, [h[: len(h) // 2] for h in hist], [h[len(h) // 2:] for h in hist], vocab_size=V)
    x = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32) * float(rng.uniform(0.5, 4.0)))
    return x, batch


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_the_units_that_read_histories_note_exactly_the_removed_tokens(seed, inference, monkeypatch):
    """After each unit that reads token ids, the chain's note of the removed tokens is exactly
    the ``-inf`` entries of the unit's result (penalties keep finite logits finite, DRY may
    overflow to ``-inf``, no_repeat_ngram bans); dynatemp and nsigma take it from the note
    instead of searching, and the results are the unpacked chain's, bit for bit. The same
    under ``torch.inference_mode`` (as vLLM runs), whose tensors have no version counter."""
    import importlib

    temperature = importlib.import_module("samplers.functional.temperature")
    truncation = importlib.import_module("samplers.functional.truncation")
    rng = np.random.default_rng(seed)
    x, batch = _history_case(rng, int(rng.integers(1, 7)))
    checked, searches = [], []
    real_run_full = _stats.PackedChain.run_full

    def run_full(chain, sampler, rows):
        out = real_run_full(chain, sampler, rows)
        noted = chain.removed
        if noted is not None and noted[0] is out and noted[1] == _stats._version_of(out):
            flat, counts = _stats.removed_tokens(out)
            assert torch.equal(noted[2], flat) and torch.equal(noted[3], counts)
            checked.append(int(flat.numel()))
        return out

    monkeypatch.setattr(_stats.PackedChain, "run_full", run_full)
    for module in (temperature, truncation):
        real = module.removed_tokens
        monkeypatch.setattr(module, "removed_tokens", lambda t, real=real: (searches.append(1), real(t))[1])
    with torch.inference_mode(inference):
        fast = SamplerPipeline("torch", seed=3).sample(x, batch, return_processed=True)
    assert searches == []
    groups = P._row_groups(batch)  # (rows that truncate nothing run as a group of their own)
    parts = [batch] if groups is None else [part for _, part in groups]
    ran = [s for part in parts for s, _ in part.schedule
           if s in (SamplerID.DRY, SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM)]
    assert len(checked) == len(ran)
    with monkeypatch.context() as m:
        m.setattr(P, "PackedChain", lambda: None)  # the unpacked chain: nothing is noted
        ref = SamplerPipeline("torch", seed=3).sample(x, batch, return_processed=True)
    assert torch.equal(_bits(fast.processed), _bits(ref.processed))
    assert torch.equal(fast.token_ids, ref.token_ids)


def test_removed_tokens_of_some_rows_are_renumbered_as_those_rows_alone():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((6, 50)).astype(np.float32))
    x[torch.from_numpy(rng.random((6, 50)) < 0.2)] = float("-inf")
    rows = torch.tensor([1, 2, 5])
    flat, counts = _stats.removed_in_rows(*_stats.removed_tokens(x), rows, 50)
    want_flat, want_counts = _stats.removed_tokens(x.index_select(0, rows))
    assert torch.equal(flat, want_flat) and torch.equal(counts, want_counts)


def test_a_note_carried_with_new_bans_is_sorted_and_distinct():
    chain = _stats.PackedChain()
    x = torch.zeros(3, 10)
    with _stats.packed_chain(chain):
        _stats.note_removed(x, torch.tensor([3, 12, 25]), torch.tensor([1, 1, 1]))
        out = x.clone()
        _stats.carry_removed(_stats.noted_removed(x), out, np.array([12, 29, 0, 29, 3]))
        assert _stats.noted_removed(x) is None  # (the note moved on to the result)
        flat, counts = _stats.noted_removed(out)
    assert flat.tolist() == [0, 3, 12, 25, 29] and counts.tolist() == [2, 1, 2]


def test_a_row_subset_stage_drops_the_note_it_would_make_stale():
    """Under ``torch.inference_mode`` a note holds by identity (no version counter): a stage
    run on some rows only, writing top_k's removals into the chain's rows, must drop it, or a
    full-row nsigma after it would take those rows for all finite. (``_schedule`` makes
    either full-row stages only or row stages only; the mixed schedule here is built by hand,
    as a scheduler that mixed them would run it.) The unpacked chain (no notes) decides."""
    rng = np.random.default_rng(4)
    # (top_k keeps most of a row, so nsigma works on the full rows)
    params = SamplingParams(repetition_penalty=1.3, top_k=1500, nsigma=1.0, seed=1)
    hist = [rng.integers(0, 300, 40).tolist() for _ in range(4)]
    batch = SamplingBatch(params, [h[:20] for h in hist], [h[20:] for h in hist], vocab_size=V)
    some = np.array([1, 3])
    batch.schedule = [(SamplerID.PENALTIES, None), (SamplerID.TOP_P_TOP_K, torch.tensor([False, True, False, True])),
                      (SamplerID.TOP_NSIGMA, None)]
    batch.schedule_rows = [None, torch.from_numpy(some), None]
    batch.schedule_rows_host = [None, some, None]
    x = torch.from_numpy(rng.standard_normal((4, V)).astype(np.float32) * 2)
    with torch.inference_mode():
        fast = SamplerPipeline("torch", seed=3).process(x, batch)
    original = P.PackedChain
    try:
        P.PackedChain = lambda: None
        ref = SamplerPipeline("torch", seed=3).process(x, batch)
    finally:
        P.PackedChain = original
    assert torch.isneginf(ref[some]).any() and not torch.isneginf(ref[[0, 2]]).all(-1).any()
    assert torch.equal(_bits(fast), _bits(ref))
