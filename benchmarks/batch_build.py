"""How long building a ``SamplingBatch`` takes, per batch size: what an engine pays when its
batch's membership changes (the vLLM processors rebuild their parameter table then).

Two cases per size: rows whose ``SamplingParams`` objects were in an earlier batch (an
engine's requests keep theirs: the usual rebuild) and rows of objects never seen before (a
batch of new requests). The rows mix four kinds of request (the common one, DRY with
breakers, seeded XTC, logit_bias with min_tokens and logprobs). Parameters only, no token
lists (the processors' table); median of ``--repeat`` builds, wall clock, 1 torch thread.

    python benchmarks/batch_build.py [--sizes 64 256 1024] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _paths  # noqa: F401  (the repository's package first on the path)
from samplers import SamplingBatch, SamplingParams

KINDS = (
    dict(temperature=0.8, top_p=0.9, min_p=0.05),
    dict(dry_multiplier=0.8, dry_allowed_length=2, dry_sequence_breaker_ids=[13, 29], repetition_penalty=1.1),
    dict(xtc_threshold=0.1, xtc_probability=0.5, temperature=1.1, seed=7),
    dict(logit_bias={5: -2.0, 9: 1.5}, min_tokens=4, stop_token_ids=[2], logprobs=5),
)


def rows(n: int) -> list[SamplingParams]:
    return [SamplingParams(**KINDS[i % len(KINDS)]) for i in range(n)]


def build_ms(params: list[SamplingParams]) -> float:
    start = time.perf_counter()
    SamplingBatch(params, vocab_size=32000, sequence_indices=[0] * len(params))
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| rows | seen objects ms | new objects ms |")
    print("|---:|---:|---:|")
    for n in args.sizes:
        seen = rows(n)
        build_ms(seen)
        warm = statistics.median(build_ms(seen) for _ in range(args.repeat))
        fresh = [rows(n) for _ in range(args.repeat)]  # (made before the clock runs)
        cold = statistics.median(build_ms(p) for p in fresh)
        print(f"| {n} | {warm:.2f} | {cold:.2f} |")


if __name__ == "__main__":
    main()
