"""vLLM v1 logits processor that runs the samplers pipeline per request.

Register it with vLLM in any of these ways::

    LLM(model, logits_processors=[SamplersLogitsProcessor])
    LLM(model, logits_processors=["samplers.integrations.vllm:SamplersLogitsProcessor"])
    vllm serve MODEL --logits-processors samplers.integrations.vllm:SamplersLogitsProcessor
    # or installed through the "vllm.logits_processors" entry point of this package

Name it explicitly even with the entry point installed: under async scheduling (vLLM's
default) vLLM fills in the output-token lists that the history samplers read only for
processors named by ``logits_processors`` / ``--logits-processors``. Loaded both ways, the
second instance for an engine stays idle.

Per-request parameters live in vLLM's ``SamplingParams.extra_args`` under one key,
``"samplers"`` (``EXTRA_ARGS_KEY``). Its value is either a dict of our parameter names
(offline ``LLM`` use) or the same dict as a JSON string (the OpenAI server's
``vllm_xargs`` only carries flat string/number values)::

    vllm.SamplingParams(max_tokens=200, extra_args={"samplers": {"dry_multiplier": 0.8, "min_p": 0.05}})
    client.chat.completions.create(..., extra_body={"vllm_xargs": {"samplers": json.dumps({...})}})

A request without that key is not touched. See docs/vllm.md for the full guide, and
``validate_params`` for which keys are accepted and which of vLLM's own fields must stay
neutral (our pipeline runs before vLLM's penalties, temperature, min_p, top_k and top_p).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..batch import SamplingBatch
from ..params import GREEDY_TEMPERATURE, SamplingParams
from ..pipeline import SamplerPipeline

if TYPE_CHECKING:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import VllmConfig

__all__ = ["EXTRA_ARGS_KEY", "REQUEST_LEVEL_KEYS", "SamplersLogitsProcessor", "parse_extra_args"]

logger = logging.getLogger(__name__)

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


# id(vllm_config) -> the processor instance doing the work for that engine.
_INSTANCES: dict[int, "weakref.ReferenceType[SamplersLogitsProcessor]"] = {}


@dataclasses.dataclass(eq=False)
class _Request:
    """One request of vLLM's persistent batch that uses our parameters."""

    params: SamplingParams
    prompt: list[int]
    output: list[int]  # vLLM's live list: vLLM appends the request's tokens to it


class SamplersLogitsProcessor(LogitsProcessor):
    """Runs ``SamplerPipeline`` on the rows of vLLM's batch whose request carries
    ``extra_args["samplers"]``; other rows are left untouched.

    State: the requests by batch index, kept from ``update_state`` (removed, then added,
    then moved, vLLM's documented order). The pipeline's ``SamplingBatch`` for the active
    rows is cached; it is rebuilt only when the active rows change, and in the steady state
    it is advanced by ``SamplingBatch.append`` with the one token that vLLM appended to each
    row's live output list since the last step (read in ``apply``, after vLLM has filled in
    asynchronously scheduled tokens). Rows whose list did not grow (a prompt still being
    prefilled in chunks) are masked out of that append (``append(ids, rows=mask)``) and keep
    their state. Anything else (a row that advanced by several tokens, as with speculative
    decoding, or whose list shrank, or a token vLLM has not filled in yet) rebuilds the batch
    from the live lists.
    """

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool,
                 backend: str = "auto") -> None:
        self.device = device
        # vLLM loads entry-point plugins and then the classes named by --logits-processors /
        # logits_processors=[...]: with both, two instances would process the logits twice.
        # The first instance built for a given engine config does the work; later ones are idle.
        self._vllm_config = vllm_config  # keeps id(vllm_config) unique while we live
        first = _INSTANCES.get(id(vllm_config))
        first = first() if first is not None else None
        self.duplicate = first is not None and first._vllm_config is vllm_config
        if self.duplicate:
            logger.info("samplers: SamplersLogitsProcessor registered twice; the second copy is idle")
        else:
            _INSTANCES[id(vllm_config)] = weakref.ref(self)
        self._warned_placeholders = False
        self.vocab_size: Optional[int] = None
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None:
            try:
                self.vocab_size = int(model_config.get_vocab_size())
            except Exception:  # pragma: no cover - config without a vocabulary
                self.vocab_size = None
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
        self._any_greedy = False
        self._dirty = False
        self.rebuilds = 0  # number of full rebuilds (for tests and diagnostics)

    # ------------------------------------------------------------------ vLLM interface
    @classmethod
    def validate_params(cls, sampling_params: "VllmSamplingParams") -> None:
        """Check ``extra_args["samplers"]`` (our ValueErrors, which vLLM turns into HTTP 400),
        and that vLLM's own samplers that run after ours are neutral for such a request."""
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

    def is_argmax_invariant(self) -> bool:
        # Penalties, DRY, logit_bias, no-repeat-ngram, XTC, ... change which token is the argmax.
        return False

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
        if self._any_greedy:
            # Our greedy rows: vLLM draws at temperature 1, so leave it only the argmax.
            keep = torch.zeros_like(out, dtype=torch.bool)
            keep.scatter_(1, out.argmax(dim=1, keepdim=True), True)
            out = torch.where(batch.greedy[:, None] & ~keep, float("-inf"), out)
        if full:
            return out
        logits.index_copy_(0, self._row_index, out.to(logits.dtype))
        return logits

    # ------------------------------------------------------------------ internals
    def _new_request(self, vparams: "VllmSamplingParams", prompt_ids: Optional[list[int]],
                     output_ids: list[int]) -> Optional[_Request]:
        if vparams is None:
            return None
        try:
            params = parse_extra_args(vparams.extra_args)
        except ValueError as exc:  # validate_params rejects these before they get here
            logger.error("samplers: request parameters ignored: %s", exc)
            return None
        if params is None:
            return None
        changes: dict[str, Any] = {}
        if params.seed is None and vparams.seed is not None:
            # Key our random numbers (XTC's coin) by vLLM's seed, which vLLM makes unique per
            # sequence when n > 1.
            changes["seed"] = vparams.seed
        if params.min_tokens:
            # Ban vLLM's stop ids (EOS unless ignore_eos, plus stop_token_ids) below min_tokens.
            stop_ids = set(getattr(vparams, "all_stop_token_ids", ()) or ()) | set(params.stop_token_ids)
            changes["stop_token_ids"] = sorted(stop_ids)
        V = self.vocab_size
        if V is not None:
            if params.logit_bias and any(t >= V for t in params.logit_bias):
                logger.warning("samplers: logit_bias ids >= vocab size %d ignored", V)
                changes["logit_bias"] = {t: b for t, b in params.logit_bias.items() if t < V} or None
            ids = changes.get("stop_token_ids", params.stop_token_ids)
            if any(t >= V for t in ids):
                changes["stop_token_ids"] = [t for t in ids if t < V]
        if changes:
            params = dataclasses.replace(params, max_tokens=None, **changes)
        return _Request(params, list(prompt_ids) if prompt_ids else [], output_ids)

    def _rebuild(self, logits: torch.Tensor) -> None:
        rows = sorted(self.requests)
        reqs = [self.requests[i] for i in rows]
        old = self._batch
        V = logits.shape[1]
        old_pos = {id(r): j for j, r in enumerate(self._batch_requests)} if old is not None else {}
        pos = [old_pos.get(id(r)) for r in reqs]
        if (old is not None and old.vocab_size == V and old.device == logits.device
                and all(p is not None for p in pos)):
            # Only removals and moves of rows we already hold: keep their history state.
            idx = torch.tensor(pos, dtype=torch.int64)
            batch = old.select(idx)
            self._batch, self._seen = batch, self._seen[idx.numpy()]
            self._set_rows(rows, reqs, logits.device)
            self._catch_up(logits)
            return
        self._full_build(rows, reqs, logits)

    def _full_build(self, rows: list[int], reqs: list[_Request], logits: torch.Tensor) -> None:
        outputs = [_strip_placeholders(r.output) for r in reqs]
        self._batch = SamplingBatch(
            [r.params for r in reqs], [r.prompt for r in reqs], outputs,
            vocab_size=logits.shape[1], device=logits.device,
        )
        self._seen = np.fromiter(map(len, outputs), dtype=np.int64, count=len(outputs))
        self._set_rows(rows, reqs, logits.device)
        self.rebuilds += 1

    def _set_rows(self, rows: list[int], reqs: list[_Request], device: torch.device) -> None:
        self._rows, self._batch_requests = rows, reqs
        self._outputs = [r.output for r in reqs]  # the live lists, in batch order
        self._any_greedy = any(r.params.is_greedy for r in reqs)
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


def _strip_placeholders(tokens: list[int]) -> list[int]:
    """vLLM's async scheduling puts -1 placeholders at the end until the token is known."""
    n = len(tokens)
    while n and tokens[n - 1] < 0:
        n -= 1
    return tokens[:n] if n != len(tokens) else tokens
