"""What every source reader returns, and the split of a source held in memory.

Every reader returns a `Source`: class names, channel count and, per split
(`train`, `test`), the labels plus a `blocks(resolutions)` generator that yields
consecutive blocks of samples as `{resolution: uint8 (n, C, r, r)}`. Each
resolution is computed from the ORIGINAL pixels (never from an already shrunk
copy); a resolution equal to the original square size is the source's bytes
unchanged. Every bad input is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from hpc_dualbatch.errors import DataError

BLOCK = 4096  # samples resized per step for in-memory sources: ~13 MB of float32 at 28 px
BLOCK_BYTES = 256 << 20  # ... fewer where the float32 copy at the largest resolution would exceed this

Blocks = Callable[[Sequence[int]], Iterator[dict[int, np.ndarray]]]


@dataclass
class Split:
    labels: np.ndarray  # int64 (N,)
    blocks: Blocks  # blocks(resolutions) -> consecutive {r: uint8 (n, C, r, r)} covering all N samples


@dataclass
class Source:
    kind: str
    classes: list[str]
    channels: int
    original_size: int  # side of the square source images in px; 0 when they vary (imagefolder)
    splits: dict[str, Split]


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, C, S, S) -> uint8 (n, C, size, size), antialiased bicubic; size == S returns the input."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images.astype(np.float32))
    # antialias=True widens the filter when shrinking (like PIL's resize), so no aliasing of fine texture.
    out = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def array_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """A split held in memory as uint8 (N, C, S, S): each resolution is resized from these pixels."""

    def blocks(resolutions: Sequence[int]) -> Iterator[dict[int, np.ndarray]]:
        # the resize works in float32: keep a block's copy at the largest resolution near BLOCK_BYTES
        per_sample = 4 * images.shape[1] * max(resolutions) ** 2
        step = max(1, min(BLOCK, BLOCK_BYTES // per_sample))
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            yield {r: resize_square(chunk, r) for r in resolutions}

    return Split(labels=labels.astype(np.int64), blocks=blocks)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse a label outside 0..num_classes - 1; `where` names the file (and member) it came from."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"{where}: label {int(bad)} is out of range; valid labels are 0..{num_classes - 1}")
