"""Complexity of the solver: memory linear in T, logarithmic depth of cyclic reduction, and
cyclic reduction exact for every kind of T (docs/solver.md, "Solving M u = r in O(T)", "Backward
pass" and "Complexity and performance targets").

Nothing here times anything: time is measured by `smnn bench`, not asserted in tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_problem, rel_err

from smnn import ode_forward
from smnn.memory import measure_peak_memory
from smnn.solver.banded import factorize_block_tridiagonal
from smnn.solver.cyclic import factorize_cyclic
from smnn.solver.reference import dense_reference


def _forward_backward(T: int, method: str, backend: str) -> float:
    inputs = [x.requires_grad_() for x in random_problem(batch=(8,), T=T, E=1, D=1, R=3)]
    u = ode_forward(*inputs, method=method, backend=backend)
    u.square().sum().backward()
    return float(inputs[3].grad.abs().sum())


@pytest.mark.parametrize(
    "method,backend,T",
    [
        ("sequential", "numba", 2048),
        ("sequential", "torch", 1024),  # a Python loop over steps: kept shorter
        ("cyclic", "numba", 2048),
        ("cyclic", "torch", 2048),
    ],
)
def test_peak_memory_is_linear_in_T(method, backend, T):
    """Forward+backward peak memory from T to 4T (T=2048 -> 8192) grows about 4x.

    Measured ratios are 3.5..5.4 (resident-set peaks are noisy at these sizes), so the median
    of three is held to 6 (1.5x linear); quadratic memory would give 16x, and a single dense
    T x T float64 matrix at T=8192 alone would be 537 MB per batch entry.
    """
    _forward_backward(64, method, backend)  # warm-up: compile kernels, allocator pools
    small = sorted(measure_peak_memory(_forward_backward, T, method, backend)[1] for _ in range(3))
    large = sorted(
        measure_peak_memory(_forward_backward, 4 * T, method, backend)[1] for _ in range(3)
    )
    ratio = large[1] / max(small[1], 1 << 20)
    assert 0 < ratio < 6, (small, large)
    # no T x T tensor: one float64 (4T) x (4T) matrix alone would exceed the whole peak
    assert large[1] < (4 * T) ** 2 * 8, large


@pytest.mark.parametrize("T", [2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 129])
@pytest.mark.parametrize("central", [False, True])
def test_cyclic_reduction_matches_sequential_and_reference(T, central):
    inputs = [x.requires_grad_() for x in random_problem(batch=(2,), T=T, E=2, D=2, S=1, K=2)]
    u_cyc = ode_forward(*inputs, method="cyclic", enable_central_smoothness=central)
    u_seq = ode_forward(*inputs, method="sequential", enable_central_smoothness=central)
    assert rel_err(u_cyc, u_seq) < 1e-10
    g_cyc = torch.autograd.grad(u_cyc.square().sum(), inputs)
    g_seq = torch.autograd.grad(u_seq.square().sum(), inputs)
    for a, b in zip(g_cyc, g_seq, strict=True):
        assert rel_err(a, b) < 1e-10
    if T <= 33:
        ref = dense_reference(*inputs, enable_central_smoothness=central)
        assert rel_err(u_cyc, ref) < 1e-10


def _spd_tridiagonal(N: int, T: int, n: int, seed: int = 0):
    """Random diagonally dominant SPD block-tridiagonal blocks (N, T, n, n), (N, T-1, n, n)."""
    g = torch.Generator().manual_seed(seed)
    sub = 0.3 * torch.randn(N, T - 1, n, n, generator=g, dtype=torch.float64)
    a = torch.randn(N, T, n, n, generator=g, dtype=torch.float64)
    diag = a @ a.transpose(-1, -2) + 4 * n * torch.eye(n, dtype=torch.float64)
    return diag, sub


def test_cyclic_levels_grow_logarithmically():
    """Dependent stages: ceil(log2 T) levels for cyclic reduction vs T steps sequentially."""
    levels = {}
    for T in (2**10, 2**16):
        diag, sub = _spd_tridiagonal(1, T, 2)
        factor = factorize_cyclic(diag, sub)
        levels[T] = factor.n_levels
        assert factor.n_levels == math.ceil(math.log2(T))
        rhs = torch.randn(1, T, 2, 1, dtype=torch.float64)
        x = factor.solve(rhs)
        seq = factorize_block_tridiagonal(diag, sub).solve(rhs)
        assert rel_err(x, seq) < 1e-10
    # 64x more steps, 1.6x more levels
    assert levels[2**16] - levels[2**10] == 6


@pytest.mark.parametrize("T", [1000, 1001, 4097])
def test_cyclic_factor_is_reusable_for_new_right_hand_sides(T):
    diag, sub = _spd_tridiagonal(3, T, 3, seed=T)
    factor = factorize_cyclic(diag, sub)
    for seed in range(2):
        rhs = torch.randn(
            3, T, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        x = factor.solve(rhs)
        # residual M x - rhs through the block structure
        res = diag @ x
        res[:, 1:] += sub @ x[:, :-1]
        res[:, :-1] += sub.transpose(-1, -2) @ x[:, 1:]
        assert rel_err(res, rhs) < 1e-12


def test_cyclic_reports_failed_entries():
    diag, sub = _spd_tridiagonal(3, 20, 2)
    diag[1, 7] = -torch.eye(2, dtype=torch.float64)
    factor = factorize_cyclic(diag, sub)
    assert factor.failed().tolist() == [False, True, False]
    assert int(factor.failed_at[1]) >= 1
