"""The 2-parameter network study of seed 000 §5.2 (``fisherlens run two-param``): its metric equals the exact
empirical Fisher, its curvature matches a finite-difference reference, and the quick run writes a complete
run folder whose summary checks the seed's observations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from reference import brioschi

import fisherlens as fl
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS
from fisherlens.experiments.two_param import (
    LOSSES,
    SigmoidNeuron,
    binary_cross_entropy,
    decision_boundary,
    two_param,
)
from fisherlens.runs import read_csv

pytestmark = pytest.mark.study

G = fl.geometry
D = torch.float64
THETAS = [(0.5, 0.5), (-2.0, 2.5), (1.5, -0.7), (-4.0, -1.5), (0.0, 0.0)]


@pytest.fixture(scope="module")
def data():
    return decision_boundary(30, seed=3)


def _metric(key, data):
    case = LOSSES[key]
    return G.fisher_metric(SigmoidNeuron(output=case.output), data, fl.LossInduced(case.loss), "empirical")


def _closed_form(key, X, t, th):
    """(1/N) Σ_n (∂ℓ/∂z_n)² 25 x_n x_nᵀ with z = 5θ·x, written out by hand for each loss."""
    z = 5 * X @ th
    f = torch.sigmoid(z)
    fp = f * (1 - f)
    dl_dz = {"mean_power": 2 * (f - t) * fp, "l2_norm": torch.sign(f - t) * fp, "cross_entropy": f - t}[key]
    return 25 * torch.einsum("n,ni,nj->ij", dl_dz**2, X, X) / len(X)


@pytest.mark.parametrize("key", list(LOSSES))
def test_metric_equals_exact_empirical_fisher(key, data):
    X, t = data
    m = _metric(key, data)
    for q in THETAS:
        th = torch.tensor(q, dtype=D)
        model = SigmoidNeuron(q, output=LOSSES[key].output)
        ref = fl.fisher_matrix(model, data, fl.LossInduced(LOSSES[key].loss), "empirical")
        torch.testing.assert_close(m(th), ref, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(m(th), _closed_form(key, X, t, th), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("key", list(LOSSES))
def test_curvature_matches_finite_differences(key, data):
    m = _metric(key, data)
    for q in [(0.5, 0.5), (-2.0, 2.5), (1.5, -0.7)]:
        R = G.scalar_curvature(m, q)
        assert R == pytest.approx(brioschi(m, q), rel=1e-5, abs=1e-9)


def test_batched_curvature_equals_single_points(data):
    m = _metric("mean_power", data)
    th = torch.tensor(THETAS, dtype=D)
    c = G.curvature(m, th, chunk_size=2)
    for k, q in enumerate(THETAS):
        assert c.scalar[k].item() == pytest.approx(G.scalar_curvature(m, q), rel=1e-12)


def test_cross_entropy_on_the_probability_equals_the_logit_form(data):
    """−[t log f + (1−t) log(1−f)] on the probability output = the study's BCE-with-logits, where finite."""
    prob = G.fisher_metric(SigmoidNeuron(), data, fl.LossInduced(binary_cross_entropy), "empirical")
    logit = _metric("cross_entropy", data)
    for q in [(0.5, 0.5), (-2.0, 2.5), (1.0, -1.0)]:
        th = torch.tensor(q, dtype=D)
        torch.testing.assert_close(prob(th), logit(th), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(prob.loss(th), logit.loss(th), rtol=1e-12, atol=0)
        assert G.scalar_curvature(prob, q) == pytest.approx(G.scalar_curvature(logit, q), rel=1e-8)


def test_l2_norm_fisher_trace_is_ntk_trace_over_n(data):
    X, _ = data
    m = _metric("l2_norm", data)
    prob = G.fisher_metric(SigmoidNeuron(), data, fl.LossInduced(fl.losses.mean_power(2)), "empirical")
    for q in THETAS[:-1]:
        th = torch.tensor(q, dtype=D)
        assert torch.trace(m(th)).item() == pytest.approx(prob.ntk_trace(th).item() / len(X), rel=1e-13)
        model = SigmoidNeuron(q)
        assert prob.ntk_trace(th).item() == pytest.approx(fl.ntk_trace(model, X, reduction="sum"), rel=1e-12)


def test_l2_norm_curvature_vanishes_at_the_origin(data):
    """At θ = 0 every σ'' vanishes, ∂I = 0 and ∂∂I is totally symmetric, so R = 0 exactly for the L2 loss."""
    assert G.scalar_curvature(_metric("l2_norm", data), [0.0, 0.0]) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- the run folder
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two_param"
    assert main(["run", "two-param", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_registered():
    assert "two-param" in EXPERIMENTS and EXPERIMENTS["two-param"][1] is two_param


def test_quick_run_writes_every_file(quick_run):
    names = {p.name for p in quick_run.iterdir()}
    expected = {"config.json", "metrics.csv", "grid.csv", "summary.md", "data.png", "loss_surfaces.png",
                "output_final.png"} | {f"{w}_{k}.png" for w in ("surfaces", "path") for k in LOSSES}
    assert expected <= names
    for n in expected:
        assert (quick_run / n).stat().st_size > 0
    cfg = json.loads((quick_run / "config.json").read_text())
    assert cfg["experiment"] == "two-param" and cfg["quick"] and cfg["data"] == "decision-boundary"
    assert cfg["resolution"] == 21 and cfg["losses"] == list(LOSSES)


def test_tables_have_a_value_or_a_reason_in_every_cell(quick_run):
    cfg = json.loads((quick_run / "config.json").read_text())
    grid = read_csv(quick_run / "grid.csv")
    assert len(grid) == len(LOSSES) * cfg["resolution"] ** 2
    path = read_csv(quick_run / "metrics.csv")
    assert len(path) == sum(cfg["gd"][k]["steps"] + 1 for k in LOSSES)
    for row in grid + path:
        R = float(row["R"])
        assert math.isfinite(R) or (row["singular"] == "1" and row["reason"])
        for col in ("I11", "I12", "I22", "trace_I", "ntk_trace", "loss_value"):
            assert math.isfinite(float(row[col]))
    l2 = [r for r in grid if r["loss"] == "l2_norm"]
    n = cfg["n_data"]
    assert all(float(r["trace_I"]) == pytest.approx(float(r["ntk_trace"]) / n, rel=1e-9) for r in l2)  # 10 digits
    end = [r for r in path if r["loss"] == "cross_entropy"][-1]
    assert float(end["accuracy"]) == 1.0 and float(end["theta1"]) < 0 < float(end["theta2"])


def test_summary_checks_the_seed_claims(quick_run):
    s = (quick_run / "summary.md").read_text()
    assert "Claim 1" in s and "Claim 2" in s
    assert "Verdict: **confirmed** — L2-norm factor 0.025" in s  # 1/N with N = 40
    assert "R < 0 at every path step" in s and "R decreases at every step" in s
    assert s.count("max relative deviation") == len(LOSSES) and "**CHECK**" not in s
    for name in ("surfaces_mean_power.png", "path_cross_entropy.png", "grid.csv"):
        assert f"]({name})" in s


def test_options_data_sets_and_singular_flags(tmp_path):
    out = two_param(tmp_path / "r", quick=True, data="noisy-boundary", losses=["l2_norm"], resolution=5, steps=3,
                    n_data=12, cond_max=20.0, progress=False)
    grid = read_csv(out / "grid.csv")
    assert len(grid) == 25 and {r["loss"] for r in grid} == {"l2_norm"}
    flagged = [r for r in grid if r["singular"] == "1"]
    assert flagged and all("condition number" in r["reason"] and r["R"] == "nan" for r in flagged)
    assert "singular" in (out / "summary.md").read_text()
    reg = two_param(tmp_path / "reg", quick=True, losses=["mean_power"], resolution=5, steps=3, n_data=12,
                    cond_max=20.0, regularize=0.1, progress=False)
    rows = read_csv(reg / "grid.csv")
    assert any(r["regularized"] == "1" for r in rows) and all(math.isfinite(float(r["R"])) for r in rows)
    X, t = decision_boundary(10, seed=1)
    custom = two_param(tmp_path / "c", quick=True, data=(X, t), losses=["cross_entropy"], resolution=3, steps=2,
                       progress=False)
    assert json.loads((custom / "config.json").read_text())["data"] == "custom"


@pytest.mark.parametrize(
    ("kw", "msg"),
    [({"losses": ["hinge"]}, "unknown loss"), ({"data": "mnist-digits"}, "unknown data set"),
     ({"resolution": 1}, "resolution"), ({"grid": (1, 0, 0, 1)}, "grid"),
     ({"data": (torch.zeros(5, 3), torch.zeros(5))}, "X \\(N, 2\\)"), ({"steps": 0}, "steps")],
)
def test_bad_options(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        two_param(tmp_path / "bad", quick=True, progress=False, **kw)
    assert not (tmp_path / "bad").exists()
