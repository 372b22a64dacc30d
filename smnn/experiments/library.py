"""Libraries of candidate terms for equation discovery, in the manner of PySINDy.

A :class:`CandidateLibrary` is a set of named functions Theta_i of the state variables; a
coefficient matrix ``xi`` ``(n_terms, n_vars)`` over it defines the system
``d var_j / dt = sum_i Theta_i(state) xi[i, j]``. A library only has to say what its terms are
called (:attr:`~CandidateLibrary.names`) and how to evaluate them
(:meth:`~CandidateLibrary.evaluate`); the rest (the right-hand side, building a coefficient
matrix from named terms, printing equations) is the same for every term set and lives in the base
class. :class:`PolynomialLibrary` (all monomials up to a degree) is the one the Lorenz experiment
uses; other term sets (trigonometric, a user's own) subclass :class:`CandidateLibrary`.

``PolynomialLibrary(("x", "y", "z"), degree=2)`` holds the 10 terms
``1, x, y, z, x^2, x y, x z, y^2, y z, z^2`` (the Lorenz experiment's library). A coefficient
matrix ``xi`` ``(n_terms, n_vars)`` defines ``d var_j / dt = sum_i Theta_i(state) xi[i, j]``;
:meth:`PolynomialLibrary.equations` prints it as ``dx/dt = -10.000 x + 10.000 y``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from itertools import combinations_with_replacement

import numpy as np
import torch

__all__ = ["CandidateLibrary", "PolynomialLibrary"]

ArrayLike = np.ndarray | torch.Tensor


class CandidateLibrary(ABC):
    """A set of named candidate terms Theta_i(state) over the variables :attr:`variables`.

    Subclasses set :attr:`variables` and :attr:`names` and implement :meth:`evaluate`.
    """

    variables: tuple[str, ...]
    names: tuple[str, ...]

    @abstractmethod
    def evaluate(self, state: ArrayLike) -> ArrayLike:
        """Theta(state): ``(..., n_vars)`` -> ``(..., n_terms)``, numpy or torch alike."""

    @property
    def n_terms(self) -> int:
        return len(self.names)

    @property
    def n_vars(self) -> int:
        return len(self.variables)

    def _check_state(self, state: ArrayLike) -> None:
        if state.shape[-1] != self.n_vars:
            raise ValueError(
                f"state must have {self.n_vars} variables {self.variables} in its last axis, "
                f"got shape {tuple(state.shape)}"
            )

    def term_index(self, name: str) -> int:
        """Index of the term called ``name`` (as in :attr:`names`, e.g. ``"x z"``)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(
                f"no term {name!r} in the library; terms are {list(self.names)}"
            ) from None

    def rhs(self, state: ArrayLike, xi: ArrayLike) -> ArrayLike:
        """d state/dt = Theta(state) xi: ``(..., n_vars)``, xi ``(n_terms, n_vars)``."""
        self._check_xi(xi)
        return self.evaluate(state) @ xi

    def _check_xi(self, xi: ArrayLike) -> None:
        if tuple(xi.shape) != (self.n_terms, self.n_vars):
            raise ValueError(
                f"coefficients must have shape (n_terms, n_vars) = ({self.n_terms}, "
                f"{self.n_vars}), got {tuple(xi.shape)}"
            )

    def coefficient_matrix(self, terms: Mapping[str, Mapping[str, float]]) -> np.ndarray:
        """A ``(n_terms, n_vars)`` matrix from ``{variable: {term name: coefficient}}``.

        Example: ``{"x": {"x": -10, "y": 10}}`` is ``dx/dt = -10 x + 10 y``.
        """
        xi = np.zeros((self.n_terms, self.n_vars))
        for var, row in terms.items():
            if var not in self.variables:
                raise KeyError(f"unknown variable {var!r}; variables are {self.variables}")
            j = self.variables.index(var)
            for name, value in row.items():
                xi[self.term_index(name), j] = float(value)
        return xi

    def equations(self, xi: ArrayLike, precision: int = 3) -> list[str]:
        """Readable equations, one per variable, e.g. ``"dx/dt = -10.000 x + 10.000 y"``.

        Terms whose coefficient is exactly zero are left out; an equation without terms reads
        ``dx/dt = 0``.
        """
        self._check_xi(xi)
        xi = np.asarray(xi.detach().cpu() if isinstance(xi, torch.Tensor) else xi, dtype=float)
        lines = []
        for j, var in enumerate(self.variables):
            text = ""
            for i, name in enumerate(self.names):
                c = xi[i, j]
                if c == 0:
                    continue
                magnitude = f"{abs(c):.{precision}f}"
                term = magnitude if name == "1" else f"{magnitude} {name}"
                if not text:
                    text = f"-{term}" if c < 0 else term
                else:
                    text += f" - {term}" if c < 0 else f" + {term}"
            lines.append(f"d{var}/dt = {text or '0'}")
        return lines


class PolynomialLibrary(CandidateLibrary):
    """All monomials of ``variables`` of total degree 0 (optional) to ``degree``.

    Terms are ordered by degree, then lexicographically by variable position.

    Args:
        variables: names of the state variables (e.g. ``("x", "y", "z")``).
        degree: highest total degree (>= 1).
        include_constant: include the constant term ``1`` first.
    """

    def __init__(self, variables: Sequence[str], degree: int = 2, include_constant: bool = True):
        variables = tuple(variables)
        if not variables or any(not isinstance(v, str) or not v for v in variables):
            raise ValueError(f"variables must be non-empty names, got {variables!r}")
        if len(set(variables)) != len(variables):
            raise ValueError(f"variables must be distinct, got {variables!r}")
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        self.variables = variables
        self.degree = degree
        self.include_constant = include_constant
        powers: list[tuple[int, ...]] = [()] if include_constant else []
        for d in range(1, degree + 1):
            powers.extend(combinations_with_replacement(range(len(variables)), d))
        # each term is the tuple of variable indices multiplied together (repeats = powers)
        self.term_factors: tuple[tuple[int, ...], ...] = tuple(powers)
        self.names: tuple[str, ...] = tuple(self._term_name(f) for f in self.term_factors)

    def __repr__(self) -> str:
        return (
            f"PolynomialLibrary(variables={self.variables!r}, degree={self.degree}, "
            f"include_constant={self.include_constant})"
        )

    def _term_name(self, factors: tuple[int, ...]) -> str:
        if not factors:
            return "1"
        parts = []
        for i in sorted(set(factors)):
            count = factors.count(i)
            parts.append(self.variables[i] if count == 1 else f"{self.variables[i]}^{count}")
        return " ".join(parts)

    def evaluate(self, state: ArrayLike) -> ArrayLike:
        """Theta(state): ``(..., n_vars)`` -> ``(..., n_terms)``, numpy or torch alike."""
        self._check_state(state)
        columns = []
        for factors in self.term_factors:
            if not factors:
                columns.append(state[..., 0] * 0 + 1)
                continue
            col = state[..., factors[0]]
            for i in factors[1:]:
                col = col * state[..., i]
            columns.append(col)
        if isinstance(state, torch.Tensor):
            return torch.stack(columns, dim=-1)
        return np.stack(columns, axis=-1)
