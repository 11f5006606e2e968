"""Tests of the Fashion-MNIST loader on tiny IDX files, plus the real files when installed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.data import fashion_mnist, load_fashion_mnist

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IdxSetWriter = Callable[..., tuple[np.ndarray, np.ndarray]]


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide the environment variable and the installed Debian files from the loader."""
    monkeypatch.delenv(fashion_mnist.FASHION_MNIST_ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "_SYSTEM_DIRS", (tmp_path / "no-system-data",))


def _check_tiny(ds: object, images: np.ndarray, labels: np.ndarray) -> None:
    assert isinstance(ds, fashion_mnist.ArrayDataset)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(images.astype(np.float32) / 255.0)
    torch.testing.assert_close(ds.x_train[:, 0], expected, rtol=0, atol=1e-7)
    assert ds.y_train.tolist() == labels.tolist()


@pytest.mark.usefixtures("no_system_data")
def test_flat_gz_layout(tmp_path: Path, write_idx_set: IdxSetWriter) -> None:
    images, labels = write_idx_set(tmp_path / "flat", gz=True)
    _check_tiny(load_fashion_mnist(tmp_path / "flat"), images, labels)


@pytest.mark.usefixtures("no_system_data")
def test_torchvision_plain_layout(tmp_path: Path, write_idx_set: IdxSetWriter) -> None:
    images, labels = write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    _check_tiny(load_fashion_mnist(str(tmp_path / "tv")), images, labels)


@pytest.mark.usefixtures("no_system_data")
def test_env_var_and_search_order(
    tmp_path: Path, write_idx_set: IdxSetWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_images, env_labels = write_idx_set(tmp_path / "env", seed=1)
    root_images, root_labels = write_idx_set(tmp_path / "root", seed=2)
    monkeypatch.setenv(fashion_mnist.FASHION_MNIST_ENV_VAR, str(tmp_path / "env"))
    _check_tiny(load_fashion_mnist(), env_images, env_labels)
    _check_tiny(load_fashion_mnist(tmp_path / "root"), root_images, root_labels)
    # A root without the files falls through to the environment variable.
    _check_tiny(load_fashion_mnist(tmp_path / "empty"), env_images, env_labels)


@pytest.mark.usefixtures("no_system_data")
def test_cached_until_files_change(tmp_path: Path, write_idx_set: IdxSetWriter) -> None:
    write_idx_set(tmp_path, seed=3)
    first = load_fashion_mnist(tmp_path)
    assert load_fashion_mnist(tmp_path) is first
    _, labels = write_idx_set(tmp_path, seed=4, n_train=5)
    second = load_fashion_mnist(tmp_path)
    assert second is not first and second.n_train == 5
    assert second.y_train.tolist() == labels.tolist()


@pytest.mark.usefixtures("no_system_data")
def test_missing_data_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(info.value)
    for needle in (
        "/usr/share/datasets/fashion-mnist",
        "apt-get install dataset-fashion-mnist",
        "CURVLAB_FASHION_MNIST",
        "FashionMNIST/raw",
        "train-images-idx3-ubyte",
        str(tmp_path / "nowhere"),
    ):
        assert needle in message


@pytest.mark.usefixtures("no_system_data")
def test_corrupt_labels_name_the_file(tmp_path: Path, write_idx_set: IdxSetWriter) -> None:
    write_idx_set(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_debian_files() -> None:
    ds = load_fashion_mnist(DEBIAN)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert torch.equal(torch.unique(ds.y_train), torch.arange(10))
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert load_fashion_mnist(DEBIAN) is ds
