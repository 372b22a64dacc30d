"""Training the KdV model: the task (:class:`KdvTask`), what ``model.pt`` holds, and reading
it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from smnn.data.windows import gather_trajectory_windows, seeded_generator
from smnn.experiments.kdv.models import KdvModel, KdvOutput
from smnn.experiments.kdv.settings import (
    MODEL_KIND,
    KdvSettings,
)
from smnn.experiments.kdv.store import open_store
from smnn.experiments.model_files import read_model_file


class KdvTask:
    """The KdV model as a :class:`smnn.training.TrainingTask` (see the module docstring).

    Args:
        settings: the config.
        train, valid: ``(n, T, n_x)`` the train and valid trajectories on the training device
            in the training dtype.
        solver: the MNN layer's solver.
        threads: the solver's thread count (the job's run context; None: torch's count).
    """

    kind = MODEL_KIND

    def __init__(
        self, settings: KdvSettings, train: torch.Tensor, valid: torch.Tensor, solver: str,
        threads: int | None = None,
    ):  # fmt: skip
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
        _check_memory(settings, solver, train.shape[2], train.device)
        self.model = KdvModel(
            **settings.model_args(train.shape[2]),
            solver=solver,
            **settings.solve_args(),
            threads=threads,
        ).to(device=train.device, dtype=settings.torch_dtype)
        self.n_starts = train.shape[1] - 2 * w + 2  # window starts per train trajectory
        self.random_windows = settings.windows_per_epoch is not None
        self.n_samples = (
            int(settings.windows_per_epoch) if self.random_windows
            else train.shape[0] * self.n_starts
        )  # fmt: skip
        self.n_epochs = settings.epochs
        self.batch_size = settings.batch_size
        self.batch_size_key = "kdv.train.batch_size"  # named by the Trainer's notices
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


def _check_memory(settings: KdvSettings, solver: str, n_x: int, device: torch.device) -> None:
    """Refuse a training job whose predicted peak (model + Adam state, one batch's solves:
    ``batch * n_x`` order-4 ODEs of ``window`` steps) exceeds the budget, before allocating.

    Raises:
        smnn.memory.MemoryBudgetError: naming the config keys that size each part.
    """
    from smnn.experiments.kdv.settings import N_ORDERS
    from smnn.memory import check_training_memory, parameter_count

    args = settings.model_args(n_x)
    check_training_memory(
        "kdv", solver, device, settings.memory_budget_gb,
        batch=settings.batch_size * n_x, n_steps=settings.window, n_dims=1, n_orders=N_ORDERS,
        dtype=settings.solve_args()["solve_dtype"] or settings.torch_dtype,
        n_params=parameter_count(lambda: KdvModel(**args, solver=solver)),
        keys={
            "model": ["kdv.model.base_filters", "kdv.model.n_blocks", "kdv.model.init_hidden"],
            "solver": ["kdv.train.batch_size", "kdv.model.window"],
        },
    )  # fmt: skip


def build_task(
    settings: KdvSettings,
    solver: str,
    data_path: str | Path,
    device: torch.device,
    threads: int | None = None,
) -> KdvTask:
    """The KdV training task on the train split of ``data_path`` (valid split for validation);
    ``threads``: the solver's thread count (None: torch's count)."""
    store = open_store(data_path, settings.source)
    dtype = settings.torch_dtype
    train = store.read("train", dtype=dtype, device=device)
    valid = store.read("valid", dtype=dtype, device=device)
    return KdvTask(settings, train, valid, solver, threads)


def model_payload(task: KdvTask) -> dict[str, Any]:
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
    solve_args: dict[str, Any] | None = None,
) -> tuple[KdvModel, dict[str, Any]]:
    """Rebuild a trained KdV model (in eval mode) from ``model.pt``; returns (model, payload).

    ``solve_args``: the solve's options (:meth:`KdvSettings.solve_args`; default float64,
    method auto).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds another kind of model or lacks its parts.
    """
    payload = read_model_file(path, "KdV", MODEL_KIND)
    model = KdvModel(**payload["model_args"], solver=solver, **(solve_args or {}))
    model.load_state_dict(payload["state_dict"])
    model.to(device=device, dtype=dtype).eval()
    return model, payload
