"""Writing and opening the pipeline's Zarr stores (xarray, Zarr format 3).

A store is written to a hidden temporary directory next to its final path and renamed into place
only when complete. A killed job therefore leaves at most a ``.<name>.tmp-<pid>`` directory (removed
by the next write), never a half-written store at the final path that looks whole.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import xarray as xr

__all__ = ["write_dataset_atomic", "open_dataset", "StoreError"]


class StoreError(OSError):
    """A Zarr store is missing or is not a readable xarray dataset."""


def _stale_temporaries(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.tmp-*")) + sorted(
        path.parent.glob(f".{path.name}.old-*")
    )


def _remove_tree(path: Path, attempts: int = 10) -> None:
    """Remove a directory, also when workers that were still writing into it recreate files
    (dask tasks in flight when another task failed)."""
    for attempt in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05 * (attempt + 1))


def write_dataset_atomic(ds: xr.Dataset, path: str | Path, encoding: dict | None = None) -> Path:
    """Write ``ds`` to the Zarr v3 store ``path`` atomically (temporary directory + rename).

    An existing store at ``path`` is replaced. Chunking follows the dataset's dask chunks, or
    ``encoding[var]["chunks"]`` when given.

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(path):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=encoding or {})
    except BaseException:
        _remove_tree(tmp)
        raise
    if path.exists():
        # a directory cannot be renamed over a non-empty one: move the old store aside first
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def open_dataset(path: str | Path, required_vars: tuple[str, ...] = ()) -> xr.Dataset:
    """Open the Zarr v3 store at ``path`` lazily (dask-backed).

    Args:
        path: the store directory.
        required_vars: data variables that must be present.

    Raises:
        StoreError: naming the path when it is missing, unreadable or lacks a variable.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"Zarr store {path} does not exist (generate it first)")
    try:
        ds = xr.open_zarr(path, zarr_format=3, consolidated=False)
    except Exception as exc:  # zarr raises several types for a broken store
        raise StoreError(f"{path} is not a readable Zarr v3 store: {exc}") from exc
    missing = [v for v in required_vars if v not in ds.data_vars]
    if missing:
        raise StoreError(
            f"Zarr store {path} lacks variable(s) {missing}; it has {sorted(ds.data_vars)}"
        )
    return ds
