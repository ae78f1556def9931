"""Copying a model's weights out (a push) and in (a reply): one copy per tensor, as FlatModel
did up to a24bf99, against one copy of the flat tensor the model's parameters and
BN buffers are views of (FlatModel now). Both in one invocation, alternated, per width.

    .venv/bin/python results/bench/flatcopy.py [--repeats 200] [--out results/bench/flatcopy.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from hpc_dualbatch.runtime.flat import FlatModel
from hpc_dualbatch.runtime.model import build_model


def per_tensor(tensors: list[torch.Tensor], w: np.ndarray) -> None:
    """The old out-and-in: a slice copy per tensor each way."""
    i = 0
    for t in tensors:
        n = t.numel()
        w[i : i + n] = t.detach().reshape(-1).numpy()
        i += n
    src, i = torch.from_numpy(w), 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(src[i : i + n].view_as(t))
            i += n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--widths", default="8,16,64")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for width in [int(x) for x in args.widths.split(",")]:
        torch.manual_seed(0)
        loose = build_model("resnet18_cifar", 10, 1, width)
        tensors = list(loose.parameters()) + [b for b in loose.buffers() if b.is_floating_point()]
        torch.manual_seed(0)
        flat = FlatModel(build_model("resnet18_cifar", 10, 1, width))
        w = flat.weights()
        old, new = [], []
        for _ in range(args.repeats):  # alternated, so drifting load falls on both alike
            t0 = time.perf_counter()
            per_tensor(tensors, w)
            t1 = time.perf_counter()
            flat.weights(w)
            flat.load_weights(w)
            t2 = time.perf_counter()
            old.append(t1 - t0)
            new.append(t2 - t1)
        row = {
            "width": width, "floats": flat.n_weights, "tensors": len(tensors),
            "per_tensor_ms": 1e3 * statistics.median(old), "flat_ms": 1e3 * statistics.median(new),
        }  # fmt: skip
        row["ratio"] = row["flat_ms"] / row["per_tensor_ms"]
        rows.append(row)
        print(
            f"width {width:3d}: {row['floats']:>10,} floats in {row['tensors']} tensors: out + in "
            f"per tensor {row['per_tensor_ms']:.3f} ms, flat {row['flat_ms']:.3f} ms ({row['ratio']:.2f}x), median of {args.repeats}"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
