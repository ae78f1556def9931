"""`hpc-dualbatch bench SUITE [options]`: benchmarks that print ratios measured side by side.

Each suite is a module `hpc_dualbatch.bench.<suite>` with `main(argv) -> int`; what they share
is in `_harness.py`, what each measures and why in docs/bench.md. Benchmarks are commands, never
timed tests: absolute times on a shared machine drift, ratios measured in one run do not.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Any


def suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def run(args: argparse.Namespace) -> int:
    if args.suite not in suites():
        raise SystemExit(f"unknown bench suite '{args.suite}'; available: {', '.join(suites())}")
    return int(importlib.import_module(f"{__name__}.{args.suite}").main(args.options) or 0)


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help=f"benchmarks ({', '.join(suites())}); SUITE --help for options")
    p.add_argument("suite", help="suite name")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the suite")
    p.set_defaults(func=run)
