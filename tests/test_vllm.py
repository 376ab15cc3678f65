"""SamplersLogitsProcessor under the V1 model runner's interface, against vLLM's real classes
(CPU).

Skipped when vllm is not installed, or has no V1 runner (0.34 removed it: test_vllm_v2.py
covers Model Runner V2, test_vllm_params.py what both share). The processor's output on each active row must equal
the pipeline's on the same row built from scratch, over several steps of adds, removes,
condensing moves and swaps made the way vLLM's persistent batch makes them.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

pytest.importorskip("vllm.v1.sample.logits_processor")

from vllm import SamplingParams as VllmParams  # noqa: E402
from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdateBuilder,
    LogitsProcessor,
    LogitsProcessors,
    MoveDirectionality,
)

from samplers import SamplerPipeline  # noqa: E402
from samplers.integrations.vllm import (  # noqa: E402
    EXTRA_ARGS_KEY,
    SamplersLogitsProcessor,
    parse_extra_args,
)

from vllm_rows import FQCN, expected_row, vparams  # noqa: E402

V = 64


def make_processor(vocab_size=None) -> SamplersLogitsProcessor:
    class _ModelConfig:
        def get_vocab_size(self):
            return vocab_size

    cfg = type("Cfg", (), {"model_config": _ModelConfig() if vocab_size else None})()
    proc = SamplersLogitsProcessor(cfg, torch.device("cpu"), False)
    proc.pipeline = SamplerPipeline(backend="torch", seed=0)
    return proc


# ---------------------------------------------------------------------- parameters
def test_subclass_and_argmax_invariance():
    assert issubclass(SamplersLogitsProcessor, LogitsProcessor)
    proc = make_processor()
    assert proc.is_argmax_invariant() is False
    lps = LogitsProcessors([proc])
    assert lps.non_argmax_invariant == [proc] and lps.argmax_invariant == []


def test_registration_by_fqcn_and_vllm_validation_hook():
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import (
        _load_logitsprocs_by_fqcns,
        validate_logits_processors_parameters,
    )

    assert _load_logitsprocs_by_fqcns([FQCN]) == [SamplersLogitsProcessor]
    assert _load_logitsprocs_by_fqcns([SamplersLogitsProcessor]) == [SamplersLogitsProcessor]
    validate_logits_processors_parameters([FQCN], vparams({"xtc_probability": 0.5}))
    with pytest.raises(VLLMValidationError, match="xtc_probability"):
        validate_logits_processors_parameters([FQCN], vparams({"xtc_probability": 5}))


# ---------------------------------------------------------------------- a persistent batch
class PersistentBatch:
    """The bookkeeping of vLLM's InputBatch that logits processors see (gpu_input_batch.py):
    removed slots are reused by adds, then the batch is condensed by moving the last rows
    into the holes (UNIDIRECTIONAL moves); swaps are SWAP moves."""

    def __init__(self):
        self.builder = BatchUpdateBuilder()
        self.slots: list = []  # per index: (vllm params, prompt, live output list) or None

    @property
    def num_reqs(self):
        return sum(s is not None for s in self.slots)

    def remove(self, index):
        self.builder.removed_append(index)
        self.slots[index] = None

    def add(self, params, prompt, output):
        index = self.builder.pop_removed()
        if index is None:
            index = len(self.slots)
            self.slots.append(None)
        self.slots[index] = (params, prompt, output)
        self.builder.added.append((index, params, prompt, output))
        return index

    def swap(self, i1, i2):
        self.slots[i1], self.slots[i2] = self.slots[i2], self.slots[i1]
        self.builder.moved.append((i1, i2, MoveDirectionality.SWAP))

    def condense(self):
        empty = self.builder.removed  # descending
        if not empty:
            return
        last = len(self.slots) - 1
        while empty:
            while last in empty:
                last -= 1
            hole = self.builder.peek_removed()
            if hole >= last:
                break
            self.builder.pop_removed()
            self.slots[hole], self.slots[last] = self.slots[last], None
            self.builder.moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
            last -= 1
        del self.slots[self.num_reqs:]

    def update(self):
        self.condense()
        return self.builder.get_and_reset(self.num_reqs)


def expected_logits(logits, slots):
    """Each active row processed alone, from a SamplingBatch built from scratch."""
    out = logits.clone()
    for i, (vp, prompt, output) in enumerate(slots):
        ours = parse_extra_args(vp.extra_args)
        if ours is None:
            continue
        out[i] = expected_row(logits[i], ours, vp, prompt, output)
    return out


BLOCKS = [
    {"dry_multiplier": 0.8, "dry_allowed_length": 2, "repetition_penalty": 1.3},
    {"min_p": 0.05, "temperature": 0.7, "frequency_penalty": 0.4, "presence_penalty": 0.2},
    {"no_repeat_ngram_size": 2, "top_k": 10, "sampler_priority": ["TOP_P_TOP_K", "TEMPERATURE"],
     "temperature": 1.5},
    {"xtc_probability": 0.7, "xtc_threshold": 0.02, "seed": 1234, "skew": 0.5},
    {"temperature": 0.0, "dry_multiplier": 1.0},  # greedy through our parameters
    {"logit_bias": {"3": 5.0, "7": -100}, "typical_p": 0.8, "min_tokens": 4},
    {"tfs": 0.9, "top_a": 0.1, "nsigma": 1.5, "smoothing_factor": 0.3},
    {},  # our block with every default: identity
]


def random_request(rng):
    prompt = [rng.randrange(V) for _ in range(rng.randrange(0, 12))]
    output = [rng.randrange(V) for _ in range(rng.randrange(0, 4))]
    if rng.random() < 0.3:
        return VllmParams(seed=rng.randrange(1000)), prompt, output  # not ours
    block = dict(rng.choice(BLOCKS))
    if rng.random() < 0.5:
        block = json.dumps(block)
    return vparams(block, seed=rng.choice([None, 7])), prompt, output


def run_steps(proc, pb, rng, steps, churn=True):
    for step in range(steps):
        if churn and pb.slots:
            for i in rng.sample(range(len(pb.slots)), k=min(len(pb.slots), rng.randrange(0, 3))):
                if pb.slots[i] is not None and rng.random() < 0.5:
                    pb.remove(i)
        if churn:
            for _ in range(rng.randrange(0, 3)):
                pb.add(*random_request(rng))
        proc.update_state(pb.update())
        if churn and pb.num_reqs >= 2 and rng.random() < 0.5:
            i1, i2 = rng.sample(range(pb.num_reqs), 2)
            pb.swap(i1, i2)
            proc.update_state(pb.update())
        if pb.num_reqs == 0:
            continue
        logits = torch.randn(pb.num_reqs, V, generator=torch.Generator().manual_seed(step)) * 3
        want = expected_logits(logits, pb.slots)
        got = proc.apply(logits.clone())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        same = torch.isinf(got) == torch.isinf(want)
        assert same.all(), f"step {step}: removed tokens differ"
        for i, (vp, _, output) in enumerate(pb.slots):
            if EXTRA_ARGS_KEY not in (vp.extra_args or {}):
                assert torch.equal(got[i], logits[i]), "a row without our parameters was changed"
            # vLLM appends the sampled token to the live list.
            finite = torch.isfinite(got[i]).nonzero().flatten().tolist()
            output.append(rng.choice(finite))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pipeline_over_adds_removes_moves_swaps(seed):
    rng = random.Random(seed)
    proc, pb = make_processor(), PersistentBatch()
    for _ in range(4):
        pb.add(*random_request(rng))
    run_steps(proc, pb, rng, steps=12)


def test_steady_state_appends_without_rebuild():
    rng = random.Random(5)
    proc, pb = make_processor(), PersistentBatch()
    for block in BLOCKS[:4]:
        pb.add(vparams(block), [rng.randrange(V) for _ in range(6)], [])
    pb.add(VllmParams(), [1, 2, 3], [])  # not ours
    run_steps(proc, pb, rng, steps=1, churn=False)
    assert proc.rebuilds == 1
    run_steps(proc, pb, rng, steps=6, churn=False)
    assert proc.rebuilds == 1  # every later step was one batch.append
    assert proc._seen.tolist() == [6] * 4  # the 7th token is read at the next apply
    # Removing a row and condensing reuses the held histories (select), no full rebuild.
    pb.remove(1)
    proc.update_state(pb.update())
    run_steps(proc, pb, rng, steps=3, churn=False)
    assert proc.rebuilds == 1


def test_joining_requests_build_only_their_own_rows():
    """A request that joins is built from its lists alone and merged with the held rows
    (their history state kept, advanced by the step's token); the results are those of a
    batch built from the live lists (run_steps)."""
    rng = random.Random(17)
    proc, pb = make_processor(), PersistentBatch()
    for block in BLOCKS[:5]:
        pb.add(vparams(block), [rng.randrange(V) for _ in range(9)], [rng.randrange(V)])
    run_steps(proc, pb, rng, steps=2, churn=False)
    assert (proc.rebuilds, proc.rows_built) == (1, 5)
    pb.add(vparams(BLOCKS[5]), [rng.randrange(V) for _ in range(7)], [])  # a new request
    proc.update_state(pb.update())
    run_steps(proc, pb, rng, steps=2, churn=False)
    assert (proc.rebuilds, proc.rows_built) == (1, 6)
    # A removal, a resumed request (with output) and a swap in one step.
    pb.remove(1)
    pb.add(vparams(BLOCKS[0]), [3, 1, 4, 1, 5], [9, 2, 6])
    pb.add(VllmParams(), [1, 2], [])  # not ours: never built
    proc.update_state(pb.update())
    pb.swap(0, 3)
    proc.update_state(pb.update())
    run_steps(proc, pb, rng, steps=3, churn=False)
    assert (proc.rebuilds, proc.rows_built) == (1, 7)
    # A joining request whose last token is a placeholder still at apply: the full build.
    pb.add(vparams(BLOCKS[1]), [2, 2], [5, -1])
    proc.update_state(pb.update())
    logits = torch.randn(pb.num_reqs, V)
    got = proc.apply(logits.clone())
    pb.slots[-1][2].pop()
    torch.testing.assert_close(got, expected_logits(logits, pb.slots))
    assert proc.rebuilds == 2


def test_rows_that_do_not_advance_and_async_placeholders():
    rng = random.Random(9)
    proc, pb = make_processor(), PersistentBatch()
    pb.add(vparams({"dry_multiplier": 1.0, "no_repeat_ngram_size": 2}), [1, 2, 3, 1, 2], [3])
    pb.add(vparams({"repetition_penalty": 1.5}), [4, 5], [])
    proc.update_state(pb.update())
    run_steps(proc, pb, rng, steps=2, churn=False)
    # A row still prefilling gets no token this step (chunked prefill): the other does.
    pb.slots[0][2].append(9)
    logits = torch.randn(2, V)
    torch.testing.assert_close(proc.apply(logits.clone()), expected_logits(logits, pb.slots))
    # Async scheduling: a -1 placeholder is in the list at update_state, replaced before apply.
    for _, _, out in pb.slots:
        out.append(-1)
    proc.update_state(None)
    for _, _, out in pb.slots:
        out[-1] = 11
    logits = torch.randn(2, V)
    torch.testing.assert_close(proc.apply(logits.clone()), expected_logits(logits, pb.slots))
    # A placeholder still there at apply is ignored (that token is not known yet).
    pb.slots[1][2].append(-1)
    logits = torch.randn(2, V)
    got = proc.apply(logits.clone())
    pb.slots[1][2].pop()
    torch.testing.assert_close(got, expected_logits(logits, pb.slots))


def run_chunked_prefill_steps(proc, pb, rng, steps, prefill, churn=False):
    """Like ``run_steps``, with chunked prefill: ``prefill[id(output list)]`` counts the steps
    a request still spends prefilling its prompt, during which vLLM samples no token for it
    (its output list does not grow). Each step is also checked against a processor that
    rebuilds its batch from the live lists every step."""
    rebuilt = make_processor()
    for step in range(steps):
        if churn:
            for i in range(len(pb.slots)):
                if pb.slots[i] is not None and rng.random() < 0.15:
                    pb.remove(i)
            for _ in range(rng.randrange(0, 2)):
                req = random_request(rng)
                prefill[id(req[2])] = rng.randrange(0, 4)
                pb.add(*req)
        proc.update_state(pb.update())
        if pb.num_reqs == 0:
            continue
        logits = torch.randn(pb.num_reqs, V, generator=torch.Generator().manual_seed(1000 + step)) * 3
        want = expected_logits(logits, pb.slots)
        got = proc.apply(logits.clone())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert (torch.isinf(got) == torch.isinf(want)).all(), f"step {step}: removed tokens differ"
        # The same requests in a processor that rebuilds from the live lists every step.
        rebuilt.requests = {i: rebuilt._new_request(vp, prompt, out) for i, (vp, prompt, out)
                            in enumerate(pb.slots) if EXTRA_ARGS_KEY in (vp.extra_args or {})}
        rebuilt._batch = None
        if rebuilt.requests:
            assert torch.equal(rebuilt.apply(logits.clone()), got)
        for i, (_, _, output) in enumerate(pb.slots):
            if prefill.get(id(output), 0) > 0:
                prefill[id(output)] -= 1  # a prompt chunk: no token for this row this step
                continue
            finite = torch.isfinite(got[i]).nonzero().flatten().tolist()
            output.append(rng.choice(finite))


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_prefill_appends_without_rebuild(seed):
    """Rows whose prompt is still being prefilled get no token in a step while the others
    decode: the held batch advances only the rows that got one (a masked append), with the
    results of a rebuild from the live lists, and without rebuilding."""
    rng = random.Random(seed)
    proc, pb = make_processor(), PersistentBatch()
    prefill = {}
    for j, block in enumerate(BLOCKS):
        output = [] if j % 3 else [rng.randrange(V)]
        prefill[id(output)] = rng.choice([0, 0, 1, 3, 6])
        pb.add(vparams(block, seed=rng.choice([None, 7])), [rng.randrange(4) for _ in range(8)], output)
    pb.add(VllmParams(), [1, 2, 3], [])  # not ours
    run_chunked_prefill_steps(proc, pb, rng, steps=1, prefill=prefill)
    assert proc.rebuilds == 1
    lengths = [len(out) for _, _, out in pb.slots]
    run_chunked_prefill_steps(proc, pb, rng, steps=12, prefill=prefill)
    assert proc.rebuilds == 1  # every later step was one (masked) batch.append
    grew = [len(out) - n for (_, _, out), n in zip(pb.slots, lengths)]
    assert len(set(grew)) > 1  # some rows did not advance on some steps
    # Removing a row still reuses the held histories (select), then masked appends go on.
    pb.remove(2)
    proc.update_state(pb.update())
    prefill[id(pb.slots[0][2])] = 2
    run_chunked_prefill_steps(proc, pb, rng, steps=4, prefill=prefill)
    assert proc.rebuilds == 1


def test_chunked_prefill_with_churn_matches_rebuilding():
    rng = random.Random(21)
    proc, pb, prefill = make_processor(), PersistentBatch(), {}
    for _ in range(4):
        req = random_request(rng)
        prefill[id(req[2])] = rng.randrange(0, 4)
        pb.add(*req)
    run_chunked_prefill_steps(proc, pb, rng, steps=15, prefill=prefill, churn=True)


def test_a_row_advanced_by_several_tokens_rebuilds():
    """Speculative decoding can accept several tokens of a row in one step: rebuilt from
    the live lists (also when another row did not advance)."""
    proc, pb = make_processor(), PersistentBatch()
    pb.add(vparams({"dry_multiplier": 1.0, "no_repeat_ngram_size": 2}), [1, 2, 3, 1, 2], [3])
    pb.add(vparams({"repetition_penalty": 1.5, "frequency_penalty": 0.5}), [4, 5], [])
    proc.update_state(pb.update())
    proc.apply(torch.randn(2, V))
    assert proc.rebuilds == 1
    pb.slots[0][2].extend([1, 2])
    logits = torch.randn(2, V)
    torch.testing.assert_close(proc.apply(logits.clone()), expected_logits(logits, pb.slots))
    assert proc.rebuilds == 2
    pb.slots[1][2].append(4)  # then one row advances by one, the other by none: no rebuild
    logits = torch.randn(2, V)
    torch.testing.assert_close(proc.apply(logits.clone()), expected_logits(logits, pb.slots))
    assert proc.rebuilds == 2
    del pb.slots[0][2][-1]  # a list that shrank (tokens discarded): rebuilt
    logits = torch.randn(2, V)
    torch.testing.assert_close(proc.apply(logits.clone()), expected_logits(logits, pb.slots))
    assert proc.rebuilds == 3


class VllmLogRecords(logging.Handler):
    """Records what reaches vLLM's own "vllm" logger (which does not propagate to the root)."""

    def __enter__(self):
        self.records = []
        logging.getLogger("vllm").addHandler(self)
        return self.records

    def __exit__(self, *exc):
        logging.getLogger("vllm").removeHandler(self)

    def emit(self, record):
        self.records.append(record)


def test_no_active_rows_is_identity_and_out_of_vocab_ids_logged_as_errors():
    proc, pb = make_processor(vocab_size=V), PersistentBatch()
    pb.add(VllmParams(), [1], [])
    proc.update_state(pb.update())
    logits = torch.randn(1, V)
    assert proc.apply(logits) is logits
    pb.add(vparams({"logit_bias": {"2": 10.0, str(V + 5): 3.0}}), [1], [])
    with VllmLogRecords() as records:
        proc.update_state(pb.update())
    # The engine cannot fail one request: the entry is left out, with an error line.
    assert [r.levelno for r in records] == [logging.ERROR]
    assert f"[{V + 5}] are outside the vocabulary [0, {V})" in records[0].getMessage()
    logits = torch.randn(2, V)
    got = proc.apply(logits.clone())
    assert torch.equal(got[0], logits[0])
    assert got[1, 2] == logits[1, 2] + 10.0


def test_log_lines_use_vllms_handler_and_format():
    """Our lines go through vLLM's configured handler (its format, its level), not Python's
    bare last-resort handler."""
    import vllm.logger
    from vllm.logging_utils import NewLineFormatter

    from samplers.integrations import vllm as integration

    # vLLM's engine puts its handler on the "vllm" logger (configure_logging); ours propagates there.
    vllm_logger = logging.getLogger("vllm")
    assert integration.logger.parent is vllm_logger and integration.logger.propagate
    proc, pb = make_processor(), PersistentBatch()
    bad = VllmParams()
    bad.extra_args = {EXTRA_ARGS_KEY: {"min_p": 7}}
    pb.add(bad, [1], [])
    with VllmLogRecords() as records:
        proc.update_state(pb.update())
    assert len(records) == 1
    record = records[0]
    record.__dict__.setdefault("vllm_process_name", "EngineCore")  # vLLM's record factory adds it
    line = NewLineFormatter(vllm.logger._FORMAT, vllm.logger._DATE_FORMAT).format(record)
    assert " ERROR " in line and "] samplers: request parameters ignored: min_p" in line


def test_offline_users_catch_vllm_validation_error():
    """vLLM re-raises our ValueError as VLLMValidationError, which is not a ValueError."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    with pytest.raises(VLLMValidationError) as info:
        validate_logits_processors_parameters([FQCN], vparams({"min_p": 2.0}))
    assert not isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, ValueError) and "min_p" in str(info.value)


def test_min_tokens_bans_vllm_stop_ids():
    proc, pb = make_processor(), PersistentBatch()
    vp = vparams({"min_tokens": 2}, stop_token_ids=[5, 6])
    pb.add(vp, [1, 2], [])
    proc.update_state(pb.update())
    got = proc.apply(torch.zeros(1, V))
    assert torch.isinf(got[0, [5, 6]]).all() and torch.isfinite(got[0, :5]).all()
    pb.slots[0][2].extend([1])
    pb.slots[0][2].extend([2])
    proc.update_state(None)
    got = proc.apply(torch.zeros(1, V))  # two tokens appended at once: rebuilt
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------- vLLM's own Sampler
def test_vllm_v1_sampler_end_to_end(monkeypatch):
    """vLLM's own Sampler, with vLLM's built-in processors and ours in its LogitsProcessors."""
    sampler_mod = pytest.importorskip("vllm.v1.sample.sampler")
    import vllm.utils.torch_utils

    # Without vllm._C vLLM does not recognise the CPU platform and thinks it can pin memory.
    monkeypatch.setattr(vllm.utils.torch_utils, "PIN_MEMORY", False)
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS
    from vllm.v1.sample.metadata import SamplingMetadata

    proc, pb = make_processor(), PersistentBatch()
    cfg = type("Cfg", (), {"scheduler_config": type("S", (), {"max_num_seqs": 8})()})()
    lps = LogitsProcessors([cls(cfg, torch.device("cpu"), False) for cls in BUILTIN_LOGITS_PROCESSORS]
                           + [proc])
    assert proc in lps.non_argmax_invariant
    pb.add(vparams({"temperature": 0.0, "dry_multiplier": 1.0, "repetition_penalty": 1.5}),
           [1, 2, 3, 1, 2], [3])
    pb.add(vparams({"top_k": 1, "repetition_penalty": 2.0}), [4, 5, 6], [])
    pb.add(vparams({"min_p": 0.5}, temperature=0.0), [7, 8], [9])  # vLLM's greedy
    pb.add(VllmParams(temperature=0.0), [1], [])  # not ours, greedy in vLLM
    # vLLM's own logit_bias runs before ours: the pipeline sees the biased logits.
    pb.add(vparams({"temperature": 0.0, "no_repeat_ngram_size": 1}, logit_bias={10: 50.0}), [10], [])
    sampler = sampler_mod.Sampler()
    for step in range(5):
        bu = pb.update()
        for lp in lps.all:
            lp.update_state(bu)
        B = pb.num_reqs
        temps = torch.tensor([vp.temperature for vp, _, _ in pb.slots])
        md = SamplingMetadata(
            temperature=temps, all_greedy=False, all_random=False, top_p=None, top_k=None,
            generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
            frequency_penalties=torch.zeros(B), presence_penalties=torch.zeros(B),
            repetition_penalties=torch.ones(B), output_token_ids=[s[2] for s in pb.slots],
            allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=lps,
        )
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(step))
        biased = logits.clone()
        biased[4, 10] += 50.0
        want = expected_logits(biased, pb.slots)
        tokens = sampler(logits.clone(), md).sampled_token_ids[:, 0].tolist()
        for i in range(B):
            assert tokens[i] == int(want[i].argmax()), f"step {step} row {i}"
        assert tokens[4] != 10  # biased up by vLLM, then banned by our no_repeat_ngram_size=1
        for i, (_, _, out) in enumerate(pb.slots):
            out.append(tokens[i])


def test_invalid_parameters_reaching_the_engine_are_ignored_not_fatal():
    proc, pb = make_processor(), PersistentBatch()
    bad = VllmParams()
    bad.extra_args = {EXTRA_ARGS_KEY: {"min_p": 7}}  # validate_params would have refused it
    pb.add(bad, [1], [])
    proc.update_state(pb.update())
    logits = torch.randn(1, V)
    assert torch.equal(proc.apply(logits.clone()), logits)


def test_processor_with_the_triton_backend():
    """The processor on the kernels path (Triton's interpreter on a CPU, CUDA on a GPU)
    against the torch reference, over the same kind of changing batch."""
    from samplers.pipeline import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("triton kernels not available")
    rng = random.Random(11)
    proc, pb = make_processor(), PersistentBatch()
    proc.pipeline = SamplerPipeline(backend="triton", seed=0)
    for _ in range(4):
        pb.add(*random_request(rng))
    run_steps(proc, pb, rng, steps=6)


def test_registered_twice_processes_once(monkeypatch):
    """Entry point plus --logits-processors gives vLLM two instances for one engine."""
    import vllm.utils.torch_utils
    from vllm.v1.sample.logits_processor import build_logitsprocs

    monkeypatch.setattr(vllm.utils.torch_utils, "PIN_MEMORY", False)  # see the Sampler test

    cfg = type("Cfg", (), {"speculative_config": None, "model_config": None,
                           "scheduler_config": type("S", (), {"max_num_seqs": 8})()})()
    lps = build_logitsprocs(cfg, torch.device("cpu"), False, False, [FQCN, SamplersLogitsProcessor])
    ours = [lp for lp in lps.non_argmax_invariant if isinstance(lp, SamplersLogitsProcessor)]
    # (three when the package is installed with its entry point)
    assert len(ours) >= 2 and [lp.duplicate for lp in ours] == [False] + [True] * (len(ours) - 1)
    pb = PersistentBatch()
    pb.add(vparams({"repetition_penalty": 2.0, "logit_bias": {"1": 3.0}}), [1, 2, 3], [])
    bu = pb.update()
    for lp in lps.all:
        lp.update_state(bu)
    logits = torch.randn(1, V)
    got = logits.clone()
    for lp in ours:
        got = lp.apply(got)
    torch.testing.assert_close(got, expected_logits(logits, pb.slots))
    # Another engine (another config) gets its own working instance.
    assert not make_processor().duplicate
