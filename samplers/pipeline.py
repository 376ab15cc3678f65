"""``SamplerPipeline``: runs each row's sampler chain, then draws tokens.

The chain (SEMANTICS.md, "Order"): logit_bias and min_tokens first; then the ordered
samplers of each row's ``sampler_priority``; then skew; then the draw. Each ordered sampler
is one unit: a function ``(logits, batch, randoms) -> logits`` that reads its per-row
parameters from the batch and calls the sampler's pure function in ``samplers.functional``.
A unit runs only when some row of the batch enables it.

The chain has two backends with one interface (``Chain``: logits, batch, randoms, draw,
keep_processed -> ``ChainOutput``): ``torch_chain`` below, the reference, and
``samplers.kernels.chain.process_logits``, the Triton kernels. ``SamplerPipeline._chain``
is the one place that picks between them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import functional as F
from . import kernels
from .batch import SamplingBatch
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


class _RowRandoms:
    """Per-row keys of one call: the seed for seeded rows, a fresh key for the others."""

    def __init__(self, batch: SamplingBatch, generator: torch.Generator) -> None:
        self.batch = batch
        if batch.all_seeded:
            self.key_lo, self.key_hi = batch.key_lo, batch.key_hi
        else:
            # One fresh 64-bit draw per call on the host; row b's key is (lo + b, hi), made on
            # the device: distinct keys (independent Philox streams) without a host-to-device
            # copy per step.
            lo, hi = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64).tolist()
            rows = torch.arange(batch.batch_size, dtype=torch.int64, device=batch.device)
            self.key_lo = torch.where(batch.seeded, batch.key_lo, (rows + lo) & 0xFFFFFFFF)
            self.key_hi = torch.where(batch.seeded, batch.key_hi, hi)
        self._cache: dict[int, torch.Tensor] = {}

    def uniforms(self, purpose: int) -> torch.Tensor:
        if purpose not in self._cache:
            self._cache[purpose] = row_uniforms(
                self.key_lo, self.key_hi, self.batch.output_lengths, self.batch.sequence_indices, purpose
            )
        return self._cache[purpose]


Unit = Callable[[torch.Tensor, SamplingBatch, _RowRandoms], torch.Tensor]


def _penalties(x: torch.Tensor, b: SamplingBatch, r: _RowRandoms) -> torch.Tensor:
    h = b.history
    return F.penalties(
        x,
        h.seen_mask(),
        h.output_counts(),
        b.param("repetition_penalty"), b.param("frequency_penalty"), b.param("presence_penalty"),
    )


def _temperature(x: torch.Tensor, b: SamplingBatch, r: _RowRandoms) -> torch.Tensor:
    if b.any_dynatemp:
        x = F.dynamic_temperature(x, b.param("dynatemp_min_active"), b.param("dynatemp_max_active"),
                                  b.param("dynatemp_exponent"))
    if b.any_static_temperature:
        x = F.temperature(x, b.param("static_temperature"))
    return x


def _top_p_top_k(x: torch.Tensor, b: SamplingBatch, r: _RowRandoms) -> torch.Tensor:
    if b.any_top_k:
        x = F.top_k(x, b.param("top_k"))
    if b.any_top_p:
        x = F.top_p(x, b.param("top_p"))
    return x


UNITS: dict[SamplerID, Unit] = {
    SamplerID.PENALTIES: _penalties,
    SamplerID.DRY: lambda x, b, r: F.dry(
        x, b.history, b.param("dry_multiplier"), b.param("dry_base"), b.param("dry_allowed_length"),
        b.param("dry_range"), b.dry_sequence_breaker_ids),
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


def torch_chain(logits: torch.Tensor, batch: SamplingBatch, randoms: _RowRandoms, draw: bool = False,
                keep_processed: bool = True) -> ChainOutput:
    """The reference backend: logit_bias, min_tokens, the batch's schedule of ``UNITS``, skew,
    then (``draw``) the tokens. Same contract as the kernel backend,
    ``samplers.kernels.chain.process_logits``: [B, V] logits -> ``ChainOutput`` with fp32
    processed logits; the input is not modified."""
    x = logits.float()
    if batch.logit_bias_coo is not None:
        x = F.logit_bias(x, *batch.logit_bias_coo)
    if batch.min_tokens_coo is not None:
        x = F.min_tokens(x, batch.output_lengths, batch.param("min_tokens"), *batch.min_tokens_coo)
    for sampler, rows in batch.schedule:
        out = UNITS[sampler](x, batch, randoms)
        x = out if rows is None else torch.where(rows.unsqueeze(-1), out, x)
    if batch.any_skew:
        x = F.skew(x, batch.param("skew"))
    if batch.may_remove_every_token:
        x = F.rescue_empty_rows(x, logits)
    if not draw:
        return ChainOutput(x)
    if batch.all_greedy:
        uniforms = torch.zeros(batch.batch_size, device=batch.device)
    else:
        uniforms = randoms.uniforms(PURPOSE_DRAW)
    tokens = draw_tokens(x, batch.greedy, uniforms)
    if keep_processed:
        return ChainOutput(x, tokens)
    chosen, _ = compute_logprobs(x, logits, batch.raw_logprobs, tokens, 0, any_raw=False)
    return ChainOutput(None, tokens, chosen)


Chain = Callable[..., ChainOutput]


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
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and not triton_available():
            raise ValueError(
                "backend 'triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1); "
                "use 'torch' or 'auto'"
            )
        self.backend = backend
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
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError("logits must be a float tensor of shape [B, V]")
        B, V = logits.shape
        if B != batch.batch_size or V != batch.vocab_size:
            raise ValueError(
                f"logits have shape [{B}, {V}] but the batch has {batch.batch_size} rows and "
                f"vocab_size {batch.vocab_size}"
            )
        if logits.device != batch.device:
            raise ValueError(f"logits are on {logits.device} but the batch was built for {batch.device}")

    def _chain(self, logits: torch.Tensor) -> Chain:
        """The backend's chain for these logits: the one place where the backend is chosen."""
        if self.backend_for(logits) == "triton":
            from .kernels.chain import process_logits

            return process_logits
        return torch_chain

    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Processed logits [B, V], same dtype as ``logits``; removed tokens are -inf.

        The input is never modified. Rows whose parameters are all defaults come back
        bit-identical. XTC's coin comes from the same per-row stream as ``sample``'s draw.
        """
        self._check(logits, batch)
        x = self._chain(logits)(logits, batch, _RowRandoms(batch, self.generator)).processed
        return x if x.dtype == logits.dtype else x.to(logits.dtype)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Process, then draw one token per row (greedy rows: argmax) with log-probabilities."""
        self._check(logits, batch)
        # the processed logits are needed only for top or raw logprobs; without them the
        # kernel backend draws at the end of its last launch and writes nothing else
        need_processed = batch.max_logprobs > 0 or batch.any_raw_logprobs
        out = self._chain(logits)(logits, batch, _RowRandoms(batch, self.generator), draw=True,
                                  keep_processed=need_processed)
        if not need_processed:
            return SamplerOutput(token_ids=out.token_ids, logprobs=out.logprobs, top_logprobs=None)
        chosen, top = compute_logprobs(out.processed, logits, batch.raw_logprobs, out.token_ids,
                                       batch.max_logprobs, any_raw=batch.any_raw_logprobs)
        return SamplerOutput(token_ids=out.token_ids, logprobs=chosen, top_logprobs=top)
