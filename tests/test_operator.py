"""The matrix-free Fisher operator: products against the dense Fisher for every kind, scipy interop, errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reference
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from zoo import DT, make_case

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = ["mlp", "cnn", "bernoulli", "gauss", "free"]
KINDS = ["true", "empirical", "mc"]


@functools.cache
def case(name: str):
    return make_case(name, seed=10 + CASES.index(name), n=8, batch_size=3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def empirical_fisher(c) -> torch.Tensor:
    """``(1/N) Σ g_n g_nᵀ`` with ``g_n = J_nᵀ r_n`` and residuals ``r = ∂ℓ/∂f`` written out by hand."""
    J, f = reference.jacobians(c.model, c.X), reference.outputs(c.model, c.X)
    if isinstance(c.lik, fl.Categorical):
        r = torch.softmax(f, -1) - torch.nn.functional.one_hot(c.Y, f.shape[-1]).to(DT)
    elif isinstance(c.lik, fl.Bernoulli):
        r = torch.sigmoid(f) - c.Y.reshape(-1, 1)
    else:
        r = (f - c.Y) / c.lik.sigma**2
    g = torch.einsum("nc,ncp->np", r, J)
    return g.T @ g / len(c.X)


def dense(c, kind, seed=0, samples=1, data=None, **kw):
    return fl.fisher_matrix(c.model, c.data if data is None else data, c.lik, kind, samples=samples,
                            generator=gen(seed), batch_size=c.batch_size, **kw)


def close(a, b, what=""):
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    scale = float(b.abs().max()) + 1e-300
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_products_match_the_dense_fisher(name, kind):
    c = case(name)
    F = dense(c, kind, seed=3)
    if kind == "true":
        close(F, reference.true_fisher(c.model, c.X, c.spec), "fisher_matrix vs slow reference")
    elif kind == "empirical":
        close(F, empirical_fisher(c), "empirical fisher_matrix vs slow reference")
    P = F.shape[0]
    op = fl.fisher_operator(c.model, c.data, c.lik, kind, generator=gen(3), batch_size=c.batch_size)
    assert isinstance(op, fl.FisherOperator) and op.shape == (P, P) and op.products == 0
    g = torch.Generator().manual_seed(99)
    v, M = torch.randn(P, generator=g, dtype=DT), torch.randn(P, 4, generator=g, dtype=DT)
    close(op.matvec(v), F @ v, "matvec")
    close(op @ v, F @ v, "op @ v")
    close(op.matmat(M), F @ M, "matmat")
    close(op @ M, F @ M, "op @ M")
    assert (op @ v).shape == (P,) and (op @ M).shape == (P, 4)
    assert op.products == 1 + 1 + 4 + 4 + 1 + 4
    close(op.to_dense(), F, "to_dense")
    # symmetric: uᵀ(F w) = wᵀ(F u) from two independent products (mc: the same labels on every pass)
    w = torch.randn(P, generator=g, dtype=DT)
    assert abs(float(v @ (op @ w)) - float(w @ (op @ v))) <= 1e-12 * float(F.abs().max()) * P
    L = op.to_scipy()
    assert isinstance(L, LinearOperator) and L.shape == (P, P) and L.dtype == np.float64
    vn, Mn = v.numpy(), M.numpy()
    np.testing.assert_allclose(L.matvec(vn), (F @ v).numpy(), rtol=1e-10, atol=1e-12 * float(F.abs().max()))
    np.testing.assert_allclose(L.matmat(Mn), (F @ M).numpy(), rtol=1e-10, atol=1e-12 * float(F.abs().max()))
    np.testing.assert_allclose(L @ vn, (F @ v).numpy(), rtol=1e-10, atol=1e-12 * float(F.abs().max()))
    np.testing.assert_allclose(L.rmatvec(vn), (F @ v).numpy(), rtol=1e-10, atol=1e-12 * float(F.abs().max()))


@pytest.mark.parametrize("name", ["mlp"])
def test_eigsh_runs_on_the_scipy_operator(name):
    c = case(name)
    for kind in KINDS:
        F = dense(c, kind, seed=4)
        op = fl.fisher_operator(c.model, c.data, c.lik, kind, generator=gen(4), batch_size=c.batch_size)
        k = 2
        w = eigsh(op.to_scipy(), k=k, which="LA", tol=1e-10, return_eigenvectors=False)
        ref = torch.linalg.eigvalsh(F).flip(0)[:k]
        np.testing.assert_allclose(np.sort(w)[::-1], ref.numpy(), rtol=1e-8)


def test_mc_operator_is_one_fixed_matrix():
    """kind='mc': the labels are drawn from the same generator state on every pass, so the operator equals
    fisher_matrix(kind='mc') with the same seed and batch size, and repeated products agree exactly."""
    c = case("mlp")
    P = sum(p.numel() for p in c.model.parameters())
    eye = torch.eye(P, dtype=DT)
    for samples in (1, 3):
        F = dense(c, "mc", seed=21, samples=samples)
        g = gen(21)
        op = fl.fisher_operator(c.model, c.data, c.lik, "mc", samples=samples, generator=g, batch_size=c.batch_size)
        assert torch.equal(g.get_state(), gen(21).get_state())  # the caller's generator is not consumed
        A, B = op @ eye, op @ eye
        assert torch.equal(A, B)
        close(A, F, f"mc operator, samples={samples}")
        close(op.to_dense(), F)
        # other seeds give other matrices (some seeds may draw the same labels on this confident model)
        assert any(bool((dense(c, "mc", seed=s, samples=samples) - F).abs().max() > 1e-6 * F.abs().max())
                   for s in range(22, 27))
    # without a generator: still one fixed matrix across products
    op = fl.fisher_operator(c.model, c.data, c.lik, "mc", batch_size=c.batch_size)
    v = torch.ones(P, dtype=DT)
    assert torch.equal(op @ v, op @ v)


@pytest.mark.parametrize("kind", KINDS)
def test_dataloader_list_and_dataset(kind):
    c = case("cnn")
    ds = torch.utils.data.TensorDataset(c.X, c.Y)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    batches = [(c.X[i : i + 3], c.Y[i : i + 3]) for i in range(0, len(c.X), 3)]
    F = dense(c, kind, seed=5)
    P = F.shape[0]
    M = torch.randn(P, 3, generator=gen(1), dtype=DT)
    for data in (loader, batches, ds):
        op = fl.fisher_operator(c.model, data, c.lik, kind, generator=gen(5), batch_size=3)
        close(op @ M, F @ M, f"{type(data).__name__}")
        close(op @ M, F @ M, f"{type(data).__name__}, second pass")  # re-iterable: read again


def test_params_subset_and_reduction_sum():
    c = case("mlp")
    F = reference.true_fisher(c.model, c.X, c.spec)
    names = [n for n, _ in c.model.named_parameters()]
    sizes = [p.numel() for p in c.model.parameters()]
    sel = [names[0], names[3]]
    idx = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in (0, 3)])
    op = fl.fisher_operator(c.model, c.data, c.lik, params=sel, batch_size=3)
    assert op.shape == (len(idx), len(idx))
    close(op.to_dense(), F[idx][:, idx], "params subset")
    M = torch.randn(len(idx), 2, generator=gen(2), dtype=DT)
    close(op @ M, F[idx][:, idx] @ M, "params subset matmat")
    ops = fl.fisher_operator(c.model, c.data, c.lik, reduction="sum", batch_size=3)
    v = torch.randn(F.shape[0], generator=gen(3), dtype=DT)
    close(ops @ v, len(c.X) * (F @ v), "reduction='sum'")


def test_products_are_detached_with_a_params_subset():
    """With params= selecting some parameters, the others (requires_grad=True in the module) must not leave the
    products attached to an autograd graph: F v is a plain tensor, like fisher_matrix's result."""
    c = case("mlp")
    op = fl.fisher_operator(c.model, c.data, c.lik, params=["0.weight"], batch_size=3)
    Fv = op @ torch.ones(op.shape[0], dtype=DT)
    assert not Fv.requires_grad
    Fv.numpy()


def test_wrong_shapes_and_one_shot_iterators():
    c = case("mlp")
    P = sum(p.numel() for p in c.model.parameters())
    op = fl.fisher_operator(c.model, c.data, c.lik, batch_size=3)
    for bad in (torch.ones(P + 1), torch.ones(P - 1), torch.ones(P, 2, 1), torch.ones(P + 1, 2), torch.ones(2, P)):
        with pytest.raises(ValueError):
            op @ bad
        if bad.dim() == 1:
            with pytest.raises(ValueError):
                op.matvec(bad)
        else:
            with pytest.raises(ValueError):
                op.matmat(bad)
    with pytest.raises(ValueError):
        op.matvec(torch.ones(P, 1))
    with pytest.raises(ValueError):
        op.matmat(torch.ones(P))
    with pytest.raises(ValueError):
        op.to_scipy().matvec(np.ones(P + 1))
    assert op.products == 0
    batches = [(c.X[i : i + 3], c.Y[i : i + 3]) for i in range(0, len(c.X), 3)]
    with pytest.raises(TypeError, match="re-iterable"):
        fl.fisher_operator(c.model, (b for b in batches), c.lik)
    with pytest.raises(TypeError):
        fl.fisher_operator(c.model, iter(batches), c.lik)
    with pytest.raises(ValueError):
        fl.fisher_operator(c.model, c.data, c.lik, kind="hessian")


# ----------------------------------------------------------------------------- the linearisation cache
def _forwards(model):
    """A list that grows by one at every forward of ``model`` (functional_call forwards included)."""
    seen = []
    model.register_forward_hook(lambda *_: seen.append(1))
    return seen


def test_later_products_run_no_forward_and_follow_the_parameters():
    c = make_case("cnn", n=9, batch_size=4)
    seen = _forwards(c.model)
    op = fl.fisher_operator(c.model, (c.X, c.Y), c.lik, batch_size=4)
    P = op.shape[0]
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    F = fl.fisher_matrix(c.model, (c.X, c.Y), c.lik)
    close(op @ V[:, 0], F @ V[:, 0], "first product")
    first = len(seen)
    close(op @ V, F @ V, "cached matmat")
    close(op @ V[:, 1], F @ V[:, 1], "cached matvec")
    assert len(seen) == first  # served from the cache
    with torch.no_grad():
        next(c.model.parameters()).data.mul_(1.5)  # a .data write: no version counter moves
    F2 = fl.fisher_matrix(c.model, (c.X, c.Y), c.lik)
    close(op @ V[:, 2], F2 @ V[:, 2], "after a change of the model")
    assert len(seen) > first + 1  # rebuilt


class _OnceDifferentiable(torch.autograd.Function):
    """tanh with a forward-mode derivative and a backward that has no backward of its own: differentiating the
    pull-back again would silently miss this layer."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoDoubleBackward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_OnceDifferentiable.apply(self.a(x)))


def test_models_without_double_backward_and_dataloaders_stream():
    torch.manual_seed(0)
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    for model, data in ((_NoDoubleBackward().double().eval(), (X, y)),
                        (torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double(),
                         loader)):
        seen = _forwards(model)
        F = fl.fisher_matrix(model, (X, y), fl.Categorical())
        op = fl.fisher_operator(model, data, fl.Categorical())
        v = torch.randn(op.shape[0], dtype=DT)
        close(op @ v, F @ v, "first")
        before = len(seen)
        close(op @ v, F @ v, "second")
        assert len(seen) > before  # streamed again


def _bn_cnn():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(27, 4)).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(7, 1, 5, 5, dtype=DT), torch.randint(0, 4, (7,))


@pytest.mark.parametrize("edge, route", [(0.0, "fresh jvp"), (float("inf"), "double backward")])
@pytest.mark.parametrize("arch", ["mlp", "bn_cnn"])
def test_the_cache_keeps_the_cheaper_exact_jvp(arch, edge, route, monkeypatch):
    """Whichever map ``t -> J t`` the cache keeps (forced here by the FLOP edge), every product is the dense one's."""
    import fisherlens._core.model as core_model

    monkeypatch.setattr(core_model, "DOUBLE_BACKWARD_EDGE", edge)
    if arch == "mlp":
        c = case("mlp")
        model, X, Y = c.model, c.X, c.Y
    else:
        model, X, Y = _bn_cnn()
    F = fl.fisher_matrix(model, (X, Y), fl.Categorical())
    op = fl.fisher_operator(model, (X, Y), fl.Categorical(), batch_size=3)
    V = torch.randn(op.shape[0], 2, dtype=DT, generator=gen(0))
    for _ in range(2):  # the product that builds the cache, then one served by it
        close(op @ V[:, 0], F @ V[:, 0], route)
        close(op @ V, F @ V, route)
    assert op._cache is not None and {b.route for b in op._cache} == {route}


def test_an_op_without_double_backward_keeps_the_pull_back_and_a_fresh_jvp():
    torch.manual_seed(0)
    model = _NoDoubleBackward().double().eval()
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    op = fl.fisher_operator(model, (X, y), fl.Categorical(), batch_size=3)
    v = torch.randn(op.shape[0], dtype=DT)
    close(op @ v, fl.fisher_matrix(model, (X, y), fl.Categorical()) @ v, "no double backward")
    assert op._cache is not None and {b.route for b in op._cache} == {"fresh jvp"}


def test_the_route_is_chosen_the_same_way_on_every_run():
    """The choice is made by counted FLOPs, not by a clock: two operators on the same model and data choose the same
    routes and give bitwise equal products (a reproducible study depends on it)."""
    model, X, Y = _bn_cnn()
    ops = [fl.fisher_operator(model, (X, Y), fl.Categorical(), batch_size=3) for _ in range(2)]
    v = torch.randn(ops[0].shape[0], dtype=DT, generator=gen(1))
    a, b = (op @ v for op in ops)
    assert torch.equal(a, b)
    assert [c.route for c in ops[0]._cache] == [c.route for c in ops[1]._cache]


def test_the_flop_counts_are_kept_per_model_and_batch_shape(monkeypatch):
    """The two routes' FLOPs are counted once per model, selection and batch shape (they fix them); a later operator
    on the same shapes reuses them, still proves its route and gives the same products; another batch size counts
    again."""
    import fisherlens._core.model as core_model

    model, X, Y = _bn_cnn()
    counted = []
    real = core_model._counted

    def spy(fn, count=True):
        counted.append(count)
        return real(fn, count)

    monkeypatch.setattr(core_model, "_counted", spy)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT, generator=gen(2))
    F = fl.fisher_matrix(model, (X, Y), fl.Categorical())
    first = fl.fisher_operator(model, (X, Y), fl.Categorical(), batch_size=4)  # batches of 4 and 3
    close(first @ v, F @ v, "first")
    assert counted.count(True) == 4  # two shapes, two routes each
    counted.clear()
    again = fl.fisher_operator(model, (X, Y), fl.Categorical(), batch_size=4)
    assert torch.equal(again @ v, first @ v)
    assert counted and not any(counted)  # the proof ran (both maps evaluated), nothing was counted
    assert [c.route for c in again._cache] == [c.route for c in first._cache]
    counted.clear()
    close(fl.fisher_operator(model, (X, Y), fl.Categorical(), batch_size=7) @ v, F @ v, "one batch of 7")
    assert counted.count(True) == 2
