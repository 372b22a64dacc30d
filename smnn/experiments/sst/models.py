"""The SST models: the Mechanistic Identifier (:class:`MechanisticIdentifier`) and the Ada-GVAE
baseline (:class:`AdaGVAE`); see :mod:`smnn.experiments.sst` for what they do and how they are
trained and scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smnn.experiments.dct import Dct
from smnn.experiments.mnn_layer import MnnLayer
from smnn.experiments.sst.settings import (
    DECODER_LAYERS,
    N_ORDERS,
    STEP_INIT,
    STEP_MAX,
    STEP_MIN,
)


def mlp(n_in: int, hidden: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """``n_in -> hidden (x n_hidden, LeakyReLU after each) -> n_out``."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), nn.LeakyReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class DctEncoder(nn.Module):
    """The first ``n_dct`` orthonormal DCT-II coefficients of a window into an MLP.

    Args:
        window: T, weeks per window.
        n_dct: coefficients kept.
        hidden, n_layers: width and number of hidden layers (LeakyReLU).
        n_out: outputs.
    """

    def __init__(self, window: int, n_dct: int, hidden: int, n_layers: int, n_out: int):
        super().__init__()
        self.dct = Dct(window, n_dct)
        self.net = mlp(n_dct, hidden, n_layers, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., T)`` -> ``(..., n_out)``."""
        return self.net(self.dct(x))


def _check_pairs(x: torch.Tensor, window: int) -> None:
    if x.ndim != 3 or x.shape[1] != 2 or x.shape[2] != window:
        raise ValueError(f"pairs must have shape (B, 2, {window}), got {tuple(x.shape)}")


@dataclass
class MiOutput:
    """What :meth:`MechanisticIdentifier.forward` returns for ``B`` pairs.

    Attributes:
        latents: ``(B, 2, L)`` the encoder's outputs.
        shared: ``(B, 2, L)`` the latents with the first ``shared_latents`` averaged.
        solution: ``(B, 2, T)`` order 0 of the ODE solution.
        steps: ``(B, 2, T-1)`` the decoded step sizes.
    """

    latents: torch.Tensor
    shared: torch.Tensor
    solution: torch.Tensor
    steps: torch.Tensor


class MechanisticIdentifier(nn.Module):
    """Encoder, shared-latent averaging, ODE decoders and the MNN solve (see the module
    docstring).

    Args:
        window: T, weeks per window (steps of the ODE).
        n_dct: DCT-II coefficients into the encoder.
        encoder_hidden, encoder_layers: the encoder MLP.
        latents: L, encoder outputs.
        shared_latents: the first ones averaged between the two views of a pair.
        decoder_hidden: width of the decoder MLPs.
        n_init: S, weeks whose values are the initial values.
        solver: the solver of the MNN layer (:mod:`smnn.solver.registry`); not saved in
            ``state_dict``.
        solve_dtype: the dtype the ODEs are solved in (inputs cast to it, solutions cast back
            to the model's dtype); None (default) = the model's dtype.
        solve_method: the ``smnn`` solver's method (:func:`smnn.ode_forward`); ``auto`` picks
            the orthogonal (QR) solve in float32 and LDL^T in float64.
        threads: the solver's thread count (:class:`~smnn.experiments.mnn_layer.MnnLayer`;
            None: torch's count); not in ``state_dict``.
    """

    def __init__(
        self, window: int, n_dct: int, encoder_hidden: int, encoder_layers: int, latents: int,
        shared_latents: int, decoder_hidden: int, n_init: int, solver: str = "smnn",
        solve_dtype: torch.dtype | None = None, solve_method: str = "auto",
        threads: int | None = None,
    ):  # fmt: skip
        super().__init__()
        if not 0 <= shared_latents <= latents:
            raise ValueError(f"shared_latents must be in 0..{latents}, got {shared_latents}")
        if not 1 <= n_init < window:
            raise ValueError(f"n_init must be in 1..{window - 1}, got {n_init}")
        self.window, self.latents, self.shared_latents, self.n_init = (
            window, latents, shared_latents, n_init,
        )  # fmt: skip
        self.encoder = DctEncoder(window, n_dct, encoder_hidden, encoder_layers, latents)
        self.rhs_net = mlp(latents, decoder_hidden, DECODER_LAYERS, window)
        self.coefficient_net = mlp(latents, decoder_hidden, DECODER_LAYERS, window * N_ORDERS)
        self.step_net = mlp(latents, decoder_hidden, DECODER_LAYERS, window - 1)
        last = self.step_net[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(STEP_INIT / (1.0 - STEP_INIT)))
        self.solve_dtype = solve_dtype
        self.layer = MnnLayer(solver, method=solve_method, threads=threads)

    @property
    def solver(self) -> str:
        return self.layer.solver

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``x`` ``(..., T)`` -> latents ``(..., L)``."""
        return self.encoder(x)

    def share(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 2, L)`` of pairs -> the same with the first ``shared_latents`` replaced
        by their mean over the two views."""
        k = self.shared_latents
        mean = z[:, :, :k].mean(dim=1, keepdim=True).expand(-1, 2, -1)
        return torch.cat([mean, z[:, :, k:]], dim=2)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents ``(..., L)`` -> the ODE: coefficients ``(..., T, 3)``, right-hand side
        ``(..., T)``, steps ``(..., T-1)`` in ``[0.001, 0.999]``."""
        coefficients = self.coefficient_net(z).unflatten(-1, (self.window, N_ORDERS))
        steps = torch.sigmoid(self.step_net(z)).clamp(STEP_MIN, STEP_MAX)
        return coefficients, self.rhs_net(z), steps

    def solve(
        self, z: torch.Tensor, initial: torch.Tensor, n_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the ODE decoded from ``z`` ``(N, L)`` on its first ``n_steps`` steps (default
        T) from the values ``initial`` ``(N, n_init)`` at its first ``n_init`` steps.

        Returns:
            (order 0 of the solution ``(N, n_steps)``, the steps used ``(N, n_steps - 1)``).
        """
        n = self.window if n_steps is None else n_steps
        if (
            z.ndim != 2
            or initial.shape != (z.shape[0], self.n_init)
            or not self.n_init < n <= self.window
        ):
            raise ValueError(
                f"solve needs z (N, {self.latents}), initial (N, {self.n_init}) and n_steps in "
                f"{self.n_init + 1}..{self.window}; got {tuple(z.shape)}, "
                f"{tuple(initial.shape)}, {n}"
            )
        c, b, h = self.decode(z)
        c = c[:, :n].reshape(-1, n, 1, 1, N_ORDERS)  # (N, T, E=1, D=1, R=3)
        b = b[:, :n].unsqueeze(-1)  # (N, T, E=1)
        h = h[:, : n - 1]  # (N, T-1)
        u0 = initial.reshape(-1, self.n_init, 1, 1)  # (N, S, D=1, K=1)
        d = self.solve_dtype
        if d is None or d == b.dtype:
            u = self.layer(b, u0, c, h, n_steps=n)  # (N, T, D=1, R=3)
        else:  # solved in d, returned in the model's dtype
            u = self.layer(b.to(d), u0.to(d), c.to(d), h.to(d), n_steps=n).to(b.dtype)
        return u[..., 0, 0], h

    def forward(self, x: torch.Tensor) -> MiOutput:
        """Pairs ``x`` ``(B, 2, T)`` -> :class:`MiOutput` (each view's ODE solved on the window
        from its own first ``n_init`` weeks)."""
        _check_pairs(x, self.window)
        z = self.encode(x)
        shared = self.share(z)
        u, h = self.solve(shared.flatten(0, 1), x[..., : self.n_init].flatten(0, 1))
        return MiOutput(z, shared, u.view(x.shape), h.view(*x.shape[:2], -1))


@dataclass
class VaeOutput:
    """What :meth:`AdaGVAE.forward` returns for ``B`` pairs.

    Attributes:
        reconstruction: ``(B, 2, T)``.
        mean, logvar: ``(B, 2, L)`` the posteriors after adaptive averaging.
        shared: ``(B, L)`` bool, the dims averaged in each pair.
    """

    reconstruction: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    shared: torch.Tensor


class AdaGVAE(nn.Module):
    """The Ada-GVAE baseline (see the module docstring).

    Args:
        window: T, weeks per window.
        n_dct: DCT-II coefficients into the encoder.
        encoder_hidden, encoder_layers: the encoder MLP (as the identifier's).
        latents: L, Gaussian latent dims.
        decoder_hidden: width of the decoder MLP.
        n_init: weeks at the start of the window given to the decoder.
    """

    def __init__(
        self, window: int, n_dct: int, encoder_hidden: int, encoder_layers: int, latents: int,
        decoder_hidden: int, n_init: int,
    ):  # fmt: skip
        super().__init__()
        if not 1 <= n_init < window:
            raise ValueError(f"n_init must be in 1..{window - 1}, got {n_init}")
        self.window, self.latents, self.n_init = window, latents, n_init
        self.encoder = DctEncoder(window, n_dct, encoder_hidden, encoder_layers, 2 * latents)
        self.decoder = mlp(latents + n_init, decoder_hidden, DECODER_LAYERS, window)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``x`` ``(..., T)`` -> posterior (mean, log-variance), each ``(..., L)``."""
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return mean, logvar

    @staticmethod
    def adapt(
        mean: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ada-GVAE's adaptive averaging of the posteriors of pairs.

        Args:
            mean, logvar: ``(B, 2, L)``.

        Returns:
            (mean, logvar) ``(B, 2, L)`` with the shared dims averaged (mean of the two means,
            mean of the two variances), and the shared dims ``(B, L)`` bool: those whose
            ``KL(q1 || q2)`` is below the midpoint of the pair's smallest and largest.
        """
        m1, m2 = mean[:, 0], mean[:, 1]
        lv1, lv2 = logvar[:, 0], logvar[:, 1]
        kl = 0.5 * (lv2 - lv1 + (torch.exp(lv1) + (m1 - m2) ** 2) * torch.exp(-lv2) - 1.0)
        tau = 0.5 * (kl.amax(dim=1, keepdim=True) + kl.amin(dim=1, keepdim=True))
        shared = kl < tau
        avg_mean = 0.5 * (m1 + m2)
        avg_logvar = torch.log(0.5 * (torch.exp(lv1) + torch.exp(lv2)))
        s = shared.unsqueeze(1)
        return (
            torch.where(s, avg_mean.unsqueeze(1), mean),
            torch.where(s, avg_logvar.unsqueeze(1), logvar),
            shared,
        )

    def decode(self, z: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """Latents ``(..., L)`` and the first ``n_init`` weeks ``(..., n_init)`` -> the window
        ``(..., T)``."""
        if initial.shape[-1] != self.n_init or z.shape[-1] != self.latents:
            raise ValueError(
                f"decode needs z (..., {self.latents}) and initial (..., {self.n_init}), got "
                f"{tuple(z.shape)} and {tuple(initial.shape)}"
            )
        return self.decoder(torch.cat([z, initial], dim=-1))

    def forward(self, x: torch.Tensor, sample: bool = True) -> VaeOutput:
        """Pairs ``x`` ``(B, 2, T)`` -> :class:`VaeOutput`; ``sample``: decode a draw from the
        posterior (training; torch's global generator), else its mean."""
        _check_pairs(x, self.window)
        mean, logvar, shared = self.adapt(*self.encode(x))
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return VaeOutput(self.decode(z, x[..., : self.n_init]), mean, logvar, shared)

    @staticmethod
    def kl_prior(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``KL(q || N(0, I))`` summed over the last axis: ``(...)``."""
        return 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar).sum(dim=-1)
