"""Guided decoding: ``guided_json`` / ``guided_regex`` / ``guided_choice`` as a per-row token mask.

The grammar work is done by a grammar library (docs/guided.md has the comparison):
``xgrammar`` (the default) or ``llguidance``. This module

- resolves ``guided_decoding_backend`` names (:func:`resolve_backend`; ``None``, ``"auto"``,
  ``"regex"``, ``"outlines"`` and ``"lm-format-enforcer"`` are aliases of the default, any other
  unknown name is a ``ValueError`` listing the supported ones);
- picks the constraint of a request (:func:`guided_spec`): when several guided fields are set,
  **choice > regex > json** (the most specific wins; documented in docs/guided.md);
- compiles it for a tokenizer (:class:`GuidedDecoder`, with a per-decoder cache), so invalid
  schemas and regexes are ``ValueError`` before generation starts;
- keeps one grammar matcher per guided row (:class:`GuidedRows`) and fills a packed int32
  allowed-token bitmask ``[B, ceil(V / 32)]`` per step (bit ``t % 32`` of word ``t // 32`` set
  = token ``t`` allowed; rows without guidance are all ones);
- applies it to logits (:func:`apply_token_bitmask`: masked tokens ``-inf``; the torch path
  here, the Triton kernel ``samplers.kernels.guided`` for CUDA logits or under ``TRITON_INTERPRET=1``).

``samplers.generate`` applies the mask to the raw logits before every sampler (after the
user ``logits_processors``, so no processor can re-enable a token the grammar forbids),
advances each guided row's matcher with the sampled token, and finishes a row (finish_reason
``"stop"``) as soon as its grammar is complete: when the matcher accepted the stop token, or
when the only tokens the grammar still allows are stop tokens (so ``min_tokens``, which bans
EOS, cannot hold a completed row open and ``ignore_eos`` cannot run it past its grammar).
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, cast

import torch

__all__ = [
    "DEFAULT_BACKEND", "SUPPORTED_BACKENDS", "BACKEND_ALIASES", "GuidedSpec", "GuidedDecoder", "GuidedRows",
    "resolve_backend", "guided_spec", "validate_guided", "canonical_schema", "apply_token_bitmask", "apply_token_bitmask_torch", "bitmask_width",
    "unpack_bitmask", "pack_allowed",
]

DEFAULT_BACKEND = "xgrammar"
SUPPORTED_BACKENDS = ("xgrammar", "llguidance")
#: names accepted in ``guided_decoding_backend`` -> the library that serves them. ``None``/"auto"/
#: "regex" (the API example's value)/"outlines"/"lm-format-enforcer" (the names the API doc uses)
#: all mean the default: the constraint's meaning (a JSON schema, a regex, a choice) is the same
#: whichever library enforces it.
BACKEND_ALIASES = {
    "auto": None, "regex": None, "outlines": None, "outlines-core": None, "outlines_core": None,
    "lm-format-enforcer": None, "lm_format_enforcer": None, "lmformatenforcer": None,
    "xgrammar": "xgrammar", "llguidance": "llguidance", "guidance": "llguidance",
}


def resolve_backend(name: Optional[str], default: Optional[str] = None) -> str:
    """The library for a ``guided_decoding_backend`` value (an options suffix ``name:opts`` is ignored)."""
    default = default or DEFAULT_BACKEND
    if name is None:
        return default
    key = str(name).split(":", 1)[0].strip().lower()
    if key not in BACKEND_ALIASES:
        raise ValueError(f"guided_decoding_backend {name!r} is not supported; supported: "
                         f"{', '.join(repr(n) for n in BACKEND_ALIASES)} "
                         f"(libraries: {', '.join(SUPPORTED_BACKENDS)}; default {DEFAULT_BACKEND!r})")
    return BACKEND_ALIASES[key] or default


@dataclass(frozen=True)
class GuidedSpec:
    """One request's constraint: ``kind`` is "choice", "regex" or "json"; ``value`` the choices
    (a tuple), the regex, or the schema as canonical JSON text."""

    kind: str
    value: Any
    backend: str
    whitespace_pattern: Optional[str] = None
    ignored: tuple = ()          # the guided fields that were set but lost to precedence


def guided_spec(params: Any, default_backend: Optional[str] = None) -> Optional[GuidedSpec]:
    """The constraint of ``params`` (a SamplingParams), or None. Precedence: choice > regex > json."""
    gj, gr, gc = params.guided_json, params.guided_regex, params.guided_choice
    if gj is None and gr is None and gc is None:
        return None
    backend = resolve_backend(params.guided_decoding_backend, default_backend)
    ws = params.guided_whitespace_pattern
    if gc is not None:
        choices = tuple(gc)
        if not choices:
            raise ValueError("guided_choice must list at least one choice")
        ignored = tuple(n for n, v in (("guided_regex", gr), ("guided_json", gj)) if v is not None)
        return GuidedSpec("choice", choices, backend, ws, ignored)
    if gr is not None:
        try:
            re.compile(gr)
        except re.error as exc:
            raise ValueError(f"guided_regex {gr!r} is not a valid regular expression: {exc}") from None
        return GuidedSpec("regex", gr, backend, ws, ("guided_json",) if gj is not None else ())
    text = canonical_schema(gj)
    _check_schema(json.loads(text))
    return GuidedSpec("json", text, backend, ws)


#: Bounds on a ``guided_json`` schema (SEMANTICS.md, "Hostile inputs"). Grammar compilation time
#: grows fast with the number of optional properties of one object (xgrammar, tiny tokenizer:
#: 0.08 s at 100, 0.43 s at 250, 1.7 s at 500, 23 s at 1000), so a schema is bounded before any
#: compilation: nesting depth, properties per object, properties in all, and JSON text size.
MAX_SCHEMA_DEPTH = 32
MAX_OBJECT_PROPERTIES = 256
MAX_TOTAL_PROPERTIES = 1024
MAX_SCHEMA_CHARS = 1 << 18


def _schema_bounds(schema: Any) -> None:
    """Iteratively (no recursion, so no RecursionError) check depth and property counts."""
    total = 0
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"guided_json is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                if len(props) > MAX_OBJECT_PROPERTIES:
                    raise ValueError(f"guided_json: an object has {len(props)} properties; at most "
                                     f"{MAX_OBJECT_PROPERTIES} per object are allowed (compilation time "
                                     f"grows steeply with them)")
                total += len(props)
                if total > MAX_TOTAL_PROPERTIES:
                    raise ValueError(f"guided_json has more than {MAX_TOTAL_PROPERTIES} properties in all")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def canonical_schema(gj: Any) -> str:
    """A ``guided_json`` value (dict or JSON text) -> its JSON text, after the bounds above.
    Every failure is a ``ValueError`` naming guided_json (never a TypeError / RecursionError)."""
    if isinstance(gj, str):
        if len(gj) > MAX_SCHEMA_CHARS:
            raise ValueError(f"guided_json has {len(gj)} characters; at most {MAX_SCHEMA_CHARS} are allowed")
        try:
            schema = json.loads(gj)
        except RecursionError:
            raise ValueError(f"guided_json is nested more than {MAX_SCHEMA_DEPTH} levels deep") from None
        except ValueError as exc:
            raise ValueError(f"guided_json is not valid JSON: {exc}") from None
    else:
        schema = gj
    if not isinstance(schema, dict):
        raise ValueError(f"guided_json must be a JSON schema object, got {str(gj)[:200]!r}")
    _schema_bounds(schema)
    try:
        text = json.dumps(schema)  # property order kept
    except (TypeError, ValueError) as exc:  # a set, bytes, NaN ... inside the schema
        raise ValueError(f"guided_json must hold only JSON values: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValueError(f"guided_json has {len(text)} characters as JSON; at most {MAX_SCHEMA_CHARS} are allowed")
    return text


def _check_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"guided_json must be a JSON schema object, got {schema!r}")
    try:
        import jsonschema
    except ImportError:  # the grammar library's own check still runs at compile time
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"guided_json is not a valid JSON schema: {exc.message}") from None


def validate_guided(params: Any) -> None:
    """Construction-time check of a request's guided fields (``SamplingParams.__post_init__``):
    the backend name, every set constraint (not only the one precedence picks), and, with the
    xgrammar backend, the grammar built from it without a tokenizer (xgrammar's own parser: the
    fast, tokenizer-free half of compilation). Raises ``ValueError`` naming the field."""
    backend = resolve_backend(params.guided_decoding_backend)
    gj, gr, gc = params.guided_json, params.guided_regex, params.guided_choice
    if gc is not None:
        if not gc:
            raise ValueError("guided_choice must list at least one choice")
        if any(c == "" for c in gc):
            raise ValueError("guided_choice: an empty choice \"\" allows only the empty output; choices must be non-empty strings")
    if gr is not None:
        try:
            re.compile(gr)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"guided_regex {gr[:200]!r} is not a valid regular expression: {exc}") from None
    schema_text = None
    if gj is not None:
        schema_text = canonical_schema(gj)
        _check_schema(json.loads(schema_text))
    if backend != "xgrammar":
        return
    try:
        import xgrammar as xgr
    except ImportError:
        return
    for field, build in (("guided_regex", gr is not None and (lambda: xgr.Grammar.from_regex(gr))),
                         ("guided_json", schema_text is not None and (
                             lambda: xgr.Grammar.from_json_schema(schema_text)))):
        if not build:
            continue
        try:
            build()
        except Exception as exc:  # xgrammar raises RuntimeError with its parser's message
            msg = " ".join(m.strip() for m in str(exc).strip().splitlines())
            raise ValueError(f"{field} cannot be compiled by xgrammar: {msg[:500]}") from None


# ---------------------------------------------------------------------------- bitmasks
def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_SHIFTS: dict = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return s


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, W]`` int32 -> ``[B, vocab_size]`` bool (True = allowed)."""
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def pack_allowed(allowed: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` bool -> ``[B, ceil(V / 32)]`` int32 (the inverse of :func:`unpack_bitmask`)."""
    B, V = allowed.shape
    W = bitmask_width(V)
    padded = torch.zeros((B, W * 32), dtype=torch.int64, device=allowed.device)
    padded[:, :V] = allowed.to(torch.int64)
    words = (padded.view(B, W, 32) << torch.arange(32, device=allowed.device)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor,
                              rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference path: a new tensor, ``logits`` with every token whose bit is 0 set to ``-inf``.
    ``rows`` (optional, int64): bitmask row i applies to logits row ``rows[i]``; other rows are
    returned unchanged. Tokens past the bitmask's width are masked; bitmask bits past V are ignored."""
    V = logits.shape[-1]
    W = bitmask.shape[-1]
    allowed = unpack_bitmask(bitmask.to(logits.device), min(V, W * 32))
    if W * 32 < V:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], V - W * 32)], -1)
    if rows is None:
        return logits.masked_fill(~allowed, -math.inf)
    out = logits.clone()
    rows = rows.to(logits.device)
    out[rows] = logits[rows].masked_fill(~allowed, -math.inf)
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Optional[torch.Tensor] = None,
                        backend: str = "auto") -> torch.Tensor:
    """Masked tokens -> ``-inf`` (a new tensor). ``backend``: "torch", "triton" or "auto" (the
    Triton kernel when ``samplers.kernels.available(logits.device)``, i.e. CUDA logits or TRITON_INTERPRET=1)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        try:
            import samplers.kernels as kernels

            backend = "triton" if kernels.available(logits.device) else "torch"
        except ImportError:
            backend = "torch"
    if backend == "triton":
        from samplers.kernels.guided import apply_token_bitmask as triton_apply

        return triton_apply(logits, bitmask, rows)
    return apply_token_bitmask_torch(logits, bitmask, rows)


# ---------------------------------------------------------------------------- libraries
class _XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self.compiler = xgr.GrammarCompiler(info)

    def compile(self, spec: GuidedSpec) -> Any:
        c = self.compiler
        if spec.kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in spec.value))
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        # xgrammar takes no whitespace pattern: a pattern turns on JSON's flexible whitespace
        return c.compile_json_schema(spec.value, any_whitespace=spec.whitespace_pattern is not None)

    def matcher(self, compiled: Any) -> "_Matcher":
        m = self.xgr.GrammarMatcher(compiled)
        return _Matcher(lambda bm, i: m.fill_next_token_bitmask(bm, i), m.accept_token, m.is_terminated)


class _LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.fill = llguidance.torch.fill_next_token_bitmask
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                eos_token=list(stop_ids)[0] if stop_ids else None)

    def compile(self, spec: GuidedSpec) -> Any:
        LL = self.llg.LLMatcher
        if spec.kind == "choice":
            grm = LL.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in spec.value))
        elif spec.kind == "regex":
            grm = LL.grammar_from_regex(spec.value)
        else:
            opts = ({"whitespace_flexible": False} if spec.whitespace_pattern is None
                    else {"whitespace_pattern": spec.whitespace_pattern})
            grm = LL.grammar_from_json_schema(spec.value, defaults=opts)
        err = LL.validate_grammar(grm, self.tok)
        if isinstance(err, tuple):
            err = err[0] and err[1]
        if err:
            raise RuntimeError(str(err).strip())
        return grm

    def matcher(self, compiled: Any) -> "_Matcher":
        m = self.llg.LLMatcher(self.tok, compiled)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return _Matcher(lambda bm, i: self.fill(m, bm, i), m.consume_token, m.is_stopped)


_LIBRARIES = {"xgrammar": _XGrammar, "llguidance": _LLGuidance}


@dataclass
class _Matcher:
    fill: Callable[[torch.Tensor, int], None]
    accept: Callable[[int], bool]
    is_terminated: Callable[[], bool]


#: Compiled grammars kept per (tokenizer, vocab size, stop ids): a grammar is compiled once per
#: process, not once per ``generate`` call; at most this many per tokenizer (least recent dropped).
COMPILED_CACHE_SIZE = 256
_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class GuidedDecoder:
    """Grammar compilation for one tokenizer: one library instance per backend, compiled grammars
    cached by (backend, kind, value, whitespace pattern). Library instances and compiled grammars
    are shared by every decoder of the same tokenizer, vocabulary size and stop ids."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 default_backend: Optional[str] = None) -> None:
        self.tokenizer, self.vocab_size = tokenizer, int(vocab_size)
        self.stop_ids = tuple(int(t) for t in stop_token_ids)
        self.default_backend = resolve_backend(default_backend)
        self._libs: dict = {}
        self._cache: "OrderedDict" = OrderedDict()
        try:
            per_tok = _SHARED.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer without weak references: this decoder's own caches
            return
        self._libs, self._cache = per_tok.setdefault((self.vocab_size, self.stop_ids), ({}, OrderedDict()))

    def library(self, name: str) -> Any:
        lib = self._libs.get(name)
        if lib is None:
            try:
                lib = _LIBRARIES[name](self.tokenizer, self.vocab_size, self.stop_ids)
            except ImportError as exc:
                raise ValueError(f"guided decoding backend {name!r} needs the {name} package "
                                 f"(pip install --no-deps {name}): {exc}") from None
            self._libs[name] = lib
        return lib

    def spec(self, params: Any) -> Optional[GuidedSpec]:
        return guided_spec(params, self.default_backend)

    def compile(self, spec: GuidedSpec) -> Any:
        key = (spec.backend, spec.kind, spec.value, spec.whitespace_pattern)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            while len(self._cache) >= COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
            field = {"choice": "guided_choice", "regex": "guided_regex", "json": "guided_json"}[spec.kind]
            try:
                self._cache[key] = self.library(spec.backend).compile(spec)
            except ValueError:
                raise
            except Exception as exc:  # the libraries raise RuntimeError with their parser's message
                msg = str(exc).strip().splitlines()
                raise ValueError(f"{field} cannot be compiled by {spec.backend}: "
                                 f"{' '.join(m.strip() for m in msg)[:500]}") from None
            # a grammar that allows nothing but the empty output would leave no token to draw
            probe = GuidedRows([self.library(spec.backend).matcher(self._cache[key])], self.vocab_size, self.stop_ids)
            if probe.bitmask([0])[2]:
                del self._cache[key]
                raise ValueError(f"{field} allows only the empty output: {spec.value!r}")
        return self._cache[key]

    def rows(self, row_params: Sequence[Any], device: Any = "cpu") -> Optional["GuidedRows"]:
        """Matchers for the rows (None when no row is guided). Compiles (and so validates) every
        row's constraint first."""
        specs = [self.spec(p) for p in row_params]
        if all(s is None for s in specs):
            return None
        compiled = [self.compile(s) if s is not None else None for s in specs]
        matchers = [self.library(s.backend).matcher(c) if s is not None else None for s, c in zip(specs, compiled)]
        return GuidedRows(matchers, self.vocab_size, self.stop_ids, device)


class GuidedRows:
    """The per-row grammar state of one generation: ``matchers[g]`` for global row g (None = not guided)."""

    def __init__(self, matchers: Sequence[Optional[_Matcher]], vocab_size: int, stop_ids: Sequence[int],
                 device: Any = "cpu") -> None:
        self.matchers = list(matchers)
        self.V, self.W = vocab_size, bitmask_width(vocab_size)
        self.device = torch.device(device)
        self.guided = [m is not None for m in self.matchers]
        # words with the bits of the tokens that are neither stop tokens nor padding past V
        content = torch.zeros(self.W * 32, dtype=torch.bool)
        content[:vocab_size] = True
        content[[t for t in stop_ids if 0 <= t < vocab_size]] = False
        self._content = pack_allowed(content.unsqueeze(0))[0]
        self.terminated = [False] * len(self.matchers)

    def any_guided(self, active: Sequence[int]) -> bool:
        return any(self.guided[g] for g in active)

    def bitmask(self, active: Sequence[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """For the active rows (global ids, in batch order): the bitmask ``[k, W]`` int32 (on the
        device) of the k guided rows whose matcher has not terminated, those k rows' global ids,
        and the batch positions of the rows whose grammar is complete (it terminated, or it allows
        only stop tokens): the generation loop finishes those."""
        pos = [i for i, g in enumerate(active) if self.guided[g] and not self.terminated[active[i]]]
        bm = torch.full((len(pos), self.W), -1, dtype=torch.int32)
        for k, i in enumerate(pos):
            cast(_Matcher, self.matchers[active[i]]).fill(bm, k)  # (pos: guided rows, which have one)
        only_stop = ((bm & self._content) == 0).all(-1).tolist()
        complete = [i for k, i in enumerate(pos) if only_stop[k]]
        complete += [i for i, g in enumerate(active) if self.guided[g] and self.terminated[g]]
        return bm.to(self.device), [active[i] for i in pos], sorted(complete)

    def advance(self, active: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """Feed each guided active row its sampled token; returns the batch positions whose matcher
        has terminated (accepted a stop token)."""
        ended = []
        for i, (g, t) in enumerate(zip(active, tokens)):
            m = self.matchers[g]
            if m is None or self.terminated[g]:
                continue
            if not m.accept(int(t)):
                raise RuntimeError(f"guided decoding: row {g} sampled token {t}, which its grammar does not "
                                   f"allow (the mask was not applied?)")
            if m.is_terminated():
                self.terminated[g] = True
                ended.append(i)
        return ended
