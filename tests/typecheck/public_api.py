"""The README's public API as a user's type-checked code calls it: ``mypy`` on this file (with
``samplers/py.typed``, mypy reads our annotations) must find no error (``test_typing.py``).
Each assignment states the type the README promises; the functions also run there."""

from __future__ import annotations

from typing import Optional

import torch

import samplers.functional as F
from samplers import SamplerID, SamplerPipeline, SamplingBatch, SamplingParams, generate
from samplers.history import TokenHistory
from samplers.integrations.hf import SamplersLogitsProcessor, neutral_generate_kwargs
from samplers.models import load_default
from samplers.sampling import SamplerOutput


def quick_start() -> None:
    V = 32000
    params = [
        SamplingParams(temperature=0.7, min_p=0.05, seed=42),
        SamplingParams(dry_multiplier=0.8, dry_allowed_length=2, xtc_threshold=0.1, xtc_probability=0.5,
                       sampler_priority=[SamplerID.MIN_P, "TEMPERATURE", 13]),
        SamplingParams.from_dict({"temperature": 0, "repetition_penalty": 1.1}),
    ]
    batch = SamplingBatch(params, prompt_token_ids=[[1, 2, 3], [1, 5, 9, 5, 9], [7]],
                          output_token_ids=[[], [5], []], vocab_size=V, device="cpu", eos_token_ids=[2])
    pipe = SamplerPipeline(backend="auto")
    logits = torch.randn(3, V)
    processed: torch.Tensor = pipe.process(logits, batch)
    out: SamplerOutput = pipe.sample(logits, batch, return_processed=True)
    token_ids: torch.Tensor = out.token_ids
    logprobs: torch.Tensor = out.logprobs
    drawn_from: Optional[torch.Tensor] = out.processed
    batch.append(token_ids)
    temperature: float = params[0].temperature
    seed: Optional[int] = params[0].seed
    del processed, logprobs, drawn_from, temperature, seed


def functional() -> None:
    """The pure functions (``samplers/functional/``): numbers or ``[B]`` tensors per row."""
    logits = torch.randn(2, 100)
    history = TokenHistory([[1, 2, 3], [4]], [[5], []], vocab_size=100)
    steps: list[torch.Tensor] = [
        F.temperature(logits, 0.7),
        F.min_p(logits, torch.tensor([0.05, 0.1])),
        F.top_k(logits, 5),
        F.top_p(logits, 0.9),
        F.typical_p(logits, 0.95),
        F.xtc(logits, 0.1, 0.5, torch.rand(2)),
        F.skew(logits, 0.5),
        F.dry(logits, history, 0.8, 1.75, 2, 0, torch.tensor([13], dtype=torch.long)),
        F.no_repeat_ngram(logits, history, 3),
    ]
    del steps


def hugging_face() -> None:
    model, tokenizer = load_default()
    outs = generate(model, tokenizer, ["def main(", "import os"],
                    [SamplingParams(temperature=0.8, min_p=0.05, seed=1, max_tokens=40, stop=["\n\n"],
                                    logprobs=2),
                     SamplingParams(temperature=0, n=1, max_tokens=20)])
    text: str = outs[0].outputs[0].text
    finish: Optional[str] = outs[0].outputs[0].finish_reason
    for delta in generate(model, tokenizer, ["class A:"], SamplingParams(seed=3, max_tokens=30), stream=True):
        piece: str = delta.text
        del piece
    proc = SamplersLogitsProcessor(SamplingParams(xtc_threshold=0.1, xtc_probability=0.5, seed=0))
    ids = tokenizer(["def f("], return_tensors="pt")
    model.generate(**ids, logits_processor=[proc], **neutral_generate_kwargs(model, max_new_tokens=20))
    del text, finish
