"""``smnn tracking-init``: create the MLflow store and the experiments once, before jobs start."""

from __future__ import annotations

import argparse

from smnn.commands.common import clean_errors, job_config, setup_logging
from smnn.tracking import init_tracking_store, mlflow_experiments, resolve_tracking

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tracking-init",
        help="create the MLflow tracking store and one experiment per registered experiment",
        description=(
            "Create the MLflow store (the SQLite schema for the default local store) and the "
            f"experiments {', '.join(mlflow_experiments())}. Idempotent; the workflow runs it "
            "in onstart so parallel jobs never race on the schema."
        ),
    )
    p.add_argument("--config", required=True, help="the pipeline's YAML config file")
    p.set_defaults(func=run)


@clean_errors
def run(args: argparse.Namespace) -> int:
    setup_logging()
    config = job_config(args.config)
    target = resolve_tracking(config)
    ids = init_tracking_store(target)
    print(f"MLflow tracking URI ({target.source}): {target.tracking_uri}")
    if target.artifact_root:
        print(f"artifact root: {target.artifact_root}")
    for name, exp_id in ids.items():
        print(f"  experiment {name}: id {exp_id}")
    return 0
