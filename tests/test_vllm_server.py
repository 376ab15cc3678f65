"""ArliRequestMiddleware: the API's request bodies rewritten for vLLM's OpenAI server.

Driven with raw ASGI calls around small fake apps, and through a FastAPI app built the way
``vllm serve --middleware`` builds it, whose route parses vLLM's real request models (0.33 and 0.34).
Every rewritten body is checked three ways: against the hand-written ``vllm_xargs`` form of
the same request, through vLLM's pydantic request model and ``to_sampling_params`` (no field
ignored, the processor's ``validate_params`` accepts it), and against the API's meaning of the
original body (``SamplingParams.from_dict``), rebuilt from what vLLM and our processor read.
Skipped when vllm is not installed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any, Optional

import pytest

pytest.importorskip("vllm.entrypoints.openai.completion.protocol")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import CompletionRequest  # noqa: E402
from vllm.entrypoints.serve.engine.protocol import ErrorResponse  # noqa: E402

from samplers import SamplingParams  # noqa: E402
from samplers.integrations.vllm import SamplersLogitsProcessor, parse_extra_args  # noqa: E402
from samplers.integrations.vllm_server import (  # noqa: E402
    CHAT_COMPLETIONS_PATH,
    COMPLETIONS_PATH,
    ArliRequestMiddleware,
    rewrite_request_body,
)

EXAMPLE = Path(__file__).resolve().parent / "data" / "arli_full_request.json"
FQCN = "samplers.integrations.vllm_server.ArliRequestMiddleware"
MESSAGES = [{"role": "user", "content": "Say hello!"}]
# vLLM's own samplers with their no-op values, written out here (not imported) on purpose.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
           "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
MODELS = {COMPLETIONS_PATH: CompletionRequest, CHAT_COMPLETIONS_PATH: ChatCompletionRequest}


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def base(path: str) -> dict:
    return {"model": "m", "prompt": "def f("} if path == COMPLETIONS_PATH else {"model": "m", "messages": MESSAGES}


# ---------------------------------------------------------------------- raw ASGI driving
class Recorder:
    """A fake vLLM app: records what it is given; answers with a JSON body or a stream."""

    def __init__(self, chunks: Optional[list[bytes]] = None) -> None:
        self.calls: list[dict] = []
        self.chunks = chunks

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            self.calls.append({"scope": scope})
            return
        messages = []
        while True:
            m = await receive()
            messages.append(m)
            if not m.get("more_body"):
                break
        after = await receive()  # what the app sees next: the client's own disconnect
        self.calls.append({"scope": scope, "messages": messages, "after": after,
                           "body": b"".join(m.get("body", b"") for m in messages)})
        if self.chunks is None:
            payload = b'{"ok": true}'
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": payload})
        else:  # a server-sent-events stream, as vLLM's stream=true answers
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for c in self.chunks:
                await send({"type": "http.response.body", "body": c, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def call(app, path: str, body: Any = None, *, method: str = "POST", chunks: Optional[list[bytes]] = None,
         headers: Optional[list] = None, scope_extra: Optional[dict] = None):
    """One HTTP request through ``app``; returns (the messages sent back, the client's messages)."""
    if chunks is None:
        raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
        chunks = [raw]
    if headers is None:
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(sum(map(len, chunks))).encode())]
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    incoming.append({"type": "http.disconnect"})
    sent: list[dict] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    scope.update(scope_extra or {})

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(app(scope, receive, send))
    return sent, incoming


def through(path: str, body: dict) -> Optional[dict]:
    """The body the inner app receives for ``body`` (None: the middleware answered itself)."""
    inner = Recorder()
    sent, _ = call(ArliRequestMiddleware(inner), path, body)
    if not inner.calls:
        return None
    assert sent[0]["status"] == 200
    got = inner.calls[0]
    length = dict(got["scope"]["headers"])[b"content-length"]
    assert int(length) == len(got["body"])
    return json.loads(got["body"])


def error_of(path: str, body: Any) -> dict:
    inner = Recorder()
    sent, _ = call(ArliRequestMiddleware(inner), path, body)
    assert not inner.calls, "an invalid body must not reach vLLM"
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    payload = json.loads(sent[1]["body"])
    ErrorResponse.model_validate(payload)   # vLLM's own error shape
    assert payload["error"]["code"] == 400 and payload["error"]["type"] == "BadRequestError"
    return payload["error"]


# ---------------------------------------------------------------------- the meaning of a body
def decoded(body: dict) -> dict:
    """``body`` with vllm_xargs["samplers"] parsed, for comparisons."""
    out = copy.deepcopy(body)
    if "samplers" in out.get("vllm_xargs", {}):
        out["vllm_xargs"]["samplers"] = json.loads(out["vllm_xargs"]["samplers"])
    return out


def max_tokens_of(req) -> Optional[int]:
    with warnings.catch_warnings():   # chat's max_tokens is deprecated in vLLM, still read
        warnings.simplefilter("ignore", DeprecationWarning)
        return req.max_tokens


def vllm_view(path: str, body: dict):
    """vLLM's request model and SamplingParams for ``body``, as its route builds them."""
    req = MODELS[path].model_validate(body)
    extra = set(body) - set(MODELS[path].model_fields)
    assert not extra, f"fields vLLM would ignore: {extra}"
    sp = req.to_sampling_params(max_tokens_of(req) or 100, {})
    SamplersLogitsProcessor.validate_params(sp)
    return req, sp


def sp_fields(sp) -> dict:
    """vLLM SamplingParams as a dict, our JSON string parsed (its spacing is not part of the request)."""
    out = {f: getattr(sp, f) for f in type(sp).__struct_fields__}
    if out["extra_args"] and "samplers" in out["extra_args"]:
        out["extra_args"] = dict(out["extra_args"], samplers=json.loads(out["extra_args"]["samplers"]))
    return out


def meaning_from_vllm(path: str, body: dict) -> dict:
    """The API parameters a rewritten body carries, read back from vLLM's side."""
    req, sp = vllm_view(path, body)
    ours = parse_extra_args(sp.extra_args) or SamplingParams()
    m = {k: v for k, v in ours.to_dict().items()}
    for k in ("n", "stop", "stop_token_ids", "seed", "ignore_eos", "min_tokens",
              "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
              "prompt_logprobs", "logprobs"):
        m[k] = getattr(sp, k)
    m["stop"] = list(m["stop"] or [])
    m["stop_token_ids"] = list(m["stop_token_ids"] or [])
    m["logit_bias"] = dict(sp.logit_bias) if sp.logit_bias else None
    m["max_tokens"] = max_tokens_of(req)
    m["truncate_prompt_tokens"] = req.truncate_prompt_tokens
    m["length_penalty"] = req.length_penalty
    so = sp.structured_outputs
    m["guided"] = None if so is None else {k: v for k, v in (("choice", so.choice), ("regex", so.regex),
                                                             ("json", so.json)) if v is not None}
    m["guided_whitespace_pattern"] = None if so is None else so.whitespace_pattern
    return m


def meaning_from_api(body: dict) -> dict:
    """The same, straight from the API's definition (SamplingParams.from_dict)."""
    b = {k: v for k, v in body.items() if k in SamplingParams.field_names()}
    b.setdefault("max_tokens", None)
    p = SamplingParams.from_dict(b)
    m = p.to_dict()
    if p.guided_choice is not None:
        m["guided"] = {"choice": list(p.guided_choice)}     # choice > regex > json
    elif p.guided_regex is not None:
        m["guided"] = {"regex": p.guided_regex}
    elif p.guided_json is not None:
        m["guided"] = {"json": p.guided_json}
    else:
        m["guided"] = None
    return m


COMPARED = ("guided", "guided_whitespace_pattern") + tuple(
    sorted(SamplingParams.field_names() - {"guided_json", "guided_regex", "guided_choice",
                                           "guided_decoding_backend", "guided_whitespace_pattern",
                                           "detokenize", "logits_processors", "early_stopping",
                                           "logprobs_mode"}))


def assert_same_meaning(path: str, original: dict, rewritten: dict) -> None:
    got, want = meaning_from_vllm(path, rewritten), meaning_from_api(original)
    if path == CHAT_COMPLETIONS_PATH and original.get("logprobs") is not None:
        assert rewritten["logprobs"] is True and got["logprobs"] == rewritten["top_logprobs"]
    if original.get("max_tokens") is None:
        want["max_tokens"] = got["max_tokens"]  # vLLM's own default (16, or unbounded on chat)
    if original.get("prompt_logprobs") is None and got["prompt_logprobs"] is None:
        want["prompt_logprobs"] = None
    for k in COMPARED:
        if k == "guided_whitespace_pattern" and got["guided"] is None:
            continue
        assert got[k] == want[k], (k, got[k], want[k])


# ---------------------------------------------------------------------- each parameter
# name -> (a valid non-default value, where the API says it belongs on vLLM):
#   "x": moves into vllm_xargs["samplers"] (vLLM's own sampler set neutral);
#   "top": stays a top-level field vLLM reads; "drop": validated and dropped;
#   a dict: the exact top-level fields vLLM gets instead.
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
CASES: dict[str, tuple[Any, Any]] = {
    "repetition_penalty": (1.3, "x"), "frequency_penalty": (0.5, "x"), "presence_penalty": (-0.4, "x"),
    "logit_bias": ({"5": 3.0, "7": -100}, "top"), "no_repeat_ngram_size": (3, "x"), "min_tokens": (4, "top"),
    "dry_multiplier": (0.8, "x"), "dry_base": (2.0, "x"), "dry_allowed_length": (3, "x"),
    "dry_sequence_breaker_ids": ([1, 2], "x"), "dry_range": (64, "x"),
    "temperature": (0.7, "x"), "dynatemp_min": (0.0, "x"), "dynatemp_max": (1.5, "x"),
    "dynatemp_exponent": (2.0, "x"), "smoothing_factor": (0.3, "x"), "smoothing_curve": (1.5, "x"),
    "temperature_last": (True, "x"), "top_k": (40, "x"), "top_p": (0.9, "x"), "top_a": (0.2, "x"),
    "min_p": (0.05, "x"), "tfs": (0.95, "x"), "eta_cutoff": (3e-4, "x"), "epsilon_cutoff": (3e-4, "x"),
    "typical_p": (0.9, "x"), "nsigma": (1.5, "x"), "xtc_threshold": (0.2, "x"), "xtc_probability": (0.5, "x"),
    "skew": (0.7, "x"), "sampler_priority": (["DRY", 2, "TEMPERATURE"], "x"),
    "seed": (7, "top"), "n": (2, "top"), "logprobs": (3, "top"), "prompt_logprobs": (2, "top"),
    "max_tokens": (32, "top"), "stop": (["\n\n", "END"], "top"), "stop_token_ids": ([3, 4], "top"),
    "include_stop_str_in_output": (True, "top"), "ignore_eos": (True, "top"), "detokenize": (True, "drop"),
    "skip_special_tokens": (False, "top"), "spaces_between_special_tokens": (False, "top"),
    "truncate_prompt_tokens": (8, "top"), "logits_processors": ([], "drop"),
    "guided_json": (SCHEMA, {"structured_outputs": {"json": SCHEMA}}),
    "guided_regex": ("[a-z]+", {"structured_outputs": {"regex": "[a-z]+"}}),
    "guided_choice": (["Yes", "No"], {"structured_outputs": {"choice": ["Yes", "No"]}}),
    "guided_decoding_backend": ("xgrammar", "drop"),
    "guided_whitespace_pattern": (r"\s*", "drop"),   # an option of a constraint; none given here
    "length_penalty": (0.8, "top"), "early_stopping": (True, "drop"),
}
NOT_ACCEPTED = {"logprobs_mode"}   # a server option in vLLM: HTTP 400 (test_request_level_refusals)


def test_cases_cover_every_parameter():
    assert set(CASES) | NOT_ACCEPTED == SamplingParams.field_names()


def expected_form(path: str, name: str, value: Any, where: Any) -> Optional[dict]:
    """The hand-written body one would send vLLM without the middleware."""
    body = base(path)
    if where == "x":
        body["vllm_xargs"] = {"samplers": json.dumps({name: value})}
        body.update(NEUTRAL)
    elif where == "top":
        if path == CHAT_COMPLETIONS_PATH and name == "logprobs":
            body.update(logprobs=True, top_logprobs=value)
        else:
            body[name] = value
    elif isinstance(where, dict):
        body.update(where)
    return body


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_parameter(path, name):
    value, where = CASES[name]
    body = dict(base(path), **{name: value})
    got = through(path, body)
    want = expected_form(path, name, value, where)
    assert decoded(got) == decoded(want)
    # The hand-written form goes through vLLM to the same request, and means what the API says.
    assert sp_fields(vllm_view(path, got)[1]) == sp_fields(vllm_view(path, want)[1])
    assert_same_meaning(path, body, got)
    # The vllm_xargs form itself is left as it is (a plain body too).
    if where != "x":
        return
    inner = Recorder()
    raw = json.dumps(want).encode()
    call(ArliRequestMiddleware(inner), path, raw)
    assert inner.calls[0]["body"] == raw


def test_guided_whitespace_pattern_with_json():
    body = dict(base(COMPLETIONS_PATH), guided_json=json.dumps(SCHEMA), guided_whitespace_pattern=r"[ ]?")
    got = through(COMPLETIONS_PATH, body)
    assert got["structured_outputs"] == {"json": json.dumps(SCHEMA), "whitespace_pattern": r"[ ]?"}
    assert_same_meaning(COMPLETIONS_PATH, body, got)


def test_guided_precedence_choice_regex_json():
    # The library's documented precedence (docs/guided.md); vLLM takes only one constraint.
    b = dict(base(COMPLETIONS_PATH), guided_json=SCHEMA, guided_regex="a+", guided_choice=["x", "y"])
    assert through(COMPLETIONS_PATH, b)["structured_outputs"] == {"choice": ["x", "y"]}
    del b["guided_choice"]
    assert through(COMPLETIONS_PATH, b)["structured_outputs"] == {"regex": "a+"}


# ---------------------------------------------------------------------- the API's full example
FULL_SAMPLERS = {
    "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "presence_penalty": 0.6,
    "frequency_penalty": 0.6, "dynatemp_min": 0.5, "dynatemp_max": 1.0, "dynatemp_exponent": 1,
    "smoothing_factor": 0.0, "smoothing_curve": 1.0, "top_a": 0, "min_p": 0, "tfs": 1,
    "eta_cutoff": 0.0001, "epsilon_cutoff": 0.0001, "typical_p": 1, "xtc_threshold": 0.1,
    "xtc_probability": 0, "no_repeat_ngram_size": 2, "nsigma": 1.5, "dry_multiplier": 1.0,
    "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breaker_ids": [], "dry_range": 50,
    "skew": 0.0, "sampler_priority": [],
}
FULL_TOP = {
    "model": "Mistral-Nemo-12B-Instruct-2407", "max_tokens": 1024, "stream": True, "n": 1,
    "min_tokens": 20, "seed": 0, "length_penalty": 1.0, "stop": [], "stop_token_ids": [],
    "include_stop_str_in_output": False, "ignore_eos": False, "prompt_logprobs": 0,
    "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "structured_outputs": {"choice": ["Yes", "No", "Maybe"], "whitespace_pattern": "\\s+"},
}


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH])
def test_full_example(path):
    ex = example()
    got = through(path, ex)
    want = dict(FULL_TOP, **NEUTRAL, vllm_xargs={"samplers": FULL_SAMPLERS})
    if path == COMPLETIONS_PATH:
        want.update(prompt=ex["prompt"], logprobs=5)
    else:
        want.update(messages=ex["messages"], logprobs=True, top_logprobs=5)
    assert decoded(got) == want
    assert_same_meaning(path, ex, got)
    assert rewrite_request_body(ex, path) == got   # the function the middleware calls


def test_serving_fields_accepted_and_ignored():
    body = dict(base(COMPLETIONS_PATH), multi_models=["a", "b"], multiplier=2, messages=MESSAGES, min_p=0.1)
    got = through(COMPLETIONS_PATH, body)
    assert not {"multi_models", "multiplier", "messages"} & set(got)
    body = dict(base(CHAT_COMPLETIONS_PATH), multi_models=["a"], multiplier=4, prompt="x", min_p=0.1)
    got = through(CHAT_COMPLETIONS_PATH, body)
    assert not {"multi_models", "multiplier", "prompt"} & set(got)
    assert got["messages"] == MESSAGES


def test_vllm_fields_pass_through():
    # Fields of vLLM's request model that are not ours stay as they are, next to ours.
    body = dict(base(COMPLETIONS_PATH), echo=True, bad_words=["x"], user="u", dry_multiplier=0.5,
                vllm_xargs={"other": "1"})
    got = through(COMPLETIONS_PATH, body)
    assert got["echo"] is True and got["bad_words"] == ["x"] and got["user"] == "u"
    assert decoded(got)["vllm_xargs"] == {"other": "1", "samplers": {"dry_multiplier": 0.5}}
    vllm_view(COMPLETIONS_PATH, got)


def test_null_means_default():
    body = dict(base(COMPLETIONS_PATH), n=None, truncate_prompt_tokens=None, min_p=None, max_tokens=None)
    got = through(COMPLETIONS_PATH, body)
    assert "n" not in got and "truncate_prompt_tokens" not in got
    assert_same_meaning(COMPLETIONS_PATH, body, got)


# ---------------------------------------------------------------------- HTTP 400
def api_error(body: dict) -> str:
    b = {k: v for k, v in body.items() if k in SamplingParams.field_names()}
    b.setdefault("max_tokens", None)
    with pytest.raises(ValueError) as exc:
        SamplingParams.from_dict(b)
    return str(exc.value)


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH])
@pytest.mark.parametrize("bad, param", [
    ({"min_p": 2.0}, "min_p"), ({"dry_base": 1.0}, "dry_base"), ({"top_p": 0}, "top_p"),
    ({"temperature": -1}, "temperature"), ({"xtc_probability": "high"}, "xtc_probability"),
    ({"sampler_priority": ["DRY", "DRY"]}, "sampler_priority"), ({"sampler_priority": ["NOPE"]}, "sampler_priority"),
    ({"dynatemp_min": 2.0, "dynatemp_max": 1.0}, "dynatemp_min"), ({"logit_bias": {"3": 500}}, "logit_bias"),
    ({"temperature": 0, "n": 2}, "n"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"eta_cutoff": 3}, "eta_cutoff"), ({"stop": [""]}, "stop"), ({"seed": 1.5}, "seed"),
    ({"guided_json": "{not json"}, "guided_json"), ({"logits_processors": ["f"]}, "logits_processors"),
])
def test_invalid_values_are_400_with_our_message(path, bad, param):
    body = dict(base(path), **bad)
    err = error_of(path, body)
    assert err["message"] == api_error(body)
    assert err["param"] == param


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH])
def test_unknown_field_is_400_naming_it(path):
    ex = example()
    ex["dry_multipler"] = 0.8       # a typo: without the middleware, silently ignored
    err = error_of(path, ex)
    assert "'dry_multipler'" in err["message"] and err["param"] == "dry_multipler"
    err = error_of(path, dict(base(path), guided_grammar="root ::= 'a'", mirostat_tau=5.0))
    assert "'guided_grammar'" in err["message"] and "'mirostat_tau'" in err["message"]


@pytest.mark.parametrize("extra, needle", [
    ({"guided_regex": "(", "guided_decoding_backend": "xgrammar"}, "guided_regex"),
    ({"guided_choice": ["a"], "guided_decoding_backend": "bogus"}, "guided_decoding_backend 'bogus'"),
    ({"guided_decoding_backend": "bogus"}, "guided_decoding_backend 'bogus'"),
    ({"detokenize": False}, "detokenize"),
    ({"logprobs_mode": "raw"}, "--logprobs-mode"),
    ({"dry_multiplier": 0.1, "vllm_xargs": {"samplers": "{}"}}, "both at top level"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "structured_outputs"),
])
def test_request_level_refusals(extra, needle):
    err = error_of(COMPLETIONS_PATH, dict(base(COMPLETIONS_PATH), **extra))
    assert needle in err["message"]


def test_chat_logprobs_count_with_top_logprobs_is_400():
    err = error_of(CHAT_COMPLETIONS_PATH, dict(base(CHAT_COMPLETIONS_PATH), logprobs=3, top_logprobs=2))
    assert "top_logprobs" in err["message"]
    # vLLM's own chat form passes as it is
    body = dict(base(CHAT_COMPLETIONS_PATH), logprobs=True, top_logprobs=2, min_p=0.1)
    got = through(CHAT_COMPLETIONS_PATH, body)
    assert got["logprobs"] is True and got["top_logprobs"] == 2
    assert vllm_view(CHAT_COMPLETIONS_PATH, got)[1].logprobs == 2


# ---------------------------------------------------------------------- pass-through
def test_other_routes_methods_and_bodies_untouched():
    arli = json.dumps({"model": "m", "messages": MESSAGES, "dry_multiplier": 0.8, "bogus": 1}).encode()
    chunks = [arli[:10], arli[10:]]
    for path, method, headers in [
        ("/tokenize", "POST", None), ("/v1/tokenize", "POST", None), ("/v1/completions/render", "POST", None),
        ("/v1/models", "GET", None), ("/v1/completions", "PUT", None),
        ("/v1/completions", "POST", [(b"content-type", b"text/plain")]),
    ]:
        inner = Recorder()
        sent, left = call(ArliRequestMiddleware(inner), path, method=method, chunks=list(chunks), headers=headers)
        got = inner.calls[0]
        # the very same messages, chunk by chunk (not buffered), and the client's disconnect after
        assert [m["body"] for m in got["messages"]] == chunks, path
        assert got["after"] == {"type": "http.disconnect"}
        assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"ok": true}'


@pytest.mark.parametrize("raw", [
    b'{"model": "m",   "prompt": "x", "max_tokens": 3}',            # nothing of ours to move
    b'{"model": "m", "prompt": "x", "vllm_xargs": {"samplers": "{\\"min_p\\": 0.1}"}}',
    b'{"model": "m", "prompt": ',                                     # malformed: vLLM answers it
    b'[1, 2]', b'"text"', b'',
])
def test_bodies_left_byte_identical(raw):
    inner = Recorder()
    call(ArliRequestMiddleware(inner), COMPLETIONS_PATH, raw)
    assert inner.calls[0]["body"] == raw
    assert dict(inner.calls[0]["scope"]["headers"])[b"content-length"] == str(len(raw)).encode()


def test_chunked_request_body_is_reassembled_and_rewritten():
    raw = json.dumps(dict(example(), prompt="word " * 200_000)).encode()   # about 1 MB, no size limit of ours
    chunks = [raw[i:i + 65536] for i in range(0, len(raw), 65536)]
    inner = Recorder()
    call(ArliRequestMiddleware(inner), COMPLETIONS_PATH, chunks=chunks,
         headers=[(b"content-type", b"application/json; charset=utf-8"), (b"transfer-encoding", b"chunked")])
    got = inner.calls[0]
    body = json.loads(got["body"])
    assert body["prompt"] == "word " * 200_000 and "dry_multiplier" not in body
    headers = dict(got["scope"]["headers"])
    assert int(headers[b"content-length"]) == len(got["body"]) and b"transfer-encoding" not in headers
    assert got["after"] == {"type": "http.disconnect"}   # vLLM still sees the client's disconnect


def test_streaming_response_passes_through():
    pieces = [b"data: {\"choices\": [{\"text\": \"a\"}]}\n\n", b"data: {\"choices\": [{\"text\": \"b\"}]}\n\n",
              b"data: [DONE]\n\n"]
    bare, _ = call(Recorder(pieces), COMPLETIONS_PATH, dict(example(), stream=True))
    wrapped, _ = call(ArliRequestMiddleware(Recorder(pieces)), COMPLETIONS_PATH, dict(example(), stream=True))
    assert wrapped == bare and len(wrapped) == len(pieces) + 2


def test_disconnect_before_body_and_non_http_scopes():
    inner = Recorder()
    mw = ArliRequestMiddleware(inner)

    async def run():
        async def receive():
            return {"type": "http.disconnect"}

        async def send(m):
            raise AssertionError("nothing is sent to a client that left")

        await mw({"type": "http", "method": "POST", "path": COMPLETIONS_PATH, "headers": []}, receive, send)
        await mw({"type": "lifespan"}, receive, send)

    asyncio.run(run())
    assert inner.calls == [{"scope": {"type": "lifespan"}}]


def test_root_path():
    inner = Recorder()
    call(ArliRequestMiddleware(inner), "/api" + COMPLETIONS_PATH, dict(base(COMPLETIONS_PATH), min_p=0.1),
         scope_extra={"root_path": "/api"})
    assert json.loads(inner.calls[0]["body"])["vllm_xargs"] == {"samplers": '{"min_p":0.1}'}


def test_tokenize_example_body_fits_vllm_model():
    # The API documents POST /v1/tokenize with this body; vLLM 0.33 serves the route at /tokenize
    # (docs/vllm.md says so). The body itself is a valid vLLM TokenizeChatRequest.
    from pydantic import TypeAdapter
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeRequest

    body = {"model": "Mistral-Nemo-12B-Instruct-2407", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi!, how can I help you today?"},
        {"role": "user", "content": "Say hello!"}]}
    req = TypeAdapter(TokenizeRequest).validate_python(body)
    assert isinstance(req, TokenizeChatRequest) and len(req.messages) == 4


# ---------------------------------------------------------------------- as vllm serve loads it
def test_loaded_by_vllm_register_into_fastapi(monkeypatch):
    fastapi = pytest.importorskip("fastapi")
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = fastapi.FastAPI()
    seen = []

    @app.post(COMPLETIONS_PATH)
    async def completions(request: CompletionRequest):
        sp = request.to_sampling_params(request.max_tokens, {})
        SamplersLogitsProcessor.validate_params(sp)
        seen.append(sp)
        return {"extra_args": sp.extra_args, "temperature": sp.temperature, "min_tokens": sp.min_tokens}

    @app.post(CHAT_COMPLETIONS_PATH)
    async def chat(request: ChatCompletionRequest):
        sp = request.to_sampling_params(max_tokens_of(request) or 100, {})
        SamplersLogitsProcessor.validate_params(sp)
        seen.append(sp)
        return {"logprobs": sp.logprobs, "structured": sp.structured_outputs.choice}

    args = Namespace(allowed_origins=["*"], allow_credentials=False, allowed_methods=["*"],
                     allowed_headers=["*"], api_key=None, enable_request_id_headers=False,
                     middleware=[FQCN])
    init_entrypoints_middleware(args, app, ())
    assert any(m.cls is ArliRequestMiddleware for m in app.user_middleware)

    sent, _ = call(app, COMPLETIONS_PATH, example())
    assert sent[0]["status"] == 200, sent
    out = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert json.loads(out["extra_args"]["samplers"]) == FULL_SAMPLERS
    assert out["temperature"] == 1.0 and out["min_tokens"] == 20
    sent, _ = call(app, CHAT_COMPLETIONS_PATH, example())
    out = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert out == {"logprobs": 5, "structured": ["Yes", "No", "Maybe"]}
    sent, _ = call(app, COMPLETIONS_PATH, dict(example(), min_p=7))
    assert sent[0]["status"] == 400 and len(seen) == 2
    assert json.loads(sent[1]["body"])["error"]["message"] == "min_p must be in [0, 1], got 7.0"


def test_docs_curl_is_the_api_example():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "vllm.md").read_text()
    section = docs[docs.index("## The API's own request bodies"):]
    start = section.index("-d '") + len("-d '")
    body = json.loads(section[start:section.index("}'\n", start) + 1])
    assert body == example()


def test_errors_answered_behind_vllm_cors_and_api_key(monkeypatch):
    # vLLM adds --middleware classes last (outermost): our 400 must still carry the CORS headers
    # of --allowed-origins, and a request without the API key must get vLLM's 401, not our 400.
    fastapi = pytest.importorskip("fastapi")
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = fastapi.FastAPI()
    seen = []

    @app.post(COMPLETIONS_PATH)
    async def completions(request: CompletionRequest):
        seen.append(request)
        return {"ok": True}

    origin = b"http://front.example"
    args = Namespace(allowed_origins=[origin.decode()], allow_credentials=False, allowed_methods=["*"],
                     allowed_headers=["*"], api_key=["secret"], enable_request_id_headers=True,
                     middleware=[FQCN])
    init_entrypoints_middleware(args, app, ())

    def headers(auth: bool) -> list:
        h = [(b"content-type", b"application/json"), (b"origin", origin)]
        return h + [(b"authorization", b"Bearer secret")] if auth else h

    bad = json.dumps(dict(base(COMPLETIONS_PATH), min_p=7)).encode()
    good = json.dumps(dict(base(COMPLETIONS_PATH), min_p=0.5)).encode()
    sent, _ = call(app, COMPLETIONS_PATH, bad, headers=headers(True))
    start = sent[0]
    assert start["status"] == 400
    hdrs = dict(start["headers"])
    assert hdrs[b"access-control-allow-origin"] == origin and b"x-request-id" in hdrs
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]["param"] == "min_p"
    for body in (bad, good):
        sent, _ = call(app, COMPLETIONS_PATH, body, headers=headers(False))
        assert sent[0]["status"] == 401
    sent, _ = call(app, COMPLETIONS_PATH, good, headers=headers(True))
    assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"access-control-allow-origin"] == origin
    assert len(seen) == 1 and json.loads(seen[0].vllm_xargs["samplers"]) == {"min_p": 0.5}
