"""What training and evaluation read from ``data/sst.zarr`` (:class:`SstStore`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from smnn.data.sst.preprocess import REMEDY, SstPreprocessSettings, open_sst_store
from smnn.data.store import StoreError, check_store_source, store_read_errors
from smnn.data.windows import (
    read_series,
)
from smnn.experiments.sst.settings import (
    SstSettings,
)


@dataclass(frozen=True)
class SstStore:
    """What training and evaluation need from ``data/sst.zarr`` (besides the series).

    Attributes:
        path: the store.
        dataset: the lazily opened dataset.
        n_lat, n_lon: the grid; cells are numbered ``i_lat * n_lon + i_lon``.
        n_train, n_test: weeks of the training period (``time[:n_train]``) and test period
            (the last ``n_test``).
        mask: ``(n_lat, n_lon)`` int8, 1 ocean, 0 land.
        land: ``"all"`` (every cell takes part) or ``"ocean"`` (land NaN, never drawn).
        mean_degc, std_degc: the standardisation (``degC = mean + std * value``).
        synthetic: whether the store was made from synthetic data.
    """

    path: Path
    dataset: xr.Dataset
    n_lat: int
    n_lon: int
    n_train: int
    n_test: int
    mask: np.ndarray
    land: str
    mean_degc: float
    std_degc: float
    synthetic: bool

    @property
    def n_weeks(self) -> int:
        return self.n_train + self.n_test

    @property
    def allowed(self) -> np.ndarray:
        """``(n_cells,)`` bool: the cells that take part (ocean with ``land: ocean``, else all)."""
        if self.land == "ocean":
            return self.mask.reshape(-1) == 1
        return np.ones(self.n_lat * self.n_lon, dtype=bool)

    @property
    def times(self) -> np.ndarray:
        """``(n_weeks,)`` datetime64 week starts."""
        return np.asarray(self.dataset["time"].values)


def open_store(path: str | Path, settings: SstSettings | None = None) -> SstStore:
    """Open ``data/sst.zarr`` through :func:`smnn.data.sst.preprocess.open_sst_store` (which
    checks the layout of the SST store contract).

    Args:
        settings: when given, the store must have been made with its ``land`` and
            ``test_weeks`` (``sst.preprocess``) and from its ``source`` (``sst.source``).

    Raises:
        StoreError: the store is missing, damaged, lacks a variable or attribute, or was made
            with other preprocessing settings.
    """
    path = Path(path)
    expected = None
    if settings is not None:
        expected = SstPreprocessSettings(land=settings.land, test_weeks=settings.test_weeks)
    ds = open_sst_store(path, expected)
    if settings is not None and settings.source is not None:
        check_store_source(
            ds, settings.source, store=path, key="sst.source", attr="source",
            remedy="rerun its data stages: snakemake --forcerun preprocess_sst",
        )  # fmt: skip
    _, n_lat, n_lon = ds["sst"].shape
    with store_read_errors(path, "mask", REMEDY):
        mask = np.asarray(ds["mask"].values).astype(np.int8)
    return SstStore(
        path=path, dataset=ds, n_lat=n_lat, n_lon=n_lon,
        n_train=int(ds.attrs["n_train_weeks"]), n_test=int(ds.attrs["n_test_weeks"]),
        mask=mask, land=str(ds.attrs["land"]), mean_degc=float(ds.attrs["mean_degc"]),
        std_degc=float(ds.attrs["std_degc"]), synthetic=bool(ds.attrs["synthetic"]),
    )  # fmt: skip


def iso_date(t: np.datetime64) -> str:
    """A week start as ``YYYY-MM-DD``."""
    return str(np.datetime_as_string(np.datetime64(t, "D")))


def read_period(
    store: SstStore, weeks: slice, *, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """The weeks ``weeks`` of ``sst`` as ``(n, n_cells)``, checked finite on the cells that take
    part (:attr:`SstStore.allowed`).

    Raises:
        StoreError: a cell that takes part holds a non-finite value.
    """
    series = read_series(
        store.path, "sst", weeks, dataset=store.dataset, dtype=dtype, device=device, remedy=REMEDY
    )
    allowed = torch.from_numpy(store.allowed).to(series.device)
    bad = ~torch.isfinite(series[:, allowed])
    if bool(bad.any()):
        cells = torch.nonzero(allowed).squeeze(1)[bad.any(dim=0)][:5].tolist()
        raise StoreError(
            f"SST store {store.path}: non-finite values in cells {cells} (of {int(allowed.sum())}"
            f" that take part, land: {store.land}); {REMEDY}",
            store.path, "sst", REMEDY,
        )  # fmt: skip
    return series
