"""Zarr stores on disk: checksummed chunks, damaged chunks as clear errors, no zarr warnings."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from zarr.codecs import GzipCodec, ZstdCodec

from smnn.data.lorenz import REMEDY, LorenzParams, load_lorenz, write_lorenz_store
from smnn.data.store import (
    StoreError,
    load_variables,
    open_dataset,
    store_read_errors,
    write_dataset_atomic,
)

REMEDY_X = "rerun the stage that writes it, e.g. `snakemake --forcerun make_x`"


def _dataset() -> xr.Dataset:
    t = np.arange(40)
    return xr.Dataset(
        {
            "v": (("time", "component"), np.arange(120.0).reshape(40, 3)),
            "w": (("time",), np.linspace(0.0, 1.0, 40)),
        },
        coords={"time": 0.5 * t, "component": ["a", "bb", "c"], "label": ("time", t % 7)},
        attrs={"source": "test"},
    )


def _write(tmp_path: Path) -> Path:
    # "v" in four chunks along time, so one damaged chunk leaves the others readable
    return write_dataset_atomic(
        _dataset(), tmp_path / "x.zarr", encoding={"v": {"chunks": (10, 3)}}
    )


def _codecs(store: Path, name: str) -> list[str]:
    meta = json.loads((store / name / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"]]


def _flip_bytes(chunk: Path, n: int = 4) -> None:
    data = bytearray(chunk.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_every_array_ends_with_a_crc32c_checksum(tmp_path):
    store = _write(tmp_path)
    for name in ("v", "w", "time", "component", "label"):
        codecs = _codecs(store, name)
        assert codecs[-2:] == ["zstd", "crc32c"], (name, codecs)
    assert _codecs(store, "component")[0] == "vlen-utf8"  # variable-length strings
    meta = json.loads((store / "component" / "zarr.json").read_text())
    assert meta["data_type"] == "string"
    # the caller's compressor is kept, the checksum comes after it
    other = write_dataset_atomic(
        _dataset(), tmp_path / "gz.zarr", encoding={"w": {"compressors": (GzipCodec(level=1),)}}
    )
    assert _codecs(other, "w") == ["bytes", "gzip", "crc32c"]
    # the values read back unchanged, the caller's dataset is not modified
    ds = open_dataset(store, ("v", "w"), load=True)
    np.testing.assert_array_equal(ds["v"].values, _dataset()["v"].values)
    assert ds["component"].values.tolist() == ["a", "bb", "c"]
    assert ds.sel(component="bb")["v"].values[1] == 4.0
    assert _dataset()["component"].dtype.kind == "U"


def test_flipped_bytes_in_a_chunk_are_a_store_error_naming_store_variable_remedy(tmp_path):
    store = _write(tmp_path)
    _flip_bytes(store / "v" / "c" / "2" / "0")
    ds = open_dataset(store, ("v",), remedy=REMEDY_X)  # lazily: metadata are fine
    with pytest.raises(StoreError) as info:
        load_variables(ds, ["w", "v"], store=store, remedy=REMEDY_X)
    message = str(info.value)
    assert str(store) in message and "'v'" in message and REMEDY_X in message
    assert "checksum" in message
    assert (info.value.store, info.value.variable, info.value.remedy) == (store, "v", REMEDY_X)
    # the intact variable still loads; eager opening reports the same
    np.testing.assert_array_equal(
        load_variables(ds, ["w"], store=store)["w"].values, _dataset()["w"].values
    )
    with pytest.raises(StoreError, match=r"variable 'v' of Zarr store .*make_x"):
        open_dataset(store, remedy=REMEDY_X, load=True)
    # lazy work on the store, wrapped by the caller
    with pytest.raises(StoreError, match="'v'"):
        with store_read_errors(store, "v", REMEDY_X):
            ds["v"].sum().compute()


def test_damaged_index_coordinate_names_the_coordinate(tmp_path):
    store = _write(tmp_path)
    _flip_bytes(store / "time" / "c" / "0")
    with pytest.raises(StoreError) as info:
        open_dataset(store, remedy=REMEDY_X)  # index coordinates are read when opening
    assert info.value.variable == "time"
    assert str(store) in str(info.value) and REMEDY_X in str(info.value)


def test_decompression_error_of_a_store_without_checksums(tmp_path):
    """A store written before checksums: a broken zstd frame is a StoreError too."""
    store = tmp_path / "old.zarr"
    _dataset().drop_vars("component").to_zarr(
        store, zarr_format=3, consolidated=False,
        encoding={"v": {"compressors": (ZstdCodec(),), "chunks": (10, 3)}},
    )  # fmt: skip
    assert _codecs(store, "v") == ["bytes", "zstd"]
    chunk = store / "v" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[:4] = b"\x00\x00\x00\x00"  # the frame's magic number
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        open_dataset(store, remedy=REMEDY_X, load=True)
    assert info.value.variable == "v" and REMEDY_X in str(info.value)
    assert "decompression" in str(info.value).lower()


def test_missing_store_names_the_remedy(tmp_path):
    with pytest.raises(StoreError, match=r"does not exist; .*make_x"):
        open_dataset(tmp_path / "none.zarr", remedy=REMEDY_X)
    with pytest.raises(StoreError, match=r"lacks variable\(s\) \['q'\].*make_x"):
        open_dataset(_write(tmp_path), ("v", "q"), remedy=REMEDY_X)


def test_damaged_lorenz_store_tells_to_rerun_generate_lorenz(tmp_path):
    store = write_lorenz_store(LorenzParams(n_points=200), 0, tmp_path / "lorenz.zarr")
    _flip_bytes(store / "observed" / "c" / "0" / "0")
    with pytest.raises(StoreError) as info:
        load_lorenz(store)
    assert info.value.variable == "observed"
    assert "snakemake --forcerun generate_lorenz" in str(info.value)
    assert REMEDY in str(info.value) and str(store) in str(info.value)


def _lorenz_store_with_timestamp(tmp_path: Path) -> Path:
    store = write_lorenz_store(LorenzParams(n_points=200), 0, tmp_path / "lorenz.zarr")
    (store / ".snakemake_timestamp").touch()  # what Snakemake adds to directory() outputs
    return store


def test_writing_and_opening_the_lorenz_store_warns_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = _lorenz_store_with_timestamp(tmp_path)
        ds = load_lorenz(store, LorenzParams(n_points=200))
        lazy = open_dataset(store)["clean"].values
    # unclosed-file warnings of garbage collected objects from elsewhere are not ours
    ours = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert ours == [], [str(w.message) for w in ours]
    assert ds["component"].values.tolist() == ["x", "y", "z"] and lazy.shape == (200, 3)
    # the test can see the warning: opened without our store wrapper, zarr does warn
    with pytest.warns(UserWarning, match=r"\.snakemake_timestamp is not recognized"):
        xr.open_zarr(store, zarr_format=3, consolidated=False)


def test_lorenz_store_round_trip_under_warnings_as_errors(tmp_path):
    """A fresh interpreter with ``-W error``: any warning while writing or reading fails it."""
    code = (
        "import sys; from pathlib import Path\n"
        "from smnn.data.lorenz import LorenzParams, write_lorenz_store, load_lorenz\n"
        "p = write_lorenz_store(LorenzParams(n_points=100), 1, Path(sys.argv[1]))\n"
        "(p / '.snakemake_timestamp').touch()\n"
        "ds = load_lorenz(p, LorenzParams(n_points=100))\n"
        "print(ds['component'].values.tolist(), ds['clean'].shape)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, str(tmp_path / "l.zarr")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['x', 'y', 'z'] (100, 3)"


# ------------------------------------------------------------------ missing chunks, the source


@pytest.mark.filterwarnings("ignore:Object at .smnn_manifest.json")
def test_deleted_chunk_of_a_data_variable_is_damage_not_fill_values(tmp_path):
    store = _write(tmp_path)
    (store / "v" / "c" / "2" / "0").unlink()
    # what zarr alone does: the missing chunk reads as fill values, no error
    raw = xr.open_zarr(store, zarr_format=3, consolidated=False)["v"].values
    assert np.isnan(raw[20:30]).all() or (raw[20:30] == 0).all()
    with pytest.raises(StoreError) as info:
        open_dataset(store, remedy=REMEDY_X)
    message = str(info.value)
    assert info.value.variable == "v" and str(store) in message and "make_x" in message
    assert "v/c/2/0" in message and "missing" in message


def test_deleted_chunk_of_a_coordinate_is_caught(tmp_path):
    store = _write(tmp_path)
    (store / "time" / "c" / "0").unlink()
    with pytest.raises(StoreError, match=r"variable 'time' .*missing.*make_x"):
        open_dataset(store, remedy=REMEDY_X)


def test_deleted_chunk_of_the_lorenz_store_names_generate_lorenz(tmp_path):
    store = write_lorenz_store(LorenzParams(n_points=200), 0, tmp_path / "lorenz.zarr")
    chunk = next(p for p in (store / "observed" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    with pytest.raises(StoreError) as info:
        load_lorenz(store)
    assert info.value.variable == "observed"
    assert "snakemake --forcerun generate_lorenz" in str(info.value)


def test_an_added_chunk_file_is_caught_and_intact_stores_pass(tmp_path):
    store = _write(tmp_path)
    open_dataset(store, remedy=REMEDY_X)  # intact: no error
    (store / "w" / "c" / "9").write_bytes(b"junk")
    with pytest.raises(StoreError, match=r"'w' .*not written with"):
        open_dataset(store, remedy=REMEDY_X)


def test_store_without_manifest_is_not_checked(tmp_path):
    from smnn.data.store import MANIFEST_NAME

    store = _write(tmp_path)
    (store / MANIFEST_NAME).unlink()
    assert open_dataset(store)["v"].shape == (40, 3)


def test_source_is_recorded_and_checked(tmp_path):
    from smnn.data.store import SOURCE_ATTR, check_store_source

    store = write_dataset_atomic(_dataset(), tmp_path / "s.zarr", source="generate")
    ds = open_dataset(store)
    assert ds.attrs[SOURCE_ATTR] == "generate" and ds.attrs["source"] == "test"
    check_store_source(ds, "generate", store=store, key="x.source")
    with pytest.raises(StoreError) as info:
        check_store_source(ds, "lpsda", store=store, key="x.source", remedy=REMEDY_X)
    message = str(info.value)
    assert "'generate'" in message and "x.source is 'lpsda'" in message and "make_x" in message
    plain = open_dataset(_write(tmp_path))
    with pytest.raises(StoreError, match="records no source"):
        check_store_source(plain, "generate", store=tmp_path / "x.zarr", key="x.source")
