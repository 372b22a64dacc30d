"""What an experiment is, and the one registry of them.

An experiment (Lorenz, SST, KdV, or a user's own) is an instance of a subclass of
:class:`Experiment`. :data:`MEMBERS` lists every member the generic code uses, in one place;
:data:`REQUIRED` are those a subclass must define, the others have defaults here:

- ``name``: the config section, the ``{experiment}`` wildcard of the generic ``train`` and
  ``evaluate`` rules, the ``--experiment`` choice of ``smnn train``;
- ``title``, ``mlflow_experiment``, ``solvers`` (names of :mod:`smnn.solver.registry`);
- ``data_store`` (file name under ``paths.data`` that training and evaluation read), the
  ``data_rules`` that write it and the ``rule_file`` holding them;
- ``schema``: the JSON schema of its config section (it must require ``enabled`` and
  ``solvers``); ``resources``: Snakemake resources of its ``train`` and ``evaluate`` jobs;
- ``settings(config)``: its config section (and the global keys it needs) parsed once, at the
  job's edge, into a frozen settings tree; the cross-key checks live there and raise
  :class:`SettingsError` naming every key; everything below takes the settings;
- ``describe(settings)``, ``build_task``, ``model_payload``, ``evaluate``: what a job does.

Optional members (defaults here): ``baselines`` (trained models without a solver, e.g. SST's
Ada-GVAE; the generic ``train`` rule trains each into ``results/<experiment>/baseline_<name>/``
with ``build_baseline_task``, and ``evaluate`` receives their ``model.pt`` files as
``baseline_models``), ``extra_targets`` (files its own rule file writes that the default target
builds), ``commands`` (its own ``smnn`` subcommands, declared by name and module so that the
CLI imports a module only when its subcommand runs), ``train_document`` (what of ``model.pt``
goes into ``train_metrics.json``), ``summary_lines`` (its headline result in the workflow's
closing summary) and ``config_problems`` (the cross-key problems of a config, for the
validation message).

Experiments outside the package (a user's own, or the tests') are registered by naming their
modules in the environment variable ``SMNN_EXPERIMENTS`` (comma-separated, importable modules);
each such module defines ``EXPERIMENT``, an instance of an :class:`Experiment` subclass. The
variable is read when :func:`experiments` is called, so the Snakemake process and every job it
starts (locally or on SLURM, which pass the environment on) see the same registry.

This module and the packages' ``__init__`` modules import nothing heavy (no torch): the CLI
reads the registry to list the commands.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smnn.config import ConfigError, SettingsError
from smnn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from smnn.config import Config
    from smnn.training import TrainingTask

__all__ = [
    "Experiment",
    "Evaluation",
    "Command",
    "ExperimentError",
    "BUILTIN_EXPERIMENTS",
    "ENV_VAR",
    "MEMBERS",
    "REQUIRED",
    "RESERVED_SECTIONS",
    "experiments",
    "experiment_commands",
    "get_experiment",
    "load_schema",
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

# top-level config sections that are not experiments
RESERVED_SECTIONS = ("device", "seed", "threads", "paths", "mlflow", "standalone", "benchmark")


class ExperimentError(UserError, ValueError):
    """An unknown experiment, or one whose module does not satisfy :class:`Experiment`."""


@dataclass(frozen=True)
class Command:
    """An ``smnn`` subcommand of an experiment.

    Attributes:
        name: the subcommand (``generate-lorenz``).
        module: the module whose ``add_parser(subparsers)`` adds it (imported only when the
            subcommand runs; one module may add several subcommands).
        help: the one line ``smnn --help`` shows.
    """

    name: str
    module: str
    help: str


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


def load_schema(package_file: str) -> dict[str, Any]:
    """The ``schema.yaml`` beside ``package_file`` (an experiment package's ``__file__``)."""
    import yaml

    return yaml.safe_load(Path(package_file).with_name("schema.yaml").read_text())


class Experiment:
    """One experiment, as the generic commands and rules see it (see the module docstring).

    Subclasses set the class attributes of :data:`REQUIRED` and define its methods; the other
    members of :data:`MEMBERS` have the defaults below.
    """

    # ------------------------------------------------------------ required
    name: str
    title: str
    mlflow_experiment: str
    solvers: tuple[str, ...]
    data_store: str
    data_rules: tuple[str, ...]
    rule_file: Path
    resources: Mapping[str, Mapping[str, int]]

    @property
    def schema(self) -> Mapping[str, Any]:
        """The JSON schema of the config section (usually :func:`load_schema`)."""
        raise NotImplementedError

    def settings(self, config: Config) -> Any:
        """The experiment's settings: a frozen tree parsed from the (schema-valid) ``config``.

        Raises:
            SettingsError: keys that contradict each other, one message per key.
        """
        raise NotImplementedError

    def describe(self, settings: Any) -> str:
        """One paragraph on what a job does with ``settings`` (for logs)."""
        raise NotImplementedError

    def build_task(
        self,
        settings: Any,
        solver: str,
        data_path: Path,
        device: torch.device,
        threads: int | None = None,
    ) -> TrainingTask:
        """The training task (:class:`smnn.training.TrainingTask`) for one solver.
        ``threads``: the job's thread count (:class:`smnn.jobs.RunContext`), for the MNN
        layer (:class:`~smnn.experiments.mnn_layer.MnnLayer`, ``threads``); None: torch's
        count."""
        raise NotImplementedError

    def model_payload(self, task: TrainingTask) -> dict[str, Any]:
        """What ``model.pt`` holds besides the training history; must include ``state_dict``.
        May include ``summary`` (lines printed after training)."""
        raise NotImplementedError

    def evaluate(
        self,
        settings: Any,
        solver: str,
        data_path: Path,
        model_path: Path,
        out_dir: Path,
        device: torch.device,
        baseline_models: Mapping[str, Path] | None = None,
    ) -> Evaluation:
        """Evaluate a trained model: write ``out_dir/metrics.json`` and ``out_dir/plots/*.png``.

        ``metrics.json`` holds only what the config and data determine (no run ids, no
        timings), so the same config on the same machine gives the same bytes.
        ``baseline_models``: name -> ``model.pt`` of each trained baseline the config enables
        (None or empty for an experiment without baselines).
        """
        raise NotImplementedError

    # ------------------------------------------------------------ optional, with defaults
    baselines: tuple[str, ...] = ()
    commands: tuple[Command, ...] = ()

    def build_baseline_task(
        self, settings: Any, baseline: str, data_path: Path, device: torch.device
    ) -> TrainingTask:
        """The training task of the trained baseline ``baseline`` (one of ``baselines``)."""
        raise ExperimentError(
            f"experiment {self.name} has no trained baseline {baseline!r} "
            f"(baselines: {', '.join(self.baselines) or 'none'})"
        )

    def extra_targets(self, settings: Any) -> list[str]:
        """Files (relative to ``paths.results``) its own rule file writes and the default
        target builds (SST's long-sequence study)."""
        return []

    def train_document(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """What of ``model.pt``'s payload also goes into ``train_metrics.json``."""
        return {}

    def summary_lines(self, document: Mapping[str, Any]) -> list[str]:
        """The headline result of one evaluation (its ``metrics.json``) for the workflow's
        closing summary, a few short lines."""
        return []

    def config_problems(self, config: Config) -> list[str]:
        """The cross-key problems of ``config`` (schema-valid): those :meth:`settings` raises."""
        try:
            self.settings(config)
        except SettingsError as exc:
            return list(exc.problems)
        except ConfigError as exc:
            return [str(exc)]
        return []


# every member the generic code uses; REQUIRED: those without a default
MEMBERS = (
    "name", "title", "mlflow_experiment", "solvers", "data_store", "data_rules", "rule_file",
    "resources", "schema", "settings", "describe", "build_task", "model_payload", "evaluate",
    "baselines", "commands", "build_baseline_task", "extra_targets", "train_document",
    "summary_lines", "config_problems",
)  # fmt: skip
REQUIRED = MEMBERS[:14]


def _load(module_name: str) -> Experiment:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExperimentError(
            f"cannot import experiment module {module_name!r} ({exc}); check {ENV_VAR}"
        ) from exc
    exp = getattr(module, "EXPERIMENT", None)
    if not isinstance(exp, Experiment):
        raise ExperimentError(
            f"module {module_name} must define EXPERIMENT, an instance of a subclass of "
            "smnn.experiments.base.Experiment"
        )
    missing = []
    for member in REQUIRED:
        default = Experiment.__dict__.get(member)
        if default is None:  # an attribute without a default
            if not hasattr(exp, member):
                missing.append(member)
        elif getattr(type(exp), member, None) is default:  # a method not overridden
            missing.append(member)
    if missing:
        raise ExperimentError(
            f"experiment module {module_name} does not define {', '.join(missing)} "
            "(see smnn.experiments.base.REQUIRED)"
        )
    return exp


def _module_names(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    extra = [m.strip() for m in environ.get(ENV_VAR, "").split(",") if m.strip()]
    return [*BUILTIN_EXPERIMENTS.values(), *extra]


def _loaded(environ: Mapping[str, str] | None) -> dict[str, Experiment]:
    found: dict[str, Experiment] = {}
    for module_name in _module_names(environ):
        exp = _load(module_name)
        if exp.name in found:
            raise ExperimentError(f"two experiments are named {exp.name!r} ({module_name})")
        if exp.name in RESERVED_SECTIONS:
            raise ExperimentError(
                f"experiment name {exp.name!r} ({module_name}) is a reserved config section"
            )
        found[exp.name] = exp
    return found


def experiments(environ: Mapping[str, str] | None = None) -> dict[str, Experiment]:
    """Every registered experiment by name: the built-in ones, then those of ``SMNN_EXPERIMENTS``.

    Raises:
        ExperimentError: a module cannot be imported, lacks ``EXPERIMENT`` or a required member,
            two experiments share a name (or take a reserved config section name), or an
            experiment names unknown solvers or baselines that are solver names.
    """
    from smnn.solver.registry import solver_names

    found = _loaded(environ)
    for exp in found.values():
        unknown = [s for s in exp.solvers if s not in solver_names()]
        if unknown:
            raise ExperimentError(f"experiment {exp.name} names unknown solvers {unknown}")
        clash = [b for b in exp.baselines if b in solver_names()]
        if clash:
            raise ExperimentError(f"experiment {exp.name}: baselines {clash} are solver names")
    return found


def experiment_commands(environ: Mapping[str, str] | None = None) -> list[Command]:
    """The ``smnn`` subcommands of every registered experiment (imports no experiment code
    beyond the packages' light ``__init__`` modules)."""
    return [cmd for exp in _loaded(environ).values() for cmd in exp.commands]


def get_experiment(name: str, environ: Mapping[str, str] | None = None) -> Experiment:
    """The experiment called ``name``; the error lists the registered ones."""
    found = experiments(environ)
    if name not in found:
        raise ExperimentError(
            f"unknown experiment {name!r}; registered: {', '.join(found)} "
            f"(add your own through {ENV_VAR})"
        )
    return found[name]
