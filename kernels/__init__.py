"""Triton kernels for the samplers, with the same contracts as ``samplers.functional``.

The kernels are the CUDA fast path of ``SamplerPipeline(backend="triton")``. Until they land,
``available()`` is False and the pipeline uses the torch reference path everywhere.
"""

from __future__ import annotations


def available() -> bool:
    """True when the Triton backend can run: kernels implemented, triton importable, CUDA present."""
    return False
