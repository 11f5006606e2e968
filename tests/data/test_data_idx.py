"""Tests of the IDX reader and writer."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from curvlab.data import read_idx, write_idx


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip(tmp_path: Path, name: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    array: np.ndarray = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / name
    write_idx(path, array)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\x00\x00")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_header_layout_matches_mnist(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.array([1, 2, 3], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])


def _write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "too short"),
        (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "magic"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]), "type code"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]), "payload"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]), "payload"),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_corruption_raises_value_error_naming_file(
    tmp_path: Path, data: bytes, message: str, suffix: str
) -> None:
    path = _write_raw(tmp_path / f"broken-idx1-ubyte{suffix}", data)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte.gz"
    blob = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(200))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_and_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "bad", np.zeros(3, dtype=np.int64))
