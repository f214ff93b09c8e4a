"""fisherlens.spectrum: dense vs the exact Gram (dual) route vs Lanczos, eigenvectors, SLQ densities and their
moments, spectrum statistics and the critical learning rate (SCIENCE §5, §9); the accuracy of the float32 Gram
route; the Gram route through ``fl.structure`` vs the generic engine; k beyond the rank bound and non-finite
spectra refused."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import reference
import torch
from helpers import assert_close, leading_error, raises
from torch import nn
from zoo import (
    DT,
    LIKS,
    MLPS,
    SIGMA,
    build,
    float32_cnn,
    float32_mlp,
    init_,
    inputs,
    make_case,
    mlp,
    randn,
    seeded,
    small_cnn,
    tanh_mlp,
)

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = ["mlp", "cnn", "bernoulli", "gauss", "free"]
KINDS = ["true", "empirical", "mc"]
#: "auto" takes the structured route (fl.structure) for the plain MLPs, "generic" forces the generic engine:
#: both are compared with dense here (and with each other in section 9).
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
    C = reference.outputs(c.model, c.X[:1]).shape[1]
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
    F = reference.true_fisher(c.model, c.X, c.spec)
    ref = desc_eigs(F)
    C = 3
    g = fl.eigenvalues(c.model, c.data, c.lik, method="gram")
    assert len(g) == C
    assert_eigs(g, ref, "per-input gram")
    assert float(g[-1]) <= 1e-10 * float(g[0])  # softmax: the ones direction is null
    assert float(ref[C - 1]) <= 1e-10 * float(ref[0])  # so at most C − 1 nonzero eigenvalues
    R = reference.factor_rows(c.model, c.X, c.spec)
    torch.testing.assert_close(g, desc_eigs(R @ R.T), rtol=1e-9, atol=1e-12)
    vals, U = fl.eigenvalues(c.model, c.data, c.lik, method="gram", return_vectors=True)
    assert_eigvecs(F, vals, U, "per-input eigenvectors")
    # Gaussian σ=0.7, N = 1: C nonzero eigenvalues, = eigenvalues of J Jᵀ / σ²
    c = make_case("gauss", seed=5, n=1)
    for engine in ENGINES:
        g = fl.eigenvalues(c.model, c.data, c.lik, method="gram", engine=engine)
        assert len(g) == 2 and float(g[-1]) > 0
        assert_eigs(g, desc_eigs(reference.true_fisher(c.model, c.X, c.spec)), f"per-input gaussian ({engine})")


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
    model = init_(tanh_mlp(40, 52, 3), seed=6)
    X = inputs((40,), 2, 6)
    lik = fl.Categorical()
    P = sum(p.numel() for p in model.parameters())
    assert P == 2291
    R = reference.factor_rows(model, X, ("categorical",))
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
    monkeypatch.setattr(fl._core, "WORK_BUDGET", 64)  # one sample per chunk, rows never all held at once
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


# ----------------------------------------------------------------------------- 7. k beyond the rank, non-finite spectra
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def relu_mlp():
    model, X = build("mlp_relu", seed=60)
    return model, X


def test_eigenvalues_k_larger_than_p(relu_mlp):
    model, X = relu_mlp
    P = sum(p.numel() for p in model.parameters())
    assert P == 51
    for method in ("auto", "dense", "gram", "lanczos"):
        raises(ValueError, rf"k <= {P}", fl.eigenvalues, model, (X, None), fl.Categorical(), k=1000, method=method)
    assert len(fl.eigenvalues(model, (X, None), fl.Categorical(), k=P, method="dense")) == P


def test_eigenvalues_gram_k_larger_than_nk(relu_mlp):
    model, X = relu_mlp
    NK = len(X) * 3  # true Fisher of a 3-class Categorical: K = C = 3 columns per input
    raises(ValueError, rf"k <= {NK}", fl.eigenvalues, model, (X, None), fl.Categorical(), k=NK + 1, method="gram")
    # streamed: N·K is only known once the data is read
    batches = [(X[:4], None), (X[4:], None)]
    raises(ValueError, rf"k <= {NK}", fl.eigenvalues, model, batches, fl.Categorical(), k=NK + 1, method="gram")
    top = fl.eigenvalues(model, batches, fl.Categorical(), k=NK, method="gram")
    dense = fl.eigenvalues(model, (X, None), fl.Categorical(), k=NK, method="dense")
    assert_close(top, dense, rtol=1e-8, what="Gram top-N·K vs dense")


@pytest.mark.parametrize("bad", [[1.0, NAN, 0.5], [INF, 1.0], [NAN]])
def test_spectrum_stats_non_finite(bad):
    raises(ValueError, r"NaN or inf", fl.spectrum_stats, bad)
    raises(ValueError, r"NaN or inf", fl.spectrum_stats, torch.tensor(bad), dim=10)


def test_spectrum_stats_dim():
    raises(ValueError, r"dim must be an integer", fl.spectrum_stats, [1.0, 2.0], dim=2.5)
    raises(ValueError, r"dim must be an integer", fl.spectrum_stats, [1.0, 2.0], dim=True)
    assert fl.spectrum_stats([2.0, 1.0], dim=4.0)["mean"] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- 8. float32 models: a float64 Gram
# Accuracy: a float32 model's eigenvalues by the Gram route (generic rows of a CNN, structured factors of an MLP)
# against the same model cast to float64.  With a Gaussian output model the sandwich is exact, so the remaining
# error is the float32 rounding of the rows (~1e-7); a float32 ``Ĵ Ĵᵀ`` with a float32 ``eigvalsh`` was off by
# 3e-6 to 2e-5 at λ ≥ 1e-3·λ_max on these models (the tolerance, 1e-6, separates the two).  Refusal: ``max_memory``
# too small for the N·K × N·K Gram stops the structured route before its factors exist.
GRAM32_RTOL = 1e-6


def float64_eigenvalues(model, X, lik, **kw) -> torch.Tensor:
    return fl.eigenvalues(copy.deepcopy(model).double(), X.double(), lik, method="gram", **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_cnn_gram_matches_float64(seed):
    model, X = float32_cnn(seed)
    lik = fl.Gaussian()
    vals = fl.eigenvalues(model, X, lik, method="gram")
    assert vals.dtype == torch.float32
    err = leading_error(vals, float64_eigenvalues(model, X, lik))
    assert err < GRAM32_RTOL, f"float32 Gram route: relative error {err:.2e} on λ ≥ 1e-3 λ_max"


@pytest.mark.parametrize("engine", ["structure", "generic"])
def test_float32_mlp_gram_matches_float64(engine):
    model, X = float32_mlp(0)
    lik = fl.Gaussian()
    vals = fl.eigenvalues(model, X, lik, method="gram", engine=engine)
    assert vals.dtype == torch.float32
    err = leading_error(vals, float64_eigenvalues(model, X, lik, engine="structure"))
    assert err < GRAM32_RTOL, f"float32 {engine} Gram route: relative error {err:.2e} on λ ≥ 1e-3 λ_max"


def test_chunk_pairs_and_vectors_are_accurate_too(monkeypatch):
    """The chunk-pair assembly (rows recomputed, column blocks cast to float64) and the float32 eigenvectors."""
    model, X = float32_cnn(2)
    lik = fl.Gaussian()
    monkeypatch.setattr(fl._core, "WORK_BUDGET", 8 * 10 * 5210 * 4)  # chunks of 8 inputs: rows never all held
    vals, U = fl.eigenvalues(model, X, lik, method="gram", batch_size=16, return_vectors=True)
    assert vals.dtype == U.dtype == torch.float32
    assert leading_error(vals, float64_eigenvalues(model, X, lik)) < GRAM32_RTOL
    F = fl.fisher_matrix(copy.deepcopy(model).double(), X.double(), lik)
    k = 5
    Uk = U[:, :k].double()
    torch.testing.assert_close(F @ Uk, Uk * vals[:k].double(), rtol=0, atol=1e-4 * float(vals[0]))


@pytest.mark.parametrize("engine", ["auto", "structure"])
def test_structured_gram_refused_before_factors(no_factors, engine):
    model, X = float32_mlp(0)
    with pytest.raises(ValueError, match=r"Gram matrix of N·K = 640 rows"):
        fl.eigenvalues(model, X, fl.Categorical(), method="gram", engine=engine, max_memory=10**6)


# ----------------------------------------------------------------------------- 9. the Gram route through fl.structure
# For supported MLPs the structured route must give the same eigenvalues and the same eigenvectors (in the
# ``named_parameters`` order of the selected parameters) as the generic engine (``engine="generic"``), both equal in
# float64 (rtol 1e-8) to the eigendecomposition of the slow reference Fisher of ``reference.py``.  Everything the
# structure cannot do (other modules, ``kind="mc"``, frozen parameters picked explicitly, unjoinable batches) must
# silently take the generic route under ``engine="auto"`` and be refused, with the reason, under ``"structure"``.
# The models (``zoo.seeded``) and inputs are float64 whatever the default dtype.
STRUCT_RTOL = 1e-8


def _inputs(shape, n: int, seed: int) -> torch.Tensor:
    return randn(shape, n, 1000 + seed)


ROUTE_CASES = [
    ("linear", "categorical", "true", "mean", 5),
    ("1h_tanh", "gaussian", "true", "sum", 4),
    ("1h_tanh", "categorical", "empirical", "mean", 7),
    ("1h_relu_softmax", "categorical", "true", "mean", 6),
    ("1h_nobias", "gaussian", "empirical", "sum", 5),
    ("2h_mixed", "gaussian", "true", "mean", 3),
    ("2h_mixed", "categorical", "empirical", "sum", 6),
    ("1h_logit", "bernoulli", "true", "mean", 9),
    ("1h_logit", "bernoulli", "empirical", "mean", 5),
]


def _labels(lik: str, f: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if lik == "categorical":
        return torch.randint(0, f.shape[1], (len(f),), generator=g)
    if lik == "bernoulli":
        return torch.randint(0, 2, (len(f), 1), generator=g).double()
    return torch.randn(f.shape, generator=g, dtype=f.dtype)


def _reference(model, X, Y, spec, kind, reduction, names=None) -> torch.Tensor:
    """The slow Fisher (one autograd.grad per sample and output, reference.py), summed for reduction='sum'."""
    F = reference.fisher(model, X, Y, spec, kind, names=names)
    return F * len(X) if reduction == "sum" else F


@pytest.fixture
def spy(monkeypatch):
    """Counts which Gram route ran: ``calls["structure"]``, ``calls["generic"]``."""
    calls = {"structure": 0, "generic": 0}
    for key, attr in (("structure", "_structured_gram"), ("generic", "_gram_eigen")):
        orig = getattr(fl.spectrum, attr)

        def wrapped(*a, _orig=orig, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(fl.spectrum, attr, wrapped)
    return calls


def assert_same_eigenpairs(vals, U, vals_ref, U_ref, F, what):
    """Equal eigenvalues; both sets of eigenvectors are unit eigenvectors of F, and equal up to sign where the
    eigenvalue is simple (else the projectors onto the eigenspace agree)."""
    top = float(vals_ref[0])
    torch.testing.assert_close(vals, vals_ref, rtol=STRUCT_RTOL, atol=1e-12 * top, msg=lambda m: f"{what}: {m}")
    keep = vals_ref > 1e-8 * top
    U, U_ref, lam = U[:, keep], U_ref[:, keep], vals_ref[keep]
    torch.testing.assert_close(U.norm(dim=0), torch.ones_like(lam), rtol=1e-10, atol=0)
    torch.testing.assert_close(F @ U, U * lam, rtol=0, atol=1e-9 * top, msg=lambda m: f"{what} F u = λ u: {m}")
    gap = torch.full_like(lam, float("inf"))
    d = (lam[1:] - lam[:-1]).abs()
    gap[1:], gap[:-1] = torch.minimum(gap[1:], d), torch.minimum(gap[:-1], d)
    simple = gap > 1e-6 * top
    sign = torch.sign((U * U_ref).sum(0))
    torch.testing.assert_close((U * sign)[:, simple], U_ref[:, simple], rtol=0, atol=1e-7,
                               msg=lambda m: f"{what} eigenvectors: {m}")
    if (~simple).any():
        P1, P2 = U[:, ~simple] @ U[:, ~simple].T, U_ref[:, ~simple] @ U_ref[:, ~simple].T
        torch.testing.assert_close(P1, P2, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("arch", "lik", "kind", "reduction", "n"), ROUTE_CASES,
                         ids=[f"{a}-{lk}-{k}-{r}" for a, lk, k, r, _ in ROUTE_CASES])
def test_structured_route_equals_generic_and_dense(arch, lik, kind, reduction, n, spy):
    make, shape = MLPS[arch].make, MLPS[arch].in_shape
    model, X = seeded(make, seed=len(arch) + n), _inputs(shape, n, seed=n)
    L, spec = LIKS[lik].make(), LIKS[lik].spec
    with torch.no_grad():
        f = model(X)
        Y = _labels(lik, f, seed=n)
    data = (X, Y) if kind == "empirical" else X
    F = _reference(model, X, Y, spec, kind, reduction)
    P = F.shape[0]
    dense_vals, dense_vecs = torch.linalg.eigh(F)
    dense_vals, dense_vecs = dense_vals.flip(0).clamp_min(0), dense_vecs.flip(1)
    kw = dict(method="gram", kind=kind, reduction=reduction, return_vectors=True, batch_size=2)
    out = {}
    for engine in ("auto", "structure", "generic", "functional"):
        before = dict(spy)
        out[engine] = fl.eigenvalues(model, data, L, engine=engine, **kw)
        took = "structure" if spy["structure"] > before["structure"] else "generic"
        assert took == ("structure" if engine in ("auto", "structure") else "generic"), engine
    vals, U = out["auto"]
    K = 1 if kind == "empirical" else f.shape[1]
    assert vals.shape == (n * K,) and U.shape == (P, n * K)
    m = min(P, n * K)
    assert_same_eigenpairs(vals[:m], U[:, :m], dense_vals[:m], dense_vecs[:, :m], F, f"{arch} auto vs dense")
    for engine in ("structure", "generic", "functional"):
        assert_same_eigenpairs(out[engine][0], out[engine][1], vals, U, F, f"{arch} {engine} vs auto")
    # top-k, and eigenvalues alone
    v3, U3 = fl.eigenvalues(model, data, L, k=2, **kw)
    assert_same_eigenpairs(v3, U3, vals[:2], U[:, :2], F, f"{arch} top-2")
    kw.pop("return_vectors")
    torch.testing.assert_close(fl.eigenvalues(model, data, L, **kw), vals, rtol=STRUCT_RTOL,
                               atol=1e-12 * float(vals[0]))


@pytest.mark.parametrize("params", ["0", ["2.weight"], ["0.bias", "2.bias"], "2"])
def test_parameter_subsets(params, spy):
    """A subset of the Linear parameters: the Gram keeps only the selected layers' kernels, the eigenvectors
    only the selected entries (in named_parameters order)."""
    model = seeded(MLPS["1h_tanh"].make, seed=3)
    X = _inputs((5,), 6, seed=3)
    L = fl.Categorical()
    names = [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in
                                                           ([params] if isinstance(params, str) else params))]
    F = reference.true_fisher(model, X, ("categorical",), names=names)
    ev = torch.linalg.eigvalsh(F).flip(0).clamp_min(0)
    vals, U = fl.eigenvalues(model, X, L, method="gram", params=params, return_vectors=True)
    assert spy["structure"] == 1 and spy["generic"] == 0
    assert U.shape == (F.shape[0], 18)
    m = min(F.shape[0], 18)
    torch.testing.assert_close(vals[:m], ev[:m], rtol=STRUCT_RTOL, atol=1e-12 * float(ev[0]))
    g_vals, g_U = fl.eigenvalues(model, X, L, method="gram", params=params, return_vectors=True, engine="generic")
    assert_same_eigenpairs(vals, U, g_vals, g_U, F, f"subset {params}")


def test_frozen_parameters_and_gathered_data(spy):
    """Frozen parameters are left out by both routes; a Dataset and a one-shot iterator of batches are read once
    and joined; auto's P > 2048 resolution to the Gram takes the structured route."""
    model = seeded(lambda: tanh_mlp(40, 52, 3), seed=4)
    model[0].bias.requires_grad_(False)
    X = _inputs((40,), 5, seed=4)
    L = fl.Gaussian(SIGMA)
    F = reference.true_fisher(model, X, ("gaussian", SIGMA), names=["0.weight", "2.weight", "2.bias"])
    assert F.shape[0] > 2048
    ev = torch.linalg.eigvalsh(F).flip(0)[:15]
    batches = [(X[i : i + 2], None) for i in range(0, 5, 2)]
    for data in (X, torch.utils.data.TensorDataset(X), iter(batches)):
        vals = fl.eigenvalues(model, data, L)  # method auto → gram
        torch.testing.assert_close(vals, ev, rtol=STRUCT_RTOL, atol=1e-12 * float(ev[0]))
    assert spy["structure"] == 3 and spy["generic"] == 0


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * torch.tanh(self.b(x))


@pytest.mark.parametrize(("make", "shape", "kind", "params", "why"), [
    (small_cnn, (1, 5, 5), "true", None, "Conv2d"),
    (TwoHeads, (4,), "true", None, "needs an nn.Sequential"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Softmax(-1), nn.Flatten(), nn.Linear(6, 3)),
     (4,), "true", None, "Unflatten"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)), (4,), "true", None, "LayerNorm"),
    (MLPS["1h_tanh"].make, (5,), "mc", None, "kind='mc'"),
    (MLPS["1h_tanh"].make, (5,), "true", "frozen", "not trainable"),
], ids=["cnn", "custom", "grouped-softmax", "layernorm", "mc", "frozen-selected"])
def test_unsupported_cases_take_the_generic_route(make, shape, kind, params, why, spy):
    model = seeded(make, seed=8)
    if params == "frozen":
        model[0].weight.requires_grad_(False)
        params = ["0.weight", "2.weight"]  # explicitly selected, though frozen: not the structure's parameters
    X = _inputs(shape, 4, seed=8)
    L = fl.Categorical()
    kw = dict(method="gram", kind=kind, params=params, return_vectors=True)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    vals, U = fl.eigenvalues(model, X, L, generator=g(), **kw)
    assert spy["structure"] == 0 and spy["generic"] == 1
    F = fl.fisher_matrix(model, X, L, kind, params=params, generator=g(), engine="functional")
    if kind == "true":
        names = params or [n for n, p in model.named_parameters() if p.requires_grad]
        for p in model.parameters():  # the reference differentiates the selected ones, frozen or not
            p.requires_grad_(True)
        expected = reference.true_fisher(model, X, ("categorical",), names=names)
        torch.testing.assert_close(F, expected, rtol=STRUCT_RTOL, atol=1e-14 * float(expected.abs().max()))
        if why == "not trainable":
            model[0].weight.requires_grad_(False)
    ev = torch.linalg.eigvalsh(F).flip(0)
    m = min(len(vals), len(ev))
    torch.testing.assert_close(vals[:m], ev[:m], rtol=STRUCT_RTOL, atol=1e-12 * float(ev[0]))
    keep = vals > 1e-8 * vals[0]
    torch.testing.assert_close(F @ U[:, keep], U[:, keep] * vals[keep], rtol=0, atol=1e-9 * float(vals[0]))
    g_vals = fl.eigenvalues(model, X, L, generator=g(), engine="generic", **kw)[0]
    torch.testing.assert_close(vals, g_vals, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"engine='structure' does not apply here: .*{why}"):
        fl.eigenvalues(model, X, L, generator=g(), engine="structure", **kw)


def test_unjoinable_or_integer_batches_fall_back(spy):
    """Batches of different input shapes cannot be joined (the generic route then names the model's failure);
    integer inputs are left to the generic route."""
    model = seeded(MLPS["2h_mixed"].make, seed=9)
    L = fl.Gaussian(SIGMA)
    batches = [(_inputs((2, 3), 2, seed=1), None), (_inputs((6,), 2, seed=2), None)]
    vals = fl.eigenvalues(model, batches, L, method="gram")  # Flatten makes both shapes valid inputs
    assert spy["structure"] == 0 and spy["generic"] == 1
    X = torch.cat([batches[0][0].flatten(1), batches[1][0]])
    ev = torch.linalg.eigvalsh(reference.true_fisher(model, X, ("gaussian", SIGMA))).flip(0)[: len(vals)]
    torch.testing.assert_close(vals, ev, rtol=STRUCT_RTOL, atol=1e-12 * float(ev[0]))
    with pytest.raises(ValueError, match="one floating tensor"):
        fl.eigenvalues(model, batches, L, method="gram", engine="structure")
    lin = seeded(lambda: nn.Linear(3, 2), seed=1)
    Xi = torch.randint(0, 3, (4, 3))
    with pytest.raises(ValueError, match="failed on a batch"):  # the generic engine's error for integer inputs
        fl.eigenvalues(lin, Xi, L, method="gram")


def test_errors_are_those_of_the_generic_route():
    model = seeded(MLPS["1h_tanh"].make, seed=11)
    X = _inputs((5,), 6, seed=11)
    L = fl.Categorical()
    msgs = []
    for engine in ("auto", "structure", "generic"):
        with pytest.raises(ValueError, match=r"Gram matrix of N·K = 18 rows") as e:
            fl.eigenvalues(model, X, L, method="gram", engine=engine, max_memory=1000)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == msgs[2]  # the same memory refusal on every route
    with pytest.raises(ValueError, match="needs labels"):  # empirical without labels
        fl.eigenvalues(model, X, L, method="gram", kind="empirical")
    with pytest.raises(ValueError, match="N, 5"):  # engine='structure' explains itself
        fl.eigenvalues(model, _inputs((2, 5), 3, seed=1), L, method="gram", engine="structure")
    with pytest.raises(ValueError, match="method='gram'"):
        fl.eigenvalues(model, X, L, method="dense", engine="structure")
    lin = nn.Linear(4, 4, dtype=torch.float64)
    shared = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3, dtype=torch.float64)).eval()
    with pytest.raises(ValueError, match="used twice"):  # refused before any computation
        fl.eigenvalues(shared, _inputs((4,), 3, seed=2), L, method="gram", engine="structure")
    with pytest.raises(ValueError, match="engine"):
        fl.eigenvalues(model, X, L, method="gram", engine="khatri-rao")


def test_lanczos_keeps_scipy_blas_to_one_thread(monkeypatch):
    """ARPACK's BLAS runs on one thread during the Lanczos products (its spinning threads would take the cores from
    torch); the pools are restored afterwards, and torch's own threads are left alone."""
    from threadpoolctl import threadpool_info

    import fisherlens.spectrum as spectrum

    seen = []
    real = spectrum.eigsh

    def spy(*a, **k):
        seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real(*a, **k)

    monkeypatch.setattr(spectrum, "eigsh", spy)
    before = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    torch_threads = torch.get_num_threads()
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X = torch.randn(9, 5, dtype=torch.float64)
    top = fl.eigenvalues(model, X, fl.Categorical(), k=2, method="lanczos")  # k > 1: ARPACK's route
    dense = fl.eigenvalues(model, X, fl.Categorical(), method="dense")
    torch.testing.assert_close(top, dense[:2], rtol=1e-6, atol=0)
    assert seen and seen[0] and all(n == 1 for f, n in seen[0].items() if "torch" not in f)
    assert {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == before
    assert torch.get_num_threads() == torch_threads
