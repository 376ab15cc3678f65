"""Masked appends: ``TokenHistory.append(ids, rows=mask)`` / ``SamplingBatch.append(ids, rows=mask)``
advance only the masked rows (rows still prefilling in chunks produce no token in a step).

The incrementally maintained state (tokens, lengths, output lengths, counts, seen mask,
prefix hashes, match lengths) must equal that of a history built from scratch from the same
token lists, and the pipeline's results on the incremental batch those on a fresh batch.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.history import HASH_BASES, HASH_MODULI, TokenHistory
from test_history import assert_seen_ids_listed, ref_match_lengths, ref_prefix_hash  # the plain-list references

V = 16


# ----------------------------------------------------------------------------- references
def assert_same_state(th: TokenHistory, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """`th` equals a history built from scratch from the lists, and the hand-computed values."""
    hists = [p + o for p, o in zip(prompts, outputs)]
    fresh = TokenHistory(prompts, outputs, th.vocab_size)
    assert th.to_lists() == hists
    assert th.lengths.tolist() == [len(h) for h in hists]
    assert th.output_lengths.tolist() == [len(o) for o in outputs]
    assert th.max_length == fresh.max_length == max((len(h) for h in hists), default=0)
    assert (th.tokens[:, th.max_length:] == -1).all()
    assert torch.equal(th.output_counts(), fresh.output_counts())
    assert torch.equal(th.seen_mask(), fresh.seen_mask())
    assert_seen_ids_listed(th)
    w = th.max_length
    assert torch.equal(th.match_lengths()[:, :w], fresh.match_lengths()[:, :w])
    assert (th.match_lengths()[:, w:] == 0).all()
    hashes = th.prefix_hashes()
    for b, h in enumerate(hists):
        assert th.match_lengths()[b, : len(h)].tolist() == ref_match_lengths(h)
        for k in range(2):
            assert hashes[k, b, : len(h) + 1].tolist() == ref_prefix_hash(h, HASH_MODULI[k], HASH_BASES[k])


def random_histories(rng: random.Random, batch: int, alphabet: int = 3):
    prompts = [[rng.randrange(alphabet) for _ in range(rng.randrange(0, 6))] for _ in range(batch)]
    outputs = [[rng.randrange(alphabet) for _ in range(rng.randrange(0, 3))] for _ in range(batch)]
    return prompts, outputs


# ----------------------------------------------------------------------------- TokenHistory
@pytest.mark.parametrize("seed", range(6))
def test_history_masked_appends_equal_a_fresh_build(seed):
    """Many steps with random masks (all, none, some rows), derived state built at random
    points and queried at random intervals (so match lengths catch up over lags of 1 to
    more than 16 steps), selects in between."""
    rng = random.Random(seed)
    B = rng.randrange(1, 6)
    prompts, outputs = random_histories(rng, B)
    th = TokenHistory(prompts, outputs, V)
    for step in range(60):
        r = rng.random()
        if r < 0.1:
            mask = [True] * B
        elif r < 0.15:
            mask = [False] * B
        else:
            mask = [rng.random() < 0.5 for _ in range(B)]
        alphabet = 2 if step % 20 < 10 else V  # long repeats, then ordinary text
        ids = [rng.randrange(alphabet) if m else rng.choice([-1, V + 3, 0]) for m in mask]
        use_mask = not all(mask) or rng.random() < 0.5  # an all-True mask, or None
        th.append(torch.tensor(ids), rows=torch.tensor(mask) if use_mask else None)
        for b in range(B):
            if mask[b]:
                outputs[b].append(ids[b])
        q = rng.random()
        if q < 0.1:
            th.output_counts()
        elif q < 0.2:
            th.seen_mask(), th.seen_ids()
        elif q < 0.3:
            th.prefix_hashes()
        elif q < 0.5:
            th.match_lengths()
        elif q < 0.55 and B > 1:
            keep = sorted(rng.sample(range(B), rng.randrange(1, B + 1)))
            th = th.select(keep)
            prompts = [prompts[b] for b in keep]
            outputs = [outputs[b] for b in keep]
            B = len(keep)
        if step % 7 == 6:
            assert_same_state(th, prompts, outputs)
    assert_same_state(th, prompts, outputs)


def test_history_skipped_rows_keep_every_structure():
    """A skipped row's tokens, counts, seen mask, hashes and match lengths are untouched,
    also after the capacity grows; an all-False mask changes nothing."""
    prompts, outputs = [[1, 2, 1, 2, 1], [3] * 14], [[2], []]
    th = TokenHistory(prompts, outputs, V)
    assert th.capacity == 16
    th.output_counts(), th.seen_mask(), th.seen_ids(), th.prefix_hashes(), th.match_lengths()
    before = [t.clone() for t in (th.output_counts()[0], th.seen_mask()[0], th.prefix_hashes()[:, 0, :7],
                                  th.match_lengths()[0])]
    for _ in range(5):  # row 1 grows past the capacity (16), row 0 never advances
        th.append(torch.tensor([-1, 3]), rows=torch.tensor([False, True]))
        outputs[1].append(3)
    assert th.capacity == 32
    after = (th.output_counts()[0], th.seen_mask()[0], th.prefix_hashes()[:, 0, :7], th.match_lengths()[0])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2]) and torch.equal(after[3][:16], before[3])
    assert_same_state(th, prompts, outputs)
    steps = th._steps
    th.append(torch.tensor([7, 7]), rows=torch.tensor([False, False]))
    assert th._steps == steps
    assert_same_state(th, prompts, outputs)


def test_history_mask_gives_the_same_state_as_a_plain_append():
    rng = random.Random(3)
    prompts, outputs = random_histories(rng, 4)
    a, b = TokenHistory(prompts, outputs, V), TokenHistory(prompts, outputs, V)
    for th in (a, b):
        th.output_counts(), th.match_lengths()
    for _ in range(10):
        ids = torch.tensor([rng.randrange(3) for _ in range(4)])
        a.append(ids)
        b.append(ids, rows=torch.ones(4, dtype=torch.bool))
    assert a.to_lists() == b.to_lists()
    assert torch.equal(a.match_lengths(), b.match_lengths())
    assert torch.equal(a.output_counts(), b.output_counts())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), max_size=6), min_size=1, max_size=4),
    st.lists(st.tuples(st.lists(st.booleans(), min_size=4, max_size=4),
                       st.lists(st.integers(0, 2), min_size=4, max_size=4),
                       st.integers(0, 3)), max_size=25),
)
def test_history_masked_appends_property(prompts, steps):
    B = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(B)]
    th = TokenHistory(prompts, outputs, 3)
    th.match_lengths()
    for mask, ids, query in steps:
        mask, ids = mask[:B], ids[:B]
        th.append(torch.tensor(ids), rows=torch.tensor(mask))
        for b in range(B):
            if mask[b]:
                outputs[b].append(ids[b])
        if query == 0:
            th.match_lengths()
        elif query == 1:
            th.output_counts(), th.seen_mask(), th.seen_ids()
    assert_same_state(th, [list(p) for p in prompts], outputs)


def test_history_append_errors():
    th = TokenHistory([[1, 2], [3]], [[], [4]], V)
    with pytest.raises(ValueError, match="rows must be a bool mask"):
        th.append(torch.tensor([1, 2]), rows=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"rows must have shape \[2\]"):
        th.append(torch.tensor([1, 2]), rows=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"rows must have shape \[2\]"):
        th.append(torch.tensor([1, 2]), rows=torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        th.append(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="2 token ids"):
        th.append(torch.tensor([1, 2, 3]), rows=torch.tensor([True, True]))
    # a masked row's id is checked; a skipped row's is ignored
    with pytest.raises(ValueError, match=r"row 1 token id 99 outside \[0, vocab_size=16\)"):
        th.append(torch.tensor([-1, 99]), rows=torch.tensor([False, True]))
    assert th.to_lists() == [[1, 2], [3, 4]]  # nothing changed by the failed calls
    th.append(torch.tensor([-1, 5]), rows=torch.tensor([False, True]))
    assert th.to_lists() == [[1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------- SamplingBatch
PARAMS = [
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, seed=1),
    SamplingParams(dry_multiplier=1.0, dry_allowed_length=2, temperature=0.9, seed=2),
    SamplingParams(no_repeat_ngram_size=2, min_p=0.02, seed=3),
    SamplingParams(min_tokens=6, stop_token_ids=[5], xtc_probability=0.7, xtc_threshold=0.05, seed=4),
    SamplingParams(temperature=0.0, dry_multiplier=0.8, no_repeat_ngram_size=3),
    SamplingParams(top_k=5, top_p=0.9, seed=6),
]


@pytest.mark.parametrize("seed", range(3))
def test_batch_masked_appends_give_the_results_of_a_fresh_batch(seed):
    rng = random.Random(seed)
    B, VB = len(PARAMS), 64
    prompts = [[rng.randrange(6) for _ in range(rng.randrange(1, 10))] for _ in range(B)]
    outputs: list[list[int]] = [[] for _ in range(B)]
    batch = SamplingBatch(PARAMS, prompts, outputs, vocab_size=VB, eos_token_ids=0)
    pipe, pipe_fresh = SamplerPipeline("torch", seed=seed), SamplerPipeline("torch", seed=seed)
    for step in range(25):
        fresh = SamplingBatch(PARAMS, prompts, [list(o) for o in outputs], vocab_size=VB, eos_token_ids=0)
        assert batch.output_lengths.tolist() == [len(o) for o in outputs]
        logits = torch.randn(B, VB, generator=torch.Generator().manual_seed(100 * seed + step)) * 2
        logits[:, :6] += 2.0  # a small alphabet is likely, so repeats occur
        assert torch.equal(pipe.process(logits, batch), pipe_fresh.process(logits, fresh))
        got, want = pipe.sample(logits, batch), pipe_fresh.sample(logits, fresh)
        assert got.token_ids.tolist() == want.token_ids.tolist()
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)
        mask = [rng.random() < 0.6 for _ in range(B)]
        ids = torch.where(torch.tensor(mask), got.token_ids, -1)
        batch.append(ids, rows=torch.tensor(mask))
        for b in range(B):
            if mask[b]:
                outputs[b].append(int(got.token_ids[b]))
    assert_same_state(batch.history, prompts, outputs)


def test_batch_skipped_rows_keep_min_tokens_and_seeded_stream():
    """A row that does not advance keeps its output length: min_tokens still bans its stop
    ids and its seeded draw repeats (same Philox step counter)."""
    p = SamplingParams(min_tokens=2, stop_token_ids=[7], seed=11)
    batch = SamplingBatch([p, p], [[1], [1]], [[], []], vocab_size=1000, sequence_indices=[0, 0])
    pipe = SamplerPipeline("torch")
    logits = torch.zeros(2, 1000)
    first = pipe.sample(logits, batch).token_ids
    assert first[0] == first[1]
    for _ in range(2):
        batch.append(torch.tensor([3, 0]), rows=torch.tensor([True, False]))
    assert batch.output_lengths.tolist() == [2, 0]
    out = pipe.process(logits, batch)
    assert torch.isfinite(out[0, 7]) and torch.isinf(out[1, 7])
    again = pipe.sample(logits, batch).token_ids
    assert again[1] == first[1] and again[0] != first[0]


def test_batch_append_errors():
    batch = SamplingBatch([SamplingParams()] * 3, [[1], [2], [3]], None, vocab_size=V)
    with pytest.raises(ValueError, match="rows must be a bool mask"):
        batch.append(torch.tensor([1, 2, 3]), rows=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"rows must have shape \[3\]"):
        batch.append(torch.tensor([1, 2, 3]), rows=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        batch.append(torch.tensor([1.0, 2.0, 3.0]), rows=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        batch.append(torch.tensor([1, 2]), rows=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="token id 16 outside"):
        batch.append(torch.tensor([1, 16, 3]), rows=torch.tensor([False, True, False]))
    batch.append(torch.tensor([1, 16, 3]), rows=torch.tensor([True, False, True]))
    assert batch.history.to_lists() == [[1, 1], [2], [3, 3]]
    assert batch.output_lengths.tolist() == [1, 0, 1]
