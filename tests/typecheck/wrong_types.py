"""Type errors that ``mypy`` must report (``test_typing.py``): proof that it reads our
annotations rather than taking the package as untyped (every name ``Any``), which would let
``public_api.py`` pass whatever it says. Each line marked ``# error`` must be reported."""

from __future__ import annotations

import torch

from samplers import SamplerPipeline, SamplingBatch, SamplingParams, generate


def wrong(batch: SamplingBatch, logits: torch.Tensor) -> None:
    pipe = SamplerPipeline("torch")
    text: str = pipe.process(logits, batch)  # error
    ids: str = pipe.sample(logits, batch).token_ids  # error
    top_k: str = SamplingParams(top_k=5).top_k  # error
    outs: int = generate(None, None, "a")  # error
    del text, ids, top_k, outs
