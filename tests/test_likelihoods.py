"""Output models and seed losses against their textbook formulas, the KL self-test
``sqrt(2 KL(p_θ ‖ p_{θ+dθ}) / dθᵀ F dθ) → 1`` (seed 002 eqs 4.1–4.2), and a Gaussian σ whose 1/σ² must fit the
dtype (refused, never inf)."""

from __future__ import annotations

import copy
import math

import pytest
import reference as ref
import torch
from helpers import assert_close, raises
from zoo import LIKS, build, logcosh, targets

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")


def _logits(n=6, C=3, seed=0, scale=2.0):
    return scale * torch.randn(n, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("lik", "C"), [("gaussian", 3), ("gaussian", 1), ("categorical", 4),
                                        ("categorical", 2), ("bernoulli", 1)])
def test_output_fisher_and_square_root(lik, C):
    f = _logits(C=C)
    L = LIKS[lik].make()
    S = L.sqrt_fisher(f)
    Lam = L.fisher_out(f)
    assert S.shape[:2] == (6, C) and Lam.shape == (6, C, C)
    for n in range(len(f)):
        expected = ref.output_fisher(LIKS[lik].spec, f[n])
        assert_close(S[n] @ S[n].T, expected, what=f"S Sᵀ {lik}")
        assert_close(Lam[n], expected, what=f"Λ {lik}")


@pytest.mark.parametrize("lik", list(LIKS))
def test_losses_and_residuals(lik):
    C = 1 if lik == "bernoulli" else 3
    f = _logits(C=C, seed=1)
    y = targets(lik, len(f), C, seed=1)
    L = LIKS[lik].make()
    spec = LIKS[lik].spec
    yy = L.check_targets(f, y)
    loss = L.loss(f, yy)
    r = L.residual(f, yy)
    for n in range(len(f)):
        expected = ref.nll(spec, f[n], y[n])
        if lik != "gaussian":  # the Gaussian loss is the NLL up to a constant (tested below)
            assert_close(loss[n], expected, what=f"loss {lik}")
        assert_close(r[n], ref.residual(spec, f[n], y[n]), what=f"residual {lik}")


def test_gaussian_loss_is_nll_up_to_constant():
    f, y = _logits(seed=2), _logits(seed=3)
    L = fl.Gaussian(0.7)
    d = L.loss(f, y) - torch.stack([ref.nll(("gaussian", 0.7), f[n], y[n]) for n in range(6)])
    assert_close(d, torch.full((6,), float(d[0])), what="constant offset")


def test_seed_losses_values():
    f, y = _logits(seed=4), _logits(seed=5)
    for p in (1, 2, 3, 4):
        got = fl.losses.lp_norm(p)(f, y)
        assert_close(got, ((f - y).abs() ** p).sum(-1) ** (1 / p), what=f"lp {p}")
    for n in (1, 2, 3, 4):
        got = fl.losses.mean_power(n)(f, y)
        assert_close(got, ((f - y) ** n).sum(-1) / 3, what=f"mean power {n}")
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    got = fl.losses.softmax_cross_entropy()(f, labels)
    expected = torch.stack([-(f[i, labels[i]] - torch.logsumexp(f[i], 0)) for i in range(6)])
    assert_close(got, expected, what="softmax CE")
    # no overflow for huge logits (log-softmax, never log(softmax))
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert torch.isfinite(fl.losses.softmax_cross_entropy()(big, torch.tensor([2]))).all()
    assert torch.isfinite(fl.Categorical().loss(big, torch.tensor([2]))).all()


@pytest.mark.parametrize("lik", ["gaussian", "categorical", "bernoulli"])
def test_kl_matches_textbook(lik):
    C = 1 if lik == "bernoulli" else 3
    f, g = _logits(C=C, seed=6), _logits(C=C, seed=7)
    got = LIKS[lik].make().kl(f, g)
    expected = torch.stack([ref.kl(LIKS[lik].spec, f[n], g[n]) for n in range(len(f))])
    assert_close(got, expected, what=f"kl {lik}")
    assert (got >= 0).all()
    assert_close(LIKS[lik].make().kl(f, f), torch.zeros(len(f)), what="kl(f, f)")


def _perturbed(model, dtheta):
    other = copy.deepcopy(model)
    i = 0
    with torch.no_grad():
        for p in other.parameters():
            p.add_(dtheta[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
    return other


@pytest.mark.parametrize(("arch", "lik"), [("mlp_tanh", "gaussian"), ("cnn2d", "gaussian"),
                                           ("mlp_sigmoid", "categorical"),
                                           ("batchnorm", "categorical"),
                                           ("one_output", "bernoulli"),
                                           ("one_output", "gaussian")])
def test_kl_self_test(arch, lik):
    model, X = build(arch, seed=8)
    L = LIKS[lik].make()
    F = fl.fisher_matrix(model, (X, None), L, "true")
    P = F.shape[0]
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        dtheta = 1e-4 * torch.randn(P, generator=gen)
        other = _perturbed(model, dtheta)
        with torch.no_grad():
            f, g = model(X).reshape(len(X), -1), other(X).reshape(len(X), -1)
        kl = L.kl(f, g).mean()
        quad = dtheta @ F @ dtheta
        ratio = torch.sqrt(2 * kl / quad)
        assert abs(float(ratio) - 1) < 1e-3, f"{arch}/{lik}: ratio {float(ratio)}"
        kl_ref = sum(ref.kl(LIKS[lik].spec, f[n], g[n]) for n in range(len(X))) / len(X)
        assert abs(float(torch.sqrt(2 * kl_ref / quad)) - 1) < 1e-3


def test_kl_self_test_detects_wrong_scale():
    """The KL test can fail: a Fisher for the wrong σ gives a ratio far from 1."""
    model, X = build("mlp_tanh", seed=8)
    F_wrong = fl.fisher_matrix(model, (X, None), fl.Gaussian(1.0))
    dtheta = 1e-4 * torch.randn(F_wrong.shape[0], generator=torch.Generator().manual_seed(1))
    other = _perturbed(model, dtheta)
    with torch.no_grad():
        kl = fl.Gaussian(0.5).kl(model(X), other(X)).mean()
    assert abs(float(torch.sqrt(2 * kl / (dtheta @ F_wrong @ dtheta))) - 2.0) < 1e-3


def test_sampling_distributions():
    f = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    s = fl.Categorical().sample(f, 20000, g)
    assert s.shape == (20000, 2) and s.dtype == torch.long
    freq = torch.stack([(s == c).double().mean(0) for c in range(3)], -1)
    assert torch.allclose(freq, torch.softmax(f, -1), atol=0.015)
    b = fl.Bernoulli().sample(torch.tensor([[1.0], [-2.0]]), 20000, g)
    assert b.shape == (20000, 2, 1)
    assert torch.allclose(b.mean(0)[:, 0], torch.sigmoid(torch.tensor([1.0, -2.0])), atol=0.015)
    z = fl.Gaussian(0.5).sample(f, 20000, g)
    assert z.shape == (20000, 2, 3)
    assert torch.allclose(z.mean(0), f, atol=0.02)
    assert torch.allclose(z.std(0), torch.full_like(f, 0.5), atol=0.02)


def test_custom_loss_callable_is_used():
    model, X = build("mlp_relu", seed=3)
    Y = targets("custom", len(X), 3)
    got = fl.fisher_matrix(model, (X, Y), fl.LossInduced(logcosh), "empirical")
    expected = ref.empirical_fisher(model, X, Y, ("custom", logcosh))
    assert_close(got, expected, what="custom")
    other = ref.empirical_fisher(model, X, Y, ("lp", 2.0))
    assert not torch.allclose(got, other)


# ----------------------------------------------------------------------------- Gaussian sigma vs dtype
@pytest.fixture
def mlp():
    model, X = build("mlp_relu", seed=60)
    return model, X


def test_gaussian_sigma_must_fit_the_dtype(mlp):
    model, X = mlp
    model32, X32 = model.float(), X.float()
    y32 = torch.randn(len(X), 3, dtype=torch.float32)
    for sigma in (1e-30, 1e-21, 1e-19 / 2):  # 1/σ² overflows float32 or σ² is a denormal (limit 1.08e-19)
        for kind in ("true", "empirical", "mc"):
            raises(ValueError, r"1/sigma² overflows to inf .* in torch\.float32", fl.fisher_trace, model32,
                   (X32, y32), fl.Gaussian(sigma), kind)
    raises(ValueError, r"underflows to 0 .* in torch\.float32", fl.fisher_trace, model32, (X32, y32),
           fl.Gaussian(1e20))
    # float64 cannot hold 1/σ² either: refused at construction
    raises(ValueError, r"overflows to inf .* in torch\.float64", fl.Gaussian, 1e-160)
    raises(ValueError, r"sigma must be a positive finite number", fl.Gaussian, -0.0)
    raises(TypeError, r"sigma", fl.Gaussian, "small")


def test_small_gaussian_sigma_in_float32_that_fits_is_right(mlp):
    """A small σ whose σ² and 1/σ² fit float32 gives the scaled Fisher (true: 1/σ², empirical: 1/σ⁴)."""
    model, X = mlp
    y = torch.randn(len(X), 3)
    ref = {k: fl.fisher_trace(model, (X, y), fl.Gaussian(1.0), k) for k in ("true", "empirical")}
    model32, X32, y32 = model.float(), X.float(), y.float()
    for kind, sigma, scale in (("true", 1e-15, 1e30), ("empirical", 1e-8, 1e32)):
        got = fl.fisher_trace(model32, (X32, y32), fl.Gaussian(sigma), kind)
        assert math.isfinite(got)
        assert got == pytest.approx(ref[kind] * scale, rel=1e-4), kind
