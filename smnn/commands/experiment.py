"""``smnn train`` and ``smnn evaluate``: one experiment's training and evaluation jobs.

An experiment is a module (see :data:`EXPERIMENT_MODULES`) that provides

- ``MLFLOW_EXPERIMENT`` (str) and ``SOLVERS`` (tuple of solver names it supports);
- ``build_task(config, solver, data_path, device) -> TrainingTask`` (:mod:`smnn.training`);
- ``model_payload(task) -> dict`` (what ``model.pt`` holds; it must include ``state_dict``);
- ``evaluate(config, solver, data_path, model_path, out_dir, device)
  -> (metrics, document, plot files)`` writing ``metrics.json`` and ``plots/*.png``.

Train outputs (in ``--out``, written at the end, atomically): ``model.pt`` and
``train_metrics.json``. Resumable state lives in ``--out/checkpoints`` (not a workflow output,
since Snakemake deletes the outputs of failed jobs). Exit codes: 0 done, 2 bad input,
128 + signal after a signal (143 for SIGTERM; checkpoint saved, rerun to continue).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from smnn.commands.common import apply_threads, clean_errors, job_config, setup_logging
from smnn.config import Config, ConfigError, config_hash
from smnn.tracking import RunTracker, git_commit, resolve_tracking
from smnn.training import (
    Trainer,
    TrainerSettings,
    TrainingInterrupted,
    atomic_torch_save,
    atomic_write_json,
    resolve_device,
    seed_everything,
)

__all__ = ["EXPERIMENT_MODULES", "add_parser", "run_train", "run_evaluate", "job_tags"]

log = logging.getLogger(__name__)

# experiment name -> module implementing it (SST and KdV add themselves here)
EXPERIMENT_MODULES: dict[str, str] = {
    "lorenz": "smnn.experiments.lorenz",
}
ALL_SOLVERS = ("smnn", "mnn_dense", "mnn_cg")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("train", "train one experiment with one solver (resumable, tracked in MLflow)"),
        ("evaluate", "evaluate a trained model: metrics.json and plots"),
    ):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--experiment", required=True, choices=sorted(EXPERIMENT_MODULES))
        p.add_argument("--solver", required=True, choices=ALL_SOLVERS)
        p.add_argument("--config", required=True, help="the pipeline's YAML config file")
        p.add_argument("--data", required=True, help="the experiment's Zarr store")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument(
            "--rule", default=None, help="workflow rule name (an MLflow tag; default: command)"
        )
        if name == "train":
            p.add_argument(
                "--max-epochs",
                type=_positive_int,
                default=None,
                help="stop after this many epochs in total (for tests); default: the schedule",
            )
            p.set_defaults(func=run_train)
        else:
            p.add_argument("--model", required=True, help="model.pt written by train")
            p.set_defaults(func=run_evaluate)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(config: Config):
    """The torch device for ``device`` (a missing GPU is a config error)."""
    try:
        return resolve_device(config.get_str("device", choices=("auto", "cpu", "cuda")))
    except RuntimeError as exc:
        raise ConfigError(f"{config.source}: device: {exc}") from exc


def _experiment_module(name: str) -> ModuleType:
    return importlib.import_module(EXPERIMENT_MODULES[name])


def _check_solver(module: ModuleType, experiment: str, solver: str) -> None:
    if solver not in module.SOLVERS:
        raise ConfigError(
            f"experiment {experiment} supports solvers {module.SOLVERS}, not {solver!r}"
        )


def experiment_hash(config: Config, experiment: str) -> str:
    """Hash of what determines a job's result: the seed and the experiment's section."""
    return config_hash({"seed": config.raw("seed"), experiment: config.section(experiment)})


def job_tags(
    config: Config, args: argparse.Namespace, job: str, device: str
) -> dict[str, str | None]:
    """MLflow tags of a train/evaluate run."""
    commit = git_commit()
    wildcards = {"experiment": args.experiment, "solver": args.solver}
    return {
        "smnn.job": job,
        "smnn.rule": args.rule or f"{job}_{args.experiment}",
        "smnn.wildcards": json.dumps(wildcards, sort_keys=True),
        "experiment": args.experiment,
        "solver": args.solver,
        "device": device,
        "config_hash": experiment_hash(config, args.experiment),
        "config_file": str(Path(args.config).resolve()),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "smnn.version": _version(),
    }


def _version() -> str:
    from smnn import __version__

    return __version__


def _open_run(target, experiment: str, run_name: str, run_id: str | None, tags) -> RunTracker:
    """Resume ``run_id`` when it exists in the store, else start a new run."""
    if run_id is not None:
        try:
            tracker = RunTracker.resume(target, run_id)
            log.info("continuing MLflow run %s", run_id)
            return tracker
        except Exception as exc:  # the store was reset or points elsewhere
            log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, exc)
    tags = {k: v for k, v in tags.items() if v is not None}
    tracker = RunTracker.start(target, experiment, run_name, tags)
    log.info("MLflow run %s in experiment %s", tracker.run_id, experiment)
    return tracker


class _MetricSync:
    """Logs per-epoch records and per-step losses to the run, each exactly once, also across
    restarts (a job killed between its checkpoint and its logging call catches up here)."""

    def __init__(self, tracker: RunTracker):
        self.tracker = tracker
        last_epoch = tracker.last_logged_step("train_loss")
        last_step = tracker.last_logged_step("step_loss")
        self.next_epoch = 0 if last_epoch is None else last_epoch + 1
        self.next_step = 0 if last_step is None else last_step + 1

    def __call__(self, history: list[dict[str, float]], step_losses: list[float]) -> None:
        for record in history:
            epoch = int(record["epoch"])
            if epoch >= self.next_epoch:
                metrics = {k: v for k, v in record.items() if k != "epoch"}
                self.tracker.log_metrics(metrics, step=epoch)
                self.next_epoch = epoch + 1
        if len(step_losses) > self.next_step:
            self.tracker.log_series("step_loss", step_losses[self.next_step :], self.next_step)
            self.next_step = len(step_losses)


def _start_job(args: argparse.Namespace):
    """What every train/evaluate job does first: logging, the config, the experiment module
    (checked against the solver), the thread count and the device."""
    setup_logging()
    config = job_config(args.config)
    module = _experiment_module(args.experiment)
    _check_solver(module, args.experiment, args.solver)
    apply_threads(config)
    return config, module, _device(config)


@clean_errors
def run_train(args: argparse.Namespace) -> int:
    config, module, device = _start_job(args)
    seed = config.get_int("seed", min_value=0)
    out = Path(args.out)
    seed_everything(seed)
    task = module.build_task(config, args.solver, args.data, device)
    out.mkdir(parents=True, exist_ok=True)
    identity = {
        "experiment": args.experiment,
        "solver": args.solver,
        "config_hash": experiment_hash(config, args.experiment),
        "device": device.type,
    }
    settings = TrainerSettings(
        checkpoint_dir=out / "checkpoints",
        seed=seed,
        device=device,
        identity=identity,
        max_epochs=args.max_epochs,
    )
    trainer = Trainer(task, settings)
    previous_run = trainer.restore()
    target = resolve_tracking(config)
    tags = job_tags(config, args, "train", device.type)
    tracker = _open_run(
        target, module.MLFLOW_EXPERIMENT, f"{args.experiment}-{args.solver}-train", previous_run,
        tags,
    )  # fmt: skip
    trainer.attach_run(tracker.run_id)
    tracker.log_config(config.data)
    tracker.set_tags({k: v for k, v in tags.items() if v is not None})
    sync = _MetricSync(tracker)
    if trainer.restored:
        tracker.set_tags({"resumed_from_epoch": trainer.resumed_from_epoch})
        sync(trainer.history, trainer.step_losses)

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        sync(trainer.history, trainer.step_losses)

    print(
        f"training {args.experiment} with {args.solver} on {device.type}: "
        f"{trainer.n_epochs} epoch(s), {task.n_samples} samples, MLflow run {tracker.run_id}"
        + (f", resuming after epoch {trainer.epoch}" if trainer.restored else ""),
        flush=True,
    )
    try:
        result = trainer.fit(on_epoch_end)
    except TrainingInterrupted as exc:
        tracker.finish("KILLED")
        print(f"{exc}; rerun the same command to continue", file=sys.stderr, flush=True)
        return exc.exit_code
    except BaseException:
        tracker.finish("FAILED")
        raise

    payload: dict[str, Any] = module.model_payload(task)
    payload.update(
        {
            "experiment": args.experiment,
            "solver": args.solver,
            "run_id": tracker.run_id,
            "config_hash": identity["config_hash"],
            "history": result.history,
            "step_losses": result.step_losses,
            "final_metrics": result.final_metrics,
            "smnn_version": _version(),
        }
    )
    atomic_torch_save(payload, out / "model.pt")
    document = {
        "experiment": args.experiment,
        "solver": args.solver,
        "run_id": tracker.run_id,
        "config_hash": identity["config_hash"],
        "device": device.type,
        "final_metrics": result.final_metrics,
        "history": result.history,
        "step_losses": result.step_losses,
        **{k: payload[k] for k in ("equations", "coefficients", "terms") if k in payload},
    }
    atomic_write_json(document, out / "train_metrics.json")
    tracker.log_metrics(result.final_metrics, step=len(result.history))
    tracker.log_artifact(out / "train_metrics.json")
    tracker.log_pytorch_model(task.model, name="model")  # last: it ends the run FINISHED
    trainer.mark_finished()
    for line in payload.get("equations", []):
        print(line)
    print(
        f"done: final loss {result.final_metrics.get('final_train_loss', float('nan')):.6g}, "
        f"mean step {result.final_metrics.get('mean_step_time_ms', float('nan')):.1f} ms; "
        f"wrote {out / 'model.pt'} and {out / 'train_metrics.json'}"
    )
    return 0


@clean_errors
def run_evaluate(args: argparse.Namespace) -> int:
    config, module, device = _start_job(args)
    seed_everything(config.get_int("seed", min_value=0))
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"model file {args.model} does not exist (train first)")
    target = resolve_tracking(config)
    tags = job_tags(config, args, "evaluate", device.type)
    tracker = _open_run(
        target, module.MLFLOW_EXPERIMENT, f"{args.experiment}-{args.solver}-evaluate", None, tags
    )
    tracker.log_config(config.data)
    try:
        metrics, document, files = module.evaluate(
            config, args.solver, args.data, args.model, args.out, device
        )
        tracker.set_tags({"train_run_id": document.get("train_run_id")})
        tracker.log_metrics(metrics)
        tracker.log_artifact(Path(args.out) / "metrics.json")
        for f in files:
            tracker.log_artifact(f, "plots")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    for line in document.get("equations", []):
        print(line)
    print(json.dumps(metrics, indent=2))
    return 0
