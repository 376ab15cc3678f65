"""temperature then top_k as one step (F.temperature_top_k, the pipeline's fused unit): the
same bits as the two samplers one after the other, with the division left out for the entries
top_k removes only where that provably changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional import truncation

from logit_helpers import assert_fused_equals_unfused, fused_top_k_case, same_bits, spy_answers


def _reference(x: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return F.top_k(F.temperature(x, t), k)


def _spy(monkeypatch, name: str) -> list:
    return spy_answers(monkeypatch, truncation, name)


TEMPERATURES = [1.0, 0.7, 3.0, 0.05, 1e-6, 1e-5, 1.3, 250.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), vocab=st.sampled_from([4096, 8192, 32000]),
       removed=st.floats(0.0, 0.5))
def test_equals_temperature_then_top_k(seed, batch, vocab, removed):
    x, rng, k = fused_top_k_case(seed, batch, vocab, removed)
    t = torch.tensor(rng.choice(TEMPERATURES, batch), dtype=torch.float32)
    assert same_bits(F.temperature_top_k(x, t, k), _reference(x, t, k))


def test_the_candidates_answer_ordinary_rows(monkeypatch):
    calls = _spy(monkeypatch, "_temperature_top_k_by_candidates")
    x = torch.randn(8, 32000, generator=torch.Generator().manual_seed(1)) * 3
    t, k = torch.full((8,), 0.7), torch.full((8,), 50, dtype=torch.int64)
    assert same_bits(F.temperature_top_k(x, t, k), _reference(x, t, k))
    assert calls == [True]


def _boundary_ties(threshold_at_boundary: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A row whose k-th largest logit is 1.75 and which holds its neighbour below, which
    divided by 3 rounds onto the same quotient (near 0.58 the quotients of neighbouring floats
    are closer than the floats there): top_k of the scaled row keeps that neighbour too. With
    ``threshold_at_boundary`` ~3000 entries are 1.75, so the candidates' sampled threshold is
    1.75 itself and the neighbour is not a candidate: only the two samplers can answer."""
    vocab, k, kth = 32000, 40, np.float32(1.75)
    neighbour = np.nextafter(kth, np.float32(-np.inf))
    assert neighbour / np.float32(3) == kth / np.float32(3)
    rng = np.random.default_rng(0)
    row = rng.standard_normal(vocab).astype(np.float32) * np.float32(0.1) - 5
    at = rng.permutation(vocab)
    row[at[:k - 1]] = 10.0 + np.arange(k - 1, dtype=np.float32)  # above it: the k - 1 largest
    row[at[k - 1:k - 1 + (3000 if threshold_at_boundary else 1)]] = kth
    row[at[-5:]] = neighbour
    return torch.from_numpy(row).view(1, vocab), torch.tensor([3.0]), torch.tensor([k]), float(kth)


def test_rounding_onto_the_boundary_keeps_what_top_k_of_the_scaled_row_keeps(monkeypatch):
    calls = _spy(monkeypatch, "_temperature_top_k_by_candidates")
    x, t, k, kth = _boundary_ties(threshold_at_boundary=False)
    out, ref = F.temperature_top_k(x, t, k), _reference(x, t, k)
    assert same_bits(out, ref)
    kept = torch.isfinite(ref[0])
    # (the case is real: the scaled row keeps entries below the unscaled k-th largest)
    assert bool((x[0][kept] < kth).any()) and calls == [True]


def test_a_threshold_that_rounds_onto_the_boundary_takes_the_two_samplers(monkeypatch):
    calls = _spy(monkeypatch, "_temperature_top_k_by_candidates")
    x, t, k, kth = _boundary_ties(threshold_at_boundary=True)
    out, ref = F.temperature_top_k(x, t, k), _reference(x, t, k)
    assert same_bits(out, ref)
    assert int((x[0][torch.isfinite(ref[0])] < kth).sum()) == 5 and calls == [False]


@pytest.mark.parametrize("case", ["disabled top_k row", "nan", "large logits", "float16", "packed rows"])
def test_other_inputs_take_the_two_samplers(case):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32000, generator=g) * 3
    t, k = torch.tensor([0.7, 1.0, 2.0, 0.5]), torch.tensor([50, 50, 20, 200])
    if case == "disabled top_k row":
        k[1] = 0
    elif case == "nan":
        x[2, 7] = float("nan")
    elif case == "large logits":
        x[0, :100] = 3e38  # (divided by 0.7: past float32, saturated by temperature)
    elif case == "float16":
        x = x.half()
    elif case == "packed rows":
        x = F.top_k(x, torch.full((4,), 300))
    assert same_bits(F.temperature_top_k(x, t, k), _reference(x, t, k))


ORDERS = [None, ["top_k", "temperature"], ["temperature", "min_p", "top_k"], ["temperature", "typical_p", "top_k"]]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(6, 32000), (1, 128256)])
def test_pipeline_fused_equals_unfused(monkeypatch, order, shape):
    B, V = shape
    g = torch.Generator().manual_seed(B)
    logits = torch.randn(B, V, generator=g) * 3
    logits[:, 11::997] = float("-inf")
    empty = [[] for _ in range(B)]
    kinds = [dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=5),
             dict(temperature=1.0, top_k=200, seed=6),
             dict(dynatemp_min=0.5, dynatemp_max=1.5, top_k=100, seed=7),
             dict(temperature=0.0, top_k=10),  # greedy
             dict(temperature=1.7, top_k=5, typical_p=0.9, seed=8),
             dict(temperature=0.6, top_p=0.8, seed=9)]  # no top_k: its rows take the two units
    params = [SamplingParams(**kinds[r % len(kinds)], **({} if order is None else {"sampler_priority": order}))
              for r in range(B)]
    assert_fused_equals_unfused(monkeypatch, logits, SamplingBatch(params, empty, empty, vocab_size=V))


def test_pipeline_takes_the_fused_unit_for_temperature_then_top_k(monkeypatch):
    calls = _spy(monkeypatch, "_temperature_top_k_by_candidates")
    B, V = 8, 32000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3
    empty = [[] for _ in range(B)]
    batch = SamplingBatch(SamplingParams(temperature=0.8, top_k=40, top_p=0.9), empty, empty, vocab_size=V)
    SamplerPipeline("torch").process(logits, batch)
    assert calls == [True]
