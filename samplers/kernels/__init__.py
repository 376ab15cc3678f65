"""Triton kernels for the samplers, with the same contracts as ``samplers.functional``.

The kernels are the CUDA fast path of ``SamplerPipeline(backend="triton")``; under
``TRITON_INTERPRET=1`` they also run on the CPU (that is how the tests check them against
the torch reference). Modules, one per family:

- ``fused``: the chain kernel (one read + one write of [B, V] for any run of fusable stages)
- ``truncation``: top_k, top_p, top_a, min_p, eta, epsilon, typical_p, nsigma, XTC (tfs: torch)
- ``temperature``: temperature, dynamic temperature, quadratic smoothing
- ``penalties``: repetition/frequency/presence, no_repeat_ngram, logit_bias, min_tokens, DRY (torch)
- ``skew``: torch reference (sort-defined)
- ``draw``: the token draw and the Philox stream
- ``chain``: ``process_logits``, the pipeline's whole chain
- ``blocked``: column-blocked chain and draw kernels for large vocabularies (rows > 65536 lanes)
- ``row_stats``: the shared row statistics as a standalone kernel (tested against torch)
- ``aot``: compile every kernel for a CUDA target without a GPU (``python -m samplers.kernels.aot``)

See kernels/README.md for the design and the number of passes over [B, V].
"""

from __future__ import annotations

import os
from typing import Optional

import torch


def available(device: Optional[torch.device] = None) -> bool:
    """True when the Triton backend can run on ``device``: triton importable, and ``device``
    is CUDA (``device=None``: a CUDA device exists), or ``TRITON_INTERPRET=1`` (any device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def process_logits(logits: torch.Tensor, batch, randoms, draw: bool = False, keep_processed: bool = True):
    """The pipeline's chain on the kernel path; with ``draw``, also the tokens and their
    logprobs (see ``samplers.kernels.chain.process_logits``)."""
    from .chain import process_logits as _process

    return _process(logits, batch, randoms, draw=draw, keep_processed=keep_processed)


def draw_tokens(logits: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The draw in a kernel (see ``samplers.kernels.draw.draw_tokens``)."""
    from .draw import draw_tokens as _draw

    return _draw(logits, greedy, uniforms)


def sample_tokens(logits: torch.Tensor, greedy: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw with in-kernel uniforms and the chosen log-probabilities (see
    ``samplers.kernels.draw.sample_tokens``)."""
    from .draw import sample_tokens as _sample

    return _sample(logits, greedy, keys)


__all__ = ["available", "draw_tokens", "process_logits", "sample_tokens"]
