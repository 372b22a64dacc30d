"""Training the SST models: the pair sampler, the identifier's and Ada-GVAE's tasks, what
``model.pt`` holds and reading it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from smnn.data.windows import (
    RowPartners,
    gather_windows,
    random_starts,
)
from smnn.experiments.model_files import read_model_file
from smnn.experiments.sst.models import AdaGVAE, MechanisticIdentifier, MiOutput, VaeOutput
from smnn.experiments.sst.settings import (
    ADAGVAE_KIND,
    MI_KIND,
    SstSettings,
)
from smnn.experiments.sst.store import SstStore, open_store, read_period


class PairSampler:
    """Random training pairs of windows from the training period held in memory.

    Args:
        series: ``(T_train, n_cells)`` on the training device.
        partners: the pairing rule on the grid.
        window: weeks per window.
        windows_per_epoch: samples per epoch; None = one per pairable cell (sample ``i`` is
            cell ``partners.pairable_cells[i]``), else each sample's cell is drawn at random.
    """

    def __init__(
        self, series: torch.Tensor, partners: RowPartners, window: int,
        windows_per_epoch: int | None = None,
    ):  # fmt: skip
        if series.ndim != 2 or series.shape[1] != partners.n_cells:
            raise ValueError(f"series must be (T, {partners.n_cells}), got {tuple(series.shape)}")
        if series.shape[0] < window:
            raise ValueError(
                f"the training period has {series.shape[0]} weeks, fewer than a window "
                f"({window}); make the store's test period shorter or the window smaller"
            )
        if partners.pairable_cells.numel() == 0:
            raise ValueError("no cell has a partner (no two allowed cells share a latitude "
                             "within the offsets)")  # fmt: skip
        self.series, self.partners, self.window = series, partners, window
        self.random_cells = windows_per_epoch is not None
        self.n_samples = (
            int(windows_per_epoch) if windows_per_epoch is not None
            else int(partners.pairable_cells.numel())
        )  # fmt: skip

    def draw(self, indices: torch.Tensor) -> torch.Tensor:
        """The pairs of the samples ``indices`` ``(B,)``: ``(B, 2, window)`` (torch's global
        generator draws the partners, the starts and, with ``windows_per_epoch``, the cells)."""
        pool = self.partners.pairable_cells
        indices = indices.to("cpu", torch.int64)
        if self.random_cells:
            cells = pool[torch.randint(0, pool.numel(), (indices.numel(),))]
        else:
            cells = pool[indices]
        partner = self.partners.draw(cells)
        starts = random_starts(self.series.shape[0], self.window, cells.numel())
        both = torch.stack([cells, partner], dim=1).flatten()
        x = gather_windows(self.series, starts.repeat_interleave(2), both, self.window)
        return x.view(-1, 2, self.window)


class _SstTask:
    """What both SST tasks share: the sampler, the optimiser, the schedule."""

    kind: str
    model: nn.Module

    def __init__(self, settings: SstSettings, sampler: PairSampler, store: SstStore | None):
        self.settings, self.sampler, self.store = settings, sampler, store
        self.n_epochs = settings.epochs
        self.n_samples = sampler.n_samples
        self.batch_size = settings.batch_size
        self.batch_size_key = "sst.train.batch_size"  # named by the Trainer's notices

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        return torch.optim.Adam(self.model.parameters(), lr=self.settings.lr), None

    def on_epoch_start(self, epoch: int) -> None:
        pass


def _check_memory(settings: SstSettings, solver: str, device: torch.device) -> None:
    """Refuse a Mechanistic Identifier training job whose predicted peak (model + Adam state,
    one batch's ``2 * batch`` ODEs of ``window`` steps) exceeds the budget, before allocating.

    Raises:
        smnn.memory.MemoryBudgetError: naming the config keys that size each part.
    """
    from smnn.experiments.sst.settings import N_ORDERS
    from smnn.memory import check_training_memory, parameter_count

    check_training_memory(
        "sst", solver, device, settings.memory_budget_gb,
        batch=2 * settings.batch_size, n_steps=settings.window, n_dims=1, n_orders=N_ORDERS,
        dtype=settings.solve_args()["solve_dtype"] or settings.torch_dtype,
        n_params=parameter_count(lambda: MechanisticIdentifier(**settings.mi_args(),
                                                               solver=solver)),
        keys={
            "model": ["sst.model.encoder_hidden", "sst.model.decoder_hidden",
                      "sst.model.latents"],
            "solver": ["sst.train.batch_size", "sst.model.window"],
        },
    )  # fmt: skip


class MiTask(_SstTask):
    """The Mechanistic Identifier as a :class:`smnn.training.TrainingTask`; ``threads``: the
    solver's thread count (the job's run context; None: torch's count)."""

    kind = MI_KIND

    def __init__(
        self, settings: SstSettings, sampler: PairSampler, store: SstStore | None, solver: str,
        device: torch.device, threads: int | None = None,
    ):  # fmt: skip
        super().__init__(settings, sampler, store)
        _check_memory(settings, solver, device)
        self.model = MechanisticIdentifier(
            **settings.mi_args(), solver=solver, **settings.solve_args(), threads=threads
        ).to(device=device, dtype=settings.torch_dtype)
        self._step_sum = 0.0
        self._step_n = 0

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MiOutput]:
        """(DCT loss, alignment term, the model's output) for pairs ``x`` ``(B, 2, T)``."""
        out = self.model(x)
        dct = self.model.encoder.dct
        loss_dct = torch.mean((dct(out.solution) - dct(x)) ** 2)
        k = self.model.shared_latents
        if k > 0:
            loss_align = torch.mean((out.latents[..., :k] - out.shared[..., :k]) ** 2)
        else:
            loss_align = torch.zeros((), dtype=x.dtype, device=x.device)
        return loss_dct, loss_align, out

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.sampler.draw(indices)
        loss_dct, loss_align, out = self.loss_terms(x)
        self._step_sum += float(out.steps.detach().mean())
        self._step_n += 1
        loss = loss_dct + self.settings.alignment_weight * loss_align
        return loss, {
            "loss_dct": float(loss_dct.detach()),
            "loss_alignment": float(loss_align.detach()),
        }

    def epoch_metrics(self) -> dict[str, float]:
        """The mean decoded step size over the epoch's steps (of this process)."""
        mean = self._step_sum / self._step_n if self._step_n else float("nan")
        self._step_sum, self._step_n = 0.0, 0
        return {"mean_step_size": mean}


class AdaGVAETask(_SstTask):
    """The Ada-GVAE baseline as a :class:`smnn.training.TrainingTask`."""

    kind = ADAGVAE_KIND

    def __init__(
        self, settings: SstSettings, sampler: PairSampler, store: SstStore | None,
        device: torch.device,
    ):  # fmt: skip
        super().__init__(settings, sampler, store)
        self.model = AdaGVAE(**settings.adagvae_args()).to(
            device=device, dtype=settings.torch_dtype
        )
        self._shared_sum = 0.0
        self._shared_n = 0

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, VaeOutput]:
        """(reconstruction MSE, KL to the prior per week, the output) for pairs ``x``."""
        out = self.model(x, sample=True)
        loss_rec = torch.mean((out.reconstruction - x) ** 2)
        loss_kl = self.model.kl_prior(out.mean, out.logvar).mean() / self.model.window
        return loss_rec, loss_kl, out

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.sampler.draw(indices)
        loss_rec, loss_kl, out = self.loss_terms(x)
        self._shared_sum += float(out.shared.sum(dim=1, dtype=torch.float64).sum())
        self._shared_n += int(out.shared.shape[0])
        loss = loss_rec + self.settings.beta * loss_kl
        return loss, {"loss_reconstruction": float(loss_rec.detach()),
                      "loss_kl": float(loss_kl.detach())}  # fmt: skip

    def epoch_metrics(self) -> dict[str, float]:
        """The mean number of latent dims averaged per pair over the epoch's steps."""
        mean = self._shared_sum / max(self._shared_n, 1)
        self._shared_sum, self._shared_n = 0.0, 0
        return {"mean_shared_dims": mean}


def _sampler(settings: SstSettings, store: SstStore, device: torch.device) -> PairSampler:
    series = read_period(store, slice(0, store.n_train), dtype=settings.torch_dtype, device=device)
    partners = RowPartners((store.n_lat, store.n_lon), settings.neighbour_offsets, store.allowed)
    return PairSampler(series, partners, settings.window, settings.windows_per_epoch)


def build_mi_task(
    settings: SstSettings,
    solver: str,
    data_path: str | Path,
    device: torch.device,
    threads: int | None = None,
) -> MiTask:
    """The identifier's training task on the training period of ``data_path``; ``threads``:
    the solver's thread count (None: torch's count)."""
    store = open_store(data_path, settings)
    return MiTask(settings, _sampler(settings, store, device), store, solver, device, threads)


def build_adagvae_task(
    settings: SstSettings, data_path: str | Path, device: torch.device
) -> AdaGVAETask:
    """Ada-GVAE's training task on the training period of ``data_path``."""
    store = open_store(data_path, settings)
    return AdaGVAETask(settings, _sampler(settings, store, device), store, device)


def model_payload(task: MiTask | AdaGVAETask) -> dict[str, Any]:
    model = task.model
    args = task.settings.mi_args() if task.kind == MI_KIND else task.settings.adagvae_args()
    n_params = sum(p.numel() for p in model.parameters())
    name = "Mechanistic Identifier" if task.kind == MI_KIND else "Ada-GVAE"
    return {
        "kind": task.kind,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": args,
        "dtype": task.settings.dtype,
        "n_parameters": n_params,
        "summary": [
            f"{name}: {n_params} parameters, window {args['window']} weeks, "
            f"{args['n_dct']} DCT coefficients, {args['latents']} latents"
        ],
    }


def load_model(
    path: str | Path,
    kind: str,
    *,
    solver: str = "smnn",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    solve_args: dict[str, Any] | None = None,
) -> tuple[MechanisticIdentifier | AdaGVAE, dict[str, Any]]:
    """Rebuild a trained SST model (in eval mode) from ``model.pt``; returns (model, payload).

    Args:
        kind: ``mechanistic_identifier`` or ``adagvae`` (must match the file).
        solver: the identifier's solver.
        solve_args: the identifier's solve options (:meth:`SstSettings.solve_args`; default:
            the model's dtype, method auto).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds another kind of model or lacks its parts.
    """
    payload = read_model_file(path, "SST", kind)
    if kind == MI_KIND:
        model: nn.Module = MechanisticIdentifier(
            **payload["model_args"], solver=solver, **(solve_args or {})
        )
    else:
        model = AdaGVAE(**payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    model.to(device=device, dtype=dtype).eval()
    return model, payload
