"""Test configuration. Triton kernels run on the CPU through Triton's interpreter: the
variable must be set before triton (or anything importing it) is imported; then
``interpreter_speedup`` spares the interpreter its repeated set-up inside a kernel.

``SAMPLERS_TEST_DEVICE=cuda`` (``benchmarks/gpu_check.sh``) runs the suites on a real GPU
instead: no interpreter; tensors the tests create without naming a device are made on that
device (``torch.set_default_device``), and so are the generators they seed, so the kernel
suites compare the compiled kernels with the torch reference there. Unset or ``cpu``: the
usual CPU run.
"""

import os

import pytest

_DEVICE = os.environ.get("SAMPLERS_TEST_DEVICE", "cpu")

if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        import interpreter_speedup

        interpreter_speedup.install()
else:
    import torch

    torch.set_default_device(_DEVICE)
    _Generator = torch.Generator

    def _generator(device=None):
        return _Generator(device=_DEVICE if device is None else device)

    torch.Generator = _generator  # tests seed `torch.Generator()` and draw with it


@pytest.fixture
def whole_row_chain_does_not_load(monkeypatch) -> list:
    """Every whole-row chain kernel fails to load, as on a device without the shared memory
    (or registers) it needs: triton raises ``OutOfResources`` at load, before anything runs.
    Returns the list of the ``BLOCK`` sizes that were tried, in order."""
    from triton.runtime.errors import OutOfResources

    from samplers.kernels import fused

    tried: list = []

    class DoesNotLoad:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append(kwargs["BLOCK"])
                raise OutOfResources(kwargs["BLOCK"] * 8, 101_376, "shared memory")
            return launch

    monkeypatch.setattr(fused, "_chain_kernel", DoesNotLoad())
    monkeypatch.setattr(fused, "_OUT_OF_RESOURCES", set())
    return tried
