"""Helpers every job command shares: logging, the job's config and run context, clean error
exits.

A job resolves its run context once (:func:`run_context`: the device, the thread count and the
seed) at its edge and passes it down; ``--threads`` (Snakemake's ``{threads}``) overrides the
config's ``threads`` for that job.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smnn.config import Config, ConfigError, load_config
from smnn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "add_job_arguments",
    "setup_logging",
    "job_config",
    "job_settings",
    "apply_threads",
    "RunContext",
    "run_context",
    "clean_errors",
    "peak_rss_mb",
    "user_errors",
]


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` (required) and ``--threads`` (optional), the options of every job."""
    parser.add_argument(
        "--config",
        required=True,
        help="a complete YAML config, e.g. config/config.yaml or the workflow's "
        "results/config/effective.yaml",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads of this job, replacing the config's threads (the workflow passes "
        "Snakemake's {threads})",
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--threads``, ``--max-epochs``, ``--workers``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (config, missing or damaged files, a checkpoint directory in
    use by another job), reported in one line with exit code 2: :class:`smnn.errors.UserError`
    (which every experiment's own errors subclass), Zarr store errors, missing files, a locked
    checkpoint, and FloatingPointError (a generated trajectory blew up, e.g. an unstable KdV
    setting)."""
    from smnn.io import StoreError
    from smnn.training import CheckpointLocked

    return (UserError, StoreError, FileNotFoundError, CheckpointLocked, FloatingPointError)


def setup_logging() -> None:
    """INFO-level logging to stderr (the rule's log file), once per process."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def job_settings(path: str | Path, threads: int | None = None) -> tuple[Config, dict[str, Any]]:
    """Load ``--config``, validate the whole file once (:func:`smnn.config_validation.
    check_config`: the schema, then every experiment's settings with their cross-key checks)
    and return it with the settings of every experiment (name -> frozen settings).

    Args:
        threads: the job's thread count (``--threads``, Snakemake's ``{threads}``); when given
            it replaces the config's ``threads`` for this job.
    """
    from smnn.config_validation import check_config

    config = load_config(path)
    data = dict(config.data)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        data["threads"] = threads
    checked, settings = check_config(data, source=f"configuration {path}")
    return Config(checked, source=config.source), settings


def job_config(path: str | Path, threads: int | None = None) -> Config:
    """The validated config of :func:`job_settings` (without the settings)."""
    return job_settings(path, threads)[0]


def apply_threads(config: Config) -> int:
    """Set torch's intra-op threads from ``threads``; returns the number."""
    import torch

    n = config.get_int("threads", min_value=1)
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class RunContext:
    """What a job resolved once at its start and passes down: device, threads, seed."""

    device: torch.device
    threads: int
    seed: int


def run_context(config: Config) -> RunContext:
    """Resolve the job's run context: torch's threads set, the device chosen
    (:func:`smnn.devices.resolve_device`; a missing GPU is a config error naming ``device``),
    the seed read."""
    from smnn.devices import resolve_device

    threads = apply_threads(config)
    try:
        device = resolve_device(config.get_str("device", choices=("auto", "cpu", "cuda")))
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {exc}") from exc
    return RunContext(device=device, threads=threads, seed=config.get_int("seed", min_value=0))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (``getrusage``; KiB on Linux)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def clean_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Report :func:`user_errors` as ``error: ...`` on stderr with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
