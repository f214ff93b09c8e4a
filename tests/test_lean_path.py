"""The lean path of the one-backward estimators (issue: the estimator at the cost of one backward).

* The plain-autograd forward runs the model as itself (:attr:`FunctionalModel.direct`) only when that cannot
  change the gradients read: a gradient hook on a selected parameter, or a selected tensor that does not require
  grad, sends the call through detached copies; both routes give the same draws, and neither touches ``.grad``.
* Finiteness costs one sum of the outputs and one of the result: a NaN parameter or input is still named, also
  when it poisons a gradient without reaching the outputs.
* The packed layout (one flat ``(s, P)`` buffer) gives the same values as the per-parameter views, for one draw
  and many, per parameter and in total.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fisherlens as fl
from fisherlens._core import FunctionalModel

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(DT).eval()


def _data(seed: int = 1, n: int = 11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g)


def _draw(model, data, samples: int = 1, seed: int = 5, **kw):
    g = torch.Generator().manual_seed(seed)
    return fl.fisher_diag(model, data, fl.Categorical(), method="hutchinson", samples=samples, generator=g, **kw)


def test_direct_only_when_it_cannot_change_the_gradients():
    model = _mlp()
    assert FunctionalModel(model).direct
    model[0].weight.register_hook(lambda g: 2 * g)
    assert not FunctionalModel(model).direct
    frozen = _mlp()
    frozen[2].bias.requires_grad_(False)
    assert not FunctionalModel(frozen, params=["2.bias", "0.weight"]).direct
    assert FunctionalModel(frozen).direct  # the default selection leaves the frozen bias out


@pytest.mark.parametrize("samples", [1, 3])
def test_hooked_parameters_take_the_detached_route(samples):
    """A gradient hook that doubles the gradient must not reach the Fisher: the hooked model gives the draws of
    the plain one (the hook would have quadrupled the first layer's squares)."""
    data = _data()
    plain = _draw(_mlp(), data, samples)
    hooked = _mlp()
    hooked[0].weight.register_hook(lambda g: 2 * g)
    assert torch.allclose(_draw(hooked, data, samples).value, plain.value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("samples", [1, 3])
def test_grads_and_parameters_untouched(samples):
    model, data = _mlp(), _data()
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    _draw(model, data, samples)
    for p, g, q in zip(model.parameters(), grads, params, strict=True):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), q)


def test_a_frozen_selected_parameter_is_still_differentiated():
    """``params=`` may name a tensor that does not require grad: the detached route differentiates it."""
    model, data = _mlp(), _data()
    want = _draw(model, data, params=["2.bias"]).value
    model[2].bias.requires_grad_(False)
    assert torch.allclose(_draw(model, data, params=["2.bias"]).value, want, rtol=1e-12, atol=0)


class PoisonedGradient(nn.Module):
    """``where(True, h, h·w)``: the output never sees ``w``, but ``∂/∂h`` of the dropped branch is ``0·w``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = self.lin(x)
        return torch.where(torch.ones_like(h, dtype=torch.bool), h, h * self.w)


@pytest.mark.parametrize("samples", [1, 4])
def test_nan_parameter_that_only_poisons_a_gradient_is_named(samples):
    torch.manual_seed(0)
    model = PoisonedGradient().to(DT).eval()
    data = _data()
    assert torch.isfinite(_draw(model, data, samples).value).all()
    with torch.no_grad():
        model.w[1] = math.nan
    assert torch.isfinite(model(data[0])).all()  # the outputs stay finite
    with pytest.raises(ValueError, match=r"Parameter 'w' contains NaN or inf"):
        _draw(model, data, samples)
    with pytest.raises(ValueError, match=r"Parameter 'w' contains NaN or inf"):
        fl.fisher_diag(model, data, fl.Categorical())  # the exact route checks its result the same way


@pytest.mark.parametrize("method", ["hutchinson", "mc"])
def test_nan_parameter_and_input_named_by_the_estimators(method):
    model, (X, y) = _mlp(), _data()
    bad = X.clone()
    bad[3, 2] = math.inf
    with pytest.raises(ValueError, match="The inputs contain NaN or inf"):
        fl.fisher_trace(model, (bad, y), fl.Categorical(), method=method)
    with torch.no_grad():
        model[2].weight[1, 1] = math.nan
    with pytest.raises(ValueError, match=r"Parameter '2.weight' contains NaN or inf"):
        fl.fisher_trace(model, (X, y), fl.Categorical(), method=method)


@pytest.mark.parametrize("samples", [1, 5])
@pytest.mark.parametrize("per_sample", [False, True])
def test_packed_layout_matches_per_parameter_results(samples, per_sample):
    """Total and per-parameter estimates are the same numbers (the flat diagonal in named_parameters order),
    and the trace is the sum of the diagonal draw by draw."""
    model, data = _mlp(), _data()
    total = _draw(model, data, samples, per_sample=per_sample)
    g = torch.Generator().manual_seed(5)
    blocks = fl.fisher_blocks(model, data, fl.Categorical(), what="diag", method="hutchinson", samples=samples,
                              generator=g, per_sample=per_sample)
    flat = torch.cat([blocks[n].value.reshape(-1) for n, _ in model.named_parameters()])
    assert torch.allclose(flat, total.value, rtol=1e-12, atol=0)
    if samples > 1:
        err = torch.cat([blocks[n].stderr.reshape(-1) for n, _ in model.named_parameters()])
        assert torch.allclose(err, total.stderr, rtol=1e-12, atol=0)
    else:
        assert torch.isnan(total.stderr).all()
    g = torch.Generator().manual_seed(5)
    tr = fl.fisher_trace(model, data, fl.Categorical(), method="hutchinson", samples=samples, generator=g,
                         per_sample=per_sample)
    assert math.isclose(float(tr), float(total.value.sum()), rel_tol=1e-12)


def test_positions_counts_every_prediction():
    lik = fl.Categorical()
    f = torch.zeros(3, 4, 6)  # 3 inputs, 4 positions, 6 classes
    y = torch.tensor([[0, 1, -100, 2], [1, 1, 1, 1], [-100, -100, 0, 0]])
    assert lik.positions(f) == 12 and lik.count(f, y) == 9 and lik.count(f) == 12
    assert fl.Categorical(channels="first").positions(torch.zeros(2, 6, 5, 5)) == 50
    assert fl.Gaussian().positions(torch.zeros(7, 3)) == 7
