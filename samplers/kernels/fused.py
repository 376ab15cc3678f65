"""The fused chain kernel: one program per row reads the row once (any float dtype, upcast
to fp32 right after the load), applies up to ``NSLOTS`` stages in order with the row held in
registers, and writes the fp32 result once.

Row statistics (max, softmax, entropy, std, threshold searches) are computed inside the
program from the row in registers, so a chain of any length costs one read and one write of
[B, V] (plus the [B, V] side inputs a stage reads: penalties' seen/counts, no_repeat_ngram's
ban mask). Stage codes are compile-time constants: a chain compiles once per distinct tuple
of codes and dispatches with no branching over disabled samplers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import _common, blocked as KB
from ._common import FP_FUSION, block_for, device_guard, philox_uniform, pick_layout, saturate, warps_for
from .codes import (MAX_VOCAB, NONE, NSLOTS, TOP_P, TYPICAL, XTC_PHILOX, blocked_scratch_stride, compact_size,
                    param_table, row_masks)
from .draw import _TILES_PER_STEP, draw_row, sample_tokens
from .stage import stage


@triton.jit
def _chain_kernel(x_ptr, out_ptr, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr_ptr,
                  greedy_ptr, tok_ptr, lp_ptr, B, V, stride_x, stride_o, stride_s, stride_c, stride_b,
                  S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                  S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
                  S8: tl.constexpr, S9: tl.constexpr, S10: tl.constexpr, S11: tl.constexpr,
                  S12: tl.constexpr, S13: tl.constexpr, S14: tl.constexpr, S15: tl.constexpr,
                  BLOCK: tl.constexpr, KMAX: tl.constexpr, DRAW: tl.constexpr, STORE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < V
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=float("-inf")).to(tl.float32)
    scr_row = scr_ptr + row * (2 * KMAX)
    x = stage(S0, 0, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S1, 1, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S2, 2, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S3, 3, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S4, 4, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S5, 5, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S6, 6, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S7, 7, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S8, 8, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S9, 9, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S10, 10, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S11, 11, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S12, 12, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S13, 13, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S14, 14, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = stage(S15, 15, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    if STORE:  # (False: only the draw is wanted)
        tl.store(out_ptr + row * stride_o + offs, x, mask=valid)
    if DRAW:  # the token draw on the row still in registers (uniform: Philox purpose 0)
        greedy = tl.load(greedy_ptr + row) != 0
        tok, lp = draw_row(x, offs, valid, V, greedy, philox_uniform(key_ptr, row, B, 0))
        tl.store(tok_ptr + row, tok)
        tl.store(lp_ptr + row, lp)


def run_chain(
    x: torch.Tensor,
    codes: Sequence[int],
    masks: Sequence[Optional[torch.Tensor]],
    table: torch.Tensor,
    seen: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    banned: Optional[torch.Tensor] = None,
    keys: Optional[torch.Tensor] = None,
    rmask: Optional[torch.Tensor] = None,
    draw_greedy: Optional[torch.Tensor] = None,
    store: bool = True,
):
    """Apply the stages ``codes`` (each with its row mask, None = all rows) to ``x`` [B, V]
    (fp32/fp16/bf16) in one launch; returns a new fp32 [B, V] tensor.

    ``table``: float32 [NPARAMS, B] (``param_table``); ``seen``/``counts``: the history's
    [B, V] state for PENALTIES; ``banned``: bool [B, V] for NGRAM; ``keys``: int32 [4, B]
    (``key_words``) for XTC_PHILOX; ``rmask``: a prebuilt ``row_masks(masks)``.

    ``draw_greedy`` ([B] bool; needs ``keys``): also draw each row's token in the same launch
    (``samplers.kernels.draw.sample_tokens``' result) and return (out, token ids, logprobs).
    ``store=False`` (with ``draw_greedy``): the caller will not read ``out``; the whole-row
    chain then does not write it, the column-blocked one not for rows that end with at most
    KMAX survivors."""
    if len(codes) > NSLOTS:
        raise ValueError(f"at most {NSLOTS} fused stages per launch, got {len(codes)}")
    draw_args: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (greedy, keys) when drawing
    if draw_greedy is not None:
        if keys is None:
            raise ValueError("the draw needs the rows' key words")
        draw_args = (draw_greedy, keys)
    drawing = draw_args is not None
    B, V = x.shape
    if V > MAX_VOCAB:
        raise ValueError(f"vocab_size {V} exceeds the kernels' limit {MAX_VOCAB} (token ids are kept as fp32)")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((B, V), dtype=torch.float32, device=x.device)
    if B == 0 or V == 0 or not codes:
        out.copy_(x)
        if draw_args is not None:
            return (out, *sample_tokens(out, *draw_args))
        return out
    if rmask is None:
        rmask = row_masks(masks, B, x.device)
    if XTC_PHILOX in codes and keys is None:
        raise ValueError("XTC_PHILOX needs the rows' key words")
    slots = list(codes) + [NONE] * (NSLOTS - len(codes))

    def side(t, dtype):
        if t is None:
            return x, 0
        t = t.view(dtype) if t.dtype == torch.bool else t
        if t.stride(1) != 1:
            t = t.contiguous()
        return t, t.stride(0)

    seen_t, ss = side(seen, torch.int8)
    cnt_t, sc = side(counts, torch.int32)
    ban_t, sb = side(banned, torch.int8)
    kwargs = {f"S{i}": c for i, c in enumerate(slots)}
    keys_t = keys if keys is not None else rmask
    table = table.contiguous()
    if draw_args is not None:
        tokens = torch.empty(B, dtype=torch.int64, device=x.device)
        logprobs = torch.empty(B, dtype=torch.float32, device=x.device)
        greedy_t = draw_args[0].to(torch.int8).contiguous()
    else:
        tokens = logprobs = greedy_t = rmask  # unused pointers

    def blocked(draw: bool) -> None:
        # column-blocked variant (kernels.blocked): loops over tiles of _common.TILE lanes
        tile = _common.TILE
        kmax = compact_size(tile)
        nt = triton.cdiv(V, tile)
        scratch = torch.empty((B, blocked_scratch_stride(kmax, nt)), dtype=torch.float32, device=x.device)
        KB._blocked_chain_kernel[(B,)](x, out, table, rmask, seen_t, cnt_t, ban_t, keys_t, scratch,
                                       greedy_t, tokens, logprobs, B, V, nt, x.stride(0), out.stride(0), ss, sc, sb,
                                       scratch.stride(0), **kwargs, TILE=tile, KMAX=kmax, DRAW=draw,
                                       NTB=_TILES_PER_STEP, STORE=store or not draw,
                                       num_warps=_common.TILE_WARPS, enable_fp_fusion=FP_FUSION)

    def whole_row() -> None:
        block = block_for(V)
        kmax = compact_size(block)
        needs_scratch = TOP_P in codes or TYPICAL in codes
        scratch = torch.empty((B, 2 * kmax) if needs_scratch else (1,), dtype=torch.float32, device=x.device)
        _chain_kernel[(B,)](x, out, table, rmask, seen_t, cnt_t, ban_t, keys_t, scratch, greedy_t, tokens, logprobs,
                            B, V, x.stride(0), out.stride(0), ss, sc, sb, **kwargs, BLOCK=block, KMAX=kmax,
                            DRAW=drawing, STORE=store or not drawing, num_warps=warps_for(block),
                            enable_fp_fusion=FP_FUSION)

    key = (x.device, tuple(codes), x.dtype, drawing, store)
    with device_guard(x):
        layout = pick_layout(x)
        if layout == "whole" and key not in _OUT_OF_RESOURCES:
            try:
                whole_row()
                return (out, tokens, logprobs) if drawing else out
            except OutOfResources:
                # raised when the compiled kernel is loaded, before it runs (nothing written):
                # a property of the compiled kernel and the device, so remembered
                _OUT_OF_RESOURCES.add(key)
        if layout == "blocked":
            blocked(drawing)
        else:
            # The whole-row chain does not load on this device: the blocked one processes the
            # rows, and the draw keeps the layout's rule (``sample_tokens`` follows
            # ``pick_layout``), so that a row is drawn alike whichever kernel draws it.
            blocked(False)
            if draw_args is not None:
                tokens, logprobs = sample_tokens(out, *draw_args)
    return (out, tokens, logprobs) if drawing else out


# (device, codes, dtype, draw, store) whose whole-row chain the device could not load
_OUT_OF_RESOURCES: set = set()


def run_single(logits: torch.Tensor, code: int, seen=None, counts=None, banned=None,
               **params: torch.Tensor) -> torch.Tensor:
    """One stage on all rows, returned in the input's dtype (saturating cast, as the reference)."""
    table = param_table(logits.shape[0], logits.device, params)
    out = run_chain(logits, [code], [None], table, seen=seen, counts=counts, banned=banned)
    return saturate(out, logits.dtype)
