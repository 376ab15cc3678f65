"""The speed paths of the reference functions give the results of the plain paths, bit for bit.

After a truncation most of a row is -inf, and the samplers run on the packed remaining
tokens (``_stats.compact_rows``); typical_p's helpers sort only the remaining deviations and
finish on packed rows; DRY and no_repeat_ngram read the history's nonzero match lengths.
Each is compared here with the plain computation on the same inputs (fp32 bit patterns, so
-0.0 against +0.0 counts): rows with few tokens left, rows with none, rows untouched,
rounded logits full of ties, disabled rows, widths below and above the packing thresholds
(forced on and off through the module's thresholds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samplers.functional as F
from samplers.functional import _stats
from samplers.functional.dry import dry_
from samplers.history import TokenHistory

NINF = float("-inf")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.fixture
def packing(monkeypatch):
    """packing(True): pack whatever the density; packing(False): never pack."""

    def set_mode(on: bool) -> None:
        monkeypatch.setattr(_stats, "_SPARSE_FRACTION", 0 if on else 8)
        monkeypatch.setattr(_stats, "_SPARSE_MIN_VOCAB", 0 if on else 10**12)

    return set_mode


def _sparse_logits(g: torch.Generator, B: int, V: int, rounded: bool) -> torch.Tensor:
    x = torch.randn(B, V, generator=g) * (0.5 + 5 * torch.rand(1, generator=g).item())
    if rounded:
        x = torch.round(x * 2) / 2
    for b in range(B):
        r = torch.rand(1, generator=g).item()
        if r < 0.7:  # a truncation left a few tokens
            kept = int(torch.randint(0, min(V, 300) + 1, (1,), generator=g))
            x[b, torch.randperm(V, generator=g)[kept:]] = NINF
        elif r < 0.8:
            x[b] = NINF
    return x


def _params(name: str, B: int, g: torch.Generator):
    r = lambda: torch.rand(B, generator=g)  # noqa: E731
    return {
        "top_k": (torch.randint(-1, 80, (B,), generator=g),),
        "top_p": (r() * 1.1,),
        "top_a": (r() * 0.5,),
        "min_p": (r() * 0.3,),
        "tfs": (r() * 1.1,),
        "eta_cutoff": (r() * 0.01,),
        "epsilon_cutoff": (r() * 0.01,),
        "nsigma": (r() * 3,),
        "xtc": (r() * 0.3, r(), r()),
        "dynamic_temperature": (r() * 0.5, 0.5 + r(), r() + 0.5),
        "quadratic_smoothing": (r(), 1 + 2 * r()),
        "skew": (torch.randn(B, generator=g),),
        "typical_p": (r() * 1.1,),
    }[name]


PACKED = ["top_k", "top_p", "top_a", "min_p", "tfs", "eta_cutoff", "epsilon_cutoff", "nsigma", "xtc",
          "dynamic_temperature", "quadratic_smoothing", "skew", "typical_p"]


@pytest.mark.parametrize("name", PACKED)
def test_packed_rows_give_the_full_rows_results(name, packing):
    g = torch.Generator().manual_seed(PACKED.index(name))
    fn = getattr(F, name)
    for trial in range(12):
        B = int(torch.randint(1, 6, (1,), generator=g))
        V = int(torch.randint(3, 2500, (1,), generator=g))
        x = _sparse_logits(g, B, V, rounded=trial % 3 == 0)
        args = _params(name, B, g)
        if name == "top_k":  # k past the packed width but below V, and k >= V
            args[0][: max(1, B // 3)] = torch.tensor([V - 1, V + 3])[: max(1, B // 3)].repeat(B)[: max(1, B // 3)]
        packing(True)
        packed = fn(x, *args)
        packing(False)
        plain = fn(x, *args)
        assert torch.equal(_bits(packed), _bits(plain)), (name, trial, B, V)


def test_rows_are_packed_only_when_mostly_removed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4096, generator=g)
    assert _stats.compact_rows(x) is None  # dense
    x[:, 200:] = NINF
    sparse = _stats.compact_rows(x)
    assert sparse is not None and sparse.logits.shape == (4, 200)
    assert torch.equal(sparse.expand(sparse.logits), x)
    assert _stats.compact_rows(x.to(torch.float16)) is None  # fp32 only
    assert _stats.compact_rows(x[:, :512]) is None  # narrow rows: not worth it


@pytest.mark.parametrize("descending", [False, True])
def test_sort_nonneg_dense_is_a_stable_sort(descending):
    """The dense path (keys as two int32 halves): numpy's stable argsort of the values (ties by
    column), the values read back from the keys bit for bit (+0.0, +inf, ties, subnormals);
    a NaN with its sign bit, which would overflow the high half when descending, gives the
    int64 keys' order and values."""
    rng = np.random.default_rng(int(descending))
    x = np.abs(rng.standard_normal((5, 3000))).astype(np.float32)
    x[0, :300] = 0.0
    x[1, 7] = np.inf
    x[2] = np.round(x[2] * 4) / 4
    x[3, :10] = np.float32(1e-42)
    values, order = _stats.sort_nonneg(torch.from_numpy(x), descending)
    ref = np.argsort(-x if descending else x, axis=-1, kind="stable")
    assert order.dtype == torch.int64 and np.array_equal(order.numpy(), ref)
    assert np.array_equal(values.numpy().view(np.int32), np.take_along_axis(x, ref, -1).view(np.int32))
    y = x.copy()
    y[4, 3] = -np.float32(np.nan)
    values, order = _stats.sort_nonneg(torch.from_numpy(y), descending)
    assert torch.equal(torch.sort(order, dim=-1).values, torch.arange(3000).expand(5, 3000))
    assert np.array_equal(values.numpy().view(np.int32), np.take_along_axis(y, order.numpy(), -1).view(np.int32))
    assert np.array_equal(order.numpy()[:4], ref[:4])


@pytest.mark.parametrize("descending", [False, True])
def test_sort_nonneg_of_mostly_last_values_matches_the_dense_sort(descending, monkeypatch):
    g = torch.Generator().manual_seed(int(descending))
    last = 0.0 if descending else float("inf")
    for trial in range(20):
        B, V = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1024, 6000, (1,), generator=g))
        x = torch.rand(B, V, generator=g)
        if trial % 2:
            x = torch.round(x * 8) / 8  # ties among the live values
        for b in range(B):
            n = int(torch.randint(0, V // 8 + 1, (1,), generator=g))
            x[b, torch.randperm(V, generator=g)[n:]] = last
        values, order = _stats.sort_nonneg(x, descending)
        monkeypatch.setattr(_stats, "_SPARSE_MIN_VOCAB", 10**12)
        dense_values, dense_order = _stats.sort_nonneg(x, descending)
        monkeypatch.undo()
        assert torch.equal(values, dense_values)
        assert torch.equal(torch.sort(order, dim=-1).values, torch.arange(V).expand(B, V))  # a permutation
        assert torch.equal(x.gather(-1, order), values)
        live = (x != last).sum(-1)
        for b in range(B):  # the live entries in the dense path's order (ties broken by index)
            assert torch.equal(order[b, : live[b]], dense_order[b, : live[b]])


def _dense_match_lengths(h: list[int]) -> list[int]:
    n = len(h)
    out = [0] * n
    for j in range(1, n):
        k = 0
        while k < j and h[j - 1 - k] == h[n - 1 - k]:
            k += 1
        out[j] = k
    return out


def test_dry_and_ngram_from_match_entries_equal_the_dense_paths_over_a_generation():
    rng = np.random.default_rng(3)
    for trial in range(6):
        B, V = int(rng.integers(1, 5)), int(rng.integers(8, 40))
        small = int(rng.integers(2, 6))  # few distinct tokens: long repeats
        prompts = [rng.integers(0, small, size=int(rng.integers(0, 120))).tolist() for _ in range(B)]
        th = TokenHistory(prompts, [[] for _ in range(B)], V)
        mult = torch.tensor(rng.choice([0.0, 0.8], size=B), dtype=torch.float32)
        base = torch.tensor(rng.uniform(1.1, 2.5, size=B), dtype=torch.float32)
        allowed = torch.tensor(rng.integers(1, 4, size=B))
        rng_len = torch.tensor(rng.choice([0, 7, 60], size=B))
        breakers = torch.tensor(rng.integers(-1, small + 1, size=(B, int(rng.integers(0, 10)))))
        n = torch.tensor(rng.choice([0, 2, 3], size=B))
        for step in range(30):
            x = torch.randn(B, V, generator=torch.Generator().manual_seed(step))
            entries = dry_(x.clone(), th, mult, base, allowed, rng_len, breakers, sync_free=False)
            dense = dry_(x.clone(), th, mult, base, allowed, rng_len, breakers, sync_free=True)
            assert torch.equal(_bits(entries), _bits(dense)), (trial, step)
            banned = torch.isneginf(F.no_repeat_ngram(x, th, n))
            m = th.match_lengths()
            for b, h in enumerate(th.to_lists()):
                assert m[b, : len(h)].tolist() == _dense_match_lengths(h)
                want = {h[j] for j in range(len(h)) if n[b] >= 1 and m[b, j] >= n[b] - 1}
                assert set(banned[b].nonzero()[:, 0].tolist()) == want
            tok = torch.tensor(rng.integers(0, small, size=B))
            if rng.random() < 0.3:
                th.append(tok, rows=torch.tensor(rng.random(B) < 0.5))
            else:
                th.append(tok)
