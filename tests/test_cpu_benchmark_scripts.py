"""The CPU benchmark scripts still run (a subprocess each, tiny sizes, as a user runs them):
compare.py's quick run and full_row_sorts.py. Kept apart from test_benchmark_scripts.py,
which CI runs again on the previous vLLM release."""

from __future__ import annotations

import json
import os
import re
import sys

import torch

from test_benchmark_scripts import _ROOT, run_script


def test_full_row_sorts():
    out = json.loads(run_script("benchmarks/full_row_sorts.py", "--shapes", "2x3000", "--repeat", "2"))
    times = out["ms"]["[2, 3000]"]
    assert set(times) == {"np.sort float32", "np.sort int64 keys", "skew", "typical_p", "tfs", "softmax + cumsum"}
    assert all(t > 0 for t in times.values()) and isinstance(out["simd_found"], list), out


def test_compare_quick_names_the_machine(tmp_path):
    """compare.py's quick run: its ratio line, and a machine line that says numpy's SIMD
    targets (they choose numpy's sorts, whose speed differs 4x between targets on Zen 4)."""
    md = tmp_path / "cpu.md"
    out = run_script("benchmarks/compare.py", "--quick", "--only", "top_p", "--markdown", str(md))
    assert re.search(r"top_p \[\d+, \d+\] .*pipeline/hf = [\d.]+/[\d.]+", out), out
    assert re.search(r"^- Machine: .*numpy [\d.]+ \(SIMD targets found: [^)]+;", md.read_text(), re.M), md.read_text()


def test_compare_runs_on_the_dtype_asked(tmp_path):
    """``--dtype bfloat16``: the cases read bf16 logits (ours and HF's alike), and the run says so."""
    md, js = tmp_path / "cpu.md", tmp_path / "cpu.json"
    run_script("benchmarks/compare.py", "--quick", "--only", "temperature", "--dtype", "bfloat16",
               "--markdown", str(md), "--json", str(js))
    assert "bfloat16 logits `3 * randn`" in md.read_text()
    assert json.loads(js.read_text())["dtype"] == "bfloat16"
    benchmarks = os.path.join(_ROOT, "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import compare
    finally:
        sys.path.remove(benchmarks)
    cases, pool = compare.cases_for_shape(2, 300, {"temperature", "chain7"}, torch.bfloat16)
    assert {c[0] for c in cases} == {"temperature", "chain7"} and pool().dtype == torch.bfloat16
