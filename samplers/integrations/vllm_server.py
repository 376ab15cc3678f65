"""The API's own request bodies on ``vllm serve``: an ASGI middleware that speaks the
Arli / Aphrodite parameters.

Front ends send the sampler parameters as top-level fields of ``/v1/completions`` and
``/v1/chat/completions`` bodies (``"dry_multiplier": 0.8``, ``"sampler_priority": [...]``).
vLLM's request models ignore fields they do not declare, so without this middleware those
parameters are dropped and the request runs without them. Start the server with::

    vllm serve MODEL --generation-config vllm \\
        --logits-processors samplers.integrations.vllm:SamplersLogitsProcessor \\
        --middleware samplers.integrations.vllm_server.ArliRequestMiddleware

vLLM's ``--middleware`` imports the class and passes it to ``app.add_middleware``: it is
built as ``ArliRequestMiddleware(app)`` and wraps the whole application (it is added last,
so it runs first; its own 400s are answered behind copies of vLLM's inner middlewares, CORS
and the API-key check included).

On POST to those two routes with a JSON object body, :func:`rewrite_request_body` decides:

* our logit-changing parameters (every ``SamplingParams`` field that is not request-level
  and not one of vLLM's own ``seed`` / ``min_tokens`` / ``logit_bias``) move into
  ``vllm_xargs["samplers"]`` as the JSON string :mod:`samplers.integrations.vllm` parses,
  and vLLM's own temperature / top_p / top_k / min_p / penalties are set to their neutral
  values, so each sampler runs once, in our pipeline, in the row's order;
* request-level fields stay where vLLM reads them (``n``, ``max_tokens``, ``stop``, ...);
  on the chat route an integer ``logprobs`` (the API's form) becomes vLLM's
  ``logprobs: true`` + ``top_logprobs``; ``guided_json`` / ``guided_regex`` /
  ``guided_choice`` become vLLM's ``structured_outputs`` (one constraint, the library's
  precedence choice > regex > json, ``samplers.guided.guided_spec``);
* ``multi_models`` / ``multiplier`` (Arli serving fields), and the prompt field of the other
  route (``messages`` on ``/v1/completions``, ``prompt`` on chat: the API's example carries
  both), are dropped;
* every value of ours is validated with ``SamplingParams.from_dict``: an invalid one is
  HTTP 400 with our message, in vLLM's error format, before the engine sees the request;
  a field that is neither ours nor declared by vLLM's request model is HTTP 400 naming it.

A body without any of our sampler fields, anything that is not a JSON object, other routes
and methods, and every response (streamed or not) pass through untouched; only the
rewritten bodies are re-serialised.
"""

from __future__ import annotations

import copy
import json
import logging
from functools import lru_cache
from typing import Any, Awaitable, Callable, Mapping, MutableMapping, Optional

from ..guided import guided_spec, resolve_backend
from ..params import SERVING_KEYS, SamplingParams
from .vllm import EXTRA_ARGS_KEY, REQUEST_LEVEL_KEYS

__all__ = [
    "ArliRequestMiddleware", "COMPLETIONS_PATH", "CHAT_COMPLETIONS_PATH", "MOVED_KEYS", "VLLM_NEUTRAL",
    "rewrite_request_body", "vllm_request_fields",
]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"

#: Our fields that vLLM applies itself, at the same point of the chain as our pipeline would
#: (SEMANTICS.md: logit_bias and min_tokens first), or that key vLLM's draw (seed): they stay
#: top-level request fields.
_VLLM_APPLIED = frozenset({"seed", "min_tokens", "logit_bias"})

#: The top-level fields that move into ``vllm_xargs["samplers"]``.
MOVED_KEYS = SamplingParams.field_names() - REQUEST_LEVEL_KEYS - _VLLM_APPLIED

#: vLLM's own sampling fields with the value that makes each a no-op; set on every request
#: the middleware gives a ``samplers`` block (explicit values also beat the model's
#: generation_config defaults).
VLLM_NEUTRAL = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
}

_GUIDED_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_decoding_backend",
                "guided_whitespace_pattern")

# Our request-level fields that no vLLM request model declares, and what becomes of them:
# dropped once validated when the value asks for what vLLM does anyway (or only matters for
# beam search), refused otherwise.
_DROPPED_IF = {
    "detokenize": (lambda v: v is None or v is True,
                   "detokenize=false is not supported: vLLM's OpenAI server always detokenizes"),
    "logits_processors": (lambda v: not v,
                          "logits_processors cannot be sent over HTTP; start the server with "
                          "--logits-processors instead"),
    "early_stopping": (lambda v: True, ""),   # beam search only, which vLLM's requests do not use
    "logprobs_mode": (lambda v: v is None,
                      "logprobs_mode is a server option in vLLM (--logprobs-mode "
                      "raw_logprobs|processed_logprobs), not a request field"),
}

# Serving fields the middleware drops per route (SERVING_KEYS that the route does not read).
_ROUTE_DROPS = {
    COMPLETIONS_PATH: frozenset({"multi_models", "multiplier", "messages"}),
    CHAT_COMPLETIONS_PATH: frozenset({"multi_models", "multiplier", "prompt"}),
}


@lru_cache(maxsize=None)
def vllm_request_fields(path: str) -> frozenset[str]:
    """The field names (and aliases) of the vLLM request model behind ``path``."""
    if path == COMPLETIONS_PATH:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as model
    elif path == CHAT_COMPLETIONS_PATH:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as model
    else:
        raise ValueError(f"path must be {COMPLETIONS_PATH!r} or {CHAT_COMPLETIONS_PATH!r}, got {path!r}")
    names = set(model.model_fields)
    names.update(f.alias for f in model.model_fields.values() if getattr(f, "alias", None))
    return frozenset(names)


def rewrite_request_body(body: Mapping[str, Any], path: str,
                         vllm_fields: Optional[frozenset[str]] = None) -> Optional[dict[str, Any]]:
    """The body vLLM should see for an API ``body`` posted to ``path``; None when it needs no change.

    ``path`` is ``"/v1/completions"`` or ``"/v1/chat/completions"``; ``vllm_fields`` the
    fields of vLLM's request model for it (default: read from the installed vLLM). Raises
    ``ValueError`` (our message, naming the parameter) for an invalid value, an unknown field,
    or our parameters given both at top level and in ``vllm_xargs["samplers"]``.
    """
    if not isinstance(body, Mapping):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    if vllm_fields is None:
        vllm_fields = vllm_request_fields(path)
    ours = SamplingParams.field_names()
    unknown = sorted(k for k in body if k not in ours and k not in SERVING_KEYS and k not in vllm_fields)
    if unknown:
        raise ValueError(
            f"unknown request parameter(s): {', '.join(map(repr, unknown))}; neither a parameter of "
            f"samplers.SamplingParams nor a field of vLLM's request for {path}"
        )
    chat = path == CHAT_COMPLETIONS_PATH
    xargs = body.get("vllm_xargs")
    has_block = isinstance(xargs, Mapping) and EXTRA_ARGS_KEY in xargs
    # With a samplers block the body is already in the processor's form: its top-level
    # temperature / top_p / ... are vLLM's own (the processor checks they are neutral).
    moved = {k: body[k] for k in body if k in MOVED_KEYS and not (has_block and k in VLLM_NEUTRAL)}
    if moved:
        if xargs is not None and not isinstance(xargs, Mapping):
            raise ValueError(f"vllm_xargs must be an object, got {xargs!r}")
        if has_block:
            raise ValueError(
                f"sampler parameters given both at top level ({', '.join(map(repr, sorted(moved)))}) "
                f"and in vllm_xargs[{EXTRA_ARGS_KEY!r}]; use one of the two"
            )

    # Validate every value of ours at once, as the API defines it (cross-field rules included).
    check = {k: v for k, v in body.items() if k in ours}
    chat_logprobs = chat and isinstance(body.get("logprobs"), bool)
    if chat_logprobs:
        del check["logprobs"]  # vLLM's chat form (true/false + top_logprobs): vLLM validates it
    check.setdefault("max_tokens", None)  # our default of 16 is not vLLM's (chat: unbounded)
    params = SamplingParams.from_dict(check)
    spec = guided_spec(params)
    resolve_backend(params.guided_decoding_backend)  # also when no constraint is given

    out = {k: v for k, v in body.items() if k not in _ROUTE_DROPS[path] and k not in moved}
    changed = len(out) != len(body)
    for key, (keep_ok, message) in _DROPPED_IF.items():
        if key in out and key not in vllm_fields:
            if not keep_ok(out[key]):
                raise ValueError(message)
            del out[key]
            changed = True
    if any(k in out for k in _GUIDED_KEYS):
        for k in _GUIDED_KEYS:
            out.pop(k, None)
        changed = True
        if spec is not None:
            if out.get("structured_outputs") is not None or out.get("response_format") is not None:
                raise ValueError("guided_* fields given together with structured_outputs / response_format; "
                                 "use one of them")
            if spec.ignored:
                logger.info("samplers: guided fields %s ignored: %s wins (choice > regex > json)",
                            ", ".join(spec.ignored), spec.kind)
            value = {"choice": list(spec.value), "regex": spec.value,
                     "json": body.get("guided_json")}[spec.kind]
            so: dict[str, Any] = {spec.kind: value}
            if params.guided_whitespace_pattern is not None:
                so["whitespace_pattern"] = params.guided_whitespace_pattern
            out["structured_outputs"] = so
    if chat and "logprobs" in out and not chat_logprobs and out["logprobs"] is not None:
        # The API's logprobs is a count (the completions form); chat carries it in top_logprobs.
        if out.get("top_logprobs") is not None:
            raise ValueError("logprobs given as a count together with top_logprobs; give logprobs=true "
                             "with top_logprobs, or logprobs as a count alone")
        out["top_logprobs"] = out["logprobs"]
        out["logprobs"] = True
        changed = True
    for key in list(out):
        # null means "the default" in the API; some vLLM fields are not nullable.
        if out[key] is None and key in ours:
            del out[key]
            changed = True
    missing = sorted(k for k in out if k not in vllm_fields)
    if missing:  # one of ours that this vLLM version does not declare
        raise ValueError(f"parameter(s) {', '.join(map(repr, missing))} not supported by this vLLM server")
    if moved:
        new_xargs = dict(xargs or {})
        new_xargs[EXTRA_ARGS_KEY] = json.dumps(moved, separators=(",", ":"))
        out["vllm_xargs"] = new_xargs
        out.update(VLLM_NEUTRAL)
        changed = True
    return out if changed else None


class ArliRequestMiddleware:
    """ASGI middleware: rewrites the API's request bodies on POST ``/v1/completions`` and
    ``/v1/chat/completions`` into what vLLM and ``SamplersLogitsProcessor`` read
    (:func:`rewrite_request_body`); an invalid body is answered with HTTP 400 in vLLM's error
    format. Everything else, and every response, passes through untouched."""

    PATHS = (COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH)

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        # Read vLLM's request models now, so a broken install fails at server start.
        self._fields = {p: vllm_request_fields(p) for p in self.PATHS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route(scope)
        if path is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client went away before sending it all
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None                              # vLLM answers malformed JSON itself
        if isinstance(body, dict):
            try:
                new = rewrite_request_body(body, path, self._fields[path])
            except ValueError as exc:
                await self._answer_error(str(exc), _param_of(str(exc), body), scope, raw, receive, send)
                return
            if new is not None:
                raw = json.dumps(new).encode()
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope.get("headers", ())
                                    if k.lower() not in (b"content-length", b"transfer-encoding")]
                scope["headers"].append((b"content-length", str(len(raw)).encode()))
        await self.app(scope, _replay(raw, receive), send)


    async def _answer_error(self, message: str, param: Optional[str], scope: Scope, raw: bytes,
                            receive: Receive, send: Send) -> None:
        """Our 400, answered behind copies of the middlewares that sit between this one and
        vLLM's routes (added before it: CORS, the --api-key check, request ids, ...): a browser
        front end gets its CORS headers with the message, and a request without the API key
        gets vLLM's 401, not our 400. Without such middlewares the 400 is sent directly."""
        async def error_app(scope: Scope, receive: Receive, send: Send) -> None:
            await _send_error(send, message, param)

        chain: list[Any] = []    # middleware objects of any class, each with an ``app``
        node = self.app
        while (hasattr(node, "app") and type(node).__name__ != "ExceptionMiddleware"
               and len(chain) < 32):    # Starlette's ExceptionMiddleware wraps the routes
            chain.append(node)
            node = node.app
        app: Any = error_app
        try:
            for middleware in reversed(chain):
                layer = copy.copy(middleware)
                layer.app = app
                app = layer
        except Exception:  # pragma: no cover - a middleware that cannot be copied
            app = error_app
        await app(scope, _replay(raw, receive), send)


def _route(scope: Scope) -> Optional[str]:
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return None
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path if path in ArliRequestMiddleware.PATHS else None


def _is_json(scope: Scope) -> bool:
    """A body vLLM's route would parse as JSON: application/json, a +json type, or none given."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the (rewritten) body once, then the client's own messages
    (vLLM watches them for a disconnect while it streams)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _param_of(message: str, body: Mapping[str, Any]) -> Optional[str]:
    """The parameter an error message is about: the first quoted or leading field name of the body."""
    head = message.split(" ", 1)[0].rstrip(":,")
    if head in body:
        return head
    for key in body:
        if f"'{key}'" in message or message.startswith(f"{key} ") or message.startswith(f"{key}["):
            return key
    return None


async def _send_error(send: Send, message: str, param: Optional[str]) -> None:
    # vLLM's ErrorResponse shape, so clients parse our 400 like vLLM's own.
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError",
                                    "param": param, "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
