"""Private helpers shared by the reference torch samplers.

Every row statistic that more than one sampler needs (fp32 softmax, log-softmax, entropy,
the top-token mask, exclusive cumulative sums, the boundary of a kept prefix) is written
here once, so no formula exists twice in ``samplers/functional``.

Conventions used throughout (``SEMANTICS.md`` states them for the samplers):

- ``logits`` is a ``[B, V]`` float tensor (fp32, fp16 or bf16); statistics are computed in
  fp32 on an upcast copy; the input is never modified.
- A removed token is ``-inf``; it has probability exactly 0 and log-probability ``-inf``.
  A row made only of ``-inf`` produces probabilities 0 (never NaN).
- Per-row parameters are 1-D tensors ``[B]`` on the logits' device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import weakref
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Union, overload

import numpy as np
import torch
from torch import Tensor

from ..history import is_integer_dtype
from ._rowsum import SumTree, batched_row_sum, tree_lanes
from ._threads import sort_rows_

__all__ = [
    "GREEDY_TEMPERATURE",
    "check_logits",
    "row_param",
    "PARAM_RULES",
    "sampler_param",
    "upcast",
    "softmax_and_log_softmax",
    "entropy",
    "entropy_of_logits",
    "top_token_mask",
    "exclusive_cumsum",
    "prefix_boundary",
    "apply_keep",
    "cast_saturating",
    "saturate_finite",
    "finite_absmax_bound",
    "no_overflow",
    "trusted_params",
    "check_entries",
    "check_row_tensor",
    "select_rows",
    "fill_removed",
    "sort_values_desc",
    "sort_nonneg",
    "is_finite",
    "count_below",
    "cumsum_is_running_sum",
    "keep_at_least",
    "keep_logits_at_least",
    "SparseRows",
    "compact_rows",
    "PackedChain",
    "packed_chain",
    "packed_result_wanted",
    "note_live_hint",
    "library_call",
    "note_removed",
    "noted_removed",
    "carry_removed",
    "removed_in_rows",
    "pack_entries",
    "packed_columns",
    "count_true",
    "pow_per_entry",
    "sum_scattered",
]

#: Temperatures below this value mean "greedy" (SEMANTICS.md, temperature).
GREEDY_TEMPERATURE: float = 1e-5
#: smoothing_factor and smoothing_curve: the formula's constants f(3 - c)/2 and f(c - 1)/2 stay
#: finite float32 for any pair up to this.
SMOOTHING_MAX = 1e18
#: skew: exp(skew) (the exponent of the skew formula) is a positive, finite float32.
SKEW_MAX = 80.0

ParamLike = Union[Tensor, float, int]


def check_logits(logits: Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is a 2-D floating-point tensor ``[B, V]``."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [B, V], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating-point dtype, got {logits.dtype}")


def row_param(value: ParamLike, logits: Tensor, dtype: torch.dtype, name: str,
              lo: Optional[float] = None, hi: Optional[float] = None,
              lo_open: bool = False, hi_open: bool = False) -> Tensor:
    """Return ``value`` as a ``[B]`` tensor of ``dtype`` on ``logits.device``.

    A tensor already of that dtype and device is returned as is (no copy). A Python number
    or a 0-d tensor is broadcast to every row. Any other shape is a ``ValueError``, and so
    is a value outside the parameter's interval (``lo`` / ``hi``, open or closed; None: no
    bound) or a non-finite float: the message names the parameter, the value and the
    interval. Inside ``trusted_params()`` (the pipeline, whose ``SamplingParams`` were checked
    when they were built) the interval is not checked again.
    """
    batch = logits.shape[0]
    try:
        t = torch.as_tensor(value, dtype=dtype, device=logits.device)
    except (OverflowError, RuntimeError, ValueError):  # (an integer beyond int64)
        raise ValueError(f"{name}: {str(value)[:60]} does not fit {dtype}") from None
    except TypeError:  # (None, a string, ...)
        raise ValueError(f"{name}: expected a number or a tensor of shape [{batch}], "
                         f"got {type(value).__name__}") from None
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected a tensor of shape [{batch}], got {tuple(t.shape)}")
    if (lo is not None or hi is not None) and not _TRUSTED_PARAMS.get():
        # (a number beyond float32 became inf here: rejected as not finite, and shown as given)
        _check_interval(t, name, lo, hi, lo_open, hi_open, given=None if isinstance(value, Tensor) else value)
    return t


class ParamRule(NamedTuple):
    """A per-row sampler parameter's dtype and interval (``row_param``'s arguments)."""

    dtype: torch.dtype
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False


_F32 = torch.float32
_I64 = torch.int64
_PROBABILITY = ParamRule(_F32, 0.0, 1.0)
_CUTOFF = ParamRule(_F32, 0.0, 1.0, hi_open=True)
_POSITIVE = ParamRule(_F32, 0.0, lo_open=True)
_NONNEG = ParamRule(_F32, 0.0)

#: Every per-row parameter of ``samplers.functional`` by name: the one place its interval is
#: written, read by the reference functions and by the kernel wrappers (``samplers.kernels.ops``)
#: through ``sampler_param``. (``SamplingParams`` checks the API's own forms, e.g. top_k = -1.)
PARAM_RULES: dict[str, ParamRule] = {
    "temperature": _NONNEG,
    "dynatemp_min": _NONNEG,
    "dynatemp_max": _NONNEG,
    "dynatemp_exponent": _POSITIVE,
    "smoothing_factor": ParamRule(_F32, 0.0, SMOOTHING_MAX),
    "smoothing_curve": ParamRule(_F32, 1.0, SMOOTHING_MAX),
    "top_k": ParamRule(_I64),
    "top_p": _POSITIVE,
    "top_a": _NONNEG,
    "min_p": _PROBABILITY,
    "tfs": _POSITIVE,
    "eta_cutoff": _CUTOFF,
    "epsilon_cutoff": _CUTOFF,
    "typical_p": _POSITIVE,
    "nsigma": _NONNEG,
    "xtc_threshold": _PROBABILITY,
    "xtc_probability": _PROBABILITY,
    "coin": _PROBABILITY,
    "repetition_penalty": _POSITIVE,
    "frequency_penalty": ParamRule(_F32, -2.0, 2.0),
    "presence_penalty": ParamRule(_F32, -2.0, 2.0),
    "no_repeat_ngram_size": ParamRule(_I64, 0),
    "dry_multiplier": _NONNEG,
    "dry_base": ParamRule(_F32, 1.0, lo_open=True),
    "dry_allowed_length": ParamRule(_I64, 1),
    "dry_range": ParamRule(_I64, 0),
    "skew": ParamRule(_F32, -SKEW_MAX, SKEW_MAX),
}


def sampler_param(value: ParamLike, logits: Tensor, name: str) -> Tensor:
    """``row_param`` of the parameter ``name`` with its rule from ``PARAM_RULES``."""
    rule = PARAM_RULES[name]
    return row_param(value, logits, rule.dtype, name, rule.lo, rule.hi, rule.lo_open, rule.hi_open)


_TRUSTED_PARAMS: contextvars.ContextVar[bool] = contextvars.ContextVar("samplers_trusted_params", default=False)


@contextlib.contextmanager
def trusted_params() -> Iterator[None]:
    """Within this context ``row_param`` skips its interval checks: the caller's parameters
    are known to be in range (``SamplerPipeline``: they come from validated
    ``SamplingParams``), and a check reads every parameter tensor (a device sync off the CPU)."""
    token = _TRUSTED_PARAMS.set(True)
    try:
        yield
    finally:
        _TRUSTED_PARAMS.reset(token)


def check_row_tensor(value: object, logits: Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a tensor ``[B]`` for the ``[B, V]``
    ``logits`` (where a number is not also taken: ``row_param`` takes both)."""
    if not isinstance(value, Tensor) or value.shape != logits.shape[:1]:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a tensor of shape [{logits.shape[0]}], got {got}")


def check_entries(logits: Tensor, sampler: str, rows: object, token_ids: object,
                  **values: object) -> None:
    """``ValueError`` naming ``sampler`` and the argument unless ``rows`` and ``token_ids`` are
    integer tensors ``[N]`` (and each of ``values`` a tensor ``[N]``) indexing the ``[B, V]``
    ``logits``: rows in ``[0, B)``, token ids in ``[0, V)``. Outside ``trusted_params()`` only:
    the range check reads the entries (a device sync off the CPU), and the pipeline's come
    from validated parameters."""
    tensors: dict[str, Tensor] = {}
    for name, t in {"rows": rows, "token_ids": token_ids, **values}.items():
        if not isinstance(t, Tensor) or t.dim() != 1:
            got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{sampler}: {name} must be a 1-D tensor, got {got}")
        if name in ("rows", "token_ids") and not is_integer_dtype(t.dtype):
            raise ValueError(f"{sampler}: {name} must be an integer tensor, got {t.dtype}")
        tensors[name] = t
    lengths = [t.numel() for t in tensors.values()]
    if len(set(lengths)) > 1:
        raise ValueError(f"{sampler}: {', '.join(tensors)} must have one length, got {lengths}")
    if _TRUSTED_PARAMS.get() or lengths[0] == 0:
        return
    for name, limit in (("rows", logits.shape[0]), ("token_ids", logits.shape[1])):
        lo, hi = (int(v) for v in torch.aminmax(tensors[name]))
        if lo < 0 or hi >= limit:
            raise ValueError(f"{sampler}: {name} must be in [0, {limit}), got {lo if lo < 0 else hi}")


def _check_interval(t: Tensor, name: str, lo: Optional[float], hi: Optional[float],
                    lo_open: bool, hi_open: bool, given: object = None) -> None:
    # (on the CPU in numpy: a fraction of torch's per-op cost on [B] values; two comparisons
    # also reject NaN, which fails both, and +-inf, which fails the unbounded side's)
    x = t.numpy() if t.device.type == "cpu" and not t.requires_grad else t
    above = x > -math.inf if lo is None else (x > lo if lo_open else x >= lo)
    below = x < math.inf if hi is None else (x < hi if hi_open else x <= hi)
    ok = above & below
    if not bool(ok.all()):
        bad = x[~ok][0].item() if given is None else given
        raise ValueError(f"{name} must be in {format_interval(lo, hi, lo_open, hi_open)}, got {bad!r}")


def format_interval(lo: Optional[float], hi: Optional[float], lo_open: bool = False, hi_open: bool = False) -> str:
    """An interval as the error messages write it: ``[0, 1)``, ``(0, inf)``; None: unbounded."""
    left = "-inf" if lo is None else f"{lo:g}"
    right = "inf" if hi is None else f"{hi:g}"
    return f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"


def upcast(logits: Tensor) -> Tensor:
    """The logits as contiguous fp32 rows (the input itself when it is that already: callers
    never write to it). Contiguous because a row's sum depends on the layout: torch adds a
    strided row's terms in another order, so a sampler summing a transposed tensor's rows
    would round its statistics differently from the same rows stored contiguously."""
    if logits.dtype == torch.float32:
        return logits.contiguous()
    return logits.to(torch.float32, memory_format=torch.contiguous_format)


def row_sum(x: Tensor, sparse: Optional["SparseRows"] = None) -> Tensor:
    """``x.sum(dim=-1, keepdim=True)``, a row's the same alone or in a batch at any thread count
    (``batched_row_sum``); for packed rows (``sparse``, see ``SparseRows``) the sum of the full
    rows they stand for (``x``'s entries at their columns, 0 elsewhere)."""
    return batched_row_sum(x) if sparse is None else sparse.row_sum(x)


# (the second value's type follows ``with_log``, for type checkers)
@overload
def softmax_and_log_softmax(l32: Tensor, with_log: Literal[True] = ...,
                            sparse: Optional["SparseRows"] = ...) -> tuple[Tensor, Tensor]: ...


@overload
def softmax_and_log_softmax(l32: Tensor, with_log: Literal[False],
                            sparse: Optional["SparseRows"] = ...) -> tuple[Tensor, None]: ...


@overload
def softmax_and_log_softmax(l32: Tensor, with_log: bool,
                            sparse: Optional["SparseRows"] = ...) -> tuple[Tensor, Optional[Tensor]]: ...


def softmax_and_log_softmax(l32: Tensor, with_log: bool = True,
                            sparse: Optional["SparseRows"] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Row-wise ``p = softmax(l)`` and ``log p`` in fp32.

    ``-inf`` logits get ``p = 0`` and ``log p = -inf``. A row whose logits are all ``-inf``
    gets ``p = 0`` everywhere and ``log p = -inf`` everywhere (no NaN). With
    ``with_log=False`` the second value is ``None`` (one full pass saved). ``sparse``: ``l32``
    are the packed rows of that ``SparseRows`` (the denominators are then summed as over the
    full rows). Without it, rows that are mostly ``-inf`` are packed here (``compact_rows``)
    and the results expanded: the same values, without full-width ``exp`` / ``log`` passes
    over removed tokens.
    """
    if sparse is None:
        packed = compact_rows(l32)
        if packed is not None:
            p, logp = softmax_and_log_softmax(packed.logits, with_log, packed)
            return packed.expand(p, fill=0.0), (None if logp is None else packed.expand(logp))
    if not with_log:
        e, s = softmax_terms(l32, sparse)
        return e.div_(s), None
    z = l32 - _finite_row_max(l32)
    e = exp_of(z)
    s = _denominator(e, sparse)
    # In place on temporaries: the same values as ``e / s`` and ``z - log(s)``.
    return e.div_(s), z.sub_(torch.log(s))


def softmax_terms(l32: Tensor, sparse: Optional["SparseRows"] = None) -> tuple[Tensor, Tensor]:
    """``softmax(l32) = e / s`` as its terms: ``e = exp(l - max(l))`` (``[B, V]``, a new
    tensor) and ``s`` (``[B, 1]``) the row sum of ``e`` (1 for a row of zeros); a row whose
    max is not finite is shifted by 0. ``sparse``: as in ``softmax_and_log_softmax`` (no
    packing is done here). A caller that needs a few probabilities divides those alone:
    the values of ``softmax_and_log_softmax``'s (an IEEE division either way)."""
    e = exp_(l32 - _finite_row_max(l32))
    return e, _denominator(e, sparse)


def _finite_row_max(l32: Tensor) -> Tensor:
    m = l32.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _denominator(e: Tensor, sparse: Optional["SparseRows"]) -> Tensor:
    s = row_sum(e, sparse)
    return torch.where(s > 0, s, torch.ones_like(s))


#: ``exp`` of fp32 values below this is subnormal or 0; torch's CPU kernel takes a slow
#: path (tens of times slower) for such inputs, ``-inf`` included.
_EXP_NORMAL_MIN = -87.0
#: ``exp`` of fp32 values below this is exactly 0 (well below ``log(2**-150)``).
_EXP_ZERO_BELOW = -110.0
#: Up to this many entries ``z.exp_()`` itself is the faster, whatever the share of slow
#: inputs (measured with one thread: 23 us against 25 at 8192 entries all ``-inf``, 3 against
#: 16 at 2048 mostly finite, as packed rows are): the fast route's own calls cost more.
_EXP_PLAIN_MAX = 8192
#: ``exp_`` takes its masked route when at least this share of the entries is below
#: ``_EXP_NORMAL_MIN``. torch's kernel falls back to scalar code for a whole vector of 8 when
#: one lane is slow, so the cost of the plain call grows with the share; measured at
#: [64, 32000], one thread, against the masked route: -inf scattered 20%: 4.5 ms against 7.5
#: (plain), 90%: 6.2 against 5.0; -inf in one block per row, 30%: 2.3 against 2.5, 50%: 3.1
#: against 2.7; -200 scattered 20%: 6.8 against 7.5, 50%: 14.2 against 10.2.
_EXP_MASKED_SHARE = 0.3


def exp_(z: Tensor) -> Tensor:
    """``z.exp_()`` with the same values, faster on the CPU when many entries of ``z`` are far
    below 0 (removed tokens, ``-inf``; a low temperature's tail): see ``exp_of``."""
    return _exp(z, in_place=True)


def exp_of(z: Tensor) -> Tensor:
    """``torch.exp(z)`` (a new tensor) with the same values, faster on the CPU when many
    entries are far below 0: those are computed as ``exp(max(z, -87))`` and then set to 0,
    except the few in ``(-110, -87)`` (subnormal results), which are computed exactly on
    their own. Whether they are many is judged from every 61st entry (``_EXP_MASKED_SHARE``;
    a count of them all would be a pass more). (A NaN entry stays NaN either way.) The
    entries to zero are a boolean mask, not a float32 one to multiply by: a second [B, V]
    float32 temporary made glibc fault ~4000 pages a call at [64, 32000] (10.7 against 2.4 ms
    on rows half removed)."""
    return _exp(z, in_place=False)


def _exp(z: Tensor, in_place: bool) -> Tensor:
    if (z.device.type != "cpu" or z.dtype != torch.float32 or z.numel() <= _EXP_PLAIN_MAX
            or not z.is_contiguous()):
        return z.exp_() if in_place else torch.exp(z)
    zn = z.view(-1).numpy()
    sample = zn[::61]
    if np.count_nonzero(sample < _EXP_NORMAL_MIN) < _EXP_MASKED_SHARE * sample.size:
        return z.exp_() if in_place else torch.exp(z)
    low = zn < _EXP_NORMAL_MIN
    band = np.flatnonzero(low & (zn > _EXP_ZERO_BELOW))
    exact = torch.exp(torch.from_numpy(zn[band])).numpy() if band.size else None
    out = z.clamp_min_(_EXP_NORMAL_MIN) if in_place else torch.clamp_min(z, _EXP_NORMAL_MIN)
    out.exp_()
    on = out.view(-1).numpy()
    np.copyto(on, np.float32(0.0), where=low)
    if exact is not None:
        on[band] = exact
    return out


def entropy(p: Tensor, logp: Tensor, overwrite_logp: bool = False,
            sparse: Optional["SparseRows"] = None) -> Tensor:
    """``H = -sum(p * log p)`` per row (natural log), with ``0 * log 0 = 0``. Shape ``[B]``.

    ``p * log p`` is NaN exactly where ``p = 0`` and ``log p = -inf`` (and ``-0.0`` or ``0``
    where ``p`` underflowed to 0 with a finite ``log p``): replacing NaN by 0 gives the same
    sum as masking ``p > 0`` (signed zeros do not change a sum), without a ``where`` pass.
    With ``overwrite_logp`` the products are formed in ``logp``'s buffer (same values).
    ``sparse``: packed rows, summed as the full rows (see ``row_sum``).
    """
    terms = logp.mul_(p) if overwrite_logp else p * logp
    terms = terms.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return -row_sum(terms, sparse)[:, 0]


def entropy_of_logits(l32: Tensor, sparse: Optional["SparseRows"] = None,
                      overwrite: bool = False, row_max: Optional[Tensor] = None,
                      row_min: Optional[Tensor] = None, removed: Optional[Tensor] = None) -> Tensor:
    """``H = -sum(p * log p)`` of ``p = softmax(l32)`` per row (natural log, ``0 log 0 = 0``),
    ``[B]`` fp32, without forming ``p`` and ``log p``: with ``m`` the row max, ``z = l - m``,
    ``e = exp(z)`` and ``S = sum(e)``, ``-log p = log S - z``, so
    ``H = log S - sum(e * z) / S`` (one ``exp`` pass and no division over the row). Both
    terms are ``>= 0`` (``S >= 1``, ``z <= 0``): no cancellation. The same quantity as
    ``entropy(*softmax_and_log_softmax(l32))``, rounded differently (within a few ulps).

    Removed tokens (``-inf``, ``e = 0``) add nothing; a row of ``-inf`` only has ``H = 0``.
    ``sparse``: ``l32`` are packed rows, summed as the full rows (``row_sum``). With
    ``overwrite`` ``l32`` (a temporary of the caller's) holds ``z`` afterwards (0 at
    ``removed``): one [B, V] buffer fewer (fresh buffers cost page faults on the CPU, ~1 ms
    per 4 MB measured).
    ``row_max``: ``l32.amax(dim=-1)`` (``[B]``) when the caller has it; ``row_min``,
    ``l32.amin(dim=-1)``, too: when it shows no ``z`` in ``exp``'s slow range (``min z =
    min l - m``: rounding is monotonic), ``exp`` runs at once, without ``exp_of``'s look.
    ``removed``: the flat indices of ``l32``'s ``-inf`` entries when no entry is NaN or
    ``+inf`` (full rows only): their ``z`` and ``e`` are set to 0, which makes their terms 0
    as the general path's NaN clean-up does, so ``e * z`` has no NaN to clear (unless
    ``l - m`` overflows) and no second sum.
    """
    m = l32.amax(dim=-1, keepdim=True) if row_max is None else row_max[:, None]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = l32.sub_(m) if overwrite else l32 - m
    cpu = z.device.type == "cpu"
    zeroed = removed is not None and sparse is None
    if zeroed:
        z.view(-1)[removed] = 0.0
        row_min = None
    z_min = None if row_min is None or not row_min.numel() else (row_min[:, None] - m).amin()
    if cpu and z_min is not None and not bool(z_min < _EXP_NORMAL_MIN):
        e = torch.exp(z)  # (NaN in z: z_min is NaN, as z.amin() is; exp keeps it NaN)
    else:
        e = exp_of(z)
    if zeroed:
        e.view(-1)[removed] = 0.0
    s = row_sum(e, sparse)
    # e * z; NaN only for 0 * -inf (a removed token, or l - m past float32's range), which
    # adds nothing (the removed tokens' terms are already 0 * 0 when ``removed`` is given)
    terms = e.mul_(z)
    if not cpu:
        ez = row_sum(terms.nan_to_num_(nan=0.0), sparse)  # (no host read of the sums: no sync)
    else:
        ez = row_sum(terms, sparse)
        if bool(torch.isnan(ez).any()):  # a row with a removed token: zero its terms and sum again
            ez = row_sum(terms.nan_to_num_(nan=0.0), sparse)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.log(s) - ez / s)[:, 0]


def is_finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` for float tensors, as ``-inf < x < inf`` (same values, NaN
    included; vectorised comparisons instead of ``isfinite``'s slower CPU kernel)."""
    if _numpy_ok(x):
        return torch.from_numpy(np.isfinite(x.numpy()))
    finite = x > float("-inf")
    return finite.logical_and_(x < float("inf"))


#: ``pow_per_entry`` calls torch's CPU ``pow`` on at most this many entries at a time: below
#: torch's grain size (32768), so on one thread.
_POW_CHUNK = 16384
#: ``pow_per_entry`` pads each call to a multiple of this many entries: a whole number of
#: torch's vector-loop steps (two vectors: 32 float32 lanes with AVX-512, 16 with AVX2).
_POW_ALIGN = 64


def pow_per_entry(base: Tensor, exponent: Tensor) -> Tensor:
    """``torch.pow(base, exponent)`` of float32 tensors (broadcast together), each entry's value
    a function of its own two operands only.

    torch's CPU loops compute the last ``n mod (2 * vector width)`` entries of a loop (a
    call's, or a thread's share of one) with the scalar ``pow``, which differs from the vector
    ``pow`` in the last place for ~1% of operands (``exp``, ``log``, ``log1p`` and ``expm1``
    agree): a DRY penalty or a dynamic temperature would then depend on where the batch put
    its row. Here, on the CPU, every entry is computed in a vector lane: the operands are
    flattened, padded with ones to a multiple of ``_POW_ALIGN`` and raised ``_POW_CHUNK``
    entries at a time (one thread, no tail). Elsewhere: ``torch.pow``, whose entries do not
    depend on their position."""
    base, exponent = torch.broadcast_tensors(base, exponent)
    if base.device.type != "cpu" or base.numel() == 0:
        return torch.pow(base, exponent)
    n = base.numel()
    padded = -(-n // _POW_ALIGN) * _POW_ALIGN
    b = torch.ones(padded, dtype=torch.float32)
    e = torch.ones(padded, dtype=torch.float32)
    b[:n] = base.reshape(-1)
    e[:n] = exponent.reshape(-1)
    for start in range(0, padded, _POW_CHUNK):  # (chunks of 16384 entries, not rows)
        stop = min(start + _POW_CHUNK, padded)
        torch.pow(b[start:stop], e[start:stop], out=b[start:stop])
    return b[:n].view(base.shape)


def count_true(mask: Tensor) -> Tensor:
    """``mask.sum(dim=-1)`` (int64 ``[B]``) for a bool ``[B, V]`` mask. On the CPU through numpy
    (bytes summed into uint32): torch sums a bool tensor by first converting it to int64,
    ~30x slower at [64, 32000]."""
    if _numpy_ok(mask) and mask.dtype == torch.bool and mask.dim() == 2:
        counts = mask.numpy().view(np.uint8).sum(axis=-1, dtype=np.uint32)
        return torch.from_numpy(counts.astype(np.int64))
    return mask.sum(dim=-1)


def _numpy_ok(*tensors: Tensor) -> bool:
    """True when every tensor is a contiguous float32 / bool CPU tensor without autograd:
    then numpy's elementwise comparisons and bool -> float conversions, several times
    faster than torch's boolean CPU kernels (measured ~5x at [64, 32000]), give the same
    values."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bool) and t.is_contiguous()
               and not t.requires_grad for t in tensors)


def top_token_mask(l32: Tensor, row_max: Optional[Tensor] = None) -> Tensor:
    """Boolean ``[B, V]``: the row's most likely token(s), i.e. finite logits equal to the row max.

    Tokens tied at the maximum are all marked, so the kept set never depends on token ids.
    ``row_max`` (``[B, 1]``, ``l32.amax(-1, keepdim=True)``) may be passed when already known.
    """
    m = l32.amax(dim=-1, keepdim=True) if row_max is None else row_max
    # l == m and l > -inf  <=>  l == m', with m' = m where m > -inf, else NaN (equal to nothing):
    # one [B, V] comparison.
    m = torch.where(m > float("-inf"), m, torch.full_like(m, float("nan")))
    if _numpy_ok(l32, m):
        return torch.from_numpy(np.equal(l32.numpy(), m.numpy()))
    return l32 == m


def exclusive_cumsum(x: Tensor) -> Tensor:
    """``out[:, i] = x[:, 0] + ... + x[:, i-1]`` (``out[:, 0] = 0``), same shape as ``x``."""
    c = torch.cumsum(x, dim=-1)
    return torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=-1)


def prefix_boundary(sorted_vals: Tensor, n_kept: Tensor) -> Tensor:
    """Value ``sorted_vals[row, n_kept - 1]`` as ``[B, 1]`` (``n_kept`` clamped to ``[1, V]``).

    Used to turn "the first ``n_kept`` positions of a sorted order are kept" into a
    threshold on the sort key, so that every token tied with the last kept one is kept too
    (results then do not depend on sort stability).
    """
    idx = n_kept.clamp(1, sorted_vals.shape[-1]) - 1
    return sorted_vals.gather(-1, idx.to(torch.int64)[:, None])


def select_rows(enabled: Tensor, out: Tensor, logits: Tensor) -> Tensor:
    """``out`` on enabled rows, the untouched input (bit-identical) on the others.

    ``out`` must be a fresh tensor of the caller's (it may be written in place). On the CPU,
    where reading ``enabled`` costs no device sync, only the disabled rows are copied
    (nothing when every row is enabled) instead of a full ``where`` pass.
    """
    if out.device.type == "cpu" and out.dtype == logits.dtype and out.shape == logits.shape:
        if enabled.numpy().all():  # (numpy's all: a fraction of torch's call cost)
            return out
        off = (~enabled).nonzero().squeeze(1)
        return out.index_copy_(0, off, logits.index_select(0, off))
    return torch.where(enabled[:, None], out, logits)


def fill_removed(logits: Tensor, keep: Tensor, scratch: Optional[Tensor] = None) -> Tensor:
    """``logits.masked_fill(~keep, -inf)`` (a new tensor), computed as
    ``minimum(logits, +inf where keep else -inf)``: bit-identical for every kept entry
    (``min(x, +inf) = x``) and ``-inf`` for the others, with vectorised float passes
    instead of a boolean-masked one (several times faster on the CPU).

    ``scratch``: an optional temporary of the caller's, used as the output buffer when it
    has the logits' dtype and shape (saves an allocation). Rows that are mostly ``-inf``
    already are packed first (``compact_rows``): removed tokens stay ``-inf`` whatever
    ``keep`` says, so only the others are decided."""
    if keep.dtype == torch.bool:
        sparse = compact_rows(logits)
        if sparse is not None:
            return sparse.expand(fill_removed(sparse.logits, sparse.pack_mask(keep)))
    if scratch is not None and scratch.dtype == logits.dtype and scratch.shape == logits.shape:
        cap = scratch
    else:
        cap = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if _numpy_ok(cap, keep):
        np.copyto(cap.numpy(), keep.numpy())
    else:
        cap.copy_(keep)
    cap.sub_(0.5).mul_(float("inf"))  # 1 -> +inf, 0 -> -inf
    return torch.minimum(logits, cap, out=cap)


def keep_at_least(logits: Tensor, values: Tensor, threshold: Tensor, values_is_scratch: bool = False,
                  values_not_negative_zero: bool = False) -> Tensor:
    """``logits`` where ``values >= threshold[:, None]``, ``-inf`` elsewhere (a new tensor).

    ``values``: fp32 ``[B, V]`` (probabilities or the logits themselves); ``threshold``: fp32
    ``[B]`` (``-inf`` keeps the whole row, bit-identical). Computed without a boolean mask:
    ``d = values - threshold`` is ``>= +0.0`` exactly when the value is kept (IEEE
    subtraction of two different floats is never 0; equal ones give ``+0.0``, or ``-0.0``
    for ``-0.0 - +0.0``, which adding ``+0.0`` turns into ``+0.0``), so
    ``copysign(inf, d)`` is ``+inf`` on kept entries and ``-inf`` on the others, and
    ``minimum(logits, that)`` gives the result (kept entries bit-identical). Where ``d`` is
    NaN (``-inf - -inf``) the logit is ``-inf`` and stays ``-inf`` whatever the sign.
    With ``values_is_scratch`` ``values`` is overwritten (one allocation saved).
    ``values_not_negative_zero`` (e.g. probabilities, which are ``>= +0.0``) skips the
    ``-0.0`` fix-up pass, which cannot matter then.
    """
    t = threshold.to(torch.float32)[:, None]
    d = values.sub_(t) if values_is_scratch else values - t
    if not values_not_negative_zero:
        d.add_(0.0)  # -0.0 (from -0.0 - +0.0: equal values) -> +0.0; nonzero d unchanged
    torch.copysign(torch.tensor(float("inf"), device=d.device), d, out=d)
    if d.dtype != logits.dtype:
        d = d.to(logits.dtype)
    return torch.minimum(logits, d, out=d)


def keep_logits_at_least(logits: Tensor, l32: Tensor, threshold: Tensor,
                         scratch: Optional[Tensor] = None, finite: bool = False,
                         not_packable: bool = False) -> Tensor:
    """``logits`` where ``l32 >= threshold[:, None]``, ``-inf`` elsewhere (a new tensor): the
    values of ``keep_at_least(logits, l32, threshold)`` (``l32``: the logits in fp32;
    ``threshold``: fp32 ``[B]``, ``-inf`` keeps the row bit-identical; NaN stays NaN).

    On the CPU, float32 logits with thresholds below ``+inf`` whose rows are not mostly
    ``-inf`` go by the sign of ``l - t`` (``_keep_by_sign``: vectorised float and integer
    passes, no boolean mask; at [64, 32000] with one thread measured 0.54 ms, ~0.3 ms with
    ``finite``, against 0.71 ms for the next route). Otherwise the comparison is numpy's (no
    ``-0.0`` fix-up needed: ``-0.0 >= +0.0``) and ``fill_removed`` applies it; off the CPU
    ``keep_at_least``. ``scratch``: a temporary of the caller's that may become the output
    (see ``fill_removed``). ``finite``: the caller knows no entry of ``l32`` is NaN or ``+inf``
    (``-inf`` may be; one pass fewer, see ``_keep_by_sign``); ``not_packable``: it has just seen
    ``compact_rows(l32)`` return None (no second look)."""
    t = threshold.to(torch.float32)[:, None].contiguous()
    if _numpy_ok(l32, t):
        # (rows that fill_removed would pack go its way: the same NaN bits as before, which
        # depend on where in a vector an entry sits)
        if logits is l32 and bool((t < float("inf")).all()) and (not_packable or compact_rows(l32) is None):
            return _keep_by_sign(l32, t, scratch, finite)  # (a NaN threshold fails the test too)
        return fill_removed(logits, torch.from_numpy(np.greater_equal(l32.numpy(), t.numpy())), scratch)
    return keep_at_least(logits, l32, threshold)


def _keep_by_sign(l32: Tensor, t: Tensor, scratch: Optional[Tensor] = None, finite: bool = False) -> Tensor:
    """``l32`` where ``l32 >= t``, ``-inf`` elsewhere, for contiguous float32 CPU ``l32``
    (``[B, V]``) and ``t`` (``[B, 1]``, each ``< +inf``), in a new tensor (``scratch``'s buffer
    when it fits).

    ``d = l - t`` is ``>= +0.0`` exactly where ``l >= t`` once a zero threshold is taken as
    ``-0.0``: ``l - (-0.0) = l + 0.0`` is ``+0.0`` for ``l = +-0.0``; other equal values give
    ``+0.0`` and different ones a nonzero difference of the right sign (``+-inf`` on
    overflow). ``d``'s sign bit set into the bits of ``+inf`` makes a cap, ``+inf`` where
    kept and ``-inf`` elsewhere, and ``minimum(l, cap)`` is ``l`` (its bits) or ``-inf``
    (``keep_at_least``'s last step). ``l = -inf``: ``-inf`` whatever ``d`` is (NaN when
    ``t = -inf``); ``l = +inf``: ``d = +inf``, kept; ``l = NaN``: ``minimum`` gives NaN.

    ``finite`` (no ``l`` is NaN or ``+inf``): the cap is ``d * inf`` instead (``+inf``,
    ``-inf``, or NaN for ``d = +-0.0``, i.e. ``l = t``, kept; ``t = -inf``: NaN, kept;
    ``l = -inf``: ``-inf``, or NaN when ``t = -inf``, and ``-inf`` either way) and numpy's
    ``fmin``, which returns ``l`` against NaN, applies it: no bit operations, no zero fix-up,
    two passes instead of four. (A NaN ``l`` would come out as the cap there.)"""
    if scratch is not None and scratch.dtype == torch.float32 and scratch.shape == l32.shape \
            and scratch.is_contiguous():
        out = scratch
    else:
        out = torch.empty(l32.shape, dtype=torch.float32)
    if finite:
        # (l - t) * inf in one pass: lerp(l, t, w) = l + w (t - l), or t - (t - l)(1 - w) as
        # torch computes it for |w| >= 1/2; with w = -inf either is +-inf by the sign of
        # l - t (an exact sign, overflow included) and NaN for l = t
        torch.lerp(l32, t.expand(l32.shape), float("-inf"), out=out)
        np.fmin(l32.numpy(), out.numpy(), out=out.numpy())
        return out
    t = torch.where(t == 0, torch.full_like(t, -0.0), t)
    torch.sub(l32, t, out=out)
    out.view(torch.int32).bitwise_and_(-(2**31)).bitwise_or_(0x7F800000)  # sign bit | +inf
    return torch.minimum(l32, out, out=out)


def apply_keep(logits: Tensor, l32: Tensor, keep: Tensor, enabled: Tensor,
               keeps_top: bool = False, row_max: Optional[Tensor] = None,
               scratch: Optional[Tensor] = None) -> Tensor:
    """Finish a truncation sampler.

    Tokens outside ``keep`` become ``-inf``; the row's top token(s) are always kept (so a
    row never loses every token); kept tokens keep their exact input value and dtype; rows
    with ``enabled`` False are returned bit-identical (every entry of theirs is kept).
    ``keeps_top=True`` tells that ``keep`` already contains the top token(s);
    ``row_max`` is ``l32.amax(-1, keepdim=True)`` when the caller has it. ``keep`` must be
    the caller's temporary (it is updated in place); so must ``scratch`` (see
    ``fill_removed``).
    """
    if l32 is logits and keep.dtype == torch.bool:
        sparse = compact_rows(logits)
        if sparse is not None:
            # Removed tokens stay -inf whatever ``keep`` says: decide only the others.
            out = apply_keep(sparse.logits, sparse.logits, sparse.pack_mask(keep), enabled, keeps_top,
                             row_max)
            return sparse.expand(out)
    if not keeps_top:
        keep.logical_or_(top_token_mask(l32, row_max))
    keep.logical_or_(~enabled[:, None])
    return fill_removed(logits, keep, scratch)


#: The bit pattern of +inf in each 16-bit float dtype, sign bit cleared.
_INF_BITS_16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def cast_saturating(out32: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast fp32 values to ``dtype``; finite values beyond the dtype's range saturate at its
    largest finite magnitude instead of overflowing to ``+-inf`` (``-inf`` stays ``-inf``)."""
    if dtype == torch.float32 and out32.dtype == torch.float32:
        return out32  # every finite fp32 value is in range; infinities stay as they are
    if torch.finfo(dtype).max >= torch.finfo(out32.dtype).max:
        return out32.to(dtype)  # a wider dtype (float64) holds every value
    if dtype in _INF_BITS_16 and _numpy_ok(out32):
        # The plain cast is the saturating one unless it overflowed, which only turns finite
        # values into infinities: equal counts of infinities before and after prove it did
        # not (numpy on the bits: ~0.5 ms at [64, 32000] where torch's isfinite, clamp and
        # where take 4-13 ms).
        out = out32.to(dtype)
        bits = out.view(torch.int16).numpy()
        inf_after = np.count_nonzero((bits & 0x7FFF) == _INF_BITS_16[dtype])
        if inf_after == np.count_nonzero(np.isinf(out32.numpy())):
            return out
    fmax = torch.finfo(dtype).max
    out = torch.where(torch.isfinite(out32), out32.clamp(-fmax, fmax), out32)
    return out.to(dtype)


#: Rows are compacted (``compact_rows``) only when the widest row keeps at most
#: ``1 / _SPARSE_FRACTION`` of its columns: below that the compaction's passes cost more
#: than they save.
_SPARSE_FRACTION = 8
#: ... and only from this row width on (smaller rows are cheap either way).
_SPARSE_MIN_VOCAB = 1024


class SparseRows:
    """The entries of a ``[B, V]`` float32 CPU tensor that are not ``-inf``, packed to the left
    of a ``[B, K]`` tensor (``K`` = the most such entries in a row, plus ``pad``), padded with
    ``-inf``, each row's entries in column order. (A layout taken over from a previous
    sampler's packed rows, see ``note_live_hint``, may also hold some ``-inf`` entries among
    them, and be wider: removed tokens, as the full rows have.)

    Every sampler that compacts is a row-wise function of the multiset of a row's values
    (nothing depends on token ids, ``-inf`` entries are removed tokens that stay ``-inf``),
    so running it on ``logits`` gives the result of the full rows, which ``expand`` puts
    back. Bit for bit: elementwise operations see the same values, ``max`` / ``min`` /
    counts / prefix sums of sorted rows do not depend on the removed tokens, and every
    other row sum goes through ``row_sum``, which gives the full-width row's sum (zeros at the
    removed tokens), because torch groups a sum's terms by their positions in the row
    (``sum_scattered``: the entries folded in torch's tree, or the full rows summed).
    """

    __slots__ = ("logits", "_flat", "_pos", "_shape")

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, V)`` of the full rows."""
        return self._shape

    def pack_mask(self, mask: Tensor) -> Tensor:
        """A ``[B, V]`` bool tensor's entries at the packed positions, as ``[B, K]`` (False
        in the padding)."""
        out = np.zeros(self.logits.numel(), dtype=np.bool_)
        out[self._pos] = mask.contiguous().numpy().reshape(-1)[self._flat]
        return torch.from_numpy(out).view(self.logits.shape)

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """The packed entries as the full rows hold them: their flat indices in ``[B * V]``
        (increasing: row by row, each row's in column order) and their values (float32; a
        layout taken over from a previous sampler may include some ``-inf`` ones)."""
        return self._flat, self.packed_values(self.logits)

    def row_sum(self, packed: Tensor) -> Tensor:
        """``[B, 1]``: the sums of the full rows whose entries are ``packed``'s (``[B, K]``
        float32, a function of ``logits`` entry by entry) at their columns and 0 elsewhere."""
        return sum_scattered(self.packed_values(packed), self._flat, self._shape)

    def __init__(self, logits: Tensor, flat: np.ndarray, pos: np.ndarray, shape: tuple[int, int]) -> None:
        self.logits = logits
        self._flat = flat  # flat index in [B * V] of each packed entry (row-major)
        self._pos = pos  # its flat index in [B * K]
        self._shape = shape

    def expand(self, packed: Tensor, fill: float = float("-inf")) -> Tensor:
        """``[B, V]`` float32: ``packed``'s entries (``[B, K]``, float32, e.g. a sampler's
        output on ``logits``) back at their columns, ``fill`` everywhere else."""
        out = np.full(self._shape[0] * self._shape[1], fill, dtype=np.float32)
        out[self._flat] = self.packed_values(packed)
        return torch.from_numpy(out).view(self._shape)

    def expand_truncated(self, packed: Tensor) -> Tensor:
        """``expand(packed)`` for a truncation sampler's packed output, whose entries that are
        not ``-inf`` all sit at packed positions: also notes this layout as a hint for the
        next ``compact_rows`` (the next sampler of a chain), which then packs the result into
        the same positions instead of searching the ``[B, V]`` rows (see ``_live_hint``)."""
        chain = _CHAIN.get()
        if chain is not None and chain.keeps_packed:
            return chain.adopt(self, packed)
        return self.expand_and_note(packed)

    def expand_and_note(self, packed: Tensor) -> Tensor:
        """``expand(packed)``, noted as the next ``compact_rows``'s layout (``note_live_hint``
        with the result: taken without a pass over the rows while it is unwritten)."""
        out = self.expand(packed)
        note_live_hint(self._shape, self._flat, self._pos, packed.shape[1], tensor=out)
        return out

    @staticmethod
    def holding(values: np.ndarray, flat: np.ndarray, pos: np.ndarray, shape: tuple[int, int],
                width: int) -> "SparseRows":
        """The layout ``(flat, pos)`` in rows of ``width`` columns holding ``values`` (in
        ``flat``'s order) at its positions and ``-inf`` everywhere else."""
        packed = np.full(shape[0] * width, -np.inf, dtype=np.float32)
        packed[pos] = values
        return SparseRows(torch.from_numpy(packed).view(shape[0], width), flat, pos, shape)

    def packed_values(self, packed: Tensor) -> np.ndarray:
        """``packed``'s entries (``[B, K]`` float32, this layout) at the packed positions,
        in ``flat``'s order."""
        return packed.contiguous().numpy().reshape(-1)[self._pos]

    def with_pad(self, pad: int, min_width: int) -> "SparseRows":
        """This layout if it has ``pad`` free columns after every row's entries (only
        ``pad = 0`` is known to) and at least ``min_width`` columns; else the rows packed
        again from their entries that are not ``-inf``, with that padding."""
        if pad == 0 and self.logits.shape[1] >= min_width:
            return self
        values = self.packed_values(self.logits)
        live = np.flatnonzero(values != -np.inf)  # (indices: several times faster than a boolean mask)
        return pack_entries(self._flat[live], values[live], self._shape, pad, min_width, force=True)


def note_live_hint(shape: tuple[int, int], flat: np.ndarray, pos: Optional[np.ndarray] = None,
                   width: int = 0, tensor: Optional[Tensor] = None) -> None:
    """Note, for this thread's next ``compact_rows``, that the ``shape`` rows it will likely
    be given have every entry that is not ``-inf`` among the flat indices ``flat``
    (increasing), which ``pos`` (when given) places in rows of ``width`` columns like
    ``SparseRows``. A hint only: ``compact_rows`` checks it before using it.

    ``tensor``: the tensor the hint describes, when the caller made it (its entries outside
    ``flat`` are ``-inf`` by construction). If ``compact_rows`` is given that very tensor,
    unwritten since (its version counter, which every in-place write and every write
    through a view bumps, is unchanged), the hint holds without a pass over the rows. An
    inference tensor has no version counter: it is taken by identity inside the
    ``library_call`` block in which the hint was noted, and not at all outside it."""
    made = None if tensor is None else (weakref.ref(tensor), _version_of(tensor), _CALL.get())
    _scratch.live_hint = (shape, flat, pos, width, made)


_CALL: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("samplers_library_call", default=None)


@contextlib.contextmanager
def library_call() -> Iterator[None]:
    """A block in which only the library's own code touches the tensors it makes (one
    ``SamplerPipeline.sample`` call: the caller gets them once it is over). There a tensor
    the library made is known by identity, version counter or not: the library writes its
    own rows in place only to change or remove kept entries, never to bring back a removed
    one (``rescue_empty_rows`` makes a new tensor), which is all that ``note_live_hint``'s
    hint relies on."""
    token = _CALL.set(object())  # (a new object per block: a hint from an earlier block is not this one's)
    try:
        yield
    finally:
        _CALL.reset(token)


def _version_of(t: Tensor) -> Optional[int]:
    """``t``'s version counter; None for inference-mode tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return None


_scratch = threading.local()


def sum_scattered(values: np.ndarray, flat: np.ndarray, shape: tuple[int, int]) -> Tensor:
    """``[B, 1]`` float32: the row sums of the ``shape`` float32 array that is 0 everywhere
    except ``values`` at the flat indices ``flat``, summed by torch over the full rows (the
    same grouping of terms, so the same result, as summing that array itself with
    ``row_sum``).

    Few entries in large rows are folded in torch's own order without the zeros
    (``_rowsum.SumTree``, checked against torch once per width and thread count). Otherwise the
    zeros come from a per-thread scratch buffer that stays allocated and zero between
    calls (the written entries are zeroed again): a fresh [B, V] array per sum costs more in
    page faults than the sum itself.

    The last few sums are remembered with their entries (bits) and torch's thread count (for
    which the tree was checked): samplers of a chain that removed nothing in
    between sum the same softmax terms again (eta, epsilon and typical_p each sum the same
    ``exp``), and an equal sum is returned without the full-width pass."""
    key = (shape, torch.get_num_threads())
    bits = values.view(np.int32)
    memo = getattr(_scratch, "sums", None)
    if memo is None:
        memo = _scratch.sums = []
    for m_key, m_flat, m_bits, m_sum in memo:
        if m_key == key and np.array_equal(m_bits, bits) and np.array_equal(m_flat, flat):
            return m_sum.clone()
    n = shape[0] * shape[1]
    tree = _sum_tree(flat, shape) if np.isfinite(values).all() else None
    if tree is not None:
        out = torch.from_numpy(tree(values))[:, None]
    else:
        buf = getattr(_scratch, "zeros", None)
        if buf is None or buf.size < n:
            buf = _scratch.zeros = np.zeros(n, dtype=np.float32)
        view = buf[:n]
        view[flat] = values
        try:
            out = batched_row_sum(torch.from_numpy(view).view(shape))
        finally:
            view[flat] = 0.0
    memo.insert(0, (key, flat.copy(), bits.copy(), out.clone()))
    del memo[_SUM_MEMO:]
    return out


#: How many sums ``sum_scattered`` remembers.
_SUM_MEMO = 4
#: ``sum_scattered`` folds the entries in torch's tree (``SumTree``) instead of summing the
#: full rows when these hold at least this many entries (below, the full rows cost a few
#: microseconds) and the entries are at most this share of them (the tree's cost grows with
#: the entries: at 6% of [64, 32000] it is past the full rows').
_TREE_MIN_ENTRIES = 1 << 18
_TREE_MAX_SHARE = 1 / 32


def _sum_tree(flat: np.ndarray, shape: tuple[int, int]) -> Optional[SumTree]:
    """The ``SumTree`` of these entries when it is the cheaper way to their row sums and
    reproduces torch's (``tree_lanes``); else None. The last one is kept for its layout
    (``flat``, the very array, which its owner, a ``SparseRows``, never writes: a chain step
    sums several functions of the same entries)."""
    n = shape[0] * shape[1]
    if n < _TREE_MIN_ENTRIES or flat.size > n * _TREE_MAX_SHARE:
        return None
    lanes = tree_lanes(*shape)
    if lanes is None:
        return None
    kept = getattr(_scratch, "tree", None)
    if kept is not None and kept[0] is flat and kept[1] == (shape, lanes):
        return kept[2]
    tree = SumTree(flat, shape, lanes)
    _scratch.tree = (flat, (shape, lanes), tree)
    return tree


def _live_hint(xn: np.ndarray, shape: tuple[int, int], sample_live: int | np.intp
               ) -> Optional[tuple[np.ndarray, Optional[np.ndarray], int, np.ndarray]]:
    """The hint of ``note_live_hint`` (``(flat, pos, width)``, and which of the hinted entries
    are not ``-inf``) when every entry of ``xn`` (the
    flat ``[B, V]`` float32 rows) that is not ``-inf`` is at one of its flat indices; else
    None. ``sample_live``: how many entries of ``xn[::61]`` are not ``-inf``.

    Nothing is trusted: the hint may be from another tensor, or the tensor may have been
    written since. It is taken only when ``xn`` has as many entries that are not ``-inf``
    as it has at the hinted indices: one comparison pass and a count, a fraction of the
    cost of ``flatnonzero`` on the full rows and of the bookkeeping that follows it. A hint
    that disagrees with the strided sample is dropped before that pass."""
    hint = getattr(_scratch, "live_hint", None)
    if hint is None or hint[0] != shape:
        return None
    _, flat, pos, width, _ = hint
    at_hint = xn[flat] != -np.inf
    if np.count_nonzero(at_hint[flat % 61 == 0]) != sample_live:
        return None
    if np.count_nonzero(xn != -np.inf) != np.count_nonzero(at_hint):
        return None
    return flat, pos, width, at_hint


def _made_hint(logits: Tensor) -> Optional[tuple[np.ndarray, Optional[np.ndarray], int, np.ndarray]]:
    """``_live_hint``'s result, when the hint was noted with ``tensor=logits`` and ``logits``
    has not been written since (the hint then holds by construction: only the hinted
    entries are read), else None."""
    hint = getattr(_scratch, "live_hint", None)
    if hint is None or hint[4] is None or hint[0] != tuple(logits.shape):
        return None
    ref, version, call = hint[4]
    if ref() is not logits:
        return None
    if version is None:  # (an inference tensor)
        if call is None or call is not _CALL.get():
            return None
    elif _version_of(logits) != version:
        return None
    flat = hint[1]
    return flat, hint[2], hint[3], logits.numpy().reshape(-1)[flat] != -np.inf


def compact_rows(logits: Tensor, pad: int = 0, min_width: int = 1) -> Optional[SparseRows]:
    """``SparseRows`` of ``logits`` when most of every row is ``-inf`` (after a truncation:
    then a sampler's work on the packed rows is a fraction of the full width's), else None.

    Only on the CPU for float32 rows of at least ``_SPARSE_MIN_VOCAB`` columns (no device
    sync is involved there; numpy's comparisons and ``flatnonzero`` are several times
    faster than torch's boolean kernels on this path). ``pad`` extra ``-inf`` columns are
    kept after the widest row's entries and the width is at least ``min_width`` (both capped
    at ``V``): samplers whose rule looks at removed tokens next to kept ones (tfs's second
    differences) ask for them. NaN entries count as kept entries (they are not ``-inf``).

    Inside ``packed_chain``, a sampler's first call on the chain's packed rows returns their
    layout (with the padding asked for), whatever their width: see ``PackedChain``.
    """
    chain = _CHAIN.get()
    if chain is not None and chain.armed:
        chain.armed = False
        rows = chain.rows
        if rows is not None and logits is rows.logits:  # (chain.is_packed, spelt out: it narrows rows)
            return rows.with_pad(pad, min_width)
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2
            or logits.requires_grad):
        return None
    batch, vocab = logits.shape
    if vocab < _SPARSE_MIN_VOCAB or batch == 0:
        return None
    xn = logits.contiguous().numpy().reshape(-1)
    hint = _made_hint(logits)
    if hint is None:
        # A strided sample first (1/61 of the entries): rows that are mostly kept, the
        # common case before any truncation, are turned away without a full pass.
        sample = xn[::61]
        sample_live = np.count_nonzero(sample != -np.inf)
        if sample_live * min(4, _SPARSE_FRACTION) > sample.size:
            return None
        hint = _live_hint(xn, (batch, vocab), sample_live)
    if hint is None:
        live = xn != -np.inf
        if np.count_nonzero(live) * _SPARSE_FRACTION > xn.size:  # too dense on average
            return None
        flat = np.flatnonzero(live)
    else:
        flat, pos, width, at_hint = hint
        if (pos is not None and pad == 0 and min_width <= width < vocab
                and width * _SPARSE_FRACTION <= vocab and 2 * np.count_nonzero(at_hint) >= flat.size):
            # The hint's layout holds every entry that is not -inf (and maybe some -inf
            # ones, removed tokens like those of the full rows): packed as it is, while at
            # least half of it is still kept. (A layout that has mostly emptied, e.g. the
            # packed rows of a wide truncation that top_k then cut to k, would make every
            # later sampler work on that width: it is packed again, below, from the hinted
            # entries alone.)
            return SparseRows.holding(xn[flat], flat, pos, (batch, vocab), width)
        flat = flat[at_hint]
        if flat.size * _SPARSE_FRACTION > xn.size:
            return None
    return pack_entries(flat, xn[flat], (batch, vocab), pad, min_width)


# (for type checkers: with ``force`` the result is never None)
@overload
def pack_entries(flat: np.ndarray, values: np.ndarray, shape: tuple[int, int], pad: int = ...,
                 min_width: int = ..., *, force: Literal[True]) -> SparseRows: ...


@overload
def pack_entries(flat: np.ndarray, values: np.ndarray, shape: tuple[int, int], pad: int = ...,
                 min_width: int = ..., force: bool = ...) -> Optional[SparseRows]: ...


def pack_entries(flat: np.ndarray, values: np.ndarray, shape: tuple[int, int], pad: int = 0,
                 min_width: int = 1, force: bool = False) -> Optional[SparseRows]:
    """``SparseRows`` of the ``shape`` rows that are ``-inf`` except ``values`` at the flat
    indices ``flat`` (increasing): each row's entries to the left, ``pad`` free columns after
    the widest, at least ``min_width`` columns (both capped at ``V``). None when the packed
    rows would not be narrow enough to pay (see ``_SPARSE_FRACTION``) or the rows are shorter
    than ``_SPARSE_MIN_VOCAB``, as ``compact_rows`` decides, unless ``force``. (Below that
    width a row's packed positions may fall in the scalar tail of torch's loops over the
    full row, whose ``pow`` rounds differently: see ``skew._pow_packed``.)"""
    batch, vocab = shape
    if not force and vocab < _SPARSE_MIN_VOCAB:
        return None
    rows, counts, _, cols = packed_columns(flat, shape)
    width = min(vocab, max(int(counts.max(initial=0)) + pad, min_width))
    if not force and (width * _SPARSE_FRACTION > vocab or width == vocab):
        return None  # (packed rows would not be narrow enough to pay)
    return SparseRows.holding(values, flat, rows * width + cols, shape, width)


def flat_not_below(xn: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(~(xn < t[:, None]))`` for ``[B, V]`` rows ``xn`` and ``[B]``
    thresholds ``t``: the flat indices (increasing) of the entries not below their row's
    threshold (NaN entries included)."""
    buf, head = _mask_buffer(xn.shape)
    np.less(xn, t[:, None], out=head)
    np.logical_not(head, out=head)
    return _flat_true(buf, xn.size)


def flat_removed(xn: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(xn == -inf)`` for ``[B, V]`` float32 rows ``xn``: the flat indices
    (increasing) of the removed tokens."""
    buf, head = _mask_buffer(xn.shape)
    np.equal(xn, -np.inf, out=head)
    return _flat_true(buf, xn.size)


def removed_tokens(l32: Tensor) -> tuple[Tensor, Tensor]:
    """The removed tokens of the ``[B, V]`` float32 ``l32`` (its ``-inf`` entries): their flat
    indices (int64, increasing, row-major) and how many each row has (int64 ``[B]``)."""
    if _numpy_ok(l32):
        flat = torch.from_numpy(flat_removed(l32.numpy()))
    else:
        flat = (l32 == float("-inf")).reshape(-1).nonzero()[:, 0]
    return flat, torch.bincount(flat // max(l32.shape[1], 1), minlength=l32.shape[0])


def removed_in_rows(flat: Tensor, counts: Tensor, rows: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """``removed_tokens``' ``(flat, counts)`` of ``[B, vocab]`` rows, for the rows ``rows``
    (int64, increasing) only, as ``removed_tokens`` would find them in
    ``l32.index_select(0, rows)``."""
    flat_np = flat.numpy()
    new_row = np.full(counts.shape[0], -1, dtype=np.int64)
    new_row[rows.numpy()] = np.arange(rows.shape[0])
    at = new_row[flat_np // vocab]
    kept = at >= 0
    return torch.from_numpy(at[kept] * vocab + flat_np[kept] % vocab), counts.index_select(0, rows)


def _mask_buffer(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A boolean buffer for a mask of ``shape`` and a tail an eighth of its size (for
    ``_flat_true``), and the mask's part of it, shaped. (A fresh buffer per call: a per-thread
    one, kept, made glibc fault in the [B, V] temporaries of the samplers before top_k in a
    chain, 1.9 -> 4.8 ms for dynatemp at [64, 32000].)"""
    n = int(np.prod(shape))
    buf = np.empty(n + n // 8 + 1, dtype=np.bool_)
    return buf, buf[:n].reshape(shape)


def _flat_true(buf: np.ndarray, n: int) -> np.ndarray:
    """The indices of the True entries among the first ``n`` of ``buf`` (``_mask_buffer``'s).

    numpy finds the indices of a boolean array with a ``memchr`` scan when at most a tenth of
    it is True, and branch-free above: the scan mispredicts on scattered entries and takes
    2.3 ms at 8% of [64, 32000] where the branch-free loop takes 0.7. A True tail sends numpy
    to the branch-free loop; the tail's indices, the last ones, are dropped."""
    head = buf[:n]
    # (sparse enough for the scan to win, judged from every 61st entry: a count of them all
    # would be a pass more)
    if np.count_nonzero(head[::61]) * 61 * 40 <= n:
        return np.flatnonzero(head)
    count = np.count_nonzero(head)
    buf[n:] = True
    return np.flatnonzero(buf)[:count]


def packed_columns(flat: np.ndarray, shape: tuple[int, ...]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where the entries at the flat indices ``flat`` (increasing) of rows of ``shape``
    (``[B, V]``) go when each row's are packed to the left: their rows, each row's count, the
    index in ``flat`` of each row's first, and each entry's column in the packed rows."""
    batch, vocab = shape
    if flat.size <= 4096:  # (few entries: one division is the cheaper)
        rows = flat // vocab
        counts = np.bincount(rows, minlength=batch)
        starts = np.cumsum(counts) - counts
        return rows, counts, starts, np.arange(flat.size) - starts[rows]
    # Many: each row's end by binary search, then repeats (0.12 ms against 0.37 for a
    # division, a bincount and a gather of 160k entries)
    ends = np.searchsorted(flat, np.arange(1, batch + 1, dtype=np.int64) * vocab)
    counts = np.diff(ends, prepend=0)
    starts = ends - counts
    return np.repeat(np.arange(batch), counts), counts, starts, np.arange(flat.size) - np.repeat(starts, counts)


class PackedChain:
    """A chain of samplers that hands packed rows from one sampler to the next (a caller
    that runs a chain, ``SamplerPipeline``, keeps one per call; see ``packed_chain``).

    Each truncation sampler packs rows that are mostly ``-inf`` (``compact_rows``), works on
    the packed rows and expands its result back to ``[B, V]`` (``SparseRows.expand_truncated``),
    which the next sampler packs again. Inside ``packed_chain(chain)`` the result stays
    packed instead: ``expand_truncated`` returns it as ``rows.logits`` (``adopt``), the caller
    hands that tensor to the next sampler, and that sampler's first ``compact_rows`` returns
    ``rows`` for it. The samplers' values do not change: they are row-wise functions of the
    multiset of a row's values, computed on packed rows whatever layout holds them (see
    ``SparseRows``). What is saved is a ``[B, V]`` fill and scatter per sampler.

    Only samplers that pack their input first may be given ``rows.logits`` (every
    truncation sampler, skew, dynatemp and quadratic smoothing do; temperature is
    elementwise): samplers that read token ids need the full rows (``expand``).
    """

    __slots__ = ("rows", "armed", "keeps_packed", "removed")

    def __init__(self) -> None:
        self.rows: Optional[SparseRows] = None
        #: whether the next ``compact_rows`` is a sampler's first look at ``rows.logits``
        #: (set when it is handed over; any ``compact_rows`` call clears it, so the calls a
        #: sampler makes on its packed rows inside, e.g. in ``fill_removed``, are untouched)
        self.armed = False
        #: whether the step being run hands its result on packed (False on the step after
        #: which the caller needs the full rows: its result is expanded at once, as outside
        #: a chain, instead of packed and then expanded)
        self.keeps_packed = True
        #: ``note_removed``'s note: (tensor, its version, flat indices, counts per row)
        self.removed: Optional[tuple[Tensor, Optional[int], Tensor, Tensor]] = None

    def run(self, sampler: Callable[[Tensor], Tensor], x: Tensor, last: bool = False) -> Tensor:
        """``sampler(x)`` as a step of this chain: ``x`` (``[B, V]`` rows, or this chain's
        packed rows) is handed over, the result taken back; either may be packed rows (see
        ``is_packed``), unless ``last`` (the caller will need the full rows next). ``sampler``
        must pack its input first, or be elementwise."""
        x = self._hand_over(x)
        self.keeps_packed = not last
        with packed_chain(self):
            return self._take_back(sampler(x))

    def is_packed(self, x: Tensor) -> bool:
        """Whether ``x`` is the packed rows of this chain (``rows.logits``)."""
        return self.rows is not None and x is self.rows.logits

    def _hand_over(self, x: Tensor) -> Tensor:
        """``x`` as the next sampler gets it (the caller calls the sampler inside
        ``packed_chain(self)`` right after)."""
        self.armed = self.is_packed(x)
        return x

    def _take_back(self, out: Tensor) -> Tensor:
        """The sampler's result: packed rows (``rows.logits``, or a ``[B, K]`` result in the
        layout it was given: elementwise samplers, rows it left unchanged) or ``[B, V]``."""
        self.armed = False
        if self.rows is not None and out is not self.rows.logits:
            if out.shape == self.rows.logits.shape:
                self.rows = SparseRows(out, self.rows._flat, self.rows._pos, self.rows.shape)
            else:
                self.rows = None
        return out

    def adopt(self, layout: SparseRows, packed: Tensor) -> Tensor:
        """``layout.expand_truncated(packed)`` inside the chain: ``packed`` (a truncation
        sampler's result on ``layout``'s rows) becomes the chain's rows, as the next
        ``compact_rows`` would have packed its expansion: the same positions while at least
        half of them are still kept, else packed again from the kept entries alone."""
        if packed is layout.logits:  # (the layout's own rows, as made: nothing outside its positions)
            self.rows, self.armed = layout, True
            return packed
        values = layout.packed_values(packed)
        live = np.flatnonzero(values != -np.inf)  # (indices: several times faster than a boolean mask)
        width = layout.logits.shape[1]
        if 2 * live.size >= values.size:  # (a copy: nothing outside the positions)
            self.rows = SparseRows.holding(values, layout._flat, layout._pos, layout.shape, width)
        else:
            self.rows = pack_entries(layout._flat[live], values[live], layout.shape, force=True)
        self.armed = True  # (a unit may run a second sampler on it: top_k then top_p)
        return self.rows.logits

    def note(self, tensor: Tensor, flat: Tensor, counts: Tensor) -> None:
        """``note_removed``'s note, kept in this chain (``noted_removed`` reads it)."""
        self.removed = (tensor, _version_of(tensor), flat, counts)

    def noted(self, tensor: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The note's ``(flat, counts)`` when it was made for ``tensor`` and ``tensor`` has not
        been written since; else None."""
        noted = self.removed
        if noted is None or noted[0] is not tensor or _version_of(tensor) != noted[1]:
            return None
        return noted[2], noted[3]

    def note_all_finite(self, x: Tensor) -> None:
        """Note that ``x`` (``[B, V]`` float32 rows) has no removed token and no other non-finite
        entry: the input rule proved it, and the samplers that read token ids carry the note
        to the first packed step (``run_full``)."""
        self.note(x, torch.empty(0, dtype=torch.int64), torch.zeros(x.shape[0], dtype=torch.int64))

    def forget_removed(self) -> None:
        """Drop the note of the removed tokens: the caller wrote into the noted rows (an
        inference tensor's note would not see it, having no version counter to check)."""
        self.removed = None

    def run_full(self, sampler: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``sampler(x)`` for a sampler that needs the full rows (it reads token ids): ``x`` is
        expanded first, and the sampler runs inside this chain's context with nothing packed
        to hand on, so that the removed tokens noted for its input carry over to its result
        (``carry_removed``)."""
        x = self.expand(x)
        self.armed, self.keeps_packed = False, False
        with packed_chain(self):
            return sampler(x)

    def expand(self, x: Tensor) -> Tensor:
        """``x`` as ``[B, V]`` rows: packed rows are expanded (and noted for the next
        ``compact_rows``, see ``note_live_hint``); other tensors come back as they are."""
        rows = self.rows
        if rows is None or x is not rows.logits:  # (not is_packed, spelt out: it narrows rows)
            return x
        self.rows = None
        return rows.expand_and_note(x)


_CHAIN: contextvars.ContextVar[Optional[PackedChain]] = contextvars.ContextVar("samplers_packed_chain",
                                                                                default=None)


def note_removed(tensor: Tensor, flat: Tensor, counts: Tensor) -> None:
    """Inside a chain step (``packed_chain``), note that the only non-finite entries of the
    ``[B, V]`` float32 ``tensor`` (a sampler's input or result) are ``-inf`` at the flat
    indices ``flat`` (``removed_tokens``' result: int64, increasing, and ``counts`` per row),
    for a later sampler of the same chain that is given that very tensor, unwritten since
    (``noted_removed``): it skips its own search. Outside a chain nothing is noted: between a
    caller's calls the tensor could be written through a numpy view, which its version counter
    does not see; inside, only the chain's samplers run, and they write their own results.

    An inference tensor (``torch.inference_mode``, as vLLM runs) has no version counter: its
    note holds by identity. A note lives as long as one chain run, in which the only writes
    into a tensor the chain has already made are those of the units that carry the note
    (``carry_removed``) and the chain's own row-subset stages, which drop it
    (``PackedChain.forget_removed``)."""
    chain = _CHAIN.get()
    if chain is not None:
        chain.note(tensor, flat, counts)


def noted_removed(tensor: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """``note_removed``'s ``(flat, counts)`` when they were noted for ``tensor`` in this chain
    and it has not been written since; else None."""
    chain = _CHAIN.get()
    return None if chain is None else chain.noted(tensor)


def carry_removed(noted: Optional[tuple[Tensor, Tensor]], result: Tensor,
                  added: Optional[np.ndarray] = None) -> None:
    """Note for ``result`` the removed tokens ``noted`` for a sampler's input (``noted_removed``,
    read before the sampler wrote anything), plus the flat indices ``added`` (any order,
    repeats allowed): for a sampler whose result's only non-finite entries are its input's
    ``-inf`` and the ``-inf`` it wrote at ``added`` (the penalties, which keep finite logits
    finite, write none; no_repeat_ngram writes its bans). ``result`` may be the input written
    in place. Nothing is noted when nothing was noted for the input."""
    if noted is None:
        return
    flat, counts = noted
    if added is not None and added.size:
        # sorted and distinct (np.union1d's values at a fraction of its cost: ~25x here)
        union = np.sort(np.concatenate((flat.numpy(), added)) if flat.numel() else added)
        distinct = np.empty(union.size, dtype=np.bool_)
        distinct[0] = True
        np.not_equal(union[1:], union[:-1], out=distinct[1:])
        union = union[distinct]
        flat = torch.from_numpy(union)
        counts = torch.from_numpy(np.bincount(union // result.shape[1], minlength=result.shape[0]))
    note_removed(result, flat, counts)


def is_chain_rows(x: Tensor) -> bool:
    """Whether ``x`` is the packed rows a ``packed_chain`` step hands to a sampler (its first
    ``compact_rows`` on them returns their layout at no cost)."""
    chain = _CHAIN.get()
    return chain is not None and chain.armed and chain.is_packed(x)


def packed_result_wanted() -> bool:
    """Whether a truncation sampler's result will be handed on packed (inside a
    ``packed_chain`` step that keeps it so): a sampler that could make its result either
    way (top_k) then makes it packed."""
    chain = _CHAIN.get()
    return chain is not None and chain.keeps_packed


@contextlib.contextmanager
def packed_chain(chain: PackedChain) -> Iterator[None]:
    """Within this context truncation samplers leave their results packed in ``chain`` (see
    ``PackedChain``); the caller hands those packed rows on and expands them at the end."""
    token = _CHAIN.set(chain)
    try:
        yield
    finally:
        _CHAIN.reset(token)


#: Rows wider than this get no sum-of-squares bound (``finite_absmax_bound``): the float32
#: sum's relative error bound, ``V * 2**-24 / (1 - V * 2**-24)``, must stay below 1/2.
_SQUARES_MAX_VOCAB = 2**22
#: Magnitudes below this may square to 0 in float32 (underflow): added to the bound.
_SQUARES_UNDERFLOW = 1.1e-19


def finite_absmax_bound(x: Tensor) -> Optional[float]:
    """An upper bound on ``max |x|`` that also proves every entry of ``x`` finite, from one
    read-only pass; None when it proves nothing (an entry is NaN or +-inf, squares overflow
    float32, or ``x`` is not a contiguous 2-D float32 CPU tensor with rows of at most
    ``2**22`` entries): the caller then takes its exact path.

    Each row's sum of squares ``s`` is one float32 dot product (numpy's BLAS, ~3x faster
    than ``torch.aminmax`` on the CPU). It is finite only if every entry is, and whatever
    the order of the additions the computed ``s`` is at least ``(1 - g) * sum x_i**2`` with
    ``g = V u / (1 - V u)`` (``u = 2**-24``) below 1/2 here, so ``max |x| <= sqrt(2 s)``,
    plus the magnitudes whose squares underflow.
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous()
            or x.requires_grad or x.shape[1] > _SQUARES_MAX_VOCAB):
        return None
    if x.numel() == 0:
        return 0.0
    xn = x.numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow, inf - inf: s is not finite
        if xn.shape[0] == 1:  # one row: a plain dot product, 1-4 us less than the batched matmul
            s = float(np.dot(xn[0], xn[0]))
        else:
            s = float(np.matmul(xn[:, None, :], xn[:, :, None]).max())
    if not math.isfinite(s):
        return None
    return math.sqrt(2.0 * s) + _SQUARES_UNDERFLOW


_NO_OVERFLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("samplers_no_overflow", default=False)


@contextlib.contextmanager
def no_overflow() -> Iterator[None]:
    """Within this context the caller guarantees that the samplers' float32 arithmetic cannot
    leave the float32 range on the logits it passes (``SamplerPipeline`` proves it from a bound
    on the logits and the parameters, ``SamplingBatch.may_overflow``): ``saturate_finite``
    then skips its check, a pass over the row that would find nothing to clamp."""
    token = _NO_OVERFLOW.set(True)
    try:
        yield
    finally:
        _NO_OVERFLOW.reset(token)


def saturate_finite(out32: Tensor, in32: Tensor) -> Tensor:
    """``out32`` with each result of a finite input clamped to the float32 range: arithmetic on
    a finite logit (a small temperature, a small repetition penalty) never overflows to
    ``+-inf``; non-finite inputs keep their results (``-inf`` stays removed). Inside
    ``no_overflow()`` the caller has proven there is nothing to clamp."""
    if _NO_OVERFLOW.get():
        return out32
    fmax = torch.finfo(torch.float32).max
    if finite_absmax_bound(out32) is not None:
        return out32  # every result finite: nothing to clamp
    if _numpy_ok(out32, in32) and out32.shape == in32.shape:
        if np.array_equal(np.isfinite(out32.numpy()), np.isfinite(in32.numpy())):
            # No finite input gave a non-finite result (numpy's isfinite, no sync on the
            # CPU): the clamp and the selection below would return ``out32`` unchanged.
            return out32
    elif out32.device.type == "cpu" and out32.numel():
        lo, hi = torch.aminmax(out32)  # one pass; NaN makes both comparisons False
        if bool(lo >= -fmax) and bool(hi <= fmax):
            return out32  # every result finite: nothing to clamp
    return torch.where(torch.isfinite(in32), out32.clamp(-fmax, fmax), out32)


def sort_values_desc(x: Tensor) -> Tensor:
    """Each row of ``x`` sorted in descending order (values only; no order is returned, so
    ties cannot matter). On the CPU this uses numpy's (SIMD) sort, much faster than
    ``torch.sort``, which always computes the permutation too."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        rows = x.contiguous().numpy().copy()
        sort_rows_(rows)
        return torch.from_numpy(rows).flip(-1)
    return torch.sort(x, dim=-1, descending=True).values


def sort_nonneg(x: Tensor, descending: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.sort(x, dim=-1, descending=descending)`` for a float32 ``x`` whose entries
    are ``+0.0``, positive or ``+inf`` (probabilities, deviations): ``(values, indices)``.

    The order among equal values is unspecified (callers use tie-independent rules). On the
    CPU the permutation comes from one numpy sort of int64 keys ``bits(x) << 32 | index``
    (the bit patterns of non-negative floats sort as integers), several times faster than
    ``torch.sort``; when most entries are the value that sorts last (``+inf`` ascending: the
    deviation of a removed token; ``+0.0`` descending: its probability), only the others
    are sorted (``_sort_nonneg_sparse``).
    """
    batch, vocab = x.shape
    if x.device.type == "cpu" and x.dtype == torch.float32 and vocab < 2**31 and not x.requires_grad:
        x = x.contiguous()
        sparse = _sort_nonneg_sparse(x, descending)
        if sparse is not None:
            return sparse
        # The keys written as their two int32 halves: the high one the key's bits (larger
        # value, smaller key when descending), the low one the column. After the sort the
        # values are read back from the high halves and the order from the low ones: no
        # gather, and ~2x faster at [64, 32000] than shifting and or-ing int64 copies.
        key = np.empty((batch, vocab), dtype=np.int64)
        halves = key.view(np.int32).reshape(batch, vocab, 2)  # little-endian: [..., 0] is the low half
        bits = x.numpy().view(np.int32)
        high = halves[..., 1]
        if descending:
            np.subtract(0x7FFFFFFF, bits, out=high)
        else:
            np.copyto(high, bits)
        if not (descending and bool((high < 0).any())):  # (a NaN with its sign bit: the int64 way)
            np.copyto(halves[..., 0], np.arange(vocab, dtype=np.int32))
            sort_rows_(key)
            value_bits = np.subtract(0x7FFFFFFF, high) if descending else high.copy()
            return torch.from_numpy(value_bits.view(np.float32)), torch.from_numpy(halves[..., 0].astype(np.int64))
        key = bits.astype(np.int64)
        np.subtract(0x7FFFFFFF, key, out=key)
        np.left_shift(key, 32, out=key)
        np.bitwise_or(key, np.arange(vocab, dtype=np.int64), out=key)
        sort_rows_(key)
        np.bitwise_and(key, 0xFFFFFFFF, out=key)
        # values: one flat numpy take (torch's gather is ~2x slower here)
        flat = (key + (np.arange(batch, dtype=np.int64) * vocab)[:, None]).reshape(-1)
        values = torch.from_numpy(x.numpy().reshape(-1)[flat]).view(batch, vocab)
        return values, torch.from_numpy(key)
    return torch.sort(x, dim=-1, descending=descending)


def _sort_nonneg_sparse(x: Tensor, descending: bool) -> Optional[tuple[Tensor, Tensor]]:
    """``sort_nonneg`` of a contiguous CPU float32 ``x`` most of whose entries are the value
    that sorts last, or None when that does not pay (or NaN is present).

    Each row's other ("live") entries are sorted by the same keys as the dense path and
    fill the first ``n_live`` positions; the remaining positions hold the last-sorting
    entries, which are all equal. The permutation starts as the identity, and each live
    entry sitting at a column ``>= n_live`` swaps places with a last-sorting entry sitting
    at a column ``< n_live`` of its row (there are as many of each): O(B * V) only for the
    identity and the values, O(live) for everything else.
    """
    batch, vocab = x.shape
    if vocab < _SPARSE_MIN_VOCAB or batch == 0:
        return None
    xn = x.numpy()
    last = np.float32(0.0 if descending else np.inf)
    live = xn != last
    n_live = np.count_nonzero(live)
    if n_live * _SPARSE_FRACTION > xn.size or (not descending and np.isnan(xn).any()):
        return None  # (ascending, NaN sorts after +inf: keep the dense path's order)
    flat = np.flatnonzero(live)
    rows, counts, _, rank = packed_columns(flat, (batch, vocab))
    cols = flat - rows * vocab
    width = int(counts.max())
    key = xn.reshape(-1)[flat].view(np.int32).astype(np.int64)
    if descending:
        np.subtract(0x7FFFFFFF, key, out=key)
    key = (key << 32) | cols
    packed = np.full((batch, width), np.iinfo(np.int64).max, dtype=np.int64)
    packed[rows, rank] = key
    sort_rows_(packed)
    front_cols = packed[rows, rank] & 0xFFFFFFFF  # row b's sorted live columns, row-major
    order = np.broadcast_to(np.arange(vocab, dtype=np.int64), (batch, vocab)).copy()
    back = cols >= counts[rows]  # live entries outside their row's front
    front_idx = rows * vocab + rank  # every front position, row-major (rows: a row's count each)
    dead_front = front_idx[~live.reshape(-1)[front_idx]]  # last-sorting entries in the front
    order_flat = order.reshape(-1)
    order_flat[flat[back]] = dead_front % vocab  # same rows, same counts, both row-major
    order_flat[front_idx] = front_cols
    values = np.full(batch * vocab, last, dtype=np.float32)
    values[front_idx] = xn.reshape(-1)[rows * vocab + front_cols]
    return torch.from_numpy(values).view(batch, vocab), torch.from_numpy(order)


def cumsum_is_running_sum(x: Tensor) -> bool:
    """Whether ``torch.cumsum`` on ``x``'s device is a running sum, so non-decreasing on
    non-negative values (a zero repeats its predecessor's sum) and the same whatever the
    batch's shape: torch's CPU kernel. A GPU's is a parallel scan that groups the additions
    by the tensor's shape (a batch of one row takes CUB's scan, larger ones a chunk width
    that depends on the row count) and can dip by an ulp where a value is 0."""
    return x.device.type == "cpu"


def count_below(sorted_rows: Tensor, bound: Tensor, inclusive: bool = False,
                monotone: Optional[bool] = None) -> Tensor:
    """Per row, how many entries of the row are ``< bound`` (``<= bound`` with
    ``inclusive``): ``((sorted_rows < bound[:, None]).sum(-1))``. ``bound``: ``[B]``.
    Returns int64 ``[B]``.

    The rows are sorted values or cumulative sums of non-negative values. Where those sums
    are non-decreasing (``cumsum_is_running_sum``) a binary search counts; elsewhere a binary
    search over a dip stops at some crossing, not the count, so the comparisons are counted.
    ``monotone`` overrides the device's rule."""
    q = bound.to(sorted_rows.dtype).reshape(-1, 1)
    if not (cumsum_is_running_sum(sorted_rows) if monotone is None else monotone):
        return ((sorted_rows <= q) if inclusive else (sorted_rows < q)).sum(dim=-1)
    return torch.searchsorted(sorted_rows.contiguous(), q.contiguous(), right=inclusive).squeeze(1)
