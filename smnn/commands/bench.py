"""``smnn bench``: the solver scaling benchmark (:mod:`smnn.benchmark`).

Settings come from ``--config`` (keys ``seed``, ``threads``, ``device``, the ``benchmark``
section and ``mlflow.*``; see :mod:`smnn.benchmark.run`), and any flag given overrides its key,
for hand use. Without ``--config`` the built-in defaults apply.

MLflow: with ``--config``, one run in the experiment ``benchmark`` wherever
:func:`smnn.tracking.resolve_tracking` points (config, then ``MLFLOW_TRACKING_URI``, then
``<paths.results>/mlflow.db``), tagged by :func:`smnn.tracking.job_tags` (git commit, ``--rule``,
config file). Without ``--config``: only when ``MLFLOW_TRACKING_URI`` is set. ``--mlflow-uri``
overrides the URI, ``--no-mlflow`` turns tracking off.

OpenMP wait policy: torch (its bundled libgomp) and numba's OpenMP threading layer (the system
libgomp) each keep a pool of worker threads, and by default an idle worker spins for a while
after each parallel region before it sleeps. Two pools spinning in turn on the same cores, or
beside other processes, stall every fork-join of the other pool: on a loaded 2-core machine a
forward+backward step with 2 threads took 3-40x longer than with 1 thread (B=64, T=256: 73-357
ms against 20-40 ms), and with ``OMP_WAIT_POLICY=PASSIVE`` (idle workers sleep at once) 2 threads
were as fast as 1 or faster (2.6-9.7 ms against 2.6-16 ms). The runtimes read the policy once,
when they load, so the ``smnn`` command line (:func:`smnn.cli.main`, for every command) sets
``OMP_WAIT_POLICY=PASSIVE`` when the environment leaves it unset and torch is not loaded yet;
bench.md and the MLflow params record the policy.
"""

from __future__ import annotations

import argparse
import sys

from smnn.benchmark.accuracy import reference_method
from smnn.benchmark.catalog import DEFAULT_METHODS, DTYPES, GROUPS, METHODS
from smnn.benchmark.contention import (
    CONTENTION_FILE,
    CONTENTION_REPEATS,
    QUICK_CONTENTION_REPEATS,
)
from smnn.benchmark.run import (
    OUTPUT_FILES,
    QUICK_TIME_BUDGET_S,
    TIME_BUDGET_S,
    options_from_config,
    plan_benchmark,
    run_plan,
)
from smnn.job_options import add_tracking_arguments, prepare_output_dir, tracking_target
from smnn.tracking import job_tags

try:  # the job preamble; smnn.commands.common before it moved to smnn.jobs
    from smnn.jobs import apply_threads, job_config
except ImportError:  # pragma: no cover - a checkout from before the move
    from smnn.commands.common import apply_threads, job_config

__all__ = ["add_parser", "run_command"]

_REFERENCE = f"{reference_method()} (qr where the installed solver has it, else sequential)"
EPILOG = f"""\
config keys read with --config (a flag given overrides its key):
  seed, threads, device              seed of the random inputs, torch threads, auto|cpu|cuda
  benchmark.quick                    --quick
  benchmark.methods, benchmark.dtypes, benchmark.groups   lists (--methods, --dtypes, --groups)
  benchmark.cases                    optional list of case names (--cases)
  benchmark.time_budget              --time-budget (null: {TIME_BUDGET_S:g} s, quick \
{QUICK_TIME_BUDGET_S:g} s)
  benchmark.repeats, benchmark.max_dense_bytes   optional (null: the defaults)
  benchmark.peers                    optional list of --peer values
  benchmark.contention               optional, --contention (default false)
  mlflow.tracking_uri, mlflow.artifact_location, paths.results   where the MLflow run goes

MLflow: with --config, resolved as every job does (config, then MLFLOW_TRACKING_URI, then
<paths.results>/mlflow.db); without it, only when MLFLOW_TRACKING_URI is set.

outputs in --out: {", ".join(OUTPUT_FILES)} (with --contention also {CONTENTION_FILE})

compilation: numba compiles the lane kernels (minutes on a fresh install) in untimed steps on
tiny shapes before each method's first case; it never counts against the time budget.

accuracy: every S-MNN method (and peer) is also compared with the float64 {_REFERENCE} solve of
the same problem: per system, max |u - u_ref| / max |u_ref|; median and max over the batch in
bench.csv (error_median, error_max), bench.md, MLflow and accuracy_T.png.

contention (--contention): after the grid, each named shape again with 1 and 2 threads
(alternating, {CONTENTION_REPEATS} rounds, quick {QUICK_CONTENTION_REPEATS}), first on the
machine as it is, then with a busy-loop process (one core taken) started beside it; the median
and the worst step of each go to {CONTENTION_FILE}, a bench.md section and MLflow. The
target (docs/solver.md, "Complexity and performance targets"): with one core taken, 2 threads no
slower than 1.

example, timing the authors' published solver beside ours (their file fetched by you into a
directory outside this repository):
  smnn bench --out results/benchmark --groups named --dtypes float64 \\
      --peer ~/.cache/smnn-peer/smnn.py:ode_forward=authors

case names: lorenz, kdv, sst, long_T16384, long_T65536, coupled (group named), T64 .. T65536
(T_sweep; quick: T64, T256, T1024, T4096), B1 .. B16384 (batch_sweep; quick: B1, B4, B16, B64)
"""


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time and peak memory of the solvers (forward+backward) against T and batch",
        description="Scaling benchmark of the solvers: forward+backward time (median of timed "
        "repeats after a warm-up step on the same shape) and peak memory of every method on "
        "the named shapes of docs/solver.md, 'Complexity and performance targets', a sweep over "
        "T and a sweep over the batch size; optionally beside other implementations of the same "
        "function (--peer).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--config",
        default=None,
        help="the pipeline's YAML config (keys below); default: built-in defaults",
    )
    p.add_argument(
        "--quick",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quick mode: trimmed sweeps, named shapes with scaled batch, median of "
        "3 repeats (default: benchmark.quick, else off)",
    )
    p.add_argument(
        "--methods",
        type=_csv_list,
        default=None,
        help=f"comma-separated, from {','.join(METHODS)} (default: benchmark.methods,"
        f" else {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--dtypes",
        type=_csv_list,
        default=None,
        help=f"comma-separated, from {','.join(DTYPES)} (default: benchmark.dtypes, else both)",
    )
    p.add_argument(
        "--groups",
        type=_csv_list,
        default=None,
        help=f"comma-separated shape groups to run, from {','.join(GROUPS)} "
        "(default: benchmark.groups, else all)",
    )
    p.add_argument(
        "--cases",
        type=_csv_list,
        default=None,
        help="comma-separated case names to run, e.g. lorenz,sst,T1024 (default: "
        "benchmark.cases, else every case of the groups)",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=None,
        metavar="PATH_OR_MODULE:FUNC[=LABEL]",
        help="another implementation of the same function, timed as one more "
        "method on every shape (same inputs, forward+backward): a .py file or "
        "an importable module, the function's name (called as FUNC(c, b, u0, "
        "h), batch first), and a label for the outputs (default: "
        "<stem>.<FUNC>); repeatable (default: benchmark.peers, else none)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per case after the warm-up step (default: "
        "benchmark.repeats, else 5, or 3 in quick mode)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds per step; once a case of a method and dtype takes longer, its "
        f"cases with as many unknowns or more are skipped (default: "
        f"benchmark.time_budget, else {TIME_BUDGET_S:g}, or "
        f"{QUICK_TIME_BUDGET_S:g} in quick mode)",
    )
    p.add_argument(
        "--max-dense-bytes",
        type=int,
        default=None,
        help="largest MNN dense matrix estimate to run (default: "
        "benchmark.max_dense_bytes, else 1/4 of RAM, at most 5e8 in quick mode)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the random inputs (default: seed, else 0)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; the compiled kernels follow it (default: "
        "threads, else torch's default)",
    )
    p.add_argument(
        "--contention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the named shapes with 1 and 2 threads, quiet and beside a "
        "busy-loop process that takes one core (median and worst step; "
        f"{CONTENTION_FILE}; default: benchmark.contention, else off)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: device, else auto)")
    add_tracking_arguments(p, "benchmark")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    try:
        config = job_config(args.config) if args.config else None
        options = options_from_config(config) if config is not None else {}
        if config is not None:
            apply_threads(config)
        flags = {
            "quick": args.quick,
            "methods": args.methods,
            "dtypes": args.dtypes,
            "groups": args.groups,
            "cases": args.cases,
            "peers": args.peer,
            "repeats": args.repeats,
            "time_budget_s": args.time_budget,
            "max_dense_bytes": args.max_dense_bytes,
            "seed": args.seed,
            "threads": args.threads,
            "device": args.device,
            "contention": args.contention,
        }
        options.update({k: v for k, v in flags.items() if v is not None})
        methods = options.pop("methods", DEFAULT_METHODS)
        dtypes = options.pop("dtypes", ("float64", "float32"))
        plan = plan_benchmark(methods, dtypes, **options)
        target = tracking_target(args, config)
        out = prepare_output_dir(args.out)
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"smnn bench: error: {exc}", file=sys.stderr)
        return 2
    tags = job_tags("benchmark", args.rule, args.config, device=str(plan.grid.device))
    table = run_plan(
        plan,
        out,
        tracking=target,
        tags=tags,
        config_data=config.data if config is not None else None,
    )
    print((out / "bench.md").read_text(), end="")
    n_ok = int((table["status"] == "ok").sum())
    files = [*OUTPUT_FILES, *([CONTENTION_FILE] if plan.contention else [])]
    print(f"{n_ok} of {len(table)} cases measured; outputs in {out}: {', '.join(files)}")
    return 0
