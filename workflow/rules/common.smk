# Helpers shared by the stage files: config validation, paths, targets, the effective config
# file, the MLflow store initialisation and the closing summary. Rule files hold rules only;
# functions live here (and their logic in the smnn package).

import json
import os
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from smnn.config import Config, ConfigError
from smnn.config_validation import check_config
from smnn.experiments.base import BASELINE_PREFIX, experiments
from smnn.io import atomic_write_text
from smnn.solver.registry import solver_names
from smnn.tracking import resolve_tracking

SOLVERS = list(solver_names())
EXPERIMENTS = experiments()  # name -> smnn.experiments.base.Experiment
ALL_BASELINES = sorted({b for exp in EXPERIMENTS.values() for b in exp.baselines})
# what `train` trains into results/{experiment}/{variant}/: a solver's model or a baseline
VARIANTS = SOLVERS + [f"{BASELINE_PREFIX}{b}" for b in ALL_BASELINES]
SETTINGS = {}  # experiment name -> its settings, built once by validate_workflow_config
# keys of an experiment section that do not change what training computes
NOT_TRAINING_KEYS = ("enabled", "solvers", "baselines", "evaluate")


# ------------------------------------------------------------------ config


def validate_workflow_config(cfg):
    """Validate the merged config in place (`--config` strings re-typed) and build every
    experiment's settings (SETTINGS), or stop the run."""
    overrides = dict(workflow.config_settings.config or {})
    try:
        checked, built = check_config(cfg, overrides, source="configuration")
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None
    cfg.clear()
    cfg.update(checked)
    SETTINGS.clear()
    SETTINGS.update(built)


# ------------------------------------------------------------------ paths and settings


def data_path(*parts):
    return str(Path(config["paths"]["data"], *parts))


def results_path(*parts):
    return str(Path(config["paths"]["results"], *parts))


def effective_config_path():
    """Where the validated, merged config is written for the jobs (see write_effective_config)."""
    return results_path("config", "effective.yaml")


def settings(*keys):
    """The config values at dotted `keys` as canonical JSON.

    Used as a rule parameter so that Snakemake's params rerun trigger reruns a job when (and only
    when) a setting it depends on changes.
    """
    picked = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


def train_settings(experiment):
    """What a training job of `experiment` depends on: seed, device and its section without
    the keys that only choose jobs or configure evaluation."""
    section = {k: v for k, v in config[experiment].items() if k not in NOT_TRAINING_KEYS}
    return json.dumps(
        {"seed": config["seed"], "device": config["device"], experiment: section},
        sort_keys=True,
        separators=(",", ":"),
    )


def evaluate_settings(experiment):
    return settings("seed", f"{experiment}.evaluate") if "evaluate" in config[experiment] else (
        settings("seed")
    )


def experiment_store(experiment):
    """The data store that training and evaluation of `experiment` read."""
    return data_path(EXPERIMENTS[experiment].data_store)


def baseline_models(experiment):
    """{name: model.pt} of the trained baselines that the config enables for `experiment`."""
    names = config[experiment].get("baselines", []) if EXPERIMENTS[experiment].baselines else []
    return {
        name: results_path(experiment, f"{BASELINE_PREFIX}{name}", "model.pt") for name in names
    }


def baseline_options(experiment):
    """The `smnn evaluate` options naming those models."""
    return " ".join(
        f"--baseline-model {name}={path}" for name, path in baseline_models(experiment).items()
    )


def variant_option(variant):
    """The `smnn train` option that picks `variant`: `--solver NAME` or `--baseline NAME`."""
    if variant.startswith(BASELINE_PREFIX):
        return f"--baseline {variant[len(BASELINE_PREFIX):]}"
    return f"--solver {variant}"


def experiment_resource(experiment, job, name):
    return EXPERIMENTS[experiment].resources[job][name]


def experiment_rule_files():
    """The data-rule files of the registered experiments (relative to the Snakefile, or
    absolute for experiments outside the package)."""
    return [str(Path(workflow.basedir, exp.rule_file)) for exp in EXPERIMENTS.values()]


# ------------------------------------------------------------------ targets


def standalone_targets():
    names = ["metrics.json", "errors.csv", "errors.md", "solutions.png"]
    return [results_path("standalone", n) for n in names]


def benchmark_targets():
    names = ["bench.csv", "bench.md", "floors.csv", "scaling_T.png", "scaling_batch.png"]
    return [results_path("benchmark", n) for n in names]


def experiment_targets(experiment):
    """The evaluation of every configured solver, and the experiment's own extra results
    (`extra_targets`, e.g. SST's long-sequence study), relative to the results directory."""
    evaluations = [
        results_path(experiment, solver, "eval", "metrics.json")
        for solver in config[experiment]["solvers"]
    ]
    own = EXPERIMENTS[experiment].extra_targets(SETTINGS[experiment])
    return evaluations + [results_path(p) for p in own]


def all_targets():
    """Everything the default target builds: each enabled stage and experiment."""
    targets = []
    if config["standalone"]["enabled"]:
        targets += standalone_targets()
    if config["benchmark"]["enabled"]:
        targets += benchmark_targets()
    for name in EXPERIMENTS:
        if config[name]["enabled"]:
            targets += experiment_targets(name)
    return targets


# ------------------------------------------------------------------ start and end of a run


def write_effective_config(cfg, path):
    """Write `cfg` as YAML to `path`, atomically, and only when the content changes.

    Every job reads this one file (`smnn ... --config results/config/effective.yaml`), so the
    jobs see exactly what this run validated, including --configfile and --config overrides,
    also on SLURM nodes. An unchanged file keeps its modification time.
    """
    text = (
        "# Written by the smnn workflow at the start of a run: the validated, merged config\n"
        "# (config/config.yaml + --configfile + --config). Do not edit; edit config/ instead.\n"
        + yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False)
    )
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    atomic_write_text(text, path)


def print_summary():
    """Where the results are, each experiment's headline result (its `summary_lines`) and how
    to look at the MLflow runs."""
    from smnn.solver.mnn import convergence_label  # here: torch only at the end, not per parse

    lines = ["", "smnn: the pipeline finished. Results:"]
    if config["standalone"]["enabled"]:
        lines.append(f"  standalone check:  {results_path('standalone', 'errors.md')}")
    if config["benchmark"]["enabled"]:
        lines.append(f"  solver benchmark:  {results_path('benchmark', 'bench.md')}")
    for name in EXPERIMENTS:
        if not config[name]["enabled"]:
            continue
        for solver in config[name]["solvers"]:
            path = Path(results_path(name, solver, "eval", "metrics.json"))
            try:
                document = json.loads(path.read_text())
            except (OSError, ValueError):
                document = None
            # "mnn_cg (not converged)" where its CG stopped at the cap (metrics cg_converged)
            label = convergence_label(solver, (document or {}).get("cg_converged"))
            lines.append(f"  {name} ({label}):  {path.parent}/ (metrics.json, plots/)")
            if document is None:
                continue
            for line in EXPERIMENTS[name].summary_lines(document):
                lines.append(f"      {line}")
    lines.append(
        f"  HTML report:  snakemake --report {results_path('report.html')}"
        " (then open it in a browser)"
    )
    target = resolve_tracking(Config(config, source="configuration"))
    if target.sqlite_path is None:
        lines.append(f"  MLflow runs:  {target.tracking_uri}")
    else:
        lines.append(
            f"  MLflow runs:  mlflow ui --backend-store-uri sqlite:///{target.sqlite_path}"
            "  (then http://127.0.0.1:5000; see README, 'Comparing runs in MLflow')"
        )
    print("\n".join(lines))


onstart:
    # Runs once in the main Snakemake process before any job (not in dry runs, not in jobs).
    write_effective_config(config, effective_config_path())
    Path(results_path("logs")).mkdir(parents=True, exist_ok=True)
    from smnn.experiments.base import experiments as registered_experiments

    # the registered experiments' MLflow experiments created once; on failure the log (its
    # one-line error) goes to the console too, not only to the log file
    shell(
        "smnn tracking-init --config {cfg} --experiments {names} > {logfile} 2>&1 "
        "|| {{ cat {logfile} >&2; exit 1; }}",
        cfg=effective_config_path(),
        names=" ".join(e.mlflow_experiment for e in registered_experiments().values()),
        logfile=results_path("logs", "tracking_init.log"),
    )
