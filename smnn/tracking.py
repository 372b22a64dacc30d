"""MLflow tracking for every job: where runs go, creating the store once, one run per job.

Where runs go (first match wins):

1. ``mlflow.tracking_uri`` in the config, when not null;
2. the environment variable ``MLFLOW_TRACKING_URI`` (e.g. ``http://mlflow-host:5000`` on a
   cluster, where every job talks to one ``mlflow server``);
3. the default local store ``sqlite:///<paths.results>/mlflow.db`` (absolute path), with
   artifacts under ``<paths.results>/mlartifacts``.

Artifacts go to ``mlflow.artifact_location`` when set, else to ``<paths.results>/mlartifacts``
for a SQLite store, else wherever the server puts them (``--artifacts-destination``). Each paper
experiment has its own MLflow experiment (:func:`mlflow_experiments`) with artifact location
``<artifact root>/<experiment>``.

SQLite and parallel jobs. Several jobs may write to the same SQLite file at once. What can go
wrong and what we do about it:

- Two processes creating the schema (alembic migrations) or the same experiment at the same time
  fail. :func:`init_tracking_store` does both once (``smnn tracking-init``, called by the
  workflow's ``onstart``), under an exclusive file lock, so even hand-started jobs never race.
- A writer waits for another writer's lock. MLflow sets ``PRAGMA busy_timeout = 20000`` on each
  of its sessions; we also put ``timeout=60`` into the SQLite URI (the pysqlite connect timeout)
  so connections MLflow uses outside its sessions (engine inspection, schema checks at store
  start-up) wait as well instead of failing at once.
- SQLite refuses to wait (returns SQLITE_BUSY immediately) when waiting could deadlock, e.g. a
  read transaction that wants to become a write transaction while another process writes. Every
  tracking call here is therefore retried with exponential backoff and jitter when the error
  says the database is locked (:func:`retry_on_lock`).

We keep SQLite's default rollback journal rather than WAL: WAL needs shared memory between the
processes and does not work on the network file systems where ``results/`` lives on a cluster;
use an ``mlflow server`` there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from smnn.config import Config, flatten_config

__all__ = [
    "TOOL_EXPERIMENTS",
    "mlflow_experiments",
    "TrackingTarget",
    "resolve_tracking",
    "init_tracking_store",
    "retry_on_lock",
    "RunTracker",
    "git_commit",
    "job_tags",
]

log = logging.getLogger(__name__)

# MLflow experiments of the jobs that are not paper experiments
TOOL_EXPERIMENTS: tuple[str, ...] = ("benchmark", "standalone")
ENV_VAR = "MLFLOW_TRACKING_URI"
SQLITE_CONNECT_TIMEOUT_S = 60
_LOCK_MESSAGES = ("database is locked", "database table is locked", "sqlite_busy")

T = TypeVar("T")


@dataclass(frozen=True)
class TrackingTarget:
    """Where a job's runs and artifacts go.

    Attributes:
        tracking_uri: the MLflow tracking URI.
        artifact_root: base URI of the experiments' artifact locations, or None to let the
            tracking server choose.
        source: ``"config"``, ``"environment"`` or ``"default"`` (which rule chose the URI).
    """

    tracking_uri: str
    artifact_root: str | None
    source: str

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a ``sqlite:///`` URI, else None."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        return Path(self.tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])

    def artifact_location(self, experiment: str) -> str | None:
        if self.artifact_root is None:
            return None
        return f"{self.artifact_root.rstrip('/')}/{experiment}"


def _with_sqlite_timeout(uri: str) -> str:
    if not uri.startswith("sqlite:") or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_CONNECT_TIMEOUT_S}"


def _as_artifact_uri(location: str) -> str:
    if "://" in location or location.startswith("file:"):
        return location
    return Path(location).resolve().as_uri()


def resolve_tracking(config: Config, environ: Mapping[str, str] | None = None) -> TrackingTarget:
    """The tracking target for ``config`` (precedence in the module docstring)."""
    environ = os.environ if environ is None else environ
    configured = config.get_str("mlflow.tracking_uri", allow_none=True)
    artifacts = config.get_str("mlflow.artifact_location", allow_none=True)
    results = Path(config.get_str("paths.results"))
    if configured:
        uri, source = configured, "config"
    elif environ.get(ENV_VAR):
        uri, source = environ[ENV_VAR], "environment"
    else:
        uri, source = f"sqlite:///{(results / 'mlflow.db').resolve()}", "default"
    uri = _with_sqlite_timeout(uri)
    if artifacts:
        root: str | None = _as_artifact_uri(artifacts)
    elif uri.startswith("sqlite:"):
        root = (results / "mlartifacts").resolve().as_uri()
    else:
        root = None
    return TrackingTarget(uri, root, source)


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(m in text for m in _LOCK_MESSAGES)


def retry_on_lock(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 10,
    base_delay_s: float = 0.1,
    max_delay_s: float = 10.0,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)``, retrying with exponential backoff and jitter while it fails
    because the SQLite database is locked (other errors propagate at once)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not _is_lock_error(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
            delay *= 0.5 + random.random()
            log.warning("tracking store busy (%s); retry %d in %.2f s", exc, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def _store_lock(target: TrackingTarget) -> Iterator[None]:
    """Exclusive inter-process lock next to a SQLite database (no-op for servers).

    The lock file is removed again when the lock is released, so no ``.init-lock`` file is left
    beside the store. A process that locked a file which was removed meanwhile (it waited on the
    old file while the holder deleted it) notices that the path no longer names its file and
    tries again, so two processes never hold the lock at once.
    """
    db = target.sqlite_path
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    path = db.parent / f".{db.name}.init-lock"
    while True:
        handle = open(path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _client(target: TrackingTarget):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=target.tracking_uri)


def _get_or_create_experiment(client, target: TrackingTarget, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = retry_on_lock(client.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry_on_lock(client.restore_experiment, exp.experiment_id)
        return exp.experiment_id
    try:
        return retry_on_lock(
            client.create_experiment, name, artifact_location=target.artifact_location(name)
        )
    except MlflowException as exc:  # another process created it in between
        exp = retry_on_lock(client.get_experiment_by_name, name)
        if exp is None:
            raise exc
        return exp.experiment_id


def mlflow_experiments() -> tuple[str, ...]:
    """The MLflow experiments of the pipeline: one per registered experiment
    (:mod:`smnn.experiments.base`), then ``benchmark`` and ``standalone``."""
    from smnn.experiments.base import experiments

    names = [e.mlflow_experiment for e in experiments().values()]
    return tuple(dict.fromkeys([*names, *TOOL_EXPERIMENTS]))


def init_tracking_store(
    target: TrackingTarget, experiments: tuple[str, ...] | None = None
) -> dict[str, str]:
    """Create the store (schema) and one MLflow experiment per name (default:
    :func:`mlflow_experiments`); idempotent.

    Returns:
        ``{experiment name: experiment id}``.
    """
    if experiments is None:
        experiments = mlflow_experiments()
    with _store_lock(target):
        client = retry_on_lock(_client, target)  # a SQLite store runs its migrations here
        return {name: _get_or_create_experiment(client, target, name) for name in experiments}


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), if any."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def job_tags(
    job: str,
    rule: str | None,
    config_file: str | Path | None = None,
    wildcards: Mapping[str, str] | None = None,
    **extra: str | None,
) -> dict[str, str]:
    """The MLflow tags every job's run carries (None values dropped).

    Args:
        job: what the job does (``train``, ``evaluate``, ``benchmark``, ``standalone`` ...).
        rule: the workflow rule that ran it (``--rule``), or None for a command run by hand
            (tagged ``<job>`` then).
        config_file: the config file the job read.
        wildcards: the rule's wildcards (tagged as JSON, and each one as its own tag).
        extra: more tags (e.g. ``device``, ``config_hash``).
    """
    from smnn import __version__

    commit = git_commit()
    tags: dict[str, str | None] = {
        "smnn.job": job,
        "smnn.rule": rule or job,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "smnn.version": __version__,
        "config_file": None if config_file is None else str(Path(config_file).resolve()),
    }
    if wildcards:
        tags["smnn.wildcards"] = json.dumps(dict(wildcards), sort_keys=True)
        tags.update(wildcards)
    tags.update(extra)
    return {k: str(v) for k, v in tags.items() if v is not None}


class RunTracker:
    """One MLflow run (one pipeline job), with every call retried while SQLite is busy.

    Create with :meth:`start` (new run) or :meth:`resume` (continue a run after a restart).
    """

    def __init__(self, target: TrackingTarget, run_id: str):
        self.target = target
        self.run_id = run_id
        self._client = retry_on_lock(_client, target)

    @classmethod
    def start(
        cls,
        target: TrackingTarget,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> RunTracker:
        """A new run in MLflow experiment ``experiment`` (created when missing)."""
        with _store_lock(target):
            client = retry_on_lock(_client, target)
            experiment_id = _get_or_create_experiment(client, target, experiment)
        all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in (tags or {}).items()}}
        run = retry_on_lock(client.create_run, experiment_id, run_name=run_name, tags=all_tags)
        return cls(target, run.info.run_id)

    @classmethod
    def resume(cls, target: TrackingTarget, run_id: str) -> RunTracker:
        """Continue run ``run_id`` (its status goes back to RUNNING)."""
        tracker = cls(target, run_id)
        retry_on_lock(tracker._client.get_run, run_id)  # fails clearly if it does not exist
        retry_on_lock(tracker._client.update_run, run_id, status="RUNNING")
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as text), in batches of 100 (MLflow's limit per call).

        Re-logging the same value (a resumed run) is skipped; MLflow forbids changing a param.
        """
        from mlflow.entities import Param

        existing = retry_on_lock(self._client.get_run, self.run_id).data.params
        values = {k: str(v)[:6000] for k, v in params.items()}
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:  # e.g. a resumed job given the same settings under other paths
            log.warning("run %s keeps its earlier values of params %s", self.run_id, changed)
        items = [Param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(items), 100):
            retry_on_lock(self._client.log_batch, self.run_id, params=items[i : i + 100])

    def log_config(self, data: Mapping[str, Any]) -> None:
        """The whole configuration as flattened params (``lorenz.train.lr`` ...)."""
        self.log_params(flatten_config(data))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            retry_on_lock(self._client.log_batch, self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (non-finite values are logged as MLflow allows)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            retry_on_lock(self._client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_series(self, key: str, values: list[float], first_step: int) -> None:
        """Log ``values`` as metric ``key`` at steps ``first_step, first_step + 1, ...``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for i in range(0, len(items), 1000):
            retry_on_lock(self._client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def last_logged_step(self, key: str) -> int | None:
        """The largest step of metric ``key`` in this run, or None if never logged."""
        history = retry_on_lock(self._client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=None)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry_on_lock(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        retry_on_lock(self._client.log_text, self.run_id, json.dumps(data, indent=2), artifact_file)

    def log_pytorch_model(self, model: Any, name: str = "model") -> None:
        """``mlflow.pytorch.log_model`` into this run, then end the run FINISHED (FAILED if
        logging fails): call it last. The model is pickled; the requirements are given
        explicitly so MLflow does not start a subprocess to infer them."""
        import mlflow
        import mlflow.pytorch
        import torch

        from smnn import __version__

        mlflow.set_tracking_uri(self.target.tracking_uri)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"smnn=={__version__}"]

        def _log() -> None:
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(
                    model,
                    name=name,
                    pip_requirements=requirements,
                    serialization_format="pickle",
                )

        retry_on_lock(_log)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        retry_on_lock(self._client.set_terminated, self.run_id, status)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """``with RunTracker.start(...) as run:`` ends the run ``FINISHED``, or ``FAILED`` when
        the block raised (the exception propagates)."""
        self.finish("FINISHED" if exc_type is None else "FAILED")
