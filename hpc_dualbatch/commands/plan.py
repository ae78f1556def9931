"""`hpc-dualbatch plan`: the dual-batch plan of a config, printed and written as JSON.

    hpc-dualbatch plan --config hpc_dualbatch/configs/fashion_mnist.yaml [--samples D] [--out plan.json]

The planner itself is `method/plan.py` (pure functions; the plan record: `method/plan_record.py`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from hpc_dualbatch.errors import PlanError
from hpc_dualbatch.method.plan import plan_from_config, predicted_run_time, samples_per_epoch, timing_warning
from hpc_dualbatch.method.plan_record import format_plan, save_plan


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan B_S and the sample shares per resolution from the time model",
        description="Solves the dual-batch plan (method section 1) for the config's groups, k and "
        "resolutions, prints it and writes it as JSON.",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument("--samples", type=int, default=None, help="samples per epoch d (default: config / data)")
    p.add_argument("--out", default=None, help="plan JSON to write (default: <out>/plan.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpc_dualbatch.config import load_config, unused_keys
    from hpc_dualbatch.method.schedule import format_stage_table

    cfg = load_config(args.config, args.set)
    if args.samples is not None and args.samples < 1:
        raise PlanError(f"--samples must be >= 1, got {args.samples}")
    plan = plan_from_config(cfg, samples_per_epoch(cfg, args.samples))
    print(format_plan(plan, cfg.plan.factor))
    for unused in unused_keys(cfg):
        print(f"warning: {unused}")
    warning = timing_warning(cfg)
    if warning:
        print(warning)
    print(format_stage_table(cfg.schedule))
    if all(rp.epoch_time is not None for rp in plan.resolutions.values()):
        print(
            f"predicted run time: {predicted_run_time(plan, cfg.schedule):.1f} s "
            f"({cfg.schedule.epochs} epochs, compute only)"
        )
    out = args.out or os.path.join(cfg.out, "plan.json")
    try:
        save_plan(plan, out)
    except OSError as e:
        raise PlanError(f"cannot write the plan to {out}: {e.strerror or e}; choose another --out") from None
    print(f"wrote {out}")
    return 0
