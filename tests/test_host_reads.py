"""No host read per batch on the streaming paths (issue: the estimator at the cost of one backward, item 4).

On an accelerator every read of a device value from Python (``bool(t)``, ``int(t)``, ``t.item()``, ...) waits for
the stream to drain.  The streaming loops therefore keep the outputs' finiteness and the kept-prediction count on
the device and read them once per pass (:func:`fisherlens._core.deferred_outputs`, :meth:`Likelihood.kept`).
Counted here on the CPU: the reads made from fisherlens code must not grow with the number of batches.  Label
*validation* of the empirical Fisher (labels must be checked before they index anything) and the one-time proof
of the operator's linearisation cache are the documented exceptions, tested as such.
"""

from __future__ import annotations

import collections
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fisherlens as fl
from fisherlens._core import deferred_outputs

DT = torch.float64
READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


@pytest.fixture
def host_reads(monkeypatch):
    """A counter of device-to-host reads made directly from fisherlens code (by caller file)."""
    counts: collections.Counter = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "fisherlens" in caller and "tests" not in caller:
                counts[caller] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT).eval()


def _data(n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    y[5] = -100  # one dropped input: the count is not the number of inputs
    return torch.randn(n, 6, generator=g, dtype=DT), y


def _gen():
    return torch.Generator().manual_seed(3)


CALLS = {
    "hutchinson diag": lambda m, d, bs: fl.fisher_diag(m, d, fl.Categorical(), method="hutchinson", generator=_gen(),
                                                       batch_size=bs),
    "hutchinson diag, 3 draws": lambda m, d, bs: fl.fisher_diag(m, d, fl.Categorical(), method="hutchinson",
                                                                samples=3, generator=_gen(), batch_size=bs),
    "hutchinson trace, per sample": lambda m, d, bs: fl.fisher_trace(m, d, fl.Categorical(), method="hutchinson",
                                                                     per_sample=True, generator=_gen(), batch_size=bs),
    "exact diag": lambda m, d, bs: fl.fisher_diag(m, d, fl.Categorical(), batch_size=bs),
    "exact trace": lambda m, d, bs: fl.fisher_trace(m, d, fl.Categorical(), batch_size=bs),
    "exact trace, per prediction": lambda m, d, bs: fl.fisher_trace(m, d, fl.Categorical(), batch_size=bs,
                                                                    reduction="per_prediction"),
    "fisher matrix": lambda m, d, bs: fl.fisher_matrix(m, d, fl.Categorical(), batch_size=bs),
    "Gaussian diag": lambda m, d, bs: fl.fisher_diag(m, (d[0], None), fl.Gaussian(0.5), batch_size=bs),
    "Fisher-Rao norm": lambda m, d, bs: fl.fisher_rao_norm(m, d, fl.Categorical(), batch_size=bs),
}


@pytest.mark.parametrize("call", CALLS)
def test_reads_do_not_grow_with_the_batches(call, host_reads):
    model, data = _model(), _data()
    CALLS[call](model, data, 24)  # warm: the layerwise plan is proven once per model and input signature
    counts = {}
    for bs in (24, 4):
        host_reads.clear()
        CALLS[call](model, data, bs)
        counts[bs] = sum(host_reads.values())
    assert counts[4] == counts[24], f"{call}: {counts[24]} host reads for 1 batch, {counts[4]} for 6"


@pytest.mark.parametrize("streamed", [False, True])
def test_operator_products_read_once(streamed, host_reads):
    """After the first product (which builds and proves the linearisation cache, per batch), a product reads the
    device a fixed number of times whatever the batches; streamed data (a DataLoader) too."""
    model, (X, y) = _model(), _data()
    counts = {}
    for bs in (24, 4):
        data = DataLoader(TensorDataset(X, y), batch_size=bs) if streamed else (X, y)
        op = fl.fisher_operator(model, data, fl.Categorical(), batch_size=None if streamed else bs)
        v = torch.randn(op.shape[0], dtype=DT)
        op @ v
        host_reads.clear()
        op @ v
        counts[bs] = sum(host_reads.values())
    assert counts[4] == counts[24]


def test_the_deferred_count_equals_the_eager_one():
    """:meth:`Likelihood.kept` is :meth:`Likelihood.count` without the read: ignore_index, masks, float targets."""
    lik, f = fl.Categorical(), torch.randn(6, 3, 4)
    labels = torch.randint(0, 4, (6, 3))
    labels[0, 1] = labels[4, 2] = -100
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2] = False
    for y in (None, labels, {"labels": labels, "mask": mask}, {"attention_mask": mask.long()}):
        assert int(lik.kept(f, y)) == lik.count(f, y)
    assert lik.kept(f, None) == 18 and isinstance(lik.kept(f, None), int)  # nothing can drop: no device op
    assert not fl.Gaussian().drops(torch.randn(6, 3, 4)) and lik.drops(labels) and lik.drops({"mask": mask})
    assert int(lik.kept(f, labels)) == 16


def _nan_on_batch(k: int, n: int = 24, bs: int = 4):
    """A model whose outputs are NaN exactly on the inputs of batch ``k`` (1-based) of size ``bs``, finite inputs."""
    model, (X, y) = _model(), _data(n)

    class Poison(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            h = self.net(x)
            return torch.where(x[:, :1] > 50, torch.full_like(h, math.nan), h)

    X = X.clone()
    X[(k - 1) * bs : k * bs, 0] = 100.0
    return Poison().eval(), X, y


@pytest.mark.parametrize("call", ["hutchinson diag", "exact diag", "exact trace", "Fisher-Rao norm"])
def test_a_non_finite_later_batch_is_refused_after_the_pass(call):
    model, X, y = _nan_on_batch(3)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    with pytest.raises(ValueError, match=r"NaN or inf outputs on this data \(found at the end of the pass\)"):
        CALLS[call](model, loader, None)


def test_operator_refuses_non_finite_outputs_after_the_pass():
    model, X, y = _nan_on_batch(2)
    op = fl.fisher_operator(model, DataLoader(TensorDataset(X, y), batch_size=4), fl.Categorical())
    with pytest.raises(ValueError, match=r"\(found at the end of the pass\)"):
        op @ torch.randn(op.shape[0], dtype=DT)


def test_sampled_labels_check_the_outputs_first():
    """Sampling labels needs finite probabilities: those passes check each batch at once (a CUDA multinomial on NaN
    would be a device-side assert, not an error)."""
    model, X, y = _nan_on_batch(2)
    with pytest.raises(ValueError, match=r"The model produced NaN or inf outputs on this data; "):
        fl.fisher_diag(model, DataLoader(TensorDataset(X, y), batch_size=4), fl.Categorical(), method="mc")
    with pytest.raises(ValueError, match=r"The model produced NaN or inf outputs on this data; "):
        fl.fisher_trace(model, (X, y), fl.Categorical(), kind="mc", batch_size=4)


def test_an_error_after_a_non_finite_batch_becomes_the_refusal():
    flag = torch.tensor([math.nan])
    with pytest.raises(ValueError, match=r"found at the end of the pass") as info:
        with deferred_outputs():
            fl._core.check_outputs(flag[:, None], torch.zeros(1, 1), flag.dtype)
            raise RuntimeError("later arithmetic broke on the NaN")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="unrelated"), deferred_outputs():  # finite: the error itself
        raise RuntimeError("unrelated")
    with deferred_outputs(enabled=False), pytest.raises(ValueError, match="on this data; "):
        fl._core.check_outputs(flag[:, None], torch.zeros(1, 1), flag.dtype)


def test_scopes_close_when_a_generator_is_abandoned():
    """A pass abandoned half-way (a consumer breaking out of a generator) leaves no open scope behind."""
    from fisherlens._core import checks

    model, (X, y) = _model(), _data()
    run = fl._core.Request(model=model, data=(X, y), likelihood=fl.Categorical(), batch_size=4)
    chunks = run.chunks({"diag"})
    next(chunks)
    assert len(checks._DEFERRED) == 1
    chunks.close()
    assert checks._DEFERRED == []
