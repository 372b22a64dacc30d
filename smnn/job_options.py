"""Options shared by the commands that also run by hand (``smnn bench``, ``smnn standalone``,
``smnn sst-scaling``): the ``--out`` check and the MLflow flags.

Where the MLflow run goes (:func:`tracking_target`):

- ``--no-mlflow``: nowhere;
- ``--mlflow-uri URI``: there (artifacts beside a SQLite file, else
  ``mlflow.artifact_location`` of the config or the server's choice);
- with ``--config``: :func:`smnn.tracking.resolve_tracking` (``mlflow.tracking_uri``, then
  ``MLFLOW_TRACKING_URI``, then ``<paths.results>/mlflow.db``);
- without ``--config``: ``MLFLOW_TRACKING_URI`` when set, else nowhere.

Every URI goes through :func:`smnn.tracking.resolve_tracking`, the one place that turns a URI
into a tracking target.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from smnn.config import Config
from smnn.tracking import ENV_VAR, TrackingTarget, resolve_tracking

__all__ = ["prepare_output_dir", "add_tracking_arguments", "tracking_target"]


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` (with parents) and check that files can be written into it.

    Raises ValueError naming ``option`` and the problem: the path is an existing file, cannot be
    created, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {out}: cannot create directory ({exc.strerror})") from exc
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {out}: directory is not writable ({exc.strerror})") from exc
    return out


def add_tracking_arguments(parser: argparse.ArgumentParser, experiment: str) -> None:
    """``--rule``, ``--mlflow-uri`` and ``--no-mlflow``."""
    parser.add_argument(
        "--rule", default=None, help=f"workflow rule name, an MLflow tag (default: {experiment})"
    )
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        help=f"MLflow tracking URI, overriding the config and {ENV_VAR} (default: see below)",
    )
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help=f"log no MLflow run (default: one run in experiment {experiment})",
    )


def _uri_target(uri: str, config: Config | None) -> TrackingTarget:
    artifacts = config.raw("mlflow.artifact_location", None) if config is not None else None
    if uri.startswith("sqlite:///"):
        results = str(Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).parent)
    elif config is not None:
        results = config.get_str("paths.results")
    else:
        results = "."
    data = {
        "mlflow": {"tracking_uri": uri, "artifact_location": artifacts},
        "paths": {"results": results},
    }
    return resolve_tracking(Config(data, source="--mlflow-uri"), environ={})


def tracking_target(args: argparse.Namespace, config: Config | None) -> TrackingTarget | None:
    """Where the run goes (module docstring), or None for no run."""
    if args.no_mlflow:
        return None
    if args.mlflow_uri:
        return _uri_target(args.mlflow_uri, config)
    if config is not None:
        return resolve_tracking(config)
    uri = os.environ.get(ENV_VAR)
    return _uri_target(uri, None) if uri else None
