"""``smnn generate-lorenz``: integrate the Lorenz system into a Zarr store."""

from __future__ import annotations

import argparse
import time

from smnn.data.lorenz import write_lorenz_store
from smnn.jobs import add_job_arguments, clean_errors, job_settings, setup_logging

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate-lorenz",
        help="generate the Lorenz trajectory (scipy) into a Zarr v3 store",
        description="Integrate the Lorenz system with the settings of lorenz.data and the "
        "global seed (noise), and write the store atomically.",
    )
    add_job_arguments(p)
    p.add_argument("--out", required=True, help="the store to write, e.g. data/lorenz.zarr")
    p.set_defaults(func=run)


@clean_errors
def run(args: argparse.Namespace) -> int:
    setup_logging()
    config, settings = job_settings(args.config, args.threads)
    params = settings["lorenz"].data
    seed = config.get_int("seed", min_value=0)
    start = time.perf_counter()
    path = write_lorenz_store(params, seed, args.out)
    print(
        f"wrote {path}: {params.n_points} points, dt {params.dt}, noise {params.noise} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
