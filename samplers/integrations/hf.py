"""Hugging Face ``transformers`` integration: our pipeline inside ``model.generate``.

``SamplersLogitsProcessor`` is a ``transformers.LogitsProcessor``. On each step it runs the
pipeline on the scores for every row, draws the row's token with our seeded draw, and
returns a **one-hot mask**: 0.0 for the chosen token, ``-inf`` everywhere else. Whatever
``generate`` does next then picks our token: its greedy ``argmax`` (``do_sample=False``) and
its multinomial draw (``do_sample=True``: softmax of a one-hot is probability 1 on our token,
and temperature / top-k / top-p / min-p keep the single finite token). So the tokens, the
seeds and ``n`` are exactly those of :func:`samplers.generate` on the same model (tested; pass
``num_return_sequences=n``, see :func:`expand_params` for how rows map to sequences), and
each step's logprobs are in ``processor.outputs``. Left-padded prompts: pass the
``attention_mask`` to the processor so padding stays out of the history (and to
``processor.reset(attention_mask=...)`` before reusing it on other prompts).

Making ``generate`` apply nothing of its own
--------------------------------------------
``generate`` fills every generation field left ``None`` from the model's
``generation_config.json`` and then from transformers' global defaults (read from
transformers 5.24's ``GenerationConfig._get_default_generation_params``: ``do_sample=False``,
``temperature=1.0``, **``top_k=50``**, ``top_p=1.0``, ``typical_p=1.0``,
``repetition_penalty=1.0``, ``min_length=0``, ...; 4.x puts the same values in
``GenerationConfig.__init__``). Default processors run before the user's ``logits_processor``
list (``_merge_criteria_processor_list``), warpers after it. Two groups can run besides ours:

* *processors* that run **before** ours whenever configured (``repetition_penalty``,
  ``no_repeat_ngram_size``, ``min_length``/``min_new_tokens``, ``bad_words_ids``,
  ``suppress_tokens``, ``sequence_bias``, forced BOS/EOS, ...): they would change the logits
  our pipeline sees, so a checkpoint that sets e.g. ``repetition_penalty: 1.1`` would
  silently double-penalise;
* *warpers* that run **after** ours, only with ``do_sample=True`` (temperature, ``top_k``
  (default 50!), top_p, min_p, typical_p, epsilon, eta, top_h).

A field left ``None`` is refilled from the checkpoint, so the way to switch one off is an
explicit "off" value: :func:`neutral_generate_kwargs` returns them all (``do_sample=False,
temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0,
no_repeat_ngram_size=0, min_length=0, epsilon_cutoff=0.0, eta_cutoff=0.0, ...``; the
warpers' values only with ``do_sample=True``, where ``top_k=0`` matters most; one of
``min_length=0`` / ``min_new_tokens=0``, never both, see the function); pass them with the
processor::

    proc = SamplersLogitsProcessor(SamplingParams(temperature=0.8, min_p=0.05, seed=1),
                                   eos_token_ids=tokenizer.eos_token_id)
    out = model.generate(**enc, logits_processor=[proc],
                         **neutral_generate_kwargs(model, max_new_tokens=64))

``do_sample=False`` is what the helper chooses (the one-hot mask makes argmax take our
token, and no warper can run); with ``num_return_sequences > 1``, which generate refuses
without sampling, it sets ``do_sample=True`` and the warpers' off values. Request-level fields stay ``generate``'s business:
``max_tokens`` -> ``max_new_tokens``, ``stop`` -> ``stop_strings`` (with ``tokenizer=``),
EOS handling -> ``eos_token_id``; ``min_tokens`` is honoured by the processor (pass the EOS
ids). For everything request-level in one place use :func:`samplers.generate`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

try:  # transformers is optional: the class still works as a plain callable without it
    from transformers import LogitsProcessor as _HFLogitsProcessor
except ImportError:  # pragma: no cover - exercised only without the hf extra
    _HFLogitsProcessor = object

from ..batch import SamplingBatch
from ..params import SamplingParams
from ..pipeline import SamplerPipeline
from ..sampling import SamplerOutput

__all__ = ["SamplersLogitsProcessor", "neutral_generate_kwargs", "expand_params", "apply_user_processors",
           "eos_ids_of"]

#: generate() fields set explicitly to their "off" value, so that neither the checkpoint's
#: generation_config.json nor transformers' global defaults (top_k=50) apply.
_NEUTRAL = dict(
    do_sample=False, num_beams=1, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    remove_invalid_values=False, renormalize_logits=False,
)
#: The warpers: only applied with do_sample=True (then top_k must be 0: the default is 50).
_WARPERS_OFF = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
#: Fields whose "off" value is None: generate() refills None from the checkpoint, so these
#: cannot be switched off by a keyword. Those with a no-op non-None value get it; for the
#: others a checkpoint that sets them gets a warning.
_NOOP_WHEN_SET = dict(min_p=0.0, suppress_tokens=[], begin_suppress_tokens=[], sequence_bias={})
_CANNOT_CLEAR = ("bad_words_ids", "forced_bos_token_id", "forced_eos_token_id", "top_h",
                 "exponential_decay_length_penalty", "watermarking_config")


def neutral_generate_kwargs(model: Any = None, **overrides: Any) -> dict:
    """Keyword arguments for ``model.generate`` under which it applies no logits processor or
    warper of its own, so ours is the only sampler. ``overrides`` are added (e.g.
    ``max_new_tokens=64``). With ``model``, fields its ``generation_config`` sets whose off
    value is None are neutralised too where a no-op value exists (min_p=0, empty
    suppress lists); the rest (bad_words_ids, forced BOS/EOS, ...) raise a warning.

    The minimum length is switched off by one field, chosen so that ``generate`` logs no
    "Both `min_new_tokens` and `min_length` seem to have been set" warning (it logs it when
    ``min_new_tokens`` is set and ``min_length`` comes from the call or the checkpoint):
    ``min_length=0`` when ``model``'s generation_config leaves ``min_new_tokens`` unset,
    else (a checkpoint that sets it, or no ``model`` given) ``min_new_tokens=0``, which
    overrides any ``min_length`` with the prompt length, a no-op; a checkpoint that sets
    both gets transformers' warning. Neither is added when ``overrides`` gives one."""
    kwargs: dict[str, object] = dict(_NEUTRAL)
    # num_return_sequences > 1 needs do_sample=True in generate(): fine, our one-hot mask
    # survives the warpers, which are switched off anyway.
    if (overrides.get("num_return_sequences") or 1) > 1:
        overrides.setdefault("do_sample", True)
    sampling = bool(overrides.get("do_sample", False))
    if sampling:
        kwargs.update(_WARPERS_OFF)
    cfg = getattr(model, "generation_config", None)
    if "min_length" not in overrides and "min_new_tokens" not in overrides:
        # Both at 0 would be neutral too, but generate() warns about it on every call.
        if cfg is not None and getattr(cfg, "min_new_tokens", None) is None:
            kwargs["min_length"] = 0
        else:
            kwargs["min_new_tokens"] = 0
    if cfg is not None:
        for name, value in _NOOP_WHEN_SET.items():
            if getattr(cfg, name, None) is not None and (sampling or name != "min_p"):
                kwargs[name] = value
        left = [n for n in _CANNOT_CLEAR if getattr(cfg, n, None) is not None]
        if left:
            import warnings

            warnings.warn(f"the model's generation_config sets {left}: generate() will apply them besides "
                          f"the samplers pipeline (clear them on model.generation_config to avoid it)")
    kwargs.update(overrides)
    return kwargs


def eos_ids_of(tokenizer: Any = None, model: Any = None) -> tuple[int, ...]:
    """The end-of-sequence id(s): the model's generation_config first, then the tokenizer's."""
    ids: list[int] = []
    cfg = getattr(model, "generation_config", None)
    for source in (getattr(cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for t in ([source] if isinstance(source, int) else list(source)):
            if int(t) not in ids:
                ids.append(int(t))
        if ids:
            break
    return tuple(ids)


def expand_params(params: Union[SamplingParams, Sequence[SamplingParams]], rows: int,
                  input_ids: Optional[torch.Tensor] = None, *, our_draw: bool = True
                  ) -> tuple[list[SamplingParams], list[int]]:
    """Per-row params and sequence indices for ``rows`` rows.

    ``generate`` lays out ``num_return_sequences=k`` as each prompt's k rows consecutive
    (``repeat_interleave``); sequence index j = 0..k-1 keys row j's seeded stream, as ``n``
    does in :func:`samplers.generate`.

    * A list of P SamplingParams, one per prompt: rows must be P * k for a whole k
      (``num_return_sequences=k``; k = 1 gives one row each), and each prompt has k rows,
      sequences 0..k-1. An element's ``n`` must be 1 (then k comes from the row count alone)
      or k: an element with ``n > 1`` and ``n != k`` is a ``ValueError`` naming its index, its
      n and k (pass ``num_return_sequences=n``), and so is ``n > 1`` with one row per
      element (k = 1: ``num_return_sequences`` forgotten).
    * One SamplingParams ``p``: it applies to every prompt, and each prompt has ``p.n`` rows
      (pass ``num_return_sequences=p.n``): row r is sequence ``r % p.n`` of its prompt, so the
      rows are exactly those of ``samplers.generate(prompts, p)`` (for one prompt, the same as
      ``[p]``). ``rows`` must be a multiple of ``p.n``.

    With ``input_ids`` (the prompts as ``generate`` passes them, one row per sequence), the
    layout of one SamplingParams is checked, because nothing else tells the processor what
    ``num_return_sequences`` is: a ``ValueError`` if a prompt's ``p.n`` rows are not copies of
    one prompt (``num_return_sequences`` != n), or if ``p`` is seeded (or greedy), ``our_draw``
    (the processor's "choose" mode: our draw picks the tokens) and two consecutive prompts
    are the same (``num_return_sequences`` larger than n, e.g. n=1 with k > 1): their rows
    would draw the same tokens, k identical sequences. This is the rule vLLM's adapter
    applies to a seed with n > 1 (``validate_params``). To give the same prompt twice on
    purpose, pass a list of SamplingParams.
    """
    if isinstance(params, SamplingParams):
        n = params.n
        if rows % n:
            raise ValueError(f"n={n}, but generate() passed {rows} rows, not a multiple of n: each prompt "
                             f"needs n rows, pass num_return_sequences={n}")
        if input_ids is not None:
            _check_copies(params, input_ids, our_draw)
        return [params] * rows, [r % n for r in range(rows)]
    params = list(params)
    if not params or rows % len(params):
        raise ValueError(f"got {len(params)} SamplingParams for {rows} rows: give one, one per row, "
                         f"or one per prompt with num_return_sequences rows each")
    k = rows // len(params)
    # An element's n is a number of sequences the user asked for; generate() gives each
    # prompt k rows, so any other n > 1 would silently yield k sequences instead of n.
    wrong = next((i for i, p in enumerate(params) if p.n > 1 and p.n != k), None)
    if wrong is not None:
        n = params[wrong].n
        raise ValueError(f"params[{wrong}] has n={n}, but generate() passed {rows} rows for {len(params)} "
                         f"SamplingParams, k={k} rows per prompt: an element's n must be 1 or k, pass "
                         f"num_return_sequences={n}")
    return [p for p in params for _ in range(k)], [j for _ in params for j in range(k)]


def _check_copies(params: SamplingParams, input_ids: torch.Tensor, our_draw: bool) -> None:
    """The layout check of :func:`expand_params` for one SamplingParams (vectorised: one
    compare of the prompt tensor, on the first call only)."""
    n = params.n
    rows = input_ids.shape[0]
    groups = input_ids.reshape(rows // n, n, -1)
    if n > 1:
        differs = (groups != groups[:, :1]).flatten(1).any(1)
        if bool(differs.any()):
            g = int(differs.nonzero()[0])
            raise ValueError(
                f"n={n}, but rows {g * n}..{g * n + n - 1} that generate() passed are not {n} copies of one "
                f"prompt: num_return_sequences must equal n (each prompt's n rows are its n sequences)")
    # Only our draw is deterministic per (seed, sequence index); generate's own draw (mode
    # "process") tells copies apart.
    if our_draw and (params.seed is not None or params.is_greedy) and groups.shape[0] > 1:
        heads = groups[:, 0]
        same = (heads[1:] == heads[:-1]).all(1)
        if bool(same.any()):
            g = int(same.nonzero()[0])
            why = f"seed={params.seed}" if params.seed is not None else "greedy sampling (temperature 0)"
            raise ValueError(
                f"{why} with n={n}: rows {g * n} and {(g + 1) * n} hold the same prompt with the same sequence "
                f"indices, so they would draw the same tokens (num_return_sequences larger than n?). Set "
                f"n=num_return_sequences (sequence j draws the stream (seed, j)), or pass a list of "
                f"SamplingParams (one per prompt, or one per row) to give a prompt twice on purpose")


def apply_user_processors(logits: torch.Tensor, params: Sequence[SamplingParams],
                          outputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run each row's ``logits_processors`` ``(output_token_ids, logits_row) -> logits_row``
    in order, on a copy. Only rows that have processors are visited."""
    rows = [b for b, p in enumerate(params) if p.logits_processors]
    if not rows:
        return logits
    logits = logits.clone()
    for b in rows:
        row = logits[b]
        for proc in params[b].logits_processors:
            row = proc(list(outputs[b]), row)
        logits[b] = row
    return logits


class SamplersLogitsProcessor(_HFLogitsProcessor):
    """Runs our sampler pipeline as a ``transformers`` logits processor.

    Args:
        params: one SamplingParams for every prompt (each with ``n`` rows: pass
            ``num_return_sequences=n``), or a list, one per prompt with
            ``num_return_sequences=k`` rows each (k = 1: one per row), each element's ``n``
            1 or k. See :func:`expand_params` for the sequence indices and the ValueErrors of
            a layout that would repeat a seeded sequence or ignore an element's ``n``.
        eos_token_ids: the model's EOS id(s), banned while a row is below ``min_tokens``.
        attention_mask: the prompt's attention mask, when prompts are left-padded: padding
            is then left out of each row's history (DRY, penalties, n-grams read it). It
            belongs to the first generation that starts after it (see below).
        pipeline: a SamplerPipeline (default: the torch/auto backend, generator from ``seed``).
        mode: "choose" (default) returns a one-hot mask of our drawn token (works with
            do_sample False or True); "process" returns the processed logits and lets
            generate draw (its own unseeded multinomial, so only the distribution matches).

    The first call fixes the prompt: ``input_ids`` then holds the prompts. A later call
    continues the generation exactly when its ``input_ids`` are the previous call's plus one
    column (the token chosen last step); any other call (another batch size or length, or a
    different prefix, such as a new prompt that happens to be one token longer) starts a new
    generation, so one processor can serve several ``generate`` calls one after the other.
    By that rule, ``generate(input_ids=previous_output)`` continues the previous generation
    (history, ``min_tokens`` and seeded step count go on, as one longer ``generate`` would);
    call :meth:`reset` first to start afresh from it.

    An ``attention_mask`` (given here or to :meth:`reset`) is that of one set of prompts: it
    belongs to the first generation that starts after it was given. A later generation on
    the very same ``input_ids`` (``generate`` run again on the same inputs) keeps it; one on
    other prompts while a mask is set is a ``ValueError``: call
    ``reset(attention_mask=new_mask)`` with the new prompts' mask first, or ``reset()`` for
    none. After each step,
    ``last_output`` holds the SamplerOutput (tokens, logprobs, top logprobs) and
    ``outputs`` the per-step list of them.
    """

    def __init__(
        self,
        params: Union[SamplingParams, Sequence[SamplingParams]],
        *,
        eos_token_ids: Union[int, Sequence[int], None] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pipeline: Optional[SamplerPipeline] = None,
        seed: Optional[int] = None,
        mode: str = "choose",
    ) -> None:
        if mode not in ("choose", "process"):
            raise ValueError(f"mode must be 'choose' or 'process', got {mode!r}")
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.attention_mask = attention_mask
        # the first-call input_ids of the generation that attention_mask was applied to (None:
        # not applied yet); another generation may reuse the mask only on these same prompts
        self._mask_prompts: Optional[torch.Tensor] = None
        self.pipeline = pipeline if pipeline is not None else SamplerPipeline("auto", seed=seed)
        self.mode = mode
        self.batch: Optional[SamplingBatch] = None
        self.row_params: list[SamplingParams] = []
        self.prompt_length = 0
        self._seen_length = 0
        # the input_ids seen so far ([rows, capacity], the first _seen_length columns valid):
        # a call continues only if its prefix equals them
        self._ids: Optional[torch.Tensor] = None
        self.last_output: Optional[SamplerOutput] = None
        self.outputs: list[SamplerOutput] = []

    # -------------------------------------------------------------- state
    def _start(self, input_ids: torch.Tensor, vocab_size: int, device: torch.device) -> SamplingBatch:
        rows = input_ids.shape[0]
        mask = self.attention_mask
        owner = self._mask_prompts
        if mask is not None and owner is not None and not (
                owner.shape == input_ids.shape and torch.equal(owner, input_ids.to(owner.device))):
            # the mask is the previous prompts': applied to these it would keep or drop the
            # wrong tokens (or fail on a shape that merely differs)
            raise ValueError(
                f"attention_mask was given for the prompts of an earlier generation "
                f"({tuple(owner.shape)} input_ids), and a new generation starts on other prompts "
                f"({tuple(input_ids.shape)} input_ids): call reset(attention_mask=...) with the new prompts' "
                f"attention mask before this generate(), or reset() for none")
        self.row_params, seq_idx = expand_params(self.params, rows, input_ids, our_draw=self.mode == "choose")
        prompts = input_ids.tolist()
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] != input_ids.shape[1]:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but generate() passed prompts of "
                                 f"{input_ids.shape[1]} tokens: give the [prompts, {input_ids.shape[1]}] mask of "
                                 f"the prompts passed to generate()")
            if mask.shape[0] != rows:  # one mask row per prompt, rows expanded by n
                if rows % mask.shape[0]:
                    raise ValueError(f"attention_mask has {mask.shape[0]} rows, but generate() passed {rows} "
                                     f"rows, not a multiple: give the mask of the prompts passed to generate()")
                mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)
            keep = mask.bool().tolist()
            prompts = [[t for t, k in zip(row, m) if k] for row, m in zip(prompts, keep)]
        batch = self.batch = SamplingBatch(self.row_params, prompts, None, vocab_size=vocab_size, device=device,
                                           eos_token_ids=self.eos_token_ids, sequence_indices=seq_idx)
        L = input_ids.shape[1]
        self.prompt_length = L
        self._seen_length = L
        # a copy, not a reference: a caller may reuse its buffer for the next prompt
        self._ids = input_ids.new_empty((rows, max(2 * L, L + 64)))
        self._ids[:, :L] = input_ids
        self._outputs: list[list[int]] = [[] for _ in range(rows)]
        self.outputs = []
        if mask is not None and owner is None:  # recorded once the mask was applied without error
            self._mask_prompts = input_ids.clone()
        return batch

    def reset(self, *, attention_mask: Optional[torch.Tensor] = None) -> None:
        """Forget the current generation; the next call starts a new one.

        ``attention_mask`` is the mask of the next generation's prompts (left padding), which
        replaces the current one; ``None`` (the default) means no mask."""
        self.batch = None
        self._ids = None
        self.attention_mask = attention_mask
        self._mask_prompts = None

    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` are the previous call's plus one column (one B x L compare
        on the ids' device; no per-row or per-token Python work)."""
        seen = self._ids
        if self.batch is None or seen is None:
            return False
        B, L = input_ids.shape
        if B != seen.shape[0] or L != self._seen_length + 1 or input_ids.device != seen.device:
            return False
        return torch.equal(input_ids[:, :-1].to(seen.dtype), seen[:, :L - 1])

    def _record_column(self, input_ids: torch.Tensor) -> None:
        """Store the new last column, doubling the buffer when full (amortised O(B) per step)."""
        L = input_ids.shape[1]
        ids = self._ids
        assert ids is not None  # called on a continued generation (_continues)
        if L > ids.shape[1]:
            grown = ids.new_empty((ids.shape[0], 2 * ids.shape[1]))
            grown[:, :L - 1] = ids[:, :L - 1]
            self._ids = ids = grown
        ids[:, L - 1] = input_ids[:, -1]

    # -------------------------------------------------------------- the hook
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape
        length = input_ids.shape[1]
        batch = self.batch
        if batch is None or not self._continues(input_ids):
            batch = self._start(input_ids, V, scores.device)
        else:
            new = input_ids[:, -1]
            batch.append(new)
            self._record_column(input_ids)
            self._seen_length = length
            if any(p.logits_processors for p in self.row_params):
                for b, t in enumerate(new.tolist()):
                    self._outputs[b].append(t)
        logits = apply_user_processors(scores, self.row_params, self._outputs)
        if self.mode == "process":
            return self.pipeline.process(logits, batch)
        out = self.pipeline.sample(logits, batch)
        self.last_output = out
        self.outputs.append(out)
        onehot = torch.full_like(scores, float("-inf"))
        onehot.scatter_(1, out.token_ids.unsqueeze(1).to(scores.device), 0.0)
        return onehot
