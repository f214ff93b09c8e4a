"""The model zoo of the fisherlens tests: every architecture, output model and data set shared by the tests.

All tiny; float64 unless said.  One set of architectures, three ways of drawing their parameters (each kept
exactly as the tests that use it were written, so that their numbers do not move):

* ``ARCHS`` + :func:`build` — the architectures every Fisher reduction, kind and engine is checked on: torch's
  default initialisation under ``torch.manual_seed(seed)``, inputs from a local generator.  ``LIKS`` maps a name
  to a :class:`Lik` case that knows the library object, the reference spec (see ``reference.py``), the kinds it
  supports and how to draw :func:`targets`; :func:`cases` lists the compatible ``(arch, lik, kind)`` triples.
* :func:`make_case` — the named :class:`Case` s of the estimator / operator / spectrum / bounds tests (a model,
  its inputs and labels, an output model and a batch size): parameters from a local generator (:func:`init_`),
  so that results do not depend on the global RNG state.
* ``MLPS`` + :func:`seeded` / :func:`build_mlp` — the MLPs that ``fl.structure`` supports (and a few it does not),
  default initialisation under ``torch.manual_seed(seed)`` with the weights scaled by 1.5 (saturated units, a
  peaked softmax, a spread spectrum).

and two float32 models (:func:`float32_cnn`, :func:`float32_mlp`) for the accuracy of the float32 Gram route.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fisherlens as fl

DT = torch.float64
N_DEFAULT = 7


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Construct modules (and draw implicit-dtype tensors) in ``dtype``, restoring the default afterwards: the
    factories below give the same parameters whatever the calling module's default dtype is."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- architectures
def tanh_mlp(d: int = 4, h: int = 5, C: int = 3) -> nn.Sequential:
    """``Linear(d→h)``, tanh, ``Linear(h→C)``: the one-hidden-layer tanh MLP of many tests."""
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))


def small_cnn(C: int = 3) -> nn.Sequential:
    """Conv2d(1→2, 3×3) on 5×5 inputs, tanh, flatten, Linear(18→C); parameters ``conv.*`` and ``head.*``."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), act=nn.Tanh(), flat=nn.Flatten(),
                                     head=nn.Linear(18, C)))


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
    """Integer inputs through an Embedding (a layerwise layer since the Embedding rule)."""

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
        self.net = tanh_mlp(4, 5, 1)

    def forward(self, x):
        return self.net(x)[:, 0]


class FreeScale(nn.Module):
    """An MLP with a raw per-unit gain parameter (not owned by a layer: the torch.func engine handles it)."""

    def __init__(self, d: int = 3, h: int = 4, C: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, h)
        self.gain = nn.Parameter(torch.ones(h))
        self.out = nn.Linear(h, C)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x) * self.gain))


class Scaled(nn.Module):
    """``scale · inner(x)``: large scales make a classifier's softmax nearly one-hot."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.scale * self.inner(x)


@dataclass(frozen=True)
class Arch:
    make: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    C: int
    layerwise: bool = True  # every parameter is owned by a layer with a rule (Linear, Conv, BatchNorm in eval, ...)
    tokens: int = 0  # > 0: integer inputs in [0, tokens)


# ----------------------------------------------------------------------------- 1. ARCHS and build
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
                                            nn.Linear(6, 3)), (4,), 3, True),
    "batchnorm_cnn": Arch(lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)),
        (1, 5, 5), 3, True),
    "seq3d": Arch(Seq3D, (3, 4), 3, True),
    "unused_params": Arch(Unused, (4,), 3, True),
    "embedding": Arch(Tokens, (2,), 3, True, tokens=10),
    "one_output": Arch(lambda: tanh_mlp(4, 5, 1), (4,), 1, True),
    "vector_output": Arch(Squeeze, (4,), 1, True),
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


def build(arch: str, seed: int = 0, n: int = N_DEFAULT):
    """Model (float64, eval mode, seeded) and ``n`` inputs for architecture ``arch``."""
    a = ARCHS[arch]
    with default_dtype(DT):
        torch.manual_seed(seed)
        model = a.make().double()
        gen = torch.Generator().manual_seed(1000 + seed)
        _randomise_bn(model, gen)
    model.eval()
    if a.tokens:
        X = torch.randint(0, a.tokens, (n, *a.in_shape), generator=gen)
    else:
        X = torch.randn((n, *a.in_shape), generator=gen, dtype=DT)
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


def spec_of(lik: fl.Likelihood) -> tuple:
    """The reference spec (``reference.py``) of a library output model with a Fisher."""
    if isinstance(lik, fl.Gaussian):
        return ("gaussian", lik.sigma)
    if isinstance(lik, fl.Categorical):
        return ("categorical",)
    if isinstance(lik, fl.Bernoulli):
        return ("bernoulli",)
    raise ValueError(f"no reference spec for {lik!r}")


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


# ----------------------------------------------------------------------------- 2. make_case
def init_(model: nn.Module, seed: int, std: float = 0.7) -> nn.Module:
    """Float64, eval mode, parameters ~ N(0, std²/fan_in-ish) from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            fan = p.shape[1:].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * std / math.sqrt(max(fan, 1)) * 1.5)
    return model


def mlp(seed: int = 0, d: int = 4, h: int = 5, C: int = 3) -> nn.Module:
    """:func:`tanh_mlp` with :func:`init_` parameters."""
    return init_(tanh_mlp(d, h, C), seed)


def randn(shape, n: int, seed: int) -> torch.Tensor:
    """``n`` float64 standard-normal inputs of ``shape`` from ``torch.Generator().manual_seed(seed)``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=DT)


def inputs(shape, n: int, seed: int) -> torch.Tensor:
    """The inputs of :func:`make_case` (and of models built with :func:`init_`)."""
    return randn(shape, n, 10_000 + seed)


@dataclass
class Case:
    """A model, its inputs (and labels), an output model and a batch size (smaller than N)."""

    name: str
    model: nn.Module
    X: torch.Tensor
    Y: torch.Tensor
    lik: fl.Likelihood
    batch_size: int

    @property
    def data(self):
        return (self.X, self.Y)

    @property
    def spec(self) -> tuple:
        """The output model as a reference spec (``reference.py``)."""
        return spec_of(self.lik)


def labels_for(lik, f: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(20_000 + seed)
    if isinstance(lik, fl.Categorical):
        return torch.randint(0, f.shape[-1], (len(f),), generator=gen)
    if isinstance(lik, fl.Bernoulli):
        return torch.randint(0, 2, (len(f),), generator=gen).to(DT)
    return torch.randn(f.shape, generator=gen, dtype=DT)


def make_case(name: str, seed: int = 0, n: int = 7, batch_size: int = 3) -> Case:
    """Named cases: ``mlp`` (tanh, Categorical), ``cnn`` (Categorical), ``bernoulli`` (one logit),
    ``gauss`` (regression, Gaussian σ=0.7), ``free`` (a raw parameter, Categorical)."""
    if name == "mlp":
        model, X, lik = mlp(seed), inputs((4,), n, seed), fl.Categorical()
    elif name == "cnn":
        model, X, lik = init_(small_cnn(), seed), inputs((1, 5, 5), n, seed), fl.Categorical()
    elif name == "bernoulli":
        model = init_(tanh_mlp(3, 4, 1), seed)
        X, lik = inputs((3,), n, seed), fl.Bernoulli()
    elif name == "gauss":
        model = init_(tanh_mlp(3, 4, 2), seed)
        X, lik = inputs((3,), n, seed), fl.Gaussian(0.7)
    elif name == "free":
        model, X, lik = init_(FreeScale(), seed), inputs((3,), n, seed), fl.Categorical()
    else:
        raise KeyError(name)
    with torch.no_grad():
        Y = labels_for(lik, model(X).reshape(n, -1), seed)
    return Case(name, model, X, Y, lik, batch_size)


# ----------------------------------------------------------------------------- 3. MLPS (fl.structure)
#: MLPs built from nn.Linear layers and elementwise activations (``in_shape``, ``C`` outputs).
MLPS: dict[str, Arch] = {
    "linear": Arch(lambda: nn.Linear(5, 3), (5,), 3),
    "0h_sigmoid": Arch(lambda: nn.Sequential(nn.Linear(5, 3), nn.Sigmoid()), (5,), 3),
    "0h_softmax": Arch(lambda: nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=-1)), (5,), 4),
    "1h_tanh": Arch(lambda: tanh_mlp(5, 4, 3), (5,), 3),
    "1h_relu_softmax": Arch(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Softmax(1)),
                            (6,), 4),
    "1h_nobias": Arch(lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3, bias=False)),
                      (5,), 3),
    "1h_sigmoid_tanh_nobias": Arch(lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(),
                                                         nn.Linear(4, 3, bias=False), nn.Tanh()), (5,), 3),
    "1h_identity_logsoftmax": Arch(lambda: nn.Sequential(nn.Linear(5, 4), nn.Identity(), nn.Linear(4, 3),
                                                         nn.LogSoftmax(-1)), (5,), 3),
    "1h_logit": Arch(lambda: tanh_mlp(4, 6, 1), (4,), 1),
    "2h_mixed": Arch(lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.GELU(), nn.Tanh(),
                                           nn.Linear(4, 5, bias=False), nn.Softplus(), nn.Linear(5, 3)), (2, 3), 3),
}


def scale_(model: nn.Module, s: float = 1.5) -> nn.Module:
    """Parameters ×s (larger weights: saturated units, peaked softmax, a spread spectrum); float64, eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(s)
    return model.double().eval()


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` built in float64 right after ``torch.manual_seed(seed)``, then :func:`scale_`."""
    with default_dtype(DT):
        torch.manual_seed(seed)
        return scale_(make())


def build_mlp(arch: str, seed: int = 0, n: int = 1):
    """``(model, X, C)``: :func:`seeded` ``MLPS[arch]`` and ``n`` inputs from the generator ``100 + seed``."""
    a = MLPS[arch]
    return seeded(a.make, seed), randn(a.in_shape, n, 100 + seed), a.C


# ----------------------------------------------------------------------------- float32 models
N32 = 64


def _init32(model: nn.Module, g: torch.Generator, w: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (w if p.dim() > 1 else 0.1))
    return model.eval()


def float32_cnn(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A float32 CNN (P = 5210, 10 outputs) and ``N32`` 1×8×8 inputs."""
    with default_dtype(torch.float32):
        g = torch.Generator().manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        return _init32(m, g, 0.3), torch.randn(N32, 1, 8, 8, generator=g)


def float32_mlp(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A float32 MLP 64→100→10 (tanh) and ``N32`` 1×8×8 inputs."""
    with default_dtype(torch.float32):
        g = torch.Generator().manual_seed(seed)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 10))
        return _init32(m, g, 0.2), torch.randn(N32, 1, 8, 8, generator=g)


# ----------------------------------------------------------------------------- 4. sequence models (structured outputs)
class TinyLM(nn.Module):
    """A causal transformer LM: ``(B, T)`` token ids → Embedding + learned positions → one
    ``TransformerEncoderLayer`` (batch_first, dropout 0, causal mask) → Linear → logits ``(B, T, V)``.

    torch 2.13 on CPU has no forward-mode AD (``torch.func.jvp``) for two kernels the stock layer reaches in eval
    mode: the fused ``aten::_transformer_encoder_layer_fwd`` (taken whenever no parameter requires grad, e.g. under
    ``jvp``; avoided by ``activation=tanh``, the default here; ``activation="relu"`` gives the stock layer) and the
    CPU flash attention (avoided by ``sdpa_kernel(SDPBackend.MATH)`` around the layer).  Causal: a float ``-inf``
    mask above the diagonal."""

    def __init__(self, V: int = 7, d: int = 8, heads: int = 2, ff: int = 12, T_max: int = 8, activation=torch.tanh):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.zeros(T_max, d))
        self.block = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, activation=activation)
        self.head = nn.Linear(d, V)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf"), dtype=self.pos.dtype, device=self.pos.device), 1)
        h = self.emb(input_ids) + self.pos[:T]
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no forward-mode AD (jvp)
            h = self.block(h, src_mask=causal)
        return self.head(h)


class SegNet(nn.Module):
    """A Conv1d "segmentation" model: ``(B, 2, L)`` → Conv1d → tanh → Conv1d → channel-first logits ``(B, C, L)``."""

    def __init__(self, C: int = 3):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, C, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


class SegNet2d(nn.Module):
    """A Conv2d segmentation model with two position axes: ``(B, 1, H, W)`` → channel-first ``(B, C, H, W)``."""

    def __init__(self, C: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, C, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


class Wrapped(nn.Module):
    """A model whose forward returns a dict (the tensor under ``"logits"``): needs ``output=``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return {"logits": self.inner(*args, **kwargs), "extra": 0}


def seq_labels(X: torch.Tensor, lengths) -> torch.Tensor:
    """Next-token labels of a causal LM, aligned with the logits positions: ``Y[n, t] = X[n, t+1]`` for
    ``t < length − 1``, ``-100`` at the last real position and at the padding."""
    Y = torch.full_like(X, -100)
    for n, ln in enumerate(lengths):
        Y[n, : ln - 1] = X[n, 1:ln]
    return Y


def lm_case(seed: int = 0, n: int = 4, T: int = 5, V: int = 7, lengths=None, activation=torch.tanh):
    """``(model, X, Y)``: :class:`TinyLM` (float64, eval mode, :func:`init_` parameters), token ids ``(n, T)``
    right-padded with 0 after ``lengths`` and next-token labels (``-100`` at the last and padded positions)."""
    with default_dtype(DT):
        torch.manual_seed(seed)
        model = init_(TinyLM(V=V, activation=activation), 30_000 + seed, std=1.0)
    gen = torch.Generator().manual_seed(31_000 + seed)
    lengths = lengths or [T - (i % 3) for i in range(n)]
    X = torch.randint(0, V, (n, T), generator=gen)
    for i, ln in enumerate(lengths):
        X[i, ln:] = 0
    return model, X, seq_labels(X, lengths)


def seg_case(seed: int = 0, n: int = 4, L: int = 6, C: int = 3, ignored: int = 3, two_d: bool = False):
    """``(model, X, Y)``: :class:`SegNet` (or :class:`SegNet2d`, 3×4 positions), inputs and class-id labels
    shaped like the positions with ``ignored`` of them set to ``-100``."""
    with default_dtype(DT):
        torch.manual_seed(seed)
        model = init_(SegNet2d(C) if two_d else SegNet(C), 32_000 + seed, std=1.0)
    gen = torch.Generator().manual_seed(33_000 + seed)
    pos = (3, 4) if two_d else (L,)
    X = torch.randn((n, 1 if two_d else 2, *pos), generator=gen, dtype=DT)
    Y = torch.randint(0, C, (n, *pos), generator=gen)
    flat = Y.reshape(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:ignored]] = -100
    return model, X, Y


def multilabel_case(seed: int = 0, n: int = 5, d: int = 4, K: int = 3):
    """``(model, X, Y)``: a tanh MLP with ``K`` independent logits (multi-label) and 0/1 float labels ``(n, K)``."""
    model = mlp(seed, d=d, h=5, C=K)
    gen = torch.Generator().manual_seed(34_000 + seed)
    X = torch.randn((n, d), generator=gen, dtype=DT)
    return model, X, torch.randint(0, 2, (n, K), generator=gen).to(DT)
