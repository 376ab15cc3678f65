"""no_repeat_ngram_size: forbid completing an n-gram that already occurs in the history."""

from __future__ import annotations

import torch

from ..history import TokenHistory, check_history
from ._stats import ParamLike, carry_removed, check_logits, noted_removed, sampler_param

__all__ = ["no_repeat_ngram", "no_repeat_ngram_"]


def no_repeat_ngram(
    logits: torch.Tensor,
    history: TokenHistory,
    no_repeat_ngram_size: ParamLike,
) -> torch.Tensor:
    """Remove every token that would repeat an n-gram of the row's history.

    Args:
        logits: [B, V] float (float32 / float16 / bfloat16).
        history: the rows' histories h = prompt + output (same rows, same device).
        no_repeat_ngram_size: int64 [B] (or a number for every row), n >= 0; 0 disables.

    Definition (SEMANTICS.md), per row with len = len(h): if len >= n - 1, remove every
    token t such that (h[len-n+1:], t) occurs as an n-gram of h, i.e. remove h[j] for every
    j in [n-1, len-1] with h[j-n+1:j] == h[len-n+1:len]. n = 1 removes every token of h;
    if len < n - 1 nothing is removed. Computed as: remove h[j] iff
    `history.match_lengths()[j] >= n - 1` (the longest common suffix of h[:j] and h is at
    least n - 1; it is <= j, so j >= n - 1 holds automatically).

    Returns [B, V] in the input's dtype; removed tokens are `-inf`, all other entries (and
    every row with n = 0) bit-identical. It does not protect the argmax: if every token of
    a row is banned, the row is all `-inf` (as in Hugging Face's processor).
    """
    check_logits(logits)
    out = logits.clone(memory_format=torch.contiguous_format)
    carry_removed(noted_removed(logits), out)
    return no_repeat_ngram_(out, history, no_repeat_ngram_size)


def no_repeat_ngram_(
    x: torch.Tensor,
    history: TokenHistory,
    no_repeat_ngram_size: ParamLike,
) -> torch.Tensor:
    """`no_repeat_ngram` in place on ``x`` ([B, V] float, contiguous); returns ``x``. Only
    the banned entries are written (a chain that owns its rows saves a [B, V] copy)."""
    check_logits(x)
    if not x.is_contiguous():
        raise ValueError(f"no_repeat_ngram_: x must be contiguous, got strides {x.stride()}")
    b, v = x.shape
    check_history(history, x, "no_repeat_ngram")
    n = sampler_param(no_repeat_ngram_size, x, "no_repeat_ngram_size")[:, None]
    w = history.max_length
    if w == 0 or b == 0:
        return x
    noted = noted_removed(x)  # (read before the bans are written: they bump x's version)
    if x.device.type == "cpu":
        n_np = n[:, 0].numpy()
        if ((n_np == 0) | (n_np >= 2)).all():
            # Every banned position has match >= n - 1 >= 1: a nonzero entry, which the
            # history keeps listed (no pass over the histories). Index arithmetic in numpy
            # (a fraction of torch's per-op cost on these short lists).
            rows_np, cols_np, match_np = history.match_entries_host()
            n_at = n_np[rows_np]
            sel = (n_at >= 1) & (match_np >= n_at - 1)
            rows_np, cols_np = rows_np[sel], cols_np[sel]
            flat_np = rows_np * v + history.tokens.numpy()[rows_np, cols_np]
            x.view(-1)[torch.from_numpy(flat_np)] = float("-inf")
            carry_removed(noted, x, flat_np)
            return x
    match = history.match_lengths()[:, :w]
    tok = history.tokens[:, :w]
    pos = torch.arange(w, device=x.device)
    hit = (n >= 1) & (pos[None, :] < history.lengths[:, None]) & (match >= n - 1)
    if x.device.type == "cpu":
        # Only the banned (row, token) pairs are written (a token banned twice gets -inf
        # twice): no [B, V] mask. Reading the hits' count costs no device sync on the CPU.
        rows, cols = hit.nonzero(as_tuple=True)
        flat = rows * v + tok[rows, cols]
        x.view(-1)[flat] = float("-inf")
        carry_removed(noted, x, flat.numpy())
        return x
    banned = torch.zeros(b, v + 1, dtype=torch.bool, device=x.device)
    banned.scatter_(1, torch.where(hit, tok, v), True)
    return x.masked_fill_(banned[:, :v], float("-inf"))
