"""Deep linear networks (seed 002 ch. 3): BPKR, HZ/Meijer G, Gaussian limit, exact posterior and the samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import fisherlens as fl  # noqa: F401  (the package must import with the theory module)
from fisherlens.theory import dlnn


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small batched ops: one intra-op thread is fastest (and robust on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _task(P=5, N0=12, tau2=4.0, seed=0, M=6):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((P, N0))
    y = X @ (rng.standard_normal(N0) * math.sqrt(tau2 / N0))
    return X, y, rng.standard_normal((M, N0))


# ----------------------------------------------------------------------------- BPKR saddle point
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("N", [3, 20, 400])
def test_u0_solves_eq_3_32(L, N):
    X, y, _ = _task(P=8, N0=20)
    for s2 in (0.5, 1.0, 2.0):
        b = dlnn.BPKR(X, y, L, N, sigma2=s2)
        lhs = 1 - b.u0 / s2
        rhs = b.alpha * (1 - b.r0 / b.u0**L)
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs), b.alpha)
        # the stationary point of eq 3.31 is a minimum of βH_0
        du = 1e-4 * b.u0
        h0, hm, hp = (b.effective_hamiltonian(b.u0 + t) for t in (0.0, -du, du))
        assert hm > h0 and hp > h0
        assert abs(hp - hm) / (2 * du) < 1e-5 * N * L / b.u0
        # eq 3.44 and eq 3.45
        hz = dlnn.HZ(X, y, L, N, sigma2=s2)
        assert b.alpha0 * s2 * b.r0 == pytest.approx(hz._data.theta_norm2, rel=1e-12)
        assert b.u0 == pytest.approx(s2 * (1 + hz.z_star), rel=1e-12)


def test_u0_finite_temperature_and_limits():
    X, y, xs = _task(P=6, N0=16)
    b0 = dlnn.BPKR(X, y, 2, 10)
    bT = dlnn.BPKR(X, y, 2, 10, temperature=1e-9)
    assert bT.u0 == pytest.approx(b0.u0, rel=1e-6)
    b = dlnn.BPKR(X, y, 2, 10, temperature=0.3)
    assert abs(b.saddle_residual(b.u0)) < 1e-12
    # BPKR at T > 0 is the GP with kernel u0^L K0 (checked against the explicit formula)
    K = b.sigma2 * b.kernel_scale / X.shape[1]
    G = K * X @ X.T + 0.3 * np.eye(len(y))
    k = K * xs @ X.T
    assert np.allclose(b.mean(xs), k @ np.linalg.solve(G, y), rtol=1e-10)
    assert np.allclose(b.variance(xs), K * np.sum(xs**2, 1) - np.sum(k * np.linalg.solve(G, k.T).T, 1), rtol=1e-9)
    # T = 0: eqs 3.35 and 3.36 written out with K_0
    K0 = b0.sigma2 / X.shape[1] * X @ X.T
    s2n = b0.sigma2 / X.shape[1]
    mean = s2n * xs @ X.T @ np.linalg.solve(K0, y)
    var = b0.u0**2 * (s2n * np.sum(xs**2, 1) - s2n**2 * np.sum((xs @ X.T) * np.linalg.solve(K0, X @ xs.T).T, 1))
    assert np.allclose(b0.mean(xs), mean, rtol=1e-10) and np.allclose(b0.variance(xs), var, rtol=1e-9)


# ----------------------------------------------------------------------------- Meijer G vs direct integration
def _G_direct_1(b, P, N, k):
    """G^{2,0}_{0,2}(b | P/2, N/2+k) = b^{P/2} ∫ γ^{N/2+k−P/2−1} e^{−γ−b/γ} dγ (scipy quad in t = log γ)."""
    c = N / 2 + k - P / 2
    val, err = integrate.quad(lambda t: math.exp(c * t - math.exp(t) - b * math.exp(-t)), -40, 40, limit=400,
                              epsabs=0, epsrel=1e-13)
    return b ** (P / 2) * val


def _G_direct_2(b, P, N1, N2, k):
    c1, c2 = N1 / 2 + k - P / 2, N2 / 2 + k - P / 2

    def f(t2, t1):
        return math.exp(c1 * t1 + c2 * t2 - math.exp(t1) - math.exp(t2) - b * math.exp(-t1 - t2))

    val, _ = integrate.dblquad(f, -30, 30, -30, 30, epsabs=0, epsrel=1e-11)
    return b ** (P / 2) * val


def test_meijer_g_vs_direct_integration():
    X, y, xs = _task(P=3, N0=7, seed=3)
    h1 = dlnn.HZ(X, y, 1, 4, method="meijerg")
    for k in (0, 1):
        assert math.exp(h1.log_G(k)) == pytest.approx(_G_direct_1(h1.argument, 3, 4, k), rel=1e-10)
    h2 = dlnn.HZ(X, y, 2, (3, 5), method="meijerg")
    for k in (0, 1):
        assert math.exp(h2.log_G(k)) == pytest.approx(_G_direct_2(h2.argument, 3, 3, 5, k), rel=1e-8)
    assert h1.method_used == h2.method_used == "meijerg"
    # the variance of eq 3.42b against E[s | data] computed by 1-D quadrature of the prior of s (L = 1)
    N, P, N0 = 4, 3, 7
    a = (1 / N0) * (2 / N)
    th2 = h1._data.theta_norm2

    def moment(j):
        return integrate.quad(lambda t: math.exp((N / 2) * t - math.exp(t) + (j - P / 2) * math.log(a * math.exp(t))
                                                 - th2 / (2 * a * math.exp(t))), -40, 40, epsrel=1e-13)[0]

    assert h1.scale_mean == pytest.approx(moment(1) / moment(0), rel=1e-10)
    _, _, xperp2, _ = h1._data.project(xs)
    assert np.allclose(h1.variance(xs), moment(1) / moment(0) * xperp2, rtol=1e-10)


@pytest.mark.parametrize("L,widths", [(1, 6), (2, (4, 9)), (3, 7)])
def test_meijerg_quadrature_and_exact_posterior_agree(L, widths):
    X, y, xs = _task(P=5, N0=12, seed=L)
    hm = dlnn.HZ(X, y, L, widths, method="meijerg")
    hq = dlnn.HZ(X, y, L, widths, method="quadrature")
    ex = dlnn.ExactPosterior(X, y, L, widths)
    for k in (0, 1):
        assert hm.log_G(k) == pytest.approx(hq.log_G(k), rel=1e-11, abs=1e-11)
    assert np.allclose(hm.variance(xs), ex.variance(xs), rtol=1e-10)
    assert np.allclose(hm.mean(xs), ex.mean(xs), rtol=1e-10)
    assert np.allclose(hm.mean(xs), xs @ hm.theta_star, rtol=1e-12)
    assert np.allclose(X @ hm.theta_star, y, rtol=1e-10)  # θ* interpolates (eq 3.47)
    # T → 0 limit of the finite-temperature posterior
    exT = dlnn.ExactPosterior(X, y, L, widths, temperature=1e-10)
    assert np.allclose(exT.variance(xs), ex.variance(xs), rtol=1e-6)


# ----------------------------------------------------------------------------- BPKR vs HZ (seed 002 §3.2.3)
def test_bpkr_matches_hz_at_large_width_fixed_ratios():
    """N, P, N0 → ∞ with α = P/N = 0.5 and α0 = P/N0 = 0.5 fixed: Var_HZ / Var_BPKR → 1 like 1/N."""
    errs = []
    for scale in (1, 4, 16, 32):
        N0, P, N = 16 * scale, 8 * scale, 16 * scale
        X, y, xs = _task(P=P, N0=N0, seed=scale)
        for L in (1, 2, 3):
            b, h = dlnn.BPKR(X, y, L, N), dlnn.HZ(X, y, L, N, method="quadrature")
            assert np.allclose(b.mean(xs), h.mean(xs), rtol=1e-10)  # eq 3.47: the means agree exactly
            assert np.allclose(h.variance_asymptotic(xs), b.variance(xs), rtol=1e-10)  # eq 3.50 = eq 3.36
            errs.append((scale, L, abs(h.scale_mean / (b.kernel_scale * b.sigma2 / N0) - 1)))
            # eq 3.43a: log G − asymptotic = O(log N)
            assert abs(h.log_G(0) - h.log_G_asymptotic(0)) < 3 * L * math.log(N) + 3
            assert abs((h.log_G(1) - h.log_G(0)) - (h.log_G_asymptotic(1) - h.log_G_asymptotic(0))) < 2 * L / N + 0.1
    for L in (1, 2, 3):
        e = [v for s, ll, v in errs if ll == L]
        assert all(e[i + 1] < e[i] for i in range(len(e) - 1)), e
        assert e[-1] < 5e-3
        assert e[0] / e[-1] > 10  # ~ 1/N


# ----------------------------------------------------------------------------- Gaussian limit (§3.3)
def test_gaussian_limit():
    X, y, xs = _task(P=5, N0=12)
    for L in (0, 1, 2):
        g = dlnn.GaussianLimit(X, y, L, sigma2=1.3)
        assert np.allclose(g.mean(xs), xs @ dlnn.HZ(X, y, L, 5).theta_star, rtol=1e-10)
        # N → ∞ at fixed P: the exact variance tends to the Gaussian limit, BPKR with u0 = σ²
        if L:
            ex = dlnn.ExactPosterior(X, y, L, 200_000, sigma2=1.3)
            assert np.allclose(ex.variance(xs), g.variance(xs), rtol=1e-3)
            assert dlnn.BPKR(X, y, L, 10**9, sigma2=1.3).u0 == pytest.approx(1.3, rel=1e-7)
        # T > 0: the GP with kernel σ^{2L} K0 equals the exact posterior of depth 0 with σ_eff² = σ^{2(L+1)}
        gT = dlnn.GaussianLimit(X, y, L, sigma2=1.3, temperature=0.2)
        ref = dlnn.ExactPosterior(X, y, 0, (), sigma2=1.3 ** (L + 1), temperature=0.2)
        assert np.allclose(gT.variance(xs), ref.variance(xs), rtol=1e-10)
        assert np.allclose(gT.mean(xs), ref.mean(xs), rtol=1e-10)


def test_eq_3_64_prior_energy_by_monte_carlo_and_jensen():
    """⟨H⟩ of eq 3.64 is the prior average of the loss (MC over random networks), and −log Z ≤ β⟨H⟩ with equality
    to first order as β → 0 (the approximation of eq 3.61 is Jensen's, not a low-T saddle point)."""
    X, y, _ = _task(P=4, N0=6)
    L, N, s2 = 2, 3, 1.5
    g = dlnn.GaussianLimit(X, y, L, sigma2=s2)
    gen = torch.Generator().manual_seed(0)
    E = 200_000
    sizes = [6, N, N, 1]
    Ws = [torch.randn(E, sizes[i + 1], sizes[i], generator=gen, dtype=torch.float64) * math.sqrt(s2 / sizes[i])
          for i in range(L + 1)]
    theta = dlnn._forward_theta(Ws)
    Hs = 0.5 * ((theta @ torch.from_numpy(X).T - torch.from_numpy(y)) ** 2).sum(1)
    assert abs(float(Hs.mean()) - g.expected_energy()) < 4 * float(Hs.std()) / math.sqrt(E)
    dev = []
    for T in (1e2, 1e3, 1e4):
        logZ = dlnn.ExactPosterior(X, y, L, N, sigma2=s2, temperature=T).log_partition()
        assert -logZ <= g.expected_energy() / T
        dev.append(1 + logZ / (g.expected_energy() / T))
    # 1 − (−log Z)/(β⟨H⟩) ≈ β Var H / (2⟨H⟩) → 0 linearly in β
    assert dev[2] < 2e-3 and dev[1] / dev[2] == pytest.approx(10, rel=0.2) and dev[0] / dev[1] > 5
    low = dlnn.ExactPosterior(X, y, L, N, sigma2=s2, temperature=0.01).log_partition()
    assert -low < 0.5 * g.expected_energy() / 0.01  # far from the annealed value at low T


# ----------------------------------------------------------------------------- samplers
def _blr(X, y, xs, s, T):
    """Bayesian linear regression θ ~ N(0, s I), likelihood exp(−‖Xθ − y‖²/(2T)): predictive mean and variance."""
    S = np.linalg.inv(np.eye(X.shape[1]) / s + X.T @ X / T)
    return xs @ (S @ X.T @ y / T), np.sum((xs @ S) * xs, 1)


@pytest.mark.parametrize("method,samples", [("gibbs", 200), ("mala", 600)])
def test_sampler_one_layer_gaussian_posterior(method, samples):
    """depth 0 (one weight layer): the posterior is exactly Gaussian; mean and variance of f on unseen inputs
    agree with the closed form within Monte-Carlo error (s.e. from the spread over independent chains)."""
    X, y, xs = _task(P=6, N0=10, seed=5, M=5)
    T, s2 = 0.2, 1.4
    ps = dlnn.sample_posterior(X, y, xs, 0, (), sigma2=s2, temperature=T, chains=256, samples=samples,
                               burn_in=samples // 2, method=method, generator=torch.Generator().manual_seed(1),
                               progress=False)
    mean, var = _blr(X, y, xs, s2 / X.shape[1], T)
    m, mse = ps.mean()
    v, vse = ps.variance()
    assert np.max(np.abs(m - mean) / mse) < 4.5
    assert np.max(np.abs(v - var) / vse) < 4.5
    assert np.max(np.abs(v / var - 1)) < 0.08  # the error bars are meaningful (a few %)
    if method == "mala":
        assert 0.4 < ps.acceptance < 0.75
    sc, scse = ps.scale()
    assert abs(sc - s2 / X.shape[1]) < 4.5 * scse


@pytest.mark.parametrize("L,N,T", [(1, 6, 0.02), (2, 5, 0.01), (3, 6, 1e-3)])
def test_gibbs_deep_matches_exact_posterior(L, N, T):
    X, y, xs = _task(P=5, N0=12, seed=7, M=5)
    ps = dlnn.sample_posterior(X, y, xs, L, N, temperature=T, chains=256, samples=150, burn_in=50,
                               generator=torch.Generator().manual_seed(2), progress=False)
    ex = dlnn.ExactPosterior(X, y, L, N, temperature=T)
    m, mse = ps.mean()
    v, vse = ps.variance()
    assert np.max(np.abs(m - ex.mean(xs)) / mse) < 4.5
    assert np.max(np.abs(v - ex.variance(xs)) / vse) < 4.5
    sc, scse = ps.scale()
    assert abs(sc - ex.scale_mean) < 4.5 * scse
    av, avse = ps.average_variance()
    assert abs(av - ex.variance(xs).mean()) < 4.5 * avse
    assert abs(ps.drift()) < 4
    # the finite-width (exact) variance differs measurably from the Gaussian limit at this small width
    gl = dlnn.GaussianLimit(X, y, L, temperature=T).variance(xs).mean()
    assert abs(av - gl) > 5 * avse


def test_mala_deep_matches_exact_posterior():
    X, y, xs = _task(P=4, N0=8, seed=8, M=4)
    T = 0.3
    ps = dlnn.sample_posterior(X, y, xs, 1, 4, temperature=T, chains=192, samples=600, burn_in=400, method="mala",
                               generator=torch.Generator().manual_seed(3), progress=False)
    ex = dlnn.ExactPosterior(X, y, 1, 4, temperature=T)
    m, mse = ps.mean()
    v, vse = ps.variance()
    assert np.max(np.abs(m - ex.mean(xs)) / mse) < 4.5
    assert np.max(np.abs(v - ex.variance(xs)) / vse) < 4.5


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    X, y, xs = _task(P=5, N0=12)
    with pytest.raises(ValueError, match="α0 = P/N0 < 1"):
        dlnn.BPKR(X.T[:12, :5], np.ones(12), 1, 4)
    with pytest.raises(ValueError, match="labels"):
        dlnn.HZ(X, y[:-1], 1, 4)
    with pytest.raises(ValueError, match="depth"):
        dlnn.BPKR(X, y, -1, 4)
    with pytest.raises(ValueError, match="width"):
        dlnn.HZ(X, y, 2, (4,))
    with pytest.raises(ValueError, match="equal hidden widths"):
        dlnn.BPKR(X, y, 2, (4, 5))
    with pytest.raises(ValueError, match="temperature"):
        dlnn.BPKR(X, y, 1, 4, temperature=-1)
    with pytest.raises(ValueError, match="sigma2"):
        dlnn.GaussianLimit(X, y, 1, sigma2=0)
    with pytest.raises(ValueError, match="no positive root"):
        dlnn.BPKR(X, np.zeros(5), 1, 4)
    with pytest.raises(ValueError, match="linearly dependent"):
        dlnn.HZ(np.vstack([X[:4], X[:1]]), y, 1, 4)
    with pytest.raises(ValueError, match="non-finite"):
        dlnn.HZ(np.where(X > 1, np.nan, X), y, 1, 4)
    with pytest.raises(ValueError, match="features"):
        dlnn.HZ(X, y, 1, 4).variance(np.ones(3))
    with pytest.raises(ValueError, match="method"):
        dlnn.HZ(X, y, 1, 4, method="magic")
    with pytest.raises(ValueError, match="asymptotics"):
        _ = dlnn.HZ(X, y, 2, (4, 6)).z_star
    with pytest.raises(ValueError, match="T = 0"):
        dlnn.ExactPosterior(X, y, 1, 4).log_partition()
    with pytest.raises(ValueError, match="temperature"):
        dlnn.sample_posterior(X, y, xs, 1, 4, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="method"):
        dlnn.sample_posterior(X, y, xs, 1, 4, method="hmc", progress=False)
    with pytest.raises(ValueError, match="chains"):
        dlnn.sample_posterior(X, y, xs, 1, 4, chains=1, progress=False)


def test_drift_flags_unrelaxed_chains():
    """Gibbs at low T with N < P relaxes slowly; a short run from the prior is flagged by the split-run drift."""
    X, y, xs = _task(P=5, N0=12, seed=7, M=5)
    ps = dlnn.sample_posterior(X, y, xs, 3, 4, temperature=1e-3, chains=128, samples=60, burn_in=0,
                               generator=torch.Generator().manual_seed(2), progress=False)
    assert abs(ps.drift()) > 4


# ----------------------------------------------------------------------------- study
@pytest.mark.study
def test_study_quick_via_cli(tmp_path, capsys):
    import json

    from fisherlens.cli import main
    from fisherlens.experiments import EXPERIMENTS, get
    from fisherlens.experiments.dlnn import dlnn as study
    from fisherlens.runs import read_csv

    assert get("dlnn") is study and EXPERIMENTS["dlnn"][0]
    out = tmp_path / "dlnn"
    assert main(["run", "dlnn", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["experiment"] == "dlnn" and cfg["quick"]
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == len(cfg["depths"]) * len(cfg["widths"])
    for r in rows:
        assert abs(float(r["z_exact_T"])) < 4.5  # the sampler matches the exact posterior
        assert float(r["var_mc"]) > float(r["var_gauss"])  # renormalised kernel (τ² > σ^{2L})
        assert float(r["u0_bpkr"]) == pytest.approx(float(r["u0_hz"]), rel=1e-10)
    per_input = read_csv(out / "inputs.csv")
    assert len(per_input) == len(rows) * cfg["test"]
    assert all(math.isfinite(float(r[k])) for r in per_input for k in ("mean_mc", "var_mc", "var_se"))
    for name in ("dlnn_variance.png", "dlnn_u0.png", "dlnn_mean.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verdict" in (out / "summary.md").read_text()
    with pytest.raises(ValueError, match="train < input_dim"):
        study(tmp_path / "bad", quick=True, train=20, progress=False)
    with pytest.raises(ValueError, match="not used"):
        study(tmp_path / "bad2", quick=True, data="mnist", progress=False)


@pytest.mark.study
@pytest.mark.parametrize("opts, match", [
    ({"depths": (1.5,)}, "'depths' expects tuple of int"),
    ({"widths": ()}, "depths and widths"),
    ({"teacher_var": -1.0}, "teacher_var"),
    ({"sigma2": float("nan")}, "sigma2"),
    ({"sampler": "hmc"}, "sampler"),
    ({"chains": 1}, "chains"),
    ({"samples": 0}, "samples"),
    ({"train": 40}, "α0"),
])
def test_study_bad_options_make_no_folder(tmp_path, opts, match):
    from fisherlens.experiments.dlnn import dlnn as run_dlnn

    with pytest.raises(ValueError, match=match):
        run_dlnn(tmp_path / "run", quick=True, progress=False, **opts)
    assert not (tmp_path / "run").exists()
