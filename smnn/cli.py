"""The ``smnn`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module that defines ``add_parser(subparsers)``; the parser it
adds sets ``func`` to a callable taking the parsed ``argparse.Namespace``, returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path of every subcommand, in the order `smnn --help` lists them
COMMAND_MODULES: list[str] = [
    "smnn.commands.standalone",
    "smnn.commands.bench",
    "smnn.commands.tracking",
    "smnn.commands.generate_lorenz",
    "smnn.commands.download_sst",
    "smnn.commands.sst_data",
    "smnn.commands.kdv_data",
    "smnn.commands.experiment",
    "smnn.commands.sst_scaling",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smnn", description="Scalable Mechanistic Neural Networks: solver and experiments."
    )
    from smnn import __version__

    parser.add_argument("--version", action="version", version=f"smnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
