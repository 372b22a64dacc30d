"""What an experiment is, and the one registry of them.

An experiment (Lorenz, later SST and KdV) is an object satisfying :class:`Experiment`: its name
(the config section, the ``{experiment}`` wildcard of the generic ``train`` and ``evaluate``
rules, the ``--experiment`` choice of ``smnn train``), its MLflow experiment, the solvers it
supports, where its data store lives and which rule file writes it, the JSON schema of its config
section, and the three things a job does with it: build a training task, say what ``model.pt``
holds, and evaluate a trained model.

Everything generic reads :func:`experiments` and nothing else: the CLI choices, ``smnn
tracking-init`` (one MLflow experiment each), the config schema (one section each), the workflow's
targets and rule files, and the tests. Adding an experiment is its module (defining an object of
this protocol and listing it in :data:`BUILTIN_EXPERIMENTS`), its data rules and its config
section.

Trained baselines. An experiment may also compare against models that use no solver (SST's
Ada-GVAE). It then lists them in ``baselines`` and builds their tasks with
``build_baseline_task(config, name, data_path, device)``; its config section names the ones to
train in a ``baselines`` list (beside ``solvers``), the generic ``train_baseline`` rule trains each
into ``results/<experiment>/baseline_<name>/`` and ``evaluate`` receives their ``model.pt`` files
as ``baseline_models`` (name -> path). Experiments without baselines (Lorenz) need none of this:
:func:`baselines_of` reads the attribute with an empty default.

Extra results. An experiment may define ``extra_targets(section) -> list[str]``: files (relative
to ``paths.results``) its own rule file writes and the default target builds, given its config
section (SST's long-sequence study).

Experiments outside the package (a user's own, or the tests') are registered by naming their
modules in the environment variable ``SMNN_EXPERIMENTS`` (comma-separated, importable modules);
each such module defines ``EXPERIMENT``, an object of this protocol. The variable is read when
:func:`experiments` is called, so the Snakemake process and every job it starts (locally or on
SLURM, which pass the environment on) see the same registry.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from smnn.config import Config
    from smnn.training import TrainingTask

__all__ = [
    "Experiment",
    "Evaluation",
    "ExperimentError",
    "BUILTIN_EXPERIMENTS",
    "ENV_VAR",
    "experiments",
    "get_experiment",
    "experiment_names",
    "baselines_of",
    "BASELINE_PREFIX",
]

ENV_VAR = "SMNN_EXPERIMENTS"
# results/<experiment>/<BASELINE_PREFIX><name>/ holds a trained baseline (never a solver name)
BASELINE_PREFIX = "baseline_"

# name -> module defining EXPERIMENT
BUILTIN_EXPERIMENTS: dict[str, str] = {
    "lorenz": "smnn.experiments.lorenz",
    "sst": "smnn.experiments.sst",
    "kdv": "smnn.experiments.kdv",
}


class ExperimentError(ValueError):
    """An unknown experiment, or one whose module does not satisfy :class:`Experiment`."""


@dataclass
class Evaluation:
    """What :meth:`Experiment.evaluate` returns (it has written ``metrics.json`` and the plots).

    Attributes:
        metrics: the numeric metrics (MLflow metrics of the evaluate run).
        document: the whole content of ``metrics.json``.
        plots: the PNG files written (MLflow artifacts under ``plots/``).
        tags: extra MLflow tags of the evaluate run (e.g. ``train_run_id``).
        summary: lines to print at the end of the job (e.g. the recovered equations).
    """

    metrics: dict[str, float]
    document: dict[str, Any]
    plots: list[Path]
    tags: dict[str, str] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


@runtime_checkable
class Experiment(Protocol):
    """One of the paper's experiments, as the generic commands and rules see it.

    Attributes:
        name: config section, wildcard value and CLI choice (``lorenz``).
        title: human name for reports and logs (``Lorenz``).
        mlflow_experiment: the MLflow experiment its runs go to.
        solvers: the solver names (:mod:`smnn.solver.registry`) it can train with.
        data_store: file name under ``paths.data`` that training and evaluation read
            (``lorenz.zarr``); its data rules (in ``rule_file``) write it.
        data_rules: the names of those rules (for the docs, the SLURM profile and the tests).
        rule_file: the Snakemake file with the data rules (included by the Snakefile).
        schema: the JSON schema (a mapping) of its config section; it must require ``enabled``
            (boolean) and ``solvers`` (list of solver names), which the generic targets read.
        resources: Snakemake resources of its ``train`` and ``evaluate`` jobs, e.g.
            ``{"train": {"mem_mb": 8000, "runtime": 720}, "evaluate": {...}}``.
    """

    name: str
    title: str
    mlflow_experiment: str
    solvers: tuple[str, ...]
    data_store: str
    data_rules: tuple[str, ...]
    rule_file: Path
    schema: Mapping[str, Any]
    resources: Mapping[str, Mapping[str, int]]

    def summary(self, config: Config) -> str:
        """One paragraph on what a job of this experiment does with ``config`` (for logs)."""
        ...

    def build_task(
        self, config: Config, solver: str, data_path: Path, device: torch.device
    ) -> TrainingTask:
        """The training task (:class:`smnn.training.TrainingTask`) for one solver."""
        ...

    def model_payload(self, task: TrainingTask) -> dict[str, Any]:
        """What ``model.pt`` holds besides the training history; must include
        ``state_dict``. May include ``summary`` (lines printed after training)."""
        ...

    def evaluate(
        self,
        config: Config,
        solver: str,
        data_path: Path,
        model_path: Path,
        out_dir: Path,
        device: torch.device,
    ) -> Evaluation:
        """Evaluate a trained model: write ``out_dir/metrics.json`` and ``out_dir/plots/*.png``.

        ``metrics.json`` holds only what the config and data determine (no run ids, no
        timings), so the same config on the same machine gives the same bytes. An experiment
        with ``baselines`` also takes the keyword ``baseline_models`` (name -> ``model.pt`` of
        each trained baseline the config enables).
        """
        ...


def baselines_of(experiment: Experiment) -> tuple[str, ...]:
    """The trained baselines an experiment offers (empty for most; see the module docstring)."""
    return tuple(getattr(experiment, "baselines", ()))


_REQUIRED = (
    "name", "title", "mlflow_experiment", "solvers", "data_store", "data_rules", "rule_file",
    "schema", "resources", "summary", "build_task", "model_payload", "evaluate",
)  # fmt: skip


def _load(module_name: str) -> Experiment:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExperimentError(
            f"cannot import experiment module {module_name!r} ({exc}); check {ENV_VAR}"
        ) from exc
    exp = getattr(module, "EXPERIMENT", None)
    missing = [a for a in _REQUIRED if exp is None or not hasattr(exp, a)]
    if missing:
        raise ExperimentError(
            f"module {module_name} must define EXPERIMENT, an smnn.experiments.base.Experiment; "
            f"missing: {', '.join(missing)}"
        )
    return exp


def _module_names(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    extra = [m.strip() for m in environ.get(ENV_VAR, "").split(",") if m.strip()]
    return [*BUILTIN_EXPERIMENTS.values(), *extra]


def experiments(environ: Mapping[str, str] | None = None) -> dict[str, Experiment]:
    """Every registered experiment by name: the built-in ones, then those of ``SMNN_EXPERIMENTS``.

    Raises:
        ExperimentError: a module cannot be imported, lacks ``EXPERIMENT``, or two experiments
            share a name (or take a reserved config section name).
    """
    from smnn.solver.registry import solver_names

    found: dict[str, Experiment] = {}
    for module_name in _module_names(environ):
        exp = _load(module_name)
        if exp.name in found:
            raise ExperimentError(f"two experiments are named {exp.name!r} ({module_name})")
        if exp.name in RESERVED_SECTIONS:
            raise ExperimentError(
                f"experiment name {exp.name!r} ({module_name}) is a reserved config section"
            )
        unknown = [s for s in exp.solvers if s not in solver_names()]
        if unknown:
            raise ExperimentError(f"experiment {exp.name} names unknown solvers {unknown}")
        clash = [b for b in baselines_of(exp) if b in solver_names()]
        if clash:
            raise ExperimentError(f"experiment {exp.name}: baselines {clash} are solver names")
        if baselines_of(exp) and not hasattr(exp, "build_baseline_task"):
            raise ExperimentError(
                f"experiment {exp.name} ({module_name}) lists baselines but has no "
                "build_baseline_task"
            )
        found[exp.name] = exp
    return found


def experiment_names(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    return tuple(experiments(environ))


def get_experiment(name: str, environ: Mapping[str, str] | None = None) -> Experiment:
    """The experiment called ``name``; the error lists the registered ones."""
    found = experiments(environ)
    if name not in found:
        raise ExperimentError(
            f"unknown experiment {name!r}; registered: {', '.join(found)} "
            f"(add your own through {ENV_VAR})"
        )
    return found[name]


# top-level config sections that are not experiments
RESERVED_SECTIONS = ("device", "seed", "threads", "paths", "mlflow", "standalone", "benchmark")
