"""``SamplingParams``: every parameter of the Arli AI / Aphrodite text-generation API.

Field names, defaults and ranges are those of SEMANTICS.md. Construction validates every
field and raises ``ValueError`` naming the parameter, the value and the allowed range.
Instances are immutable; use ``dataclasses.replace`` (which validates again) to derive one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union, cast

from .functional._stats import SKEW_MAX, SMOOTHING_MAX, format_interval
from .priority import SamplerID, parse_sampler_priority, resolve_order

#: Below this temperature a row is greedy (argmax), as in Aphrodite and vLLM.
GREEDY_TEMPERATURE = 1e-5

#: Request-level keys of a serving API that do not describe sampling; ``from_dict`` ignores them.
SERVING_KEYS = frozenset({"model", "messages", "prompt", "stream", "multi_models", "multiplier"})

LOGPROBS_MODES = ("processed", "raw")
_LOGPROBS_MODE_ALIASES = {
    "processed": "processed",
    "processed_logprobs": "processed",
    "raw": "raw",
    "raw_logprobs": "raw",
}

GuidedJson = Union[str, Mapping[str, Any]]


# --- validation helpers: each names the parameter, the value and the allowed range -----------

#: The largest finite float32: per-row parameters are held as float32 tensors, so a value must
#: be one (SEMANTICS.md, "Hostile inputs").
FLOAT32_MAX = 3.4028234663852886e38
#: Largest magnitude of an integer parameter (held as int64): 2**63 - 1.
INT64_MAX = 2**63 - 1
#: n: sequences per request, as the OpenAI API bounds it. The generation loop runs one batch row
#: per sequence, so an unbounded n is a request for unbounded memory.
MAX_N = 128
#: max_tokens when not given (vLLM's and OpenAI's completions default); None: no limit.
_MAX_TOKENS_DEFAULT = 16


def _show(value: Any) -> str:
    """repr of a rejected value, shortened (a 400-digit integer is not a useful message)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"...({len(text)} characters)"


def _f32(value: float) -> float:
    """``value`` rounded to float32 (what the batch tensors hold)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _real(name: str, value: Any) -> float:
    """A finite number that float32 can hold (|x| <= 3.4028235e38), as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite float32 number (|x| <= {FLOAT32_MAX:.8g}), "
                         f"got {_show(value)}") from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite float32 number (|x| <= {FLOAT32_MAX:.8g}), got {value!r}")
    return value


def _integer(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None, hint: str = "",
             what: str = "an integer") -> int:
    """An integer (an integral float is accepted) within the parameter's interval [lo, hi]
    (None: int64's bound, which the batch tensors hold). The error states that interval."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, numbers.Integral):  # int, numpy integers
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {_show(value)}")
    lo = -INT64_MAX - 1 if lo is None else lo
    hi = INT64_MAX if hi is None else hi
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be {what} in [{_bound(lo)}, {_bound(hi)}]{hint}, got {_show(value)}")
    return value


def _bound(n: int) -> str:
    """An integer bound as a reader takes it in: int64's and uint64's limits as powers of two."""
    return {INT64_MAX: "2**63 - 1", -INT64_MAX - 1: "-2**63", 2**64 - 1: "2**64 - 1"}.get(n, str(n))


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_show(value)}")
    return value


def _in_range(name: str, value: float, lo: float | None, hi: float | None,
              lo_open: bool = False, hi_open: bool = False) -> None:
    bad = (
        (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        raise ValueError(f"{name} must be in {format_interval(lo, hi, lo_open, hi_open)}, got {value!r}")


def _float_param(name: str, value: Any, lo: float | None, hi: float | None = FLOAT32_MAX,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """A float parameter: a finite float32 in the given interval, also after rounding to float32
    (so an open bound such as ``> 0`` still holds for the tensor value: 1e-50 is rejected)."""
    v = _real(name, value)
    _in_range(name, v, lo, hi, lo_open, hi_open)
    r = _f32(v)
    if r != v:
        try:
            _in_range(name, r, lo, hi, lo_open, hi_open)
        except ValueError:
            raise ValueError(f"{name} must be in {format_interval(lo, hi, lo_open, hi_open)} also as a float32: "
                             f"{v!r} rounds to {r!r}") from None
    return v


def _token_id(name: str, value: Any) -> int:
    """One token id: a non-negative int64 (no bools, no strings, no non-integral floats)."""
    if isinstance(value, float):
        raise ValueError(f"{name} must be integers (token ids), got float {value!r}")
    return _integer(name, value, 0, what="token ids")


def _token_ids(name: str, values: Any) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of token ids, got {_show(values)}")
    return tuple(_token_id(f"{name} entries", v) for v in values)


#: The field values that switch each ordered stage off (every one is that field's identity;
#: ``SamplerPipeline`` runs a stage of some rows on every row with the others' switched off).
#: ``samplers.plot.chain_stages`` checks that switching a stage off removes it from
#: ``enabled_order()``, so a new parameter that this table misses is an error, not a wrong picture.
STAGE_OFF: dict[SamplerID, dict[str, Any]] = {
    SamplerID.PENALTIES: {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    SamplerID.DRY: {"dry_multiplier": 0.0},
    SamplerID.NO_REPEAT_NGRAM: {"no_repeat_ngram_size": 0},
    SamplerID.TEMPERATURE: {"temperature": 1.0, "dynatemp_min": 0.0, "dynatemp_max": 0.0},
    SamplerID.TOP_NSIGMA: {"nsigma": 0.0},
    SamplerID.TOP_P_TOP_K: {"top_k": 0, "top_p": 1.0},
    SamplerID.TOP_A: {"top_a": 0.0},
    SamplerID.MIN_P: {"min_p": 0.0},
    SamplerID.TFS: {"tfs": 1.0},
    SamplerID.ETA_CUTOFF: {"eta_cutoff": 0.0},
    SamplerID.EPSILON_CUTOFF: {"epsilon_cutoff": 0.0},
    SamplerID.TYPICAL_P: {"typical_p": 1.0},
    SamplerID.QUADRATIC: {"smoothing_factor": 0.0},
    SamplerID.XTC: {"xtc_probability": 0.0},
}


@dataclass(frozen=True)
class SamplingParams:
    """Parameters of one request. Every field at its default is the identity.

    See SEMANTICS.md for each field's formula. Fields are grouped as in the API:
    penalties, DRY, temperature family, truncation samplers, order, draw, request-level.
    """

    # penalties and history-based samplers
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[Mapping[int, float]] = None
    no_repeat_ngram_size: int = 0
    min_tokens: int = 0
    # DRY
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breaker_ids: Sequence[int] = ()
    dry_range: int = 0
    # temperature family
    temperature: float = 1.0
    dynatemp_min: float = 0.0
    dynatemp_max: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    temperature_last: bool = False
    # truncation
    top_k: int = 0
    top_p: float = 1.0
    top_a: float = 0.0
    min_p: float = 0.0
    tfs: float = 1.0
    eta_cutoff: float = 0.0
    epsilon_cutoff: float = 0.0
    typical_p: float = 1.0
    nsigma: float = 0.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    skew: float = 0.0
    # order
    sampler_priority: Optional[Sequence[Union[int, str, SamplerID]]] = None
    # draw
    seed: Optional[int] = None
    n: int = 1
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logprobs_mode: str = "processed"
    # request-level (the generation loop's)
    max_tokens: Optional[int] = _MAX_TOKENS_DEFAULT
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    logits_processors: Sequence[Callable[..., Any]] = ()
    # guided decoding (stored; applied by the guided-decoding layer)
    guided_json: Optional[GuidedJson] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[Sequence[str]] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    # beam search only: accepted and validated, not used (this library does not do beam search)
    length_penalty: float = 1.0
    early_stopping: bool = False

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)

        for name in ("frequency_penalty", "presence_penalty"):
            set_(name, _float_param(name, getattr(self, name), -2.0, 2.0))
        set_("repetition_penalty", _float_param("repetition_penalty", self.repetition_penalty, 0.0, None,
                                                lo_open=True))

        set_("logit_bias", self._validated_logit_bias(self.logit_bias))

        for name in ("no_repeat_ngram_size", "min_tokens", "dry_range"):
            set_(name, _integer(name, getattr(self, name), 0))

        set_("dry_multiplier", _float_param("dry_multiplier", self.dry_multiplier, 0.0, None))
        set_("dry_base", _float_param("dry_base", self.dry_base, 1.0, None, lo_open=True))
        set_("dry_allowed_length", _integer("dry_allowed_length", self.dry_allowed_length, 1))
        set_("dry_sequence_breaker_ids", _token_ids("dry_sequence_breaker_ids", self.dry_sequence_breaker_ids))

        for name in ("temperature", "dynatemp_min", "dynatemp_max"):
            set_(name, _float_param(name, getattr(self, name), 0.0, None))
        set_("smoothing_factor", _float_param("smoothing_factor", self.smoothing_factor, 0.0, SMOOTHING_MAX))
        if self.dynatemp_min > self.dynatemp_max:
            raise ValueError(
                f"dynatemp_min ({self.dynatemp_min!r}) must be <= dynatemp_max ({self.dynatemp_max!r})"
            )
        set_("dynatemp_exponent", _float_param("dynatemp_exponent", self.dynatemp_exponent, 0.0, None,
                                               lo_open=True))
        set_("smoothing_curve", _float_param("smoothing_curve", self.smoothing_curve, 1.0, SMOOTHING_MAX))
        set_("temperature_last", _boolean("temperature_last", self.temperature_last))

        k = _integer("top_k", self.top_k, -1, hint=" (-1 or 0: off)")
        set_("top_k", 0 if k == -1 else k)
        for name, lo, hi, lo_open, hi_open in (
            ("top_p", 0.0, 1.0, True, False),
            ("top_a", 0.0, None, False, False),
            ("min_p", 0.0, 1.0, False, False),
            ("tfs", 0.0, 1.0, True, False),
            ("typical_p", 0.0, 1.0, True, False),
            ("nsigma", 0.0, None, False, False),
            ("xtc_threshold", 0.0, 1.0, False, False),
            ("xtc_probability", 0.0, 1.0, False, False),
        ):
            set_(name, _float_param(name, getattr(self, name), lo, hi, lo_open, hi_open))
        for name in ("eta_cutoff", "epsilon_cutoff"):
            v = _real(name, getattr(self, name))
            # The API text says "units of 1e-4"; the engine never scaled them (SEMANTICS.md).
            if not 0.0 <= v < 1.0:
                raise ValueError(
                    f"{name} must be in [0, 1) (a plain probability, not in units of 1e-4: "
                    f"e.g. 3e-4), got {v!r}"
                )
            set_(name, _float_param(name, v, 0.0, 1.0, hi_open=True))
        # exp(skew) must be a positive finite float32 (the skew formula's exponent)
        set_("skew", _float_param("skew", self.skew, -SKEW_MAX, SKEW_MAX))

        set_("sampler_priority", parse_sampler_priority(self.sampler_priority))

        if self.seed is not None:
            set_("seed", _integer("seed", self.seed, -(2**63), 2**64 - 1))
        set_("n", _integer("n", self.n, 1, MAX_N))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                set_(name, _integer(name, getattr(self, name), 0))
        mode = self.logprobs_mode
        if not isinstance(mode, str) or mode.lower() not in _LOGPROBS_MODE_ALIASES:
            raise ValueError(f"logprobs_mode must be one of {sorted(_LOGPROBS_MODE_ALIASES)}, got {mode!r}")
        set_("logprobs_mode", _LOGPROBS_MODE_ALIASES[mode.lower()])

        if self.max_tokens is not None:
            v = _integer("max_tokens", self.max_tokens, 1)
            set_("max_tokens", v)
            if self.min_tokens > v:
                default = (f"; max_tokens defaults to {_MAX_TOKENS_DEFAULT}, max_tokens=None is no limit"
                           if v == _MAX_TOKENS_DEFAULT else "")
                raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({v}){default}")
        set_("stop", self._validated_stop(self.stop))
        set_("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("include_stop_str_in_output", "ignore_eos", "detokenize", "skip_special_tokens",
                     "spaces_between_special_tokens", "early_stopping"):
            set_(name, _boolean(name, getattr(self, name)))
        if self.truncate_prompt_tokens is not None:
            set_("truncate_prompt_tokens", _integer("truncate_prompt_tokens", self.truncate_prompt_tokens, 1))
        procs = self.logits_processors or ()
        if callable(procs) or isinstance(procs, (str, bytes, Mapping)) or not isinstance(procs, Iterable):
            raise ValueError(f"logits_processors must be a list of callables (token_ids, logits) -> logits, "
                             f"got {_show(procs)}")
        procs = tuple(procs)
        for p in procs:
            if not callable(p):
                raise ValueError(
                    f"logits_processors entries must be callables (token_ids, logits) -> logits, got {p!r}"
                )
        set_("logits_processors", procs)
        self._validate_guided()
        set_("length_penalty", _float_param("length_penalty", self.length_penalty, None, None))

        if self.is_greedy and self.n != 1:
            raise ValueError(
                f"n must be 1 for greedy sampling (temperature < {GREEDY_TEMPERATURE:g}), got n={self.n}"
            )

    @staticmethod
    def _validated_logit_bias(bias: Any) -> Optional[dict[int, float]]:
        if bias is None:
            return None
        if not isinstance(bias, Mapping):
            raise ValueError(f"logit_bias must be a mapping of token id -> bias, got {bias!r}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            if isinstance(key, str):
                # ASCII digits only: str.isdigit() also accepts e.g. '²', which int() rejects
                if not re.fullmatch(r"\s*-?[0-9]+\s*", key):
                    raise ValueError(f"logit_bias keys must be token ids, got {_show(key)}")
                key = int(key)
            elif isinstance(key, float):
                raise ValueError(f"logit_bias keys must be token ids (integers), got {key!r}")
            tid = _token_id("logit_bias keys", key)
            b = _float_param(f"logit_bias[{tid}]", value, -100.0, 100.0)
            out[tid] = b
        return out or None

    @staticmethod
    def _validated_stop(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Sequence):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop entries must be strings, got {s!r}")
            if s == "":
                raise ValueError("stop must not contain an empty string")
        return tuple(stop)

    def _validate_guided(self) -> None:
        gj = self.guided_json
        if gj is not None and not isinstance(gj, (str, Mapping)):
            raise ValueError(f"guided_json must be a JSON schema (dict or JSON string), got {_show(gj)}")
        for name in ("guided_regex", "guided_decoding_backend", "guided_whitespace_pattern"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be a string, got {_show(v)}")
        gc = self.guided_choice
        if gc is not None:
            if isinstance(gc, (str, bytes)) or not isinstance(gc, Sequence) or not all(isinstance(c, str) for c in gc):
                raise ValueError(f"guided_choice must be a list of strings, got {_show(gc)}")
            object.__setattr__(self, "guided_choice", tuple(gc))
        if self.has_guided_decoding or self.guided_decoding_backend is not None:
            from .guided import validate_guided  # the grammar layer (imports torch only)

            validate_guided(self)

    # ------------------------------------------------------------------ derived facts
    @property
    def is_greedy(self) -> bool:
        """The row's token is the argmax of its processed logits."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def dynatemp_enabled(self) -> bool:
        return self.dynatemp_min != 0.0 or self.dynatemp_max != 0.0

    @property
    def order(self) -> tuple[SamplerID, ...]:
        """Every sampler id, in the order this row applies them (enabled or not)."""
        # (__post_init__ stores sampler_priority parsed: a tuple of SamplerID)
        return resolve_order(cast("tuple[SamplerID, ...]", self.sampler_priority), self.temperature_last)

    def enabled_samplers(self) -> frozenset[SamplerID]:
        """The samplers of the ordered chain that change this row's logits."""
        s = SamplerID
        on = {
            s.PENALTIES: self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0,
            s.DRY: self.dry_multiplier > 0.0,
            s.NO_REPEAT_NGRAM: self.no_repeat_ngram_size > 0,
            s.TEMPERATURE: not self.is_greedy and (self.temperature != 1.0 or self.dynatemp_enabled),
            s.TOP_NSIGMA: self.nsigma > 0.0,
            s.TOP_P_TOP_K: self.top_p < 1.0 or self.top_k > 0,
            s.TOP_A: self.top_a > 0.0,
            s.MIN_P: self.min_p > 0.0,
            s.TFS: self.tfs < 1.0,
            s.ETA_CUTOFF: self.eta_cutoff > 0.0,
            s.EPSILON_CUTOFF: self.epsilon_cutoff > 0.0,
            s.TYPICAL_P: self.typical_p < 1.0,
            s.QUADRATIC: self.smoothing_factor > 0.0,
            s.XTC: self.xtc_probability > 0.0,
        }
        return frozenset(k for k, v in on.items() if v)

    def enabled_order(self) -> tuple[SamplerID, ...]:
        """``order`` restricted to the samplers this row enables."""
        enabled = self.enabled_samplers()
        return tuple(sid for sid in self.order if sid in enabled)

    @property
    def has_guided_decoding(self) -> bool:
        return any(
            getattr(self, name) is not None for name in ("guided_json", "guided_regex", "guided_choice")
        )

    # ------------------------------------------------------------------ construction from requests
    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> "SamplingParams":
        """Build from an Arli/OpenAI-style request body.

        Serving-level keys (model, messages, prompt, stream, multi_models, multiplier) are
        accepted and ignored; ``null`` values mean "use the default", except ``max_tokens``,
        whose ``null`` is "no limit" as in the OpenAI API and vLLM (so ``to_dict`` round-trips);
        any other key is a ``ValueError`` naming it (and the closest known name, for a typo).
        Other OpenAI request fields (``user``, ``top_logprobs``, ``response_format``, ...) are
        such keys: this is the Arli request body, not every OpenAI one.
        """
        if not isinstance(body, Mapping):
            raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
        odd = [k for k in body if not isinstance(k, str)]
        if odd:
            raise ValueError(f"request parameter names must be strings, got {', '.join(_show(k) for k in odd)}")
        known = cls.field_names()
        unknown = sorted(k for k in body if k not in known and k not in SERVING_KEYS)
        if unknown:
            hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
            named = ", ".join(repr(k) + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "") for k in unknown)
            raise ValueError(f"unknown request parameter(s): {named}; see SamplingParams for the supported names")
        kwargs = {k: v for k, v in body.items() if k in known and (v is not None or k == "max_tokens")}
        if "sampler_priority" in body and body["sampler_priority"] is None:
            kwargs.pop("sampler_priority", None)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SamplingParams":
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-compatible values (logits_processors left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "logits_processors":
                continue
            v = getattr(self, f.name)
            if f.name == "sampler_priority":
                v = [int(s) for s in v]
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out
