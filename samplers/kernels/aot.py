"""Ahead-of-time compilation of the kernels for a CUDA target, without a GPU.

The interpreter (the CPU tests) does not type-check kernels the way the GPU compiler does;
compiling them to PTX / cubin for an NVIDIA target catches what would only fail on a GPU,
and ``ptxas -v`` reports registers and spills per configuration, plus the shared memory a
launch needs (what Triton compares with the device's per-block limit). Compiled as the JIT
compiles the usual launch: pointers and the row strides / V marked 16-divisible (the
JIT's ``tt.divisibility`` hints; without them the figures are not those of the real
kernels), ``enable_fp_fusion`` as the launches pass it.

    python -m samplers.kernels.aot                    # sm_90, BLOCK 4096, every kernel
    python -m samplers.kernels.aot --block 131072 --warps 32 --codes 6,7
    python -m samplers.kernels.aot --blocked --tile 8192 --warps 16  # the column-blocked chain + draw (any V)
    python -m samplers.kernels.aot --blocked --codes 6,7 --draw      # top_k + top_p with the draw fused
    python -m samplers.kernels.aot --arch 86 --block 8192 --chain-only --dtype bf16  # shared memory on sm_86

Must run without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives
interpreted functions, which cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Optional

_CHAIN_SIG = {"x_ptr": "*fp32", "out_ptr": "*fp32", "prm_ptr": "*fp32", "rmask_ptr": "*i8", "seen_ptr": "*i8",
              "cnt_ptr": "*i32", "ban_ptr": "*i8", "key_ptr": "*i32", "scr_ptr": "*fp32", "greedy_ptr": "*i8",
              "tok_ptr": "*i64", "lp_ptr": "*fp32", "B": "i32", "V": "i32", "stride_x": "i32",
              "stride_o": "i32", "stride_s": "i32", "stride_c": "i32", "stride_b": "i32"}
# the column-blocked chain: the tile count after V, the scratch row stride at the end
_BLOCKED_CHAIN_SIG = {**{k: v for k, v in _CHAIN_SIG.items() if k not in ("stride_x", "stride_o", "stride_s",
                                                                          "stride_c", "stride_b")},
                      "NT": "i32", "stride_x": "i32", "stride_o": "i32", "stride_s": "i32", "stride_c": "i32",
                      "stride_b": "i32", "stride_scr": "i32"}


#: Integer arguments the JIT sees as multiples of 16 in the usual launch (vocabularies of LLMs
#: are: 32000, 50304, 128256, 151936; row strides are V): the JIT marks those, and every
#: 16-byte aligned pointer (torch's allocations are), ``tt.divisibility = 16``.
_ALIGNED_INTS = ("V", "stride_x", "stride_o", "stride_s", "stride_c", "stride_b", "stride_scr")


def _hints(sig: dict) -> dict:
    """The JIT's specialisation attributes for the usual launch: ``tt.divisibility`` 16 on every
    pointer and on the aligned integer arguments. Without them the compiler cannot vectorise
    the loads and stores, and its register, spill and shared-memory figures are not those of
    the kernels the JIT runs (``_compact``'s scatter goes through shared memory only then)."""
    names = list(sig)
    return {(names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
            if (t.startswith("*") or k in _ALIGNED_INTS) and t != "constexpr"}


def _compile(fn, signature: dict, constexprs: dict, arch: int, warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=_hints(sig))
    # enable_fp_fusion as the launches pass it (``_common.FP_FUSION``)
    from ._common import FP_FUSION

    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "enable_fp_fusion": FP_FUSION})


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_<arch>`` (its bundled one, or ``TRITON_PTXAS_PATH``):
    the CUDA version, and so the PTX versions it accepts, changes with the triton release."""
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(arch)
    except TypeError:  # releases whose get_ptxas takes no architecture
        tool = nv.get_ptxas()
    return tool.path


def _ptxas_info(compiled, arch: int) -> str:
    ptxas = _ptxas_path(arch)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"{ptxas} failed on the PTX for sm_{arch} (exit {r.returncode}): {r.stderr.strip()}")
    info = "; ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines()
                     if "registers" in line or "spill" in line)
    # the shared memory of the launch (Triton's own scratch, what OutOfResources compares with
    # the device's per-block limit): ptxas' smem line counts only static shared variables
    return f"{info}; {compiled.metadata.shared} bytes shared"


def _chain_constants(codes: Optional[list[int]], size_name: str, size: int) -> dict[str, int]:
    """The chain kernels' constexprs: stage codes (default every one) padded to the slot
    count, the row/tile size and the compaction size that goes with it."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("samplers.kernels.aot must run without TRITON_INTERPRET")
    from . import codes as C

    if codes is None:
        codes = [C.PENALTIES, C.NGRAM, C.DYNATEMP, C.NSIGMA, C.TOP_K, C.TOP_P, C.TOP_A, C.MIN_P, C.ETA,
                 C.EPSILON, C.TYPICAL, C.QUADRATIC, C.XTC_PHILOX, C.XTC, C.TEMPERATURE]
    slots = list(codes) + [C.NONE] * (C.NSLOTS - len(codes))
    cx = {f"S{i}": c for i, c in enumerate(slots)}
    cx[size_name] = size
    cx["KMAX"] = C.compact_size(size)
    return cx


def _draw_signature(dtype: str, blocked: bool = False) -> dict[str, str]:
    """The draw kernels' arguments with the uniforms computed in the kernel (KEYED, the
    pipeline's ``sample`` path)."""
    sig = {"x_ptr": f"*{dtype}", "greedy_ptr": "*i8", "u_ptr": "*fp32", "key_ptr": "*i32", "out_ptr": "*i64",
           "lp_ptr": "*fp32"}
    if blocked:
        sig["scr_ptr"] = "*fp32"
    sig.update({"B": "i32", "V": "i32", "stride_x": "i32"})
    if blocked:
        sig["NT"] = "i32"
        sig["stride_scr"] = "i32"
    return sig


def compile_all(arch: int = 90, block: int = 4096, warps: int = 8, codes: Optional[list[int]] = None,
                dtype: str = "fp32", chain_only: bool = False) -> dict[str, str]:
    """Compile the chain kernel (``codes``, default every stage code), the draw, Philox and
    row-statistics kernels for ``sm_<arch>``; returns name -> ptxas register / spill summary
    and the shared memory of the launch. ``chain_only``: the chain kernel alone."""
    cx = _chain_constants(codes, "BLOCK", block)
    from . import draw as D
    from . import fused as K
    from . import row_stats as R

    sig = dict(_CHAIN_SIG, x_ptr=f"*{dtype}")
    cx["DRAW"], cx["STORE"] = True, True  # with the token draw at the end (``SamplerPipeline.sample``): the larger kernel
    out = {"chain": _ptxas_info(_compile(K._chain_kernel, sig, cx, arch, warps), arch)}
    if chain_only:
        return out
    out["draw"] = _ptxas_info(_compile(D._draw_kernel, _draw_signature(dtype), {"BLOCK": block, "KEYED": True},
                                           arch, warps),
                              arch)
    sig = {"out_ptr": "*fp32", "klo_ptr": "*i32", "khi_ptr": "*i32", "step_ptr": "*i32", "seq_ptr": "*i32",
           "purpose": "i32", "B": "i32"}
    out["philox"] = _ptxas_info(_compile(D._uniform_kernel, sig, {"BLOCK": 128}, arch, 4), arch)
    sig = {"x_ptr": f"*{dtype}", "out_ptr": "*fp32", "V": "i32", "stride_x": "i32"}
    out["row_stats"] = _ptxas_info(_compile(R._row_stats_kernel, sig, {"BLOCK": block}, arch, warps), arch)
    return out


def compile_blocked(arch: int = 90, tile: int = 8192, warps: int = 16, codes: Optional[list[int]] = None,
                    dtype: str = "fp32", draw: bool = False) -> dict[str, str]:
    """Compile the column-blocked chain (``samplers.kernels.blocked``; ``codes``, default every stage
    code) and the blocked draw for ``sm_<arch>``; the tile, not V, sizes the program.
    ``draw``: compile the chain with the draw fused at its end (``SamplerPipeline.sample``)."""
    cx = _chain_constants(codes, "TILE", tile)
    from . import blocked as KB
    from . import codes as C
    from . import draw as D

    sig = dict(_BLOCKED_CHAIN_SIG, x_ptr=f"*{dtype}")
    cx.update(DRAW=draw, NTB=D._TILES_PER_STEP, STORE=True)  # draw: the chain with the token draw at its end
    out = {"blocked_chain": _ptxas_info(_compile(KB._blocked_chain_kernel, sig, cx, arch, warps), arch)}
    out["blocked_draw"] = _ptxas_info(
        _compile(D._blocked_draw_kernel, _draw_signature(dtype, blocked=True),
                 {"TILE": tile, "KMAX": C.compact_size(tile), "KEYED": True, "NTB": D._TILES_PER_STEP}, arch, warps), arch)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--warps", type=int, default=None, help="default 8 (whole-row), 16 (--blocked)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--codes", default=None, help="comma-separated stage codes of the chain (kernels.fused)")
    p.add_argument("--blocked", action="store_true", help="the column-blocked chain and draw instead")
    p.add_argument("--tile", type=int, default=8192, help="tile of the blocked kernels")
    p.add_argument("--draw", action="store_true", help="--blocked: the chain with the draw fused at its end")
    p.add_argument("--chain-only", action="store_true", help="whole-row: compile the chain kernel alone")
    a = p.parse_args(argv)
    codes = [int(c) for c in a.codes.split(",")] if a.codes else None
    import time

    t0 = time.perf_counter()
    if a.blocked:
        result = compile_blocked(a.arch, a.tile, a.warps or 16, codes, a.dtype, draw=a.draw)
    else:
        result = compile_all(a.arch, a.block, a.warps or 8, codes, a.dtype, chain_only=a.chain_only)
    for name, info in result.items():
        print(f"{name}: {info}")
    print(f"compile time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
