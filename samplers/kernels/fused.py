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

from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

from samplers.sampling import PURPOSE_XTC

from . import _common
from ._common import block_for, on_gpu, philox_uniform, saturate, warps_for
from .draw import draw_row
from .penalties import stage_ban, stage_penalties
from .temperature import stage_dynatemp, stage_smoothing, stage_temperature
from .truncation import (stage_epsilon, stage_eta, stage_min_p, stage_nsigma, stage_top_a, stage_top_k,
                         stage_top_p, stage_typical, stage_xtc)

# Stage codes.
NONE, PENALTIES, NGRAM, TEMPERATURE, DYNATEMP, NSIGMA, TOP_K, TOP_P, TOP_A, MIN_P, ETA, EPSILON, \
    TYPICAL, QUADRATIC, XTC, XTC_PHILOX = range(16)
# The XTC_PHILOX stage hard-codes the Philox purpose word of the XTC coin (1):
assert PURPOSE_XTC == 1, "update _stage's XTC_PHILOX purpose word"
NSLOTS = 16

# Rows of the per-row parameter table (float32 [NPARAMS, B]).
PARAMS = (
    "repetition_penalty", "frequency_penalty", "presence_penalty", "temperature",
    "dynatemp_min", "dynatemp_max", "dynatemp_exponent", "smoothing_factor", "smoothing_curve",
    "nsigma", "top_k", "top_p", "top_a", "min_p", "eta_cutoff", "epsilon_cutoff", "typical_p",
    "xtc_threshold", "xtc_probability", "coin",
)
# Value a parameter takes when a caller does not give it (the disabled value).
_DISABLED = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "typical_p": 1.0,
             "dynatemp_exponent": 1.0, "smoothing_curve": 1.0}

(P_REP, P_FREQ, P_PRES, P_TEMP, P_DMIN, P_DMAX, P_DEXP, P_SF, P_SC, P_NSIG, P_TOPK, P_TOPP, P_TOPA,
 P_MINP, P_ETA, P_EPS, P_TYP, P_XTHR, P_XPROB, P_COIN) = range(len(PARAMS))


@triton.jit
def _prm(prm_ptr, idx: tl.constexpr, row, B):
    return tl.load(prm_ptr + idx * B + row)


@triton.jit
def _stage(CODE: tl.constexpr, SLOT: tl.constexpr, x, valid, offs, row, B, V, prm_ptr, rmask_ptr,
           seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX: tl.constexpr):
    if CODE != 0:
        en = tl.load(rmask_ptr + SLOT * B + row) != 0
        if CODE == 1:  # PENALTIES
            seen = tl.load(seen_ptr + row * stride_s + offs, mask=valid, other=0) != 0
            cnt = tl.load(cnt_ptr + row * stride_c + offs, mask=valid, other=0)
            x = stage_penalties(x, seen, cnt, _prm(prm_ptr, 0, row, B), _prm(prm_ptr, 1, row, B),
                                _prm(prm_ptr, 2, row, B), en)
        elif CODE == 2:  # NGRAM
            banned = tl.load(ban_ptr + row * stride_b + offs, mask=valid, other=0) != 0
            x = stage_ban(x, banned, en)
        elif CODE == 3:  # TEMPERATURE (static)
            x = stage_temperature(x, _prm(prm_ptr, 3, row, B), en)
        elif CODE == 4:  # DYNATEMP then static temperature (the pipeline's temperature unit)
            x = stage_dynatemp(x, _prm(prm_ptr, 4, row, B), _prm(prm_ptr, 5, row, B),
                               _prm(prm_ptr, 6, row, B), en)
            x = stage_temperature(x, _prm(prm_ptr, 3, row, B), en)
        elif CODE == 5:
            x = stage_nsigma(x, _prm(prm_ptr, 9, row, B), en)
        elif CODE == 6:
            x = stage_top_k(x, valid, _prm(prm_ptr, 10, row, B), V, en)
        elif CODE == 7:
            x = stage_top_p(x, valid, _prm(prm_ptr, 11, row, B), en, scr_row, KMAX)
        elif CODE == 8:
            x = stage_top_a(x, _prm(prm_ptr, 12, row, B), en)
        elif CODE == 9:
            x = stage_min_p(x, _prm(prm_ptr, 13, row, B), en)
        elif CODE == 10:
            x = stage_eta(x, _prm(prm_ptr, 14, row, B), en)
        elif CODE == 11:
            x = stage_epsilon(x, _prm(prm_ptr, 15, row, B), en)
        elif CODE == 12:
            x = stage_typical(x, valid, _prm(prm_ptr, 16, row, B), en, scr_row, KMAX)
        elif CODE == 13:
            x = stage_smoothing(x, _prm(prm_ptr, 7, row, B), _prm(prm_ptr, 8, row, B), en)
        elif CODE == 14:
            x = stage_xtc(x, valid, _prm(prm_ptr, 17, row, B), _prm(prm_ptr, 18, row, B),
                          _prm(prm_ptr, 19, row, B), en)
        elif CODE == 15:  # XTC with its coin drawn here from the row's Philox stream
            coin = philox_uniform(key_ptr, row, B, 1)
            x = stage_xtc(x, valid, _prm(prm_ptr, 17, row, B), _prm(prm_ptr, 18, row, B), coin, en)
    return x


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
    x = _stage(S0, 0, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S1, 1, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S2, 2, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S3, 3, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S4, 4, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S5, 5, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S6, 6, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S7, 7, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S8, 8, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S9, 9, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S10, 10, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S11, 11, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S12, 12, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S13, 13, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S14, 14, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    x = _stage(S15, 15, x, valid, offs, row, B, V, prm_ptr, rmask_ptr, seen_ptr, cnt_ptr, ban_ptr,
               key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX)
    if STORE:  # (False: only the draw is wanted)
        tl.store(out_ptr + row * stride_o + offs, x, mask=valid)
    if DRAW:  # the token draw on the row still in registers (uniform: Philox purpose 0)
        greedy = tl.load(greedy_ptr + row) != 0
        tok, lp = draw_row(x, offs, valid, V, greedy, philox_uniform(key_ptr, row, B, 0))
        tl.store(tok_ptr + row, tok)
        tl.store(lp_ptr + row, lp)


_TUNED: dict[bool, object] = {}


def _tuned_kernel(block: int):
    """The chain kernel autotuned over num_warps, only on a real GPU (autotune and do_bench
    need one). Rows of 32768+ use 32 warps only: compiling one whole-row chain at such
    blocks takes minutes, so each stage tuple compiles a single variant there."""
    large = block >= 32768
    if large not in _TUNED:
        warps = (32,) if large else (4, 8, 16)
        configs = [triton.Config({}, num_warps=w) for w in warps]
        _TUNED[large] = triton.autotune(configs=configs, key=["V", "BLOCK"])(_chain_kernel)
    return _TUNED[large]


def param_table(batch_size: int, device: torch.device, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [NPARAMS, B]: the given per-row parameters; the others at their disabled value."""
    cols = []
    for name in PARAMS:
        v = values.get(name)
        if v is None:
            cols.append(torch.full((batch_size,), _DISABLED.get(name, 0.0), dtype=torch.float32, device=device))
        else:
            cols.append(v.to(device=device, dtype=torch.float32).reshape(batch_size))
    return torch.stack(cols)


def compact_size(block: int) -> int:
    """KMAX of the top_p / typical_p searches: rows with at most this many tokens of p > 0
    search a compacted copy of them (1024, or BLOCK / 4 for small rows so the tests cover it)."""
    return max(16, min(1024, block // 4))


def row_masks(masks: Sequence[Optional[torch.Tensor]], batch_size: int, device: torch.device) -> torch.Tensor:
    """int8 [NSLOTS, B]: slot i applies to row b iff rmask[i, b] (None = every row)."""
    rmask = torch.ones((NSLOTS, batch_size), dtype=torch.int8, device=device)
    for i, m in enumerate(masks):
        if m is not None:
            rmask[i] = m.to(torch.int8)
    return rmask


def key_words(key_lo: torch.Tensor, key_hi: torch.Tensor, step: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """int32 [4, B]: the low 32 bits of the Philox key words and counter words of each row."""
    return (torch.stack([key_lo, key_hi, step, seq]).to(torch.int64) & 0xFFFFFFFF).to(torch.int32)


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
    drawing = draw_greedy is not None
    if drawing and keys is None:
        raise ValueError("the draw needs the rows' key words")
    B, V = x.shape
    if V > MAX_VOCAB:
        raise ValueError(f"vocab_size {V} exceeds the kernels' limit {MAX_VOCAB} (token ids are kept as fp32)")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((B, V), dtype=torch.float32, device=x.device)
    if B == 0 or V == 0 or not codes:
        out.copy_(x)
        if drawing:
            from .draw import sample_tokens

            return (out, *sample_tokens(out, draw_greedy, keys))
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
    if drawing:
        tokens = torch.empty(B, dtype=torch.int64, device=x.device)
        logprobs = torch.empty(B, dtype=torch.float32, device=x.device)
        greedy_t = draw_greedy.to(torch.int8).contiguous()
    else:
        tokens = logprobs = greedy_t = rmask  # unused pointers

    def blocked() -> None:
        # column-blocked variant (kernels.blocked): loops over tiles of _common.TILE lanes
        from . import draw as KD
        from .blocked import _blocked_chain_kernel

        tile = _common.TILE
        kmax = compact_size(tile)
        nt = triton.cdiv(V, tile)
        # per row: [2 * KMAX] compacted searches, [2 * KMAX + 2] sparse survivors, [2, NT] tile statistics
        scratch = torch.empty((B, 4 * kmax + 2 + 2 * nt), dtype=torch.float32, device=x.device)
        _blocked_chain_kernel[(B,)](x, out, table, rmask, seen_t, cnt_t, ban_t, keys_t, scratch,
                                    greedy_t, tokens, logprobs, B, V, nt, x.stride(0), out.stride(0), ss, sc, sb,
                                    scratch.stride(0), **kwargs, TILE=tile, KMAX=kmax, DRAW=drawing,
                                    NTB=KD._TILES_PER_STEP, STORE=store or not drawing,
                                    num_warps=_common.TILE_WARPS)

    def whole_row() -> None:
        block = block_for(V)
        kmax = compact_size(block)
        needs_scratch = TOP_P in codes or TYPICAL in codes
        scratch = torch.empty((B, 2 * kmax) if needs_scratch else (1,), dtype=torch.float32, device=x.device)
        args = (x, out, table, rmask, seen_t, cnt_t, ban_t, keys_t, scratch, greedy_t, tokens, logprobs,
                B, V, x.stride(0), out.stride(0), ss, sc, sb)
        cx = dict(BLOCK=block, KMAX=kmax, DRAW=drawing, STORE=store or not drawing)
        if on_gpu(x):
            _tuned_kernel(block)[(B,)](*args, **kwargs, **cx)
        else:
            _chain_kernel[(B,)](*args, **kwargs, **cx, num_warps=warps_for(block))

    _pick_layout(x, tuple(codes), drawing, whole_row, blocked)()
    return (out, tokens, logprobs) if drawing else out


#: Largest vocabulary: the blocked chain keeps the token ids of a sparse row as fp32 (exact to 2**24).
MAX_VOCAB = 1 << 24

#: The whole-row chain compiles without (or with a few hundred bytes of) spills up to this
#: block for every stage code (``python -m samplers.kernels.aot``); rows up to it always use it.
WHOLE_ROW_ALWAYS = 8192

# (codes, block, dtype, draw, next_pow2(B)) -> "whole" | "blocked", measured once per process
_LAYOUT: dict[tuple, str] = {}


def _tunes_layout(x: torch.Tensor) -> bool:
    return on_gpu(x) and not torch.cuda.is_current_stream_capturing()


def _time_launch(fn: Callable[[], None], reps: int = 5) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _pick_layout(x: torch.Tensor, codes: tuple, drawing: bool, whole_row: Callable[[], None],
                 blocked: Callable[[], None]) -> Callable[[], None]:
    """Whole-row or column-blocked chain for this launch.

    Rows above ``_common.BLOCKED_ABOVE`` lanes are blocked (too large for one program's
    registers), rows up to ``WHOLE_ROW_ALWAYS`` whole-row. In between, the whole-row chain
    of a register-hungry stage tuple spills to local memory (e.g. top_k + top_p at BLOCK
    32768: a 3 KB stack frame per thread) while the blocked one does not but makes more
    passes; which is faster depends on the GPU, so on a GPU both are timed on the first
    launch of each (stage tuple, block, dtype, draw, batch bucket) and the faster is kept.
    Elsewhere (the interpreter) the whole-row chain runs."""
    V = x.shape[1]
    if _common.use_blocked(V):
        return blocked
    block = block_for(V)
    if block <= WHOLE_ROW_ALWAYS or not _tunes_layout(x):
        return whole_row
    key = (codes, block, x.dtype, drawing, triton.next_power_of_2(x.shape[0]))
    if key not in _LAYOUT:
        _LAYOUT[key] = "whole" if _time_launch(whole_row) <= _time_launch(blocked) else "blocked"
    return whole_row if _LAYOUT[key] == "whole" else blocked


def run_single(logits: torch.Tensor, code: int, seen=None, counts=None, banned=None,
               **params: torch.Tensor) -> torch.Tensor:
    """One stage on all rows, returned in the input's dtype (saturating cast, as the reference)."""
    table = param_table(logits.shape[0], logits.device, params)
    out = run_chain(logits, [code], [None], table, seen=seen, counts=counts, banned=banned)
    return saturate(out, logits.dtype)
