"""Triton kernels for the samplers, with the same contracts as ``samplers.functional``.

The kernels are the CUDA fast path of ``SamplerPipeline(backend="triton")``. Until they land,
``available()`` is False and the pipeline uses the torch reference path everywhere.
"""

from __future__ import annotations


def available(device=None) -> bool:
    """True when the Triton backend can run on ``device``: kernels implemented, triton
    importable, and CUDA (or ``TRITON_INTERPRET=1`` for any device)."""
    return False
