"""``SamplingBatch``'s construction: every per-row tensor and batch-wide fact, checked
against the rows' parameters field by field (re-derived here from ``SamplingParams``'
public fields, with none of the batch's code), for random batches of fresh and repeated
parameter objects; and the checks on ``sequence_indices``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import SamplerID, SamplingBatch, SamplingParams
from samplers.batch import FLOAT_FIELDS, INT_FIELDS

V = 50


@st.composite
def params(draw):
    temperature = draw(st.sampled_from([0.0, 0.5, 1.0, 1.3]))
    dynatemp = draw(st.sampled_from([(0.0, 0.0), (0.5, 1.5), (0.0, 2.0)]))
    min_tokens = draw(st.sampled_from([0, 2]))
    return SamplingParams(
        temperature=temperature, dynatemp_min=dynatemp[0], dynatemp_max=dynatemp[1],
        top_k=draw(st.sampled_from([0, 5])), top_p=draw(st.sampled_from([1.0, 0.9])),
        min_p=draw(st.sampled_from([0.0, 0.05])), skew=draw(st.sampled_from([0.0, 0.5, -1.0])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.2])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.3])),
        presence_penalty=draw(st.sampled_from([0.0, -0.2])),
        logit_bias=draw(st.sampled_from([None, {1: 2.0}, {4: -1.5, 0: 0.25}])),
        min_tokens=min_tokens, stop_token_ids=draw(st.sampled_from([(), (3,), (7, 3)])),
        dry_multiplier=draw(st.sampled_from([0.0, 0.8])),
        dry_sequence_breaker_ids=draw(st.sampled_from([(), (2,), (5, 6, 9)])),
        no_repeat_ngram_size=draw(st.sampled_from([0, 3])),
        seed=draw(st.sampled_from([None, 0, -5, 2**40 + 3, 2**64 - 1])),
        logprobs=draw(st.sampled_from([None, 0, 3])),
        logprobs_mode=draw(st.sampled_from(["processed", "raw"])),
        sampler_priority=draw(st.sampled_from([None, ["MIN_P", "TEMPERATURE"], ["TOP_P_TOP_K"]])),
        temperature_last=draw(st.booleans()),
    )


def expected_facts(P, eos):
    """The batch's per-row values and facts, from the fields alone."""
    greedy = [p.temperature < 1e-5 for p in P]
    dyn = [(p.dynatemp_min != 0 or p.dynatemp_max != 0) and not g for p, g in zip(P, greedy)]
    orders = [p.enabled_order() for p in P]
    bans = [list(dict.fromkeys(tuple(eos) + tuple(p.stop_token_ids))) if p.min_tokens else [] for p in P]
    seeds = [(p.seed % 2**64) if p.seed is not None else 0 for p in P]
    return dict(
        floats={f: [float(np.float32(getattr(p, f))) for p in P] for f in FLOAT_FIELDS},
        ints={f: [getattr(p, f) for p in P] for f in INT_FIELDS},
        greedy=greedy, dyn=dyn, orders=orders,
        static=[not g and not d and p.temperature != 1.0 for p, g, d in zip(P, greedy, dyn)],
        identity=[not o and not p.logit_bias and p.min_tokens == 0 and p.skew == 0
                  for p, o in zip(P, orders)],
        key_lo=[s & 0xFFFFFFFF for s in seeds], key_hi=[s >> 32 for s in seeds],
        seeded=[p.seed is not None for p in P],
        bias=sorted((b, t, v) for b, p in enumerate(P) for t, v in (p.logit_bias or {}).items()),
        bans=sorted((b, t) for b, ids in enumerate(bans) for t in ids),
        breakers=[list(p.dry_sequence_breaker_ids) for p in P],
        raw=[p.logprobs_mode == "raw" for p in P],
        logprobs=[p.logprobs for p in P],
    )


def check_batch(batch, P, eos=(), sequence_indices=None):
    want = expected_facts(P, eos)
    B = len(P)
    for f in FLOAT_FIELDS:
        assert batch.param(f).dtype == torch.float32
        assert batch.param(f).tolist() == want["floats"][f], f
    for f in INT_FIELDS:
        assert batch.param(f).dtype == torch.int64
        assert batch.param(f).tolist() == want["ints"][f], f
    temperature = want["floats"]["temperature"]
    assert batch.param("static_temperature").tolist() == [
        1.0 if g or d else t for g, d, t in zip(want["greedy"], want["dyn"], temperature)]
    for name, field in (("dynatemp_min_active", "dynatemp_min"), ("dynatemp_max_active", "dynatemp_max")):
        assert batch.param(name).tolist() == [v if d else 0.0 for v, d in zip(want["floats"][field], want["dyn"])]
    assert batch.greedy.tolist() == want["greedy"] and batch.all_greedy == all(want["greedy"])
    assert batch.any_dynatemp == any(want["dyn"])
    assert batch.any_static_temperature == any(want["static"])
    assert batch.orders == want["orders"]
    assert batch.active == frozenset(s for o in want["orders"] for s in o)
    assert batch.identity_rows.tolist() == want["identity"]
    assert batch.all_identity == all(want["identity"]) and batch.any_identity == any(want["identity"])
    assert batch.any_skew == any(p.skew != 0 for p in P)
    assert batch.any_top_k == any(p.top_k > 0 for p in P)
    assert batch.any_top_p == any(p.top_p < 1 for p in P)
    assert batch.any_repetition_penalty == any(p.repetition_penalty != 1 for p in P)
    assert batch.any_count_penalty == any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in P)
    assert batch.key_lo.tolist() == want["key_lo"] and batch.key_hi.tolist() == want["key_hi"]
    assert batch.seeded.tolist() == want["seeded"] and batch.all_seeded == all(want["seeded"])
    assert batch.sequence_indices.tolist() == (sequence_indices or [0] * B)
    if want["bias"]:
        rows, ids, values = batch.logit_bias_coo
        got = sorted(zip(rows.tolist(), ids.tolist(), values.tolist()))
        assert got == [(b, t, float(np.float32(v))) for b, t, v in want["bias"]]
    else:
        assert batch.logit_bias_coo is None
    if want["bans"]:
        assert sorted(zip(*(t.tolist() for t in batch.min_tokens_coo))) == want["bans"]
    else:
        assert batch.min_tokens_coo is None
    width = max(1, max(map(len, want["breakers"])))
    assert batch.dry_sequence_breaker_ids.tolist() == [r + [-1] * (width - len(r)) for r in want["breakers"]]
    assert batch.raw_logprobs.tolist() == want["raw"] and batch.any_raw_logprobs == any(want["raw"])
    assert batch.max_logprobs == max(p or 0 for p in want["logprobs"])
    assert batch.wants_logprobs == any(p is not None for p in want["logprobs"])
    assert batch.may_remove_every_token == (
        bool(want["bans"]) or bool(batch.active & {SamplerID.NO_REPEAT_NGRAM, SamplerID.DRY}))


@settings(max_examples=60, deadline=None)
@given(pool=st.lists(params(), min_size=1, max_size=5), picks=st.lists(st.integers(0, 4), min_size=1, max_size=9),
       data=st.data())
def test_batch_holds_each_rows_parameters(pool, picks, data):
    # Rows reuse parameter objects (an engine's slots keep theirs between rebuilds), so the
    # second batch is built from objects the first one has seen.
    P = [pool[i % len(pool)] for i in picks]
    eos = data.draw(st.sampled_from([None, 11, [11, 3]]))
    seq = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 2**32 - 1), min_size=len(P), max_size=len(P))))
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    for _ in range(2):
        batch = SamplingBatch(P, vocab_size=V, eos_token_ids=eos, sequence_indices=seq)
        check_batch(batch, P, eos_ids, seq)
    # a selection re-derives its facts from the rows it keeps
    keep = data.draw(st.lists(st.integers(0, len(P) - 1), min_size=1, max_size=6))
    check_batch(batch.select(keep), [P[r] for r in keep], eos_ids, seq and [seq[r] for r in keep])


def test_a_replaced_parameter_object_is_a_new_row():
    """The record a batch takes from a parameter object is that object's: a copy made with
    ``dataclasses.replace`` has its own values."""
    p = SamplingParams(temperature=0.7, top_k=5, seed=1, logit_bias={2: 1.0})
    q = dataclasses.replace(p, temperature=1.0, top_k=0, seed=None, logit_bias=None, skew=0.5)
    SamplingBatch([p], vocab_size=V)
    check_batch(SamplingBatch([p, q, p], vocab_size=V), [p, q, p])


@pytest.mark.parametrize("bad", [[0, -1], [0, 2**32], [0, True], [0, 1.5], [0, "1"], [0], (0, None)])
def test_sequence_indices_are_checked(bad):
    with pytest.raises(ValueError, match="sequence_indices"):
        SamplingBatch([SamplingParams()] * 2, vocab_size=V, sequence_indices=bad)


def test_sequence_indices_take_numpy_integers():
    batch = SamplingBatch([SamplingParams()] * 2, vocab_size=V, sequence_indices=[np.int64(3), np.uint32(2**32 - 1)])
    assert batch.sequence_indices.tolist() == [3, 2**32 - 1]
