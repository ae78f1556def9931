"""Benchmark: can the loader feed one training process at every staged resolution?

For each resolution it measures, on the same batches of the train split: plain numpy fancy
indexing of the in-memory array (the ceiling), `TrainLoader` with augmentation from memory and
streamed from the HDF5 file, and the images/s one process of `resnet18_cifar` consumes with
`engine.train_step`. The goal is loader / consumer >= 5, so that loading never stalls training.

    python -m hpc_dualbatch.bench.loader [--file data/fashion-mnist.h5] [--out results/bench/loader.json]

Without --file it stages Fashion-MNIST (or synthetic data where that is absent) into a
temporary folder first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import torch

from ..atomic import write_json
from ..config import OptimConfig
from ..data import TrainLoader, open_staged, prepare, shard_indices
from ..data.sources import FASHION_MNIST_DIR
from ..engine import make_optimizer, pick_device, train_step
from ..model import build_model


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hpc_dualbatch.bench.loader", description=__doc__.split("\n")[0]
    )
    p.add_argument("--file", help="a staged HDF5 file; default: stage --source into a temporary folder")
    p.add_argument("--source", default="", help="fashion-mnist (default where installed) or synthetic")
    p.add_argument("--resolutions", default="20,24,28", help="px, when staging")
    p.add_argument("--batch", type=int, default=128, help="samples per batch")
    p.add_argument("--batches", type=int, default=100, help="loader batches timed per resolution")
    p.add_argument(
        "--steps", type=int, default=4, help="training steps timed per resolution (after 1 warm-up)"
    )
    p.add_argument("--width", type=int, default=16, help="resnet18_cifar width (64 = the standard ResNet-18)")
    p.add_argument("--pad", type=int, default=2, help="crop padding in px at the largest resolution")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="results/bench/loader.json")
    return p.parse_args(argv)


def _rate(samples: int, seconds: float) -> float:
    return samples / max(seconds, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loader(loader: TrainLoader, device: torch.device) -> float:
    """Images/s of one full pass (the background thread's start-up included)."""
    start = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    _sync(device)
    return _rate(n, time.perf_counter() - start)


def _measure(staged, resolution: int, args: argparse.Namespace, device: torch.device) -> dict:
    n = staged.num_samples("train")
    idx = shard_indices(n, [n], 0, 0, 1, 0, seed=0)[: args.batch * args.batches]
    batches = [idx[i : i + args.batch] for i in range(0, len(idx), args.batch)]

    array = staged.images("train", resolution)[()] if staged.encoding == "raw" else None
    numpy_rate = None
    if array is not None:
        for b in batches[:2]:
            _ = array[b]  # first touch of the pages is not part of the steady state
        start = time.perf_counter()
        for b in batches:
            _ = array[b]
        numpy_rate = _rate(len(idx), time.perf_counter() - start)

    common = dict(augment=True, flip=True, pad=args.pad, seed=0, device=device, prefetch=2)
    memory = TrainLoader(staged, "train", resolution, idx, args.batch, in_memory="always", **common)
    stream = TrainLoader(staged, "train", resolution, idx, args.batch, in_memory="never", **common)
    memory_rate, stream_rate = _time_loader(memory, device), _time_loader(stream, device)

    torch.manual_seed(0)
    model = build_model("resnet18_cifar", staged.num_classes, staged.channels, args.width).to(device)
    opt = make_optimizer(model, OptimConfig(), lr=0.05)
    model.train()
    steps = iter(memory)
    train_step(model, opt, *next(steps))  # warm-up: allocator and kernel selection
    timed = [next(steps) for _ in range(min(args.steps, len(memory) - 1))]
    _sync(device)
    start = time.perf_counter()
    for x, y in timed:
        train_step(model, opt, x, y)
    _sync(device)
    consumer_rate = _rate(sum(len(y) for _, y in timed), time.perf_counter() - start)
    steps.close()
    return {
        "resolution": resolution,
        "stored_bytes": staged.stored_bytes("train", resolution),
        "numpy_img_s": numpy_rate,
        "loader_img_s": memory_rate,
        "loader_stream_img_s": stream_rate,
        "consumer_img_s": consumer_rate,
        "ratio": memory_rate / consumer_rate,
        "ratio_stream": stream_rate / consumer_rate,
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'res':>4} {'MiB':>7} {'numpy img/s':>12} {'loader img/s':>13} {'stream img/s':>13} "
        f"{'train img/s':>12} {'loader/train':>13} {'stream/train':>13}"
    )
    lines = [head]
    for r in rows:
        numpy_rate = f"{r['numpy_img_s']:12,.0f}" if r["numpy_img_s"] else f"{'-':>12}"
        lines.append(
            f"{r['resolution']:>4} {r['stored_bytes'] / 2**20:7.1f} {numpy_rate} {r['loader_img_s']:13,.0f} "
            f"{r['loader_stream_img_s']:13,.0f} {r['consumer_img_s']:12,.0f} {r['ratio']:12.1f}x "
            f"{r['ratio_stream']:12.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if not path:
            source = args.source or ("fashion-mnist" if os.path.isdir(FASHION_MNIST_DIR) else "synthetic")
            path = os.path.join(tmp, f"{source}.h5")
            prepare(source, None, args.resolutions, path)
        staged = open_staged(path)
        rows = [_measure(staged, r, args, device) for r in staged.resolutions]
        result = {
            "command": " ".join(["python -m hpc_dualbatch.bench.loader", *argv]),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "source": staged.source,
            "file": args.file,
            "file_bytes": os.path.getsize(path),
            "encoding": staged.encoding,
            "train_samples": staged.num_samples("train"),
            "batch": args.batch,
            "width": args.width,
            "rows": rows,
        }
    print(
        f"{staged.source}, {result['file_bytes'] / 2**20:.1f} MiB file, batch {args.batch}, device {device}, "
        f"{result['torch_threads']} torch threads, resnet18_cifar width {args.width}"
    )
    print(_table(rows))
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
