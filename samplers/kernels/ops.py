"""One sampler at a time on the kernel path: thin typed wrappers with the contracts of
``samplers.functional`` (same arguments, same checks, same result, the input's dtype back with
the reference's saturating cast). Each per-row parameter is a ``[B]`` tensor or a number for
every row, checked against the interval the reference states (``PARAM_RULES``: a
``ValueError`` names the parameter, the value and the interval; off the CPU the check reads
the parameters, a device sync, which ``trusted_params()`` skips, as for the reference).

Each runs the chain kernel (``fused.run_single``) with a single stage. The pipeline does not
use these (it fuses whole chains, ``chain.process_logits``); they exist so that a caller can
use one kernel alone and so that the tests can check every stage against its reference.
tfs, skew and DRY have no exact kernel form and call the torch reference on the logits'
device (see README.md beside this file).
"""

from __future__ import annotations

from typing import Optional

import torch

import samplers.functional as F
from samplers.functional._stats import ParamLike, check_logits, sampler_param
from samplers.functional.penalties import check_token_tables
from samplers.history import TokenHistory, check_history

from . import codes as C
from .fused import run_single
from .penalties import ngram_banned


def _single(logits: torch.Tensor, code: int, seen: Optional[torch.Tensor] = None,
            counts: Optional[torch.Tensor] = None, banned: Optional[torch.Tensor] = None,
            **params: ParamLike) -> torch.Tensor:
    """``run_single`` on ``logits`` (``[B, V]`` float) with each parameter as ``sampler_param``
    gives it: a ``[B]`` tensor of its dtype on the logits' device, within its interval."""
    check_logits(logits)
    rows = {name: sampler_param(value, logits, name) for name, value in params.items()}
    return run_single(logits, code, seen=seen, counts=counts, banned=banned, **rows)


# ---------------------------------------------------------------------------- truncation
def top_k(logits: torch.Tensor, top_k: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.top_k`` (int64 [B] k; ties at the boundary all kept)."""
    return _single(logits, C.TOP_K, top_k=top_k)


def top_p(logits: torch.Tensor, top_p: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.top_p`` (threshold search, no sort)."""
    return _single(logits, C.TOP_P, top_p=top_p)


def top_a(logits: torch.Tensor, top_a: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.top_a``."""
    return _single(logits, C.TOP_A, top_a=top_a)


def min_p(logits: torch.Tensor, min_p: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.min_p``."""
    return _single(logits, C.MIN_P, min_p=min_p)


def eta_cutoff(logits: torch.Tensor, eta_cutoff: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.eta_cutoff``."""
    return _single(logits, C.ETA, eta_cutoff=eta_cutoff)


def epsilon_cutoff(logits: torch.Tensor, epsilon_cutoff: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.epsilon_cutoff``."""
    return _single(logits, C.EPSILON, epsilon_cutoff=epsilon_cutoff)


def typical_p(logits: torch.Tensor, typical_p: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.typical_p`` (threshold search on the deviation, no sort)."""
    return _single(logits, C.TYPICAL, typical_p=typical_p)


def nsigma(logits: torch.Tensor, nsigma: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.nsigma``."""
    return _single(logits, C.NSIGMA, nsigma=nsigma)


def xtc(logits: torch.Tensor, xtc_threshold: ParamLike, xtc_probability: ParamLike,
        coin: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.xtc`` (``coin``: [B] uniforms, the row's XTC draw)."""
    return _single(logits, C.XTC, xtc_threshold=xtc_threshold, xtc_probability=xtc_probability, coin=coin)


def tfs(logits: torch.Tensor, tfs: ParamLike) -> torch.Tensor:
    """Tail-free sampling: the torch reference ``samplers.functional.tfs`` (sort-defined, no
    exact threshold form; it runs on the logits' device)."""
    return F.tfs(logits, tfs)


# ---------------------------------------------------------------------------- temperature
def temperature(logits: torch.Tensor, temperature: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.temperature``."""
    return _single(logits, C.TEMPERATURE, temperature=temperature)


def dynamic_temperature(logits: torch.Tensor, dynatemp_min: ParamLike, dynatemp_max: ParamLike,
                        dynatemp_exponent: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.dynamic_temperature`` (entropy computed in the kernel)."""
    return _single(logits, C.DYNATEMP, dynatemp_min=dynatemp_min, dynatemp_max=dynatemp_max,
                      dynatemp_exponent=dynatemp_exponent)


def quadratic_smoothing(logits: torch.Tensor, smoothing_factor: ParamLike,
                        smoothing_curve: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.quadratic_smoothing``."""
    return _single(logits, C.QUADRATIC, smoothing_factor=smoothing_factor, smoothing_curve=smoothing_curve)


# ---------------------------------------------------------------------------- history
def penalties(logits: torch.Tensor, seen_mask: torch.Tensor, output_counts: torch.Tensor,
              repetition_penalty: ParamLike, frequency_penalty: ParamLike,
              presence_penalty: ParamLike) -> torch.Tensor:
    """Kernel of ``samplers.functional.penalties`` (same arguments)."""
    check_logits(logits)
    check_token_tables(logits, seen_mask, output_counts)
    return _single(logits, C.PENALTIES, repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                      seen=seen_mask, counts=output_counts)


def no_repeat_ngram(logits: torch.Tensor, history: TokenHistory, no_repeat_ngram_size: ParamLike) -> torch.Tensor:
    """Kernel path of ``samplers.functional.no_repeat_ngram``: torch match search, in-kernel ban."""
    check_logits(logits)
    check_history(history, logits, "no_repeat_ngram")
    size = sampler_param(no_repeat_ngram_size, logits, "no_repeat_ngram_size")
    banned = ngram_banned(history, size, logits.shape[1])
    if banned is None:
        return logits.clone()
    return _single(logits, C.NGRAM, banned=banned)


def dry(logits: torch.Tensor, history: TokenHistory, dry_multiplier: ParamLike, dry_base: ParamLike,
        dry_allowed_length: ParamLike, dry_range: ParamLike,
        dry_sequence_breaker_ids: torch.Tensor) -> torch.Tensor:
    """DRY on the kernel path: the torch reference ``samplers.functional.dry`` (vectorised
    match search over the history, scatter of the penalties), run on the logits' device."""
    return F.dry(logits, history, dry_multiplier, dry_base, dry_allowed_length, dry_range,
                 dry_sequence_breaker_ids)


# ---------------------------------------------------------------------------- skew
def skew(logits: torch.Tensor, skew: ParamLike) -> torch.Tensor:
    """``samplers.functional.skew`` (torch reference, on the logits' device): skew is defined
    over tokens sorted by probability with tie groups sharing mass, which needs a sort."""
    return F.skew(logits, skew)
