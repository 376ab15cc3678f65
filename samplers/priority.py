"""Sampler identities and the order in which a row applies them.

The integer ids are Aphrodite's (inherited from KoboldAI), so a ``sampler_priority`` list
written for that API means the same thing here. See SEMANTICS.md, "Order".
"""

from __future__ import annotations

from enum import IntEnum
from typing import Iterable, Sequence


class SamplerID(IntEnum):
    TOP_P_TOP_K = 0
    TOP_A = 1
    MIN_P = 2
    TFS = 3
    TYPICAL_P = 4
    TEMPERATURE = 5
    PENALTIES = 6
    DRY = 7
    NO_REPEAT_NGRAM = 8
    TOP_NSIGMA = 9
    ETA_CUTOFF = 10
    EPSILON_CUTOFF = 11
    QUADRATIC = 12
    XTC = 13


DEFAULT_ORDER: tuple[SamplerID, ...] = (
    SamplerID.DRY,
    SamplerID.PENALTIES,
    SamplerID.NO_REPEAT_NGRAM,
    SamplerID.TEMPERATURE,
    SamplerID.TOP_NSIGMA,
    SamplerID.TOP_P_TOP_K,
    SamplerID.TOP_A,
    SamplerID.MIN_P,
    SamplerID.TFS,
    SamplerID.ETA_CUTOFF,
    SamplerID.EPSILON_CUTOFF,
    SamplerID.TYPICAL_P,
    SamplerID.QUADRATIC,
    SamplerID.XTC,
)

# Names a request may use besides the enum's own (matched case-insensitively).
_ALIASES: dict[str, SamplerID] = {
    "top_p": SamplerID.TOP_P_TOP_K,
    "top_k": SamplerID.TOP_P_TOP_K,
    "typical": SamplerID.TYPICAL_P,
    "temp": SamplerID.TEMPERATURE,
    "dynatemp": SamplerID.TEMPERATURE,
    "repetition_penalty": SamplerID.PENALTIES,
    "nsigma": SamplerID.TOP_NSIGMA,
    "top_n_sigma": SamplerID.TOP_NSIGMA,
    "eta": SamplerID.ETA_CUTOFF,
    "epsilon": SamplerID.EPSILON_CUTOFF,
    "smoothing": SamplerID.QUADRATIC,
    "quadratic_smoothing": SamplerID.QUADRATIC,
    "ngram": SamplerID.NO_REPEAT_NGRAM,
}


def _allowed_names() -> str:
    return ", ".join(f"{s.value}={s.name}" for s in SamplerID)


def parse_sampler_id(value: object) -> SamplerID:
    """One entry of ``sampler_priority``: an id (int) or a name (str, any case)."""
    if isinstance(value, bool):
        raise ValueError(f"sampler_priority: {value!r} is not a sampler id; allowed: {_allowed_names()}")
    if isinstance(value, int):
        try:
            return SamplerID(value)
        except ValueError:
            raise ValueError(
                f"sampler_priority: unknown sampler id {str(value)[:60]}; allowed ids 0..{len(SamplerID) - 1}: "
                f"{_allowed_names()}"
            ) from None
    if isinstance(value, str):
        key = value.strip()
        if key.isascii() and key.isdigit():  # not '²' or other Unicode digits int() rejects
            return parse_sampler_id(int(key))
        upper = key.upper()
        if upper in SamplerID.__members__:
            return SamplerID[upper]
        if key.lower() in _ALIASES:
            return _ALIASES[key.lower()]
        raise ValueError(f"sampler_priority: unknown sampler name {value[:100]!r}; allowed: {_allowed_names()}")
    raise ValueError(
        f"sampler_priority: entries must be ints or names, got {type(value).__name__} {value!r}"
    )


def parse_sampler_priority(values: Iterable[object] | None) -> tuple[SamplerID, ...]:
    """Validate a ``sampler_priority`` list; duplicates are an error."""
    if values is None:
        return ()
    # An ordered sequence only: a set's iteration order changes with PYTHONHASHSEED, a dict's
    # keys are not an order a request would mean.
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"sampler_priority must be a list of sampler ids or names (an ordered "
                         f"sequence), got {type(values).__name__} {str(values)[:200]}")
    ids = tuple(parse_sampler_id(v) for v in values)
    seen: set[SamplerID] = set()
    for sid in ids:
        if sid in seen:
            raise ValueError(f"sampler_priority: {sid.name} ({sid.value}) is listed twice")
        seen.add(sid)
    return ids


def resolve_order(priority: Sequence[SamplerID], temperature_last: bool = False) -> tuple[SamplerID, ...]:
    """The full order one row applies: the listed samplers first, the rest in default order.

    ``temperature_last`` moves TEMPERATURE after XTC in the default order; when
    ``sampler_priority`` lists TEMPERATURE explicitly, the list wins.
    """
    default = DEFAULT_ORDER
    if temperature_last:
        default = tuple(s for s in DEFAULT_ORDER if s != SamplerID.TEMPERATURE) + (SamplerID.TEMPERATURE,)
    listed = tuple(priority)
    return listed + tuple(s for s in default if s not in listed)
