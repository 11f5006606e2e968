"""Private helpers shared by the file-based loaders: locating files and cache keys."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: A file's resolved path, modification time (ns) and size: changes when the file does.
FileStamp = tuple[str, int, int]


def stamp(paths: Iterable[Path]) -> tuple[FileStamp, ...]:
    """Cache key for a set of files, so that an in-process cache notices replaced files."""
    out = []
    for path in paths:
        st = path.stat()
        out.append((str(path.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


def first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    """Return ``directory / name`` for the first name in ``names`` that is a file."""
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 images ``(n, C, H, W)`` -> float32 tensor in ``[0, 1]`` (one copy, no loops)."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)


def labels_to_tensor(labels: np.ndarray | Sequence[int]) -> Tensor:
    """Integer labels -> int64 tensor of shape ``(n,)``."""
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"expected a 1-D integer label array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def check_label_range(labels: Tensor, num_classes: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if a label lies outside ``[0, num_classes)``."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), found range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
