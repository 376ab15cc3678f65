"""``SamplerPipeline``: runs each row's sampler chain, then draws tokens.

The chain (SEMANTICS.md, "Order"): logit_bias and min_tokens first; then the ordered
samplers of each row's ``sampler_priority``; then skew; then the draw. Each ordered sampler
is one unit: a function ``(logits, batch, randoms) -> logits`` that reads its per-row
parameters from the batch and calls the sampler's pure function in ``samplers.functional``.
A unit runs only when some row of the batch enables it.

The chain has two backends with one interface (``Chain``: logits, batch, randoms, draw,
keep_processed -> ``ChainOutput``): ``torch_chain`` below, the reference, and
``samplers.kernels.chain.process_logits``, the Triton kernels. ``SamplerPipeline._chain``
is the one place that picks between them. On the CPU the torch backend hands truncated rows
from one unit to the next packed (``PackedChain``: the rows' few remaining tokens, not
``[B, V]``), with the same results; rows that truncate nothing run apart from the others
(``_row_groups``), so that their full rows do not keep the others from packing. Two units
that follow each other on every row may run as one (``FUSED_UNITS``: temperature then top_k
divides only the entries top_k can keep), again with the same results.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Callable, Optional, Union, cast

import numpy as np
import torch

from . import functional as F
from . import kernels
from ._allocator import raise_malloc_thresholds
from ._lanes import sharing_lane_packs
from .batch import SamplingBatch, normalise_device
from .functional._stats import (
    PackedChain,
    cast_saturating,
    finite_absmax_bound,
    library_call,
    no_overflow,
    trusted_params,
)
from .params import FLOAT32_MAX, STAGE_OFF
from .priority import SamplerID
from .sampling import (
    PURPOSE_DRAW,
    PURPOSE_XTC,
    ChainOutput,
    SamplerOutput,
    compute_logprobs,
    draw_tokens,
    row_uniforms,
)

BACKENDS = ("auto", "torch", "triton")
#: Logit dtypes the pipeline accepts (the chain computes in float32).
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _RowRandoms:
    """Per-row keys of one call: the seed for seeded rows, a fresh key for the others."""

    def __init__(self, batch: SamplingBatch, generator: torch.Generator) -> None:
        self.batch, self.generator = batch, generator
        self._cache: dict[int, torch.Tensor] = {}

    @functools.cached_property
    def _keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Made on first use: a call that needs no random number (no draw, no XTC) costs
        # nothing here and leaves the generator where it was.
        batch = self.batch
        if batch.all_seeded:
            return batch.key_lo, batch.key_hi
        # One fresh 64-bit draw per call on the host; row b's key is (lo + b, hi), made on the
        # device: distinct keys (independent Philox streams) without a host-to-device copy
        # per step.
        lo, hi = torch.randint(0, 2**32, (2,), generator=self.generator, dtype=torch.int64).tolist()
        rows = torch.arange(batch.batch_size, dtype=torch.int64, device=batch.device)
        return (torch.where(batch.seeded, batch.key_lo, (rows + lo) & 0xFFFFFFFF),
                torch.where(batch.seeded, batch.key_hi, hi))

    @property
    def key_lo(self) -> torch.Tensor:
        return self._keys[0]

    @property
    def key_hi(self) -> torch.Tensor:
        return self._keys[1]

    def uniforms(self, purpose: int) -> torch.Tensor:
        if purpose not in self._cache:
            self._cache[purpose] = row_uniforms(
                self.key_lo, self.key_hi, self.batch.output_lengths, self.batch.sequence_indices, purpose
            )
        return self._cache[purpose]


class _SubsetRandoms:
    """``_RowRandoms`` of some rows (a stage that runs on those rows only)."""

    def __init__(self, randoms: _Randoms, rows: torch.Tensor) -> None:
        self.randoms, self.rows = randoms, rows

    def uniforms(self, purpose: int) -> torch.Tensor:
        return self.randoms.uniforms(purpose).index_select(0, self.rows)


class _RowSubset:
    """What a unit reads of the batch (``param``, ``history``, breaker ids, the ``any_*`` flags),
    restricted to some rows: a stage of a batch whose rows differ in order runs on its rows only.
    The history's derived state is built on the whole batch first (where it is kept up to date
    step after step) and then indexed. ``host_rows``: ``rows`` on the host, when known (the
    batch's ``schedule_rows_host``), so that indexing the history reads nothing back."""

    def __init__(self, batch: SamplingBatch, rows: torch.Tensor, sampler: SamplerID,
                 host_rows: Optional[np.ndarray] = None) -> None:
        self.batch, self.rows, self.sampler, self.host_rows = batch, rows, sampler, host_rows
        self.batch_size = rows.numel()
        self.vocab_size = batch.vocab_size
        self.any_dynatemp, self.any_static_temperature = batch.any_dynatemp, batch.any_static_temperature
        self.any_top_k, self.any_top_p = batch.any_top_k, batch.any_top_p
        self._history = None

    def param(self, name: str) -> torch.Tensor:
        return self.batch.param(name).index_select(0, self.rows)

    @property
    def dry_sequence_breaker_ids(self) -> torch.Tensor:
        return self.batch.dry_sequence_breaker_ids.index_select(0, self.rows)

    @property
    def history(self):
        if self._history is None:
            self._history = _selected_history(self.batch, (self.sampler,), self.rows, self.host_rows)
        return self._history


def _selected_history(batch: SamplingBatch, samplers, rows: torch.Tensor, host_rows: Optional[np.ndarray]):
    """``batch.history.select(rows)`` with the derived state ``samplers`` read built first on
    the whole batch, where ``append`` keeps it up to date step after step (built on the rows
    taken, it would be built again at every step)."""
    h = batch.history
    if SamplerID.PENALTIES in samplers:
        h.seen_mask(), h.output_counts(), h.seen_ids()
    if SamplerID.DRY in samplers or SamplerID.NO_REPEAT_NGRAM in samplers:
        h.match_lengths()
    return h.select(rows, host_rows=host_rows)


class _RowsOff:
    """What a unit reads of the batch in a stage of some rows that runs on every row: the
    stage's sampler is off (``UNITS_OFF``) in the other rows, which the unit then leaves as
    they are. Rows the chain holds packed (``PackedChain``) stay packed through such a
    stage, where ``_RowSubset`` would need them expanded. The batch-wide ``any_*`` flags stay
    the batch's (a superset: the result is the same)."""

    def __init__(self, batch: SamplingBatch, rows: torch.Tensor, sampler: SamplerID) -> None:
        self.batch = batch
        self._params = {name: torch.where(rows, batch.param(name), off) for name, off in UNITS_OFF[sampler].items()}

    def param(self, name: str) -> torch.Tensor:
        own = self._params.get(name)
        return self.batch.param(name) if own is None else own

    def __getattr__(self, name: str):
        return getattr(self.batch, name)


#: What a unit reads the batch from: the batch, or a view of it for a stage of some rows.
_BatchView = Union[SamplingBatch, _RowSubset, _RowsOff]
#: What a unit reads its random numbers from: the call's, or those of some rows.
_Randoms = Union[_RowRandoms, _SubsetRandoms]
Unit = Callable[[torch.Tensor, _BatchView, _Randoms], torch.Tensor]


def _penalty_args(b: _BatchView) -> tuple:
    h = b.history
    return (h.seen_mask(), h.output_counts(), b.param("repetition_penalty"), b.param("frequency_penalty"),
            b.param("presence_penalty"), h.seen_ids())


def _row_temperatures(x: torch.Tensor, b: _BatchView) -> Optional[torch.Tensor]:
    """Each row's temperature (static or dynamic), or None when no row has one."""
    t = b.param("static_temperature")  # 1.0 on dynatemp and greedy rows
    if b.any_dynatemp:
        # one division for both kinds of rows: each row's factor is its own T times 1.0 (exact)
        return t * F.dynamic_temperature_values(x, b.param("dynatemp_min_active"), b.param("dynatemp_max_active"),
                                                b.param("dynatemp_exponent"))
    return t if b.any_static_temperature else None


def _temperature(x: torch.Tensor, b: _BatchView, r: _Randoms) -> torch.Tensor:
    t = _row_temperatures(x, b)
    return x if t is None else F.temperature(x, t)


def _top_p_top_k(x: torch.Tensor, b: _BatchView, r: _Randoms) -> torch.Tensor:
    if b.any_top_k:
        x = F.top_k(x, b.param("top_k"))
    if b.any_top_p:
        x = F.top_p(x, b.param("top_p"))
    return x


def _temperature_top_p_top_k(x: torch.Tensor, b: _BatchView, r: _Randoms) -> torch.Tensor:
    """``_temperature`` then ``_top_p_top_k``: the same values, with top_k's removed entries
    left undivided where ``F.temperature_top_k`` can."""
    t = _row_temperatures(x, b)
    if t is None or not b.any_top_k:
        return _top_p_top_k(x if t is None else F.temperature(x, t), b, r)
    x = F.temperature_top_k(x, t, b.param("top_k"))
    return F.top_p(x, b.param("top_p")) if b.any_top_p else x


def _nsigma_top_p_top_k(x: torch.Tensor, b: _BatchView, r: _Randoms) -> torch.Tensor:
    """nsigma then ``_top_p_top_k``: the same values, without nsigma's result where
    ``F.nsigma_top_k`` can."""
    if not b.any_top_k:
        return _top_p_top_k(F.nsigma(x, b.param("nsigma")), b, r)
    x = F.nsigma_top_k(x, b.param("nsigma"), b.param("top_k"))
    return F.top_p(x, b.param("top_p")) if b.any_top_p else x


def _dry_args(b: _BatchView) -> tuple:
    return (b.history, b.param("dry_multiplier"), b.param("dry_base"), b.param("dry_allowed_length"),
            b.param("dry_range"), b.dry_sequence_breaker_ids)


UNITS: dict[SamplerID, Unit] = {
    SamplerID.PENALTIES: lambda x, b, r: F.penalties(x, *_penalty_args(b)),
    SamplerID.DRY: lambda x, b, r: F.dry(x, *_dry_args(b)),
    SamplerID.NO_REPEAT_NGRAM: lambda x, b, r: F.no_repeat_ngram(x, b.history, b.param("no_repeat_ngram_size")),
    SamplerID.TEMPERATURE: _temperature,
    SamplerID.TOP_NSIGMA: lambda x, b, r: F.nsigma(x, b.param("nsigma")),
    SamplerID.TOP_P_TOP_K: _top_p_top_k,
    SamplerID.TOP_A: lambda x, b, r: F.top_a(x, b.param("top_a")),
    SamplerID.MIN_P: lambda x, b, r: F.min_p(x, b.param("min_p")),
    SamplerID.TFS: lambda x, b, r: F.tfs(x, b.param("tfs")),
    SamplerID.ETA_CUTOFF: lambda x, b, r: F.eta_cutoff(x, b.param("eta_cutoff")),
    SamplerID.EPSILON_CUTOFF: lambda x, b, r: F.epsilon_cutoff(x, b.param("epsilon_cutoff")),
    SamplerID.TYPICAL_P: lambda x, b, r: F.typical_p(x, b.param("typical_p")),
    SamplerID.QUADRATIC: lambda x, b, r: F.quadratic_smoothing(
        x, b.param("smoothing_factor"), b.param("smoothing_curve")),
    SamplerID.XTC: lambda x, b, r: F.xtc(
        x, b.param("xtc_threshold"), b.param("xtc_probability"), r.uniforms(PURPOSE_XTC)),
}


#: Two units that run as one when the second directly follows the first on the same full rows
#: (the same values, less work): first -> (second, the pair's unit). On the chain's packed rows
#: the two run one by one.
FUSED_UNITS: dict[SamplerID, tuple[SamplerID, Unit]] = {
    SamplerID.TEMPERATURE: (SamplerID.TOP_P_TOP_K, _temperature_top_p_top_k),
    SamplerID.TOP_NSIGMA: (SamplerID.TOP_P_TOP_K, _nsigma_top_p_top_k),
}


#: Units that can also write their result into their input: run so on rows the chain owns
#: (a temporary of its own, contiguous float32), which saves them a [B, V] copy.
UNITS_IN_PLACE: dict[SamplerID, Unit] = {
    SamplerID.PENALTIES: lambda x, b, r: F.penalties_(x, *_penalty_args(b)),
    SamplerID.DRY: lambda x, b, r: F.dry_(x, *_dry_args(b)),
    SamplerID.NO_REPEAT_NGRAM: lambda x, b, r: F.no_repeat_ngram_(x, b.history, b.param("no_repeat_ngram_size")),
}

#: The parameter values (as ``SamplingBatch.param`` names them) with which each unit leaves a
#: row as it is, bit for bit: a stage of some rows can run on every row (``_RowsOff``). They are
#: ``STAGE_OFF``'s, but for temperature, which the batch holds as derived tensors.
UNITS_OFF: dict[SamplerID, dict[str, float]] = {
    **STAGE_OFF,
    SamplerID.TEMPERATURE: {"static_temperature": 1.0, "dynatemp_min_active": 0.0, "dynatemp_max_active": 0.0},
}

#: Units that read token ids (histories): they run on the full rows, never on packed ones.
_READS_TOKEN_IDS = frozenset({SamplerID.PENALTIES, SamplerID.DRY, SamplerID.NO_REPEAT_NGRAM})

#: The samplers after which a row is mostly ``-inf`` (the truncations), so that the CPU chain
#: hands it on packed.
_TRUNCATIONS = frozenset({SamplerID.TOP_P_TOP_K, SamplerID.TOP_A, SamplerID.MIN_P, SamplerID.TFS,
                          SamplerID.ETA_CUTOFF, SamplerID.EPSILON_CUTOFF, SamplerID.TYPICAL_P, SamplerID.TOP_NSIGMA})

class _RowGroup:
    """Some rows of a batch as a batch of their own (``part``), built once; ``host`` /
    ``rows``: their indices in the batch (numpy / tensor). Its history follows the batch's
    (``TokenHistory.follow``: the tokens appended since the last call, O(B)), taken afresh
    only when it cannot (the batch's history replaced, or many steps behind)."""

    def __init__(self, batch: SamplingBatch, host: np.ndarray) -> None:
        self.host, self.rows = host, torch.from_numpy(host)
        self.part = batch.select(host.tolist())
        self.source = batch.history

    def refresh(self, batch: SamplingBatch) -> None:
        if batch.history is self.source and self.part.history.follow(self.source, self.host):
            return
        self.source = batch.history
        self.part.history = _selected_history(batch, self.part.active, self.rows, self.host)


_ROW_GROUPS: "weakref.WeakKeyDictionary[SamplingBatch, Optional[list[_RowGroup]]]" = weakref.WeakKeyDictionary()


def _row_groups(batch: SamplingBatch) -> Optional[list[tuple[torch.Tensor, SamplingBatch]]]:
    """A CPU batch whose rows are partly truncated and partly not, as two batches of those
    rows: ``[(rows, batch of those rows), ...]``; else None.

    Rows that enable no truncation (default parameters, temperature alone) keep their full
    width to the end, and the packed chain packs a batch only when most of every row is
    removed: one such row among many truncated ones made every truncated row work on its full
    width (a step of the Arli request at [64, 32000] took 4x as long with one row of default
    parameters). The groups' batches are built once per batch; their histories follow the
    batch's (``_RowGroup``), which ``append`` keeps up to date."""
    if batch.device.type != "cpu" or batch.params is None:
        return None
    if batch not in _ROW_GROUPS:
        full = np.array([not _TRUNCATIONS.intersection(o) for o in batch.orders])
        groups = None
        if full.any() and not full.all():
            groups = [_RowGroup(batch, host) for host in (np.flatnonzero(full), np.flatnonzero(~full))]
        _ROW_GROUPS[batch] = groups
    groups = _ROW_GROUPS[batch]
    if groups is None:
        return None
    for group in groups:
        group.refresh(batch)
    return [(group.rows, group.part) for group in groups]


def torch_chain(logits: torch.Tensor, batch: SamplingBatch, randoms: _Randoms, draw: bool = False,
                keep_processed: bool = True, all_finite: bool = False) -> ChainOutput:
    """The reference backend: logit_bias, min_tokens, the batch's schedule of ``UNITS``, skew,
    then (``draw``) the tokens. Same contract as the kernel backend,
    ``samplers.kernels.chain.process_logits``: [B, V] logits -> ``ChainOutput`` with fp32
    processed logits; the input is not modified. ``all_finite``: the caller has proved every
    logit finite (the input rule's read), which spares the samplers after the ones that read
    token ids a search for removed tokens (``PackedChain.note_all_finite``)."""
    x = logits.float()
    owned = x is not logits
    if batch.logit_bias_coo is not None:
        x, owned, all_finite = F.logit_bias(x, *batch.logit_bias_coo), True, False
    if batch.min_tokens_coo is not None and _under_min_tokens(batch):
        x = F.min_tokens(x, batch.output_lengths, batch.param("min_tokens"), *batch.min_tokens_coo)
        owned, all_finite = True, False
    # Truncated rows stay packed from one unit to the next (PackedChain); x is then the
    # chain's [B, K] packed rows, expanded where a step needs the full rows.
    chain = PackedChain() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if chain is not None and all_finite:
        chain.note_all_finite(x)
    stages = list(zip(batch.schedule, batch.schedule_rows, batch.schedule_rows_host))
    # The stages the chain can run on its packed rows: those that read no token ids. A stage
    # of some rows then runs on every row with its sampler off in the others (``_RowsOff``);
    # on full rows only when it has half the rows or more, or when its rows are known only
    # as a device mask (a gathered batch); else on its rows alone, below.
    chained = [chain is not None and sampler not in _READS_TOKEN_IDS for sampler, _ in batch.schedule]
    fused_done = -1  # (the stage that ran inside the previous one's fused unit)
    for i, ((sampler, rows), index, host_index) in enumerate(stages):
        if i == fused_done or (index is not None and index.numel() == 0):
            continue
        if chain is not None and chained[i] and (index is None or chain.is_packed(x)
                                                 or 2 * index.numel() >= batch.batch_size):
            view = batch if rows is None else _RowsOff(batch, rows, sampler)
            unit, end = UNITS[sampler], i
            # (a fused unit takes full rows: on the chain's packed rows, after a truncation, its
            # stages run one by one, each handing the next its packed result)
            fused = None if chain.is_packed(x) else FUSED_UNITS.get(sampler)
            if (fused is not None and rows is None and i + 1 < len(stages) and chained[i + 1]
                    and stages[i + 1][0][0] == fused[0] and stages[i + 1][0][1] is None):
                unit, end = fused[1], i + 1
                fused_done = end
            # (the last packed step before the full rows are needed expands its result at once)
            last = not chained[end + 1] if end + 1 < len(chained) else not batch.any_skew
            x, owned = chain.run(lambda t: unit(t, view, randoms), x, last), True
            continue
        if chain is not None:
            x = chain.expand(x)
        if rows is None:
            in_place = owned and sampler in UNITS_IN_PLACE and x.is_contiguous()
            unit = (UNITS_IN_PLACE if in_place else UNITS)[sampler]
            x = unit(x, batch, randoms) if chain is None else chain.run_full(lambda t: unit(t, batch, randoms), x)
            owned = True
            continue
        if index is None:
            # the rows are known only as a device mask (a gathered batch): the masked form
            x, owned = torch.where(rows.unsqueeze(-1), UNITS[sampler](x, batch, randoms), x), True
            continue
        # a stage of some rows only (rows differ in order): run it on those rows
        out = UNITS[sampler](x.index_select(0, index), _RowSubset(batch, index, sampler, host_index),
                             _SubsetRandoms(randoms, index))
        if not owned:
            x, owned = x.clone(), True
        x.index_copy_(0, index, out.to(x.dtype))
        if chain is not None:
            chain.forget_removed()
    if batch.any_skew:
        skew = lambda t: F.skew(t, batch.param("skew"))  # noqa: E731
        x = skew(x) if chain is None else chain.run(skew, x, last=True)
    if chain is not None:
        x = chain.expand(x)
    if batch.may_remove_every_token:
        noted = None if chain is None else chain.noted(x)  # (the removed tokens' count per row)
        x = F.rescue_empty_rows(x, logits, None if noted is None else noted[1])
    if not draw:
        return ChainOutput(x)
    if batch.all_greedy:
        uniforms = torch.zeros(batch.batch_size, device=batch.device)
    else:
        uniforms = randoms.uniforms(PURPOSE_DRAW)
    tokens = draw_tokens(x, batch.greedy, uniforms, all_greedy=batch.all_greedy)
    if keep_processed:
        return ChainOutput(x, tokens)
    chosen, _ = compute_logprobs(x, logits, batch.raw_logprobs, tokens, 0, any_raw=False)
    return ChainOutput(None, tokens, chosen)


def _under_min_tokens(batch: SamplingBatch) -> bool:
    """Whether some row's output is still shorter than its ``min_tokens`` (its stop tokens
    are banned at this step). On the CPU, where reading it is no device sync: once every row
    has reached its minimum, a step skips min_tokens' copy of the rows. Elsewhere True."""
    if batch.device.type != "cpu":
        return True
    return bool((batch.output_lengths < batch.param("min_tokens")).any())


Chain = Callable[..., ChainOutput]


def _torch_chain_no_overflow(*args, **kwargs) -> ChainOutput:
    """``torch_chain`` on a call that ``SamplingBatch.may_overflow`` has cleared."""
    with no_overflow():
        return torch_chain(*args, **kwargs)


def _may_overflow(batch: SamplingBatch, logits: torch.Tensor, absmax: float) -> bool:
    """``batch.may_overflow`` for these logits. ``absmax`` may be a loose upper bound (the
    sum-of-squares bound of ``SamplerPipeline._prepare``); when that bound alone cannot rule
    overflow out, the exact largest finite magnitude decides (one more pass, on the CPU
    only: elsewhere ``absmax`` is what the caller knows)."""
    if not batch.may_overflow(absmax):
        return False
    if logits.device.type != "cpu" or logits.numel() == 0:
        return True
    return batch.may_overflow(_finite_absmax(logits))


def _removed_only_absmax(logits: torch.Tensor) -> Optional[float]:
    """The largest finite magnitude among ``logits`` when their only non-finite entries are
    ``-inf`` (removed tokens: a grammar's mask, a banned EOS, an earlier truncation), which the
    input rule leaves as they are, every row keeps a finite logit and the finite ones are
    within float32's range; else None (NaN, ``+inf``, a row without a finite logit, float64
    values beyond float32), and the caller's fix-up path decides.

    Two passes and a copy: each row's max (NaN and ``+inf`` propagate into it), the copy with
    ``-inf`` read as 0 and its min. The fix-up path's ``nan_to_num`` and masked absmax cost
    ~10x that at [64, 32000]."""
    if logits.numel() == 0:
        return None
    lowest_max, hi = torch.stack(torch.aminmax(logits.amax(dim=-1))).tolist()
    if not (-FLOAT32_MAX <= lowest_max and hi <= FLOAT32_MAX):  # (NaN fails both)
        return None
    lo = float(torch.nan_to_num(logits, neginf=0.0).amin())
    if lo < -FLOAT32_MAX:
        return None
    return max(-lo, hi)


def _finite_absmax(x: torch.Tensor) -> float:
    """The largest magnitude among the finite entries of ``x`` (0.0 when there are none)."""
    return float(torch.where(torch.isfinite(x), x.abs(), 0.0).amax())


def triton_available(device: Optional[torch.device] = None) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA with triton importable, or
    any device under ``TRITON_INTERPRET=1``, which is how the tests run them on a CPU)."""
    return kernels.available(device)


class SamplerPipeline:
    """Composes the samplers per row and draws tokens.

    Args:
        backend: "torch" (the reference path, any device), "triton" (the kernels; CUDA, or
            the CPU under ``TRITON_INTERPRET=1``) or "auto" (triton for CUDA logits when the
            kernels are available, torch otherwise; decided per call).
        generator: the ``torch.Generator`` (CPU) that keys unseeded rows; a fresh one
            seeded from ``seed`` (or nondeterministically) when omitted.
        seed: seed for the default generator.
    """

    def __init__(self, backend: str = "auto", generator: Optional[torch.Generator] = None,
                 seed: Optional[int] = None) -> None:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and not triton_available():
            raise ValueError(
                "backend 'triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1); "
                "use 'torch' or 'auto'"
            )
        self.backend = backend
        if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
            raise ValueError(f"generator must be a CPU torch.Generator, got {type(generator).__name__} {generator!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {str(seed)[:60]}")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        self.generator = generator

    def backend_for(self, logits: torch.Tensor) -> str:
        """The backend a call with these logits uses."""
        if self.backend == "auto":
            return "triton" if logits.is_cuda and triton_available(logits.device) else "torch"
        return self.backend

    # ------------------------------------------------------------------ processing
    def _check(self, logits: torch.Tensor, batch: SamplingBatch) -> None:
        if not isinstance(batch, SamplingBatch):
            raise ValueError(f"batch must be a SamplingBatch, got {type(batch).__name__}")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in LOGIT_DTYPES:
            raise ValueError("logits must be a float tensor (float16, bfloat16, float32 or float64) of "
                             "shape [B, V]")
        B, V = logits.shape
        if B != batch.batch_size or V != batch.vocab_size:
            raise ValueError(
                f"logits have shape [{B}, {V}] but the batch has {batch.batch_size} rows and "
                f"vocab_size {batch.vocab_size}"
            )
        if normalise_device(logits.device) != batch.device:
            raise ValueError(f"logits are on {logits.device} but the batch was built for {batch.device}")

    @staticmethod
    def _prepare(logits: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """The logits as the chain reads them, a bound on the largest finite magnitude
        among them (the exact value, or on the CPU a cheaper upper bound, which ``_may_overflow`` refines),
        and whether every one of them was proved finite.

        The input rule (SEMANTICS.md, "Hostile inputs"): NaN is a removed token (-inf); +inf is
        the largest finite value of the logits' dtype (float32's for float64 logits, whose
        finite values beyond float32 saturate too); a row left without a finite logit is a
        ValueError naming it. One host read of a bound on the logits' magnitudes; rows that also
        hold ``-inf`` (removed tokens, left as they are) read their maxima and finite minimum,
        and the fix-up pass runs only for NaN or ``+inf``.

        On an accelerator the logits are not read on the host: a read there is a device sync
        that stalls every step and cannot be captured in a CUDA graph. The rule is then not
        enforced and the magnitude bound is 0 (SEMANTICS.md says what that leaves)."""
        if logits.device.type != "cpu":
            return logits, 0.0, False
        raise_malloc_thresholds()  # (once per process: the step's [B, V] temporaries stay mapped)
        bound = finite_absmax_bound(logits)  # proves every logit finite, 3x faster than aminmax
        if bound is not None:
            return logits, bound, True
        if logits.dtype == torch.float32:
            # (the bound fails on a -inf, a removed token, far more often than on anything else;
            # when the squares may have overflowed float32 instead, one more read tells)
            absmax = _removed_only_absmax(logits)
            if absmax is not None:
                overflowed = absmax * absmax * logits.shape[1] >= FLOAT32_MAX / 4
                return logits, absmax, overflowed and not bool(torch.isneginf(logits).any())
        lo, hi = torch.stack(torch.aminmax(logits)).tolist()  # (NaN propagates into both)
        if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= FLOAT32_MAX:
            return logits, max(-lo, hi), True
        if lo == -math.inf and hi <= FLOAT32_MAX and logits.dtype != torch.float32:
            absmax = _removed_only_absmax(logits)
            if absmax is not None:
                return logits, absmax, False
        top = min(torch.finfo(logits.dtype).max, FLOAT32_MAX)
        x = logits.nan_to_num(nan=-math.inf, posinf=top, neginf=-math.inf)
        if logits.dtype == torch.float64:
            x = torch.where(x == -math.inf, x, x.clamp(-FLOAT32_MAX, FLOAT32_MAX))
        empty = (x.amax(dim=-1) == -math.inf).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"logits row(s) {empty[:10]} have no candidate token: every logit is -inf or NaN")
        return x, _finite_absmax(x), False

    def _chain(self, logits: torch.Tensor, batch: SamplingBatch, absmax: float, all_finite: bool = False) -> Chain:
        """The backend's chain for these logits: the one place where the backend is chosen.
        Calls whose arithmetic could leave the float32 range (``batch.may_overflow``: hostile
        magnitudes or parameters) take the torch backend, whose stages saturate. On the CPU,
        where ``absmax`` is a real bound, the torch backend's other calls skip the stages'
        saturation checks (``no_overflow``). ``all_finite`` (``_prepare``'s proof) goes to the
        torch backend."""
        overflow = _may_overflow(batch, logits, absmax)
        if self.backend_for(logits) == "triton" and not overflow:
            from .kernels.chain import process_logits

            return process_logits
        chain = torch_chain if overflow or logits.device.type != "cpu" else _torch_chain_no_overflow
        return functools.partial(chain, all_finite=True) if all_finite else chain

    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Processed logits [B, V], same dtype as ``logits``; removed tokens are -inf.

        The input is never modified (nor tracked by autograd: the result has no grad). Rows
        whose parameters are all defaults come back bit-identical, whatever their values.
        Other rows are computed in float32 and cast back saturating (a finite result never
        becomes +-inf in float16 / bfloat16). XTC's coin comes from the row's random stream:
        a seeded row's is the one ``sample`` uses at the same step; an unseeded row takes a
        fresh key on every call, so a ``process`` and a ``sample`` call may toss different
        coins for it: ``sample(..., return_processed=True)`` gives the logits its tokens were
        drawn from.
        """
        self._check(logits, batch)
        logits = logits.detach()
        if batch.batch_size == 0:
            return logits.clone()
        x, absmax, finite = self._prepare(logits)
        with trusted_params():  # (checked when the SamplingParams were built)
            randoms = _RowRandoms(batch, self.generator)
            groups = _row_groups(batch) if self.backend_for(logits) == "torch" else None
            if groups is None:
                return self._process_rows(logits, x, batch, randoms, absmax, finite)
            out = torch.empty_like(logits)
            for rows, part in groups:
                out.index_copy_(0, rows, self._process_rows(*_rows_of(logits, x, rows), part,
                                                            _SubsetRandoms(randoms, rows), absmax, finite))
            return out

    def _process_rows(self, logits: torch.Tensor, x: torch.Tensor, batch: SamplingBatch, randoms: _Randoms,
                      absmax: float, finite: bool) -> torch.Tensor:
        """``process`` of these rows (``x``: ``logits`` as ``_prepare`` gave them)."""
        if batch.all_identity:
            return logits.clone()
        processed = self._chain(x, batch, absmax, finite)(x, batch, randoms).processed
        return _as_returned(cast(torch.Tensor, processed), logits, batch)  # (kept: keep_processed's default)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch, return_processed: bool = False) -> SamplerOutput:
        """Process, then draw one token per row (greedy rows: argmax) with log-probabilities;
        with ``return_processed`` also the processed logits the tokens were drawn from (what
        ``process`` would return with the same random keys), at no extra chain run."""
        self._check(logits, batch)
        logits = logits.detach()
        if batch.batch_size == 0:
            return SamplerOutput(token_ids=torch.empty(0, dtype=torch.int64, device=logits.device),
                                 logprobs=torch.empty(0, dtype=torch.float32, device=logits.device),
                                 processed=logits.clone() if return_processed else None)
        x, absmax, finite = self._prepare(logits)
        # the processed logits are needed only for top or raw logprobs; without them the
        # kernel backend draws at the end of its last launch and writes nothing else
        need_processed = batch.max_logprobs > 0 or batch.any_raw_logprobs
        # (the draw and the log-probabilities read the same processed rows: packed once, and
        # found from the chain's layout without a pass, inference tensors too: library_call)
        with trusted_params(), library_call(), sharing_lane_packs():
            randoms = _RowRandoms(batch, self.generator)
            groups = _row_groups(batch) if self.backend_for(logits) == "torch" else None
            if groups is None:
                return self._sample_rows(logits, x, batch, randoms, absmax, finite, need_processed,
                                         batch.max_logprobs, return_processed)
            parts = [self._sample_rows(*_rows_of(logits, x, rows), part,
                                       _SubsetRandoms(randoms, rows), absmax, finite, need_processed,
                                       batch.max_logprobs, return_processed) for rows, part in groups]
        return _merged([rows for rows, _ in groups], parts, batch.batch_size)

    def _sample_rows(self, logits: torch.Tensor, x: torch.Tensor, batch: SamplingBatch, randoms: _Randoms,
                     absmax: float, finite: bool, need_processed: bool, num_top: int,
                     return_processed: bool) -> SamplerOutput:
        """``sample`` of these rows (``x``: ``logits`` as ``_prepare`` gave them), with
        ``num_top`` top log-probabilities per row."""
        out = self._chain(x, batch, absmax, finite)(x, batch, randoms, draw=True,
                                                    keep_processed=need_processed or return_processed)
        tokens = cast(torch.Tensor, out.token_ids)  # (drawn: draw=True)
        processed = _as_returned(cast(torch.Tensor, out.processed), logits, batch) if return_processed else None
        if not need_processed and out.logprobs is not None:  # (the chain's own: no raw rows)
            return SamplerOutput(token_ids=tokens, logprobs=out.logprobs, top_logprobs=None,
                                 processed=processed)
        # (the processed logits: kept when needed, and returned whenever the chain gives no
        # logprobs, ChainOutput's contract)
        chosen, top = compute_logprobs(cast(torch.Tensor, out.processed), x, batch.raw_logprobs, tokens, num_top,
                                       any_raw=batch.any_raw_logprobs)
        if out.logprobs is not None:
            # The kernel backend's draw gave each row's log-probability: a row that asks for no
            # alternatives and no raw values keeps it, as alone or in a batch where none asks
            # (the two computations may differ by an ulp); the others take the table's value,
            # the one their alternatives show.
            chosen = torch.where(batch.top_or_raw_logprobs, chosen, out.logprobs)
        return SamplerOutput(token_ids=tokens, logprobs=chosen, top_logprobs=top, processed=processed)


def _rows_of(logits: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Those rows of the logits and of ``x`` (``_prepare``'s), one copy when ``x`` is the logits
    (no unit writes its input; the chain copies before it writes)."""
    part = logits.index_select(0, rows)
    return part, part if x is logits else x.index_select(0, rows)


def _merged(groups: list[torch.Tensor], parts: list[SamplerOutput], batch_size: int) -> SamplerOutput:
    """The ``SamplerOutput`` of a batch from those of its row groups (``groups[i]``: the
    batch's rows that ``parts[i]`` holds, in its order)."""

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        out = tensors[0].new_empty((batch_size, *tensors[0].shape[1:]))
        for rows, t in zip(groups, tensors):
            out.index_copy_(0, rows, t)
        return out

    # (the parts were computed alike: an optional result is in every part or in none)
    top = None
    if parts[0].top_logprobs is not None:
        tops = [cast("tuple[torch.Tensor, torch.Tensor]", p.top_logprobs) for p in parts]
        top = (merge([t[0] for t in tops]), merge([t[1] for t in tops]))
    processed = None
    if parts[0].processed is not None:
        processed = merge([cast(torch.Tensor, p.processed) for p in parts])
    return SamplerOutput(token_ids=merge([p.token_ids for p in parts]), logprobs=merge([p.logprobs for p in parts]),
                         top_logprobs=top, processed=processed)


def _as_returned(processed: torch.Tensor, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The chain's fp32 ``processed`` as ``process`` returns it: in the logits' dtype (cast
    saturating), default rows exactly as given."""
    out = cast_saturating(processed, logits.dtype)
    if batch.any_identity:
        out = torch.where(batch.identity_rows.unsqueeze(-1), logits, out)
    return out
