"""logit_bias, ban_tokens / min_tokens, repetition / frequency / presence penalties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional._stats import no_overflow
from samplers.functional.penalties import ban_tokens, logit_bias, min_tokens, penalties, penalties_
from samplers.history import TokenHistory
from samplers.priority import SamplerID

INF = float("inf")
I64 = torch.int64


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------------------- references


def ref_penalties(l, hist, prompt_len, r, f, pr):
    """Row-by-row numpy reference of SEMANTICS.md (float32 arithmetic, same order)."""
    l = np.array(l, dtype=np.float32)
    out = l.copy()
    seen = set(hist)
    outs = hist[prompt_len:]
    r, f, pr = np.float32(r), np.float32(f), np.float32(pr)
    for tok in range(len(l)):
        x = out[tok]
        if tok in seen:
            x = x / r if x > 0 else x * r
        c = np.float32(outs.count(tok))
        x = np.float32(x - f * c)
        x = np.float32(x - pr * np.float32(c > 0))
        out[tok] = x
    return out


# ----------------------------------------------------------------------------- logit_bias


def test_logit_bias_hand_computed():
    logits = t([[0.0, 1.0, 2.0], [5.0, -INF, 0.5], [1.0, 1.0, 1.0]])
    # row 0: token 2 += 3 -> 5; row 1: token 1 += 10 -> -inf stays -inf, token 0 += -100 -> -95
    # row 2: no entry -> unchanged
    out = logit_bias(logits, t([0, 1, 1], I64), t([2, 1, 0], I64), t([3.0, 10.0, -100.0]))
    assert out.tolist() == [[0.0, 1.0, 5.0], [-95.0, -INF, 0.5], [1.0, 1.0, 1.0]]
    assert logits[0, 2] == 2.0  # input not modified
    # duplicates are summed: row 0 token 0: 0 + 0.5 + 0.25 = 0.75
    out = logit_bias(logits, t([0, 0], I64), t([0, 0], I64), t([0.5, 0.25]))
    assert out[0, 0] == 0.75
    # no entries at all: a copy
    out = logit_bias(logits, t([], I64), t([], I64), t([]))
    assert torch.equal(out, logits) and out.data_ptr() != logits.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logit_bias_low_precision(dtype):
    logits = torch.randn(3, 50).to(dtype)
    out = logit_bias(logits, t([1], I64), t([7], I64), t([1.5]))
    assert out.dtype == dtype
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1, 7] == (logits[1, 7].float() + 1.5).to(dtype)
    mask = torch.ones(50, dtype=torch.bool)
    mask[7] = False
    assert torch.equal(out[1, mask], logits[1, mask])


# ----------------------------------------------------------------------------- bans


def test_ban_tokens_and_min_tokens_hand_computed():
    logits = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    out = ban_tokens(logits, t([0, 2, 2], I64), t([1, 0, 0], I64))
    assert out.tolist() == [[1.0, -INF, 3.0], [4.0, 5.0, 6.0], [-INF, 8.0, 9.0]]
    # min_tokens: row 0 has 1 output token, minimum 3 -> still under: ban its EOS (2).
    # row 1 has 3 output tokens, minimum 3 -> reached: unchanged.
    # row 2 minimum 0 (disabled) -> unchanged, although it lists pairs.
    rows, toks = t([0, 0, 1, 2], I64), t([2, 0, 2, 2], I64)
    out = min_tokens(logits, t([1, 3, 0], I64), t([3, 3, 0], I64), rows, toks)
    assert out.tolist() == [[-INF, 2.0, -INF], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    assert logits[0, 0] == 1.0


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(2, 40), st.data())
def test_min_tokens_properties(b, v, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = torch.randn(b, v, generator=g)
    n = data.draw(st.integers(0, 8))
    rows = torch.randint(0, b, (n,), generator=g)
    toks = torch.randint(0, v, (n,), generator=g)
    outl = torch.randint(0, 4, (b,), generator=g)
    mint = torch.randint(0, 4, (b,), generator=g)
    out = min_tokens(logits, outl, mint, rows, toks)
    for r in range(b):
        banned = {int(tok) for rr, tok in zip(rows.tolist(), toks) if rr == r} if outl[r] < mint[r] else set()
        for k in range(v):
            if k in banned:
                assert out[r, k] == -INF
            else:
                assert out[r, k].view(torch.int32) == logits[r, k].view(torch.int32)


# ----------------------------------------------------------------------------- penalties


def test_penalties_hand_computed():
    # h = prompt [0] + output [1, 1, 2]; V = 5; l = [2, -1, 0.5, 3, -inf]
    # seen = {0, 1, 2}; counts: token 1 -> 2, token 2 -> 1
    # r = 2, f = 0.5, pr = 0.25:
    #   token 0: seen, 2 > 0 -> 2 / 2 = 1; count 0 -> 1
    #   token 1: seen, -1 <= 0 -> -1 * 2 = -2; - 0.5 * 2 = -3; - 0.25 = -3.25
    #   token 2: seen, 0.5 / 2 = 0.25; - 0.5 * 1 = -0.25; - 0.25 = -0.5
    #   token 3: unseen -> 3
    #   token 4: -inf stays -inf
    th = TokenHistory([[0]], [[1, 1, 2]], vocab_size=5)
    logits = t([[2.0, -1.0, 0.5, 3.0, -INF]])
    out = penalties(logits, th.seen_mask(), th.output_counts(), t([2.0]), t([0.5]), t([0.25]))
    assert out.tolist() == [[1.0, -3.25, -0.5, 3.0, -INF]]
    # repetition only (r = 0.5 < 1 rewards seen tokens): 2 / 0.5 = 4, -1 * 0.5 = -0.5, 0.5 / 0.5 = 1
    out = penalties(logits, th.seen_mask(), th.output_counts(), t([0.5]), t([0.0]), t([0.0]))
    assert out.tolist() == [[4.0, -0.5, 1.0, 3.0, -INF]]
    # frequency / presence count the output only: prompt token 0 is not penalised
    out = penalties(logits, th.seen_mask(), th.output_counts(), t([1.0]), t([-1.0]), t([1.0]))
    # token 1: -1 + 2 - 1 = 0; token 2: 0.5 + 1 - 1 = 0.5
    assert out.tolist() == [[2.0, 0.0, 0.5, 3.0, -INF]]


def _random_case(rng: np.random.Generator, b: int, v: int):
    prompts = [rng.integers(0, v, rng.integers(0, 12)).tolist() for _ in range(b)]
    outputs = [rng.integers(0, v, rng.integers(0, 12)).tolist() for _ in range(b)]
    logits = rng.normal(0, 3, (b, v)).astype(np.float32)
    logits[rng.random((b, v)) < 0.15] = -np.inf
    logits[rng.random((b, v)) < 0.1] = 0.0
    r = rng.choice([1.0, 1.0, 0.7, 1.3, 2.0], b).astype(np.float32)
    f = rng.choice([0.0, 0.0, -1.5, 0.4, 2.0], b).astype(np.float32)
    pr = rng.choice([0.0, 0.0, 1.0, -0.6], b).astype(np.float32)
    return prompts, outputs, logits, r, f, pr


def test_penalties_against_reference_random():
    rng = np.random.default_rng(0)
    for _ in range(30):
        b, v = int(rng.integers(1, 7)), int(rng.integers(2, 30))
        prompts, outputs, logits, r, f, pr = _random_case(rng, b, v)
        th = TokenHistory(prompts, outputs, vocab_size=v)
        out = penalties(torch.from_numpy(logits), th.seen_mask(), th.output_counts(),
                        torch.from_numpy(r), torch.from_numpy(f), torch.from_numpy(pr))
        for row in range(b):
            exp = ref_penalties(logits[row], prompts[row] + outputs[row], len(prompts[row]), r[row], f[row], pr[row])
            np.testing.assert_array_equal(out[row].numpy(), exp)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(2, 64))
def test_penalties_disabled_rows_bit_identical_and_batch_independent(seed, b, v):
    rng = np.random.default_rng(seed)
    prompts, outputs, logits, r, f, pr = _random_case(rng, b, v)
    logits[rng.random((b, v)) < 0.05] = np.nan  # even NaN payloads survive in disabled rows
    th = TokenHistory(prompts, outputs, vocab_size=v)
    lt = torch.from_numpy(logits)
    out = penalties(lt, th.seen_mask(), th.output_counts(), *map(torch.from_numpy, (r, f, pr)))
    in_place = penalties_(lt.clone(), th.seen_mask(), th.output_counts(), *map(torch.from_numpy, (r, f, pr)),
                          seen_ids=th.seen_ids())
    assert torch.equal(in_place.view(torch.int32), out.view(torch.int32))
    for row in range(b):
        if r[row] == 1 and f[row] == 0 and pr[row] == 0:
            assert torch.equal(out[row].view(torch.int32), lt[row].view(torch.int32))
        # the row alone gives the same bits
        sub = th.select(torch.tensor([row]))
        alone = penalties(lt[row : row + 1], sub.seen_mask(), sub.output_counts(),
                          *(torch.from_numpy(x[row : row + 1]) for x in (r, f, pr)))
        assert torch.equal(alone[0].view(torch.int32), out[row].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_penalties_low_precision(dtype):
    rng = np.random.default_rng(1)
    prompts, outputs, logits, r, f, pr = _random_case(rng, 4, 40)
    r[0], f[0], pr[0] = 1.0, 0.0, 0.0
    th = TokenHistory(prompts, outputs, vocab_size=40)
    lt = torch.from_numpy(logits).to(dtype)
    out = penalties(lt, th.seen_mask(), th.output_counts(), *map(torch.from_numpy, (r, f, pr)))
    assert out.dtype == dtype
    assert torch.equal(out[0], lt[0])
    for row in range(4):
        exp = ref_penalties(lt[row].float().numpy(), prompts[row] + outputs[row], len(prompts[row]), r[row], f[row], pr[row])
        assert torch.equal(out[row], torch.from_numpy(exp).to(dtype))


def test_penalties_no_nan_from_inf():
    th = TokenHistory([[0, 1]], [[0, 1, 1]], vocab_size=3)
    logits = t([[-INF, -INF, -INF]])
    out = penalties(logits, th.seen_mask(), th.output_counts(), t([1.5]), t([-2.0]), t([2.0]))
    assert not torch.isnan(out).any() and torch.isneginf(out).all()
    assert math.isinf(out[0, 0])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_penalties_cpu_path_matches_the_dense_formula_on_extreme_values(data):
    """The CPU path (numpy on the seen tokens) against the dense torch formula (the branch other
    devices and autograd inputs take), bit for bit, on values that overflow, saturate or are
    not finite: +-inf, NaN, +-3e38, signed zeros, and penalties from 1e-30 to 1e30."""
    B, V = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    special = st.sampled_from([INF, -INF, math.nan, 3e38, -3e38, 1e-38, 0.0, -0.0, 1.5, -2.5])
    logits = t(data.draw(st.lists(special, min_size=B * V, max_size=B * V))).view(B, V)
    prompts = [data.draw(st.lists(st.integers(0, V - 1), max_size=6)) for _ in range(B)]
    outputs = [data.draw(st.lists(st.integers(0, V - 1), max_size=6)) for _ in range(B)]
    th = TokenHistory(prompts, outputs, vocab_size=V)
    r = t([data.draw(st.sampled_from([1.0, 1e-30, 1e30, 1.2, 0.5])) for _ in range(B)])
    f = t([data.draw(st.sampled_from([0.0, -0.0, 2.0, -1.5])) for _ in range(B)])
    pr = t([data.draw(st.sampled_from([0.0, -0.0, 2.0, -2.0])) for _ in range(B)])
    got = penalties(logits, th.seen_mask(), th.output_counts(), r, f, pr)
    dense = penalties(logits.clone().requires_grad_(True), th.seen_mask(), th.output_counts(), r, f, pr).detach()
    assert torch.equal(torch.isnan(got), torch.isnan(dense))
    keep = ~torch.isnan(got)
    assert torch.equal(got[keep], dense[keep])
    assert torch.equal(torch.signbit(got[keep]), torch.signbit(dense[keep]))
    # the listed seen ids, in any order, give the same bits as the scan of the mask
    ids = th.seen_ids()[torch.from_numpy(np.random.default_rng(B * V).permutation(th.seen_ids().numel()))]
    listed = penalties(logits, th.seen_mask(), th.output_counts(), r, f, pr, seen_ids=ids)
    assert torch.equal(listed.view(torch.int32), got.view(torch.int32))
    # in place: the same bits in its input, either way of finding the seen tokens
    for seen_ids in (None, ids):
        y = logits.clone()
        assert penalties_(y, th.seen_mask(), th.output_counts(), r, f, pr, seen_ids=seen_ids) is y
        assert torch.equal(y.view(torch.int32), got.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_penalties_no_overflow_path_matches_the_dense_formula(data):
    """Inside ``no_overflow()`` (the pipeline's calls that ``may_overflow`` clears: finite or
    -inf logits, |l| * max(r, 1 / r) within the float32 range) the CPU path skips its clamp:
    the same bits as the dense formula, signed zeros and -inf included."""
    B, V = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 16))
    value = st.one_of(st.sampled_from([-INF, 0.0, -0.0, 1e-38, -1e-45, 3e30, -3e30]),
                      st.floats(-1e6, 1e6, width=32))
    logits = t(data.draw(st.lists(value, min_size=B * V, max_size=B * V))).view(B, V)
    prompts = [data.draw(st.lists(st.integers(0, V - 1), max_size=6)) for _ in range(B)]
    outputs = [data.draw(st.lists(st.integers(0, V - 1), max_size=6)) for _ in range(B)]
    th = TokenHistory(prompts, outputs, vocab_size=V)
    same = data.draw(st.booleans())  # one factor for every row, or one per row
    factors = st.sampled_from([1.0, 1.2, 0.5, 1e-5, 2.0, 1e5])
    r = t([data.draw(factors)] * B if same else [data.draw(factors) for _ in range(B)])
    f = t([data.draw(st.sampled_from([0.0, -0.0, 2.0, -1.5])) for _ in range(B)])
    pr = t([data.draw(st.sampled_from([0.0, -0.0, 2.0, -2.0])) for _ in range(B)])
    dense = penalties(logits.clone().requires_grad_(True), th.seen_mask(), th.output_counts(), r, f, pr).detach()
    with no_overflow():
        got = penalties(logits, th.seen_mask(), th.output_counts(), r, f, pr, seen_ids=th.seen_ids())
        scanned = penalties(logits, th.seen_mask(), th.output_counts(), r, f, pr)
    assert torch.equal(got.view(torch.int32), dense.view(torch.int32))
    assert torch.equal(scanned.view(torch.int32), dense.view(torch.int32))


def test_in_place_variant_refuses_what_it_cannot_write_into():
    th = TokenHistory([[0, 1]], [[1]], vocab_size=4)
    args = (th.seen_mask(), th.output_counts(), t([1.2]), t([0.0]), t([0.0]))
    with pytest.raises(ValueError, match="contiguous float32"):
        penalties_(torch.zeros(1, 8)[:, ::2], *args)
    with pytest.raises(ValueError, match="contiguous float32"):
        penalties_(torch.zeros(1, 4, dtype=torch.float16), *args)


def test_branch_free_select_is_np_where_bit_for_bit():
    """The repetition step's selection (integer masks instead of np.where) on random float32
    bit patterns: NaNs with payloads, infinities, signed zeros, subnormals, and per-token or
    one factor."""
    import importlib

    pen = importlib.import_module("samplers.functional.penalties")
    rng = np.random.default_rng(5)
    v = rng.integers(-(2**31), 2**31, 5000, dtype=np.int64).astype(np.int32).view(np.float32)
    v[:8] = [0.0, -0.0, INF, -INF, np.nan, 1e-45, -1e-45, 3e38]
    for r in (np.float32(1.3), np.float32(1e-30), rng.choice(np.float32([0.5, 2.0, 1e30]), v.size)):
        with np.errstate(all="ignore"):
            want = np.where(v > 0, v / r, v * r)
            got = pen._divide_positive_multiply_rest(v, r)
        assert np.array_equal(got.view(np.int32), want.view(np.int32))


# ----------------------------------------------------------------------------- seen_ids


def test_seen_ids_hand_computed():
    # V = 5; row 0 = [3, 1] + [1]: seen {1, 3} -> flat 1, 3; row 1 = [0]: seen {0} -> 5 + 0
    th = TokenHistory([[3, 1], [0]], [[1], []], vocab_size=5)
    assert th.seen_ids().tolist() == [1, 3, 5]  # row-major when built
    th.append(torch.tensor([2, 0]))  # row 0 sees 2 first (flat 2); row 1's 0 is not new
    assert th.seen_ids().tolist() == [1, 3, 5, 2]
    th.append(torch.tensor([4, 4]), rows=torch.tensor([False, True]))  # only row 1: 5 + 4
    assert th.seen_ids().tolist() == [1, 3, 5, 2, 9]
    # rows swapped: row 1's entries become row 0's (5 -> 0, 9 -> 4), row 0's row 1's (+5);
    # the order of the list is kept
    assert th.select([1, 0]).seen_ids().tolist() == [6, 8, 0, 7, 4]
    assert th.select([1]).seen_ids().tolist() == [0, 4]
    assert th.select(torch.tensor([], dtype=torch.int64)).seen_ids().tolist() == []
    # a repeated row: listed again from the mask, row-major
    rep = th.select([0, 0])
    assert rep._seen_buf is None and rep.seen_ids().tolist() == [1, 2, 3, 6, 7, 8]
    # the original is unchanged by the selections
    assert th.seen_ids().tolist() == [1, 3, 5, 2, 9]


def test_seen_ids_grow_past_their_capacity_and_stay_per_history():
    th = TokenHistory([[0]], [[]], vocab_size=300)
    assert th.seen_ids().tolist() == [0]
    sub = th.select([0])
    for tok in range(1, 200):  # a new token every step: the list grows many times
        th.append(torch.tensor([tok]))
    assert th.seen_ids().tolist() == list(range(200))
    assert sub.seen_ids().tolist() == [0]  # a selection has its own list
    sub.append(torch.tensor([299]))
    assert sub.seen_ids().tolist() == [0, 299] and th.seen_ids().numel() == 200


def test_seen_ids_of_a_history_over_tensors():
    tokens = torch.tensor([[4, 1, 4, 7, 7], [2, 9, 9, 9, 9]])  # row 1 is 2 tokens long
    th = TokenHistory.from_tensors(tokens, torch.tensor([5, 2]), torch.tensor([2, 1]), vocab_size=10,
                                   max_length=5)
    assert th.seen_ids().tolist() == [1, 4, 7, 12, 19]
    th.append(torch.tensor([3, 2]))
    assert th.seen_ids().tolist() == [1, 4, 7, 12, 19, 3]
    fresh = TokenHistory([[4, 1], [2]], [[4, 7, 7, 3], [9, 2]], vocab_size=10)
    assert torch.equal(th.seen_mask(), fresh.seen_mask())
    assert sorted(th.seen_ids().tolist()) == fresh.seen_ids().tolist()


def test_seen_ids_only_on_the_cpu():
    # elsewhere the dense mask is what the penalty reads: no list, no device sync to make one
    th = TokenHistory([[1, 2]], [[3]], vocab_size=5, device="meta")
    assert th.seen_ids() is None


@pytest.mark.parametrize("seed", range(3))
def test_pipeline_penalties_step_by_step_against_the_dense_formula(seed):
    """Through the pipeline, over many appended steps (the seen ids listed incrementally),
    with rows whose sampler orders differ (so the penalty runs on a selection of the rows,
    whose listed ids are carried by select): each row equals the dense formula applied in the
    row's own order."""
    rng = np.random.default_rng(seed)
    min_p_first = [SamplerID.MIN_P, SamplerID.PENALTIES]
    rows = [  # (params, the row's stages in order)
        (SamplingParams(repetition_penalty=1.3, min_p=0.1), "penalties, min_p"),
        (SamplingParams(repetition_penalty=0.8, min_p=0.1, sampler_priority=min_p_first), "min_p, penalties"),
        (SamplingParams(repetition_penalty=1.3), "penalties"),
        (SamplingParams(min_p=0.1), "min_p"),
        (SamplingParams(repetition_penalty=2.0, min_p=0.1, sampler_priority=min_p_first), "min_p, penalties"),
    ]
    B, V = len(rows), 40
    prompts = [rng.integers(0, 8, rng.integers(0, 10)).tolist() for _ in range(B)]
    outputs: list[list[int]] = [[] for _ in range(B)]
    batch = SamplingBatch([p for p, _ in rows], prompts, outputs, vocab_size=V)
    pipe = SamplerPipeline("torch", seed=seed)
    for step in range(30):
        logits = torch.from_numpy(rng.normal(0, 3, (B, V)).astype(np.float32))
        logits[0, 3] = -INF
        got = pipe.process(logits, batch)
        fresh = TokenHistory(prompts, outputs, vocab_size=V)
        for b, (p, order) in enumerate(rows):
            want, sub = logits[b : b + 1], fresh.select([b])
            for stage in order.split(", "):
                if stage == "min_p":
                    want = F.min_p(want, t([p.min_p]))
                else:
                    zero = t([0.0])
                    want = penalties(want.clone().requires_grad_(True), sub.seen_mask(), sub.output_counts(),
                                     t([p.repetition_penalty]), zero, zero).detach()
            assert torch.equal(got[b].view(torch.int32), want[0].view(torch.int32)), (step, b)
        mask = rng.random(B) < 0.7
        ids = torch.from_numpy(rng.integers(0, 12, B))  # a small alphabet: tokens repeat
        batch.append(ids, rows=torch.from_numpy(mask))
        for b in range(B):
            if mask[b]:
                outputs[b].append(int(ids[b]))
    # the listed ids were used, not rebuilt: the batch's, or its row groups' (row 2 truncates
    # nothing), whose histories follow the batch's
    import samplers.pipeline as pl

    groups = pl._row_groups(batch)
    assert groups is not None and [rows.tolist() for rows, _ in groups] == [[2], [0, 1, 3, 4]]
    assert all(part.history._seen_buf is not None for _, part in groups)


def _numpy_rescue(processed: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The rescue rule re-implemented: an all -inf row gets its input argmax (lowest id) back."""
    out = processed.copy()
    for r in np.flatnonzero(np.all(processed == -np.inf, axis=-1)):
        c = int(np.argmax(logits[r]))
        out[r, c] = logits[r, c]
    return out


@pytest.mark.parametrize("width", [3, 64, 65, 300])
def test_rescue_empty_rows_probe_and_full_read(width):
    """Rows finite in their first columns (the probe settles them), finite only past the
    probe, empty, and NaN rows (never empty): the values of the rule, whichever read decides."""
    g = np.random.default_rng(width)
    logits = g.standard_normal((6, width)).astype(np.float32)
    processed = logits.copy()
    processed[1, : width - 1] = -np.inf  # finite only in its last column
    processed[2] = -np.inf  # empty
    processed[3, :] = -np.inf
    processed[3, width // 2] = np.nan  # NaN: not empty
    processed[5] = -np.inf  # empty
    out = F.rescue_empty_rows(torch.from_numpy(processed), torch.from_numpy(logits))
    ref = _numpy_rescue(processed, logits)
    assert np.array_equal(out.numpy(), ref, equal_nan=True)
    # every row settled by the probe: the very tensor comes back
    full = torch.from_numpy(logits.copy())
    assert F.rescue_empty_rows(full, torch.from_numpy(logits)) is full


def test_rescue_empty_rows_trusts_given_counts_only_below_the_width():
    """``removed_counts`` (a chain's note): every row below V removed entries is not empty, and
    the very tensor comes back without a read; a row at V is searched and rescued."""
    g = np.random.default_rng(1)
    logits = g.standard_normal((3, 100)).astype(np.float32)
    processed = logits.copy()
    processed[1, :99] = -np.inf
    t = torch.from_numpy(processed)
    assert F.rescue_empty_rows(t, torch.from_numpy(logits), torch.tensor([0, 99, 0])) is t
    processed[2] = -np.inf
    out = F.rescue_empty_rows(t, torch.from_numpy(logits), torch.tensor([0, 99, 100]))
    assert np.array_equal(out.numpy(), _numpy_rescue(processed, logits))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("history_vocab", [200, 64])
def test_a_history_of_another_vocabulary_is_a_value_error(in_place, history_vocab):
    """Token tables of another width than the logits' would penalise other tokens, or index past
    the rows (an IndexError deep in numpy): a ValueError that names the table and both shapes."""
    h = TokenHistory([[5, 50, 60]], [[50, 7]], vocab_size=history_vocab)
    x = torch.randn(1, 100)
    fn = F.penalties_ if in_place else F.penalties
    with pytest.raises(ValueError, match=rf"seen_mask has shape \(1, {history_vocab}\), expected the logits' \(1, 100\)"):
        fn(x, h.seen_mask(), h.output_counts(), 1.5, 0.5, 0.5, h.seen_ids())
    good = TokenHistory([[5, 50, 60]], [[50, 7]], vocab_size=100)
    with pytest.raises(ValueError, match=r"output_counts has shape \(2, 100\)"):
        fn(x, good.seen_mask(), torch.zeros(2, 100, dtype=torch.int32), 1.5, 0.5, 0.5)
