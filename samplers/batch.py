"""``SamplingBatch``: the per-row parameters and token histories of one batch, on a device.

Built once per batch of requests; during generation ``append(token_ids)`` advances every row
by one token in O(B) work (the histories' derived state is updated, not rebuilt), and
``append(token_ids, rows=mask)`` only the masked rows.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional, Sequence, Union, cast

import numpy as np
import torch

from ._device import default_device
from .history import TokenHistory
from .params import FLOAT32_MAX, GREEDY_TEMPERATURE, SamplingParams, _integer, _token_id, _token_ids
from .priority import SamplerID
from .sampling import split_seed

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

# Per-row parameters held as float32 [B] tensors (one stacked transfer to the device).
FLOAT_FIELDS = (
    "repetition_penalty", "frequency_penalty", "presence_penalty",
    "dry_multiplier", "dry_base",
    "temperature", "dynatemp_min", "dynatemp_max", "dynatemp_exponent",
    "smoothing_factor", "smoothing_curve",
    "top_p", "top_a", "min_p", "tfs", "eta_cutoff", "epsilon_cutoff", "typical_p", "nsigma",
    "xtc_threshold", "xtc_probability", "skew",
)
# ... and as int64 [B] tensors.
INT_FIELDS = ("top_k", "no_repeat_ngram_size", "min_tokens", "dry_allowed_length", "dry_range")

# Per-row facts a batch keeps as bool arrays (``_RowRecord.flags``' columns).
_GREEDY, _DYNATEMP, _STATIC_TEMPERATURE, _IDENTITY, _SKEW, _TOP_K, _TOP_P, _REPETITION, _COUNT, \
    _SEEDED, _LOGPROBS, _RAW_LOGPROBS, _LOGIT_BIAS, _MIN_TOKENS, _BREAKERS, _TABLE_LOGPROB = range(16)
# The int64 columns after INT_FIELDS: the seed's key words and ``logprobs or 0``.
_KEY_LO, _KEY_HI, _MAX_LOGPROBS = range(len(INT_FIELDS), len(INT_FIELDS) + 3)


class _RowRecord(NamedTuple):
    """What a batch takes from one ``SamplingParams``, as raw bytes so that a batch's rows
    are joined into arrays in one C-level pass (``_row_records``)."""

    floats: bytes  #: FLOAT_FIELDS, float32
    ints: bytes  #: INT_FIELDS, then _KEY_LO, _KEY_HI, _MAX_LOGPROBS, int64
    flags: bytes  #: the _GREEDY ... _TABLE_LOGPROB facts, one byte (bool) each
    order: tuple[SamplerID, ...]  #: ``enabled_order()``
    bias_ids: np.ndarray  #: logit_bias's token ids (int64, read-only), in its order
    bias_values: np.ndarray  #: ... and its biases (float32, read-only)
    breakers: np.ndarray  #: dry_sequence_breaker_ids (int64, read-only)


def _row_record(p: SamplingParams) -> _RowRecord:
    """``p``'s record, computed once per object and kept on it: ``SamplingParams`` is frozen,
    so its record never goes stale, and an engine that rebuilds its batch when a request joins
    (the vLLM processors) pays for the joining rows only."""
    cached = p.__dict__.get("_batch_row_record")
    if cached is not None:
        return cached
    order = p.enabled_order()
    greedy = p.is_greedy
    lo, hi = split_seed(p.seed) if p.seed is not None else (0, 0)
    flags = (
        greedy,
        p.dynatemp_enabled and not greedy,
        not greedy and not p.dynatemp_enabled and p.temperature != 1.0,
        not order and not p.logit_bias and p.min_tokens == 0 and p.skew == 0.0,
        p.skew != 0.0,
        p.top_k > 0,
        p.top_p < 1.0,
        p.repetition_penalty != 1.0,
        p.frequency_penalty != 0.0 or p.presence_penalty != 0.0,
        p.seed is not None,
        p.logprobs is not None,
        p.logprobs_mode == "raw",
        bool(p.logit_bias),
        p.min_tokens > 0,
        bool(p.dry_sequence_breaker_ids),
        # its chosen log-probability is read off the same table as its alternatives
        bool(p.logprobs) or p.logprobs_mode == "raw",
    )
    # (SamplingParams holds its integers within int64)
    ints = np.array([getattr(p, f) for f in INT_FIELDS] + [lo, hi, p.logprobs or 0], dtype=np.int64)
    bias = p.logit_bias
    lists = (_frozen(np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))) if bias else _NO_IDS,
             _frozen(np.fromiter(bias.values(), dtype=np.float32, count=len(bias))) if bias else _NO_BIAS,
             _frozen(np.array(p.dry_sequence_breaker_ids, dtype=np.int64)) if p.dry_sequence_breaker_ids else _NO_IDS)
    record = _RowRecord(np.array([getattr(p, f) for f in FLOAT_FIELDS], dtype=np.float32).tobytes(),
                        ints.tobytes(), bytes(flags), order, *lists)
    p.__dict__["_batch_row_record"] = record  # (frozen dataclass: its __setattr__ refuses)
    return record


def _ragged(lists: Sequence[np.ndarray], dtype: DTypeLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists of different lengths as three flat arrays: their entries one after the other
    (``dtype``), each entry's list number and its place in its list."""
    if not lists:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sizes = np.fromiter((a.size for a in lists), dtype=np.int64, count=len(lists))
    flat = np.concatenate(lists).astype(dtype, copy=False)
    which = np.repeat(np.arange(len(lists)), sizes)
    return flat, which, np.arange(flat.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def _padded_table(lists: Sequence[np.ndarray], rows: np.ndarray, B: int, fill: Union[int, float],
                  dtype: DTypeLike, width: int = 1) -> np.ndarray:
    """``[B, K]``: row ``rows[i]`` starts with ``lists[i]``; ``fill`` elsewhere; K the longest
    list (at least ``width``)."""
    flat, which, place = _ragged(lists, dtype)
    table = np.full((B, max(width, int(place.max()) + 1 if place.size else 0)), fill, dtype=dtype)
    table[rows[which], place] = flat
    return table


def _may_leave_float32(absmax, factors, history_length: int, vocab_size: int):
    """``SamplingBatch.may_overflow``'s bound for a row of these parameters (``factors``:
    ``_overflow_factors``' logit_bias, penalties, gain, smoothing, quad, cubic, nsigma; floats
    and bools, or ``[B]`` arrays of them: elementwise) on logits with |l| <= ``absmax``: the largest
    magnitude the stages can reach, from the bias (|b| <= 100), the penalties (|f|, |presence|
    <= 2, count <= the history's length), the scaling stages' gain (before and after the
    smoothing polynomial, whose input spread is at most 2m), leaves a margin of 4 to float32's
    largest value, and nsigma's sums of V squares stay below it."""
    logit_bias, penalties, gain, smoothing, quad, cubic, nsigma = factors
    m = (absmax + 100.0 * logit_bias + 4.0 * history_length * penalties) * gain
    d = 2.0 * m
    m = (m + quad * d * d + cubic * d * d * d) * (1.0 + (gain - 1.0) * smoothing)
    return (4.0 * m > FLOAT32_MAX) | (nsigma & (4.0 * m * m * vocab_size > FLOAT32_MAX))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # (a record's arrays are shared by every batch of its object)
    return a


_NO_IDS = _frozen(np.zeros(0, dtype=np.int64))
_NO_BIAS = _frozen(np.zeros(0, dtype=np.float32))


def _row_records(params: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                            list[_RowRecord]]:
    """The rows' float32 ``[B, len(FLOAT_FIELDS)]``, int64 ``[B, len(INT_FIELDS) + 3]`` and
    bool ``[B, 16]`` (the _GREEDY ... _TABLE_LOGPROB facts) arrays (writable) and their records."""
    records = [_row_record(p) for p in params]
    B = len(records)

    def joined(parts: Iterable[bytes], dtype: DTypeLike, width: int) -> np.ndarray:
        return np.frombuffer(bytearray(b"".join(parts)), dtype=dtype).reshape(B, width)

    return (joined((r.floats for r in records), np.float32, len(FLOAT_FIELDS)),
            joined((r.ints for r in records), np.int64, len(INT_FIELDS) + 3),
            joined((r.flags for r in records), np.bool_, _TABLE_LOGPROB + 1), records)

# One stage of the chain: a sampler, and the rows it applies to at this point
# (None = every row that enables it; a mask only appears when rows' orders differ).
Stage = tuple[SamplerID, Optional[torch.Tensor]]


def _schedule(orders: Sequence[tuple[SamplerID, ...]], device: torch.device) -> list[Stage]:
    """Merge per-row sampler orders into one list of stages.

    ``orders[b]`` is row b's enabled samplers in its order. When every row's order is a
    subsequence of one common order, that order is the schedule and no masks are needed
    (a sampler leaves the rows that do not enable it unchanged). Otherwise the schedule is a
    common supersequence in which some samplers occur more than once: a sampler that occurs
    once is a stage of every row (no mask); each occurrence of a repeated one is a stage of
    the rows whose order places it there (a mask). Rows with ``temperature_last`` beside rows
    without it, for example, get one masked temperature stage at each end and every other
    stage unmasked. When every sampler of the merge repeats, the stages go position by
    position: stage (s, mask) applies s to the rows whose j-th sampler is s.
    """
    return _schedule_with_rows(orders, device)[0]


def _schedule_with_rows(orders: Sequence[tuple[SamplerID, ...]], device: torch.device
                        ) -> tuple[list[Stage], list[Optional[torch.Tensor]], list[Optional[np.ndarray]]]:
    """``_schedule`` and, per stage, its rows as int64 indices on ``device`` and the same
    indices on the host (None for an unmasked stage)."""
    distinct = sorted(set(orders), key=len, reverse=True)
    common = _common_supersequence(distinct)
    if common is not None:
        return [(sid, None) for sid in common], [None] * len(common), [None] * len(common)
    sequence, places = _merged_supersequence(distinct)
    if all(sequence.count(sid) > 1 for sid in sequence):
        # The merge lets no stage run on every row (many unrelated orders). (Measured with
        # per_row_orders.py: its 256 random orders took ~20% longer through the merge's 151
        # stages than through the 196 position by position.)
        sequence, places = _by_position(distinct)
    repeated = {sid for sid in sequence if sequence.count(sid) > 1}
    stages: list[Stage] = []
    indices: list[Optional[torch.Tensor]] = []
    host_indices: list[Optional[np.ndarray]] = []
    row_places = [places[o] for o in orders]
    for i, sid in enumerate(sequence):
        if sid not in repeated:
            stages.append((sid, None))
            indices.append(None)
            host_indices.append(None)
            continue
        host = [i in p for p in row_places]
        stages.append((sid, torch.tensor(host, dtype=torch.bool).to(device)))
        at = np.flatnonzero(host).astype(np.int64, copy=False)
        host_indices.append(at)
        indices.append(torch.from_numpy(at).to(device))
    return stages, indices, host_indices


def _merged_supersequence(orders: Sequence[tuple[SamplerID, ...]]
                          ) -> tuple[list[SamplerID], dict[tuple[SamplerID, ...], tuple[int, ...]]]:
    """A common supersequence of ``orders`` (distinct orders), merged one order at a time by
    a shortest common supersequence of two (the classic dynamic programme over their longest
    common subsequence), and where each order's samplers sit in it."""
    sequence: list[SamplerID] = []
    places: dict[tuple[SamplerID, ...], tuple[int, ...]] = {}
    for order in orders:
        sequence, moved, placed = _merge_two(sequence, order)
        places = {o: tuple(moved[k] for k in p) for o, p in places.items()}
        places[order] = tuple(placed)
    return sequence, places


def _by_position(orders: Sequence[tuple[SamplerID, ...]]
                 ) -> tuple[list[SamplerID], dict[tuple[SamplerID, ...], tuple[int, ...]]]:
    """``_merged_supersequence``'s result position by position: for each j, the distinct j-th
    samplers of ``orders``."""
    width = max(len(o) for o in orders)
    slots = [(j, sid) for j in range(width) for sid in sorted({o[j] for o in orders if len(o) > j})]
    places = {o: tuple(slots.index((j, sid)) for j, sid in enumerate(o)) for o in orders}
    return [sid for _, sid in slots], places


def _merge_two(a: Sequence[SamplerID], b: Sequence[SamplerID]) -> tuple[list[SamplerID], list[int], list[int]]:
    """A shortest common supersequence of ``a`` and ``b`` (at most 14 samplers each: the
    table is tiny) and the positions in it of ``a``'s and ``b``'s entries."""
    n, m = len(a), len(b)
    lcs = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            lcs[i][j] = lcs[i + 1][j + 1] + 1 if a[i] == b[j] else max(lcs[i + 1][j], lcs[i][j + 1])
    merged: list[SamplerID] = []
    at_a: list[int] = []
    at_b: list[int] = []
    i = j = 0
    while i < n or j < m:
        if i < n and j < m and a[i] == b[j]:
            at_a.append(len(merged))
            at_b.append(len(merged))
            merged.append(a[i])
            i, j = i + 1, j + 1
        elif j == m or (i < n and lcs[i + 1][j] >= lcs[i][j + 1]):
            at_a.append(len(merged))
            merged.append(a[i])
            i += 1
        else:
            at_b.append(len(merged))
            merged.append(b[j])
            j += 1
    return merged, at_a, at_b


def _common_supersequence(orders: Sequence[tuple[SamplerID, ...]]) -> Optional[tuple[SamplerID, ...]]:
    """An order of all samplers in ``orders`` that contains each as a subsequence, if the
    pairwise "comes before" relations are consistent (a topological order); else None."""
    nodes = sorted({s for o in orders for s in o})
    before: dict[SamplerID, set[SamplerID]] = {s: set() for s in nodes}
    for o in orders:
        for i, a in enumerate(o):
            for b in o[i + 1:]:
                before[b].add(a)
    result: list[SamplerID] = []
    placed: set[SamplerID] = set()
    while len(result) < len(nodes):
        ready = [s for s in nodes if s not in placed and before[s] <= placed]
        if not ready:
            return None
        # Prefer the order of the longest row order (stable, readable schedules).
        ready.sort(key=lambda s: next((o.index(s) for o in orders if s in o), 0))
        result.append(ready[0])
        placed.add(ready[0])
    return tuple(result)


def normalise_device(device: Union[torch.device, str, None]) -> torch.device:
    """``device`` as the tensors on it report theirs: "cpu:0" -> cpu, "cuda" -> "cuda:<current>",
    so that a batch built with ``device="cuda"`` accepts logits on ``cuda:0``. None: torch's
    default device (the CPU unless ``torch.set_default_device`` says otherwise)."""
    if device is None:
        device = default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}: {exc}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.index is None:
        module = getattr(torch, dev.type, None)
        try:
            if module is not None and module.is_available():
                return torch.device(dev.type, module.current_device())
        except (AttributeError, RuntimeError):
            pass
    return dev


def _check_id_rows(name: str, rows: Sequence) -> None:
    """Every row a sequence of integer token ids (no floats, strings, bools, None or nested lists:
    numpy would truncate, parse or coerce them silently), each within int64; the vocabulary range is
    checked by ``TokenHistory``. One pass over the ids' types (a set), no per-id Python work."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (Sequence, torch.Tensor)):
        raise ValueError(f"{name} must be a list of token id lists (one per row), got {type(rows).__name__}")
    for b, row in enumerate(rows):
        if isinstance(row, (torch.Tensor, np.ndarray)):
            dt = row.dtype
            if row.ndim != 1 or not (dt in _INT_DTYPES or (isinstance(dt, np.dtype) and dt.kind in "iu")):
                raise ValueError(f"{name}[{b}] must be a 1-D integer tensor/array of token ids, got "
                                 f"{tuple(row.shape)} {dt}")
            continue
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{b}] must be a list of token ids, got {type(row).__name__} {str(row)[:80]}")
    kinds = {type(t) for row in rows if not isinstance(row, (torch.Tensor, np.ndarray)) for t in row}
    odd = [k for k in kinds if k is bool or not issubclass(k, (int, np.integer))]
    if odd:
        bad = next(t for row in rows if not isinstance(row, (torch.Tensor, np.ndarray))
                   for t in row if type(t) in odd)
        raise ValueError(f"{name} must hold integer token ids, got {type(bad).__name__} {str(bad)[:80]}")


def _sequence_indices(values: Optional[Sequence[int]], B: int) -> list[int]:
    """``sequence_indices`` checked: ``B`` integers in ``[0, 2**32)`` (default: zeros). A
    list of plain ints is checked with two C-level reductions; anything else entry by entry."""
    if values is None:
        return [0] * B
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != B:
        raise ValueError(f"sequence_indices must be {B} integers >= 0, got {str(values)[:200]}")
    if {type(j) for j in values} == {int} and 0 <= min(values) and max(values) < 2**32:
        return list(values)
    return [_integer("sequence_indices entries", j, 0, 2**32 - 1) for j in values]


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class SamplingBatch:
    """Per-row parameters and histories for a ``[B, V]`` batch of logits.

    Args:
        params: one ``SamplingParams`` per row (rows may differ in everything), or a single
            one for every row. No rows is a batch too: the pipeline's calls on ``[0, V]``
            logits return ``[0, V]`` / ``[0]`` results (a step where every sequence is done).
        prompt_token_ids, output_token_ids: per row, lists of token ids (None = empty).
        vocab_size: V.
        device: where the logits live; every tensor of the batch is put there once (None:
            torch's default device, the CPU unless ``torch.set_default_device`` says otherwise).
        eos_token_ids: the model's end-of-sequence id(s), banned while a row is below
            ``min_tokens`` (together with its ``stop_token_ids``).
        sequence_indices: per row, which of the request's ``n`` sequences it is (seeded
            rows draw from a stream keyed by (seed, sequence index)); default 0.
        history: an existing ``TokenHistory`` of these rows (instead of the token id lists),
            whose derived state is kept; see ``select``.
    """

    def __init__(
        self,
        params: Union[SamplingParams, Sequence[SamplingParams]],
        prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
        output_token_ids: Optional[Sequence[Sequence[int]]] = None,
        *,
        vocab_size: int,
        device: Union[torch.device, str, None] = None,
        eos_token_ids: Union[int, Sequence[int], None] = None,
        sequence_indices: Optional[Sequence[int]] = None,
        history: Optional[TokenHistory] = None,
    ) -> None:
        rows = None
        for ids in (prompt_token_ids, output_token_ids):
            if ids is not None:
                rows = len(ids)
        if isinstance(params, SamplingParams):
            params = [params] * (rows if rows is not None else 1)
        params = tuple(params)
        if not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError("params must be a list of SamplingParams (one per row)")
        B = len(params)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if history is not None and (prompt_token_ids is not None or output_token_ids is not None):
            raise ValueError("pass either history or prompt_token_ids/output_token_ids, not both")
        for name, ids in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids)):
            if ids is not None:
                _check_id_rows(name, ids)
                if len(ids) != B:
                    raise ValueError(f"{name} has {len(ids)} rows but params has {B}")
        prompt_token_ids = [[] for _ in range(B)] if prompt_token_ids is None else prompt_token_ids
        output_token_ids = [[] for _ in range(B)] if output_token_ids is None else output_token_ids
        sequence_indices = _sequence_indices(sequence_indices, B)
        eos: tuple[int, ...]
        if eos_token_ids is None:
            eos = ()
        elif isinstance(eos_token_ids, (int, np.integer)) and not isinstance(eos_token_ids, bool):
            eos = (_token_id("eos_token_ids", int(eos_token_ids)),)
        else:
            eos = _token_ids("eos_token_ids", eos_token_ids)

        #: None in a batch made by ``gather`` (whose rows' parameters stay on the host)
        self.params: Optional[tuple[SamplingParams, ...]] = params
        self.batch_size = B
        self.vocab_size = vocab_size
        self.device = normalise_device(device)
        self.eos_token_ids = eos
        if history is None:
            try:
                history = TokenHistory(prompt_token_ids, output_token_ids, vocab_size, self.device)
            except OverflowError:  # an id beyond int64 (numpy's conversion)
                raise ValueError(f"prompt_token_ids / output_token_ids contain a token id outside "
                                 f"[0, vocab_size={vocab_size})") from None
        elif history.batch_size != B:
            raise ValueError(f"history has {history.batch_size} rows but params has {B}")
        self.history = history

        floats_host, ints_host, flags, records = _row_records(params)
        self.orders = [r.order for r in records]
        # One host -> device copy per kind (the columns are rows of the transposed arrays).
        floats = torch.from_numpy(np.ascontiguousarray(floats_host.T)).to(self.device)
        ints = torch.from_numpy(np.ascontiguousarray(ints_host.T)).to(self.device)
        self._tensors: dict[str, torch.Tensor] = {f: floats[i] for i, f in enumerate(FLOAT_FIELDS)}
        self._tensors.update({f: ints[i] for i, f in enumerate(INT_FIELDS)})
        facts = torch.from_numpy(np.ascontiguousarray(flags.T)).to(self.device)
        # (flags is [B, 16]: each fact's column folded, a [16] array)
        any_row, all_rows = cast(np.ndarray, flags.any(axis=0)), cast(np.ndarray, flags.all(axis=0))

        self.greedy = facts[_GREEDY]
        self.all_greedy = bool(all_rows[_GREEDY])
        # The temperature stage: a greedy row is left alone (its draw is an argmax); a
        # dynatemp row takes its temperature from the entropy instead of ``temperature``.
        dyn = facts[_DYNATEMP]
        self._tensors["static_temperature"] = torch.where(dyn | self.greedy, 1.0, self._tensors["temperature"])
        self._tensors["dynatemp_min_active"] = torch.where(dyn, self._tensors["dynatemp_min"], 0.0)
        self._tensors["dynatemp_max_active"] = torch.where(dyn, self._tensors["dynatemp_max"], 0.0)
        self.any_dynatemp = bool(any_row[_DYNATEMP])
        self.any_static_temperature = bool(any_row[_STATIC_TEMPERATURE])

        self.active: frozenset[SamplerID] = frozenset(s for o in self.orders for s in o)
        # ``schedule_rows``: the rows of each masked stage as indices (built from host lists, no
        # device read): the torch backend runs such a stage on those rows alone when they are
        # few (SEMANTICS.md, "Per-row orders").
        self.schedule: list[Stage]
        # ``schedule_rows_host``: the same indices on the host, so that a stage's rows of the
        # history are selected without reading the device indices back.
        self.schedule, self.schedule_rows, self.schedule_rows_host = _schedule_with_rows(self.orders, self.device)
        # Rows the chain leaves alone: ``process`` returns them bit-identical, whatever their values.
        self.all_identity = bool(all_rows[_IDENTITY])
        self.any_identity = bool(any_row[_IDENTITY])
        self.identity_rows = facts[_IDENTITY]
        self._identity_host = flags[:, _IDENTITY].copy()
        self.any_skew = bool(any_row[_SKEW])
        self.any_top_k = bool(any_row[_TOP_K])
        self.any_top_p = bool(any_row[_TOP_P])
        self.any_repetition_penalty = bool(any_row[_REPETITION])
        self.any_count_penalty = bool(any_row[_COUNT])

        self._row_flags = flags
        self._build_token_lists(flags, records)
        # Bans, and a DRY penalty that overflows to inf (a long repeat), are the only steps that
        # may remove every token of a row (typical_p and XTC may remove the top token, but always
        # leave one).
        self.may_remove_every_token = (
            self.min_tokens_coo is not None or SamplerID.NO_REPEAT_NGRAM in self.active
            or SamplerID.DRY in self.active
        )
        keys = torch.from_numpy(np.ascontiguousarray(ints_host[:, [_KEY_LO, _KEY_HI]].T)).to(self.device)
        self.key_lo, self.key_hi = keys[0], keys[1]
        self.seeded = facts[_SEEDED]
        self.all_seeded = bool(all_rows[_SEEDED])
        self._sequence_indices: Optional[list[int]] = sequence_indices  # (None where params is)
        self.sequence_indices = torch.tensor(sequence_indices, dtype=torch.int64, device=self.device)
        self.max_logprobs = int(ints_host[:, _MAX_LOGPROBS].max(initial=0))
        self.wants_logprobs = bool(any_row[_LOGPROBS])
        self.raw_logprobs = facts[_RAW_LOGPROBS]
        self.any_raw_logprobs = bool(any_row[_RAW_LOGPROBS])
        self.top_or_raw_logprobs = facts[_TABLE_LOGPROB]  # (rows that ask for alternatives or raw values)

    # ------------------------------------------------------------------ construction helpers
    def _build_token_lists(self, flags: np.ndarray, records: list[_RowRecord]) -> None:
        """The logit_bias and min_tokens bans as COO lists and DRY's breakers as a table
        (``flags``, ``records``: ``_row_records``'; only the rows that have them are visited)."""
        V = self.vocab_size
        dev = self.device
        self.logit_bias_coo = None
        with_bias = np.flatnonzero(flags[:, _LOGIT_BIAS])
        if with_bias.size:
            ids, which, _ = _ragged([records[b].bias_ids for b in with_bias], np.int64)
            values, _, _ = _ragged([records[b].bias_values for b in with_bias], np.float32)
            rows = with_bias[which]
            outside = np.flatnonzero(ids >= V)
            if outside.size:
                k = outside[0]
                raise ValueError(f"logit_bias: token id {ids[k]} (row {rows[k]}) is outside the vocabulary [0, {V})")
            self.logit_bias_coo = tuple(torch.from_numpy(a).to(dev) for a in (rows, ids, values))
        self.min_tokens_coo = None
        lists = self._min_tokens_lists(flags)
        if lists:
            ids, which, _ = _ragged(list(lists.values()), np.int64)
            rows = np.fromiter(lists.keys(), dtype=np.int64, count=len(lists))[which]
            outside = np.flatnonzero((ids < 0) | (ids >= V))
            if outside.size:
                k = outside[0]
                raise ValueError(f"stop_token_ids/eos id {ids[k]} (row {rows[k]}) is outside the vocabulary [0, {V})")
            self.min_tokens_coo = (torch.from_numpy(rows).to(dev), torch.from_numpy(ids).to(dev))
        with_breakers = np.flatnonzero(flags[:, _BREAKERS])
        breakers = _padded_table([records[b].breakers for b in with_breakers], with_breakers,
                                 self.batch_size, -1, np.int64)
        self.dry_sequence_breaker_ids = torch.from_numpy(breakers).to(dev)

    def _min_tokens_lists(self, flags: np.ndarray) -> dict[int, np.ndarray]:
        """Row -> the ids its ``min_tokens`` bans (the batch's eos ids, then the row's stop
        ids, each once), for the rows with ``min_tokens > 0`` and at least one such id."""
        params = self._own_params("gather")  # (called at construction, or by gather on its source)
        out = {}
        for b in np.flatnonzero(flags[:, _MIN_TOKENS]).tolist():
            ids = list(dict.fromkeys(self.eos_token_ids + tuple(params[b].stop_token_ids)))
            if ids:
                out[b] = np.array(ids, dtype=np.int64)
        return out

    @functools.cached_property
    def _overflow_factors(self) -> tuple[tuple[np.ndarray, ...], tuple[Union[bool, float], ...]]:
        """The parameters' part of ``may_overflow``, computed once per batch (the parameters do
        not change between steps): per row, ``[B]`` arrays of whether it has a logit_bias and
        penalties, the gain of its scaling stages (repetition penalty, 1 / temperature),
        whether it smooths, its |quadratic| and |cubic| smoothing coefficients and whether it
        runs nsigma; and the same folded over the rows (any flag, the largest factors)."""
        P, active = self._own_params("may_overflow"), [frozenset(o) for o in self.orders]

        def temperature_gain(p: SamplingParams) -> float:
            # a dynamic temperature is at least dynatemp_min (and at least 1e-5)
            return max(1.0, 1.0 / max(p.dynatemp_min if p.dynatemp_enabled else p.temperature, GREEDY_TEMPERATURE))

        S = SamplerID
        rows = (
            self._row_flags[:, _LOGIT_BIAS].copy(),
            np.array([S.PENALTIES in a for a in active], dtype=np.bool_),
            np.array([(max(p.repetition_penalty, 1.0 / p.repetition_penalty) if S.PENALTIES in a else 1.0)
                      * (temperature_gain(p) if S.TEMPERATURE in a else 1.0) for p, a in zip(P, active)],
                     dtype=np.float64),
            np.array([S.QUADRATIC in a for a in active], dtype=np.bool_),
            np.array([abs(p.smoothing_factor * (3.0 - p.smoothing_curve) / 2.0) for p in P], dtype=np.float64),
            np.array([abs(p.smoothing_factor * (p.smoothing_curve - 1.0) / 2.0) for p in P], dtype=np.float64),
            np.array([S.TOP_NSIGMA in a for a in active], dtype=np.bool_),
        )
        # (initial: a batch of no rows folds to no flag and factors 0, and may not overflow)
        folded = tuple(bool(r.any()) if r.dtype == np.bool_ else float(r.max(initial=0.0)) for r in rows)
        return rows, folded

    def may_overflow(self, absmax: float) -> bool:
        """Whether a stage's float32 arithmetic could leave the float32 range on logits whose
        finite values satisfy |l| <= ``absmax`` (a host bound from the parameters: logit_bias,
        the penalties' factor, the smallest temperature, the smoothing polynomial, nsigma's sums).
        The pipeline sends such calls to the torch backend, whose stages saturate.

        A row's arithmetic depends on its own parameters only: the call may overflow when one
        row may. The batch's extremes taken together (one test, ~1 us) clear most calls; where
        they do not (the smallest temperature of one row beside the smoothing of another), each
        row's own parameters decide."""
        if not math.isfinite(absmax):
            return True
        rows, folded = self._overflow_factors
        length, V = self.history.max_length, self.vocab_size
        if not _may_leave_float32(absmax, folded, length, V):
            return False
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.any(_may_leave_float32(absmax, rows, length, V)))

    def _own_params(self, caller: str) -> tuple[SamplingParams, ...]:
        """``params``, which a batch made by ``gather`` lacks (ValueError naming ``caller``)."""
        if self.params is None:
            raise ValueError(f"{caller}: this batch was made by gather and has no params: select or "
                             f"gather from the batch it was gathered from")
        return self.params

    # ------------------------------------------------------------------ access
    def param(self, name: str) -> torch.Tensor:
        """The [B] tensor of a per-row parameter (float32 or int64), on the batch's device."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no per-row tensor for parameter {name!r}") from None

    @property
    def output_lengths(self) -> torch.Tensor:
        return self.history.output_lengths

    def enables(self, sampler: SamplerID) -> bool:
        """Whether any row of the batch enables ``sampler``."""
        return sampler in self.active

    def __len__(self) -> int:
        return self.batch_size

    def select(self, rows: Union[Sequence[int], torch.Tensor]) -> "SamplingBatch":
        """A batch of the given rows (in that order; repeats allowed), e.g. without the rows
        whose sequences finished. Histories and their derived state (counts, match lengths)
        are carried over, not rebuilt."""
        params = self._own_params("select")
        sequence_indices = cast("list[int]", self._sequence_indices)  # (None only where params is)
        host = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        if any(not 0 <= r < self.batch_size for r in host):
            raise ValueError(f"select: rows must be in [0, {self.batch_size}), got {host}")
        index = torch.tensor(host, dtype=torch.int64, device=self.device)
        return SamplingBatch(
            [params[r] for r in host], vocab_size=self.vocab_size, device=self.device,
            eos_token_ids=self.eos_token_ids, sequence_indices=[sequence_indices[r] for r in host],
            history=self.history.select(index, host_rows=host),
        )

    def gather(self, index: torch.Tensor, history: TokenHistory,
               rows_taken: Optional[np.ndarray] = None) -> "SamplingBatch":
        """A batch whose row r has the parameters of this batch's row ``index[r]`` and the
        r-th row of ``history``, without a device sync or a loop over rows.

        index: int64 [R] on the batch's device (repeats allowed), e.g. an engine's row -> slot
        map. history: R rows (e.g. ``TokenHistory.from_tensors`` over the engine's buffers).
        Per-row tensors are indexed on the device; the batch-wide facts (which samplers run,
        the schedule, ``any_*``) stay this batch's, a superset for the rows taken, which gives
        the same result since a sampler leaves the rows that do not enable it unchanged.
        ``logit_bias`` / ``min_tokens`` lists are padded per row to the longest (a -0.0 bias,
        a repeated id), so their COO form can be indexed too. The result has no ``params``
        (they stay on the host) and cannot be ``select``-ed or ``gather``-ed again.
        rows_taken: the rows ``index`` takes, on the host (any order or multiplicity: only
        which rows), when the caller knows them (an engine's slot -> row map on the host):
        whether rows of default parameters are among them is then known exactly, so a
        batch with none skips the ``[R, V]`` pass that returns such rows unchanged.
        """
        self._own_params("gather")  # (its host-side row facts would be another batch's rows)
        R = int(index.shape[0])
        if history.batch_size != R:
            raise ValueError(f"gather: history has {history.batch_size} rows but index has {R}")
        if history.vocab_size != self.vocab_size:
            raise ValueError(f"gather: history vocab_size {history.vocab_size} != {self.vocab_size}")
        index = index.to(device=self.device, dtype=torch.int64)
        self._overflow_factors  # from the parameters, a bound for any rows taken: kept by the copy
        new = SamplingBatch.__new__(SamplingBatch)
        new.__dict__.update(self.__dict__)
        new.params = None
        new.batch_size = R
        new.history = history
        new._sequence_indices = None
        new._tensors = {name: t.index_select(0, index) for name, t in self._tensors.items()}
        for name in ("greedy", "key_lo", "key_hi", "seeded", "sequence_indices", "raw_logprobs",
                     "top_or_raw_logprobs", "dry_sequence_breaker_ids"):
            setattr(new, name, getattr(self, name).index_select(0, index))
        new.schedule = [(sid, None if rows is None else rows.index_select(0, index))
                        for sid, rows in self.schedule]
        # masked stages keep their device masks (row indices would need a device sync)
        new.schedule_rows = [None] * len(new.schedule)
        new.schedule_rows_host = [None] * len(new.schedule)
        new.identity_rows = self.identity_rows.index_select(0, index)
        if rows_taken is not None:
            taken = self._identity_host[np.asarray(rows_taken, dtype=np.int64)]
            new.any_identity, new.all_identity = bool(taken.any()), bool(taken.all())
        pad = self._padded_lists()
        rows = torch.arange(R, device=self.device)
        if self.logit_bias_coo is not None:
            ids, bias = pad["logit_bias"]
            k = ids.shape[1]
            new.logit_bias_coo = (rows.repeat_interleave(k), ids.index_select(0, index).reshape(-1),
                                  bias.index_select(0, index).reshape(-1))
        if self.min_tokens_coo is not None:
            ids, min_tokens = pad["min_tokens"]
            k = ids.shape[1]
            new.min_tokens_coo = (rows.repeat_interleave(k), ids.index_select(0, index).reshape(-1))
            new._tensors["min_tokens"] = min_tokens.index_select(0, index)
        return new

    def _padded_lists(self) -> dict:
        """The logit_bias and min_tokens lists as [B, K] tables, for ``gather`` (built once)."""
        cached = self.__dict__.get("_padded")
        if cached is not None:
            return cached
        out: dict = {}
        B = self.batch_size
        if self.logit_bias_coo is not None:
            params = self._own_params("gather")
            with_bias = np.flatnonzero(self._row_flags[:, _LOGIT_BIAS])
            records = [_row_record(params[b]) for b in with_bias]
            ids = _padded_table([r.bias_ids for r in records], with_bias, B, 0, np.int64)
            # (a bias of -0.0 pads: x + -0.0 == x, bitwise)
            bias = _padded_table([r.bias_values for r in records], with_bias, B, -0.0, np.float32)
            out["logit_bias"] = (torch.from_numpy(ids).to(self.device), torch.from_numpy(bias).to(self.device))
        if self.min_tokens_coo is not None:
            lists = self._min_tokens_lists(self._row_flags)
            rows = np.fromiter(lists.keys(), dtype=np.int64, count=len(lists))
            ids = _padded_table(list(lists.values()), rows, B, -1, np.int64)
            # A list's padding repeats its first id (a repeated ban is one ban); a row without
            # any id bans nothing: its padding (id 0) must stay inactive.
            ids = np.where(ids < 0, ids[:, :1], ids)
            ids[ids < 0] = 0
            has_list = np.zeros(B, dtype=np.bool_)
            has_list[rows] = True
            min_tokens = torch.where(torch.from_numpy(has_list).to(self.device), self._tensors["min_tokens"], 0)
            out["min_tokens"] = (torch.from_numpy(ids).to(self.device), min_tokens)
        self._padded = out
        return out

    # ------------------------------------------------------------------ generation steps
    def append(self, token_ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Advance rows by their newly chosen token, in O(B) work.

        token_ids: int64 [B], one id per row. rows: optional bool [B] mask (None = every
        row): only the rows where it is True advance; the others (whose ``token_ids`` entry
        is ignored) keep their history, derived state and ``output_lengths`` (hence their
        ``min_tokens`` state and the step counter of their seeded random stream), e.g. rows
        still prefilling a prompt in chunks. Give the mask on the CPU to avoid a device sync.
        """
        token_ids = torch.as_tensor(token_ids)
        B = self.batch_size
        dt = token_ids.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise ValueError(f"append: token_ids must be an integer tensor, got dtype {dt}")
        if token_ids.shape != (B,):
            raise ValueError(f"append expects token_ids of shape [{B}], got {tuple(token_ids.shape)}")
        if rows is not None:
            rows = torch.as_tensor(rows)
            if rows.dtype != torch.bool:
                raise ValueError(f"append: rows must be a bool mask (one entry per row), got dtype {rows.dtype}")
            if rows.shape != (B,):
                raise ValueError(f"append: rows must have shape [{B}], got {tuple(rows.shape)}")
        token_ids = token_ids.to(device=self.device, dtype=torch.int64)
        self.history.append(token_ids, rows=rows)
