"""Fisher spectra: dense vs the exact Gram (dual) route vs Lanczos, eigenvectors, SLQ densities and their
moments, spectrum statistics and the critical learning rate (SCIENCE §5, §9)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _models3 import (
    DT,
    factor_rows,
    init_,
    inputs,
    make_case,
    mlp,
    one_thread,  # noqa: F401  (autouse fixture: one intra-op thread)
    outputs,
    true_fisher,
)
from torch import nn

import fisherlens as fl

CASES = ["mlp", "cnn", "bernoulli", "gauss", "free"]
KINDS = ["true", "empirical", "mc"]
#: "auto" takes the structured route (fl.structure) for the plain MLPs, "generic" forces the generic engine:
#: both are compared with dense here (and with each other in test_spectrum_structure.py).
ENGINES = ["auto", "generic"]


@functools.cache
def case(name: str, n: int = 6):
    return make_case(name, seed=20 + CASES.index(name), n=n, batch_size=4)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fisher(c, kind="true", seed=0):
    return fl.fisher_matrix(c.model, c.data, c.lik, kind, generator=gen(seed), batch_size=c.batch_size)


def desc_eigs(F: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(F).flip(0)


def assert_eigs(vals, ref, what=""):
    ref = ref[: len(vals)]
    scale = float(ref.abs().max())
    torch.testing.assert_close(vals, ref, rtol=1e-9, atol=1e-11 * scale, msg=lambda m: f"{what}: {m}")


def assert_eigvecs(F, vals, U, what=""):
    lam_max = float(vals.max())
    keep = vals > 1e-8 * lam_max
    U, vals = U[:, keep], vals[keep]
    torch.testing.assert_close(U.norm(dim=0), torch.ones_like(vals), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(F @ U, U * vals, rtol=0, atol=1e-9 * lam_max, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- 4. dense / gram / lanczos
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_gram_equals_dense_and_vectors_are_eigenvectors(name, kind, engine):
    c = case(name)
    F = fisher(c, kind, seed=7)
    P = F.shape[0]
    ref = desc_eigs(F)
    kw = dict(kind=kind, batch_size=c.batch_size, engine=engine)  # a fresh generator (same seed) for every call
    g = fl.eigenvalues(c.model, c.data, c.lik, method="gram", generator=gen(7), **kw)
    C = outputs(c.model, c.X[:1]).shape[1]
    K = {"true": C, "empirical": 1, "mc": 1}[kind]
    assert len(g) == len(c.X) * K  # the whole N·K spectrum of the dual
    assert (g[:-1] >= g[1:]).all() and (g >= 0).all()
    m = min(P, len(g))
    assert_eigs(g[:m], ref, f"gram vs dense ({name}, {kind})")
    if len(g) > P:
        assert float(g[P:].abs().max()) <= 1e-10 * float(ref[0])
    d = fl.eigenvalues(c.model, c.data, c.lik, method="dense", generator=gen(7), **kw)
    assert len(d) == P
    assert_eigs(d, ref, "method='dense'")
    a = fl.eigenvalues(c.model, c.data, c.lik, generator=gen(7), **kw)  # auto: P ≤ 2048 → dense
    assert_eigs(a, ref, "method='auto'")
    vals, U = fl.eigenvalues(c.model, c.data, c.lik, method="gram", k=3, return_vectors=True, generator=gen(7), **kw)
    assert vals.shape == (3,) and U.shape == (P, 3)
    assert_eigs(vals, ref, "gram top-3")
    assert_eigvecs(F, vals, U, "gram eigenvectors")


@pytest.mark.parametrize("name", ["mlp", "cnn", "gauss"])
def test_lanczos_top_k_equals_dense_top_k(name):
    c = case(name)
    F = fisher(c)
    ref = desc_eigs(F)
    k = 4
    vals, U = fl.eigenvalues(c.model, c.data, c.lik, k=k, method="lanczos", return_vectors=True,
                             batch_size=c.batch_size)
    assert vals.shape == (k,) and U.shape == (F.shape[0], k)
    torch.testing.assert_close(vals, ref[:k], rtol=1e-6, atol=1e-12)
    assert_eigvecs(F, vals, U, "lanczos eigenvectors")
    for method, engine in (("auto", "auto"), ("dense", "auto"), ("gram", "auto"), ("gram", "generic")):
        v2 = fl.eigenvalues(c.model, c.data, c.lik, k=k, method=method, batch_size=c.batch_size, engine=engine)
        torch.testing.assert_close(v2, ref[:k], rtol=1e-9, atol=1e-12)


def test_mc_lanczos_sees_one_fixed_matrix():
    c = case("mlp")
    F = fisher(c, "mc", seed=3)
    vals = fl.eigenvalues(c.model, c.data, c.lik, k=3, method="lanczos", kind="mc", generator=gen(3),
                          batch_size=c.batch_size)
    torch.testing.assert_close(vals, desc_eigs(F)[:3], rtol=1e-6, atol=1e-12)


def test_per_input_fisher_n1_all_nonzero_eigenvalues():
    """Seed 002's per-input FIM (N = 1): its at most C − 1 nonzero eigenvalues (Categorical), all of them, from
    the C × C Gram matrix — against the dense P × P eigendecomposition and the hand-made Gram."""
    c = make_case("cnn", seed=5, n=1)
    F = true_fisher(c)
    ref = desc_eigs(F)
    C = 3
    g = fl.eigenvalues(c.model, c.data, c.lik, method="gram")
    assert len(g) == C
    assert_eigs(g, ref, "per-input gram")
    assert float(g[-1]) <= 1e-10 * float(g[0])  # softmax: the ones direction is null
    assert float(ref[C - 1]) <= 1e-10 * float(ref[0])  # so at most C − 1 nonzero eigenvalues
    R = factor_rows(c)
    torch.testing.assert_close(g, desc_eigs(R @ R.T), rtol=1e-9, atol=1e-12)
    vals, U = fl.eigenvalues(c.model, c.data, c.lik, method="gram", return_vectors=True)
    assert_eigvecs(F, vals, U, "per-input eigenvectors")
    # Gaussian σ=0.7, N = 1: C nonzero eigenvalues, = eigenvalues of J Jᵀ / σ²
    c = make_case("gauss", seed=5, n=1)
    for engine in ENGINES:
        g = fl.eigenvalues(c.model, c.data, c.lik, method="gram", engine=engine)
        assert len(g) == 2 and float(g[-1]) > 0
        assert_eigs(g, desc_eigs(true_fisher(c)), f"per-input gaussian ({engine})")


@pytest.mark.parametrize("engine", ENGINES)
def test_wide_model_p_much_larger_than_nk(engine):
    """P = 243 ≫ N·K = 9: the gram route gives the whole nonzero spectrum, equal to dense; the eigenvectors
    lift back through Ĵᵀ."""
    model = mlp(seed=4, d=4, h=30, C=3)
    X = inputs((4,), 3, 4)
    lik = fl.Categorical()
    F = fl.fisher_matrix(model, X, lik)
    P = F.shape[0]
    assert P == 243
    ref = desc_eigs(F)
    vals, U = fl.eigenvalues(model, X, lik, method="gram", return_vectors=True, engine=engine)
    assert len(vals) == 9
    assert_eigs(vals, ref, "wide gram")
    assert float(ref[9:].abs().max()) <= 1e-10 * float(ref[0])  # nothing beyond rank N·K
    assert_eigvecs(F, vals, U, "wide gram eigenvectors")
    st_g, st_d = fl.spectrum_stats(vals, dim=P), fl.spectrum_stats(ref.clamp_min(0))
    for key in ("mean", "second_moment", "max"):
        assert math.isclose(st_g[key], st_d[key], rel_tol=1e-9), key
    assert math.isclose(st_g["mean"], float(torch.trace(F)) / P, rel_tol=1e-9)
    lz, Uz = fl.eigenvalues(model, X, lik, k=3, method="lanczos", return_vectors=True)
    torch.testing.assert_close(lz, ref[:3], rtol=1e-6, atol=1e-12)
    assert_eigvecs(F, lz, Uz, "wide lanczos eigenvectors")


@pytest.mark.parametrize("engine", ENGINES)
def test_auto_uses_the_gram_route_beyond_2048_parameters(engine):
    """P = 2291 > 2048 and N·K = 6: auto must return the whole exact nonzero spectrum (the hand-made Gram's)."""
    model = init_(nn.Sequential(nn.Linear(40, 52), nn.Tanh(), nn.Linear(52, 3)), seed=6)
    X = inputs((40,), 2, 6)
    lik = fl.Categorical()
    P = sum(p.numel() for p in model.parameters())
    assert P == 2291
    R = factor_rows(model, X, lik)
    ref = desc_eigs(R @ R.T / len(X))
    vals = fl.eigenvalues(model, X, lik, engine=engine)
    assert len(vals) == 6
    assert_eigs(vals, ref, "auto (gram)")
    vals2, U = fl.eigenvalues(model, X, lik, k=2, return_vectors=True, engine=engine)
    assert_eigs(vals2, ref, "auto top-2")
    FU = fl.fisher_operator(model, X, lik) @ U  # F u without forming F
    torch.testing.assert_close(FU, U * vals2, rtol=0, atol=1e-9 * float(ref[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_gram_in_chunk_pairs_when_rows_do_not_fit(kind, monkeypatch):
    """With a tiny working-memory budget the Gram matrix is assembled from chunk pairs, recomputing rows (and
    reusing the same sampled labels for kind='mc'); eigenvalues and eigenvectors are unchanged."""
    c = case("free")
    F = fisher(c, kind, seed=12)
    ref = desc_eigs(F)
    monkeypatch.setattr(fl.spectrum, "WORK_BUDGET", 64)  # one sample per chunk, rows never all held at once
    vals, U = fl.eigenvalues(c.model, c.data, c.lik, method="gram", kind=kind, generator=gen(12),
                             batch_size=c.batch_size, return_vectors=True)
    m = min(len(vals), F.shape[0])
    assert_eigs(vals[:m], ref, f"chunked gram ({kind})")
    assert_eigvecs(F, vals, U, f"chunked gram eigenvectors ({kind})")


@pytest.mark.parametrize("engine", ENGINES)
def test_reduction_sum_scales_every_route(engine):
    c = case("gauss")
    ref = desc_eigs(fisher(c)) * len(c.X)
    for method, k in (("dense", None), ("gram", None), ("lanczos", 3)):
        vals = fl.eigenvalues(c.model, c.data, c.lik, k=k, method=method, reduction="sum", batch_size=c.batch_size,
                              engine=engine)
        torch.testing.assert_close(vals[:3], ref[:3], rtol=1e-6 if method == "lanczos" else 1e-9, atol=1e-10)


def test_one_shot_iterators_are_refused_by_matrix_free_routes():
    """Lanczos and SLQ read the data on every product, like fisher_operator, which refuses a one-shot iterator
    with a TypeError.  (The dense and Gram routes read the data once and accept it.)"""
    c = case("mlp")
    batches = [(c.X[i : i + 2], c.Y[i : i + 2]) for i in range(0, len(c.X), 2)]
    ref = desc_eigs(fisher(c))
    for method, engine in (("dense", "auto"), ("gram", "auto"), ("gram", "generic")):
        assert_eigs(fl.eigenvalues(c.model, iter(batches), c.lik, method=method, engine=engine)[:3], ref, method)
    with pytest.raises(TypeError, match="re-iterable"):
        fl.eigenvalues(c.model, iter(batches), c.lik, k=2, method="lanczos")
    with pytest.raises(TypeError, match="re-iterable"):
        fl.spectral_density(c.model, iter(batches), c.lik, probes=2, steps=3)


def test_eigenvalue_argument_errors():
    c = case("bernoulli")
    P = sum(p.numel() for p in c.model.parameters())
    for k in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="k"):
            fl.eigenvalues(c.model, c.data, c.lik, k=k)
    with pytest.raises(ValueError, match="k="):
        fl.eigenvalues(c.model, c.data, c.lik, method="lanczos")
    for k in (P, P + 5):
        with pytest.raises(ValueError, match="P"):
            fl.eigenvalues(c.model, c.data, c.lik, k=k, method="lanczos")
    with pytest.raises(ValueError):
        fl.eigenvalues(c.model, c.data, c.lik, method="arnoldi")
    with pytest.raises(ValueError):
        fl.eigenvalues(c.model, c.data, c.lik, kind="hessian")


# ----------------------------------------------------------------------------- 5. stochastic Lanczos quadrature
def probes_like_library(P: int, probes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, (P, probes), generator=gen(seed)).to(DT) * 2 - 1


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "gauss"])
def test_slq_quadrature_moments_are_exact_per_probe(name, kind):
    """Gauss quadrature with m Lanczos steps: Σ_j τ_j θ_j^p = vᵀ F^p v / ‖v‖² exactly for p < 2m, per probe."""
    c = case(name)
    F = fisher(c, kind)
    P = F.shape[0]
    probes, m = 5, 6
    sd = fl.spectral_density(c.model, c.data, c.lik, kind, probes=probes, steps=m, generator=gen(8),
                             batch_size=c.batch_size)
    assert isinstance(sd, fl.SpectralDensity) and sd.dim == P
    assert sd.nodes.shape == sd.weights.shape == (probes, m)
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(probes, dtype=DT), rtol=1e-12, atol=1e-12)
    assert (sd.weights >= 0).all()
    V = probes_like_library(P, probes, 8)
    lam = float(desc_eigs(F)[0])
    Fp = torch.eye(P, dtype=DT)
    for p in range(0, 2 * m):
        quad = (sd.weights * sd.nodes**p).sum(1)
        exact = torch.einsum("ip,ij,jp->p", V, Fp, V) / P
        torch.testing.assert_close(quad, exact, rtol=1e-7, atol=1e-9 * lam**p, msg=lambda msg, p=p: f"p={p}: {msg}")
        Fp = Fp @ F
    assert (sd.nodes <= lam * (1 + 1e-9)).all() and (sd.nodes >= -1e-9 * lam).all()


def test_slq_moments_estimate_traces_and_density_integrates():
    c = case("mlp")
    F = fisher(c)
    P = F.shape[0]
    probes = 48
    sd = fl.spectral_density(c.model, c.data, c.lik, probes=probes, steps=8, generator=gen(9), log=False,
                             batch_size=c.batch_size)
    for p in (1, 2, 3):
        per_probe = P * (sd.weights * sd.nodes**p).sum(1)
        tr = float(torch.trace(torch.linalg.matrix_power(F, p)))
        assert math.isclose(sd.moment(p) * P, float(per_probe.mean()), rel_tol=1e-12)
        assert abs(sd.moment(p) * P - tr) <= 4.5 * float(per_probe.std()) / math.sqrt(probes), (p, tr)
    assert sd.zero_mass == 0.0 and not sd.log
    integral = float(torch.trapezoid(sd.density, sd.grid))
    assert abs(integral - 1) < 1e-4, integral
    assert (sd.density >= 0).all() and (sd.grid[1:] > sd.grid[:-1]).all()


@pytest.mark.parametrize("name", ["mlp", "bernoulli", "gauss"])
def test_slq_log_density_and_zero_mass(name):
    """log=True: the density over log10 λ integrates to 1 − zero_mass, and with steps beyond the rank the zero
    mass is exactly the probes' average share in the null space of F."""
    c = case(name, n=3)
    F = fisher(c)
    P = F.shape[0]
    vals, vecs = torch.linalg.eigh(F)
    lam = float(vals[-1])
    rank = int((vals > 1e-10 * lam).sum())
    probes = 6
    sd = fl.spectral_density(c.model, c.data, c.lik, probes=probes, steps=rank + 3, generator=gen(10),
                             batch_size=c.batch_size)
    assert sd.log
    integral = float(torch.trapezoid(sd.density, torch.log10(sd.grid)))
    assert abs(integral - (1 - sd.zero_mass)) < 1e-4, (integral, sd.zero_mass)
    V = probes_like_library(P, probes, 10)
    null = vecs[:, vals <= 1e-10 * lam]
    share = float(((null.T @ V).square().sum(0) / P).mean())
    if rank < P:
        assert share > 0.05
    assert abs(sd.zero_mass - share) < 1e-6, (sd.zero_mass, share)
    # with the Krylov space exhausted, every node of positive weight is an eigenvalue of F
    heavy = sd.weights > 1e-8
    nz = sd.nodes[heavy & (sd.nodes > 1e-9 * lam)]
    dist = (nz[:, None] - vals[None, :]).abs().min(1).values
    assert float(dist.max()) < 1e-8 * lam


def test_slq_steps_beyond_p_and_errors():
    c = case("bernoulli")
    P = sum(p.numel() for p in c.model.parameters())
    F = fisher(c)
    sd = fl.spectral_density(c.model, c.data, c.lik, probes=2, steps=5 * P, generator=gen(1), log=False,
                             batch_size=c.batch_size)
    assert sd.nodes.shape[1] <= P
    for p in (1, 2, 5):
        V = probes_like_library(P, 2, 1)
        exact = torch.einsum("ip,ij,jp->p", V, torch.linalg.matrix_power(F, p), V) / P
        torch.testing.assert_close((sd.weights * sd.nodes**p).sum(1), exact, rtol=1e-7, atol=1e-14)
    for bad in (dict(probes=0), dict(steps=0), dict(probes=1.5), dict(steps=-3)):
        with pytest.raises(ValueError):
            fl.spectral_density(c.model, c.data, c.lik, **bad)


# ----------------------------------------------------------------------------- 6. statistics and η_c
def test_spectrum_stats_hand_values():
    e = [3.0, 1.0, 0.5]
    s = fl.spectrum_stats(e)
    assert s == pytest.approx({"mean": 1.5, "second_moment": (9 + 1 + 0.25) / 3, "max": 3.0}, rel=1e-15)
    s = fl.spectrum_stats(torch.tensor(e), dim=5)  # two zero eigenvalues not listed
    assert s == pytest.approx({"mean": 4.5 / 5, "second_moment": 10.25 / 5, "max": 3.0}, rel=1e-15)
    s2 = fl.spectrum_stats([3.0, 1.0, 0.5, 0.0, 0.0])
    assert s2 == pytest.approx(s, rel=1e-15)
    import numpy as np

    s3 = fl.spectrum_stats(np.array([[2.0, 2.0]]), dim=4)
    assert s3 == pytest.approx({"mean": 1.0, "second_moment": 2.0, "max": 2.0})
    with pytest.raises(ValueError):
        fl.spectrum_stats([])
    with pytest.raises(ValueError, match="dim"):
        fl.spectrum_stats(e, dim=2)


def test_critical_learning_rate():
    assert fl.critical_learning_rate(4.0) == pytest.approx(0.5, rel=1e-15)
    assert fl.critical_learning_rate(4.0, 0.9) == pytest.approx(2 * 1.9 / 4.0, rel=1e-15)
    assert fl.critical_learning_rate(torch.tensor(0.25), momentum=0.5) == pytest.approx(12.0, rel=1e-15)
    for lam in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lambda_max"):
            fl.critical_learning_rate(lam)
    for mu in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="momentum"):
            fl.critical_learning_rate(1.0, mu)
    # with the Fisher's own λ_max (the loss Hessian at a zero-residual minimum, SCIENCE §3)
    c = case("gauss")
    lam = float(fl.eigenvalues(c.model, c.data, c.lik, k=1))
    assert fl.critical_learning_rate(lam, 0.3) == pytest.approx(2.6 / lam, rel=1e-15)
