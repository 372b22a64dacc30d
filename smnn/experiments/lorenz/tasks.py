"""Training the Lorenz model: the task (:class:`LorenzTask`), what ``model.pt`` holds, and
reading it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smnn.data.lorenz import load_lorenz, make_windows, window_starts
from smnn.experiments.lorenz.models import LorenzModel, WindowOde, lorenz_library
from smnn.experiments.lorenz.settings import N_ORDERS, LorenzSettings
from smnn.experiments.model_files import read_model_file

STEP_LOSS_POINTS = 1000  # per-step losses kept for the loss-curve figure (paper Figure 3)


class LorenzTask:
    """The Lorenz experiment as a :class:`smnn.training.TrainingTask`; ``threads``: the
    solver's thread count (the job's run context; None: torch's count)."""

    def __init__(
        self,
        settings: LorenzSettings,
        windows: torch.Tensor,
        solver: str,
        device: torch.device,
        threads: int | None = None,
    ):
        self.settings = settings
        self.library = lorenz_library()
        dtype = settings.torch_dtype
        _check_memory(settings, solver, windows, device)
        self.windows = windows.to(device=device, dtype=dtype)  # (N, W, 3)
        self.model = LorenzModel(
            settings.data.window, settings.hidden, settings.latent, self.library.n_terms, 3
        ).to(device=device, dtype=dtype)
        self.ode = WindowOde(
            solver, settings.data.window, settings.data.dt, dtype, device, threads=threads
        )
        self.n_epochs = settings.n_epochs
        self.n_samples = int(self.windows.shape[0])
        self.batch_size = settings.batch_size
        self.batch_size_key = "lorenz.train.batch_size"  # named by the Trainer's notices

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


def _check_memory(
    settings: LorenzSettings, solver: str, windows: torch.Tensor, device: torch.device
) -> None:
    """Refuse a training job whose predicted peak (model + Adam state, one batch's solve, the
    windows ``(N, W, 3)``) exceeds the budget, before anything is allocated.

    Raises:
        smnn.memory.MemoryBudgetError: naming the config keys that size each part.
    """
    from smnn.memory import check_training_memory, parameter_count

    dtype = settings.torch_dtype
    window = settings.data.window
    n_terms = lorenz_library().n_terms
    check_training_memory(
        "lorenz", solver, device, settings.memory_budget_gb,
        batch=3 * min(settings.batch_size, max(1, int(windows.shape[0]))),  # (window, state)
        n_steps=window, n_dims=1, n_orders=N_ORDERS, dtype=dtype,
        n_params=parameter_count(
            lambda: LorenzModel(window, settings.hidden, settings.latent, n_terms, 3)
        ),
        extra={"windows": windows.numel() * torch.empty((), dtype=dtype).element_size()},
        keys={
            "model": ["lorenz.model.hidden", "lorenz.model.latent"],
            "solver": ["lorenz.train.batch_size", "lorenz.data.window"],
            "windows": ["lorenz.train.max_windows"],
        },
    )  # fmt: skip


def build_task(
    settings: LorenzSettings,
    solver: str,
    data_path: str | Path,
    device: torch.device,
    threads: int | None = None,
) -> LorenzTask:
    """The training task: windows of the observed trajectory in ``data_path``; ``threads``:
    the solver's thread count (None: torch's count)."""
    ds = load_lorenz(data_path, settings.data)
    series = ds["observed"].values
    starts = window_starts(series.shape[0], settings.data.window, settings.max_windows)
    windows = make_windows(series, starts, settings.data.window)
    return LorenzTask(settings, windows, solver, device, threads)


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
    payload = read_model_file(path, "Lorenz")
    model = LorenzModel(**payload["model_args"]).double()
    model.load_state_dict({k: v.double() for k, v in payload["state_dict"].items()})
    model.eval()
    return model, payload
