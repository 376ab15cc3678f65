"""SamplersLogitsProcessor under vLLM's Model Runner V2 interface, with vLLM's real classes
on the CPU (0.33 and 0.34; skipped when vllm is not installed).

vLLM's own ``RequestState`` buffers (``StagedWriteTensor`` / ``UvaBackedTensor``) are built on
the CPU with vLLM's fallback for platforms without pinned memory; their staged writes need
vLLM's Triton kernels, so the test writes a slot's tokens straight into the buffers' device
tensors (what ``apply_write`` and ``post_update`` do on a GPU). The processor's output on
each row must equal ``SamplerPipeline.process`` on that row's history built from scratch
(prompt, committed output, then the draft tokens before the row), over many steps with slot
recycling, rows reordered every step, declined rows, chunked prefill, preemption and
speculative rows.
"""

from __future__ import annotations

import dataclasses
import json
import random
import types

import numpy as np
import pytest
import torch

pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor")

from vllm import SamplingParams as VllmParams  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    LogitsProcessor as V2LogitsProcessor,
    LogitsProcRequestState,
)

from samplers import SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402
from samplers.integrations.vllm import (  # noqa: E402
    EXTRA_ARGS_KEY,
    SamplersLogitsProcessor,
    parse_extra_args,
)

from vllm_rows import FQCN, vparams  # noqa: E402
from vllm_rows import expected_row as request_row  # noqa: E402

V = 48
MAX_LEN = 96


@pytest.fixture
def cpu_buffers(monkeypatch):
    """vLLM's buffers on a CPU: its no-pinned-memory fallback (the CPU platform is not
    detected without vllm._C, so the platform's device type is set to "cpu")."""
    import vllm.utils.torch_utils as torch_utils
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils
    from vllm.platforms import current_platform

    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    if hasattr(buffer_utils, "is_pin_memory_available"):  # 0.34 asks for pinned memory itself
        monkeypatch.setattr(buffer_utils, "is_pin_memory_available", lambda: False)
    monkeypatch.setattr(torch_utils, "PIN_MEMORY", False)
    monkeypatch.setattr(current_platform, "device_type", "cpu")


def make_request_state(max_num_reqs=8, spec_steps=0):
    from vllm.v1.worker.gpu.states import RequestState

    return RequestState(max_num_reqs, MAX_LEN, 256, spec_steps, V, torch.device("cpu"))


def make_processor(req_state, cfg=None, spec=False):
    """Our processor on vLLM's buffers; ``spec``: an engine configured for speculative decoding
    (the host's sequence lengths are then upper bounds, not exact)."""
    if cfg is None:
        cfg = types.SimpleNamespace(speculative_config=object() if spec else None)
    proc = SamplersLogitsProcessor(cfg, LogitsProcRequestState.from_request_state(req_state))
    proc.pipeline = SamplerPipeline(backend="torch", seed=0)
    return proc


# ---------------------------------------------------------------------- loading
def test_every_loader_accepts_the_class():
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_by_fqcns,
        _load_v2_logitsprocs_plugins,
    )

    assert issubclass(SamplersLogitsProcessor, V2LogitsProcessor)
    assert _load_v2_logitsprocs_by_fqcns([FQCN, SamplersLogitsProcessor]) == [SamplersLogitsProcessor] * 2
    try:  # the V1 runner's loader too, where this vLLM still has it (<= 0.33)
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
        from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    except ImportError:
        pass
    else:
        assert issubclass(SamplersLogitsProcessor, V1LogitsProcessor)
        assert _load_logitsprocs_by_fqcns([FQCN]) == [SamplersLogitsProcessor]
    # Installed plugins (ours when the package is installed with its entry point) load too:
    # this raised "V1-interface plugins are not supported by the V2 model runner" before.
    plugins = _load_v2_logitsprocs_plugins()
    from importlib.metadata import entry_points

    if any(ep.value == FQCN for ep in entry_points(group="vllm.logits_processors")):
        assert SamplersLogitsProcessor in plugins


def test_v2_validator_and_build(cpu_buffers):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors,
        build_custom_logits_processors_params_validator,
    )

    validate = build_custom_logits_processors_params_validator([FQCN])
    validate(vparams({"min_p": 0.1}))
    with pytest.raises(VLLMValidationError, match=r"min_p must be in \[0, 1\]"):
        validate(vparams({"min_p": 3.0}))
    with pytest.raises(VLLMValidationError, match="also set vLLM's own seed"):
        validate(vparams({"seed": 3}, n=2))
    validate(vparams({"seed": 3}, n=2, seed=5))

    rs = make_request_state()
    cfg = object()
    procs = build_custom_logits_processors(cfg, rs, False, [FQCN, SamplersLogitsProcessor])
    ours = [p for p in procs if isinstance(p, SamplersLogitsProcessor)]
    assert len(ours) >= 2 and all(isinstance(p, V2LogitsProcessor) for p in ours)
    assert [p.duplicate for p in ours] == [False] + [True] * (len(ours) - 1)
    assert ours[0].req_states.all_token_ids is rs.all_token_ids
    assert ours[1].add_request(0, vparams({"min_p": 0.1})) is False  # the idle copy
    assert ours[0].add_request(0, vparams({"min_p": 0.1})) is True
    assert ours[0].add_request(1, vparams(None)) is False


def test_context_fields_are_the_real_dataclasses():
    """The test builds vLLM's own LogitsContext / LogitsProcRequestState; guard their fields."""
    assert [f.name for f in dataclasses.fields(LogitsContext)] == [
        "expanded_idx_mapping", "idx_mapping", "idx_mapping_np", "expanded_local_pos", "input_ids",
        "pos", "seq_lens_upper_bound_np"]
    assert [f.name for f in dataclasses.fields(LogitsProcRequestState)] == [
        "device", "max_num_reqs", "vocab_size", "all_token_ids", "prompt_len", "prefill_len", "total_len"]


# ---------------------------------------------------------------------- a model runner
@dataclasses.dataclass
class Req:
    vp: VllmParams
    prompt: list
    output: list
    slot: int = -1
    computed: int = 0  # tokens of prompt + output (the prefill) already fed
    prefill: int = 0  # tokens fed at the latest (re)fill


class Runner:
    """The bookkeeping of Model Runner V2 that a logits processor sees: slots from a free
    list (reused), the token buffers written as add_request / post_update write them, and a
    LogitsContext per step with the rows of the scheduled requests in a new order each step
    (prefill chunks: one row at the chunk's last position; decode: one row per token fed,
    the last committed token and then the draft tokens)."""

    def __init__(self, rng, max_num_reqs=8):
        self.rng = rng
        self.rs = make_request_state(max_num_reqs)
        self.free = list(range(max_num_reqs))
        self.reqs: list[Req] = []
        self.procs = []

    def add(self, req: Req):
        req.slot = self.free.pop()
        tokens = req.prompt + req.output
        req.prefill, req.computed = len(tokens), 0
        rs = self.rs
        rs.prompt_len.np[req.slot] = len(req.prompt)
        rs.prefill_len.np[req.slot] = len(tokens)
        rs.prompt_len.copy_to_uva()
        rs.prefill_len.copy_to_uva()
        rs.all_token_ids.gpu[req.slot] = -7  # a previous occupant's leftovers, never to be read
        rs.all_token_ids.gpu[req.slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        rs.total_len.gpu[req.slot] = len(tokens)
        for p in self.procs:
            p.add_request(req.slot, req.vp)
        self.reqs.append(req)

    def remove(self, req: Req):
        self.reqs.remove(req)
        self.free.append(req.slot)

    def step(self, spec=0):
        """Schedule every request; return (context, per-row (req, history, draft index))."""
        rng = self.rng
        for p in self.procs:
            p.apply_staged_writes()
        order = list(self.reqs)
        rng.shuffle(order)
        rows, slot_of_row, local, input_ids, pos, upper = [], [], [], [], [], []
        for req in order:
            committed = req.prompt + req.output
            if req.computed < req.prefill:  # a prompt chunk
                chunk = rng.randint(1, req.prefill - req.computed)
                p = req.computed + chunk - 1
                hist = committed[: p + 1]
                rows.append((req, hist, None))
                slot_of_row.append(req.slot), local.append(0), input_ids.append(hist[-1]), pos.append(p)
                upper.append(req.computed + chunk)
                req._scheduled = ("prefill", chunk)
                continue
            k = rng.randint(0, spec) if spec else 0
            drafts = [rng.randrange(V) for _ in range(k)]
            fed = [committed[-1]] + drafts
            for j in range(k + 1):
                p = len(committed) - 1 + j
                rows.append((req, committed + drafts[:j], j))
                slot_of_row.append(req.slot), local.append(j), input_ids.append(fed[j]), pos.append(p)
            upper.append(len(committed) + k)
            req._scheduled = ("decode", drafts)
        idx_np = np.array([req.slot for req in order], dtype=np.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(slot_of_row, dtype=torch.int32),
            idx_mapping=torch.from_numpy(idx_np.copy()),
            idx_mapping_np=idx_np,
            expanded_local_pos=torch.tensor(local, dtype=torch.int32),
            input_ids=torch.tensor(input_ids, dtype=torch.int32),
            pos=torch.tensor(pos, dtype=torch.int64),
            # exact without speculative decoding (vLLM's scheduler knows every length), an
            # upper bound with it (drafts not yet verified)
            seq_lens_upper_bound_np=np.array(upper, dtype=np.int32) + (rng.randint(0, 3) if spec else 0),
        )
        return ctx, rows

    def commit(self, rows, out):
        """Accept drafts (a random prefix; the target's row must keep the draft finite) and
        one sampled token per decoding request, as post_update writes them."""
        rng = self.rng
        by_req: dict = {}
        for r, (req, _, j) in enumerate(rows):
            by_req.setdefault(id(req), []).append(r)
        for req in list(self.reqs):
            kind, arg = req._scheduled
            if kind == "prefill":
                req.computed += arg
                if req.computed < req.prefill:
                    continue  # no token sampled while the prompt is still being prefilled
                r = by_req[id(req)][0]
                new = [rng.choice(torch.isfinite(out[r]).nonzero().flatten().tolist())]
            else:
                rs_rows = by_req[id(req)]
                new = []
                for j, r in enumerate(rs_rows):
                    allowed = torch.isfinite(out[r]).nonzero().flatten().tolist()
                    if j < len(arg) and arg[j] in allowed and rng.random() < 0.7:
                        new.append(arg[j])  # draft accepted
                        continue
                    new.append(rng.choice(allowed))  # rejected here, or the bonus token
                    break
            start = len(req.prompt) + len(req.output)
            if start + len(new) >= MAX_LEN - 8:
                self.remove(req)
                continue
            self.rs.all_token_ids.gpu[req.slot, start: start + len(new)] = torch.tensor(new, dtype=torch.int32)
            self.rs.total_len.gpu[req.slot] = start + len(new)
            req.output.extend(new)
            req.computed = start + len(new) - 1  # the last sampled token is fed next step
            req.prefill = min(req.prefill, req.computed)


def expected_row(logits_row, vp, history, prompt_len):
    """The reference row of one request (``vllm_rows.expected_row``) for a history split at the
    request's prompt length, with vLLM's stop ids as the min_tokens ban list."""
    ours = parse_extra_args(vp.extra_args)
    if ours is None:
        return logits_row
    prompt_len = min(prompt_len, len(history))
    if ours.min_tokens:
        stops = sorted(set(vp.all_stop_token_ids) | set(ours.stop_token_ids))
        ours = dataclasses.replace(ours, max_tokens=None, stop_token_ids=stops)
    return request_row(logits_row, ours, vp, history[:prompt_len], history[prompt_len:])

BLOCKS = [
    {"dry_multiplier": 0.8, "dry_allowed_length": 2, "repetition_penalty": 1.3},
    {"min_p": 0.05, "temperature": 0.7, "frequency_penalty": 0.4, "presence_penalty": 0.2},
    {"no_repeat_ngram_size": 2, "top_k": 10, "sampler_priority": ["TOP_P_TOP_K", "TEMPERATURE"],
     "temperature": 1.5},
    {"xtc_probability": 0.7, "xtc_threshold": 0.02, "seed": 1234, "skew": 0.5},
    {"temperature": 0.0, "dry_multiplier": 1.0},  # greedy through our parameters
    {"logit_bias": {"3": 5.0, "7": -100}, "typical_p": 0.8, "min_tokens": 4},
    {"tfs": 0.9, "top_a": 0.1, "nsigma": 1.5, "smoothing_factor": 0.3, "seed": 5},
    {"min_tokens": 3, "dry_multiplier": 1.2, "dry_sequence_breaker_ids": [1, 2]},
    {},  # our block with every default: identity
]


def random_req(rng, output_len=0):
    prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 14))]  # small alphabet: repeats
    output = [rng.randrange(V) for _ in range(output_len)]
    if rng.random() < 0.3:
        return Req(VllmParams(seed=rng.randrange(1000)), prompt, output)  # declined
    block = dict(rng.choice(BLOCKS))
    if rng.random() < 0.5:
        block = json.dumps(block)
    return Req(vparams(block, seed=rng.choice([None, 7]), stop_token_ids=[rng.randrange(V)]), prompt, output)


def run(runner, proc, rng, steps, spec=0, churn=True, preempt=False):
    checked_rows = 0
    for step in range(steps):
        if churn:
            for req in list(runner.reqs):
                if rng.random() < 0.12:
                    runner.remove(req)
            while runner.free and rng.random() < 0.5:
                runner.add(random_req(rng))
        if preempt and runner.reqs and rng.random() < 0.3:
            # Preemption: the request leaves its slot and comes back in another (or the same)
            # one with prompt + output so far as its prefill (prefill_len > prompt_len).
            req = rng.choice(runner.reqs)
            runner.remove(req)
            runner.add(req)
        if not runner.reqs:
            continue
        rows, got, checked = step_and_compare(runner, proc, step, spec)
        checked_rows += checked
        runner.commit(rows, got)
    return checked_rows


def step_and_compare(runner, proc, step, spec=0):
    """One step of the processor, each row compared with the reference row on its history
    (a declined row must come back unchanged); returns (rows, output, rows compared)."""
    ctx, rows = runner.step(spec)
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(step)) * 3
    got = proc.apply(logits.clone(), ctx)
    checked = 0
    for r, (req, hist, _) in enumerate(rows):
        if EXTRA_ARGS_KEY not in (req.vp.extra_args or {}):
            assert torch.equal(got[r], logits[r]), "a declined row was changed"
            continue
        want = expected_row(logits[r], req.vp, hist, len(req.prompt))
        torch.testing.assert_close(got[r], want, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want)), f"step {step} row {r}"
        checked += 1
    return rows, got, checked


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pipeline_with_slot_recycling_and_reordering(cpu_buffers, seed):
    rng = random.Random(seed)
    runner = Runner(rng)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    for _ in range(5):
        runner.add(random_req(rng, output_len=rng.randrange(0, 3)))
    assert run(runner, proc, rng, steps=14) > 30
    assert 0 < proc.history_builds < 14  # carried on some steps, built on others


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_carried_histories_over_preemption_and_prefill_chunks(cpu_buffers, seed):
    """Without speculative decoding the history is carried between steps; every way a row
    can stop following its last step (a new request in a reused slot, a prompt chunk, a
    preempted request back with its output as prefill, a step a request sat out) must
    rebuild, with rows that equal the pipeline's on histories built from scratch."""
    rng = random.Random(100 + seed)
    runner = Runner(rng)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    for _ in range(6):
        runner.add(random_req(rng, output_len=rng.randrange(0, 3)))
    assert run(runner, proc, rng, steps=24, churn=False, preempt=True) > 60
    assert 0 < proc.history_builds < 24


def test_a_reused_slot_never_inherits_the_carried_history(cpu_buffers):
    """A resumed request (its output re-fed as prefill) taking the slot of one that left,
    one token longer than the history carried for that slot: rebuilt, not appended to."""
    rng = random.Random(6)
    runner = Runner(rng, max_num_reqs=1)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    block = {"repetition_penalty": 3.0, "presence_penalty": 1.0}

    def step_and_check():
        ctx, rows = runner.step()
        logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(len(rows[0][1]))) * 3
        got = proc.apply(logits.clone(), ctx)
        req, hist, _ = rows[0]
        torch.testing.assert_close(got[0], expected_row(logits[0], req.vp, hist, len(req.prompt)),
                                   rtol=1e-6, atol=1e-6)
        runner.commit(rows, got)

    a = Req(vparams(block), [1, 2, 3], [4, 5])
    runner.add(a)
    a.computed = a.prefill - 1  # one row at the last position: length 5
    step_and_check()  # the carried history: a's 5 tokens (a has sampled its 6th)
    assert proc.history_builds == 1
    runner.remove(a)
    b = Req(vparams(block), [7, 8], [9, 10, 11, 12])  # 6 tokens, its last one output
    runner.add(b)
    assert b.slot == a.slot
    b.computed = b.prefill - 1
    step_and_check()
    assert proc.history_builds == 2


def test_steady_state_decoding_carries_the_history(cpu_buffers):
    """Decode steps with the rows reordered every step and a request leaving: one build for
    the prompts, then only appends (and a select for the new row order)."""
    rng = random.Random(5)
    runner = Runner(rng)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    blocks = [{"dry_multiplier": 0.8, "repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
              {"min_tokens": 3, "presence_penalty": 0.5, "seed": 3}]
    for block in blocks * 2:
        req = Req(vparams(block, stop_token_ids=[5]), [rng.randrange(6) for _ in range(9)], [])
        runner.add(req)
        req.computed = req.prefill  # prompts already prefilled: every step is a decode step
        req.computed -= 1  # the last prompt token is fed with the first decode step
    checked = 0
    for step in range(12):
        if step == 6:
            runner.remove(runner.reqs[2])
        rows, got, compared = step_and_compare(runner, proc, step)
        checked += compared
        runner.commit(rows, got)
    assert checked >= 60 and proc.history_builds == 1


def test_joining_requests_build_only_their_own_rows(cpu_buffers):
    """Requests joining a decoding batch (one prefilled in one step, one in three chunks, a
    resumed one, one in a reused slot) build only their own rows' histories, merged with the
    carried ones; every row equals the pipeline's on histories built from scratch."""
    rng = random.Random(9)
    runner = Runner(rng)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    blocks = [{"dry_multiplier": 0.8, "repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
              {"min_tokens": 3, "presence_penalty": 0.5, "frequency_penalty": 0.3, "seed": 3}]

    def decoding(block, prompt_len, output=()):
        req = Req(vparams(block, stop_token_ids=[5]), [rng.randrange(6) for _ in range(prompt_len)],
                  list(output))
        runner.add(req)
        return req

    for block in blocks:
        req = decoding(block, 9)
        req.computed = req.prefill - 1  # prefilled: the last prompt token is fed with the first step
    built = []  # rows built at each step
    for step in range(14):
        if step == 3:
            req = decoding(blocks[0], 7)
            req.computed = req.prefill - 1  # joins with its whole prompt at once
        if step == 6:
            decoding(blocks[2], 12)  # joins in prompt chunks
        if step == 9:
            left = runner.reqs[1]
            runner.remove(left)
            runner.add(left)  # resumed: its output so far re-fed as prefill, perhaps in chunks
            decoding(blocks[1], 5, output=[3, 4]).computed = 6  # one row (in left's old slot)
        before = proc.history_rows_built
        rows, got, compared = step_and_compare(runner, proc, step)
        assert compared == len(rows)
        built.append(proc.history_rows_built - before)
        # Only rows of requests in prefill are built (one fed a single output token, a resumed
        # request's second chunk, may be carried); decoding rows never are.
        prefilling = sum(req._scheduled[0] == "prefill" for req in runner.reqs)
        assert built[-1] <= prefilling, (step, built)
        runner.commit(rows, got)
    assert proc.history_builds == 1  # the first step; every later one merged or carried
    assert built[0] == 3 and sum(built[1:]) >= 4 and max(built[1:]) <= 2, built


def test_processor_with_the_triton_backend(cpu_buffers):
    """The V2 processor on the kernels path (Triton's interpreter on a CPU) against the torch
    reference, carried and built steps alike."""
    from samplers.pipeline import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("triton kernels not available")
    rng = random.Random(12)
    runner = Runner(rng)
    proc = make_processor(runner.rs)
    proc.pipeline = SamplerPipeline(backend="triton", seed=0)
    runner.procs.append(proc)
    for _ in range(4):
        runner.add(random_req(rng, output_len=rng.randrange(0, 3)))
    assert run(runner, proc, rng, steps=8, churn=False) > 15
    assert proc.history_builds < 8


def test_speculative_rows_and_preemption(cpu_buffers):
    rng = random.Random(7)
    runner = Runner(rng)
    proc = make_processor(runner.rs, spec=True)
    runner.procs.append(proc)
    for _ in range(5):
        runner.add(random_req(rng))
    assert run(runner, proc, rng, steps=14, spec=3, preempt=True) > 40
    assert proc.history_builds == 14  # upper bounds: never carried


def test_slot_reuse_resets_state_and_declined_batches_are_untouched(cpu_buffers):
    rng = random.Random(3)
    runner = Runner(rng, max_num_reqs=2)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    a = Req(vparams({"temperature": 0.0, "logit_bias": {"4": 100}}), [1, 2, 3], [])
    runner.add(a)
    ctx, rows = runner.step()
    logits = torch.randn(1, V)
    got = proc.apply(logits.clone(), ctx)
    assert got[0].argmax() == 4 and torch.isfinite(got[0]).sum() == 1
    runner.remove(a)
    b = Req(VllmParams(), [1, 2, 3], [])  # same slot, a request without our key
    runner.add(b)
    assert b.slot == a.slot
    ctx, rows = runner.step()
    logits = torch.randn(1, V)
    assert proc.apply(logits, ctx) is logits  # nothing of ours in the batch: no work at all


def test_seeded_rows_are_reproducible_whatever_the_batch(cpu_buffers):
    """The same seeded request alone and among others, in other slots and orders, with its
    prompt prefilled in one chunk or several: the same chosen tokens at each position."""
    block = {"temperature": 0.9, "xtc_probability": 0.5, "xtc_threshold": 0.05, "seed": 99}

    def tokens_of(rng, others, max_num_reqs):
        runner = Runner(rng, max_num_reqs=max_num_reqs)
        proc = make_processor(runner.rs)
        runner.procs.append(proc)
        for _ in range(others):
            runner.add(random_req(rng))
        target = Req(vparams(block), [3, 1, 4, 1, 5, 9, 2, 6], [])
        runner.add(target)
        for step in range(10):
            ctx, rows = runner.step()
            # the target's logits depend on its position only, the others' on the batch
            logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(100 + step))
            for r, (req, hist, _) in enumerate(rows):
                if req is target:
                    logits[r] = torch.randn(V, generator=torch.Generator().manual_seed(len(hist)))
            got = proc.apply(logits, ctx)
            r = next(r for r, (req, _, _) in enumerate(rows) if req is target)
            if len(rows[r][1]) >= len(target.prompt):  # a sampled position (not a prompt chunk)
                assert torch.isfinite(got[r]).sum() == 1
            runner.commit(rows, got)
            if target not in runner.reqs:
                break
        return target.output

    alone = tokens_of(random.Random(1), 0, 1)
    crowded = tokens_of(random.Random(2), 4, 8)
    n = min(len(alone), len(crowded))
    assert n >= 5 and alone[:n] == crowded[:n]


def test_logits_wider_than_the_request_state_vocabulary(cpu_buffers):
    """Should a model's logits have more columns than req_states.vocab_size, the processor
    follows the logits instead of failing the engine in the pipeline's shape check."""
    rng = random.Random(4)
    runner = Runner(rng, max_num_reqs=2)
    proc = make_processor(runner.rs)
    runner.procs.append(proc)
    req = Req(vparams({"repetition_penalty": 2.0, "logit_bias": {"50": 3.0}}), [1, 2, 3], [4])
    runner.add(req)
    ctx, rows = runner.step()
    logits = torch.randn(1, V + 8)
    got = proc.apply(logits.clone(), ctx)
    b = SamplingBatch([SamplingParams(repetition_penalty=2.0, logit_bias={50: 3.0})], [rows[0][1][:3]],
                      [rows[0][1][3:]], vocab_size=V + 8)
    assert torch.equal(got, SamplerPipeline(backend="torch").process(logits, b))
