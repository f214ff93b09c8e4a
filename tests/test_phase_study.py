"""The phase-transitions study (Sauter 2023 §3.4) and its helpers: the quick run through the CLI, every table
checked in float64 against a slow, obvious reference (closed forms, brute-force enumeration, plain autograd,
scipy quadrature), the exact torus (Kaufman) against enumeration, transfer matrix and Onsager, and bad input."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS, get
from fisherlens.experiments.phase_transitions import (
    chain_curvature_closed_form,
    chi1,
    critical_sigma_w2,
    curvature_generator,
    depth_crossings,
    fit_peak_shift,
    fixed_point_q,
    network_draws,
    parabola_peak,
    phase_transitions,
    third_cumulant_convergence,
    torus_curve,
    torus_peak,
    train_run,
    training_draws,
)
from fisherlens.gibbs import BETA_CRITICAL, Ising2D, IsingChain, IsingTorus, ising2d_monte_carlo
from fisherlens.runs import read_csv
from fisherlens.theory.random_networks import MLPEnsemble

F64 = torch.float64
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = (
    "chain_curvature.png",
    "ising2d_specific_heat.png",
    "ising2d_curvature.png",
    "rbm.png",
    "network_fisher.png",
    "training.png",
)


# ----------------------------------------------------------------------------- slow references
def lattice_states(L):
    """φ = (E_b, M) of every state of the periodic L×L lattice, by loops over bonds (each bond once)."""
    N = L * L
    bonds = [
        (i * L + j, ((i + di) % L) * L + (j + dj) % L)
        for i in range(L)
        for j in range(L)
        for di, dj in ((0, 1), (1, 0))
    ]
    idx = np.arange(2**N)
    s = 1 - 2 * ((idx[:, None] >> np.arange(N)) & 1)
    E = sum(s[:, p] * s[:, q] for p, q in bonds)
    return np.stack([E, s.sum(1)], 1).astype(float)


def moments(phi, theta, n_sites):
    """(log Z / N, Cov[φ] / N, third central moments / N) of an exponential family by enumeration."""
    x = phi @ np.asarray(theta, dtype=float)
    c = x.max()
    w = np.exp(x - c)
    p = w / w.sum()
    d = phi - p @ phi
    return (
        (c + math.log(w.sum())) / n_sites,
        np.einsum("s,si,sj->ij", p, d, d) / n_sites,
        np.einsum("s,si,sj,sk->ijk", p, d, d, d) / n_sites,
    )


def hessian_metric_curvature(g, third):
    """R of a 2-D Hessian metric g = ∇²ψ from ψ's third derivatives (Shima): R_1212 = ¼ g^{pq}(ψ_12p ψ_12q −
    ψ_11p ψ_22q), R = 2 R_1212 / det g (unit sphere +2)."""
    gi = np.linalg.inv(g)
    r1212 = 0.25 * (third[0, 1] @ gi @ third[0, 1] - third[0, 0] @ gi @ third[1, 1])
    return 2 * r1212 / np.linalg.det(g)


def chain_metric_by_hand(beta, h):
    """Hessian of log λ₊ by hand: u = e^{-4β}, D = √(sinh² h + u), q = D(cosh h + D)."""
    u, s, c = math.exp(-4 * beta), math.sinh(h), math.cosh(h)
    D = math.sqrt(s * s + u)
    q = D * (c + D)
    return np.array(
        [[8 * u / q - 4 * u * u * (c + 2 * D) / (D * q * q), 2 * u * s / D**3], [2 * u * s / D**3, c * u / D**3]]
    )


def gauss_expect(f, q):
    """∫Dz f(√q z) by adaptive quadrature."""
    val, _ = integrate.quad(
        lambda z: f(math.sqrt(q) * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
        -np.inf,
        np.inf,
        epsabs=1e-14,
        epsrel=1e-13,
    )
    return val


def chi1_reference(sw, sb):
    q = 1.0
    for _ in range(20000):
        new = sw * gauss_expect(lambda x: math.tanh(x) ** 2, q) + sb
        if abs(new - q) < 1e-15:
            break
        q = new
    return sw * gauss_expect(lambda x: (1 - math.tanh(x) ** 2) ** 2, q)


def onsager_log_z(beta):
    """Per-site log Z of the infinite square lattice (Onsager), by 2-D quadrature."""
    c, s = math.cosh(2 * beta) ** 2, math.sinh(2 * beta)
    val, _ = integrate.dblquad(
        lambda a, b: math.log(c - s * (math.cos(a) + math.cos(b))),
        0,
        2 * math.pi,
        0,
        2 * math.pi,
        epsabs=1e-13,
        epsrel=1e-13,
    )
    return math.log(2) + val / (8 * math.pi**2)


# ----------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase") / "run"
    assert main(["run", "phase-transitions", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_registered():
    assert get("phase-transitions") is phase_transitions
    assert "Onsager" in EXPERIMENTS["phase-transitions"][0] or "chi1" in EXPERIMENTS["phase-transitions"][0]


@pytest.mark.study
def test_quick_run_files(quick_run):
    cfg = json.loads((quick_run / "config.json").read_text())
    assert cfg["experiment"] == "phase-transitions" and cfg["quick"]
    for name in (
        "chain.csv",
        "ising2d_exact.csv",
        "ising2d_monte_carlo.csv",
        "ising2d_curvature.csv",
        "ising2d_curvature_mc.csv",
        "ising2d_curvature_field.csv",
        "rbm.csv",
        "rbm_weights.csv",
        "networks.csv",
        "network_summary.csv",
        "network_growth.csv",
        "network_crossings.csv",
        "training.csv",
        "training_runs.csv",
        "fss.csv",
        "fss.md",
        "summary.md",
    ):
        assert (quick_run / name).stat().st_size > 0, name
    for name in FIGURES:
        data = (quick_run / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
    summary = (quick_run / "summary.md").read_text()
    for section in (
        "## 1. Ising chain",
        "## 2. 2-D Ising",
        "### Monte Carlo",
        "## 3. Scalar curvature",
        "### Monte Carlo curvature",
        "Why h = 0",
        "## 4. Restricted Boltzmann machine",
        "## 5. The network analogue",
        "## 6. Training across the learning-rate boundary",
        "**Findings.**",
    ):
        assert section in summary
    assert all(f"![{n}]({n})" in summary for n in FIGURES)


@pytest.mark.study
def test_chain_table_against_closed_forms(quick_run):
    rows = read_csv(quick_run / "chain.csv")
    assert len(rows) == 8 * 7
    for r in rows:
        b, h = float(r["beta"]), float(r["h"])
        R0 = 1 + math.cosh(h) / math.sqrt(math.sinh(h) ** 2 + math.exp(-4 * b))
        assert float(r["R"]) == pytest.approx(R0, rel=1e-8), (b, h)
        assert float(r["R_closed_form"]) == pytest.approx(R0, rel=1e-13)
        g = chain_metric_by_hand(b, h)
        got = np.array([[float(r["g_bb"]), float(r["g_bh"])], [float(r["g_bh"]), float(r["g_hh"])]])
        np.testing.assert_allclose(got, g, rtol=1e-10, atol=1e-14)
        assert r["singular"] == "0"


@pytest.mark.study
def test_torus_table_against_enumeration_and_transfer(quick_run):
    rows = {int(r["L"]): r for r in read_csv(quick_run / "ising2d_exact.csv")}
    assert sorted(rows) == [4, 8, 12, 16]
    phi = lattice_states(4)
    r4 = rows[4]
    b4 = float(r4["beta_peak"])
    _, g, _ = moments(phi, (b4, 0.0), 16)
    assert float(r4["g_peak"]) == pytest.approx(g[0, 0], rel=1e-11)
    assert float(r4["g_at_beta_c"]) == pytest.approx(moments(phi, (BETA_CRITICAL, 0.0), 16)[1][0, 0], rel=1e-11)
    # the peak position: bounded Brent on the brute-force enumeration
    ref = optimize.minimize_scalar(
        lambda b: -moments(phi, (b, 0.0), 16)[1][0, 0], bounds=(0.3, 0.4), method="bounded", options={"xatol": 1e-10}
    )
    assert b4 == pytest.approx(ref.x, abs=1e-7)
    # L = 8: the transfer-matrix column, and the height against a transfer-matrix Hessian computed here
    r8 = rows[8]
    assert float(r8["g_peak_transfer"]) == pytest.approx(float(r8["g_peak"]), rel=1e-10)
    tm = Ising2D(8).metric(torch.tensor([float(r8["beta_peak"]), 0.0], dtype=F64))[0, 0]
    assert float(r8["g_peak"]) == pytest.approx(float(tm), rel=1e-10)
    for L, r in rows.items():
        assert float(r["c_peak"]) == pytest.approx(float(r["beta_peak"]) ** 2 * float(r["g_peak"]), rel=1e-12)
        assert (r["g_peak_transfer"] == "nan") == (L > 8)
    # peaks move towards β_c from below and grow
    peaks = [float(rows[L]["beta_peak"]) for L in sorted(rows)]
    heights = [float(rows[L]["g_peak"]) for L in sorted(rows)]
    assert all(a < b < BETA_CRITICAL for a, b in itertools.pairwise(peaks))
    assert all(a < b for a, b in itertools.pairwise(heights))


@pytest.mark.study
def test_monte_carlo_table(quick_run):
    rows = read_csv(quick_run / "ising2d_monte_carlo.csv")
    assert len(rows) == 3 and {r["L"] for r in rows} == {"8"}
    for r in rows:
        exact = Ising2D(8).metric(torch.tensor([float(r["beta"]), 0.0], dtype=F64))[0, 0]
        assert float(r["g_bb_exact"]) == pytest.approx(float(exact), rel=1e-10)
        z = (float(r["g_bb_mc"]) - float(exact)) / float(r["stderr"])
        assert float(r["z"]) == pytest.approx(z, rel=1e-9, abs=1e-12)
        assert abs(z) < 4


@pytest.mark.study
def test_strip_curvature_against_cumulants(quick_run):
    rows = read_csv(quick_run / "ising2d_curvature.csv")
    assert {r["L"] for r in rows} == {"3", "4"}
    phi = {L: lattice_states(L) for L in (3, 4)}
    for r in rows:
        L, b = int(r["L"]), float(r["beta"])
        _, g, third = moments(phi[L], (b, 0.0), L * L)
        assert float(r["R"]) == pytest.approx(hessian_metric_curvature(g, third), rel=1e-9), (L, b)
        assert float(r["g_bb"]) == pytest.approx(g[0, 0], rel=1e-11)
        assert float(r["g_hh"]) == pytest.approx(g[1, 1], rel=1e-11)


@pytest.mark.study
def test_monte_carlo_curvature_table(quick_run):
    """R at h = 0 by Monte Carlo (L = 4): the exact column against the enumerated cumulants, the z-scores
    recomputed and |z| < 4, the torus columns against enumeration, and one point re-run with its own generator."""
    rows = read_csv(quick_run / "ising2d_curvature_mc.csv")
    strips = read_csv(quick_run / "ising2d_curvature.csv")
    window = sorted({float(r["beta"]) for r in strips if 0.38 <= float(r["beta"]) <= 0.52})
    assert [float(r["beta"]) for r in rows] == window and len(window) == 3  # 0.383, β_c, 0.517
    assert {r["L"] for r in rows} == {"4"} and all(r["symmetrized"] == "1" and r["h"] == "0.0" for r in rows)
    phi = lattice_states(4)
    for r in rows:
        b = float(r["beta"])
        _, g, third = moments(phi, (b, 0.0), 16)
        assert float(r["R_exact"]) == pytest.approx(hessian_metric_curvature(g, third), rel=1e-9)
        assert float(r["g_bb_exact"]) == pytest.approx(g[0, 0], rel=1e-10)
        assert float(r["T_bbb_exact"]) == pytest.approx(third[0, 0, 0], rel=1e-9)
        for key, mc_key, se_key, ex_key in (
            ("z", "R_mc", "stderr", "R_exact"),
            ("z_g_bb", "g_bb_mc", "g_bb_stderr", "g_bb_exact"),
            ("z_T_bbb", "T_bbb_mc", "T_bbb_stderr", "T_bbb_exact"),
        ):
            z = (float(r[mc_key]) - float(r[ex_key])) / float(r[se_key])
            assert float(r[key]) == pytest.approx(z, rel=1e-9, abs=1e-12)
            assert abs(z) < 4, (key, b, z)
    k = 1
    res = ising2d_monte_carlo(4, (window[k], 0.0), sweeps=1500, burn_in=50, generator=curvature_generator(0, 4, k))
    est = res.curvature()
    assert float(rows[k]["R_mc"]) == pytest.approx(est.scalar_curvature, rel=1e-12)
    assert float(rows[k]["stderr"]) == pytest.approx(est.stderr, rel=1e-12)
    assert float(rows[k]["T_bhh_mc"]) == pytest.approx(float(est.third_cumulants[0, 1, 1]), rel=1e-12)


@pytest.mark.study
def test_field_scan_table(quick_run):
    rows = read_csv(quick_run / "ising2d_curvature_field.csv")
    assert {r["L"] for r in rows} == {"3", "4"} and sorted({float(r["h"]) for r in rows}) == [0.0, 0.02, 0.1]
    for r in rows:
        L, h = int(r["L"]), float(r["h"])
        assert float(r["beta"]) == pytest.approx(BETA_CRITICAL, rel=1e-15)
        _, g, third = moments(lattice_states(L), (BETA_CRITICAL, h), L * L)
        assert float(r["R"]) == pytest.approx(hessian_metric_curvature(g, third), rel=1e-9), (L, h)


def rbm_reference(W, nv, nh, T):
    """(Cov of v hᵀ, third central moments) of p ∝ exp(vᵀ W h / T) by loops over the states."""
    states = list(itertools.product((0.0, 1.0), repeat=nv + nh))
    phi = np.array([[s[i] * s[nv + j] for i in range(nv) for j in range(nh)] for s in states])
    _, g, third = moments(phi, np.asarray(W) / T, 1)
    return g, third


@pytest.mark.study
def test_rbm_table_against_enumeration(quick_run):
    rows = read_csv(quick_run / "rbm.csv")
    weights = read_csv(quick_run / "rbm_weights.csv")
    W = np.array([float(w["W"]) for w in weights if w["rbm"] == "metric"])
    Ws = np.array([float(w["W"]) for w in weights if w["rbm"] == "curvature"])
    assert len(W) == 3 * 2 and len(Ws) == 2 * 2 and len(rows) == 6
    for r in rows:
        T = float(r["T"])
        g, _ = rbm_reference(W, 3, 2, T)
        ev = np.linalg.eigvalsh(g)
        assert float(r["trace_g"]) == pytest.approx(np.trace(g), rel=1e-10)
        assert float(r["lambda_max_g"]) == pytest.approx(ev[-1], rel=1e-10)
        assert float(r["lambda_min_g"]) == pytest.approx(ev[0], rel=1e-8, abs=1e-14)
        assert float(r["specific_heat"]) == pytest.approx(W @ g @ W / T**2, rel=1e-10)


@pytest.mark.study
def test_network_tables_against_plain_autograd(quick_run):
    summary = read_csv(quick_run / "network_summary.csv")
    nets = read_csv(quick_run / "networks.csv")
    crit = critical_sigma_w2("tanh", 0.05)
    sws = sorted({float(r["sigma_w2"]) for r in summary})
    assert any(abs(s - crit) < 1e-12 for s in sws) and len(sws) == 4  # 3 grid points + the critical one
    for r in summary:
        assert float(r["chi1"]) == pytest.approx(chi1_reference(float(r["sigma_w2"]), 0.05), rel=1e-8)
    # one network per depth rebuilt from the documented draws; tr F and λ_max by plain autograd
    for depth in (3, 6):
        Zw, Zb, X = network_draws(depth, 12, 8, 2, 0)
        for sw in (sws[0], sws[-1]):
            net = MLPEnsemble.from_normals(Zw, Zb, "tanh", sw, 0.05).module(1)
            params = list(net.parameters())
            J = torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(net(X[1][t : t + 1])[0, 0], params)])
                    for t in range(8)
                ]
            )
            row = next(n for n in nets if n["depth"] == str(depth) and float(n["sigma_w2"]) == sw and n["seed"] == "1")
            assert float(row["trace"]) == pytest.approx(float((J**2).sum() / 8), rel=1e-10)
            lam = float(torch.linalg.eigvalsh(J @ J.T / 8)[-1])
            assert float(row["lambda_max"]) == pytest.approx(lam, rel=1e-9)
            assert int(row["n_params"]) == J.shape[1]
    # summary means are the means of the per-network rows
    for r in summary:
        sel = [float(n["trace"]) for n in nets if n["depth"] == r["depth"] and n["sigma_w2"] == r["sigma_w2"]]
        assert float(r["trace_mean"]) == pytest.approx(np.mean(sel), rel=1e-12)
    growth = read_csv(quick_run / "network_growth.csv")
    for g in growth:
        a = next(r for r in summary if r["depth"] == "3" and r["sigma_w2"] == g["sigma_w2"])
        b = next(r for r in summary if r["depth"] == "6" and r["sigma_w2"] == g["sigma_w2"])
        rate = (float(b["log_trace_mean"]) - float(a["log_trace_mean"])) / 3
        assert float(g["rate"]) == pytest.approx(rate, rel=1e-12, abs=1e-15)
        assert float(g["log_chi1"]) == pytest.approx(math.log(float(a["chi1"])), rel=1e-12, abs=1e-15)


@pytest.mark.study
def test_crossings_and_fss_tables(quick_run):
    summary = read_csv(quick_run / "network_summary.csv")
    rows = [{k: (int(v) if k in ("depth", "n_params") else float(v)) for k, v in r.items()} for r in summary]
    crossings = read_csv(quick_run / "network_crossings.csv")
    assert [c["depths"] for c in crossings] == ["3-6"]
    # slow reference: scan a fine log grid of the piecewise-linear difference for its first upward zero
    a = sorted((r for r in rows if r["depth"] == 3), key=lambda r: r["sigma_w2"])
    b = sorted((r for r in rows if r["depth"] == 6), key=lambda r: r["sigma_w2"])
    x = np.log([r["sigma_w2"] for r in a])
    d = np.log([v["trace_mean"] / v["n_params"] for v in b]) - np.log([u["trace_mean"] / u["n_params"] for u in a])
    fine = np.linspace(x[0], x[-1], 200001)
    df = np.interp(fine, x, d)
    up = np.flatnonzero((df[:-1] < 0) & (df[1:] >= 0))
    expected = math.exp(fine[up[0]]) if up.size else math.nan
    got = float(crossings[0]["sigma_w2_cross"])
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-4)
    fss = read_csv(quick_run / "fss.csv")
    assert [int(r["L_min"]) for r in fss] == [4, 8]  # sizes 4, 8, 12, 16: at least 3 points per fit
    exact = {int(r["L"]): float(r["beta_peak"]) for r in read_csv(quick_run / "ising2d_exact.csv")}
    for r in fss:
        L = np.array([k for k in exact if k >= int(r["L_min"])], dtype=float)
        y = np.array([exact[int(k)] for k in L])
        coef = np.polyfit(1 / L, y, 1)
        assert float(r["beta_c"]) == pytest.approx(coef[1], rel=1e-10)
        assert float(r["beta_c_error"]) == pytest.approx(coef[1] - BETA_CRITICAL, rel=1e-8, abs=1e-14)


def plain_jacobian(net, X):
    params = list(net.parameters())
    return torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(net(X[t : t + 1])[0, 0], params)])
            for t in range(X.shape[0])
        ]
    )


@pytest.mark.study
def test_training_tables_against_plain_gradient_descent(quick_run):
    runs = read_csv(quick_run / "training_runs.csv")
    rows = read_csv(quick_run / "training.csv")
    assert sorted(float(r["eta_ratio"]) for r in runs) == [0.5, 1.5, 3.0]
    student, X, Y = training_draws(8, 4, 8, 3.0, 0.64, 0, 0)
    J = plain_jacobian(student, X)
    lam0 = float(torch.linalg.eigvalsh(J @ J.T / 8)[-1])
    for r in runs:
        assert float(r["lambda_max_0"]) == pytest.approx(lam0, rel=1e-10)
        assert float(r["trace_0"]) == pytest.approx(float((J**2).sum() / 8), rel=1e-10)
        assert float(r["eta"]) == pytest.approx(float(r["eta_ratio"]) * 2 / lam0, rel=1e-10)
    # re-run the η = 0.5 η_c descent with plain autograd and compare every logged loss and Fisher entry
    eta = 0.5 * 2 / lam0
    net, X, Y = training_draws(8, 4, 8, 3.0, 0.64, 0, 0)
    logged = [r for r in rows if float(r["eta_ratio"]) == 0.5]
    assert [int(r["step"]) for r in logged] == list(range(21))
    params = list(net.parameters())
    for r in logged:
        loss = 0.5 * ((net(X) - Y) ** 2).sum() / 8
        assert float(r["loss"]) == pytest.approx(loss.item(), rel=1e-10)
        if r["trace"] != "nan":
            Jt = plain_jacobian(net, X)
            assert float(r["trace"]) == pytest.approx(float((Jt**2).sum() / 8), rel=1e-10)
            assert float(r["lambda_max"]) == pytest.approx(float(torch.linalg.eigvalsh(Jt @ Jt.T / 8)[-1]), rel=1e-9)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= eta * g
    assert {int(r["step"]) for r in logged if r["trace"] != "nan"} == {0, 5, 10, 15, 20}


def test_train_run_divergence_and_logging():
    net, X, Y = training_draws(6, 3, 5, 3.0, 0.64, 1, 0)
    rows = train_run(net, X, Y, 50.0, 40, 7)
    assert rows[-1]["diverged"] == 1 and rows[-1]["step"] < 40
    assert all(r["diverged"] == 0 for r in rows[:-1])
    net, X, Y = training_draws(6, 3, 5, 3.0, 0.64, 1, 0)
    rows = train_run(net, X, Y, 1e-3, 10, 4)
    assert [r["step"] for r in rows if not math.isnan(r["trace"])] == [0, 4, 8, 10]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_third_cumulant_convergence():
    out = third_cumulant_convergence(4, 0.3, L_large=16)
    phi = lattice_states(4)
    eps = 1e-4  # the third cumulant as a central difference of the enumerated Var[E]/N, and directly
    var = [moments(phi, (0.3 + k * eps, 0.0), 16)[1][0, 0] for k in (-1, 1)]
    assert out["strip"] == pytest.approx((var[1] - var[0]) / (2 * eps), rel=1e-6)
    assert out["strip"] == pytest.approx(moments(phi, (0.3, 0.0), 16)[2][0, 0, 0], rel=1e-10)
    assert out["large"] == pytest.approx(
        float(torch.func.jacfwd(IsingTorus(16).metric)(torch.tensor([0.3], dtype=F64))[0, 0, 0]), rel=1e-12
    )
    assert out["rel"] == pytest.approx(out["strip"] / out["large"] - 1, rel=1e-12)


def test_depth_crossings_synthetic():
    sw = [0.5, 1.0, 2.0, 4.0]

    def row(depth, s, value):
        return {"depth": depth, "sigma_w2": s, "n_params": 10 * depth, "trace_mean": value, "trace_theory": value}

    # log(F/P) per depth: a line in log σ_w² with a depth-dependent slope, crossing at σ_w² = 1.5 exactly
    rows = [row(dep, s, 10 * dep * math.exp(0.3 * dep * math.log(s / 1.5))) for dep in (2, 4) for s in sw]
    (c,) = depth_crossings(rows)
    assert c["depths"] == "2-4" and c["sigma_w2_cross"] == pytest.approx(1.5, rel=1e-12)
    flat = [row(dep, s, 10 * dep * (1 + (dep == 4))) for dep in (2, 4) for s in sw]  # never crosses upwards
    assert math.isnan(depth_crossings(flat)[0]["sigma_w2_cross"])


# ----------------------------------------------------------------------------- the exact torus (Kaufman)
@pytest.mark.parametrize("L", [2, 3, 4])
def test_torus_vs_enumeration(L):
    phi = lattice_states(L)
    model = IsingTorus(L)
    for b in (0.05, 0.3, BETA_CRITICAL, 0.7, 1.5):
        lz, g, _ = moments(phi, (b, 0.0), L * L)
        th = torch.tensor([b], dtype=F64)
        assert float(model.log_partition(th)) == pytest.approx(lz, rel=1e-13)
        assert float(model.metric(th)[0, 0]) == pytest.approx(g[0, 0], rel=1e-10)
        assert model.specific_heat(b) == pytest.approx(b * b * g[0, 0], rel=1e-10)


@pytest.mark.parametrize("L", [5, 6, 7, 8])
def test_torus_vs_transfer_matrix(L):
    tm, model = Ising2D(L), IsingTorus(L)
    for b in (0.2, BETA_CRITICAL, 0.6):
        assert float(model.log_partition(torch.tensor([b], dtype=F64))) == pytest.approx(
            float(tm.log_partition(torch.tensor([b, 0.0], dtype=F64))), rel=1e-13
        )
        assert float(model.metric(torch.tensor([b], dtype=F64))[0, 0]) == pytest.approx(
            float(tm.metric(torch.tensor([b, 0.0], dtype=F64))[0, 0]), rel=1e-10
        )


def test_torus_large_lattice_tends_to_onsager():
    """Away from β_c the finite-size correction is exponentially small: L = 128 agrees with Onsager's integral in
    the disordered phase, and in the ordered phase up to the two-fold degeneracy of the ordered states,
    ``+ ln 2 / N``."""
    N = 128 * 128
    for b, extra in ((0.3, 0.0), (0.6, math.log(2) / N)):
        assert float(IsingTorus(128).log_partition(torch.tensor([b], dtype=F64))) == pytest.approx(
            onsager_log_z(b) + extra, rel=1e-11
        )


def test_torus_curve_and_peak():
    betas = np.array([0.3, BETA_CRITICAL, 0.5])
    ref = [float(IsingTorus(6).metric(torch.tensor([b], dtype=F64))[0, 0]) for b in betas]
    np.testing.assert_allclose(torus_curve(6, betas), ref, rtol=1e-12)
    phi = lattice_states(3)
    ref = optimize.minimize_scalar(
        lambda b: -moments(phi, (b, 0.0), 9)[1][0, 0], bounds=(0.2, 0.5), method="bounded", options={"xatol": 1e-10}
    )
    b3, g3 = torus_peak(3)
    assert b3 == pytest.approx(ref.x, abs=1e-7) and g3 == pytest.approx(-ref.fun, rel=1e-12)
    with pytest.raises(ValueError, match="> 0"):
        torus_curve(4, [0.0, 0.3])
    with pytest.raises(ValueError, match="edge"):
        torus_peak(16, lo=0.5, hi=0.8)


def test_torus_metric_curve():
    model = IsingTorus(12)
    betas = torch.tensor([0.05, 0.3, BETA_CRITICAL, 0.9, 2.0], dtype=F64)
    ref = torch.stack([model.metric(b.reshape(1))[0, 0] for b in betas])
    torch.testing.assert_close(model.metric_curve(betas), ref, rtol=1e-12, atol=1e-14)  # g(2.0) ~ 7e-6
    for bad in ([0.3, 0.0], [[0.3]], [math.nan]):
        with pytest.raises(ValueError, match="metric_curve"):
            model.metric_curve(torch.tensor(bad, dtype=F64))


def test_torus_bad_input():
    with pytest.raises(ValueError, match="L must be >= 2"):
        IsingTorus(1)
    with pytest.raises(TypeError, match="int"):
        IsingTorus(4.0)
    for b in (0.0, -0.2):
        with pytest.raises(ValueError, match="beta must be > 0"):
            IsingTorus(4).log_partition(torch.tensor([b], dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        IsingTorus(4).metric(torch.tensor([0.3, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        IsingTorus(4).metric(torch.tensor([math.nan], dtype=F64))


# ----------------------------------------------------------------------------- mean field and fits
def test_chain_closed_form_helper():
    for b, h in ((0.1, 0.0), (0.7, -0.4), (1.3, 2.0)):
        assert chain_curvature_closed_form(b, h) == pytest.approx(
            IsingChain.scalar_curvature_exact(torch.tensor([b, h], dtype=F64)), rel=1e-15
        )


@pytest.mark.parametrize(("sw", "sb"), [(0.5, 0.05), (1.8, 0.05), (3.0, 0.3)])
def test_chi1_against_quadrature(sw, sb):
    assert chi1("tanh", sw, sb) == pytest.approx(chi1_reference(sw, sb), rel=1e-9)


def test_critical_line():
    for sb in (0.05, 0.3):
        s = critical_sigma_w2("tanh", sb)
        assert chi1_reference(s, sb) == pytest.approx(1.0, abs=1e-9)
    assert critical_sigma_w2("tanh", 0.05) < critical_sigma_w2("tanh", 0.3)  # the line bends to larger σ_w²
    # σ_b² → 0: the critical point tends (slowly) to σ_w² = 1 (q* → 0, χ₁ → σ_w²)
    line = [critical_sigma_w2("tanh", sb) for sb in (1e-2, 1e-4, 1e-6)]
    assert line[0] > line[1] > line[2] > 1.0 and line[2] == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="sigma_b2 must be positive"):
        critical_sigma_w2("tanh", 0.0)
    with pytest.raises(ValueError, match="no sign change"):
        critical_sigma_w2("tanh", 0.05, bracket=(3.0, 5.0))
    with pytest.raises(ValueError, match="sigma_w2"):
        fixed_point_q("tanh", -1.0, 0.1)
    with pytest.raises(ValueError, match="sigma_b2"):
        fixed_point_q("tanh", 1.0, -0.1)


def test_fit_peak_shift_and_parabola():
    L = np.array([8, 16, 32, 64])
    fit = fit_peak_shift(L, 0.44 - 0.3 / L)
    assert fit["beta_c"] == pytest.approx(0.44, abs=1e-14) and fit["a"] == pytest.approx(-0.3, rel=1e-12)
    fit2 = fit_peak_shift(L, 0.44 - 0.3 / L + 0.7 / L**2, correction=True)
    assert (fit2["beta_c"], fit2["a"], fit2["b"]) == pytest.approx((0.44, -0.3, 0.7), rel=1e-9)
    with pytest.raises(ValueError, match="need at least"):
        fit_peak_shift([8, 16], [0.4, 0.42])
    with pytest.raises(ValueError, match="need at least"):
        fit_peak_shift([8, 16, 32], [0.4, 0.42, 0.43], correction=True)
    x = np.array([0.40, 0.41, 0.42, 0.43, 0.44])
    top, se = parabola_peak(x, 3.0 - 50 * (x - 0.4234) ** 2, np.full(5, 0.01))
    assert top == pytest.approx(0.4234, abs=1e-12) and se > 0
    assert all(math.isnan(v) for v in parabola_peak(x, (x - 0.42) ** 2, np.ones(5)))


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"torus_sizes": (4, 8)}, "at least 3 sizes"),
        ({"torus_sizes": (1, 4, 8, 16)}, "torus_sizes"),
        ({"strip_sizes": (3, 11)}, "strip_sizes must be <="),
        ({"mc_method": "gibbs"}, "mc_method"),
        ({"net_depths": (4,)}, "at least 2 depths"),
        ({"rbm_visible": 12, "rbm_hidden": 6}, "<= 16"),
        ({"rbm_curvature_units": (3, 3, 3)}, "rbm_curvature_units"),
        ({"strip_beta_max": 0.1}, "strip_beta_max"),
        ({"net_sigma_w2_max": 0.2}, "net_sigma_w2_max"),
        ({"mc_points": 2}, "mc_points"),
        ({"mc_curvature_beta_max": 0.3}, "mc_curvature_beta_max"),
        ({"mc_curvature_beta_min": 0.6, "mc_curvature_beta_max": 0.61}, "no strip coupling"),
        ({"mc_curvature_sweeps": 10}, "mc_curvature_sweeps"),
        ({"mc_curvature_sizes": (1,)}, "mc_curvature_sizes"),
        ({"data": "digits"}, "draws its own models"),
        ({"train_ratios": ()}, "train_ratios"),
        ({"train_ratios": (0.5, -1.0)}, "train_ratios"),
        ({"train_depth": 1}, "train_depth"),
    ],
)
def test_bad_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        phase_transitions(tmp_path / "x", quick=True, progress=False, **options)
    assert not (tmp_path / "x").exists()  # refused before the folder is created
