"""The whole-row stage dispatch: stage ``CODE`` applied to one row held in registers.

Used by the whole-row chain kernel (``fused``) on the full row and by the column-blocked
chain (``blocked``) on a row's compacted survivors. The stage functions live with their
family (``penalties``, ``temperature``, ``truncation``); codes and the parameter table's rows
are those of ``codes``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import philox_uniform
from .penalties import stage_ban, stage_penalties
from .temperature import stage_dynatemp, stage_smoothing, stage_temperature
from .truncation import (stage_epsilon, stage_eta, stage_min_p, stage_nsigma, stage_top_a, stage_top_k,
                         stage_top_p, stage_typical, stage_xtc)


@triton.jit
def prm(prm_ptr, idx: tl.constexpr, row, B):
    return tl.load(prm_ptr + idx * B + row)


@triton.jit
def stage(CODE: tl.constexpr, SLOT: tl.constexpr, x, valid, offs, row, B, V, prm_ptr, rmask_ptr,
           seen_ptr, cnt_ptr, ban_ptr, key_ptr, scr_row, stride_s, stride_c, stride_b, KMAX: tl.constexpr):
    if CODE != 0:
        en = tl.load(rmask_ptr + SLOT * B + row) != 0
        if CODE == 1:  # PENALTIES
            seen = tl.load(seen_ptr + row * stride_s + offs, mask=valid, other=0) != 0
            cnt = tl.load(cnt_ptr + row * stride_c + offs, mask=valid, other=0)
            x = stage_penalties(x, seen, cnt, prm(prm_ptr, 0, row, B), prm(prm_ptr, 1, row, B),
                                prm(prm_ptr, 2, row, B), en)
        elif CODE == 2:  # NGRAM
            banned = tl.load(ban_ptr + row * stride_b + offs, mask=valid, other=0) != 0
            x = stage_ban(x, banned, en)
        elif CODE == 3:  # TEMPERATURE (static)
            x = stage_temperature(x, prm(prm_ptr, 3, row, B), en)
        elif CODE == 4:  # DYNATEMP then static temperature (the pipeline's temperature unit)
            x = stage_dynatemp(x, prm(prm_ptr, 4, row, B), prm(prm_ptr, 5, row, B),
                               prm(prm_ptr, 6, row, B), en)
            x = stage_temperature(x, prm(prm_ptr, 3, row, B), en)
        elif CODE == 5:
            x = stage_nsigma(x, prm(prm_ptr, 9, row, B), en)
        elif CODE == 6:
            x = stage_top_k(x, valid, prm(prm_ptr, 10, row, B), V, en)
        elif CODE == 7:
            x = stage_top_p(x, valid, prm(prm_ptr, 11, row, B), en, scr_row, KMAX)
        elif CODE == 8:
            x = stage_top_a(x, prm(prm_ptr, 12, row, B), en)
        elif CODE == 9:
            x = stage_min_p(x, prm(prm_ptr, 13, row, B), en)
        elif CODE == 10:
            x = stage_eta(x, prm(prm_ptr, 14, row, B), en)
        elif CODE == 11:
            x = stage_epsilon(x, prm(prm_ptr, 15, row, B), en)
        elif CODE == 12:
            x = stage_typical(x, valid, prm(prm_ptr, 16, row, B), en, scr_row, KMAX)
        elif CODE == 13:
            x = stage_smoothing(x, prm(prm_ptr, 7, row, B), prm(prm_ptr, 8, row, B), en)
        elif CODE == 14:
            x = stage_xtc(x, valid, prm(prm_ptr, 17, row, B), prm(prm_ptr, 18, row, B),
                          prm(prm_ptr, 19, row, B), en)
        elif CODE == 15:  # XTC with its coin drawn here from the row's Philox stream
            coin = philox_uniform(key_ptr, row, B, 1)
            x = stage_xtc(x, valid, prm(prm_ptr, 17, row, B), prm(prm_ptr, 18, row, B), coin, en)
    return x
