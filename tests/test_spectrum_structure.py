"""fl.eigenvalues' Gram route through fl.structure (engine="auto"/"structure") vs the generic engine vs dense.

For supported MLPs the structured route must give the same eigenvalues and the same eigenvectors (in the
``named_parameters`` order of the selected parameters) as the generic engine (``engine="generic"``), both equal in
float64 (rtol 1e-8) to the eigendecomposition of the slow reference Fisher of ``reference.py``.  Everything the
structure cannot do (other modules, ``kind="mc"``, frozen parameters picked explicitly, unjoinable batches) must
silently take the generic route under ``engine="auto"`` and be refused, with the reason, under ``"structure"``.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

RTOL = 1e-8
SIGMA = 0.7


def _model(make, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = make().double().eval()
    with torch.no_grad():  # larger weights: a spread spectrum
        for p in model.parameters():
            p.mul_(1.5)
    return model


def _inputs(shape, n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(1000 + seed))


# name -> (factory, input shape)
ARCHS = {
    "linear": (lambda: nn.Linear(5, 3), (5,)),
    "1h_tanh": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
    "1h_relu_softmax": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Softmax(-1)), (6,)),
    "1h_nobias": (lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3, bias=False)),
                  (5,)),
    "2h_mixed": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.GELU(), nn.Tanh(),
                                       nn.Linear(4, 5, bias=False), nn.Softplus(), nn.Linear(5, 3)), (2, 3)),
    "1h_logit": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)), (4,)),
}
# (arch, likelihood, kind, reduction, N)
CASES = [
    ("linear", "categorical", "true", "mean", 5),
    ("1h_tanh", "gaussian", "true", "sum", 4),
    ("1h_tanh", "categorical", "empirical", "mean", 7),
    ("1h_relu_softmax", "categorical", "true", "mean", 6),
    ("1h_nobias", "gaussian", "empirical", "sum", 5),
    ("2h_mixed", "gaussian", "true", "mean", 3),
    ("2h_mixed", "categorical", "empirical", "sum", 6),
    ("1h_logit", "bernoulli", "true", "mean", 9),
    ("1h_logit", "bernoulli", "empirical", "mean", 5),
]
LIKS = {"gaussian": (lambda: fl.Gaussian(SIGMA), ("gaussian", SIGMA)),
        "categorical": (fl.Categorical, ("categorical",)),
        "bernoulli": (fl.Bernoulli, ("bernoulli",))}


def _labels(lik: str, f: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if lik == "categorical":
        return torch.randint(0, f.shape[1], (len(f),), generator=g)
    if lik == "bernoulli":
        return torch.randint(0, 2, (len(f), 1), generator=g).double()
    return torch.randn(f.shape, generator=g)


def _reference(model, X, Y, spec, kind, reduction, names=None) -> torch.Tensor:
    """The slow Fisher (one autograd.grad per sample and output, reference.py), summed for reduction='sum'."""
    F = ref.fisher(model, X, Y, spec, kind, names=names)
    return F * len(X) if reduction == "sum" else F


@pytest.fixture
def spy(monkeypatch):
    """Counts which Gram route ran: ``calls["structure"]``, ``calls["generic"]``."""
    calls = {"structure": 0, "generic": 0}
    for key, attr in (("structure", "_structured_gram"), ("generic", "_gram_eigen")):
        orig = getattr(fl.spectrum, attr)

        def wrapped(*a, _orig=orig, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(fl.spectrum, attr, wrapped)
    return calls


def assert_same_eigenpairs(vals, U, vals_ref, U_ref, F, what):
    """Equal eigenvalues; both sets of eigenvectors are unit eigenvectors of F, and equal up to sign where the
    eigenvalue is simple (else the projectors onto the eigenspace agree)."""
    top = float(vals_ref[0])
    torch.testing.assert_close(vals, vals_ref, rtol=RTOL, atol=1e-12 * top, msg=lambda m: f"{what}: {m}")
    keep = vals_ref > 1e-8 * top
    U, U_ref, lam = U[:, keep], U_ref[:, keep], vals_ref[keep]
    torch.testing.assert_close(U.norm(dim=0), torch.ones_like(lam), rtol=1e-10, atol=0)
    torch.testing.assert_close(F @ U, U * lam, rtol=0, atol=1e-9 * top, msg=lambda m: f"{what} F u = λ u: {m}")
    gap = torch.full_like(lam, float("inf"))
    d = (lam[1:] - lam[:-1]).abs()
    gap[1:], gap[:-1] = torch.minimum(gap[1:], d), torch.minimum(gap[:-1], d)
    simple = gap > 1e-6 * top
    sign = torch.sign((U * U_ref).sum(0))
    torch.testing.assert_close((U * sign)[:, simple], U_ref[:, simple], rtol=0, atol=1e-7,
                               msg=lambda m: f"{what} eigenvectors: {m}")
    if (~simple).any():
        P1, P2 = U[:, ~simple] @ U[:, ~simple].T, U_ref[:, ~simple] @ U_ref[:, ~simple].T
        torch.testing.assert_close(P1, P2, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- same results on both routes
@pytest.mark.parametrize(("arch", "lik", "kind", "reduction", "n"), CASES,
                         ids=[f"{a}-{lk}-{k}-{r}" for a, lk, k, r, _ in CASES])
def test_structured_route_equals_generic_and_dense(arch, lik, kind, reduction, n, spy):
    make, shape = ARCHS[arch]
    model, X = _model(make, seed=len(arch) + n), _inputs(shape, n, seed=n)
    L, spec = LIKS[lik][0](), LIKS[lik][1]
    with torch.no_grad():
        f = model(X)
        Y = _labels(lik, f, seed=n)
    data = (X, Y) if kind == "empirical" else X
    F = _reference(model, X, Y, spec, kind, reduction)
    P = F.shape[0]
    dense_vals, dense_vecs = torch.linalg.eigh(F)
    dense_vals, dense_vecs = dense_vals.flip(0).clamp_min(0), dense_vecs.flip(1)
    kw = dict(method="gram", kind=kind, reduction=reduction, return_vectors=True, batch_size=2)
    out = {}
    for engine in ("auto", "structure", "generic", "functional"):
        before = dict(spy)
        out[engine] = fl.eigenvalues(model, data, L, engine=engine, **kw)
        took = "structure" if spy["structure"] > before["structure"] else "generic"
        assert took == ("structure" if engine in ("auto", "structure") else "generic"), engine
    vals, U = out["auto"]
    K = 1 if kind == "empirical" else f.shape[1]
    assert vals.shape == (n * K,) and U.shape == (P, n * K)
    m = min(P, n * K)
    assert_same_eigenpairs(vals[:m], U[:, :m], dense_vals[:m], dense_vecs[:, :m], F, f"{arch} auto vs dense")
    for engine in ("structure", "generic", "functional"):
        assert_same_eigenpairs(out[engine][0], out[engine][1], vals, U, F, f"{arch} {engine} vs auto")
    # top-k, and eigenvalues alone
    v3, U3 = fl.eigenvalues(model, data, L, k=2, **kw)
    assert_same_eigenpairs(v3, U3, vals[:2], U[:, :2], F, f"{arch} top-2")
    kw.pop("return_vectors")
    torch.testing.assert_close(fl.eigenvalues(model, data, L, **kw), vals, rtol=RTOL, atol=1e-12 * float(vals[0]))


@pytest.mark.parametrize("params", ["0", ["2.weight"], ["0.bias", "2.bias"], "2"])
def test_parameter_subsets(params, spy):
    """A subset of the Linear parameters: the Gram keeps only the selected layers' kernels, the eigenvectors
    only the selected entries (in named_parameters order)."""
    model = _model(ARCHS["1h_tanh"][0], seed=3)
    X = _inputs((5,), 6, seed=3)
    L = fl.Categorical()
    names = [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in
                                                           ([params] if isinstance(params, str) else params))]
    F = ref.true_fisher(model, X, ("categorical",), names=names)
    ev = torch.linalg.eigvalsh(F).flip(0).clamp_min(0)
    vals, U = fl.eigenvalues(model, X, L, method="gram", params=params, return_vectors=True)
    assert spy["structure"] == 1 and spy["generic"] == 0
    assert U.shape == (F.shape[0], 18)
    m = min(F.shape[0], 18)
    torch.testing.assert_close(vals[:m], ev[:m], rtol=RTOL, atol=1e-12 * float(ev[0]))
    g_vals, g_U = fl.eigenvalues(model, X, L, method="gram", params=params, return_vectors=True, engine="generic")
    assert_same_eigenpairs(vals, U, g_vals, g_U, F, f"subset {params}")


def test_frozen_parameters_and_gathered_data(spy):
    """Frozen parameters are left out by both routes; a Dataset and a one-shot iterator of batches are read once
    and joined; auto's P > 2048 resolution to the Gram takes the structured route."""
    model = _model(lambda: nn.Sequential(nn.Linear(40, 52), nn.Tanh(), nn.Linear(52, 3)), seed=4)
    model[0].bias.requires_grad_(False)
    X = _inputs((40,), 5, seed=4)
    L = fl.Gaussian(SIGMA)
    F = ref.true_fisher(model, X, ("gaussian", SIGMA), names=["0.weight", "2.weight", "2.bias"])
    assert F.shape[0] > 2048
    ev = torch.linalg.eigvalsh(F).flip(0)[:15]
    batches = [(X[i : i + 2], None) for i in range(0, 5, 2)]
    for data in (X, torch.utils.data.TensorDataset(X), iter(batches)):
        vals = fl.eigenvalues(model, data, L)  # method auto → gram
        torch.testing.assert_close(vals, ev, rtol=RTOL, atol=1e-12 * float(ev[0]))
    assert spy["structure"] == 3 and spy["generic"] == 0


# ----------------------------------------------------------------------------- the generic route takes over
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * torch.tanh(self.b(x))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


@pytest.mark.parametrize(("make", "shape", "kind", "params", "why"), [
    (_cnn, (1, 5, 5), "true", None, "Conv2d"),
    (TwoHeads, (4,), "true", None, "needs an nn.Sequential"),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Softmax(-1), nn.Flatten(), nn.Linear(6, 3)),
     (4,), "true", None, "Unflatten"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)), (4,), "true", None, "LayerNorm"),
    (ARCHS["1h_tanh"][0], (5,), "mc", None, "kind='mc'"),
    (ARCHS["1h_tanh"][0], (5,), "true", "frozen", "not trainable"),
], ids=["cnn", "custom", "grouped-softmax", "layernorm", "mc", "frozen-selected"])
def test_unsupported_cases_take_the_generic_route(make, shape, kind, params, why, spy):
    model = _model(make, seed=8)
    if params == "frozen":
        model[0].weight.requires_grad_(False)
        params = ["0.weight", "2.weight"]  # explicitly selected, though frozen: not the structure's parameters
    X = _inputs(shape, 4, seed=8)
    L = fl.Categorical()
    kw = dict(method="gram", kind=kind, params=params, return_vectors=True)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    vals, U = fl.eigenvalues(model, X, L, generator=g(), **kw)
    assert spy["structure"] == 0 and spy["generic"] == 1
    F = fl.fisher_matrix(model, X, L, kind, params=params, generator=g(), engine="functional")
    if kind == "true":
        names = params or [n for n, p in model.named_parameters() if p.requires_grad]
        for p in model.parameters():  # the reference differentiates the selected ones, frozen or not
            p.requires_grad_(True)
        expected = ref.true_fisher(model, X, ("categorical",), names=names)
        torch.testing.assert_close(F, expected, rtol=RTOL, atol=1e-14 * float(expected.abs().max()))
        if why == "not trainable":
            model[0].weight.requires_grad_(False)
    ev = torch.linalg.eigvalsh(F).flip(0)
    m = min(len(vals), len(ev))
    torch.testing.assert_close(vals[:m], ev[:m], rtol=RTOL, atol=1e-12 * float(ev[0]))
    keep = vals > 1e-8 * vals[0]
    torch.testing.assert_close(F @ U[:, keep], U[:, keep] * vals[keep], rtol=0, atol=1e-9 * float(vals[0]))
    g_vals = fl.eigenvalues(model, X, L, generator=g(), engine="generic", **kw)[0]
    torch.testing.assert_close(vals, g_vals, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"engine='structure' does not apply here: .*{why}"):
        fl.eigenvalues(model, X, L, generator=g(), engine="structure", **kw)


def test_unjoinable_or_integer_batches_fall_back(spy):
    """Batches of different input shapes cannot be joined (the generic route then names the model's failure);
    integer inputs are left to the generic route."""
    model = _model(ARCHS["2h_mixed"][0], seed=9)
    L = fl.Gaussian(SIGMA)
    batches = [(_inputs((2, 3), 2, seed=1), None), (_inputs((6,), 2, seed=2), None)]
    vals = fl.eigenvalues(model, batches, L, method="gram")  # Flatten makes both shapes valid inputs
    assert spy["structure"] == 0 and spy["generic"] == 1
    X = torch.cat([batches[0][0].flatten(1), batches[1][0]])
    ev = torch.linalg.eigvalsh(ref.true_fisher(model, X, ("gaussian", SIGMA))).flip(0)[: len(vals)]
    torch.testing.assert_close(vals, ev, rtol=RTOL, atol=1e-12 * float(ev[0]))
    with pytest.raises(ValueError, match="one floating tensor"):
        fl.eigenvalues(model, batches, L, method="gram", engine="structure")
    lin = _model(lambda: nn.Linear(3, 2), seed=1)
    Xi = torch.randint(0, 3, (4, 3))
    with pytest.raises(ValueError, match="failed on a batch"):  # the generic engine's error for integer inputs
        fl.eigenvalues(lin, Xi, L, method="gram")


# ----------------------------------------------------------------------------- errors
def test_errors_are_those_of_the_generic_route():
    model = _model(ARCHS["1h_tanh"][0], seed=11)
    X = _inputs((5,), 6, seed=11)
    L = fl.Categorical()
    msgs = []
    for engine in ("auto", "structure", "generic"):
        with pytest.raises(ValueError, match=r"Gram matrix of N·K = 18 rows") as e:
            fl.eigenvalues(model, X, L, method="gram", engine=engine, max_memory=1000)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == msgs[2]  # the same memory refusal on every route
    with pytest.raises(ValueError, match="needs labels"):  # empirical without labels
        fl.eigenvalues(model, X, L, method="gram", kind="empirical")
    with pytest.raises(ValueError, match="outputs of shape"):  # the structure refuses, the generic route explains
        fl.eigenvalues(model, _inputs((2, 5), 3, seed=1), L, method="gram")
    with pytest.raises(ValueError, match="N, 5"):  # engine='structure' explains itself
        fl.eigenvalues(model, _inputs((2, 5), 3, seed=1), L, method="gram", engine="structure")
    with pytest.raises(ValueError, match="method='gram'"):
        fl.eigenvalues(model, X, L, method="dense", engine="structure")
    lin = nn.Linear(4, 4).double()
    shared = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3).double()).eval()
    with pytest.raises(ValueError, match="used twice"):  # refused before any computation
        fl.eigenvalues(shared, _inputs((4,), 3, seed=2), L, method="gram", engine="structure")
    with pytest.raises(ValueError, match="engine"):
        fl.eigenvalues(model, X, L, method="gram", engine="khatri-rao")
