"""Lorenz: discovering the governing equations from a trajectory (docs/experiments.md section 2).

Model. A window ``x`` of ``W`` consecutive observed states ``(W, 3)`` goes through a denoiser MLP
(``3W -> hidden -> hidden -> 3W``, ReLU; used as a residual, ``x_hat = x + mlp(x)``, so training
starts from the identity). A coefficient generator maps one learnable latent vector through an
MLP (``latent -> hidden -> hidden -> 30``) to the coefficients ``xi`` ``(10, 3)`` of the
degree-2 polynomial library (:class:`smnn.experiments.library.PolynomialLibrary`), times a 0/1
mask. Each state ``d`` of each window is its own first-order linear ODE
``u' = Theta(x_hat) xi[:, d]`` with ``R = 3`` orders, coefficients ``(0, 1, 0)``, step ``dt``
and initial value ``x_hat`` at the first step; the solver returns ``u``
``(W, 3)``. Loss: ``MSE(u, x) + MSE(x_hat, x)``.

Schedule. ``cycles`` optimise-and-threshold cycles of ``epochs_per_cycle`` epochs (Adam); at the
start of every cycle after the first, terms with ``|xi| <= threshold`` are masked to zero for
good.

Solvers. The solve is the shared :class:`~smnn.experiments.mnn_layer.MnnLayer` with a frozen
left-hand side (coefficients and step never change): ``smnn`` factorizes it once
(:func:`smnn.factorize`) and every step only substitutes; ``mnn_dense`` / ``mnn_cg``, the original
MNN's solvers, solve from scratch on every step (they cannot reuse a factorization).

Evaluation (:mod:`smnn.experiments.lorenz_evaluation`, figures in
:mod:`smnn.experiments.lorenz_figures`). The recovered ``xi`` against the truth (``-sigma, sigma``
in dx; ``rho, -1, -1`` for x, y, xz in dy; ``-beta, 1`` for z, xy in dz): errors, terms wrongly
kept or dropped, sign errors; the recovered equations simulated with scipy from the data's initial
state against the true trajectory; plots.

The experiment object the generic commands and rules use is :data:`EXPERIMENT`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from smnn.config import Config
from smnn.data.lorenz import LorenzParams, load_lorenz, make_windows, window_starts
from smnn.experiments.base import Evaluation
from smnn.experiments.library import PolynomialLibrary
from smnn.experiments.lorenz_evaluation import (
    coefficient_metrics,
    simulate,
    simulation_metrics,
)
from smnn.experiments.lorenz_figures import (
    plot_coefficients,
    plot_losses,
    plot_time_series,
    plot_trajectories,
)
from smnn.experiments.mnn_layer import MnnLayer
from smnn.io import atomic_write_json

__all__ = [
    "EXPERIMENT",
    "LorenzExperiment",
    "LorenzSettings",
    "lorenz_library",
    "true_coefficients",
    "LorenzModel",
    "WindowOde",
    "LorenzTask",
    "load_model",
    "coefficient_metrics",
    "simulate",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_ORDERS = 3  # R: orders u, u', u'' of every state
STEP_LOSS_POINTS = 1000  # per-step losses kept for the loss-curve figure (paper Figure 3)


@dataclass(frozen=True)
class LorenzSettings:
    """The ``lorenz`` section of the config, validated."""

    data: LorenzParams
    hidden: int
    latent: int
    threshold: float
    cycles: int
    epochs_per_cycle: int
    batch_size: int
    lr: float
    dtype: str
    max_windows: int | None
    simulate_points: int

    @classmethod
    def from_config(cls, config: Config) -> LorenzSettings:
        return cls(
            data=LorenzParams.from_config(config),
            hidden=config.get_int("lorenz.model.hidden", min_value=1),
            latent=config.get_int("lorenz.model.latent", min_value=1),
            threshold=config.get_float("lorenz.model.threshold", non_negative=True),
            cycles=config.get_int("lorenz.train.cycles", min_value=1),
            epochs_per_cycle=config.get_int("lorenz.train.epochs_per_cycle", min_value=1),
            batch_size=config.get_int("lorenz.train.batch_size", min_value=1),
            lr=config.get_float("lorenz.train.lr", positive=True),
            dtype=config.get_str("lorenz.train.dtype", choices=tuple(DTYPES)),
            max_windows=config.get_int("lorenz.train.max_windows", min_value=1, allow_none=True),
            simulate_points=config.get_int("lorenz.evaluate.simulate_points", min_value=2),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def n_epochs(self) -> int:
        return self.cycles * self.epochs_per_cycle


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
    """

    def __init__(
        self, solver: str, n_steps: int, dt: float, dtype: torch.dtype, device: torch.device
    ):
        self.n_steps = n_steps
        # c[t, e, d, k]: one equation 0 * u + 1 * u' + 0 * u'' = rhs, shared by all steps
        coefficients = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=device).view(
            1, 1, 1, N_ORDERS
        )
        steps = torch.full((1,), dt, dtype=dtype, device=device)
        self.layer = MnnLayer(solver).freeze_lhs(
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


class LorenzTask:
    """The Lorenz experiment as a :class:`smnn.training.TrainingTask`."""

    def __init__(
        self,
        settings: LorenzSettings,
        windows: torch.Tensor,
        solver: str,
        device: torch.device,
    ):
        self.settings = settings
        self.library = lorenz_library()
        dtype = settings.torch_dtype
        self.windows = windows.to(device=device, dtype=dtype)  # (N, W, 3)
        self.model = LorenzModel(
            settings.data.window, settings.hidden, settings.latent, self.library.n_terms, 3
        ).to(device=device, dtype=dtype)
        self.ode = WindowOde(solver, settings.data.window, settings.data.dt, dtype, device)
        self.n_epochs = settings.n_epochs
        self.n_samples = int(self.windows.shape[0])
        self.batch_size = settings.batch_size

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        return torch.optim.Adam(self.model.parameters(), lr=self.settings.lr), None

    def on_epoch_start(self, epoch: int) -> None:
        if epoch > 0 and epoch % self.settings.epochs_per_cycle == 0:
            self.model.apply_threshold(self.settings.threshold)

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(MSE(u, x), MSE(x_hat, x)) for windows ``x`` ``(B, W, 3)``."""
        x_hat, xi = self.model(x)
        rhs = self.library.evaluate(x_hat) @ xi  # (B, W, 3)
        u = self.ode(rhs, x_hat[:, 0])
        return torch.mean((u - x) ** 2), torch.mean((x_hat - x) ** 2)

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.windows[indices.to(self.windows.device)]
        loss_solution, loss_denoise = self.loss_terms(x)
        components = {
            "loss_solution": float(loss_solution.detach()),
            "loss_denoise": float(loss_denoise.detach()),
        }
        return loss_solution + loss_denoise, components

    def epoch_metrics(self) -> dict[str, float]:
        return {"n_active_terms": float(self.model.mask.sum())}


def _build_task(
    config: Config, solver: str, data_path: str | Path, device: torch.device
) -> LorenzTask:
    """The training task: windows of the observed trajectory in ``data_path``."""
    settings = LorenzSettings.from_config(config)
    ds = load_lorenz(data_path, settings.data)
    series = ds["observed"].values
    starts = window_starts(series.shape[0], settings.data.window, settings.max_windows)
    windows = make_windows(series, starts, settings.data.window)
    return LorenzTask(settings, windows, solver, device)


def _model_payload(task: LorenzTask) -> dict[str, Any]:
    """What ``model.pt`` holds besides the training history (see the train command)."""
    xi = task.model.coefficients().detach().cpu().double()
    return {
        "state_dict": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
        "model_args": {
            "window": task.model.window,
            "hidden": task.settings.hidden,
            "latent": task.settings.latent,
            "n_terms": task.model.n_terms,
            "n_vars": task.model.n_vars,
        },
        "coefficients": xi.numpy().tolist(),
        "equations": task.library.equations(xi),
        "terms": list(task.library.names),
    }


def load_model(path: str | Path) -> tuple[LorenzModel, dict[str, Any]]:
    """Rebuild the trained model (CPU, float64) from ``model.pt``; returns (model, payload)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train first)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model_args"):
        if key not in payload:
            raise ValueError(f"{path} is not a Lorenz model file: it lacks {key!r}")
    model = LorenzModel(**payload["model_args"]).double()
    model.load_state_dict({k: v.double() for k, v in payload["state_dict"].items()})
    model.eval()
    return model, payload


def _evaluate(
    config: Config,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
) -> Evaluation:
    """Evaluate a trained model; writes ``metrics.json`` and ``plots/*.png`` into ``out_dir``."""
    settings = LorenzSettings.from_config(config)
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ds = load_lorenz(data_path, settings.data)
    model, payload = load_model(model_path)
    library = lorenz_library()
    with torch.no_grad():
        xi = model.coefficients().numpy()
    truth = true_coefficients(library, settings.data)
    metrics = coefficient_metrics(xi, truth, library)

    clean = ds["clean"].values
    n_sim = min(settings.simulate_points, clean.shape[0])
    sim = simulate(library, xi, clean[0], n_sim, settings.data.dt)
    metrics.update(simulation_metrics(sim, clean[:n_sim], settings.data.dt))

    # denoising quality on the (possibly noisy) observations, on every window start
    starts = window_starts(clean.shape[0], settings.data.window, settings.max_windows)
    windows = make_windows(ds["observed"].values, starts, settings.data.window)
    with torch.no_grad():
        x_hat = model.denoise(windows.double())
    target = make_windows(clean, starts, settings.data.window)
    metrics["denoise_rmse_vs_clean"] = float(torch.sqrt(torch.mean((x_hat - target) ** 2)))
    final_loss = payload.get("final_metrics", {}).get("final_train_loss")
    if final_loss is not None:
        metrics["train_final_loss"] = float(final_loss)

    files = [
        plot_trajectories(clean[:n_sim], sim, plots / "trajectories.png", f"solver {solver}"),
        plot_time_series(
            clean[:n_sim], sim, settings.data.dt, plots / "time_series.png", f"solver {solver}"
        ),
        plot_losses(
            payload.get("history", []), payload.get("step_losses", []),
            settings.epochs_per_cycle, plots / "loss.png",
        ),
        plot_coefficients(library, xi, truth, plots / "coefficients.png"),
    ]  # fmt: skip
    equations = library.equations(xi)
    document = {
        "experiment": "lorenz",
        "solver": solver,
        "metrics": metrics,
        "equations": equations,
        "true_equations": library.equations(truth),
        "coefficients": xi.tolist(),
        "true_coefficients": truth.tolist(),
        "terms": list(library.names),
    }
    atomic_write_json(document, out_dir / "metrics.json")
    summary = [
        "recovered equations:",
        *(f"  {line}" for line in equations),
        f"terms wrongly kept {metrics['n_wrongly_kept']:.0f}, wrongly dropped "
        f"{metrics['n_wrongly_dropped']:.0f}, sign errors {metrics['n_sign_errors']:.0f}; "
        f"simulation valid for {metrics['simulation_valid_time']:.2f} time units",
    ]
    tags = {"train_run_id": payload["run_id"]} if payload.get("run_id") else {}
    return Evaluation(metrics, document, files, tags, summary)


class LorenzExperiment:
    """The Lorenz experiment as the generic commands and rules see it
    (:class:`smnn.experiments.base.Experiment`)."""

    name = "lorenz"
    title = "Lorenz"
    mlflow_experiment = "lorenz"
    solvers = ("smnn", "mnn_dense", "mnn_cg")
    data_store = "lorenz.zarr"
    data_rules = ("generate_lorenz",)
    rule_file = Path("workflow", "rules", "lorenz.smk")
    resources = {
        "train": {"mem_mb": 8000, "runtime": 720},
        "evaluate": {"mem_mb": 4000, "runtime": 60},
    }

    @property
    def schema(self) -> dict[str, Any]:
        return yaml.safe_load(Path(__file__).with_name("lorenz.schema.yaml").read_text())

    def config_problems(self, section: dict[str, Any]) -> list[str]:
        data = section.get("data")
        if isinstance(data, dict):
            n, w = data.get("n_points"), data.get("window")
            if isinstance(n, int) and isinstance(w, int) and w > n:
                return [f"config key 'lorenz.data.window': {w} is larger than "
                        f"lorenz.data.n_points ({n})"]  # fmt: skip
        return []

    def summary(self, config: Config) -> str:
        s = LorenzSettings.from_config(config)
        return (
            f"Lorenz equation discovery: windows of {s.data.window} points (dt {s.data.dt}) of a "
            f"{s.data.n_points}-point trajectory, {s.cycles} cycles x {s.epochs_per_cycle} "
            f"epochs, batch {s.batch_size}, lr {s.lr}, {s.dtype}, threshold {s.threshold}"
        )

    def build_task(
        self, config: Config, solver: str, data_path: Path, device: torch.device
    ) -> LorenzTask:
        return _build_task(config, solver, data_path, device)

    def model_payload(self, task: LorenzTask) -> dict[str, Any]:
        payload = _model_payload(task)
        payload["summary"] = ["recovered equations:", *(f"  {e}" for e in payload["equations"])]
        return payload

    def evaluate(
        self,
        config: Config,
        solver: str,
        data_path: Path,
        model_path: Path,
        out_dir: Path,
        device: torch.device,
    ) -> Evaluation:
        return _evaluate(config, solver, data_path, model_path, out_dir)


EXPERIMENT = LorenzExperiment()
