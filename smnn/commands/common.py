"""Helpers shared by the job commands: config loading, logging, threads, clean error exits."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from smnn.config import Config, ConfigError, load_config
from smnn.data.kdv.lpsda import KdvFileError
from smnn.data.sst.download import DownloadError
from smnn.data.sst.layout import SstFileError
from smnn.training import CheckpointLocked
from smnn.zarr_io import StoreError

__all__ = ["setup_logging", "job_config", "apply_threads", "clean_errors", "USER_ERRORS"]

# errors caused by the input (config, missing or damaged files, a checkpoint directory in use by
# another job): reported in one line, exit code 2
# (FloatingPointError: a generated trajectory blew up, e.g. an unstable KdV setting)
USER_ERRORS = (
    ConfigError, StoreError, FileNotFoundError, CheckpointLocked, DownloadError, SstFileError,
    KdvFileError, FloatingPointError,
)  # fmt: skip


def setup_logging() -> None:
    """INFO-level logging to stderr (the rule's log file), once per process."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def job_config(path: str | Path) -> Config:
    """Load ``--config`` and validate the whole file (:func:`smnn.config_validation.
    validate_config`: the messages of the workflow's own check, naming every bad key)."""
    from smnn.config_validation import validate_config

    config = load_config(path)
    validate_config(config.data, source=f"configuration {path}")
    return config


def apply_threads(config: Config) -> int:
    """Set torch's intra-op threads from ``threads``; returns the number."""
    n = config.get_int("threads", min_value=1)
    torch.set_num_threads(n)
    return n


def clean_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Report :data:`USER_ERRORS` as ``error: ...`` on stderr with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
