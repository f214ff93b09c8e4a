"""Every Fisher path under ``torch.autocast`` (bfloat16 forward on the CPU): the results are float32, accumulated in
float32, and agree with the float64 values to bfloat16 accuracy; the layerwise fast path stays in use."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from zoo import default_dtype, float32_cnn, float32_mlp, lm_case

import fisherlens as fl

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
TOL = 4e-2  # bfloat16 keeps 8 significant bits: relative rounding 2^-9 per operation


def _cases():
    out = {}
    for name, make in (("mlp", float32_mlp), ("cnn", float32_cnn)):
        m, X = make(0)
        X = X[:12]
        y = torch.randint(0, 10, (len(X),), generator=torch.Generator().manual_seed(1))
        out[name] = (m, (X, y))
    model, X, Y = lm_case(n=4, T=5)
    with default_dtype(torch.float32):
        model = model.float()
    out["lm"] = (model, (X, Y))
    return out


CASES = _cases()


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    return float((a - b).norm() / b.norm())


def _demotions(fn, model, data) -> tuple[object, set[str]]:
    """``fn`` on a fresh copy of ``model`` (a fresh engine plan) and the engine-demotion warnings it gave."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(copy.deepcopy(model), data)
    return out, {str(x.message) for x in w if "cannot prove" in str(x.message)}


def _both(fn, model, data):
    """``(value under bf16 autocast, float64 reference)``; the autocast run demotes no parameter to the general
    engine that the float32 run keeps on the fast path."""
    ref = fn(copy.deepcopy(model).double(), (data[0].double() if data[0].is_floating_point() else data[0], data[1]))
    _, plain = _demotions(fn, model, data)
    with torch.autocast(**BF16):
        got, mixed = _demotions(fn, model, data)
    assert mixed == plain
    return got, ref


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_exact_diag_and_trace(name, kind):
    model, data = CASES[name]
    lik = fl.Categorical()
    got, ref = _both(lambda m, d: fl.fisher_diag(m, d, lik, kind=kind), model, data)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel(got, ref) < TOL
    got, ref = _both(lambda m, d: fl.fisher_trace(m, d, lik, kind=kind), model, data)
    assert abs(got - ref) < TOL * abs(ref)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hutchinson_operator_eigenvalues(name):
    model, data = CASES[name]
    lik = fl.Categorical()
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(2))

    def hutch(m, d):
        g = torch.Generator().manual_seed(0)
        return fl.fisher_trace(m, d, lik, method="hutchinson", samples=16, generator=g).value

    got, ref = _both(hutch, model, data)  # the same Rademacher draws in both
    assert abs(got - ref) < TOL * abs(ref)
    got, ref = _both(lambda m, d: fl.fisher_operator(m, d, lik) @ v.to(next(m.parameters()).dtype), model, data)
    assert got.dtype == torch.float32 and _rel(got, ref) < TOL
    got, ref = _both(lambda m, d: fl.eigenvalues(m, d, lik, k=2, method="lanczos"), model, data)
    assert _rel(got, ref) < TOL


def test_matrix_and_ntk_trace():
    model, data = CASES["mlp"]
    lik = fl.Categorical()
    got, ref = _both(lambda m, d: fl.fisher_matrix(m, d, lik), model, data)
    assert got.dtype == torch.float32 and _rel(got, ref) < TOL
    got, ref = _both(lambda m, d: fl.ntk_trace(m, d[0]), model, data)
    assert abs(got - ref) < TOL * abs(ref)


def test_a_model_casting_its_own_outputs_is_still_refused():
    """Outside autocast a float32 model returning bfloat16 has mixed dtypes by mistake: refused as before."""
    model, (X, y) = CASES["mlp"]

    class Cast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).bfloat16()

    with pytest.raises(TypeError, match="bfloat16 outputs but its parameters are torch.float32"):
        fl.fisher_trace(Cast().eval(), (X, y), fl.Categorical())


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_monitor_batch_trace_of_an_autocast_training_step(kind):
    """A training loop with its forward under autocast: the per-step batch trace (captured activations and output
    gradients in bfloat16) equals the float64 trace of that batch at the parameters before the step."""
    model, (X, y) = copy.deepcopy(CASES["mlp"])
    model.train()
    mon = fl.Monitor(model, fl.Categorical(), (X[:4], y[:4]), observables=("batch_fisher_trace",), kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 4):
        xb, yb = X[4 * step - 4:4 * step], y[4 * step - 4:4 * step]
        ref = fl.fisher_trace(copy.deepcopy(model).double().eval(), (xb.double(), yb), fl.Categorical(), kind=kind)
        with torch.autocast(**BF16):
            out = model(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss, outputs=out, targets=yb)
        assert abs(rec["batch_fisher_trace"] - ref) < TOL * ref
    mon.close()
