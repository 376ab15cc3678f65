"""Command line: ``python -m samplers demo``.

The demo runs the pipeline on an embedded default: a synthetic next-token distribution
(Zipf-shaped logits over a 32000-token vocabulary, fixed seed) after a history that repeats
itself, and shows what each sampler preset does to it: how many tokens survive, the entropy
of the processed distribution, the most likely tokens, how much DRY / penalties moved the
repeated continuation, and a seeded draw. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .batch import SamplingBatch
from .params import SamplingParams
from .pipeline import SamplerPipeline

VOCAB = 32000

#: The API's own full example request (SEMANTICS.md's source), embedded so the demo needs no files.
FULL_EXAMPLE = {
    "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 1024,
    "n": 1, "min_tokens": 20, "seed": 0, "presence_penalty": 0.6, "frequency_penalty": 0.6,
    "dynatemp_min": 0.5, "dynatemp_max": 1.0, "dynatemp_exponent": 1, "smoothing_factor": 0.0,
    "smoothing_curve": 1.0, "top_a": 0, "min_p": 0, "tfs": 1, "eta_cutoff": 1e-4,
    "epsilon_cutoff": 1e-4, "typical_p": 1, "logprobs": 5, "xtc_threshold": 0.1,
    "xtc_probability": 0, "no_repeat_ngram_size": 2, "nsigma": 1.5, "dry_multiplier": 1.0,
    "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breaker_ids": [], "dry_range": 50,
    "skew": 0.0, "sampler_priority": [],
}

PRESETS: dict[str, dict] = {
    "plain softmax": {"seed": 0},
    "greedy": {"temperature": 0.0},
    "temperature 0.7 + min_p 0.05": {"temperature": 0.7, "min_p": 0.05, "seed": 0},
    "top_k 40 + top_p 0.9": {"top_k": 40, "top_p": 0.9, "seed": 0},
    "top-n-sigma 1.0": {"nsigma": 1.0, "seed": 0},
    "typical_p 0.5": {"typical_p": 0.5, "seed": 0},
    "tfs 0.95": {"tfs": 0.95, "seed": 0},
    "eta_cutoff 3e-4": {"eta_cutoff": 3e-4, "seed": 0},
    "quadratic smoothing 0.3": {"smoothing_factor": 0.3, "seed": 0},
    "dynatemp 0.5..1.5": {"dynatemp_min": 0.5, "dynatemp_max": 1.5, "seed": 0},
    "XTC 0.05 / always": {"xtc_threshold": 0.05, "xtc_probability": 1.0, "seed": 0},
    "DRY 0.8 / 1.75 / 2": {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "seed": 0},
    "no_repeat_ngram 3": {"no_repeat_ngram_size": 3, "seed": 0},
    "skew 1.0": {"skew": 1.0, "seed": 0},
    "API full example": FULL_EXAMPLE,
}


def embedded_inputs(vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """Zipf-shaped logits (token i has weight ~ 1/(rank+1)), a prompt, and an output that has
    just repeated a phrase, so the continuation of the phrase (token 17) is the model's favourite."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab, generator=g)
    logits = -1.1 * torch.log1p(ranks.float()) + 0.3 * torch.randn(vocab, generator=g)
    logits[17] = logits.max() + 1.0
    phrase = [5, 9, 13, 17, 21]
    prompt = [1, 2, 3] + phrase + [30, 31, 32]
    output = [40, 41] + phrase[:3]  # "... 5 9 13" -> the history says 17 comes next
    return logits, prompt, output


def _entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    return float(-(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum())


def run_demo(out=sys.stdout) -> list[dict]:
    logits, prompt, output = embedded_inputs()
    pipe = SamplerPipeline("torch", seed=0)
    rows = []
    names = list(PRESETS)
    params = [SamplingParams.from_dict(PRESETS[n]) for n in names]
    batch = SamplingBatch(params, [prompt] * len(params), [output] * len(params), vocab_size=VOCAB,
                          eos_token_ids=[0])
    stacked = logits.repeat(len(params), 1)
    start = time.perf_counter()
    processed = pipe.process(stacked, batch)
    drawn = pipe.sample(stacked, batch)
    elapsed = time.perf_counter() - start
    print(f"samplers demo: {len(params)} presets in one heterogeneous batch, V={VOCAB}, "
          f"history {len(prompt)}+{len(output)} tokens (the phrase 5 9 13 -> 17 repeats)", file=out)
    print(f"input: entropy {_entropy(logits):.2f} nats, P(17) = {torch.softmax(logits, -1)[17]:.3f}\n", file=out)
    header = f"{'preset':<30} {'kept':>6} {'entropy':>8} {'P(17)':>7}  {'top tokens (prob)':<40} {'drawn':>6}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for b, name in enumerate(names):
        row = processed[b]
        probs = torch.softmax(row.double(), -1)
        kept = int(torch.isfinite(row).sum())
        top = probs.topk(3)
        top_text = ", ".join(f"{int(i)} ({float(v):.2f})" for v, i in zip(top.values, top.indices))
        info = dict(preset=name, kept=kept, entropy=_entropy(row), p_repeat=float(probs[17]),
                    token=int(drawn.token_ids[b]))
        rows.append(info)
        print(f"{name:<30} {kept:>6} {info['entropy']:>8.3f} {info['p_repeat']:>7.3f}  {top_text:<40} "
              f"{info['token']:>6}", file=out)
    print(f"\nprocess + sample for the whole batch: {elapsed * 1e3:.1f} ms on {logits.device}", file=out)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="samplers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show what each sampler does on an embedded default")
    demo.add_argument("--json", type=Path, help="also write the statistics to this file")
    args = parser.parse_args(argv)
    if args.command == "demo":
        rows = run_demo()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
