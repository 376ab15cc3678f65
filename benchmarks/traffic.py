#!/usr/bin/env python
"""Memory traffic of one sampling step on the Triton path, measured on a CPU.

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of a kernel goes through the
interpreter's builder; this script wraps those two methods and adds up the bytes of the
lanes whose mask is true (masked-off lanes move no memory on a GPU either). It also counts
kernel launches and the torch operations the step dispatches outside the kernels (each one
is a launch on a GPU; those writing a full ``[B, V]`` tensor are counted apart, as passes).

The result is the number of passes over the logits a configuration costs, measured rather
than counted by hand: ``bytes moved / (B * V * bytes per logit)``. On a GPU the time of a
step is at least that many times the memory floor when the rows do not stay in L2 (large B),
which is what ``benchmarks/gpu_bench.py`` measures; this script needs no GPU.

    TRITON_INTERPRET=1 python benchmarks/traffic.py              # the table (about a minute)
    TRITON_INTERPRET=1 python benchmarks/traffic.py -v 128256 -c a b
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")

import _paths  # noqa: F401  (first: puts the checkout on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from gpu_bench import CONFIGS, DTYPES, make_inputs  # noqa: E402
from samplers import SamplerPipeline  # noqa: E402

# aten ops that move no data (views, metadata) are not launches on a GPU
_FREE_OPS = {"view", "_unsafe_view", "alias", "detach", "expand", "as_strided", "t", "transpose", "permute",
             "unsqueeze", "squeeze", "select", "slice", "reshape", "_reshape_alias", "lift_fresh",
             "unbind", "split", "split_with_sizes", "chunk", "narrow", "_to_copy_view", "sym_size",
             "sym_stride", "sym_numel", "is_same_size", "empty", "empty_strided", "empty_like",
             "set_", "resize_", "_local_scalar_dense", "item", "is_nonzero"}


@dataclass
class Traffic:
    """What one step moved: kernel bytes, kernel launches, torch ops (all / writing [B, V])."""

    read: int = 0
    written: int = 0
    launches: int = 0
    torch_ops: int = 0
    torch_full_ops: int = 0
    full_numel: int = 0

    def passes(self, row_bytes: int) -> float:
        return (self.read + self.written) / row_bytes


class _TorchOpCounter(TorchDispatchMode):
    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func.__name__.split(".")[0]
            if name not in _FREE_OPS:
                self.traffic.torch_ops += 1
                first = out[0] if isinstance(out, (tuple, list)) and out else out
                if isinstance(first, torch.Tensor) and first.numel() >= self.traffic.full_numel > 0:
                    self.traffic.torch_full_ops += 1
        return out


@contextlib.contextmanager
def counting(full_numel: int = 0) -> Iterator[Traffic]:
    """Count the kernels' loaded / stored bytes, launches and torch ops inside the block."""
    from triton.runtime import interpreter as ti

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("counting needs TRITON_INTERPRET=1 set before triton is imported")
    t = Traffic(full_numel=full_numel)
    builder, executor = ti.InterpreterBuilder, ti.GridExecutor
    load, store, call = builder.create_masked_load, builder.create_masked_store, executor.__call__
    mode = _TorchOpCounter(t)

    def counted_load(self, ptrs, mask, other, *a):
        ret = load(self, ptrs, mask, other, *a)
        t.read += int(np.count_nonzero(mask.data)) * ret.data.dtype.itemsize
        return ret

    def counted_store(self, ptrs, value, mask, *a):
        t.written += int(np.count_nonzero(mask.data)) * value.data.dtype.itemsize
        return store(self, ptrs, value, mask, *a)

    def counted_call(self, *a, **kw):
        t.launches += 1
        mode.paused += 1  # the interpreter's own host copies are not the step's work
        try:
            return call(self, *a, **kw)
        finally:
            mode.paused -= 1

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    executor.__call__ = counted_call
    try:
        with mode:
            yield t
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        executor.__call__ = call


def measure(config: str, B: int, V: int, dtype: torch.dtype = torch.float32, history: int = 256,
            logprobs: bool = False) -> tuple[Traffic, int]:
    """Traffic of one ``SamplerPipeline("triton").sample`` step after a warm-up step (the
    batch's cached plan and history state are built by then, as in a generation).
    Returns (traffic, bytes of one read of the logits)."""
    extra = {"logprobs": 5} if logprobs else {}
    logits, batch = make_inputs(config, B, V, dtype, torch.device("cpu"), history, **extra)
    pipe = SamplerPipeline("triton", seed=0)
    pipe.sample(logits, batch)
    with counting(full_numel=B * V) as t:
        pipe.sample(logits, batch)
    return t, B * V * logits.element_size()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-b", "--batch-size", type=int, default=2)
    ap.add_argument("-v", "--vocab-sizes", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("-c", "--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--history", type=int, default=256, help="history length of config c")
    args = ap.parse_args(argv)
    print("| config | B | V | dtype | kernel reads (passes) | kernel writes (passes) | total passes | "
          "kernel launches | torch ops | torch ops writing [B, V] |")
    print("|" + "---|" * 10)
    for config in args.configs:
        for V in args.vocab_sizes:
            t, row_bytes = measure(config, args.batch_size, V, DTYPES[args.dtype], args.history)
            print(f"| {config} ({CONFIGS[config][0]}) | {args.batch_size} | {V} | {args.dtype} | "
                  f"{t.read / row_bytes:.2f} | {t.written / row_bytes:.2f} | {t.passes(row_bytes):.2f} | "
                  f"{t.launches} | {t.torch_ops} | {t.torch_full_ops} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
