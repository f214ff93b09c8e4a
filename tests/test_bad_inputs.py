"""Never silently wrong: inputs that used to give NaN, inf, an uninitialised tensor or a quietly truncated answer
now raise ``ValueError``/``TypeError`` with a message that names the cause (and the valid neighbours still work).

One test per case of the issue: non-finite targets, non-finite losses, a Gaussian σ whose 1/σ² does not fit the
dtype, ``ntk`` batch sizes, ``eigenvalues`` k beyond the rank bound, ``spectrum_stats`` of NaNs, metrics that are
not symmetric positive definite or whose autograd graph is cut, mean-field widths and variances, Monitor run
folders and states.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, build

import fisherlens as fl
from fisherlens.theory.random_networks import MLPEnsemble

pytestmark = pytest.mark.usefixtures("float64")

G = fl.geometry
D = torch.float64
NAN, INF = float("nan"), float("inf")
CALLS = {
    "trace": lambda m, d, L: fl.fisher_trace(m, d, L, "empirical"),
    "diag": lambda m, d, L: fl.fisher_diag(m, d, L, "empirical"),
    "matrix": lambda m, d, L: fl.fisher_matrix(m, d, L, "empirical"),
    "relation": lambda m, d, L: fl.fisher_ntk_trace(m, d, L, "empirical"),
}


def raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


@pytest.fixture
def mlp():
    model, X = build("mlp_relu", seed=60)
    return model, X


@pytest.fixture
def one():
    model, X = build("one_output", seed=61)
    return model, X


# ----------------------------------------------------------------------------- 1. non-finite targets
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_targets_refused(mlp, one, call, value):
    fn = CALLS[call]
    model, X = mlp
    y = torch.randn(len(X), 3)
    y[4, 1] = value
    raises(ValueError, r"Gaussian targets contain NaN or inf", fn, model, (X, y), fl.Gaussian(0.5))
    raises(ValueError, r"targets contain NaN or inf", fn, model, (X, y), fl.LossInduced(fl.losses.lp_norm(2)))
    labels = torch.tensor([0.0, 1.0, 2.0, 0.0, value, 1.0, 2.0])  # float class indices
    raises(ValueError, r"Categorical labels contain NaN or inf", fn, model, (X, labels), fl.Categorical())
    probs = torch.full((len(X), 3), 1 / 3)
    probs[2] = torch.tensor([value, 0.5, 0.5])
    raises(ValueError, r"Categorical labels contain NaN or inf", fn, model, (X, probs), fl.Categorical())
    model1, X1 = one
    yb = torch.tensor([0.0, 1.0, 1.0, value, 0.0, 1.0, 0.0])
    raises(ValueError, r"Bernoulli labels contain NaN or inf", fn, model1, (X1, yb), fl.Bernoulli())


def test_finite_targets_still_accepted(mlp):
    model, X = mlp
    y = torch.randn(len(X), 3)
    assert fl.fisher_trace(model, (X, y), fl.Gaussian(0.5), "empirical") > 0
    assert fl.fisher_trace(model, (X, y), fl.LossInduced(fl.losses.lp_norm(2)), "empirical") > 0


# ----------------------------------------------------------------------------- 2. non-finite losses
@pytest.mark.parametrize("call", list(CALLS))
def test_loss_nan_for_some_inputs_refused(mlp, call):
    model, X = mlp
    y = torch.zeros(len(X), 3)
    with torch.no_grad():
        f = model(X)
    # sqrt of a negative number: NaN value (and gradient) where an output is negative
    L = fl.LossInduced(lambda f, y: torch.sqrt(f - y).sum(-1))
    assert (f < 0).any()
    raises(ValueError, r"NaN or inf \(value\)", CALLS[call], model, (X, y), L)
    # finite value, NaN gradient: |f − y|^½ at f = y (0 · inf)
    L = fl.LossInduced(lambda f, y: (f - y).abs().sqrt().sum(-1))
    raises(ValueError, r"NaN or inf \(gradient", CALLS[call], model, (X, f.clone()), L)
    # log of zero: inf value
    L = fl.LossInduced(lambda f, y: -torch.log(torch.relu(f - y)).sum(-1))
    raises(ValueError, r"loss's domain", CALLS[call], model, (X, y), L)


# ----------------------------------------------------------------------------- 3. Gaussian sigma vs dtype
def test_gaussian_sigma_must_fit_the_dtype(mlp):
    model, X = mlp
    model32, X32 = model.float(), X.float()
    y32 = torch.randn(len(X), 3, dtype=torch.float32)
    for sigma in (1e-30, 1e-21, 1e-19 / 2):  # 1/σ² overflows float32 or σ² is a denormal (limit 1.08e-19)
        for kind in ("true", "empirical", "mc"):
            raises(ValueError, r"1/sigma² overflows to inf .* in torch\.float32", fl.fisher_trace, model32,
                   (X32, y32), fl.Gaussian(sigma), kind)
    raises(ValueError, r"underflows to 0 .* in torch\.float32", fl.fisher_trace, model32, (X32, y32),
           fl.Gaussian(1e20))
    # float64 cannot hold 1/σ² either: refused at construction
    raises(ValueError, r"overflows to inf .* in torch\.float64", fl.Gaussian, 1e-160)
    raises(ValueError, r"sigma must be a positive finite number", fl.Gaussian, -0.0)
    raises(TypeError, r"sigma", fl.Gaussian, "small")


def test_small_gaussian_sigma_in_float32_that_fits_is_right(mlp):
    """A small σ whose σ² and 1/σ² fit float32 gives the scaled Fisher (true: 1/σ², empirical: 1/σ⁴)."""
    model, X = mlp
    y = torch.randn(len(X), 3)
    ref = {k: fl.fisher_trace(model, (X, y), fl.Gaussian(1.0), k) for k in ("true", "empirical")}
    model32, X32, y32 = model.float(), X.float(), y.float()
    for kind, sigma, scale in (("true", 1e-15, 1e30), ("empirical", 1e-8, 1e32)):
        got = fl.fisher_trace(model32, (X32, y32), fl.Gaussian(sigma), kind)
        assert math.isfinite(got)
        assert got == pytest.approx(ref[kind] * scale, rel=1e-4), kind


# ----------------------------------------------------------------------------- 4. ntk batch sizes
@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True, "4"])
def test_ntk_bad_batch_size(mlp, batch_size):
    model, X = mlp
    raises(ValueError, r"batch_size", fl.ntk, model, X, batch_size=batch_size)
    raises(ValueError, r"batch_size", fl.ntk, model, X, X[:3], batch_size=batch_size)
    raises(ValueError, r"batch_size", fl.ntk_trace, model, X, batch_size=batch_size)
    raises(ValueError, r"batch_size", fl.fisher_ntk_trace, model, (X, None), fl.Categorical(), "true",
           batch_size=batch_size)


def test_ntk_chunked_equals_one_pass(mlp):
    model, X = mlp
    full = fl.ntk(model, X)
    assert_close(fl.ntk(model, X, batch_size=2), full, what="ntk in chunks of 2")
    assert_close(fl.ntk(model, X, X[:3], batch_size=1), full[:, :3], what="ntk x1 × x2 in chunks of 1")


# ----------------------------------------------------------------------------- 5. eigenvalues: k beyond the rank
def test_eigenvalues_k_larger_than_p(mlp):
    model, X = mlp
    P = sum(p.numel() for p in model.parameters())
    assert P == 51
    for method in ("auto", "dense", "gram", "lanczos"):
        raises(ValueError, rf"k <= {P}", fl.eigenvalues, model, (X, None), fl.Categorical(), k=1000, method=method)
    assert len(fl.eigenvalues(model, (X, None), fl.Categorical(), k=P, method="dense")) == P


def test_eigenvalues_gram_k_larger_than_nk(mlp):
    model, X = mlp
    NK = len(X) * 3  # true Fisher of a 3-class Categorical: K = C = 3 columns per input
    raises(ValueError, rf"k <= {NK}", fl.eigenvalues, model, (X, None), fl.Categorical(), k=NK + 1, method="gram")
    # streamed: N·K is only known once the data is read
    batches = [(X[:4], None), (X[4:], None)]
    raises(ValueError, rf"k <= {NK}", fl.eigenvalues, model, batches, fl.Categorical(), k=NK + 1, method="gram")
    top = fl.eigenvalues(model, batches, fl.Categorical(), k=NK, method="gram")
    dense = fl.eigenvalues(model, (X, None), fl.Categorical(), k=NK, method="dense")
    assert_close(top, dense, rtol=1e-8, what="Gram top-N·K vs dense")


# ----------------------------------------------------------------------------- 6. spectrum_stats
@pytest.mark.parametrize("bad", [[1.0, NAN, 0.5], [INF, 1.0], [NAN]])
def test_spectrum_stats_non_finite(bad):
    raises(ValueError, r"NaN or inf", fl.spectrum_stats, bad)
    raises(ValueError, r"NaN or inf", fl.spectrum_stats, torch.tensor(bad), dim=10)


def test_spectrum_stats_dim():
    raises(ValueError, r"dim must be an integer", fl.spectrum_stats, [1.0, 2.0], dim=2.5)
    raises(ValueError, r"dim must be an integer", fl.spectrum_stats, [1.0, 2.0], dim=True)
    assert fl.spectrum_stats([2.0, 1.0], dim=4.0)["mean"] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- 7. metrics that are not metrics
def indefinite(q):
    return torch.diag(torch.stack([1 + q[0] ** 2, -(1 + q[1] ** 2)]))


def asymmetric(q):
    return torch.stack([torch.stack([1 + q[0] ** 2, 0.3 + 0 * q[0]]), torch.stack([0 * q[0], 1 + q[1] ** 2])])


def with_item(q):  # .item() cuts the graph: forward-mode derivatives read 0
    a = q[0].item()
    return torch.tensor([[1.0, 0.0], [0.0, 1.0 + a * a]], dtype=D)


def with_detach(q):
    t = q.detach()
    return torch.diag(torch.stack([torch.ones((), dtype=D), 1 + t[0] ** 2 + t[1] ** 2]))


def with_numpy(q):
    return torch.as_tensor([[1.0, 0.0], [0.0, 1.0 + float(q.numpy()[0]) ** 2]], dtype=D)


POINT_FNS = [G.christoffel, G.riemann, G.ricci, G.scalar_curvature]
TH = torch.tensor([0.3, 0.2], dtype=D)


@pytest.mark.parametrize("fn", POINT_FNS)
def test_indefinite_and_asymmetric_metrics_refused(fn):
    raises(ValueError, r"not positive definite: its smallest eigenvalue is -1\.04", fn, indefinite, TH)
    raises(ValueError, r"smallest eigenvalue", fn, indefinite, TH, regularize=10.0)  # not a conditioning problem
    raises(ValueError, r"not symmetric", fn, asymmetric, TH)


def test_indefinite_metric_in_batch_and_path():
    q = torch.tensor([[0.3, 0.2], [0.1, 0.4]], dtype=D)
    with pytest.warns(G.IllConditionedMetricWarning, match="2 of 2 points are singular"):
        c = G.curvature(indefinite, q, regularize=1e-3)
    assert c.singular.all() and torch.isnan(c.scalar).all() and not c.regularized.any()
    assert "smallest eigenvalue is -1.04" in c.reason[0]
    raises(ValueError, r"smallest eigenvalue", G.path_length, indefinite, q)


@pytest.mark.parametrize("fn", POINT_FNS)
@pytest.mark.parametrize("metric", [with_item, with_detach])
def test_metric_with_cut_graph_refused(fn, metric):
    raises(ValueError, r"autograd.*\.item\(\)", fn, metric, TH)


def test_metric_with_cut_graph_refused_in_batch():
    q = torch.tensor([[0.3, 0.2], [0.1, 0.4]], dtype=D)
    raises(ValueError, r"autograd", G.curvature, with_detach, q)
    raises(ValueError, r"\.item\(\)", G.curvature, with_item, q)  # fails under vmap
    raises(ValueError, r"\.item\(\)", G.path_length, with_item, q)
    raises(ValueError, r"torch operations", G.scalar_curvature, with_numpy, TH)
    # the length needs no derivatives: a detached metric gives the right value
    assert G.path_length(with_detach, q) > 0


def test_constant_and_flat_points_still_fine():
    const = lambda q: torch.eye(2, dtype=D)  # noqa: E731 - no autograd dependence, genuinely constant
    assert G.scalar_curvature(const, TH) == 0.0
    assert not G.christoffel(const, TH).any()
    quad = lambda q: torch.diag(1 + q**2)  # noqa: E731 - derivatives exactly 0 at the origin, graph intact
    assert not G.christoffel(quad, torch.zeros(2, dtype=D)).any()
    c = G.curvature(const, torch.randn(3, 2, dtype=D))
    assert (c.scalar == 0).all() and not c.singular.any()


# ----------------------------------------------------------------------------- 8. mean-field theory
def test_meanfield_widths_must_be_positive():
    th = fl.theory.meanfield("relu", 2.0, 0.1, 3, samples=100)
    for M in (0, -5.0, NAN, INF, [100.0, 0.0]):
        for method in (th.mean_eigenvalue, th.second_moment, th.max_eigenvalue, th.critical_learning_rate,
                       th.variance, th.large_output_bounds, th.n_params):
            raises(ValueError, r"M \(the width scale", method, M)
        raises(ValueError, r"M \(the width scale", th.count_bound, M, 1.0)
    raises(ValueError, r"M \(the width scale", th.layer_widths, 0)
    raises(ValueError, r"k \(the eigenvalue threshold\)", th.count_bound, 100.0, 0.0)
    assert th.critical_learning_rate(100.0) > 0


def test_meanfield_variances():
    raises(ValueError, r"sigma_w2 must be finite and positive", fl.theory.meanfield, "relu", 0.0, 0.1, 3)
    raises(ValueError, r"sigma_w2", fl.theory.meanfield, "relu", [2.0, 0.0, 2.0], 0.1, 3)
    raises(ValueError, r"sigma_b2 must be finite and non-negative", fl.theory.meanfield, "relu", 2.0, -0.1, 3)
    raises(ValueError, r"q0", fl.theory.meanfield, "relu", 2.0, 0.1, 3, q0=0.0)
    raises(ValueError, r"q0_st", fl.theory.meanfield, "relu", 2.0, 0.1, 3, q0_st=2.0)
    # an odd activation without bias and T = ∞: λ_max = 0 at leading order, so no finite η_c
    with pytest.warns(UserWarning, match="kappa2 = 0"):
        th = fl.theory.meanfield("tanh", 1.5, 0.0, 3)
    raises(ValueError, r"no finite critical learning rate", th.critical_learning_rate, 100.0)


def test_random_networks_variances_and_sizes():
    gen = torch.Generator().manual_seed(0)
    raises(ValueError, r"sigma_w2", MLPEnsemble.sample, 2, [3, 4, 1], "relu", 0.0, 0.1, gen)
    raises(ValueError, r"sigma_w2", MLPEnsemble.sample, 2, [3, 4, 1], "relu", -1.0, 0.1, gen)
    raises(ValueError, r"sigma_b2", MLPEnsemble.sample, 2, [3, 4, 1], "relu", 1.0, NAN, gen)
    raises(ValueError, r"E \(the number of networks\)", MLPEnsemble.sample, 0, [3, 4, 1], "relu", 1.0, 0.1, gen)
    raises(ValueError, r"positive integer entries", MLPEnsemble.sample, 2, [3, 4.5, 1], "relu", 1.0, 0.1, gen)
    raises(ValueError, r"sigma_w2", fl.theory.random_mlp, "relu", 0.0, 0.0, [3, 4, 1])
    assert fl.theory.random_mlp("relu", 2.0, 0.0, [3, 4, 1], generator=gen)(torch.randn(2, 3)).shape == (2, 1)


# ----------------------------------------------------------------------------- 9. Monitor run folder and state
def test_monitor_run_is_a_file(mlp, tmp_path):
    model, X = mlp
    probe = (X, torch.zeros(len(X), dtype=torch.long))
    f = tmp_path / "notes.txt"
    f.write_text("not a folder")
    raises(ValueError, r"existing file, not a folder", fl.Monitor, model, fl.Categorical(), probe,
           observables=("loss",), run=f)
    raises(ValueError, r"existing file", fl.Monitor, model, fl.Categorical(), probe, observables=("loss",),
           run=str(f / "sub"))
    raises(TypeError, r"run must be", fl.Monitor, model, fl.Categorical(), probe, observables=("loss",), run=3)
    mon = fl.Monitor(model, fl.Categorical(), probe, observables=("loss",), run=tmp_path / "new" / "run")
    mon.record(0)
    assert (tmp_path / "new" / "run" / "metrics.csv").is_file()


def test_monitor_state_missing_keys(mlp):
    model, X = mlp
    probe = (X, torch.zeros(len(X), dtype=torch.long))
    mon = fl.Monitor(model, fl.Categorical(), probe, observables=("loss",))
    mon.record(0)
    state = mon.state_dict()
    partial = {k: v for k, v in state.items() if k not in ("config", "generator")}
    with pytest.raises(ValueError, match=r"missing keys \['config', 'generator'\]"):
        mon.load_state_dict(partial)
    raises(ValueError, r"'config' is a list", mon.load_state_dict, {**state, "config": []})
    mon.load_state_dict(state)
    assert len(mon.records) == 1
