"""The Lorenz model: the candidate library, the true coefficients, the denoiser and coefficient
generator (:class:`LorenzModel`) and the per-window ODE solve (:class:`WindowOde`).

See :mod:`smnn.experiments.lorenz` for the experiment as a whole."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from smnn.data.lorenz import LorenzParams
from smnn.experiments.library import PolynomialLibrary
from smnn.experiments.lorenz.settings import N_ORDERS
from smnn.experiments.mnn_layer import MnnLayer


def lorenz_library() -> PolynomialLibrary:
    """All monomials of x, y, z up to degree 2 with a constant: 10 terms."""
    return PolynomialLibrary(("x", "y", "z"), degree=2, include_constant=True)


def true_coefficients(library: PolynomialLibrary, params: LorenzParams) -> np.ndarray:
    """The Lorenz system's coefficient matrix ``(n_terms, 3)`` in ``library``."""
    s, r, b = params.sigma, params.rho, params.beta
    return library.coefficient_matrix(
        {"x": {"x": -s, "y": s}, "y": {"x": r, "y": -1.0, "x z": -1.0}, "z": {"z": -b, "x y": 1.0}}
    )


class LorenzModel(nn.Module):
    """Denoiser and coefficient generator.

    Args:
        window: W, points per window.
        hidden: width of the hidden layers of both MLPs.
        latent: size of the learnable latent vector of the coefficient generator.
        n_terms, n_vars: library size and number of states (10, 3 for Lorenz).
    """

    def __init__(self, window: int, hidden: int, latent: int, n_terms: int = 10, n_vars: int = 3):
        super().__init__()
        self.window, self.n_terms, self.n_vars = window, n_terms, n_vars
        width = window * n_vars
        self.denoiser = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, width),
        )  # fmt: skip
        self.latent = nn.Parameter(torch.randn(latent))
        self.coefficient_net = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_terms * n_vars),
        )  # fmt: skip
        self.register_buffer("mask", torch.ones(n_terms, n_vars))

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, W, n_vars)`` -> ``x_hat`` ``(B, W, n_vars)``."""
        if x.shape[-2:] != (self.window, self.n_vars):
            raise ValueError(
                f"windows must have shape (batch, {self.window}, {self.n_vars}), "
                f"got {tuple(x.shape)}"
            )
        return x + self.denoiser(x.flatten(-2)).view(x.shape)

    def coefficients(self) -> torch.Tensor:
        """Masked coefficients ``xi`` ``(n_terms, n_vars)``."""
        raw = self.coefficient_net(self.latent).view(self.n_terms, self.n_vars)
        return raw * self.mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, W, n_vars)`` -> (``x_hat`` (same shape), ``xi`` ``(n_terms, n_vars)``)."""
        return self.denoise(x), self.coefficients()

    @torch.no_grad()
    def apply_threshold(self, threshold: float) -> int:
        """Mask (for good) every term with ``|xi| <= threshold``; returns the number kept."""
        keep = (self.coefficients().abs() > threshold).to(self.mask.dtype)
        self.mask.mul_(keep)
        return int(self.mask.sum())


class WindowOde:
    """Solve ``u' = rhs`` for every (window, state) with a fixed step; ``R = 3``, ``E = D = 1``.

    Args:
        solver: a solver name (:mod:`smnn.solver.registry`); its left-hand side is frozen once
            (:meth:`MnnLayer.freeze_lhs`: ``smnn`` factorizes it, the MNN solvers solve anew).
        n_steps: T, points per window.
        dt: the step.
        dtype, device: of the coefficients and step (and of the right-hand sides passed in).
        threads: the solver's thread count (:class:`~smnn.experiments.mnn_layer.MnnLayer`;
            None: torch's count).
    """

    def __init__(
        self, solver: str, n_steps: int, dt: float, dtype: torch.dtype, device: torch.device,
        threads: int | None = None,
    ):  # fmt: skip
        self.n_steps = n_steps
        # c[t, e, d, k]: one equation 0 * u + 1 * u' + 0 * u'' = rhs, shared by all steps
        coefficients = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=device).view(
            1, 1, 1, N_ORDERS
        )
        steps = torch.full((1,), dt, dtype=dtype, device=device)
        self.layer = MnnLayer(solver, threads=threads).freeze_lhs(
            coefficients, steps, n_steps=n_steps, n_init_orders=1
        )

    @property
    def solver(self) -> str:
        return self.layer.solver

    def __call__(self, rhs: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """``rhs`` ``(B, T, n_vars)``, ``initial`` ``(B, n_vars)`` -> ``u`` ``(B, T, n_vars)``."""
        B, T, V = rhs.shape
        if T != self.n_steps or initial.shape != (B, V):
            raise ValueError(
                f"rhs must be (B, {self.n_steps}, V) and initial (B, V), got {tuple(rhs.shape)} "
                f"and {tuple(initial.shape)}"
            )
        b = rhs.transpose(1, 2).unsqueeze(-1)  # (B, V, T, E=1)
        u0 = initial.reshape(B, V, 1, 1, 1)  # (B, V, S=1, D=1, K=1)
        u = self.layer(b, u0)
        return u[..., 0, 0].transpose(1, 2)  # order 0 of state 0: (B, T, V)
