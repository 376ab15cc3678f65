#!/usr/bin/env bash
# vLLM for the tests/test_vllm*.py files on a CPU machine, next to the CPU build of torch.
# The current release by default; VLLM_VERSION=0.33.0 for the last one with the V1 model runner
# (.ci/run tests both).
#
# vLLM's wheel pins a CUDA build of torch, so it is installed with --no-deps (it can never
# replace the torch already there); then the light, pure-Python packages that its v1 sampler,
# logits-processor and request modules import. The only pins are vLLM's own (its version, and
# the ones its --no-deps install would otherwise miss); everything else is the current release.
set -euo pipefail
VLLM_VERSION="${VLLM_VERSION:-0.34.0}"
python -m pip install --quiet --no-deps "vllm==${VLLM_VERSION}"
python -m pip install --quiet msgspec cbor2 psutil pyzmq urllib3 aiohttp requests openai-harmony openai \
    cloudpickle pillow pybase64 cachetools uvloop prometheus_client partial-json-parser starlette \
    "fastapi<0.137" "apache-tvm-ffi==0.1.11"
