"""The kernels compile for a CUDA target (sm_90) without a GPU.

The interpreter runs kernels as numpy and does not type-check them like the GPU compiler:
this compiles every kernel (the chain with every stage code) to PTX/cubin in a subprocess
without TRITON_INTERPRET, so a kernel that would only fail on a GPU fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Bytes per thread of one spilled tile of the blocked kernels (8192 fp32 lanes over 512
#: threads): a spill this large means a whole tile went to local memory. A few spilled scalars
#: (their count changes with the triton release: 4 bytes for min_p + draw with 3.7.1, 16 with
#: 3.8.0) are below it.
_TILE_SPILL = 8192 * 4 // 512


def _spill_stores(stdout: str, name: str) -> int:
    """Bytes of spill stores ptxas reports for kernel ``name``."""
    line = stdout.split(f"{name}:")[1].splitlines()[0]
    return int(re.search(r"(\d+) bytes spill stores", line).group(1))


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend in triton")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_kernel_compiles_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "samplers.kernels.aot", "--dtype", dtype, "--block", "2048"],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("chain", "draw", "philox", "row_stats"):
        assert f"{name}:" in r.stdout
    # small rows stay in registers
    assert _spill_stores(r.stdout, "chain") == 0


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend in triton")
def test_blocked_kernels_compile_for_sm90_without_row_spills():
    """The column-blocked chain (every stage code) and draw at the production tile: their size
    does not depend on V, so this is the kernel that runs V = 128256 or 151936. The draw has
    no spills; the chain with all 15 stage codes at once spills a few scalars (8 bytes with
    triton 3.7.1), never a tile (``_TILE_SPILL``)."""
    from samplers.kernels import _common

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "samplers.kernels.aot", "--blocked", "--dtype", "bf16", "--tile",
                        str(_common.TILE), "--warps", str(_common.TILE_WARPS)],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _spill_stores(r.stdout, "blocked_chain") < _TILE_SPILL
    assert _spill_stores(r.stdout, "blocked_draw") == 0


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend in triton")
@pytest.mark.parametrize("codes", ["9", "6,7"], ids=["min_p", "top_k+top_p"])
def test_blocked_chain_with_the_fused_draw_compiles_without_tile_spills(codes):
    """The benchmark's configurations (a) and (b) with the draw at the end of the chain (what
    ``SamplerPipeline.sample`` launches for V = 128256): min_p spills one scalar (4 bytes with
    triton 3.7.1); top_k + top_p (window select, mass-bounded search, sparse mode, draw) a few
    scalars at 16 warps' 128 registers (32 bytes; none at 8 warps), never a tile (``_TILE_SPILL``)."""
    from samplers.kernels import _common

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "samplers.kernels.aot", "--blocked", "--draw", "--codes", codes, "--dtype", "bf16",
                        "--tile", str(_common.TILE), "--warps", str(_common.TILE_WARPS)],
                       cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _spill_stores(r.stdout, "blocked_chain") < _TILE_SPILL
