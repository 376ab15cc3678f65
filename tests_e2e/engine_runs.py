"""Offline vLLM engine runs for tests_e2e/test_vllm_engine.py, one engine per process.

    python tests_e2e/engine_runs.py OUT.json [--no-processor] [--runner v1|v2]

Starts ``vllm.LLM`` on the embedded tiny model (float32, eager; the CPU build spawns its
workers, hence the ``__main__`` guard) with our processor named by ``logits_processors``
(or none with --no-processor), runs the generate calls of ``RUNS`` and writes their token
ids (and timings) to OUT.json. The test file asserts on them; keeping every generate call of
an engine in one process pays the engine start (about a minute on a CPU) once.
"""

from __future__ import annotations

import json
import os
import sys
import time

FQCN = "samplers.integrations.vllm:SamplersLogitsProcessor"

PROMPTS = {
    "def": "def main(",
    "import": "import os\nimport sys\n",
    "repeat": "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = 2\n",
    "class": "class A:\n    def __init__(self",
}

# Each run: a list of requests (prompt key, vLLM fields, our block or None).
DRY = {"temperature": 0, "dry_multiplier": 2.0, "dry_base": 1.75, "dry_allowed_length": 2}
NGRAM = {"temperature": 0, "no_repeat_ngram_size": 3}
SEEDED = {"temperature": 0.9, "min_p": 0.05, "xtc_threshold": 0.1, "xtc_probability": 0.5, "seed": 1234}
RUNS = {
    # the same seeded request alone, then at another position of a bigger batch
    "seeded_alone": [("def", {}, SEEDED)],
    "seeded_batched": [("import", {"seed": 3}, None), ("class", {}, {"min_p": 0.1, "seed": 7}),
                       ("def", {}, SEEDED), ("repeat", {}, DRY)],
    # a repetitive prompt, greedy, with and without DRY / no_repeat_ngram
    "greedy_plain": [("repeat", {"temperature": 0}, None)],
    "greedy_dry": [("repeat", {}, DRY), ("def", {}, NGRAM), ("import", {"temperature": 0}, None)],
}
MAX_TOKENS = 48


def prompt_ids() -> dict:
    """The prompts as token ids (the tiny model's tokenizer), given to vLLM and to the
    Hugging Face reference alike."""
    from samplers.models import load_tokenizer

    tok = load_tokenizer()
    return {key: tok(text)["input_ids"] for key, text in PROMPTS.items()}


def requests(run: str, ids: dict):
    from vllm import SamplingParams

    prompts, params = [], []
    for key, vllm_fields, block in RUNS[run]:
        extra = None if block is None else {"samplers": block}
        prompts.append({"prompt_token_ids": ids[key]})
        params.append(SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra, **vllm_fields))
    return prompts, params


def main() -> None:
    out_path = sys.argv[1]
    use_processor = "--no-processor" not in sys.argv
    runner = sys.argv[sys.argv.index("--runner") + 1] if "--runner" in sys.argv else "v1"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
    from vllm import LLM

    from samplers.models import TINY_DIR

    t0 = time.time()
    llm = LLM(str(TINY_DIR), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              max_num_seqs=8, enable_prefix_caching=False,
              logits_processors=[FQCN] if use_processor else None)
    ids = prompt_ids()
    result = {"runner": runner, "start_s": time.time() - t0, "runs": {}, "prompt_ids": ids}
    t0 = time.time()
    for run in RUNS:
        if not use_processor and any(block is not None for _, _, block in RUNS[run]):
            continue
        prompts, params = requests(run, ids)
        outs = llm.generate(prompts, params, use_tqdm=False)
        result["runs"][run] = [list(o.outputs[0].token_ids) for o in outs]
    # An invalid request: what an offline user catches.
    from vllm import SamplingParams

    if use_processor:
        try:
            llm.generate(["x"], SamplingParams(max_tokens=2, extra_args={"samplers": {"min_p": 2.0}}),
                         use_tqdm=False)
            result["invalid"] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            result["invalid"] = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                                 "is_value_error": isinstance(exc, ValueError), "message": str(exc)}
        # the engine is still usable afterwards
        prompts, params = requests("greedy_plain", ids)
        result["after_invalid"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params,
                                                                                     use_tqdm=False)]
    result["generate_s"] = time.time() - t0
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
