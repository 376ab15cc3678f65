"""SamplerPipeline: composition order, per-row priorities, identity, seeds and the draw."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samplers.functional as F
from samplers import SamplerID, SamplerPipeline, SamplingBatch, SamplingParams
from samplers.batch import _schedule

V = 64


def _logits(B, V=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * 3).to(dtype)


def _histories(B, L=40, V=V, seed=0):
    rng = np.random.default_rng(seed)
    # a small alphabet so that repeats (for DRY / n-grams / penalties) occur
    prompts = [rng.integers(0, 8, size=L).tolist() for _ in range(B)]
    outputs = [rng.integers(0, 8, size=L // 2).tolist() for _ in range(B)]
    return prompts, outputs


def _batch(params, B=None, seed=0, **kw):
    if isinstance(params, SamplingParams):
        params = [params] * (B or 1)
    prompts, outputs = _histories(len(params), seed=seed)
    return SamplingBatch(params, prompts, outputs, vocab_size=V, **kw)


EVERYTHING = dict(
    repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2, no_repeat_ngram_size=3,
    dry_multiplier=0.8, dry_allowed_length=2, temperature=0.8, smoothing_factor=0.2, top_k=30,
    top_p=0.95, top_a=0.01, min_p=0.01, tfs=0.99, eta_cutoff=1e-4, epsilon_cutoff=1e-4,
    typical_p=0.99, nsigma=3.0, xtc_threshold=0.05, xtc_probability=0.5, skew=0.1, seed=7,
    logit_bias={3: 5.0, 4: -100.0},
)

PRESETS = [
    SamplingParams(),
    SamplingParams(temperature=0.7, min_p=0.05),
    SamplingParams(top_k=10, top_p=0.8, seed=1),
    SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, seed=2),
    SamplingParams(xtc_threshold=0.1, xtc_probability=1.0, seed=3),
    SamplingParams(dynatemp_min=0.5, dynatemp_max=1.5, typical_p=0.9),
    SamplingParams(**EVERYTHING),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(sampler_priority=[SamplerID.MIN_P, SamplerID.TEMPERATURE], temperature=2.0, min_p=0.2),
    SamplingParams(temperature_last=True, temperature=0.5, tfs=0.9, nsigma=1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_params_are_the_identity(dtype):
    logits = _logits(3, dtype=dtype)
    logits[0, 5] = float("-inf")
    before = logits.clone()
    batch = _batch(SamplingParams(), B=3)
    out = SamplerPipeline("torch").process(logits, batch)
    assert out.dtype == dtype
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(logits, before)


def test_input_is_never_modified():
    logits = _logits(len(PRESETS))
    before = logits.clone()
    SamplerPipeline("torch").sample(logits, _batch(PRESETS))
    assert torch.equal(logits, before)


def test_rows_are_independent_of_the_batch():
    """Each row of a heterogeneous batch equals that row processed alone (same history)."""
    logits = _logits(len(PRESETS), seed=1)
    prompts, outputs = _histories(len(PRESETS), seed=5)
    pipe = SamplerPipeline("torch", seed=0)
    together = pipe.process(logits, SamplingBatch(PRESETS, prompts, outputs, vocab_size=V))
    for b, p in enumerate(PRESETS):
        if p.xtc_probability > 0 and p.seed is None:
            continue  # an unseeded coin differs between calls by design
        alone = pipe.process(logits[b:b + 1], SamplingBatch([p], [prompts[b]], [outputs[b]], vocab_size=V))
        assert torch.equal(together[b], alone[0]), f"row {b}: {p}"


def _manual_chain(logits, p, prompt, output, coin_row):
    """The composition written out by hand from SEMANTICS.md's order, one sampler at a time."""
    batch = SamplingBatch([p], [prompt], [output], vocab_size=logits.shape[1])
    x = logits.float()
    t = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    if p.logit_bias:
        ids = list(p.logit_bias)
        x = F.logit_bias(x, torch.zeros(len(ids), dtype=torch.int64), torch.tensor(ids),
                         torch.tensor([p.logit_bias[i] for i in ids]))
    steps = {
        SamplerID.DRY: lambda x: F.dry(x, batch.history, t(p.dry_multiplier), t(p.dry_base),
                                       t(p.dry_allowed_length, torch.int64), t(p.dry_range, torch.int64),
                                       torch.full((1, 1), -1, dtype=torch.int64)),
        SamplerID.PENALTIES: lambda x: F.penalties(x, batch.history.seen_mask(), batch.history.output_counts(),
                                                   t(p.repetition_penalty), t(p.frequency_penalty),
                                                   t(p.presence_penalty)),
        SamplerID.NO_REPEAT_NGRAM: lambda x: F.no_repeat_ngram(x, batch.history,
                                                               t(p.no_repeat_ngram_size, torch.int64)),
        SamplerID.TEMPERATURE: lambda x: F.temperature(x, t(p.temperature)),
        SamplerID.TOP_NSIGMA: lambda x: F.nsigma(x, t(p.nsigma)),
        SamplerID.TOP_P_TOP_K: lambda x: F.top_p(F.top_k(x, t(p.top_k, torch.int64)), t(p.top_p)),
        SamplerID.TOP_A: lambda x: F.top_a(x, t(p.top_a)),
        SamplerID.MIN_P: lambda x: F.min_p(x, t(p.min_p)),
        SamplerID.TFS: lambda x: F.tfs(x, t(p.tfs)),
        SamplerID.ETA_CUTOFF: lambda x: F.eta_cutoff(x, t(p.eta_cutoff)),
        SamplerID.EPSILON_CUTOFF: lambda x: F.epsilon_cutoff(x, t(p.epsilon_cutoff)),
        SamplerID.TYPICAL_P: lambda x: F.typical_p(x, t(p.typical_p)),
        SamplerID.QUADRATIC: lambda x: F.quadratic_smoothing(x, t(p.smoothing_factor), t(p.smoothing_curve)),
        SamplerID.XTC: lambda x: F.xtc(x, t(p.xtc_threshold), t(p.xtc_probability), coin_row),
    }
    for sid in p.order:
        x = steps[sid](x)
    return F.skew(x, t(p.skew))


# greedy and dynatemp presets are covered by their own tests
@pytest.mark.parametrize("preset", [i for i, p in enumerate(PRESETS)
                                    if (p.seed is not None or p.xtc_probability == 0)
                                    and not (p.is_greedy or p.dynatemp_enabled)])
def test_pipeline_equals_the_hand_written_chain(preset):
    p = PRESETS[preset]
    logits = _logits(1, seed=preset)
    prompts, outputs = _histories(1, seed=preset)
    batch = SamplingBatch([p], prompts, outputs, vocab_size=V)
    from samplers.pipeline import _RowRandoms
    coin = _RowRandoms(batch, torch.Generator()).uniforms(1)
    expected = _manual_chain(logits, p, prompts[0], outputs[0], coin)
    got = SamplerPipeline("torch").process(logits, batch)
    assert torch.equal(got, expected)


def test_order_matters_temperature_vs_min_p():
    # Row logits: log of probabilities [0.5, 0.3, 0.2]. min_p 0.5 keeps p >= 0.25: tokens 0, 1.
    # With temperature 3 first, p ~ softmax(l / 3) = [0.389, 0.329, 0.281]: all three >= 0.195.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    first_min_p = SamplingParams(temperature=3.0, min_p=0.5, sampler_priority=["min_p", "temperature"])
    first_temp = SamplingParams(temperature=3.0, min_p=0.5)  # default: temperature before min_p
    pipe = SamplerPipeline("torch")
    a = pipe.process(logits, SamplingBatch([first_min_p], vocab_size=3))
    b = pipe.process(logits, SamplingBatch([first_temp], vocab_size=3))
    assert torch.isinf(a[0, 2]) and torch.isfinite(a[0, :2]).all()
    assert torch.isfinite(b).all()
    # temperature_last moves temperature after min_p as well
    c = pipe.process(logits, SamplingBatch([SamplingParams(temperature=3.0, min_p=0.5, temperature_last=True)],
                                           vocab_size=3))
    assert torch.equal(a, c)


def test_rows_with_different_priorities_in_one_batch():
    p_default = SamplingParams(temperature=3.0, min_p=0.5)
    p_reversed = SamplingParams(temperature=3.0, min_p=0.5, sampler_priority=[2, 5])
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4, 1)
    pipe = SamplerPipeline("torch")
    batch = SamplingBatch([p_default, p_reversed, p_reversed, p_default], vocab_size=3)
    assert any(mask is not None for _, mask in batch.schedule)
    mixed = pipe.process(logits, batch)
    for b, p in enumerate([p_default, p_reversed, p_reversed, p_default]):
        alone = pipe.process(logits[b:b + 1], SamplingBatch([p], vocab_size=3))
        assert torch.equal(mixed[b], alone[0])
    assert not torch.equal(mixed[0], mixed[1])


def test_schedule_merges_consistent_orders_without_masks():
    S = SamplerID
    stages = _schedule([(S.DRY, S.TEMPERATURE), (S.TEMPERATURE, S.MIN_P), ()], torch.device("cpu"))
    assert [s for s, _ in stages] == [S.DRY, S.TEMPERATURE, S.MIN_P]
    assert all(m is None for _, m in stages)
    stages = _schedule([(S.TEMPERATURE, S.MIN_P), (S.MIN_P, S.TEMPERATURE)], torch.device("cpu"))
    # conflicting orders: a shortest common supersequence, masks on the repeated sampler only
    assert [(s, None if m is None else m.tolist()) for s, m in stages] == [
        (S.MIN_P, [False, True]), (S.TEMPERATURE, None), (S.MIN_P, [True, False]),
    ]


def test_schedule_places_each_rows_samplers_once_in_its_order():
    """Random conflicting orders: each row meets each of its samplers in exactly one stage it
    belongs to (an unmasked stage, or a masked one that lists the row), in its own order; a
    sampler that occurs once in the schedule is never masked."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(2, 7))
        orders = [tuple(SamplerID(int(s)) for s in rng.permutation(14)[:int(rng.integers(0, 15))]) for _ in range(n)]
        stages = _schedule(orders, torch.device("cpu"))
        sids = [s for s, _ in stages]
        for s, m in stages:
            assert (m is None) == (sids.count(s) == 1)
        for b, order in enumerate(orders):
            met = tuple(s for s, m in stages if (m is None and s in order) or (m is not None and bool(m[b])))
            assert met == order


def test_temperature_last_beside_the_default_order_masks_temperature_only():
    """A serving batch where some rows set temperature_last: the two temperature stages are
    masked (one at each end), every other stage runs on every row, and each row equals the
    row alone."""
    every = {k: v for k, v in EVERYTHING.items() if k not in ("logit_bias", "seed")}
    params = [SamplingParams(**every, dynatemp_min=0.5, dynatemp_max=1.2, temperature_last=(b % 3 == 1), seed=b)
              for b in range(6)]
    batch = _batch(params)
    masked = [(s, m.tolist()) for s, m in batch.schedule if m is not None]
    assert masked == [(SamplerID.TEMPERATURE, [b % 3 != 1 for b in range(6)]),
                      (SamplerID.TEMPERATURE, [b % 3 == 1 for b in range(6)])]
    assert len(batch.schedule) == 15
    logits = _logits(6, seed=8)
    pipe = SamplerPipeline("torch", seed=0)
    mixed = pipe.process(logits, batch)
    prompts, outputs = _histories(6)
    for b in range(6):
        alone = pipe.process(logits[b:b + 1], SamplingBatch([params[b]], [prompts[b]], [outputs[b]], vocab_size=V))
        assert torch.equal(mixed[b].view(torch.int32), alone[0].view(torch.int32)), b


@pytest.mark.parametrize("sampler", list(SamplerID))
def test_units_off_values_leave_rows_as_they_are(sampler):
    """``UNITS_OFF``: with its sampler's parameters at those values, a row comes out of the
    unit bit for bit (the other rows of a masked stage that runs on every row)."""
    import samplers.pipeline as pl

    every = {k: v for k, v in EVERYTHING.items() if k not in ("logit_bias", "skew")} | {"xtc_probability": 1.0}
    rng = np.random.default_rng(int(sampler))
    params = [SamplingParams(**every, dynatemp_min=0.3, dynatemp_max=1.7) for _ in range(4)]
    batch = _batch(params)
    logits = torch.from_numpy(rng.standard_normal((4, V)).astype(np.float32) * 4)
    logits[1, ::5] = float("-inf")
    logits[2, 7] = -0.0
    rows = torch.tensor([True, False, True, False])
    view = pl._RowsOff(batch, rows, sampler)
    randoms = pl._RowRandoms(batch, torch.Generator().manual_seed(0))
    out = pl.UNITS[sampler](logits.clone(), view, randoms)
    assert torch.equal(out[~rows].view(torch.int32), logits[~rows].view(torch.int32))
    on = pl.UNITS[sampler](logits.clone(), batch, randoms)
    assert torch.equal(out[rows].view(torch.int32), on[rows].view(torch.int32))
    assert not torch.equal(on.view(torch.int32), logits.view(torch.int32))  # (the unit does act)


def test_a_masked_stage_keeps_the_chain_packed(monkeypatch):
    """temperature_last rows beside default rows: the closing temperature stage of a few rows
    runs on the chain's packed rows (no expansion to [B, V], no row subset)."""
    import samplers.pipeline as pl

    params = [SamplingParams(temperature=0.7, top_k=20, min_p=0.02, temperature_last=(b == 0)) for b in range(8)]
    batch = SamplingBatch(params, vocab_size=4096)
    assert [m is not None for _, m in batch.schedule] == [True, False, False, True]
    subsets = []
    monkeypatch.setattr(pl, "_RowSubset", lambda *a: subsets.append(a) or (_ for _ in ()).throw(AssertionError))
    expanded = []
    real_expand = pl.PackedChain.expand

    def expand(self, x):
        expanded.append(self.is_packed(x))
        return real_expand(self, x)

    monkeypatch.setattr(pl.PackedChain, "expand", expand)
    logits = _logits(8, V=4096, seed=3)
    got = SamplerPipeline("torch").process(logits, batch)
    assert not subsets and expanded.count(True) == 1  # (the one expansion: the chain's result)
    for b in (0, 1):
        alone = SamplerPipeline("torch").process(logits[b:b + 1], SamplingBatch([params[b]], vocab_size=4096))
        assert torch.equal(got[b].view(torch.int32), alone[0].view(torch.int32))


def _ungrouped(monkeypatch, fn):
    import samplers.pipeline as pl

    with monkeypatch.context() as m:
        m.setattr(pl, "_row_groups", lambda batch: None)
        return fn()


def test_rows_that_truncate_nothing_leave_the_others_packed(monkeypatch):
    """A row of default parameters (or temperature alone) among truncated rows: the truncated
    rows still reach min_p packed (a few columns, not the vocabulary), and every result equals
    the batch run as one group and each row alone, step after step (histories appended)."""
    import samplers.pipeline as pl

    V = 4096
    trunc = dict(repetition_penalty=1.2, dry_multiplier=0.8, no_repeat_ngram_size=3, temperature=0.8,
                 top_k=20, min_p=0.02, logprobs=3)
    params = [SamplingParams(**trunc, seed=b) for b in range(6)]
    params[2] = SamplingParams()
    params[4] = SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=9, logprobs=1)
    prompts, outputs = _histories(6, V=V)
    batches = {k: SamplingBatch(params, prompts, outputs, vocab_size=V) for k in ("grouped", "one")}
    groups = pl._row_groups(batches["grouped"])
    assert [g[0].tolist() for g in groups] == [[2, 4], [0, 1, 3, 5]]
    widths = []
    real = pl.UNITS[SamplerID.MIN_P]
    monkeypatch.setitem(pl.UNITS, SamplerID.MIN_P, lambda x, b, r: (widths.append(x.shape[1]), real(x, b, r))[1])
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        logits = _logits(6, V=V, seed=step)
        widths.clear()
        got = SamplerPipeline("torch", seed=1).sample(logits, batches["grouped"], return_processed=True)
        assert widths and max(widths) < V // 8
        ref = _ungrouped(monkeypatch, lambda: SamplerPipeline("torch", seed=1).sample(
            logits, batches["one"], return_processed=True))
        assert max(widths) == V  # (the one group: min_p on full rows)
        assert torch.equal(got.token_ids, ref.token_ids)
        assert torch.equal(got.logprobs.view(torch.int32), ref.logprobs.view(torch.int32))
        assert torch.equal(got.processed.view(torch.int32), ref.processed.view(torch.int32))
        assert torch.equal(got.top_logprobs[1].view(torch.int32), ref.top_logprobs[1].view(torch.int32))
        processed = SamplerPipeline("torch", seed=1).process(logits, batches["grouped"])
        assert torch.equal(processed.view(torch.int32), got.processed.view(torch.int32))
        assert torch.equal(processed[2], logits[2])  # (default parameters: the row as given)
        step_ids = torch.randint(0, V, (6,), generator=g)
        for batch in batches.values():
            batch.append(step_ids)


def test_row_groups_follow_the_batch_history(monkeypatch):
    """The row groups' histories follow the batch's through plain and masked appends, several
    between two calls, without selecting the rows afresh; a replaced history, or one too
    many steps ahead, is selected afresh. Every step equals the batch run as one group."""
    import samplers.pipeline as pl
    from samplers.history import TokenHistory

    V = 2048
    trunc = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, dry_multiplier=0.8,
                 dry_allowed_length=1, no_repeat_ngram_size=2, top_k=30, min_p=0.02, logprobs=2)
    params = [SamplingParams(**trunc, seed=b) for b in range(5)]
    params[1] = SamplingParams(temperature=0.9, presence_penalty=0.5, seed=7)
    prompts, outputs = _histories(5, V=V, seed=3)
    batches = {k: SamplingBatch(params, prompts, outputs, vocab_size=V) for k in ("grouped", "one")}
    selects = []
    real_select = pl._selected_history
    monkeypatch.setattr(pl, "_selected_history", lambda *a: (selects.append(1), real_select(*a))[1])
    rng = np.random.default_rng(0)
    # (appends before each call: masks, gaps of several steps, a replaced history, a gap too long)
    plan = [[None], [np.array([1, 0, 1, 1, 0], bool)], [None, np.array([0, 1, 1, 0, 1], bool), None],
            ["replace"], [None] * 9, [None]]
    expect_selects = [0, 0, 0, 2, 2, 0]
    for step, appends in enumerate(plan):
        for mask in appends:
            ids = torch.from_numpy(rng.integers(0, 8, 5))
            for batch in batches.values():
                if isinstance(mask, str):  # (a new history object with the same rows)
                    h = batch.history
                    batch.history = TokenHistory(prompts, [row[len(p):] for row, p in zip(h.to_lists(), prompts)],
                                                 vocab_size=V)
                else:
                    batch.append(ids, rows=None if mask is None else torch.from_numpy(mask))
        logits = _logits(5, V=V, seed=step)
        logits[:, :8] += 8.0  # (the histories' tokens among the kept ones: their penalties matter)
        selects.clear()
        got = SamplerPipeline("torch", seed=1).sample(logits, batches["grouped"], return_processed=True)
        assert len(selects) == expect_selects[step]
        ref = _ungrouped(monkeypatch, lambda: SamplerPipeline("torch", seed=1).sample(
            logits, batches["one"], return_processed=True))
        assert torch.equal(got.token_ids, ref.token_ids)
        assert torch.equal(got.processed.view(torch.int32), ref.processed.view(torch.int32))
        assert torch.equal(got.top_logprobs[0], ref.top_logprobs[0])
        assert batches["grouped"].history.to_lists() == batches["one"].history.to_lists()


def test_samplers_no_row_enables_are_not_run(monkeypatch):
    import samplers.pipeline as pl

    called = []
    for sid, fn in list(pl.UNITS.items()):
        monkeypatch.setitem(pl.UNITS, sid, (lambda s, f: lambda x, b, r: (called.append(s), f(x, b, r))[1])(sid, fn))
    batch = _batch([SamplingParams(min_p=0.1), SamplingParams()])
    SamplerPipeline("torch").process(_logits(2), batch)
    assert called == [SamplerID.MIN_P]


def test_greedy_rows_take_the_argmax_of_processed_logits():
    logits = _logits(2, seed=3)
    prompts, outputs = _histories(2, seed=3)
    top = int(logits[0].argmax())
    outputs[0] = outputs[0] + [top]  # the penalty must move the argmax away
    p = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    batch = SamplingBatch([p, SamplingParams(temperature=0.0)], prompts, outputs, vocab_size=V)
    pipe = SamplerPipeline("torch")
    out = pipe.sample(logits, batch)
    processed = pipe.process(logits, batch)
    assert out.token_ids.tolist() == processed.argmax(-1).tolist()
    assert out.token_ids[0] != top
    assert out.token_ids[1] == logits[1].argmax()


def test_seeded_rows_reproduce_across_batch_composition_and_position():
    seeded = SamplingParams(temperature=1.5, seed=1234, xtc_probability=0.5, xtc_threshold=0.02)
    others = [SamplingParams(temperature=0.7), SamplingParams(top_k=3, seed=9), SamplingParams()]
    logits_row = _logits(1, seed=11)[0]
    prompt, output = [1, 2, 3], [4, 5]
    results = []
    for position in range(4):
        params = others[:]
        params.insert(position, seeded)
        B = len(params)
        logits = _logits(B, seed=position + 100)
        logits[position] = logits_row
        batch = SamplingBatch(params, [prompt] * B, [output] * B, vocab_size=V)
        pipe = SamplerPipeline("torch", seed=position)  # a different generator every time
        results.append(int(pipe.sample(logits, batch).token_ids[position]))
    assert len(set(results)) == 1


def test_seeded_rows_follow_their_own_step_counter():
    p = SamplingParams(seed=5)
    logits = torch.zeros(1, 1000)  # uniform: the token is a function of the uniform alone
    batch = SamplingBatch([p], [[1]], [[]], vocab_size=1000)
    pipe = SamplerPipeline("torch")
    first = []
    for _ in range(5):
        t = pipe.sample(logits, batch).token_ids
        first.append(int(t))
        batch.append(t)
    batch2 = SamplingBatch([p], [[1]], [[]], vocab_size=1000)
    again = []
    for _ in range(5):
        t = SamplerPipeline("torch").sample(logits, batch2).token_ids
        again.append(int(t))
        batch2.append(t)
    assert first == again and len(set(first)) > 1
    # the n sequences of one request get distinct streams
    b3 = SamplingBatch([p, p], [[1], [1]], [[], []], vocab_size=1000, sequence_indices=[0, 1])
    t = SamplerPipeline("torch").sample(torch.zeros(2, 1000), b3).token_ids
    assert int(t[0]) == first[0] and int(t[1]) != int(t[0])


def _chi_square_p_value(counts, probs):
    from math import fsum

    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    stat = fsum(((counts[keep] - expected[keep]) ** 2 / expected[keep]).tolist())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square upper tail
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, min_p=0.05),
    SamplingParams(top_k=5, top_p=0.9, skew=0.5),
    SamplingParams(xtc_threshold=0.1, xtc_probability=0.5),
])
def test_unseeded_draw_frequencies_match_the_processed_distribution(params):
    Vs = 12
    base = torch.log(torch.tensor([0.3, 0.2, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04, 0.02, 0.015, 0.01, 0.005]))
    draws = 20000
    logits = base.repeat(draws, 1)
    batch = SamplingBatch([params] * draws, vocab_size=Vs)
    pipe = SamplerPipeline("torch", seed=123)
    tokens = pipe.sample(logits, batch).token_ids
    counts = np.bincount(tokens.numpy(), minlength=Vs).astype(np.float64)
    if params.xtc_probability > 0:
        # mixture: half the rows had XTC applied
        on = F.xtc(base[None], torch.tensor([params.xtc_threshold]), torch.tensor([1.0]), torch.tensor([0.0]))
        probs = 0.5 * torch.softmax(on[0], -1) + 0.5 * torch.softmax(base, -1)
    else:
        processed = pipe.process(base[None], SamplingBatch([params], vocab_size=Vs))
        probs = torch.softmax(processed[0].double(), -1)
    probs = probs.double().numpy()
    assert counts[probs == 0].sum() == 0
    assert _chi_square_p_value(counts, probs) > 1e-4
    # ... and a wrong distribution (the unprocessed softmax) is rejected by the same test
    raw = torch.softmax(base.double(), -1).numpy()
    assert _chi_square_p_value(counts, raw) < 1e-4 or counts[raw == 0].sum() > 0


def test_logprobs_come_from_the_processed_distribution():
    p = SamplingParams(top_k=2, logprobs=3, seed=0)
    raw_mode = SamplingParams(top_k=2, logprobs=1, seed=0, logprobs_mode="raw")
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    out = SamplerPipeline("torch").sample(logits, SamplingBatch([p, raw_mode], vocab_size=3))
    tok = out.token_ids.tolist()
    assert tok[0] in (0, 1)
    assert out.logprobs[0].item() == pytest.approx(math.log([0.625, 0.375][tok[0]]), abs=1e-5)
    assert out.logprobs[1].item() == pytest.approx(math.log([0.5, 0.3][tok[1]]), abs=1e-5)
    ids, values = out.top_logprobs
    assert ids.shape == (2, 3)
    assert ids[0, :2].tolist() == [0, 1] and values[0, 2].item() == float("-inf")


def test_min_tokens_bans_eos_and_stop_ids_until_reached_and_logit_bias_applies_first():
    p = SamplingParams(min_tokens=2, stop_token_ids=[7], logit_bias={9: 100.0})
    logits = torch.zeros(1, 10)
    batch = SamplingBatch([p], [[1, 2]], [[3]], vocab_size=10, eos_token_ids=[0])
    pipe = SamplerPipeline("torch")
    out = pipe.process(logits, batch)
    assert torch.isinf(out[0, 0]) and torch.isinf(out[0, 7]) and out[0, 9] == 100.0
    batch.append(torch.tensor([4]))  # output length 2 = min_tokens: EOS allowed again
    out = pipe.process(logits, batch)
    assert torch.isfinite(out).all()


def test_min_tokens_stops_copying_once_every_row_reached_its_minimum(monkeypatch):
    """Each step bans exactly F.min_tokens' tokens; once no row is under its minimum the
    stage is skipped (no [B, V] copy), and the input is never written, also by a later stage
    that runs on some rows only (rows in different orders)."""
    import samplers.pipeline as P

    calls = []
    real = F.min_tokens
    monkeypatch.setattr(P.F, "min_tokens", lambda *a: (calls.append(1), real(*a))[1])
    params = [SamplingParams(min_tokens=3, stop_token_ids=[5], temperature=0.7, top_k=4),
              SamplingParams(min_tokens=2, temperature=0.7, top_k=4,
                             sampler_priority=["top_k", "temperature"])]
    batch = SamplingBatch(params, [[1], [2]], [[3], []], vocab_size=V, eos_token_ids=[0])
    reference = SamplingBatch(params, [[1], [2]], [[3], []], vocab_size=V, eos_token_ids=[0])
    pipe = SamplerPipeline("torch")
    for step in range(4):  # outputs (1, 0), (2, 1), (3, 2), (4, 3)
        logits = _logits(2, seed=step)
        logits[:, [0, 5]] = 9.0  # (the stop tokens lead: a ban changes the top tokens)
        given = logits.clone()
        calls.clear()
        got = pipe.process(logits, batch)
        assert torch.equal(logits, given)
        lengths = batch.output_lengths.tolist()
        under = [lengths[0] < 3, lengths[1] < 2]
        assert len(calls) == any(under), (step, lengths)
        banned = real(logits, batch.output_lengths, batch.param("min_tokens"), *batch.min_tokens_coo)
        want = P.torch_chain(banned, _without_min_tokens(reference), P._RowRandoms(reference, torch.Generator()))
        assert torch.equal(got, want.processed)
        assert bool(torch.isneginf(got[0, [0, 5]]).all()) == under[0]
        assert bool(torch.isneginf(got[1, 0])) == under[1]
        batch.append(torch.tensor([7, 7]))
        reference.append(torch.tensor([7, 7]))


@pytest.mark.parametrize("bias", [False, True])
def test_history_units_write_in_place_only_on_rows_the_chain_owns(bias, monkeypatch):
    """DRY, the penalties and no_repeat_ngram write into rows the chain made itself (after a
    logit_bias, or after DRY's own copy for the others) and copy the caller's: the same
    processed logits as the copying units, and the input untouched."""
    import samplers.pipeline as P

    p = SamplingParams(dry_multiplier=0.8, repetition_penalty=1.2, no_repeat_ngram_size=2, min_p=0.05,
                       logit_bias={3: 2.0} if bias else None)
    prompts, outputs = _histories(4, seed=5)
    batch = SamplingBatch([p] * 4, prompts, outputs, vocab_size=V)
    logits = _logits(4, seed=6)
    given_logits = logits.clone()
    used = []
    monkeypatch.setattr(P, "UNITS_IN_PLACE", {s: (lambda f, s=s: (lambda *a: (used.append(s), f(*a))[1]))(f)
                                              for s, f in P.UNITS_IN_PLACE.items()})
    got = SamplerPipeline("torch").process(logits, batch)
    assert torch.equal(logits, given_logits)
    assert used == ([SamplerID.DRY] if bias else []) + [SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM]
    monkeypatch.setattr(P, "UNITS_IN_PLACE", {})
    want = SamplerPipeline("torch").process(logits, batch)
    assert torch.equal(got, want) and torch.isneginf(got).any()


def _without_min_tokens(batch: SamplingBatch) -> SamplingBatch:
    """``batch`` with its min_tokens stage off (the test applies F.min_tokens itself)."""
    import copy

    other = copy.copy(batch)
    other.min_tokens_coo = None
    return other


def test_append_matches_rebuilding_from_full_histories():
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                       dry_multiplier=1.0, no_repeat_ngram_size=2, seed=4, temperature=0.9)
    prompts, outputs = _histories(3, seed=9)
    batch = SamplingBatch([p] * 3, prompts, outputs, vocab_size=V)
    pipe = SamplerPipeline("torch")
    for step in range(6):
        logits = _logits(3, seed=step)
        tokens = pipe.sample(logits, batch).token_ids
        batch.append(tokens)
        for b in range(3):
            outputs[b] = outputs[b] + [int(tokens[b])]
    fresh = SamplingBatch([p] * 3, prompts, outputs, vocab_size=V)
    logits = _logits(3, seed=99)
    assert torch.equal(pipe.process(logits, batch), pipe.process(logits, fresh))


def test_errors_are_clear():
    pipe = SamplerPipeline("torch")
    batch = _batch([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="shape"):
        pipe.process(torch.zeros(3, V), batch)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingBatch([SamplingParams(logit_bias={V + 1: 1.0})], vocab_size=V)
    with pytest.raises(ValueError, match="backend"):
        SamplerPipeline("cuda-magic")
    with pytest.raises(ValueError, match="rows"):
        SamplingBatch([SamplingParams()] * 2, [[1]], vocab_size=V)
    with pytest.raises(ValueError, match="append"):
        batch.append(torch.tensor([1, 2, 3]))


def test_backend_auto_uses_torch_for_cpu_logits():
    assert SamplerPipeline("auto").backend_for(torch.zeros(1, 4)) == "torch"


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sampled_from(range(len(PRESETS))), min_size=1, max_size=5),
    st.integers(0, 2**16),
)
def test_hypothesis_truncation_never_empties_a_row(rows, seed):
    params = [PRESETS[i] for i in rows]
    logits = _logits(len(params), seed=seed)
    batch = _batch(params, seed=seed)
    out = SamplerPipeline("torch", seed=seed).process(logits, batch)
    assert torch.isfinite(out).any(dim=-1).all()
    assert not torch.isnan(out).any()


def test_a_row_whose_every_token_is_banned_keeps_its_most_likely_token():
    # n = 1 bans every token of the history; the history holds the whole vocabulary
    p = SamplingParams(no_repeat_ngram_size=1)
    logits = torch.tensor([[0.5, 2.0, 1.0], [0.5, 2.0, 1.0]])
    batch = SamplingBatch([p, p], [[0, 1, 2], [0, 2]], vocab_size=3)
    out = SamplerPipeline("torch").process(logits, batch)
    assert out[0].tolist() == [float("-inf"), 2.0, float("-inf")]
    assert out[1].tolist() == [float("-inf"), 2.0, float("-inf")]


def test_a_wide_row_emptied_by_bans_is_rescued_from_the_chain_note():
    """Rows wider than the rescue's probe: the chain's note of the removed tokens (the input
    proved finite, then the bans) decides which rows are empty, and the empty one is rescued."""
    Vw = 100
    p = SamplingParams(no_repeat_ngram_size=1)
    logits = torch.linspace(-1.0, 1.0, Vw).repeat(2, 1)
    batch = SamplingBatch([p, p], [list(range(Vw)), list(range(0, Vw, 2))], vocab_size=Vw)
    out = SamplerPipeline("torch").process(logits, batch)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [Vw - 1]
    assert out[0, Vw - 1] == logits[0, Vw - 1]
    assert torch.equal(torch.isfinite(out[1]), torch.arange(Vw) % 2 == 1)


def test_select_keeps_rows_and_their_history_state():
    params = [SamplingParams(dry_multiplier=1.0, seed=1), SamplingParams(repetition_penalty=1.5, seed=2),
              SamplingParams(no_repeat_ngram_size=2, seed=3)]
    prompts, outputs = _histories(3, seed=4)
    batch = SamplingBatch(params, prompts, outputs, vocab_size=V, sequence_indices=[0, 1, 2])
    pipe = SamplerPipeline("torch")
    logits = _logits(3, seed=8)
    pipe.process(logits, batch)  # builds the derived history state
    sub = batch.select([2, 0])
    expected = SamplingBatch([params[2], params[0]], [prompts[2], prompts[0]], [outputs[2], outputs[0]],
                             vocab_size=V, sequence_indices=[2, 0])
    assert torch.equal(pipe.process(logits[[2, 0]], sub), pipe.process(logits[[2, 0]], expected))
    assert pipe.sample(logits[[2, 0]], sub).token_ids.tolist() == \
        pipe.sample(logits[[2, 0]], expected).token_ids.tolist()
    with pytest.raises(ValueError, match="select"):
        batch.select([3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_returns_the_logits_its_tokens_were_drawn_from(dtype):
    """``sample(..., return_processed=True)``: what ``process`` returns for seeded rows (bit for
    bit, the logits' dtype, a default row as given, NaN included); for unseeded XTC rows, whose
    coin is new on every call, the tokens are always among the returned logits' tokens (a
    separate ``process`` call removed the drawn token in ~15% of such calls)."""
    V = 100
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, V, generator=g) * 3).to(dtype)
    x[2, 5] = float("nan")  # a default row comes back as given
    params = [SamplingParams(seed=4, xtc_threshold=0.05, xtc_probability=0.5, top_k=30, logprobs=2),
              SamplingParams(seed=5, min_p=0.1, temperature=0.7), SamplingParams()]
    batch = SamplingBatch(params, [[1, 2]] * 3, None, vocab_size=V)
    pipe = SamplerPipeline("torch", seed=0)
    out = pipe.sample(x, batch, return_processed=True)
    want = pipe.process(x, batch)
    assert out.processed.dtype == dtype and torch.equal(out.processed[:2], want[:2])
    assert torch.equal(out.processed[2].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       x[2].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert pipe.sample(x, batch).processed is None
    # without logprobs asked for: the same chosen log-probabilities either way
    plain = SamplingBatch([SamplingParams(seed=4, top_k=30), SamplingParams(seed=5)], [[1]] * 2, None, vocab_size=V)
    with_processed = pipe.sample(x[:2], plain, return_processed=True)
    without = pipe.sample(x[:2], plain)
    assert torch.equal(with_processed.token_ids, without.token_ids)
    assert torch.equal(with_processed.logprobs, without.logprobs) and with_processed.top_logprobs is None
    unseeded = SamplingBatch([SamplingParams(xtc_threshold=0.05, xtc_probability=0.5)], [[1]], None, vocab_size=V)
    removed = 0
    for _ in range(60):
        row = torch.randn(1, V, generator=g) * 3
        got = pipe.sample(row, unseeded, return_processed=True)
        assert torch.isfinite(got.processed[0, got.token_ids[0]])
        removed += int(~torch.isfinite(pipe.process(row, unseeded)[0, got.token_ids[0]]))
    assert removed > 0  # (the mismatch that return_processed avoids)


@pytest.mark.parametrize("kw", [dict(dynatemp_min=0.5, dynatemp_max=1.5), dict(typical_p=0.9), dict(eta_cutoff=3e-4),
                                dict(nsigma=1.0), dict(tfs=0.95), dict(skew=0.5), dict(top_p=0.9, min_p=0.01)])
@pytest.mark.parametrize("V", [100003, 128256, 151936])
def test_a_row_alone_equals_the_row_in_a_batch_at_two_threads(kw, V):
    """At torch's default of several threads a single row's sums were split between the threads
    (another grouping than a batch's): dynamic temperature divided a row alone by a temperature
    an ulp off its value in a batch (row 1 at 128256 columns), every logit of the row then
    differing; skew's probabilities moved likewise at all three widths."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
        params = SamplingParams(**kw)
        batch = SamplerPipeline("torch", seed=0).process(x, SamplingBatch([params] * 3, vocab_size=V))
        for r in range(3):
            alone = SamplerPipeline("torch", seed=0).process(x[r:r + 1].clone(), SamplingBatch([params], vocab_size=V))
            assert torch.equal(alone.view(torch.int32), batch[r:r + 1].view(torch.int32)), r
    finally:
        torch.set_num_threads(before)
