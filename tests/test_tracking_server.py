"""``smnn tracking-server``: a real ``mlflow server`` started the way docs/cluster.md says, jobs
logging to it over HTTP: concurrent writers, a server stopped and restarted mid-run, and the tiny
workflow through the real single-node SLURM (skipped without SLURM unless SMNN_REQUIRE_SLURM=1).

Each test prints its numbers (runs sent, runs recorded, metrics, seconds).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_support import run_smnn, smnn_command, smnn_env, write_config

WRITER = """
import sys, time
from smnn.tracking import RunTracker, TrackingTarget
uri, i, n, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
target = TrackingTarget(uri, None, "test")
run = RunTracker.start(target, "writers", f"writer-{i}", {"smnn.rule": "writer", "writer": str(i)})
run.log_params({"writer": i, "n": n})
for step in range(n):
    run.log_metrics({"value": i * 1000 + step, "half": step / 2}, step=step)
    time.sleep(pause)
run.finish()
print(run.run_id, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``smnn tracking-server`` in a subprocess (as docs/cluster.md starts it)."""

    def __init__(self, tmp_path: Path, config: Path, port: int, cwd: Path | None = None):
        self.cwd = cwd
        self.args = [
            "tracking-server", "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--local-dir", str(tmp_path / "node-local"),
        ]  # fmt: skip
        self.log_path = tmp_path / "server.log"
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self) -> str:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            smnn_command(*self.args), stdout=subprocess.PIPE, stderr=log, text=True,
            env=smnn_env(), cwd=self.cwd,
        )  # fmt: skip
        deadline = time.monotonic() + 660
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("MLflow tracking server: "):
                self.uri = line.split(": ", 1)[1].strip()
                return self.uri
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        pytest.fail(f"tracking server did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stdout.close()
        self.proc = None
        return code


@pytest.fixture
def server(tmp_path):
    config = write_config(tmp_path, {})
    srv = _Server(tmp_path, config, _free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _writer(uri: str, i: int, n: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, uri, str(i), str(n), str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=smnn_env(),
    )  # fmt: skip


def _runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def test_eight_concurrent_writers_over_http_lose_nothing(server):
    n_writers, n_steps = 8, 40
    start = time.monotonic()
    procs = [_writer(server.uri, i, n_steps, 0.0) for i in range(n_writers)]
    outs = [p.communicate(timeout=600) for p in procs]
    seconds = time.monotonic() - start
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    sent = {out.strip().splitlines()[-1] for out, _ in outs}
    client, runs = _runs(server.uri, "writers")
    recorded = {r.info.run_id for r in runs}
    n_metrics = 0
    for r in runs:
        assert r.info.status == "FINISHED"
        i = int(r.data.params["writer"])
        history = client.get_metric_history(r.info.run_id, "value")
        assert sorted((m.step, m.value) for m in history) == [
            (s, float(i * 1000 + s)) for s in range(n_steps)
        ]
        n_metrics += len(history) + len(client.get_metric_history(r.info.run_id, "half"))
    print(
        f"\n8 writers over HTTP: runs sent {len(sent)}, recorded {len(recorded)}; metric values "
        f"sent {n_writers * n_steps * 2}, recorded {n_metrics}; {seconds:.1f} s"
    )
    assert recorded == sent and len(sent) == n_writers
    assert n_metrics == n_writers * n_steps * 2

    # a server gone for good, with few retries: the writer stops, naming it
    env = smnn_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, server.uri, "99", "1000", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    _wait_for_run(server.uri, "writer-99")
    server.stop()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert "TrackingStoreError" in last and server.uri in last and "cannot be reached" in last


def _wait_for_run(uri: str, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, runs = _runs(uri, "writers")
        if any(r.info.run_name == name for r in runs):
            return
        time.sleep(0.3)
    raise AssertionError(f"no run {name} within {timeout} s")


def _wait_for_step(uri: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client, runs = _runs(uri, "writers")
            if runs and any(
                m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "value")
            ):
                return
        except Exception:  # the server is busy starting
            pass
        time.sleep(0.3)
    raise AssertionError(f"no metric at step {step} within {timeout} s")


def test_server_stopped_mid_run_restarts_elsewhere_and_the_writer_finishes(server, tmp_path):
    """The server goes away mid-run and comes back (same port) on a node without its database:
    it starts from the copy on the shared file system and the writer, retrying, loses nothing."""
    results = tmp_path / "results"
    assert (results / "tracking_uri").read_text().strip() == server.uri
    local_db = tmp_path / "node-local" / "mlflow.db"
    n_steps = 30
    start = time.monotonic()
    proc = _writer(server.uri, 3, n_steps, 0.2)
    _wait_for_step(server.uri, 5)
    assert local_db.is_file() and not (results / "mlflow.db").exists()  # node-local database
    assert server.stop() == 0  # the server goes away mid-run ...
    assert (results / "mlflow-server.db").is_file()  # ... copying its database to shared disk
    local_db.unlink()  # another node: no local database
    time.sleep(2.0)
    assert proc.poll() is None  # the writer waits (MLflow's HTTP retries) ...
    server.start()  # ... the server comes back from the shared copy
    out, err = proc.communicate(timeout=600)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, err[-3000:]
    run_id = out.strip().splitlines()[-1]
    client, runs = _runs(server.uri, "writers")
    assert [r.info.run_id for r in runs] == [run_id]
    history = client.get_metric_history(run_id, "value")
    print(
        f"\nserver restarted mid-run: runs sent 1, recorded {len(runs)}; values sent {n_steps}, "
        f"recorded {len(history)}; {seconds:.1f} s"
    )
    assert sorted(m.step for m in history) == list(range(n_steps))
    assert runs[0].info.status == "FINISHED"


def test_cli_stops_with_one_line_when_the_server_is_gone(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    config = write_config(tmp_path, {"mlflow": {"tracking_uri": url}})
    proc = run_smnn("tracking-init", "--config", config)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"MLflow tracking server {url} (config) cannot be reached" in proc.stderr
    assert "smnn tracking-server" in proc.stderr


# ------------------------------------------------------------------ the workflow through SLURM


def _slurm_problem() -> str | None:
    import shutil

    for tool in ("sbatch", "squeue", "sinfo"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (run .ci/slurm-setup.sh as root)"
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if not {"idle", "mix", "alloc", "comp"} & set(states.stdout.split()):
        return f"no usable SLURM node ({states.stdout.split()})"
    return None


@pytest.mark.slow
def test_lorenz_workflow_through_slurm_logs_every_run_to_the_server(tmp_path):
    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("SMNN_REQUIRE_SLURM") == "1":
            pytest.fail(f"SMNN_REQUIRE_SLURM=1 but SLURM is not usable: {problem}")
        pytest.skip(f"SLURM not available: {problem}")
    from pipeline_support import (
        SLURM_CI_PROFILE,
        SLURM_PROFILE,
        TINY_CONFIG,
        failure_report,
        make_workdir,
        run_snakemake,
    )

    work = make_workdir(tmp_path / "work")
    # docs/cluster.md, step 1: the server, started in the workflow's directory
    srv = _Server(tmp_path, TINY_CONFIG, _free_port(), cwd=work)
    uri = srv.start()
    try:
        # step 2 and 3: the URI into the environment, snakemake with the SLURM profile
        env = {"MLFLOW_TRACKING_URI": (work / "results" / "tracking_uri").read_text().strip()}
        assert env["MLFLOW_TRACKING_URI"] == uri
        targets = ["results/lorenz/smnn/eval/metrics.json", "results/lorenz/mnn_dense/model.pt"]
        args = [
            "--profile", str(SLURM_PROFILE), "--profile", str(SLURM_CI_PROFILE),
            "--configfile", str(TINY_CONFIG), "--cores", "1", *targets,
        ]  # fmt: skip
        run = run_snakemake(work, args, timeout=2400, env=env)
        assert run.proc.returncode == 0, failure_report(work, run)
        sent = run.output.count("has been submitted with SLURM jobid")
        client, runs = _runs(uri, "lorenz")
        jobs = {(r.data.tags.get("smnn.job"), r.data.tags.get("solver")) for r in runs}
        print(
            f"\nLorenz through SLURM to the server: SLURM jobs {sent}, MLflow runs recorded "
            f"{len(runs)} ({sorted(jobs)}), {run.seconds:.0f} s"
        )
        assert jobs == {("train", "smnn"), ("evaluate", "smnn"), ("train", "mnn_dense")}
        assert all(r.info.status == "FINISHED" for r in runs)
        assert not (work / "results" / "mlflow.db").exists()  # nothing went to a local store
    finally:
        srv.stop()
