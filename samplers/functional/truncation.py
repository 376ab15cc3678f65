"""Truncation samplers: the reference torch path.

Each function takes ``logits`` ``[B, V]`` (fp32, fp16 or bf16, any device) and per-row
parameters ``[B]`` (float32, or int64 for ``top_k``) and returns a NEW tensor of the same
dtype and shape in which removed tokens are ``-inf`` and kept tokens keep their exact input
value. Statistics (probabilities, entropy, ...) are computed in fp32 (see ``_stats``).

Shared rules (SEMANTICS.md, conventions.md):

- A row whose parameter has the disabled value comes out bit-identical.
- Tokens that are already ``-inf`` have probability 0 and stay ``-inf``.
- Every sampler except XTC keeps the row's top token(s): every finite token whose logit
  equals the row maximum (so ties at the maximum are all kept). XTC removes top tokens by
  design, but always leaves at least one token of the row.
- Sort-based rules are expressed as thresholds, so tokens tied at the boundary are all kept
  and nothing depends on sort stability.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._stats import (
    ParamLike,
    apply_keep,
    check_logits,
    entropy,
    exclusive_cumsum,
    prefix_boundary,
    row_param,
    select_rows,
    softmax_and_log_softmax,
    upcast,
)

__all__ = [
    "top_k",
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
    full sort); reading that ``k`` is one device-to-host sync.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    batch, vocab = logits.shape
    k = row_param(top_k, logits, torch.int64, "top_k")
    enabled = (k > 0) & (k < vocab)
    if batch == 0 or vocab == 0:
        return logits.clone()
    k_row = torch.where(enabled, k, torch.ones_like(k))
    k_max = int(k_row.max())
    l32 = upcast(logits)
    largest = torch.topk(l32, k_max, dim=-1, largest=True, sorted=True).values
    kth = largest.gather(-1, (k_row - 1)[:, None])
    keep = l32 >= kth
    return apply_keep(logits, l32, keep, enabled)


def top_p(logits: Tensor, top_p: ParamLike) -> Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass is >= ``top_p``.

    Args:
        logits: ``[B, V]`` float tensor.
        top_p: ``[B]`` float32 in ``(0, 1]``; ``1.0`` (or more) disables the row.

    Rule (tie rule of conventions.md): with ``p = softmax(l)``, keep ``t`` iff
    ``sum(p(s) for s with p(s) > p(t)) < top_p``. For distinct probabilities this is the
    smallest prefix of the descending order whose sum is ``>= top_p``; tokens tied with the
    last token of that prefix are all kept. The top token is always kept.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    tp = row_param(top_p, logits, _F32, "top_p")
    enabled = tp < 1.0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    p_sorted = torch.sort(p, dim=-1, descending=True).values
    mass_before = exclusive_cumsum(p_sorted)
    n_kept = (mass_before < tp[:, None]).sum(dim=-1)
    threshold = prefix_boundary(p_sorted, n_kept)
    keep = p >= threshold
    return apply_keep(logits, l32, keep, enabled)


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
    a = row_param(top_a, logits, _F32, "top_a")
    enabled = a > 0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    p_max = p.amax(dim=-1)
    keep = p >= (a * p_max * p_max)[:, None]
    return apply_keep(logits, l32, keep, enabled)


def min_p(logits: Tensor, min_p: ParamLike) -> Tensor:
    """Min-p: keep ``t`` iff ``p(t) >= min_p * p_max``.

    Args:
        logits: ``[B, V]`` float tensor.
        min_p: ``[B]`` float32 in ``[0, 1]``; ``0.0`` disables the row.

    ``p = softmax(l)`` in fp32. Inclusive threshold (tied tokens are treated alike); the
    top token always survives.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    mp = row_param(min_p, logits, _F32, "min_p")
    enabled = mp > 0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    p_max = p.amax(dim=-1)
    keep = p >= (mp * p_max)[:, None]
    return apply_keep(logits, l32, keep, enabled)


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
    z = row_param(tfs, logits, _F32, "tfs")
    enabled = z < 1.0
    vocab = logits.shape[1]
    if vocab < 3:  # no second differences: every token is kept
        return logits.clone()
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    p_sorted = torch.sort(p, dim=-1, descending=True).values
    d2 = torch.diff(torch.diff(p_sorted, dim=-1), dim=-1).abs()
    total = d2.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(d2 / torch.where(total > 0, total, torch.ones_like(total)), dim=-1)
    # Sorted positions 1 .. V-1 read cdf[0 .. V-3], and the last position reads cdf[V-3] again.
    cdf_per_position = torch.cat([cdf, cdf[:, -1:]], dim=-1)
    n_kept = 1 + (cdf_per_position <= z[:, None]).sum(dim=-1)
    n_kept = torch.where(total[:, 0] > 0, n_kept, torch.full_like(n_kept, vocab))
    threshold = prefix_boundary(p_sorted, n_kept)
    keep = p >= threshold
    return apply_keep(logits, l32, keep, enabled)


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
    eta = row_param(eta_cutoff, logits, _F32, "eta_cutoff")
    enabled = eta > 0
    l32 = upcast(logits)
    p, logp = softmax_and_log_softmax(l32)
    h = entropy(p, logp)
    eps = torch.minimum(eta, torch.sqrt(eta.clamp_min(0)) * torch.exp(-h))
    keep = p >= eps[:, None]
    return apply_keep(logits, l32, keep, enabled)


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
    eps = row_param(epsilon_cutoff, logits, _F32, "epsilon_cutoff")
    enabled = eps > 0
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    keep = p >= eps[:, None]
    return apply_keep(logits, l32, keep, enabled)


def typical_p(logits: Tensor, typical_p: ParamLike) -> Tensor:
    """Locally typical sampling.

    Args:
        logits: ``[B, V]`` float tensor.
        typical_p: ``[B]`` float32 in ``(0, 1]``; ``1.0`` (or more) disables the row.

    With ``p = softmax(l)``, ``H = -sum(p log p)`` and the deviation
    ``d(t) = abs(-log p(t) - H)``, order tokens by ``d`` ascending and keep the shortest
    prefix whose probability sums to ``>= typical_p`` (paper / HF / llama.cpp definition).

    Tie rule (conventions.md): keep ``t`` iff
    ``sum(p(s) for s with d(s) < d(t)) < typical_p``; tokens tied in ``d`` with the last kept
    one are all kept. Removed tokens (``p = 0``, ``d = inf``) stay ``-inf``. The top token
    is always kept, also when its deviation is large.

    Returns:
        ``[B, V]`` tensor, same dtype as ``logits``; removed tokens are ``-inf``.
    """
    check_logits(logits)
    tp = row_param(typical_p, logits, _F32, "typical_p")
    enabled = tp < 1.0
    l32 = upcast(logits)
    p, logp = softmax_and_log_softmax(l32)
    h = entropy(p, logp)
    dev = (-logp - h[:, None]).abs()  # +inf for removed tokens
    dev_sorted, order = torch.sort(dev, dim=-1)
    mass_before = exclusive_cumsum(p.gather(-1, order))
    n_kept = (mass_before < tp[:, None]).sum(dim=-1)
    threshold = prefix_boundary(dev_sorted, n_kept)
    keep = dev <= threshold
    return apply_keep(logits, l32, keep, enabled)


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
    n = row_param(nsigma, logits, _F32, "nsigma")
    enabled = n > 0
    l32 = upcast(logits)
    finite = torch.isfinite(l32)
    count = finite.sum(dim=-1, keepdim=True)
    zeros = torch.zeros_like(l32)
    mean = torch.where(finite, l32, zeros).sum(dim=-1, keepdim=True) / count.clamp_min(1)
    sq = torch.where(finite, (l32 - mean) ** 2, zeros).sum(dim=-1, keepdim=True)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    std = torch.where(count > 1, std, torch.zeros_like(std))
    row_max = l32.amax(dim=-1, keepdim=True)
    keep = l32 >= row_max - n[:, None] * std
    return apply_keep(logits, l32, keep, enabled)


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
        coin: ``[B]`` float32, uniform in ``[0, 1)``, one draw per row per step from the
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
    threshold = row_param(xtc_threshold, logits, _F32, "xtc_threshold")
    probability = row_param(xtc_probability, logits, _F32, "xtc_probability")
    u = row_param(coin, logits, _F32, "coin")
    enabled = (probability > 0) & (u < probability)
    l32 = upcast(logits)
    p, _ = softmax_and_log_softmax(l32)
    in_c = (p >= threshold[:, None]) & torch.isfinite(l32)
    size_c = in_c.sum(dim=-1, keepdim=True)
    min_c = torch.where(in_c, p, torch.full_like(p, float("inf"))).amin(dim=-1, keepdim=True)
    remove = in_c & (p > min_c) & (size_c >= 2)
    out = logits.masked_fill(remove, float("-inf"))
    return select_rows(enabled, out, logits)
