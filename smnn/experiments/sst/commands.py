"""``smnn download-sst``, ``smnn synthesize-sst`` and ``smnn preprocess-sst``: the SST data
stages before training.

- ``download-sst`` fetches the NOAA weekly SST file and the land-sea mask (``sst.download``).

- ``synthesize-sst`` writes synthetic ``sst.wkmean.1990-present.nc`` and ``lsmask.nc`` in the
  exact NOAA layout (``sst.synthetic`` settings and ``seed``), at the paths of ``sst.files``
  (default ``{paths.data}/raw/sst/``) or into ``--out-dir``.
- ``preprocess-sst`` turns the two NetCDF files into the Zarr store ``data/sst.zarr`` (xarray +
  Dask, out of core; ``sst.preprocess`` settings, ``threads``), printing a line per phase, a
  progress bar, and a closing line with the store's shape, mean/std, wall time and peak memory.

Errors in the inputs (config, a missing or malformed NetCDF file, an unreachable Dask scheduler)
are one ``error: ...`` line with exit code 2; the store is written atomically, so a failed run
leaves the previous store (if any) untouched.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from smnn.data.sst.layout import MASK_FILE, SST_FILE, sst_raw_paths
from smnn.jobs import add_job_arguments, clean_errors, job_config, peak_rss_mb, setup_logging

__all__ = ["add_parser", "run_download", "run_synthesize", "run_preprocess"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download-sst",
        help="download the NOAA OI SST V2 weekly file and land-sea mask (sst.download)",
        description="Download sst.wkmean.1990-present.nc and lsmask.nc from the URLs of "
        "sst.download into sst.files (null: {paths.data}/raw/sst/), with retries, resume of a "
        "partial file, validation of the NOAA layout (180 x 360 grid, weekly time axis) and a "
        "<file>.sha256 checksum beside each file (checked against sst.download.*_sha256 when "
        "pinned). A file already downloaded and verified is skipped. The pipeline runs this "
        "for sst.source: noaa; the command itself downloads whatever the source.",
    )
    add_job_arguments(p)
    p.add_argument("--only", choices=["sst", "mask"], help="download only one of the two files")
    p.set_defaults(func=run_download)

    p = subparsers.add_parser(
        "synthesize-sst",
        help="write synthetic SST and land-sea mask NetCDF files in the NOAA layout",
        description="Write sst.wkmean.1990-present.nc and lsmask.nc with the settings of "
        "sst.synthetic and the global seed, in the exact layout of NOAA OI SST V2 (marked as "
        "synthetic), at the paths of sst.files (null: {paths.data}/raw/sst/).",
    )
    add_job_arguments(p)
    p.add_argument(
        "--out-dir",
        default=None,
        help=f"write {SST_FILE} and {MASK_FILE} into this directory instead of sst.files",
    )
    p.set_defaults(func=run_synthesize)

    p = subparsers.add_parser(
        "preprocess-sst",
        help="preprocess the SST NetCDF files into the Zarr store (xarray + Dask)",
        description="Standardise the weekly SST (one global mean and std over the kept cells), "
        "split train/test weeks and write the Zarr v3 store atomically, chunked (all weeks x "
        "spatial tiles), with provenance; settings sst.preprocess and threads.",
    )
    add_job_arguments(p)
    p.add_argument("--sst", default=None, help="the weekly SST file (default: sst.files.sst)")
    p.add_argument("--mask", default=None, help="the land-sea mask file (default: sst.files.mask)")
    p.add_argument(
        "--out", default=None, help="the store to write (default: {paths.data}/sst.zarr)"
    )
    p.add_argument(
        "--source-url",
        default=None,
        help="recorded as the store's source_url (default: sst.download.sst_url for "
        "sst.source: noaa, else the SST file's path)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_preprocess)


@clean_errors
def run_download(args: argparse.Namespace) -> int:
    from smnn.data.sst.download import download_sst

    setup_logging()
    config = job_config(args.config, args.threads)
    for result in download_sst(config, only=args.only):
        print(result.summary(), flush=True)
    return 0


@clean_errors
def run_synthesize(args: argparse.Namespace) -> int:
    from smnn.data.sst.synthetic import SstSyntheticSettings, write_synthetic_files

    setup_logging()
    config = job_config(args.config, args.threads)
    settings = SstSyntheticSettings.from_config(config)
    if args.out_dir is not None:
        sst_path, mask_path = Path(args.out_dir) / SST_FILE, Path(args.out_dir) / MASK_FILE
    else:
        sst_path, mask_path = sst_raw_paths(config)
    start = time.perf_counter()
    print(
        f"synthesizing {settings.n_weeks} weeks x {settings.n_lat} x {settings.n_lon} "
        f"(encoding {settings.encoding}, seed {settings.seed}) -> {sst_path}, {mask_path}",
        flush=True,
    )
    write_synthetic_files(sst_path, mask_path, settings)
    sizes = ", ".join(f"{p} {p.stat().st_size / 2**20:.1f} MB" for p in (sst_path, mask_path))
    print(f"wrote {sizes} ({time.perf_counter() - start:.1f} s, peak RSS {peak_rss_mb():.0f} MB)")
    return 0


@clean_errors
def run_preprocess(args: argparse.Namespace) -> int:
    from smnn.data.sst.preprocess import (
        SstPreprocessSettings,
        SstProvenance,
        open_sst_store,
        preprocess_sst,
    )

    setup_logging()
    config = job_config(args.config, args.threads)
    settings = SstPreprocessSettings.from_config(config)
    provenance = SstProvenance.from_config(config)
    if args.source_url is not None:
        provenance = SstProvenance(provenance.source, args.source_url)
    default_sst, default_mask = sst_raw_paths(config)
    sst_path = Path(args.sst) if args.sst else default_sst
    mask_path = Path(args.mask) if args.mask else default_mask
    out = Path(args.out) if args.out else Path(config.get_str("paths.data")) / "sst.zarr"
    start = time.perf_counter()

    def phase(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)

    path = preprocess_sst(
        sst_path,
        mask_path,
        out,
        settings,
        provenance,
        on_phase=phase,
        progress_bar=not args.no_progress,
    )
    ds = open_sst_store(path, settings)
    a = ds.attrs
    n_weeks, n_lat, n_lon = ds["sst"].shape
    print(
        f"wrote {path}: sst {n_weeks} weeks x {n_lat} x {n_lon} (train {a['n_train_weeks']}, "
        f"test {a['n_test_weeks']}; land {a['land']}, {a['n_ocean_cells']} ocean cells), "
        f"mean {a['mean_degc']:.4f} degC, std {a['std_degc']:.4f} degC, source {a['source']}"
        f"{' (synthetic)' if a['synthetic'] else ''}; {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_rss_mb():.0f} MB"
    )
    return 0
