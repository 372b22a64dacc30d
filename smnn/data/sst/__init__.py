"""The SST experiment's data: the raw NOAA OI SST V2 files and the preprocessed Zarr store.

- :mod:`smnn.data.sst.layout`: the raw files' names and layout, :func:`check_sst_file`,
  :func:`check_mask_file`, :func:`sst_raw_paths`;
- :mod:`smnn.data.sst.synthetic`: synthetic files in the exact NOAA layout (offline runs, tests);
- :mod:`smnn.data.sst.download`: fetching the real files from NOAA PSL;
- :mod:`smnn.data.sst.preprocess`: NetCDF -> ``data/sst.zarr`` (xarray + Dask, out of core),
  :func:`open_sst_store`.

Submodules are imported on use (xarray, netCDF4 and Dask load only where needed).
"""
