"""A tracer that fails on any torch call that reads a tensor's values back to the host.

Off the CPU each such call is a host-device sync (and rules out CUDA-graph capture), so the
paths promised to be sync-free run under it. It sees every torch function and tensor
method called while it is active (a ``TorchFunctionMode``), so it works on CPU tensors
too: a path that takes its device branch on the CPU (e.g. forced by a test switch) is
checked without a GPU.

Flagged: ``item``, ``tolist``, ``numpy``, ``cpu``; Python conversions (``bool``, ``int``,
``float``, ``index``); ops whose output size depends on the values (``nonzero``,
``argwhere``, ``masked_select``, ``unique``, one-argument ``where``, ``repeat_interleave``
without ``output_size``, boolean-mask indexing) and ops that return a Python value
(``equal``, ``allclose``, ``is_nonzero``). Not flagged: ``.to("cpu")`` (indistinguishable
from a no-op on CPU tensors).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

#: calls that read values back to the host, whatever their arguments
_ALWAYS = frozenset({
    "item", "tolist", "numpy", "cpu",
    "__bool__", "__int__", "__float__", "__index__", "__complex__",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
    "equal", "allclose", "is_nonzero",
})
#: indexing: a read only when an index is a boolean mask (its True count sizes the result)
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_", "index"})


def _has_mask(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return False


def _reads_host(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _ALWAYS:
        return True
    if name in _INDEXING:
        return _has_mask(args[1:2]) or _has_mask(kwargs.get("indices"))
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class _HostReadTracer(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _reads_host(name, args, kwargs):
            raise AssertionError(f"host read: {name}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Inside the block, a torch call that reads tensor values on the host raises
    ``AssertionError("host read: <call>")``."""
    with _HostReadTracer():
        yield
