"""torch's default device, read the same way on every torch the package accepts."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """Where torch puts a tensor made without a device (``torch.set_default_device``; the CPU
    unless it says otherwise): ``torch.get_default_device()``. On torch 2.8 that call fails
    with an ``AttributeError`` once ``torch.set_default_device(None)`` has run (it reads the
    cleared setting); the device of a new empty tensor is the same answer there."""
    try:
        return torch.get_default_device()
    except AttributeError:
        return torch.empty(0).device
