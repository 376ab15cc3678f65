"""Truncation samplers: the reference torch path.

Each function takes ``logits`` ``[B, V]`` (fp32, fp16 or bf16, any device) and per-row
parameters ``[B]`` (float32, or int64 for ``top_k``) and returns a NEW tensor of the same
dtype and shape in which removed tokens are ``-inf`` and kept tokens keep their exact input
value. Statistics (probabilities, entropy, ...) are computed in fp32 (see ``_stats``).

Shared rules (SEMANTICS.md, "Truncation samplers"):

- A row whose parameter has the disabled value comes out bit-identical.
- Tokens that are already ``-inf`` have probability 0 and stay ``-inf``.
- The threshold samplers (top_k, top_p, top_a, min_p, tfs, eta, epsilon, nsigma) keep the
  row's top token(s): every finite token whose logit equals the row maximum (so ties at the
  maximum are all kept). typical_p keeps the tokens closest to the entropy, which may
  exclude the top one, and XTC removes top tokens by design; both still leave at least one
  token of a row that had one.
- Sort-based rules are expressed as thresholds, so tokens tied at the boundary are all kept
  and nothing depends on sort stability.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ._stats import (
    ParamLike,
    SparseRows,
    apply_keep,
    check_logits,
    compact_rows,
    count_below,
    count_true,
    entropy,
    fill_removed,
    flat_not_below,
    is_chain_rows,
    is_finite,
    keep_at_least,
    keep_logits_at_least,
    note_live_hint,
    noted_removed,
    pack_entries,
    packed_columns,
    packed_result_wanted,
    prefix_boundary,
    removed_tokens,
    sampler_param,
    row_sum,
    softmax_and_log_softmax,
    softmax_terms,
    sort_nonneg,
    sum_scattered,
    sort_values_desc,
    upcast,
)
from ._threads import sort_rows_
from .temperature import temperature as scale_by_temperature
from .temperature import temperature_divisors

__all__ = [
    "top_k",
    "temperature_top_k",
    "nsigma_top_k",
    "top_p",
    "top_a",
    "min_p",
    "tfs",
    "eta_cutoff",
    "epsilon_cutoff",
    "typical_p",
    "nsigma",
    "xtc",
]

_F32 = torch.float32


def top_k(logits: Tensor, top_k: ParamLike) -> Tensor:
    """Keep the ``k`` largest logits of each row.

    Args:
        logits: ``[B, V]`` float tensor.
        top_k: ``[B]`` int64. ``k <= 0`` (0 or -1) disables the row; ``k >= V`` keeps
            everything (so it is treated as disabled too).

    Rule: keep token ``t`` iff ``l(t) >= kth`` where ``kth`` is the ``k``-th largest logit
    of the row (counting duplicates). Ties at the boundary are all kept, so more than ``k``
    tokens may survive. Uses ``torch.topk`` with the largest enabled ``k`` of the batch (no
    full sort); reading that ``k`` is one device-to-host sync. On the CPU the ``k``-th values
    are selected among the entries above a threshold sampled from each row (a few per kept
    token; ``_top_k_from_candidates``) or by a partition of the rows: the same values.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    return _top_k_checked(logits, sampler_param(top_k, logits, "top_k"))


def _top_k_checked(logits: Tensor, k: Tensor) -> Tensor:
    """``top_k`` once its arguments are checked (``k``: int64 ``[B]``)."""
    batch, vocab = logits.shape
    if batch == 0 or vocab == 0:
        return logits.clone()
    if not is_chain_rows(logits):
        # Full rows: the candidates' one pass finds the kept entries for less than packing
        # the rows (after a truncation) or selecting over them would cost.
        out = _top_k_by_candidates(logits, k)
        if out is not None:
            return out
    # Rows already truncated: a k that reaches past a packed row's width keeps all of its
    # tokens there, as it keeps every finite token of the full row.
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_top_k(sparse.logits, k))
    return _top_k(logits, k, top_level=True)


def _top_k(logits: Tensor, k: Tensor, top_level: bool = False) -> Tensor:
    vocab = logits.shape[1]
    enabled = (k > 0) & (k < vocab)
    k_row = torch.where(enabled, k, torch.ones_like(k))
    k_max = int(k_row.max())
    l32 = upcast(logits)
    kth, largest = _kth_largest(l32, k_row, enabled, k_max)
    # keep l >= kth; kth <= the row max, so the top token(s) are kept. Disabled rows: -inf.
    kth = torch.where(enabled, kth, torch.full_like(kth, float("-inf")))
    if (_sparse_ok(logits, k_max, enabled) and l32 is logits
            and bool((largest.numpy() < np.inf).all())):  # no NaN, no +inf
        return _keep_at_least_sparse(logits, kth, top_level)
    return keep_at_least(logits, l32, kth)


def _numpy_rows(logits: Tensor) -> bool:
    """Whether top_k may work on ``logits`` through numpy: contiguous float32 CPU rows without
    autograd."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and not logits.requires_grad)


def _sparse_ok(logits: Tensor, k_max: int, enabled: Tensor) -> bool:
    """Whether top_k's result on ``logits`` may be written entry by entry (float32 CPU rows,
    every row enabled, at most ``1 / _TOP_K_SPARSE_FRACTION`` of each kept)."""
    return (_numpy_rows(logits) and k_max * _TOP_K_SPARSE_FRACTION <= logits.shape[1]
            and bool(enabled.all()))


#: The candidates (numpy, one thread) are taken while ``torch.topk`` could split the rows over
#: at most this many threads: measured faster than ``topk`` on two (0.6-0.7 of HF's warper, which
#: is ``topk``, at [64, 32000] and [8, 128256]); with more, ``topk``'s row split takes over.
_CANDIDATES_MAX_THREADS = 2


def _candidates_take(logits: Tensor) -> bool:
    """Whether top_k takes its candidates (``_candidates``) on these rows: float32 CPU rows
    that ``torch.topk`` could split over at most ``_CANDIDATES_MAX_THREADS`` threads."""
    return min(logits.shape[0], torch.get_num_threads()) <= _CANDIDATES_MAX_THREADS and _numpy_rows(logits)


def _top_k_by_candidates(logits: Tensor, k: Tensor) -> Optional[Tensor]:
    """top_k's result on full rows through ``_top_k_from_candidates``, or None where that does
    not apply: not float32 CPU rows, an enabled ``k`` past ``1 / _TOP_K_SPARSE_FRACTION`` of the
    row, rows that ``torch.topk`` could split over more than ``_CANDIDATES_MAX_THREADS``
    threads, or the candidates refused. Disabled rows (a serving batch mixes them in) come back
    as they are, the others from their candidates."""
    batch, vocab = logits.shape
    if not _candidates_take(logits):
        return None
    kn = k.numpy()
    on = (kn > 0) & (kn < vocab)
    if not on.any() or int(kn[on].max()) * _TOP_K_SPARSE_FRACTION > vocab:
        return None
    xn = logits.numpy()
    rows = None if on.all() else np.flatnonzero(on)
    kept = _top_k_from_candidates(xn if rows is None else xn[rows], kn if rows is None else kn[rows])
    return None if kept is None else _rows_result(xn, rows, kept)


def temperature_top_k(logits: Tensor, temperature: ParamLike, top_k: ParamLike) -> Tensor:
    """``top_k(temperature(logits, temperature), top_k)``, bit for bit, without dividing the
    entries top_k removes where that can be shown to change nothing.

    Args:
        logits: ``[B, V]`` float tensor (full rows).
        temperature: ``[B]`` float32, as ``temperature`` takes it.
        top_k: ``[B]`` int64, as ``top_k`` takes it.

    Scaling by ``1 / T`` (``T > 0``) never reorders a row: ``fl(l / T)`` is non-decreasing
    in ``l``, so the ``k``-th largest scaled logit is ``fl(kth / T)`` and top_k keeps the
    entries with ``fl(l / T) >= fl(kth / T)``, a superset of those with ``l >= kth`` (it
    may add entries that the division rounds onto the boundary). On float32 CPU rows where
    top_k takes its candidates (``_candidates``: every entry outside them is below a
    threshold ``t``), only the candidates are divided, and that is the answer when
    ``fl(t / T) < fl(kth / T)`` in every row (then no entry outside them reaches the
    boundary) and every divided candidate is finite (nothing to saturate). Otherwise, and
    wherever the candidates do not apply, the two samplers run one after the other.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    t = sampler_param(temperature, logits, "temperature")
    k = sampler_param(top_k, logits, "top_k")
    out = _temperature_top_k_by_candidates(logits, t, k)
    return out if out is not None else _top_k_checked(scale_by_temperature(logits, t), k)


def _candidates_of_every_row(logits: Tensor, k: Tensor
                             ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """top_k's candidates (``_candidates``) for a sampler fused with top_k: full float32 CPU
    rows as ``_top_k_by_candidates`` takes them, every row top_k-enabled; else None."""
    batch, vocab = logits.shape
    if batch == 0 or not _candidates_take(logits) or is_chain_rows(logits):
        return None
    kn = k.numpy()
    if not ((kn > 0) & (kn < vocab)).all() or int(kn.max()) * _TOP_K_SPARSE_FRACTION > vocab:
        return None
    return _candidates(logits.numpy(), kn)


def _temperature_top_k_by_candidates(logits: Tensor, t: Tensor, k: Tensor) -> Optional[Tensor]:
    """``temperature_top_k``'s result from top_k's candidates, or None (see there and
    ``_candidates_of_every_row``)."""
    found = _candidates_of_every_row(logits, k)
    if found is None:
        return None
    batch, vocab = logits.shape
    flat, rows, values, threshold, kth, _ = found
    divisor = temperature_divisors(t)[1].numpy()
    with np.errstate(over="ignore"):
        # (IEEE division, as torch's: the bits temperature gives these entries)
        scaled = values / divisor[rows]
        scaled_kth = kth / divisor
        outside_below = threshold / divisor < scaled_kth
    if not (outside_below.all() and np.isfinite(scaled).all()):
        return None
    kept = np.flatnonzero(scaled >= scaled_kth[rows])
    return _sparse_result(flat[kept], scaled[kept], (batch, vocab), top_level=True)


def _rows_result(xn: np.ndarray, rows: Optional[np.ndarray], kept: np.ndarray,
                 scratch: Optional[Tensor] = None) -> Tensor:
    """A truncation's result on the float32 rows ``xn`` (``[B, V]``) that keeps, of the rows
    ``rows`` (all rows when None), the entries at the flat indices ``kept`` (increasing) of
    ``xn[rows]``, and leaves the other rows as they are (bit for bit). ``scratch``: a
    contiguous float32 ``[B, V]`` temporary of the caller's, no longer needed, that becomes the
    result (see ``_sparse_result``)."""
    batch, vocab = xn.shape
    if rows is None:
        return _sparse_result(kept, xn.reshape(-1)[kept], (batch, vocab), top_level=True, scratch=scratch)
    flat = rows[kept // vocab] * vocab + kept % vocab
    out = _filled(batch * vocab, scratch).reshape(batch, vocab)
    out.reshape(-1)[flat] = xn.reshape(-1)[flat]
    off = np.setdiff1d(np.arange(batch), rows, assume_unique=True)
    out[off] = xn[off]  # (a disabled row keeps every entry, bit for bit)
    return torch.from_numpy(out)


#: top_k writes its result entry by entry (``_keep_at_least_sparse``) when it keeps at most
#: ``1 / _TOP_K_SPARSE_FRACTION`` of each row (and the next sampler packs it from the same entries).
_TOP_K_SPARSE_FRACTION = 8


def _keep_at_least_sparse(logits: Tensor, kth: Tensor, top_level: bool = False) -> Tensor:
    """``keep_at_least(logits, logits, kth)`` for float32 CPU rows without NaN or ``+inf``
    among their largest entries (so none at all) where the kept entries are few: the result
    is ``-inf`` except at the entries ``>= kth`` (their values copied). ``top_level``: the
    result is top_k's own (not that of packed rows, which top_k expands): inside a
    ``packed_chain`` step that hands its result on packed it is made as packed rows
    (``pack_entries``) and never expanded; otherwise the ``[B, V]`` result is noted for the
    next ``compact_rows``.

    The same values: ``keep_at_least`` keeps ``l`` iff ``l - kth >= +0.0``, i.e. iff
    ``l >= kth`` for finite ``l`` (``kth`` is finite or ``-inf``); an ``l = -inf`` comes out
    ``-inf`` either way. NaN and ``+inf`` entries (where the two could differ, through the
    sign of a NaN difference or the NaN that ``minimum`` returns) are excluded by the caller:
    they would be among the row's largest values."""
    batch, vocab = logits.shape
    xn = logits.numpy()
    flat = np.flatnonzero(xn >= kth.numpy()[:, None])
    return _sparse_result(flat, xn.reshape(-1)[flat], (batch, vocab), top_level)


#: The stride of the sample from which ``_keep_at_least_if_few`` judges how many entries pass.
_PASS_SAMPLE_STRIDE = 61


def _keep_at_least_if_few(l32: Tensor, threshold: Tensor, scratch: Optional[Tensor] = None) -> Optional[Tensor]:
    """``keep_logits_at_least(l32, l32, threshold)`` written entry by entry (``_sparse_result``,
    top-level: packed rows inside a chain step that hands them on) when at most
    ``1 / _TOP_K_SPARSE_FRACTION`` of the entries pass; None otherwise (judged first from every
    ``_PASS_SAMPLE_STRIDE``-th entry, so that dense rows cost no pass here).

    For contiguous float32 CPU rows ``l32`` without NaN or ``+inf`` (``-inf`` may be) and
    thresholds ``[B]`` that are finite or ``-inf``: an entry passes iff ``l >= t`` (a ``-inf``
    entry of a ``-inf``-threshold row passes and is written as the ``-inf`` it is), which is
    where ``keep_logits_at_least`` keeps the entry's bits; the others are ``-inf`` in both."""
    xn, tn = l32.numpy(), threshold.numpy()
    batch, vocab = xn.shape
    flat_sample = xn.reshape(-1)[::_PASS_SAMPLE_STRIDE]
    sample_rows = np.arange(0, xn.size, _PASS_SAMPLE_STRIDE) // vocab
    passing = np.count_nonzero(flat_sample >= tn[sample_rows])
    # (a margin of 2: the sample's share is an estimate; a wrong guess costs one pass, not values)
    if 2 * passing * _TOP_K_SPARSE_FRACTION > flat_sample.size:
        return None
    flat = flat_not_below(xn, tn)
    if flat.size * _TOP_K_SPARSE_FRACTION > xn.size:
        return None
    return _sparse_result(flat, xn.reshape(-1)[flat], (batch, vocab), top_level=True, scratch=scratch)


def _sparse_result(flat: np.ndarray, values: np.ndarray, shape: tuple[int, int], top_level: bool,
                   scratch: Optional[Tensor] = None) -> Tensor:
    """A truncation's result when it keeps ``values`` at the flat indices ``flat`` (increasing)
    of the ``shape`` rows and ``-inf`` elsewhere: packed rows or ``[B, V]`` (see
    ``_keep_at_least_sparse``), the latter in ``scratch``'s buffer when given (one [B, V]
    allocation fewer: with two alive at once glibc returned the freed one to the system, and
    each call paid ~3000 page faults, +4 ms, at [64, 32000])."""
    batch, vocab = shape
    if top_level and packed_result_wanted() and flat.size * _TOP_K_SPARSE_FRACTION <= batch * vocab:
        rows = pack_entries(flat, values, (batch, vocab))
        if rows is not None:
            return rows.expand_truncated(rows.logits)
    out = _filled(batch * vocab, scratch)
    out[flat] = values
    if flat.size * _TOP_K_SPARSE_FRACTION <= out.size:  # (not rows with fewer than k finite logits)
        note_live_hint((batch, vocab), flat)
    return torch.from_numpy(out).view(batch, vocab)


def _filled(n: int, scratch: Optional[Tensor]) -> np.ndarray:
    """``n`` float32 ``-inf`` (flat), in ``scratch``'s buffer when given."""
    if scratch is None:
        return np.full(n, -np.inf, dtype=np.float32)
    out = scratch.numpy().reshape(-1)
    out.fill(-np.inf)
    return out


#: Entries per row that the candidates (``_top_k_from_candidates``, ``_top_p_by_candidates``)
#: sample to place their threshold.
_CANDIDATE_SAMPLE = 1024


def _top_k_from_candidates(xn: np.ndarray, k: np.ndarray) -> Optional[np.ndarray]:
    """The entries top_k keeps of the float32 rows ``xn`` (``[B, V]``, contiguous; ``k``:
    int64 ``[B]``, ``1 <= k`` and ``8 k <= V``), as flat indices (increasing), found
    without a selection over the full rows; None when this way does not apply (the caller's
    selection then decides). See ``_candidates``."""
    found = _candidates(xn, k)
    if found is None:
        return None
    flat, rows, values, _, kth, _ = found
    return flat[np.flatnonzero(values >= kth[rows])]  # (indices: ~5x faster than a boolean mask here)


def _candidates(xn: np.ndarray, k: np.ndarray
                ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """top_k's candidates in the rows ``xn`` (as ``_top_k_from_candidates``): their flat
    indices (increasing), rows and values, each row's threshold ``t`` (``[B]``: every entry
    not below it is a candidate, every other entry is below it), each row's ``k``-th
    largest value ``kth >= t`` and its largest; None when this way does not apply.

    A threshold ``t`` below each row's ``k``-th largest value is read from a strided sample
    of the row (its ``j``-th largest, ``j`` a few standard deviations above the ``k V / s``
    sample entries expected to pass the ``k``-th value). The candidates, the entries not
    below ``t``, then hold every entry ``>= kth`` once a row has at least ``k`` of them
    (checked: ``kth >= t`` then); the ``k``-th largest is selected among them alone (a few
    hundred to a few thousand entries, against a copy and a partition of the whole row) and
    the kept entries are the candidates ``>= kth``: the selection's values, whatever the
    sample. Rows with NaN or ``+inf`` candidates, with fewer than ``k``, or with too many
    (``t`` in a large run of ties, a row mostly ``-inf``) return None."""
    batch, vocab = xn.shape
    step = vocab // _CANDIDATE_SAMPLE
    if step < 4 or batch == 0:
        return None  # (short rows: the full selection is cheap)
    sample = xn[:, ::step]
    s = sample.shape[1]
    expected = k * (s / vocab)
    j = np.ceil(1.5 * expected + 3.0 * np.sqrt(expected) + 2.0).astype(np.int64)
    if 4 * int(j.max()) > s:
        return None
    # Sorted, negated (numpy's sort of rows this short costs what a partition at one position
    # does, and several times less than one at several: any mix of k per row is one sort)
    t = -np.sort(np.negative(sample), axis=-1)[np.arange(batch), j - 1]
    if not (t > -np.inf).all():  # (a row mostly -inf, or NaN in the sample: no pass over the rows)
        return None
    flat = flat_not_below(xn, t)  # (NaN entries too: refused below)
    rows, counts, _, cols = packed_columns(flat, xn.shape)
    if (counts < k).any() or int(counts.max()) * _TOP_K_SPARSE_FRACTION > vocab:
        return None
    values = xn.reshape(-1)[flat]
    if not np.isfinite(values).all():
        return None
    # the k-th largest of each row's candidates: packed negated, +inf after each row's own, sorted
    packed = np.full((batch, int(counts.max())), np.inf, dtype=np.float32)
    packed[rows, cols] = -values
    sort_rows_(packed)
    kth = -packed[np.arange(batch), k - 1]
    return flat, rows, values, t, kth, -packed[:, 0]


def _kth_largest(l32: Tensor, k_row: Tensor, enabled: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """``[B]``: the ``k_row``-th largest value of each row (duplicates counted); rows not
    ``enabled`` get an arbitrary value. Also ``[B, k]`` values among which are the ``k``
    largest of each row (NaN counting as the largest), ``k >=`` every enabled ``k_row``.

    On the CPU, when the enabled rows use a few distinct ``k`` and torch runs one thread (the
    partition does not use more) or there is one row (``topk`` splits rows, not a row, over
    its threads: 0.12 ms against the partition's 0.07 at [1, 128256] with two), one numpy
    partition (O(V)) finds them; otherwise ``torch.topk`` with the largest ``k``. Measured at
    k = 50 on a 2-core AVX-512 machine with one thread: the partition takes 1.4 ms at
    [64, 32000] where ``topk`` takes 2.5-10 ms, 0.6 vs 0.8 ms at [8, 128256]. With two
    threads ``topk`` (split over rows) wins at [8, 128256]. Introselect slows down a lot on a long run of equal values below
    the selected position (half the entries -inf: 10 ms; 87% -inf, as nsigma leaves rows:
    31 ms, ``topk`` 4.5 ms): rows with more than an eighth of their entries -inf and no NaN
    are partitioned negated instead, where that run lies beyond the selected position
    (1.35 ms on the 87% case); ``-(-x)`` is ``x`` exactly."""
    batch, vocab = l32.shape
    if (l32.device.type == "cpu" and l32.dtype == torch.float32 and l32.is_contiguous()
            and (torch.get_num_threads() == 1 or batch == 1)):
        xn = l32.numpy()
        ks = np.unique(k_row.numpy()[enabled.numpy()]).tolist()  # (torch.unique: ~10x slower)
        if 0 < len(ks) <= 4:
            if _few_neg_inf(xn.reshape(-1)):
                part = np.partition(xn, [vocab - k for k in ks], axis=-1)
                pos = (vocab - k_row).clamp(0, vocab - 1)
                # (numpy's partition orders NaN after every number, as its sort does)
                return (torch.from_numpy(part).gather(-1, pos[:, None])[:, 0],
                        torch.from_numpy(part[:, vocab - ks[-1]:]))
            if not np.isnan(xn).any():  # (negated, NaN would no longer count as the largest)
                part = np.partition(np.negative(xn), [k - 1 for k in ks], axis=-1)
                np.negative(part, out=part)
                return (torch.from_numpy(part).gather(-1, (k_row - 1)[:, None])[:, 0],
                        torch.from_numpy(part[:, :ks[-1]]))
    largest = torch.topk(l32, k_max, dim=-1, largest=True, sorted=True).values
    return largest.gather(-1, (k_row - 1)[:, None])[:, 0], largest


def _few_neg_inf(xn: np.ndarray) -> bool:
    """Whether at most about an eighth of ``xn``'s entries are ``-inf`` (only chooses a path:
    both give the same values). Rows of more than ``2**16`` entries are judged from every
    61st entry (over a thousand of them), which spares a full pass over cold rows."""
    if xn.size > 2**16:
        sample = xn[::61]
        return bool(np.count_nonzero(sample == -np.inf) * 8 <= sample.size)
    return bool(np.count_nonzero(xn == -np.inf) * 8 <= xn.size)


def _count_mass_before_below(cum: Tensor, bound: Tensor) -> Tensor:
    """``(exclusive_cumsum(x) < bound[:, None]).sum(-1)`` from ``cum = cumsum(x)`` (``x >= 0``),
    up to the clamp to ``[1, V]`` that ``prefix_boundary`` applies: position 0 (mass 0)
    counts when ``bound > 0``, position ``i >= 1`` iff ``cum[i - 1] < bound``; ``cum`` is
    non-decreasing, so the count is a binary search."""
    return 1 + count_below(cum, bound).clamp_max(cum.shape[-1] - 1)


def _keep_probability_at_least(
    logits: Tensor, l32: Tensor, p: Tensor, threshold: Tensor, enabled: Tensor, p_max: Tensor
) -> Tensor:
    """Finish a sampler whose rule is ``keep t iff p(t) >= threshold`` plus the top token(s).

    When no enabled row's threshold exceeds its ``p_max`` the top tokens (``p = p_max``)
    pass the test anyway and the mask-free ``keep_at_least`` is used; otherwise (or off
    the CPU, where reading that condition would be a device sync) the generic path.
    ``p`` is overwritten.
    """
    if logits.device.type == "cpu" and not bool(((threshold > p_max) & enabled).any()):
        thr = torch.where(enabled, threshold, torch.full_like(threshold, float("-inf")))
        return keep_at_least(logits, p, thr, values_is_scratch=True, values_not_negative_zero=True)
    keep = p >= threshold[:, None]
    return apply_keep(logits, l32, keep, enabled, scratch=p)


def top_p(logits: Tensor, top_p: ParamLike) -> Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass is >= ``top_p``.

    Args:
        logits: ``[B, V]`` float tensor.
        top_p: ``[B]`` float32 in ``(0, 1]``; ``1.0`` (or more) disables the row.

    Rule (a threshold, as every sort-defined rule here): with ``p = softmax(l)``, keep ``t`` iff
    ``sum(p(s) for s with p(s) > p(t)) < top_p``. For distinct probabilities this is the
    smallest prefix of the descending order whose sum is ``>= top_p``; tokens tied with the
    last token of that prefix are all kept. The top token is always kept.

    On the CPU, float32 rows that are not mostly removed find the prefix among their most
    likely tokens when it lies there (``_top_p_by_candidates``, checked row by row) instead of
    sorting every token: the same values.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    tp = sampler_param(top_p, logits, "top_p")
    sparse = compact_rows(logits)
    if sparse is not None:  # after a truncation: sort only the tokens still in
        return sparse.expand_truncated(_top_p(sparse.logits, tp, sparse))
    return _top_p(logits, tp)


def _top_p(logits: Tensor, tp: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = tp < 1.0
    l32 = upcast(logits)
    if sparse is None and _numpy_rows(logits) and bool(enabled.any()):
        # Full rows: the nucleus is found among the few most likely tokens when it lies there
        # (checked), without sorting the whole rows.
        e, s = softmax_terms(l32)
        out = _top_p_by_candidates(logits, e, s, tp, enabled)
        if out is not None:
            return out
        p = e.div_(s)
    else:
        p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    threshold = _top_p_threshold(p, tp)
    # The threshold is a probability of the row (<= p_max): the top token(s) pass it, and
    # the mask-free keep_at_least applies (disabled rows: threshold -inf).
    threshold = torch.where(enabled, threshold, torch.full_like(threshold, float("-inf")))
    return keep_at_least(logits, p, threshold, values_is_scratch=True, values_not_negative_zero=True)


def _top_p_threshold(p: Tensor, tp: Tensor) -> Tensor:
    """``[B]``: top_p's boundary probability of each row of ``p`` (``[B, V]``, float32):
    every token with ``p >= threshold`` is kept (tokens tied with the last one of the prefix
    included)."""
    p_sorted = sort_values_desc(p)
    n_kept = _count_mass_before_below(torch.cumsum(p_sorted, dim=-1), tp)
    return prefix_boundary(p_sorted, n_kept)[:, 0]


def _top_p_by_candidates(logits: Tensor, e: Tensor, s: Tensor, tp: Tensor, enabled: Tensor) -> Optional[Tensor]:
    """top_p's result on full float32 CPU rows from softmax's terms (``e``, ``s``: see
    ``softmax_terms``), found among each enabled row's most likely tokens, in ``e``'s buffer;
    None where that does not apply to any row (the caller sorts the full rows; ``e`` is then
    untouched). Disabled rows come back as they are.

    A threshold ``tau`` on ``e`` is read from a strided sample of each row: the largest
    sampled value below which the sampled mass, scaled to the row, stays under half of
    ``1 - top_p`` (rows whose sample is mostly 0, i.e. mostly ``-inf`` logits, take every
    token of nonzero probability). The candidates (``e >= tau``) are every token at least as
    likely as the least likely of them (``e`` grows with the logit); their probabilities
    sorted descending are the first positions of the full row's sorted order, and their
    cumulative sums the same values (a prefix sum reads only its prefix). So once a row's
    candidates reach ``top_p`` (checked) the count before the boundary, the boundary and the
    kept tokens are those of the full row, provided the boundary is above the least likely
    candidate (checked: a token outside could tie with it otherwise). Rows that fail a check,
    or whose candidates would be more than ``1 / _TOP_K_SPARSE_FRACTION`` of the row (a wide
    nucleus), are sorted in full (``_top_p_threshold``). None when an enabled row has NaN or
    ``+inf`` (a NaN ``e``, or a sum that is not finite), or when no row is decided."""
    batch, vocab = logits.shape
    step = vocab // _CANDIDATE_SAMPLE
    if step < 4:
        return None  # (short rows: the full sort is cheap)
    terms = _enabled_terms(e, s, tp, enabled)
    if terms is None:
        return None
    rows, en, sn, tpn = terms
    n_on = en.shape[0]
    every = np.arange(n_on)
    sample = np.sort(en[:, ::step], axis=-1)
    n_sample = sample.shape[1]
    tail = np.cumsum(sample, axis=-1, dtype=np.float64)
    limit = (0.5 / step) * (1.0 - tpn.astype(np.float64)) * sn
    j = np.minimum(np.count_nonzero(tail <= limit[:, None], axis=-1), n_sample - 1)
    # (at least the smallest positive float: a token of probability 0 is never a candidate)
    tau = np.maximum(sample[every, j], np.finfo(np.float32).smallest_subnormal)
    few_left = np.count_nonzero(sample, axis=-1) * step * _TOP_K_SPARSE_FRACTION <= vocab
    tau[few_left] = np.finfo(np.float32).smallest_subnormal
    wide = ~few_left & ((n_sample - j) * step * _TOP_K_SPARSE_FRACTION > vocab)
    if wide.all():
        return None
    tau[wide] = np.inf  # (no candidates: sorted in full below)
    candidates = _likely_tokens(en, tau)
    if candidates is None:
        return None
    flat, values, cand_rows, counts, cols = candidates
    if (counts * _TOP_K_SPARSE_FRACTION > vocab).any():  # (the sample misled: those rows in full)
        wide |= counts * _TOP_K_SPARSE_FRACTION > vocab
        inside = np.flatnonzero(~wide[cand_rows])
        counts[wide] = 0
        flat, values, cand_rows, cols = flat[inside], values[inside], cand_rows[inside], cols[inside]
    p = values / np.repeat(sn, counts)  # (IEEE division: softmax's e / s at these tokens)
    # sorted descending: packed negated, -0.0 after each row's own (which negate to +0.0)
    width = max(int(counts.max()), 1)
    packed = np.full(n_on * width, -0.0, dtype=np.float32)
    packed[cand_rows * width + cols] = -p
    packed = packed.reshape(n_on, width)
    sort_rows_(packed)
    p_sorted = np.negative(packed, out=packed)
    cum = torch.cumsum(torch.from_numpy(p_sorted), dim=-1).numpy()  # (torch's: the same bits)
    n_before = np.count_nonzero(cum < tpn[:, None], axis=-1)  # (the count_below of the full row)
    threshold = p_sorted[every, np.minimum(n_before, width - 1)]
    decided = (n_before < counts) & (threshold > p_sorted[every, np.maximum(counts - 1, 0)])
    if not decided.any():
        return None
    kept = flat[np.flatnonzero((p >= threshold[cand_rows]) & decided[cand_rows])]
    if not decided.all():
        rest = np.flatnonzero(~decided)
        p_rest = torch.from_numpy(en[rest] / sn[rest, None])
        t_rest = _top_p_threshold(p_rest, torch.from_numpy(tpn[rest])).numpy()
        found = np.flatnonzero(p_rest.numpy() >= t_rest[:, None])
        kept = np.sort(np.concatenate([kept, rest[found // vocab] * vocab + found % vocab]))
    return _rows_result(logits.numpy(), rows, kept, scratch=e)


def _enabled_terms(e: Tensor, s: Tensor, param: Tensor, enabled: Tensor
                   ) -> Optional[tuple[Optional[np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
    """The enabled rows (None: all) of softmax's terms ``e`` (``[B, V]``) and ``s`` (``[B, 1]``,
    as ``[n]``) and of a sampler's parameter, as numpy arrays; None when one of those rows
    holds ``+inf`` (its sum is not finite)."""
    on = enabled.numpy()
    rows = None if on.all() else np.flatnonzero(on)
    en, sn, pn = e.numpy(), s.numpy()[:, 0], param.numpy()
    if rows is not None:
        en, sn, pn = en[rows], sn[rows], pn[rows]
    if not np.isfinite(sn).all():
        return None
    return rows, en, sn, pn


def _likely_tokens(en: np.ndarray, tau: np.ndarray
                   ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The entries of softmax's numerators ``en`` (``[n, V]``) not below their row's ``tau``:
    flat indices (increasing), values, rows, each row's count and columns when packed (see
    ``packed_columns``); None when one is NaN (a NaN logit, never below ``tau``; its row's sum
    was read as 1)."""
    flat = flat_not_below(en, tau)
    values = en.reshape(-1)[flat]
    if np.isnan(values).any():
        return None
    rows, counts, _, cols = packed_columns(flat, en.shape)
    return flat, values, rows, counts, cols


def top_a(logits: Tensor, top_a: ParamLike) -> Tensor:
    """Top-a: keep ``t`` iff ``p(t) >= top_a * p_max ** 2``.

    Args:
        logits: ``[B, V]`` float tensor.
        top_a: ``[B]`` float32 ``>= 0``; ``0.0`` disables the row.

    ``p = softmax(l)`` in fp32, ``p_max`` its row maximum. The threshold is inclusive
    (a token exactly at it is kept; tied tokens are treated alike). The top token always
    survives, also when ``top_a > 1 / p_max``.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    a = sampler_param(top_a, logits, "top_a")
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_top_a(sparse.logits, a, sparse))
    return _top_a(logits, a)


def _top_a(logits: Tensor, a: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = a > 0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    p_max = p.amax(dim=-1)
    return _keep_probability_at_least(logits, l32, p, a * p_max * p_max, enabled, p_max)


def min_p(logits: Tensor, min_p: ParamLike) -> Tensor:
    """Min-p: keep ``t`` iff ``p(t) >= min_p * p_max``.

    Args:
        logits: ``[B, V]`` float tensor.
        min_p: ``[B]`` float32 in ``[0, 1]``; ``0.0`` disables the row.

    ``p = softmax(l)`` in fp32. Inclusive threshold (tied tokens are treated alike); the
    top token always survives. On the CPU, full float32 rows divide and compare only the
    tokens likely enough to pass (``_min_p_by_candidates``): the same values.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    mp = sampler_param(min_p, logits, "min_p")
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_min_p(sparse.logits, mp, sparse))
    return _min_p(logits, mp)


def _min_p(logits: Tensor, mp: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = mp > 0
    l32 = upcast(logits)
    if sparse is None and _numpy_rows(logits) and bool(enabled.any()):
        # Full rows: the tokens near the threshold are found on the logits, without the
        # softmax of the rows in most calls.
        out = _min_p_by_candidates(logits, mp, enabled)
        if out is not None:
            return out
    p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    p_max = p.amax(dim=-1)
    return _keep_probability_at_least(logits, l32, p, mp * p_max, enabled, p_max)


#: min_p's candidates decide a token from ``e = exp(l - max)`` alone when ``e`` is farther than
#: this (relative) from ``min_p``: the roundings of ``e / s``, ``1 / s`` and ``min_p * (1 / s)``
#: (three of ``2**-24``) cannot carry ``p`` across the threshold then.
_MIN_P_MARGIN = 2.0**-20
#: The candidates are the logits at least ``max + log(min_p) -`` this: the others have
#: ``e < min_p (1 - _MIN_P_MARGIN)`` whatever the roundings of ``l - max`` and of ``exp``.
_MIN_P_LOG_MARGIN = 1e-3
#: Below this ``min_p`` the probabilities compared may be subnormal (no relative bound): the
#: full passes decide.
_MIN_P_SMALLEST = 1e-28


def _min_p_by_candidates(logits: Tensor, mp: Tensor, enabled: Tensor) -> Optional[Tensor]:
    """min_p's result on full float32 CPU rows, or None where this way does not apply (the
    caller's softmax then decides). Disabled rows come back as they are.

    The full path keeps ``t`` iff ``e / s >= min_p * (1 / s)`` (each side rounded; ``e = exp(l
    - max)``, ``s`` its row sum, the top token's ``e`` is 1, so ``1 / s`` is ``p_max``): that is
    ``e >= min_p`` up to those roundings. Only logits within ``log(min_p)`` of the row's max
    (and ``_MIN_P_LOG_MARGIN``) can pass; their ``e`` (torch's ``exp`` of the same
    differences, the same bits) decides them outright when it is farther than
    ``_MIN_P_MARGIN`` from ``min_p``. The rare token that is not gets the full path's exact
    test, after the softmax terms of the rows (``softmax_terms``, as the full path computes
    them). None for rows whose max is not finite (NaN, ``+inf``, no token), ``min_p`` below
    ``_MIN_P_SMALLEST``, or candidates past ``1 / _TOP_K_SPARSE_FRACTION`` of the rows."""
    on = enabled.numpy()
    rows = None if on.all() else np.flatnonzero(on)
    xn = logits.numpy()
    x_on = xn if rows is None else xn[rows]
    mpn = (mp.numpy() if rows is None else mp.numpy()[rows]).astype(np.float64)
    if not (mpn >= _MIN_P_SMALLEST).all():
        return None
    m = x_on.max(axis=-1)  # (NaN propagates: refused)
    if not np.isfinite(m).all():
        return None
    bound = m.astype(np.float64) + np.log(mpn) - _MIN_P_LOG_MARGIN
    with np.errstate(over="ignore"):  # (logits near the float32 range: a bound past it is +-inf)
        tau = bound.astype(np.float32)
        tau = np.where(tau > bound, np.nextafter(tau, np.float32(-np.inf)), tau)  # (rounded down: more candidates)
    flat = flat_not_below(x_on, tau)
    if flat.size * _TOP_K_SPARSE_FRACTION > x_on.size:
        return None
    cand_rows = packed_columns(flat, x_on.shape)[0]
    e = torch.exp(torch.from_numpy(x_on.reshape(-1)[flat] - m[cand_rows])).numpy().astype(np.float64)
    limit = mpn[cand_rows]
    keep = e >= limit * (1.0 + _MIN_P_MARGIN)
    unsure = np.flatnonzero(~keep & (e >= limit * (1.0 - _MIN_P_MARGIN)))
    if unsure.size:
        _, s = softmax_terms(upcast(logits))
        sn = s.numpy()[:, 0] if rows is None else s.numpy()[rows, 0]
        threshold = mpn.astype(np.float32) * (np.float32(1.0) / sn)  # (float32: mp * p_max)
        r = cand_rows[unsure]
        keep[unsure] = e[unsure].astype(np.float32) / sn[r] >= threshold[r]
    return _rows_result(xn, rows, flat[np.flatnonzero(keep)])


def tfs(logits: Tensor, tfs: ParamLike) -> Tensor:
    """Tail-free sampling.

    Args:
        logits: ``[B, V]`` float tensor.
        tfs: ``[B]`` float32 ``z`` in ``(0, 1]``; ``1.0`` (or more) disables the row.

    Formula (SEMANTICS.md): sort ``p = softmax(l)`` descending over all ``V`` tokens
    (removed tokens count as probability 0); ``d2 = abs(diff(diff(p_sorted)))`` (length
    ``V - 2``), normalised to sum 1; ``c = cumsum(d2)``. Sorted position 0 is always kept;
    position ``k >= 1`` is kept iff ``c[min(k, V - 2) - 1] <= z``. If ``d2`` sums to 0 (flat
    or linear distribution, or ``V < 3``) every token is kept.

    Tie rule: the kept positions form a prefix of the sorted order; every token whose
    probability is ``>=`` that of the last kept position is kept (ties at the boundary are
    all kept, independent of sort stability).

    Unlike Aphrodite, the least likely sorted token is not dropped unconditionally, so
    ``tfs = 1.0`` is the identity.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    z = sampler_param(tfs, logits, "tfs")
    # Packed rows keep two removed tokens (probability 0) after the widest row's tokens, so
    # the second differences at the end of each row's sorted probabilities are the same.
    sparse = compact_rows(logits, pad=2, min_width=3)
    # (the full rows' width decides: a chain's packed rows may be narrower than 3 columns)
    if (logits.shape[1] if sparse is None else sparse.shape[1]) < 3:
        return logits.clone()  # no second differences: every token is kept
    if sparse is not None:
        return sparse.expand_truncated(_tfs(sparse.logits, z, sparse))
    return _tfs(logits, z)


def _tfs(logits: Tensor, z: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = z < 1.0
    vocab = logits.shape[1]
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    p_sorted = sort_values_desc(p)
    d2 = torch.diff(torch.diff(p_sorted, dim=-1), dim=-1).abs()
    total = row_sum(d2) if sparse is None else _sum_full_width(d2, sparse.shape[1] - 2)
    cdf = torch.cumsum(d2 / torch.where(total > 0, total, torch.ones_like(total)), dim=-1)
    # Sorted positions 1 .. V-1 read cdf[0 .. V-3], and the last position reads cdf[V-3] again.
    cdf_per_position = torch.cat([cdf, cdf[:, -1:]], dim=-1)
    n_kept = 1 + count_below(cdf_per_position, z, inclusive=True)
    n_kept = torch.where(total[:, 0] > 0, n_kept, torch.full_like(n_kept, vocab))
    threshold = prefix_boundary(p_sorted, n_kept)[:, 0]
    # A probability of the row (<= p_max): the mask-free keep_at_least applies (see top_p).
    threshold = torch.where(enabled, threshold, torch.full_like(threshold, float("-inf")))
    return keep_at_least(logits, p, threshold, values_is_scratch=True, values_not_negative_zero=True)


def _sum_full_width(x: Tensor, width: int) -> Tensor:
    """``[B, 1]``: row sums of ``x`` (``[B, w]``, ``w <= width``) padded with zeros to
    ``width`` columns: the sum of a packed row's sorted-order array as the full row's
    (whose entries past ``w`` are 0), grouped as torch groups the full width."""
    batch, w = x.shape
    flat = (np.arange(batch, dtype=np.int64)[:, None] * width + np.arange(w, dtype=np.int64)[None, :]).reshape(-1)
    return sum_scattered(x.contiguous().numpy().reshape(-1), flat, (batch, width))


def eta_cutoff(logits: Tensor, eta_cutoff: ParamLike) -> Tensor:
    """Eta sampling: keep ``t`` iff ``p(t) >= min(eta, sqrt(eta) * exp(-H))``.

    Args:
        logits: ``[B, V]`` float tensor.
        eta_cutoff: ``[B]`` float32 in ``[0, 1)`` (a plain probability, not in units of
            1e-4); ``0.0`` disables the row.

    ``p = softmax(l)`` and ``H = -sum(p log p)`` (natural log, ``0 log 0 = 0``) in fp32.
    Inclusive threshold; the top token always survives.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    eta = sampler_param(eta_cutoff, logits, "eta_cutoff")
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_eta_cutoff(sparse.logits, eta, sparse))
    return _eta_cutoff(logits, eta)


def _eta_cutoff(logits: Tensor, eta: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = eta > 0
    l32 = upcast(logits)
    p, logp = softmax_and_log_softmax(l32, sparse=sparse)
    h = entropy(p, logp, overwrite_logp=True, sparse=sparse)  # logp is not used again
    eps = torch.minimum(eta, torch.sqrt(eta.clamp_min(0)) * torch.exp(-h))
    return _keep_probability_at_least(logits, l32, p, eps, enabled, p.amax(dim=-1))


def epsilon_cutoff(logits: Tensor, epsilon_cutoff: ParamLike) -> Tensor:
    """Epsilon sampling: keep ``t`` iff ``p(t) >= epsilon``.

    Args:
        logits: ``[B, V]`` float tensor.
        epsilon_cutoff: ``[B]`` float32 in ``[0, 1)`` (a plain probability); ``0.0``
            disables the row.

    ``p = softmax(l)`` in fp32. Inclusive threshold; the top token always survives.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    eps = sampler_param(epsilon_cutoff, logits, "epsilon_cutoff")
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_epsilon_cutoff(sparse.logits, eps, sparse))
    return _epsilon_cutoff(logits, eps)


def _epsilon_cutoff(logits: Tensor, eps: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = eps > 0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    return _keep_probability_at_least(logits, l32, p, eps, enabled, p.amax(dim=-1))


def typical_p(logits: Tensor, typical_p: ParamLike) -> Tensor:
    """Locally typical sampling.

    Args:
        logits: ``[B, V]`` float tensor.
        typical_p: ``[B]`` float32 in ``(0, 1]``; ``1.0`` (or more) disables the row.

    With ``p = softmax(l)``, ``H = -sum(p log p)`` and the deviation
    ``d(t) = abs(-log p(t) - H)``, order tokens by ``d`` ascending and keep the shortest
    prefix whose probability sums to ``>= typical_p`` (paper / HF / llama.cpp definition).

    Tie rule (a threshold, as every sort-defined rule here): keep ``t`` iff
    ``sum(p(s) for s with d(s) < d(t)) < typical_p``; tokens tied in ``d`` with the last kept
    one are all kept. Removed tokens (``p = 0``, ``d = inf``) stay ``-inf``.

    The top token is NOT added back: it is removed when its deviation is large (as in HF
    transformers and llama.cpp; e.g. ``p = [0.4, 0.2, 0.2, 0.2]`` at ``typical_p = 0.5``
    keeps only the three 0.2 tokens, whose deviation is smaller). The token(s) of least
    deviation always have mass 0 before them, so a row with a finite token never empties.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    tp = sampler_param(typical_p, logits, "typical_p")
    # After a truncation: the deviations of the tokens still in are sorted and summed on the
    # packed rows (removed tokens have p = 0 and d = inf: they sort last and add nothing).
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_typical_p(sparse.logits, tp, sparse))
    return _typical_p(logits, tp)


def _typical_p(logits: Tensor, tp: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = tp < 1.0
    l32 = upcast(logits)
    p, logp = softmax_and_log_softmax(l32, sparse=sparse)
    h = entropy(p, logp, sparse=sparse)
    dev = logp.neg_().sub_(h[:, None]).abs_()  # |-log p - H| in place; +inf for removed tokens
    dev_sorted, order = sort_nonneg(dev)
    n_kept = _count_mass_before_below(p.gather(-1, order).cumsum_(dim=-1), tp)
    threshold = prefix_boundary(dev_sorted, n_kept)
    keep = dev <= threshold
    # not apply_keep: that adds the top token(s), which typical_p does not keep by itself
    keep.logical_or_(~enabled[:, None])
    return fill_removed(logits, keep, scratch=p)


def nsigma(logits: Tensor, nsigma: ParamLike) -> Tensor:
    """Top-n-sigma: keep ``t`` iff ``l(t) >= max(l) - nsigma * std(l)``.

    Args:
        logits: ``[B, V]`` float tensor.
        nsigma: ``[B]`` float32 ``>= 0``; ``0.0`` disables the row.

    ``std`` is the sample standard deviation (divisor ``N - 1``, as ``torch.std``) over the
    ``N`` finite logits of the row, computed in fp32; ``std = 0`` when ``N <= 1``. Works on
    logits, not probabilities. Inclusive threshold; the top token always survives.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    return _nsigma_checked(logits, sampler_param(nsigma, logits, "nsigma"))


def _nsigma_checked(logits: Tensor, n: Tensor) -> Tensor:
    """``nsigma`` once its arguments are checked (``n``: float32 ``[B]``)."""
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_nsigma(sparse.logits, n, sparse))
    return _nsigma(logits, n)


def nsigma_top_k(logits: Tensor, nsigma: ParamLike, top_k: ParamLike) -> Tensor:
    """``top_k(nsigma(logits, nsigma), top_k)``, bit for bit, without nsigma's ``[B, V]``
    result where top_k's candidates give the answer.

    Args:
        logits: ``[B, V]`` float tensor (full rows).
        nsigma: ``[B]`` float32, as ``nsigma`` takes it.
        top_k: ``[B]`` int64, as ``top_k`` takes it.

    nsigma keeps the entries ``l >= tau`` (its threshold; every entry on a disabled row), and
    top_k then keeps those not below the ``k``-th largest of them: the row's own ``k``-th
    largest ``kth`` when at least ``k`` entries pass ``tau`` (``kth >= tau`` then), all of
    them otherwise (``kth < tau`` then). Either way the kept entries are those
    ``>= max(tau, kth)``, ties included. On float32 CPU rows where top_k takes its candidates
    (``_candidates``: every entry below ``kth`` but the candidates) and enables every row,
    nsigma's statistics are computed as it computes them and the candidates not below
    ``max(tau, kth)`` are kept. Otherwise the two samplers run one after the other.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    n = sampler_param(nsigma, logits, "nsigma")
    k = sampler_param(top_k, logits, "top_k")
    out = _nsigma_top_k_by_candidates(logits, n, k)
    return out if out is not None else _top_k_checked(_nsigma_checked(logits, n), k)


def _nsigma_top_k_by_candidates(logits: Tensor, n: Tensor, k: Tensor) -> Optional[Tensor]:
    """``nsigma_top_k``'s result from top_k's candidates, or None (see there and
    ``_candidates_of_every_row``; also where nsigma's threshold is above an enabled row's max,
    and it would keep the top token with a mask)."""
    found = _candidates_of_every_row(logits, k)
    if found is None:  # (NaN or +inf among the candidates too)
        return None
    batch, vocab = logits.shape
    flat, at_row, values, _, kth, top = found
    # (on full rows: nsigma's statistics of rows another truncation left mostly -inf, which it
    # would take packed, are the same, as the packed sums are the full rows' by construction;
    # each row's max is its largest candidate)
    rows = _nsigma_rows(logits, n, row_max=torch.from_numpy(top)[:, None])
    enabled = n > 0
    if bool(((rows.threshold > rows.row_max[:, 0]) & enabled).any()):
        return None
    tau = torch.where(enabled, rows.threshold, torch.full_like(rows.threshold, float("-inf"))).numpy()
    kept = np.flatnonzero(values >= np.maximum(kth, tau)[at_row])
    return _sparse_result(flat[kept], values[kept], (batch, vocab), top_level=True)


class _NsigmaRows(NamedTuple):
    """What nsigma computes of its rows before it keeps any: ``threshold`` ``[B]`` (``max -
    n * std``, disabled rows too: the caller gives them ``-inf``), ``row_max`` ``[B, 1]``, the
    float32 rows ``l32``, ``scratch`` (a ``[B, V]`` temporary the keep may reuse) and whether
    the rows were proven ``all_finite`` or to hold ``-inf`` as their only non-finite entries
    (``removed_only``)."""

    threshold: Tensor
    row_max: Tensor
    l32: Tensor
    scratch: Tensor
    all_finite: bool
    removed_only: bool


def _nsigma(logits: Tensor, n: Tensor, sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = n > 0
    threshold, row_max, l32, scratch, all_finite, removed_only = _nsigma_rows(logits, n, sparse)
    if logits.device.type == "cpu" and not bool(((threshold > row_max[:, 0]) & enabled).any()):
        # The top token(s) pass l >= threshold: no top-token mask needed.
        thr = torch.where(enabled, threshold, torch.full_like(threshold, float("-inf")))
        if (sparse is None and (all_finite or removed_only) and logits is l32 and _numpy_rows(l32)
                and packed_result_wanted()):
            # n sigmas below the max usually leave a few tokens per row: inside a chain they are
            # handed on packed, without a [B, V] result for the next sampler to pack again
            # (outside, the keep by sign below is the faster: finding the few costs more)
            out = _keep_at_least_if_few(l32, thr, scratch)
            if out is not None:
                return out
        # (the squares' buffer becomes the output)
        return keep_logits_at_least(logits, l32, thr, scratch, finite=all_finite or removed_only,
                                    not_packable=sparse is None)
    keep = l32 >= threshold[:, None]
    return apply_keep(logits, l32, keep, enabled, row_max=row_max, scratch=scratch)


def _nsigma_rows(logits: Tensor, n: Tensor, sparse: Optional[SparseRows] = None,
                 row_max: Optional[Tensor] = None) -> _NsigmaRows:
    """nsigma's statistics of each row (``_NsigmaRows``); ``row_max``: ``[B, 1]``, each row's
    max when the caller knows it."""
    l32 = upcast(logits)
    if row_max is None:
        row_max = l32.amax(dim=-1, keepdim=True)
    total = None
    removed_only = False
    finite = removed = None
    noted = noted_removed(l32) if sparse is None else None
    if l32.device.type != "cpu":
        all_finite = False
    elif noted is not None and not noted[0].numel():
        all_finite = True  # (noted by this chain: no removed token, no other non-finite logit)
    elif noted is not None:
        # (a sampler before it in this chain found the removed tokens, the only non-finite logits)
        (removed, n_removed), all_finite, removed_only = noted, False, True
    elif sparse is None:
        # Every row sum finite: every logit is (an inf or NaN term makes its sum inf or NaN;
        # a sum that overflows takes the masked path, which gives the same values then).
        # Every sum finite or -inf: no logit is NaN or +inf (either makes its sum NaN or +inf).
        total = row_sum(l32)
        all_finite = bool(torch.isfinite(total).all())
        removed_only = not all_finite and l32.is_contiguous() and bool((total < float("inf")).all())
    else:
        # (packed rows: min and max finite, two cheap reductions instead of a [B, K] mask)
        all_finite = bool(((l32.amin(dim=-1) > float("-inf")) & (row_max[:, 0] < float("inf"))).all())
    if all_finite:
        # Untruncated rows: the zeroing below would change nothing.
        count = torch.full((l32.shape[0], 1), float(l32.shape[1]), device=l32.device)
        mean = (row_sum(l32, sparse) if total is None else total) / count.clamp_min(1)
        # (l - mean)**2 in one pass (mse_loss's elementwise kernel: d = a - b, d * d, the bits
        # of the sub and pow(2) passes); its buffer becomes the result's below
        scratch = torch.nn.functional.mse_loss(l32, mean.expand_as(l32), reduction="none")
        sq = row_sum(scratch, sparse)
    elif removed_only:
        # Rows with removed tokens (-inf) and nothing else non-finite, as a grammar's mask or an
        # earlier sampler leaves them: the masked path's values, with the mask applied once to
        # the squares instead of converting it to float and multiplying every deviation by it.
        if removed is None:
            removed, n_removed = removed_tokens(l32)
        count = (l32.shape[1] - n_removed).to(_F32)[:, None]
        lf = l32.nan_to_num(neginf=0.0)
        mean = row_sum(lf) / count.clamp_min(1)
        # (l - mean)**2 in lf's own buffer (mse_loss's bits: the same sub and square), a [B, V]
        # temporary fewer: at [64, 32000] a third one no longer fits the caches
        scratch = lf.sub_(mean).square_()
        scratch.view(-1)[removed] = 0.0  # (the masked path's (0 - mean) * 0, squared)
        sq = row_sum(scratch)
    else:
        finite = is_finite(l32).to(_F32)  # 1.0 / 0.0
        count = finite.sum(dim=-1, keepdim=True)  # exact in fp32 (V < 2**24)
        # Non-finite logits read as 0 in the sum and contribute 0 to the squares.
        lf = l32.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        mean = row_sum(lf, sparse) / count.clamp_min(1)
        scratch = lf.sub_(mean).mul_(finite).pow_(2)
        sq = row_sum(scratch, sparse)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    if not bool(torch.isfinite(std).all()):
        # Sums past the float32 range (logits ~1e37 and more) give inf or NaN: those rows again on
        # the logits divided by their largest magnitude (std scales; the result may be inf, never NaN).
        lf = l32.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        scale = lf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(_F32).tiny)
        ls = lf / scale
        mean_s = row_sum(ls, sparse) / count.clamp_min(1)
        if removed is not None:
            finite = torch.ones_like(l32)
            finite.view(-1)[removed] = 0.0
        dev_s = ls.sub_(mean_s) if finite is None else ls.sub_(mean_s).mul_(finite)
        sq_s = row_sum(dev_s.pow_(2), sparse)
        std = torch.where(torch.isfinite(std), std, torch.sqrt(sq_s / (count - 1).clamp_min(1)) * scale)
    std = torch.where(count > 1, std, torch.zeros_like(std))
    threshold = (row_max - n[:, None] * std)[:, 0]
    return _NsigmaRows(threshold, row_max, l32, scratch, all_finite, removed_only)


def xtc(
    logits: Tensor,
    xtc_threshold: ParamLike,
    xtc_probability: ParamLike,
    coin: ParamLike,
) -> Tensor:
    """Exclude Top Choices.

    Args:
        logits: ``[B, V]`` float tensor.
        xtc_threshold: ``[B]`` float32 in ``[0, 1]``.
        xtc_probability: ``[B]`` float32 in ``[0, 1]``; ``0.0`` disables the row.
        coin: ``[B]`` float32 in ``[0, 1]``, uniform in ``[0, 1)``, one draw per row per step from the
            row's random stream (the caller draws it).

    A row is processed iff ``xtc_probability > 0`` and ``coin < xtc_probability``; other
    rows are returned bit-identical. With ``p = softmax(l)`` (fp32), let
    ``C = {t : l(t) finite and p(t) >= xtc_threshold}`` (tokens already removed never
    belong to ``C``). If ``|C| >= 2``, every ``t`` in ``C`` with ``p(t) > min_C p`` is
    removed: the least likely member(s) of ``C`` survive (all of them when tied), as do the
    tokens outside ``C``. XTC does not keep the top token (removing it is the point), but a
    row never loses every token.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    threshold = sampler_param(xtc_threshold, logits, "xtc_threshold")
    probability = sampler_param(xtc_probability, logits, "xtc_probability")
    u = sampler_param(coin, logits, "coin")
    if logits.device.type == "cpu" and not bool(((probability > 0) & (u < probability)).any()):
        return logits.clone()  # no row's coin came up (no sync on the CPU): nothing to compute
    sparse = compact_rows(logits)
    if sparse is not None:
        return sparse.expand_truncated(_xtc(sparse.logits, threshold, probability, u, sparse))
    return _xtc(logits, threshold, probability, u)


def _xtc(logits: Tensor, threshold: Tensor, probability: Tensor, u: Tensor,
         sparse: Optional[SparseRows] = None) -> Tensor:
    enabled = (probability > 0) & (u < probability)
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32, with_log=False, sparse=sparse)
    if logits.device.type == "cpu" and logits.shape[1] >= 2 and not bool((enabled & (threshold <= 0)).any()):
        return _xtc_positive_threshold(logits, p, threshold, enabled)
    in_c = (p >= threshold[:, None]) & is_finite(l32)
    size_c = count_true(in_c)[:, None]
    # min of p over C: p where in C, +inf elsewhere, as max(p, -inf in C / +inf outside).
    outside = (~in_c).to(_F32).sub_(0.5).mul_(float("inf"))
    min_c = torch.maximum(p, outside, out=outside).amin(dim=-1, keepdim=True)
    remove = in_c & (p > min_c) & (size_c >= 2) & enabled[:, None]
    return fill_removed(logits, ~remove)


def _xtc_positive_threshold(logits: Tensor, p: Tensor, threshold: Tensor, enabled: Tensor) -> Tensor:
    """XTC when every enabled row has ``threshold > 0``: then ``p >= threshold`` implies
    ``p > 0`` (a finite logit), ``|C| >= 2`` iff the second largest ``p`` is ``>= threshold``,
    and the removed tokens are exactly those with ``p > min_C p`` (such a ``p`` is in C).
    No boolean ``[B, V]`` mask: signs of differences select (see ``keep_at_least``)."""
    d = p - threshold[:, None]  # >= +0.0 exactly in C
    inside = torch.copysign(torch.tensor(float("inf")), d, out=d).neg_()  # -inf in C, +inf outside
    min_c = torch.maximum(p, inside, out=inside).amin(dim=-1)
    second = torch.topk(p, 2, dim=-1).values[:, 1]
    active = enabled & (second >= threshold)
    min_c = torch.where(active, min_c, torch.full_like(min_c, float("inf")))
    # keep t iff p(t) <= min_C, i.e. -p(t) >= -min_C; p is a temporary of the caller.
    return keep_at_least(logits, p.neg_(), -min_c, values_is_scratch=True)
