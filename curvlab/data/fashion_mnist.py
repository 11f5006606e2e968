"""Fashion-MNIST loader (60000 train / 10000 test grey 28x28 images, 10 classes).

Nothing is downloaded. The four IDX files (gzipped or not) are looked for, in order, in

1. the ``root`` argument, if given;
2. the directory named by the environment variable ``CURVLAB_FASHION_MNIST``, if set;
3. the Debian package directory ``/usr/share/datasets/fashion-mnist/``
   (``apt-get install dataset-fashion-mnist``);

and under each of these locations both flat (``<loc>/train-images-idx3-ubyte.gz``) and
torchvision-style (``<loc>/FashionMNIST/raw/train-images-idx3-ubyte[.gz]``). The first
location holding all four files wins. Decoded tensors are cached in-process.
"""

from __future__ import annotations

import os
from pathlib import Path

from curvlab.data._mnist_format import IDX_STEMS, find_idx_files, layout_dirs, load_idx_files
from curvlab.data.dataset import ArrayDataset

__all__ = ["DEBIAN_FASHION_MNIST_DIR", "FASHION_MNIST_ENV_VAR", "load_fashion_mnist"]

FASHION_MNIST_ENV_VAR = "CURVLAB_FASHION_MNIST"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_TORCHVISION_NAME = "FashionMNIST"
_INSTALL_COMMAND = "apt-get install dataset-fashion-mnist"

#: System-wide directories searched after ``root`` and the environment variable.
_SYSTEM_DIRS: tuple[Path, ...] = (DEBIAN_FASHION_MNIST_DIR,)


def _locations(root: str | os.PathLike[str] | None) -> list[Path]:
    """Locations to search, in order."""
    locations: list[Path] = []
    if root is not None:
        locations.append(Path(root).expanduser())
    env = os.environ.get(FASHION_MNIST_ENV_VAR)
    if env:
        locations.append(Path(env).expanduser())
    locations.extend(_SYSTEM_DIRS)
    return locations


def _missing_message(locations: list[Path]) -> str:
    """Explain where Fashion-MNIST was looked for and how to provide it."""
    searched = "\n".join(
        f"  - {d}" for loc in locations for d in layout_dirs(loc, _TORCHVISION_NAME)
    )
    files = ", ".join(f"{stem}.gz" for stem in IDX_STEMS)
    return (
        f"Fashion-MNIST not found (nothing is downloaded). Searched:\n{searched}\n"
        f"Needed files: {files} (gzipped or not). Provide them in one of:\n"
        f"  - the Debian package directory {DEBIAN_FASHION_MNIST_DIR}/ "
        f"(install with `{_INSTALL_COMMAND}`);\n"
        f"  - a directory passed as `root` or named by the environment variable "
        f"{FASHION_MNIST_ENV_VAR};\n"
        f"  - a torchvision-style root: <root>/{_TORCHVISION_NAME}/raw/<files>."
    )


def load_fashion_mnist(root: str | os.PathLike[str] | None = None) -> ArrayDataset:
    """Load Fashion-MNIST as float32 images ``(n, 1, 28, 28)`` in ``[0, 1]``, int64 labels.

    Args:
        root: Optional directory searched first (flat or torchvision layout).

    Returns:
        ``ArrayDataset`` named ``"fashion-mnist"`` with ``num_classes=10``. Repeated calls
        on unchanged files return the same cached object.

    Raises:
        FileNotFoundError: If no searched location holds all four files; the message lists
            the locations, the Debian path, the torchvision layout, the environment
            variable and the install command.
        ValueError: If a file is corrupt.
    """
    locations = _locations(root)
    for location in locations:
        files = find_idx_files(location, _TORCHVISION_NAME)
        if files is not None:
            return load_idx_files(files, "fashion-mnist")
    raise FileNotFoundError(_missing_message(locations))
