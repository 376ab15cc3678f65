"""benchmarks/gpu_bench.py imports, parses its arguments and runs its dry-run path on a CPU."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("triton")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_bench.py")


def _benchmarks_on_path() -> None:
    """benchmarks/ on sys.path, as ``python benchmarks/<script>.py`` has it (for its _paths)."""
    if os.path.dirname(_PATH) not in sys.path:
        sys.path.insert(0, os.path.dirname(_PATH))


def _module():
    _benchmarks_on_path()
    spec = importlib.util.spec_from_file_location("gpu_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_and_arguments(capsys):
    mod = _module()
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--help"])
    assert e.value.code == 0
    assert "memory floor" in capsys.readouterr().out
    args = mod.parse_args([])
    assert args.batch_sizes == [1, 32, 256] and args.vocab_sizes == [32000, 128256, 151936]
    assert args.configs == ["a", "b", "c"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dry_run_checks_every_config(capsys):
    mod = _module()
    assert mod.main(["--dry-run", "--dtype", "bfloat16", "--history", "128"]) == 0
    out = capsys.readouterr().out
    assert out.count("-> OK") == 6, out  # 3 configs, a whole-row and a column-blocked shape
    assert "MISMATCH" not in out


def test_traffic_counts_the_kernels_passes_over_the_logits():
    """benchmarks/traffic.py: one pipeline step's kernel loads / stores under the interpreter.
    min_p at V = 1000 (whole-row chain with the draw fused, the processed logits not needed):
    one read."""
    _benchmarks_on_path()
    import traffic

    t, row_bytes = traffic.measure("a", 2, 1000)
    assert t.read / row_bytes == pytest.approx(1, abs=0.01)
    assert t.written / row_bytes < 0.01
    assert t.launches == 1 and t.torch_ops < 10
