"""Per sampler, side by side on the same inputs: Hugging Face transformers' logits warper /
processor, our pure function (``samplers.functional``) and our pipeline with only that
sampler enabled (``SamplerPipeline("torch").process``, i.e. the whole processing path without
the draw, like a warper).

HF's warpers take one scalar for the whole batch, so every row uses the same value (ours
still receive it as a per-row ``[B]`` tensor). History-based samplers (repetition penalty,
no_repeat_ngram) see a 4096-token history per row; ours advance it by one token before
each round (``batch.append``, not timed), so the timed call includes the incremental update
of the history's derived state that a real generation step pays. HF recomputes from
``input_ids`` every call.
"""

from __future__ import annotations

import pytest
import torch

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams

from bench_inputs import make_histories, make_logits, split_history

B, V = 64, 32000
HIST = 4096
OUTPUT_LEN = 1024
ROUNDS = 30


def _hf():
    return pytest.importorskip("transformers.generation.logits_process")


def _full(value, dtype=torch.float32):
    return torch.full((B,), value, dtype=dtype)


# name -> (HF constructor, our functional call, SamplingParams kwargs, needs history)
SAMPLERS = {
    "top_k": (
        lambda hf: hf.TopKLogitsWarper(50),
        lambda x, h: F.top_k(x, _full(50, torch.int64)),
        dict(top_k=50),
    ),
    "top_p": (
        lambda hf: hf.TopPLogitsWarper(0.9),
        lambda x, h: F.top_p(x, _full(0.9)),
        dict(top_p=0.9),
    ),
    "min_p": (
        lambda hf: hf.MinPLogitsWarper(0.05),
        lambda x, h: F.min_p(x, _full(0.05)),
        dict(min_p=0.05),
    ),
    "typical_p": (
        lambda hf: hf.TypicalLogitsWarper(mass=0.9),
        lambda x, h: F.typical_p(x, _full(0.9)),
        dict(typical_p=0.9),
    ),
    "epsilon_cutoff": (
        lambda hf: hf.EpsilonLogitsWarper(3e-4),
        lambda x, h: F.epsilon_cutoff(x, _full(3e-4)),
        dict(epsilon_cutoff=3e-4),
    ),
    "eta_cutoff": (
        lambda hf: hf.EtaLogitsWarper(3e-4),
        lambda x, h: F.eta_cutoff(x, _full(3e-4)),
        dict(eta_cutoff=3e-4),
    ),
    "repetition_penalty": (
        lambda hf: hf.RepetitionPenaltyLogitsProcessor(1.2),
        lambda x, h: F.penalties(x, h.seen_mask(), h.output_counts(), _full(1.2), _full(0.0), _full(0.0)),
        dict(repetition_penalty=1.2),
    ),
    "no_repeat_ngram": (
        lambda hf: hf.NoRepeatNGramLogitsProcessor(3),
        lambda x, h: F.no_repeat_ngram(x, h, _full(3, torch.int64)),
        dict(no_repeat_ngram_size=3),
    ),
}


@pytest.fixture(scope="module")
def inputs():
    logits = make_logits(B, V, seed=1)
    rows = make_histories(B, HIST, V, seed=1)
    return logits, rows


def _batch(rows, **kw) -> SamplingBatch:
    prompts, outputs = split_history(rows, OUTPUT_LEN)
    return SamplingBatch(SamplingParams(**kw), prompts, outputs, vocab_size=V)


def _stepper(batch: SamplingBatch):
    """A pedantic ``setup`` that advances every row of ``batch`` by one token (untimed)."""
    g = torch.Generator().manual_seed(7)

    def setup():
        batch.append(torch.randint(0, 5000, (batch.batch_size,), generator=g))

    return setup


CASES = [(name, impl) for name in SAMPLERS for impl in ("hf", "functional", "pipeline")]


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_sampler(benchmark, inputs, name, impl):
    """One sampler, one implementation. Parametrised sampler-major, so the three
    implementations of a sampler run one right after the other (on a shared machine the
    background load drifts less between them)."""
    make_hf, ours, kw = SAMPLERS[name]
    logits, rows = inputs
    benchmark.group = f"{name} [{B}, {V}]"
    benchmark.extra_info.update(impl=impl, sampler=name, shape=f"[{B}, {V}]", history=HIST)
    if impl == "hf":
        warper = make_hf(_hf())
        input_ids = torch.tensor(rows, dtype=torch.int64)
        warper(input_ids, logits.clone())  # warm-up
        benchmark.pedantic(lambda: warper(input_ids, logits), rounds=ROUNDS, iterations=1, warmup_rounds=2)
        return
    batch = _batch(rows, **kw)
    if impl == "functional":
        h = batch.history
        ours(logits, h)  # builds the history's derived state once (as the first step would)
        call = lambda: ours(logits, h)  # noqa: E731
    else:
        pipe = SamplerPipeline("torch", seed=0)
        pipe.process(logits, batch)
        call = lambda: pipe.process(logits, batch)  # noqa: E731
    benchmark.pedantic(call, setup=_stepper(batch), rounds=ROUNDS, iterations=1)
