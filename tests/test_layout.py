"""Every stateless sampler gives the same bits on any memory layout of the same rows.

A row's terms summed in another order round differently: a sampler that summed a strided
row as it lies (a transposed tensor's rows, a column slice) would give a temperature, a
threshold or a probability one ulp away from the contiguous rows' and sometimes keep
another set of tokens. The samplers work on contiguous float32 rows (``_stats.upcast``)."""

import numpy as np
import pytest
import torch

import samplers.functional as F


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _param(B: int, value: float) -> torch.Tensor:
    return torch.full((B,), value)


SAMPLERS = {
    "temperature": lambda x, B: F.temperature(x, _param(B, 0.7)),
    "dynatemp": lambda x, B: F.dynamic_temperature(x, _param(B, 0.5), _param(B, 1.5), _param(B, 1.0)),
    "smoothing": lambda x, B: F.quadratic_smoothing(x, _param(B, 0.3), _param(B, 1.5)),
    "nsigma": lambda x, B: F.nsigma(x, _param(B, 1.0)),
    "top_k": lambda x, B: F.top_k(x, torch.full((B,), 40, dtype=torch.int64)),
    "top_p": lambda x, B: F.top_p(x, _param(B, 0.9)),
    "min_p": lambda x, B: F.min_p(x, _param(B, 0.05)),
    "top_a": lambda x, B: F.top_a(x, _param(B, 0.2)),
    "tfs": lambda x, B: F.tfs(x, _param(B, 0.9)),
    "typical_p": lambda x, B: F.typical_p(x, _param(B, 0.9)),
    "eta_cutoff": lambda x, B: F.eta_cutoff(x, _param(B, 0.001)),
    "epsilon_cutoff": lambda x, B: F.epsilon_cutoff(x, _param(B, 0.0003)),
    "xtc": lambda x, B: F.xtc(x, _param(B, 0.05), _param(B, 1.0), _param(B, 0.5)),
    "skew": lambda x, B: F.skew(x, _param(B, 0.6)),
}


def _views(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rows`` ([B, V]) as three non-contiguous tensors holding the same values."""
    B, V = rows.shape
    transposed = rows.t().contiguous().t()
    wide = torch.full((B, V + 13), 7.0, dtype=rows.dtype)
    wide[:, 5:V + 5] = rows
    every_other = torch.full((2 * B, V), 7.0, dtype=rows.dtype)
    every_other[::2] = rows
    return {"transposed": transposed, "column slice": wide[:, 5:V + 5], "row step": every_other[::2]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("removed", [False, True])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_strided_rows_give_the_contiguous_rows_bits(name, removed, dtype):
    rng = np.random.default_rng(7)
    B, V = 6, 3000
    rows = torch.from_numpy((rng.standard_normal((B, V)) * 3).astype(np.float32)).to(dtype)
    if removed:
        rows[:, 5::97] = float("-inf")
        rows[2, :] = float("-inf")
        rows[2, 11] = 1.5  # one token left
    want = bits(SAMPLERS[name](rows, B))
    for kind, view in _views(rows).items():
        assert not view.is_contiguous() and torch.equal(view, rows)
        assert torch.equal(bits(SAMPLERS[name](view, B)), want), kind
