"""The exact layerwise statistics a few sandwich columns at a time (issue: the estimator at the cost of one
backward, the exact diagonal's memory).

When one backward of all K columns would hold more output gradients than a share of the work budget, the columns
are back-propagated in groups through the retained graph (:func:`fisherlens._core.engine.column_chunk`).  Forced
here with a tiny budget share: the diagonal, the traces, the per-sample estimator's per-draw squares and the
per-parameter traces must equal the one-group results in float64, on dense, convolutional, sequence and shared
layers, and the grouping must actually happen (or not, where the statistics or the attribution check forbid it).
"""

from __future__ import annotations

import pytest
import torch
from zoo import build

import fisherlens as fl
from fisherlens._core import engine

ARCHS = ["mlp_tanh", "cnn2d", "cnn2d_fancy", "conv1d", "seq3d", "shared_twice", "embedding"]


@pytest.fixture
def groups(monkeypatch):
    """Record each call's ``(K, k)``; ``force(share)`` sets the budget share (a huge share: one column a time)."""
    seen = []
    real = engine.column_chunk

    def spy(fm, sig, want, calls, V):
        k = real(fm, sig, want, calls, V)
        seen.append((V.shape[-1], k))
        return k

    monkeypatch.setattr(engine, "column_chunk", spy)

    def force(share: int):
        monkeypatch.setattr(engine, "COLUMN_SHARE", share)

    return seen, force


def _calls(model, X):
    lik = fl.Categorical()
    g = torch.Generator().manual_seed(4)
    return {
        "diag": fl.fisher_diag(model, X, lik, batch_size=4),
        "trace": torch.tensor(fl.fisher_trace(model, X, lik, batch_size=4)),
        "blocks": torch.tensor(list(fl.fisher_blocks(model, X, lik, what="trace", batch_size=4).values())),
        "per-sample draws": fl.fisher_diag(model, X, lik, method="hutchinson", per_sample=True, samples=5,
                                           generator=g, batch_size=4).value,
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_column_groups_give_the_same_numbers(arch, groups):
    seen, force = groups
    model, X = build(arch, n=9)
    whole = _calls(model, X)
    assert all(k == K for K, k in seen)  # the default budget holds every column of these tiny models
    for share in (2**40, 2**38):  # one column at a time, then a few
        seen.clear()
        force(share)
        split = _calls(model, X)
        for name, value in whole.items():
            torch.testing.assert_close(split[name], value, rtol=1e-12, atol=1e-14, msg=f"{arch}: {name}")
        assert any(k < K for K, k in seen), f"{arch}: no call was split"


def test_statistics_that_need_every_column_together_are_not_split(groups):
    """The Gram of the columns (natural gradient, spectrum) and the materialised rows need all columns at once."""
    seen, force = groups
    force(2**40)
    model, X = build("mlp_tanh", n=6)
    fl.fisher_matrix(model, X, fl.Categorical())
    fl.eigenvalues(model, X, fl.Categorical(), k=2, method="gram")
    assert seen and all(k == K for K, k in seen)


def test_an_attribution_check_keeps_one_group(groups):
    """A call whose batch axis shapes alone cannot prove (input with another axis of size B) keeps its extra check
    column in one backward with the others: no grouping."""
    seen, force = groups
    force(2**40)
    model, _ = build("seq3d")
    X = torch.randn(3, 3, 4, dtype=torch.float64)  # B = T = 3: ambiguous
    fl.fisher_diag(model, X, fl.Categorical())
    assert seen and all(k == K for K, k in seen)
