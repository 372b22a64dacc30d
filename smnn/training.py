"""The training loop every experiment shares: seeds, checkpoints, resume, preemption, timing.

An experiment supplies a :class:`TrainingTask` (model, optimiser, one training step); the
:class:`Trainer` runs epochs over shuffled sample indices and, after every epoch, writes a
checkpoint atomically (temporary file + ``os.replace``) holding the model, optimiser, scheduler,
the RNG states (torch, CUDA, numpy, python, the data-order generator), the epoch, the per-epoch
history and the MLflow run id. Restarted with the same checkpoint directory and the same
configuration it continues from the last checkpoint; on CPU with fixed seeds the result equals
that of an uninterrupted run.

SIGTERM (SLURM preemption or time limit, Snakemake cancelling) and SIGINT are caught: the current
step finishes, a mid-epoch checkpoint is written (with the epoch's data order and position, so
nothing is repeated or skipped), and :class:`TrainingInterrupted` is raised; the command exits
with ``128 + signal`` (143 for SIGTERM) so the scheduler can requeue the job.

Checkpoint files (in ``checkpoint_dir``): ``last.pt`` (the newest), ``previous.pt`` (the one
before it: a hard link to the old ``last.pt`` is renamed over ``previous.pt`` before the new
``last.pt`` is renamed into place, so both always exist once two were written), ``run.json`` (the
MLflow run id, the identity, running/finished) and ``train.lock``; a finished job removes them
all (:meth:`Trainer.mark_finished`). Every checkpoint is checked before use: the CRC-32 of every
member of its zip archive (:func:`smnn.io.load_torch_verified`; ``torch.load`` alone never checks
them). When ``last.pt`` cannot be loaded (truncated, flipped bytes, unreadable, another format or
configuration) :meth:`Trainer.restore` warns,
naming the file, moves it aside to ``last.pt.corrupt`` and resumes from ``previous.pt``; when
neither loads it warns and starts afresh (a new MLflow run), so a requeued job never crash-loops.
What happened is in :attr:`Trainer.recovery_notes` and :attr:`Trainer.recovered_from`.

One process per checkpoint directory: :class:`CheckpointLock` holds an exclusive, non-blocking
``fcntl.flock`` on ``train.lock`` (which records the holder's pid, host and command) from
:meth:`Trainer.restore` (or :meth:`Trainer.acquire`) until :meth:`Trainer.mark_finished`,
:meth:`Trainer.release`, the end of a ``with trainer:`` block, or the end of the process (the
kernel drops the lock of a dead process, so a stale lock file never blocks). A second trainer on
the same directory raises :class:`CheckpointLocked`, naming the holder's pid, before touching
anything.

Timing and memory: every step (forward, backward, optimiser update) is timed, with CUDA
synchronisation on GPUs. Peak memory of a step (above the level before it) comes from
:func:`smnn.memory.measure_peak_memory`; on CPU that resets the kernel's resident-set high-water
mark and collects garbage first, so it is measured on the first step of each epoch only; on CUDA on
every step. Before the loop, the objects that exist then (imported modules, the model, MLflow's
client) are moved to the garbage collector's permanent generation (``gc.freeze``), so the
collection before each measurement takes microseconds instead of a second.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import gc
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from smnn.io import (
    atomic_torch_save,
    atomic_write_json,
    fsync_dir,
    load_torch_verified,
    read_json,
)
from smnn.memory import measure_peak_memory

__all__ = [
    "TrainingTask",
    "TrainerSettings",
    "Trainer",
    "TrainingResult",
    "TrainingInterrupted",
    "CheckpointLock",
    "CheckpointLocked",
    "seed_everything",
    "atomic_torch_save",
    "atomic_write_json",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
PREVIOUS_NAME = "previous.pt"
CORRUPT_SUFFIX = ".corrupt"
RUN_FILE = "run.json"
LOCK_NAME = "train.lock"
FORMAT_VERSION = 1
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingTask(Protocol):
    """What an experiment gives the :class:`Trainer`.

    Attributes:
        model: the module being trained (its ``state_dict`` is checkpointed, buffers included).
        n_epochs: total number of epochs of the schedule.
        n_samples: number of training samples; batches are index tensors into ``range(n_samples)``.
        batch_size: samples per step (the last batch of an epoch may be smaller).
    """

    model: torch.nn.Module
    n_epochs: int
    n_samples: int
    batch_size: int

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any | None]:
        """The optimiser and an optional scheduler (stepped once per epoch; a
        ``ReduceLROnPlateau`` gets the epoch's validation loss when the task defines
        ``validation_loss``, else its mean training loss)."""
        ...

    def on_epoch_start(self, epoch: int) -> None:
        """Called before epoch ``epoch`` (0-based) starts; not again when a run resumes in the
        middle of that epoch (its effect is in the checkpointed model state)."""
        ...

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss (scalar tensor to minimise) of the batch ``indices`` ``(batch,)``, and named
        components of it as floats (e.g. ``{"loss_solution": ...}``)."""
        ...

    def epoch_metrics(self) -> dict[str, float]:
        """Extra metrics after an epoch (e.g. the number of active terms)."""
        ...

    # Optional: ``validation_loss(self) -> float``, the loss on held-out data after an epoch.
    # When a task defines it, the Trainer calls it after every epoch with the model in eval
    # mode and gradients off (train mode restored afterwards), records it as ``valid_loss``
    # (and its wall time as ``valid_time_s``), and steps a ``ReduceLROnPlateau`` on it. It
    # should draw no random numbers from the global generators (use a seeded subset).


@dataclass
class TrainerSettings:
    """How to run a task.

    Attributes:
        checkpoint_dir: where ``last.pt``, ``previous.pt``, ``run.json`` and ``train.lock`` live
            (not a declared workflow output).
        seed: seed of the data-order generator.
        device: where the model lives.
        identity: what must match for a checkpoint to be resumed (experiment, solver, config
            hash ...); a checkpoint with another identity is discarded.
        max_epochs: cap on the number of epochs (tests), or None for the task's schedule.
        progress: show a tqdm progress bar (refreshing rarely when stderr is not a terminal).
        keep_step_losses: how many per-step losses to keep from the start of training (for
            loss-curve figures over optimisation steps).
    """

    checkpoint_dir: Path
    seed: int
    device: torch.device
    identity: dict[str, Any] = field(default_factory=dict)
    max_epochs: int | None = None
    progress: bool = True
    keep_step_losses: int = 1000


@dataclass
class TrainingResult:
    """The outcome of :meth:`Trainer.fit`.

    Attributes:
        history: one record per epoch (``epoch``, ``train_loss``, components, ``lr``,
            ``epoch_time_s``, ``step_time_ms``, ``step_peak_memory_mib``, task metrics, and
            ``valid_loss`` / ``valid_time_s`` for a task with ``validation_loss``).
        final_metrics: summary numbers (final loss, mean step time, peak memory, wall time).
        step_losses: the training loss of each of the first ``keep_step_losses`` steps.
        resumed_from_epoch: epochs completed before this process started (0 for a fresh run).
    """

    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    step_losses: list[float]
    resumed_from_epoch: int


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, epoch: int, step_in_epoch: int):
        super().__init__(
            f"stopped by signal {signal.Signals(signum).name} in epoch {epoch} after "
            f"{step_in_epoch} step(s); checkpoint saved"
        )
        self.signum = signum
        self.exit_code = 128 + signum


class CheckpointLocked(RuntimeError):
    """Another live process (or another :class:`Trainer` of this one) holds the checkpoint
    directory's lock.

    Attributes:
        directory: the checkpoint directory.
        holder_pid: the holder's pid (None when its lock file could not be read).
        holder_host: the holder's host name (None when unknown).
    """

    def __init__(self, directory: Path, holder: Mapping[str, Any] | None):
        holder = dict(holder or {})
        self.directory = Path(directory)
        self.holder_pid: int | None = holder.get("pid")
        self.holder_host: str | None = holder.get("host")
        pid = "unknown" if self.holder_pid is None else self.holder_pid
        who = f"pid {pid} on host {self.holder_host or 'unknown'}"
        if holder.get("started"):
            who += f", since {holder['started']}"
        if self.holder_pid == os.getpid() and self.holder_host == socket.gethostname():
            who += "; that is this process, through another Trainer"
            what = "Release the other Trainer first."
        else:
            what = f"Stop it (kill {pid}) or wait for it to finish, then rerun."
        super().__init__(
            f"checkpoint directory {self.directory} is in use by another training process "
            f"({who}); a second one would overwrite its checkpoints and its MLflow run. {what}"
        )


class CheckpointLock:
    """An exclusive lock on a checkpoint directory: ``fcntl.flock`` on ``<directory>/train.lock``.

    The lock file records the holder (pid, host, start time, command) while it is held. The lock
    belongs to the open file, so the kernel releases it when the holding process ends, however it
    ends; a lock file left behind by a dead process does not block. Usable as a context manager;
    :meth:`acquire` and :meth:`release` are idempotent.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says about its holder (None when empty or unreadable)."""
        try:
            info = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> CheckpointLock:
        """Take the lock without waiting.

        Raises:
            CheckpointLocked: another process (or another lock object of this process) holds it.
        """
        if self._file is not None:
            return self
        while True:
            self.directory.mkdir(parents=True, exist_ok=True)
            f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise CheckpointLocked(self.directory, self._wait_for_holder()) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    f.close()
                    raise
                log.warning(
                    "cannot lock %s (%s): this file system has no flock; make sure only one "
                    "training process uses %s", self.path, exc, self.directory,
                )  # fmt: skip
                break
            try:  # a finishing job removes its lock file: lock the file that is in place
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        f.seek(0)
        f.truncate()
        f.write((json.dumps(info) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        return self

    def _wait_for_holder(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The holder's record; it writes it right after taking the lock, so wait a moment."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.holder()
            if info is not None or time.monotonic() > deadline:
                return info
            time.sleep(0.02)

    def release(self) -> None:
        """Clear the holder record and drop the lock (the file stays: deleting a lock file
        would let two processes lock two different files)."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()
            f.flush()
        except OSError:
            pass
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def __enter__(self) -> CheckpointLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (call before building the model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _catch_signals() -> Iterator[list[int]]:
    """Record SIGTERM/SIGINT instead of dying; yields the list the signal numbers go into."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in HANDLED_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _max_rss_mib() -> float:
    """The process's peak resident set so far (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclass
class _EpochProgress:
    """Running sums over the steps of the current epoch (checkpointed mid-epoch)."""

    loss_sum: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0
    step_time_sum: float = 0.0
    n_steps: int = 0
    peak_memory: int = 0
    wall_time: float = 0.0

    def add(self, loss: float, components: Mapping[str, float], n: int, seconds: float) -> None:
        self.loss_sum += loss * n
        for k, v in components.items():
            self.components[k] = self.components.get(k, 0.0) + float(v) * n
        self.n_samples += n
        self.step_time_sum += seconds
        self.n_steps += 1


class Trainer:
    """Runs a :class:`TrainingTask` with checkpoints, resume, signal handling and a lock.

    Typical use (see :mod:`smnn.commands.experiment`)::

        trainer = Trainer(task, settings)
        with trainer:                       # the directory's lock (CheckpointLocked if taken)
            run_id = trainer.restore()      # None for a fresh start
            ... trainer.recovery_notes: say in the MLflow run what restore() had to do ...
            ... create or resume the MLflow run, then trainer.attach_run(run_id) ...
            result = trainer.fit(on_epoch_end=log_to_mlflow)
            ... write the outputs ...
            trainer.mark_finished()         # also releases the lock

    Without ``with``, :meth:`restore` takes the lock itself and it is held until
    :meth:`mark_finished`, :meth:`release` or the end of the process (also after
    :class:`TrainingInterrupted` or another exception, until the process exits).

    Attributes:
        recovery_notes: what :meth:`restore` had to do about unusable files, one readable line
            each (a damaged ``last.pt``, a fall back to ``previous.pt``, a fresh start because
            no checkpoint loaded); empty when all was well. Each was also logged as a warning.
        recovered_from: the path of the checkpoint resumed from when it was not ``last.pt``
            (i.e. ``previous.pt`` after ``last.pt`` failed to load), else None.
        notices: things the user should know about the settings, one line each (a batch size
            larger than the data: optional task attribute ``batch_size_key`` names its config
            key); each was also logged as a warning.
        abandoned_runs: ``(MLflow run id, why)`` of the runs :meth:`restore` gave up (no
            checkpoint loaded, or the checkpoints were of another configuration); the caller
            ends them (:func:`smnn.tracking.end_abandoned_runs`) so none stays RUNNING.
    """

    def __init__(self, task: TrainingTask, settings: TrainerSettings):
        self.task = task
        self.settings = settings
        self.device = settings.device
        self.optimizer, self.scheduler = task.configure_optimizers()
        self.n_epochs = task.n_epochs
        if settings.max_epochs is not None:
            self.n_epochs = min(self.n_epochs, settings.max_epochs)
        self.data_generator = torch.Generator().manual_seed(settings.seed)
        self.lock = CheckpointLock(settings.checkpoint_dir)
        self.recovery_notes: list[str] = []
        self.recovered_from: str | None = None
        self.abandoned_runs: list[tuple[str, str]] = []
        self.notices: list[str] = []
        if task.batch_size > task.n_samples:
            key = getattr(task, "batch_size_key", None) or "the batch size"
            self.notices.append(
                f"{key} is {task.batch_size}, more than the {task.n_samples} training samples: "
                f"every step uses all {task.n_samples} (one step per epoch)"
            )
            log.warning("%s", self.notices[-1])
        self._reset_progress()
        self.run_id: str | None = None

    def _reset_progress(self) -> None:
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # completed steps of the current (unfinished) epoch
        self.epoch_generator_state: torch.Tensor | None = None
        self.progress = _EpochProgress()
        self.history: list[dict[str, float]] = []
        self.step_losses: list[float] = []
        self.global_step = 0
        self.resumed_from_epoch = 0
        self.restored = False

    # ------------------------------------------------------------------ the directory's lock

    def acquire(self) -> Trainer:
        """Take the checkpoint directory's lock (idempotent).

        Raises:
            CheckpointLocked: another process holds it (its pid is in the message); nothing in
                the directory has been touched.
        """
        self.lock.acquire()
        return self

    def release(self) -> None:
        """Drop the checkpoint directory's lock (idempotent)."""
        self.lock.release()

    def __enter__(self) -> Trainer:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ checkpoint files

    @property
    def checkpoint_path(self) -> Path:
        return self.settings.checkpoint_dir / CHECKPOINT_NAME

    @property
    def previous_path(self) -> Path:
        return self.settings.checkpoint_dir / PREVIOUS_NAME

    @property
    def run_file(self) -> Path:
        return self.settings.checkpoint_dir / RUN_FILE

    def _note(self, message: str) -> None:
        log.warning("%s", message)
        self.recovery_notes.append(message)

    def _read_run_file(self) -> dict[str, Any] | None:
        """``run.json``, or None when missing; an unreadable one is noted."""
        if not self.run_file.exists():
            return None
        try:
            info = read_json(self.run_file, "run file")
            if not isinstance(info, dict):
                raise ValueError(f"run file {self.run_file} holds no JSON object")
        except (OSError, ValueError) as exc:
            self._note(f"{exc}; discarding the checkpoints and starting afresh")
            return None
        return info

    def _identity(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.settings.identity, default=str))

    def _clear_directory(self) -> None:
        """Remove everything in the checkpoint directory but the lock file."""
        ckdir = self.settings.checkpoint_dir
        if not ckdir.is_dir():
            return
        for entry in ckdir.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def restore(self) -> str | None:
        """Take the lock, then load the last checkpoint when it belongs to this job and the job
        did not finish.

        A checkpoint directory of another configuration, or of a job that finished (a forced
        rerun), is cleared so the run starts afresh. When ``last.pt`` cannot be loaded, the run
        continues from ``previous.pt``; when neither loads, it starts afresh (see
        :attr:`recovery_notes`).

        Returns:
            The MLflow run id to continue, or None for a fresh run.

        Raises:
            CheckpointLocked: another process trains in this directory.
        """
        self.acquire()
        self.recovery_notes = []
        self.recovered_from = None
        self.abandoned_runs = []
        ckdir = self.settings.checkpoint_dir
        run_info = self._read_run_file()
        if run_info is None:
            self._clear_directory()
            return None
        if run_info.get("identity") != self._identity() or run_info.get("status") == "finished":
            finished = run_info.get("status") == "finished"
            why = "finished" if finished else "another configuration"
            log.info("discarding checkpoints in %s (%s)", ckdir, why)
            if not finished and run_info.get("run_id"):
                self.abandoned_runs.append(
                    (
                        str(run_info["run_id"]),
                        f"its checkpoints in {ckdir} were of another configuration; a new run "
                        "started there",
                    )
                )
            self._clear_directory()
            return None
        self.run_id = run_info.get("run_id")
        candidates = [p for p in (self.checkpoint_path, self.previous_path) if p.exists()]
        if not candidates:
            return self.run_id
        initial = self._snapshot()
        failed: list[Path] = []
        for path in candidates:
            try:
                self._apply_checkpoint(self._read_checkpoint(path))
            except Exception as exc:  # torch.load and the checks raise many types
                self._apply_snapshot(initial)  # undo what a half-applied checkpoint changed
                self.run_id = run_info.get("run_id")
                self._note(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc})")
                failed.append(path)
                continue
            self._resumed(path, failed)
            return self.run_id
        self._note(
            f"no usable checkpoint in {ckdir} ({', '.join(p.name for p in failed)} failed): "
            f"starting afresh in a new MLflow run"
            + (f" (run {self.run_id} of the lost checkpoints is ended KILLED)" if self.run_id
               else "")
        )  # fmt: skip
        if self.run_id:
            self.abandoned_runs.append(
                (
                    self.run_id,
                    f"no checkpoint in {ckdir} could be loaded "
                    f"({', '.join(p.name for p in failed)} damaged); a new run started afresh",
                )
            )
        self._clear_directory()
        self.run_id = None
        return None

    def _resumed(self, path: Path, failed: list[Path]) -> None:
        """Bookkeeping after ``path`` was loaded (``failed``: the checkpoints tried before)."""
        if path != self.checkpoint_path:
            self.recovered_from = str(path)
            if self.checkpoint_path in failed:
                corrupt = self.checkpoint_path.with_name(CHECKPOINT_NAME + CORRUPT_SUFFIX)
                # aside, so the next save does not rotate a damaged file over previous.pt
                os.replace(self.checkpoint_path, corrupt)
                fsync_dir(self.settings.checkpoint_dir)
                why = f"it is kept as {corrupt.name}"
            else:
                why = "it was missing"
            self._note(
                f"resumed from {path} ({self.epoch} epoch(s) done, {self.step_in_epoch} step(s) "
                f"into the next) instead of {self.checkpoint_path.name}; {why}"
            )
        log.info(
            "resumed from %s: %d epoch(s) done, %d step(s) into the next",
            path, self.epoch, self.step_in_epoch,
        )  # fmt: skip

    def attach_run(self, run_id: str | None) -> None:
        """Record the MLflow run id (in ``run.json`` right away, and in every checkpoint)."""
        self.acquire()
        self.run_id = run_id
        atomic_write_json(
            {"run_id": run_id, "identity": self._identity(), "status": "running"}, self.run_file
        )

    def mark_finished(self) -> None:
        """The job is done: discard its checkpoints, ``run.json`` and ``train.lock`` (a later
        start with this directory begins a fresh run) and release the directory's lock.

        ``run.json`` is first marked finished, so a crash while the files are removed still
        leaves a directory that a later start treats as finished. The lock file is removed
        while the lock is held: a process that opened the old file fails to lock it and reports
        this one, and one that starts afterwards creates a new lock file (see
        :meth:`CheckpointLock.acquire`, which checks that its locked file is still in place).
        """
        atomic_write_json(
            {"run_id": self.run_id, "identity": self._identity(), "status": "finished"},
            self.run_file,
        )
        ckdir = self.settings.checkpoint_dir
        for path in (self.checkpoint_path, self.previous_path):
            path.unlink(missing_ok=True)
        corrupt = self.checkpoint_path.with_name(CHECKPOINT_NAME + CORRUPT_SUFFIX)
        corrupt.unlink(missing_ok=True)
        self.run_file.unlink(missing_ok=True)
        if self.lock.held:
            self.lock.path.unlink(missing_ok=True)
        self.release()
        try:
            ckdir.rmdir()  # only when empty (nothing but the job's files was in it)
        except OSError:
            pass
        fsync_dir(ckdir.parent)

    def _save_checkpoint(self) -> None:
        state = {
            "format_version": FORMAT_VERSION,
            "identity": self._identity(),
            "run_id": self.run_id,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "epoch_generator_state": self.epoch_generator_state,
            "progress": vars(self.progress),
            "history": self.history,
            "step_losses": self.step_losses,
            "global_step": self.global_step,
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": _rng_state(),
            "data_generator": self.data_generator.get_state(),
        }
        self._rotate()
        atomic_torch_save(state, self.checkpoint_path)

    def _rotate(self) -> None:
        """Make the current ``last.pt`` the ``previous.pt``, keeping ``last.pt`` in place (a hard
        link renamed over ``previous.pt``), so a crash at any point leaves a loadable pair."""
        last, previous = self.checkpoint_path, self.previous_path
        if not last.exists():
            return
        link = previous.with_name(f".{PREVIOUS_NAME}.tmp-{os.getpid()}")
        try:
            link.unlink(missing_ok=True)
            os.link(last, link)
            os.replace(link, previous)
        except OSError:  # a file system without hard links: plain rename (restore copes)
            link.unlink(missing_ok=True)
            os.replace(last, previous)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Load ``path`` and check it is a checkpoint of this job (raises when not)."""
        state = load_torch_verified(path, self.device, "skipping it")
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a checkpoint")
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"has format {state.get('format_version')}, expected {FORMAT_VERSION}")
        if state.get("identity") != self._identity():
            raise ValueError("belongs to another configuration")
        return state

    def _snapshot(self) -> dict[str, Any]:
        """The state a failed :meth:`_apply_checkpoint` must be undone to."""
        return {
            "model": copy.deepcopy(self.task.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": None
            if self.scheduler is None
            else copy.deepcopy(self.scheduler.state_dict()),
            "rng": _rng_state(),
            "data_generator": self.data_generator.get_state(),
        }

    def _apply_snapshot(self, snap: Mapping[str, Any]) -> None:
        self.task.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        _set_rng_state(snap["rng"])
        self.data_generator.set_state(snap["data_generator"])
        self._reset_progress()

    def _apply_checkpoint(self, state: Mapping[str, Any]) -> None:
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.data_generator.set_state(state["data_generator"])
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.epoch_generator_state = state["epoch_generator_state"]
        self.progress = _EpochProgress(**state["progress"])
        self.history = list(state["history"])
        self.step_losses = list(state["step_losses"])
        self.global_step = state["global_step"]
        self.run_id = state["run_id"] or self.run_id
        self.resumed_from_epoch = self.epoch
        self.restored = True

    # ------------------------------------------------------------------ the loop

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, indices: torch.Tensor) -> tuple[float, dict[str, float], float]:
        """One optimisation step; returns (loss, components, seconds)."""
        self._sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, components = self.task.training_step(indices)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {self.epoch}, step "
                f"{self.step_in_epoch}"
            )
        loss.backward()
        self.optimizer.step()
        self._sync()
        return float(loss.detach()), components, time.perf_counter() - start

    def _epoch_order(self) -> torch.Tensor:
        """The epoch's sample order; the generator state at the epoch start is kept so a
        mid-epoch resume regenerates the same order."""
        if self.epoch_generator_state is None:
            self.epoch_generator_state = self.data_generator.get_state()
        else:
            self.data_generator.set_state(self.epoch_generator_state)
        return torch.randperm(self.task.n_samples, generator=self.data_generator)

    def _finish_epoch(self) -> dict[str, float]:
        p = self.progress
        n = max(p.n_samples, 1)
        record: dict[str, float] = {
            "epoch": float(self.epoch),
            "train_loss": p.loss_sum / n,
            **{k: v / n for k, v in p.components.items()},
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "epoch_time_s": p.wall_time,
            "step_time_ms": 1000.0 * p.step_time_sum / max(p.n_steps, 1),
            "step_peak_memory_mib": p.peak_memory / 2**20,
        }
        record.update({k: float(v) for k, v in self.task.epoch_metrics().items()})
        record.update(self._validate())
        if self.scheduler is not None:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record.get("valid_loss", record["train_loss"]))
            else:
                self.scheduler.step()
        return record

    def _validate(self) -> dict[str, float]:
        """``valid_loss`` and ``valid_time_s`` of the task's optional ``validation_loss`` (see
        :class:`TrainingTask`), or nothing when it has none.

        Raises:
            FloatingPointError: the validation loss is not finite.
        """
        validate = getattr(self.task, "validation_loss", None)
        if not callable(validate):
            return {}
        model = self.task.model
        was_training = model.training
        self._sync()
        start = time.perf_counter()
        model.eval()
        try:
            with torch.no_grad():
                loss = float(validate())
        finally:
            model.train(was_training)
        self._sync()
        if not np.isfinite(loss):
            raise FloatingPointError(f"validation loss became {loss} after epoch {self.epoch}")
        return {"valid_loss": loss, "valid_time_s": time.perf_counter() - start}

    def fit(
        self, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    ) -> TrainingResult:
        """Train until the schedule (or ``max_epochs``) is done.

        Args:
            on_epoch_end: called with (epoch, record) after each epoch's checkpoint is written
                (e.g. to log to MLflow).

        Raises:
            TrainingInterrupted: after SIGTERM/SIGINT, once the checkpoint is saved (the lock
                stays held until the process ends or :meth:`release` / ``with`` ends).
            CheckpointLocked: when called without :meth:`restore` and another process holds
                the directory.
        """
        self.acquire()
        task = self.task
        measure_every_step = self.device.type == "cuda"
        is_tty = sys.stderr.isatty()
        bar = tqdm(
            total=self.n_epochs,
            initial=min(self.epoch, self.n_epochs),
            desc="train",
            unit="epoch",
            disable=not self.settings.progress,
            mininterval=0.5 if is_tty else 30.0,
            dynamic_ncols=is_tty,
        )
        gc.collect()
        gc.freeze()
        try:
            with _catch_signals() as received:
                while self.epoch < self.n_epochs:
                    if self.step_in_epoch == 0 and self.epoch_generator_state is None:
                        task.on_epoch_start(self.epoch)
                    order = self._epoch_order()
                    batches = order.split(task.batch_size)
                    epoch_start = time.perf_counter() - self.progress.wall_time
                    for b in range(self.step_in_epoch, len(batches)):
                        if received:
                            self.progress.wall_time = time.perf_counter() - epoch_start
                            self._save_checkpoint()
                            raise TrainingInterrupted(received[0], self.epoch, self.step_in_epoch)
                        idx = batches[b]
                        if measure_every_step or b == 0:
                            out, peak = measure_peak_memory(self._step, idx, device=self.device)
                            self.progress.peak_memory = max(self.progress.peak_memory, peak)
                        else:
                            out = self._step(idx)
                        loss, components, seconds = out
                        self.progress.add(loss, components, len(idx), seconds)
                        if len(self.step_losses) < self.settings.keep_step_losses:
                            self.step_losses.append(loss)
                        self.step_in_epoch = b + 1
                        self.global_step += 1
                    self.progress.wall_time = time.perf_counter() - epoch_start
                    record = self._finish_epoch()
                    self.history.append(record)
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.epoch_generator_state = None
                    self.progress = _EpochProgress()
                    self._save_checkpoint()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['train_loss']:.4g}", refresh=False)
                    if on_epoch_end is not None:
                        on_epoch_end(int(record["epoch"]), record)
                    if received:
                        raise TrainingInterrupted(received[0], self.epoch, 0)
        finally:
            bar.close()
            gc.unfreeze()
        return TrainingResult(
            self.history, self._final_metrics(), self.step_losses, self.resumed_from_epoch
        )

    def _final_metrics(self) -> dict[str, float]:
        if not self.history:
            return {"epochs": 0.0}
        last = self.history[-1]
        steps = [r["step_time_ms"] for r in self.history]
        return {
            "epochs": float(len(self.history)),
            "final_train_loss": last["train_loss"],
            "mean_step_time_ms": float(np.mean(steps)),
            "median_step_time_ms": float(np.median(steps)),
            "step_peak_memory_mib": max(r["step_peak_memory_mib"] for r in self.history),
            "train_time_s": float(sum(r["epoch_time_s"] for r in self.history)),
            "process_max_rss_mib": _max_rss_mib(),
            **(
                {
                    "final_valid_loss": last["valid_loss"],
                    "best_valid_loss": min(
                        r["valid_loss"] for r in self.history if "valid_loss" in r
                    ),
                }
                if "valid_loss" in last
                else {}
            ),
            **{
                f"final_{k}": v
                for k, v in last.items()
                if k.startswith("loss_") or k.startswith("n_")
            },
        }
