"""Mean-field theory of FIM eigenvalue statistics (seed 003, ``fl.theory``) and its random-network ensembles.

* the half-range Gauss–Hermite rules and the Gaussian integrals against closed forms (linear, ReLU, erf) to 1e-8;
* the recurrences (eqs 9–12) against a direct numerical integration (scipy quad/dblquad) at one point;
* the statistics' formulas, the κ2 = 0 warning, argument checks;
* the batched exact dual matrix of :class:`fl.theory.MLPEnsemble` against the library (Gram route, dense F,
  Fisher–Rao norm);
* random ensembles (uniform and non-uniform widths) against the theory, with tolerances from the ensemble spread;
* bad widths and variances refused, naming the argument.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import raises
from scipy import integrate

import fisherlens as fl
from fisherlens.theory.meanfield import (
    ACTIVATIONS,
    gaussian_pairs,
    gaussian_squares,
    half_range_rule,
    meanfield,
)
from fisherlens.theory.random_networks import MLPEnsemble, ensemble_stats, random_mlp, standard_normals

CASES = {"tanh": (3.0, 0.64), "relu": (2.0, 0.1), "linear": (1.0, 0.1)}


#: many small batched ops: one intra-op thread is fastest and immune to oversubscribed cores
pytestmark = pytest.mark.usefixtures("one_thread")
STATS = {"mean": "mean_eigenvalue", "second_moment": "second_moment", "max": "max_eigenvalue"}


# ----------------------------------------------------------------------------- quadrature
@pytest.mark.parametrize("power", [0, 1])
def test_half_range_rule_is_exact_for_polynomials(power):
    u, w = half_range_rule(48, power)
    for k in range(0, 48, 3):  # ∫_0^∞ u^{k+power} e^{−u²/2} du = 2^{(k+p−1)/2} Γ((k+p+1)/2)
        exact = 2 ** ((k + power - 1) / 2) * math.gamma((k + power + 1) / 2)
        assert (w * u**k).sum() == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("name", ["linear", "relu", "erf"])
def test_quadrature_matches_closed_forms(name):
    act = ACTIVATIONS[name]
    pair, dpair = act.closed
    for q in (0.05, 0.3, 1.0, 3.0, 10.0, 30.0):
        c = np.array([-1.0, -0.99, -0.5, 0.0, 0.3, 0.9, 0.999, 1.0])
        for g, exact in ((act.phi, pair), (act.dphi, dpair)):
            got = gaussian_pairs(g, np.full(len(c), q), c * q, homogeneous=act.homogeneous)
            ref = np.array([exact(q, ci * q) for ci in c])
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8 * abs(exact(q, q)))
            sq = gaussian_squares(g, [q], homogeneous=act.homogeneous)[0]
            assert sq == pytest.approx(exact(q, q), rel=1e-8)


@pytest.mark.parametrize("name", ["linear", "relu", "erf"])
@pytest.mark.parametrize("sw,sb,widths", [(1.5, 0.2, None), (2.0, 0.0, (1.0, 0.5, 2.0, 1.0, 0.7, 1.3)),
                                           (0.8, 1.0, None)])
def test_recurrences_quadrature_vs_closed(name, sw, sb, widths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd activations without bias warn that κ2 = 0
        a = meanfield(name, sw, sb, 6, widths=widths, outputs=3, samples=50)
        b = meanfield(name, sw, sb, 6, widths=widths, outputs=3, samples=50, integrator="closed")
    for attr in ("q", "q_st", "q_hat", "q_hat_st", "q_tilde", "q_tilde_st"):
        np.testing.assert_allclose(getattr(a, attr), getattr(b, attr), rtol=1e-8, atol=1e-12, err_msg=attr)
    assert a.kappa1 == pytest.approx(b.kappa1, rel=1e-8)
    assert a.kappa2 == pytest.approx(b.kappa2, rel=1e-8, abs=1e-14)


def _scipy_integrals(g):
    """``(E g(√q u)², I_g[a, b])`` by adaptive scipy integration of the Gaussian densities (no shared code)."""
    D = lambda u: math.exp(-u * u / 2) / math.sqrt(2 * math.pi)  # noqa: E731

    def one(q):
        return integrate.quad(lambda u: D(u) * g(math.sqrt(q) * u) ** 2, -12, 12, epsabs=1e-13, epsrel=1e-12,
                              limit=200, points=[0.0])[0]

    def two(a, b):
        c = b / a
        s = math.sqrt(1 - c * c)
        f = lambda z2, z1: D(z1) * D(z2) * g(math.sqrt(a) * z1) * g(math.sqrt(a) * (c * z1 + s * z2))  # noqa: E731
        return integrate.dblquad(f, -12, 12, -12, 12, epsabs=1e-12, epsrel=1e-11)[0]

    return one, two


def _leaky_closed(slope):
    """Closed forms for leaky ReLU ``φ = s x + (1−s) relu(x)``: ``E[X relu(Y)] = b/2`` and the arc-cosine kernels."""
    def pair(a, b):
        th = math.acos(max(-1.0, min(1.0, b / a)))
        k1 = a / (2 * math.pi) * (math.sin(th) + (math.pi - th) * math.cos(th))
        return slope**2 * b + 2 * slope * (1 - slope) * b / 2 + (1 - slope) ** 2 * k1

    def dpair(a, b):
        th = math.acos(max(-1.0, min(1.0, b / a)))
        return slope**2 + slope * (1 - slope) + (1 - slope) ** 2 * (math.pi - th) / (2 * math.pi)

    return (lambda q: pair(q, q), pair), (lambda q: dpair(q, q), dpair)


def _direct(fwd, bwd, sw, sb, L):
    """Seed 003 eqs 9–12 written out with the given integrals ``fwd = (E φ², I_φ)``, ``bwd = (E φ'², I_φ')``."""
    qh, qhst, q, qst = [1.0], [0.0], [], []
    for l in range(1, L + 1):
        q.append(sw * qh[-1] + sb)
        qst.append(sw * qhst[-1] + sb)
        if l < L:
            qh.append(fwd[0](q[-1]))
            qhst.append(fwd[1](q[-1], qst[-1]))
    qt, qtst = [1.0], [1.0]
    for l in range(L - 1, 0, -1):
        qt.insert(0, sw * qt[0] * bwd[0](q[l - 1]))
        qtst.insert(0, sw * qtst[0] * bwd[1](q[l - 1], qst[l - 1]))
    alpha = L - 1
    k1 = sum(qt[i] * qh[i] for i in range(L)) / alpha
    k2 = sum(qtst[i] * qhst[i] for i in range(L)) / alpha
    return np.array(qh), np.array(qhst), np.array(qt), np.array(qtst), k1, k2


@pytest.mark.parametrize("kind", ["tanh", "leaky-relu callable"])
def test_recurrences_vs_direct_integration(kind):
    """tanh: against scipy quad/dblquad of the Gaussian densities.  A kinked callable (leaky ReLU, slopes 1 and
    0.2, given as ``(φ, φ')``): against its closed forms (adaptive 2-D quadrature cannot resolve the jump of φ'
    along a slanted line to 1e-7)."""
    if kind == "tanh":
        fwd = _scipy_integrals(math.tanh)
        bwd = _scipy_integrals(lambda x: 1 / math.cosh(x) ** 2)
        act = "tanh"
    else:
        fwd, bwd = _leaky_closed(0.2)
        act = (lambda x: np.where(x > 0, x, 0.2 * x), lambda x: np.where(x > 0, 1.0, 0.2))
    qh, qhst, qt, qtst, k1, k2 = _direct(fwd, bwd, 3.0, 0.64, 3)
    th = meanfield(act, 3.0, 0.64, 3)
    np.testing.assert_allclose(th.q_hat, qh, rtol=1e-7)
    np.testing.assert_allclose(th.q_hat_st, qhst, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(th.q_tilde, qt, rtol=1e-7)
    np.testing.assert_allclose(th.q_tilde_st, qtst, rtol=1e-7)
    assert th.kappa1 == pytest.approx(k1, rel=1e-7)
    assert th.kappa2 == pytest.approx(k2, rel=1e-7)


# ----------------------------------------------------------------------------- formulas and API
def test_statistics_formulas():
    th = meanfield("tanh", 3.0, 0.64, 4, widths=(1.0, 2.0, 0.5, 1.5), outputs=3, samples=20)
    a = th.widths
    assert th.alpha == pytest.approx(a[1] * a[0] + a[2] * a[1] + a[3] * a[2])
    assert th.kappa1 == pytest.approx(np.sum(a * th.q_tilde * th.q_hat) / th.alpha)
    M = np.array([10.0, 100.0, 1000.0])
    k1, k2, al, C, T = th.kappa1, th.kappa2, th.alpha, 3, 20
    np.testing.assert_allclose(th.mean_eigenvalue(M), C * k1 / M)
    np.testing.assert_allclose(th.second_moment(M), C * al * ((T - 1) / T * k2**2 + k1**2 / T))
    np.testing.assert_allclose(th.max_eigenvalue(M), al * ((T - 1) / T * k2 + k1 / T) * M)
    np.testing.assert_allclose(th.variance(M), th.second_moment(M) - th.mean_eigenvalue(M) ** 2)
    assert th.critical_learning_rate(100.0, 0.9) == pytest.approx(fl.critical_learning_rate(th.max_eigenvalue(100.0),
                                                                                            0.9))
    assert isinstance(th.mean_eigenvalue(64), float)
    # Corollary 2 and the C = O(M) bounds (eqs 21–22)
    assert th.count_bound(100, 1e-9) == C * T
    assert th.count_bound(100, 1e6) == pytest.approx(al * k1 * C * 100 / 1e6)
    bd = th.large_output_bounds(100.0)
    assert bd["mean"] == th.mean_eigenvalue(100.0)
    lo, hi = bd["second_moment"]
    assert lo == th.second_moment(100.0) and hi == pytest.approx(C * lo)
    lo, hi = bd["max"]
    assert lo == th.max_eigenvalue(100.0) and hi == pytest.approx(math.sqrt(al * C * th.second_moment(1.0)) * 100)
    assert lo <= hi
    # Theorem 5: the bound holds, with equality for uniform widths
    assert th.fisher_rao_norm() <= th.fisher_rao_norm_bound() * (1 + 1e-12)
    u = meanfield("relu", 2.0, 0.1, 5, outputs=2)
    assert u.fisher_rao_norm() == pytest.approx(u.fisher_rao_norm_bound())
    assert u.fisher_rao_norm() == pytest.approx(2.0 * (5 - 1) * 2 * u.kappa1)
    # expected FIM (T = ∞): λ_max = α κ2 M, s = C α κ2²
    e = meanfield("relu", 2.0, 0.1, 3)
    assert e.max_eigenvalue(10.0) == pytest.approx(e.alpha * e.kappa2 * 10)
    assert e.second_moment(10.0) == pytest.approx(e.alpha * e.kappa2**2)
    # per-layer variances equal to the scalar ones change nothing
    p = meanfield("tanh", [3.0] * 4, [0.64] * 4, 4, widths=(1.0, 2.0, 0.5, 1.5), outputs=3, samples=20)
    assert p.kappa1 == pytest.approx(th.kappa1, rel=1e-14) and p.kappa2 == pytest.approx(th.kappa2, rel=1e-14)


def test_finite_size_variant_counts_parameters_and_biases():
    th = meanfield("linear", 1.0, 0.1, 3, outputs=2, samples=10)
    M = 16
    assert th.n_params(M) == 16 * 17 + 16 * 17 + 2 * 17
    # linear: q̂ = (1, 1.1, 1.2), q̃ = 1; tr F = C Σ_l q̃^l (M_{l−1} q̂^{l−1} + 1)
    Kss = (16 * 1 + 1) + (16 * 1.1 + 1) + (16 * 1.2 + 1)
    assert th.mean_eigenvalue(M, finite_size=True) == pytest.approx(2 * Kss / th.n_params(M))
    assert th.mean_eigenvalue(1e6, finite_size=True) == pytest.approx(th.mean_eigenvalue(1e6), rel=1e-5)
    assert th.max_eigenvalue(1e6, finite_size=True) == pytest.approx(th.max_eigenvalue(1e6), rel=1e-5)


def test_depth_100_is_finite():
    for name in ("tanh", "relu", "linear", "erf", "sigmoid"):
        th = meanfield(name, 1.5, 0.05, 100, samples=100)
        assert np.isfinite([th.kappa1, th.kappa2]).all() and th.kappa1 > 0


@pytest.mark.parametrize("name", ["tanh", "erf", "linear"])
def test_odd_activation_without_bias_has_kappa2_zero(name):
    with pytest.warns(UserWarning, match="kappa2 = 0"):
        th = meanfield(name, 2.0, 0.0, 4, samples=100)
    assert th.kappa2 == 0.0 and th.kappa2_vanishes
    assert th.max_eigenvalue(100.0) == pytest.approx(th.alpha * th.kappa1 * 100 / 100)  # only the κ1/T part
    assert "kappa2 = 0" in repr(th)


def test_relu_without_bias_keeps_kappa2():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th = meanfield("relu", 2.0, 0.0, 4)
    assert th.kappa2 > 0 and not th.kappa2_vanishes


@pytest.mark.parametrize("kwargs,err", [
    ({"activation": "swish"}, ValueError),
    ({"activation": np.tanh}, TypeError),  # callable without its derivative
    ({"depth": 1}, ValueError),
    ({"widths": (1.0, 2.0)}, ValueError),
    ({"widths": (1.0, -1.0, 1.0)}, ValueError),
    ({"outputs": 0}, ValueError),
    ({"samples": 0.5}, ValueError),
    ({"sigma_w2": -1.0}, ValueError),
    ({"sigma_b2": [0.1, 0.1]}, ValueError),
    ({"integrator": "closed"}, ValueError),  # no closed form for tanh
    ({"integrator": "simpson"}, ValueError),
])
def test_bad_arguments(kwargs, err):
    args = {"activation": "tanh", "sigma_w2": 3.0, "sigma_b2": 0.64, "depth": 3, **kwargs}
    with pytest.raises(err):
        meanfield(**args)
    th = meanfield("tanh", 3.0, 0.64, 3)
    with pytest.raises(ValueError):
        th.critical_learning_rate(100, momentum=1.0)


def test_callable_activation_derivative_keyword():
    a = meanfield(np.tanh, 3.0, 0.64, 3, derivative=lambda x: 1 / np.cosh(x) ** 2)
    b = meanfield("tanh", 3.0, 0.64, 3)
    assert a.kappa1 == pytest.approx(b.kappa1, rel=1e-14) and a.kappa2 == pytest.approx(b.kappa2, rel=1e-14)


def test_exported_as_fl_theory():
    assert fl.theory.meanfield is meanfield
    assert "theory" in fl.__all__


# ----------------------------------------------------------------------------- ensembles vs the library
@pytest.mark.parametrize("act", ["tanh", "relu", "linear", "erf", "sigmoid"])
def test_ensemble_dual_matrix_matches_library(act):
    g = torch.Generator().manual_seed(3)
    ens = MLPEnsemble.sample(2, [6, 5, 4, 3], act, 2.0, 0.3, g)
    X = torch.randn(4, 6, generator=g, dtype=torch.float64)
    G = ens.gram(X)
    fr, frd = ens.fisher_rao(X)
    st = ensemble_stats(G, ens.n_params)
    for e in range(2):
        model = ens.module(e)
        torch.testing.assert_close(model(X), ens(X)[e])
        P = sum(p.numel() for p in model.parameters())
        assert P == ens.n_params
        eig = fl.eigenvalues(model, (X, None), fl.Gaussian(1.0), method="gram")
        torch.testing.assert_close(eig, torch.linalg.eigvalsh(G[e]).flip(0).clamp_min(0), rtol=1e-9, atol=1e-11)
        F = fl.fisher_matrix(model, (X, None), fl.Gaussian(1.0))  # tiny P: the dense matrix as a reference
        lib = fl.spectrum_stats(torch.linalg.eigvalsh(F), dim=P)
        for k in ("mean", "second_moment", "max"):
            assert float(st[k][e]) == pytest.approx(lib[k], rel=1e-9)
        weights = [n for n, _ in model.named_parameters() if n.endswith("weight")]
        assert float(fr[e]) == pytest.approx(fl.fisher_rao_norm(model, (X, None), fl.Gaussian(1.0), params=weights),
                                             rel=1e-9)
        diag = fl.fisher_diag(model, (X, None), fl.Gaussian(1.0), params=weights)
        var = torch.cat([torch.full((p.numel(),), 2.0 / p.shape[1], dtype=torch.float64)
                         for n, p in model.named_parameters() if n.endswith("weight")])
        assert float(frd[e]) == pytest.approx(float((var * diag).sum()), rel=1e-9)


def test_random_mlp_follows_the_ensemble_variances():
    g = torch.Generator().manual_seed(0)
    m = random_mlp("relu", 2.0, 0.1, [400, 300, 1], generator=g)
    W, b = m[0].weight.detach(), m[0].bias.detach()
    assert W.shape == (300, 400)
    assert float(W.var()) == pytest.approx(2.0 / 400, rel=0.02)
    assert float(b.var()) == pytest.approx(0.1, rel=0.25)


# ----------------------------------------------------------------------------- ensembles vs the theory
def _ensemble(act, widths, C, T, Ms, n, seed):
    """Relative deviations (measured / theory − 1) per statistic: lists of (M, mean, s.e.) over networks."""
    sw, sb = CASES[act]
    th = meanfield(act, sw, sb, len(widths), widths=widths, outputs=C, samples=T)
    out: dict[str, list[tuple[int, float, float]]] = {k: [] for k in STATS}
    for M in Ms:
        g = torch.Generator().manual_seed(seed * 7919 + M)
        sizes = [round(a * M) for a in widths] + [C]
        ens = MLPEnsemble.from_normals(*standard_normals(n, sizes, g), act, sw, sb)
        X = torch.randn(n, T, sizes[0], generator=g, dtype=torch.float64)
        st = ensemble_stats(ens.gram(X), ens.n_params)
        for k, fn in STATS.items():
            r = st[k].numpy() / getattr(th, fn)(M) - 1
            out[k].append((M, float(r.mean()), float(r.std(ddof=1) / math.sqrt(n))))
    return th, out


def _extrapolate(points):
    """Weighted least-squares fit ``rel(M) = c0 + c1/M`` (the theory is the M → ∞ limit with O(1/M)
    corrections); returns ``(c0, s.e. of c0)`` from the ensembles' standard errors."""
    M = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points])
    w = 1 / np.array([p[2] for p in points]) ** 2
    A = np.stack([np.ones_like(M), 1 / M], 1)
    cov = np.linalg.inv(A.T @ (A * w[:, None]))
    c = cov @ (A.T @ (w * y))
    return c[0], math.sqrt(cov[0, 0])


@pytest.mark.parametrize("widths,C,stats", [
    ((1.0, 1.0, 1.0), 1, ("mean", "second_moment", "max")),
    ((1.0, 2.0, 0.5), 1, ("mean", "second_moment", "max")),  # non-uniform α_l
    ((1.0, 1.0, 1.0), 2, ("mean", "second_moment")),  # C = 2 (λ_max of C near-degenerate values: O(M^-1/2) bias)
])
@pytest.mark.parametrize("act", list(CASES))
def test_ensembles_agree_with_theory(act, widths, C, stats):
    """Random ensembles at M = 64, 128, 256 (24 networks each, T = 100).

    m_λ (Theorem 1) must match already at moderate M: |deviation| ≤ 4 s.e. at every M.  s_λ and λ_max carry
    O(1/M) finite-width corrections, so the deviations are extrapolated to M → ∞ by a weighted fit c0 + c1/M and
    the intercept must vanish within 4 of its standard errors — both tolerances come from the ensemble spread.
    The corrections must also shrink: |deviation| at M = 256 below that at M = 64 (or within noise).
    """
    th, out = _ensemble(act, widths, C, 100, (64, 128, 256), 24, seed=1)
    for M, r, se in out["mean"]:
        assert abs(r) <= 4 * se, f"m_λ at M={M}: {r:+.3f} ± {se:.3f}"
    for k in stats:
        c0, se0 = _extrapolate(out[k])
        assert abs(c0) <= 4 * se0, f"{k}: extrapolated deviation {c0:+.3f} ± {se0:.3f}; points {out[k]}"
        (_, r64, s64), (_, r256, s256) = out[k][0], out[k][-1]
        assert abs(r256) <= abs(r64) + 3 * math.hypot(s64, s256), f"{k}: no decay with M {out[k]}"


def test_fisher_rao_theorem5_against_ensembles():
    """Theorem 5's value is the ensemble mean of Σ_i σ_i² F_ii (weights); the networks' own θ_wᵀFθ_w differ."""
    n, M, T = 24, 128, 50
    for act, (sw, sb) in CASES.items():
        th = meanfield(act, sw, sb, 3, samples=T)
        g = torch.Generator().manual_seed(5)
        ens = MLPEnsemble.sample(n, [M, M, M, 1], act, sw, sb, g)
        X = torch.randn(n, T, M, generator=g, dtype=torch.float64)
        fr, diag = ens.fisher_rao(X)
        mean, se = float(diag.mean()), float(diag.std() / math.sqrt(n))
        assert abs(mean - th.fisher_rao_norm()) <= 4 * se + 0.02 * th.fisher_rao_norm(), (act, mean, se)
    # deep linear network without bias: θ_wᵀ F θ_w = L² f² exactly (homogeneity), L times Theorem 5's value
    ens = MLPEnsemble.sample(n, [M, M, M, 1], "linear", 1.0, 0.0, torch.Generator().manual_seed(6))
    X = torch.randn(n, T, M, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fr, _ = ens.fisher_rao(X)
    f = ens(X)
    torch.testing.assert_close(fr, 9 * (f**2).sum((1, 2)) / T)


# ----------------------------------------------------------------------------- bad widths and variances
NAN, INF = float("nan"), float("inf")


def test_meanfield_widths_must_be_positive():
    th = fl.theory.meanfield("relu", 2.0, 0.1, 3, samples=100)
    for M in (0, -5.0, NAN, INF, [100.0, 0.0]):
        for method in (th.mean_eigenvalue, th.second_moment, th.max_eigenvalue, th.critical_learning_rate,
                       th.variance, th.large_output_bounds, th.n_params):
            raises(ValueError, r"M \(the width scale", method, M)
        raises(ValueError, r"M \(the width scale", th.count_bound, M, 1.0)
    raises(ValueError, r"M \(the width scale", th.layer_widths, 0)
    raises(ValueError, r"k \(the eigenvalue threshold\)", th.count_bound, 100.0, 0.0)
    assert th.critical_learning_rate(100.0) > 0


def test_meanfield_variances():
    raises(ValueError, r"sigma_w2 must be finite and positive", fl.theory.meanfield, "relu", 0.0, 0.1, 3)
    raises(ValueError, r"sigma_w2", fl.theory.meanfield, "relu", [2.0, 0.0, 2.0], 0.1, 3)
    raises(ValueError, r"sigma_b2 must be finite and non-negative", fl.theory.meanfield, "relu", 2.0, -0.1, 3)
    raises(ValueError, r"q0", fl.theory.meanfield, "relu", 2.0, 0.1, 3, q0=0.0)
    raises(ValueError, r"q0_st", fl.theory.meanfield, "relu", 2.0, 0.1, 3, q0_st=2.0)
    # an odd activation without bias and T = ∞: λ_max = 0 at leading order, so no finite η_c
    with pytest.warns(UserWarning, match="kappa2 = 0"):
        th = fl.theory.meanfield("tanh", 1.5, 0.0, 3)
    raises(ValueError, r"no finite critical learning rate", th.critical_learning_rate, 100.0)


def test_random_networks_variances_and_sizes():
    gen = torch.Generator().manual_seed(0)
    raises(ValueError, r"sigma_w2", MLPEnsemble.sample, 2, [3, 4, 1], "relu", 0.0, 0.1, gen)
    raises(ValueError, r"sigma_w2", MLPEnsemble.sample, 2, [3, 4, 1], "relu", -1.0, 0.1, gen)
    raises(ValueError, r"sigma_b2", MLPEnsemble.sample, 2, [3, 4, 1], "relu", 1.0, NAN, gen)
    raises(ValueError, r"E \(the number of networks\)", MLPEnsemble.sample, 0, [3, 4, 1], "relu", 1.0, 0.1, gen)
    raises(ValueError, r"positive integer entries", MLPEnsemble.sample, 2, [3, 4.5, 1], "relu", 1.0, 0.1, gen)
    raises(ValueError, r"sigma_w2", fl.theory.random_mlp, "relu", 0.0, 0.0, [3, 4, 1])
    net = fl.theory.random_mlp("relu", 2.0, 0.0, [3, 4, 1], generator=gen)
    assert net(torch.randn(2, 3, dtype=torch.float64)).shape == (2, 1)
