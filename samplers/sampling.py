"""The last step: seeded random numbers, the token draw, and log-probabilities.

Random numbers come from Philox4x32-10, a counter-based generator: a row's numbers are a
pure function of (key, counter), so a seeded row draws the same token whatever the batch
composition and its position in it. The stream layout (shared with the Triton kernels,
where ``tl.philox`` computes the same bits):

    key     = the row's 64-bit seed (lo, hi words); unseeded rows get a key drawn from the
              pipeline's ``torch.Generator`` for each call
    counter = (step, sequence_index, purpose, 0), step = number of output tokens so far,
              sequence_index = j of the n sequences of a request, purpose = PURPOSE_*
    uniform = first output word -> float32 in [0, 1), exactly as Triton's
              ``uint_to_uniform_float`` (so ``tl.rand``-style kernels reproduce it bit for bit)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, TypeVar

import numpy as np
import torch

from ._lanes import LanePacked, lane_pack
from .functional._stats import cumsum_is_running_sum, flat_not_below, packed_columns

PURPOSE_DRAW = 0
PURPOSE_XTC = 1

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
# Largest float32 scale with (2**31 - 1) * scale < 1.0 (Triton's constant).
_UNIFORM_SCALE = 4.6566127342e-10


def _mul32(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``const * x`` for uint32 values held in int64 tensors.

    int64 cannot hold a 64-bit product, so ``const`` is split into 16-bit halves.
    """
    p_lo = x * (const & 0xFFFF)
    p_hi = x * (const >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
    k0: torch.Tensor, k1: torch.Tensor, rounds: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (Random123) on uint32 words stored in int64 tensors of one shape.

    On the CPU numpy computes it (``_philox4x32_words``, the same bits): the torch route
    is ~200 small tensor operations, ~0.3 ms per call whatever the batch size, which
    was most of a small batch's XTC and draw."""
    words = (c0, c1, c2, c3, k0, k1)
    if all(w.device.type == "cpu" for w in words):
        w0, w1, w2, w3, w4, w5 = (w.numpy().astype(np.uint64) for w in words)
        o0, o1, o2, o3 = (torch.from_numpy(o.astype(np.int64))
                          for o in _philox4x32_words(w0, w1, w2, w3, w4, w5, rounds=rounds))
        return o0, o1, o2, o3
    return _philox4x32_torch(*words, rounds=rounds)


def _philox4x32_torch(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
    k0: torch.Tensor, k1: torch.Tensor, rounds: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``philox4x32`` in torch operations (any device)."""
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


_Words = TypeVar("_Words", int, np.ndarray)


def _philox4x32_words(c0: _Words, c1: _Words, c2: _Words, c3: _Words, k0: _Words, k1: _Words,
                      rounds: int = 10) -> tuple[_Words, _Words, _Words, _Words]:
    """``philox4x32`` on uint32 words held as Python ints (one row) or uint64 numpy arrays.
    A 32 x 32-bit product fits either (one multiplication, no 16-bit halves), so the same
    operators serve both; one row in ints costs ~3 us, a tenth of numpy's per-call overhead."""
    # The constants as the words' own type: numpy uint64 scalars for arrays (no conversion per
    # operation; and numpy 1.x promotes uint64 with a Python int to float64)
    word = int if isinstance(c0, int) else np.uint64
    mask, shift, mul_a, mul_b, step_a, step_b = (
        word(c) for c in (_MASK32, 32, _PHILOX_ROUND_A, _PHILOX_ROUND_B, _PHILOX_KEY_A, _PHILOX_KEY_B))
    for _ in range(rounds):
        prod_a, prod_b = c0 * mul_a, c2 * mul_b
        c0, c1, c2, c3 = (prod_b >> shift) ^ c1 ^ k0, prod_b & mask, (prod_a >> shift) ^ c3 ^ k1, prod_a & mask
        k0, k1 = (k0 + step_a) & mask, (k1 + step_b) & mask
    return c0, c1, c2, c3


def uint32_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 in [0, 1), bit-exact with Triton's conversion."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    magnitude = torch.where(signed < 0, -signed - 1, signed)
    return magnitude.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32,
                                                      device=bits.device)


def split_seed(seed: int) -> tuple[int, int]:
    """A Python int seed (negative allowed) -> its (lo, hi) uint32 key words."""
    s = seed % 2**64
    return s & _MASK32, s >> 32


def row_uniforms(
    key_lo: torch.Tensor, key_hi: torch.Tensor, step: torch.Tensor,
    sequence_index: torch.Tensor, purpose: int,
) -> torch.Tensor:
    """One float32 uniform per row from the stream layout described in the module docstring.
    (On the CPU in numpy, start to end, and a single row in Python ints: the same bits as
    the torch route, a tenth of its fixed cost.)"""
    words = (key_lo, key_hi, step, sequence_index)
    if all(w.device.type == "cpu" for w in words):
        if key_lo.numel() == 1:
            lo, hi, step_w, seq_w = (int(w) & _MASK32 for w in words)
            bits = np.array([_philox4x32_words(step_w, seq_w, purpose & _MASK32, 0, lo, hi)[0]], dtype=np.uint64)
        else:
            lo_a, hi_a, step_a, seq_a = (w.numpy().astype(np.uint64) & np.uint64(_MASK32) for w in words)
            zero = np.zeros_like(step_a)
            bits = _philox4x32_words(step_a, seq_a, zero + np.uint64(purpose & _MASK32), zero, lo_a, hi_a)[0]
        signed = bits.astype(np.uint32).view(np.int32)
        magnitude = signed ^ (signed >> 31)  # -signed - 1 for the negative ones
        return torch.from_numpy(magnitude.astype(np.float32) * np.float32(_UNIFORM_SCALE))
    return _row_uniforms_torch(key_lo, key_hi, step, sequence_index, purpose)


def _row_uniforms_torch(
    key_lo: torch.Tensor, key_hi: torch.Tensor, step: torch.Tensor,
    sequence_index: torch.Tensor, purpose: int,
) -> torch.Tensor:
    """``row_uniforms`` in torch operations (any device)."""
    step = step.to(torch.int64) & _MASK32
    seq = sequence_index.to(torch.int64) & _MASK32
    zero = torch.zeros_like(step)
    out, _, _, _ = _philox4x32_torch(step, seq, zero + purpose, zero, key_lo, key_hi)
    return uint32_to_uniform(out)


def draw_tokens(logits: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor,
                all_greedy: Optional[bool] = None) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: [B, V] processed logits (any float dtype; computed in float32).
        greedy: [B] bool; greedy rows take the argmax (ties: the lowest id).
        uniforms: [B] float32 in [0, 1); random rows take the inverse CDF of
            softmax(logits) in token-id order: the first token whose cumulative probability
            exceeds ``u * total``. (Rounding can put ``u * total`` at or past the last
            cumulative value: the row's last token with a non-zero probability is taken
            then; a row without one gives ``V - 1``.)
        all_greedy: whether every row is greedy, when the caller knows it on the host (it
            then skips the random rows' work); None: read from ``greedy`` on the CPU, taken as
            False elsewhere, where reading a device tensor would be a sync.
    Returns:
        [B] int64 token ids. A removed (-inf) token is never chosen.
    """
    work = logits.float()
    if work.device.type == "cpu" and work.dim() == 2 and work.numel() > 0:
        # (a token has no gradient; the tensor itself otherwise: the packing that the chain
        # noted for it is taken without a pass over the rows)
        return _draw_tokens_cpu(work.detach() if work.requires_grad else work, greedy, uniforms)
    return _draw_tokens_dense(work, greedy, uniforms, all_greedy=all_greedy)


def _draw_tokens_dense(work: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor,
                       all_greedy: Optional[bool] = None) -> torch.Tensor:
    """``draw_tokens`` on float32 ``work`` with full-width passes (any device)."""
    argmax = work.argmax(dim=-1)
    if all_greedy is None:
        all_greedy = work.device.type == "cpu" and bool(greedy.all())
    if all_greedy:
        return argmax
    probs = torch.softmax(work, dim=-1)
    if cumsum_is_running_sum(probs):
        idx = _inverse_cdf(probs, probs.cumsum(dim=-1), uniforms, monotone=True)
    else:
        # The scan's grouping follows the batch's shape: in float32 the same row's sums differ
        # by ulps from one batch size to another, and a seeded row's token with them (~0.2% of
        # draws at V = 32000). In float64 the groupings differ by ~1e-16, which a target lands
        # within about never.
        idx = _inverse_cdf(probs, probs.double().cumsum(dim=-1), uniforms, monotone=False)
    return torch.where(greedy, argmax, idx)


def _inverse_cdf(probs: torch.Tensor, cdf: torch.Tensor, uniforms: torch.Tensor, monotone: bool) -> torch.Tensor:
    """[B] int64: each row's first token *with p > 0* whose cumulative probability exceeds
    ``u * total`` (``total``: the largest cumulative value at a token with p > 0); when none
    does (rounding put the target at or past the total) the row's last token with p > 0, and
    ``V - 1`` for a row without one. Never a token with p = 0.

    ``cdf`` is ``probs.cumsum(-1)``, float32 or float64 (the target is taken in its dtype).
    A parallel scan may round it up or down by an ulp at a token with p = 0, so that it is not
    non-decreasing and a binary search over it could stop at a removed token; the rule above
    reads the sums at tokens with p > 0 only (one more full-width pass). With ``monotone`` (a
    running sum, ``cumsum_is_running_sum``: a token with p = 0 repeats its predecessor's sum)
    the first token past the target has p > 0 anyway, and the last sum is the total: a binary
    search gives the same token."""
    positive = probs > 0
    vocab = probs.shape[-1]
    last_positive = (vocab - 1) - positive.flip(-1).to(torch.int8).argmax(dim=-1)
    if monotone:
        target = (uniforms.to(torch.float32) * cdf[:, -1]).unsqueeze(-1)
        idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        return torch.minimum(idx, last_positive)
    total = torch.where(positive, cdf, torch.zeros_like(cdf)).amax(dim=-1)
    past = positive & (cdf > (uniforms.to(cdf.dtype) * total).unsqueeze(-1))
    first = past.to(torch.int8).argmax(dim=-1)  # (0 when none: replaced below)
    return torch.where(past.any(dim=-1), first, last_positive)


def _draw_tokens_cpu(work: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``_draw_tokens_dense``'s tokens on the CPU, where rows after truncation are mostly
    removed: the softmax runs on lane-preserving packed rows (``_lanes``: torch's kernel gives
    the full rows' ``p`` at the kept entries, bit for bit), and the cumulative sums and the
    search over each row's kept entries, packed to the left in token order (0 after them). A
    cumulative sum is a running sum, to which the zeros of the removed tokens add nothing: the
    first position whose sum exceeds the target has ``p > 0`` (its predecessor's sum is
    smaller), in both; past the row's last one with ``p > 0`` (rounding) both take that last
    one. The argmax is computed only when some row is greedy (no device sync on the CPU)."""
    batch, vocab = work.shape
    any_greedy = bool(greedy.any())
    if any_greedy and bool(greedy.all()):
        return work.argmax(dim=-1)
    rows = lane_pack(work)
    if rows is None:  # (rows mostly kept, no truncation: full-width passes)
        return _draw_tokens_dense(work, greedy, uniforms)
    probs, starts = rows.in_token_order(rows.at_entries(torch.softmax(rows.values, dim=-1)))
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(torch.float32) * cdf[:, -1]).unsqueeze(-1)
    j = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # (past a row's last p > 0, where rounding can put the target: that last one; every row
    # has one, its largest logit's)
    last = (probs.shape[1] - 1) - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    at = torch.minimum(j, last).numpy()
    tokens = torch.from_numpy(rows.flat[starts + at] % vocab)
    return torch.where(greedy, work.argmax(dim=-1), tokens) if any_greedy else tokens


@dataclass
class SamplerOutput:
    """Result of ``SamplerPipeline.sample``.

    token_ids:    [B] int64
    logprobs:     [B] float32, log-probability of each chosen token under the distribution
                  it was drawn from (or the raw model distribution for rows whose
                  ``logprobs_mode`` is "raw")
    top_logprobs: (ids [B, K] int64, values [B, K] float32), K = the largest ``logprobs`` of
                  the batch, most likely first, equal values in ascending token id order
                  (so a row's answer does not depend on K, the other rows or the device);
                  None when no row asks for alternatives. Row b's first
                  ``params[b].logprobs`` columns are its answer. A row left with fewer than
                  K tokens fills its last columns with removed tokens: value ``-inf``, the
                  lowest such ids (``samplers.generate`` leaves them out).
    processed:    [B, V] the processed logits the tokens were drawn from, as ``process``
                  returns them (the logits' dtype; default rows as given), when asked for
                  with ``sample(..., return_processed=True)``; else None.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_logprobs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    processed: Optional[torch.Tensor] = None


class ChainOutput(NamedTuple):
    """What a backend's chain returns (``SamplerPipeline``'s one interface to its backends).

    processed: fp32 [B, V] processed logits (-inf = removed); None when the caller said it
               will not read them (``keep_processed=False``).
    token_ids: int64 [B], the drawn tokens; None when no draw was asked for.
    logprobs:  float32 [B], the drawn tokens' log-probabilities under the processed
               distribution, when the chain returns no ``processed`` (else None or those
               values; the caller can compute them, with the top alternatives, from ``processed``).
    """

    processed: Optional[torch.Tensor]
    token_ids: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None


def compute_logprobs(
    processed: torch.Tensor, raw: torch.Tensor, use_raw: torch.Tensor,
    token_ids: torch.Tensor, num_top: int, any_raw: Optional[bool] = None,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Log-probabilities of the chosen tokens and the top ``num_top`` alternatives.

    ``use_raw`` [B] bool picks the raw model distribution per row instead of the processed one;
    ``any_raw``: whether any row does, when the caller knows it on the host (saves a device sync).
    """
    if any_raw is None:
        any_raw = bool(use_raw.any())
    if any_raw:
        source = torch.where(use_raw.unsqueeze(-1), raw.float(), processed.float())
    else:
        source = processed.float()
    # Rows mostly removed (after a truncation): torch's log_softmax of the kept entries alone,
    # its values on the full rows (``_lanes``); -inf at the removed tokens.
    rows = lane_pack(source)
    if rows is not None:
        packed = torch.log_softmax(rows.values, dim=-1)
        chosen = rows.at_tokens(packed, token_ids, float("-inf"))
        if num_top == 0:
            return chosen, None
        top = _top_of_lanes(rows, packed, source, min(num_top, source.shape[-1]))
        if top is not None:
            return chosen, top
        logp = rows.expand(packed, float("-inf"))
    else:
        logp = torch.log_softmax(source, dim=-1)
        chosen = logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    top = None
    if num_top > 0:
        k = min(num_top, logp.shape[-1])
        top = _top_of_packed(logp, k)
        if top is None:
            top = top_logprobs(logp, k)
    return chosen, top


def top_logprobs(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``logp`` ``[B, V]`` (float32), most likely
    first, equal values in ascending token id order (NaN counts as the largest, as in
    ``topk``): ``(ids [B, k] int64, values [B, k])``.

    The tie rule makes a row's answer its own: ``topk`` orders and selects equal values as its
    kernel happens to (differently for another ``k``, which is the batch's largest
    ``logprobs``, or on another device), so a row's alternatives would depend on the rows
    beside it. Exact on any device without a host read (``_top_by_keys``). On the CPU, where
    reading a result costs no device sync, a plain ``topk`` answers every row whose ``k + 1``
    largest values are distinct (then any exact selection is the same), and the tied rows
    read their few candidates only (``_exact_top``)."""
    if logp.device.type != "cpu" or k + 1 > logp.shape[-1]:
        return _top_by_keys(logp, k)
    head, at = logp.topk(k + 1, dim=-1)
    return _exact_top(head, at[:, :k].contiguous(), torch.zeros(logp.shape[0], dtype=torch.bool),
                      lambda redo: logp.index_select(0, redo))


def _top_by_keys(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_logprobs`` as one ``topk`` of int64 keys, the value's order-preserving bits above
    ``2**31 - 1 - id``, which are all distinct (a [B, V] key: ~5x a ``topk`` on the CPU, where
    ``_top_by_candidates`` takes the tied rows)."""
    bits = (logp + 0.0).view(torch.int32)  # (+ 0.0: -0.0 reads as +0.0, which topk counts equal)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    ordered = torch.where(torch.isnan(logp), 0x7FFFFFFF, ordered).to(torch.int64)  # (any sign)
    id_key = 0x7FFFFFFF - torch.arange(logp.shape[-1], device=logp.device, dtype=torch.int64)
    keys = (ordered << 32).bitwise_or_(id_key)
    ids = 0x7FFFFFFF - keys.topk(k, dim=-1).values.bitwise_and_(0xFFFFFFFF)
    return ids, logp.gather(-1, ids)


def _top_by_candidates(logp: torch.Tensor, k: int, kth: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``top_logprobs`` of CPU rows from their candidates, the entries at or above the row's
    ``k``-th largest value ``kth`` ``[B]`` (``topk``'s values, exact whatever its order among
    ties): ``k`` plus the ties at that value, a handful, taken in id order and sorted stably
    by value. A row with fewer than ``k`` finite entries fills its answer with its lowest
    removed ids, which lie among its first ``k`` columns (all but its finite ones can be
    there): its candidates are its finite entries and those. None where the rows are not
    contiguous-able float32 without autograd, or hold NaN (``_top_by_keys`` orders it)."""
    if logp.dtype != torch.float32 or logp.requires_grad or logp.dim() != 2:
        return None
    x = logp.contiguous().numpy()
    batch, vocab = x.shape
    t = kth.numpy().astype(np.float32)  # (a copy)
    short = np.flatnonzero(t == -np.inf)
    t[short] = np.finfo(np.float32).min  # (their finite entries)
    flat = flat_not_below(x, t)  # (NaN entries too, whatever the threshold)
    if short.size:
        at_rows, at_cols = np.nonzero(x[short, :k] == -np.inf)
        flat = np.sort(np.concatenate((flat, short[at_rows] * vocab + at_cols)))
    values = x.reshape(-1)[flat]
    if np.isnan(values).any():
        return None
    rows, counts, _, at = packed_columns(flat, (batch, vocab))
    negated = np.full((batch, int(counts.max())), np.inf, dtype=np.float32)  # (padding sorts last)
    ids = np.zeros(negated.shape, dtype=np.int64)
    negated[rows, at], ids[rows, at] = -values, flat - rows * vocab
    order = np.argsort(negated, axis=-1, kind="stable")[:, :k]  # (stable: equal values keep id order)
    top_ids = np.take_along_axis(ids, order, axis=-1)
    return torch.from_numpy(top_ids), torch.from_numpy(np.take_along_axis(x, top_ids, axis=-1))


def _top_of_lanes(rows: LanePacked, packed: torch.Tensor, source: torch.Tensor, k: int
                  ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``top_logprobs(torch.log_softmax(source), k)`` from ``packed``, the log_softmax of
    ``rows`` (``lane_pack(source)``), or None when ``k`` exceeds the packed width.

    Where a row's answer depends on the tie rule (a tie at or above the ``k``-th place) or
    reaches past its kept entries (fewer than ``k``), ``top_logprobs`` of that row's full
    log_softmax gives it (the same bits: torch's log_softmax works row by row). In every other
    row the ``k`` largest values are distinct and above every other entry, so the packed
    rows' selection is the full rows', in the same order."""
    if k + 1 > packed.shape[1]:
        return None
    head, at = packed.topk(k + 1, dim=-1)
    ids = torch.from_numpy(rows.token_ids(at[:, :k].numpy()))
    return _exact_top(head, ids, head[:, k - 1] == float("-inf"),
                      lambda redo: torch.log_softmax(source.index_select(0, redo), dim=-1))


def _exact_top(head: torch.Tensor, ids: torch.Tensor, unsure: torch.Tensor,
               full_rows: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_logprobs``' ``(ids, values)`` from a selection among the kept entries: ``head``
    ``[B, k + 1]`` its largest values in descending order, ``ids`` ``[B, k]`` their token ids.
    A row's selection is the answer where its ``k + 1`` values strictly decrease (distinct,
    the ``k``-th above every other entry) and ``unsure`` ``[B]`` bool is False; the other
    rows take ``top_logprobs`` of ``full_rows(rows)`` (the full log-probability rows of those
    row indices): ties and short rows, where the tie rule decides."""
    k = ids.shape[1]
    exact = (head[:, :k] > head[:, 1:]).all(dim=-1) & ~unsure
    values = head[:, :k].contiguous()
    if not bool(exact.all()):
        redo = (~exact).nonzero()[:, 0]
        full = full_rows(redo)
        # (head's k-th value is the full row's: its k largest are among the kept entries)
        top = _top_by_candidates(full, k, head[redo, k - 1])
        ids[redo], values[redo] = top if top is not None else _top_by_keys(full, k)
    return ids, values


#: ``_top_of_packed`` selects among the finite entries when at most 1 / this of them are finite.
_PACKED_TOP_FRACTION = 8


def _top_of_packed(logp: torch.Tensor, k: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``top_logprobs(logp, k)`` for float32 CPU rows that are mostly ``-inf`` (the processed
    logits after a truncation), selected among each row's finite entries alone, or None when
    the rows are not such rows.

    Where a row's answer could depend on the tie rule, ``top_logprobs`` of the row gives it: a
    row with fewer than ``k`` finite entries (``-inf`` ones would be among its answer), NaN,
    or two equal values among its ``k + 1`` largest (a tie at or above the ``k``-th place).
    In every other row the ``k`` largest values are distinct and above every other entry, so
    any exact selection gives them, in the same order, without a pass over the ``-inf``
    entries (~1 ms at [64, 32000], k = 5)."""
    if (logp.device.type != "cpu" or logp.dtype != torch.float32 or logp.dim() != 2
            or not logp.is_contiguous() or logp.requires_grad or logp.numel() == 0):
        return None
    batch, vocab = logp.shape
    if k * _PACKED_TOP_FRACTION > vocab:
        return None
    xn = logp.numpy()
    sample = xn.reshape(-1)[::61]  # (mostly -inf? judged from every 61st entry before a full pass)
    if np.count_nonzero(sample > -np.inf) * _PACKED_TOP_FRACTION > sample.size:
        return None
    flat = flat_not_below(xn, np.full(batch, np.finfo(np.float32).min))  # (the finite ones and NaN)
    rows, counts, starts, cols = packed_columns(flat, (batch, vocab))
    width = int(counts.max())
    if width < k or width * _PACKED_TOP_FRACTION > vocab:  # (every row short of k: topk alone)
        return None
    packed = np.full((batch, max(width, k + 1)), np.inf, dtype=np.float32)
    values = xn.reshape(-1)[flat]
    packed[rows, cols] = np.negative(values)  # (negated: ascending puts the largest first)
    order = np.argsort(packed, axis=-1, kind="stable")[:, :k + 1]
    head = -np.take_along_axis(packed, order, axis=-1)  # (past a row's entries: -inf)
    # (a row with exactly k entries has -inf at place k + 1)
    unsure = counts < k
    unsure[rows[np.isnan(values)]] = True  # (topk counts NaN as the largest; argsort, the smallest)
    ids = flat[np.minimum(starts[:, None] + order[:, :k], flat.size - 1)] % vocab  # (clipped: rows redone)
    return _exact_top(torch.from_numpy(head), torch.from_numpy(ids), torch.from_numpy(unsure),
                      lambda redo: logp.index_select(0, redo))
