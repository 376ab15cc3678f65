"""``samplers.generate``: our own generation loop over a Hugging Face causal LM.

One batch serves many requests, each with its own ``SamplingParams``: prompts are left-padded
(attention mask + position ids), the model runs with a KV cache, and every request-level
field is honoured here (SEMANTICS.md, "Request-level parameters"):

- ``n``: the request's row is repeated n times; sequence j draws from the stream keyed by
  (seed, j), so a seeded request gives the same n sequences whatever else is in the batch;
- ``seed``, ``max_tokens`` (None: up to the model's context), ``min_tokens`` (the EOS ids
  and ``stop_token_ids`` are banned below it, by the pipeline), ``stop`` (text; cut from the
  output unless ``include_stop_str_in_output``; not checked below ``min_tokens``),
  ``stop_token_ids``, ``ignore_eos``, ``logprobs``/``logprobs_mode``, ``prompt_logprobs``
  (raw model distribution), ``truncate_prompt_tokens`` (keep the last k prompt tokens),
  ``logits_processors`` (user callables ``(output_token_ids, logits_row) -> logits_row``, run
  on the raw logits before the samplers), ``detokenize``, ``skip_special_tokens``;
- streaming: ``generate(..., stream=True)`` returns an iterator of :class:`StreamDelta`
  (text deltas; text that could still become a stop string is held back until it is known
  not to be one, as is an incomplete UTF-8 character).

The prompt is run once per request and its KV cache copied to the request's n rows.
Finished rows are dropped from the batch (KV cache, attention mask, ``SamplingBatch``), so
they stop costing model and sampler work. The per-step work is batched: the finish checks
(EOS, stop ids, length) are tensor operations; the only per-row Python work is the
incremental detokenisation of rows that have stop strings or are streamed, and rows with
user ``logits_processors``. Token ids and logprobs are kept as per-step tensors and turned
into per-sequence lists once, at the end.

Needs the ``hf`` extra (transformers). ``samplers.generate`` is imported lazily, so
``import samplers`` does not import transformers.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union, overload

import torch

from .batch import SamplingBatch
from .integrations.hf import apply_user_processors, eos_ids_of
from .params import SamplingParams, _token_ids
from .pipeline import SamplerPipeline
from .sampling import top_logprobs

__all__ = ["generate", "CompletionOutput", "RequestOutput", "StreamDelta", "GenerationStream"]

Prompt = Union[str, Sequence[int]]


@dataclass
class CompletionOutput:
    """One of a request's n sequences."""

    index: int                      # j in 0..n-1
    text: str
    token_ids: list[int]
    finish_reason: str              # "stop" (EOS, stop token id or stop string) or "length"
    stop_reason: Union[int, str, None] = None   # the stop string or stop token id; None for EOS / length
    logprobs: Optional[list[dict[int, float]]] = None   # per token: {chosen: lp, then the top alternatives still in}
    cumulative_logprob: Optional[float] = None
    mean_entropy: Optional[float] = None       # of the processed distribution (collect_entropy=True)


@dataclass
class RequestOutput:
    """The result of one prompt."""

    request_index: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None  # None for the first token

    @property
    def texts(self) -> list[str]:
        return [o.text for o in self.outputs]


@dataclass
class StreamDelta:
    """A piece of one sequence's output: new text and the token ids produced since the last delta."""

    request_index: int
    index: int                      # j in 0..n-1
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: Optional[str] = None


class GenerationStream:
    """Iterator of :class:`StreamDelta`; ``results`` holds the RequestOutputs once exhausted."""

    def __init__(self, run: "_Run") -> None:
        self._run = run
        self._it = run.steps()

    def __iter__(self) -> Iterator[StreamDelta]:
        return self

    def __next__(self) -> StreamDelta:
        return next(self._it)

    @property
    def results(self) -> list[RequestOutput]:
        if self._run.results is None:
            raise RuntimeError("the stream is not exhausted yet")
        return self._run.results


# ---------------------------------------------------------------------------- helpers
def _select_cache(cache: Any, idx: torch.Tensor) -> Any:
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
        return cache
    return tuple(tuple(t[idx] for t in layer) for layer in cache)  # legacy tuple cache


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Detok:
    """Incremental detokenisation of one sequence (the prefix/read offsets method: decode a
    few tokens of context so tokenizers that drop leading spaces decode correctly, and wait
    while the text ends in an incomplete character)."""

    __slots__ = ("tok", "skip", "ids", "prefix", "read", "text")

    def __init__(self, tok: Any, skip: bool) -> None:
        self.tok, self.skip = tok, skip
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self) -> None:
        """At the end: whatever is left (an incomplete character decodes as U+FFFD)."""
        if self.read < len(self.ids):
            before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
            after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
            self.text += after[len(before):]
            self.prefix = self.read = len(self.ids)


class _SimpleBar:
    def __init__(self, total: int, desc: str = "", file=sys.stderr) -> None:
        self.total, self.n, self.desc, self.file = max(total, 1), 0, desc, file

    def update(self, k: int = 1) -> None:
        self.n += k
        filled = int(30 * min(self.n, self.total) / self.total)
        print(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total}", end="",
              file=self.file, flush=True)

    def close(self) -> None:
        print(file=self.file, flush=True)


def progress_bar(total: int, desc: str = "", leave: bool = False):
    """tqdm when installed, else a one-line text bar on stderr."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=leave)
    except ImportError:  # pragma: no cover
        return _SimpleBar(total, desc)


# ---------------------------------------------------------------------------- the loop
class _Run:
    def __init__(self, model, tokenizer, prompts, params, pipeline, eos_token_ids, max_model_len,
                 collect_entropy, progress, stream) -> None:
        self.model, self.tok, self.pipe = model, tokenizer, pipeline
        self.collect_entropy, self.progress, self.stream = collect_entropy, progress, stream
        self.results: Optional[list[RequestOutput]] = None
        if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, (str, Sequence)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of either, got "
                             f"{type(prompts).__name__}")
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, float))):
            prompts = [prompts]
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        self.params = params
        self.eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(tokenizer, model)
        self.pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), *self.eos) if t is not None), 0)
        self.prompt_texts: list[Optional[str]] = []
        self.prompt_ids: list[list[int]] = []
        for text, p in zip(prompts, params):
            if isinstance(text, str):
                ids = list(tokenizer(text)["input_ids"])
                self.prompt_texts.append(text)
            elif isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)):
                # integers only (no silent truncation of 1.5, no '3' or True)
                ids = list(_token_ids("prompt token ids", text))
                self.prompt_texts.append(None)
            else:
                raise ValueError(f"each prompt must be a string or a list of token ids, got {type(text).__name__}")
            if p.truncate_prompt_tokens is not None:
                ids = ids[-p.truncate_prompt_tokens:]
            if not ids:
                bos = getattr(tokenizer, "bos_token_id", None)
                ids = [bos if bos is not None else self.pad_id]
            self.prompt_ids.append(ids)
        cfg = model.config
        limit = max_model_len or getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_model_len = int(limit) if limit else 2048
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() \
            is not None else int(cfg.vocab_size)
        for r, ids in enumerate(self.prompt_ids):
            if any(t >= self.vocab_size for t in ids):
                raise ValueError(f"prompt {r} contains token id {max(ids)}, outside [0, vocab_size={self.vocab_size})")
        fwd: Mapping[str, inspect.Parameter]
        try:
            fwd = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            fwd = {}
        # transformers >= 5.2x names the KV cache ``cache``; earlier versions ``past_key_values``.
        self.cache_kw = "cache" if "cache" in fwd else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in fwd else (
            "num_logits_to_keep" if "num_logits_to_keep" in fwd else None)
        # guided decoding: compile (and so validate) every request's grammar before generation starts
        self.guided = None
        if any(p.has_guided_decoding for p in params):
            from .guided import GuidedDecoder

            self.guided = GuidedDecoder(tokenizer, self.vocab_size, self.eos)
            for p in params:
                spec = self.guided.spec(p)
                if spec is not None:
                    self.guided.compile(spec)

    # ------------------------------------------------------------------ steps
    def steps(self) -> Iterator[StreamDelta]:
        with torch.inference_mode():
            yield from self._steps()

    def _steps(self) -> Iterator[StreamDelta]:
        if not self.params:  # generate(model, tok, []): no request, no output
            self.results = []
            return
        model, tok = self.model, self.tok
        device = next(model.parameters()).device
        # rows: (request, sequence index)
        row_req = [r for r, p in enumerate(self.params) for _ in range(p.n)]
        row_seq = [j for p in self.params for j in range(p.n)]
        R = len(row_req)
        row_params = [self.params[r] for r in row_req]
        prompts = [self.prompt_ids[r] for r in row_req]
        plen = [len(x) for x in prompts]
        L = max(plen)
        max_new = [p.max_tokens if p.max_tokens is not None else self.max_model_len - n
                   for p, n in zip(row_params, plen)]
        max_new = [max(1, min(m, self.max_model_len - n)) for m, n in zip(max_new, plen)]
        if any(n >= self.max_model_len for n in plen):
            raise ValueError(f"a prompt has {max(plen)} tokens, the model's context is {self.max_model_len}: "
                             f"use truncate_prompt_tokens")

        # the prefill runs once per request (left-padded); its n rows are copies of it
        P = len(self.params)
        ids = torch.full((P, L), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((P, L), dtype=torch.int64)
        for r, x in enumerate(self.prompt_ids):
            ids[r, L - len(x):] = torch.tensor(x, dtype=torch.int64)
            mask[r, L - len(x):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        expand = torch.tensor(row_req, dtype=torch.int64, device=device)

        # per-row constants for the vectorised finish checks
        T = lambda v, dt=torch.int64: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        max_new_t = T(max_new)
        eos_t = T(list(self.eos) or [-1])
        stop_eos_t = T([not p.ignore_eos for p in row_params], torch.bool)
        width = max([len(p.stop_token_ids) for p in row_params] + [1])
        stop_tab = torch.full((R, width), -1, dtype=torch.int64)
        for b, p in enumerate(row_params):
            if p.stop_token_ids:
                stop_tab[b, :len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids)
        stop_tab = stop_tab.to(device)
        any_stop_ids = any(p.stop_token_ids for p in row_params)
        # rows whose text is followed step by step: stop strings or streaming
        track = [bool(p.detokenize and (p.stop or self.stream)) for p in row_params]
        detoks = [_Detok(tok, p.skip_special_tokens) if t else None for p, t in zip(row_params, track)]
        emitted = [0] * R              # characters already streamed
        searched = [0] * R             # text length already searched for stop strings
        finish: list[Optional[tuple[str, Union[int, str, None]]]] = [None] * R   # (reason, stop_reason)
        final_text: list[Optional[str]] = [None] * R
        max_stop = [max((len(s) for s in p.stop), default=0) for p in row_params]

        batch = SamplingBatch(row_params, prompts, None, vocab_size=self.vocab_size, device=device,
                              eos_token_ids=self.eos, sequence_indices=row_seq)
        active = torch.arange(R, device=device)           # global row id of each batch row
        active_list = list(range(R))
        tracked = [(i, g) for i, g in enumerate(active_list) if track[g]]   # (batch row, global row)
        wants_lp = any(p.logprobs is not None for p in row_params)
        # (a row asks for at most the whole vocabulary: the recorded width never exceeds it, so
        # logprobs=10**9 costs what logprobs=vocab_size does instead of a 10**9-wide pad)
        top_k_max = min(max([p.logprobs or 0 for p in row_params] + [0]), self.vocab_size)
        rec_rows, rec_tok, rec_lp, rec_top_ids, rec_top_vals = [], [], [], [], []
        entropy_sum = torch.zeros(R, dtype=torch.float64, device=device)
        has_user_procs = any(p.logits_processors for p in row_params)
        grows = self.guided.rows(row_params, device) if self.guided is not None else None
        pending = None      # the next step's guided bitmask: (bitmask [k, W], global rows of its k rows)

        # prefill
        want_prompt_lp = any(p.prompt_logprobs is not None for p in self.params)
        kw = {}
        if self.keep_kw and not want_prompt_lp:
            kw[self.keep_kw] = 1
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        cache = self._cache_of(out)
        self.prompt_logprobs = self._prompt_logprobs(out.logits, L) if want_prompt_lp else None
        logits = out.logits[:, -1, :].float()
        del out
        if R != P:
            logits, mask, pos = logits[expand], mask[expand], pos[expand]
            cache = _select_cache(cache, expand)
        last_pos = pos[:, -1]
        steps_max = max(max_new)
        bar = progress_bar(steps_max, "generate") if self.progress else None

        for step in range(steps_max):
            if has_user_procs:
                outs = self._outputs_of(batch)
                logits = apply_user_processors(logits, [row_params[g] for g in active_list], outs)
            if grows is not None:
                # the grammar mask, on the raw logits before every sampler
                if pending is None:
                    pending = grows.bitmask(active_list)[:2]
                logits = self._apply_guided(logits, pending, active_list)
            sampled = self.pipe.sample(logits, batch, return_processed=self.collect_entropy)
            tokens = sampled.token_ids
            if self.collect_entropy:
                # (the distribution the tokens were drawn from: a second ``process`` call would
                # toss other XTC coins for unseeded rows)
                processed = sampled.processed.double()
                logp = torch.log_softmax(processed, -1)
                ent = -(torch.where(logp > -math.inf, logp.exp() * logp, torch.zeros_like(logp))).sum(-1)
                entropy_sum.index_add_(0, active, ent)
            rec_rows.append(active)
            rec_tok.append(tokens)
            if wants_lp:
                rec_lp.append(sampled.logprobs)
                if top_k_max > 0:
                    # fixed width: the batch's largest ``logprobs`` shrinks (or drops to 0) as rows
                    # finish, e.g. when a guided row ends early; pad so the steps concatenate
                    ti, tv = sampled.top_logprobs if sampled.top_logprobs is not None else (
                        tokens.new_zeros((tokens.shape[0], 0)), torch.zeros((tokens.shape[0], 0), device=device))
                    if ti.shape[1] < top_k_max:
                        pad = top_k_max - ti.shape[1]
                        ti = torch.cat([ti, ti.new_full((ti.shape[0], pad), -1)], 1)
                        tv = torch.cat([tv, tv.new_full((tv.shape[0], pad), -math.inf)], 1)
                    rec_top_ids.append(ti)
                    rec_top_vals.append(tv)
            batch.append(tokens)
            n_out = step + 1
            # vectorised finish checks
            ended_by_token = (tokens.unsqueeze(1) == eos_t).any(1) & stop_eos_t[active]
            if any_stop_ids:
                ended_by_token = ended_by_token | (tokens.unsqueeze(1) == stop_tab[active]).any(1)
            done = ended_by_token | (max_new_t[active] <= n_out)
            if grows is not None:
                # advance the grammars; a row whose grammar is complete (it accepted a stop token,
                # or it now allows nothing but stop tokens) is finished: "stop"
                ended_g = grows.advance(active_list, tokens.tolist())
                bm, rows_g, complete = grows.bitmask(active_list)
                pending = (bm, rows_g)
                g_done = sorted(set(ended_g) | set(complete))
                for i in g_done:
                    if finish[active_list[i]] is None:
                        finish[active_list[i]] = ("stop", None)
                if g_done:
                    done[torch.tensor(g_done, dtype=torch.int64, device=device)] = True
            # detokenisation and stop strings: the tracked rows only
            deltas: list[StreamDelta] = []
            by_string: list[int] = []
            if tracked:
                tok_list = tokens.tolist()
                by_token_list = ended_by_token.tolist()
                done_list = done.tolist()
                for i, g in tracked:
                    d = detoks[g]
                    assert d is not None  # tracked rows have one
                    d.add(tok_list[i])
                    p = row_params[g]
                    if p.stop and n_out >= p.min_tokens and not by_token_list[i]:
                        hit = _find_stop(d.text, p.stop, max(0, searched[g] - max_stop[g] + 1))
                        searched[g] = len(d.text)
                        if hit is not None:
                            at, s = hit
                            final_text[g] = d.text[:at + len(s)] if p.include_stop_str_in_output else d.text[:at]
                            finish[g] = ("stop", s)
                            by_string.append(i)
                            continue
                    if self.stream and not done_list[i]:
                        safe = len(d.text) - (_held_back(d.text, p.stop) if p.stop else 0)
                        deltas.append(StreamDelta(row_req[g], row_seq[g], d.text[emitted[g]:safe], [tok_list[i]]))
                        emitted[g] = max(emitted[g], safe)
            if by_string:
                done[torch.tensor(by_string, dtype=torch.int64, device=device)] = True
            finished = by_string or bool(done.any())
            if finished:
                ended = ended_by_token.tolist()
                done_rows = done.nonzero().flatten().tolist()
                for i in done_rows:
                    g = active_list[i]
                    if finish[g] is None:
                        t = int(tokens[i])
                        if not ended[i]:
                            finish[g] = ("length", None)
                        elif row_params[g].ignore_eos or t not in self.eos:
                            finish[g] = ("stop", t)          # a stop token id
                        else:
                            finish[g] = ("stop", None)       # EOS
                    if self.stream:
                        deltas.append(self._final_delta(g, row_req, row_seq, detoks, emitted, final_text,
                                                        finish, int(tokens[i])))
            yield from deltas
            if bar is not None:
                bar.update(1)
            if finished:
                keep = (~done).nonzero().flatten()
                if keep.numel() == 0:
                    break
                keep_list = keep.tolist()
                active = active[keep]
                active_list = [active_list[i] for i in keep_list]
                tokens = tokens[keep]
                cache = _select_cache(cache, keep)
                mask = mask[keep]
                last_pos = last_pos[keep]
                batch = batch.select(keep)
                tracked = [(i, g) for i, g in enumerate(active_list) if track[g]]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=last_pos.unsqueeze(1),
                        use_cache=True, **{self.cache_kw: cache})
            cache = self._cache_of(out)
            logits = out.logits[:, -1, :].float()
            del out
        if bar is not None:
            bar.close()
        self.results = self._assemble(row_req, row_seq, row_params, rec_rows, rec_tok, rec_lp, rec_top_ids,
                                      rec_top_vals, finish, final_text, detoks, entropy_sum)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _apply_guided(logits: torch.Tensor, pending: tuple, active_list: list[int]) -> torch.Tensor:
        from .guided import apply_token_bitmask

        bm, rows_g = pending
        where = {g: i for i, g in enumerate(active_list)}
        sel = [k for k, g in enumerate(rows_g) if g in where]
        if not sel:
            return logits
        pos = torch.tensor([where[rows_g[k]] for k in sel], dtype=torch.int64, device=logits.device)
        if len(sel) != len(rows_g):
            bm = bm[torch.tensor(sel, dtype=torch.int64, device=bm.device)]
        return apply_token_bitmask(logits, bm, pos)

    def _cache_of(self, out: Any) -> Any:
        if self.cache_kw == "cache":
            return out["cache"]
        return out["past_key_values"]

    def _outputs_of(self, batch: SamplingBatch) -> list[list[int]]:
        h = batch.history
        toks, lens, plens = h.tokens.tolist(), h.lengths.tolist(), h.prompt_lengths.tolist()
        return [row[p:n] for row, p, n in zip(toks, plens, lens)]

    def _final_delta(self, g, row_req, row_seq, detoks, emitted, final_text, finish, token) -> StreamDelta:
        d = detoks[g]
        if d is None:
            text = ""
        else:
            if final_text[g] is None:
                d.flush()
                final_text[g] = d.text
            text = final_text[g][emitted[g]:]
            emitted[g] = len(final_text[g])
        return StreamDelta(row_req[g], row_seq[g], text, [token], True, finish[g][0])

    def _prompt_logprobs(self, logits: torch.Tensor, L: int) -> list:
        """Per request: None for the first prompt token, then {token: lp, top alternatives}."""
        result: list = [None] * len(self.params)
        for r, p in enumerate(self.params):
            if p.prompt_logprobs is None:
                continue
            ids = self.prompt_ids[r]
            n = len(ids)
            lp = torch.log_softmax(logits[r, L - n:L - 1].float(), -1)     # predicts ids[1:]
            target = torch.tensor(ids[1:], dtype=torch.int64, device=lp.device)
            chosen = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).tolist()
            k = p.prompt_logprobs
            if k > 0:
                top_ids, top_vals = top_logprobs(lp, min(k, lp.shape[-1]))  # (ties: lower token id first)
                tv, ti = top_vals.tolist(), top_ids.tolist()
            entries: list = [None]
            for t in range(n - 1):
                e = {ids[t + 1]: chosen[t]}
                if k > 0:
                    for i, v in zip(ti[t], tv[t]):
                        e.setdefault(i, v)
                entries.append(e)
            result[r] = entries
        return result

    def _assemble(self, row_req, row_seq, row_params, rec_rows, rec_tok, rec_lp, rec_top_ids, rec_top_vals,
                  finish, final_text, detoks, entropy_sum) -> list[RequestOutput]:
        R = len(row_req)
        rows = torch.cat(rec_rows).cpu()
        order = torch.sort(rows, stable=True).indices
        counts = torch.bincount(rows, minlength=R).tolist()
        toks = torch.cat(rec_tok).cpu()[order].split(counts)
        lps = torch.cat(rec_lp).cpu()[order].split(counts) if rec_lp else None
        tops = None
        if rec_top_ids:
            tops = (torch.cat(rec_top_ids).cpu()[order].split(counts),
                    torch.cat(rec_top_vals).cpu()[order].split(counts))
        ent = entropy_sum.cpu().tolist()
        outputs: list[list[CompletionOutput]] = [[] for _ in self.params]
        for g in range(R):
            p = row_params[g]
            ids = toks[g].tolist()
            if final_text[g] is not None:
                text = final_text[g]
            elif not p.detokenize:
                text = ""
            elif detoks[g] is not None:
                detoks[g].flush()
                text = detoks[g].text
            else:
                text = self.tok.decode(ids, skip_special_tokens=p.skip_special_tokens)
            reason, stop_reason = finish[g] if finish[g] is not None else ("length", None)
            c = CompletionOutput(index=row_seq[g], text=text, token_ids=ids, finish_reason=reason,
                                 stop_reason=stop_reason)
            if p.logprobs is not None and lps is not None:
                chosen = lps[g].tolist()
                k = p.logprobs
                # (this row's top ids and values)
                top = (tops[0][g][:, :k].tolist(), tops[1][g][:, :k].tolist()) if (tops is not None and k > 0) \
                    else None
                entries = []
                for t, (tid, v) in enumerate(zip(ids, chosen)):
                    e = {tid: v}
                    if top is not None:
                        for i, val in zip(top[0][t], top[1][t]):
                            if val > -math.inf:  # (a removed token fills a short row's last places)
                                e.setdefault(i, val)
                    entries.append(e)
                c.logprobs = entries
                c.cumulative_logprob = float(sum(chosen))
            if self.collect_entropy and ids:
                c.mean_entropy = ent[g] / len(ids)
            outputs[row_req[g]].append(c)
        return [RequestOutput(r, self.prompt_texts[r], self.prompt_ids[r], outputs[r],
                              self.prompt_logprobs[r] if self.prompt_logprobs else None)
                for r in range(len(self.params))]


def _find_stop(text: str, stops: Sequence[str], start: int) -> Optional[tuple[int, str]]:
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


# (the return type follows ``stream``, for type checkers: a list, or a stream of deltas)
@overload
def generate(model: Any, tokenizer: Any, prompts: Union[Prompt, Sequence[Prompt]],
             params: Union[SamplingParams, Sequence[SamplingParams], None] = ..., *,
             pipeline: Optional[SamplerPipeline] = ..., seed: Optional[int] = ..., stream: Literal[False] = ...,
             eos_token_ids: Optional[Sequence[int]] = ..., max_model_len: Optional[int] = ...,
             collect_entropy: bool = ..., progress: bool = ...) -> list[RequestOutput]: ...


@overload
def generate(model: Any, tokenizer: Any, prompts: Union[Prompt, Sequence[Prompt]],
             params: Union[SamplingParams, Sequence[SamplingParams], None] = ..., *,
             pipeline: Optional[SamplerPipeline] = ..., seed: Optional[int] = ..., stream: Literal[True],
             eos_token_ids: Optional[Sequence[int]] = ..., max_model_len: Optional[int] = ...,
             collect_entropy: bool = ..., progress: bool = ...) -> GenerationStream: ...


@overload
def generate(model: Any, tokenizer: Any, prompts: Union[Prompt, Sequence[Prompt]],
             params: Union[SamplingParams, Sequence[SamplingParams], None] = ..., *,
             pipeline: Optional[SamplerPipeline] = ..., seed: Optional[int] = ..., stream: bool = ...,
             eos_token_ids: Optional[Sequence[int]] = ..., max_model_len: Optional[int] = ...,
             collect_entropy: bool = ..., progress: bool = ...) -> Union[list[RequestOutput], GenerationStream]: ...


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Union[Prompt, Sequence[Prompt]],
    params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
    *,
    pipeline: Optional[SamplerPipeline] = None,
    seed: Optional[int] = None,
    stream: bool = False,
    eos_token_ids: Optional[Sequence[int]] = None,
    max_model_len: Optional[int] = None,
    collect_entropy: bool = False,
    progress: bool = False,
) -> Union[list[RequestOutput], GenerationStream]:
    """Generate from a Hugging Face causal LM with our samplers.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``), in eval mode.
        tokenizer: its tokenizer (``decode``, ``__call__``, ``eos_token_id``).
        prompts: a string, a list of token ids, or a list of either (one request each).
        params: one SamplingParams for every request, or one per request (default: defaults).
        pipeline: the SamplerPipeline (default: backend "auto", generator seeded by ``seed``
            for rows without their own seed).
        stream: return a :class:`GenerationStream` of :class:`StreamDelta` instead.
        eos_token_ids: default: the model's generation_config, else the tokenizer's.
        max_model_len: the context limit (default: the config's max_position_embeddings).
        collect_entropy: also measure each sequence's mean entropy of the processed
            distribution (costs a second ``process`` per step).
        progress: show a progress bar over the steps.

    Returns:
        One :class:`RequestOutput` per prompt (``outputs[j]`` is sequence j of its n).
    """
    pipe = pipeline if pipeline is not None else SamplerPipeline("auto", seed=seed)
    run = _Run(model, tokenizer, prompts, params, pipe, eos_token_ids, max_model_len, collect_entropy, progress,
               stream)
    if stream:
        return GenerationStream(run)
    for _ in run.steps():
        pass
    assert run.results is not None  # set once steps() is exhausted
    return run.results
