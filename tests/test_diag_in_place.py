"""The exact diagonal summed in place, layer by layer (issue: the estimator at the cost of one backward, the exact
diagonal's memory ≤ BackPACK's).

:func:`fisherlens.fisher_diag` adds each layer's diagonal into one flat buffer (:class:`~fisherlens._core.DiagSum`)
as it is computed — for a flat-input Linear (and Hugging Face's Conv1D) by one in-place matrix product
(:meth:`LayerRule.add_diag`) — and releases each layer's output gradients after its last parameter.  The numbers must
equal the returned-statistics path in float64 on every architecture, and the pass must hold one P-vector, not two.
"""

from __future__ import annotations

import pytest
import torch
from helpers import owned_calls
from torch import nn
from transformers.pytorch_utils import Conv1D
from zoo import ARCHS, build

import fisherlens as fl
from fisherlens._core import Call, DiagSum, Stats, layer_stats, rule_for, tap_grads
from fisherlens._core.stats import square_sum


@pytest.mark.parametrize("K", [1, 3, 16, 17, 40])
def test_square_sum_is_the_sum_of_squares(K):
    g = torch.randn(K, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(K))
    torch.testing.assert_close(square_sum(g), g.square().sum(0), rtol=1e-14, atol=0)


def _capture(model, X):
    """Owned-layer calls, flat outputs and the (K = C) identity-sandwich output gradients of one forward."""
    fm, plan, calls, f = owned_calls(model, X)
    V = torch.eye(f.shape[1], dtype=f.dtype).expand(len(X), -1, -1)
    return fm, plan, calls, f, V


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layer_stats_into_a_diag_sum_equals_the_returned_diagonal(arch):
    """Every architecture of the zoo (fast paths, rows, shared and unused layers): the in-place sum equals the
    per-parameter statistics, nothing is left in ``stats.diag``, and every output gradient is released."""
    model, X = build(arch, n=5)
    fm, plan, calls, f, V = _capture(model, X)
    if not plan.owned:
        pytest.skip("no layer with a rule")
    B, K = V.shape[0], V.shape[-1]
    ref = Stats()
    layer_stats(fm, plan, calls, tap_grads(calls, f, V, retain_graph=True), {"diag"}, ref, B, K)
    into = DiagSum(fm)
    st, grads = Stats(into), tap_grads(calls, f, V)
    layer_stats(fm, plan, calls, grads, {"diag"}, st, B, K)
    assert st.diag == {} and all(g is None for g in grads)
    for n in plan.owned:
        torch.testing.assert_close(into.view(n), ref.diag[n], rtol=1e-13, atol=1e-15, msg=n)


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_add_diag_of_a_flat_input_layer(layer):
    """``Linear`` (O, I) and Hugging Face ``Conv1D`` (weight stored (I, O)) on flat inputs: one in-place product
    equal to the rule's fast diag, and the bias's; sequence inputs are left to the returned statistics."""
    torch.manual_seed(3)
    m = (nn.Linear(6, 4) if layer == "linear" else Conv1D(4, 6)).double()
    rule = rule_for(m)
    for a, expect in ((torch.randn(5, 6, dtype=torch.float64), True),
                      (torch.randn(5, 2, 6, dtype=torch.float64), False)):
        out = m(a)
        call = Call(m, a, out)
        g = torch.randn(3, *out.shape, dtype=torch.float64)
        into = torch.full_like(m.weight, 0.5)
        assert rule.add_diag(call, g, "weight", into) is expect
        if expect:
            torch.testing.assert_close(into - 0.5, rule.fast_stats(call, g, "weight", {"diag"})["diag"],
                                       rtol=1e-13, atol=1e-15)
        else:
            assert torch.equal(into, torch.full_like(m.weight, 0.5))
        bias = torch.zeros_like(m.bias)
        assert rule.add_diag(call, g, "bias", bias) is expect
        if expect:
            torch.testing.assert_close(bias, rule.fast_stats(call, g, "bias", {"diag"})["diag"], rtol=1e-13, atol=0)


def _tensor_peak(fn) -> int:
    """Most tensor bytes live at once during ``fn()`` above the level before (torch's CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def test_the_exact_diagonal_holds_one_parameter_vector():
    """A model whose P-vector dwarfs its activations and output gradients: the pass's tensor peak stays near one
    P-vector (summing the batch's per-parameter diagonals and then copying them held two)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 400), nn.Tanh(), nn.Linear(400, 400), nn.Tanh(), nn.Linear(400, 4))
    X = torch.randn(8, 200)
    P = sum(p.numel() for p in model.parameters())

    def run():
        fl.fisher_diag(model, X, fl.Categorical())

    run()
    peak = _tensor_peak(run)
    assert peak < 1.5 * 4 * P, f"tensor peak {peak / 4 / P:.2f} P-vectors"
