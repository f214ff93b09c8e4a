"""The Monte-Carlo Fisher converges to the true Fisher, with the error of its standard error.

For a Categorical model the label distribution is known, so the per-draw statistics are exact:
for input n and label c (probability π_nc) the factor row is ``G_nc = J_nᵀ (π_n − e_c)`` and one
draw contributes ``G_nc²`` (elementwise) to diag F.  Hence ``E[G²] = diag(J_nᵀ Λ_n J_n)`` and the
variance of the k-sample, N-input mean is ``Σ_n Var_n / (N² k)`` — computed here exactly from the
reference Jacobians, independently of the library.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from conftest import build

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture(scope="module")
def setup(float64):
    model, X = build("mlp_tanh", seed=40, n=6)
    with torch.no_grad():  # sharper probabilities: a less trivial label distribution
        model[4].weight.mul_(3.0)
    J = ref.jacobians(model, X)  # (N, C, P)
    pi = torch.softmax(ref.outputs(model, X), -1)  # (N, C)
    N, C, P = J.shape
    eye = torch.eye(C)
    G = torch.stack([torch.stack([J[n].T @ (pi[n] - eye[c]) for c in range(C)])
                     for n in range(N)])  # (N, C, P)
    w = pi[:, :, None]
    m2 = (w * G**2).sum(1)  # E[G²] per input (N, P)
    m4 = (w * G**4).sum(1)
    diag_true = m2.mean(0)
    var_diag = (m4 - m2**2).sum(0) / N**2  # per draw
    T = (G**2).sum(-1)  # (N, C)
    t2 = (pi * T).sum(1)
    var_trace = ((pi * T**2).sum(1) - t2**2).sum() / N**2
    exact = torch.diagonal(ref.true_fisher(model, X, ("categorical",)))
    assert torch.allclose(diag_true, exact, rtol=1e-10)  # the identity E[G²] = diag F
    return model, X, diag_true, var_diag, float(diag_true.sum()), float(var_trace)


def test_mc_fisher_many_samples_within_standard_error(setup):
    model, X, diag_true, var_diag, tr_true, var_tr = setup
    k = 4000
    for engine in ("layerwise", "functional"):
        g = torch.Generator().manual_seed(7)
        d = fl.fisher_diag(model, (X, None), fl.Categorical(), "mc", samples=k, generator=g,
                           engine=engine)
        z = (d - diag_true) / torch.sqrt(var_diag / k)
        assert float(z.abs().max()) < 4.5, f"{engine}: max |z| {float(z.abs().max())}"
        assert 0.2 < float((z**2).mean()) < 3.0
        t = fl.fisher_trace(model, (X, None), fl.Categorical(), "mc", samples=k,
                            generator=torch.Generator().manual_seed(8), engine=engine)
        assert abs(t - tr_true) < 4 * (var_tr / k) ** 0.5
    # and it is not exact: the estimate really is random
    assert float((d - diag_true).abs().max()) > 1e-6


def test_mc_error_shrinks_like_inverse_sqrt_samples(setup):
    model, X, diag_true, var_diag, tr_true, var_tr = setup
    seeds = range(16)
    rms = {}
    for k in (100, 1600):
        sq_diag, sq_tr = [], []
        for s in seeds:
            d = fl.fisher_diag(model, (X, None), fl.Categorical(), "mc", samples=k,
                               generator=torch.Generator().manual_seed(100 + s))
            sq_diag.append(((d - diag_true) ** 2 / (var_diag / k)).mean())
            sq_tr.append((float(d.sum()) - tr_true) ** 2)
        norm = float(torch.stack(sq_diag).mean())
        # mean squared error in units of the predicted variance: about 1 at every k
        assert 0.4 < norm < 2.5, f"k={k}: normalised mse {norm}"
        rms[k] = (sum(sq_tr) / len(sq_tr)) ** 0.5
        assert 0.4 < rms[k] / (var_tr / k) ** 0.5 < 2.0
    ratio = rms[100] / rms[1600]
    assert 2.0 < ratio < 8.0, f"error ratio {ratio}, expected about sqrt(16) = 4"
