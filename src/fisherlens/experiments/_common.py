"""Helpers shared by the studies: option validation, thread control, the train/test/probe split of a
classification set, the ReLU MLP of the MNIST studies and its mini-batch training loop."""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import datasets

Tensor = torch.Tensor

__all__ = [
    "torch_threads", "split_with_probe", "make_mlp", "train_epoch", "evaluate", "arch_name", "rel_dev", "as_tuple",
    "check_int", "check_ints", "check_number", "check_bool", "check_choice", "check_distinct", "check_threads",
    "check_device",
    "check_synthetic_data",
]


# ----------------------------------------------------------------------------- option validation
def as_tuple(value) -> tuple:
    """A list option as a tuple; a single value (``--set widths=8``) becomes a one-element tuple."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, value, lo: int = 1) -> int:
    """``value`` if it is an integer ≥ ``lo``, else ``ValueError`` naming the option ``name``."""
    if not _is_int(value) or value < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}, got {value!r}.")
    return value


def check_ints(name: str, value, lo: int = 1, *, allow_empty: bool = False) -> tuple[int, ...]:
    """A list of integers ≥ ``lo`` as a tuple (a single integer is a one-element list; empty only with
    ``allow_empty``), else ``ValueError`` naming the option ``name``."""
    t = as_tuple(value)
    if (not t and not allow_empty) or not all(_is_int(v) and v >= lo for v in t):
        what = "list" if allow_empty else "non-empty list"
        raise ValueError(f"{name} must be an integer ≥ {lo} or a {what} of them, got {value!r}.")
    return t


def check_number(name: str, value, *, lo: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (``> lo`` when given), else ``ValueError`` naming the
    option ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (lo is not None and not value > lo):
        bound = "" if lo is None else f" > {lo:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}.")
    return float(value)


def check_bool(name: str, value) -> bool:
    """``value`` if it is ``True`` or ``False``, else ``ValueError`` naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value, choices: Sequence) -> object:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming the option and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}.")
    return value


def check_distinct(name: str, values: Sequence) -> None:
    """``ValueError`` naming the option when ``values`` repeats an entry."""
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {values!r}.")


def check_threads(name: str, value) -> None:
    """``value`` must be a positive integer or ``None`` (torch's thread setting left alone)."""
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def check_device(name: str, value) -> torch.device:
    """``value`` as a ``torch.device`` that this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must name a torch device (cpu, cuda, cuda:1, mps), got {value!r}.") from e
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"{name}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s) visible "
                         "to torch; use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r}: torch.backends.mps is not available on this machine; use cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}={value!r}: the studies run on cpu, cuda or mps.")
    return dev


def check_synthetic_data(data, what: str) -> None:
    """Studies that draw their own inputs refuse any ``--data`` but the command line's defaults; ``what`` says what
    the study draws instead."""
    if data not in (None, "mnist-subset", "gaussian", "synthetic"):
        raise ValueError(f"this study {what}; --data {data!r} is not used — drop it.")


def rel_dev(a: float, b: float) -> float:
    """Relative deviation ``|a − b| / max(|a|, |b|)`` (0 for two zeros)."""
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def arch_name(d_in: int, hidden: Sequence[int], n_out: int) -> str:
    """``"784-16-10"`` for an MLP ``d_in → hidden… → n_out``."""
    return "-".join(str(v) for v in (d_in, *hidden, n_out))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block (``None``: leave it); restored afterwards.

    The one place where the studies pin threads (also for single-threaded timing and small batched
    eigen-decompositions, which stall on oversubscribed cores).
    """
    if n is None:
        yield
        return
    check_threads("threads", n)
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
    weights: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> nn.Sequential:
    """ReLU MLP ``d_in → hidden… → n_out`` with layers named ``fc1, relu1, …, out``.

    Initialisation is PyTorch's default for ``nn.Linear``, ``U(−1/√fan_in, 1/√fan_in)`` for weights and biases;
    with ``generator`` the layers are created uninitialised and drawn from it in layer order (weight, then bias),
    so the global RNG is never touched.  With ``weights`` (one ``(W, b)`` per layer, in order) the layers are
    created uninitialised and these values copied in (neither RNG is touched).  The dtype is explicit so that
    the initialisation does not depend on torch's default dtype.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    drawn = generator is None and weights is None  # nn.Linear's own initialisation (global RNG)
    make = nn.Linear if drawn else (lambda i, o, **kw: nn.utils.skip_init(nn.Linear, i, o, **kw))
    prev = d_in
    for i, h in enumerate(hidden, 1):
        layers[f"fc{i}"] = make(prev, h, dtype=dtype)
        layers[f"relu{i}"] = nn.ReLU()
        prev = h
    layers["out"] = make(prev, n_out, dtype=dtype)
    model = nn.Sequential(layers)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        if weights is not None:
            if len(weights) != len(linears):
                raise ValueError(f"make_mlp: {len(weights)} (W, b) pairs for {len(linears)} layers.")
            for m, (W, b) in zip(linears, weights, strict=True):
                m.weight.copy_(W)
                m.bias.copy_(b)
        elif generator is not None:
            for m in linears:
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)
    return model


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_size: int,
    generator: torch.Generator,
    after_step: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> None:
    """One epoch of mini-batch training: a seeded permutation (``torch.randperm(len(X), generator=generator)``),
    then per batch ``loss(model(X[idx]), y[idx])`` (a scalar), ``zero_grad``, ``backward`` and ``opt.step()``.

    ``after_step(loss, outputs, idx)`` is called after every optimiser step (the batch's loss tensor, the model
    outputs of the forward pass and the batch indices), e.g. for monitors and progress bars.
    """
    n = len(X)
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        outputs = model(X[idx])
        value = loss(outputs, y[idx])
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if after_step is not None:
            after_step(value, outputs, idx)


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
