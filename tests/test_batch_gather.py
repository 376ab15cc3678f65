"""``SamplingBatch.gather`` and ``TokenHistory.from_tensors``: the device-side batch an engine
builds per step (rows -> parameter-table rows, histories from its own token buffers) must
process logits exactly like a ``SamplingBatch`` built from the same rows' parameters and
token lists."""

from __future__ import annotations

import random

import pytest
import torch

from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.history import TokenHistory
from samplers.sampling import PURPOSE_DRAW, row_uniforms

V = 40

PARAMS = [
    SamplingParams(),
    SamplingParams(dry_multiplier=0.8, dry_allowed_length=2, repetition_penalty=1.3,
                   dry_sequence_breaker_ids=[1]),
    SamplingParams(min_p=0.05, temperature=0.7, frequency_penalty=0.4, seed=3),
    # orders that conflict with the default one: the schedule needs per-row masks
    SamplingParams(top_k=10, temperature=1.5, sampler_priority=["TEMPERATURE", "TOP_P_TOP_K"]),
    SamplingParams(top_k=5, temperature=0.5, min_p=0.1, sampler_priority=["TOP_P_TOP_K", "MIN_P", "TEMPERATURE"]),
    SamplingParams(logit_bias={3: 5.0, 7: -100.0, 0: 1.5}, typical_p=0.8, min_tokens=4, stop_token_ids=[5, 6]),
    SamplingParams(logit_bias={9: -2.0}, min_tokens=2, stop_token_ids=[8]),
    SamplingParams(min_tokens=3),  # no stop id at all: min_tokens bans nothing
    SamplingParams(no_repeat_ngram_size=2, xtc_probability=0.7, xtc_threshold=0.02, seed=11),
    SamplingParams(temperature=0.0, dry_multiplier=1.0),
]


def histories(rng, rows):
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(0, 9))] for _ in range(rows)]
    outputs = [[rng.randrange(V) for _ in range(rng.randrange(0, 7))] for _ in range(rows)]
    return prompts, outputs


def from_tensors(prompts, outputs, slack=3):
    rows = [p + o for p, o in zip(prompts, outputs)]
    width = max(map(len, rows), default=0) + slack
    tokens = torch.full((len(rows), width), 7777, dtype=torch.int32)  # junk beyond each length
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r, dtype=torch.int32)
    lengths = torch.tensor([len(r) for r in rows])
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    return TokenHistory.from_tensors(tokens, lengths, prompt_lengths, V, width)


def test_history_from_tensors_matches_lists():
    rng = random.Random(0)
    prompts, outputs = histories(rng, 6)
    prompts[0], outputs[0] = [1, 2, 3, 1, 2, 3, 1, 2], [3, 1, 2, 3, 1, 2, 3, 1, 2]  # long matches
    ref = TokenHistory(prompts, outputs, V)
    got = from_tensors(prompts, outputs)
    assert got.to_lists() == ref.to_lists()
    assert torch.equal(got.output_lengths, ref.output_lengths)
    assert torch.equal(got.output_counts(), ref.output_counts())
    assert torch.equal(got.seen_mask(), ref.seen_mask())
    n = ref.max_length
    assert torch.equal(got.match_lengths()[:, :n], ref.match_lengths()[:, :n])
    with pytest.raises(ValueError, match="max_length"):
        TokenHistory.from_tensors(torch.zeros(1, 3, dtype=torch.int64), torch.tensor([1]), torch.tensor([0]), V, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_processes_like_a_batch_built_from_the_rows(seed):
    rng = random.Random(seed)
    table = SamplingBatch(PARAMS, vocab_size=V, sequence_indices=list(range(len(PARAMS))))
    rows = 12
    index = [rng.randrange(len(PARAMS)) for _ in range(rows)]  # repeats, any order
    prompts, outputs = histories(rng, rows)
    gathered = table.gather(torch.tensor(index), from_tensors(prompts, outputs))
    built = SamplingBatch([PARAMS[i] for i in index], prompts, outputs, vocab_size=V, sequence_indices=index)
    assert any(mask is not None for _, mask in table.schedule)  # the masked schedule is exercised
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3
    pipe = SamplerPipeline(backend="torch", seed=0)
    seeded = torch.tensor([PARAMS[i].seed is not None for i in index])
    got, want = pipe.process(logits, gathered), pipe.process(logits, built)
    # Unseeded rows' XTC coins come from a fresh key per call: compare the seeded and the
    # rows without XTC; all rows' removed sets must agree where no randomness is involved.
    no_random = torch.tensor([PARAMS[i].xtc_probability == 0 or PARAMS[i].seed is not None for i in index])
    torch.testing.assert_close(got[no_random], want[no_random], rtol=0, atol=0)
    assert no_random.sum() >= rows // 2
    # the draw's stream: keys, sequence indices and output lengths gathered per row
    u_got = row_uniforms(gathered.key_lo, gathered.key_hi, gathered.output_lengths, gathered.sequence_indices,
                         PURPOSE_DRAW)
    u_want = row_uniforms(built.key_lo, built.key_hi, built.output_lengths, built.sequence_indices, PURPOSE_DRAW)
    assert torch.equal(u_got[seeded], u_want[seeded])
    assert torch.equal(gathered.greedy, built.greedy)


@pytest.mark.parametrize("index", [[1, 2, 8, 2], [3, 0, 5, 0], [0, 0, 0]])
def test_gather_with_the_rows_taken_knows_its_default_rows(index):
    """``rows_taken`` (the host's copy of which table rows ``index`` takes) makes the
    default-row facts exact: a batch without a default row skips the pass that restores
    such rows, one with them still returns them unchanged, and the result is bit-identical
    to the gather without it."""
    rng = random.Random(len(index))
    table = SamplingBatch(PARAMS, vocab_size=V, sequence_indices=list(range(len(PARAMS))))
    assert table.any_identity and not table.all_identity  # row 0: every parameter at its default
    prompts, outputs = histories(rng, len(index))
    plain = table.gather(torch.tensor(index), from_tensors(prompts, outputs))
    known = table.gather(torch.tensor(index), from_tensors(prompts, outputs), rows_taken=sorted(set(index)))
    assert plain.any_identity and not plain.all_identity  # the table's facts: a superset
    assert known.any_identity == (0 in index) and known.all_identity == all(i == 0 for i in index)
    logits = torch.randn(len(index), V, generator=torch.Generator().manual_seed(1)) * 3
    pipe = SamplerPipeline(backend="torch", seed=0)
    got = pipe.process(logits, known)
    assert torch.equal(got, pipe.process(logits, plain))
    default = torch.tensor(index) == 0
    assert torch.equal(got[default], logits[default])


def test_a_gathered_batch_refuses_select_and_gather():
    """A batch made by ``gather`` keeps its source's host-side row facts (which rows are
    default, the padded bias lists), so gathering from it again would use the wrong rows'
    facts: before the refusal, ``[default, temperature=0.5]`` gathered with ``[1, 0]`` and
    then ``rows_taken=[0]`` judged its one row default and returned it unprocessed."""
    table = SamplingBatch([SamplingParams(), SamplingParams(temperature=0.5)], vocab_size=V)
    prompts, outputs = histories(random.Random(0), 2)
    once = table.gather(torch.tensor([1, 0]), from_tensors(prompts, outputs))
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    assert torch.equal(SamplerPipeline(backend="torch").process(logits, once)[0], logits[0] / 0.5)
    with pytest.raises(ValueError, match="gather: this batch was made by gather"):
        once.gather(torch.tensor([0]), from_tensors(prompts[:1], outputs[:1]), rows_taken=[0])
    with pytest.raises(ValueError, match="select: this batch was made by gather"):
        once.select([0])
