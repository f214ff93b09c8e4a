"""fisherlens.gibbs: exact Gibbs models, their Fisher metrics, and the curvature at known closed forms."""

import itertools
import math

import numpy as np
import pytest
import torch

import fisherlens.geometry as geo
from fisherlens.gibbs import CurieWeiss, ExponentialFamily, Ising2D, IsingChain, rbm_metric

F64 = torch.float64
GRID = [(b, h) for b in (-0.4, 0.05, 0.3, 0.44, 0.8, 1.5) for h in (-1.2, -0.1, 0.0, 0.35, 2.0)]


def t(*x):
    return torch.tensor(x, dtype=F64)


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- independent brute force
def brute_lattice(L, beta, h, periodic=True):
    """(log Z / N, Cov[φ] / N) of the L×L Ising model by plain loops over states and bonds."""
    N = L * L
    bonds = []
    for i, j in itertools.product(range(L), range(L)):
        for di, dj in ((0, 1), (1, 0)):
            a, b = i + di, j + dj
            if periodic:
                bonds.append((i * L + j, (a % L) * L + b % L))
            elif a < L and b < L:
                bonds.append((i * L + j, a * L + b))
    phis = []
    for s in itertools.product((-1, 1), repeat=N):
        phis.append((sum(s[p] * s[q] for p, q in bonds), sum(s)))
    return _moments(np.array(phis, dtype=float), beta, h, N)


def brute_lattice_vec(L, beta, h):
    """Vectorised numpy version (periodic) for L = 4."""
    N = L * L
    idx = np.arange(2**N)
    s = (1 - 2 * ((idx[:, None] >> np.arange(N)) & 1)).reshape(-1, L, L)
    E = (s * np.roll(s, 1, axis=1)).sum((1, 2)) + (s * np.roll(s, 1, axis=2)).sum((1, 2))
    return _moments(np.stack([E, s.sum((1, 2))], 1).astype(float), beta, h, N)


def _moments(phi, beta, h, N):
    x = phi @ np.array([beta, h])
    c = x.max()
    w = np.exp(x - c)
    Z = w.sum()
    p = w / Z
    mu = p @ phi
    d = phi - mu
    return (c + math.log(Z)) / N, (d.T * p) @ d / N


def brute_chain(n, beta, h):
    phis = [(sum(s[i] * s[(i + 1) % n] for i in range(n)), sum(s)) for s in itertools.product((-1, 1), repeat=n)]
    return _moments(np.array(phis, dtype=float), beta, h, n)


def chain_metric_exact(beta, h):
    """Hessian of log λ₊ by hand: u = e^{-4β}, D = √(sinh² h + u), q = D(cosh h + D)."""
    u, s, c = math.exp(-4 * beta), math.sinh(h), math.cosh(h)
    D = math.sqrt(s * s + u)
    q = D * (c + D)
    gbb = 8 * u / q - 4 * u * u * (c + 2 * D) / (D * q * q)
    gbh = 2 * u * s / D**3
    ghh = c * u / D**3
    return np.array([[gbb, gbh], [gbh, ghh]])


# ----------------------------------------------------------------------------- 1-D chain
def test_chain_metric_closed_form():
    worst = max(rel(IsingChain().metric(t(b, h)), chain_metric_exact(b, h)) for b, h in GRID)
    assert worst < 1e-12
    worst = max(rel(IsingChain().hessian(t(b, h)), chain_metric_exact(b, h)) for b, h in GRID)
    assert worst < 1e-10


def test_chain_scalar_curvature_closed_form():
    chain = IsingChain()
    worst = 0.0
    for b, h in GRID:
        R = geo.scalar_curvature(chain, t(b, h))
        worst = max(worst, abs(R / IsingChain.scalar_curvature_exact(t(b, h)) - 1))
    assert worst < 1e-8
    # the vectorised path (vmap) agrees too
    th = torch.tensor(GRID, dtype=F64)
    res = geo.curvature(chain, th)
    exact = torch.tensor([IsingChain.scalar_curvature_exact(x) for x in th], dtype=F64)
    assert not res.singular.any()
    assert ((res.scalar / exact - 1).abs().max()) < 1e-8


def test_chain_instance_is_the_metric_and_log_partition():
    chain, th = IsingChain(), t(0.7, -0.3)
    assert torch.equal(chain(th), chain.metric(th))
    b, h = 0.7, -0.3
    lam = math.exp(b) * math.cosh(h) + math.sqrt(math.exp(2 * b) * math.sinh(h) ** 2 + math.exp(-2 * b))
    assert chain.log_partition([b, h]).dim() == 0
    assert abs(chain.log_partition([b, h]).item() - math.log(lam)) < 1e-14


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_finite_chain_vs_enumeration(n):
    fin = IsingChain.finite(n)
    states = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=F64)

    def phi(s):
        return torch.stack([(s * torch.roll(s, -1, 1)).sum(1), s.sum(1)], 1)

    fam = ExponentialFamily(phi, states, sites=n)
    for b, h in GRID[::3]:
        lz, g = brute_chain(n, b, h)
        assert abs(fin.log_partition(t(b, h)).item() - lz) < 1e-12 * max(1, abs(lz))
        assert rel(fin.metric(t(b, h)), g) < 1e-10
        assert rel(fam.metric(t(b, h)), g) < 1e-10


def test_finite_chain_tends_to_the_limit():
    th = t(0.4, 0.2)
    assert rel(IsingChain.finite(60).metric(th), IsingChain().metric(th)) < 1e-8


# ----------------------------------------------------------------------------- general family
def test_metric_is_hessian_is_covariance():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(40, 3, generator=gen, dtype=F64)
    lw = torch.randn(40, generator=gen, dtype=F64)
    fam = ExponentialFamily(phi, sites=4, log_weights=lw)
    th = t(0.3, -0.5, 0.8)
    cov, hes = fam.metric(th), fam.hessian(th)
    assert torch.allclose(cov, hes, rtol=1e-12, atol=1e-14)
    p = torch.softmax(phi @ th + lw, 0)
    mu = p @ phi
    manual = sum(p[i] * torch.outer(phi[i] - mu, phi[i] - mu) for i in range(40)) / 4
    assert torch.allclose(cov, manual, rtol=1e-12, atol=1e-14)
    assert torch.allclose(fam.mean(th), mu / 4)
    assert abs(fam.log_partition(th).item() - torch.log(torch.exp(phi @ th + lw).sum()).item() / 4) < 1e-13


# ----------------------------------------------------------------------------- 2-D Ising
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("boundary", ["periodic", "open"])
def test_ising2d_small_vs_loops(L, boundary):
    model = Ising2D(L, boundary)
    for b, h in [(0.2, 0.0), (0.44, 0.3), (-0.3, -0.6), (1.1, 0.05)]:
        lz, g = brute_lattice(L, b, h, periodic=boundary == "periodic")
        assert abs(model.log_partition(t(b, h)).item() - lz) < 1e-12 * max(1, abs(lz))
        assert rel(model.metric(t(b, h)), g) < 1e-10


def test_ising2d_L4_vs_vectorised_enumeration():
    model = Ising2D(4)
    for b, h in [(0.3, 0.1), (0.4407, 0.0), (-0.2, 0.5)]:
        lz, g = brute_lattice_vec(4, b, h)
        assert abs(model.log_partition(t(b, h)).item() - lz) < 1e-12 * max(1, abs(lz))
        assert rel(model.metric(t(b, h)), g) < 1e-10
        assert rel(model.hessian(t(b, h)), g) < 1e-10


@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize("boundary", ["periodic", "open"])
def test_transfer_matrix_vs_enumeration(L, boundary):
    enum, tm = Ising2D(L, boundary, method="enumerate"), Ising2D(L, boundary, method="transfer")
    for b, h in [(0.25, 0.2), (0.6, -0.1), (-0.5, 0.0), (3.0, 0.0)]:
        th = t(b, h)
        assert abs(tm.log_partition(th).item() / enum.log_partition(th).item() - 1) < 1e-12
        assert rel(tm.metric(th), enum.metric(th)) < 1e-9


def test_transfer_matrix_curvature_matches_enumeration():
    th = t(0.35, 0.15)
    R_enum = geo.scalar_curvature(Ising2D(3), th)
    R_tm = geo.scalar_curvature(Ising2D(3, method="transfer"), th)
    assert abs(R_tm / R_enum - 1) < 1e-8


def test_transfer_matrix_larger_lattice_runs():
    g = Ising2D(6).metric(t(0.4, 0.1))
    assert g.shape == (2, 2) and torch.isfinite(g).all()
    assert torch.linalg.eigvalsh(g).min() > 0


# ----------------------------------------------------------------------------- Curie–Weiss
@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_curie_weiss_vs_enumeration(n):
    states = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=F64)

    def phi(s):
        M = s.sum(1)
        return torch.stack([M**2 / (2 * n), M], 1)

    fam, cw = ExponentialFamily(phi, states, sites=n), CurieWeiss(n)
    for b, h in GRID[::4]:
        th = t(b, h)
        assert abs(cw.log_partition(th).item() - fam.log_partition(th).item()) < 1e-12 * max(
            1, abs(fam.log_partition(th).item()))
        assert rel(cw.metric(th), fam.metric(th)) < 1e-10


def test_curie_weiss_limit():
    cw = CurieWeiss()
    for b, h in [(0.5, 0.3), (1.5, 0.2), (2.0, -0.4), (-0.7, 0.5), (1.3, 0.0)]:
        th = t(b, h)
        m = cw.magnetisation(th).item()
        assert abs(m - math.tanh(b * m + h)) < 1e-13
        assert rel(cw.metric(th), cw.hessian(th)) < 1e-8
        if h != 0:  # at h = 0 a finite system is symmetric (two peaks); the limit takes the h -> 0+ branch
            assert rel(CurieWeiss(4000).metric(th), cw.metric(th)) < 3e-3
    # h = 0, β > 1 takes the m > 0 branch; the limit metric has rank 1
    assert cw.magnetisation(t(1.3, 0.0)).item() > 0.5
    assert abs(torch.linalg.det(cw.metric(t(0.5, 0.3))).item()) < 1e-12


# ----------------------------------------------------------------------------- RBM
def test_rbm_metric_vs_finite_differences():
    fam = rbm_metric(3, 2)
    th = torch.linspace(-0.7, 0.9, 6, dtype=F64)
    g = fam(th)
    eps, d = 1e-4, 6
    E = torch.eye(d, dtype=F64) * eps
    fd = torch.empty(d, d, dtype=F64)
    for i in range(d):
        for j in range(d):
            fd[i, j] = (fam.log_partition(th + E[i] + E[j]) - fam.log_partition(th + E[i] - E[j])
                        - fam.log_partition(th - E[i] + E[j]) + fam.log_partition(th - E[i] - E[j])) / (4 * eps**2)
    assert rel(g, fd) < 1e-6


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    with pytest.raises(ValueError, match="L must be >= 2"):
        Ising2D(1)
    with pytest.raises(ValueError, match="unknown boundary"):
        Ising2D(3, "helical")
    with pytest.raises(ValueError, match="enumeration"):
        Ising2D(5, method="enumerate")
    with pytest.raises(ValueError, match="transfer matrix is limited"):
        Ising2D(11)
    with pytest.raises(TypeError):
        Ising2D(2.5)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        IsingChain().metric(t(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="NaN or inf"):
        IsingChain().metric(t(float("nan"), 0.2))
    with pytest.raises(TypeError, match="theta must be"):
        IsingChain().metric("abc")
    with pytest.raises(ValueError, match="n >= 2"):
        IsingChain.finite(1)
    with pytest.raises(ValueError, match="statistics must have shape"):
        ExponentialFamily(torch.ones(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        ExponentialFamily(torch.tensor([[1.0], [float("inf")]]))
    with pytest.raises(ValueError, match="log_weights must have shape"):
        ExponentialFamily(torch.ones(4, 2), log_weights=torch.zeros(3))
    with pytest.raises(TypeError, match="needs `states`"):
        ExponentialFamily(lambda s: s)
    with pytest.raises(ValueError, match=r"statistics\(states\)"):
        ExponentialFamily(lambda s: s[:2], torch.ones(4, 2))
    with pytest.raises(ValueError, match="sites"):
        ExponentialFamily(torch.ones(4, 2), sites=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        CurieWeiss(0)
    with pytest.raises(ValueError, match="16 units"):
        rbm_metric(10, 10)
    with pytest.raises(ValueError, match="singular|ill-conditioned|condition"):
        geo.scalar_curvature(CurieWeiss(), t(0.5, 0.3))


def test_monte_carlo_hook():
    model = Ising2D(4, "open")
    with pytest.raises(ValueError, match="periodic"):
        model.monte_carlo(t(0.3, 0.0), sweeps=10, burn_in=1)


def test_monte_carlo_agrees_with_exact():
    pytest.importorskip("fisherlens.gibbs.montecarlo")
    model, th = Ising2D(4), t(0.3, 0.0)
    res = model.monte_carlo(th, sweeps=4000, burn_in=200, generator=torch.Generator().manual_seed(1))
    exact = model.metric(th)
    assert ((res.metric - exact).abs() <= 5 * res.stderr + 1e-12).all()
