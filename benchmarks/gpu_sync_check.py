#!/usr/bin/env python
"""Host-sync check of the triton path on a CUDA device (part of ``benchmarks/gpu_check.sh``).

For each configuration of ``gpu_bench.py`` (a: min_p, b: top_k + top_p, c: the full
default chain with DRY and penalties on histories), a few generation steps
(``SamplerPipeline("triton").sample`` then ``batch.append``) run first untimed, then
``--steps`` more under ``torch.cuda.set_sync_debug_mode``: once in "warn" mode, counting
the device -> host synchronisations per step, and once in "error" mode to record where the
first one happens (the innermost frames of ours in its traceback). A sampling step should
need none: the tokens stay on the device until the caller reads them.

    python benchmarks/gpu_sync_check.py --json out/sync.json --markdown out/sync.md
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from typing import Optional

from _paths import ROOT as _ROOT  # (first: puts the checkout on sys.path)

import torch  # noqa: E402

from samplers import SamplerPipeline  # noqa: E402

from gpu_bench import CONFIGS, make_inputs  # noqa: E402


def _our_frames(tb: str, limit: int = 4) -> str:
    """The last ``limit`` frames of ``tb`` that are in this repository."""
    frames = [blk for blk in tb.split('  File "')[1:] if _ROOT in blk.split('"', 1)[0]]
    return "".join('  File "' + f for f in frames[-limit:]).rstrip()


def check_config(config: str, B: int, V: int, history: int, steps: int) -> dict:
    device = torch.device("cuda")
    logits, batch = make_inputs(config, B, V, torch.float32, device, history)
    pipe = SamplerPipeline("triton", seed=0)

    def step() -> None:
        out = pipe.sample(logits, batch)
        batch.append(out.token_ids)

    for _ in range(3):  # compile, choose layouts, build the histories' derived state
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    where = None
    if syncs:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError:
            where = _our_frames(traceback.format_exc())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(config=config, B=B, V=V, steps=steps, syncs=syncs, syncs_per_step=syncs / steps,
                first_sync_in=where)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    p.add_argument("-b", "--batch", type=int, default=32)
    p.add_argument("-v", "--vocab", type=int, default=128256)
    p.add_argument("--history", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device", file=sys.stderr)
        return 2
    rows = []
    for config in args.configs:
        try:
            r = check_config(config, args.batch, args.vocab, args.history, args.steps)
        except Exception as e:  # report and go on with the next configuration
            r = dict(config=config, B=args.batch, V=args.vocab, error=f"{type(e).__name__}: {e}")
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    if args.markdown:
        lines = ["| config | B | V | syncs per step | first sync in |", "|---|---|---|---:|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['config']} | {r['B']} | {r['V']} | – | error: {r['error']} |")
            else:
                where = (r["first_sync_in"] or "–").replace("\n", "<br>").replace("|", "\\|")
                lines.append(f"| {r['config']} ({CONFIGS[r['config']][0]}) | {r['B']} | {r['V']} | "
                             f"{r['syncs_per_step']:.1f} | {where} |")
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if all(r.get("syncs", 1) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
