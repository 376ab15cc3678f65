"""The column-blocked kernels (``samplers.kernels.blocked``) against the torch reference.

The blocked path is what rows of more than ``_common.BLOCKED_ABOVE`` lanes use (large
vocabularies). Here the threshold is lowered so that every row takes it, with small tiles
so that each row spans several tiles and the last one is partial (V = 1000 and 333 with
tiles of 128; the pipeline's V = 64 with tiles of 16). The kernel suite of
``test_kernels.py`` and the pipeline suite of ``test_kernels_pipeline.py`` are re-run as
they are, plus blocked-specific cases (compaction, all -inf rows, larger V).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import samplers.functional as F  # noqa: E402
from samplers import SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402

import samplers.kernels as kernels  # noqa: E402
from samplers.kernels import _common, blocked as KB, codes as KC, draw as KD, fused as K, ops  # noqa: E402
from samplers.sampling import row_uniforms as ref_uniforms, split_seed  # noqa: E402

import test_kernels as tk  # noqa: E402
import test_kernels_pipeline as tkp  # noqa: E402
import test_pipeline as tp  # noqa: E402
from test_kernels import (  # noqa: E402,F401  (re-run on the blocked path)
    test_chain_with_the_draw_fused_equals_chain_then_draw,
    test_draw_kernel_hand_computed_and_edge_cases,
    test_draw_kernel_matches_reference_on_random_rows,
    test_draw_kernel_rounding_past_the_total_takes_the_last_positive_token,
    test_draw_never_picks_a_zero_probability_token_when_the_prefix_sum_is_not_monotone,
    test_dynamic_temperature_and_smoothing,
    test_dynamic_temperature_of_a_peaked_row,
    test_fused_chain_equals_the_sequential_reference_with_row_masks,
    test_penalties_and_no_repeat_ngram,
    test_random_chains_equal_the_reference_functions_in_sequence,
    test_sample_tokens_draws_from_the_torch_stream_and_returns_the_logprobs,
    test_a_token_on_top_ps_threshold_may_fall_either_way,
    test_single_param_kernels_match_reference,
    test_top_k_and_top_p_ties_at_the_boundary_are_all_kept,
    test_top_k_radix_select_edge_cases,
    test_prop_typical_kernel_equals_the_sorted_definition,
    test_typical_published_cases_on_the_kernels,
    test_typical_removes_the_top_token_on_larger_rows,
    test_xtc_coin_drawn_in_kernel_equals_the_torch_stream,
    test_xtc_kernel,
    test_xtc_kernel_keeps_every_tied_least_likely_member_of_c,
)
from test_kernels_pipeline import (  # noqa: E402,F401
    check_a_rows_draw_alone_and_beside,
    on_triton,
    test_each_preset_alone_and_heterogeneous_priorities,
    test_foundation_hand_written_chain_on_triton,
    test_foundation_pipeline_suite_on_triton,
    test_rows_emptied_by_bans_keep_their_input_argmax_on_both_backends,
    test_triton_backend_equals_torch_backend_on_the_presets,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NINF = float("-inf")


@pytest.fixture(autouse=True)
def blocked(monkeypatch, request):
    """Every row on the blocked path; tiles of 128 lanes (16 for the pipeline's V = 64)."""
    fn = getattr(request.node, "function", None)
    small = fn is not None and fn.__module__ == "test_kernels_pipeline"
    monkeypatch.setattr(_common, "BLOCKED_ABOVE", 8)
    monkeypatch.setattr(_common, "TILE", 16 if small else 128)
    calls = {"chain": 0, "draw": 0}
    chain, draw = KB._blocked_chain_kernel, KD._blocked_draw_kernel

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            calls[self.name] += 1
            return self.kernel[grid]

    monkeypatch.setattr(KB, "_blocked_chain_kernel", Spy(chain, "chain"))
    monkeypatch.setattr(KD, "_blocked_draw_kernel", Spy(draw, "draw"))
    yield calls
    if fn is not None and not fn.__name__.startswith(("test_foundation", "test_threshold")):  # some launch nothing
        assert calls["chain"] + calls["draw"] > 0, "the blocked kernels were not used"


def test_threshold_is_a_module_constant():
    assert _common.use_blocked(1000) and _common.use_blocked(16)


def test_threshold_default(monkeypatch):
    monkeypatch.setattr(_common, "BLOCKED_ABOVE", 65536)
    assert not _common.use_blocked(65536) and _common.use_blocked(65537) and _common.use_blocked(151936)
    # the blocked path has no row limit (the whole-row block stops at 2**20)
    assert _common.use_blocked(2**21)


@pytest.mark.parametrize("tiles_per_step", [1, 2])
def test_blocked_draw_finds_the_target_tile_across_scan_steps(monkeypatch, tiles_per_step):
    """The target tile is searched NTB tile sums at a time (the carry between steps): with 1
    or 2 per step, V = 1000 in 8 tiles gives the reference tokens, the rounding fallback too."""
    monkeypatch.setattr(KD, "_TILES_PER_STEP", tiles_per_step)
    tk.test_draw_kernel_matches_reference_on_random_rows(torch.float32)
    tk.test_draw_kernel_rounding_past_the_total_takes_the_last_positive_token()
    tk.test_sample_tokens_draws_from_the_torch_stream_and_returns_the_logprobs(torch.float32)


def test_seeded_multi_step_draw_gives_the_same_tokens_on_both_backends():
    tkp.test_seeded_draw_gives_the_same_token_on_both_backends(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compacted_searches_after_top_k_and_all_neginf_rows(dtype):
    """top_p / typical_p after top_k (few survivors: the compacted [KMAX] search), a row with a
    single finite token, a row entirely -inf, a tied row; V not a multiple of the tile."""
    B, V = 5, 700
    x = tk._logits(B, V, dtype, seed=40).float()
    x[3] = NINF
    x[3, 650] = 2.0
    x[4] = NINF
    x = x.to(dtype)
    prm = {"top_k": torch.tensor([30, 60, 10, 5, 5]), "top_p": torch.tensor([0.8, 0.95, 0.5, 0.5, 0.5]),
           "typical_p": torch.tensor([0.9, 0.5, 1.0, 0.7, 0.7]), "min_p": torch.tensor([0.0, 0.01, 0.0, 0.1, 0.1])}
    codes = [KC.TOP_K, KC.TOP_P, KC.MIN_P, KC.TYPICAL]
    got = K.run_chain(x, codes, [None] * 4, KC.param_table(B, x.device, prm))
    ref = F.typical_p(F.min_p(F.top_p(F.top_k(x.float(), prm["top_k"]), prm["top_p"]), prm["min_p"]),
                      prm["typical_p"])
    tk._assert_same(got, ref, torch.float32)
    assert torch.isneginf(got[4]).all()
    for fn, p in ((ops.top_p, 0.9), (ops.typical_p, 0.9), (ops.nsigma, 1.0)):
        prm1 = torch.full((B,), p)
        tk._assert_same(fn(x, prm1), getattr(F, fn.__name__)(x, prm1), dtype)


@pytest.mark.slow
def test_larger_vocabulary_on_the_blocked_path(monkeypatch):
    """V = 32001 in tiles of 4096 (8 tiles, the last one partial): single stages, the full
    preset through the pipeline, and the draw."""
    monkeypatch.setattr(_common, "TILE", 4096)
    B, V = 2, 32001
    x = tk._logits(B, V, torch.float16, seed=9)
    for kernel, ref, prm in [
        (ops.top_k, F.top_k, torch.tensor([50, 1000])),
        (ops.top_p, F.top_p, torch.tensor([0.9, 0.3])),
        (ops.typical_p, F.typical_p, torch.tensor([0.9, 0.5])),
    ]:
        tk._assert_same(kernel(x, prm), ref(x, prm), torch.float16)
    params = [SamplingParams(**tp.EVERYTHING), SamplingParams(top_k=50, top_p=0.9, seed=3)]
    logits = (torch.randn(2, V, generator=torch.Generator().manual_seed(31)) * 4).to(torch.bfloat16)
    batch = SamplingBatch(params, [[1, 2, 3, 4] * 20, [5, 6] * 10], [[7, 8] * 10, []], vocab_size=V)
    want = SamplerPipeline("torch", seed=0).process(logits, batch)
    got = SamplerPipeline("triton", seed=0).process(logits, batch)
    tkp._compare(got, want, torch.bfloat16)
    a = SamplerPipeline("torch", seed=0).sample(logits, batch).token_ids
    k = SamplerPipeline("triton", seed=0).sample(logits, batch).token_ids
    assert a.tolist() == k.tolist()


def _passes(fn, row_bytes):
    """(reads, writes) of ``fn()`` in units of one fp32 row, measured by counting the kernels'
    loads and stores under the interpreter (benchmarks/traffic.py)."""
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from traffic import counting

    with counting() as t:
        out = fn()
    return out, t.read / row_bytes, t.written / row_bytes


@pytest.mark.parametrize("first", [True, False], ids=["first", "after_temperature"])
@pytest.mark.parametrize("case", ["peaked", "flat", "ties", "large_k"])
def test_top_k_window_prefilter_and_its_fallback(case, first):
    """top_k on the blocked path: the k largest are found in a window below the max and, when
    at most KMAX tokens lie in it, selected in registers from a compacted copy, the row then
    being sparse; a crowded window falls back to the 4 radix passes and a keep pass. As the
    first stage its window histogram is taken by the statistics pass (below the first tile's
    max + 16); after another stage by a pass of its own. Same removed sets as F.top_k."""
    V = 1000
    g = torch.Generator().manual_seed(50)
    x = torch.randn(1, V, generator=g) * {"peaked": 3.0, "flat": 0.01, "ties": 0.0, "large_k": 3.0}[case]
    k = 200 if case == "large_k" else 5
    prm = {"top_k": torch.full((1,), float(k)), "temperature": torch.full((1,), 1.0 if first else 0.5)}
    codes = [KC.TOP_K] if first else [KC.TEMPERATURE, KC.TOP_K]
    table = KC.param_table(1, x.device, prm)
    got, reads, writes = _passes(lambda: K.run_chain(x, codes, [None] * len(codes), table), V * 4)
    want = F.top_k(x if first else F.temperature(x, prm["temperature"]), torch.full((1,), k))
    tk._assert_same(got, want, torch.float32)
    compacted = case == "peaked"
    # statistics (with the window histogram when first) [+ temperature's pass], then
    # [the window histogram +] compaction, or: the window histogram, 4 radix passes, keep
    base = 1 if first else 2
    expected = base + (1 if first else 2) if compacted else base + 1 + 4 + 1
    assert reads == pytest.approx(expected, abs=0.2), reads
    assert writes == pytest.approx(1 if first else 2, abs=0.1)


@pytest.mark.parametrize("case", ["peaked", "flat", "no_bound"])
def test_top_p_mass_bound_prefilter_and_its_fallback(case):
    """top_p alone on many tokens: a histogram pass finds the lowest edge with at most KMAX
    tokens above it; when their mass reaches top_p the search runs on them in registers
    (histogram + compaction + keep after the statistics pass), otherwise (a flat row) it
    bisects over the row. Same removed sets as F.top_p."""
    V = 1000
    g = torch.Generator().manual_seed(51)
    scale, tp = {"peaked": (4.0, 0.9), "flat": (0.05, 0.9), "no_bound": (0.05, 0.999)}[case]
    x = torch.randn(1, V, generator=g) * scale
    table = KC.param_table(1, x.device, {"top_p": torch.full((1,), tp)})
    got, reads, writes = _passes(lambda: K.run_chain(x, [KC.TOP_P], [None], table), V * 4)
    tk._assert_same(got, F.top_p(x, torch.full((1,), tp)), torch.float32)
    if case == "peaked":
        assert reads == pytest.approx(4, abs=0.2), reads  # stats, histogram, compaction, keep
    else:
        # stats, histogram, compaction, keep, and the row search: 16 thresholds per pass
        # narrow the ~2**30 candidate bits of p by 17 a pass (8 passes; 30 halvings before)
        assert 4 + 6 <= reads <= 4 + 8.2, reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_mode_runs_the_rest_of_the_chain_in_registers(dtype):
    """After a truncation leaves at most KMAX tokens, the later stages (top_p, temperature,
    penalties gathered at the survivors' ids, min_p, typical, XTC) and the draw run on the
    survivors in registers: the chain reads the row twice (statistics with top_k's window
    histogram, its compaction) and writes it once, whatever follows. Same
    result as the reference functions in sequence, same tokens as drawing afterwards."""
    B, V = 4, 1000
    x = tk._logits(B, V, dtype, seed=52)
    g = torch.Generator().manual_seed(53)
    counts = torch.randint(0, 3, (B, V), generator=g, dtype=torch.int32)
    seen = counts > 0
    prm = {"top_k": torch.full((B,), 12.0), "top_p": torch.full((B,), 0.95), "temperature": torch.full((B,), 0.7),
           "repetition_penalty": torch.full((B,), 1.3), "frequency_penalty": torch.full((B,), 0.1),
           "presence_penalty": torch.zeros(B), "min_p": torch.full((B,), 0.02), "typical_p": torch.full((B,), 0.9),
           "xtc_threshold": torch.full((B,), 0.05), "xtc_probability": torch.full((B,), 0.5)}
    table = KC.param_table(B, x.device, prm)
    words = torch.tensor([split_seed(s) for s in range(900, 900 + B)], dtype=torch.int64).t()
    keys = KC.key_words(words[0], words[1], torch.arange(B) * 3, torch.zeros(B, dtype=torch.int64))
    codes = [KC.TOP_K, KC.TOP_P, KC.TEMPERATURE, KC.PENALTIES, KC.MIN_P, KC.TYPICAL, KC.XTC_PHILOX]
    greedy = torch.tensor([True, False, False, False])

    def run():
        return K.run_chain(x, codes, [None] * len(codes), table, seen=seen, counts=counts, keys=keys,
                           draw_greedy=greedy)

    (out, tokens, logprobs), reads, writes = _passes(run, V * 4 * B)
    # + each sparse stage's round trip of the survivors through the scratch row (here KMAX =
    # 32 values and ids, ~0.04 of a 1000-token row per stage; ~0.02 at KMAX 1024, V = 128256)
    in_bytes = x.element_size() / 4
    assert 2 * in_bytes < reads < 2 * in_bytes + 0.3, reads  # the 2 passes read the input itself
    assert 1 < writes < 1.2, writes
    want = F.top_p(F.top_k(x.float(), torch.full((B,), 12)), prm["top_p"])
    want = F.temperature(want, prm["temperature"])
    want = F.penalties(want, seen, counts, prm["repetition_penalty"], prm["frequency_penalty"],
                       prm["presence_penalty"])
    want = F.typical_p(F.min_p(want, prm["min_p"]), prm["typical_p"])
    coin = ref_uniforms(words[0], words[1], torch.arange(B) * 3, torch.zeros(B, dtype=torch.int64), 1)
    want = F.xtc(want, prm["xtc_threshold"], prm["xtc_probability"], coin)
    tk._assert_same(out, want, torch.float32, exact=False)
    want_t, want_lp = kernels.sample_tokens(out, greedy, keys)
    assert torch.equal(tokens, want_t)
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["peaked", "flat"])
def test_min_p_first_is_decided_in_the_statistics_pass(case):
    """A chain that starts with min_p collects its candidates (x >= running max + log min_p)
    while it reads the row for its statistics: with at most KMAX of them the row is sparse
    after that one read, and with the draw and store=False nothing is written at all. A flat
    row (too many candidates) takes the tile stage. Same result and tokens either way."""
    B, V = 3, 1000
    g = torch.Generator().manual_seed(54)
    x = torch.randn(B, V, generator=g) * (4.0 if case == "peaked" else 0.01)
    mp = torch.tensor([0.1, 0.0, 0.3])  # row 1: min_p disabled
    table = KC.param_table(B, x.device, {"min_p": mp, "temperature": torch.full((B,), 0.8)})
    words = torch.tensor([split_seed(s) for s in range(300, 300 + B)], dtype=torch.int64).t()
    keys = KC.key_words(words[0], words[1], torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64))
    greedy = torch.tensor([False, False, True])
    codes = [KC.MIN_P, KC.TEMPERATURE]
    want = F.temperature(F.min_p(x, mp), torch.full((B,), 0.8))
    (out, tokens, logprobs), reads, writes = _passes(
        lambda: K.run_chain(x, codes, [None, None], table, keys=keys, draw_greedy=greedy), V * 4)
    tk._assert_same(out, want, torch.float32)
    want_t, want_lp = kernels.sample_tokens(out, greedy, keys)
    assert torch.equal(tokens, want_t)
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5)
    (_, tokens2, _), reads2, writes2 = _passes(
        lambda: K.run_chain(x, codes, [None, None], table, keys=keys, draw_greedy=greedy, store=False), V * 4)
    assert torch.equal(tokens2, want_t)
    if case == "peaked":
        # rows 0, 2: one read; row 1 (min_p off): statistics, temperature pass, draw
        assert reads2 == pytest.approx(2 + 2 + 1 / 8, abs=0.2), reads2  # (+ scratch)
        assert writes2 == pytest.approx(1, abs=0.2), writes2  # (+ scratch: min_p's candidates, the draw's list)
        assert writes == pytest.approx(3, abs=0.2), writes  # (+ the same scratch)
    else:
        assert reads2 > 5, reads2


@pytest.mark.parametrize("case", ["peaked", "flat", "top_removed_compacted", "top_removed_bisected"])
def test_typical_p_histogram_prefilter_and_its_fallback(case):
    """typical_p alone on many tokens: a histogram of d = |-log p - H| finds the largest bound
    with at most KMAX tokens below it; when their mass reaches typical_p the search runs on
    them in registers (histogram + compaction + keep after the statistics pass), otherwise it
    bisects over the row. Same removed sets as F.typical_p. The top_removed cases are rows B
    and A of ``tk.typical_top_removed_rows``: the top token lies beyond the bound (B) or the
    row bisection removes it (A); it is not added back on either branch."""
    V = 1000
    if case.startswith("top_removed"):
        row = 1 if case == "top_removed_compacted" else 0
        x = tk.typical_top_removed_rows(V)[row:row + 1]
        tp = torch.full((1,), 0.5)
    else:
        g = torch.Generator().manual_seed(55)
        x = torch.randn(1, V, generator=g) * (5.0 if case == "peaked" else 0.05)
        tp = torch.full((1,), 0.9)
    table = KC.param_table(1, x.device, {"typical_p": tp})
    got, reads, writes = _passes(lambda: K.run_chain(x, [KC.TYPICAL], [None], table), V * 4)
    tk._assert_same(got, F.typical_p(x, tp), torch.float32)
    if case.startswith("top_removed"):
        assert tk.tt.kept(got) == [tk.TYPICAL_TOP_REMOVED_KEPT[row]]
    if case in ("peaked", "top_removed_compacted"):
        assert reads == pytest.approx(4, abs=0.2), reads
    else:
        assert reads > 8, reads


def test_typical_p_in_the_sparse_mode_removes_the_top_token():
    """After top_k leaves at most KMAX tokens, typical_p runs on the survivors in registers
    (the whole-row stage, ``stage.stage``): the chain reads the row twice, and the top token
    goes as in F.typical_p (row C of ``tk.typical_top_removed_rows``)."""
    V = 1000
    x = tk.typical_top_removed_rows(V)[2:3]
    tp = torch.full((1,), 0.5)
    table = KC.param_table(1, x.device, {"top_k": torch.full((1,), 31.0), "typical_p": tp})
    got, reads, writes = _passes(lambda: K.run_chain(x, [KC.TOP_K, KC.TYPICAL], [None, None], table), V * 4)
    assert 2 < reads < 2.3, reads  # statistics with top_k's window, its compaction (+ scratch)
    tk._assert_same(got, F.typical_p(F.top_k(x, torch.full((1,), 31)), tp), torch.float32)
    assert tk.tt.kept(got) == [list(range(1, 31))]


@pytest.mark.parametrize("neighbour", [dict(logprobs=3), dict(logprobs_mode="raw", logprobs=0)])
def test_a_rows_log_probability_does_not_depend_on_what_the_other_rows_ask(neighbour):
    check_a_rows_draw_alone_and_beside(neighbour)


@pytest.mark.parametrize("neighbour", [dict(skew=0.5), dict(dry_multiplier=0.8)])
def test_a_rows_draw_does_not_depend_on_whether_the_chain_draws_it(neighbour):
    """A neighbour with skew or DRY moves every row's draw out of the chain's launch to
    ``sample_tokens``: both draw a row with at most KMAX finite entries from the same list
    (``draw.draw_listed``), the others from the tiles (failed when the launch drew a sparse
    row from its survivors and the separate draw from the tiles)."""
    check_a_rows_draw_alone_and_beside(neighbour)
