"""Small dense-block kernels vectorised over every leading axis (batch and step axes at once).

LAPACK handles one matrix per call, so batched Cholesky of many 3x3..30x30 blocks costs one
library call per block on CPU. These kernels instead loop over the (small) block size and apply
each step to all blocks with one tensor op: O(n) or O(n^2) ops regardless of how many blocks.
All functions are plain torch and run on any device; no autograd is needed (factorizations are
computed without grad; gradients come from the solver's custom backward).

Shapes: ``a`` (..., n, n) symmetric positive definite; ``l`` (..., n, n) lower triangular;
``b`` (..., n, P).
"""

from __future__ import annotations

import torch

__all__ = ["cholesky_lower", "solve_lower", "solve_upper_t", "cholesky_solve"]


def cholesky_lower(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of every block, and a (...) bool mask of blocks with a
    non-positive (or non-finite) pivot (their factor holds NaN)."""
    n = a.shape[-1]
    l = torch.zeros_like(a)
    failed = torch.zeros(a.shape[:-2], dtype=torch.bool, device=a.device)
    for j in range(n):
        row = l[..., j, :j]  # (..., j)
        pivot = a[..., j, j] - (row * row).sum(-1)
        bad = ~(pivot > 0)
        failed |= bad
        d = torch.sqrt(torch.where(bad, torch.full_like(pivot, float("nan")), pivot))
        l[..., j, j] = d
        if j + 1 < n:
            below = a[..., j + 1 :, j] - (l[..., j + 1 :, :j] * row[..., None, :]).sum(-1)
            l[..., j + 1 :, j] = below / d[..., None]
    return l, failed


def solve_lower(l: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y with l y = b (forward substitution)."""
    n = l.shape[-1]
    y = torch.empty_like(b)
    for j in range(n):
        acc = b[..., j, :]
        if j:
            acc = acc - (l[..., j, :j, None] * y[..., :j, :]).sum(-2)
        y[..., j, :] = acc / l[..., j, j, None]
    return y


def solve_upper_t(l: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with l^T x = b (backward substitution with the transpose of a lower factor)."""
    n = l.shape[-1]
    x = torch.empty_like(b)
    for j in range(n - 1, -1, -1):
        acc = b[..., j, :]
        if j + 1 < n:
            acc = acc - (l[..., j + 1 :, j, None] * x[..., j + 1 :, :]).sum(-2)
        x[..., j, :] = acc / l[..., j, j, None]
    return x


def cholesky_solve(l: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with (l l^T) x = b."""
    return solve_upper_t(l, solve_lower(l, b))
