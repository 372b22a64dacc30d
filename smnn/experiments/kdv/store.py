"""What training and evaluation read from ``data/kdv.zarr`` (:class:`KdvStore`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from smnn.data.kdv import REMEDY, open_kdv_store, split_indices
from smnn.data.store import StoreError, check_store_source, store_read_errors


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


def open_store(path: str | Path, source: str | None = None) -> KdvStore:
    """Open ``data/kdv.zarr`` (layout checked by :func:`smnn.data.kdv.open_kdv_store`).

    Args:
        source: when given (``kdv.source`` of the config), the store must have been written from
            it (``generate`` or ``lpsda``): a store of the other source is stale.

    Raises:
        StoreError: the store is missing, damaged, not in the KdV layout, or of another source.
    """
    path = Path(path)
    ds = open_kdv_store(path)
    if source is not None:
        stage = "import_kdv" if source == "lpsda" else "generate_kdv"
        check_store_source(
            ds, source, store=path, key="kdv.source", attr="source",
            remedy=f"rerun its data stage: snakemake --forcerun {stage}",
        )  # fmt: skip
    _, n_time, n_x = ds["u"].shape
    return KdvStore(path, ds, str(ds.attrs["source"]), int(n_x), int(n_time))
