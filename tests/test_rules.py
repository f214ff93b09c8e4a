"""The layer-rule registry: a new layer type is one class and one registry line, and a wrong rule is caught."""

from __future__ import annotations

import warnings

import pytest
import reference as ref
import torch
from helpers import assert_close
from torch import nn

import fisherlens as fl
from fisherlens._core import RULES, FunctionalModel, LayerRule, plan_for

pytestmark = pytest.mark.usefixtures("float64")


class Diagonal(nn.Module):
    """``y = a ⊙ w + b``: a layer type the library does not know."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.weight + self.bias


class DiagonalRule(LayerRule):
    """``G_kb,i = Σ_t g_kbti a_bti`` (weight), ``Σ_t g_kbti`` (bias)."""

    def rows(self, call, g, which):
        K, B = g.shape[:2]
        gr = g.reshape(K, B, -1, g.shape[-1])
        if which == "bias":
            return gr.sum(2)
        return (gr * call.a.reshape(B, -1, call.a.shape[-1])).sum(2)


class WrongRule(DiagonalRule):
    """Rows that sum to the right gradient but give each sample the batch mean: the proof must catch it."""

    def rows(self, call, g, which):
        r = super().rows(call, g, which)
        return r.mean(1, keepdim=True).expand_as(r)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Diagonal(4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


@pytest.fixture
def registered(request):
    RULES[Diagonal] = request.param()
    yield request.param
    del RULES[Diagonal]


@pytest.mark.parametrize("registered", [DiagonalRule], indirect=True)
def test_a_registered_rule_owns_its_layer_and_is_exact(registered):
    m = model()
    X = torch.randn(6, 3, dtype=torch.float64)
    assert "2.weight" in plan_for(FunctionalModel(m)).owned
    F = ref.true_fisher(m, X, ("categorical",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the rule is proven
        assert_close(fl.fisher_diag(m, X, fl.Categorical(), engine="layerwise"), F.diagonal(), what="diag")
        assert_close(fl.fisher_matrix(m, X, fl.Categorical(), engine="layerwise"), F, what="matrix")


@pytest.mark.parametrize("registered", [WrongRule], indirect=True)
def test_a_wrong_rule_is_caught_and_falls_back(registered):
    m = model()
    X = torch.randn(6, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="2.weight"):
        d = fl.fisher_diag(m, X, fl.Categorical())
    assert_close(d, ref.true_fisher(m, X, ("categorical",)).diagonal(), what="diag after fallback")


def test_unknown_layers_use_the_functional_engine():
    m = model()
    assert "2.weight" not in plan_for(FunctionalModel(m)).owned
