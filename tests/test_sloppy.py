"""The sloppy-spectra study (``fisherlens run sloppy``, seed 002 §4.3–4.4): the accurate per-input spectrum equals
dense ``eigh`` of ``fl.fisher_matrix`` where float64 can resolve it and a 50-digit closed form where it cannot;
input selection; the quick run's folder and its reported eigenvalues; bad configurations are refused."""

from __future__ import annotations

import json
import math

import mpmath
import pytest
import torch

import fisherlens as fl
from fisherlens.cli import main
from fisherlens.experiments import EXPERIMENTS
from fisherlens.experiments._common import make_mlp
from fisherlens.experiments.sloppy import (
    FIGURES,
    Probabilities,
    jacobians,
    member,
    per_input_spectrum,
    reduced_spectrum,
    select_inputs,
    sloppy,
)
from fisherlens.runs import read_csv

pytestmark = pytest.mark.study

D = torch.float64
EPS = torch.finfo(D).eps


def _net(hidden, d=12, C=10, seed=0, scale=1.0):
    torch.manual_seed(seed)
    m = make_mlp(d, hidden, C, dtype=D).eval()
    with torch.no_grad():
        m.out.weight.mul_(scale)
    x = torch.rand(d, dtype=D, generator=torch.Generator().manual_seed(seed + 1))
    return m, x


def _dense(m, x, lik):
    model, L = (Probabilities(m), fl.Gaussian(1.0)) if lik == "gaussian" else (m, fl.Categorical())
    F = fl.fisher_matrix(model, (x[None], None), L)
    vals, vecs = torch.linalg.eigh(F)
    return F, vals.flip(0), vecs.flip(1)


@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
@pytest.mark.parametrize("hidden", [(), (5,), (7,)])
def test_per_input_spectrum_equals_dense_eigh(hidden, lik):
    """Moderate logits: all 9 eigenvalues are far above float64 round-off; dense eigh of the P × P FIM has
    exactly 9 nonzero eigenvalues (rank C − 1, also for the Gaussian FIM on p) and they match."""
    m, x = _net(hidden, scale=2.0)
    vals, vecs = per_input_spectrum(m, x, lik, vectors=True)
    F, dense, _ = _dense(m, x, lik)
    assert vals.shape == (9,) and vals.dtype == D
    assert dense[9:].abs().max() < 100 * EPS * dense[0] * math.sqrt(F.shape[0])  # rank 9, not 10
    assert vals[-1] > 1e-6 * vals[0]
    torch.testing.assert_close(vals, dense[:9], rtol=1e-9, atol=0)
    # eigenvectors: unit, orthogonal, F v = λ v
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(9, dtype=D), rtol=0, atol=1e-10)
    torch.testing.assert_close(F @ vecs, vecs * vals, rtol=0, atol=1e-10 * float(vals[0]))


def test_per_input_spectrum_matches_library_gram():
    m, x = _net((6,), scale=3.0)
    for lik in ("categorical", "gaussian"):
        model, L = (Probabilities(m), fl.Gaussian(1.0)) if lik == "gaussian" else (m, fl.Categorical())
        lib = fl.eigenvalues(model, (x[None], None), L, method="gram")
        acc = per_input_spectrum(m, x, lik)
        ok = acc > 1e-8 * acc[0]
        torch.testing.assert_close(lib[:9][ok], acc[ok], rtol=1e-7, atol=0)


@pytest.mark.parametrize("scale", [1.0, 10.0, 40.0])
def test_no_hidden_closed_form_in_50_digits(scale):
    """784-10-like net (no hidden layer): J_z J_zᵀ = (‖x‖²+1) I, so the categorical FIM's eigenvalues are
    (‖x‖²+1)·eig(diag π − ππᵀ) and the Gaussian ones (‖x‖²+1)·eig(·)² — checked with π and the eigenvalues
    computed independently in 50-digit arithmetic, down to ratios far below float64's ε (scale 40 puts the
    smallest probabilities near 1e-20)."""
    m, x = _net((), scale=scale, seed=3)
    z = m(x[None])[0].detach()
    with mpmath.workdps(50):
        zs = [mpmath.mpf(float(v)) for v in z]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in zs))
        pi = [mpmath.exp(v - lse) for v in zs]
        A = mpmath.matrix([[(pi[i] if i == j else 0) - pi[i] * pi[j] for j in range(10)] for i in range(10)])
        ev = sorted((float(e) for e in mpmath.eigsy(A)[0]), reverse=True)[:9]
    c = float(x @ x) + 1
    ref = {"categorical": torch.tensor(ev, dtype=D) * c, "gaussian": torch.tensor(ev, dtype=D) ** 2 * c}
    for lik in ("categorical", "gaussian"):
        got = per_input_spectrum(m, x, lik)
        torch.testing.assert_close(got, ref[lik], rtol=1e-11, atol=0)
    if scale == 40.0:
        assert float(ref["gaussian"][-1] / ref["gaussian"][0]) < 1e-20  # far beyond a float64 eigensolver


def test_pseudo_determinant_identity_with_tiny_probabilities():
    """Π λ_i(F_cat) = (Π_k π_k)·det(J_u J_uᵀ): ties the smallest eigenvalues of a hidden-layer net to the softmax
    probabilities, with no eigensolver involved."""
    m, x = _net((8,), scale=200.0, seed=5)
    z, J = jacobians(m, x[None])
    z, J = z[0], J[0]
    logp = torch.log_softmax(z, -1)
    assert float(logp.min()) < math.log(1e-15)
    t = int(z.argmax())
    r = [k for k in range(10) if k != t]
    Ju = J[r] - J[t]
    vals, _, _ = reduced_spectrum(z, J, "categorical", vectors=False)
    assert float(vals.log().sum()) == pytest.approx(float(logp.sum() + torch.logdet(Ju @ Ju.T)), rel=1e-10, abs=1e-9)
    # the top eigenvalues still equal the float64 dense route
    _, dense, _ = _dense(m, x, "categorical")
    ok = vals > 1e-6 * vals[0]
    torch.testing.assert_close(vals[ok], dense[:9][ok], rtol=1e-7, atol=0)


def test_per_input_spectrum_refuses_bad_input():
    m, x = _net(())
    with pytest.raises(ValueError, match="likelihood"):
        per_input_spectrum(m, x, "poisson")
    with pytest.raises(ValueError, match="one input"):
        per_input_spectrum(m, x[None], "categorical")


# ----------------------------------------------------------------------------- input selection
def test_select_inputs_automatic_and_override():
    p_true = torch.tensor([[0.9, 0.2, 0.99, 0.5], [0.8, 0.1, 0.97, 0.6], [0.95, 0.3, 0.98, 0.4]])
    p_max = torch.tensor([[0.9, 0.7, 0.99, 0.5], [0.8, 0.9, 0.97, 0.6], [0.95, 0.7, 0.98, 0.6]])
    # easy: largest mean p(true); hard: smallest mean max_k p_k (least confident), not the smallest p(true)
    assert select_inputs(p_true, p_max) == (2, 3)
    assert select_inputs(p_true, p_max, easy=0) == (0, 3)
    assert select_inputs(p_true, p_max, hard=1) == (2, 1)
    # the ensemble mean decides, not a single network
    q = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.9, 0.6]])  # means 0.5, 0.45, 0.55
    assert select_inputs(q, q) == (2, 1)
    with pytest.raises(ValueError):
        select_inputs(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError):
        select_inputs(torch.ones(2, 3), torch.ones(2, 4))


# ----------------------------------------------------------------------------- the run folder
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sloppy"
    assert main(["run", "sloppy", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_registered():
    assert "sloppy" in EXPERIMENTS and EXPERIMENTS["sloppy"][1] is sloppy


def test_quick_run_writes_every_file(quick_run):
    names = {p.name for p in quick_run.iterdir()}
    assert {"config.json", "metrics.csv", "networks.csv", "spectra.csv", "averaged.csv", "networks.pt",
            "summary.md", *FIGURES} <= names
    summary = (quick_run / "summary.md").read_text()
    assert "**CHECK**" not in summary
    assert "## Are these networks sloppy?" in summary
    rows = read_csv(quick_run / "spectra.csv")
    archs = {r["arch"] for r in rows}
    assert archs == {"784-10", "784-2-10", "784-4-10"}
    # 2 networks × 3 architectures × 2 inputs × 2 output models × 9 eigenvalues, all positive
    assert len(rows) == 2 * 3 * 2 * 2 * 9
    assert all(float(r["eigenvalue"]) > 0 for r in rows)


def test_reported_eigenvalues_equal_dense_eigh(quick_run):
    """Reload a trained network from networks.pt and recompute the chosen input's FIM densely in float64."""
    cfg = json.loads((quick_run / "config.json").read_text())
    state = torch.load(quick_run / "networks.pt", weights_only=True)
    rows = read_csv(quick_run / "spectra.csv")
    X, _ = fl_data()
    summary = (quick_run / "summary.md").read_text()
    idx = {inp: int(summary.split(f"**{inp}**: dataset index ")[1].split(" ")[0]) for inp in ("easy", "hard")}
    assert cfg["easy"] is None and cfg["hard"] is None
    arch = "784-2-10"  # P = 1600: a dense P × P eigh is quick
    stacked = [state[arch][str(i)] for i in range(len(state[arch]))]
    model = member(stacked, 1)
    for inp in ("easy", "hard"):
        for lik in ("gaussian", "categorical"):
            got = torch.tensor([float(r["eigenvalue"]) for r in rows if (r["arch"], r["network"], r["input"],
                                r["likelihood"]) == (arch, "1", inp, lik)], dtype=D)
            lm, L = (Probabilities(model), fl.Gaussian(1.0)) if lik == "gaussian" else (model, fl.Categorical())
            F = fl.fisher_matrix(lm, (X[idx[inp]].double()[None], None), L)
            dense = torch.linalg.eigvalsh(F).flip(0)
            assert dense[9:].abs().max() <= 100 * EPS * dense[0] * math.sqrt(F.shape[0])  # rank 9
            ok = got > 1e-6 * got[0]
            assert ok.sum() >= 3
            torch.testing.assert_close(got[ok], dense[:9][ok], rtol=1e-8, atol=0)


def fl_data():
    from fisherlens import datasets

    return datasets.load("mnist-subset")


def test_given_index_override(tmp_path):
    out = tmp_path / "given"
    path = sloppy(out, quick=True, networks=1, epochs=1, hidden=[()], n_gram=5, top_k=0, easy=7, hard=4321,
                  progress=False)
    summary = (path / "summary.md").read_text()
    assert "**easy**: dataset index 7 " in summary and "**hard**: dataset index 4321 " in summary
    assert summary.count("given by index") == 2
    rows = read_csv(path / "spectra.csv")
    assert {r["arch"] for r in rows} == {"784-10"} and len(rows) == 2 * 2 * 9
    assert not [r for r in read_csv(path / "averaged.csv") if r["source"] == "lanczos_full"]


@pytest.mark.parametrize("opts, match", [
    ({"networks": 0}, "networks"),
    ({"epochs": 1.5}, "epochs"),
    ({"hidden": [(4, 4)]}, "0 or 1 hidden layer"),
    ({"hidden": [(), ()]}, "twice"),
    ({"hidden": "x"}, "hidden"),
    ({"easy": 10**6}, "easy"),
    ({"hard": -1}, "hard"),
    ({"n_gram": 10**5}, "n_gram"),
    ({"n_train": 4900, "n_test": 200}, "exceeds"),
    ({"lr": -1.0}, "lr"),
    ({"top_k": -1}, "top_k"),
    ({"data": "no-such-set"}, "Unknown dataset"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, opts, match):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        sloppy(out, quick=True, progress=False, **opts)
    assert not out.exists()


def test_folder_with_other_config_is_refused(quick_run, capsys):
    assert main(["run", "sloppy", "--quick", "--out", str(quick_run), "--no-progress", "--set", "epochs=3"]) == 2
    assert "different config" in capsys.readouterr().err


def test_member_does_not_touch_the_global_rng():
    g = torch.Generator().manual_seed(0)
    stacked = [torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 10, 3, generator=g),
               torch.randn(2, 10, generator=g)]
    before = torch.get_rng_state()
    m = member(stacked, 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert [n for n, _ in m.named_parameters()] == ["fc1.weight", "fc1.bias", "out.weight", "out.bias"]
    x = torch.rand(4, 5, generator=g)
    ref = (x @ stacked[0][1].T + stacked[1][1]).relu() @ stacked[2][1].T + stacked[3][1]
    torch.testing.assert_close(m(x.double()), ref.double(), rtol=1e-6, atol=1e-6)


def test_networks_file_is_written_atomically(tmp_path, monkeypatch):
    """A save killed mid-write leaves neither a partial networks.pt nor a temp file behind."""
    import os
    from pathlib import Path

    def dies(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"partial")
        else:
            f.write(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", dies)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="mid-write"):
        sloppy(out, quick=True, networks=1, epochs=1, hidden=[()], n_gram=5, top_k=0, progress=False)
    assert [p.name for p in out.iterdir() if "networks" in p.name] == []
