"""Readers for each data source `hpc-dualbatch prepare` can stage.

Each returns a `Source` (`data/source.py`, which says what a reader promises); every bad
input is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from hpc_dualbatch.atomic import file_kind
from hpc_dualbatch.data.cifar import read_cifar
from hpc_dualbatch.data.fashion_mnist import read_fashion_mnist
from hpc_dualbatch.data.source import Source, Split, array_split
from hpc_dualbatch.errors import DataError

SOURCES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # compared lower-case: ImageNet names its files *.JPEG


# --- Image folder (ImageNet style) -----------------------------------------------------------


def _list_folder(
    root: str, split_dir: str, classes: list[str] | None
) -> tuple[list[str], list[str], np.ndarray]:
    folder = os.path.join(root, split_dir)
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not found:
        raise DataError(
            f"image folder '{folder}' has no class sub-folders; expected {folder}/<class>/*.jpg|png"
        )
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(
                f"image folder '{folder}' has class folder '{extra[0]}' that train/ does not have"
            )
    files, labels = [], []
    for label, name in enumerate(classes):
        cdir = os.path.join(folder, name)
        if not os.path.isdir(cdir):
            continue  # a class absent from the validation split is allowed
        entries = [e for e in os.scandir(cdir) if e.name.lower().endswith(IMAGE_SUFFIXES)]
        odd = next((e.path for e in entries if not e.is_file()), None)  # (a FIFO would hang a reader)
        if odd is not None:
            raise DataError(f"image '{odd}' is {file_kind(odd)}, not a regular file; remove it from {cdir}")
        names = sorted(e.name for e in entries)
        if not names:
            raise DataError(f"class folder '{cdir}' holds no image files (*.jpg, *.jpeg, *.png)")
        files += [os.path.join(cdir, f) for f in names]
        labels += [label] * len(names)
    return classes, files, np.asarray(labels, dtype=np.int64)


def load_resized(path: str, resolutions: Sequence[int]) -> dict[int, np.ndarray]:
    """One image file -> {r: uint8 (3, r, r)}: the shorter side resized to r, then the centre r x r.

    Cropping the centred square of the original and resizing it in one step is the same geometry
    (the box is in float px) and samples the original pixels once per resolution.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            return {
                r: np.asarray(im.resize((r, r), Image.Resampling.LANCZOS, box=box)).transpose(2, 0, 1)
                for r in resolutions
            }
    except Image.DecompressionBombError as e:
        raise DataError(
            f"image file '{path}' is too large to decode safely ({e}); shrink it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels or remove it from the image folder"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image file '{path}' cannot be decoded: {e}") from None


def _files_split(files: list[str], labels: np.ndarray, workers: int) -> Split:
    chunk = 256  # images per written block: bounds memory to ~256 x 3 x r^2 bytes per resolution

    def blocks(resolutions: Sequence[int]) -> Iterator[dict[int, np.ndarray]]:
        def stack(items: list[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
            return {r: np.stack([it[r] for it in items]) for r in resolutions}

        if workers <= 1:
            for start in range(0, len(files), chunk):
                yield stack([load_resized(f, resolutions) for f in files[start : start + chunk]])
            return
        import functools
        import multiprocessing

        # fork: the children only run PIL and numpy, and start without re-importing the package.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            it = pool.imap(
                functools.partial(load_resized, resolutions=list(resolutions)), files, chunksize=16
            )
            items: list[dict[int, np.ndarray]] = []
            for item in it:
                items.append(item)
                if len(items) == chunk:
                    yield stack(items)
                    items = []
            if items:
                yield stack(items)

    return Split(labels=labels, blocks=blocks)


def read_imagefolder(root: str | None, workers: int = 1) -> Source:
    if not root:
        raise DataError("--input is required for imagefolder: a folder with train/<class>/ and val/<class>/")
    if not os.path.isdir(root):
        raise DataError(
            f"image folder '{root}' does not exist; expected train/<class>/*.jpg and val/<class>/"
        )
    val = next((d for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or val is None:
        raise DataError(f"image folder '{root}' must hold train/<class>/ and val/<class>/ (or test/<class>/)")
    classes, train_files, train_labels = _list_folder(root, "train", None)
    _, test_files, test_labels = _list_folder(root, val, classes)
    splits = {
        "train": _files_split(train_files, train_labels, workers),
        "test": _files_split(test_files, test_labels, workers),
    }
    return Source("imagefolder", classes, 3, 0, splits)


# --- Synthetic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    samples: int = 2000  # training samples
    test_samples: int = 500
    classes: int = 10
    channels: int = 3
    size: int = 32  # px, the original square size
    seed: int = 0
    noise: float = 0.15  # std of per-pixel Gaussian noise, in [0, 1] pixel units


def _smooth_field(rng: np.random.Generator, n: int, channels: int, size: int, cells: int) -> np.ndarray:
    """n random fields in [0, 1]: a cells x cells grid of values upsampled bilinearly to size x size."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(rng.random((n, channels, cells, cells), dtype=np.float32))
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True).numpy()


def make_synthetic(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic class-separable images: (train images, train labels, test images, test labels).

    Each class has a fixed smooth colour pattern; a sample is its class pattern shifted by up to
    +-size/8 px (so crops do not destroy it), mixed 65/35 with a sample-specific smooth distractor,
    plus pixel noise. A small CNN separates the classes within a few hundred steps, a linear model
    on raw pixels less well.
    """
    for name in ("samples", "test_samples", "classes", "channels", "size"):
        if getattr(spec, name) < 1:
            raise DataError(f"--synthetic-{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.classes < 2 or spec.size < 4 or spec.channels not in (1, 3):
        raise DataError(
            f"synthetic data needs >= 2 classes, size >= 4 px and 1 or 3 channels; "
            f"got {spec.classes} classes, {spec.size} px, {spec.channels} channels"
        )
    rng = np.random.default_rng(spec.seed)
    patterns = _smooth_field(rng, spec.classes, spec.channels, spec.size, cells=4)
    patterns = (patterns - patterns.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(
        patterns, axis=(1, 2, 3), keepdims=True
    )  # full contrast per class
    shift = max(1, spec.size // 8)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n, dtype=np.int64) % spec.classes  # balanced: n // classes (+1) per class
        rng.shuffle(labels)
        dy, dx = rng.integers(-shift, shift + 1, size=(2, n))
        base = np.stack([np.roll(patterns[c], (y, x), axis=(1, 2)) for c, y, x in zip(labels, dy, dx)])
        distractor = _smooth_field(rng, n, spec.channels, spec.size, cells=6)
        img = 0.65 * base + 0.35 * distractor + rng.normal(0.0, spec.noise, base.shape).astype(np.float32)
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), labels

    train_x, train_y = draw(spec.samples)
    test_x, test_y = draw(spec.test_samples)
    return train_x, train_y, test_x, test_y


def read_synthetic(spec: SyntheticSpec) -> Source:
    train_x, train_y, test_x, test_y = make_synthetic(spec)
    splits = {"train": array_split(train_x, train_y), "test": array_split(test_x, test_y)}
    return Source("synthetic", [f"class{i}" for i in range(spec.classes)], spec.channels, spec.size, splits)


def read_source(kind: str, path: str | None, *, synthetic: SyntheticSpec, workers: int = 1) -> Source:
    """Dispatch on the source kind; `path` is the input file or folder (unused for synthetic)."""
    if kind == "fashion-mnist":
        return read_fashion_mnist(path)
    if kind in ("cifar10", "cifar100"):
        return read_cifar(path, kind)
    if kind == "imagefolder":
        return read_imagefolder(path, workers)
    if kind == "synthetic":
        return read_synthetic(synthetic)
    raise DataError(f"unknown source '{kind}'; valid: {', '.join(SOURCES)}")
