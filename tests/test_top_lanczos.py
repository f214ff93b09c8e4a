"""The torch Lanczos of the top eigenvalue (``fisherlens.spectrum.top_lanczos``, the ``k = 1`` route of
``fl.eigenvalues(method="lanczos")``): against ``eigvalsh`` of dense matrices in float64, its stopping test (the Ritz
residual it promises), invariant subspaces and the zero operator, the hand-over to ARPACK when its basis fills, the
Fisher of several architectures against the dense Fisher, and a float32 model against its float64 copy."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import float32_mlp, make_case

import fisherlens as fl
import fisherlens.spectrum as spectrum
from fisherlens.spectrum import top_lanczos

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(P: int, spectrum_: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return (Q * spectrum_) @ Q.T


@pytest.mark.parametrize("spread", ["geometric", "clustered"])
@pytest.mark.parametrize("tol", [1e-3, 1e-10])
def test_top_pair_meets_the_residual_it_promises(spread, tol):
    P = 200
    if spread == "geometric":  # a sloppy spectrum: decades of eigenvalues
        lam = torch.logspace(0, -8, P, dtype=torch.float64)
    else:  # a small relative gap at the top
        rest = torch.rand(P - 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9
        lam = torch.cat([torch.tensor([1.0, 0.97, 0.95], dtype=torch.float64), rest])
    A = _spd(P, lam, seed=3)
    products = []

    def mv(v):
        products.append(1)
        return A @ v

    theta, u, converged = top_lanczos(mv, torch.ones(P, dtype=torch.float64), tol, basis=P)
    assert converged and len(products) < P
    torch.testing.assert_close(u.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert float((A @ u - theta * u).norm()) <= tol * theta * (1 + 1e-9)  # the stopping test, recomputed
    top = float(lam.max())
    assert theta <= top * (1 + 1e-12)  # a Ritz value never exceeds λ_max
    # the eigenvalue's error is second order in the residual: (tol θ)² / gap
    gap = top - float(lam.sort(descending=True).values[1])
    assert top - theta <= (tol * top) ** 2 / gap + 1e-12 * top


def test_invariant_subspace_and_zero_operator_stop_at_once():
    P = 50
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(P, generator=g, dtype=torch.float64), torch.randn(P, generator=g, dtype=torch.float64)
    A = 3.0 * torch.outer(a, a) / a.dot(a) + torch.outer(b, b) / b.dot(b)  # rank 2
    calls = []
    theta, u, ok = top_lanczos(lambda v: (calls.append(1), A @ v)[1], torch.randn(P, generator=g, dtype=torch.float64),
                               1e-12, basis=P)
    assert ok and len(calls) <= 3
    torch.testing.assert_close(theta, float(torch.linalg.eigvalsh(A)[-1]), rtol=1e-12, atol=0)
    theta, u, ok = top_lanczos(lambda v: torch.zeros_like(v), torch.ones(P, dtype=torch.float64), 1e-8, basis=P)
    assert ok and theta == 0.0 and torch.isfinite(u).all()


def test_a_full_basis_is_reported_and_hands_over_to_arpack(monkeypatch):
    A = _spd(120, torch.logspace(0, -3, 120, dtype=torch.float64), seed=5)
    theta, u, ok = top_lanczos(lambda v: A @ v, torch.ones(120, dtype=torch.float64), 1e-12, basis=3)
    assert not ok and theta < float(torch.linalg.eigvalsh(A)[-1])
    torch.testing.assert_close(u.norm(), torch.tensor(1.0, dtype=torch.float64))

    c = make_case("mlp", seed=4, n=6, batch_size=4)
    real_top, real_eigsh, seen = spectrum.top_lanczos, spectrum.eigsh, {}

    def short(matvec, v0, tol, basis):  # a basis of 2: not enough for tol = 1e-12
        seen["top"] = real_top(matvec, v0, tol, 2)
        return seen["top"]

    def spy(*a, **k):
        seen["v0"] = k["v0"]
        return real_eigsh(*a, **k)

    monkeypatch.setattr(spectrum, "top_lanczos", short)
    monkeypatch.setattr(spectrum, "eigsh", spy)
    got = fl.eigenvalues(c.model, c.data, c.lik, k=1, method="lanczos", tol=1e-12)
    assert not seen["top"][2]
    torch.testing.assert_close(torch.as_tensor(seen["v0"]), seen["top"][1])  # ARPACK starts from the best vector
    dense = fl.eigenvalues(c.model, c.data, c.lik, method="dense")
    torch.testing.assert_close(got, dense[:1], rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "gauss", "bernoulli"])
def test_fisher_top_eigenpair_equals_dense(name):
    c = make_case(name, seed=11, n=6, batch_size=4)
    F = fl.fisher_matrix(c.model, c.data, c.lik, batch_size=c.batch_size)
    ref = torch.linalg.eigvalsh(F)[-1]
    val, U = fl.eigenvalues(c.model, c.data, c.lik, k=1, method="lanczos", tol=1e-12, return_vectors=True,
                            batch_size=c.batch_size)
    assert val.shape == (1,) and U.shape == (F.shape[0], 1)
    torch.testing.assert_close(val[0], ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(F @ U[:, 0], val[0] * U[:, 0], rtol=0, atol=1e-9 * float(ref))


def test_float32_model_matches_its_float64_copy():
    """Float32 products, float64 sums of the tridiagonal: the float32 error only (~1e-7), not the ~√P·ε of a
    float32 sum over the P terms of each dot product."""
    model, X = float32_mlp(seed=2)
    lik = fl.Categorical()
    top = fl.eigenvalues(model, X, lik, k=1, method="lanczos", tol=1e-8)
    assert top.dtype == torch.float32
    ref = fl.eigenvalues(copy.deepcopy(model).double(), X.double(), lik, k=1, method="dense")
    torch.testing.assert_close(top.double(), ref, rtol=2e-6, atol=0)
