"""SamplerPipeline("triton") against SamplerPipeline("torch"), and the foundation's pipeline
tests re-run on the triton backend (kernels under Triton's interpreter on the CPU)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

pytest.importorskip("triton")

import test_pipeline as tp  # noqa: E402  (tests/ is on sys.path: pytest's rootdir import mode)
from kernel_promise import moved_params  # noqa: E402
from logit_helpers import KERNEL_TOLERANCES  # noqa: E402

from samplers import SamplerID, SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402

import samplers.kernels as kernels  # noqa: E402
from samplers.kernels.chain import plan  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _compare(got, want, dtype):
    """Same removed set; values equal up to the per-dtype tolerance (dynatemp's entropy is
    summed in another order; everything else is exact under the interpreter)."""
    assert got.dtype == want.dtype == dtype
    gi, wi = torch.isneginf(got), torch.isneginf(want)
    assert torch.equal(gi, wi), f"removed sets differ at {(gi != wi).nonzero().tolist()[:10]}"
    rtol, atol = KERNEL_TOLERANCES[dtype]
    torch.testing.assert_close(got[~gi].float(), want[~wi].float(), rtol=rtol, atol=atol)


def _compare_within_promise(got, want, logits, params, batch_of, seed):
    """``_compare``, except that where the removed sets differ the kernels' kept set must lie
    between the torch backend's with the threshold parameters moved by ``THRESHOLD_RTOL`` both
    ways (``kernel_promise``: sums in another order may decide a token on a threshold the other
    way), and the values both keep are compared. ``batch_of(params)``: the batch of ``params``."""
    gi, wi = torch.isneginf(got), torch.isneginf(want)
    if not torch.equal(gi, wi):
        loose = SamplerPipeline("torch", seed=seed).process(logits, batch_of(moved_params(params, +1)))
        tight = SamplerPipeline("torch", seed=seed).process(logits, batch_of(moved_params(params, -1)))
        assert not (~gi & torch.isneginf(loose)).any(), "kept beyond the tolerance"
        assert not (gi & ~torch.isneginf(tight)).any(), "removed beyond the tolerance"
        both = ~gi & ~wi
        got, want = torch.where(both, got, float("-inf")), torch.where(both, want, float("-inf"))
    _compare(got, want, logits.dtype)


def test_moved_params_move_the_threshold_of_each_stage_a_row_runs():
    """XTC's threshold moves at its default value when XTC runs; top_p = 1 beside a top_k, a
    stage that does not run, and the other parameters stay; a value is held at its ceiling."""
    from samplers.kernels._common import THRESHOLD_RTOL

    p = SamplingParams(top_k=20, xtc_probability=0.5, min_p=1.0, nsigma=2.0, temperature=0.7)
    up, down = moved_params([p], +1)[0], moved_params([p], -1)[0]
    assert (up.xtc_threshold, down.xtc_threshold) == (0.1 * (1 + THRESHOLD_RTOL), 0.1 * (1 - THRESHOLD_RTOL))
    assert (up.nsigma, down.nsigma) == (2.0 * (1 + THRESHOLD_RTOL), 2.0 * (1 - THRESHOLD_RTOL))
    assert (up.min_p, down.min_p) == (1.0 - THRESHOLD_RTOL, 1.0)  # (min_p keeps more when smaller)
    for q in (up, down):
        assert (q.top_p, q.top_k, q.typical_p, q.top_a, q.temperature) == (1.0, 20, 1.0, 0.0, 0.7)
    assert moved_params([SamplingParams(xtc_threshold=0.3)], +1)[0].xtc_threshold == 0.3  # (XTC off)


def test_the_pipeline_promise_check_allows_only_a_flip_on_the_threshold():
    """On a row whose least likely kept token lies 0.6 ulp from top_p = 0.9 (see
    ``test_kernels.test_a_token_on_top_ps_threshold_may_fall_either_way``), removing that token
    is within the promise; removing the next one is not, nor is keeping one more."""
    import test_kernels as tk

    logits = tk._logits(4, 1000, torch.bfloat16, seed=38)[1:2]
    params = [SamplingParams(top_p=0.9)]

    def batch_of(ps):
        return SamplingBatch(ps, [[]], [[]], vocab_size=1000)

    want = SamplerPipeline("torch", seed=0).process(logits, batch_of(params))
    kept = (~torch.isneginf(want[0])).nonzero().flatten()
    by_p = kept[logits[0, kept].float().argsort()]  # kept tokens, least likely first
    removed = (torch.isneginf(want[0]) & torch.isfinite(logits[0])).nonzero().flatten()
    first_out = removed[logits[0, removed].float().argmax()]
    on_threshold, next_one = want.clone(), want.clone()
    on_threshold[0, by_p[0]] = float("-inf")
    _compare_within_promise(on_threshold, want, logits, params, batch_of, 0)
    next_one[0, by_p[:2]] = float("-inf")
    with pytest.raises(AssertionError, match="removed beyond the tolerance"):
        _compare_within_promise(next_one, want, logits, params, batch_of, 0)
    one_more = want.clone()
    one_more[0, first_out] = logits[0, first_out]
    with pytest.raises(AssertionError, match="kept beyond the tolerance"):
        _compare_within_promise(one_more, want, logits, params, batch_of, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backend_equals_torch_backend_on_the_presets(dtype):
    logits = tp._logits(len(tp.PRESETS), dtype=dtype, seed=21)
    logits[1, :7] = float("-inf")
    batch = tp._batch(tp.PRESETS, seed=21)
    before = logits.clone()
    want = SamplerPipeline("torch", seed=0).process(logits, batch)
    got = SamplerPipeline("triton", seed=0).process(logits, batch)
    assert torch.equal(logits, before)
    _compare(got, want, dtype)
    # rows whose parameters are all defaults are bit-identical
    assert torch.equal(got[0], logits[0])


def test_each_preset_alone_and_heterogeneous_priorities():
    S = SamplerID
    params = tp.PRESETS + [
        SamplingParams(temperature=3.0, min_p=0.5, sampler_priority=[2, 5], top_k=20, typical_p=0.8),
        SamplingParams(sampler_priority=[S.XTC, S.TOP_P_TOP_K, S.DRY], xtc_threshold=0.05, xtc_probability=1.0,
                       top_p=0.7, dry_multiplier=1.0, no_repeat_ngram_size=2, seed=11, tfs=0.8),
    ]
    logits = tp._logits(len(params), seed=22)
    batch = tp._batch(params, seed=22)
    assert any(m is not None for _, m in batch.schedule)
    want = SamplerPipeline("torch", seed=0).process(logits, batch)
    got = SamplerPipeline("triton", seed=0).process(logits, batch)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seeded_draw_gives_the_same_token_on_both_backends(dtype):
    """Same seed, same processed distribution -> same token, step after step (the batch's
    histories advance with the drawn tokens, so penalties / DRY / n-grams evolve too)."""
    params = [SamplingParams(seed=s, **kw) for s, kw in enumerate([
        dict(temperature=0.9, min_p=0.05), dict(top_k=20, top_p=0.9), dict(),
        dict(xtc_threshold=0.05, xtc_probability=0.7, repetition_penalty=1.2, dry_multiplier=0.8),
        dict(temperature=0.0, presence_penalty=0.5),
    ])] + [SamplingParams(**{**tp.EVERYTHING, "seed": 77})]
    prompts, outputs = tp._histories(len(params), seed=23)
    b_torch = SamplingBatch(params, prompts, outputs, vocab_size=tp.V)
    b_triton = SamplingBatch(params, prompts, outputs, vocab_size=tp.V)
    pt, pk = SamplerPipeline("torch", seed=1), SamplerPipeline("triton", seed=2)
    for step in range(4):
        logits = tp._logits(len(params), seed=100 + step, dtype=dtype)
        a = pt.sample(logits, b_torch)
        k = pk.sample(logits, b_triton)
        assert a.token_ids.tolist() == k.token_ids.tolist(), f"step {step}"
        torch.testing.assert_close(k.logprobs, a.logprobs, rtol=1e-4, atol=1e-4)
        b_torch.append(a.token_ids)
        b_triton.append(k.token_ids)


def test_fused_plan_for_the_default_chain():
    """The default chain fuses everything except DRY and tfs into as few launches as possible."""
    batch = tp._batch([SamplingParams(**tp.EVERYTHING)])
    kinds = [(k, [c for c, _ in s] if k == "fused" else s[0]) for k, s in plan(batch)]
    assert kinds[0] == ("torch", SamplerID.DRY)
    assert kinds[2] == ("torch", SamplerID.TFS)
    assert [k for k, _ in kinds] == ["torch", "fused", "torch", "fused"]
    batch = tp._batch([SamplingParams(top_k=50, top_p=0.9, min_p=0.05, temperature=0.8)])
    assert [k for k, _ in plan(batch)] == ["fused"]


# ---------------------------------------------------------------------------- foundation suite
class _TritonPipeline(SamplerPipeline):
    """SamplerPipeline forced onto the triton backend (what the foundation tests construct)."""

    def __init__(self, backend="auto", *args, **kwargs):
        super().__init__("triton" if backend in ("torch", "auto") else backend, *args, **kwargs)


@pytest.fixture
def on_triton(monkeypatch):
    monkeypatch.setattr(tp, "SamplerPipeline", _TritonPipeline)


FOUNDATION_TESTS = [
    "test_input_is_never_modified",
    "test_rows_are_independent_of_the_batch",
    "test_order_matters_temperature_vs_min_p",
    "test_rows_with_different_priorities_in_one_batch",
    "test_greedy_rows_take_the_argmax_of_processed_logits",
    "test_seeded_rows_reproduce_across_batch_composition_and_position",
    "test_seeded_rows_follow_their_own_step_counter",
    "test_logprobs_come_from_the_processed_distribution",
    "test_min_tokens_bans_eos_and_stop_ids_until_reached_and_logit_bias_applies_first",
    "test_append_matches_rebuilding_from_full_histories",
    "test_errors_are_clear",
]


@pytest.mark.parametrize("name", FOUNDATION_TESTS)
def test_foundation_pipeline_suite_on_triton(name, on_triton):
    getattr(tp, name)()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_foundation_identity_on_triton(dtype, on_triton):
    tp.test_default_params_are_the_identity(dtype)


@pytest.mark.parametrize("preset", [i for i, p in enumerate(tp.PRESETS)
                                    if (p.seed is not None or p.xtc_probability == 0)
                                    and not p.is_greedy and not p.dynatemp_enabled])
def test_foundation_hand_written_chain_on_triton(preset, on_triton):
    """Exact equality with the hand-written reference chain (no dynatemp in these presets)."""
    tp.test_pipeline_equals_the_hand_written_chain(preset)


def test_foundation_draw_frequencies_on_triton(on_triton):
    """The chi-square draw test of the foundation suite, with fewer draws (interpreter speed)."""
    Vs, draws = 12, 600
    base = torch.log(torch.tensor([0.3, 0.2, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04, 0.02, 0.015, 0.01, 0.005]))
    p = SamplingParams(temperature=0.8, min_p=0.05)
    pipe = tp.SamplerPipeline("triton", seed=5)
    tokens = pipe.sample(base.repeat(draws, 1), SamplingBatch([p] * draws, vocab_size=Vs)).token_ids
    import numpy as np

    counts = np.bincount(tokens.cpu().numpy(), minlength=Vs).astype(np.float64)
    probs = torch.softmax(pipe.process(base[None], SamplingBatch([p], vocab_size=Vs))[0].double(), -1).cpu().numpy()
    assert counts[probs == 0].sum() == 0
    assert tp._chi_square_p_value(counts, probs) > 1e-4


def test_auto_backend_and_availability():
    assert kernels.available()
    assert SamplerPipeline("auto").backend_for(torch.zeros(1, 4)) == "torch"
    assert SamplerPipeline("triton").backend_for(torch.zeros(1, 4)) == "triton"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(range(len(tp.PRESETS))), min_size=1, max_size=4),
       st.integers(0, 2**16), st.sampled_from(DTYPES), st.booleans())
def test_hypothesis_backends_agree_on_random_batches(rows, seed, dtype, ties):
    params = [tp.PRESETS[i] for i in rows]
    logits = tp._logits(len(params), seed=seed).float()
    if ties:
        logits = torch.round(logits)
    logits[:, seed % tp.V] = float("-inf")
    logits = logits.to(dtype)
    batch = tp._batch(params, seed=seed)
    want = SamplerPipeline("torch", seed=seed).process(logits, batch)
    got = SamplerPipeline("triton", seed=seed).process(logits, batch)
    _compare_within_promise(got, want, logits, params, lambda ps: tp._batch(ps, seed=seed), seed)
    assert torch.isfinite(got.float()).any(dim=-1).all()


@pytest.mark.slow
def test_larger_vocabulary_full_chain_and_draw():
    """V = 32000 (a real vocabulary): the full preset, top_k+top_p and min_p rows, bf16 logits."""
    Vb = 32000
    params = [SamplingParams(**tp.EVERYTHING), SamplingParams(top_k=50, top_p=0.9, seed=3),
              SamplingParams(min_p=0.05, temperature=0.7, seed=4)]
    g = torch.Generator().manual_seed(31)
    logits = (torch.randn(3, Vb, generator=g) * 4).to(torch.bfloat16)
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, size=200).tolist() for _ in range(3)]
    outputs = [rng.integers(0, 50, size=100).tolist() for _ in range(3)]
    batch = SamplingBatch(params, prompts, outputs, vocab_size=Vb)
    want = SamplerPipeline("torch", seed=0).process(logits, batch)
    got = SamplerPipeline("triton", seed=0).process(logits, batch)
    _compare(got, want, torch.bfloat16)
    a = SamplerPipeline("torch", seed=0).sample(logits, batch).token_ids
    k = SamplerPipeline("triton", seed=0).sample(logits, batch).token_ids
    assert a.tolist() == k.tolist()


def test_rows_emptied_by_bans_keep_their_input_argmax_on_both_backends():
    """no_repeat_ngram_size = 1 with every token in the history bans the whole row; min_tokens
    bans EOS; the torch path then keeps the input argmax; so must the triton path."""
    Vs = 6
    params = [SamplingParams(no_repeat_ngram_size=1, temperature=0.7, top_k=3),
              SamplingParams(min_tokens=3, stop_token_ids=[1, 2, 3, 4, 5], seed=1),
              SamplingParams(min_p=0.1)]
    prompts = [list(range(Vs)), [0], [1, 2]]
    outputs = [[], [], []]
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0, 1.0, 0.3]] * 3)
    batch = SamplingBatch(params, prompts, outputs, vocab_size=Vs, eos_token_ids=[0])
    want = SamplerPipeline("torch", seed=0).process(logits, batch)
    got = SamplerPipeline("triton", seed=0).process(logits, batch)
    _compare(got, want, torch.float32)
    assert torch.isfinite(got).any(dim=-1).all()
    t_want = SamplerPipeline("torch", seed=0).sample(logits, batch).token_ids
    t_got = SamplerPipeline("triton", seed=0).sample(logits, batch).token_ids
    assert t_want[:2].tolist() == t_got[:2].tolist() == [1, 1]


def test_auto_uses_the_kernels_for_large_vocabularies(monkeypatch):
    """Rows above 65536 lanes run the column-blocked kernels (tests/test_kernels_blocked.py),
    so "auto" keeps the kernel path for real large vocabularies (Llama 3, Qwen 2)."""
    import samplers.kernels as kernels
    from samplers.kernels import _common
    from samplers import SamplerPipeline

    class FakeCudaLogits:
        is_cuda = True
        device = "cuda:0"

        def __init__(self, vocab):
            self.shape = (1, vocab)

    monkeypatch.setattr(kernels, "available", lambda device=None: True)
    pipe = SamplerPipeline("auto")
    for vocab in (32000, 65536, 128256, 151936, 262144):
        assert pipe.backend_for(FakeCudaLogits(vocab)) == "triton"
    assert not _common.use_blocked(32000) and _common.use_blocked(128256) and _common.use_blocked(151936)


# ---------------------------------------------------------------------------- device syncs
_SYNCS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")


def _under_a_cpu_branch(filename: str, lineno: int) -> bool:
    """Whether the line is reached only for CPU tensors: inside an enclosing
    ``if ... .type == "cpu"``, or after an ``if ... .type != "cpu": return`` earlier in its
    function. Such a read costs nothing and CUDA never takes it."""
    import linecache

    line = linecache.getline(filename, lineno)
    indent = len(line) - len(line.lstrip())
    call_indent = indent
    for n in range(lineno - 1, max(lineno - 80, 0), -1):
        text = linecache.getline(filename, n)
        if not text.strip():
            continue
        ind = len(text) - len(text.lstrip())
        stripped = text.lstrip()
        if stripped.startswith("def "):
            break
        if stripped.startswith("if ") and '.type != "cpu"' in text and ind <= call_indent:
            nxt = next(linecache.getline(filename, k) for k in range(n + 1, lineno) if linecache.getline(filename, k).strip())
            if nxt.lstrip().startswith("return"):
                return True
        if ind < indent:
            if stripped.startswith("if ") and '.type == "cpu"' in text:
                return True
            indent = ind
            if ind == 0:
                break
    return False


def _count_syncs(monkeypatch, calls):
    """Record the Tensor methods that read a device value on the host (a device sync on CUDA)
    when ``samplers`` code calls them outside its CPU-only branches (the interpreter's own
    calls are not the library's)."""
    import sys

    for name in _SYNCS:
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            f = sys._getframe(1)
            where = f.f_code.co_filename.replace("\\", "/")
            if "/samplers/" in where and not _under_a_cpu_branch(f.f_code.co_filename, f.f_lineno):
                calls.append(f"{_name} <- {'/'.join(where.rsplit('/', 2)[-2:])}:{f.f_lineno}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)


@pytest.mark.parametrize("which", ["everything", "top_k_top_p"])
def test_steady_state_sample_steps_read_nothing_back_from_the_device(monkeypatch, which):
    """After a warm-up step (first use of the histories' match lengths and hashes), a
    ``SamplerPipeline("triton").sample`` step calls no ``.item()`` / ``.tolist()`` /
    ``nonzero`` / ``bool(tensor)`` ...: nothing that would wait for the GPU, so a step can be
    captured in a CUDA graph. Seeded rows (an unseeded row's fresh key is drawn on the host,
    see the report of issue 13). CUDA-only branches are taken where they exist: DRY's
    candidate selection runs its dense form (``sync_free``, what CUDA tensors get). Every
    in-kernel stage, DRY, no_repeat_ngram, penalties, logit_bias and the draw."""
    import samplers.kernels.chain as KCH

    dry = KCH.dry_
    monkeypatch.setattr(KCH, "dry_", lambda *a, **k: dry(*a, **{**k, "sync_free": True}))
    # tfs and skew run the torch reference between launches (functional/, with CPU-only fast
    # paths that read values back, and skew's top-token ``nonzero`` on every device)
    everything = {k: v for k, v in tp.EVERYTHING.items() if k not in ("tfs", "skew")}
    kw = everything if which == "everything" else dict(top_k=20, top_p=0.9, seed=3)
    params = [SamplingParams(**{**kw, "seed": 100 + i}) for i in range(3)] + [SamplingParams(seed=9)]
    prompts, outputs = tp._histories(len(params), seed=5)
    batch = SamplingBatch(params, prompts, outputs, vocab_size=tp.V)
    pipe = SamplerPipeline("triton", seed=0)
    out = pipe.sample(tp._logits(len(params), seed=40), batch)
    batch.append(out.token_ids)
    calls: list[str] = []
    _count_syncs(monkeypatch, calls)
    for step in range(3):
        out = pipe.sample(tp._logits(len(params), seed=41 + step), batch)
        batch.append(out.token_ids)
    assert calls == [], calls
    # the spy does see such calls (the test can fail): skew's reads on the CPU (its numpy
    # route's checks; the torch route's top-token ``nonzero``)
    import samplers.functional as F

    F.skew(tp._logits(2), torch.full((2,), 0.1))
    assert any(c.split(":")[0] in ("nonzero <- functional/skew.py", "__bool__ <- functional/skew.py")
               for c in calls), calls


@pytest.mark.parametrize("neighbour", [dict(logprobs=3), dict(logprobs_mode="raw", logprobs=0), dict(skew=0.5)])
def test_a_rows_log_probability_does_not_depend_on_what_the_other_rows_ask(neighbour):
    """The kernel backend draws with the chosen token's log-probability; when another row asked
    for alternatives (or raw values) the batch's log-probabilities were all read off the
    processed rows' log_softmax instead, which can differ by an ulp: a row alone and the same
    row beside such a request then disagreed (found by tests/fuzz.py --backend triton). A
    skewed neighbour moves the draw out of the chain's last launch: the same values too on
    whole rows (and on the blocked layout: test_kernels_blocked)."""
    check_a_rows_draw_alone_and_beside(neighbour)


def test_the_separate_draw_takes_the_chains_layout(monkeypatch):
    """On a GPU the whole-row limit (8192 lanes, ``_common.whole_row_limit``) is below
    ``BLOCKED_ABOVE``: a 32000-token row runs the blocked chain. The separate draw (which a
    skewed neighbour moves every row to) drew such a row as a whole row, the chain's launch
    from its list or tiles: the same row alone and beside the neighbour differed. Here the
    GPU's rule is imitated with a limit of 256 lanes under the interpreter."""
    from samplers.kernels import _common

    monkeypatch.setattr(_common, "whole_row_limit", lambda device: 256)
    monkeypatch.setattr(_common, "TILE", 128)
    assert _common.pick_layout(torch.empty(1, 300)) == "blocked" and not _common.use_blocked(300)
    check_a_rows_draw_alone_and_beside(dict(skew=0.5))


def test_a_whole_row_chain_that_does_not_load_keeps_the_draw_rule(monkeypatch, whole_row_chain_does_not_load):
    """A device that cannot load some stage tuple's whole-row chain (too many registers or too
    much shared memory: ``OutOfResources`` at load) gets the column-blocked chain for it. That
    chain drew the row itself with the blocked rule, while ``sample_tokens`` (every row's draw
    beside a skewed row) follows ``pick_layout``, whole rows here: the same row alone and beside
    the neighbour differed. Here every whole-row chain fails to load."""
    from samplers.kernels import _common, fused

    monkeypatch.setattr(_common, "TILE", 128)
    assert _common.pick_layout(torch.empty(1, 300)) == "whole"
    check_a_rows_draw_alone_and_beside(dict(skew=0.5))
    assert fused._OUT_OF_RESOURCES  # (the fallback did run)


def check_a_rows_draw_alone_and_beside(neighbour: dict, V: int = 300, device: Optional[str] = None, steps: int = 12,
                                        require_differences: bool = True) -> None:
    """Three seeded rows alone and beside a row of ``neighbour``'s request: the same token and
    log-probability, bit for bit (and the kernel's log-probability differs from the table's at
    times, so that the check can fail). The rows: one that min_p truncates, one that top_k
    truncates, and one that no stage truncates but has 12 finite entries only (a grammar's
    mask): on the blocked layout a row with few finite entries is drawn from their list.
    ``device``: where the rows and batches go (None: torch's default device, which
    ``SAMPLERS_TEST_DEVICE`` sets). ``require_differences``: also assert that the check could
    fail (see the last line)."""
    g = torch.Generator().manual_seed(5)
    rows = [dict(seed=11, min_p=0.02, temperature=0.8), dict(seed=12, top_k=40), dict(seed=13, temperature=0.7)]
    n = len(rows)
    pipe = SamplerPipeline("triton", seed=0)
    differed = 0
    for _ in range(steps):
        x = torch.randn(n + 1, V, generator=g) * 3
        x[2, torch.randperm(V, generator=g)[12:]] = float("-inf")
        x = x if device is None else x.to(device)  # (None: torch's default device, as the tests' tensors)
        batch = SamplingBatch([SamplingParams(**kw) for kw in rows] + [SamplingParams(seed=14, **neighbour)],
                              [[1, 2]] * (n + 1), None, vocab_size=V, device=device)
        both = pipe.sample(x, batch, return_processed=True)
        for r, kw in enumerate(rows):
            alone = pipe.sample(x[r:r + 1], SamplingBatch([SamplingParams(**kw)], [[1, 2]], None, vocab_size=V,
                                                          device=device))
            assert int(alone.token_ids[0]) == int(both.token_ids[r])
            assert alone.logprobs[0].view(torch.int32) == both.logprobs[r].view(torch.int32), (r, kw)
        table = torch.log_softmax(both.processed.float(), dim=-1).gather(1, both.token_ids[:, None]).squeeze(1)
        if neighbour.get("logprobs"):  # a row that asks for alternatives: the value its list shows
            ids, values = both.top_logprobs
            assert both.logprobs[n] == table[n]
            assert values[n][ids[n] == both.token_ids[n]].tolist() in ([], [table[n].item()])
        # (the kernel's value and the table's do differ at times: without the fix this test fails)
        differed += int((table[:n] != both.logprobs[:n]).any())
    assert differed > 0 or not require_differences
