"""The image-folder reader (ImageNet style): train/<class>/ and val/<class>/ (or test/) of image files.

Class names are the train/ folder names, sorted. Each image is decoded once (PIL, optionally
in `workers` processes) and resized from its original pixels to every resolution; the split
streams them to the writer in blocks (`data/source.py`), never holding the whole set in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from hpc_dualbatch.atomic import file_kind
from hpc_dualbatch.data.source import Source, Split
from hpc_dualbatch.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # compared lower-case: ImageNet names its files *.JPEG


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
