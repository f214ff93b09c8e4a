"""The core's parameter selection and data reading: ``params=`` subsets and every accepted form of ``data``
(tensors, Dataset, DataLoader, iterables, one-shot generators), against the full-matrix result and the references."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset
from zoo import LIKS, build, targets

import fisherlens as fl

pytestmark = pytest.mark.usefixtures("float64")

SEED = 99


def gen():
    return torch.Generator().manual_seed(SEED)


def mc_kw(kind):
    return {"samples": 2, "generator": gen()} if kind == "mc" else {}


# ----------------------------------------------------------------------------- params=
def _selection(model, kind_of_selection):
    """(params argument, selected names in named_parameters order)."""
    if kind_of_selection == "names":
        return ["0.weight", "4.bias"], ["0.weight", "4.bias"]
    if kind_of_selection == "reversed_names":
        return ["4.bias", "2.weight"], ["2.weight", "4.bias"]
    if kind_of_selection == "single_name":
        return "2.bias", ["2.bias"]
    if kind_of_selection == "module_prefix":
        return "2", ["2.weight", "2.bias"]
    if kind_of_selection == "tensors":
        return [model[4].weight, model[0].bias], ["0.bias", "4.weight"]
    if kind_of_selection == "single_tensor":
        return model[2].weight, ["2.weight"]
    if kind_of_selection == "mixed":
        return ["0", model[4].bias], ["0.weight", "0.bias", "4.bias"]
    raise AssertionError(kind_of_selection)


SELECTIONS = ["names", "reversed_names", "single_name", "module_prefix", "tensors",
              "single_tensor", "mixed"]


def _index(model, names):
    sl = ref.slices(model)
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize(("lik", "kind"), [("categorical", "true"), ("gaussian", "empirical"),
                                           ("categorical", "mc"), ("lp4", "empirical")])
def test_params_subset_is_sub_block(selection, lik, kind):
    model, X = build("mlp_tanh", seed=11)
    Y = targets(lik, len(X), 3)
    L = LIKS[lik].make()
    params, names = _selection(model, selection)
    full = fl.fisher_matrix(model, (X, Y), L, kind, **mc_kw(kind))
    idx = _index(model, names)
    sub = full[idx][:, idx]
    got = fl.fisher_matrix(model, (X, Y), L, kind, params=params, **mc_kw(kind))
    assert_close(got, sub, what=f"matrix {selection}")
    assert_close(fl.fisher_diag(model, (X, Y), L, kind, params=params, **mc_kw(kind)),
                 torch.diagonal(sub), what=f"diag {selection}")
    assert_close(fl.fisher_trace(model, (X, Y), L, kind, params=params, **mc_kw(kind)),
                 torch.trace(sub), what=f"trace {selection}")
    blocks = fl.fisher_blocks(model, (X, Y), L, kind, "dense", params=params, **mc_kw(kind))
    assert list(blocks) == names
    theta = ref.flat_params(model)[idx]
    assert_close(fl.fisher_rao_norm(model, (X, Y), L, kind, params=params, **mc_kw(kind)),
                 theta @ sub @ theta, what=f"rao {selection}")
    rel = fl.fisher_ntk_trace(model, (X, Y), L, kind, params=params, **mc_kw(kind))
    assert_close(rel.fisher_trace, torch.trace(sub), what=f"relation {selection}")
    if kind == "true":  # the reference with a subset, built independently
        expected = ref.true_fisher(model, X, LIKS[lik].spec, names)
        assert_close(got, expected, what=f"reference subset {selection}")


@pytest.mark.parametrize("selection", SELECTIONS)
def test_params_subset_ntk(selection):
    model, X = build("mlp_tanh", seed=12, n=4)
    params, names = _selection(model, selection)
    expected = ref.ntk(model, X, names=names)
    assert_close(fl.ntk(model, X, params=params), expected, what=f"ntk {selection}")
    assert_close(fl.ntk_trace(model, X, params=params, reduction="sum"), ref.ntk_trace(model, X, names),
                 what=f"ntk_trace {selection}")


@pytest.mark.filterwarnings("ignore:Parameters .* used outside:UserWarning")
@pytest.mark.parametrize(("arch", "params", "names"), [
    ("tied", ["lin.weight"], ["lin.weight"]),
    ("tied", ["lin.bias", "head"], ["lin.bias", "head.weight", "head.bias"]),
    ("shared_twice", "lin", ["lin.weight", "lin.bias"]),
    ("batchnorm", "1", ["1.weight", "1.bias"]),
    ("cnn2d_fancy", ["0.weight", "2.bias"], ["0.weight", "2.bias"]),
])
@pytest.mark.parametrize("engine", ["functional", "auto"])
def test_params_subset_other_architectures(arch, params, names, engine):
    model, X = build(arch, seed=13)
    expected = ref.true_fisher(model, X, ("categorical",), names)
    got = fl.fisher_matrix(model, (X, None), fl.Categorical(), params=params, engine=engine)
    assert_close(got, expected, what=f"{arch} {params}")
    d = fl.fisher_diag(model, (X, None), fl.Categorical(), params=params, engine=engine)
    assert_close(d, torch.diagonal(expected), what=f"{arch} diag {params}")


def test_frozen_parameters_are_excluded_by_default():
    model, X = build("mlp_relu", seed=14)
    expected_w = torch.diagonal(ref.true_fisher(model, X, ("gaussian", 0.5), ["0.weight"]))
    model[0].weight.requires_grad_(False)
    names = ["0.bias", "2.weight", "2.bias"]
    got = fl.fisher_matrix(model, (X, None), fl.Gaussian(0.5))
    P = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert got.shape == (P, P)
    expected = ref.true_fisher(model, X, ("gaussian", 0.5), names)
    assert_close(got, expected, what="frozen excluded")
    # but a frozen parameter can still be asked for by name
    got_w = fl.fisher_diag(model, (X, None), fl.Gaussian(0.5), params="0.weight")
    assert_close(got_w, expected_w, what="frozen by name")


# ----------------------------------------------------------------------------- data forms
N_DATA = 7


def data_forms(X, Y):
    """Equivalent forms of the same data set (labels may be None)."""
    pairs = [(X[i:i + 3], None if Y is None else Y[i:i + 3]) for i in range(0, len(X), 3)]
    forms = {
        "tensors_bs3": ((X, Y), {"batch_size": 3}),
        "tensors_bs1": ((X, Y), {"batch_size": 1}),
        "list_of_batches": (pairs, {}),
        "generator": ((p for p in pairs), {}),
    }
    if Y is not None:
        ds = TensorDataset(X, Y)
        forms.update({
            "dataset": (ds, {}),
            "dataset_bs2": (ds, {"batch_size": 2}),
            "dataloader_bs3": (DataLoader(ds, batch_size=3), {}),  # uneven last batch (7 = 3+3+1)
            "dataloader_bs1": (DataLoader(ds, batch_size=1), {}),
            "dataloader_bs_big": (DataLoader(ds, batch_size=50), {}),
        })
    else:
        forms["bare_tensor_batches"] = ([X[:3], X[3:5], X[5:]], {})
        forms["dataloader_x_only"] = (DataLoader(TensorDataset(X), batch_size=3), {})
    return forms


FORMS_WITH_Y = ["tensors_bs3", "tensors_bs1", "list_of_batches", "generator", "dataset",
                "dataset_bs2", "dataloader_bs3", "dataloader_bs1", "dataloader_bs_big"]
FORMS_NO_Y = ["tensors_bs3", "tensors_bs1", "list_of_batches", "generator",
              "bare_tensor_batches", "dataloader_x_only"]


def _all_quantities(model, data, L, kind, **kw):
    """Every data-reduced quantity; ``data()`` makes a fresh copy (iterables are consumed)."""
    out = {
        "matrix": fl.fisher_matrix(model, data(), L, kind, **kw),
        "diag": fl.fisher_diag(model, data(), L, kind, **kw),
        "trace": fl.fisher_trace(model, data(), L, kind, **kw),
        "blocks": fl.fisher_blocks(model, data(), L, kind, "dense", **kw)["2.weight"],
        "rao": fl.fisher_rao_norm(model, data(), L, kind, **kw),
        "relation": fl.fisher_ntk_trace(model, data(), L, kind, **kw).ntk_side,
        "ntk_trace": fl.ntk_trace(model, data(), reduction="sum", **{k: v for k, v in kw.items()
                                                    if k == "batch_size"}),
    }
    out["sum_trace"] = fl.fisher_trace(model, data(), L, kind, reduction="sum", **kw)
    return out


@pytest.mark.parametrize("form", FORMS_WITH_Y)
@pytest.mark.parametrize(("lik", "kind"), [("categorical", "empirical"), ("gaussian", "true"),
                                           ("mean_power4", "empirical")])
def test_data_forms_with_labels_equal_tensor_result(form, lik, kind):
    model, X = build("mlp_relu", seed=21, n=N_DATA)
    Y = targets(lik, N_DATA, 3, seed=21)
    L = LIKS[lik].make()
    F_ref = ref.fisher(model, X, Y, LIKS[lik].spec, kind)
    theta = ref.flat_params(model)
    expected = {
        "matrix": F_ref, "diag": torch.diagonal(F_ref), "trace": torch.trace(F_ref),
        "blocks": ref.blocks(F_ref, model)["2.weight"], "rao": theta @ F_ref @ theta,
        "relation": torch.trace(F_ref), "ntk_trace": ref.ntk_trace(model, X),
        "sum_trace": N_DATA * torch.trace(F_ref),
    }

    def data():
        d, _ = data_forms(X, Y)[form]
        return d

    kw = data_forms(X, Y)[form][1]
    got = _all_quantities(model, data, L, kind, **kw)
    for k in expected:
        assert_close(got[k], expected[k], what=f"{form} {k}")


@pytest.mark.parametrize("form", FORMS_NO_Y)
def test_data_forms_without_labels(form):
    model, X = build("cnn2d", seed=22, n=N_DATA)
    F_ref = ref.true_fisher(model, X, ("categorical",))
    forms = data_forms(X, None)
    d, kw = forms[form]
    assert_close(fl.fisher_matrix(model, d, fl.Categorical(), **kw), F_ref, what=form)
    d, kw = data_forms(X, None)[form]
    assert_close(fl.fisher_trace(model, d, fl.Categorical(), **kw), torch.trace(F_ref), what=form)
    d, kw = data_forms(X, None)[form]
    assert_close(fl.ntk_trace(model, d, reduction="sum", **kw), ref.ntk_trace(model, X), what=form)


def test_mc_labels_are_drawn_per_chunk_in_data_order():
    """With several chunks the library draws ``sample(f_chunk, k, generator)`` chunk after chunk."""
    model, X = build("mlp_tanh", seed=23, n=N_DATA)
    L = fl.Categorical()
    g = gen()
    labels = []
    with torch.no_grad():
        for i in range(0, N_DATA, 3):
            labels.append(L.sample(model(X[i:i + 3]), 2, g))
    labels = torch.cat(labels, dim=1)
    expected = ref.mc_fisher(model, X, labels, ("categorical",))
    loader = DataLoader(TensorDataset(X, torch.zeros(N_DATA)), batch_size=3)
    for engine in ("layerwise", "functional", "auto"):
        got = fl.fisher_matrix(model, loader, L, "mc", samples=2, generator=gen(), engine=engine)
        assert_close(got, expected, what=f"mc chunks {engine}")
    got = fl.fisher_diag(model, (X, None), L, "mc", samples=2, generator=gen(), batch_size=3)
    assert_close(got, torch.diagonal(expected), what="mc chunks tensors")


def test_one_shot_generator_of_many_batches_streams():
    """A long stream that can be read only once gives the same result as the tensors."""
    model, X = build("mlp_sigmoid", seed=24, n=120)
    Y = targets("categorical", 120, 3, seed=24)
    L = fl.Categorical()
    consumed = []

    def stream():
        for i in range(0, 120, 2):
            consumed.append(i)
            yield X[i:i + 2], Y[i:i + 2]

    for kind in ("true", "empirical"):
        full = fl.fisher_matrix(model, (X, Y), L, kind)
        consumed.clear()
        one_shot = stream()
        assert_close(fl.fisher_matrix(model, one_shot, L, kind), full, what=f"stream {kind}")
        assert len(consumed) == 60
        assert list(one_shot) == []  # really exhausted: it could not have been read twice
        assert_close(fl.fisher_diag(model, stream(), L, kind), torch.diagonal(full),
                     what=f"stream diag {kind}")
        assert_close(fl.fisher_trace(model, stream(), L, kind), torch.trace(full),
                     what=f"stream trace {kind}")
        got = fl.fisher_blocks(model, stream(), L, kind, "trace")
        assert_close(sum(got.values()), torch.trace(full), what=f"stream blocks {kind}")
        theta = ref.flat_params(model)
        assert_close(fl.fisher_rao_norm(model, stream(), L, kind), theta @ full @ theta,
                     what=f"stream rao {kind}")
        rel = fl.fisher_ntk_trace(model, stream(), L, kind)
        assert_close(rel.ntk_side, torch.trace(full), what=f"stream relation {kind}")
    assert_close(fl.ntk_trace(model, stream(), reduction="sum"), fl.ntk_trace(model, X, reduction="sum"),
                 what="stream ntk_trace")
    assert_close(fl.ntk_trace(model, stream(), reduction="sum"), ref.ntk_trace(model, X), what="stream ntk ref")


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 9), batch=st.integers(1, 11), shuffle_seed=st.integers(0, 3))
def test_dataloader_equivalence_random_batch_sizes(n, batch, shuffle_seed):
    model, X = build("mlp_relu", seed=30 + shuffle_seed, n=n)
    Y = targets("categorical", n, 3, seed=shuffle_seed)
    L = fl.Categorical()
    loader = DataLoader(TensorDataset(X, Y), batch_size=batch)
    for kind in ("true", "empirical"):
        a = fl.fisher_diag(model, loader, L, kind)
        b = fl.fisher_diag(model, (X, Y), L, kind)
        c = fl.fisher_diag(model, (X, Y), L, kind, batch_size=batch)
        assert_close(a, b, rtol=1e-9, what="loader vs tensors")
        assert_close(c, b, rtol=1e-9, what="batch_size vs tensors")
        assert_close(fl.fisher_trace(model, loader, L, kind, reduction="sum"),
                     n * float(b.sum()), rtol=1e-9, what="loader sum trace")
    expected = torch.diagonal(ref.empirical_fisher(model, X, Y, ("categorical",)))
    assert_close(fl.fisher_diag(model, loader, L, "empirical"), expected, what="vs reference")


@pytest.mark.parametrize("engine", ["functional", "layerwise"])
def test_module_registered_twice_is_left_intact(engine):
    """``nn.Sequential(lin, act, lin)``: torch.func.functional_call alone leaves ``lin``'s parameters as plain
    tensors (they would then drop out of named_parameters and change P); every call must leave the model intact."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin, torch.nn.Tanh(), torch.nn.Linear(4, 3, dtype=torch.float64))
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    before = [(n, p) for n, p in model.named_parameters()]
    F1 = fl.fisher_matrix(model, (X, None), fl.Categorical(), engine=engine)
    after = [(n, p) for n, p in model.named_parameters()]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(isinstance(p, torch.nn.Parameter) and p is q for (_, p), (_, q) in zip(after, before, strict=True))
    assert model[0].weight is model[2].weight
    F2 = fl.fisher_matrix(model, (X, None), fl.Categorical(), engine=engine)
    assert F1.shape == (35, 35)
    assert_close(F2, F1)
    J = ref.jacobians(model, X)  # (N, C, P) by autograd loops
    p = torch.softmax(ref.outputs(model, X), -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert_close(F1, torch.einsum("nap,nab,nbq->pq", J, Lam, J) / len(X))
