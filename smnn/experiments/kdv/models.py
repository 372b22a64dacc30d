"""The KdV model (:class:`KdvModel`: ResNet1D coefficient and right-hand-side nets, the
initial-value and step nets, one order-4 linear ODE per grid point solved by the shared MNN
layer); see :mod:`smnn.experiments.kdv` for the experiment as a whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smnn.experiments.kdv.settings import (
    ENCODER_STRIDES,
    HEAD_KERNEL,
    INIT_KERNEL,
    N_INIT_ORDERS,
    N_ORDERS,
    SOLVE_DTYPE,
    STEP_INIT,
    STEP_KERNEL,
)
from smnn.experiments.mnn_layer import MnnLayer
from smnn.experiments.resnet1d import ResNet1D, circular_conv
from smnn.solver.banded import NonPositivePivotError


def _conv_length(n: int, stride: int) -> int:
    """Output length of a circular 'same' convolution of stride ``stride`` on ``n`` points."""
    return (n - 1) // stride + 1


class ConvEncoder(nn.Module):
    """Seven circular convolutions of widths ``h, 2h, 4h, 4h, 2h, h, max(h // 2, 1)`` (ReLU
    between them, strides :data:`ENCODER_STRIDES`), flattened.

    Args:
        in_channels: the input steps W.
        hidden: h.
        kernel_size: odd.
        n_x: grid points (fixes :attr:`n_features`).
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int, n_x: int):
        super().__init__()
        widths = [hidden, 2 * hidden, 4 * hidden, 4 * hidden, 2 * hidden, hidden,
                  max(hidden // 2, 1)]  # fmt: skip
        layers: list[nn.Module] = []
        n_in, length = in_channels, n_x
        for i, (n_out, stride) in enumerate(zip(widths, ENCODER_STRIDES, strict=True)):
            if length < kernel_size // 2:
                raise ValueError(
                    f"a grid of {n_x} points is too small for the encoder (layer {i} sees "
                    f"{length} points, fewer than its circular padding {kernel_size // 2})"
                )
            if i:
                layers.append(nn.ReLU())
            layers.append(circular_conv(n_in, n_out, kernel_size, stride))
            n_in, length = n_out, _conv_length(length, stride)
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.n_features = n_in * length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, W, n_x)`` -> ``(B, n_features)``."""
        return self.net(x)


@dataclass
class KdvOutput:
    """What :meth:`KdvModel.forward` returns for ``B`` windows.

    Attributes:
        solution: ``(B, W, n_x)`` order 0 of the ODE solutions (step 0 = the last input step).
        orders: ``(B, n_x, W, 5)`` every order of every grid point's solution.
        steps: ``(B,)`` the step size of each sample.
    """

    solution: torch.Tensor
    orders: torch.Tensor
    steps: torch.Tensor


@dataclass
class KdvOde:
    """The decoded ODEs of ``B`` windows in the solver's layout (docs/solver.md, layout).

    Attributes:
        coefficients: ``(B, n_x, W, 1, 1, 5)``.
        rhs: ``(B, n_x, W, 1)``.
        init_vars: ``(B, n_x, 1, 1, 4)``: orders 0..3 at the first step.
        steps: ``(B, 1, 1)``: one step per sample (broadcast over x and time).
    """

    coefficients: torch.Tensor
    rhs: torch.Tensor
    init_vars: torch.Tensor
    steps: torch.Tensor


class KdvModel(nn.Module):
    """The KdV MNN (see the module docstring).

    Args:
        n_x: grid points.
        window: W, steps in and out.
        base_filters, kernel_size, n_blocks, double_every: the two ResNet1Ds.
        init_hidden: h of the initial-value and step nets.
        step_floor: the smallest step size.
        solver: the MNN layer's solver (:mod:`smnn.solver.registry`); not in ``state_dict``.
        solve_dtype: the dtype the ODEs are solved in (inputs cast to it, solutions cast back
            to the model's dtype); None = the model's dtype. Default :data:`SOLVE_DTYPE`.
        solve_method: the ``smnn`` solver's method (:func:`smnn.ode_forward`); ``auto`` picks
            the orthogonal (QR) solve in float32 and LDL^T in float64.
        threads: the solver's thread count (:class:`~smnn.experiments.mnn_layer.MnnLayer`;
            None: torch's count); not in ``state_dict``.
    """

    def __init__(
        self, n_x: int, window: int, base_filters: int, kernel_size: int, n_blocks: int,
        double_every: int, init_hidden: int, step_floor: float, solver: str = "smnn",
        solve_dtype: torch.dtype | None = SOLVE_DTYPE, solve_method: str = "auto",
        threads: int | None = None,
    ):  # fmt: skip
        super().__init__()
        if window < 2 or n_x < 1:
            raise ValueError(f"need window >= 2 and n_x >= 1, got {window} and {n_x}")
        if not 0 < step_floor < STEP_INIT:
            raise ValueError(f"step_floor must be in (0, {STEP_INIT}), got {step_floor}")
        self.n_x, self.window, self.step_floor = n_x, window, step_floor
        resnet = (window, base_filters, kernel_size, n_blocks, double_every)
        self.coefficient_net = ResNet1D(*resnet)
        self.coefficient_head = circular_conv(
            self.coefficient_net.out_channels, window * N_ORDERS, HEAD_KERNEL
        )
        self.rhs_net = ResNet1D(*resnet)
        self.rhs_head = circular_conv(self.rhs_net.out_channels, window, HEAD_KERNEL)
        self.init_net = ConvEncoder(window, init_hidden, INIT_KERNEL, n_x)
        self.init_head = nn.Linear(self.init_net.n_features, n_x * (N_INIT_ORDERS - 1))
        self.step_net = ConvEncoder(window, init_hidden, STEP_KERNEL, n_x)
        self.step_head = nn.Linear(self.step_net.n_features, 1)
        self._start_as_persistence()
        nn.init.zeros_(self.step_head.weight)
        start = (STEP_INIT - step_floor) / (1.0 - step_floor)  # sigmoid of the first step
        nn.init.constant_(self.step_head.bias, math.log(start / (1.0 - start)))
        self.solve_dtype = solve_dtype
        self.layer = MnnLayer(solver, method=solve_method, threads=threads)

    @property
    def solver(self) -> str:
        return self.layer.solver

    @torch.no_grad()
    def _start_as_persistence(self) -> None:
        """Zero weights in the three heads, biases giving ``d^4u/dt^4 = 0`` with zero initial
        derivatives: the initial model's solution is the last input step held (persistence)."""
        for head in (self.coefficient_head, self.rhs_head, self.init_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.coefficient_head.bias.view(self.window, N_ORDERS)[:, N_ORDERS - 1] = 1.0

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.window, self.n_x):
            raise ValueError(
                f"the KdV model expects windows (B, {self.window}, {self.n_x}), got "
                f"{tuple(x.shape)}"
            )

    def decode(self, x: torch.Tensor) -> KdvOde:
        """Windows ``x`` ``(B, W, n_x)`` -> the ODE of every grid point (:class:`KdvOde`)."""
        self._check(x)
        b, w, n = x.shape
        c = self.coefficient_head(self.coefficient_net(x))  # (B, W * R, n_x), channel t * R + r
        c = c.view(b, w, N_ORDERS, n).permute(0, 3, 1, 2)  # (B, n_x, W, R)
        rhs = self.rhs_head(self.rhs_net(x)).permute(0, 2, 1)  # (B, n_x, W)
        derivatives = self.init_head(self.init_net(x)).view(b, n, N_INIT_ORDERS - 1)
        init = torch.cat([x[:, -1].unsqueeze(-1), derivatives], dim=-1)  # (B, n_x, K)
        z = self.step_head(self.step_net(x))  # (B, 1)
        steps = self.step_floor + (1.0 - self.step_floor) * torch.sigmoid(z)
        return KdvOde(
            coefficients=c[:, :, :, None, None, :],
            rhs=rhs.unsqueeze(-1),
            init_vars=init[:, :, None, None, :],
            steps=steps.view(b, 1, 1),
        )

    def solve(self, ode: KdvOde) -> torch.Tensor:
        """Every order ``(B, n_x, W, 5)`` of the solutions of ``ode``, solved in
        :attr:`solve_dtype` (None: the dtype of ``ode``) and returned in the dtype of ``ode``."""
        d = ode.rhs.dtype if self.solve_dtype is None else self.solve_dtype
        try:
            u = self.layer(
                ode.rhs.to(d), ode.init_vars.to(d), ode.coefficients.to(d), ode.steps.to(d),
                n_steps=self.window,
            )  # fmt: skip
        except NonPositivePivotError as exc:
            h = ode.steps.detach()
            if self.layer.method in ("sequential", "cyclic"):
                why = (
                    f"the normal equations (LDL^T) of an order-{N_ORDERS - 1} ODE lose positive "
                    "definiteness at steps below about 0.01 even in float64: use "
                    "kdv.model.solve_method auto or qr (the QR solve needs cond(A), not "
                    "cond(A)^2), or raise kdv.model.step_floor"
                )
            else:
                why = (
                    "even the QR solve finds the least-squares problem rank deficient at these "
                    "steps: raise kdv.model.step_floor or lower kdv.train.lr"
                )
            raise NonPositivePivotError(
                f"the KdV model's ODE could not be solved ({exc}); its step sizes are "
                f"{float(h.min()):.3g} .. {float(h.max()):.3g} (floor {self.step_floor}, solved "
                f"in {d}, method {self.layer.method}): {why}"
            ) from exc
        return u[..., 0, :].to(ode.rhs.dtype)

    def forward(self, x: torch.Tensor) -> KdvOutput:
        """Windows ``x`` ``(B, W, n_x)`` -> :class:`KdvOutput`."""
        ode = self.decode(x)
        orders = self.solve(ode)
        return KdvOutput(orders[..., 0].transpose(1, 2), orders, ode.steps.view(-1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, W, n_x)`` -> the W output steps ``(B, W, n_x)`` (for the rollout)."""
        return self.forward(x).solution
