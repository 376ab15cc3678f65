"""The kernels compile for a CUDA target (sm_90) without a GPU.

The interpreter runs kernels as numpy and does not type-check them like the GPU compiler:
this compiles every kernel (the chain with every stage code) to PTX/cubin in a subprocess
without TRITON_INTERPRET, so a kernel that would only fail on a GPU fails here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend in triton")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_kernel_compiles_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "kernels.aot", "--dtype", dtype, "--block", "2048"],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("chain", "draw", "philox", "row_stats"):
        assert f"{name}:" in r.stdout
    # small rows stay in registers
    assert "0 bytes spill stores" in r.stdout.split("chain:")[1].splitlines()[0] or "ptxas not found" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend in triton")
def test_blocked_kernels_compile_for_sm90_without_row_spills():
    """The column-blocked chain (every stage code) and draw at the production tile: their size
    does not depend on V, so this is the kernel that runs V = 128256 or 151936. The draw has
    no spills; the chain with all 15 stage codes at once spills a few scalars (8 bytes with
    triton 3.7.1), never a tile (a tile is 8192 * 4 / 512 threads = 64 bytes per thread)."""
    from kernels import _common

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "kernels.aot", "--blocked", "--dtype", "bf16", "--tile",
                        str(_common.TILE), "--warps", str(_common.TILE_WARPS)],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import re

    for name, limit in (("blocked_chain", 32), ("blocked_draw", 0)):
        line = r.stdout.split(f"{name}:")[1].splitlines()[0]
        if "ptxas not found" in line:
            continue
        spilled = int(re.search(r"(\d+) bytes spill stores", line).group(1))
        assert spilled <= limit, line


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend in triton")
@pytest.mark.parametrize("codes", ["9", "6,7"], ids=["min_p", "top_k+top_p"])
def test_blocked_chain_with_the_fused_draw_compiles_without_spills(codes):
    """The benchmark's configurations (a) and (b) with the draw at the end of the chain (what
    ``SamplerPipeline.sample`` launches for V = 128256). (Every stage code at once plus the
    draw spills one 4-byte scalar at 128 registers: not tested.)"""
    from kernels import _common

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "kernels.aot", "--blocked", "--draw", "--codes", codes, "--dtype", "bf16",
                        "--tile", str(_common.TILE), "--warps", str(_common.TILE_WARPS)],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.split("blocked_chain:")[1].splitlines()[0]
    assert "0 bytes spill stores" in line or "ptxas not found" in line, line
