"""logit_bias, min_tokens (token bans) and the repetition / frequency / presence penalties.

All functions take logits [B, V] (float32, float16 or bfloat16, any device), compute in
float32 and return a new tensor of the input's dtype and shape; the input is never modified.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["logit_bias", "ban_tokens", "min_tokens", "penalties"]


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
        dtype. A (row, token) listed twice receives the sum of its biases. A `-inf` logit
        stays `-inf`. Disabled value: no entry for a row (empty dict); every logit not
        listed (in particular every row without entries) is bit-identical to the input.
    """
    out = logits.to(torch.float32, copy=True)
    if rows.numel():
        out.index_put_(
            (rows.to(torch.int64), token_ids.to(torch.int64)),
            bias.to(device=out.device, dtype=torch.float32),
            accumulate=True,
        )
    return out.to(logits.dtype)


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
        unchanged). No device sync.
    """
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
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
) -> torch.Tensor:
    """Repetition, frequency and presence penalties (SEMANTICS.md), in that order.

    Args:
        logits: [B, V] float.
        seen_mask: bool [B, V], token occurs in the row's prompt or output
            (`TokenHistory.seen_mask()`).
        output_counts: integer [B, V], occurrences of the token in the row's output only
            (`TokenHistory.output_counts()`).
        repetition_penalty: float32 [B], r > 0; disabled 1.0.
        frequency_penalty: float32 [B], f in [-2, 2]; disabled 0.0.
        presence_penalty: float32 [B], pr in [-2, 2]; disabled 0.0.

    Formula, in float32, for each token t:
        1. if seen_mask[t]:  l = l / r if l > 0 else l * r
        2. l = l - f * count(t)
        3. l = l - pr * (count(t) > 0)
    A `-inf` logit stays `-inf`; a finite logit whose step 1 overflows saturates at the
    float32 range (+-3.4028235e38). Returns [B, V] in the input's dtype. A row with
    (r, f, pr) = (1, 0, 0) is bit-identical to the input, whatever the other rows use.

    On the CPU step 1 touches only the seen tokens (their flat indices, gathered and
    written back) and steps 2-3 are skipped when every row has f = pr = +0.0 (they would
    subtract +0.0); the values are those of the dense formula.
    """
    x = logits.to(torch.float32)
    r = repetition_penalty.to(torch.float32)
    f = frequency_penalty.to(torch.float32)
    pr = presence_penalty.to(torch.float32)
    fmax = torch.finfo(torch.float32).max
    if logits.device.type != "cpu" or logits.requires_grad:
        # a finite logit saturates rather than overflow (a tiny or huge r): clamp keeps +-inf as is
        enabled = (r != 1) | (f != 0) | (pr != 0)
        scaled = torch.where(x > 0, x / r[:, None], x * r[:, None])
        scaled = torch.where(torch.isfinite(x), scaled.clamp(-fmax, fmax), scaled)
        out = torch.where(seen_mask, scaled, x)
        out = out - f[:, None] * output_counts.to(torch.float32)
        out = out - pr[:, None] * (output_counts > 0).to(torch.float32)
        return torch.where(enabled[:, None], out.to(logits.dtype), logits)
    # CPU: the same arithmetic without full-width selects, the per-token work in numpy (its
    # float32 division, multiplication and clamp round like torch's; a fraction of torch's
    # per-op cost on the few seen tokens of a row).
    rn, fn, pn = r.numpy(), f.numpy(), pr.numpy()
    enabled = (rn != 1) | (fn != 0) | (pn != 0)
    if not enabled.any():
        return logits.clone()
    # A contiguous float32 tensor of our own.
    out = x.clone(memory_format=torch.contiguous_format) if x is logits else x.contiguous()
    # 1. Repetition: only the seen tokens change (x / 1 == x * 1 == x on rows with r = 1).
    flat = np.flatnonzero(seen_mask.contiguous().numpy())
    if flat.size:
        on = out.numpy().reshape(-1)
        v = on[flat]
        r_at = rn[flat // seen_mask.shape[1]]
        with np.errstate(over="ignore"):  # (overflow saturates just below)
            scaled = np.where(v > 0, v / r_at, v * r_at)
        # a finite logit saturates rather than overflow (a tiny or huge r); +-inf stay as they are
        infinite = ~np.isfinite(v)
        np.clip(scaled, -fmax, fmax, out=scaled)
        if infinite.any():
            scaled[infinite] = v[infinite]
        on[flat] = scaled
    # 2, 3. Frequency and presence, dense (l - f * count - pr * [count > 0] on every token,
    # as written, so that signed zeros come out alike). A row with f = pr = +0.0 would only
    # subtract +0.0, which changes nothing: skip the passes when that holds for every row.
    if ((fn != 0) | np.signbit(fn) | (pn != 0) | np.signbit(pn)).any():
        out.sub_(output_counts.to(torch.float32).mul_(f[:, None]))
        out.sub_((output_counts > 0).to(torch.float32).mul_(pr[:, None]))
    out = out.to(logits.dtype)
    if enabled.all():
        return out
    off = torch.from_numpy(np.flatnonzero(~enabled))
    return out.index_copy_(0, off, logits.index_select(0, off))


def rescue_empty_rows(processed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Give a row that ends with every token removed back its most likely input token.

    Bans (min_tokens, no_repeat_ngram) and a DRY penalty that overflows can remove every token of a row; such a row keeps
    its input argmax, at its input value, so a draw is always possible (DESIGN.md).

    Args:
        processed: fp32 [B, V], the chain's result (-inf = removed).
        logits: [B, V], the chain's input.
    Returns:
        ``processed`` itself when no row is empty on the CPU, else a new fp32 [B, V] tensor.
        Ties for the argmax: the lowest token id.
    """
    empty = processed.amax(dim=-1) == float("-inf")  # == isneginf(x).all(-1), in one reduction
    if processed.device.type == "cpu":
        # No device sync on the CPU: touch only the (rare) empty rows.
        if not bool(empty.any()):
            return processed
        rows = empty.nonzero().squeeze(1)
        cols = logits[rows].argmax(dim=-1)
        processed = processed.clone()
        processed[rows, cols] = logits[rows, cols].float()
        return processed
    top = torch.zeros_like(processed, dtype=torch.bool).scatter_(1, logits.argmax(dim=-1, keepdim=True), True)
    return torch.where(empty[:, None] & top, logits.float(), processed)
