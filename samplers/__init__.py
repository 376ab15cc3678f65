"""samplers: batched LLM sampling algorithms with a torch reference path and Triton kernels.

Public API::

    from samplers import SamplingParams, SamplingBatch, SamplerPipeline, SamplerID
"""

from typing import TYPE_CHECKING

from .batch import SamplingBatch
from .params import SamplingParams
from .pipeline import SamplerPipeline
from .priority import DEFAULT_ORDER, SamplerID
from .sampling import SamplerOutput

if TYPE_CHECKING:  # (type checkers see generate's signature; at run time it is imported on first use)
    from .generation import generate as generate  # (the "as": an explicit re-export, PEP 484)

__version__ = "0.1.0"

__all__ = ["DEFAULT_ORDER", "SamplerID", "SamplerOutput", "SamplerPipeline", "SamplingBatch", "SamplingParams"]


def __getattr__(name: str):
    # ``samplers.generate`` (a Hugging Face generation loop) is imported on first use, so
    # ``import samplers`` does not import transformers (and it stays out of ``__all__``, so
    # ``from samplers import *`` does not either).
    if name == "generate":
        from .generation import generate

        return generate
    raise AttributeError(f"module 'samplers' has no attribute {name!r}")
