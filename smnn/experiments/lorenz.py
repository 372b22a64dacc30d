"""Lorenz: discovering the governing equations from a trajectory (EXPERIMENTS.md section 2).

Model. A window ``x`` of ``W`` consecutive observed states ``(W, 3)`` goes through a denoiser MLP
(``3W -> hidden -> hidden -> 3W``, ReLU; used as a residual, ``x_hat = x + mlp(x)``, so training
starts from the identity). A coefficient generator maps one learnable latent vector through an
MLP (``latent -> hidden -> hidden -> 30``) to the coefficients ``xi`` ``(10, 3)`` of the
degree-2 polynomial library (:class:`smnn.library.PolynomialLibrary`), times a 0/1 mask. Each
state ``d`` of each window is its own first-order linear ODE ``u' = Theta(x_hat) xi[:, d]`` with
``R = 3`` orders, coefficients ``(0, 1, 0)``, step ``dt`` and initial value ``x_hat`` at the
first step; the solver returns ``u`` ``(W, 3)``. Loss: ``MSE(u, x) + MSE(x_hat, x)``.

Schedule. ``cycles`` optimise-and-threshold cycles of ``epochs_per_cycle`` epochs (Adam); at the
start of every cycle after the first, terms with ``|xi| <= threshold`` are masked to zero for
good.

Solvers. ``smnn``: the left-hand side (coefficients and step) never changes, so it is factorized
once (:func:`smnn.factorize`) and every step only substitutes. ``mnn_dense`` / ``mnn_cg``: the
original MNN's solvers, called on every step (they cannot reuse a factorization).

Evaluation. The recovered ``xi`` against the truth (``-sigma, sigma`` in dx; ``rho, -1, -1`` for
x, y, xz in dy; ``-beta, 1`` for z, xy in dz): errors, terms wrongly kept or dropped, sign errors;
the recovered equations simulated with scipy from the data's initial state against the true
trajectory; plots.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smnn.config import Config
from smnn.data.lorenz import LorenzParams, load_lorenz, make_windows, window_starts
from smnn.library import PolynomialLibrary

__all__ = [
    "MLFLOW_EXPERIMENT",
    "SOLVERS",
    "LorenzSettings",
    "lorenz_library",
    "true_coefficients",
    "LorenzModel",
    "WindowOde",
    "LorenzTask",
    "build_task",
    "model_payload",
    "load_model",
    "coefficient_metrics",
    "simulate",
    "evaluate",
]

MLFLOW_EXPERIMENT = "lorenz"
SOLVERS = ("smnn", "mnn_dense", "mnn_cg")
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
        solver: ``"smnn"`` (factorize once, substitute per call), ``"mnn_dense"`` or
            ``"mnn_cg"`` (solve from scratch per call).
        n_steps: T, points per window.
        dt: the step.
        dtype, device: of the coefficients and step (and of the right-hand sides passed in).
    """

    def __init__(
        self, solver: str, n_steps: int, dt: float, dtype: torch.dtype, device: torch.device
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver, self.n_steps = solver, n_steps
        # c[t, e, d, k]: one equation 0 * u + 1 * u' + 0 * u'' = rhs, shared by all steps
        self.coefficients = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=device).view(
            1, 1, 1, N_ORDERS
        )
        self.steps = torch.full((1,), dt, dtype=dtype, device=device)
        if solver == "smnn":
            import smnn

            self._factorization = smnn.factorize(
                self.coefficients, self.steps, n_init_orders=1, n_steps=n_steps
            )
            self._solve_fn = None
        else:
            from smnn.solver import get_solver

            self._factorization = None
            self._solve_fn = get_solver(solver)

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
        if self._factorization is not None:
            u = self._factorization.solve(b, u0)
        else:
            u = self._solve_fn(self.coefficients, b, u0, self.steps, n_steps=self.n_steps)
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


def build_task(
    config: Config, solver: str, data_path: str | Path, device: torch.device
) -> LorenzTask:
    """The training task: windows of the observed trajectory in ``data_path``."""
    settings = LorenzSettings.from_config(config)
    ds = load_lorenz(data_path, settings.data)
    series = ds["observed"].values
    starts = window_starts(series.shape[0], settings.data.window, settings.max_windows)
    windows = make_windows(series, starts, settings.data.window)
    return LorenzTask(settings, windows, solver, device)


def model_payload(task: LorenzTask) -> dict[str, Any]:
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


# ------------------------------------------------------------------ evaluation


def coefficient_metrics(
    xi: np.ndarray, truth: np.ndarray, library: PolynomialLibrary
) -> dict[str, float]:
    """Recovered ``xi`` vs ``truth`` (both ``(n_terms, n_vars)``).

    Returns errors, the counts of wrongly kept (true 0, recovered != 0), wrongly dropped (true
    != 0, recovered 0) and sign-flipped terms, and every true term's recovered value as
    ``coef_d{var}_{term}`` (e.g. ``coef_dy_xz``).
    """
    true_on = truth != 0
    on = xi != 0
    metrics = {
        "coef_max_abs_error": float(np.abs(xi - truth).max()),
        "coef_rel_error": float(np.linalg.norm(xi - truth) / np.linalg.norm(truth)),
        "coef_max_rel_error_true_terms": float(
            (np.abs(xi - truth)[true_on] / np.abs(truth[true_on])).max()
        ),
        "n_wrongly_kept": float(np.sum(on & ~true_on)),
        "n_wrongly_dropped": float(np.sum(~on & true_on)),
        "n_sign_errors": float(np.sum(true_on & (np.sign(xi) != np.sign(truth)))),
        "n_active_terms": float(on.sum()),
    }
    metrics["sign_pattern_recovered"] = float(
        metrics["n_wrongly_kept"] == 0 and metrics["n_sign_errors"] == 0
    )
    for i, j in zip(*np.nonzero(true_on), strict=True):
        name = library.names[i].replace(" ", "")
        metrics[f"coef_d{library.variables[j]}_{name}"] = float(xi[i, j])
    return metrics


def simulate(
    library: PolynomialLibrary,
    xi: np.ndarray,
    initial_state: np.ndarray,
    n_points: int,
    dt: float,
    blow_up: float = 1e6,
) -> np.ndarray:
    """Integrate ``d state/dt = Theta(state) xi`` (scipy DOP853) on ``dt * arange(n_points)``.

    Returns ``(n, n_vars)`` with ``n <= n_points``: shorter when the solution leaves
    ``|state| < blow_up`` (the recovered equations diverge).
    """
    from scipy.integrate import solve_ivp

    times = dt * np.arange(n_points)

    def escaped(t: float, s: np.ndarray) -> float:
        return blow_up - np.abs(s).max()

    escaped.terminal = True
    sol = solve_ivp(
        lambda t, s: library.rhs(s, xi),
        (0.0, float(times[-1])),
        np.asarray(initial_state, dtype=float),
        method="DOP853",
        t_eval=times,
        rtol=1e-10,
        atol=1e-10,
        events=escaped,
    )
    return sol.y.T.copy()


def simulation_metrics(sim: np.ndarray, true: np.ndarray, dt: float) -> dict[str, float]:
    """Error of a simulated trajectory ``(n, 3)`` against the true one ``(N, 3)``, N >= n.

    ``simulation_valid_time``: the time until the error norm first exceeds 10% of the true
    trajectory's RMS norm (chaos makes every error grow; this says for how long it stays small).
    """
    n = sim.shape[0]
    err = np.linalg.norm(sim - true[:n], axis=-1)
    scale = float(np.sqrt(np.mean(np.sum(true**2, axis=-1))))
    bad = np.nonzero(err > 0.1 * scale)[0]
    valid_steps = int(bad[0]) if bad.size else n
    horizon = min(n, int(round(1.0 / dt)) + 1)
    return {
        "simulation_rmse": float(np.sqrt(np.mean(err**2))),
        "simulation_rmse_first_time_unit": float(np.sqrt(np.mean(err[:horizon] ** 2))),
        "simulation_valid_time": valid_steps * dt,
        "simulation_diverged": float(n < true.shape[0]),
    }


def _plot_trajectories(true: np.ndarray, sim: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 5))
    for k, (data, title, color) in enumerate(
        ((true, "true equations", "tab:blue"), (sim, "recovered equations", "tab:orange"))
    ):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        ax.plot(data[:, 0], data[:, 1], data[:, 2], lw=0.6, color=color)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_zlabel("z")
        ax.set_title(f"{title} ({data.shape[0]} points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_time_series(true: np.ndarray, sim: np.ndarray, dt: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 6), sharex=True)
    t_true = dt * np.arange(true.shape[0])
    t_sim = dt * np.arange(sim.shape[0])
    for k, name in enumerate("xyz"):
        axes[k].plot(t_true, true[:, k], lw=1.0, label="true")
        axes[k].plot(t_sim, sim[:, k], lw=1.0, ls="--", label="recovered")
        axes[k].set_ylabel(name)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_losses(history: list[dict], step_losses: list[float], epc: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in history]
    for key, label in (
        ("train_loss", "total"),
        ("loss_solution", "MSE(u, x)"),
        ("loss_denoise", "MSE(x_hat, x)"),
    ):
        if history and key in history[0]:
            axes[0].semilogy(epochs, [r[key] for r in history], label=label)
    for c in range(epc, len(history), epc):
        axes[0].axvline(c - 0.5, color="grey", lw=0.5, ls=":")
    axes[0].set_xlabel("epoch (dotted: thresholding)")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].semilogy(np.arange(len(step_losses)), step_losses)
    axes[1].set_xlabel("optimisation step")
    axes[1].set_ylabel("training loss")
    axes[1].set_title(f"first {len(step_losses)} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_coefficients(
    library: PolynomialLibrary, xi: np.ndarray, truth: np.ndarray, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=False)
    pos = np.arange(library.n_terms)
    for j, var in enumerate(library.variables):
        ax = axes[j]
        ax.bar(pos - 0.2, truth[:, j], width=0.4, label="true")
        ax.bar(pos + 0.2, xi[:, j], width=0.4, label="recovered")
        ax.set_xticks(pos, library.names, rotation=60)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"d{var}/dt")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(
    config: Config,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, Any], list[Path]]:
    """Evaluate a trained model; writes ``metrics.json`` and ``plots/*.png`` into ``out_dir``.

    Returns:
        (numeric metrics, the whole metrics.json content, the plot files).
    """
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

    files = [
        plots / n for n in ("trajectories.png", "time_series.png", "loss.png", "coefficients.png")
    ]
    _plot_trajectories(clean[:n_sim], sim, files[0])
    _plot_time_series(clean[:n_sim], sim, settings.data.dt, files[1])
    _plot_losses(
        payload.get("history", []), payload.get("step_losses", []), settings.epochs_per_cycle,
        files[2],
    )  # fmt: skip
    _plot_coefficients(library, xi, truth, files[3])

    document = {
        "experiment": "lorenz",
        "solver": solver,
        "metrics": metrics,
        "equations": library.equations(xi),
        "true_equations": library.equations(truth),
        "coefficients": xi.tolist(),
        "true_coefficients": truth.tolist(),
        "terms": list(library.names),
        "train_run_id": payload.get("run_id"),
        "train_metrics": payload.get("final_metrics", {}),
    }
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(_json_safe(document), f, indent=2)
        f.write("\n")
    return metrics, document, files


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
