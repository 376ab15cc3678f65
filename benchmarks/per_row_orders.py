"""Per-row ``sampler_priority`` cost (issue 14, item 22): random per-row orders vs one order.

B = 256 rows, V = 32000, every ordered sampler on, torch backend, one ``sample`` call per
round (the batch advances one token per row between rounds, untimed). "one order": every row
the default order; "random orders": each row its own random permutation of the 14 samplers, so
the batch's orders cannot be merged and every stage applies to some rows only. The target is a
ratio of at most 2. "temperature_last": a serving batch where one row in four sets
``temperature_last`` (its temperature stage moves to the end): two masked temperature stages,
the others unmasked::

    python benchmarks/per_row_orders.py [--rounds 5] [--batch 256] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _paths  # noqa: F401  (first: puts the checkout on sys.path)
import numpy as np
import torch

from bench_inputs import make_histories, make_logits, split_history  # noqa: E402

from samplers import SamplerID, SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402

EVERY = dict(
    repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1, no_repeat_ngram_size=4,
    dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, temperature=0.9, smoothing_factor=0.2,
    top_k=200, top_p=0.95, top_a=0.05, min_p=0.02, tfs=0.98, eta_cutoff=3e-4, epsilon_cutoff=3e-4,
    typical_p=0.98, nsigma=3.0, xtc_threshold=0.1, xtc_probability=0.5,
)


def _time(batch: SamplingBatch, logits: torch.Tensor, rounds: int) -> list[float]:
    pipe = SamplerPipeline("torch", seed=0)
    g = torch.Generator().manual_seed(7)
    pipe.sample(logits, batch)  # the history's derived state, as a generation's first step builds it
    times = []
    for _ in range(rounds):
        batch.append(torch.randint(0, 5000, (batch.batch_size,), generator=g))
        t = time.perf_counter()
        pipe.sample(logits, batch)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, V = args.batch, args.vocab
    logits = make_logits(B, V, seed=2)
    prompts, outputs = split_history(make_histories(B, args.history, V, seed=2), args.history // 4)
    rng = np.random.default_rng(0)
    one = [SamplingParams(**EVERY, seed=b) for b in range(B)]
    rand = [SamplingParams(**EVERY, seed=b, sampler_priority=[int(s) for s in rng.permutation(len(SamplerID))])
            for b in range(B)]
    last = [SamplingParams(**EVERY, seed=b, temperature_last=b % 4 == 0) for b in range(B)]
    b_one = SamplingBatch(one, prompts, outputs, vocab_size=V)
    b_rand = SamplingBatch(rand, prompts, outputs, vocab_size=V)
    b_last = SamplingBatch(last, prompts, outputs, vocab_size=V)
    t_one = statistics.median(_time(b_one, logits, args.rounds))
    t_rand = statistics.median(_time(b_rand, logits, args.rounds))
    t_last = statistics.median(_time(b_last, logits, args.rounds))
    print(f"B={B} V={V} history={args.history} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"one order:        {t_one:.3f} s / call ({_stages(b_one)})")
    print(f"random orders:    {t_rand:.3f} s / call ({_stages(b_rand)}), ratio {t_rand / t_one:.2f} (target <= 2)")
    print(f"temperature_last: {t_last:.3f} s / call ({_stages(b_last)}), ratio {t_last / t_one:.2f}")


def _stages(batch: SamplingBatch) -> str:
    masked = sum(m is not None for _, m in batch.schedule)
    return f"{len(batch.schedule)} stages, {masked} of some rows"


if __name__ == "__main__":
    main()
