"""Helpers shared by the experiments: thread control, the train/test/probe split of a classification set, and the
ReLU MLP of the MNIST studies."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import datasets

Tensor = torch.Tensor

__all__ = ["torch_threads", "split_with_probe", "make_mlp", "evaluate"]


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


def make_mlp(
    d_in: int,
    hidden: Sequence[int],
    n_out: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """ReLU MLP ``d_in → hidden… → n_out`` with layers named ``fc1, relu1, …, out``.

    Initialisation is PyTorch's default for ``nn.Linear``, ``U(−1/√fan_in, 1/√fan_in)`` for weights and biases;
    with ``generator`` the layers are created uninitialised and drawn from it in layer order (weight, then bias),
    so the global RNG is never touched.  The dtype is explicit so that the initialisation does not depend on
    torch's default dtype.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    make = nn.Linear if generator is None else (lambda i, o, **kw: nn.utils.skip_init(nn.Linear, i, o, **kw))
    prev = d_in
    for i, h in enumerate(hidden, 1):
        layers[f"fc{i}"] = make(prev, h, dtype=dtype)
        layers[f"relu{i}"] = nn.ReLU()
        prev = h
    layers["out"] = make(prev, n_out, dtype=dtype)
    model = nn.Sequential(layers)
    if generator is not None:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.uniform_(-bound, bound, generator=generator)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor, batch: int = 2048) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy (argmax) of a classifier's logits on ``X (N, …)``, labels ``y (N,)``;
    evaluated in eval mode in batches of ``batch`` (the model's mode is restored)."""
    was = model.training
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(X), batch):
        f = model(X[i : i + batch])
        loss += F.cross_entropy(f, y[i : i + batch], reduction="sum").item()
        correct += (f.argmax(-1) == y[i : i + batch]).sum().item()
    model.train(was)
    return loss / len(X), correct / len(X)
