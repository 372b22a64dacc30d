"""The solvers by name: the one list that configs, Snakemake wildcards, the CLI, the benchmark,
the standalone check and the experiments read.

Every entry computes the same kind of function, ``solve(coefficients, rhs_equation, init_vars,
steps, n_steps=None, n_init_var_steps=None, ...) -> u (..., T, D, R)``; its capabilities say what
callers may rely on:

- ``can_factorize``: the left-hand side can be factorized once (:func:`smnn.factorize`) and
  reused for many right-hand sides (the Lorenz model does this when its coefficients are fixed);
- ``dense``: the solver builds a dense ``(1 + T*D*R)^2`` matrix per system (memory O(T^2), time
  O(T^3)), so callers check its memory before running it;
- ``reports_convergence``: :meth:`SolverInfo.solve_with_info` says whether an iterative solve
  converged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["SolverInfo", "SOLVERS", "solver_names", "solver_info", "get_solver"]


@dataclass(frozen=True)
class SolverInfo:
    """One solver.

    Attributes:
        name: the name used in configs, wildcards and MLflow tags (``smnn``, ``mnn_dense`` ...).
        label: a short human name for plots and tables.
        description: one line on what it is.
        can_factorize: supports :func:`smnn.factorize` (factorize once, solve many).
        dense: builds a dense matrix per system (memory O((T*D*R)^2)).
        reports_convergence: ``solve_with_info`` reports ``converged``.
    """

    name: str
    label: str
    description: str
    can_factorize: bool = False
    dense: bool = False
    reports_convergence: bool = False

    @property
    def function(self) -> Callable[..., torch.Tensor]:
        """The solver function (imported on first use)."""
        if self.name == "smnn":
            from smnn.solver.api import ode_forward

            return ode_forward
        if self.name == "mnn_dense":
            from smnn.solver.mnn import mnn_dense

            return mnn_dense
        if self.name == "mnn_cg":
            from smnn.solver.mnn import mnn_cg

            return mnn_cg
        raise AssertionError(f"no function registered for solver {self.name!r}")

    def solve_with_info(self, *args, **kwargs) -> tuple[torch.Tensor, dict]:
        """``(u, info)``; ``info['converged']`` (bool) for iterative solvers, else ``{}``.

        Iterative solvers' non-convergence warnings are returned in ``info`` only when the
        caller silences them; this method does not touch the warning filters.
        """
        if self.reports_convergence:
            import torch

            u, info = self.function(*args, return_info=True, **kwargs)
            return u, {"converged": bool(torch.as_tensor(info["converged"]).all())}
        return self.function(*args, **kwargs), {}


SOLVERS: Mapping[str, SolverInfo] = MappingProxyType(
    {
        s.name: s
        for s in (
            SolverInfo(
                "smnn",
                "S-MNN",
                "S-MNN: block-tridiagonal normal equations, linear in T (ode_forward)",
                can_factorize=True,
            ),
            SolverInfo(
                "mnn_dense",
                "MNN dense",
                "original MNN: dense normal matrix with a slack variable, Cholesky",
                dense=True,
            ),
            SolverInfo(
                "mnn_cg",
                "MNN CG",
                "original MNN: conjugate gradient on the sparse rows (at most 200 iterations)",
                reports_convergence=True,
            ),
        )
    }
)


def solver_names() -> tuple[str, ...]:
    """The registered solver names, in registry order (``smnn`` first)."""
    return tuple(SOLVERS)


def solver_info(name: str) -> SolverInfo:
    """The registry entry for ``name``; a ValueError lists the known names."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None


def get_solver(name: str) -> Callable[..., torch.Tensor]:
    """The solver function for ``name`` (see :data:`SOLVERS`)."""
    return solver_info(name).function
