"""The natural-gradient study (``fisherlens run natural-gradient``): its pieces — the diagonal-preconditioned step is
``θ − η g/(d̂ + λ)`` with the library's Hutchinson diagonal, the critical learning rate is
``fl.critical_learning_rate`` of the Fisher's top eigenvalue, the batch schedule, the training loop against the
library's optimiser, divergence, the pruning sweep — and the quick run end to end through the command line."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F

import fisherlens as fl
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS, STUDIES
from fisherlens.experiments import natural_gradient as ng
from fisherlens.experiments._common import make_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed=0, d=6, h=5, C=3, n=40):
    g = torch.Generator().manual_seed(seed)
    model = make_mlp(d, (h,), C, generator=g)
    X = torch.randn(n, d, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return model, X, y


def _data(n=60, d=6, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 20, d, generator=g)
    y = torch.randint(0, C, (n + 20,), generator=g)
    return {"Xtr": X[:n], "ytr": y[:n], "Xte": X[n:], "yte": y[n:], "Xev": X[:20], "yev": y[:20]}


# ----------------------------------------------------------------------------- the pieces
def test_diag_direction_is_g_over_diag_plus_damping():
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    d = torch.tensor([0.0, 1.0, 3.0, -0.2])  # a negative estimate is clamped to 0
    out = ng.diag_direction(g, d, 0.5)
    assert torch.allclose(out, torch.tensor([1 / 0.5, -2 / 1.5, 3 / 3.5, 0.5 / 0.5]))


def test_diag_step_uses_the_hutchinson_diagonal_of_the_batch():
    model, X, y = _tiny()
    ref = copy.deepcopy(model)
    opt = ng.DiagNaturalGradient(model, lr=0.3, damping=0.05, samples=3, generator=torch.Generator().manual_seed(9))
    loss = opt.step((X, y))
    # the gradient of the batch's mean cross-entropy, and the library's Hutchinson diagonal with the same draws
    ps = list(ref.parameters())
    value = F.cross_entropy(ref(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(value, ps)])
    diag = fl.fisher_diag(ref, (X, y), fl.Categorical(), method="hutchinson", samples=3,
                          generator=torch.Generator().manual_seed(9)).value
    assert loss == pytest.approx(value.item())
    assert torch.allclose(opt.last["grad"], g) and torch.allclose(opt.last["diag"], diag)
    theta0 = torch.nn.utils.parameters_to_vector(ps).detach()
    theta1 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert torch.allclose(theta1, theta0 - 0.3 * g / (diag.clamp_min(0) + 0.05), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_hutchinson_diagonal_estimates_the_exact_one():
    """The baseline's preconditioner is an unbiased estimate of the exact Fisher diagonal (many draws)."""
    model, X, y = _tiny(n=16)
    exact = fl.fisher_diag(model, (X, y), fl.Categorical())
    est = fl.fisher_diag(model, (X, y), fl.Categorical(), method="hutchinson", samples=4000,
                         generator=torch.Generator().manual_seed(0))
    assert (est.value >= 0).all()
    assert float((est.value - exact).norm() / exact.norm()) < 0.1


def test_critical_lr_is_the_library_rate_of_the_top_eigenvalue():
    model, X, y = _tiny()
    lam, eta = ng.critical_lr(model, (X, y))
    Fm = fl.fisher_matrix(model, (X, y), fl.Categorical())
    top = float(torch.linalg.eigvalsh(Fm.double())[-1])
    assert lam == pytest.approx(top, rel=1e-5)
    assert eta == fl.critical_learning_rate(lam) == pytest.approx(2 / lam)
    lam_m, eta_m = ng.critical_lr(model, (X, y), momentum=0.5)
    assert lam_m == lam and eta_m == pytest.approx(3 / lam)


def test_batch_schedule_is_seeded_and_covers_each_epoch():
    b = ng.batch_schedule(10, 3, 7, seed=4)
    assert len(b) == 7 and all(len(i) == 3 for i in b)
    assert [x.tolist() for x in b] == [x.tolist() for x in ng.batch_schedule(10, 3, 7, seed=4)]
    assert [x.tolist() for x in b] != [x.tolist() for x in ng.batch_schedule(10, 3, 7, seed=5)]
    epoch = torch.cat(b[:3])  # 3 full batches per epoch of 10 (the short one dropped): distinct indices
    assert len(set(epoch.tolist())) == 9


def test_optimiser_specs_follow_the_config():
    cfg = ng.NaturalGradientConfig.create("natural-gradient", dampings=(0.1, 0.01), sgd_fractions=(1.0, 0.25),
                                          steps=5, first_order_steps=20)
    specs = ng.optimiser_specs(cfg, eta_c=2.0)
    assert [s.key for s in specs] == ["ngd_l0.1", "ngd_l0.01", "ngd_adaptive", "diag_hutchinson", "sgd_c1",
                                      "sgd_c0.25", "adam"]
    by = {s.key: s for s in specs}
    assert by["sgd_c1"].lr == 2.0 and by["sgd_c0.25"].lr == 0.5
    assert by["ngd_adaptive"].adaptive and by["ngd_adaptive"].damping == cfg.adaptive_start
    assert all(s.steps == 5 for s in specs if s.family == "ngd")
    assert all(s.steps == 20 for s in specs if s.family != "ngd")


def test_config_validation():
    with pytest.raises(ValueError, match="sparsit"):
        ng.NaturalGradientConfig.create("natural-gradient", sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="damping"):
        ng.NaturalGradientConfig.create("natural-gradient", dampings=(0.1, -1.0))
    with pytest.raises(ValueError, match="target_accuracy"):
        ng.NaturalGradientConfig.create("natural-gradient", target_accuracy=1.5)
    cfg = ng.NaturalGradientConfig.create("natural-gradient", dampings=0.1, sparsities=(0.9, 0.0))
    assert cfg.dampings == (0.1,) and cfg.sparsities == (0.0, 0.9)


def test_batch_larger_than_the_training_set_is_refused_before_the_folder(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        ng.natural_gradient(tmp_path / "run", quick=True, progress=False, batch_size=5000)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- training and pruning
def test_train_run_ngd_is_the_library_optimiser():
    data = _data()
    init = make_mlp(6, (5,), 3, generator=torch.Generator().manual_seed(1))
    batches = ng.batch_schedule(60, 12, 3, seed=0)
    spec = ng.OptimiserSpec("ngd", "NGD", "ngd", 0.5, 3, 0.1)
    rows, model, info = ng.train_run(spec, init, data, batches, eval_every=1)
    ref = copy.deepcopy(init)
    opt = fl.optim.NaturalGradient(ref.parameters(), ref, fl.Categorical(), lr=0.5, damping=0.1)
    for idx in batches:
        opt.step((data["Xtr"][idx], data["ytr"][idx]))
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and info["diverged"] is None
    assert len(info["residuals"]) == 3 and max(info["residuals"]) < 1e-4 and info["dampings"] == [0.1] * 3
    with torch.no_grad():
        assert rows[-1]["test_loss"] == pytest.approx(F.cross_entropy(ref(data["Xte"]), data["yte"]).item(), rel=1e-5)
    assert rows[0]["seconds"] == 0 and rows[-1]["seconds"] > 0
    assert all(r["optimiser"] == "ngd" and r["family"] == "ngd" for r in rows)


def test_train_run_first_order_and_adaptive():
    data = _data()
    init = make_mlp(6, (5,), 3, generator=torch.Generator().manual_seed(1))
    batches = ng.batch_schedule(60, 12, 6, seed=0)
    rows, model, _ = ng.train_run(ng.OptimiserSpec("sgd", "SGD", "sgd", 0.2, 6), init, data, batches, 3)
    ref = copy.deepcopy(init)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(ref(data["Xtr"][idx]), data["ytr"][idx]).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b)
    assert [r["step"] for r in rows] == [0, 3, 6]
    spec = ng.OptimiserSpec("ad", "adaptive", "ngd", 0.1, 6, 1e-2, adaptive=True)
    rows, _, info = ng.train_run(spec, init, data, batches, 2)
    assert info["diverged"] is None
    lam = info["dampings"]
    assert lam[0] == 1e-2 and len(lam) == 6
    assert all(b / a in (pytest.approx(1.5), pytest.approx(2 / 3), 1.0) for a, b in zip(lam[:-1], lam[1:], strict=True))
    assert lam != [1e-2] * 6  # it adapted


def test_train_run_stops_a_diverging_run():
    data = _data()
    init = make_mlp(6, (5,), 3, generator=torch.Generator().manual_seed(1))
    batches = ng.batch_schedule(60, 12, 40, seed=0)
    rows, _, info = ng.train_run(ng.OptimiserSpec("sgd", "SGD", "sgd", 1e4, 40), init, data, batches, 1)
    assert info["diverged"] is not None and info["diverged"] < 40
    assert len(rows) <= info["diverged"] + 1


def test_prune_sweep():
    data = _data(n=80)
    model = make_mlp(6, (8,), 3, generator=torch.Generator().manual_seed(2))
    rows, info = ng.prune_sweep(model, data, (0.0, 0.5, 0.9), n_saliency=40, hutchinson_samples=4, finetune_steps=3,
                                finetune_lr=0.1, batch_size=16, seed=0)
    assert len(rows) == 3 * len(ng.CRITERIA)
    n_w = 6 * 8 + 8 * 3
    for r in rows:
        assert r["achieved_sparsity"] == pytest.approx(round(r["sparsity"] * n_w) / n_w)
    dense = [r for r in rows if r["sparsity"] == 0]
    assert len({r["test_accuracy"] for r in dense}) == 1 and len({r["finetuned_test_accuracy"] for r in dense}) == 1
    assert all(r["overlap_with_exact"] == 1.0 for r in rows if r["criterion"] == "fisher_exact")
    assert info["spearman"]["fisher_exact"] == pytest.approx(1.0)
    # the exact criterion is OBD with the exact true-Fisher diagonal
    sal = fl.prune.saliency(model, (data["Xtr"][:40], data["ytr"][:40]), fl.Categorical(), "fisher")
    diag = fl.fisher_diag(model, (data["Xtr"][:40], data["ytr"][:40]), fl.Categorical(),
                          params=["fc1.weight", "out.weight"])
    theta = torch.cat([model.fc1.weight.reshape(-1), model.out.weight.reshape(-1)]).detach()
    assert torch.allclose(torch.cat([v.reshape(-1) for v in sal.values()]), 0.5 * diag * theta**2)
    assert all(p.grad is None for p in model.parameters())  # the model itself was neither pruned nor trained
    assert not hasattr(model.fc1, "weight_mask")


# ----------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ng") / "run"
    assert main(["run", "natural-gradient", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.study
def test_quick_run_is_registered():
    assert "natural-gradient" in EXPERIMENTS and STUDIES["natural-gradient"] is ng.NaturalGradientStudy


@pytest.mark.study
def test_quick_run_writes_its_folder(quick_run):
    for name in ["config.json", "metrics.csv", "pruning.csv", "summary.md", *ng.FIGURES]:
        assert (quick_run / name).is_file(), name
    text = (quick_run / "summary.md").read_text()
    for part in ("## The critical learning rate at initialisation", "## Optimisers", "## Damping", "## Pruning",
                 "## Figures", *ng.FIGURES):
        assert part in text, part


@pytest.mark.study
def test_quick_run_tables(quick_run):
    cfg = ng.NaturalGradientConfig.create("natural-gradient", quick=True)
    rows = _rows(quick_run / "metrics.csv")
    keys = [s.key for s in ng.optimiser_specs(cfg, 1.0)]
    assert list(dict.fromkeys(r["optimiser"] for r in rows)) == keys
    for k in keys:
        rs = [r for r in rows if r["optimiser"] == k]
        assert int(rs[0]["step"]) == 0 and float(rs[0]["seconds"]) == 0
        assert all(float(a["seconds"]) <= float(b["seconds"]) for a, b in zip(rs[:-1], rs[1:], strict=True))
        assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rs)
    init = {float(r["train_loss"]) for r in rows if r["step"] == "0"}
    assert len(init) == 1 and math.isclose(init.pop(), math.log(10), rel_tol=0.1)  # one initialisation for all
    # the η_c runs use the rate the summary reports
    text = (quick_run / "summary.md").read_text()
    eta = float(text.split("η_c = 2/λ_max = ")[1].split(" ")[0])
    lr = {r["optimiser"]: float(r["lr"]) for r in rows}
    assert lr["sgd_c1"] == pytest.approx(eta, rel=1e-3) and lr["sgd_c0.5"] == pytest.approx(eta / 2, rel=1e-3)
    pr = _rows(quick_run / "pruning.csv")
    assert len(pr) == len(cfg.sparsities) * len(ng.CRITERIA)
    assert all(abs(float(r["achieved_sparsity"]) - float(r["sparsity"])) < 1e-3 for r in pr)


@pytest.mark.study
def test_quick_run_is_reproducible(quick_run, tmp_path):
    again = ng.natural_gradient(tmp_path / "again", quick=True, progress=False)
    assert (again / "pruning.csv").read_bytes() == (quick_run / "pruning.csv").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(quick_run / "metrics.csv")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(again / "metrics.csv")]


@pytest.mark.study
def test_quick_run_refuses_another_configuration(quick_run):
    with pytest.raises(ValueError):
        ng.natural_gradient(quick_run, quick=True, progress=False, steps=13)
