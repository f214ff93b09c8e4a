"""The Gram route of float32 models accumulates in float64; oversized Grams are refused before any work.

Accuracy: a float32 model's eigenvalues by the Gram route (generic rows of a CNN, structured factors of an MLP)
against the same model cast to float64.  With a Gaussian output model the sandwich is exact, so the remaining
error is the float32 rounding of the rows (~1e-7); a float32 ``Ĵ Ĵᵀ`` with a float32 ``eigvalsh`` was off by
3e-6 to 2e-5 at λ ≥ 1e-3·λ_max on these models (the tolerance, 1e-6, separates the two).

Refusal: ``max_memory`` too small for the N·K × N·K Gram stops the structured route before its factors exist.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fisherlens as fl

N = 64
RTOL = 1e-6


def _init(model: nn.Module, g: torch.Generator, w: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (w if p.dim() > 1 else 0.1))
    return model.eval()


def cnn(seed: int) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    return _init(m, g, 0.3), torch.randn(N, 1, 8, 8, generator=g)


def mlp(seed: int) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 10))
    return _init(m, g, 0.2), torch.randn(N, 1, 8, 8, generator=g)


def leading_error(vals: torch.Tensor, ref: torch.Tensor, frac: float = 1e-3) -> float:
    """Largest relative error over the eigenvalues λ ≥ frac·λ_max of the reference."""
    sel = ref >= frac * ref[0]
    assert int(sel.sum()) > 50  # many eigenvalues, not just the top one
    v = vals.double()[: len(ref)]
    return float(((v[sel] - ref[sel]).abs() / ref[sel]).max())


def reference(model, X, lik, **kw) -> torch.Tensor:
    return fl.eigenvalues(copy.deepcopy(model).double(), X.double(), lik, method="gram", **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_cnn_gram_matches_float64(seed):
    model, X = cnn(seed)
    lik = fl.Gaussian()
    vals = fl.eigenvalues(model, X, lik, method="gram")
    assert vals.dtype == torch.float32
    err = leading_error(vals, reference(model, X, lik))
    assert err < RTOL, f"float32 Gram route: relative error {err:.2e} on λ ≥ 1e-3 λ_max"


@pytest.mark.parametrize("engine", ["structure", "generic"])
def test_float32_mlp_gram_matches_float64(engine):
    model, X = mlp(0)
    lik = fl.Gaussian()
    vals = fl.eigenvalues(model, X, lik, method="gram", engine=engine)
    assert vals.dtype == torch.float32
    err = leading_error(vals, reference(model, X, lik, engine="structure"))
    assert err < RTOL, f"float32 {engine} Gram route: relative error {err:.2e} on λ ≥ 1e-3 λ_max"


def test_structure_data_fisher_gram_in_float64():
    model, X = mlp(1)
    lik = fl.Gaussian()
    ref = fl.structure.data_fisher(copy.deepcopy(model).double(), X.double(), lik, "eigenvalues")
    vals = fl.structure.data_fisher(model, X, lik, "eigenvalues")
    G = fl.structure.data_fisher(model, X, lik, "gram")
    assert vals.dtype == G.dtype == torch.float32
    assert leading_error(vals, ref) < RTOL


def test_chunk_pairs_and_vectors_are_accurate_too(monkeypatch):
    """The chunk-pair assembly (rows recomputed, column blocks cast to float64) and the float32 eigenvectors."""
    model, X = cnn(2)
    lik = fl.Gaussian()
    monkeypatch.setattr(fl.spectrum, "WORK_BUDGET", 8 * 10 * 5210 * 4)  # chunks of 8 inputs: rows never all held
    vals, U = fl.eigenvalues(model, X, lik, method="gram", batch_size=16, return_vectors=True)
    assert vals.dtype == U.dtype == torch.float32
    assert leading_error(vals, reference(model, X, lik)) < RTOL
    F = fl.fisher_matrix(copy.deepcopy(model).double(), X.double(), lik)
    k = 5
    Uk = U[:, :k].double()
    torch.testing.assert_close(F @ Uk, Uk * vals[:k].double(), rtol=0, atol=1e-4 * float(vals[0]))


# ----------------------------------------------------------------------------- refusal before allocating
@pytest.fixture
def no_factors(monkeypatch):
    """Make building the structured factors an error: a refusal must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the factors were built before the memory refusal")

    monkeypatch.setattr(fl.structure, "factors", boom)


@pytest.mark.parametrize("engine", ["auto", "structure"])
def test_structured_gram_refused_before_factors(no_factors, engine):
    model, X = mlp(0)
    with pytest.raises(ValueError, match=r"Gram matrix of N·K = 640 rows"):
        fl.eigenvalues(model, X, fl.Categorical(), method="gram", engine=engine, max_memory=10**6)


def test_structure_functions_refuse_before_factors(no_factors):
    model, X = mlp(0)
    lik = fl.Categorical()
    for what in ("gram", "eigenvalues", "eigh"):
        with pytest.raises(ValueError, match=r"Gram matrix of N·K = 640 rows"):
            fl.structure.data_fisher(model, X, lik, what, max_memory=10**6)
    with pytest.raises(ValueError, match="dense Fisher"):
        fl.structure.data_fisher(model, X, lik, "dense", max_memory=10**4)
    with pytest.raises(ValueError, match="dense per-input"):
        fl.structure.per_input_fisher(model, X, lik, "dense", batched=True, max_memory=10**6)


def test_factor_sizes_match_the_factors():
    model, X = mlp(0)
    for kind, kw in (("true", {}), ("empirical", {"y": torch.zeros(N, dtype=torch.long)}), ("mc", {"samples": 3})):
        fa = fl.structure.factors(model, X, fl.Categorical(), kind, **kw)
        sizes = fl.structure.factor_sizes(model, X, fl.Categorical(), kind, samples=kw.get("samples", 1))
        assert sizes == (fa.N, fa.K, fa.P), kind
    with pytest.raises(ValueError, match="N, 64"):
        fl.structure.factor_sizes(model, X[:, :, :4], fl.Categorical())
