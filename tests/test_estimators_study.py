"""The estimators study (``fisherlens run estimators --quick``): files, summary numbers, and sound statistics."""

from __future__ import annotations

import json
import math

import pytest

from fisherlens.experiments import EXPERIMENTS, get
from fisherlens.runs import read_csv

pytestmark = pytest.mark.study


FILES = ["config.json", "metrics.csv", "error_vs_draws.csv", "bounds.csv", "core_spectrum.csv", "summary.md",
         "bias.png", "cv_per_parameter.png", "error_vs_draws.png", "error_vs_time.png", "bounds.png",
         "diag_true_vs_empirical.png"]
ESTIMATORS = ["hutch_rad", "hutch_gauss", "hutch_rad_ps", "mc", "mc_ps"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("estimators")
    path = get("estimators")(out, quick=True, seed=0, progress=False)
    rows = {r["estimator"]: r for r in read_csv(path / "metrics.csv")}
    bounds = {r["quantity"]: float(r["value"]) for r in read_csv(path / "bounds.csv")}
    return path, rows, bounds


def test_registered():
    assert "estimators" in EXPERIMENTS


def test_writes_all_files(run):
    path, rows, _ = run
    for name in FILES:
        f = path / name
        assert f.is_file() and f.stat().st_size > 0, name
        if name.endswith(".png"):
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["experiment"] == "estimators" and cfg["quick"] is True
    assert set(rows) == {*ESTIMATORS, "empirical"}
    errs = read_csv(path / "error_vs_draws.csv")
    assert {r["estimator"] for r in errs} == set(ESTIMATORS)
    assert len(read_csv(path / "core_spectrum.csv")) == cfg["n_probe"]


def test_summary_reports_key_numbers(run):
    path, rows, bounds = run
    text = (path / "summary.md").read_text()
    for heading in ("## Findings", "## Estimators", "## Core-space bounds", "## Consistency checks"):
        assert heading in text
    for k in ESTIMATORS:
        r = rows[k]
        assert f"{float(r['trace_z']):+.2f}" in text  # trace bias z-score in the table
        assert f"{100 * float(r['frac_cv_le_sqrt2_theory']):.2f}%" in text
    assert f"tr F = {bounds['trace_F']:.4g}" in text
    assert f"{bounds['diag_ratio_U_diag_max']:.4f}" in text
    assert "**CHECK**" not in text and "violated" not in text and "bias beyond noise" not in text


def test_estimators_unbiased_and_variances_as_predicted(run):
    _, rows, _ = run
    for k in ESTIMATORS:
        r = {c: float(v) for c, v in rows[k].items() if c not in ("estimator", "label") and v != ""}
        assert abs(r["trace_z"]) < 5, k  # fl.fisher_trace, independent draws
        assert abs(r["trace_from_diag_draws_z"]) < 5, k
        assert abs(r["diag_mean_z"]) < 1, k
        assert 0.7 < r["diag_std_z"] < 1.4, k
        # the measured single-draw CV follows the exact one computed from the per-sample Jacobians
        assert 0.85 < r["cv_measured_over_theory_median"] < 1.15, k
        assert 0.8 < r["diag_rel_l2_S1"] / r["diag_rel_l2_S1_theory"] < 1.25, k
        assert -0.6 < r["slope_diag"] < -0.4, k
    # Rademacher probes: exact CV ≤ √2 for every entry; Gaussian probes: exactly √2
    assert float(rows["hutch_rad"]["frac_cv_le_sqrt2_theory"]) == 1.0
    assert float(rows["hutch_rad"]["cv_max_theory"]) <= math.sqrt(2) * (1 + 1e-6)
    assert float(rows["hutch_rad_ps"]["frac_cv_le_sqrt2_theory"]) == 1.0
    assert abs(float(rows["hutch_gauss"]["cv_median_theory"]) - math.sqrt(2)) < 1e-6
    # per-sample estimators have a smaller variance than their batch counterparts
    assert float(rows["hutch_rad_ps"]["diag_rel_l2_S1"]) < float(rows["hutch_rad"]["diag_rel_l2_S1"])
    assert float(rows["mc_ps"]["diag_rel_l2_S1"]) < float(rows["mc"]["diag_rel_l2_S1"])


def test_core_space_bounds_hold(run):
    _, rows, b = run
    assert b["trace_F"] <= b["trace_U_diag"] * (1 + 1e-6) and b["trace_F"] <= b["trace_U_iso"] * (1 + 1e-6)
    assert b["diag_ratio_U_diag_max"] <= 1 + 1e-4 and b["diag_ratio_U_iso_max"] <= 1 + 1e-4
    assert b["lambda_max_F"] <= b["lambda_max_U_diag"] * (1 + 1e-6)
    assert b["lambda_max_F"] <= b["lambda_max_U_iso"] * (1 + 1e-6)
    assert b["lambda_max_F"] == pytest.approx(b["lambda_max_F_library_lanczos"], rel=1e-4)
    assert b["core_within_bounds"] == b["core_samples"]
    assert float(rows["empirical"]["trace_exact"]) == pytest.approx(b["trace_F"])
