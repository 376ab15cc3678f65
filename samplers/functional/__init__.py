"""The reference torch path: one pure function per sampler.

Contract shared by every function here: ``logits`` is a ``[B, V]`` float tensor (fp32, fp16
or bf16; computed in fp32, returned in the input dtype); per-row parameters are ``[B]``
tensors on the logits' device or Python numbers (the same value for every row), and a value
outside the parameter's interval (SEMANTICS.md) is a ``ValueError`` naming the parameter,
the value and the interval, as is an argument of another type or shape (entry lists that
index past the logits included); the input is never modified; a row at its parameter's
disabled value comes back bit-identical; removed tokens are ``-inf`` and every truncation
keeps the row's most likely token. These functions define correctness: the Triton kernels
in ``samplers/kernels/`` are tested against them. The three whose names end in ``_``
(``dry_``, ``penalties_``, ``no_repeat_ngram_``), as torch's in-place methods, write their result
into their input (contiguous ``[B, V]``) and return it: a caller that owns its rows saves a
``[B, V]`` copy.
"""

from .dry import dry, dry_
from .ngram import no_repeat_ngram, no_repeat_ngram_
from .penalties import ban_tokens, logit_bias, min_tokens, penalties, penalties_, rescue_empty_rows
from .skew import skew
from .temperature import dynamic_temperature, dynamic_temperature_values, quadratic_smoothing, temperature
from .truncation import (
    epsilon_cutoff,
    eta_cutoff,
    min_p,
    nsigma,
    nsigma_top_k,
    temperature_top_k,
    tfs,
    top_a,
    top_k,
    top_p,
    typical_p,
    xtc,
)

__all__ = [
    "ban_tokens", "dry", "dry_", "dynamic_temperature", "dynamic_temperature_values", "epsilon_cutoff", "eta_cutoff",
    "logit_bias", "min_p", "min_tokens", "no_repeat_ngram", "no_repeat_ngram_", "nsigma", "nsigma_top_k", "penalties", "penalties_",
    "quadratic_smoothing", "rescue_empty_rows", "skew", "temperature", "temperature_top_k", "tfs", "top_a", "top_k",
    "top_p", "typical_p", "xtc",
]
