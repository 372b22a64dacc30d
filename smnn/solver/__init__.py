"""Least-squares solvers for linear ODEs with block-tridiagonal normal equations (SOLVER_SPEC.md).

- :func:`ode_forward` / :func:`factorize`: the S-MNN solver (sequential block LDL^T or block
  cyclic reduction, custom backward pass).
- :func:`dense_reference`: the slow, obviously correct oracle (rows of A built one by one).
- :func:`mnn_dense`, :func:`mnn_cg`: the original MNN solvers, for comparisons.
- :func:`get_solver`: the solver for a name used in configs and Snakemake wildcards.
"""

from __future__ import annotations

from collections.abc import Callable

from smnn.solver.api import METHODS, OdeFactorization, factorize, ode_forward
from smnn.solver.banded import NonPositivePivotError
from smnn.solver.inputs import OdeProblem, prepare_problem
from smnn.solver.mnn import MNNConvergenceWarning, mnn_cg, mnn_dense
from smnn.solver.reference import build_dense_system, dense_reference

SOLVER_NAMES = ("smnn", "mnn_dense", "mnn_cg")

__all__ = [
    "METHODS",
    "MNNConvergenceWarning",
    "SOLVER_NAMES",
    "NonPositivePivotError",
    "OdeFactorization",
    "OdeProblem",
    "build_dense_system",
    "dense_reference",
    "factorize",
    "get_solver",
    "mnn_cg",
    "mnn_dense",
    "ode_forward",
    "prepare_problem",
]


def get_solver(name: str) -> Callable:
    """The solver function for ``name`` in :data:`SOLVER_NAMES`.

    All three take ``(coefficients, rhs_equation, init_vars, steps, n_steps=None,
    n_init_var_steps=None, ...)`` and return u ``(..., T, D, R)``.
    """
    if name == "smnn":
        return ode_forward
    if name == "mnn_dense":
        from smnn.solver.mnn import mnn_dense

        return mnn_dense
    if name == "mnn_cg":
        from smnn.solver.mnn import mnn_cg

        return mnn_cg
    raise ValueError(f"unknown solver {name!r}; choose one of {SOLVER_NAMES}")
