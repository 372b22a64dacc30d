"""Least-squares solvers for linear ODEs with block-tridiagonal normal equations (docs/solver.md).

- :func:`ode_forward` / :func:`factorize`: the S-MNN solver (sequential block LDL^T or block
  cyclic reduction, custom backward pass). On CPU with numba both run on the lane kernels
  (:mod:`smnn.solver.fused`); otherwise on batched torch ops (:mod:`smnn.solver.banded`,
  :mod:`smnn.solver.cyclic`). numba is optional. Every factorization is a :class:`Factor`.
  ``method='qr'`` (the default for float32) is the orthogonal solve of :mod:`smnn.solver.qr`,
  which never forms the normal equations.
- :func:`clear_frozen_lhs_cache`: empty the bounded cache behind ``frozen_lhs_cache_version``.
- :func:`dense_reference`: the slow, obviously correct oracle (rows of A built one by one).
- :func:`mnn_dense`, :func:`mnn_cg`: the original MNN solvers, for comparisons.
- :func:`get_solver`: the solver for a name used in configs and Snakemake wildcards.
"""

from __future__ import annotations

from smnn.solver.api import METHODS, OdeFactorization, factorize, ode_forward
from smnn.solver.banded import NonPositivePivotError
from smnn.solver.factor import Factor
from smnn.solver.frozen import FROZEN_LHS_CACHE, FrozenLhsCache, clear_frozen_lhs_cache
from smnn.solver.inputs import OdeProblem, prepare_problem
from smnn.solver.mnn import MNNConvergenceWarning, mnn_cg, mnn_dense
from smnn.solver.reference import build_dense_system, dense_reference
from smnn.solver.registry import SOLVERS, SolverInfo, get_solver, solver_info, solver_names

SOLVER_NAMES = solver_names()

__all__ = [
    "FROZEN_LHS_CACHE",
    "Factor",
    "FrozenLhsCache",
    "METHODS",
    "MNNConvergenceWarning",
    "SOLVER_NAMES",
    "SOLVERS",
    "SolverInfo",
    "NonPositivePivotError",
    "OdeFactorization",
    "OdeProblem",
    "build_dense_system",
    "clear_frozen_lhs_cache",
    "dense_reference",
    "factorize",
    "get_solver",
    "mnn_cg",
    "mnn_dense",
    "ode_forward",
    "prepare_problem",
    "solver_info",
    "solver_names",
]
