"""The mean-field studies (seed 003 fig 1 / fig 2 left) in quick mode: run folders, tables, figures, CLI."""

from __future__ import annotations

import json
import math

import pytest

from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS, get
from fisherlens.experiments.meanfield_lr import meanfield_lr
from fisherlens.experiments.meanfield_spectrum import meanfield_spectrum
from fisherlens.runs import read_csv

pytestmark = pytest.mark.study

PNG = b"\x89PNG\r\n\x1a\n"


def _check_pngs(folder, names):
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name


def test_registered():
    assert get("meanfield-spectrum") is meanfield_spectrum
    assert get("meanfield-lr") is meanfield_lr
    assert all(EXPERIMENTS[k][0] for k in ("meanfield-spectrum", "meanfield-lr"))


def test_meanfield_spectrum_quick(tmp_path):
    out = meanfield_spectrum(tmp_path / "spec", quick=True, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["experiment"] == "meanfield-spectrum" and cfg["quick"] and cfg["seeds"] == 4
    rows = read_csv(out / "metrics.csv")
    m_rows = [r for r in rows if r["sweep"] == "M"]
    t_rows = [r for r in rows if r["sweep"] == "T"]
    assert len(m_rows) == 3 * 3 and len(t_rows) == 3 * 4
    for r in m_rows:
        for k in ("mean", "second_moment", "max"):
            assert float(r[k]) > 0 and float(r[f"{k}_theory"]) > 0
            assert math.isfinite(float(r[f"{k}_rel_err"]))
        assert abs(float(r["mean_rel_err"])) < 0.5  # m_λ is right already at small M
        assert int(r["n"]) == 4
    nets = read_csv(out / "networks.csv")
    assert len(nets) == 4 * (3 * 3 + 3 * 4)
    _check_pngs(out, ["fig1_statistics.png", "relative_errors.png", "t_sweep.png", "spectra.png"])
    summary = (out / "summary.md").read_text()
    assert "Relative error of the ensemble mean" in summary and "T sweep" in summary
    assert "Cross-check with the library" in summary and "**CHECK**" not in summary
    # the same folder refuses a different configuration
    with pytest.raises(ValueError, match="different config"):
        meanfield_spectrum(tmp_path / "spec", quick=True, seeds=5, progress=False)


def test_meanfield_lr_quick_via_cli(tmp_path, capsys):
    out = tmp_path / "lr"
    assert main(["run", "meanfield-lr", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["experiment"] == "meanfield-lr" and cfg["momentum"] == 0.9 and cfg["depth"] == 4
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 3 * 2 * 6  # activations × widths × learning rates
    div = {r["diverged"] for r in rows}
    assert div == {"0", "1"}  # the grid straddles the boundary
    # far above η_c everything diverges, far below nothing does
    assert all(r["diverged"] == "1" for r in rows if float(r["eta_over_eta_c"]) > 10)
    assert all(r["diverged"] == "0" for r in rows if float(r["eta_over_eta_c"]) < 0.05)
    widths = read_csv(out / "widths.csv")
    assert len(widths) == 3 * 2 and all(float(w["lambda_max_teacher"]) > 0 for w in widths)
    _check_pngs(out, ["fig2_phase_diagram.png", "loss_vs_eta.png"])
    summary = (out / "summary.md").read_text()
    assert "Share of grid cells" in summary and "| all | theory |" in summary


def test_gaussian_only(tmp_path):
    with pytest.raises(ValueError, match="Gaussian inputs"):
        meanfield_spectrum(tmp_path / "x", quick=True, data="digits")
    assert main(["run", "meanfield-lr", "--quick", "--out", str(tmp_path / "y"), "--data", "digits"]) == 2
    assert not (tmp_path / "x").exists()
