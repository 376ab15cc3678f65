"""The functional API's parameters: Python numbers or [B] tensors, and a value outside the
parameter's interval (SEMANTICS.md) is a ValueError naming the parameter, the value and the
interval, for numbers and tensors alike. Inside the pipeline, whose SamplingParams were
checked when built, the intervals are not checked again (no read of the parameter tensors)."""

from __future__ import annotations

import pytest
import torch

import samplers.functional as F
from samplers import SamplerPipeline, SamplingBatch, SamplingParams
from samplers.functional import _stats
from samplers.history import TokenHistory

B, V = 2, 50
X = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3
HISTORY = TokenHistory([[1, 2, 3, 1, 2], [4, 5, 4, 5]], [[3], [4]], vocab_size=V)
NO_BREAKERS = torch.empty(B, 0, dtype=torch.int64)


def _call(name: str, value):
    """Call the sampler whose parameter is ``name`` with ``value`` and neutral others."""
    seen, counts = HISTORY.seen_mask(), HISTORY.output_counts()
    calls = {
        "temperature": lambda v: F.temperature(X, v),
        "dynatemp_min": lambda v: F.dynamic_temperature(X, v, 1.0, 1.0),
        "dynatemp_max": lambda v: F.dynamic_temperature(X, 0.5, v, 1.0),
        "dynatemp_exponent": lambda v: F.dynamic_temperature(X, 0.5, 1.0, v),
        "smoothing_factor": lambda v: F.quadratic_smoothing(X, v, 1.0),
        "smoothing_curve": lambda v: F.quadratic_smoothing(X, 0.5, v),
        "top_p": lambda v: F.top_p(X, v),
        "top_a": lambda v: F.top_a(X, v),
        "min_p": lambda v: F.min_p(X, v),
        "tfs": lambda v: F.tfs(X, v),
        "eta_cutoff": lambda v: F.eta_cutoff(X, v),
        "epsilon_cutoff": lambda v: F.epsilon_cutoff(X, v),
        "typical_p": lambda v: F.typical_p(X, v),
        "nsigma": lambda v: F.nsigma(X, v),
        "xtc_threshold": lambda v: F.xtc(X, v, 0.5, 0.1),
        "xtc_probability": lambda v: F.xtc(X, 0.1, v, 0.1),
        "coin": lambda v: F.xtc(X, 0.1, 0.5, v),
        "skew": lambda v: F.skew(X, v),
        "repetition_penalty": lambda v: F.penalties(X, seen, counts, v, 0.0, 0.0),
        "frequency_penalty": lambda v: F.penalties(X, seen, counts, 1.0, v, 0.0),
        "presence_penalty": lambda v: F.penalties(X, seen, counts, 1.0, 0.0, v),
        "dry_multiplier": lambda v: F.dry(X, HISTORY, v, 1.75, 2, 0, NO_BREAKERS),
        "dry_base": lambda v: F.dry(X, HISTORY, 0.8, v, 2, 0, NO_BREAKERS),
        "dry_allowed_length": lambda v: F.dry(X, HISTORY, 0.8, 1.75, v, 0, NO_BREAKERS),
        "dry_range": lambda v: F.dry(X, HISTORY, 0.8, 1.75, 2, v, NO_BREAKERS),
        "no_repeat_ngram_size": lambda v: F.no_repeat_ngram(X, HISTORY, v),
    }
    return calls[name](value)


REJECTED = [
    ("temperature", -0.5, "[0, inf)"),
    ("temperature", float("inf"), "[0, inf)"),
    ("dynatemp_min", -1.0, "[0, inf)"),
    ("dynatemp_max", float("nan"), "[0, inf)"),
    ("dynatemp_exponent", 0.0, "(0, inf)"),
    ("smoothing_factor", -0.1, "[0, 1e+18]"),
    ("smoothing_curve", 0.5, "[1, 1e+18]"),
    ("top_p", 0.0, "(0, inf)"),
    ("top_a", -0.2, "[0, inf)"),
    ("min_p", 1.5, "[0, 1]"),
    ("tfs", 0.0, "(0, inf)"),
    ("eta_cutoff", 1.0, "[0, 1)"),
    ("epsilon_cutoff", -1e-4, "[0, 1)"),
    ("typical_p", -0.5, "(0, inf)"),
    ("nsigma", -1.0, "[0, inf)"),
    ("xtc_threshold", 1.5, "[0, 1]"),
    ("xtc_probability", -0.1, "[0, 1]"),
    ("coin", 1.5, "[0, 1]"),
    ("skew", 81.0, "[-80, 80]"),
    ("repetition_penalty", 0.0, "(0, inf)"),
    ("frequency_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -3.0, "[-2, 2]"),
    ("dry_multiplier", -0.5, "[0, inf)"),
    ("dry_base", 1.0, "(1, inf)"),
    ("dry_allowed_length", 0, "[1, inf)"),
    ("dry_range", -1, "[0, inf)"),
    ("no_repeat_ngram_size", -2, "[0, inf)"),
]


@pytest.mark.parametrize("name,value,interval", REJECTED)
@pytest.mark.parametrize("form", ["number", "tensor"])
def test_a_value_outside_the_interval_is_a_clear_error(name, value, interval, form):
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    given = value
    if form == "tensor":
        # (row 0 holds a valid value: the message names the offending one)
        ok = {"dynatemp_exponent": 1.0, "smoothing_curve": 1.0, "dry_base": 1.75, "dry_allowed_length": 2,
              "repetition_penalty": 1.0, "top_p": 1.0, "tfs": 1.0, "typical_p": 1.0}.get(name, 0)
        given = torch.tensor([ok, value], dtype=dtype)
    with pytest.raises(ValueError) as info:
        _call(name, given)
    message = str(info.value)
    assert message.startswith(f"{name} must be in {interval}, got "), message


@pytest.mark.parametrize("name", sorted({name for name, _, _ in REJECTED}))
def test_numbers_and_tensors_give_the_same_result(name):
    """Every parameter may be a Python number (broadcast to the rows): the history samplers'
    too (they once took tensors only and failed with an AttributeError on a number)."""
    value = {"dynatemp_min": 0.5, "dynatemp_max": 1.5, "dynatemp_exponent": 2.0, "smoothing_factor": 0.5,
             "smoothing_curve": 2.0, "top_p": 0.8, "top_a": 0.2, "min_p": 0.1, "tfs": 0.9, "eta_cutoff": 0.01,
             "epsilon_cutoff": 0.01, "typical_p": 0.9, "nsigma": 1.0, "xtc_threshold": 0.05,
             "xtc_probability": 0.5, "coin": 0.1, "skew": 0.5, "repetition_penalty": 1.3,
             "frequency_penalty": 0.4, "presence_penalty": 0.4, "dry_multiplier": 0.8, "dry_base": 1.5,
             "dry_allowed_length": 1, "dry_range": 3, "no_repeat_ngram_size": 2, "temperature": 0.7}[name]
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    by_number = _call(name, value)
    by_tensor = _call(name, torch.full((B,), value, dtype=dtype))
    assert torch.equal(by_number, by_tensor)


def test_the_pipeline_does_not_check_its_validated_parameters_again(monkeypatch):
    checks = []
    real = _stats._check_interval
    monkeypatch.setattr(_stats, "_check_interval", lambda *a, **k: (checks.append(a[1]), real(*a, **k))[1])
    F.min_p(X, 0.1)
    assert checks == ["min_p"]
    params = SamplingParams(temperature=0.7, min_p=0.1, top_p=0.9, dry_multiplier=0.8, repetition_penalty=1.2,
                            no_repeat_ngram_size=2, skew=0.5, xtc_probability=0.5, seed=1)
    batch = SamplingBatch([params] * B, [[1, 2, 3, 1, 2], [4, 5, 4, 5]], [[3], [4]], vocab_size=V)
    pipe = SamplerPipeline("torch", seed=0)
    pipe.process(X, batch)
    pipe.sample(X, batch)
    assert checks == ["min_p"]


def test_numbers_past_the_tensor_dtype_are_clear_errors():
    """A float beyond float32 (inf once held) and an integer beyond int64: ValueErrors naming
    the parameter and the value as given, not torch's overflow errors."""
    with pytest.raises(ValueError, match=r"^top_a must be in \[0, inf\), got 1e\+39$"):
        F.top_a(X, 1e39)
    with pytest.raises(ValueError, match=r"^top_k: 1000000000.* does not fit torch.int64$"):
        F.top_k(X, 10**400)
    with pytest.raises(ValueError, match=r"^no_repeat_ngram_size: .* does not fit torch.int64$"):
        F.no_repeat_ngram(X, HISTORY, 2**64)


@pytest.mark.parametrize("breakers,fragment", [
    (torch.tensor([[3.0], [4.0]]), "integer tensor"),  # (a float id would be truncated)
    (torch.tensor([[True], [False]]), "integer tensor"),
    ([[3], [4]], "got list"),
    (torch.zeros(B, 1, 1, dtype=torch.int64), f"expected shape [{B}, K]"),
    (torch.zeros(B + 1, 1, dtype=torch.int64), f"got ({B + 1}, 1)"),
])
def test_dry_breaker_ids_of_another_form_are_clear_errors(breakers, fragment):
    """Not a crash in ``reshape`` (a ``[K]`` tensor whose size B does not divide), nor ids
    silently read as ``[B, K / B]`` (each row getting another row's ids)."""
    with pytest.raises(ValueError, match="dry_sequence_breaker_ids") as err:
        F.dry(X, HISTORY, 0.8, 1.75, 2, 0, breakers)
    assert fragment in str(err.value)


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("ids", [[3], [4, 3], [2, 4, 5]])
def test_dry_breaker_ids_of_one_dimension_are_every_rows(ids, sync_free):
    """``[K]`` ids apply to every row: the result of ``[B, K]`` with those ids in each row,
    by both ways of finding the penalised positions (with K = B = 2 the ids were once read
    as one per row)."""
    x = X.clone()
    want = F.dry_(X.clone(), HISTORY, 0.8, 1.75, 1, 0, torch.tensor([ids] * B), sync_free=sync_free)
    got = F.dry_(x, HISTORY, 0.8, 1.75, 1, 0, torch.tensor(ids), sync_free=sync_free)
    assert torch.equal(got, want)
    assert not torch.equal(want, F.dry(X, HISTORY, 0.8, 1.75, 1, 0, NO_BREAKERS))  # (the ids matter here)


@pytest.mark.parametrize("call", ["dry", "no_repeat_ngram"])
@pytest.mark.parametrize("history,fragment", [
    (TokenHistory([[1, 2]] * (B + 1), [[]] * (B + 1), vocab_size=V), f"history has {B + 1} rows, the logits {B}"),
    (TokenHistory([[1, 2]] * B, [[]] * B, vocab_size=V + 1), f"exceeds the logits' {V} columns"),
    ([[1, 2]] * B, "history must be a TokenHistory, got list"),
])
def test_a_history_of_other_rows_is_a_clear_error(call, history, fragment):
    with pytest.raises(ValueError, match=call) as err:
        if call == "dry":
            F.dry(X, history, 0.8, 1.75, 2, 0, NO_BREAKERS)
        else:
            F.no_repeat_ngram(X, history, 2)
    assert fragment in str(err.value)


@pytest.mark.parametrize("value", ["0.5", None, object()])
@pytest.mark.parametrize("name", sorted({name for name, _, _ in REJECTED}))
def test_a_parameter_of_another_type_is_a_clear_error(name, value):
    with pytest.raises(ValueError, match=f"^{name}: expected a number or a tensor of shape \\[{B}\\], got "):
        _call(name, value)


_ROWS, _IDS = torch.tensor([0, 1]), torch.tensor([3, 7])


@pytest.mark.parametrize("call,fragment", [
    (lambda: F.logit_bias(X, torch.tensor([0, B]), _IDS, torch.ones(2)), f"rows must be in [0, {B}), got {B}"),
    (lambda: F.logit_bias(X, _ROWS, torch.tensor([-1, 3]), torch.ones(2)), f"token_ids must be in [0, {V}), got -1"),
    (lambda: F.logit_bias(X, _ROWS, _IDS, torch.ones(3)), "rows, token_ids, bias must have one length"),
    (lambda: F.logit_bias(X, [0, 1], _IDS, torch.ones(2)), "rows must be a 1-D tensor, got list"),
    (lambda: F.logit_bias(X, _ROWS, _IDS, torch.ones(2, 1)), "bias must be a 1-D tensor, got shape (2, 1)"),
    (lambda: F.ban_tokens(X, _ROWS.float(), _IDS), "rows must be an integer tensor"),
    (lambda: F.ban_tokens(X, _ROWS, torch.tensor([3, V])), f"token_ids must be in [0, {V}), got {V}"),
    (lambda: F.min_tokens(X, torch.zeros(B + 1, dtype=torch.long), torch.ones(B, dtype=torch.long), _ROWS, _IDS),
     f"output_lengths: expected a tensor of shape [{B}]"),
    (lambda: F.min_tokens(X, torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long), _ROWS,
                          torch.tensor([3, V + 5])), f"token_ids must be in [0, {V}), got {V + 5}"),
])
def test_entry_lists_that_index_past_the_logits_are_clear_errors(call, fragment):
    """(Before: IndexError, RuntimeError or AttributeError from inside torch.)"""
    with pytest.raises(ValueError) as err:
        call()
    assert fragment in str(err.value)


def test_the_pipeline_does_not_read_its_entry_lists(monkeypatch):
    """Inside ``trusted_params()`` the entries' range is not read (a device sync off the CPU):
    the pipeline's lists come from validated parameters; their form is still checked."""
    def no_read(*args, **kwargs):
        raise AssertionError("the entries were read")

    monkeypatch.setattr(torch, "aminmax", no_read)
    with _stats.trusted_params():
        F.logit_bias(X, _ROWS, _IDS, torch.ones(2))
        with pytest.raises(ValueError, match="one length"):
            F.ban_tokens(X, _ROWS, torch.tensor([3]))
    with pytest.raises(AssertionError, match="were read"):
        F.ban_tokens(X, _ROWS, _IDS)


@pytest.mark.parametrize("call", [
    lambda x: F.penalties(x, torch.zeros(B, V, dtype=torch.bool), torch.zeros(B, V, dtype=torch.int32), 1.2, 0.0, 0.0),
    lambda x: F.dry(x, HISTORY, 0.8, 1.75, 2, 0, NO_BREAKERS),
    lambda x: F.no_repeat_ngram(x, HISTORY, 2),
    lambda x: F.logit_bias(x, _ROWS, _IDS, torch.ones(2)),
])
@pytest.mark.parametrize("logits", [torch.ones(B, V, dtype=torch.int64), torch.ones(V), [[0.0] * V] * B])
def test_logits_that_are_not_float_rows_are_clear_errors(call, logits):
    with pytest.raises(ValueError, match="^logits: expected"):
        call(logits)
