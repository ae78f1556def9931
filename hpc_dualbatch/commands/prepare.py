"""`hpc-dualbatch prepare`: stage a data source into one HDF5 file per resolution set.

The staging itself is `data/stage.py`; the file layout and usage are in docs/data.md.
"""

from __future__ import annotations

import argparse
import os

from hpc_dualbatch.data.layout import COMPRESSIONS, ENCODINGS
from hpc_dualbatch.data.sources import SOURCES
from hpc_dualbatch.data.stage import prepare
from hpc_dualbatch.data.staged import open_staged
from hpc_dualbatch.data.synthetic import SyntheticSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="stage a data set into one HDF5 file at several resolutions",
        description="Stage a data set into one HDF5 file holding every training resolution "
        "(see docs/data.md). A re-run with the same arguments does nothing unless --force.",
    )
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument(
        "--input",
        help="fashion-mnist: folder of IDX .gz files (default /usr/share/datasets/fashion-mnist); "
        "cifar10/cifar100: cifar-10-python.tar.gz / cifar-100-python.tar.gz; "
        "imagefolder: folder with train/<class>/ and val/<class>/",
    )
    p.add_argument("--resolutions", required=True, help="comma-separated square sizes in px, e.g. 20,24,28")
    p.add_argument("--out", required=True, help="the HDF5 file to write, e.g. data/fashion-mnist.h5")
    p.add_argument(
        "--encoding", default="raw", choices=ENCODINGS, help="raw uint8 arrays, or JPEG bytes per image"
    )
    p.add_argument(
        "--compression", default="none", choices=COMPRESSIONS, help="HDF5 compression of raw images"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for --encoding jpeg (1..95)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding imagefolder images")
    p.add_argument("--force", action="store_true", help="re-stage even when the file matches the request")
    d = SyntheticSpec()
    p.add_argument("--synthetic-samples", type=int, default=d.samples, help="synthetic: training samples")
    p.add_argument(
        "--synthetic-test-samples", type=int, default=d.test_samples, help="synthetic: test samples"
    )
    p.add_argument("--synthetic-classes", type=int, default=d.classes, help="synthetic: number of classes")
    p.add_argument("--synthetic-channels", type=int, default=d.channels, choices=(1, 3))
    p.add_argument("--synthetic-size", type=int, default=d.size, help="synthetic: original size in px")
    p.add_argument("--synthetic-seed", type=int, default=d.seed)
    p.add_argument(
        "--synthetic-noise", type=float, default=d.noise, help="synthetic: pixel noise std, [0, 1] units"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = SyntheticSpec(
        samples=args.synthetic_samples,
        test_samples=args.synthetic_test_samples,
        classes=args.synthetic_classes,
        channels=args.synthetic_channels,
        size=args.synthetic_size,
        seed=args.synthetic_seed,
        noise=args.synthetic_noise,
    )
    prepare(
        args.source,
        args.input,
        args.resolutions,
        args.out,
        encoding=args.encoding,
        compression=args.compression,
        force=args.force,
        workers=args.workers,
        jpeg_quality=args.jpeg_quality,
        synthetic=spec,
    )
    staged = open_staged(args.out)
    print(
        f"{args.out}: {staged.source}, {staged.num_classes} classes, {staged.channels} channel(s), "
        f"train {staged.num_samples('train')} / test {staged.num_samples('test')} samples, "
        f"resolutions {staged.resolutions} px, {os.path.getsize(args.out) / 2**20:.1f} MiB"
    )
    return 0
