"""Architectures, output models and data shared by the fisherlens tests (all float64, all tiny).

``ARCHS`` maps a name to an :class:`Arch` factory; ``LIKS`` maps a name to a :class:`Lik` case
that knows the library object, the reference spec (see ``reference.py``), the kinds it supports
and how to draw targets.  ``build(arch, seed)`` returns a model in eval mode and its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fisherlens as fl

N_DEFAULT = 7


@pytest.fixture(scope="module")
def float64():
    """float64 by default (and one intra-op thread: these models are tiny) for a test module.

    Module-scoped so that hypothesis tests can use it; modules opt in with
    ``pytestmark = pytest.mark.usefixtures("float64")``.
    """
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old_dtype)
    torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------- modules
class Act(nn.Module):
    """An activation φ as a module (so that it can be chosen by name)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class SharedTwice(nn.Module):
    """The same Linear applied twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.out(h)


class Tied(nn.Module):
    """A weight used through its Linear *and* directly as ``x @ W.T`` (the layerwise attribution
    fails for it; the library must notice and fall back)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x)) + 0.5 * torch.sin(x @ self.lin.weight.T)
        return self.head(h)


class Seq3D(nn.Module):
    """A Linear that receives ``(B, T, I)`` input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(15, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).flatten(1))


class Unused(nn.Module):
    """Parameters that the forward never touches (a Linear and a Conv1d): their rows are zero."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.spare = nn.Linear(4, 3)
        self.conv = nn.Conv1d(1, 2, 2)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Tokens(nn.Module):
    """Integer inputs through an Embedding (not a layerwise layer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x)).flatten(1))


class Squeeze(nn.Module):
    """A one-output model returning a 1-D ``(B,)`` output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x):
        return self.net(x)[:, 0]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


@dataclass(frozen=True)
class Arch:
    make: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    C: int
    layerwise: bool  # every parameter is owned by a Linear/Conv1d/Conv2d used in the usual way
    tokens: int = 0  # > 0: integer inputs in [0, tokens)


ARCHS: dict[str, Arch] = {
    "mlp_relu": Arch(lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
                     (4,), 3, True),
    "mlp_tanh": Arch(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                                           nn.Linear(5, 3)), (4,), 3, True),
    "mlp_sigmoid": Arch(lambda: nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)),
                        (4,), 3, True),
    "cnn2d": Arch(lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3)),
        (1, 6, 6), 3, True),
    "cnn2d_fancy": Arch(lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2, padding="same", padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, padding_mode="circular"), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(27, 3)), (2, 5, 5), 3, True),
    "conv1d": Arch(lambda: nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv1d(3, 4, 3, dilation=2, padding="same", padding_mode="replicate"), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 3)), (2, 7), 3, True),
    "shared_twice": Arch(SharedTwice, (4,), 3, True),
    "tied": Arch(Tied, (4,), 3, False),
    "batchnorm": Arch(lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                            nn.Linear(6, 3)), (4,), 3, False),
    "batchnorm_cnn": Arch(lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)),
        (1, 5, 5), 3, False),
    "seq3d": Arch(Seq3D, (3, 4), 3, True),
    "unused_params": Arch(Unused, (4,), 3, True),
    "embedding": Arch(Tokens, (2,), 3, False, tokens=10),
    "one_output": Arch(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)),
                       (4,), 1, True),
    "vector_output": Arch(Squeeze, (4,), 1, True),
}


def build(arch: str, seed: int = 0, n: int = N_DEFAULT):
    """Model (float64, eval mode, seeded) and ``n`` inputs for architecture ``arch``."""
    a = ARCHS[arch]
    torch.manual_seed(seed)
    model = a.make().double()
    gen = torch.Generator().manual_seed(1000 + seed)
    _randomise_bn(model, gen)
    model.eval()
    if a.tokens:
        X = torch.randint(0, a.tokens, (n, *a.in_shape), generator=gen)
    else:
        X = torch.randn((n, *a.in_shape), generator=gen, dtype=torch.float64)
    return model, X


# ----------------------------------------------------------------------------- output models
def logcosh(f, y):
    """A custom per-sample loss callable (not from fl.losses)."""
    return torch.log(torch.cosh(f - y)).sum(-1)


@dataclass(frozen=True)
class Lik:
    make: Callable[[], fl.Likelihood]
    spec: tuple
    kinds: tuple[str, ...]
    targets: str  # "float" (B, C) regression targets, "class" integer labels, "binary" {0, 1}
    C: str  # "any", "multi" (C >= 2) or "one" (C == 1)
    everywhere: bool = False  # tested on every architecture (else only on LOSS_ARCHS)


SIGMA = 0.7

LIKS: dict[str, Lik] = {
    "gaussian": Lik(lambda: fl.Gaussian(SIGMA), ("gaussian", SIGMA), ("true", "empirical", "mc"),
                    "float", "any", True),
    "categorical": Lik(fl.Categorical, ("categorical",), ("true", "empirical", "mc"),
                       "class", "multi", True),
    "bernoulli": Lik(fl.Bernoulli, ("bernoulli",), ("true", "empirical", "mc"),
                     "binary", "one", True),
    "lp2": Lik(lambda: fl.LossInduced(fl.losses.lp_norm(2)), ("lp", 2.0), ("empirical",),
               "float", "any"),
    "lp4": Lik(lambda: fl.LossInduced(fl.losses.lp_norm(4)), ("lp", 4.0), ("empirical",),
               "float", "any"),
    "mean_power2": Lik(lambda: fl.LossInduced(fl.losses.mean_power(2)), ("mean_power", 2),
                       ("empirical",), "float", "any"),
    "mean_power4": Lik(lambda: fl.LossInduced(fl.losses.mean_power(4)), ("mean_power", 4),
                       ("empirical",), "float", "any"),
    "softmax_ce": Lik(lambda: fl.LossInduced(fl.losses.softmax_cross_entropy()), ("sce",),
                      ("empirical",), "class", "multi"),
    "custom": Lik(lambda: fl.LossInduced(logcosh), ("custom", logcosh), ("empirical",),
                  "float", "any"),
}


def compatible(lik: str, C: int) -> bool:
    need = LIKS[lik].C
    return need == "any" or (need == "multi" and C >= 2) or (need == "one" and C == 1)


def targets(lik: str, n: int, C: int, seed: int = 0) -> torch.Tensor:
    """Targets of the form ``lik`` expects for ``n`` inputs and ``C`` outputs."""
    gen = torch.Generator().manual_seed(2000 + seed)
    t = LIKS[lik].targets
    if t == "float":
        return torch.randn(n, C, generator=gen, dtype=torch.float64)
    if t == "class":
        return torch.randint(0, C, (n,), generator=gen)
    return torch.randint(0, 2, (n,), generator=gen).double()


#: architectures on which the loss-induced output models are tested (the output models with
#: a Fisher are tested on every architecture).
LOSS_ARCHS = ("mlp_relu", "cnn2d_fancy", "shared_twice", "tied", "one_output")


def cases(kinds=("true", "empirical", "mc"), archs=None, liks=None):
    """Compatible ``(arch, lik, kind)`` triples, as pytest params with readable ids."""
    out = []
    for a in archs or ARCHS:
        for name in liks or LIKS:
            if not compatible(name, ARCHS[a].C):
                continue
            if liks is None and not LIKS[name].everywhere and a not in LOSS_ARCHS:
                continue
            for k in LIKS[name].kinds:
                if k in kinds:
                    out.append(pytest.param(a, name, k, id=f"{a}-{name}-{k}"))
    return out


def assert_close(actual, expected, rtol=1e-6, what=""):
    """rtol 1e-6 comparison with an absolute floor tied to the scale of the expected value."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-10 * scale + 1e-14,
                               msg=lambda m: f"{what}: {m}")
