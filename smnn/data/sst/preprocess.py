"""Preprocessing the raw SST NetCDF files into the Zarr store ``data/sst.zarr`` (xarray + Dask).

The store (Zarr format 3, written atomically by :func:`smnn.data.store.write_dataset_atomic`,
every chunk with a ``crc32c`` checksum):

- ``sst`` (time, lat, lon) float32: standardised, ``(degC - mean_degc) / std_degc`` with one
  global mean and standard deviation over the kept cells and every week; with ``land: ocean``
  land cells are NaN. Chunks ``(n_weeks, chunk_lat, chunk_lon)``: the whole time axis of a
  spatial tile, as training reads it (windows of one cell's series).
- ``mask`` (lat, lon) int8: 1 ocean, 0 land (from ``lsmask.nc``).
- coordinates ``time`` (datetime64[ns], week starts), ``lat`` (float32, descending), ``lon``
  (float32, ascending).
- attributes: ``mean_degc``, ``std_degc``, ``n_train_weeks`` (= n_weeks - test_weeks),
  ``n_test_weeks``, ``land``, ``source``, ``synthetic``, ``source_url``, ``sst_sha256``,
  ``mask_sha256``, ``smnn_version``, ``n_ocean_cells``. The training period is
  ``time[:n_train_weeks]``, the test period the last ``n_test_weeks`` weeks.

Out of core, in two passes, so the full file (1727 x 180 x 360 float32, 448 MB) never needs the
whole array in memory:

1. the NetCDF file is read in blocks of whole weeks (a time-contiguous read, fast whatever the
   file's own chunking, e.g. one chunk per week) and written, cut into spatial tiles, to an
   uncompressed staging store beside the output; the same pass computes the mean, standard
   deviation, count of finite values and range over the kept cells (Dask reductions);
2. the staging store is read tile by tile (the full time axis of one tile), standardised and
   written to the final store; the staging store is removed.

Rechunking the time blocks to time-long tiles in memory instead would need every block before
the first tile is complete, i.e. the whole array.

The Dask scheduler (``sst.preprocess.scheduler``): ``threads`` (the threaded scheduler with the
rule's ``threads``), ``local_cluster`` (a ``distributed.LocalCluster`` in this process sized to
the threads), or ``address`` (an existing Dask cluster; its workers must see the input files and
the output directory at the same paths, e.g. a shared file system).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smnn.config import Config, ConfigError
from smnn.data.dask_scheduler import CONNECT_TIMEOUT_S, SCHEDULERS, dask_scheduler
from smnn.data.sst.layout import (
    MASK_VARIABLE,
    PLAUSIBLE_DEGC,
    SST_VARIABLE,
    SstFileError,
    check_mask_file,
    check_sst_file,
)
from smnn.data.store import StoreError, open_dataset, write_dataset_atomic
from smnn.io import sha256_file

__all__ = [
    "LAND_MODES",
    "SCHEDULERS",
    "SOURCES",
    "REMEDY",
    "STORE_ATTRS",
    "SstPreprocessSettings",
    "SstProvenance",
    "preprocess_sst",
    "open_sst_store",
]

log = logging.getLogger(__name__)

LAND_MODES = ("all", "ocean")
SOURCES = ("noaa", "file", "synthetic")
REMEDY = "rerun the stage that writes it: snakemake --forcerun preprocess_sst"
STORE_ATTRS = (
    "mean_degc",
    "std_degc",
    "n_train_weeks",
    "n_test_weeks",
    "land",
    "source",
    "synthetic",
    "source_url",
    "sst_sha256",
    "mask_sha256",
    "smnn_version",
    "n_ocean_cells",
)
# bytes of one block of whole weeks read from the NetCDF file in pass 1 (~64 weeks at 1 degree)
READ_BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class SstPreprocessSettings:
    """Settings of the preprocessing (config ``sst.preprocess`` and ``threads``).

    Attributes:
        land: ``"all"`` (every cell, as the paper) or ``"ocean"`` (land cells NaN).
        test_weeks: the last weeks held out for testing.
        chunk_lat, chunk_lon: the spatial tile of a chunk (clipped to the grid).
        scheduler: ``"threads"``, ``"local_cluster"`` or ``"address"``.
        address: the scheduler address (``tcp://host:8786``) for ``scheduler: address``.
        threads: Dask threads (the rule's threads).
        connect_timeout: seconds to wait for the scheduler at ``address``.
    """

    land: str = "all"
    test_weeks: int = 416
    chunk_lat: int = 30
    chunk_lon: int = 60
    scheduler: str = "threads"
    address: str | None = None
    threads: int = 1
    connect_timeout: float = CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.land not in LAND_MODES:
            raise ConfigError(f"sst.preprocess.land must be one of {list(LAND_MODES)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sst.preprocess.scheduler must be one of {list(SCHEDULERS)}")
        if self.scheduler == "address" and not self.address:
            raise ConfigError(
                "sst.preprocess.scheduler is 'address' but sst.preprocess.address is null: set "
                "it to the Dask scheduler's address (e.g. tcp://host:8786), or use "
                "scheduler: threads"
            )
        for name in ("test_weeks", "chunk_lat", "chunk_lon", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sst.preprocess.{name} must be >= 1")

    @classmethod
    def from_config(cls, config: Config) -> SstPreprocessSettings:
        p = "sst.preprocess."
        scheduler = config.get_str(p + "scheduler", choices=SCHEDULERS)
        address = config.get_str(p + "address", allow_none=True)
        if scheduler == "address" and not address:
            raise ConfigError(
                f"{config.source}: sst.preprocess.scheduler is 'address' but "
                f"sst.preprocess.address is null: set it to the Dask scheduler's address (e.g. "
                f"tcp://host:8786), or use scheduler: threads"
            )
        return cls(
            land=config.get_str(p + "land", choices=LAND_MODES),
            test_weeks=config.get_int(p + "test_weeks", min_value=1),
            chunk_lat=config.get_int(p + "chunk_lat", min_value=1),
            chunk_lon=config.get_int(p + "chunk_lon", min_value=1),
            scheduler=scheduler,
            address=address,
            threads=config.get_int("threads", min_value=1),
        )


@dataclass(frozen=True)
class SstProvenance:
    """Where the raw files came from, recorded in the store's attributes.

    Attributes:
        source: ``"noaa"``, ``"file"`` or ``"synthetic"`` (config ``sst.source``).
        source_url: the download URL; None = the SST file's path.
    """

    source: str
    source_url: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"sst.source must be one of {list(SOURCES)}, got {self.source!r}")

    @classmethod
    def from_config(cls, config: Config) -> SstProvenance:
        source = config.get_str("sst.source", choices=SOURCES)
        url = config.get_str("sst.download.sst_url") if source == "noaa" else None
        return cls(source=source, source_url=url)


# ------------------------------------------------------------------ preprocessing


def _read_mask(mask_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mask ``(n_lat, n_lon)`` int8 (CF-decoded) and its lat, lon."""
    import xarray as xr

    with xr.open_dataset(mask_file, engine="netcdf4") as ds:
        mask = ds[MASK_VARIABLE].isel(time=0).values
        return (mask == 1).astype(np.int8), ds["lat"].values, ds["lon"].values


def _fast_codec():
    """Blosc (LZ4, byte shuffle) for the float32 SST arrays: on weekly SST it compresses
    better than plain zstd (the shuffle groups the floats' exponent bytes) at ~8x the speed,
    and decodes faster when training reads the store."""
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4),)


def _stage_path(out: Path) -> Path:
    return out.parent / f".{out.name}.stage-{os.getpid()}"


def _remove_stale_stages(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.stage-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _block_weeks(n_weeks: int, n_lat: int, n_lon: int) -> int:
    return int(max(1, min(n_weeks, READ_BLOCK_BYTES // (4 * n_lat * n_lon))))


def preprocess_sst(
    sst_file: str | Path,
    mask_file: str | Path,
    out: str | Path,
    settings: SstPreprocessSettings,
    provenance: SstProvenance,
    *,
    on_phase: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> Path:
    """Preprocess the raw SST and mask files into the store ``out`` (module docstring).

    Args:
        sst_file: the weekly SST NetCDF file (NOAA layout, :func:`~smnn.data.sst.layout.
            check_sst_file`).
        mask_file: the land-sea mask NetCDF file on the same grid.
        out: the Zarr store to write (replaced atomically when present).
        settings: land handling, test split, chunks, Dask scheduler and threads.
        provenance: the source recorded in the store's attributes.
        on_phase: called with a one-line description at the start of every phase.
        progress_bar: show Dask's progress bar for the two passes (threaded scheduler).

    Returns:
        ``out``.

    Raises:
        SstFileError: a raw file is missing, unreadable, not in the NOAA layout, has missing or
            implausible values in the kept cells, or the two files' grids differ.
        ConfigError: ``test_weeks`` leaves no week to train on; the scheduler is unreachable.
    """
    import dask
    import dask.array as da
    import xarray as xr
    import zarr

    from smnn import __version__

    say = on_phase or log.info
    sst_file, mask_file, out = Path(sst_file), Path(mask_file), Path(out)
    # absolute paths in the task graph: the workers of a cluster (scheduler: address) may run
    # in another working directory
    sst_abs, out_abs = sst_file.resolve(), out.resolve()
    say(f"checking {sst_file} and {mask_file}")
    info = check_sst_file(sst_file, check_values=False)
    mask_info = check_mask_file(mask_file)
    if info.grid != mask_info.grid:
        raise SstFileError(
            f"the SST file {sst_file} ({info.n_lat} x {info.n_lon}) and the land-sea mask "
            f"{mask_file} ({mask_info.n_lat} x {mask_info.n_lon}) are on different grids; use "
            f"the mask that belongs to the SST file (NOAA's lsmask.nc for the 1-degree file)",
            mask_file,
        )
    n_weeks, n_lat, n_lon = info.n_weeks, info.n_lat, info.n_lon
    if settings.test_weeks >= n_weeks:
        raise ConfigError(
            f"sst.preprocess.test_weeks ({settings.test_weeks}) must be smaller than the number "
            f"of weeks in {sst_file} ({n_weeks}), or no week is left to train on; lower "
            f"test_weeks or use a longer file"
        )
    mask, mask_lat, mask_lon = _read_mask(mask_file)
    n_ocean = int(mask.sum())
    chunk_lat, chunk_lon = min(settings.chunk_lat, n_lat), min(settings.chunk_lon, n_lon)
    block = _block_weeks(n_weeks, n_lat, n_lon)

    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    hashes = {k: hasher.submit(sha256_file, p) for k, p in (("sst", sst_file), ("mask", mask_file))}
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out_abs)
    stage = _stage_path(out_abs)
    ds = xr.open_dataset(sst_abs, engine="netcdf4", chunks={"time": block, "lat": -1, "lon": -1})
    try:
        with dask_scheduler(
            settings.scheduler, settings.threads, settings.address,
            connect_timeout=settings.connect_timeout, key="sst.preprocess",
        ) as scheduler:  # fmt: skip
            say(f"dask scheduler: {scheduler}")
            lat = np.asarray(ds["lat"].values, dtype=np.float32)
            lon = np.asarray(ds["lon"].values, dtype=np.float32)
            if not (
                np.allclose(lat, mask_lat, atol=1e-4) and np.allclose(lon, mask_lon, atol=1e-4)
            ):
                raise SstFileError(
                    f"the SST file {sst_file} and the land-sea mask {mask_file} have different "
                    f"lat/lon coordinates; use the mask that belongs to the SST file",
                    mask_file,
                )
            time = ds["time"].values.astype("datetime64[ns]")
            # (n_weeks, n_lat, n_lon) float32 degC, lazily, blocks of `block` whole weeks
            degc = ds[SST_VARIABLE].data.astype(np.float32)
            if settings.land == "ocean":
                degc = da.where(mask.astype(bool)[None], degc, np.float32(np.nan))
            n_kept = n_ocean if settings.land == "ocean" else n_lat * n_lon

            say(
                f"pass 1/2: reading {n_weeks} weeks x {n_lat} x {n_lon} in blocks of {block} "
                f"weeks; statistics over the {n_kept} kept cells (land: {settings.land})"
            )
            staged = zarr.create_array(
                store=str(stage), shape=(n_weeks, n_lat, n_lon), dtype="float32",
                chunks=(block, chunk_lat, chunk_lon), compressors=_fast_codec(), filters=None,
                fill_value=np.float32(np.nan), zarr_format=3, overwrite=True,
            )  # fmt: skip
            store_task = da.store(degc, staged, lock=False, compute=False)
            # the same read tasks as the store's (an optimized graph would rename them: two reads)
            blocks = degc.to_delayed(optimize_graph=False).ravel()
            stats = [dask.delayed(_block_stats)(b) for b in blocks]
            with _progress(progress_bar, settings):
                _, *parts = dask.compute(store_task, *stats)
            n_finite, mean, std, vmin, vmax = _combine_stats(parts)
            n_missing_ocean = n_kept * n_weeks - n_finite
            if settings.land == "all" and n_finite != n_kept * n_weeks:  # error path only
                ocean = mask.astype(bool)[None]
                n_missing_ocean = int((~da.isfinite(degc) & ocean).sum().compute())
            _check_values(
                sst_file, settings.land, n_kept * n_weeks, n_finite, vmin, vmax, std,
                n_missing_ocean,
            )  # fmt: skip

            say(
                f"pass 2/2: standardising (mean {mean:.4f} degC, std {std:.4f} degC) into {out} "
                f"in tiles of {n_weeks} x {chunk_lat} x {chunk_lon}"
            )
            tiles = da.from_zarr(staged, chunks=(n_weeks, chunk_lat, chunk_lon))
            standard = tiles.map_blocks(_standardise, mean, std, dtype=np.float32)
            sst_sha, mask_sha = hashes["sst"].result(), hashes["mask"].result()
            synthetic = provenance.source == "synthetic" or info.synthetic or mask_info.synthetic
            if synthetic and provenance.source != "synthetic":
                log.warning(
                    "sst.source is %r but the files carry the synthetic marker (written by "
                    "smnn.data.sst.synthetic): the store records synthetic = true",
                    provenance.source,
                )
            attrs: dict[str, Any] = {
                "title": "NOAA OI SST V2 weekly means, standardised"
                + (" (SYNTHETIC data in the NOAA layout)" if synthetic else ""),
                "mean_degc": mean,
                "std_degc": std,
                "n_train_weeks": n_weeks - settings.test_weeks,
                "n_test_weeks": settings.test_weeks,
                "land": settings.land,
                "source": provenance.source,
                "synthetic": bool(synthetic),
                "source_url": provenance.source_url or str(sst_abs),
                "sst_sha256": sst_sha,
                "mask_sha256": mask_sha,
                "smnn_version": __version__,
                "n_ocean_cells": n_ocean,
                "sst_file": str(sst_file),
                "mask_file": str(mask_file),
                "sst_encoding": info.encoding,
                "first_week": info.first_week,
                "last_week": info.last_week,
            }
            result = xr.Dataset(
                {
                    "sst": (
                        ("time", "lat", "lon"), standard,
                        {"long_name": "standardised weekly mean sea surface temperature",
                         "units": "1", "formula": "(degC - mean_degc) / std_degc"},
                    ),
                    "mask": (
                        ("lat", "lon"), mask,
                        {"long_name": "land-sea mask", "flag_values": "1 ocean, 0 land"},
                    ),
                },
                coords={
                    "time": ("time", time, {"long_name": "week start"}),
                    "lat": ("lat", lat, {"units": "degrees_north"}),
                    "lon": ("lon", lon, {"units": "degrees_east"}),
                },
                attrs=attrs,
            )  # fmt: skip
            encoding = {
                "sst": {"chunks": (n_weeks, chunk_lat, chunk_lon), "compressors": _fast_codec()},
                "mask": {"chunks": (n_lat, n_lon)},
            }
            with _progress(progress_bar, settings):
                write_dataset_atomic(result, out_abs, encoding=encoding)
    finally:
        ds.close()
        hasher.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(stage, ignore_errors=True)
    return out


# weeks per step inside a block (bounded float64 temporaries: ~4 MB at 1 degree)
_STATS_STEP_WEEKS = 8


def _block_stats(block: np.ndarray) -> np.ndarray:
    """``[n, mean, M2, min, max]`` (float64) of the finite values of ``block``
    ``(weeks, n_lat, n_lon)``, a few weeks at a time (float64 temporaries stay small)."""
    acc = np.array([0.0, 0.0, 0.0, np.inf, -np.inf])
    for start in range(0, block.shape[0], _STATS_STEP_WEEKS):
        part = block[start : start + _STATS_STEP_WEEKS]
        if not np.isfinite(part).all():  # land cells NaN (land: ocean) or holes
            part = part[np.isfinite(part)]
            if part.size == 0:
                continue
        values = part.astype(np.float64).ravel()
        mean = float(values.sum()) / values.size
        values -= mean
        summary = [values.size, mean, float(values @ values), part.min(), part.max()]
        acc = _merge(acc, np.array(summary, dtype=np.float64))
    return acc


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two ``[n, mean, M2, min, max]`` summaries combined (Chan et al.'s parallel update)."""
    n = a[0] + b[0]
    if n == 0:
        return a.copy()
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n
    m2 = a[2] + b[2] + delta * delta * a[0] * b[0] / n
    return np.array([n, mean, m2, min(a[3], b[3]), max(a[4], b[4])])


def _combine_stats(parts: list[np.ndarray]) -> tuple[int, float, float, float, float]:
    """(count, mean, population std, min, max) from the blocks' summaries, in block order
    (the same numbers whatever the scheduler)."""
    acc = np.array([0.0, 0.0, 0.0, np.inf, -np.inf])
    for part in parts:
        acc = _merge(acc, part)
    n = int(acc[0])
    std = float(np.sqrt(acc[2] / n)) if n else float("nan")
    return n, float(acc[1]), std, float(acc[3]), float(acc[4])


def _standardise(tile: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(tile - mean) / std`` computed in float64 (one temporary), rounded to float32."""
    out = tile.astype(np.float64)
    out -= mean
    out /= std
    return out.astype(np.float32)


@contextmanager
def _progress(enabled: bool, settings: SstPreprocessSettings) -> Iterator[None]:
    """Dask's progress bar (stdout) for the computations inside, on the threaded scheduler."""
    if enabled and settings.scheduler == "threads":
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0, dt=1.0):
            yield
    else:
        yield


def _check_values(
    path: Path, land: str, expected: int, n_finite: int, vmin, vmax, std: float,
    n_missing_ocean: int,
) -> None:  # fmt: skip
    """Refuse missing values in the kept cells, implausible values, a constant field.
    ``n_missing_ocean``: the missing values in ocean cells (mask 1): ``land: ocean`` is the
    remedy only when there are none."""
    if n_finite != expected:
        if land == "all" and n_missing_ocean == 0:
            hint = (
                "NOAA's file fills land cells; with land cells missing in this copy, set "
                "sst.preprocess.land: ocean"
            )
        else:
            hint = (
                f"{n_missing_ocean} of them in ocean cells, which land: ocean does not drop; "
                "re-download it: snakemake --forcerun download_sst"
            )
        raise SstFileError(
            f"SST file {path} has {expected - n_finite} missing or non-finite value(s) in the "
            f"cells kept (land: {land}); {hint}",
            path,
        )
    lo, hi = PLAUSIBLE_DEGC
    if not (lo <= float(vmin) and float(vmax) <= hi):
        raise SstFileError(
            f"SST file {path} has values from {float(vmin):g} to {float(vmax):g}, not weekly "
            f"mean SSTs in degC (expected within {lo:g} .. {hi:g}); re-download it: snakemake "
            f"--forcerun download_sst",
            path,
        )
    if not std > 0:
        raise SstFileError(
            f"SST file {path} is constant over the kept cells (std 0): nothing to standardise",
            path,
        )


# ------------------------------------------------------------------ reading the store


def open_sst_store(
    path: str | Path, settings: SstPreprocessSettings | None = None
) -> Any:  # xr.Dataset (xarray is imported lazily)
    """Open ``data/sst.zarr`` lazily (dask-backed) and check its layout (module docstring).

    Args:
        path: the store.
        settings: when given, the store must have been made with the same ``land`` and
            ``test_weeks``.

    Returns:
        the xarray Dataset.

    Raises:
        StoreError: naming the store, the problem and :data:`REMEDY` when it is missing,
            unreadable, lacks a variable or attribute, or does not match ``settings``.
    """
    path = Path(path)
    ds = open_dataset(path, required_vars=("sst", "mask"), remedy=REMEDY)

    def fail(problem: str, variable: str | None = None) -> StoreError:
        return StoreError(f"SST store {path} {problem}; {REMEDY}", path, variable, REMEDY)

    if tuple(ds["sst"].dims) != ("time", "lat", "lon"):
        raise fail(f"has 'sst' with dims {tuple(ds['sst'].dims)}, expected (time, lat, lon)", "sst")
    if tuple(ds["mask"].dims) != ("lat", "lon"):
        raise fail(f"has 'mask' with dims {tuple(ds['mask'].dims)}, expected (lat, lon)", "mask")
    if ds["sst"].dtype != np.float32:
        raise fail(f"has 'sst' of dtype {ds['sst'].dtype}, expected float32", "sst")
    missing = [a for a in STORE_ATTRS if a not in ds.attrs]
    if missing:
        raise fail(f"lacks the attribute(s) {missing} (written by an older version?)")
    if not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise fail("has a time coordinate that is not dates", "time")
    n_weeks = ds.sizes["time"]
    n_train, n_test = int(ds.attrs["n_train_weeks"]), int(ds.attrs["n_test_weeks"])
    if n_train < 1 or n_test < 1 or n_train + n_test != n_weeks:
        raise fail(f"has n_train_weeks {n_train} + n_test_weeks {n_test} != its {n_weeks} weeks")
    if ds.attrs["land"] not in LAND_MODES:
        raise fail(f"has land {ds.attrs['land']!r}, expected one of {list(LAND_MODES)}")
    if not float(ds.attrs["std_degc"]) > 0:
        raise fail(f"has std_degc {ds.attrs['std_degc']!r}, expected > 0")
    if settings is not None:
        diffs = []
        if ds.attrs["land"] != settings.land:
            diffs.append(f"land: store {ds.attrs['land']!r} vs config {settings.land!r}")
        if n_test != settings.test_weeks:
            diffs.append(f"test_weeks: store {n_test} vs config {settings.test_weeks}")
        if diffs:
            raise fail(f"was made with other sst.preprocess settings ({'; '.join(diffs)})")
    return ds
