"""Shared inputs for the CPU benchmarks (pytest-benchmark): absolute per-call timings.

benchmarks/RESULTS.md's CPU section comes from ``benchmarks/compare.py`` instead (ours and
Hugging Face's interleaved in one process, as ratios: steadier on a shared machine).

Run explicitly (they are not part of the test suite: ``testpaths`` is ``tests/`` and
``addopts`` has ``--benchmark-skip``, which ``--benchmark-only`` overrides)::

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results.json
    python benchmarks/report.py benchmarks/results.json > benchmarks/RESULTS.md

Inputs (``bench_inputs.py``) are deterministic. ``SAMPLERS_BENCH_THREADS`` sets torch's
thread count (default: torch's own default, one per core); every benchmark of a run uses
the same count, HF's included.
"""

from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

def pytest_configure(config: pytest.Config) -> None:
    threads = os.environ.get("SAMPLERS_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_benchmark_update_machine_info(config, machine_info):  # pytest-benchmark hook
    import samplers

    machine_info["torch_version"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["cpu_model"] = _cpu_model()
    machine_info["platform"] = platform.platform()
    machine_info["loadavg"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    machine_info["bench_threads_env"] = os.environ.get("SAMPLERS_BENCH_THREADS")
    machine_info["argv"] = sys.argv[1:]
    machine_info["samplers_version"] = getattr(samplers, "__version__", "?")
    try:
        import transformers

        machine_info["transformers_version"] = transformers.__version__
    except ImportError:
        machine_info["transformers_version"] = None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
