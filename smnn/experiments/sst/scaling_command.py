"""``smnn sst-scaling``: the SST long-sequence study (rule ``sst_scaling``;
:mod:`smnn.experiments.sst.scaling`).

Reads ``--config`` (keys ``device``, ``seed``, ``threads``, ``sst.scaling.*``, ``sst.model.*``,
``sst.train.*``, ``mlflow.*``), measures one training step of the Mechanistic Identifier per
length and solver, prints one progress line per case (stderr), writes ``scaling.csv``,
``scaling.md`` and ``scaling.png`` into ``--out``, logs one MLflow run in the experiment ``sst``
(tagged by :func:`smnn.tracking.job_tags`) and ends with a line saying where the files are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smnn.experiments.sst.scaling import (
    MLFLOW_EXPERIMENT,
    OUTPUT_FILES,
    QUICK_TIME_BUDGET_S,
    TIME_BUDGET_S,
    ScalingSettings,
    log_scaling_run,
    run_study,
    write_outputs,
)
from smnn.job_options import add_tracking_arguments, prepare_output_dir, tracking_target
from smnn.jobs import add_job_arguments, clean_errors, job_settings, run_context, setup_logging
from smnn.tracking import job_tags

__all__ = ["add_parser", "run_command"]

EPILOG = f"""\
config keys read:
  device, seed, threads              auto|cpu|cuda, seed of the models and inputs, torch threads
  sst.scaling.lengths                sequence lengths (weeks), e.g. [52, 104, 208, 416, 1727]
  sst.scaling.solvers                smnn, mnn_dense, mnn_cg
  sst.scaling.batch_size             systems per step (two per pair)
  sst.scaling.repeats                timed steps per case (median)
  sst.scaling.memory_budget_gb       cases of any solver predicted above it are out_of_memory
                                     (null: 80 % of RAM, or of the GPU's memory)
  sst.scaling.time_budget            optional: seconds per step (--time-budget; default \
{TIME_BUDGET_S:g}, quick {QUICK_TIME_BUDGET_S:g})
  sst.model.*, sst.train.dtype, sst.train.lr   the Mechanistic Identifier and its optimiser
  mlflow.tracking_uri, mlflow.artifact_location, paths.results   where the MLflow run goes

statuses in scaling.csv: ok, out_of_memory (predicted memory over the budget: not run),
skipped_slow (a shorter length of the solver exceeded the time budget), failed (see note);
column converged: false where mnn_cg's CG stopped at its iteration cap, labelled
"mnn_cg (not converged)" in scaling.md, scaling.png and the progress lines

outputs in --out: {", ".join(OUTPUT_FILES)}
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sst-scaling",
        help="SST long-sequence study: training step time and peak memory against length",
        description="Time (median over repeats after a warm-up step) and peak memory of one "
        "training step of the SST Mechanistic Identifier (forward, loss, backward, Adam) "
        "against the sequence length, for each solver; a case is marked out of memory "
        "where its predicted memory exceeds the budget instead of being run, and MNN CG's "
        "cases are marked where CG did not converge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(p)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="one timed step per case and a time budget of "
                        f"{QUICK_TIME_BUDGET_S:g} s per step; outputs marked as quick")  # fmt: skip
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per step: once a case of a solver takes longer, its longer "
                        "lengths are skipped_slow (default: sst.scaling.time_budget, else "
                        f"{TIME_BUDGET_S:g})")  # fmt: skip
    add_tracking_arguments(p, MLFLOW_EXPERIMENT)
    p.set_defaults(func=run_command)


@clean_errors
def run_command(args: argparse.Namespace) -> int:
    from smnn.benchmark.measure import environment

    setup_logging()
    try:
        config, all_settings = job_settings(args.config, args.threads)
        context = run_context(config)
        threads, device = context.threads, context.device
        settings = ScalingSettings.from_config(
            config, model=all_settings["sst"], quick=args.quick, time_budget_s=args.time_budget
        )
        target = tracking_target(args, config)
        out = prepare_output_dir(args.out)
    except (ValueError, RuntimeError) as exc:  # ConfigError is a ValueError
        print(f"smnn sst-scaling: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"sst-scaling: lengths {list(settings.lengths)}, solvers {list(settings.solvers)}, "
        f"batch {settings.batch_size} systems, {settings.dtype}, {device}, {threads} thread(s), "
        f"time budget {settings.time_budget_s:g} s per step",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    table = run_study(settings, device)
    env = environment()
    comparison = write_outputs(table, out, settings, env)
    run_id = None
    if target is not None:
        tags = job_tags("sst_scaling", args.rule, args.config, device=str(device))
        run_id = log_scaling_run(target, out, table, comparison, settings, env, tags=tags,
                                 config_data=config.data)  # fmt: skip
    counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
    where = ", ".join(str(Path(out) / name) for name in OUTPUT_FILES)
    run = f"; MLflow run {run_id} in experiment {MLFLOW_EXPERIMENT}" if run_id else ""
    print(f"sst-scaling: {len(table)} cases ({counts}); wrote {where}{run}")
    return 0
