"""``smnn train`` and ``smnn evaluate``: one experiment's training and evaluation jobs.

Both work for every registered experiment (:mod:`smnn.experiments.base`): the experiment parses
its settings, builds its training task, says what ``model.pt`` holds and evaluates; everything
else here (the run context, the shared training loop with checkpoints and resume, MLflow runs,
the output files) is the same for all of them.

Train outputs (in ``--out``, written at the end, atomically): ``model.pt`` and
``train_metrics.json``. Resumable state lives in ``--out/checkpoints`` (not a workflow output,
since Snakemake deletes the outputs of failed jobs). Exit codes: 0 done, 2 bad input,
128 + signal after a signal (143 for SIGTERM; checkpoint saved, rerun to continue).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from smnn.config import Config, ConfigError, config_hash
from smnn.experiments.base import (
    BASELINE_PREFIX,
    Experiment,
    experiments,
    get_experiment,
)
from smnn.io import (
    StoreError,
    atomic_torch_save,
    atomic_write_json,
    read_json,
    verify_torch_file,
)
from smnn.jobs import (
    RunContext,
    add_job_arguments,
    clean_errors,
    job_settings,
    positive_int,
    run_context,
    setup_logging,
)
from smnn.solver.registry import solver_names
from smnn.tracking import RunTracker, end_abandoned_runs, job_tags, resolve_tracking

__all__ = ["add_parser", "run_train", "run_evaluate", "experiment_hash"]

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    registered = experiments()
    names = sorted(registered)
    baseline_names = sorted({b for exp in registered.values() for b in exp.baselines})
    for name, helptext in (
        ("train", "train one experiment with one solver (resumable, tracked in MLflow)"),
        ("evaluate", "evaluate a trained model: metrics.json and plots, tracked in MLflow"),
    ):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        p.add_argument(
            "--experiment", required=True, choices=names,
            help="the experiment (its config section and MLflow experiment)",
        )  # fmt: skip
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument(
            "--solver", choices=solver_names(),
            help="the solver of the model's MNN layer",
        )  # fmt: skip
        which.add_argument(
            "--baseline", choices=baseline_names,
            help="a trained baseline without a solver instead (one of the experiment's baselines)",
        )  # fmt: skip
        add_job_arguments(p)
        p.add_argument("--data", required=True, help="the experiment's Zarr store")
        p.add_argument(
            "--out", required=True,
            help="output directory (train: model.pt, train_metrics.json, checkpoints/; "
            "evaluate: metrics.json, plots/)",
        )  # fmt: skip
        p.add_argument(
            "--rule", default=None,
            help="the workflow rule running this job (an MLflow tag; default: the command)",
        )  # fmt: skip
        if name == "train":
            p.add_argument(
                "--max-epochs", type=positive_int, default=None,
                help="stop after this many epochs in total (for tests); default: the schedule",
            )  # fmt: skip
            p.set_defaults(func=run_train)
        else:
            p.add_argument("--model", required=True, help="model.pt written by `smnn train`")
            p.add_argument(
                "--baseline-model", action="append", default=[], metavar="NAME=PATH",
                help="model.pt of a trained baseline to compare against (repeatable)",
            )  # fmt: skip
            p.set_defaults(func=run_evaluate)


def experiment_hash(config: Config, experiment: str) -> str:
    """Hash of what determines a job's result: the seed and the experiment's section."""
    return config_hash({"seed": config.raw("seed"), experiment: config.section(experiment)})


def variant(args: argparse.Namespace) -> str:
    """What a job trains or evaluates: the solver name, or ``baseline_<name>``."""
    return args.solver if args.solver else f"{BASELINE_PREFIX}{args.baseline}"


def _tags(config: Config, args: argparse.Namespace, job: str, device: str) -> dict[str, str]:
    which = {"solver": args.solver} if args.solver else {"baseline": args.baseline}
    return job_tags(
        job,
        args.rule or f"{job}_{args.experiment}",
        args.config,
        {"experiment": args.experiment, **which},
        device=device,
        config_hash=experiment_hash(config, args.experiment),
    )


def _open_run(target, experiment: str, run_name: str, run_id: str | None, tags) -> RunTracker:
    """Resume ``run_id`` when it exists in the store, else start a new run."""
    if run_id is not None:
        try:
            tracker = RunTracker.resume(target, run_id)
            log.info("continuing MLflow run %s", run_id)
            return tracker
        except Exception as exc:  # the store was reset or points elsewhere
            log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, exc)
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


def _start_job(args: argparse.Namespace) -> tuple[Config, Experiment, Any, RunContext]:
    """What every train/evaluate job does first: logging, the config and the experiment's
    settings (parsed once), the experiment (checked against the solver), the run context
    (threads, device, seed)."""
    setup_logging()
    config, all_settings = job_settings(args.config, args.threads)
    experiment = get_experiment(args.experiment)
    if args.solver is not None and args.solver not in experiment.solvers:
        raise ConfigError(
            f"experiment {args.experiment} supports solvers {', '.join(experiment.solvers)}, "
            f"not {args.solver!r}"
        )
    if args.baseline is not None and args.baseline not in experiment.baselines:
        offered = ", ".join(experiment.baselines) or "none"
        raise ConfigError(
            f"experiment {args.experiment} has no baseline {args.baseline!r} (baselines: {offered})"
        )
    context = run_context(config)
    settings = all_settings[experiment.name]
    log.info("%s", experiment.describe(settings))
    return config, experiment, settings, context


@clean_errors
def run_train(args: argparse.Namespace) -> int:
    from smnn.training import Trainer, TrainerSettings, seed_everything

    config, experiment, settings, context = _start_job(args)
    seed, device = context.seed, context.device
    out = Path(args.out)
    seed_everything(seed)
    if args.baseline is not None:
        task = experiment.build_baseline_task(settings, args.baseline, Path(args.data), device)
    else:
        task = experiment.build_task(
            settings, args.solver, Path(args.data), device, threads=context.threads
        )
    out.mkdir(parents=True, exist_ok=True)
    identity = {
        "experiment": args.experiment,
        "solver": variant(args),
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
    with trainer:  # holds the checkpoint directory's lock (CheckpointLocked if another job has it)
        return _train(args, config, experiment, device, task, trainer, identity, out)


def _train(args, config, experiment, device, task, trainer, identity, out) -> int:
    from smnn.solver.mnn import record_convergence
    from smnn.training import TrainingInterrupted

    previous_run = trainer.restore()
    for note in trainer.recovery_notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    target = resolve_tracking(config)
    for run_id in end_abandoned_runs(target, trainer.abandoned_runs):
        print(
            f"warning: MLflow run {run_id} of the discarded checkpoints ended KILLED",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    for note in trainer.notices:
        print(f"note: {note}", file=sys.stderr, flush=True)
    tags = _tags(config, args, "train", device.type)
    tracker = _open_run(
        target, experiment.mlflow_experiment, f"{args.experiment}-{variant(args)}-train",
        previous_run, tags,
    )  # fmt: skip
    trainer.attach_run(tracker.run_id)
    tracker.log_config(config.data)
    tracker.set_tags(tags)
    if trainer.recovery_notes:
        tracker.set_tags(
            {
                "checkpoint_recovery": " | ".join(trainer.recovery_notes),
                "recovered_from": trainer.recovered_from or "fresh start",
            }
        )
    sync = _MetricSync(tracker)
    if trainer.restored:
        tracker.set_tags({"resumed_from_epoch": trainer.resumed_from_epoch})
        sync(trainer.history, trainer.step_losses)

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        sync(trainer.history, trainer.step_losses)

    print(
        f"training {args.experiment} {_what(args)} on {device.type}: "
        f"{trainer.n_epochs} epoch(s), {task.n_samples} samples, MLflow run {tracker.run_id}"
        + (f", resuming after epoch {trainer.epoch}" if trainer.restored else ""),
        flush=True,
    )
    with record_convergence() as cg:  # CG warnings -> one summary line and cg_* metrics
        try:
            result = trainer.fit(on_epoch_end)
        except TrainingInterrupted as exc:
            tracker.finish("KILLED")
            print(f"{exc}; rerun the same command to continue", file=sys.stderr, flush=True)
            return exc.exit_code
        except BaseException:
            tracker.finish("FAILED")
            raise
    if args.solver == "mnn_cg":
        print(cg.summary(), file=sys.stderr, flush=True)
        result.final_metrics.update(cg.as_metrics())  # train_metrics.json, model.pt, MLflow
        tracker.set_tags({"cg_converged": str(cg.converged).lower()})

    payload: dict[str, Any] = experiment.model_payload(task)
    payload.update(
        {
            "experiment": args.experiment,
            "solver": args.solver,
            "baseline": args.baseline,
            "run_id": tracker.run_id,
            "config_hash": identity["config_hash"],
            "history": result.history,
            "step_losses": result.step_losses,
            "final_metrics": result.final_metrics,
            "smnn_version": tags.get("smnn.version"),
        }
    )
    atomic_torch_save(payload, out / "model.pt")
    document = {
        "experiment": args.experiment,
        "solver": args.solver,
        "baseline": args.baseline,
        "run_id": tracker.run_id,
        "config_hash": identity["config_hash"],
        "device": device.type,
        "final_metrics": result.final_metrics,
        "history": result.history,
        "step_losses": result.step_losses,
        **experiment.train_document(payload),
    }
    atomic_write_json(document, out / "train_metrics.json")
    tracker.log_metrics(result.final_metrics, step=len(result.history))
    tracker.log_artifact(out / "train_metrics.json")
    tracker.log_pytorch_model(task.model, name="model")  # last: it ends the run FINISHED
    trainer.mark_finished()
    for line in payload.get("summary", []):
        print(line)
    print(
        f"done: final loss {result.final_metrics.get('final_train_loss', float('nan')):.6g}, "
        f"mean step {result.final_metrics.get('mean_step_time_ms', float('nan')):.1f} ms; "
        f"wrote {out / 'model.pt'} and {out / 'train_metrics.json'}"
    )
    return 0


def _what(args: argparse.Namespace) -> str:
    return f"with {args.solver}" if args.solver else f"baseline {args.baseline}"


def _baseline_models(items: list[str], experiment: Experiment) -> dict[str, Path]:
    """``NAME=PATH`` options -> {name: path}; each a baseline of ``experiment``, each a file."""
    models: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--baseline-model {item!r}: expected NAME=PATH")
        if name not in experiment.baselines:
            raise ConfigError(
                f"--baseline-model {item!r}: {experiment.name} has no baseline {name!r} "
                f"(baselines: {', '.join(experiment.baselines)})"
            )
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"baseline model {path} does not exist (train it first: smnn train "
                f"--experiment {experiment.name} --baseline {name})"
            )
        models[name] = Path(path)
    return models


def _check_evaluate_inputs(data: Path, models: list[Path]) -> None:
    """Refuse an evaluation whose inputs are missing or damaged before its MLflow run exists
    (a user's missing file is no FAILED run).

    Raises:
        StoreError: the data store does not exist, or a model file is damaged (checksums).
    """
    if not data.exists():
        raise StoreError(
            f"data store {data} does not exist; run the stage that writes it first "
            f"(snakemake {data})",
            data,
        )
    for model in models:
        remedy = f"rerun the job that writes it: snakemake --forcerun {model}"
        verify_torch_file(model, remedy=remedy)


@clean_errors
def run_evaluate(args: argparse.Namespace) -> int:
    from smnn.solver.mnn import record_convergence
    from smnn.training import seed_everything

    config, experiment, settings, context = _start_job(args)
    device = context.device
    seed_everything(context.seed)
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"model file {args.model} does not exist (train first)")
    target = resolve_tracking(config)
    tags = _tags(config, args, "evaluate", device.type)
    if args.baseline is not None:
        raise ConfigError(
            f"evaluate a solver's model: the baselines of {args.experiment} are evaluated "
            "beside it (--baseline-model NAME=PATH)"
        )
    if args.baseline_model and not experiment.baselines:
        raise ConfigError(f"experiment {args.experiment} has no baselines (--baseline-model)")
    baseline_models = _baseline_models(args.baseline_model, experiment)
    _check_evaluate_inputs(Path(args.data), [Path(args.model), *baseline_models.values()])
    tracker = _open_run(
        target, experiment.mlflow_experiment, f"{args.experiment}-{args.solver}-evaluate", None,
        tags,
    )  # fmt: skip
    out = Path(args.out)
    with tracker:  # FINISHED, or FAILED when evaluation raises
        tracker.log_config(config.data)
        with record_convergence() as cg:
            result = experiment.evaluate(
                settings, args.solver, Path(args.data), Path(args.model), out, device,
                baseline_models,
            )  # fmt: skip
        if args.solver == "mnn_cg":
            # merged with the training's record the evaluation may carry (Lorenz): an
            # evaluation that solved nothing never marks a non-converged model as converged
            cg_metrics = cg.merged_metrics(result.metrics)
            if cg.converged and cg_metrics["cg_converged"] == 0.0:
                print(
                    "mnn_cg did NOT converge in the training of this model (its cg_* metrics "
                    "are carried into metrics.json); the evaluation's own CG solves converged",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
            else:
                print(cg.summary(), file=sys.stderr, flush=True)
            result.metrics.update(cg_metrics)
            document = read_json(out / "metrics.json", "metrics file")
            atomic_write_json({**document, **cg_metrics}, out / "metrics.json")
            result.tags["cg_converged"] = str(cg_metrics["cg_converged"] == 1.0).lower()
        tracker.set_tags(result.tags)
        tracker.log_metrics(result.metrics)
        tracker.log_artifact(out / "metrics.json")
        for f in result.plots:
            tracker.log_artifact(f, "plots")
    for line in result.summary:
        print(line)
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"wrote {out / 'metrics.json'} and {len(result.plots)} plot(s) in {out / 'plots'}")
    return 0
