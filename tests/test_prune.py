"""fl.prune: Optimal-Brain-Damage (Fisher) and magnitude saliencies, exact-sparsity masks, and torch's pruning
reparametrisation.

References are independent of the library: the Fisher diagonals come from dense Fishers built one
``autograd.grad`` at a time (``reference.py``), the masks are checked by counting and by the ordering of the pruned
and kept saliencies, and the pruned forward is compared with a copy of the model whose weights were zeroed by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import reference as ref
import torch
from helpers import assert_close, bonferroni_z, raises
from torch import nn
from torch.nn.utils import parametrize
from zoo import small_cnn, tanh_mlp

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

SPEC = ("categorical",)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return tanh_mlp()


def data(model: nn.Module, n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 5, 5) if isinstance(model[0], nn.Conv2d) else (n, 4)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def obd_reference(model, X, Y, kind: str, names: list[str], forward_names: list[str]) -> dict[str, torch.Tensor]:
    """½ diag(F) θ² from the slow reference Fisher, keyed by the forward names (``names`` are the parameters')."""
    F = ref.fisher(model, X, Y, SPEC, kind, names)
    diags = ref.block_diags(F, model, names)
    out = {}
    for fwd, n in zip(forward_names, names, strict=True):
        prefix, _, attr = fwd.rpartition(".")
        theta = getattr(model.get_submodule(prefix), attr).detach()  # the effective weight the forward uses
        out[fwd] = 0.5 * diags[n] * theta**2
    return out


# ----------------------------------------------------------------------------- saliency
@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("build", [mlp, lambda: (torch.manual_seed(2), small_cnn())[1]], ids=["mlp", "cnn"])
def test_fisher_saliency_is_obd_of_the_reference_diagonal(build, kind):
    model = build()
    X, Y = data(model)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    sal = fl.prune.saliency(model, (X, Y), fl.Categorical(), "fisher", kind, batch_size=3)
    assert list(sal) == names  # default selection: the weight matrices / kernels, no biases
    expected = obd_reference(model, X, Y, kind, names, names)
    for n in names:
        assert_close(sal[n], expected[n], what=n)


def test_magnitude_and_squared_and_params():
    model = mlp()
    mag = fl.prune.saliency(model, criterion="magnitude")  # needs neither data nor likelihood
    sq = fl.prune.saliency(model, criterion="squared", params=["0"])
    assert list(mag) == ["0.weight", "2.weight"]
    assert list(sq) == ["0.weight", "0.bias"]  # a module prefix selects its bias too
    assert_close(mag["2.weight"], model[2].weight.detach().abs())
    assert_close(sq["0.bias"], model[0].bias.detach() ** 2)
    assert not mag["0.weight"].requires_grad
    mag["0.weight"].zero_()  # a copy, not a view of the parameter
    assert model[0].weight.abs().min() > 0


def test_hutchinson_saliency_is_unbiased():
    model = mlp(3)
    X, Y = data(model, n=6)
    names = ["0.weight", "2.weight"]
    exact = obd_reference(model, X, Y, "true", names, names)
    g = torch.Generator().manual_seed(0)
    est = fl.prune.saliency(model, (X, None), fl.Categorical(), method="hutchinson", samples=4000, generator=g)
    z = bonferroni_z(sum(v.numel() for v in exact.values()))
    for n in names:
        e = est[n]
        assert isinstance(e, fl.Estimate) and e.samples == 4000
        assert bool((e.stderr > 0).all())
        assert float(((e.value - exact[n]).abs() / e.stderr).max()) < z, n
    keep = fl.prune.masks(est, 0.5)  # Estimates rank by their value
    assert sum(int((~m).sum()) for m in keep.values()) == round(0.5 * 35)


# ----------------------------------------------------------------------------- masks
def random_saliency(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(5, 4, generator=g), "b": torch.rand(3, 5, generator=g) + 0.3,
            "c": torch.rand(7, generator=g)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 0.99])
def test_masks_hit_the_sparsity_exactly(sparsity):
    sal = random_saliency()
    n = sum(v.numel() for v in sal.values())
    glob = fl.prune.masks(sal, sparsity)
    assert sum(int((~m).sum()) for m in glob.values()) == round(sparsity * n)
    pruned = torch.cat([sal[k][~m] for k, m in glob.items()])
    kept = torch.cat([sal[k][m] for k, m in glob.items()])
    assert pruned.numel() == 0 or kept.numel() == 0 or pruned.max() <= kept.min()  # the least salient entries go
    layer = fl.prune.masks(sal, sparsity, scope="layer")
    for k, m in layer.items():
        assert m.dtype == torch.bool and m.shape == sal[k].shape
        assert int((~m).sum()) == round(sparsity * sal[k].numel())
        if (~m).any() and m.any():
            assert sal[k][~m].max() <= sal[k][m].min()


def test_global_and_layer_scopes_differ_as_expected():
    sal = {"small": 0.1 + torch.arange(10) * 1e-3, "large": 5.0 + torch.arange(10.0)}
    glob = fl.prune.masks(sal, 0.5)
    layer = fl.prune.masks(sal, 0.5, scope="layer")
    assert not glob["small"].any() and glob["large"].all()  # one ranking: the low-saliency tensor goes first
    assert int((~layer["small"]).sum()) == int((~layer["large"]).sum()) == 5
    assert torch.equal(layer["small"], torch.arange(10) >= 5)


def test_ties_are_broken_by_position():
    sal = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    keep = fl.prune.masks(sal, 0.7)  # 7 of 10 equal entries: all of a (first), then b[0]
    assert not keep["a"].any() and torch.equal(keep["b"], torch.tensor([False, True, True, True]))
    half = fl.prune.masks(sal, 0.5)  # 5: a in row-major order
    assert torch.equal(half["a"], torch.tensor([[False] * 3, [False, False, True]])) and half["b"].all()
    layer = fl.prune.masks(sal, 0.35, scope="layer")  # round(2.1) = 2 of a, round(1.4) = 1 of b
    assert torch.equal(layer["a"], torch.tensor([[False, False, True], [True] * 3]))
    assert torch.equal(layer["b"], torch.tensor([False, True, True, True]))
    assert all(torch.equal(keep[k], v) for k, v in fl.prune.masks(sal, 0.7).items())


# ----------------------------------------------------------------------------- apply
def test_apply_uses_torch_pruning_and_zeroes_exactly_the_pruned_entries():
    model = mlp()
    X, _ = data(model)
    original = copy.deepcopy(model)
    keep = fl.prune.masks(fl.prune.saliency(model, criterion="magnitude"), 0.4, scope="layer")
    assert fl.prune.apply(model, keep) is model
    names = [n for n, _ in model.named_parameters()]
    assert "0.weight_orig" in names and "2.weight_orig" in names and "0.weight" not in names
    for i in (0, 2):
        m = keep[f"{i}.weight"]
        assert torch.equal(model[i].weight_mask, m.to(model[i].weight.dtype))
        w, w0 = model[i].weight.detach(), original[i].weight.detach()
        assert bool((w[~m] == 0).all()) and torch.equal(w[m], w0[m]) and bool((w0 != 0).all())
        with torch.no_grad():
            original[i].weight.mul_(m)
    assert_close(model(X).detach(), original(X).detach(), what="forward with the masks")
    model(X).sum().backward()  # pruned entries get no gradient
    assert bool((model[0].weight_orig.grad[~keep["0.weight"]] == 0).all())


def test_remove_leaves_plain_parameters():
    model = mlp()
    X, _ = data(model)
    keep = fl.prune.prune(model, None, None, 0.5, criterion="magnitude", remove=True)
    # torch re-registers the weight after the bias: same names, another named_parameters() order
    assert sorted(n for n, _ in model.named_parameters()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert isinstance(model[0].weight, nn.Parameter)
    assert int((model[0].weight == 0).sum()) + int((model[2].weight == 0).sum()) == round(0.5 * 35)
    assert bool((model[2].weight[~keep["2.weight"]] == 0).all())
    model(X)


def test_prune_one_call_equals_saliency_then_masks():
    model = mlp(4)
    X, Y = data(model)
    lik = fl.Categorical()
    expected = fl.prune.masks(fl.prune.saliency(model, (X, Y), lik, kind="empirical"), 0.3)
    keep = fl.prune.prune(model, (X, Y), lik, 0.3, kind="empirical")
    assert list(keep) == list(expected) and all(torch.equal(keep[k], expected[k]) for k in keep)
    assert torch.equal(model[0].weight_mask.bool(), keep["0.weight"])


def test_pruning_again_sees_the_effective_weights():
    """A pruned tensor keeps its forward name; its saliency is that of weight_orig ⊙ mask (its Fisher too), so a
    second round to a higher sparsity counts the entries pruned before and the masks combine."""
    model = mlp(5)
    X, _ = data(model)
    first = fl.prune.prune(model, (X, None), fl.Categorical(), 0.3)
    sal = fl.prune.saliency(model, (X, None), fl.Categorical())
    assert list(sal) == ["0.weight", "2.weight"]
    expected = obd_reference(model, X, None, "true", ["0.weight_orig", "2.weight_orig"],
                             ["0.weight", "2.weight"])
    for n in sal:
        assert_close(sal[n], expected[n], what=n)
        assert bool((sal[n][~first[n]] == 0).all())
    second = fl.prune.prune(model, (X, None), fl.Categorical(), 0.6)
    for n in second:  # the second mask contains the first's pruned entries
        assert not bool((second[n] & ~first[n]).any())
    pruned = sum(int((model.get_submodule(n[0]).weight_mask == 0).sum()) for n in second)
    assert pruned == round(0.6 * 35)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_sparsity_outside_the_unit_interval_is_refused(sparsity):
    raises(ValueError, r"sparsity must be in \[0, 1\)", fl.prune.masks, random_saliency(), sparsity)
    model = mlp()  # refused before any Fisher is computed (data=None would fail later)
    raises(ValueError, "sparsity", fl.prune.prune, model, None, None, sparsity)
    assert "0.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("sparsity", ["0.5", True, None])
def test_sparsity_must_be_a_number(sparsity):
    raises(TypeError, "sparsity must be a number", fl.prune.masks, random_saliency(), sparsity)


def test_unknown_choices_and_missing_inputs_are_refused():
    model = mlp()
    raises(ValueError, "criterion='obd' is not supported", fl.prune.saliency, model, criterion="obd")
    raises(ValueError, "scope='model' is not supported", fl.prune.masks, random_saliency(), 0.5, "model")
    raises(ValueError, "scope='model'", fl.prune.prune, model, None, None, 0.5, "magnitude", "model")
    raises(ValueError, "needs data and a likelihood", fl.prune.saliency, model)
    raises(ValueError, "neither a parameter nor a module", fl.prune.saliency, model, criterion="magnitude",
           params=["3.weight"])
    raises(ValueError, "no weight matrix", fl.prune.saliency, nn.Sequential(nn.LayerNorm(3)), criterion="magnitude")
    raises(TypeError, "torch.nn.Module", fl.prune.saliency, lambda x: x, criterion="magnitude")


def test_bad_saliencies_are_refused():
    raises(ValueError, "non-empty dict", fl.prune.masks, {}, 0.5)
    raises(ValueError, "NaN or inf", fl.prune.masks, {"a": torch.tensor([1.0, math.nan])}, 0.5)
    raises(TypeError, "real tensor", fl.prune.masks, {"a": [1.0, 2.0]}, 0.5)


def test_bad_masks_are_refused_before_the_model_changes():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    good = torch.ones(5, 4, dtype=torch.bool)
    cases = [
        ({"0.weight": good, "2.weight": torch.ones(5, 3, dtype=torch.bool)}, ValueError, r"shape \(5, 3\).*\(3, 5\)"),
        ({"0.weight": good, "1.running_mean": torch.ones(5, dtype=torch.bool)}, ValueError, "not a parameter"),
        ({"0.weight": good, "9.weight": good}, ValueError, "not a parameter of a module"),
        ({"0.weight": torch.full((5, 4), 0.5)}, ValueError, "boolean"),
        ({"0.weight": [[True] * 4] * 5}, TypeError, "must be a tensor"),
        ({}, ValueError, "non-empty"),
    ]
    for masks, exc, match in cases:
        raises(exc, match, fl.prune.apply, model, masks)
        assert [n for n, _ in model.named_parameters()][:2] == ["0.weight", "0.bias"]  # untouched
    fl.prune.apply(model, {"0.weight": torch.ones(5, 4)})  # 0/1 floats are fine


def test_parametrised_weights_are_not_leaf_parameters():
    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    model = nn.Sequential(nn.Linear(3, 3))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    raises(ValueError, "not a parameter of a module", fl.prune.apply, model,
           {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
