"""fisherlens.geometry: Christoffel symbols, Riemann/Ricci tensors, scalar curvature, path length, the Fisher
metric of a model and the KL self-test — against closed forms, a symbolic (sympy) derivation and finite
differences (SCIENCE §8 conventions: unit 2-sphere R = +2); metrics that are not symmetric positive definite or whose
autograd graph is cut are refused."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import reference as ref
import torch
from helpers import raises
from torch import nn
from zoo import tanh_mlp

import fisherlens as fl

G = fl.geometry
D = torch.float64


def t(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=D)


# ----------------------------------------------------------------------------- metrics with known geometry
def sphere(r: float):
    """Sphere of radius r in (polar θ, azimuth φ): diag(r², r² sin²θ); R = 2/r²."""
    return lambda q: torch.diag(torch.stack([r**2 + 0 * q[0], r**2 * torch.sin(q[0]) ** 2]))


def three_sphere(q):
    """Unit 3-sphere in hyperspherical coordinates: R = d(d−1) = 6."""
    s1 = torch.sin(q[0]) ** 2
    return torch.diag(torch.stack([1 + 0 * q[0], s1, s1 * torch.sin(q[1]) ** 2]))


def gaussian_fisher(q):
    """Fisher metric of N(μ, σ²) in (μ, σ): diag(1, 2)/σ²; R = −1."""
    return torch.diag(torch.stack([1 / q[1] ** 2, 2 / q[1] ** 2]))


def simplex(q):
    """Fisher metric of a categorical with 3 classes in (p1, p2), p3 = 1 − p1 − p2: δ_ij/p_i + 1/p3; R = 1/2."""
    p3 = 1 - q[0] - q[1]
    return torch.diag(torch.stack([1 / q[0], 1 / q[1]])) + 1 / p3


def polar(q):
    """The flat plane in polar coordinates (r, φ): diag(1, r²); R = 0."""
    return torch.diag(torch.stack([1 + 0 * q[0], q[0] ** 2]))


def entries3(x, y, z, sin):
    """A non-diagonal 3-D metric depending on all coordinates (positive definite near the test points)."""
    return [[2 + sin(y) + x**2 / 4, x * z / 3, y / 5],
            [x * z / 3, 1 + x**2 + y * z / 4, sin(z) / 5],
            [y / 5, sin(z) / 5, 3 + x * y / 2 + z**2 / 3]]


def metric3(q):
    e = entries3(q[0], q[1], q[2], torch.sin)
    return torch.stack([torch.stack(row) for row in e])


@pytest.mark.parametrize("r", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("q", [(0.4, 0.0), (1.2, 2.0), (2.9, -1.0)])
def test_sphere(r, q):
    assert G.scalar_curvature(sphere(r), q) == pytest.approx(2 / r**2, rel=1e-12)


def test_sphere_christoffel_and_tensors():
    th = 0.8
    Gam = G.christoffel(sphere(1.0), [th, 0.3])
    ref = torch.zeros(2, 2, 2, dtype=D)
    ref[0, 1, 1] = -math.sin(th) * math.cos(th)  # Γ^θ_φφ
    ref[1, 0, 1] = ref[1, 1, 0] = math.cos(th) / math.sin(th)  # Γ^φ_θφ
    torch.testing.assert_close(Gam, ref, rtol=1e-12, atol=1e-14)
    Riem = G.riemann(sphere(1.0), [th, 0.3])
    assert Riem[0, 1, 0, 1].item() == pytest.approx(math.sin(th) ** 2, rel=1e-12)  # R^θ_φθφ = sin²θ
    torch.testing.assert_close(G.ricci(sphere(1.0), [th, 0.3]), sphere(1.0)(t(th, 0.3)), rtol=1e-12, atol=1e-14)


def test_three_sphere():
    assert G.scalar_curvature(three_sphere, [0.7, 1.1, 0.2]) == pytest.approx(6.0, rel=1e-12)


@pytest.mark.parametrize("q", [(0.0, 1.0), (-2.0, 0.3), (5.0, 4.0)])
def test_gaussian_fisher_metric(q):
    assert G.scalar_curvature(gaussian_fisher, q) == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.parametrize("q", [(0.2, 0.5), (0.33, 0.33), (0.05, 0.9)])
def test_categorical_simplex(q):
    assert G.scalar_curvature(simplex, q) == pytest.approx(0.5, rel=1e-10)


def test_categorical_simplex_via_fisher_metric():
    """The true Fisher of a softmax over 3 logits (θ1, θ2, 0) is the simplex metric in other coordinates:
    the curvature is coordinate-free, so R = 1/2 at every θ."""

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(t(0.3, -0.7))

        def forward(self, x):
            z = torch.cat([self.theta, torch.zeros(1, dtype=D)])
            return z.expand(x.shape[0], 3)

    m = G.fisher_metric(Logits(), (torch.zeros(1, 1, dtype=D), None), fl.Categorical(), "true")
    for q in [(0.3, -0.7), (2.0, 1.0), (-1.5, 0.0)]:
        assert G.scalar_curvature(m, q) == pytest.approx(0.5, rel=1e-9)


def test_flat_plane_in_polar_coordinates():
    q = [1.7, 0.4]
    assert G.scalar_curvature(polar, q) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(G.riemann(polar, q), torch.zeros(2, 2, 2, 2, dtype=D), atol=1e-12, rtol=0)
    Gam = G.christoffel(polar, q)
    assert Gam[0, 1, 1].item() == pytest.approx(-1.7)  # Γ^r_φφ = −r
    assert Gam[1, 0, 1].item() == pytest.approx(1 / 1.7) == Gam[1, 1, 0].item()  # Γ^φ_rφ = 1/r


def test_one_dimension_is_flat():
    assert G.scalar_curvature(lambda q: (1 + q**2)[None], [0.3]) == 0.0


# ----------------------------------------------------------------------------- symbolic reference (sympy)
@pytest.fixture(scope="module")
def sympy_reference():
    """Γ, Ricci and R of ``entries3`` at a point, derived symbolically (adjugate inverse, symbolic ∂Γ) and
    evaluated with 30-digit mpmath."""
    sp = pytest.importorskip("sympy")
    mpmath = pytest.importorskip("mpmath")
    X = sp.symbols("x y z")
    g = sp.Matrix(entries3(*X, sp.sin))
    d = 3
    ginv = g.adjugate() / g.det()
    dg = [[[sp.diff(g[i, j], X[k]) for k in range(d)] for j in range(d)] for i in range(d)]
    Gam = [[[sum(ginv[i, m] * (dg[m][k][j] + dg[m][j][k] - dg[j][k][m]) for m in range(d)) / 2
             for k in range(d)] for j in range(d)] for i in range(d)]
    dGam = [[[[sp.diff(Gam[i][j][k], X[l]) for l in range(d)] for k in range(d)] for j in range(d)] for i in range(d)]
    flat = ([ginv[i, j] for i in range(d) for j in range(d)]
            + [Gam[i][j][k] for i in range(d) for j in range(d) for k in range(d)]
            + [dGam[i][j][k][l] for i in range(d) for j in range(d) for k in range(d) for l in range(d)])
    fn = sp.lambdify(X, flat, "mpmath", cse=True)
    point = (0.3, -0.5, 0.7)
    with mpmath.workdps(30):
        v = fn(*(mpmath.mpf(c) for c in point))
        gi = np.array([[v[i * d + j] for j in range(d)] for i in range(d)], dtype=object)
        Gn = np.array(v[9:36], dtype=object).reshape(d, d, d)
        dG = np.array(v[36:], dtype=object).reshape(d, d, d, d)

        def riem(a, b, c, e):  # R^a_bce = ∂_c Γ^a_eb − ∂_e Γ^a_cb + Γ^a_cf Γ^f_eb − Γ^a_ef Γ^f_cb
            return dG[a, e, b, c] - dG[a, c, b, e] + sum(Gn[a, c, f] * Gn[f, e, b] - Gn[a, e, f] * Gn[f, c, b]
                                                         for f in range(d))

        ric = np.array([[sum(riem(a, b, a, e) for a in range(d)) for e in range(d)] for b in range(d)], dtype=object)
        R = sum(gi[b, e] * ric[b, e] for b in range(d) for e in range(d))
    return point, Gn.astype(float), ric.astype(float), float(R)


def test_three_dimensional_metric_against_sympy(sympy_reference):
    point, Gam, ric, R = sympy_reference
    assert abs(R) > 0.1  # non-trivial
    assert G.scalar_curvature(metric3, point) == pytest.approx(R, rel=1e-11)
    np.testing.assert_allclose(G.christoffel(metric3, point).numpy(), Gam, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(G.ricci(metric3, point).numpy(), ric, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- finite differences
def _fd(fn, q: np.ndarray, h: float) -> np.ndarray:
    """Central differences of ``fn(q) -> array`` along each coordinate: result[..., k] = ∂_k fn."""
    cols = []
    for k in range(len(q)):
        e = np.zeros_like(q)
        e[k] = h
        cols.append((fn(q + e) - fn(q - e)) / (2 * h))
    return np.stack(cols, -1)


def test_christoffel_against_finite_differences():
    q = np.array([0.3, -0.5, 0.7])
    g = lambda p: metric3(torch.as_tensor(p)).numpy()  # noqa: E731
    dg = _fd(g, q, 1e-5)  # dg[i, j, k] = ∂_k g_ij
    ginv = np.linalg.inv(g(q))
    ref = np.zeros((3, 3, 3))
    for i in range(3):
        for j in range(3):
            for k in range(3):
                ref[i, j, k] = 0.5 * sum(ginv[i, m] * (dg[m, k, j] + dg[m, j, k] - dg[j, k, m]) for m in range(3))
    np.testing.assert_allclose(G.christoffel(metric3, q).numpy(), ref, rtol=1e-7, atol=1e-9)


def test_ricci_against_finite_differences_of_christoffel():
    """∂Γ by central differences of fl.geometry.christoffel, assembled into Ricci with explicit loops."""
    q = np.array([0.3, -0.5, 0.7])
    Gam = G.christoffel(metric3, q).numpy()
    dGam = _fd(lambda p: G.christoffel(metric3, p).numpy(), q, 1e-5)  # dGam[i, j, k, l] = ∂_l Γ^i_jk
    ric = np.zeros((3, 3))
    for b in range(3):
        for d in range(3):
            for a in range(3):
                ric[b, d] += dGam[a, d, b, a] - dGam[a, a, b, d]
                for e in range(3):
                    ric[b, d] += Gam[a, a, e] * Gam[e, d, b] - Gam[a, d, e] * Gam[e, a, b]
    np.testing.assert_allclose(G.ricci(metric3, q).numpy(), ric, rtol=1e-6, atol=1e-8)


def test_riemann_symmetries():
    q = [0.3, -0.5, 0.7]
    Riem = G.riemann(metric3, q)
    g = metric3(t(*q))
    low = torch.einsum("ae,ebcd->abcd", g, Riem)  # R_abcd
    torch.testing.assert_close(Riem, -Riem.transpose(2, 3), rtol=0, atol=1e-12)  # antisymmetric in c, d
    torch.testing.assert_close(low, -low.transpose(0, 1), rtol=0, atol=1e-11)  # R_abcd = −R_bacd
    torch.testing.assert_close(low, low.permute(2, 3, 0, 1), rtol=0, atol=1e-11)  # pair symmetry
    bianchi = Riem + Riem.permute(0, 2, 3, 1) + Riem.permute(0, 3, 1, 2)  # R^a_bcd + R^a_cdb + R^a_dbc
    torch.testing.assert_close(bianchi, torch.zeros_like(bianchi), rtol=0, atol=1e-12)
    ric = G.ricci(metric3, q)
    torch.testing.assert_close(ric, ric.T, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- many points
def test_curvature_batch_matches_single_points():
    q = torch.tensor([[0.3, -0.5, 0.7], [0.1, 0.2, 0.3], [-0.4, 0.6, -0.2]], dtype=D)
    c = G.curvature(metric3, q, keep=("ricci", "christoffel", "riemann"), chunk_size=2)
    assert c.scalar.shape == (3,) and not c.singular.any() and not c.regularized.any()
    assert c.reason == ["", "", ""]
    for m in range(3):
        assert c.scalar[m].item() == pytest.approx(G.scalar_curvature(metric3, q[m]), rel=1e-12)
        torch.testing.assert_close(c.ricci[m], G.ricci(metric3, q[m]))
        torch.testing.assert_close(c.christoffel[m], G.christoffel(metric3, q[m]))
        torch.testing.assert_close(c.riemann[m], G.riemann(metric3, q[m]))
        torch.testing.assert_close(c.metric[m], metric3(q[m]))


def test_curvature_grid_of_the_sphere():
    th = torch.cartesian_prod(torch.linspace(0.2, 2.9, 40, dtype=D), torch.linspace(-3, 3, 40, dtype=D))
    c = G.curvature(sphere(2.0), th)
    torch.testing.assert_close(c.scalar, torch.full((1600,), 0.5, dtype=D), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- singular metrics
def degenerate(q):
    """rank-1 metric (a, a)ᵀ(a, a) plus a θ-dependent part that vanishes at q = 0."""
    return torch.outer(torch.stack([1 + q[0], 1 + q[0]]), torch.stack([1 + q[0], 1 + q[0]])) + torch.diag(
        torch.stack([q[1] ** 2, q[1] ** 2]))


def test_singular_metric_raises():
    with pytest.raises(ValueError, match="condition number"):
        G.scalar_curvature(degenerate, [0.0, 0.0])
    with pytest.raises(ValueError, match="condition number"):
        G.christoffel(degenerate, [0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        G.scalar_curvature(lambda q: torch.diag(1 / q), [0.0, 1.0])


def test_regularised_value_warns_and_equals_shifted_metric():
    eps = 1e-3
    with pytest.warns(G.IllConditionedMetricWarning, match="g \\+ 0.001·I"):
        R = G.scalar_curvature(degenerate, [0.0, 0.0], regularize=eps)
    shifted = lambda q: degenerate(q) + eps * torch.eye(2, dtype=D)  # noqa: E731
    assert R == pytest.approx(G.scalar_curvature(shifted, [0.0, 0.0]), rel=1e-12)
    assert math.isfinite(R)


def test_batch_marks_singular_points_with_reasons():
    q = torch.tensor([[0.0, 0.0], [0.5, 0.7], [0.0, 1e-9]], dtype=D)
    with pytest.warns(G.IllConditionedMetricWarning, match="2 of 3 points are singular"):
        c = G.curvature(degenerate, q)
    assert c.singular.tolist() == [True, False, True]
    assert torch.isnan(c.scalar[c.singular]).all() and torch.isfinite(c.scalar[~c.singular]).all()
    assert "condition number" in c.reason[0] and c.reason[1] == ""
    assert math.isinf(c.cond[0].item()) or c.cond[0].item() > 1e12
    with pytest.warns(G.IllConditionedMetricWarning, match="were regularised"):
        r = G.curvature(degenerate, q, regularize=1e-3)
    assert r.regularized.tolist() == [True, False, True] and not r.singular.any()
    assert torch.isfinite(r.scalar).all() and "regularised" in r.reason[0]
    assert r.scalar[1].item() == pytest.approx(c.scalar[1].item(), rel=1e-12)


def test_input_errors():
    with pytest.raises(ValueError, match="d <= 64"):
        G.scalar_curvature(lambda q: torch.diag(1 + q**2), torch.zeros(65, dtype=D))
    with pytest.raises(ValueError, match="shape"):
        G.scalar_curvature(lambda q: torch.eye(3, dtype=D) + 0 * q[0], [0.1, 0.2])
    with pytest.raises(TypeError, match="float64"):
        G.scalar_curvature(lambda q: torch.diag(1 + q**2).float(), [0.1, 0.2])
    with pytest.raises(ValueError, match="theta must be a point"):
        G.scalar_curvature(polar, [[1.0, 0.0]])
    with pytest.raises(ValueError, match="NaN"):
        G.scalar_curvature(polar, [math.nan, 0.0])
    with pytest.raises(ValueError, match="keep"):
        G.curvature(polar, [[1.0, 0.0]], keep=("everything",))
    with pytest.raises(ValueError, match="regularize"):
        G.scalar_curvature(polar, [1.0, 0.0], regularize=-1)


# ----------------------------------------------------------------------------- path length
def test_path_length_exact_cases():
    s = torch.linspace(0.1, math.pi - 0.1, 50, dtype=D)
    meridian = torch.stack([s, torch.full_like(s, 0.3)], -1)  # g_θθ = r² constant along it
    assert G.path_length(sphere(2.0), meridian) == pytest.approx(2.0 * (math.pi - 0.2), rel=1e-12)
    phi = torch.linspace(0, 2 * math.pi, 400, dtype=D)
    latitude = torch.stack([torch.full_like(phi, 0.6), phi], -1)
    assert G.path_length(sphere(1.0), latitude) == pytest.approx(2 * math.pi * math.sin(0.6), rel=1e-12)


def test_path_length_converges_for_curved_coordinates():
    """Gaussian (μ, σ) metric along σ from 1 to 4 at fixed μ: length √2 ln 4; the left rule converges
    at first order, the midpoint rule at second order."""
    exact = math.sqrt(2) * math.log(4)
    errs = {}
    for rule in ("left", "midpoint"):
        for T in (50, 100):
            sig = torch.linspace(1, 4, T + 1, dtype=D)
            path = torch.stack([torch.zeros_like(sig), sig], -1)
            errs[rule, T] = abs(G.path_length(gaussian_fisher, path, rule=rule) - exact)
    assert errs["left", 100] < 0.03 and errs["left", 50] / errs["left", 100] == pytest.approx(2, rel=0.05)
    assert errs["midpoint", 100] < 1e-4 and errs["midpoint", 50] / errs["midpoint", 100] == pytest.approx(4, rel=0.05)


def test_path_length_straight_line_in_polar_coordinates():
    """A straight segment from (1, 0) to (1, 1) in the plane, written in polar coordinates."""
    u = torch.linspace(0, 1, 2001, dtype=D)
    x, y = torch.ones_like(u), u
    path = torch.stack([torch.hypot(x, y), torch.atan2(y, x)], -1)
    assert G.path_length(polar, path, rule="midpoint") == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="two points"):
        G.path_length(polar, path[:1])
    with pytest.raises(ValueError, match="positive semi-definite"):
        G.path_length(lambda q: -torch.eye(2, dtype=D) + 0 * q[0], path[:3])


# ----------------------------------------------------------------------------- fisher_metric of models
def _mlp(seed: int, d_in=3, hidden=4, C=3):
    torch.manual_seed(seed)
    return tanh_mlp(d_in, hidden, C).double()


@pytest.mark.parametrize(
    ("lik", "kind", "C"),
    [(fl.Categorical(), "true", 3), (fl.Categorical(), "empirical", 3), (fl.Gaussian(0.7), "true", 2),
     (fl.Bernoulli(), "true", 1), (fl.Bernoulli(), "empirical", 1),
     (fl.LossInduced(fl.losses.mean_power(2)), "empirical", 2)],
)
def test_fisher_metric_equals_fisher_matrix(lik, kind, C):
    model = _mlp(1, C=C)
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(9, 3, generator=gen, dtype=D)
    if isinstance(lik, fl.Categorical):
        Y = torch.randint(0, C, (9,), generator=gen)
    elif isinstance(lik, fl.Bernoulli):
        Y = torch.randint(0, 2, (9,), generator=gen).double()
    else:
        Y = torch.randn(9, C, generator=gen, dtype=D)
    m = G.fisher_metric(model, (X, Y), lik, kind, params=["2"])  # the output layer: d = 4·C + C
    ref = fl.fisher_matrix(model, (X, Y), lik, kind, params=["2"])
    torch.testing.assert_close(m(m.theta0), ref, rtol=1e-10, atol=1e-13)
    assert m.dim == ref.shape[0]
    summed = G.fisher_metric(model, (X, Y), lik, kind, params=["2"], reduction="sum")
    torch.testing.assert_close(summed(m.theta0), 9 * ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("lik", "kind"), [(fl.Categorical(), "true"), (fl.Categorical(), "empirical"),
                                          (fl.LossInduced(fl.losses.softmax_cross_entropy()), "empirical")])
def test_forward_and_reverse_jacobians_agree(lik, kind):
    """mode="forward" (jacfwd over the batch) and mode="reverse" (vmap of per-sample jacrev) give the same
    metric and curvature; integer labels pass through the loss's checks in both."""
    # hidden layer "0": 2·3 + 3 = 9 > 2C + 1 = 7 parameters, so auto picks reverse (the output layer of a
    # softmax would give a singular Fisher: adding a constant to every logit changes nothing)
    model = _mlp(7, d_in=2, hidden=3, C=3)
    X = torch.randn(12, 2, dtype=D)  # N ≥ d, else the empirical Fisher (rank ≤ N) is singular
    Y = torch.randint(0, 3, (12,))
    fwd = G.fisher_metric(model, (X, Y), lik, kind, params=["0"], mode="forward")
    rev = G.fisher_metric(model, (X, Y), lik, kind, params=["0"])
    assert rev.mode == "reverse" and fwd.mode == "forward"
    q = fwd.theta0 + 0.1
    torch.testing.assert_close(fwd(q), rev(q), rtol=1e-12, atol=1e-15)
    assert G.scalar_curvature(fwd, q) == pytest.approx(G.scalar_curvature(rev, q), rel=1e-9)
    torch.testing.assert_close(fwd.jacobian(q), rev.jacobian(q), rtol=1e-12, atol=1e-15)


def test_fisher_metric_ntk_trace_and_loss():
    model = _mlp(3, C=2)
    X = torch.randn(6, 3, dtype=D)
    Y = torch.randint(0, 2, (6,))
    m = G.fisher_metric(model, (X, Y), fl.Categorical(), "empirical")
    assert m.ntk_trace(m.theta0).item() == pytest.approx(fl.ntk_trace(model, X, reduction="sum"), rel=1e-10)
    assert m.loss(m.theta0).item() == pytest.approx(nn.functional.cross_entropy(model(X), Y).item(), rel=1e-12)
    # the metric is independent of later changes to the model (it holds a float64 copy)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert m.loss(m.theta0).item() != pytest.approx(nn.functional.cross_entropy(model(X), Y).item())


def test_fisher_metric_of_float32_model_and_streamed_data():
    model = _mlp(4, C=2).float()
    X = torch.randn(10, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, torch.randint(0, 2, (10,))), batch_size=4)
    m = G.fisher_metric(model, loader, fl.Categorical(), "true", params=["2.bias"])
    assert m.theta0.dtype == D and m.n == 10
    ref = fl.fisher_matrix(model.double(), (X.double(), None), fl.Categorical(), "true", params=["2.bias"])
    torch.testing.assert_close(m(m.theta0), ref, rtol=1e-10, atol=1e-12)


def test_fisher_metric_errors():
    model = _mlp(5)
    X = torch.randn(4, 3, dtype=D)
    with pytest.raises(ValueError, match="mc"):
        G.fisher_metric(model, (X, None), fl.Categorical(), "mc")
    with pytest.raises(ValueError, match="empirical"):
        G.fisher_metric(model, (X, None), fl.LossInduced(fl.losses.mean_power(2)), "true")
    with pytest.raises(ValueError, match="d <= 64"):
        G.fisher_metric(nn.Linear(10, 10).double(), (torch.randn(3, 10, dtype=D), None), fl.Gaussian(), "true")
    with pytest.raises(ValueError, match="too much"):
        G.fisher_metric(model, (torch.randn(1000, 3, dtype=D), None), fl.Categorical(), "true", max_data_bytes=1000)
    with pytest.raises(ValueError, match="labels"):
        G.fisher_metric(model, (X, None), fl.Categorical(), "empirical")


def test_curvature_of_a_small_network_against_brioschi():
    """R of a 2-parameter Fisher metric vs Brioschi's formula for 2K with finite-difference derivatives.

    (Not ``w·tanh(b + …)`` with θ = (b, w): its Gaussian Fisher is the pull-back of R^N through a cone, which is
    flat — R = 0 exactly, as the code finds.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Tanh(), nn.Linear(1, 2)).double()
    X = torch.randn(12, 2, dtype=D)
    for lik in (fl.Gaussian(), fl.Categorical()):
        m = G.fisher_metric(model, (X, None), lik, "true", params=["0.weight"])
        q = m.theta0 + t(0.3, 0.5)
        R = G.scalar_curvature(m, q)
        assert abs(R) > 1e-3
        assert R == pytest.approx(ref.brioschi(m, q), rel=1e-5)


# ----------------------------------------------------------------------------- KL self-test
@pytest.mark.parametrize(("lik", "C"), [(fl.Categorical(), 3), (fl.Gaussian(0.5), 2), (fl.Bernoulli(), 1)])
def test_kl_check(lik, C):
    model = _mlp(6, C=C)
    X = torch.randn(20, 3, dtype=D)
    gen = torch.Generator().manual_seed(0)
    r = G.kl_check(model, (X, None), lik, scale=1e-4, generator=gen)
    assert r == pytest.approx(1.0, abs=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = G.kl_check(model, (X, None), lik, scale=0.3, generator=torch.Generator().manual_seed(0))
    assert abs(big - 1) > abs(r - 1)  # the quadratic approximation degrades with the step
    with pytest.raises(ValueError, match="KL"):
        G.kl_check(model, (X, torch.zeros(20, C, dtype=D)), fl.LossInduced(fl.losses.mean_power(2)))


# ----------------------------------------------------------------------------- metrics that are not metrics
def indefinite(q):
    return torch.diag(torch.stack([1 + q[0] ** 2, -(1 + q[1] ** 2)]))


def asymmetric(q):
    return torch.stack([torch.stack([1 + q[0] ** 2, 0.3 + 0 * q[0]]), torch.stack([0 * q[0], 1 + q[1] ** 2])])


def with_item(q):  # .item() cuts the graph: forward-mode derivatives read 0
    a = q[0].item()
    return torch.tensor([[1.0, 0.0], [0.0, 1.0 + a * a]], dtype=D)


def with_detach(q):
    t = q.detach()
    return torch.diag(torch.stack([torch.ones((), dtype=D), 1 + t[0] ** 2 + t[1] ** 2]))


def with_numpy(q):
    return torch.as_tensor([[1.0, 0.0], [0.0, 1.0 + float(q.numpy()[0]) ** 2]], dtype=D)


POINT_FNS = [G.christoffel, G.riemann, G.ricci, G.scalar_curvature]
TH = torch.tensor([0.3, 0.2], dtype=D)


@pytest.mark.parametrize("fn", POINT_FNS)
def test_indefinite_and_asymmetric_metrics_refused(fn):
    raises(ValueError, r"not positive definite: its smallest eigenvalue is -1\.04", fn, indefinite, TH)
    raises(ValueError, r"smallest eigenvalue", fn, indefinite, TH, regularize=10.0)  # not a conditioning problem
    raises(ValueError, r"not symmetric", fn, asymmetric, TH)


def test_indefinite_metric_in_batch_and_path():
    q = torch.tensor([[0.3, 0.2], [0.1, 0.4]], dtype=D)
    with pytest.warns(G.IllConditionedMetricWarning, match="2 of 2 points are singular"):
        c = G.curvature(indefinite, q, regularize=1e-3)
    assert c.singular.all() and torch.isnan(c.scalar).all() and not c.regularized.any()
    assert "smallest eigenvalue is -1.04" in c.reason[0]
    raises(ValueError, r"smallest eigenvalue", G.path_length, indefinite, q)


@pytest.mark.parametrize("fn", POINT_FNS)
@pytest.mark.parametrize("metric", [with_item, with_detach])
def test_metric_with_cut_graph_refused(fn, metric):
    raises(ValueError, r"autograd.*\.item\(\)", fn, metric, TH)


def test_metric_with_cut_graph_refused_in_batch():
    q = torch.tensor([[0.3, 0.2], [0.1, 0.4]], dtype=D)
    raises(ValueError, r"autograd", G.curvature, with_detach, q)
    raises(ValueError, r"\.item\(\)", G.curvature, with_item, q)  # fails under vmap
    raises(ValueError, r"\.item\(\)", G.path_length, with_item, q)
    raises(ValueError, r"torch operations", G.scalar_curvature, with_numpy, TH)
    # the length needs no derivatives: a detached metric gives the right value
    assert G.path_length(with_detach, q) > 0


def test_constant_and_flat_points_still_fine():
    const = lambda q: torch.eye(2, dtype=D)  # noqa: E731 - no autograd dependence, genuinely constant
    assert G.scalar_curvature(const, TH) == 0.0
    assert not G.christoffel(const, TH).any()
    quad = lambda q: torch.diag(1 + q**2)  # noqa: E731 - derivatives exactly 0 at the origin, graph intact
    assert not G.christoffel(quad, torch.zeros(2, dtype=D)).any()
    c = G.curvature(const, torch.randn(3, 2, dtype=D))
    assert (c.scalar == 0).all() and not c.singular.any()


def test_fisher_metric_refuses_structured_outputs_and_takes_output():
    """fisher_metric is for one prediction per input: (N, T, C) outputs are refused with a pointer to
    fl.fisher_matrix; output= picks the tensor from a tuple output."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(3, 4)).double()
    X = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one prediction per input"):
        fl.geometry.fisher_metric(seq, (X, None), fl.Categorical(), params="0.bias")

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x), x

    pair = Pair().double()
    Xf = X[:, 0]
    g = fl.geometry.fisher_metric(pair, (Xf, None), fl.Categorical(), params="lin.bias", output=lambda o: o[0])
    ref = fl.fisher_matrix(pair.lin, (Xf, None), fl.Categorical(), params="bias")
    assert torch.allclose(g(g.theta0), ref)
