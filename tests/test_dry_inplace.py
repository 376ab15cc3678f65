"""DRY on the kernel path (``samplers.kernels.chain.process_logits``): in place on the fp32 working
tensor, the caller's logits never modified, stage row masks honoured, and the sync-free
selection (used on CUDA) bit-identical to the nonzero one (used on the CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import test_pipeline as tp  # noqa: E402  (tests/ is on sys.path: pytest's rootdir import mode)
from logit_helpers import KERNEL_TOLERANCES  # noqa: E402

from samplers import SamplerID, SamplerPipeline, SamplingParams  # noqa: E402

import samplers.kernels.chain as chain  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

S = SamplerID
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _params(bias: bool):
    extra = dict(logit_bias={3: 2.0, 5: -1.0}) if bias else {}
    return [
        # DRY first (default order): working tensor is the caller's logits, or the bias copy
        SamplingParams(dry_multiplier=0.8, dry_allowed_length=2, **extra),
        SamplingParams(dry_multiplier=2.0, dry_allowed_length=1, dry_base=3.0, dry_range=20, temperature=0.7,
                       min_p=0.05),
        SamplingParams(temperature=0.9, min_p=0.05),  # DRY disabled
        # DRY after a fused stage, in a row-masked stage (heterogeneous priorities)
        SamplingParams(sampler_priority=[S.TEMPERATURE, S.MIN_P, S.DRY], temperature=1.3, min_p=0.02,
                       dry_multiplier=1.5, dry_allowed_length=1, dry_sequence_breaker_ids=[60, 61, 7]),
        SamplingParams(sampler_priority=[S.TOP_P_TOP_K, S.DRY, S.TFS], top_k=60, tfs=0.9,
                       dry_multiplier=1.0, dry_allowed_length=1, dry_sequence_breaker_ids=list(range(40, 52))),
    ]


def _forced(sync_free: bool):
    real = chain.dry_

    def dry_(*a, **kw):
        kw["sync_free"] = sync_free
        return real(*a, **kw)

    return dry_


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_process_logits_dry_in_place(dtype, bias, monkeypatch):
    params = _params(bias)
    logits = tp._logits(len(params), seed=31, dtype=dtype)
    logits[2, :5] = float("-inf")
    batch = tp._batch(params, seed=31)
    assert any(sid == S.DRY and m is not None for sid, m in batch.schedule)
    before = logits.clone()
    want = SamplerPipeline("torch", seed=0).process(logits, batch)
    got = SamplerPipeline("triton", seed=0).process(logits, batch)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(logits.view(bits), before.view(bits))  # the caller's logits are untouched
    gi, wi = torch.isneginf(got), torch.isneginf(want)
    assert torch.equal(gi, wi)
    rtol, atol = KERNEL_TOLERANCES[dtype]
    torch.testing.assert_close(got[~gi].float(), want[~wi].float(), rtol=rtol, atol=atol)
    # both candidate selections, bit for bit
    x = {}
    for sf in (False, True):
        monkeypatch.setattr(chain, "dry_", _forced(sf))
        x[sf] = SamplerPipeline("triton", seed=0).process(logits, batch)
        assert torch.equal(logits.view(bits), before.view(bits))
    assert torch.equal(x[False].view(torch.int32), x[True].view(torch.int32))
    assert torch.equal(x[False].view(torch.int32), got.view(torch.int32))


def test_dry_stage_penalises_and_masks_rows(monkeypatch):
    """Each DRY stage runs in place on a tensor that is not the caller's, with the
    multipliers of its own rows (0 elsewhere), and changes those rows only."""
    params = _params(False)
    logits = tp._logits(len(params), seed=32)
    batch = tp._batch(params, seed=32)
    calls = []
    real = chain.dry_

    def spy(x, history, mult, *a, **kw):
        before = x.clone()
        out = real(x, history, mult, *a, **kw)
        assert out is x
        changed = (x.view(torch.int32) != before.view(torch.int32)).any(dim=1)
        assert not changed[mult == 0].any()  # rows outside the stage / disabled: untouched
        calls.append((x.data_ptr(), mult.clone(), bool(changed.any())))
        return out

    monkeypatch.setattr(chain, "dry_", spy)
    SamplerPipeline("triton", seed=0).process(logits, batch)
    assert calls and all(ptr != logits.data_ptr() for ptr, _, _ in calls)
    assert all(ch for _, _, ch in calls)  # each DRY stage did penalise something
    # each DRY stage gets the multipliers of its own rows only (0 elsewhere)
    for (sid, rows), mult in zip([s for s in batch.schedule if s[0] == S.DRY], [m for _, m, _ in calls]):
        full = batch.param("dry_multiplier")
        exp = full if rows is None else torch.where(rows, full, 0.0)
        assert torch.equal(mult, exp)
