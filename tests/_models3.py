"""Tiny float64 models and slow, obvious helpers for the estimator/operator/spectrum/bounds tests.

Nothing here calls ``fisherlens``: per-sample Jacobians come from one ``torch.autograd.grad`` per sample and
output, and the output-space square roots ``S`` (with ``S Sᵀ = Λ``) are written out from SCIENCE §2.
Parameters are initialised from a local ``torch.Generator`` so that results do not depend on global RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import norm
from torch import nn

import fisherlens as fl

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP spin-waits make them many
    times slower: run each test of the importing module on one thread, restoring the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- modules
class SmallCNN(nn.Module):
    """Conv2d(1→2, 3×3) on 5×5 inputs, tanh, Linear(18→C)."""

    def __init__(self, C: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(18, C)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


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
    return init_(nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C)), seed)


def inputs(shape, n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(10_000 + seed), dtype=DT)


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
        model, X, lik = init_(SmallCNN(), seed), inputs((1, 5, 5), n, seed), fl.Categorical()
    elif name == "bernoulli":
        model = init_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), seed)
        X, lik = inputs((3,), n, seed), fl.Bernoulli()
    elif name == "gauss":
        model = init_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), seed)
        X, lik = inputs((3,), n, seed), fl.Gaussian(0.7)
    elif name == "free":
        model, X, lik = init_(FreeScale(), seed), inputs((3,), n, seed), fl.Categorical()
    else:
        raise KeyError(name)
    with torch.no_grad():
        Y = labels_for(lik, model(X).reshape(n, -1), seed)
    return Case(name, model, X, Y, lik, batch_size)


# ----------------------------------------------------------------------------- slow references
def params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def jacobians(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """``(N, C, P)``: one autograd.grad per sample and output."""
    ps = params(model)
    out = []
    for n in range(len(X)):
        f = model(X[n : n + 1]).reshape(-1)
        rows = []
        for c in range(f.numel()):
            gs = torch.autograd.grad(f[c], ps, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([torch.zeros(p.numel(), dtype=DT) if g is None else g.reshape(-1)
                                   for g, p in zip(gs, ps, strict=True)]))
        out.append(torch.stack(rows))
    return torch.stack(out).detach()


def outputs(model, X) -> torch.Tensor:
    with torch.no_grad():
        return model(X).reshape(len(X), -1)


def sqrt_lambda(lik, f: torch.Tensor) -> torch.Tensor:
    """``S (N, C, C)`` of SCIENCE §2 for outputs ``f (N, C)``, written out by hand."""
    N, C = f.shape
    if isinstance(lik, fl.Gaussian):
        return torch.eye(C, dtype=DT).expand(N, C, C) / lik.sigma
    if isinstance(lik, fl.Bernoulli):
        p = 1 / (1 + torch.exp(-f))
        return (p * (1 - p)).sqrt().reshape(N, 1, 1)
    p = torch.exp(f - torch.logsumexp(f, -1, keepdim=True))
    out = []
    for n in range(N):
        sp = p[n].sqrt()
        out.append(torch.diag(sp) - torch.outer(p[n], sp))
    return torch.stack(out)


def factor_rows(case_or_model, X=None, lik=None) -> torch.Tensor:
    """``Ĵ (N·C, P)`` with rows ``(S_nᵀ J_n)``: ``F = Ĵᵀ Ĵ / N``, and column p of Ĵ is the ``a`` of SCIENCE §6."""
    if isinstance(case_or_model, Case):
        model, X, lik = case_or_model.model, case_or_model.X, case_or_model.lik
    else:
        model = case_or_model
    J = jacobians(model, X)
    S = sqrt_lambda(lik, outputs(model, X))
    return torch.einsum("nck,ncp->nkp", S, J).reshape(-1, J.shape[-1])


def true_fisher(case: Case) -> torch.Tensor:
    R = factor_rows(case)
    return R.T @ R / len(case.X)


def bonferroni_z(n_entries: int, alpha: float = 1e-3) -> float:
    """Two-sided normal quantile for a family-wise level ``alpha`` over ``n_entries`` comparisons."""
    return float(norm.isf(alpha / (2 * max(n_entries, 1))))
