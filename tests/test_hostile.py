"""Hostile inputs (issue 14): extreme floats, NaN / inf rows, huge integers, odd types.

Each test names the issue item it checks; the rules are in docs/SEMANTICS.md, "Hostile inputs".
Property tests draw from strategies that include the values a hostile user would send, so a
new defect of each kind fails here rather than deep inside torch.
"""

import dataclasses
import json
import math
import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samplers import SamplerID, SamplerPipeline, SamplingBatch, SamplingParams
from samplers.batch import FLOAT_FIELDS, normalise_device
from samplers.params import FLOAT32_MAX
from samplers.history import TokenHistory
from samplers.pipeline import triton_available

from host_reads import no_host_reads

INF, NAN = math.inf, math.nan
FMAX = FLOAT32_MAX
BACKENDS = ["torch"] + (["triton"] if triton_available() else [])
HOSTILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _f32(v):
    return struct.unpack("f", struct.pack("f", v))[0]


# ----------------------------------------------------------------------------- strategies
#: numbers a hostile request may hold: every float (NaN, inf, subnormal, 1e39), huge ints, bools
hostile_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e40, max_value=1e40),
    st.sampled_from([1e39, -1e39, 3.5e38, FMAX, -FMAX, 1e-50, 1e-45, 5e-324, 2e38, 1e18, 1.0000000001]),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, True, False]),
)
odd_values = st.one_of(
    st.none(), st.text(max_size=4), st.sampled_from(["²", "3", "1e3", "", "inf"]), st.binary(max_size=3),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sets(st.integers(0, 13), max_size=3), st.just(object()), hostile_numbers,
)
NUMERIC_FIELDS = sorted(
    f.name for f in dataclasses.fields(SamplingParams)
    if f.type in ("float", "int", "Optional[int]") and f.name not in ("n",)
)


def _try_params(**kw):
    """SamplingParams(**kw), or None when it is rejected with a ValueError naming a field of kw."""
    try:
        return SamplingParams(**kw)
    except ValueError as exc:
        msg = str(exc)
        assert any(k in msg for k in kw) or "dynatemp_min" in msg or "min_tokens" in msg, msg
        return None


# ----------------------------------------------------------------------------- items 1, 10, 11
@HOSTILE
@given(name=st.sampled_from(NUMERIC_FIELDS), value=hostile_numbers)
def test_numeric_fields_accept_only_what_the_batch_can_hold(name, value):
    """Items 1, 10, 11: every numeric field either becomes a value the batch's float32 / int64
    tensors hold exactly in range, or is a ValueError naming it (never OverflowError, never a
    failure later in SamplingBatch)."""
    p = _try_params(**{name: value})
    if p is None:
        return
    v = getattr(p, name)
    if name in FLOAT_FIELDS:
        assert math.isfinite(v) and abs(v) <= FMAX
        assert math.isfinite(_f32(v))
    SamplingBatch([p], vocab_size=8)  # int64 / float32 tensors built without error


@HOSTILE
@given(body=st.dictionaries(st.one_of(st.sampled_from(sorted(SamplingParams.field_names())), st.text(max_size=3),
                                      st.integers()), odd_values, max_size=4))
def test_from_dict_fails_only_with_a_named_value_error(body):
    """Items 10-14: from_dict on odd keys and values: a SamplingParams or a ValueError."""
    try:
        SamplingParams.from_dict(body)
    except ValueError:
        pass


@pytest.mark.parametrize("text", ['{"top_k": 1e20}', '{"temperature": 1e400}', '{"seed": 1e30}',
                                  '{"no_repeat_ngram_size": 1e19}', '{"dry_range": 99999999999999999999}',
                                  '{"dry_sequence_breaker_ids": [1e20]}'])
def test_from_json_overflow_is_a_value_error(text):
    """Item 11: an integer beyond int64 (or a float beyond float32) from JSON is rejected by name."""
    name = next(iter(json.loads(text.replace("1e400", "1"))))
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_json(text)


@pytest.mark.parametrize("name,value,fragment", [
    ("temperature", 1e39, "float32"), ("repetition_penalty", 1e39, "float32"),
    ("repetition_penalty", 1e-50, "float32"), ("smoothing_factor", 2e38, "1e+18"),
    ("dynatemp_max", 1e39, "float32"), ("dry_multiplier", 1e39, "float32"), ("dry_base", 1e39, "float32"),
    ("dry_base", 1.0000000001, "float32"), ("temperature", 10**400, "float32"), ("skew", 100.0, "[-80, 80]"),
    ("top_k", 10**30, "top_k"), ("min_tokens", 10**30, "min_tokens"), ("dry_allowed_length", 10**30, "dry"),
])
def test_issue_examples_are_rejected_with_range(name, value, fragment):
    """Items 1, 10, 11: the issue's values, each a ValueError naming parameter and range."""
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    assert name in str(info.value) and fragment in str(info.value)


# ----------------------------------------------------------------------------- items 12-14, 17, 18
@pytest.mark.parametrize("kw", [
    {"logits_processors": 5}, {"logits_processors": "f"}, {"logit_bias": {"²": 1}}, {"logit_bias": {1.5: 1}},
    {"sampler_priority": ["²"]}, {"sampler_priority": {1, 2}}, {"sampler_priority": {1: 2}},
    {"stop_token_ids": [1.5]}, {"stop_token_ids": ["3"]}, {"stop_token_ids": [True]}, {"stop_token_ids": [None]},
    {"stop_token_ids": [[1]]}, {"stop_token_ids": [10**30]}, {"dry_sequence_breaker_ids": "12"},
    {"dry_sequence_breaker_ids": [1.0]},
])
def test_odd_types_are_value_errors(kw):
    """Items 12-14, 17: odd types are ValueErrors naming the field, never TypeError or silent coercion."""
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_from_dict_with_non_string_keys():
    """Item 12."""
    with pytest.raises(ValueError, match="names must be strings"):
        SamplingParams.from_dict({1: 2, "foo": 3})


@pytest.mark.parametrize("kw,name", [
    ({"eos_token_ids": "12"}, "eos_token_ids"), ({"eos_token_ids": [1.5]}, "eos_token_ids"),
    ({"eos_token_ids": [True]}, "eos_token_ids"), ({"eos_token_ids": 10**30}, "eos_token_ids"),
    ({"prompt_token_ids": [[1.5]]}, "prompt_token_ids"), ({"prompt_token_ids": [["3"]]}, "prompt_token_ids"),
    ({"prompt_token_ids": [[True]]}, "prompt_token_ids"), ({"prompt_token_ids": [None]}, "prompt_token_ids"),
    ({"prompt_token_ids": [[[1]]]}, "prompt_token_ids"), ({"prompt_token_ids": [[10**30]]}, "token id"),
    ({"output_token_ids": [[2.0]]}, "output_token_ids"), ({"sequence_indices": ["a"]}, "sequence_indices"),
])
def test_batch_token_ids_are_checked(kw, name):
    """Item 17: token ids in the batch are integers in range, else a ValueError."""
    with pytest.raises(ValueError, match=name):
        SamplingBatch([SamplingParams()], vocab_size=8, **kw)


def test_batch_accepts_integer_arrays_and_tensors():
    b = SamplingBatch([SamplingParams()] * 2, prompt_token_ids=[np.array([1, 2]), torch.tensor([3])],
                      vocab_size=8, eos_token_ids=np.int64(2))
    assert b.history.to_lists() == [[1, 2], [3]] and b.eos_token_ids == (2,)


@pytest.mark.parametrize("kw", [{"seed": "a"}, {"seed": 1.5}, {"seed": 2**70}, {"generator": 5},
                                {"backend": 3}])
def test_pipeline_arguments_are_checked(kw):
    """Item 18: bad pipeline arguments fail at construction with a ValueError naming them."""
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplerPipeline(**kw)


# ----------------------------------------------------------------------------- items 15, 16, 21
@pytest.mark.parametrize("kw,name", [
    ({"guided_choice": []}, "guided_choice"), ({"guided_regex": "("}, "guided_regex"),
    ({"guided_json": {"type": "foo"}}, "guided_json"), ({"guided_decoding_backend": "foo"}, "guided_decoding_backend"),
    ({"guided_json": {"type": "object", "properties": {"a": {1, 2}}}}, "guided_json"),
    ({"guided_json": "[1, 2]"}, "guided_json"), ({"guided_json": "{"}, "guided_json"),
])
def test_guided_fields_are_validated_at_construction(kw, name):
    """Item 15: guided fields fail at SamplingParams / from_dict, not in generate()."""
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)
    body = {k: (sorted(v) if isinstance(v, set) else v) for k, v in kw.items()}
    if "a" not in str(body):
        with pytest.raises(ValueError, match=name):
            SamplingParams.from_dict(body)


def _nested(depth):
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_schema_is_a_value_error(depth):
    """Item 16: nesting beyond the bound (a dict, or JSON text deeper than the parser's stack)."""
    with pytest.raises(ValueError, match="nested"):
        SamplingParams(guided_json=_nested(depth))
    text = '{"a": ' * depth + "1" + "}" * depth
    with pytest.raises(ValueError, match="guided_json"):
        SamplingParams(guided_json=text)


def test_schema_size_is_bounded_before_compilation():
    """Item 21: too many properties is a clear error at once (compilation would take minutes)."""
    from samplers.guided import MAX_OBJECT_PROPERTIES, MAX_TOTAL_PROPERTIES

    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_OBJECT_PROPERTIES + 1)}}
    with pytest.raises(ValueError, match="properties"):
        SamplingParams(guided_json=many)
    ok = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_OBJECT_PROPERTIES)}}
    SamplingParams(guided_json=ok)
    wide = {"type": "object", "properties": {
        f"o{j}": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(200)}}
        for j in range(MAX_TOTAL_PROPERTIES // 200 + 1)}}
    with pytest.raises(ValueError, match="in all"):
        SamplingParams(guided_json=wide)


# ----------------------------------------------------------------------------- pipeline inputs
def _pipe(backend):
    return SamplerPipeline(backend, seed=0)


def _one(params, logits, backend="torch", dtype=torch.float32, prompt=None):
    lg = torch.tensor(logits, dtype=dtype)
    B = lg.shape[0]
    batch = SamplingBatch([params] * B, prompt_token_ids=prompt, vocab_size=lg.shape[1])
    pipe = _pipe(backend)
    return pipe.process(lg, batch), pipe.sample(lg, batch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_functional_half_precision_results_saturate(dtype):
    """The functions themselves, not only the pipeline, keep a finite logit finite in fp16 /
    bf16 (SEMANTICS.md, "Arithmetic saturates"): a penalty, a DRY penalty or a bias whose
    float32 result lies beyond the dtype's range gives the dtype's largest finite magnitude
    (they used to cast to +-inf, which removed a token the pipeline keeps)."""
    import samplers.functional as F

    big = torch.finfo(dtype).max
    x = torch.tensor([[70.0, -70.0, 1.0]], dtype=dtype)
    if dtype == torch.bfloat16:  # (its range is float32's: push the values near its top)
        x = x * 4e36
    seen = torch.tensor([[True, True, False]])
    counts = torch.zeros(1, 3, dtype=torch.int64)
    for r in (1e-3, 1e3):
        out = F.penalties(x, seen, counts, r, 0.0, 0.0)
        assert out.dtype == dtype and torch.isfinite(out).all(), (r, out)
    assert F.penalties(x, seen, counts, 1e-3, 0.0, 0.0)[0, 0].item() == big
    if dtype == torch.float16:  # (in bf16 a penalty that large overflows float32: -inf, as documented)
        history = TokenHistory([[0, 1, 0, 1, 0, 1, 0, 1, 0]], [[]], 3)
        out = F.dry(x, history, 3.0, 10.0, 2, 0, torch.empty(1, 0, dtype=torch.int64))
        assert out[0, 1].item() == -big and torch.isfinite(out).all()
    top = torch.tensor([[big, 0.0]], dtype=dtype)
    out = F.logit_bias(top, torch.tensor([0]), torch.tensor([0]), torch.tensor([100.0]))
    assert out.dtype == dtype and out[0, 0].item() == big


def _dense_cast_saturating(x32, dtype):
    """The saturating cast as three torch passes (the definition the CPU's counting fast path
    must agree with)."""
    fmax = torch.finfo(dtype).max
    return torch.where(torch.isfinite(x32), x32.clamp(-fmax, fmax), x32).to(dtype)


def _edge_values(dtype):
    """float32 values around ``dtype``'s top: its largest value, the float32 neighbours of the
    point where the cast starts to round to inf, float32's largest, and the specials."""
    fmax = torch.finfo(dtype).max
    next_up = torch.nextafter(torch.tensor(fmax), torch.tensor(INF)).item()
    # (halfway to the next power-of-two step: from there the round-to-nearest cast gives inf)
    ulp = {torch.float16: 2.0 ** 5, torch.bfloat16: 2.0 ** 120}[dtype]  # (the dtype's step at its top)
    half = fmax + ulp / 2
    edges = [fmax, next_up, half, FMAX, 0.0, -0.0, 1.0, INF, -INF, NAN, 1e-45]
    for v in (half,):
        edges += [torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(t)).item() for t in (INF, -INF)]
    return edges + [-e for e in edges]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@HOSTILE
@given(st.data())
def test_cast_saturating_matches_the_dense_cast(dtype, data):
    """``cast_saturating``'s CPU path (the plain cast, kept when it made no new infinity) gives
    the dense definition's bits, on rows mixing ordinary logits with the values at the cast's
    rounding edge, infinities and NaN."""
    from samplers.functional._stats import cast_saturating

    edges = _edge_values(dtype)
    n = data.draw(st.integers(1, 40))
    picks = data.draw(st.lists(st.one_of(st.sampled_from(edges), st.floats(-1e3, 1e3, width=32)),
                               min_size=n, max_size=n))
    x32 = torch.tensor(picks, dtype=torch.float32).reshape(1, -1)
    got, want = cast_saturating(x32, dtype), _dense_cast_saturating(x32, dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)) or (
        torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)]))
    assert not (torch.isinf(got) & torch.isfinite(x32)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_on_huge_logits_saturates(backend):
    """Item 3: [[3e38, 0, -1]] at T = 0.5 -> [FMAX, 0, -2]; the top token is drawn, logprob 0."""
    out, s = _one(SamplingParams(temperature=0.5, seed=1), [[3e38, 0.0, -1.0]], backend)
    assert out.tolist() == [[_f32(FMAX), 0.0, -2.0]]
    assert s.token_ids.tolist() == [0] and s.logprobs.tolist() == [0.0]
    out, s = _one(SamplingParams(dynatemp_min=0.1, dynatemp_max=0.2, seed=1), [[3e38, 0.0, -1.0]], backend)
    assert torch.isfinite(out).all() and s.token_ids.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cubic_smoothing_on_a_huge_spread_saturates(backend):
    """Item 2: f = 1 at the default curve on [[0, -1e20, -1]] -> [0, -FMAX, -1] (no 0 * inf)."""
    out, s = _one(SamplingParams(smoothing_factor=1.0), [[0.0, -1e20, -1.0]], backend)
    assert out.tolist() == [[0.0, -_f32(FMAX), -1.0]]
    out, _ = _one(SamplingParams(smoothing_factor=1e18, smoothing_curve=1e18), [[0.0, -1e20, -1.0, 5.0]], backend)
    assert not torch.isnan(out).any() and out[0, 3] == 5.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_results_saturate(backend, dtype):
    """Item 4: T = 1.1e-5 on fp16 [1, 0, -1]: the result saturates at the
    dtype's max; no finite token becomes -inf."""
    out, _ = _one(SamplingParams(temperature=1.1e-5), [[1.0, 0.0, -1.0]], backend, dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float16:  # 1 / 1.1e-5 = 90909 > 65504
        assert out.tolist() == [[65504.0, 0.0, -65504.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_overflow_keeps_the_input_argmax(backend):
    """Item 5: a repeat long enough that DRY's penalty overflows on every token: the row keeps
    its input argmax (the rescue), the draw is that token with logprob 0."""
    s = [1, 0] * 150
    prompt = [s + [0] + s]  # after the last 0, both 0 and 1 extend repeats of ~300 tokens
    out, s = _one(SamplingParams(dry_multiplier=1.0, dry_allowed_length=1, seed=3), [[0.5, 1.0]], backend,
                  prompt=prompt)
    assert out.tolist() == [[-INF, 1.0]] and s.token_ids.tolist() == [1] and s.logprobs.tolist() == [0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_rule(backend):
    """Item 6: NaN is removed, +inf reads as the dtype's max (so those tokens win), both backends alike."""
    out, s = _one(SamplingParams(min_p=0.01, seed=0), [[1.0, NAN, INF, 0.0]], backend)
    assert out[0, 1] == -INF and out[0, 2] == _f32(FMAX)
    assert s.token_ids.tolist() == [2] and s.logprobs.tolist() == [0.0]
    out, s = _one(SamplingParams(temperature=0.7, seed=0), [[1.0, NAN, 0.0]], backend)
    assert out[0, 1] == -INF and s.token_ids.item() in (0, 2) and math.isfinite(s.logprobs.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [[-INF, -INF, -INF], [NAN, NAN, NAN], [NAN, -INF, NAN]])
def test_row_without_a_candidate_is_a_value_error(backend, row):
    """Item 6: a row with no finite logit cannot be sampled: a ValueError naming the row."""
    lg = torch.tensor([[0.0, 1.0, 2.0], row])
    batch = SamplingBatch([SamplingParams(temperature=0.5)] * 2, vocab_size=3)
    for call in (_pipe(backend).process, _pipe(backend).sample):
        with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
            call(lg, batch)


def test_requires_grad_logits():
    """Item 7: logits from a forward pass outside no_grad are fine on every sampler."""
    every = dict(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2, no_repeat_ngram_size=3,
                 dry_multiplier=0.8, temperature=0.8, smoothing_factor=0.2, top_k=30, top_p=0.9, top_a=0.1,
                 min_p=0.02, tfs=0.95, eta_cutoff=1e-3, epsilon_cutoff=1e-4, typical_p=0.95, nsigma=2.0,
                 xtc_threshold=0.05, xtc_probability=0.5, skew=0.3, dynatemp_min=0.5, dynatemp_max=1.5, seed=0,
                 logprobs=2)
    lg = torch.randn(2, 64, requires_grad=True)
    batch = SamplingBatch([SamplingParams(**every), SamplingParams()], prompt_token_ids=[[1, 2, 3, 1, 2], [4]],
                          vocab_size=64)
    pipe = _pipe("torch")
    out = pipe.process(lg, batch)
    assert not out.requires_grad and torch.isfinite(out[1]).all()
    s = pipe.sample(lg, batch)
    assert s.token_ids.shape == (2,)


def test_device_names_are_normalised():
    """Item 8: 'cpu:0' and 'cpu' are one device; 'cuda' means the current CUDA device."""
    assert normalise_device("cpu:0") == torch.device("cpu")
    assert normalise_device(None) == normalise_device(torch.get_default_device())
    batch = SamplingBatch([SamplingParams(temperature=0.5)], vocab_size=4, device="cpu:0")
    _pipe("torch").process(torch.zeros(1, 4), batch)
    if torch.cuda.is_available():
        assert normalise_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(ValueError, match="device"):
        SamplingBatch([SamplingParams()], vocab_size=4, device="nonsense")


def test_an_unnamed_device_is_torchs_default_device():
    """A batch or a history built without naming a device goes where torch puts tensors made
    without one (``torch.set_default_device``; a meta device stands in for a GPU), so that
    code written for the default device finds the batch beside its logits."""
    from samplers.history import TokenHistory

    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert normalise_device(None) == torch.device("meta")
        batch = SamplingBatch([SamplingParams(min_p=0.1, repetition_penalty=1.2)], [[1, 2]], [[3]], vocab_size=8)
        assert batch.device.type == "meta" and batch.param("min_p").device.type == "meta"
        assert batch.history.tokens.device.type == "meta"
        assert TokenHistory([[1]], [[2]], vocab_size=5).device.type == "meta"
    finally:
        _restore_default_device(previous)
    assert SamplingBatch([SamplingParams(min_p=0.1)], vocab_size=8).device == normalise_device(previous)


def _restore_default_device(previous: torch.device) -> None:
    if previous.type != "cpu":
        torch.set_default_device(previous)
        return
    # (None, not "cpu": a default device set to "cpu" stays a torch function mode, which every
    # later tensor method call would pass through)
    torch.set_default_device(None)
    # torch 2.8 then keeps a cleared setting that its own get_default_device cannot read (and
    # transformers calls it): removed, as in a process that never set one
    if getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", "unset") is None:
        del torch._GLOBAL_DEVICE_CONTEXT.device_context


def test_an_unnamed_device_is_the_cpu_after_the_default_device_was_cleared(monkeypatch):
    """After ``torch.set_default_device(None)``, torch 2.8's ``get_default_device`` raises
    ``AttributeError`` (it reads the cleared setting): a batch and a history built without a
    device still go to the CPU. The sequence itself (a real failure on torch 2.8 only), then
    that torch's failure everywhere."""
    from samplers.history import TokenHistory

    def made_without_a_device():
        batch = SamplingBatch([SamplingParams(min_p=0.1, repetition_penalty=1.2)], [[1, 2]], [[3]], vocab_size=8)
        return batch.device, batch.history.tokens.device, TokenHistory([[1]], [[2]], vocab_size=5).device

    cpu = torch.device("cpu")
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    torch.set_default_device(None)
    try:
        assert made_without_a_device() == (cpu, cpu, cpu)
    finally:
        _restore_default_device(previous)

    def get_default_device_of_torch_2_8():
        raise AttributeError("'NoneType' object has no attribute 'device'")

    monkeypatch.setattr(torch, "get_default_device", get_default_device_of_torch_2_8)
    assert made_without_a_device() == (cpu, cpu, cpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_default_rows_are_bit_identical(backend):
    """Item 9: float64 logits: default rows come back bit-identical; others are the float32
    chain's values, in float64."""
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 32, generator=g, dtype=torch.float64) * 3
    lg[0, 0] = 1 / 3  # not a float32 value
    batch = SamplingBatch([SamplingParams(), SamplingParams(temperature=0.5)], vocab_size=32)
    out = _pipe(backend).process(lg, batch)
    assert out.dtype == torch.float64 and torch.equal(out[0], lg[0])
    assert torch.equal(out[1], (lg[1].float() / 0.5).double())
    huge = lg.clone()
    huge[1, 3] = 1e300  # beyond float32: saturates
    out = _pipe(backend).process(huge, batch)
    assert out[1, 3] == _f32(FMAX) and torch.equal(out[0], huge[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_row_with_inf_next_to_a_sampling_row(backend):
    """Item 20: a default row keeps +inf / NaN / -inf exactly, whatever its neighbours do."""
    lg = torch.tensor([[1.0, INF, 0.0, NAN], [1.0, 2.0, 0.0, 3.0]])
    batch = SamplingBatch([SamplingParams(), SamplingParams(temperature=0.5, top_k=2, nsigma=1.0)], vocab_size=4)
    out = _pipe(backend).process(lg, batch)
    assert torch.equal(out[0, :3], lg[0, :3]) and math.isnan(out[0, 3].item())


@pytest.mark.parametrize("backend", ["torch"])
@HOSTILE
@given(data=st.data())
def test_hostile_logits_and_parameters_never_give_nan(backend, data):
    """Items 1-6: any logits (NaN, +-inf, huge finite values) with extreme but valid parameters:
    the processed logits hold no NaN and no +inf, and the drawn token is a finite survivor with a
    finite log-probability (or the call is a ValueError for a row without a candidate)."""
    V = data.draw(st.integers(2, 12))
    B = data.draw(st.integers(1, 3))
    value = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                      st.sampled_from([3e38, -3e38, 1e20, -1e20, 0.0, -INF, INF, NAN]))
    lg = torch.tensor(data.draw(st.lists(st.lists(value, min_size=V, max_size=V), min_size=B, max_size=B)),
                      dtype=torch.float32)
    params = [data.draw(_extreme_params()) for _ in range(B)]
    batch = SamplingBatch(params, prompt_token_ids=[[0, 1] * 20 + [0]] * B, vocab_size=V)
    _check_call(backend, lg, batch)


#: Ordinary requests that take the wide rows' own routes (candidates, packed rows, fused units).
_WIDE_ROW_REQUESTS = [dict(top_k=50, nsigma=1.0), dict(top_k=50, nsigma=1.0, sampler_priority=["top_k", "nsigma"]),
                      dict(top_k=200, top_p=0.9, min_p=0.02), dict(temperature=0.7, top_k=40),
                      dict(top_k=100, tfs=0.9, skew=0.5, xtc_threshold=0.1, xtc_probability=1.0, seed=1),
                      dict(nsigma=2.0), dict(min_p=0.05), dict(top_p=0.5, typical_p=0.9, eta_cutoff=3e-4),
                      dict(dynatemp_min=0.5, dynatemp_max=1.5, top_k=20, smoothing_factor=0.3)]


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.filterwarnings("error::RuntimeWarning")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_values_in_wide_rows(backend, data):
    """The same contract on rows wide enough for the CPU path's own routes (top_k's candidates,
    packed rows, the sums folded in torch's tree from 2**18 entries on, the fused units), whose
    numpy work must not warn either (under ``-W error`` a warning is an exception): rows of
    magnitudes up to ~1e38 with NaN, +-inf, +-3.4e38, runs of -inf and runs of ties."""
    V = data.draw(st.sampled_from([1024, 4096, 32000, 32000]))
    B = data.draw(st.sampled_from([1, 2, 5, 9, 12]))  # (9 x 32000 and more: the tree's sums)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    lg = torch.randn(B, V, generator=g) * data.draw(st.sampled_from([3.0, 1e4, 1e20, 1e37, 1e37]))
    for _ in range(data.draw(st.integers(0, 6))):
        r, c = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, V - 1))
        kind = data.draw(st.sampled_from(["nan", "inf", "-inf", "fmax", "-fmax", "-inf run", "tie run"]))
        if kind.endswith("run"):
            lg[r, c:c + data.draw(st.integers(1, V))] = -INF if kind == "-inf run" else float(lg[r, c])
        else:
            lg[r, c] = {"nan": NAN, "inf": INF, "-inf": -INF, "fmax": FMAX, "-fmax": -FMAX}[kind]
    params = [data.draw(_extreme_params()) if data.draw(st.booleans())
              else SamplingParams(**data.draw(st.sampled_from(_WIDE_ROW_REQUESTS))) for _ in range(B)]
    _check_call(backend, lg, SamplingBatch(params, prompt_token_ids=[[0, 1] * 20 + [0]] * B, vocab_size=V))


def _check_call(backend, lg, batch):
    rows_ok = (~torch.isnan(lg) & (lg > -INF)).any(-1).all()
    pipe = _pipe(backend)
    if not rows_ok:
        with pytest.raises(ValueError, match="no candidate"):
            pipe.process(lg, batch)
        return
    out = pipe.process(lg, batch)
    ident = batch.identity_rows
    assert not torch.isnan(out[~ident]).any() and not (out[~ident] == INF).any()
    s = pipe.sample(lg, batch)
    ref = pipe.process(lg, batch)
    chosen = ref.gather(1, s.token_ids[:, None])[:, 0]
    assert torch.isfinite(chosen[~ident]).all(), (out, s)
    assert not torch.isnan(s.logprobs).any() and (s.logprobs <= 0).all(), s


@st.composite
def _extreme_params(draw):
    kw = {}
    pick = st.sampled_from
    if draw(st.booleans()):
        kw["temperature"] = draw(pick([0.0, 1e-5, 2e-5, 0.5, 2.0, FMAX]))
    if draw(st.booleans()):
        kw["repetition_penalty"] = draw(pick([1.4e-45, 1e-30, 0.5, 2.0, 1e30, FMAX]))
    if draw(st.booleans()):
        kw["smoothing_factor"] = draw(pick([1e-3, 1.0, 1e18]))
        kw["smoothing_curve"] = draw(pick([1.0, 2.5, 3.0, 10.0, 1e18]))
    if draw(st.booleans()):
        kw["dynatemp_min"], kw["dynatemp_max"] = draw(pick([(0.0, FMAX), (1e-5, 2e-5), (0.5, 3e38)]))
        kw["dynatemp_exponent"] = draw(pick([1e-30, 1.0, FMAX]))
    if draw(st.booleans()):
        kw["dry_multiplier"] = draw(pick([1e-30, 0.8, FMAX]))
        kw["dry_base"] = draw(pick([1.0000001, 1.75, FMAX]))
        kw["dry_allowed_length"] = draw(pick([1, 2, 10**18]))
    if draw(st.booleans()):
        kw["nsigma"] = draw(pick([1e-30, 1.0, FMAX]))
    if draw(st.booleans()):
        kw["top_a"] = draw(pick([1e-30, 1.0, FMAX]))
    if draw(st.booleans()):
        kw["skew"] = draw(pick([-80.0, -1.0, 1.0, 80.0]))
    if draw(st.booleans()):
        kw.update(min_p=0.5, top_p=0.5, top_k=draw(pick([1, 2**62])), typical_p=0.5, tfs=0.5)
    if draw(st.booleans()):
        kw.update(xtc_threshold=0.0, xtc_probability=1.0, eta_cutoff=0.5, epsilon_cutoff=0.5)
    if draw(st.booleans()):
        kw["frequency_penalty"], kw["presence_penalty"] = -2.0, 2.0
    if draw(st.booleans()):
        order = draw(st.permutations(list(SamplerID)))
        kw["sampler_priority"] = order[: draw(st.integers(0, len(order)))]
    kw["seed"] = draw(st.integers(0, 2**32))
    if kw.get("temperature", 1.0) < 1e-5:
        kw.pop("seed")
    return SamplingParams(**kw)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels")
# The interpreter runs the kernels on numpy, which warns where a lane overflows or gives NaN
# (x - max on a row of -inf, d * d past 1.8e19) although tl.where then discards that lane; a
# GPU computes such lanes silently. The results are what this test checks.
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@FEW
@given(data=st.data())
def test_hostile_inputs_on_the_kernel_backend(data):
    """Items 1-6 on the kernel backend (few examples: the interpreter is slow)."""
    V = data.draw(st.integers(2, 8))
    value = st.sampled_from([3e38, -3e38, 1e20, -1e20, 0.0, 1.0, -INF, INF, NAN])
    lg = torch.tensor([data.draw(st.lists(value, min_size=V, max_size=V))], dtype=torch.float32)
    batch = SamplingBatch([data.draw(_extreme_params())], prompt_token_ids=[[0, 1] * 20 + [0]], vocab_size=V)
    _check_call("triton", lg, batch)


# ----------------------------------------------------------------------------- item 22
def test_per_row_orders_run_each_stage_on_its_rows():
    """Item 22: a batch of rows with different random orders equals each row processed alone,
    and each masked stage runs on its rows only (index per stage)."""
    rng = np.random.default_rng(0)
    every = dict(repetition_penalty=1.3, dry_multiplier=0.8, no_repeat_ngram_size=3, temperature=0.7, nsigma=2.0,
                 top_k=40, top_p=0.9, top_a=0.05, min_p=0.02, tfs=0.97, eta_cutoff=1e-3, epsilon_cutoff=1e-4,
                 typical_p=0.97, smoothing_factor=0.3, xtc_threshold=0.05, xtc_probability=0.5)
    params = [SamplingParams(**every, seed=b, sampler_priority=[int(s) for s in rng.permutation(14)])
              for b in range(6)]
    V = 64
    g = torch.Generator().manual_seed(1)
    lg = torch.randn(6, V, generator=g) * 3
    prompts = [rng.integers(0, 8, size=30).tolist() for _ in range(6)]
    batch = SamplingBatch(params, prompt_token_ids=prompts, vocab_size=V)
    assert all((idx is None) == (m is None) for (_, m), idx in zip(batch.schedule, batch.schedule_rows))
    assert sum(int(idx.numel()) for idx in batch.schedule_rows if idx is not None) == sum(
        len(o) for o in batch.orders)
    pipe = _pipe("torch")
    mixed = pipe.process(lg, batch)
    for b in range(6):
        alone = pipe.process(lg[b:b + 1], SamplingBatch([params[b]], prompt_token_ids=[prompts[b]], vocab_size=V))
        assert torch.equal(mixed[b], alone[0]), b


# ----------------------------------------------------------------------------- item 19, 21 (generate)
@pytest.fixture(scope="module")
def model_tok():
    from samplers.models import load_default

    return load_default()


def test_generate_with_no_prompt_and_bad_prompt_ids(model_tok):
    """Item 19: generate([]) returns []; float / out-of-vocabulary prompt ids are ValueErrors."""
    from samplers.generation import generate

    model, tok = model_tok
    assert generate(model, tok, []) == []
    assert list(generate(model, tok, [], stream=True)) == []
    for bad in ([1.5, 2], [[1, 2.5]], [["3"]], [10**30], [[True]]):
        with pytest.raises(ValueError, match="token id"):
            generate(model, tok, bad)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, tok, [[model.config.vocab_size + 5]])


def test_compiled_grammars_are_shared_between_runs(model_tok):
    """Item 21: a grammar is compiled once per tokenizer, not once per generate() call."""
    pytest.importorskip("xgrammar")
    from samplers.guided import GuidedDecoder

    model, tok = model_tok
    p = SamplingParams(guided_json={"type": "object", "properties": {"a": {"type": "integer"}}})
    first = GuidedDecoder(tok, model.config.vocab_size, [0])
    second = GuidedDecoder(tok, model.config.vocab_size, [0])
    assert first.compile(first.spec(p)) is second.compile(second.spec(p))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels")
@FEW
@given(data=st.data())
def test_backends_apply_one_nan_rule(data):
    """Item 6: NaN / -inf entries among ordinary logits: the kernel backend (which then runs,
    no overflow being possible) and the torch backend remove the same tokens and draw the same one."""
    V = data.draw(st.integers(4, 16))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    lg = torch.randn(2, V, generator=g) * 3
    holes = data.draw(st.lists(st.tuples(st.integers(0, 1), st.integers(1, V - 1), st.sampled_from([NAN, -INF])),
                               max_size=V))
    for r, c, v in holes:
        lg[r, c] = v
    params = [SamplingParams(temperature=data.draw(st.sampled_from([0.5, 1.0, 1.5])),
                             min_p=data.draw(st.sampled_from([0.0, 0.05])),
                             top_k=data.draw(st.sampled_from([0, 3])), seed=b) for b in range(2)]
    batch = SamplingBatch(params, vocab_size=V)
    assert not batch.may_overflow(float(lg[torch.isfinite(lg)].abs().max()))
    a, b = _pipe("torch").process(lg, batch), _pipe("triton").process(lg, batch)
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-5, atol=1e-5)
    rows = ~batch.identity_rows  # default rows come back bit-identical, NaN included
    assert not torch.isnan(a[rows]).any() and (a[rows][torch.isnan(lg[rows])] == -INF).all()
    ta, tb = _pipe("torch").sample(lg, batch), _pipe("triton").sample(lg, batch)
    assert torch.equal(ta.token_ids, tb.token_ids)


def test_only_hostile_calls_leave_the_kernel_backend():
    """The overflow bound that sends a call to the torch backend holds for ordinary inputs
    (every preset, logits up to 1e3) and trips for hostile magnitudes or parameters."""
    import test_pipeline as tp

    batch = tp._batch(tp.PRESETS + [SamplingParams(**tp.EVERYTHING)], seed=1)
    assert not batch.may_overflow(1e3)
    assert batch.may_overflow(3e38) and batch.may_overflow(INF)
    tiny_t = SamplingBatch([SamplingParams(temperature=2e-5, nsigma=1.0)], vocab_size=32000)
    assert not tiny_t.may_overflow(1e3) and tiny_t.may_overflow(1e30)
    assert SamplingBatch([SamplingParams(repetition_penalty=1e-30)], prompt_token_ids=[[1]],
                         vocab_size=8).may_overflow(1e10)


def test_the_overflow_route_takes_each_rows_own_parameters():
    """A near-greedy temperature with penalties on long histories, smoothing and nsigma, each
    in a row of its own, cannot overflow: the bound once multiplied the batch's extremes
    together, and such a batch (all three ordinary requests) ran on the torch backend as a
    whole, on CUDA too (from the parameters alone: absmax 0). The three in one row still
    route."""
    V, history = 32000, [list(range(4096))]
    kinds = [dict(temperature=1e-3, repetition_penalty=1.2), dict(smoothing_factor=0.3), dict(nsigma=1.0)]
    apart = SamplingBatch([SamplingParams(**kw) for kw in kinds], history * 3, vocab_size=V)
    together = SamplingBatch([SamplingParams(**{k: v for kw in kinds for k, v in kw.items()})], history, vocab_size=V)
    for absmax in (0.0, 30.0):
        assert not apart.may_overflow(absmax)
        assert together.may_overflow(absmax)


_ROUTE_PARAMS = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0.0, 2e-5, 1e-3, 0.5, 1.0, 2.0]),
    "dynatemp_min": st.sampled_from([1e-4, 0.1, 1.0]),
    "repetition_penalty": st.sampled_from([1e-30, 0.5, 1.0, 1.3, 1e30]),
    "frequency_penalty": st.sampled_from([0.0, 1.5]),
    "smoothing_factor": st.sampled_from([0.0, 0.3, 1e6, 1e18]),
    "smoothing_curve": st.sampled_from([1.0, 3.0, 1e18]),
    "nsigma": st.sampled_from([0.0, 1.0]),
    "logit_bias": st.sampled_from([None, {1: 100.0}]),
})


@HOSTILE
@given(st.lists(_ROUTE_PARAMS, min_size=1, max_size=5),
       st.sampled_from([0.0, 1.0, 30.0, 1e6, 1e19, 1e30, 3e38]), st.integers(1, 3000))
def test_a_call_may_overflow_exactly_when_one_of_its_rows_may(rows, absmax, length):
    """``may_overflow`` of a batch is the any() of its rows' alone (equal history lengths,
    which the bound reads batch-wide), for parameters across their ranges."""
    params = []
    for kw in rows:
        kw = dict(kw)
        if "dynatemp_min" in kw:
            kw["dynatemp_max"] = kw["dynatemp_min"] + 1.0
        params.append(SamplingParams(**kw))
    history = [list(range(length))]
    batch = SamplingBatch(params, history * len(params), vocab_size=32000)
    alone = [SamplingBatch([p], history, vocab_size=32000).may_overflow(absmax) for p in params]
    assert batch.may_overflow(absmax) == any(alone)


def test_input_rule_reads_nothing_on_the_host_off_the_cpu():
    """On an accelerator the input rule is skipped: reading the logits' range on the host
    would be a device sync every step (SEMANTICS.md, "Non-finite logits"). A meta tensor
    stands in for a device tensor; the tracer fails on any host read."""
    logits = torch.empty(2, 8, device="meta")
    with no_host_reads():
        x, absmax, finite = SamplerPipeline._prepare(logits)
    assert x is logits and absmax == 0.0 and not finite
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        SamplerPipeline._prepare(torch.zeros(2, 8))


def _v2_step_batch(rng: np.random.Generator, V: int = 40):
    """What Model Runner V2's ``apply`` builds each step: a parameter table (a neutral row,
    then DRY, no_repeat_ngram and both), a ``TokenHistory.from_tensors`` over per-slot token
    buffers (a loose host bound of the lengths, garbage past them, long repeats) and the
    table gathered by a row -> table-row map. Returns (batch, per-row histories as lists)."""
    table = SamplingBatch([SamplingParams(), SamplingParams(dry_multiplier=0.8, dry_allowed_length=2),
                           SamplingParams(no_repeat_ngram_size=3),
                           SamplingParams(dry_multiplier=1.2, no_repeat_ngram_size=2)], vocab_size=V)
    rows, width = 6, 80
    tokens = torch.from_numpy(rng.integers(0, V, size=(rows, width)))
    lengths = [70, 0, 1, 33, 64, 12]
    hists = []
    for r, n in enumerate(lengths):
        period = rng.integers(0, V, size=r % 3 + 1)
        h = np.resize(period, n) if r % 2 == 0 else rng.integers(0, 4, size=n)
        tokens[r, :n] = torch.from_numpy(h)
        hists.append(h.tolist())
    history = TokenHistory.from_tensors(tokens, torch.tensor(lengths), torch.tensor([5, 0, 1, 3, 64, 0]), V, width)
    return table.gather(torch.tensor([1, 2, 3, 0, 3, 1]), history), hists


def test_v2_step_match_lengths_reads_nothing_on_the_host(monkeypatch):
    """DRY and no_repeat_ngram ask for ``match_lengths`` of a history built every step on
    the V2 path: off the CPU it must not read anything back (docs/vllm.md: ``apply`` works
    without a host-device sync). Its off-CPU branch, forced on CPU tensors, runs under the
    tracer and agrees with the CPU branch; so does the catch-up after an append."""
    import samplers.history as history

    batch, hists = _v2_step_batch(np.random.default_rng(3))
    assert batch.enables(SamplerID.DRY) and batch.enables(SamplerID.NO_REPEAT_NGRAM)
    monkeypatch.setattr(history, "_FORCE_SYNC_FREE", True)
    with no_host_reads():
        match = batch.history.match_lengths().clone()
    assert int(match.max()) >= 16  # long repeats: the hashed search ran
    batch.history.append(torch.tensor([1, 2, 3, 4, 5, 6]))
    with no_host_reads():
        caught_up = batch.history.match_lengths().clone()
    monkeypatch.setattr(history, "_FORCE_SYNC_FREE", False)
    _, hists2 = _v2_step_batch(np.random.default_rng(3))
    fresh = TokenHistory(hists2, [[] for _ in hists2], vocab_size=40)
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        fresh.match_lengths()  # the CPU branch lists the long matches on the host
    w = max(len(h) for h in hists)
    assert torch.equal(match[:, :w], fresh.match_lengths()[:, :w])
    fresh.append(torch.tensor([1, 2, 3, 4, 5, 6]))
    assert torch.equal(caught_up[:, : w + 1], fresh.match_lengths()[:, : w + 1])


def test_match_lengths_on_a_meta_device():
    """A meta tensor has no values: the off-CPU build and catch-up run on it only if
    nothing in them depends on a value read back (shapes come from the host)."""
    tokens = torch.empty(3, 40, dtype=torch.int64, device="meta")
    lengths = torch.empty(3, dtype=torch.int64, device="meta")
    th = TokenHistory.from_tensors(tokens, lengths, lengths, 50, 40)
    with no_host_reads():
        assert th.match_lengths().shape == (3, th.capacity)
        th.append(torch.empty(3, dtype=torch.int64, device="meta"))
        assert th.match_lengths().shape == (3, th.capacity)


def test_merge_on_the_device_branch_reads_nothing_back(monkeypatch):
    """``TokenHistory.merge`` (vLLM's V2 processor stitching new rows into carried ones) on
    the branch it takes off the CPU: building the state a history lacks, bringing match
    tables up to date and copying the rows read nothing back, and the result equals the
    rows merged on the CPU's branch."""
    import samplers.history as history

    rng = np.random.default_rng(8)
    V = 32

    def pair():
        carried = TokenHistory([rng.integers(0, 5, size=n).tolist() for n in (40, 3, 18)],
                               [[1, 2], [], [4]], vocab_size=V)
        carried.output_counts(), carried.seen_mask(), carried.prefix_hashes(), carried.match_lengths()
        carried.append(torch.tensor([1, 2, 3]))  # a step the match table has not taken in yet
        tok = torch.tensor(rng.integers(0, 5, size=(2, 70)))
        fresh = TokenHistory.from_tensors(tok, torch.tensor([70, 9]), torch.tensor([60, 9]), V, 70)
        return carried, fresh

    source, rows = np.array([0, 1, 0, 1]), np.array([2, 0, 0, 1])
    state = rng.bit_generator.state
    expected = TokenHistory.merge(list(pair()), source, rows)
    rng.bit_generator.state = state
    monkeypatch.setattr(history, "_FORCE_SYNC_FREE", True)
    histories = pair()
    with no_host_reads():
        merged = TokenHistory.merge(list(histories), source, rows)
    # (the mask is on the host, as the processor passes it: `append` reads it there)
    merged.append(torch.tensor([3, 3, 3, 3]), rows=torch.tensor([True, False, True, True]))
    with no_host_reads():
        merged.match_lengths()
    expected.append(torch.tensor([3, 3, 3, 3]), rows=torch.tensor([True, False, True, True]))
    assert merged.to_lists() == expected.to_lists()
    for get in ("output_counts", "seen_mask", "match_lengths", "prefix_hashes"):
        w = merged.max_length + 1
        assert torch.equal(getattr(merged, get)()[..., :w], getattr(expected, get)()[..., :w]), get


def test_select_with_host_rows_reads_nothing_back(monkeypatch):
    """``TokenHistory.select(rows, host_rows=...)`` indexes its host bookkeeping with the
    host indices (no read of ``rows``), and the pipeline's per-stage row subsets of a batch
    with per-row orders pass the host indices the schedule was built from."""
    V = 32
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 6, size=n).tolist() for n in (30, 0, 12, 25)]
    th = TokenHistory(prompts, [[1], [2, 2], [], [3]], vocab_size=V)
    th.output_counts(), th.seen_mask(), th.seen_ids(), th.prefix_hashes(), th.match_lengths()
    rows, host = torch.tensor([3, 0, 2]), np.array([3, 0, 2])
    with no_host_reads():
        sub = th.select(rows, host_rows=host)
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        th.select(rows)  # without them the indices are read back
    ref = th.select([3, 0, 2])
    assert sub.max_length == ref.max_length and sub.to_lists() == ref.to_lists()
    assert torch.equal(sub.seen_ids(), ref.seen_ids()) and torch.equal(sub.match_lengths(), ref.match_lengths())
    with pytest.raises(ValueError, match="host_rows"):
        th.select(rows, host_rows=[3, 0])

    # The pipeline: every stage of some rows selects them with their host indices.
    every = dict(repetition_penalty=1.3, dry_multiplier=0.8, no_repeat_ngram_size=3, temperature=0.7, min_p=0.02)
    params = [SamplingParams(**every, sampler_priority=[int(s) for s in rng.permutation(14)]) for _ in range(4)]
    batch = SamplingBatch(params, prompt_token_ids=prompts, vocab_size=V)
    assert any(idx is not None for idx in batch.schedule_rows)
    for idx, hidx in zip(batch.schedule_rows, batch.schedule_rows_host):
        assert (idx is None) == (hidx is None)
        assert idx is None or idx.tolist() == hidx.tolist()
    calls = []
    select = TokenHistory.select

    def spy(self, rows, host_rows=None):
        calls.append((rows.tolist(), None if host_rows is None else host_rows.tolist()))
        return select(self, rows, host_rows)

    monkeypatch.setattr(TokenHistory, "select", spy)
    lg = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    _pipe("torch").process(lg, batch)
    assert calls and all(r == h for r, h in calls)


# ----------------------------------------------------------------------------- the cheap bound
#: float32 magnitudes across the whole range: subnormal, tiny, ordinary, squares near and past
#: float32's limit (1.8e19), huge
_any_f32 = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-39, 1e-20, 1.1e-19, 1.0, 1e19, 1.8e19, 2e19, 1e30, FMAX, -FMAX]),
)


@HOSTILE
@given(st.data())
def test_finite_absmax_bound_is_an_upper_bound_or_none(data):
    """``finite_absmax_bound`` (the pipeline's input check): None whenever an entry is NaN or
    +-inf; otherwise, when it gives a number, at least the exact largest magnitude; and it
    gives one whenever the squares cannot overflow (checked in float64)."""
    from samplers.functional._stats import finite_absmax_bound

    B = data.draw(st.integers(1, 4))
    V = data.draw(st.integers(1, 40))
    values = data.draw(st.lists(_any_f32, min_size=B * V, max_size=B * V))
    x = torch.tensor(values, dtype=torch.float32).view(B, V)
    if data.draw(st.booleans()):
        bad = data.draw(st.sampled_from([NAN, INF, -INF]))
        x[data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, V - 1))] = bad
    bound = finite_absmax_bound(x)
    exact = float(x.double().abs().max())
    if not torch.isfinite(x).all():
        assert bound is None
        return
    squares = (x.double() ** 2).sum(-1).max().item()
    if squares * 1.01 < FMAX:
        assert bound is not None
    if bound is not None:
        assert bound >= exact


def test_finite_absmax_bound_rejects_what_it_cannot_bound():
    """Layouts and dtypes outside its fast path, and rows too long for the error bound, get
    None (the caller's exact path), never a wrong number."""
    from samplers.functional._stats import finite_absmax_bound

    x = torch.full((3, 8), 2.0)
    assert finite_absmax_bound(x) is not None and finite_absmax_bound(x) >= 2.0
    assert finite_absmax_bound(x.t()) is None  # not contiguous
    assert finite_absmax_bound(x.half()) is None and finite_absmax_bound(x.double()) is None
    assert finite_absmax_bound(torch.ones(1, 2**22 + 1)) is None
    assert finite_absmax_bound(torch.zeros(0, 5)) == 0.0


def _input_rule_numpy(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The input rule (SEMANTICS.md, "Non-finite logits") in float64 numpy: NaN -> -inf,
    +inf -> the dtype's largest finite value (float32's for float64), finite float64 values
    saturated at float32's range."""
    top = min(float(torch.finfo(dtype).max), FMAX)
    out = np.where(np.isnan(values), -INF, values)
    out = np.where(out == INF, top, out)
    return np.where(np.isfinite(out), np.clip(out, -FMAX, FMAX), out)


@HOSTILE
@given(st.data())
def test_input_rule_on_rows_with_removed_tokens(data):
    """``_prepare`` on logits whose rows hold ``-inf`` (removed tokens: a grammar's mask, a
    banned EOS), and sometimes NaN or ``+inf``: the logits the rule gives (against a numpy
    re-implementation), the input itself (no copy) when ``-inf`` is the only non-finite value,
    a bound that is the exact largest finite magnitude, and a ValueError naming the rows left
    without a finite logit."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    B, V = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 24))
    big = float(torch.finfo(dtype).max) if dtype != torch.float64 else 1e300
    finite = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, -0.0, 65504.0, -big, big, 3e38, -3e38]))
    # (NaN and +inf in some calls only: the path for rows whose only non-finite value is -inf
    # needs calls without them)
    kinds = st.sampled_from(["finite"] * 4 + ["-inf"] * 3 + (["nan", "+inf"] if data.draw(st.booleans()) else []))
    values = np.empty((B, V))
    for i in range(B * V):
        kind = data.draw(kinds)
        values.flat[i] = {"-inf": -INF, "nan": NAN, "+inf": INF}.get(kind, None) or data.draw(finite)
    logits = torch.tensor(values).to(dtype)
    as_given = logits.double().numpy()
    expected = _input_rule_numpy(as_given, dtype)
    empty = [r for r in range(B) if not np.isfinite(expected[r]).any()]
    if empty:
        with pytest.raises(ValueError, match=re.escape(f"row(s) {empty[:10]}")):
            SamplerPipeline._prepare(logits)
        return
    x, absmax, finite = SamplerPipeline._prepare(logits)
    got = x.double().numpy()
    assert x.dtype == dtype and np.array_equal(got, expected.astype(np.float64))
    if finite:  # (the chain relies on it: no search for removed tokens)
        assert np.isfinite(got).all()
    elif np.isfinite(as_given).all() and np.abs(as_given).max() <= FMAX:
        raise AssertionError("finite logits within float32's range not proved finite")
    if not np.isnan(as_given).any() and not (as_given == INF).any() and np.abs(as_given[np.isfinite(as_given)]).max() <= FMAX:
        assert x is logits
    assert absmax >= np.abs(got[np.isfinite(got)]).max()
    if x is logits and not np.isfinite(as_given).all():
        assert absmax == np.abs(got[np.isfinite(got)]).max()  # the removed-only path is exact


def test_a_loose_bound_is_checked_against_the_exact_magnitude():
    """The pipeline's input check bounds |logit| by sqrt(2 * sum of squares), which can exceed
    the largest logit V-fold: when that loose bound alone would send a call to the torch
    backend, the exact magnitude decides, so the backend chosen is the one the exact bound
    gives. T = 2e-5 with nsigma overflows from |logit| ~ 1e12 on (V = 32000)."""
    from samplers.pipeline import _may_overflow, _torch_chain_no_overflow, torch_chain

    batch = SamplingBatch([SamplingParams(temperature=2e-5, nsigma=1.0)], vocab_size=32000)
    logits = torch.full((1, 32000), 5e11)
    x, bound, _ = SamplerPipeline._prepare(logits)
    assert bound > 1e14 and batch.may_overflow(bound)  # the loose bound alone says "may overflow"
    assert not _may_overflow(batch, x, bound)  # the exact 5e11 does not
    assert SamplerPipeline("torch")._chain(x, batch, bound) is _torch_chain_no_overflow
    huge = torch.full((1, 32000), 5e12)
    x, bound, _ = SamplerPipeline._prepare(huge)
    assert _may_overflow(batch, x, bound)
    assert SamplerPipeline("torch")._chain(x, batch, bound) is torch_chain


def test_processing_without_random_numbers_leaves_the_generator_alone():
    """Keys for unseeded rows are drawn on first use: ``process`` of a chain without XTC uses
    no random number and does not advance the pipeline's generator; with XTC it does."""
    pipe = SamplerPipeline("torch", seed=3)
    logits = torch.randn(2, 50)
    state = pipe.generator.get_state()
    pipe.process(logits, SamplingBatch([SamplingParams(temperature=0.7, top_k=5)] * 2, vocab_size=50))
    assert torch.equal(pipe.generator.get_state(), state)
    pipe.process(logits, SamplingBatch([SamplingParams(xtc_threshold=0.1, xtc_probability=0.5)] * 2, vocab_size=50))
    assert not torch.equal(pipe.generator.get_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_empty_results(backend):
    """A step with no rows (every sequence finished, or none of an engine's requests ours):
    ``[0, V]`` logits give ``[0, V]`` processed logits and ``[0]`` tokens and log-probabilities,
    whether the batch was built empty or selected / gathered empty from a full one; it takes
    ``append`` of no tokens; its shape is still checked."""
    import test_pipeline as tp

    V = tp.V
    full = tp._batch([SamplingParams(**tp.EVERYTHING, logprobs=3)] * 2, seed=1)
    pipe = SamplerPipeline(backend, seed=0)
    logits = torch.randn(0, V, dtype=torch.bfloat16)
    for batch in (SamplingBatch([], vocab_size=V), SamplingBatch(SamplingParams(top_p=0.9), [], [], vocab_size=V),
                  full.select([]), full.gather(torch.empty(0, dtype=torch.int64), TokenHistory([], [], V))):
        assert batch.batch_size == 0 and batch.param("top_p").shape == (0,)
        out = pipe.process(logits, batch)
        assert out.shape == (0, V) and out.dtype == torch.bfloat16
        s = pipe.sample(logits, batch, return_processed=True)
        assert s.token_ids.shape == (0,) and s.token_ids.dtype == torch.int64
        assert s.logprobs.shape == (0,) and s.logprobs.dtype == torch.float32
        assert s.processed is not None and s.processed.shape == (0, V)
        batch.append(s.token_ids)
        assert pipe.sample(logits, batch).token_ids.shape == (0,)
        with pytest.raises(ValueError, match=r"logits have shape \[1, 64\] but the batch has 0 rows"):
            pipe.process(torch.randn(1, V), batch)
    assert not SamplingBatch([], vocab_size=V).may_overflow(1e30)  # (no row, no bound)
    with pytest.raises(ValueError, match="params must be a list of SamplingParams"):
        SamplingBatch([SamplingParams(), {"top_p": 0.9}], vocab_size=V)
    # the full batch is untouched by its empty selections
    assert pipe.sample(torch.randn(2, V), full).token_ids.shape == (2,)
