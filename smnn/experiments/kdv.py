"""KdV: an MNN that forecasts the Korteweg-de Vries equation (docs/experiments.md section 3).

Data. The store ``data/kdv.zarr`` (rules ``generate_kdv`` / ``import_kdv``, read through
:func:`smnn.data.kdv.open_kdv_store`) holds ``u`` ``(trajectory, time, x)`` of the train, valid
and test splits on a periodic grid of ``n_x`` points. Training and validation read their split
into memory as ``(n, T_traj, n_x)``.

Model (:class:`KdvModel`). One call maps ``window`` (W) consecutive steps ``(B, W, n_x)`` to the
next W steps, the first of which is the last input step (the windows overlap by one). Every grid
point gets its own linear ODE in time of order 4 over the W output steps
(``E = D = 1``, ``R = 5``: ``sum_r c_r(t) d^r u / dt^r = b(t)``):

- coefficient net: :class:`smnn.experiments.resnet1d.ResNet1D` over x (circular padding, the W
  input steps as channels), then a circular convolution (kernel :data:`HEAD_KERNEL`) to
  ``W * 5`` channels: the coefficients ``c[t, r]`` of every grid point;
- right-hand-side net: a second ResNet1D of the same shape and a convolution to W channels:
  ``b[t]`` of every grid point;
- initial-value net (:class:`ConvEncoder` + linear): seven circular convolutions of widths
  ``h, 2h, 4h, 4h, 2h, h, h/2`` (``h = init_hidden``, kernel :data:`INIT_KERNEL`, ReLU
  between, the fifth and sixth with stride 2), flattened, and one linear layer to
  ``3 * n_x`` numbers: orders 1 to 3 of every grid point at the first step. Order 0 is the last
  observed value itself (not learned), so the solution starts at the data: the initial values
  are the orders ``0..3`` (``K = 4``) at the first step (``S = 1``). The linear layer sees the
  whole domain (the derivatives of a point may depend on all of it), as in the published model;
  it fixes ``n_x``.
- step net: a :class:`ConvEncoder` of the same widths (kernel :data:`STEP_KERNEL`) and one
  linear layer to a single number ``z`` per sample, ``h = step_floor + (1 - step_floor)
  sigmoid(z)``: one step size per sample in ``(step_floor, 1)``, shared by every grid point and
  time step (a smooth floor: unlike a clip, it never stops the step's gradient). Its last layer
  starts with zero weights and the bias that gives the step :data:`STEP_INIT`, so training starts
  from it (``step_floor`` must be below it).
  Steps below about 0.005 make the normal equations of the order-4 ODE lose positive
  definiteness even in float64; the solve then fails naming the steps (raise ``step_floor``,
  published 1e-3, or lower the learning rate).

Initialisation: the weights of the coefficient, right-hand-side and initial-derivative heads
(their last layers) start at zero and their biases at ``c = (0, 0, 0, 0, 1)``, ``b = 0`` and
derivatives 0, i.e. ``d^4u/dt^4 = 0`` from ``(u, 0, 0, 0)``: the solution of the initial model
is the last input step held, exactly (persistence), and training learns the departures from it.

The ``B * n_x`` systems of ``T = W`` steps are solved by
:class:`smnn.experiments.mnn_layer.MnnLayer` with the job's solver (batch dims ``(B, n_x)``, the
step ``(B, 1, 1)`` broadcast over x and time), always in float64 (:data:`SOLVE_DTYPE`; a
float32 model casts its decoded ODE up and the solution back); gradients reach all four solver
inputs. At the published sizes (64 base filters, kernel 9, 10 blocks doubling every 4,
``init_hidden`` 64, ``n_x = 256``, W = 10) the model has :data:`PAPER_PARAMETERS` parameters
(about 10.4M).

Training (:class:`KdvTask`). Windows of ``2W - 1`` consecutive steps of a train trajectory:
input steps ``[s, s + W)``, target steps ``[s + W - 1, s + 2W - 1)``; every start of every
trajectory once per epoch (``windows_per_epoch: null``), or ``windows_per_epoch`` windows drawn
at random (trajectory and start uniform) from torch's global generator, which the Trainer seeds
and checkpoints (a resumed run redraws the same windows). Loss: the mean absolute error between
the solution (order 0, all W steps) and the target. Adam with ``lr``, ``ReduceLROnPlateau``
(``plateau_factor``, ``plateau_patience``) stepped on the validation loss: the same L1 loss on a
fixed subset of at most ``kdv.train.valid_windows`` (default :data:`VALID_WINDOWS`) windows of
the valid split (distinct, drawn once from the seed), computed after every epoch.

Evaluation: :mod:`smnn.experiments.kdv_evaluation` (rollout, persistence, NMSE) and
:mod:`smnn.experiments.kdv_figures` / :mod:`smnn.experiments.forecast_figures` (plots).

The experiment object the generic commands and rules use is :data:`EXPERIMENT`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
import yaml
from torch import nn

from smnn.config import Config, ConfigError
from smnn.data.kdv import REMEDY, open_kdv_store, split_indices
from smnn.data.store import StoreError, store_read_errors
from smnn.data.windows import gather_trajectory_windows, seeded_generator
from smnn.experiments.base import Evaluation
from smnn.experiments.forecast_figures import plot_error_by_lead
from smnn.experiments.kdv_evaluation import (
    NmseScore,
    persistence_forecast,
    rollout,
    rollout_plan,
    score_rollout,
)
from smnn.experiments.kdv_figures import plot_spacetime, plot_training_curves
from smnn.experiments.mnn_layer import MnnLayer
from smnn.experiments.resnet1d import ResNet1D, circular_conv
from smnn.io import atomic_write_json
from smnn.solver.banded import NonPositivePivotError

__all__ = [
    "EXPERIMENT",
    "KdvExperiment",
    "KdvSettings",
    "KdvStore",
    "open_store",
    "section_problems",
    "ConvEncoder",
    "KdvModel",
    "KdvOde",
    "KdvOutput",
    "KdvTask",
    "build_task",
    "load_model",
    "MODEL_KIND",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_ORDERS = 5  # R: u and its first four time derivatives (a fourth-order ODE)
N_INIT_ORDERS = 4  # K: orders 0..3 prescribed at the first step
HEAD_KERNEL = 7  # the convolutions from the ResNet1D features to coefficients / rhs
INIT_KERNEL = 7  # the initial-value net's convolutions
STEP_KERNEL = 5  # the step net's convolutions
ENCODER_STRIDES = (1, 1, 1, 1, 2, 2, 1)  # the ConvEncoder's seven layers
STEP_INIT = 0.05  # the step size at initialisation
# the solve's dtype whatever the model's: the normal equations of a fourth-order ODE at steps
# near STEP_INIT are too ill-conditioned for a float32 Cholesky factorization
SOLVE_DTYPE = torch.float64
VALID_WINDOWS = 256  # the validation subset (at most) unless kdv.train.valid_windows says
PAPER_PARAMETERS = 10_434_045  # parameters at the published sizes (n_x = 256, W = 10)
MODEL_KIND = "kdv_mnn"
SCORED = ("model", "persistence")
FIRST_STEPS = 100  # the NMSE over the first 100 predicted steps is reported too


# ------------------------------------------------------------------ settings


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sub(section: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = section.get(key)
    return value if isinstance(value, Mapping) else {}


def section_problems(section: Mapping[str, Any]) -> list[str]:
    """What is inconsistent between the keys of a ``kdv`` config section (each a message
    naming the key); the schema checks types and ranges, this the relations between keys."""
    problems: list[str] = []
    model, gen, ev = _sub(section, "model"), _sub(section, "generate"), _sub(section, "evaluate")
    window, kernel = _int(model.get("window")), _int(model.get("kernel_size"))
    n_kept, n_test = _int(gen.get("n_kept")), _int(gen.get("n_test"))
    n_traj, n_sample = _int(ev.get("n_trajectories")), _int(ev.get("sample_trajectories"))

    def add(key: str, message: str) -> None:
        problems.append(f"config key 'kdv.{key}': {message}")

    if kernel is not None and kernel % 2 == 0:
        add("model.kernel_size", f"{kernel} must be odd (circular 'same' convolutions)")
    floor = model.get("step_floor")
    if isinstance(floor, (int, float)) and not isinstance(floor, bool) and floor >= STEP_INIT:
        add("model.step_floor", f"{floor} must be below the initial step {STEP_INIT}")
    generated = section.get("source") == "generate"
    if generated and window is not None and n_kept is not None and n_kept < 2 * window - 1:
        add("generate.n_kept", f"{n_kept} stored steps are fewer than a training window of "
            f"2 * kdv.model.window - 1 = {2 * window - 1}")  # fmt: skip
    if generated and n_test is not None:
        if n_traj is not None and n_traj > n_test:
            add("evaluate.n_trajectories", f"{n_traj} is more than kdv.generate.n_test "
                f"({n_test})")  # fmt: skip
        if n_sample is not None and n_sample > min(n_test, n_traj or n_test):
            add("evaluate.sample_trajectories", f"{n_sample} is more than the trajectories "
                f"rolled out ({min(n_test, n_traj or n_test)})")  # fmt: skip
    elif n_traj is not None and n_sample is not None and n_sample > n_traj:
        add("evaluate.sample_trajectories", f"{n_sample} is more than "
            f"kdv.evaluate.n_trajectories ({n_traj})")  # fmt: skip
    return problems


@dataclass(frozen=True)
class KdvSettings:
    """The ``kdv.model``, ``kdv.train`` and ``kdv.evaluate`` keys of the config, validated."""

    window: int
    base_filters: int
    kernel_size: int
    n_blocks: int
    double_every: int
    init_hidden: int
    step_floor: float
    epochs: int
    batch_size: int
    lr: float
    plateau_factor: float
    plateau_patience: int
    dtype: str
    windows_per_epoch: int | None
    valid_windows: int
    n_trajectories: int | None
    sample_trajectories: int
    seed: int

    @classmethod
    def from_config(cls, config: Config) -> KdvSettings:
        m, t, e = "kdv.model.", "kdv.train.", "kdv.evaluate."
        settings = cls(
            window=config.get_int(m + "window", min_value=2),
            base_filters=config.get_int(m + "base_filters", min_value=1),
            kernel_size=config.get_int(m + "kernel_size", min_value=1),
            n_blocks=config.get_int(m + "n_blocks", min_value=1),
            double_every=config.get_int(m + "double_every", min_value=1),
            init_hidden=config.get_int(m + "init_hidden", min_value=1),
            step_floor=config.get_float(m + "step_floor", positive=True),
            epochs=config.get_int(t + "epochs", min_value=1),
            batch_size=config.get_int(t + "batch_size", min_value=1),
            lr=config.get_float(t + "lr", positive=True),
            plateau_factor=config.get_float(t + "plateau_factor", positive=True),
            plateau_patience=config.get_int(t + "plateau_patience", min_value=0),
            dtype=config.get_str(t + "dtype", choices=tuple(DTYPES)),
            windows_per_epoch=config.get_int(t + "windows_per_epoch", min_value=1, allow_none=True),
            valid_windows=(
                config.get_int(t + "valid_windows", min_value=1)
                if config.has(t + "valid_windows")
                else VALID_WINDOWS
            ),  # fmt: skip
            n_trajectories=config.get_int(e + "n_trajectories", min_value=1, allow_none=True),
            sample_trajectories=config.get_int(e + "sample_trajectories", min_value=1),
            seed=config.get_int("seed", min_value=0),
        )
        problems = section_problems(config.section("kdv"))
        if not settings.plateau_factor < 1:
            problems.append(
                f"config key 'kdv.train.plateau_factor': must be in (0, 1), got "
                f"{settings.plateau_factor}"
            )
        if problems:
            raise ConfigError(f"{config.source}: " + "; ".join(problems))
        return settings

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model_args(self, n_x: int) -> dict[str, Any]:
        """Constructor arguments of :class:`KdvModel` on a grid of ``n_x`` points."""
        return {
            "n_x": n_x, "window": self.window, "base_filters": self.base_filters,
            "kernel_size": self.kernel_size, "n_blocks": self.n_blocks,
            "double_every": self.double_every, "init_hidden": self.init_hidden,
            "step_floor": self.step_floor,
        }  # fmt: skip


# ------------------------------------------------------------------ the store


@dataclass(frozen=True)
class KdvStore:
    """The opened store ``data/kdv.zarr`` (checked by :func:`smnn.data.kdv.open_kdv_store`).

    Attributes:
        path: the store.
        dataset: the lazily opened dataset.
        source: ``"generate"`` (made by the pipeline's generator) or ``"lpsda"`` (imported).
        n_x: grid points; n_time: stored steps per trajectory.
    """

    path: Path
    dataset: xr.Dataset
    source: str
    n_x: int
    n_time: int

    def rows(self, split: str) -> np.ndarray:
        """The store rows ``(n,)`` of ``split`` (train, valid, test)."""
        return split_indices(self.dataset, split)

    def read(
        self, split: str, *, dtype: torch.dtype, device: torch.device | str | None = None,
        limit: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``u`` of the (first ``limit``) trajectories of ``split`` as ``(n, T, n_x)``.

        Raises:
            StoreError: the split is empty or holds non-finite values, or a chunk is damaged.
        """
        rows = self.rows(split)[:limit]
        if rows.size == 0:
            raise StoreError(
                f"KdV store {self.path} has no {split} trajectories; {REMEDY}",
                self.path, "u", REMEDY,
            )  # fmt: skip
        with store_read_errors(self.path, "u", REMEDY):
            values = np.asarray(self.dataset["u"].isel(trajectory=rows).values)
        bad = ~np.isfinite(values).all(axis=(1, 2))
        if bad.any():
            raise StoreError(
                f"KdV store {self.path}: {split} trajectories {np.flatnonzero(bad)[:5].tolist()}"
                f" hold non-finite values; {REMEDY}",
                self.path, "u", REMEDY,
            )  # fmt: skip
        return torch.from_numpy(values).to(dtype=dtype, device=device)

    def coordinates(self, split: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` ``(n, n_x)`` and ``t`` ``(n, T)`` of the trajectories at ``positions`` of
        ``split``."""
        rows = self.rows(split)[positions]
        with store_read_errors(self.path, "x", REMEDY):
            x = np.asarray(self.dataset["x"].isel(trajectory=rows).values, dtype=np.float64)
            t = np.asarray(self.dataset["t"].isel(trajectory=rows).values, dtype=np.float64)
        return x, t


def open_store(path: str | Path) -> KdvStore:
    """Open ``data/kdv.zarr`` (layout checked by :func:`smnn.data.kdv.open_kdv_store`).

    Raises:
        StoreError: the store is missing, damaged or not in the KdV layout.
    """
    path = Path(path)
    ds = open_kdv_store(path)
    _, n_time, n_x = ds["u"].shape
    return KdvStore(path, ds, str(ds.attrs["source"]), int(n_x), int(n_time))


# ------------------------------------------------------------------ the model


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
    """The decoded ODEs of ``B`` windows in the solver's layout (docs/solver.md section 1).

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
    """

    def __init__(
        self, n_x: int, window: int, base_filters: int, kernel_size: int, n_blocks: int,
        double_every: int, init_hidden: int, step_floor: float, solver: str = "smnn",
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
        self.layer = MnnLayer(solver)

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
        :data:`SOLVE_DTYPE` and returned in the dtype of ``ode``."""
        d = SOLVE_DTYPE
        try:
            u = self.layer(
                ode.rhs.to(d), ode.init_vars.to(d), ode.coefficients.to(d), ode.steps.to(d),
                n_steps=self.window,
            )  # fmt: skip
        except NonPositivePivotError as exc:
            h = ode.steps.detach()
            raise NonPositivePivotError(
                f"the KdV model's ODE could not be solved ({exc}); its step sizes are "
                f"{float(h.min()):.3g} .. {float(h.max()):.3g} (floor {self.step_floor}): the "
                f"normal equations of an order-{N_ORDERS - 1} ODE lose positive definiteness "
                "at steps below about 0.005 even in float64, so raise kdv.model.step_floor or "
                "lower kdv.train.lr"
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


# ------------------------------------------------------------------ training


class KdvTask:
    """The KdV model as a :class:`smnn.training.TrainingTask` (see the module docstring).

    Args:
        settings: the config.
        train, valid: ``(n, T, n_x)`` the train and valid trajectories on the training device
            in the training dtype.
        solver: the MNN layer's solver.
    """

    kind = MODEL_KIND

    def __init__(
        self, settings: KdvSettings, train: torch.Tensor, valid: torch.Tensor, solver: str
    ):
        w = settings.window
        for name, data in (("train", train), ("valid", valid)):
            if data.ndim != 3 or data.shape[0] < 1 or data.shape[1] < 2 * w - 1:
                raise ValueError(
                    f"the {name} split must be (n >= 1, T >= 2 * window - 1 = {2 * w - 1}, n_x); "
                    f"got {tuple(data.shape)}: make kdv.model.window smaller or store more steps"
                )
        if valid.shape[2] != train.shape[2]:
            raise ValueError(f"train and valid grids differ: {train.shape[2]} and {valid.shape[2]}")
        self.settings, self.train, self.valid = settings, train, valid
        self.model = KdvModel(**settings.model_args(train.shape[2]), solver=solver).to(
            device=train.device, dtype=settings.torch_dtype
        )
        self.n_starts = train.shape[1] - 2 * w + 2  # window starts per train trajectory
        self.random_windows = settings.windows_per_epoch is not None
        self.n_samples = (
            int(settings.windows_per_epoch) if self.random_windows
            else train.shape[0] * self.n_starts
        )  # fmt: skip
        self.n_epochs = settings.epochs
        self.batch_size = settings.batch_size
        self.valid_trajectories, self.valid_starts = self._validation_subset()
        self._step_sum = 0.0
        self._step_n = 0

    def _validation_subset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``valid_windows`` distinct valid windows, drawn once from the seed."""
        per = self.valid.shape[1] - 2 * self.settings.window + 2
        total = self.valid.shape[0] * per
        gen = seeded_generator(self.settings.seed, "kdv", "validation windows")
        n = min(self.settings.valid_windows, total)
        pick = torch.randperm(total, generator=gen)[:n].sort().values
        return pick // per, pick % per

    def windows(
        self, data: torch.Tensor, trajectories: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, W, n_x)`` and targets ``(B, W, n_x)`` of the windows at
        (``trajectories``, ``starts``): steps ``[s, s + W)`` and ``[s + W - 1, s + 2W - 1)``."""
        w = self.settings.window
        both = gather_trajectory_windows(data, trajectories, starts, 2 * w - 1)
        return both[:, :w], both[:, w - 1 :]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, KdvOutput]:
        """(mean absolute error of the solution against ``y``, the model's output)."""
        out = self.model(x)
        return F.l1_loss(out.solution, y), out

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        s = self.settings
        optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=s.plateau_factor, patience=s.plateau_patience
        )
        return optimizer, scheduler

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        indices = indices.to("cpu", torch.int64)
        if self.random_windows:
            n = indices.numel()
            trajectories = torch.randint(0, self.train.shape[0], (n,))
            starts = torch.randint(0, self.n_starts, (n,))
        else:
            trajectories, starts = indices // self.n_starts, indices % self.n_starts
        loss, out = self.loss(*self.windows(self.train, trajectories, starts))
        self._step_sum += float(out.steps.detach().mean())
        self._step_n += 1
        return loss, {"loss_l1": float(loss.detach())}

    def validation_loss(self) -> float:
        """The L1 loss on the fixed validation windows (the Trainer calls it in eval mode
        without gradients)."""
        total, count = 0.0, 0
        for traj, start in zip(
            self.valid_trajectories.split(self.batch_size),
            self.valid_starts.split(self.batch_size),
            strict=True,
        ):
            loss, _ = self.loss(*self.windows(self.valid, traj, start))
            total += float(loss) * traj.numel()
            count += traj.numel()
        return total / count

    def epoch_metrics(self) -> dict[str, float]:
        """The mean step size over the epoch's steps."""
        mean = self._step_sum / self._step_n if self._step_n else float("nan")
        self._step_sum, self._step_n = 0.0, 0
        return {"mean_step_size": mean}


def build_task(config: Config, solver: str, data_path: str | Path, device: torch.device) -> KdvTask:
    """The KdV training task on the train split of ``data_path`` (valid split for validation)."""
    settings = KdvSettings.from_config(config)
    store = open_store(data_path)
    dtype = settings.torch_dtype
    train = store.read("train", dtype=dtype, device=device)
    valid = store.read("valid", dtype=dtype, device=device)
    return KdvTask(settings, train, valid, solver)


def _model_payload(task: KdvTask) -> dict[str, Any]:
    model = task.model
    n_params = sum(p.numel() for p in model.parameters())
    args = task.settings.model_args(model.n_x)
    return {
        "kind": MODEL_KIND,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": args,
        "dtype": task.settings.dtype,
        "n_parameters": n_params,
        "summary": [
            f"KdV MNN: {n_params} parameters, {model.n_x} grid points, window {model.window}, "
            f"ResNet1D {args['base_filters']} filters x {args['n_blocks']} blocks"
        ],
    }


def load_model(
    path: str | Path,
    *,
    solver: str = "smnn",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[KdvModel, dict[str, Any]]:
    """Rebuild a trained KdV model (in eval mode) from ``model.pt``; returns (model, payload).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds another kind of model or lacks its parts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train first)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or any(k not in payload for k in ("state_dict", "model_args")):
        raise ValueError(f"{path} is not a KdV model file (no state_dict / model_args)")
    if payload.get("kind") != MODEL_KIND:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} model, expected {MODEL_KIND!r}")
    model = KdvModel(**payload["model_args"], solver=solver)
    model.load_state_dict(payload["state_dict"])
    model.to(device=device, dtype=dtype).eval()
    return model, payload


# ------------------------------------------------------------------ evaluation


def _score_entry(score: NmseScore) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "nmse": score.nmse,
        "nmse_median_trajectory": float(np.median(score.per_trajectory)),
        "nmse_by_step": [float(v) for v in score.by_step],
    }
    if score.by_step.size >= FIRST_STEPS:
        entry[f"nmse_first_{FIRST_STEPS}"] = score.over_first(FIRST_STEPS)
    return entry


def _evaluate(
    config: Config,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    device: torch.device,
) -> Evaluation:
    """The rollout protocol of :mod:`smnn.experiments.kdv_evaluation` for the model and
    persistence on the test split; writes ``metrics.json`` and ``plots/*.png`` into
    ``out_dir``."""
    s = KdvSettings.from_config(config)
    store = open_store(data_path)
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    dtype = s.torch_dtype
    model, payload = load_model(model_path, solver=solver, dtype=dtype, device=device)
    if model.window != s.window or model.n_x != store.n_x:
        raise ValueError(
            f"{model_path} was trained with window {model.window} on {model.n_x} grid points; "
            f"the config says window {s.window} and the store has {store.n_x}: retrain"
        )
    if store.n_time <= s.window:
        raise ValueError(
            f"the store's trajectories have {store.n_time} steps, no more than the "
            f"{s.window} given ones: nothing to roll out"
        )
    # scored against the stored float64 values; the model reads them in its own dtype
    truth_t = store.read("test", dtype=torch.float64, limit=s.n_trajectories)
    n_traj, n_steps = truth_t.shape[0], truth_t.shape[1]
    w = s.window
    plan = rollout_plan(n_steps, w)
    given = truth_t[:, :w].to(device=device, dtype=dtype)
    forecasts = {"model": rollout(model, given, s.batch_size, n_steps=n_steps)}
    truth = truth_t.numpy()
    del truth_t, given
    forecasts["persistence"] = persistence_forecast(truth, w)
    scores = {name: score_rollout(f, truth, w) for name, f in forecasts.items()}

    metrics: dict[str, float] = {}
    for name, score in scores.items():
        metrics[f"nmse_{name}"] = score.nmse
        if score.by_step.size >= FIRST_STEPS:
            metrics[f"nmse_{name}_first{FIRST_STEPS}"] = score.over_first(FIRST_STEPS)
    final = payload.get("final_metrics", {})
    for key, name in (("final_train_loss", "train_final_loss"),
                      ("final_valid_loss", "valid_final_loss")):  # fmt: skip
        if final.get(key) is not None:
            metrics[name] = float(final[key])
    metrics["n_parameters"] = float(payload.get("n_parameters", 0))

    label = f"data: {store.source}"
    gen = seeded_generator(s.seed, "kdv", "evaluate", "sample trajectories")
    n_sample = min(s.sample_trajectories, n_traj)
    picks = torch.randperm(n_traj, generator=gen)[:n_sample].sort().values.numpy()
    x, t = store.coordinates("test", picks)
    model_label = f"model ({solver})"
    files = [
        plot_spacetime(
            truth[picks], forecasts["model"][picks], x, t, w, plots / "spacetime.png",
            labels=[f"test trajectory {int(i)}" for i in picks],
            title=f"KdV rollout, solver {solver} ({label})",
        ),
        plot_error_by_lead(
            {model_label: scores["model"].by_step, "persistence": scores["persistence"].by_step},
            plots / "nmse_by_step.png", ylabel="NMSE", step_unit="steps", log=True,
            title=f"KdV rollout NMSE over {n_traj} test trajectories, solver {solver} ({label})",
        ),
        plot_training_curves(
            payload.get("history", []), plots / "loss.png",
            title=f"KdV training, solver {solver} ({label})",
        ),
    ]  # fmt: skip
    document = {
        "experiment": "kdv",
        "solver": solver,
        "source": store.source,
        "n_parameters": int(payload.get("n_parameters", 0)),
        "data": {
            "n_x": store.n_x,
            "n_steps": n_steps,
            "n_test_trajectories": int(store.rows("test").size),
            "n_trajectories_scored": n_traj,
            "trajectories_scored": f"the first {n_traj} of the test split",
        },
        "protocol": {
            "window": w,
            "given_steps": w,
            "scored_steps": [w, n_steps - 1],
            "n_scored_steps": n_steps - w,
            "model_calls": len(plan),
            "new_steps_per_call": w - 1,
            "last_call_new_steps": plan[-1][1],
            "scored": f"steps {w}..{n_steps - 1} (0-based, inclusive) of each stored "
            f"trajectory; the {w} given steps 0..{w - 1} are inputs and not scored",
            "rollout": "autoregressive: each call maps the last window known steps (predicted "
            "ones included) to the next window - 1 new ones",
            "persistence": f"step {w - 1} (the last given one) held",
            f"first_{FIRST_STEPS}": f"nmse_first_{FIRST_STEPS}: the mean over steps "
            f"{w}..{w + FIRST_STEPS - 1} only",
        },
        "normalisation": "NMSE of a step of a trajectory = sum over x of (prediction - truth)^2 "
        "divided by sum over x of truth^2; nmse_by_step = its mean over the trajectories, nmse = "
        "the mean of nmse_by_step over the scored steps (= the mean over steps and trajectories)",
        "models": {name: _score_entry(score) for name, score in scores.items()},
        "sample_trajectories": [int(i) for i in picks],
    }
    atomic_write_json(document, out_dir / "metrics.json")
    summary = [
        f"rollout NMSE over steps {w}..{n_steps - 1} of {n_traj} test trajectories ({label}):",
        *(f"  {name:12s} {score.nmse:.6g}" for name, score in scores.items()),
    ]
    tags = {"source": store.source}
    if payload.get("run_id"):
        tags["train_run_id"] = str(payload["run_id"])
    return Evaluation(metrics, document, files, tags, summary)


# ------------------------------------------------------------------ the experiment


class KdvExperiment:
    """The KdV experiment as the generic commands and rules see it
    (:class:`smnn.experiments.base.Experiment`); persistence, its baseline, needs no
    training."""

    name = "kdv"
    title = "KdV"
    mlflow_experiment = "kdv"
    solvers = ("smnn", "mnn_dense", "mnn_cg")
    data_store = "kdv.zarr"
    data_rules = ("generate_kdv", "import_kdv")
    rule_file = Path("workflow", "rules", "kdv.smk")
    resources = {
        "train": {"mem_mb": 16000, "runtime": 720},
        "evaluate": {"mem_mb": 8000, "runtime": 60},
    }

    @property
    def schema(self) -> dict[str, Any]:
        return yaml.safe_load(Path(__file__).with_name("kdv.schema.yaml").read_text())

    def config_problems(self, section: dict[str, Any]) -> list[str]:
        return section_problems(section)

    def summary(self, config: Config) -> str:
        s = KdvSettings.from_config(config)
        windows = "every window" if s.windows_per_epoch is None else f"{s.windows_per_epoch}"
        return (
            f"KdV forecasting: an order-4 linear ODE per grid point over {s.window} steps, "
            f"ResNet1D {s.base_filters} filters x {s.n_blocks} blocks (kernel {s.kernel_size}, "
            f"doubling every {s.double_every}), initial-value and step nets {s.init_hidden} wide; "
            f"{s.epochs} epochs of {windows} train windows, batch {s.batch_size}, lr {s.lr} "
            f"(plateau {s.plateau_factor} / {s.plateau_patience} on the validation loss), "
            f"{s.dtype}; evaluation rolls out "
            f"{'all' if s.n_trajectories is None else s.n_trajectories} test trajectories"
        )

    def build_task(
        self, config: Config, solver: str, data_path: Path, device: torch.device
    ) -> KdvTask:
        return build_task(config, solver, data_path, device)

    def model_payload(self, task: KdvTask) -> dict[str, Any]:
        return _model_payload(task)

    def evaluate(
        self,
        config: Config,
        solver: str,
        data_path: Path,
        model_path: Path,
        out_dir: Path,
        device: torch.device,
    ) -> Evaluation:
        return _evaluate(config, solver, data_path, model_path, out_dir, device)


EXPERIMENT = KdvExperiment()
