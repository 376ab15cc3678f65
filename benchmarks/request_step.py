#!/usr/bin/env python
"""One generation step of a realistic request, on the CPU: the Arli example request.

The request (tests/data/arli_full_request.json: penalties, DRY, no_repeat_ngram, dynatemp,
nsigma, top_k, top_p, eta, epsilon, 5 top log-probabilities) is applied to every row of a
batch with text-like histories (512 prompt + 256 output tokens), and ``SamplerPipeline.sample``
is timed step after step as a generation loop runs it (``append`` between steps, untimed).
The appended tokens continue the text-like histories rather than the drawn tokens (the logits
are random, their draws are not text): each step then sees the n-gram bans, DRY matches and
repeated tokens of running text.
``--parts`` also times each stage of the step (the schedule's units, the draw, the
log-probabilities) and counts the page faults of each: fresh ``[B, V]`` temporaries cost
more in faults than in arithmetic when glibc returns freed memory to the system (README,
"Speed on the CPU").

    python benchmarks/request_step.py                   # the three shapes, 1 torch thread
    python benchmarks/request_step.py --parts --shapes 64x32000
    python benchmarks/request_step.py --default-rows 1 --shapes 64x32000   # a serving batch's mix
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from typing import Callable

from _paths import ROOT as _ROOT  # (first: puts the checkout on sys.path)

import torch  # noqa: E402

import samplers.pipeline as pipeline  # noqa: E402
from bench_inputs import LogitsPool, make_histories  # noqa: E402
from samplers import SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402

REQUEST = os.path.join(_ROOT, "tests", "data", "arli_full_request.json")
SHAPES = ((64, 32000), (8, 128256), (1, 128256))


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Parts:
    """Wall time and page faults of each stage, added up per step."""

    def __init__(self) -> None:
        self.step: dict[str, list[float]] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            f0, t0 = _faults(), time.perf_counter()
            out = fn(*args, **kwargs)
            spent = self.step.setdefault(name, [0.0, 0.0])
            spent[0] += time.perf_counter() - t0
            spent[1] += _faults() - f0
            return out
        return timed

    def install(self) -> None:
        for units in (pipeline.UNITS, pipeline.UNITS_IN_PLACE):
            for sampler, unit in list(units.items()):
                units[sampler] = self.wrap(sampler.name.lower(), unit)
        pipeline.draw_tokens = self.wrap("draw", pipeline.draw_tokens)
        pipeline.compute_logprobs = self.wrap("logprobs", pipeline.compute_logprobs)


def run(shape: tuple[int, int], steps: int, parts: _Parts | None, default_rows: int = 0) -> str:
    batch, vocab = shape
    with open(REQUEST) as f:
        params = SamplingParams.from_dict(json.load(f))
    rows = [params] * batch
    for r in range(min(default_rows, batch)):  # (spread over the batch, as requests arrive)
        rows[r * batch // min(default_rows, batch)] = SamplingParams()
    # (the rows go on as text-like histories do: each step appends their next token, so the
    # n-gram bans, DRY's matches and the penalties' seen tokens are those of running text)
    histories = torch.tensor(make_histories(batch, 768 + steps + 5, vocab))
    b = SamplingBatch(rows, histories[:, :512].tolist(), histories[:, 512:768].tolist(),
                      vocab_size=vocab)
    logits = LogitsPool.of_logits(batch, vocab, seed=1)  # (other logits every step, as the model gives)
    pipe = SamplerPipeline("torch", seed=0)
    times, faults, per_part = [], [], {}
    for i in range(steps + 5):  # (5 warm-up steps)
        if parts is not None:
            parts.step = {}
        f0, t0 = _faults(), time.perf_counter()
        pipe.sample(logits(), b)
        elapsed, faulted = time.perf_counter() - t0, _faults() - f0
        b.append(histories[:, 768 + i])
        logits.advance()
        if i < 5:
            continue
        times.append(elapsed)
        faults.append(faulted)
        for name, (t, f) in (parts.step.items() if parts is not None else ()):
            per_part.setdefault(name, []).append((t, f))
    line = f"[{batch}, {vocab}]: step {statistics.median(times) * 1e3:.2f} ms, {statistics.median(faults):.0f} page faults"
    if per_part:
        line += "\n  " + ", ".join(
            f"{name} {statistics.median(t for t, _ in v) * 1e3:.2f} ms / {statistics.median(f for _, f in v):.0f} f"
            for name, v in per_part.items())
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=None, help="BxV, e.g. 64x32000 (default: the three RESULTS shapes)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per shape (after 5 warm-up steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--parts", action="store_true", help="also time each stage of the step")
    p.add_argument("--default-rows", type=int, default=0,
                   help="this many rows (spread over the batch) of default parameters among the request's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes]
    parts = _Parts() if args.parts else None
    if parts is not None:
        parts.install()
    print(f"Arli example request, one sample step; torch {torch.__version__}, {args.threads} thread(s); medians of "
          f"{args.steps} steps" + (f"; {args.default_rows} row(s) of default parameters" if args.default_rows else ""))
    for shape in shapes:
        print(run(shape, args.steps, parts, args.default_rows))


if __name__ == "__main__":
    main()
