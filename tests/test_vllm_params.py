"""What SamplersLogitsProcessor does the same under every vLLM model runner: reading the
request's ``extra_args``, refusing bad ones at admission, and which of vLLM's processor
interfaces it implements. Runs on any vLLM from 0.32 on (skipped without vllm)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("vllm")

from samplers.integrations import vllm as integration  # noqa: E402
from samplers.integrations.vllm import (  # noqa: E402
    EXTRA_ARGS_KEY,
    SamplersLogitsProcessor,
    parse_extra_args,
)

from vllm_rows import FQCN, vparams  # noqa: E402


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_parse_dict_and_json_string():
    block = {"dry_multiplier": 0.8, "min_p": 0.05, "sampler_priority": ["MIN_P", "DRY"],
             "logit_bias": {"5": 3.0}, "temperature": 0.7}
    a = parse_extra_args({EXTRA_ARGS_KEY: block})
    b = parse_extra_args({EXTRA_ARGS_KEY: json.dumps(block)})
    assert a == b and a.dry_multiplier == 0.8 and a.logit_bias == {5: 3.0}
    assert parse_extra_args(None) is None
    assert parse_extra_args({"other_plugin": 1}) is None
    # min_tokens is not checked against our max_tokens default (max_tokens is vLLM's).
    assert parse_extra_args({EXTRA_ARGS_KEY: {"min_tokens": 500}}).min_tokens == 500


@pytest.mark.parametrize("block, match", [
    ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
    ({"dry_base": 1.0}, "dry_base"),
    ({"no_such_param": 1}, "unknown request parameter.*no_such_param"),
    ({"max_tokens": 10}, "'max_tokens'.*vLLM's own"),
    ({"n": 2, "stop": ["x"]}, "'n', 'stop'.*request-level"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be an object"),
])
def test_validate_params_errors(block, match):
    with pytest.raises(ValueError, match=match):
        SamplersLogitsProcessor.validate_params(vparams(block))


@pytest.mark.parametrize("kw, name", [
    ({"temperature": 0.7}, "temperature"),
    ({"top_p": 0.9}, "top_p"),
    ({"top_k": 40}, "top_k"),
    ({"min_p": 0.1}, "min_p"),
    ({"repetition_penalty": 1.1}, "repetition_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
])
def test_validate_params_requires_neutral_vllm_samplers(kw, name):
    with pytest.raises(ValueError, match=f"neutral.*{name}="):
        SamplersLogitsProcessor.validate_params(vparams({"min_p": 0.1}, **kw))
    # Without our block vLLM's own samplers are none of our business.
    SamplersLogitsProcessor.validate_params(vparams(None, **kw))


def test_validate_params_accepts_neutral_and_greedy():
    SamplersLogitsProcessor.validate_params(vparams({"min_p": 0.1}))
    SamplersLogitsProcessor.validate_params(vparams({"min_p": 0.1}, temperature=1.0, top_k=-1))
    SamplersLogitsProcessor.validate_params(vparams({"min_p": 0.1}, temperature=0.0))
    SamplersLogitsProcessor.validate_params(vparams(None))


def test_entry_point_if_installed():
    from importlib.metadata import entry_points

    ours = [ep for ep in entry_points(group="vllm.logits_processors") if ep.value == FQCN]
    if not ours:
        pytest.skip("package not installed with its vllm.logits_processors entry point")
    assert ours[0].load() is SamplersLogitsProcessor


def test_interfaces_follow_the_installed_vllm():
    """A subclass of exactly the interfaces this vLLM has (0.32-0.33: V1 and V2; 0.34 on: V2
    alone, the V1 runner's module is gone), and V1's constructor arguments on a vLLM without
    V1 are a TypeError that says so, not an error from deep inside a missing module."""
    has_v1 = _has("vllm.v1.sample.logits_processor")
    has_v2 = _has("vllm.v1.worker.gpu.sample.logits_processor")
    assert has_v1 or has_v2
    bases = set(SamplersLogitsProcessor.__mro__)
    if has_v1:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1

        assert V1 in bases
    if has_v2:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

        assert V2 in bases
    assert (integration.V1LogitsProcessor is not None) == has_v1
    assert (integration.V2LogitsProcessor is not None) == has_v2
    cfg = type("Cfg", (), {"model_config": None})()
    if has_v1:
        assert isinstance(SamplersLogitsProcessor(cfg, torch.device("cpu"), False), integration._V1Processor)
    else:
        with pytest.raises(TypeError, match=r"only Model Runner V2's interface.*\(vllm_config, req_states\)"):
            SamplersLogitsProcessor(cfg, torch.device("cpu"), False)
