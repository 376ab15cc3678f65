"""numpy's sort and the samplers that sort full rows, under numpy's current SIMD targets.

numpy chooses its sort kernels once, at import, from the CPU features it finds (minus those
named in ``NPY_DISABLE_CPU_FEATURES``). On AMD Zen 4 its AVX-512 sort is several times slower
than its AVX2 sort (README, "Speed on the CPU"), so compare two processes::

    python benchmarks/full_row_sorts.py
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" python benchmarks/full_row_sorts.py

Times: median of ``--repeat`` calls after one untimed call, wall clock, 1 torch thread, rows of
``3 * randn`` logits (seeded): ``np.sort`` of their softmax (float32 values, and the int64 keys
``bits << 32 | column`` that ``_stats.sort_nonneg`` sorts), the functional skew, typical_p
and tfs on the full rows, and torch's softmax + cumsum (skew's yardstick in compare.py; not
numpy's, so it should not move). One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np
import torch

import _paths  # noqa: F401  (the repository's package first on the path)
import samplers.functional as F
from _machine import numpy_simd_found


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def shape_times(batch: int, vocab: int, repeat: int, seed: int) -> dict[str, float]:
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    p = torch.softmax(logits, dim=-1).numpy()
    keys = (p.view(np.int32).astype(np.int64) << 32) | np.arange(vocab)
    cases = {
        "np.sort float32": lambda: np.sort(p, axis=-1),
        "np.sort int64 keys": lambda: np.sort(keys, axis=-1),
        "skew": lambda: F.skew(logits, 0.2),
        "typical_p": lambda: F.typical_p(logits, 0.98),
        "tfs": lambda: F.tfs(logits, 0.98),
        "softmax + cumsum": lambda: torch.softmax(logits, dim=-1).cumsum(dim=-1),
    }
    return {name: round(median_ms(fn, repeat), 3) for name, fn in cases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["64x32000", "8x128256"], help="BxV")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"numpy": np.__version__, "simd_found": numpy_simd_found(), "ms": {}}
    for shape in args.shapes:
        batch, vocab = (int(n) for n in shape.split("x"))
        out["ms"][f"[{batch}, {vocab}]"] = shape_times(batch, vocab, args.repeat, args.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
