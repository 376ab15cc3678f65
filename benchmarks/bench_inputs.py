"""Deterministic benchmark inputs (imported by the benchmark modules).

Logits are ``3 * N(0, 1)`` float32 (at V = 32000 a few hundred tokens carry most of the
mass, so truncation samplers have real work to do); histories are text-like: Zipf ids with
copied spans, so DRY and no_repeat_ngram see many repeated sequences.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch

#: Logit scale (std of the logits).
LOGIT_SCALE = 3.0


@lru_cache(maxsize=None)
def make_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * LOGIT_SCALE


#: How many distinct logits tensors ``LogitsPool`` rotates through: more than a repetition
#: could find remembered (``sum_scattered`` keeps its last 4 sums, and every call of ours sums).
POOL_SIZE = 8


class LogitsPool:
    """Distinct logits for successive repetitions, as a generation loop sees a new tensor
    every step: the library remembers a few results by content (``sum_scattered``'s memo, for
    the samplers of one step that sum the same terms), which a benchmark feeding one tensor
    over and over would turn into hits no real step gets.

    ``pool()`` is the current tensor; the harness calls ``advance()`` between repetitions.
    ``derived(fn)`` is a pool of ``fn(t)`` for each tensor, which follows this pool's turn."""

    def __init__(self, tensors: list[torch.Tensor], turn: Optional[list[int]] = None) -> None:
        self.tensors = tensors
        self._turn = [0] if turn is None else turn  # (shared with derived pools)

    @classmethod
    def of_logits(cls, batch: int, vocab: int, seed: int = 0, size: int = POOL_SIZE) -> "LogitsPool":
        return cls([make_logits(batch, vocab, seed=seed + 1000 * i) for i in range(size)])

    def __call__(self) -> torch.Tensor:
        return self.tensors[self._turn[0]]

    def advance(self) -> None:
        self._turn[0] = (self._turn[0] + 1) % len(self.tensors)

    def derived(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LogitsPool":
        return LogitsPool([fn(t) for t in self.tensors], self._turn)


@lru_cache(maxsize=None)
def make_histories(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """Text-like token histories: Zipf ids in [0, min(vocab, 5000)) with copied spans
    (about a fifth of each row repeats an earlier span of 4..40 tokens)."""
    rng = np.random.default_rng(seed)
    span_vocab = min(vocab, 5000)
    rows = []
    for _ in range(batch):
        toks: list[int] = []
        while len(toks) < length:
            if len(toks) > 64 and rng.random() < 0.05:
                n = int(rng.integers(4, 41))
                start = int(rng.integers(0, len(toks) - n))
                toks.extend(toks[start:start + n])
            else:
                toks.extend((rng.zipf(1.2, size=8) % span_vocab).tolist())
        rows.append(tuple(toks[:length]))
    return tuple(rows)


def split_history(rows, output_len: int):
    """(prompt, output) lists: the last ``output_len`` tokens of each row are the output."""
    prompts = [list(r[:-output_len]) for r in rows]
    outputs = [list(r[-output_len:]) for r in rows]
    return prompts, outputs
