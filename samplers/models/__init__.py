"""The embedded default model: a tiny causal LM trained by this project, shipped in the package.

``load_default()`` returns ``(model, tokenizer)`` from ``samplers/models/tiny/`` (safetensors
weights, a byte-level BPE ``tokenizer.json``); nothing is downloaded. The model (a ~1.1 M
parameter Llama-style config, vocabulary 2048) was trained for a few CPU minutes on the Python
standard library's own source files by ``python -m samplers.models.train_tiny``: it writes
Python-looking text, which is all the demo and the tests need (a model whose distributions
are real, with repetitions for DRY/penalties to act on). The tokenizer pads on the left, as a
decoder-only model needs for batched prompts (right padding would put pad tokens between a
prompt and its continuation). Needs the ``hf`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

TINY_DIR = Path(__file__).resolve().parent / "tiny"

__all__ = ["TINY_DIR", "load_default", "load_tokenizer"]


def load_tokenizer(path: Union[str, Path] = TINY_DIR) -> Any:
    """The tokenizer in ``path`` (default: the embedded one), offline, with
    ``padding_side="left"``: the models here are decoder-only, so a batch of padded prompts
    must end where generation starts."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: run python -m samplers.models.train_tiny")
    # explicit, whatever tokenizer_config.json says (transformers' default is right padding)
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True, padding_side="left")


def load_default(path: Union[str, Path] = TINY_DIR, device: Any = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """The embedded model (eval mode, on ``device``) and its tokenizer (left padding, see
    :func:`load_tokenizer`), offline."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {path}: run python -m samplers.models.train_tiny")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    model.to(device=device, dtype=dtype or torch.float32).eval()
    return model, load_tokenizer(path)
