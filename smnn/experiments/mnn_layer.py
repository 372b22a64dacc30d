"""The MNN layer every experiment's model ends in: coefficients, right-hand sides, initial values
and step sizes in, the solution u of the linear ODEs out, through the solver chosen by name.

A model decodes its inputs into the four tensors of the solver (docs/solver.md, layout) and
calls the layer; the layer hides which solver (:mod:`smnn.solver.registry`) runs:

- ``MnnLayer("smnn")(c, b, u0, h)`` solves with :func:`smnn.ode_forward` (or ``mnn_dense``,
  ``mnn_cg``): gradients reach all four inputs.
- When the left-hand side is constant (fixed coefficients and steps, as in the Lorenz model),
  :meth:`MnnLayer.freeze_lhs` fixes it once: a solver that can factorize (``can_factorize`` in
  the registry) factorizes it there and every call only substitutes (docs/solver.md, frozen
  left-hand sides); the others are called with the frozen tensors. Gradients then reach the
  right-hand sides and initial values only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smnn.solver.registry import SolverInfo, solver_info

__all__ = ["MnnLayer"]


@dataclass
class _FrozenLhs:
    coefficients: torch.Tensor
    steps: torch.Tensor
    n_steps: int
    n_init_var_steps: int
    factorization: object | None


class MnnLayer:
    """The solve at the end of a mechanistic model.

    Args:
        solver: a name of :mod:`smnn.solver.registry` (``smnn``, ``mnn_dense``, ``mnn_cg``).
        weight_equation, weight_init_var, weight_smooth: the row weights (docs/solver.md,
            row weights), passed to every solve.
        method: the ``smnn`` solver's method (:func:`smnn.ode_forward`: ``auto``,
            ``sequential``, ``cyclic`` or ``qr``); the other solvers have none and ignore it.
        threads: the ``smnn`` solver's thread count (``threads`` of :func:`smnn.ode_forward`
            and :func:`smnn.factorize`: the CPU lane engines' threads; a job passes its run
            context's, :class:`smnn.jobs.RunContext`); None: torch's count. The other solvers
            run torch operations on torch's count and ignore it.
    """

    def __init__(
        self,
        solver: str,
        *,
        weight_equation: float = 1.0,
        weight_init_var: float = 1.0,
        weight_smooth: float = 1.0,
        method: str = "auto",
        threads: int | None = None,
    ):
        self.info: SolverInfo = solver_info(solver)
        self.method = method
        self.threads = threads
        # only ode_forward / factorize (solver smnn) take a method and a thread count
        self.options = {"method": method, "threads": threads} if self.info.name == "smnn" else {}
        self.weights = {
            "weight_equation": weight_equation,
            "weight_init_var": weight_init_var,
            "weight_smooth": weight_smooth,
        }
        self._frozen: _FrozenLhs | None = None

    @property
    def solver(self) -> str:
        return self.info.name

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze_lhs` fixed the left-hand side."""
        return self._frozen is not None

    def freeze_lhs(
        self,
        coefficients: torch.Tensor,
        steps: torch.Tensor,
        *,
        n_steps: int,
        n_init_orders: int,
        n_init_var_steps: int = 1,
    ) -> MnnLayer:
        """Fix the left-hand side for every later call; factorize it once when the solver can.

        Args:
            coefficients: ``(..., T or 1, E, D, R)``, detached.
            steps: ``(..., T-1 or 1)``, detached.
            n_steps: T.
            n_init_orders: K, the orders fixed by the initial values.
            n_init_var_steps: S.

        Returns:
            self.
        """
        c, h = coefficients.detach(), steps.detach()
        factorization = None
        if self.info.can_factorize:
            import smnn

            factorization = smnn.factorize(
                c,
                h,
                n_init_orders=n_init_orders,
                n_steps=n_steps,
                n_init_var_steps=n_init_var_steps,
                **self.weights,
                **self.options,
            )
        self._frozen = _FrozenLhs(c, h, n_steps, n_init_var_steps, factorization)
        return self

    def __call__(
        self,
        rhs_equation: torch.Tensor,
        init_vars: torch.Tensor,
        coefficients: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
        n_steps: int | None = None,
    ) -> torch.Tensor:
        """u ``(*batch, T, D, R)``.

        Args:
            rhs_equation: ``(..., T or 1, E)``.
            init_vars: ``(..., S or 1, D, K)``.
            coefficients: ``(..., T or 1, E, D, R)``; omit after :meth:`freeze_lhs`.
            steps: ``(..., T-1 or 1)``; omit after :meth:`freeze_lhs`.
            n_steps: T, when ``steps`` has a size-1 step axis.
        """
        frozen = self._frozen
        if frozen is not None:
            if coefficients is not None or steps is not None:
                raise ValueError(
                    "the left-hand side is frozen (freeze_lhs): pass rhs_equation and init_vars "
                    "only"
                )
            if frozen.factorization is not None:
                return frozen.factorization.solve(rhs_equation, init_vars)
            coefficients, steps, n_steps = frozen.coefficients, frozen.steps, frozen.n_steps
        if coefficients is None or steps is None:
            raise ValueError("coefficients and steps are required (or call freeze_lhs first)")
        return self.info.function(
            coefficients,
            rhs_equation,
            init_vars,
            steps,
            n_steps=n_steps,
            **self.weights,
            **self.options,
        )
