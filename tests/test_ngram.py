"""no_repeat_ngram_size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.functional.ngram import no_repeat_ngram
from samplers.history import TokenHistory

INF = float("inf")


def ref_banned(h: list[int], n: int) -> set[int]:
    """Tokens t such that (last n-1 tokens of h, t) already occurs as an n-gram of h."""
    if n == 0 or len(h) < n - 1:
        return set()
    prefix = h[len(h) - (n - 1) :] if n > 1 else []
    banned = set()
    for s in range(len(h) - n + 1):  # every n-gram h[s:s+n]
        if h[s : s + n - 1] == prefix:
            banned.add(h[s + n - 1])
    return banned


def run(logits, prompts, outputs, sizes, v=None):
    th = TokenHistory(prompts, outputs, vocab_size=v or logits.shape[1])
    return no_repeat_ngram(logits, th, torch.tensor(sizes, dtype=torch.int64))


def test_hand_computed():
    # h = [1, 2, 3, 1, 2] (prompt [1, 2, 3], output [1, 2]); V = 5; logits = 0..4
    #   n=1: every token of h: {1, 2, 3}
    #   n=2: prefix (2,): bigrams starting with 2: (2, 3) at 1-2 -> {3}
    #   n=3: prefix (1, 2): trigrams (1, 2, 3) at 0-2 -> {3}
    #   n=4: prefix (3, 1, 2): 4-grams (1,2,3,1), (2,3,1,2): none starts with (3,1,2) -> {}
    #   n=6: len 5 >= 5, prefix = all of h, but h has no 6-gram -> {}
    #   n=7: len 5 < 6 -> {}
    #   n=0: disabled
    logits = torch.arange(5, dtype=torch.float32).repeat(7, 1)
    h_p, h_o = [1, 2, 3], [1, 2]
    out = run(logits, [h_p] * 7, [h_o] * 7, [1, 2, 3, 4, 6, 7, 0])
    assert out.tolist() == [
        [0.0, -INF, -INF, -INF, 4.0],
        [0.0, 1.0, 2.0, -INF, 4.0],
        [0.0, 1.0, 2.0, -INF, 4.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
    ]
    # h = [4, 4, 4]: n=2 prefix (4,): bigrams (4,4) -> {4}; n=3 prefix (4,4): (4,4,4) -> {4}
    # h = [0, 1, 0, 2, 0]: n=2 prefix (0,): (0,1), (0,2) -> {1, 2}
    out = run(logits[:3], [[4, 4, 4], [4, 4, 4], [0, 1, 0, 2, 0]], [[], [], []], [2, 3, 2])
    assert out.tolist() == [
        [0.0, 1.0, 2.0, 3.0, -INF],
        [0.0, 1.0, 2.0, 3.0, -INF],
        [0.0, -INF, -INF, 3.0, 4.0],
    ]


def test_against_reference_random():
    rng = np.random.default_rng(0)
    for _ in range(40):
        b, v = int(rng.integers(1, 6)), int(rng.integers(2, 8))
        alpha = int(rng.integers(1, v + 1))
        prompts = [rng.integers(0, alpha, rng.integers(0, 40)).tolist() for _ in range(b)]
        outputs = [rng.integers(0, alpha, rng.integers(0, 10)).tolist() for _ in range(b)]
        sizes = rng.integers(0, 6, b).tolist()
        logits = torch.from_numpy(rng.normal(size=(b, v)).astype(np.float32))
        logits[0, 0] = -INF
        out = run(logits, prompts, outputs, sizes)
        for r in range(b):
            banned = ref_banned(prompts[r] + outputs[r], sizes[r])
            exp = logits[r].clone()
            exp[list(banned)] = -INF
            assert torch.equal(out[r], exp), (prompts[r] + outputs[r], sizes[r])


hist_lists = st.lists(st.integers(0, 3), max_size=25)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(hist_lists, st.lists(st.integers(0, 3), max_size=6), st.integers(0, 5)), min_size=1, max_size=4),
    st.lists(st.lists(st.integers(0, 3), min_size=4, max_size=4), max_size=6),
    st.integers(0, 2**31),
)
def test_properties(rows, steps, seed):
    """disabled -> bit-identical; batch independence; incremental append == full build."""
    b, v = len(rows), 6
    prompts = [p for p, _, _ in rows]
    outputs = [o for _, o, _ in rows]
    sizes = torch.tensor([n for _, _, n in rows], dtype=torch.int64)
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(seed))
    th = TokenHistory(prompts, outputs, vocab_size=v)
    out = no_repeat_ngram(logits, th, sizes)
    for r in range(b):
        if sizes[r] == 0:
            assert torch.equal(out[r].view(torch.int32), logits[r].view(torch.int32))
        alone = no_repeat_ngram(logits[r : r + 1], th.select(torch.tensor([r])), sizes[r : r + 1])
        assert torch.equal(alone[0], out[r])
    # incremental: append steps (querying in between) == history built from the full lists
    hists = [list(o) for o in outputs]
    for toks in steps:
        toks = toks[:b]
        th.append(torch.tensor(toks))
        for o, tok in zip(hists, toks):
            o.append(tok)
        inc = no_repeat_ngram(logits, th, sizes)
    if steps:
        full = no_repeat_ngram(logits, TokenHistory(prompts, hists, vocab_size=v), sizes)
        assert torch.equal(inc, full)
        for r in range(b):
            exp = logits[r].clone()
            exp[list(ref_banned(prompts[r] + hists[r], int(sizes[r])))] = -INF
            assert torch.equal(full[r], exp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    logits = torch.randn(2, 8).to(dtype)
    out = run(logits, [[1, 2, 1], [3]], [[], []], [2, 0])
    assert out.dtype == dtype
    exp = logits.clone()
    exp[0, 2] = -INF  # prefix (1,), bigram (1, 2)
    assert torch.equal(out, exp)


def test_logits_wider_than_vocab_and_empty_history():
    # model logits may be padded beyond the tokenizer's vocabulary
    logits = torch.zeros(2, 10)
    out = run(logits, [[1, 1], []], [[], []], [2, 2], v=5)
    assert out[0].tolist() == [0.0, -INF] + [0.0] * 8
    assert torch.equal(out[1], logits[1])
    out = run(logits, [[], []], [[], []], [1, 3], v=5)
    assert torch.equal(out, logits)


def test_vocab_larger_than_logits_is_an_error():
    th = TokenHistory([[1, 2]], [[]], vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        no_repeat_ngram(torch.zeros(1, 5), th, torch.tensor([2]))


def test_kernel_ban_mask_kept_across_steps_equals_rebuilt():
    """kernels.penalties.NgramBanMask (one buffer, cleared and set by scatters each step)
    gives the mask of ngram_banned built from scratch, at every step, from empty histories on."""
    pytest.importorskip("triton")
    from samplers.kernels.penalties import NgramBanMask, ngram_banned

    gen = np.random.default_rng(3)
    v = 6
    sizes = torch.tensor([0, 1, 2, 3, 2], dtype=torch.int64)
    th = TokenHistory([[]] * 5, [[]] * 5, vocab_size=v)
    hists: list[list[int]] = [[] for _ in range(5)]
    mask = NgramBanMask(5, v, th.device)
    for step in range(30):
        got = mask.update(th, sizes)
        full = ngram_banned(TokenHistory(hists, [[]] * 5, vocab_size=v), sizes, v)
        exp = torch.zeros(5, v, dtype=torch.bool) if full is None else full
        assert torch.equal(got, exp), step
        assert got.tolist() == [[t in ref_banned(h, int(n)) for t in range(v)] for h, n in zip(hists, sizes)]
        again = mask.update(th, sizes)  # a second update without an append: same mask
        assert torch.equal(again, exp)
        toks = gen.integers(0, 3 if step % 2 else v, 5).tolist()
        th.append(torch.tensor(toks))
        for h, t in zip(hists, toks):
            h.append(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_in_place_variant_writes_the_same_result_into_its_input(dtype, n):
    """``no_repeat_ngram_`` returns its input, holding ``no_repeat_ngram``'s result bit for
    bit (both CPU routes: n = 1 takes the dense one); a non-contiguous input is refused."""
    from samplers.functional.ngram import no_repeat_ngram_

    rng = np.random.default_rng(n)
    rows = [rng.integers(0, 6, int(rng.integers(0, 30))).tolist() for _ in range(5)]
    history = TokenHistory([r[: len(r) // 2] for r in rows], [r[len(r) // 2:] for r in rows], vocab_size=40)
    x = torch.from_numpy(rng.standard_normal((5, 40)).astype(np.float32)).to(dtype)
    want = no_repeat_ngram(x, history, torch.tensor([n, 0, n, n, n]))
    y = x.clone()
    got = no_repeat_ngram_(y, history, torch.tensor([n, 0, n, n, n]))
    assert got is y and torch.equal(got, want) and torch.isneginf(want).any()
    with pytest.raises(ValueError, match="contiguous"):
        no_repeat_ngram_(x.t().contiguous().t(), history, n)
