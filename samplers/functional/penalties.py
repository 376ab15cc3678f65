"""logit_bias, min_tokens (token bans) and the repetition / frequency / presence penalties.

All functions take logits [B, V] (float32, float16 or bfloat16, any device), compute in
float32 and return a new tensor of the input's dtype and shape; the input is never modified.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ._stats import (_NO_OVERFLOW, ParamLike, carry_removed, cast_saturating, check_entries, check_logits,
                     check_row_tensor, noted_removed, sampler_param)

__all__ = ["logit_bias", "ban_tokens", "min_tokens", "penalties", "penalties_"]

_FMAX = float(np.finfo(np.float32).max)


def logit_bias(
    logits: torch.Tensor,
    rows: torch.Tensor,
    token_ids: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Add a per-(row, token) bias: l[rows[i], token_ids[i]] += bias[i].

    The batch's `logit_bias` dicts in coordinate (COO) form: one entry per (row, token) of
    each row's dict.

    Args:
        logits: [B, V] float.
        rows: int64 [N], row of each entry, in [0, B).
        token_ids: int64 [N], token of each entry, in [0, V).
        bias: [N] float (float32), the bias of each entry (the API allows [-100, 100]).

    Returns:
        [B, V], the input's dtype. The sum is computed in float32 and rounded once to the
        dtype (a finite sum beyond the dtype's range saturates at its largest finite value).
        A (row, token) listed twice receives the sum of its biases. A `-inf` logit stays
        `-inf`. Disabled value: no entry for a row (empty dict); every logit not
        listed (in particular every row without entries) is bit-identical to the input.
    """
    check_logits(logits)
    check_entries(logits, "logit_bias", rows, token_ids, bias=bias)
    out = logits.to(torch.float32, copy=True)
    if rows.numel():
        out.index_put_(
            (rows.to(torch.int64), token_ids.to(torch.int64)),
            bias.to(device=out.device, dtype=torch.float32),
            accumulate=True,
        )
    return cast_saturating(out, logits.dtype)


def ban_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Remove the given (row, token) pairs: l[rows[i], token_ids[i]] = -inf.

    Args:
        logits: [B, V] float.
        rows: int64 [N] in [0, B); token_ids: int64 [N] in [0, V). Repeats are allowed.

    Returns:
        [B, V], the input's dtype; every other entry bit-identical. No entries: a copy.
        This is the building block of `min_tokens` (the caller passes EOS and
        `stop_token_ids` for the rows still under their minimum) and of any other hard ban.
        It does not protect the argmax: banning every finite token of a row leaves it all
        `-inf`.
    """
    check_logits(logits)
    check_entries(logits, "ban_tokens", rows, token_ids)
    out = logits.clone()
    if rows.numel():
        out[rows.to(torch.int64), token_ids.to(torch.int64)] = float("-inf")
    return out


def min_tokens(
    logits: torch.Tensor,
    output_lengths: torch.Tensor,
    min_tokens: torch.Tensor,
    rows: torch.Tensor,
    token_ids: torch.Tensor,
) -> torch.Tensor:
    """`min_tokens`: while a row's output is shorter than its minimum, ban its stop tokens.

    Args:
        logits: [B, V] float.
        output_lengths: int64 [B], number of output tokens generated so far per row
            (`TokenHistory.output_lengths`).
        min_tokens: int64 [B], the per-row minimum (0 = disabled).
        rows, token_ids: int64 [N], the (row, token) pairs to ban while the row is under its
            minimum: the EOS token id(s) and every id of the row's `stop_token_ids`.

    Returns:
        [B, V], the input's dtype: l[rows[i], token_ids[i]] = -inf for every i with
        output_lengths[rows[i]] < min_tokens[rows[i]]; everything else bit-identical
        (rows with min_tokens = 0, or whose output already reached the minimum, are
        unchanged). No device sync inside the pipeline (``trusted_params``); called
        directly, the entries' range is checked first (one read of ``rows`` and ``token_ids``).
    """
    check_logits(logits)
    check_entries(logits, "min_tokens", rows, token_ids)
    check_row_tensor(output_lengths, logits, "min_tokens: output_lengths")
    check_row_tensor(min_tokens, logits, "min_tokens: min_tokens")
    out = logits.clone()
    if rows.numel():
        r = rows.to(torch.int64)
        t = token_ids.to(torch.int64)
        active = (output_lengths < min_tokens)[r]
        current = logits[r, t]
        out[r, t] = torch.where(active, torch.full_like(current, float("-inf")), current)
    return out


def penalties(
    logits: torch.Tensor,
    seen_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: ParamLike,
    frequency_penalty: ParamLike,
    presence_penalty: ParamLike,
    seen_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Repetition, frequency and presence penalties (SEMANTICS.md), in that order.

    Args:
        logits: [B, V] float.
        seen_mask: bool [B, V], token occurs in the row's prompt or output
            (`TokenHistory.seen_mask()`).
        output_counts: integer [B, V], occurrences of the token in the row's output only
            (`TokenHistory.output_counts()`).
        repetition_penalty: float32 [B] (or a number for every row), r > 0; disabled 1.0.
        frequency_penalty: float32 [B] (or a number), f in [-2, 2]; disabled 0.0.
        presence_penalty: float32 [B] (or a number), pr in [-2, 2]; disabled 0.0.
        seen_ids: optional int64 [N] on the CPU, the flat indices b * V + t of seen_mask's
            True entries, each once, in any order (`TokenHistory.seen_ids()`): the CPU path
            then reads them instead of scanning seen_mask. The dense path (other devices,
            inputs that require grad) reads seen_mask and ignores them.

    Formula, in float32, for each token t:
        1. if seen_mask[t]:  l = l / r if l > 0 else l * r
        2. l = l - f * count(t)
        3. l = l - pr * (count(t) > 0)
    A `-inf` logit stays `-inf`; a finite logit whose step 1 overflows saturates at the
    float32 range (+-3.4028235e38). Returns [B, V] in the input's dtype. A row with
    (r, f, pr) = (1, 0, 0) is bit-identical to the input, whatever the other rows use.

    On the CPU step 1 touches only the seen tokens (their flat indices, gathered and
    written back), and is skipped when every row has r = 1; steps 2-3 touch only the
    output's tokens (and the ``-0.0`` logits of rows whose f or pr has its sign bit set, see
    ``_shift_output_tokens``), and are skipped when every row has f = pr = +0.0 (they would
    subtract +0.0); the values are those of the dense formula. With ``seen_ids``, the
    output's tokens are found among them (every token with a count is seen, as in a
    `TokenHistory`); without, from ``output_counts``.
    """
    check_logits(logits)
    check_token_tables(logits, seen_mask, output_counts)
    noted = noted_removed(logits)
    if logits.device.type != "cpu" or logits.requires_grad:
        out = _penalties_dense(logits, seen_mask, output_counts, repetition_penalty, frequency_penalty,
                               presence_penalty)
    else:
        out = _penalties_cpu(logits, None, seen_mask, output_counts, repetition_penalty, frequency_penalty,
                             presence_penalty, seen_ids)
    # (finite logits stay finite, -inf stays -inf: a chain's note of the removed tokens holds)
    carry_removed(noted, out)
    return out


def penalties_(
    x: torch.Tensor,
    seen_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: ParamLike,
    frequency_penalty: ParamLike,
    presence_penalty: ParamLike,
    seen_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`penalties` in place on ``x`` ([B, V] float32, contiguous); returns ``x``. On the CPU
    only the changed entries are written (a chain that owns its rows saves a [B, V] copy)."""
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(
            f"penalties_: x must be a contiguous float32 [B, V] tensor, got {x.dtype} of shape {tuple(x.shape)}"
        )
    check_token_tables(x, seen_mask, output_counts)
    noted = noted_removed(x)  # (read before x is written)
    if x.device.type != "cpu" or x.requires_grad:
        return x.copy_(_penalties_dense(x, seen_mask, output_counts, repetition_penalty, frequency_penalty,
                                        presence_penalty))
    _penalties_cpu(x, x, seen_mask, output_counts, repetition_penalty, frequency_penalty, presence_penalty,
                   seen_ids)
    x[:0].zero_()  # (numpy's writes bump no version counter; an empty in-place op does)
    carry_removed(noted, x)
    return x


def check_token_tables(logits: torch.Tensor, seen_mask: torch.Tensor, output_counts: torch.Tensor) -> None:
    """``ValueError`` unless ``seen_mask`` and ``output_counts`` have the logits' ``[B, V]``
    shape (a history of another vocabulary would index other tokens, or past the rows)."""
    shape = logits.shape
    if getattr(seen_mask, "shape", None) == shape and getattr(output_counts, "shape", None) == shape:
        return  # (the common case in a fraction of a microsecond: a one-row step is ~90 us)
    for name, table in (("seen_mask", seen_mask), ("output_counts", output_counts)):
        if not isinstance(table, torch.Tensor) or table.shape != shape:
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"penalties: {name} has shape {got}, expected the logits' {tuple(shape)}")


def _params(logits: torch.Tensor, repetition_penalty: ParamLike, frequency_penalty: ParamLike,
            presence_penalty: ParamLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (sampler_param(repetition_penalty, logits, "repetition_penalty"),
            sampler_param(frequency_penalty, logits, "frequency_penalty"),
            sampler_param(presence_penalty, logits, "presence_penalty"))


def _penalties_dense(logits: torch.Tensor, seen_mask: torch.Tensor, output_counts: torch.Tensor,
                     repetition_penalty: ParamLike, frequency_penalty: ParamLike,
                     presence_penalty: ParamLike) -> torch.Tensor:
    """`penalties` with full-width tensor ops (any device, autograd)."""
    r, f, pr = _params(logits, repetition_penalty, frequency_penalty, presence_penalty)
    x = logits.to(torch.float32)
    # a finite logit saturates rather than overflow (a tiny or huge r): clamp keeps +-inf as is
    enabled = (r != 1) | (f != 0) | (pr != 0)
    scaled = torch.where(x > 0, x / r[:, None], x * r[:, None])
    scaled = torch.where(torch.isfinite(x), scaled.clamp(-_FMAX, _FMAX), scaled)
    out = torch.where(seen_mask, scaled, x)
    out = out - f[:, None] * output_counts.to(torch.float32)
    out = out - pr[:, None] * (output_counts > 0).to(torch.float32)
    return torch.where(enabled[:, None], cast_saturating(out, logits.dtype), logits)


def _penalties_cpu(logits: torch.Tensor, into: Optional[torch.Tensor], seen_mask: torch.Tensor,
                   output_counts: torch.Tensor, repetition_penalty: ParamLike, frequency_penalty: ParamLike,
                   presence_penalty: ParamLike, seen_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """`penalties` on the CPU: the dense formula's values, with the per-token work in numpy
    (its float32 division, multiplication and clamp round like torch's; a fraction of torch's
    per-op cost on the few seen tokens of a row) and no full-width select. Written into
    ``into`` (``logits`` itself, float32 and contiguous) when given, else into a copy."""
    r, f, pr = _params(logits, repetition_penalty, frequency_penalty, presence_penalty)
    rn, fn, pn = _host_float32(r), _host_float32(f), _host_float32(pr)
    # (np.count_nonzero in place of .any() / .all(): a fraction of their call cost on a few rows)
    repeat = rn != 1
    # Any row whose f or pr is not +0.0 (a nonzero bit pattern; -0.0 included, see below)?
    shift = bool(np.count_nonzero(fn.view(np.uint32)) or np.count_nonzero(pn.view(np.uint32)))
    enabled = repeat | (fn != 0) | (pn != 0) if shift else repeat
    n_enabled = np.count_nonzero(enabled)
    if not n_enabled:
        return logits if into is not None else logits.clone()
    # The rows written: ``into``, or a contiguous float32 copy of our own. With one torch thread
    # numpy's copy is as fast as torch's clone or up to ~25% faster (measured at [1, 128256]
    # to [64, 32000]); with more, torch's copy runs in parallel and wins on large inputs.
    if into is not None:
        out = into
    elif logits.dtype != torch.float32:
        out = logits.to(torch.float32).contiguous()
    elif torch.get_num_threads() == 1:
        out = torch.from_numpy(logits.numpy().copy())
    else:
        out = logits.clone(memory_format=torch.contiguous_format)
    on = out.numpy().reshape(-1)
    vocab = logits.shape[1]
    # Only the enabled rows are written: the others keep their logits bit for bit (a -0.0 too,
    # which the shift below would make +0.0 on a row whose f is -0.0).
    some_rows = n_enabled < enabled.size
    # 1. Repetition: only the seen tokens change (x / 1 == x * 1 == x on rows with r = 1).
    if not shift or np.count_nonzero(repeat):  # (without shift, enabled rows are repeat rows)
        if seen_ids is None:
            flat = np.flatnonzero(seen_mask.contiguous().numpy())
        else:
            flat = seen_ids.numpy()
        if some_rows:
            flat = flat[enabled[flat // vocab]]
        if flat.size:
            _repeat_seen(on, flat, rn, vocab)
    # 2, 3. Frequency and presence. A row with f = pr = +0.0 would only subtract +0.0, which
    # changes nothing: skipped when that holds for every row.
    if shift:
        counts = output_counts.contiguous().numpy().reshape(-1)
        if seen_ids is None:
            in_output = np.flatnonzero(counts)
        else:  # (the output's tokens are among the history's seen ones)
            seen = seen_ids.numpy()
            in_output = seen[counts[seen] > 0]
        if some_rows:
            in_output = in_output[enabled[in_output // vocab]]
        _shift_output_tokens(on, in_output, counts[in_output], fn, pn, vocab, enabled)
    if logits.dtype != torch.float32:
        out = cast_saturating(out, logits.dtype)
    return out


def _host_float32(t: torch.Tensor) -> np.ndarray:
    """A CPU [B] parameter tensor as a float32 numpy array (no copy when it is one already)."""
    return (t if t.dtype == torch.float32 else t.to(torch.float32)).numpy()


def _repeat_seen(on: np.ndarray, flat: np.ndarray, rn: np.ndarray, vocab: int) -> None:
    """Step 1 of `penalties` in place on the flat float32 logits ``on`` at the flat indices
    ``flat`` (distinct), row b's factor ``rn[b]``."""
    v = on[flat]
    # One factor for every row (the usual batch) needs no per-token row lookup.
    r_at = rn[0] if rn.size == 1 or not np.count_nonzero(rn != rn[0]) else rn[flat // vocab]
    if _NO_OVERFLOW.get():
        # The caller proved that no finite result leaves the float32 range
        # (SamplerPipeline: SamplingBatch.may_overflow); then the clamp below changes nothing
        # (+-inf / r and +-inf * r are +-inf, NaN stays NaN): skip it and the fix-up.
        scaled = _divide_positive_multiply_rest(v, r_at)
    else:
        with np.errstate(over="ignore"):  # (overflow saturates just below)
            scaled = _divide_positive_multiply_rest(v, r_at)
        # a finite logit saturates rather than overflow (a tiny or huge r); +-inf stay as they are
        infinite = ~np.isfinite(v)
        np.clip(scaled, -_FMAX, _FMAX, out=scaled)
        if infinite.any():
            scaled[infinite] = v[infinite]
    on[flat] = scaled


def _shift_output_tokens(on: np.ndarray, flat: np.ndarray, counts: np.ndarray, fn: np.ndarray,
                         pn: np.ndarray, vocab: int, enabled: np.ndarray) -> None:
    """Steps 2-3 of `penalties` in place on the flat float32 logits ``on``: ``flat`` (distinct)
    are the flat indices of the tokens with ``count > 0``, ``counts`` their counts.

    Those get ``l - f * count - pr`` (the dense formula's ``pr * [count > 0]`` is ``pr * 1``,
    exact). Every other token gets ``l - f * 0 - pr * 0``, which is ``l`` except for ``-0.0``:
    where ``f`` or ``pr`` has its sign bit set, ``0 * f`` (or ``0 * pr``) is ``-0.0`` and
    ``-0.0 - -0.0`` is ``+0.0``. Those rows get ``+ 0.0`` on every token (``l + 0.0`` is ``l``
    but for ``-0.0``, which becomes ``+0.0``), before the output tokens are written. Only the
    rows marked in ``enabled`` (bool [B]) are written: ``flat`` holds none of the others'."""
    values = on[flat]
    rows = flat // vocab
    flips = np.flatnonzero((np.signbit(fn) | np.signbit(pn)) & enabled)
    if flips.size:
        rows2d = on.reshape(-1, vocab)
        rows2d[flips] = rows2d[flips] + np.float32(0.0)
    values -= counts.astype(np.float32) * fn[rows]
    values -= pn[rows]
    on[flat] = values


def _divide_positive_multiply_rest(v: np.ndarray, r: np.ndarray | np.float32) -> np.ndarray:
    """``np.where(v > 0, v / r, v * r)`` (float32), bit for bit, selected with integer masks:
    np.where branches per element, and on logits' random signs that costs ~3 ns a token
    (270 us for 70k seen tokens, against 37 us here)."""
    a = v / r
    b = v * r
    keep_a = (v > 0).view(np.int8)
    np.negative(keep_a, out=keep_a)  # 0 / -1: every bit set where v > 0 (widened with its sign)
    ai, bi = a.view(np.int32), b.view(np.int32)
    ai ^= bi
    ai &= keep_a
    bi ^= ai  # a's bits where v > 0, b's elsewhere
    return b


#: Columns that ``rescue_empty_rows`` looks at first for a finite entry in each row.
_RESCUE_PROBE = 64


def rescue_empty_rows(processed: torch.Tensor, logits: torch.Tensor,
                      removed_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Give a row that ends with every token removed back its most likely input token.

    Bans (min_tokens, no_repeat_ngram) and a DRY penalty that overflows can remove every token of a row; such a row keeps
    its input argmax, at its input value, so a draw is always possible (DESIGN.md).

    Args:
        processed: fp32 [B, V], the chain's result (-inf = removed).
        logits: [B, V], the chain's input.
        removed_counts: int64 [B], optional: how many entries of each row of ``processed``
            are ``-inf`` (a chain's note of its removed tokens, ``PackedChain.noted``); a
            row with fewer than V is not empty, which spares the search on the CPU.
    Returns:
        ``processed`` itself when no row is empty on the CPU, else a new fp32 [B, V] tensor.
        Ties for the argmax: the lowest token id.
    """
    if processed.device.type == "cpu":
        if removed_counts is not None and not (removed_counts.numpy() >= processed.shape[1]).any():
            return processed
        # No device sync on the CPU: touch only the (rare) empty rows. A finite entry among a
        # row's first columns proves it is not empty (bans leave most of a full row): the
        # whole rows are read only when some row has none there (after a truncation).
        if processed.shape[1] > _RESCUE_PROBE and \
                bool((processed[:, :_RESCUE_PROBE].amax(dim=-1) > float("-inf")).all()):
            return processed
        empty = processed.amax(dim=-1) == float("-inf")  # == isneginf(x).all(-1), in one reduction
        if not bool(empty.any()):
            return processed
        rows = empty.nonzero().squeeze(1)
        cols = logits[rows].argmax(dim=-1)
        processed = processed.clone()
        processed[rows, cols] = logits[rows, cols].float()
        return processed
    empty = processed.amax(dim=-1) == float("-inf")
    top = torch.zeros_like(processed, dtype=torch.bool).scatter_(1, logits.argmax(dim=-1, keepdim=True), True)
    return torch.where(empty[:, None] & top, logits.float(), processed)
