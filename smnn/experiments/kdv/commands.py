"""``smnn generate-kdv`` and ``smnn import-kdv``: the KdV data stages before training.

- ``generate-kdv`` solves the seeded LPSDA "easy" distribution (``kdv.generate``, ``seed``,
  ``threads``) into the Zarr store ``data/kdv.zarr`` with Dask: a line per phase on stdout, a
  log line per block done (stderr), and a closing line with the trajectories, wall time and
  peak memory.
- ``import-kdv`` imports LPSDA's HDF5 files (``kdv.lpsda``; ``--directory`` overrides
  ``kdv.lpsda.directory``) into the same layout.

Errors in the inputs (config, a missing or malformed HDF5 file, refused all-zero trajectories,
an unreachable Dask scheduler) are one ``error: ...`` line with exit code 2; the store is written
atomically, so a failed run leaves the previous store (if any) untouched.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from smnn.jobs import add_job_arguments, clean_errors, job_config, peak_rss_mb, setup_logging

__all__ = ["add_parser", "run_generate", "run_import"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate-kdv",
        help="generate the KdV data set (LPSDA 'easy' distribution) into the Zarr store",
        description="Solve u_t = -u u_x - u_xxx for the seeded random trajectories of "
        "kdv.generate (batched pseudo-spectral ETDRK4, or scipy Radau) in Dask blocks and "
        "write train, valid and test into one Zarr v3 store atomically.",
    )
    add_job_arguments(p)
    p.add_argument("--out", default=None, help="the store (default: {paths.data}/kdv.zarr)")
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser(
        "import-kdv",
        help="import LPSDA's KdV HDF5 files into the Zarr store",
        description="Check LPSDA's three HDF5 files (kdv.lpsda.files in kdv.lpsda.directory), "
        "drop or refuse all-zero trajectories (kdv.lpsda.zero_trajectories) and write train, "
        "valid and test into one Zarr v3 store atomically, with the files' sha256.",
    )
    add_job_arguments(p)
    p.add_argument("--out", default=None, help="the store (default: {paths.data}/kdv.zarr)")
    p.add_argument(
        "--directory",
        default=None,
        help="where the HDF5 files are (default: kdv.lpsda.directory; null there: "
        "{paths.data}/raw/kdv)",
    )
    p.set_defaults(func=run_import)


def _out_path(args: argparse.Namespace, config) -> Path:
    return Path(args.out) if args.out else Path(config.get_str("paths.data")) / "kdv.zarr"


def _closing_line(path: Path, start: float) -> str:
    from smnn.data.kdv import open_kdv_store

    ds = open_kdv_store(path)
    a = ds.attrs
    n, n_kept, n_x = ds["u"].shape
    return (
        f"wrote {path}: {n} trajectories (train {a['n_train']}, valid {a['n_valid']}, test "
        f"{a['n_test']}) x {n_kept} times x {n_x} points, source {a['source']}; "
        f"{time.perf_counter() - start:.1f} s, peak RSS {peak_rss_mb():.0f} MB"
    )


def _phase_printer(start: float) -> Callable[[str], None]:
    def phase(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)

    return phase


@clean_errors
def run_generate(args: argparse.Namespace) -> int:
    from smnn.data.kdv.generate import KdvGenerateSettings, generate_kdv

    setup_logging()
    config = job_config(args.config, args.threads)
    settings = KdvGenerateSettings.from_config(config)
    out = _out_path(args, config)
    start = time.perf_counter()
    path = generate_kdv(out, settings, on_phase=_phase_printer(start))
    print(_closing_line(path, start), flush=True)
    return 0


@clean_errors
def run_import(args: argparse.Namespace) -> int:
    from smnn.data.kdv.lpsda import KdvLpsdaSettings, import_lpsda

    setup_logging()
    config = job_config(args.config, args.threads)
    settings = KdvLpsdaSettings.from_config(config, directory=args.directory)
    out = _out_path(args, config)
    start = time.perf_counter()
    path = import_lpsda(out, settings, on_phase=_phase_printer(start))
    print(_closing_line(path, start), flush=True)
    return 0
