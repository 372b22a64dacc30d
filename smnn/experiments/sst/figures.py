"""The SST evaluation's own figures (maps and training losses), through :mod:`smnn.plotting`.

- :func:`plot_error_maps`: per-cell forecast MSE of each model on a lat/lon map, one colour
  scale, land grey;
- :func:`plot_forecast_week`: one forecast week beside the truth (same colour scale);
- :func:`plot_training_losses`: each trained model's loss per epoch and per step.

Forecast samples and the error against lead time are in :mod:`smnn.experiments.forecast_figures`.
Maps are ``(n_lat, n_lon)`` arrays on the store's grid (lat descending, lon ascending); cells
that were not forecast are NaN and show the grey background, as does land (``mask == 0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from smnn.data.windows import seeded_generator
from smnn.experiments.forecast_figures import (
    MODEL_STYLES,
    plot_error_by_lead,
    plot_forecast_samples,
)
from smnn.experiments.sst.settings import ADAGVAE_KIND, MI_KIND, SstSettings
from smnn.experiments.sst.store import SstStore, iso_date
from smnn.plotting import new_figure, save_figure

if TYPE_CHECKING:  # pragma: no cover - typing only
    from smnn.experiments.sst.evaluation import ForecastScore

__all__ = ["plot_error_maps", "plot_forecast_week", "plot_training_losses", "evaluation_figures"]

LAND_COLOR = "0.8"


def _label(name: str) -> str:
    return str(MODEL_STYLES.get(name, {}).get("label", name))


def _map(ax, lat, lon, values, mask, vmin, vmax, cmap):
    data = np.ma.masked_invalid(np.where(np.asarray(mask) == 0, np.nan, values))
    ax.set_facecolor(LAND_COLOR)
    mesh = ax.pcolormesh(lon, lat, data, shading="nearest", vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xlabel("longitude (deg E)")
    ax.set_ylabel("latitude (deg N)")
    ax.set_aspect("equal", adjustable="box")
    return mesh


def _range(arrays: Sequence[np.ndarray], mask: np.ndarray) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(a)[np.asarray(mask) != 0].ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def plot_error_maps(
    lat: np.ndarray,
    lon: np.ndarray,
    maps: Mapping[str, np.ndarray],
    mask: np.ndarray,
    path: Path,
    *,
    title: str = "",
    units: str = "MSE (normalised)",
) -> Path:
    """One map per model of the per-cell MSE ``(n_lat, n_lon)``, one colour scale (from 0 to
    the largest ocean value)."""
    names = list(maps)
    fig, axes = new_figure(1, len(names), size=(6.5 * len(names), 4.2), squeeze=False)
    _, hi = _range([maps[n] for n in names], mask)
    for ax, name in zip(axes[0], names, strict=True):
        mesh = _map(ax, lat, lon, maps[name], mask, 0.0, hi, "magma_r")
        ax.set_title(_label(name))
    fig.colorbar(mesh, ax=list(axes[0]), label=units, shrink=0.8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_forecast_week(
    lat: np.ndarray,
    lon: np.ndarray,
    forecast: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    path: Path,
    *,
    title: str = "",
    forecast_label: str = "forecast",
    units: str = "SST (normalised)",
) -> Path:
    """The forecast ``(n_lat, n_lon)`` of one week beside the truth, same colour scale."""
    fig, axes = new_figure(1, 2, size=(13, 4.2), squeeze=False)
    lo, hi = _range([forecast, truth], mask)
    for ax, values, name in zip(axes[0], (forecast, truth), (forecast_label, "truth"), strict=True):
        mesh = _map(ax, lat, lon, values, mask, lo, hi, "RdYlBu_r")
        ax.set_title(name)
    fig.colorbar(mesh, ax=list(axes[0]), label=units, shrink=0.8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_training_losses(
    histories: Mapping[str, tuple[Sequence[Mapping[str, float]], Sequence[float]]],
    path: Path,
    *,
    title: str = "",
) -> Path:
    """Per model (name -> (per-epoch records, per-step losses)): the training loss per epoch
    with its components (left) and per optimisation step (right)."""
    fig, axes = new_figure(len(histories), 2, size=(11, 3.6 * max(len(histories), 1)),
                           squeeze=False)  # fmt: skip
    for row, (name, (history, steps)) in enumerate(histories.items()):
        ax = axes[row, 0]
        epochs = [r["epoch"] for r in history]
        keys = ["train_loss"] + sorted(k for k in (history[0] if history else {})
                                       if k.startswith("loss_"))  # fmt: skip
        for key in keys:
            values = [r[key] for r in history]
            if all(v > 0 for v in values):
                ax.semilogy(epochs, values, marker="o", ms=3,
                            label="total" if key == "train_loss" else key[5:])  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(f"{_label(name)}: per epoch")
        if history:
            ax.legend(fontsize=8)
        ax = axes[row, 1]
        if len(steps) and all(v > 0 for v in steps):
            ax.semilogy(np.arange(len(steps)), steps, lw=0.8)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{_label(name)}: first {len(steps)} steps")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def evaluation_figures(
    s: SstSettings, store: SstStore, plots: Path, synthetic: str, solver: str,
    cells: torch.Tensor, encode: torch.Tensor, truth: np.ndarray,
    forecasts: Mapping[str, np.ndarray], scores: Mapping[str, ForecastScore],
    payload: Mapping[str, Any], vae_payload: Mapping[str, Any] | None,
) -> list[Path]:  # fmt: skip
    """The evaluation's plots (the functions above and :mod:`smnn.experiments.forecast_figures`)."""
    ds = store.dataset
    lat, lon = np.asarray(ds["lat"].values), np.asarray(ds["lon"].values)
    n_cells = store.n_lat * store.n_lon
    gen = seeded_generator(s.seed, "sst", "evaluate", "sample cells")
    n_sample = min(s.sample_cells, int(cells.numel()))
    picks = torch.randperm(int(cells.numel()), generator=gen)[:n_sample].sort().values.numpy()
    labels = []
    for i in picks:
        c = int(cells[i])
        labels.append(f"cell lat {lat[c // store.n_lon]:.1f}, lon {lon[c % store.n_lon]:.1f}")
    history = encode[cells[picks].to(encode.device)].double().cpu().numpy()
    files = [
        plot_forecast_samples(
            history, truth[picks], {k: v[picks] for k, v in forecasts.items()}, s.n_init,
            plots / "forecast_samples.png", labels=labels, ylabel="SST (normalised)",
            step_unit="weeks", title=f"SST forecasts, solver {solver}{synthetic}",
        ),
        plot_error_by_lead(
            {k: v.by_lead for k, v in scores.items()}, plots / "mse_by_lead.png",
            ylabel="MSE (normalised)", step_unit="weeks",
            title=f"SST forecast error by lead time, solver {solver}{synthetic}",
        ),
    ]  # fmt: skip

    def grid(values: np.ndarray) -> np.ndarray:
        full = np.full(n_cells, np.nan)
        full[cells.numpy()] = values
        return full.reshape(store.n_lat, store.n_lon)

    trained = [k for k in (MI_KIND, ADAGVAE_KIND) if k in scores]
    files.append(
        plot_error_maps(
            lat, lon, {k: grid(scores[k].per_cell) for k in trained}, store.mask,
            plots / "mse_map.png",
            title=f"forecast MSE per cell over {s.forecast_weeks - s.n_init} weeks{synthetic}",
        )
    )  # fmt: skip
    last = s.forecast_weeks - 1
    when = iso_date(store.times[store.n_train + s.encode_weeks + last])
    files.append(
        plot_forecast_week(
            lat, lon, grid(forecasts[MI_KIND][:, last]), grid(truth[:, last]), store.mask,
            plots / "forecast_week.png", forecast_label="Mechanistic Identifier",
            title=f"week of {when} (lead {last + 1 - s.n_init}){synthetic}",
        )
    )  # fmt: skip
    histories = {MI_KIND: (payload.get("history", []), payload.get("step_losses", []))}
    if vae_payload is not None:
        histories[ADAGVAE_KIND] = (
            vae_payload.get("history", []), vae_payload.get("step_losses", []),
        )  # fmt: skip
    files.append(
        plot_training_losses(histories, plots / "loss.png", title=f"training loss{synthetic}")
    )
    return files
