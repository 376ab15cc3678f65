"""End-to-end tests of ``samplers.generate`` on the embedded model (and a random-weight one)."""

from __future__ import annotations

import json
import math

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

import samplers  # noqa: E402
from samplers import SamplerPipeline, SamplingParams  # noqa: E402
from samplers.generation import generate  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from samplers.models import load_default

    return load_default()


PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n", "x"]


def test_lazy_export(tiny):
    assert samplers.generate is generate


def test_load_default_offline(tiny):
    model, tok = tiny
    assert model.config.vocab_size == len(tok) or model.config.vocab_size >= len(tok)
    assert tok.eos_token_id is not None and not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 2e5 < n < 3e6


def test_greedy_matches_plain_argmax_loop(tiny):
    model, tok = tiny
    prompt = tok(PROMPTS[0])["input_ids"]
    out = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.outputs[0].token_ids == ids[len(prompt):]
    assert out.outputs[0].finish_reason == "length"


def test_seed_reproducible_whatever_the_batch(tiny):
    model, tok = tiny
    p = SamplingParams(seed=123, temperature=0.9, min_p=0.02, dry_multiplier=0.5, max_tokens=12)
    alone = generate(model, tok, [PROMPTS[1]], p)[0].outputs[0].token_ids
    other = SamplingParams(seed=7, max_tokens=3)
    mixed = generate(model, tok, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], [other, other, p])
    assert mixed[2].outputs[0].token_ids == alone
    again = generate(model, tok, [PROMPTS[1]], p)[0].outputs[0].token_ids
    assert again == alone
    diff = generate(model, tok, [PROMPTS[1]], SamplingParams(seed=124, temperature=0.9, min_p=0.02,
                                                             dry_multiplier=0.5, max_tokens=12))
    assert diff[0].outputs[0].token_ids != alone


def test_n_sequences(tiny):
    model, tok = tiny
    res = generate(model, tok, PROMPTS[0], SamplingParams(seed=5, n=3, max_tokens=10, ignore_eos=True))[0]
    assert [o.index for o in res.outputs] == [0, 1, 2]
    seqs = [tuple(o.token_ids) for o in res.outputs]
    assert len(set(seqs)) == 3
    single = generate(model, tok, PROMPTS[0], SamplingParams(seed=5, max_tokens=10, ignore_eos=True))[0]
    assert single.outputs[0].token_ids == list(seqs[0])


def _greedy(model, tok, prompt, **kw):
    return generate(model, tok, prompt, SamplingParams(temperature=0, **kw))[0].outputs[0]


def test_stop_token_ids_eos_and_min_tokens(tiny):
    model, tok = tiny
    base = _greedy(model, tok, PROMPTS[0], max_tokens=10, ignore_eos=True)
    first = base.token_ids[0]
    stopped = _greedy(model, tok, PROMPTS[0], max_tokens=10, stop_token_ids=[first])
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    # min_tokens bans the stop id until 4 tokens exist
    held = _greedy(model, tok, PROMPTS[0], max_tokens=10, stop_token_ids=[first], min_tokens=4)
    assert len(held.token_ids) >= 5 or held.finish_reason == "length"
    assert first not in held.token_ids[:4]
    # the same token as EOS: stops, unless ignore_eos
    res = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10), eos_token_ids=[first])
    assert res[0].outputs[0].token_ids == [first] and res[0].outputs[0].stop_reason is None
    res = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                   eos_token_ids=[first])
    assert res[0].outputs[0].token_ids == base.token_ids and res[0].outputs[0].finish_reason == "length"
    res = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, min_tokens=3),
                   eos_token_ids=[first])
    assert first not in res[0].outputs[0].token_ids[:3]


def test_stop_strings(tiny):
    model, tok = tiny
    base = _greedy(model, tok, PROMPTS[1], max_tokens=24, ignore_eos=True)
    text = base.text
    assert len(text) > 8
    stop = text[5:8]
    at = text.index(stop)
    out = _greedy(model, tok, PROMPTS[1], max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"])
    assert out.text == text[:at] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(base.token_ids) or at + len(stop) == len(text)
    out = _greedy(model, tok, PROMPTS[1], max_tokens=24, ignore_eos=True, stop=stop,
                  include_stop_str_in_output=True)
    assert out.text == text[:at + len(stop)]
    # not checked below min_tokens: the stop string inside the first tokens is skipped
    n_before = len(tok(text[:at + len(stop)])["input_ids"])
    late = _greedy(model, tok, PROMPTS[1], max_tokens=24, ignore_eos=True, stop=stop, min_tokens=n_before + 2)
    assert len(late.token_ids) >= n_before + 2


def test_logprobs(tiny):
    model, tok = tiny
    p = SamplingParams(seed=3, temperature=0.8, top_k=20, logprobs=3, max_tokens=6, ignore_eos=True)
    out = generate(model, tok, PROMPTS[0], p)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    for tid, entry in zip(out.token_ids, out.logprobs):
        assert next(iter(entry)) == tid and 1 <= len(entry) <= 4
        assert all(v <= 0 for v in entry.values())
        assert sum(math.exp(v) for v in entry.values()) <= 1 + 1e-4
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))
    # raw mode: the model's own distribution at the first step
    raw = generate(model, tok, PROMPTS[0], SamplingParams(seed=3, temperature=0.8, top_k=20, logprobs=0,
                                                          logprobs_mode="raw", max_tokens=1))[0].outputs[0]
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    t = raw.token_ids[0]
    assert raw.logprobs[0][t] == pytest.approx(float(ref[t]), abs=1e-4)
    assert len(raw.logprobs[0]) == 1


def test_logprobs_beyond_the_vocabulary(tiny):
    """logprobs past the vocabulary size give every token's logprob, as logprobs=V does, at the
    cost of logprobs=V (the loop once padded each step to the asked width: 10**12 was 8 TB)."""
    model, tok = tiny
    V = model.get_output_embeddings().weight.shape[0]
    kw = dict(seed=7, temperature=0.8, max_tokens=2, ignore_eos=True)
    whole = generate(model, tok, PROMPTS[0], SamplingParams(logprobs=V, **kw))[0].outputs[0]
    huge = generate(model, tok, PROMPTS[0], SamplingParams(logprobs=10**12, **kw))[0].outputs[0]
    assert huge.token_ids == whole.token_ids
    assert huge.logprobs == whole.logprobs
    assert [len(e) for e in huge.logprobs] == [V, V]


def test_prompt_logprobs_and_truncation(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[1])["input_ids"]
    res = generate(model, tok, [PROMPTS[0], PROMPTS[1]],
                   [SamplingParams(max_tokens=2, seed=0),
                    SamplingParams(max_tokens=2, seed=0, prompt_logprobs=2)])
    assert res[0].prompt_logprobs is None
    plp = res[1].prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert plp[i][ids[i]] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert len(plp[i]) <= 3
    res = generate(model, tok, PROMPTS[1], SamplingParams(max_tokens=2, seed=0, truncate_prompt_tokens=3))
    assert res[0].prompt_token_ids == ids[-3:]


def test_streaming(tiny):
    model, tok = tiny
    base = _greedy(model, tok, PROMPTS[1], max_tokens=20, ignore_eos=True)
    stop = base.text[6:9]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
              SamplingParams(seed=9, n=2, max_tokens=15)]
    stream = generate(model, tok, [PROMPTS[1], PROMPTS[0]], params, stream=True)
    pieces: dict = {}
    finished = set()
    for d in stream:
        key = (d.request_index, d.index)
        assert key not in finished
        text, ids = pieces.get(key, ("", []))
        pieces[key] = (text + d.text, ids + d.token_ids)
        if d.finished:
            finished.add(key)
            assert d.finish_reason in ("stop", "length")
    results = stream.results
    assert finished == {(0, 0), (1, 0), (1, 1)}
    for r in results:
        for o in r.outputs:
            text, ids = pieces[(r.request_index, o.index)]
            assert text == o.text and ids == o.token_ids
    assert results[0].outputs[0].text == base.text[:base.text.index(stop)]
    # the same as without streaming
    plain = generate(model, tok, [PROMPTS[1], PROMPTS[0]], params)
    assert [o.token_ids for r in plain for o in r.outputs] == [o.token_ids for r in results for o in r.outputs]


def test_user_logits_processors_and_finished_rows_dropped(tiny):
    model, tok = tiny
    base = _greedy(model, tok, PROMPTS[0], max_tokens=8, ignore_eos=True)
    banned = base.token_ids[0]
    seen = []

    def ban(token_ids, logits):
        seen.append(list(token_ids))
        logits = logits.clone()
        logits[banned] = -math.inf
        return logits

    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logits_processors=[ban]),
              SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)]
    res = generate(model, tok, [PROMPTS[0], PROMPTS[0]], params)
    out = res[0].outputs[0]
    assert banned not in out.token_ids and len(out.token_ids) == 8
    assert seen[0] == [] and seen[3] == out.token_ids[:3]
    assert res[1].outputs[0].token_ids == base.token_ids[:2]


def test_random_weight_gpt2_token_prompts():
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  eos_token_id=96, bos_token_id=96)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()

    class Tok:  # token-id prompts need only decode
        eos_token_id = 96
        pad_token_id = None
        bos_token_id = 96

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 96))

    params = [SamplingParams(seed=1, max_tokens=5, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(seed=2, max_tokens=9, ignore_eos=True, no_repeat_ngram_size=2, n=2)]
    res = generate(model, Tok(), [[1, 2, 3], [4, 5, 6, 7, 8, 9]], params)
    assert len(res[0].outputs[0].token_ids) == 5 and [len(o.token_ids) for o in res[1].outputs] == [9, 9]
    alone = generate(model, Tok(), [[4, 5, 6, 7, 8, 9]], params[1])
    assert [o.token_ids for o in alone[0].outputs] == [o.token_ids for o in res[1].outputs]
    assert res[0].outputs[0].text == " ".join(map(str, res[0].outputs[0].token_ids))


def test_detokenize_false_and_token_prompts(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[0])["input_ids"]
    a = generate(model, tok, [ids], SamplingParams(temperature=0, max_tokens=5, detokenize=False))[0]
    b = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=5))[0]
    assert a.prompt is None and a.prompt_token_ids == ids and a.outputs[0].text == ""
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert b.outputs[0].text == tok.decode(b.outputs[0].token_ids, skip_special_tokens=True)


def test_logprob_alternatives_are_tokens_still_in(tiny):
    """A row left with fewer tokens than ``logprobs`` lists only those: the ``-inf`` places
    that fill ``SamplerOutput.top_logprobs`` are left out, so the entries are plain JSON."""
    model, tok = tiny
    p = SamplingParams(top_k=2, logprobs=4, seed=0, max_tokens=3, ignore_eos=True)
    out = generate(model, tok, PROMPTS[0], p)[0].outputs[0]
    assert [len(e) for e in out.logprobs] == [2, 2, 2]
    assert all(math.isfinite(v) for e in out.logprobs for v in e.values())
    json.dumps(out.logprobs, allow_nan=False)


def test_entropy_is_measured_on_the_distribution_drawn_from(tiny, monkeypatch):
    """``collect_entropy`` takes the logits ``sample`` drew from: no second ``process`` call,
    which would toss other XTC coins for an unseeded request."""
    model, tok = tiny

    def no_second_call(*args, **kwargs):
        raise AssertionError("process called")

    monkeypatch.setattr(SamplerPipeline, "process", no_second_call)
    p = SamplingParams(xtc_threshold=0.05, xtc_probability=0.5, max_tokens=4, ignore_eos=True)
    out = generate(model, tok, PROMPTS[0], p, collect_entropy=True)[0].outputs[0]
    assert out.mean_entropy is not None and out.mean_entropy >= 0
