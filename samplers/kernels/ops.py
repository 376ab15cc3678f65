"""One sampler at a time on the kernel path: thin typed wrappers with the contracts of
``samplers.functional`` (same arguments, same result, the input's dtype back with the
reference's saturating cast), but for two things: the per-row parameters are ``[B]``
tensors only (no Python numbers), and their values' intervals are not checked (their form
is: a ``ValueError`` names the argument).

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
from samplers.functional._stats import check_logits, check_row_tensor
from samplers.history import TokenHistory, check_history

from . import codes as C
from .fused import run_single
from .penalties import ngram_banned


def _single(logits: torch.Tensor, code: int, seen: Optional[torch.Tensor] = None,
            counts: Optional[torch.Tensor] = None, banned: Optional[torch.Tensor] = None,
            **params: torch.Tensor) -> torch.Tensor:
    """``run_single`` after the checks of the arguments' form: ``logits`` ``[B, V]`` float,
    each parameter a ``[B]`` tensor (else a ``ValueError`` naming it; unlike the reference,
    the values' intervals are not checked)."""
    check_logits(logits)
    for name, value in params.items():
        check_row_tensor(value, logits, name)
    return run_single(logits, code, seen=seen, counts=counts, banned=banned, **params)


# ---------------------------------------------------------------------------- truncation
def top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.top_k`` (int64 [B] k; ties at the boundary all kept)."""
    return _single(logits, C.TOP_K, top_k=top_k)


def top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.top_p`` (threshold search, no sort)."""
    return _single(logits, C.TOP_P, top_p=top_p)


def top_a(logits: torch.Tensor, top_a: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.top_a``."""
    return _single(logits, C.TOP_A, top_a=top_a)


def min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.min_p``."""
    return _single(logits, C.MIN_P, min_p=min_p)


def eta_cutoff(logits: torch.Tensor, eta_cutoff: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.eta_cutoff``."""
    return _single(logits, C.ETA, eta_cutoff=eta_cutoff)


def epsilon_cutoff(logits: torch.Tensor, epsilon_cutoff: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.epsilon_cutoff``."""
    return _single(logits, C.EPSILON, epsilon_cutoff=epsilon_cutoff)


def typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.typical_p`` (threshold search on the deviation, no sort)."""
    return _single(logits, C.TYPICAL, typical_p=typical_p)


def nsigma(logits: torch.Tensor, nsigma: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.nsigma``."""
    return _single(logits, C.NSIGMA, nsigma=nsigma)


def xtc(logits: torch.Tensor, xtc_threshold: torch.Tensor, xtc_probability: torch.Tensor,
        coin: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.xtc`` (``coin``: [B] uniforms, the row's XTC draw)."""
    return _single(logits, C.XTC, xtc_threshold=xtc_threshold, xtc_probability=xtc_probability, coin=coin)


def tfs(logits: torch.Tensor, tfs: torch.Tensor) -> torch.Tensor:
    """Tail-free sampling: the torch reference ``samplers.functional.tfs`` (sort-defined, no
    exact threshold form; it runs on the logits' device)."""
    return F.tfs(logits, tfs)


# ---------------------------------------------------------------------------- temperature
def temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.temperature``."""
    return _single(logits, C.TEMPERATURE, temperature=temperature)


def dynamic_temperature(logits: torch.Tensor, dynatemp_min: torch.Tensor, dynatemp_max: torch.Tensor,
                        dynatemp_exponent: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.dynamic_temperature`` (entropy computed in the kernel)."""
    return _single(logits, C.DYNATEMP, dynatemp_min=dynatemp_min, dynatemp_max=dynatemp_max,
                      dynatemp_exponent=dynatemp_exponent)


def quadratic_smoothing(logits: torch.Tensor, smoothing_factor: torch.Tensor,
                        smoothing_curve: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.quadratic_smoothing``."""
    return _single(logits, C.QUADRATIC, smoothing_factor=smoothing_factor, smoothing_curve=smoothing_curve)


# ---------------------------------------------------------------------------- history
def penalties(logits: torch.Tensor, seen_mask: torch.Tensor, output_counts: torch.Tensor,
              repetition_penalty: torch.Tensor, frequency_penalty: torch.Tensor,
              presence_penalty: torch.Tensor) -> torch.Tensor:
    """Kernel of ``samplers.functional.penalties`` (same arguments)."""
    return _single(logits, C.PENALTIES, repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                      seen=seen_mask, counts=output_counts)


def no_repeat_ngram(logits: torch.Tensor, history: TokenHistory, no_repeat_ngram_size: torch.Tensor) -> torch.Tensor:
    """Kernel path of ``samplers.functional.no_repeat_ngram``: torch match search, in-kernel ban."""
    check_logits(logits)
    check_history(history, logits, "no_repeat_ngram")
    check_row_tensor(no_repeat_ngram_size, logits, "no_repeat_ngram_size")
    banned = ngram_banned(history, no_repeat_ngram_size, logits.shape[1])
    if banned is None:
        return logits.clone()
    return _single(logits, C.NGRAM, banned=banned)


def dry(logits: torch.Tensor, history: TokenHistory, dry_multiplier: torch.Tensor, dry_base: torch.Tensor,
        dry_allowed_length: torch.Tensor, dry_range: torch.Tensor,
        dry_sequence_breaker_ids: torch.Tensor) -> torch.Tensor:
    """DRY on the kernel path: the torch reference ``samplers.functional.dry`` (vectorised
    match search over the history, scatter of the penalties), run on the logits' device."""
    return F.dry(logits, history, dry_multiplier, dry_base, dry_allowed_length, dry_range,
                 dry_sequence_breaker_ids)


# ---------------------------------------------------------------------------- skew
def skew(logits: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """``samplers.functional.skew`` (torch reference, on the logits' device): skew is defined
    over tokens sorted by probability with tie groups sharing mass, which needs a sort."""
    return F.skew(logits, skew)
