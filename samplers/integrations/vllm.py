"""vLLM logits processor that runs the samplers pipeline per request, under both of vLLM's
model runners.

Register it with vLLM in any of these ways::

    LLM(model, logits_processors=[SamplersLogitsProcessor])
    LLM(model, logits_processors=["samplers.integrations.vllm:SamplersLogitsProcessor"])
    vllm serve MODEL --logits-processors samplers.integrations.vllm:SamplersLogitsProcessor
    # or installed through the "vllm.logits_processors" entry point of this package

``SamplersLogitsProcessor`` is a subclass of every processor interface the installed vLLM
has. vLLM 0.32 and 0.33 have two: ``vllm.v1.sample.logits_processor.LogitsProcessor`` (the V1
model runner: a persistent batch described by ``update_state``) and
``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`` (Model Runner V2, 0.33's default
on CUDA: per-slot ``add_request`` and ``apply(logits, ctx)``), so both runners' loaders accept
it. vLLM 0.34 removed the V1 runner and its interface: there it is a V2 processor only.
Constructing it with V1's arguments ``(vllm_config, device, is_pin_memory)`` gives the V1
implementation, with V2's ``(vllm_config, req_states)`` the V2 one (``_V1Processor`` /
``_V2Processor``, both subclasses of the public class).

Per-request parameters live in vLLM's ``SamplingParams.extra_args`` under one key,
``"samplers"`` (``EXTRA_ARGS_KEY``). Its value is either a dict of our parameter names
(offline ``LLM`` use) or the same dict as a JSON string (the OpenAI server's
``vllm_xargs`` only carries flat string/number values)::

    vllm.SamplingParams(max_tokens=200, extra_args={"samplers": {"dry_multiplier": 0.8, "min_p": 0.05}})
    client.chat.completions.create(..., extra_body={"vllm_xargs": {"samplers": json.dumps({...})}})

A request without that key is not touched. Greedy requests (our ``temperature: 0``) and
requests with a ``seed`` under our key get their token drawn here, with our seeded draw, and
hand vLLM a row with only that token left (so the text is reproducible whatever vLLM batches
or schedules); the others leave the draw to vLLM. See docs/vllm.md for the full guide, and
``validate_params`` for which keys are accepted and which of vLLM's own fields must stay
neutral (our pipeline runs before vLLM's temperature, min_p, top_k and top_p).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref
from typing import TYPE_CHECKING, Any, Optional, cast

import numpy as np
import torch
try:  # the V1 model runner's interface (vLLM <= 0.33; 0.34 removed that runner)
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
except ImportError:
    V1LogitsProcessor = None
    BatchUpdate = MoveDirectionality = None

try:  # Model Runner V2's interface (vLLM >= 0.32); import-light by vLLM's design
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor
except ImportError:  # pragma: no cover - an older vLLM: V1 only
    V2LogitsProcessor = None
    LogitsContext = LogitsProcRequestState = None

if V1LogitsProcessor is None and V2LogitsProcessor is None:  # pragma: no cover - vLLM < 0.10
    raise ImportError(
        "samplers.integrations.vllm: this vLLM has neither logits-processor interface "
        "(vllm.v1.sample.logits_processor, vllm.v1.worker.gpu.sample.logits_processor); "
        "it needs vLLM 0.32 or newer"
    )

from ..batch import SamplingBatch
from ..history import TokenHistory
from ..params import GREEDY_TEMPERATURE, SamplingParams
from ..pipeline import SamplerPipeline
from ..sampling import PURPOSE_DRAW, draw_tokens, row_uniforms

if TYPE_CHECKING:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import VllmConfig

__all__ = ["EXTRA_ARGS_KEY", "REQUEST_LEVEL_KEYS", "SamplersLogitsProcessor", "parse_extra_args"]

# A child of vLLM's "vllm" logger: our lines go through vLLM's handler and format (and its
# VLLM_LOGGING_LEVEL), instead of Python's bare last-resort handler.
logger = logging.getLogger("vllm.samplers")

#: The key of ``SamplingParams.extra_args`` that holds our parameters.
EXTRA_ARGS_KEY = "samplers"

#: Our parameters that belong to the generation loop, which is vLLM's here: they must be
#: given as vLLM's own SamplingParams fields (or request fields), not under "samplers".
REQUEST_LEVEL_KEYS = frozenset({
    "n", "logprobs", "prompt_logprobs", "logprobs_mode", "max_tokens", "stop", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "detokenize", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "logits_processors",
    "guided_json", "guided_regex", "guided_choice", "guided_decoding_backend",
    "guided_whitespace_pattern", "length_penalty", "early_stopping",
})

# vLLM's own sampling fields that act on the same logits after our processor, with the
# value that makes each one a no-op. (vLLM's temperature may also be greedy, < 1e-5: its
# argmax of our processed logits is then our greedy choice.)
_VLLM_NEUTRAL = (
    ("top_p", 1.0), ("min_p", 0.0),
    ("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
)


def _raw_block(extra_args: Any) -> Any:
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    return extra_args[EXTRA_ARGS_KEY]


def parse_extra_args(extra_args: Optional[dict[str, Any]]) -> Optional[SamplingParams]:
    """Our ``SamplingParams`` from a vLLM request's ``extra_args``; None when it has none.

    ``extra_args["samplers"]`` is a dict of our parameter names, or a JSON string of one.
    Raises ``ValueError`` naming the parameter for anything invalid.
    """
    block = _raw_block(extra_args)
    if block is None:
        return None
    if isinstance(block, (str, bytes)):
        try:
            block = json.loads(block)
        except json.JSONDecodeError as exc:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not valid JSON: {exc}") from None
    if not isinstance(block, dict):
        raise ValueError(
            f"extra_args[{EXTRA_ARGS_KEY!r}] must be an object of sampler parameters (or a JSON string "
            f"of one), got {type(block).__name__}"
        )
    misplaced = sorted(k for k in block if k in REQUEST_LEVEL_KEYS)
    if misplaced:
        raise ValueError(
            f"{', '.join(map(repr, misplaced))} under extra_args[{EXTRA_ARGS_KEY!r}]: request-level "
            f"parameters are vLLM's; pass them as vLLM's own SamplingParams / request fields"
        )
    body = {k: v for k, v in block.items() if k != "min_tokens"}
    params = SamplingParams.from_dict(body)
    min_tokens = block.get("min_tokens")
    if min_tokens is not None:
        # max_tokens is vLLM's: drop our default so min_tokens is not checked against it.
        params = dataclasses.replace(params, max_tokens=None, min_tokens=min_tokens)
    return params


@dataclasses.dataclass(frozen=True)
class _EngineParams:
    """What the engine needs of one request that uses our parameters."""

    params: SamplingParams  # seed, stop ids and vocabulary checks resolved for this engine
    draws: bool  # we choose the token (greedy, or seeded under our key): a one-token row
    sequence_index: int  # keys the seeded stream of one of a request's n sequences


def _engine_params(vparams: "VllmSamplingParams", vocab_size: Optional[int]) -> Optional[_EngineParams]:
    """Our parameters of a request as it reaches the engine; None when it has none (or
    invalid ones: ``validate_params`` refuses those at admission, see the log line)."""
    if vparams is None:
        return None
    try:
        params = parse_extra_args(vparams.extra_args)
    except ValueError as exc:
        logger.error("samplers: request parameters ignored: %s", exc)
        return None
    if params is None:
        return None
    changes: dict[str, Any] = {}
    own_seed = params.seed is not None
    sequence_index = 0
    if own_seed and vparams.seed is not None:
        # vLLM gives each of a request's n sequences its own seed (seed + i): it tells the
        # sequences apart, so each draws its own stream of our seed.
        sequence_index = vparams.seed % 2**32
    elif not own_seed and vparams.seed is not None:
        # Key our random numbers (XTC's coin) by vLLM's seed; vLLM draws the token.
        changes["seed"] = vparams.seed
    if params.min_tokens:
        # Ban vLLM's stop ids (EOS unless ignore_eos, plus stop_token_ids) below min_tokens.
        stop_ids = set(getattr(vparams, "all_stop_token_ids", ()) or ()) | set(params.stop_token_ids)
        changes["stop_token_ids"] = sorted(stop_ids)
    V = vocab_size
    if V is not None:
        if params.logit_bias and any(t >= V for t in params.logit_bias):
            # validate_params cannot see the model (vLLM passes it the request only), so an
            # id beyond the vocabulary can reach the engine, which cannot fail one request.
            bad = sorted(t for t in params.logit_bias if t >= V)
            logger.error("samplers: logit_bias token ids %s are outside the vocabulary [0, %d): "
                         "those entries are not applied", bad, V)
            changes["logit_bias"] = {t: b for t, b in params.logit_bias.items() if t < V} or None
        ids = changes.get("stop_token_ids", params.stop_token_ids)
        if any(t >= V for t in ids):
            changes["stop_token_ids"] = [t for t in ids if t < V]
    if changes:
        params = dataclasses.replace(params, max_tokens=None, **changes)
    return _EngineParams(params, own_seed or params.is_greedy, sequence_index)


def _choose(processed: torch.Tensor, batch: SamplingBatch, draws: torch.Tensor) -> torch.Tensor:
    """Rows where ``draws``: our token (argmax for greedy rows, else the seeded inverse-CDF
    draw of ``SamplerPipeline.sample``) as the only finite entry, 0.0; other rows as given.

    vLLM's draw then returns our token whatever it does (temperature 1 or greedy, neutral
    top-k/top-p/min_p, a Gumbel or multinomial draw, a rejection sampler's target)."""
    u = row_uniforms(batch.key_lo, batch.key_hi, batch.output_lengths, batch.sequence_indices, PURPOSE_DRAW)
    tokens = draw_tokens(processed, batch.greedy, u, all_greedy=batch.all_greedy)  # (no device read)
    onehot = torch.full_like(processed, float("-inf"))
    onehot.scatter_(1, tokens[:, None], 0.0)
    return torch.where(draws[:, None], onehot, processed)


# id(vllm_config) -> the processor instance doing the work for that engine.
_INSTANCES: dict[int, "weakref.ReferenceType[SamplersLogitsProcessor]"] = {}


def _vocab_size_of(vllm_config: Any) -> Optional[int]:
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    try:
        return int(model_config.get_vocab_size())
    except Exception:  # pragma: no cover - config without a vocabulary
        return None


# The interfaces this vLLM has: both on 0.32 and 0.33, V2 alone from 0.34 on.
_BASES: tuple = tuple(base for base in (V1LogitsProcessor, V2LogitsProcessor) if base is not None)


class SamplersLogitsProcessor(*_BASES):  # type: ignore[misc]
    """Runs ``SamplerPipeline`` on the rows of vLLM's batch whose request carries
    ``extra_args["samplers"]``; other rows are left untouched.

    A subclass of each vLLM logits-processor interface there is; an instance is a
    ``_V1Processor`` or a ``_V2Processor`` according to the constructor's arguments (see the
    module docstring). Shared by both: ``validate_params`` (request admission, in vLLM's front
    end), and the duplicate rule: vLLM loads entry-point plugins and then the classes named
    by ``--logits-processors`` / ``logits_processors=[...]``; with both, the first instance
    built for an engine config does the work and later ones stay idle (``duplicate``).
    """

    def __new__(cls, vllm_config: Any = None, *args: Any, **kwargs: Any) -> "SamplersLogitsProcessor":
        if cls is SamplersLogitsProcessor:
            v2 = "req_states" in kwargs or (len(args) == 1 and "device" not in kwargs
                                            and not isinstance(args[0], (torch.device, str)))
            if v2 and V2LogitsProcessor is None:  # pragma: no cover - V2 arguments on an old vLLM
                raise TypeError("Model Runner V2 arguments (vllm_config, req_states) given, but this "
                                "vLLM has no Model Runner V2 logits-processor interface")
            if not v2 and V1LogitsProcessor is None:
                raise TypeError("V1 model runner arguments (vllm_config, device, is_pin_memory) given, "
                                "but this vLLM (0.34 or newer) has only Model Runner V2's interface: "
                                "construct it as (vllm_config, req_states)")
            cls = _V2Processor if v2 else _V1Processor
        return super().__new__(cls)

    def _register(self, vllm_config: Any) -> None:
        self._vllm_config = vllm_config  # keeps id(vllm_config) unique while we live
        first = _INSTANCES.get(id(vllm_config))
        first = first() if first is not None else None
        self.duplicate = first is not None and first._vllm_config is vllm_config
        if self.duplicate:
            logger.info("samplers: SamplersLogitsProcessor registered twice; the second copy is idle")
        else:
            _INSTANCES[id(vllm_config)] = weakref.ref(self)

    # ------------------------------------------------------------------ both interfaces
    @classmethod
    def validate_params(cls, sampling_params: "VllmSamplingParams") -> None:
        """Check ``extra_args["samplers"]`` (our ValueErrors, which vLLM re-raises as
        ``vllm.exceptions.VLLMValidationError``, an HTTP 400 on the server), and that vLLM's
        own samplers that run after ours are neutral for such a request."""
        params = parse_extra_args(sampling_params.extra_args)
        if params is None:
            return
        bad = [f"{name}={getattr(sampling_params, name)!r} (use {neutral!r})"
               for name, neutral in _VLLM_NEUTRAL if getattr(sampling_params, name) != neutral]
        if sampling_params.top_k not in (0, -1):
            bad.append(f"top_k={sampling_params.top_k!r} (use 0 or -1)")
        t = sampling_params.temperature
        if t != 1.0 and t >= GREEDY_TEMPERATURE:
            bad.append(f"temperature={t!r} (use 1.0; put the temperature under {EXTRA_ARGS_KEY!r})")
        if bad:
            raise ValueError(
                f"a request with extra_args[{EXTRA_ARGS_KEY!r}] must leave vLLM's own samplers neutral, "
                f"since they would run again after ours: {', '.join(bad)}. Give these parameters under "
                f"extra_args[{EXTRA_ARGS_KEY!r}] instead (a server applies the model's generation_config "
                f"defaults unless started with --generation-config vllm)"
            )
        if params.seed is not None and (sampling_params.n or 1) > 1 and sampling_params.seed is None:
            raise ValueError(
                f"seed under extra_args[{EXTRA_ARGS_KEY!r}] with n={sampling_params.n}: also set vLLM's own "
                f"seed (any value), which vLLM makes distinct per sequence; otherwise all {sampling_params.n} "
                f"sequences would draw the same tokens"
            )

    def is_argmax_invariant(self) -> bool:
        # Penalties, DRY, logit_bias, no-repeat-ngram, XTC, ... change which token is the argmax.
        return False


@dataclasses.dataclass(eq=False)
class _Request:
    """One request of vLLM's V1 persistent batch that uses our parameters."""

    params: SamplingParams
    draws: bool
    sequence_index: int
    prompt: list[int]
    output: list[int]  # vLLM's live list: vLLM appends the request's tokens to it


class _V1Processor(SamplersLogitsProcessor):
    """The V1 model runner's interface.

    State: the requests by batch index, kept from ``update_state`` (removed, then added,
    then moved, vLLM's documented order). The pipeline's ``SamplingBatch`` for the active
    rows is cached; it is rebuilt only when the active rows change, and in the steady state
    it is advanced by ``SamplingBatch.append`` with the one token that vLLM appended to each
    row's live output list since the last step (read in ``apply``, after vLLM has filled in
    asynchronously scheduled tokens). Rows whose list did not grow (a prompt still being
    prefilled in chunks) are masked out of that append (``append(ids, rows=mask)``) and keep
    their state. When requests join, only their rows are built from the lists and
    ``TokenHistory.merge``-d with the held rows (as the V2 processor does). Anything else (a
    row that advanced by several tokens, or whose list shrank, or a token vLLM has not
    filled in yet) rebuilds the batch from the live lists.
    """

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool,
                 backend: str = "auto") -> None:
        self.device = device
        self._register(vllm_config)
        self._warned_placeholders = False
        self.vocab_size: Optional[int] = _vocab_size_of(vllm_config)
        self.pipeline = SamplerPipeline(backend=backend)
        self.requests: dict[int, _Request] = {}
        # Cached pipeline batch: vLLM rows (ascending), their requests, and the number of
        # output tokens of each row the batch holds.
        self._batch: Optional[SamplingBatch] = None
        self._rows: list[int] = []
        self._row_index: Optional[torch.Tensor] = None
        self._batch_requests: list[_Request] = []
        self._outputs: list[list[int]] = []
        self._seen = np.zeros(0, dtype=np.int64)
        self._draws: Optional[torch.Tensor] = None  # bool [rows], None when no row draws
        self._dirty = False
        self.rebuilds = 0  # number of full rebuilds (for tests and diagnostics)
        self.rows_built = 0  # rows whose history was built from the lists (likewise)

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None or self.duplicate:
            return
        reqs = self.requests
        changed = False
        for index in batch_update.removed:
            changed |= reqs.pop(index, None) is not None
        for index, vparams, prompt_ids, output_ids in batch_update.added:
            req = self._new_request(vparams, prompt_ids, output_ids)
            if req is not None:
                reqs[index] = req
                changed = True
            else:
                changed |= reqs.pop(index, None) is not None
        for a, b, direction in batch_update.moved:
            ra, rb = reqs.pop(a, None), reqs.pop(b, None)
            if ra is not None:
                reqs[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                reqs[a] = rb
            changed |= ra is not None or rb is not None
        if changed:
            self._dirty = True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.duplicate or not self.requests:
            self._batch = None
            return logits
        if self._dirty or self._batch is None:
            self._rebuild(logits)
        else:
            self._catch_up(logits)
        batch = self._batch
        assert batch is not None and self._row_index is not None
        full = len(self._rows) == logits.shape[0]  # rows are 0..B-1 in order
        sub = logits if full else logits.index_select(0, self._row_index)
        out = self.pipeline.process(sub, batch)
        if self._draws is not None:
            out = _choose(out, batch, self._draws)
        if full:
            return out
        logits.index_copy_(0, self._row_index, out.to(logits.dtype))
        return logits

    # ------------------------------------------------------------------ internals
    def _new_request(self, vparams: "VllmSamplingParams", prompt_ids: Optional[list[int]],
                     output_ids: list[int]) -> Optional[_Request]:
        ep = _engine_params(vparams, self.vocab_size)
        if ep is None:
            return None
        return _Request(ep.params, ep.draws, ep.sequence_index, list(prompt_ids) if prompt_ids else [],
                        output_ids)

    def _rebuild(self, logits: torch.Tensor) -> None:
        rows = sorted(self.requests)
        reqs = [self.requests[i] for i in rows]
        old = self._batch
        V = logits.shape[1]
        held = old is not None and old.vocab_size == V and old.device == logits.device
        old_pos = {id(r): j for j, r in enumerate(self._batch_requests)} if held else {}
        pos = np.array([old_pos.get(id(r), -1) for r in reqs], dtype=np.int64)
        fresh = np.flatnonzero(pos < 0)
        # (a joining row whose last token vLLM has not filled in: the full build's handling)
        if (not held or fresh.size == len(reqs)
                or any(reqs[j].output and reqs[j].output[-1] < 0 for j in fresh)):
            self._full_build(rows, reqs, logits)
            return
        assert old is not None  # held
        if not fresh.size:
            # Only removals and moves of rows we already hold: keep their history state.
            batch = old.select(torch.from_numpy(pos))
            seen = self._seen[pos]
        else:
            # Requests joined: build their rows alone and stitch them into the held rows.
            joined = [reqs[j] for j in fresh]
            built = TokenHistory([r.prompt for r in joined], [r.output for r in joined], V, logits.device)
            history = _stitch(old.history, pos, built)
            batch = SamplingBatch([r.params for r in reqs], vocab_size=V, device=logits.device,
                                  sequence_indices=[r.sequence_index for r in reqs], history=history)
            seen = self._seen[np.maximum(pos, 0)]
            seen[fresh] = [len(r.output) for r in joined]
            self.rows_built += fresh.size
        self._batch, self._seen = batch, seen
        self._set_rows(rows, reqs, logits.device)
        self._catch_up(logits)

    def _full_build(self, rows: list[int], reqs: list[_Request], logits: torch.Tensor) -> None:
        outputs = [_strip_placeholders(r.output) for r in reqs]
        self._batch = SamplingBatch(
            [r.params for r in reqs], [r.prompt for r in reqs], outputs,
            vocab_size=logits.shape[1], device=logits.device,
            sequence_indices=[r.sequence_index for r in reqs],
        )
        self._seen = np.fromiter(map(len, outputs), dtype=np.int64, count=len(outputs))
        self._set_rows(rows, reqs, logits.device)
        self.rebuilds += 1
        self.rows_built += len(reqs)

    def _set_rows(self, rows: list[int], reqs: list[_Request], device: torch.device) -> None:
        self._rows, self._batch_requests = rows, reqs
        self._outputs = [r.output for r in reqs]  # the live lists, in batch order
        draws = [r.draws for r in reqs]
        self._draws = torch.tensor(draws, dtype=torch.bool, device=device) if any(draws) else None
        self._row_index = torch.tensor(rows, dtype=torch.int64, device=device)
        self._dirty = False

    def _catch_up(self, logits: torch.Tensor) -> None:
        """Bring the cached batch up to date with the live output lists."""
        outputs = self._outputs
        lengths = np.fromiter(map(len, outputs), dtype=np.int64, count=len(outputs))
        step = lengths - self._seen
        if not step.any():
            return
        advanced = step == 1
        if (advanced | (step == 0)).all():
            # Every row advanced by one token or (still prefilling a prompt in chunks, say)
            # by none: append to the rows that advanced, the others are masked out.
            last = np.fromiter((o[-1] if o else 0 for o in outputs), dtype=np.int64, count=len(outputs))
            last[~advanced] = 0
            if last.min() >= 0:
                assert self._batch is not None
                rows = None if advanced.all() else torch.from_numpy(advanced)
                self._batch.append(torch.from_numpy(last), rows=rows)
                self._seen = lengths
                return
            if not self._warned_placeholders:
                self._warned_placeholders = True
                logger.warning(
                    "samplers: vLLM has not filled in the output tokens of this step (async "
                    "scheduling): it does so for custom logits processors only when they are passed "
                    "with --logits-processors / LLM(logits_processors=[...]). Pass "
                    "samplers.integrations.vllm:SamplersLogitsProcessor that way (also when the entry "
                    "point is installed), or run with --no-async-scheduling; until then the history "
                    "samplers (penalties, DRY, no_repeat_ngram, min_tokens) miss these tokens"
                )
        self._full_build(self._rows, self._batch_requests, logits)


def _stitch(held: TokenHistory, rows: np.ndarray, built: TokenHistory) -> TokenHistory:
    """The step's history from the rows held over and the rows just built: row r is row
    ``rows[r]`` of ``held`` where that is >= 0, else the next row of ``built`` (in order)."""
    new = rows < 0
    at = rows.copy()
    at[new] = np.arange(built.batch_size)
    return TokenHistory.merge([held, built], source=new.astype(np.int64), rows=at)


def _strip_placeholders(tokens: list[int]) -> list[int]:
    """vLLM's async scheduling puts -1 placeholders at the end until the token is known."""
    n = len(tokens)
    while n and tokens[n - 1] < 0:
        n -= 1
    return tokens[:n] if n != len(tokens) else tokens


class _V2Processor(SamplersLogitsProcessor):
    """Model Runner V2's interface: per-slot state, histories read from vLLM's buffers.

    ``add_request(slot, params)`` records the slot's parameters on the host (a slot may
    be reused: everything about it is replaced) and marks the parameter table stale;
    ``apply_staged_writes`` (before the forward pass) rebuilds it when
    stale: a ``SamplingBatch`` with one row per slot that holds our parameters, row 0
    the neutral defaults, and a device map slot -> row (0 for slots we declined).

    ``apply(logits, ctx)``: rows are logits rows (reordered each step; under speculative
    decoding one per draft token). On the device, with no host sync and no loop over
    rows: row r of slot s = ctx.expanded_idx_mapping[r] at position p = ctx.pos[r] has
    the history h[0..p], where positions before its request's first row
    (p - ctx.expanded_local_pos[r]) are vLLM's committed tokens
    ``req_states.all_token_ids[s]`` and the positions from there to p are the tokens fed
    to the request's rows (``ctx.input_ids``: the last committed token, then the draft
    tokens); the prompt is its first ``req_states.prompt_len[s]`` tokens, so after a
    preemption (prefill_len > prompt_len) the re-fed output is still output. That gives
    a ``TokenHistory.from_tensors`` and ``SamplingBatch.gather`` of the parameter table;
    the pipeline runs on every row; rows of slots we declined are returned unchanged.

    Building that history's derived state (counts, DRY's match tables) is O(rows *
    (history + V)); in the steady state it is carried from step to step instead, as the V1
    processor and a generation loop do: when vLLM is configured without speculative
    decoding, every row is its request's only row and ``ctx.seq_lens_upper_bound_np`` is
    each row's exact history length (pos + 1) on the host. A step whose rows are all held
    from the last step (same slot, no ``add_request`` since) and each longer by one output
    token (``ctx.input_ids``, the token fed at pos) or by none takes the last step's history
    (``select``-ed when the rows moved) and ``append``s those tokens: O(rows) on the device,
    decided from host arrays only. Rows that cannot be carried (a new request, a prefill
    chunk, a re-added slot) are built from vLLM's buffers as above, by themselves, and
    ``TokenHistory.merge``-d with the carried rows; a step with none to carry (or with drafts)
    builds every row, and that history is carried from then on.
    """

    def __init__(self, vllm_config: "VllmConfig", req_states: "LogitsProcRequestState",
                 backend: str = "auto") -> None:
        self._register(vllm_config)
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        self.vocab_size = int(req_states.vocab_size)
        n = int(req_states.max_num_reqs)
        self.pipeline = SamplerPipeline(backend=backend)
        self._slot_params: list[Optional[_EngineParams]] = [None] * n
        self._slot_vparams: list[Any] = [None] * n  # vLLM's params of our slots
        self._ours = np.zeros(n, dtype=bool)  # host: the slot's request uses our parameters
        self._stale = False
        self._table: Optional[SamplingBatch] = None
        self._slot_row = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._slot_row_host = np.zeros(n, dtype=np.int64)
        self._slot_ours = torch.zeros(n, dtype=torch.bool, device=self.device)
        self._slot_draws = torch.zeros(n, dtype=torch.bool, device=self.device)
        # The history carried to the next step (see the class docstring): its rows' slots and
        # exact lengths on the host, and slot -> its row there (-1: not held, or re-added).
        self._exact_lengths = getattr(vllm_config, "speculative_config", None) is None
        self._carried: Optional[TokenHistory] = None
        self._carried_lengths = np.zeros(0, dtype=np.int64)
        self._carried_row = np.full(n, -1, dtype=np.int64)
        # Histories built from vLLM's buffers, whole and row by row (for tests and diagnostics).
        self.history_builds = 0
        self.history_rows_built = 0
        self._any_draws = np.zeros(n, dtype=bool)
        self.table_builds = 0  # for tests and diagnostics

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        pass  # a V1 method; Model Runner V2 calls add_request instead

    def add_request(self, req_idx: int, sampling_params: "VllmSamplingParams") -> bool:
        self._carried_row[req_idx] = -1  # a new occupant: what the slot held is not its history
        ep = None if self.duplicate else _engine_params(sampling_params, self.vocab_size)
        if ep is not None or self._slot_params[req_idx] is not None:
            self._stale = True
        self._slot_params[req_idx] = ep
        self._slot_vparams[req_idx] = sampling_params if ep is not None else None
        self._ours[req_idx] = ep is not None
        self._any_draws[req_idx] = ep is not None and ep.draws
        return ep is not None

    def apply_staged_writes(self) -> None:
        if not self._stale:
            return
        slots = np.flatnonzero(self._ours)
        # (_ours marks exactly the slots whose _slot_params is set)
        entries = cast("list[_EngineParams]", [self._slot_params[int(s)] for s in slots])
        params = [SamplingParams()] + [e.params for e in entries]
        self._table = SamplingBatch(params, vocab_size=self.vocab_size, device=self.device,
                                    sequence_indices=[0] + [e.sequence_index for e in entries])
        n = len(self._slot_params)
        row = np.zeros(n, dtype=np.int64)
        row[slots] = np.arange(1, len(slots) + 1)
        draws = np.zeros(n, dtype=bool)
        draws[slots] = [e.draws for e in entries]
        # Host -> device copies only: nothing waits for the device.
        self._slot_row_host = row
        self._slot_row = torch.from_numpy(row).to(self.device, non_blocking=True)
        self._slot_ours = torch.from_numpy(self._ours.copy()).to(self.device, non_blocking=True)
        self._slot_draws = torch.from_numpy(draws).to(self.device, non_blocking=True)
        self._stale = False
        self.table_builds += 1

    def apply(self, logits: torch.Tensor, ctx: Optional["LogitsContext"] = None) -> torch.Tensor:
        if ctx is None:
            raise TypeError("Model Runner V2's apply(logits, ctx) needs the LogitsContext")
        if self.duplicate or not self._ours[ctx.idx_mapping_np].any():
            return logits
        if logits.shape[1] != self.vocab_size:
            # vLLM hands us [rows, vocab_size] logits; should a model's logits differ,
            # follow them rather than fail the engine in the pipeline's shape check.
            self.vocab_size = int(logits.shape[1])
            for slot in np.flatnonzero(self._ours):
                self._slot_params[slot] = _engine_params(self._slot_vparams[slot], self.vocab_size)
            self._stale = True
            self._carried = None
        if self._stale:  # add_request without apply_staged_writes (not vLLM's order)
            self.apply_staged_writes()
        assert self._table is not None
        slots = ctx.expanded_idx_mapping.to(torch.int64)
        rows = logits.shape[0]
        lengths = self._exact_lengths_of(ctx, rows)
        history = None if lengths is None else self._carried_history(ctx, slots, lengths)
        if history is None:
            history = self._history(ctx, slots)
            self.history_builds += 1
            self.history_rows_built += rows
        self._carry(history, ctx, lengths)
        batch = self._table.gather(self._slot_row.index_select(0, slots), history,
                                   rows_taken=self._slot_row_host[ctx.idx_mapping_np])
        out = self.pipeline.process(logits, batch)
        if self._any_draws[ctx.idx_mapping_np].any():
            out = _choose(out, batch, self._slot_draws.index_select(0, slots))
        if self._ours[ctx.idx_mapping_np].all():
            return out.to(logits.dtype)  # every row is ours: no [rows, V] merge
        return torch.where(self._slot_ours.index_select(0, slots)[:, None], out.to(logits.dtype), logits)

    def _exact_lengths_of(self, ctx: "LogitsContext", rows: int) -> Optional[np.ndarray]:
        """Each row's history length on the host when vLLM gives it exactly (one row per
        request, no speculative decoding; row r is then slot ctx.idx_mapping_np[r]), else None."""
        if not self._exact_lengths or rows != len(ctx.idx_mapping_np):
            return None
        return np.asarray(ctx.seq_lens_upper_bound_np[:rows], dtype=np.int64)

    def _carried_history(self, ctx: "LogitsContext", slots: torch.Tensor,
                         lengths: np.ndarray) -> Optional[TokenHistory]:
        """This step's histories (of these exact lengths) from the last step's, or None when no
        row can be carried. Rows that cannot (a new request, a prompt chunk, a resumed
        request) are built from vLLM's buffers alone and merged in."""
        if self._carried is None:
            return None
        host_slots = np.asarray(ctx.idx_mapping_np, dtype=np.int64)  # (one row per request)
        at = self._carried_row[host_slots]
        held = at >= 0
        grown = np.where(held, lengths - self._carried_lengths[np.maximum(at, 0)], -1)
        advances = grown == 1
        # The appended token must be output: a row fed a one-token prompt chunk is built instead.
        advances &= lengths - 1 >= self.req_states.prompt_len.np[host_slots]
        kept = advances | (grown == 0)
        if not kept.any():
            return None
        history = self._carried
        if not kept.all():
            fresh = np.flatnonzero(~kept)
            built = self._history(ctx, slots, fresh)
            self.history_rows_built += fresh.size
            history = _stitch(history, np.where(kept, at, -1), built)
        elif at.shape[0] != history.batch_size or (at != np.arange(at.shape[0])).any():
            history = history.select(torch.from_numpy(at).to(self.device, non_blocking=True), host_rows=at)
        if advances.any():
            history.append(ctx.input_ids.to(torch.int64),
                           rows=None if advances.all() else torch.from_numpy(advances))
        return history

    def _carry(self, history: TokenHistory, ctx: "LogitsContext", lengths: Optional[np.ndarray]) -> None:
        """Keep this step's history for the next one (only when its lengths are exact)."""
        self._carried_row[:] = -1
        self._carried = history if lengths is not None else None
        if lengths is not None:
            self._carried_lengths = lengths
            self._carried_row[np.asarray(ctx.idx_mapping_np, dtype=np.int64)] = np.arange(lengths.shape[0])

    def _history(self, ctx: "LogitsContext", slots: torch.Tensor,
                 sel: Optional[np.ndarray] = None) -> TokenHistory:
        """The rows' histories from vLLM's buffers (``slots``: each logits row's slot): every
        row, or the rows ``sel`` (host indices; every row of the requests they cover)."""
        rs = self.req_states
        committed = rs.all_token_ids.gpu
        pos = ctx.pos.to(torch.int64)
        local = ctx.expanded_local_pos.to(torch.int64)
        fed_ids = ctx.input_ids.to(torch.int64)
        # Host upper bound of every row's pos + 1 (computed + scheduled tokens, drafts too).
        bounds = ctx.seq_lens_upper_bound_np
        if sel is not None:
            index = torch.from_numpy(sel).to(self.device, non_blocking=True)
            slots, pos, local, fed_ids = (t.index_select(0, index) for t in (slots, pos, local, fed_ids))
            bounds = bounds[sel]
        rows = slots.shape[0]
        width = int(bounds.max()) if len(bounds) else 1
        width = max(1, min(width, committed.shape[1]))
        lengths = (pos + 1).clamp(max=width)
        first = pos - local  # position of the request's first row's input token
        at = torch.arange(width, device=self.device)
        tokens = committed[:, :width].index_select(0, slots).to(torch.int64)
        # Position i in [first, pos] is row r - (pos - i)'s input (rows of a request are
        # consecutive, at consecutive positions).
        fed = (at[None, :] >= first[:, None]) & (at[None, :] <= pos[:, None])
        src = (torch.arange(rows, device=self.device)[:, None] - (pos[:, None] - at[None, :]))
        from_rows = fed_ids.index_select(0, src.clamp(0, rows - 1).reshape(-1))
        tokens = torch.where(fed, from_rows.view(rows, width), tokens)
        prompt = torch.minimum(rs.prompt_len.gpu.to(self.device).index_select(0, slots).to(torch.int64),
                               lengths)
        return TokenHistory.from_tensors(tokens, lengths, prompt, self.vocab_size, width)
