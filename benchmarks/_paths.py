"""The benchmark scripts' first import: puts the repository root (``ROOT``, for ``samplers``
without an install) and this folder (``HERE``, for the scripts' shared modules) on
``sys.path``, so that ``python benchmarks/<script>.py`` runs from a checkout."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)
