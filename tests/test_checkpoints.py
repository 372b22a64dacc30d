"""Checkpoint robustness: a damaged ``last.pt`` falls back to ``previous.pt``, and one process per
checkpoint directory (an flock held by real processes)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smnn.training import (
    CheckpointLock,
    CheckpointLocked,
    Trainer,
    TrainerSettings,
    TrainingInterrupted,
    seed_everything,
)

TESTS = Path(__file__).resolve().parent


class _TinyTask:
    """Fit y = X w with a small MLP (dropout: the losses depend on the restored RNG state)."""

    def __init__(self, seed: int = 1, n_epochs: int = 5, step_sleep: float = 0.0):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(32, 3, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
        ).double()
        self.n_epochs, self.n_samples, self.batch_size = n_epochs, 32, 8
        self.step_sleep = step_sleep

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def training_step(self, indices):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        pred = self.model(self.x[indices]).squeeze(-1)
        loss = torch.mean((pred - self.y[indices]) ** 2)
        return loss, {"loss_mse": float(loss.detach())}

    def epoch_metrics(self):
        return {}


def _trainer(ckdir: Path, max_epochs: int | None = None, **task_kwargs) -> Trainer:
    seed_everything(0)
    settings = TrainerSettings(
        ckdir, seed=5, device=torch.device("cpu"), identity={"job": "tiny"},
        max_epochs=max_epochs, progress=False,
    )  # fmt: skip
    return Trainer(_TinyTask(**task_kwargs), settings)


def _epoch_of(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["epoch"])


def _truncate_to_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _train(ckdir: Path, epochs: int, run_id: str = "run-1") -> Trainer:
    """A first job: ``epochs`` epochs, then the process 'dies' (lock released, not finished)."""
    t = _trainer(ckdir, max_epochs=epochs)
    with t:
        assert t.restore() is None
        t.attach_run(run_id)
        t.fit()
    return t


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The losses of an uninterrupted 5-epoch run."""
    t = _trainer(tmp_path_factory.mktemp("reference"))
    with t:
        t.restore()
        t.attach_run(None)
        result = t.fit()
    return [r["train_loss"] for r in result.history], result.step_losses


# ------------------------------------------------------------------ damaged checkpoints


def test_every_save_keeps_the_previous_checkpoint(tmp_path):
    _train(tmp_path, epochs=3)
    assert _epoch_of(tmp_path / "last.pt") == 3
    assert _epoch_of(tmp_path / "previous.pt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "previous.pt", "run.json", "train.lock",
    ]  # fmt: skip


def test_truncated_last_resumes_from_previous(tmp_path, caplog, reference):
    _train(tmp_path, epochs=3)
    _truncate_to_half(tmp_path / "last.pt")
    with pytest.raises((RuntimeError, OSError)):  # what used to crash-loop every restart
        torch.load(tmp_path / "last.pt", weights_only=False)

    t = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="smnn.training"):
        assert t.restore() == "run-1"
    assert t.restored and t.epoch == 2 and t.resumed_from_epoch == 2  # one epoch lower
    assert t.recovered_from == str(tmp_path / "previous.pt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "last.pt") in w and "cannot be loaded" in w for w in warnings)
    assert len(t.recovery_notes) == 2
    assert str(tmp_path / "last.pt") in t.recovery_notes[0]
    assert "resumed from" in t.recovery_notes[1] and "previous.pt" in t.recovery_notes[1]
    assert (tmp_path / "last.pt.corrupt").exists() and not (tmp_path / "last.pt").exists()

    # the job goes on, and ends exactly where an uninterrupted one does
    t.attach_run("run-1")
    result = t.fit()
    t.release()
    losses, step_losses = reference
    np.testing.assert_array_equal([r["train_loss"] for r in result.history], losses)
    np.testing.assert_array_equal(result.step_losses, step_losses)
    # previous.pt was not overwritten by the damaged file: now the two newest good ones
    assert (_epoch_of(tmp_path / "previous.pt"), _epoch_of(tmp_path / "last.pt")) == (4, 5)


def test_both_truncated_starts_afresh_with_a_warning(tmp_path, caplog, reference):
    _train(tmp_path, epochs=3)
    _truncate_to_half(tmp_path / "last.pt")
    _truncate_to_half(tmp_path / "previous.pt")

    t = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="smnn.training"):
        assert t.restore() is None  # a new MLflow run
    assert not t.restored and t.epoch == 0 and t.recovered_from is None
    assert len(t.recovery_notes) == 3
    assert "last.pt" in t.recovery_notes[0] and "previous.pt" in t.recovery_notes[1]
    assert "starting afresh" in t.recovery_notes[2] and "run-1" in t.recovery_notes[2]
    assert sum("starting afresh" in r.getMessage() for r in caplog.records) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]

    t.attach_run("run-2")
    result = t.fit()
    t.mark_finished()
    assert not t.lock.held
    np.testing.assert_array_equal([r["train_loss"] for r in result.history], reference[0])


def test_missing_last_resumes_from_previous(tmp_path):
    """A crash between the two renames of a file system without hard links."""
    _train(tmp_path, epochs=2)
    (tmp_path / "last.pt").unlink()
    t = _trainer(tmp_path)
    assert t.restore() == "run-1" and t.epoch == 1
    assert t.recovered_from == str(tmp_path / "previous.pt")
    assert "missing" in t.recovery_notes[-1]
    t.release()


def test_clean_resume_has_no_notes(tmp_path):
    _train(tmp_path, epochs=2)
    t = _trainer(tmp_path)
    assert t.restore() == "run-1" and t.epoch == 2
    assert t.recovery_notes == [] and t.recovered_from is None
    t.release()


def test_unreadable_run_file_starts_afresh(tmp_path):
    _train(tmp_path, epochs=1)
    (tmp_path / "run.json").write_text('{"run_id": ')
    t = _trainer(tmp_path)
    assert t.restore() is None and t.epoch == 0
    assert "run.json" in t.recovery_notes[0] and "afresh" in t.recovery_notes[0]
    t.release()


# ------------------------------------------------------------------ the directory lock


def _holder_main(ckdir: str, mode: str) -> None:
    """Run in a child process (``python -c``): train, then hold the directory.

    ``wait``: two epochs, print ``ready``, keep the lock until stdin closes.
    ``fit``: slow epochs, ``ready`` after the first; ends on SIGTERM with the exit code 143.
    """
    logging.basicConfig(level=logging.INFO)
    if mode == "wait":
        t = _trainer(Path(ckdir), max_epochs=2)
        t.restore()
        t.attach_run("run-holder")
        t.fit()
        print("ready", flush=True)
        sys.stdin.read()
        return
    t = _trainer(Path(ckdir), n_epochs=10_000, step_sleep=0.01)
    with t:
        t.restore()
        t.attach_run("run-holder")
        try:
            t.fit(on_epoch_end=lambda epoch, record: print("ready", flush=True))
        except TrainingInterrupted as exc:
            sys.exit(exc.exit_code)


def _start_holder(ckdir: Path, mode: str) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, test_checkpoints as t; t._holder_main(*sys.argv[1:])",
         str(ckdir), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"holder did not start: {line!r} {proc.communicate()[1][-3000:]}")
    return proc


def _contents(ckdir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ckdir.iterdir())
        if p.name != "train.lock"
    }


def test_second_trainer_stops_at_once_naming_the_holder(tmp_path):
    holder = _start_holder(tmp_path, "wait")
    try:
        before = _contents(tmp_path)
        assert set(before) == {"last.pt", "previous.pt", "run.json"}
        info = json.loads((tmp_path / "train.lock").read_text())
        assert info["pid"] == holder.pid

        second = _trainer(tmp_path)
        start = time.monotonic()
        with pytest.raises(CheckpointLocked) as exc:
            second.restore()
        assert time.monotonic() - start < 5  # at once, not waiting for the holder
        message = str(exc.value)
        assert f"pid {holder.pid}" in message and str(tmp_path) in message
        assert exc.value.holder_pid == holder.pid and exc.value.directory == tmp_path
        assert isinstance(exc.value, RuntimeError)
        for call in (second.fit, lambda: second.attach_run("x"), CheckpointLock(tmp_path).acquire):
            with pytest.raises(CheckpointLocked):
                call()
        assert _contents(tmp_path) == before  # nothing the holder wrote was touched
        assert holder.poll() is None
    finally:
        holder.stdin.close()  # the holder ends normally: the kernel drops its lock
        assert holder.wait(timeout=60) == 0, holder.stderr.read()[-3000:]

    # now free: the job resumes where the holder left off
    third = _trainer(tmp_path)
    assert third.restore() == "run-holder" and third.epoch == 2
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    third.release()
    assert (tmp_path / "train.lock").read_text() == ""  # no stale holder record


def test_stale_lock_file_of_a_killed_process_does_not_block(tmp_path):
    holder = _start_holder(tmp_path, "wait")
    holder.kill()  # SIGKILL: no cleanup at all
    holder.wait(timeout=60)
    holder.stdin.close()
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == holder.pid  # stale
    t = _trainer(tmp_path)
    assert t.restore() == "run-holder" and t.epoch == 2
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    t.release()


def test_lock_is_released_after_sigterm(tmp_path):
    holder = _start_holder(tmp_path, "fit")
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=60) == 143, holder.stderr.read()[-3000:]
    holder.stdin.close()
    assert _epoch_of(tmp_path / "last.pt") >= 1  # the SIGTERM checkpoint
    assert (tmp_path / "train.lock").read_text() == ""  # released by `with`, not only the kernel
    with CheckpointLock(tmp_path) as lock:
        assert lock.held


def test_lock_within_one_process(tmp_path):
    first = _trainer(tmp_path, max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        with first:
            first.restore()
            raise RuntimeError("boom")
    assert not first.lock.held  # released on the exception

    first.restore()  # without `with`: restore takes the lock ...
    second = _trainer(tmp_path)
    with pytest.raises(CheckpointLocked, match="this process"):
        second.restore()
    first.attach_run(None)
    first.fit()
    first.mark_finished()  # ... and mark_finished releases it
    assert second.restore() is None  # finished: a fresh run
    second.release()
    second.release()  # idempotent


# ------------------------------------------------------------------ flipped bytes, verified loads


def _flip_tensor_bytes(path: Path, member_prefix: str = "data/") -> str:
    """Flip bytes in the middle of the largest tensor member of a torch zip archive, leaving the
    zip structure intact (what ``torch.load`` alone would load as wrong numbers). Returns the
    member's name."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if f"/{member_prefix}" in i.filename]
        info = max(infos, key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        chunk = f.read(8)
        f.seek(start)
        f.write(bytes(b ^ 0x5A for b in chunk))
    return info.filename


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside a nested checkpoint, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_flipped_bytes_are_caught_although_torch_load_accepts_them(tmp_path):
    from smnn.io import StoreError, load_torch_verified

    _train(tmp_path, epochs=2)
    good = _tensors(torch.load(tmp_path / "last.pt", weights_only=False))
    member = _flip_tensor_bytes(tmp_path / "last.pt")
    bad = _tensors(torch.load(tmp_path / "last.pt", weights_only=False))  # loads silently ...
    assert len(good) == len(bad)
    # ... with wrong numbers
    assert any(not torch.equal(a, b) for a, b in zip(good, bad, strict=True))
    with pytest.raises(StoreError, match="CRC-32") as exc:
        load_torch_verified(tmp_path / "last.pt", remedy="rerun the rule train_x")
    assert str(tmp_path / "last.pt") in str(exc.value) and "rerun the rule train_x" in str(
        exc.value
    )
    assert member in str(exc.value)


def test_flipped_last_resumes_from_previous_like_a_truncated_one(tmp_path, reference):
    _train(tmp_path, epochs=3)
    _flip_tensor_bytes(tmp_path / "last.pt")
    t = _trainer(tmp_path)
    assert t.restore() == "run-1"
    assert t.epoch == 2 and t.recovered_from == str(tmp_path / "previous.pt")
    assert "CRC-32" in t.recovery_notes[0] and str(tmp_path / "last.pt") in t.recovery_notes[0]
    assert (tmp_path / "last.pt.corrupt").exists()
    t.attach_run("run-1")
    result = t.fit()
    t.release()
    np.testing.assert_array_equal([r["train_loss"] for r in result.history], reference[0])


def test_both_damaged_ends_the_abandoned_run(tmp_path):
    _train(tmp_path, epochs=3)
    _flip_tensor_bytes(tmp_path / "last.pt")
    _truncate_to_half(tmp_path / "previous.pt")
    t = _trainer(tmp_path)
    assert t.restore() is None
    assert len(t.abandoned_runs) == 1
    run_id, why = t.abandoned_runs[0]
    assert run_id == "run-1" and "no checkpoint" in why and str(tmp_path) in why
    t.release()


def test_another_configuration_abandons_its_run(tmp_path):
    _train(tmp_path, epochs=1)
    seed_everything(0)
    settings = TrainerSettings(
        tmp_path, seed=5, device=torch.device("cpu"), identity={"job": "other"}, progress=False
    )
    t = Trainer(_TinyTask(), settings)
    assert t.restore() is None
    assert [r for r, _ in t.abandoned_runs] == ["run-1"]
    assert "another configuration" in t.abandoned_runs[0][1]
    t.release()


def test_finished_job_leaves_no_checkpoints_or_lock(tmp_path):
    ckdir = tmp_path / "checkpoints"
    t = _trainer(ckdir, max_epochs=2)
    with t:
        assert t.restore() is None
        t.attach_run("run-1")
        t.fit()
        assert (ckdir / "last.pt").exists() and (ckdir / "train.lock").exists()
        t.mark_finished()
    assert not ckdir.exists()
    again = _trainer(ckdir, max_epochs=1)
    assert again.restore() is None and again.abandoned_runs == []  # a fresh start
    again.release()


def test_batch_larger_than_the_data_says_so(tmp_path, caplog):
    seed_everything(0)
    task = _TinyTask()
    task.batch_size = 1_000_000_000
    task.batch_size_key = "tiny.train.batch_size"
    settings = TrainerSettings(tmp_path, seed=5, device=torch.device("cpu"), progress=False)
    with caplog.at_level(logging.WARNING, logger="smnn.training"):
        t = Trainer(task, settings)
    assert len(t.notices) == 1
    assert "tiny.train.batch_size is 1000000000" in t.notices[0] and "32" in t.notices[0]
    assert any("tiny.train.batch_size" in r.getMessage() for r in caplog.records)
