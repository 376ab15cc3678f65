"""Guided decoding (samplers/guided.py, samplers/kernels/guided.py, the generation loop): every output of the
embedded model parses, unguided rows are unaffected, invalid inputs are clear errors, and the
bitmask kernel equals the torch path."""

from __future__ import annotations

import json
import re

import pytest
import torch

from samplers import SamplingParams
from samplers.guided import (
    DEFAULT_BACKEND, SUPPORTED_BACKENDS, apply_token_bitmask, apply_token_bitmask_torch, guided_spec,
    pack_allowed, resolve_backend, unpack_bitmask,
)

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},   # llguidance allows extras otherwise
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
]
REGEXES = [r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)", r"\d{3}-\d{4}", r"^\w{1,8}$", r"(yes|no)!?"]
CHOICES = [["Yes", "No", "Maybe"], ["red", "green", "a b|c", 'say "hi"'], ["x", "xy"]]
SEEDS = [0, 1, 2, 3]
PROMPTS = ["def f(x):\n    return ", "import os\n"]


def _backends():
    out = []
    for name in SUPPORTED_BACKENDS:
        mark = pytest.mark.skipif(not _has(name), reason=f"{name} not installed")
        out.append(pytest.param(name, marks=mark))
    return out


def _has(mod: str) -> bool:
    try:
        __import__(mod)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def model_tok():
    pytest.importorskip("transformers")
    from samplers.models import load_default

    return load_default()


def _validate_json(text: str, schema: dict) -> None:
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        if schema["type"] == "object":
            assert isinstance(value, dict) and set(schema.get("required", ())) <= set(value)
        else:
            assert isinstance(value, list)
        return
    jsonschema.validate(value, schema)


# ---------------------------------------------------------------------------- names, precedence
def test_backend_names():
    assert resolve_backend(None) == DEFAULT_BACKEND
    for alias in ("auto", "regex", "outlines", "lm-format-enforcer", "Outlines"):
        assert resolve_backend(alias) == DEFAULT_BACKEND
    assert resolve_backend("xgrammar") == "xgrammar"
    assert resolve_backend("llguidance") == resolve_backend("guidance") == "llguidance"
    assert resolve_backend("xgrammar:disable-any-whitespace") == "xgrammar"
    with pytest.raises(ValueError, match="not supported.*xgrammar.*llguidance"):
        resolve_backend("my-grammar-lib")


def test_precedence_choice_regex_json():
    p = SamplingParams(guided_json={"type": "object"}, guided_regex=r"\w+", guided_choice=["a", "b"])
    s = guided_spec(p)
    assert s.kind == "choice" and s.value == ("a", "b") and s.ignored == ("guided_regex", "guided_json")
    s = guided_spec(SamplingParams(guided_json={"type": "object"}, guided_regex=r"\w+"))
    assert s.kind == "regex" and s.ignored == ("guided_json",)
    s = guided_spec(SamplingParams(guided_json='{"type": "integer"}'))
    assert s.kind == "json" and json.loads(s.value) == {"type": "integer"}
    assert guided_spec(SamplingParams()) is None


def test_invalid_inputs_are_value_errors():
    with pytest.raises(ValueError, match="guided_regex.*not a valid regular expression"):
        guided_spec(SamplingParams(guided_regex="a(b"))
    with pytest.raises(ValueError, match="at least one choice"):
        guided_spec(SamplingParams(guided_choice=[]))
    with pytest.raises(ValueError, match="guided_decoding_backend"):
        guided_spec(SamplingParams(guided_regex="a", guided_decoding_backend="nope"))
    if _has("jsonschema"):
        with pytest.raises(ValueError, match="guided_json is not a valid JSON schema"):
            guided_spec(SamplingParams(guided_json={"type": "nonsense"}))


# ---------------------------------------------------------------------------- the bitmask
@pytest.mark.parametrize("V", [1, 31, 32, 33, 100, 2048, 5000])
def test_pack_unpack_roundtrip(V):
    g = torch.Generator().manual_seed(V)
    allowed = torch.rand(3, V, generator=g) < 0.5
    bm = pack_allowed(allowed)
    assert bm.dtype == torch.int32 and bm.shape == (3, (V + 31) // 32)
    assert torch.equal(unpack_bitmask(bm, V), allowed)


def test_torch_path_masks_and_keeps_rest():
    x = torch.randn(3, 70)
    allowed = torch.rand(2, 70) < 0.3
    allowed[:, 0] = True
    out = apply_token_bitmask_torch(x, pack_allowed(allowed), torch.tensor([2, 0]))
    assert torch.equal(out[1], x[1])                                  # not listed: unchanged
    for i, r in enumerate([2, 0]):
        assert torch.equal(out[r][allowed[i]], x[r][allowed[i]])       # allowed: bit-identical
        assert torch.isneginf(out[r][~allowed[i]]).all()
    ones = torch.full((3, 3), -1, dtype=torch.int32)                  # all-ones rows: identity
    assert torch.equal(apply_token_bitmask_torch(x, ones), x)


@pytest.mark.parametrize("V", [7, 32, 1000, 2048, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_rows", [False, True])
def test_kernel_equals_torch(V, dtype, with_rows):
    pytest.importorskip("triton")
    import samplers.kernels as kernels

    if not kernels.available(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET is not set")
    from samplers.kernels.guided import apply_token_bitmask as kernel_apply

    g = torch.Generator().manual_seed(V)
    x = torch.randn(4, V, generator=g).to(dtype)
    x[0, :3] = -torch.inf
    rows = torch.tensor([3, 1, 0]) if with_rows else None
    allowed = torch.rand(3 if with_rows else 4, V, generator=g) < 0.4
    bm = pack_allowed(allowed)
    ref = apply_token_bitmask_torch(x, bm, rows)
    got = kernel_apply(x, bm, rows)
    assert got.dtype == dtype and torch.equal(got, ref)
    assert torch.equal(apply_token_bitmask(x, bm, rows, backend="triton"), ref)
    assert torch.equal(apply_token_bitmask(x, bm, rows, backend="torch"), ref)


# ---------------------------------------------------------------------------- generation
def _generate(model_tok, params, prompts=None, **kw):
    from samplers.generation import generate

    model, tok = model_tok
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    return generate(model, tok, prompts, params, **kw)


@pytest.mark.parametrize("backend", _backends())
def test_every_output_validates(model_tok, backend):
    params, checks = [], []
    for seed in SEEDS:
        for s in SCHEMAS:
            params.append(SamplingParams(guided_json=s, guided_decoding_backend=backend, seed=seed, max_tokens=40))
            checks.append(("json", s))
        for r in REGEXES:
            params.append(SamplingParams(guided_regex=r, guided_decoding_backend=backend, seed=seed, max_tokens=24))
            checks.append(("regex", r))
        for c in CHOICES:
            params.append(SamplingParams(guided_choice=c, guided_decoding_backend=backend, seed=seed, max_tokens=12,
                                         temperature=1.3))
            checks.append(("choice", c))
    results = _generate(model_tok, params)
    for res, (kind, spec) in zip(results, checks):
        out = res.outputs[0]
        assert out.finish_reason == "stop", (kind, spec, out)
        if kind == "json":
            _validate_json(out.text, spec)
        elif kind == "regex":
            assert re.fullmatch(spec, out.text), (spec, out.text)
        else:
            assert out.text in spec, (spec, out.text)


@pytest.mark.parametrize("backend", _backends())
def test_unguided_row_unaffected(model_tok, backend):
    plain = SamplingParams(seed=7, max_tokens=12, top_k=40, ignore_eos=True)
    alone = _generate(model_tok, [plain], ["import os\n"])[0].outputs[0]
    guided = [SamplingParams(guided_json=SCHEMAS[0], guided_decoding_backend=backend, seed=1, max_tokens=30),
              SamplingParams(guided_choice=["Yes", "No"], guided_decoding_backend=backend, seed=2)]
    mixed = _generate(model_tok, [guided[0], plain, guided[1]], ["def f(x):\n", "import os\n", "x = "])
    assert mixed[1].outputs[0].token_ids == alone.token_ids
    assert mixed[1].outputs[0].text == alone.text
    assert mixed[2].outputs[0].text in ("Yes", "No")


def test_invalid_inputs_fail_before_generation(model_tok):
    pytest.importorskip(DEFAULT_BACKEND)
    from samplers.generation import generate

    model, tok = model_tok
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        for bad, match in [({"guided_regex": "a(b"}, "guided_regex"),
                           ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
                            "guided_json"),
                           ({"guided_regex": "a", "guided_decoding_backend": "nope"}, "guided_decoding_backend"),
                           ({"guided_choice": [""]}, "only the empty output")]:
            with pytest.raises(ValueError, match=match):
                generate(model, tok, ["x", "y"], [SamplingParams(max_tokens=3), SamplingParams(**bad, max_tokens=3)],
                         stream=True)
    finally:
        handle.remove()
    assert not calls          # the model never ran


def test_full_example_and_streaming(model_tok):
    pytest.importorskip(DEFAULT_BACKEND)
    with open(__file__.rsplit("/", 1)[0] + "/data/arli_full_request.json") as f:
        body = json.load(f)
    body["max_tokens"] = 24      # min_tokens is 20
    p = SamplingParams.from_dict(body)
    from samplers.generation import generate

    model, tok = model_tok
    stream = generate(model, tok, ["def f(x):\n", "import os\n"], [p, SamplingParams(guided_regex=r"\d{2}", seed=0)],
                      stream=True)
    texts, ids = {0: "", 1: ""}, {0: [], 1: []}
    for d in stream:
        texts[d.request_index] += d.text
        ids[d.request_index] += d.token_ids
    res = stream.results
    assert res[0].outputs[0].text in ("Yes", "No", "Maybe") and res[0].outputs[0].finish_reason == "stop"
    assert texts[0] == res[0].outputs[0].text            # min_tokens=20 does not hold a complete grammar open
    assert re.fullmatch(r"\d{2}", res[1].outputs[0].text) and texts[1] == res[1].outputs[0].text
    assert ids[0] == res[0].outputs[0].token_ids and ids[1] == res[1].outputs[0].token_ids
    assert res[0].outputs[0].logprobs is not None and len(res[0].outputs[0].logprobs) == len(res[0].outputs[0].token_ids)


def test_n_sequences_and_ignore_eos(model_tok):
    pytest.importorskip(DEFAULT_BACKEND)
    p = SamplingParams(guided_choice=["alpha", "beta", "gamma"], n=3, seed=5, temperature=1.5, ignore_eos=True,
                       max_tokens=10)
    res = _generate(model_tok, [p])[0]
    assert len(res.outputs) == 3
    for o in res.outputs:
        assert o.text in ("alpha", "beta", "gamma") and o.finish_reason == "stop"
