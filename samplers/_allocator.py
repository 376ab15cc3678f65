"""glibc's malloc thresholds, raised once per process for the CPU path's ``[B, V]`` temporaries.

A CPU sampling step allocates and frees several ``[B, V]`` float32 temporaries (8 MB each at
[64, 32000]). glibc serves a block at or above its mmap threshold with a fresh ``mmap`` and
returns the heap's free top to the system past its trim threshold. Both start low (128 KiB,
256 KiB) and rise only when the process frees an mmapped block: to that block's size and twice
it. A process whose largest freed block is one ``[B, V]`` temporary then trims the heap as soon
as two such temporaries are free at its top, and every later step faults the same pages in
again: ~8000 page faults, 26 ms against 14 for the Arli example request's step at [64, 32000]
(``benchmarks/request_step.py``), depending on what the process allocated before.

``raise_malloc_thresholds`` frees one mmapped block just under glibc's ceiling for that rise
(32 MiB on 64-bit systems), which is what glibc itself does when any program frees such a block:
the thresholds become ~32 MiB and ~64 MiB, so temporaries below 32 MiB come from the heap and
up to ~64 MiB of freed heap stays with the process between steps. Nothing else changes: a
process that fixed its thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``mallopt``) turned glibc's rise off, and other allocators ignore the block.
"""

from __future__ import annotations

import platform

import numpy as np

#: glibc's ceiling for the rising mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_GLIBC_DYNAMIC_MAX = 32 << 20
#: The block freed: two pages under that ceiling (its chunk, header and page rounding
#: included, must not exceed it).
_BLOCK_BYTES = _GLIBC_DYNAMIC_MAX - (8 << 10)

_raised = False


def raise_malloc_thresholds() -> None:
    """Once per process, on glibc: allocate and free one block just under 32 MiB (never
    written, so no page of it is touched). Later calls return at once."""
    global _raised
    if _raised:
        return
    _raised = True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    block = np.empty(_BLOCK_BYTES, dtype=np.uint8)  # (numpy allocates through malloc)
    del block
