"""The raw SST files: their names, their layout (NOAA OI SST V2) and a check of a file on disk.

The experiment reads two NetCDF files (from NOAA PSL, placed by hand, or written by
:mod:`smnn.data.sst.synthetic` in the same layout):

- ``sst.wkmean.1990-present.nc`` (:data:`SST_FILE`): variable ``sst`` (time, lat, lon) in degC,
  weekly means; ``lat`` north to south (89.5 .. -89.5 on the 1-degree grid), ``lon`` ascending
  (0.5 .. 359.5); ``time`` in days since 1800-01-01 at 7-day steps (the week starts), with
  ``time_bnds`` (time, nbnds=2). NetCDF4 float32 with a ``_FillValue`` of -9.96921e36 today;
  older copies are NetCDF3 int16 packed with ``scale_factor`` 0.01. Land cells are filled (by
  interpolation in the real file).
- ``lsmask.nc`` (:data:`MASK_FILE`): variable ``mask`` (time=1, lat, lon), 1 = ocean, 0 = land,
  stored as packed int16 in NetCDF3.

:func:`check_sst_file` and :func:`check_mask_file` open a file through xarray's CF decoding
(packing and fill values are decoded by the library, never by hand), check that layout and
return a summary; anything wrong is a :class:`SstFileError` naming the file, the problem and the
remedy. :func:`sst_raw_paths` resolves where the pipeline keeps the two files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smnn.config import Config
from smnn.errors import UserError

__all__ = [
    "SST_FILE",
    "MASK_FILE",
    "SST_VARIABLE",
    "MASK_VARIABLE",
    "SYNTHETIC_ATTR",
    "SST_REMEDY",
    "MASK_REMEDY",
    "SstFileError",
    "SstFileInfo",
    "MaskInfo",
    "check_sst_file",
    "check_mask_file",
    "is_synthetic",
    "sst_raw_paths",
]

SST_FILE = "sst.wkmean.1990-present.nc"
MASK_FILE = "lsmask.nc"
SST_VARIABLE = "sst"
MASK_VARIABLE = "mask"
DIMS = ("time", "lat", "lon")
# global attribute marking the files written by smnn.data.sst.synthetic ("1" = synthetic)
SYNTHETIC_ATTR = "smnn_synthetic"
# what to do about a bad raw file, by the way it got there (sst.source)
SST_REMEDY = (
    "re-download it: snakemake --forcerun download_sst, or place the NOAA file there by hand and "
    "set sst.source: file (with sst.source: synthetic: snakemake --forcerun synthesize_sst)"
)
MASK_REMEDY = SST_REMEDY
# values a weekly mean SST (degC) can take; anything outside is not a degC field
PLAUSIBLE_DEGC = (-10.0, 50.0)
# weeks read at a time by the value check (bounded memory on the full 1727-week file)
CHECK_BLOCK_WEEKS = 128


class SstFileError(UserError, ValueError):
    """A raw SST or mask file is missing, unreadable or not in the NOAA layout.

    The message names the file, what is wrong and what to do.

    Attributes:
        path: the file.
        remedy: what to do about it.
    """

    def __init__(self, message: str, path: str | Path | None = None, remedy: str | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.remedy = remedy

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class SstFileInfo:
    """What :func:`check_sst_file` found in a weekly SST file.

    Attributes:
        path: the file.
        n_weeks, n_lat, n_lon: the shape of ``sst`` (time, lat, lon).
        first_week, last_week: the first and last time stamps (ISO dates, week starts).
        encoding: ``"netcdf4"`` (float32 on disk) or ``"int16"`` (packed); the on-disk dtype
            otherwise.
        file_format: the NetCDF data model (``NETCDF4``, ``NETCDF3_CLASSIC``, ...).
        synthetic: the file carries the marker of :mod:`smnn.data.sst.synthetic`.
    """

    path: Path
    n_weeks: int
    n_lat: int
    n_lon: int
    first_week: str
    last_week: str
    encoding: str
    file_format: str
    synthetic: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_lat, self.n_lon)


@dataclass(frozen=True)
class MaskInfo:
    """What :func:`check_mask_file` found in a land-sea mask file.

    Attributes:
        path: the file.
        n_lat, n_lon: the grid.
        n_ocean: cells with mask 1 (ocean).
        file_format: the NetCDF data model.
        synthetic: the file carries the marker of :mod:`smnn.data.sst.synthetic`.
    """

    path: Path
    n_lat: int
    n_lon: int
    n_ocean: int
    file_format: str
    synthetic: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_lat, self.n_lon)

    @property
    def ocean_fraction(self) -> float:
        return self.n_ocean / (self.n_lat * self.n_lon)


def is_synthetic(attrs: dict[str, Any]) -> bool:
    """Whether global attributes carry the synthetic marker (``smnn_synthetic = "1"``)."""
    return str(attrs.get(SYNTHETIC_ATTR, "0")).strip() in ("1", "true", "True")


def _fail(path: Path, what: str, problem: str, remedy: str) -> SstFileError:
    return SstFileError(f"{what} {path} {problem}; {remedy}", path, remedy)


def _open(path: Path, what: str, remedy: str):
    """The file opened lazily through xarray's CF decoding, or a SstFileError."""
    import xarray as xr

    if not path.exists():
        raise _fail(path, what, "does not exist", remedy)
    if not path.is_file():
        raise _fail(path, what, "is not a file", remedy)
    try:
        ds = xr.open_dataset(path, engine="netcdf4", cache=False)
    except Exception as exc:  # netCDF4 raises OSError, xarray ValueError / KeyError ...
        raise _fail(
            path, what,
            f"is not a readable NetCDF file ({type(exc).__name__}: {exc}) (truncated or "
            f"corrupt?)",
            remedy,
        ) from exc  # fmt: skip
    end = _classic_data_end(path)
    size = path.stat().st_size
    if end is not None and size < end:
        ds.close()
        raise _fail(
            path, what,
            f"is not a readable NetCDF file: it is truncated ({size} bytes; its header "
            f"declares {end})",
            remedy,
        )  # fmt: skip
    return ds


_NC_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}


def _classic_data_end(path: Path) -> int | None:
    """For a NetCDF classic-format file (CDF-1, CDF-2, CDF-5): the byte offset where its data
    ends according to its header; None for other files (NetCDF4/HDF5, which the library itself
    checks for truncation) or an unparsable header.

    The netCDF library reads a truncated classic file without complaint (the missing bytes read
    as zeros), so its length is checked against the header here.
    """
    import struct

    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:3] != b"CDF" or head[3] not in (1, 2, 5):
            return None
        version = head[3]
        data = head + f.read(1 << 20)  # headers are small; a huge one is not NOAA's
    big = version == 5  # CDF-5: 64-bit counts
    pos = 4

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(">" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def count() -> int:
        return take("q" if big else "i")

    def skip_name() -> None:
        nonlocal pos
        n = count()
        pos += (n + 3) // 4 * 4

    def skip_atts() -> None:
        nonlocal pos
        take("i")  # tag (NC_ATTRIBUTE or ABSENT)
        for _ in range(count()):
            skip_name()
            size = _NC_TYPE_SIZE.get(take("i"), 1)
            nbytes = count() * size
            pos += (nbytes + 3) // 4 * 4

    try:
        numrecs = count()
        take("i")
        dims = []
        for _ in range(count()):
            skip_name()
            dims.append(count())
        skip_atts()
        take("i")
        variables = []
        for _ in range(count()):
            skip_name()
            dimids = [count() for _ in range(count())]
            skip_atts()
            size = _NC_TYPE_SIZE.get(take("i"), 1)
            vsize = take("Q" if big else "I")
            begin = take("q" if version in (2, 5) else "i")
            is_record = bool(dimids) and dims[dimids[0]] == 0
            shape = [dims[d] for d in (dimids[1:] if is_record else dimids)]
            variables.append((is_record, begin, vsize, size * int(np.prod(shape, dtype=np.int64))))
    except (struct.error, IndexError):
        return None
    records = [v for v in variables if v[0]]
    # one record variable: records are not padded
    recsize = records[0][3] if len(records) == 1 else sum(v[2] for v in records)
    end = 0
    for is_record, begin, _vsize, nbytes in variables:
        stop = begin + (numrecs - 1) * recsize + nbytes if is_record else begin + nbytes
        if not is_record or numrecs > 0:
            end = max(end, stop)
    return end


def _file_format(path: Path) -> str:
    import netCDF4

    try:
        with netCDF4.Dataset(path) as nc:
            return str(nc.data_model)
    except OSError:  # pragma: no cover - xarray opened it a moment ago
        return "unknown"


def _check_grid(ds, path: Path, what: str, var: str, grid, remedy: str) -> tuple[int, int]:
    """Check dims, lat descending / lon ascending and the grid; returns (n_lat, n_lon)."""
    da = ds[var]
    if tuple(da.dims) != DIMS:
        raise _fail(
            path, what, f"has variable {var!r} with dims {tuple(da.dims)}, expected {DIMS}",
            remedy,
        )  # fmt: skip
    for name in ("lat", "lon"):
        if name not in ds.coords:
            raise _fail(path, what, f"lacks the coordinate variable {name!r}", remedy)
    lat = np.asarray(ds["lat"].values, dtype=np.float64)
    lon = np.asarray(ds["lon"].values, dtype=np.float64)
    if lat.size > 1 and not np.all(np.diff(lat) < 0):
        raise _fail(
            path, what,
            f"has lat not strictly descending (north to south) as NOAA's files are "
            f"(first {lat[0]:g}, last {lat[-1]:g})",
            remedy,
        )  # fmt: skip
    if lon.size > 1 and not np.all(np.diff(lon) > 0):
        raise _fail(
            path, what,
            f"has lon not strictly ascending (first {lon[0]:g}, last {lon[-1]:g})", remedy,
        )  # fmt: skip
    shape = (lat.size, lon.size)
    if grid is not None and tuple(grid) != shape:
        raise _fail(
            path, what,
            f"has a {shape[0]} x {shape[1]} (lat x lon) grid, expected {grid[0]} x {grid[1]}",
            remedy,
        )  # fmt: skip
    return shape


def _encoding_name(da) -> str:
    dtype = np.dtype(da.encoding.get("dtype", da.dtype))
    if dtype == np.int16:
        return "int16"
    if dtype == np.float32:
        return "netcdf4"
    return str(dtype)


def check_sst_file(
    path: str | Path,
    grid: tuple[int, int] | None = None,
    *,
    check_values: bool = True,
    remedy: str = SST_REMEDY,
) -> SstFileInfo:
    """Check that ``path`` is a weekly SST file in the NOAA OI SST V2 layout.

    Checks: a readable NetCDF file; variable ``sst`` with dims (time, lat, lon); ``time_bnds``;
    lat strictly descending, lon strictly ascending; the grid equals ``grid`` (n_lat, n_lon) when
    given; at least 2 weeks, every time step exactly 7 days; values finite and plausible degC
    (every week with ``check_values``, read in blocks of :data:`CHECK_BLOCK_WEEKS` weeks; the
    first and last week otherwise, which still catches most truncated files).

    Args:
        path: the file.
        grid: the expected (n_lat, n_lon), e.g. (180, 360) for the real NOAA file.
        check_values: read every week (seconds on the full file) instead of the first and last.
        remedy: what the error messages tell the user to do.

    Returns:
        the file's :class:`SstFileInfo`.

    Raises:
        SstFileError: naming the file, the problem and ``remedy``.
    """
    path = Path(path)
    what = "SST file"
    ds = _open(path, what, remedy)
    try:
        if SST_VARIABLE not in ds.data_vars:
            raise _fail(
                path, what,
                f"lacks the variable {SST_VARIABLE!r} (it has {sorted(map(str, ds.data_vars))})",
                remedy,
            )  # fmt: skip
        if "time_bnds" not in ds.variables:
            raise _fail(path, what, "lacks the variable 'time_bnds' (time, nbnds)", remedy)
        n_lat, n_lon = _check_grid(ds, path, what, SST_VARIABLE, grid, remedy)
        time = ds["time"].values
        if not np.issubdtype(time.dtype, np.datetime64):
            raise _fail(
                path, what,
                f"has a time axis that does not decode to dates (units "
                f"{ds['time'].attrs.get('units', ds['time'].encoding.get('units'))!r}; expected "
                f"'days since 1800-1-1 00:00:00')",
                remedy,
            )  # fmt: skip
        n_weeks = int(time.size)
        if n_weeks < 2:
            raise _fail(path, what, f"has {n_weeks} week(s); at least 2 are needed", remedy)
        steps = np.diff(time).astype("timedelta64[s]")
        bad = np.flatnonzero(steps != np.timedelta64(7 * 86400, "s"))
        if bad.size:
            i = int(bad[0])
            raise _fail(
                path, what,
                f"has a time axis that is not weekly: {bad.size} step(s) differ from 7 days, "
                f"the first between {str(time[i])[:10]} and {str(time[i + 1])[:10]} "
                f"({steps[i] / np.timedelta64(86400, 's'):g} days)",
                remedy,
            )  # fmt: skip
        _check_values(ds[SST_VARIABLE], path, what, remedy, check_values)
        return SstFileInfo(
            path=path,
            n_weeks=n_weeks,
            n_lat=n_lat,
            n_lon=n_lon,
            first_week=str(time[0])[:10],
            last_week=str(time[-1])[:10],
            encoding=_encoding_name(ds[SST_VARIABLE]),
            file_format=_file_format(path),
            synthetic=is_synthetic(ds.attrs),
        )
    finally:
        ds.close()


def _read(da, path: Path, what: str, remedy: str) -> np.ndarray:
    try:
        return np.asarray(da.values)
    except Exception as exc:  # HDF5 / NetCDF errors of a truncated file
        raise _fail(
            path, what,
            f"cannot be read ({type(exc).__name__}: {exc}) (truncated or corrupt?)", remedy,
        ) from exc  # fmt: skip


def _check_values(da, path: Path, what: str, remedy: str, every_week: bool) -> None:
    n = da.sizes["time"]
    if every_week:
        blocks = [slice(t, min(t + CHECK_BLOCK_WEEKS, n)) for t in range(0, n, CHECK_BLOCK_WEEKS)]
    else:
        blocks = [slice(0, 1), slice(n - 1, n)]
    lo, hi = PLAUSIBLE_DEGC
    for block in blocks:
        values = _read(da.isel(time=block), path, what, remedy)
        finite = np.isfinite(values)
        if not finite.all():
            t = block.start + int(np.argwhere(~finite)[0][0])
            raise _fail(
                path, what,
                f"has {int((~finite).sum())} missing or non-finite value(s) in weeks "
                f"{block.start}..{block.stop - 1} (first in week {t}); NOAA's file fills every "
                f"cell, land included",
                remedy,
            )  # fmt: skip
        vmin, vmax = float(values.min()), float(values.max())
        if vmin < lo or vmax > hi:
            raise _fail(
                path, what,
                f"has values from {vmin:g} to {vmax:g} in weeks {block.start}..{block.stop - 1}, "
                f"not weekly mean SSTs in degC (expected within {lo:g} .. {hi:g})",
                remedy,
            )  # fmt: skip


def check_mask_file(
    path: str | Path, grid: tuple[int, int] | None = None, *, remedy: str = MASK_REMEDY
) -> MaskInfo:
    """Check that ``path`` is a land-sea mask in the NOAA ``lsmask.nc`` layout.

    Checks: a readable NetCDF file; variable ``mask`` with dims (time, lat, lon) and one time
    step; lat strictly descending, lon strictly ascending; the grid equals ``grid`` when given;
    every value (after CF decoding) is 0 (land) or 1 (ocean), with at least one ocean cell.

    Returns:
        the file's :class:`MaskInfo`.

    Raises:
        SstFileError: naming the file, the problem and ``remedy``.
    """
    path = Path(path)
    what = "land-sea mask file"
    ds = _open(path, what, remedy)
    try:
        if MASK_VARIABLE not in ds.data_vars:
            raise _fail(
                path, what,
                f"lacks the variable {MASK_VARIABLE!r} (it has "
                f"{sorted(map(str, ds.data_vars))})",
                remedy,
            )  # fmt: skip
        n_lat, n_lon = _check_grid(ds, path, what, MASK_VARIABLE, grid, remedy)
        if ds.sizes["time"] != 1:
            raise _fail(
                path, what, f"has {ds.sizes['time']} time steps in 'mask', expected 1", remedy
            )
        values = _read(ds[MASK_VARIABLE], path, what, remedy)
        ok = (values == 0) | (values == 1)
        if not ok.all():
            bad = values[~ok]
            raise _fail(
                path, what,
                f"has {bad.size} value(s) other than 0 (land) and 1 (ocean), e.g. {bad[0]!r}",
                remedy,
            )  # fmt: skip
        n_ocean = int((values == 1).sum())
        if n_ocean == 0:
            raise _fail(path, what, "marks no cell as ocean (mask 1)", remedy)
        return MaskInfo(
            path=path,
            n_lat=n_lat,
            n_lon=n_lon,
            n_ocean=n_ocean,
            file_format=_file_format(path),
            synthetic=is_synthetic(ds.attrs),
        )
    finally:
        ds.close()


def sst_raw_paths(config: Config) -> tuple[Path, Path]:
    """Where the raw files live: ``sst.files.sst`` and ``sst.files.mask``, a null value meaning
    ``{paths.data}/raw/sst/<NOAA file name>``.

    Returns:
        (sst_path, mask_path).
    """
    data_dir = Path(config.get_str("paths.data"))
    out = []
    for kind, noaa_name in (("sst", SST_FILE), ("mask", MASK_FILE)):
        given = config.get_str(f"sst.files.{kind}", allow_none=True)
        out.append(Path(given) if given else data_dir / "raw" / "sst" / noaa_name)
    return out[0], out[1]


def sst_raw_file(config: Config, which: str, *, must_exist: bool = False) -> Path:
    """One of :func:`sst_raw_paths` (``which`` = ``"sst"`` or ``"mask"``), for the workflow.

    Args:
        must_exist: the file must already be there (``sst.source: file``: no rule writes it).

    Raises:
        SstFileError: ``must_exist`` and the file is missing, saying where to put it.
    """
    sst, mask = sst_raw_paths(config)
    path = {"sst": sst, "mask": mask}[which]
    if must_exist and not path.is_file():
        raise _fail(
            path,
            f"the {which} file",
            f"does not exist, and sst.source is 'file' (sst.files.{which})",
            "place the NOAA file there (or point sst.files at it), or set sst.source to noaa "
            "(download) or synthetic (offline)",
        )
    return path
