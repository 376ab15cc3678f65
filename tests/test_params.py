"""SamplingParams: defaults, validation of every range in SEMANTICS.md, from_dict."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from samplers import SamplerID, SamplingParams
from samplers.priority import DEFAULT_ORDER, resolve_order

# A copy of the API documentation's full example request (shared/examples/arli_full_request.json).
EXAMPLE = Path(__file__).resolve().parent / "data" / "arli_full_request.json"


def test_defaults_enable_nothing():
    p = SamplingParams()
    assert p.enabled_samplers() == frozenset()
    assert p.enabled_order() == ()
    assert p.order == DEFAULT_ORDER
    assert not p.is_greedy


# (parameter, a rejected value, a fragment the message must contain)
REJECTED = [
    ("repetition_penalty", 0.0, "(0, inf)"),
    ("repetition_penalty", -1.0, "(0, inf)"),
    ("frequency_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -2.01, "[-2, 2]"),
    ("presence_penalty", 3, "[-2, 2]"),
    ("presence_penalty", -2.5, "[-2, 2]"),
    ("no_repeat_ngram_size", -1, "[0, 2**63 - 1]"),
    ("no_repeat_ngram_size", 1.5, "integer"),
    ("min_tokens", -1, "[0, 2**63 - 1]"),
    ("dry_multiplier", -0.1, "[0, inf)"),
    ("dry_base", 1.0, "(1, inf)"),
    ("dry_base", 0.5, "(1, inf)"),
    ("dry_allowed_length", 0, "[1, 2**63 - 1]"),
    ("dry_range", -5, "[0, 2**63 - 1]"),
    ("dry_sequence_breaker_ids", [1, -2], "token ids in [0, 2**63 - 1]"),
    ("dry_sequence_breaker_ids", "abc", "list of token ids"),
    ("temperature", -0.1, "[0, inf)"),
    ("dynatemp_min", -1.0, "[0, inf)"),
    ("dynatemp_max", -1.0, "[0, inf)"),
    ("dynatemp_exponent", 0.0, "(0, inf)"),
    ("smoothing_factor", -1.0, "[0, 1e+18]"),
    ("smoothing_curve", 0.5, "[1, 1e+18]"),
    ("top_k", -2, "[-1, 2**63 - 1] (-1 or 0: off)"),
    ("top_k", 2.5, "integer"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_a", -0.5, "[0, inf)"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("tfs", 0.0, "(0, 1]"),
    ("tfs", 1.2, "(0, 1]"),
    ("eta_cutoff", 1.0, "[0, 1)"),
    ("eta_cutoff", 3.0, "units of 1e-4"),
    ("eta_cutoff", -0.1, "[0, 1)"),
    ("epsilon_cutoff", 1.0, "[0, 1)"),
    ("epsilon_cutoff", -1e-4, "[0, 1)"),
    ("typical_p", 0.0, "(0, 1]"),
    ("typical_p", 1.5, "(0, 1]"),
    ("nsigma", -1.0, "[0, inf)"),
    ("xtc_threshold", 1.5, "[0, 1]"),
    ("xtc_threshold", -0.1, "[0, 1]"),
    ("xtc_probability", 1.5, "[0, 1]"),
    ("xtc_probability", -0.5, "[0, 1]"),
    ("skew", float("inf"), "finite"),
    ("sampler_priority", [0, 0], "listed twice"),
    ("sampler_priority", [14], "unknown sampler id"),
    ("sampler_priority", ["NOT_A_SAMPLER"], "unknown sampler name"),
    ("sampler_priority", "0,1", "list"),
    ("seed", 2**64, "seed"),
    ("seed", 1.5, "integer"),
    ("n", 0, "[1, 128]"),
    ("n", 129, "[1, 128]"),
    ("n", 10**18, "[1, 128]"),
    ("logprobs", -1, "[0, 2**63 - 1]"),
    ("prompt_logprobs", -1, "[0, 2**63 - 1]"),
    ("logprobs_mode", "sideways", "logprobs_mode"),
    ("max_tokens", 0, "[1, 2**63 - 1]"),
    ("stop", [""], "empty string"),
    ("stop", [3], "strings"),
    ("stop_token_ids", [-1], "token ids in [0, 2**63 - 1]"),
    ("ignore_eos", "yes", "true or false"),
    ("include_stop_str_in_output", 1, "true or false"),
    ("truncate_prompt_tokens", 0, "[1, 2**63 - 1]"),
    ("logits_processors", ["not callable"], "callables"),
    ("logit_bias", {5: 150.0}, "[-100, 100]"),
    ("logit_bias", {-3: 1.0}, "token ids in [0, 2**63 - 1]"),
    # beyond int64: the parameter's own interval, not int64's
    ("logit_bias", {2**70: 1.0}, "token ids in [0, 2**63 - 1]"),
    ("top_k", 2**70, "[-1, 2**63 - 1] (-1 or 0: off)"),
    ("max_tokens", 10**30, "[1, 2**63 - 1]"),
    ("no_repeat_ngram_size", -(2**70), "[0, 2**63 - 1]"),
    # a value that rounds out of its interval in float32: the interval is stated
    ("repetition_penalty", 1e-50, "(0, inf) also as a float32: 1e-50 rounds to 0.0"),
    ("logit_bias", {"abc": 1.0}, "token ids"),
    ("logit_bias", [1, 2], "mapping"),
    ("guided_json", "{not json", "guided_json"),
    ("guided_json", 5, "guided_json"),
    ("guided_regex", 5, "guided_regex"),
    ("guided_choice", "Yes", "guided_choice"),
    ("length_penalty", "long", "length_penalty"),
    ("early_stopping", "no", "early_stopping"),
    ("temperature", float("nan"), "finite"),
    ("min_p", True, "number"),
]


@pytest.mark.parametrize("name,value,fragment", REJECTED)
def test_out_of_range_is_a_clear_error(name, value, fragment):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert name in message
    assert fragment in message


@pytest.mark.parametrize("field", sorted(SamplingParams.field_names() - {"logits_processors"}))
def test_every_field_has_a_rejection_case_or_is_free(field):
    """Guard against adding a field without a validation test (free-form fields listed)."""
    free = {"detokenize", "skip_special_tokens", "spaces_between_special_tokens", "temperature_last",
            "guided_decoding_backend", "guided_whitespace_pattern"}
    assert field in free or field in {name for name, _, _ in REJECTED}


def test_cross_field_rules():
    with pytest.raises(ValueError, match="min_tokens .* max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="dynatemp_min .* dynatemp_max"):
        SamplingParams(dynatemp_min=2.0, dynatemp_max=1.0)
    with pytest.raises(ValueError, match="n must be 1 for greedy"):
        SamplingParams(temperature=0.0, n=2)
    SamplingParams(min_tokens=10, max_tokens=None)  # no max: fine


def test_accepted_edges():
    SamplingParams(top_p=1.0, min_p=1.0, tfs=1.0, typical_p=1.0, xtc_threshold=1.0, xtc_probability=1.0)
    SamplingParams(repetition_penalty=0.5)  # accepted > 0, as Aphrodite does
    SamplingParams(frequency_penalty=-2, presence_penalty=2)
    SamplingParams(top_a=5.0, nsigma=10.0, skew=-3.0, seed=-5, logprobs=0)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=40.0).top_k == 40  # integral float from JSON


def test_normalisation():
    p = SamplingParams(stop="###", logit_bias={"7": 2.5}, sampler_priority=["min_p", 5, "XTC"],
                       dry_sequence_breaker_ids=[1, 2], guided_choice=["a", "b"])
    assert p.stop == ("###",)
    assert p.logit_bias == {7: 2.5}
    assert p.sampler_priority == (SamplerID.MIN_P, SamplerID.TEMPERATURE, SamplerID.XTC)
    assert p.dry_sequence_breaker_ids == (1, 2)
    assert p.guided_choice == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


def test_full_example_request_parses():
    body = json.loads(EXAMPLE.read_text())
    p = SamplingParams.from_dict(body)
    assert p.temperature == 0.7 and p.top_k == 40 and p.top_p == 0.9 and p.min_tokens == 20
    assert p.seed == 0 and p.logprobs == 5 and p.no_repeat_ngram_size == 2 and p.nsigma == 1.5
    assert p.dry_multiplier == 1.0 and p.dry_range == 50 and p.eta_cutoff == 1e-4
    assert p.guided_regex == "^\\w+$" and p.guided_choice == ("Yes", "No", "Maybe")
    assert p.sampler_priority == ()
    assert p.enabled_order() == (
        SamplerID.DRY, SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM, SamplerID.TEMPERATURE,
        SamplerID.TOP_NSIGMA, SamplerID.TOP_P_TOP_K, SamplerID.ETA_CUTOFF, SamplerID.EPSILON_CUTOFF,
    )
    # round trip through to_dict
    assert SamplingParams.from_dict(p.to_dict()) == p


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="'top_q'"):
        SamplingParams.from_dict({"temperature": 1.0, "top_q": 0.5})
    with pytest.raises(ValueError, match="JSON object"):
        SamplingParams.from_dict([1, 2])  # type: ignore[arg-type]
    # serving-level keys are ignored, null means default
    p = SamplingParams.from_dict({"model": "x", "stream": True, "messages": [], "top_p": None})
    assert p == SamplingParams()
    # a typo names the closest known parameter; an OpenAI-only field is unknown here
    with pytest.raises(ValueError, match="'temprature' \\(did you mean 'temperature'\\?\\)"):
        SamplingParams.from_dict({"temprature": 0.7})
    with pytest.raises(ValueError, match="'user'"):
        SamplingParams.from_dict({"user": "x"})


def test_max_tokens_null_is_no_limit_and_round_trips():
    """OpenAI's and vLLM's null max_tokens is "no limit", not the default of 16: a min_tokens
    above 16 is then valid, and to_dict / from_dict round-trips max_tokens=None."""
    p = SamplingParams.from_dict({"max_tokens": None, "min_tokens": 20})
    assert p.max_tokens is None and p.min_tokens == 20
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({}).max_tokens == 16
    with pytest.raises(ValueError, match=r"min_tokens \(20\) must be <= max_tokens \(16\); max_tokens defaults "
                                         r"to 16, max_tokens=None is no limit"):
        SamplingParams(min_tokens=20)
    with pytest.raises(ValueError, match=r"min_tokens \(20\) must be <= max_tokens \(17\)$"):
        SamplingParams(min_tokens=20, max_tokens=17)


def test_enabled_samplers_each():
    cases = {
        SamplerID.PENALTIES: dict(repetition_penalty=1.1),
        SamplerID.DRY: dict(dry_multiplier=0.8),
        SamplerID.NO_REPEAT_NGRAM: dict(no_repeat_ngram_size=3),
        SamplerID.TEMPERATURE: dict(temperature=0.5),
        SamplerID.TOP_NSIGMA: dict(nsigma=1.0),
        SamplerID.TOP_P_TOP_K: dict(top_k=5),
        SamplerID.TOP_A: dict(top_a=0.2),
        SamplerID.MIN_P: dict(min_p=0.1),
        SamplerID.TFS: dict(tfs=0.9),
        SamplerID.ETA_CUTOFF: dict(eta_cutoff=1e-3),
        SamplerID.EPSILON_CUTOFF: dict(epsilon_cutoff=1e-3),
        SamplerID.TYPICAL_P: dict(typical_p=0.9),
        SamplerID.QUADRATIC: dict(smoothing_factor=0.3),
        SamplerID.XTC: dict(xtc_probability=0.5),
    }
    assert set(cases) == set(SamplerID)
    for sid, kwargs in cases.items():
        assert SamplingParams(**kwargs).enabled_samplers() == {sid}
    assert SamplingParams(top_p=0.5).enabled_samplers() == {SamplerID.TOP_P_TOP_K}
    assert SamplingParams(dynatemp_min=0.5, dynatemp_max=1.5).enabled_samplers() == {SamplerID.TEMPERATURE}
    # greedy rows never scale by temperature
    assert SamplingParams(temperature=0.0).enabled_samplers() == frozenset()


def test_priority_resolution():
    assert resolve_order((), temperature_last=True)[-1] == SamplerID.TEMPERATURE
    order = resolve_order((SamplerID.MIN_P, SamplerID.TEMPERATURE))
    assert order[:2] == (SamplerID.MIN_P, SamplerID.TEMPERATURE)
    assert sorted(order) == sorted(SamplerID) and len(order) == len(SamplerID)
    # sampler_priority wins over temperature_last when it lists temperature
    p = SamplingParams(sampler_priority=[5], temperature_last=True, temperature=0.5, min_p=0.1)
    assert p.enabled_order() == (SamplerID.TEMPERATURE, SamplerID.MIN_P)
    # ... and temperature_last still orders the rest when it does not
    p = SamplingParams(sampler_priority=["xtc"], temperature_last=True, temperature=0.5, min_p=0.1,
                       xtc_probability=0.5)
    assert p.enabled_order() == (SamplerID.XTC, SamplerID.MIN_P, SamplerID.TEMPERATURE)
    assert math.isclose(p.temperature, 0.5)
