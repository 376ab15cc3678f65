"""DRY ("Don't Repeat Yourself"): penalise tokens that would extend a repeated sequence."""

from __future__ import annotations

from typing import Optional

import torch

from ..history import TokenHistory, check_history, is_integer_dtype
from ._stats import (ParamLike, carry_removed, cast_saturating, check_logits, noted_removed, pow_per_entry,
                     sampler_param)

__all__ = ["dry", "dry_"]


def dry(
    logits: torch.Tensor,
    history: TokenHistory,
    dry_multiplier: ParamLike,
    dry_base: ParamLike,
    dry_allowed_length: ParamLike,
    dry_range: ParamLike,
    dry_sequence_breaker_ids: torch.Tensor,
) -> torch.Tensor:
    """DRY penalty, the exact definition of SEMANTICS.md (text-generation-webui / llama.cpp).

    Args:
        logits: [B, V] float (float32 / float16 / bfloat16).
        history: the rows' histories (prompt + output), same rows and device.
        dry_multiplier: float32 [B] (or a number for every row), >= 0; 0 disables the row.
        dry_base: float32 [B] (or a number), > 1.
        dry_allowed_length: int64 [B] (or a number), >= 1.
        dry_range: int64 [B] (or a number), >= 0; 0 = the whole history, else only its last
            dry_range tokens.
        dry_sequence_breaker_ids: integer [B, K], each row's breaker token ids padded with -1
            (K may be 0; ids outside [0, V) are ignored), or [K]: the same ids for every row.

    Definition, per row, with h = the last dry_range tokens of the history (all if 0),
    len = len(h): if len < 2 or h[-1] is a breaker, no penalty. Otherwise for each earlier
    position i < len - 1 with h[i] == h[-1], the match length m is the largest m such that
    h[i-k] == h[len-1-k] for 0 <= k < m, with i - (m - 1) >= 0 and no breaker among the
    matched tokens; the candidate is h[i+1], never penalised if it is itself a breaker. For
    each candidate token t, M(t) = max m over its occurrences; if M(t) >= allowed_length:
        l[t] -= multiplier * base ** (M(t) - allowed_length)
    (float32; no cap on match length or number of occurrences).

    The computation is `dry_` (in place, float32) applied to a float32 copy of the logits,
    cast back to the input dtype; see `dry_`.

    Returns [B, V] in the input's dtype. `-inf` logits stay `-inf` (a penalty that overflows
    float32 is `inf` and gives `-inf`, never NaN); a finite result beyond the input dtype's
    range saturates at its largest finite value. Rows with multiplier 0 are bit-identical
    (`dry_` leaves them untouched, and float16 / bfloat16 -> float32 -> the same dtype is an
    exact round trip).
    """
    check_logits(logits)
    out = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    carry_removed(noted_removed(logits), out)
    dry_(out, history, dry_multiplier, dry_base, dry_allowed_length, dry_range, dry_sequence_breaker_ids)
    return cast_saturating(out, logits.dtype)


#: Up to this many breaker ids per row, breakers are found by comparing each position with
#: every id ([B, w, K] booleans); more are looked up in the sorted ids (searchsorted).
_BROADCAST_BREAKERS = 8


def _breaker_rows(ids: object, x: torch.Tensor) -> torch.Tensor:
    """``dry_sequence_breaker_ids`` as int64 ``[B, K]`` on ``x``'s device (``x``: ``[B, V]``):
    an integer ``[B, K]`` tensor as given, a ``[K]`` one for every row; anything else is a
    ``ValueError`` naming the parameter (a float id would be truncated, and a ``[K]`` one
    read as ``[B, K / B]``, each row getting other ids)."""
    b = x.shape[0]
    if not isinstance(ids, torch.Tensor) or not is_integer_dtype(ids.dtype):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"dry_sequence_breaker_ids: expected an integer tensor [B, K] (or [K] for every row), "
                         f"got {got}")
    if ids.dim() == 1:
        ids = ids[None, :].expand(b, -1)
    elif ids.dim() != 2 or ids.shape[0] != b:
        raise ValueError(f"dry_sequence_breaker_ids: expected shape [{b}, K] (or [K] for every row), "
                         f"got {tuple(ids.shape)}")
    return ids.to(device=x.device, dtype=torch.int64)


def _breaker_mask(tok: torch.Tensor, breaker_ids: torch.Tensor, search: Optional[bool] = None) -> torch.Tensor:
    """bool [B, w]: tok[b, j] (a history token, or the padding -1) is one of row b's
    breakers. History tokens lie in [0, vocab_size) and vocab_size <= V, so the padding
    mask (tok >= 0) is all that keeps ids outside [0, V) (the -1 padding included) from
    matching. ``search``: look the tokens up in the sorted ids (default when K > 8) rather
    than comparing with each; same result, and no [B, V] table either way."""
    k = breaker_ids.shape[1]
    if k == 0:
        return torch.zeros(tok.shape, dtype=torch.bool, device=tok.device)
    if search is None:
        search = k > _BROADCAST_BREAKERS
    if search:
        srt = breaker_ids.sort(dim=1).values
        idx = torch.searchsorted(srt, tok.contiguous()).clamp_(max=k - 1)
        found = srt.gather(1, idx) == tok
    else:
        found = (tok[:, :, None] == breaker_ids[:, None, :]).any(dim=2)
    return found & (tok >= 0)


def dry_(
    x: torch.Tensor,
    history: TokenHistory,
    dry_multiplier: ParamLike,
    dry_base: ParamLike,
    dry_allowed_length: ParamLike,
    dry_range: ParamLike,
    dry_sequence_breaker_ids: torch.Tensor,
    *,
    sync_free: Optional[bool] = None,
) -> torch.Tensor:
    """DRY (the definition in `dry`) in place on a contiguous float32 [B, V] tensor ``x``;
    returns ``x``. Rows whose multiplier is 0 (or that the definition leaves alone) are not
    modified. Other arguments as in `dry`.

    ``sync_free``: how the penalised history positions are found (both give bit-identical
    results). False: gather them with `nonzero` (a device -> host sync on accelerators;
    natural text has few, so little work follows). True: process all B * w positions
    (w = the longest history) densely, a non-position contributing `+inf` to the
    scatter-amin below (a no-op), so nothing waits for the device. None (default): True
    unless ``x`` is on the CPU.

    Computation (no loop over rows or positions). Let H be the full history, len = len(H),
    start = max(0, len - dry_range) (0 when dry_range = 0) the index in H of h's first
    token, and j = i + 1 the position in H of the candidate. Then
        m(j) = min(match_lengths[j], j - start, trailing)
    where match_lengths[j] is the longest common suffix of H[:j] and H
    (`TokenHistory.match_lengths`, kept up to date incrementally) and trailing is the number
    of non-breaker tokens at the end of H (matched tokens are equal on both sides, so a
    breaker on either side is a breaker on the reference side, and a match that reaches a
    breaker stops there). Each position's token is compared with the row's breaker ids (or
    looked up in them sorted, when there are many): no [B, V] table. Position j is penalised
    iff the row is enabled (multiplier != 0, len >= 2, H[-1] not a breaker), m(j) >= allowed
    and H[j] is not a breaker; its penalty is multiplier * base ** (m(j) - allowed) in
    float32, each power a function of its base and exponent alone (``pow_per_entry``: the
    same in both selections and in any batch). For a token, the longest match gives the
    largest penalty (base > 1 and multiplier >= 0, as validated), and fl(l - max(pen)) ==
    min(fl(l - pen)) because rounding is monotone, so M(t) and the subtraction are one
    scatter-amin into ``x`` over the positions.
    """
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(
            f"dry_: x must be a contiguous float32 [B, V] tensor, got {x.dtype} of shape {tuple(x.shape)}"
        )
    b, v = x.shape
    check_history(history, x, "dry")
    dry_sequence_breaker_ids = _breaker_rows(dry_sequence_breaker_ids, x)
    dry_multiplier = sampler_param(dry_multiplier, x, "dry_multiplier")
    dry_base = sampler_param(dry_base, x, "dry_base")
    dry_allowed_length = sampler_param(dry_allowed_length, x, "dry_allowed_length")
    dry_range = sampler_param(dry_range, x, "dry_range")
    w = history.max_length
    if w < 2 or b == 0:
        return x
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    if not sync_free and x.device.type == "cpu":
        return _dry_from_entries(x, history, dry_multiplier, dry_base, dry_allowed_length, dry_range,
                                 dry_sequence_breaker_ids)
    noted = noted_removed(x)  # (read before x is written: the write bumps its version)
    dev = x.device
    f32 = torch.float32
    tok = history.tokens[:, :w]  # [B, w] int64, padding -1
    match = history.match_lengths()[:, :w]  # [B, w] int32, 0 outside h
    lens = history.lengths
    allowed = dry_allowed_length.clamp(min=1)  # integers: int32 / int64 mix without casts
    mult = dry_multiplier.to(f32)
    pos = torch.arange(w, device=dev)

    is_brk = _breaker_mask(tok, dry_sequence_breaker_ids)  # padding -> False
    last_is_brk = is_brk.gather(1, (lens - 1).clamp(min=0)[:, None])[:, 0]  # empty row: padding -> False
    enabled = (mult != 0) & (lens >= 2) & ~last_is_brk

    if sync_free:
        # every position: [B, w] tensors, per-row values broadcast along the row
        def at(t2d: torch.Tensor) -> torch.Tensor:
            return t2d

        def per_row(t1d: torch.Tensor) -> torch.Tensor:
            return t1d[:, None]

        j = pos[None, :]
    else:
        # m(j) <= match_lengths[j]: only positions with match_lengths >= allowed can be
        # penalised (match_lengths is 0 outside h, so these are inside h).
        cand_b, cand_j = ((match >= allowed[:, None]) & enabled[:, None]).nonzero(as_tuple=True)
        if cand_b.numel() == 0:
            return x

        def at(t2d: torch.Tensor) -> torch.Tensor:
            return t2d[cand_b, cand_j]

        def per_row(t1d: torch.Tensor) -> torch.Tensor:
            return t1d.index_select(0, cand_b)

        j = cand_j

    # trailing = number of non-breaker tokens at the end of h = len - 1 - (last breaker or -1).
    last_brk = torch.where(is_brk, pos[None, :], -1).amax(dim=1)
    trailing = lens - 1 - last_brk
    rng = dry_range.to(torch.int64)
    start = torch.where(rng > 0, (lens - rng).clamp(min=0), 0)
    a = per_row(allowed)
    m = torch.minimum(torch.minimum(at(match), j - per_row(start)), per_row(trailing))
    hit = (m >= a) & ~at(is_brk)
    if sync_free:
        hit &= enabled[:, None]
    k = (m - a).clamp(min=0)  # int64
    if sync_free:
        pen = mult[:, None] * pow_per_entry(dry_base[:, None], k.to(f32))
        t = tok.clamp(min=0)  # padding: not a hit, any column will do
        # fl(l - max(pen)) == min(fl(l - pen)): scatter-amin; +inf (no hit) is a no-op
        vals = torch.where(hit, x.gather(1, t) - pen, float("inf"))
        x.scatter_reduce_(1, t, vals, reduce="amin", include_self=True)
        if noted is not None:
            flat_idx = (torch.arange(b, device=dev)[:, None] * v + t).reshape(-1)
            _carry_removed(noted, x, flat_idx, vals.reshape(-1))
    else:
        pen = per_row(mult) * pow_per_entry(per_row(dry_base), k.to(f32))
        flat_idx = cand_b * v + at(tok)
        flat = x.view(-1)
        vals = torch.where(hit, flat.index_select(0, flat_idx) - pen, float("inf"))
        flat.scatter_reduce_(0, flat_idx, vals, reduce="amin", include_self=True)
        _carry_removed(noted, x, flat_idx, vals)
    return x


def _carry_removed(noted: Optional[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, flat_idx: torch.Tensor,
                   vals: torch.Tensor) -> None:
    """After the scatter-amin of ``vals`` into ``x`` at ``flat_idx``: the removed tokens noted
    for ``x`` before it (``noted_removed``) plus those where a penalty overflowed to ``-inf``."""
    if noted is not None:
        carry_removed(noted, x, flat_idx[vals == float("-inf")].cpu().numpy())


def _dry_from_entries(
    x: torch.Tensor,
    history: TokenHistory,
    dry_multiplier: torch.Tensor,
    dry_base: torch.Tensor,
    dry_allowed_length: torch.Tensor,
    dry_range: torch.Tensor,
    dry_sequence_breaker_ids: torch.Tensor,
) -> torch.Tensor:
    """`dry_` on the CPU from the history's nonzero match lengths (`match_entries`, kept by
    its incremental update) instead of passes over every history position: the same
    positions, penalties and result.

    Only candidate positions (match length >= allowed) are looked at: their tokens are
    checked against the breakers one by one, and ``trailing`` (non-breaker tokens at the end
    of h) is only needed up to the longest candidate match L, so only the last L tokens of
    each row are checked. The powers ``base ** k`` are ``pow_per_entry``'s, as in `dry_`.
    """
    b, v = x.shape
    w = history.max_length
    f32 = torch.float32
    tok = history.tokens
    lens = history.lengths
    noted = noted_removed(x)  # (read before x is written: the write bumps its version)
    allowed = dry_allowed_length.clamp(min=1)
    mult = dry_multiplier.to(f32)
    brk_ids = dry_sequence_breaker_ids

    last_tok = tok.gather(1, (lens - 1).clamp(min=0)[:, None])  # empty row: padding -1
    last_is_brk = _breaker_mask(last_tok, brk_ids)[:, 0]
    enabled = (mult != 0) & (lens >= 2) & ~last_is_brk

    rows, cols, match = history.match_entries()
    sel = enabled.index_select(0, rows) & (match >= allowed.index_select(0, rows))
    rows, cols, match = rows[sel], cols[sel], match[sel].to(torch.int64)
    if rows.numel() == 0:
        return x

    # trailing, capped at the longest candidate match (a longer run changes no min below).
    span = min(int(match.max()), w)
    idx = lens[:, None] - span + torch.arange(span)[None, :]  # the last `span` positions of h
    inside = idx >= 0
    win_brk = _breaker_mask(tok.gather(1, idx.clamp(min=0)), brk_ids) & inside
    last_in_win = torch.where(win_brk, torch.arange(span)[None, :], -1).amax(dim=1)
    trailing = torch.where(last_in_win >= 0, span - 1 - last_in_win, torch.minimum(lens, torch.tensor(span)))

    rng = dry_range.to(torch.int64)
    start = torch.where(rng > 0, (lens - rng).clamp(min=0), 0)
    a = allowed.index_select(0, rows)
    m = torch.minimum(torch.minimum(match, cols - start.index_select(0, rows)), trailing.index_select(0, rows))
    cand_tok = tok[rows, cols]
    hit = (m >= a) & ~_breaker_mask(cand_tok[:, None], brk_ids.index_select(0, rows))[:, 0]
    k = (m - a).clamp(min=0)
    pen = mult.index_select(0, rows) * pow_per_entry(dry_base.index_select(0, rows), k.to(f32))
    flat_idx = rows * v + cand_tok
    flat = x.view(-1)
    vals = torch.where(hit, flat.index_select(0, flat_idx) - pen, float("inf"))
    flat.scatter_reduce_(0, flat_idx, vals, reduce="amin", include_self=True)
    _carry_removed(noted, x, flat_idx, vals)
    return x
