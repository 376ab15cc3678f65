"""What the vLLM tests share: a vLLM request with our block, and the reference row of one
request (the pipeline on a batch built from scratch). Imported only by test modules that have
already skipped themselves when vllm is missing; needs no particular model runner."""

from __future__ import annotations

import torch
from vllm import SamplingParams as VllmParams

from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.integrations.vllm import EXTRA_ARGS_KEY

FQCN = "samplers.integrations.vllm:SamplersLogitsProcessor"


def vparams(block=None, **kw) -> VllmParams:
    extra = None if block is None else {EXTRA_ARGS_KEY: block}
    return VllmParams(extra_args=extra, **kw)


def expected_row(logits_row, ours, vp, prompt, history_output):
    """One request's row: the pipeline on a batch built from scratch; for a greedy request or
    one seeded under our key, the one-token row of ``SamplerPipeline.sample``'s choice (the
    seeded stream keyed by (our seed, vLLM's seed as the sequence index))."""
    own_seed = ours.seed is not None
    seq = vp.seed % 2**32 if own_seed and vp.seed is not None else 0
    if not own_seed and vp.seed is not None:
        ours = SamplingParams(**{**ours.to_dict(), "seed": vp.seed, "max_tokens": None})
    b = SamplingBatch([ours], [prompt], [list(history_output)], vocab_size=logits_row.shape[0],
                      sequence_indices=[seq])
    row = SamplerPipeline(backend="torch").process(logits_row[None], b)[0]
    if own_seed or ours.is_greedy:
        token = int(SamplerPipeline(backend="torch").sample(logits_row[None], b).token_ids[0])
        assert torch.isfinite(row[token])
        row = torch.where(torch.arange(row.shape[0]) == token, 0.0, float("-inf"))
    return row
