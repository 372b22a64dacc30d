"""Least-squares solvers for linear ODEs with block-tridiagonal normal equations (SOLVER_SPEC.md)."""

from smnn.solver.inputs import OdeProblem, prepare_problem

__all__ = ["OdeProblem", "prepare_problem"]
