#!/usr/bin/env python
"""One decode step of the vLLM processor under Model Runner V2 (vLLM 0.34's only runner), on
the CPU, against the pipeline on the same rows.

vLLM's own ``RequestState`` buffers are built on the CPU (its fallback for machines without
pinned memory, as tests/test_vllm_v2.py does) and hold text-like histories (half prompt,
half output); every row carries the same request under ``extra_args["samplers"]``. Each step
the processor gets vLLM's ``LogitsContext`` of a decode step (one row per request, no
speculative decoding) and the committed token is written to the buffers afterwards, as
vLLM's ``post_update`` does. The reference is what a generation loop does with the same
rows: ``SamplerPipeline.process`` and ``SamplingBatch.append``. Both run in turn, step after
step (after ``--warmup`` steps), and the medians and their ratio are reported. With
``--join-every N``, every N-th step a new request (a prompt as long as the others' histories)
takes a slot whose request left; the processor's median on those steps is reported apart
("join step"; the reference batch is then built afresh and its step not timed).

    python benchmarks/vllm_v2_step.py                        # 64 x 32000, 2048 and 8192 tokens
    python benchmarks/vllm_v2_step.py --shapes 8x128256 --history 4096 --threads 2
    python benchmarks/vllm_v2_step.py --join-every 3   # and a new request every 3rd step

Needs vLLM (``bash scripts/install_vllm_for_tests.sh``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _paths  # noqa: F401  (repository root on sys.path)
import numpy as np
import torch
from bench_inputs import LogitsPool, make_histories

REQUEST = {"temperature": 0.8, "min_p": 0.05, "repetition_penalty": 1.1, "dry_multiplier": 0.8,
           "dry_allowed_length": 2}


def _vllm_buffers_on_the_cpu() -> None:
    """vLLM's buffer classes on a machine without pinned memory or UVA (the CPU platform is
    not detected without vllm._C, so its device type is set to "cpu")."""
    import vllm.utils.torch_utils as torch_utils
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils
    from vllm.platforms import current_platform

    buffer_utils.is_uva_available = lambda: False
    if hasattr(buffer_utils, "is_pin_memory_available"):
        buffer_utils.is_pin_memory_available = lambda: False
    torch_utils.PIN_MEMORY = False
    current_platform.device_type = "cpu"


def measure(B: int, V: int, H: int, steps: int, warmup: int, join_every: int = 0) -> dict:
    from vllm import SamplingParams as VllmParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
    from vllm.v1.worker.gpu.states import RequestState

    from samplers import SamplerPipeline, SamplingBatch, SamplingParams
    from samplers.integrations.vllm import EXTRA_ARGS_KEY, SamplersLogitsProcessor

    total = H + warmup + steps + 1
    joins = (warmup + steps) // join_every if join_every else 0
    # [B + joins, total]: row src[b] is slot b's request; each join takes a fresh row.
    text = torch.tensor(make_histories(B + joins, total, V, seed=1), dtype=torch.int64)
    src = np.arange(B)
    prompt_lens = np.full(B, H // 2)
    rs = RequestState(B, total + 8, 256, 0, V, torch.device("cpu"))
    cfg = type("Config", (), {"speculative_config": None})()
    proc = SamplersLogitsProcessor(cfg, LogitsProcRequestState.from_request_state(rs), backend="torch")
    vparams = VllmParams(extra_args={EXTRA_ARGS_KEY: REQUEST})
    params = SamplingParams.from_dict(REQUEST)

    def admit(slot: int, length: int) -> None:
        """Slot's request (text row src[slot]) is added with `length` tokens, as vLLM's
        add_request writes them."""
        rs.prompt_len.np[slot] = prompt_lens[slot]
        rs.prefill_len.np[slot] = length
        rs.prompt_len.copy_to_uva()
        rs.prefill_len.copy_to_uva()
        rs.all_token_ids.gpu[slot, :length] = text[src[slot], :length].to(torch.int32)
        proc.add_request(slot, vparams)

    def reference_batch(length: int) -> SamplingBatch:
        rows = text[torch.from_numpy(src), :length].tolist()
        return SamplingBatch([params] * B, [r[:p] for r, p in zip(rows, prompt_lens)],
                             [r[p:] for r, p in zip(rows, prompt_lens)], vocab_size=V)

    for slot in range(B):
        admit(slot, H)
    proc.apply_staged_writes()
    batch = reference_batch(H)
    pipe = SamplerPipeline(backend="torch")
    logits = LogitsPool.of_logits(B, V)  # (other logits every step, as the model gives)
    slots = np.arange(B, dtype=np.int32)
    state = {"length": H}  # history length of every row at this step (pos + 1)

    def processor_step() -> None:
        n = state["length"]
        ctx = LogitsContext(
            expanded_idx_mapping=torch.from_numpy(slots), idx_mapping=torch.from_numpy(slots),
            idx_mapping_np=slots, expanded_local_pos=torch.zeros(B, dtype=torch.int32),
            input_ids=text[torch.from_numpy(src), n - 1].to(torch.int32),
            pos=torch.full((B,), n - 1, dtype=torch.int64),
            seq_lens_upper_bound_np=np.full(B, n, dtype=np.int32))
        state["processor"] = proc.apply(logits().clone(), ctx)  # (vLLM hands the processors a copy)
        # post_update: the sampled token
        rs.all_token_ids.gpu[:B, n] = text[torch.from_numpy(src), n].to(torch.int32)
        state["length"] = n + 1

    def pipeline_step() -> None:
        n = state["length"]  # the processor's step has moved on: the same history length
        state["pipeline"] = pipe.process(logits().clone(), batch)
        batch.append(text[torch.from_numpy(src), n - 1])

    # The processor's first call builds from vLLM's buffers; then both advance together.
    times: dict[str, list[float]] = {"processor": [], "join": [], "pipeline": []}
    batch.append(text[:B, H])  # the reference holds H + 1 tokens at the processor's 2nd step
    processor_step()
    joined = 0
    for step in range(warmup + steps):
        join = join_every and step % join_every == join_every - 1
        if join:  # a new request joins with its prompt prefilled in one chunk, in a reused slot
            slot = (joined * 7) % B
            joined += 1
            src[slot] = B + joined - 1
            prompt_lens[slot] = state["length"]
            admit(slot, state["length"])
            batch = reference_batch(state["length"])
        for name, fn in (("processor", processor_step), ("pipeline", pipeline_step)):
            t = time.perf_counter()
            fn()
            if step >= warmup and not (join and name == "pipeline"):  # (a fresh reference batch)
                times["join" if join and name == "processor" else name].append((time.perf_counter() - t) * 1e3)
        if not torch.equal(state["processor"], state["pipeline"]):
            raise AssertionError(f"step {step}: the processor's row differs from the pipeline's")
        logits.advance()
    ours, ref = statistics.median(times["processor"]), statistics.median(times["pipeline"])
    join_ms = statistics.median(times["join"]) if times["join"] else float("nan")
    return {"shape": [B, V], "history": H, "processor_ms": ours, "pipeline_ms": ref,
            "ratio": ours / ref, "join_ms": join_ms, "builds": proc.history_builds,
            "rows_built": getattr(proc, "history_rows_built", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["64x32000"])
    ap.add_argument("--history", nargs="+", type=int, default=[2048, 8192])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--join-every", type=int, default=0,
                    help="every N-th step a new request joins in a reused slot (0: never)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _vllm_buffers_on_the_cpu()
    import vllm

    print(f"vLLM {vllm.__version__}, torch {torch.__version__}, {args.threads} torch thread(s), "
          f"median of {args.steps} steps")
    print("| shape | history | processor ms | pipeline + append ms | ratio | join step ms | "
          "join / processor | builds | rows built |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        B, V = (int(x) for x in shape.split("x"))
        for H in args.history:
            r = measure(B, V, H, args.steps, args.warmup, args.join_every)
            join = (f"{r['join_ms']:.2f} | {r['join_ms'] / r['processor_ms']:.2f}" if args.join_every
                    else "- | -")
            print(f"| [{B}, {V}] | {H} | {r['processor_ms']:.2f} | {r['pipeline_ms']:.2f} | "
                  f"{r['ratio']:.2f} | {join} | {r['builds']} | {r['rows_built']} |")


if __name__ == "__main__":
    main()
