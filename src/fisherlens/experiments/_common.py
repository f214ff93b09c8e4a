"""Helpers shared by the experiments: thread control and the train/test/probe split of a classification set."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .. import datasets

Tensor = torch.Tensor

__all__ = ["torch_threads", "split_with_probe"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block (``None``: leave it); restored afterwards."""
    if n is None:
        yield
        return
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer or None, got {n!r}.")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def split_with_probe(X: Tensor, y: Tensor, n_train: int, n_test: int, n_probe: int, seed: int):
    """Seeded train/test split (80/20 when the set is smaller than asked) and a probe set of the first
    ``n_probe`` training samples.  Returns ``(Xtr, ytr, Xte, yte, (Xp, yp), C)``."""
    N = len(X)
    if n_train + n_test > N:
        n_test = max(1, round(0.2 * N))
        n_train = N - n_test
    Xtr, ytr, Xte, yte = datasets.train_test_split(X, y, n_train, n_test, seed=seed)
    n_probe = min(n_probe, n_train)
    return Xtr, ytr, Xte, yte, (Xtr[:n_probe], ytr[:n_probe]), int(y.max()) + 1
