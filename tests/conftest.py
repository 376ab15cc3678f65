"""Test configuration. Triton kernels run on the CPU through Triton's interpreter: the
variable must be set before triton (or anything importing it) is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
