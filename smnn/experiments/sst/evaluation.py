"""The SST forecast protocol, its baselines and metrics (docs/experiments.md, SST section).

Protocol. The test period is the last ``n_test_weeks`` of the store; its first ``encode_weeks``
weeks are the *encoding window*, the next ``forecast_weeks`` the *forecast window*. Every cell
that takes part (ocean cells with ``land: ocean``, all cells with ``land: all``) is forecast:

- Mechanistic Identifier (:func:`mi_forecast`): the cell's encoding window and that of its
  evaluation partner (a cell on the same latitude chosen as in training, drawn once from the
  seed; a cell without any allowed partner is paired with itself) are encoded as a training pair
  and their first ``shared_latents`` averaged; the ODE decoded from the cell's latents (its
  coefficients, right-hand side and steps, the first ``forecast_weeks`` of them) is solved with
  the true values of the first ``n_init`` weeks of the *forecast* window as initial values. Its
  solution over the forecast window is the forecast.
- Ada-GVAE (:func:`adagvae_forecast`): the pair's posteriors, adaptively averaged, and the
  decoder applied to the cell's posterior mean with the first ``n_init`` weeks of the forecast
  window.
- Climatology (:func:`seasonal_climatology`): per cell, the mean over the training period of
  the weeks with the same week of the year (:func:`week_of_year`: a 52-week cycle, the short
  53rd week of a year counted as its 52nd).
- Persistence (:func:`persistence_forecast`): the last given value (week ``n_init`` of the
  forecast window) held.

Metrics (:func:`score_forecast`). The ``n_init`` given weeks are inputs of every forecast, so
they are not scored: the MSE is over the ``forecast_weeks - n_init`` weeks after them and over
the forecast cells, in normalised units and in degC^2 (times ``std_degc^2``), as a function of
the lead time (lead 1 = the first week after the given ones), and per cell (for maps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from smnn.data.windows import RowPartners, seeded_generator
from smnn.experiments.base import Evaluation
from smnn.experiments.sst.figures import evaluation_figures
from smnn.experiments.sst.settings import ADAGVAE_KIND, MI_KIND, SstSettings
from smnn.experiments.sst.store import iso_date, open_store, read_period
from smnn.experiments.sst.tasks import load_model
from smnn.io import atomic_write_json

__all__ = [
    "WEEKS_PER_YEAR",
    "week_of_year",
    "seasonal_climatology",
    "climatology_forecast",
    "persistence_forecast",
    "evaluation_partners",
    "mi_forecast",
    "adagvae_forecast",
    "ForecastScore",
    "score_forecast",
    "score_table",
]

WEEKS_PER_YEAR = 52


def week_of_year(times: np.ndarray) -> np.ndarray:
    """The week of the year ``(n,)`` int64 in ``0 .. 51`` of week-start dates ``times``
    (datetime64): days 1-7 of the year are week 0, ...; the last one or two days of a year
    (its 53rd week) count as week 51."""
    times = np.asarray(times).astype("datetime64[D]")
    years = times.astype("datetime64[Y]")
    day = (times - years).astype(np.int64)  # 0-based day of the year
    return np.minimum(day // 7, WEEKS_PER_YEAR - 1)


def seasonal_climatology(series: np.ndarray, weeks: np.ndarray) -> np.ndarray:
    """Per cell, the mean by week of the year: ``series`` ``(T, N)``, ``weeks`` ``(T,)`` in
    ``0..51`` -> ``(52, N)`` float64. A week of the year absent from ``weeks`` gets the cell's
    mean over all of ``series``."""
    series = np.asarray(series)
    weeks = np.asarray(weeks)
    if series.ndim != 2 or weeks.shape != (series.shape[0],):
        raise ValueError(
            f"series must be (T, N) and weeks (T,), got {series.shape} and {weeks.shape}"
        )
    overall = series.mean(axis=0, dtype=np.float64)
    clim = np.empty((WEEKS_PER_YEAR, series.shape[1]), dtype=np.float64)
    for w in range(WEEKS_PER_YEAR):
        rows = np.flatnonzero(weeks == w)
        clim[w] = series[rows].mean(axis=0, dtype=np.float64) if rows.size else overall
    return clim


def climatology_forecast(climatology: np.ndarray, weeks: np.ndarray) -> np.ndarray:
    """``climatology`` ``(52, N)`` at the weeks of the year ``weeks`` ``(F,)`` -> ``(N, F)``."""
    return np.ascontiguousarray(climatology[np.asarray(weeks)].T)


def persistence_forecast(future: np.ndarray, n_given: int) -> np.ndarray:
    """The forecast window's value at week ``n_given - 1`` (the last given one) held:
    ``future`` ``(N, F)`` -> ``(N, F)`` (the given weeks are the truth)."""
    future = np.asarray(future, dtype=np.float64)
    out = np.repeat(future[:, n_given - 1 : n_given], future.shape[1], axis=1)
    out[:, :n_given] = future[:, :n_given]
    return out


def evaluation_partners(
    partners: RowPartners, cells: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The evaluation partner of each of ``cells`` ``(N,)`` -> ``(N,)``: drawn by the pairing
    rule from ``generator``; a cell without an allowed partner is its own partner."""
    cells = cells.to("cpu", torch.int64)
    out = cells.clone()
    ok = partners.pairable[cells]
    if bool(ok.any()):
        out[ok] = partners.draw(cells[ok], generator)
    return out


class _Identifier(Protocol):
    shared_latents: int
    n_init: int

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...
    def share(self, z: torch.Tensor) -> torch.Tensor: ...
    def solve(
        self, z: torch.Tensor, initial: torch.Tensor, n_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Vae(Protocol):
    n_init: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def adapt(
        self, mean: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def decode(self, z: torch.Tensor, initial: torch.Tensor) -> torch.Tensor: ...


def _check(encode: torch.Tensor, future: torch.Tensor, cells, partners, n_init: int) -> None:
    if encode.ndim != 2 or future.ndim != 2 or encode.shape[0] != future.shape[0]:
        raise ValueError(
            f"encode (n_cells, T) and future (n_cells, F) needed, got {tuple(encode.shape)} and "
            f"{tuple(future.shape)}"
        )
    if cells.shape != partners.shape or cells.ndim != 1:
        raise ValueError("cells and partners must be (N,) tensors of the same length")
    if future.shape[1] <= n_init:
        raise ValueError(f"the forecast window ({future.shape[1]}) must exceed n_init ({n_init})")


@torch.no_grad()
def mi_forecast(
    model: _Identifier,
    encode: torch.Tensor,
    future: torch.Tensor,
    cells: torch.Tensor,
    partners: torch.Tensor,
    batch_size: int,
) -> np.ndarray:
    """The identifier's forecasts of ``cells`` (see the module docstring).

    Args:
        encode: ``(n_cells, T)`` every cell's encoding window (on the model's device).
        future: ``(n_cells, F)`` every cell's forecast window (only its first ``n_init``
            weeks are read).
        cells, partners: ``(N,)`` the forecast cells and their evaluation partners.
        batch_size: pairs per batch.

    Returns:
        ``(N, F)`` float64.
    """
    _check(encode, future, cells, partners, model.n_init)
    n_steps, dev = future.shape[1], encode.device
    out = []
    for c, p in zip(cells.split(batch_size), partners.split(batch_size), strict=True):
        c, p = c.to(dev), p.to(dev)
        z = model.share(model.encode(torch.stack([encode[c], encode[p]], dim=1)))
        u, _ = model.solve(z[:, 0], future[c, : model.n_init], n_steps=n_steps)
        out.append(u.double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def adagvae_forecast(
    model: _Vae,
    encode: torch.Tensor,
    future: torch.Tensor,
    cells: torch.Tensor,
    partners: torch.Tensor,
    batch_size: int,
) -> np.ndarray:
    """Ada-GVAE's forecasts of ``cells`` ``(N, F)`` float64 (arguments as :func:`mi_forecast`;
    the forecast window may not be longer than the model's window)."""
    _check(encode, future, cells, partners, model.n_init)
    n_steps, dev = future.shape[1], encode.device
    out = []
    for c, p in zip(cells.split(batch_size), partners.split(batch_size), strict=True):
        c, p = c.to(dev), p.to(dev)
        mean, _, _ = model.adapt(*model.encode(torch.stack([encode[c], encode[p]], dim=1)))
        x = model.decode(mean[:, 0], future[c, : model.n_init])
        if x.shape[1] < n_steps:
            raise ValueError(f"the decoder gives {x.shape[1]} weeks, fewer than {n_steps}")
        out.append(x[:, :n_steps].double().cpu())
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class ForecastScore:
    """Squared errors of one model's forecasts after the given weeks.

    Attributes:
        mse: over every scored cell and week (normalised units).
        by_lead: ``(F - n_given,)`` the MSE over cells at each lead time (lead 1 first).
        per_cell: ``(N,)`` the MSE over the scored weeks of each cell.
    """

    mse: float
    by_lead: np.ndarray
    per_cell: np.ndarray

    def subset(self, keep: np.ndarray) -> float:
        """The MSE over the cells ``keep`` ``(N,)`` bool (NaN when none)."""
        return float(self.per_cell[keep].mean()) if keep.any() else float("nan")


def score_forecast(forecast: np.ndarray, truth: np.ndarray, n_given: int) -> ForecastScore:
    """Score ``forecast`` against ``truth`` (both ``(N, F)``) on the weeks after the first
    ``n_given``.

    Raises:
        ValueError: the shapes differ, or a forecast is not finite.
    """
    forecast = np.asarray(forecast, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if forecast.shape != truth.shape or forecast.ndim != 2 or truth.shape[1] <= n_given:
        raise ValueError(
            f"forecast and truth must be the same (N, F > {n_given}), got {forecast.shape} and "
            f"{truth.shape}"
        )
    err = (forecast[:, n_given:] - truth[:, n_given:]) ** 2
    if not np.isfinite(err).all():
        bad = int((~np.isfinite(err)).any(axis=1).sum())
        raise ValueError(f"the forecasts of {bad} cell(s) are not finite")
    return ForecastScore(float(err.mean()), err.mean(axis=0), err.mean(axis=1))


def score_table(
    scores: Mapping[str, ForecastScore], std_degc: float, ocean: np.ndarray
) -> dict[str, dict[str, object]]:
    """One row per model for ``metrics.json``: MSE (normalised, degC^2), over the ocean cells
    among the scored ones (``ocean`` ``(N,)`` bool) too, and the MSE by lead time."""
    var = std_degc**2
    table: dict[str, dict[str, object]] = {}
    for name, s in scores.items():
        ocean_mse = s.subset(ocean)
        table[name] = {
            "mse_norm": s.mse,
            "mse_degc": s.mse * var,
            "mse_norm_ocean": ocean_mse,
            "mse_degc_ocean": ocean_mse * var,
            "mse_by_lead_norm": [float(v) for v in s.by_lead],
        }
    return table


SHORT_NAMES = {
    MI_KIND: "mi", ADAGVAE_KIND: "adagvae", "climatology": "climatology",
    "persistence": "persistence",
}  # fmt: skip


def evaluate(
    s: SstSettings,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    device: torch.device,
    baseline_models: Mapping[str, Path] | None = None,
) -> Evaluation:
    """The forecast protocol above for the identifier (and Ada-GVAE when its model is given),
    climatology and persistence; writes ``metrics.json`` and ``plots/*.png`` into
    ``out_dir``."""
    store = open_store(data_path, s)
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    dtype = s.torch_dtype
    mi, payload = load_model(
        model_path, MI_KIND, solver=solver, dtype=dtype, device=device, solve_args=s.solve_args()
    )
    if mi.window != s.window or mi.n_init != s.n_init:
        raise ValueError(
            f"{model_path} was trained with window {mi.window} and n_init {mi.n_init}, the "
            f"config says {s.window} and {s.n_init}: retrain"
        )
    E, F, S = s.encode_weeks, s.forecast_weeks, s.n_init
    if E + F > store.n_test:
        raise ValueError(
            f"encode_weeks + forecast_weeks = {E + F} exceed the store's {store.n_test} test "
            f"weeks; rerun preprocess_sst with test_weeks >= {E + F}"
        )
    notes: list[str] = []
    vae = None
    vae_path = (baseline_models or {}).get(ADAGVAE_KIND)
    if vae_path is not None and Path(vae_path).is_file():
        vae, vae_payload = load_model(vae_path, ADAGVAE_KIND, dtype=dtype, device=device)
    else:
        why = "not given" if vae_path is None else f"{vae_path} does not exist"
        notes.append(f"warning: Ada-GVAE left out of the evaluation (its model.pt is {why})")
        vae_payload = None

    # the windows of every cell, the cells forecast and their partners
    test = read_period(store, slice(store.n_train, store.n_weeks), dtype=dtype, device=device)
    encode = test[:E].T.contiguous()  # (n_cells, E)
    future = test[E : E + F].T.contiguous()  # (n_cells, F)
    cells = torch.from_numpy(np.flatnonzero(store.allowed))
    rule = RowPartners((store.n_lat, store.n_lon), s.neighbour_offsets, store.allowed)
    partners = evaluation_partners(rule, cells, seeded_generator(s.seed, "sst", "evaluate"))
    truth = future[cells.to(future.device)].double().cpu().numpy()  # (N, F)

    forecasts: dict[str, np.ndarray] = {
        MI_KIND: mi_forecast(mi, encode, future, cells, partners, s.batch_size)
    }
    if vae is not None:
        forecasts[ADAGVAE_KIND] = adagvae_forecast(
            vae, encode, future, cells, partners, s.batch_size
        )
    times = store.times
    weeks = week_of_year(times)
    train = read_period(store, slice(0, store.n_train), dtype=torch.float32).numpy()
    climatology = seasonal_climatology(train, weeks[: store.n_train])[:, cells.numpy()]
    del train
    first = store.n_train + E  # index of the forecast window's first week
    forecasts["climatology"] = climatology_forecast(climatology, weeks[first : first + F])
    forecasts["persistence"] = persistence_forecast(truth, S)
    scores: dict[str, ForecastScore] = {
        name: score_forecast(f, truth, S) for name, f in forecasts.items()
    }
    ocean = store.mask.reshape(-1)[cells.numpy()] == 1
    table = score_table(scores, store.std_degc, ocean)

    metrics: dict[str, float] = {}
    for name, row in table.items():
        short = SHORT_NAMES[name]
        for key in ("mse_norm", "mse_degc", "mse_norm_ocean", "mse_degc_ocean"):
            metrics[f"{key}_{short}"] = float(row[key])
    for name, p in ((MI_KIND, payload), (ADAGVAE_KIND, vae_payload)):
        final = (p or {}).get("final_metrics", {}).get("final_train_loss")
        if final is not None:
            metrics[f"train_final_loss_{SHORT_NAMES[name]}"] = float(final)

    synthetic = " (synthetic data)" if store.synthetic else ""
    files = evaluation_figures(
        s, store, plots, synthetic, solver, cells, encode, truth, forecasts, scores,
        payload, vae_payload,
    )  # fmt: skip
    document = {
        "experiment": "sst",
        "solver": solver,
        "synthetic": store.synthetic,
        "land": store.land,
        "cells": "ocean" if store.land == "ocean" else "all",
        "n_cells_scored": int(cells.numel()),
        "n_ocean_cells_scored": int(ocean.sum()),
        "std_degc": store.std_degc,
        "mean_degc": store.mean_degc,
        "protocol": {
            "encode_weeks": E,
            "forecast_weeks": F,
            "given_weeks": S,
            "scored_weeks": F - S,
            "encode_start": iso_date(times[store.n_train]),
            "forecast_start": iso_date(times[first]),
            "forecast_end": iso_date(times[first + F - 1]),
            "scored": "the weeks after the given ones, every cell forecast",
            "pairs": "each cell with a partner on its latitude drawn from the seed "
            "(itself when it has none)",
        },
        "models": table,
        "left_out": [] if vae is not None else [ADAGVAE_KIND],
    }
    atomic_write_json(document, out_dir / "metrics.json")
    summary = [
        f"forecast MSE over {F - S} weeks after {S} given, {cells.numel()} cells{synthetic}:",
        *(
            f"  {name:24s} {row['mse_norm']:.4f} (normalised)  {row['mse_degc']:.4f} degC^2"
            for name, row in table.items()
        ),
        *notes,
    ]
    tags = {"synthetic": str(store.synthetic).lower()}
    if payload.get("run_id"):
        tags["train_run_id"] = str(payload["run_id"])
    if vae_payload is not None and vae_payload.get("run_id"):
        tags["baseline_adagvae_run_id"] = str(vae_payload["run_id"])
    return Evaluation(metrics, document, files, tags, summary)
