"""benchmarks/request_step.py runs a few steps of the Arli request at a small shape, also with
rows of default parameters among the request's (the pipeline's row groups)."""

from __future__ import annotations

import os
import re
import sys

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_request_step_runs_with_and_without_default_rows():
    if _BENCH not in sys.path:
        sys.path.insert(0, _BENCH)  # (as ``python benchmarks/request_step.py`` has it, for its _paths)
    import request_step

    for default_rows in (0, 1, 3):
        line = request_step.run((4, 2048), 2, None, default_rows)
        assert re.fullmatch(r"\[4, 2048\]: step \d+\.\d\d ms, \d+ page faults", line), line
