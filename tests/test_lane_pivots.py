"""The lane engine's relative pivot threshold (docs/solver.md, "Dense reference and accuracy bars").

The normal equations square the condition number; in float32 that returned silently wrong
solutions: 18 % on KdV-like problems, 100 % on a growing solution, with every pivot positive.
A pivot below ``fused.PIVOT_FACTOR * m * eps`` times the diagonal entry of its assembled block is
now a failure: such calls raise, and with ``check_pivots=False`` those systems are NaN while the
others stay accurate. Well-conditioned float64 problems are untouched.
"""

from __future__ import annotations

import pytest
import torch

from smnn import NonPositivePivotError, ode_forward
from smnn.solver import fused

# the lane engine: "auto" picks the orthogonal (QR) solve for float32
LDL = dict(method="sequential")


def _kdv_like(dtype, B=16, seed=0):
    """B=16, T=10, D=1, R=5, K=4, steps uniform in 0.05..0.15, coefficients 0.1 * N(0, 1) with
    a unit coefficient on order 4."""
    g = torch.Generator().manual_seed(seed)
    T, E, D, R, K = 10, 1, 1, 5, 4
    c = 0.1 * torch.randn(B, T, E, D, R, generator=g, dtype=torch.float64)
    c[..., 0, 0, K] += 1.0
    b = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    u0 = torch.randn(B, 1, D, K, generator=g, dtype=torch.float64)
    h = 0.05 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (c, b, u0, h))


def _growing(dtype, T=2000):
    """u' = 0.5 u + 1, u(0) = 1, h = 0.01: the solution grows like e^(0.5 t) up to t = 20."""
    c = torch.zeros(1, T, 1, 1, 3, dtype=dtype)
    c[..., 0, 0] = -0.5
    c[..., 0, 1] = 1.0
    b = torch.ones(1, T, 1, dtype=dtype)
    u0 = torch.ones(1, 1, 1, 1, dtype=dtype)
    h = torch.full((1, T - 1), 0.01, dtype=dtype)
    return c, b, u0, h


def _max_rel_err(u, ref):
    """Per system (batch entry): max |u - ref| / max |ref|."""
    return (u.double() - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1)


@pytest.mark.parametrize("case", ["kdv_like", "growing"])
def test_float32_raises_or_is_accurate(case):
    make = _kdv_like if case == "kdv_like" else _growing
    ref = ode_forward(*make(torch.float64), **LDL)
    inputs = make(torch.float32)
    u = ode_forward(*inputs, check_pivots=False, **LDL)
    failed = torch.isnan(u).flatten(1).any(1)
    err = _max_rel_err(u, ref)
    # every system either fails (NaN throughout) or is accurate
    assert torch.isnan(u[failed]).all()
    assert (err[~failed] < 1e-3).all(), err
    assert failed.any()  # these problems are beyond float32 normal equations
    with pytest.raises(NonPositivePivotError, match="batch index"):
        ode_forward(*inputs, **LDL)


@pytest.mark.parametrize("case", ["kdv_like", "growing"])
def test_float64_passes(case):
    make = _kdv_like if case == "kdv_like" else _growing
    u = ode_forward(*make(torch.float64), **LDL)
    assert torch.isfinite(u).all()


def test_pivot_floor():
    assert fused.pivot_floor(5, torch.float32) == fused.PIVOT_FACTOR * 5 * 2.0**-23
    assert fused.pivot_floor(3, torch.float64) == fused.PIVOT_FACTOR * 3 * 2.0**-52
