"""Synthetic SST files in the exact layout of NOAA OI SST V2, for offline runs and tests.

:func:`write_synthetic_sst` writes ``sst.wkmean.1990-present.nc`` and
:func:`write_synthetic_mask` writes ``lsmask.nc`` as NOAA PSL distributes them (variables,
dimensions, dtypes, packing, fill values, units, CF attributes; see :mod:`smnn.data.sst.layout`),
so every later stage reads a synthetic file exactly as it reads the real one. Both files carry
the global attribute ``smnn_synthetic = "1"`` (and say so in ``comment``), which the
preprocessing records in the store's provenance.

The field (degC) is a sum of plausible parts, on any grid and for any number of weeks:

- a latitude climatology, ~28 degC at the equator to the freezing point of sea water (-1.8) at
  the poles, with a western Pacific warm pool and an eastern Pacific cold tongue;
- a seasonal cycle in opposite phase in the two hemispheres (warmest in August in the north, in
  February in the south), strongest at mid latitudes;
- an interannual oscillation (ENSO-like: two periods drawn in 3 .. 7 years plus red noise),
  strongest in the tropical eastern Pacific;
- spatially smooth noise persistent in time (AR(1) on a 10-degree grid of nodes, interpolated),
  plus finer-scale noise (3-degree nodes) on ocean cells only: land cells stay smooth, as the
  interpolated fill of the real file.

Everything is seeded (one ``numpy.random.Generator`` from ``seed``): the same arguments give the
same file contents. The file is written in blocks of :data:`BLOCK_WEEKS` weeks, so the full-size
file (1727 x 180 x 360) never needs the whole array in memory; it takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smnn.config import Config
from smnn.data.sst.layout import MASK_VARIABLE, SST_VARIABLE, SYNTHETIC_ATTR

__all__ = [
    "ENCODINGS",
    "FIRST_WEEK",
    "TIME_UNITS",
    "SstSyntheticSettings",
    "grid_coords",
    "week_times",
    "synthetic_land_mask",
    "synthetic_sst_block",
    "write_synthetic_sst",
    "write_synthetic_mask",
    "write_synthetic_files",
]

ENCODINGS = ("netcdf4", "int16")
TIME_UNITS = "days since 1800-1-1 00:00:00"
EPOCH = np.datetime64("1800-01-01", "D")
FIRST_WEEK = np.datetime64("1989-12-31", "D")  # the first week of the real file
MASK_TIME = 66410.0  # the real lsmask.nc's time stamp (1981-10-29)
FILL_NETCDF4 = np.float32(-9.96921e36)
INT16_SCALE = np.float32(0.01)
INT16_MISSING = np.int16(32767)
MASK_MISSING = np.int16(32766)
VALID_RANGE_DEGC = (-5.0, 40.0)
FREEZING_DEGC = -1.8
BLOCK_WEEKS = 64
TITLE = "NOAA Optimum Interpolation (OI) SST V2"
COMMENT = (
    "SYNTHETIC data written by smnn.data.sst.synthetic in the layout of NOAA OI SST V2 "
    "(climatology, seasonal cycle, an ENSO-like oscillation and smooth noise); not observations"
)

# continents: (lon centre, lat centre, lon semi-axis, lat semi-axis), degrees; together with
# the polar land below about 67 S they cover ~32 % of the cells at every resolution (the real
# 1-degree mask: 44,219 ocean cells of 64,800, 68.2 %)
_CONTINENTS = (
    (255.0, 52.0, 35.7, 18.8),  # North America
    (262.0, 32.0, 16.9, 11.3),
    (276.0, 15.0, 6.6, 7.5),  # Central America
    (300.0, -8.0, 16.0, 16.0),  # South America
    (291.0, -35.0, 7.5, 16.0),
    (318.0, 74.0, 13.2, 9.4),  # Greenland
    (20.0, 53.0, 22.6, 11.3),  # Europe
    (18.0, 10.0, 23.5, 22.6),  # Africa
    (32.0, -18.0, 11.3, 14.1),
    (47.0, 23.0, 10.3, 8.5),  # Arabia
    (95.0, 52.0, 56.4, 18.8),  # Asia
    (110.0, 68.0, 51.7, 8.5),  # Siberia
    (78.0, 20.0, 8.5, 9.4),  # India
    (104.0, 15.0, 7.5, 8.5),  # Indochina
    (134.0, -25.0, 18.8, 11.3),  # Australia
)


@dataclass(frozen=True)
class SstSyntheticSettings:
    """Settings of the synthetic source (config section ``sst.synthetic`` and ``seed``)."""

    n_weeks: int = 1727
    n_lat: int = 18
    n_lon: int = 36
    encoding: str = "netcdf4"
    seed: int = 0

    @classmethod
    def from_config(cls, config: Config) -> SstSyntheticSettings:
        p = "sst.synthetic."
        return cls(
            n_weeks=config.get_int(p + "n_weeks", min_value=2),
            n_lat=config.get_int(p + "n_lat", min_value=2),
            n_lon=config.get_int(p + "n_lon", min_value=2),
            encoding=config.get_str(p + "encoding", choices=ENCODINGS),
            seed=config.get_int("seed", min_value=0),
        )


# ------------------------------------------------------------------ grid and time


def grid_coords(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of an equal-angle grid, as NOAA orders them.

    Returns:
        lat ``(n_lat,)`` float32 from ``90 - d/2`` down to ``-90 + d/2`` (``d = 180 / n_lat``;
        89.5 .. -89.5 at 1 degree) and lon ``(n_lon,)`` float32 from ``d/2`` up to
        ``360 - d/2`` (``d = 360 / n_lon``; 0.5 .. 359.5).
    """
    if n_lat < 1 or n_lon < 1:
        raise ValueError(f"the grid needs n_lat, n_lon >= 1, got {n_lat} x {n_lon}")
    dlat, dlon = 180.0 / n_lat, 360.0 / n_lon
    lat = 90.0 - dlat * (np.arange(n_lat) + 0.5)
    lon = dlon * (np.arange(n_lon) + 0.5)
    return lat.astype(np.float32), lon.astype(np.float32)


def week_times(n_weeks: int) -> np.ndarray:
    """Week starts ``(n_weeks,)`` in days since 1800-01-01 (float64), 7 days apart from
    1989-12-31, the first week of the real file."""
    first = float((FIRST_WEEK - EPOCH).astype(np.int64))
    return first + 7.0 * np.arange(n_weeks, dtype=np.float64)


# ------------------------------------------------------------------ land-sea mask


def _land(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Whether points (degrees; broadcasting arrays) are land: polar land plus the ellipses."""
    land = lat < (-67.0 + 3.0 * np.cos(np.deg2rad(2.0 * lon)))
    for lon0, lat0, a, b in _CONTINENTS:
        dlon = (lon - lon0 + 180.0) % 360.0 - 180.0
        land = land | ((dlon / a) ** 2 + ((lat - lat0) / b) ** 2 <= 1.0)
    return land


def synthetic_land_mask(n_lat: int, n_lon: int) -> np.ndarray:
    """The synthetic land-sea mask ``(n_lat, n_lon)`` int8, 1 = ocean, 0 = land.

    A cell is land when more than half of it (sampled on a sub-grid of about 1/4 degree) lies on
    the continents; deterministic, ~68 % ocean at every resolution.
    """
    lat, lon = grid_coords(n_lat, n_lon)
    dlat, dlon = 180.0 / n_lat, 360.0 / n_lon
    sub = max(1, int(np.ceil(4.0 * max(dlat, dlon))))
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    sub_lat = (lat[:, None].astype(np.float64) + dlat * offsets[None, :]).reshape(-1)
    sub_lon = (lon[:, None].astype(np.float64) + dlon * offsets[None, :]).reshape(-1)
    cover = _land(sub_lon[None, :], sub_lat[:, None]).reshape(n_lat, sub, n_lon, sub)
    return (cover.mean(axis=(1, 3)) < 0.5).astype(np.int8)


# ------------------------------------------------------------------ the field


@dataclass(frozen=True)
class _Interp:
    """Linear interpolation from nodes to points: ``value = w0 * node[i0] + w1 * node[i1]``
    (each ``(n_points,)``)."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    @classmethod
    def build(cls, nodes: np.ndarray, points: np.ndarray, period: float | None) -> _Interp:
        """From ascending, evenly spaced ``nodes`` (periodic with ``period`` when given)."""
        n = nodes.size
        step = (nodes[-1] - nodes[0]) / (n - 1) if period is None else period / n
        pos = (points - nodes[0]) / step
        if period is None:
            pos = np.clip(pos, 0.0, n - 1.0)
            i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
            i1 = i0 + 1
        else:
            pos = pos % n
            i0 = np.floor(pos).astype(np.int64) % n
            i1 = (i0 + 1) % n
        frac = (pos - np.floor(pos)) if period is not None else (pos - i0)
        return cls(i0, i1, (1.0 - frac).astype(np.float32), frac.astype(np.float32))


class _NoiseField:
    """Smooth AR(1)-in-time noise: node values on a coarse grid of ``spacing`` degrees, linearly
    interpolated to the cell centres. :meth:`block` continues the series week by week."""

    def __init__(self, lat, lon, spacing, rho, amplitude, rng: np.random.Generator):
        n_y = max(2, int(round(180.0 / spacing)) + 1)
        n_x = max(3, int(round(360.0 / spacing)))
        nodes_y = np.linspace(-90.0, 90.0, n_y)
        nodes_x = 360.0 * np.arange(n_x) / n_x
        self.y = _Interp.build(nodes_y, lat.astype(np.float64), None)
        self.x = _Interp.build(nodes_x, lon.astype(np.float64), 360.0)
        self.rho, self.amplitude, self.rng = rho, amplitude, rng
        self.state = rng.standard_normal((n_y, n_x))

    def block(self, n: int) -> np.ndarray:
        """The next ``n`` weeks ``(n, n_lat, n_lon)`` (float32, std ~ ``amplitude``)."""
        shocks = self.rng.standard_normal((n, *self.state.shape))
        nodes = np.empty_like(shocks)
        scale = np.sqrt(1.0 - self.rho**2)
        for k in range(n):
            self.state = self.rho * self.state + scale * shocks[k]
            nodes[k] = self.state
        nodes = (self.amplitude * nodes).astype(np.float32)
        x, y = self.x, self.y
        along_lon = np.take(nodes, x.i0, axis=2) * x.w0  # (n, n_y, n_lon)
        along_lon += np.take(nodes, x.i1, axis=2) * x.w1
        out = np.take(along_lon, y.i0, axis=1)  # (n, n_lat, n_lon)
        out *= y.w0[:, None]
        upper = np.take(along_lon, y.i1, axis=1)
        upper *= y.w1[:, None]
        out += upper
        return out


class _SstModel:
    """The synthetic field's parts on one grid; :meth:`block` gives consecutive weeks."""

    def __init__(self, n_weeks: int, lat, lon, mask: np.ndarray, rng: np.random.Generator):
        phi = np.deg2rad(lat.astype(np.float64))[:, None]  # (n_lat, 1)
        lat2 = lat.astype(np.float64)[:, None]
        lon2 = lon.astype(np.float64)[None, :]

        def bump(lon0, lat0, width_lon, width_lat):
            dlon = (lon2 - lon0 + 180.0) % 360.0 - 180.0
            return np.exp(-((dlon / width_lon) ** 2) - ((lat2 - lat0) / width_lat) ** 2)

        # (n_lat, n_lon) climatology: ~28 degC at the equator, ~-1.8 at the poles
        self.climatology = (
            FREEZING_DEGC
            + 29.8 * np.cos(phi) ** 2
            + 1.2 * bump(150.0, 0.0, 40.0, 15.0)  # western Pacific warm pool
            - 2.0 * bump(260.0, -2.0, 30.0, 6.0)  # eastern Pacific cold tongue
        )
        # seasonal amplitude, signed by hemisphere (opposite phase in the south)
        amp = 0.4 + 4.6 * np.exp(-(((np.abs(lat2) - 40.0) / 16.0) ** 2))
        self.seasonal = np.broadcast_to(amp * np.tanh(lat2 / 8.0), self.climatology.shape)
        self.enso_pattern = 1.6 * bump(235.0, 0.0, 45.0, 10.0)
        # per-week scalars: day of year of the week's middle, ENSO-like index
        days = week_times(n_weeks) + 3.5
        dates = EPOCH + days.astype("timedelta64[D]")
        year_start = dates.astype("datetime64[Y]").astype("datetime64[D]")
        doy = (dates - year_start).astype(np.float64)
        self.season_phase = np.cos(2.0 * np.pi * (doy - 228.0) / 365.25)
        years = 7.0 * np.arange(n_weeks) / 365.25
        periods = rng.uniform(3.0, 7.0, size=2)
        phases = rng.uniform(0.0, 2.0 * np.pi, size=2)
        index = np.sin(2.0 * np.pi * years / periods[0] + phases[0]) + 0.6 * np.sin(
            2.0 * np.pi * years / periods[1] + phases[1]
        )
        # red noise (AR(1), weekly 0.98, stationary std 0.5) started from its stationary law
        red = np.empty(n_weeks)
        level = 0.5 * rng.standard_normal()
        for k, shock in enumerate(rng.standard_normal(n_weeks)):
            level = 0.98 * level + 0.5 * np.sqrt(1.0 - 0.98**2) * shock
            red[k] = level
        # unit variance in the long run (a fixed scale: a short file is not stretched)
        self.enso_index = (index + red) / np.sqrt(0.5 + 0.5 * 0.6**2 + 0.5**2)
        self.large = _NoiseField(lat, lon, 10.0, 0.85, 0.5, rng)
        self.small = _NoiseField(lat, lon, max(3.0, 180.0 / lat.size), 0.5, 0.2, rng)
        self.ocean = mask.astype(np.float32)
        self.climatology = self.climatology.astype(np.float32)
        self.seasonal = np.ascontiguousarray(self.seasonal, dtype=np.float32)
        self.enso_pattern = self.enso_pattern.astype(np.float32)
        self.season_phase = self.season_phase.astype(np.float32)
        self.enso_index = self.enso_index.astype(np.float32)
        self.week = 0

    def block(self, n: int) -> np.ndarray:
        """The next ``n`` weeks, ``(n, n_lat, n_lon)`` float32 degC."""
        t = slice(self.week, self.week + n)
        field = self.large.block(n)  # (n, n_lat, n_lon) float32
        small = self.small.block(n)
        small *= self.ocean
        field += small
        field += self.climatology
        field += self.season_phase[t, None, None] * self.seasonal
        field += self.enso_index[t, None, None] * self.enso_pattern
        self.week += n
        np.maximum(field, np.float32(FREEZING_DEGC), out=field)
        np.minimum(field, np.float32(35.0), out=field)
        return field


def synthetic_sst_block(
    n_weeks: int, n_lat: int, n_lon: int, seed: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """The whole synthetic field ``(n_weeks, n_lat, n_lon)`` float32 degC in memory (small
    grids; the values :func:`write_synthetic_sst` writes with ``encoding="netcdf4"``)."""
    lat, lon = grid_coords(n_lat, n_lon)
    mask = synthetic_land_mask(n_lat, n_lon) if mask is None else _check_mask(mask, lat, lon)
    model = _SstModel(n_weeks, lat, lon, mask, np.random.default_rng(seed))
    return np.concatenate(
        [model.block(min(BLOCK_WEEKS, n_weeks - t)) for t in range(0, n_weeks, BLOCK_WEEKS)]
    )


def _check_mask(mask: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (lat.size, lon.size):
        raise ValueError(f"mask must have shape {(lat.size, lon.size)}, got {mask.shape}")
    return (mask != 0).astype(np.int8)


# ------------------------------------------------------------------ writing


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _write_coords(nc, lat: np.ndarray, lon: np.ndarray) -> None:
    v = nc.createVariable("lat", "f4", ("lat",))
    v.setncatts(
        {
            "units": "degrees_north",
            "long_name": "Latitude",
            "actual_range": np.array([lat[0], lat[-1]], dtype=np.float32),
            "standard_name": "latitude",
            "axis": "Y",
            "coordinate_defines": "center",
        }
    )
    v[:] = lat
    v = nc.createVariable("lon", "f4", ("lon",))
    v.setncatts(
        {
            "units": "degrees_east",
            "long_name": "Longitude",
            "actual_range": np.array([lon[0], lon[-1]], dtype=np.float32),
            "standard_name": "longitude",
            "axis": "X",
            "coordinate_defines": "center",
        }
    )
    v[:] = lon


def _global_attrs(what: str) -> dict[str, str]:
    from smnn import __version__

    return {
        "title": TITLE,
        "Conventions": "CF-1.0",
        "history": f"Created by smnn {__version__} (smnn.data.sst.synthetic): {what}",
        "comment": COMMENT,
        "platform": "Model",
        "source": "smnn.data.sst.synthetic (synthetic; NOAA's file: NCEP Climate Modeling Branch)",
        "institution": "synthetic",
        "References": "https://www.psl.noaa.gov/data/gridded/data.noaa.oisst.v2.html",
        "dataset_title": TITLE,
        SYNTHETIC_ATTR: "1",
    }


def write_synthetic_sst(
    path: str | Path,
    *,
    n_weeks: int,
    n_lat: int,
    n_lon: int,
    seed: int,
    encoding: str = "netcdf4",
    mask: np.ndarray | None = None,
) -> Path:
    """Write a synthetic weekly SST file in the layout of ``sst.wkmean.1990-present.nc``.

    Layout: dims ``time`` (unlimited), ``lat``, ``lon``, ``nbnds`` = 2; ``time`` (float64, days
    since 1800-1-1, week starts from 1989-12-31), ``time_bnds`` (time, nbnds), ``lat``
    descending and ``lon`` ascending (float32 cell centres, :func:`grid_coords`), ``sst`` (time,
    lat, lon) in degC with NOAA's attributes, encoded as

    - ``"netcdf4"``: NETCDF4, float32, ``_FillValue`` -9.96921e36, one chunk per week
      (NOAA's file today);
    - ``"int16"``: NETCDF3_CLASSIC, int16 packed with ``scale_factor`` 0.01, ``add_offset`` 0,
      ``missing_value`` 32767 (older copies).

    Written in blocks of :data:`BLOCK_WEEKS` weeks to a temporary file renamed into place when
    complete (bounded memory; a failed write leaves no partial file at ``path``).

    Args:
        path: the file to write (replaced when present).
        n_weeks, n_lat, n_lon: the shape of ``sst``.
        seed: seed of the random parts (same seed, same values).
        encoding: ``"netcdf4"`` or ``"int16"``.
        mask: ``(n_lat, n_lon)`` 1 = ocean, 0 = land (default :func:`synthetic_land_mask`);
            the finer noise is on ocean cells only.

    Returns:
        ``path``.
    """
    import netCDF4

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if n_weeks < 1:
        raise ValueError(f"n_weeks must be >= 1, got {n_weeks}")
    path = Path(path)
    lat, lon = grid_coords(n_lat, n_lon)
    mask = synthetic_land_mask(n_lat, n_lon) if mask is None else _check_mask(mask, lat, lon)
    model = _SstModel(n_weeks, lat, lon, mask, np.random.default_rng(seed))
    times = week_times(n_weeks)
    packed = encoding == "int16"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with netCDF4.Dataset(tmp, "w", format="NETCDF3_CLASSIC" if packed else "NETCDF4") as nc:
            nc.createDimension("lat", n_lat)
            nc.createDimension("lon", n_lon)
            nc.createDimension("time", None)
            nc.createDimension("nbnds", 2)
            _write_coords(nc, lat, lon)
            tv = nc.createVariable("time", "f8", ("time",))
            tv.setncatts(
                {
                    "units": TIME_UNITS,
                    "long_name": "Time",
                    "delta_t": "0000-00-07 00:00:00",
                    "avg_period": "0000-00-07 00:00:00",
                    "standard_name": "time",
                    "axis": "T",
                    "bounds": "time_bnds",
                    "actual_range": np.array([times[0], times[-1]]),
                }
            )
            tv[:] = times
            bv = nc.createVariable("time_bnds", "f8", ("time", "nbnds"))
            bv.long_name = "Time Boundaries"
            bv[:] = np.stack([times, times + 7.0], axis=1)
            attrs = {
                "long_name": "Weekly Mean of Sea Surface Temperature",
                "units": "degC",
                "var_desc": "Sea Surface Temperature",
                "dataset": TITLE,
                "level_desc": "Surface",
                "statistic": "Weekly Mean",
                "parent_stat": "Individual Observations",
                "standard_name": "sea_surface_temperature",
                "cell_methods": "time: mean (interval: 7 days)",
            }
            if packed:
                sv = nc.createVariable(SST_VARIABLE, "i2", ("time", "lat", "lon"), fill_value=False)
                lo, hi = (np.int16(round(v / float(INT16_SCALE))) for v in VALID_RANGE_DEGC)
                attrs.update(
                    scale_factor=INT16_SCALE,
                    add_offset=np.float32(0.0),
                    missing_value=INT16_MISSING,
                    valid_range=np.array([lo, hi], dtype=np.int16),
                    precision=np.int16(2),
                )
            else:
                sv = nc.createVariable(
                    SST_VARIABLE, "f4", ("time", "lat", "lon"), fill_value=FILL_NETCDF4,
                    chunksizes=(1, n_lat, n_lon),
                )  # fmt: skip
                attrs.update(
                    valid_range=np.array(VALID_RANGE_DEGC, dtype=np.float32),
                    unpacked_valid_range=np.array(VALID_RANGE_DEGC, dtype=np.float32),
                    precision=np.int16(2),
                )
            sv.setncatts(attrs)
            sv.set_auto_maskandscale(False)  # the values written are the stored ones
            vmin, vmax = np.inf, -np.inf
            for start in range(0, n_weeks, BLOCK_WEEKS):
                block = model.block(min(BLOCK_WEEKS, n_weeks - start))
                vmin, vmax = min(vmin, float(block.min())), max(vmax, float(block.max()))
                if packed:
                    block = np.round(block / INT16_SCALE).astype(np.int16)
                sv[start : start + block.shape[0]] = block
            sv.actual_range = np.array([vmin, vmax], dtype=np.float32)
            nc.setncatts(_global_attrs(f"synthetic weekly SST, seed {seed}, encoding {encoding}"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_synthetic_mask(path: str | Path, *, n_lat: int, n_lon: int) -> Path:
    """Write the synthetic land-sea mask (:func:`synthetic_land_mask`) in the layout of NOAA's
    ``lsmask.nc``.

    Layout: NETCDF3_CLASSIC; ``mask`` (time=1, lat, lon) int16 with ``scale_factor`` 1,
    ``add_offset`` 0, ``missing_value`` 32766, ``valid_range`` [0, 1], ``units`` "none",
    1 = ocean, 0 = land; ``lat`` (descending) / ``lon`` float32; ``time`` 66410 days since
    1800-1-1 (1981-10-29). Written to a temporary file renamed into place.

    Returns:
        ``path``.
    """
    import netCDF4

    path = Path(path)
    lat, lon = grid_coords(n_lat, n_lon)
    mask = synthetic_land_mask(n_lat, n_lon)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with netCDF4.Dataset(tmp, "w", format="NETCDF3_CLASSIC") as nc:
            nc.createDimension("lat", n_lat)
            nc.createDimension("lon", n_lon)
            nc.createDimension("time", None)
            _write_coords(nc, lat, lon)
            tv = nc.createVariable("time", "f8", ("time",))
            tv.setncatts(
                {
                    "units": TIME_UNITS,
                    "long_name": "Time",
                    "standard_name": "time",
                    "axis": "T",
                    "actual_range": np.array([MASK_TIME, MASK_TIME]),
                }
            )
            tv[:] = np.array([MASK_TIME])
            mv = nc.createVariable(MASK_VARIABLE, "i2", ("time", "lat", "lon"), fill_value=False)
            mv.setncatts(
                {
                    "long_name": "Land Sea Mask",
                    "valid_range": np.array([0, 1], dtype=np.int16),
                    "actual_range": np.array([0.0, 1.0], dtype=np.float32),
                    "add_offset": np.float32(0.0),
                    "scale_factor": np.float32(1.0),
                    "missing_value": MASK_MISSING,
                    "units": "none",
                    "precision": np.int16(0),
                    "var_desc": "Land-sea mask",
                    "dataset": TITLE,
                    "level_desc": "Surface",
                    "statistic": "Other",
                    "parent_stat": "Other",
                }
            )
            mv.set_auto_maskandscale(False)
            mv[:] = mask.astype(np.int16)[None]
            nc.setncatts(_global_attrs("synthetic land-sea mask (1 = ocean, 0 = land)"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_synthetic_files(
    sst_path: str | Path, mask_path: str | Path, settings: SstSyntheticSettings
) -> tuple[Path, Path]:
    """Write both synthetic files (mask first; the SST file's finer noise follows it).

    Returns:
        (sst_path, mask_path).
    """
    mask = write_synthetic_mask(mask_path, n_lat=settings.n_lat, n_lon=settings.n_lon)
    sst = write_synthetic_sst(
        sst_path,
        n_weeks=settings.n_weeks,
        n_lat=settings.n_lat,
        n_lon=settings.n_lon,
        seed=settings.seed,
        encoding=settings.encoding,
        mask=synthetic_land_mask(settings.n_lat, settings.n_lon),
    )
    return sst, mask
