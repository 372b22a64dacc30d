"""What every factorization of the solver provides (docs/solver.md, "Solving M u = r in O(T)" and
"Reusing a factorization").

Three classes implement :class:`Factor`:

- :class:`smnn.solver.fused.LaneFactor`: the sequential block LDL^T of the lane engine (CPU,
  numba), made by the kernels that also assemble the blocks;
- :class:`smnn.solver.banded.BlockTridiagonalFactor`: the sequential block LDL^T as batched
  torch ops (CUDA, or CPU without numba), optionally replayed from CUDA graphs;
- :class:`smnn.solver.cyclic.CyclicReductionFactor`: block cyclic reduction (torch ops).

All three solve N block-tridiagonal systems in the canonical layout: right-hand sides
``(N, T, n, P)``, P columns per system.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Factor"]


@runtime_checkable
class Factor(Protocol):
    """A factorized SPD block-tridiagonal matrix (N systems, T steps, blocks of size n)."""

    failed_at: torch.Tensor
    """``(N,)`` int64: 1 + a step whose pivot was not positive, 0 where the system is fine."""

    @property
    def n_systems(self) -> int:
        """N."""
        ...

    @property
    def n_steps(self) -> int:
        """T (canonical steps: super-steps of two when central rows pair them)."""
        ...

    @property
    def block_size(self) -> int:
        """n, the size of one diagonal block."""
        ...

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose factorization met a non-positive pivot."""
        ...

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """x with M x = rhs, for ``rhs`` ``(N, T, n, P)``; returns ``(N, T, n, P)``."""
        ...
