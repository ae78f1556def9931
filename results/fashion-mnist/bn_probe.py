"""Evaluate a finished run's final model with the BN statistics it was saved with and again
after the server's recalibration, on one process: the same weights both ways.

A `sync` run evaluates with Horovod's running statistics (each rank's own exponential mean over
its augmented training batches; the checkpoint holds rank 0's), the parameter server with
statistics recomputed on `server.bn_samples` fixed, unaugmented training images
(`server.bn: recalibrate`). Whether that difference alone moves the test accuracy is what the
grid's same-epoch comparison cannot say; this does, per run, without a second training run.
Test data is used for evaluation only.

    .venv/bin/python results/fashion-mnist/bn_probe.py RUN_DIR... > out.json

Each RUN_DIR needs its `config.yaml` and its final checkpoint (`checkpoints/`; the grid script
deletes them, so the runs it probes ran with their checkpoints kept). Prints one JSON object per
run: test accuracy with the saved statistics, after recalibration on `bn_samples` images, and
after recalibration on 4x as many (whether the sample size matters).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import torch

from hpc_dualbatch.config.load import load_config
from hpc_dualbatch.data.staged import open_staged
from hpc_dualbatch.method.schedule import stage_at
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.topology import Topology
from hpc_dualbatch.runtime.trainer import GroupTrainer


def probe(run: str) -> dict:
    cfg = load_config(os.path.join(run, "config.yaml"))
    path = C.latest(run)
    if path is None:
        raise SystemExit(f"{run}: no checkpoint under {run}/checkpoints (run it with its checkpoints kept)")
    ck = C.load(path)
    torch.set_num_threads(cfg.threads)
    staged = open_staged(cfg.data.path)
    one = Topology(None, 0, 1, "worker", 0, None, 0, 1, (0,), 0, 1)
    tr = GroupTrainer(cfg, staged, one, lambda opt, _named: opt, lambda _a: None)
    res = stage_at(cfg.schedule.epochs - 1, cfg.schedule).resolution  # the final evaluation's
    out = {"run": run, "checkpoint": os.path.basename(path), "commits": ck.commits, "resolution": res}
    tr.flat.load_weights(ck.weights)
    out["saved_stats"] = tr.evaluate(res)[1]
    for mult in (1, 4):
        tr.flat.load_weights(ck.weights)
        tr.cfg = replace(cfg, server=replace(cfg.server, bn_samples=cfg.server.bn_samples * mult))
        tr.recalibrate(res)
        out[f"recalibrated_{cfg.server.bn_samples * mult}"] = tr.evaluate(res)[1]
    return out


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print(json.dumps(probe(run)), flush=True)
