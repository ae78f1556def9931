"""The synthetic source: deterministic, class-separable images drawn from a seed (no input files).

`SyntheticSpec` holds the knobs (`hpc-dualbatch prepare --synthetic-*`); `read_synthetic`
returns the images as a `Source` (`data/source.py`) held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_dualbatch.data.source import Source, array_split
from hpc_dualbatch.errors import DataError


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
