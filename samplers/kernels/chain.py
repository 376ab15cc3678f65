"""``process_logits``: the pipeline's whole chain on the kernel path.

Same result as ``SamplerPipeline._process``'s torch path (logit_bias, min_tokens, the
batch's schedule of stages in order, then skew), returned as fp32 processed logits.

Consecutive stages that have an in-kernel form are fused into one launch of the chain
kernel (``samplers.kernels.fused``): one read of the logits and one write of the fp32 result per
launch. Stages without one (DRY, tfs; skew at the end) run the torch reference on the fp32
working tensor between launches; DRY runs in place on it (``samplers.functional.dry.dry_``:
a scatter over the history positions, no [B, V] temporary, no device sync on CUDA; one fp32
copy first only when the working tensor is still the caller's logits). The no_repeat_ngram
ban mask is kept across steps (``penalties.NgramBanMask``). Rows of more than
``_common.BLOCKED_ABOVE`` lanes (large vocabularies) run the column-blocked chain
(``samplers.kernels.blocked``, chosen in ``fused.run_chain``): same stages and launches, the row
processed in tiles. See kernels/README.md for the pass counts.
"""

from __future__ import annotations

from typing import Literal, Optional, Union, cast

import weakref

import torch

import samplers.functional as F
from samplers.functional.dry import dry_
from samplers.priority import SamplerID
from samplers.sampling import ChainOutput

from . import codes as C
from .draw import sample_tokens
from .fused import run_chain
from .penalties import NgramBanMask, apply_sparse_

S = SamplerID

#: Stages computed by the torch reference on the working tensor (no exact kernel form).
TORCH_STAGES = frozenset({S.DRY, S.TFS})


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: A fused launch's stages: (code, row mask; None = every row).
_Stages = list[tuple[int, Optional[torch.Tensor]]]
#: A launch of ``process_logits``: ("fused", its stages) or ("torch", (sid, row mask)).
_Step = Union[tuple[Literal["fused"], _Stages], tuple[Literal["torch"], tuple[SamplerID, Optional[torch.Tensor]]]]


def _table(batch) -> torch.Tensor:
    """The per-row parameter table of the fused kernel, from the batch's device tensors
    (built once per batch: the parameters do not change between steps)."""
    p = batch.param
    values = {
        "repetition_penalty": p("repetition_penalty"), "frequency_penalty": p("frequency_penalty"),
        "presence_penalty": p("presence_penalty"), "temperature": p("static_temperature"),
        "dynatemp_min": p("dynatemp_min_active"), "dynatemp_max": p("dynatemp_max_active"),
        "dynatemp_exponent": p("dynatemp_exponent"), "smoothing_factor": p("smoothing_factor"),
        "smoothing_curve": p("smoothing_curve"), "nsigma": p("nsigma"), "top_k": p("top_k"),
        "top_p": p("top_p"), "top_a": p("top_a"), "min_p": p("min_p"), "eta_cutoff": p("eta_cutoff"),
        "epsilon_cutoff": p("epsilon_cutoff"), "typical_p": p("typical_p"),
        "xtc_threshold": p("xtc_threshold"), "xtc_probability": p("xtc_probability"),
    }
    return C.param_table(batch.batch_size, batch.device, values)


def _codes(sid: SamplerID, batch) -> list[int]:
    if sid == S.PENALTIES:
        return [C.PENALTIES]
    if sid == S.NO_REPEAT_NGRAM:
        return [C.NGRAM]
    if sid == S.TEMPERATURE:
        return [C.DYNATEMP] if batch.any_dynatemp else [C.TEMPERATURE]
    if sid == S.TOP_P_TOP_K:
        return ([C.TOP_K] if batch.any_top_k else []) + ([C.TOP_P] if batch.any_top_p else [])
    return [{S.TOP_NSIGMA: C.NSIGMA, S.TOP_A: C.TOP_A, S.MIN_P: C.MIN_P, S.ETA_CUTOFF: C.ETA,
             S.EPSILON_CUTOFF: C.EPSILON, S.TYPICAL_P: C.TYPICAL, S.QUADRATIC: C.QUADRATIC,
             S.XTC: C.XTC_PHILOX}[sid]]


def _dry_multiplier(batch, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows' dry_multiplier, 0 (DRY disabled) outside the stage's row mask."""
    mult = batch.param("dry_multiplier").to(torch.float32)
    return mult if rows is None else torch.where(rows, mult, 0.0)


def _torch_stage(sid: SamplerID, x: torch.Tensor, batch) -> torch.Tensor:
    if sid == S.TFS:
        return F.tfs(x, batch.param("tfs"))
    raise AssertionError(sid)


def plan(batch) -> list[_Step]:
    """The launches of ``process_logits`` for this batch: ("fused", [(code, mask), ...]) or
    ("torch", (sid, mask)); skew is not listed (always last)."""
    steps: list[_Step] = []
    pending: _Stages = []
    for sid, rows in batch.schedule:
        if sid in TORCH_STAGES:
            if pending:
                steps.append(("fused", pending))
                pending = []
            steps.append(("torch", (sid, rows)))
            continue
        for code in _codes(sid, batch):
            if len(pending) == C.NSLOTS:
                steps.append(("fused", pending))
                pending = []
            pending.append((code, rows))
    if pending:
        steps.append(("fused", pending))
    return steps


def process_logits(logits: torch.Tensor, batch, randoms, draw: bool = False,
                   keep_processed: bool = True) -> ChainOutput:
    """The kernel backend of ``SamplerPipeline`` (the torch backend's twin is
    ``samplers.pipeline.torch_chain``, same contract): [B, V] logits (fp32/fp16/bf16) ->
    ``ChainOutput(processed, token_ids, logprobs)``, processed fp32 [B, V]; the input is not
    modified.

    ``draw``: also draw the rows' tokens (``samplers.kernels.draw.sample_tokens``: uniforms from
    the rows' Philox stream, the chosen tokens' logprobs). When the chain ends with a kernel
    launch (no skew, no row-emptying bans after it) the draw runs at the end of that launch,
    on the row it has just written; then, with ``keep_processed=False``, the processed logits
    are not returned (None) and rows that end with few survivors are not even written."""
    x = logits
    owned = False  # x is an fp32 contiguous tensor of ours (never the caller's logits)
    if batch.logit_bias_coo is not None or batch.min_tokens_coo is not None:
        x = apply_sparse_(logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True), batch)
        owned = True
    cached = _CACHE.get(batch)
    if cached is None:
        steps = plan(batch)
        codes_all = [c for step in steps if step[0] == "fused" for c, _ in step[1]]
        table = _table(batch) if codes_all else None
        rmasks = [C.row_masks([m for _, m in step[1]], batch.batch_size, batch.device) if step[0] == "fused"
                  else _dry_multiplier(batch, step[1][1]) if step[1][0] == S.DRY else None
                  for step in steps]
        bans = NgramBanMask(batch.batch_size, batch.vocab_size, batch.device) if C.NGRAM in codes_all else None
        cached = (steps, codes_all, table, rmasks, bans)
        _CACHE[batch] = cached
    steps, codes_all, table, rmasks, bans = cached
    keys = seen = counts = banned = None
    if C.XTC_PHILOX in codes_all or draw:
        # the XTC coin and the draw's uniform are computed in the kernels from the rows' Philox words
        keys = C.key_words(randoms.key_lo, randoms.key_hi, batch.output_lengths, batch.sequence_indices)
    may_empty = getattr(batch, "may_remove_every_token", False)
    fused_draw = draw and bool(steps) and steps[-1][0] == "fused" and not batch.any_skew and not may_empty
    tokens = logprobs = None
    if C.PENALTIES in codes_all:
        seen, counts = batch.history.seen_mask(), batch.history.output_counts()
    if bans is not None:
        # kept across steps: O(B * len) scatters, no [B, V] mask written per step
        banned = bans.update(batch.history, batch.param("no_repeat_ngram_size"))
    for i, ((kind, st), rmask) in enumerate(zip(steps, rmasks)):
        if kind == "fused":
            last = fused_draw and i == len(steps) - 1
            # (the table is built whenever a launch is fused)
            x = run_chain(x, [c for c, _ in st], [m for _, m in st], cast(torch.Tensor, table), seen=seen,
                            counts=counts, banned=banned, keys=keys, rmask=rmask,
                            draw_greedy=batch.greedy if last else None, store=keep_processed)
            if last:
                x, tokens, logprobs = x
                if not keep_processed:
                    return ChainOutput(None, tokens, logprobs)
        elif st[0] == S.DRY:
            # in place on our fp32 working tensor (one copy if it is still the caller's);
            # rmask: the multipliers, 0 outside the stage's rows (those rows are untouched)
            if not (owned and x.dtype == torch.float32 and x.is_contiguous()):
                x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            dry_(x, batch.history, rmask, batch.param("dry_base"), batch.param("dry_allowed_length"),
                 batch.param("dry_range"), batch.dry_sequence_breaker_ids, sync_free=x.is_cuda)
        else:
            sid, rows = st
            x32 = x.float()
            out = _torch_stage(sid, x32, batch)
            x = out if rows is None else torch.where(rows.unsqueeze(-1), out, x32)
        owned = True  # each stage above gives a new tensor (F.tfs too) or x, already ours
    x = x.float()
    if batch.any_skew:
        x = F.skew(x, batch.param("skew"))
    if may_empty:
        # bans (min_tokens, no_repeat_ngram) may empty a row: it keeps its input argmax,
        # exactly as the torch path (a [B]-sized fix-up)
        x = F.rescue_empty_rows(x, logits)
    if not draw:
        return ChainOutput(x, None, None)
    if tokens is None:
        # (keys: made above for the draw)
        tokens, logprobs = sample_tokens(x, batch.greedy, cast(torch.Tensor, keys))
    return ChainOutput(x, tokens, logprobs)
