"""fl.natural_gradient and fl.optim.NaturalGradient (issue 15, parts 1–2), float64.

The direction is checked against ``torch.linalg.solve(F + λI, g)`` with ``F = fl.fisher_matrix(...)`` (same
arguments) and ``g`` the gradient of the loss written with torch's own losses (not the library's), on MLPs, a
small CNN and a causal transformer LM with ``(B, T, V)`` outputs and −100 labels; every kind, output model and
both solvers, with N·K below and above P.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as nnf
from helpers import assert_close, raises
from torch import nn
from zoo import init_, lm_case, make_case

import fisherlens as fl
import fisherlens._core as core
from fisherlens.natural import NaturalDirection

pytestmark = [pytest.mark.usefixtures("float64"),
              pytest.mark.filterwarnings("ignore:Parameters .* the layerwise engine cannot prove")]

LAM = 1e-2


# ----------------------------------------------------------------------------- references
def torch_loss(lik, f: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ_n ℓ_n, kept predictions)`` with torch's losses."""
    if isinstance(lik, fl.Categorical):
        C = f.shape[-1]
        kept = int((Y != -100).sum())
        return nnf.cross_entropy(f.reshape(-1, C), Y.reshape(-1), reduction="sum", ignore_index=-100), kept
    if isinstance(lik, fl.Bernoulli):
        return nnf.binary_cross_entropy_with_logits(f.reshape(Y.shape), Y, reduction="sum"), len(Y)
    return ((f - Y) ** 2).sum() / (2 * lik.sigma**2), len(Y)


def torch_grad(model, X, Y, lik, reduction="mean", names=None) -> torch.Tensor:
    """The flat gradient of the loss normalised like F: mean over inputs, per kept prediction, or sum."""
    named = dict(model.named_parameters())
    names = names or list(named)
    total, kept = torch_loss(lik, model(X), Y)
    scale = {"mean": 1 / len(X), "per_prediction": 1 / kept, "sum": 1.0}[reduction]
    grads = torch.autograd.grad(total * scale, [named[n] for n in names])
    return torch.cat([g.reshape(-1) for g in grads])


def reference(model, data, lik, kind, lam, g, **kw) -> torch.Tensor:
    F = fl.fisher_matrix(model, data, lik, kind, **kw)
    return torch.linalg.solve(F + lam * torch.eye(len(F)), g)


def mc(kind: str) -> dict:
    return {"generator": torch.Generator().manual_seed(5), "samples": 2} if kind == "mc" else {}


def check(model, X, Y, lik, kind, solver, lam=LAM, rtol=1e-7, **kw):
    d = fl.natural_gradient(model, (X, Y), lik, damping=lam, kind=kind, solver=solver, **mc(kind), **kw)
    g = torch_grad(model, X, Y, lik, kw.get("reduction", "mean"))
    assert_close(torch.cat([v.reshape(-1) for v in d.grad.values()]), g, rtol=1e-10, what="grad")
    assert_close(d.flat, reference(model, (X, Y), lik, kind, lam, g, **mc(kind), **kw), rtol=rtol, what="direction")
    assert d.solver == solver and d.converged and d.residual < 1e-9
    assert list(d) == [n for n, _ in model.named_parameters()]
    assert all(d[n].shape == p.shape for n, p in model.named_parameters())
    return d


# ----------------------------------------------------------------------------- the direction
@pytest.mark.parametrize("solver", ["gram", "cg"])
@pytest.mark.parametrize("kind", ["true", "empirical", "mc"])
@pytest.mark.parametrize("n", [5, 30])  # N·K < P = 43 and N·K > P
def test_mlp_categorical(kind, solver, n):
    c = make_case("mlp", n=n)
    check(c.model, c.X, c.Y, c.lik, kind, solver)


@pytest.mark.parametrize("solver", ["gram", "cg"])
@pytest.mark.parametrize("case,kind", [("cnn", "true"), ("cnn", "mc"), ("gauss", "true"), ("gauss", "empirical"),
                                       ("bernoulli", "true"), ("bernoulli", "mc"), ("bernoulli", "empirical")])
def test_output_models_and_cnn(case, kind, solver):
    c = make_case(case, n=6)
    check(c.model, c.X, c.Y, c.lik, kind, solver)


@pytest.mark.parametrize("solver", ["gram", "cg"])
@pytest.mark.parametrize("kind,reduction", [("true", "mean"), ("empirical", "per_prediction"),
                                            ("true", "per_prediction")])
def test_sequence_model(kind, reduction, solver):
    """A causal transformer LM: (B, T, V) logits, −100 at the last and padded positions (N·K = 140 < P = 715)."""
    model, X, Y = lm_case(n=4)
    check(model, X, Y, fl.Categorical(), kind, solver, rtol=1e-6, reduction=reduction)


def test_sum_reduction_and_subset():
    c = make_case("mlp", n=6)
    for solver in ("gram", "cg"):
        d = fl.natural_gradient(c.model, c.data, c.lik, damping=LAM, solver=solver, params="2", reduction="sum")
        g = torch_grad(c.model, c.X, c.Y, c.lik, "sum", names=["2.weight", "2.bias"])
        assert list(d) == ["2.weight", "2.bias"]
        assert_close(d.flat, reference(c.model, c.data, c.lik, "true", LAM, g, params="2", reduction="sum"))


def test_damping_to_zero():
    """A full-rank Fisher (Gaussian outputs, N·C = 60 > P = 26): the direction tends to F⁻¹ g, the error ~ λ/λ_min."""
    c = make_case("gauss", n=30)
    F = fl.fisher_matrix(c.model, c.data, c.lik)
    assert torch.linalg.eigvalsh(F)[0] > 1e-5
    g = torch_grad(c.model, c.X, c.Y, c.lik)
    exact = torch.linalg.solve(F, g)
    for solver in ("gram", "cg"):
        d = fl.natural_gradient(c.model, c.data, c.lik, damping=1e-12, solver=solver)
        assert_close(d.flat, exact, rtol=1e-6, what=solver)


def test_given_grad_dict_and_flat():
    c = make_case("cnn", n=5)
    P = sum(p.numel() for p in c.model.parameters())
    g = torch.randn(P, generator=torch.Generator().manual_seed(0))
    ref = reference(c.model, c.data, c.lik, "true", LAM, g)
    as_dict = fl.natural_gradient(c.model, c.data, c.lik, fl.results.split_flat(
        g, [n for n, _ in c.model.named_parameters()], {n: p.shape for n, p in c.model.named_parameters()}), LAM)
    for d in (as_dict, fl.natural_gradient(c.model, c.X, c.lik, g, LAM, solver="cg")):  # no labels needed
        assert isinstance(d, dict) and isinstance(d, NaturalDirection)
        assert_close(d.flat, ref, rtol=1e-8)
        assert d.loss is None and d.converged


def test_solver_auto(monkeypatch):
    c = make_case("mlp", n=5)
    assert fl.natural_gradient(c.model, c.data, c.lik).solver == "gram"
    monkeypatch.setattr(fl.natural, "GRAM_MAX", 10)  # N·K = 15 rows
    d = fl.natural_gradient(c.model, c.data, c.lik, damping=LAM)
    assert d.solver == "cg"
    assert_close(d.flat, reference(c.model, c.data, c.lik, "true", LAM, torch_grad(c.model, c.X, c.Y, c.lik)))
    monkeypatch.setattr(fl.natural, "GRAM_MAX", 4096)  # the Gram does not fit: cg
    assert fl.natural_gradient(c.model, c.data, c.lik, max_memory=100).solver == "cg"


def test_streamed_rows_recomputed(monkeypatch):
    """Rows too large to keep are recomputed chunk by chunk with the same sandwiches (mc labels drawn once); batches
    of a list stream like tensors."""
    c = make_case("mlp", n=9)
    batches = [(c.X[i : i + 4], c.Y[i : i + 4]) for i in range(0, 9, 4)]
    expect = {k: fl.natural_gradient(c.model, c.data, c.lik, damping=LAM, kind=k, solver="gram", **mc(k)).flat
              for k in ("true", "mc")}
    monkeypatch.setattr(core, "WORK_BUDGET", 2000)  # one input per chunk, rows not kept
    for k in ("true", "mc"):
        d = fl.natural_gradient(c.model, batches, c.lik, damping=LAM, kind=k, solver="gram", **mc(k))
        assert_close(d.flat, expect[k], rtol=1e-10, what=k)


def test_cg_reports_nonconvergence():
    c = make_case("mlp", n=30)
    d = fl.natural_gradient(c.model, c.data, c.lik, damping=1e-8, solver="cg", max_iter=3)
    assert d.iterations == 3 and not d.converged and d.residual > 1e-6
    F = fl.fisher_matrix(c.model, c.data, c.lik)
    g = torch_grad(c.model, c.X, c.Y, c.lik)
    true_res = ((F + 1e-8 * torch.eye(len(F))) @ d.flat - g).norm() / g.norm()
    assert math.isclose(d.residual, float(true_res), rel_tol=1e-6)


def test_bad_input():
    c = make_case("mlp", n=5)
    for lam in (0, -1e-3, math.nan, math.inf, True):
        raises(ValueError, "damping must be a positive", fl.natural_gradient, c.model, c.data, c.lik, damping=lam)
    raises(ValueError, "solver", fl.natural_gradient, c.model, c.data, c.lik, solver="qr")
    raises(ValueError, "shape \\(43,\\)", fl.natural_gradient, c.model, c.data, c.lik, torch.zeros(42))
    raises(ValueError, "missing \\['2.bias'\\]", fl.natural_gradient, c.model, c.data, c.lik,
           {n: p for n, p in c.model.named_parameters() if n != "2.bias"})
    raises(ValueError, "needs labels", fl.natural_gradient, c.model, c.X, c.lik)
    raises(TypeError, "one-shot iterator", fl.natural_gradient, c.model, iter([c.data]), c.lik)
    raises(ValueError, "solver='cg'", fl.natural_gradient, c.model, c.data, c.lik, solver="gram", max_memory=100)
    raises(ValueError, "max_iter", fl.natural_gradient, c.model, c.data, c.lik, solver="cg", max_iter=0)


# ----------------------------------------------------------------------------- the optimizer
def params_flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def test_step_is_theta_minus_lr_direction():
    c = make_case("mlp", n=8)
    lr = 0.3
    d = fl.natural_gradient(c.model, c.data, c.lik, damping=LAM)
    theta = params_flat(c.model)
    opt = fl.optim.NaturalGradient(c.model.parameters(), c.model, c.lik, lr=lr, damping=LAM)
    loss = opt.step(c.data)
    assert_close(params_flat(c.model), theta - lr * d.flat, rtol=1e-10)
    assert math.isclose(loss, d.loss) and opt.last["direction"].converged
    assert all(p.grad is None for p in c.model.parameters())


def test_step_uses_clipped_grad():
    """With .grad present (here clipped), the step solves with that gradient."""
    c = make_case("mlp", n=8)
    total, _ = torch_loss(c.lik, c.model(c.X), c.Y)
    (total / len(c.X)).backward()
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), 0.01)
    g = torch.cat([p.grad.reshape(-1) for p in c.model.parameters()]).clone()
    assert g.norm() <= 0.01 + 1e-12
    theta = params_flat(c.model)
    ref = reference(c.model, c.X, c.lik, "true", LAM, g)
    fl.optim.NaturalGradient(c.model.parameters(), c.model, c.lik, lr=0.5, damping=LAM).step(c.data)
    assert_close(params_flat(c.model), theta - 0.5 * ref, rtol=1e-10)


def test_momentum():
    c = make_case("mlp", n=8)
    lr, mu = 0.2, 0.9
    opt = fl.optim.NaturalGradient(c.model.parameters(), c.model, c.lik, lr=lr, damping=LAM, momentum=mu)
    theta0 = params_flat(c.model)
    d1 = fl.natural_gradient(c.model, c.data, c.lik, damping=LAM).flat
    opt.step(c.data)
    theta1 = params_flat(c.model)
    d2 = fl.natural_gradient(c.model, c.data, c.lik, damping=LAM).flat
    opt.step(c.data)
    assert_close(theta1, theta0 - lr * d1, rtol=1e-10)
    assert_close(params_flat(c.model), theta1 - lr * (mu * d1 + d2), rtol=1e-10)


def test_param_groups():
    """One joint solve over both groups (their coupling in F kept); each group moves by its own lr."""
    c = make_case("mlp", n=8)
    m = c.model
    d = fl.natural_gradient(m, c.data, c.lik, damping=LAM)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = fl.optim.NaturalGradient([{"params": m[0].parameters(), "lr": 0.1}, {"params": m[2].parameters()}],
                                   m, c.lik, lr=0.01, damping=LAM)
    opt.step(c.data)
    for n, p in m.named_parameters():
        lr = 0.1 if n.startswith("0.") else 0.01
        assert_close(p.detach(), before[n] - lr * d[n], rtol=1e-10, what=n)


def batches_of(c, k=3):
    return [(c.X[i::k], c.Y[i::k]) for i in range(k)]


def test_state_dict_round_trip():
    c = make_case("mlp", n=9)
    b = batches_of(c)
    kw = {"lr": 1.0, "damping": 1e-2, "momentum": 0.5, "adaptive_damping": True}
    model_b = copy.deepcopy(c.model)
    opt_a = fl.optim.NaturalGradient(c.model.parameters(), c.model, c.lik, **kw)
    for batch in b:
        opt_a.step(batch)
    opt_b = fl.optim.NaturalGradient(model_b.parameters(), model_b, c.lik, **kw)
    for batch in b[:2]:
        opt_b.step(batch)
    saved, weights = copy.deepcopy(opt_b.state_dict()), copy.deepcopy(model_b.state_dict())
    assert saved["natural"]["damping"] == opt_b.damping != 1e-2
    model_c = copy.deepcopy(c.model)
    model_c.load_state_dict(weights)
    opt_c = fl.optim.NaturalGradient(model_c.parameters(), model_c, c.lik, **kw)
    opt_c.load_state_dict(saved)
    assert opt_c.damping == opt_b.damping
    opt_c.step(b[2])
    assert_close(params_flat(model_c), params_flat(c.model), rtol=1e-12)
    assert opt_c.damping == opt_a.damping


def factor(rho: float) -> float:
    return 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)


def test_adaptive_damping_linear_gaussian():
    """A linear model with Gaussian outputs: the loss is exactly its quadratic model (F is the Hessian), so
    ρ = 1 for any step and λ shrinks by 2/3."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, Y = torch.randn(10, 3, generator=gen), torch.randn(10, 2, generator=gen)
    opt = fl.optim.NaturalGradient(model.parameters(), model, fl.Gaussian(0.8), lr=0.7, damping=0.1,
                                   adaptive_damping=True)
    opt.step((X, Y))
    assert math.isclose(opt.last["rho"], 1.0, rel_tol=1e-9)
    assert math.isclose(opt.damping, 0.1 * 2 / 3)


def test_adaptive_damping_overshoot():
    """A nonlinear model and a far too long step: the loss rises (ρ < 1/4), so λ grows by 3/2; the rule holds at
    every step."""
    c = make_case("gauss", n=8)
    init_(c.model, 3, std=2.0)
    opt = fl.optim.NaturalGradient(c.model.parameters(), c.model, c.lik, lr=30.0, damping=1e-3,
                                   adaptive_damping=True)
    opt.step(c.data)
    assert opt.last["rho"] < 0.25 and opt.last["loss_after"] > opt.last["loss_before"]
    assert math.isclose(opt.damping, 1.5e-3)
    opt.param_groups[0]["lr"] = 1.0
    for _ in range(3):
        lam = opt.damping
        opt.step(c.data)
        assert math.isclose(opt.damping, lam * factor(opt.last["rho"]))


def test_critical_lr():
    c = make_case("mlp", n=8)
    mu, lam = 0.5, 0.05
    lam_max = float(torch.linalg.eigvalsh(fl.fisher_matrix(c.model, c.data, c.lik))[-1])
    opt = fl.optim.NaturalGradient(c.model.parameters(), c.model, c.lik, lr="critical", damping=lam, momentum=mu,
                                   critical_fraction=0.5)
    opt.step(c.data)
    expect = 0.5 * 2 * (1 + mu) * (lam_max + lam) / lam_max
    assert math.isclose(opt.last["lr"][0], expect, rel_tol=1e-6)


def test_optimizer_bad_input():
    c = make_case("mlp", n=5)
    ps = list(c.model.parameters())
    raises(ValueError, "lr must be", fl.optim.NaturalGradient, ps, c.model, c.lik, lr=-1.0)
    raises(ValueError, "momentum", fl.optim.NaturalGradient, ps, c.model, c.lik, momentum=1.0)
    raises(ValueError, "damping", fl.optim.NaturalGradient, ps, c.model, c.lik, damping=0.0)
    raises(ValueError, "solver", fl.optim.NaturalGradient, ps, c.model, c.lik, solver="qr")
    raises(ValueError, "parameters of `model`", fl.optim.NaturalGradient, [nn.Parameter(torch.zeros(2))], c.model,
           c.lik)
    raises(TypeError, "needs the batch", fl.optim.NaturalGradient(ps, c.model, c.lik).step)


def test_dict_batch_language_model():
    """A dict batch (keyword inputs and labels) of a causal LM, normalised per kept prediction."""
    model, X, Y = lm_case(n=4)
    lik = fl.Categorical()
    d = fl.natural_gradient(model, (X, Y), lik, damping=0.1, reduction="per_prediction")
    theta = params_flat(model)
    opt = fl.optim.NaturalGradient(model.parameters(), model, lik, lr=0.2, damping=0.1, reduction="per_prediction")
    opt.step({"input_ids": X, "labels": Y})
    assert_close(params_flat(model), theta - 0.2 * d.flat, rtol=1e-9)
