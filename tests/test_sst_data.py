"""The SST raw files (NOAA layout, synthetic writer, checks) and the preprocessing to Zarr.

Real files on small grids, no mocks: synthetic NetCDF files in both encodings are checked with
netCDF4 directly, preprocessed with xarray + Dask, and the store compared with numpy on the same
data; broken files (missing variable, other grid, non-weekly time axis, truncated) must stop
with an error naming the file; the commands run as subprocesses.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import yaml

from smnn.config import Config, ConfigError
from smnn.data.sst.layout import (
    MASK_FILE,
    SST_FILE,
    SstFileError,
    check_mask_file,
    check_sst_file,
    sst_raw_paths,
)
from smnn.data.sst.preprocess import (
    STORE_ATTRS,
    SstPreprocessSettings,
    SstProvenance,
    open_sst_store,
    preprocess_sst,
    sha256_file,
)
from smnn.data.sst.synthetic import (
    SstSyntheticSettings,
    grid_coords,
    synthetic_land_mask,
    synthetic_sst_block,
    write_synthetic_files,
    write_synthetic_mask,
    write_synthetic_sst,
)
from smnn.data.store import StoreError

REPO = Path(__file__).resolve().parents[1]
N_WEEKS, N_LAT, N_LON = 60, 18, 36
TEST_WEEKS = 20
SEED = 3


def settings(**kw) -> SstPreprocessSettings:
    base = dict(land="all", test_weeks=TEST_WEEKS, chunk_lat=5, chunk_lon=8, threads=2)
    base.update(kw)
    return SstPreprocessSettings(**base)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic files: the SST in both encodings and the mask."""
    d = tmp_path_factory.mktemp("sst_raw")
    out = {"mask": write_synthetic_mask(d / MASK_FILE, n_lat=N_LAT, n_lon=N_LON)}
    for enc in ("netcdf4", "int16"):
        out[enc] = write_synthetic_sst(
            d / f"{enc}.nc", n_weeks=N_WEEKS, n_lat=N_LAT, n_lon=N_LON, seed=SEED, encoding=enc
        )
    return out


def read_netcdf(path: Path, var: str) -> np.ndarray:
    """The variable as netCDF4 decodes it (scale/offset applied, missing values as NaN)."""
    with netCDF4.Dataset(path) as nc:
        return np.ma.filled(nc[var][:].astype(np.float32), np.nan)


def chunk_bytes(store: Path, var: str = "sst") -> dict[str, bytes]:
    root = store / var / "c"
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------ the synthetic files


def test_synthetic_files_have_the_noaa_layout(raw):
    with netCDF4.Dataset(raw["mask"]) as nc:
        assert nc.data_model == "NETCDF3_CLASSIC"
        m = nc["mask"]
        assert m.dimensions == ("time", "lat", "lon") and m.shape == (1, N_LAT, N_LON)
        assert m.dtype == np.int16
        assert m.scale_factor == 1.0 and m.add_offset == 0.0 and m.missing_value == 32766
        assert list(m.valid_range) == [0, 1] and m.units == "none"
        assert nc["lat"].dtype == np.float32 and nc["lon"].dtype == np.float32
        assert nc["time"][:].tolist() == [66410.0]
        assert nc["time"].units == "days since 1800-1-1 00:00:00"
        assert nc.title == "NOAA Optimum Interpolation (OI) SST V2" and nc.smnn_synthetic == "1"
        m.set_auto_maskandscale(False)
        assert set(np.unique(m[:])) == {0, 1}

    for enc, model, dtype in (
        ("netcdf4", "NETCDF4", np.float32),
        ("int16", "NETCDF3_CLASSIC", np.int16),
    ):
        with netCDF4.Dataset(raw[enc]) as nc:
            assert nc.data_model == model
            assert nc.title == "NOAA Optimum Interpolation (OI) SST V2"
            assert nc.Conventions.startswith("CF") and nc.smnn_synthetic == "1"
            assert "SYNTHETIC" in nc.comment
            v = nc["sst"]
            assert v.dimensions == ("time", "lat", "lon") and v.dtype == dtype
            assert v.units == "degC" and v.standard_name == "sea_surface_temperature"
            assert len(v.actual_range) == 2 and len(v.valid_range) == 2
            if enc == "netcdf4":
                assert v._FillValue == np.float32(-9.96921e36)
                assert v.chunking() == [1, N_LAT, N_LON]
            else:
                assert v.scale_factor == np.float32(0.01) and v.add_offset == 0.0
                assert v.missing_value == 32767
            lat, lon = nc["lat"][:], nc["lon"][:]
            assert lat.dtype == np.float32 and np.all(np.diff(lat) < 0)
            assert lat[0] == 85.0 and lat[-1] == -85.0 and lon[0] == 5.0 and lon[-1] == 355.0
            t = nc["time"]
            assert t.units == "days since 1800-1-1 00:00:00" and t.bounds == "time_bnds"
            assert t[0] == 69395.0  # 1989-12-31
            assert np.all(np.diff(t[:]) == 7.0)
            assert nc["time_bnds"].shape == (N_WEEKS, 2)
            np.testing.assert_array_equal(nc["time_bnds"][:, 1] - nc["time_bnds"][:, 0], 7.0)

    # the 1-degree grid is NOAA's: 89.5 .. -89.5, 0.5 .. 359.5
    lat, lon = grid_coords(180, 360)
    assert (lat[0], lat[-1], lon[0], lon[-1]) == (89.5, -89.5, 0.5, 359.5)


def test_synthetic_field_is_plausible():
    x = synthetic_sst_block(3 * 52, 36, 72, seed=0)  # 3 years at 5 degrees
    lat, _ = grid_coords(36, 72)
    zonal = x.mean(axis=(0, 2))
    assert 26.0 < zonal[np.abs(lat) < 5].mean() < 30.0  # warm equator
    assert -1.81 < zonal[0] < 1.0 and -1.81 < zonal[-1] < 1.0  # ~freezing poles
    assert x.min() >= -1.8 - 1e-6 and x.max() < 35.0
    # seasonal cycle in opposite phase at 42.5 N and 42.5 S
    north = x[:, np.argmin(np.abs(lat - 42.5)), :].mean(axis=1)
    south = x[:, np.argmin(np.abs(lat + 42.5)), :].mean(axis=1)
    assert np.corrcoef(north, south)[0, 1] < -0.8
    assert north.max() - north.min() > 4.0
    # spatially smooth: neighbours differ far less than the field varies
    assert np.abs(np.diff(x, axis=2)).mean() < 0.2 * x.std()


def test_synthetic_mask_ocean_fraction_near_noaa_at_every_resolution():
    for n_lat, n_lon in ((18, 36), (36, 72), (90, 180), (180, 360)):
        frac = synthetic_land_mask(n_lat, n_lon).mean()
        assert abs(frac - 44219 / 64800) < 0.02, (n_lat, n_lon, frac)
    mask = synthetic_land_mask(180, 360)
    assert mask[-10:].sum() == 0  # polar land in the south


def test_same_seed_same_file_values_other_seed_differs(tmp_path):
    a = write_synthetic_sst(tmp_path / "a.nc", n_weeks=10, n_lat=9, n_lon=18, seed=1)
    b = write_synthetic_sst(tmp_path / "b.nc", n_weeks=10, n_lat=9, n_lon=18, seed=1)
    c = write_synthetic_sst(tmp_path / "c.nc", n_weeks=10, n_lat=9, n_lon=18, seed=2)
    va, vb, vc = (read_netcdf(p, "sst") for p in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)
    np.testing.assert_array_equal(va, synthetic_sst_block(10, 9, 18, seed=1))


# ------------------------------------------------------------------ checking raw files


def test_check_files_reports_the_layout(raw):
    for enc, fmt in (("netcdf4", "NETCDF4"), ("int16", "NETCDF3_CLASSIC")):
        info = check_sst_file(raw[enc], grid=(N_LAT, N_LON))
        assert (info.n_weeks, info.n_lat, info.n_lon) == (N_WEEKS, N_LAT, N_LON)
        assert info.first_week == "1989-12-31" and info.encoding == enc
        assert info.file_format == fmt and info.synthetic
    m = check_mask_file(raw["mask"], grid=(N_LAT, N_LON))
    assert m.n_ocean == int(synthetic_land_mask(N_LAT, N_LON).sum()) and m.synthetic


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def test_broken_files_stop_with_an_error_naming_them(raw, tmp_path):
    # a missing variable
    bad = _copy(raw["netcdf4"], tmp_path / "novar.nc")
    with netCDF4.Dataset(bad, "a") as nc:
        nc.renameVariable("sst", "temperature")
    with pytest.raises(SstFileError, match=r"novar\.nc lacks the variable 'sst'.*download_sst"):
        check_sst_file(bad)
    # the wrong grid (the NOAA download expects 180 x 360)
    with pytest.raises(SstFileError, match=r"int16\.nc has a 18 x 36 .* expected 180 x 360"):
        check_sst_file(raw["int16"], grid=(180, 360))
    with pytest.raises(SstFileError, match=r"lsmask\.nc has a 18 x 36"):
        check_mask_file(raw["mask"], grid=(180, 360))
    # a time axis that is not weekly
    bad = _copy(raw["int16"], tmp_path / "daily.nc")
    with netCDF4.Dataset(bad, "a") as nc:
        t = nc["time"][:]
        t[10:] -= 6.0
        nc["time"][:] = t
    with pytest.raises(SstFileError, match=r"daily\.nc has a time axis that is not weekly"):
        check_sst_file(bad)
    # truncated files, NetCDF4 (HDF5) and NetCDF3, even by one byte; not NetCDF at all
    for enc in ("netcdf4", "int16"):
        data = raw[enc].read_bytes()
        for n in (len(data) // 2, len(data) - 1):
            cut = tmp_path / f"cut_{enc}.nc"
            cut.write_bytes(data[:n])
            with pytest.raises(SstFileError, match=rf"cut_{enc}\.nc is not a readable NetCDF"):
                check_sst_file(cut)
    junk = tmp_path / "junk.nc"
    junk.write_text("<html>503 Service Unavailable</html>")
    with pytest.raises(SstFileError, match=r"junk\.nc is not a readable NetCDF.*truncated"):
        check_sst_file(junk)
    with pytest.raises(SstFileError, match=r"missing\.nc does not exist"):
        check_mask_file(tmp_path / "missing.nc")
    # a mask that is not 0/1
    bad = _copy(raw["mask"], tmp_path / "badmask.nc")
    with netCDF4.Dataset(bad, "a") as nc:
        nc["mask"].set_auto_maskandscale(False)
        nc["mask"][0, 0, 0] = 7
    with pytest.raises(SstFileError, match=r"badmask\.nc has 1 value\(s\) other than 0"):
        check_mask_file(bad)


def test_preprocess_refuses_broken_inputs(raw, tmp_path):
    out = tmp_path / "sst.zarr"
    other_mask = write_synthetic_mask(tmp_path / "mask9.nc", n_lat=9, n_lon=18)
    with pytest.raises(SstFileError, match=r"different grids"):
        preprocess_sst(raw["netcdf4"], other_mask, out, settings(), SstProvenance("synthetic"))
    with pytest.raises(ConfigError, match=r"test_weeks \(60\) must be smaller .* \(60\)"):
        preprocess_sst(
            raw["netcdf4"], raw["mask"], out, settings(test_weeks=60), SstProvenance("synthetic")
        )
    # a NaN in an ocean cell of a file
    bad = _copy(raw["netcdf4"], tmp_path / "holes.nc")
    ocean = np.argwhere(synthetic_land_mask(N_LAT, N_LON) == 1)[0]
    with netCDF4.Dataset(bad, "a") as nc:
        nc["sst"][5, ocean[0], ocean[1]] = np.ma.masked
    with pytest.raises(SstFileError, match=r"holes\.nc has 1 missing"):
        preprocess_sst(bad, raw["mask"], out, settings(land="ocean"), SstProvenance("file"))
    # land: all with the hole in an ocean cell: land: ocean would not help, so no such hint
    with pytest.raises(SstFileError) as info:
        preprocess_sst(bad, raw["mask"], out, settings(land="all"), SstProvenance("file"))
    assert "1 of them in ocean cells" in str(info.value) and "land: ocean does not drop" in str(
        info.value
    )
    assert "set sst.preprocess.land: ocean" not in str(info.value)
    # land: all with a hole only in a land cell: land: ocean is the remedy
    land_hole = _copy(raw["netcdf4"], tmp_path / "landhole.nc")
    land = np.argwhere(synthetic_land_mask(N_LAT, N_LON) == 0)[0]
    with netCDF4.Dataset(land_hole, "a") as nc:
        nc["sst"][5, land[0], land[1]] = np.ma.masked
    with pytest.raises(SstFileError, match=r"set sst.preprocess.land: ocean"):
        preprocess_sst(land_hole, raw["mask"], out, settings(land="all"), SstProvenance("file"))
    assert not out.exists()
    assert not list(tmp_path.glob(".sst.zarr.*"))  # no staging or temporary store left
    with pytest.raises(ConfigError, match=r"cannot reach the Dask scheduler"):
        preprocess_sst(
            raw["netcdf4"], raw["mask"], out,
            settings(scheduler="address", address="tcp://127.0.0.1:9", connect_timeout=1.0),
            SstProvenance("synthetic"),
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"sst.preprocess.address is null"):
        settings(scheduler="address")


# ------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("encoding", ["netcdf4", "int16"])
@pytest.mark.parametrize("land", ["all", "ocean"])
def test_preprocess_matches_numpy(raw, tmp_path, encoding, land):
    out = preprocess_sst(
        raw[encoding], raw["mask"], tmp_path / "sst.zarr", settings(land=land),
        SstProvenance("synthetic"),
    )  # fmt: skip
    ds = open_sst_store(out, settings(land=land))
    degc = read_netcdf(raw[encoding], "sst").astype(np.float64)  # (weeks, lat, lon)
    mask = read_netcdf(raw["mask"], "mask")[0].astype(np.int8)
    assert np.isfinite(degc).all()
    if land == "ocean":
        degc = np.where(mask[None] == 1, degc, np.nan)
    mean, std = np.nanmean(degc), np.nanstd(degc)
    assert ds.attrs["mean_degc"] == pytest.approx(mean, rel=1e-12)
    assert ds.attrs["std_degc"] == pytest.approx(std, rel=1e-12)
    want = ((degc - mean) / std).astype(np.float32)
    got = ds["sst"].values
    assert got.dtype == np.float32 and got.shape == (N_WEEKS, N_LAT, N_LON)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, equal_nan=True)
    if land == "ocean":
        np.testing.assert_array_equal(np.isnan(got), np.broadcast_to(mask == 0, got.shape))
    else:
        assert np.isfinite(got).all()
    np.testing.assert_array_equal(ds["mask"].values, mask)
    assert ds["mask"].dtype == np.int8
    # split, chunks, coordinates
    assert ds.attrs["n_train_weeks"] == N_WEEKS - TEST_WEEKS
    assert ds.attrs["n_test_weeks"] == TEST_WEEKS
    assert ds["sst"].encoding["chunks"] == (N_WEEKS, 5, 8)
    assert ds["time"].dtype == np.dtype("datetime64[ns]")
    assert str(ds["time"].values[0])[:10] == "1989-12-31"
    assert np.all(np.diff(ds["time"].values) == np.timedelta64(7, "D"))
    lat, lon = grid_coords(N_LAT, N_LON)
    np.testing.assert_array_equal(ds["lat"].values, lat)
    np.testing.assert_array_equal(ds["lon"].values, lon)
    assert ds["lat"].dtype == np.float32 and ds["lon"].dtype == np.float32
    # provenance
    assert set(STORE_ATTRS) <= set(ds.attrs)
    assert ds.attrs["land"] == land and ds.attrs["source"] == "synthetic"
    assert ds.attrs["synthetic"] is True
    assert ds.attrs["source_url"] == str(raw[encoding].resolve())
    assert ds.attrs["sst_sha256"] == sha256_file(raw[encoding])
    assert ds.attrs["mask_sha256"] == sha256_file(raw["mask"])
    assert ds.attrs["n_ocean_cells"] == int(mask.sum())
    assert ds.attrs["smnn_version"]


def test_store_is_deterministic_and_scheduler_independent(raw, tmp_path):
    prov = SstProvenance("noaa", "https://example.org/sst.nc")
    a = preprocess_sst(raw["netcdf4"], raw["mask"], tmp_path / "a.zarr", settings(), prov)
    b = preprocess_sst(raw["netcdf4"], raw["mask"], tmp_path / "b.zarr", settings(), prov)
    c = preprocess_sst(
        raw["netcdf4"], raw["mask"], tmp_path / "c.zarr",
        settings(scheduler="local_cluster", threads=2), prov,
    )  # fmt: skip
    ref = chunk_bytes(a)
    assert len(ref) == 4 * 5  # ceil(18 / 5) x ceil(36 / 8) tiles, one chunk along time
    assert chunk_bytes(b) == ref and chunk_bytes(c) == ref
    da, dc = open_sst_store(a), open_sst_store(c)
    assert da.attrs == dc.attrs
    assert da.attrs["source"] == "noaa" and da.attrs["source_url"] == "https://example.org/sst.nc"
    assert da.attrs["synthetic"] is True  # the files carry the synthetic marker
    # an existing cluster by address (here one in this process, reached over TCP)
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        e = preprocess_sst(
            raw["netcdf4"], raw["mask"], tmp_path / "e.zarr",
            settings(scheduler="address", address=cluster.scheduler_address), prov,
        )  # fmt: skip
    assert chunk_bytes(e) == ref
    # a different seed gives a different store
    other = write_synthetic_sst(
        tmp_path / "other.nc", n_weeks=N_WEEKS, n_lat=N_LAT, n_lon=N_LON, seed=SEED + 1
    )
    d = preprocess_sst(other, raw["mask"], tmp_path / "d.zarr", settings(), prov)
    assert chunk_bytes(d) != ref


def test_rewrite_replaces_the_store_and_open_checks_it(raw, tmp_path):
    out = tmp_path / "sst.zarr"
    preprocess_sst(raw["int16"], raw["mask"], out, settings(), SstProvenance("file"))
    preprocess_sst(raw["int16"], raw["mask"], out, settings(land="ocean"), SstProvenance("file"))
    ds = open_sst_store(out)
    assert ds.attrs["land"] == "ocean" and ds.attrs["synthetic"] is True
    with pytest.raises(StoreError, match=r"other sst.preprocess settings .*land.*forcerun"):
        open_sst_store(out, settings(land="all"))
    with pytest.raises(StoreError, match=r"does not exist.*forcerun preprocess_sst"):
        open_sst_store(tmp_path / "nothing.zarr")


# ------------------------------------------------------------------ config and commands


def small_config(tmp_path: Path) -> dict:
    """config/config.yaml with paths in tmp_path and a small synthetic SST."""
    data = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    data["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    sst = data["sst"]
    sst["source"] = "synthetic"
    sst["files"] = {"sst": None, "mask": None}
    sst["synthetic"].update(n_weeks=N_WEEKS, n_lat=N_LAT, n_lon=N_LON, encoding="int16")
    sst["preprocess"].update(land="ocean", test_weeks=24, chunk_lat=5, chunk_lon=8)
    sst["model"].update(window=12, n_dct=4, n_init=3)
    sst["evaluate"].update(encode_weeks=12, forecast_weeks=12)
    data["threads"] = 2
    return data


def test_settings_from_config(tmp_path):
    config = Config(small_config(tmp_path), source="test")
    pre = SstPreprocessSettings.from_config(config)
    assert (pre.land, pre.test_weeks, pre.chunk_lat, pre.chunk_lon) == ("ocean", 24, 5, 8)
    assert pre.scheduler == "threads" and pre.threads == 2
    syn = SstSyntheticSettings.from_config(config)
    assert (syn.n_weeks, syn.n_lat, syn.n_lon, syn.encoding) == (N_WEEKS, N_LAT, N_LON, "int16")
    assert syn.seed == config.get_int("seed")
    sst, mask = sst_raw_paths(config)
    assert sst == tmp_path / "data" / "raw" / "sst" / SST_FILE
    assert mask == tmp_path / "data" / "raw" / "sst" / MASK_FILE
    config.data["sst"]["files"]["mask"] = "elsewhere/m.nc"
    assert sst_raw_paths(config)[1] == Path("elsewhere/m.nc")
    assert SstProvenance.from_config(config).source == "synthetic"
    # the command's path: write both files, then preprocess them
    write_synthetic_files(sst, mask, syn)
    assert check_sst_file(sst).encoding == "int16"
    out = preprocess_sst(sst, mask, tmp_path / "data" / "sst.zarr", pre, SstProvenance("synthetic"))
    assert open_sst_store(out, pre).attrs["n_train_weeks"] == N_WEEKS - 24


def _smnn(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smnn", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_commands_synthesize_and_preprocess(tmp_path, capsys):
    from smnn.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(small_config(tmp_path)))
    r = _smnn(["synthesize-sst", "--config", str(cfg)], tmp_path)
    assert r.returncode == 0, r.stderr
    raw_dir = tmp_path / "data" / "raw" / "sst"
    assert check_sst_file(raw_dir / SST_FILE).encoding == "int16"
    assert check_mask_file(raw_dir / MASK_FILE).grid == (N_LAT, N_LON)
    assert "wrote" in r.stdout
    out = tmp_path / "data" / "sst.zarr"
    args = ["preprocess-sst", "--config", str(cfg), "--sst", str(raw_dir / SST_FILE)]
    args += ["--mask", str(raw_dir / MASK_FILE), "--out", str(out)]
    r = _smnn(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pass 1/2" in r.stdout and "pass 2/2" in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}: sst {N_WEEKS} weeks x {N_LAT} x {N_LON}")
    assert "mean" in last and "std" in last and "peak RSS" in last and "(synthetic)" in last
    ds = open_sst_store(out)
    assert ds.attrs["land"] == "ocean" and ds.attrs["n_test_weeks"] == 24
    before = chunk_bytes(out)
    # in process from here (the same entry point, without another interpreter start-up):
    # a truncated input is one error line naming the file, exit code 2, the store kept
    data = (raw_dir / SST_FILE).read_bytes()
    (raw_dir / SST_FILE).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: SST file {raw_dir / SST_FILE} is not a readable NetCDF" in err
    assert chunk_bytes(out) == before
    # --out-dir
    assert main(["synthesize-sst", "--config", str(cfg), "--out-dir", str(tmp_path / "x")]) == 0
    assert check_sst_file(tmp_path / "x" / SST_FILE).n_weeks == N_WEEKS
