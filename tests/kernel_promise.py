"""The kernels' promise against the torch reference, as one assertion shared by the CPU tests
(Triton's interpreter) and the CUDA ones (``samplers/kernels/README.md``, "What is promised on
a GPU").

A threshold stage (``_common.THRESHOLD_KEEP_MORE``) compares a probability, a mass, an entropy
or a std, summed on the kernel path in another order than torch's, with its parameter: a token
lying on the threshold may fall either way. It may be decided differently from the reference
only if the reference keeps it with the parameter moved by ``THRESHOLD_RTOL`` (relative) one way
and removes it with the parameter moved as much the other way. Every other stage, and the
values of kept tokens everywhere, are exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from samplers import SamplerID, SamplingParams
from samplers.kernels._common import THRESHOLD_KEEP_MORE, THRESHOLD_RTOL
from samplers.params import STAGE_OFF

#: The largest value ``SamplingParams`` accepts for each threshold parameter that has one (a
#: moved value is held there: the promise cannot reach past the parameter's interval).
_CEILING = {"top_p": 1.0, "min_p": 1.0, "typical_p": 1.0, "xtc_threshold": 1.0, "eta_cutoff": 1.0 - 2.0**-24,
            "epsilon_cutoff": 1.0 - 2.0**-24}

#: The stage of each threshold parameter (``THRESHOLD_KEEP_MORE``).
_STAGE = {"top_p": SamplerID.TOP_P_TOP_K, "typical_p": SamplerID.TYPICAL_P, "nsigma": SamplerID.TOP_NSIGMA,
          "xtc_threshold": SamplerID.XTC, "min_p": SamplerID.MIN_P, "top_a": SamplerID.TOP_A,
          "eta_cutoff": SamplerID.ETA_CUTOFF, "epsilon_cutoff": SamplerID.EPSILON_CUTOFF}


def assert_within_promise(got: torch.Tensor, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          x: torch.Tensor, name: str, value: torch.Tensor) -> None:
    """``got`` (a kernel's output on ``x`` with sampler ``name``'s parameter ``value``, ``[B]``)
    against ``reference(x, value)``: same dtype and shape, no NaN; its kept set lies between the
    reference's at ``value`` moved by ``THRESHOLD_RTOL`` towards keeping fewer and towards keeping
    more tokens (equal to the reference's for a stage outside ``THRESHOLD_KEEP_MORE``); the
    values both keep are bit-identical."""
    want = reference(x, value)
    assert got.dtype == want.dtype == x.dtype and got.shape == want.shape == x.shape
    assert not torch.isnan(got).any()
    kept, kept_ref = ~torch.isneginf(got), ~torch.isneginf(want)
    direction = THRESHOLD_KEEP_MORE.get(name, 0)
    if direction == 0:
        assert torch.equal(kept, kept_ref), f"{name}: removed sets differ in {int((kept != kept_ref).sum())} places"
    else:
        loose = ~torch.isneginf(reference(x, value * (1 + THRESHOLD_RTOL * direction)))
        tight = ~torch.isneginf(reference(x, value * (1 - THRESHOLD_RTOL * direction)))
        assert not (kept & ~loose).any(), f"{name}: {int((kept & ~loose).sum())} kept beyond the tolerance"
        assert not (tight & ~kept).any(), f"{name}: {int((tight & ~kept).sum())} removed beyond the tolerance"
    both = kept & kept_ref
    assert torch.equal(got[both], want[both]), f"{name}: kept values differ"


def moved_params(params: Sequence[SamplingParams], direction: int) -> list[SamplingParams]:
    """``params`` with every threshold parameter (``THRESHOLD_KEEP_MORE``) of a stage the row
    runs moved by ``THRESHOLD_RTOL`` (relative) towards keeping more tokens (``direction`` +1) or
    fewer (-1): the requests whose results bound what the kernels may return for ``params``.
    A parameter at its stage-off value stays (top_p = 1 beside a top_k: moved, it would switch a
    stage on)."""

    def moved(p: SamplingParams, name: str, keep_more: int) -> float:
        value = getattr(p, name) * (1 + THRESHOLD_RTOL * keep_more * direction)
        return min(value, _CEILING.get(name, value))

    def runs(p: SamplingParams, name: str) -> bool:
        stage = _STAGE[name]
        return stage in p.enabled_samplers() and getattr(p, name) != STAGE_OFF[stage].get(name, None)

    return [dataclasses.replace(p, **{name: moved(p, name, keep_more) for name, keep_more in THRESHOLD_KEEP_MORE.items()
                                      if runs(p, name)}) for p in params]
