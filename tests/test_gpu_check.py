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


def _fake_interpreters(tmp_path, pythons, system_tools=False):
    """An environment whose PATH holds fake interpreters: ``pythons`` maps a name (``python3``,
    ``python``) to the shell code deciding its exit status from its arguments ``$*``; each
    call is logged to ``calls.txt``. ``system_tools`` appends /usr/bin and /bin to PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in pythons.items():
        fake = bin_dir / name
        fake.write_text('#!/bin/sh\necho "$0 $*" >> "%s"\n%s\n' % (tmp_path / "calls.txt", body))
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = os.pathsep.join([str(bin_dir)] + (["/usr/bin", "/bin"] if system_tools else []))
    return env


def _run_gpu_check(tmp_path, env):
    return subprocess.run(["/bin/bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_gpu_check_says_when_no_interpreter_imports_torch(tmp_path):
    proc = _run_gpu_check(tmp_path, _fake_interpreters(tmp_path, {"python3": "exit 1", "python": "exit 1"}))
    assert proc.returncode == 2
    assert "neither python3 nor python imports torch" in proc.stderr
    assert "set PYTHON" in proc.stderr


def test_gpu_check_takes_python3_where_python_lacks_torch(tmp_path):
    # As on the lent GPU machines: python3 holds torch. The fake python3 answers the torch
    # probe, says "no GPU" to the CUDA probe and fails the dry run: every call must be its.
    imports_torch_only = "case \"$*\" in '-c import torch') exit 0;; esac\nexit 1"
    env = _fake_interpreters(tmp_path, {"python3": imports_torch_only, "python": "exit 1"}, system_tools=True)
    proc = _run_gpu_check(tmp_path, env)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert calls and all(call.split()[0].endswith("/bin/python3") for call in calls), calls
    assert any("gpu_bench.py --dry-run" in call for call in calls), calls
