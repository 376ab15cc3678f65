"""DRY: the exact definition of SEMANTICS.md (text-generation-webui / llama.cpp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.functional import _stats
from samplers.functional.dry import dry
from samplers.history import TokenHistory

INF = float("inf")
a, b, c, d, e, x, y = range(7)
V = 8


def ref_dry_penalties(h, mult, base, allowed, rng, breakers) -> dict[int, float]:
    """Literal transcription of the definition: {token: penalty}, float32 arithmetic."""
    if mult == 0:
        return {}
    if rng > 0:
        h = h[-rng:]
    n = len(h)
    if n < 2 or h[-1] in breakers:
        return {}
    best: dict[int, int] = {}
    for i in range(n - 1):
        if h[i] != h[-1]:
            continue
        cand = h[i + 1]
        if cand in breakers:
            continue
        m = 1
        while i - m >= 0 and h[i - m] == h[n - 1 - m] and h[n - 1 - m] not in breakers:
            m += 1
        best[cand] = max(best.get(cand, 0), m)
    with np.errstate(over="ignore"):
        return {
            tok: float(np.float32(mult) * np.float32(base) ** np.float32(m - allowed))
            for tok, m in best.items()
            if m >= allowed
        }


def run(h_rows, mult, base, allowed, rng, breakers, logits=None, prompts=None):
    nb = len(h_rows)
    k = max((len(r) for r in breakers), default=0)
    brk = torch.tensor([list(r) + [-1] * (k - len(r)) for r in breakers], dtype=torch.int64).reshape(nb, k)
    if prompts is None:
        th = TokenHistory(h_rows, [[] for _ in h_rows], vocab_size=V)
    else:
        th = TokenHistory(prompts, [h[len(p) :] for h, p in zip(h_rows, prompts)], vocab_size=V)
    if logits is None:
        logits = torch.full((nb, V), 0.5)
    return dry(
        logits,
        th,
        torch.tensor(mult, dtype=torch.float32),
        torch.tensor(base, dtype=torch.float32),
        torch.tensor(allowed, dtype=torch.int64),
        torch.tensor(rng, dtype=torch.int64),
        brk,
    )


def row(**penalties):
    """Expected row: 0.5 everywhere, minus the given penalties (keys are token letters)."""
    out = [0.5] * V
    for name, p in penalties.items():
        out["abcdexy".index(name)] = 0.5 - p
    return out


# h = c d a b c d e a b c   (positions 0..9, last token c)
# earlier c at i=0: candidate h[1] = d; going back, i-1 < 0 -> m = 1
# earlier c at i=4: candidate h[5] = d; h[3]=b == h[8]=b, h[2]=a == h[7]=a, h[1]=d != h[6]=e -> m = 3
# so M(d) = max(1, 3) = 3; no other candidate.
H = [c, d, a, b, c, d, e, a, b, c]


def test_hand_computed_allowed_length():
    # multiplier 1, base 2: penalty = 2 ** (3 - allowed)
    out = run([H] * 4, [1.0] * 4, [2.0] * 4, [1, 2, 3, 4], [0] * 4, [[]] * 4)
    assert out.tolist() == [
        row(d=4.0),  # allowed 1: 2^2 = 4  (0.5 - 4 = -3.5)
        row(d=2.0),  # allowed 2: 2^1 = 2
        row(d=1.0),  # allowed 3: 2^0 = 1
        row(),  # allowed 4 > 3: no penalty
    ]


def test_hand_computed_breakers():
    out = run([H] * 4, [1.0] * 4, [2.0] * 4, [2, 3, 2, 2], [0] * 4, [[a], [a], [d], [c, x]])
    assert out.tolist() == [
        # breaker a: at i=4 the match c, b then reaches h[2] = a = h[7], a breaker: stop, m = 2
        # (the trailing non-breakers of h are b c... exactly 2: h[7] = a). 2 >= 2: 2^0 = 1
        row(d=1.0),
        row(),  # same m = 2 < allowed 3
        row(),  # the candidate d is itself a breaker: never penalised
        row(),  # the last token c is a breaker: no penalty at all
    ]


def test_hand_computed_range():
    # dry_range 6: h = c d e a b c; earlier c at window 0 -> candidate d, m = 1 (window start)
    # dry_range 7: h = b c d e a b c; c at 1 -> d; b == b, then window start -> m = 2
    # dry_range 8: h = a b c d e a b c; c at 2 -> d; b == b, a == a, start -> m = 3
    # dry_range 10 (= len) and 100 (> len): whole history, m = 3
    out = run([H] * 6, [1.0] * 6, [2.0] * 6, [1, 2, 2, 2, 2, 2], [6, 6, 7, 8, 10, 100], [[]] * 6)
    assert out.tolist() == [
        row(d=1.0),  # allowed 1, m 1: 2^0
        row(),  # allowed 2, m 1
        row(d=1.0),  # m 2: 2^0
        row(d=2.0),  # m 3: 2^1
        row(d=2.0),
        row(d=2.0),
    ]


def test_hand_computed_defects_we_do_not_copy():
    # Row 0, allowed_length 1 penalises a single-token repeat: h = a b a, last a; earlier a
    #   at i=0 -> candidate b, m = 1 (start of h) -> 0.8 * 1.75^(1-1) = 0.8.
    # Row 1, allowed_length 3 does not penalise shorter matches (Aphrodite would, by
    #   base^(m-3) < 1): h = a b x a -> candidate b, m = 1 < 3: nothing.
    # Row 2, a breaker within the last allowed_length + 1 tokens does not disable the row:
    #   h = y a b x a b, breaker x (h[3], 3rd-last token), last b; earlier b at i=2 ->
    #   candidate x, a breaker: never penalised, so nothing.
    # Row 3, the same with e instead of x (breaker x absent from h): candidate e;
    #   h[1]=a == h[4]=a; h[0]=y != h[3]=e -> m = 2 -> 0.8 * 1.75^0 = 0.8.
    # Row 4, h = e a b x a b (breaker x): earlier b at i=2 -> candidate x: breaker, skipped.
    #   Row 5, h = a b e x a b (breaker x): earlier b at 1 -> candidate e; h[0]=a == h[4]=a,
    #   then start of h -> m = 2 -> 0.8; the breaker x 2 tokens back does not matter.
    rows = [[a, b, a], [a, b, x, a], [y, a, b, x, a, b], [y, a, b, e, a, b], [e, a, b, x, a, b], [a, b, e, x, a, b]]
    out = run(rows, [0.8] * 6, [1.75] * 6, [1, 3, 2, 2, 2, 2], [0] * 6, [[], [], [x], [x], [x], [x]])
    p = float(np.float32(0.5) - np.float32(0.8))
    exp = torch.full((6, V), 0.5)
    exp[0, b] = p
    exp[3, e] = p
    exp[5, e] = p
    assert torch.equal(out, exp)


def test_hand_computed_max_over_occurrences_and_several_candidates():
    # h = a b x a b y a b (last b):
    #   i=1: candidate x; h[0]=a == h[6]=a, then start -> m = 2
    #   i=4: candidate y; h[3]=a == h[6]=a, h[2]=x != h[5]=y -> m = 2
    # allowed 2, multiplier 1.5, base 3: both get 1.5 * 3^0 = 1.5
    # allowed 1: both get 1.5 * 3^1 = 4.5
    h = [a, b, x, a, b, y, a, b]
    out = run([h, h], [1.5, 1.5], [3.0, 3.0], [2, 1], [0, 0], [[], []])
    assert out.tolist() == [row(x=1.5, y=1.5), row(x=4.5, y=4.5)]


def test_overflow_gives_minus_inf_not_nan():
    # h = a * 200: earlier a at i gives candidate a with m = i + 1; M(a) = 199.
    # 1.75^(199 - 2) ~ 1e48 overflows float32 -> -inf. Tokens already -inf stay -inf.
    logits = torch.zeros(2, V)
    logits[:, b] = -INF
    out = run([[a] * 200] * 2, [1.0, 1.0], [1.75, 1.75], [2, 2], [0, 0], [[], []], logits=logits)
    assert not torch.isnan(out).any()
    assert (out[:, a] == -INF).all() and (out[:, b] == -INF).all()
    assert (out[:, c:] == 0).all()


def test_history_split_prompt_output_irrelevant():
    # DRY reads prompt + output as one sequence
    p1 = run([H], [1.0], [2.0], [2], [0], [[]])
    p2 = run([H], [1.0], [2.0], [2], [0], [[]], prompts=[H[:4]])
    assert torch.equal(p1, p2)


# ----------------------------------------------------------------------------- random


def _random_params(rng: np.random.Generator, nb: int):
    mult = rng.choice([0.0, 0.8, 1.0, 2.5], nb).astype(np.float32)
    base = rng.choice([1.1, 1.75, 2.0, 3.0], nb).astype(np.float32)
    allowed = rng.choice([1, 2, 3, 4], nb)
    rngs = rng.choice([0, 0, 3, 7, 15], nb)
    breakers = [sorted(set(rng.integers(0, V, rng.integers(0, 3)).tolist())) for _ in range(nb)]
    return mult, base, allowed, rngs, breakers


def _check_rows(out, logits, hists, mult, base, allowed, rngs, breakers):
    for r, h in enumerate(hists):
        pens = ref_dry_penalties(h, mult[r], base[r], allowed[r], rngs[r], set(breakers[r]))
        changed = {t for t in range(V) if out[r, t].view(torch.int32) != logits[r, t].view(torch.int32)}
        assert changed == {t for t, p in pens.items() if math.isfinite(logits[r, t].item())}, (h, pens)
        for t, p in pens.items():
            exp = np.float32(logits[r, t].item()) - np.float32(p)
            np.testing.assert_allclose(out[r, t].item(), exp, rtol=1e-6, atol=1e-6)


def test_against_reference_random():
    gen = np.random.default_rng(0)
    for _ in range(60):
        nb = int(gen.integers(1, 6))
        alpha = int(gen.integers(1, 5))
        hists = []
        for _ in range(nb):
            n = int(gen.integers(0, 40))
            if gen.random() < 0.3:  # periodic rows: long matches
                period = gen.integers(0, alpha, gen.integers(1, 4)).tolist()
                hists.append((period * 40)[:n])
            else:
                hists.append(gen.integers(0, alpha, n).tolist())
        mult, base, allowed, rngs, breakers = _random_params(gen, nb)
        logits = torch.from_numpy(gen.normal(size=(nb, V)).astype(np.float32))
        logits[gen.random((nb, V)) < 0.1] = -INF
        out = run(hists, mult.tolist(), base.tolist(), allowed.tolist(), rngs.tolist(), breakers, logits=logits)
        _check_rows(out, logits, hists, mult, base, allowed, rngs, breakers)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.lists(st.integers(0, 2), max_size=30), st.integers(0, 5)), min_size=1, max_size=4),
    st.integers(0, 6),
)
def test_properties(seed, rows, nsteps):
    """disabled -> bit-identical; batch independence; incremental append == full build; select."""
    gen = np.random.default_rng(seed)
    nb = len(rows)
    prompts = [p for p, _ in rows]
    outputs = [gen.integers(0, 3, k).tolist() for _, k in rows]
    mult, base, allowed, rngs, breakers = _random_params(gen, nb)
    k = max(len(r) for r in breakers)
    brk = torch.tensor([r + [-1] * (k - len(r)) for r in breakers], dtype=torch.int64).reshape(nb, k)
    args = (torch.from_numpy(mult), torch.from_numpy(base), torch.from_numpy(allowed), torch.from_numpy(rngs), brk)
    logits = torch.from_numpy(gen.normal(size=(nb, V)).astype(np.float32))
    th = TokenHistory(prompts, outputs, vocab_size=V)
    out = dry(logits, th, *args)
    for r in range(nb):
        if mult[r] == 0:
            assert torch.equal(out[r].view(torch.int32), logits[r].view(torch.int32))
        sub = th.select(torch.tensor([r]))
        alone = dry(logits[r : r + 1], sub, *(a_[r : r + 1] for a_ in args))
        assert torch.equal(alone[0].view(torch.int32), out[r].view(torch.int32))
    hists = [list(o) for o in outputs]
    for _ in range(nsteps):
        toks = gen.integers(0, 3, nb).tolist()
        th.append(torch.tensor(toks))
        for o, t_ in zip(hists, toks):
            o.append(t_)
        inc = dry(logits, th, *args)
    if nsteps:
        full = dry(logits, TokenHistory(prompts, hists, vocab_size=V), *args)
        assert torch.equal(inc.view(torch.int32), full.view(torch.int32))
        _check_rows(full, logits, [p + o for p, o in zip(prompts, hists)], mult, base, allowed, rngs, breakers)
        # select after appends keeps the incrementally maintained state
        perm = torch.tensor(list(reversed(range(nb))))
        sel = dry(logits[perm], th.select(perm), *(a_[perm] for a_ in args))
        assert torch.equal(sel.view(torch.int32), inc[perm].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    logits = torch.randn(2, V).to(dtype)
    out = run([H, H], [1.0, 0.0], [2.0, 2.0], [2, 2], [0, 0], [[], []], logits=logits)
    assert out.dtype == dtype
    assert torch.equal(out[1], logits[1])
    exp = logits[0].clone()
    exp[d] = (logits[0, d].float() - 2.0).to(dtype)
    assert torch.equal(out[0], exp)


def test_vocab_larger_than_logits_is_an_error_and_empty_batch():
    th = TokenHistory([[1, 2]], [[]], vocab_size=10)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="vocab_size"):
        dry(torch.zeros(1, 5), th, one, 2 * one, one.long(), 0 * one.long(), torch.zeros(1, 0, dtype=torch.int64))
    th = TokenHistory([], [], vocab_size=5)
    e = torch.zeros(0)
    out = dry(torch.zeros(0, 5), th, e, e, e.long(), e.long(), torch.zeros(0, 2, dtype=torch.int64))
    assert out.shape == (0, 5)


# ----------------------------------------------------------------------------- in place, selections


def _tensors(hists, mult, base, allowed, rngs, breakers, prompts=None):
    nb = len(hists)
    k = max((len(r) for r in breakers), default=0)
    brk = torch.tensor([list(r) + [-1] * (k - len(r)) for r in breakers], dtype=torch.int64).reshape(nb, k)
    if prompts is None:
        th = TokenHistory(hists, [[] for _ in hists], vocab_size=V)
    else:
        th = TokenHistory(prompts, [h[len(p) :] for h, p in zip(hists, prompts)], vocab_size=V)
    args = (
        torch.tensor(list(mult), dtype=torch.float32),
        torch.tensor(list(base), dtype=torch.float32),
        torch.tensor(list(allowed), dtype=torch.int64),
        torch.tensor(list(rngs), dtype=torch.int64),
        brk,
    )
    return th, args


def _repetitive_hist(gen: np.random.Generator, n: int, alpha: int) -> list[int]:
    kind = gen.integers(0, 4)
    if kind == 0:  # one token repeated: every position matches, long matches (overflow)
        return [int(gen.integers(0, alpha))] * n
    if kind == 1:  # short period
        period = gen.integers(0, alpha, gen.integers(1, 4)).tolist()
        return (period * n)[:n]
    if kind == 2:  # a few phrases in random order (as benchmarks' histories)
        phrases = gen.integers(0, alpha, (3, int(gen.integers(2, 6))))
        return phrases[gen.integers(0, 3, n)].reshape(-1)[:n].tolist()
    return gen.integers(0, alpha, n).tolist()


@pytest.mark.parametrize("repetitive", [False, True])
def test_selections_bit_identical(repetitive):
    """The nonzero selection and the sync-free dense one give the same bits, in place."""
    from samplers.functional.dry import dry_

    gen = np.random.default_rng(1 + repetitive)
    fired = overflowed = 0
    for _ in range(80):
        nb = int(gen.integers(1, 6))
        alpha = int(gen.integers(1, 5))
        hists = []
        for _ in range(nb):
            n = int(gen.integers(0, 120 if repetitive else 40))
            hists.append(_repetitive_hist(gen, n, alpha) if repetitive else gen.integers(0, alpha, n).tolist())
        mult, base, allowed, rngs, breakers = _random_params(gen, nb)
        th, args = _tensors(hists, mult.tolist(), base.tolist(), allowed.tolist(), rngs.tolist(), breakers)
        logits = torch.from_numpy(gen.normal(size=(nb, V)).astype(np.float32))
        logits[gen.random((nb, V)) < 0.1] = -INF
        sparse, dense = logits.clone(), logits.clone()
        chain = _stats.PackedChain()
        with _stats.packed_chain(chain):  # (a chain's note of the removed tokens is carried)
            for t in (sparse, dense):
                _stats.note_removed(t, *_stats.removed_tokens(t))
                assert dry_(t, th, *args, sync_free=t is dense) is t
                noted = _stats.noted_removed(t)
                overflowed += int(noted[0].numel() > _stats.removed_tokens(logits)[0].numel())
                assert all(torch.equal(a, b) for a, b in zip(noted, _stats.removed_tokens(t)))
        assert torch.equal(sparse.view(torch.int32), dense.view(torch.int32)), hists
        assert torch.equal(dry(logits, th, *args).view(torch.int32), sparse.view(torch.int32))  # CPU default
        _check_rows(dense, logits, hists, mult, base, allowed, rngs, breakers)
        fired += int((dense.view(torch.int32) != logits.view(torch.int32)).any())
    assert fired >= 20  # the histories do produce penalties
    assert overflowed >= 5 or not repetitive  # (and penalties that overflow to -inf)


@pytest.mark.parametrize("sync_free", [False, True])
def test_in_place_hand_computed_and_rows_untouched(sync_free):
    from samplers.functional.dry import dry_

    th, args = _tensors([H] * 4, [1.0, 0.0, 1.0, 0.0], [2.0] * 4, [1, 1, 3, 2], [0] * 4, [[], [], [], [a]])
    x = torch.full((4, V), 0.5)
    x[1, 3] = -0.0
    x[3, 5] = -INF
    before = x.clone()
    ptr = x.data_ptr()
    dry_(x, th, *args, sync_free=sync_free)
    assert x.data_ptr() == ptr
    assert x[0].tolist() == row(d=4.0) and x[2].tolist() == row(d=1.0)
    assert torch.equal(x[1::2].view(torch.int32), before[1::2].view(torch.int32))  # multiplier 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disabled_rows_bit_identical_every_dtype(dtype):
    """No final torch.where: disabled rows survive the float32 round trip bit for bit (-0.0,
    +-inf, subnormals, the largest finite value included); enabled rows change."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, V, generator=gen) * 30).to(dtype)
    fi = torch.finfo(dtype)
    logits[:, 0] = -0.0
    logits[:, 1] = -INF
    logits[:, 2] = fi.tiny / 4  # subnormal
    logits[:, 4] = fi.max
    logits[:, 5] = -fi.max
    logits[:, 6] = INF
    src = logits.clone()
    hist = [a, b, c, d, a, b, c, d, a, b, c]  # candidate d: M = 7
    out = run([hist] * 4, [0.0, 1.0, 0.0, 2.0], [2.0] * 4, [2] * 4, [0] * 4, [[]] * 4, logits=logits)
    assert out.dtype == dtype
    assert torch.equal(logits.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       src.view(torch.int16 if dtype != torch.float32 else torch.int32))  # input untouched
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    for r in (0, 2):
        assert torch.equal(out[r].view(bits), logits[r].view(bits))
    for r in (1, 3):
        assert out[r, d] < logits[r, d]


def test_in_place_rejects_bad_tensors():
    from samplers.functional.dry import dry_

    th, args = _tensors([H, H], [1.0, 1.0], [2.0, 2.0], [2, 2], [0, 0], [[], []])
    with pytest.raises(ValueError, match="float32"):
        dry_(torch.zeros(2, V, dtype=torch.float16), th, *args)
    with pytest.raises(ValueError, match="contiguous"):
        dry_(torch.zeros(V, 2).t(), th, *args)


def test_non_contiguous_logits():
    th, args = _tensors([H, H], [1.0, 0.0], [2.0, 2.0], [2, 2], [0, 0], [[], []])
    base_ = torch.randn(V, 2)
    out = dry(base_.t(), th, *args)
    exp = dry(base_.t().contiguous(), th, *args)
    assert torch.equal(out, exp)


def test_breaker_lookup_methods_agree():
    from samplers.functional.dry import _breaker_mask

    gen = np.random.default_rng(5)
    for k in (1, 3, 9, 20):
        tok = torch.from_numpy(gen.integers(-1, 40, (4, 30)))
        ids = torch.from_numpy(gen.integers(-3, 45, (4, k)))  # -1 padding, out-of-range ids
        ids[0] = -1
        exp = torch.tensor([[t >= 0 and t in set(r) for t in row_] for row_, r in zip(tok.tolist(), ids.tolist())])
        assert torch.equal(_breaker_mask(tok, ids, search=True), exp)
        assert torch.equal(_breaker_mask(tok, ids, search=False), exp)
        assert torch.equal(_breaker_mask(tok, ids), exp)


def test_many_breakers_selections_bit_identical():
    """More breaker ids than the broadcast threshold (the sorted lookup) in both selections."""
    from samplers.functional.dry import dry_

    gen = np.random.default_rng(7)
    for _ in range(20):
        nb = 3
        hists = [_repetitive_hist(gen, int(gen.integers(0, 80)), 5) for _ in range(nb)]
        mult, base, allowed, rngs, _ = _random_params(gen, nb)
        breakers = [[int(t) for t in gen.integers(-1, 40, 12)] for _ in range(nb)]
        th, args = _tensors(hists, mult.tolist(), base.tolist(), allowed.tolist(), rngs.tolist(), breakers)
        logits = torch.from_numpy(gen.normal(size=(nb, V)).astype(np.float32))
        sparse, dense = logits.clone(), logits.clone()
        dry_(sparse, th, *args, sync_free=False)
        dry_(dense, th, *args, sync_free=True)
        assert torch.equal(sparse.view(torch.int32), dense.view(torch.int32))
        valid = [{t for t in r if 0 <= t < V} for r in breakers]
        _check_rows(dense, logits, hists, mult, base, allowed, rngs, valid)


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_rows_penalties_do_not_depend_on_the_batch(sync_free):
    """A row's penalties alone and beside other rows are the same bits. torch's CPU loops
    raise the last ``n mod 32`` entries of a loop with the scalar ``pow``, an ulp off the
    vector one for ~1% of operands: the penalties of a short history, taken alone from a
    table as wide as its history (all of it in the tail), differed from the same row's beside
    a long history (a wider table, computed in vector lanes). Found by tests/fuzz.py (case
    23639 on an AMD EPYC)."""
    from samplers.functional.dry import dry_

    gen = np.random.default_rng(7)
    n_short = 120
    hists = [_repetitive_hist(gen, int(gen.integers(8, 31)), 3) for _ in range(n_short)] + [[a, b] * 60]
    nb = len(hists)
    mult = (0.5 + gen.random(nb) * 2).tolist()
    base = (1.05 + gen.random(nb) * 3).tolist()
    allowed, rngs, breakers = [1] * nb, [0] * nb, [()] * nb
    th, args = _tensors(hists, mult, base, allowed, rngs, breakers)
    logits = torch.from_numpy(gen.normal(size=(nb, V)).astype(np.float32))
    together = dry_(logits.clone(), th, *args, sync_free=sync_free)
    penalised = 0
    for r in range(n_short):
        th_r, args_r = _tensors(hists[r:r + 1], mult[r:r + 1], base[r:r + 1], [1], [0], [()])
        alone = dry_(logits[r:r + 1].clone(), th_r, *args_r, sync_free=sync_free)
        assert torch.equal(alone.view(torch.int32), together[r:r + 1].view(torch.int32)), (r, hists[r], base[r])
        penalised += int((alone != logits[r:r + 1]).sum())
    assert penalised >= 200  # (the powers the check compares: ~1% of them took the scalar pow alone)
