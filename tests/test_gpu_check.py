"""benchmarks/gpu_check.sh on a machine without a CUDA GPU: it must say so, run
gpu_bench.py's dry run (the kernel-vs-torch checks at tiny shapes under Triton's
interpreter), write its results under the folder it is given, and exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the real checks")
def test_gpu_check_on_a_cpu_machine_runs_the_dry_run_and_exits_0(tmp_path):
    out = tmp_path / "gpu out"  # a space in the path: the script quotes it
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for the dry run
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout
    result = json.loads((out / "gpu_bench_dry_run.json").read_text())
    assert result["dry_run"] is True and result["rows"] == []
    # every configuration, at both layouts (whole row and column-blocked), agreed with the torch path
    assert len(result["checks"]) == 6, result["checks"]
    assert all(line.endswith("-> OK") for line in result["checks"]), result["checks"]
    summary = (out / "summary.md").read_text()
    assert "gpu_bench.py --dry-run: ok" in summary
    assert "V=70001" in (out / "gpu_bench_dry_run.md").read_text()


def test_gpu_check_requires_an_output_folder():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "usage" in proc.stderr
