"""What a benchmark run should record about the machine beyond torch's own report."""

from __future__ import annotations

import numpy as np


def numpy_simd_found() -> list[str]:
    """The SIMD targets numpy found on this CPU and will dispatch to (they choose its sort
    kernels: README, "Speed on the CPU"); empty where this numpy cannot say (before 1.25)."""
    try:
        config = np.show_config(mode="dicts")
    except TypeError:  # (numpy < 1.25: show_config prints only)
        return []
    return list(config.get("SIMD Extensions", {}).get("found", []))
