"""``method='auto'`` in float64 solves by the normal equations (LDL^T) and retries by QR where a
pivot fails: the normal equations square cond(A), the QR sweep does not (docs/solver.md, "The
orthogonal (QR) solve"). Checked against the dense QR reference, on the lane engine and the
torch path, for ode_forward, its gradients, factorize and the frozen left-hand-side cache."""

from __future__ import annotations

import pytest
import torch
from conftest import random_problem, rel_err

from smnn import NonPositivePivotError, factorize, ode_forward
from smnn.solver.reference import dense_reference

BACKENDS = ["numba", "torch"]


def _stiff_problem(T: int = 200, h: float = 0.01):
    """u'''' + u = 0 with four initial orders and small steps: the Taylor rows scale order k by
    h^k, so cond(A)^2 * eps is beyond the LDL^T pivot check in float64, cond(A) * eps is not."""
    B, R = 3, 5
    g = torch.Generator().manual_seed(5)
    c = torch.zeros(B, T, 1, 1, R, dtype=torch.float64)
    c[..., 0], c[..., -1] = 1.0, 1.0
    c = c + 0.01 * torch.randn(c.shape, generator=g, dtype=torch.float64)
    b = torch.randn(B, T, 1, generator=g, dtype=torch.float64)
    u0 = torch.randn(B, 1, 1, 4, generator=g, dtype=torch.float64)
    steps = torch.full((B, T - 1), h, dtype=torch.float64)
    return c, b, u0, steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_retries_a_failed_pivot_by_qr(backend):
    p = _stiff_problem()
    with pytest.raises(NonPositivePivotError, match="not positive definite for 3 of 3"):
        ode_forward(*p, method="sequential", backend=backend)
    auto = ode_forward(*p, backend=backend)
    assert torch.equal(auto, ode_forward(*p, method="qr", backend=backend))
    ref = dense_reference(*p)
    assert rel_err(auto, ref) < 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_the_retried_solve_are_those_of_qr(backend):
    def grads(method):
        inputs = [x.clone().requires_grad_(True) for x in _stiff_problem()]
        u = ode_forward(*inputs, method=method, backend=backend)
        (u * torch.linspace(-1, 1, u.numel(), dtype=u.dtype).view_as(u)).sum().backward()
        return [x.grad for x in inputs]

    with pytest.raises(NonPositivePivotError):
        grads("sequential")
    # the backward pass is QR's (its accuracy against the dense reference: tests/test_qr.py;
    # on this problem the adjoint (A^T A)^{-1} g itself carries cond(A)^2 * eps in any method)
    for got, want in zip(grads("auto"), grads("qr"), strict=True):
        assert torch.equal(got, want) and bool(torch.isfinite(got).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_factorize_and_frozen_cache_retry_by_qr_too(backend):
    c, b, u0, h = _stiff_problem()
    kw = dict(n_init_orders=4, n_init_var_steps=1, backend=backend)
    with pytest.raises(NonPositivePivotError):
        factorize(c, h, method="sequential", **kw)
    solved = factorize(c, h, **kw).solve(b, u0)
    assert rel_err(solved, ode_forward(c, b, u0, h, method="qr", backend=backend)) < 1e-12
    frozen = ode_forward(c, b, u0, h, frozen_lhs_cache_version=7, backend=backend)
    assert torch.equal(frozen, solved)


def test_well_conditioned_problems_keep_the_normal_equations_bits():
    p = random_problem(batch=(5,), T=9, E=2, D=2, R=3, K=2)
    assert torch.equal(ode_forward(*p), ode_forward(*p, method="sequential"))
    assert not torch.equal(ode_forward(*p), ode_forward(*p, method="qr"))  # another method


def test_rank_deficient_systems_still_raise_and_check_pivots_false_still_gives_nan():
    """A system that no method can solve (steps of 1e-170: h^2 underflows, order 2 enters no
    row from step 2 on) raises QR's rank error after the retry; without the pivot check
    'auto' returns the normal equations' NaN for it, as before."""
    c, b, u0, h = random_problem(batch=(4,), T=7, E=2, D=1, R=3, K=1, seed=21)
    h[1] = 1e-170
    c[1, 2:, :, 0, 2] = 0.0
    with pytest.raises(NonPositivePivotError, match=r"rank deficient for 1 of 4.*\(1,\)"):
        ode_forward(c, b, u0, h)
    u = ode_forward(c, b, u0, h, check_pivots=False)
    assert torch.isnan(u).flatten(1).all(1).tolist() == [False, True, False, False]
