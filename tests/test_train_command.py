"""Faults around `smnn train`, through the real CLI, real processes and a real MLflow store:

- a second `smnn train` on the same --out stops at once, naming the first one's pid, and leaves
  the first one's checkpoints and MLflow run alone;
- a truncated last.pt does not crash-loop a requeued job: it resumes from previous.pt, warns
  naming the bad file, and says so in the MLflow run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pipeline_support import run_smnn, smnn_command, smnn_env, train_args, write_config

from smnn.config import load_config
from smnn.tracking import resolve_tracking

pytestmark = pytest.mark.slow

OVERRIDE = {"lorenz": {"train": {"cycles": 1, "epochs_per_cycle": 400}}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_command")
    config = write_config(root, OVERRIDE)
    data = root / "data" / "lorenz.zarr"
    proc = run_smnn("generate-lorenz", "--config", config, "--out", data)
    assert proc.returncode == 0, proc.stderr
    assert run_smnn("tracking-init", "--config", config).returncode == 0
    return root, config, data


def _wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_second_train_on_the_same_out_stops_naming_the_first(setup):
    root, config, data = setup
    out = root / "results" / "lorenz" / "locked"
    first = subprocess.Popen(
        smnn_command(*train_args(config, data, out)),
        env=smnn_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), what="a first checkpoint")
        run_file = json.loads((out / "checkpoints" / "run.json").read_text())
        second = run_smnn(*train_args(config, data, out))
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr, second.stderr
        assert str(out / "checkpoints") in second.stderr, second.stderr
        # nothing of the first job was touched: same run id, it keeps training
        assert json.loads((out / "checkpoints" / "run.json").read_text()) == run_file
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


def test_truncated_checkpoint_resumes_from_the_previous_one(setup):
    root, config, data = setup
    import torch

    out = root / "results" / "lorenz" / "truncated"
    # a job interrupted (SIGTERM) after two checkpoints (a finished job discards its own)
    first = subprocess.Popen(
        smnn_command(*train_args(config, data, out)),
        env=smnn_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (out / "checkpoints" / "previous.pt").exists(), what="two checkpoints")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    info = json.loads((out / "checkpoints" / "run.json").read_text())
    previous = out / "checkpoints" / "previous.pt"
    epochs = int(torch.load(previous, weights_only=False)["epoch"]) + 2
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut last.pt to half

    again = run_smnn(*train_args(config, data, out, "smnn", "--max-epochs", str(epochs)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "last.pt" in again.stderr and "warning" in again.stderr.lower(), again.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert len(metrics["history"]) == epochs
    assert not (out / "checkpoints").exists()  # the finished job discarded its checkpoints
    assert metrics["run_id"] == info["run_id"]  # the same MLflow run continued

    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking(load_config(config)).tracking_uri)
    tags = client.get_run(info["run_id"]).data.tags
    assert "last.pt" in tags["checkpoint_recovery"], tags
    assert Path(tags["recovered_from"]).name == "previous.pt", tags
