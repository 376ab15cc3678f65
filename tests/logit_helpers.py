"""Random logits and bit patterns shared by the reference-sampler tests."""

from __future__ import annotations

import numpy as np
import torch


#: The integer dtype of each float dtype's width (its bit pattern).
AS_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}


#: (rtol, atol) of the kernel backend's kept values against the torch backend's, by dtype.
KERNEL_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
                     torch.bfloat16: (8e-3, 1e-2)}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (for bit-identity checks, -0.0 != 0.0)."""
    return t.contiguous().view(AS_INT[t.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes, shapes and bits (NaN included, which ``torch.equal`` calls unequal)."""
    return a.dtype == b.dtype and torch.equal(a.view(AS_INT[a.dtype]), b.view(AS_INT[b.dtype]))


def spy_answers(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` (a function that returns a result or None) by one that also
    records, per call, whether it gave a result; returns the record."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


def make_logits(rng: np.random.Generator, batch: int, vocab: int, *, ninf: float = 0.2,
                ties: float = 0.2, scale: float = 3.0, ties_at_max: bool = False) -> torch.Tensor:
    """Random fp32 logits: normal * scale, a fraction set to -inf (never a whole row),
    a fraction copied from other entries of the row (exact ties); with ``ties_at_max``,
    sometimes also a tie at the row's maximum."""
    x = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    for b in range(batch):
        if vocab > 1 and ties > 0:
            n_tie = int(rng.integers(0, max(1, int(ties * vocab)) + 1))
            src = rng.integers(0, vocab, n_tie)
            dst = rng.integers(0, vocab, n_tie)
            x[b, dst] = x[b, src]
            if ties_at_max and rng.random() < 0.3:
                x[b, rng.integers(0, vocab)] = x[b].max()
        if ninf > 0:
            mask = rng.random(vocab) < ninf
            mask[int(np.argmax(x[b]))] = False
            x[b, mask] = -np.inf
    return torch.from_numpy(x)


def fused_top_k_case(seed: int, batch: int, vocab: int, removed: float
                     ) -> tuple[torch.Tensor, np.random.Generator, torch.Tensor]:
    """Inputs for a sampler fused with top_k: ``3 * randn`` rows with about ``removed`` of
    their entries ``-inf`` (bans, a grammar's mask), a numpy generator for the other sampler's
    parameters, and each row's ``k`` (from 1 to ``vocab // 8``, where top_k still takes its
    candidates)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 3
    x[torch.rand(batch, vocab, generator=g) < removed] = float("-inf")
    rng = np.random.default_rng(seed)
    k = torch.tensor(rng.choice([1, 2, 40, 200, vocab // 8], batch), dtype=torch.int64)
    return x, rng, k


def assert_fused_equals_unfused(monkeypatch, logits: torch.Tensor, batch) -> None:
    """The pipeline's ``process`` and ``sample`` (tokens, processed logits, logprobs) give the
    same values with its fused units (``pipeline.FUSED_UNITS``) as with every unit on its own."""
    from samplers import SamplerPipeline
    from samplers import pipeline as pipeline_module

    def run():
        pipe = SamplerPipeline("torch", seed=1)
        return pipe.process(logits, batch), pipe.sample(logits, batch, return_processed=True)

    fused_processed, fused_sample = run()
    monkeypatch.setattr(pipeline_module, "FUSED_UNITS", {})
    processed, sample = run()
    assert torch.equal(fused_processed, processed)
    assert torch.equal(fused_sample.token_ids, sample.token_ids)
    assert torch.equal(fused_sample.processed, sample.processed)
    assert torch.equal(fused_sample.logprobs, sample.logprobs)
