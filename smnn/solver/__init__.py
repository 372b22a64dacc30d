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

import importlib
from typing import TYPE_CHECKING, Any

from smnn.solver.registry import SOLVERS, SolverInfo, get_solver, solver_info, solver_names

SOLVER_NAMES = solver_names()

# public name -> the module defining it: imported on first use, so that the registry (solver
# names for configs and the command line) is available without importing torch
_LAZY = {
    "METHODS": "smnn.solver.api",
    "OdeFactorization": "smnn.solver.api",
    "factorize": "smnn.solver.api",
    "ode_forward": "smnn.solver.api",
    "NonPositivePivotError": "smnn.solver.banded",
    "Factor": "smnn.solver.factor",
    "FROZEN_LHS_CACHE": "smnn.solver.frozen",
    "FrozenLhsCache": "smnn.solver.frozen",
    "clear_frozen_lhs_cache": "smnn.solver.frozen",
    "OdeProblem": "smnn.solver.inputs",
    "prepare_problem": "smnn.solver.inputs",
    "MNNConvergenceWarning": "smnn.solver.mnn",
    "mnn_cg": "smnn.solver.mnn",
    "mnn_dense": "smnn.solver.mnn",
    "build_dense_system": "smnn.solver.reference",
    "dense_reference": "smnn.solver.reference",
}

if TYPE_CHECKING:  # pragma: no cover - typing only
    from smnn.solver.api import METHODS, OdeFactorization, factorize, ode_forward
    from smnn.solver.banded import NonPositivePivotError
    from smnn.solver.factor import Factor
    from smnn.solver.frozen import FROZEN_LHS_CACHE, FrozenLhsCache, clear_frozen_lhs_cache
    from smnn.solver.inputs import OdeProblem, prepare_problem
    from smnn.solver.mnn import MNNConvergenceWarning, mnn_cg, mnn_dense
    from smnn.solver.reference import build_dense_system, dense_reference


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smnn.solver' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
