"""Every Fisher reduction, kind, output model and engine against the slow references (float64).

The MC Fisher is compared with the reference built on the *same* labels: the library draws them with
``likelihood.sample(f (N, C), k, generator)`` once per chunk in data order; with a single chunk
(N <= the default chunk of 256) the test draws them the same way with an identically seeded
generator and hands them to the reference.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from conftest import ARCHS, LIKS, assert_close, build, cases, targets

import fisherlens as fl

SEED = 1234
K_MC = 3
ENGINES = ("layerwise", "functional", "auto")

pytestmark = [pytest.mark.usefixtures("float64"),
              pytest.mark.filterwarnings("ignore:Parameters .* used outside:UserWarning")]


def engines_for(arch: str) -> tuple[str, ...]:
    return ENGINES if ARCHS[arch].layerwise else ("functional", "auto")


def mc_kwargs(kind: str) -> dict:
    """Library keyword arguments; a fresh, identically seeded generator for every call."""
    if kind != "mc":
        return {}
    return {"samples": K_MC, "generator": torch.Generator().manual_seed(SEED)}


def mc_labels(model, X, lik: str, kind: str):
    if kind != "mc":
        return None
    with torch.no_grad():
        f = model(X).reshape(len(X), -1)
    return LIKS[lik].make().sample(f, K_MC, torch.Generator().manual_seed(SEED))


def setup(arch, lik, kind, seed=0):
    model, X = build(arch, seed)
    Y = targets(lik, len(X), ARCHS[arch].C, seed)
    labels = mc_labels(model, X, lik, kind)
    F_ref = ref.fisher(model, X, Y, LIKS[lik].spec, kind, labels=labels)
    return model, X, Y, F_ref, labels


@pytest.mark.parametrize(("arch", "lik", "kind"), cases())
def test_reductions_match_reference(arch, lik, kind):
    model, X, Y, F_ref, _ = setup(arch, lik, kind)
    L = LIKS[lik].make()
    data = (X, Y)
    assert float(torch.trace(F_ref)) > 0, "degenerate case: the reference Fisher is zero"
    for engine in engines_for(arch):
        kw = dict(engine=engine, **mc_kwargs(kind))
        tag = f"{arch}/{lik}/{kind}/{engine}"
        assert_close(fl.fisher_matrix(model, data, L, kind, **kw), F_ref, what=f"matrix {tag}")
        kw = dict(engine=engine, **mc_kwargs(kind))
        assert_close(fl.fisher_diag(model, data, L, kind, **kw), torch.diagonal(F_ref),
                     what=f"diag {tag}")
        kw = dict(engine=engine, **mc_kwargs(kind))
        tr = fl.fisher_trace(model, data, L, kind, **kw)
        assert isinstance(tr, float)
        assert_close(tr, torch.trace(F_ref), what=f"trace {tag}")
        for what, expected in (("diag", ref.block_diags(F_ref, model)),
                               ("trace", ref.block_traces(F_ref, model)),
                               ("dense", ref.blocks(F_ref, model))):
            kw = dict(engine=engine, **mc_kwargs(kind))
            got = fl.fisher_blocks(model, data, L, kind, what, **kw)
            assert list(got) == list(expected), f"block names/order {tag}"
            for name in expected:
                assert_close(got[name], expected[name], what=f"blocks[{what}] {name} {tag}")
    theta = ref.flat_params(model)
    got = fl.fisher_rao_norm(model, data, L, kind, **mc_kwargs(kind))
    assert_close(got, theta @ F_ref @ theta, what=f"rao norm {arch}/{lik}/{kind}")


@pytest.mark.parametrize(("arch", "lik", "kind"), cases())
def test_fisher_ntk_relation_matches_reference(arch, lik, kind):
    model, X, Y, F_ref, labels = setup(arch, lik, kind)
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
        assert_close(fl.ntk_trace(model, X, engine=engine), tr_ref, what=f"ntk_trace {tag}")
        assert_close(fl.ntk_trace(model, X, engine=engine, reduction="mean"), tr_ref / len(X),
                     what=f"ntk_trace mean {tag}")
        assert_close(fl.ntk_trace(model, X, engine=engine, batch_size=2), tr_ref,
                     what=f"chunked ntk_trace {tag}")


@pytest.mark.parametrize("arch", [a for a in ARCHS if not ARCHS[a].layerwise])
def test_layerwise_engine_refuses_foreign_parameters(arch):
    model, X = build(arch)
    with pytest.raises(ValueError, match="auto"):
        fl.fisher_diag(model, (X, None), fl.Gaussian(), engine="layerwise")


def test_tied_weight_falls_back_with_warning():
    model, X = build("tied", seed=7)
    with pytest.warns(UserWarning, match="lin.weight"):
        got = fl.fisher_diag(model, (X, None), fl.Categorical())
    assert_close(got, torch.diagonal(ref.true_fisher(model, X, ("categorical",))), what="tied")


@pytest.mark.parametrize(("arch", "lik", "kind"), cases(archs=["mlp_tanh", "cnn2d", "batchnorm",
                                                                "one_output"],
                                                         liks=["gaussian", "categorical",
                                                               "bernoulli", "lp4"]))
def test_reduction_sum_is_n_times_mean(arch, lik, kind):
    model, X, Y, F_ref, labels = setup(arch, lik, kind)
    L = LIKS[lik].make()
    N = len(X)
    data = (X, Y)

    def both(fn, *args):
        mean = fn(model, data, L, kind, *args, reduction="mean", **mc_kwargs(kind))
        total = fn(model, data, L, kind, *args, reduction="sum", **mc_kwargs(kind))
        return mean, total

    m, s = both(fl.fisher_matrix)
    assert_close(s, N * F_ref, what="sum matrix")
    assert_close(s, N * m, what="sum vs mean matrix")
    m, s = both(fl.fisher_diag)
    assert_close(s, N * torch.diagonal(F_ref), what="sum diag")
    m, s = both(fl.fisher_trace)
    assert_close(s, N * m, what="sum trace")
    assert_close(s, N * torch.trace(F_ref), what="sum trace ref")
    for what in ("diag", "trace", "dense"):
        m, s = both(fl.fisher_blocks, what)
        for name in m:
            assert_close(s[name], N * torch.as_tensor(m[name]), what=f"sum blocks {what} {name}")
    m, s = both(fl.fisher_rao_norm)
    theta = ref.flat_params(model)
    assert_close(s, N * (theta @ F_ref @ theta), what="sum rao")
    assert math.isclose(s, N * m, rel_tol=1e-9)


@pytest.mark.parametrize("lik", ["gaussian", "categorical"])
def test_soft_and_one_hot_targets(lik):
    """Categorical probability targets and one-hot float targets of the seed losses."""
    model, X = build("mlp_tanh", seed=5)
    gen = torch.Generator().manual_seed(0)
    P = torch.softmax(torch.randn(len(X), 3, generator=gen), -1)
    if lik == "categorical":
        got = fl.fisher_matrix(model, (X, P), fl.Categorical(), "empirical")
        expected = ref.empirical_fisher(model, X, P, ("categorical",))
        assert_close(got, expected, what="soft labels")
    labels = torch.randint(0, 3, (len(X),), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 3).double()
    for loss in (fl.losses.lp_norm(2), fl.losses.mean_power(2), fl.losses.softmax_cross_entropy()):
        a = fl.fisher_matrix(model, (X, labels), fl.LossInduced(loss), "empirical")
        b = fl.fisher_matrix(model, (X, one_hot), fl.LossInduced(loss), "empirical")
        assert_close(a, b, what=f"labels vs one-hot {loss.__name__}")
        assert float(torch.trace(a)) > 0


def test_float_integer_class_labels_accepted():
    model, X = build("mlp_relu", seed=2)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    a = fl.fisher_matrix(model, (X, y), fl.Categorical(), "empirical")
    b = fl.fisher_matrix(model, (X, y.double()), fl.Categorical(), "empirical")
    assert_close(b, a, what="float integer labels")
    assert_close(a, ref.empirical_fisher(model, X, y, ("categorical",)), what="int labels")


def test_gaussian_one_output_accepts_1d_targets():
    model, X = build("one_output", seed=2)
    y = torch.randn(len(X))
    got = fl.fisher_matrix(model, (X, y), fl.Gaussian(SEED / 1000), "empirical")
    assert_close(got, ref.empirical_fisher(model, X, y, ("gaussian", SEED / 1000)), what="1-D y")


def test_true_fisher_ignores_labels():
    model, X = build("cnn2d", seed=1)
    Y = torch.randint(0, 3, (len(X),))
    a = fl.fisher_matrix(model, (X, Y), fl.Categorical())
    b = fl.fisher_matrix(model, (X, None), fl.Categorical())
    c = fl.fisher_matrix(model, X, fl.Categorical())
    assert_close(a, b, rtol=1e-12, what="labels ignored")
    assert_close(c, b, rtol=1e-12, what="bare tensor X")


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


@pytest.mark.parametrize("arch", ["mlp_tanh", "cnn2d_fancy", "tied", "batchnorm_cnn"])
def test_chunking_inside_a_batch_changes_nothing(arch, monkeypatch):
    """A tiny working budget splits every batch into one-sample chunks: same results."""
    model, X = build(arch, seed=8)
    Y = targets("categorical", len(X), 3, seed=8)
    F_true = ref.true_fisher(model, X, ("categorical",))
    F_emp = ref.empirical_fisher(model, X, Y, ("categorical",))
    monkeypatch.setattr(fl._core, "WORK_BUDGET", 1)
    for engine in ("functional", "auto"):
        got = fl.fisher_matrix(model, (X, Y), fl.Categorical(), engine=engine)
        assert_close(got, F_true, what=f"chunked matrix {engine}")
        got = fl.fisher_diag(model, (X, Y), fl.Categorical(), "empirical", engine=engine)
        assert_close(got, torch.diagonal(F_emp), what=f"chunked diag {engine}")
        got = fl.fisher_trace(model, (X, Y), fl.Categorical(), engine=engine)
        assert_close(got, torch.trace(F_true), what=f"chunked trace {engine}")
