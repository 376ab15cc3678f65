"""The full pipeline with every sampler enabled, and DRY alone.

Each round is one generation step: the batch is advanced by one token per row
(``batch.append``, untimed setup), then the timed call runs. History-derived state
(seen mask, output counts, match lengths) is built once before timing, as the first step
of a generation would, and is brought up to date incrementally inside the timed call.
"""

from __future__ import annotations

import pytest
import torch

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams

from bench_inputs import make_histories, make_logits, split_history

ROUNDS = 15
EOS = 2
BREAKERS = (10, 11, 12, 13)  # e.g. "\n", ":", '"', "*"


def _all_params(row: int) -> SamplingParams:
    """Every sampler enabled; half the rows use dynatemp instead of a static temperature,
    some rows are seeded, some ask for logprobs."""
    dyn = row % 2 == 1
    return SamplingParams(
        repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1,
        logit_bias={100 + row: 2.0, 7: -5.0},
        no_repeat_ngram_size=4, min_tokens=2048, max_tokens=4096,
        dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_sequence_breaker_ids=BREAKERS,
        temperature=0.9, dynatemp_min=0.5 if dyn else 0.0, dynatemp_max=1.5 if dyn else 0.0,
        smoothing_factor=0.2,
        top_k=200, top_p=0.95, top_a=0.05, min_p=0.02, tfs=0.98, eta_cutoff=3e-4, epsilon_cutoff=3e-4,
        typical_p=0.98, nsigma=3.0, xtc_threshold=0.1, xtc_probability=0.5, skew=0.2,
        seed=1234 + row if row % 4 == 0 else None,
        logprobs=5 if row % 3 == 0 else None,
    )


def _stepper(batch: SamplingBatch):
    g = torch.Generator().manual_seed(7)

    def setup():
        batch.append(torch.randint(0, 5000, (batch.batch_size,), generator=g))

    return setup


@pytest.mark.parametrize("shape", [(64, 32000), (8, 128256)], ids=["64x32000", "8x128256"])
def test_full_pipeline(benchmark, shape):
    B, V = shape
    logits = make_logits(B, V, seed=2)
    prompts, outputs = split_history(make_histories(B, 4096, V, seed=2), 1024)
    batch = SamplingBatch([_all_params(b) for b in range(B)], prompts, outputs, vocab_size=V,
                          eos_token_ids=EOS)
    assert batch.active == frozenset(batch.schedule[i][0] for i in range(len(batch.schedule)))
    assert len(batch.active) == 14  # every ordered sampler (plus logit_bias, min_tokens, skew)
    pipe = SamplerPipeline("torch", seed=0)
    benchmark.group = f"full pipeline [{B}, {V}]"
    benchmark.extra_info.update(impl="pipeline", sampler="all samplers (sample)", shape=f"[{B}, {V}]",
                                history=4096)
    pipe.sample(logits, batch)
    benchmark.pedantic(lambda: pipe.sample(logits, batch), setup=_stepper(batch), rounds=ROUNDS, iterations=1)


DRY_B, DRY_V, DRY_HIST = 64, 32000, 8192


@pytest.fixture(scope="module")
def dry_batch():
    prompts, outputs = split_history(make_histories(DRY_B, DRY_HIST, DRY_V, seed=3), 1024)
    return SamplingBatch(
        SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                       dry_sequence_breaker_ids=BREAKERS),
        prompts, outputs, vocab_size=DRY_V,
    )


def test_dry_functional(benchmark, dry_batch):
    b = dry_batch
    logits = make_logits(DRY_B, DRY_V, seed=3)
    args = (b.history, b.param("dry_multiplier"), b.param("dry_base"), b.param("dry_allowed_length"),
            b.param("dry_range"), b.dry_sequence_breaker_ids)
    benchmark.group = f"dry [{DRY_B}, {DRY_V}], {DRY_HIST}-token history"
    benchmark.extra_info.update(impl="functional", sampler="dry", shape=f"[{DRY_B}, {DRY_V}]", history=DRY_HIST,
                                target_ms=3)
    F.dry(logits, *args)
    benchmark.pedantic(lambda: F.dry(logits, *args), setup=_stepper(b), rounds=ROUNDS, iterations=1)


def test_dry_pipeline(benchmark, dry_batch):
    b = dry_batch
    logits = make_logits(DRY_B, DRY_V, seed=3)
    pipe = SamplerPipeline("torch", seed=0)
    benchmark.group = f"dry [{DRY_B}, {DRY_V}], {DRY_HIST}-token history"
    benchmark.extra_info.update(impl="pipeline", sampler="dry", shape=f"[{DRY_B}, {DRY_V}]", history=DRY_HIST,
                                target_ms=3)
    pipe.process(logits, b)
    benchmark.pedantic(lambda: pipe.process(logits, b), setup=_stepper(b), rounds=ROUNDS, iterations=1)


def test_dry_cold(benchmark):
    """First step of a generation: the history is built from lists and DRY's match lengths
    computed from scratch (informational; the 3 ms target of issue 15 is for the per-step cost)."""
    prompts, outputs = split_history(make_histories(DRY_B, DRY_HIST, DRY_V, seed=3), 1024)
    logits = make_logits(DRY_B, DRY_V, seed=3)
    params = SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                            dry_sequence_breaker_ids=BREAKERS)
    pipe = SamplerPipeline("torch", seed=0)

    def first_step():
        batch = SamplingBatch(params, prompts, outputs, vocab_size=DRY_V)
        return pipe.process(logits, batch)

    benchmark.group = f"dry [{DRY_B}, {DRY_V}], {DRY_HIST}-token history"
    benchmark.extra_info.update(impl="pipeline (cold: batch built + first step)", sampler="dry",
                                shape=f"[{DRY_B}, {DRY_V}]", history=DRY_HIST)
    benchmark.pedantic(first_step, rounds=3, iterations=1)
