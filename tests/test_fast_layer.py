"""One fast-path call per layer (:meth:`LayerRule.fast_layer`): a layer's weight and bias share the output gradients'
squares and norms, and the numbers are those of one :meth:`LayerRule.fast_stats` per parameter — bit for bit for
flat-input Linear / Conv1D, and in float64 on every architecture of the zoo through the engine.  Also the Monitor's
empirical batch trace, which now keeps the caller's output gradients by one tensor hook per layer: the last
backward through the graph counts, as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import owned_calls
from torch import nn
from transformers.pytorch_utils import Conv1D
from zoo import ARCHS, build

import fisherlens as fl
from fisherlens._core import Call, Stats, layer_stats, rule_for, tap_grads

pytestmark = pytest.mark.usefixtures("float64")

ALL = {"diag", "diagk", "sqnorm", "gram"}


def _call(m: nn.Module, a: torch.Tensor, K: int = 3):
    with torch.no_grad():
        out = m(a)
    return Call(m, a, out), torch.randn(K, *out.shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("want", [ALL, {"diag"}, {"sqnorm"}, {"gram", "diagk"}])
@pytest.mark.parametrize("layer,shape", [(nn.Linear(4, 5), (6, 4)), (nn.Linear(4, 5), (6, 3, 4)),
                                         (Conv1D(5, 4), (6, 4)), (Conv1D(5, 4), (6, 2, 4)),
                                         (nn.Conv2d(2, 3, 3), (6, 2, 5, 5))])
def test_fast_layer_equals_one_fast_stats_per_parameter(layer, shape, want):
    """Weight and bias from one call: the same tensors as two separate calls (flat inputs: bit for bit)."""
    layer = layer.double()
    rule = rule_for(layer)
    call, g = _call(layer, torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    both = rule.fast_layer(call, g, ("weight", "bias"), want)
    assert set(both) == {"weight", "bias"}
    for which in ("weight", "bias"):
        one = rule.fast_stats(call, g, which, want)
        assert set(both[which]) == set(one) == want
        for s in want:
            if len(shape) == 2:
                assert torch.equal(both[which][s], one[s]), (which, s)
            else:
                torch.testing.assert_close(both[which][s], one[s], rtol=1e-14, atol=0, msg=f"{which} {s}")


@pytest.mark.parametrize("layer", [nn.Linear(4, 5), Conv1D(5, 4)])
def test_fast_layer_in_place_equals_add_diag(layer):
    """With buffers, weight and bias diagonals are added in place from one shared ``Σ_k g_k²``; nothing returned."""
    layer = layer.double()
    rule = rule_for(layer)
    call, g = _call(layer, torch.randn(6, 4, generator=torch.Generator().manual_seed(2)))
    into = {w: torch.full_like(getattr(layer, w), 0.5) for w in ("weight", "bias")}
    assert rule.fast_layer(call, g, ("weight", "bias"), {"diag"}, into) == {"weight": {}, "bias": {}}
    for w in ("weight", "bias"):
        ref = torch.full_like(getattr(layer, w), 0.5)
        assert rule.add_diag(call, g, w, ref)
        torch.testing.assert_close(into[w], ref, rtol=1e-14, atol=0, msg=w)


def _per_parameter(fm, plan, calls, grads, want, K):
    """The engine's statistics computed the obvious way: one parameter at a time, rows where no fast path holds."""
    st = Stats()
    for n, (which, mods) in plan.owned.items():
        idx = [i for i, c in enumerate(calls) if any(c.module is m for m in mods)]
        sub = [calls[i] for i in idx]
        rule = rule_for(mods[0])
        if not idx:
            st.add_rows(n, fm.params[n].new_zeros(len(calls[0].a), K, fm.sizes[n]), want, fm.shapes[n])
        elif rule.fast(sub):
            st.add(n, rule.fast_stats(sub[0], grads[idx[0]], which, want))
        else:
            r = sum(rule_for(c.module).rows(c, grads[i], which) for c, i in zip(sub, idx, strict=True))
            st.add_rows(n, r.transpose(0, 1), want, fm.shapes[n])
    return st


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layer_stats_by_layer_equals_per_parameter(arch):
    """Every architecture of the zoo (shared, unused and sequence layers included): the layer-by-layer engine gives
    each owned parameter the statistics of the per-parameter computation."""
    model, X = build(arch, n=5)
    fm, plan, calls, f = owned_calls(model, X)
    if not plan.owned:
        pytest.skip("no layer with a rule")
    V = torch.randn(len(X), f.shape[1], 2, generator=torch.Generator().manual_seed(3))
    grads = tap_grads(calls, f, V, retain_graph=True)
    ref = _per_parameter(fm, plan, calls, grads, ALL, 2)
    st = Stats()
    layer_stats(fm, plan, calls, list(grads), ALL, st, len(X), 2)
    for s in ("diag", "diagk", "sqnorm"):
        assert set(getattr(st, s)) == set(plan.owned)
        for n in plan.owned:
            torch.testing.assert_close(getattr(st, s)[n], getattr(ref, s)[n], rtol=1e-12, atol=1e-14, msg=f"{n} {s}")
    torch.testing.assert_close(st.gram, ref.gram, rtol=1e-12, atol=1e-14)


def test_batch_empirical_counts_the_last_backward():
    """Two backward passes through the training graph: the trace is that of the last one (the δ of ``loss``, not
    of ``2·loss``, nor their sum), as with torch's multi-gradient hook before."""
    model, X = build("mlp_relu", n=12)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(4))
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, (X[:4], y[:4]), observables=("batch_fisher_trace",), kind="empirical")
    want = float(fl.fisher_trace(model, (X, y), lik, "empirical"))
    out = model(X)
    loss = F.cross_entropy(out, y)
    (2 * loss).backward(retain_graph=True)
    model.zero_grad()
    loss.backward()
    got = mon.step(loss=loss, targets=y)["batch_fisher_trace"]
    assert got == pytest.approx(want, rel=1e-10)
    mon.close()


@pytest.mark.parametrize("arch", ["cnn2d", "cnn2d_fancy", "conv1d"])
def test_column_groups_unfold_each_convolution_once(arch, monkeypatch):
    """Sandwich columns in groups (forced: one column a time) keep each convolution's patches across the groups —
    one unfold per call, not one per group — and the diagonal and trace equal the one-group results."""
    from fisherlens._core import engine
    from fisherlens._core.layerwise.rules import ConvRule

    model, X = build(arch, n=6)
    lik = fl.Categorical()
    want_d, want_t = fl.fisher_diag(model, X, lik), fl.fisher_trace(model, X, lik)
    n_conv = sum(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())
    unfolds = []
    real = ConvRule.patches
    monkeypatch.setattr(ConvRule, "patches", staticmethod(lambda m, a: unfolds.append(m) or real(m, a)))
    monkeypatch.setattr(engine, "column_chunk", lambda *a: 1)
    got_d = fl.fisher_diag(model, X, lik)
    assert len(unfolds) == n_conv > 0
    torch.testing.assert_close(got_d, want_d, rtol=1e-12, atol=1e-15)
    assert fl.fisher_trace(model, X, lik) == pytest.approx(want_t, rel=1e-12)
