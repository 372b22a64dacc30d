"""The ``smnn`` command line: one subcommand per pipeline stage.

Every subcommand is declared by name, module and one line of help: the generic ones in
:data:`GENERIC_COMMANDS`, each experiment's own in its ``commands``
(:class:`smnn.experiments.base.Command`, read from the registry). A module defines
``add_parser(subparsers)``, which adds its subcommand(s) with ``func`` set to a callable taking
the parsed ``argparse.Namespace`` and returning an exit code. Only the module of the subcommand
that runs is imported, so ``smnn --help`` imports no experiment, solver or data code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from smnn.experiments.base import Command, experiment_commands

__all__ = ["GENERIC_COMMANDS", "commands", "build_parser", "main"]

# the subcommands that belong to no experiment, in the order `smnn --help` lists them (the
# experiments' own follow, then train and evaluate)
GENERIC_COMMANDS: tuple[Command, ...] = (
    Command(
        "standalone",
        "smnn.commands.standalone",
        "validate the solvers on linear ODEs with closed-form solutions",
    ),
    Command(
        "bench",
        "smnn.commands.bench",
        "time and peak memory of the solvers (forward+backward) against T and batch",
    ),
    Command(
        "tracking-init",
        "smnn.commands.tracking",
        "check and create the MLflow tracking store and the experiments",
    ),
    Command(
        "tracking-server",
        "smnn.commands.tracking",
        "run an MLflow tracking server for cluster jobs (database on a local disk)",
    ),
)
JOB_COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        "smnn.commands.experiment",
        "train one experiment with one solver (resumable, tracked in MLflow)",
    ),
    Command(
        "evaluate",
        "smnn.commands.experiment",
        "evaluate a trained model: metrics.json and plots, tracked in MLflow",
    ),
)


def commands() -> list[Command]:
    """Every subcommand: the generic ones, the experiments' own, train and evaluate."""
    return [*GENERIC_COMMANDS, *experiment_commands(), *JOB_COMMANDS]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the subcommand ``command`` (and those its module adds too) complete, every
    other subcommand only named (enough for ``smnn --help``). ``command="all"``: every
    subcommand complete (imports every module)."""
    from smnn import __version__

    parser = argparse.ArgumentParser(
        prog="smnn", description="Scalable Mechanistic Neural Networks: solver and experiments."
    )
    parser.add_argument("--version", action="version", version=f"smnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    declared = commands()
    full = {c.module for c in declared if command in ("all", c.name)}
    added: set[str] = set()
    for cmd in declared:
        if cmd.module in full:
            if cmd.module not in added:
                importlib.import_module(cmd.module).add_parser(sub)
                added.add(cmd.module)
        else:
            sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    if "torch" not in sys.modules:
        # before torch and numba load their OpenMP runtimes (two libgomp copies, one pool
        # each): idle workers of one pool then sleep instead of spinning beside the other's
        # (2 threads 2-7x slower than 1 with the default policy, faster with this one:
        # docs/experiments.md, "Threads under contention")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
