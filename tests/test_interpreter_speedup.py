"""``interpreter_speedup`` (installed by conftest.py): triton's interpreter without its repeated
set-up inside a kernel gives the plain interpreter's results, and does set up less."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import interpreter_speedup  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only")

TESTS = Path(__file__).resolve().parent
installed = pytest.mark.skipif(os.environ.get("SAMPLERS_PLAIN_INTERPRETER") == "1"
                               or not triton.__version__.startswith(interpreter_speedup._CHECKED_ON),
                               reason="the plain interpreter asked for, or a triton it was not checked on")


@triton.jit
def _share_of_row(e):
    return e / tl.sum(e, axis=0)


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, N)
    x = tl.load(x_ptr + row * N + cols)
    tl.store(out_ptr + row * N + cols, _share_of_row(tl.exp(x - tl.max(x, axis=0))))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _softmax_kernel[(x.shape[0],)](x, out, N=x.shape[1])
    return out


@installed
def test_installed_on_the_checked_tritons():
    assert interpreter_speedup.install()  # again: a no-op that says it is in place
    assert getattr(interpreter._patch_lang, "_skips_repeats", False)


@installed
def test_set_up_does_not_grow_with_the_device_calls(monkeypatch):
    """Each program of the grid calls three jit functions (``_share_of_row``, ``tl.sum``,
    ``tl.max``): the plain interpreter patches the language modules again for each; here the
    patching is the same for a grid of 1 program and of 16."""
    builtin_patches = []
    patch_builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: builtin_patches.append(a[0]) or patch_builtin(*a))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    _softmax(x[:1])  # (the first run rewrites the functions, which adds to their globals)
    builtin_patches.clear()
    _softmax(x[:1])
    one = len(builtin_patches)
    builtin_patches.clear()
    _softmax(x)
    assert 0 < len(builtin_patches) == one


@installed
def test_a_kernel_leaves_the_language_as_the_plain_interpreter_does():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_softmax(x), torch.softmax(x, -1))
    # From triton 3.6 a kernel restores the builtins it patched; before, they stay patched.
    restores = hasattr(interpreter, "_LangPatchScope")
    assert (tl.core.is_builtin(tl.program_id) and tl.core.is_builtin(tl.load)) == restores


@installed
def test_results_equal_the_plain_interpreters():
    """The column-blocked chain (device functions all the way down) and the draw, in two fresh
    processes, with and without the speedup: the same bits."""
    script = (
        "import sys, hashlib, torch\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import interpreter_speedup\n"
        "print(interpreter_speedup.install())\n"
        "from samplers.kernels import _common, codes as KC, fused as K\n"
        "_common.BLOCKED_ABOVE, _common.TILE = 8, 64\n"
        "g = torch.Generator().manual_seed(3)\n"
        "B, V = 3, 300\n"
        "x = torch.randn(B, V, generator=g) * 3\n"
        "x[1, ::4] = float('-inf')\n"
        "keys = KC.key_words(torch.arange(B) + 7, torch.arange(B) + 9, torch.zeros(B, dtype=torch.int64),\n"
        "                    torch.zeros(B, dtype=torch.int64))\n"
        "table = KC.param_table(B, x.device, {'top_k': torch.tensor([20.0, 0.0, 50.0]),\n"
        "                                     'top_p': torch.full((B,), 0.9), 'min_p': torch.full((B,), 0.02)})\n"
        "out, tokens, logprobs = K.run_chain(x, [KC.TOP_K, KC.TOP_P, KC.MIN_P], [None] * 3, table, keys=keys,\n"
        "                                    draw_greedy=torch.tensor([False, True, False]))\n"
        "print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in (out, tokens, logprobs))).hexdigest())\n"
        "print(int(torch.isneginf(out).sum()))\n"
    )
    runs = {}
    for plain in ("0", "1"):
        env = dict(os.environ, TRITON_INTERPRET="1", SAMPLERS_PLAIN_INTERPRETER=plain)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[plain] = done.stdout.split()
    assert runs["0"][0] == "True" and runs["1"][0] == "False"
    assert runs["0"][1:] == runs["1"][1:]
    assert 0 < int(runs["0"][2]) < 3 * 300  # the chain did remove tokens (and not all)
