"""MLflow tracking: target precedence, a real tracking server, parallel jobs on one SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pipeline_support import run_smnn, smnn_command, smnn_env, train_args, write_config

from smnn.config import Config, load_config
from smnn.experiments.base import experiments
from smnn.tracking import (
    RunTracker,
    init_tracking_store,
    mlflow_experiments,
    resolve_tracking,
    retry_on_lock,
)


def _config(tracking_uri=None, artifact_location=None, results="res") -> Config:
    return Config(
        {
            "paths": {"results": results},
            "mlflow": {"tracking_uri": tracking_uri, "artifact_location": artifact_location},
        },
        "test.yaml",
    )


# ------------------------------------------------------------------ where runs go


def test_tracking_target_precedence(tmp_path):
    results = tmp_path / "res"
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    # 1. the config value wins over the environment
    t = resolve_tracking(_config("http://config-host:5000", results=str(results)), env)
    assert (t.tracking_uri, t.source, t.artifact_root) == (
        "http://config-host:5000",
        "config",
        None,
    )
    # 2. a null config value: the environment
    t = resolve_tracking(_config(None, results=str(results)), env)
    assert (t.tracking_uri, t.source) == ("http://mlflow.example:5000", "environment")
    # 3. neither: the default SQLite store under paths.results, with a busy timeout
    t = resolve_tracking(_config(None, results=str(results)), {})
    assert t.source == "default"
    assert t.tracking_uri == f"sqlite:///{results.resolve()}/mlflow.db?timeout=60"
    assert t.sqlite_path == results.resolve() / "mlflow.db"
    assert t.artifact_root == (results / "mlartifacts").resolve().as_uri()
    assert t.artifact_location("lorenz").endswith("/mlartifacts/lorenz")
    # an explicit artifact location is used for every experiment
    t = resolve_tracking(_config(None, "s3://bucket/smnn", results=str(results)), {})
    assert t.artifact_location("kdv") == "s3://bucket/smnn/kdv"


def test_init_store_is_idempotent_and_creates_every_experiment(tmp_path):
    target = resolve_tracking(_config(results=str(tmp_path)), {})
    registered = tuple(e.mlflow_experiment for e in experiments().values())
    first = init_tracking_store(target, registered)
    second = init_tracking_store(target, registered)
    assert set(first) == set(mlflow_experiments(registered)) and first == second
    # one MLflow experiment per registered experiment, none ahead of its code
    assert set(first) == {"lorenz", "sst", "kdv", "benchmark", "standalone"}
    assert set(init_tracking_store(target)) == {"benchmark", "standalone"}
    assert (tmp_path / "mlflow.db").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no lock left
    assert (tmp_path / "mlflow.db.backup").is_file()
    tracker = RunTracker.start(target, "standalone", "probe", {"k": "v"})
    tracker.log_params({"a": 1, "b": "x"})
    tracker.log_params({"a": 1})  # re-logging the same value is fine (resumed runs)
    tracker.log_metrics({"m": 2.5}, step=3)
    assert tracker.last_logged_step("m") == 3
    assert tracker.last_logged_step("never") is None
    tracker.finish()
    from mlflow import MlflowClient

    run = MlflowClient(target.tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1", "b": "x"}
    assert run.info.experiment_id == first["standalone"]


def test_retry_on_lock_retries_only_lock_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry_on_lock(flaky, base_delay_s=0.001) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise RuntimeError("no such table: runs")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        retry_on_lock(broken, base_delay_s=0.001)
    assert len(calls) == 1

    def always_locked():
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="locked"):
        retry_on_lock(always_locked, attempts=3, base_delay_s=0.001)


# ------------------------------------------------------------------ a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a temporary SQLite backend; yields its URL."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        env=smnn_env(),
        start_new_session=True,  # its own process group: stopped with its workers below
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_training_job_logs_to_a_server_via_environment(tmp_path, mlflow_server):
    config = write_config(tmp_path, {"lorenz": {"train": {"cycles": 1, "epochs_per_cycle": 2}}})
    data = tmp_path / "data" / "lorenz.zarr"
    assert run_smnn("generate-lorenz", "--config", config, "--out", data).returncode == 0
    env = smnn_env(MLFLOW_TRACKING_URI=mlflow_server)
    out = tmp_path / "results" / "lorenz" / "smnn"
    proc = run_smnn(*train_args(config, data, out, "smnn", "--rule", "train_lorenz"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((out / "train_metrics.json").read_text())
    # the environment won over the (null) config value: no local store was created
    assert not (tmp_path / "results" / "mlflow.db").exists()

    api = f"{mlflow_server}/api/2.0/mlflow"
    query = urllib.parse.urlencode({"experiment_name": "lorenz"})
    exp = _get_json(f"{api}/experiments/get-by-name?{query}")["experiment"]
    runs = _post_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [train["run_id"]]
    run = _get_json(f"{api}/runs/get?run_id={train['run_id']}")["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["final_train_loss"] == pytest.approx(train["final_metrics"]["final_train_loss"])
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["lorenz.train.lr"] == "0.001" and params["seed"] == "0"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["solver"] == "smnn" and tags["smnn.rule"] == "train_lorenz"
    history = _get_json(
        f"{api}/metrics/get-history?run_id={train['run_id']}&metric_key=train_loss"
    )["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1]
    artifacts = _get_json(f"{api}/artifacts/list?run_id={train['run_id']}").get("files", [])
    assert "train_metrics.json" in {a["path"] for a in artifacts}


# ------------------------------------------------------------------ parallel jobs, one SQLite file


def test_four_parallel_jobs_share_the_default_sqlite_store(tmp_path):
    # short epochs, so the four processes write to the store many times per second
    override = {"lorenz": {"train": {"cycles": 2, "epochs_per_cycle": 10, "max_windows": 32}}}
    config = write_config(tmp_path, override)
    data = tmp_path / "data" / "lorenz.zarr"
    assert run_smnn("generate-lorenz", "--config", config, "--out", data).returncode == 0
    assert run_smnn("tracking-init", "--config", config).returncode == 0
    outs = [tmp_path / "results" / "lorenz" / f"job{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            smnn_command(*train_args(config, data, out)),
            env=smnn_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]

    from mlflow import MlflowClient

    target = resolve_tracking(load_config(config))
    assert target.source == "default"
    client = MlflowClient(target.tracking_uri)
    exp = client.get_experiment_by_name("lorenz")
    runs = client.search_runs([exp.experiment_id])
    run_ids = {json.loads((o / "train_metrics.json").read_text())["run_id"] for o in outs}
    assert {r.info.run_id for r in runs} == run_ids and len(run_ids) == 4
    for r in runs:
        assert r.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss"))
        assert steps == list(range(20))
        assert "final_train_loss" in r.data.metrics
    # same config and seed: the four jobs computed the same thing
    finals = {round(r.data.metrics["final_train_loss"], 12) for r in runs}
    assert len(finals) == 1
    assert Path(target.sqlite_path).is_file()


# ------------------------------------------------------------------ a store that cannot be used


def _store(tmp_path: Path, config: Path | None = None):
    """A default SQLite store with one finished run (artifacts on disk) and its backup."""
    if config is None:
        target = resolve_tracking(_config(results=str(tmp_path)), {})
    else:
        target = resolve_tracking(load_config(config), {})
    init_tracking_store(target, ("lorenz",))
    with RunTracker.start(target, "lorenz", "r", {"smnn.rule": "x"}) as run:
        run.log_metrics({"m": 1.0})
        run.log_dict({"a": 1}, "a.json")
    return target


def _one_line(proc) -> str:
    """The stderr of a command that failed cleanly: exit 2, one ``error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _cli_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {})


def test_truncated_store_stops_with_one_line_naming_the_backup(tmp_path):
    from smnn.tracking import TrackingStoreError

    config = _cli_config(tmp_path)
    target = resolve_tracking(load_config(config), {})
    init_tracking_store(target)
    with RunTracker.start(target, "lorenz", "r", {}) as run:
        run.log_metrics({"m": 1.0})
    db = target.sqlite_path
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size * 2 // 3 + 100)
    line = _one_line(run_smnn("tracking-init", "--config", config))
    assert str(db) in line and "truncated" in line and f"cp {db}.backup {db}" in line
    with pytest.raises(TrackingStoreError, match="truncated"):
        RunTracker.start(target, "lorenz", "again", {})
    # the remedy works: the backup is a whole database (made before the run above)
    import sqlite3

    with sqlite3.connect(db.parent / "mlflow.db.backup") as con:
        assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*) FROM experiments").fetchone()[0] >= 2


def test_damaged_page_inside_the_store_is_found_by_tracking_init(tmp_path):
    config = _cli_config(tmp_path)
    target = resolve_tracking(load_config(config), {})
    init_tracking_store(target)
    db = target.sqlite_path
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for i in range(page + 8, 3 * page):  # wipe pages 2 and 3 (same size: the header is fine)
        data[i] = 0xFF
    db.write_bytes(bytes(data))
    line = _one_line(run_smnn("tracking-init", "--config", config))
    assert str(db) in line and "damaged" in line and "backup" in line


def _make_read_only(path: Path) -> None:
    if os.geteuid() == 0:  # root writes anything with mode 0444: make the file immutable
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=False)
    path.chmod(0o644)


def test_read_only_store_stops_with_one_line(tmp_path):
    config = _cli_config(tmp_path)
    target = resolve_tracking(load_config(config), {})
    init_tracking_store(target)
    db = target.sqlite_path
    try:
        _make_read_only(db)
        line = _one_line(run_smnn("tracking-init", "--config", config))
    finally:
        _make_writable(db)
    assert str(db) in line and "read-only" in line and "chmod u+w" in line


def test_store_that_vanished_while_results_exist_is_not_replaced(tmp_path):
    from smnn.tracking import TrackingStoreError

    config = _cli_config(tmp_path)
    target = _store(tmp_path, config)
    db = target.sqlite_path
    db.unlink()
    with pytest.raises(TrackingStoreError) as info:
        RunTracker.start(target, "lorenz", "r2", {})
    message = str(info.value)
    assert f"{db} is missing" in message and "backup" in message and "--new-store" in message
    assert not db.exists()  # not silently replaced by an empty store
    # no backup either: the artifacts of the earlier run still tell
    (db.parent / "mlflow.db.backup").unlink()
    with pytest.raises(TrackingStoreError, match="artifacts of 1 earlier run"):
        init_tracking_store(target)
    # a new history only on purpose
    proc = run_smnn("tracking-init", "--config", config, "--new-store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert db.exists()


def test_store_deleted_while_a_job_runs_says_so(tmp_path):
    from smnn.tracking import TrackingStoreError

    target = _store(tmp_path)
    run = RunTracker.start(target, "lorenz", "r2", {})
    run.log_metrics({"m": 1.0}, step=0)
    target.sqlite_path.unlink()
    with pytest.raises(TrackingStoreError, match="was deleted while this job was running"):
        run.log_metrics({"m": 2.0}, step=1)


def test_unreachable_server_is_one_line(tmp_path):
    from smnn.tracking import TrackingStoreError

    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    target = resolve_tracking(_config(tracking_uri=url, results=str(tmp_path)), {})
    with pytest.raises(TrackingStoreError, match=r"cannot be reached.*smnn tracking-server"):
        RunTracker.start(target, "lorenz", "r", {})
    config = write_config(tmp_path, {"mlflow": {"tracking_uri": url}})
    line = _one_line(run_smnn("tracking-init", "--config", config))
    assert url in line and "cannot be reached" in line


def test_abandoned_runs_are_ended_with_the_reason(tmp_path):
    from mlflow import MlflowClient

    from smnn.tracking import end_abandoned_runs

    target = _store(tmp_path)
    run = RunTracker.start(target, "lorenz", "lost", {})  # stays RUNNING: its job lost its files
    done = RunTracker.start(target, "lorenz", "done", {})
    done.finish()
    ended = end_abandoned_runs(
        target, [(run.run_id, "no checkpoint could be loaded"), (done.run_id, "x"), ("nope", "y")]
    )
    assert ended == [run.run_id]
    client = MlflowClient(target.tracking_uri)
    info = client.get_run(run.run_id)
    assert info.info.status == "KILLED"
    assert info.data.tags["smnn.abandoned"] == "no checkpoint could be loaded"
    assert client.get_run(done.run_id).info.status == "FINISHED"


def test_runs_started_by_hand_have_their_own_names(tmp_path):
    from smnn.tracking import job_tags

    target = _store(tmp_path)
    by_hand = RunTracker.start(target, "lorenz", "lorenz-smnn-train", job_tags("train", None))
    piped = RunTracker.start(target, "lorenz", "lorenz-smnn-train", job_tags("train", "train"))
    from mlflow import MlflowClient

    client = MlflowClient(target.tracking_uri)
    assert client.get_run(by_hand.run_id).info.run_name == "lorenz-smnn-train-by-hand"
    assert client.get_run(piped.run_id).info.run_name == "lorenz-smnn-train"
    assert client.get_run(by_hand.run_id).data.tags["smnn.launched_by"] == "hand"
