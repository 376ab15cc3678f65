"""Triton kernels for the samplers, with the same contracts as ``samplers.functional``.

The kernels are the CUDA fast path of ``SamplerPipeline(backend="triton")``; under
``TRITON_INTERPRET=1`` they also run on the CPU (that is how the tests check them against
the torch reference). Modules, one per family:

- ``_common``: launch sizes, the layout rule (whole rows or column-blocked: ``pick_layout``) and
  the in-kernel row statistics every kernel shares
- ``truncation``, ``temperature``, ``penalties``: the in-kernel stages of each family (top_k,
  top_p, top_a, min_p, eta, epsilon, typical_p, nsigma, XTC; temperature, dynamic temperature,
  smoothing; repetition/frequency/presence, no_repeat_ngram, with logit_bias and min_tokens
  applied as scatters)
- ``codes``: the stage codes, the per-row parameter table and the scratch sizes
- ``draw``: the token draw and the Philox stream
- ``stage``: the whole-row stage dispatch (code -> stage function)
- ``blocked``: the column-blocked chain for large vocabularies (rows past ``pick_layout``'s
  whole-row limit: 8192 lanes on a GPU)
- ``fused``: the whole-row chain kernel and ``run_chain``, which launches either layout
- ``chain``: ``process_logits``, the pipeline's kernel backend (its whole chain)
- ``ops``: one sampler at a time, with the contracts of ``samplers.functional`` (tfs, skew and
  DRY: the torch reference on the logits' device)
- ``guided``: the grammar bitmask; ``row_stats``: the row statistics as a standalone kernel
- ``aot``: compile every kernel for a CUDA target without a GPU (``python -m samplers.kernels.aot``)

Imports flow down that list: a module imports only modules listed above it.

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


def draw_tokens(logits: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The draw in a kernel (see ``samplers.kernels.draw.draw_tokens``)."""
    from .draw import draw_tokens as _draw

    return _draw(logits, greedy, uniforms)


def sample_tokens(logits: torch.Tensor, greedy: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw with in-kernel uniforms and the chosen log-probabilities (see
    ``samplers.kernels.draw.sample_tokens``)."""
    from .draw import sample_tokens as _sample

    return _sample(logits, greedy, keys)


__all__ = ["available", "draw_tokens", "sample_tokens"]
