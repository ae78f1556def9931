"""Which samples each rank trains on (pure functions), and the batch loaders over a staged file.

`shard_indices` / `eval_indices` decide the samples without any communication: every rank
computes the same permutation from (seed, round) and takes its own part. The loaders turn a
list of indices into normalised float32 NCHW batches on the training device, with the
augmentation done on uint8 tensors and the loading overlapped with compute by a background
thread. Nothing here touches a communicator.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hpc_dualbatch.config import CHOICES
from hpc_dualbatch.data.staged import StagedData
from hpc_dualbatch.errors import DataError

ASSIGNMENTS = CHOICES["data.assignment"]
IN_MEMORY = ("auto", "always", "never")


# --- sharding ------------------------------------------------------------------------------------


def _rank_part(group_indices: np.ndarray, rank: int, group_size: int) -> np.ndarray:
    """Split a group's samples disjointly over its ranks; sizes differ by at most one."""
    return np.array_split(group_indices, group_size)[rank].astype(np.int64)


def shard_indices(
    num_samples: int,
    shares: Sequence[int],
    group: int,
    rank: int,
    group_size: int,
    round_idx: int,
    seed: int,
    assignment: str = "partition",
) -> np.ndarray:
    """The sample indices rank `rank` of worker group `group` trains on in mini-epoch `round_idx`.

    shares[g] is the number of samples group g processes per mini-epoch (d_L or d_S of the plan;
    a group's own entry may be a share the server cut, which takes a prefix of its slice).
    partition: one permutation of all samples per (seed, round_idx); group g takes the consecutive
      slice after the shares of groups < g, wrapping around when the shares add up to more than
      num_samples (the slices are disjoint while they fit).
    reshuffle (the authors' code): group g permutes all samples with (seed, round_idx, g) and takes
      the first shares[g] (wrapping when shares[g] > num_samples).
    Seeds and round indices must be >= 0.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= group < len(shares) or not 0 <= rank < group_size:
        raise ValueError(f"group {group} of {len(shares)} / rank {rank} of {group_size} out of range")
    if min(shares) < 0:
        raise ValueError(f"shares must be >= 0, got {list(shares)}")
    if assignment == "partition":
        perm = np.random.default_rng([seed, round_idx]).permutation(num_samples)
        start = int(sum(shares[:group]))
    elif assignment == "reshuffle":
        perm = np.random.default_rng([seed, round_idx, group]).permutation(num_samples)
        start = 0
    else:
        raise ValueError(f"assignment '{assignment}' is not one of {ASSIGNMENTS}")
    positions = np.arange(start, start + int(shares[group])) % num_samples
    return _rank_part(perm[positions], rank, group_size)


def eval_indices(num_samples: int, rank: int, size: int) -> np.ndarray:
    """A contiguous block of the evaluation split per rank; the blocks cover it exactly once."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    return _rank_part(np.arange(num_samples), rank, size)


# --- pixels: memory cache or streamed reads ---------------------------------------------------------

_MEMORY: dict[tuple, np.ndarray] = {}  # (path, file signature, split, resolution) -> all images
_MEMORY_LOCK = threading.Lock()


def clear_memory_cache() -> None:
    """Forget the resolutions loaded into memory (they are otherwise kept for the process's life)."""
    with _MEMORY_LOCK:
        _MEMORY.clear()


def _read_error(staged: StagedData, what: str, e: Exception) -> DataError:
    return DataError(
        f"staged data file '{staged.path}': reading {what} failed ({e}); the file may be truncated or "
        f"corrupt: re-create it with `hpc-dualbatch prepare --force`"
    )


def _decode(buf: np.ndarray, channels: int, resolution: int, staged: StagedData) -> np.ndarray:
    """JPEG bytes -> uint8 (C, r, r)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _read_error(staged, f"a JPEG image at {resolution} px", e) from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.shape != (channels, resolution, resolution):
        raise _read_error(staged, "a JPEG image", ValueError(f"decoded shape {arr.shape}"))
    return arr


class _Pixels:
    """uint8 (n, C, r, r) for any index array, from memory or from the HDF5 file."""

    def __init__(self, staged: StagedData, split: str, resolution: int, in_memory: str, max_mb: int) -> None:
        if in_memory not in IN_MEMORY:
            raise ValueError(f"in_memory '{in_memory}' is not one of {IN_MEMORY}")
        self.staged, self.split, self.resolution = staged, split, resolution
        staged.check_unchanged()  # every mini-epoch opens its loaders: a changed file stops the run here
        self.ds = staged.images(split, resolution)
        self.jpeg = staged.encoding == "jpeg"
        key = (staged.path, staged.signature, split, resolution)
        self.memory = None
        if in_memory == "never":
            return
        with _MEMORY_LOCK:
            self.memory = _MEMORY.get(key)
            # RAM the cache would take: decoded uint8 for raw, the encoded bytes for jpeg
            size = staged.stored_bytes(split, resolution) if self.jpeg else self.ds.nbytes
            fits = size <= max_mb * 2**20
            if self.memory is None and (in_memory == "always" or fits):
                try:
                    self.memory = self.ds[()]  # one read of the whole resolution (object array for jpeg)
                except OSError as e:
                    raise _read_error(staged, f"{split}/images/{resolution}", e) from None
                staged.check_unchanged()  # the file did not change during the read
                for stale in [k for k in _MEMORY if k[0] == staged.path and k[1] != staged.signature]:
                    del _MEMORY[stale]  # an older version of a re-staged file
                _MEMORY[key] = self.memory

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if self.memory is not None:
            data = self.memory[idx]
        else:
            # h5py point selections need increasing, distinct indices: read those, then restore the order.
            uniq, inverse = np.unique(idx, return_inverse=True)
            try:
                if uniq[-1] - uniq[0] < 2 * len(uniq):
                    data = self.ds[uniq[0] : uniq[-1] + 1][uniq - uniq[0]]  # dense: one slice beats n points
                else:
                    data = self.ds[uniq]
            except OSError as e:
                raise _read_error(self.staged, f"{self.split}/images/{self.resolution}", e) from None
            # A truncated file reads as zeros, not as an error: check after each read that it is
            # still the file this run opened (one stat per batch).
            self.staged.check_unchanged()
            data = data[inverse]
        if self.jpeg:
            data = np.stack([_decode(b, self.staged.channels, self.resolution, self.staged) for b in data])
        return data


# --- augmentation ----------------------------------------------------------------------------------


def augment_batch(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop after `pad` px of zero padding, and a random horizontal flip, per sample.

    x: uint8 (B, C, H, W) on the CPU; padding with 0 is black, as torchvision's RandomCrop on
    images. All randomness comes from `gen`, so the same seed gives the same batches.
    """
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    mirror = torch.rand(b, generator=gen) < 0.5
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = dy[:, None] + torch.arange(h)  # (B, H) source row of each output row
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    if flip:
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    batch = torch.arange(b)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # a channels-last view: `standard_layout` makes the copy


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """x with the row-major strides of its shape: the layout of every batch a loader yields.

    `.contiguous()` is not enough: a (B, 1, H, W) batch with channels-last strides (H*W, 1, W, 1)
    counts as contiguous (the stride of a size-1 dimension is not looked at), and the CPU
    convolution backward of torch 2.14 corrupted the heap on such input with 2 or more threads
    ("double free or corruption", SIGSEGV: 5 of 6 demo runs at threads=4)."""
    want, step = [], 1
    for size in reversed(x.shape):
        want.append(step)
        step *= size
    if x.stride() == tuple(reversed(want)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


# --- loaders ---------------------------------------------------------------------------------------

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put unless the consumer has gone; polls so an abandoned producer thread can end."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class TrainLoader:
    """Batches of `indices` in their order: (x float32 (B, C, r, r) normalised, y int64 (B,)) on `device`.

    The last batch may be short, so exactly len(indices) samples are yielded. Each pass over the
    loader replays the same batches (the augmentation RNG restarts from `seed`): build a loader
    per mini-epoch with a new seed. `pad` is in px at the largest staged resolution and scales
    with `resolution` (at least 1 px when pad > 0). in_memory: `auto` loads the whole resolution
    into RAM when it stores at most `in_memory_max_mb` MiB, once per process (a later switch back
    to this resolution is free); `never` streams each batch from the file.
    """

    def __init__(
        self,
        staged: StagedData,
        split: str,
        resolution: int,
        indices: np.ndarray | Sequence[int],
        batch_size: int,
        *,
        augment: bool = True,
        flip: bool = True,
        pad: int = 2,
        seed: int = 0,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        in_memory: str = "auto",
        in_memory_max_mb: int = 2048,
    ) -> None:
        staged.check_resolutions([resolution])
        self.indices = np.asarray(indices, dtype=np.int64)
        n = staged.num_samples(split)
        if batch_size < 1 or prefetch < 0 or pad < 0:
            raise ValueError(f"batch_size {batch_size} must be >= 1, prefetch {prefetch} and pad {pad} >= 0")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}) for split '{split}' of '{staged.path}'")
        self.labels = staged.labels(split)
        self.batch_size, self.seed, self.prefetch = batch_size, seed, prefetch
        self.augment, self.flip = augment, flip
        self.pad = max(1, round(pad * resolution / max(staged.resolutions))) if pad else 0
        self.device = torch.device(device)
        std = torch.tensor(staged.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(staged.mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.shift = (-mean / std).to(self.device)
        self.pixels = _Pixels(staged, split, resolution, in_memory, in_memory_max_mb)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        cuda = self.device.type == "cuda"
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start : start + self.batch_size]
            x = torch.from_numpy(np.ascontiguousarray(self.pixels(idx)))
            if self.augment and (self.pad or self.flip):
                x = augment_batch(x, self.pad, self.flip, gen)
            x = standard_layout(x)  # the one place the layout entering the model is decided
            y = torch.from_numpy(self.labels[idx])  # fancy indexing copies: a writable int64 array
            if cuda:  # pinned host memory lets the copy run asynchronously to the compute stream
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=cuda).float().mul_(self.scale).add_(self.shift)
            yield x, y.to(self.device, non_blocking=cuda)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.prefetch == 0:
            yield from self._batches()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self._batches():
                    if not _put(q, batch, stop):
                        return
                _put(q, _END, stop)
            except BaseException as e:  # delivered to the consumer: it must not wait forever
                _put(q, _Failure(e), stop)

        thread = threading.Thread(target=produce, name="hpc_dualbatch-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()  # the consumer left early (break, exception) or finished: end the producer
            thread.join()


class EvalLoader(TrainLoader):
    """Batches of the `test` split (by default) in the order of `indices`, without augmentation."""

    def __init__(
        self,
        staged: StagedData,
        resolution: int,
        indices: np.ndarray | Sequence[int],
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        split: str = "test",
        prefetch: int = 2,
        in_memory: str = "auto",
        in_memory_max_mb: int = 2048,
    ) -> None:
        super().__init__(
            staged,
            split,
            resolution,
            indices,
            batch_size,
            augment=False,
            pad=0,
            device=device,
            prefetch=prefetch,
            in_memory=in_memory,
            in_memory_max_mb=in_memory_max_mb,
        )
