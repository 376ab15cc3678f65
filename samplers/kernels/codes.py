"""Stage codes and the per-row parameter table shared by the chain kernels.

A chain launch names its stages by code (compile-time constants of ``fused._chain_kernel`` and
``blocked._blocked_chain_kernel``) and reads each row's parameters from one float32
``[NPARAMS, B]`` table. Host-side only: nothing here launches a kernel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from samplers.sampling import PURPOSE_XTC

# Stage codes.
NONE, PENALTIES, NGRAM, TEMPERATURE, DYNATEMP, NSIGMA, TOP_K, TOP_P, TOP_A, MIN_P, ETA, EPSILON, \
    TYPICAL, QUADRATIC, XTC, XTC_PHILOX = range(16)
# The XTC_PHILOX stage hard-codes the Philox purpose word of the XTC coin (1):
assert PURPOSE_XTC == 1, "update stage.stage's XTC_PHILOX purpose word"
NSLOTS = 16

# Rows of the per-row parameter table (float32 [NPARAMS, B]).
PARAMS = (
    "repetition_penalty", "frequency_penalty", "presence_penalty", "temperature",
    "dynatemp_min", "dynatemp_max", "dynatemp_exponent", "smoothing_factor", "smoothing_curve",
    "nsigma", "top_k", "top_p", "top_a", "min_p", "eta_cutoff", "epsilon_cutoff", "typical_p",
    "xtc_threshold", "xtc_probability", "coin",
)
# Value a parameter takes when a caller does not give it (the disabled value).
_DISABLED = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "typical_p": 1.0,
             "dynatemp_exponent": 1.0, "smoothing_curve": 1.0}

(P_REP, P_FREQ, P_PRES, P_TEMP, P_DMIN, P_DMAX, P_DEXP, P_SF, P_SC, P_NSIG, P_TOPK, P_TOPP, P_TOPA,
 P_MINP, P_ETA, P_EPS, P_TYP, P_XTHR, P_XPROB, P_COIN) = range(len(PARAMS))


#: Largest vocabulary: the blocked chain keeps the token ids of a sparse row as fp32 (exact to 2**24).
MAX_VOCAB = 1 << 24


def param_table(batch_size: int, device: torch.device, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [NPARAMS, B]: the given per-row parameters; the others at their disabled value."""
    cols = []
    for name in PARAMS:
        v = values.get(name)
        if v is None:
            cols.append(torch.full((batch_size,), _DISABLED.get(name, 0.0), dtype=torch.float32, device=device))
        else:
            cols.append(v.to(device=device, dtype=torch.float32).reshape(batch_size))
    return torch.stack(cols)


def compact_size(block: int) -> int:
    """KMAX of the top_p / typical_p searches: rows with at most this many tokens of p > 0
    search a compacted copy of them (1024, or BLOCK / 4 for small rows so the tests cover it)."""
    return max(16, min(1024, block // 4))


#: fp32 words between the blocked chain's sparse survivors and its tile statistics: the
#: survivors' count and fill flag, then padding to 128 bytes.
SCRATCH_HEADER = 32


def blocked_scratch_stride(kmax: int, n_tiles: int) -> int:
    """fp32 words per row of the column-blocked chain's scratch: [2 KMAX] compacted searches,
    [2 KMAX] sparse survivors, ``SCRATCH_HEADER``, [2, n_tiles] tile statistics, padded to a
    multiple of 32 words so that every row and region starts 128-byte aligned (aligned,
    vectorised scratch accesses). Bounded: 4 KMAX + 32 + 2 n_tiles + 31 words, i.e. 16.6 KB
    per row at KMAX 1024 and V = 151936 (19 tiles of 8192)."""
    return _aligned_words(4 * kmax + SCRATCH_HEADER + 2 * n_tiles)


def blocked_draw_scratch_stride(kmax: int, n_tiles: int) -> int:
    """fp32 words per row of the column-blocked draw's scratch: [2 KMAX] listed entries, then
    [2, n_tiles] tile statistics, padded as ``blocked_scratch_stride`` pads (128-byte aligned
    rows)."""
    return _aligned_words(2 * kmax + 2 * n_tiles)


def _aligned_words(need: int) -> int:
    """``need`` fp32 words rounded up to a multiple of 32 (128 bytes)."""
    return -(-need // 32) * 32


def row_masks(masks: Sequence[Optional[torch.Tensor]], batch_size: int, device: torch.device) -> torch.Tensor:
    """int8 [NSLOTS, B]: slot i applies to row b iff rmask[i, b] (None = every row)."""
    rmask = torch.ones((NSLOTS, batch_size), dtype=torch.int8, device=device)
    for i, m in enumerate(masks):
        if m is not None:
            rmask[i] = m.to(torch.int8)
    return rmask


def key_words(key_lo: torch.Tensor, key_hi: torch.Tensor, step: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """int32 [4, B]: the low 32 bits of the Philox key words and counter words of each row."""
    return (torch.stack([key_lo, key_hi, step, seq]).to(torch.int64) & 0xFFFFFFFF).to(torch.int32)
