"""The core's input checks: bad input raises ``ValueError``/``TypeError`` with a message that says what was wrong.

Each check asserts on a key word of the message, for every public entry point the input reaches.  Never silently
wrong: non-finite targets and losses that used to give NaN or inf are refused, naming the cause (and the valid
neighbours still work).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from helpers import assert_close, raises
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import build

import fisherlens as fl

pytestmark = [pytest.mark.usefixtures("float64"),
              # bad-input tests call fl.ntk_trace without reduction=: its deprecation notice is not under test here
              pytest.mark.filterwarnings("ignore:fl.ntk_trace's default reduction:FutureWarning")]

KINDS = ("true", "empirical", "mc")
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def mlp():
    model, X = build("mlp_relu", seed=50)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return model, X, y


def fisher_calls(kind="true", **kw):
    """Every Fisher entry point taking (model, data, likelihood, kind), as callables."""
    return {
        "matrix": lambda m, d, L: fl.fisher_matrix(m, d, L, kind, **kw),
        "diag": lambda m, d, L: fl.fisher_diag(m, d, L, kind, **kw),
        "trace": lambda m, d, L: fl.fisher_trace(m, d, L, kind, **kw),
        "blocks_diag": lambda m, d, L: fl.fisher_blocks(m, d, L, kind, "diag", **kw),
        "blocks_trace": lambda m, d, L: fl.fisher_blocks(m, d, L, kind, "trace", **kw),
        "blocks_dense": lambda m, d, L: fl.fisher_blocks(m, d, L, kind, "dense", **kw),
        "rao": lambda m, d, L: fl.fisher_rao_norm(m, d, L, kind, **kw),
        "relation": lambda m, d, L: fl.fisher_ntk_trace(m, d, L, kind, **kw),
    }


CALLS = list(fisher_calls())


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("call", CALLS)
def test_x_y_length_mismatch(mlp, call):
    model, X, y = mlp
    fn = fisher_calls("empirical")[call]
    raises(ValueError, r"(?i)match", fn, model, (X, y[:-1]), fl.Categorical())
    batches = [(X[:4], y[:4]), (X[4:], y[4:6])]
    raises(ValueError, r"labels", fn, model, batches, fl.Categorical())


@pytest.mark.parametrize("call", CALLS)
def test_input_shape_model_cannot_take(mlp, call):
    model, _, y = mlp
    fn = fisher_calls("true")[call]
    raises(ValueError, r"input shape", fn, model, (torch.randn(7, 5), None), fl.Categorical())
    raises(ValueError, r"input shape", fn, model, (torch.randn(7, 3), None), fl.Categorical())


def test_input_shape_ntk(mlp):
    model, _, _ = mlp
    raises(ValueError, r"input shape", fl.ntk, model, torch.randn(3, 5))
    raises(ValueError, r"input shape", fl.ntk, model, torch.randn(3, 4), torch.randn(2, 5))
    raises(ValueError, r"input shape", fl.ntk_trace, model, torch.randn(3, 5))


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("bad", [[0, 1, 3, 0, 1, 2, 0], [0, -1, 2, 0, 1, 2, 0]])
def test_categorical_labels_out_of_range(mlp, call, bad):
    model, X, _ = mlp
    fn = fisher_calls("empirical")[call]
    raises(ValueError, r"\[0, 3\)", fn, model, (X, torch.tensor(bad)), fl.Categorical())
    sce = fl.LossInduced(fl.losses.softmax_cross_entropy())
    raises(ValueError, r"\[0, 3\)", fn, model, (X, torch.tensor(bad)), sce)


@pytest.mark.parametrize("call", CALLS)
def test_categorical_non_integer_float_labels(mlp, call):
    model, X, _ = mlp
    fn = fisher_calls("empirical")[call]
    y = torch.tensor([0.0, 1.5, 2.0, 0.0, 1.0, 2.0, 0.0])
    raises(ValueError, r"integer", fn, model, (X, y), fl.Categorical())


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(-3, 6), min_size=1, max_size=8))
def test_categorical_labels_hypothesis(labels):
    model, X = build("mlp_relu", seed=51, n=len(labels))
    y = torch.tensor(labels)
    if all(0 <= v < 3 for v in labels):
        got = fl.fisher_diag(model, (X, y), fl.Categorical(), "empirical")
        expected = torch.diagonal(ref.empirical_fisher(model, X, y, ("categorical",)))
        assert_close(got, expected, what="valid labels")
    else:
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            fl.fisher_diag(model, (X, y), fl.Categorical(), "empirical")
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            fl.fisher_trace(model, DataLoader(TensorDataset(X, y), batch_size=3),
                            fl.Categorical(), "empirical")


@settings(max_examples=20, deadline=None)
@given(labels=st.lists(st.floats(-1.0, 2.0, allow_nan=False), min_size=1, max_size=6))
def test_bernoulli_labels_hypothesis(labels):
    model, X = build("one_output", seed=52, n=len(labels))
    y = torch.tensor(labels, dtype=torch.float64)
    if all(0 <= v <= 1 for v in labels):
        got = fl.fisher_trace(model, (X, y), fl.Bernoulli(), "empirical")
        expected = torch.trace(ref.empirical_fisher(model, X, y, ("bernoulli",)))
        assert_close(got, expected, what="valid Bernoulli labels")
    else:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fl.fisher_trace(model, (X, y), fl.Bernoulli(), "empirical")


class Logit(nn.Module):
    """Logit ``j`` of a model, as a one-output model."""

    def __init__(self, model, j):
        super().__init__()
        self.model, self.j = model, j

    def forward(self, x):
        return self.model(x)[:, self.j : self.j + 1]


@pytest.mark.parametrize("call", ["matrix", "diag", "trace", "blocks_diag", "blocks_trace", "rao"])
def test_bernoulli_with_several_outputs_is_multilabel(mlp, call):
    """Several logits under fl.Bernoulli are independent labels (BCEWithLogitsLoss): the true Fisher is the sum
    of each logit's binary Fisher (it used to be refused with advice to use fl.Categorical, which is wrong)."""
    model, X, _ = mlp
    fn = fisher_calls("true")[call]
    got = fn(model, (X, None), fl.Bernoulli())
    parts = [fn(Logit(model, j), (X, None), fl.Bernoulli()) for j in range(3)]
    if isinstance(got, dict):
        for n in got:
            assert torch.allclose(torch.as_tensor(got[n]), sum(torch.as_tensor(p[n.join(["model.", ""])])
                                                               for p in parts), rtol=1e-10), n
    else:
        assert torch.allclose(torch.as_tensor(got), sum(torch.as_tensor(p) for p in parts), rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", CALLS)
def test_categorical_with_one_output(call, kind):
    model, X = build("one_output", seed=53)
    y = torch.zeros(len(X), dtype=torch.long)
    fn = fisher_calls(kind)[call]
    raises(ValueError, r"at least 2 outputs", fn, model, (X, y), fl.Categorical())


@pytest.mark.parametrize("call", CALLS)
def test_gaussian_targets_wrong_shape(mlp, call):
    model, X, _ = mlp
    fn = fisher_calls("empirical")[call]
    raises(ValueError, r"shape", fn, model, (X, torch.randn(7, 2)), fl.Gaussian())
    lp = fl.LossInduced(fl.losses.lp_norm(2))
    raises(ValueError, r"shape", fn, model, (X, torch.randn(7, 4)), lp)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters(mlp, call, value):
    model, X, _ = mlp
    with torch.no_grad():
        model[2].weight[0, 1] = value
    fn = fisher_calls("true")[call]
    raises(ValueError, r"NaN or inf", fn, model, (X, None), fl.Categorical())


def test_non_finite_parameters_ntk(mlp):
    model, X, _ = mlp
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    raises(ValueError, r"NaN or inf", fl.ntk, model, X)
    raises(ValueError, r"NaN or inf", fl.ntk_trace, model, X)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", CALLS)
def test_non_finite_outputs(mlp, call, kind):
    model, X, y = mlp
    X = X.clone()
    X[5, 2] = float("inf")  # not in the first row
    fn = fisher_calls(kind)[call]
    raises(ValueError, r"NaN or inf", fn, model, (X, y), fl.Categorical())
    raises(ValueError, r"NaN or inf", fn, model, DataLoader(TensorDataset(X, y), batch_size=2),
           fl.Categorical())


def test_non_finite_outputs_ntk(mlp):
    model, X, _ = mlp
    X = X.clone()
    X[3, 0] = float("nan")
    raises(ValueError, r"NaN or inf", fl.ntk, model, X)
    raises(ValueError, r"NaN or inf", fl.ntk_trace, model, X)


@pytest.mark.parametrize("call", CALLS)
def test_empty_data(mlp, call):
    model, X, y = mlp
    fn = fisher_calls("empirical")[call]
    for empty in ((X[:0], y[:0]), [], iter([]), DataLoader(TensorDataset(X[:0], y[:0]))):
        raises(ValueError, r"empty", fn, model, empty, fl.Categorical())


def test_empty_data_ntk(mlp):
    model, X, _ = mlp
    raises(ValueError, r"at least one input", fl.ntk, model, X[:0])
    raises(ValueError, r"empty", fl.ntk_trace, model, X[:0])
    raises(ValueError, r"empty", fl.ntk_trace, model, [])


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("kind", ["true", "mc"])
def test_loss_induced_only_empirical(mlp, call, kind):
    model, X, y = mlp
    L = fl.LossInduced(fl.losses.lp_norm(2))
    raises(ValueError, r"empirical", fisher_calls(kind)[call], model, (X, y), L)


@pytest.mark.parametrize("call", CALLS)
def test_unknown_kind(mlp, call):
    model, X, y = mlp
    raises(ValueError, r"kind", fisher_calls("expected")[call], model, (X, y), fl.Categorical())


@pytest.mark.parametrize("fn", [fl.fisher_matrix, fl.fisher_diag, fl.fisher_trace,
                                fl.fisher_blocks, fl.fisher_rao_norm])
def test_unknown_reduction(mlp, fn):
    model, X, y = mlp
    raises(ValueError, r"reduction", lambda: fn(model, (X, y), fl.Categorical(), reduction="avg"))


def test_unknown_reduction_ntk_trace(mlp):
    model, X, _ = mlp
    raises(ValueError, r"reduction", lambda: fl.ntk_trace(model, X, reduction="max"))


@pytest.mark.parametrize("name", ["matrix", "diag", "trace", "blocks_diag", "blocks_trace",
                                  "blocks_dense", "relation"])
def test_unknown_engine(mlp, name):
    model, X, y = mlp
    fn = fisher_calls("true", engine="fast")[name]
    raises(ValueError, r"engine", fn, model, (X, y), fl.Categorical())


def test_unknown_engine_ntk(mlp):
    model, X, _ = mlp
    raises(ValueError, r"engine", lambda: fl.ntk(model, X, engine="jax"))
    raises(ValueError, r"engine", lambda: fl.ntk_trace(model, X, engine="jax", reduction="sum"))


@pytest.mark.parametrize("fn", [fl.fisher_diag, fl.fisher_trace])
def test_unknown_method(mlp, fn):
    model, X, y = mlp
    raises(ValueError, r"method", lambda: fn(model, (X, y), fl.Categorical(), method="magic"))


def test_unknown_what(mlp):
    model, X, y = mlp
    raises(ValueError, r"what", lambda: fl.fisher_blocks(model, (X, y), fl.Categorical(),
                                                         what="eigen"))


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("samples", [0, -2, 1.5, True])
def test_bad_samples(mlp, call, samples):
    model, X, y = mlp
    fn = fisher_calls("mc", samples=samples)[call]
    raises(ValueError, r"samples", fn, model, (X, y), fl.Categorical())


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("generator", [42, "seed", torch.randn(2)])
def test_bad_generator(mlp, call, generator):
    model, X, y = mlp
    fn = fisher_calls("mc", generator=generator)[call]
    raises(TypeError, r"generator", fn, model, (X, y), fl.Categorical())


@pytest.mark.parametrize("call", CALLS)
def test_model_not_a_module(mlp, call):
    model, X, y = mlp
    raises(TypeError, r"Module", fisher_calls("true")[call], lambda x: model(x), (X, y),
           fl.Categorical())


def test_model_not_a_module_ntk(mlp):
    model, X, _ = mlp
    raises(TypeError, r"Module", fl.ntk, lambda x: model(x), X)
    raises(TypeError, r"Module", fl.ntk_trace, lambda x: model(x), X)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("lik", ["gaussian", nn.CrossEntropyLoss(), fl.losses.lp_norm(2), None])
def test_likelihood_not_a_likelihood(mlp, call, lik):
    model, X, y = mlp
    raises(TypeError, r"likelihood", fisher_calls("true")[call], model, (X, y), lik)


@pytest.mark.parametrize("call", CALLS)
def test_params_not_in_model(mlp, call):
    model, X, y = mlp
    fn = fisher_calls("true", params=["0.weight", "5.weight"])[call]
    raises(ValueError, r"5\.weight", fn, model, (X, y), fl.Categorical())
    fn = fisher_calls("true", params=[nn.Parameter(torch.zeros(3))])[call]
    raises(ValueError, r"not a parameter", fn, model, (X, y), fl.Categorical())
    fn = fisher_calls("true", params=[])[call]
    raises(ValueError, r"params", fn, model, (X, y), fl.Categorical())
    fn = fisher_calls("true", params=[3])[call]
    raises(TypeError, r"params", fn, model, (X, y), fl.Categorical())


def test_params_not_in_model_ntk(mlp):
    model, X, _ = mlp
    raises(ValueError, r"nope", lambda: fl.ntk(model, X, params="nope"))
    raises(ValueError, r"nope", lambda: fl.ntk_trace(model, X, params=["nope"], reduction="sum"))


def test_dense_request_too_large_refused_before_reading_data(mlp):
    model, X, y = mlp
    touched = []

    def stream():
        touched.append(1)
        yield X, y

    with pytest.raises(ValueError, match="fisher_diag"):
        fl.fisher_matrix(model, stream(), fl.Categorical(), max_memory=1000)
    with pytest.raises(ValueError, match=r"what='diag'"):
        fl.fisher_blocks(model, stream(), fl.Categorical(), what="dense", max_memory=1000)
    assert touched == []
    with pytest.raises(ValueError, match="ntk_trace"):
        fl.ntk(model, X, max_memory=100)
    # a generous limit is fine
    assert fl.fisher_matrix(model, (X, y), fl.Categorical(), max_memory=10**7).shape == (51, 51)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(6), nn.Dropout(0.3)])
def test_train_mode_layers_refused(layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.ReLU(), nn.Linear(6, 3)).double()
    model.train()
    X = torch.randn(5, 4)
    for name, fn in fisher_calls("true").items():
        with pytest.raises(ValueError, match=r"eval\(\)"):
            fn(model, (X, None), fl.Categorical())
        assert name
    raises(ValueError, r"eval\(\)", fl.ntk, model, X)
    raises(ValueError, r"eval\(\)", fl.ntk_trace, model, X)
    model.eval()
    assert fl.fisher_trace(model, (X, None), fl.Categorical()) > 0


@pytest.mark.parametrize("call", CALLS)
def test_labels_missing_for_empirical(mlp, call):
    model, X, _ = mlp
    fn = fisher_calls("empirical")[call]
    for data in ((X, None), X, [X[:3], X[3:5], X[5:]], DataLoader(TensorDataset(X))):
        raises(ValueError, r"labels", fn, model, data, fl.Categorical())


class ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return self.lin(x).reshape(len(x), 2, 3)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), x


class WrongBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).sum(0, keepdim=True)


@pytest.mark.parametrize("call", CALLS)
def test_model_with_bad_outputs(call):
    X = torch.randn(5, 4)
    fn = fisher_calls("true")[call]
    raises(TypeError, r"output=", fn, TupleOut().double(), (X, None), fl.Gaussian())
    raises(ValueError, r"outputs for a batch", fn, WrongBatch().double(), (X, None),
           fl.Gaussian())


def test_model_with_bad_outputs_ntk():
    X = torch.randn(5, 4).double()
    raises(TypeError, r"output=", fl.ntk, TupleOut().double(), X)
    model = ThreeD().double()  # (B, 2, 3) outputs: M = 6 per input, flattened in memory order
    flat = nn.Sequential(model.lin)
    assert fl.ntk(model, X).shape == (5, 5, 6, 6)
    assert torch.allclose(fl.ntk(model, X), fl.ntk(flat, X))
    assert fl.ntk_trace(model, X, reduction="sum") == pytest.approx(fl.ntk_trace(flat, X, reduction="sum"))


@pytest.mark.parametrize("call", CALLS)
def test_bad_data_types(mlp, call):
    model, X, y = mlp
    fn = fisher_calls("true")[call]
    for data in ("data.csv", 3):
        raises(TypeError, r"data", fn, model, data, fl.Categorical())
    raises(TypeError, r"batch", fn, model, [object()], fl.Categorical())
    raises(TypeError, r"keyword inputs", fn, model, {"x": X}, fl.Categorical())  # Sequential takes no x=


@pytest.mark.parametrize("name", ["matrix", "diag", "trace", "blocks_dense", "rao", "relation"])
@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_batch_size(mlp, name, batch_size):
    model, X, y = mlp
    fn = fisher_calls("true", batch_size=batch_size)[name]
    raises(ValueError, r"batch_size", fn, model, (X, y), fl.Categorical())


def test_bad_likelihood_and_loss_arguments():
    for sigma in (0.0, -1.0, float("nan"), float("inf")):
        raises(ValueError, r"sigma", fl.Gaussian, sigma)
    raises(ValueError, r"p must be", fl.losses.lp_norm, 0.5)
    raises(ValueError, r"n must be", fl.losses.mean_power, 1.5)
    raises(ValueError, r"n must be", fl.losses.mean_power, 0)
    raises(TypeError, r"callable", fl.LossInduced, "mse")


def test_loss_returning_wrong_shape(mlp):
    model, X, _ = mlp
    L = fl.LossInduced(lambda f, y: (f - y) ** 2)  # (B, C): not per sample
    raises(ValueError, r"one value per sample", fl.fisher_trace, model, (X, torch.randn(7, 3)),
           L, "empirical")


# ----------------------------------------------------------------------------- non-finite targets and losses
EMPIRICAL_CALLS = {
    "trace": lambda m, d, L: fl.fisher_trace(m, d, L, "empirical"),
    "diag": lambda m, d, L: fl.fisher_diag(m, d, L, "empirical"),
    "matrix": lambda m, d, L: fl.fisher_matrix(m, d, L, "empirical"),
    "relation": lambda m, d, L: fl.fisher_ntk_trace(m, d, L, "empirical"),
}


@pytest.fixture
def relu_mlp():
    model, X = build("mlp_relu", seed=60)
    return model, X


@pytest.fixture
def one_output():
    model, X = build("one_output", seed=61)
    return model, X


@pytest.mark.parametrize("call", list(EMPIRICAL_CALLS))
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_targets_refused(relu_mlp, one_output, call, value):
    fn = EMPIRICAL_CALLS[call]
    model, X = relu_mlp
    y = torch.randn(len(X), 3)
    y[4, 1] = value
    raises(ValueError, r"Gaussian targets contain NaN or inf", fn, model, (X, y), fl.Gaussian(0.5))
    raises(ValueError, r"targets contain NaN or inf", fn, model, (X, y), fl.LossInduced(fl.losses.lp_norm(2)))
    labels = torch.tensor([0.0, 1.0, 2.0, 0.0, value, 1.0, 2.0])  # float class indices
    raises(ValueError, r"Categorical labels contain NaN or inf", fn, model, (X, labels), fl.Categorical())
    probs = torch.full((len(X), 3), 1 / 3)
    probs[2] = torch.tensor([value, 0.5, 0.5])
    raises(ValueError, r"Categorical labels contain NaN or inf", fn, model, (X, probs), fl.Categorical())
    model1, X1 = one_output
    yb = torch.tensor([0.0, 1.0, 1.0, value, 0.0, 1.0, 0.0])
    raises(ValueError, r"Bernoulli labels contain NaN or inf", fn, model1, (X1, yb), fl.Bernoulli())


def test_finite_targets_still_accepted(relu_mlp):
    model, X = relu_mlp
    y = torch.randn(len(X), 3)
    assert fl.fisher_trace(model, (X, y), fl.Gaussian(0.5), "empirical") > 0
    assert fl.fisher_trace(model, (X, y), fl.LossInduced(fl.losses.lp_norm(2)), "empirical") > 0


@pytest.mark.parametrize("call", list(EMPIRICAL_CALLS))
def test_loss_nan_for_some_inputs_refused(relu_mlp, call):
    model, X = relu_mlp
    y = torch.zeros(len(X), 3)
    with torch.no_grad():
        f = model(X)
    # sqrt of a negative number: NaN value (and gradient) where an output is negative
    L = fl.LossInduced(lambda f, y: torch.sqrt(f - y).sum(-1))
    assert (f < 0).any()
    raises(ValueError, r"NaN or inf \(value\)", EMPIRICAL_CALLS[call], model, (X, y), L)
    # finite value, NaN gradient: |f − y|^½ at f = y (0 · inf)
    L = fl.LossInduced(lambda f, y: (f - y).abs().sqrt().sum(-1))
    raises(ValueError, r"NaN or inf \(gradient", EMPIRICAL_CALLS[call], model, (X, f.clone()), L)
    # log of zero: inf value
    L = fl.LossInduced(lambda f, y: -torch.log(torch.relu(f - y)).sum(-1))
    raises(ValueError, r"loss's domain", EMPIRICAL_CALLS[call], model, (X, y), L)


def test_exact_true_fisher_of_a_language_model_is_refused_with_the_estimators_named():
    """(B, T, V) logits: the exact true Fisher needs T·V sandwich columns per input; refused before allocating,
    naming the one-backward estimators."""
    lm = nn.Sequential(nn.Embedding(4096, 8), nn.Linear(8, 4096)).eval()
    ids = torch.randint(0, 4096, (2, 64))
    for call in ("diag", "trace", "blocks_diag"):
        raises(ValueError, r"method='hutchinson'", fisher_calls("true")[call], lm, (ids, ids), fl.Categorical())
