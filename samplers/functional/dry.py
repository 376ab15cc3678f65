"""DRY ("Don't Repeat Yourself"): penalise tokens that would extend a repeated sequence."""

from __future__ import annotations

import torch

from ..history import TokenHistory

__all__ = ["dry"]


def dry(
    logits: torch.Tensor,
    history: TokenHistory,
    dry_multiplier: torch.Tensor,
    dry_base: torch.Tensor,
    dry_allowed_length: torch.Tensor,
    dry_range: torch.Tensor,
    dry_sequence_breaker_ids: torch.Tensor,
) -> torch.Tensor:
    """DRY penalty, the exact definition of SEMANTICS.md (text-generation-webui / llama.cpp).

    Args:
        logits: [B, V] float (float32 / float16 / bfloat16).
        history: the rows' histories (prompt + output), same rows and device.
        dry_multiplier: float32 [B], >= 0; 0 disables the row.
        dry_base: float32 [B], > 1.
        dry_allowed_length: int64 [B], >= 1 (a value < 1 is treated as 1).
        dry_range: int64 [B], >= 0; 0 = the whole history, else only its last dry_range tokens.
        dry_sequence_breaker_ids: int64 [B, K], each row's breaker token ids padded with -1
            (K may be 0; ids outside [0, V) are ignored).

    Definition, per row, with h = the last dry_range tokens of the history (all if 0),
    len = len(h): if len < 2 or h[-1] is a breaker, no penalty. Otherwise for each earlier
    position i < len - 1 with h[i] == h[-1], the match length m is the largest m such that
    h[i-k] == h[len-1-k] for 0 <= k < m, with i - (m - 1) >= 0 and no breaker among the
    matched tokens; the candidate is h[i+1], never penalised if it is itself a breaker. For
    each candidate token t, M(t) = max m over its occurrences; if M(t) >= allowed_length:
        l[t] -= multiplier * base ** (M(t) - allowed_length)
    (float32; no cap on match length or number of occurrences).

    Computation (no loop over rows or positions). Let H be the full history, len = len(H),
    start = max(0, len - dry_range) (0 when dry_range = 0) the index in H of h's first
    token, and j = i + 1 the position in H of the candidate. Then
        m(j) = min(match_lengths[j], j - start, trailing)
    where match_lengths[j] is the longest common suffix of H[:j] and H
    (`TokenHistory.match_lengths`, kept up to date incrementally) and trailing is the number
    of non-breaker tokens at the end of H (matched tokens are equal on both sides, so a
    breaker on either side is a breaker on the reference side, and a match that reaches a
    breaker stops there). Only positions with match_lengths[j] >= allowed_length can be
    penalised; they are gathered with `nonzero` (a device sync on accelerators: the Triton
    path is the fast one there), so natural text costs little. For a token, the longest
    match gives the largest penalty (base > 1 and multiplier >= 0, as validated), and
    fl(l - max(pen)) == min(fl(l - pen)) because rounding is monotone, so M(t) and the
    subtraction are one scatter-amin over the candidate positions.

    Returns [B, V] in the input's dtype. `-inf` logits stay `-inf` (a penalty that overflows
    float32 is `inf` and gives `-inf`, never NaN). Rows with multiplier 0 are bit-identical
    (final `torch.where`).
    """
    b, v = logits.shape
    if history.vocab_size > v:
        raise ValueError(f"dry: history vocab_size {history.vocab_size} exceeds the logits' {v} columns")
    w = history.max_length
    if w < 2 or b == 0:
        return logits.clone()
    dev = logits.device
    i32 = torch.int32
    lens = history.lengths.to(i32)
    allowed = dry_allowed_length.clamp(min=1).to(i32)
    out = logits.to(torch.float32, copy=True)

    # Breaker table [B, 1 + V], shifted by one: column 1 + t is token t, column 0 stands for
    # the padding (-1) and for breaker ids outside [0, V), and is never a breaker.
    brk_ids = dry_sequence_breaker_ids.to(torch.int64).reshape(b, -1)
    table = torch.zeros(b, v + 1, dtype=torch.bool, device=dev)
    table.scatter_(1, torch.where((brk_ids >= 0) & (brk_ids < v), brk_ids + 1, 0), True)
    table[:, 0] = False
    last_tok = history.tokens.gather(1, (history.lengths - 1).clamp(min=0)[:, None])  # [B, 1]
    last_is_brk = table.gather(1, last_tok + 1)[:, 0]  # empty row: padding -> False
    enabled = (dry_multiplier != 0) & (lens >= 2) & ~last_is_brk

    # m(j) <= match_lengths[j]; a position can only be penalised if that is >= allowed
    # (match_lengths is 0 outside h, so these positions are inside h). Work on those only.
    match_full = history.match_lengths()
    cand_b, cand_j = ((match_full[:, :w] >= allowed[:, None]) & enabled[:, None]).nonzero(as_tuple=True)
    if cand_b.numel():
        tok = history.tokens[:, :w]
        pos = torch.arange(w, device=dev, dtype=i32)
        # trailing = number of non-breaker tokens at the end of h = len - 1 - (last breaker or -1).
        is_brk = table.gather(1, tok + 1)  # padding -> column 0 -> False
        last_brk = torch.where(is_brk, pos[None, :], -1).amax(dim=1)
        trailing = lens - 1 - last_brk
        rng = dry_range.to(i32)
        start = torch.where(rng > 0, (lens - rng).clamp(min=0), 0)

        def per_row(x: torch.Tensor) -> torch.Tensor:  # [B] -> one value per candidate
            return x.index_select(0, cand_b)

        lin = cand_b * history.capacity + cand_j  # flat index into [B, capacity] state
        t = history.tokens.reshape(-1).index_select(0, lin)
        m = match_full.reshape(-1).index_select(0, lin)
        m = torch.minimum(m, cand_j.to(i32) - per_row(start))
        m = torch.minimum(m, per_row(trailing))
        a = per_row(allowed)
        hit = (m >= a) & ~table.reshape(-1).index_select(0, cand_b * (v + 1) + t + 1)
        # For a token, the largest m gives the largest penalty (base > 1), and
        # l - max(pen) == min(l - pen) exactly (float rounding is monotone): scatter-amin.
        pen = per_row(dry_multiplier.to(torch.float32)) * torch.pow(
            per_row(dry_base.to(torch.float32)), (m - a).clamp(min=0).to(torch.float32)
        )
        flat_idx = cand_b * v + t
        flat = out.view(-1)
        vals = torch.where(hit, flat.index_select(0, flat_idx) - pen, float("inf"))
        flat.scatter_reduce_(0, flat_idx, vals, reduce="amin", include_self=True)
    return torch.where(enabled[:, None], out.to(logits.dtype), logits)
