"""min_p on full rows decides its tokens from the logits near the threshold
(``truncation._min_p_by_candidates``): the same tensor, bit for bit, as the full softmax path,
and the rule's kept set against a float64 numpy implementation.

The full path is forced by raising ``_MIN_P_SMALLEST`` past every min_p (the candidates
refuse). Tokens whose ``exp(l - max)`` lies within ``_MIN_P_MARGIN`` of min_p are decided
with the softmax's exact terms: rows built to have such tokens check that branch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional import _stats
from samplers.functional import truncation as T
from logit_helpers import bits
from test_top_p_candidates import KINDS, _spy, run_cases


def _full_path(monkeypatch, x: torch.Tensor, mp: torch.Tensor) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(T, "_MIN_P_SMALLEST", float("inf"))
        return F.min_p(x, mp)


def _numpy_min_p(x: np.ndarray, mp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keep t iff p(t) >= min_p * p_max, in float64; also where float32 may decide either way."""
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    keep = (e >= mp[:, None]) | (mp[:, None] <= 0)
    close = np.abs(e - mp[:, None]) <= 1e-5 * mp[:, None]
    return keep, close


def _borderline(rng: np.random.Generator, B: int, V: int, mp: float) -> np.ndarray:
    """Rows with tokens whose exp(l - max) is min_p up to a few float32 steps of l."""
    x = (rng.standard_normal((B, V)) * 2).astype(np.float32)
    m = x.max(axis=-1)
    at = (m.astype(np.float64) + np.log(mp)).astype(np.float32)
    for d in range(-3, 4):
        x[:, 100 + d] = np.nextafter(at, np.float32(np.inf) if d > 0 else np.float32(-np.inf)) if d else at
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_min_p_candidates_equal_the_full_path(kind, monkeypatch):
    used = run_cases(monkeypatch, np.random.default_rng(100 + KINDS.index(kind)), kind, F.min_p,
                     "_min_p_by_candidates", _full_path, _numpy_min_p,
                     lambda rng, B: (np.full(B, 0.05), rng.uniform(1e-4, 1.0, B),
                                     rng.choice([0.0, 0.1, 1.0], B), np.full(B, 1e-30)))
    if kind == "truncated":
        assert not any(used)  # rows mostly -inf are packed (compact_rows) first
    elif kind != "flat":  # (flat rows: many candidates at a small min_p, the full path)
        assert sum(used) >= len(used) // 2, used


def test_tokens_at_the_threshold_take_the_exact_test(monkeypatch):
    """Tokens whose e is min_p within a few float32 steps: decided with the softmax's terms,
    as the full path decides them."""
    rng = np.random.default_rng(8)
    exact = _spy(monkeypatch, T, "softmax_terms")
    for mp in (0.05, 0.3, 0.02):
        x = _borderline(rng, 4, 8192, mp)
        mt = torch.full((4,), mp)
        exact.clear()
        fast = F.min_p(torch.from_numpy(x), mt)
        assert len(exact) == 1, mp  # the candidates' exact test (the full path was not taken)
        assert torch.equal(bits(fast), bits(_full_path(monkeypatch, torch.from_numpy(x), mt)))


def test_min_p_candidates_with_disabled_rows_and_hostile_values(monkeypatch):
    rng = np.random.default_rng(4)
    V = 8192
    x = (rng.standard_normal((5, V)) * 3).astype(np.float32)
    x[1, :5] = [np.nan, np.inf, -np.inf, -0.0, 0.0]
    mp = torch.tensor([0.05, 0.0, 0.2, 0.0, 1.0])
    calls = _spy(monkeypatch, T, "_min_p_by_candidates")
    out = F.min_p(torch.from_numpy(x), mp)
    assert calls[-1][1] is not None
    assert torch.equal(bits(out[1]), bits(torch.from_numpy(x[1])))
    ref = _full_path(monkeypatch, torch.from_numpy(x), mp)
    nan = torch.isnan(out)  # (the full path's keep makes its own NaN)
    assert torch.equal(nan, torch.isnan(ref)) and int(nan.sum()) == 1
    assert torch.equal(bits(out)[~nan], bits(ref)[~nan])
    for poison in ("nan", "inf", "no token"):
        y = x.copy()
        if poison == "no token":
            y[2] = -np.inf
        else:
            y[2, 17] = float(poison)
        out = F.min_p(torch.from_numpy(y), mp)
        assert calls[-1][1] is None
        ref = _full_path(monkeypatch, torch.from_numpy(y), mp)
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(out), nan) and torch.equal(bits(out)[~nan], bits(ref)[~nan])


def test_temperature_and_min_p_through_the_pipeline(monkeypatch):
    """The request llama.cpp users send most (temperature, min_p): the candidates' result in the
    pipeline, rows with min_p off mixed in, equals the full path's."""
    rng = np.random.default_rng(12)
    B, V = 6, 32000
    x = torch.from_numpy((rng.standard_normal((B, V)) * 3).astype(np.float32))
    empty = [[] for _ in range(B)]
    batch = SamplingBatch([SamplingParams(temperature=0.7, min_p=0.05 * (r % 3)) for r in range(B)],
                          empty, empty, vocab_size=V)
    calls = _spy(monkeypatch, T, "_min_p_by_candidates")
    fast = SamplerPipeline("torch", seed=0).process(x, batch)
    assert calls[-1][1] is not None
    with monkeypatch.context() as m:
        m.setattr(T, "_MIN_P_SMALLEST", float("inf"))
        ref = SamplerPipeline("torch", seed=0).process(x, batch)
    assert torch.equal(bits(fast), bits(ref))
    _stats._scratch.live_hint = None
