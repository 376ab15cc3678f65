"""The transformers LogitsProcessor adapter, and samplers' coexistence with transformers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from samplers import SamplingParams  # noqa: E402
from samplers.generation import generate  # noqa: E402
from samplers.integrations.hf import SamplersLogitsProcessor, neutral_generate_kwargs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n"]


@pytest.fixture(scope="module")
def tiny():
    from samplers.models import load_default

    return load_default()


def _hf_generate(model, tok, prompts, params, new_tokens, **extra):
    enc = tok(prompts, return_tensors="pt", padding=True)  # the embedded tokenizer pads on the left
    proc = SamplersLogitsProcessor(params, eos_token_ids=tok.eos_token_id, attention_mask=enc["attention_mask"])
    kwargs = neutral_generate_kwargs(model, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, **extra)
    out = model.generate(**enc, logits_processor=[proc], **kwargs)
    width = enc["input_ids"].shape[1]
    return out[:, width:].tolist(), proc


def _strip(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("do_sample", [False, True])
def test_processor_equals_our_loop(tiny, do_sample):
    model, tok = tiny
    params = [SamplingParams(seed=11, temperature=0.9, min_p=0.03, dry_multiplier=0.6, max_tokens=10),
              SamplingParams(seed=12, temperature=0.7, top_k=30, repetition_penalty=1.2, xtc_probability=0.5,
                             xtc_threshold=0.05, max_tokens=10)]
    ours = generate(model, tok, PROMPTS, params)
    theirs, proc = _hf_generate(model, tok, PROMPTS, params, 10, do_sample=do_sample)
    for r, row in zip(ours, theirs):
        assert _strip(row, tok.eos_token_id) == r.outputs[0].token_ids
    assert len(proc.outputs) >= 1 and proc.last_output.token_ids.shape == (2,)


def test_train_tiny_writes_the_shipped_tokenizer_config(tmp_path):
    """``train_tiny`` (two steps of a toy model here) writes the embedded tokenizer's config: a
    class name that transformers 4.x and 5.x both resolve, left padding, no token_type_ids."""
    from samplers.models import TINY_DIR

    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "samplers.models.train_tiny", "--out", str(out), "--vocab", "300",
                        "--corpus-bytes", "50000", "--hidden", "16", "--layers", "1", "--heads", "2", "--seq", "16",
                        "--batch", "2", "--steps", "2", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    written = json.loads((out / "tokenizer_config.json").read_text())
    shipped = json.loads((TINY_DIR / "tokenizer_config.json").read_text())
    # (the keys that decide how it loads and what it returns; transformers 4.x writes more)
    keys = ("tokenizer_class", "model_input_names", "padding_side", "bos_token", "eos_token", "pad_token")
    assert {k: written.get(k) for k in keys} == {k: shipped.get(k) for k in keys}
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.padding_side == "left" and list(tok(["def f("]).keys()) == ["input_ids", "attention_mask"]


def test_embedded_tokenizer_pads_on_the_left(tmp_path):
    """The embedded model is decoder-only: batched, padded prompts given to HF's own generate
    continue as each prompt alone does, which needs left padding."""
    from samplers.models import TINY_DIR, load_default, load_tokenizer

    model, tok = load_default()  # fresh: the module fixture's tokenizer is shared
    assert tok.padding_side == "left" and load_tokenizer().padding_side == "left"
    auto = transformers.AutoTokenizer.from_pretrained(str(TINY_DIR), local_files_only=True)
    assert auto.padding_side == "left"
    # (no token_type_ids, which generate() refuses for this model: transformers 4.x's default)
    assert list(tok(PROMPTS[:1]).keys()) == list(auto(PROMPTS[:1]).keys()) == ["input_ids", "attention_mask"]
    kw = neutral_generate_kwargs(model, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    alone = []
    for prompt in PROMPTS:
        enc = tok([prompt], return_tensors="pt")
        alone.append(model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:].tolist())
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]  # one prompt is padded
    batched = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:].tolist()
    assert batched == alone


def test_neutral_kwargs_override_checkpoint_defaults(tiny):
    """A checkpoint whose generation_config sets sampling defaults changes nothing."""
    model, tok = tiny
    saved = model.generation_config
    cfg = transformers.GenerationConfig(**saved.to_dict())
    cfg.update(do_sample=True, temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.5,
               no_repeat_ngram_size=2)
    model.generation_config = cfg
    try:
        p = SamplingParams(seed=4, temperature=1.0, max_tokens=8)
        ours = generate(model, tok, PROMPTS[:1], p)[0].outputs[0].token_ids
        for do_sample in (False, True):
            theirs, _ = _hf_generate(model, tok, PROMPTS[:1], p, 8, do_sample=do_sample)
            assert _strip(theirs[0], tok.eos_token_id) == ours
    finally:
        model.generation_config = saved


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _generate_warnings(model, fn) -> list[str]:
    """What ``fn()`` logs at WARNING through transformers' loggers (which do not propagate to
    the root logger) plus what it warns through ``warnings``."""
    import warnings

    records = _Records()
    lib = logging.getLogger("transformers")
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # whatever TRANSFORMERS_VERBOSITY says
    lib.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        lib.removeHandler(records)
        transformers.logging.set_verbosity(before)
    return records.messages + [str(w.message) for w in caught]


# (the checkpoint's min_length with no model given is left out: the helper then sets
# min_new_tokens, and transformers' warning is due)
@pytest.mark.parametrize("checkpoint, pass_model", [({}, True), ({}, False), ({"min_length": 10}, True),
                                                    ({"min_new_tokens": 5}, True), ({"min_new_tokens": 5}, False)])
def test_neutral_kwargs_no_warning_and_no_min_length(tiny, checkpoint, pass_model):
    """generate() with neutral_generate_kwargs logs nothing (no "Both `min_new_tokens` and
    `min_length` seem to have been set") and applies no minimum length of its own: a row that
    wants EOS first gets it, also when the checkpoint sets min_length or min_new_tokens."""
    model, tok = tiny
    saved = model.generation_config
    cfg = transformers.GenerationConfig(**saved.to_dict())
    cfg.update(**checkpoint)
    model.generation_config = cfg
    try:
        eos = tok.eos_token_id
        proc = SamplersLogitsProcessor(SamplingParams(temperature=0, logit_bias={eos: 100.0}))
        enc = tok(PROMPTS[:1], return_tensors="pt")
        kwargs = neutral_generate_kwargs(model if pass_model else None, max_new_tokens=4, pad_token_id=eos)
        out = []
        said = _generate_warnings(model, lambda: out.append(model.generate(**enc, logits_processor=[proc], **kwargs)))
        assert said == []
        assert out[0][0, enc["input_ids"].shape[1]].item() == eos
    finally:
        model.generation_config = saved


def test_neutral_kwargs_set_one_minimum_length_field(tiny):
    model, _ = tiny
    kw = neutral_generate_kwargs(model)
    assert kw["min_length"] == 0 and "min_new_tokens" not in kw
    kw = neutral_generate_kwargs(None)
    assert kw["min_new_tokens"] == 0 and "min_length" not in kw
    kw = neutral_generate_kwargs(model, min_new_tokens=3)   # the caller's own, alone
    assert kw["min_new_tokens"] == 3 and "min_length" not in kw


def test_greedy_params_equal_hf_greedy(tiny):
    model, tok = tiny
    enc = tok(PROMPTS[:1], return_tensors="pt")
    plain = model.generate(**enc, **neutral_generate_kwargs(model, max_new_tokens=8, pad_token_id=0))
    ours, _ = _hf_generate(model, tok, PROMPTS[:1], SamplingParams(temperature=0), 8)
    assert plain[0, enc["input_ids"].shape[1]:].tolist() == ours[0]


def test_num_return_sequences_and_min_tokens(tiny):
    model, tok = tiny
    p = SamplingParams(seed=21, n=3, max_tokens=6, min_tokens=6)
    ours = generate(model, tok, PROMPTS[:1], p)[0]
    theirs, proc = _hf_generate(model, tok, PROMPTS[:1], [p], 6, num_return_sequences=3)
    assert theirs == [o.token_ids for o in ours.outputs]
    assert all(tok.eos_token_id not in row for row in theirs)


def test_one_params_with_n_equals_our_loop(tiny):
    """One seeded SamplingParams with n=k and num_return_sequences=k: each prompt's k rows are
    its sequences 0..k-1, the same as samplers.generate (not k copies of sequence 0)."""
    model, tok = tiny
    p = SamplingParams(seed=5, n=3, max_tokens=8)
    ours = generate(model, tok, PROMPTS, p)
    theirs, _ = _hf_generate(model, tok, PROMPTS, p, 8, num_return_sequences=3)
    want = [o.token_ids for r in ours for o in r.outputs]
    assert [_strip(row, tok.eos_token_id) for row in theirs] == want
    assert len({tuple(w) for w in want}) == 6  # the case is not trivial: six different sequences


def test_one_params_expansion_rule():
    from samplers.integrations.hf import expand_params

    p = SamplingParams(seed=1, n=2)
    rows, idx = expand_params(p, 6)
    assert rows == [p] * 6 and idx == [0, 1, 0, 1, 0, 1]
    assert expand_params(SamplingParams(), 3)[1] == [0, 0, 0]
    assert expand_params([SamplingParams(seed=1)], 3)[1] == [0, 1, 2]  # a list of n=1: k from the row count


def test_list_params_refuse_an_n_that_is_not_k():
    """A list element's n must be 1 or k = rows / len(params): generate() gives each prompt
    k rows, so any other n would silently give k sequences instead of n."""
    from samplers.integrations.hf import expand_params

    one, three = SamplingParams(seed=1), SamplingParams(seed=1, n=3)
    with pytest.raises(ValueError, match=r"params\[0\] has n=3.*k=2.*num_return_sequences=3"):
        expand_params([three], 2)
    # one row per element (num_return_sequences forgotten): k = 1
    with pytest.raises(ValueError, match=r"params\[1\] has n=3.*k=1.*num_return_sequences=3"):
        expand_params([one, three], 2)
    with pytest.raises(ValueError, match=r"params\[1\] has n=2.*k=3.*num_return_sequences=2"):
        expand_params([three, SamplingParams(n=2)], 6)
    # through the processor, the layout generate() passes for n=2 without num_return_sequences
    with pytest.raises(ValueError, match=r"params\[0\] has n=2.*k=1"):
        _call([SamplingParams(seed=1, n=2)], [[5, 6, 7]])
    # allowed: n == k, and n == 1 beside it (k rows, sequences 0..k-1, as before)
    rows, idx = expand_params([one, three], 6)
    assert rows == [one] * 3 + [three] * 3 and idx == [0, 1, 2, 0, 1, 2]
    assert expand_params([one, one], 2)[1] == [0, 0]


def _call(params, ids, V=64):
    proc = SamplersLogitsProcessor(params)
    return proc(torch.tensor(ids), torch.randn(len(ids), V))


def test_one_params_refuses_a_layout_that_repeats_sequences():
    a, b = [5, 6, 7], [8, 9, 10]
    with pytest.raises(ValueError, match=r"n=3.*4 rows.*num_return_sequences=3"):
        _call(SamplingParams(seed=1, n=3), [a] * 4)
    # n=2 but num_return_sequences=1 over two prompts: the rows are not copies of one prompt
    with pytest.raises(ValueError, match=r"n=2.*not 2 copies.*num_return_sequences must equal n"):
        _call(SamplingParams(n=2), [a, b])
    # seeded n=1 with num_return_sequences=3: three rows of sequence 0, identical
    with pytest.raises(ValueError, match=r"seed=1 with n=1: rows 0 and 1 hold the same prompt"):
        _call(SamplingParams(seed=1), [a] * 3)
    # seeded n=2 with num_return_sequences=4: sequences 0, 1, 0, 1
    with pytest.raises(ValueError, match=r"seed=1 with n=2: rows 0 and 2"):
        _call(SamplingParams(seed=1, n=2), [a] * 4)
    with pytest.raises(ValueError, match=r"greedy"):
        _call(SamplingParams(temperature=0), [a, a])
    # allowed: distinct prompts; unseeded copies (the pipeline's generator tells them apart);
    # the same prompt twice on purpose, given as a list
    _call(SamplingParams(seed=1), [a, b, a])
    _call(SamplingParams(seed=1, n=2), [a, a, b, b])
    _call(SamplingParams(), [a] * 3)
    _call([SamplingParams(seed=1)] * 2, [a, a])
    # mode "process": generate draws, so seeded copies differ; only the n layout is checked
    SamplersLogitsProcessor(SamplingParams(seed=1), mode="process")(torch.tensor([a] * 3), torch.randn(3, 64))
    with pytest.raises(ValueError, match="not 2 copies"):
        SamplersLogitsProcessor(SamplingParams(n=2), mode="process")(torch.tensor([a, b]), torch.randn(2, 64))


def test_processor_mode_process_returns_processed_logits(tiny):
    model, tok = tiny
    proc = SamplersLogitsProcessor(SamplingParams(min_p=0.2), mode="process")
    ids = torch.tensor([[5, 6, 7]])
    scores = torch.randn(1, model.config.vocab_size)
    out = proc(ids, scores)
    p = torch.softmax(scores, -1)
    keep = p >= 0.2 * p.max()
    assert torch.equal(torch.isfinite(out), keep)


def test_processor_restarts_on_a_new_generation(tiny):
    model, tok = tiny
    p = SamplingParams(seed=2, max_tokens=5)
    first, proc = _hf_generate(model, tok, PROMPTS[:1], p, 5)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    again = model.generate(**enc, logits_processor=[proc],
                           **neutral_generate_kwargs(model, max_new_tokens=5, pad_token_id=0))
    assert again[0, enc["input_ids"].shape[1]:].tolist() == first[0]


def test_processor_reused_on_a_new_prompt_of_the_next_length(tiny):
    """A new prompt exactly one token longer than the previous call is a new generation, not
    a continuation: the reused processor gives the tokens of a fresh one."""
    model, tok = tiny
    p = SamplingParams(seed=11, dry_multiplier=1.0)
    proc = SamplersLogitsProcessor(p)
    e1 = tok(["x = 1"], return_tensors="pt")
    assert e1["input_ids"].shape[1] == 3
    model.generate(**e1, logits_processor=[proc], **neutral_generate_kwargs(model, max_new_tokens=5))
    # the last call saw 3 + 4 tokens: an unrelated prompt of 8 tokens has the continuation's length
    ids2 = tok(["def f(a, b, c):\n    return"], return_tensors="pt")["input_ids"][:, :8]
    assert ids2.shape[1] == 8

    def run(proc):
        out = model.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), logits_processor=[proc],
                             **neutral_generate_kwargs(model, max_new_tokens=6))
        return out[0, 8:].tolist()

    assert run(proc) == run(SamplersLogitsProcessor(p))
    assert proc.prompt_length == 8


def test_processor_refuses_a_stale_attention_mask():
    """An attention_mask belongs to the first generation that starts after it: the same
    prompts again keep it, other prompts need reset(attention_mask=...) (or reset() for none)."""
    V = 64
    proc = SamplersLogitsProcessor(SamplingParams(seed=3, dry_multiplier=0.8),
                                   attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))

    def lengths(ids):
        proc(torch.tensor(ids), torch.randn(len(ids), V))
        return proc.batch.history.prompt_lengths.tolist()

    padded = [[0, 5, 6], [7, 8, 9]]
    assert lengths(padded) == [2, 3]
    lengths([[0, 5, 6, 1], [7, 8, 9, 2]])  # its continuation
    assert lengths(padded) == [2, 3]      # generate run again on the same inputs: the mask holds
    stale = r"attention_mask was given for the prompts of an earlier generation.*reset\(attention_mask=\.\.\.\)"
    with pytest.raises(ValueError, match=stale):  # same shape: the old mask would drop a real token
        lengths([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=stale):  # another shape
        lengths([[1, 2]])
    proc.reset(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert lengths([[1, 2, 3], [0, 0, 6]]) == [3, 1]
    with pytest.raises(ValueError, match=stale):  # that mask now belongs to those prompts
        lengths(padded)
    proc.reset()
    assert lengths(padded) == [3, 3]
    assert lengths([[4], [5]]) == [1, 1]  # no mask: any prompts
    # a first generation that fails (n=2 without num_return_sequences) does not take the mask
    proc = SamplersLogitsProcessor(SamplingParams(n=2), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="not 2 copies"):
        lengths([[0, 5, 6], [1, 2, 3]])
    assert lengths([[0, 5, 6], [0, 5, 6]]) == [2, 2]
    # a mask of another width than the prompts
    proc = SamplersLogitsProcessor(SamplingParams(), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\).*prompts of 3 tokens"):
        lengths([[5, 6, 7]])


def test_processor_reused_with_reset_attention_mask(tiny):
    """One processor over two generate() calls on differently padded prompts: with
    reset(attention_mask=...) the second gives a fresh processor's tokens; without, a ValueError."""
    model, tok = tiny
    p = SamplingParams(seed=6, dry_multiplier=0.8, repetition_penalty=1.3, max_tokens=8)
    other = ["x", "for i in range(10):\n    print(i)"]
    enc2 = tok(other, return_tensors="pt", padding=True)
    assert enc2["attention_mask"].min() == 0  # the case is not trivial: padding to leave out
    kw = neutral_generate_kwargs(model, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    fresh, _ = _hf_generate(model, tok, other, p, 8)
    _, proc = _hf_generate(model, tok, PROMPTS, p, 8)
    with pytest.raises(ValueError, match=r"reset\(attention_mask=\.\.\.\) with the new prompts' attention mask"):
        model.generate(**enc2, logits_processor=[proc], **kw)
    proc.reset(attention_mask=enc2["attention_mask"])
    again = model.generate(**enc2, logits_processor=[proc], **kw)
    assert again[:, enc2["input_ids"].shape[1]:].tolist() == fresh
    # (padding does not change these tokens: the history is what shows the new mask applied)
    assert proc.batch.history.prompt_lengths.tolist() == enc2["attention_mask"].sum(1).tolist()


def test_processor_continuation_is_exact():
    V = 64
    proc = SamplersLogitsProcessor(SamplingParams(seed=3))
    proc(torch.tensor([[5, 6, 7]]), torch.randn(1, V))
    proc(torch.tensor([[5, 6, 7, 8]]), torch.randn(1, V))
    assert proc.prompt_length == 3 and proc.batch.output_lengths.tolist() == [1]
    # one column longer, but another prefix: a new generation
    proc(torch.tensor([[5, 9, 7, 8, 1]]), torch.randn(1, V))
    assert proc.prompt_length == 5 and proc.batch.output_lengths.tolist() == [0]
    # a caller that rewrites its buffer in place between calls: what was seen is a copy
    buf = torch.tensor([[1, 2, 3, 4]])
    proc(buf[:, :3], torch.randn(1, V))
    buf[0, 1] = 9
    proc(buf, torch.randn(1, V))
    assert proc.prompt_length == 4
    # a long continuation outgrows the first buffer (2 + 200 columns) and stays one generation
    ids = torch.tensor([[1, 2], [3, 4]])
    for step in range(200):
        proc(ids, torch.randn(2, V))
        assert proc.prompt_length == 2 and proc.batch.output_lengths.tolist() == [step, step]
        ids = torch.cat([ids, torch.tensor([[step % V], [(step + 1) % V]])], 1)


def test_generate_on_the_previous_output_continues(tiny):
    """generate(input_ids=previous output) with the same processor is its continuation (the
    documented rule): the tokens of one longer generate."""
    model, tok = tiny
    p = SamplingParams(seed=8, dry_multiplier=0.8, min_tokens=12)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    width = enc["input_ids"].shape[1]
    kw = dict(pad_token_id=tok.pad_token_id)
    whole = model.generate(**enc, logits_processor=[SamplersLogitsProcessor(p, eos_token_ids=tok.eos_token_id)],
                           **neutral_generate_kwargs(model, max_new_tokens=12, **kw))
    proc = SamplersLogitsProcessor(p, eos_token_ids=tok.eos_token_id)
    first = model.generate(**enc, logits_processor=[proc], **neutral_generate_kwargs(model, max_new_tokens=5, **kw))
    second = model.generate(input_ids=first, attention_mask=torch.ones_like(first), logits_processor=[proc],
                            **neutral_generate_kwargs(model, max_new_tokens=7, **kw))
    assert proc.prompt_length == width
    assert second.tolist() == whole.tolist()


_PROBE = r"""
import json, sys
order = sys.argv[1]
if order == "samplers-first":
    import samplers, samplers.integrations.hf, samplers.generation
import transformers
from transformers.utils import is_kernels_available
from transformers.utils import import_utils as iu
state = {
    "is_kernels_available": is_kernels_available(),
    "kernels_probe": list(iu._is_package_available("kernels", return_version=True)),
}
if order == "transformers-first":
    import samplers, samplers.integrations.hf, samplers.generation
    state["probe_after_import"] = list(iu._is_package_available("kernels", return_version=True))
print(json.dumps(state))
"""


def _probe(order: str, cwd: Path) -> dict:
    # samplers importable whether or not it is installed (the repository on PYTHONPATH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _PROBE, order], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _distributions_of_top_level(name: str) -> list[str]:
    """The installed distributions that provide the top-level import ``name``
    (``importlib.metadata.packages_distributions``, new in Python 3.10; the same reading of
    each distribution's ``top_level.txt`` or files before it)."""
    import importlib.metadata as md

    if hasattr(md, "packages_distributions"):
        return md.packages_distributions().get(name, [])
    owners = set()
    for dist in md.distributions():
        tops = (dist.read_text("top_level.txt") or "").split()
        tops += [f.parts[0].split(".")[0] for f in dist.files or () if f.parts]
        if name in tops:
            owners.add(dist.metadata["Name"])
    return sorted(owners)


def test_importing_samplers_changes_nothing_in_transformers(tmp_path):
    """``import samplers`` next to transformers leaves transformers' view unchanged.

    transformers' ``is_kernels_available()`` looks up the top-level name ``kernels`` (Hugging
    Face's hub-kernels package). Our Triton kernels live in ``samplers.kernels``, so that name
    is never ours: the probe sees Hugging Face's package (or nothing), from any directory, and
    importing samplers changes nothing.
    """
    import importlib.metadata as md

    import transformers.utils

    if not hasattr(transformers.utils, "is_kernels_available"):
        pytest.skip(f"transformers {transformers.__version__} does not look up hub kernels: no name to collide with")
    first = _probe("samplers-first", tmp_path)
    plain = _probe("transformers-first", tmp_path)   # its first state is transformers alone
    assert plain["is_kernels_available"] == first["is_kernels_available"]
    assert plain["kernels_probe"] == first["kernels_probe"] == plain["probe_after_import"]
    assert "samplers" not in _distributions_of_top_level("kernels")
    try:
        md.version("kernels")  # Hugging Face's kernels distribution installed here: no claim on its result
    except md.PackageNotFoundError:
        assert plain["is_kernels_available"] is False


def test_import_samplers_does_not_import_transformers():
    code = "import sys, samplers, samplers.pipeline; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
