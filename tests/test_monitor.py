"""fl.Monitor: every observable equals the direct library call at the same step (float64), schedules,
step counting, resuming from a state dict, the run folder's CSV, the batch (training-forward) path, and errors
(a run folder that is a file, a state dict with missing keys)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import raises
from torch import nn
from zoo import FreeScale, build

import fisherlens as fl
from fisherlens.runs import RunDir, read_csv

pytestmark = pytest.mark.usefixtures("float64")

PROBE_OBS = ("loss", "accuracy", "fisher_trace", "ntk_trace", "relation", "top_eigenvalue", "rao_norm",
             "grad_norm", "path_length")
RTOL = 1e-9


def _setup(arch="mlp_relu", n_probe=9, n_train=12, seed=0):
    model, X = build(arch, seed=seed, n=n_probe + n_train)
    gen = torch.Generator().manual_seed(7 + seed)
    y = torch.randint(0, 3, (len(X),), generator=gen)
    probe = (X[:n_probe], y[:n_probe])
    return model, probe, (X[n_probe:], y[n_probe:])


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _train_step(model, opt, x, y, lik=None):
    out = model(x)
    loss = F.cross_entropy(out, y) if lik is None else lik.loss(out, y).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, out


def _close(a, b, what, rtol=RTOL):
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-13), f"{what}: monitor {a!r} != library {b!r}"


@pytest.mark.parametrize("arch", ["mlp_relu", "cnn2d"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_probe_observables_equal_library(arch, kind):
    model, probe, (Xt, yt) = _setup(arch)
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=PROBE_OBS, every=2, kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    thetas, snaps = [], []
    for s in range(1, 7):
        loss, _ = _train_step(model, opt, Xt, yt)
        rec = mon.step(loss=loss)
        if s % 2:
            assert rec is None
            continue
        m = model
        assert rec["step"] == s and rec["batch_loss"] == loss.item()
        with torch.no_grad():
            f = m(probe[0])
        _close(rec["loss"], F.cross_entropy(f, probe[1]).item(), "loss", 1e-12)
        _close(rec["accuracy"], (f.argmax(-1) == probe[1]).double().mean().item(), "accuracy", 1e-12)
        _close(rec["fisher_trace"], fl.fisher_trace(m, probe, lik, kind), "fisher_trace")
        _close(rec["ntk_trace"], fl.ntk_trace(m, probe[0], reduction="mean"), "ntk_trace")
        rel = fl.fisher_ntk_trace(m, probe, lik, kind)
        _close(rec["ntk_side"], rel.ntk_side, "ntk_side")
        _close(rec["relation_ratio"], rel.ratio, "relation_ratio")
        top = fl.eigenvalues(m, probe, lik, kind=kind, method="dense")[0].item()
        _close(rec["top_eigenvalue"], top, "top_eigenvalue", 1e-7)
        _close(rec["rao_norm"], fl.fisher_rao_norm(m, probe, lik, kind), "rao_norm")
        mp = copy.deepcopy(m)
        F.cross_entropy(mp(probe[0]), probe[1]).backward()
        gn = torch.cat([p.grad.reshape(-1) for p in mp.parameters()]).norm().item()
        _close(rec["grad_norm"], gn, "grad_norm")
        # path length: Σ sqrt(Δθᵀ F(θ_prev) Δθ) with the dense library Fisher at the previous record
        thetas.append(_flat(m))
        snaps.append(copy.deepcopy(m))
        ref = 0.0
        for k in range(1, len(thetas)):
            d = thetas[k] - thetas[k - 1]
            ref += math.sqrt(d @ fl.fisher_matrix(snaps[k - 1], probe, lik, kind) @ d)
        _close(rec["path_length"], ref, "path_length")
    assert [r["step"] for r in mon.records] == [2, 4, 6]
    assert mon.records[-1]["path_length"] > 0


def test_path_length_equals_geometry_path_length():
    model, probe, (Xt, yt) = _setup("mlp_relu")
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=("path_length",))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    thetas = [_flat(model)]
    mon.record(0)
    for _ in range(4):
        _train_step(model, opt, Xt, yt)
        mon.step()
        thetas.append(_flat(model))
    metric = fl.geometry.fisher_metric(model, probe, lik, "true")
    want = fl.geometry.path_length(metric, torch.stack(thetas))
    _close(mon.records[-1]["path_length"], want, "path_length", 1e-8)
    assert mon.records[0]["path_length"] == 0.0


def test_hutchinson_probe_record_equals_library_draw():
    model, probe, (Xt, yt) = _setup("mlp_relu")
    lik, gen = fl.Categorical(), torch.Generator().manual_seed(3)
    mon = fl.Monitor(model, lik, probe, observables=("fisher_trace",), method="hutchinson", draws=3, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        _train_step(model, opt, Xt, yt)
        state = gen.get_state()
        rec = mon.step()
        g2 = torch.Generator()
        g2.set_state(state)
        want = fl.fisher_trace(model, probe, lik, "true", "hutchinson", samples=3, generator=g2)
        assert rec["fisher_trace"] == float(want)


BATCH_CASES = [("true", "exact", 1), ("true", "hutchinson", 1), ("true", "hutchinson", 3), ("empirical", "exact", 1)]


@pytest.mark.parametrize("arch", ["mlp_tanh", "cnn2d"])
@pytest.mark.parametrize("kind,method,draws", BATCH_CASES)
def test_batch_fisher_trace_equals_library(arch, kind, method, draws):
    """The training-batch trace at θ before the step equals fl.fisher_trace on that batch (same draws)."""
    model, probe, (Xt, yt) = _setup(arch)
    model.train()
    lik, gen = fl.Categorical(), torch.Generator().manual_seed(11)
    mon = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace", "loss"), kind=kind, method=method,
                     draws=draws, generator=gen, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for s in range(1, 6):
        xb, yb = Xt[s % 3 :], yt[s % 3 :]
        state = gen.get_state()
        before = copy.deepcopy(model).eval()
        loss, out = _train_step(model, opt, xb, yb)
        rec = mon.step(loss=loss, outputs=out, targets=yb)
        if s % 2:
            assert rec is None
            continue
        if method == "hutchinson":
            g2 = torch.Generator()
            g2.set_state(state)
            want = fl.fisher_trace(before, (xb, yb), lik, kind, method, samples=draws, generator=g2, per_sample=True)
        else:
            want = fl.fisher_trace(before, (xb, yb), lik, kind)
        _close(rec["batch_fisher_trace"], float(want), "batch_fisher_trace")
    mon.close()


@pytest.mark.parametrize("pass_loss", [False, True])
def test_batch_empirical_detects_loss_scale(pass_loss):
    """Mean or sum of the likelihood's loss (found from the loss value, or from ∂loss/∂f); a foreign loss raises."""
    model, probe, (Xt, yt) = _setup("mlp_tanh")
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="empirical")
    want = fl.fisher_trace(model, (Xt, yt), lik, "empirical")
    reg = sum(p.square().sum() for p in model.parameters())  # depends on θ only: ∂/∂f unchanged
    for scale, extra, ok in ((1.0, 0, True), (len(Xt), 0, True), (1.0, reg, True), (2.0, 0, False)):
        loss = lik.loss(model(Xt), yt).mean() * scale + extra
        loss.backward()
        kw = {"loss": loss} if pass_loss else {}
        if ok:
            _close(mon.step(targets=yt, **kw)["batch_fisher_trace"], float(want), f"scale {scale}")
        else:
            with pytest.raises(ValueError, match="residual"):
                mon.step(targets=yt, **kw)
    model(Xt).sum().backward()
    with pytest.raises(ValueError, match="targets=y"):
        mon.step()


def test_batch_hutchinson_unbiased():
    """Mean of many one-draw batch records ≈ the exact trace, within the draws' own standard error."""
    model, probe, (Xt, yt) = _setup("mlp_tanh")
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), method="hutchinson",
                     generator=torch.Generator().manual_seed(5))
    vals = []
    for _ in range(400):
        F.cross_entropy(model(Xt), yt).backward()
        vals.append(mon.step()["batch_fisher_trace"])
    v = torch.tensor(vals)
    exact = fl.fisher_trace(model, (Xt, yt), lik, "true")
    se = v.std().item() / math.sqrt(len(v))
    assert v.std() > 0 and abs(v.mean().item() - exact) < 4 * se


def test_probe_hutchinson_unbiased():
    model, probe, _ = _setup("mlp_relu")
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=("fisher_trace",), method="hutchinson",
                     generator=torch.Generator().manual_seed(9))
    v = torch.tensor([mon.record(k)["fisher_trace"] for k in range(300)])
    exact = fl.fisher_trace(model, probe, lik, "true")
    assert abs(v.mean().item() - exact) < 4 * v.std().item() / math.sqrt(len(v))


def test_schedules_and_step_counting():
    model, probe, _ = _setup()
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=("loss",), every=3)
    got = [mon.step() is not None for _ in range(9)]
    assert got == [False, False, True] * 3 and [r["step"] for r in mon.records] == [3, 6, 9]
    assert mon.step_count == 9
    mon = fl.Monitor(model, lik, probe, observables=("loss",), every=lambda s: s in (1, 2, 5) or s >= 20)
    for _ in range(6):
        mon.step()
    assert [r["step"] for r in mon.records] == [1, 2, 5]
    assert mon.step(20)["step"] == 20 and mon.step()["step"] == 21 and mon.step_count == 21
    mon = fl.Monitor(model, lik, probe, observables=("loss",), every=100)
    assert mon.record()["step"] == 0 and mon.step() is None and mon.step_count == 1
    assert mon.record(50, lr=0.1)["lr"] == 0.1 and mon.step_count == 50
    assert mon.step(100)["step"] == 100 and len(mon.records) == 3


def test_record_without_training_batch_is_nan_and_warns_when_scheduled():
    model, probe, (Xt, yt) = _setup("mlp_tanh")
    mon = fl.Monitor(model, fl.Categorical(), probe, observables=("batch_fisher_trace",))
    assert math.isnan(mon.record(0)["batch_fisher_trace"])
    with pytest.warns(UserWarning, match="no training forward"):
        assert math.isnan(mon.step()["batch_fisher_trace"])
    with torch.no_grad():  # an evaluation forward is not captured
        model(Xt)
    F.cross_entropy(model(Xt), yt).backward()
    assert mon.step()["batch_fisher_trace"] > 0


def _resume_run(tmp_path, split: int | None):
    """Train 8 steps with a monitor; if ``split``, checkpoint there and resume in fresh objects."""
    model, probe, (Xt, yt) = _setup("mlp_tanh")
    lik = fl.Categorical()

    def make(model, run):
        return fl.Monitor(model, lik, probe, observables=("loss", "fisher_trace", "path_length", "batch_fisher_trace"),
                          every=lambda s: s % 2 == 0 or s == 3, method="hutchinson", draws=2,
                          generator=torch.Generator().manual_seed(1), run=run)

    run = tmp_path / ("split" if split else "whole")
    mon = make(model, run)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    mon.record(0)
    for s in range(1, 9):
        if split and s == split + 1:
            ck = tmp_path / "ck.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()}, ck)
            mon.close()
            state = torch.load(ck, weights_only=True)
            model, _, _ = _setup("mlp_tanh", seed=5)  # other weights: everything must come from the state
            model.load_state_dict(state["model"])
            opt = torch.optim.Adam(model.parameters(), lr=0.05)
            opt.load_state_dict(state["opt"])
            mon = make(model, run)
            mon.load_state_dict(state["mon"])
        i = torch.arange(s, s + 6) % len(Xt)
        loss, out = _train_step(model, opt, Xt[i], yt[i])
        mon.step(loss=loss)
    return mon.records, read_csv(run / "metrics.csv")


def test_state_dict_round_trip_gives_identical_records(tmp_path):
    whole, csv_whole = _resume_run(tmp_path, None)
    resumed, csv_resumed = _resume_run(tmp_path, 5)
    assert [r["step"] for r in whole] == [0, 2, 3, 4, 6, 8]
    assert str(resumed) == str(whole)  # repr of every float: bit-identical (NaN included)
    assert csv_resumed == csv_whole
    assert whole[-1]["path_length"] > 0


def test_run_folder_csv(tmp_path):
    model, probe, (Xt, yt) = _setup()
    rd = RunDir(tmp_path / "r", {"what": "test"})
    mon = fl.Monitor(model, fl.Categorical(), probe, observables=("loss", "relation"), run=rd)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss, _ = _train_step(model, opt, Xt, yt)
        mon.step(loss=loss, lr=0.1)
    rows = read_csv(rd.file("metrics.csv"))
    assert list(rows[0]) == ["step", "loss", "fisher_trace", "ntk_side", "relation_ratio", "batch_loss", "lr"]
    assert [{k: float(v) for k, v in r.items()} for r in rows] == mon.records
    assert not [p for p in rd.path.iterdir() if p.name.endswith(".tmp")]
    # a second monitor on a plain folder path
    mon2 = fl.Monitor(model, fl.Categorical(), probe, observables=("loss",), run=tmp_path / "plain")
    mon2.record(0)
    assert read_csv(tmp_path / "plain" / "metrics.csv")[0]["step"] == "0"


def test_model_state_untouched():
    model, probe, (Xt, yt) = _setup("cnn2d")
    model.train()
    model[2].eval()  # a mixed mode, restored module by module
    F.cross_entropy(model(Xt), yt).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    mon = fl.Monitor(model, fl.Categorical(), probe, observables=PROBE_OBS, method="exact")
    mon.record(0)
    mon.record(1)
    mon2 = fl.Monitor(model, fl.Categorical(), probe, observables=("fisher_trace", "batch_fisher_trace"),
                      method="hutchinson")
    model.eval()
    F.cross_entropy(model(Xt), yt)  # captured forward, no backward of ours into .grad
    mon2.step()
    model.train()
    model[2].eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for p, g, q in zip(model.parameters(), grads, params, strict=True):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), q)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_library_calls_are_not_captured(kind):
    """Library calls that run the model as itself (the estimators' plain-autograd forward, batched backward
    included) before the training forward are neither captured nor disturbed by the Monitor's hooks."""
    model, probe, (Xt, yt) = _setup("mlp_tanh")
    lik = fl.Categorical()
    mon = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind=kind)
    gen = torch.Generator().manual_seed(3)
    est = fl.fisher_diag(model, probe, lik, method="hutchinson", samples=3, generator=gen)  # batched backward
    assert torch.isfinite(est.value).all()
    loss, out = _train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), Xt, yt)
    _close(mon.step(loss=loss, outputs=out, targets=yt)["batch_fisher_trace"],
           float(fl.fisher_trace(model, (Xt, yt), lik, kind)), "batch_fisher_trace")
    mon.close()


def test_deepcopy_of_monitored_model_is_not_monitored():
    model, probe, (Xt, yt) = _setup("mlp_tanh")
    mon = fl.Monitor(model, fl.Categorical(), probe, observables=("batch_fisher_trace",))
    twin = copy.deepcopy(model)
    F.cross_entropy(twin(Xt), yt).backward()  # the copy's forward is not captured
    with pytest.warns(UserWarning, match="no training forward"):
        mon.step()
    mon.close()
    F.cross_entropy(model(Xt), yt).backward()
    with pytest.warns(UserWarning, match="no training forward"):
        mon.step()  # hooks removed


def test_bernoulli_and_gaussian():
    model, X = build("one_output", n=10)
    y = (X[:, 0] > 0).double()
    lik = fl.Bernoulli()
    rec = fl.Monitor(model, lik, (X, y), observables=("loss", "accuracy", "fisher_trace")).record(0)
    with torch.no_grad():
        f = model(X)[:, 0]
    _close(rec["accuracy"], ((f > 0).double() == y).double().mean().item(), "accuracy")
    _close(rec["loss"], F.binary_cross_entropy_with_logits(f, y).item(), "loss")
    model, X = build("mlp_tanh", n=6)
    Y = torch.randn(6, 3, dtype=torch.float64)
    rec = fl.Monitor(model, fl.Gaussian(0.5), (X, Y), observables=("loss", "fisher_trace", "grad_norm")).record(0)
    _close(rec["fisher_trace"], fl.fisher_trace(model, (X, Y), fl.Gaussian(0.5)), "fisher_trace")


def test_dataloader_probe():
    model, probe, _ = _setup()
    lik = fl.Categorical()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*probe), batch_size=4)
    a = fl.Monitor(model, lik, loader, observables=PROBE_OBS).record(0)
    b = fl.Monitor(model, lik, probe, observables=PROBE_OBS).record(0)
    for k in a:
        _close(a[k], b[k], k, 1e-7 if k == "top_eigenvalue" else 1e-10)


def test_tensorboard_absent_warns(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        model, probe, _ = _setup()
        with pytest.warns(UserWarning, match="tensorboard"):
            fl.Monitor(model, fl.Categorical(), probe, observables=("loss",), tensorboard=tmp_path / "tb")
    else:
        model, probe, _ = _setup()
        mon = fl.Monitor(model, fl.Categorical(), probe, observables=("loss",), tensorboard=tmp_path / "tb")
        mon.record(0)
        mon.close()
        assert any((tmp_path / "tb").iterdir())


def test_bad_input():
    model, probe, _ = _setup()
    lik = fl.Categorical()

    def mk(**kw):
        return fl.Monitor(model, kw.pop("lik", lik), kw.pop("probe", probe), **kw)

    with pytest.raises(ValueError, match="Unknown observable 'nope'"):
        mk(observables=("loss", "nope"))
    with pytest.raises(ValueError, match="observables is empty"):
        mk(observables=())
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            mk(every=bad)
    with pytest.raises(ValueError, match="draws"):
        mk(draws=0)
    with pytest.raises(ValueError, match="kind"):
        mk(kind="mc")
    with pytest.raises(ValueError, match="hutchinson"):
        mk(kind="empirical", method="hutchinson")
    with pytest.raises(ValueError, match="method"):
        mk(method="mc")
    with pytest.raises(ValueError, match="clashes"):
        mk(observables=("fisher_trace", "relation"), method="hutchinson")
    with pytest.raises(ValueError, match="accuracy needs a classifier"):
        mk(lik=fl.Gaussian(), observables=("accuracy",))
    with pytest.raises(ValueError, match="kind='empirical'"):
        mk(lik=fl.LossInduced(fl.losses.softmax_cross_entropy()))
    with pytest.raises(TypeError, match="one-shot iterator"):
        mk(probe=iter([probe]))
    with pytest.raises(TypeError, match="generator"):
        mk(generator=3)
    with pytest.raises(TypeError, match="model"):
        fl.Monitor("model", lik, probe)
    with pytest.raises(ValueError, match="params="):
        mk(params=["nonexistent"])
    free = FreeScale().double().eval()  # a raw gain parameter: no layer rule owns it
    Xf = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch_fisher_trace needs.*BatchNorm\* \(eval mode\).*\['gain'\]"):
        fl.Monitor(free, lik, (Xf, torch.zeros(4, dtype=torch.long)), observables=("batch_fisher_trace",))
    mon = mk(observables=("loss",))
    with pytest.raises(ValueError, match="clashes"):
        mon.record(0, loss=1.0)
    with pytest.raises(ValueError, match="scalar"):
        mon.record(0, x=torch.ones(2))
    with pytest.raises(ValueError, match="step"):
        mon.step(-1)
    with pytest.raises(ValueError, match="configured differently"):
        mk(observables=("loss", "grad_norm")).load_state_dict(mon.state_dict())
    with pytest.raises(ValueError, match="Not a fisherlens Monitor state"):
        mon.load_state_dict({"records": []})
    unlabeled = mk(probe=(probe[0], None), observables=("loss",))
    with pytest.raises(ValueError, match="labels"):
        unlabeled.record(0)
    fine = mk(probe=(probe[0], None), observables=("fisher_trace", "ntk_trace", "top_eigenvalue"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fine.record(0)["fisher_trace"] > 0


def test_monitor_is_exported():
    assert fl.Monitor is fl.monitor.Monitor and "Monitor" in fl.__all__
    assert isinstance(nn.Module, type)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_batch_fisher_trace_one_output_gaussian(kind):
    """A model with a 1-D output (B,) and a Gaussian output model."""
    model, X = build("vector_output", n=8)
    Y = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lik = fl.Gaussian(0.7)
    mon = fl.Monitor(model, lik, (X, Y), observables=("batch_fisher_trace",), kind=kind)
    out = model(X)
    lik.loss(out[:, None], Y).mean().backward()
    rec = mon.step(targets=Y)
    _close(rec["batch_fisher_trace"], fl.fisher_trace(model, (X, Y), lik, kind), "batch_fisher_trace")


def test_batch_fisher_trace_refuses_batchnorm_in_training_mode():
    model, X = build("batchnorm", n=8)
    y = torch.zeros(8, dtype=torch.long)
    mon = fl.Monitor(model, fl.Categorical(), (X, y), observables=("batch_fisher_trace",), params=["0", "3"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(X)
    model.eval()
    F.cross_entropy(model(X), y).backward()
    _close(mon.step()["batch_fisher_trace"],
           fl.fisher_trace(model, (X, y), fl.Categorical(), params=["0", "3"]), "batch_fisher_trace")


# ----------------------------------------------------------------------------- run folder and state errors
@pytest.fixture
def mlp():
    model, X = build("mlp_relu", seed=60)
    return model, X


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
