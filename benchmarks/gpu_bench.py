#!/usr/bin/env python
"""GPU benchmark of the Triton kernels against the torch reference path.

On a CUDA machine it
1. checks the kernels against the torch path on the GPU for every configuration, testing
   what ``samplers/kernels/README.md`` promises ("What is promised on a GPU"): removed sets
   within the threshold tolerance, kept values bit-identical, the same seeded tokens;
2. measures the device-to-device copy bandwidth (the memory floor of one sampling step is
   one read of the logits: ``B * V * bytes_per_logit / bandwidth``);
3. times (``triton.testing.do_bench``, median) one sampling step -- the processing chain and
   the draw, without log-probabilities -- on the triton and on the torch backend for
   B in {1, 32, 256}, V in {32000, 128256, 151936} and the configurations
   (a) min_p only, (b) top_k + top_p, (c) the full default chain with DRY and the penalties
   on 4k-token histories, plus FlashInfer's ``top_k_top_p_sampling_from_logits`` on (b)
   when ``flashinfer`` is importable;
4. prints a table with each time as a ratio to the memory floor, and with ``--json`` /
   ``--markdown`` writes it (rewritten after every row, so a run stopped from outside
   keeps what it measured); ``--budget-s`` skips the rows left once that many seconds
   have passed, and says so.

``--dry-run`` runs everything except the timing at tiny shapes on whatever device exists
(on a CPU the kernels run under ``TRITON_INTERPRET=1``), so the script is tested without a GPU.

    python benchmarks/gpu_bench.py                  # the full table (CUDA)
    python benchmarks/gpu_bench.py -b 256 -v 128256 -c a b
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

import _paths  # noqa: F401  (first: puts the checkout on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from samplers import SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402

CONFIGS = {
    "a": ("min_p only", dict(min_p=0.05)),
    "b": ("top_k+top_p", dict(top_k=50, top_p=0.9)),
    "c": ("full default chain", dict(
        repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1, dry_multiplier=0.8,
        dry_base=1.75, dry_allowed_length=2, temperature=0.8, top_k=100, top_p=0.95, top_a=0.01, min_p=0.02,
        eta_cutoff=1e-4, epsilon_cutoff=1e-4, typical_p=0.99, nsigma=3.0, smoothing_factor=0.1,
        xtc_threshold=0.1, xtc_probability=0.5)),
}
HISTORY = {"a": False, "b": False, "c": True}  # which configs carry histories (--history tokens)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("-v", "--vocab-sizes", type=int, nargs="+", default=[32000, 128256, 151936])
    p.add_argument("-c", "--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the logits")
    p.add_argument("--history", type=int, default=4096, help="history length (prompt + output) for config c")
    p.add_argument("--check-batch", type=int, default=8, help="rows used by the correctness check")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetitions (ms)")
    p.add_argument("--skip-check", action="store_true", help="time without checking first")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, checks only, no timing (runs on a CPU with TRITON_INTERPRET=1)")
    p.add_argument("--json", default=None, help="write the results (checks and table) here as JSON")
    p.add_argument("--markdown", default=None, help="write the table here as Markdown")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the remaining table rows once this many seconds have passed")
    return p.parse_args(argv)


HEADER = ("| config | B | V | floor us | torch ms | triton ms | speedup | triton/floor | flashinfer ms | "
          "flashinfer/floor |")


def _row_markdown(r: dict) -> str:
    fi = (f"{r['flashinfer_ms']:.3f} | {r['flashinfer_ms'] / r['floor_ms']:.1f}x" if r.get("flashinfer_ms")
          else "- | -")
    return (f"| {r['config']} ({CONFIGS[r['config']][0]}) | {r['B']} | {r['V']} | {r['floor_ms'] * 1e3:.1f} | "
            f"{r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['torch_ms'] / r['triton_ms']:.1f}x | "
            f"{r['triton_ms'] / r['floor_ms']:.1f}x | {fi} |")


def write_outputs(results: dict, args: argparse.Namespace) -> None:
    """Write ``results`` to ``--json`` / ``--markdown`` (whichever were given)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        lines = [f"Device: {results.get('device', '?')}; copy bandwidth "
                 f"{results.get('bandwidth_gbps', 0):.0f} GB/s; logits {results.get('dtype')}; "
                 f"`{results.get('command')}`", ""]
        if results.get("dry_run"):
            lines.append("Dry run (no GPU timing): the checks below ran on "
                         f"{results.get('device')}.")
        lines += [f"- {c}" for c in results.get("checks", [])]
        if results.get("rows"):
            lines += ["", HEADER, "|" + "---|" * 10] + [_row_markdown(r) for r in results["rows"]]
        if results.get("skipped"):
            lines += ["", f"Skipped (over the {results.get('budget_s')} s budget): "
                      + ", ".join(results["skipped"])]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


def make_inputs(config: str, B: int, V: int, dtype: torch.dtype, device: torch.device, history: int,
                seed: int = 0, **overrides) -> tuple[torch.Tensor, SamplingBatch]:
    """Random logits (LLM-like spread) and a batch of the configuration, seeded rows;
    ``overrides``: more SamplingParams fields for every row."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype).to(device)
    kw = {**CONFIGS[config][1], **overrides}
    params = [SamplingParams(seed=1000 + i, **kw) for i in range(B)]
    L = history if HISTORY[config] else 0
    rng = np.random.default_rng(seed)
    prompts, outputs = [], []
    for _ in range(B):
        if L:
            # repetitive text: a random walk over a small phrase book, so DRY and n-grams fire
            phrases = rng.integers(0, V, size=(64, 16))
            toks = phrases[rng.integers(0, 64, size=L // 16 + 1)].reshape(-1)[:L]
            prompts.append(toks[: L * 3 // 4].tolist())
            outputs.append(toks[L * 3 // 4:].tolist())
        else:
            prompts.append([]), outputs.append([])
    batch = SamplingBatch(params, prompts, outputs, vocab_size=V, device=device)
    return logits, batch


def step_fn(backend: str, logits: torch.Tensor, batch: SamplingBatch) -> Callable[[], torch.Tensor]:
    """One sampling step on ``backend`` as a user runs it: ``SamplerPipeline.sample`` (the
    chain and the draw; the configurations ask for no top log-probabilities)."""
    pipe = SamplerPipeline(backend, seed=0)
    return lambda: pipe.sample(logits, batch).token_ids


def check(config: str, B: int, V: int, dtype: torch.dtype, device: torch.device, history: int) -> str:
    """Kernels vs the torch path on ``device``, testing exactly what kernels/README.md promises:

    - removed sets: every token the kernels keep is kept by the reference with the threshold
      parameters loosened by ``THRESHOLD_RTOL`` (relative), every token they remove is removed
      by it with the parameters tightened by as much ("outside the promise" must be 0; the
      near-threshold flips against the reference at the exact parameters are reported);
    - kept values: bit-identical to the reference's (no stage here has a value that depends
      on a softmax statistic; dynamic temperature would be rtol ``THRESHOLD_RTOL``);
    - seeded tokens: the same token on every row whose removed set equals the reference's.
    Returns a one-line summary ending in OK or MISMATCH."""
    from samplers.kernels._common import THRESHOLD_KEEP_MORE, THRESHOLD_RTOL as rtol

    kw = CONFIGS[config][1]
    moved = {k: d for k, d in THRESHOLD_KEEP_MORE.items() if k in kw}
    logits, batch = make_inputs(config, B, V, dtype, device, history, seed=1)
    _, loose = make_inputs(config, B, V, dtype, device, history, seed=1,
                           **{k: kw[k] * (1 + rtol * d) for k, d in moved.items()})
    _, tight = make_inputs(config, B, V, dtype, device, history, seed=1,
                           **{k: kw[k] * (1 - rtol * d) for k, d in moved.items()})
    torch_pipe, triton_pipe = SamplerPipeline("torch", seed=0), SamplerPipeline("triton", seed=0)
    want = torch_pipe.process(logits, batch)
    got = triton_pipe.process(logits, batch)
    kept, kept_ref = ~torch.isneginf(got), ~torch.isneginf(want)
    kept_loose = ~torch.isneginf(torch_pipe.process(logits, loose))
    kept_tight = ~torch.isneginf(torch_pipe.process(logits, tight))
    outside = int((kept & ~kept_loose).sum() + (kept_tight & ~kept).sum())
    flips = int((kept != kept_ref).sum())
    both = kept & kept_ref
    err = float((got[both].float() - want[both].float()).abs().max()) if both.any() else 0.0
    same_rows = (kept == kept_ref).all(-1)
    t_want = torch_pipe.sample(logits, batch).token_ids
    t_got = triton_pipe.sample(logits, batch).token_ids
    same = int((t_want == t_got)[same_rows].sum())
    rows = int(same_rows.sum())
    ok = outside == 0 and err == 0.0 and same == rows
    return (f"check {config} B={B} V={V} {str(dtype)[6:]}: outside the promise {outside}, near-threshold "
            f"flips {flips}, max |diff| of kept values {err:.3g}, same seeded tokens {same}/{rows} "
            f"(rows with the reference's removed set) -> {'OK' if ok else 'MISMATCH'}")


def bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), median of do_bench."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def flashinfer_fn(logits: torch.Tensor, batch: SamplingBatch) -> Optional[Callable[[], torch.Tensor]]:
    try:
        import flashinfer.sampling as fs
    except Exception:
        return None
    k = batch.param("top_k").to(torch.int32)
    p = batch.param("top_p")
    x = logits.float()
    fn = lambda: fs.top_k_top_p_sampling_from_logits(x, k, p)  # noqa: E731  (flashinfer >= 0.2 signature)
    try:
        fn()
    except Exception as e:  # an older or newer signature: report and leave the column empty
        print(f"flashinfer top_k_top_p_sampling_from_logits not usable here: {type(e).__name__}: {e}")
        return None
    return fn


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    t_start = time.monotonic()
    results: dict = dict(command="python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:]), dtype=args.dtype,
                         dry_run=bool(args.dry_run), checks=[], rows=[], skipped=[], budget_s=args.budget_s)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cuda" if cuda else "cpu")
        results["device"] = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"
        import samplers.kernels as kernels

        if not kernels.available(device):
            print("dry run: triton backend unavailable here (set TRITON_INTERPRET=1 before importing)")
            results["checks"].append("triton backend unavailable")
            write_outputs(results, args)
            return 0
        for config in args.configs:
            for B, V in ((2, 1000), (1, 70001)):  # 70001: a row above 65536 lanes, the column-blocked kernels
                line = check(config, B, V, dtype, device, history=min(args.history, 256))
                print(line)
                results["checks"].append(line)
                write_outputs(results, args)
            logits, batch = make_inputs(config, 2, 1000, dtype, device, min(args.history, 256))
            for backend in ("torch", "triton"):
                step_fn(backend, logits, batch)()  # (the step the table times, run once)
        print("dry run: timing skipped (each timed step ran once)")
        write_outputs(results, args)
        return 1 if any("MISMATCH" in c for c in results["checks"]) else 0
    if not cuda:
        print("gpu_bench: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    bw = bandwidth_gbps(device)
    bytes_per = torch.finfo(dtype).bits // 8
    print(f"# device: {name}; copy bandwidth {bw:.0f} GB/s; logits {args.dtype}")
    results.update(device=name, bandwidth_gbps=bw)
    write_outputs(results, args)
    if not args.skip_check:
        for config in args.configs:
            for V in args.vocab_sizes:
                line = check(config, args.check_batch, V, dtype, device, args.history)
                print(line)
                results["checks"].append(line)
                write_outputs(results, args)
    print()
    print(HEADER)
    print("|" + "---|" * 10)
    for config in args.configs:
        for B in args.batch_sizes:
            for V in args.vocab_sizes:
                if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                    results["skipped"].append(f"{config} B={B} V={V}")
                    continue
                logits, batch = make_inputs(config, B, V, dtype, device, args.history)
                floor_ms = B * V * bytes_per / (bw * 1e9) * 1e3
                t_torch = do_bench(step_fn("torch", logits, batch), warmup=args.warmup, rep=args.rep,
                                   return_mode="median")
                t_triton = do_bench(step_fn("triton", logits, batch), warmup=args.warmup, rep=args.rep,
                                    return_mode="median")
                fi = flashinfer_fn(logits, batch) if config == "b" else None
                t_fi = do_bench(fi, warmup=args.warmup, rep=args.rep, return_mode="median") if fi else None
                row = dict(config=config, B=B, V=V, floor_ms=floor_ms, torch_ms=t_torch, triton_ms=t_triton,
                           flashinfer_ms=t_fi)
                results["rows"].append(row)
                print(_row_markdown(row), flush=True)
                write_outputs(results, args)
                del logits, batch
                torch.cuda.empty_cache()
    if results["skipped"]:
        print(f"over the {args.budget_s} s budget, skipped: {', '.join(results['skipped'])}")
    write_outputs(results, args)
    return 1 if any("MISMATCH" in c for c in results["checks"]) else 0


def main(argv: Optional[list[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
