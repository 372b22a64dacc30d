"""Shared test helpers: random well-conditioned ODE problems (docs/solver.md, "Dense reference and
accuracy bars")."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at definition time whether a function is interpreted, its own library included,
# so TRITON_INTERPRET must be set before any test module imports triton: here, first of all.
# Where CUDA is present the variable is left alone and the compiled kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def random_problem(
    batch=(3,),
    T=7,
    E=1,
    D=1,
    R=3,
    S=1,
    K=1,
    *,
    c_batch=None,
    b_batch=None,
    u_batch=None,
    h_batch=None,
    c_time=None,
    b_time=None,
    u_time=None,
    h_time=None,
    dtype=torch.float64,
    seed=0,
):
    """Random inputs with steps in 0.05..0.15 and a dominant unit leading coefficient.

    Each equation e is an ODE of order K in state e % D: unit coefficient on order min(K, R-1)
    plus 0.1 * N(0, 1) on every term, so the K initial orders make the problem well posed
    (leading order K with only K-1 initial orders would leave a near null space).

    ``*_batch`` override an input's batch shape (for broadcasting cases); ``*_time`` override the
    size of its step axis (1 for a shared value).
    Returns (coefficients, rhs_equation, init_vars, steps).
    """
    g = torch.Generator().manual_seed(seed)
    cb = tuple(batch if c_batch is None else c_batch)
    bb = tuple(batch if b_batch is None else b_batch)
    ub = tuple(batch if u_batch is None else u_batch)
    hb = tuple(batch if h_batch is None else h_batch)
    ct = T if c_time is None else c_time
    bt = T if b_time is None else b_time
    ut = S if u_time is None else u_time
    ht = T - 1 if h_time is None else h_time
    c = 0.1 * torch.randn(*cb, ct, E, D, R, generator=g, dtype=torch.float64)
    for e in range(E):
        c[..., e, e % D, min(K, R - 1)] += 1.0
    b = torch.randn(*bb, bt, E, generator=g, dtype=torch.float64)
    u0 = torch.randn(*ub, ut, D, K, generator=g, dtype=torch.float64)
    h = 0.05 + 0.1 * torch.rand(*hb, ht, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (c, b, u0, h))


@pytest.fixture
def make_problem():
    return random_problem


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


INPUT_LABELS = ("coefficients", "rhs_equation", "init_vars", "steps")


def loss_weight(shape, dtype=torch.float64, seed: int = 7) -> torch.Tensor:
    """A fixed random weight ``shape`` for a scalar loss sum(u * weight) (drawn in float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def assert_matches_reference(u, ref, inputs, value_tol: float, grad_tol: float) -> None:
    """u equals ref within ``value_tol`` (relative) and so does the gradient of
    sum(u * loss_weight) to each of ``inputs`` (coefficients, rhs_equation, init_vars, steps)
    within ``grad_tol``; every reference gradient is nonzero, so no check is vacuous."""
    assert u.shape == ref.shape
    assert rel_err(u, ref) < value_tol
    weight = loss_weight(ref.shape, ref.dtype)
    grads = torch.autograd.grad((u * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for label, x, g, rg in zip(INPUT_LABELS, inputs, grads, ref_grads, strict=True):
        assert g.shape == x.shape, label
        assert float(rg.abs().max()) > 0, label
        assert rel_err(g, rg) < grad_tol, label
