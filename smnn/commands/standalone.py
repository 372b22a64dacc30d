"""``smnn standalone``: the solvers on linear ODEs with closed-form solutions
(:mod:`smnn.standalone`, docs/experiments.md, standalone validation).

Settings come from ``--config`` (``threads``, ``device``, ``standalone.solvers`` when present,
``mlflow.*``); a flag given overrides its key. Without ``--config`` the built-in defaults apply
(every solver of the registry, CPU). The cases are fixed and deterministic, so ``seed`` plays
no part. MLflow: one run in the experiment ``standalone`` (:mod:`smnn.job_options`).
"""

from __future__ import annotations

import argparse
import sys

from smnn.config import Config
from smnn.job_options import add_tracking_arguments, prepare_output_dir, tracking_target
from smnn.jobs import apply_threads, job_config
from smnn.solver.registry import SOLVERS
from smnn.standalone.validate import OUTPUT_FILES, check_solvers, run_standalone
from smnn.tracking import job_tags

__all__ = ["add_parser", "run_command", "options_from_config"]

EPILOG = f"""\
config keys read with --config (a flag given overrides its key):
  threads, device                    torch threads; auto|cpu|cuda (the solves run there)
  standalone.solvers                 optional list of solvers (--solvers)
  mlflow.tracking_uri, mlflow.artifact_location, paths.results   where the MLflow run goes

MLflow: with --config, resolved as every job does (config, then MLFLOW_TRACKING_URI, then
<paths.results>/mlflow.db); without it, only when MLFLOW_TRACKING_URI is set.

outputs in --out: {", ".join(OUTPUT_FILES)}
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "standalone",
        help="validate the solvers on linear ODEs with closed-form solutions",
        description="Solve six linear ODEs with closed-form solutions (11 cases, T = 1000, "
        "step 0.01, float64) with every solver, and compare y, y', y'' with the closed form "
        "and with scipy's solve_ivp.",
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
        "--solvers",
        default=None,
        help=f"comma-separated subset of {','.join(SOLVERS)} (default: "
        "standalone.solvers, else all)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("auto", "cpu", "cuda"),
        help="where the solves run (default: device, else cpu)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: threads, else torch's default)",
    )
    add_tracking_arguments(p, "standalone")
    p.set_defaults(func=run_command)


def options_from_config(config: Config) -> dict:
    """``solvers`` (when ``standalone.solvers`` is present) and ``device`` from the config."""
    opts = {"device": config.get_str("device", choices=("auto", "cpu", "cuda"))}
    if config.has("standalone.solvers"):
        opts["solvers"] = config.get_str_list("standalone.solvers", choices=list(SOLVERS))
    return opts


def run_command(args: argparse.Namespace) -> int:
    import torch

    from smnn.devices import resolve_device

    try:
        config = job_config(args.config) if args.config else None
        opts = options_from_config(config) if config is not None else {}
        if config is not None:
            apply_threads(config)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.solvers is not None:
            opts["solvers"] = [s.strip() for s in args.solvers.split(",") if s.strip()]
        if args.device is not None:
            opts["device"] = args.device
        solvers = check_solvers(opts.get("solvers"))
        device = resolve_device(
            opts.get("device", "cpu"), what="--device" if args.device is not None else "device"
        )
        target = tracking_target(args, config)
        out = prepare_output_dir(args.out)
    except (ValueError, RuntimeError) as exc:  # ConfigError is a ValueError; no CUDA
        print(f"smnn standalone: error: {exc}", file=sys.stderr)
        return 2
    tags = job_tags("standalone", args.rule, args.config, device=str(device))
    metrics = run_standalone(
        out,
        solvers,
        device=device,
        tracking=target,
        tags=tags,
        config_data=config.data if config is not None else None,
    )
    print((out / "errors.md").read_text(), end="")
    n = sum(1 for c in metrics["cases"] if c["solver"] != "closed_form")
    print(f"{n} solves; outputs in {out}: {', '.join(OUTPUT_FILES)}")
    return 0
