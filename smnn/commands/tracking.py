"""``smnn tracking-init`` and ``smnn tracking-server``: the MLflow store before jobs start, and a
tracking server for clusters.

``tracking-init`` checks the store (a damaged, read-only, unreachable store, or one that vanished
while earlier results exist, stops it with one line naming the store and the remedy), creates it
and the experiments once, and backs a SQLite store up (:mod:`smnn.tracking`).

``tracking-server`` runs ``mlflow server`` in the foreground for the jobs of a cluster: its
backend store (SQLite) on a disk local to the node it runs on, where SQLite's locking works, and
its artifacts on the shared file system (``<paths.results>/mlartifacts`` by default), served to
the jobs through the server. It prints the URI and writes it to ``<paths.results>/tracking_uri``
so jobs can be pointed at it (``export MLFLOW_TRACKING_URI=$(cat results/tracking_uri)``, see
docs/cluster.md). A node-local disk is wiped when the node is given back, so the database is
copied (SQLite's online backup) to ``<paths.results>/mlflow-server.db`` on the shared file system
every ``--backup-every`` seconds and when the server stops (SIGTERM, SIGINT), and copied back from
there when the server starts on a node that has no database yet: a server restarted elsewhere
keeps the history.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from smnn.config import Config, ConfigError, load_config
from smnn.io import StoreError, atomic_write_text
from smnn.jobs import positive_int
from smnn.tracking import (
    TrackingTarget,
    backup_tracking_store,
    check_tracking_store,
    init_tracking_store,
    resolve_tracking,
)

__all__ = ["add_parser", "run", "run_server", "server_paths", "ServerPaths"]

log = logging.getLogger(__name__)

SERVER_COPY_NAME = "mlflow-server.db"
URI_FILE_NAME = "tracking_uri"
DEFAULT_PORT = 5000
DEFAULT_BACKUP_EVERY_S = 300.0
HEALTH_TIMEOUT_S = 600.0  # mlflow server imports slowly on a busy node


def _port(text: str) -> int:
    """A TCP port number (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a port number (0-65535), got {text!r}"
        ) from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (0-65535), got {value}")
    return value


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {value:g}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tracking-init",
        help="check and create the MLflow tracking store and the experiments",
        description=(
            "Check the MLflow store (damaged, read-only, unreachable, or missing while earlier "
            "results exist: one line naming it and the remedy), create it (the SQLite schema for "
            "the default local store) and the experiments, and copy a SQLite store to "
            "<db>.backup. Idempotent; the workflow runs it in onstart so parallel jobs never "
            "race on the schema."
        ),
    )
    p.add_argument("--config", required=True, help="the pipeline's YAML config file")
    p.add_argument(
        "--experiments", nargs="*", default=[], metavar="NAME",
        help="MLflow experiments to create besides benchmark and standalone (the workflow "
        "passes the registered experiments)",
    )  # fmt: skip
    p.add_argument(
        "--new-store", action="store_true",
        help="create a missing SQLite store although earlier results exist (a new run history)",
    )  # fmt: skip
    p.set_defaults(func=run)

    s = subparsers.add_parser(
        "tracking-server",
        help="run an MLflow tracking server for cluster jobs (database on a local disk)",
        description=(
            "Run `mlflow server` in the foreground: the backend store (SQLite) on a disk local "
            "to this node, the artifacts on the shared file system, the URI printed and written "
            f"to <paths.results>/{URI_FILE_NAME}. The database is copied to "
            f"<paths.results>/{SERVER_COPY_NAME} regularly and on exit, and restored from there "
            "on a node without one. Stop it with Ctrl-C or SIGTERM. See docs/cluster.md."
        ),
    )
    s.add_argument("--config", required=True, help="the pipeline's YAML config file")
    s.add_argument(
        "--host", default="0.0.0.0",
        help="address to listen on (default 0.0.0.0: reachable from the compute nodes)",
    )  # fmt: skip
    s.add_argument(
        "--port", type=_port, default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0: any free port)",
    )  # fmt: skip
    s.add_argument(
        "--local-dir", default=None,
        help="node-local directory for the database (default: $SLURM_TMPDIR, else $TMPDIR, "
        "else /tmp, in smnn-mlflow-<user>)",
    )  # fmt: skip
    s.add_argument(
        "--artifacts", default=None,
        help="artifact directory on the shared file system (default: mlflow.artifact_location, "
        "else <paths.results>/mlartifacts)",
    )  # fmt: skip
    s.add_argument(
        "--backup-every", type=_seconds, default=DEFAULT_BACKUP_EVERY_S, metavar="SECONDS",
        help=f"copy the database to the shared file system this often (default "
        f"{DEFAULT_BACKUP_EVERY_S:g})",
    )  # fmt: skip
    s.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="server worker processes (default 1: one process, whose thread pool serves the "
        "jobs' requests; more starts uvicorn's multi-process supervisor, whose health pings "
        "were seen to stall the server on a fully loaded small node)",
    )
    s.set_defaults(func=run_server)


def _load(path: str) -> Config:
    from smnn.config_validation import validate_config

    config = load_config(path)
    validate_config(config.data, source=f"configuration {path}")
    return config


def _one_line_errors(fn):
    """Report config and store errors as one ``error: ...`` line with exit code 2."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ConfigError, StoreError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_one_line_errors
def run(args: argparse.Namespace) -> int:
    """``smnn tracking-init``."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = _load(args.config)
    target = resolve_tracking(config)
    ids = init_tracking_store(target, tuple(args.experiments), new_store=args.new_store)
    print(f"MLflow tracking URI ({target.source}): {target.tracking_uri}")
    if target.artifact_root:
        print(f"artifact root: {target.artifact_root}")
    if target.sqlite_path is not None:
        print(f"backup: {target.sqlite_path}.backup")
    for name, exp_id in ids.items():
        print(f"  experiment {name}: id {exp_id}")
    return 0


# ------------------------------------------------------------------ the server


@dataclass(frozen=True)
class ServerPaths:
    """Where a tracking server keeps things.

    Attributes:
        local_db: the SQLite database on the node-local disk.
        shared_copy: its copy on the shared file system.
        artifacts: the artifact directory (shared file system).
        uri_file: the file the server's URI is written to.
    """

    local_db: Path
    shared_copy: Path
    artifacts: Path
    uri_file: Path


def server_paths(
    config: Config, local_dir: str | None = None, artifacts: str | None = None
) -> ServerPaths:
    """The :class:`ServerPaths` of ``smnn tracking-server`` for ``config`` (defaults in the
    command's help)."""
    results = Path(config.get_str("paths.results")).resolve()
    if local_dir is None:
        base = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
        user = os.environ.get("USER") or str(os.getuid())
        local = Path(base) / f"smnn-mlflow-{user}"
    else:
        local = Path(local_dir).resolve()
    configured = config.get_str("mlflow.artifact_location", allow_none=True)
    art = Path(artifacts or configured or results / "mlartifacts").resolve()
    return ServerPaths(
        local / "mlflow.db", results / SERVER_COPY_NAME, art, results / URI_FILE_NAME
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind(("" if host == "0.0.0.0" else host, 0))
        return s.getsockname()[1]


def _public_host(host: str) -> str:
    return socket.getfqdn() if host in ("0.0.0.0", "::", "") else host


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _sqlite_target(db: Path) -> TrackingTarget:
    return TrackingTarget(f"sqlite:///{db}", None, "tracking-server")


@_one_line_errors
def run_server(args: argparse.Namespace) -> int:
    """``smnn tracking-server``: run until SIGTERM/SIGINT; exit 0 then, the server's exit code
    when it dies on its own."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = _load(args.config)
    paths = server_paths(config, args.local_dir, args.artifacts)
    paths.local_db.parent.mkdir(parents=True, exist_ok=True)
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    local = _sqlite_target(paths.local_db)
    if not paths.local_db.exists() and paths.shared_copy.exists():
        check_tracking_store(_sqlite_target(paths.shared_copy), full=True)
        shutil.copyfile(paths.shared_copy, paths.local_db)
        print(f"restored the database from {paths.shared_copy}", flush=True)
    if paths.local_db.exists():
        check_tracking_store(local, full=True)
    port = args.port or _free_port(args.host)
    uri = f"http://{_public_host(args.host)}:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", local.tracking_uri,
        "--artifacts-destination", str(paths.artifacts),
        "--host", args.host, "--port", str(port), "--workers", str(args.workers),
    ]  # fmt: skip
    stop: list[int] = []

    def on_signal(signum, frame) -> None:
        stop.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # the server's own output (access logs) goes to stderr: stdout carries only this command's
    # lines (the URI), so a caller that reads the URI and stops reading never blocks the server
    proc = subprocess.Popen(command, start_new_session=True, stdout=sys.stderr)
    try:
        local_uri = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{port}"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not _healthy(local_uri):
            if proc.poll() is not None:
                raise StoreError(
                    f"mlflow server exited with code {proc.returncode} before answering "
                    f"(port {port} in use? its messages are above)",
                    paths.local_db,
                )
            if stop or time.monotonic() > deadline:
                if not stop:
                    raise StoreError(
                        f"mlflow server did not answer {local_uri}/health within "
                        f"{HEALTH_TIMEOUT_S:g} s",
                        paths.local_db,
                    )
                return 0
            time.sleep(0.3)
        atomic_write_text(uri + "\n", paths.uri_file)
        print(f"MLflow tracking server: {uri}", flush=True)
        print(f"  database (node-local): {paths.local_db}", flush=True)
        print(f"  copy (shared):         {paths.shared_copy}", flush=True)
        print(f"  artifacts (shared):    {paths.artifacts}", flush=True)
        print(f"  jobs: export MLFLOW_TRACKING_URI=$(cat {paths.uri_file})", flush=True)
        next_backup = time.monotonic() + args.backup_every
        while not stop and proc.poll() is None:
            time.sleep(0.2)
            if time.monotonic() >= next_backup:
                backup_tracking_store(local)
                _publish_backup(paths)
                next_backup = time.monotonic() + args.backup_every
        return 0 if stop else int(proc.returncode or 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if paths.local_db.exists():
            backup_tracking_store(local)
            _publish_backup(paths)
            print(f"database copied to {paths.shared_copy}", flush=True)
        for s, h in previous.items():
            signal.signal(s, h)


def _publish_backup(paths: ServerPaths) -> None:
    """Move the fresh local backup (``<local_db>.backup``) to the shared copy atomically."""
    fresh = paths.local_db.with_name(paths.local_db.name + ".backup")
    if not fresh.exists():
        return
    tmp = paths.shared_copy.with_name(f".{paths.shared_copy.name}.tmp-{os.getpid()}")
    shutil.copyfile(fresh, tmp)
    os.replace(tmp, paths.shared_copy)
