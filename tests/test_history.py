"""TokenHistory: layout, validation, derived state, incremental append, select."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.history import HASH_BASES, HASH_MODULI, TokenHistory

# ----------------------------------------------------------------------------- references


def ref_match_lengths(h: list[int]) -> list[int]:
    """m[j] = longest k <= j with h[j-k:j] == h[len-k:len], by direct comparison."""
    n = len(h)
    out = []
    for j in range(n):
        k = 0
        while k < j and h[j - 1 - k] == h[n - 1 - k]:
            k += 1
        out.append(k)
    return out


def ref_prefix_hash(h: list[int], mod: int, base: int) -> list[int]:
    """P[j] = sum_{i<j} (h[i] + 1) * base^i mod M with Python big integers."""
    out, acc = [0], 0
    for i, t in enumerate(h):
        acc = (acc + (t + 1) * pow(base, i, mod)) % mod
        out.append(acc)
    return out


def assert_seen_ids_listed(th: TokenHistory) -> None:
    """`seen_ids` lists each True entry of `seen_mask` once, by its flat index (any order)."""
    ids = th.seen_ids().numpy()
    assert ids.dtype == np.int64
    assert np.array_equal(np.sort(ids), np.flatnonzero(th.seen_mask().numpy()))  # sorted: no duplicate


def check_against_reference(
    th: TokenHistory, hists: list[list[int]], prompts: list[list[int]], loose_bound: bool = False
) -> None:
    """Every structure of `th` equals the one computed from the plain lists (``loose_bound``:
    `max_length` may be an upper bound, as for a history made by `from_tensors`)."""
    v = th.vocab_size
    assert th.to_lists() == hists
    assert th.lengths.tolist() == [len(h) for h in hists]
    assert th.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert th.output_lengths.tolist() == [len(h) - len(p) for h, p in zip(hists, prompts)]
    longest = max((len(h) for h in hists), default=0)
    assert th.max_length >= longest if loose_bound else th.max_length == longest
    assert (th.tokens[:, longest:] == -1).all()
    counts = th.output_counts()
    seen = th.seen_mask()
    match = th.match_lengths()
    hashes = th.prefix_hashes()
    assert counts.dtype == torch.int32 and seen.dtype == torch.bool and match.dtype == torch.int32
    rows, cols, lengths = th.match_entries()  # the nonzero entries, listed row-major
    listed = torch.stack([rows, cols], dim=1) if rows.numel() else torch.zeros(0, 2, dtype=torch.int64)
    assert torch.equal(listed, match.nonzero()) and torch.equal(lengths, match[match != 0])
    if th.device.type == "cpu":  # (the same entries and dtypes, as numpy arrays)
        host = th.match_entries_host()
        assert [a.dtype for a in host] == [np.int64, np.int64, np.int32]
        assert all(np.array_equal(a, t.numpy()) for a, t in zip(host, (rows, cols, lengths)))
    for b, (h, p) in enumerate(zip(hists, prompts)):
        out = h[len(p) :]
        assert counts[b].tolist() == [out.count(t) for t in range(v)]
        assert seen[b].tolist() == [t in h for t in range(v)]
        assert match[b, : len(h)].tolist() == ref_match_lengths(h)
        assert (match[b, len(h) :] == 0).all()
        assert (th.tokens[b, len(h) :] == -1).all()
        for k in range(2):
            assert hashes[k, b, : len(h) + 1].tolist() == ref_prefix_hash(h, HASH_MODULI[k], HASH_BASES[k])
    assert_seen_ids_listed(th)


# ----------------------------------------------------------------------------- hand-computed


def test_layout_and_derived_state_hand_computed():
    # row 0: prompt [3, 1], output [1, 4, 1] -> h = [3, 1, 1, 4, 1]
    # row 1: prompt [],     output [2]       -> h = [2]
    # row 2: prompt [0, 0], output []        -> h = [0, 0]
    th = TokenHistory([[3, 1], [], [0, 0]], [[1, 4, 1], [2], []], vocab_size=5, device="cpu")
    assert th.tokens.dtype == torch.int64
    assert th.tokens[:, :5].tolist() == [[3, 1, 1, 4, 1], [2, -1, -1, -1, -1], [0, 0, -1, -1, -1]]
    assert th.lengths.tolist() == [5, 1, 2]
    assert th.prompt_lengths.tolist() == [2, 0, 2]
    assert th.output_lengths.tolist() == [3, 1, 0]
    # output counts: row 0 output [1, 4, 1] -> token 1 twice, token 4 once (prompt's 3 not counted)
    assert th.output_counts().tolist() == [[0, 2, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    # seen: prompt or output
    assert th.seen_mask().tolist() == [
        [False, True, False, True, True],
        [False, False, True, False, False],
        [True, False, False, False, False],
    ]
    # match lengths of row 0, h = [3, 1, 1, 4, 1] (suffixes of h: [1], [4, 1], [1, 4, 1], ...):
    #   j=0: h[:0] = []            -> 0
    #   j=1: h[:1] = [3]           ends in 3 != 1 -> 0
    #   j=2: h[:2] = [3, 1]        ends in 1 == h[-1]; then 3 vs 4 differ -> 1
    #   j=3: h[:3] = [3, 1, 1]     ends in 1; then 1 vs 4 differ -> 1
    #   j=4: h[:4] = [3, 1, 1, 4]  ends in 4 != 1 -> 0
    # row 2, h = [0, 0]: j=1: h[:1] = [0] vs suffix [0] -> 1 (cannot be longer than j)
    m = th.match_lengths()
    assert m[0, :5].tolist() == [0, 0, 1, 1, 0]
    assert m[1, :1].tolist() == [0]
    assert m[2, :2].tolist() == [0, 1]


def test_match_lengths_long_repeat_hand_computed():
    # h = (a b c) * 5 = 15 tokens; for j = 3q (h[:j] = (a b c) * q) the common suffix with h
    # is all of h[:j], so m = j; for other j, h[:j] ends in a or b != c -> 0.
    # Lengths up to 12 exceed the exact 8-token prefix, so the hashed binary search runs.
    h = [0, 1, 2] * 5
    th = TokenHistory([h], [[]], vocab_size=3)
    expected = [j if j % 3 == 0 else 0 for j in range(15)]
    assert th.match_lengths()[0, :15].tolist() == expected
    # one token of all-equal history: h = [7] * 20 -> m[j] = j
    th = TokenHistory([[7] * 20], [[]], vocab_size=8)
    assert th.match_lengths()[0, :20].tolist() == list(range(20))


def test_prefix_hash_hand_computed():
    # h = [2, 0]: P = [0, 3, 3 + 1 * r] mod M
    th = TokenHistory([[2, 0]], [[]], vocab_size=3)
    hashes = th.prefix_hashes()
    for k in range(2):
        assert hashes[k, 0, :3].tolist() == [0, 3, (3 + HASH_BASES[k]) % HASH_MODULI[k]]


def test_moduli_are_primes_below_2_31():
    # trial division up to sqrt(M) ~ 46341 (fast), so products of two residues fit in int64
    for m in HASH_MODULI:
        assert m < 2**31
        assert all(m % d for d in range(2, int(m**0.5) + 1))
    assert HASH_MODULI[0] != HASH_MODULI[1]


# ----------------------------------------------------------------------------- validation


def test_validation_names_row_and_value():
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\].*7"):
        TokenHistory([[0], [1, 7]], [[], []], vocab_size=5)
    with pytest.raises(ValueError, match=r"output_token_ids\[0\].*-3"):
        TokenHistory([[0], [1]], [[-3], []], vocab_size=5)
    with pytest.raises(ValueError, match=r"output_token_ids\[2\].*5"):
        TokenHistory([[0], [1], []], [[], [4], [1, 2, 5]], vocab_size=5)
    with pytest.raises(ValueError, match="rows"):
        TokenHistory([[0]], [[], []], vocab_size=5)
    th = TokenHistory([[0], [1]], [[], []], vocab_size=5)
    with pytest.raises(ValueError, match=r"row 1.*9"):
        th.append(torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="2 token ids"):
        th.append(torch.tensor([1, 2, 3]))


def test_empty_batch_and_empty_rows():
    th = TokenHistory([], [], vocab_size=4)
    assert th.batch_size == 0 and th.max_length == 0
    assert th.output_counts().shape == (0, 4)
    assert th.match_lengths().shape[0] == 0
    th = TokenHistory([[], []], [[], []], vocab_size=4)
    check_against_reference(th, [[], []], [[], []])
    th.append(torch.tensor([1, 2]))
    check_against_reference(th, [[1], [2]], [[], []])


# ----------------------------------------------------------------------------- append


def test_append_grows_capacity_and_keeps_contents():
    th = TokenHistory([[1, 2, 3]], [[]], vocab_size=10)
    cap0 = th.capacity
    h = [1, 2, 3]
    th.output_counts(), th.seen_mask(), th.seen_ids(), th.prefix_hashes(), th.match_lengths()
    for i in range(3 * cap0):
        t = (i * 7) % 10
        th.append(torch.tensor([t]))
        h.append(t)
    assert th.capacity >= len(h) and th.capacity > cap0
    check_against_reference(th, [h], [[1, 2, 3]])


def test_append_many_steps_between_queries_rebuilds():
    # more appended steps than the catch-up limit between two match_lengths() calls
    rnd = random.Random(3)
    prompts = [[rnd.randrange(3) for _ in range(rnd.randrange(30))] for _ in range(3)]
    th = TokenHistory(prompts, [[], [], []], vocab_size=3)
    th.match_lengths()
    hists = [list(p) for p in prompts]
    for _ in range(40):
        toks = [rnd.randrange(3) for _ in range(3)]
        th.append(torch.tensor(toks))
        for h, t in zip(hists, toks):
            h.append(t)
    check_against_reference(th, hists, prompts)


histories = st.integers(1, 4).flatmap(
    lambda b: st.tuples(
        st.integers(2, 6),  # alphabet: small, so repeats happen
        st.lists(st.lists(st.integers(0, 5), max_size=30), min_size=b, max_size=b),
        st.lists(st.lists(st.integers(0, 5), max_size=8), min_size=b, max_size=b),
        st.lists(st.lists(st.integers(0, 5), min_size=b, max_size=b), max_size=25),
        st.lists(st.booleans(), min_size=25, max_size=25),
    )
)


@settings(max_examples=50, deadline=None)
@given(histories)
def test_incremental_append_equals_full_build(data):
    alpha, prompts, outputs, steps, query = data
    v = 6
    prompts = [[t % alpha for t in p] for p in prompts]
    outputs = [[t % alpha for t in o] for o in outputs]
    th = TokenHistory(prompts, outputs, vocab_size=v)
    # build some of the derived state before appending; the rest is built afterwards
    if query[0]:
        th.output_counts(), th.match_lengths()
    if query[1]:
        th.seen_mask(), th.seen_ids(), th.prefix_hashes()
    hists = [p + o for p, o in zip(prompts, outputs)]
    for i, toks in enumerate(steps):
        toks = [t % alpha for t in toks]
        th.append(torch.tensor(toks))
        for h, t in zip(hists, toks):
            h.append(t)
        if query[i]:
            th.match_lengths()
    check_against_reference(th, hists, prompts)
    full = TokenHistory(prompts, [h[len(p) :] for h, p in zip(hists, prompts)], vocab_size=v)
    w = full.max_length
    assert torch.equal(th.match_lengths()[:, :w], full.match_lengths()[:, :w])
    assert torch.equal(th.output_counts(), full.output_counts())
    assert torch.equal(th.seen_mask(), full.seen_mask())


@settings(max_examples=30, deadline=None)
@given(histories, st.data())
def test_select_carries_state(data, draw):
    alpha, prompts, outputs, steps, query = data
    prompts = [[t % alpha for t in p] for p in prompts]
    outputs = [[t % alpha for t in o] for o in outputs]
    b = len(prompts)
    th = TokenHistory(prompts, outputs, vocab_size=6)
    th.output_counts(), th.seen_mask(), th.seen_ids(), th.prefix_hashes(), th.match_lengths()
    hists = [p + o for p, o in zip(prompts, outputs)]
    for toks in steps[:3]:  # some steps not yet folded into match_lengths
        toks = [t % alpha for t in toks]
        th.append(torch.tensor(toks))
        for h, t in zip(hists, toks):
            h.append(t)
    rows = draw.draw(st.lists(st.integers(0, b - 1), max_size=5))
    sub = th.select(torch.tensor(rows, dtype=torch.int64))
    assert sub._counts is not None and sub._match is not None  # carried, not rebuilt
    # the seen-id list is carried too, unless a row is repeated (then built again on first use)
    assert (sub._seen_buf is not None) == (len(set(rows)) == len(rows))
    sel_h = [list(hists[r]) for r in rows]
    sel_p = [prompts[r] for r in rows]
    check_against_reference(sub, sel_h, sel_p)
    # the selection keeps working incrementally
    if rows:
        toks = [(r + 1) % alpha for r in range(len(rows))]
        sub.append(torch.tensor(toks))
        for h, t in zip(sel_h, toks):
            h.append(t)
        check_against_reference(sub, sel_h, sel_p)
    # the original is unaffected by the selection's appends
    check_against_reference(th, hists, prompts)


@settings(max_examples=40, deadline=None)
@given(histories, st.data())
def test_follow_equals_a_fresh_select(data, draw):
    """A selection that follows its source through masked and unmasked appends (several
    between two catch-ups, and a follower ahead or too far behind, which it refuses) equals
    the source's rows selected afresh, every structure checked against the plain lists."""
    alpha, prompts, outputs, steps, query = data
    prompts = [[t % alpha for t in p] for p in prompts]
    outputs = [[t % alpha for t in o] for o in outputs]
    b = len(prompts)
    th = TokenHistory(prompts, outputs, vocab_size=6)
    hists = [p + o for p, o in zip(prompts, outputs)]
    rows = draw.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True))
    sub = th.select(rows)
    if query[0]:  # derived state built on the follower (then kept by its appends) or left to build
        sub.output_counts(), sub.seen_mask(), sub.seen_ids(), sub.prefix_hashes(), sub.match_lengths()
    host = np.array(rows)
    for i, toks in enumerate(steps):
        toks = [t % alpha for t in toks]
        mask = draw.draw(st.lists(st.booleans(), min_size=b, max_size=b)) if query[i] else [True] * b
        th.append(torch.tensor(toks), rows=torch.tensor(mask))
        for h, t, m in zip(hists, toks, mask):
            if m:
                h.append(t)
        if draw.draw(st.booleans()) or i == len(steps) - 1:
            behind = max(len(hists[r]) - len(sub.to_lists()[j]) for j, r in enumerate(rows))
            before = sub.to_lists()
            assert sub.follow(th, host, max_steps=3) == (behind <= 3)
            if behind > 3:  # refused, unchanged: the caller selects afresh
                assert sub.to_lists() == before
                sub = th.select(rows)
            check_against_reference(sub, [list(hists[r]) for r in rows], [prompts[r] for r in rows])
    ahead = th.select(rows)
    ahead.append(torch.zeros(len(rows), dtype=torch.int64))
    assert not ahead.follow(th, host)
    with pytest.raises(ValueError, match="follow"):
        sub.follow(th, host[:-1] if len(rows) > 1 else np.array([0, 0]))


history_parts = st.lists(
    st.tuples(
        st.lists(st.lists(st.integers(0, 5), max_size=20), min_size=1, max_size=3),  # prompts
        st.lists(st.lists(st.integers(0, 5), max_size=6), min_size=3, max_size=3),  # outputs
        st.lists(st.lists(st.integers(0, 5), min_size=3, max_size=3), max_size=20),  # appends
        st.sampled_from(["none", "counts", "all", "stale"]),  # derived state built beforehand
        st.booleans(),  # from_tensors (a loose length bound) or from lists
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(history_parts, st.data())
def test_merge_equals_the_rows_built_afresh(parts, draw):
    """Rows stitched from several histories (different capacities, built from lists or from
    tensors, with none / some / all / stale derived state) equal every structure of the
    same rows built from the plain lists, and keep doing so through masked and unmasked
    appends; the histories merged from are unchanged."""
    v = 6
    sources, lists = [], []
    for prompts, outputs, steps, state, tensors in parts:
        outputs = outputs[: len(prompts)]
        hists = [p + o for p, o in zip(prompts, outputs)]
        if tensors:
            width = max(len(h) for h in hists) + 3
            tok = torch.full((len(hists), max(width, 1)), 4, dtype=torch.int64)  # junk past the lengths
            for r, h in enumerate(hists):
                tok[r, : len(h)] = torch.tensor(h, dtype=torch.int64)
            th = TokenHistory.from_tensors(tok, torch.tensor([len(h) for h in hists]),
                                           torch.tensor([len(p) for p in prompts]), v, width)
        else:
            th = TokenHistory(prompts, outputs, vocab_size=v)
        if state in ("all", "stale"):
            th.output_counts(), th.seen_mask(), th.seen_ids(), th.prefix_hashes(), th.match_lengths()
        elif state == "counts":
            th.output_counts()
        for toks in steps[: 20 if state == "stale" else 0]:  # appended after the match table was built
            toks = toks[: len(hists)]
            th.append(torch.tensor(toks))
            for h, t in zip(hists, toks):
                h.append(t)
        sources.append(th)
        lists.append((hists, list(prompts)))
    n = draw.draw(st.integers(0, 7))
    source = draw.draw(st.lists(st.integers(0, len(sources) - 1), min_size=n, max_size=n))
    rows = [draw.draw(st.integers(0, sources[k].batch_size - 1)) for k in source]
    before = [th.to_lists() for th in sources]
    merged = TokenHistory.merge(sources, np.array(source), np.array(rows))
    assert [th.to_lists() for th in sources] == before
    if any(sources[k]._counts is not None for k in source):
        assert merged._counts is not None  # carried: built for the rows of histories without it
    m_h = [list(lists[k][0][r]) for k, r in zip(source, rows)]
    m_p = [lists[k][1][r] for k, r in zip(source, rows)]
    if not m_h:
        assert merged.batch_size == 0
        return
    loose = any(parts[k][4] for k in source)
    check_against_reference(merged, m_h, m_p, loose)
    for i in range(3):
        toks = [(r * 5 + i) % v for r in range(len(m_h))]
        mask = [bool((r + i) % 3) for r in range(len(m_h))] if i == 1 else [True] * len(m_h)
        merged.append(torch.tensor(toks), rows=torch.tensor(mask))
        for h, t, m in zip(m_h, toks, mask):
            if m:
                h.append(t)
        check_against_reference(merged, m_h, m_p, loose)


def test_merge_rejects_bad_arguments():
    a = TokenHistory([[1, 2]], [[3]], vocab_size=6)
    b = TokenHistory([[1]], [[]], vocab_size=7)
    with pytest.raises(ValueError, match="histories is empty"):
        TokenHistory.merge([], [], [])
    with pytest.raises(ValueError, match="source has 2 entries but rows has 1"):
        TokenHistory.merge([a], [0, 0], [0])
    with pytest.raises(ValueError, match=r"histories\[1\] has vocab_size 7"):
        TokenHistory.merge([a, b], [0], [0])
    with pytest.raises(ValueError, match=r"source entries must be in \[0, 1\)"):
        TokenHistory.merge([a], [1], [0])
    with pytest.raises(ValueError, match=r"rows taken from histories\[0\] must be in \[0, 1\)"):
        TokenHistory.merge([a], [0], [1])


def test_match_lengths_random_against_reference():
    rnd = random.Random(0)
    for _ in range(40):
        b = rnd.randint(1, 4)
        alpha = rnd.choice([1, 2, 3, 50])
        prompts = []
        for _ in range(b):
            n = rnd.randint(0, 80)
            if rnd.random() < 0.3:  # periodic rows give long matches (hashed binary search)
                period = [rnd.randrange(alpha) for _ in range(rnd.randint(1, 5))]
                prompts.append((period * 80)[:n])
            else:
                prompts.append([rnd.randrange(alpha) for _ in range(n)])
        th = TokenHistory(prompts, [[] for _ in range(b)], vocab_size=50)
        m = th.match_lengths()
        for r, h in enumerate(prompts):
            assert m[r, : len(h)].tolist() == ref_match_lengths(h)


# ----------------------------------------------------------------------------- sync-free build
# Off the CPU `match_lengths` reads nothing back to the host (it is rebuilt every step on
# vLLM's Model Runner V2 path). That branch runs here on CPU tensors through the module's
# test switch and must give exactly what the CPU branch gives.


@pytest.fixture
def sync_free(monkeypatch):
    """A function ``sync_free(on)`` that switches `match_lengths` to its off-CPU branch."""
    import samplers.history as history

    def switch(on: bool) -> None:
        monkeypatch.setattr(history, "_FORCE_SYNC_FREE", on)

    yield switch


def random_prompts(rnd: random.Random, b: int, max_len: int, alpha: int) -> list[list[int]]:
    """Rows of random tokens, some periodic (long matches: the hashed search), some empty."""
    prompts = []
    for _ in range(b):
        n = rnd.choice([0, rnd.randint(0, 12), rnd.randint(0, max_len)])
        if rnd.random() < 0.5:
            period = [rnd.randrange(alpha) for _ in range(rnd.randint(1, 7))]
            prompts.append((period * max_len)[:n])
        else:
            prompts.append([rnd.randrange(alpha) for _ in range(n)])
    return prompts


def both_branches(sync_free, make):
    """`match_lengths` of ``make()`` by the CPU branch and by the off-CPU branch."""
    sync_free(False)
    cpu = make().match_lengths()
    sync_free(True)
    dense = make().match_lengths()
    sync_free(False)
    return cpu, dense


def test_sync_free_build_is_bit_identical(sync_free):
    rnd = random.Random(7)
    long_hits = 0
    for _ in range(120):
        b = rnd.randint(0, 6)
        alpha = rnd.choice([1, 2, 3, 50])
        max_len = rnd.choice([9, 40, 300])
        prompts = random_prompts(rnd, b, max_len, alpha)
        outputs = random_prompts(rnd, b, 20, alpha)
        cpu, dense = both_branches(sync_free, lambda: TokenHistory(prompts, outputs, vocab_size=50))
        assert cpu.dtype == dense.dtype == torch.int32
        assert torch.equal(cpu, dense)  # the whole [B, capacity] table, zeros beyond len too
        for r, (p, o) in enumerate(zip(prompts, outputs)):
            assert dense[r, : len(p) + len(o)].tolist() == ref_match_lengths(p + o)
        long_hits += int((cpu >= 8).sum())
    assert long_hits > 1000  # the hashed binary search ran on many positions


def test_sync_free_build_from_tensors_with_a_loose_bound(sync_free):
    """A history over an engine's buffers: ``max_length`` only bounds the lengths (the
    search then runs more iterations than needed), garbage beyond each row's length."""
    rnd = random.Random(11)
    for _ in range(40):
        b = rnd.randint(1, 5)
        prompts = random_prompts(rnd, b, 120, rnd.choice([1, 2, 4]))
        width = max((len(p) for p in prompts), default=0) + rnd.randint(0, 50)
        tokens = torch.randint(0, 9, (b, max(width, 1)))
        for r, p in enumerate(prompts):
            tokens[r, : len(p)] = torch.tensor(p, dtype=torch.int64)
        lengths = torch.tensor([len(p) for p in prompts])
        prompt_lengths = torch.tensor([rnd.randint(0, len(p)) for p in prompts])

        def make():
            return TokenHistory.from_tensors(tokens, lengths, prompt_lengths, 9, width)

        cpu, dense = both_branches(sync_free, make)
        assert torch.equal(cpu, dense)
        exact = TokenHistory(prompts, [[] for _ in prompts], vocab_size=9).match_lengths()
        w = max(len(p) for p in prompts)
        assert torch.equal(dense[:, :w], exact[:, :w])


@settings(max_examples=40, deadline=None)
@given(histories, st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=25, max_size=25),
       st.integers(0, 3))
def test_sync_free_incremental_is_bit_identical(data, masks, periodic):
    """Two histories take the same appends (some masked, some long repeats) and queries,
    one through each branch: equal after every query, across catch-ups and rebuilds."""
    import samplers.history as history

    alpha, prompts, outputs, steps, query = data
    prompts = [[t % alpha for t in p] for p in prompts]
    outputs = [[t % alpha for t in o] for o in outputs]
    if periodic:  # long matches, kept long by the appends below
        prompts = [([r % alpha, periodic % alpha] * 20)[: len(p) + 16] for r, p in enumerate(prompts)]
    b = len(prompts)
    hists = {on: TokenHistory(prompts, outputs, vocab_size=6) for on in (False, True)}

    def query_both() -> None:
        got = {}
        for on, th in hists.items():
            history._FORCE_SYNC_FREE = on
            try:
                got[on] = th.match_lengths().clone()
            finally:
                history._FORCE_SYNC_FREE = False
        assert torch.equal(got[False], got[True])

    if query[0]:
        query_both()
    for i, toks in enumerate(steps):
        toks = [t % alpha for t in toks]
        if periodic and i % 3:
            toks = [hists[False].to_lists()[r][-2] if hists[False].lengths[r] >= 2 else 0 for r in range(b)]
        mask = torch.tensor(masks[i][:b]) if i % 4 == 1 else None
        for th in hists.values():
            th.append(torch.tensor(toks), rows=mask)
        if query[i]:
            query_both()
    query_both()
