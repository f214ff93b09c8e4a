"""The compact factor of the categorical output Fisher (:meth:`Categorical.fisher_factor`): ``Λ = diag π − ππᵀ`` has
rank C − 1, so the exact diagonal and trace back-propagate C − 1 columns per prediction instead of C.  ``U Uᵀ`` must
equal Λ (float64, and to float32 round-off at saturated logits), the compact sandwich must give the square
sandwich's ``V Vᵀ`` on structured outputs with dropped positions, the exact diagonal and trace must equal those of
the dense Fisher, and a subclass with its own square root must keep it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherlens as fl
from fisherlens.bounds import envelope


def _lam(f: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(f.double(), -1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


@pytest.mark.parametrize("scale", [0.5, 5.0, 40.0])
@pytest.mark.parametrize("C", [2, 3, 10])
def test_factor_reproduces_the_output_fisher(C, scale):
    f = scale * torch.randn(64, C, dtype=torch.float64, generator=torch.Generator().manual_seed(C))
    U = fl.Categorical().fisher_factor(f)
    assert U.shape == (64, C, C - 1)
    torch.testing.assert_close(U @ U.mT, _lam(f), rtol=0, atol=1e-15)
    U32 = fl.Categorical().fisher_factor(f.float()).double()
    torch.testing.assert_close(U32 @ U32.mT, _lam(f), rtol=0, atol=3e-7)


@pytest.mark.parametrize("shape", [(6, 4), (6, 3, 4)])
def test_compact_sandwich_has_the_square_sandwichs_product(shape):
    """``V Vᵀ`` per input is unchanged, with ``T·(C − 1)`` columns; a dropped position stays zero."""
    f = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lik = fl.Categorical()
    y = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(2))
    y.view(-1)[1] = -100
    V = lik.sandwich(f, "true", y)
    W = lik.sandwich(f, "true", y, compact=True)
    T = 1 if len(shape) == 2 else shape[1]
    assert W.shape == (shape[0], T * shape[-1], T * (shape[-1] - 1)) and V.shape[-1] == T * shape[-1]
    torch.testing.assert_close(W @ W.mT, V @ V.mT, rtol=0, atol=1e-15)


@pytest.mark.usefixtures("float64")
def test_exact_diagonal_and_trace_equal_the_dense_fishers():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X = torch.randn(9, 4)
    lik = fl.Categorical()
    F = fl.fisher_matrix(model, X, lik)
    torch.testing.assert_close(fl.fisher_diag(model, X, lik), F.diagonal(), rtol=1e-12, atol=1e-15)
    assert fl.fisher_trace(model, X, lik) == pytest.approx(float(F.trace()), rel=1e-12)


class _Scaled(fl.Categorical):
    """Another output Fisher (``4 Λ``) through its own square root."""

    def sqrt_fisher(self, f):
        return 2 * super().sqrt_fisher(f)


@pytest.mark.usefixtures("float64")
def test_a_subclass_with_its_own_square_root_keeps_it():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3))
    X = torch.randn(5, 4)
    f = torch.randn(5, 3)
    assert torch.equal(_Scaled().fisher_factor(f), _Scaled().sqrt_fisher(f))
    torch.testing.assert_close(fl.fisher_diag(model, X, _Scaled()), 4 * fl.fisher_diag(model, X, fl.Categorical()),
                               rtol=1e-12, atol=1e-15)
    d = envelope(model, X, "diag")  # the core-space envelope: a Categorical subclass with a diagonal square root
    assert torch.all(d >= fl.fisher_diag(model, X, fl.Categorical()) - 1e-12)


def test_the_exact_diagonal_back_propagates_c_minus_one_columns(monkeypatch):
    """The point of the factor: one batched backward of C − 1 columns per input (C = 3 here), not C."""
    import fisherlens._core.engine as engine

    seen = []
    real = engine.tap_grads

    def spy(calls, f, V, **kw):
        seen.append(V.shape[-1])
        return real(calls, f, V, **kw)

    monkeypatch.setattr(engine, "tap_grads", spy)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    fl.fisher_diag(model, torch.randn(8, 4), fl.Categorical())
    assert seen and set(seen) == {2}
