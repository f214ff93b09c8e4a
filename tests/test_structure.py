"""fl.structure: the analytic (Khatri–Rao) layer structure of an MLP's Fisher (seed 002 eqs 4.7–4.9).

Every structured result is compared in float64 (rtol 1e-8) with the slow loops of ``reference.py`` (one
``autograd.grad`` per sample and output) and with the generic engine (``fl.fisher_matrix``,
``fl.eigenvalues(method="gram")``); the blocks also against seed 002's formulas written out index by index.
A float32 model's data Gram is accumulated in float64, and oversized Grams are refused before the factors exist.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from helpers import assert_close, leading_error
from torch import nn
from zoo import LIKS, N32, SIGMA, build_mlp, float32_mlp, scale_

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

RTOL = 1e-8
#: the MLPs of the zoo checked here, and the output models
STRUCTURED = ("linear", "0h_sigmoid", "0h_softmax", "1h_tanh", "1h_relu_softmax", "1h_sigmoid_tanh_nobias",
              "1h_identity_logsoftmax", "2h_mixed")
OUTPUTS = ("gaussian", "categorical")

CASES = [pytest.param(a, lk, id=f"{a}-{lk}") for a in STRUCTURED for lk in OUTPUTS]


# ----------------------------------------------------------------------------- per-input dense and blocks
@pytest.mark.parametrize(("arch", "lik"), CASES)
def test_per_input_dense_and_blocks_equal_autodiff(arch, lik):
    model, X, _ = build_mlp(arch, seed=1)
    L, spec = LIKS[lik].make(), LIKS[lik].spec
    expected = ref.true_fisher(model, X, spec)
    got = fl.structure.per_input_fisher(model, X[0], L)
    assert_close(got, expected, rtol=RTOL, what=f"{arch} dense vs reference")
    assert_close(got, fl.fisher_matrix(model, X, L), rtol=RTOL, what=f"{arch} dense vs fl.fisher_matrix")
    kr = fl.structure.per_input_fisher(model, X[0], L, "blocks")
    assert_close(kr.to_dense(), expected, rtol=RTOL, what=f"{arch} Khatri-Rao blocks")
    sl = ref.slices(model)
    for p in kr.names:  # each block is a Kronecker product A ⊗ B (eq 4.9)
        for q in kr.names:
            A, B = kr.A[kr.layer[p]][kr.layer[q]], kr.B(p, q)
            assert_close(torch.kron(A, B), expected[sl[p], sl[q]], rtol=RTOL, what=f"block {p},{q}")


def test_seed002_eq_4_8_blocks_written_out():
    """A_ij and B_ij of seed 002 (one hidden layer, Gaussian σ, no biases; 4.8b with φ₀′ → φ₁′)."""
    model, X, _ = build_mlp("1h_sigmoid_tanh_nobias", seed=2)
    x0 = X[0]
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    a1 = W1 @ x0
    x1 = torch.sigmoid(a1)
    a2 = W2 @ x1
    d1, d2 = x1 * (1 - x1), 1 - torch.tanh(a2) ** 2
    s2 = SIGMA**2
    n1, n2 = len(a1), len(a2)
    A11 = torch.zeros(n2, n2)  # 4.8a
    A00 = torch.zeros(n1, n1)  # 4.8b
    A01 = torch.zeros(n1, n2)  # 4.8c
    for mu in range(n2):
        A11[mu, mu] = d2[mu] ** 2 / s2
    for mu in range(n1):
        for nu in range(n1):
            A00[mu, nu] = sum(d2[r] ** 2 * d1[mu] * d1[nu] * W2[r, mu] * W2[r, nu] for r in range(n2)) / s2
        for nu in range(n2):
            A01[mu, nu] = d2[nu] ** 2 * d1[mu] * W2[nu, mu] / s2
    kr = fl.structure.per_input_fisher(model, x0, fl.Gaussian(SIGMA), "blocks")
    assert kr.names == ["0.weight", "2.weight"]
    assert_close(kr.A[0][0], A00, rtol=RTOL, what="A00 (4.8b)")
    assert_close(kr.A[1][1], A11, rtol=RTOL, what="A11 (4.8a)")
    assert_close(kr.A[0][1], A01, rtol=RTOL, what="A01 (4.8c)")
    assert_close(kr.A[1][0], A01.T, rtol=RTOL, what="A10")
    assert_close(kr.B("0.weight", "2.weight"), torch.outer(x0, x1), rtol=RTOL, what="B01")
    assert_close(kr.B("2.weight", "2.weight"), torch.outer(x1, x1), rtol=RTOL, what="B11")


def test_softmax_output_block_is_full():
    """Softmax output with the Gaussian model (seed 002 §4.3): A_22 = D Λ D with D = diag(π) − ππᵀ."""
    model, X, _ = build_mlp("1h_relu_softmax", seed=3)
    kr = fl.structure.per_input_fisher(model, X[0], fl.Gaussian(SIGMA), "blocks")
    with torch.no_grad():
        pi = model(X)[0]
    D = torch.diag(pi) - torch.outer(pi, pi)
    assert_close(kr.A[1][1], D @ D / SIGMA**2, rtol=RTOL, what="A22 softmax")
    assert kr.A[1][1].diagonal().abs().max() > 0 and (kr.A[1][1] - torch.diag(kr.A[1][1].diagonal())).abs().max() > 0


# ----------------------------------------------------------------------------- Gram and spectrum
def test_gram_closed_form_one_hidden_layer_with_biases():
    """G = D₂D₂ᵀ(‖x₁‖²+1) + (D₂W₂Φ₁')(D₂W₂Φ₁')ᵀ(‖x₀‖²+1) for the Gaussian σ = 1 and an elementwise output."""
    model, X, _ = build_mlp("1h_tanh", seed=4)  # identity output: D₂ = I
    x0 = X[0]
    W1, b1, W2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    a1 = W1 @ x0 + b1
    x1 = torch.tanh(a1)
    E = W2 * (1 - x1**2)[None, :]
    expected = torch.eye(3) * (x1 @ x1 + 1) + E @ E.T * (x0 @ x0 + 1)
    got = fl.structure.per_input_fisher(model, x0, fl.Gaussian(1.0), "gram")
    assert_close(got, expected, rtol=RTOL, what="closed-form Gram")
    J = ref.jacobians(model, X)[0]
    assert_close(got, J @ J.T, rtol=RTOL, what="Gram vs J Jᵀ")


@pytest.mark.parametrize(("arch", "lik"), CASES)
def test_eigen_equals_dense_and_generic_gram(arch, lik):
    model, X, C = build_mlp(arch, seed=5)
    L, spec = LIKS[lik].make(), LIKS[lik].spec
    F = ref.true_fisher(model, X, spec)
    dense = torch.linalg.eigvalsh(F).flip(0)
    vals = fl.structure.per_input_fisher(model, X[0], L, "eigenvalues")
    assert vals.shape == (C,)
    top = float(dense[0])
    torch.testing.assert_close(vals, dense[:C], rtol=RTOL, atol=1e-12 * top)
    assert dense[C:].abs().max() <= 1e-12 * top  # the rest of the P eigenvalues are zero
    torch.testing.assert_close(vals, fl.eigenvalues(model, X, L, method="gram"), rtol=RTOL, atol=1e-12 * top)
    E = fl.structure.per_input_fisher(model, X[0], L, "eigh")
    torch.testing.assert_close(E.values, vals, rtol=RTOL, atol=1e-14 * top)
    r = E.rank
    U = E.vectors
    assert U.shape == (F.shape[0], C)
    torch.testing.assert_close(F @ U, U * E.values, rtol=0, atol=1e-10 * top)  # F u = λ u
    torch.testing.assert_close(U[:, :r].T @ U[:, :r], torch.eye(r), rtol=0, atol=1e-8)
    assert (U[:, r:] == 0).all() and (E.values[r:] <= C * 2.3e-16 * top).all()
    if lik == "categorical" or arch.endswith("softmax"):  # Λ or the softmax Jacobian has the null vector 1
        assert r == C - 1
    # first-layer part of every eigenvector is rank one: v xᵀ (seed 002 §4.4's "eigenvector images")
    first = next(n for n in E.names if n.endswith("weight"))
    W = E.unflatten()[first]
    x = X[0].reshape(-1)
    assert W.shape == (C, *dict(model.named_parameters())[first].shape)
    for j in range(r):
        v = W[j] @ x / (x @ x)
        torch.testing.assert_close(W[j], torch.outer(v, x), rtol=0, atol=1e-12)


def test_batched_per_input_equals_single():
    model, X, C = build_mlp("1h_relu_softmax", seed=6, n=5)
    L = fl.Categorical()
    one = [fl.structure.per_input_fisher(model, x, L) for x in X]
    assert_close(fl.structure.per_input_fisher(model, X, L, batched=True), torch.stack(one), rtol=RTOL,
                 what="batched dense")
    vals = fl.structure.per_input_fisher(model, X, L, "eigenvalues", batched=True)
    assert vals.shape == (5, C)
    for n in range(5):
        ev = torch.linalg.eigvalsh(one[n]).flip(0)[:C]
        torch.testing.assert_close(vals[n], ev, rtol=RTOL, atol=1e-12 * float(ev[0]))
    E = fl.structure.per_input_fisher(model, X, L, "eigh", batched=True)
    for n in range(5):
        torch.testing.assert_close(one[n] @ E.vectors[n], E.vectors[n] * E.values[n], rtol=0,
                                   atol=1e-10 * float(E.values[n, 0]))
    kr = fl.structure.per_input_fisher(model, X, L, "blocks", batched=True)
    assert_close(kr.to_dense(), torch.stack(one), rtol=RTOL, what="batched blocks")


# ----------------------------------------------------------------------------- data-averaged
@pytest.mark.parametrize(("arch", "lik"), [("2h_mixed", "gaussian"), ("1h_relu_softmax", "categorical"),
                                           ("linear", "categorical"), ("1h_sigmoid_tanh_nobias", "gaussian")])
def test_data_fisher(arch, lik):
    model, X, C = build_mlp(arch, seed=7, n=6)
    L, spec = LIKS[lik].make(), LIKS[lik].spec
    F = ref.true_fisher(model, X, spec)
    assert_close(fl.structure.data_fisher(model, X, L), F, rtol=RTOL, what="data dense")
    assert_close(fl.structure.data_fisher(model, X, L, reduction="sum"), 6 * F, rtol=RTOL, what="sum")
    # Gram = (1/N) Ĝ Ĝᵀ with rows Ĝ_n = V_nᵀ J_n from the reference Jacobians
    fa = fl.structure.factors(model, X, L)
    J = ref.jacobians(model, X)
    rows = torch.cat([fa.V[n].T @ J[n] for n in range(6)])
    assert_close(fl.structure.data_fisher(model, X, L, "gram"), rows @ rows.T / 6, rtol=RTOL, what="data Gram")
    assert_close(fa.rows().reshape(-1, F.shape[0]), rows, rtol=RTOL, what="Khatri-Rao rows")
    vals = fl.structure.data_fisher(model, X, L, "eigenvalues")
    dense = torch.linalg.eigvalsh(F).flip(0)
    k = min(len(vals), len(dense))
    top = float(dense[0])
    torch.testing.assert_close(vals[:k], dense[:k], rtol=RTOL, atol=1e-12 * top)
    torch.testing.assert_close(vals, fl.eigenvalues(model, X, L, method="gram"), rtol=RTOL, atol=1e-12 * top)
    E = fl.structure.data_fisher(model, X, L, "eigh")
    torch.testing.assert_close(F @ E.vectors, E.vectors * E.values, rtol=0, atol=1e-9 * top)


def test_empirical_kind_and_bernoulli():
    model, X, _ = build_mlp("1h_tanh", seed=8, n=4)
    Y = torch.randn(4, 3, generator=torch.Generator().manual_seed(9))
    L = fl.LossInduced(fl.losses.lp_norm(4))
    got = fl.structure.data_fisher(model, X, L, kind="empirical", y=Y)
    assert_close(got, ref.empirical_fisher(model, X, Y, ("lp", 4.0)), rtol=RTOL, what="empirical lp4")
    one = fl.structure.per_input_fisher(model, X[0], L, kind="empirical", y=Y[0])
    assert_close(one, ref.empirical_fisher(model, X[:1], Y[:1], ("lp", 4.0)), rtol=RTOL, what="one empirical")
    torch.manual_seed(3)
    logit = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    assert_close(fl.structure.data_fisher(logit, X, fl.Bernoulli()), ref.true_fisher(logit, X, ("bernoulli",)),
                 rtol=RTOL, what="bernoulli")


def test_mc_kind_matches_generic_engine_with_the_same_generator():
    model, X, _ = build_mlp("1h_relu_softmax", seed=12, n=5)
    L = fl.Categorical()
    got = fl.structure.data_fisher(model, X, L, kind="mc", samples=3, generator=torch.Generator().manual_seed(4))
    exp = fl.fisher_matrix(model, X, L, "mc", samples=3, generator=torch.Generator().manual_seed(4))
    assert_close(got, exp, rtol=RTOL, what="mc")
    assert (got - fl.structure.data_fisher(model, X, L)).abs().max() > 1e-6  # it is a random estimate


def test_nested_sequential():
    torch.manual_seed(13)
    model = scale_(nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 3)),
                                 nn.Softmax(-1)))
    X = torch.randn(3, 4, generator=torch.Generator().manual_seed(14))
    L = fl.Categorical()
    assert_close(fl.structure.data_fisher(model, X, L), ref.true_fisher(model, X, ("categorical",)), rtol=RTOL,
                 what="nested")
    with pytest.raises(TypeError, match="'1.1'"):
        fl.structure.data_fisher(nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Tanh(), nn.LayerNorm(3))), X, L)


def test_frozen_parameters_are_left_out():
    model, X, _ = build_mlp("1h_tanh", seed=10, n=3)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    L = fl.Gaussian(SIGMA)
    got = fl.structure.data_fisher(model, X, L)
    assert got.shape == (5 * 4 + 3,) * 2
    assert_close(got, fl.fisher_matrix(model, X, L), rtol=RTOL, what="frozen")
    assert_close(got, ref.true_fisher(model, X, ("gaussian", SIGMA), names=["0.weight", "2.bias"]), rtol=RTOL,
                 what="frozen vs reference")
    vals = fl.structure.per_input_fisher(model, X[0], L, "eigenvalues")
    torch.testing.assert_close(vals, fl.eigenvalues(model, X[:1], L, method="gram"), rtol=RTOL, atol=1e-14)


def test_float32_matches_float64():
    model, X, _ = build_mlp("1h_relu_softmax", seed=11)
    v64 = fl.structure.per_input_fisher(model, X[0], fl.Gaussian(), "eigenvalues")
    v32 = fl.structure.per_input_fisher(model.float(), X[0].float(), fl.Gaussian(), "eigenvalues")
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-6 * float(v64[0]))


# ----------------------------------------------------------------------------- errors
class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize(("model", "match"), [
    (Custom(), "needs an nn.Sequential"),
    (nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 2)), "Conv1d"),
    (nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)), "only nn.Linear layers may carry"),
    (nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)), "last module"),
    (nn.Sequential(nn.Linear(3, 4), nn.Softmax(0)), "dim=0"),
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "BatchNorm1d"),
    (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.MaxPool1d(2)), "MaxPool1d"),
    (nn.Sequential(nn.Tanh(), nn.Flatten()), "no nn.Linear"),
])
def test_unsupported_models_raise(model, match):
    with pytest.raises(TypeError, match=match):
        fl.structure.per_input_fisher(model.double(), torch.randn(3), fl.Gaussian())


def test_bad_inputs_raise():
    model, X, _ = build_mlp("1h_tanh")
    lin = model[0]
    with pytest.raises(TypeError, match="used twice"):
        fl.structure.per_input_fisher(nn.Sequential(lin, nn.Tanh(), lin), torch.randn(5), fl.Gaussian())
    drop = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ValueError, match="Dropout in training mode"):
        fl.structure.per_input_fisher(drop, torch.randn(5), fl.Gaussian())
    with pytest.raises(ValueError, match="needs"):
        fl.structure.per_input_fisher(model, torch.randn(4), fl.Gaussian())
    with pytest.raises(ValueError, match="what="):
        fl.structure.per_input_fisher(model, X[0], fl.Gaussian(), "trace")
    with pytest.raises(ValueError, match="what="):
        fl.structure.data_fisher(model, X, fl.Gaussian(), "blocks")
    with pytest.raises(ValueError, match="empirical"):
        fl.structure.per_input_fisher(model, X[0], fl.LossInduced(fl.losses.lp_norm(2)))
    with pytest.raises(ValueError, match="labels"):
        fl.structure.data_fisher(model, X, fl.Categorical(), kind="empirical")
    with pytest.raises(TypeError, match="likelihood"):
        fl.structure.data_fisher(model, X, "gaussian")
    with pytest.raises(ValueError, match="GiB"):
        fl.structure.per_input_fisher(model, X[0], fl.Gaussian(), max_memory=100)
    bad = scale_(nn.Sequential(nn.Linear(5, 3)))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fl.structure.per_input_fisher(bad, X[0], fl.Gaussian())


def test_inplace_activations_leave_the_inputs_alone():
    """An in-place activation before the first Linear must not overwrite the caller's X (review fix)."""
    torch.manual_seed(15)
    model = scale_(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2)))
    X = torch.randn(5, 4, generator=torch.Generator().manual_seed(16))
    X0 = X.clone()
    got = fl.structure.data_fisher(model, X, fl.Gaussian(SIGMA))
    assert torch.equal(X, X0)
    plain = nn.Sequential(nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    plain.load_state_dict(model.state_dict())
    assert_close(got, ref.true_fisher(plain, X0, ("gaussian", SIGMA)), rtol=RTOL, what="in-place activations")


# ----------------------------------------------------------------------------- float32 models and refusals
#: float32 rows, a float64 Gram: ~1e-7 (a float32 Gram was off by 3e-6 to 2e-5; see test_spectrum.py)
GRAM32_RTOL = 1e-6


def test_structure_data_fisher_gram_in_float64():
    model, X = float32_mlp(1)
    lik = fl.Gaussian()
    ref64 = fl.structure.data_fisher(copy.deepcopy(model).double(), X.double(), lik, "eigenvalues")
    vals = fl.structure.data_fisher(model, X, lik, "eigenvalues")
    G = fl.structure.data_fisher(model, X, lik, "gram")
    assert vals.dtype == G.dtype == torch.float32
    assert leading_error(vals, ref64) < GRAM32_RTOL


def test_structure_functions_refuse_before_factors(no_factors):
    model, X = float32_mlp(0)
    lik = fl.Categorical()
    for what in ("gram", "eigenvalues", "eigh"):
        with pytest.raises(ValueError, match=r"Gram matrix of N·K = 640 rows"):
            fl.structure.data_fisher(model, X, lik, what, max_memory=10**6)
    with pytest.raises(ValueError, match="dense Fisher"):
        fl.structure.data_fisher(model, X, lik, "dense", max_memory=10**4)
    with pytest.raises(ValueError, match="dense per-input"):
        fl.structure.per_input_fisher(model, X, lik, "dense", batched=True, max_memory=10**6)


def test_factor_sizes_match_the_factors():
    model, X = float32_mlp(0)
    for kind, kw in (("true", {}), ("empirical", {"y": torch.zeros(N32, dtype=torch.long)}), ("mc", {"samples": 3})):
        fa = fl.structure.factors(model, X, fl.Categorical(), kind, **kw)
        sizes = fl.structure.factor_sizes(model, X, fl.Categorical(), kind, samples=kw.get("samples", 1))
        assert sizes == (fa.N, fa.K, fa.P), kind
    with pytest.raises(ValueError, match="N, 64"):
        fl.structure.factor_sizes(model, X[:, :, :4], fl.Categorical())
