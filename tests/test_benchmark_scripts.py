"""The benchmark scripts that time the engines' steps still run (tiny sizes, a subprocess
each, as a user runs them): each prints its table row, and the vLLM ones check their
results against the pipeline while they time."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_batch_build():
    out = run_script("benchmarks/batch_build.py", "--sizes", "3", "17", "--repeat", "2")
    assert re.search(r"^\| 17 \| [\d.]+ \| [\d.]+ \|$", out, re.M), out


def needs_vllm_module(module: str, what: str):
    """Skip unless the installed vLLM has ``module`` (the interface the script drives)."""
    missing = importlib.util.find_spec("vllm") is None or importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"needs vLLM's {what}")


@needs_vllm_module("vllm.v1.sample.logits_processor", "V1 logits-processor interface (vLLM 0.33 or older)")
def test_vllm_v1_join():
    out = run_script("benchmarks/vllm_v1_join.py", "--rows", "4", "--vocab", "64", "--history", "12",
                     "--steps", "4")
    # one full build (the first step), then the joining rows alone: 4 + 2
    assert re.search(r"^\| \[4, 64\] \| 12 \| [\d.]+ \| [\d.]+ \| 1 \| 6 \|$", out, re.M), out


@needs_vllm_module("vllm.v1.worker.gpu.sample.logits_processor", "Model Runner V2 logits-processor interface")
def test_vllm_v2_step():
    out = run_script("benchmarks/vllm_v2_step.py", "--shapes", "4x64", "--history", "16", "--steps", "3",
                     "--warmup", "1", "--join-every", "2")
    assert re.search(r"^\| \[4, 64\] \| 16 \|", out, re.M), out
