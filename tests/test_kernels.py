"""Triton kernels (run by Triton's interpreter on the CPU) against the torch reference path.

Every kernel is compared with its ``samplers.functional`` function on random rows: several
shapes (V never a power of two, so the whole-row block has padding lanes; one larger case),
fp32/fp16/bf16, heterogeneous per-row parameters with a disabled row, rows with -inf already
present and rows full of ties. Removed-token sets must be identical, except that a stage with a
threshold on a sum (top_p, typical_p, min_p, ...) may decide a token lying within
``THRESHOLD_RTOL`` of its threshold the other way (``kernel_promise``: its sums add in
another order, under the interpreter too); kept values must match within the per-dtype
tolerance below; disabled rows must be bit-identical.

Tolerances (kernel vs reference, on finite values):
- truncation samplers, penalties, no_repeat_ngram: exact (kept values are copied);
- temperature / smoothing: exact in fp32 under the interpreter (same IEEE operations);
- dynamic temperature: its T comes from an entropy summed in another order, so values agree
  to rtol 1e-5 in fp32, and to one unit in the last place of fp16 / bf16 after the cast.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import samplers.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from samplers.history import TokenHistory  # noqa: E402
from samplers.sampling import compute_logprobs, draw_tokens as ref_draw, row_uniforms as ref_uniforms, split_seed  # noqa: E402

import samplers.kernels as kernels  # noqa: E402
from samplers.kernels import _common  # noqa: E402
from samplers.kernels import codes as KC, draw as KD, fused as K, ops, row_stats as KR  # noqa: E402

import test_truncation as tt  # noqa: E402
from kernel_promise import assert_within_promise  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(4, 1000), (3, 333)]
NINF = float("-inf")


def _logits(B, V, dtype, seed=0):
    """Row 0 plain, row 1 with -inf already present, row 2 full of ties, row 3+ plain."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    if B > 1:
        x[1, torch.randperm(V, generator=g)[: V // 5]] = NINF
    if B > 2:
        x[2] = torch.round(x[2] * 2) / 2  # many exactly tied logits
    return x.to(dtype)


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 1e-2)}[dtype]


def _assert_same(got, ref, dtype, exact=True):
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    gi, ri = torch.isneginf(got), torch.isneginf(ref)
    assert torch.equal(gi, ri), f"removed sets differ in {int((gi != ri).sum())} places"
    assert not torch.isnan(got).any()
    if exact:
        assert torch.equal(got[~gi], ref[~ri])
    else:
        rtol, atol = _tol(dtype)
        torch.testing.assert_close(got[~gi].float(), ref[~ri].float(), rtol=rtol, atol=atol)


def _params(B, values, dtype=torch.float32):
    """Per-row values cycled over B rows; the last row gets the disabled value (values[0])."""
    vals = [values[1 + (i % (len(values) - 1))] for i in range(B - 1)] + [values[0]]
    return torch.tensor(vals, dtype=dtype)


# sampler name -> (kernel, reference, [disabled, enabled values...], param dtype)
CASES = {
    "top_k": (ops.top_k, F.top_k, [0, 5, 50, 1, 7], torch.int64),
    "top_p": (ops.top_p, F.top_p, [1.0, 0.5, 0.9, 0.05, 0.99], torch.float32),
    "top_a": (ops.top_a, F.top_a, [0.0, 0.2, 0.05, 1.0, 0.5], torch.float32),
    "min_p": (ops.min_p, F.min_p, [0.0, 0.05, 0.2, 0.01, 0.5], torch.float32),
    "eta_cutoff": (ops.eta_cutoff, F.eta_cutoff, [0.0, 1e-3, 1e-2, 0.2, 3e-4], torch.float32),
    "epsilon_cutoff": (ops.epsilon_cutoff, F.epsilon_cutoff, [0.0, 1e-3, 1e-2, 0.05, 3e-4], torch.float32),
    "typical_p": (ops.typical_p, F.typical_p, [1.0, 0.5, 0.9, 0.2, 0.95], torch.float32),
    "nsigma": (ops.nsigma, F.nsigma, [0.0, 1.0, 2.0, 0.5, 3.0], torch.float32),
    "temperature": (ops.temperature, F.temperature, [1.0, 0.5, 2.0, 0.0, 0.7], torch.float32),
}


def _check_single_param_kernel(name: str, x: torch.Tensor) -> None:
    """``CASES[name]``'s kernel on ``x`` against the reference: within the promise
    (``kernel_promise``), the input untouched, the disabled last row bit-identical, a token
    left in every row."""
    kernel, ref, values, pdtype = CASES[name]
    before = x.clone()
    prm = _params(x.shape[0], values, pdtype)
    got = kernel(x, prm)
    assert torch.equal(x, before)
    assert_within_promise(got, ref, x, name, prm)
    assert torch.equal(got[-1].view(torch.uint8), x[-1].view(torch.uint8))  # disabled row
    assert torch.isfinite(got).any(dim=-1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_single_param_kernels_match_reference(name, shape, dtype):
    # A seed fixed per sampler (``hash(name)`` changed with every process, and so did the rows).
    _check_single_param_kernel(name, _logits(*shape, dtype, seed=zlib.crc32(name.encode()) % 1000))


def test_a_token_on_top_ps_threshold_may_fall_either_way():
    """A row whose mass before one token is 0.89999994 (float64) against top_p = 0.9 (float32
    0.89999998): torch's cumsum (float64 accumulation on the CPU) keeps the token, the kernel's
    float32 sums may not. The promise allows that flip, and only that one."""
    x = _logits(4, 1000, torch.bfloat16, seed=38)
    _check_single_param_kernel("top_p", x)
    row, tp = x[1].double(), 0.9
    p = torch.softmax(row, -1)
    mass_before = p.sum() - torch.cumsum(p.sort().values, 0)  # mass above each p, ascending
    assert float((mass_before - tp).abs().min()) < 1e-7  # the case is on the boundary


@pytest.mark.parametrize("name", list(_common.THRESHOLD_KEEP_MORE))
def test_each_threshold_parameter_moves_the_removed_set_the_way_the_table_says(name):
    """``THRESHOLD_KEEP_MORE`` (what the promise's checks move and which way) against the
    reference: the parameter moved that way (by 0-50%) removes a subset of what it removed, on
    random rows, rows with ties and rows with -inf, and the move changes some row somewhere."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    ranges = {"top_p": (0.05, 0.95), "typical_p": (0.05, 0.95), "nsigma": (0.1, 3.0), "xtc_threshold": (0.0, 0.4),
              "min_p": (0.01, 0.6), "top_a": (0.01, 0.6), "eta_cutoff": (1e-4, 0.05), "epsilon_cutoff": (1e-4, 0.05)}
    keep_more = _common.THRESHOLD_KEEP_MORE[name]
    ones, zeros = torch.ones(8), torch.zeros(8)
    ref = (lambda x, v: F.xtc(x, v, ones, zeros)) if name == "xtc_threshold" else getattr(F, name)
    changed = 0
    for trial in range(40):
        x = _logits(8, 60, torch.float32, seed=trial) if trial % 2 else torch.randn(8, 60, generator=g) * 2
        lo, hi = ranges[name]
        v = lo + (hi - lo) * torch.rand(8, generator=g)
        moved = v * (1 + keep_more * 0.5 * torch.rand(8, generator=g))
        if name in ("top_p", "typical_p"):
            moved = moved.clamp(max=1.0)
        removed, removed_moved = torch.isneginf(ref(x, v)), torch.isneginf(ref(x, moved))
        assert not (removed_moved & ~removed).any(), f"trial {trial}: the move removed more"
        changed += int((removed_moved != removed).any())
    assert changed > 0


def test_the_promise_check_refuses_a_token_decided_away_from_the_threshold():
    """``assert_within_promise`` can fail: a token removed or kept far from top_p's threshold,
    a flip on an exact stage (top_k), a changed kept value."""
    x = _logits(4, 1000, torch.float32, seed=3)
    tp, k = torch.full((4,), 0.9), torch.full((4,), 20)
    assert_within_promise(F.top_p(x, tp), F.top_p, x, "top_p", tp)
    far_token = F.top_p(x, tp)
    far_token[0, F.top_p(x, torch.full((4,), 0.5))[0].isneginf() & ~far_token[0].isneginf()] = NINF
    wrong_value = F.top_p(x, tp)
    wrong_value[0, wrong_value[0].argmax()] += 1.0
    one_more = F.top_k(x, k)
    one_more[0, F.top_k(x, k + 1)[0].isfinite() & one_more[0].isneginf()] = 0.0
    for got, ref, name, value, message in [
        (far_token, F.top_p, "top_p", tp, "removed beyond the tolerance"),
        (x.clone(), F.top_p, "top_p", tp, "kept beyond the tolerance"),
        (wrong_value, F.top_p, "top_p", tp, "kept values differ"),
        (one_more, F.top_k, "top_k", k, "removed sets differ in 1 places"),
    ]:
        with pytest.raises(AssertionError, match=message):
            assert_within_promise(got, ref, x, name, value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_xtc_kernel(shape, dtype):
    B, V = shape
    x = _logits(B, V, dtype, seed=3)
    # sharpen so that several tokens pass the thresholds
    x = (x.float() * 2).to(dtype)
    thr = torch.tensor([0.01, 0.05, 0.1, 0.2][:B])
    prob = torch.tensor([1.0, 0.5, 1.0, 0.0][:B])
    coin = torch.tensor([0.3, 0.2, 0.99, 0.1][:B])
    _assert_same(ops.xtc(x, thr, prob, coin), F.xtc(x, thr, prob, coin), dtype)


def test_xtc_kernel_keeps_every_tied_least_likely_member_of_c():
    """SEMANTICS.md: tokens tied at C's minimum are all kept (not one of them by position)."""
    x = torch.cat([tt.logits_of([0.35, 0.2, 0.25, 0.2]), tt.logits_of([0.3, 0.3, 0.1, 0.3]),
                   tt.logits_of([0.3, 0.3, 0.1, 0.3])])
    thr, prob, coin = torch.tensor([0.15, 0.2, 0.05]), torch.ones(3), torch.zeros(3)
    got = ops.xtc(x, thr, prob, coin)
    # row 0: C = all four, min .2 held by tokens 1 and 3: both kept, .35 and .25 removed;
    # row 1: C = the three .3 tokens, all tied at its minimum: nothing removed;
    # row 2: C = all four, min .1: the three .3 tokens removed
    assert tt.kept(got) == [[1, 3], [0, 1, 2, 3], [2]]
    _assert_same(got, F.xtc(x, thr, prob, coin), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dynamic_temperature_and_smoothing(shape, dtype):
    B, V = shape
    x = _logits(B, V, dtype, seed=4)
    dmin = _params(B, [0.0, 0.5, 0.0, 1.0], torch.float32)
    dmax = _params(B, [0.0, 1.5, 2.0, 1.0], torch.float32)
    dexp = _params(B, [1.0, 1.0, 0.5, 2.0], torch.float32)
    _assert_same(ops.dynamic_temperature(x, dmin, dmax, dexp), F.dynamic_temperature(x, dmin, dmax, dexp),
                 dtype, exact=False)
    f = _params(B, [0.0, 0.2, 1.0, 0.05])
    c = _params(B, [1.0, 1.0, 2.0, 1.5])
    _assert_same(ops.quadratic_smoothing(x, f, c), F.quadratic_smoothing(x, f, c), dtype,
                 exact=dtype == torch.float32)


def test_dynamic_temperature_of_a_peaked_row():
    """A row whose top token holds nearly all the mass has an entropy ratio H / log N far
    below 1e-30 (subnormal in the first row); a small exponent still lifts ratio ** exponent
    well above 0. The kernels once clamped the ratio at 1e-30 before the power (T 1.25
    instead of 0.97 in the first row, 3x too large in the others)."""
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :2], x[0, 2:] = torch.tensor([300.0, 400.0]), NINF
    x[1:, 7] = torch.tensor([95.0, 60.0, 140.0])
    dmin = torch.tensor([0.0, 0.0, 0.2, 0.0])
    dmax = torch.tensor([2.5, 1.5, 2.0, 1.0])
    dexp = torch.tensor([0.01, 0.1, 0.05, 0.5])
    want = F.dynamic_temperature(x, dmin, dmax, dexp)
    assert want[0, 1] / x[0, 1] > 1 / 1.0  # (T about 0.97: the row is not at dynatemp_max)
    _assert_same(ops.dynamic_temperature(x, dmin, dmax, dexp), want, torch.float32, exact=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalties_and_no_repeat_ngram(dtype):
    B, V = 4, 500
    x = _logits(B, V, dtype, seed=5)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 40, size=30).tolist() for _ in range(B)]
    outputs = [rng.integers(0, 40, size=15).tolist() for _ in range(B)]
    h = TokenHistory(prompts, outputs, V)
    r = torch.tensor([1.3, 1.0, 0.8, 1.0])
    f = torch.tensor([0.5, -0.3, 0.0, 0.0])
    pr = torch.tensor([0.2, 0.0, 1.0, 0.0])  # last row disabled
    got = ops.penalties(x, h.seen_mask(), h.output_counts(), r, f, pr)
    _assert_same(got, F.penalties(x, h.seen_mask(), h.output_counts(), r, f, pr), dtype)
    n = torch.tensor([2, 0, 1, 3])
    _assert_same(ops.no_repeat_ngram(x, h, n), F.no_repeat_ngram(x, h, n), dtype)


def test_torch_backed_stages_are_the_reference():
    x = _logits(3, 300, torch.float32, seed=6)
    z = torch.tensor([0.9, 1.0, 0.5])
    assert torch.equal(ops.tfs(x, z), F.tfs(x, z))

    s = torch.tensor([0.5, 0.0, -0.3])
    assert torch.equal(ops.skew(x, s), F.skew(x, s))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_stats(dtype):
    x = _logits(4, 777, dtype, seed=7)
    x[3] = NINF
    x[3, 5] = 1.0  # one finite token
    st = KR.row_stats(x)
    l32 = x.float()
    from samplers.functional._stats import entropy, softmax_and_log_softmax

    p, logp = softmax_and_log_softmax(l32)
    torch.testing.assert_close(st["max"], l32.amax(-1))
    torch.testing.assert_close(st["logsumexp"], torch.logsumexp(l32, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st["entropy"], entropy(p, logp), rtol=1e-5, atol=1e-5)
    fin = torch.isfinite(l32)
    std = torch.stack([l32[b][fin[b]].std() if fin[b].sum() > 1 else torch.tensor(0.0) for b in range(4)])
    torch.testing.assert_close(st["std"], std, rtol=1e-5, atol=1e-5)
    assert st["count"].tolist() == fin.sum(-1).float().tolist()


def test_fused_chain_equals_the_sequential_reference_with_row_masks():
    """One launch of several stages == the reference functions applied one after another,
    a stage restricted to some rows by its mask (heterogeneous orders)."""
    B, V = 4, 600
    x = _logits(B, V, torch.bfloat16, seed=8)
    prm = {
        "temperature": torch.tensor([0.7, 1.0, 1.3, 0.5]), "top_k": torch.tensor([40, 0, 100, 3]),
        "top_p": torch.tensor([0.9, 0.8, 1.0, 0.5]), "min_p": torch.tensor([0.02, 0.0, 0.1, 0.05]),
        "typical_p": torch.tensor([0.95, 0.9, 1.0, 0.7]), "nsigma": torch.tensor([2.0, 1.5, 0.0, 1.0]),
        "top_a": torch.tensor([0.1, 0.0, 0.3, 0.2]), "eta_cutoff": torch.tensor([1e-3, 0.0, 1e-2, 0.0]),
        "epsilon_cutoff": torch.tensor([1e-4, 3e-3, 0.0, 0.0]),
        "smoothing_factor": torch.tensor([0.0, 0.3, 0.1, 0.0]), "smoothing_curve": torch.tensor([1.0, 1.0, 2.0, 1.0]),
        "xtc_threshold": torch.tensor([0.05, 0.1, 0.02, 0.1]), "xtc_probability": torch.tensor([1.0, 1.0, 0.5, 0.0]),
        "coin": torch.tensor([0.1, 0.5, 0.9, 0.0]),
    }
    mask = torch.tensor([True, False, True, True])
    codes = [KC.TEMPERATURE, KC.NSIGMA, KC.TOP_K, KC.TOP_P, KC.TOP_A, KC.MIN_P, KC.ETA, KC.EPSILON, KC.TYPICAL,
             KC.QUADRATIC, KC.XTC]
    masks = [None, mask, None, None, None, ~mask, None, None, None, None, None]
    got = K.run_chain(x, codes, masks, KC.param_table(B, x.device, prm))
    ref = x.float()
    steps = [
        lambda y: F.temperature(y, prm["temperature"]), lambda y: F.nsigma(y, prm["nsigma"]),
        lambda y: F.top_k(y, prm["top_k"]), lambda y: F.top_p(y, prm["top_p"]), lambda y: F.top_a(y, prm["top_a"]),
        lambda y: F.min_p(y, prm["min_p"]), lambda y: F.eta_cutoff(y, prm["eta_cutoff"]),
        lambda y: F.epsilon_cutoff(y, prm["epsilon_cutoff"]), lambda y: F.typical_p(y, prm["typical_p"]),
        lambda y: F.quadratic_smoothing(y, prm["smoothing_factor"], prm["smoothing_curve"]),
        lambda y: F.xtc(y, prm["xtc_threshold"], prm["xtc_probability"], prm["coin"]),
    ]
    for fn, m in zip(steps, masks):
        out = fn(ref)
        ref = out if m is None else torch.where(m[:, None], out, ref)
    _assert_same(got, ref, torch.float32)
    assert torch.isfinite(got).sum(-1).min() >= 1


_RANDOM_STAGES = {
    # code: (parameter names and a sampler of enabled values, the reference on (y, prm, side))
    KC.TEMPERATURE: (lambda r: {"temperature": r.choice([0.5, 0.8, 1.0, 1.7])},
                    lambda y, p, d: F.temperature(y, p["temperature"])),
    KC.NSIGMA: (lambda r: {"nsigma": r.choice([0.0, 1.0, 2.5])}, lambda y, p, d: F.nsigma(y, p["nsigma"])),
    KC.TOP_K: (lambda r: {"top_k": float(r.choice([0, 1, 5, 40, 300]))},
              lambda y, p, d: F.top_k(y, p["top_k"].long())),
    KC.TOP_P: (lambda r: {"top_p": r.choice([1.0, 0.3, 0.9, 0.99])}, lambda y, p, d: F.top_p(y, p["top_p"])),
    KC.TOP_A: (lambda r: {"top_a": r.choice([0.0, 0.1, 0.5])}, lambda y, p, d: F.top_a(y, p["top_a"])),
    KC.MIN_P: (lambda r: {"min_p": r.choice([0.0, 0.01, 0.1, 0.5])}, lambda y, p, d: F.min_p(y, p["min_p"])),
    KC.ETA: (lambda r: {"eta_cutoff": r.choice([0.0, 1e-4, 3e-3])}, lambda y, p, d: F.eta_cutoff(y, p["eta_cutoff"])),
    KC.EPSILON: (lambda r: {"epsilon_cutoff": r.choice([0.0, 1e-4, 2e-3])},
                lambda y, p, d: F.epsilon_cutoff(y, p["epsilon_cutoff"])),
    KC.TYPICAL: (lambda r: {"typical_p": r.choice([1.0, 0.5, 0.95])}, lambda y, p, d: F.typical_p(y, p["typical_p"])),
    KC.QUADRATIC: (lambda r: {"smoothing_factor": r.choice([0.0, 0.2, 1.0]), "smoothing_curve": r.choice([1.0, 2.0])},
                  lambda y, p, d: F.quadratic_smoothing(y, p["smoothing_factor"], p["smoothing_curve"])),
    KC.XTC_PHILOX: (lambda r: {"xtc_threshold": r.choice([0.01, 0.1]), "xtc_probability": r.choice([0.0, 0.5, 1.0])},
                   lambda y, p, d: F.xtc(y, p["xtc_threshold"], p["xtc_probability"], d["coin"])),
    KC.PENALTIES: (lambda r: {"repetition_penalty": r.choice([1.0, 1.3]), "frequency_penalty": r.choice([0.0, 0.2]),
                             "presence_penalty": r.choice([0.0, 0.5])},
                  lambda y, p, d: F.penalties(y, d["seen"], d["counts"], p["repetition_penalty"],
                                              p["frequency_penalty"], p["presence_penalty"])),
}


@pytest.mark.parametrize("seed", range(6))
def test_random_chains_equal_the_reference_functions_in_sequence(seed):
    """Random chains (1-6 stages in random order, per-row parameters with disabled rows, a row
    mask per stage, peaked / flat / tied rows, -inf already present, V not a multiple of any
    block) with the draw fused: the removed sets equal those of the reference functions
    applied one after another, the kept values are equal (within 1e-5), and the tokens and
    logprobs equal drawing from the output afterwards."""
    r = np.random.default_rng(seed)
    B, V = 4, int(r.choice([257, 700, 1000]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * torch.tensor([[4.0], [1.0], [0.05], [3.0]])
    x[3] = torch.round(x[3])  # ties
    x[1, torch.randperm(V, generator=g)[: V // 4]] = NINF
    dtype = [torch.float32, torch.bfloat16, torch.float16][seed % 3]
    x = x.to(dtype)
    codes = list(r.permutation(list(_RANDOM_STAGES))[: int(r.integers(1, 7))])
    prm: dict[str, torch.Tensor] = {}
    for c in codes:
        rows = [_RANDOM_STAGES[c][0](r) for _ in range(B)]
        for name in rows[0]:
            prm[name] = torch.tensor([float(row[name]) for row in rows])
    masks = [None if r.random() < 0.6 else torch.from_numpy(r.random(B) < 0.6) for _ in codes]
    counts = torch.randint(0, 3, (B, V), generator=g, dtype=torch.int32)
    words = torch.tensor([split_seed(int(s)) for s in r.integers(0, 2**40, B)], dtype=torch.int64).t()
    step, seq = torch.arange(B, dtype=torch.int64) * 7, torch.zeros(B, dtype=torch.int64)
    side = {"seen": counts > 0, "counts": counts, "coin": ref_uniforms(words[0], words[1], step, seq, 1)}
    keys = KC.key_words(words[0], words[1], step, seq)
    greedy = torch.from_numpy(r.random(B) < 0.3)
    out, tokens, logprobs = K.run_chain(x, codes, masks, KC.param_table(B, x.device, prm), seen=side["seen"],
                                        counts=counts, keys=keys, draw_greedy=greedy)
    ref = x.float()
    for c, m in zip(codes, masks):
        y = _RANDOM_STAGES[c][1](ref, prm, side)
        ref = y if m is None else torch.where(m[:, None], y, ref)
    _assert_same(out, ref, torch.float32, exact=False)
    want_t, want_lp = kernels.sample_tokens(out, greedy, keys)
    assert torch.equal(tokens, want_t), (codes, tokens, want_t)
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_larger_shapes():
    """A real vocabulary size (V = 32000 + 1, not a multiple of any block) and a fused chain."""
    B, V = 2, 32001
    x = _logits(B, V, torch.float16, seed=9)
    for kernel, ref, prm in [
        (ops.top_k, F.top_k, torch.tensor([50, 1000])),
        (ops.top_p, F.top_p, torch.tensor([0.9, 0.3])),
        (ops.typical_p, F.typical_p, torch.tensor([0.9, 0.5])),
        (ops.min_p, F.min_p, torch.tensor([0.05, 0.0])),
    ]:
        _assert_same(kernel(x, prm), ref(x, prm), torch.float16)


def test_top_k_and_top_p_ties_at_the_boundary_are_all_kept():
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0, -0.0, NINF]])
    got = ops.top_k(x, torch.tensor([2]))
    assert torch.isfinite(got[0]).tolist() == [True, False, True, True, True, False, False, False]
    got = ops.top_k(x, torch.tensor([6]))  # the 6th largest is 0.0 == -0.0: both kept
    assert torch.isfinite(got[0]).tolist() == [True] * 7 + [False]
    # p = [0.25, 0.25, 0.25, 0.25]: top_p 0.3 -> mass above each token is 0 < 0.3: all kept
    y = torch.zeros(1, 4)
    assert torch.isfinite(ops.top_p(y, torch.tensor([0.3]))).all()
    for fn in (ops.top_p, ops.typical_p):
        _assert_same(fn(x, torch.tensor([0.6])), getattr(F, fn.__name__)(x, torch.tensor([0.6])), torch.float32)


# ---------------------------------------------------------------------------- typical_p's top token
def test_typical_published_cases_on_the_kernels():
    """The HF transformers (test_logits_process.py::test_typical_dist_warper) and llama.cpp
    (test-sampling.cpp::test_typical) expectations, ``tt.TYPICAL_PUBLISHED``: [0.4, 0.2, 0.2,
    0.2] at 0.5 keeps only the three 0.2 tokens (the top token goes); [0.97, 0.01 x 3] only
    the 0.97 token."""
    x = torch.cat([tt.logits_of(p) for p, _, _ in tt.TYPICAL_PUBLISHED])
    tp = torch.tensor([q for _, q, _ in tt.TYPICAL_PUBLISHED])
    got = ops.typical_p(x, tp)
    assert tt.kept(got) == [k for _, _, k in tt.TYPICAL_PUBLISHED]
    _assert_same(got, F.typical_p(x, tp), torch.float32)


def typical_top_removed_rows(V: int = 1000) -> torch.Tensor:
    """Rows (as log-probabilities) in which typical_p 0.5 removes the top token (token 0):
    A: p0 = .4, V - 1 tied tokens share .6: H = .4 * .916 + .6 * 7.418 = 4.818, d0 = 3.90 >
       d(tail) = 2.60, and the tail's mass .6 >= .5 -> the V - 1 others kept;
    B: p0 = .3, 20 tokens of .03, V - 21 share .1: H = .361 + 2.104 + .919 = 3.384,
       d(.03) = .123 < d0 = 2.18 < d(tail) = 5.8; the .03 group has .6 >= .5 -> those 20;
    C: p0 = .4, 30 tokens of .02, the rest 12 logits lower: H ~ .367 + 2.347 = 2.714,
       d(.02) = 1.198 < d0 = 1.80 -> the 30 tokens (also after top_k 31)."""
    a = [0.4] + [0.6 / (V - 1)] * (V - 1)
    b = [0.3] + [0.03] * 20 + [0.1 / (V - 21)] * (V - 21)
    x = torch.cat([tt.logits_of(a), tt.logits_of(b), tt.logits_of([0.4] + [0.02] * 30 + [0.02] * (V - 31))])
    x[2, 31:] -= 12.0
    return x


TYPICAL_TOP_REMOVED_KEPT = [list(range(1, 1000)), list(range(1, 21)), list(range(1, 31))]


def test_typical_removes_the_top_token_on_larger_rows():
    x = typical_top_removed_rows()
    tp = torch.full((3,), 0.5)
    got = ops.typical_p(x, tp)
    assert tt.kept(got) == TYPICAL_TOP_REMOVED_KEPT
    _assert_same(got, F.typical_p(x, tp), torch.float32)
    # after top_k in the same launch (few survivors: the compacted search / the sparse mode)
    codes = [KC.TOP_K, KC.TYPICAL]
    table = KC.param_table(3, x.device, {"top_k": torch.full((3,), 31.0), "typical_p": tp})
    got = K.run_chain(x, codes, [None, None], table)
    _assert_same(got, F.typical_p(F.top_k(x, torch.full((3,), 31)), tp), torch.float32)
    assert tt.kept(got[2:]) == [list(range(1, 31))]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=tt.quantised_rows(max_batch=3, max_vocab=40))
def test_prop_typical_kernel_equals_the_sorted_definition(data):
    """The kernel keeps exactly the set of the numpy sort of the definition (rows with ties)."""
    tt.check_typical_equals_sorted_definition(ops.typical_p, *data)


# ---------------------------------------------------------------------------- draw and Philox
def test_philox_kernel_reproduces_the_torch_stream_bit_for_bit():
    seeds = [0, 1, 2**40 + 5, -7, 123456789, 2**63 - 1, 2**64 - 1, 42, 99, 3]
    words = torch.tensor([split_seed(s) for s in seeds], dtype=torch.int64).t()
    step = torch.arange(10, dtype=torch.int64) * 1000 + 3
    seq = torch.arange(10, dtype=torch.int64) % 3
    for purpose in (0, 1):
        want = ref_uniforms(words[0], words[1], step, seq, purpose)
        got = KD.row_uniforms(words[0], words[1], step, seq, purpose)
        assert torch.equal(got, want)


def test_draw_kernel_hand_computed_and_edge_cases():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(5, 1)
    u = torch.tensor([0.05, 0.15, 0.35, 0.65, 0.999])
    assert kernels.draw_tokens(logits, torch.zeros(5, dtype=torch.bool), u).tolist() == [0, 1, 2, 3, 3]
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [NINF, 0.0, -1.0, 0.0]])
    assert kernels.draw_tokens(ties, torch.ones(2, dtype=torch.bool), torch.zeros(2)).tolist() == [1, 1]
    removed = torch.tensor([[0.0, 0.0, NINF, NINF], [NINF, 0.0, NINF, NINF]])
    u = torch.tensor([0.99999994, 0.99999994])
    assert kernels.draw_tokens(removed, torch.zeros(2, dtype=torch.bool), u).tolist() == [1, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_draw_kernel_matches_reference_on_random_rows(dtype):
    B, V = 48, 203
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(B, V, generator=g) * 2).to(dtype)
    x[::3, ::2] = NINF
    greedy = torch.arange(B) % 4 == 0
    u = torch.rand(B, generator=g)
    assert torch.equal(kernels.draw_tokens(x, greedy, u), ref_draw(x, greedy, u))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_tokens_draws_from_the_torch_stream_and_returns_the_logprobs(dtype):
    """``sample_tokens`` computes each row's uniform in the kernel from its Philox words: the
    same tokens as the torch draw with ``row_uniforms(..., PURPOSE_DRAW)``, and the chosen
    log-probabilities of ``compute_logprobs`` (greedy rows, rows with removed tokens)."""
    B, V = 40, 1000
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(B, V, generator=g) * 3).to(dtype)
    x[::3, ::2] = NINF
    x[5, 1:] = NINF  # a single token left
    greedy = torch.arange(B) % 4 == 0
    words = torch.tensor([split_seed(s) for s in range(500, 500 + B)], dtype=torch.int64).t()
    step = torch.arange(B, dtype=torch.int64) * 3
    seq = torch.arange(B, dtype=torch.int64) % 2
    u = ref_uniforms(words[0], words[1], step, seq, 0)
    tokens, logprobs = kernels.sample_tokens(x, greedy, KC.key_words(words[0], words[1], step, seq))
    want = ref_draw(x, greedy, u)
    assert torch.equal(tokens, want)
    assert tokens[5] == 0 and not torch.isneginf(x[torch.arange(B), tokens]).any()
    want_lp, _ = compute_logprobs(x.float(), x, torch.zeros(B, dtype=torch.bool), want, 0)
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chain_with_the_draw_fused_equals_chain_then_draw(dtype):
    """``run_chain(..., draw_greedy=...)`` (the draw at the end of the chain launch) returns the
    chain's output and exactly the tokens / logprobs of ``sample_tokens`` on that output."""
    B, V = 12, 1000
    x = _logits(B, V, dtype, seed=41)
    words = torch.tensor([split_seed(s) for s in range(700, 700 + B)], dtype=torch.int64).t()
    keys = KC.key_words(words[0], words[1], torch.arange(B) * 5, torch.zeros(B, dtype=torch.int64))
    greedy = torch.arange(B) % 3 == 0
    table = KC.param_table(B, x.device, {"top_k": torch.full((B,), 40.0), "top_p": torch.full((B,), 0.9),
                                        "min_p": torch.where(torch.arange(B) % 2 == 0, 0.05, 0.0)})
    codes = [KC.TOP_K, KC.TOP_P, KC.MIN_P]
    out, tokens, logprobs = K.run_chain(x, codes, [None] * 3, table, keys=keys, draw_greedy=greedy)
    alone = K.run_chain(x, codes, [None] * 3, table, keys=keys)
    assert torch.equal(out, alone)
    want_t, want_lp = kernels.sample_tokens(alone, greedy, keys)
    assert torch.equal(tokens, want_t)
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-6, atol=1e-6)
    # a row that no stage changes (every stage disabled for it) is still drawn
    none = KC.param_table(B, x.device, {})
    out, tokens, _ = K.run_chain(x, [KC.MIN_P], [None], none, keys=keys, draw_greedy=greedy)
    assert torch.equal(out, x.float()) and torch.equal(tokens, kernels.sample_tokens(x.float(), greedy, keys)[0])


def test_layout_is_a_static_function_of_the_vocabulary_and_the_device(monkeypatch):
    """Whole-row or blocked is decided by V and the device's limits alone (no timing): a
    seeded row's result cannot depend on what else is batched. On a GPU the whole-row chain
    runs up to WHOLE_ROW_MAX_GPU lanes, less where 8 bytes of shared memory per lane exceed
    the device's per-block limit; under the interpreter up to BLOCKED_ABOVE."""
    from types import SimpleNamespace

    cpu = torch.device("cpu")
    assert _common.whole_row_limit(cpu) == _common.BLOCKED_ABOVE
    for B in (1, 7, 300):
        assert _common.pick_layout(torch.empty(B, 32000)) == "whole"
        assert _common.pick_layout(SimpleNamespace(shape=(B, 128256), device=cpu)) == "blocked"
    monkeypatch.setattr(_common, "INTERPRET", False)
    gpu = torch.device("cuda", 1)
    asked = []

    def limit_of(kib):
        return lambda dev: asked.append(dev) or kib * 1024

    # sm_90 (227 KB), sm_80 (163 KB), sm_86 / sm_89 / sm_120 (99 KB), sm_75 (64 KB), 48 KB, 16 KB
    for kib, want in ((227, 8192), (163, 8192), (99, 8192), (64, 8192), (48, 4096), (16, 2048)):
        monkeypatch.setattr(_common, "max_shared_memory", limit_of(kib))
        assert _common.whole_row_limit(gpu) == want, kib
        assert want * _common.WHOLE_ROW_SHARED_PER_LANE <= kib * 1024
    assert asked[-1] == gpu  # the limits of the tensors' device, not the current one
    monkeypatch.setattr(_common, "max_shared_memory", limit_of(99))
    layouts = {V: _common.pick_layout(SimpleNamespace(shape=(4, V), device=gpu)) for V in (1000, 8192, 8193, 32000, 151936)}
    assert layouts == {1000: "whole", 8192: "whole", 8193: "blocked", 32000: "blocked", 151936: "blocked"}
    assert not hasattr(K, "_time_launch") and not hasattr(K, "_tuned_kernel")


def test_a_whole_row_chain_the_device_cannot_load_falls_back_to_the_blocked_chain(monkeypatch,
                                                                                   whole_row_chain_does_not_load):
    """Triton raises OutOfResources when it loads a kernel that needs more shared memory (or
    registers) than the device has, before anything runs: the chain then runs blocked, and
    that (a property of the compiled kernel and the device) is remembered."""
    monkeypatch.setattr(_common, "TILE", 128)
    tried = whole_row_chain_does_not_load
    B, V = 3, 333
    x = _logits(B, V, torch.float32, seed=42)
    table = KC.param_table(B, x.device, {"top_k": torch.full((B,), 20.0), "top_p": torch.full((B,), 0.8)})
    want = F.top_p(F.top_k(x, torch.full((B,), 20)), torch.full((B,), 0.8))
    _assert_same(K.run_chain(x, [KC.TOP_K, KC.TOP_P], [None, None], table), want, torch.float32)
    _assert_same(K.run_chain(x, [KC.TOP_K, KC.TOP_P], [None, None], table), want, torch.float32)
    assert tried == [512]
    # another stage tuple is tried on its own
    K.run_chain(x, [KC.TOP_K], [None], table)
    assert tried == [512, 512]


def test_device_guard_makes_the_tensors_device_current():
    """Triton launches on the current CUDA device: every launch runs inside
    ``device_guard(tensor)``, which is ``torch.cuda.device(tensor.device)`` for CUDA tensors."""
    from types import SimpleNamespace

    g = _common.device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    with _common.device_guard(torch.empty(1)):  # CPU: nothing to switch
        pass


def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Each module's launches (chain, both layouts; draw, both; Philox; row statistics; the
    grammar bitmask) happen inside ``device_guard`` of their input (a fake guard records it)."""
    import contextlib

    from samplers.kernels import blocked as KB, guided as KG

    state = {"inside": 0, "guarded": [], "launched": []}

    @contextlib.contextmanager
    def guard(t):
        state["guarded"].append(t.device)
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            assert state["inside"] == 1, f"{self.name} launched outside the device guard"
            state["launched"].append(self.name)
            return self.kernel[grid]

    for mod in (K, KD, KR, KG):
        monkeypatch.setattr(mod, "device_guard", guard)
    for mod, name in ((K, "_chain_kernel"), (KB, "_blocked_chain_kernel"), (KD, "_draw_kernel"),
                      (KD, "_blocked_draw_kernel"), (KD, "_uniform_kernel"), (KR, "_row_stats_kernel"),
                      (KG, "_apply_bitmask_kernel")):
        monkeypatch.setattr(mod, name, Spy(getattr(mod, name), name))
    B, V = 2, 300
    x = _logits(B, V, torch.float32)
    table = KC.param_table(B, x.device, {"min_p": torch.full((B,), 0.1)})
    keys = KC.key_words(*(torch.arange(B, dtype=torch.int64),) * 4)
    greedy = torch.zeros(B, dtype=torch.bool)
    K.run_chain(x, [KC.MIN_P], [None], table, keys=keys, draw_greedy=greedy)
    kernels.sample_tokens(x, greedy, keys)
    KD.row_uniforms(*(torch.arange(B, dtype=torch.int64),) * 4, 0)
    KR.row_stats(x)
    KG.apply_token_bitmask(x, torch.full((B, (V + 31) // 32), -1, dtype=torch.int32))
    monkeypatch.setattr(_common, "TILE", 128)
    monkeypatch.setattr(_common, "BLOCKED_ABOVE", 8)
    K.run_chain(x, [KC.MIN_P], [None], table)
    kernels.sample_tokens(x, greedy, keys)
    assert state["launched"] == ["_chain_kernel", "_draw_kernel", "_uniform_kernel", "_row_stats_kernel",
                                 "_apply_bitmask_kernel", "_blocked_chain_kernel", "_blocked_draw_kernel"]
    assert set(state["guarded"]) == {x.device}


def test_draw_kernel_rounding_past_the_total_takes_the_last_positive_token():
    """u just below 1 on rows whose mass ends early: never a removed token, never past V."""
    B, V = 6, 700
    g = torch.Generator().manual_seed(13)
    x = torch.randn(B, V, generator=g)
    x[:, 400:] = NINF
    x[1, :] = NINF
    x[1, 17] = 0.0
    x[2, 650] = 1.0
    u = torch.full((B,), 0.99999994)
    greedy = torch.zeros(B, dtype=torch.bool)
    got = kernels.draw_tokens(x, greedy, u)
    assert torch.equal(got, ref_draw(x, greedy, u))
    assert got[1] == 17 and got[2] == 650 and not torch.isneginf(x[torch.arange(B), got]).any()


@triton.jit
def _prefix_dips_on_zero_lanes(p):
    """A prefix sum with the GPU scan's hazard, exaggerated: on lanes with p = 0 it dips or
    steps (alternately) by 2 % instead of staying flat."""
    c = tl.cumsum(p, 0)
    lane = tl.arange(0, p.shape[0])
    return tl.where(p == 0, tl.where(lane % 2 == 0, c * 0.98, c * 1.02), c)


def _rows_with_zero_lanes(B, V, tile):
    """Rows with many p = 0 lanes: every third lane removed, whole tiles of ``tile`` lanes
    removed (tiles 1 and 3), one row with a single token left, one all -inf row."""
    g = torch.Generator().manual_seed(77)
    x = torch.randn(B, V, generator=g) * 2
    x[:, ::3] = NINF
    x[:, tile:2 * tile] = NINF
    x[:, 3 * tile:4 * tile] = NINF
    x[1] = NINF
    x[1, V - 2] = 0.5
    x[2] = NINF
    return x


def test_draw_never_picks_a_zero_probability_token_when_the_prefix_sum_is_not_monotone(monkeypatch):
    """On a GPU ``tl.cumsum`` adds in another order (per thread, then a tree), so the prefix can
    dip or step on a p = 0 lane; the draw selects only among lanes (and tiles) with p > 0.
    Emulated here with a prefix that moves on every p = 0 lane: the tokens are still exactly
    the reference's (the perturbation only touches lanes the draw ignores), never removed,
    never outside the row. The same perturbation makes the earlier rule (count of lanes with
    cdf <= target) return removed tokens, so the emulation does reach the hazard."""
    B, V = 64, 1000
    x = _rows_with_zero_lanes(B, V, _common.TILE if _common.use_blocked(V) else 128)
    greedy = torch.zeros(B, dtype=torch.bool)
    u = torch.rand(B, generator=torch.Generator().manual_seed(78))
    want = ref_draw(x, greedy, u)
    # the earlier rule on the perturbed prefix (numpy, float64): removed tokens for some rows
    p = torch.softmax(x.double(), -1).nan_to_num(0.0).cpu().numpy()
    c = np.cumsum(p, -1)
    lanes = np.arange(V)
    c = np.where(p == 0, np.where(lanes % 2 == 0, c * 0.98, c * 1.02), c)
    target = u.double().cpu().numpy()[:, None] * c.max(-1, keepdims=True)
    old = np.minimum((c <= target).sum(-1), V - 1 - np.argmax((p > 0)[:, ::-1], -1))
    assert (p[np.arange(B), old] == 0).sum() > 5
    monkeypatch.setattr(KD, "prefix_sum", _prefix_dips_on_zero_lanes)
    got = kernels.draw_tokens(x, greedy, u)
    assert torch.equal(got, want)
    live = ~torch.isneginf(x).all(-1)
    assert ((got >= 0) & (got < V)).all() and not torch.isneginf(x[live][torch.arange(int(live.sum())), got[live]]).any()
    # the in-kernel uniforms (``sample_tokens``) and the draw fused into a chain, too
    words = torch.tensor([split_seed(s) for s in range(900, 900 + B)], dtype=torch.int64).t()
    keys = KC.key_words(words[0], words[1], torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64))
    want = ref_draw(x, greedy, ref_uniforms(words[0], words[1], torch.zeros(B, dtype=torch.int64),
                                            torch.zeros(B, dtype=torch.int64), 0))
    assert torch.equal(kernels.sample_tokens(x, greedy, keys)[0], want)
    table = KC.param_table(B, x.device, {"temperature": torch.full((B,), 1.0)})
    _, tokens, _ = K.run_chain(x, [KC.TEMPERATURE], [None], table, keys=keys, draw_greedy=greedy)
    assert torch.equal(tokens, want)


def test_available():
    assert kernels.available()  # TRITON_INTERPRET=1 (tests/conftest.py)
    assert kernels.available(torch.device("cpu"))


def test_xtc_coin_drawn_in_kernel_equals_the_torch_stream():
    """XTC_PHILOX draws the coin inside the chain kernel from (seed, step, sequence, PURPOSE_XTC):
    the same rows are hit as with the torch-drawn coin of ``samplers.sampling.row_uniforms``."""
    B, V = 24, 64
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, V, generator=g) * 4
    words = torch.tensor([split_seed(s) for s in range(1000, 1000 + B)], dtype=torch.int64).t()
    step = torch.arange(B, dtype=torch.int64) * 7
    seq = torch.arange(B, dtype=torch.int64) % 2
    coin = ref_uniforms(words[0], words[1], step, seq, 1)
    thr, prob = torch.full((B,), 0.02), torch.full((B,), 0.5)
    table = KC.param_table(B, x.device, {"xtc_threshold": thr, "xtc_probability": prob})
    got = K.run_chain(x, [KC.XTC_PHILOX], [None], table, keys=KC.key_words(words[0], words[1], step, seq))
    want = F.xtc(x, thr, prob, coin)
    _assert_same(got, want, torch.float32)
    hit = (coin < prob)
    assert 0 < int(hit.sum()) < B and not torch.equal(want[hit], x[hit])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_k_radix_select_edge_cases(dtype):
    """Heavy ties, negative and positive logits, -0.0, k beyond the finite tokens, k = V - 1."""
    g = torch.Generator().manual_seed(13)
    B, V = 6, 300
    x = torch.randint(-4, 5, (B, V), generator=g).float() * 0.75
    x[0] = 0.0                       # all tied
    x[1, ::2] = -0.0
    x[2, 10:] = NINF                 # 10 finite tokens
    x[3] = torch.randn(V, generator=g) * 1e-3 - 50.0  # close negative values
    x = x.to(dtype)
    k = torch.tensor([5, 7, 25, 150, V - 1, 1])
    _assert_same(ops.top_k(x, k), F.top_k(x, k), dtype)


@pytest.mark.parametrize("value,fragment", [
    (None, "got NoneType"),
    ("high", "got str"),
    (torch.full((3,), 0.5), "got (3,)"),
    (torch.full((2, 1), 0.5), "got (2, 1)"),
])
def test_kernel_ops_name_a_parameter_of_another_form(value, fragment):
    """(Before: None was taken, a number raised AttributeError and a wrong length
    RuntimeError, from inside the table of parameters.)"""
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="^min_p: expected a (number or a )?tensor of shape \\[2\\]") as err:
        ops.min_p(x, value)
    assert fragment in str(err.value)
    with pytest.raises(ValueError, match="^logits: expected"):
        ops.min_p(torch.ones(2, 64, dtype=torch.int64), torch.full((2,), 0.5))
    history = TokenHistory([[1, 2]] * 3, [[]] * 3, vocab_size=64)
    with pytest.raises(ValueError, match="no_repeat_ngram: history has 3 rows, the logits 2"):
        ops.no_repeat_ngram(x, history, torch.full((2,), 2))
    with pytest.raises(ValueError, match="penalties: seen_mask has shape \\(2, 63\\)"):
        ops.penalties(x, torch.zeros(2, 63, dtype=torch.bool), torch.zeros(2, 64, dtype=torch.int32), 1.2, 0.0, 0.0)


def _op_cases(rows: int = 2):
    """(name, call(f, *params), [(parameter index, good number, a value outside its interval)]):
    each kernel wrapper with its reference and the arguments of both, on ``rows`` (2 or 0) rows."""
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(5)) * 3
    history = TokenHistory([[1, 2, 3, 1, 2], [4, 4, 4]][:rows], [[3, 1], [4]][:rows], vocab_size=64)
    seen, counts = history.seen_mask(), history.output_counts()
    breakers = torch.tensor([0])
    return [
        ("top_k", lambda f, k: f(x, k), [(0, 5, None)]),
        ("top_p", lambda f, p: f(x, p), [(0, 0.9, 0.0)]),
        ("top_a", lambda f, a: f(x, a), [(0, 0.1, -0.5)]),
        ("min_p", lambda f, p: f(x, p), [(0, 0.05, 1.5)]),
        ("eta_cutoff", lambda f, e: f(x, e), [(0, 3e-4, 1.0)]),
        ("epsilon_cutoff", lambda f, e: f(x, e), [(0, 3e-4, -1e-3)]),
        ("typical_p", lambda f, p: f(x, p), [(0, 0.9, float("nan"))]),
        ("nsigma", lambda f, n: f(x, n), [(0, 1.5, -1.0)]),
        ("xtc", lambda f, t, p, c: f(x, t, p, c), [(0, 0.05, 2.0), (1, 1.0, -0.1), (2, 0.25, 1.5)]),
        ("tfs", lambda f, z: f(x, z), [(0, 0.9, 0.0)]),
        ("temperature", lambda f, t: f(x, t), [(0, 0.7, -0.7)]),
        ("dynamic_temperature", lambda f, lo, hi, e: f(x, lo, hi, e),
         [(0, 0.5, -0.5), (1, 1.5, float("inf")), (2, 1.0, 0.0)]),
        ("quadratic_smoothing", lambda f, a, c: f(x, a, c), [(0, 0.3, -0.3), (1, 1.0, 0.5)]),
        ("penalties", lambda f, r, fr, pr: f(x, seen, counts, r, fr, pr),
         [(0, 1.3, 0.0), (1, 0.5, 2.5), (2, -0.5, -3.0)]),
        ("no_repeat_ngram", lambda f, n: f(x, history, n), [(0, 2, -1)]),
        ("dry", lambda f, m, b, a, r: f(x, history, m, b, a, r, breakers),
         [(0, 0.8, -0.8), (1, 1.75, 1.0), (2, 2, 0), (3, 0, -1)]),
        ("skew", lambda f, k: f(x, k), [(0, 0.5, 100.0)]),
    ]


@pytest.mark.parametrize("name", [case[0] for case in _op_cases()])
def test_kernel_ops_and_references_take_an_empty_batch(name):
    """``[0, V]`` logits (an engine's step with no request of ours) give ``[0, V]``, with a
    number or a ``[0]`` tensor per parameter, as torch's own functions do."""
    _, call, params = next(case for case in _op_cases(rows=0) if case[0] == name)
    numbers = [good for _, good, _ in params]
    empty = [torch.empty(0, dtype=torch.int64 if isinstance(good, int) else torch.float32) for good in numbers]
    for f in (getattr(F, name), getattr(ops, name)):
        for args in (numbers, empty):
            got = call(f, *args)
            assert got.shape == (0, 64) and got.dtype == torch.float32


@pytest.mark.parametrize("name", [case[0] for case in _op_cases()])
def test_kernel_ops_take_the_references_arguments(name):
    """Each wrapper takes what its reference takes, with the same checks: a number stands for
    every row (the same result as the ``[B]`` tensor of it, and as the reference's within the
    kernels' tolerance), and a value outside the parameter's interval is the reference's
    ``ValueError``, word for word (before: taken unchecked, the kernel's result undefined)."""
    _, call, params = next(case for case in _op_cases() if case[0] == name)
    op, ref = getattr(ops, name), getattr(F, name)
    numbers = [good for _, good, _ in params]
    rows = [torch.full((2,), good, dtype=torch.int64 if isinstance(good, int) else torch.float32)
            for good in numbers]
    got = call(op, *numbers)
    assert torch.equal(got, call(op, *rows))
    _assert_same(got, call(ref, *numbers), torch.float32, exact=name != "dynamic_temperature")
    for i, _, bad in params:
        if bad is None:
            continue
        args = list(numbers)
        args[i] = bad
        with pytest.raises(ValueError) as expected:
            call(ref, *args)
        with pytest.raises(ValueError) as err:
            call(op, *args)
        assert str(err.value) == str(expected.value)
        assert " must be in " in str(err.value)
