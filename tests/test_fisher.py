"""fisherlens.fisher: every Fisher reduction (matrix, diag, trace, blocks, Fisher–Rao norm), kind, output model and
engine against the slow references of ``reference.py`` (float64), against closed forms, and the Monte-Carlo Fisher's
convergence.

The MC Fisher is compared with the reference built on the *same* labels (``helpers.mc_labels``).  The closed forms
are written out from their formulas (no autograd):

* logistic regression: ``F = (1/N) Σ π(1−π) x̃ x̃ᵀ`` with ``x̃ = [x, 1]``;
* one Bernoulli logit θ: ``F = π(1−π)``; in the mean parametrisation q: ``F = 1/(q(1−q))``;
* seed 002 eq 4.7 (``φ(W x)``, Gaussian σ, one input) and eqs 4.8a–c (``φ2(W2 φ1(W1 x))``) with the
  seed's typo in 4.8b fixed (φ₀′ → φ₁′).

nn.Linear stores its weight as (out, in), flattened row-major: entry (μ, α) is at ``μ * in + α``.

For a Categorical model the MC label distribution is known, so the per-draw statistics are exact: for input n and
label c (probability π_nc) the factor row is ``G_nc = J_nᵀ (π_n − e_c)`` and one draw contributes ``G_nc²``
(elementwise) to diag F.  Hence ``E[G²] = diag(J_nᵀ Λ_n J_n)`` and the variance of the k-sample, N-input mean is
``Σ_n Var_n / (N² k)`` — computed exactly from the reference Jacobians, independently of the library.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import ENGINES, SEED, assert_close, engines_for, mc_kwargs, reference_case
from torch import nn
from zoo import ARCHS, LIKS, Act, build, cases, targets

import fisherlens as fl

pytestmark = [pytest.mark.usefixtures("float64"),
              pytest.mark.filterwarnings("ignore:Parameters .* used outside:UserWarning")]


# ----------------------------------------------------------------------------- against the references
@pytest.mark.parametrize(("arch", "lik", "kind"), cases())
def test_reductions_match_reference(arch, lik, kind):
    model, X, Y, F_ref, _ = reference_case(arch, lik, kind)
    L = LIKS[lik].make()
    data = (X, Y)
    assert float(torch.trace(F_ref)) > 0, "degenerate case: the reference Fisher is zero"
    for engine in engines_for(arch):
        kw = dict(engine=engine, **mc_kwargs(kind))
        tag = f"{arch}/{lik}/{kind}/{engine}"
        assert_close(fl.fisher_matrix(model, data, L, kind, **kw), F_ref, what=f"matrix {tag}")
        kw = dict(engine=engine, **mc_kwargs(kind))
        assert_close(fl.fisher_diag(model, data, L, kind, **kw), torch.diagonal(F_ref),
                     what=f"diag {tag}")
        kw = dict(engine=engine, **mc_kwargs(kind))
        tr = fl.fisher_trace(model, data, L, kind, **kw)
        assert isinstance(tr, float)
        assert_close(tr, torch.trace(F_ref), what=f"trace {tag}")
        for what, expected in (("diag", ref.block_diags(F_ref, model)),
                               ("trace", ref.block_traces(F_ref, model)),
                               ("dense", ref.blocks(F_ref, model))):
            kw = dict(engine=engine, **mc_kwargs(kind))
            got = fl.fisher_blocks(model, data, L, kind, what, **kw)
            assert list(got) == list(expected), f"block names/order {tag}"
            for name in expected:
                assert_close(got[name], expected[name], what=f"blocks[{what}] {name} {tag}")
    theta = ref.flat_params(model)
    got = fl.fisher_rao_norm(model, data, L, kind, **mc_kwargs(kind))
    assert_close(got, theta @ F_ref @ theta, what=f"rao norm {arch}/{lik}/{kind}")


@pytest.mark.parametrize("arch", [a for a in ARCHS if not ARCHS[a].layerwise])
def test_layerwise_engine_refuses_foreign_parameters(arch):
    model, X = build(arch)
    with pytest.raises(ValueError, match="auto"):
        fl.fisher_diag(model, (X, None), fl.Gaussian(), engine="layerwise")


def test_tied_weight_falls_back_with_warning():
    model, X = build("tied", seed=7)
    with pytest.warns(UserWarning, match="lin.weight"):
        got = fl.fisher_diag(model, (X, None), fl.Categorical())
    assert_close(got, torch.diagonal(ref.true_fisher(model, X, ("categorical",))), what="tied")


@pytest.mark.parametrize(("arch", "lik", "kind"), cases(archs=["mlp_tanh", "cnn2d", "batchnorm",
                                                                "one_output"],
                                                         liks=["gaussian", "categorical",
                                                               "bernoulli", "lp4"]))
def test_reduction_sum_is_n_times_mean(arch, lik, kind):
    model, X, Y, F_ref, labels = reference_case(arch, lik, kind)
    L = LIKS[lik].make()
    N = len(X)
    data = (X, Y)

    def both(fn, *args):
        mean = fn(model, data, L, kind, *args, reduction="mean", **mc_kwargs(kind))
        total = fn(model, data, L, kind, *args, reduction="sum", **mc_kwargs(kind))
        return mean, total

    m, s = both(fl.fisher_matrix)
    assert_close(s, N * F_ref, what="sum matrix")
    assert_close(s, N * m, what="sum vs mean matrix")
    m, s = both(fl.fisher_diag)
    assert_close(s, N * torch.diagonal(F_ref), what="sum diag")
    m, s = both(fl.fisher_trace)
    assert_close(s, N * m, what="sum trace")
    assert_close(s, N * torch.trace(F_ref), what="sum trace ref")
    for what in ("diag", "trace", "dense"):
        m, s = both(fl.fisher_blocks, what)
        for name in m:
            assert_close(s[name], N * torch.as_tensor(m[name]), what=f"sum blocks {what} {name}")
    m, s = both(fl.fisher_rao_norm)
    theta = ref.flat_params(model)
    assert_close(s, N * (theta @ F_ref @ theta), what="sum rao")
    assert math.isclose(s, N * m, rel_tol=1e-9)


@pytest.mark.parametrize("lik", ["gaussian", "categorical"])
def test_soft_and_one_hot_targets(lik):
    """Categorical probability targets and one-hot float targets of the seed losses."""
    model, X = build("mlp_tanh", seed=5)
    gen = torch.Generator().manual_seed(0)
    P = torch.softmax(torch.randn(len(X), 3, generator=gen), -1)
    if lik == "categorical":
        got = fl.fisher_matrix(model, (X, P), fl.Categorical(), "empirical")
        expected = ref.empirical_fisher(model, X, P, ("categorical",))
        assert_close(got, expected, what="soft labels")
    labels = torch.randint(0, 3, (len(X),), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 3).double()
    for loss in (fl.losses.lp_norm(2), fl.losses.mean_power(2), fl.losses.softmax_cross_entropy()):
        a = fl.fisher_matrix(model, (X, labels), fl.LossInduced(loss), "empirical")
        b = fl.fisher_matrix(model, (X, one_hot), fl.LossInduced(loss), "empirical")
        assert_close(a, b, what=f"labels vs one-hot {loss.__name__}")
        assert float(torch.trace(a)) > 0


def test_float_integer_class_labels_accepted():
    model, X = build("mlp_relu", seed=2)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    a = fl.fisher_matrix(model, (X, y), fl.Categorical(), "empirical")
    b = fl.fisher_matrix(model, (X, y.double()), fl.Categorical(), "empirical")
    assert_close(b, a, what="float integer labels")
    assert_close(a, ref.empirical_fisher(model, X, y, ("categorical",)), what="int labels")


def test_gaussian_one_output_accepts_1d_targets():
    model, X = build("one_output", seed=2)
    y = torch.randn(len(X))
    got = fl.fisher_matrix(model, (X, y), fl.Gaussian(SEED / 1000), "empirical")
    assert_close(got, ref.empirical_fisher(model, X, y, ("gaussian", SEED / 1000)), what="1-D y")


def test_true_fisher_ignores_labels():
    model, X = build("cnn2d", seed=1)
    Y = torch.randint(0, 3, (len(X),))
    a = fl.fisher_matrix(model, (X, Y), fl.Categorical())
    b = fl.fisher_matrix(model, (X, None), fl.Categorical())
    c = fl.fisher_matrix(model, X, fl.Categorical())
    assert_close(a, b, rtol=1e-12, what="labels ignored")
    assert_close(c, b, rtol=1e-12, what="bare tensor X")


@pytest.mark.parametrize("arch", ["mlp_tanh", "cnn2d_fancy", "tied", "batchnorm_cnn"])
def test_chunking_inside_a_batch_changes_nothing(arch, monkeypatch):
    """A tiny working budget splits every batch into one-sample chunks: same results."""
    model, X = build(arch, seed=8)
    Y = targets("categorical", len(X), 3, seed=8)
    F_true = ref.true_fisher(model, X, ("categorical",))
    F_emp = ref.empirical_fisher(model, X, Y, ("categorical",))
    monkeypatch.setattr(fl._core, "WORK_BUDGET", 1)
    for engine in ("functional", "auto"):
        got = fl.fisher_matrix(model, (X, Y), fl.Categorical(), engine=engine)
        assert_close(got, F_true, what=f"chunked matrix {engine}")
        got = fl.fisher_diag(model, (X, Y), fl.Categorical(), "empirical", engine=engine)
        assert_close(got, torch.diagonal(F_emp), what=f"chunked diag {engine}")
        got = fl.fisher_trace(model, (X, Y), fl.Categorical(), engine=engine)
        assert_close(got, torch.trace(F_true), what=f"chunked trace {engine}")


# ----------------------------------------------------------------------------- closed forms
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


# ----------------------------------------------------------------------------- the MC Fisher converges
@pytest.fixture(scope="module")
def mc_setup(float64):
    model, X = build("mlp_tanh", seed=40, n=6)
    with torch.no_grad():  # sharper probabilities: a less trivial label distribution
        model[4].weight.mul_(3.0)
    J = ref.jacobians(model, X)  # (N, C, P)
    pi = torch.softmax(ref.outputs(model, X), -1)  # (N, C)
    N, C, P = J.shape
    eye = torch.eye(C)
    G = torch.stack([torch.stack([J[n].T @ (pi[n] - eye[c]) for c in range(C)])
                     for n in range(N)])  # (N, C, P)
    w = pi[:, :, None]
    m2 = (w * G**2).sum(1)  # E[G²] per input (N, P)
    m4 = (w * G**4).sum(1)
    diag_true = m2.mean(0)
    var_diag = (m4 - m2**2).sum(0) / N**2  # per draw
    T = (G**2).sum(-1)  # (N, C)
    t2 = (pi * T).sum(1)
    var_trace = ((pi * T**2).sum(1) - t2**2).sum() / N**2
    exact = torch.diagonal(ref.true_fisher(model, X, ("categorical",)))
    assert torch.allclose(diag_true, exact, rtol=1e-10)  # the identity E[G²] = diag F
    return model, X, diag_true, var_diag, float(diag_true.sum()), float(var_trace)


def test_mc_fisher_many_samples_within_standard_error(mc_setup):
    model, X, diag_true, var_diag, tr_true, var_tr = mc_setup
    k = 4000
    for engine in ("layerwise", "functional"):
        g = torch.Generator().manual_seed(7)
        d = fl.fisher_diag(model, (X, None), fl.Categorical(), "mc", samples=k, generator=g,
                           engine=engine)
        z = (d - diag_true) / torch.sqrt(var_diag / k)
        assert float(z.abs().max()) < 4.5, f"{engine}: max |z| {float(z.abs().max())}"
        assert 0.2 < float((z**2).mean()) < 3.0
        t = fl.fisher_trace(model, (X, None), fl.Categorical(), "mc", samples=k,
                            generator=torch.Generator().manual_seed(8), engine=engine)
        assert abs(t - tr_true) < 4 * (var_tr / k) ** 0.5
    # and it is not exact: the estimate really is random
    assert float((d - diag_true).abs().max()) > 1e-6


def test_mc_error_shrinks_like_inverse_sqrt_samples(mc_setup):
    model, X, diag_true, var_diag, tr_true, var_tr = mc_setup
    seeds = range(16)
    rms = {}
    for k in (100, 1600):
        sq_diag, sq_tr = [], []
        for s in seeds:
            d = fl.fisher_diag(model, (X, None), fl.Categorical(), "mc", samples=k,
                               generator=torch.Generator().manual_seed(100 + s))
            sq_diag.append(((d - diag_true) ** 2 / (var_diag / k)).mean())
            sq_tr.append((float(d.sum()) - tr_true) ** 2)
        norm = float(torch.stack(sq_diag).mean())
        # mean squared error in units of the predicted variance: about 1 at every k
        assert 0.4 < norm < 2.5, f"k={k}: normalised mse {norm}"
        rms[k] = (sum(sq_tr) / len(sq_tr)) ** 0.5
        assert 0.4 < rms[k] / (var_tr / k) ** 0.5 < 2.0
    ratio = rms[100] / rms[1600]
    assert 2.0 < ratio < 8.0, f"error ratio {ratio}, expected about sqrt(16) = 4"
