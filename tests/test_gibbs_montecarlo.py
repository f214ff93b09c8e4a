"""Tests of the Monte-Carlo Fisher metric of the 2-D Ising model (fisherlens.gibbs.montecarlo)."""

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def _load():
    try:
        return importlib.import_module("fisherlens.gibbs.montecarlo")
    except ImportError:  # the package __init__ may not exist yet: load the module by path
        path = Path(__file__).resolve().parents[1] / "src" / "fisherlens" / "gibbs" / "montecarlo.py"
        spec = importlib.util.spec_from_file_location("fisherlens_gibbs_montecarlo", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


mc = _load()
BETA_C = 0.5 * math.log(1.0 + math.sqrt(2.0))


def exact_metric(L, beta, h):
    """Exact per-site metric ``Cov[φ] / N`` by enumeration of all 2**(L*L) states (vectorised)."""
    n = L * L
    idx = torch.arange(2**n)
    s = ((idx[:, None] >> torch.arange(n)) & 1).to(torch.float64) * 2 - 1
    grid = s.reshape(-1, L, L)
    e_b = (grid * (grid.roll(-1, 1) + grid.roll(-1, 2))).sum((1, 2))  # each bond once, 2N bonds
    phi = torch.stack([e_b, s.sum(1)], 1)
    w = torch.softmax(beta * e_b + h * phi[:, 1], 0)
    c = phi - w @ phi
    return (c.T * w) @ c / n, (w @ phi) / n


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_exact_enumeration_sanity():
    g0, mean0 = exact_metric(4, 0.0, 0.0)  # independent spins: Var[E_b] = 2N, Var[M] = N
    torch.testing.assert_close(g0, torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(mean0, torch.zeros(2, dtype=torch.float64))


# 4 configurations x 3 distinct entries = 12 z-scores; |z| < 4 has a Bonferroni family-wise false-alarm rate
# of 12 * 6.3e-5 < 1e-3 (and the seeds are fixed, so the test is deterministic).
@pytest.mark.parametrize(
    ("method", "beta", "h", "sweeps"),
    [
        ("wolff", 0.3, 0.0, 8000),
        ("wolff", BETA_C, 0.0, 8000),
        ("wolff", 0.6, 0.0, 8000),
        ("metropolis", 0.3, 0.2, 8000),
    ],
)
def test_metric_matches_exact_enumeration(method, beta, h, sweeps):
    res = mc.ising2d_monte_carlo(4, (beta, h), sweeps=sweeps, burn_in=200, method=method, generator=_gen(1))
    exact, mean = exact_metric(4, beta, h)
    assert res.metric.dtype == torch.float64 and res.metric.shape == (2, 2)
    assert res.stderr.shape == (2, 2) and bool((res.stderr > 0).all())
    torch.testing.assert_close(res.metric, res.metric.T)
    z = (res.metric - exact) / res.stderr
    assert float(z.abs().max()) < 4.0, f"z-scores {z.tolist()}"
    # the mean statistics as well (loose: 5 stderr from the tau-based error of the mean)
    se_mean = torch.tensor(
        [math.sqrt(2 * res.tau[k] * float(res.samples[:, i].var()) / res.sweeps) / 16 for i, k in enumerate("EM")],
        dtype=torch.float64,
    )
    assert float(((res.mean_phi - mean) / se_mean).abs().max()) < 5.0
    assert res.energy_per_site == pytest.approx(-float(res.mean_phi[0]))
    # the jackknife and tau-based errors agree roughly
    ratio = res.stderr / res.stderr_tau
    assert bool(((ratio > 0.6) & (ratio < 1.6)).all()), ratio


# Wolff with a field (ghost spin): 7 configurations x 3 entries = 21 z-scores, |z| < 4 (family-wise < 2e-3).
@pytest.mark.parametrize(
    ("L", "beta", "h"),
    [
        (4, 0.3, 0.2),
        (4, BETA_C, -0.1),
        (4, 0.6, 0.05),  # ordered phase, weak field: most clusters reach the ghost
        (4, 0.2, 1.0),
        (4, 0.0, 0.5),  # no lattice bonds: every update goes through the ghost
        (3, 0.4, 0.3),  # odd L
        (2, 0.4, -0.5),  # doubled bonds
    ],
)
def test_wolff_with_field_matches_exact(L, beta, h):
    res = mc.ising2d_monte_carlo(L, (beta, h), sweeps=8000, burn_in=200, method="wolff", generator=_gen(1))
    exact, mean = exact_metric(L, beta, h)
    z = (res.metric - exact) / res.stderr
    assert float(z.abs().max()) < 4.0, f"z-scores {z.tolist()}"
    se_mean = torch.tensor(
        [math.sqrt(2 * res.tau[k] * float(res.samples[:, i].var()) / res.sweeps) / L**2 for i, k in enumerate("EM")],
        dtype=torch.float64,
    )
    assert float(((res.mean_phi - mean) / se_mean).abs().max()) < 5.0
    assert res.clusters_per_sweep >= 1 and 1.0 <= res.mean_cluster_size <= L * L


def test_wolff_field_sign_symmetry():
    """The ghost-spin chain depends on |h| only: h -> -h negates M sample by sample and leaves E unchanged."""
    a = mc.ising2d_monte_carlo(4, (0.4, 0.3), sweeps=300, burn_in=20, method="wolff", generator=_gen(4))
    b = mc.ising2d_monte_carlo(4, (0.4, -0.3), sweeps=300, burn_in=20, method="wolff", generator=_gen(4))
    assert torch.equal(a.samples[:, 0], b.samples[:, 0])
    assert torch.equal(a.samples[:, 1], -b.samples[:, 1])
    assert float(a.samples[:, 1].mean()) > 0  # the field is felt: M follows its sign


def test_wolff_field_pins_the_magnetisation():
    """At h = 0 the ghost never joins and the ordered 4x4 lattice's magnetisation takes both signs equally; a
    field h = 0.5 (through the ghost) pins it to the field's sign."""
    free = mc.ising2d_monte_carlo(4, (0.6, 0.0), sweeps=400, burn_in=20, method="wolff", generator=_gen(6))
    pinned = mc.ising2d_monte_carlo(4, (0.6, 0.5), sweeps=400, burn_in=20, method="wolff", generator=_gen(6))
    m_free, m_pinned = free.samples[:, 1], pinned.samples[:, 1]
    assert float((m_free > 0).double().mean()) == pytest.approx(0.5, abs=0.15)
    assert float((m_pinned > 0).double().mean()) > 0.99


@pytest.mark.parametrize(
    ("method", "theta"), [("wolff", (BETA_C, 0.0)), ("wolff", (BETA_C, 0.1)), ("metropolis", (0.35, 0.1))]
)
def test_stderr_is_honest(method, theta):
    """The spread of independent short runs matches the reported standard error."""
    runs = [
        mc.ising2d_monte_carlo(4, theta, sweeps=1200, burn_in=100, method=method, generator=_gen(100 + k))
        for k in range(16)
    ]
    est = torch.stack([r.metric for r in runs])
    spread = est.std(0, unbiased=True)
    reported = torch.stack([r.stderr for r in runs]).mean(0)
    for a, b in ((0, 0), (0, 1), (1, 1)):
        ratio = float(spread[a, b] / reported[a, b])
        assert 0.5 < ratio < 2.0, (a, b, ratio)


def test_heatbath_matches_exact():
    res = mc.ising2d_monte_carlo(4, (0.3, -0.2), sweeps=4000, method="heatbath", generator=_gen(3))
    z = (res.metric - exact_metric(4, 0.3, -0.2)[0]) / res.stderr
    assert float(z.abs().max()) < 4.0, z


@pytest.mark.parametrize(("L", "methods"), [(2, ("wolff", "heatbath")), (3, ("wolff", "metropolis"))])
def test_tiny_and_odd_lattices(L, methods):
    """L = 2 (doubled bonds) and odd L (non-bipartite colouring) agree with enumeration."""
    exact = exact_metric(L, 0.4, 0.0)[0]
    for method in methods:
        res = mc.ising2d_monte_carlo(L, (0.4, 0.0), sweeps=4000, method=method, generator=_gen(5))
        z = (res.metric - exact) / res.stderr
        assert float(z.abs().max()) < 4.0, (method, z)


@pytest.mark.filterwarnings("ignore:sweeps=:RuntimeWarning")
def test_reproducible_and_seed_dependent():
    for method in ("wolff", "metropolis"):
        a = mc.ising2d_monte_carlo(6, (0.4, 0.0), sweeps=50, burn_in=5, method=method, generator=_gen(7))
        b = mc.ising2d_monte_carlo(6, (0.4, 0.0), sweeps=50, burn_in=5, method=method, generator=_gen(7))
        c = mc.ising2d_monte_carlo(6, (0.4, 0.0), sweeps=50, burn_in=5, method=method, generator=_gen(8))
        assert torch.equal(a.samples, b.samples) and torch.equal(a.metric, b.metric)
        assert not torch.equal(a.samples, c.samples)
        assert a.samples.shape == (50, 2)
    d1 = mc.ising2d_monte_carlo(4, (0.4, 0.0), sweeps=20, burn_in=2)  # default generator seeded 0
    d2 = mc.ising2d_monte_carlo(4, (0.4, 0.0), sweeps=20, burn_in=2)
    assert torch.equal(d1.samples, d2.samples)


@pytest.mark.filterwarnings("ignore:sweeps=:RuntimeWarning")
def test_global_rng_untouched():
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()  # noqa: NPY002 - checks the legacy global RNG
    mc.ising2d_monte_carlo(4, (0.4, 0.0), sweeps=20, burn_in=2, method="wolff", generator=_gen(1))
    mc.ising2d_monte_carlo(4, (0.4, 0.1), sweeps=20, burn_in=2, method="metropolis", generator=_gen(1))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002


@pytest.mark.filterwarnings("ignore:sweeps=:RuntimeWarning")
def test_result_fields():
    res = mc.ising2d_monte_carlo(8, (BETA_C, 0.0), sweeps=100, burn_in=20, generator=_gen(2))
    assert res.method == "wolff" and res.L == 8 and res.theta == (BETA_C, 0.0) and res.N == 64
    assert set(res.tau) == {"E", "M", "|M|", "g_bb", "g_bh", "g_hh"} and set(res.effective_samples) == set(res.tau)
    assert all(t >= 0.5 for t in res.tau.values())
    assert 0.0 <= res.abs_magnetisation_per_site <= 1.0 and -2.0 <= res.energy_per_site <= 2.0
    assert res.clusters_per_sweep >= 1 and 1.0 <= res.mean_cluster_size <= 64
    assert res.n_blocks * res.block_length <= res.sweeps and res.sweeps_per_second > 0
    met = mc.ising2d_monte_carlo(4, (0.3, 0.2), sweeps=50, burn_in=5, method="metropolis", generator=_gen(2))
    assert 0.0 < met.acceptance < 1.0 and met.mean_cluster_size is None


def test_autocorrelation_time_ar1():
    a, n = 0.8, 40000
    noise = torch.randn(n, generator=_gen(11), dtype=torch.float64).numpy()
    x = np.empty(n)
    x[0] = noise[0]
    for t in range(1, n):
        x[t] = a * x[t - 1] + noise[t]
    tau, window = mc.integrated_autocorrelation_time(x)
    assert tau == pytest.approx((1 + a) / (2 * (1 - a)), rel=0.15)
    assert window >= 6 * tau - 1
    assert mc.integrated_autocorrelation_time(np.ones(10)) == (0.5, 0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"L": 1}, "L"),
        ({"L": 4.0}, "L"),
        ({"L": True}, "L"),
        ({"theta": (-0.1, 0.0)}, "beta"),
        ({"theta": (float("inf"), 0.0)}, "beta"),
        ({"theta": (float("nan"), 0.0)}, "beta"),
        ({"theta": (0.3, float("nan")), "method": "metropolis"}, "h"),
        ({"theta": (0.3,)}, "theta"),
        ({"theta": 0.3}, "theta"),
        ({"theta": ("a", 0.0)}, "theta"),
        ({"sweeps": 0}, "sweeps"),
        ({"sweeps": 10.5}, "sweeps"),
        ({"burn_in": 0}, "burn_in"),
        ({"method": "gibbs"}, "method"),
        ({"generator": 0}, "generator"),
    ],
)
def test_bad_input(kwargs, name):
    args = {"L": 4, "theta": (0.3, 0.0), "sweeps": 10, "burn_in": 2, **kwargs}
    L, theta = args.pop("L"), args.pop("theta")
    with pytest.raises(ValueError, match=name):
        mc.ising2d_monte_carlo(L, theta, **args)


def test_metropolis_l2_warns():
    with pytest.warns(RuntimeWarning, match="reducible"):
        mc.ising2d_monte_carlo(2, (0.4, 0.0), sweeps=40, burn_in=2, method="metropolis")


def test_short_run_warns():
    with pytest.warns(RuntimeWarning, match="short"):
        mc.ising2d_monte_carlo(8, (BETA_C, 0.0), sweeps=20, burn_in=2, method="metropolis")


# L = 8 against the exact row transfer matrix (itself tested against enumeration and Kaufman's torus):
# 3 configurations x 3 entries, |z| < 4.
@pytest.mark.parametrize(
    ("method", "beta", "h"), [("wolff", BETA_C, 0.0), ("wolff", 0.4, 0.1), ("heatbath", 0.3, -0.2)]
)
def test_l8_matches_transfer_matrix(method, beta, h):
    from fisherlens.gibbs import Ising2D

    res = mc.ising2d_monte_carlo(8, (beta, h), sweeps=4000, burn_in=200, method=method, generator=_gen(21))
    exact = Ising2D(8).metric(torch.tensor([beta, h], dtype=torch.float64))
    z = (res.metric - exact) / res.stderr
    assert float(z.abs().max()) < 4.0, f"z-scores {z.tolist()}"


# ----------------------------------------------------------------------------- scalar curvature from cumulants
def _exact_curvature(L, beta, h):
    import fisherlens as fl
    from fisherlens.gibbs import Ising2D

    return fl.geometry.scalar_curvature(Ising2D(L), torch.tensor([beta, h], dtype=torch.float64))


@pytest.mark.parametrize(
    ("model", "theta"),
    [
        ("chain", (0.5, 0.3)),
        ("chain", (1.2, 0.0)),
        ("chain", (0.2, -1.1)),
        ("curie_weiss", (0.8, 0.2)),
        ("curie_weiss", (1.3, 0.0)),
        ("ising3", (0.4, 0.1)),
    ],
)
def test_curvature_formula_against_geometry(model, theta):
    """R from (g, ∇³ψ) by the Hessian-metric formula equals fl.geometry's R (which differentiates g twice)."""
    import fisherlens as fl
    from fisherlens.gibbs import CurieWeiss, Ising2D, IsingChain

    m = {"chain": IsingChain(), "curie_weiss": CurieWeiss(12), "ising3": Ising2D(3)}[model]
    th = torch.tensor(theta, dtype=torch.float64)
    g, third = m.metric(th), torch.func.jacfwd(m.metric)(th)
    R = mc.scalar_curvature_from_cumulants(g, third)
    assert R.shape == () and R.dtype == torch.float64
    assert float(R) == pytest.approx(fl.geometry.scalar_curvature(m, th), rel=1e-9, abs=1e-10)
    if model == "chain":
        assert float(R) == pytest.approx(IsingChain.scalar_curvature_exact(th), rel=1e-9)


def test_curvature_formula_batched_sphere_free_cases_and_errors():
    # ψ = Σ log-partition of independent coordinates (a product of 1-D families) is flat: R = 0
    g = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    third = torch.zeros(2, 2, 2, dtype=torch.float64)
    third[0, 0, 0], third[1, 1, 1] = 3.0, -1.0
    assert float(mc.scalar_curvature_from_cumulants(g, third)) == pytest.approx(0.0, abs=1e-15)
    # batched: (3, 2, 2) and (3, 2, 2, 2) -> (3,), each equal to the single evaluation; scaling g, T -> g/N, T/N
    from fisherlens.gibbs import IsingChain

    ths = torch.tensor([[0.3, 0.1], [0.6, -0.4], [0.9, 0.0]], dtype=torch.float64)
    gs = torch.stack([IsingChain().metric(t) for t in ths])
    ts = torch.stack([torch.func.jacfwd(IsingChain().metric)(t) for t in ths])
    batch = mc.scalar_curvature_from_cumulants(gs, ts)
    assert batch.shape == (3,)
    for k in range(3):
        assert float(batch[k]) == pytest.approx(float(mc.scalar_curvature_from_cumulants(gs[k], ts[k])), rel=1e-13)
        assert float(mc.scalar_curvature_from_cumulants(gs[k] / 7, ts[k] / 7)) == pytest.approx(
            7 * float(batch[k]), rel=1e-12
        )
    with pytest.raises(ValueError, match="same leading shape"):
        mc.scalar_curvature_from_cumulants(gs, ts[:2])
    with pytest.raises(ValueError, match="same leading shape"):
        mc.scalar_curvature_from_cumulants(torch.ones(2), torch.ones(2, 2, 2))


def test_mc_curvature_sign_matches_geometry_on_l4():
    """The exact R of Ising2D(4) through fl.geometry equals the formula on the enumerated cumulants, and it is
    the quantity the estimator targets (positive at h = 0, negative at (0.3, 0.2))."""
    from fisherlens.gibbs import Ising2D

    for beta, h in ((BETA_C, 0.0), (0.3, 0.2)):
        th = torch.tensor([beta, h], dtype=torch.float64)
        m = Ising2D(4)
        R = float(mc.scalar_curvature_from_cumulants(m.metric(th), torch.func.jacfwd(m.metric)(th)))
        assert R == pytest.approx(_exact_curvature(4, beta, h), rel=1e-9)
        assert (R > 0) == (h == 0.0)


# 5 + 2 points, one z-score each, |z| < 4 (family-wise false-alarm rate < 5e-4; the seeds are fixed).
@pytest.mark.parametrize(
    ("L", "beta", "h", "sweeps"),
    [
        (4, 0.3, 0.2, 8000),
        (4, BETA_C, 0.0, 8000),
        (4, BETA_C, 0.1, 8000),
        (4, 0.6, 0.05, 8000),  # ordered phase, weak field
        (4, 0.4, -0.15, 8000),
        (6, BETA_C, 0.0, 4000),  # the transfer matrix (0.2 s for the exact curvature; L = 8 costs 1.5-3 s)
        (6, 0.4, 0.05, 4000),
    ],
)
def test_mc_curvature_matches_exact(L, beta, h, sweeps):
    res = mc.ising2d_monte_carlo(L, (beta, h), sweeps=sweeps, burn_in=200, method="wolff", generator=_gen(1))
    est = mc.monte_carlo_curvature(res)
    exact = _exact_curvature(L, beta, h)
    assert est.stderr > 0 and est.symmetrized == (h == 0.0)
    z = (est.scalar_curvature - exact) / est.stderr
    assert abs(z) < 4.0, (est.scalar_curvature, est.stderr, exact, z)
    assert abs(est.bias) < est.stderr  # the plug-in bias is small against the noise at these run lengths
    assert est.replicates.shape == (est.n_blocks,) and est.block_length == res.block_length
    if h != 0.0:
        torch.testing.assert_close(est.metric, res.metric)  # the plain sample covariance, as in the result


def test_mc_curvature_heatbath_matches_exact():
    res = mc.ising2d_monte_carlo(4, (0.35, 0.1), sweeps=6000, method="heatbath", generator=_gen(2))
    est = res.curvature()
    z = (est.scalar_curvature - _exact_curvature(4, 0.35, 0.1)) / est.stderr
    assert abs(z) < 4.0, z


def _naive_jackknife(phi, block, n_sites, symmetric):
    """Leave-one-block-out (g, T, R) by direct recomputation on the remaining samples (slow reference)."""
    n_blocks = phi.shape[0] // block
    x = phi[: n_blocks * block]
    if symmetric:
        x = np.concatenate([x, x * np.array([1.0, -1.0])])  # the mirror images M -> -M
        owner = np.concatenate([np.arange(x.shape[0] // 2) // block] * 2)
    else:
        owner = np.arange(x.shape[0]) // block

    def cumulants(y, n):
        mu = y.mean(0)
        if symmetric:
            mu[1] = 0.0
        d = y - mu
        m = y.shape[0]  # 2n with the mirror images; the small-sample factors use the n measured sweeps
        g = np.einsum("ta,tb->ab", d, d) / m * (n / (n - 1))
        t3 = np.einsum("ta,tb,tc->abc", d, d, d) / m * (n * n / ((n - 1) * (n - 2)))
        return g, t3

    reps = []
    for k in range(n_blocks):
        y = x[owner != k]
        n = (n_blocks - 1) * block
        g, t3 = cumulants(y, n)
        reps.append(float(mc.scalar_curvature_from_cumulants(torch.tensor(g / n_sites), torch.tensor(t3 / n_sites))))
    reps = np.array(reps)
    return reps, math.sqrt((n_blocks - 1) / n_blocks * ((reps - reps.mean()) ** 2).sum())


@pytest.mark.parametrize(("theta", "symmetric"), [((0.35, 0.1), False), ((0.4, 0.0), True), ((0.4, 0.0), False)])
def test_mc_curvature_jackknife_against_naive(theta, symmetric):
    res = mc.ising2d_monte_carlo(4, theta, sweeps=1500, burn_in=50, generator=_gen(9))
    est = mc.monte_carlo_curvature(res, symmetrize=symmetric)
    reps, se = _naive_jackknife(res.samples.numpy(), res.block_length, 16, symmetric)
    np.testing.assert_allclose(est.replicates.numpy(), reps, rtol=1e-9)
    assert est.stderr == pytest.approx(se, rel=1e-9)
    # the point estimate on all samples: the plug-in cumulants of the (mirrored) samples
    phi = res.samples.numpy()
    if symmetric:
        phi = np.concatenate([phi, phi * np.array([1.0, -1.0])])
    mu = phi.mean(0)
    d = phi - mu
    t = res.sweeps
    third = np.einsum("ta,tb,tc->abc", d, d, d) / phi.shape[0] * (t * t / ((t - 1) * (t - 2))) / 16
    np.testing.assert_allclose(est.third_cumulants.numpy(), third, rtol=1e-9, atol=1e-9)


def test_mc_curvature_symmetry_at_zero_field():
    res = mc.ising2d_monte_carlo(4, (0.45, 0.0), sweeps=2000, burn_in=50, generator=_gen(12))
    sym, raw = res.curvature(), res.curvature(symmetrize=False)
    assert sym.symmetrized and not raw.symmetrized
    assert float(sym.metric[0, 1]) == 0.0 and float(sym.metric_stderr[0, 1]) == 0.0
    for idx in ((0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1)):  # T_ββh and T_hhh in every index order
        assert float(sym.third_cumulants[idx]) == 0.0 and float(sym.third_stderr[idx]) == 0.0
        assert float(raw.third_stderr[idx]) > 0.0  # the raw estimate keeps the sampled (nonzero) odd entries
    assert float(raw.third_cumulants[1, 1, 1]) != 0.0
    m = res.samples[:, 1].numpy()
    assert float(sym.metric[1, 1]) == pytest.approx(float((m * m).mean()) / 16 * res.sweeps / (res.sweeps - 1))
    assert set(sym.tau) == {"T_bbb", "T_bhh"} and set(raw.tau) == {"T_bbb", "T_bbh", "T_bhh", "T_hhh"}
    with pytest.raises(ValueError, match="h = 0"):
        mc.ising2d_monte_carlo(4, (0.45, 0.1), sweeps=200, burn_in=5, generator=_gen(1)).curvature(symmetrize=True)
    with pytest.raises(ValueError, match="symmetrize"):
        res.curvature(symmetrize="yes")
    with pytest.raises(ValueError, match="MonteCarloResult"):
        mc.monte_carlo_curvature(res.samples)


def test_mc_curvature_stderr_is_honest():
    """The spread of R over independent runs matches its reported standard error (L = 4, near β_c, h ≠ 0)."""
    runs = [
        mc.ising2d_monte_carlo(4, (BETA_C, 0.1), sweeps=1500, burn_in=100, generator=_gen(300 + k)).curvature()
        for k in range(16)
    ]
    est = np.array([r.scalar_curvature for r in runs])
    ratio = est.std(ddof=1) / np.mean([r.stderr for r in runs])
    assert 0.5 < ratio < 2.0, ratio
