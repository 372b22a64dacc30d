"""``smnn download-sst``: fetch the NOAA weekly SST file and the land-sea mask."""

from __future__ import annotations

import argparse

from smnn.commands.common import clean_errors, job_config, setup_logging

__all__ = ["add_parser", "run"]


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
    p.add_argument("--config", required=True, help="the pipeline's YAML config file")
    p.add_argument("--only", choices=["sst", "mask"], help="download only one of the two files")
    p.set_defaults(func=run)


@clean_errors
def run(args: argparse.Namespace) -> int:
    from smnn.data.sst.download import download_sst

    setup_logging()
    config = job_config(args.config)
    for result in download_sst(config, only=args.only):
        print(result.summary(), flush=True)
    return 0
