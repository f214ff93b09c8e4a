"""Core-space spectrum of Λ = diag(π) − ππᵀ and the deterministic Loewner envelopes of the categorical Fisher
(SCIENCE §7), checked against matrices built by hand and by eigenvalues."""

from __future__ import annotations

import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import DT, Scaled, make_case

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_lambda(logits: torch.Tensor) -> torch.Tensor:
    """``Λ_b = diag(π_b) − π_b π_bᵀ`` with ``π = softmax`` written out (max-shifted exponentials)."""
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    return torch.stack([torch.diag(q) - torch.outer(q, q) for q in p]), p


def check_core(logits: torch.Tensor) -> None:
    logits = logits.to(DT)
    out = fl.bounds.core_spectrum(logits)
    assert set(out) == {"trace", "lambda_max_lower", "lambda_max_upper"}
    B, C = logits.shape
    for v in out.values():
        assert v.shape == (B,)
    L, p = hand_lambda(logits)
    ev = torch.linalg.eigvalsh(L)  # ascending, per b
    lam_max = ev[:, -1]
    tol = 1e-12
    torch.testing.assert_close(out["trace"], torch.diagonal(L, dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out["trace"], 1 - p.square().sum(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out["lambda_max_upper"], out["trace"], rtol=0, atol=0)
    torch.testing.assert_close(out["lambda_max_lower"], (p * (1 - p)).max(-1).values, rtol=1e-12, atol=1e-15)
    assert (out["lambda_max_lower"] <= lam_max + tol).all()
    assert (lam_max <= out["lambda_max_upper"] + tol).all()
    assert (ev[:, 0] >= -tol).all()  # Λ ≽ 0
    ones = torch.ones(C, dtype=DT)
    assert (L @ ones).abs().max() <= tol  # eigenvalue 0 on the all-ones vector
    # 0 ≼ Λ ≼ diag(π) and Λ ≼ (1 − ‖π‖²) I
    assert (torch.linalg.eigvalsh(torch.diag_embed(p) - L)[:, 0] >= -tol).all()
    iso = out["lambda_max_upper"][:, None, None] * torch.eye(C, dtype=DT)
    assert (torch.linalg.eigvalsh(iso - L)[:, 0] >= -tol).all()


def test_core_spectrum_hand_cases():
    check_core(torch.tensor([[0.0, 0.0], [2.0, 1.0], [5.0, -5.0]]))
    check_core(torch.zeros(1, 4))  # uniform: Λ = I/C − 11ᵀ/C², λ_max = 1/C, tr = 1 − 1/C
    out = fl.bounds.core_spectrum(torch.zeros(1, 4, dtype=DT))
    assert out["trace"].item() == pytest.approx(0.75) and out["lambda_max_lower"].item() == pytest.approx(3 / 16)
    # two classes: Λ has eigenvalues {0, 2π(1−π)} and the upper bound is attained
    out = fl.bounds.core_spectrum(torch.tensor([[1.3, -0.4]], dtype=DT))
    p = torch.sigmoid(torch.tensor(1.7, dtype=DT))
    assert out["lambda_max_upper"].item() == pytest.approx(float(2 * p * (1 - p)), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0, 40.0):  # flat to peaked
        check_core(scale * torch.randn(16, 5, generator=g, dtype=DT))
    for bad in (torch.zeros(3), torch.zeros(3, 1), torch.zeros(2, 3, 4)):
        with pytest.raises(ValueError):
            fl.bounds.core_spectrum(bad)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7).flatmap(
    lambda C: st.lists(st.lists(st.floats(-40, 40, allow_nan=False), min_size=C, max_size=C), min_size=1, max_size=4)))
def test_core_spectrum_hypothesis(rows):
    check_core(torch.tensor(rows, dtype=DT))


# ----------------------------------------------------------------------------- envelopes pulled back through J
def hand_envelopes(model, X):
    J = reference.jacobians(model, X)  # (N, C, P)
    p = torch.softmax(reference.outputs(model, X), -1)
    N = len(X)
    U_diag = torch.einsum("ncp,nc,ncq->pq", J, p, J) / N
    U_iso = torch.einsum("n,ncp,ncq->pq", 1 - p.square().sum(-1), J, J) / N
    return U_diag, U_iso


MODELS = [("mlp", 0, 1.0), ("mlp", 1, 4.0), ("mlp", 2, 0.1), ("cnn", 3, 1.0), ("cnn", 4, 5.0), ("free", 5, 1.0),
          ("free", 6, 3.0)]


@pytest.mark.parametrize(("name", "seed", "scale"), MODELS)
def test_envelopes_are_loewner_upper_bounds(name, seed, scale):
    c = make_case(name, seed=seed, n=7, batch_size=3)
    model = Scaled(c.model, scale) if scale != 1.0 else c.model
    c = type(c)(c.name, model, c.X, c.Y, c.lik, c.batch_size)
    F = fl.fisher_matrix(model, c.data, c.lik, batch_size=3)
    torch.testing.assert_close(F, reference.true_fisher(c.model, c.X, c.spec), rtol=1e-10, atol=1e-14)
    hand = dict(zip(("diag", "isotropic"), hand_envelopes(model, c.X), strict=True))
    P = F.shape[0]
    for which, Uh in hand.items():
        U = fl.bounds.envelope(model, c.data, which, "dense", batch_size=3)
        assert U.shape == (P, P)
        s = float(Uh.abs().max())
        torch.testing.assert_close(U, Uh, rtol=1e-10, atol=1e-13 * s)
        d = fl.bounds.envelope(model, c.data, which, "diag", batch_size=3)
        t = fl.bounds.envelope(model, c.data, which, "trace", batch_size=3)
        assert d.shape == (P,) and isinstance(t, float)
        torch.testing.assert_close(d, torch.diagonal(U), rtol=1e-10, atol=1e-13 * s)
        assert t == pytest.approx(float(torch.trace(U)), rel=1e-10, abs=1e-13 * s)
        # Loewner order F ≼ U (and 0 ≼ F), via the smallest eigenvalue of the difference
        assert float(torch.linalg.eigvalsh(U - F)[0]) >= -1e-10 * s, which
        assert float(torch.linalg.eigvalsh(F)[0]) >= -1e-10 * s
        assert (torch.diagonal(F) <= d + 1e-12 * s).all()
        assert float(torch.trace(F)) <= t + 1e-12 * s
        assert float(torch.linalg.eigvalsh(F)[-1]) <= float(torch.linalg.eigvalsh(U)[-1]) * (1 + 1e-10)
        # reduction and batching do not matter beyond the factor N
        us = fl.bounds.envelope(model, c.data, which, "trace", reduction="sum", batch_size=2)
        assert us == pytest.approx(len(c.X) * t, rel=1e-10)
        assert fl.bounds.envelope(model, c.X, which, "trace") == pytest.approx(t, rel=1e-10)


def test_envelopes_on_a_peaked_model_and_a_dataloader():
    """Nearly one-hot softmax: the bounds still hold (tr F ≤ tr U); a DataLoader gives the tensors' result."""
    c = make_case("mlp", seed=9, n=5)
    model = Scaled(c.model, 6.0)
    F = fl.fisher_matrix(model, c.X, c.lik)
    for which in ("diag", "isotropic"):
        t = fl.bounds.envelope(model, c.X, which, "trace")
        assert float(torch.trace(F)) <= t * (1 + 1e-12)
    # with a DataLoader
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(c.X, c.Y), batch_size=2)
    d1 = fl.bounds.envelope(model, loader, "diag", "diag")
    d2 = fl.bounds.envelope(model, c.X, "diag", "diag")
    torch.testing.assert_close(d1, d2, rtol=1e-12, atol=1e-18)


def test_envelope_argument_errors():
    c = make_case("mlp", n=3)
    with pytest.raises(ValueError):
        fl.bounds.envelope(c.model, c.X, "spectral", "diag")
    with pytest.raises(ValueError):
        fl.bounds.envelope(c.model, c.X, "diag", "eigs")
    with pytest.raises(ValueError):
        fl.bounds.envelope(c.model, c.X, "diag", "dense", max_memory=8)


def test_envelope_refuses_a_one_logit_model():
    """core_spectrum refuses C < 2; so must the envelope of a one-logit "categorical" model (its U_diag would be
    (1/N) Σ J_nᵀ J_n, since the softmax of one logit is 1, bounding a Fisher that is identically 0)."""
    c = make_case("bernoulli", n=4)
    for what in ("diag", "trace", "dense"):
        with pytest.raises(ValueError, match="Categorical"):
            fl.bounds.envelope(c.model, c.X, "diag", what)


def test_old_spelling_matrix_still_works_with_a_warning():
    c = make_case("mlp", n=3)
    with pytest.warns(FutureWarning, match="what='dense'"):
        U = fl.bounds.envelope(c.model, c.X, "diag", "matrix")
    torch.testing.assert_close(U, fl.bounds.envelope(c.model, c.X, "diag", "dense"), rtol=0, atol=0)
