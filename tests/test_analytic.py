"""Analytic anchors: closed-form Fisher matrices written out from their formulas (no autograd).

* logistic regression: ``F = (1/N) Σ π(1−π) x̃ x̃ᵀ`` with ``x̃ = [x, 1]``;
* one Bernoulli logit θ: ``F = π(1−π)``; in the mean parametrisation q: ``F = 1/(q(1−q))``;
* seed 002 eq 4.7 (``φ(W x)``, Gaussian σ, one input) and eqs 4.8a–c (``φ2(W2 φ1(W1 x))``) with the
  seed's typo in 4.8b fixed (φ₀′ → φ₁′).

nn.Linear stores its weight as (out, in), flattened row-major: entry (μ, α) is at ``μ * in + α``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Act, assert_close
from torch import nn

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

ENGINES = ("layerwise", "functional", "auto")

PHI = {
    "tanh": (torch.tanh, lambda a: 1 - torch.tanh(a) ** 2),
    "sigmoid": (torch.sigmoid, lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a))),
}


def _logistic_data(d=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.mul_(3.0)
    X = torch.randn(n, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g).double()
    return model, X, y


@pytest.mark.parametrize("engine", ENGINES)
def test_logistic_regression_true_and_empirical(engine):
    model, X, y = _logistic_data()
    w, b = model.weight.detach()[0], float(model.bias.detach())
    N, d = X.shape
    F_true = torch.zeros(d + 1, d + 1)
    F_emp = torch.zeros(d + 1, d + 1)
    for n in range(N):
        xt = torch.cat([X[n], torch.ones(1)])
        pi = 1 / (1 + torch.exp(-(w @ X[n] + b)))
        F_true += pi * (1 - pi) * torch.outer(xt, xt) / N
        F_emp += (pi - y[n]) ** 2 * torch.outer(xt, xt) / N
    L = fl.Bernoulli()
    assert_close(fl.fisher_matrix(model, (X, y), L, engine=engine), F_true, what="logreg true")
    assert_close(fl.fisher_matrix(model, (X, y), L, "empirical", engine=engine), F_emp,
                 what="logreg empirical")
    assert_close(fl.fisher_diag(model, (X, y), L, engine=engine), torch.diagonal(F_true),
                 what="logreg diag")
    assert_close(fl.fisher_trace(model, (X, y), L, engine=engine), torch.trace(F_true),
                 what="logreg trace")
    # without bias: the x xᵀ block alone
    nob = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        nob.weight.copy_(model.weight)
    F_nob = torch.zeros(d, d)
    for n in range(N):
        pi = 1 / (1 + torch.exp(-(w @ X[n])))
        F_nob += pi * (1 - pi) * torch.outer(X[n], X[n]) / N
    assert_close(fl.fisher_matrix(nob, (X, y), L, engine=engine), F_nob, what="logreg no bias")


class Logit(nn.Module):
    """f = θ, one Bernoulli logit shared by every input."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta], dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(x.shape[0], 1)


class MeanParam(nn.Module):
    """f = logit(q): the Bernoulli in its mean parametrisation."""

    def __init__(self, q):
        super().__init__()
        self.q = nn.Parameter(torch.tensor([q], dtype=torch.float64))

    def forward(self, x):
        return torch.logit(self.q).expand(x.shape[0], 1)


@pytest.mark.parametrize("theta", [-2.0, 0.0, 0.3, 4.0])
def test_bernoulli_single_logit(theta):
    X = torch.zeros(5, 2)
    pi = 1 / (1 + torch.exp(torch.tensor(-theta)))
    expected = (pi * (1 - pi)).reshape(1, 1)
    for engine in ("functional", "auto"):
        got = fl.fisher_matrix(Logit(theta), (X, None), fl.Bernoulli(), engine=engine)
        assert_close(got, expected, what=f"logit {theta}")
        got = fl.fisher_trace(Logit(theta), (X, None), fl.Bernoulli(), engine=engine)
        assert_close(got, float(expected), what=f"logit trace {theta}")
    got = fl.fisher_rao_norm(Logit(theta), (X, None), fl.Bernoulli())
    assert_close(got, theta**2 * float(expected), what="rao")


@pytest.mark.parametrize("q", [0.1, 0.5, 0.8])
def test_bernoulli_mean_parametrisation(q):
    X = torch.zeros(3, 1)
    got = fl.fisher_matrix(MeanParam(q), (X, None), fl.Bernoulli())
    assert_close(got, torch.tensor([[1 / (q * (1 - q))]]), what=f"1/(q(1-q)) at {q}")


def _one_layer(phi, n_in=4, n_out=3, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=False).double()
    with torch.no_grad():
        lin.weight.mul_(2.0)
    return nn.Sequential(lin, Act(PHI[phi][0]))


@pytest.mark.parametrize("sigma", [1.0, 0.6])
@pytest.mark.parametrize("phi", ["tanh", "sigmoid"])
def test_seed002_eq_4_7_one_layer(phi, sigma):
    n_in, n_out = 4, 3
    model = _one_layer(phi, n_in, n_out)
    x = torch.randn(n_in, generator=torch.Generator().manual_seed(1))
    W = model[0].weight.detach()
    a = W @ x
    dphi = PHI[phi][1](a)
    P = n_in * n_out
    expected = torch.zeros(P, P)
    for mu in range(n_out):
        for alpha in range(n_in):
            for nu in range(n_out):
                for beta in range(n_in):
                    expected[mu * n_in + alpha, nu * n_in + beta] = (
                        (mu == nu) * dphi[mu] ** 2 * x[alpha] * x[beta] / sigma**2)
    # block structure of the seed: diag(α^(μ) B) with B = x xᵀ
    B = torch.outer(x, x)
    assert_close(expected, torch.block_diag(*[dphi[m] ** 2 / sigma**2 * B for m in range(n_out)]),
                 what="khatri-rao form")
    for engine in ENGINES:
        got = fl.fisher_matrix(model, (x[None], None), fl.Gaussian(sigma), engine=engine)
        assert_close(got, expected, what=f"eq 4.7 {phi} {engine}")


class TwoLayer(nn.Module):
    def __init__(self, phi1, phi2, n0=3, n1=4, n2=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(n0, n1, bias=False)
        self.a1 = Act(PHI[phi1][0])
        self.l2 = nn.Linear(n1, n2, bias=False)
        self.a2 = Act(PHI[phi2][0])
        with torch.no_grad():
            self.l1.weight.mul_(2.0)
            self.l2.weight.mul_(2.0)

    def forward(self, x):
        return self.a2(self.l2(self.a1(self.l1(x))))


@pytest.mark.parametrize(("phi1", "phi2"), [("tanh", "sigmoid"), ("sigmoid", "tanh"),
                                            ("tanh", "tanh")])
def test_seed002_eq_4_8_one_hidden_layer(phi1, phi2):
    n0, n1, n2, sigma = 3, 4, 2, 0.8
    model = TwoLayer(phi1, phi2, n0, n1, n2).double()
    x0 = torch.randn(n0, generator=torch.Generator().manual_seed(2))
    W1, W2 = model.l1.weight.detach(), model.l2.weight.detach()
    a1 = W1 @ x0
    x1 = PHI[phi1][0](a1)
    a2 = W2 @ x1
    d1, d2 = PHI[phi1][1](a1), PHI[phi2][1](a2)
    P1, P2 = n1 * n0, n2 * n1
    F = torch.zeros(P1 + P2, P1 + P2)
    s2 = sigma**2
    for mu in range(n1):  # 4.8b: (W1, W1), typo fixed
        for alpha in range(n0):
            for nu in range(n1):
                for beta in range(n0):
                    A00 = sum(d2[r] ** 2 * d1[mu] * d1[nu] * W2[r, mu] * W2[r, nu]
                              for r in range(n2)) / s2
                    F[mu * n0 + alpha, nu * n0 + beta] = A00 * x0[alpha] * x0[beta]
    for mu in range(n2):  # 4.8a: (W2, W2)
        for alpha in range(n1):
            for nu in range(n2):
                for beta in range(n1):
                    F[P1 + mu * n1 + alpha, P1 + nu * n1 + beta] = (
                        (mu == nu) * d2[mu] ** 2 * x1[alpha] * x1[beta] / s2)
    for mu in range(n1):  # 4.8c: (W1, W2) and its transpose
        for alpha in range(n0):
            for nu in range(n2):
                for beta in range(n1):
                    v = d2[nu] ** 2 * d1[mu] * W2[nu, mu] * x0[alpha] * x1[beta] / s2
                    F[mu * n0 + alpha, P1 + nu * n1 + beta] = v
                    F[P1 + nu * n1 + beta, mu * n0 + alpha] = v
    L = fl.Gaussian(sigma)
    for engine in ENGINES:
        got = fl.fisher_matrix(model, (x0[None], None), L, engine=engine)
        assert_close(got, F, what=f"eq 4.8 {phi1}/{phi2} {engine}")
        blocks = fl.fisher_blocks(model, (x0[None], None), L, what="dense", engine=engine)
        assert_close(blocks["l1.weight"], F[:P1, :P1], what="4.8b block")
        assert_close(blocks["l2.weight"], F[P1:, P1:], what="4.8a block")
