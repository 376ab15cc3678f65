"""Differential fuzzing of the pipeline: a random batch against each of its rows alone.

A case is drawn from one integer (its seed) and a mode: B rows of random requests (any subset
of the samplers with values across their ranges, per-row ``sampler_priority``,
``temperature_last``, logit_bias, min_tokens, logprobs; every row seeded), histories with
repeats (DRY, n-grams and penalties find matches), and logits in float32 / float16 / bfloat16 /
float64 with hostile entries (``-inf`` runs, NaN, ``+inf``, exact ties, magnitudes near the
dtype's largest). It runs 1-3 steps, appending the drawn tokens (now and then to some rows
only). Each step checks what the pipeline promises (DESIGN.md, SEMANTICS.md):

- a row's processed logits, token, log-probability and top log-probabilities are those of the
  same request alone (bit for bit: seeded rows do not depend on the batch), also after
  ``select`` or ``gather`` of some rows in another order (repeats allowed for gather);
- ``sample(..., return_processed=True)`` returns what ``process`` returns;
- non-contiguous input and ``torch.inference_mode`` change nothing; the input is never written;
- a processed row holds no NaN and keeps a token, unless it is a default row (returned as given);
- nothing warns (numpy's floating-point warnings and torch's are errors here);
- on the triton backend, the kernels agree with the torch backend (the reference): the same
  removed tokens and drawn tokens, values and log-probabilities within the dtype's tolerance,
  but as the kernels' promise allows (``kernel_promise``): a token on a threshold stage's
  threshold may fall the other way (its sums add in another order), the row's kept set then
  lying between the torch backend's with the threshold parameters moved by the tolerance both
  ways; rows with a dynamic temperature (their entropy is summed in another order, so their
  temperature may differ in the last place) may differ in up to ``BOUNDARY_FLIPS_MAX`` removed
  tokens. The values both keep are held to the tolerance; the draw is compared where the
  removed tokens agree.

Modes: ``small`` (1-8 rows, 2-2000 columns), ``wide`` (2-12 rows, 4096-151936 columns: the
packed sums in torch's tree, top_k's candidates, the threaded sorts), ``tall`` (32-72 rows
sharing one of a few requests, as in a serving batch, 2-300 columns: per-row values computed
as ``[B]`` vectors, whose first rows torch's CPU loops take in vector lanes and the others,
or a row alone, in the scalar tail). Backends: ``torch`` (the default) and ``triton`` (the
kernels; on a CPU under ``TRITON_INTERPRET=1``, slow even with ``interpreter_speedup``: use
the small mode), with a kernel layout (``LAYOUTS``): ``whole`` (the interpreter's rule: small
rows whole), ``blocked`` (every row column-blocked, in tiles of 64 lanes) or ``mixed`` (a
GPU's rule scaled down: rows past 256 lanes blocked, in tiles of 64). As a script it runs
cases until a time budget is spent and prints each failure with the command that replays it:

    python tests/fuzz.py --seconds 600 --seed 1 [--mode wide|tall] [--threads 2]
    TRITON_INTERPRET=1 python tests/fuzz.py --seconds 600 --backend triton [--layout blocked]
    python tests/fuzz.py --case 1234 --mode wide        # one case, with its traceback

``tests/test_fuzz.py`` runs a fixed set of cases in the suite. Six bugs of the torch backend
were found this way before the module existed, and three batch dependences of the kernel
backend by its first runs, one of them on the blocked layout (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from logit_helpers import KERNEL_TOLERANCES, bits as _bits  # (tests/ is on sys.path: pytest, or this file run as a script)
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.history import TokenHistory

MODES = {"small": ((1, 8), (2, 2000)), "wide": ((2, 12), (4096, 151936)), "tall": ((32, 72), (2, 300))}
WIDE_VOCABS = (32000, 32768, 50257, 100003, 128256, 151936)
SAMPLER_NAMES = ("top_k", "top_a", "min_p", "tfs", "typical_p", "temperature", "penalties", "dry",
                 "no_repeat_ngram", "nsigma", "eta_cutoff", "epsilon_cutoff", "quadratic", "xtc")


class FuzzFailure(AssertionError):
    """A broken promise, with the case and step it was found at."""


@dataclass
class Case:
    seed: int
    mode: str
    vocab: int
    dtype: torch.dtype
    params: list[SamplingParams]
    prompts: list[list[int]]
    outputs: list[list[int]]
    eos: list[int]
    sequence_indices: list[int]
    steps: int
    rng: np.random.Generator = field(repr=False)

    def describe(self) -> str:
        rows = "\n".join(f"  row {r}: {_set_fields(p)}" for r, p in enumerate(self.params))
        return (f"case {self.seed} ({self.mode}): [{len(self.params)}, {self.vocab}] {self.dtype}, "
                f"{self.steps} step(s), eos {self.eos}\n{rows}")


def _set_fields(p: SamplingParams) -> dict:
    default = SamplingParams()
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if getattr(p, f.name) != getattr(default, f.name)}


def _request(rng: np.random.Generator, vocab: int, eos: list[int]) -> SamplingParams:
    """One random request: a few samplers on, each with a value drawn across its range
    (boundaries and greedy temperatures included)."""
    kw: dict = {"seed": int(rng.integers(0, 2**63))}
    on = rng.choice(len(SAMPLER_NAMES), size=int(rng.integers(0, 7)), replace=False)
    pick = lambda *values: values[int(rng.integers(len(values)))]  # noqa: E731
    for name in (SAMPLER_NAMES[i] for i in on):
        if name == "top_k":
            kw["top_k"] = int(pick(1, 2, rng.integers(1, 60), rng.integers(1, vocab + 3), vocab))
        elif name == "top_a":
            kw["top_a"] = float(pick(0.01, rng.uniform(0, 1), 1.0, 5.0))
        elif name == "min_p":
            kw["min_p"] = float(pick(rng.uniform(0, 0.3), 1.0, 1e-6))
        elif name == "tfs":
            kw["tfs"] = float(pick(rng.uniform(0.05, 1.0), 0.999, 1e-3))
        elif name == "typical_p":
            kw["typical_p"] = float(pick(rng.uniform(0.05, 1.0), 1e-3, 0.999))
        elif name == "temperature":
            kw["temperature"] = float(pick(0.0, 1e-6, rng.uniform(0.1, 3.0), 1e-3, 50.0))
            if rng.random() < 0.3:
                lo = float(rng.uniform(0, 2))
                kw.update(dynatemp_min=lo, dynatemp_max=float(pick(lo, lo + rng.uniform(0, 3))),
                          dynatemp_exponent=float(pick(1.0, rng.uniform(0.1, 4.0))))
        elif name == "penalties":
            kw.update(repetition_penalty=float(pick(1.0, rng.uniform(0.5, 2.5))),
                      frequency_penalty=float(pick(0.0, rng.uniform(-2, 2))),
                      presence_penalty=float(pick(0.0, rng.uniform(-2, 2))))
        elif name == "dry":
            kw.update(dry_multiplier=float(pick(rng.uniform(0.1, 3), 0.8)), dry_base=float(rng.uniform(1.01, 4)),
                      dry_allowed_length=int(rng.integers(1, 5)), dry_range=int(pick(0, rng.integers(1, 64))),
                      dry_sequence_breaker_ids=[int(t) for t in rng.integers(0, min(vocab, 12), rng.integers(0, 4))])
        elif name == "no_repeat_ngram":
            kw["no_repeat_ngram_size"] = int(rng.integers(1, 5))
        elif name == "nsigma":
            kw["nsigma"] = float(pick(rng.uniform(0, 3), 0.0, 1e-3))
        elif name == "eta_cutoff":
            kw["eta_cutoff"] = float(pick(rng.uniform(0, 0.05), 0.5, 1e-4))
        elif name == "epsilon_cutoff":
            kw["epsilon_cutoff"] = float(pick(rng.uniform(0, 0.05), 0.5, 1e-4))
        elif name == "quadratic":
            kw.update(smoothing_factor=float(pick(rng.uniform(0, 2), 10.0)),
                      smoothing_curve=float(pick(1.0, rng.uniform(1, 4))))
        elif name == "xtc":
            kw.update(xtc_threshold=float(pick(rng.uniform(0, 0.5), 0.0, 1.0)),
                      xtc_probability=float(pick(rng.uniform(0, 1), 1.0)))
    if rng.random() < 0.15:
        kw["skew"] = float(pick(rng.uniform(-3, 3), -20.0, 20.0))
    if rng.random() < 0.15:
        ids = rng.integers(0, vocab, rng.integers(1, 5))
        kw["logit_bias"] = {int(t): float(pick(rng.uniform(-100, 100), -100.0, 100.0)) for t in ids}
    if eos and rng.random() < 0.15:
        kw["min_tokens"] = int(rng.integers(1, 4))
    if rng.random() < 0.3:
        kw["logprobs"] = int(rng.integers(0, 6))
    if rng.random() < 0.25:
        order = list(rng.permutation(14)[: int(rng.integers(1, 15))])
        kw["sampler_priority"] = [int(i) for i in order]
    elif rng.random() < 0.15:
        kw["temperature_last"] = True
    return SamplingParams(**kw)


def _history(rng: np.random.Generator, vocab: int, length: int) -> list[int]:
    """Token ids with repeats: from an alphabet of a few ids, or repeated phrases."""
    if length == 0:
        return []
    alphabet = rng.integers(0, vocab, int(rng.integers(1, 20)))
    ids = alphabet[rng.integers(0, len(alphabet), length)]
    if length > 8 and rng.random() < 0.5:
        phrase = ids[: int(rng.integers(2, 8))]
        at = int(rng.integers(0, length - len(phrase)))
        ids[at:at + len(phrase)] = phrase
    return [int(t) for t in ids]


def draw_case(seed: int, mode: str = "small") -> Case:
    rng = np.random.default_rng(seed)
    (b_lo, b_hi), (v_lo, v_hi) = MODES[mode]
    batch_size = int(rng.integers(b_lo, b_hi + 1))
    if mode == "wide" and rng.random() < 0.5:
        vocab = int(rng.choice(WIDE_VOCABS))
    else:
        vocab = int(np.exp(rng.uniform(np.log(v_lo), np.log(v_hi))))
    dtype = [torch.float32, torch.float16, torch.bfloat16, torch.float64][
        int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1]))]
    eos = [int(t) for t in rng.integers(0, vocab, int(rng.integers(0, 3)))]
    if mode == "tall":  # a serving batch: the rows share one of a few requests (each its own seed)
        shared = [_request(rng, vocab, eos) for _ in range(int(rng.integers(1, 4)))]
        params = [dataclasses.replace(shared[int(rng.integers(len(shared)))], seed=int(rng.integers(0, 2**63)))
                  for _ in range(batch_size)]
    else:
        params = [_request(rng, vocab, eos) for _ in range(batch_size)]
    max_prompt = 60 if mode == "small" else 600
    prompts = [_history(rng, vocab, int(rng.integers(0, max_prompt))) for _ in range(batch_size)]
    outputs = [_history(rng, vocab, int(rng.integers(0, 20))) for _ in range(batch_size)]
    indices = [int(rng.integers(0, 3)) for _ in range(batch_size)]
    return Case(seed, mode, vocab, dtype, params, prompts, outputs, eos, indices, int(rng.integers(1, 4)), rng)


def draw_logits(rng: np.random.Generator, batch_size: int, vocab: int, dtype: torch.dtype,
                huge: bool = True) -> torch.Tensor:
    """[B, V] logits of ``dtype``; every row keeps at least one finite entry (a row without
    one is a ValueError, tested elsewhere). ``huge``: also magnitudes near the dtype's largest,
    ``+inf`` and, in float64, values beyond float32's range."""
    scale = float(rng.choice([0.5, 3.0, 3.0, 20.0]))
    x = rng.standard_normal((batch_size, vocab)) * scale
    top = float(torch.finfo(dtype).max if dtype != torch.float64 else torch.finfo(torch.float32).max)
    for b in range(batch_size):
        style = rng.random()
        if style < 0.15:  # exact ties
            x[b] = np.round(x[b])
        elif style < 0.25:  # most of the row removed already (a grammar's mask)
            x[b, rng.random(vocab) < rng.uniform(0.5, 1.0)] = -np.inf
        elif style < 0.32 and huge:  # magnitudes near the dtype's largest
            x[b] *= top / (4 * scale) / max(1.0, float(np.abs(x[b]).max()) / scale)
        if rng.random() < 0.1:
            x[b, rng.integers(0, vocab, rng.integers(1, 4))] = np.nan
        if rng.random() < 0.05 and huge:
            x[b, rng.integers(0, vocab)] = np.inf
        if dtype == torch.float64 and rng.random() < 0.1 and huge:  # beyond float32's range
            x[b, rng.integers(0, vocab, rng.integers(1, 4))] = rng.choice([-1e300, 1e300, 1e39, -1e39])
        if rng.random() < 0.1:
            x[b, rng.integers(0, vocab, rng.integers(1, 2 + vocab // 4))] = -np.inf
        if not np.isfinite(x[b]).any():
            x[b, rng.integers(0, vocab)] = 0.0
    out = torch.from_numpy(x).to(dtype)
    # (a value that became +-inf in a half dtype is kept: it is one more hostile entry)
    finite = torch.isfinite(out).any(dim=-1)
    out[~finite, 0] = 0.0
    return out


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise FuzzFailure(what)


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    _check(a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b)), what)


def _same_output(got, want, row: int, k: Optional[int], what: str) -> None:
    """``SamplerOutput`` of one row (``got``, row 0) against row ``row`` of ``want``."""
    _check(int(got.token_ids[0]) == int(want.token_ids[row]), f"{what}: token")
    _same(got.logprobs[:1], want.logprobs[row:row + 1], f"{what}: logprob")
    _same(got.processed[:1], want.processed[row:row + 1], f"{what}: processed logits")
    if k:
        (got_ids, got_values), (want_ids, want_values) = got.top_logprobs, want.top_logprobs
        _check(torch.equal(got_ids[0, :k], want_ids[row, :k]), f"{what}: top logprob ids")
        _check(torch.equal(_bits(got_values[0, :k]), _bits(want_values[row, :k])),
               f"{what}: top logprob values")


#: How many tokens a row with a dynamic temperature may remove on one backend and keep on the
#: other (``_agrees``): its temperature, from an entropy summed in another order, may differ in
#: the last place, which moves a token lying on a threshold across it (XTC's moves two: the
#: token and the least likely of those above the threshold, which XTC keeps). A wrong
#: temperature moves every value, which the comparison of the values both keep catches.
BOUNDARY_FLIPS_MAX = 3

#: ``bounds()``: the torch backend's processed logits of the call with every threshold
#: parameter moved by the kernels' tolerance towards keeping more, and towards keeping fewer
#: tokens (``kernel_promise.moved_params``); asked for only where a row's removed set differs.
Bounds = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]


def _agrees(got, want, settled: torch.Tensor, what: str, bounds: Bounds) -> None:
    """``SamplerOutput`` of the kernels (``got``) against the torch backend's (``want``): the
    same removed tokens and drawn tokens; the kept values and the drawn tokens' log-probabilities
    within ``KERNEL_TOLERANCES``. A row may remove other tokens than the torch backend only as
    the kernels' promise allows (``kernel_promise``: a threshold stage's sums add in another
    order, so a token on its threshold may fall the other way): its kept set lies between those
    of ``bounds()``; where ``settled`` is False (a dynamic temperature, whose T may differ in the
    last place) up to ``BOUNDARY_FLIPS_MAX`` tokens may differ anyway. The values both backends
    keep are compared, and the draw where no token differs."""
    rtol, atol = KERNEL_TOLERANCES[want.processed.dtype]
    removed, want_removed = torch.isneginf(got.processed), torch.isneginf(want.processed)
    bounding: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    for r in range(removed.shape[0]):
        flips = (removed[r] != want_removed[r]).nonzero().flatten()
        if flips.numel() and settled[r]:
            bounding = bounding or bounds()
            loose, tight = (torch.isneginf(b[r]) for b in bounding)
            outside = (~removed[r] & loose) | (removed[r] & ~tight)
            _check(not outside.any(), f"{what}: row {r}: removed tokens differ at {flips[:8].tolist()} "
                                      f"({flips.numel()} in all), {int(outside.sum())} beyond the promise")
        else:
            _check(flips.numel() <= (0 if settled[r] else BOUNDARY_FLIPS_MAX),
                   f"{what}: row {r}: removed tokens differ at {flips[:8].tolist()} ({flips.numel()} in all)")
        both = ~(removed[r] | want_removed[r])
        kept, want_kept = got.processed[r][both].double(), want.processed[r][both].double()
        _check(torch.allclose(kept, want_kept, rtol=rtol, atol=atol, equal_nan=True),
               f"{what}: row {r}: kept values differ by up to {float((kept - want_kept).abs().max()):.3g}")
        if flips.numel():
            continue  # (a draw over other tokens)
        _check(int(got.token_ids[r]) == int(want.token_ids[r]),
               f"{what}: row {r}: token {int(got.token_ids[r])} against {int(want.token_ids[r])}")
        _check(torch.allclose(got.logprobs[r].double(), want.logprobs[r].double(), rtol=rtol, atol=atol),
               f"{what}: row {r}: log-probability {float(got.logprobs[r])} against {float(want.logprobs[r])}")


def _overflow_route(batch: SamplingBatch, x: torch.Tensor) -> bool:
    """Whether the pipeline sends this call to the torch backend, its arithmetic bounded
    by the parameters and the largest finite magnitude (``SamplingBatch.may_overflow``)."""
    finite = x[torch.isfinite(x)]
    return batch.may_overflow(float(finite.abs().max()) if finite.numel() else 0.0)


def _bounds(case: Case, x: torch.Tensor, history: TokenHistory, state: torch.Tensor) -> Bounds:
    """``_agrees``' bounds of a reference call on ``x`` with these rows' ``history``, made by a
    torch pipeline whose generator starts at ``state`` (the reference's before the call: the
    same keys for unseeded rows)."""
    from kernel_promise import moved_params

    B = len(case.params)

    def processed(direction: int) -> torch.Tensor:  # (on a copy of the history: the reference's own goes on)
        pipe = SamplerPipeline("torch")
        pipe.generator.set_state(state)
        moved = SamplingBatch(moved_params(case.params, direction), history=history.select(list(range(B))),
                              vocab_size=case.vocab, eos_token_ids=case.eos, sequence_indices=case.sequence_indices)
        return pipe.process(x, moved)

    return lambda: (processed(+1), processed(-1))


def run_case(case: Case, backend: str = "torch") -> int:
    """Runs a case's steps and checks on ``SamplerPipeline(backend)``; returns the number of
    row comparisons made. Raises FuzzFailure (or whatever the pipeline raised) naming the step."""
    rng, B, V = case.rng, len(case.params), case.vocab
    # (on the triton backend a call whose arithmetic could overflow runs on the torch backend
    # as a whole, SEMANTICS.md "Hostile inputs": its other rows then get the torch values, so
    # a row is compared with itself alone only where both calls take the same route, and that
    # mode draws ordinary magnitudes, which leave most calls on the kernels)
    huge = backend == "torch"
    pipe = SamplerPipeline(backend, seed=0)

    def whole_batch() -> SamplingBatch:
        return SamplingBatch(case.params, case.prompts, case.outputs, vocab_size=V, eos_token_ids=case.eos,
                             sequence_indices=case.sequence_indices)

    batch = whole_batch()
    # the torch backend beside the kernels, on its own batch (the same histories)
    reference = SamplerPipeline("torch", seed=0) if backend == "triton" else None
    ref_batch = whole_batch() if reference else None
    settled = torch.tensor([not p.dynatemp_enabled for p in case.params])  # (see _agrees)
    alone = [SamplingBatch([p], [case.prompts[r]], [case.outputs[r]], vocab_size=V, eos_token_ids=case.eos,
                           sequence_indices=[case.sequence_indices[r]]) for r, p in enumerate(case.params)]
    outputs = [list(o) for o in case.outputs]  # (each row's output so far, for gather's history)
    compared = 0
    for step in range(case.steps):
        where = f"step {step}"
        x = draw_logits(rng, B, V, case.dtype, huge)
        before = x.clone()
        out = pipe.process(x, batch)
        _same(x, before, f"{where}: process wrote its input")
        for r in range(B):
            row = out[r]
            if not torch.equal(_bits(row), _bits(x[r])):
                _check(not torch.isnan(row).any(), f"{where}: NaN in processed row {r}")
                _check(bool(torch.isfinite(row).any()), f"{where}: processed row {r} keeps no token")
        drawn = pipe.sample(x, batch, return_processed=True)
        _same(drawn.processed, out, f"{where}: sample's processed logits differ from process")
        if reference is not None:
            assert ref_batch is not None
            state = reference.generator.get_state()
            _agrees(drawn, reference.sample(x, ref_batch, return_processed=True), settled,
                    f"{where}: the kernels against the torch backend",
                    _bounds(case, x, ref_batch.history, state))
        k = max((p.logprobs or 0) for p in case.params)
        whole = backend == "triton" and _overflow_route(batch, x)
        for r in range(B):
            one = alone[r]
            if backend == "triton" and _overflow_route(one, x[r:r + 1]) != whole:
                continue  # (one of the two calls runs on the torch backend: other values, by design)
            _same(pipe.process(x[r:r + 1], one), out[r:r + 1], f"{where}: row {r} alone, process")
            _same_output(pipe.sample(x[r:r + 1], one, return_processed=True), drawn, r,
                         min(k, case.params[r].logprobs or 0), f"{where}: row {r} alone, sample")
            compared += 1
        wider = torch.empty(B, V + 3, dtype=x.dtype)[:, :V]
        wider.copy_(x)
        _same(pipe.process(wider, batch), out, f"{where}: non-contiguous input")
        with torch.inference_mode():
            _same(pipe.process(x, batch), out, f"{where}: inference mode")
        picked = [int(r) for r in rng.permutation(B)[: int(rng.integers(1, B + 1))]]
        _same(pipe.process(x[picked], batch.select(picked)), out[picked], f"{where}: select({picked})")
        if rng.random() < 0.5:
            picked = [int(r) for r in rng.integers(0, B, int(rng.integers(1, B + 2)))]
        history = TokenHistory([case.prompts[r] for r in picked], [outputs[r] for r in picked], V)
        taken = sorted(set(picked)) if rng.random() < 0.5 else None
        gathered = batch.gather(torch.tensor(picked), history, rows_taken=taken)
        what = f"{where}: gather({picked}, rows_taken={taken})"
        _same(pipe.process(x[picked], gathered), out[picked], what)
        _check(torch.equal(pipe.sample(x[picked], gathered).token_ids, drawn.token_ids[picked]), f"{what}: tokens")
        tokens = drawn.token_ids
        if rng.random() < 0.25 and B > 1:
            mask = torch.from_numpy(rng.random(B) < 0.5)
            batch.append(tokens, mask)
        else:
            mask = torch.ones(B, dtype=torch.bool)
            batch.append(tokens)
        if ref_batch is not None:
            ref_batch.append(tokens, mask)
        for r in np.flatnonzero(mask.numpy()):
            alone[r].append(tokens[r:r + 1])
            outputs[r].append(int(tokens[r]))
    return compared


#: Kernel layouts of the triton backend: ``samplers.kernels._common`` settings (the layout rule
#: and the blocked kernels' tile are read at call time) that put small rows on either layout.
LAYOUTS = {
    "whole": {},
    "blocked": {"BLOCKED_ABOVE": 8, "TILE": 64},
    "mixed": {"whole_row_limit": lambda device: 256, "TILE": 64},
}


@contextlib.contextmanager
def kernel_layout(name: str):
    """The kernels' layout rule set to ``LAYOUTS[name]`` inside the block, restored after it."""
    from samplers.kernels import _common

    saved = {key: getattr(_common, key) for key in LAYOUTS[name]}
    try:
        for key, value in LAYOUTS[name].items():
            setattr(_common, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(_common, key, value)


def run_checked(case: Case, backend: str = "torch", layout: str = "whole") -> int:
    """``run_case`` with numpy's floating-point warnings and every Python warning as errors,
    but those of Triton's interpreter, which runs the kernels' arithmetic in numpy: a kernel's
    ``log2(0)`` or ``-inf - -inf`` under a mask (a GPU computes them without a word) warns there.
    ``layout``: the kernel layout (``LAYOUTS``) of the triton backend."""
    with warnings.catch_warnings(), np.errstate(over="warn", invalid="warn", divide="warn"), \
            (kernel_layout(layout) if backend == "triton" else contextlib.nullcontext()):
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        # (triton 3.4-3.6's interpreter converts one-entry arrays to Python scalars, which
        # numpy deprecated in 1.25; numpy 2.4 made it an error, which 3.7 avoids)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\.")
        return run_case(case, backend)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    ap.add_argument("--seed", type=int, default=0, help="first case seed; cases are seed, seed+1, ...")
    ap.add_argument("--mode", choices=sorted(MODES), default="small")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--backend", choices=["torch", "triton"], default="torch",
                    help="the pipeline's backend (triton on a CPU: set TRITON_INTERPRET=1)")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="whole",
                    help="the kernels' layout rule (triton backend; default whole)")
    ap.add_argument("--case", type=int, help="run this one case and print its traceback")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        import interpreter_speedup

        interpreter_speedup.install()
    if args.case is not None:
        case = draw_case(args.case, args.mode)
        print(case.describe())
        run_checked(case, args.backend, args.layout)
        print("passed")
        return 0
    start, seed, cases, rows, failures = time.monotonic(), args.seed, 0, 0, 0
    while time.monotonic() - start < args.seconds:
        try:
            case = draw_case(seed, args.mode)
            rows += run_checked(case, args.backend, args.layout)
        except Exception as e:  # noqa: BLE001 (every failure is reported, then the next case)
            failures += 1
            print(f"FAIL case {seed}\n  {type(e).__name__}: {e}\n"
                  f"  replay: python tests/fuzz.py --case {seed} --mode {args.mode} --threads {args.threads} "
                  f"--backend {args.backend} --layout {args.layout}",
                  flush=True)
            traceback.print_exc(limit=-3)
        cases, seed = cases + 1, seed + 1
    print(f"{cases} cases, {rows} row comparisons, {failures} failure(s) in {time.monotonic() - start:.0f} s "
          f"(mode {args.mode}, backend {args.backend}, layout {args.layout}, {args.threads} thread(s), seeds {args.seed}..{seed - 1})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
