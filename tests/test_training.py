"""The shared training loop through the real CLI: checkpoints, resume after SIGTERM and SIGKILL.

Each scenario trains the same tiny Lorenz configuration; an interrupted run, restarted, must end
with exactly the history and coefficients of the uninterrupted one, in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_support import run_smnn, smnn_command, smnn_env, train_args, write_config

from smnn.config import load_config
from smnn.tracking import resolve_tracking
from smnn.training import (
    Trainer,
    TrainerSettings,
    TrainingInterrupted,
    seed_everything,
)

# 2 cycles x 12 epochs x 3 steps: long enough to be killed in the middle
OVERRIDE = {"lorenz": {"train": {"cycles": 2, "epochs_per_cycle": 12}}}
N_EPOCHS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, data and one uninterrupted reference run, shared by the scenarios."""
    root = tmp_path_factory.mktemp("training")
    config = write_config(root, OVERRIDE)
    data = root / "data" / "lorenz.zarr"
    proc = run_smnn("generate-lorenz", "--config", config, "--out", data)
    assert proc.returncode == 0, proc.stderr
    proc = run_smnn("tracking-init", "--config", config)
    assert proc.returncode == 0, proc.stderr
    ref = root / "results" / "lorenz" / "reference"
    proc = run_smnn(*train_args(config, data, ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, config, data, json.loads((ref / "train_metrics.json").read_text())


def _client(config: Path):
    from mlflow import MlflowClient

    return MlflowClient(resolve_tracking(load_config(config)).tracking_uri)


def _checkpoint_epoch(out: Path) -> int:
    """Epochs completed in the last checkpoint (-1 when there is none yet)."""
    path = out / "checkpoints" / "last.pt"
    if not path.exists():
        return -1
    try:
        return int(torch.load(path, weights_only=False)["epoch"])
    except Exception:  # replaced while reading
        return -1


def _checkpoint_pair_at_rest(out: Path) -> bool:
    """``last.pt`` and ``previous.pt`` are two files (not the one inode they share between a
    save's rotation and its rename, when damaging one in place would damage both) holding
    checkpoints of two different epochs."""
    last = out / "checkpoints" / "last.pt"
    previous = last.with_name("previous.pt")
    try:
        if os.path.samefile(last, previous):
            return False
        epochs = [int(torch.load(p, weights_only=False)["epoch"]) for p in (last, previous)]
    except Exception:  # missing or replaced while reading
        return False
    return epochs[1] < epochs[0]


def _start_and_kill(config: Path, data: Path, out: Path, sig: int, after_epochs: int):
    """Start a training process and send ``sig`` once ``after_epochs`` epochs are saved."""
    proc = subprocess.Popen(
        smnn_command(*train_args(config, data, out)),
        env=smnn_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while _checkpoint_epoch(out) < after_epochs:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def _assert_same_as_reference(reference: dict, resumed: dict) -> None:
    ref_loss = [r["train_loss"] for r in reference["history"]]
    new_loss = [r["train_loss"] for r in resumed["history"]]
    assert len(new_loss) == len(ref_loss) == N_EPOCHS
    np.testing.assert_allclose(new_loss, ref_loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(resumed["step_losses"], reference["step_losses"], rtol=1e-12)
    np.testing.assert_allclose(resumed["coefficients"], reference["coefficients"], rtol=1e-10)
    assert resumed["equations"] == reference["equations"]
    for key in ("final_train_loss", "final_loss_solution", "final_n_active_terms"):
        assert resumed["final_metrics"][key] == pytest.approx(
            reference["final_metrics"][key], rel=1e-12
        )


def _assert_run_complete(config: Path, run_id: str) -> None:
    """One FINISHED run holding every epoch's metrics exactly once."""
    client = _client(config)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(N_EPOCHS))
    assert run.data.tags["solver"] == "smnn"
    assert run.data.params["lorenz.train.epochs_per_cycle"] == "12"


def test_uninterrupted_run_outputs(setup):
    root, config, _, reference = setup
    out = root / "results" / "lorenz" / "reference"
    assert (out / "model.pt").is_file()
    assert len(reference["history"]) == N_EPOCHS
    record = reference["history"][0]
    for key in ("train_loss", "loss_solution", "loss_denoise", "step_time_ms", "lr"):
        assert key in record
    assert reference["final_metrics"]["mean_step_time_ms"] > 0
    assert reference["final_metrics"]["process_max_rss_mib"] > 0
    assert len(reference["step_losses"]) == N_EPOCHS * 3
    # the thresholding cycle ran: the second cycle has fewer active terms than the first
    assert reference["history"][11]["n_active_terms"] == 30
    assert reference["history"][12]["n_active_terms"] < 30
    _assert_run_complete(config, reference["run_id"])
    run = _client(config).get_run(reference["run_id"])
    assert run.data.metrics["final_train_loss"] == pytest.approx(
        reference["final_metrics"]["final_train_loss"]
    )
    assert run.data.tags["smnn.rule"] == "train_lorenz"
    assert json.loads(run.data.tags["smnn.wildcards"]) == {
        "experiment": "lorenz",
        "solver": "smnn",
    }
    assert len(run.data.tags["config_hash"]) == 12
    artifacts = {a.path for a in _client(config).list_artifacts(reference["run_id"])}
    assert "train_metrics.json" in artifacts
    models = _client(config).search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{reference['run_id']}'",
    )
    assert len(models) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_to_the_same_result(setup, sig):
    root, config, data, reference = setup
    out = root / "results" / "lorenz" / f"killed_{sig.name}"
    code, stderr = _start_and_kill(config, data, out, sig, after_epochs=3)
    if sig == signal.SIGTERM:
        assert code == 143, stderr[-3000:]
        assert "checkpoint saved" in stderr
    else:
        assert code == -signal.SIGKILL
    # killed: no declared outputs, a checkpoint and the run id are kept
    assert not (out / "model.pt").exists() and not (out / "train_metrics.json").exists()
    saved_epoch = _checkpoint_epoch(out)
    assert 3 <= saved_epoch < N_EPOCHS
    run_id = json.loads((out / "checkpoints" / "run.json").read_text())["run_id"]
    if sig == signal.SIGTERM:
        assert _client(config).get_run(run_id).info.status == "KILLED"

    proc = run_smnn(*train_args(config, data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch" in proc.stdout
    resumed = json.loads((out / "train_metrics.json").read_text())
    assert resumed["run_id"] == run_id
    _assert_same_as_reference(reference, resumed)
    _assert_run_complete(config, run_id)
    run = _client(config).get_run(run_id)
    assert int(run.data.tags["resumed_from_epoch"]) >= 3


def test_second_job_on_the_same_out_stops_and_a_truncated_checkpoint_is_survived(setup):
    """A second ``smnn train`` on a busy --out fails at once naming the first one's pid; after
    the first is killed with ``last.pt`` cut to half, the rerun resumes from ``previous.pt``."""
    root, config, data, reference = setup
    out = root / "results" / "lorenz" / "locked"
    first = subprocess.Popen(
        smnn_command(*train_args(config, data, out)),
        env=smnn_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            assert first.poll() is None, f"training ended early: {first.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint pair within 300 s"
            if _checkpoint_epoch(out) >= 3:
                first.send_signal(signal.SIGSTOP)  # alive (holding its lock), not finishing
                if _checkpoint_pair_at_rest(out):
                    break
                first.send_signal(signal.SIGCONT)  # stopped mid-save: let it finish, try again
            time.sleep(0.05)
        second = run_smnn(*train_args(config, data, out))
        assert second.returncode != 0, second.stdout
        assert f"pid {first.pid}" in second.stderr and str(out / "checkpoints") in second.stderr
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate(timeout=120)
    run_id = json.loads((out / "checkpoints" / "run.json").read_text())["run_id"]
    last = out / "checkpoints" / "last.pt"
    previous_epoch = int(torch.load(last.with_name("previous.pt"), weights_only=False)["epoch"])
    assert previous_epoch < _checkpoint_epoch(out)
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)

    proc = run_smnn(*train_args(config, data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming after epoch {previous_epoch}" in proc.stdout, proc.stdout
    assert f"checkpoint {last} cannot be loaded" in proc.stderr
    resumed = json.loads((out / "train_metrics.json").read_text())
    assert resumed["run_id"] == run_id
    _assert_same_as_reference(reference, resumed)
    _assert_run_complete(config, run_id)


def test_finished_job_rerun_starts_a_new_run(setup):
    """A forced rerun of a finished job trains from scratch in a new MLflow run."""
    root, config, data, reference = setup
    out = root / "results" / "lorenz" / "reference"
    proc = run_smnn(*train_args(config, data, out, "smnn", "--max-epochs", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" not in proc.stdout
    rerun = json.loads((out / "train_metrics.json").read_text())
    assert rerun["run_id"] != reference["run_id"]
    assert len(rerun["history"]) == 2
    np.testing.assert_allclose(
        [r["train_loss"] for r in rerun["history"]],
        [r["train_loss"] for r in reference["history"][:2]],
        rtol=1e-12,
    )


# ------------------------------------------------------------------ in-process, mid-epoch


class _RegressionTask:
    """A small real task: fit y = X w with an MLP; sends itself SIGTERM at a chosen step."""

    def __init__(self, seed: int, stop_at_step: int | None = None):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(40, 3, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
        ).double()  # dropout: the loss depends on the torch RNG state
        self.n_epochs, self.n_samples, self.batch_size = 4, 40, 8
        self.stop_at_step = stop_at_step
        self.steps = 0
        self.epoch_starts: list[int] = []

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch_starts.append(epoch)

    def training_step(self, indices):
        self.steps += 1
        if self.steps == self.stop_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, mid-epoch
        pred = self.model(self.x[indices]).squeeze(-1)
        loss = torch.mean((pred - self.y[indices]) ** 2)
        return loss, {"loss_mse": float(loss.detach())}

    def epoch_metrics(self):
        return {"n_steps_seen": float(self.steps)}


def _trainer(task, ckdir: Path) -> Trainer:
    settings = TrainerSettings(ckdir, seed=5, device=torch.device("cpu"), progress=False)
    return Trainer(task, settings)


def test_sigterm_mid_epoch_resumes_exactly_in_process(tmp_path):
    seed_everything(0)
    reference = _trainer(_RegressionTask(seed=1), tmp_path / "ref")
    assert reference.restore() is None
    reference.attach_run(None)
    ref = reference.fit()
    reference.mark_finished()

    seed_everything(0)
    task = _RegressionTask(seed=1, stop_at_step=7)  # epoch 1 (5 steps per epoch), 2nd step
    with _trainer(task, tmp_path / "killed") as first:  # the lock is released on the way out
        first.restore()
        first.attach_run("run-123")
        with pytest.raises(TrainingInterrupted) as info:
            first.fit()
    assert info.value.exit_code == 143
    assert not first.lock.held
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored

    seed_everything(99)  # a fresh process with other global RNG states
    task2 = _RegressionTask(seed=7)  # other initial weights: the checkpoint must override them
    second = _trainer(task2, tmp_path / "killed")
    assert second.restore() == "run-123"
    assert second.restored and second.resumed_from_epoch == 1
    second.attach_run("run-123")
    res = second.fit()
    assert task2.epoch_starts == [2, 3]  # epoch 1 was already started before the kill
    np.testing.assert_array_equal(res.step_losses, ref.step_losses)
    for a, b in zip(res.history, ref.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["lr"] == b["lr"]
        assert a["loss_mse"] == b["loss_mse"]
    for p, q in zip(task2.model.parameters(), reference.task.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_of_another_configuration_is_discarded(tmp_path):
    seed_everything(0)
    t = _trainer(_RegressionTask(seed=1), tmp_path)
    t.settings.identity = {"config_hash": "aaa"}
    t.restore()
    t.attach_run("old-run")
    t.settings.max_epochs = 1
    t.n_epochs = 1
    t.fit()
    assert (tmp_path / "last.pt").exists()
    t.release()

    other = _trainer(_RegressionTask(seed=1), tmp_path)
    other.settings.identity = {"config_hash": "bbb"}
    assert other.restore() is None and not other.restored
    assert not (tmp_path / "last.pt").exists()
    assert (tmp_path / "train.lock").exists() and other.lock.held  # cleared around the lock
    other.release()


class _AllocatingTask(_RegressionTask):
    """The regression task whose every step also fills a 64 MB buffer (freed after the step)."""

    BUFFER_BYTES = 64 * 2**20

    def training_step(self, indices):
        buffer = torch.ones(self.BUFFER_BYTES // 8, dtype=torch.float64)  # written: resident
        loss, parts = super().training_step(indices)
        return loss + 0.0 * buffer[0], parts


def test_step_peak_memory_is_recorded_per_epoch_and_overall(tmp_path):
    """Every epoch record and the final metrics hold the peak memory of a step above the level
    before it (CPU: the resident-set high-water mark; measured on each epoch's first step)."""
    seed_everything(0)
    trainer = _trainer(_AllocatingTask(seed=1), tmp_path)
    trainer.restore()
    trainer.attach_run(None)
    result = trainer.fit()
    trainer.mark_finished()
    buffer_mib = _AllocatingTask.BUFFER_BYTES / 2**20
    peaks = [r["step_peak_memory_mib"] for r in result.history]
    assert len(peaks) == 4
    for peak in peaks:
        assert 0.9 * buffer_mib <= peak <= 4 * buffer_mib, peaks
    assert result.final_metrics["step_peak_memory_mib"] == max(peaks)
    assert result.final_metrics["process_max_rss_mib"] >= max(peaks)


class _PlateauTask(_RegressionTask):
    """The regression task with a validation loss that never improves, under a
    ``ReduceLROnPlateau`` (patience 0): the training loss falls, the validation loss does not."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.modes: list[bool] = []

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)

    def validation_loss(self) -> float:
        self.modes.append(self.model.training)
        assert not torch.is_grad_enabled()
        return 1.0


def test_plateau_scheduler_steps_on_the_validation_loss(tmp_path):
    seed_everything(0)
    task = _PlateauTask(seed=1)
    trainer = _trainer(task, tmp_path)
    trainer.restore()
    trainer.attach_run(None)
    result = trainer.fit()
    trainer.mark_finished()
    train = [r["train_loss"] for r in result.history]
    assert train[-1] < train[0]  # a plateau on the training loss would not reduce the lr
    assert [r["valid_loss"] for r in result.history] == [1.0] * 4
    assert all(r["valid_time_s"] >= 0 for r in result.history)
    # the lr of epoch e: halved after every epoch but the first (no improvement on 1.0)
    assert [r["lr"] for r in result.history] == [1e-2, 1e-2, 5e-3, 2.5e-3]
    assert task.modes == [False] * 4 and task.model.training  # eval mode, then train again
    assert result.final_metrics["final_valid_loss"] == 1.0
    assert result.final_metrics["best_valid_loss"] == 1.0
    # without validation_loss the plateau follows the training loss
    seed_everything(0)
    plain = _PlateauTask(seed=1)
    plain.validation_loss = None  # not callable: no validation
    trainer = _trainer(plain, tmp_path / "plain")
    trainer.restore()
    result = trainer.fit()
    assert "valid_loss" not in result.history[0]
    assert [r["lr"] for r in result.history] == [1e-2] * 4
