"""`hpc-dualbatch` command line: one subcommand per concern.

Each command module exposes `register(subparsers)`, which adds its parser and
sets `func(args) -> int`. Errors of the package's own type are printed as one
line and exit non-zero (see `launch.run_main`).
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = (
    "hpc_dualbatch.commands.info",
    "hpc_dualbatch.commands.prepare",
    "hpc_dualbatch.commands.profile",
    "hpc_dualbatch.commands.plan",
    "hpc_dualbatch.commands.train",
    "hpc_dualbatch.commands.report",
    "hpc_dualbatch.commands.simulate",
    "hpc_dualbatch.bench",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="hpc-dualbatch",
        description="Hybrid dual-batch and cyclic progressive learning on MPI + Horovod.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hpc_dualbatch.runtime.launch import run_main

    args = build_parser().parse_args(argv)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
