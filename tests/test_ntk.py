"""fisherlens.ntk: the NTK, its trace and the Fisher–NTK trace relation against the slow references of
``reference.py`` (float64) for every architecture, output model, kind and engine; chunking and batch sizes.

The MC relation is compared with the reference built on the *same* labels (``helpers.mc_labels``).
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import assert_close, engines_for, mc_kwargs, raises, reference_case
from zoo import ARCHS, LIKS, build, cases, targets

import fisherlens as fl

pytestmark = [pytest.mark.usefixtures("float64"),
              pytest.mark.filterwarnings("ignore:Parameters .* used outside:UserWarning")]


@pytest.fixture
def mlp():
    model, X = build("mlp_relu", seed=60)
    return model, X


# ----------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("arch", list(ARCHS))
def test_ntk_matches_reference(arch):
    model, X = build(arch, seed=3, n=5)
    _, X2 = build(arch, seed=4, n=4)
    theta_ref = ref.ntk(model, X)
    cross_ref = ref.ntk(model, X, X2)
    tr_ref = ref.ntk_trace(model, X)
    C = ARCHS[arch].C
    assert theta_ref.shape == (5, 5, C, C)
    for engine in engines_for(arch):
        tag = f"{arch}/{engine}"
        assert_close(fl.ntk(model, X, engine=engine), theta_ref, what=f"ntk {tag}")
        assert_close(fl.ntk(model, (X, None), engine=engine), theta_ref, what=f"ntk (X, Y) {tag}")
        assert_close(fl.ntk(model, X, X2, engine=engine), cross_ref, what=f"cross ntk {tag}")
        assert_close(fl.ntk(model, X, X2, engine=engine, batch_size=2), cross_ref,
                     what=f"chunked cross ntk {tag}")
        assert_close(fl.ntk(model, X, engine=engine, batch_size=2), theta_ref,
                     what=f"chunked ntk {tag}")
        assert_close(fl.ntk_trace(model, X, engine=engine, reduction="sum"), tr_ref, what=f"ntk_trace {tag}")
        assert_close(fl.ntk_trace(model, X, engine=engine, reduction="mean"), tr_ref / len(X),
                     what=f"ntk_trace mean {tag}")
        assert_close(fl.ntk_trace(model, X, engine=engine, batch_size=2, reduction="sum"), tr_ref,
                     what=f"chunked ntk_trace {tag}")


@pytest.mark.parametrize(("arch", "lik", "kind"), cases())
def test_fisher_ntk_relation_matches_reference(arch, lik, kind):
    model, X, Y, F_ref, labels = reference_case(arch, lik, kind)
    L = LIKS[lik].make()
    spec = LIKS[lik].spec
    side_ref = ref.relation_ntk_side(model, X, Y, spec, kind, labels)
    ntr_ref = ref.ntk_trace(model, X) / len(X)
    # the library's own NTK gives the same mean trace of Θ_nn
    assert_close(torch.einsum("nnaa->", fl.ntk(model, X)) / len(X), ntr_ref, what="tr fl.ntk")
    # the relation itself holds for the references (guards the reference, not the library)
    assert side_ref == pytest.approx(float(torch.trace(F_ref)), rel=1e-9)
    for engine in engines_for(arch):
        rel = fl.fisher_ntk_trace(model, (X, Y), L, kind, engine=engine, **mc_kwargs(kind))
        tag = f"{arch}/{lik}/{kind}/{engine}"
        assert isinstance(rel, float)
        assert_close(rel.fisher_trace, torch.trace(F_ref), what=f"fisher side {tag}")
        assert_close(rel.ntk_side, side_ref, what=f"ntk side {tag}")
        assert_close(float(rel), rel.fisher_trace, rtol=1e-12, what=f"float value {tag}")
        assert_close(rel.ntk_trace, ntr_ref, what=f"ntk trace {tag}")
        assert rel.ratio == pytest.approx(rel.fisher_trace / rel.ntk_trace, rel=1e-12)
        direct = fl.fisher_trace(model, (X, Y), L, kind, engine=engine, **mc_kwargs(kind))
        assert_close(rel.ntk_side, direct, what=f"relation vs fisher_trace {tag}")


@pytest.mark.parametrize(("lik", "kind"), [("categorical", "empirical"), ("gaussian", "true"),
                                           ("lp2", "empirical")])
def test_relation_per_sample(lik, kind):
    model, X = build("conv1d", seed=6)
    Y = targets(lik, len(X), 3, seed=6)
    rel = fl.fisher_ntk_trace(model, (X, Y), LIKS[lik].make(), kind, per_sample=True,
                              batch_size=3)
    fisher_n, ntk_n = rel.per_sample
    theta = ref.ntk(model, X)
    spec = LIKS[lik].spec
    expected_ntk = torch.stack([torch.trace(theta[n, n]) for n in range(len(X))])
    if kind == "empirical":
        g = ref.per_sample_grads(model, X, Y, spec)
        expected_fisher = (g**2).sum(1)
    else:
        J = ref.jacobians(model, X)
        f = ref.outputs(model, X)
        expected_fisher = torch.stack([torch.trace(J[n].T @ ref.output_fisher(spec, f[n]) @ J[n])
                                       for n in range(len(X))])
    assert_close(fisher_n, expected_fisher, what="per-sample fisher traces")
    assert_close(ntk_n, expected_ntk, what="per-sample ntk traces")
    assert_close(rel.fisher_trace, expected_fisher.mean(), what="mean of per-sample")


def test_ntk_trace_default_reduction_warns_and_keeps_the_sum():
    model, X = build("mlp_relu", seed=3)
    with pytest.warns(FutureWarning, match="reduction"):
        t = fl.ntk_trace(model, X)
    assert t == fl.ntk_trace(model, X, reduction="sum")
    assert math.isclose(fl.ntk_trace(model, X, reduction="mean"), t / len(X), rel_tol=1e-12)


# ----------------------------------------------------------------------------- batch sizes
@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True, "4"])
def test_ntk_bad_batch_size(mlp, batch_size):
    model, X = mlp
    raises(ValueError, r"batch_size", fl.ntk, model, X, batch_size=batch_size)
    raises(ValueError, r"batch_size", fl.ntk, model, X, X[:3], batch_size=batch_size)
    raises(ValueError, r"batch_size", fl.ntk_trace, model, X, batch_size=batch_size, reduction="sum")
    raises(ValueError, r"batch_size", fl.fisher_ntk_trace, model, (X, None), fl.Categorical(), "true",
           batch_size=batch_size)


def test_ntk_chunked_equals_one_pass(mlp):
    model, X = mlp
    full = fl.ntk(model, X)
    assert_close(fl.ntk(model, X, batch_size=2), full, what="ntk in chunks of 2")
    assert_close(fl.ntk(model, X, X[:3], batch_size=1), full[:, :3], what="ntk x1 × x2 in chunks of 1")
