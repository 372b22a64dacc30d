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
use an ``mlflow server`` there (``smnn tracking-server``, docs/cluster.md).

A store that cannot be used stops the job with one line (:class:`TrackingStoreError`, reported
by the commands like every :class:`~smnn.io.StoreError`), naming the store and the remedy
(:func:`check_tracking_store`, run when a run starts and again when a tracking call fails):

- a SQLite file that is damaged (truncated: its header's page count does not fit its size; or
  failing SQLite's ``quick_check`` in ``tracking-init``): restore the backup;
- read-only (the file, or its directory, where SQLite writes its journal): make it writable;
- missing while earlier results exist (run folders under the artifact root, or the backup): a
  store that vanished is reported, never silently replaced by an empty one (``smnn tracking-init
  --new-store`` starts a new history on purpose); deleted while a job runs: said so;
- a server that does not answer ``/health`` (a busy one is asked again for up to two minutes,
  one that refuses the connection three times): start it or fix the URI.

``smnn tracking-init`` checks the whole file (``PRAGMA quick_check``) and then copies it to
``<db>.backup`` (SQLite's online backup, written atomically), the backup those messages name.
Over HTTP, MLflow's client retries every request, POST included, on connection errors and
HTTP 429/5xx with exponential backoff (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7;
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, default 2: waits of about 2, 4, ... 64, 120 s, some four
minutes in all), so a server that restarts within that time loses no run or metric; after that
the job stops with one line (the server is unreachable) and resumes from its checkpoint when
rerun.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from smnn.config import Config, flatten_config
from smnn.io import StoreError

__all__ = [
    "TOOL_EXPERIMENTS",
    "TrackingStoreError",
    "check_tracking_store",
    "backup_path",
    "backup_tracking_store",
    "end_abandoned_runs",
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
BACKUP_SUFFIX = ".backup"
HAND_SUFFIX = "-by-hand"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class TrackingStoreError(StoreError):
    """The MLflow tracking store is missing, damaged, read-only or unreachable (one line: the
    store and the remedy)."""


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
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingStoreError(
            f"cannot create the MLflow store's directory {db.parent}: {exc.strerror or exc}; "
            "point mlflow.tracking_uri at a writable place",
            db,
        ) from None
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


def mlflow_experiments(names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The MLflow experiments of the pipeline: ``names`` (one per registered experiment, given
    by the caller: this module knows no experiment), then ``benchmark`` and ``standalone``."""
    return tuple(dict.fromkeys([*names, *TOOL_EXPERIMENTS]))


def backup_path(target: TrackingTarget) -> Path | None:
    """Where :func:`backup_tracking_store` keeps the copy of a SQLite store (None for servers)."""
    db = target.sqlite_path
    return None if db is None else db.with_name(db.name + BACKUP_SUFFIX)


def _backup_hint(target: TrackingTarget) -> str:
    backup = backup_path(target)
    db = target.sqlite_path
    if backup is not None and backup.is_file():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(backup.stat().st_mtime))
        return f"restore it from the backup made by smnn tracking-init at {when}: cp {backup} {db}"
    return "restore it from your backup"


def _history_evidence(target: TrackingTarget) -> str | None:
    """What shows that runs were recorded before (run folders under the artifact root, the
    backup), or None."""
    backup = backup_path(target)
    if backup is not None and backup.is_file():
        return f"its backup {backup} exists"
    if target.artifact_root and target.artifact_root.startswith("file:"):
        from urllib.parse import unquote, urlparse

        root = Path(unquote(urlparse(target.artifact_root).path))
        if root.is_dir():
            runs = [r for e in root.iterdir() if e.is_dir() for r in e.iterdir() if r.is_dir()]
            if runs:
                return f"{root} holds the artifacts of {len(runs)} earlier run(s)"
    return None


def _sqlite_header_problem(db: Path) -> str | None:
    """A damage visible in the database header (cheap: 100 bytes and the file size), or None."""
    try:
        with open(db, "rb") as f:
            header = f.read(100)
        size = db.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc})"
    if size == 0:
        return None  # an empty file: SQLite makes a new database in it
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "is not an SQLite database (its header is wrong)"
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    n_pages = int.from_bytes(header[28:32], "big")
    valid = header[92:96] == header[24:28]  # the page count is valid for this version
    if page < 512 or size % page:
        return f"is truncated or damaged ({size} bytes, not a whole number of {page}-byte pages)"
    if valid and n_pages and size < n_pages * page:
        return f"is truncated ({size} bytes of the {n_pages * page} its header records)"
    return None


def _sqlite_quick_check(db: Path) -> str | None:
    """SQLite's ``PRAGMA quick_check`` of the whole file (read-only), or None when it passes."""
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"is damaged ({exc})"
    if rows != [("ok",)]:
        found = " ".join(str(r[0]).replace("\n", " ") for r in rows[:3])
        return f"is damaged (SQLite quick_check: {found[:300]})"
    return None


def _server_problem(
    uri: str, timeout_s: float = 10.0, busy_wait_s: float = 120.0, refused_tries: int = 3
) -> str | None:
    """Why the server at ``uri`` cannot be used (None when ``/health`` answers 200).

    A server that is busy (a probe that times out: many jobs starting at once on a small node)
    is asked again until ``busy_wait_s`` have passed; one that refuses the connection is asked
    ``refused_tries`` times a second apart (it may be restarting), so a mistyped URI still
    fails within seconds.
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + busy_wait_s
    refused = 0
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
                if r.status == 200:
                    return None
                return f"answers /health with HTTP {r.status}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
            if timed_out and time.monotonic() < deadline:
                continue
            refused += 1
            if not timed_out and refused < refused_tries:
                time.sleep(1.0)
                continue
            waited = f" after {busy_wait_s:.0f} s of tries" if timed_out else ""
            return f"cannot be reached ({reason}){waited}"


def check_tracking_store(
    target: TrackingTarget,
    *,
    full: bool = False,
    new_store: bool = False,
    running: bool = False,
) -> None:
    """Stop with a :class:`TrackingStoreError` when the store cannot be used (module docstring).

    Args:
        target: the store.
        full: check every page of a SQLite file (``PRAGMA quick_check``), not only its header.
        new_store: a missing SQLite file may be created even though earlier results exist
            (without it: only when none exist).
        running: the job already used the store (a missing file was deleted meanwhile).

    Raises:
        TrackingStoreError: naming the store and the remedy.
    """
    db = target.sqlite_path
    if db is None:
        if target.tracking_uri.startswith(("http://", "https://")):
            problem = _server_problem(target.tracking_uri)
            if problem:
                raise TrackingStoreError(
                    f"MLflow tracking server {target.tracking_uri} ({target.source}) {problem}: "
                    "start it (smnn tracking-server --config CONFIG, docs/cluster.md) or point "
                    f"mlflow.tracking_uri / {ENV_VAR} at a running one",
                    target.tracking_uri,
                )
        return
    if not db.exists():
        evidence = _history_evidence(target)
        if running:
            raise TrackingStoreError(
                f"MLflow tracking store {db} was deleted while this job was running; "
                f"{_backup_hint(target)}, then rerun the job (it resumes from its checkpoint)",
                db,
            )
        if evidence is not None and not new_store:
            raise TrackingStoreError(
                f"MLflow tracking store {db} is missing, but {evidence}"
                f": the run history would be lost; {_backup_hint(target)}, or start a new history "
                "on purpose: smnn tracking-init --config CONFIG --new-store",
                db,
            )
        if not os.access(db.parent if db.parent.exists() else db.parent.parent, os.W_OK):
            raise TrackingStoreError(
                f"MLflow tracking store {db} cannot be created: {db.parent} is read-only; make it "
                "writable or set mlflow.tracking_uri elsewhere",
                db,
            )
        return
    problem = _sqlite_header_problem(db)
    if problem is None and full:
        problem = _sqlite_quick_check(db)
    if problem is not None:
        raise TrackingStoreError(
            f"MLflow tracking store {db} {problem}; {_backup_hint(target)}, or move it aside to "
            f"start a new history (mv {db} {db}.damaged)",
            db,
        )
    for path, what in ((db, "the file"), (db.parent, "its directory (SQLite's journal)")):
        if not os.access(path, os.W_OK):
            raise TrackingStoreError(
                f"MLflow tracking store {db} is read-only ({what} is not writable): make it "
                f"writable (chmod u+w {path}) or set mlflow.tracking_uri to a writable store",
                db,
            )


def _raise_diagnosed(target: TrackingTarget, exc: BaseException, running: bool) -> None:
    """After a failed tracking call: raise a :class:`TrackingStoreError` when the store is the
    cause (``exc`` chained), else return (the caller re-raises ``exc``)."""
    if isinstance(exc, TrackingStoreError):
        raise exc
    text = str(exc).lower()
    try:
        check_tracking_store(target, running=running)
        db = target.sqlite_path
        if db is not None and ("malformed" in text or "not a database" in text):
            check_tracking_store(target, full=True, running=running)
    except TrackingStoreError as diagnosed:
        raise diagnosed from exc
    if target.sqlite_path is not None and "readonly database" in text:
        raise TrackingStoreError(
            f"MLflow tracking store {target.sqlite_path} refused a write ({exc}); it may have been"
            " replaced or made read-only while the job ran: check it, then rerun the job",
            target.sqlite_path,
        ) from exc


def _tracked(target: TrackingTarget, fn: Callable[..., T], *args: Any, running: bool = True,
             **kwargs: Any) -> T:  # fmt: skip
    """``retry_on_lock(fn, ...)``, with a failure caused by the store reported clearly."""
    try:
        return retry_on_lock(fn, *args, **kwargs)
    except Exception as exc:
        _raise_diagnosed(target, exc, running)
        raise


def backup_tracking_store(target: TrackingTarget) -> Path | None:
    """Copy a SQLite store to :func:`backup_path` (SQLite's online backup, consistent while
    others write; written to a temporary file and renamed). None for servers."""
    db, backup = target.sqlite_path, backup_path(target)
    if db is None or backup is None or not db.exists():
        return None
    tmp = backup.with_name(f".{backup.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        os.replace(tmp, backup)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return backup


def init_tracking_store(
    target: TrackingTarget,
    experiments: tuple[str, ...] = (),
    *,
    new_store: bool = False,
    backup: bool = True,
) -> dict[str, str]:
    """Check the store, create it (schema) when missing, create one MLflow experiment per name
    of :func:`mlflow_experiments` (``experiments`` first), and back a SQLite store up;
    idempotent.

    Args:
        experiments: the registered experiments' MLflow experiment names (the caller's).
        new_store: create a missing SQLite store even though earlier results exist.
        backup: copy a SQLite store to :func:`backup_path` afterwards.

    Returns:
        ``{experiment name: experiment id}``.

    Raises:
        TrackingStoreError: the store is damaged, read-only, unreachable, or missing while
            earlier results exist (and not ``new_store``).
    """
    names = mlflow_experiments(tuple(experiments))
    with _store_lock(target):
        check_tracking_store(target, full=True, new_store=new_store)
        client = _tracked(target, _client, target, running=False)  # SQLite: migrations here
        ids = {name: _get_or_create_experiment(client, target, name) for name in names}
    if backup:
        backup_tracking_store(target)
    return ids


def end_abandoned_runs(target: TrackingTarget, runs: list[tuple[str, str]]) -> list[str]:
    """End runs a job gave up (e.g. :attr:`smnn.training.Trainer.abandoned_runs`): status
    KILLED and the tag ``smnn.abandoned`` saying why. Runs that no longer exist or already
    ended are left as they are.

    Returns:
        The ids of the runs ended.
    """
    from mlflow.entities import RunTag

    ended = []
    if not runs:
        return ended
    client = _tracked(target, _client, target, running=False)
    for run_id, why in runs:
        try:
            run = retry_on_lock(client.get_run, run_id)
        except Exception:  # gone (another store, deleted): nothing to end
            continue
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            continue
        _tracked(target, client.log_batch, run_id, tags=[RunTag("smnn.abandoned", why[:5000])])
        _tracked(target, client.set_terminated, run_id, "KILLED")
        ended.append(run_id)
    return ended


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
            (tagged ``<job>`` then, and ``smnn.launched_by`` = ``hand`` instead of
            ``workflow``: :meth:`RunTracker.start` marks such runs' names).
        config_file: the config file the job read.
        wildcards: the rule's wildcards (tagged as JSON, and each one as its own tag).
        extra: more tags (e.g. ``device``, ``config_hash``).
    """
    from smnn import __version__

    commit = git_commit()
    tags: dict[str, str | None] = {
        "smnn.job": job,
        "smnn.rule": rule or job,
        "smnn.launched_by": "workflow" if rule else "hand",
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
        self._client = _tracked(target, _client, target)

    @classmethod
    def start(
        cls,
        target: TrackingTarget,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> RunTracker:
        """A new run in MLflow experiment ``experiment`` (created when missing).

        A run started by hand (tag ``smnn.launched_by`` = ``hand``, see :func:`job_tags`) gets
        ``-by-hand`` appended to its name, so it is told apart from the pipeline's runs.

        Raises:
            TrackingStoreError: the store cannot be used (:func:`check_tracking_store`).
        """
        check_tracking_store(target)
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if tags.get("smnn.launched_by") == "hand" and not run_name.endswith(HAND_SUFFIX):
            run_name += HAND_SUFFIX
        with _store_lock(target):
            client = _tracked(target, _client, target, running=False)
            experiment_id = _get_or_create_experiment(client, target, experiment)
        all_tags = {**tags, "mlflow.runName": run_name}
        run = _tracked(target, client.create_run, experiment_id, run_name=run_name, tags=all_tags)
        return cls(target, run.info.run_id)

    @classmethod
    def resume(cls, target: TrackingTarget, run_id: str) -> RunTracker:
        """Continue run ``run_id`` (its status goes back to RUNNING).

        Raises:
            TrackingStoreError: the store cannot be used (:func:`check_tracking_store`).
        """
        check_tracking_store(target)
        tracker = cls(target, run_id)
        _tracked(target, tracker._client.get_run, run_id)  # fails clearly if it does not exist
        _tracked(target, tracker._client.update_run, run_id, status="RUNNING")
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as text), in batches of 100 (MLflow's limit per call).

        Re-logging the same value (a resumed run) is skipped; MLflow forbids changing a param.
        """
        from mlflow.entities import Param

        existing = _tracked(self.target, self._client.get_run, self.run_id).data.params
        values = {k: str(v)[:6000] for k, v in params.items()}
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:  # e.g. a resumed job given the same settings under other paths
            log.warning("run %s keeps its earlier values of params %s", self.run_id, changed)
        items = [Param(k, v) for k, v in values.items() if k not in existing]
        for i in range(0, len(items), 100):
            _tracked(self.target, self._client.log_batch, self.run_id, params=items[i : i + 100])

    def log_config(self, data: Mapping[str, Any]) -> None:
        """The whole configuration as flattened params (``lorenz.train.lr`` ...)."""
        self.log_params(flatten_config(data))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            _tracked(self.target, self._client.log_batch, self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (non-finite values are logged as MLflow allows)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            _tracked(self.target, self._client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_series(self, key: str, values: list[float], first_step: int) -> None:
        """Log ``values`` as metric ``key`` at steps ``first_step, first_step + 1, ...``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for i in range(0, len(items), 1000):
            _tracked(self.target, self._client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def last_logged_step(self, key: str) -> int | None:
        """The largest step of metric ``key`` in this run, or None if never logged."""
        history = _tracked(self.target, self._client.get_metric_history, self.run_id, key)
        return max((m.step for m in history), default=None)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _tracked(self.target, self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        _tracked(
            self.target,
            self._client.log_text,
            self.run_id,
            json.dumps(data, indent=2),
            artifact_file,
        )

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

        _tracked(self.target, _log)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        _tracked(self.target, self._client.set_terminated, self.run_id, status)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """``with RunTracker.start(...) as run:`` ends the run ``FINISHED``, or ``FAILED`` when
        the block raised (the exception propagates)."""
        self.finish("FINISHED" if exc_type is None else "FAILED")
