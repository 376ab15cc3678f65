"""Skew on the kernel path.

Skew is defined over tokens sorted by probability with tie groups sharing mass
(``samplers.functional.skew``); every token's result depends on its rank mass, which needs
a sort. The triton backend calls the torch reference on the GPU tensor (see kernels/README.md).
"""

from __future__ import annotations

import torch

import samplers.functional as F


def skew(logits: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """``samplers.functional.skew`` (torch reference, on the logits' device)."""
    return F.skew(logits, skew)
