"""Token-history samplers: penalties and no_repeat_ngram as in-kernel stages; logit_bias,
min_tokens (sparse, a few entries per row) and DRY (the torch match search) on the side.

Mirrors ``samplers.functional.penalties``, ``ngram`` and ``dry``:

- repetition / frequency / presence penalties: an elementwise stage of the fused chain that
  reads the history's ``seen_mask`` (bool [B, V]) and ``output_counts`` (int32 [B, V]), which
  ``TokenHistory`` keeps up to date in O(B) per step.
- no_repeat_ngram: the banned-token mask comes from the history's ``match_lengths`` (the
  torch match search of ``samplers.functional.ngram``, a scatter of O(B * len) work; the
  chain keeps one mask per batch and updates it in place, ``NgramBanMask``); the fused chain
  applies it as an in-kernel stage.
- logit_bias and min_tokens: scatter ops on the few listed (row, token) entries, applied in
  place on the fp32 working copy (no extra kernel over [B, V]).
- DRY: ``samplers.functional.dry.dry_`` (vectorised torch, runs on the GPU without a device
  sync) in place on the fp32 working tensor; see kernels/README.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from samplers.history import TokenHistory


@triton.jit
def stage_penalties(x, seen, counts, r, f, pr, en):
    """``F.penalties``: seen -> (l > 0 ? l / r : l * r); l -= f * count; l -= pr * (count > 0)."""
    en = en & ((r != 1.0) | (f != 0.0) | (pr != 0.0))
    safe_r = tl.where(en, r, 1.0)
    out = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, safe_r), x * safe_r), x)
    cf = counts.to(tl.float32)
    fc = f * cf
    out = out - fc
    pres = pr * (counts > 0).to(tl.float32)
    out = out - pres
    return tl.where(en, out, x)


@triton.jit
def stage_ban(x, banned, en):
    """Remove the banned tokens of enabled rows (no_repeat_ngram's mask)."""
    return tl.where(en & banned, float("-inf"), x)


def _ngram_ban_index(history: TokenHistory, no_repeat_ngram_size: torch.Tensor, vocab: int) -> Optional[torch.Tensor]:
    """int64 [B, w]: the token each history position bans (``samplers.functional.no_repeat_ngram``'s
    rule: h[j] iff match_lengths[j] >= n - 1, for n >= 1), ``vocab`` (a spare column) where
    it bans nothing; None when no history exists. O(B * w) work, no device sync."""
    w = history.max_length
    if w == 0:
        return None
    n = no_repeat_ngram_size.to(torch.int64)[:, None]
    match = history.match_lengths()[:, :w]
    tok = history.tokens[:, :w]
    pos = torch.arange(w, device=tok.device)
    hit = (n >= 1) & (pos[None, :] < history.lengths[:, None]) & (match >= n - 1)
    return torch.where(hit, tok, vocab)


def ngram_banned(history: TokenHistory, no_repeat_ngram_size: torch.Tensor, vocab: int) -> Optional[torch.Tensor]:
    """bool [B, V] mask of the tokens ``samplers.functional.no_repeat_ngram`` removes (the same
    rule: ban h[j] iff match_lengths[j] >= n - 1), or None when no history exists.
    A new mask each call; ``NgramBanMask`` keeps one up to date across steps."""
    idx = _ngram_ban_index(history, no_repeat_ngram_size, vocab)
    if idx is None:
        return None
    banned = torch.zeros(history.batch_size, vocab + 1, dtype=torch.bool, device=idx.device)
    banned.scatter_(1, idx, True)
    return banned[:, :vocab]


class NgramBanMask:
    """A batch's no_repeat_ngram ban mask kept across steps, for ``samplers.kernels.chain``.

    ``update`` returns the same bool [B, V] view (of a [B, V + 1] buffer allocated once)
    equal to ``ngram_banned(...)`` (all False for empty histories): it clears the entries
    the previous update set and sets the new ones, two scatters of O(B * len) instead of
    writing a [B, V] mask every step. The returned mask is valid until the next update
    (on an accelerator the scatters are ordered after the launches that read it)."""

    def __init__(self, batch_size: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self._buf = torch.zeros(batch_size, vocab + 1, dtype=torch.bool, device=device)
        self._idx: Optional[torch.Tensor] = None

    def update(self, history: TokenHistory, no_repeat_ngram_size: torch.Tensor) -> torch.Tensor:
        idx = _ngram_ban_index(history, no_repeat_ngram_size, self.vocab)
        if self._idx is not None:
            self._buf.scatter_(1, self._idx, False)
        if idx is not None:
            self._buf.scatter_(1, idx, True)
        self._idx = idx
        return self._buf[:, : self.vocab]


def apply_sparse_(x32: torch.Tensor, batch) -> torch.Tensor:
    """logit_bias then min_tokens, in place on the fp32 working copy ``x32`` (the semantics of
    ``F.logit_bias`` and ``F.min_tokens``: bias summed in fp32, stop ids -inf while the row's
    output is shorter than its ``min_tokens``)."""
    if batch.logit_bias_coo is not None:
        rows, ids, bias = batch.logit_bias_coo
        x32.index_put_((rows, ids), bias.to(torch.float32), accumulate=True)
    if batch.min_tokens_coo is not None:
        rows, ids = batch.min_tokens_coo
        active = (batch.output_lengths < batch.param("min_tokens"))[rows]
        current = x32[rows, ids]
        x32[rows, ids] = torch.where(active, torch.full_like(current, float("-inf")), current)
    return x32
