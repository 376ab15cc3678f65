"""samplers: batched LLM sampling algorithms with a torch reference path and Triton kernels.

Public API::

    from samplers import SamplingParams, SamplingBatch, SamplerPipeline, SamplerID
"""

from .batch import SamplingBatch
from .params import SamplingParams
from .pipeline import SamplerPipeline
from .priority import DEFAULT_ORDER, SamplerID
from .sampling import SamplerOutput

__version__ = "0.1.0"

__all__ = ["DEFAULT_ORDER", "SamplerID", "SamplerOutput", "SamplerPipeline", "SamplingBatch", "SamplingParams"]
