"""nsigma then top_k as one step (F.nsigma_top_k, the pipeline's fused unit): the same bits as
the two samplers one after the other, with nsigma's [B, V] result left out where top_k's
candidates answer."""

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


def _reference(x: torch.Tensor, n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return F.top_k(F.nsigma(x, n), k)


def _spy(monkeypatch, name: str) -> list:
    return spy_answers(monkeypatch, truncation, name)


def _numpy_nsigma_top_k(x: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The two rules re-implemented in float64 statistics, for rows of finite logits: keep
    ``l >= max - n * std`` (sample std; every entry when n = 0), then the entries not below
    the k-th largest of those kept (all of them when fewer than k)."""
    out = np.full_like(x, -np.inf)
    for r, row in enumerate(x.astype(np.float64)):
        tau = row.max() - n[r] * row.std(ddof=1) if n[r] > 0 else -np.inf
        passed = np.sort(row[row >= tau])[::-1]
        floor = passed[k[r] - 1] if passed.size >= k[r] else -np.inf
        keep = (row >= tau) & (row >= floor)
        out[r, keep] = x[r, keep]
    return out


# nsigma values: 0 (off), a few kept (fewer than k: nsigma decides), many kept (top_k decides)
NSIGMAS = [0.0, 0.05, 0.3, 1.0, 3.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), vocab=st.sampled_from([4096, 8192, 32000]),
       removed=st.floats(0.0, 0.5))
def test_equals_nsigma_then_top_k(seed, batch, vocab, removed):
    x, rng, k = fused_top_k_case(seed, batch, vocab, removed)
    n = torch.tensor(rng.choice(NSIGMAS, batch), dtype=torch.float32)
    assert same_bits(F.nsigma_top_k(x, n, k), _reference(x, n, k))


def test_the_candidates_answer_ordinary_rows_with_either_rule_deciding(monkeypatch):
    """Rows where nsigma keeps fewer than k (its threshold decides) and rows where it keeps
    more (the k-th largest decides), against an independent float64 re-implementation (the
    float32 statistics may differ from it only at the threshold's last ulp: no entry lies there)."""
    calls = _spy(monkeypatch, "_nsigma_top_k_by_candidates")
    x = torch.randn(8, 32000, generator=torch.Generator().manual_seed(1)) * 3
    n = torch.tensor([0.05, 0.3, 3.0, 0.0, 0.05, 1.0, 3.0, 0.3])
    k = torch.full((8,), 200, dtype=torch.int64)
    out = F.nsigma_top_k(x, n, k)
    assert same_bits(out, _reference(x, n, k)) and calls == [True]
    assert np.array_equal(out.numpy(), _numpy_nsigma_top_k(x.numpy(), n.numpy(), k.numpy()))
    kept = torch.isfinite(out).sum(dim=-1)
    assert int(kept[0]) < 200 and int(kept[2]) == 200  # (both rules decide somewhere)


@pytest.mark.parametrize("case", ["disabled top_k row", "nan", "+inf", "float16", "packed rows", "large k"])
def test_other_inputs_take_the_two_samplers(monkeypatch, case):
    calls = _spy(monkeypatch, "_nsigma_top_k_by_candidates")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32000, generator=g) * 3
    n, k = torch.tensor([1.0, 0.0, 0.2, 3.0]), torch.tensor([50, 50, 20, 200])
    if case == "disabled top_k row":
        k[1] = 0
    elif case == "nan":
        x[2, 7] = float("nan")
    elif case == "+inf":
        x[0, 3] = float("inf")
    elif case == "float16":
        x = x.half()
    elif case == "packed rows":
        x = F.top_k(x, torch.full((4,), 300))
    elif case == "large k":
        k[3] = 32000 // 4
    assert same_bits(F.nsigma_top_k(x, n, k), _reference(x, n, k))
    assert calls == [False]


def test_nsigma_top_k_checks_its_arguments():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="nsigma"):
        F.nsigma_top_k(x, torch.tensor([1.0, -1.0]), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="top_k"):
        F.nsigma_top_k(x, torch.tensor([1.0, 1.0]), torch.tensor([5]))


ORDERS = [None, ["top_nsigma", "top_k"], ["temperature", "top_nsigma", "min_p", "top_k"],
          ["top_k", "top_nsigma"]]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(6, 32000), (1, 128256)])
def test_pipeline_fused_equals_unfused(monkeypatch, order, shape):
    B, V = shape
    g = torch.Generator().manual_seed(B)
    logits = torch.randn(B, V, generator=g) * 3
    logits[:, 11::997] = float("-inf")
    empty = [[] for _ in range(B)]
    kinds = [dict(nsigma=1.0, top_k=40, top_p=0.9, min_p=0.02, seed=5),
             dict(nsigma=0.05, top_k=200, temperature=0.7, seed=6),
             dict(nsigma=3.0, dynatemp_min=0.5, dynatemp_max=1.5, top_k=100, seed=7),
             dict(nsigma=0.5, top_k=10, temperature=0.0),  # greedy
             dict(top_k=5, typical_p=0.9, seed=8),  # no nsigma
             dict(nsigma=2.0, top_p=0.8, seed=9)]  # no top_k: its rows take the two units
    params = [SamplingParams(**kinds[r % len(kinds)], **({} if order is None else {"sampler_priority": order}))
              for r in range(B)]
    assert_fused_equals_unfused(monkeypatch, logits, SamplingBatch(params, empty, empty, vocab_size=V))


def test_pipeline_takes_the_fused_unit_for_nsigma_then_top_k(monkeypatch):
    calls = _spy(monkeypatch, "_nsigma_top_k_by_candidates")
    B, V = 8, 32000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3
    empty = [[] for _ in range(B)]
    batch = SamplingBatch(SamplingParams(temperature=0.8, nsigma=1.5, top_k=40, top_p=0.9), empty, empty,
                          vocab_size=V)
    SamplerPipeline("torch").process(logits, batch)
    assert calls == [True]
