"""The differential fuzzer (tests/fuzz.py) on a fixed set of cases, and checks that it can fail."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fuzz
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers import pipeline as pipeline_module
from samplers.priority import SamplerID

CASES_PER_TEST = 25


@pytest.mark.parametrize("first", range(0, 6 * CASES_PER_TEST, CASES_PER_TEST))
def test_small_cases(first):
    for seed in range(first, first + CASES_PER_TEST):
        fuzz.run_checked(fuzz.draw_case(seed, "small"))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("threads", [1, 2])
def test_wide_cases(seed, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fuzz.run_checked(fuzz.draw_case(1000 + seed, "wide"))
    finally:
        torch.set_num_threads(before)


def test_tall_cases():
    """Batches of 32-72 rows sharing a few requests: per-row values computed as [B] vectors
    (their first rows in torch's vector lanes, a row alone in the scalar tail)."""
    for seed in range(2000, 2006):
        fuzz.run_checked(fuzz.draw_case(seed, "tall"))


@pytest.mark.parametrize("seed", [2, 3])  # (two that failed before dd85632; the interpreter is slow)
def test_small_cases_on_the_kernel_backend(seed):
    pytest.importorskip("triton")
    fuzz.run_checked(fuzz.draw_case(seed, "small"), "triton")  # (under the interpreter: conftest)


def test_a_small_case_on_the_blocked_kernel_layout():
    """Every row column-blocked, in tiles of 64 lanes (case 71, like 29, 33 and 39, failed
    before the chain's launch and the separate draw kernel drew a row by the same rule)."""
    pytest.importorskip("triton")
    fuzz.run_checked(fuzz.draw_case(71, "small"), "triton", "blocked")


def test_a_small_case_whose_dry_penalty_was_raised_by_the_scalar_pow_alone():
    """Case 23639 (found on an AMD EPYC): a DRY row with an 11 + 13-token history, alone,
    took its penalties from a table as wide as its history, all of it in the scalar tail of
    torch's pow loop; beside a longer history the table was wider and computed in vector lanes:
    an ulp apart (now ``_stats.pow_per_entry``)."""
    fuzz.run_checked(fuzz.draw_case(23639, "small"))


def test_a_case_is_drawn_from_its_seed_alone():
    a, b = fuzz.draw_case(7, "wide"), fuzz.draw_case(7, "wide")
    assert a.describe() == b.describe()
    assert torch.equal(fuzz.draw_logits(a.rng, 3, 50, torch.float32), fuzz.draw_logits(b.rng, 3, 50, torch.float32))
    assert a.describe() != fuzz.draw_case(8, "wide").describe()


def test_drawn_logits_keep_a_finite_entry_in_every_row():
    rng = np.random.default_rng(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for _ in range(50):
            x = fuzz.draw_logits(rng, 4, 7, dtype)
            assert x.dtype == dtype and torch.isfinite(x).any(dim=-1).all()


def _case(rows: int = 3, **request) -> fuzz.Case:
    """``rows`` rows of one request (``min_p=0.05`` unless given), each its own seed."""
    params = [SamplingParams(**(request or dict(min_p=0.05)), seed=r) for r in range(rows)]
    return fuzz.Case(seed=-1, mode="small", vocab=64, dtype=torch.float32, params=params,
                     prompts=[[1, 2]] * rows, outputs=[[]] * rows, eos=[], sequence_indices=[0] * rows,
                     steps=1, rng=np.random.default_rng(0))


def test_the_fuzzer_catches_a_row_that_depends_on_its_batch(monkeypatch):
    unit = pipeline_module.UNITS[SamplerID.MIN_P]
    monkeypatch.setitem(pipeline_module.UNITS, SamplerID.MIN_P,
                        lambda x, b, r: unit(x, b, r) + 1e-3 * x.shape[0])
    with pytest.raises(fuzz.FuzzFailure, match="alone"):
        fuzz.run_checked(_case())


#: A request with a dynamic temperature: the kernels may remove up to
#: ``fuzz.BOUNDARY_FLIPS_MAX`` other tokens at a threshold than the torch backend does.
_DYNATEMP = dict(top_k=10, dynatemp_min=0.5, dynatemp_max=1.5)


def _kernels_off_by(monkeypatch, fault: str, count: int = 1) -> None:
    """The kernel chain's rows made consistent (alone and in a batch alike) but not the
    reference's: kept values off by 0.1% (``values``), or the ``count`` least likely kept tokens
    of each row removed too, the top token always kept (``removed``)."""
    from samplers.kernels import chain

    run_chain = chain.run_chain

    def off(x: torch.Tensor) -> torch.Tensor:
        if fault == "values":
            return x * 1.001
        kept = torch.isfinite(x)
        least = torch.where(kept, x, torch.inf).argsort(-1)[:, :count]
        drop = torch.arange(least.shape[1]) < kept.sum(-1, keepdim=True) - 1
        return x.scatter(-1, least, torch.where(drop, float("-inf"), x.gather(-1, least)))

    def disagreeing(*args, **kwargs):
        out = run_chain(*args, **kwargs)
        return (off(out[0]), *out[1:]) if isinstance(out, tuple) else off(out)

    monkeypatch.setattr(chain, "run_chain", disagreeing)


@pytest.mark.parametrize("request_, fault, count, message", [
    (dict(top_k=10), "values", 1, "kept values differ"),
    (dict(top_k=10), "removed", 1, "removed tokens differ"),
    (_DYNATEMP, "values", 1, "kept values differ"),
    (_DYNATEMP, "removed", fuzz.BOUNDARY_FLIPS_MAX + 1, "removed tokens differ"),
], ids=["values", "removed", "dynatemp-values", "dynatemp-removed"])
def test_the_fuzzer_catches_kernels_that_disagree_with_the_torch_backend(monkeypatch, request_, fault, count,
                                                                        message):
    pytest.importorskip("triton")
    _kernels_off_by(monkeypatch, fault, count)
    with pytest.raises(fuzz.FuzzFailure, match=f"against the torch backend: row 0: {message}"):
        fuzz.run_checked(_case(**request_), "triton")


def test_the_fuzzer_lets_a_dynamic_temperature_move_a_token_across_a_threshold(monkeypatch):
    """The kernels' entropy is summed in another order: a row's temperature may differ in the
    last place, and a token on a threshold fall the other way: two such tokens (XTC's
    threshold moves two) pass, the draw then not compared, on those rows only."""
    pytest.importorskip("triton")
    _kernels_off_by(monkeypatch, "removed", 2)
    fuzz.run_checked(_case(**_DYNATEMP), "triton")


def test_the_fuzzer_lets_a_token_on_a_threshold_fall_the_other_way():
    """The kernels' sums add in another order: on seed 38's bf16 row (a token 0.6 ulp from
    top_p = 0.9) removing that token passes the comparison with the torch backend, the draw
    then not compared; removing the next one too, or keeping one more, fails."""
    import test_kernels as tk
    from kernel_promise import moved_params

    x = tk._logits(4, 1000, torch.bfloat16, seed=38)[1:2]
    params = [SamplingParams(top_p=0.9, seed=1)]
    pipe = SamplerPipeline("torch")

    def batch_of(ps):
        return SamplingBatch(ps, [[]], [[]], vocab_size=1000)

    want = pipe.sample(x, batch_of(params), return_processed=True)

    def bounds():
        return tuple(pipe.process(x, batch_of(moved_params(params, d))) for d in (+1, -1))

    by_p = want.processed[0].float().argsort(descending=True)
    last_kept = int((~torch.isneginf(want.processed[0])).sum()) - 1
    settled = torch.tensor([True])

    def flipped(tokens, removed: bool):
        processed = want.processed.clone()
        processed[0, tokens] = float("-inf") if removed else x[0, tokens]
        return dataclasses.replace(want, processed=processed, token_ids=want.token_ids + 1)

    fuzz._agrees(flipped(by_p[last_kept], True), want, settled, "on the threshold", bounds)
    with pytest.raises(fuzz.FuzzFailure, match="removed tokens differ at .* 1 beyond the promise"):
        fuzz._agrees(flipped(by_p[last_kept - 1:last_kept + 1], True), want, settled, "the next one", bounds)
    with pytest.raises(fuzz.FuzzFailure, match="1 beyond the promise"):
        fuzz._agrees(flipped(by_p[last_kept + 1], False), want, settled, "one more kept", bounds)


def test_the_fuzzer_catches_a_write_into_the_input(monkeypatch):
    unit = pipeline_module.UNITS[SamplerID.MIN_P]
    monkeypatch.setitem(pipeline_module.UNITS, SamplerID.MIN_P, lambda x, b, r: unit(x.mul_(2.0), b, r))
    with pytest.raises(fuzz.FuzzFailure, match="wrote its input"):
        fuzz.run_checked(_case())


def test_the_fuzzer_catches_a_warning(monkeypatch):
    unit = pipeline_module.UNITS[SamplerID.MIN_P]

    def warns(x, b, r):
        np.float32(3e38) * np.float32(10)  # overflow: numpy's RuntimeWarning
        return unit(x, b, r)

    monkeypatch.setitem(pipeline_module.UNITS, SamplerID.MIN_P, warns)
    with pytest.raises(RuntimeWarning, match="overflow"):
        fuzz.run_checked(_case())


def test_the_script_reports_its_cases(capsys):
    assert fuzz.main(["--seconds", "0.5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 failure(s)" in out and "seeds 3.." in out
